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

from nsaflex.errors import PatternError, did_you_mean
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


def bundled_patterns() -> dict[str, Path]:
    """Bundled pattern names (file stem) and their paths."""
    return {path.stem: path for path in sorted(BUNDLED_DIR.glob("*.yaml"))}


# -- YAML with positions -------------------------------------------------------
def _join(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _construct(node: yaml.Node, path: str, marks: Marks, source: str) -> Any:
    """Plain Python data from a composed YAML node, recording each node's position."""
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise PatternError(
                    path, "string keys", repr(key), source=source,
                    line=key_node.start_mark.line + 1, column=key_node.start_mark.column + 1,
                )
            child = _join(path, key)
            if key in out:
                raise PatternError(
                    child, "each key once", "a repeated key", source=source,
                    line=key_node.start_mark.line + 1, column=key_node.start_mark.column + 1,
                )
            out[key] = _construct(value_node, child, marks, source)
            # Point errors about a key at the key itself: that is where the eye goes.
            marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, _join(path, i), marks, source) for i, item in enumerate(node.value)]
    return _scalar(node)


_SCALARS = yaml.SafeLoader("")


def _scalar(node: yaml.Node) -> Any:
    return _SCALARS.construct_object(node, deep=True)


def _compose(text: str, source: str) -> tuple[Any, Marks]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = (error.problem or "invalid YAML").strip()
        raise PatternError(
            "", "valid YAML", problem, source=source,
            line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
        ) from None
    except yaml.YAMLError as error:
        raise PatternError("", "valid YAML", str(error).strip(), source=source) from None
    marks: Marks = {}
    if node is None:
        raise PatternError("", "a mapping of pattern sections", "an empty document", source=source, line=1, column=1)
    data = _construct(node, "", marks, source)
    return data, marks


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
        if candidate.is_file():
            return candidate.resolve()
    raise PatternError(
        "extends",
        f"a pattern file (relative to {here}) or a bundled pattern name ({', '.join(bundled)})",
        target,
        hint=did_you_mean(target, bundled),
    )


def _load_document(text: str, source: str, chain: tuple[str, ...]) -> tuple[dict[str, Any], Marks, str]:
    """The merged mapping of a document and its ``extends`` chain.

    Returns the data, the marks of the *extending* document (errors in
    inherited keys point at the ``extends`` line) and the source name.
    """
    data, marks = _compose(text, source)
    if not isinstance(data, dict):
        line, column = marks.get("", (None, None))
        raise PatternError("", "a mapping of pattern sections", type(data).__name__, source=source, line=line, column=column)
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
    parent, _, _ = _load_document(parent_path.read_text(), str(parent_path), (*chain, str(parent_path)))
    parent.pop("name", None)  # the child is a new pattern; an unnamed child gets its file's name
    parent.pop("description", None)
    merged = _deep_merge(parent, data)
    # Keys only the parent had point at the child's extends line.
    for key in merged:
        marks.setdefault(key, (line, column) if line is not None else (1, 1))
    return merged, marks, source


# -- dict -> dataclasses ------------------------------------------------------------
def _check_keys(data: Any, allowed: tuple[str, ...], path: str, what: str) -> None:
    if not isinstance(data, dict):
        raise PatternError(path, f"a mapping ({what})", f"{data!r} ({type(data).__name__})")
    for key in data:
        if key not in allowed:
            raise PatternError(
                _join(path, key), f"a key of {what}: {', '.join(allowed)}", key,
                hint=did_you_mean(key, allowed),
            )


def _section(cls: type, data: Any, path: str) -> Any:
    names = tuple(f.name for f in dataclasses.fields(cls))
    _check_keys(data, names, path, f"'{path}'")
    kwargs = {k: tuple(v) if k in _LIST_FIELDS and isinstance(v, list) else v for k, v in data.items()}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in kwargs:
            raise PatternError(_join(path, name), f"a value for the required key {name!r}", "nothing")
    try:
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
            # A partial section changes the base pattern's section field by field.
            merged = _deep_merge(base.get(key) or {}, value)
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
    for key, value in data.items():
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], value, key)
        elif key == "layers":
            if not isinstance(value, list):
                raise PatternError("layers", "a list of layer overrides", repr(value))
            kwargs["layers"] = tuple(_override(item, f"layers[{i}]", data) for i, item in enumerate(value))
        else:
            kwargs[key] = value
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


def loads_pattern(text: str, source: str = "<string>") -> Pattern:
    """Parse a pattern from YAML text (``source`` names it in errors)."""
    data, marks, source = _load_document(text, source, (os.path.abspath(source),))
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
    candidate = Path(path)
    if not candidate.is_file():
        bundled = bundled_patterns()
        name = str(path)
        if name in bundled:
            candidate = bundled[name]
        else:
            raise PatternError(
                "", "an existing pattern file or a bundled pattern name", str(path),
                source=str(path), hint=did_you_mean(Path(name).stem, bundled),
            )
    try:
        text = candidate.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise PatternError("", "a readable UTF-8 text file", str(error), source=str(path)) from None
    return loads_pattern(text, str(candidate))


def dump_pattern(pattern: Pattern) -> str:
    """The canonical YAML text of a pattern (``loads_pattern`` reads it back equal)."""
    return yaml.safe_dump(pattern.to_dict(), sort_keys=False, default_flow_style=None)
