"""Bad patterns are refused with a located, named PatternError and nothing else.

Random mutations of valid YAML (wrong types, unknown and misspelt keys, bad
numbers, broken syntax, truncation, byte flips) only ever raise
:class:`nsaflex.PatternError` with a source, a line and column and a key path;
each semantic check names the key path, the expected and the found value, the
same through YAML and through the Python API.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from nsaflex import (
    Budget,
    Compression,
    Gate,
    LayerOverride,
    Pattern,
    PatternError,
    Selection,
    Window,
    dump_pattern,
    loads_pattern,
    pattern_from_dict,
)
from nsaflex.loader import MAX_EXTENDS_CHAIN, MAX_PATTERN_SIZE, MAX_YAML_NODES, bundled_patterns, load_pattern
from nsaflex.spec import BRANCH_ORDER, MAX_INT, MAX_LAYER_OVERRIDES, Hybrid, Model

from strategies import patterns

SOURCE = "mutant.yaml"
TOP_KEYS = ("name", "description", "extends", "layers", "dense", "compression", "selection", "window",
            "gate", "hybrid", "model", "budget")
SECTION_KEYS = {
    name: tuple(f.name for f in dataclasses.fields(cls))
    for name, cls in (("compression", Compression), ("selection", Selection), ("window", Window), ("gate", Gate),
                      ("budget", Budget))
}
SECTION_KEYS["hybrid"] = ("vision_keys",)
SECTION_KEYS["model"] = ("query_heads", "kv_heads", "head_dim", "hidden_size", "num_layers")
OVERRIDE_KEYS = ("at", "dense", "remove", *BRANCH_ORDER)
BUNDLED_TEXTS = tuple(path.read_text() for path in bundled_patterns().values())


# -- helpers -------------------------------------------------------------------------------
def last_key(key_path: str) -> str | None:
    """The last mapping key of a key path (None for the document or a list item)."""
    if not key_path or key_path.endswith("]"):
        return None
    return re.split(r"[.\]]", key_path)[-1]


def check_error(error: BaseException, text: str, source: str = SOURCE) -> PatternError:
    """The promises every refused pattern keeps."""
    assert type(error) is PatternError, f"{type(error).__name__}: {error}"
    assert error.source == source
    assert error.line is not None and error.column is not None, str(error)
    assert 1 <= error.line <= text.count("\n") + 2 and error.column >= 1
    assert isinstance(error.key_path, str) and isinstance(error.expected, str) and error.expected
    message = str(error)
    key = error.key_path or "<document>"
    assert message.startswith(f"{source}:{error.line}:{error.column}: {key}: expected {error.expected}, found ")
    root = re.split(r"[.\[]", error.key_path)[0]
    # A plain YAML scalar may run over several lines, each line break read as one space.
    assert root == "" or root in TOP_KEYS or root in text or " ".join(root.split()) in " ".join(text.split()), (root, message)
    if error.hint is not None:
        assert error.hint.startswith("did you mean '") and message.endswith(f" ({error.hint})")
    return error


def points_at_key(error: PatternError, text: str) -> bool:
    """Whether the error's line and column point at the last key of its key path."""
    key = last_key(error.key_path)
    assert key is not None
    line = text.splitlines()[error.line - 1]
    return line[error.column - 1:].startswith(key)


def load_mutant(text: str) -> PatternError | Pattern:
    """Load a mutant: a valid pattern (which then round-trips) or a PatternError."""
    try:
        pattern = loads_pattern(text, SOURCE)
    except Exception as error:  # noqa: BLE001 - the point is that only PatternError comes out
        return check_error(error, text)
    assert loads_pattern(dump_pattern(pattern), SOURCE) == pattern
    return pattern


def refuse(text: str) -> PatternError:
    with pytest.raises(PatternError) as info:
        loads_pattern(text, SOURCE)
    return check_error(info.value, text)


# -- text mutations ------------------------------------------------------------------------
def block_style(pattern: Pattern) -> str:
    return yaml.safe_dump(pattern.to_dict(), sort_keys=False, default_flow_style=False)


def flow_style(pattern: Pattern) -> str:
    return yaml.safe_dump(pattern.to_dict(), sort_keys=False, default_flow_style=True)


valid_texts = st.one_of(
    patterns().map(dump_pattern),
    patterns().map(block_style),
    patterns().map(flow_style),
    st.sampled_from(BUNDLED_TEXTS),
)

BAD_VALUES = ("0", "-1", "1.5", '"64"', "true", "null", "[]", "{}", "abc", "1e400", ".nan", "-.inf", "9" * 40,
              "2020-13-45", "2020-01-01", "!!int x", "!!bool maybe", "!foo 1", "[1, 2", "*nowhere", "&a", "'open",
              "~", "0x10", "0o7", "1_000", "1:30", "[[1]]", "{a: 1}", "-", "|", ">", "@", "`", "%", "? x",
              '"\\U00110000"', '"\\x"', '"\\uD800"', '"\\q"', "!!binary 12", "!!python/name:os.system ''")
KEY = re.compile(r"(?<![\w-])([A-Za-z_]\w*):(?=[ \n])")
VALUE = re.compile(r"(?<![\w-])([A-Za-z_]\w*): +([^,{}\[\]\n#]+)")


def _replace(text: str, start: int, end: int, new: str) -> str:
    return text[:start] + new + text[end:]


def _misspell(draw: Any, word: str) -> str:
    how = draw(st.sampled_from(("drop", "swap", "double", "replace")))
    i = draw(st.integers(0, len(word) - 1))
    if how == "drop" and len(word) > 1:
        return word[:i] + word[i + 1:]
    if how == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if how == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_")) + word[i + 1:]


@st.composite
def mutants(draw: Any) -> tuple[str, str]:
    """(mutation kind, mutated YAML text)."""
    text = draw(valid_texts)
    kind = draw(st.sampled_from((
        "bad_value", "unknown_key", "misspelt_key", "unclosed", "indentation", "tab", "duplicate_line",
        "truncate", "byte_flip", "char_flip", "insert_text", "delete_line", "swap_lines",
    )))
    lines = text.splitlines(keepends=True)
    offset = draw(st.integers(0, len(text)))
    if kind == "bad_value":
        matches = list(VALUE.finditer(text))
        if matches:
            m = draw(st.sampled_from(matches))
            text = _replace(text, m.start(2), m.end(2), draw(st.sampled_from(BAD_VALUES)))
    elif kind in ("unknown_key", "misspelt_key"):
        matches = list(KEY.finditer(text))
        if matches:
            m = draw(st.sampled_from(matches))
            new = (draw(st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)) if kind == "unknown_key"
                   else _misspell(draw, m.group(1)))
            text = _replace(text, m.start(1), m.end(1), new)
    elif kind == "unclosed":
        closers = [i for i, c in enumerate(text) if c in "]}"]
        if closers and draw(st.booleans()):
            i = draw(st.sampled_from(closers))
            text = _replace(text, i, i + 1, "")
        else:
            text = _replace(text, offset, offset, draw(st.sampled_from(("[", "{", "[a, ", "{a: ", '"', "'"))))
    elif kind == "indentation":
        i = draw(st.integers(0, len(lines) - 1))
        if draw(st.booleans()):
            lines[i] = " " * draw(st.integers(1, 3)) + lines[i]
        else:
            lines[i] = lines[i][len(lines[i]) - len(lines[i].lstrip(" ")) or 0:]
            lines[i] = lines[i] if lines[i] != "" else "\n"
        text = "".join(lines)
    elif kind == "tab":
        indented = [i for i, line in enumerate(lines) if line.startswith(" ")]
        if indented and draw(st.booleans()):
            i = draw(st.sampled_from(indented))
            lines[i] = "\t" + lines[i].lstrip(" ")
            text = "".join(lines)
        else:
            text = _replace(text, offset, offset, "\t")
    elif kind == "duplicate_line":
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, lines[i] if lines[i].endswith("\n") else lines[i] + "\n")
        text = "".join(lines)
    elif kind == "truncate":
        text = text[:offset]
    elif kind == "byte_flip":
        data = bytearray(text.encode("utf-8"))
        for _ in range(draw(st.integers(1, 3))):
            if data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
        text = data.decode("utf-8", errors=draw(st.sampled_from(("replace", "surrogateescape", "ignore"))))
    elif kind == "char_flip":
        for _ in range(draw(st.integers(1, 3))):
            if text:
                i = draw(st.integers(0, len(text) - 1))
                text = _replace(text, i, i + 1, draw(st.characters(codec="utf-8")))
    elif kind == "insert_text":
        text = _replace(text, offset, offset, draw(st.text(max_size=6)))
    elif kind == "delete_line":
        del lines[draw(st.integers(0, len(lines) - 1))]
        text = "".join(lines)
    elif kind == "swap_lines" and len(lines) > 1:
        i = draw(st.integers(0, len(lines) - 2))
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        text = "".join(lines)
    return kind, text


# A key folded from two lines ("description; 0" then "0" reads "description; 0 0"): CI, 2026-12-01.
FOLDED_KEY = ("byte_flip", '{name: "\\U00010000", compression: {block: 128, stride: 128, pooling: mean, visibility: causal},\n'
              "  selection: {block: 128, count: 1, scoring: group, forced: [], granularity: query_block,\n"
              "    query_block: 1}, window: {size: 256}, gate: {kind: constant, temperature: 1.0,\n"
              "    bias: 0.0, values: [0.0, 0.0, 0]}, hybrid: {vision_keys: all}, description; 0\n    0}\n")


@settings(max_examples=800)
@given(mutants())
@example(FOLDED_KEY)
def test_text_mutants_only_raise_located_pattern_errors(mutant: tuple[str, str]) -> None:
    kind, text = mutant
    result = load_mutant(text)
    if kind == "unknown_key" and isinstance(result, PatternError) and result.expected.startswith("a key of "):
        assert points_at_key(result, text)


def test_mutants_cover_every_outcome() -> None:
    """The mutation strategy reaches syntax errors, unknown keys, bad values and
    valid mutants (a check of the test itself)."""
    outcomes: set[str] = set()

    @settings(max_examples=250, database=None, derandomize=True)
    @given(mutants())
    def collect(mutant: tuple[str, str]) -> None:
        result = load_mutant(mutant[1])
        if isinstance(result, Pattern):
            outcomes.add("valid")
        elif result.expected.startswith("valid YAML"):
            outcomes.add("syntax")
        elif result.expected.startswith("a key of"):
            outcomes.add("unknown key")
        elif result.expected.startswith("an integer"):
            outcomes.add("bad integer")
        elif result.expected == "each key once":
            outcomes.add("duplicate")
        else:
            outcomes.add("other")

    collect()
    assert outcomes == {"valid", "syntax", "unknown key", "bad integer", "duplicate", "other"}


# -- structural mutations (dict level) --------------------------------------------------------
def leaves(data: Any, path: str = "") -> list[tuple[str, Any]]:
    """(key path, value) of every leaf of plain YAML data (lists are leaves)."""
    if isinstance(data, dict):
        out = []
        for key, value in data.items():
            out += leaves(value, f"{path}.{key}" if path else key)
        return out
    return [(path, data)]


def set_path(data: Any, path: str, value: Any) -> None:
    parts = re.findall(r"[^.\[\]]+", path)
    for part in parts[:-1]:
        data = data[int(part)] if isinstance(data, list) else data[part]
    data[parts[-1]] = value


INT_FIELDS = {"block", "stride", "count", "size", "query_heads", "kv_heads", "head_dim", "hidden_size",
              "num_layers", "max_keys_per_query", "mlp_hidden", "query_block", "at_length"}
CHOICE_FIELDS = {"pooling", "visibility", "scoring", "granularity", "kind", "vision_keys"}
REAL_FIELDS = {"temperature", "bias", "max_attended_fraction"}
junk = st.one_of(
    st.booleans(), st.text(max_size=6), st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 2), max_size=1),
    st.sampled_from((float("nan"), float("inf"), -float("inf"))),
)
bad_ints = st.one_of(junk, st.sampled_from((0, -1, -64, 1.5, 64.0, "64", True)))
REQUIRED_INT_FIELDS = {"block", "stride", "count", "size"}  # None is a bad value only for these


@settings(max_examples=250)
@given(patterns(), st.data())
def test_wrong_type_at_a_field_is_named_and_located(pattern: Pattern, data: st.DataObject) -> None:
    """A wrong-typed value at a field is refused with exactly that key path, at
    that key in the text."""
    tree = pattern.to_dict()
    fields = [(p, v) for p, v in leaves(tree) if last_key(p) in INT_FIELDS | CHOICE_FIELDS | REAL_FIELDS | {"name"}
              and v is not None]
    assume(fields)
    path, _ = data.draw(st.sampled_from(fields))
    field = last_key(path)
    if field in INT_FIELDS:
        bad = data.draw(st.one_of(bad_ints, st.none()) if field in REQUIRED_INT_FIELDS else bad_ints)
    elif field == "name":
        bad = data.draw(st.one_of(st.just(""), st.integers(), st.booleans(), st.lists(st.text(), max_size=1)))
    elif field in CHOICE_FIELDS:
        bad = data.draw(st.one_of(junk, st.integers(), st.sampled_from(("MEAN", "Causal", "tokens", " group"))))
    else:
        bad = data.draw(junk)
    set_path(tree, path, bad)
    text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=data.draw(st.sampled_from((None, False))))
    error = refuse(text)
    assert error.key_path == path, (error, path, bad)
    assert points_at_key(error, text)
    # The same through pattern_from_dict, without a position.
    with pytest.raises(PatternError) as info:
        pattern_from_dict(yaml.safe_load(text))
    assert (info.value.key_path, info.value.line, info.value.source) == (path, None, None)
    if field in INT_FIELDS:
        assert error.expected == "an integer >= 1"
    elif field in CHOICE_FIELDS:
        assert error.expected.startswith("one of '")
    elif field in REAL_FIELDS:
        assert "number" in error.expected


@settings(max_examples=200)
@given(patterns(), st.data())
def test_random_junk_anywhere_only_raises_pattern_errors(pattern: Pattern, data: st.DataObject) -> None:
    tree = pattern.to_dict()
    path, _ = data.draw(st.sampled_from(leaves(tree)))
    set_path(tree, path, data.draw(st.one_of(junk, st.none(), st.integers(-3, 300), st.floats())))
    text = yaml.safe_dump(tree, sort_keys=False)
    load_mutant(text)


# -- misspelt keys: did-you-mean ------------------------------------------------------------------
def key_sites(tree: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(parent path, key, keys allowed there) for every key of a pattern's dict form."""
    out = [("", key, TOP_KEYS) for key in tree]
    for name, section in tree.items():
        if isinstance(section, dict):
            out += [(name, key, SECTION_KEYS[name]) for key in section]
    for i, override in enumerate(tree.get("layers", [])):
        out += [(f"layers[{i}]", key, OVERRIDE_KEYS) for key in override]
        for name in BRANCH_ORDER:
            out += [(f"layers[{i}].{name}", key, SECTION_KEYS[name]) for key in override.get(name, {})]
    return out


@settings(max_examples=250)
@given(patterns(), st.data())
def test_misspelt_keys_get_did_you_mean(pattern: Pattern, data: st.DataObject) -> None:
    tree = pattern.to_dict()
    sites = [s for s in key_sites(tree) if len(s[1]) >= 4]
    parent, key, allowed = data.draw(st.sampled_from(sites))
    wrong = _misspell(data.draw, key)
    assume(wrong not in allowed and wrong != key)
    # Rename the key in place (its parent found by the path) and dump again.
    node = tree
    for part in re.findall(r"[^.\[\]]+", parent):
        node = node[int(part)] if isinstance(node, list) else node[part]
    renamed = {(wrong if k == key else k): v for k, v in node.items()}
    node.clear()
    node.update(renamed)
    text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=None)
    error = refuse(text)
    assert error.key_path == (f"{parent}.{wrong}" if parent else wrong)
    assert error.found == wrong
    assert error.expected.startswith("a key of ") and all(k in error.expected for k in allowed)
    assert points_at_key(error, text)
    best = difflib.get_close_matches(wrong, allowed, n=1, cutoff=0.6)
    assert best, (wrong, allowed)  # one edit of a key of >= 4 letters is always close
    assert error.hint == f"did you mean {best[0]!r}?"
    ratio = difflib.SequenceMatcher(None, wrong, key).ratio()
    if all(difflib.SequenceMatcher(None, wrong, k).ratio() < ratio for k in allowed if k != key):
        assert best[0] == key


@pytest.mark.parametrize(
    ("text", "key_path", "suggestion"),
    [
        ("extnds: videonsa\nname: x\n", "extnds", "extends"),
        ("name: x\nwindw: {size: 4}\n", "windw", "window"),
        ("name: x\nwindow: {size: 4}\nbudgte: {}\n", "budgte", "budget"),
        ("name: x\ncompresion: {block: 4, stride: 4}\n", "compresion", "compression"),
        ("name: x\ncompression: {block: 4, strid: 4}\n", "compression.strid", "stride"),
        ("name: x\ncompression: {block: 4, stride: 4}\nselection: {block: 4, cuont: 1}\n", "selection.cuont", "count"),
        ("name: x\nwindow: {size: 4}\ngate: {kind: mlp, temprature: 2}\n", "gate.temprature", "temperature"),
        ("name: x\nwindow: {size: 4}\nhybrid: {vision_key: all}\n", "hybrid.vision_key", "vision_keys"),
        ("name: x\nwindow: {size: 4}\nmodel: {num_layer: 4}\n", "model.num_layer", "num_layers"),
        ("name: x\nwindow: {size: 4}\nlayers:\n  - at: [1]\n    dens: true\n", "layers[0].dens", "dense"),
        ("name: x\nwindow: {size: 4}\nlayers:\n  - at: [1]\n    window: {sise: 2}\n", "layers[0].window.sise", "size"),
    ],
)
def test_did_you_mean_examples(text: str, key_path: str, suggestion: str) -> None:
    error = refuse(text)
    assert error.key_path == key_path
    assert error.hint == f"did you mean {suggestion!r}?"
    assert points_at_key(error, text)
    assert f"found {key_path.split('.')[-1]} (did you mean {suggestion!r}?)" in str(error)


# -- YAML syntax ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "line", "column", "expected", "found"),
    [
        ("name: x\nwindow: {size: [1, 2}\n", 2, 21, "valid YAML",
         "expected ',' or ']', but got '}' (while parsing a flow sequence)"),
        ("name: x\nwindow: {size: 4\n", 3, 1, "valid YAML", "expected ',' or '}'"),
        ("name: x\nwindow:\n\tsize: 3\n", 3, 1, "valid YAML", "character '\\t' that cannot start any token"),
        ("name: x\nwindow:\n  size: 3\n   foo: 2\n", 4, 7, "valid YAML", "mapping values are not allowed here"),
        ("name: x\nwindow: {size: 3}\nwindow: {size: 4}\n", 3, 1, "each key once", "a repeated key"),
        ("name: x\nwindow: {size: 3, size: 4}\n", 2, 19, "each key once", "a repeated key"),
        ("", 1, 1, "a mapping of pattern sections", "an empty document"),
        ("# only a comment\n", 1, 1, "a mapping of pattern sections", "an empty document"),
        ("- name: x\n", 1, 1, "a mapping of pattern sections", "list"),
        ("just text", 1, 1, "a mapping of pattern sections", "str"),
        ("name: x\n1: 2\n", 2, 1, "string keys", "1"),
        ("name: x\nwindow: &a {size: *a}\n", 2, 9, "no recursive aliases", "an alias to an enclosing node"),
        ("name: x\nwindow: {size: 2020-13-45}\n", 2, 16, "a valid YAML scalar (tag:yaml.org,2002:timestamp)",
         "month must be in 1..12"),
        ("name: x\nwindow: {size: !foo 4}\n", 2, 16, "a valid YAML scalar (!foo)",
         "could not determine a constructor for the tag '!foo'"),
        ("name: x\nwindow: {size: !!int four}\n", 2, 16, "a valid YAML scalar (tag:yaml.org,2002:int)",
         "invalid literal for int() with base 10: 'four'"),
        ("name: x\x00\n", 1, 8, "valid YAML (special characters are not allowed)", "character U+0000"),
        ('name: "\\U00110000"\nwindow: {size: 4}\n', 1, 10, "valid YAML",
         "ValueError: chr() arg not in range(0x110000)"),
        ("name: x\nwindow: {size: !!python/name:os.system ''}\n", 2, 16,
         "a valid YAML scalar (tag:yaml.org,2002:python/name:os.system)", "could not determine a constructor"),
        ("name: x\nwindow: !!set {size: 4}\n", 2, 9, "a plain YAML mapping (no tag)", "the tag tag:yaml.org,2002:set"),
        ("name: x\nwindow: {size: !!python/object/apply:os.system [echo]}\n", 2, 16, "a plain YAML list (no tag)",
         "the tag tag:yaml.org,2002:python/object/apply:os.system"),
        ("name: x\nwindow: {size: 4}\n---\nname: y\n", 3, 1, "valid YAML",
         "another document (expected a single document in the stream)"),
    ],
)
def test_yaml_syntax_errors(text: str, line: int, column: int, expected: str, found: str) -> None:
    error = refuse(text)
    assert (error.line, error.column, error.expected) == (line, column, expected)
    assert error.found == found or (isinstance(error.found, str) and error.found.startswith(found))


def test_alias_bomb_isrefuse() -> None:
    rows = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    error = refuse("name: x\n" + "\n".join(rows) + "\nwindow: {size: 2}\n")
    assert error.expected == f"at most {MAX_YAML_NODES} YAML nodes (aliases expanded, extends included)"


@pytest.mark.parametrize("opener", ["[", "{a: ", "- ", "compact"])
def test_deep_nesting_is_refused(opener: str) -> None:
    """Nesting deeper than Python's recursion allows is refused (not a
    RecursionError), at the line where it gets too deep."""
    if opener == "- ":
        # Indented block nesting grows as depth squared: 450 levels stay under MAX_PATTERN_SIZE.
        text = "name: x\nwindow:\n" + "".join("  " * i + "-\n" for i in range(450))
    elif opener == "compact":
        text = "name: x\nwindow:\n" + "- " * 3000 + "1\n"
    else:
        text = "name: x\nwindow: " + opener * 3000 + "\n"
    error = refuse(text)
    assert error.expected.startswith("YAML nested at most ")
    assert error.line >= 2


def test_deep_nesting_is_refused_whatever_the_recursion_limit() -> None:
    """The nesting limit is the loader's own, not the interpreter's stack: with
    room for any depth, 101 nested collections are still refused, at the 101st."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        error = refuse("name: x\nwindow: " + "[" * 101 + "]" * 101 + "\n")
    finally:
        sys.setrecursionlimit(limit)
    assert error.expected.startswith("YAML nested at most ") and (error.line, error.column) == (2, 108)


def test_huge_integer_where_a_float_goes() -> None:
    error = refuse("name: x\nwindow: {size: 4}\ngate: {temperature: " + "9" * 400 + "}\n")
    assert (error.key_path, error.expected, error.line) == ("gate.temperature", "a finite number", 3)


def test_override_before_a_broken_base_section() -> None:
    """Layer overrides merge into the base section; a broken base section is
    reported as such, wherever the layers key stands."""
    text = "name: x\nlayers:\n  - at: [0]\n    compression: {block: 4}\ncompression: [1, 2]\nwindow: {size: 2}\n"
    error = refuse(text)
    assert (error.key_path, error.line, error.column) == ("compression", 5, 1)
    assert error.expected == "a mapping ('compression')"


# -- semantic checks: YAML and Python API agree ------------------------------------------------------
BASE = "name: x\n"


def _case(yaml_text: str, build: Any, key_path: str, expected: str, found: object, line: int) -> Any:
    return pytest.param(yaml_text, build, key_path, expected, found, line, id=key_path or "empty")


SEMANTIC_CASES = [
    _case(BASE + "compression:\n  block: 64\n  stride: 48\n",
          lambda: Compression(block=64, stride=48),
          "compression.stride", "a divisor of compression.block = 64", 48, 4),
    _case(BASE + "compression: {block: 64, stride: 16}\nselection:\n  block: 40\n  count: 4\n",
          lambda: Pattern(name="x", compression=Compression(64, 16), selection=Selection(40, 4)),
          "selection.block", "a multiple of compression.stride = 16 (Eq. 9 maps scores in steps of the stride)",
          40, 4),
    _case(BASE + "compression: {block: 64, stride: 64}\nselection:\n  block: 64\n  count: 2\n"
          "  forced: [first, previous, current]\n",
          lambda: Selection(block=64, count=2, forced=("first", "previous", "current")),
          "selection.count", "at least the number of forced blocks (3: first, previous, current)", 2, 5),
    _case(BASE + "compression: {block: 64, stride: 64}\nselection: {block: 64, count: 32}\nwindow: {size: 256}\n"
          "budget:\n  max_keys_per_query: 2303\n",
          lambda: Pattern(name="x", compression=Compression(64, 64), selection=Selection(64, 32), window=Window(256),
                          budget=Budget(max_keys_per_query=2303)),
          "budget.max_keys_per_query", "at least K_attn = l'*n + w = 2304 of this pattern", 2303, 6),
    _case(BASE + "compression: {block: 64, stride: 64}\nselection:\n  block: 64\n  count: 4\n"
          "  granularity: query_block\n  query_block: 48\n",
          lambda: Selection(block=64, count=4, granularity="query_block", query_block=48),
          "selection.query_block", "a divisor of selection.block = 64 (a query tile must lie in one block)", 48, 7),
    _case(BASE + "compression: {block: 64, stride: 64}\nwindow: {size: 8}\ngate:\n  kind: constant\n"
          "  values: [1.0, 0.5, 0.25]\n",
          lambda: Pattern(name="x", compression=Compression(64, 64), window=Window(8),
                          gate=Gate(kind="constant", values=(1.0, 0.5, 0.25))),
          "gate.values", "2 values, one per branch (compression, window)", [1.0, 0.5, 0.25], 6),
    _case(BASE + "window: {size: 8}\nselection: {block: 64, count: 4}\n",
          lambda: Pattern(name="x", selection=Selection(64, 4), window=Window(8)),
          "selection", "a compression section beside selection (selection is scored from it)",
          "no compression section", 3),
    _case(BASE + "window: {size: 8}\nlayers:\n  - at: [1, 3]\n    dense: true\n  - at: [2, 3]\n"
          "    window: {size: 4}\n",
          lambda: Pattern(name="x", window=Window(8), layers=(LayerOverride(at=(1, 3), dense=True),
                                                             LayerOverride(at=(2, 3), window=Window(4)))),
          "layers[1].at", "each layer in one override only (layer 3 is also in layers[0])", [2, 3], 6),
    _case(BASE + "compression: {block: 4, stride: 4}\nselection: {block: 4, count: 1}\nlayers:\n  - at: [0]\n"
          "    remove: [compression]\n",
          lambda: Pattern(name="x", compression=Compression(4, 4), selection=Selection(4, 1),
                          layers=(LayerOverride(at=(0,), remove=("compression",)),)),
          "layers[0].selection", "a compression section beside selection (selection is scored from it)",
          "no compression section", 5),
    _case(BASE, lambda: Pattern(name="x"),
          "", "at least one of compression, selection, window (or dense: true)", "none", 1),
    _case(BASE + "model: {num_layers: 4}\nwindow: {size: 8}\nlayers:\n  - at: [4]\n    dense: true\n",
          lambda: Pattern(name="x", model=__import__("nsaflex").Model(num_layers=4), window=Window(8),
                          layers=(LayerOverride(at=(4,), dense=True),)),
          "layers[0].at", "layer indices below model.num_layers = 4", 4, 5),
]


@pytest.mark.parametrize(("text", "build", "key_path", "expected", "found", "line"), SEMANTIC_CASES)
def test_semantic_checks(text: str, build: Any, key_path: str, expected: str, found: object, line: int) -> None:
    error = refuse(text)
    assert (error.key_path, error.expected, error.found, error.line) == (key_path, expected, found, line)
    found_text = found if isinstance(found, str) else repr(found)
    assert f"{key_path or '<document>'}: expected {expected}, found {found_text}" in str(error)
    if key_path and not key_path.endswith("]") and key_path != "layers[0].selection":
        assert points_at_key(error, text)  # (layers[0].selection points at its override)
    with pytest.raises(PatternError) as info:
        build()
    api = info.value
    assert (api.key_path, api.expected, api.found) == (key_path, expected, found)
    assert (api.source, api.line) == (None, None)
    assert str(api).startswith(f"<pattern>: {key_path or '<document>'}: expected {expected}")


def test_empty_pattern_variants() -> None:
    for text in ("{}\n", "name: x\ndescription: nothing here\n", "name: x\nhybrid: {vision_keys: all}\n"):
        error = refuse(text)
        assert (error.key_path, error.found) == ("", "none")
        assert "at least one of compression, selection, window" in error.expected
    # An override that changes nothing is refused too.
    error = refuse("name: x\nwindow: {size: 2}\nlayers:\n  - at: [0]\n")
    assert (error.key_path, error.found) == ("layers[0]", "an override that changes nothing")


# -- semantic checks as properties --------------------------------------------------------------------
def _yaml_and_api(text: str, build: Any) -> tuple[PatternError, PatternError]:
    error = refuse(text)
    with pytest.raises(PatternError) as info:
        build()
    assert info.value.key_path == error.key_path
    assert info.value.expected == error.expected and info.value.found == error.found
    return error, info.value


@settings(max_examples=100)
@given(st.integers(1, 300), st.integers(1, 300))
def test_stride_must_divide_block(block: int, stride: int) -> None:
    assume(block % stride)
    error, _ = _yaml_and_api(f"name: x\ncompression: {{block: {block}, stride: {stride}}}\n",
                             lambda: Compression(block=block, stride=stride))
    assert (error.key_path, error.found) == ("compression.stride", stride)
    assert error.expected == f"a divisor of compression.block = {block}"
    assert f"compression.stride: expected a divisor of compression.block = {block}, found {stride}" in str(error)


@settings(max_examples=100)
@given(st.integers(1, 64), st.integers(1, 8), st.integers(1, 512))
def test_selection_block_must_be_a_multiple_of_the_stride(stride: int, k: int, block: int) -> None:
    assume(block % stride)
    error, _ = _yaml_and_api(
        f"name: x\ncompression: {{block: {stride * k}, stride: {stride}}}\nselection: {{block: {block}, count: 1}}\n",
        lambda: Pattern(name="x", compression=Compression(stride * k, stride), selection=Selection(block, 1)),
    )
    assert (error.key_path, error.found, error.line) == ("selection.block", block, 3)
    assert error.expected.startswith(f"a multiple of compression.stride = {stride} ")


@settings(max_examples=60)
@given(st.lists(st.sampled_from(("first", "previous", "current")), unique=True, min_size=2), st.data())
def test_count_must_cover_the_forced_blocks(forced: list[str], data: st.DataObject) -> None:
    count = data.draw(st.integers(1, len(forced) - 1))
    error, _ = _yaml_and_api(
        f"name: x\ncompression: {{block: 8, stride: 8}}\nselection: {{block: 8, count: {count}, forced: [{', '.join(forced)}]}}\n",
        lambda: Selection(block=8, count=count, forced=tuple(forced)),
    )
    assert (error.key_path, error.found) == ("selection.count", count)
    assert error.expected == f"at least the number of forced blocks ({len(forced)}: {', '.join(forced)})"


@settings(max_examples=100)
@given(st.integers(1, 256), st.integers(1, 256))
def test_query_block_must_divide_the_selection_block(block: int, tile: int) -> None:
    assume(block % tile)
    error, _ = _yaml_and_api(
        f"name: x\ncompression: {{block: 1, stride: 1}}\n"
        f"selection: {{block: {block}, count: 1, granularity: query_block, query_block: {tile}}}\n",
        lambda: Selection(block=block, count=1, granularity="query_block", query_block=tile),
    )
    assert (error.key_path, error.found) == ("selection.query_block", tile)
    assert error.expected.startswith(f"a divisor of selection.block = {block} ")


@settings(max_examples=100)
@given(patterns(allow_budget=False), st.data())
def test_budget_below_k_attn(pattern: Pattern, data: st.DataObject) -> None:
    keys = pattern.keys_per_query
    assume(keys > 1)
    limit = data.draw(st.integers(1, keys - 1))
    tree = pattern.to_dict()
    tree["budget"] = {"max_keys_per_query": limit}
    error, _ = _yaml_and_api(yaml.safe_dump(tree, sort_keys=False),
                             lambda: dataclasses.replace(pattern, budget=Budget(max_keys_per_query=limit)))
    assert (error.key_path, error.found) == ("budget.max_keys_per_query", limit)
    assert error.expected == f"at least K_attn = l'*n + w = {keys} of this pattern"


@settings(max_examples=100)
@given(patterns(allow_layers=False, allow_budget=False), st.data())
def test_constant_gate_needs_one_value_per_branch(pattern: Pattern, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.floats(-2, 2), min_size=1, max_size=5).filter(
        lambda v: len(v) != len(pattern.branches)))
    tree = pattern.to_dict()
    tree["gate"] = {"kind": "constant", "values": values}
    error, _ = _yaml_and_api(yaml.safe_dump(tree, sort_keys=False),
                             lambda: dataclasses.replace(pattern, gate=Gate(kind="constant", values=tuple(values))))
    assert (error.key_path, error.found) == ("gate.values", values)
    assert error.expected == f"{len(pattern.branches)} values, one per branch ({', '.join(pattern.branches)})"


@settings(max_examples=100)
@given(patterns(allow_layers=False, allow_budget=False, gate_kinds=("mlp", "linear")), st.data())
def test_overlapping_layer_overrides(pattern: Pattern, data: st.DataObject) -> None:
    first = data.draw(st.lists(st.integers(0, 20), unique=True, min_size=1, max_size=4))
    shared = data.draw(st.sampled_from(first))
    second = data.draw(st.lists(st.integers(21, 40), unique=True, max_size=3)) + [shared]
    layers = (LayerOverride(at=tuple(first), dense=True), LayerOverride(at=tuple(second), dense=True))
    tree = dataclasses.replace(pattern, model=dataclasses.replace(pattern.model, num_layers=None)).to_dict()
    tree["layers"] = [{"at": first, "dense": True}, {"at": second, "dense": True}]
    error, _ = _yaml_and_api(
        yaml.safe_dump(tree, sort_keys=False),
        lambda: dataclasses.replace(pattern, model=dataclasses.replace(pattern.model, num_layers=None), layers=layers),
    )
    assert (error.key_path, error.found) == ("layers[1].at", second)
    assert error.expected == f"each layer in one override only (layer {shared} is also in layers[0])"


@settings(max_examples=100)
@given(patterns(allow_layers=False, allow_budget=False, branches={"compression", "selection"},
                gate_kinds=("mlp", "linear")), st.booleans())
def test_selection_without_compression(pattern: Pattern, with_window: bool) -> None:
    tree = pattern.to_dict()
    del tree["compression"]
    if with_window:
        tree["window"] = {"size": 4}
    window = Window(4) if with_window else None
    error, _ = _yaml_and_api(yaml.safe_dump(tree, sort_keys=False),
                             lambda: dataclasses.replace(pattern, compression=None, window=window))
    assert (error.key_path, error.found) == ("selection", "no compression section")


# -- hostile input: text, encodings, sizes, chains ------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key_path", "line", "column"),
    [
        ('name: "a\\ud800b"\nwindow: {size: 4}\n', "name", 1, 7),
        ('name: x\ndescription: "\\udfff"\nwindow: {size: 4}\n', "description", 2, 14),
        ('name: x\nwindow: {size: 4}\nmodel: {"\\udcff": 1}\n', "model", 3, 9),
        ('name: x\nextends: "\\ud800"\n', "extends", 2, 10),
    ],
)
def test_lone_surrogates_are_refused_where_they_stand(text: str, key_path: str, line: int, column: int) -> None:
    """A lone surrogate (a YAML escape UTF-8 cannot encode) is refused at its
    node: printing or emitting it would fail later, far from the file."""
    error = refuse(text)
    assert (error.key_path, error.line, error.column) == (key_path, line, column)
    assert error.expected == "text without lone surrogates (text UTF-8 can encode)"
    str(error).encode("utf-8")  # the message itself prints


@pytest.mark.parametrize("field", ["name", "description"])
def test_lone_surrogates_are_refused_from_python(field: str) -> None:
    kwargs = {"name": "x", field: "a\udc80"}
    with pytest.raises(PatternError) as info:
        Pattern(window=Window(4), **kwargs)
    assert info.value.key_path == field and "U+DC80 at index 1" in str(info.value)


@pytest.mark.parametrize(
    ("build", "key_path", "expected", "found"),
    [
        (lambda: Compression(block=4), "compression.stride",
         "a value for the required key 'stride' of Compression", "nothing"),
        (lambda: Compression(), "compression.block", "a value for the required key 'block' of Compression", "nothing"),
        (lambda: Selection(block=4), "selection.count", "a value for the required key 'count' of Selection", "nothing"),
        (lambda: Window(), "window.size", "a value for the required key 'size' of Window", "nothing"),
        (lambda: LayerOverride(dense=True), "at", "a value for the required key 'at' of LayerOverride", "nothing"),
        (lambda: Pattern(window=Window(4)), "name", "a value for the required key 'name' of Pattern", "nothing"),
        (lambda: Window(sise=4), "window.sise", "a field of Window: size", "sise"),
        (lambda: Gate(kind="mlp", temprature=2.0), "gate.temprature",
         "a field of Gate: kind, temperature, bias, values", "temprature"),
        (lambda: Compression(4, 4, block=4), "compression.block", "one value for Compression field 'block'",
         "a value by position and by name"),
        (lambda: Window(4, 5), "window", "at most 1 positional argument for Window", 2),
        (lambda: Hybrid(vision="all"), "hybrid.vision", "a field of Hybrid: vision_keys", "vision"),
        (lambda: Model(heads=4), "model.heads",
         "a field of Model: query_heads, kv_heads, head_dim, hidden_size, num_layers", "heads"),
        (lambda: Budget(at=4), "budget.at", "a field of Budget: max_keys_per_query, max_attended_fraction, at_length",
         "at"),
    ],
)
def test_section_constructors_name_a_missing_or_unknown_field(build: Any, key_path: str, expected: str,
                                                              found: object) -> None:
    """A bad call of a section constructor is a PatternError naming the section
    and the field (not the dataclass's plain TypeError), as the YAML form is."""
    with pytest.raises(PatternError) as info:
        build()
    assert (info.value.key_path, info.value.expected, info.value.found) == (key_path, expected, found)


def test_misspelt_constructor_keyword_gets_did_you_mean() -> None:
    with pytest.raises(PatternError) as info:
        Selection(block=4, cuont=2)
    assert info.value.hint == "did you mean 'count'?"


def test_missing_required_key_reads_the_same_in_yaml() -> None:
    error = refuse("name: x\ncompression:\n  block: 4\n")
    assert (error.key_path, error.expected, error.line) == (
        "compression.stride", "a value for the required key 'stride' of Compression", 2)


def test_type_errors_inside_a_valid_call_are_not_renamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a malformed call becomes a PatternError: a TypeError raised by the
    checks of a well-formed call is a bug and keeps its type."""
    def broken(self: Window) -> None:
        raise TypeError("a bug in the checks")

    monkeypatch.setattr(Window, "__post_init__", broken)
    with pytest.raises(TypeError, match="a bug in the checks"):
        Window(4)


@pytest.mark.parametrize(
    ("data", "line", "column", "found"),
    [
        (b"name: x\n# caf\xe9\nwindow: {size: 4}\n", 2, 6, "byte 0xE9 at offset 13 (invalid continuation byte)"),
        (b"\xff\xfen\x00a\x00", 1, 1, "byte 0xFF at offset 0 (invalid start byte)"),
        ("name: \u00e9t\u00e9\nwindow: {size: 4}\ndescription: ab\u20ac".encode() + b"\xe2\x82\n", 3, 17,
         "byte 0xE2 0x82 at offset 48 (invalid continuation byte)"),
    ],
)
def test_non_utf8_files_are_located(tmp_path: Path, data: bytes, line: int, column: int, found: str) -> None:
    """A file that is not UTF-8 is refused at the line and column of its first
    bad byte (columns count characters), with the byte and its offset."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(data)
    with pytest.raises(PatternError) as info:
        load_pattern(path)
    assert (info.value.source, info.value.line, info.value.column) == (str(path), line, column)
    assert (info.value.expected, info.value.found) == ("UTF-8 text", found)


def test_non_utf8_extends_parent_is_located_in_the_parent(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_bytes(b"name: base\nwindow: {size: 4}\n\x80\n")
    (tmp_path / "child.yaml").write_text("extends: base\n")
    with pytest.raises(PatternError) as info:
        load_pattern(tmp_path / "child.yaml")
    assert (info.value.source, info.value.line, info.value.column) == (str(tmp_path / "base.yaml"), 3, 1)


def test_long_extends_chain_is_refused_naming_the_chain(tmp_path: Path) -> None:
    """An extends chain longer than MAX_EXTENDS_CHAIN files is refused as such,
    at the extends line where it passes the limit, with the chain named (not
    as YAML nesting, however long the chain)."""
    files = 1000
    for i in range(files - 1):
        (tmp_path / f"p{i}.yaml").write_text(f"# link {i}\nextends: p{i + 1}.yaml\n")
    (tmp_path / f"p{files - 1}.yaml").write_text("name: base\nwindow: {size: 4}\n")
    with pytest.raises(PatternError) as info:
        load_pattern(tmp_path / "p0.yaml")
    error = info.value
    last = MAX_EXTENDS_CHAIN - 1
    assert (error.key_path, error.expected) == ("extends", f"a chain of at most {MAX_EXTENDS_CHAIN} files")
    assert (error.source, error.line, error.column) == (str(tmp_path / f"p{last}.yaml"), 2, 1)
    assert str(error.found).startswith(f"{tmp_path / 'p0.yaml'} -> {tmp_path / 'p1.yaml'} -> ")
    assert str(error.found).endswith(f"-> {tmp_path / f'p{last + 1}.yaml'} ({MAX_EXTENDS_CHAIN + 1} files)")
    # A chain at the limit loads.
    (tmp_path / f"p{last}.yaml").write_text("name: end\nwindow: {size: 8}\n")
    assert load_pattern(tmp_path / "p0.yaml").window == Window(8)


def test_oversized_text_is_refused_before_parsing() -> None:
    text = "name: x\nwindow: {size: 4}\nmodel:\n" + "".join(f"  k{i}: 1\n" for i in range(200_000))
    error = refuse(text)
    assert (error.key_path, error.expected) == ("", f"a pattern of at most {MAX_PATTERN_SIZE} characters, extends included")
    assert error.found == f"{len(text)} characters"


def test_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "w") as file:
        file.write("name: x\nwindow: {size: 4}\n")
        file.truncate(50 * MAX_PATTERN_SIZE)  # a sparse file, zeros past the text
    with pytest.raises(PatternError) as info:
        load_pattern(path)
    assert info.value.expected == f"a pattern file of at most {MAX_PATTERN_SIZE} bytes"


def test_too_many_nodes_are_refused_while_composing() -> None:
    """Within the size limit, a document of more than MAX_YAML_NODES nodes stops
    at the node past the limit."""
    rows = MAX_YAML_NODES // 2 + 10
    text = "name: x\nwindow: {size: 4}\nmodel: {" + ", ".join(f"k{i}: 1" for i in range(rows)) + "}\n"
    assert len(text) <= MAX_PATTERN_SIZE
    error = refuse(text)
    assert (error.expected, error.line) == (f"at most {MAX_YAML_NODES} YAML nodes, extends included", 3)


def test_many_layer_overrides_arerefuse() -> None:
    """20,000 layer overrides (each a dense layer) are refused by the size
    limits, not validated and planned one by one."""
    text = "name: x\nwindow: {size: 4}\nlayers:\n" + "".join(f"  - {{at: [{i}], dense: true}}\n" for i in range(20_000))
    error = refuse(text)
    assert error.expected in (f"a pattern of at most {MAX_PATTERN_SIZE} characters, extends included", f"at most {MAX_YAML_NODES} YAML nodes, extends included")
    # Under those limits, more than MAX_LAYER_OVERRIDES overrides are refused by the pattern itself.
    text = "name: x\nwindow: {size: 4}\nlayers:\n" + "".join(f"- {{at: [{i}], dense: true}}\n"
                                                             for i in range(MAX_LAYER_OVERRIDES + 1))
    error = refuse(text)
    assert (error.key_path, error.expected, error.found) == (
        "layers", f"at most {MAX_LAYER_OVERRIDES} layer overrides", MAX_LAYER_OVERRIDES + 1)


def _write_chain(folder: Path, prefix: str, body: str, files: int = 4) -> None:
    """``{prefix}0.yaml`` extends ``{prefix}1.yaml`` ... up to the last, which
    has a window; every file also holds ``body``."""
    for i in range(files):
        target = f"extends: {prefix}{i + 1}.yaml\n" if i < files - 1 else "window: {size: 4}\n"
        (folder / f"{prefix}{i}.yaml").write_text(f"name: {prefix}{i}\n{target}{body}")


def test_size_limits_hold_for_a_chain_together(tmp_path: Path) -> None:
    """A chain of files each under the size limits is refused once together
    they pass them: the limits bound the work of the whole load. Here each
    file holds 3/8 of the node limit (in a layers list, which is only checked
    once merged)."""
    at = ", ".join(str(i) for i in range(3 * MAX_YAML_NODES // 8))
    _write_chain(tmp_path, "p", f"layers:\n  - {{at: [{at}], dense: true}}\n")
    with pytest.raises(PatternError) as info:
        load_pattern(tmp_path / "p0.yaml")
    assert info.value.expected == f"at most {MAX_YAML_NODES} YAML nodes, extends included"
    assert info.value.source == str(tmp_path / "p2.yaml")
    # The same file loads on its own.
    assert len(load_pattern(tmp_path / "p3.yaml").layers) == 1
    # Characters too: a long description in each file.
    _write_chain(tmp_path, "q", f"description: {'x' * (MAX_PATTERN_SIZE // 3)}\n")
    with pytest.raises(PatternError) as info:
        load_pattern(tmp_path / "q0.yaml")
    assert info.value.expected == f"a pattern of at most {MAX_PATTERN_SIZE} characters, extends included"
    assert info.value.source == str(tmp_path / "q2.yaml") and "left by the extending files" in info.value.found


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        ("name: x\nwindow: {size: BIG}\n", "window.size"),
        ("name: x\ncompression: {block: BIG, stride: 1}\n", "compression.block"),
        ("name: x\ncompression: {block: 4, stride: 4}\nselection: {block: 4, count: BIG}\n", "selection.count"),
        ("name: x\nwindow: {size: 4}\nmodel: {head_dim: BIG}\n", "model.head_dim"),
        ("name: x\nwindow: {size: 4}\nbudget: {max_attended_fraction: 1.0, at_length: BIG}\n", "budget.at_length"),
        ("name: x\nwindow: {size: 4}\nlayers: [{at: [BIG], dense: true}]\n", "layers[0].at[0]"),
    ],
)
@pytest.mark.parametrize("big", [MAX_INT + 1, 10**30])
def test_sizes_past_int32_are_refused(text: str, key_path: str, big: int) -> None:
    """Sizes, counts, lengths and layer indices past 2**31 - 1 describe no real
    sequence and overflow the tensors positions are computed in (a window of
    10**30 gave OverflowError from every backend): refused where they stand."""
    error = refuse(text.replace("BIG", str(big)))
    assert (error.key_path, error.expected, error.found) == (key_path, f"an integer <= {MAX_INT} (2**31 - 1)", big)
    loads_pattern(text.replace("BIG", str(MAX_INT)), SOURCE)  # the largest value is a pattern


def test_layer_beyond_int32_is_refused_in_for_layer() -> None:
    with pytest.raises(PatternError) as info:
        loads_pattern("name: x\nwindow: {size: 4}\n").for_layer(MAX_INT + 1)
    assert info.value.key_path == "layer"


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: loads_pattern(None), "YAML text (str or bytes)"),  # type: ignore[arg-type]
        (lambda: loads_pattern(123), "YAML text (str or bytes)"),  # type: ignore[arg-type]
        (lambda: loads_pattern("name: x\n", source=3), "a source name (str) for the pattern text"),  # type: ignore[arg-type]
        (lambda: loads_pattern(b"name: x\n\xff"), "UTF-8 text"),
        (lambda: load_pattern(None), "a pattern file path or a bundled pattern name"),  # type: ignore[arg-type]
        (lambda: load_pattern(123), "a pattern file path or a bundled pattern name"),  # type: ignore[arg-type]
        (lambda: pattern_from_dict({"name": "x", "window": {"size": 4}, 3: 1}), "string keys"),
        (lambda: pattern_from_dict({"name": "x", "window": {None: 4}}), "string keys"),
    ],
)
def test_python_api_arguments_of_any_type(call: Any, expected: str) -> None:
    """The loading functions take any argument without a TypeError from inside."""
    with pytest.raises(PatternError) as info:
        call()
    assert info.value.expected == expected


def test_bytes_are_read_as_utf8() -> None:
    assert loads_pattern("name: \u00e9\nwindow: {size: 4}\n".encode()).name == "\u00e9"
    assert load_pattern(b"window") == load_pattern("window")


def test_layer_override_limit_holds_in_python() -> None:
    overrides = tuple(LayerOverride(at=(i,), dense=True) for i in range(MAX_LAYER_OVERRIDES + 1))
    with pytest.raises(PatternError) as info:
        Pattern(name="x", window=Window(4), layers=overrides)
    assert info.value.key_path == "layers"
    assert len(Pattern(name="x", window=Window(4), layers=overrides[:-1]).layers) == MAX_LAYER_OVERRIDES
