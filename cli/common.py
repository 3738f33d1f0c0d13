"""Helpers shared by the ``nsaflex`` subcommands: length options, pattern
arguments, consoles, number formatting and error reporting."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, TypeVar

import click
import torch
from rich.console import Console
from rich.markup import escape

from nsaflex.bench import check_writable
from nsaflex.errors import InputError, NsaflexError
from nsaflex.loader import bundled_patterns, load_pattern
from nsaflex.spec import Pattern

__all__ = [
    "DTYPE",
    "DTYPE_NAMES",
    "DtypeType",
    "FOLDER",
    "FolderType",
    "JSON_STDOUT",
    "LENGTHS",
    "LengthsType",
    "check_json_target",
    "err_console",
    "format_count",
    "format_fraction",
    "format_quantity",
    "format_length",
    "human_console",
    "json_option",
    "load_pattern_arg",
    "out_console",
    "parse_length",
    "parse_lengths",
    "printable",
    "report_error",
    "write_json",
]

_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)([km]?)$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 1024, "m": 1024 * 1024}
LENGTH_FORMS = "lengths like 8k, 128k or 131072 (k = 1024, m = 1024k), separated by commas"


def parse_length(text: str) -> int:
    """``'8k'`` -> 8192, ``'128K'`` -> 131072, ``'131072'``, ``'1_000'``, ``'1.5k'`` -> 1536.

    Raises ValueError naming what was wrong.
    """
    cleaned = text.strip().replace("_", "")
    match = _LENGTH.match(cleaned)
    if not match:
        raise ValueError(f"expected {LENGTH_FORMS}; found {text.strip()!r}")
    number, suffix = match.groups()
    value = float(number) * _SUFFIX[suffix.lower()] if "." in number else int(number) * _SUFFIX[suffix.lower()]
    if value != int(value):
        raise ValueError(f"expected a whole number of tokens; found {text.strip()!r} = {value:g}")
    if int(value) < 1:
        raise ValueError(f"expected a length of at least 1 token; found {text.strip()!r}")
    return int(value)


def parse_lengths(text: str) -> tuple[int, ...]:
    """A comma-separated list of lengths, sorted, without repeats."""
    parts = [part for part in text.split(",")]
    if not text.strip() or any(not part.strip() for part in parts):
        raise ValueError(f"expected {LENGTH_FORMS}; found {text!r}")
    return tuple(sorted({parse_length(part) for part in parts}))


class LengthsType(click.ParamType):
    """A click type for ``--at 8k,128k``: a sorted tuple of lengths."""

    name = "lengths"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_lengths(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


LENGTHS = LengthsType()


class FolderType(click.Path):
    """A folder to write into (``--emit DIR``): an existing or new directory,
    not a file. Refuses, as a usage error, what click's Path lets through to a
    traceback or to a surprise: a NUL byte (no path can hold one) and the empty
    string (which would mean the current folder)."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, dir_okay=True, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = value if isinstance(value, str) else str(value)
        if not text:
            self.fail("expected a folder path; found an empty string", param, ctx)
        if "\x00" in text:
            self.fail(f"expected a folder path; found {text!r}, which holds a NUL byte", param, ctx)
        return super().convert(value, param, ctx)


FOLDER = FolderType()


#: torch's name of each floating dtype the command line takes, by every name it
#: accepts: torch's own spelling (``torch.bfloat16`` is ``bfloat16``) and the short one.
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


class DtypeType(click.ParamType):
    """A click type for ``--dtype``: ``bfloat16`` or ``bf16``, ``float16`` or
    ``fp16``, ``float32`` or ``fp32`` (any case, ``torch.`` prefix allowed);
    converts to the ``torch.dtype``."""

    name = "dtype"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(DTYPE_NAMES) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, torch.dtype):
            return value
        text = str(value).strip().lower().removeprefix("torch.")
        if text not in DTYPE_NAMES:
            accepted = ", ".join(f"{name} ({short})" for name, short in (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32")))
            self.fail(f"expected one of {accepted}; found {value!r}", param, ctx)
        return getattr(torch, DTYPE_NAMES[text])


DTYPE = DtypeType()


def out_console() -> Console:
    """Rich console on the current stdout (looked up at call time: click's test
    runner swaps the streams)."""
    return Console(highlight=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


# --- --json: the same option in every subcommand ------------------------------------------------

#: ``--json`` alone or ``--json -``: the JSON document goes to standard output.
JSON_STDOUT = "-"
_Command = TypeVar("_Command", bound=Callable[..., Any])


def _json_target(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value == JSON_STDOUT:
        return value
    if not value or "\x00" in value:
        raise click.BadParameter(f"expected a file path or '-' (standard output); found {value!r}", ctx, param)
    return value


def json_option(what: str) -> Callable[[_Command], _Command]:
    """The ``--json [FILE|-]`` option of every subcommand, as ``json_target``:
    write ``what`` as JSON to FILE, or to standard output for ``-`` (the
    default when ``--json`` comes without a value). Subcommands check FILE
    with :func:`check_json_target` before their work and write with
    :func:`write_json`."""
    return click.option(
        "--json",
        "json_target",
        is_flag=False,
        flag_value=JSON_STDOUT,
        default=None,
        metavar="[FILE|-]",
        callback=_json_target,
        help=f"Write {what} as JSON to FILE; '-' (or --json alone): to standard output, which then carries "
        "nothing else.",
    )


def check_json_target(target: str | None) -> None:
    """Refuse a ``--json`` FILE that cannot be written (InputError naming
    ``--json``) before any work whose result it would lose."""
    if target is not None and target != JSON_STDOUT:
        check_writable(target, "--json")


def human_console(json_target: str | None) -> Console:
    """Where a subcommand's tables and messages go: standard output, or
    standard error when the JSON document takes standard output."""
    return err_console() if json_target == JSON_STDOUT else out_console()


def write_json(document: Any, target: str, console: Console) -> None:
    """Write ``document`` as JSON to the file ``target`` (and say so on
    ``console``), or to standard output for ``-``. Values JSON has no type
    for (sympy expressions, paths) are written as their ``str``."""
    text = json.dumps(document, indent=1, default=str)
    if target == JSON_STDOUT:
        click.echo(text)
        return
    try:
        Path(target).write_text(text + "\n")
    except OSError as error:
        raise InputError("--json", "a file that can be written", f"{target} ({error.strerror})") from None
    console.print(f"wrote {printable(target)}", soft_wrap=True, markup=False)  # a path is neither cut nor markup


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """``str(text)`` safe to print on a terminal: lone surrogates written as
    ``\\udcff`` and control characters other than newline and tab as
    ``\\x1b``. A path given in bytes that are not UTF-8 arrives with such
    surrogates, which a UTF-8 stream refuses to write; a pattern's name,
    description or keys may hold escape sequences (YAML's ``"\\e[2J"``) that
    would drive the terminal."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def report_error(error: NsaflexError) -> None:
    """Print an nsaflex error in red, without a traceback. For a
    :class:`~nsaflex.errors.PatternError` the message carries
    ``file:line:column: key.path: expected ..., found ...``."""
    err_console().print(f"[bold red]error:[/] [red]{escape(printable(error))}[/]")


def load_pattern_arg(value: str) -> tuple[Pattern, Path]:
    """A PATTERN argument: a file path or a bundled pattern name. Returns the
    pattern and the file it came from (raises PatternError)."""
    pattern = load_pattern(value)
    path = Path(value)
    if not path.is_file():
        path = bundled_patterns()[value]
    return pattern, path


# --- formatting -----------------------------------------------------------------------------------

_SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def format_length(length: int) -> str:
    """131072 -> '128k' (k = 1024), 1000 -> '1000'."""
    for size, suffix in ((1024 * 1024, "m"), (1024, "k")):
        if length >= size and length % size == 0:
            return f"{length // size}{suffix}"
    return str(length)


def format_count(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return format_quantity(value)


def format_fraction(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.3g}%"


def format_quantity(value: Any, unit: str = "") -> str:
    """A number with an SI prefix (``6.16 TFLOP``); a symbolic value as its
    expression with 4 significant digits (``2.933e+9*D*H FLOP``)."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        magnitude = abs(value)
        for size, prefix in _SI:
            if magnitude >= size:
                return f"{value / size:.3g} {prefix}{unit}".rstrip()
        text = f"{value:,}" if isinstance(value, int) else f"{value:.3g}"
        return f"{text} {unit}".rstrip()
    try:
        text = str(value.evalf(4)).replace("*", "·")
    except AttributeError:
        text = str(value)
    return f"{text} {unit}".rstrip()
