"""``nsaflex show PATTERN``: pictures of which keys the queries attend, and the budget plot.

Examples::

    nsaflex show window --length 2k                      # the terminal picture
    nsaflex show videonsa --inputs video --out pictures/ # also PNGs: masks and budget
    nsaflex show my.yaml --tensors qkv.pt --head 3 --json -

See :mod:`nsaflex.show` for what each panel shows.
"""

from __future__ import annotations

from pathlib import Path

import click

from nsaflex.cli.common import (
    check_json_target,
    format_length,
    human_console,
    json_option,
    load_pattern_arg,
    parse_length,
    write_json,
)
from nsaflex.errors import InputError
from nsaflex.show import (
    DEFAULT_LENGTH,
    INPUT_KINDS,
    MAX_LENGTH,
    attended_masks,
    load_inputs,
    mask_counts,
    plot_budget,
    plot_masks,
    pyplot,
    terminal_picture,
)

__all__ = ["command", "parse_length_option", "write_json"]

# Library argument names and the options that set them, for error messages.
_OPTION_OF = {"length": "--length", "layer": "--layer", "head": "--head", "row": "--row",
              "text_tokens": "--text-tokens", "tensors": "--tensors", "inputs": "--inputs"}


def parse_length_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--length 4k`` -> 4096 (click callback; a bad length is a usage error)."""
    if value is None:
        return None
    try:
        return parse_length(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None


def _output_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise InputError("--out", "a folder (made when missing)", f"{out}, a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError("--out", "a folder that can be made", f"{out} ({error.strerror})") from None
    return out


@click.command("show")
@click.argument("pattern_arg", metavar="PATTERN")
@click.option("--length", callback=parse_length_option, default=None, metavar="L",
              help=f"Sequence length, e.g. 2k or 2048 (default {format_length(DEFAULT_LENGTH)}, at most "
              f"{format_length(MAX_LENGTH)}; with --tensors, theirs).")
@click.option("--layer", type=click.IntRange(min=0), default=None, metavar="N",
              help="Apply the pattern's per-layer override for decoder layer N.")
@click.option("--inputs", type=click.Choice(INPUT_KINDS), default=None,
              help="Generated inputs: random (i.i.d. normal; the default) or video (frame-structured).")
@click.option("--tensors", "tensors_path", default=None, metavar="FILE",
              help="Use saved tensors instead: torch.save({'q': q, 'k': k, 'v': v, 'token_types': t}, FILE), "
              "q [B, Hq, L, D], k and v [B, Hkv, L, D], token_types [B, L] for hybrid patterns.")
@click.option("--head", type=int, default=0, show_default=True, help="Query head drawn (selection depends on it).")
@click.option("--row", type=int, default=0, show_default=True, help="Batch row drawn.")
@click.option("--text-tokens", type=int, default=None, metavar="N",
              help="Hybrid patterns, generated inputs: N leading text tokens (default L/8).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated inputs.")
@click.option("--out", "out_dir", type=click.Path(file_okay=True, path_type=Path), default=None, metavar="DIR",
              help="Write PNGs into DIR: the masks and the budget against length.")
@click.option("--terminal/--no-terminal", default=None,
              help="Draw the masks in the terminal (default: on, unless --json -).")
@json_option("the per-branch counts")
def command(
    pattern_arg: str,
    length: int | None,
    layer: int | None,
    inputs: str | None,
    tensors_path: str | None,
    head: int,
    row: int,
    text_tokens: int | None,
    seed: int,
    out_dir: Path | None,
    terminal: bool | None,
    json_target: str | None,
) -> None:
    """Draw which keys PATTERN's queries attend, per branch and combined
    (query rows down, key columns across), and with --out its budget against length."""
    pattern, _ = load_pattern_arg(pattern_arg)
    # Human output goes to stderr when the JSON takes stdout.
    console = human_console(json_target)
    if tensors_path is not None and inputs is not None:
        raise InputError("--inputs", "no --inputs with --tensors (the tensors are the inputs)", inputs)
    if out_dir is not None:
        pyplot()  # a missing matplotlib is reported before the work
        out_dir = _output_dir(out_dir)
    check_json_target(json_target)  # after --out, which may make its folder
    try:
        given = load_inputs(tensors_path) if tensors_path is not None else (inputs or "random")
        masks = attended_masks(pattern, length, layer=layer, inputs=given, head=head, row=row,
                               text_tokens=text_tokens, seed=seed)
    except InputError as error:
        raise InputError(_OPTION_OF.get(error.argument, error.argument), error.expected, error.found) from None
    length = next(iter(masks.values())).shape[0]
    source = tensors_path or inputs or "random"
    layer_text = f", layer {layer}" if layer is not None else ""
    title = f"{pattern.name}{layer_text}, L = {length}, head {head}, {source} inputs"

    files: list[str] = []
    if out_dir is not None:
        stem = f"{pattern.name}" + (f"-layer{layer}" if layer is not None else "") + f"-L{length}"
        masks_png, budget_png = out_dir / f"{stem}-masks.png", out_dir / f"{pattern.name}-budget.png"
        resolved = pattern.for_layer(layer) if layer is not None else pattern
        plot_masks(masks, masks_png, pattern=resolved, title=title)
        plot_budget(pattern, budget_png, layer=layer, mark=length)
        files = [str(masks_png), str(budget_png)]
        pyplot().close("all")

    if terminal if terminal is not None else json_target != "-":
        console.print(title, style="bold")
        console.print(terminal_picture(masks, width=min(console.width, 80)))
    for name in files:
        console.print(f"wrote {name}")
    if json_target is not None:
        document = {
            "pattern": pattern.name,
            "layer": layer,
            "length": length,
            "inputs": source,
            "head": head,
            "row": row,
            "branches": mask_counts(masks),
            "counting": "pairs: (query, key) pairs attended (a compressed token counts the keys it pools); "
            "keys_per_query: pairs / L; attended_fraction: pairs / (L (L + 1) / 2)",
            "files": files,
        }
        write_json(document, json_target, console)
