"""Fuzzers over pattern files and the command line.

* Pattern files: the bundled patterns, changed in their data (keys dropped,
  renamed or retyped, random scalars) or in their bytes (syntax damage,
  bytes that are not UTF-8, hostile YAML: Python tags, aliases, merge keys,
  deep nesting), loaded from disk, alone or through ``extends``. Only a
  :class:`~nsaflex.errors.PatternError` comes out, located at file:line:column
  in the file that holds the problem; a pattern that loads round-trips; no
  YAML tag constructs an object (a tag that would run a command leaves no trace).
* The command line: ``nsaflex compile`` on such files and bundled names with
  hostile options exits 0 or 2, never with a traceback, prints no control
  character, and ``--emit`` writes only inside its folder.

Examples are bounded so the file runs in well under a minute on one core
(``NSAFLEX_FUZZ_EXAMPLES=2000`` runs a longer search); tests/test_dsl_errors.py
holds the text-level mutation properties and the exact messages.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import click.testing
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsaflex import Pattern, PatternError, dump_pattern, load_pattern, loads_pattern
from nsaflex.cli.main import main
from nsaflex.loader import bundled_patterns

BUNDLED = bundled_patterns()
BUNDLED_DATA = {name: yaml.safe_load(path.read_text(encoding="utf-8")) for name, path in BUNDLED.items()}
EXAMPLES = int(os.environ.get("NSAFLEX_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_serial = itertools.count()


def fresh_dir(root: Path) -> Path:
    """A new empty folder under ``root`` for one example (examples share the fixture)."""
    folder = root / f"example{next(_serial)}"
    folder.mkdir()
    return folder


def load_checked(path: Path, sources: tuple[Path, ...]) -> Pattern | PatternError:
    """Load ``path``: a pattern that round-trips, or a PatternError located at
    line and column of one of ``sources`` (the file itself or its parent)."""
    try:
        pattern = load_pattern(path)
    except Exception as error:  # noqa: BLE001 - the point is that only PatternError comes out
        assert type(error) is PatternError, f"{type(error).__name__}: {error}"
        assert error.source in {str(s) for s in sources}, (error.source, sources)
        assert error.line is not None and error.column is not None, str(error)
        assert str(error).startswith(f"{error.source}:{error.line}:{error.column}: ")
        str(error).encode("utf-8")  # the message prints on any UTF-8 stream
        return error
    assert loads_pattern(dump_pattern(pattern), "<round trip>") == pattern
    return pattern


# -- data-level mutations of bundled patterns ----------------------------------------------------------
def _paths(data: Any, path: tuple = ()) -> list[tuple]:
    """Every key path of a mapping-and-list tree (list items by index)."""
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        out.append((*path, key))
        out += _paths(value, (*path, key))
    return out


def _parent(data: Any, path: tuple) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(-2**80, 2**80), st.floats(),
    st.text(max_size=10), st.sampled_from(("mean", "mlp", "causal", "group", "vision", "constant", "current")),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=2))


@st.composite
def data_mutants(draw: Any) -> Any:
    """A bundled pattern's data with 1-3 of: a key dropped, a key renamed, a
    value replaced by a random value (retyped), a random scalar added."""
    data = yaml.safe_load(yaml.safe_dump(BUNDLED_DATA[draw(st.sampled_from(sorted(BUNDLED_DATA)))]))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        how = draw(st.sampled_from(("drop", "rename", "retype", "add")))
        if how == "drop":
            del parent[path[-1]]
        elif how == "rename" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = parent.pop(path[-1])
        elif how == "retype":
            parent[path[-1]] = draw(values)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(values)
    return data


@FUZZ
@given(data=data_mutants(), style=st.sampled_from((None, False, True)), unicode=st.booleans())
def test_data_mutants_of_bundled_files(tmp_path_factory: pytest.TempPathFactory, data: Any, style: Any,
                                       unicode: bool) -> None:
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    path = folder / "mutant.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=style, allow_unicode=unicode),
                    encoding="utf-8")
    load_checked(path, (path,))


# -- byte-level damage and hostile YAML ----------------------------------------------------------------
def _alias_bomb(levels: int) -> str:
    rows = ["b0: &b0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(rows) + "\n"


MARKER = "NSAFLEX_FUZZ_MARKER"
HOSTILE = (
    f"!!python/object/apply:os.system ['touch {MARKER}']",
    f"!!python/object/apply:subprocess.check_output [['touch', '{MARKER}']]",
    "!!python/object/new:builtins.dict {}",
    "!!python/name:builtins.print",
    "!!python/module:os",
    "!!python/tuple [1, 2]",
    "&loop [*loop]",
    "*undefined",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!timestamp 2020-01-01",
    "!!float nan",
    '"\\ud800"',
    '"\\U0010ffff"',
    "9" * 5000,
    "[" * 500,
    "{a: " * 500,
    "- " * 500,
    "? [complex, key]\n: 1",
    "<<: {size: 4}",
    "<<: *undefined",
    "%YAML 1.1\n---",
    "---",
    "...",
    "\t",
    "\r\n",
    "\x85",
    "\ufeff",
)


@st.composite
def byte_mutants(draw: Any) -> bytes:
    """A bundled file's bytes with 1-3 of: random bytes replaced, inserted or
    deleted (any byte, so not always UTF-8), truncation, a line repeated or
    dropped, a hostile YAML snippet inserted, an alias bomb added."""
    data = bytearray(BUNDLED[draw(st.sampled_from(sorted(BUNDLED)))].read_bytes())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(("replace", "insert", "delete", "truncate", "repeat_line", "drop_line",
                                    "hostile", "hostile_value", "bomb")))
        if how == "replace" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif how == "truncate":
            del data[at:]
        elif how in ("repeat_line", "drop_line"):
            lines = bytes(data).splitlines(keepends=True)
            if lines:
                i = draw(st.integers(0, len(lines) - 1))
                lines[i:i + 1] = [lines[i]] * (2 if how == "repeat_line" else 0)
                data = bytearray(b"".join(lines))
        elif how == "hostile":
            data[at:at] = draw(st.sampled_from(HOSTILE)).encode("utf-8")
        elif how == "hostile_value":
            # Replace the first value after a key on a random line: where a tag would be constructed.
            lines = bytes(data).splitlines(keepends=True)
            keyed = [i for i, line in enumerate(lines) if b": " in line]
            if keyed:
                i = draw(st.sampled_from(keyed))
                head = lines[i].split(b": ", 1)[0]
                lines[i] = head + b": " + draw(st.sampled_from(HOSTILE)).encode("utf-8") + b"\n"
                data = bytearray(b"".join(lines))
        elif how == "bomb":
            data += b"\n" + _alias_bomb(draw(st.integers(3, 9))).encode("utf-8")
    return bytes(data)


@FUZZ
@given(data=byte_mutants(), through=st.sampled_from(("itself", "child", "parent")))
def test_byte_mutants_of_bundled_files(tmp_path_factory: pytest.TempPathFactory, data: bytes, through: str) -> None:
    """Loaded as they are, as the parent of a small child (``extends``), or as
    a child extending a bundled pattern: only located PatternErrors, in the
    file that holds the damage; and no tag ever runs anything."""
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    mutant = folder / "mutant.yaml"
    if through == "child":
        # The mutant's own name and extends removed, it extends a bundled pattern.
        lines = [line for line in data.splitlines(keepends=True) if not line.startswith((b"name:", b"extends:"))]
        data = b"extends: window\n" + b"".join(lines)
    mutant.write_bytes(data)
    start = Path.cwd()
    try:
        os.chdir(folder)  # where a constructed 'touch' would leave its marker
        if through == "parent":
            child = folder / "child.yaml"
            child.write_text("extends: mutant.yaml\nname: child\n", encoding="utf-8")
            load_checked(child, (child, mutant))
        else:
            load_checked(mutant, (mutant,))
    finally:
        os.chdir(start)
    assert not (folder / MARKER).exists(), "a YAML tag constructed an object that ran a command"


def test_hostile_tags_construct_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python tag is refused at its node, and none has run."""
    monkeypatch.chdir(tmp_path)
    for snippet in HOSTILE[:6]:
        path = tmp_path / "tagged.yaml"
        path.write_text(f"name: x\nwindow:\n  size: {snippet}\n", encoding="utf-8")
        error = load_checked(path, (path,))
        assert isinstance(error, PatternError) and (error.line, error.column) == (3, 9), str(error)
        assert error.expected.startswith(("a valid YAML scalar", "a plain YAML")), str(error)
        assert "python/" in str(error.found) or "python/" in error.expected, str(error)
    assert not (tmp_path / MARKER).exists()


# -- the command line --------------------------------------------------------------------------------
def run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def assert_exit_0_or_2(result: click.testing.Result) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, repr(result.exception), result.output[-2000:])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    # Whatever a hostile file holds, no control character reaches the terminal.
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", result.output), repr(result.output[-2000:])
    if result.exit_code == 2:
        assert "error:" in result.output or "Error:" in result.output, result.output[-2000:]


junk_text = st.text(max_size=12)


def mostly(valid: st.SearchStrategy[str], invalid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Valid values three times in four, so that runs get past option parsing."""
    return st.one_of(valid, valid, valid, invalid)


options = st.fixed_dictionaries({}, optional={
    "--at": mostly(st.sampled_from(("8k", "1000,4k", "128K", "1.5k", "99999999999k", "1_000")),
                   st.one_of(st.sampled_from(("0", "-4", "8k,,", "1e5", "k", "1.3k")), junk_text)),
    "--layer": mostly(st.integers(0, 40).map(str),
                      st.one_of(st.sampled_from(("-1", "99999999999999999999", "x", "1.5")), junk_text)),
    "--backend": mostly(st.sampled_from(("auto", "reference", "flex", "triton")), junk_text),
    "--device": mostly(st.sampled_from(("cpu", "cuda")), junk_text),
    "--json": st.just(None),
    "--emit": st.text(st.characters(blacklist_characters="/\x00", codec="utf-8"), min_size=1, max_size=12).filter(
        lambda name: name not in (".", "..")),
})


@st.composite
def pattern_args(draw: Any, folder: Path) -> str:
    """A PATTERN argument: a bundled name (maybe misspelt), a mutated file, a
    folder, a missing path or junk."""
    kind = draw(st.sampled_from(("bundled",) * 4 + ("misspelt", "data_mutant", "byte_mutant", "folder", "missing",
                                                    "junk")))
    if kind == "bundled":
        return draw(st.sampled_from(sorted(BUNDLED)))
    if kind == "misspelt":
        name = draw(st.sampled_from(sorted(BUNDLED)))
        i = draw(st.integers(0, len(name) - 1))
        return name[:i] + name[i + 1:]
    path = folder / "pattern.yaml"
    if kind == "data_mutant":
        path.write_text(yaml.safe_dump(draw(data_mutants()), sort_keys=False), encoding="utf-8")
    elif kind == "byte_mutant":
        path.write_bytes(draw(byte_mutants()))
    elif kind == "folder":
        return str(folder)
    elif kind == "missing":
        return str(folder / "missing.yaml")
    else:
        return draw(junk_text)
    return str(path)


@settings(FUZZ, max_examples=max(1, EXAMPLES * 3 // 4))
@given(st.data())
def test_cli_compile_exits_0_or_2(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Any PATTERN argument and options: exit 0, or 2 with a message; never a
    traceback. A module emitted with --emit lies in the folder named, and
    nothing else is written."""
    folder = fresh_dir(tmp_path_factory.getbasetemp())
    arg = data.draw(pattern_args(folder))
    chosen = data.draw(options)
    args = ["compile", arg]
    emit_dir = None
    for option, value in chosen.items():
        if option == "--emit":
            emit_dir = folder / "out" / value
            value = str(emit_dir)
        args += [option] if value is None else [option, value]
    before = {p for p in folder.rglob("*")}
    result = run(*args)
    assert_exit_0_or_2(result)
    written = {p for p in folder.rglob("*")} - before
    if emit_dir is not None and result.exit_code == 0:
        modules = [p for p in written if p.is_file()]
        assert len(modules) == 1 and modules[0].parent == emit_dir and modules[0].suffix == ".py", written
        assert all(p == emit_dir or emit_dir.is_relative_to(p) or p.parent == emit_dir for p in written), written
    else:
        assert not [p for p in written if p.is_file()], written
