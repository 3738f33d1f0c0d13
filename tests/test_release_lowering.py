"""``videonsa_release`` on FlexAttention (nsaflex.release_lowering) against the
float64 specification (nsaflex.reference_release), and the plan/runtime around it.

Tolerance: float32 inputs against the float64 reference, relative 1e-5 with an
absolute floor of 1e-6. The block choice is exact (ranked in float64 from the
same float32 inputs, as the reference ranks them), so what is left is float32
rounding in softmaxes and weighted sums of at most a few hundred O(1) terms, a
few hundred ulps (2^-24 each) at most; the floor covers entries that cancel
to near zero, where a relative bound means nothing.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nsaflex
from nsaflex.errors import BackendUnavailable, InputError, PatternError
from nsaflex.reference_release import release_attention, release_pattern
from nsaflex.release_lowering import (
    QUIRK_CHOICES,
    ReleaseFlexKernel,
    ReleaseLowering,
    lse_as_read,
    release_selection,
    slot_layout,
    to_slots,
)
from nsaflex.spec import Compression, Gate, Hybrid, LayerOverride, Model, Pattern, Selection, Window
from tests.device import INTERPRETED

# fp32 against float64. Elementwise: relative 1e-5, and absolute 1e-5 for outputs near 0, which
# carry the rounding of O(1) terms summed over the keys and the three branches (~1e-6 each).
RTOL, ATOL = 1e-5, 1e-5
# (query heads, kv heads): 28/4 is VideoNSA (64 slots, 8 zero); the others pad to
# 32 slots with none zero (12/2: 24 real of 32, 16/2, 8/1), or drop a whole zero kv group (4/2).
HEAD_LAYOUTS = ((28, 4), (12, 2), (16, 2), (8, 1), (4, 2))


def release(block: int = 4, count: int = 3, window: int = 5) -> Pattern:
    return release_pattern(Pattern(
        name="release",
        compression=Compression(block=block, stride=block),
        selection=Selection(block=block, count=count),
        window=Window(size=window),
        gate=Gate(kind="mlp"),
        hybrid=Hybrid(vision_keys="vision"),
    ))


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def expected_rows(q, k, v, pattern, gates, types, lengths) -> torch.Tensor:
    """The reference on each row's real tokens, zeros at padding."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        if n:
            out[b, :, :n] = release_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], pattern,
                                              gates[b : b + 1, :, :n], types[b : b + 1, :n])[0]
    return out


@st.composite
def release_cases(draw, blocks=(2, 4, 8), dims=(4, 8), scales=(1.0, 3.0)):
    """(pattern, q, k, v, gates, token_types, lengths) of a release case: a head
    layout of HEAD_LAYOUTS, a block of ``blocks``, a head dim of ``dims``, queries
    scaled by one of ``scales``."""
    heads, kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    block = draw(st.sampled_from(blocks))
    pattern = release(block, draw(st.integers(1, 6)), draw(st.integers(1, 10)))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 40))
    # Rows shorter than the batch (padding), including rows shorter than a block.
    lengths = torch.tensor([length] + [draw(st.integers(0, length)) for _ in range(batch - 1)])
    dim = draw(st.sampled_from(dims))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(("mixed", "text", "vision")))
        if kind == "mixed":
            rows.append((torch.rand(length, generator=generator) < 0.6).long() * draw(st.sampled_from((1, 2))))
        else:
            rows.append(torch.full((length,), 0 if kind == "text" else 1, dtype=torch.long))
    types = torch.stack(rows)
    q = torch.randn(batch, heads, length, dim, generator=generator) * draw(st.sampled_from(scales))
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    gates = torch.rand(batch, heads, length, 3, generator=generator)
    return pattern, q, k, v, gates, types, lengths


@settings(max_examples=60)
@given(release_cases())
def test_flex_release_equals_reference(case):
    pattern, q, k, v, gates, types, lengths = case
    attn = nsaflex.compile(pattern, "flex", mode="videonsa_release", flex_mode="eager")
    got = attn(q, k, v, gates, types, lengths=lengths)
    expected = expected_rows(q.double(), k.double(), v.double(), pattern, gates.double(), types, lengths)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=ATOL)


def test_short_rows_and_text_rows():
    """Rows of 1 and 3 tokens under a block of 4, an all-text row, 28 heads over 4."""
    pattern = release(block=4, count=2, window=3)
    q, k, v = randn(4, 28, 9, 8, seed=1), randn(4, 4, 9, 8, seed=2), randn(4, 4, 9, 8, seed=3)
    gates = torch.rand(4, 28, 9, 3, generator=torch.Generator().manual_seed(4))
    types = torch.ones(4, 9, dtype=torch.long)
    types[1] = 0
    lengths = torch.tensor([9, 9, 3, 1])
    got = nsaflex.compile(pattern, "flex", mode="videonsa_release", flex_mode="eager")(q, k, v, gates, types, lengths=lengths)
    expected = expected_rows(q.double(), k.double(), v.double(), pattern, gates.double(), types, lengths)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=ATOL)
    assert torch.equal(got[2, :, 3:], torch.zeros_like(got[2, :, 3:]))


def quirk_case(seed: int = 0):
    """48 tokens, blocks of 4, 3 (-> 4) selected of up to 12: every selection option can matter."""
    pattern = release(block=4, count=3, window=3)
    q = randn(2, 4, 48, 8, seed=seed, scale=2.0)
    k, v = randn(2, 2, 48, 8, seed=seed + 1), randn(2, 2, 48, 8, seed=seed + 2)
    gates = torch.rand(2, 4, 48, 3, generator=torch.Generator().manual_seed(seed + 3))
    types = (torch.rand(2, 48, generator=torch.Generator().manual_seed(seed + 4)) < 0.6).long()
    return pattern, q, k, v, gates, types


@pytest.mark.parametrize("quirk", list(QUIRK_CHOICES))
def test_each_quirk_changes_the_output(quirk):
    """Turning one quirk off moves the output far from the reference (so a lowering
    that dropped it would fail the equality tests); all on, it is the reference."""
    pattern, q, k, v, gates, types = quirk_case()
    expected = release_attention(q.double(), k.double(), v.double(), pattern, gates.double(), types)
    released = ReleaseFlexKernel(pattern, mode="eager")(q, k, v, gates, types)
    torch.testing.assert_close(released.double(), expected, rtol=RTOL, atol=ATOL)
    off = ReleaseLowering(**{quirk: QUIRK_CHOICES[quirk][1]})
    assert not off.is_release and ReleaseLowering().is_release
    dropped = ReleaseFlexKernel(pattern, off, mode="eager")(q, k, v, gates, types)
    assert (dropped.double() - expected).abs().max() > 0.05


def test_lowering_choices_are_checked():
    with pytest.raises(InputError, match="lse_layout"):
        ReleaseLowering(lse_layout="transposed")


def test_compiled_cpu_flex_equals_reference():
    """The compiled FlexAttention kernels (what CPU inference runs) with padding."""
    pattern, q, k, v, gates, types = quirk_case(seed=5)
    q, k, v = (torch.nn.functional.pad(x, (0, 8)) for x in (q, k, v))  # head dim 16
    lengths = torch.tensor([48, 29])
    got = nsaflex.compile(pattern, "flex", mode="videonsa_release", flex_mode="compiled")(q, k, v, gates, types, lengths=lengths)
    expected = expected_rows(q.double(), k.double(), v.double(), pattern, gates.double(), types, lengths)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=ATOL)


@settings(max_examples=25)
@given(release_cases(), st.integers(1, 16))
def test_selection_does_not_depend_on_the_chunk(case, chunk):
    """Chunks of queries (memory O(chunk * P * N), never [L, L]) choose what one chunk does."""
    pattern, q, k, v, gates, types, lengths = case
    layout = slot_layout(q.shape[1], k.shape[1], ReleaseLowering())
    vision = ((types != 0) & (torch.arange(q.shape[2])[None] < lengths[:, None])).to(q.dtype)[:, None, :, None]
    qp, keys = to_slots(q * vision, layout), (k * vision)[:, : layout.run_kv_heads]
    whole = release_selection(qp, keys, layout, lengths, pattern, ReleaseLowering(), chunk=q.shape[2])
    pieces = release_selection(qp, keys, layout, lengths, pattern, ReleaseLowering(), chunk=chunk)
    assert torch.equal(whole.indices, pieces.indices)


def test_misread_lse_reads_the_flat_buffer():
    """Q6: row b's [P, L_b] buffer read as [L_b, P] (element t*P + s), per row length."""
    lse = torch.arange(2 * 4 * 6, dtype=torch.float64).view(2, 4, 6)  # [B, P, Lmax]
    lengths = torch.tensor([6, 3])
    read = lse_as_read(lse, torch.arange(3), 4, lengths, ReleaseLowering())
    for b, n in enumerate((6, 3)):
        flat = lse[b, :, :n].flatten()
        for t in range(3):
            assert torch.equal(read[b, :, t], flat[t * 4 : t * 4 + 4])


# --- plan and runtime ---------------------------------------------------------------------------------


def test_plan_records_the_release_lowering():
    pattern = release()
    on_cuda = nsaflex.make_plan(pattern, "auto", "cuda", mode="videonsa_release")
    if INTERPRETED:  # the Triton kernels cannot compile for CUDA here: flex, the refusal recorded
        assert on_cuda.backend == "flex" and [name for name, _ in on_cuda.reasons] == ["triton"]
    else:
        assert on_cuda.backend == "triton" and on_cuda.reasons == ()
    assert nsaflex.make_plan(pattern, "auto", "cpu", mode="videonsa_release").backend == "reference"
    plan = nsaflex.make_plan(pattern, "flex", "cpu", mode="videonsa_release")
    record = plan.to_dict()
    assert record["mode"] == "videonsa_release" and record["release"] == ReleaseLowering().to_dict()
    assert [b["branch"] for b in record["branches"]] == ["compression", "selection", "window", "dense"]
    selection = record["branches"][1]["constants"]
    assert selection["selected"] == 4 and selection["lse_layout"] == "misread"
    assert nsaflex.make_plan(pattern, "flex", "cpu").to_dict()["mode"] == "faithful"
    layered = dataclasses.replace(pattern, layers=(LayerOverride(at=(1,), dense=True),))
    sub = nsaflex.make_plan(layered, "flex", "cpu", mode="videonsa_release").layers[0][1]
    assert sub.mode == "videonsa_release" and [b.branch for b in sub.branches] == ["dense"]


def test_release_plan_refusals():
    if INTERPRETED:
        with pytest.raises(BackendUnavailable, match="triton.*TRITON_INTERPRET"):
            nsaflex.make_plan(release(), "triton", "cuda", mode="videonsa_release")
    with pytest.raises(BackendUnavailable, match="triton.*head dim"):
        nsaflex.make_plan(dataclasses.replace(release(), model=Model(head_dim=24)), "triton", mode="videonsa_release")
    with pytest.raises(InputError, match="mode"):
        nsaflex.make_plan(release(), "flex", "cpu", mode="release")
    with pytest.raises(PatternError, match="compression.visibility"):
        nsaflex.make_plan(dataclasses.replace(release(), compression=Compression(4, 4)), "flex", "cpu", mode="videonsa_release")


def test_runtime_release_arguments():
    pattern = release()
    q, k, v = randn(2, 4, 10, 8, seed=1), randn(2, 2, 10, 8, seed=2), randn(2, 2, 10, 8, seed=3)
    gates = torch.rand(2, 4, 10, 3, generator=torch.Generator().manual_seed(4))
    types = torch.ones(2, 10, dtype=torch.long)
    attn = nsaflex.compile(pattern, "flex", mode="videonsa_release", flex_mode="eager")
    with pytest.raises(InputError, match="lengths"):
        attn(q, k, v, gates, types, lengths=torch.tensor([10, 11]))
    with pytest.raises(InputError, match="lengths"):
        attn(q, k, v, gates, types, lengths=torch.tensor([10.0, 3.0]))
    with pytest.raises(InputError, match="return_info"):
        attn(q, k, v, gates, types, return_info=True)
    faithful = nsaflex.compile(dataclasses.replace(pattern, hybrid=Hybrid("vision")), "flex", flex_mode="eager")
    with pytest.raises(InputError, match="lengths"):
        faithful(q, k, v, gates, types, lengths=torch.tensor([10, 10]))
    # The scale multiplies every score, so it is q scaled.
    scaled = attn(q, k, v, gates, types, scale=0.2)
    torch.testing.assert_close(scaled, attn(q * (0.2 * math.sqrt(8)), k, v, gates, types), rtol=RTOL, atol=ATOL)
    reference = nsaflex.compile(pattern, "reference", mode="videonsa_release")
    torch.testing.assert_close(reference(q, k, v, gates, types, scale=0.2), scaled, rtol=RTOL, atol=ATOL)


def test_float32_ranking_breaks_exact_ties_as_the_reference():
    """Zero-query text rows and all-text blocks (zeroed keys) score exactly alike:
    the float32 ranking (CUDA's default) keeps them to the lower index as float64 does."""
    pattern = release(block=2, count=3, window=2)
    q, k = randn(2, 4, 30, 8, seed=7), randn(2, 2, 30, 8, seed=8)
    types = torch.zeros(2, 30, dtype=torch.long)
    types[1, 12:] = 1  # row 1: text blocks (zero keys) before vision ones
    lengths = torch.tensor([30, 30])
    layout = slot_layout(4, 2, ReleaseLowering())
    vision = (types != 0).to(q.dtype)[:, None, :, None]
    qp, keys = to_slots(q * vision, layout), (k * vision)[:, : layout.run_kv_heads]
    wide = release_selection(qp, keys, layout, lengths, pattern, ReleaseLowering(), score_dtype=torch.float64)
    narrow = release_selection(qp, keys, layout, lengths, pattern, ReleaseLowering(), score_dtype=torch.float32)
    assert torch.equal(wide.indices[0], narrow.indices[0])  # every earlier block of row 0 ties
    # rank order: the current block (its slot count beats any tie), then the lowest earlier ones
    assert torch.equal(wide.indices[0, :, 20], torch.tensor([[10, 0, 1, 2]] * layout.run_kv_heads, dtype=torch.int32))
    assert torch.equal(wide.indices[1, :, :12], narrow.indices[1, :, :12])


@pytest.mark.parametrize("device, length, dim", [
    pytest.param("cuda", 700, 128, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention on CUDA")),
    ("cpu", 90, 8),
])
def test_bf16_release_equals_reference(device, length, dim):
    """bf16 (on the GPU: compiled FlexAttention), ranked in float64 (the reference's
    choice; float32 ranking may order near-ties otherwise) against the reference on
    the same bf16 values: relative 1e-2, bf16's 8-bit mantissa (2^-9 per rounding)
    over a few roundings of the pooled tokens, the branch outputs and the mix."""
    pattern = release(block=16 if device == "cuda" else 4, count=5, window=32 if device == "cuda" else 6)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, h, length, dim, generator=gen).to(torch.bfloat16) for h in (28, 4, 4))
    gates = torch.rand(2, 28, length, 3, generator=gen)
    types = (torch.rand(2, length, generator=gen) < 0.8).long()
    lengths = torch.tensor([length, length * 2 // 3])
    attn = nsaflex.compile(pattern, "flex", device=device, mode="videonsa_release", score_dtype="float64")
    got = attn(*(x.to(device) for x in (q, k, v, gates, types)), lengths=lengths.to(device)).cpu()
    assert got.dtype == torch.bfloat16
    expected = expected_rows(q.double(), k.double(), v.double(), pattern, gates.double(), types, lengths)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)


def test_gradients_equal_the_reference():
    """Backward through the lowering (CPU: the eager evaluation of the same tiles and
    mask_mods) against autograd through the float64 reference; the selection is a
    constant of both (no gradient through the choice of blocks)."""
    pattern, q, k, v, gates, types = quirk_case(seed=9)
    lengths = torch.tensor([48, 21])
    weights = randn(*q.shape, seed=10)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    out = nsaflex.compile(pattern, "flex", mode="videonsa_release")(*inputs, types, lengths=lengths)
    got = torch.autograd.grad((out * weights).sum(), inputs)
    wide = [x.double().requires_grad_() for x in (q, k, v, gates)]
    expected = expected_rows(*wide[:3], pattern, wide[3], types, lengths)
    want = torch.autograd.grad((expected * weights.double()).sum(), wide)
    for name, g, w in zip(("q", "k", "v", "gates"), got, want):
        # A gradient entry sums up to L x P slot terms of O(1): a ten times wider floor.
        torch.testing.assert_close(g.double(), w, rtol=RTOL, atol=1e-5, msg=name)


@pytest.mark.parametrize("flex_mode", ["eager", "compiled"])
def test_float32_ranking_reads_the_branch_lse(flex_mode):
    """float32 ranking (CUDA's default) takes the compression branch's own log-sum-exp
    (FlexAttention's, one call; compiled on CPU, which has no log-sum-exp output, a
    float32 pass of its own) instead of a float64 pass; on these inputs no two block
    scores lie within float32's reach of each other, so the choice, and the output,
    are the reference's."""
    pattern, q, k, v, gates, types = quirk_case(seed=12)
    q, k, v = (torch.nn.functional.pad(x, (0, 8)) for x in (q, k, v))  # head dim 16 for the compiled kernels
    lengths = torch.tensor([48, 37])
    attn = nsaflex.compile(pattern, "flex", mode="videonsa_release", flex_mode=flex_mode, score_dtype="float32")
    got = attn(q, k, v, gates, types, lengths=lengths)
    expected = expected_rows(q.double(), k.double(), v.double(), pattern, gates.double(), types, lengths)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=ATOL)
