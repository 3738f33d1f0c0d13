"""Hostile arguments and tensors for ``nsaflex.compile`` and the attention it returns.

* arguments of ``compile`` (backend, device, layer, head_dim, deterministic)
  of any type give a compiled attention or an :class:`~nsaflex.errors.NsaflexError`,
  never a TypeError from deep inside;
* bad tensors (shapes, dtypes, devices, gates, token classes) given to a
  compiled attention on the reference, flex and Triton (interpreted) backends
  are refused with an :class:`~nsaflex.errors.InputError` before any kernel
  runs: the backend's kernel is replaced by one that fails the test if called.

Examples are bounded (``max_examples``) so the file runs in seconds: no kernel
ever runs on a refused input.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nsaflex
from nsaflex import Compression, Pattern, Window
from nsaflex.errors import BackendUnavailable, InputError, NsaflexError
from nsaflex.inputs import check_inputs
from nsaflex.pooling import MAX_HEAD_DIM, MAX_POOLING_WEIGHTS, MLPPooling

from strategies import patterns

TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton backend runs on CPU only under TRITON_INTERPRET=1"
)
BACKENDS = ("reference", "flex", pytest.param("triton", marks=needs_interpreter))


# -- compile() arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, 123, 1.5, b"flex", ["flex"], {"flex": 1}, "flx", "", "AUTO"])
def test_bad_backend_names_are_refused(backend: object) -> None:
    """Any backend that is not a registered name (of any type, hashable or
    not) is a BackendUnavailable naming it, not a TypeError from difflib."""
    with pytest.raises(BackendUnavailable) as info:
        nsaflex.compile(nsaflex.load_pattern("window"), backend=backend)  # type: ignore[arg-type]
    assert f"found {backend!r}" in str(info.value)


def test_misspelt_backend_gets_did_you_mean() -> None:
    with pytest.raises(BackendUnavailable, match="did you mean 'flex'"):
        nsaflex.compile(nsaflex.load_pattern("window"), backend="flx")


MLP_PATTERN = Pattern(name="mlp", compression=Compression(4, 4, pooling="mlp"), window=Window(4))


@pytest.mark.parametrize("head_dim", [-1, 0, MAX_HEAD_DIM + 1, 10**6, "16", True, 16.0, [16]])
def test_bad_head_dims_are_refused(head_dim: object) -> None:
    """head_dim is an int in [1, MAX_HEAD_DIM]: anything else is an InputError
    naming it, before the pooling MLP allocates ``block * head_dim * hidden``
    weights (10**6 would ask for terabytes)."""
    with pytest.raises(InputError) as info:
        nsaflex.compile(MLP_PATTERN, backend="reference", head_dim=head_dim)  # type: ignore[arg-type]
    assert info.value.argument == "head_dim"
    with pytest.raises(InputError):
        MLPPooling(MLP_PATTERN.compression, head_dim)  # type: ignore[arg-type]
    # A bad value is refused also where no MLP needs it.
    with pytest.raises(InputError):
        nsaflex.compile(nsaflex.load_pattern("window"), backend="reference", head_dim=head_dim)  # type: ignore[arg-type]


def test_head_dim_zero_is_not_taken_for_unset() -> None:
    pattern = dataclasses.replace(MLP_PATTERN, model=nsaflex.Model(head_dim=32))
    with pytest.raises(InputError):
        nsaflex.compile(pattern, backend="reference", head_dim=0)
    assert nsaflex.compile(pattern, backend="reference").pooler.head_dim == 32


def test_pooling_mlp_size_is_capped() -> None:
    """Sound fields can still multiply to an MLP too large to allocate."""
    huge = Compression(block=4096, stride=4096, pooling="mlp", mlp_hidden=4096)
    with pytest.raises(InputError) as info:
        MLPPooling(huge, 128)
    assert info.value.argument == "compression" and f"at most {MAX_POOLING_WEIGHTS} weights" in str(info.value)


junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(), st.text(max_size=8), st.binary(max_size=4),
    st.lists(st.integers(0, 3), max_size=2), st.sampled_from(("auto", "reference", "flex", "cpu", "cuda", "meta")),
)


@settings(max_examples=60, deadline=None)
@given(backend=junk, device=junk, layer=junk, head_dim=junk, deterministic=junk, pattern=st.sampled_from(
    ("window", "nsa", "videonsa", "qblock-small")))
def test_compile_arguments_give_an_attention_or_a_project_error(
    backend: Any, device: Any, layer: Any, head_dim: Any, deterministic: Any, pattern: str
) -> None:
    try:
        attention = nsaflex.compile(pattern, backend=backend, device=device, layer=layer, head_dim=head_dim,
                                    deterministic=deterministic)
    except NsaflexError:
        return
    assert isinstance(attention, nsaflex.CompiledAttention)


# -- tensor inputs ------------------------------------------------------------------------------------
class KernelRan(AssertionError):
    pass


def _no_kernel(*args: Any, **kwargs: Any) -> None:
    raise KernelRan("a kernel ran on inputs that should have been refused")


@dataclasses.dataclass
class Case:
    """A compiled attention and valid inputs for it."""

    pattern: Pattern  # as resolved by the plan (layer applied)
    attention: nsaflex.CompiledAttention
    inputs: dict[str, Any]


@st.composite
def cases(draw: Any, backend: str) -> Case:
    pattern = draw(patterns(small=True))
    layer = None
    if pattern.layers and draw(st.booleans()):
        layer = draw(st.sampled_from(pattern.layers)).at[0]
    model = pattern.model
    head_dims = TRITON_HEAD_DIMS[:2] if backend == "triton" else (8, 16, 24)
    dim = model.head_dim if model.head_dim is not None else draw(st.sampled_from(head_dims))
    if backend == "triton":
        assume(dim in TRITON_HEAD_DIMS)
    if model.kv_heads is not None:
        kv_heads = model.kv_heads
    elif model.query_heads is not None:
        kv_heads = draw(st.sampled_from([d for d in range(1, model.query_heads + 1) if model.query_heads % d == 0]))
    else:
        kv_heads = draw(st.integers(1, 3))
    query_heads = model.query_heads if model.query_heads is not None else kv_heads * draw(st.sampled_from((1, 2, 3)))
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 24))
    try:
        attention = nsaflex.compile(pattern, backend=backend, device="cpu", layer=layer, head_dim=dim)
    except BackendUnavailable:
        assume(False)  # e.g. a pattern the Triton kernels do not take
        raise
    resolved = attention.pattern
    q = torch.randn(batch, query_heads, length, dim)
    k, v = torch.randn(2, batch, kv_heads, length, dim).unbind(0)
    inputs: dict[str, Any] = {"q": q, "k": k, "v": v, "gates": None, "token_types": None}
    if resolved.branches and resolved.gate.kind != "constant":
        inputs["gates"] = torch.rand(batch, query_heads, length, len(resolved.branches))
    if resolved.hybrid is not None:
        inputs["token_types"] = torch.randint(0, 2, (batch, length))
    return Case(resolved, attention, inputs)


def _resized(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = size
    return torch.zeros(shape, dtype=tensor.dtype)


Mutation = Callable[[Case, dict[str, Any]], bool]  # changes the inputs in place; False: not applicable
QKV = ("q", "k", "v")
ALL = ("q", "k", "v", "gates", "token_types")


def _each(names: tuple[str, ...], change: Callable[[torch.Tensor], Any], *, when: Callable[[Case], bool] = lambda c: True
          ) -> Mutation:
    """Apply ``change`` to each named input that is given; applicable when the
    first one is given (and ``when`` holds for the case)."""
    def mutate(case: Case, inputs: dict[str, Any]) -> bool:
        if inputs[names[0]] is None or not when(case):
            return False
        for name in names:
            if inputs[name] is not None:
                inputs[name] = change(inputs[name])
        return True

    return mutate


def _last_token_three(types: torch.Tensor) -> torch.Tensor:
    """A class past 0 text, 1 image, 2 video."""
    return torch.cat([types[:, :-1], torch.full_like(types[:, -1:], 3)], dim=1)


def _extra_gate(case: Case, inputs: dict[str, Any]) -> bool:
    inputs["gates"] = torch.rand(*inputs["q"].shape[:3], len(case.pattern.branches) + 1)
    return True


def _unexpected_token_types(case: Case, inputs: dict[str, Any]) -> bool:
    inputs["token_types"] = torch.ones(inputs["q"].shape[0], inputs["q"].shape[2], dtype=torch.int64)
    return case.pattern.hybrid is None


#: name -> a change that makes valid inputs invalid for every backend.
MUTATIONS: dict[str, Mutation] = {
    "q_not_a_tensor": _each(("q",), lambda q: q.tolist()),
    "k_as_numpy": _each(("k",), lambda k: k.numpy()),
    "v_three_dims": _each(("v",), lambda v: v[0]),
    "q_five_dims": _each(("q",), lambda q: q[None]),
    "integer_dtype": _each(QKV, lambda t: t.to(torch.int32)),
    "complex_dtype": _each(QKV, lambda t: t.to(torch.complex64)),
    "kv_float64_q_float32": _each(("k", "v"), lambda t: t.to(torch.float64)),
    "v_longer": _each(("v",), lambda v: _resized(v, 2, v.shape[2] + 1)),
    "kv_batch": _each(("k", "v"), lambda t: _resized(t, 0, t.shape[0] + 1)),
    "kv_length": _each(("k", "v"), lambda t: _resized(t, 2, t.shape[2] + 3)),
    "kv_head_dim": _each(("k", "v"), lambda t: _resized(t, 3, t.shape[3] * 2)),
    "kv_heads_not_dividing": lambda case, x: _each(("k", "v"), lambda t: _resized(t, 1, x["q"].shape[1] + 1))(case, x),
    "empty_length": _each(ALL, lambda t: _resized(t, 2 if t.dim() == 4 else 1, 0)),
    "meta_device": _each(ALL, lambda t: t.to("meta")),
    "k_on_another_device": _each(("k",), lambda k: k.to("meta")),
    "model_query_heads": _each(("q", "gates"), lambda t: t.repeat(1, 2, 1, 1),
                               when=lambda case: case.pattern.model.query_heads is not None),
    "gates_missing": _each(("gates",), lambda g: None),
    "gates_extra_branch": _extra_gate,
    "gates_integer": _each(("gates",), lambda g: g.to(torch.int64)),
    "gates_on_meta": _each(("gates",), lambda g: g.to("meta")),
    "gates_as_list": _each(("gates",), lambda g: g.tolist()),
    "token_types_unexpected": _unexpected_token_types,
    "token_types_missing": _each(("token_types",), lambda t: None),
    "token_types_3d": _each(("token_types",), lambda t: t[:, None]),
    "token_types_float": _each(("token_types",), lambda t: t.float()),
    "token_types_value_3": _each(("token_types",), _last_token_three),
    "token_types_on_meta": _each(("token_types",), lambda t: t.to("meta")),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_tensors_are_refused_before_any_kernel(backend: str, mutation: str) -> None:
    # Some mutations apply to few drawn cases (a model section, a hybrid pattern, one
    # the Triton kernels take): filtering many draws is expected.
    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(st.data())
    def check(data: st.DataObject) -> None:
        case = data.draw(cases(backend))
        check_inputs(case.pattern, **case.inputs)  # the unmutated inputs are valid
        inputs = dict(case.inputs)
        assume(MUTATIONS[mutation](case, inputs))
        case.attention._kernel = _no_kernel
        with pytest.raises(InputError) as info:
            case.attention(**inputs)
        assert info.value.argument in ("q", "k", "v", "gates", "token_types"), str(info.value)

    check()


def test_every_mutation_is_reached() -> None:
    """Each mutation applies to some drawn case (a check of the test itself)."""
    reached: set[str] = set()

    @settings(max_examples=150, database=None, derandomize=True, deadline=None)
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        case = data.draw(cases("reference"))
        for name, mutation in MUTATIONS.items():
            if mutation(case, dict(case.inputs)):
                reached.add(name)

    collect()
    assert reached == set(MUTATIONS)


@needs_interpreter
@pytest.mark.parametrize(("dtype", "dim"), [(torch.float64, 16), (torch.float32, 24), (torch.float32, 512)])
def test_triton_refuses_what_its_kernels_cannot_take_before_launch(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, dim: int
) -> None:
    """Inputs valid in general but not for the Triton kernels (float64, head
    dims outside 16..256 powers of two) are refused before a launch."""
    import nsaflex.backends.triton as triton_backend
    import nsaflex.kernels.ops as ops

    monkeypatch.setattr(ops, "nsa_attention", _no_kernel)
    monkeypatch.setattr(triton_backend, "_dense", _no_kernel)
    attention = nsaflex.compile(nsaflex.load_pattern("nsa"), backend="triton", device="cpu", head_dim=dim)
    pattern = attention.pattern
    heads = pattern.model.query_heads or 2
    kv_heads = pattern.model.kv_heads or 1
    q = torch.randn(1, heads, 8, dim, dtype=dtype)
    k = v = torch.randn(1, kv_heads, 8, dim, dtype=dtype)
    gates = None if pattern.gate.kind == "constant" else torch.rand(1, heads, 8, len(pattern.branches), dtype=dtype)
    types = torch.ones(1, 8, dtype=torch.int64) if pattern.hybrid is not None else None
    with pytest.raises(InputError):
        attention(q, k, v, gates, types)
