"""``nsaflex inspect RECORDING``: a recording of the Qwen2.5-VL adapter
(``with adapter.record() as rec: model(**inputs)``, then ``rec.save(...)``)
as JSON and VideoNSA's figures.

Examples::

    nsaflex inspect rec.pt --json -                 # per layer and head: gates, sinks, blocks
    nsaflex inspect rec.json --out figures/         # gates.png and sinks.png

See :mod:`nsaflex.recorder` for what each number means.
"""

from __future__ import annotations

from pathlib import Path

import click

from nsaflex.cli.common import check_json_target, human_console, json_option, write_json
from nsaflex.cli.show import _output_dir
from nsaflex.recorder import load_recording, plot_gates, plot_sinks

__all__ = ["command"]


@click.command("inspect")
@click.argument("recording", type=click.Path(dir_okay=False, path_type=Path))
@json_option("the per-layer statistics")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for gates.png (mean gate per layer, vision vs text) and sinks.png (sink mass).")
def command(recording: Path, json_target: str | None, out: Path | None) -> None:
    """Per-layer gate means, attention-sink mass and block histograms of a recording."""
    if out is not None:
        out = _output_dir(out)
    check_json_target(json_target)  # after --out, which may make its folder
    data = load_recording(recording)
    console = human_console(json_target)
    if json_target is not None:
        write_json(data, json_target, console)
    if out is not None:
        plot_gates(data, out / "gates.png")
        plot_sinks(data, out / "sinks.png")
        console.print(f"wrote {out / 'gates.png'} and {out / 'sinks.png'}")
    if json_target is None and out is None:
        for index, layer in data["layers"].items():
            console.print(f"layer {index}: {layer['vision_tokens']} vision, {layer['text_tokens']} text tokens; "
                          f"branches {', '.join(layer['branches'])}")
