"""``nsaflex bench PATTERN``: time backends against dense and peer baselines.

See :mod:`nsaflex.bench` for what is measured and how. Examples::

    nsaflex bench videonsa-qblock --lengths 8k,32k,64k,128k --backends flex \\
        --baselines sdpa,cudnn,flex-dense,fla --pass fwd,fwd+bwd --inputs video,random \\
        --json run.json --plot run.png
    nsaflex bench window --device cpu --lengths 512 --heads 4/2 --dim 32 --dtype fp32

A record for ``benchmarks/RESULTS.md``: ``--json benchmarks/results/NAME.json``,
then ``python benchmarks/results.py``.
"""

from __future__ import annotations

import shlex
import sys

import click
import torch

from nsaflex.bench import BASELINES, DTYPES, INPUTS, PASSES, BenchOptions, check_writable, failures, pyplot, run_bench, write_plot
from nsaflex.cli.common import LENGTHS, load_pattern_arg, out_console
from nsaflex.errors import NsaflexError

CPU_LENGTHS = (512, 1024)
GPU_LENGTHS = (8192, 32768, 65536, 131072)


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _choices(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    values = _names(text)
    bad = [value for value in values if value not in allowed]
    if bad or not values:
        raise click.BadParameter(f"expected a comma-separated list of {', '.join(allowed)}; found {text!r}", param_hint=option)
    return values


def _heads(text: str) -> tuple[int, int]:
    try:
        query, kv = (int(part) for part in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected QUERY/KV heads such as 28/4; found {text!r}", param_hint="--heads") from None
    if query < 1 or kv < 1 or query % kv:
        raise click.BadParameter(f"expected kv heads dividing query heads (e.g. 28/4); found {text!r}", param_hint="--heads")
    return query, kv


@click.command("bench")
@click.argument("pattern_arg", metavar="PATTERN")
@click.option("--lengths", type=LENGTHS, default=None, metavar="LENGTHS",
              help="Sequence lengths, e.g. 8k,32k,64k,128k (default on CUDA; 512,1k on CPU).")
@click.option("--backends", default="flex", show_default=True, help="Registered backends to time (comma-separated).")
@click.option("--baselines", default=",".join(BASELINES), show_default=True,
              help="Baselines: sdpa (flash), cudnn, flex-dense, fla (fla-core parallel_nsa); 'none' for none.")
@click.option("--heads", default="28/4", show_default=True, help="Query heads / kv heads.")
@click.option("--dim", type=click.IntRange(1), default=128, show_default=True, help="Head dim.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True)
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--pass", "passes", default="fwd", show_default=True, help="fwd, fwd+bwd, or both comma-separated.")
@click.option("--inputs", default="random", show_default=True,
              help="random (i.i.d. normal), video (frame-structured, see nsaflex.video_inputs) or both.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--layer", type=click.IntRange(0), default=None, help="Resolve the pattern's per-layer overrides for this layer.")
@click.option("--text-tokens", type=click.IntRange(0), default=0, show_default=True,
              help="Hybrid patterns: this many leading text tokens (the rest vision).")
@click.option("--check-length", type=click.IntRange(0), default=256, show_default=True,
              help="Length of the correctness spot check against the float64 reference (0: none).")
@click.option("--warmup", type=click.IntRange(1), default=25, show_default=True, help="Warm-up per measurement (ms).")
@click.option("--rep", type=click.IntRange(1), default=100, show_default=True, help="Timed repetitions per measurement (ms).")
@click.option("--breakdown", is_flag=True,
              help="Also profile one call: each kernel's device time (CPU: each operator's), and the flex backend's forward stages.")
@click.option("--deterministic/--atomic", default=True, show_default=True,
              help="--atomic: gradients accumulated with atomics where a backend has them (Triton: the selection branch's dk, dv).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every figure and the environment here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG of time against length here.")
def command(pattern_arg, lengths, backends, baselines, heads, dim, dtype, batch, passes, inputs, device, layer,
            text_tokens, check_length, warmup, rep, breakdown, deterministic, json_path, plot_path):
    """Time PATTERN's compiled backends against dense and peer baselines."""
    pattern, path = load_pattern_arg(pattern_arg)
    # The plot's path and matplotlib are checked before the run, not after it
    # (run_bench checks the JSON path).
    if plot_path:
        check_writable(plot_path, "--plot")
        pyplot()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device here", param_hint="--device")
    query_heads, kv_heads = _heads(heads)
    options = BenchOptions(
        pattern=pattern,
        lengths=lengths or (GPU_LENGTHS if device == "cuda" else CPU_LENGTHS),
        backends=_names(backends),
        baselines=() if baselines.strip() in ("", "none") else _names(baselines),
        query_heads=query_heads,
        kv_heads=kv_heads,
        dim=dim,
        dtype=DTYPES[dtype],
        batch=batch,
        passes=_choices(passes, PASSES, "--pass"),
        inputs=_choices(inputs, INPUTS, "--inputs"),
        device=device,
        layer=layer,
        text_tokens=text_tokens,
        check_length=check_length,
        warmup_ms=warmup,
        rep_ms=rep,
        command="nsaflex bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else "nsaflex bench",
        pattern_source=str(path),
        breakdown=breakdown,
        deterministic=deterministic,
    )
    console = out_console()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # logs and pipes: keep table rows on one line
    document = run_bench(options, console, progress=console.is_terminal, json_path=json_path)
    if json_path:
        console.print(f"wrote {json_path}")
    if plot_path:
        write_plot(document, plot_path)
        console.print(f"wrote {plot_path}")
    failed = failures(document)
    if failed:
        raise NsaflexError(f"{len(failed)} of the run's measurements failed (the figures that were measured are written):\n"
                           + "\n".join(f"  {line}" for line in failed))
