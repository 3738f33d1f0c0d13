"""Selection scores and top-n block choice, chunked over queries (plain torch).

Shared by the fast backends. Given the queries and the compressed keys of the
sparse sequences, this computes exactly what :mod:`nsaflex.reference` computes
(compression probabilities -> NSA Eq. 9 block scores -> group / tile sums ->
forced blocks plus the best complete blocks, ties to the lower index) without
ever holding the ``[L, L/d]`` probabilities or the ``[L, L/l']`` block scores of
the whole sequence: queries are processed in chunks of ``chunk`` rows (aligned to
the query tile), and each chunk is reduced to its selected block indices before
the next one starts. Peak extra memory is ``O(chunk * Hq * (N + J))``.

Selections come back as an index tensor ``[B, Hs, U, width]`` (int32, ``-1`` for
an empty slot) where ``Hs`` is ``Hkv`` (``scoring: group``) or ``Hq``
(``scoring: head``) and ``U`` is the number of *selection units*: queries
(``granularity: token``) or aligned query tiles of ``m`` queries
(``granularity: query_block``). The first ``len(forced)`` slots hold the forced
blocks (``-1`` where absent or repeated), the rest the ranked candidates.

Precision: the ranking is decided in ``score_dtype``. float64 reproduces the
reference's choice exactly on float32 inputs; float32 (the default on CUDA, and
the Triton backend's kernels) sums in its own order and can choose differently
where two blocks' float64 scores are nearer than :func:`tie_tolerance` (large
logits make many probabilities round to the same float32, often 0). Ties that
are exact go to the lower index, as in the reference.

On CUDA with float32 ranking the scores come from the Triton backend's
scoring kernels (:mod:`nsaflex.kernels.forward`: ``cmp_lse_kernel``'s
log-sum-exp pass, then ``cmp_score_kernel``'s Eq. 9 block scores of every
unit, probabilities summed over the group heads and the query tile in
registers: no ``[c, N]`` logits in memory), ranked by the torch top-n here;
``select(..., kernel="torch")`` keeps the torch path, ``"triton"`` forces the
kernels (on CPU under ``TRITON_INTERPRET=1``); the plan option
``scoring_kernel`` (:class:`nsaflex.plan.PlanOptions`) chooses for the flex
backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nsaflex.errors import BackendUnavailable, InputError, one_of
from nsaflex.pooling import compressed_counts, softmax_scale
from nsaflex.spec import Compression, Selection

SCORING_KERNELS = ("auto", "triton", "torch")
# Number of query rows (times query heads and compressed tokens) held at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 27


def default_score_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """float64 on CPU and for float64 inputs (exact agreement with the
    reference), float32 on CUDA (the plan option ``score_dtype`` overrides it
    for the flex backend)."""
    if dtype == torch.float64 or torch.device(device).type == "cpu":
        return torch.float64
    return torch.float32


# Relative precision of float32 block scores: unit roundoff 2^-24, times 2^8 for
# the softmax's exp and normalisation and the sums over group heads, Eq. 9 terms
# and query tiles (each a few roundings).
TIE_RELATIVE = 2.0**-16


def tie_tolerance(top_score: float, max_logit: float) -> float:
    """The score gap below which float32 backends may rank two blocks either way:
    ``2^-16 * (1 + max_logit) * top_score``, where ``top_score`` is the unit's
    largest block score and ``max_logit`` its largest ``|q . K_i| / sqrt(D)``
    (exp carries the logit's absolute rounding into a relative error of the
    probability). Blocks whose float64 scores differ by more are ranked alike by
    every backend; the outputs then agree within the dtype's tolerance."""
    return TIE_RELATIVE * (1.0 + max_logit) * top_score


def eq9_offsets(compression: Compression, selection: Selection) -> list[tuple[int, int]]:
    """``[(o, w)]`` with ``p_slc[:, j] = sum_o w * p_cmp[:, (l'/d)*j - o]`` (NSA Eq. 9):
    ``w`` counts the pairs ``m < l'/d``, ``n < l/d`` with ``m + n = o``."""
    return _offsets(compression.block, compression.stride, selection.block)


def _offsets(block: int, stride: int, sel_block: int) -> list[tuple[int, int]]:
    per_block, per_token = sel_block // stride, block // stride
    weights: dict[int, int] = {}
    for m in range(per_block):
        for n in range(per_token):
            weights[m + n] = weights.get(m + n, 0) + 1
    return sorted(weights.items())


def eq9_block_scores(
    probabilities: torch.Tensor, compression: Compression, selection: Selection, num_blocks: int
) -> torch.Tensor:
    """``[..., N]`` compression probabilities -> ``[..., J]`` block scores (Eq. 9),
    indices outside ``[0, N)`` skipped. A strided shift-and-add: ``O(N * (l'/d + l/d))``
    per query, no ``[N, J]`` matrix."""
    return _eq9(probabilities, compression.block, compression.stride, selection.block, num_blocks)


def _eq9(probabilities: torch.Tensor, block: int, stride: int, sel_block: int, num_blocks: int) -> torch.Tensor:
    ratio = sel_block // stride
    offsets = _offsets(block, stride, sel_block)
    span = max(o for o, _ in offsets)
    length = probabilities.shape[-1]
    need = ratio * (num_blocks - 1) + 1  # positions r*j for j < J
    right = max(0, need - length)
    padded = torch.nn.functional.pad(probabilities, (span, right)) if span or right else probabilities
    out = None
    for offset, weight in offsets:
        start = span - offset
        term = padded[..., start : start + need : ratio]
        term = term * weight if weight != 1 else term
        out = term if out is None else out + term
    assert out is not None
    return out[..., :num_blocks]


def forced_slots(first_query: torch.Tensor, selection: Selection) -> torch.Tensor:
    """``[U, len(forced)]`` forced block per unit (``-1`` where absent or a repeat
    of an earlier slot), in the order of ``selection.forced``."""
    current = torch.div(first_query, selection.block, rounding_mode="floor")
    columns = []
    for name in selection.forced:
        if name == "first":
            columns.append(torch.zeros_like(current))
        elif name == "previous":
            columns.append(torch.where(current >= 1, current - 1, torch.full_like(current, -1)))
        else:
            columns.append(current)
    if not columns:
        return first_query.new_zeros(first_query.shape[0], 0)
    slots = torch.stack(columns, dim=-1)
    for i in range(1, slots.shape[-1]):
        repeated = (slots[:, i : i + 1] == slots[:, :i]).any(dim=-1)
        slots[:, i] = torch.where(repeated, torch.full_like(slots[:, i], -1), slots[:, i])
    return slots


def choose_blocks(scores: torch.Tensor, first_query: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Selected blocks ``[..., U, width]`` (int32, ``-1`` empty) from scores
    ``[..., U, J]`` of units whose first query is ``first_query [U]``.

    Forced blocks first; then the ``n - |forced(u)|`` best complete blocks
    (``(j+1)*l' - 1 <= first_query``) that are not forced, ties to the lower
    index (as :func:`nsaflex.reference.choose_blocks`).
    """
    *lead, units, num_blocks = scores.shape
    device = scores.device
    forced = forced_slots(first_query.to(device), selection)  # [U, F]
    present = (forced >= 0).sum(dim=-1)  # distinct forced blocks per unit
    take = min(selection.count, num_blocks)
    blocks = torch.arange(num_blocks, device=device)
    complete = torch.div(first_query.to(device) + 1, selection.block, rounding_mode="floor")
    candidate = blocks[None, :] < complete[:, None]  # [U, J]
    for column in range(forced.shape[-1]):
        candidate &= blocks[None, :] != forced[:, column : column + 1]
    candidate = candidate.expand(*lead, units, num_blocks)
    ranked, valid = _top_candidates(scores, candidate, take)
    # Unit u takes n - |forced(u)| candidates (forced blocks count toward n).
    rank = torch.arange(ranked.shape[-1], device=device)
    valid &= rank < (selection.count - present)[:, None]
    ranked = torch.where(valid, ranked, torch.full_like(ranked, -1))
    forced = forced.expand(*lead, units, forced.shape[-1])
    return torch.cat([forced, ranked], dim=-1).to(torch.int32)


def ranking_keys(scores: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """A unique int64 key per block of float32 ``scores [..., J]``, ``(score bits
    << 32) | reverse`` (``reverse [J] = J - 1 - j``): ``torch.topk`` on it ranks
    non-negative scores (``inf`` included) by value, ties to the lower index,
    since non-negative float32 values order like their bit patterns; a negative
    score ranks below every non-negative one. Exact, and faster than a stable sort."""
    return (scores.view(torch.int32).to(torch.int64) << 32) | reverse


def ranked_blocks(top: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The block indices of keys :func:`ranking_keys` made (of ``num_blocks`` blocks)."""
    return (num_blocks - 1) - (top & 0xFFFFFFFF)


def _top_candidates(scores: torch.Tensor, candidate: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``take`` best candidates (index ``[..., take]`` and validity), ties to the lower index."""
    num_blocks = scores.shape[-1]
    if take == 0:
        empty = scores.new_zeros(*scores.shape[:-1], 0, dtype=torch.long)
        return empty, empty.bool()
    if scores.dtype == torch.float32:
        reverse = (num_blocks - 1) - torch.arange(num_blocks, device=scores.device)
        key = torch.where(candidate, ranking_keys(scores + 0.0, reverse), -1)  # + 0.0: -0.0 -> 0.0
        top = torch.topk(key, take, dim=-1, sorted=True).values
        return ranked_blocks(top, num_blocks), top >= 0
    masked = torch.where(candidate, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :take]
    return order, torch.gather(candidate, -1, order)


@dataclass(frozen=True)
class SelectionResult:
    """Selected blocks of every selection unit.

    Attributes:
        indices: ``[B, Hs, U, width]`` int32 block indices, ``-1`` for empty slots.
        unit: queries per unit (1 for token granularity, ``m`` for query_block).
        per_head: ``Hs == Hq`` (head scoring) rather than ``Hkv`` (group scoring).
        num_blocks: ``J``, selection blocks of the (padded) sparse sequence.
    """

    indices: torch.Tensor
    unit: int
    per_head: bool
    num_blocks: int


def select(
    q: torch.Tensor,
    compressed_k: torch.Tensor,
    compression: Compression,
    selection: Selection,
    lengths: torch.Tensor | None = None,
    *,
    score_dtype: torch.dtype | None = None,
    chunk: int | None = None,
    kernel: str = "auto",
) -> SelectionResult:
    """The selection of every unit of the sparse sequences ``q [B, Hq, L, D]``
    against compressed keys ``[B, Hkv, N, D]`` (no gradient).

    ``lengths [B]``: real length of each (padded) row; units that start past it
    select nothing, queries past it add nothing to a tile's scores, and
    ``videonsa_legacy`` visibility stops at the row's own compressed tokens.
    ``kernel``: ``auto`` (the Triton scoring kernels on CUDA with float32
    ranking), ``triton`` (always, also on CPU under ``TRITON_INTERPRET=1``;
    errors raise) or ``torch`` (never).
    """
    if kernel not in SCORING_KERNELS:
        raise InputError("kernel", one_of(SCORING_KERNELS), kernel)
    batch, query_heads, length, dim = q.shape
    kv_heads = compressed_k.shape[1]
    group = query_heads // kv_heads
    num_compressed = compressed_k.shape[2]
    device = q.device
    if score_dtype is None:
        score_dtype = default_score_dtype(device, q.dtype)
    if _use_kernel(q, compressed_k, compression, selection, score_dtype, kernel):
        try:
            return _select_kernel(q, compressed_k, compression, selection, lengths, chunk)
        except Exception as error:  # pragma: no cover - depends on the toolchain
            if kernel == "triton":
                raise
            import warnings

            warnings.warn(f"nsaflex.scoring: the Triton scoring kernel failed ({type(error).__name__}: {error}); "
                          "using the torch scoring")
            _KERNEL["failed"] = True
    unit = selection.query_block if selection.granularity == "query_block" else 1
    assert unit is not None
    num_blocks = -(-length // selection.block)
    num_units = -(-length // unit)
    if lengths is None:
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)
    lengths = lengths.to(device=device, dtype=torch.long)
    row_compressed = compressed_counts(compression, lengths)

    if chunk is None:
        per_row = max(1, query_heads * batch * (num_compressed + num_blocks))
        chunk = max(1, DEFAULT_CHUNK_ELEMENTS // per_row)
    chunk = max(unit, (chunk // unit) * unit)
    chunk = min(chunk, -(-length // unit) * unit)  # one chunk covers a short sequence
    scale = softmax_scale(dim)
    last_position = torch.arange(num_compressed, device=device) * compression.stride + compression.block - 1
    per_head = selection.scoring == "head"
    geometry = (compression.block, compression.stride, selection.block, num_blocks, group, unit, per_head, scale)
    post = _post_function(device)
    pieces = []
    with torch.no_grad():
        compressed = compressed_k.detach()
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            # Pad the last chunk to the common size: one shape (one compile) per length.
            queries = torch.arange(start, start + chunk, device=device)
            real = (queries[None, :] < lengths[:, None]) & (queries < stop)[None, :]  # [B, c]
            chunk_q = q[:, :, start:stop].detach()
            if stop - start < chunk:
                chunk_q = torch.nn.functional.pad(chunk_q, (0, 0, 0, chunk - (stop - start)))
            if num_compressed:
                logits = _logits(chunk_q, compressed, score_dtype, group)  # [B, Hkv, G, c, N]
                if compression.visibility == "causal":
                    visible = (last_position[None, :] <= queries[:, None])[None]  # [1, c, N]
                else:
                    visible = (last_position[None, :] >= queries[:, None])[None] & (
                        torch.arange(num_compressed, device=device)[None, None, :] < row_compressed[:, None, None]
                    )
                visible = visible & real[:, :, None]  # [B, c, N]
                scores = post(logits, visible, geometry)
            else:
                heads_out = query_heads if per_head else kv_heads
                scores = torch.zeros(batch, heads_out, chunk // unit, num_blocks, dtype=score_dtype, device=device)
            first = torch.arange(start, start + chunk, unit, device=device)
            chosen = choose_blocks(scores, first, selection)  # [B, Hs, u, width]
            started = first[None, :] < torch.minimum(lengths, torch.tensor(stop, device=device))[:, None]
            chosen = torch.where(started[:, None, :, None], chosen, torch.full_like(chosen, -1))
            units_here = -(-(stop - start) // unit)
            pieces.append(chosen[:, :, :units_here])
    indices = torch.cat(pieces, dim=2)
    assert indices.shape[2] == num_units
    return SelectionResult(indices, unit, per_head, num_blocks)



# --- Triton scoring (CUDA default for float32 ranking) ------------------------------------------

# Per chunk: [B, Hs, units, J] float32 block scores and the top-n's int64 keys over them.
KERNEL_CHUNK_ELEMENTS = 1 << 28
_KERNEL: dict[str, bool] = {}


def _use_kernel(q: torch.Tensor, compressed_k: torch.Tensor, compression: Compression, selection: Selection,
                score_dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether :func:`select` scores with the Triton kernels (``mode``: see its
    ``kernel``); ``triton`` where they cannot serve raises BackendUnavailable."""
    if mode == "torch" or compressed_k.shape[2] == 0 or q.shape[2] == 0:
        return False
    if mode == "auto" and (q.device.type != "cuda" or score_dtype != torch.float32 or _KERNEL.get("failed")):
        return False
    reason = _kernel_unsupported(q, compressed_k, compression, selection)
    if reason is not None and mode == "triton":
        raise BackendUnavailable(f"scoring_kernel 'triton' cannot score here: {reason}")
    return reason is None


def _kernel_unsupported(q: torch.Tensor, compressed_k: torch.Tensor, compression: Compression,
                        selection: Selection) -> str | None:
    """Why the Triton scoring kernels cannot score these inputs (None: they can)."""
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"the Triton scoring kernels need a CUDA device (on {q.device.type} only under TRITON_INTERPRET=1)"
    try:
        from nsaflex.kernels import ops
    except ImportError as error:  # pragma: no cover - triton is a dependency
        return f"triton cannot be imported: {error}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if compressed_k.dtype != q.dtype:
        return "compressed keys in another dtype"
    if q.shape[1] % compressed_k.shape[1]:
        return "query heads not a multiple of kv heads"
    if q.shape[-1] > 256:
        return "head dim > 256"
    reason = ops.score_step_reason(ops.scoring_config(compression, selection))
    if reason is not None:
        return reason
    dim = _kernel_head_dim(q.shape[-1])
    group = q.shape[1] // compressed_k.shape[1]
    if group * q.shape[2] * dim >= 2**31:  # a group's rows in q (and lse) within 32-bit offsets
        return f"{q.shape[2]} queries x {group} heads per kv head pass the kernels' 32-bit offsets within a group"
    return None


def _kernel_head_dim(dim: int) -> int:
    """The kernels' head dim for inputs of ``dim``: a power of two, at least 16
    (inputs are zero-padded to it; zeros add nothing to ``q . K_i``)."""
    return max(16, 1 << max(0, dim - 1).bit_length())


def _kernel_inputs(q: torch.Tensor, compressed_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, compressed_k)`` as the kernels take them: contiguous, head dim
    zero-padded to :func:`_kernel_head_dim`; on the CPU interpreter half
    precision as float32 (its bf16 ``tl.dot`` is wrong; products of bf16/fp16
    values are exact in float32 either way)."""
    if q.device.type == "cpu" and q.dtype != torch.float32:
        q, compressed_k = q.float(), compressed_k.float()
    pad = _kernel_head_dim(q.shape[-1]) - q.shape[-1]
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
        compressed_k = torch.nn.functional.pad(compressed_k, (0, pad))
    return q.contiguous(), compressed_k.contiguous()


def _select_kernel(q, compressed_k, compression: Compression, selection: Selection, lengths, chunk) -> SelectionResult:
    """:func:`select` with the Triton backend's scoring kernels (float32):
    ``cmp_lse_kernel`` (log-sum-exp alone) over all queries, then per chunk of
    units ``cmp_score_kernel``'s Eq. 9 block scores, summed over the group's
    heads and (query blocks) each tile's queries, and the top-n in torch."""
    from nsaflex.kernels import ops

    batch, query_heads, length, dim = q.shape
    kv_heads, num_compressed = compressed_k.shape[1], compressed_k.shape[2]
    device = q.device
    cfg = ops.scoring_config(compression, selection)
    unit = cfg.unit
    per_head = selection.scoring == "head"
    selecting = query_heads if per_head else kv_heads
    num_blocks = -(-length // selection.block)
    num_units = -(-length // unit)
    # Whole rows (no lengths) give every row num_compressed tokens: no read-back of the fewest.
    fewest = min(num_compressed, compression.num_tokens(length)) if lengths is None else None
    if lengths is None:
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)
    lengths = torch.clamp(lengths.to(device=device, dtype=torch.long), max=length)
    row_compressed = torch.clamp(compressed_counts(compression, lengths), max=num_compressed)
    zeros = torch.zeros_like(lengths)
    lay = ops.SeqLayout(zeros, lengths, zeros, row_compressed, length, num_compressed, False,
                        int(row_compressed.min()) if fewest is None else fewest)
    qk, kk = _kernel_inputs(q.detach(), compressed_k.detach())
    launch = ops.launch_choices(qk.shape[-1], query_heads // kv_heads)
    tiles = ops._Tiles(cfg, launch, query_heads // kv_heads)
    scale_log2 = softmax_scale(dim) * 1.4426950408889634
    if chunk is None:
        per_unit = batch * selecting * 3 * num_blocks
        chunk = max(1, KERNEL_CHUNK_ELEMENTS // max(1, per_unit)) * unit
    # Whole score-pass programs per chunk (tiles.tp_score tokens, a multiple of the unit).
    chunk = max(tiles.tp_score, (chunk // tiles.tp_score) * tiles.tp_score)
    chunk = min(chunk, -(-length // tiles.tp_score) * tiles.tp_score)
    pieces = []
    with torch.no_grad():
        lse = torch.empty(batch, query_heads, length, dtype=torch.float32, device=device)
        ops.compression_lse(qk, kk, None, lse, None, lay, cfg, launch, tiles, scale_log2)
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            units = -(-(stop - start) // unit)
            # Entries the kernel leaves unwritten (not candidates) are masked by choose_blocks.
            scores = torch.empty(batch, selecting, units, num_blocks, dtype=torch.float32, device=device)
            ops.block_scores(qk, kk, lse, scores, lay, cfg, launch, tiles, start, stop, scale_log2)
            first = torch.arange(start, stop, unit, device=device)
            chosen = choose_blocks(scores, first, selection)  # [B, Hs, u, width]
            started = first[None, :] < lengths[:, None]
            pieces.append(torch.where(started[:, None, :, None], chosen, torch.full_like(chosen, -1)))
    indices = torch.cat(pieces, dim=2)
    assert indices.shape[2] == num_units
    return SelectionResult(indices, unit, per_head, num_blocks)


def _logits(chunk_q: torch.Tensor, compressed: torch.Tensor, score_dtype: torch.dtype, group: int) -> torch.Tensor:
    """``q . K_i`` (unscaled) as ``[B, Hkv, G, c, N]`` in ``score_dtype``. On CUDA,
    half-precision inputs go through the tensor cores with a float32 result
    (exact products, float32 accumulation) where torch offers it."""
    batch, query_heads, rows, dim = chunk_q.shape
    kv_heads, num = compressed.shape[1], compressed.shape[2]
    a = chunk_q.reshape(batch * kv_heads, group * rows, dim)
    b = compressed.reshape(batch * kv_heads, num, dim).transpose(1, 2)
    if (a.is_cuda and score_dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16)
            and b.dtype == a.dtype and _MIXED_BMM.get("ok", True)):
        try:
            return torch.bmm(a, b, out_dtype=torch.float32).view(batch, kv_heads, group, rows, num)
        except (TypeError, RuntimeError, NotImplementedError):
            _MIXED_BMM["ok"] = False
    return torch.bmm(a.to(score_dtype), b.to(score_dtype)).view(batch, kv_heads, group, rows, num)


_MIXED_BMM: dict[str, bool] = {}


def _chunk_scores(logits: torch.Tensor, visible: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """Masked softmax -> Eq. 9 -> group sum -> tile sum for one chunk:
    ``[B, Hkv, G, c, N]`` logits, ``[B, c, N]`` visibility -> ``[B, Hs, c/unit, J]``."""
    block, stride, sel_block, num_blocks, group, unit, per_head, scale = geometry
    batch, kv_heads, _, rows, _ = logits.shape
    mask = visible[:, None, None]
    logits = torch.where(mask, logits * scale, torch.full_like(logits, float("-inf")))
    has_key = mask.any(dim=-1, keepdim=True)
    probabilities = torch.softmax(torch.where(has_key, logits, torch.zeros_like(logits)), dim=-1) * has_key
    scores = _eq9(probabilities, block, stride, sel_block, num_blocks)
    scores = scores.reshape(batch, kv_heads * group, rows, num_blocks) if per_head else scores.sum(dim=2)
    if unit > 1:
        scores = scores.view(batch, scores.shape[1], rows // unit, unit, num_blocks).sum(dim=3)
    return scores


_POST: dict[str, object] = {}


def _post_function(device):
    """The chunk post-processing: ``torch.compile``d on CUDA (one fused pass over
    the logits instead of several), plain elsewhere. A failed compile falls back
    to the plain function."""
    if torch.device(device).type != "cuda":
        return _chunk_scores
    if "fn" not in _POST:
        compiled = torch.compile(_chunk_scores, dynamic=False)

        def guarded(logits, visible, geometry):
            if _POST.get("failed"):
                return _chunk_scores(logits, visible, geometry)
            try:
                return compiled(logits, visible, geometry)
            except Exception as error:  # pragma: no cover - depends on the toolchain
                import warnings

                warnings.warn(f"nsaflex.scoring: compiled scoring failed ({type(error).__name__}: {error}); using eager torch")
                _POST["failed"] = True
                return _chunk_scores(logits, visible, geometry)

        _POST["fn"] = guarded
    return _POST["fn"]


def selection_bitmap(result: SelectionResult) -> torch.Tensor:
    """``[B, Hs, U, ceil(J/32)]`` int32: bit ``j % 32`` of word ``j // 32`` is set
    when the unit selected block ``j`` (what the selection ``mask_mod`` reads)."""
    indices = result.indices.long()
    batch, heads, units, _ = indices.shape
    words = max(1, -(-result.num_blocks // 32))
    valid = indices >= 0
    safe = torch.where(valid, indices, torch.zeros_like(indices))
    bit = torch.where(valid, torch.ones_like(safe) << (safe % 32), torch.zeros_like(safe))
    packed = torch.zeros(batch, heads, units, words, dtype=torch.int64, device=indices.device)
    # Distinct blocks of a unit have distinct bits, so adding them is an OR.
    packed.scatter_add_(3, safe // 32, bit)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def selected_mask(result: SelectionResult, length: int) -> torch.Tensor:
    """Dense bool ``[B, Hs, L, J]`` of the selection of every query (tests and small L only)."""
    indices = result.indices.long()
    batch, heads, units, _ = indices.shape
    out = torch.zeros(batch, heads, units, result.num_blocks + 1, dtype=torch.bool, device=indices.device)
    slot = torch.where(indices >= 0, indices, torch.full_like(indices, result.num_blocks))
    out.scatter_(3, slot, True)
    out = out[..., : result.num_blocks]
    return out.repeat_interleave(result.unit, dim=2)[:, :, :length]
