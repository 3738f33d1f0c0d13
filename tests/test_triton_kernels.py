"""The Triton backend against the float64 reference, outputs and gradients.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set here when no CUDA
device is present, before the kernels are imported) on tiny shapes; with a GPU
the same properties run on CUDA (``-m gpu`` adds the larger bf16 checks in
``test_triton_gpu.py``). ``-m slow`` draws more examples.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.device import DEVICE, skip_module_without_device

skip_module_without_device()

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nsaflex.backends.triton import BACKEND  # noqa: E402
from nsaflex.errors import BackendUnavailable, InputError  # noqa: E402
from nsaflex.loader import load_pattern  # noqa: E402
from nsaflex.plan import make_plan  # noqa: E402
from nsaflex.pooling import MLPPooling  # noqa: E402
from nsaflex.reference import reference_attention  # noqa: E402
from nsaflex.spec import Compression, Gate, Hybrid, Pattern, Selection, Window  # noqa: E402
from tests.strategies import token_types  # noqa: E402
from tests.strategies import patterns as any_patterns  # noqa: E402

FEW = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
MORE = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
TOL = 3e-4  # float32 inputs: relative error against float64


def kernel_patterns(granularities=("token",)):
    """Small patterns of the kernels' space (``query_block``: tiles m of 1 to 16
    queries dividing l' <= 16), with head or group scoring, forced blocks,
    legacy visibility, MLP pooling, gates and hybrid token classes."""
    opts = dict(small=True, granularities=granularities, allow_layers=False, allow_budget=False, allow_model=False)
    return st.one_of(any_patterns(**opts), any_patterns(branches={"compression", "selection"}, **opts),
                     any_patterns(branches={"compression", "selection", "window"}, **opts))


@st.composite
def cases(draw, *, max_len=40, granularities=("token",)):
    pattern = draw(kernel_patterns(granularities))
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from((1, 2, 3, 7)))
    length = draw(st.one_of(st.integers(1, max_len), st.sampled_from((1, 3, 15, 16, 17, 33))))
    seed = draw(st.integers(0, 2**31 - 1))
    types = draw(token_types(batch, length)) if pattern.hybrid is not None else None
    # Half the draws in the model's layout: [B, L, H, D] tensors read as [B, H, L, D].
    return pattern, (batch, kv_heads, group, length, 16), seed, types, draw(st.booleans())


def make_inputs(pattern, shape, seed, types, *, dtype=torch.float32, device=DEVICE, grad=False, model_layout=False):
    """Inputs of ``shape`` (batch, kv heads, group, length, head dim); ``model_layout``:
    q, k and v as the model makes them, ``[B, L, H, D]`` tensors viewed as ``[B, H, L, D]``."""
    batch, kv_heads, group, length, dim = shape
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group

    def randn(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    def heads_first(h):
        if model_layout:
            tokens_first = torch.randn(batch, length, h, dim, generator=gen).to(device=device, dtype=dtype)
            return tokens_first.transpose(1, 2).requires_grad_(grad)
        return randn(batch, h, length, dim)

    q, k, v = heads_first(heads), heads_first(kv_heads), heads_first(kv_heads)
    gates = None
    if pattern.gate.kind != "constant" and pattern.branches:
        gates = torch.rand(batch, heads, length, len(pattern.branches), generator=gen).to(device=device, dtype=dtype)
        gates.requires_grad_(grad)
    pooler = None
    if pattern.compression is not None and pattern.compression.pooling == "mlp":
        torch.manual_seed(seed)
        pooler = MLPPooling(pattern.compression, dim).to(device)
    if types is not None:
        types = types.to(device)
    return q, k, v, gates, types, pooler


def rel(a, b):
    """Relative error; gradients that vanish in float64 (a single visible key,
    a parameter the output does not depend on) are judged on an absolute
    floor of 1e-2 RMS instead."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    floor = 1e-2 * max(1, b.numel()) ** 0.5
    return float((a - b).norm() / b.norm().clamp_min(floor))


def check(pattern, shape, seed, types, model_layout=False, *, backward, dtype=torch.float32, tol=TOL, **config):
    kernel = BACKEND.build(pattern, None) if not config else _build_with(pattern, config)
    q, k, v, gates, types, pooler = make_inputs(pattern, shape, seed, types, dtype=dtype, grad=backward,
                                                model_layout=model_layout)
    out = kernel(q, k, v, gates, types, pooler)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    ref = reference_attention(q, k, v, pattern, gates, types, pooler)
    assert rel(out, ref) < tol, rel(out, ref)
    if not backward:
        return
    inputs = [q, k, v] + ([gates] if gates is not None else [])
    params = list(pooler.parameters()) if pooler is not None else []
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    got = torch.autograd.grad(out, inputs + params, grad_out, allow_unused=True)
    want = torch.autograd.grad(ref, inputs + params, grad_out.double().cpu(), allow_unused=True)
    for name, a, b in zip(["q", "k", "v", "gates"][: len(inputs)] + [f"param{i}" for i in range(len(params))], got, want):
        if b is None:
            assert a is None or float(a.abs().max()) < 1e-5, name
            continue
        if a is None:  # not used on this path (e.g. no sparse query): the reference's gradient is zero
            assert float(b.abs().max()) == 0, name
            continue
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < tol * 3, (name, rel(a, b))


def _build_with(pattern, config):
    """The kernels with ``config``'s KernelConfig fields (``atomic``) and Launch
    fields (tile tokens, top-n chunk, ...) replaced."""
    from nsaflex.backends import triton as backend
    from nsaflex.kernels import ops

    launch_fields = {f.name for f in dataclasses.fields(ops.Launch)}
    cfg = ops.make_config(pattern, **{key: value for key, value in config.items() if key not in launch_fields})
    over = {key: value for key, value in config.items() if key in launch_fields}

    def kernel(q, k, v, gates, token_types, pooler):
        launch = dataclasses.replace(ops.launch_choices(q.shape[-1], q.shape[1] // k.shape[1]), **over)
        return backend._sparse_forward(pattern, cfg, q, k, v, gates, token_types, pooler, launch)

    return kernel


# -- property tests ------------------------------------------------------------------


@FEW
@given(cases())
def test_forward_matches_reference(case):
    check(*case, backward=False)


@FEW
@given(cases(max_len=24))
def test_backward_matches_reference(case):
    check(*case, backward=True)


@pytest.mark.slow
@MORE
@given(cases())
def test_forward_and_backward_many_draws(case):
    check(*case, backward=True)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases(max_len=24))
def test_saved_branch_outputs_serve_only_as_an_estimate(case):
    """The backward reads the forward's branch outputs (kept in q's dtype) only
    as an estimate of ``rowsum(dO * o_b)``. With every saved output off by a
    factor ``1 + 2^-8`` (more than bf16 rounding), the gate, key and value
    gradients still equal the reference (the loop corrects the estimate to
    fp32); and dq does not move when every key is shifted by a common part 20
    times their spread (the scores move by one constant a row, so nothing
    should): the mean key is taken out of dq's product, so the estimate's error
    reaches dq through the keys' spread only, not through the shared part."""
    from nsaflex.kernels import ops

    pattern, shape, seed, types, model_layout = case
    if pattern.compression is not None:  # MLP-pooled keys would not keep the scores under a shift
        mean_pooled = dataclasses.replace(pattern.compression, pooling="mean", mlp_hidden=None)
        pattern = dataclasses.replace(pattern, compression=mean_pooled)
    kernel = BACKEND.build(pattern, None)
    q, k, v, gates, types, pooler = make_inputs(pattern, shape, seed, types, grad=True, model_layout=model_layout)
    inputs = [q, k, v] + ([gates] if gates is not None else [])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q)

    def gradients(keys: torch.Tensor) -> tuple:
        with ops.record_forward() as seen:
            out = kernel(q, keys, v, gates, types, pooler)
        for name in ("oc", "o_s", "o_w"):
            if seen.get(name) is not None:
                seen[name].mul_(1 + 2**-8)
        return torch.autograd.grad(out, [q, keys, v] + inputs[3:], grad_out, allow_unused=True)

    got = gradients(k)
    shifted = gradients((k.detach() + 20.0).requires_grad_())
    ref = reference_attention(q, k, v, pattern, gates, types, pooler)
    want = torch.autograd.grad(ref, inputs, grad_out.double().cpu(), allow_unused=True)
    for name, a, a_shifted, b in zip(("q", "k", "v", "gates"), got, shifted, want):
        if a is None:  # not used on this path (no sparse query): the reference's gradient is zero
            assert a_shifted is None and float(b.abs().max()) == 0, name
            continue
        if name == "q":
            assert rel(a_shifted, a) < 1e-3, rel(a_shifted, a)
        else:
            assert rel(a, b) < TOL * 3 and rel(a_shifted, b) < TOL * 3, (name, rel(a, b), rel(a_shifted, b))


# -- query-block granularity: one selection per tile of m queries -----------------------------


@FEW
@given(cases(granularities=("query_block",)))
def test_query_block_forward_matches_reference(case):
    check(*case, backward=False)


@FEW
@given(cases(max_len=24, granularities=("query_block",)))
def test_query_block_backward_matches_reference(case):
    check(*case, backward=True)


def _query_block_pattern(m, *, scoring="group", visibility="causal", pooling="mean", hybrid=None,
                         granularity="query_block"):
    """Tiles of m queries in selection blocks of max(16, m) keys, one free slot
    (count 2, the current block forced): which candidate a tile takes depends
    on its queries' summed scores, where single queries often rank otherwise."""
    return Pattern(
        name=f"q{m}", compression=Compression(block=8, stride=8, visibility=visibility, pooling=pooling,
                                              mlp_hidden=8 if pooling == "mlp" else None),
        selection=Selection(block=max(16, m), count=2, forced=("current",), scoring=scoring, granularity=granularity,
                            query_block=m if granularity == "query_block" else None),
        window=Window(size=5), gate=Gate(kind="mlp", temperature=0.5),
        hybrid=Hybrid(vision_keys=hybrid) if hybrid is not None else None,
    )


def _differs_from_token_selection(pattern, shape, seed, types):
    """Whether the reference's output of ``pattern`` differs from that of the same
    pattern with per-token selection on these inputs (so that a backend that
    selected per token could not pass ``check``)."""
    token = _query_block_pattern(pattern.selection.query_block, granularity="token", scoring=pattern.selection.scoring,
                                 visibility=pattern.compression.visibility, pooling=pattern.compression.pooling,
                                 hybrid=pattern.hybrid.vision_keys if pattern.hybrid is not None else None)
    q, k, v, gates, types, pooler = make_inputs(pattern, shape, seed, types)
    a = reference_attention(q, k, v, pattern, gates, types, pooler)
    b = reference_attention(q, k, v, token, gates, types, pooler)
    return rel(a, b) > 10 * TOL


@pytest.mark.parametrize("m,length,kv_heads,group",
                         [(8, 100, 2, 7), (16, 100, 2, 3), (32, 160, 2, 2), (64, 260, 1, 2), (128, 400, 1, 1)])
def test_query_block_tiles_share_one_list(m, length, kv_heads, group):
    """Tiles of 8 to 128 queries, several candidates per tile for one free
    slot: outputs and gradients as the reference's (whose output differs from
    per-token selection's on these inputs), and every query of a tile holds
    its tile's block list (the kernels' per-token lists)."""
    from nsaflex.kernels.ops import record_forward

    pattern = _query_block_pattern(m)
    shape = (1, kv_heads, group, length, 16)
    assert _differs_from_token_selection(pattern, shape, m, None)
    with record_forward() as seen:
        check(pattern, shape, m, None, backward=True)
    sel = seen["sel"]
    for first in range(0, length, m):
        tile = sel[:, :, first:min(length, first + m)]
        assert torch.equal(tile, tile[:, :, :1].expand_as(tile)), first


@pytest.mark.parametrize(
    "scoring,visibility,pooling,hybrid",
    [("head", "causal", "mean", None), ("group", "videonsa_legacy", "mlp", None), ("head", "videonsa_legacy", "mean", "vision"),
     ("group", "causal", "mlp", "all")],
    ids=["head", "legacy-mlp", "head-legacy-packed", "hybrid-all-keys"],
)
def test_query_block_variants(scoring, visibility, pooling, hybrid):
    """Tiles of 8 queries with head scoring, legacy visibility, MLP pooling and
    hybrid rows (the compacted vision sequences packed with cu_seqlens, or all
    keys), forward and backward; a vision run of 60 tokens after 3 text tokens
    puts its tiles off the row's tile grid."""
    types = torch.tensor([[0] * 3 + [1] * 60 + [0] * 2 + [1] * 15, [1] * 47 + [0] * 33]) if hybrid else None
    pattern = _query_block_pattern(8, scoring=scoring, visibility=visibility, pooling=pooling, hybrid=hybrid)
    if visibility == "causal":
        # (legacy visibility hides the past blocks' compressed tokens: every
        # candidate scores 0 and ties go to the lower index at either granularity)
        assert _differs_from_token_selection(pattern, (2, 1, 3, 80, 16), 7, types)
    check(pattern, (2, 1, 3, 80, 16), 7, types, backward=True)


def test_query_block_plan_records_the_choice():
    """The plan names the per-tile top-n, the lists expanded to the tile's
    tokens, and the selection kernel's token tiles, each inside one query tile
    (Qwen2.5-VL's 28/4 heads: 8-token tiles, not the token path's 9)."""
    plan = make_plan(load_pattern("videonsa-qblock"), "triton", "cpu")
    selection = next(b for b in plan.branches if b.branch == "selection")
    notes = " ".join(selection.notes)
    assert "ranks each tile once" in selection.kernel and selection.constants["query_block"] == 64
    assert "expanded to the tile's tokens" in notes
    assert "tiles of 8 tokens (G = 7, 56 of 64 rows) lie inside one tile of 64 queries" in notes


@pytest.mark.parametrize("block,m,group,tokens", [(128, 1, 7, 9), (128, 8, 7, 8), (128, 64, 7, 8), (128, 4, 7, 4),
                                                  (128, 32, 4, 16), (128, 16, 1, 16), (128, 128, 2, 32),
                                                  (24, 3, 7, 3), (24, 12, 7, 6), (24, 24, 4, 12)])
def test_selection_tiles_lie_inside_one_query_tile(block, m, group, tokens):
    """The selection kernel's token tile for tiles of m queries: the largest
    divisor of m that fits its rows (m = 1: the token path's 64 // G), so no
    kernel tile runs the union of two query tiles' lists."""
    from nsaflex.kernels.ops import _Tiles, launch_choices, make_config

    selection = (Selection(block=block, count=2, granularity="query_block", query_block=m) if m > 1
                 else Selection(block=block, count=2))
    stride = 32 if block == 128 else 3
    cfg = make_config(Pattern(name="t", compression=Compression(block=stride, stride=stride), selection=selection,
                              window=Window(size=8), gate=Gate(kind="linear")))
    tiles = _Tiles(cfg, launch_choices(128, group), group)
    assert tiles.bt_sel == tokens and tiles.bt_sel * group <= tiles.rows_sel
    assert m == 1 or m % tiles.bt_sel == 0


@pytest.mark.parametrize("m", [3, 12, 24])
def test_query_block_tiles_not_a_power_of_two(m):
    """Tiles of 3, 12 and 24 queries in blocks of 24 keys (compression stride 3):
    a score program holds one tile in 16-token sub-tiles, rows past the tile
    masked; the top-n walks tiles m tokens apart."""
    pattern = Pattern(name=f"q{m}", compression=Compression(block=6, stride=3),
                      selection=Selection(block=24, count=2, forced=("current",), granularity="query_block",
                                          query_block=m),
                      window=Window(size=5), gate=Gate(kind="linear"))
    check(pattern, (1, 1, 2, 110, 16), m, None, backward=True)


def test_auto_runs_query_block_on_triton_on_cuda(monkeypatch):
    """auto on CUDA takes the Triton kernels for a query-block pattern they serve
    and records why; a pattern they refuse goes to flex, the refusal recorded."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = make_plan(load_pattern("videonsa-q8"), "auto", "cuda")
    assert plan.backend == "triton" and "query_block (m = 8) served by the Triton kernels" in plan.chosen_because
    assert plan.to_dict()["chosen_because"] == plan.chosen_because
    odd = Pattern(name="odd", compression=Compression(block=4, stride=4), gate=Gate(kind="mlp"),
                  selection=Selection(block=12, count=2, granularity="query_block", query_block=4))
    routed = make_plan(odd, "auto", "cuda")
    assert routed.backend == "flex" and "power of two" in dict(routed.reasons)["triton"]
    assert make_plan(load_pattern("videonsa-q8"), "triton", "cuda").chosen_because == ""


def test_query_block_top_n_in_chunks():
    """Query chunks of 16 tokens (the smallest) split the tiles' top-n across
    launches: each chunk's buffer rows are its tiles, numbered from the chunk."""
    check(_query_block_pattern(8), (1, 1, 2, 60, 16), 5, None, backward=False, topn_chunk=1)


# -- fixed cases that cover what random draws reach rarely ------------------------------

VIDEONSA_SMALL = Pattern(
    name="videonsa-small",
    compression=Compression(block=4, stride=4),
    selection=Selection(block=4, count=4, forced=("current",)),
    window=Window(size=6),
    gate=Gate(kind="mlp", temperature=0.3),
    hybrid=Hybrid(vision_keys="vision"),
)


def test_videonsa_class_group7_hybrid_varlen():
    types = torch.tensor([[0] * 3 + [1] * 30 + [0] * 2 + [1] * 6, [1] * 17 + [0] * 24])
    check(VIDEONSA_SMALL, (2, 1, 7, 41, 16), 3, types, backward=True)


@pytest.mark.parametrize("model_layout", [False, True], ids=["contiguous", "model-layout"])
def test_prompt_rows_run_in_place(monkeypatch, model_layout):
    """Rows whose vision tokens are one run between text (a video between a prompt
    and a question; a row with no vision; a row all vision) run on the rows as
    they are: nothing packed, q, k and v handed to the kernels without a copy
    where their strides serve, outputs and gradients equal to the reference."""
    from nsaflex.backends import triton as backend
    from nsaflex.kernels import ops

    def refuse(*args):
        raise AssertionError("packed a layout of one run per row")

    original, handed = ops.nsa_attention, []

    def spy(q, *args, **kwargs):
        handed.append(q)
        return original(q, *args, **kwargs)

    monkeypatch.setattr(backend, "pack_varlen", refuse)
    monkeypatch.setattr(ops, "nsa_attention", spy)
    types = torch.tensor([[0] * 5 + [1] * 30 + [0] * 6, [0] * 41, [1] * 41])
    check(VIDEONSA_SMALL, (3, 1, 7, 41, 16), 3, types, model_layout, backward=True)
    (q,) = handed
    assert (q.stride(1) == 16) == model_layout  # the model's layout is read as it is, not copied


@pytest.mark.parametrize(
    "compression,selection",
    [
        (Compression(block=4, stride=2), Selection(block=8, count=3, forced=("first", "previous", "current"))),
        (Compression(block=8, stride=2), Selection(block=4, count=2, forced=("previous",), scoring="head")),
        (Compression(block=4, stride=4, visibility="videonsa_legacy"), Selection(block=4, count=3, forced=())),
    ],
    ids=["overlap-eq9-all-forced", "overlap-head-scoring", "legacy-no-forced"],
)
def test_pattern_space(compression, selection):
    pattern = Pattern(name="p", compression=compression, selection=selection, window=Window(size=3), gate=Gate(kind="linear"))
    check(pattern, (1, 2, 3, 70, 16), 11, None, backward=True)


def test_mlp_pooling_parameter_gradients():
    pattern = Pattern(
        name="mlp", compression=Compression(block=4, stride=2, pooling="mlp", mlp_hidden=8),
        selection=Selection(block=4, count=2), gate=Gate(kind="constant", values=(0.7, 1.3)),
    )
    check(pattern, (1, 1, 2, 20, 16), 5, None, backward=True)


@pytest.mark.parametrize("scoring", ["group", "head"])
def test_union_blocks_before_the_tile_masked_per_row(scoring):
    """Selection blocks of 16 keys fill a step's 16 columns exactly, so the union
    blocks that end before a tile's first token run without per-entry masks
    (a row either selected the block or not): 100 tokens, many such blocks per
    tile, rows of tokens that did not select a block among them."""
    pattern = Pattern(name="rows", compression=Compression(block=8, stride=8),
                      selection=Selection(block=16, count=3, forced=("first", "current"), scoring=scoring),
                      window=Window(size=8), gate=Gate(kind="linear"))
    check(pattern, (2, 1, 3, 100, 16), 4, None, backward=True)


def test_launch_choices_of_the_measured_case():
    """The launch where the kernels were measured (D = 128, G = 7): any change
    here must come with a measurement, so the values are pinned."""
    from nsaflex.kernels.ops import Launch, launch_choices

    assert launch_choices(128, 7) == Launch(
        select_tokens=8, select_warps=4, select_stages=3, select_cap=0, dq_stages=2, lse_block=64, lse_stages=2,
        lse_cap=128, score_tokens=16, score_warps=8, score_stages=2, score_cap=128, dkv_stages=2, slc_dkv_stages=3,
        topn_lane_scores=16, topn_chain=4, topn_spread=1 << 22, topn_chunk=16384, topn_buffer_bytes=1 << 30)
    # a [rows, 256] fp32 accumulator needs more than 128 registers a thread
    assert launch_choices(256, 7).lse_cap == 0


@pytest.mark.parametrize("train", [False, True])
def test_selection_launch_options(monkeypatch, train):
    """slc_win_kernel is launched with the pipeline depth and register cap of
    ``launch_choices``, for inference and for the training forward alike."""
    from nsaflex.kernels import ops

    launched = []
    launch = ops._launch

    def spy(kernel, grid, *args, **kwargs):
        if getattr(kernel, "__name__", "") == "slc_win_kernel":
            launched.append((kwargs["num_stages"], kwargs["maxnreg"]))
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ops, "_launch", spy)
    q, k, v, gates, types, pooler = make_inputs(VIDEONSA_SMALL, (1, 1, 2, 11, 16), 7, None, dtype=torch.bfloat16,
                                                grad=train)
    with torch.set_grad_enabled(train):
        BACKEND.build(dataclasses.replace(VIDEONSA_SMALL, hybrid=None), None)(q, k, v, gates, types, pooler)
    chosen = ops.launch_choices(16, 2)
    assert launched == [(chosen.select_stages, chosen.select_cap)]


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5])
def test_lengths_shorter_than_blocks(length):
    check(VIDEONSA_SMALL, (1, 1, 7, length, 16), length, torch.ones(1, length, dtype=torch.long), backward=True)


@FEW
@given(cases(max_len=40), st.sampled_from((1, 2, 4, 8, 16)), st.booleans())
def test_tile_sizes_and_pointer_loads_match_reference(case, select_tokens, descriptors):
    """Row tiles of other sizes than the launch's (up to the 64-row bound) and
    key blocks read through per-element pointers (where tensor descriptors
    cannot serve: misaligned tensors) change only the schedule, never the
    result."""
    from unittest import mock

    from nsaflex.kernels import ops

    with mock.patch.object(ops, "tma_ready", ops.tma_ready if descriptors else (lambda *tensors: False)):
        check(*case, backward=True, select_tokens=select_tokens)


@pytest.mark.parametrize("scoring", ["group", "head"])
def test_tiles_hold_at_most_64_selecting_rows(scoring):
    """Whatever tile sizes a config asks for, a tile's rows are a power of two
    that hold its tokens' heads, and its selecting rows (tokens, or token-head
    rows for head scoring) fit the union's 64-bit row masks."""
    from nsaflex.kernels.ops import _Tiles, launch_choices, make_config

    pattern = dataclasses.replace(VIDEONSA_SMALL, selection=dataclasses.replace(VIDEONSA_SMALL.selection, scoring=scoring))
    cfg = make_config(pattern)
    for group in range(1, 10):
        for tokens in (None, 1, 4, 16, 64, 128):
            launch = launch_choices(16, group)
            if tokens is not None:
                launch = dataclasses.replace(launch, select_tokens=tokens)
            tiles = _Tiles(cfg, launch, group)
            assert tiles.rows_sel & (tiles.rows_sel - 1) == 0 and tiles.rows_sel >= 16, (group, tokens, tiles.rows_sel)
            assert 1 <= tiles.bt_sel and tiles.bt_sel * group <= tiles.rows_sel, (group, tokens, tiles.bt_sel)
            assert tiles.sel_rows <= 64, (group, tokens, tiles.sel_rows)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(kernel_patterns().filter(lambda p: p.compression is not None), st.sampled_from((7, 8)),
       st.integers(24, 48), st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_compression_dkv_query_splits_change_only_the_schedule(pattern, group, length, splits, seed):
    """bwd_cmp_dkv_kernel splits each compressed tile's queries (here 3-6 tiles
    of 8 tokens) over as many programs as the launch picks (on a GPU: enough to
    fill it); on the CPU the rule picks one for these lengths, so other counts
    are forced here."""
    from unittest import mock

    from nsaflex.kernels import ops

    types = torch.ones(1, length, dtype=torch.long) if pattern.hybrid is not None else None
    with mock.patch.object(ops, "_cmp_dkv_splits", lambda *args: splits):
        check(pattern, (1, 1, group, length, 16), seed, types, backward=True)


def test_atomic_variant_close_to_deterministic():
    pattern = dataclasses.replace(VIDEONSA_SMALL, hybrid=None)
    check(pattern, (1, 1, 3, 30, 16), 2, None, backward=True, atomic=True)


@FEW
@given(cases(max_len=40))
def test_atomic_backward_matches_reference(case):
    """``atomic=True`` (the selection's dk, dv added with fp32 atomics) against the
    float64 reference: every pattern kind, group and head scoring, packed
    sequences; the same tolerance as the deterministic path (only the order of
    fp32 additions differs)."""
    check(*case, backward=True, atomic=True)


def test_compile_deterministic_false_reaches_the_kernels_and_the_plan(monkeypatch):
    """``nsaflex.compile(..., deterministic=False)``: the plan records it, the Triton
    kernels get ``atomic=True`` and the gradients still match the reference."""
    import nsaflex
    from nsaflex.kernels import ops

    made = []
    real = ops.make_config
    monkeypatch.setattr(ops, "make_config", lambda pattern, **over: made.append(over) or real(pattern, **over))
    pattern = dataclasses.replace(VIDEONSA_SMALL, hybrid=None)
    attn = nsaflex.compile(pattern, backend="triton", device=DEVICE, deterministic=False)
    assert made[-1] == {"atomic": True}
    assert attn.plan.deterministic is False and attn.plan.to_dict()["deterministic"] is False
    q, k, v, gates, types, pooler = make_inputs(pattern, (1, 1, 3, 30, 16), 5, None, grad=True)
    out = attn(q, k, v, gates)
    reference = reference_attention(q, k, v, pattern, gates)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(reference.sum(), (q, k, v))
    for got, want in zip(grads, expected):
        assert (got - want).norm() <= TOL * want.norm()
    assert nsaflex.compile(pattern, backend="triton", device=DEVICE).plan.deterministic is True
    assert made[-1] == {"atomic": False}
    with pytest.raises(InputError, match="deterministic"):
        nsaflex.compile(pattern, backend="triton", device=DEVICE, deterministic="no")


# one query chunk, or several (chunks of 32 or 48 tokens)
TOPN_PATHS = [dict(), dict(topn_chunk=32), dict(topn_chunk=48)]
TOPN_IDS = ["one-chunk", "chunks-of-32", "chunks-of-48"]


def selected_blocks_of(pattern, q, k, v, gates, types=None, **config):
    """The kernels' block lists as a bool ``[Hsel, L, J]`` (batch row 0, not packed)."""
    from nsaflex.kernels import ops

    with ops.record_forward() as seen:
        out = _build_with(pattern, config)(q, k, v, gates, types, None)
    sel = seen["sel"][0].cpu()
    num_blocks = -(-q.shape[2] // pattern.selection.block)
    got = torch.zeros(sel.shape[0], sel.shape[1], num_blocks, dtype=torch.bool)
    hs, t, c = torch.nonzero(sel >= 0, as_tuple=True)
    got[hs, t, sel[hs, t, c].long()] = True
    # every row lists each block at most once
    assert int((sel >= 0).sum()) == int(got.sum())
    return got, out


@pytest.mark.parametrize("config", TOPN_PATHS, ids=TOPN_IDS)
@pytest.mark.parametrize("group", [3, 7])
def test_selected_blocks_equal_reference(config, group):
    # 45 blocks: several 16-block score chunks; query chunks of 32 / 48 tokens. Groups of 3 and
    # 7 (4 and 8 rows a token): the score pass orders a tile's rows by head
    # bits (_score_rows), differently for each.
    pattern = Pattern(name="s", compression=Compression(block=2, stride=2),
                      selection=Selection(block=2, count=5, forced=("first", "current")), gate=Gate(kind="mlp"))
    q, k, v, gates, _, _ = make_inputs(pattern, (1, 2, group, 90, 16), 7, None)
    got, out = selected_blocks_of(pattern, q, k, v, gates, **config)
    ref_out, selections = reference_attention(q, k, v, pattern, gates, return_selection=True)
    assert torch.equal(got, selections[0][::group])  # group scoring: one selection per kv head
    assert rel(out, ref_out) < TOL


@pytest.mark.parametrize("config", TOPN_PATHS, ids=TOPN_IDS)
@pytest.mark.parametrize("scoring", ["group", "head"])
def test_tied_scores_go_to_the_lower_index(config, scoring):
    """Keys repeating with the period of two compressed tokens: every block
    score is tied with every other block of the same parity, so the choice is
    decided by the tie rule. Queries and keys are small multiples of 1/4, so
    every dot product is exact and the ties are exact in the kernels and in
    the float64 reference alike (random floats would tie only up to the
    reference's own rounding)."""
    pattern = Pattern(name="t", compression=Compression(block=2, stride=2),
                      selection=Selection(block=2, count=4, forced=("current",), scoring=scoring),
                      gate=Gate(kind="mlp"))
    q, k, v, gates, _, _ = make_inputs(pattern, (1, 1, 2, 70, 16), 3, None)
    gen = torch.Generator().manual_seed(5)
    q = (torch.randint(-2, 3, q.shape, generator=gen) * 0.25).to(q)
    base = (torch.randint(-2, 3, (1, 1, 4, 16), generator=gen) * 0.25).to(k)
    k = base.repeat(1, 1, 18, 1)[:, :, :70].contiguous()
    got, out = selected_blocks_of(pattern, q, k, v, gates, **config)
    ref_out, selections = reference_attention(q, k, v, pattern, gates, return_selection=True)
    want = selections[0] if scoring == "head" else selections[0][::2]
    assert torch.equal(got, want)
    assert rel(out, ref_out) < TOL


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**31 - 1), st.sampled_from((9, 1000)),
       st.sampled_from((1, 2)), st.sampled_from((1, 3, 4)), st.sampled_from((1, 1 << 16, 1 << 22, 1 << 31)),
       st.sets(st.sampled_from(("first", "previous", "current"))), st.integers(0, 3))
def test_top_n_search_picks_the_best_with_ties_to_the_lower_index(tokens, count, seed, levels, rows, chain, spread, forced,
                                                                   head_shift):
    """topn_select_kernel alone, against a sort: token t's candidates are the
    blocks j <= t (one-token blocks); scores are multiples of 1/4 in [0, 2]
    (most rows tie, and the tie rule, the lower index, decides) or of 2/999
    in [0, 2]. The drawn forced blocks (first, previous, current) read -1, as
    the score pass writes them, and take their slots after the free ones.
    Programs of ``rows x chain`` tokens, each search after a row's first
    token started from a bracket of +- ``spread`` around the previous token's
    threshold: 1 almost always misses on one side, 2^31 covers everything;
    the result must not depend on either. Rows held in one part, or in a
    head of ``width >> head_shift`` blocks and a power-of-two tail that
    covers the rest (as :func:`topn_row_parts` gives for later chunks): ties
    then straddle the two parts."""
    from nsaflex.kernels import forward as fwd
    from nsaflex.kernels.ops import next_pow2

    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (1, 1, tokens, tokens), generator=gen) * (2 / (levels - 1))
    forced_of = []
    for t in range(tokens):
        blocks = ([0] if "first" in forced else []) + ([t - 1] if "previous" in forced and t >= 1 else []) \
            + ([t] if "current" in forced else [])
        blocks = list(dict.fromkeys(blocks))  # the kernel keeps one slot per distinct forced block
        scores[0, 0, t, blocks] = -1.0
        forced_of.append(blocks)
    scores = scores.to(DEVICE)
    nt = 16
    sel = torch.full((1, 1, tokens, nt + 4), -7, dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    width = max(2, next_pow2(tokens))
    head = max(1, width >> head_shift)
    tail = next_pow2(tokens - head) if tokens > head else 0
    fwd.topn_select_kernel[(-(-tokens // (rows * chain)), 1, 1)](
        scores, sel, zero, zero + tokens, *scores.stride()[:3], *sel.stride()[:3], 0, tokens,
        ROWS=rows, JP=head, CHAIN=chain, SPREAD=spread, LS=1, COUNT=count,
        FIRST="first" in forced, PREV="previous" in forced, CUR="current" in forced, NT=nt,
        JT=max(1, tail), TAIL=tail > 0, UNIT=1, CURRENT=False, num_warps=1,
    )
    for t in range(tokens):
        row = scores[0, 0, t, : t + 1].cpu()
        free = [j for j in range(t + 1) if j not in forced_of[t]]
        # best first; among equal scores the lower index first
        order = sorted(free, key=lambda j: (-float(row[j]), j))
        want = sorted(order[: max(0, count - len(forced_of[t]))])
        got = sel[0, 0, t].cpu().tolist()
        assert got[:nt] == want + [-1] * (nt - len(want)), (t, got, want)
        assert sorted(b for b in got[nt:] if b >= 0) == sorted(forced_of[t]), (t, got, forced_of[t])
        assert got[nt + 3] == -1


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 70), st.sampled_from((2, 4, 8)), st.integers(1, 12), st.integers(0, 2**16), st.sampled_from((3, 999)))
def test_top_n_with_the_own_block_a_candidate(tokens, block, count, seed, levels):
    """``CURRENT``: token t ranks blocks ``j <= t // l`` (its own, partial, block
    too, as the released VideoNSA does), ties to the lower index, against a sort."""
    from nsaflex.kernels import forward as fwd
    from nsaflex.kernels.ops import next_pow2, topn_row_parts

    gen = torch.Generator().manual_seed(seed)
    blocks = -(-tokens // block)
    scores = (torch.randint(0, levels, (1, 1, tokens, blocks), generator=gen) * (2 / (levels - 1))).to(DEVICE)
    nt = max(16, next_pow2(count))
    sel = torch.full((1, 1, tokens, nt + 4), -7, dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    head, tail = topn_row_parts(1, blocks)
    fwd.topn_select_kernel[(-(-tokens // 8), 1, 1)](
        scores, sel, zero, zero + tokens, *scores.stride()[:3], *sel.stride()[:3], 0, tokens,
        ROWS=4, JP=head, CHAIN=2, SPREAD=1 << 22, LS=block, COUNT=count, FIRST=False, PREV=False, CUR=False, NT=nt,
        JT=max(1, tail), TAIL=tail > 0, UNIT=1, CURRENT=True, num_warps=1,
    )
    for t in range(tokens):
        row = scores[0, 0, t].cpu()
        order = sorted(range(t // block + 1), key=lambda j: (-float(row[j]), j))
        got = sorted(b for b in sel[0, 0, t].cpu().tolist() if b >= 0)
        assert got == sorted(order[:count]), (t, got)


def test_topn_row_parts():
    """The two-part rows of the top-n kernel cover the largest candidate count
    with powers of two, narrower than one part or not at all: at l' = 64 and
    16K-token chunks, 1,024-1,280 candidates take 1,024 + 256 and
    1,536-1,792 one part of 2,048."""
    from nsaflex.kernels.ops import next_pow2, topn_row_parts

    assert topn_row_parts(1024, 1280) == (1024, 256)
    assert topn_row_parts(1280, 1536) == (1024, 512)
    assert topn_row_parts(1536, 1792) == (2048, 0)
    assert topn_row_parts(0, 256) == (256, 0)
    for least in range(0, 70):
        for most in range(max(1, least), 140):
            head, tail = topn_row_parts(least, most)
            assert head & (head - 1) == 0 and tail & (tail - 1) == 0
            assert head + tail >= most and head + tail <= next_pow2(most)
            assert tail == 0 or head + tail < next_pow2(most)


@given(block=st.integers(1, 512), rows=st.integers(1, 448), width=st.integers(1, 140))
def test_row_tile_constants_the_kernels_derive(block, rows, width):
    """The selection kernel and bwd_dq derive their key tile and union-list
    sizes from the pattern's constants (fewer launch arguments); those are the
    sizes the host allocates for: the block padded to a power of two of at least
    16 columns, a list of rows x width slots rounded up to a power of two, the
    bits of a row index."""
    from nsaflex.kernels import forward as fwd
    from nsaflex.kernels.ops import next_pow2

    assert fwd.key_tile(block) == max(16, next_pow2(block))
    assert 1 << fwd.union_log(rows, width) == next_pow2(rows * width)
    assert 1 << fwd.row_log(rows) == next_pow2(rows)


def test_sequence_table_holds_the_layout():
    """The [B, 4] int32 table the row-tile kernels read: starts, lengths,
    compressed starts, compressed lengths per sequence."""
    from nsaflex.kernels.ops import SeqLayout

    starts, lens = torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([5, 7, 3], dtype=torch.int32)
    cstarts, clens = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([1, 2, 0], dtype=torch.int32)
    table = SeqLayout(starts, lens, cstarts, clens, 7, 2, True).table
    assert table.dtype == torch.int32 and table.is_contiguous()
    assert table.tolist() == [[0, 5, 0, 1], [5, 7, 1, 2], [12, 3, 3, 0]]


def test_two_step_top_n_edges():
    """Fewer candidates than free slots, no free slot at all (count = |forced|),
    every forced kind, legacy visibility, chunks of 16 tokens."""
    patterns = [
        Pattern(name="a", compression=Compression(block=4, stride=2),
                selection=Selection(block=4, count=6, forced=("first", "previous", "current")), gate=Gate(kind="mlp")),
        Pattern(name="b", compression=Compression(block=2, stride=2),
                selection=Selection(block=2, count=1, forced=("current",)), gate=Gate(kind="mlp")),
        Pattern(name="c", compression=Compression(block=4, stride=4, visibility="videonsa_legacy"),
                selection=Selection(block=4, count=3, forced=()), gate=Gate(kind="mlp")),
    ]
    for i, pattern in enumerate(patterns):
        q, k, v, gates, _, _ = make_inputs(pattern, (1, 1, 3, 53, 16), 20 + i, None)
        got, out = selected_blocks_of(pattern, q, k, v, gates, topn_chunk=16)
        ref_out, selections = reference_attention(q, k, v, pattern, gates, return_selection=True)
        assert torch.equal(got, selections[0][::3]), pattern.name
        assert rel(out, ref_out) < TOL, pattern.name


def test_two_step_top_n_gradients_varlen():
    """Packed varlen sequences (hybrid) over several query chunks: outputs and gradients."""
    types = torch.tensor([[0] * 3 + [1] * 30 + [0] * 2 + [1] * 6, [1] * 17 + [0] * 24])
    check(VIDEONSA_SMALL, (2, 1, 7, 41, 16), 4, types, backward=True, topn_chunk=16)


def test_topn_chunk_is_bounded():
    from nsaflex.kernels import ops

    pattern = Pattern(name="s", compression=Compression(block=64, stride=64),
                      selection=Selection(block=64, count=32, forced=("current",)), gate=Gate(kind="mlp"))
    cfg = ops.make_config(pattern)
    launch = ops.launch_choices(128, 7)
    chunk, width = ops.topn_chunk_tokens(cfg, launch, 1, 4, 128 * 1024, 16)
    assert (chunk, width) == (16384, 2048)
    chunk, width = ops.topn_chunk_tokens(cfg, launch, 1, 4, 1024 * 1024, 16)
    assert chunk * 4 * width * 4 <= launch.topn_buffer_bytes and chunk % 16 == 0
    assert ops.topn_chunk_tokens(cfg, launch, 1, 4, 100, 16) == (112, 1)


# -- refusals ----------------------------------------------------------------------------------


def test_refuses_what_the_score_pass_cannot_step_over():
    """A selection block of 3 compression strides: the score pass steps over a
    power of two of compressed tokens, so the backend refuses and auto routes
    to flex."""
    pattern = Pattern(name="odd", compression=Compression(block=4, stride=4),
                      selection=Selection(block=12, count=2), gate=Gate(kind="mlp"))
    assert "power of two" in BACKEND.unsupported(pattern, "cpu")
    with pytest.raises(BackendUnavailable):
        make_plan(pattern, "triton", "cpu")


def test_refuses_bad_tensors_before_launch():
    kernel = BACKEND.build(VIDEONSA_SMALL, None)
    types = torch.ones(1, 8, dtype=torch.long)
    q, k, v = torch.randn(1, 7, 8, 16, dtype=torch.float64), torch.randn(1, 1, 8, 16, dtype=torch.float64), torch.randn(1, 1, 8, 16, dtype=torch.float64)
    with pytest.raises(InputError):
        kernel(q, k, v, torch.rand(1, 7, 8, 3, dtype=torch.float64), types, None)
    q, k, v = torch.randn(1, 7, 8, 24), torch.randn(1, 1, 8, 24), torch.randn(1, 1, 8, 24)
    with pytest.raises(InputError):
        kernel(q, k, v, torch.rand(1, 7, 8, 3), types, None)
    # head scoring gives every (token, head) row of a tile one bit of a 64-bit mask
    head = dataclasses.replace(VIDEONSA_SMALL, selection=dataclasses.replace(VIDEONSA_SMALL.selection, scoring="head"))
    q, k, v = torch.randn(1, 65, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(InputError, match="64 query heads per kv head"):
        BACKEND.build(head, None)(q, k, v, torch.rand(1, 65, 8, 3), types, None)


def test_refuses_offsets_past_32_bits_inside_a_group_before_launch():
    """Rows are addressed as a 64-bit base (batch, the group's first head, the
    sequence's first token) plus 32-bit offsets: a group whose heads and tokens
    span 2^31 elements or more is refused before any kernel runs (meta
    tensors: nothing is allocated, so a launch would fail differently)."""
    from nsaflex.kernels import ops

    def attempt(length):
        q = torch.empty(1, 28, length, 128, device="meta")
        k = torch.empty(1, 4, length, 128, device="meta")
        lens = torch.full((1,), length, dtype=torch.int32, device="meta")
        lay = ops.SeqLayout(lens, lens, lens, lens, length, 0, False)
        cfg = ops.make_config(dataclasses.replace(VIDEONSA_SMALL, hybrid=None))
        ops.nsa_attention(q, k, k, None, None, torch.empty(1, 28, length, 3, device="meta"), lay, cfg)

    with pytest.raises(InputError, match="32-bit offsets inside a group"):
        attempt(2**31 // (8 * 128))
    with pytest.raises(Exception) as raised:  # one token fewer passes the check and reaches the kernels
        attempt(2**31 // (8 * 128) - 1)
    assert not isinstance(raised.value, InputError)


def test_cpu_without_interpreter_is_unsupported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in BACKEND.unsupported(VIDEONSA_SMALL, "cpu")


# -- launches that do not fit ----------------------------------------------------------------


class _SharedMemoryBound:
    """A stand-in kernel that needs ``per_stage`` bytes of shared memory per
    pipeline stage on a GPU with ``limit`` bytes, and ``registers`` registers
    a thread, as Triton and ptxas report them."""

    __name__ = "shared_memory_bound"

    def __init__(self, per_stage: int, limit: int, registers: int = 0):
        self.per_stage, self.limit, self.registers, self.launched = per_stage, limit, registers, []

    def __getitem__(self, grid):
        def launch(*args, num_stages, maxnreg=None, **kwargs):
            from triton.runtime.errors import OutOfResources, PTXASError

            if maxnreg is not None and maxnreg < self.registers:
                raise PTXASError(f"Insufficient registers ({maxnreg})")
            if num_stages * self.per_stage > self.limit:
                raise OutOfResources(num_stages * self.per_stage, self.limit, "shared memory")
            self.launched.append((grid, args, num_stages, maxnreg, kwargs))

        return launch


@given(st.integers(1, 6), st.integers(1, 100_000), st.integers(1, 400_000),
       st.sampled_from((None, 0, 128)), st.integers(32, 255))
@settings(max_examples=50, deadline=None)
def test_launch_drops_to_the_deepest_pipeline_that_fits(requested, per_stage, limit, cap, registers):
    """``ops._launch`` runs the requested depth when it fits, else the deepest
    one that does, and keeps a register cap (``maxnreg``) only where the kernel
    compiles under it; it remembers both for the next launch; it raises when
    even one stage does not fit."""
    from triton.runtime.errors import OutOfResources

    from nsaflex.kernels import ops

    kernel = _SharedMemoryBound(per_stage, limit, registers)
    arg = torch.zeros(1)
    fits = min(requested, limit // per_stage)
    # the stand-in's needs are launch arguments too: they are part of what _launch remembers
    options = {"BLOCK": per_stage, "LIMIT": limit, "REGS": registers, "maxnreg": cap}
    if fits < 1:
        with pytest.raises(OutOfResources):
            ops._launch(kernel, (1,), arg, num_stages=requested, **options)
        return
    for _ in range(2):
        ops._launch(kernel, (1,), arg, num_stages=requested, **options)
    kept = cap if cap and cap >= registers else None
    assert [launch[2:4] for launch in kernel.launched] == [(fits, kept), (fits, kept)]
    assert kernel.launched[0][4] == {"BLOCK": per_stage, "LIMIT": limit, "REGS": registers}
    key = next(key for key in ops._FITTED
               if key[4] == (("BLOCK", per_stage), ("LIMIT", limit), ("REGS", registers)) and key[2:4] == (requested, cap))
    assert ops._FITTED[key] == (fits, kept)


@given(st.sampled_from([torch.bfloat16, torch.float32]), st.sampled_from([4, 8, 16, 64]), st.integers(0, 7),
       st.booleans())
@settings(max_examples=40, deadline=None)
def test_tensor_descriptors_only_where_the_layout_allows(dtype, dim, offset, transposed):
    """``ops.tma_ready`` accepts a tensor for descriptor loads exactly when its
    base and leading strides are 16-byte aligned and its last dimension is
    contiguous and at least 16 bytes wide."""
    from nsaflex.kernels.ops import tma_ready

    storage = torch.zeros(2 * 3 * 5 * dim + offset, dtype=dtype)
    x = storage[offset:].view(2, 3, 5, dim)
    if transposed:
        x = x.transpose(-1, -2)
    size = x.element_size()
    # torch allocates at 64-byte boundaries: the offset decides the base's alignment;
    # untransposed, the row stride is dim elements; transposed, the last dim is strided.
    expected = not transposed and (offset * size) % 16 == 0 and (dim * size) % 16 == 0
    assert tma_ready(x) == expected
    assert tma_ready(x, torch.zeros(4, 16, dtype=dtype)) == expected


def test_descriptor_workspace_restores_the_callers_allocator():
    """The allocator installed for descriptor workspaces lives only around
    nsaflex's launches: the caller's allocator is back afterwards, also when a
    launch raises."""
    from triton.runtime import _allocation

    from nsaflex.kernels.ops import descriptor_workspace

    def callers(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    token = _allocation._allocator.set(callers)
    try:
        with descriptor_workspace(torch.device("cpu")):
            inside = _allocation._allocator.get()
            assert inside is not callers
            assert inside(64, 16, None).numel() == 64
        assert _allocation._allocator.get() is callers
        with pytest.raises(RuntimeError):
            with descriptor_workspace(torch.device("cpu")):
                raise RuntimeError("launch failed")
        assert _allocation._allocator.get() is callers
        with descriptor_workspace(None):
            assert _allocation._allocator.get() is callers
    finally:
        _allocation._allocator.reset(token)
