"""nsaflex.scoring against the reference's selection functions."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsaflex import reference as ref
from nsaflex import scoring
from nsaflex.pooling import compress
from nsaflex.spec import Compression, Selection

EXAMPLES = int(os.environ.get("NSAFLEX_TEST_EXAMPLES", "30"))


@st.composite
def geometries(draw, granularity=None):
    stride = draw(st.sampled_from((1, 2, 3, 4)))
    block = stride * draw(st.integers(1, 4))
    sel_block = stride * draw(st.integers(1, 4))
    forced = tuple(draw(st.lists(st.sampled_from(("first", "previous", "current")), unique=True, max_size=3)))
    count = draw(st.integers(max(1, len(forced)), len(forced) + 5))
    gran = granularity or draw(st.sampled_from(("token", "query_block")))
    tile = draw(st.sampled_from([d for d in range(1, sel_block + 1) if sel_block % d == 0])) if gran == "query_block" else None
    compression = Compression(block=block, stride=stride, visibility=draw(st.sampled_from(("causal", "videonsa_legacy"))))
    selection = Selection(block=sel_block, count=count, forced=forced, scoring=draw(st.sampled_from(("group", "head"))),
                          granularity=gran, query_block=tile)
    return compression, selection


@settings(max_examples=EXAMPLES)
@given(geometries(), st.integers(0, 12), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_eq9_matches_reference_matrix(geometry, num_compressed, num_blocks, seed):
    compression, selection = geometry
    torch.manual_seed(seed)
    p = torch.rand(3, num_compressed, dtype=torch.float64)
    expected = p @ ref.eq9_matrix(num_compressed, num_blocks, compression, selection)
    got = scoring.eq9_block_scores(p, compression, selection, num_blocks)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=EXAMPLES)
@given(geometries(), st.integers(1, 12), st.integers(0, 2**31 - 1), st.sampled_from((torch.float32, torch.float64)), st.booleans())
def test_choose_blocks_matches_reference(geometry, num_blocks, seed, dtype, ties):
    _, selection = geometry
    generator = torch.Generator().manual_seed(seed)
    units = 9
    # Integer scores force exact ties (to the lower index).
    scores = torch.randint(0, 3, (units, num_blocks), generator=generator).to(dtype) if ties else torch.rand(units, num_blocks, generator=generator, dtype=dtype)
    first = torch.randint(0, num_blocks * selection.block, (units,), generator=generator)
    got = scoring.choose_blocks(scores, first, selection)
    for u in range(units):
        expected = ref.choose_blocks(scores[u].double(), int(first[u]), selection)
        chosen = torch.zeros(num_blocks, dtype=torch.bool)
        picked = got[u][got[u] >= 0].long()
        assert len(set(picked.tolist())) == len(picked), "a block selected twice"
        chosen[picked] = True
        assert torch.equal(chosen, expected), (u, int(first[u]), scores[u].tolist(), got[u].tolist())


def test_float32_key_ranking_equals_stable_sort():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (64, 40), generator=generator).float() / 3
    scores[:, 5] = -0.0
    candidate = torch.rand(64, 40, generator=generator) < 0.7
    fast, fast_valid = scoring._top_candidates(scores, candidate, 11)
    slow, slow_valid = scoring._top_candidates(scores.double(), candidate, 11)
    assert torch.equal(fast_valid, slow_valid)
    assert torch.equal(torch.where(fast_valid, fast, -1), torch.where(slow_valid, slow, -1))


def _reference_blocks(q, k, v, compression, selection):
    """Selected blocks [Hq, T, J] of one row from the reference."""
    from nsaflex.spec import Pattern

    pattern = Pattern(name="s", compression=compression, selection=selection)
    return ref.sparse_branches(q.double(), k.double(), v.double(), pattern)["selected_blocks"]


@settings(max_examples=EXAMPLES)
@given(geometries(), st.integers(1, 40), st.integers(1, 2), st.sampled_from((1, 2, 3)), st.integers(0, 2**31 - 1),
       st.sampled_from((None, 1, 2, 5)), st.booleans())
def test_select_matches_reference(geometry, length, kv_heads, group, seed, chunk, padded):
    compression, selection = geometry
    torch.manual_seed(seed)
    batch, dim = 2, 8
    q = torch.randn(batch, kv_heads * group, length, dim)
    k = torch.randn(batch, kv_heads, length, dim)
    v = torch.randn(batch, kv_heads, length, dim)
    lengths = torch.tensor([length, max(1, length - 3)]) if padded else None
    if padded:  # row 1 is shorter: zero its padding as nsaflex.hybrid does
        q[1, :, lengths[1]:] = 0
        k[1, :, lengths[1]:] = 0
        v[1, :, lengths[1]:] = 0
    compressed_k, _ = compress(k, v, compression)
    result = scoring.select(q, compressed_k, compression, selection, lengths, chunk=chunk)
    got = scoring.selected_mask(result, length)
    for b in range(batch):
        real = length if lengths is None else int(lengths[b])
        expected = _reference_blocks(q[b, :, :real], k[b, :, :real], v[b, :, :real], compression, selection)
        rows = got[b] if result.per_head else got[b].repeat_interleave(group, dim=0)
        assert torch.equal(rows[:, :real, : expected.shape[-1]], expected)
        assert not rows[:, :real, expected.shape[-1]:].any()
        assert not (result.indices[b][:, -(-real // result.unit):] >= 0).any(), "padding units must select nothing"


def test_select_chunking_does_not_change_the_choice():
    torch.manual_seed(1)
    compression = Compression(block=4, stride=2)
    selection = Selection(block=4, count=3, forced=("first",), granularity="query_block", query_block=2)
    q, k = torch.randn(1, 4, 50, 16), torch.randn(1, 2, 50, 16)
    compressed_k, _ = compress(k, k, compression)
    whole = scoring.select(q, compressed_k, compression, selection)
    for chunk in (1, 2, 3, 7, 64):
        assert torch.equal(scoring.select(q, compressed_k, compression, selection, chunk=chunk).indices, whole.indices)


def test_bitmap_holds_exactly_the_selection():
    generator = torch.Generator().manual_seed(3)
    indices = torch.full((2, 3, 5, 4), -1, dtype=torch.int32)
    for row in indices.view(-1, 4):
        chosen = torch.randperm(70, generator=generator)[: int(torch.randint(0, 5, (1,), generator=generator))]
        row[: len(chosen)] = chosen.to(torch.int32)
    result = scoring.SelectionResult(indices, 1, False, 70)
    bitmap = scoring.selection_bitmap(result)
    assert bitmap.dtype == torch.int32 and bitmap.shape == (2, 3, 5, 3)
    j = torch.arange(70)
    bits = ((bitmap[..., j // 32] >> (j % 32)) & 1) == 1
    assert torch.equal(bits, scoring.selected_mask(result, 5))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_default_score_dtype(device):
    assert scoring.default_score_dtype(device, torch.float32) == (torch.float64 if device == "cpu" else torch.float32)
    assert scoring.default_score_dtype(device, torch.float64) == torch.float64
