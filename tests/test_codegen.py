"""The code generator: the emitted module's text, in-process (fast); the
stand-alone import in a fresh process is covered by tests/test_cli.py."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

import nsaflex
from nsaflex import Compression, Gate, LayerOverride, Model, Pattern, PatternError, Selection, Window
from nsaflex.budget import analyse
from nsaflex.codegen import DEFAULT_LENGTHS, MAX_MODULE_NAME, emit_module, module_name, render_module, template
from nsaflex.loader import bundled_patterns
from nsaflex.plan import make_plan


def load_source(source: str) -> dict:
    namespace: dict = {"__name__": "generated_under_test"}
    exec(compile(source, "<generated>", "exec"), namespace)
    return namespace


def test_template_is_packaged_and_complete() -> None:
    tmpl = template()
    assert isinstance(tmpl, string.Template)
    names = {m.group("named") or m.group("braced") for m in tmpl.pattern.finditer(tmpl.template) if m.group("named") or m.group("braced")}
    assert {"pattern_yaml", "plan", "budget", "backend_literal", "layer_literal"} <= names
    source = render_module(nsaflex.load_pattern("window"), backend="reference")
    assert "${" not in source and "$" not in source


@pytest.mark.parametrize("name", sorted(bundled_patterns()))
def test_rendered_module_rebuilds_the_pattern(name: str) -> None:
    pattern = nsaflex.load_pattern(name)
    plan = make_plan(pattern, "reference", "cpu")
    ns = load_source(render_module(pattern, backend="reference", plan=plan, lengths=(4096, 65536)))
    assert ns["PATTERN"] == pattern
    assert ns["PATTERN_NAME"] == name and ns["BACKEND"] == "reference" and ns["LAYER"] is None
    assert ns["PLAN"] == plan.to_dict()
    analysis = analyse(pattern)
    assert ns["BUDGET_LENGTHS"] == (4096, 65536)
    for length in (4096, 65536):
        assert ns["BUDGET"][length] == analysis.evaluate(length).to_dict()
        assert ns["ATTENDED_FRACTION"][length] == analysis.evaluate(length).attended_fraction
    assert ns["KEYS_PER_QUERY"] == pattern.keys_per_query
    # attention is built lazily, on first use only.
    assert ns["compiled"].cache_info().currsize == 0
    assert callable(ns["attention"])


def test_awkward_text_survives_embedding() -> None:
    description = "quotes ''' \"\"\" and \\ backslashes \\n, tabs\t, unicode é — and a trailing '"
    pattern = Pattern(name="awkward-name.v2", description=description, window=Window(4), gate=Gate("constant", values=(1.0,)))
    source = render_module(pattern, backend="reference")
    ns = load_source(source)
    assert ns["PATTERN"] == pattern
    assert ns["PATTERN"].description == description
    assert module_name(pattern) == "awkward_name_v2"


def test_readable_yaml_block() -> None:
    source = render_module(nsaflex.load_pattern("videonsa"), backend="reference")
    assert "PATTERN_YAML = r'''\nname: videonsa\n" in source
    assert "all-vision input" in source


def test_module_names() -> None:
    def named(name: str) -> Pattern:
        return Pattern(name=name, window=Window(4))

    assert module_name(named("videonsa-w512")) == "videonsa_w512"
    assert module_name(named("3blocks")) == "nsa_3blocks"
    assert module_name(named("class")) == "nsa_class"
    assert module_name(named("---")) == "pattern"
    assert module_name(named("videonsa"), layer=3) == "videonsa_layer3"
    for name in ("videonsa-w512", "3blocks", "class", "ünï"):
        assert module_name(named(name)).isidentifier()


def test_layer_module(tmp_path: Path) -> None:
    pattern = Pattern(
        name="layered",
        compression=Compression(4, 4),
        selection=Selection(4, 2),
        window=Window(8),
        model=Model(num_layers=4),
        layers=(LayerOverride(at=(0,), dense=True),),
    )
    path = emit_module(pattern, tmp_path / "deep" / "dir", backend="reference", layer=0, lengths=(64,))
    assert path == tmp_path / "deep" / "dir" / "layered_layer0.py"
    ns = load_source(path.read_text())
    assert ns["LAYER"] == 0 and ns["PATTERN"] == pattern
    assert ns["PLAN"]["layer"] == 0
    assert ns["BUDGET"][64]["attended_fraction"] == 1.0
    assert ns["KEYS_PER_QUERY"] is None  # a dense layer attends L keys


def test_default_lengths() -> None:
    ns = load_source(render_module(nsaflex.load_pattern("window"), backend="reference"))
    assert ns["BUDGET_LENGTHS"] == DEFAULT_LENGTHS


def test_any_valid_pattern_embeds() -> None:
    """Random valid patterns (the shared strategy: odd names, descriptions,
    overrides, budgets) render to a module that rebuilds them exactly."""
    from hypothesis import given, settings

    from strategies import patterns

    @settings(max_examples=40)
    @given(pattern=patterns())
    def check(pattern: Pattern) -> None:
        layer = pattern.layers[0].at[0] if pattern.layers else None
        source = render_module(pattern, backend="reference", lengths=(1000,), layer=layer)
        ns = load_source(source)
        assert ns["PATTERN"] == pattern
        assert ns["LAYER"] == layer
        assert module_name(pattern, layer).isidentifier()
        assert ns["BUDGET"][1000] == analyse(pattern, layer=layer).evaluate(1000).to_dict()

    check()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a" * 300, "a name giving a module name of at most 100 characters (for --emit)"),
        ("nsaflex", "a name whose module nsaflex.py does not shadow the module 'nsaflex' nsaflex needs (rename the pattern)"),
        ("torch", "a name whose module torch.py does not shadow the module 'torch' nsaflex needs (rename the pattern)"),
        ("json", "a name whose module json.py does not shadow the module 'json' of the standard library (rename the pattern)"),
    ],
)
def test_emit_refuses_unusable_module_names(tmp_path: Path, name: str, expected: str) -> None:
    """A name whose module file is too long to create, or would be imported in
    place of a module the generated code needs, is refused naming the pattern's
    name, and nothing is written."""
    pattern = Pattern(name=name, window=Window(4), gate=Gate("constant", values=(1.0,)))
    with pytest.raises(PatternError) as info:
        emit_module(pattern, tmp_path / "out", backend="reference", lengths=(64,))
    assert (info.value.key_path, info.value.expected) == ("name", expected)
    assert not (tmp_path / "out").exists()


def test_emit_module_name_limit_counts_the_layer_suffix(tmp_path: Path) -> None:
    pattern = Pattern(name="a" * (MAX_MODULE_NAME - 2), window=Window(4), gate=Gate("constant", values=(1.0,)),
                      layers=(LayerOverride(at=(7,), dense=True),))
    assert emit_module(pattern, tmp_path, backend="reference", lengths=(64,)).name == "a" * (MAX_MODULE_NAME - 2) + ".py"
    with pytest.raises(PatternError):
        emit_module(pattern, tmp_path, backend="reference", layer=7, lengths=(64,))
