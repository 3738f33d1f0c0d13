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
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from nsaflex.inputs import nonfinite, value_sum
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

    @functools.cached_property
    def packed_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, slots, positions)``, each ``[total]`` long (``total`` the sum of
        ``lengths``): for every real sparse token, rows concatenated in order (the
        ``cu_seqlens`` packing), its batch row, its place ``p < lengths[row]`` in
        that row's sparse sequence and its full-row position ``positions[row, p]``.

        Built once per layout without reading the device (``total`` is known on the
        host), so the layers of one model call, which share the layout, share it."""
        total = sum(self.host_lengths)
        device = self.lengths.device
        rows = torch.repeat_interleave(torch.arange(len(self.host_lengths), device=device), self.lengths,
                                       output_size=total)
        slots = torch.arange(total, device=device) - self.cu_seqlens[:-1].long()[rows]
        return rows, slots, self.positions[rows, slots]

    @functools.cached_property
    def span_starts(self) -> tuple[int, ...] | None:
        """Each row's first sparse position where every row's sparse sequence is
        one run of consecutive tokens (a video or an image between text, the
        usual prompt), else None. Then the kernels can run on the rows as they
        are, each run from its first token, with no packing. One host read, once
        per layout (the layers of a model call share it)."""
        if self.identity:
            return (0,) * len(self.host_lengths)
        if not self.host_lengths:
            return None
        first = self.positions[:, 0]
        last = self.positions.gather(1, (self.lengths - 1).clamp(min=0)[:, None])[:, 0]
        runs = (last - first == self.lengths - 1) | (self.lengths == 0)
        values = torch.cat([runs.all().long()[None], first.long()]).tolist()
        return tuple(values[1:]) if values[0] else None

    @functools.cached_property
    def text_rows(self) -> "TextRows":
        """Where the text queries are (:func:`text_rows`): one host read, once per
        layout (the layers of a model call share it)."""
        return text_rows(~self.sparse_queries)

    def read_host_facts(self) -> None:
        """Read now what the backends read off this layout on the host (its
        single runs, its text rows), e.g. before a model's first layer queues
        its work: each read waits for the GPU's queue."""
        if self.has_text:
            self.text_rows
        if not self.identity and self.max_length > 0:
            self.span_starts


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
    """``[B, H, L, ...]`` -> ``[B, H, Lmax, ...]``: the sparse sequences, padded with zeros.

    One indexing op (its backward keeps the indices, not ``x``); the result is a
    ``[B, H, Lmax, ...]`` view of a ``[B, Lmax, H, ...]`` tensor."""
    if layout.identity:
        return x
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    gathered = x.transpose(1, 2)[rows, layout.positions]  # [B, Lmax, H, ...]
    if any(n < layout.max_length for n in layout.host_lengths):
        # Padding entries copy position 0, which may hold inf or NaN: zeros instead.
        padding = ~padding_mask(layout)
        gathered = gathered.masked_fill_(padding.view(*padding.shape, *([1] * (x.dim() - 2))), 0)
    return gathered.transpose(1, 2)


def scatter_padded(y: torch.Tensor, layout: SparseLayout, length: int) -> torch.Tensor:
    """``[B, H, Lmax, ...]`` -> ``[B, H, L, ...]``: sparse outputs back at their
    positions; positions outside the sparse sequence are zero (padding entries
    of ``y`` are not read)."""
    if layout.identity:
        return y
    rows, slots, positions = layout.packed_index
    return _Placed.apply(_Tokens.apply(y, rows, slots), rows, positions, y.shape[0], length)


class _Placed(torch.autograd.Function):
    """``values [H, N, ...]`` written at ``(rows[n], positions[n])`` (distinct pairs)
    of zeros ``[B, H, L, ...]`` laid out as ``[B, L, H, ...]``: the layout the
    model's output projection reads (its ``transpose(1, 2).contiguous()`` then
    copies nothing). The result is a tensor of its own, not a view, so
    :func:`combine` can add into it in place (an in-place write into a view
    would make the backward clone the whole gradient twice: autograd's
    CopySlices). The backward reads ``grad`` at the same places: a contiguous
    ``[H, N, ...]`` tensor, the layout the kernels return."""

    @staticmethod
    def forward(ctx, values, rows, positions, batch, length):  # noqa: D102
        ctx.save_for_backward(rows, positions)
        heads, _, *rest = values.shape
        inner = math.prod(rest)
        strides = (length * heads * inner, inner, heads * inner, *torch.empty(rest, device="meta").stride())
        out = values.new_empty_strided((batch, heads, length, *rest), strides).zero_()
        out.transpose(0, 1)[:, rows, positions] = values
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        rows, positions = ctx.saved_tensors
        return grad.transpose(0, 1)[:, rows, positions], None, None, None, None


def padding_mask(layout: SparseLayout) -> torch.Tensor:
    """``[B, Lmax]`` bool: real (not padding) sparse positions."""
    return torch.arange(layout.max_length, device=layout.lengths.device)[None, :] < layout.lengths[:, None]


class _Tokens(torch.autograd.Function):
    """``x [B, H, L, ...]`` -> ``[H, N, ...]`` contiguous, ``out[h, n] = x[rows[n], h,
    positions[n]]``, for ``N`` distinct ``(rows[n], positions[n])`` pairs.

    The forward is one indexing op, and the backward keeps the indices only (a
    gather keeps all of ``x`` until the backward). Autograd's own indexing
    backward fills an ``x``-sized tensor with zeros and then writes a copy of it,
    through the transposed view, whose gradient the engine cannot add in place to
    another gradient of ``x`` (the text path's); here the backward writes
    ``grad`` into one zero tensor laid out as ``x``."""

    @staticmethod
    def forward(ctx, x, rows, positions):  # noqa: D102
        ctx.save_for_backward(rows, positions)
        ctx.like = torch.empty_like(x, device="meta")  # x's size, dtype and strides, no memory
        return x.transpose(0, 1)[:, rows, positions]

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        rows, positions = ctx.saved_tensors
        grad_x = torch.zeros_like(ctx.like, device=grad.device)
        grad_x.transpose(0, 1)[:, rows, positions] = grad
        return grad_x, None, None


def pack_varlen(x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[H, total, D]`` contiguous (rows concatenated,
    ``cu_seqlens`` offsets): one indexing op, one ``x``-sized gradient (:class:`_Tokens`)."""
    rows, _, positions = layout.packed_index
    return _Tokens.apply(x, rows, positions)


def unpack_varlen(y: torch.Tensor, layout: SparseLayout, length: int) -> torch.Tensor:
    """``[H, total, D]`` -> ``[B, H, L, D]`` (inverse of :func:`pack_varlen`, zeros
    elsewhere), in one write into zeros laid out as ``[B, L, H, D]`` (:class:`_Placed`)."""
    rows, _, positions = layout.packed_index
    return _Placed.apply(y, rows, positions, layout.lengths.shape[0], length)


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
    (:func:`_efficient_kernel`): the kernel the gradient path runs
    (:func:`_chunk_attention`), so a call gives the same output with and
    without a gradient; elsewhere the dispatcher's choice."""
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
    deterministic mode is on, and in that mode it runs one program per row and
    head: 4 programs for the text queries of a 28/4-head model, whose GQA fold
    makes 4 heads of many rows. Where that kernel serves (:func:`_efficient_kernel`)
    the forward keeps its log-sum-exp (:func:`_split_key_lse`) and the backward
    (:func:`_split_key_backward`) cuts the keys into runs attended as a batch, so
    the deterministic kernel runs one program per run and head, and sums the runs'
    dq in a fixed order. Elsewhere (CPU, float64, other head dims, where SDPA's
    backward has no atomics) the backward recomputes SDPA's.

    ``mask`` may hold ``Nq / repeat`` rows, repeated ``repeat`` times along the
    queries (``mask.repeat(1, 1, repeat, 1)``) where SDPA reads it: only the
    unrepeated mask is kept for the backward (the GQA fold of
    :func:`text_dense_attention` repeats it once per query head of a group)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, repeat):  # noqa: D102
        ctx.repeat = repeat
        ctx.split_keys = _efficient_kernel(q)
        if ctx.split_keys:
            out, lse = _split_key_lse(q, k, v, mask, repeat, _key_chunks(q, k.shape[2]))
            ctx.save_for_backward(q, k, v, mask, out, lse)
            return out
        ctx.save_for_backward(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, repeat, 1))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if ctx.split_keys:
            return (*_split_key_backward(grad_out, *ctx.saved_tensors, ctx.repeat), None, None)
        q, k, v, mask = ctx.saved_tensors
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask.repeat(1, 1, ctx.repeat, 1))
            grads = torch.autograd.grad(out, leaves, grad_out)
        return (*grads, None, None)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      repeat: int = 1) -> torch.Tensor:
    """SDPA with the boolean mask ``mask.repeat(1, 1, repeat, 1)``, through
    :class:`_ReproducibleAttention` when a gradient may be asked for, and with
    the keys split (:func:`split_key_attention`) where few queries face a long
    row on CUDA."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _ReproducibleAttention.apply(q, k, v, mask, repeat)
    chunks = _key_chunks(q, k.shape[2])
    if chunks > 1:
        return split_key_attention(q, k, v, mask, repeat, chunks)
    with _sdpa_backend(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, repeat, 1))


# Keys per chunk of the split text attention, at least: shorter chunks cost more
# in the merge than they win in parallel programs.
MIN_KEY_CHUNK = 2048

# Keys per run of the text attention's backward: a multiple of its kernel's key
# block (no run ends inside one), and of 16 (the alignment rule for bias rows).
BACKWARD_KEY_BLOCK = 128

# Elements of the query side that the text backward's runs may copy in all (about 1 GiB).
BACKWARD_COPY_ELEMENTS = 1 << 27

# What the text path does beyond SDPA over the gathered text queries, for the backends' plans.
TEXT_PATH_NOTES = (
    "on CUDA, where few text queries face a long row, the keys split into chunks (about two programs per "
    f"multiprocessor, at least {MIN_KEY_CHUNK} keys each) merged by their log-sum-exps "
    "(nsaflex.hybrid.split_key_attention)",
    "the backward on CUDA runs the keys as a batch of runs (about two programs per multiprocessor, "
    f"{BACKWARD_KEY_BLOCK}-key multiples, their copies of the query side bounded) under torch's deterministic "
    "mode and sums their dq in a fixed order: reproducible gradients (nsaflex.hybrid.key_runs)",
    f"in a single row, text before a video longer than {MIN_KEY_CHUNK} tokens attends only the keys up to it",
)


def _programs_wanted(q: torch.Tensor) -> int:
    """About two programs per multiprocessor of ``q``'s GPU."""
    return 2 * torch.cuda.get_device_properties(q.device).multi_processor_count


def _key_chunks(q: torch.Tensor, length: int) -> int:
    """Key chunks for the text attention of ``q [B, H, N, D]`` over ``length``
    keys: enough for about two programs per multiprocessor. SDPA runs one
    program per 64 queries of a head, each through every key, so a question of
    100 tokens after a 128K-token video (28/4 heads, GQA folded: 4 x 11
    programs) leaves most of an H100's 132 multiprocessors idle. 1 (no split)
    off CUDA or where SDPA's memory-efficient kernel does not serve ``q``."""
    if not _efficient_kernel(q) or length < 2 * MIN_KEY_CHUNK:
        return 1
    programs = q.shape[0] * q.shape[1] * -(-q.shape[2] // 64)
    wanted = -(-_programs_wanted(q) // programs)
    return max(1, min(wanted, length // MIN_KEY_CHUNK))


def _backward_runs(q: torch.Tensor, length: int) -> tuple[int, int]:
    """``(runs, keys per run)`` for the text attention's backward of ``q
    [B, H, N, D]`` over ``length`` keys (:func:`key_runs`); off CUDA, one run."""
    if not q.is_cuda:
        return 1, length
    return key_runs(q.shape[0] * q.shape[1], q.shape[2] * q.shape[3], length, _programs_wanted(q))


def key_runs(row_heads: int, head_elements: int, length: int, programs: int) -> tuple[int, int]:
    """``(runs, keys per run)`` of the text attention's backward, for
    ``row_heads`` (batch rows x heads) of ``head_elements`` (queries x head
    dim) each: the deterministic kernel runs one program per row, head and
    run, so ``programs / row_heads`` runs (``programs``: about two per
    multiprocessor), but each run holds its own copy of the output's gradient
    and its own dq (with the kernel's float32 accumulator, about 8 bytes an
    element), so the runs' copies stay within :data:`BACKWARD_COPY_ELEMENTS`
    (a long text prompt keeps one run). Each run a multiple of
    :data:`BACKWARD_KEY_BLOCK` keys; ``runs * size >= length``."""
    copies = BACKWARD_COPY_ELEMENTS // max(row_heads * head_elements, 1)
    wanted = max(1, min(-(-programs // row_heads), copies, -(-length // BACKWARD_KEY_BLOCK)))
    size = -(-length // (wanted * BACKWARD_KEY_BLOCK)) * BACKWARD_KEY_BLOCK
    return -(-length // size), size


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T / sqrt(D) + bias) v, logsumexp(q k^T / sqrt(D) + bias))``:
    ``[B, H, N, D]`` and ``[B, H, N]`` float32 (natural log; ``-inf`` where the
    bias hides every key, whose output rows are then not read). SDPA's
    memory-efficient kernel on CUDA (the one operator of torch that returns the
    log-sum-exp beside an additive mask), explicit float32 ops elsewhere."""
    if _efficient_kernel(q):
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
        return out, lse[..., : q.shape[2]]
    scores = (q.float() @ k.float().transpose(-1, -2)) * softmax_scale(q.shape[-1]) + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (weights @ v.float()).to(q.dtype), lse


def _chunk_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              bias: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``softmax(q k^T / sqrt(D) + bias) v`` over the keys of
    one run, given the output ``out`` and log-sum-exp ``lse`` of the attention
    over *all* runs (``[B, H, N, D]``, ``[B, H, N]`` float32): with
    ``P = exp(s + bias - lse)`` and ``delta = rowsum(dO * out)``,
    ``dv = P^T dO``, ``dS = P (dO v^T - delta)``, ``dq = dS k / sqrt(D)`` (this
    run's share of dq), ``dk = dS^T q / sqrt(D)``. SDPA's memory-efficient
    backward on CUDA, under torch's deterministic mode (one program per row and
    head: no atomics); explicit float32 ops elsewhere."""
    if _efficient_kernel(q):
        rows = q.shape[2]
        # The kernel reads the log-sum-exp as its forward lays it out: rows padded to 32.
        lse = F.pad(lse, (0, -(-rows // 32) * 32 - rows))
        no_dropout = torch.empty((), dtype=torch.long)
        with _deterministic_algorithms():
            dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                grad_out, q, k, v, bias, out, lse, no_dropout, no_dropout, 0.0, [True, True, True, False])
        return dq, dk, dv
    scale = softmax_scale(q.shape[-1])
    qf, kf, vf, go = q.float(), k.float(), v.float(), grad_out.float()
    weights = torch.exp(qf @ kf.transpose(-1, -2) * scale + bias.float() - lse[..., None])
    delta = (go * out.float()).sum(-1, keepdim=True)
    grad_scores = weights * (go @ vf.transpose(-1, -2) - delta)
    return ((grad_scores @ kf * scale).to(q.dtype), (grad_scores.transpose(-1, -2) @ qf * scale).to(k.dtype),
            (weights.transpose(-1, -2) @ go).to(v.dtype))


def _run_biases(mask: torch.Tensor, repeat: int, rows: int, heads: int, runs: int, size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The additive bias of the boolean ``mask [B, 1, rows / repeat, L]``
    repeated ``repeat`` times along the queries, cut into ``runs`` runs of
    ``size`` keys: ``[B * runs, heads, rows, size]`` (heads and, for one row,
    runs as views), 0 where seen, ``-inf`` elsewhere and on the keys past
    ``L``. Its rows start at multiples of 16 elements (the memory-efficient
    kernel's alignment rule), as a view into wider rows where the width is not one."""
    batch, length = mask.shape[0], mask.shape[3]
    width = runs * size
    stride = -(-width // 16) * 16
    bias = torch.full((batch, 1, rows, stride), float("-inf"), dtype=dtype, device=mask.device)[..., :width]
    # Row r * (N / repeat) + t of the bias is row t of the mask: filled through a view, no repeated copy.
    bias.view(batch, 1, repeat, rows // repeat, width)[..., :length].masked_fill_(mask[:, :, None], 0.0)
    return bias.unflatten(3, (runs, size)).permute(0, 3, 1, 2, 4).flatten(0, 1).expand(-1, heads, -1, -1)


def _per_run(x: torch.Tensor, runs: int) -> torch.Tensor:
    """``[B, ...]`` -> ``[B * runs, ...]``, each row repeated for each run (a
    view for one row: the runs read it in place)."""
    return x.unsqueeze(1).expand(x.shape[0], runs, *x.shape[1:]).flatten(0, 1)


def _as_runs(x: torch.Tensor, runs: int, size: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B * runs, H, size, D]``: the keys in runs of
    ``size``, zero-padded past ``L`` (a view where ``L = runs * size`` and the
    rows allow it: the model's ``[B, L, H, D]`` layout for one row does)."""
    if runs * size != x.shape[2]:
        x = F.pad(x, (0, 0, 0, runs * size - x.shape[2]))
    return x.unflatten(2, (runs, size)).transpose(1, 2).flatten(0, 1)


def _split_key_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, repeat: int,
                   chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_key_attention`'s output and its log-sum-exp over all keys
    (``[B, H, N]`` float32)."""
    batch, heads, rows, _ = q.shape
    length = k.shape[2]
    per_chunk = -(-length // chunks)
    # Runs after the first start a multiple of 16 keys into the bias rows (the kernel's alignment rule).
    size = length if chunks == 1 else -(-per_chunk // 16) * 16
    padded = size * chunks
    biases = _run_biases(mask, repeat, rows, heads, chunks, size, q.dtype)
    out, lse = _chunk_attention(_per_run(q, chunks), _as_runs(k, chunks, size), _as_runs(v, chunks, size), biases)
    if chunks == 1:
        return out, lse
    out, lse = out.unflatten(0, (batch, chunks)), lse.unflatten(0, (batch, chunks))  # [B, S, H, N, ...]
    # A chunk a query cannot see weighs 0 (the memory-efficient kernel's log-sum-exp of
    # such a row is not -inf).
    seen = F.pad(mask, (0, padded - length)).unflatten(3, (chunks, size)).any(dim=-1)  # [B, 1, N / repeat, S]
    lse = torch.where(seen.repeat(1, 1, repeat, 1).permute(0, 3, 1, 2), lse, float("-inf"))
    most = lse.amax(dim=1)  # every row sees a key: finite
    weights = torch.exp(lse - most[:, None])
    merged = torch.where(weights[..., None] > 0, out.float() * weights[..., None], 0.0).sum(dim=1)
    total = weights.sum(dim=1)
    return (merged / total[..., None]).to(q.dtype), most + torch.log(total)


def split_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, repeat: int,
                        chunks: int) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + mask) v`` with the keys cut into ``chunks``
    runs attended at once (the runs as a batch: ``chunks`` times the programs)
    and merged by their log-sum-exps: ``o = sum_j exp(lse_j - lse) o_j`` with
    ``lse = log sum_j exp(lse_j)``. q ``[B, H, N, D]``, k, v ``[B, H, L, D]``,
    the boolean ``mask [B, 1, N / repeat, L]`` repeated ``repeat`` times along
    the queries (every query sees at least one key). Forward only: the
    gradient goes through :class:`_ReproducibleAttention`."""
    return _split_key_lse(q, k, v, mask, repeat, chunks)[0]


def _split_key_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        repeat: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`split_key_attention` (output ``out``, log-sum-exp
    ``lse``): the keys cut into runs (:func:`_backward_runs`) that form a batch of
    one kernel call against the same queries, each run's dk and dv its own, dq
    the sum of the runs' shares in run order (float32). Bit-reproducible: the
    kernel runs under torch's deterministic mode, the sum in a fixed order."""
    batch, heads, rows, dim = q.shape
    length = k.shape[2]
    runs, size = _backward_runs(q, length)
    biases = _run_biases(mask, repeat, rows, heads, runs, size, q.dtype)
    # The kernel reads the output with rows H * D apart (its [B, N, H, D] layout), whatever its strides say.
    rows_first = _per_run(out.transpose(1, 2), runs)
    if rows_first.stride(1) != heads * dim or rows_first.stride(2) != dim:
        rows_first = rows_first.contiguous()
    dq, dk, dv = _chunk_attention_backward(_per_run(grad_out, runs), _per_run(q, runs), _as_runs(k, runs, size),
                                           _as_runs(v, runs, size), biases, rows_first.transpose(1, 2),
                                           _per_run(lse, runs))
    dq = dq.unflatten(0, (batch, runs)).sum(dim=1, dtype=torch.float32).to(q.dtype)

    def keys(x: torch.Tensor) -> torch.Tensor:  # [B * runs, H, size, D] -> [B, H, L, D]
        return x.unflatten(0, (batch, runs)).transpose(1, 2).flatten(2, 3)[:, :, :length]

    return dq, keys(dk), keys(dv)


@dataclass(frozen=True)
class TextRows:
    """Where the text queries of ``[B, L]`` rows are (:func:`text_rows`).

    Attributes:
        order: ``[B, Nt]`` long: each row's text positions in order (``Nt``: the
            most text queries of a row), padded with positions of sparse queries.
        valid: ``[B, Nt]`` bool: real entries of ``order``.
        groups: ``(first, end, keys)`` slices of ``order``'s columns that attend
            apart, each over its first ``keys`` keys (see :func:`text_dense_attention`).
    """

    order: torch.Tensor
    valid: torch.Tensor
    groups: tuple[tuple[int, int, int], ...]

    @property
    def most(self) -> int:
        return self.order.shape[1]


def text_rows(text_queries: torch.Tensor) -> TextRows:
    """The :class:`TextRows` of ``text_queries [B, L]`` (bool): one host read.

    In a single row, the text before the widest gap between text positions (a
    prompt before a video, where the gap passes :data:`MIN_KEY_CHUNK`) forms a
    group of its own over the keys up to its last position."""
    batch, length = text_queries.shape
    device = text_queries.device
    counts = text_queries.sum(dim=1)
    # Each row's text positions first, in order.
    sorted_positions = torch.sort((~text_queries).to(torch.int8), dim=1, stable=True).indices
    facts = [counts.max() if batch else counts.new_zeros(())]
    if batch == 1 and length > 1:
        # The widest gap between consecutive text positions: the video between a prompt and
        # a question. The text before it sees only the keys up to its last position.
        positions = sorted_positions[0]
        gaps = torch.where(torch.arange(length - 1, device=device) < counts[0] - 1, positions[1:] - positions[:-1], 0)
        last_before = gaps.argmax()
        facts += [last_before, gaps[last_before], positions[last_before]]
    facts = [int(x) for x in torch.stack(facts).tolist()]
    most = facts[0]
    order = sorted_positions[:, :most]
    valid = torch.arange(most, device=device)[None, :] < counts[:, None]
    # Skipping the keys after the first group pays where it skips at least a chunk of them.
    groups = ((0, most, length),)
    if len(facts) > 1 and facts[2] > MIN_KEY_CHUNK:
        groups = ((0, facts[1] + 1, facts[3] + 1), (facts[1] + 1, most, length))
    return TextRows(order, valid, groups)


def finite_later(*tensors: torch.Tensor) -> Callable[[], bool]:
    """Whether every value of ``tensors`` is finite: the reduction is queued now,
    the answer read when the returned function is called. On CUDA the flag goes
    to pinned host memory behind an event, so the read waits for the reduction
    only, not for the kernels queued after it (a plain ``bool()`` there would
    wait for them and leave the GPU idle while the host queues the next ones).
    The test is on the tensors' sums (:func:`nsaflex.inputs.value_sum`)."""
    total = sum(value_sum(x) for x in tensors)
    finite = ~nonfinite(total)
    if finite.device.type != "cuda":
        return functools.partial(bool, finite)
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(finite, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> bool:
        done.synchronize()
        return bool(host)

    return read


def text_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_queries: torch.Tensor | TextRows,
    into: torch.Tensor | None = None, finite: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Dense causal attention for the text queries only: ``[B, Hq, L, D]`` with
    zeros on the other rows (a view of a ``[B, L, Hq, D]`` tensor, the layout
    :func:`unpack_varlen` gives); with ``into`` (``[B, Hq, L, D]``, e.g. the
    sparse kernels' output over the rows as they are), the text rows of
    ``into`` replaced in place and ``into`` returned, its other rows kept.
    ``text_queries``: ``[B, L]`` bool, or its :class:`TextRows` (e.g. a
    layout's, read once per token-class tensor); ``finite``: whether q, k and
    v are all finite, from :func:`finite_later` (else computed here).

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

    In a single row, the text before the widest gap between text positions (a
    prompt before a video) attends apart, over the keys up to its last position
    only (:func:`text_rows`, :func:`_text_group_attention`).

    Memory: the text queries are read by indexing (whose backward keeps the
    indices, where a gather would keep all of ``q``), the outputs written into
    zeros in place, and the backward keeps the ``[B, 1, Nt, L]`` mask, not its
    ``G`` repeats.
    """
    batch, query_heads, length, dim = q.shape
    rows_of_text = text_rows(text_queries) if isinstance(text_queries, torch.Tensor) else text_queries
    most, order, valid = rows_of_text.most, rows_of_text.order, rows_of_text.valid
    if most == 0:
        return q.new_zeros(batch, length, query_heads, dim).transpose(1, 2) if into is None else into
    all_finite = (finite or finite_later(q, k, v))()
    rows = torch.arange(batch, device=q.device)[:, None]
    # One gather of the text queries (its backward writes one q-sized gradient): [Hq, B, Nt, D].
    text_q = _Tokens.apply(q, rows.expand(batch, most).flatten(), order.flatten()).view(query_heads, batch, most, dim)
    text_out = torch.cat([_text_group_attention(text_q[:, :, a:b], k, v, order[:, a:b], valid[:, a:b], keys, all_finite)
                          for a, b, keys in rows_of_text.groups], dim=1)  # [B, Nt, Hq, D]
    if into is None:
        out = q.new_zeros(batch, length, query_heads, dim)
        # Padding rows point at positions of sparse queries: they write their zeros there.
        out[rows, order] = torch.where(valid[:, :, None, None], text_out, 0.0)
        return out.transpose(1, 2)
    # Indexing into's batch and token dims directly (not through a transposed view,
    # whose in-place write autograd would replay on a copy of the whole gradient).
    text_out = text_out.to(into.dtype)
    if batch > 1:
        # Padding rows (rows with fewer text queries) point at sparse queries: they write back what is there.
        text_out = torch.where(valid[:, :, None, None], text_out, into[rows, :, order])
    into[rows, :, order] = text_out
    return into


def _text_group_attention(text_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor, valid: torch.Tensor,
               keys: int, all_finite: bool) -> torch.Tensor:
    """The causal attention of the text queries ``text_q [Hq, B, Nt, D]`` at
    positions ``order [B, Nt]`` (``valid``: real entries; the others are padding
    of rows with fewer) over the first ``keys`` keys, which hold every key they
    see: ``[B, Nt, Hq, D]`` (see :func:`text_dense_attention`)."""
    query_heads, batch, count, dim = text_q.shape
    kv_heads = k.shape[1]
    group = query_heads // kv_heads
    k, v = k[:, :, :keys], v[:, :, :keys]
    # The G query heads of a kv head become G * Nt query rows of it (row g * Nt + t),
    # so k and v are read as they are rather than repeated G times (at 128K and
    # 28/4 heads a repeat writes 1.8 GB and keeps it for the backward).
    text_q = text_q.transpose(0, 1).reshape(batch, kv_heads, group * count, dim)
    positions = torch.arange(keys, device=text_q.device)
    mask = (positions[None, None, :] <= order[:, :, None]) & valid[:, :, None]  # [B, Nt, keys]
    if all_finite:
        # Padding rows see key 0 only (their output is dropped) so no row is fully masked.
        mask = mask | (~valid[:, :, None] & (positions == 0)[None, None, :])
        text_out = _masked_attention(text_q, k, v, mask[:, None], group)
    else:
        text_out = _exact_masked_attention(text_q, k, v, mask.repeat(1, group, 1)[:, None])
    return text_out.reshape(batch, query_heads, count, dim).transpose(1, 2)


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
    """The final output ``[B, H, L, D]``: sparse mix on sparse queries, dense on text queries.

    With compacted sparse sequences (not ``layout.identity``) ``sparse`` is zero
    on text queries (:func:`unpack_varlen`, :func:`scatter_padded`) and ``text``
    zero on the others (:func:`text_dense_attention`), so the output is their sum:
    each value exactly, inf and NaN included (``x + 0 = x``; only a ``-0.0``
    becomes ``+0.0``), with a backward that hands the one gradient to both (a
    ``where`` makes two masked copies of it). The sum is added into ``sparse``
    in place (a fresh tensor of the caller's) where it is a tensor of its own
    of the sum's dtype (:class:`_Placed`'s output): no third ``[B, H, L, D]``
    tensor."""
    if text is None:
        return sparse
    if layout.identity:
        return torch.where(layout.sparse_queries[:, None, :, None], sparse, text)
    if sparse._is_view() or torch.result_type(sparse, text) != sparse.dtype:
        return sparse + text
    return sparse.add_(text)
