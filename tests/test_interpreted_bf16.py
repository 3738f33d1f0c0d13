"""bfloat16 through the Triton backend as users reach it on CPU:
``nsaflex.compile(p, backend="triton")(q, k, v)`` under ``TRITON_INTERPRET=1``.

The interpreter stores bf16 as uint16 bit patterns and its ``tl.dot`` multiplies
those integers, so the backend runs bf16 inputs there in float32 (exact for
every bf16 value) and rounds the output to bf16. Tolerance: relative 1e-2 RMS
against the float64 reference on the same (bf16-valued) inputs -- bf16 keeps 8
significant bits (relative rounding 2^-9 per value), and the GPU's bf16 kernels
round the probabilities to bf16 before the value product as well.
"""

from __future__ import annotations

import pytest
import torch

from tests.device import INTERPRETED, NOT_INTERPRETED

if not INTERPRETED:
    pytest.skip(NOT_INTERPRETED, allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nsaflex  # noqa: E402
from nsaflex.reference import reference_attention  # noqa: E402
from tests.strategies import patterns as any_patterns  # noqa: E402

BF16_TOL = 1e-2
FEW = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-6))


def _inputs(batch: int, heads: int, kv_heads: int, length: int, dim: int, seed: int, grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, length, dim, generator=gen).bfloat16().requires_grad_(grad)
                 for h in (heads, kv_heads, kv_heads))


def test_window_pattern_bf16_matches_reference():
    pattern = nsaflex.loads_pattern("name: w\nwindow: {size: 8}\ngate: {kind: constant, values: [1.0]}\n")
    q, k, v = _inputs(1, 2, 2, 20, 16, seed=0)
    out = nsaflex.compile(pattern, backend="triton", device="cpu")(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel(out, reference_attention(q, k, v, pattern)) < BF16_TOL


@FEW
@given(pattern=any_patterns(small=True, granularities=("token",), allow_layers=False, allow_budget=False,
                            allow_model=False, allow_mlp_pooling=False, gate_kinds=("constant",), hybrid=(None,)),
       length=st.integers(1, 40), group=st.sampled_from((1, 2)), seed=st.integers(0, 2**31 - 1))
def test_bf16_matches_reference(pattern, length, group, seed):
    q, k, v = _inputs(1, 2 * group, 2, length, 16, seed)
    out = nsaflex.compile(pattern, backend="triton", device="cpu")(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = reference_attention(q, k, v, pattern)
    if pattern.selection is not None:
        # bf16 scores may tie where float64 does not: judge the selection branch
        # only where the float32 path agrees with the reference.
        out32 = nsaflex.compile(pattern, backend="triton", device="cpu")(q.float(), k.float(), v.float())
        if _rel(out32, ref) > 1e-4:
            return
    assert _rel(out, ref) < BF16_TOL


def test_bf16_gradients_flow_to_bf16_inputs():
    pattern = nsaflex.loads_pattern(
        "name: cw\ncompression: {block: 4, stride: 4}\nwindow: {size: 8}\ngate: {kind: constant, values: [0.5, 1.0]}\n")
    q, k, v = _inputs(1, 2, 1, 19, 16, seed=3, grad=True)
    out = nsaflex.compile(pattern, backend="triton", device="cpu")(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = reference_attention(q, k, v, pattern)
    want = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.bfloat16, name
        assert _rel(a, b) < BF16_TOL, (name, _rel(a, b))
