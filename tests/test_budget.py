"""Budget analysis: closed forms against brute-force pair counts."""

from __future__ import annotations

import itertools
import math

import pytest
import sympy
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nsaflex import (
    Budget,
    Compression,
    Gate,
    Hybrid,
    InputError,
    LayerOverride,
    Model,
    Pattern,
    PatternError,
    Selection,
    Window,
    load_pattern,
    loads_pattern,
)
from nsaflex.loader import bundled_patterns
from nsaflex.budget import (
    D,
    H,
    H_KV,
    L,
    analyse,
    attended_fraction,
    count_attended_pairs,
    count_attended_pairs_bruteforce,
    dense_pairs,
)
from nsaflex.spec import FORCED_BLOCKS

# --- random small patterns, built from the spec classes -------------------------------------


@st.composite
def small_patterns(draw, *, need_selection: bool = False) -> Pattern:
    branches = draw(st.sets(st.sampled_from(("compression", "selection", "window")), min_size=1))
    if need_selection:
        branches.add("selection")
    if "selection" in branches:
        branches.add("compression")
    kwargs: dict = {}
    if "compression" in branches:
        stride = draw(st.integers(1, 4))
        kwargs["compression"] = Compression(
            block=stride * draw(st.integers(1, 4)),
            stride=stride,
            visibility=draw(st.sampled_from(("causal", "videonsa_legacy"))),
        )
    if "selection" in branches:
        stride = kwargs["compression"].stride
        block = stride * draw(st.integers(1, 5))
        forced = tuple(draw(st.permutations(FORCED_BLOCKS))[: draw(st.integers(0, 3))])
        granularity = draw(st.sampled_from(("token", "query_block")))
        tile = None
        if granularity == "query_block":
            tile = draw(st.sampled_from([m for m in range(1, block + 1) if block % m == 0]))
        kwargs["selection"] = Selection(
            block=block,
            count=draw(st.integers(max(1, len(forced)), 6)),
            forced=forced,
            granularity=granularity,
            query_block=tile,
        )
    if "window" in branches:
        kwargs["window"] = Window(size=draw(st.integers(1, 40)))
    hybrid = draw(st.sampled_from((None, "vision", "all")))
    if hybrid is not None:
        kwargs["hybrid"] = Hybrid(vision_keys=hybrid)
    return Pattern(name="random", **kwargs)


def _sympy_pairs(analysis, length: int) -> dict[str, int]:
    return {branch: int(expr.subs(L, length)) for branch, expr in analysis.pairs.items()}


@settings(max_examples=120)
@given(pattern=small_patterns(), length=st.integers(1, 200))
def test_exact_counts_equal_bruteforce(pattern: Pattern, length: int) -> None:
    brute = count_attended_pairs_bruteforce(pattern, length)
    assert count_attended_pairs(pattern, length) == brute
    assert _sympy_pairs(analyse(pattern), length) == brute


@settings(max_examples=60)
@given(pattern=small_patterns(need_selection=True), data=st.data())
def test_selection_counts_off_block_boundaries(pattern: Pattern, data) -> None:
    """Lengths that end inside a block (and inside a tile) on purpose."""
    block = pattern.selection.block
    assume(block > 1)
    length = block * data.draw(st.integers(0, 12)) + data.draw(st.integers(1, block - 1))
    assert length % block
    brute = count_attended_pairs_bruteforce(pattern, length)
    assert count_attended_pairs(pattern, length) == brute
    assert _sympy_pairs(analyse(pattern), length) == brute


@settings(max_examples=60)
@given(pattern=small_patterns(), steps=st.integers(0, 2))
def test_aligned_polynomials_exact_on_aligned_lengths(pattern: Pattern, steps: int) -> None:
    analysis = analyse(pattern)
    length = analysis.aligned_from + steps * analysis.alignment
    assume(length <= 320)
    assert length % analysis.alignment == 0
    brute = count_attended_pairs_bruteforce(pattern, length)
    assert {b: int(e.subs(L, length)) for b, e in analysis.pairs_aligned.items()} == brute
    for expr in analysis.pairs_aligned.values():
        assert expr.is_polynomial(L) and sympy.degree(expr, L) <= 2
    fraction = analysis.attended_fraction_aligned.subs(L, length)
    assert fraction == sympy.Rational(
        sum(brute.get(b, 0) for b in ("selection", "window")), length * (length + 1) // 2
    )


@settings(max_examples=25)
@given(pattern=small_patterns(need_selection=True), length=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_counts_match_the_reference_masks(pattern: Pattern, length: int, seed: int) -> None:
    """The lead's dense reference, on random data, attends exactly the counted pairs."""
    torch = pytest.importorskip("torch")
    from nsaflex.reference import compression_visibility, reference_attention, selection_mask, window_mask

    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, length, 4, generator=generator)
    k = torch.randn(1, 1, length, 4, generator=generator)
    v = torch.randn(1, 1, length, 4, generator=generator)
    token_types = torch.ones(1, length, dtype=torch.long) if pattern.hybrid is not None else None
    gates = torch.rand(1, 2, length, len(pattern.branches), generator=generator)
    _, selections = reference_attention(q, k, v, pattern, gates, token_types, return_selection=True)
    counts = count_attended_pairs(pattern, length)
    mask = selection_mask(selections[0], pattern.selection.block, length)
    for head in range(2):
        assert int(mask[head].sum()) == counts["selection"]
    assert int(compression_visibility(length, pattern.compression).sum()) == counts["compression"]
    if pattern.window is not None:
        assert int(window_mask(length, pattern.window.size).sum()) == counts["window"]


def test_known_small_counts() -> None:
    # Window of 3 over 5 tokens: 1 + 2 + 3 + 3 + 3.
    window = Pattern(name="w", window=Window(3))
    assert count_attended_pairs(window, 5) == {"window": 12}
    # Blocks of 2, n = 2, current forced, 7 tokens: t=0..6 attend 1,2,3,4,3,4,3.
    pattern = Pattern(name="s", compression=Compression(2, 2), selection=Selection(block=2, count=2))
    assert count_attended_pairs(pattern, 7)["selection"] == 1 + 2 + 3 + 4 + 3 + 4 + 3
    # Compression l = 4, d = 2, 9 tokens: tokens end at 3, 5, 7; seen by 6, 4, 2 queries.
    assert count_attended_pairs(Pattern(name="c", compression=Compression(4, 2)), 9) == {"compression": 12}
    assert dense_pairs(4) == 10


def test_bruteforce_is_not_the_closed_form() -> None:
    """Guard the guard: a wrong selection rule changes the brute-force count."""
    good = Pattern(name="a", compression=Compression(2, 2), selection=Selection(block=2, count=2, forced=()))
    token = count_attended_pairs_bruteforce(good, 9)["selection"]
    tiled = Pattern(
        name="b",
        compression=Compression(2, 2),
        selection=Selection(block=2, count=2, forced=(), granularity="query_block", query_block=2),
    )
    # A tile never counts its own block: fewer pairs than per-token selection.
    assert count_attended_pairs_bruteforce(tiled, 9)["selection"] < token


# --- VideoNSA ------------------------------------------------------------------------------------------


def test_videonsa_keys_per_query() -> None:
    pattern = load_pattern("videonsa")
    analysis = analyse(pattern)
    assert analysis.keys_per_query == 2304 == 64 * 32 + 256
    figures = analysis.evaluate(131072)
    assert figures.keys_per_query == 2304
    # Compressed tokens: (L - 64) / 64 + 1 = L / 64 = 2048.
    assert figures.compressed_tokens == 2048
    assert figures.keys_per_query_with_compression == 2304 + 2048
    assert analysis.keys_per_query_with_compression.subs(L, 131072) == 4352
    assert load_pattern("videonsa-w512").keys_per_query == 2304
    # Fixed by the model section: no free head or dim symbols left.
    assert analysis.query_heads == 28 and analysis.kv_heads == 4 and analysis.head_dim == 128
    assert isinstance(figures.flops_forward_total, int)
    assert analysis.is_hybrid and "all-vision" in " ".join(analysis.describe())


def test_large_length_fraction_matches_gamma() -> None:
    pattern = load_pattern("videonsa")
    analysis = analyse(pattern)
    b, n, w = 64, 32, 256
    gamma = 2 * (b * n + w) / (L - 1)
    assert sympy.simplify(analysis.gamma - gamma) == 0
    # gamma counts every selected block as full; the current block is on average
    # (l' + 1) / 2 long, so L * fraction -> 2 (K_attn - (l' - 1) / 2).
    limit = sympy.limit(L * analysis.attended_fraction_aligned, L, sympy.oo)
    assert limit == 2 * (b * n + w) - (b - 1)
    ratio = sympy.limit(analysis.attended_fraction_aligned / analysis.gamma, L, sympy.oo)
    assert ratio == 1 - sympy.Rational(b - 1, 2 * (b * n + w))
    for length in (65536, 131072, 1 << 20):
        figures = analysis.evaluate(length)
        assert figures.attended_fraction < figures.gamma
        assert figures.attended_fraction == pytest.approx(figures.gamma, rel=0.03)
        assert figures.attended_fraction == pytest.approx(attended_fraction(pattern, length), rel=1e-15)
    # Without a forced partial block the large-L fraction is exactly gamma's.
    full_blocks = Pattern(
        name="full", compression=Compression(64, 64), selection=Selection(64, 32, forced=()), window=Window(256)
    )
    ratio = sympy.limit(analyse(full_blocks).attended_fraction_aligned / analyse(full_blocks).gamma, L, sympy.oo)
    assert ratio == 1


def test_fraction_examples() -> None:
    analysis = analyse(load_pattern("videonsa"))
    figures = analysis.evaluate(131072)
    pairs = count_attended_pairs(load_pattern("videonsa"), 131072)
    assert figures.attended_pairs == pairs["selection"] + pairs["window"]
    assert figures.attended_fraction == (pairs["selection"] + pairs["window"]) / (131072 * 131073 / 2)
    assert figures.attended_fraction_with_compression == pytest.approx(
        (pairs["selection"] + pairs["window"] + pairs["compression"]) / (131072 * 131073 / 2)
    )
    # Short sequences: everything is attended (window alone covers all keys).
    assert analysis.evaluate(100).attended_fraction == pytest.approx(
        (count_attended_pairs(load_pattern("videonsa"), 100)["selection"] + 5050) / 5050
    )


# --- FLOPs and bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["videonsa", "nsa", "window", "qblock-small"])
def test_flops_follow_pair_counts(name: str) -> None:
    pattern = load_pattern(name)
    analysis = analyse(pattern)
    hq, dim = analysis.query_heads, analysis.head_dim
    for length in (1, 1000, 8191, 65536):
        pairs = count_attended_pairs(pattern, length)
        figures = analysis.evaluate(length)
        for branch, count in pairs.items():
            expected = 4 * hq * dim * count
            assert sympy.simplify(figures.flops_forward[branch] - expected) == 0
            assert sympy.simplify(figures.flops_backward[branch] - sympy.Rational(5, 2) * expected) == 0
            assert sympy.simplify(analysis.flops_forward[branch].subs(L, length) - expected) == 0
        assert sympy.simplify(figures.dense_flops_forward - 4 * hq * dim * length * (length + 1) // 2) == 0
        assert sympy.simplify(figures.dense_flops_backward - 10 * hq * dim * length * (length + 1) // 2) == 0
        assert sympy.simplify(figures.flops_forward_total - sum(figures.flops_forward.values())) == 0


def test_videonsa_numbers() -> None:
    figures = analyse(load_pattern("videonsa")).evaluate(131072)
    pairs = figures.pairs
    assert figures.flops_forward["window"] == 4 * 28 * 128 * pairs["window"]
    assert figures.dense_flops_forward == 4 * 28 * 128 * 131072 * 131073 // 2
    # bf16: q and out (28 heads) plus k and v (4 kv heads) of 128 dims.
    assert figures.bytes_moved["window"] == 2 * 128 * (2 * 28 * 131072 + 2 * 4 * 131072)
    assert figures.bytes_moved["compression"] == 2 * 128 * (2 * 28 * 131072 + 2 * 4 * 2048)
    assert figures.dense_bytes_moved == figures.bytes_moved["window"]
    assert 0 < figures.flops_ratio < 0.06


def test_symbols_stay_free_without_a_model() -> None:
    analysis = analyse(load_pattern("window"))
    assert analysis.query_heads == H and analysis.kv_heads == H_KV and analysis.head_dim == D
    figures = analysis.evaluate(1024)
    assert figures.flops_forward["window"] == 4 * H * D * (512 * 1024 - 512 * 511 // 2)
    assert sympy.expand(figures.bytes_moved["window"] - 2 * D * (2 * H * 1024 + 2 * H_KV * 1024)) == 0
    assert figures.to_dict()["flops_forward"]["window"] == str(figures.flops_forward["window"])


def test_dense_layer_and_layer_resolution() -> None:
    pattern = Pattern(
        name="layered",
        window=Window(8),
        model=Model(num_layers=4),
        layers=(LayerOverride(at=(0,), dense=True), LayerOverride(at=(1,), window=Window(4))),
    )
    dense = analyse(pattern, layer=0)
    assert dense.branches == ("dense",)
    assert dense.evaluate(10).attended_fraction == 1.0
    assert attended_fraction(pattern.for_layer(0), 10) == 1.0
    assert analyse(pattern, layer=1).evaluate(10).pairs == {"window": 1 + 2 + 3 + 4 * 7}
    assert analyse(pattern, layer=2).evaluate(10).pairs == {"window": sum(min(t + 1, 8) for t in range(10))}


def test_analysis_to_dict_is_json() -> None:
    import json

    analysis = analyse(load_pattern("nsa"))
    text = json.dumps({"closed": analysis.to_dict(), "at": analysis.evaluate(4096).to_dict()})
    data = json.loads(text)
    assert data["closed"]["keys_per_query"] == 64 * 16 + 512
    assert data["at"]["length"] == 4096


def test_bad_length_is_refused() -> None:
    pattern = load_pattern("window")
    for bad in (0, -3, 2.5, True, "8k"):
        with pytest.raises(InputError, match="length"):
            attended_fraction(pattern, bad)  # type: ignore[arg-type]


# --- budget.max_attended_fraction -----------------------------------------------------------------


def _videonsa_with_budget(bound: float, at: int = 131072) -> Pattern:
    base = load_pattern("videonsa")
    return Pattern(
        name="bounded",
        compression=base.compression,
        selection=base.selection,
        window=base.window,
        gate=base.gate,
        hybrid=base.hybrid,
        model=base.model,
        budget=Budget(max_keys_per_query=2304, max_attended_fraction=bound, at_length=at),
    )


def test_max_attended_fraction_checked() -> None:
    fraction = attended_fraction(load_pattern("videonsa"), 131072)
    assert 0.03 < fraction < 0.036
    _videonsa_with_budget(0.04)  # loose enough
    _videonsa_with_budget(fraction)  # exactly the fraction passes
    with pytest.raises(PatternError) as info:
        _videonsa_with_budget(0.01)
    assert info.value.key_path == "budget.max_attended_fraction"
    assert "0.03" in info.value.expected and info.value.found == 0.01
    # Short sequences attend everything.
    with pytest.raises(PatternError, match="budget.max_attended_fraction"):
        _videonsa_with_budget(0.5, at=1024)


def test_max_attended_fraction_located_in_yaml(tmp_path) -> None:
    path = tmp_path / "tight.yaml"
    path.write_text(
        "extends: videonsa\n"
        "name: tight\n"
        "budget:\n"
        "  max_attended_fraction: 0.01\n"
        "  at_length: 131072\n"
    )
    with pytest.raises(PatternError) as info:
        load_pattern(path)
    error = info.value
    assert error.key_path == "budget.max_attended_fraction"
    assert error.source == str(path) and error.line == 4
    assert "budget.max_attended_fraction" in str(error)
    loads_pattern(path.read_text().replace("0.01", "0.05"), str(path))


@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 127, 200, 1000, 131071])
def test_bundled_patterns_exact_counts(length: int) -> None:
    for name in sorted(bundled_patterns()):
        pattern = load_pattern(name)
        exact = count_attended_pairs(pattern, length)
        assert exact == _sympy_pairs(analyse(pattern), length)
        if length <= 200:
            assert exact == count_attended_pairs_bruteforce(pattern, length)


def test_gate_irrelevant_to_counts() -> None:
    a = Pattern(name="a", window=Window(5))
    b = Pattern(name="b", window=Window(5), gate=Gate(kind="constant", values=(0.5,)))
    assert all(count_attended_pairs(a, n) == count_attended_pairs(b, n) for n in range(1, 30))


def test_forced_subsets_exhaustive_tiny() -> None:
    """Every forced subset and granularity on a tiny geometry, every length."""
    for r in range(0, 4):
        for forced in itertools.permutations(FORCED_BLOCKS, r):
            for granularity, tile in (("token", None), ("query_block", 1), ("query_block", 2), ("query_block", 4)):
                for count in range(max(1, r), 5):
                    pattern = Pattern(
                        name="t",
                        compression=Compression(2, 2),
                        selection=Selection(4, count, forced=forced, granularity=granularity, query_block=tile),
                    )
                    analysis = analyse(pattern)
                    for length in range(1, 30):
                        brute = count_attended_pairs_bruteforce(pattern, length)
                        assert count_attended_pairs(pattern, length) == brute, (forced, granularity, tile, count, length)
                    for length in (analysis.aligned_from, analysis.aligned_from + 4):
                        assert int(analysis.pairs_aligned["selection"].subs(L, length)) == (
                            count_attended_pairs_bruteforce(pattern, length)["selection"]
                        )
    assert math.isclose(attended_fraction(Pattern(name="w", window=Window(1)), 10), 10 / 55)


def test_window_and_compression_exhaustive_tiny() -> None:
    for size in range(1, 10):
        pattern = Pattern(name="w", window=Window(size))
        analysis = analyse(pattern)
        for length in range(1, 25):
            brute = count_attended_pairs_bruteforce(pattern, length)
            assert count_attended_pairs(pattern, length) == brute == _sympy_pairs(analysis, length)
    for stride, factor, visibility in itertools.product((1, 2, 3), (1, 2, 3), ("causal", "videonsa_legacy")):
        pattern = Pattern(name="c", compression=Compression(stride * factor, stride, visibility=visibility))
        analysis = analyse(pattern)
        for length in range(1, 25):
            brute = count_attended_pairs_bruteforce(pattern, length)
            assert count_attended_pairs(pattern, length) == brute == _sympy_pairs(analysis, length)
