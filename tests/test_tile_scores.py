"""The Triton scoring kernels (nsaflex.kernels.tile_scores) against the float64
reference and the torch scoring path of nsaflex.scoring.

On CPU they run under ``TRITON_INTERPRET=1`` (set here when no CUDA device is
present, before triton is imported); ``NSAFLEX_TEST_DEVICE=cuda`` runs them on
the GPU (bf16 there as well).
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("NSAFLEX_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nsaflex import reference as ref  # noqa: E402
from nsaflex import scoring  # noqa: E402
from nsaflex.pooling import compress  # noqa: E402
from nsaflex.spec import Compression, Selection  # noqa: E402

triton = pytest.importorskip("triton")
from nsaflex.kernels import tile_scores  # noqa: E402

EXAMPLES = int(os.environ.get("NSAFLEX_TEST_EXAMPLES", "12"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def cases(draw):
    stride = draw(st.sampled_from((2, 4, 8)))
    block = stride * draw(st.integers(1, 2))
    sel_block = stride * draw(st.integers(1, 3))
    gran = draw(st.sampled_from(("token", "query_block")))
    divisors = [d for d in range(1, sel_block + 1) if sel_block % d == 0]
    tile = draw(st.sampled_from(divisors)) if gran == "query_block" else None
    forced = tuple(draw(st.lists(st.sampled_from(("first", "previous", "current")), unique=True, max_size=2)))
    compression = Compression(block=block, stride=stride, visibility=draw(st.sampled_from(("causal", "videonsa_legacy"))))
    selection = Selection(block=sel_block, count=draw(st.integers(max(1, len(forced)), len(forced) + 4)), forced=forced,
                          scoring=draw(st.sampled_from(("group", "head"))), granularity=gran, query_block=tile)
    shape = dict(kv_heads=draw(st.integers(1, 2)), group=draw(st.sampled_from((1, 2, 3, 7))), length=draw(st.integers(block, 70)),
                 dim=draw(st.sampled_from((16, 24))), padded=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))
    return compression, selection, shape


def _inputs(compression, shape, dtype=torch.float32):
    torch.manual_seed(shape["seed"])
    batch, length = 2, shape["length"]
    q = torch.randn(batch, shape["kv_heads"] * shape["group"], length, shape["dim"])
    k = torch.randn(batch, shape["kv_heads"], length, shape["dim"])
    lengths = torch.tensor([length, max(1, length - 5)]) if shape["padded"] else torch.tensor([length, length])
    q[1, :, lengths[1]:] = 0
    k[1, :, lengths[1]:] = 0
    compressed_k, _ = compress(k, k, compression)
    q, compressed_k = q.to(DEVICE, dtype), compressed_k.to(DEVICE, dtype)
    return q, compressed_k, lengths.to(DEVICE)


def _reference_unit_scores(q, compressed_k, compression, selection, lengths, unit, start, rows):
    """float64 ``[B, Hs, rows/unit, N]`` compression probabilities summed over the
    selection row's heads and each unit of queries ``[start, start + rows)``."""
    batch, query_heads, length, _ = q.shape
    kv_heads, num = compressed_k.shape[1], compressed_k.shape[2]
    group = query_heads // kv_heads
    out = torch.zeros(batch, query_heads, max(length, start + rows), num, dtype=torch.float64)
    for b in range(batch):
        real = int(lengths[b])
        tokens = compression.num_tokens(real)
        if tokens == 0:
            continue
        visible = ref.compression_visibility(real, compression)
        _, p = ref.masked_attention(q[b, :, :real].double().cpu(), compressed_k[b, :, :tokens].double().cpu(),
                                    compressed_k[b, :, :tokens].double().cpu(), visible)
        out[b, :, :real, :tokens] = p
    out = out[:, :, start : start + rows]
    if selection.scoring == "group":
        out = out.view(batch, kv_heads, group, rows, num).sum(dim=2)
    return out.view(batch, out.shape[1], rows // unit, unit, num).sum(dim=3)


@PROPERTY
@given(cases(), st.integers(0, 3))
def test_unit_scores_match_the_reference(case, chunk_index):
    compression, selection, shape = case
    q, compressed_k, lengths = _inputs(compression, shape)
    unit = selection.query_block or 1
    length = q.shape[2]
    rows = unit * max(1, -(-length // unit) // 2)  # two or more chunks
    start = min(chunk_index * rows, (-(-length // unit) - 1) * unit)
    row_compressed = torch.clamp(torch.div(lengths - compression.block, compression.stride, rounding_mode="floor") + 1, min=0)
    legacy = compression.visibility != "causal"
    lse = tile_scores.log_sum_exp(q, compressed_k, compression.block, compression.stride, legacy, lengths, row_compressed)
    got, summed = tile_scores.unit_scores(q, compressed_k, lse, compression.block, compression.stride, legacy, lengths,
                                          row_compressed, per_head=selection.scoring == "head", unit=unit, start=start, rows=rows)
    if not summed and unit > 1:
        got = got.view(got.shape[0], got.shape[1], rows // unit, unit, -1).sum(dim=3)
    padded_q = torch.nn.functional.pad(q, (0, 0, 0, max(0, start + rows - length)))
    expected = _reference_unit_scores(padded_q, compressed_k, compression, selection, lengths, unit, start, rows)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-5, atol=2e-6)


def _tile_scores64(q, compressed_k, compression, selection, lengths):
    """float64 ``[B, Hs, U, J]`` scores (Eq. 9 after the sums) of every unit."""
    unit = selection.query_block or 1
    length = q.shape[2]
    rows = -(-length // unit) * unit
    padded_q = torch.nn.functional.pad(q, (0, 0, 0, rows - length))
    summed = _reference_unit_scores(padded_q, compressed_k, compression, selection, lengths, unit, 0, rows)
    return scoring.eq9_block_scores(summed, compression, selection, -(-length // selection.block))


def _assert_same_or_tied(got, expected, scores, tolerance=1e-5):
    """Equal selections, or the blocks that differ score within ``tolerance`` of each other."""
    if torch.equal(got, expected):
        return
    for index in zip(*torch.nonzero((got != expected).any(dim=-1), as_tuple=True)):
        a = set(got[index].tolist()) - {-1}
        b = set(expected[index].tolist()) - {-1}
        row = scores[index]
        only_a, only_b = sorted(a - b), sorted(b - a)
        assert len(only_a) == len(only_b), (index, a, b)
        gap = float(row[only_b].max() - row[only_a].min()) if only_a else 0.0
        assert gap <= tolerance * max(1.0, float(row.abs().max())), (index, only_a, only_b, gap)


@PROPERTY
@given(cases(), st.sampled_from((None, 1, 3)))
def test_kernel_selection_matches_torch_scoring(case, chunk):
    compression, selection, shape = case
    q, compressed_k, lengths = _inputs(compression, shape)
    unit = selection.query_block or 1
    got = scoring.select(q, compressed_k, compression, selection, lengths, chunk=None if chunk is None else chunk * unit,
                         kernel="triton")
    expected = scoring.select(q.cpu().double(), compressed_k.cpu().double(), compression, selection, lengths.cpu(),
                              score_dtype=torch.float64, kernel="torch")
    assert got.indices.shape == expected.indices.shape and got.unit == expected.unit and got.per_head == expected.per_head
    scores = _tile_scores64(q, compressed_k, compression, selection, lengths)
    _assert_same_or_tied(got.indices.cpu(), expected.indices, scores)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_rank_like_their_float64_values(dtype):
    compression = Compression(block=16, stride=16)
    selection = Selection(block=16, count=3, forced=("current",), scoring="group", granularity="query_block", query_block=16)
    shape = dict(kv_heads=2, group=7, length=100, dim=32, padded=True, seed=5)
    q, compressed_k, lengths = _inputs(compression, shape, dtype)
    got = scoring.select(q, compressed_k, compression, selection, lengths, kernel="triton")
    expected = scoring.select(q.cpu().double(), compressed_k.cpu().double(), compression, selection, lengths.cpu(),
                              score_dtype=torch.float64)
    _assert_same_or_tied(got.indices.cpu(), expected.indices, _tile_scores64(q, compressed_k, compression, selection, lengths))


def test_layout_sums_tiles_in_the_kernel_when_it_can():
    assert tile_scores.score_layout(28, 4, False, 64) == (16, 4, 1)  # 16 tokens x 8 heads, 4 steps per tile
    assert tile_scores.score_layout(28, 4, False, 1)[2] == 0  # token granularity: per-query rows
    assert tile_scores.score_layout(4, 4, True, 3)[2] == 0  # odd tiles: per-query rows, summed by the caller


def test_cpu_default_stays_on_torch_float64():
    q, k = torch.randn(1, 2, 32, 16), torch.randn(1, 1, 4, 16)
    assert not scoring._use_kernel(q, k, scoring.default_score_dtype("cpu", q.dtype))


@pytest.mark.parametrize("granularity", ["query_block", "token"])
def test_videonsa_geometry(granularity):
    """28 query heads over 4 kv heads, l = d = l', n blocks, forced current (VideoNSA);
    small on CPU, L = 4096 and D = 128 in bf16 on a GPU."""
    cuda = DEVICE == "cuda"
    block = 64 if cuda else 16
    compression = Compression(block=block, stride=block)
    selection = Selection(block=block, count=32 if cuda else 4, forced=("current",), scoring="group",
                          granularity=granularity, query_block=block if granularity == "query_block" else None)
    shape = dict(kv_heads=4, group=7, length=4096 if cuda else 200, dim=128 if cuda else 32, padded=True, seed=11)
    q, compressed_k, lengths = _inputs(compression, shape, torch.bfloat16 if cuda else torch.float32)
    got = scoring.select(q, compressed_k, compression, selection, lengths, kernel="triton")
    expected = scoring.select(q.cpu().double(), compressed_k.cpu().double(), compression, selection, lengths.cpu(),
                              score_dtype=torch.float64)
    _assert_same_or_tied(got.indices.cpu(), expected.indices, _tile_scores64(q, compressed_k, compression, selection, lengths))
