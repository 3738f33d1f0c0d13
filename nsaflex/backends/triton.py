"""The Triton backend: custom kernels for NSA (``nsaflex.kernels``).

Every query selects its own blocks (NSA's per-token semantics), or every
tile of ``m`` queries shares one selection (``granularity: query_block``:
one top-n per tile, its list written to the tile's queries), for any GQA
group size (heads are packed into the kernels' row tiles, never padded in
memory). The compression branch runs as two passes (log-sum-exp, then
output + Eq. 9 block scores), the top-n as a second step over each query
chunk's block scores (no ``[L, L/d]`` tensor is written); the
selection branch attends the union of a tile's selected blocks with per-row
masks, fused with the window branch and the gated combination. Pooling (mean
or the MLP) runs in torch ahead of the kernels, so the MLP's parameters get
their gradients through autograd. Hybrid ``vision_keys: vision`` runs each
row's vision tokens in place where they are one run (a video between a prompt
and a question), else packs them with ``cu_seqlens`` (:mod:`nsaflex.hybrid`);
text queries take the dense path. q, k and v are read in the layout they come
in (the model's ``[B, L, H, D]`` needs no copy: ``ops.kernel_inputs``).

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import torch
from torch.nn import functional as F

from nsaflex.backends.base import BranchPlan
from nsaflex.errors import InputError
from nsaflex.hybrid import (TEXT_PATH_NOTES, combine, finite_later, pack_varlen, sparse_layout, text_dense_attention,
                            unpack_varlen)
from nsaflex.inputs import resolve_gates
from nsaflex.inspect import causal_logsumexp, empty_branch_info
from nsaflex.pooling import MLPPooling, compress, compressed_counts
from nsaflex.spec import Pattern

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend:
    name = "triton"

    def unsupported(self, pattern: Pattern, device: str) -> str | None:
        if device == "cpu" and not _interpret():
            return "the Triton kernels need a CUDA device (on CPU only under TRITON_INTERPRET=1)"
        if device == "cuda" and _interpret():
            return "TRITON_INTERPRET=1 is set: the Triton kernels would run interpreted on the CPU"
        try:
            import triton  # noqa: F401

            from nsaflex.kernels.ops import unsupported_reason
        except ImportError as error:  # pragma: no cover - triton is a dependency
            return f"triton cannot be imported: {error}"
        if pattern.dense:
            return None
        head_dim = pattern.model.head_dim
        if head_dim is not None and head_dim not in HEAD_DIMS:
            return f"head dim {head_dim} (pattern model.head_dim) is not one of the kernels' {HEAD_DIMS}"
        return unsupported_reason(pattern)

    def describe(self, pattern: Pattern, device: str) -> tuple[BranchPlan, ...]:
        from nsaflex.kernels.ops import launch_choices, make_config

        if pattern.dense:
            return (BranchPlan("dense", self.name, "torch SDPA (causal)", "is_causal"),)
        cfg = make_config(pattern)
        plans = []
        if cfg.has_cmp:
            plans.append(BranchPlan(
                "compression", self.name, "cmp_lse_kernel + cmp_score_kernel (two passes, heads packed in row tiles)",
                "analytic visibility (i*d + l - 1 vs t)",
                {"block": cfg.cblock, "stride": cfg.cstride, "visibility": "videonsa_legacy" if cfg.legacy else "causal",
                 "pooling": pattern.compression.pooling},
                ("pooling in torch ahead of the kernels",),
            ))
        if cfg.has_slc:
            launch = launch_choices(HEAD_DIMS[0], 1)  # the chunk bounds do not depend on the head dim or group
            summed = "head" if cfg.head_scoring else "group"
            if cfg.unit == 1:
                topn = ("cmp_score_kernel writes a query chunk's block scores, then topn_select_kernel (exact bisection "
                        "over the score bits)")
                notes = [f"block scores (Eq. 9, {summed}-summed) written per query chunk of up to {launch.topn_chunk} "
                         f"tokens ([B, Hsel, chunk, t_end / l'], under {launch.topn_buffer_bytes >> 20} MiB); the "
                         "compression probabilities [L, L/d] are never written"]
            else:
                m = cfg.unit
                topn = (f"cmp_score_kernel writes a query chunk's block scores per tile of {m} queries, then "
                        f"topn_select_kernel ranks each tile once (exact bisection over the score bits) and writes its "
                        f"block list to the tile's {m} query rows")
                notes = [f"query_block m = {m}: one top-n per tile (L/{m} rows), Eq. 9 block scores summed over the "
                         f"tile's queries{'' if cfg.head_scoring else ' and the group heads'}, candidates and forced "
                         f"blocks those of the tile's first query; up to {launch.topn_chunk} tiles a query chunk "
                         f"([B, Hsel, chunk / {m}, t_end / l'], under {launch.topn_buffer_bytes >> 20} MiB)",
                         "the block lists expanded to the tile's tokens, so slc_win_kernel and the backward kernels "
                         "run per-token lists unchanged: each query attends exactly its tile's blocks",
                         _tile_spans(pattern, cfg)]
            plans.append(BranchPlan(
                "selection", self.name, f"{topn}; slc_win_kernel over the tile's union of blocks",
                "per-token block lists (int32 [B, H, L, n+4]) with per-row hit masks",
                {"block": cfg.slc_block, "count": cfg.count, "scoring": summed,
                 "eq9": [cfg.eq9_a, cfg.eq9_b], "top_slots": cfg.nt, "query_block": cfg.unit},
                tuple(notes),
            ))
        if cfg.has_win:
            plans.append(BranchPlan("window", self.name, "slc_win_kernel (fused with selection and gating)",
                                    "analytic t - w < s <= t", {"size": cfg.window}))
        if pattern.hybrid is not None:
            plans.append(BranchPlan(
                "text", self.name, "torch SDPA over gathered text queries", "causal [B, 1, Nt, L]", {},
                (*TEXT_PATH_NOTES,
                 "rows whose vision tokens are one run: the kernels run on the rows in place and the text rows are "
                 "written into their output; other layouts are packed (cu_seqlens) and scattered back"),
            ))
        return tuple(plans)

    def build(self, pattern: Pattern, plan: Any):
        from nsaflex.kernels.ops import make_config

        deterministic = getattr(plan, "deterministic", True)
        cfg = None if pattern.dense else make_config(pattern, atomic=not deterministic)

        def kernel(q, k, v, gates, token_types, pooler: MLPPooling | None, *, info: dict | None = None):
            """``info``: a dict that receives the per-branch values of
            :class:`nsaflex.AttentionInfo` (full rows, float32), read from
            :func:`nsaflex.kernels.ops.record_forward`."""
            _check_tensors(q, k, v, cfg)
            if q.device.type == "cpu" and q.dtype == torch.bfloat16:
                return kernel(*interpreter_inputs(q, k, v, gates), token_types, pooler, info=info).to(torch.bfloat16)
            if pattern.dense:
                out = _dense(q, k, v)
                if info is not None:
                    info.update(dense_output=out.float(), dense_lse=causal_logsumexp(q, k),
                                sparse_queries=torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device))
                return out
            return _sparse_forward(pattern, cfg, q, k, v, gates, token_types, pooler, info=info)

        return kernel


def interpreter_inputs(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``tensors`` with bf16 ones as float32, for the CPU interpreter: it keeps bf16 as
    uint16 bit patterns, and its tl.dot multiplies those integers (inf rows).
    float32 holds every bf16 value exactly and the GPU's bf16 dots accumulate in
    float32: within bf16 rounding of the GPU."""
    return [None if t is None else t.float() if t.dtype == torch.bfloat16 else t for t in tensors]


def _tile_spans(pattern: Pattern, cfg: Any) -> str:
    """The selection kernel's token tiles for query tiles of ``cfg.unit``
    queries: the largest divisor of m that fits the kernel's rows, so that each
    lies inside one query tile (both aligned to the sparse sequence's start),
    for the pattern's head counts where it names them."""
    from nsaflex.kernels.ops import _Tiles, launch_choices

    m = cfg.unit
    model = pattern.model
    if model.query_heads is None or model.kv_heads is None:
        return (f"slc_win_kernel tiles of the largest divisor of {m} up to 64 / G tokens (G: query heads per kv "
                f"head, set by the inputs): each inside one tile of {m} queries, one block list each")
    group = model.query_heads // model.kv_heads
    tiles = _Tiles(cfg, launch_choices(model.head_dim or HEAD_DIMS[-2], group), group)
    return (f"slc_win_kernel tiles of {tiles.bt_sel} tokens (G = {group}, {tiles.bt_sel * group} of "
            f"{tiles.rows_sel} rows) lie inside one tile of {m} queries: one block list each, no union")


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Any = None) -> None:
    """Refuse what the kernels cannot take (``cfg``: the pattern's KernelConfig, None when dense)."""
    if q.dtype not in DTYPES:
        raise InputError("q", "float16, bfloat16 or float32 for the triton backend", str(q.dtype))
    if q.shape[-1] not in HEAD_DIMS:
        raise InputError("q", f"a head dim in {HEAD_DIMS} for the triton backend", q.shape[-1])
    if q.device.type == "cpu" and not _interpret():
        raise InputError("q", "a CUDA tensor for the triton backend (CPU only under TRITON_INTERPRET=1)", str(q.device))
    if q.device.type not in ("cpu", "cuda"):
        raise InputError("q", "a CUDA tensor for the triton backend", str(q.device))
    if cfg is not None and cfg.head_scoring and q.shape[1] > 64 * k.shape[1]:
        # each (token, head) row of a tile is one bit of the union's 64-bit row masks
        raise InputError("q", "at most 64 query heads per kv head for head scoring on the triton backend",
                         f"{q.shape[1]} query heads over {k.shape[1]} kv heads")


def _dense(q, k, v):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), is_causal=True
    )


def _sparse_forward(pattern, cfg, q, k, v, gates, token_types, pooler, launch=None, info: dict | None = None):
    """The sparse branches of ``pattern`` (``cfg``: its KernelConfig; ``launch``:
    the kernels' Launch, None for :func:`nsaflex.kernels.ops.launch_choices`),
    q ``[B, Hq, L, D]``, k, v ``[B, Hkv, L, D]``, with the text queries of a
    hybrid pattern on the dense path. ``info``: see the kernel built by
    :meth:`TritonBackend.build`."""
    from nsaflex.kernels.ops import SeqLayout, kernel_inputs, nsa_attention

    batch, _, length, _ = q.shape
    device = q.device
    layout = sparse_layout(pattern, token_types, batch, length, device)
    gates = resolve_gates(pattern, gates, q)
    c = pattern.compression
    # Read off the token classes (once per layout) before the kernels are queued; the
    # finiteness reduction queued before them and read after them, so the host waits
    # on neither while the GPU holds the kernels' work.
    text_rows = layout.text_rows if layout.has_text else None
    finite = finite_later(q, k, v) if layout.has_text else None
    if info is None and not layout.identity and layout.max_length > 0 and layout.span_starts is not None:
        return _spans_in_place(pattern, cfg, q, k, v, gates, layout, pooler, launch, text_rows, finite)

    def text_path() -> torch.Tensor | None:
        text = text_dense_attention(q, k, v, text_rows, finite=finite) if text_rows is not None else None
        if info is not None and text is not None:
            info.update(dense_output=text.float(), dense_lse=causal_logsumexp(q, k))
        return text

    if info is not None:
        info.update(empty_branch_info(pattern, q, layout))
    # Every token vision (vision_keys: vision) gives an identity layout: the compacted
    # rows are the rows.
    if layout.identity:
        qs, ks, vs = kernel_inputs(q, k, v, length)
        gs = gates
        starts = torch.zeros(batch, dtype=torch.int32, device=device)
        lens = torch.full((batch,), length, dtype=torch.int32, device=device)
        max_len = length
        kc = vc = None
        n_cmp = c.num_tokens(length) if c is not None else 0
        if c is not None and n_cmp > 0:
            kc, vc = compress(ks, vs, c, pooler)
            kc, vc = kc.contiguous(), vc.contiguous()
        cstarts = torch.zeros(batch, dtype=torch.int32, device=device)
        clens = torch.full((batch,), n_cmp, dtype=torch.int32, device=device)
        max_cmp = n_cmp
        packed = False
    else:
        if layout.max_length == 0:
            sparse = torch.zeros_like(q)
            return combine(sparse, text_path(), layout)
        qs = pack_varlen(q, layout)[None].contiguous()
        ks = pack_varlen(k, layout)[None].contiguous()
        vs = pack_varlen(v, layout)[None].contiguous()
        gs = pack_varlen(gates, layout)[None]
        lens_list = list(layout.host_lengths)
        max_len = max(lens_list)  # the kernels' grids need the longest row, not the padded Lmax
        starts = layout.cu_seqlens[:-1].to(torch.int32).contiguous()
        lens = layout.lengths.to(torch.int32)
        counts = [c.num_tokens(n) if c is not None else 0 for n in lens_list]
        kc = vc = None
        if c is not None and sum(counts) > 0:
            firsts = itertools.accumulate(lens_list[:-1], initial=0)
            kc, vc = _pooled_runs(ks, vs, [(0, a, n, nc) for a, n, nc in zip(firsts, lens_list, counts)], c, pooler)
        # From the device lengths, not a host list: copying one to the device waits for the queue.
        clens = (compressed_counts(c, lens) if c is not None else torch.zeros_like(lens)).to(torch.int32)
        cstarts = torch.cumsum(clens, 0, dtype=torch.int32) - clens
        max_cmp = max(counts)
        packed = True
    min_cmp = n_cmp if layout.identity else min(counts)
    lay = SeqLayout(starts, lens, cstarts, clens, max_len, max_cmp, packed, min_cmp)
    if info is None:
        out = nsa_attention(qs, ks, vs, kc, vc, gs, lay, cfg, launch)
    else:
        out, seen = _recorded_attention(qs, ks, vs, kc, vc, gs, lay, cfg, launch)
        _branch_info(info, seen, pattern, layout, packed, length, q.shape[1] // k.shape[1])
    text = text_path()
    if layout.identity and not layout.has_text:
        return out
    if packed:
        # squeeze, not [0]: its backward is a view, select's a zero-filled copy of the packed rows.
        out = unpack_varlen(out.squeeze(0), layout, length)
    return combine(out, text, layout)


def _spans_in_place(pattern, cfg, q, k, v, gates, layout, pooler, launch, text_rows, finite):
    """The sparse branches where each row's sparse queries are one run of
    consecutive tokens (``layout.span_starts``): the kernels read the rows as they
    are, each run from its first token (``starts``), and write its outputs in
    place; the text path then writes the other rows of the same tensor. Nothing
    is packed or scattered. The kernels leave rows outside the runs unwritten
    (every one is a text query) and their gradients zero (``full_rows=False``).
    ``text_rows``: the layout's text rows; ``finite``: whether q, k and v
    are finite (:func:`nsaflex.hybrid.finite_later`)."""
    from nsaflex.kernels.ops import SeqLayout, kernel_inputs, nsa_attention

    c = pattern.compression
    lens_list = list(layout.host_lengths)
    max_len = max(lens_list)
    qs, ks, vs = kernel_inputs(q, k, v, max_len)
    starts = layout.positions[:, 0].to(torch.int32)
    lens = layout.lengths.to(torch.int32)
    counts = [c.num_tokens(n) if c is not None else 0 for n in lens_list]
    max_cmp = max(counts)
    kc = vc = None
    if max_cmp > 0:
        # Each run pooled on its own into its row of kc (cstarts 0), padded to the longest.
        runs = [(b, a, n, nc) for b, (a, n, nc) in enumerate(zip(layout.span_starts, lens_list, counts))]
        kc, vc = _pooled_runs(ks, vs, runs, c, pooler, pad_to=max_cmp)
    clens = (compressed_counts(c, lens) if c is not None else torch.zeros_like(lens)).to(torch.int32)
    lay = SeqLayout(starts, lens, torch.zeros_like(clens), clens, max_len, max_cmp, False, min(counts), full_rows=False)
    out = nsa_attention(qs, ks, vs, kc, vc, gates, lay, cfg, launch)
    return text_dense_attention(q, k, v, text_rows, into=out, finite=finite)


def _pooled_runs(ks: torch.Tensor, vs: torch.Tensor, runs: list[tuple[int, int, int, int]], compression,
                 pooler, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled keys and values of each run ``(row, first token, tokens,
    pooled tokens)`` of ``ks, vs [B, Hkv, L, D]``, each run pooled on its own:
    with ``pad_to`` None, one row of the runs' pooled tokens in order (packed
    sequences; runs that pool nothing give nothing); else a row per run,
    zero-padded to ``pad_to`` tokens. A single piece is used as it is (no
    concatenated copy: one prompt row, the usual prefill)."""
    pieces = []
    for row, first, tokens, pooled_tokens in runs:
        if pooled_tokens == 0:
            if pad_to is not None:
                pieces.append((ks.new_zeros(1, ks.shape[1], pad_to, ks.shape[3]),) * 2)
            continue
        pooled = compress(ks[row : row + 1, :, first : first + tokens], vs[row : row + 1, :, first : first + tokens],
                          compression, pooler)
        if pad_to is not None and pooled_tokens < pad_to:
            pooled = tuple(F.pad(x, (0, 0, 0, pad_to - pooled_tokens)) for x in pooled)
        pieces.append(pooled)
    dim = 2 if pad_to is None else 0
    return tuple(torch.cat(part, dim=dim).contiguous() if len(part) > 1 else part[0].contiguous()
                 for part in zip(*pieces))


def _recorded_attention(qs, ks, vs, kc, vc, gs, lay, cfg, launch):
    """:func:`nsaflex.kernels.ops.nsa_attention` and what its forward kept
    (:func:`nsaflex.kernels.ops.record_forward`). The kernels keep the branch
    outputs and log-sum-exps only when a backward follows: without one, a leaf
    copy of q that asks for a gradient makes them, and the output is detached."""
    from nsaflex.kernels.ops import nsa_attention, record_forward

    tensors = (qs, ks, vs, kc, vc, gs)
    with record_forward() as seen:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            out = nsa_attention(qs, ks, vs, kc, vc, gs, lay, cfg, launch)
        else:
            with torch.enable_grad():
                leaf = qs.detach().requires_grad_()
                out = nsa_attention(leaf, ks, vs, kc, vc, gs, lay, cfg, launch).detach()
    return out, dict(seen)


def _branch_info(info: dict, seen: dict, pattern: Pattern, layout, packed: bool, length: int, group: int) -> None:
    """The kernels' residuals (``seen``: oc, lse_c, sel, o_s, o_w, lse_s, lse_w
    over the sparse sequences, packed ``[1, H, total, ...]`` or whole rows) as
    full-row info. The kernels' log-sum-exps are base 2 of ``log2(e) * q·k /
    sqrt(D)``, and 0 where nothing is visible: here natural, and ``-inf`` there."""
    def rows(x: torch.Tensor) -> torch.Tensor:
        return unpack_varlen(x[0], layout, length) if packed else x

    sparse = layout.sparse_queries[:, None, :]
    names = {"compression": ("oc", "lse_c"), "selection": ("o_s", "lse_s"), "window": ("o_w", "lse_w")}
    blocks = None
    if pattern.selection is not None:
        blocks = rows(seen["sel"].long() + 1) - 1  # unpacking fills zeros: -1 after the shift
        blocks = torch.where(sparse[..., None], blocks, -1)
        info["blocks"] = blocks
    for name in pattern.branches:
        out_key, lse_key = names[name]
        info["outputs"][name] = torch.where(sparse[..., None], rows(seen[out_key].float()), 0.0)
        lse = rows(seen[lse_key].float()[..., None])[..., 0] * math.log(2.0)
        info["lse"][name] = torch.where(sparse & _sees_a_key(name, pattern, layout, blocks, group, lse.shape), lse,
                                        float("-inf"))


def _sees_a_key(name: str, pattern: Pattern, layout, blocks: torch.Tensor | None, group: int, shape) -> torch.Tensor:
    """``[B, Hq, L]`` bool: whether the branch sees any key (sparse queries)."""
    batch, query_heads, length = shape
    if name == "window":  # a query always sees itself
        return torch.ones(shape, dtype=torch.bool, device=layout.lengths.device)
    if name == "selection":
        assert blocks is not None
        listed = (blocks >= 0).any(dim=-1)  # forced or chosen blocks hold keys at or before the query
        return listed if listed.shape[1] == query_heads else listed.repeat_interleave(group, dim=1)
    from nsaflex.reference import compression_visibility

    seen = torch.zeros(batch, length, dtype=torch.bool)
    positions = layout.positions.cpu()
    for b, n in enumerate(layout.host_lengths):
        if n > 0:
            seen[b, positions[b, :n]] = compression_visibility(n, pattern.compression).any(dim=-1)
    return seen[:, None, :].expand(shape).to(layout.lengths.device)


BACKEND = TritonBackend()
