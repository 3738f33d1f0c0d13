"""The pattern DSL round trip: Python -> YAML -> Python, Python -> dict -> Python,
the bundled patterns, ``extends``, per-layer overrides and immutability."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nsaflex import (
    Budget,
    Compression,
    Gate,
    Hybrid,
    LayerOverride,
    Model,
    Pattern,
    PatternError,
    Selection,
    Window,
    dump_pattern,
    load_pattern,
    loads_pattern,
    pattern_from_dict,
)
from nsaflex.loader import bundled_patterns
from nsaflex.spec import BRANCH_ORDER

from strategies import all_power_of_two, gqa_shapes, lengths_for, patterns, pattern_block_sizes, token_types

SECTION_CLASSES = {
    "compression": Compression,
    "selection": Selection,
    "window": Window,
    "gate": Gate,
    "hybrid": Hybrid,
    "model": Model,
    "budget": Budget,
}


def _plain(value: object) -> bool:
    """Whether ``value`` is plain YAML data (no tuples, no dataclasses)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


# -- round trips -----------------------------------------------------------------------
@settings(max_examples=250)
@given(patterns(allow_dense=True))
def test_yaml_round_trip(pattern: Pattern) -> None:
    text = dump_pattern(pattern)
    back = loads_pattern(text, "roundtrip.yaml")
    assert back == pattern, text
    assert hash(back) == hash(pattern)
    # The canonical text is a fixed point.
    assert dump_pattern(back) == text


@settings(max_examples=200)
@given(patterns(allow_dense=True))
def test_dict_round_trip(pattern: Pattern) -> None:
    data = pattern.to_dict()
    assert _plain(data), data
    assert pattern_from_dict(data) == pattern
    # Defaults stay out of the dict form.
    assert ("dense" in data) == pattern.dense and ("layers" in data) == bool(pattern.layers)
    assert ("gate" in data) == (pattern.gate != Gate())
    # Every non-default section of the pattern is in the dict, under its own name.
    for name, cls in SECTION_CLASSES.items():
        section = getattr(pattern, name)
        written = section is not None and not (name in ("gate", "model") and section == cls())
        assert (name in data) == written
        if written:
            assert data[name] == section.to_dict()


@settings(max_examples=100)
@given(patterns())
def test_round_trip_of_each_layer(pattern: Pattern) -> None:
    """A resolved layer (dense ones included) round-trips too."""
    for override in pattern.layers:
        for layer in override.at:
            resolved = pattern.for_layer(layer)
            assert loads_pattern(dump_pattern(resolved)) == resolved
            assert pattern_from_dict(resolved.to_dict()) == resolved


@settings(max_examples=200)
@given(patterns(allow_layers=False), st.data())
def test_python_api_keyword_round_trip(pattern: Pattern, data: st.DataObject) -> None:
    """Rebuilding every section from its own fields gives an equal object;
    lists given for tuple fields are stored as tuples."""
    kwargs = {f.name: getattr(pattern, f.name) for f in dataclasses.fields(pattern)}
    if pattern.selection is not None:
        fields = dataclasses.asdict(pattern.selection)
        fields["forced"] = list(fields["forced"])
        kwargs["selection"] = Selection(**fields)
        assert isinstance(kwargs["selection"].forced, tuple)
    if pattern.gate.values is not None:
        kwargs["gate"] = dataclasses.replace(pattern.gate, values=list(pattern.gate.values))
        assert isinstance(kwargs["gate"].values, tuple)
    rebuilt = Pattern(**kwargs)
    assert rebuilt == pattern


# -- the strategies themselves (other suites rely on their promises) -----------------------
@settings(max_examples=150)
@given(st.data())
def test_strategy_options_are_honoured(data: st.DataObject) -> None:
    branches = data.draw(st.sampled_from([None, {"window"}, {"compression"}, {"compression", "selection"}, {"compression", "selection", "window"}]))
    hybrid = data.draw(st.sampled_from([(None,), ("vision",), ("all",), (None, "vision", "all")]))
    granularities = data.draw(st.sampled_from([("token",), ("query_block",), ("token", "query_block")]))
    small = data.draw(st.booleans())
    pow2 = data.draw(st.booleans())
    pattern = data.draw(
        patterns(
            small=small, power_of_two_blocks=pow2, allow_legacy=False, allow_mlp_pooling=False,
            branches=branches, hybrid=hybrid, granularities=granularities,
        )
    )
    layers = [pattern] + [pattern.for_layer(layer) for o in pattern.layers for layer in o.at]
    if small or pow2:
        assert all_power_of_two(pattern)
    if small:
        assert all(s <= 40 for s in pattern_block_sizes(pattern))
    if branches is not None:
        assert set(pattern.branches) == branches
        assert all(p.dense or set(p.branches) == branches for p in layers)
    assert (pattern.hybrid.vision_keys if pattern.hybrid else None) in hybrid
    for p in layers:
        if p.compression is not None:
            assert p.compression.visibility == "causal" and p.compression.pooling == "mean"
        if p.selection is not None:
            assert p.selection.granularity in granularities


@settings(max_examples=100)
@given(patterns(), st.data())
def test_drawn_patterns_meet_their_constraints(pattern: Pattern, data: st.DataObject) -> None:
    """Drawn patterns are valid and meet their own budget."""
    if pattern.budget is not None and pattern.budget.max_keys_per_query is not None:
        assert pattern.budget.max_keys_per_query >= pattern.keys_per_query
    if pattern.selection is not None:
        assert pattern.selection.count >= len(pattern.selection.forced)
        assert pattern.selection.block % pattern.compression.stride == 0


def test_strategies_reach_every_value() -> None:
    """Each enumerated value of every field is drawn (a coverage check, not a property)."""
    seen: set[tuple[str, object]] = set()

    @settings(max_examples=400, database=None, derandomize=True)
    @given(patterns())
    def collect(pattern: Pattern) -> None:
        for p in [pattern, *(pattern.for_layer(layer) for o in pattern.layers for layer in o.at)]:
            seen.add(("branches", p.branches))
            seen.add(("dense", p.dense))
            if p.compression:
                seen.add(("pooling", p.compression.pooling))
                seen.add(("visibility", p.compression.visibility))
                seen.add(("overlap", p.compression.stride < p.compression.block))
                seen.add(("mlp_hidden", p.compression.mlp_hidden is not None))
            if p.selection:
                seen.add(("scoring", p.selection.scoring))
                seen.add(("granularity", p.selection.granularity))
                seen.update(("forced", f) for f in p.selection.forced)
                seen.add(("no forced", not p.selection.forced))
        seen.add(("gate", pattern.gate.kind))
        seen.add(("hybrid", pattern.hybrid.vision_keys if pattern.hybrid else None))
        seen.add(("budget", pattern.budget is not None))
        seen.add(("model", pattern.model != Model()))
        seen.add(("layers", bool(pattern.layers)))
        seen.update(("remove", r) for o in pattern.layers for r in o.remove)

    collect()
    wanted = {
        ("pooling", "mean"), ("pooling", "mlp"), ("visibility", "causal"), ("visibility", "videonsa_legacy"),
        ("overlap", True), ("overlap", False), ("mlp_hidden", True), ("scoring", "group"), ("scoring", "head"),
        ("granularity", "token"), ("granularity", "query_block"), ("forced", "first"), ("forced", "previous"),
        ("forced", "current"), ("no forced", True), ("gate", "mlp"), ("gate", "linear"), ("gate", "constant"),
        ("hybrid", None), ("hybrid", "vision"), ("hybrid", "all"), ("budget", True), ("model", True),
        ("layers", True), ("dense", True), ("remove", "window"), ("remove", "selection"), ("remove", "compression"),
        *(("branches", b) for b in [("compression",), ("window",), ("compression", "selection"),
                                    ("compression", "window"), ("compression", "selection", "window")]),
    }
    assert wanted <= seen, wanted - seen


@settings(max_examples=200)
@given(patterns(small=True), st.data())
def test_lengths_for(pattern: Pattern, data: st.DataObject) -> None:
    sizes = {s for s in pattern_block_sizes(pattern) if s > 1}
    length = data.draw(lengths_for(pattern))
    assert 1 <= length <= 4 * max(sizes, default=16)
    capped = data.draw(lengths_for(pattern, max_length=5))
    assert 1 <= capped <= 5


TWOS = Pattern(name="p", compression=Compression(2, 2), selection=Selection(2, 2), window=Window(2))
SIXTEENS = Pattern(name="p", compression=Compression(16, 16), selection=Selection(16, 2), window=Window(16))


@settings(max_examples=5, database=None, derandomize=True)
@given(
    st.lists(lengths_for(TWOS, max_blocks=50), min_size=300, max_size=300),
    st.lists(lengths_for(SIXTEENS), min_size=300, max_size=300),
)
def test_lengths_for_is_biased_to_awkward_lengths(twos: list[int], sixteens: list[int]) -> None:
    """Measured over 300 draws in one example (Hypothesis does not repeat
    examples, so counting across examples would not show the bias)."""
    assert set(twos) <= set(range(1, 101)) and set(sixteens) <= set(range(1, 65))
    if len(set(twos)) < 20 or len(set(sixteens)) < 20:
        return  # Hypothesis' first, simplest example
    # Block size 2, lengths 1..100: uniform draws would be half odd.
    assert sum(n % 2 for n in twos) > 0.65 * len(twos)
    # Block size 16, lengths 1..64: uniform draws would be 15/64 below one block.
    assert sum(n < 16 for n in sixteens) > 0.3 * len(sixteens)
    assert {1, 15, 17} <= set(sixteens)


@settings(max_examples=100)
@given(gqa_shapes().flatmap(lambda s: st.tuples(st.just(s), st.integers(1, 40))), st.data())
def test_gqa_shapes_and_token_types(shape_length: tuple, data: st.DataObject) -> None:
    import torch

    (batch, kv_heads, group, head_dim), length = shape_length
    assert 1 <= batch <= 3 and 1 <= kv_heads <= 4 and group in (1, 2, 3, 4, 7, 8) and head_dim in (16, 32, 64)
    types = data.draw(token_types(batch, length))
    assert types.shape == (batch, length) and types.dtype == torch.int64
    assert set(types.unique().tolist()) <= {0, 1}


def test_token_types_reach_all_text_and_all_vision_rows() -> None:
    kinds: set[str] = set()

    @settings(max_examples=200, database=None, derandomize=True)
    @given(token_types(3, 12))
    def collect(types) -> None:  # type: ignore[no-untyped-def]
        for row in types.tolist():
            kinds.add("text" if set(row) == {0} else "vision" if set(row) == {1} else "mixed")
        if (types == 0).all():
            kinds.add("batch text")
        if (types == 1).all():
            kinds.add("batch vision")

    collect()
    assert kinds == {"text", "vision", "mixed", "batch text", "batch vision"}


# -- bundled patterns --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(bundled_patterns()))
def test_bundled_patterns_load_and_round_trip(name: str) -> None:
    pattern = load_pattern(name)
    assert pattern.name == name
    assert load_pattern(bundled_patterns()[name]) == pattern
    assert loads_pattern(dump_pattern(pattern)) == pattern
    assert pattern.description


def test_videonsa_documented_values() -> None:
    p = load_pattern("videonsa")
    assert p.branches == ("compression", "selection", "window")
    assert (p.compression.block, p.compression.stride) == (64, 64)
    assert p.compression.pooling == "mean" and p.compression.visibility == "causal"
    assert (p.selection.block, p.selection.count) == (64, 32)
    assert p.selection.forced == ("current",) and p.selection.granularity == "token"
    assert p.selection.scoring == "group"
    assert p.window.size == 256
    assert p.gate.kind == "mlp" and p.gate.temperature == 0.3 and p.gate.bias == 0.0
    assert p.hybrid == Hybrid(vision_keys="vision")
    assert p.keys_per_query == 2304 == p.budget.max_keys_per_query
    assert p.model == Model(query_heads=28, kv_heads=4, head_dim=128, hidden_size=3584, num_layers=28)
    assert p.is_causal and p.causal_granularity == 1


def test_videonsa_w512_documented_values() -> None:
    base, p = load_pattern("videonsa"), load_pattern("videonsa-w512")
    assert p.selection.count == 28 and p.window.size == 512
    assert p.keys_per_query == 2304 == base.keys_per_query
    # Everything else is inherited from videonsa.
    assert p == dataclasses.replace(
        base, name="videonsa-w512", description=p.description,
        selection=dataclasses.replace(base.selection, count=28), window=Window(512),
    )
    assert "512" in p.description


@pytest.mark.parametrize("name,tile", [("videonsa-qblock", 64), ("videonsa-q8", 8)])
def test_videonsa_qblock_inherits(name: str, tile: int) -> None:
    base, p = load_pattern("videonsa"), load_pattern(name)
    assert p.selection == dataclasses.replace(base.selection, granularity="query_block", query_block=tile)
    assert p.causal_granularity == tile
    assert p.keys_per_query == 2304


def test_nsa_documented_values() -> None:
    p = load_pattern("nsa")
    assert (p.compression.block, p.compression.stride, p.compression.pooling) == (32, 16, "mlp")
    assert (p.selection.block, p.selection.count) == (64, 16)
    assert p.selection.forced == ("first", "previous", "current")
    assert p.window.size == 512
    assert p.hybrid is None and p.budget is None
    assert p.keys_per_query == 64 * 16 + 512


def test_other_bundled_values() -> None:
    q = load_pattern("qblock-small")
    assert q.selection.granularity == "query_block" and q.selection.query_block == 128
    assert q.gate == Gate(kind="constant", values=(0.5, 1.0, 1.0))
    w = load_pattern("window")
    assert w.branches == ("window",) and w.window.size == 512 and w.gate.values == (1.0,)


# -- extends -----------------------------------------------------------------------------------
def test_extends_relative_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "name: base\ndescription: the base\ncompression: {block: 8, stride: 4}\n"
        "selection: {block: 16, count: 4}\nwindow: {size: 32}\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\nselection: {count: 6}\n")
    (tmp_path / "noext.yaml").write_text("extends: base\nwindow: {size: 64}\n")
    child = load_pattern(tmp_path / "sub" / "child.yaml")
    assert child.name == "child"  # an unnamed child is named after its file
    assert child.description == ""  # the parent's description is not inherited
    assert child.compression == Compression(8, 4)
    assert child.selection == Selection(16, 6)  # merged field by field
    assert child.window == Window(32)
    # Without the .yaml suffix, relative to the extending file.
    assert load_pattern(tmp_path / "noext.yaml").window == Window(64)


def test_extends_bundled_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("extends: videonsa\nname: mine\nwindow: {size: 128}\nselection: {count: 34}\n")
    p = load_pattern(path)
    base = load_pattern("videonsa")
    assert p == dataclasses.replace(
        base, name="mine", description="", window=Window(128),
        selection=dataclasses.replace(base.selection, count=34),
    )
    # Text with a non-file source resolves bundled names too.
    assert loads_pattern("extends: videonsa\nname: s\n") == dataclasses.replace(base, name="s", description="")


def test_extends_chain(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\ncompression: {block: 16, stride: 8}\nselection: {block: 16, count: 2}\nwindow: {size: 8}\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\nselection: {count: 3}\n")
    (tmp_path / "c.yaml").write_text("extends: b\nname: c\nwindow: {size: 16}\ncompression: {pooling: mlp}\n")
    c = load_pattern(tmp_path / "c.yaml")
    assert c.name == "c"
    assert c.compression == Compression(16, 8, pooling="mlp")
    assert c.selection == Selection(16, 3)
    assert c.window == Window(16)


@pytest.mark.parametrize("files", [
    {"a.yaml": "extends: a.yaml\nname: a\n"},
    {"a.yaml": "extends: b.yaml\nname: a\nwindow: {size: 2}\n", "b.yaml": "extends: a.yaml\nname: b\n"},
    {"a.yaml": "extends: b\nname: a\n", "b.yaml": "extends: c\n", "c.yaml": "extends: a\nwindow: {size: 2}\n"},
])
def test_extends_cycle_refused(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PatternError) as info:
        load_pattern(tmp_path / "a.yaml")
    error = info.value
    assert error.key_path == "extends"
    assert error.expected == "no cycle of extends"
    assert str(tmp_path / "a.yaml") in str(error.found)
    assert error.line is not None and error.source is not None
    assert "cycle" in str(error)


def test_extends_null_removes_a_branch(tmp_path: Path) -> None:
    (tmp_path / "child.yaml").write_text("extends: nsa\nname: nocmp\nwindow: null\n")
    p = load_pattern(tmp_path / "child.yaml")
    assert p.window is None and p.branches == ("compression", "selection")
    # null also removes a single field, which then takes its default.
    (tmp_path / "child2.yaml").write_text("extends: nsa\nname: x\nselection: {forced: null}\n")
    assert load_pattern(tmp_path / "child2.yaml").selection.forced == ("current",)
    # Removing compression while selection stays is refused, naming selection.
    (tmp_path / "bad.yaml").write_text("extends: nsa\nname: bad\ncompression: null\n")
    with pytest.raises(PatternError) as info:
        load_pattern(tmp_path / "bad.yaml")
    assert info.value.key_path == "selection"
    assert info.value.found == "no compression section"


def test_extends_unknown_target_hint(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("name: x\nextends: videonsa-w51\n")
    with pytest.raises(PatternError) as info:
        load_pattern(tmp_path / "x.yaml")
    error = info.value
    assert (error.key_path, error.found, error.line, error.column) == ("extends", "videonsa-w51", 2, 1)
    assert error.hint == "did you mean 'videonsa-w512'?"
    assert error.source == str(tmp_path / "x.yaml")


@settings(max_examples=60)
@given(patterns(), st.data())
def test_extends_property(tmp_path_factory: pytest.TempPathFactory, pattern: Pattern, data: st.DataObject) -> None:
    """A child that only names itself equals its parent renamed; a child that
    replaces a whole section equals ``dataclasses.replace`` of the parent
    (or both are refused with the same key path)."""
    folder = tmp_path_factory.getbasetemp() / "extends_property"
    folder.mkdir(exist_ok=True)
    (folder / "parent.yaml").write_text(dump_pattern(pattern))
    (folder / "child.yaml").write_text("extends: parent\nname: child\n")
    assert load_pattern(folder / "child.yaml") == dataclasses.replace(pattern, name="child", description="")

    other = data.draw(patterns())
    name = data.draw(st.sampled_from(("compression", "selection", "window", "gate", "hybrid", "budget")))
    section = getattr(other, name)
    if section is None:
        text, change = f"{name}: null\n", None
    else:
        # Every field written out, None ones as null, so nothing of the parent's section is left.
        fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        text, change = yaml.safe_dump({name: fields}, default_flow_style=None, sort_keys=False), section
    (folder / "child.yaml").write_text(f"extends: parent.yaml\nname: child\n{text}")
    try:
        expected = dataclasses.replace(pattern, name="child", description="", **{name: change})
    except PatternError as error:
        with pytest.raises(PatternError) as info:
            load_pattern(folder / "child.yaml")
        assert info.value.key_path == error.key_path
        assert info.value.expected == error.expected
    else:
        assert load_pattern(folder / "child.yaml") == expected


# -- per-layer overrides ---------------------------------------------------------------------
LAYERED = """\
name: layered
model: {num_layers: 8}
compression: {block: 16, stride: 8, pooling: mlp, mlp_hidden: 32}
selection: {block: 32, count: 4, forced: [first, current], granularity: query_block, query_block: 16}
window: {size: 64}
layers:
  - at: [0, 7]
    dense: true
  - at: [1]
    selection: {count: 2, granularity: token, query_block: null}
    remove: [window]
  - at: [2, 3]
    compression: {pooling: mean, mlp_hidden: null, stride: 16}
    window: {size: 8}
"""


def test_layer_overrides_for_layer() -> None:
    p = loads_pattern(LAYERED)
    assert [o.at for o in p.layers] == [(0, 7), (1,), (2, 3)]
    for layer in (0, 7):
        dense = p.for_layer(layer)
        assert dense.dense and dense.branches == () and dense.layers == () and dense.budget is None
    one = p.for_layer(1)
    assert one.selection == Selection(32, 2, forced=("first", "current"))
    assert one.window is None and one.compression == p.compression and not one.dense
    for layer in (2, 3):
        q = p.for_layer(layer)
        assert q.compression == Compression(16, 16)
        assert q.selection == p.selection and q.window == Window(8)
    for layer in (4, 5, 6, 100):
        assert p.for_layer(layer) == dataclasses.replace(p, layers=())
    # The override is partial in YAML but full in Python, and written back full.
    assert p.layers[1].selection == Selection(32, 2, forced=("first", "current"))
    assert loads_pattern(dump_pattern(p)) == p
    with pytest.raises(PatternError) as info:
        p.for_layer(-1)
    assert (info.value.key_path, info.value.found) == ("layer", -1)


@settings(max_examples=200)
@given(patterns())
def test_for_layer_property(pattern: Pattern) -> None:
    overridden: dict[int, LayerOverride] = {}
    for override in pattern.layers:
        for layer in override.at:
            overridden[layer] = override
    for layer in range(max(overridden, default=0) + 2):
        resolved = pattern.for_layer(layer)
        assert resolved.layers == ()
        assert (resolved.name, resolved.gate, resolved.hybrid, resolved.model) == (
            pattern.name, pattern.gate, pattern.hybrid, pattern.model)
        override = overridden.get(layer)
        if override is None:
            assert resolved == dataclasses.replace(pattern, layers=())
        elif override.dense:
            assert resolved.dense and resolved.branches == ()
        else:
            for name in BRANCH_ORDER:
                if name in override.remove:
                    assert getattr(resolved, name) is None
                elif getattr(override, name) is not None:
                    assert getattr(resolved, name) == getattr(override, name)
                else:
                    assert getattr(resolved, name) == getattr(pattern, name)


# -- immutability ------------------------------------------------------------------------------
@settings(max_examples=50)
@given(patterns())
def test_patterns_are_frozen(pattern: Pattern) -> None:
    objects = [pattern, pattern.gate, pattern.model, *pattern.layers]
    objects += [s for s in (pattern.compression, pattern.selection, pattern.window, pattern.hybrid, pattern.budget) if s]
    for obj in objects:
        for f in dataclasses.fields(obj):
            before = getattr(obj, f.name)
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(obj, f.name, before)
            with pytest.raises(dataclasses.FrozenInstanceError):
                delattr(obj, f.name)
            assert getattr(obj, f.name) is before
    # Containers are tuples, so nothing inside can be changed in place either.
    assert isinstance(pattern.layers, tuple)
    if pattern.selection is not None:
        assert isinstance(pattern.selection.forced, tuple)
    assert hash(pattern) == hash(dataclasses.replace(pattern))


def test_frozen_sections_and_list_arguments() -> None:
    forced = ["first", "current"]
    s = Selection(block=8, count=2, forced=forced)  # type: ignore[arg-type]
    forced.append("previous")
    assert s.forced == ("first", "current")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.count = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Compression(4, 2).block = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        LayerOverride(at=[1], dense=True).at = (2,)  # type: ignore[arg-type, misc]
    values = [1.0, 2.0]
    g = Gate(kind="constant", values=values)  # type: ignore[arg-type]
    values[0] = 5.0
    assert g.values == (1.0, 2.0)
