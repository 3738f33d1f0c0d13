"""Non-finite inputs stay where causality says, on every backend.

One inf, -inf or NaN is put into q, k or v at a random position (and head dim
entry); the rows of the output that are not finite must be, for the reference,
flex (compiled kernels and the dense evaluation) and interpreted Triton, the
same set. The reference (float64, explicit masks) is the specification: a
value reaches the queries that see it (:func:`nsaflex.reference.masked_softmax`
says how ``-inf`` scores count), never an earlier query. That holds for ``v``
in the tiled kernels too (compiled FlexAttention, Triton), whose ``p @ v``
over a key tile would multiply the masked probabilities 0 of earlier queries
into a non-finite value (``0 * inf = NaN``): they add such values over the
kept pairs alone (:func:`nsaflex.reference.masked_product`).

On the CPU (the default) Triton runs under ``TRITON_INTERPRET=1``, set here
before triton is imported; ``NSAFLEX_TEST_DEVICE=cuda`` runs every backend on
the GPU instead (the README's GPU suite), with the same inputs, made on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.device import DEVICE, skip_module_without_device

skip_module_without_device()

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nsaflex  # noqa: E402

EXAMPLES = int(os.environ.get("NSAFLEX_TEST_EXAMPLES", "10"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
HEAD_DIM = 16
# Small hybrid and plain patterns: every branch, both granularities, both key sets.
PATTERNS = {
    "hybrid": {"compression": {"block": 2, "stride": 2}, "selection": {"block": 2, "count": 2, "forced": ["current"]},
               "window": {"size": 2}, "gate": {"kind": "constant", "values": [1.0, 1.0, 1.0]},
               "hybrid": {"vision_keys": "vision"}},
    "hybrid-all": {"compression": {"block": 4, "stride": 2}, "selection": {"block": 4, "count": 2, "forced": ["first"]},
                   "window": {"size": 4}, "gate": {"kind": "constant", "values": [0.5, 1.0, 1.0]},
                   "hybrid": {"vision_keys": "all"}},
    "qblock": {"compression": {"block": 4, "stride": 4},
               "selection": {"block": 4, "count": 2, "forced": ["current"], "granularity": "query_block", "query_block": 4},
               "window": {"size": 8}, "gate": {"kind": "constant", "values": [1.0, 1.0, 1.0]}},
    "window": {"window": {"size": 3}, "gate": {"kind": "constant", "values": [1.0]}},
}
BACKENDS = {
    "reference": {},
    "flex": {},  # compiled kernels on CPU for inference
    "flex-eager": {"flex_mode": "eager"},  # the dense evaluation CPU gradients take
    "triton": {},
}
_COMPILED: dict[tuple[str, str], nsaflex.CompiledAttention] = {}


def _attention(pattern_name: str, backend: str) -> nsaflex.CompiledAttention:
    key = (pattern_name, backend)
    if key not in _COMPILED:
        pattern = nsaflex.pattern_from_dict({"name": pattern_name, **PATTERNS[pattern_name]})
        name = backend.split("-")[0]
        _COMPILED[key] = nsaflex.compile(pattern, name, device=DEVICE, **BACKENDS[backend])
    return _COMPILED[key]


def _normal(*shape: int, seed: int) -> torch.Tensor:
    """Standard normal values drawn on the CPU (the same on every device), on ``DEVICE``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def nonfinite_rows(out: torch.Tensor) -> set[tuple[int, int]]:
    """``{(batch row, position)}`` with a non-finite value in any head or dim."""
    bad = (~torch.isfinite(out)).any(dim=-1).any(dim=1)
    return {tuple(index) for index in torch.nonzero(bad).tolist()}


@st.composite
def injections(draw):
    pattern_name = draw(st.sampled_from(sorted(PATTERNS)))
    # Few shapes: each new one compiles the flex kernels (seconds on CPU).
    batch, kv_heads, group = draw(st.sampled_from(((1, 1, 2), (2, 2, 1))))
    length = draw(st.sampled_from((5, 16, 21)))
    tensor = draw(st.sampled_from("qkv"))
    heads = kv_heads * group if tensor == "q" else kv_heads
    where = (draw(st.integers(0, batch - 1)), draw(st.integers(0, heads - 1)), draw(st.integers(0, length - 1)),
             draw(st.integers(0, HEAD_DIM - 1)))
    value = draw(st.sampled_from((float("inf"), float("-inf"), float("nan"))))
    types = None
    if "hybrid" in pattern_name:
        types = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=batch * length, max_size=batch * length)))
        types = types.reshape(batch, length).to(DEVICE)
    seed = draw(st.integers(0, 2**31 - 1))
    return pattern_name, (batch, kv_heads, group, length), tensor, where, value, types, seed


def _inputs(shape, tensor, where, value, seed):
    batch, kv_heads, group, length = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, HEAD_DIM, generator=gen).to(DEVICE)
    k, v = (torch.randn(batch, kv_heads, length, HEAD_DIM, generator=gen).to(DEVICE) for _ in range(2))
    {"q": q, "k": k, "v": v}[tensor][where] = value
    return q, k, v


@PROPERTY
@given(case=injections())
def test_nonfinite_rows_follow_causality(case):
    pattern_name, shape, tensor, where, value, types, seed = case
    q, k, v = _inputs(shape, tensor, where, value, seed)
    expected = nonfinite_rows(_attention(pattern_name, "reference")(q, k, v, token_types=types))
    if tensor != "v":
        # q and k reach rows only through scores, which every backend masks exactly.
        batch_row, _, position, _ = where
        if tensor == "q":
            assert expected <= {(batch_row, position)}
        else:
            assert all(row == batch_row and t >= position for row, t in expected) or pattern_name == "hybrid-all"
    for backend in ("flex", "flex-eager", "triton"):
        got = nonfinite_rows(_attention(pattern_name, backend)(q, k, v, token_types=types))
        assert got == expected, (backend, sorted(got ^ expected))


@pytest.mark.parametrize("classes", [[1, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]], ids=["packed", "prompt"])
def test_text_query_does_not_see_a_later_inf_key(classes):
    """The dense text path: text query 1 cannot see key 3; text query 6 (a
    question after the vision run, written into the kernels' output) sees it."""
    pattern = nsaflex.pattern_from_dict({"name": "hybrid", **PATTERNS["hybrid"]})
    types = torch.tensor([classes], device=DEVICE)
    q, k, v = (_normal(1, 2, 8, HEAD_DIM, seed=s) for s in range(3))
    k[0, :, 3] = float("inf")
    for backend in ("reference", "flex", "triton"):
        out = nsaflex.compile(pattern, backend, device=DEVICE)(q, k, v, token_types=types)
        assert torch.isfinite(out[0, :, 1]).all(), backend
        if classes[6] == 0:
            assert not torch.isfinite(out[0, :, 6]).all(), backend


@pytest.mark.parametrize("backend", ["reference", "flex", "flex-eager", "triton"])
def test_nan_query_at_position_zero_shows(backend):
    """A NaN query that sees a key gives a NaN row (never an empty row's zeros;
    compiled FlexAttention's row maximum skips NaN scores)."""
    q, k, v = (_normal(1, 2, 8, HEAD_DIM, seed=s) for s in range(3))
    q[0, 0, 0] = float("nan")
    out = _attention("hybrid", backend)(q, k, v, token_types=torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1]], device=DEVICE))
    assert nonfinite_rows(out) == {(0, 0)}


@pytest.mark.parametrize("backend", ["reference", "flex", "flex-eager", "triton"])
def test_values_reach_only_later_rows(backend):
    """A NaN value at key 5 (window of 3, 32 keys: one key tile of the tiled
    kernels) leaves rows 0-4 finite and reaches rows 5-7 alone."""
    q, k, v = (_normal(1, 1, 32, HEAD_DIM, seed=s) for s in range(3))
    v[0, 0, 5, 3] = float("nan")
    out = _attention("window", backend)(q, k, v)
    assert nonfinite_rows(out) == {(0, 5), (0, 6), (0, 7)}


def _kinds(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.isnan(out), out == float("inf"), out == float("-inf")


@pytest.mark.parametrize("backend", ["flex", "flex-eager", "triton"])
@pytest.mark.parametrize("pattern_name", ["window", "hybrid-all"])
@pytest.mark.parametrize("plus,minus", [(5, 6), (16, 15)], ids=["plus-first", "minus-first-other-chunk"])
def test_value_kinds_match_the_reference(backend, pattern_name, plus, minus):
    """+inf at key ``plus`` and -inf at key ``minus`` of channel 3 (keys 15 and
    16: the Triton kernels add them in different chunks of 16 keys, the -inf
    first): each output entry is +inf, -inf, NaN (both seen) or finite exactly
    as in the reference."""
    q, k, v = (_normal(1, 1, 32, HEAD_DIM, seed=s) for s in range(3))
    v[0, 0, plus, 3] = float("inf")
    v[0, 0, minus, 3] = float("-inf")
    types = torch.ones(1, 32, dtype=torch.long, device=DEVICE) if "hybrid" in pattern_name else None
    expected = _kinds(_attention(pattern_name, "reference")(q, k, v, token_types=types))
    got = _kinds(_attention(pattern_name, backend)(q, k, v, token_types=types))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("backend", ["flex-eager", "triton"])
@pytest.mark.parametrize("pattern_name", ["window", "qblock"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_query_gradients_stay_finite_where_the_value_is_unseen(backend, pattern_name, value):
    """A non-finite value at key 5 of 32: dq is non-finite in exactly the rows
    whose output sees it (the reference's forward says which); the masked
    pairs of its key tile add nothing (the tiled backward's ``dp = dO . v`` is
    inf there for every row). The float64 reference is left out: its gradient
    also flows through the causal rows it computes for text queries and
    discards, which see the value."""
    q, k, v = (_normal(1, 2, 32, HEAD_DIM, seed=s) for s in range(3))
    v[0, 1, 5, 3] = value
    q.requires_grad_(True)
    out = _attention(pattern_name, backend)(q, k, v)
    out.backward(torch.ones_like(out))
    seen = nonfinite_rows(_attention(pattern_name, "reference")(q.detach(), k, v))
    assert seen and nonfinite_rows(q.grad) == seen
