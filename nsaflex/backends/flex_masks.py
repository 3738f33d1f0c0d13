"""Analytic FlexAttention block masks for the NSA branches.

Every ``BlockMask`` here is built from the pattern's geometry (and, for
selection, from the selected block indices) in ``O(L/Bq x L/Bk)`` memory at
most; nothing evaluates a mask over all ``L x L`` pairs. A query tile of ``Bq``
queries lists the key tiles of ``Bk`` keys it may attend:

* *full* tiles: every (query, key) pair of the tile is attended, so the kernel
  skips the ``mask_mod``;
* *partial* tiles: some pairs are, and the ``mask_mod`` decides each pair.

The ``mask_mod`` functions are exact on their own (eager FlexAttention evaluates
them over every pair and ignores the tile lists), so a tile list only has to be
a superset of the attended tiles and a full tile has to be really full.
Mask functions are made by module-level factories: the same code object for
every call, so ``torch.compile`` does not recompile when only the captured
tensors change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from nsaflex.scoring import SelectionResult
from nsaflex.spec import Compression

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --- mask_mod factories (one code object each) ----------------------------------------


def causal_mask_mod() -> MaskMod:
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return causal


def window_mask_mod(size: int) -> MaskMod:
    def window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < size)

    return window


def compression_mask_mod(compression: Compression, row_compressed: torch.Tensor | None = None) -> MaskMod:
    """Query ``t`` sees compressed token ``i`` (last position ``i*d + l - 1``)."""
    stride, block = compression.stride, compression.block
    if compression.visibility == "causal":

        def compressed_causal(b, h, q_idx, kv_idx):
            return kv_idx * stride + block - 1 <= q_idx

        return compressed_causal
    assert row_compressed is not None

    def compressed_legacy(b, h, q_idx, kv_idx):
        return (kv_idx * stride + block - 1 >= q_idx) & (kv_idx < row_compressed[b])

    return compressed_legacy


def selection_mask_mod(bitmap: torch.Tensor, heads_per_row: int, unit: int, block: int) -> MaskMod:
    """Key ``s`` is attended by query ``t`` when the unit of ``t`` selected the
    block of ``s`` (bit ``j % 32`` of word ``j // 32`` of ``bitmap [B, Hs, U, W]``)
    and ``s <= t``."""

    def selected(b, h, q_idx, kv_idx):
        j = kv_idx // block
        word = bitmap[b, h // heads_per_row, q_idx // unit, j // 32]
        return (((word >> (j % 32)) & 1) == 1) & (kv_idx <= q_idx)

    return selected


# --- tile lists ---------------------------------------------------------------------------


@dataclass
class TileLists:
    """The tile lists of one BlockMask (``[B', H', nq]`` counts and ``[B', H', nq, width]`` indices)."""

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    q_block: int
    kv_block: int
    q_len: int
    kv_len: int

    def expand_heads(self, group: int) -> "TileLists":
        """Repeat each head ``group`` times (group-scored selection -> query heads)."""
        if group == 1:
            return self
        rep = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731
        return TileLists(rep(self.kv_num), rep(self.kv_idx), rep(self.full_num), rep(self.full_idx),
                         self.q_block, self.kv_block, self.q_len, self.kv_len)

    def block_mask(self, mask_mod: MaskMod, *, compute_q_blocks: bool = True) -> BlockMask:
        kwargs = {}
        if not compute_q_blocks:
            kwargs["compute_q_blocks"] = False
        return BlockMask.from_kv_blocks(
            self.kv_num, self.kv_idx, self.full_num, self.full_idx,
            BLOCK_SIZE=(self.q_block, self.kv_block), mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len), **kwargs,
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile_bounds(length: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position of each tile."""
    start = torch.arange(_cdiv(length, block), device=device) * block
    return start, torch.clamp(start + block, max=length) - 1


def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[..., nq, nk]`` -> counts ``[..., nq]`` and indices ``[..., nq, nk]``
    (listed tiles first, in index order)."""
    dense = dense.to(torch.int32)
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def _from_dense(any_tile: torch.Tensor, full_tile: torch.Tensor, q_block: int, kv_block: int, q_len: int, kv_len: int) -> TileLists:
    while any_tile.dim() < 4:
        any_tile, full_tile = any_tile[None], full_tile[None]
    partial = any_tile & ~full_tile
    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full_tile & any_tile)
    return TileLists(kv_num, kv_idx, full_num, full_idx, q_block, kv_block, q_len, kv_len)


def causal_tiles(length: int, q_block: int, kv_block: int, device) -> TileLists:
    """Dense causal attention: ``s <= t``."""
    q_first, q_last = _tile_bounds(length, q_block, device)
    k_first, k_last = _tile_bounds(length, kv_block, device)
    any_tile = k_first[None, :] <= q_last[:, None]
    full_tile = k_last[None, :] <= q_first[:, None]
    return _from_dense(any_tile, full_tile, q_block, kv_block, length, length)


def window_tiles(length: int, size: int, q_block: int, kv_block: int, device) -> TileLists:
    """The causal band ``t - w < s <= t``."""
    q_first, q_last = _tile_bounds(length, q_block, device)
    k_first, k_last = _tile_bounds(length, kv_block, device)
    any_tile = (k_first[None, :] <= q_last[:, None]) & (k_last[None, :] >= q_first[:, None] - size + 1)
    full_tile = (k_last[None, :] <= q_first[:, None]) & (k_first[None, :] >= q_last[:, None] - size + 1)
    return _from_dense(any_tile, full_tile, q_block, kv_block, length, length)


def compression_tiles(
    length: int,
    num_compressed: int,
    compression: Compression,
    q_block: int,
    kv_block: int,
    device,
    row_compressed: torch.Tensor | None = None,
) -> TileLists:
    """Queries ``[L]`` against compressed tokens ``[N]``; ``row_compressed [B]``
    (``videonsa_legacy`` only): the compressed tokens each row really has."""
    q_first, q_last = _tile_bounds(length, q_block, device)
    k_first, k_last = _tile_bounds(num_compressed, kv_block, device)
    last = lambda i: i * compression.stride + compression.block - 1  # noqa: E731
    if compression.visibility == "causal":
        any_tile = last(k_first)[None, :] <= q_last[:, None]
        full_tile = last(k_last)[None, :] <= q_first[:, None]
        return _from_dense(any_tile, full_tile, q_block, kv_block, length, num_compressed)
    if row_compressed is None:
        row_compressed = torch.tensor([num_compressed], device=device)
    limit = row_compressed.to(device)[:, None, None] - 1  # last real token per row
    top = torch.minimum(k_last[None, None, :], limit)
    any_tile = (k_first[None, None, :] <= limit) & (last(top) >= q_first[None, :, None])
    full_tile = (k_last[None, None, :] <= limit) & (last(k_first)[None, None, :] >= q_last[None, :, None])
    return _from_dense(any_tile[:, None], full_tile[:, None], q_block, kv_block, length, num_compressed)


@dataclass(frozen=True)
class UnionStats:
    """What a query tile of selection runs compared with one query's selection."""

    tiles: int
    mean_union_blocks: float  # distinct selection blocks per (row, head, query tile)
    mean_selected_blocks: float  # blocks per selection unit
    mean_kv_tiles: float  # key tiles run per query tile (partial + full)
    mean_full_tiles: float

    def to_dict(self) -> dict[str, float]:
        return {
            "query_tiles": self.tiles,
            "mean_union_blocks": self.mean_union_blocks,
            "mean_selected_blocks": self.mean_selected_blocks,
            "union_over_selected": self.mean_union_blocks / self.mean_selected_blocks if self.mean_selected_blocks else 0.0,
            "mean_kv_tiles": self.mean_kv_tiles,
            "mean_full_tiles": self.mean_full_tiles,
        }


def is_direct(result: SelectionResult, block: int, q_block: int, kv_block: int) -> bool:
    """Whether each query tile lies in one selection unit and each key tile in
    one selection block: the tile lists then come straight from the indices."""
    return result.unit % q_block == 0 and block % kv_block == 0


def selection_tiles(
    result: SelectionResult,
    length: int,
    block: int,
    q_block: int,
    kv_block: int,
    *,
    narrow: bool = False,
) -> tuple[TileLists, UnionStats]:
    """Tile lists of the selection branch over a (padded) sparse sequence of ``length``.

    Direct case (:func:`is_direct`): ``BlockMask.from_kv_blocks`` input straight
    from the top-n indices, ``O(L/Bq x n)`` before padding to the full width.
    Otherwise a query tile runs the union of its units' selections, with the
    intersection (blocks every unit chose, entirely before the tile) as full tiles.
    ``narrow`` keeps the index width at the longest list (CUDA forward only).
    """
    if is_direct(result, block, q_block, kv_block):
        lists, stats = _direct_tiles(result, length, block, q_block, kv_block)
    else:
        lists, stats = _union_tiles(result, length, block, q_block, kv_block)
    num_kv = _cdiv(length, kv_block)
    width = max(1, int(max(lists.kv_num.max().item(), lists.full_num.max().item()))) if narrow else num_kv
    lists.kv_idx = _fit(lists.kv_idx, width)
    lists.full_idx = _fit(lists.full_idx, width)
    return lists, stats


def _fit(indices: torch.Tensor, width: int) -> torch.Tensor:
    if indices.shape[-1] >= width:
        return indices[..., :width].contiguous()
    return torch.nn.functional.pad(indices, (0, width - indices.shape[-1])).contiguous()


def _sorted_list(kv: torch.Tensor, keep: torch.Tensor, sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.where(keep, kv, torch.full_like(kv, sentinel))
    values = torch.sort(values, dim=-1).values
    counts = keep.sum(dim=-1, dtype=torch.int32)
    values = torch.where(values == sentinel, torch.zeros_like(values), values)
    return counts.contiguous(), values.to(torch.int32).contiguous()


def _direct_tiles(result: SelectionResult, length: int, block: int, q_block: int, kv_block: int) -> tuple[TileLists, UnionStats]:
    device = result.indices.device
    q_first, q_last = _tile_bounds(length, q_block, device)
    num_kv = _cdiv(length, kv_block)
    units = torch.div(q_first, result.unit, rounding_mode="floor")
    chosen = result.indices[:, :, units].long()  # [B, Hs, nq, w]
    per_block = block // kv_block
    kv = (chosen[..., None] * per_block + torch.arange(per_block, device=device)).flatten(-2)  # [B, Hs, nq, w*r]
    valid = (chosen >= 0)[..., None].expand(*chosen.shape, per_block).flatten(-2)
    kv_first = kv * kv_block
    kv_last = torch.clamp(kv_first + kv_block, max=length) - 1
    valid = valid & (kv < num_kv) & (kv_first <= q_last[:, None])
    full = valid & (kv_last <= q_first[:, None])
    kv_num, kv_idx = _sorted_list(kv, valid & ~full, num_kv)
    full_num, full_idx = _sorted_list(kv, full, num_kv)
    lists = TileLists(kv_num, kv_idx, full_num, full_idx, q_block, kv_block, length, length)
    selected = (chosen >= 0).sum(dim=-1).double()
    stats = UnionStats(
        tiles=int(selected.numel()),
        mean_union_blocks=float(selected.mean()) if selected.numel() else 0.0,
        mean_selected_blocks=float((result.indices >= 0).sum(dim=-1).double().mean()) if result.indices.numel() else 0.0,
        mean_kv_tiles=float((kv_num + full_num).double().mean()) if kv_num.numel() else 0.0,
        mean_full_tiles=float(full_num.double().mean()) if full_num.numel() else 0.0,
    )
    return lists, stats


def _union_tiles(result: SelectionResult, length: int, block: int, q_block: int, kv_block: int) -> tuple[TileLists, UnionStats]:
    device = result.indices.device
    indices = result.indices.long()
    batch, heads, num_units, _ = indices.shape
    num_blocks = result.num_blocks
    q_first, q_last = _tile_bounds(length, q_block, device)
    k_first, k_last = _tile_bounds(length, kv_block, device)
    unit = result.unit
    # Units overlapping each query tile.
    first_unit = torch.div(q_first, unit, rounding_mode="floor")
    last_unit = torch.div(q_last, unit, rounding_mode="floor")
    span = int((last_unit - first_unit).max().item()) + 1 if q_first.numel() else 1
    unit_ids = first_unit[:, None] + torch.arange(span, device=device)  # [nq, K]
    unit_ok = unit_ids <= last_unit[:, None]
    units_per_tile = unit_ok.sum(dim=-1)  # [nq]
    gathered = indices[:, :, torch.clamp(unit_ids, max=num_units - 1)]  # [B, Hs, nq, K, w]
    gathered = torch.where(unit_ok[None, None, :, :, None], gathered, torch.full_like(gathered, -1))
    gathered = gathered.flatten(-2)  # [B, Hs, nq, K*w]
    slot = torch.where(gathered >= 0, gathered, torch.full_like(gathered, num_blocks))
    count = torch.zeros(batch, heads, q_first.numel(), num_blocks + 1, dtype=torch.int32, device=device)
    count.scatter_add_(3, slot, torch.ones_like(slot, dtype=torch.int32))
    count = count[..., :num_blocks]
    chosen_any = count > 0
    chosen_all = count == units_per_tile[None, None, :, None].to(torch.int32)
    # Key tile kb covers selection blocks j_lo..j_hi: any/all through prefix sums.
    j_lo = torch.div(k_first, block, rounding_mode="floor")
    j_hi = torch.div(k_last, block, rounding_mode="floor")
    pad = lambda t: torch.nn.functional.pad(torch.cumsum(t.to(torch.int32), dim=-1), (1, 0))  # noqa: E731
    any_prefix = pad(chosen_any)
    missing_prefix = pad(~chosen_all)
    any_tile = (any_prefix[..., j_hi + 1] - any_prefix[..., j_lo]) > 0
    all_tile = (missing_prefix[..., j_hi + 1] - missing_prefix[..., j_lo]) == 0
    causal_any = (k_first[None, :] <= q_last[:, None])
    causal_full = (k_last[None, :] <= q_first[:, None])
    any_tile = any_tile & causal_any
    full_tile = any_tile & all_tile & causal_full
    lists = _from_dense(any_tile, full_tile, q_block, kv_block, length, length)
    union = chosen_any.sum(dim=-1).double()
    stats = UnionStats(
        tiles=int(union.numel()),
        mean_union_blocks=float(union.mean()) if union.numel() else 0.0,
        mean_selected_blocks=float((indices >= 0).sum(dim=-1).double().mean()) if indices.numel() else 0.0,
        mean_kv_tiles=float((lists.kv_num + lists.full_num).double().mean()) if lists.kv_num.numel() else 0.0,
        mean_full_tiles=float(lists.full_num.double().mean()) if lists.full_num.numel() else 0.0,
    )
    return lists, stats


# --- for tests: the pairs a BlockMask really attends ---------------------------------


def effective_mask(lists: TileLists, mask_mod: MaskMod, batch: int, heads: int) -> torch.Tensor:
    """Bool ``[B, H, Lq, Lkv]`` of the pairs a compiled kernel attends with these
    tile lists: full tiles entirely, partial tiles where ``mask_mod`` holds.
    Small sizes only (it is dense)."""
    device = lists.kv_num.device
    nq = _cdiv(lists.q_len, lists.q_block)
    nk = _cdiv(lists.kv_len, lists.kv_block)

    def dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        num = num.expand(batch, heads, nq)
        idx = idx.expand(batch, heads, nq, idx.shape[-1]).long()
        keep = torch.arange(idx.shape[-1], device=device) < num[..., None]
        out = torch.zeros(batch, heads, nq, nk + 1, dtype=torch.bool, device=device)
        out.scatter_(3, torch.where(keep, idx, torch.full_like(idx, nk)), True)
        out = out[..., :nk]
        out = out.repeat_interleave(lists.q_block, dim=2)[:, :, : lists.q_len]
        return out.repeat_interleave(lists.kv_block, dim=3)[..., : lists.kv_len]

    partial = dense(lists.kv_num, lists.kv_idx)
    full = dense(lists.full_num, lists.full_idx)
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(heads, device=device)[None, :, None, None]
    q = torch.arange(lists.q_len, device=device)[None, None, :, None]
    k = torch.arange(lists.kv_len, device=device)[None, None, None, :]
    pairs = mask_mod(b, h, q, k).expand(batch, heads, lists.q_len, lists.kv_len)
    return full | (partial & pairs)
