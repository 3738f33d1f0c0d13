"""``nsaflex bench PATTERN``: time backends against dense and peer baselines.

See :mod:`nsaflex.bench` for what is measured and how. Examples::

    nsaflex bench videonsa-qblock --lengths 8k,32k,64k,128k --backends flex \\
        --baselines sdpa,cudnn,flex-dense,fla --pass fwd,fwd+bwd --inputs video,random \\
        --json run.json --plot run.png
    nsaflex bench window --device cpu --lengths 512 --heads 4/2 --dim 32 --dtype float32

Progress goes to standard error (``--quiet``: none): one line per finished
configuration, and a note before each first call that may compile kernels.
``--json FILE`` is rewritten after every configuration; ``--json -`` prints
the document on standard output at the end, the tables then on standard error.

A record for ``benchmarks/RESULTS.md``: ``--json benchmarks/results/NAME.json``,
then ``python benchmarks/results.py``.
"""

from __future__ import annotations

import shlex
import sys

import click
import torch

from nsaflex.bench import BASELINES, INPUTS, PASSES, BenchOptions, check_writable, failures, pyplot, run_bench, write_plot
from nsaflex.cli.common import (
    DTYPE,
    JSON_STDOUT,
    LENGTHS,
    check_json_target,
    err_console,
    human_console,
    json_option,
    load_pattern_arg,
    printable,
    write_json,
)
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
@click.option("--dtype", type=DTYPE, default="bfloat16", show_default=True,
              help="Inputs' dtype, as torch spells it or short: bfloat16 (bf16), float16 (fp16), float32 (fp32).")
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
@json_option("every figure and the environment")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG of time against length here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on standard error.")
def command(pattern_arg, lengths, backends, baselines, heads, dim, dtype, batch, passes, inputs, device, layer,
            text_tokens, check_length, warmup, rep, breakdown, deterministic, json_target, plot_path, quiet):
    """Time PATTERN's compiled backends against dense and peer baselines."""
    check_json_target(json_target)
    pattern, path = load_pattern_arg(pattern_arg)
    # The plot's path and matplotlib are checked before the run, not after it.
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
        dtype=dtype,
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
    console = human_console(json_target)
    if not console.is_terminal:
        console.width = max(console.width, 200)  # logs and pipes: keep table rows on one line
    json_path = json_target if json_target != JSON_STDOUT else None  # a file is rewritten as the run goes
    document = run_bench(options, console, progress=None if quiet else err_console(), json_path=json_path)
    if json_target == JSON_STDOUT:
        write_json(document, json_target, console)
    elif json_target is not None:
        console.print(f"wrote {printable(json_target)}", soft_wrap=True, markup=False)  # run_bench wrote it
    if plot_path:
        write_plot(document, plot_path)
        console.print(f"wrote {plot_path}")
    failed = failures(document)
    if failed:
        raise NsaflexError(f"{len(failed)} of the run's measurements failed (the figures that were measured are written):\n"
                           + "\n".join(f"  {line}" for line in failed))
