"""Analytic tile lists: what a compiled kernel would attend equals the exact mask,
full tiles are really full, listed tiles are not wasted, and nothing is L x L."""

from __future__ import annotations

import os
import time

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsaflex import reference as ref
from nsaflex import scoring
from nsaflex.backends import flex_masks as fm
from nsaflex.pooling import compress
from nsaflex.spec import Compression, Selection

EXAMPLES = int(os.environ.get("NSAFLEX_TEST_EXAMPLES", "30"))
tiles_sizes = st.sampled_from((1, 2, 3, 4, 8, 16))


def _tile_pairs(lists: fm.TileLists, batch: int, heads: int, full: bool) -> torch.Tensor:
    """Every pair of the listed (full or partial) tiles, ignoring mask_mod."""
    always = lambda b, h, q, k: torch.ones((), dtype=torch.bool)  # noqa: E731
    empty = torch.zeros_like(lists.kv_num)
    if full:
        only = fm.TileLists(empty, lists.kv_idx, lists.full_num, lists.full_idx, lists.q_block, lists.kv_block, lists.q_len, lists.kv_len)
    else:
        only = fm.TileLists(lists.kv_num, lists.kv_idx, empty, lists.full_idx, lists.q_block, lists.kv_block, lists.q_len, lists.kv_len)
    return fm.effective_mask(only, always, batch, heads)


def _check(lists, mask_mod, exact, batch=1, heads=1):
    got = fm.effective_mask(lists, mask_mod, batch, heads)
    exact = exact.expand_as(got)
    assert torch.equal(got, exact)
    # Full tiles are fully attended; every listed tile attends at least one pair.
    assert not (_tile_pairs(lists, batch, heads, True) & ~exact).any()
    partial = _tile_pairs(lists, batch, heads, False)
    nq, nk = -(-lists.q_len // lists.q_block), -(-lists.kv_len // lists.kv_block)
    tile_any = torch.zeros(batch, heads, nq, nk, dtype=torch.bool)
    qi = torch.arange(lists.q_len) // lists.q_block
    ki = torch.arange(lists.kv_len) // lists.kv_block
    hits = (partial & exact).nonzero()
    tile_any[hits[:, 0], hits[:, 1], qi[hits[:, 2]], ki[hits[:, 3]]] = True
    listed = torch.zeros_like(tile_any)
    keep = torch.arange(lists.kv_idx.shape[-1]) < lists.kv_num.expand(batch, heads, nq)[..., None]
    b, h, q, slot = keep.nonzero().unbind(-1)
    listed[b, h, q, lists.kv_idx.expand(batch, heads, nq, -1)[b, h, q, slot].long()] = True
    return listed, tile_any


@settings(max_examples=EXAMPLES)
@given(st.integers(1, 70), st.integers(1, 40), tiles_sizes, tiles_sizes)
def test_causal_and_window_tiles_are_exact(length, size, q_block, kv_block):
    lists = fm.causal_tiles(length, q_block, kv_block, "cpu")
    listed, used = _check(lists, fm.causal_mask_mod(), ref.causal_mask(length))
    assert torch.equal(listed, used)
    lists = fm.window_tiles(length, size, q_block, kv_block, "cpu")
    listed, used = _check(lists, fm.window_mask_mod(size), ref.window_mask(length, size))
    assert torch.equal(listed, used)


@settings(max_examples=EXAMPLES)
@given(st.integers(1, 70), st.sampled_from((1, 2, 4)), st.integers(1, 4), st.sampled_from(("causal", "videonsa_legacy")),
       tiles_sizes, tiles_sizes, st.lists(st.integers(0, 70), min_size=1, max_size=3))
def test_compression_tiles_are_exact(length, stride, per, visibility, q_block, kv_block, row_lengths):
    compression = Compression(block=stride * per, stride=stride, visibility=visibility)
    tokens = compression.num_tokens(length)
    if tokens == 0:
        return
    rows = None
    exact = ref.compression_visibility(length, compression)[None, None]
    if visibility == "videonsa_legacy":
        row_lengths = [min(length, r) for r in row_lengths]
        rows = torch.tensor([compression.num_tokens(r) for r in row_lengths])
        exact = exact & (torch.arange(tokens)[None, None, None, :] < rows[:, None, None, None])
    lists = fm.compression_tiles(length, tokens, compression, q_block, kv_block, "cpu", rows)
    batch = 1 if rows is None else len(rows)
    listed, used = _check(lists, fm.compression_mask_mod(compression, rows if rows is not None else torch.tensor([tokens])), exact, batch)
    assert torch.equal(listed, used)


@st.composite
def selections(draw):
    stride = draw(st.sampled_from((1, 2, 4)))
    sel_block = stride * draw(st.sampled_from((1, 2, 3, 4)))
    granularity = draw(st.sampled_from(("token", "query_block")))
    tile = draw(st.sampled_from([d for d in range(1, sel_block + 1) if sel_block % d == 0])) if granularity == "query_block" else None
    forced = tuple(draw(st.lists(st.sampled_from(("first", "previous", "current")), unique=True, max_size=3)))
    return (
        Compression(block=stride * draw(st.integers(1, 3)), stride=stride),
        Selection(block=sel_block, count=draw(st.integers(max(1, len(forced)), len(forced) + 4)), forced=forced,
                  granularity=granularity, query_block=tile, scoring=draw(st.sampled_from(("group", "head")))),
    )


@settings(max_examples=EXAMPLES)
@given(selections(), st.integers(1, 60), tiles_sizes, tiles_sizes, st.integers(0, 2**31 - 1), st.booleans())
def test_selection_tiles_are_exact(geometry, length, q_block, kv_block, seed, narrow):
    compression, selection = geometry
    torch.manual_seed(seed)
    q, k = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8)
    lengths = torch.tensor([length, max(1, length // 2)])
    compressed_k, _ = compress(k, k, compression)
    result = scoring.select(q, compressed_k, compression, selection, lengths)
    lists, stats = fm.selection_tiles(result, length, selection.block, q_block, kv_block, narrow=narrow)
    heads = result.indices.shape[1]
    bitmap = scoring.selection_bitmap(result)
    mask_mod = fm.selection_mask_mod(bitmap, 1, result.unit, selection.block)
    chosen = scoring.selected_mask(result, length)  # [B, Hs, L, J]
    exact = chosen[..., torch.arange(length) // selection.block] & ref.causal_mask(length)
    listed, used = _check(lists, mask_mod, exact, 2, heads)
    assert stats.mean_union_blocks >= 0 and stats.mean_kv_tiles >= stats.mean_full_tiles
    if fm.is_direct(result, selection.block, q_block, kv_block):
        # Straight from the indices: every listed key tile is used by the tile's queries.
        assert torch.equal(listed, used)
        union, _ = fm._union_tiles(result, length, selection.block, q_block, kv_block)
        assert torch.equal(fm.effective_mask(union, mask_mod, 2, heads), fm.effective_mask(lists, mask_mod, 2, heads))


def test_long_sequences_build_without_dense_masks():
    """128K tokens: tile lists are O(L/B x L/B) (1024 x 1024 here), built in
    well under a second each, no [L, L] tensor anywhere."""
    length = 131072
    start = time.perf_counter()
    window = fm.window_tiles(length, 512, 128, 128, "cpu")
    compression = fm.compression_tiles(length, length // 64, Compression(block=64, stride=64), 128, 128, "cpu")
    causal = fm.causal_tiles(length, 128, 128, "cpu")
    for lists in (window, compression, causal):
        assert lists.kv_idx.numel() <= 1024 * 1024
        lists.block_mask(fm.causal_mask_mod())
    # Query-block selection straight from indices: [B, Hs, L/m, n].
    units = length // 64
    generator = torch.Generator().manual_seed(0)
    indices = (torch.rand(1, 4, units, 32, generator=generator) * (torch.arange(units)[None, None, :, None] + 1)).long()
    indices = torch.sort(indices, dim=-1).values
    indices[..., 1:][indices[..., 1:] == indices[..., :-1]] = -1
    result = scoring.SelectionResult(indices.to(torch.int32), 64, False, units)
    lists, stats = fm.selection_tiles(result, length, 64, 64, 64, narrow=True)
    assert lists.kv_idx.shape[-1] <= 32
    assert stats.mean_union_blocks <= 32
    assert time.perf_counter() - start < 60
