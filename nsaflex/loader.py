"""YAML front end of the pattern DSL.

``load_pattern(path)`` parses a YAML file, resolves ``extends`` (a pattern file
named relative to the extending file, or the name of a bundled pattern),
checks every key and value, and returns a :class:`~nsaflex.spec.Pattern`.
Every problem is raised as :class:`~nsaflex.errors.PatternError` carrying the
file, line and column of the offending node, the key path, what was expected
and what was found; unknown keys get a did-you-mean hint.

``dump_pattern`` writes the canonical YAML form; ``pattern_from_dict`` and
``Pattern.to_dict`` are the two directions of the round trip.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nsaflex.errors import PatternError, describe_value, did_you_mean
from nsaflex.spec import (
    BRANCH_ORDER,
    Budget,
    Compression,
    Gate,
    Hybrid,
    LayerOverride,
    Model,
    Pattern,
    Selection,
    Window,
)

BUNDLED_DIR = Path(str(resources.files("nsaflex.patterns")))

_SECTIONS: dict[str, type] = {
    "compression": Compression,
    "selection": Selection,
    "window": Window,
    "gate": Gate,
    "hybrid": Hybrid,
    "model": Model,
    "budget": Budget,
}
_TOP_KEYS = ("name", "description", "extends", "layers", "dense", *_SECTIONS)
_OVERRIDE_KEYS = ("at", "dense", "remove", *BRANCH_ORDER)
# Fields that are tuples in the dataclasses and lists in YAML.
_LIST_FIELDS = {"forced", "values", "at", "remove"}

Marks = dict[str, tuple[int, int]]

# Stated limits on hostile input, each far above any real pattern (the bundled
# ones are under 2 KB, 200 nodes and one level of extends) and low enough that
# refusing takes well under a second:
# The size limits hold for a pattern and the files it extends together, so
# that a chain of files each just under them cannot multiply the work.
#: Largest pattern: bytes of a file, characters of texts; checked before parsing.
MAX_PATTERN_SIZE = 256 * 1024
#: Most YAML nodes in a pattern, checked while composing and again with aliases expanded.
MAX_YAML_NODES = 20_000
#: Most files in an ``extends`` chain, the extending file included.
MAX_EXTENDS_CHAIN = 32


@dataclasses.dataclass
class _Allowance:
    """What is left of the size limits for the rest of an extends chain."""

    characters: int = MAX_PATTERN_SIZE
    nodes_composed: int = MAX_YAML_NODES
    nodes_built: int = MAX_YAML_NODES


def bundled_patterns() -> dict[str, Path]:
    """Bundled pattern names (file stem) and their paths."""
    return {path.stem: path for path in sorted(BUNDLED_DIR.glob("*.yaml"))}


# -- YAML with positions -------------------------------------------------------
def _join(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class _Builder:
    """Plain Python data from a composed YAML node, recording each node's position.

    Refuses what ``yaml.compose`` accepts but a pattern cannot be: scalars whose
    tag cannot be constructed (``!!int abc``, ``2020-13-45``, ``!foo 1``),
    tagged mappings and lists (``!!set``, ``!!omap``, ``!!python/object/new:...``),
    text with lone surrogates (``"\\ud800"``: no UTF-8 can print it),
    recursive aliases (``&a [*a]``) and alias bombs (more than
    :data:`MAX_YAML_NODES` nodes once aliases are expanded, in the whole
    extends chain).
    """

    def __init__(self, marks: Marks, source: str, allowance: _Allowance) -> None:
        self.marks = marks
        self.source = source
        self.constructor = yaml.constructor.SafeConstructor()
        self.active: set[int] = set()
        self.allowance = allowance

    def error(self, node: yaml.Node, path: str, expected: str, found: str) -> PatternError:
        return PatternError(
            path, expected, found, source=self.source,
            line=node.start_mark.line + 1, column=node.start_mark.column + 1,
        )

    def scalar(self, node: yaml.Node, path: str) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except Exception as error:  # ConstructorError, or ValueError/KeyError of a bad tagged scalar
            problem = getattr(error, "problem", None) or str(error) or type(error).__name__
            raise self.error(node, path, f"a valid YAML scalar ({node.tag})", str(problem).strip()) from None
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                found = f"{value!r} (U+{ord(value[error.start]):04X} at index {error.start})"
                raise self.error(node, path, "text without lone surrogates (text UTF-8 can encode)", found) from None
        return value

    def build(self, node: yaml.Node, path: str) -> Any:
        self.allowance.nodes_built -= 1
        if self.allowance.nodes_built < 0:
            raise self.error(node, path, f"at most {MAX_YAML_NODES} YAML nodes (aliases expanded, extends included)",
                             "more")
        self.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            plain = yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG if isinstance(node, yaml.MappingNode) else (
                yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG)
            if node.tag != plain:
                # A tagged collection (!!set, !!omap, !!python/object/new:...) would otherwise be
                # read as a plain one, its tag silently dropped.
                what = "mapping" if isinstance(node, yaml.MappingNode) else "list"
                raise self.error(node, path, f"a plain YAML {what} (no tag)", f"the tag {node.tag}")
            if id(node) in self.active:
                raise self.error(node, path, "no recursive aliases", "an alias to an enclosing node")
            self.active.add(id(node))
            try:
                return self._collection(node, path)
            finally:
                self.active.discard(id(node))
        return self.scalar(node, path)

    def _collection(self, node: yaml.Node, path: str) -> Any:
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, _join(path, i)) for i, item in enumerate(node.value)]
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise self.error(key_node, path, "string keys", repr(key))
            child = _join(path, key)
            if key in out:
                raise self.error(key_node, child, "each key once", "a repeated key")
            out[key] = self.build(value_node, child)
            # Point errors about a key at the key itself: that is where the eye goes.
            self.marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out


class _TooManyNodes(Exception):
    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(mark)
        self.mark = mark


class _TooDeep(Exception):
    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(mark)
        self.mark = mark


class _CountingLoader(yaml.SafeLoader):
    """A SafeLoader that stops composing once the allowance of nodes is spent,
    before a huge document has been read whole, and at the first collection
    nested deeper than :data:`_MAX_DEPTH` (the composer recurses per level: the
    limit is the same whatever stack the caller runs on)."""

    def __init__(self, stream: str, allowance: _Allowance) -> None:
        super().__init__(stream)
        self.allowance = allowance
        self.collections_open = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        self.allowance.nodes_composed -= 1
        if self.allowance.nodes_composed < 0:
            raise _TooManyNodes(self.peek_event().start_mark)
        if not self.check_event(yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        self.collections_open += 1
        try:
            if self.collections_open > _MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.collections_open -= 1


def _position_of(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of character ``offset`` of ``text``."""
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def _compose(text: str, source: str, allowance: _Allowance) -> tuple[Any, Marks]:
    if len(text) > allowance.characters:
        line, column = _position_of(text, allowance.characters)
        found = f"{len(text)} characters" + (
            "" if allowance.characters == MAX_PATTERN_SIZE else f" here, {allowance.characters} left by the extending files")
        raise PatternError(
            "", f"a pattern of at most {MAX_PATTERN_SIZE} characters, extends included", found,
            source=source, line=line, column=column,
        )
    allowance.characters -= len(text)
    loader = None
    try:
        loader = _CountingLoader(text, allowance)  # the reader checks every character here
        node = loader.get_single_node()
    except _TooManyNodes as error:
        raise PatternError(
            "", f"at most {MAX_YAML_NODES} YAML nodes, extends included", "more",
            source=source, line=error.mark.line + 1, column=error.mark.column + 1,
        ) from None
    except _TooDeep as error:
        raise PatternError(
            "", f"YAML nested at most {_MAX_DEPTH} deep", "deeper nesting",
            source=source, line=error.mark.line + 1, column=error.mark.column + 1,
        ) from None
    except (ValueError, OverflowError) as error:
        # The scanner lets a few of these out, e.g. chr() of an escape
        # beyond U+10FFFF in a double-quoted scalar ("\U00110000").
        mark = loader.get_mark() if loader is not None else None
        raise PatternError(
            "", "valid YAML", f"{type(error).__name__}: {error}", source=source,
            line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
        ) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = (error.problem or "invalid YAML").strip()
        for prefix in ("but ", "found "):  # 'but found another document' reads 'found but found ...' otherwise
            problem = problem[len(prefix):] if problem.startswith(prefix) else problem
        if error.context:
            problem += f" ({error.context.strip()})"
        raise PatternError(
            "", "valid YAML", problem, source=source,
            line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
        ) from None
    except yaml.reader.ReaderError as error:
        # A character YAML does not allow; the reader gives its offset only.
        line, column = _position_of(text, error.position)
        char = error.character
        found = f"character U+{char:04X}" if isinstance(char, int) else f"character {char!r}"
        raise PatternError(
            "", f"valid YAML ({error.reason})", found, source=source, line=line, column=column,
        ) from None
    except yaml.YAMLError as error:
        raise PatternError("", "valid YAML", str(error).strip(), source=source) from None
    except RecursionError:
        raise _too_deep(text, source) from None
    finally:
        if loader is not None:
            loader.dispose()
    marks: Marks = {}
    if node is None:
        raise PatternError("", "a mapping of pattern sections", "an empty document", source=source, line=1, column=1)
    try:
        data = _Builder(marks, source, allowance).build(node, "")
    except RecursionError:
        raise _too_deep(text, source) from None
    return data, marks


_MAX_DEPTH = 100


def _too_deep(text: str, source: str) -> PatternError:
    """The error for YAML nested deeper than the (recursive) composer can go,
    located where the nesting passes :data:`_MAX_DEPTH` (found by the parser,
    which is not recursive)."""
    depth, line, column = 0, None, None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > _MAX_DEPTH:
                    line, column = event.start_mark.line + 1, event.start_mark.column + 1
                    break
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        pass
    return PatternError(
        "", f"YAML nested at most {_MAX_DEPTH} deep", "deeper nesting", source=source, line=line, column=column,
    )


# -- extends --------------------------------------------------------------------
def _deep_merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key, anything else replaces;
    a ``null`` in the child removes the key (e.g. ``window: null`` drops a branch)."""
    out = dict(base)
    for key, value in child.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_extends_target(target: str, source: str) -> Path:
    here = Path(source).parent if source and not source.startswith("<") else Path.cwd()
    candidates = [here / target, here / f"{target}.yaml"]
    bundled = bundled_patterns()
    if target in bundled:
        candidates.append(bundled[target])
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate.resolve()
        except (OSError, ValueError):  # a name too long, an embedded NUL byte...
            continue
    raise PatternError(
        "extends",
        f"a pattern file (relative to {here}) or a bundled pattern name ({', '.join(bundled)})",
        target,
        hint=did_you_mean(target, bundled),
    )


def _load_document(
    text: str, source: str, chain: tuple[str, ...], allowance: _Allowance
) -> tuple[dict[str, Any], Marks, str]:
    """The merged mapping of a document and its ``extends`` chain
    (``allowance``: what the documents already read left of the size limits).

    Returns the data, the marks of the *extending* document (errors in
    inherited keys point at the ``extends`` line) and the source name.
    """
    data, marks = _compose(text, source, allowance)
    if not isinstance(data, dict):
        line, column = marks.get("", (None, None))
        raise PatternError("", "a mapping of pattern sections", type(data).__name__, source=source, line=line, column=column)
    try:
        _check_keys(data, _TOP_KEYS, "", "a pattern")  # 'extends' included, for its did-you-mean
        # Before merging into a parent: a null under a misspelt key would vanish there.
        for key, value in data.items():
            if key in _SECTIONS and isinstance(value, dict):
                _check_keys(value, _field_names(_SECTIONS[key]), key, f"'{key}'")
    except PatternError as error:
        raise error.located(source, *marks.get(error.key_path, (None, None))) from None
    target = data.pop("extends", None)
    if target is None:
        return data, marks, source
    line, column = marks.get("extends", (None, None))
    if not isinstance(target, str):
        raise PatternError("extends", "a pattern file name or bundled pattern name", repr(target), source=source, line=line, column=column)
    try:
        parent_path = _resolve_extends_target(target, source)
    except PatternError as error:
        raise error.located(source, line, column) from None
    if str(parent_path) in chain:
        raise PatternError(
            "extends", "no cycle of extends", " -> ".join([*chain, str(parent_path)]),
            source=source, line=line, column=column,
        )
    if len(chain) >= MAX_EXTENDS_CHAIN:
        raise PatternError(
            "extends", f"a chain of at most {MAX_EXTENDS_CHAIN} files", _chain_text([*chain, str(parent_path)]),
            source=source, line=line, column=column,
        )
    try:
        parent_text = _read_pattern_file(parent_path)
    except OSError as error:
        raise PatternError(
            "extends", "a readable pattern file", f"{parent_path}: {error}",
            source=source, line=line, column=column,
        ) from None
    parent, _, _ = _load_document(parent_text, str(parent_path), (*chain, str(parent_path)), allowance)
    parent.pop("name", None)  # the child is a new pattern; an unnamed child gets its file's name
    parent.pop("description", None)
    merged = _deep_merge(parent, data)
    # Keys only the parent had point at the child's extends line.
    for key in merged:
        marks.setdefault(key, (line, column) if line is not None else (1, 1))
    return merged, marks, source


def _chain_text(chain: list[str]) -> str:
    """An extends chain for a message, its middle left out when long."""
    if len(chain) <= 6:
        return " -> ".join(chain)
    return " -> ".join([*chain[:3], f"... ({len(chain) - 5} more)", *chain[-2:]]) + f" ({len(chain)} files)"


def _read_pattern_file(path: Path) -> str:
    """The text of a pattern file, refused with its position when it is larger
    than :data:`MAX_PATTERN_SIZE` bytes (read no further) or not UTF-8 (the
    line and column of the first bad byte). OSError passes through."""
    with open(path, "rb") as file:
        data = file.read(MAX_PATTERN_SIZE + 1)
    if len(data) > MAX_PATTERN_SIZE:
        raise PatternError("", f"a pattern file of at most {MAX_PATTERN_SIZE} bytes", "a larger file", source=str(path))
    return _decode(data, str(path))


def _decode(data: bytes, source: str) -> str:
    """``data`` as UTF-8, refused at the line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        # Everything before error.start decoded, so the column counts characters.
        line_start = data.rfind(b"\n", 0, error.start) + 1
        column = len(data[line_start : error.start].decode("utf-8")) + 1
        bad = " ".join(f"0x{byte:02X}" for byte in data[error.start : error.end])
        raise PatternError(
            "", "UTF-8 text", f"byte {bad} at offset {error.start} ({error.reason})",
            source=source, line=data.count(b"\n", 0, error.start) + 1, column=column,
        ) from None


# -- dict -> dataclasses ------------------------------------------------------------

def _check_keys(data: Any, allowed: tuple[str, ...], path: str, what: str) -> None:
    if not isinstance(data, dict):
        raise PatternError(path, f"a mapping ({what})", f"{data!r} ({type(data).__name__})")
    for key in data:
        if not isinstance(key, str):
            raise PatternError(path, "string keys", describe_value(key))
        if key not in allowed:
            raise PatternError(
                _join(path, key), f"a key of {what}: {', '.join(allowed)}", key,
                hint=did_you_mean(key, allowed),
            )


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _section(cls: type, data: Any, path: str) -> Any:
    names = _field_names(cls)
    _check_keys(data, names, path, f"'{path}'")
    kwargs = {k: tuple(v) if k in _LIST_FIELDS and isinstance(v, list) else v for k, v in data.items()}
    try:  # a missing required key is the constructor's PatternError too
        return cls(**kwargs)
    except PatternError as error:
        raise _relocate(error, path, cls) from None


def _relocate(error: PatternError, path: str, cls: type) -> PatternError:
    """Errors raised by a section constructor name paths from the pattern root;
    re-root them at ``path`` (which differs inside layer overrides)."""
    own = getattr(cls, "SECTION", "")
    key = error.key_path
    if own and (key == own or key.startswith(own + ".")):
        key = key[len(own):].lstrip(".")
    return PatternError(_join(path, key) if key else path, error.expected, error.found, hint=error.hint)


def _override(data: Any, path: str, base: dict[str, Any]) -> LayerOverride:
    _check_keys(data, _OVERRIDE_KEYS, path, "a layer override")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in BRANCH_ORDER:
            if not isinstance(value, dict):
                raise PatternError(_join(path, key), f"a mapping (the {key} fields to change)", repr(value))
            # A partial section changes the base pattern's section field by field
            # (its keys checked first: a null under a misspelt key would vanish).
            _check_keys(value, _field_names(_SECTIONS[key]), _join(path, key), f"'{_join(path, key)}'")
            base_section = base.get(key)
            merged = _deep_merge(base_section if isinstance(base_section, Mapping) else {}, value)
            kwargs[key] = _section(_SECTIONS[key], merged, _join(path, key))
        elif key in _LIST_FIELDS and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    if "at" not in kwargs:
        raise PatternError(_join(path, "at"), "the list of layer indices this override applies to", "nothing")
    try:
        return LayerOverride(**kwargs)
    except PatternError as error:
        raise _relocate(error, path, LayerOverride) from None


def pattern_from_dict(data: Any, *, default_name: str | None = None) -> Pattern:
    """Build a :class:`Pattern` from its plain-data (YAML) form.

    Raises PatternError (without a file position) on any problem.
    """
    _check_keys(data, tuple(k for k in _TOP_KEYS if k != "extends"), "", "a pattern")
    kwargs: dict[str, Any] = {}
    # Sections first: layer overrides are merged into them, so they must be sound.
    for key, value in data.items():
        if key in _SECTIONS:
            # An optional section given as null is absent, as in an extends child.
            optional = key not in ("gate", "model")
            kwargs[key] = None if value is None and optional else _section(_SECTIONS[key], value, key)
        elif key != "layers":
            kwargs[key] = value
    if "layers" in data:
        value = data["layers"]
        if not isinstance(value, list):
            raise PatternError("layers", "a list of layer overrides", repr(value))
        kwargs["layers"] = tuple(_override(item, f"layers[{i}]", data) for i, item in enumerate(value))
    if "name" not in kwargs:
        if default_name is None:
            raise PatternError("name", "a pattern name", "nothing")
        kwargs["name"] = default_name
    return Pattern(**kwargs)


def _position(marks: Marks, key_path: str) -> tuple[int | None, int | None]:
    """The position of the deepest recorded node on ``key_path``."""
    path = key_path
    while True:
        if path in marks:
            return marks[path]
        if not path:
            return None, None
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""


def _chain_key(source: str) -> str:
    """The name ``extends`` cycles are detected by: the resolved path, as for parents."""
    try:
        return str(Path(source).resolve())
    except (OSError, ValueError, RuntimeError):
        return os.path.abspath(source)


def loads_pattern(text: str | bytes, source: str = "<string>") -> Pattern:
    """Parse a pattern from YAML text (``source`` names it in errors); bytes
    are read as UTF-8."""
    if not isinstance(source, str):
        raise PatternError("", "a source name (str) for the pattern text", describe_value(source))
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text), source)
    if not isinstance(text, str):
        raise PatternError("", "YAML text (str or bytes)", describe_value(text), source=source)
    data, marks, source = _load_document(text, source, (_chain_key(source),), _Allowance())
    default_name = Path(source).stem if not source.startswith("<") else None
    try:
        return pattern_from_dict(data, default_name=default_name)
    except PatternError as error:
        if error.line is not None:
            raise
        line, column = _position(marks, error.key_path)
        raise error.located(source, line, column) from None


def load_pattern(path: str | os.PathLike[str]) -> Pattern:
    """Load and validate a pattern file, or a bundled pattern by name (``videonsa``)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise PatternError("", "a pattern file path or a bundled pattern name", describe_value(path))
    candidate = Path(path)
    if not candidate.is_file():
        bundled = bundled_patterns()
        name = str(path)
        if name in bundled:
            candidate = bundled[name]
        else:
            raise PatternError(
                "", f"an existing pattern file or a bundled pattern name ({', '.join(bundled)})", str(path),
                source=str(path), hint=did_you_mean(Path(name).stem, bundled),
            )
    try:
        text = _read_pattern_file(candidate)
    except OSError as error:
        raise PatternError("", "a readable pattern file", str(error), source=str(path)) from None
    return loads_pattern(text, str(candidate))


def dump_pattern(pattern: Pattern) -> str:
    """The canonical YAML text of a pattern (``loads_pattern`` reads it back equal)."""
    return yaml.safe_dump(pattern.to_dict(), sort_keys=False, default_flow_style=None)
