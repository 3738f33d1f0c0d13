"""``nsaflex compile PATTERN``: validate, lower to a plan, print the plan and budget.

PATTERN is a YAML file or a bundled pattern name. ``--at`` picks the lengths of
the budget table (default 8k, 32k, 128k and the pattern's
``budget.at_length``); ``--json FILE`` also writes the plan and budget as
JSON (``--json -`` or ``--json`` alone: to standard output, instead of the
tables); ``--emit DIR`` also writes a stand-alone Python module for the pattern
(see :mod:`nsaflex.codegen`). The plan table reads at 80 columns: one row per
kernel, mask, constants and notes of each branch, wrapped at word boundaries.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import sympy
from rich import box
from rich.table import Table
from rich.text import Text

from nsaflex.budget import BudgetAnalysis, BudgetFigures, analyse
from nsaflex.cli.common import (
    FOLDER,
    JSON_STDOUT,
    LENGTHS,
    check_json_target,
    format_count,
    format_fraction,
    format_length,
    format_quantity,
    json_option,
    load_pattern_arg,
    out_console,
    printable,
    write_json,
)
from nsaflex.codegen import DEFAULT_LENGTHS, emit_module
from nsaflex.errors import PatternError
from nsaflex.release_lowering import MODES
from nsaflex.spec import Pattern

BACKENDS = ("auto", "reference", "flex", "triton")
DEVICES = ("cpu", "cuda")


@click.command("compile")
@click.argument("pattern_arg", metavar="PATTERN")
@click.option(
    "--at",
    "lengths",
    type=LENGTHS,
    default=None,
    metavar="LENGTHS",
    help="Lengths for the budget table, e.g. 65536,131072 or 8k,128k (k = 1024). "
    "Default: 8k,32k,128k and the pattern's budget.at_length.",
)
@json_option("the plan and budget")
@click.option(
    "--emit",
    "emit_dir",
    type=FOLDER,
    default=None,
    metavar="DIR",
    help="Also write a generated Python module for the pattern into DIR.",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Backend to plan for.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help="Device to plan for.")
@click.option(
    "--layer",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Resolve the pattern's per-layer overrides for decoder layer N.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="faithful",
    show_default=True,
    help="faithful: the pattern's semantics; videonsa_release: the released VideoNSA code's numerics "
    "(a pattern such as videonsa-release).",
)
def command(
    pattern_arg: str,
    lengths: tuple[int, ...] | None,
    json_target: str | None,
    emit_dir: Path | None,
    backend: str,
    device: str,
    layer: int | None,
    mode: str,
) -> None:
    """Validate PATTERN (a YAML file or a bundled pattern name), lower it to a
    plan, and print the plan and its budget."""
    from nsaflex.plan import make_plan
    from nsaflex.runtime import decode_plan

    check_json_target(json_target)
    if emit_dir is not None and mode != "faithful":
        raise click.BadParameter(f"the generated module compiles faithful mode; for --mode {mode} call "
                                 f"nsaflex.compile(pattern, backend, mode={mode!r}) instead", param_hint="'--emit'")
    pattern, source = load_pattern_arg(pattern_arg)
    if layer is not None and pattern.model.num_layers is not None and layer >= pattern.model.num_layers:
        raise click.BadParameter(
            f"expected a layer below model.num_layers = {pattern.model.num_layers}; found {layer}",
            param_hint="'--layer'",
        )
    if lengths is None:
        lengths = tuple(sorted({*DEFAULT_LENGTHS, *([pattern.budget.at_length] if pattern.budget and pattern.budget.at_length else [])}))
    try:
        plan = make_plan(pattern, backend, device, layer=layer, mode=mode)
    except PatternError as error:
        # The pattern holds, but not for this mode: say which file.
        raise error.located(str(source), None, None) from None
    decode = decode_plan(plan)
    analysis = analyse(pattern, layer=layer)
    figures = [analysis.evaluate(n) for n in lengths]

    emitted = None
    if emit_dir is not None:
        args = f" {pattern_arg}" + (f" --backend {backend}" if backend != "auto" else "")
        args += f" --layer {layer}" if layer is not None else ""
        args += " --at " + ",".join(format_length(n) for n in lengths)
        try:
            emitted = emit_module(
                pattern, emit_dir, backend=backend, device=device, layer=layer, lengths=lengths, plan=plan, command_args=args
            )
        except PatternError as error:
            raise error.located(str(source), None, None) from None
        except OSError as error:
            # Name the path that failed (the folder, or the file in it), and exit 2 as for any bad argument.
            where = error.filename if error.filename is not None else emit_dir
            raise click.BadParameter(f"cannot write {where}: {error.strerror or error}", param_hint="'--emit'") from None

    console = out_console()
    if json_target is not None:
        payload = {
            "pattern": pattern.name,
            "source": str(source),
            "layer": layer,
            "lengths": list(lengths),
            "plan": plan.to_dict(),
            "decode": decode.to_dict(),
            "budget": {
                "closed_forms": analysis.to_dict(),
                "at": {str(f.length): f.to_dict() for f in figures},
            },
            "emitted": str(emitted) if emitted is not None else None,
        }
        if json_target == JSON_STDOUT:
            write_json(payload, json_target, console)
            return

    resolved = pattern.for_layer(layer) if layer is not None else pattern
    console.print(_header(pattern, resolved, source, layer))
    console.print(_plan_table(plan, decode))
    if getattr(plan, "layers", ()):
        console.print(_layers_table(plan))
    console.print(_budget_table(analysis, figures))
    console.print(_closed_forms(analysis))
    for line in analysis.describe():
        console.print(Text(f"  {line}", style="dim"))
    if emitted is not None:
        console.print(Text.assemble(("wrote ", "green"), printable(emitted)))
    if json_target is not None:
        write_json(payload, json_target, console)


# --- rendering ------------------------------------------------------------------------------------


def _header(pattern: Pattern, resolved: Pattern, source: Path, layer: int | None) -> Text:
    text = Text()
    text.append("pattern ", style="bold")
    text.append(printable(pattern.name), style="bold cyan")
    if layer is not None:
        text.append(f" (layer {layer})", style="bold")
    text.append(f"  {printable(source)}\n", style="dim")
    if pattern.description:
        text.append(f"  {printable(pattern.description)}\n")
    if resolved.dense:
        text.append("  dense causal attention in this layer\n")
    else:
        parts = []
        if resolved.compression is not None:
            c = resolved.compression
            parts.append(f"compression l={c.block} d={c.stride} {c.pooling} ({c.visibility})")
        if resolved.selection is not None:
            s = resolved.selection
            tile = f" m={s.query_block}" if s.query_block else ""
            forced = ",".join(s.forced) or "none"
            parts.append(f"selection l'={s.block} n={s.count} forced={forced} {s.granularity}{tile} ({s.scoring})")
        if resolved.window is not None:
            parts.append(f"window w={resolved.window.size}")
        text.append("  branches: " + "; ".join(parts) + "\n")
        text.append(f"  gate: {resolved.gate.kind}")
        if resolved.hybrid is not None:
            text.append(f"; hybrid: text queries dense, vision keys = {resolved.hybrid.vision_keys}")
        text.append("\n")
    model = pattern.model
    if any(v is not None for v in (model.query_heads, model.kv_heads, model.head_dim)):
        text.append(f"  model: Hq={model.query_heads} Hkv={model.kv_heads} D={model.head_dim}")
        if model.num_layers is not None:
            text.append(f", {model.num_layers} layers")
        text.append("\n")
    if pattern.layers and layer is None:
        text.append(f"  per-layer overrides: {len(pattern.layers)} (see --layer N)\n")
    return text


def _constants(constants: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value) or "-"
        return str(value)

    return " ".join(f"{k}={show(v)}" for k, v in constants.items())


def _plan_table(plan: Any, decode: Any = None) -> Table:
    """One block of rows per branch (kernel, mask, constants, notes), then the
    decode entry's, the values in one wide column: at 80 columns the values get
    56 characters and wrap between words, where five side-by-side columns would
    split words."""
    title = f"plan: backend {plan.backend} on {plan.device}" + (f", mode {plan.mode}" if plan.mode != "faithful" else "")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("branch", no_wrap=True, style="bold")
    table.add_column("", no_wrap=True, style="dim")
    table.add_column("plan", overflow="fold")
    for branch in (*plan.branches, *([decode] if decode is not None else [])):
        kernel = branch.kernel + (f" ({branch.backend} backend)" if branch.backend != plan.backend else "")
        fields = [("kernel", kernel), ("mask", branch.mask), ("constants", _constants(dict(branch.constants))),
                  *(("notes" if i == 0 else "", f"- {note}") for i, note in enumerate(branch.notes))]
        fields = [(label, value) for label, value in fields if value]
        for i, (label, value) in enumerate(fields):
            # Text, not markup: kernels and masks hold brackets ("[B, H, L, L]").
            table.add_row(Text(branch.branch if i == 0 else ""), Text(label), Text(value), end_section=i == len(fields) - 1)
    captions = []
    if not getattr(plan, "deterministic", True):
        captions.append("gradients: not bit-reproducible (atomic accumulation where the backend has it)")
    options = getattr(plan, "options", None)
    if options is not None:
        captions.append("options: " + ", ".join(f"{name} {value}" for name, value in dataclasses.asdict(options).items()))
    reasons = getattr(plan, "reasons", ())
    if reasons:
        captions.append("passed over: " + "; ".join(f"{name}: {why}" for name, why in reasons))
    if captions:
        table.caption = "\n".join(captions)
        table.caption_justify = "left"
    return table


def _layers_table(plan: Any) -> Table:
    table = Table(title="per-layer overrides", title_justify="left")
    table.add_column("layers")
    table.add_column("backend")
    table.add_column("branches")
    for at, sub in plan.layers:
        names = ", ".join(b.branch for b in sub.branches)
        table.add_row(",".join(str(i) for i in at), sub.backend, names)
    return table


def _budget_table(analysis: BudgetAnalysis, figures: list[BudgetFigures]) -> Table:
    note = " (all-vision input)" if analysis.is_hybrid else ""
    table = Table(title=f"budget per batch row{note}", title_justify="left")
    table.add_column("quantity")
    for f in figures:
        # fold, not an ellipsis: a symbolic figure (no model section) may not fit its column
        table.add_column(f"L = {format_length(f.length)}", justify="right", overflow="fold")

    def row(label: str, values: list[str], style: str | None = None) -> None:
        table.add_row(label, *values, style=style)

    row("keys per query K_attn", [format_count(f.keys_per_query) for f in figures])
    if "compression" in analysis.branches:
        row("  + compressed tokens", [format_count(f.keys_per_query_with_compression) for f in figures])
    for branch in analysis.branches:
        row(f"pairs per head: {branch}", [format_count(f.pairs[branch]) for f in figures])
    row("dense causal pairs", [format_count(f.dense_pairs) for f in figures])
    row("attended fraction", [format_fraction(f.attended_fraction) for f in figures], "bold")
    row("gamma = 2K/(L-1)", [format_fraction(min(f.gamma, 1.0)) if f.gamma is not None else "-" for f in figures])
    if "compression" in analysis.branches:
        row("  with compressed tokens", [format_fraction(f.attended_fraction_with_compression) for f in figures])
    for branch in analysis.branches:
        row(f"fwd FLOPs: {branch}", [format_quantity(f.flops_forward[branch], "FLOP") for f in figures])
    row("fwd FLOPs: total", [format_quantity(f.flops_forward_total, "FLOP") for f in figures], "bold")
    row("fwd FLOPs: dense", [format_quantity(f.dense_flops_forward, "FLOP") for f in figures])
    row("bwd FLOPs: total (2.5x)", [format_quantity(f.flops_backward_total, "FLOP") for f in figures])
    row("bwd FLOPs: dense", [format_quantity(f.dense_flops_backward, "FLOP") for f in figures])
    row("FLOPs sparse/dense", [format_fraction(_float(f.flops_ratio)) for f in figures], "bold")
    for branch in analysis.branches:
        row(f"bytes: {branch}", [format_quantity(f.bytes_moved[branch], "B") for f in figures])
    row("bytes: dense", [format_quantity(f.dense_bytes_moved, "B") for f in figures])
    return table


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _closed_forms(analysis: BudgetAnalysis) -> Table:
    multiple = f"L a multiple of {analysis.alignment}, " if analysis.alignment > 1 else ""
    title = f"closed forms in L (exact for {multiple}L >= {analysis.aligned_from}; exact forms for any L in --json)"
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("quantity")
    table.add_column("expression", overflow="fold")
    table.add_row("K_attn", sympy.sstr(analysis.keys_per_query))
    for branch, expr in analysis.pairs_aligned.items():
        table.add_row(f"pairs per head: {branch}", sympy.sstr(expr))
    table.add_row("attended fraction", sympy.sstr(analysis.attended_fraction_aligned))
    table.add_row("gamma", sympy.sstr(analysis.gamma))
    symbols = ", ".join(str(s) for s in (analysis.query_heads, analysis.head_dim) if isinstance(s, sympy.Symbol))
    per_head = "4*D*H per pair" + (f" ({symbols} free: no model section)" if symbols else "")
    table.add_row("fwd FLOPs", per_head)
    return table
