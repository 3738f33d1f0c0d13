"""The decode entry (``attn.decode``, :mod:`nsaflex.decoding`) against the
float64 reference: every new query gets the reference's last row on its row's
real tokens so far, for random patterns, GQA shapes, rows of different lengths
with left padding, token classes, several new tokens per step and a cache of
larger capacity than used; the batched path makes no host synchronisation and
no Python loop over rows or tokens.

Tolerance: float32 inputs against the float64 reference, relative 1e-5 (a few
float32 roundings per softmax and gathered sum; the block ranking is done in
float64 on the CPU, so the selections are the reference's), and absolute 1e-5
for outputs near zero: they are averages of values of order one, and a pooling
MLP's compressed tokens carry float32 sums over ``l * D`` inputs and up to a
few hundred hidden units (measured up to 2e-6)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsaflex
from nsaflex.errors import InputError
from nsaflex.reference import reference_attention
from nsaflex.spec import Compression, Gate, Hybrid, Pattern, Selection, Window
from tests.strategies import patterns as random_patterns
from tests.strategies import token_types as random_token_types

DECODE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DIM = 8


def decode_patterns(granularities=("token", "query_block")):
    return random_patterns(small=True, allow_layers=False, allow_budget=False, allow_model=False,
                           granularities=granularities, allow_dense=True)


@dataclasses.dataclass
class Scenario:
    """A cache of ``capacity`` slots per row: ``pad[b]`` padding slots, a prompt
    of ``prompt[b]`` real tokens, then ``steps`` of new tokens; tensors float64."""

    q: torch.Tensor  # [B, Hq, C, D]
    k: torch.Tensor  # [B, Hkv, C, D]
    v: torch.Tensor
    gates: torch.Tensor | None  # [B, Hq, C, nb]
    types: torch.Tensor  # [B, C]
    valid: torch.Tensor  # [B, C] real slots
    start: torch.Tensor  # [B] slots before the first step (padding + prompt)
    steps: list[int]  # new tokens per step


def draw_scenario(pattern: Pattern, data) -> Scenario:
    batch = data.draw(st.integers(1, 3), label="batch")
    kv_heads = data.draw(st.integers(1, 2), label="kv heads")
    group = data.draw(st.integers(1, 3), label="group")
    steps = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=6), label="new tokens per step")
    prompts = data.draw(st.lists(st.integers(1, 20), min_size=batch, max_size=batch), label="prompt lengths")
    pads = data.draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch), label="left padding")
    spare = data.draw(st.integers(0, 5), label="unused capacity")
    capacity = max(p + n for p, n in zip(pads, prompts)) + sum(steps) + spare
    types = data.draw(random_token_types(batch, capacity), label="token classes")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    heads = kv_heads * group
    gates = None
    if pattern.gate.kind != "constant" and pattern.branches:
        gates = torch.rand(batch, heads, capacity, len(pattern.branches), generator=generator, dtype=torch.float64)
    valid = torch.zeros(batch, capacity, dtype=torch.bool)
    for b, (pad, prompt) in enumerate(zip(pads, prompts)):
        valid[b, pad : pad + prompt + sum(steps)] = True
    return Scenario(randn(batch, heads, capacity, DIM), randn(batch, kv_heads, capacity, DIM), randn(batch, kv_heads, capacity, DIM),
                    gates, types, valid, torch.tensor([p + n for p, n in zip(pads, prompts)]), steps)


def last_rows(pattern, scenario: Scenario, slots: torch.Tensor, pooler) -> torch.Tensor:
    """``[B, Hq, T, D]``: the reference's last row on the real tokens up to each slot."""
    s = scenario
    batch, heads, _, dim = s.q.shape
    out = torch.zeros(batch, heads, slots.shape[1], dim, dtype=torch.float64)
    for b in range(batch):
        for i, slot in enumerate(slots[b].tolist()):
            real = torch.nonzero(s.valid[b, : slot + 1]).flatten()
            gates = None if s.gates is None else s.gates[b : b + 1, :, real]
            types = s.types[b : b + 1, real] if pattern.hybrid is not None else None
            rows = reference_attention(s.q[b : b + 1, :, real], s.k[b : b + 1, :, real], s.v[b : b + 1, :, real],
                                       pattern, gates, types, pooler)
            out[b, :, i] = rows[0, :, -1]
    return out


def new_tokens(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``x [B, H, C, ...]`` at ``slots [B, T]`` along dim 2."""
    index = slots[:, None, :].expand(-1, x.shape[1], -1)
    while index.dim() < x.dim():
        index = index[..., None]
    return x.gather(2, index.expand(-1, -1, -1, *x.shape[3:]))


def run_steps(attn, pattern, scenario: Scenario, dtype=torch.float32, growing: bool = False):
    """Decode every step through ``attn.decode``; yields (slots, output) per step.
    ``growing``: the cache is handed over cut to its longest row (as a dynamic
    cache grows), so the state starts at the prompt's size and grows."""
    s = scenario
    k_full, v_full = s.k.to(dtype), s.v.to(dtype)
    used = int(s.start.max()) if growing else k_full.shape[2]
    state = attn.decode_state(k_full[:, :, :used], v_full[:, :, :used], s.start.clone(), s.types[:, :used], s.valid[:, :used],
                              queries=s.q[:, :, :used].to(dtype))
    lengths = s.start.clone()
    for count in s.steps:
        lengths = lengths + count
        used = int(lengths.max()) if growing else used
        k, v = k_full[:, :, :used], v_full[:, :, :used]
        slots = lengths[:, None] - count + torch.arange(count)
        gates = None if s.gates is None else new_tokens(s.gates, slots).to(dtype)
        types = s.types.gather(1, slots) if pattern.hybrid is not None else None
        # all-vision steps skip the dense text path (has_text=False): the output must not change
        has_text = types is None or bool((types == 0).any())
        out = attn.decode(new_tokens(s.q, slots).to(dtype), k, v, lengths, state, gates, types, has_text=has_text)
        yield slots, out


def check_batched_decode(pattern, data):
    scenario = draw_scenario(pattern, data)
    attn = nsaflex.compile(pattern, "flex", device="cpu", head_dim=DIM)
    assert attn.decode_plan.kernel.startswith(("batched torch", "torch SDPA"))
    pooler = None
    if attn.pooler is not None:
        with torch.no_grad():
            for parameter in attn.pooler.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        pooler = attn.pooler
    growing = data.draw(st.booleans(), label="growing cache")
    for slots, out in run_steps(attn, pattern, scenario, growing=growing):
        assert out.dtype == torch.float32
        expected = last_rows(pattern, scenario, slots, pooler)
        # fp32 against float64: relative 1e-5 per tensor (docs/semantics.md); elementwise, an output
        # near 0 carries the rounding of its O(gate) terms, which a per-element bound cannot allow for.
        assert (out.double() - expected).norm() <= 1e-5 * expected.norm() + 1e-12


@DECODE
@given(pattern=decode_patterns(), data=st.data())
def test_batched_decode_is_the_reference_last_row(pattern, data):
    check_batched_decode(pattern, data)


@st.composite
def tight_query_block_patterns(draw):
    """query_block patterns selecting fewer blocks than a ~20-token row holds,
    so the tile sums decide the selection."""
    block = draw(st.sampled_from((2, 4)))
    stride = draw(st.sampled_from([d for d in (1, 2, 4) if block % d == 0]))
    selection_block = draw(st.sampled_from([b for b in (2, 4) if b % stride == 0]))
    count = draw(st.integers(1, 2))
    forced = tuple(draw(st.lists(st.sampled_from(("first", "previous", "current")), unique=True, max_size=count - 1)))
    return Pattern(
        name="tight",
        compression=Compression(block=block, stride=stride,
                                visibility=draw(st.sampled_from(("causal", "videonsa_legacy")))),
        selection=Selection(block=selection_block, count=count, forced=forced, scoring=draw(st.sampled_from(("group", "head"))),
                            granularity="query_block", query_block=draw(st.sampled_from([m for m in (2, 4) if selection_block % m == 0]))),
        gate=Gate(kind="mlp"),
        hybrid=draw(st.sampled_from((None, Hybrid(vision_keys="vision"), Hybrid(vision_keys="all")))),
    )


@DECODE
@given(pattern=st.one_of(decode_patterns(granularities=("query_block",)), tight_query_block_patterns()), data=st.data())
def test_batched_query_block_decode_is_the_reference_last_row(pattern, data):
    """Query tiles spanning the prompt and several steps: each query's tile sum
    is the kept one plus the step's earlier queries of the same tile."""
    check_batched_decode(pattern, data)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pattern=decode_patterns(granularities=("token",)), data=st.data())
def test_reference_backend_decode_is_the_reference_last_row(pattern, data):
    """The reference backend's decode entry (the exact path) on float64 inputs: equal to 1e-12."""
    scenario = draw_scenario(pattern, data)
    attn = nsaflex.compile(pattern, "reference", head_dim=DIM).double()
    for slots, out in run_steps(attn, pattern, scenario, torch.float64):
        torch.testing.assert_close(out, last_rows(pattern, scenario, slots, attn.pooler), rtol=1e-12, atol=1e-12)


# --- no host synchronisation, no loop over rows or tokens -------------------------------------------

# Tensor methods that read values back to the host, or whose output shape depends on values.
READ_BACK = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "nonzero", "argwhere",
             "masked_select", "unique", "unique_consecutive", "bincount"}


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts every torch call and records those that read values back (a bool
    tensor used as an index is one: its result's shape is data-dependent)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        name = getattr(func, "__name__", str(func))
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else ()
        index = index if isinstance(index, tuple) else (index,)
        if name in READ_BACK or any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in index):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


SYNC_PATTERN = Pattern(
    name="sync", compression=Compression(block=4, stride=2), selection=Selection(block=4, count=3, forced=("first", "current")),
    window=Window(size=3), gate=Gate(kind="mlp"), hybrid=Hybrid(vision_keys="vision"),
)


def traced_step(attn, batch: int, new: int, capacity: int = 40) -> HostReads:
    """One decode step of ``new`` tokens over ``batch`` rows, traced."""
    generator = torch.Generator().manual_seed(batch * 10 + new)
    k = torch.randn(batch, 2, capacity, DIM, generator=generator)
    v = torch.randn(batch, 2, capacity, DIM, generator=generator)
    types = (torch.rand(batch, capacity, generator=generator) < 0.7).long()
    lengths = torch.full((batch,), 20)
    queries = torch.randn(batch, 4, capacity, DIM, generator=generator)  # read by release mode only
    state = attn.decode_state(k, v, lengths, types, queries=queries)
    lengths = lengths + new
    q = torch.randn(batch, 4, new, DIM, generator=generator)
    gates = torch.rand(batch, 4, new, 3, generator=generator)
    with HostReads() as trace:
        attn.decode(q, k, v, lengths, state, gates, types[:, 20 : 20 + new])
    return trace


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_batched_decode_reads_nothing_back_and_does_not_loop(backend, monkeypatch):
    """The step's torch calls make no read-back, and their number does not grow
    with the batch or the new tokens (no Python loop over either): what a CUDA
    graph capture needs. The reference backend's exact path does both (the
    check can fail)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attn = nsaflex.compile(SYNC_PATTERN, backend, device="cpu", head_dim=DIM)
    small, large = traced_step(attn, 1, 1), traced_step(attn, 3, 3)
    assert small.reads == [] and large.reads == []
    assert small.calls == large.calls
    exact = nsaflex.compile(SYNC_PATTERN, "reference", head_dim=DIM)
    small, large = traced_step(exact, 1, 1), traced_step(exact, 3, 3)
    assert small.reads and large.calls > small.calls


def test_batched_release_decode_reads_nothing_back_and_does_not_loop():
    """videonsa_release steps too: no read-back, a call count independent of the
    batch and the new tokens."""
    from nsaflex.reference_release import release_pattern

    pattern = release_pattern(dataclasses.replace(SYNC_PATTERN, compression=Compression(block=4, stride=4),
                                                  selection=Selection(block=4, count=3)))
    attn = nsaflex.compile(pattern, "flex", device="cpu", head_dim=DIM, mode="videonsa_release")
    small, large = traced_step(attn, 1, 1), traced_step(attn, 3, 3)
    assert small.reads == [] and large.reads == []
    assert small.calls == large.calls


# --- refusals and the plan ---------------------------------------------------------------------------


def small_step(batch=2, kv_heads=2, heads=4, capacity=12, used=8, new=1):
    generator = torch.Generator().manual_seed(0)
    k = torch.randn(batch, kv_heads, capacity, DIM, generator=generator)
    return dict(
        q=torch.randn(batch, heads, new, DIM, generator=generator), k_cache=k,
        v_cache=torch.randn(k.shape, generator=generator),
        lengths=torch.full((batch,), used + new), gates=torch.rand(batch, heads, new, 3, generator=generator),
        token_types=torch.ones(batch, new, dtype=torch.long),
    )


BAD_STEPS = {
    "q not 4-d": (dict(q=torch.zeros(2, 4, DIM)), "q"),
    "q batch": (dict(q=torch.zeros(3, 4, 1, DIM)), "q"),
    "q heads not a multiple of kv heads": (dict(q=torch.zeros(2, 3, 1, DIM)), "q"),
    "q dtype": (dict(q=torch.zeros(2, 4, 1, DIM, dtype=torch.float64)), "q"),
    "more new tokens than slots": (dict(q=torch.zeros(2, 4, 13, DIM)), "q"),
    "v shape": (dict(v_cache=torch.zeros(2, 2, 11, DIM)), "v_cache"),
    "lengths floating": (dict(lengths=torch.full((2,), 9.0)), "lengths"),
    "lengths shape": (dict(lengths=torch.full((3,), 9)), "lengths"),
    "gates shape": (dict(gates=torch.rand(2, 4, 1, 2)), "gates"),
    "gates missing": (dict(gates=None), "gates"),
    "token types missing": (dict(token_types=None), "token_types"),
    "token types floating": (dict(token_types=torch.ones(2, 1)), "token_types"),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_decode_inputs_are_refused_naming_the_argument(case):
    changes, argument = BAD_STEPS[case]
    attn = nsaflex.compile(SYNC_PATTERN, "flex", device="cpu", head_dim=DIM)
    step = small_step()
    state = attn.decode_state(step["k_cache"], step["v_cache"], step["lengths"] - 1, torch.ones(2, 12, dtype=torch.long))
    before = {name: getattr(state, name).clone() for name in ("real", "sparse_slots", "sparse_count", "cmp_k")}
    step.update(changes)
    with pytest.raises(InputError) as error:
        attn.decode(step["q"], step["k_cache"], step["v_cache"], step["lengths"], state, step["gates"], step["token_types"])
    assert error.value.argument == argument
    for name, value in before.items():  # nothing half-applied
        assert torch.equal(getattr(state, name), value), name


def test_a_state_of_another_batch_is_refused():
    attn = nsaflex.compile(SYNC_PATTERN, "flex", device="cpu", head_dim=DIM)
    step = small_step()
    other = attn.decode_state(step["k_cache"][:1], step["v_cache"][:1], step["lengths"][:1] - 1)
    with pytest.raises(InputError, match="DecodeState of 2 rows"):
        attn.decode(step["q"], step["k_cache"], step["v_cache"], step["lengths"], other, step["gates"], step["token_types"])


QUERY_BLOCK = dataclasses.replace(SYNC_PATTERN, selection=Selection(block=4, count=2, granularity="query_block", query_block=2))


def test_query_block_state_needs_the_cached_queries():
    """A tile's selection sums the scores of its earlier queries: the state is
    refused without them, and a state without tile sums is refused by the step."""
    attn = nsaflex.compile(QUERY_BLOCK, "flex", device="cpu", head_dim=DIM)
    step = small_step()
    types = torch.ones(2, 12, dtype=torch.long)
    with pytest.raises(InputError) as error:
        attn.decode_state(step["k_cache"], step["v_cache"], step["lengths"] - 1, types)
    assert error.value.argument == "queries"
    token_state = nsaflex.compile(SYNC_PATTERN, "flex", device="cpu", head_dim=DIM).decode_state(
        step["k_cache"], step["v_cache"], step["lengths"] - 1, types)
    with pytest.raises(InputError, match="tile sums"):
        attn.decode(step["q"], step["k_cache"], step["v_cache"], step["lengths"], token_state, step["gates"], step["token_types"])


def test_reference_backend_refuses_query_block_decode_and_the_plan_says_why():
    attn = nsaflex.compile(QUERY_BLOCK, "reference", head_dim=DIM)
    assert attn.decode_plan.kernel.startswith("none") and "query_block" in attn.decode_plan.notes[0]
    step = small_step()
    queries = torch.zeros(2, 4, 12, DIM)
    state = attn.decode_state(step["k_cache"], step["v_cache"], step["lengths"] - 1, torch.ones(2, 12, dtype=torch.long),
                              queries=queries)
    with pytest.raises(InputError, match="query_block"):
        attn.decode(step["q"], step["k_cache"], step["v_cache"], step["lengths"], state, step["gates"], step["token_types"])


def test_decode_plan_names_each_backends_path():
    batched = nsaflex.compile(SYNC_PATTERN, "flex", device="cpu", head_dim=DIM).decode_plan
    assert batched.branch == "decode" and batched.backend == "flex" and batched.kernel.startswith("batched torch")
    assert batched.constants == {"rows": "batched", "new_tokens": "batched"} and "text queries" in batched.notes[0]
    exact = nsaflex.compile(SYNC_PATTERN, "reference", head_dim=DIM).decode_plan
    assert exact.backend == "reference" and exact.constants["rows"] == "one at a time"
    dense = nsaflex.compile(Pattern(name="d", dense=True), "flex", device="cpu").decode_plan
    assert dense.kernel == "torch SDPA over the cache"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["faithful", "videonsa_release"])
def test_decode_step_replays_in_a_cuda_graph(mode):
    """A static cache, the step captured once and replayed for the following
    tokens: the same outputs as eager steps (bf16, relative 1e-2). Release mode
    moves its kept queries on in place, so replays see each step's."""
    from nsaflex.reference_release import release_pattern

    pattern = dataclasses.replace(SYNC_PATTERN, model=dataclasses.replace(SYNC_PATTERN.model, head_dim=64))
    if mode == "faithful":
        attn = nsaflex.compile(pattern, "triton", device="cuda", head_dim=64)
    else:
        pattern = release_pattern(dataclasses.replace(pattern, compression=Compression(block=4, stride=4),
                                                      selection=Selection(block=4, count=3)))
        attn = nsaflex.compile(pattern, "flex", device="cuda", head_dim=64, mode=mode)
    generator = torch.Generator(device="cuda").manual_seed(0)
    capacity, start, steps = 256, 100, 6
    k = torch.randn(2, 2, capacity, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    v = torch.randn_like(k)
    q_all = torch.randn(2, 4, capacity, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    gates_all = torch.rand(2, 4, capacity, 3, device="cuda", generator=generator)
    types = torch.ones(2, capacity, dtype=torch.long, device="cuda")
    eager_state = attn.decode_state(k, v, torch.full((2,), start, device="cuda"), types, queries=q_all)
    eager = []
    for i in range(steps):
        lengths = torch.full((2,), start + i + 1, device="cuda")
        eager.append(attn.decode(q_all[:, :, start + i : start + i + 1], k, v, lengths, eager_state,
                                 gates_all[:, :, start + i : start + i + 1], types[:, :1], has_text=False))
    state = attn.decode_state(k, v, torch.full((2,), start, device="cuda"), types, queries=q_all)
    q, gates, lengths = q_all[:, :, start : start + 1].clone(), gates_all[:, :, start : start + 1].clone(), torch.full((2,), start + 1, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
        attn.decode(q, k, v, lengths, attn.decode_state(k, v, lengths - 1, types, queries=q_all), gates, types[:, :1],
                    has_text=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.decode(q, k, v, lengths, state, gates, types[:, :1], has_text=False)
    for i in range(steps):
        q.copy_(q_all[:, :, start + i : start + i + 1])
        gates.copy_(gates_all[:, :, start + i : start + i + 1])
        lengths.fill_(start + i + 1)
        graph.replay()
        torch.testing.assert_close(out.float(), eager[i].float(), rtol=1e-2, atol=1e-2)


def test_scale_multiplies_every_score_as_in_the_reference():
    """``scale`` reaches every branch and the dense path: the batched decode with
    a scale equals the reference backend's exact decode with it (float64, 1e-12)."""
    outputs = []
    for backend in ("flex", "reference"):
        attn = nsaflex.compile(SYNC_PATTERN, backend, device="cpu", head_dim=DIM)
        step = {name: value.double() if value.is_floating_point() else value for name, value in small_step(new=2).items()}
        step["token_types"] = torch.tensor([[1, 0], [1, 1]])
        types = torch.ones(2, 12, dtype=torch.long)
        state = attn.decode_state(step["k_cache"], step["v_cache"], step["lengths"] - 2, types)
        outputs.append(attn.decode(step["q"], step["k_cache"], step["v_cache"], step["lengths"], state, step["gates"],
                                   step["token_types"], scale=0.7))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError):
        attn.decode(step["q"], step["k_cache"], step["v_cache"], step["lengths"], state, step["gates"], step["token_types"], scale=-1.0)


def test_a_reordered_state_decodes_as_one_started_on_the_kept_rows():
    """Beam search keeps rows 2, 0 of three after a step: the next steps on the
    reordered state (whose constants, built for three rows, must not outlive
    the reordering) equal those on a state started with those two rows and
    stepped alike (float64, 1e-12)."""
    attn = nsaflex.compile(SYNC_PATTERN, "flex", device="cpu", head_dim=DIM)
    generator = torch.Generator().manual_seed(3)
    k = torch.randn(3, 2, 40, DIM, generator=generator, dtype=torch.float64)
    v = torch.randn(3, 2, 40, DIM, generator=generator, dtype=torch.float64)
    q = torch.randn(3, 4, 40, DIM, generator=generator, dtype=torch.float64)
    gates = torch.rand(3, 4, 40, 3, generator=generator, dtype=torch.float64)
    types = (torch.rand(3, 40, generator=generator) < 0.7).long()
    start = torch.tensor([20, 23, 26])

    def steps(rows, state, first, count):
        outputs = []
        for step in range(first, first + count):
            lengths = start[rows] + step + 1
            slot = (lengths - 1)[:, None]
            new = lambda x: x[rows].gather(2, slot[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
            outputs.append(attn.decode(new(q), k[rows], v[rows], lengths, state, new(gates), types[rows].gather(1, slot)))
        return outputs

    every, kept = torch.arange(3), torch.tensor([2, 0])
    state = attn.decode_state(k, v, start.clone(), types)
    steps(every, state, 0, 2)
    state.reorder(kept)
    twin = attn.decode_state(k[kept], v[kept], start[kept], types[kept])
    steps(kept, twin, 0, 2)
    for got, expected in zip(steps(kept, state, 2, 5), steps(kept, twin, 2, 5)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_bfloat16_cache_decodes_within_bfloat16_tolerance(backend, monkeypatch):
    """A bf16 cache and queries (the model's dtype on the GPU): compressed tokens
    and branches in float32, the text path in bf16 as the unpatched model's;
    against the reference on the same bf16 values, relative and absolute 1e-2."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attn = nsaflex.compile(SYNC_PATTERN, backend, device="cpu", head_dim=DIM)
    generator = torch.Generator().manual_seed(3)
    batch, capacity, start, steps = 2, 30, 18, 4
    scenario = Scenario(
        q=torch.randn(batch, 4, capacity, DIM, generator=generator).bfloat16().double(),
        k=torch.randn(batch, 2, capacity, DIM, generator=generator).bfloat16().double(),
        v=torch.randn(batch, 2, capacity, DIM, generator=generator).bfloat16().double(),
        gates=torch.rand(batch, 4, capacity, 3, generator=generator, dtype=torch.float64),
        types=(torch.rand(batch, capacity, generator=generator) < 0.6).long(),
        valid=torch.ones(batch, capacity, dtype=torch.bool), start=torch.full((batch,), start), steps=[1] * steps,
    )
    for slots, out in run_steps(attn, SYNC_PATTERN, scenario, torch.bfloat16):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), last_rows(SYNC_PATTERN, scenario, slots, None), rtol=1e-2, atol=1e-2)


def test_query_tile_spanning_the_prompt_and_the_steps():
    """Tiles of 2 queries that start in the prompt and end in a step, and one
    inside a two-token step; 2 free blocks of many: each step's selection
    depends on the kept tile sum (dropping it changes outputs by ~1)."""
    pattern = Pattern(name="tiles", compression=Compression(block=2, stride=2),
                      selection=Selection(block=2, count=2, forced=(), granularity="query_block", query_block=2),
                      gate=Gate(kind="mlp"))
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    capacity = 24
    scenario = Scenario(
        q=randn(1, 2, capacity, DIM, scale=3.0), k=randn(1, 1, capacity, DIM, scale=3.0), v=randn(1, 1, capacity, DIM),
        gates=torch.rand(1, 2, capacity, 2, generator=generator, dtype=torch.float64),
        types=torch.ones(1, capacity, dtype=torch.long), valid=torch.ones(1, capacity, dtype=torch.bool),
        start=torch.tensor([15]), steps=[1, 1, 1, 2, 1],
    )
    attn = nsaflex.compile(pattern, "flex", device="cpu", head_dim=DIM)
    for slots, out in run_steps(attn, pattern, scenario):
        torch.testing.assert_close(out.double(), last_rows(pattern, scenario, slots, None), rtol=1e-5, atol=1e-5)


def test_decode_plan_notes_the_tile_sums_of_query_block():
    plan = nsaflex.compile(QUERY_BLOCK, "flex", device="cpu", head_dim=DIM).decode_plan
    assert plan.kernel.startswith("batched torch") and "cached queries" in plan.notes[-1]


def test_release_mode_decode_plan_names_the_release_decode():
    """videonsa_release decodes on the batched entry: the plan says so, and a
    faithful state is refused by a release attention, naming the state."""
    from nsaflex.reference_release import release_pattern

    pattern = release_pattern(nsaflex.load_pattern("videonsa"))
    attn = nsaflex.compile(pattern, "flex", device="cpu", mode="videonsa_release", flex_mode="eager")
    assert attn.decode_plan.kernel.startswith("batched torch release decode")
    faithful = nsaflex.compile(nsaflex.load_pattern("videonsa"), "flex", device="cpu", flex_mode="eager")
    k = torch.zeros(1, 4, 8, 128)
    types = torch.ones(1, 8, dtype=torch.long)
    state = faithful.decode_state(k, k, torch.tensor([8]), types)
    q = torch.zeros(1, 28, 1, 128)
    with pytest.raises(InputError, match="state"):
        attn.decode(q, torch.zeros(1, 4, 9, 128), torch.zeros(1, 4, 9, 128), torch.tensor([9]), state,
                    torch.rand(1, 28, 1, 3), types[:, :1])
