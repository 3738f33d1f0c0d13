"""The scoring kernels that both fast backends run (``cmp_lse_kernel`` and
``cmp_score_kernel`` of nsaflex.kernels.forward, launched through
nsaflex.kernels.ops) against the float64 reference, and nsaflex.scoring's
kernel path (the flex backend's) against its torch path.

On CPU they run under ``TRITON_INTERPRET=1`` (set here when no CUDA device is
present, before triton is imported); ``NSAFLEX_TEST_DEVICE=cuda`` runs them on
the GPU (bf16 there as well).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.device import DEVICE, skip_module_without_device

skip_module_without_device()

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nsaflex import reference as ref  # noqa: E402
from nsaflex import scoring  # noqa: E402
from nsaflex.pooling import compress  # noqa: E402
from nsaflex.spec import Compression, Selection  # noqa: E402

triton = pytest.importorskip("triton")
from nsaflex.kernels import ops  # noqa: E402

EXAMPLES = int(os.environ.get("NSAFLEX_TEST_EXAMPLES", "12"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def cases(draw):
    # l'/d a power of two (the score pass's steps); stride 3 gives tiles m that are not
    stride = draw(st.sampled_from((2, 3, 4, 8)))
    block = stride * draw(st.integers(1, 2))
    sel_block = stride * draw(st.sampled_from((1, 2, 4)))
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


def _kernel_scores(q, compressed_k, compression, selection, lengths, start, stop):
    """``cmp_score_kernel``'s ``[B, Hs, units, J]`` block scores of queries
    ``[start, stop)`` (after ``cmp_lse_kernel`` without output), as
    nsaflex.scoring launches them; NaN where the kernel writes nothing."""
    cfg = ops.scoring_config(compression, selection)
    batch, query_heads, length, dim = q.shape
    kv_heads, num = compressed_k.shape[1], compressed_k.shape[2]
    lengths = lengths.to(torch.long)
    row_compressed = torch.clamp(torch.div(lengths - compression.block, compression.stride, rounding_mode="floor") + 1,
                                 min=0, max=num)
    zeros = torch.zeros_like(lengths)
    lay = ops.SeqLayout(zeros, lengths, zeros, row_compressed, length, num, False, int(row_compressed.min()))
    qk, kk = scoring._kernel_inputs(q, compressed_k)
    launch = ops.launch_choices(qk.shape[-1], query_heads // kv_heads)
    tiles = ops._Tiles(cfg, launch, query_heads // kv_heads)
    scale_log2 = dim**-0.5 * 1.4426950408889634
    lse = torch.empty(batch, query_heads, length, dtype=torch.float32, device=q.device)
    ops.compression_lse(qk, kk, None, lse, None, lay, cfg, launch, tiles, scale_log2)
    selecting = query_heads if selection.scoring == "head" else kv_heads
    out = torch.full((batch, selecting, -(-(stop - start) // cfg.unit), -(-length // selection.block)), float("nan"),
                     device=q.device)
    ops.block_scores(qk, kk, lse, out, lay, cfg, launch, tiles, start, stop, scale_log2)
    return out, tiles


@PROPERTY
@given(cases(), st.integers(0, 3))
def test_unit_block_scores_match_the_reference(case, chunk_index):
    """Every candidate block's score of every unit (a query, or a tile of m
    queries: probabilities summed over the tile and the group, then Eq. 9) in
    a query chunk equals the float64 reference's within float32 rounding
    (relative 2e-5: sums of up to 7 heads x tiles of up to 24 queries x Eq. 9
    terms, each a few roundings of 2^-24); forced candidates read -1, blocks
    that are not candidates stay unwritten."""
    compression, selection, shape = case
    q, compressed_k, lengths = _inputs(compression, shape)
    cfg = ops.scoring_config(compression, selection)
    unit = cfg.unit
    length = q.shape[2]
    tiles = ops._Tiles(cfg, ops.launch_choices(16, shape["group"]), shape["group"])
    programs = -(-length // tiles.tp_score)
    rows = tiles.tp_score * max(1, programs // 2)  # two or more chunks
    start = min(chunk_index * rows, (programs - 1) * tiles.tp_score)
    stop = min(length, start + rows)
    got, _ = _kernel_scores(q, compressed_k, compression, selection, lengths, start, stop)
    padded_q = torch.nn.functional.pad(q, (0, 0, 0, max(0, start + rows - length)))
    summed = _reference_unit_scores(padded_q, compressed_k, compression, selection, lengths, unit, start, rows)
    expected = scoring.eq9_block_scores(summed, compression, selection, got.shape[-1])[:, :, : got.shape[2]]
    first = torch.arange(start, stop, unit)
    candidate = torch.arange(got.shape[-1])[None, :] < torch.div(first + 1, selection.block, rounding_mode="floor")[:, None]
    forced = scoring.forced_slots(first, selection)
    is_forced = (torch.arange(got.shape[-1])[None, :, None] == forced[:, None, :]).any(dim=-1) & candidate
    started = first[None, :] < lengths.cpu()[:, None]  # [B, u]
    got = got.double().cpu()
    written = candidate[None, None] & started[:, None, :, None]
    assert torch.isnan(got[~written.expand_as(got)]).all()
    assert (got[(written & is_forced[None, None]).expand_as(got)] == -1).all()
    free = (written & ~is_forced[None, None]).expand_as(got)
    torch.testing.assert_close(got[free], expected[free], rtol=2e-5, atol=2e-6)


def test_lse_pass_without_output_is_the_lse_with_it():
    """cmp_lse_kernel's OUTPUT=False path (the flex backend's scoring) gives the
    same log-sum-exp, bit for bit, as the Triton backend's pass with the output."""
    compression = Compression(block=8, stride=4)
    selection = Selection(block=8, count=2)
    q, compressed_k, lengths = _inputs(compression, dict(kv_heads=2, group=3, length=50, dim=16, padded=True, seed=3))
    cfg = ops.scoring_config(compression, selection)
    row_compressed = torch.clamp(torch.div(lengths - 8, 4, rounding_mode="floor") + 1, min=0)
    zeros = torch.zeros_like(lengths)
    lay = ops.SeqLayout(zeros, lengths, zeros, row_compressed, 50, compressed_k.shape[2], False, int(row_compressed.min()))
    launch = ops.launch_choices(16, 3)
    tiles = ops._Tiles(cfg, launch, 3)
    alone, with_output = (torch.zeros(2, 6, 50, device=DEVICE) for _ in range(2))
    output = torch.zeros_like(q)
    ops.compression_lse(q, compressed_k, None, alone, None, lay, cfg, launch, tiles)
    ops.compression_lse(q, compressed_k, compressed_k, with_output, output, lay, cfg, launch, tiles)
    assert torch.equal(alone, with_output)
    assert output.abs().sum() > 0


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


def test_score_programs_hold_whole_units():
    """A score-pass program holds whole units: 16 tokens of units that divide
    16, else one unit (sub-tiles of 16 tokens; the last masked past the unit)."""
    from nsaflex.kernels.forward import unit_tile_tokens

    assert [unit_tile_tokens(16, m) for m in (1, 2, 8, 16, 32, 64, 128, 3, 12, 24)] == \
        [16, 16, 16, 16, 32, 64, 128, 3, 12, 24]


def test_cpu_default_stays_on_torch_float64():
    q, k = torch.randn(1, 2, 32, 16), torch.randn(1, 1, 4, 16)
    assert not scoring._use_kernel(q, k, Compression(block=4, stride=4), Selection(block=4, count=1),
                                   scoring.default_score_dtype("cpu", q.dtype))


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
