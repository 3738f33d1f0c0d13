"""Batched decode: new queries against a KV cache, every row and head at once.

Semantics (as :mod:`nsaflex.adapters.decode`): a new query at position ``p`` of
its row gets what the pattern gives the *last row* of the row's real tokens
``[0, p]`` (:func:`nsaflex.reference.reference_attention` on that prefix), so
decode continues a prefill token for token. Text queries of a hybrid pattern
(and every query of a dense pattern) attend densely to the row's real keys.

Layouts. ``q [B, Hq, T, D]`` holds the ``T >= 1`` new queries (usually one);
``k_cache, v_cache [B, Hkv, S, D]`` the cache (``S`` its capacity) with the new
keys already written: row ``b``'s new tokens are at slots
``lengths[b] - T .. lengths[b] - 1``, ``lengths [B]`` a device tensor. Slots
below that hold the row's earlier tokens, real or padding
(:attr:`DecodeState.real`). ``gates [B, Hq, T, nb]``, ``token_types [B, T]``
(0 text; 1 image or 2 video) of the new tokens.

What is kept between steps (:class:`DecodeState`, fixed shapes given a
capacity): which slots are real and which vision, the slot of every token of
the row's *sparse sequence* (its real tokens, or its vision tokens for
``vision_keys: vision``), and the compressed keys and values of the complete
compression blocks of that sequence. A step appends the new tokens and pools
the at most ``T // d + 1`` compression blocks they complete (gathered through
the slot map, masked by the per-row counts); nothing else of the cache is
re-read for the compression branch.

One step, per new query at sparse position ``t`` (all rows, heads and queries
in one set of tensor operations):

1. compression: softmax of ``q·K_i * scale`` over the visible compressed tokens
   (``i*d + l - 1 <= t``; ``videonsa_legacy``: the token ending at ``t``) ->
   ``o_cmp = p_cmp @ V``; ``p_cmp`` in the score dtype;
2. selection: NSA Eq. 9 block scores of ``p_cmp``
   (:func:`nsaflex.scoring.eq9_block_scores`), summed over the GQA group for
   ``scoring: group``; forced blocks plus the best complete blocks, ties to the
   lower index (as :func:`nsaflex.scoring.choose_blocks`: forced blocks rank
   at ``inf``, the others neither complete nor forced at ``-1``; ``torch.topk``
   on a unique key in float32, a stable sort in float64); one softmax over the
   ``s <= t`` tokens of the chosen blocks (``n * l'`` keys per query, not a
   mask over the cache);
3. window: one softmax over the last ``w`` tokens ``t - w < s <= t``;
4. ``out = sum_b gate_b * o_b``; text queries of a hybrid pattern take the
   dense attention over the real keys ``<= p`` instead.

Selection and window keys and values are gathered together, through the
slot map, as one candidate list per query; one product gives their logits
and one their outputs, each branch normalised over its own segment and
scaled by its gate. Index aranges, block bounds and views of the kept
tensors are built once per state (:meth:`DecodeState.constant`): a step on a
GPU is bound by its operator launches, each on a few thousand keys.

No ``.item()``, no host synchronisation and no Python loop over rows or
tokens: every shape depends on ``B, Hq, Hkv, T, D``, the capacity and the
pattern only, so a step can be captured in a CUDA graph (with a cache of fixed
capacity; a growing cache re-allocates the state when it outgrows it, a host
decision on shapes). Run one step of the state's shape before capturing, as
``torch.cuda.graphs`` asks: the first step builds the state's constants, and
built inside a capture they would be filled only when the graph replays.
Values are not checked (that would read them back): token
classes other than 0 count as vision, and the new tokens must lie inside the
cache (``T <= lengths[b] <= S``).

Cost per new query, ``n`` = length of the row's sparse sequence: ``O(N * D)``
for the compression branch (``N = n / d``), ``O(J log J)`` to rank the
``J = n / l'`` blocks, ``O(count * l' * D)`` for the selected blocks and
``O(w * D)`` for the window; text queries ``O(S * D)``. ``N`` and ``J`` are
counted over the state's capacity (masked beyond each row's length), which a
growing cache keeps within a quarter above its length.

``granularity: query_block``: a tile's shared selection is scored over the
tile's queries so far, each with its own visibility. A query's compression
probabilities never change once it is past (the compressed tokens it sees
exist already), so the state keeps their running sum over the current tile
(:attr:`DecodeState.tile_sum`, started from the prefix's queries by
:func:`start_state`); a step adds its new queries' probabilities tile by tile
(a ``[T, T]`` same-tile mask) and ranks each query's tile sum for the tile's
first position.

``videonsa_release`` (``release=True``; :mod:`nsaflex.reference_release`):
a query at sparse position ``t`` (its row holds ``T = t + 1`` tokens) gets the
reference's last row, each quirk as its decode equivalent:

* Q1/Q2: the state keeps the means of the *zeroed* keys and values of the
  complete blocks; the query's own block ``c = t // l`` is the mean of its
  ``t - c l + 1`` zeroed tokens so far (the partial last block), gathered per
  step. The last row sees only its own block, so ``o_cmp`` is that mean.
* Q3: text queries are zeroed for the sparse branches with gates 0.5; the
  dense pass (causal over every real key, vision queries zeroed) is added to
  every row.
* Q4: the sparse branches run on ``P`` slots ``[q, q, 0...]``, slot ``s`` on
  kv head ``s // (P / Hkv)``; head ``h`` is the mean of slots ``h``, ``Hq + h``.
* Q6: the selection of the last row reads ``lse.flatten()[t P + s]`` of the
  prefill's ``[P, T]`` buffer: slot ``(t P + s) // T`` at row ``(t P + s) %
  T``. For ``T >= P`` that is the last slot ``P - 1`` at rows ``T - P .. T -
  1``; shorter rows read the last ``ceil(P / T) + 1`` slots. Each of those
  values is the compression log-sum-exp of that slot's (zeroed) query at that
  row over the blocks it sees *in the current row of T tokens* (own and later
  blocks, Q1, the last one partial), so it changes as the row grows and
  cannot be carried over from the prefill: the state keeps the queries of the
  last ``P`` positions (:attr:`DecodeState.recent_q`) and a step recomputes the
  ``P`` values, ``O(P * Hkv * N * D)``.
* Q5: earlier blocks score ``sum_g exp(q_g . Kc_j * scale - lse_read[g])``
  over the kv head's slots (added in the same order for every block, so the
  exact ties of a text query's zero scores stay ties), the current block ``P /
  Hkv``; Q7: the top ``next_power_of_2(count)``, ties to the lower index;
  attention over the chosen blocks' zeroed tokens ``<= t``; the window over the
  last ``w`` zeroed tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from nsaflex.errors import InputError
from nsaflex.inputs import FLOAT_DTYPES
from nsaflex.pooling import MLPPooling, compress, softmax_scale
from nsaflex.reference_release import TEXT_GATE, padded_slots, selected_count
from nsaflex.scoring import default_score_dtype, eq9_block_scores, ranked_blocks, ranking_keys
from nsaflex.spec import Compression, Pattern, Selection


def unsupported(pattern: Pattern) -> str | None:
    """Why the batched decode cannot serve ``pattern`` (``None`` when it can)."""
    return None


def tiled(pattern: Pattern) -> bool:
    """Whether ``pattern`` selects per query tile (``granularity: query_block``)."""
    selection = pattern.selection
    return not pattern.dense and selection is not None and selection.granularity == "query_block"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decode computes and keeps compressed tokens in: float64 for
    float64 caches, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class DecodeState:
    """What one layer keeps between decode steps, per batch row (device tensors).

    Attributes:
        real: ``[B, C]`` bool, slot ``s`` holds a real token (``C``: capacity).
        vision: ``[B, C]`` bool, slot ``s`` holds a vision token.
        sparse_slots: ``[B, C + 1]`` long, the slot of the ``r``-th token of the
            row's sparse sequence (column ``C`` takes the writes of skipped tokens).
        sparse_count: ``[B]`` long, tokens in the row's sparse sequence.
        cmp_k, cmp_v: ``[B, Hkv, N + 1, D]`` compressed keys and values of the
            complete blocks of the sparse sequence (``N`` = compressed tokens of
            a sequence of ``C``; column ``N`` takes skipped writes); None
            without a compression branch.
        tile_sum: ``[B, Hq, N]`` (``query_block`` selection) the compression
            probabilities summed over the queries of the row's current tile so
            far, in the score dtype; None otherwise.
        tile_start: ``[B]`` long, the sparse position where that tile starts.
        release: ``videonsa_release`` numerics: the compressed tokens are
            means of the zeroed (vision-masked) keys and values.
        recent_q: ``[B, Hq, P, D]`` (release) the queries of the row's sparse
            positions ``n - P .. n - 1`` (zeros before the row's start).
        constants: what a step would otherwise rebuild every time (index
            aranges, block bounds, views of the kept tensors), by a key naming
            it and the shapes it depends on; emptied whenever the tensors above
            are replaced (:func:`reserve`, :meth:`reorder`).
    """

    real: torch.Tensor
    vision: torch.Tensor
    sparse_slots: torch.Tensor
    sparse_count: torch.Tensor
    cmp_k: torch.Tensor | None = None
    cmp_v: torch.Tensor | None = None
    tile_sum: torch.Tensor | None = None
    tile_start: torch.Tensor | None = None
    release: bool = False
    recent_q: torch.Tensor | None = None
    constants: dict[Hashable, torch.Tensor] = field(default_factory=dict, repr=False)

    def constant(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()`` the first time ``key`` is asked for, the same tensor
        after: a step then launches no op for it, and a CUDA graph captures no
        host-to-device copy."""
        value = self.constants.get(key)
        if value is None:
            value = self.constants[key] = build()
        return value

    @property
    def capacity(self) -> int:
        return self.real.shape[1]

    @property
    def batch(self) -> int:
        return self.real.shape[0]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows ``index [B']`` (a beam search's reordering of the cache)."""
        for name in ("real", "vision", "sparse_slots", "sparse_count", "cmp_k", "cmp_v", "tile_sum", "tile_start", "recent_q"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index.to(value.device)))
        self.constants.clear()


# --- checks (shapes, dtypes and devices only: values would need a read-back) --------------------


def _check_cache(k_cache: object, v_cache: object, lengths: object) -> None:
    for name, tensor in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(tensor, torch.Tensor):
            raise InputError(name, "a torch.Tensor", type(tensor).__name__)
        if tensor.dim() != 4 or 0 in tensor.shape:
            raise InputError(name, "a non-empty 4-d tensor [B, Hkv, S, D]", list(tensor.shape))
        if tensor.dtype not in FLOAT_DTYPES:
            raise InputError(name, "a floating dtype (float16, bfloat16, float32, float64)", str(tensor.dtype))
    assert isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise InputError("v_cache", f"shape {list(k_cache.shape)}, dtype and device of k_cache",
                         f"{list(v_cache.shape)} {v_cache.dtype} on {v_cache.device}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (k_cache.shape[0],) or lengths.is_floating_point():
        found = f"{list(lengths.shape)} {lengths.dtype}" if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise InputError("lengths", f"an integer tensor [{k_cache.shape[0]}] (tokens of each row in the cache)", found)
    if lengths.device != k_cache.device:
        raise InputError("lengths", f"device {k_cache.device} (as the cache)", str(lengths.device))


def _check_per_token(name: str, tensor: object, shape: tuple[int, ...], device: torch.device, floating: bool) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise InputError(name, "a torch.Tensor", type(tensor).__name__)
    if tuple(tensor.shape) != shape:
        raise InputError(name, f"shape {list(shape)}", list(tensor.shape))
    if tensor.is_floating_point() != floating or tensor.is_complex():
        raise InputError(name, "a floating tensor" if floating else "an integer or bool tensor", str(tensor.dtype))
    if tensor.device != device:
        raise InputError(name, f"device {device} (as the cache)", str(tensor.device))


def check_step(pattern: Pattern, state: object, q: object, k_cache: torch.Tensor, v_cache: torch.Tensor,
               lengths: torch.Tensor, gates: object, token_types: object) -> None:
    """Refuse a decode step whose tensors do not fit the pattern, the cache or the state."""
    _check_cache(k_cache, v_cache, lengths)
    batch, kv_heads, slots, dim = k_cache.shape
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise InputError("q", "a 4-d tensor [B, Hq, T, D] of new queries", list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__)
    if q.shape[0] != batch or q.shape[3] != dim or q.shape[1] % kv_heads or q.shape[2] == 0 or q.shape[1] == 0:
        raise InputError("q", f"[{batch}, a multiple of {kv_heads}, T >= 1, {dim}] (batch, kv heads and head dim of the cache)", list(q.shape))
    if q.shape[2] > slots:
        raise InputError("q", f"at most {slots} new queries (the cache's slots)", q.shape[2])
    if q.dtype != k_cache.dtype or q.device != k_cache.device:
        raise InputError("q", f"dtype {k_cache.dtype} on {k_cache.device} (as the cache)", f"{q.dtype} on {q.device}")
    model = pattern.model
    for name, expected, found in (("q", model.query_heads, q.shape[1]), ("k_cache", model.kv_heads, kv_heads), ("q", model.head_dim, dim)):
        if expected is not None and expected != found:
            raise InputError(name, f"{expected} (pattern model section)", found)
    if not isinstance(state, DecodeState) or state.batch != batch:
        raise InputError("state", f"a DecodeState of {batch} rows (from decode_state over this cache)",
                         f"{state.batch} rows" if isinstance(state, DecodeState) else type(state).__name__)
    if (state.cmp_k is not None) and (state.cmp_k.shape[1] != kv_heads or state.cmp_k.shape[3] != dim or state.cmp_k.device != q.device):
        raise InputError("state", f"compressed tokens of {kv_heads} kv heads of dim {dim} on {q.device}", list(state.cmp_k.shape))
    if tiled(pattern) and (state.tile_sum is None or state.tile_sum.shape[1] != q.shape[1]):
        raise InputError("state", f"tile sums of {q.shape[1]} query heads (decode_state with the cached queries)",
                         "none" if state.tile_sum is None else list(state.tile_sum.shape))
    branches = len(pattern.branches)
    shape = (batch, q.shape[1], q.shape[2], branches)
    _check_per_token("gates", gates, shape, q.device, floating=True)
    if gates is None and branches and pattern.gate.kind != "constant":
        raise InputError("gates", f"a tensor {list(shape)} for gate kind {pattern.gate.kind!r}", None)
    _check_per_token("token_types", token_types, (batch, q.shape[2]), q.device, floating=False)
    if pattern.hybrid is not None and token_types is None:
        raise InputError("token_types", f"classes [{batch}, {q.shape[2]}] of the new tokens for a hybrid pattern", None)


# --- the state --------------------------------------------------------------------------------


def _num_tokens(pattern: Pattern, length: int) -> int:
    return pattern.compression.num_tokens(length) if pattern.compression is not None else 0


def _empty_state(pattern: Pattern, batch: int, kv_heads: int, dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> DecodeState:
    flags = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
    state = DecodeState(
        real=flags, vision=flags.clone(),
        sparse_slots=torch.zeros(batch, capacity + 1, dtype=torch.long, device=device),
        sparse_count=torch.zeros(batch, dtype=torch.long, device=device),
    )
    if pattern.compression is not None and not pattern.dense:
        tokens = _num_tokens(pattern, capacity) + 1
        state.cmp_k = torch.zeros(batch, kv_heads, tokens, dim, dtype=dtype, device=device)
        state.cmp_v = torch.zeros_like(state.cmp_k)
    return state


def reserve(state: DecodeState, pattern: Pattern, capacity: int) -> None:
    """Grow ``state`` to hold at least ``capacity`` slots, by a quarter at least:
    a cache growing by one token re-allocates rarely, and the masked work over
    unused capacity (compressed tokens, block scores) stays within 25%."""
    old = state.capacity
    if capacity <= old:
        return
    new = max(capacity, old + old // 4 + 1)
    pad = new - old
    state.constants.clear()
    state.real = F.pad(state.real, (0, pad))
    state.vision = F.pad(state.vision, (0, pad))
    state.sparse_slots = F.pad(state.sparse_slots[:, :old], (0, pad + 1))
    if state.cmp_k is not None:
        tokens = _num_tokens(pattern, old)
        extra = _num_tokens(pattern, new) + 1 - tokens
        state.cmp_k = F.pad(state.cmp_k[:, :, :tokens], (0, 0, 0, extra))
        state.cmp_v = F.pad(state.cmp_v[:, :, :tokens], (0, 0, 0, extra))
    if state.tile_sum is not None:
        state.tile_sum = F.pad(state.tile_sum, (0, _num_tokens(pattern, new) - state.tile_sum.shape[2]))


def _vision_only(pattern: Pattern) -> bool:
    """Whether only vision tokens enter the sparse sequence (else every real token)."""
    return pattern.hybrid is not None and pattern.hybrid.vision_keys == "vision"


def _sparse(pattern: Pattern, vision: torch.Tensor) -> torch.Tensor:
    """Which of the (real) tokens with classes ``vision`` enter the sparse sequence."""
    return vision if _vision_only(pattern) else torch.ones_like(vision)


def _arange(state: DecodeState, name: str, size: int, start: int = 0) -> torch.Tensor:
    """``arange(start, start + size)`` on the state's device, built once (a
    name per use: the tensors a step builds do not depend on which sizes meet)."""
    return state.constant((name, start, size), lambda: torch.arange(start, start + size, device=state.real.device))


def _index(state: DecodeState, name: str, size: int, dims: int, at: int, divisor: int = 1) -> torch.Tensor:
    """``arange(size) // divisor`` viewed along dim ``at`` of ``dims`` (ones elsewhere):
    the batch or head index of an advanced-indexing gather, built once."""
    shape = [1] * dims
    shape[at] = size
    return state.constant((name, size, dims, at, divisor),
                          lambda: (torch.arange(size, device=state.real.device) // divisor).view(shape))


def _count_column(state: DecodeState) -> torch.Tensor:
    """``sparse_count`` viewed ``[B, 1]`` (a view: in-place updates show through)."""
    return state.constant("count column", lambda: state.sparse_count.view(-1, 1))


def _append(state: DecodeState, pattern: Pattern, slots: torch.Tensor, real: torch.Tensor | None,
            vision: torch.Tensor) -> torch.Tensor:
    """Record the tokens at ``slots [B, T]`` (in order; real where ``real``,
    None: all); returns each one's sparse position ``[B, T]`` (for a token
    outside the sparse sequence: the position of the last sparse token before
    it, ``-1`` if none)."""
    if real is None:
        state.real.scatter_(1, slots, True)
        state.vision.scatter_(1, slots, vision)
        sparse = vision if _vision_only(pattern) else None
    else:
        state.real.scatter_(1, slots, real)
        state.vision.scatter_(1, slots, vision & real)
        sparse = vision & real if _vision_only(pattern) else real
    count = _count_column(state)
    if sparse is None:  # every new token enters: positions count .. count + T - 1
        rank = count + _arange(state, "new positions", slots.shape[1])
        state.sparse_slots.scatter_(1, rank, slots)
        state.sparse_count.add_(slots.shape[1])
        return rank
    rank = torch.cumsum(sparse, dim=1).add_(count).sub_(1)
    state.sparse_slots.scatter_(1, torch.where(sparse, rank, state.capacity), slots)
    state.sparse_count.add_(sparse.sum(dim=1))
    return rank


def _pool_new_blocks(state: DecodeState, pattern: Pattern, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     most_new: int, pooler: MLPPooling | None) -> None:
    """Pool the compression blocks completed by the last ``most_new`` tokens
    at most of each row: the last ``most_new // d + 1`` complete ones (those
    complete before are pooled again to the same values, which needs no count
    from before the step); candidates before the row's first block go to the
    spare column."""
    compression = pattern.compression
    block, stride = compression.block, compression.stride
    limit = state.cmp_k.shape[2] - 1  # compressed tokens the capacity holds
    candidates = min(most_new // stride + 1, limit)
    if candidates <= 0:
        return
    batch, kv_heads = state.cmp_k.shape[:2]
    dtype = state.cmp_k.dtype
    # floor((n - l) / d) + 1 complete compressed tokens; the candidates start `candidates` before
    first = torch.div(state.sparse_count + (stride - block - candidates * stride), stride, rounding_mode="floor")
    first = first.view(batch, 1, 1)
    span = torch.add(_arange(state, "pooled span", (candidates - 1) * stride + block), first, alpha=stride)  # [B, 1, P]
    # Positions below 0 wrap to the end of the slot map: still cache slots, and pooled into the spare column.
    slots = state.sparse_slots[_index(state, "batch", batch, 3, 0), span]
    heads = _index(state, "heads", kv_heads, 3, 1)
    keys = _as(k_cache[_index(state, "batch", batch, 3, 0), heads, slots], dtype)  # [B, Hkv, P, D]
    values = _as(v_cache[_index(state, "batch", batch, 3, 0), heads, slots], dtype)
    if state.release:  # Q2: text keys and values are zeroed, not left out of the means
        vision = state.vision.gather(1, slots[:, 0])[:, None, :, None].to(dtype)
        keys, values = keys * vision, values * vision
    if compression.pooling == "mean" and candidates <= 4:
        # A step's few blocks: one product with the [candidates, P] averaging matrix (a prefix's
        # thousands would make that matrix quadratic in its length; they take the unfold).
        average = state.constant(("average", candidates), lambda: _averaging(compression, candidates, dtype, keys.device))
        new_k, new_v = torch.matmul(average, keys), torch.matmul(average, values)
    else:
        new_k, new_v = compress(keys, values, compression, pooler)  # [B, Hkv, candidates, D]
    index = (first + _arange(state, "pooled blocks", candidates)).clamp_(min=-1)  # [B, 1, candidates]; -1: the spare column
    target = (_index(state, "batch", batch, 3, 0), heads, index)
    state.cmp_k.index_put_(target, _as(new_k, dtype))
    state.cmp_v.index_put_(target, _as(new_v, dtype))


def _averaging(compression: Compression, tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[N, (N - 1) d + l]``: row ``i`` averages the ``l`` tokens ``i*d ..
    i*d + l - 1`` (mean pooling as a matrix product)."""
    span = (tokens - 1) * compression.stride + compression.block
    offset = torch.arange(span, device=device)[None, :] - compression.stride * torch.arange(tokens, device=device)[:, None]
    return ((offset >= 0) & (offset < compression.block)).to(dtype) / compression.block


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, with no op when it is already."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _extend(state: DecodeState, pattern: Pattern, k_cache: torch.Tensor, v_cache: torch.Tensor,
            lengths: torch.Tensor, new_tokens: int, token_types: torch.Tensor | None,
            pooler: MLPPooling | None, new_real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`extend_state`, also returning the new tokens' cache slots and
    vision classes ``[B, T]``."""
    reserve(state, pattern, k_cache.shape[2])
    slots = lengths.view(-1, 1) + _arange(state, "new slots", new_tokens, -new_tokens)
    vision = torch.zeros_like(slots, dtype=torch.bool) if token_types is None else token_types != 0
    rank = _append(state, pattern, slots, None if new_real is None else new_real.to(torch.bool), vision)
    if state.cmp_k is not None:
        _pool_new_blocks(state, pattern, k_cache, v_cache, new_tokens, pooler)
    return rank, slots, vision


def extend_state(state: DecodeState, pattern: Pattern, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 lengths: torch.Tensor, new_tokens: int, token_types: torch.Tensor | None = None,
                 pooler: MLPPooling | None = None, new_real: torch.Tensor | None = None) -> torch.Tensor:
    """Append the ``new_tokens`` tokens at slots ``lengths - new_tokens ..
    lengths - 1`` (classes ``token_types [B, T]``, real where ``new_real``,
    default all) and pool the blocks they complete. Returns their sparse
    positions ``[B, T]`` (see :func:`_append`)."""
    return _extend(state, pattern, k_cache, v_cache, lengths, new_tokens, token_types, pooler, new_real)[0]


def start_state(pattern: Pattern, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                token_types: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                pooler: MLPPooling | None = None, capacity: int | None = None, queries: torch.Tensor | None = None,
                score_dtype: torch.dtype | None = None, *, release: bool = False) -> DecodeState:
    """The state of rows whose first ``lengths [B]`` slots are cached (classes
    ``token_types [B, S]``, real where ``key_valid [B, S]``, default all): the
    whole prefix appended at once, its complete blocks pooled. ``queries [B,
    Hq, S, D]``: the queries of the cached tokens, needed by ``query_block``
    selection (only the current tile's are read), kept as their summed
    compression probabilities in ``score_dtype`` (None: the device's default).
    ``release``: ``videonsa_release`` numerics; ``queries`` is then required too
    (the last ``P`` of each row's are kept, :attr:`DecodeState.recent_q`)."""
    _check_cache(k_cache, v_cache, lengths)
    batch, kv_heads, slots, dim = k_cache.shape
    for name, tensor in (("token_types", token_types), ("key_valid", key_valid)):
        _check_per_token(name, tensor, (batch, slots), k_cache.device, floating=False)
    if tiled(pattern) or release:
        if not isinstance(queries, torch.Tensor) or queries.dim() != 4 or queries.shape[0] != batch \
                or queries.shape[2] != slots or queries.shape[3] != dim or queries.shape[1] % kv_heads:
            found = list(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            why = ("videonsa_release selection reads the compression log-sum-exp of the last P positions" if release
                   else "query_block selection sums the current tile's scores")
            raise InputError("queries", f"the cached tokens' queries [{batch}, Hq, {slots}, {dim}] ({why})", found)
        if not queries.is_floating_point() or queries.device != k_cache.device:
            raise InputError("queries", f"a floating tensor on {k_cache.device}", f"{queries.dtype} on {queries.device}")
    capacity = slots if capacity is None else max(int(capacity), slots)
    state = _empty_state(pattern, batch, kv_heads, dim, capacity, compute_dtype(k_cache.dtype), k_cache.device)
    state.release = release
    positions = torch.arange(slots, device=k_cache.device)
    real = positions[None, :] < lengths.to(torch.long)[:, None]
    if key_valid is not None:
        real &= key_valid.to(torch.bool)
    full = torch.full_like(lengths, slots)
    extend_state(state, pattern, k_cache, v_cache, full, slots, token_types, pooler, new_real=real)
    state.constants.clear()  # the prefix's aranges are as long as the cache; a step builds its own
    if tiled(pattern):
        _start_tile(state, pattern, queries, softmax_scale(dim),
                    default_score_dtype(k_cache.device, k_cache.dtype) if score_dtype is None else score_dtype)
    if release and not pattern.dense:
        query_heads = queries.shape[1]
        position = state.sparse_count[:, None] - padded_slots(query_heads, kv_heads) + torch.arange(
            padded_slots(query_heads, kv_heads), device=k_cache.device)  # [B, P]
        slot = state.sparse_slots.gather(1, position.clamp(0, state.capacity - 1))
        rows = queries.gather(2, slot[:, None, :, None].expand(-1, query_heads, -1, dim)).to(state.cmp_k.dtype)
        state.recent_q = rows * (position >= 0)[:, None, :, None]
    return state


def _start_tile(state: DecodeState, pattern: Pattern, queries: torch.Tensor, scale: float, score_dtype: torch.dtype) -> None:
    """The summed compression probabilities of each row's current tile: the
    queries at sparse positions ``a .. n - 1`` (``a`` the last multiple of
    ``m`` at or below the row's ``n`` sparse tokens)."""
    batch, query_heads, _, dim = queries.shape
    kv_heads = state.cmp_k.shape[1]
    tile = pattern.selection.query_block
    start = torch.div(state.sparse_count, tile, rounding_mode="floor") * tile
    position = start[:, None] + torch.arange(tile, device=start.device)  # [B, m]
    slots = state.sparse_slots.gather(1, position.clamp(max=state.capacity - 1))
    rows = queries.gather(2, slots[:, None, :, None].expand(-1, query_heads, -1, dim)).to(state.cmp_k.dtype)
    grouped = rows.view(batch, kv_heads, query_heads // kv_heads, tile, dim).to(score_dtype) * scale
    last = _compressed_last(pattern.compression, state.cmp_k.shape[2] - 1, start.device)
    hidden = _hidden_compressed(pattern.compression, last, position.view(batch, 1, 1, tile, 1))
    probabilities = _compression_probabilities(grouped, _as(state.cmp_k[:, :, :-1], score_dtype), hidden)
    seen = (position < state.sparse_count[:, None])[:, None, None, :, None]
    state.tile_sum = (probabilities * seen).sum(dim=3).reshape(batch, query_heads, probabilities.shape[-1])
    state.tile_start = start


def _compressed_last(compression: Compression, tokens: int, device: torch.device) -> torch.Tensor:
    """``[N]`` the sparse position of each compressed token's last token, ``i*d + l - 1``."""
    return torch.arange(tokens, device=device) * compression.stride + (compression.block - 1)


def _hidden_compressed(compression: Compression, last: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Which compressed tokens ending at ``last [N]`` a query at ``position``
    (broadcast against ``last``) does not see: those not complete within its
    prefix (``videonsa_legacy``: all but the one ending at the query)."""
    return last > position if compression.visibility == "causal" else last != position


def _compression_probabilities(grouped: torch.Tensor, cmp_k: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``p_cmp [B, Hkv, G, T, N]``: the softmax of ``grouped [B, Hkv, G, T, D]``
    (scaled queries, in the score dtype) against ``cmp_k [B, Hkv, N, D]`` over
    the compressed tokens ``hidden`` (broadcast to ``[B, 1, 1, T, N]``) does not
    mask; a query that sees none gets zeros (its softmax of ``-inf`` only is
    NaN, then filled)."""
    logits = torch.einsum("bkgtd,bknd->bkgtn", grouped, cmp_k).masked_fill_(hidden, float("-inf"))
    return torch.softmax(logits, dim=-1).masked_fill_(hidden, 0.0)


# --- the step -----------------------------------------------------------------------------------


def _dense(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, state: DecodeState,
           slots: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention of ``q [B, Hq, T, D]`` (at cache ``slots [B, T]``) over
    the real keys at or before its own slot: ``[B, Hq, T, D]`` in q's dtype. Half
    precision caches are read in their own dtype (SDPA, as the unpatched model)."""
    length = k_cache.shape[2]
    positions = _arange(state, "cache slots", length)
    real = state.constant(("real", length), lambda: state.real[:, None, None, :length])  # a view: [B, 1, 1, S]
    mask = real & (positions <= slots.view(*slots.shape[:1], 1, -1, 1))  # [B, 1, T, S]
    dtype = k_cache.dtype if k_cache.dtype in (torch.float16, torch.bfloat16) else q.dtype
    out = F.scaled_dot_product_attention(_as(q, dtype), _as(k_cache, dtype), _as(v_cache, dtype), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return _as(out, q.dtype)


def decode_step(
    pattern: Pattern,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    state: DecodeState,
    gates: torch.Tensor | None = None,
    token_types: torch.Tensor | None = None,
    pooler: MLPPooling | None = None,
    *,
    scale: float | None = None,
    score_dtype: torch.dtype | None = None,
    has_text: bool = True,
    release: bool = False,
) -> torch.Tensor:
    """Outputs ``[B, Hq, T, D]`` (dtype of q) of the new queries ``q`` (layouts
    in the module docstring); ``state`` is extended with the new tokens.

    ``scale`` multiplies every score ``q·k`` (None: ``1/sqrt(D)``);
    ``score_dtype`` is the dtype blocks are ranked in (None:
    :func:`nsaflex.scoring.default_score_dtype`). ``has_text=False`` (hybrid
    patterns): the caller knows every new token is a vision token, so the
    dense path over the whole cache is skipped (deciding it here would read
    the classes back). ``release``: the ``videonsa_release`` numerics (a state
    from :func:`start_state` with ``release=True``; every query adds the dense
    pass, so ``has_text`` is not read)."""
    reason = unsupported(pattern)
    if reason is not None:
        raise InputError("pattern", "a pattern the batched decode serves", reason)
    check_step(pattern, state, q, k_cache, v_cache, lengths, gates, token_types)
    if release != state.release or (release and not pattern.dense and state.recent_q is None):
        raise InputError("state", f"a DecodeState started with release={release} (decode_state of this attention)",
                         f"release={state.release}")
    new, dim = q.shape[2], q.shape[3]
    scale = softmax_scale(dim) if scale is None else scale
    dtype = compute_dtype(q.dtype)
    score_dtype = default_score_dtype(q.device, q.dtype) if score_dtype is None else score_dtype
    with torch.no_grad():
        rank, slots, vision = _extend(state, pattern, k_cache, v_cache, lengths, new, token_types, pooler, None)
        query = _as(q, dtype)
        if pattern.dense:
            return _as(_dense(query, k_cache, v_cache, state, slots, scale), q.dtype)
        if release:
            return _as(_release_step(pattern, query, k_cache, v_cache, state, rank, slots, vision, gates, scale,
                                     score_dtype), q.dtype)
        sparse_out = _sparse_outputs(pattern, query, k_cache, v_cache, state, rank, vision, gates, scale, score_dtype)
        if pattern.hybrid is None or not has_text:
            return _as(sparse_out, q.dtype)
        dense_out = _dense(query, k_cache, v_cache, state, slots, scale)
        return torch.where(vision[:, None, :, None], sparse_out, dense_out).to(q.dtype)


def _tile_sums(state: DecodeState, tile: int, position: torch.Tensor, sparse: torch.Tensor,
               probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each new query's tile: its first position ``[B, T]`` and the compression
    probabilities ``[B, Hkv, G, T, N]`` summed over the tile's queries up to it
    (the kept sum where the tile began before this step, then the new sparse
    queries of the same tile, in order). The state then keeps the sum of the
    last new sparse query's tile."""
    batch, kv_heads, group, new, tokens = probabilities.shape
    first = torch.div(position, tile, rounding_mode="floor") * tile  # [B, T]
    order = torch.arange(new, device=position.device)
    same = (order[None, None, :] <= order[None, :, None]) & sparse[:, None, :] & (first[:, None, :] == first[:, :, None])
    summed = torch.einsum("bij,bkgjn->bkgin", same.to(probabilities.dtype), probabilities * sparse[:, None, None, :, None])
    kept = state.tile_sum.to(probabilities.dtype).view(batch, kv_heads, group, 1, tokens)
    summed = summed + kept * (first == state.tile_start[:, None])[:, None, None, :, None]
    last = (sparse.long() * (order + 1)).argmax(dim=1)  # the last new sparse query (0 if none)
    any_sparse = sparse.any(dim=1)
    latest = summed.gather(3, last.view(batch, 1, 1, 1, 1).expand(-1, kv_heads, group, 1, tokens))
    state.tile_sum.copy_(torch.where(any_sparse[:, None, None], latest.view(batch, kv_heads * group, tokens).to(state.tile_sum.dtype), state.tile_sum))
    state.tile_start.copy_(torch.where(any_sparse, first.gather(1, last[:, None])[:, 0], state.tile_start))
    return first, summed


def _sparse_outputs(pattern: Pattern, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    state: DecodeState, rank: torch.Tensor, vision: torch.Tensor, gates: torch.Tensor | None,
                    scale: float, score_dtype: torch.dtype) -> torch.Tensor:
    """The gated mix of the branches ``[B, Hq, T, D]`` for queries at sparse
    positions ``rank [B, T]`` (``vision [B, T]``: classes of the new tokens).

    Selection and window attend to one gathered candidate list per query,
    ``[chosen blocks' tokens | window tokens]`` (a ``[B, Hs, 1, T, C]`` index,
    ``Hs`` the selecting heads), with one logit product and one product with
    the values; each branch keeps its own softmax over its segment, times its
    gate. The compression branch adds ``gate * p_cmp @ V`` (``[N, D]`` values
    per kv head, shared by its queries)."""
    batch, query_heads, new, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = query_heads // kv_heads
    dtype = q.dtype
    scaled = q * scale
    grouped = scaled.view(batch, kv_heads, group, new, dim)
    position = rank.clamp(min=0)  # a query always has its own token (rank >= 0) where its output is used
    at = position.view(batch, 1, 1, new, 1)
    per_head = pattern.selection is not None and pattern.selection.scoring == "head"

    def gate_of(layout: tuple[int, int]) -> dict[str, torch.Tensor | float]:
        """Each branch's gate ``[B, H, g, T, 1]`` for heads in ``layout (H, g)``."""
        if gates is None:  # constant gates as Python floats: no host-to-device copy inside a captured graph
            return dict(zip(pattern.branches, pattern.gate.values))
        shaped = _as(gates, dtype).reshape(batch, *layout, new, -1)
        return dict(zip(pattern.branches, torch.split(shaped, 1, dim=-1)))

    gate = gate_of((kv_heads, group))
    out = None
    segments: list[tuple[str, torch.Tensor]] = []  # (branch, candidate positions [B, Hs | 1, 1, T, c])
    heads, q_sel, sel_gate = _index(state, "heads", kv_heads, 5, 1), grouped, gate
    if pattern.compression is not None:
        compression = pattern.compression
        tokens = state.cmp_k.shape[2] - 1
        cmp_k = state.constant("cmp_k", lambda: state.cmp_k[:, :, :-1])  # views: the spare column left out
        cmp_v = state.constant("cmp_v", lambda: state.cmp_v[:, :, :-1, None].transpose(2, 3))  # [B, Hkv, 1, N, D]
        last = state.constant("compressed last", lambda: _compressed_last(compression, tokens, q.device))
        hidden = _hidden_compressed(compression, last, at)  # [B, 1, 1, T, N]
        scored = grouped if score_dtype == dtype else q.to(score_dtype).view(grouped.shape) * scale
        probabilities = _compression_probabilities(scored, _as(cmp_k, score_dtype), hidden)
        out = torch.matmul(_as(probabilities, dtype) * gate["compression"], cmp_v)  # [B, Hkv, G, T, D]
        if pattern.selection is not None:
            selection = pattern.selection
            first = at
            if tiled(pattern):
                first, probabilities = _tile_sums(state, selection.query_block, position, _sparse(pattern, vision),
                                                  probabilities)
                first = first.view(at.shape)
            num_blocks = -(-state.capacity // selection.block)
            scores = eq9_block_scores(probabilities, compression, selection, num_blocks)  # [B, Hkv, G, T, J]
            if per_head:
                scores = scores.reshape(batch, query_heads, 1, new, num_blocks)
                heads = _index(state, "heads", query_heads, 5, 1, group)
                q_sel = scaled.view(batch, query_heads, 1, new, dim)
                sel_gate = gate_of((query_heads, 1))
            else:
                scores = scores.sum(dim=2, keepdim=True)
            segments.append(("selection", _chosen_tokens(state, selection, scores, first, exact=not tiled(pattern))))
    if pattern.window is not None:
        size = pattern.window.size
        segments.append(("window", at + _window_offsets(state, size, heads.shape[1])))  # [B, Hs, 1, T, w]
    if segments:
        selected = _segment_attention(state, q_sel, heads, k_cache, v_cache, at, segments, sel_gate,
                                      empty=pattern.selection is not None and "current" not in pattern.selection.forced)
        if per_head:
            selected = selected.reshape(batch, kv_heads, group, new, dim)
        out = selected if out is None else out + selected
    return out.reshape(batch, query_heads, new, dim)


def _chosen_tokens(state: DecodeState, selection: Selection, scores: torch.Tensor, first: torch.Tensor,
                   exact: bool) -> torch.Tensor:
    """Sparse positions ``[B, Hs, 1, T, n*l']`` of the tokens of the blocks
    chosen from ``scores [B, Hs, 1, T, J]`` for units whose first query is at
    ``first [B, 1, 1, T, 1]``. Forced blocks rank above every score
    (``inf``), blocks that are neither complete nor forced below (``-1``; the
    scores are non-negative), so the top ``n`` are the forced ones and the
    best complete ones, ties to the lower index (:func:`_top_blocks`). Where
    fewer blocks are eligible, the rest must come out past the query's
    position (masked): with ``current`` forced (and ``exact``: the unit is the
    query itself) they are later blocks already, else they are moved there."""
    block, num_blocks = selection.block, scores.shape[-1]
    take = min(selection.count, num_blocks)
    # d = last token of block j - first query: complete iff d <= 0, current iff 0 <= d < l'.
    ends = state.constant(("block ends", block, num_blocks),
                          lambda: torch.arange(num_blocks, device=scores.device) * block + (block - 1))
    distance = ends - first  # [B, 1, 1, T, J]
    forced = selection.forced
    if "current" in forced:
        key = scores.masked_fill(distance >= 0, float("inf")).masked_fill_(distance >= block, -1.0)
    else:
        key = scores.masked_fill(distance > 0, -1.0)
    if "previous" in forced:
        key.masked_fill_((distance < 0) & (distance >= -block), float("inf"))
    if "first" in forced:
        key.masked_fill_(state.constant(("first block", num_blocks), lambda: _arange(state, "blocks", num_blocks) == 0),
                         float("inf"))
    hide = not ("current" in forced and exact)
    blocks, missing = _top_blocks(state, key, take, missing=hide)
    if missing is not None:
        blocks = blocks.masked_fill(missing, num_blocks)
    return torch.add(_arange(state, "block tokens", block), blocks[..., None], alpha=block).flatten(-2)


def _window_offsets(state: DecodeState, size: int, heads: int) -> torch.Tensor:
    """``[1, H, 1, 1, w]`` the window's offsets ``1 - w .. 0`` from a query's
    position (t - w < s <= t), expanded over ``heads`` (a view, built once)."""
    return state.constant(("window", size, heads),
                          lambda: _arange(state, "window", size, 1 - size).view(1, 1, 1, 1, size).expand(1, heads, 1, 1, size))


def _top_blocks(state: DecodeState, key: torch.Tensor, take: int,
                missing: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``take`` largest of ``key [..., J]`` (non-negative scores; ``inf``
    forced, ``-1`` not eligible), ties to the lower index: their indices
    ``[..., take]`` and, with ``missing``, where no eligible block was left
    (else None). float32: ``torch.topk`` on :func:`nsaflex.scoring.ranking_keys`
    (a softmax's sums never give -0.0); else a stable sort."""
    num_blocks = key.shape[-1]
    if key.dtype == torch.float32:
        reverse = state.constant(("reverse", num_blocks), lambda: (num_blocks - 1) - torch.arange(num_blocks, device=key.device))
        top = torch.topk(ranking_keys(key, reverse), take, dim=-1).values
        return ranked_blocks(top, num_blocks), top < 0 if missing else None
    ranked = torch.sort(key, dim=-1, descending=True, stable=True)
    return ranked.indices[..., :take], ranked.values[..., :take] < 0 if missing else None


def _segment_attention(state: DecodeState, q: torch.Tensor, heads: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, at: torch.Tensor, segments: list[tuple[str, torch.Tensor]],
                       gate: dict[str, torch.Tensor | float], empty: bool, weighted: bool = False) -> torch.Tensor:
    """``sum_b gate_b * softmax_b(q . K) @ V`` ``[B, Hs, g, T, D]`` of the scaled
    queries ``q [B, Hs, g, T, D]`` over the cache keys of each branch's
    candidate positions ``[B, Hs | 1, 1, T, c_b]`` in the sparse sequence (kv
    heads ``heads [1, Hs, 1, 1, 1]``), those outside ``0 .. at`` masked. The
    branches' candidates are gathered together; each branch's softmax runs on
    its own segment. ``empty``: a branch may keep no candidate (zeros then).
    ``weighted`` (release mode): text keys and values are zeroed, yet take
    part in the softmax (logit 0)."""
    names = [name for name, _ in segments]
    positions = [candidates if candidates.shape[1] == heads.shape[1] else candidates.expand(-1, heads.shape[1], -1, -1, -1)
                 for _, candidates in segments]
    positions = positions[0] if len(positions) == 1 else torch.cat(positions, dim=-1)  # [B, Hs, 1, T, C]
    # Masked candidates read the query's own token (a written slot) instead: in range, never NaN.
    safe = torch.minimum(positions.clamp(min=0), at)
    hidden = safe != positions
    batch = _index(state, "batch", positions.shape[0], 5, 0)
    slots = state.sparse_slots[batch, safe]
    keys = _as(k_cache[batch, heads, slots], q.dtype)  # [B, Hs, 1, T, C, D]
    values = _as(v_cache[batch, heads, slots], q.dtype)
    logits = torch.einsum("bsgtd,bsotcd->bsgtc", q, keys)
    weights = state.vision[batch, slots].to(q.dtype) if weighted else None
    if weights is not None:  # a zeroed key: q . 0 = 0
        logits.mul_(weights)
    logits.masked_fill_(hidden, float("-inf"))
    if len(segments) == 1:
        probabilities = torch.softmax(logits, dim=-1).mul_(gate[names[0]])
    else:
        parts = torch.split(logits, [candidates.shape[-1] for _, candidates in segments], dim=-1)
        probabilities = torch.cat([torch.softmax(part, dim=-1).mul_(gate[name]) for part, name in zip(parts, names)], dim=-1)
    if empty:
        probabilities.masked_fill_(hidden, 0.0)
    if weights is not None:  # a zeroed value
        probabilities.mul_(weights)
    return torch.einsum("bsgtc,bsotcd->bsgtd", probabilities, values)


# --- videonsa_release ------------------------------------------------------------------------


def _zero_slots(state: DecodeState, like: torch.Tensor, count: int) -> torch.Tensor:
    """Zeros ``[B, count, ...]`` shaped as ``like [B, H, ...]`` past dim 1 (Q4's
    padding slots), built once: read by ``torch.cat``, never written."""
    shape = (like.shape[0], count, *like.shape[2:])
    return state.constant(("zero slots", shape, like.dtype), lambda: like.new_zeros(shape))


def _release_step(pattern: Pattern, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, state: DecodeState,
                  rank: torch.Tensor, slots: torch.Tensor, vision: torch.Tensor, gates: torch.Tensor | None, scale: float,
                  score_dtype: torch.dtype) -> torch.Tensor:
    """The ``videonsa_release`` outputs ``[B, Hq, T, D]`` of the new queries ``q``
    at sparse positions ``rank [B, T]`` (cache ``slots [B, T]``, classes
    ``vision [B, T]``), each the last row of
    :func:`nsaflex.reference_release.release_row` on its row's ``t + 1`` tokens
    (the quirks' decode equivalents in the module docstring). ``state`` already
    holds the new tokens; its :attr:`DecodeState.recent_q` moves on by ``T``."""
    batch, heads, new, dim = q.shape
    kv_heads = k_cache.shape[1]
    block = pattern.compression.block
    slots_total = padded_slots(heads, kv_heads)
    group = slots_total // kv_heads
    capacity = state.capacity
    position = rank.clamp(min=0)  # [B, T]: t; the row holds t + 1 tokens
    current = torch.div(position, block, rounding_mode="floor")  # the query's own (last) block c
    row_index = _index(state, "batch", batch, 3, 0)
    at3, current3 = position[:, :, None], current[:, :, None]

    def cache_slots(tokens: torch.Tensor) -> torch.Tensor:
        """Cache slots of sparse positions ``tokens [B, ...]`` (clamped into the map)."""
        return state.sparse_slots[_index(state, "batch", batch, tokens.dim(), 0), tokens.clamp(0, capacity - 1)]

    def vision_at(tokens: torch.Tensor) -> torch.Tensor:
        return state.vision[_index(state, "batch", batch, tokens.dim(), 0), cache_slots(tokens)]

    # The queries of positions before - P .. before + T - 1 (column = position - before + P).
    window_q = torch.cat([state.recent_q, _as(q, state.recent_q.dtype)], dim=2)  # [B, Hq, P + T, D]
    before = state.sparse_count - new
    state.recent_q.copy_(window_q[:, :, new:])  # in place: a captured graph's replays move it on too

    # Q1/Q2: the own block's mean over its zeroed tokens so far (partial or complete).
    own = torch.add(_arange(state, "block tokens", block), current[:, None, :, None], alpha=block)  # [B, 1, T, l]
    own_ok = own <= position[:, None, :, None]
    own_slots = cache_slots(own)
    own_weight = ((own_ok & state.vision[_index(state, "batch", batch, 4, 0), own_slots]).to(q.dtype)
                  / own_ok.sum(dim=-1, keepdim=True))[..., None, :]  # [B, 1, T, 1, l]
    heads4, rows4 = _index(state, "heads", kv_heads, 4, 1), _index(state, "batch", batch, 4, 0)
    own_k = torch.matmul(own_weight, _as(k_cache[rows4, heads4, own_slots], q.dtype))  # [B, Hkv, T, 1, D]
    own_v = torch.matmul(own_weight, _as(v_cache[rows4, heads4, own_slots], q.dtype))
    # [B, Hkv, 1, N + 1, D]: the complete blocks, then the spare column N, whose value no query uses
    # (its own block c <= N hides the column from the lse below, and Q5 overwrites its score).
    cmp_k = _as(state.constant("cmp_k columns", lambda: state.cmp_k[:, :, None]), score_dtype)
    blocks = _arange(state, "blocks", cmp_k.shape[3])

    # Q6: lse_read[s] = the compression lse of slot (tP + s) // T at row (tP + s) % T.
    flat = torch.add(_arange(state, "slots", slots_total), at3, alpha=slots_total)  # [B, T, P]
    row_length = at3 + 1
    source_slot = torch.div(flat, row_length, rounding_mode="floor")
    source_row = flat % row_length
    real_slot = source_slot < 2 * heads
    head = torch.where(real_slot, source_slot % heads, 0)
    keep = real_slot & vision_at(source_row)  # Q3 zeroed text queries, Q4 zero slots
    column = source_row - before[:, None, None] + slots_total
    source_q = _as(window_q[row_index, head, column], score_dtype) * keep[..., None]  # [B, T, P, D]
    source_kv = torch.div(source_slot, group, rounding_mode="floor")
    logits = torch.einsum("btsd,bhond->btshn", source_q, cmp_k) * scale
    new_index = _index(state, "new", new, 3, 1)
    logits = logits[row_index, new_index, _index(state, "slots", slots_total, 3, 2), source_kv]  # [B, T, P, N + 1]
    own_source = _as(own_k, score_dtype)[row_index, source_kv, new_index, 0]  # [B, T, P, D]
    own_logit = (source_q * own_source).sum(dim=-1, keepdim=True) * scale  # [B, T, P, 1]
    unseen = (blocks < torch.div(source_row, block, rounding_mode="floor")[..., None]) | (blocks >= current3[..., None])
    lse_read = torch.logsumexp(torch.cat([logits.masked_fill(unseen, float("-inf")), own_logit], dim=-1), dim=-1)

    # Q3/Q4: the query's slots [q, q, 0...] (zeroed on text rows) over the kv heads.
    vision4 = vision[:, None, :, None]
    query = q * vision4
    slot_q = torch.cat([query, query, _zero_slots(state, query, slots_total - 2 * heads)], dim=1)
    grouped = slot_q.view(batch, kv_heads, group, new, dim)

    # Q5: earlier blocks by their exp(q . Kc - lse_read) summed over the slots, the own block 1 per
    # slot; Q7: the top S. Exact ties (a text row's zero query scores every earlier block alike) must
    # stay ties, as the reference's slot-by-slot sum keeps them, so the sum runs over the innermost,
    # contiguous dim (the matmul writes [B, Hkv, T, N + 1, P / Hkv]): every block's terms are then
    # added in one order. A sum over a dim that is not the innermost one may vectorise across the
    # blocks (the CPU's does, for steps of several tokens or rows of many blocks) and round some of
    # them differently, which sends a tie to a later block. Column N stands for an own block past
    # the state's complete blocks.
    logits = torch.matmul(cmp_k, _as(grouped, score_dtype).permute(0, 1, 3, 4, 2))
    scores = torch.exp(logits.mul_(scale).sub_(lse_read.view(batch, new, kv_heads, 1, group).transpose(1, 2))).sum(dim=-1)
    scores = scores.view(batch, kv_heads, 1, new, blocks.shape[0])  # [B, Hkv, 1, T, N + 1]
    own5 = current.view(batch, 1, 1, new, 1)
    take = min(blocks.shape[0], selected_count(pattern.selection.count))
    # Blocks past the own one rank last (-1): when they are taken, their tokens lie past t (masked).
    scores.masked_fill_(blocks == own5, float(group)).masked_fill_(blocks > own5, -1.0)
    chosen_blocks = _top_blocks(state, scores, take)[0]  # [B, Hkv, 1, T, S]
    tokens = torch.add(_arange(state, "block tokens", block), chosen_blocks[..., None], alpha=block).flatten(-2)
    at = position.view(batch, 1, 1, new, 1)
    recent = at + _window_offsets(state, pattern.window.size, kv_heads)  # [B, Hkv, 1, T, w]

    if gates is None:  # constants as fills, not a host-to-device copy inside a captured graph
        gates = torch.stack([torch.full((batch, heads, new), value, dtype=q.dtype, device=q.device)
                             for value in pattern.gate.values], dim=-1)
    gates = torch.where(vision4, _as(gates, q.dtype), TEXT_GATE)
    slot_gates = torch.cat([gates, gates, _zero_slots(state, gates, slots_total - 2 * heads)], dim=1)
    gate_cmp, gate_slc, gate_win = torch.split(slot_gates.view(batch, kv_heads, group, new, 3), 1, dim=-1)
    mixed = _segment_attention(state, grouped * scale, _index(state, "heads", kv_heads, 5, 1), k_cache, v_cache, at,
                               [("selection", tokens), ("window", recent)],
                               {"selection": gate_slc, "window": gate_win}, empty=False, weighted=True)
    mixed = (mixed + gate_cmp * own_v.transpose(2, 3)).reshape(batch, slots_total, new, dim)  # Q1: o_cmp is the own block
    sparse = (mixed[:, :heads] + mixed[:, heads : 2 * heads]) * 0.5
    # Q3: the dense pass over every real key, vision queries zeroed.
    dense = _dense(q * ~vision4, k_cache, v_cache, state, slots, scale)
    return sparse + dense
