"""``videonsa_release`` on the Triton kernels (nsaflex.release_lowering's
ReleaseTritonKernel) against the float64 specification (nsaflex.reference_release).

On the CPU the kernels run under Triton's interpreter (``tests/device.py``);
``NSAFLEX_TEST_DEVICE=cuda`` runs the compiled kernels, bf16 included.

Tolerances: float32 against float64, relative 1e-5 with an absolute floor of
1e-5 (as tests/test_release_lowering.py: float32 rounding of softmaxes and sums
of a few hundred O(1) terms); bf16 relative 1e-2 (an 8-bit mantissa, a few
roundings). The Triton kernels rank blocks in float32 where the reference ranks
in float64: exact ties (zeroed text queries, zeroed text keys) stay exact in
both and go to the lower index (``test_block_lists_are_the_release_ranking``
checks the lists exactly); elsewhere the two may order a near-tie otherwise, so
the reference takes the kernels' choice where they differ, after checking that
the blocks concerned are near-tied (:func:`expected_with_kernel_blocks`).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings

from tests.device import DEVICE, skip_module_without_device

skip_module_without_device()

import nsaflex  # noqa: E402
from nsaflex import reference_release  # noqa: E402
from nsaflex.reference_release import release_attention  # noqa: E402
from nsaflex.kernels import ops  # noqa: E402
from nsaflex.release_lowering import (  # noqa: E402
    QUIRK_CHOICES,
    ReleaseFlexKernel,
    ReleaseLowering,
    ReleaseTritonKernel,
    release_selection,
    slot_layout,
    to_slots,
)
from tests.test_release_lowering import ATOL, RTOL, quirk_case, release, release_cases  # noqa: E402

EXAMPLES = 12 if DEVICE == "cpu" else 10
# Near-ties: float32 scores (the GPU's exp2 is approximate to a few ulps) may order blocks
# whose float64 scores lie within 1e-5 of each other otherwise; bf16 pooled keys move a
# score by about q . dKc ~ 2^-9 |q| |Kc| / sqrt(D), a few tenths of a percent, summed over
# the slots: 5 %.
NEAR_FP32, NEAR_BF16 = 1e-5, 5e-2


def run(pattern, *tensors, lengths, dtype=torch.float32):
    """The Triton release on ``DEVICE`` and the block lists it ran ``[B, Hkv', L, W]``."""
    attn = nsaflex.compile(pattern, "triton", device=DEVICE, mode="videonsa_release")
    q, k, v, gates, types = tensors
    moved = [x.to(DEVICE, dtype) for x in (q, k, v)] + [gates.to(DEVICE), types.to(DEVICE)]
    with ops.record_forward() as seen:
        out = attn(*moved, lengths=lengths.to(DEVICE))
    return out.cpu(), seen["sel"].cpu()


def expected_with_kernel_blocks(q, k, v, pattern, gates, types, lengths, lists, near: float):
    """The float64 reference on each row's real tokens (zeros at padding), where its
    top-n and the kernels' block lists ``[B, Hkv', L, W]`` differ taking the
    kernels' choice, after checking that every block in which they differ scores
    within relative ``near`` of the reference's last chosen score (a near-tie that
    float32 scores, or bf16 pooled keys, may order otherwise)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    top_blocks = reference_release.top_blocks

    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            continue

        def kernels_choice(scores, eligible, take, b=b, n=n):
            chosen = top_blocks(scores, eligible, take)
            for h in range(lists.shape[1]):
                for t in range(n):
                    got = torch.zeros(scores.shape[2], dtype=torch.bool)
                    got[[x for x in lists[b, h, t].tolist() if x >= 0]] = True
                    if torch.equal(got, chosen[h, t]):
                        continue
                    row = scores[h, t].detach()
                    last = row[chosen[h, t]].min()
                    differ = (got ^ chosen[h, t]).nonzero().flatten()
                    assert ((row[differ] - last).abs() <= near * last.abs()).all(), (b, h, t, row[differ], last)
                    chosen[h, t] = got
            return chosen

        with mock.patch.object(reference_release, "top_blocks", kernels_choice):
            out[b, :, :n] = release_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n],
                                              pattern, gates[b : b + 1, :, :n], types[b : b + 1, :n])[0]
    return out


@settings(max_examples=EXAMPLES)
@given(release_cases(blocks=(4, 8, 16), dims=(16,), scales=(1.0,)))
def test_triton_release_equals_reference(case):
    """Head layouts that pad to 64 or 32 slots (some zero, or a whole zero kv group
    not run), rows of every class mix, padding, rows shorter than a block."""
    pattern, q, k, v, gates, types, lengths = case
    got, lists = run(pattern, q, k, v, gates, types, lengths=lengths)
    expected = expected_with_kernel_blocks(q.double(), k.double(), v.double(), pattern, gates.double(), types, lengths,
                                           lists, NEAR_FP32)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=ATOL)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(got[b, :, n:], torch.zeros_like(got[b, :, n:]))


def test_block_lists_are_the_release_ranking():
    """The lists the kernels ran (recorded) hold the blocks the torch ranking of the
    release chooses in float64, per kv head of the run slots and query: the own block
    with its slot count (Q5), the power-of-two count (3 -> 4, Q7), the misread
    log-sum-exp (Q6)."""
    pattern, q, k, v, gates, types = quirk_case(seed=3)
    q, k, v = (torch.nn.functional.pad(x, (0, 8)) for x in (q, k, v))  # head dim 16
    lengths = torch.tensor([48, 33])
    with ops.record_forward() as seen:
        ReleaseTritonKernel(pattern)(*(x.to(DEVICE) for x in (q, k, v, gates, types)), lengths=lengths.to(DEVICE))
    lists = seen["sel"].cpu()
    layout = slot_layout(q.shape[1], k.shape[1], ReleaseLowering())
    real = torch.arange(48)[None] < lengths[:, None]
    vision = ((types != 0) & real).to(q.dtype)[:, None, :, None]
    qp, keys = to_slots(q * vision, layout), (k * vision)[:, : layout.run_kv_heads]
    wanted = release_selection(qp.double(), keys.double(), layout, lengths, pattern, ReleaseLowering(),
                               score_dtype=torch.float64).indices
    for b, n in enumerate(lengths.tolist()):
        for h in range(wanted.shape[1]):
            for t in range(n):
                got = sorted(x for x in lists[b, h, t].tolist() if x >= 0)
                assert got == sorted(x for x in wanted[b, h, t].tolist() if x >= 0), (b, h, t)


def test_gradients_equal_the_reference():
    """Backward through the kernels (the release's block lists kept by the forward)
    against autograd through the float64 reference; the selection is a constant of
    both."""
    pattern, q, k, v, gates, types = quirk_case(seed=9)
    q, k, v = (torch.nn.functional.pad(x, (0, 8)) for x in (q, k, v))
    lengths = torch.tensor([48, 21])
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(10))
    inputs = [x.to(DEVICE).clone().requires_grad_() for x in (q, k, v, gates)]
    attn = nsaflex.compile(pattern, "triton", device=DEVICE, mode="videonsa_release")
    with ops.record_forward() as seen:
        out = attn(*inputs, types.to(DEVICE), lengths=lengths.to(DEVICE))
    got = torch.autograd.grad((out * weights.to(DEVICE)).sum(), inputs)
    wide = [x.double().requires_grad_() for x in (q, k, v, gates)]
    expected = expected_with_kernel_blocks(*wide[:3], pattern, wide[3], types, lengths, seen["sel"].cpu(), NEAR_FP32)
    want = torch.autograd.grad((expected * weights.double()).sum(), wide)
    for name, g, w in zip(("q", "k", "v", "gates"), got, want):
        # A gradient entry sums up to L x P slot terms of O(1): the floor of the outputs' test.
        torch.testing.assert_close(g.cpu().double(), w, rtol=RTOL, atol=1e-5, msg=name)


@pytest.mark.parametrize("length, dim", [(90, 16)] if DEVICE == "cpu" else [(90, 16), (1000, 128)])
def test_bf16_release_equals_reference(length, dim):
    """bf16 inputs (on the CPU the interpreter runs them as float32, every bf16 value
    exact there), 28 query heads over 4 kv heads, against the reference on the same
    bf16 values: relative 1e-2."""
    pattern = release(block=16, count=5, window=32)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, h, length, dim, generator=gen).to(torch.bfloat16) for h in (28, 4, 4))
    gates = torch.rand(2, 28, length, 3, generator=gen)
    types = (torch.rand(2, length, generator=gen) < 0.8).long()
    lengths = torch.tensor([length, length * 2 // 3])
    got, lists = run(pattern, q, k, v, gates, types, lengths=lengths, dtype=torch.bfloat16)
    expected = expected_with_kernel_blocks(q.double(), k.double(), v.double(), pattern, gates.double(), types, lengths,
                                           lists, NEAR_BF16)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)


def test_lowerings_the_kernels_do_not_take_are_refused():
    """Quirk-off lowerings (analysis only) whose selection the Triton score pass
    cannot express name the field; flex and the reference run them."""
    pattern = quirk_case()[0]
    for off in (dict(current_block_score="scored"), dict(compression_visibility="causal")):
        with pytest.raises(nsaflex.InputError, match="current_block_score"):
            ReleaseTritonKernel(pattern, ReleaseLowering(**off))


@pytest.mark.parametrize("quirk", ["text_keys", "dense_pass", "head_layout", "lse_layout", "count_rounding"])
def test_quirk_off_lowerings_equal_flex(quirk):
    """The lowerings with one quirk off that the Triton kernels take (analysis only)
    give what the flex lowering gives with the same quirk off (eager, its float64
    ranking on the CPU; float32 on CUDA)."""
    pattern, q, k, v, gates, types = quirk_case(seed=4)
    q, k, v = (torch.nn.functional.pad(x, (0, 8)) for x in (q, k, v))
    off = ReleaseLowering(**{quirk: QUIRK_CHOICES[quirk][1]})
    inputs = [x.to(DEVICE) for x in (q, k, v, gates, types)]
    got = ReleaseTritonKernel(pattern, off)(*inputs)
    want = ReleaseFlexKernel(pattern, off, mode="eager")(*inputs)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
