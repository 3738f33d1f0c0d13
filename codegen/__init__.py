"""Code generation: one stand-alone Python module per pattern.

:func:`render_module` fills ``templates/module.py.tmpl`` (``string.Template``,
no template engine needed) with the pattern (embedded as canonical YAML and
rebuilt with :func:`nsaflex.loads_pattern` at import), the plan as data, the
budget figures as constants, and an ``attention(q, k, v, gates=None,
token_types=None)`` that calls :func:`nsaflex.compile` lazily, on first use.
:func:`emit_module` writes it to a directory (``nsaflex compile --emit DIR``).

The generated module imports on its own wherever nsaflex is installed: it
does not read the pattern file it came from.
"""

from __future__ import annotations

import ast
import json
import keyword
import pprint
import re
import string
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from nsaflex.errors import PatternError
from nsaflex.loader import dump_pattern
from nsaflex.spec import Pattern

__all__ = ["DEFAULT_LENGTHS", "MAX_MODULE_NAME", "REQUIRED_MODULES", "emit_module", "module_name", "render_module", "template"]

TEMPLATE_NAME = "module.py.tmpl"
DEFAULT_LENGTHS: tuple[int, ...] = (8192, 32768, 131072)
#: Longest module name :func:`emit_module` writes (file names stop at 255 bytes).
MAX_MODULE_NAME = 100
#: Top-level modules an emitted file must not be named after: from its folder
#: it would be imported in their place (the module itself imports nsaflex,
#: which imports these).
REQUIRED_MODULES = frozenset({"nsaflex", "torch", "triton", "sympy", "transformers", "rich", "click", "yaml"})


def template(name: str = TEMPLATE_NAME) -> string.Template:
    """A template shipped in ``nsaflex.codegen/templates``."""
    text = resources.files(__name__).joinpath("templates", name).read_text(encoding="utf-8")
    return string.Template(text)


def module_name(pattern: Pattern, layer: int | None = None) -> str:
    """A valid Python module name for the pattern: ``videonsa-w512`` -> ``videonsa_w512``."""
    name = re.sub(r"\W", "_", pattern.name, flags=re.ASCII).strip("_") or "pattern"
    if name[0].isdigit() or keyword.iskeyword(name):
        name = f"nsa_{name}"
    if layer is not None:
        name += f"_layer{layer}"
    return name


def _emitted_module_name(pattern: Pattern, layer: int | None) -> str:
    """:func:`module_name`, refused (PatternError on ``name``) when too long for
    a file name or when the file would shadow a module it needs."""
    name = module_name(pattern, layer)
    if len(name) > MAX_MODULE_NAME:
        raise PatternError(
            "name", f"a name giving a module name of at most {MAX_MODULE_NAME} characters (for --emit)",
            f"{len(name)} characters: {name[:40]}...",
        )
    if name in REQUIRED_MODULES or name in sys.stdlib_module_names:
        owner = "nsaflex needs" if name in REQUIRED_MODULES else "of the standard library"
        raise PatternError(
            "name", f"a name whose module {name}.py does not shadow the module {name!r} {owner} (rename the pattern)",
            pattern.name,
        )
    return name


def _text_literal(text: str) -> str:
    """A Python literal for ``text``: a readable raw triple-quoted block where safe."""
    safe = (
        "'''" not in text
        and not text.endswith("\\")
        and not text.endswith("'")
        and all(ch == "\n" or (ch.isprintable() and ch.isascii()) for ch in text)
    )
    if safe:
        return "r'''\n" + text + "'''"
    return repr(text)


def _docstring_safe(text: str) -> str:
    """``text`` made safe inside a triple-quoted docstring, on one line."""
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text.replace("\\", "/").replace('"""', "'''")


def _plain(value: Any) -> Any:
    """Plain JSON-like data (dicts, lists, str, numbers, bools, None)."""
    return json.loads(json.dumps(value, default=str, allow_nan=True))


def _literal(value: Any, *, indent: int = 0) -> str:
    """A Python literal for plain data, checked to evaluate back to the same value."""
    text = pprint.pformat(value, indent=1, width=100 - indent, sort_dicts=False)
    if ast.literal_eval(text) != value:  # pragma: no cover - plain data round-trips
        raise ValueError(f"cannot embed {value!r} as a Python literal")
    return text


def render_module(
    pattern: Pattern,
    *,
    backend: str = "auto",
    device: str = "cpu",
    layer: int | None = None,
    lengths: Iterable[int] = DEFAULT_LENGTHS,
    plan: Any = None,
    command_args: str = "",
) -> str:
    """The source text of the generated module.

    ``plan``: a :class:`nsaflex.plan.Plan` (made with
    ``make_plan(pattern, backend, device, layer=layer)`` when not given);
    ``lengths``: where the budget figures are evaluated.
    """
    from nsaflex import __version__
    from nsaflex.budget import analyse

    if plan is None:
        from nsaflex.plan import make_plan

        plan = make_plan(pattern, backend, device, layer=layer)
    plan_dict = _plain(plan.to_dict() if hasattr(plan, "to_dict") else plan)
    lengths = tuple(sorted(set(int(n) for n in lengths)))
    analysis = analyse(pattern, layer=layer)
    figures = {n: analysis.evaluate(n).to_dict() for n in lengths}
    keys = analysis.keys_per_query
    keys_literal = str(int(keys)) if getattr(keys, "is_Integer", False) or isinstance(keys, int) else "None"

    title = f"nsaflex attention for pattern {pattern.name!r}"
    if layer is not None:
        title += f", decoder layer {layer}"
    if pattern.description:
        title += f": {pattern.description}"
    title = _docstring_safe(title)
    hybrid_note = ""
    if pattern.hybrid is not None:
        hybrid_note = "\n\nBudget figures are for all-vision input (every query through the sparse branches)."
    values = {
        "title": title,
        "command_args": _docstring_safe(command_args),
        "version": __version__,
        "hybrid_note": hybrid_note,
        "plan_backend": plan_dict.get("backend", backend) if isinstance(plan_dict, dict) else backend,
        "plan_device": plan_dict.get("device", device) if isinstance(plan_dict, dict) else device,
        "version_literal": repr(__version__),
        "name_literal": repr(pattern.name),
        "backend_literal": repr(backend),
        "layer_literal": repr(layer),
        "pattern_yaml": _text_literal(dump_pattern(pattern)),
        "source_literal": repr(f"<nsaflex generated: {pattern.name}>"),
        "plan": _literal(plan_dict),
        "keys_per_query": keys_literal,
        "lengths": _literal(lengths),
        "fractions": _literal({n: figures[n]["attended_fraction"] for n in lengths}),
        "budget": _literal(figures),
    }
    source = template().substitute(values)
    compile(source, f"<{module_name(pattern, layer)}>", "exec")  # a syntax error here is a bug
    return source


def emit_module(
    pattern: Pattern,
    directory: str | Path,
    *,
    backend: str = "auto",
    device: str = "cpu",
    layer: int | None = None,
    lengths: Iterable[int] = DEFAULT_LENGTHS,
    plan: Any = None,
    command_args: str = "",
) -> Path:
    """Write the generated module into ``directory`` (created if missing); its path.

    Raises PatternError when the pattern's name gives no usable module name
    (see :func:`_emitted_module_name`); nothing is written then.
    """
    directory = Path(directory)
    path = directory / f"{_emitted_module_name(pattern, layer)}.py"
    source = render_module(
        pattern, backend=backend, device=device, layer=layer, lengths=lengths, plan=plan, command_args=command_args
    )
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")
    return path
