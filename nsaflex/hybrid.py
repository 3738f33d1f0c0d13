"""Token classes for the fast backends: which queries run the sparse branches,
over which keys, and the dense path of text queries.

For a hybrid pattern with ``vision_keys: vision`` each batch row's vision tokens
form a compacted *sparse sequence* of their own (lengths differ between rows);
with ``vision_keys: all`` (or no hybrid section) the sparse sequence is the
whole row. Backends run the sparse branches over the sparse sequences, either
padded to ``[B, H, Lmax, D]`` (FlexAttention) or packed as ``[H, total, D]``
with ``cu_seqlens`` (varlen kernels), and scatter the result back; text queries
get dense causal attention over every key of their row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from nsaflex.pooling import softmax_scale
from nsaflex.spec import Pattern
from nsaflex.tensor_memo import remembered


@dataclass(frozen=True)
class SparseLayout:
    """Where the sparse sequences live inside ``[B, L]``.

    Attributes:
        positions: ``[B, Lmax]`` long: full-row position of sparse position
            ``p`` of row ``b`` (padding entries point at 0 and are masked by
            ``lengths``).
        lengths: ``[B]`` long: sparse sequence length of each row.
        cu_seqlens: ``[B + 1]`` int32: prefix sums of ``lengths`` (varlen packing).
        max_length: ``Lmax`` (a Python int, so shapes stay static): at least the
            longest sparse sequence, rounded up by :func:`padded_length`.
        sparse_queries: ``[B, L]`` bool: queries whose output is the gated sparse mix.
        identity: True when every row's sparse sequence is the whole row.
        has_text: True when some query takes the dense text path.
        host_lengths: ``lengths`` as Python ints (read once, with the layout).
    """

    positions: torch.Tensor
    lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    sparse_queries: torch.Tensor
    identity: bool
    has_text: bool
    host_lengths: tuple[int, ...]


def sparse_layout(pattern: Pattern, token_types: torch.Tensor | None, batch: int, length: int, device) -> SparseLayout:
    """The layout of ``pattern`` for inputs of ``[B, L]`` with ``token_types``.

    Reading the token types synchronises with the device; the layout of the same
    unmodified GPU ``token_types`` tensor is reused without reading it again
    (:mod:`nsaflex.tensor_memo`)."""
    if pattern.hybrid is None or token_types is None:
        return _whole_rows(batch, length, device, torch.ones(batch, length, dtype=torch.bool, device=device), False)
    key = ("sparse_layout", pattern.hybrid, batch, length, str(torch.device(device)))
    return remembered(token_types, key, lambda: _token_layout(pattern, token_types, batch, length, device))


def _whole_rows(batch: int, length: int, device, sparse_queries: torch.Tensor, has_text: bool) -> SparseLayout:
    """The identity layout: every row's sparse sequence is the whole row."""
    positions = torch.arange(length, device=device).expand(batch, length).contiguous()
    lengths = torch.full((batch,), length, dtype=torch.long, device=device)
    return SparseLayout(positions, lengths, _cumulative(lengths), length, sparse_queries, True, has_text, (length,) * batch)


def _token_layout(pattern: Pattern, token_types: torch.Tensor, batch: int, length: int, device) -> SparseLayout:
    vision = token_types.to(device=device) != 0  # 1 image, 2 video
    all_vision = bool(vision.all())  # a host synchronisation (one more for mixed rows' lengths)
    if pattern.hybrid.vision_keys == "all":
        return _whole_rows(batch, length, device, vision, not all_vision)
    if all_vision:
        # Every token is vision: the compacted sequences are the rows themselves, and
        # gathering/scattering them would copy q, k, v, the gates and the output for
        # nothing (about 8 ms at 128K on an H100).
        return _whole_rows(batch, length, device, vision, False)
    lengths = vision.sum(dim=1)
    host_lengths = tuple(int(n) for n in lengths.tolist())
    max_length = padded_length(max(host_lengths, default=0), length)
    # Stable sort puts each row's vision positions first, in order.
    order = torch.sort((~vision).to(torch.int8), dim=1, stable=True).indices[:, :max_length]
    valid = torch.arange(max_length, device=device)[None, :] < lengths[:, None]
    positions = torch.where(valid, order, torch.zeros_like(order))
    return SparseLayout(positions, lengths, _cumulative(lengths), max_length, vision, False, True, host_lengths)


def padded_length(longest: int, length: int) -> int:
    """The padded length ``Lmax`` of compacted sparse sequences whose longest is
    ``longest`` in rows of ``length`` tokens: ``longest`` rounded up to a multiple
    of 1/16 of the next power of two (at most 12.5 % padding), capped at ``length``.

    Compiled kernels specialise on ``Lmax``; without the rounding every new vision
    count would recompile every branch. With it, vision counts within one bucket
    share one compiled kernel, and an octave of counts costs at most 8 compiles.
    """
    if longest <= 0:
        return 0
    step = max(1, (1 << (longest - 1).bit_length()) // 16)
    return min(length, -(-longest // step) * step)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def gather_padded(x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``[B, H, L, ...]`` -> ``[B, H, Lmax, ...]``: the sparse sequences, padded with zeros."""
    if layout.identity:
        return x
    batch, heads = x.shape[:2]
    index = layout.positions.view(batch, 1, -1, *([1] * (x.dim() - 3)))
    index = index.expand(batch, heads, layout.max_length, *x.shape[3:])
    gathered = torch.gather(x, 2, index)
    valid = padding_mask(layout).view(batch, 1, -1, *([1] * (x.dim() - 3)))
    # where, not a product: padding entries copy position 0, which may hold inf or NaN.
    return torch.where(valid, gathered, torch.zeros_like(gathered))


def scatter_padded(y: torch.Tensor, layout: SparseLayout, length: int) -> torch.Tensor:
    """``[B, H, Lmax, D]`` -> ``[B, H, L, D]``: sparse outputs back at their
    positions; positions outside the sparse sequence are zero."""
    if layout.identity:
        return y
    batch, heads, _, dim = y.shape
    valid = padding_mask(layout)[:, None, :, None]
    y = torch.where(valid, y, torch.zeros_like(y))
    index = layout.positions[:, None, :, None].expand(batch, heads, layout.max_length, dim)
    # Padding entries point at position 0 with zero values: scatter_add leaves it unchanged.
    return y.new_zeros(batch, heads, length, dim).scatter_add(2, index, y)


def padding_mask(layout: SparseLayout) -> torch.Tensor:
    """``[B, Lmax]`` bool: real (not padding) sparse positions."""
    return torch.arange(layout.max_length, device=layout.lengths.device)[None, :] < layout.lengths[:, None]


def pack_varlen(x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[H, total, D]`` (rows concatenated, ``cu_seqlens`` offsets)."""
    padded = gather_padded(x, layout)
    keep = padding_mask(layout)
    return padded.transpose(0, 1)[:, keep]


def unpack_varlen(y: torch.Tensor, layout: SparseLayout, length: int) -> torch.Tensor:
    """``[H, total, D]`` -> ``[B, H, L, D]`` (inverse of :func:`pack_varlen`, zeros elsewhere)."""
    heads, _, dim = y.shape
    batch = layout.lengths.shape[0]
    keep = padding_mask(layout)
    padded = y.new_zeros(heads, batch, layout.max_length, dim)
    padded[:, keep] = y
    return scatter_padded(padded.transpose(0, 1), layout, length)


@contextlib.contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    """Torch's deterministic algorithms on (errors, not warnings, for ops that
    have none) for the block, then the caller's setting back."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _efficient_kernel(q: torch.Tensor) -> bool:
    """Whether SDPA's memory-efficient kernel serves ``q`` here: CUDA, a dtype it
    takes and a head dim of whole 16-byte groups (its alignment rule). That is
    the kernel SDPA's dispatcher picks for a boolean mask on CUDA, and the one
    whose backward adds dq with atomics."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[-1] * q.element_size() % 16 == 0)


def _sdpa_backend(q: torch.Tensor) -> contextlib.AbstractContextManager:
    """SDPA pinned to its memory-efficient kernel where that serves ``q``
    (:func:`_efficient_kernel`), so that a backward's recomputation runs the
    forward's kernel; elsewhere the dispatcher's choice."""
    if not _efficient_kernel(q):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])


class _ReproducibleAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(D) + mask) v`` (SDPA with a boolean mask
    ``[B, 1, Nq, L]``; q ``[B, H, Nq, D]``, k, v ``[B, H, L, D]``) whose
    gradients are bit-reproducible from run to run.

    SDPA's memory-efficient backward on CUDA splits the keys over programs that
    add into dq with atomics (the last bits vary between runs) unless torch's
    deterministic mode is on. Where that kernel serves (:func:`_efficient_kernel`),
    the backward here recomputes the attention with that mode on for its own
    duration only, so nsaflex's "deterministic by
    default" holds for the text queries of hybrid patterns without changing the
    caller's global setting outside it. The forward's output is SDPA's own."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # noqa: D102
        ctx.save_for_backward(q, k, v, mask)
        with _sdpa_backend(q):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, mask = ctx.saved_tensors
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        # Elsewhere (CPU, float64, other head dims) SDPA's backward has no atomics,
        # and deterministic mode would refuse cuBLAS without CUBLAS_WORKSPACE_CONFIG.
        determinism = _deterministic_algorithms() if _efficient_kernel(q) else contextlib.nullcontext()
        with torch.enable_grad(), determinism, _sdpa_backend(q):
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
            grads = torch.autograd.grad(out, leaves, grad_out)
        return (*grads, None)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with a boolean mask, through :class:`_ReproducibleAttention` when a
    gradient may be asked for."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _ReproducibleAttention.apply(q, k, v, mask)
    with _sdpa_backend(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def text_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_queries: torch.Tensor
) -> torch.Tensor:
    """Dense causal attention for the text queries only: ``[B, Hq, L, D]`` with
    zeros on the other rows.

    Text queries are few in video inputs, so they are gathered and attend to
    all keys through SDPA with an explicit causal mask, the heads of a GQA
    group folded into the query rows (``[B, Hkv, G * Nt, D]`` against the kv
    heads' own k and v, mask ``[B, 1, G * Nt, L]``): ``O(Nt * L)`` work instead
    of ``O(L^2)``. SDPA adds its mask to the scores
    (``-inf + inf = NaN``) and multiplies masked probabilities into the values
    (``0 * inf = NaN``), so where q, k or v hold a non-finite value the same
    attention runs as explicit masked softmax (:func:`nsaflex.reference.masked_softmax`
    and :func:`~nsaflex.reference.masked_product`, chunks of text queries): each
    non-finite value reaches only the queries that see it.
    """
    batch, query_heads, length, dim = q.shape
    counts = text_queries.sum(dim=1)
    # Any inf or NaN makes the sum non-finite (a float32 overflow of finite values
    # only sends the call down the exact path); no [B, H, L, D] bool tensor is made.
    finite = torch.isfinite(sum(x.sum(dtype=torch.float32 if x.dtype != torch.float64 else x.dtype) for x in (q, k, v)))
    # One host read for both (the text path reads the count anyway).
    most, all_finite = (int(x) for x in torch.stack([counts.max() if batch else counts.new_zeros(()),
                                                     finite.to(counts.dtype)]).tolist())
    out = q.new_zeros(q.shape)
    if most == 0:
        return out
    order = torch.sort((~text_queries).to(torch.int8), dim=1, stable=True).indices[:, :most]
    valid = torch.arange(most, device=q.device)[None, :] < counts[:, None]
    index = order[:, None, :, None].expand(batch, query_heads, most, dim)
    kv_heads = k.shape[1]
    group = query_heads // kv_heads
    # The G query heads of a kv head become G * Nt query rows of it (row g * Nt + t),
    # so k and v are read as they are rather than repeated G times (at 128K and
    # 28/4 heads a repeat writes 1.8 GB and keeps it for the backward).
    text_q = torch.gather(q, 2, index).reshape(batch, kv_heads, group * most, dim)
    keys = torch.arange(length, device=q.device)
    mask = (keys[None, None, :] <= order[:, :, None]) & valid[:, :, None]  # [B, Nt, L]
    if all_finite:
        # Padding rows see key 0 only (their output is dropped below) so no row is fully masked.
        mask = mask | (~valid[:, :, None] & (keys == 0)[None, None, :])
        text_out = _masked_attention(text_q, k, v, mask.repeat(1, group, 1)[:, None])
    else:
        text_out = _exact_masked_attention(text_q, k, v, mask.repeat(1, group, 1)[:, None])
    text_out = text_out.reshape(batch, query_heads, most, dim)
    text_out = torch.where(valid[:, None, :, None], text_out, torch.zeros_like(text_out))
    return out.scatter_add(2, index, text_out)


# Scores held at once by the explicit (non-finite input) text attention.
EXACT_CHUNK_ELEMENTS = 1 << 24


def _exact_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` over ``mask [B, 1, Nt, L]`` (q ``[B, H, Nt, D]``,
    k, v ``[B, H, L, D]``) in explicit ops that keep non-finite values to the rows
    that see them, in chunks of queries; float32 for half inputs."""
    from nsaflex.reference import masked_product, masked_softmax

    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, rows, dim = q.shape
    chunk = max(1, EXACT_CHUNK_ELEMENTS // max(1, batch * heads * k.shape[2]))
    keys, values = k.to(work), v.to(work)
    pieces = []
    for start in range(0, rows, chunk):
        part = mask[:, :, start : start + chunk].expand(batch, heads, -1, -1)
        scores = q[:, :, start : start + chunk].to(work) @ keys.transpose(-1, -2) * softmax_scale(dim)
        pieces.append(masked_product(masked_softmax(scores, part), values, part))
    return torch.cat(pieces, dim=2).to(q.dtype)


def combine(sparse: torch.Tensor, text: torch.Tensor | None, layout: SparseLayout) -> torch.Tensor:
    """The final output: sparse mix on sparse queries, dense on text queries."""
    if text is None:
        return sparse
    return torch.where(layout.sparse_queries[:, None, :, None], sparse, text)
