"""The flex backend as a runtime: compile once and reuse, cached masks, bad input, plan text."""

from __future__ import annotations

import pytest
import torch

import nsaflex
from nsaflex.backends import flex
from nsaflex.errors import BackendUnavailable, InputError
from tests.device import DEVICE, skip_module_without_device

skip_module_without_device()

PATTERN = {
    "name": "runtime",
    "compression": {"block": 8, "stride": 4},
    "selection": {"block": 8, "count": 3, "forced": ["first", "current"]},
    "window": {"size": 16},
    "gate": {"kind": "constant", "values": [0.5, 1.0, 1.0]},
}


def _inputs(length, batch=2, kv_heads=2, group=3, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, dim, generator=generator).to(DEVICE)
    k = torch.randn(batch, kv_heads, length, dim, generator=generator).to(DEVICE)
    v = torch.randn(batch, kv_heads, length, dim, generator=generator).to(DEVICE)
    return q, k, v


def test_repeated_calls_do_not_recompile_and_new_lengths_recompile_once_per_branch():
    attn = nsaflex.compile(nsaflex.pattern_from_dict(PATTERN), backend="flex", device=DEVICE)
    attn._kernel.mode = "compiled"
    if DEVICE == "cpu":
        attn._kernel.blocks = (16, flex.MIN_CPU_COMPILED_KV_BLOCK)
    branches = ("compression", "selection", "window")
    with torch.no_grad():
        attn(*_inputs(77))
        after_first = dict(flex.COMPILE_COUNTS)
        masks = dict(attn._kernel._masks)
        for seed in range(1, 4):  # same shapes, new values (new selections, new bitmaps)
            attn(*_inputs(77, seed=seed))
        assert dict(flex.COMPILE_COUNTS) == after_first, "same shapes must not recompile"
        # Shape-only masks are built once and reused.
        assert all(attn._kernel._masks[key] is value for key, value in masks.items())
        attn(*_inputs(93))
        after_new = dict(flex.COMPILE_COUNTS)
        for branch in branches:
            assert after_new.get(branch, 0) - after_first.get(branch, 0) <= 1, branch
        attn(*_inputs(77, seed=9))
        attn(*_inputs(93, seed=9))
        assert dict(flex.COMPILE_COUNTS) == after_new, "lengths seen before must not recompile"


def _vision_rows(length: int, counts: list[int], seed: int) -> torch.Tensor:
    """``[len(counts), length]`` token classes with ``counts[b]`` vision tokens in row ``b``."""
    generator = torch.Generator().manual_seed(seed)
    types = torch.zeros(len(counts), length, dtype=torch.long)
    for row, count in enumerate(counts):
        types[row, torch.randperm(length, generator=generator)[:count]] = 1
    return types.to(DEVICE)


def test_hybrid_vision_counts_share_compiled_kernels():
    """Vision-only keys: the compacted sequences' length changes with the vision
    count; counts within one padding bucket must not recompile, and a new bucket
    costs at most one compile per branch."""
    spec = dict(PATTERN, hybrid={"vision_keys": "vision"})
    attn = nsaflex.compile(nsaflex.pattern_from_dict(spec), backend="flex", device=DEVICE)
    attn._kernel.mode = "compiled"
    if DEVICE == "cpu":
        attn._kernel.blocks = (16, flex.MIN_CPU_COMPILED_KV_BLOCK)
    branches = ("compression", "selection", "window")
    length = 77
    with torch.no_grad():
        before = dict(flex.COMPILE_COUNTS)
        # Longest rows of 65..72 vision tokens all pad to 72 (1/16 of 128).
        attn(*_inputs(length), None, _vision_rows(length, [72, 40], seed=0))
        after_first = dict(flex.COMPILE_COUNTS)
        assert attn._kernel.stats["compiled"]
        for branch in branches:
            assert after_first.get(branch, 0) - before.get(branch, 0) <= 1, branch
        for seed, counts in enumerate(([65, 65], [70, 12], [66, 71]), start=1):
            attn(*_inputs(length, seed=seed), None, _vision_rows(length, counts, seed=seed))
        assert dict(flex.COMPILE_COUNTS) == after_first, "vision counts in one bucket must not recompile"
        attn(*_inputs(length, seed=5), None, _vision_rows(length, [31, 20], seed=5))  # pads to 32 (1/16 of 32 is 2)
        after_new = dict(flex.COMPILE_COUNTS)
        for branch in branches:
            assert after_new.get(branch, 0) - after_first.get(branch, 0) <= 1, branch
        attn(*_inputs(length, seed=6), None, _vision_rows(length, [29, 31], seed=6))
        assert dict(flex.COMPILE_COUNTS) == after_new


@pytest.mark.parametrize("longest, length, expected", [(0, 9, 0), (1, 9, 1), (16, 99, 16), (17, 99, 18),
                                                       (65, 77, 72), (72, 77, 72), (73, 77, 77), (1000, 4096, 1024),
                                                       (1025, 4096, 1152), (100_000, 131_072, 106_496)])
def test_padded_length_buckets(longest, length, expected):
    from nsaflex.hybrid import padded_length

    assert padded_length(longest, length) == expected
    assert longest <= expected <= length and expected - longest <= max(1, longest // 8)  # at most 12.5 % padding


def test_auto_on_cpu_picks_flex():
    if DEVICE != "cpu":
        pytest.skip("auto prefers triton on CUDA")
    assert nsaflex.compile(nsaflex.pattern_from_dict(PATTERN), device="cpu").backend == "flex"


@pytest.mark.parametrize(
    "change, argument",
    [
        (lambda q, k, v, g, t: (q[0], k, v, g, t), "q"),
        (lambda q, k, v, g, t: (q.to(torch.int32), k, v, g, t), "q"),
        (lambda q, k, v, g, t: (q, k.double(), v, g, t), "k"),
        (lambda q, k, v, g, t: (q, k.to("meta"), v, g, t), "k"),
        (lambda q, k, v, g, t: (q[:, :5], k, v, g, t), "k"),  # 5 query heads over 2 kv heads
        (lambda q, k, v, g, t: (q, k, v[..., :8], g, t), "v"),
        (lambda q, k, v, g, t: (q, k, v, g[..., :2], t), "gates"),
        (lambda q, k, v, g, t: (q, k, v, None, t), "gates"),
        (lambda q, k, v, g, t: (q, k, v, g, t[:, :-1]), "token_types"),
        (lambda q, k, v, g, t: (q, k, v, g, t.float()), "token_types"),
        (lambda q, k, v, g, t: (q, k, v, g, t + 2), "token_types"),
        (lambda q, k, v, g, t: (q, k, v, g, None), "token_types"),
        (lambda q, k, v, g, t: (q[:, :, :0], k[:, :, :0], v[:, :, :0], g[:, :, :0], t[:, :0]), "q"),
        (lambda q, k, v, g, t: (q[:, :0], k, v, g[:, :0], t), "q"),  # no query heads
        (lambda q, k, v, g, t: tuple(x.to("meta") for x in (q, k, v, g, t)), "q"),  # no kernel runs on meta
    ],
)
def test_bad_input_names_the_argument(change, argument):
    spec = dict(PATTERN, gate={"kind": "mlp"}, hybrid={"vision_keys": "vision"})
    attn = nsaflex.compile(nsaflex.pattern_from_dict(spec), backend="flex", device=DEVICE)
    q, k, v = _inputs(20)
    gates = torch.rand(2, 6, 20, 3, device=DEVICE)
    types = torch.ones(2, 20, dtype=torch.long, device=DEVICE)
    with pytest.raises(InputError) as error:
        attn(*change(q, k, v, gates, types))
    assert error.value.argument == argument
    assert "expected" in str(error.value) and "found" in str(error.value)


def test_cuda_head_dim_floor_is_refused_in_the_plan():
    spec = dict(PATTERN, model={"head_dim": 8})
    pattern = nsaflex.pattern_from_dict(spec)
    assert "head dim" in flex.BACKEND.unsupported(pattern, "cuda")
    assert flex.BACKEND.unsupported(pattern, "cpu") is None
    with pytest.raises(BackendUnavailable, match="head dim"):
        nsaflex.make_plan(pattern, "flex", "cuda")


@pytest.mark.skipif(DEVICE != "cpu", reason="a CPU compile restriction")
def test_cpu_key_tiles_below_16_are_evaluated_eagerly_or_refused_when_compiled():
    """torch's compiled CPU FlexAttention gives wrong rows for key tiles of 8: auto
    mode evaluates them eagerly (and stays exact), forced compiled mode refuses."""
    from nsaflex.reference import reference_attention

    pattern = nsaflex.pattern_from_dict(PATTERN)
    attn = nsaflex.compile(pattern, backend="flex", device="cpu")
    attn._kernel.blocks = (16, 8)
    q, k, v = _inputs(45)
    with torch.no_grad():
        out = attn(q, k, v)
    assert not attn._kernel.stats["compiled"]
    expected = reference_attention(q.double(), k.double(), v.double(), pattern)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    attn._kernel.mode = "compiled"
    with pytest.raises(InputError) as error, torch.no_grad():
        attn(q, k, v)
    assert error.value.argument == "kv_block" and error.value.found == 8


def test_plan_describes_masks_and_union_cost():
    token = nsaflex.make_plan(nsaflex.load_pattern("videonsa"), "flex", "cpu")
    text = " ".join(f"{b.mask} {' '.join(b.notes)}" for b in token.branches)
    assert "union" in text and "bitmap" in text
    assert {b.branch for b in token.branches} == {"compression", "selection", "window", "text"}
    qblock = nsaflex.make_plan(nsaflex.load_pattern("videonsa-qblock"), "flex", "cuda")
    selection = next(b for b in qblock.branches if b.branch == "selection")
    assert "from_kv_blocks" in selection.mask
    dense = nsaflex.make_plan(nsaflex.load_pattern("window"), "flex", "cpu")
    assert dense.branches[0].branch == "window"


def test_all_text_batch_is_dense_and_gates_are_ignored():
    spec = dict(PATTERN, gate={"kind": "mlp"}, hybrid={"vision_keys": "vision"})
    attn = nsaflex.compile(nsaflex.pattern_from_dict(spec), backend="flex", device=DEVICE)
    q, k, v = _inputs(20)
    types = torch.zeros(2, 20, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        out = attn(q, k, v, torch.rand(2, 6, 20, 3, device=DEVICE), types)
        dense = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="narrow tile lists are a CUDA forward path")
def test_narrow_tile_lists_equal_full_width_on_cuda():
    pattern = nsaflex.pattern_from_dict(dict(PATTERN, selection={"block": 64, "count": 4, "granularity": "query_block", "query_block": 64},
                                             compression={"block": 64, "stride": 64}))
    q, k, v = (t.to(torch.bfloat16) for t in _inputs(1000, dim=64))
    outs = []
    for narrow in (True, False):
        kernel = flex.FlexKernel(pattern, narrow=narrow)
        with torch.no_grad():
            outs.append(kernel(q, k, v, None, None, None))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_small_backward_tiles_handler_offers_one_64_configuration():
    """The selection backward's kernel list on CUDA: one 64 x 64 configuration while
    the wrapped compile runs (so inductor neither refuses 64 x 64 BlockMasks nor
    autotunes), torch's own list outside it."""
    from torch._inductor.virtualized import V

    seen = {}

    def inner_compile():
        seen["inside"] = V.choices.get_flex_attention_bwd_configs(128, torch.bfloat16, "cpu")
        return "compiled"

    assert flex._with_small_backward_tiles(inner_compile)() == "compiled"
    (config,) = seen["inside"]
    assert (config.block_m1, config.block_n1, config.block_m2, config.block_n2) == (64, 64, 64, 64)
    outside = V.choices.get_flex_attention_bwd_configs(128, torch.bfloat16, "cpu")
    assert outside != seen["inside"]


def test_cuda_selection_tiling_with_and_without_gradients():
    pattern = nsaflex.load_pattern("videonsa-qblock")
    cuda = torch.device("cuda")
    inference = flex._block_sizes(pattern, "selection", cuda, False, (None, None))
    training = flex._block_sizes(pattern, "selection", cuda, True, (None, None))
    assert (inference.q_block, inference.kv_block) == (training.q_block, training.kv_block) == (64, 64)
    assert not inference.small_backward_tiles and training.small_backward_tiles
    assert all(name.startswith("fwd_") for name in training.options)
    assert flex._block_sizes(pattern, "window", cuda, True, (None, None)) == flex._Tiling(128, 128)
    token = nsaflex.load_pattern("videonsa")
    assert flex._block_sizes(token, "selection", cuda, False, (None, None))[:2] == (128, 64)
    assert flex._block_sizes(token, "selection", cuda, True, (None, None)) == flex._Tiling(128, 128)
    assert flex._block_sizes(pattern, "selection", torch.device("cpu"), True, (None, None)) == flex._Tiling(128, 128)
