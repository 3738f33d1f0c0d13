"""``attn(..., return_info=True / return_lse=True, scale=...)`` on every backend
against the float64 reference's own per-branch values
(:func:`nsaflex.reference.reference_attention` with ``return_branches``).

Tolerances: float32 kernels against the float64 reference, relative 1e-5 on
outputs (as every backend test); log-sum-exps absolute 1e-5 (they are O(1)
and may cross zero, where a relative bound means nothing). Block lists must
be equal: the inputs are random normals at tiny sizes, where no two block
scores come within float32 rounding of each other (tests/test_ties.py covers
near-ties)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nsaflex
from nsaflex.errors import InputError
from nsaflex.inspect import block_lists
from nsaflex.reference import reference_attention
from nsaflex.spec import Compression, Gate, Hybrid, Pattern, Selection, Window
from tests.device import INTERPRETED, NOT_INTERPRETED

BACKENDS = ["reference", "flex", "triton"]
REL = 1e-5
LSE_ABS = 1e-5


def _pattern(scoring: str = "group", hybrid: bool = False, gate: str = "mlp", query_block: bool = False) -> Pattern:
    tiles = dict(granularity="query_block", query_block=4) if query_block else {}
    return Pattern(
        name="info",
        compression=Compression(block=4, stride=4),
        selection=Selection(block=4, count=2, forced=("first",), scoring=scoring, **tiles),
        window=Window(size=4),
        gate=Gate(kind="mlp") if gate == "mlp" else Gate(kind="constant", values=(0.2, 0.3, 0.5)),
        hybrid=Hybrid(vision_keys="vision") if hybrid else None,
    )


def _inputs(seed: int, batch: int, kv_heads: int, group: int, length: int, hybrid: bool, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    gates = torch.rand(batch, kv_heads * group, length, 3, generator=gen)
    types = (torch.rand(batch, length, generator=gen) < 0.7).long() if hybrid else None
    return q, k, v, gates, types


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _same_lse(got: torch.Tensor, want: torch.Tensor) -> None:
    want = want.to(got.dtype)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    if finite.any():  # a branch may see no key in any row (short rows, text rows)
        assert float((got[finite].double() - want[finite].double()).abs().max()) < LSE_ABS


def _compile(pattern: Pattern, backend: str):
    if backend == "triton" and not INTERPRETED:
        pytest.skip(NOT_INTERPRETED)
    return nsaflex.compile(pattern, backend=backend, device="cpu")


# (backend, query_block)
CASES = [("reference", False), ("flex", False), ("triton", False), ("reference", True), ("flex", True), ("triton", True)]


@pytest.mark.parametrize("hybrid", [False, True], ids=["whole-rows", "hybrid"])
@pytest.mark.parametrize("backend,query_block", CASES, ids=[f"{b}{'-qblock' if t else ''}" for b, t in CASES])
@settings(max_examples=3, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    length=st.integers(5, 24),
    scoring=st.sampled_from(["group", "head"]),
)
def test_info_equals_the_reference_per_branch(backend, query_block, hybrid, seed, batch, kv_heads, group, length,
                                              scoring):
    pattern = _pattern(scoring, hybrid, query_block=query_block)
    q, k, v, gates, types = _inputs(seed, batch, kv_heads, group, length, hybrid)
    out, info = _compile(pattern, backend)(q, k, v, gates, types, return_info=True)
    want = reference_attention(q, k, v, pattern, gates, types, return_branches=True)
    assert info.branches == ("compression", "selection", "window")
    assert torch.equal(info.sparse_queries.cpu(), want["sparse_queries"])
    assert torch.equal(info.gates, gates)
    for name in info.branches:
        assert info.outputs[name].shape == q.shape
        assert _rel(info.outputs[name], want["outputs"][name]) < REL
        _same_lse(info.lse[name], want["lse"][name])
    hsel = q.shape[1] if scoring == "head" else k.shape[1]
    chosen = want["blocks"] if scoring == "head" else want["blocks"][:, :: group]
    expected = block_lists(chosen, pattern.selection.count)
    assert info.selected_blocks.shape == (batch, hsel, length, pattern.selection.count)
    assert torch.equal(info.selected_blocks, expected)
    # the output is the gated mix on sparse queries and the dense path elsewhere
    mixed = sum(gates[..., i, None] * info.outputs[name] for i, name in enumerate(info.branches))
    sparse = info.sparse_queries[:, None, :, None]
    if hybrid and info.dense_output is not None:
        assert _rel(info.dense_output[~sparse.expand_as(out)], want["dense_output"][~sparse.expand_as(out)]) < REL
        mixed = torch.where(sparse, mixed, info.dense_output)
    assert _rel(out, mixed) < REL


def test_text_queries_carry_nothing_in_the_branches():
    pattern = _pattern(hybrid=True)
    q, k, v, gates, _ = _inputs(3, 1, 1, 2, 12, True)
    types = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0]])
    _, lse, info = nsaflex.compile(pattern, backend="reference")(q, k, v, gates, types, return_lse=True, return_info=True)
    text = types[0] == 0
    assert torch.equal(info.selected_blocks[0, :, text], torch.full_like(info.selected_blocks[0, :, text], -1))
    for name in info.branches:
        assert torch.all(info.outputs[name][0, :, text] == 0)
        assert torch.all(info.lse[name][0, :, text] == float("-inf"))
    # return_lse puts the dense path's log-sum-exp in every slot of a text query
    assert torch.equal(lse[0, :, text], info.dense_lse[0, :, text, None].expand(-1, -1, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_layer_info_is_the_dense_attention(backend):
    pattern = Pattern(name="dense", dense=True)
    q, k, v, _, _ = _inputs(5, 1, 2, 2, 9, False)
    out, lse, info = _compile(pattern, backend)(q, k, v, return_lse=True, return_info=True)
    want = reference_attention(q, k, v, pattern, return_branches=True)
    assert info.branches == () and info.gates is None and info.selected_blocks is None
    assert _rel(info.dense_output, want["dense_output"]) < REL
    assert lse.shape == (1, 4, 9, 1)
    _same_lse(lse[..., 0], want["dense_lse"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_reaches_every_branch(backend):
    pattern = _pattern()
    q, k, v, gates, _ = _inputs(11, 1, 2, 2, 20, False)
    scale = 0.37
    attn = _compile(pattern, backend)
    out, lse = attn(q, k, v, gates, scale=scale, return_lse=True)
    want = reference_attention(q, k, v, pattern, gates, scale=scale, return_branches=True)
    assert _rel(out, want["out"]) < REL
    for position, name in enumerate(pattern.branches):
        _same_lse(lse[..., position], want["lse"][name])
    # a different scale is a different attention: the check above can fail
    assert _rel(out, reference_attention(q, k, v, pattern, gates)) > 1e-3


def test_scale_in_bfloat16_is_within_bfloat16_rounding():
    """flex and triton fold the scale into q, rounded to bfloat16 (relative
    2^-9 per element) on top of bf16's own rounding: 1e-2 as every bf16 test."""
    pattern = _pattern()
    q, k, v, gates, _ = _inputs(13, 1, 2, 2, 20, False)
    want = reference_attention(q, k, v, pattern, gates, scale=0.3)
    for backend in ("flex", "triton"):
        got = _compile(pattern, backend)(q.bfloat16(), k.bfloat16(), v.bfloat16(), gates.bfloat16(),
                                                      scale=0.3)
        assert got.dtype == torch.bfloat16
        assert _rel(got, want) < 1e-2


def test_default_scale_is_one_over_sqrt_d():
    pattern = _pattern()
    q, k, v, gates, _ = _inputs(2, 1, 1, 2, 16, False)
    attn = nsaflex.compile(pattern, backend="reference")
    assert torch.equal(attn(q, k, v, gates), attn(q, k, v, gates, scale=1 / math.sqrt(16)))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), "0.1", True])
def test_bad_scale_is_refused(scale):
    q, k, v, gates, _ = _inputs(2, 1, 1, 1, 8, False)
    with pytest.raises(InputError, match="scale"):
        nsaflex.compile(_pattern(), backend="reference")(q, k, v, gates, scale=scale)


def test_bad_flags_are_refused():
    q, k, v, gates, _ = _inputs(2, 1, 1, 1, 8, False)
    with pytest.raises(InputError, match="return_info"):
        nsaflex.compile(_pattern(), backend="reference")(q, k, v, gates, return_info="yes")
