"""The FlexAttention backend: every branch as ``flex_attention`` over an analytic BlockMask.

Per call (``kernel(q, k, v, gates, token_types, pooler)``):

1. token classes (:mod:`nsaflex.hybrid`): the sparse sequences are gathered,
   padded to ``[B, H, Lmax, D]``; text queries take the dense path
   (:func:`nsaflex.hybrid.text_dense_attention`);
2. compression: pooled keys/values ``[B, Hkv, N, D]`` (mean or the pooler's
   MLP), ``flex_attention`` of the ``L`` queries against the ``N`` compressed
   tokens with the pattern's visibility rule;
3. selection: chunked scores and top-n (:func:`nsaflex.scoring.select`, no
   ``[L, N]`` probabilities held), the per-unit selection bitmap read by the
   ``mask_mod``, and tile lists straight from the indices (query-block
   selection whose tile is a multiple of the query tile) or the union of the
   selections of the queries of each tile (token selection);
4. window: the causal band;
5. ``sum_b gate_b * branch_b``, scattered back, text rows from the dense path.

Block masks that depend only on shapes (window, compression, dense) are cached
per shape. ``flex_attention`` is compiled once per branch (a distinct function
per branch, ``dynamic=False``): a new length recompiles each branch at most
once; repeated calls with the same shapes never recompile (the mask functions
keep their code objects; only captured tensors change). On CPU the compiled
kernel serves inference and eager FlexAttention serves calls that need
gradients (FlexAttention has no CPU backward, compiled or eager): there the
BlockMask (tile lists + mask_mod) is evaluated densely with plain torch ops,
``[B, Hq, L, L]`` scores as eager FlexAttention would, which autograd
differentiates; float64 always takes that path, and so do key tiles below
``MIN_CPU_COMPILED_KV_BLOCK`` (torch 2.13's compiled CPU kernel is wrong for key
tiles of 8) and key counts it gets wrong (:func:`cpu_compiled_wrong`).
The plan option ``flex_mode`` (``eager`` or ``compiled``) forces one or the other.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, NamedTuple

import torch

from nsaflex.backends.base import BranchPlan
from nsaflex.errors import InputError, one_of
from nsaflex.inputs import nonfinite, value_sum
from nsaflex.inspect import causal_logsumexp, empty_branch_info, scatter_lse
from nsaflex.hybrid import TEXT_PATH_NOTES, combine, gather_padded, scatter_padded, sparse_layout, text_dense_attention
from nsaflex.pooling import MLPPooling, compress, softmax_scale
from nsaflex.spec import Pattern

try:  # pragma: no cover - import guard
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention

    _IMPORT_ERROR: str | None = None
except Exception as error:  # pragma: no cover
    _flex_attention = None
    _IMPORT_ERROR = f"torch.nn.attention.flex_attention is not available: {error}"

DEFAULT_BLOCK = 128
CUDA_SMALL_BLOCK = 64
MIN_CUDA_HEAD_DIM = 16
# torch 2.13's compiled CPU FlexAttention returns wrong rows for key tiles of 8 (even
# with a mask that keeps every pair; measured on an AVX2 host, 2026-12-01), so key
# tiles below this run the eager evaluation on CPU.
MIN_CPU_COMPILED_KV_BLOCK = 16
FLEX_MODES = ("auto", "eager", "compiled")
MASK_CACHE_SIZE = 32
RECOMPILE_LIMIT = 64

# Compilations per branch wrapper (counted by the compile backend; tests read it).
COMPILE_COUNTS: collections.Counter[str] = collections.Counter()
# Compiled calls on CPU that ran the dense evaluation instead (cpu_compiled_wrong), per branch.
CPU_DENSE_FALLBACKS: collections.Counter[str] = collections.Counter()


def cpu_compiled_wrong(kv_length: int, kv_block: int) -> bool:
    """Whether torch's compiled CPU FlexAttention gets ``kv_length`` keys wrong:
    fewer keys than one key tile, and an odd multiple of 8 of them (8, 24, 40,
    ... below the tile). Measured on torch 2.13 (AVX2 host, 2026-12-02) against
    SDPA, head dim 16, 16- to 128-key tiles (causal: 1-40, 48, 56, 64, 72 and
    96 keys; all-true: 88, 136 and 152 keys, and query counts unequal to the
    key counts): NaN or wrong rows for exactly those counts, whatever the query
    count; right for 8 keys at head dims 32 and 64."""
    return kv_length < kv_block and kv_length % 16 == 8


# --- one compiled entry point per branch ------------------------------------------------
# Distinct functions (distinct code objects) so each branch has its own compile
# cache: a new length costs one recompile per branch, and branches never evict
# each other's entries.


def _nan_shows(score, b, h, q_idx, kv_idx):
    """``score_mod``: NaN scores become ``+inf``. The kernel's row maximum skips
    NaN, so a row whose every visible score is NaN (a NaN query, a NaN key seen
    alone) would come out as an empty row, zeros; ``+inf`` makes it NaN as the
    reference's softmax does. Masked scores are still dropped by the mask."""
    return torch.where(torch.isnan(score), float("inf"), score)


def _flex_compression(q, k, v, block_mask, scale, kernel_options):
    return _flex_attention(q, k, v, score_mod=_nan_shows, block_mask=block_mask, scale=scale, enable_gqa=True,
                           kernel_options=kernel_options)


def _flex_selection(q, k, v, block_mask, scale, kernel_options):
    return _flex_attention(q, k, v, score_mod=_nan_shows, block_mask=block_mask, scale=scale, enable_gqa=True,
                           kernel_options=kernel_options)


def _flex_window(q, k, v, block_mask, scale, kernel_options):
    return _flex_attention(q, k, v, score_mod=_nan_shows, block_mask=block_mask, scale=scale, enable_gqa=True,
                           kernel_options=kernel_options)


def _flex_dense(q, k, v, block_mask, scale, kernel_options):
    return _flex_attention(q, k, v, score_mod=_nan_shows, block_mask=block_mask, scale=scale, enable_gqa=True,
                           kernel_options=kernel_options)


_ENTRY = {"compression": _flex_compression, "selection": _flex_selection, "window": _flex_window, "dense": _flex_dense}
_COMPILED: dict[str, Any] = {}


def gated_sum(gates: torch.Tensor, outputs: tuple[torch.Tensor, ...], work: torch.dtype) -> torch.Tensor:
    """``sum_b gates[..., b] * outputs[b]`` computed in ``work`` precision, returned
    in the outputs' dtype. ``gates [B, H, L, nb]``, each output ``[B, H, L, D]``."""
    mixed = None
    for position, output in enumerate(outputs):
        term = gates[..., position, None].to(work) * output.to(work)
        mixed = term if mixed is None else mixed + term
    assert mixed is not None
    return mixed.to(outputs[0].dtype)


def _compiled_mix():
    """:func:`gated_sum` as one fused elementwise kernel. Eager, it makes a float32
    copy of every branch output and a pass per product and sum: 17.7 ms of a
    70 ms forward at 128K (H100).
    Length-generic (``dynamic=True``): a new length does not recompile it."""
    if "mix" not in _COMPILED:
        _COMPILED["mix"] = torch.compile(gated_sum, dynamic=True, backend=_counting_backend("mix"))
    return _COMPILED["mix"]


def _counting_backend(branch: str, small_backward_tiles: bool = False):
    def backend(graph_module, example_inputs):
        COMPILE_COUNTS[branch] += 1
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        if not small_backward_tiles:
            return compile_fx(graph_module, example_inputs)
        # compile_fx hands inner_compile to the backward's (lazy) compilation too.
        return compile_fx(graph_module, example_inputs, inner_compile=_with_small_backward_tiles(compile_fx_inner))

    return backend


def _with_small_backward_tiles(inner_compile):
    """``inner_compile`` under an inductor choices handler whose flex backward
    configuration list is one 64 x 64 configuration.

    torch (2.11-2.13) offers its flex backward one configuration on Hopper for
    D = 128 (64 x 128 and 128 x 64 tiles) and drops it for 64 x 64 BlockMasks
    (``NoValidChoicesError``). ``max_autotune`` has fitting ones but times every
    candidate on made-up block indices: 3.6 s per forward call at 128K, over 3
    minutes of compiling (H200). One configuration means no timing.
    """
    import dataclasses

    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class SmallBackwardTiles(InductorChoices):
        def get_flex_attention_bwd_configs(self, *args, **kwargs):
            configs = super().get_flex_attention_bwd_configs(*args, **kwargs)
            block = CUDA_SMALL_BLOCK
            return [dataclasses.replace(configs[0], block_m1=block, block_n1=block, block_m2=block, block_n2=block,
                                        num_stages=2, num_warps=4)]

    def compile_inner(*args, **kwargs):
        with V.set_choices_handler(SmallBackwardTiles()):
            return inner_compile(*args, **kwargs)

    return compile_inner


def _compiled(branch: str, small_backward_tiles: bool = False, dynamic: bool = False):
    """The compiled entry of ``branch``; ``dynamic``: automatic dynamic shapes (a
    second length recompiles once into a length-generic kernel; later lengths
    reuse it) instead of one static compile per length."""
    key = branch + (":dynamic" if dynamic else "") + (":small-backward" if small_backward_tiles else "")
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_ENTRY[branch], dynamic=None if dynamic else False,
                                       backend=_counting_backend(branch, small_backward_tiles=small_backward_tiles))
    return _COMPILED[key]


@contextlib.contextmanager
def _recompile_room():
    """Room for one compiled entry per (branch, shape) beyond dynamo's default of 8."""
    config = torch._dynamo.config
    changes = {}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < RECOMPILE_LIMIT:
            changes[name] = RECOMPILE_LIMIT
    with config.patch(**changes) if changes else contextlib.nullcontext():
        yield


def _run_flex(branch: str, q, k, v, mask: "_Mask", compiled: bool, tiling: "_Tiling", dynamic: bool = False,
              lse: dict | None = None, finite_values: bool = True):
    """One branch's output; a dict passed as ``lse`` receives its log-sum-exp
    ``[B, Hq, L]`` under ``branch``, and the branch then runs through
    :func:`dense_block_mask_attention` (the same tiles and mask_mod, evaluated
    eagerly: inspection, not speed). ``finite_values`` False (``v`` holds inf
    or NaN): the tiled kernel runs as :func:`_tiled_nonfinite` says."""
    scale = softmax_scale(q.shape[-1])
    if lse is not None:
        out, lse[branch] = dense_block_mask_attention(q, k, v, mask.tiles, mask.mask_mod, scale, return_lse=True)
        return out
    kernel_options = tiling.options
    if torch.compiler.is_compiling():  # inside the user's own torch.compile region
        def tiled(q_, k_, v_):
            return _ENTRY[branch](q_, k_, v_, mask.block_mask(True), scale, kernel_options)
    else:
        if compiled and q.device.type == "cpu" and cpu_compiled_wrong(k.shape[2], tiling.kv_block):
            CPU_DENSE_FALLBACKS[branch] += 1
            compiled = False
        if not compiled:
            # The dense evaluation adds non-finite values over the kept pairs alone.
            return dense_block_mask_attention(q, k, v, mask.tiles, mask.mask_mod, scale)

        def tiled(q_, k_, v_):
            with _recompile_room():
                compiled_branch = _compiled(branch, tiling.small_backward_tiles, dynamic)
                return compiled_branch(q_, k_, v_, mask.block_mask(mask.compute_q_blocks), scale, kernel_options)
    return tiled(q, k, v) if finite_values else _tiled_nonfinite(tiled, q, k, v)


def _tiled_nonfinite(tiled, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A tiled FlexAttention branch ``tiled(q, k, v)`` whose values ``v [B, Hkv, S, D]``
    hold inf or NaN, as :func:`nsaflex.reference.masked_product` defines it: a
    non-finite ``v[j, d]`` reaches row ``t``, channel ``d`` only through a kept
    pair (t, j). The kernel's ``p @ v`` would also multiply the masked
    probabilities 0 of the same key tile into it (``0 * inf = NaN``).

    The finite part runs with the non-finite values set to 0. Two more passes
    with every score 0 (q and k zeros: uniform probabilities over exactly the
    kept keys) average the 0/1 indicators ``up`` (+inf or NaN) and ``down``
    (-inf or NaN): an average above 0 means a kept key of that kind, and both
    together (a NaN, or +inf with -inf) give NaN, one alone +inf or -inf. The
    three passes have one shape, so one compiled kernel serves them."""
    out = tiled(q, k, torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0))
    zeros_q, zeros_k = torch.zeros_like(q), torch.zeros_like(k)
    nan = torch.isnan(v)
    up = tiled(zeros_q, zeros_k, (nan | (v == float("inf"))).to(v.dtype)) > 0
    down = tiled(zeros_q, zeros_k, (nan | (v == float("-inf"))).to(v.dtype)) > 0
    kinds = torch.where(up, float("inf"), float("-inf")).to(out.dtype)
    kinds = torch.where(up & down, float("nan"), kinds)
    return out + torch.where(up | down, kinds, torch.zeros_like(kinds))


def all_finite(*tensors: torch.Tensor) -> list[bool]:
    """Whether each tensor holds no inf or NaN, with one host read for all.
    The test is on each tensor's sum (no bool tensor of its size): a float32
    overflow of finite values only reports False, which sends the caller down
    its exact path."""
    sums = [value_sum(x) for x in tensors]
    return [not flag for flag in nonfinite(torch.stack(sums)).tolist()]


def dense_block_mask_attention(q, k, v, tiles, mask_mod, scale: float, return_lse: bool = False):
    """What a BlockMask attends, evaluated densely with plain torch ops (as eager
    FlexAttention does: ``[B, Hq, Lq, Lkv]`` scores), differentiable on any device
    and dtype. Pairs: full tiles, and partial tiles where ``mask_mod`` holds.
    Rows with no key give zeros. ``return_lse``: also the rows' log-sum-exp
    ``[B, Hq, Lq]`` (natural log, float32 or float64, ``-inf`` for rows with no key)."""
    from nsaflex.backends.flex_masks import effective_mask
    from nsaflex.reference import masked_product, masked_softmax

    batch, query_heads, _, _ = q.shape
    group = query_heads // k.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    allowed = effective_mask(tiles, mask_mod, batch, query_heads)
    keys = k.to(work).repeat_interleave(group, dim=1)
    values = v.to(work).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(work), keys.transpose(-1, -2)) * scale
    out = masked_product(masked_softmax(scores, allowed), values, allowed).to(q.dtype)
    if not return_lse:
        return out
    return out, torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)


class _Mask:
    """Tile lists + mask_mod of one branch; the BlockMask is made on first compiled use."""

    def __init__(self, tiles, mask_mod, compute_q_blocks: bool = True) -> None:
        self.tiles = tiles
        self.mask_mod = mask_mod
        self.compute_q_blocks = compute_q_blocks
        self._block_masks: dict[bool, Any] = {}

    def block_mask(self, compute_q_blocks: bool):
        if compute_q_blocks not in self._block_masks:
            self._block_masks[compute_q_blocks] = self.tiles.block_mask(self.mask_mod, compute_q_blocks=compute_q_blocks)
        return self._block_masks[compute_q_blocks]


# --- block sizes ----------------------------------------------------------------------------------


class _Tiling(NamedTuple):
    """How one branch's FlexAttention call is tiled.

    Attributes:
        q_block, kv_block: BlockMask tile sizes (queries, keys).
        options: ``kernel_options`` for ``flex_attention`` (None: torch's defaults).
        small_backward_tiles: compile the branch with a 64 x 64 backward kernel
            configuration (see :func:`_with_small_backward_tiles`).
    """

    q_block: int
    kv_block: int
    options: dict[str, Any] | None = None
    small_backward_tiles: bool = False


def _block_sizes(pattern: Pattern, branch: str, device: torch.device, needs_grad: bool,
                 override: tuple[int | None, int | None]) -> _Tiling:
    """The tiling of one branch: 128 x 128 except where selection blocks or
    query units of 64 would waste half of every tile on CUDA."""
    q_block, kv_block = override
    if q_block is not None or kv_block is not None or device.type != "cuda":
        return _Tiling(q_block or DEFAULT_BLOCK, kv_block or DEFAULT_BLOCK)
    if branch != "selection":
        return _Tiling(DEFAULT_BLOCK, DEFAULT_BLOCK)
    selection = pattern.selection
    assert selection is not None
    unit = selection.query_block if selection.granularity == "query_block" else 1
    q_block = CUDA_SMALL_BLOCK if unit % DEFAULT_BLOCK and unit % CUDA_SMALL_BLOCK == 0 else DEFAULT_BLOCK
    kv_block = CUDA_SMALL_BLOCK if selection.block % DEFAULT_BLOCK and selection.block % CUDA_SMALL_BLOCK == 0 else DEFAULT_BLOCK
    if q_block == DEFAULT_BLOCK and kv_block == DEFAULT_BLOCK:
        return _Tiling(q_block, kv_block)
    # 4 warps and 2 stages: 11.7 ms for videonsa-qblock's selection at 128K on an
    # H100, against 16.3 ms (4 warps, 3 stages) and 22.7 ms with flex's default for
    # 64 x 64 tiles.
    forward = {"BLOCK_M": CUDA_SMALL_BLOCK, "BLOCK_N": CUDA_SMALL_BLOCK, "num_warps": 4, "num_stages": 2}
    if not needs_grad:
        return _Tiling(q_block, kv_block, forward)
    if q_block != CUDA_SMALL_BLOCK:
        # Token selection (128-query tiles): the small backward configuration is not
        # measured there; torch's default backward tiles 128 x 128.
        return _Tiling(DEFAULT_BLOCK, DEFAULT_BLOCK)
    # With gradients the same tiles (128 x 128 ones ran the union of two 64-query
    # units' blocks, all partial: 134 ms forward + 300 ms backward at 128K on an H100;
    # 16K forward+backward 47.9 ms against 21.5 on 64 x 64 tiles on an H200).
    options = {f"fwd_{name}": value for name, value in forward.items()}
    return _Tiling(q_block, kv_block, options, small_backward_tiles=True)


# --- the kernel -----------------------------------------------------------------------------------


class FlexKernel:
    """``kernel(q, k, v, gates, token_types, pooler) -> out`` for one layer-resolved pattern.

    Args:
        pattern: the pattern (resolved for its layer).
        mode: ``auto`` (default), ``eager`` or ``compiled`` (the plan option ``flex_mode``).
        q_block, kv_block: force the tile sizes (tests; CPU).
        score_dtype: dtype in which selection scores are ranked (default: see
            :func:`nsaflex.scoring.default_score_dtype`; the plan option ``score_dtype``).
        scoring_kernel: ``auto``, ``triton`` or ``torch`` (:func:`nsaflex.scoring.select`'s ``kernel``).
        dynamic: compile with automatic dynamic shapes (the plan option ``flex_dynamic``).
        narrow: on CUDA forward, keep selection tile lists ``O(L/B x n)`` wide.
    """

    def __init__(
        self,
        pattern: Pattern,
        *,
        mode: str = "auto",
        q_block: int | None = None,
        kv_block: int | None = None,
        score_dtype: torch.dtype | None = None,
        narrow: bool = True,
        chunk: int | None = None,
        scoring_kernel: str = "auto",
        dynamic: bool = False,
    ) -> None:
        self.pattern = pattern
        self.mode = mode
        if self.mode not in FLEX_MODES:
            raise InputError("mode", one_of(FLEX_MODES), self.mode)
        self.scoring_kernel = scoring_kernel
        self.dynamic = dynamic
        self.blocks = (q_block, kv_block)
        self.score_dtype = score_dtype
        self.narrow = narrow
        self.chunk = chunk
        self._masks: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.stats: dict[str, Any] = {}
        self.last_selection = None
        # profile=True: stats["timings_ms"] holds the time of each stage of the last call
        # (CUDA events, synchronised at the end of the call; wall clock on CPU).
        self.profile = False
        self._marks: list[tuple[str, Any]] = []

    def _mark(self, name: str, device: torch.device) -> None:
        if not self.profile:
            return
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((name, event))
        else:
            import time

            self._marks.append((name, time.perf_counter()))

    def _collect_marks(self, device: torch.device) -> None:
        if not self.profile or not self._marks:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings: dict[str, float] = {}
        for (_, start), (name, end) in zip(self._marks, self._marks[1:]):
            elapsed = start.elapsed_time(end) if device.type == "cuda" else 1000.0 * (end - start)
            timings[name] = timings.get(name, 0.0) + elapsed
        self.stats["timings_ms"] = timings
        self._marks = []

    # -- helpers ------------------------------------------------------------------------------
    def _compiled_for(self, q: torch.Tensor, needs_grad: bool) -> bool:
        if self.mode == "eager":
            return False
        kv_block = self.blocks[1]
        if q.device.type == "cpu" and kv_block is not None and kv_block < MIN_CPU_COMPILED_KV_BLOCK:
            if self.mode == "compiled":
                raise InputError("kv_block", f">= {MIN_CPU_COMPILED_KV_BLOCK} for compiled FlexAttention on CPU "
                                 "(smaller key tiles give wrong rows there; mode 'auto' evaluates them eagerly)", kv_block)
            return False
        if self.mode == "compiled":
            return q.dtype != torch.float64 and not (q.device.type == "cpu" and needs_grad)
        if q.dtype == torch.float64:
            return False
        if q.device.type == "cpu":
            return not needs_grad
        return True

    def _cached(self, key: tuple, build):
        if key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key]
        value = build()
        self._masks[key] = value
        while len(self._masks) > MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        return value

    @staticmethod
    def _needs_grad(tensors, pooler: MLPPooling | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        if any(t is not None and t.requires_grad for t in tensors):
            return True
        return pooler is not None and any(p.requires_grad for p in pooler.parameters())

    # -- entry -------------------------------------------------------------------------------------
    def __call__(self, q, k, v, gates, token_types, pooler, *, info: dict | None = None):
        """``info``: a dict that receives the per-branch values of
        :class:`nsaflex.AttentionInfo` (full rows, float32)."""
        pattern = self.pattern
        batch, query_heads, length, dim = q.shape
        device = q.device
        if device.type == "cuda" and dim < MIN_CUDA_HEAD_DIM:
            raise InputError("q", f"head dim >= {MIN_CUDA_HEAD_DIM} (FlexAttention on CUDA)", dim)
        needs_grad = self._needs_grad((q, k, v, gates), pooler)
        compiled = self._compiled_for(q, needs_grad)
        self.stats = {"compiled": compiled, "needs_grad": needs_grad}
        self._marks = []
        self._mark("start", device)
        if info is not None:
            compiled = False  # the per-branch log-sum-exp comes from the eager evaluation of each mask
        out = self._forward(q, k, v, gates, token_types, pooler, compiled, needs_grad, info)
        self._mark("mix", device)
        self._collect_marks(device)
        return out

    def _forward(self, q, k, v, gates, token_types, pooler, compiled, needs_grad, info=None):
        pattern = self.pattern
        batch, query_heads, length, dim = q.shape
        device = q.device
        if pattern.dense:
            out = self._dense(q, k, v, compiled, needs_grad)
            if info is not None:
                info.update(dense_output=out.float(), dense_lse=causal_logsumexp(q, k),
                            sparse_queries=torch.zeros(batch, length, dtype=torch.bool, device=device))
            return out

        layout = sparse_layout(pattern, token_types, batch, length, device)
        text = None
        if pattern.hybrid is not None and layout.has_text:
            text = text_dense_attention(q, k, v, layout.text_rows)
            self._mark("text", device)
        if info is not None:
            info.update(empty_branch_info(pattern, q, layout))
            if text is not None:
                info.update(dense_output=text.float(), dense_lse=causal_logsumexp(q, k))
        if layout.max_length == 0:
            return text if text is not None else _zeros_like_connected(q)

        qs, ks, vs = (gather_padded(t, layout) for t in (q, k, v))
        lengths = layout.lengths
        uniform = layout.identity or bool((lengths == layout.max_length).all())
        lses: dict | None = {} if info is not None else None
        outputs = self._branches(qs, ks, vs, pooler, lengths if not uniform else None, compiled, needs_grad, lses)
        if info is not None:
            assert lses is not None
            self._branch_info(info, outputs, lses, layout, length)

        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        if gates is None and any(0 < abs(value) < torch.finfo(work).tiny for value in pattern.gate.values or ()):
            work = torch.float64  # constant gates below the normal range of the working dtype
        if gates is None:  # constant gates, in the working dtype
            constants = torch.tensor(pattern.gate.values or (), dtype=work, device=device)
            gate_values = constants.expand(batch, query_heads, layout.max_length, len(pattern.branches))
        else:
            gate_values = gather_padded(gates, layout)
        branch_outputs = tuple(outputs[name] for name in pattern.branches)
        mix = _compiled_mix() if compiled and not torch.compiler.is_compiling() else gated_sum
        sparse = scatter_padded(mix(gate_values, branch_outputs, work), layout, length)
        return combine(sparse, text, layout)

    # -- dense layers --------------------------------------------------------------------------
    def _dense(self, q, k, v, compiled, needs_grad):
        length = q.shape[2]
        tiling = _block_sizes(self.pattern, "dense", q.device, needs_grad, self.blocks)
        q_block, kv_block = tiling.q_block, tiling.kv_block
        from nsaflex.backends.flex_masks import causal_mask_mod, causal_tiles

        key = ("dense", str(q.device), length, q_block, kv_block)
        mask = self._cached(key, lambda: _Mask(causal_tiles(length, q_block, kv_block, q.device), causal_mask_mod()))
        finite = all_finite(v)[0] if compiled or torch.compiler.is_compiling() else True
        return _run_flex("dense", q, k, v, mask, compiled, tiling, self.dynamic, finite_values=finite)

    # -- sparse branches ---------------------------------------------------------------------------
    def _branch_info(self, info: dict, outputs: dict, lses: dict, layout, length: int) -> None:
        """Scatter the padded per-branch values (``[B, Hq, Lmax, ...]``) into
        ``info``'s full rows; text queries keep zeros, ``-inf`` and ``-1``."""
        sparse = layout.sparse_queries[:, None, :]
        for name in self.pattern.branches:
            placed = scatter_padded(outputs[name].float(), layout, length)
            info["outputs"][name] = torch.where(sparse[..., None], placed, torch.zeros_like(placed))
            if name in lses:
                info["lse"][name] = torch.where(sparse, scatter_lse(lses[name], layout, length), float("-inf"))
        result = getattr(self, "last_selection", None)
        if self.pattern.selection is not None and result is not None and "selection" in outputs:
            lists = result.indices.long().repeat_interleave(result.unit, dim=2)[:, :, : layout.max_length]
            placed = scatter_padded(lists + 1, layout, length) - 1
            heads = placed.shape[1]
            info["blocks"] = torch.where(sparse.expand(-1, heads, -1)[..., None], placed, -1)

    def _branches(self, qs, ks, vs, pooler, lengths, compiled, needs_grad, lses: dict | None = None) -> dict[str, torch.Tensor]:
        from nsaflex.backends import flex_masks as fm

        pattern = self.pattern
        batch, query_heads, length, _ = qs.shape
        device = qs.device
        outputs: dict[str, torch.Tensor] = {}
        compressed_k = compressed_v = None
        if pattern.compression is not None:
            compressed_k, compressed_v = compress(ks, vs, pattern.compression, pooler)
        # Whether the values (and the pooled values) hold inf or NaN: one host read,
        # only where a tiled kernel runs (the dense evaluation is exact as it is).
        values = [vs] + ([compressed_v] if compressed_v is not None else [])
        tiled = lses is None and (compiled or torch.compiler.is_compiling())
        finite = all_finite(*values) if tiled else [True] * len(values)
        finite_v, finite_cv = finite[0], finite[-1]
        if pattern.compression is not None:
            compression = pattern.compression
            num_compressed = compressed_k.shape[2]
            if num_compressed == 0:
                outputs["compression"] = _zeros_like_connected(qs)
                if lses is not None:
                    lses["compression"] = torch.full(qs.shape[:3], float("-inf"), device=device)
            else:
                tiling = _block_sizes(pattern, "compression", device, needs_grad, self.blocks)
                q_block, kv_block = tiling.q_block, tiling.kv_block
                rows = None
                if compression.visibility == "videonsa_legacy":
                    full = torch.full((batch,), length, dtype=torch.long, device=device)
                    real = lengths if lengths is not None else full
                    rows = torch.clamp(torch.div(real - compression.block, compression.stride, rounding_mode="floor") + 1, min=0)
                key = ("compression", str(device), length, num_compressed, q_block, kv_block,
                       None if rows is None else (batch, tuple(rows.tolist())))

                def build():
                    tiles = fm.compression_tiles(length, num_compressed, compression, q_block, kv_block, device,
                                                 rows if lengths is not None else None)
                    return _Mask(tiles, fm.compression_mask_mod(compression, rows))

                mask = self._cached(key, build)
                self._mark("compression: pooling + mask", device)
                outputs["compression"] = _run_flex("compression", qs, compressed_k, compressed_v, mask, compiled, tiling,
                                                   self.dynamic, lses, finite_cv)
                self._mark("compression: flex", device)
        if pattern.selection is not None:
            assert compressed_k is not None
            mask, tiling = self.selection_mask(qs, compressed_k, lengths, compiled, needs_grad)
            outputs["selection"] = _run_flex("selection", qs, ks, vs, mask, compiled, tiling, self.dynamic, lses,
                                             finite_v)
            self._mark("selection: flex", device)
        if pattern.window is not None:
            size = pattern.window.size
            tiling = _block_sizes(pattern, "window", device, needs_grad, self.blocks)
            q_block, kv_block = tiling.q_block, tiling.kv_block
            key = ("window", str(device), length, size, q_block, kv_block)
            mask = self._cached(key, lambda: _Mask(fm.window_tiles(length, size, q_block, kv_block, device), fm.window_mask_mod(size)))
            self._mark("window: mask", device)
            outputs["window"] = _run_flex("window", qs, ks, vs, mask, compiled, tiling, self.dynamic, lses, finite_v)
            self._mark("window: flex", device)
        return outputs

    def selection_mask(self, qs, compressed_k, lengths, compiled: bool, needs_grad: bool) -> tuple["_Mask", _Tiling]:
        """Scores, top-n and the selection branch's BlockMask input for the sparse
        queries ``qs [B, Hq, L, D]`` against ``compressed_k [B, Hkv, N, D]``
        (also used by ``benchmarks/flex_selection_probe.py`` to time the branch alone)."""
        from nsaflex.backends import flex_masks as fm
        from nsaflex import scoring

        pattern = self.pattern
        selection = pattern.selection
        assert selection is not None and pattern.compression is not None
        batch, query_heads, length, _ = qs.shape
        device = qs.device
        result = scoring.select(
            qs, compressed_k, pattern.compression, selection, lengths,
            score_dtype=self.score_dtype, chunk=self.chunk, kernel=self.scoring_kernel,
        )
        self.last_selection = result
        self._mark("selection: scores + top-n", device)
        tiling = _block_sizes(pattern, "selection", device, needs_grad, self.blocks)
        q_block, kv_block = tiling.q_block, tiling.kv_block
        narrow = self.narrow and compiled and device.type == "cuda" and not needs_grad
        tiles, union = fm.selection_tiles(result, length, selection.block, q_block, kv_block, narrow=narrow)
        heads_per_row = 1 if result.per_head else query_heads // compressed_k.shape[1]
        tiles = tiles.expand_heads(heads_per_row)
        bitmap = scoring.selection_bitmap(result)
        mask_mod = fm.selection_mask_mod(bitmap, heads_per_row, result.unit, selection.block)
        self.stats["selection"] = {
            **union.to_dict(),
            "direct": fm.is_direct(result, selection.block, q_block, kv_block),
            "q_block": q_block,
            "kv_block": kv_block,
            "selection_block": selection.block,
            "count": selection.count,
        }
        self._mark("selection: tile lists + bitmap", device)
        return _Mask(tiles, mask_mod, compute_q_blocks=needs_grad), tiling


# --- the backend object ---------------------------------------------------------------------


class FlexBackend:
    name = "flex"

    def unsupported(self, pattern: Pattern, device: str) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        head_dim = pattern.model.head_dim
        if str(device).startswith("cuda") and head_dim is not None and head_dim < MIN_CUDA_HEAD_DIM:
            return f"FlexAttention on CUDA needs head dim >= {MIN_CUDA_HEAD_DIM}, pattern model.head_dim = {head_dim}"
        return None

    def describe(self, pattern: Pattern, device: str) -> tuple[BranchPlan, ...]:
        cuda = str(device).startswith("cuda")
        runner = "flex_attention, torch.compile'd once per branch" + ("" if cuda else (
            " for inference; with gradients (FlexAttention has no CPU backward) the same tile lists and mask_mod "
            "evaluated densely in torch, [B, H, L, L] scores"))
        tiles = f"{DEFAULT_BLOCK} x {DEFAULT_BLOCK} tiles"
        if pattern.dense:
            return (BranchPlan("dense", self.name, runner, f"causal BlockMask ({tiles}), built analytically, cached per length"),)
        plans = []
        if pattern.compression is not None:
            c = pattern.compression
            rule = "i*d + l - 1 <= t" if c.visibility == "causal" else "i*d + l - 1 >= t and i < N of the row"
            plans.append(BranchPlan(
                "compression", self.name, runner,
                f"queries [L] x compressed tokens [N = (L - {c.block}) // {c.stride} + 1], visibility {rule}: "
                f"analytic tile lists ({tiles} of queries x compressed tokens), partial tiles by mask_mod; cached per shape",
                {"block": c.block, "stride": c.stride, "pooling": c.pooling, "visibility": c.visibility},
                (f"{c.pooling} pooling in torch, differentiable (pooler parameters included)",),
            ))
        if pattern.selection is not None:
            s = pattern.selection
            notes = [
                ("scores: the Triton backend's scoring kernels (plan option scoring_kernel auto on CUDA with float32 "
                 "ranking, or triton): cmp_lse_kernel (log-sum-exp alone), then per query chunk cmp_score_kernel "
                 "(Eq. 9 block scores, summed over the group's heads"
                 + (f" and each tile of {s.query_block} queries" if s.granularity == "query_block" else "")
                 + "), top-n in torch; otherwise torch scoring (nsaflex.scoring, Eq. 9 by strided shift-and-add); "
                 "both chunked over queries, never [L x N] probabilities at once; ties to the lower index"),
                "mask_mod reads a per-unit selection bitmap [B, Hs, U, ceil(J/32)] int32, exact on its own",
            ]
            if s.granularity == "query_block":
                direct = s.query_block is not None and (s.query_block % DEFAULT_BLOCK == 0 or (cuda and s.query_block % CUDA_SMALL_BLOCK == 0))
                mask = (
                    f"BlockMask.from_kv_blocks straight from the top-{s.count} indices of each tile of {s.query_block} queries; "
                    "blocks wholly before the tile are full, the diagonal block partial (causal mask_mod)"
                    if direct else
                    f"tiles of {s.query_block} queries do not fill a query tile: each query tile runs the union of its tiles' selections"
                )
                if cuda and direct and s.query_block % DEFAULT_BLOCK:
                    notes.append(f"CUDA uses {CUDA_SMALL_BLOCK} x {CUDA_SMALL_BLOCK} tiles, forward and backward "
                                 "(the backward with its own 64 x 64 kernel configuration: torch's default does not fit)")
            else:
                mask = (
                    f"token selection: each tile of {DEFAULT_BLOCK} queries runs the union of its queries' selections "
                    f"(full tiles: blocks every query chose, wholly before the tile); mask_mod keeps each query to its own {s.count} blocks"
                )
                notes.append(
                    f"cost: the union of up to {DEFAULT_BLOCK} queries' selections instead of n = {s.count} blocks per query tile; "
                    "it depends on how much neighbouring queries agree ('nsaflex bench' reports the measured union size)"
                )
            plans.append(BranchPlan("selection", self.name, runner, mask, {
                "block": s.block, "count": s.count, "scoring": s.scoring, "forced": list(s.forced),
                "granularity": s.granularity, "query_block": s.query_block,
            }, tuple(notes)))
        if pattern.window is not None:
            plans.append(BranchPlan("window", self.name, runner,
                                    f"causal band of {pattern.window.size}: analytic tile lists ({tiles}), cached per length",
                                    {"size": pattern.window.size}))
        if pattern.hybrid is not None:
            compacted = ("the compacted vision tokens, padded per batch to the longest row rounded up to 1/16 of "
                         "its power of two (vision counts in one bucket share compiled kernels)")
            plans.append(BranchPlan(
                "text", self.name, "scaled_dot_product_attention over the gathered text queries (nsaflex.hybrid)",
                "causal [B, 1, Nt, L] mask of the text queries only",
                {"vision_keys": pattern.hybrid.vision_keys},
                ("vision queries: sparse branches over " + (compacted if pattern.hybrid.vision_keys == "vision" else "all tokens"),
                 *TEXT_PATH_NOTES),
            ))
        return tuple(plans)

    def build(self, pattern: Pattern, plan: Any) -> FlexKernel:
        options = getattr(plan, "options", None)
        if options is None:
            return FlexKernel(pattern)
        return FlexKernel(pattern, mode=options.flex_mode, score_dtype=options.ranking_dtype(),
                          scoring_kernel=options.scoring_kernel, dynamic=options.flex_dynamic)


BACKEND = FlexBackend()


def _zeros_like_connected(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``x`` that stay in its autograd graph (zero gradient), as
    the reference's outputs do, so ``autograd.grad`` works when every branch of a
    call is empty (e.g. no complete compression block and a zero constant gate).
    The empty slice sums to an exact 0 even where ``x`` holds inf or NaN."""
    return x.new_zeros(x.shape) + x[..., :0].sum()
