"""The dense float64 reference: the specification every backend is tested against.

Everything here is plain torch on explicit dense masks, one formula per
function, written to be read rather than to be fast. Layouts: q ``[B, Hq, L, D]``,
k and v ``[B, Hkv, L, D]``; query head ``h`` reads kv head ``h // G`` with
``G = Hq / Hkv`` (any ``G``; heads are never padded). The softmax scale is
``1/sqrt(D)`` in every branch.

Per batch row, the *sparse sequence* is the whole row, or, for a hybrid pattern
with ``vision_keys: vision``, the row's vision tokens compacted in order. In it:

1. Compression (block ``l``, stride ``d``): compressed token ``i`` pools
   positions ``[i*d, i*d + l)`` and exists when that block is complete. Query
   ``t`` sees token ``i`` when ``i*d + l - 1 <= t`` (causal) or
   ``i*d + l - 1 >= t`` (``videonsa_legacy``).
   ``o_cmp[t] = sum_i p_cmp[t, i] V_i`` with ``p_cmp[t] = softmax_i(q_t·K_i/sqrt(D))``
   over visible ``i``; a query with none visible gets zeros.
2. Selection scores (block ``l'``), NSA Eq. 9:
   ``p_slc[t, j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[t, (l'/d)*j - m - n]``
   (indices outside ``[0, N)`` skipped), summed over the ``G`` heads of a kv
   head for ``scoring: group``.
3. Selected blocks of query ``t``: the forced blocks (``first`` = 0,
   ``previous`` = ``t//l' - 1`` when >= 0, ``current`` = ``t//l'``), and the
   ``n - |forced|`` highest-scoring complete blocks ending at or before ``t``
   that are not forced, ties to the lower index (fewer when fewer exist). For
   ``granularity: query_block`` the ``m`` queries of an aligned tile share the
   selection made for the tile's first query with scores summed over the tile.
   ``o_slc[t]`` = one softmax over the tokens ``s <= t`` of the selected blocks.
4. Window: ``o_win[t]`` = softmax over ``t - w < s <= t``.
5. ``o[t] = sum_b gate_b[t] * o_b[t]`` over the branches present.

Text queries of a hybrid pattern (and every query of a dense layer) get dense
causal attention over all keys of the row, positions counted in the full row.
"""

from __future__ import annotations

import torch

from nsaflex.inputs import check_inputs, resolve_gates
from nsaflex.pooling import MLPPooling, compress, softmax_scale
from nsaflex.spec import Compression, Pattern, Selection

# --- masks -----------------------------------------------------------------------


def causal_mask(length: int) -> torch.Tensor:
    """``[L, L]``: ``mask[t, s] = s <= t``."""
    positions = torch.arange(length)
    return positions[None, :] <= positions[:, None]


def window_mask(length: int, size: int) -> torch.Tensor:
    """``[L, L]``: ``mask[t, s] = t - w < s <= t``."""
    positions = torch.arange(length)
    offset = positions[:, None] - positions[None, :]
    return (offset >= 0) & (offset < size)


def compression_visibility(length: int, compression: Compression) -> torch.Tensor:
    """``[L, N]``: whether query ``t`` sees compressed token ``i``."""
    tokens = compression.num_tokens(length)
    last_position = torch.arange(tokens) * compression.stride + compression.block - 1
    queries = torch.arange(length)[:, None]
    if compression.visibility == "causal":
        return last_position[None, :] <= queries
    return last_position[None, :] >= queries  # videonsa_legacy


def eq9_matrix(num_compressed: int, num_blocks: int, compression: Compression, selection: Selection) -> torch.Tensor:
    """``[N, J]`` float64 matrix ``M`` with ``p_slc = p_cmp @ M`` (NSA Eq. 9).

    ``M[i, j]`` counts the pairs ``(m, n)``, ``m < l'/d``, ``n < l/d``, with
    ``(l'/d)*j - m - n = i``.
    """
    matrix = torch.zeros(num_compressed, num_blocks, dtype=torch.float64)
    per_block = selection.block // compression.stride
    per_token = compression.block // compression.stride
    for j in range(num_blocks):
        for m in range(per_block):
            for n in range(per_token):
                i = per_block * j - m - n
                if 0 <= i < num_compressed:
                    matrix[i, j] += 1
    return matrix


# --- attention over an explicit mask -------------------------------------------------


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to ``mask``, scores ``q·k * scale``
    (``scale`` None: ``1/sqrt(D)``).

    ``q [Hq, T, D]``, ``k, v [Hkv, S, D]`` (query head ``h`` reads kv head
    ``h // G``), ``mask`` broadcastable to ``[Hq, T, S]``. Returns the output
    ``[Hq, T, D]`` and the probabilities ``[Hq, T, S]``; rows with no visible
    key give zero output and zero probabilities. Non-finite inputs reach only
    the rows that see them (:func:`masked_softmax`, :func:`masked_product`).
    """
    v = v.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = masked_scores(q, k, scale)
    mask = mask.expand_as(scores)
    probabilities = masked_softmax(scores, mask)
    return masked_product(probabilities, v, mask), probabilities


def masked_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Scores ``[Hq, T, S]`` = ``q·k * scale`` (``scale`` None: ``1/sqrt(D)``) of
    ``q [Hq, T, D]`` against ``k [Hkv, S, D]``, query head ``h`` reading kv head ``h // G``."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return torch.einsum("htd,hsd->hts", q, k) * (softmax_scale(q.shape[-1]) if scale is None else scale)


def masked_logsumexp(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``[Hq, T]``: ``log sum_s exp(q_t·k_s * scale)`` (natural log) over the keys
    ``mask`` keeps; ``-inf`` for a row that sees none (layouts as
    :func:`masked_attention`)."""
    scores = masked_scores(q, k, scale)
    return torch.logsumexp(scores.masked_fill(~mask.expand_as(scores), float("-inf")), dim=-1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax`` over the last dim of ``scores [..., T, S]`` restricted to the
    bool ``mask [..., T, S]``.

    A key whose score is ``-inf`` gets probability 0, as a masked key does, and
    a row with no other key gets zero probabilities (as a row with no visible
    key): what the tiled kernels do, which cannot tell the two apart. NaN and
    ``+inf`` scores make their row NaN; masked scores never reach a row."""
    live = mask & (scores != float("-inf"))
    has_key = live.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~live, float("-inf"))
    # A row with no live key would be NaN; give it zero probabilities instead.
    return torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key


def masked_product(probabilities: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``probabilities [..., T, S] @ v [..., S, D]`` in which a masked pair adds
    nothing even where ``v`` is inf or NaN (a plain product adds ``0 * inf = NaN``).

    The finite part of ``v`` goes through one matmul; the key rows holding a
    non-finite value (few) add their terms over the pairs ``mask`` keeps."""
    finite = torch.isfinite(v)
    out = probabilities @ torch.where(finite, v, torch.zeros_like(v))
    bad_keys = (~finite).any(dim=-1)
    while bad_keys.dim() > 1:
        bad_keys = bad_keys.any(dim=0)
    index = torch.nonzero(bad_keys).flatten()
    if index.numel() == 0:
        return out
    kept = torch.where(finite, torch.zeros_like(v), v).index_select(-2, index)  # [..., S', D]
    pairs = mask.expand(*probabilities.shape).index_select(-1, index)  # [..., T, S']
    # The masked pairs' probabilities are zeroed before the product too: their terms
    # (0 * inf = NaN) are dropped by the where, but its gradient would carry NaN back.
    chosen = probabilities.index_select(-1, index)
    terms = torch.where(pairs, chosen, torch.zeros_like(chosen))[..., None] * kept[..., None, :, :]  # [..., T, S', D]
    return out + torch.where(pairs[..., None], terms, torch.zeros_like(terms)).sum(dim=-2)


# --- selection ------------------------------------------------------------------------


def forced_blocks(query: int, selection: Selection) -> set[int]:
    """Forced selection blocks of query position ``query``."""
    current = query // selection.block
    blocks: set[int] = set()
    if "first" in selection.forced:
        blocks.add(0)
    if "previous" in selection.forced and current >= 1:
        blocks.add(current - 1)
    if "current" in selection.forced:
        blocks.add(current)
    return blocks


def choose_blocks(scores: torch.Tensor, query: int, selection: Selection) -> torch.Tensor:
    """Selected blocks of one query (or the first query of a tile).

    ``scores [J]``; returns a bool ``[J]``: forced blocks, then the best
    ``n - |forced|`` complete blocks ending at or before ``query``, ties to
    the lower index.
    """
    chosen = torch.zeros(scores.shape[0], dtype=torch.bool)
    forced = forced_blocks(query, selection)
    for block in forced:
        chosen[block] = True
    candidates = [
        j for j in range(scores.shape[0]) if (j + 1) * selection.block - 1 <= query and j not in forced
    ]
    # Highest score first; Python's sort is stable, so equal scores keep index order.
    values = scores.detach().tolist()  # the choice is discrete: no gradient flows through it
    ranked = sorted(candidates, key=lambda j: -values[j])
    for block in ranked[: selection.count - len(forced)]:
        chosen[block] = True
    return chosen


def selection_scores(
    probabilities: torch.Tensor, compression: Compression, selection: Selection, length: int, group: int
) -> torch.Tensor:
    """Block scores ``[Hq, T, J]`` from compression probabilities ``[Hq, T, N]``:
    Eq. 9, then summed over each GQA group for ``scoring: group``."""
    num_blocks = -(-length // selection.block)
    scores = probabilities @ eq9_matrix(probabilities.shape[-1], num_blocks, compression, selection)
    if selection.scoring == "group":
        heads, queries, blocks = scores.shape
        summed = scores.reshape(heads // group, group, queries, blocks).sum(dim=1)
        scores = summed.repeat_interleave(group, dim=0)
    return scores


def selected_blocks(scores: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Bool ``[Hq, T, J]``: the blocks each query head selects."""
    heads, length, num_blocks = scores.shape
    chosen = torch.zeros(heads, length, num_blocks, dtype=torch.bool)
    for head in range(heads):
        if selection.granularity == "token":
            for t in range(length):
                chosen[head, t] = choose_blocks(scores[head, t], t, selection)
        else:
            tile = selection.query_block
            assert tile is not None
            for first in range(0, length, tile):
                tile_scores = scores[head, first : first + tile].sum(dim=0)
                chosen[head, first : first + tile] = choose_blocks(tile_scores, first, selection)
    return chosen


def selection_mask(blocks: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """``[Hq, T, S]``: token ``s`` is attended when its block is selected and ``s <= t``."""
    block_of_key = torch.arange(length) // block_size
    return blocks[:, :, block_of_key] & causal_mask(length)


# --- one batch row ------------------------------------------------------------------


def sparse_branches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    pooler: MLPPooling | None = None,
    scale: float | None = None,
    lse: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Outputs ``[Hq, T, D]`` of every branch over one sparse sequence, scores
    scaled by ``scale`` (None: ``1/sqrt(D)``).

    ``q [Hq, T, D]``, ``k, v [Hkv, T, D]``. Also returns the selection as
    ``"selected_blocks"`` ``[Hq, T, J]`` (bool) when the pattern selects.
    A dict passed as ``lse`` receives each branch's log-sum-exp ``[Hq, T]``
    (:func:`masked_logsumexp`).
    """
    length = q.shape[1]
    group = q.shape[0] // k.shape[0]
    outputs: dict[str, torch.Tensor] = {}
    probabilities = None
    if pattern.compression is not None:
        compressed_k, compressed_v = compress(k[None], v[None], pattern.compression, pooler)
        visible = compression_visibility(length, pattern.compression)
        outputs["compression"], probabilities = masked_attention(q, compressed_k[0], compressed_v[0], visible, scale)
        if lse is not None:
            lse["compression"] = masked_logsumexp(q, compressed_k[0], visible, scale)
    if pattern.selection is not None:
        assert pattern.compression is not None and probabilities is not None
        scores = selection_scores(probabilities, pattern.compression, pattern.selection, length, group)
        blocks = selected_blocks(scores, pattern.selection)
        mask = selection_mask(blocks, pattern.selection.block, length)
        outputs["selection"], _ = masked_attention(q, k, v, mask, scale)
        outputs["selected_blocks"] = blocks
        if lse is not None:
            lse["selection"] = masked_logsumexp(q, k, mask, scale)
    if pattern.window is not None:
        window = window_mask(length, pattern.window.size)
        outputs["window"], _ = masked_attention(q, k, v, window, scale)
        if lse is not None:
            lse["window"] = masked_logsumexp(q, k, window, scale)
    return outputs


def sparse_row_indices(pattern: Pattern, token_types: torch.Tensor | None, length: int) -> torch.Tensor:
    """Positions (in the full row) of the sparse sequence of one batch row."""
    if pattern.hybrid is not None and pattern.hybrid.vision_keys == "vision":
        assert token_types is not None
        return torch.nonzero(token_types != 0).flatten()  # 1 image, 2 video
    return torch.arange(length)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    gates: torch.Tensor | None = None,
    token_types: torch.Tensor | None = None,
    pooler: MLPPooling | None = None,
    *,
    return_selection: bool = False,
    scale: float | None = None,
    return_branches: bool = False,
):
    """The exact output ``[B, Hq, L, D]`` of ``pattern``, computed in float64.

    ``gates [B, Hq, L, nb]`` in the order compression, selection, window of the
    branches present (``None`` for constant gates); ``token_types [B, L]``
    (0 text; 1 image or 2 video: vision) for hybrid patterns; ``pooler`` holds the parameters of
    ``pooling: mlp``; ``scale`` multiplies every score (None: ``1/sqrt(D)``).
    The result is float64 and differentiable with respect to
    every floating input (and the pooler's parameters).

    With ``return_selection`` also returns a list (one entry per batch row) of
    the selected blocks ``[Hq, T, J]`` over that row's sparse sequence (or None).

    With ``return_branches`` returns instead a dict of everything computed on
    the way, in the API's layout (float64, full rows of length ``L``):

    * ``out`` ``[B, Hq, L, D]``: the output;
    * ``outputs`` ``{branch: [B, Hq, L, D]}`` and ``lse`` ``{branch: [B, Hq, L]}``
      (natural log, ``-inf`` where nothing is visible): each branch on the sparse
      queries; zeros and ``-inf`` on the text queries of a hybrid pattern,
      which take the dense path;
    * ``blocks`` ``[B, Hq, L, J]`` bool (``J = ceil(L / l')``) the selected
      blocks, indices over the row's sparse sequence (None without selection);
    * ``dense_output`` ``[B, Hq, L, D]`` and ``dense_lse`` ``[B, Hq, L]``: causal
      attention over the whole row (the output of text queries and dense layers);
    * ``sparse_queries`` ``[B, L]`` bool: queries whose output is the gated mix.
    """
    values = _reference_rows(q, k, v, pattern, gates, token_types, pooler, scale, with_lse=return_branches)
    if return_branches:
        return values
    out = values["out"]
    return (out, values["selections"]) if return_selection else out


def _reference_rows(q, k, v, pattern, gates, token_types, pooler, scale, with_lse: bool) -> dict:
    check_inputs(pattern, q, k, v, gates, token_types)
    if pattern.compression is not None and pattern.compression.pooling == "mlp" and not pattern.dense and pooler is None:
        raise ValueError("pattern uses mlp pooling: pass its MLPPooling module as pooler")
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    batch, query_heads, length, dim = q.shape
    gates = resolve_gates(pattern, gates, q).double().cpu() if pattern.branches else None
    if token_types is not None:
        token_types = token_types.cpu()
    causal = causal_mask(length)
    num_blocks = -(-length // pattern.selection.block) if pattern.selection is not None else 0

    rows, selections, dense_rows, dense_lse = [], [], [], []
    branch_rows: dict[str, list] = {name: [] for name in pattern.branches}
    lse_rows: dict[str, list] = {name: [] for name in pattern.branches}
    block_rows, sparse_rows = [], []
    for b in range(batch):
        dense, _ = masked_attention(q[b], k[b], v[b], causal, scale)
        dense_rows.append(dense)
        if with_lse:
            dense_lse.append(masked_logsumexp(q[b], k[b], causal, scale))
        if pattern.dense:
            rows.append(dense)
            selections.append(None)
            sparse_rows.append(torch.zeros(length, dtype=torch.bool))
            continue
        types = token_types[b] if token_types is not None else None
        index = sparse_row_indices(pattern, types, length)
        lse: dict[str, torch.Tensor] | None = {} if with_lse else None
        branch_outputs = sparse_branches(q[b][:, index], k[b][:, index], v[b][:, index], pattern, pooler, scale, lse)
        mixed = sum(
            gates[b][:, index, position, None] * branch_outputs[name]
            for position, name in enumerate(pattern.branches)
        )
        # Scatter the sparse rows back to their positions; text rows stay dense.
        is_sparse_query = torch.zeros(length, dtype=torch.bool)
        is_sparse_query[index] = True
        if types is not None:
            is_sparse_query &= types != 0
        sparse_full = torch.zeros_like(dense).index_copy(1, index, mixed)
        rows.append(torch.where(is_sparse_query[None, :, None], sparse_full, dense))
        selections.append(branch_outputs.get("selected_blocks"))
        sparse_rows.append(is_sparse_query)
        if not with_lse:
            continue
        assert lse is not None
        keep = is_sparse_query[None, :, None]
        for name in pattern.branches:
            placed = torch.zeros_like(dense).index_copy(1, index, branch_outputs[name])
            branch_rows[name].append(torch.where(keep, placed, torch.zeros_like(placed)))
            placed_lse = torch.full((query_heads, length), float("-inf"), dtype=torch.float64).index_copy(1, index, lse[name])
            lse_rows[name].append(torch.where(keep[..., 0], placed_lse, float("-inf")))
        if pattern.selection is not None:
            chosen = branch_outputs["selected_blocks"]
            placed_blocks = torch.zeros(query_heads, length, num_blocks, dtype=torch.bool)
            placed_blocks[:, index, : chosen.shape[-1]] = chosen
            block_rows.append(placed_blocks & keep)
    out = torch.stack(rows)
    values: dict = {"out": out, "selections": selections}
    if with_lse:
        values.update(
            outputs={name: torch.stack(branch_rows[name]) for name in pattern.branches} if not pattern.dense else {},
            lse={name: torch.stack(lse_rows[name]) for name in pattern.branches} if not pattern.dense else {},
            blocks=torch.stack(block_rows) if block_rows else None,
            dense_output=torch.stack(dense_rows),
            dense_lse=torch.stack(dense_lse),
            sparse_queries=torch.stack(sparse_rows),
        )
    return values
