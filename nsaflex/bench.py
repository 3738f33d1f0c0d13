"""``nsaflex bench``: time compiled patterns against dense and peer baselines.

For every length, pass (``fwd`` or ``fwd+bwd``) and input kind (``random`` or
``video``, see :mod:`nsaflex.video_inputs`) this runs each requested backend
(``nsaflex.compile(pattern, backend=name)``, any registered name) and each
baseline, and records:

* the median time (CUDA: ``triton.testing.do_bench`` on CUDA events after
  warm-up; CPU: median wall-clock of a few runs after a warm-up call);
* TFLOP/s on the counted FLOPs of attended pairs: ``4 * D`` FLOPs per attended
  (query head, key) pair forward (two matrix products), ``3.5x`` that for
  forward + backward (the FlashAttention convention); pairs from
  :func:`nsaflex.budget.count_attended_pairs` (compressed tokens count as keys
  of the compression branch), dense causal ``L (L + 1) / 2`` for the baselines;
* the ratio of each baseline's time in the same run to this time (``x2.0``:
  twice as fast as that baseline);
* peak device memory (CUDA);
* a correctness spot check of each backend against the float64 reference at a
  small length;
* with ``breakdown``: the device time of each kernel one call launches
  (``torch.profiler``; on the CPU each operator's own time), and for the flex
  backend the stages of one forward call;
* for selection patterns, per input kind: the mean Jaccard overlap of the
  selections of neighbouring queries and the union of selected blocks a query
  tile of 128 queries runs (and what the backend itself reports, for flex).

Baselines: ``sdpa`` (dense causal SDPA, flash backend on CUDA, kv heads
repeated), ``cudnn`` (SDPA's cuDNN backend), ``flex-dense`` (FlexAttention,
causal BlockMask) and ``fla`` (fla-core's ``parallel_nsa``, VideoNSA's kernel:
compression + selection only; it needs query heads per kv head to be a power of
two of at least 16, so heads are padded as VideoNSA does, and the table says so).
What it refuses before measuring anything, with an :class:`~nsaflex.errors.InputError`
(``nsaflex bench`` exits 2): an unknown backend or baseline name (a typo would
otherwise time the rest and exit 0), a backend that cannot serve the pattern
here, a length whose inputs alone exceed the device's memory, and a ``--json``
path that cannot be written (the run's figures would be lost after it). A known
baseline that cannot run here (cuDNN on a CPU, fla-core not installed) is
reported in its rows and skipped; when nothing is left to run, :func:`run_bench`
raises :class:`NsaflexError` naming each refused baseline and why.
A configuration that fails while measuring is recorded and the rest runs;
:func:`failures` lists such failures so the command line can exit 2 after
writing everything.

While it runs, :func:`run_bench` reports on a progress console (standard
error in ``nsaflex bench``; none with ``--quiet``): one line per finished
configuration (its median, or why it failed or was skipped, and how long it
took) under a progress bar on a terminal, and a note before the first call of
each configuration whose kernels may compile (every backend but the float64
reference, and the compiled baselines), which is where a run spends its first
tens of seconds.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from nsaflex.backends.base import REGISTRY
from nsaflex.errors import InputError, NsaflexError, did_you_mean
from nsaflex.spec import Model, Pattern

BASELINES = ("sdpa", "cudnn", "flex-dense", "fla")
PASSES = ("fwd", "fwd+bwd")
INPUTS = ("random", "video")
BACKWARD_FACTOR = 3.5
CHECK_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}
UNION_TILE = 128
#: Kernels a breakdown names, longest first; the rest are summed as OTHER_KERNELS.
BREAKDOWN_KERNELS = 8
OTHER_KERNELS = "other kernels"
#: Longest sequence the dense SDPA baseline runs on the CPU (its math backend keeps L x L scores).
CPU_SDPA_LIMIT = 8192
#: Backends whose first call at a shape compiles nothing (the float64 reference runs torch operators).
UNCOMPILED_BACKENDS = frozenset({"reference"})
#: Baselines whose first call at a shape compiles kernels (torch.compile, Triton).
COMPILED_BASELINES = frozenset({"flex-dense", "fla"})
#: Distributions that install the ``fla`` module (the ``fla`` baseline's kernel), newest name first.
FLA_DISTRIBUTIONS = ("fla-core", "flash-linear-attention")


@dataclass
class BenchOptions:
    pattern: Pattern
    lengths: tuple[int, ...]
    backends: tuple[str, ...] = ("flex",)
    baselines: tuple[str, ...] = BASELINES
    query_heads: int = 28
    kv_heads: int = 4
    dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    batch: int = 1
    passes: tuple[str, ...] = ("fwd",)
    inputs: tuple[str, ...] = ("random",)
    device: str = "cuda"
    layer: int | None = None
    text_tokens: int = 0
    check_length: int = 256
    warmup_ms: int = 25
    rep_ms: int = 100
    seed: int = 0
    command: str = ""
    pattern_source: str = ""
    breakdown: bool = False
    deterministic: bool = True


@dataclass
class Row:
    length: int
    inputs: str
    passes: str
    kind: str  # backend | baseline
    name: str
    median_ms: float | None = None
    flops: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    breakdown: dict[str, float] | None = None
    kernels: dict[str, float] | None = None
    note: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def package_version(distributions: tuple[str, ...], module: str) -> str | None:
    """The installed version of a package: the metadata of the first of
    ``distributions`` found, else ``module.__version__``; None when it is not
    installed or its version cannot be read (never raises)."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except Exception:  # PackageNotFoundError, or broken metadata: try the next name
            continue
    # A source checkout on sys.path has a module but no distribution metadata.
    try:
        if importlib.util.find_spec(module) is None:
            return None
        version = getattr(importlib.import_module(module), "__version__", None)
    except Exception:
        return None
    return None if version is None else str(version)


def environment(device: str) -> dict[str, Any]:
    """Where the figures were measured: date, Python, platform, torch, triton,
    fla-core (``fla``, None when not installed: the ``fla`` baseline needs it),
    the GPU (or CPU) and the nsaflex version."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device,
    }
    env["triton"] = package_version(("triton",), "triton")
    env["fla"] = package_version(FLA_DISTRIBUTIONS, "fla")
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    try:
        from nsaflex import __version__

        env["nsaflex"] = __version__
    except Exception:  # pragma: no cover
        pass
    return env


# --- inputs and counted work ------------------------------------------------------------------------


def make_inputs(options: BenchOptions, pattern: Pattern, length: int, kind: str, *, requires_grad: bool, seed: int | None = None,
                heads: tuple[int, int] | None = None, device: str | None = None):
    from nsaflex.video_inputs import random_qkv, video_qkv

    query_heads, kv_heads = heads or (options.query_heads, options.kv_heads)
    device = device or options.device
    seed = options.seed if seed is None else seed
    maker = video_qkv if kind == "video" else random_qkv
    q, k, v = maker(options.batch, query_heads, kv_heads, length, options.dim, seed=seed, device=device, dtype=options.dtype)
    gates = None
    if pattern.branches and pattern.gate.kind != "constant":
        generator = torch.Generator().manual_seed(seed + 7)
        gates = torch.rand(options.batch, query_heads, length, len(pattern.branches), generator=generator).to(device, options.dtype)
    types = None
    if pattern.hybrid is not None:
        types = torch.ones(options.batch, length, dtype=torch.long, device=device)
        types[:, : min(options.text_tokens, length)] = 0
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        if gates is not None:
            gates.requires_grad_()
    return q, k, v, gates, types


def attended_pairs(pattern: Pattern, length: int, text_tokens: int = 0) -> int:
    """Attended (query, key) pairs per query head (text prefix dense, the rest sparse)."""
    from nsaflex.budget import count_attended_pairs, dense_pairs

    text = min(text_tokens, length) if pattern.hybrid is not None else 0
    if pattern.dense:
        return dense_pairs(length)
    sparse = length - text
    pairs = sum(count_attended_pairs(pattern, sparse).values()) if sparse > 0 else 0
    return pairs + dense_pairs(text)


def flops_for(pairs: int, heads: int, dim: int, batch: int, passes: str) -> float:
    forward = 4.0 * dim * pairs * heads * batch
    return forward * (BACKWARD_FACTOR if passes == "fwd+bwd" else 1.0)


# --- timing -----------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], Any], device: str, warmup_ms: int, rep_ms: int) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times: list[float] = []
    budget = rep_ms / 1000.0
    while len(times) < 3 or (sum(times) < budget and len(times) < 25):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def longest(times: dict[str, float], keep: int = BREAKDOWN_KERNELS) -> dict[str, float]:
    """The ``keep`` longest positive times, longest first, and the sum of the
    rest under OTHER_KERNELS (absent when nothing is left over)."""
    ordered = sorted(((name, ms) for name, ms in times.items() if ms > 0), key=lambda item: -item[1])
    out = dict(ordered[:keep])
    rest = sum(ms for _, ms in ordered[keep:])
    if rest > 0:
        out[OTHER_KERNELS] = rest
    return out


def kernel_times(fn: Callable[[], Any], device: str) -> dict[str, float]:
    """Milliseconds of each kernel one call of ``fn`` runs, by name (see
    :func:`longest`): CUDA kernels' device time from ``torch.profiler``; on the
    CPU each operator's own (self) time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        fn()
        if cuda:
            torch.cuda.synchronize()
    # Operators have no self device time on CUDA: their kernels carry it.
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        totals[event.key] = totals.get(event.key, 0.0) + getattr(event, attribute) / 1000.0
    return longest(totals)


def peak_mib(fn: Callable[[], Any], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _runner(call: Callable[[], torch.Tensor], grads: tuple[torch.Tensor, ...] | None) -> Callable[[], Any]:
    if grads is None:
        def forward():
            with torch.no_grad():
                return call()
        return forward
    state: dict[str, torch.Tensor] = {}

    def forward_backward():
        out = call()
        if "grad" not in state:
            state["grad"] = torch.randn_like(out)
        return torch.autograd.grad(out, grads, state["grad"], allow_unused=True)

    return forward_backward


# --- baselines ------------------------------------------------------------------------------------


class Skip(Exception):
    """A baseline or backend that cannot run here (the message says why)."""


def baseline_skip_reason(name: str, options: BenchOptions, pattern: Pattern, length: int, passes: str) -> str | None:
    """Why baseline ``name`` cannot run this configuration here (a missing
    package, device, length or pass limit), or None when it can."""
    cuda = options.device == "cuda"
    if name not in BASELINES:
        return f"unknown baseline {name!r}"
    if name == "cudnn" and not cuda:
        return "cuDNN attention needs CUDA"
    if name == "sdpa" and not cuda and length > CPU_SDPA_LIMIT:
        return f"dense SDPA on CPU is limited to {CPU_SDPA_LIMIT} tokens here"
    if name == "flex-dense" and not cuda and passes == "fwd+bwd":
        return "FlexAttention has no CPU backward"
    if name == "fla":
        try:
            from fla.ops.nsa import parallel_nsa  # noqa: F401
        except Exception as error:
            return f"fla-core is not installed ({type(error).__name__}: {error}); pip install fla-core"
        if not cuda:
            return "fla parallel_nsa needs CUDA"
        if pattern.selection is None or pattern.compression is None:
            return "fla parallel_nsa runs compression + selection: the pattern has no selection"
    return None


def baseline_runner(name: str, options: BenchOptions, pattern: Pattern, length: int, passes: str):
    """(callable, note, pairs-per-head) for a baseline; :class:`Skip` when
    :func:`baseline_skip_reason` gives a reason."""
    reason = baseline_skip_reason(name, options, pattern, length, passes)
    if reason is not None:
        raise Skip(reason)
    device = options.device
    grad = passes == "fwd+bwd"
    group = options.query_heads // options.kv_heads
    q, k, v, _, _ = make_inputs(options, pattern, length, "random", requires_grad=False)
    dense = length * (length + 1) // 2
    if name in ("sdpa", "cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        backend = {"sdpa": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
        if device != "cuda":
            backend = SDPBackend.MATH
        kr = k.repeat_interleave(group, 1).detach()
        vr = v.repeat_interleave(group, 1).detach()
        leaves = tuple(t.requires_grad_() for t in (q, kr, vr)) if grad else None

        def call():
            with sdpa_kernel(backend):
                return scaled_dot_product_attention(q, kr, vr, is_causal=True)

        note = {"sdpa": "flash backend" if device == "cuda" else "math backend", "cudnn": "cuDNN backend"}[name]
        return _runner(call, leaves), note + ", kv heads repeated", dense
    if name == "flex-dense":
        from torch.nn.attention.flex_attention import flex_attention

        from nsaflex.backends.flex_masks import causal_mask_mod, causal_tiles

        mask = causal_tiles(length, 128, 128, device).block_mask(causal_mask_mod())
        compiled = _compiled_flex()
        leaves = tuple(t.requires_grad_() for t in (q, k, v)) if grad else None
        return _runner(lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True), leaves), "compiled, causal BlockMask", dense
    assert name == "fla", name  # baseline_skip_reason refused every other name
    return _fla_runner(options, pattern, length, grad)


_FLEX = {}


def _compiled_flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        def dense_flex(q, k, v, block_mask, enable_gqa):
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)

        _FLEX["fn"] = torch.compile(dense_flex, dynamic=False)
    return _FLEX["fn"]


def _fla_runner(options: BenchOptions, pattern: Pattern, length: int, grad: bool):
    from fla.ops.nsa import parallel_nsa  # present: baseline_skip_reason checked

    selection = pattern.selection
    assert selection is not None
    group = options.query_heads // options.kv_heads
    padded_group = max(16, 1 << (group - 1).bit_length())
    heads = options.kv_heads * padded_group
    generator = torch.Generator().manual_seed(options.seed)
    shape = lambda h: (options.batch, length, h, options.dim)  # noqa: E731
    q = torch.randn(shape(heads), generator=generator).to("cuda", options.dtype)
    k = torch.randn(shape(options.kv_heads), generator=generator).to("cuda", options.dtype)
    v = torch.randn(shape(options.kv_heads), generator=generator).to("cuda", options.dtype)
    g = torch.rand(options.batch, length, heads, 2, generator=generator).to("cuda", options.dtype)
    g_cmp, g_slc = g[..., 0].contiguous(), g[..., 1].contiguous()
    leaves = tuple(t.requires_grad_() for t in (q, k, v)) if grad else None

    def call():
        return parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=selection.count,
                            block_size=selection.block, window_size=0)

    from nsaflex.budget import count_attended_pairs

    counted = count_attended_pairs(dataclasses.replace(pattern, window=None, hybrid=None), length)
    pairs = counted.get("compression", 0) + counted.get("selection", 0)
    note = (f"query heads padded {options.query_heads} -> {heads} ({padded_group} per kv head, as VideoNSA); "
            f"compression + selection only; FLOPs counted on {options.query_heads} heads")
    return _runner(call, leaves), note, pairs


# --- selection structure ---------------------------------------------------------------------------


def selection_structure(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pooler=None) -> dict[str, Any] | None:
    """Overlap of neighbouring queries' selections and the union per query tile
    for these inputs (backend-independent: nsaflex.scoring on the same data)."""
    if pattern.selection is None or pattern.compression is None or pattern.dense:
        return None
    from nsaflex import scoring
    from nsaflex.backends import flex_masks as fm
    from nsaflex.pooling import MLPPooling, compress
    from nsaflex.video_inputs import selection_overlap

    with torch.no_grad():
        if pattern.compression.pooling == "mlp" and pooler is None:
            pooler = MLPPooling(pattern.compression, q.shape[-1]).to(q.device)
        compressed_k, _ = compress(k.detach(), v.detach(), pattern.compression, pooler)
        result = scoring.select(q.detach(), compressed_k, pattern.compression, pattern.selection,
                                score_dtype=torch.float32)
        _, union = fm.selection_tiles(result, q.shape[2], pattern.selection.block, UNION_TILE, UNION_TILE)
    out = {
        "granularity": pattern.selection.granularity,
        "count": pattern.selection.count,
        "mean_jaccard_neighbours": selection_overlap(result.indices),
        "query_tile": UNION_TILE,
        **{f"tile_{key}": value for key, value in union.to_dict().items()},
    }
    return out


# --- the run ---------------------------------------------------------------------------------------


def _bench_pattern(options: BenchOptions) -> Pattern:
    pattern = options.pattern.for_layer(options.layer) if options.layer is not None else options.pattern
    # The shape comes from the command line: drop the pattern's own model section.
    return dataclasses.replace(pattern, model=Model(), budget=None)


class BenchProgress:
    """What a run says while it runs, on ``console`` (``nsaflex bench``: standard
    error): a progress bar when the console is a terminal, and on any console
    one line per finished job, ``[3/12] flex L=512 fwd random: 1.23 ms (4.5 s)``,
    and :meth:`compiling` notes before first calls that may compile. With
    ``console=None`` it says nothing."""

    def __init__(self, console, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.total = total
        self.done = 0
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=True, disable=console is None or not console.is_terminal)
        self.task = self.bar.add_task("bench", total=total)
        self.started = time.perf_counter()

    def __enter__(self) -> BenchProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def say(self, line: str) -> None:
        if self.console is not None:
            # Above the bar while it shows; markup off: names and errors may hold brackets.
            self.console.print(line, markup=False, highlight=False)

    def start(self, label: str) -> None:
        self.bar.update(self.task, description=label)
        self.started = time.perf_counter()

    def compiling(self, label: str, device: str) -> None:
        """The note before a first call that may compile kernels."""
        expected = "~10-40 s" if device == "cuda" else "up to a minute on a CPU"
        self.say(f"{label}: compiling the kernels for this shape (first call; {expected}) ...")

    def finish(self, label: str, outcome: str) -> None:
        self.done += 1
        self.bar.advance(self.task)
        self.say(f"[{self.done}/{self.total}] {label}: {outcome} ({time.perf_counter() - self.started:.1f} s)")


def _outcome(kind: str, result: Any) -> str:
    """A finished job in a few words: its median, its check, or why it has none."""
    if kind == "check":
        if "relative_error" in result:
            return ("ok" if result["ok"] else "FAILED") + f", relative error {result['relative_error']:.1e}"
        return result.get("error") or result.get("skipped", "-")
    if result.error:
        return result.error if result.error.startswith("skipped") else f"failed: {result.error}"
    return f"{_fmt(result.median_ms)} ms"


def run_bench(options: BenchOptions, console=None, *, progress=None, json_path: str | None = None) -> dict[str, Any]:
    """Run every configuration; returns the JSON document (also printed as tables
    when ``console``). ``progress``: a rich console for :class:`BenchProgress`
    (None: silent). With ``json_path`` the document so far is rewritten after
    every configuration, so an interrupted run keeps what it measured. Raises
    NsaflexError when no backend compiles and no baseline can run."""
    import nsaflex

    pattern = _bench_pattern(options)
    device = options.device
    check_options(options)
    if json_path:
        check_writable(json_path, "--json")
    baselines = list(options.baselines)

    compiled: dict[str, Any] = {}
    refused: list[str] = []
    for name in options.backends:
        try:
            compiled[name] = nsaflex.compile(pattern, backend=name, device=device, head_dim=options.dim,
                                             deterministic=options.deterministic).to(device)
        except NsaflexError as error:
            refused.append(f"  {name}: {error}")
    if refused:
        raise InputError("--backends", f"backends that serve {pattern.name!r} on {device}", "\n" + "\n".join(refused))
    _refuse_empty_run(options, pattern, compiled, baselines)

    rows: list[Row] = []
    structures: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    # Spot checks first: a run cut short by a time limit still has them.
    jobs = [("check", name, options.check_length, "fwd", "random") for name in compiled if options.check_length > 0]
    if options.check_length <= 0:
        checks = {name: {"skipped": "--check-length 0"} for name in compiled}
    for length in options.lengths:
        for passes in options.passes:
            jobs += [("baseline", name, length, passes, "random") for name in baselines]
            for kind in options.inputs:
                jobs += [("backend", name, length, passes, kind) for name in compiled]

    baseline_times: dict[tuple[int, str], dict[str, float]] = {}
    seen_structure: set[tuple[int, str]] = set()
    with BenchProgress(progress, len(jobs)) as report:
        for kind, name, length, passes, inputs in jobs:
            label = f"check {name} L={length}" if kind == "check" else (
                f"{name} L={length} {passes}" + (f" {inputs}" if kind == "backend" else ""))
            report.start(label)
            compiles = name in COMPILED_BASELINES if kind == "baseline" else name not in UNCOMPILED_BACKENDS
            first_call = (lambda label=label: report.compiling(label, device)) if compiles else (lambda: None)
            result: Any
            try:
                if kind == "check":
                    result = checks[name] = _spot_check(compiled[name], pattern, options, first_call)
                elif kind == "baseline":
                    result = _measure_baseline(name, options, pattern, length, passes, first_call)
                    rows.append(result)
                    if result.median_ms is not None:
                        baseline_times.setdefault((length, passes), {})[name] = result.median_ms
                else:
                    result, structure = _measure_backend(name, compiled[name], options, pattern, length, passes, inputs,
                                                         want_structure=(length, inputs) not in seen_structure,
                                                         first_call=first_call)
                    rows.append(result)
                    if structure is not None:
                        seen_structure.add((length, inputs))
                        structures.append({"length": length, "inputs": inputs, **structure})
            except Exception as error:  # a failed configuration is reported, the rest runs
                if device == "cuda":
                    torch.cuda.empty_cache()
                message = f"{type(error).__name__}: {error}"[:500]
                if kind == "check":
                    result = checks[name] = {"error": message}
                else:
                    result = Row(length, inputs, passes, kind, name, error=message)
                    rows.append(result)
            report.finish(label, _outcome(kind, result))
            if json_path:
                write_json(_document(options, pattern, rows, structures, checks, baseline_times, complete=False), json_path)
    document = _document(options, pattern, rows, structures, checks, baseline_times, complete=True)
    if json_path:
        write_json(document, json_path)
    if console is not None:
        print_tables(document, console)
    return document


def _unknown_names(names: tuple[str, ...], known, what: str) -> list[str]:
    """'NAME: unknown WHAT (known: ...); did you mean ...?' for each unknown name."""
    lines = []
    for name in names:
        if name not in known:
            hint = did_you_mean(name, known)
            lines.append(f"{name}: unknown {what} (known: {', '.join(known)})" + (f"; {hint}" if hint else ""))
    return lines


def input_bytes(options: BenchOptions, length: int) -> int:
    """Bytes of q, k, v and the output at ``length`` ([B, H, L, D] each, kv
    heads for k and v): a lower bound on what one configuration allocates."""
    element = torch.empty((), dtype=options.dtype).element_size()
    return options.batch * length * options.dim * element * (2 * options.query_heads + 2 * options.kv_heads)


def device_memory_bytes(device: str) -> int | None:
    """Total memory of the CUDA device, or the machine's physical memory for
    the CPU; None when it cannot be read."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX sysconf
        return None


def check_options(options: BenchOptions) -> None:
    """Refuse, before anything runs, what would only fail later: unknown
    backend or baseline names (InputError naming each, with a did-you-mean
    hint) and lengths whose inputs alone exceed the device's memory."""
    unknown = _unknown_names(options.backends, tuple(REGISTRY), "backend")
    unknown += _unknown_names(options.baselines, BASELINES, "baseline")
    if unknown:
        raise InputError("--backends/--baselines", "registered backends and known baselines",
                         "\n" + "\n".join(f"  {line}" for line in unknown))
    memory = device_memory_bytes(options.device)
    if memory is not None and options.lengths:
        longest_length = max(options.lengths)
        needed = input_bytes(options, longest_length)
        if needed > memory:
            raise InputError("--lengths", f"lengths whose q, k, v and output fit the {options.device} memory "
                             f"({memory / 2**30:.1f} GiB)", f"{longest_length:,} tokens, which need {needed / 2**30:,.1f} GiB")


def check_writable(path: str, option: str) -> None:
    """Refuse an output path whose folder is missing or not writable, or that
    is a folder itself (InputError), before a run whose figures it would lose."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(option, "a file path", f"{path!r}, a folder")
    if not os.path.isdir(folder):
        raise InputError(option, "a path in an existing folder", f"{path!r} (no folder {folder!r})")
    if not os.access(folder, os.W_OK):
        raise InputError(option, "a path in a writable folder", f"{path!r} ({folder!r} is not writable)")


def failures(document: dict[str, Any]) -> list[str]:
    """'L=... pass inputs name: error' for each configuration that failed while
    measuring and each failed spot check (a baseline that cannot run here is
    skipped, not failed)."""
    lines = [f"L={row['length']} {row['passes']} {row['inputs']} {row['name']}: {row['error']}"
             for row in document["results"] if row.get("error") and not row["error"].startswith("skipped")]
    for name, check in document["checks"].items():
        if "error" in check:
            lines.append(f"check {name}: {check['error']}")
        elif check.get("ok") is False:
            lines.append(f"check {name}: relative error {check['relative_error']:.2e} against the float64 reference "
                         f"(tolerance {check['tolerance']:.0e})")
    return lines


def _refuse_empty_run(options: BenchOptions, pattern: Pattern, compiled: dict[str, Any], baselines: list[str]) -> None:
    """Raise NsaflexError naming every refused baseline and why when no backend
    was requested and no baseline can run any configuration: a run of nothing
    would otherwise print an empty table and exit 0."""
    if compiled:
        return
    refused = []
    for name in baselines:
        reasons = [baseline_skip_reason(name, options, pattern, length, passes)
                   for length in options.lengths for passes in options.passes]
        if any(reason is None for reason in reasons):
            return  # this baseline runs at least one configuration
        refused.append(f"{name}: " + "; ".join(dict.fromkeys(r for r in reasons if r is not None)))
    if not refused:
        raise NsaflexError("nothing to run: no backend or baseline was requested (--backends, --baselines)")
    raise NsaflexError("nothing to run: every requested baseline was refused:\n"
                       + "\n".join(f"  {line}" for line in refused))


def _document(options, pattern, rows, structures, checks, baseline_times, *, complete: bool) -> dict[str, Any]:
    device = options.device
    for row in rows:
        if row.median_ms:
            for base, ms in baseline_times.get((row.length, row.passes), {}).items():
                if base != row.name:
                    row.ratios[base] = ms / row.median_ms
    return {
        "complete": complete,
        "command": options.command,
        "environment": environment(device),
        "config": {
            "pattern": pattern.name,
            "pattern_source": options.pattern_source,
            "pattern_spec": pattern.to_dict(),
            "lengths": list(options.lengths),
            "backends": list(options.backends),
            "baselines": list(options.baselines),
            "query_heads": options.query_heads,
            "kv_heads": options.kv_heads,
            "dim": options.dim,
            "dtype": str(options.dtype).replace("torch.", ""),
            "batch": options.batch,
            "passes": list(options.passes),
            "inputs": list(options.inputs),
            "text_tokens": options.text_tokens,
            "layer": options.layer,
            "deterministic": options.deterministic,
            "flops": f"4*D per attended pair forward, x{BACKWARD_FACTOR} for fwd+bwd",
            "timing": "triton.testing.do_bench median (CUDA events)" if device == "cuda" else "median wall-clock",
        },
        "results": [row.to_dict() for row in rows],
        "selection": structures,
        "checks": checks,
    }


def _measure_baseline(name: str, options: BenchOptions, pattern: Pattern, length: int, passes: str,
                      first_call: Callable[[], None] = lambda: None) -> Row:
    """Time baseline ``name``; ``first_call()`` runs just before its first call."""
    try:
        fn, note, pairs = baseline_runner(name, options, pattern, length, passes)
    except Skip as reason:
        return Row(length, "any", passes, "baseline", name, error=f"skipped: {reason}")
    first_call()
    ms = time_ms(fn, options.device, options.warmup_ms, options.rep_ms)
    flops = flops_for(pairs, options.query_heads, options.dim, options.batch, passes)
    return Row(length, "any", passes, "baseline", name, ms, flops, flops / ms / 1e9, peak_mib(fn, options.device), note=note)


def _measure_backend(name, attn, options: BenchOptions, pattern: Pattern, length: int, passes: str, inputs: str, *,
                     want_structure: bool, first_call: Callable[[], None] = lambda: None):
    """Time backend ``name`` (compiled as ``attn``); ``first_call()`` runs just before its first call."""
    grad = passes == "fwd+bwd"
    q, k, v, gates, types = make_inputs(options, pattern, length, inputs, requires_grad=grad)
    leaves = tuple(t for t in (q, k, v, gates) if t is not None) if grad else None
    fn = _runner(lambda: attn(q, k, v, gates, types), leaves)
    first_call()
    fn()  # compile / warm up outside the timed region
    if options.device == "cuda":
        torch.cuda.synchronize()
    ms = time_ms(fn, options.device, options.warmup_ms, options.rep_ms)
    flops = flops_for(attended_pairs(pattern, length, options.text_tokens), options.query_heads, options.dim, options.batch, passes)
    row = Row(length, inputs, passes, "backend", name, ms, flops, flops / ms / 1e9, peak_mib(fn, options.device))
    kernel = getattr(attn, "_kernel", None)
    if options.breakdown and kernel is not None and hasattr(kernel, "profile"):
        kernel.profile = True
        try:
            fn()
            row.breakdown = dict(kernel.stats.get("timings_ms", {}))
        finally:
            kernel.profile = False
    if options.breakdown:
        row.kernels = kernel_times(fn, options.device)
    stats = getattr(kernel, "stats", None)
    if isinstance(stats, dict) and "selection" in stats:
        row.selection = dict(stats["selection"])
    notes = []
    if isinstance(stats, dict) and "compiled" in stats:
        notes.append("compiled" if stats["compiled"] else "eager (dense BlockMask evaluation)")
    row.note = ", ".join(notes)
    structure = None
    if want_structure and pattern.selection is not None:
        structure = selection_structure(pattern, q, k, v, getattr(attn, "pooler", None))
    return row, structure


def _spot_check(attn, pattern: Pattern, options: BenchOptions, first_call: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Relative error against the float64 reference at ``check_length`` (random
    inputs); ``first_call()`` runs just before the backend's call."""
    from nsaflex.reference import reference_attention

    length = options.check_length
    if length <= 0:
        return {"skipped": "--check-length 0"}
    q, k, v, gates, types = make_inputs(options, pattern, length, "random", requires_grad=False, seed=options.seed + 1)
    first_call()
    with torch.no_grad():
        out = attn(q, k, v, gates, types)
    pooler = attn.pooler.cpu() if getattr(attn, "pooler", None) is not None else None
    expected = reference_attention(q.cpu(), k.cpu(), v.cpu(), pattern, None if gates is None else gates.cpu(),
                                   None if types is None else types.cpu(), pooler)
    if pooler is not None:
        attn.pooler.to(options.device)
    error = float((out.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30))
    tolerance = CHECK_TOLERANCE.get(options.dtype, 1e-4)
    return {"length": length, "relative_error": error, "tolerance": tolerance, "ok": error < tolerance and math.isfinite(error)}


# --- output ----------------------------------------------------------------------------------------


#: Main table: the backend's own selection union (distinct selection blocks per
#: query tile of the backend, from its stats) over the count n, and that tile.
UNION_COLUMN = "selection union blocks / n (backend query tile)"


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if value < 1000 else f"{value:,.0f}"


def print_tables(document: dict[str, Any], console) -> None:
    from rich.table import Table

    env = document["environment"]
    config = document["config"]
    where = env.get("gpu") or env.get("cpu") or env["device"]
    title = (f"nsaflex bench {config['pattern']}: B={config['batch']}, heads {config['query_heads']}/{config['kv_heads']}, "
             f"D={config['dim']}, {config['dtype']} on {where} (torch {env['torch']}, triton {env.get('triton')})"
             + ("" if config.get("deterministic", True) else ", atomic gradients"))
    baselines = [b for b in config["baselines"] if b in BASELINES]
    table = Table(title=title, title_justify="left")
    for column in ("L", "inputs", "pass", "name", "median ms", "TFLOP/s", *[f"vs {b}" for b in baselines], "peak MiB", "check", UNION_COLUMN, "note"):
        table.add_column(column, justify="right" if column not in ("inputs", "pass", "name", "note", "check") else "left")
    checks = document["checks"]
    problems: list[str] = []
    for row in document["results"]:
        check = "-"
        if row["kind"] == "backend" and row["name"] in checks:
            c = checks[row["name"]]
            check = ("ok " if c.get("ok") else "FAIL ") + f"{c['relative_error']:.1e}" if "relative_error" in c else c.get("error", c.get("skipped", "-"))[:30]
        union = "-"
        if row.get("selection"):
            s = row["selection"]
            # The backend's own query tile (64 or 128 on CUDA), which may differ from the structure table's.
            union = f"{s['mean_union_blocks']:.1f}/{s['count']}" + (f" @{s['q_block']}q" if s.get("q_block") else "")
        if row.get("error"):
            table.add_row(str(row["length"]), row["inputs"], row["passes"], row["name"], "-", "-", *["-"] * len(baselines), "-", check, union,
                          "[yellow]" + ("skipped" if row["error"].startswith("skipped") else "failed") + " (below)[/]")
            problems.append(f"L={row['length']} {row['passes']} {row['name']}: {row['error']}")
            continue
        ratios = [f"x{row['ratios'][b]:.2f}" if b in row["ratios"] else "-" for b in baselines]
        table.add_row(str(row["length"]), row["inputs"], row["passes"], row["name"], _fmt(row["median_ms"]), _fmt(row["tflops"]),
                      *ratios, _fmt(row["peak_mib"], 5), check, union, row.get("note", "")[:90])
    console.print(table)
    for problem in dict.fromkeys(problems):
        console.print(f"[yellow]{problem}[/]")
    if document["selection"]:
        tiles = sorted({item.get("query_tile", UNION_TILE) for item in document["selection"]})
        tile = "/".join(str(t) for t in tiles)
        sel = Table(title="selection structure of the inputs (nsaflex.scoring on the same data)", title_justify="left",
                    caption=(f"union: distinct selection blocks one {tile}-query tile runs (mean over rows, heads, tiles); "
                             "selected: mean blocks one selection unit (a query, or a query block) selects, "
                             "n or fewer near the start"),
                    caption_justify="left")
        for column in ("L", "inputs", "granularity", "n", "neighbour Jaccard", f"union blocks per {tile}-query tile",
                       f"union blocks / selected blocks (per {tile}-query tile)"):
            sel.add_column(column)
        for item in document["selection"]:
            sel.add_row(str(item["length"]), item["inputs"], item["granularity"], str(item["count"]),
                        f"{item['mean_jaccard_neighbours']:.3f}", f"{item['tile_mean_union_blocks']:.1f}",
                        f"{item['tile_union_over_selected']:.2f}")
        console.print(sel)
    stages = [row for row in document["results"] if row.get("breakdown")]
    if stages:
        names = list(dict.fromkeys(name for row in stages for name in row["breakdown"]))
        split = Table(title="forward stages of one call (ms, each since the previous stage; --breakdown)", title_justify="left")
        for column in ("L", "inputs", "pass", "name", *names):
            split.add_column(column)
        for row in stages:
            split.add_row(str(row["length"]), row["inputs"], row["passes"], row["name"],
                          *[_fmt(row["breakdown"].get(name)) for name in names])
        console.print(split)
    profiled = [row for row in document["results"] if row.get("kernels")]
    if profiled:
        kernels = Table(title="kernels of one call (ms; --breakdown)", title_justify="left")
        for column in ("L", "inputs", "pass", "name", "kernel", "ms", "share"):
            kernels.add_column(column, justify="right" if column in ("L", "ms", "share") else "left")
        for row in profiled:
            total = sum(row["kernels"].values())
            for kernel, ms in row["kernels"].items():
                kernels.add_row(str(row["length"]), row["inputs"], row["passes"], row["name"], kernel[:70], _fmt(ms),
                                f"{ms / total:.0%}")
        console.print(kernels)


def pyplot():
    """matplotlib's pyplot on the Agg backend; NsaflexError when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NsaflexError("--plot needs matplotlib, which is not installed: pip install 'nsaflex[plot]' (or pip install matplotlib)") from None
    return plt


def write_plot(document: dict[str, Any], path: str) -> None:
    """PNG of time against length, one line per (name, pass, inputs)."""
    plt = pyplot()
    series: dict[str, list[tuple[int, float]]] = {}
    for row in document["results"]:
        if row.get("median_ms"):
            label = f"{row['name']} {row['passes']}" + (f" ({row['inputs']})" if row["kind"] == "backend" else "")
            series.setdefault(label, []).append((row["length"], row["median_ms"]))
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, points in sorted(series.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length (tokens)")
    axis.set_ylabel("median time (ms)")
    env = document["environment"]
    axis.set_title(f"{document['config']['pattern']} on {env.get('gpu') or env.get('cpu') or env['device']}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_json(document: dict[str, Any], path: str) -> None:
    with open(path, "w") as handle:
        json.dump(document, handle, indent=1, default=str)
