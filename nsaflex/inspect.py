"""Looking inside one attention call: :class:`AttentionInfo`, what
``attn(q, k, v, ..., return_info=True)`` returns beside the output.

Every tensor is in the API's layout ``[B, H, L, ...]`` over the full rows
(positions counted as in ``q``). Block indices count selection blocks of the
row's *sparse sequence* (the whole row, or its vision tokens compacted for a
hybrid pattern with ``vision_keys: vision``), as the reference defines them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionInfo:
    """Per-branch values of one call of a compiled pattern.

    Attributes:
        branches: the branches in gate order (compression, selection, window
            of those present); empty for a dense layer.
        outputs: ``{branch: [B, Hq, L, D]}`` each branch's output before
            gating (float32, or float64 on the reference backend); zero on the
            text queries of a hybrid pattern, which take the dense path.
        lse: ``{branch: [B, Hq, L]}`` each branch's log-sum-exp of its scaled
            scores, natural log; ``-inf`` where the branch sees no key (a query
            before the first complete compression block) and on text queries.
        gates: ``[B, Hq, L, nb]`` the gate values applied (the pattern's
            constants broadcast, or the ones given); None for a dense layer.
        selected_blocks: ``[B, Hsel, L, n]`` int64, the blocks each query
            attends in the selection branch, ascending, ``-1`` for empty slots
            (``Hsel`` = ``Hkv`` for ``scoring: group``, ``Hq`` for ``head``);
            ``-1`` everywhere on text queries. None without a selection branch.
        dense_output: ``[B, Hq, L, D]`` causal attention over the whole row:
            the output of a dense layer and of a hybrid pattern's text queries
            (None for a pattern with no dense path).
        dense_lse: ``[B, Hq, L]`` its log-sum-exp (natural log), or None.
        sparse_queries: ``[B, L]`` bool, queries whose output is
            ``sum_b gates[..., b] * outputs[b]``; the others' output is
            ``dense_output``.
    """

    branches: tuple[str, ...]
    outputs: dict[str, torch.Tensor]
    lse: dict[str, torch.Tensor]
    gates: torch.Tensor | None
    selected_blocks: torch.Tensor | None
    dense_output: torch.Tensor | None
    dense_lse: torch.Tensor | None
    sparse_queries: torch.Tensor

    def stacked_lse(self) -> torch.Tensor:
        """``[B, Hq, L, nb]``: :attr:`lse` stacked in gate order, with the dense
        path's log-sum-exp in every slot of the queries that take it (``nb = 1``
        for a dense layer). What ``return_lse=True`` returns."""
        if not self.branches:
            assert self.dense_lse is not None
            return self.dense_lse[..., None]
        stacked = torch.stack([self.lse[name] for name in self.branches], dim=-1)
        if self.dense_lse is None:
            return stacked
        sparse = self.sparse_queries[:, None, :, None].to(stacked.device)
        return torch.where(sparse, stacked, self.dense_lse[..., None].to(stacked.dtype))


def block_lists(chosen: torch.Tensor, count: int) -> torch.Tensor:
    """``[..., n]`` int64 lists (ascending, ``-1`` for empty slots) of the
    blocks marked in the bool ``chosen [..., J]``."""
    index = torch.arange(chosen.shape[-1], device=chosen.device).expand_as(chosen)
    return sorted_block_lists(torch.where(chosen, index, -1), count)


def sorted_block_lists(lists: torch.Tensor, count: int) -> torch.Tensor:
    """``[..., n]`` int64: the non-negative entries of ``lists [..., W]``
    ascending (duplicates kept), then ``-1``; ``W`` padded or cut to ``n``."""
    lists = lists.long()
    missing = torch.iinfo(torch.int64).max
    ordered = torch.where(lists >= 0, lists, missing).sort(dim=-1).values
    if ordered.shape[-1] < count:
        pad = ordered.new_full((*ordered.shape[:-1], count - ordered.shape[-1]), missing)
        ordered = torch.cat([ordered, pad], dim=-1)
    ordered = ordered[..., :count]
    return torch.where(ordered == missing, -1, ordered)


def causal_logsumexp(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, L]`` natural log-sum-exp of causal attention scores
    ``q·k / sqrt(D)`` in float32 (query head ``h`` reads kv head ``h // G``):
    the dense path's, computed beside the kernels that do not return it."""
    group = q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), keys.transpose(-1, -2)) / q.shape[-1] ** 0.5
    length = q.shape[2]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    return torch.logsumexp(scores.masked_fill(future, float("-inf")), dim=-1)


def scatter_lse(lse: torch.Tensor, layout, length: int) -> torch.Tensor:
    """``[B, H, Lmax]`` padded log-sum-exp -> ``[B, H, L]`` full rows
    (:func:`nsaflex.hybrid.scatter_padded`), ``-inf`` outside the sparse
    sequence. ``scatter_padded`` adds into zeros, which ``-inf`` cannot pass:
    the finite part and a visibility flag travel apart."""
    from nsaflex.hybrid import scatter_padded

    seen = lse != float("-inf")
    values = torch.where(seen, lse.float(), 0.0)
    placed = scatter_padded(torch.stack([values, seen.float()], dim=-1), layout, length)
    return torch.where(placed[..., 1] > 0, placed[..., 0], float("-inf"))


def empty_branch_info(pattern, q: torch.Tensor, layout) -> dict:
    """Per-branch info of no query (zeros, ``-inf``), full rows of ``q``'s
    shape, which a backend then fills on its sparse queries."""
    batch, query_heads, length, _ = q.shape
    return {
        "outputs": {name: q.new_zeros(q.shape, dtype=torch.float32) for name in pattern.branches},
        "lse": {name: torch.full((batch, query_heads, length), float("-inf"), device=q.device) for name in pattern.branches},
        "sparse_queries": layout.sparse_queries,
    }
