"""The whole Qwen2.5-VL-7B text model, patched with nsaflex against SDPA:
time to first token, a training step, and where one patched layer's time goes.

The 7B text shape (28 decoder layers, hidden 3584, 28 query over 4 kv heads,
head dim 128, MLP 18944), random weights, bf16; a 1024-token vocabulary and a
one-block vision tower that is not run (see ``benchmarks/adapter_layer.py``,
whose model builder this uses). Inputs are ``L`` tokens of which all but
``--text`` (default 200: half at the start, half at the end) are image tokens,
classed by ``mm_token_type_ids`` as a processor would.

Configurations, measured in the same run on the same weights: the unpatched
model (``sdpa``), then for each of ``--backends`` the model after
``nsaflex.adapters.qwen2_5_vl.apply(model, pattern, backend)`` (gates included).

* **prefill** (time to first token) at each of ``--lengths``: one
  ``Qwen2_5_VLForConditionalGeneration`` call over the prompt with a KV cache
  and the logits of the last token only (``logits_to_keep=1``), no grad. The
  first token (the argmax) is recorded for each configuration.
* **train** (a training step without the optimizer) at each of
  ``--train-lengths``: forward and backward of loss = mean of the last hidden
  state; ``--checkpointing`` turns on transformers' gradient checkpointing
  (non-reentrant), which long lengths need on one 80 GB card.
* **decode** (per-token latency) at each of ``--decode-lengths``: the prompt
  is prefilled into a KV cache, then single tokens are decoded over it, one
  model call each: text tokens (``mm_token_type_ids`` 0; a hybrid pattern hands
  them to the model's own attention) and then vision tokens (image token id,
  class 1: the sparse branches, through the compiled attention's batched decode
  entry). Each timed step appends its token, so the context grows by one per
  step. Recorded under ``decode`` in the record, one entry per configuration,
  length and token kind.
* **breakdown**: one profiled prefill at ``--breakdown-length`` (default the
  longest prefill length) per patched configuration; the device time of
  decoder layer 0 split into its stages: ``projections`` (q/k/v), ``gates``,
  ``token-class packing`` (the compiled attention's gathers, scatters and
  copies), ``kernels`` (the sparse attention kernels), ``text path`` (dense
  attention of text queries), ``output`` (o_proj), ``mlp``, ``norms`` and
  ``other`` (rotary embedding, residuals). The ranges come from forward hooks on
  the layer's modules and the adapter's ``record_function`` ranges; inside the
  compiled attention, kernels are told apart by name.

Times are CUDA-event medians over ``--reps`` runs after ``--warmup`` runs (the
first nsaflex call compiles its kernels); peak memory is
``torch.cuda.max_memory_allocated`` during the timed runs (weights included).
``--json PATH`` writes the record after every measurement (a run cut short
keeps what it measured); ``benchmarks/results.py`` renders it (record kind
``model-bench``) when it lies in ``benchmarks/results/``.

    python benchmarks/model_bench.py --json benchmarks/results/model-bench.json
    python benchmarks/model_bench.py --train-lengths 32768 65536 --checkpointing --json model.json
    python benchmarks/model_bench.py --lengths 32768 --train-lengths --decode-lengths 32768 131072 --json decode.json
    python benchmarks/model_bench.py --tiny --json /tmp/model-bench.json    # CPU, seconds

``--tiny``: a small random model (2 layers, hidden 128, 4/2 heads) on the CPU
with the ``reference`` backend (``--backends reference,flex`` adds
FlexAttention), short lengths: it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adapter_layer  # noqa: E402  (also puts the checkout on sys.path)

from nsaflex.adapters import qwen2_5_vl as adapter_module  # noqa: E402

SDPA = "sdpa"
STAGES = ("projections", "gates", "token-class packing", "kernels", "text path", "output", "mlp", "norms", "other")
# Hooks on decoder layer 0 open a profiler range per module group.
MODULE_STAGES = {
    "projections": ("q_proj", "k_proj", "v_proj"),
    "output": ("o_proj",),
    "mlp": ("mlp",),
    "norms": ("input_layernorm", "post_attention_layernorm"),
}
LAYER_RANGE = "model_bench.layer"
# Kernel names inside the compiled attention: dense attention (the text path,
# SDPA's kernels) and FlexAttention's (Inductor templates, or named after it);
# nsaflex's own Triton kernels are found by name (sparse_kernel_names).
DENSE_KERNEL_MARKS = ("flash", "fmha", "efficient_attention", "cudnn", "scaled_dot_product", "sdpa")
FLEX_KERNEL_MARKS = ("flex_attention", "triton_tem")


def sparse_kernel_names() -> frozenset[str]:
    """The names of the Triton kernels in ``nsaflex.kernels`` (empty without triton)."""
    try:
        import importlib
        import pkgutil

        from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1

        import nsaflex.kernels as package
    except ImportError:
        return frozenset()
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names.update(value.fn.__name__ for value in vars(module).values() if isinstance(value, KernelInterface) and hasattr(value, "fn"))
    return frozenset(names)


def parse_backends(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of nsaflex backends, e.g. triton,flex")
    return names


def prefill(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prompt through the model with a KV cache; the logits of its last token ``[B, V]``."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def cache_keyword(model) -> str:
    """The keyword the model's forward takes its KV cache by (``past_key_values``; newer transformers ``cache``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decoder(model, inputs: dict[str, torch.Tensor], vision: bool):
    """Prefill ``inputs`` into a KV cache; returns ``step()``, which decodes one
    more token (the image token for ``vision``, else a text token) over the cache."""
    keyword = cache_keyword(model)
    with torch.no_grad():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        cache = getattr(out, "cache", None)
    ids = inputs["input_ids"]
    position = [ids.shape[1]]
    token = torch.full_like(ids[:, :1], adapter_layer.IMAGE_TOKEN if vision else 7)
    classes = torch.full_like(ids[:, :1], int(vision))

    def step() -> torch.Tensor:
        positions = torch.full_like(ids[:, :1], position[0])
        position[0] += 1
        with torch.no_grad():
            out = model(input_ids=token, mm_token_type_ids=classes, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{keyword: cache})
        return out.logits[:, -1]

    return step


def train_step(model, inputs: dict[str, torch.Tensor]) -> None:
    """Forward and backward of loss = mean of the last hidden state (no optimizer)."""
    model.zero_grad(set_to_none=True)
    out = model.model(**inputs, use_cache=False).last_hidden_state
    out.float().mean().backward()


@contextlib.contextmanager
def layer_ranges(layer: torch.nn.Module):
    """Profiler ranges around decoder ``layer`` and its module groups (MODULE_STAGES)."""
    handles = []

    def enter(name):
        def hook(module, args):
            module._model_bench_range = torch.profiler.record_function(name)
            module._model_bench_range.__enter__()
        return hook

    def leave(module, args, output):
        module._model_bench_range.__exit__(None, None, None)
        del module._model_bench_range

    def submodule(name: str) -> torch.nn.Module | None:
        return getattr(layer.self_attn, name, None) or getattr(layer, name, None)

    groups = {LAYER_RANGE: [layer]}
    for stage, names in MODULE_STAGES.items():
        groups[f"model_bench.{stage}"] = [module for module in map(submodule, names) if module is not None]
    for name, modules in groups.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_layer_event(events, name: str):
    """The first (layer 0's) top-level event of range ``name``."""
    for event in events:
        if event.name == name and event.device_type == torch.autograd.DeviceType.CPU:
            return event
    return None


def _time(event, cuda: bool) -> float:
    return (event.device_time_total if cuda else event.cpu_time_total) / 1e3


def _kernel_kind(name: str, sparse_names: frozenset[str] = frozenset()) -> str:
    lowered = name.lower()
    if any(mark in lowered for mark in DENSE_KERNEL_MARKS):
        return "text path"
    if any(mark in lowered for mark in FLEX_KERNEL_MARKS) or name.split("(")[0].split("<")[0].strip() in sparse_names:
        return "kernels"
    return "token-class packing"  # gathers, scatters, copies, index and elementwise work around the kernels


def _attention_split(event, cuda: bool, backend: str) -> dict[str, float]:
    """The compiled attention's time by kind: kernels, text path, token-class packing.

    On CUDA each kernel is classed by its name. On the CPU there are no
    kernels: the reference backend's whole time is its kernel; for the others
    an operator whose name marks dense or sparse attention is classed with its
    children, the rest counts as packing (indicative only)."""
    split = {"kernels": 0.0, "text path": 0.0, "token-class packing": 0.0}
    if not cuda and backend == "reference":
        split["kernels"] = event.cpu_time_total / 1e3
        return split
    # flex runs nsaflex's Triton scoring kernels beside FlexAttention: kernels too, not packing.
    sparse_names = sparse_kernel_names()

    def walk(node, inherited: str | None):
        here = inherited
        if here is None and not cuda and node is not event and _kernel_kind(node.name) != "token-class packing":
            here = _kernel_kind(node.name)
        if cuda:
            for kernel in node.kernels:
                split[_kernel_kind(kernel.name, sparse_names)] += kernel.duration / 1e3
        else:
            split[here or "token-class packing"] += node.self_cpu_time_total / 1e3
        for child in node.cpu_children:
            walk(child, here)

    walk(event, None)
    return split


def breakdown(model, inputs: dict[str, torch.Tensor], device: str, backend: str) -> dict[str, float]:
    """Stage times (ms) of decoder layer 0 in one profiled prefill, and its total (``layer``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    layer = model.model.language_model.layers[0]
    with layer_ranges(layer), profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        prefill(model, inputs)
        adapter_layer.sync(device)
    events = profiler.events()
    total_event = _first_layer_event(events, LAYER_RANGE)
    if total_event is None:
        raise RuntimeError("the profiler recorded no decoder layer range")
    # Only ranges inside layer 0's range count.
    inside = [e for e in events if e.time_range.start >= total_event.time_range.start and e.time_range.end <= total_event.time_range.end]
    stages = dict.fromkeys(STAGES, 0.0)
    for stage in MODULE_STAGES:
        for event in inside:
            if event.name == f"model_bench.{stage}" and event.device_type == torch.autograd.DeviceType.CPU:
                stages[stage] += _time(event, cuda)
    for event in inside:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if event.name == adapter_module.STAGE_GATES:
            stages["gates"] += _time(event, cuda)
        elif event.name == adapter_module.STAGE_TEXT_PATH:
            stages["text path"] += _time(event, cuda)
        elif event.name == adapter_module.STAGE_ATTENTION:
            for kind, ms in _attention_split(event, cuda, backend).items():
                stages[kind] += ms
    total = _time(total_event, cuda)
    if cuda:
        # Triton launches its kernels through the driver API, which the profiler may not tie to
        # the range that launched them: count them from the device activity, a layer's share.
        patched = sum(hasattr(module.self_attn, adapter_module.ATTN_NAME) for module in model.model.language_model.layers)
        unlinked = max(0.0, device_kernel_ms(profiler, sparse_kernel_names()) / max(1, patched) - stages["kernels"])
        stages["kernels"] += unlinked
        total += unlinked
    stages["other"] = max(0.0, total - sum(ms for name, ms in stages.items() if name != "other"))
    return {**stages, "layer": total}


def device_kernel_ms(profiler, names: frozenset[str]) -> float:
    """Device time (ms) of the kernels named in ``names`` over a whole profile,
    from the device activity records, whether or not a CPU range claimed them."""
    total_ns = 0
    for event in profiler.profiler.kineto_results.events():
        if event.device_type() != torch.autograd.DeviceType.CPU and event.name().split("(")[0].strip() in names:
            total_ns += event.duration_ns()
    return total_ns / 1e6


def environment(device: str) -> dict[str, Any]:
    import transformers

    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prefill lengths (default 32768 65536 131072)")
    parser.add_argument("--train-lengths", type=int, nargs="*", default=None, help="training-step lengths (default 32768 65536)")
    parser.add_argument("--backends", type=parse_backends, default=None, help="nsaflex backends, comma-separated (default triton,flex)")
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=None,
                        help="context lengths of the per-token decode timing (default 32768 131072; tiny 160)")
    parser.add_argument("--pattern", default="videonsa")
    parser.add_argument("--text", type=int, default=None, help="text tokens per input, the rest image tokens (default 200; tiny 32)")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (the 7B has 28)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the training step")
    parser.add_argument("--breakdown-length", type=int, default=None, help="length of the profiled prefill (default the longest; 0: none)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1; tiny 0)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default 3; tiny 1)")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds; later measurements are skipped")
    parser.add_argument("--json", default=None, help="write the record here (after every measurement)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if args.tiny:
        args.layers = min(args.layers, 2)
    lengths = args.lengths or ([160] if args.tiny else [32768, 65536, 131072])
    train_lengths = args.train_lengths if args.train_lengths is not None else ([160] if args.tiny else [32768, 65536])
    decode_lengths = args.decode_lengths if args.decode_lengths is not None else ([160] if args.tiny else [32768, 131072])
    args.warmup = (0 if args.tiny else 1) if args.warmup is None else args.warmup
    args.reps = (1 if args.tiny else 3) if args.reps is None else args.reps
    backends = args.backends or (["reference"] if args.tiny else ["triton", "flex"])
    if args.text is None:
        args.text = 32 if args.tiny else 200
    breakdown_length = max(lengths) if args.breakdown_length is None else args.breakdown_length
    if args.text >= min(lengths + train_lengths + decode_lengths):
        parser.error(f"--text {args.text} must be below every length (found {min(lengths + train_lengths + decode_lengths)})")

    model = adapter_layer.build_model(args.tiny, device, dtype, layers=args.layers)
    text = model.config.text_config
    record: dict[str, Any] = {
        "record": "model-bench",
        "command": "python benchmarks/model_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(device),
        "model": {
            "shape": "tiny" if args.tiny else "Qwen2.5-VL-7B text",
            "layers": text.num_hidden_layers,
            "hidden": text.hidden_size,
            "query_heads": text.num_attention_heads,
            "kv_heads": text.num_key_value_heads,
            "head_dim": text.hidden_size // text.num_attention_heads,
            "mlp": text.intermediate_size,
            "dtype": str(dtype).removeprefix("torch."),
            "weights": "random",
        },
        "pattern": args.pattern,
        "text_tokens": args.text,
        "checkpointing": args.checkpointing,
        "configs": [],
        "rows": [],
        "breakdown": [],
        "decode": [],
        "complete": False,
    }

    def save() -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as handle:
                json.dump(record, handle, indent=2)

    def late() -> bool:
        return time.perf_counter() - started > args.deadline

    def measure(config: str, backend: str) -> None:
        for passes, chosen in (("prefill", lengths), ("train", train_lengths)):
            for length in chosen:
                row: dict[str, Any] = {"pass": passes, "length": length, "config": config, "backend": backend}
                record["rows"].append(row)
                if late():
                    row["error"] = "skipped: deadline"
                    continue
                inputs = adapter_layer.make_inputs(length, args.text, device)
                try:
                    if passes == "prefill":
                        model.eval()
                        row.update(adapter_layer.timed(lambda: prefill(model, inputs), device, args.warmup, args.reps))
                        logits = prefill(model, inputs).float()
                        row["first_token"] = int(logits.argmax(-1)[0])
                        row["logits_finite"] = bool(torch.isfinite(logits).all())
                    else:
                        model.train()
                        if args.checkpointing:
                            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                        try:
                            row.update(adapter_layer.timed(lambda: train_step(model, inputs), device, args.warmup, args.reps))
                        finally:
                            if args.checkpointing:
                                model.gradient_checkpointing_disable()
                            model.zero_grad(set_to_none=True)
                            model.eval()
                    print(f"{config:16s} {passes:7s} L={length:7d} {row['ms']:10.1f} ms  peak {row.get('peak_gib', float('nan')):.1f} GiB",
                          flush=True)
                except Exception as error:  # record and go on: the other measurements stay useful
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    print(f"{config} {passes} L={length} failed: {row['error']}", flush=True)
                    traceback.print_exc()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                del inputs
                save()

    def measure_decode(config: str, backend: str, paths: list[str] | None) -> None:
        for length in decode_lengths:
            for kind in ("text", "vision"):
                row: dict[str, Any] = {"pass": "decode", "token": kind, "length": length, "config": config, "backend": backend}
                if paths is not None:
                    row["decode_path"] = paths
                record["decode"].append(row)
                if late():
                    row["error"] = "skipped: deadline"
                    continue
                step = None
                try:
                    model.eval()
                    step = decoder(model, adapter_layer.make_inputs(length, args.text, device), kind == "vision")
                    row.update(adapter_layer.timed(step, device, max(args.warmup, 1), max(args.reps, 3)))
                    row["logits_finite"] = bool(torch.isfinite(step().float()).all())
                    print(f"{config:16s} decode  L={length:7d} {kind:6s} {row['ms']:8.2f} ms/token", flush=True)
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    print(f"{config} decode {kind} L={length} failed: {row['error']}", flush=True)
                    traceback.print_exc()
                del step
                if device == "cuda":
                    torch.cuda.empty_cache()
                save()

    record["configs"].append(SDPA)
    measure(SDPA, SDPA)
    measure_decode(SDPA, SDPA, None)
    for asked in backends:
        config = f"nsaflex-{asked}"
        try:
            adapter = adapter_module.apply(model, args.pattern, backend=asked)
        except Exception as error:
            record["rows"].append({"pass": "apply", "length": 0, "config": config, "backend": asked,
                                   "error": f"{type(error).__name__}: {error}"})
            print(f"apply(backend={asked}) failed: {error}", flush=True)
            save()
            continue
        record["configs"].append(config)
        try:
            measure(config, adapter.backend)
            measure_decode(config, adapter.backend, sorted({row["decode"] for row in adapter.describe()}))
            if breakdown_length and not late():
                entry: dict[str, Any] = {"config": config, "backend": adapter.backend, "length": breakdown_length, "pass": "prefill"}
                try:
                    gc.collect()  # the decode timings' caches must not count against the profiled prefill
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    entry["stages_ms"] = breakdown(model, adapter_layer.make_inputs(breakdown_length, args.text, device), device, adapter.backend)
                except Exception as error:
                    entry["error"] = f"{type(error).__name__}: {error}"
                    traceback.print_exc()
                record["breakdown"].append(entry)
                save()
        finally:
            adapter.remove()
    record["complete"] = not late()
    record["seconds"] = time.perf_counter() - started
    save()
    print(f"done in {record['seconds']:.0f} s", flush=True)
    failed = [row for row in record["rows"] + record["decode"] if row.get("error") and not row["error"].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
