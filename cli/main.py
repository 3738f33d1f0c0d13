"""``nsaflex``: the command line.

``main`` is a click group. Subcommands live in their own modules of
``nsaflex.cli`` (the ``cli/`` folder) and are registered from
:data:`COMMAND_MODULES`: a module ``nsaflex.cli.NAME`` exposes a click command
as ``command`` (or under its own ``NAME``). A module that does not exist yet is
skipped, so the hook for ``nsaflex bench`` is already here: add ``cli/bench.py``
defining ``command = click.Command("bench", ...)`` (or ``@click.command("bench")
def bench(...)``) and it appears as ``nsaflex bench``.

Errors: any :class:`~nsaflex.errors.NsaflexError` a subcommand raises (a
:class:`~nsaflex.errors.PatternError` carries file:line:column, key path,
expected and found) is printed in red without a traceback and the command
exits with status 2, like click's own usage errors. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from nsaflex import __version__
from nsaflex.cli.common import report_error
from nsaflex.errors import NsaflexError

__all__ = ["COMMAND_MODULES", "EXIT_USAGE", "NsaflexGroup", "main", "register_commands"]

#: Modules of ``nsaflex.cli`` whose command is added to ``main``, in help order.
COMMAND_MODULES: tuple[str, ...] = ("compile", "bench", "show", "patterns", "inspect")
#: Exit status of bad input: usage errors and every NsaflexError.
EXIT_USAGE = 2


class NsaflexGroup(click.Group):
    """A click group that turns NsaflexError into a red message and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NsaflexError as error:
            report_error(error)
            ctx.exit(EXIT_USAGE)


@click.group(cls=NsaflexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nsaflex")
def main() -> None:
    """nsaflex: compile Native Sparse Attention patterns.

    PATTERN arguments are YAML files or bundled pattern names (videonsa, nsa,
    window, ...). Lengths take 8k, 128k or 131072 (k = 1024).
    """


def register_commands(group: click.Group, modules: tuple[str, ...] = COMMAND_MODULES) -> None:
    """Add the command of each existing ``nsaflex.cli.<module>`` to ``group``."""
    for name in modules:
        qualified = f"{__package__}.{name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as error:
            if error.name == qualified:
                continue  # not written yet (e.g. bench): nothing to register
            raise
        command = getattr(module, "command", None) or getattr(module, name, None)
        if not isinstance(command, click.Command):
            raise TypeError(f"{qualified} must define a click command named 'command' or {name!r}")
        group.add_command(command)


register_commands(main)


if __name__ == "__main__":  # pragma: no cover
    main()
