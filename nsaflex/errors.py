"""The project's error types.

Every bad input a user can give nsaflex (a pattern, a tensor, a command-line
option) is refused with a subclass of :class:`NsaflexError` whose message names
what was wrong: where it was (file, line, column, key path or argument), what
was expected and what was found.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class NsaflexError(Exception):
    """Base class of every error nsaflex raises on purpose."""


class PatternError(NsaflexError, ValueError):
    """An invalid pattern, from YAML or from the Python API.

    Attributes:
        key_path: the dotted path of the offending key, e.g. ``selection.count``
            (``""`` for the document itself).
        expected: what a valid value looks like.
        found: what was given.
        source: the file name, when the pattern came from a file.
        line, column: 1-based position in ``source`` (``None`` when unknown).
        hint: an extra sentence, e.g. a did-you-mean suggestion.
    """

    def __init__(
        self,
        key_path: str,
        expected: str,
        found: object,
        *,
        source: str | None = None,
        line: int | None = None,
        column: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.key_path = key_path
        self.expected = expected
        self.found = found
        self.source = source
        self.line = line
        self.column = column
        self.hint = hint
        super().__init__(self._format())

    def located(self, source: str | None, line: int | None, column: int | None) -> "PatternError":
        """A copy of this error that carries a file position."""
        return PatternError(
            self.key_path,
            self.expected,
            self.found,
            source=source,
            line=line,
            column=column,
            hint=self.hint,
        )

    @property
    def location(self) -> str:
        parts = [self.source or "<pattern>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def _format(self) -> str:
        where = self.location
        key = self.key_path or "<document>"
        found = self.found if isinstance(self.found, str) else repr(self.found)
        message = f"{where}: {key}: expected {self.expected}, found {found}"
        if self.hint:
            message += f" ({self.hint})"
        return message


class InputError(NsaflexError, ValueError):
    """A tensor or argument a compiled attention cannot take.

    The message names the argument, what was expected and what was found.
    """

    def __init__(self, argument: str, expected: str, found: object) -> None:
        self.argument = argument
        self.expected = expected
        self.found = found
        found_text = found if isinstance(found, str) else repr(found)
        super().__init__(f"{argument}: expected {expected}, found {found_text}")


class BackendUnavailable(NsaflexError, RuntimeError):
    """A backend that cannot serve a pattern or input on this machine."""


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean ...?' hint for a misspelt key, or None."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {matches[0]!r}?" if matches else None


def describe_value(value: object) -> str:
    """A found value for a message, with its type: ``'16' (str)``."""
    return f"{value!r} ({type(value).__name__})"


def one_of(choices: Sequence[str]) -> str:
    """'one of a, b, c' for an expected-value text."""
    return "one of " + ", ".join(repr(c) for c in choices)
