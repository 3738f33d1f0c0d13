"""Decoding over a KV cache: the output of new queries under a pattern, from cached keys.

Semantics. A query at position ``p`` (``p >= 1`` tokens already cached) gets
exactly what the pattern gives the *last row* of the sequence ``[0, p]``
(padding removed): :func:`nsaflex.reference.reference_attention` (or, in
``videonsa_release`` mode, :func:`nsaflex.reference_release.release_attention`)
evaluated on that prefix, last row. For the per-token causal patterns (causal
compression, ``granularity: token``) this is the same row the prefill of a
longer prompt gives, so prefill and decode agree token for token. Patterns
that look ahead (``videonsa_legacy`` compression, ``query_block`` tiles) are
evaluated on the prefix that exists when the token is decoded: a query-block
tile's shared selection is scored over the tile's queries seen so far
(``a .. p``), and legacy compression sees the blocks that exist. Text queries
of a hybrid pattern are dense, as in prefill.

This module is the exact per-row path: the adapter takes it on the reference
backend and for ``query_block`` tiles of ``vision_keys: all`` patterns; on the
other backends it decodes through the compiled attention's batched decode entry
(:meth:`nsaflex.runtime.CompiledAttention.decode`, :mod:`nsaflex.decoding`),
whose :class:`~nsaflex.decoding.DecodeState` :class:`LayerDecodeCache` holds.
In ``videonsa_release`` mode :func:`decode_attention` itself hands the step to
the batched release decode (:func:`release_batched`) off the reference
backend (:func:`takes_batched_release`).

What is kept between steps, per layer and batch row (:class:`RowCache`,
attached by the adapter to the transformers cache object):

* the compressed keys/values of the complete blocks of the row's sparse
  sequence, extended as blocks complete (the last one is recomputed and
  compared at every step, so a reordered or edited KV cache is detected and the
  compressed tokens rebuilt);
* for ``query_block`` selection, the queries of the current tile so far;
* in ``videonsa_release`` mode, the queries of the last ``P`` positions
  (the misread log-sum-exp of quirk Q6 reads other rows' compression
  statistics; see :mod:`nsaflex.reference_release`).

Cost per new token and layer, ``n`` = length of the row's sparse sequence:
``O(n)`` integer work to locate the sparse sequence, ``O(N * D)`` for the
compression branch over its ``N = n / d`` compressed tokens (plus one new
compressed token when a block completes), ``O(count * l' * D)`` for the
selected blocks (gathered, not masked) and ``O(w * D)`` for the window. Dense
(text) queries cost one dense attention row, ``O(L * D)``. ``query_block``
selection adds ``O(m * N * D)`` to score the tile. Release mode adds
``O(P * N * D)`` for the misread log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from nsaflex.decoding import DecodeState, decode_step, start_state
from nsaflex.pooling import MLPPooling, compress, softmax_scale
from nsaflex.reference import forced_blocks, masked_attention
from nsaflex.reference_release import TEXT_GATE, group_sum, padded_slots, selected_count
from nsaflex.spec import Compression, Pattern, Selection


@dataclass
class RowCache:
    """What one batch row of one layer keeps between decode steps."""

    cmp_k: torch.Tensor | None = None  # [Hkv, N, D] compressed keys (complete blocks)
    cmp_v: torch.Tensor | None = None
    tail_q: torch.Tensor | None = None  # [Hq, r, D] queries of the current tile
    tail_start: int = 0  # sparse index of the tile's first query
    q_hist: torch.Tensor | None = None  # [Hq, r, D] release mode: last queries
    q_hist_end: int = 0  # row position after the last query in q_hist


@dataclass
class LayerDecodeCache:
    """Per-layer decode state: one :class:`RowCache` per batch row (the exact
    per-row path), or the batched decode's :class:`~nsaflex.decoding.DecodeState`
    with the number of cache slots it covers (the compiled decode entry)."""

    rows: list[RowCache] = field(default_factory=list)
    state: DecodeState | None = None
    state_length: int = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Follow a reordering of the cache's rows (beam search): the batched
        state's rows are taken at ``index``. The per-row caches check
        themselves against the cached keys at every step."""
        if self.state is not None:
            self.state.reorder(index)

    def row(self, index: int) -> RowCache:
        while len(self.rows) <= index:
            self.rows.append(RowCache())
        return self.rows[index]


class DecodeError(RuntimeError):
    """Decode state that does not match the cached sequence (raised as AdapterError by the adapter)."""


# --- helpers -------------------------------------------------------------------------


def _take(x: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x [H, L, D]`` at ``positions`` along L, cast to ``dtype``."""
    return x.index_select(1, positions).to(dtype)


def compressed_tokens(
    cache: RowCache,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    compression: Compression,
    pooler: MLPPooling | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed keys and values ``[Hkv, N, D]`` of the complete blocks of the
    sparse sequence ``positions`` (full-row positions into ``k, v [Hkv, L, D]``),
    taken from ``cache`` and extended with the blocks completed since."""
    block, stride = compression.block, compression.stride
    needed = compression.num_tokens(positions.numel())

    def pool(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens first .. last-1 cover positions [first*d, (last-1)*d + l)
        span = positions[first * stride : (last - 1) * stride + block]
        kc, vc = compress(_take(k, span, dtype)[None], _take(v, span, dtype)[None], compression, pooler)
        return kc[0], vc[0]

    have = 0 if cache.cmp_k is None or cache.cmp_k.dtype != dtype else cache.cmp_k.shape[1]
    if have > needed:
        have = 0
    if have:
        # The last cached token must still be what the cached keys give.
        check_k, check_v = pool(have - 1, have)
        if not (torch.equal(check_k[:, 0], cache.cmp_k[:, have - 1]) and torch.equal(check_v[:, 0], cache.cmp_v[:, have - 1])):
            have = 0
    if have == 0:
        if needed == 0:
            heads, _, dim = k.shape
            cache.cmp_k = cache.cmp_v = k.new_zeros(heads, 0, dim, dtype=dtype)
        else:
            cache.cmp_k, cache.cmp_v = pool(0, needed)
    elif have < needed:
        new_k, new_v = pool(have, needed)
        cache.cmp_k = torch.cat([cache.cmp_k[:, :have], new_k], dim=1)
        cache.cmp_v = torch.cat([cache.cmp_v[:, :have], new_v], dim=1)
    return cache.cmp_k[:, :needed], cache.cmp_v[:, :needed]


def visibility(compression: Compression, num_tokens: int, queries: torch.Tensor) -> torch.Tensor:
    """``[r, N]``: whether sparse query position ``queries[r]`` sees compressed token ``i``."""
    last = torch.arange(num_tokens, device=queries.device) * compression.stride + compression.block - 1
    if compression.visibility == "causal":
        return last[None, :] <= queries[:, None]
    return last[None, :] >= queries[:, None]


def eq9_rows(probabilities: torch.Tensor, num_blocks: int, compression: Compression, selection: Selection) -> torch.Tensor:
    """NSA Eq. 9 for a few rows: ``[..., N] -> [..., J]`` (the reference's
    ``probabilities @ eq9_matrix``, as shifted sums)."""
    per_block = selection.block // compression.stride
    per_token = compression.block // compression.stride
    num_compressed = probabilities.shape[-1]
    out = probabilities.new_zeros(*probabilities.shape[:-1], num_blocks)
    blocks = torch.arange(num_blocks, device=probabilities.device)
    for m in range(per_block):
        for n in range(per_token):
            index = per_block * blocks - m - n
            ok = (index >= 0) & (index < num_compressed)
            if bool(ok.any()):
                out[..., blocks[ok]] += probabilities[..., index[ok]]
    return out


def choose_blocks_batched(scores: torch.Tensor, query: int, selection: Selection) -> torch.Tensor:
    """Selected blocks ``[Hq, count]`` (``-1`` for empty slots) of every head for
    sparse query position ``query`` (the tile's first query for ``query_block``):
    :func:`nsaflex.reference.choose_blocks`, vectorised over heads."""
    heads, num_blocks = scores.shape
    device = scores.device
    forced = sorted(forced_blocks(query, selection))
    free = selection.count - len(forced)
    index = torch.arange(num_blocks, device=device)
    candidate = (index + 1) * selection.block - 1 <= query
    for block in forced:
        candidate &= index != block
    parts = [torch.tensor(forced, dtype=torch.long, device=device).expand(heads, len(forced))]
    if free > 0:
        ranked = scores.masked_fill(~candidate[None, :], float("-inf"))
        # stable descending sort: equal scores keep index order (ties to the lower index)
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :free]
        ok = candidate[order]
        parts.append(torch.where(ok, order, torch.full_like(order, -1)))
    return torch.cat(parts, dim=-1)


def attend_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    blocks: torch.Tensor,
    block_size: int,
    query: int,
    kv_of_head: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One query per head over the tokens ``s <= query`` of its selected blocks.

    ``q [Hq, D]``; ``blocks [Hq, n]`` (sparse block indices, ``-1`` empty);
    ``positions`` maps sparse to full-row positions in ``k, v [Hkv, L, D]``;
    ``kv_of_head [Hq]``. Gathers ``n * block_size`` keys per head."""
    offsets = torch.arange(block_size, device=q.device)
    tokens = (blocks[..., None] * block_size + offsets).flatten(1)  # [Hq, C]
    ok = (blocks[..., None] >= 0).expand(-1, -1, block_size).flatten(1) & (tokens <= query)
    rows = positions[tokens.clamp(0, query)]  # [Hq, C]
    keys = k[kv_of_head[:, None], rows].to(dtype)  # [Hq, C, D]
    values = v[kv_of_head[:, None], rows].to(dtype)
    logits = torch.einsum("hd,hcd->hc", q, keys) * softmax_scale(q.shape[-1])
    logits = logits.masked_fill(~ok, float("-inf"))
    has = ok.any(dim=-1, keepdim=True)
    probabilities = torch.softmax(logits.masked_fill(~has, 0.0), dim=-1) * has
    return torch.einsum("hc,hcd->hd", probabilities, values)


def attend_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q [Hq, D]`` over the keys at ``positions`` of ``k, v [Hkv, L, D]`` (head h reads kv h // G)."""
    if dtype == torch.float64:
        out, _ = masked_attention(q[:, None].to(dtype), _take(k, positions, dtype), _take(v, positions, dtype), torch.ones(1, dtype=torch.bool, device=q.device))
        return out[:, 0]
    keys, values = k.index_select(1, positions), v.index_select(1, positions)
    out = F.scaled_dot_product_attention(q[None, :, None].to(keys.dtype), keys[None], values[None], enable_gqa=True)
    return out[0, :, 0].to(dtype)


# --- faithful patterns -----------------------------------------------------------------


def sparse_query(
    pattern: Pattern,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    gates: torch.Tensor,
    cache: RowCache,
    pooler: MLPPooling | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The gated sparse output ``[Hq, D]`` of the last position of a sparse sequence.

    ``q [Hq, D]`` the query (its sparse position is ``t = len(positions) - 1``);
    ``k, v [Hkv, L, D]`` one row of the KV cache; ``positions [n]`` the full-row
    positions of the sparse sequence, ending with the query's; ``gates [Hq, nb]``.
    Updates ``cache`` (compressed tokens; the tile queries for ``query_block``).
    """
    heads, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    n = positions.numel()
    t = n - 1
    q = q.to(dtype)
    outputs: dict[str, torch.Tensor] = {}
    selection = pattern.selection
    tile_rows = q[:, None]  # [Hq, r, D]
    tile_positions = torch.tensor([t], device=q.device)
    tile_first = t
    if selection is not None and selection.granularity == "query_block":
        tile = selection.query_block
        tile_first = (t // tile) * tile
        previous = cache.tail_q
        if t == tile_first:
            previous = None
        elif previous is None or cache.tail_start != tile_first or previous.shape[1] != t - tile_first:
            raise DecodeError(
                "query_block decode needs the queries of the current tile "
                f"(positions {tile_first}..{t - 1}) from the prefill; run the prompt through the patched model"
            )
        if previous is not None:
            tile_rows = torch.cat([previous.to(dtype), q[:, None]], dim=1)
            tile_positions = torch.arange(tile_first, t + 1, device=q.device)
        cache.tail_q = tile_rows.detach()
        cache.tail_start = tile_first

    if pattern.compression is not None:
        compression = pattern.compression
        kc, vc = compressed_tokens(cache, k, v, positions, compression, pooler, dtype)
        visible = visibility(compression, kc.shape[1], tile_positions)  # [r, N]
        o_cmp, probabilities = masked_attention(tile_rows, kc, vc, visible)
        outputs["compression"] = o_cmp[:, -1]
        if selection is not None:
            num_blocks = -(-n // selection.block)
            scores = eq9_rows(probabilities, num_blocks, compression, selection)  # [Hq, r, J]
            if selection.scoring == "group":
                scores = scores.view(kv_heads, group, *scores.shape[1:]).sum(dim=1).repeat_interleave(group, dim=0)
            scores = scores.sum(dim=1)  # over the tile's queries (one row for token granularity)
            blocks = choose_blocks_batched(scores, tile_first, selection)
            kv_of_head = torch.arange(heads, device=q.device) // group
            outputs["selection"] = attend_blocks(q, k, v, positions, blocks, selection.block, t, kv_of_head, dtype)
    if pattern.window is not None:
        recent = positions[max(0, n - pattern.window.size) :]
        o_win, _ = masked_attention(q[:, None], _take(k, recent, dtype), _take(v, recent, dtype), torch.ones(1, dtype=torch.bool, device=q.device))
        outputs["window"] = o_win[:, 0]
    gates = gates.to(dtype)
    return sum(gates[:, index, None] * outputs[name] for index, name in enumerate(pattern.branches))


def record_tile_query(pattern: Pattern, cache: RowCache, q: torch.Tensor, t: int) -> None:
    """Append the query ``q [Hq, D]`` at sparse position ``t`` to the current
    ``query_block`` tile without computing its sparse output (a text query of a
    ``vision_keys: all`` pattern: dense itself, but its compression scores count
    toward its tile's shared selection)."""
    selection = pattern.selection
    if pattern.dense or selection is None or selection.granularity != "query_block":
        return
    first = (t // selection.query_block) * selection.query_block
    previous = None
    if t != first:
        previous = cache.tail_q
        if previous is None or cache.tail_start != first or previous.shape[1] != t - first:
            raise DecodeError(
                "query_block decode needs the queries of the current tile "
                f"(positions {first}..{t - 1}) from the prefill; run the prompt through the patched model"
            )
    query = q[:, None].detach()
    cache.tail_q = query if previous is None else torch.cat([previous, query.to(previous.dtype)], dim=1)
    cache.tail_start = first


def stash_tile_queries(pattern: Pattern, cache: RowCache, q_sparse: torch.Tensor) -> None:
    """After a prefill: keep the queries of the last (partial) tile of a row's
    sparse sequence (``q_sparse [Hq, n, D]``) for ``query_block`` decode."""
    selection = pattern.selection
    if pattern.dense or selection is None or selection.granularity != "query_block":
        return
    n = q_sparse.shape[1]
    first = (n // selection.query_block) * selection.query_block
    cache.tail_q = q_sparse[:, first:].detach()
    cache.tail_start = first


# --- videonsa_release ------------------------------------------------------------------


def release_compression_tokens(
    cache: RowCache, ks: torch.Tensor, vs: torch.Tensor, block: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla mean pooling of the (zeroed) row ``ks, vs [Hkv, T, D]``: complete
    blocks from the cache, the partial last block recomputed."""
    length = ks.shape[1]
    complete = length // block

    def pool(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = slice(first * block, last * block)
        shape = (ks.shape[0], last - first, block, ks.shape[2])
        return ks[:, span].to(dtype).reshape(shape).mean(dim=2), vs[:, span].to(dtype).reshape(shape).mean(dim=2)

    have = 0 if cache.cmp_k is None or cache.cmp_k.dtype != dtype else min(cache.cmp_k.shape[1], complete)
    if have:
        check_k, check_v = pool(have - 1, have)
        if not (torch.equal(check_k[:, 0], cache.cmp_k[:, have - 1]) and torch.equal(check_v[:, 0], cache.cmp_v[:, have - 1])):
            have = 0
    if have == 0:
        cache.cmp_k, cache.cmp_v = pool(0, complete)
    elif have < complete:
        new_k, new_v = pool(have, complete)
        cache.cmp_k = torch.cat([cache.cmp_k[:, :have], new_k], dim=1)
        cache.cmp_v = torch.cat([cache.cmp_v[:, :have], new_v], dim=1)
    kc, vc = cache.cmp_k[:, :complete], cache.cmp_v[:, :complete]
    if complete * block < length:
        tail_k = ks[:, complete * block :].to(dtype).mean(dim=1, keepdim=True)
        tail_v = vs[:, complete * block :].to(dtype).mean(dim=1, keepdim=True)
        kc, vc = torch.cat([kc, tail_k], dim=1), torch.cat([vc, tail_v], dim=1)
    return kc, vc


def release_query(
    pattern: Pattern,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vision: torch.Tensor,
    gates: torch.Tensor,
    cache: RowCache,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``videonsa_release`` output ``[Hq, D]`` of the last position of a row.

    ``q [Hq, D]``; ``k, v [Hkv, T, D]`` the row without padding (the query is at
    ``t = T - 1``); ``vision [T]`` bool; ``gates [Hq, 3]``. ``cache.q_hist`` must
    hold the queries of positions ``max(0, T - P) .. T - 2`` (the misread
    log-sum-exp, Q6, reads rows there); it is extended with ``q``.
    """
    heads, dim = q.shape
    kv_heads, length, _ = k.shape
    group = heads // kv_heads
    t = length - 1
    slots = padded_slots(heads, kv_heads)
    slot_group = slots // kv_heads
    scale = softmax_scale(dim)
    block = pattern.compression.block
    q = q.to(dtype)
    device = q.device

    history = cache.q_hist
    keep = min(slots, t)
    if keep:
        if history is None or cache.q_hist_end != t or history.shape[1] < keep:
            raise DecodeError(
                "videonsa_release decode needs the queries of the last "
                f"{slots} positions from the prefill; run the prompt through the patched model"
            )
        history = history[:, history.shape[1] - keep :].to(dtype)
        rows_q = torch.cat([history, q[:, None]], dim=1)  # positions t-keep .. t
    else:
        rows_q = q[:, None]
    cache.q_hist = rows_q[:, -slots:].detach()
    cache.q_hist_end = length
    first_row = t - (rows_q.shape[1] - 1)

    # Q2: text keys and values zeroed.
    kz = k * vision[None, :, None].to(k.dtype)
    vz = v * vision[None, :, None].to(v.dtype)
    kc, vc = release_compression_tokens(cache, kz, vz, block, dtype)
    num_blocks = kc.shape[1]  # ceil(T / l); the query's own block is the last
    current = t // block

    def slot_query(slot: int, row: int) -> torch.Tensor:
        """Padded-slot query (Q3 zeroing, Q4 copies) of ``slot`` at row position ``row``."""
        if slot >= 2 * heads or not bool(vision[row]):
            return torch.zeros(dim, dtype=dtype, device=device)
        return rows_q[slot % heads, row - first_row]

    # Q6: lse_used[t, s] = lse of slot (t*P + s) // T at row (t*P + s) % T, over
    # that row's visible blocks (its own and later ones, Q1).
    lse_used = torch.empty(slots, dtype=dtype, device=device)
    for s in range(slots):
        flat = t * slots + s
        slot, row = flat // length, flat % length
        visible = kc[slot // slot_group, row // block :]  # [n_vis, D]
        query = slot_query(slot, row)
        lse_used[s] = torch.logsumexp(visible @ query * scale, dim=0)

    # The query's padded slots (Q4) and gates (Q3: text rows 0.5).
    is_vision = bool(vision[t])
    base_q = q if is_vision else torch.zeros_like(q)
    qp = torch.cat([base_q, base_q, q.new_zeros(slots - 2 * heads, dim)])  # [P, D]
    g = gates.to(dtype) if is_vision else torch.full_like(gates.to(dtype), TEXT_GATE)
    gp = torch.cat([g, g, g.new_zeros(slots - 2 * heads, g.shape[-1])])  # [P, 3]
    kv_of_slot = torch.arange(slots, device=device) // slot_group

    # Q1: only the own (last) block is visible to the last row: probability 1.
    o_cmp = vc[kv_of_slot, num_blocks - 1]  # [P, D]
    # Q5: scores of earlier blocks, the current block 1 per slot.
    logits = torch.einsum("sd,snd->sn", qp, kc[kv_of_slot, :current]) * scale  # [P, c]
    raw = torch.exp(logits - lse_used[:, None])
    raw = torch.cat([raw, torch.ones(slots, 1, dtype=dtype, device=device)], dim=1)  # + current block
    scores = group_sum(raw.view(kv_heads, slot_group, current + 1))  # [Hkv, c+1]
    take = selected_count(pattern.selection.count)  # Q7
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :take]  # [Hkv, <=S]
    positions = torch.arange(length, device=device)
    o_slc = attend_blocks(qp, kz, vz, positions, order[kv_of_slot], block, t, kv_of_slot, dtype)
    recent = positions[max(0, length - pattern.window.size) :]
    win_k, win_v = _take(kz, recent, dtype), _take(vz, recent, dtype)
    o_win, _ = masked_attention(qp[:, None], win_k, win_v, torch.ones(1, dtype=torch.bool, device=device))
    mixed = gp[:, 0:1] * o_cmp + gp[:, 1:2] * o_slc + gp[:, 2:3] * o_win[:, 0]
    sparse = (mixed[:heads] + mixed[heads : 2 * heads]) * 0.5
    # Q3: dense part with vision queries zeroed.
    q_dense = torch.zeros_like(q) if is_vision else q
    dense = attend_dense(q_dense, k, v, positions, dtype)
    assert group * kv_heads == heads
    return sparse + dense


def stash_release_queries(cache: RowCache, q_row: torch.Tensor, slots: int) -> None:
    """After a prefill: keep the last ``P = slots`` queries of a row (``q_row
    [Hq, T, D]``, padding removed) for ``videonsa_release`` decode."""
    cache.q_hist = q_row[:, -slots:].detach()
    cache.q_hist_end = q_row.shape[1]


# --- the decode step ---------------------------------------------------------------------


def real_positions(valid: torch.Tensor | None, row: int, end: int, device) -> torch.Tensor:
    """Positions ``< end`` of the real (non-padding) tokens of batch row ``row``."""
    if valid is None:
        return torch.arange(end, device=device)
    return torch.nonzero(valid[row, :end]).flatten()


def decode_attention(
    pattern: Pattern,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor | None,
    token_types: torch.Tensor | None,
    valid: torch.Tensor | None,
    past: int,
    cache: LayerDecodeCache,
    *,
    release: bool = False,
    pooler: MLPPooling | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Outputs ``[B, Hq, q, D]`` (in ``dtype``) of ``q`` new queries at
    positions ``past .. past + q - 1``.

    ``q [B, Hq, q, D]``; ``k, v [B, Hkv, past + q, D]`` (cached and new keys);
    ``gates [B, Hq, q, nb]`` (``None``: the pattern's constants);
    ``token_types [B, past + q]`` (hybrid patterns and release mode);
    ``valid [B, past + q]`` real tokens (``None``: no padding; padding queries
    output zeros). Query ``i`` gets the last row of the pattern on the real
    tokens of ``[0, past + i]`` (:func:`release_query` with ``release``).
    ``cache`` is read and extended.
    """
    batch, heads, q_len, dim = q.shape
    if release and takes_batched_release(pattern, dtype, valid, past):
        return release_batched(pattern, q, k, v, gates, token_types, valid, past, cache).to(dtype)
    if gates is None and pattern.branches:
        constants = torch.tensor(pattern.gate.values, dtype=dtype, device=q.device)
        gates = constants.expand(batch, heads, q_len, len(pattern.branches))
    out = torch.zeros(batch, heads, q_len, dim, dtype=dtype, device=q.device)
    hybrid = pattern.hybrid
    for b in range(batch):
        row = cache.row(b)
        for i in range(q_len):
            position = past + i
            if valid is not None and not bool(valid[b, position]):
                continue
            real = real_positions(valid, b, position + 1, q.device)
            if release:
                vision = token_types[b, real] == 1
                out[b, :, i] = release_query(pattern, q[b, :, i], k[b][:, real], v[b][:, real], vision, gates[b, :, i], row, dtype)
            elif pattern.dense or (hybrid is not None and int(token_types[b, position]) != 1):
                out[b, :, i] = attend_dense(q[b, :, i], k[b], v[b], real, dtype)
                if hybrid is not None and hybrid.vision_keys == "all":
                    record_tile_query(pattern, row, q[b, :, i], real.numel() - 1)
            else:
                positions = real
                if hybrid is not None and hybrid.vision_keys == "vision":
                    positions = real[token_types[b, real] == 1]
                out[b, :, i] = sparse_query(pattern, q[b, :, i], k[b], v[b], positions, gates[b, :, i], row, pooler, dtype)
    return out


def takes_batched_release(pattern: Pattern, dtype: torch.dtype, valid: torch.Tensor | None, past: int) -> bool:
    """Whether a ``videonsa_release`` step goes through the batched entry: not on
    the float64 reference backend (which keeps the exact path, as in faithful
    mode), not for dense layers, and not when a new token is padding (it has no
    place in the batched state's appended slots)."""
    return dtype != torch.float64 and not pattern.dense and (valid is None or bool(valid[:, past:].all()))


def release_batched(
    pattern: Pattern,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor | None,
    token_types: torch.Tensor,
    valid: torch.Tensor | None,
    past: int,
    cache: LayerDecodeCache,
) -> torch.Tensor:
    """``videonsa_release`` decode of the new queries (all real) through the
    batched entry (:func:`nsaflex.decoding.decode_step` with ``release=True``),
    arguments as :func:`decode_attention`. The state is built from the cache
    the first time (or when the cache was cut back or its batch changed), from
    the last ``P`` queries of each row that the prefill kept
    (:func:`stash_release_queries`); later steps extend it."""
    batch, heads, q_len, dim = q.shape
    state = cache.state
    lengths = torch.full((batch,), past, dtype=torch.long, device=q.device)
    if state is None or state.batch != batch or cache.state_length != past:
        slots = padded_slots(heads, k.shape[1])
        queries = q.new_zeros(batch, heads, past, dim)
        for b in range(batch):  # once per state built, not per step
            real = real_positions(valid, b, past, q.device)
            keep = min(slots, real.numel())
            row = cache.row(b)
            if keep and (row.q_hist is None or row.q_hist_end != real.numel() or row.q_hist.shape[1] < keep):
                raise DecodeError("videonsa_release decode needs the queries of the last "
                                  f"{slots} positions from the prefill; run the prompt through the patched model")
            if keep:
                queries[b][:, real[real.numel() - keep :]] = row.q_hist[:, row.q_hist.shape[1] - keep :].to(q.dtype)
        state = start_state(pattern, k[:, :, :past], v[:, :, :past], lengths, token_types[:, :past],
                            None if valid is None else valid[:, :past], queries=queries, release=True)
    out = decode_step(pattern, q, k, v, lengths + q_len, state, gates, token_types[:, past:], release=True)
    cache.state, cache.state_length = state, past + q_len
    return out


def record_delegated_queries(
    pattern: Pattern,
    cache: LayerDecodeCache,
    q: torch.Tensor,
    valid: torch.Tensor | None,
    past: int,
) -> None:
    """Keep the ``query_block`` tile queries of new text queries whose (dense)
    attention was computed elsewhere (``vision_keys: all`` patterns only)."""
    if pattern.hybrid is None or pattern.hybrid.vision_keys != "all":
        return
    selection = pattern.selection
    if pattern.dense or selection is None or selection.granularity != "query_block":
        return
    batch, _, q_len, _ = q.shape
    for b in range(batch):
        for i in range(q_len):
            position = past + i
            if valid is not None and not bool(valid[b, position]):
                continue
            t = real_positions(valid, b, position + 1, q.device).numel() - 1
            record_tile_query(pattern, cache.row(b), q[b, :, i], t)
