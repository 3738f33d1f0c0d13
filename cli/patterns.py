"""``nsaflex patterns``: the bundled patterns and their budgets."""

from __future__ import annotations

import click
from rich import box
from rich.table import Table

from nsaflex.cli.common import (
    JSON_STDOUT,
    check_json_target,
    format_fraction,
    format_length,
    human_console,
    json_option,
    write_json,
)
from nsaflex.cli.show import parse_length_option
from nsaflex.show import pattern_summaries

__all__ = ["command"]

DEFAULT_AT = 131072


@click.command("patterns")
@click.option("--at", "length", callback=parse_length_option, default=str(DEFAULT_AT), metavar="L",
              help="Length of the attended fraction (default 128k).")
@json_option("the list")
def command(length: int, json_target: str | None) -> None:
    """List the bundled patterns (usable by name wherever a PATTERN is asked
    for) with their branches, keys per query K_attn = l'n + w and attended
    fraction (hybrid patterns: all-vision input)."""
    check_json_target(json_target)
    summaries = pattern_summaries(length)
    console = human_console(json_target)
    if json_target == JSON_STDOUT:
        write_json(summaries, json_target, console)
        return
    table = Table(title=f"bundled patterns (attended fraction at L = {format_length(length)})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True)
    table.add_column("branches", no_wrap=True)
    table.add_column("K_attn", justify="right")
    table.add_column(f"at {format_length(length)}", justify="right")
    table.add_column("description")
    short = {"compression": "cmp", "selection": "slc", "window": "win"}
    for entry in summaries:
        branches = "+".join(short[b] for b in entry["branches"]) + (" *" if entry["hybrid"] else "")
        table.add_row(entry["name"], branches, f"{entry['keys_per_query']:,}",
                      format_fraction(entry["attended_fraction"]), entry["description"])
    console.print(table)
    console.print("cmp = compression, slc = selection, win = window")
    console.print("* hybrid: text queries attend densely; the fraction is for all-vision input")
    if json_target is not None:
        write_json(summaries, json_target, console)
