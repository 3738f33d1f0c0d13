"""One Qwen2.5-VL-7B decoder layer, patched with nsaflex against SDPA.

The real 7B text shape (hidden 3584, 28 query heads over 4 kv heads, head dim
128, MLP 18944), random weights, bf16, one decoder layer (the model is built
with ``num_hidden_layers=1``, a 1024-token vocabulary and a one-block vision
tower that is not run). Inputs are ``L`` tokens of which all but ``--text``
(default 200: half at the start, half at the end) are image tokens, classed by
``mm_token_type_ids`` as a processor would.

For each length: the unpatched layer (``attn_implementation="sdpa"``) and the
same layer after ``nsaflex.adapters.qwen2_5_vl.apply(model, pattern, backend)``
(gates included), timed for a forward pass (no grad) and a forward+backward
pass (loss = mean of the last hidden state). Times are CUDA-event medians over
``--reps`` runs after ``--warmup`` runs (the first nsaflex call compiles its
kernels); the timed region is ``Qwen2_5_VLModel.forward`` (embedding, the
layer, final norm; the embedding and norm are O(L * hidden) and negligible).
Peak memory is ``torch.cuda.max_memory_allocated`` during the timed runs,
absolute and above what was allocated before them (weights, inputs).

Results go to ``--json`` after every measurement (so a run cut short keeps
what it measured) and a Markdown table to ``--md``.

    python benchmarks/adapter_layer.py --json adapter.json --md adapter.md

(from an installed checkout: ``pip install -e .``). Its figures are carried by
hand in ``benchmarks/results/notes.md``, which ``benchmarks/results.py`` copies
into ``benchmarks/RESULTS.md``.

``--backends auto flex`` (the default) measures the backend ``auto`` picks, then
FlexAttention if ``auto`` picked another one.

``--attention-modes faithful videonsa_release`` measures the adapter in each
mode: ``videonsa_release`` runs the released VideoNSA numerics
(:mod:`nsaflex.reference_release`; the pattern through ``release_pattern``) on
the backend ``auto`` picks there (Triton on CUDA, through
:mod:`nsaflex.release_lowering`); rows and the Markdown table name the mode.

``--impls ... release-stack`` adds the released VideoNSA code's own kernel
stack as a baseline, in the same table (mode ``videonsa_release``): the adapter
in release mode with each sparse layer's attention replaced by
:class:`ReleaseStackAttention`, which runs the layer the way the release does
(FlexAttention compression with a BlockMask built on every call, fla-core's
``parallel_nsa_topk`` on the misread log-sum-exp, fla's selection kernel on the
padded query slots, a sliding window and the dense pass added; details and
where it departs from the release in the class docstring). It needs fla-core
(``pip install fla-core einops``); without it, or on a CPU without
``TRITON_INTERPRET=1``, its rows say why and the rest runs.

``--profile N`` adds, per measurement, the N operators and kernels with the
most self time in one more call (torch's profiler; device time on CUDA) to the
JSON: where a change moved the time, e.g. the text queries' backward; and the
patched attention's host time, device span and kernel-busy time in that call
(``attention``): a span well above its busy time is the GPU waiting for the host.

``--tiny`` runs a small configuration on the CPU (reference backend) to check
the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class _PatternsFinder:
    """``nsaflex.patterns`` is the top-level ``patterns/`` folder (pyproject's
    package-dir); map it when nsaflex runs from a checkout that is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "nsaflex.patterns":
            import importlib.util

            folder = os.path.join(ROOT, "patterns")
            return importlib.util.spec_from_file_location(
                name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
            )
        return None


try:
    import nsaflex.patterns  # noqa: F401  (installed package)
except ImportError:
    sys.modules.pop("nsaflex", None)
    sys.meta_path.insert(0, _PatternsFinder())

from nsaflex.adapters import qwen2_5_vl as adapter_module  # noqa: E402
from nsaflex.loader import load_pattern  # noqa: E402
from nsaflex.reference_release import release_pattern  # noqa: E402
from nsaflex.spec import Model  # noqa: E402

IMAGE_TOKEN = 1000


def build_model(tiny: bool, device: str, dtype: torch.dtype, layers: int = 1):
    """A random Qwen2.5-VL with the 7B text shape (``tiny``: hidden 128, 4/2
    heads) and ``layers`` decoder layers, a 1024-token vocabulary and a
    one-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if tiny:
        text = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
        mrope = [4, 6, 6]
    else:  # Qwen2.5-VL-7B
        text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
        mrope = [16, 24, 24]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            num_hidden_layers=layers,
            vocab_size=1024,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            rope_scaling={"type": "mrope", "mrope_section": mrope},
            rope_theta=1000000.0,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"]),
        image_token_id=IMAGE_TOKEN,
        video_token_id=IMAGE_TOKEN + 1,
        vision_start_token_id=IMAGE_TOKEN + 2,
        vision_end_token_id=IMAGE_TOKEN + 3,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(dtype)


def make_inputs(length: int, text: int, device: str):
    ids = torch.randint(3, 900, (1, length), device=device)
    mm = torch.zeros(1, length, dtype=torch.long, device=device)
    head = text // 2
    ids[:, head : length - (text - head)] = IMAGE_TOKEN
    mm[:, head : length - (text - head)] = 1
    positions = torch.arange(length, device=device)[None]
    return dict(input_ids=ids, mm_token_type_ids=mm, position_ids=positions)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(run, device: str, warmup: int, reps: int) -> dict:
    """Median ms of ``run()`` over ``reps`` calls after ``warmup`` calls
    (CUDA events on the GPU); on CUDA the peak memory allocated during the
    timed calls, absolute and above what was allocated before them, GiB."""
    compile_start = time.perf_counter()
    for _ in range(warmup):
        run()
    sync(device)
    first = time.perf_counter() - compile_start
    times = []
    if device == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    result = {"ms": statistics.median(times), "ms_all": times, "warmup_s": first}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result["peak_gib"] = peak / 2**30
        result["peak_above_resident_gib"] = (peak - before) / 2**30
    return result


def measure(model, inputs, device: str, backward: bool, warmup: int, reps: int, profile: int = 0) -> dict:
    """:func:`timed` of the layer's forward (``backward``: forward+backward);
    with ``profile`` > 0, also one more profiled call (:func:`profiled`): its
    ``profile`` operators with the most self time under ``"top_ops"`` and the
    patched attention's host and device time under ``"attention"``."""
    base = model.model

    def run():
        if backward:
            model.zero_grad(set_to_none=True)
            out = base(**inputs).last_hidden_state
            out.float().mean().backward()
        else:
            with torch.no_grad():
                base(**inputs)

    model.train(backward)
    result = timed(run, device, warmup, reps)
    if profile > 0:
        result.update(profiled(run, device, profile))
    model.zero_grad(set_to_none=True)
    return result


def profiled(run, device: str, count: int) -> dict:
    """One ``run()`` under torch's profiler: ``top_ops``, its ``count``
    operators and kernels with the most self time (device time on CUDA, CPU
    time elsewhere), ``{"name", "ms", "calls"}``, most first; and
    ``attention`` (:func:`attention_ranges`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda event: getattr(event, key), reverse=True)[:count]
    top = [{"name": event.key, "ms": getattr(event, key) / 1e3, "calls": event.count} for event in events]
    return {"top_ops": top, "attention": attention_ranges(prof.events())}


def attention_ranges(events) -> dict:
    """Where the patched attention's time goes, summed over the adapter's
    ``nsaflex.attention`` ranges of one profiled call (the compiled pattern: its
    packing, kernels and text path): ``calls``, ``host_ms`` (the ranges' host
    time) and, on CUDA, ``device_span_ms`` (first to last kernel launched in
    them) and ``kernels_busy_ms`` (the union of the kernels running inside that
    span). A span well above its busy time is the GPU waiting for the host."""
    from nsaflex.adapters.qwen2_5_vl import STAGE_ATTENTION

    host = [e for e in events if e.name == STAGE_ATTENTION and e.device_type == torch.autograd.DeviceType.CPU]
    spans = [e for e in events if e.name == STAGE_ATTENTION and e.device_type == torch.autograd.DeviceType.CUDA]
    result = {"calls": len(host), "host_ms": sum(e.time_range.elapsed_us() for e in host) / 1e3}
    if spans:
        # The adapter's other ranges appear among the device events too: not kernels.
        kernels = [e for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("nsaflex.")]
        busy = 0.0
        for span in spans:
            start, end = span.time_range.start, span.time_range.end
            inside = sorted((max(start, k.time_range.start), min(end, k.time_range.end)) for k in kernels
                            if k.time_range.end > start and k.time_range.start < end)
            covered = start
            for a, b in inside:  # union of the intervals, in order
                busy += max(0, b - max(a, covered))
                covered = max(covered, b)
        result["device_span_ms"] = sum(e.time_range.elapsed_us() for e in spans) / 1e3
        result["kernels_busy_ms"] = busy / 1e3
    return result


def pattern_for(pattern, mode: str):
    """``pattern`` as the adapter takes it in ``mode`` (release: ``release_pattern``)."""
    return release_pattern(pattern) if mode == "videonsa_release" else pattern


RELEASE_STACK = "release-stack"
RELEASE_STACK_NOTE = ("released VideoNSA stack: FlexAttention compression (BlockMask built every call, by compiled "
                      "mask creation: the release's eager one needs 128 GiB at 128K), "
                      "fla-core parallel_nsa_topk + parallel_nsa_fwd on the padded slots; window on FlexAttention "
                      "(the release's flash-attn is not installed), dense pass on SDPA")


def release_stack_unavailable(device: str) -> str | None:
    """Why :class:`ReleaseStackAttention` cannot run on ``device`` (None when it can).
    The interpreter is checked first: Triton reads ``TRITON_INTERPRET`` when fla's
    kernels are defined, at its import."""
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "fla's Triton kernels need CUDA, or TRITON_INTERPRET=1 on the CPU"
    try:
        import fla.ops.nsa.parallel  # noqa: F401
        import fla.ops.utils.pooling  # noqa: F401
    except Exception as error:  # an ImportError, or fla's own import-time checks
        return f"fla-core is not installed ({type(error).__name__}: {error}); pip install fla-core einops"
    return None


def pin_fla_autotune() -> None:
    """Under ``TRITON_INTERPRET=1`` give fla's autotuned kernels one config each:
    the interpreter has no benchmarker to choose between several."""
    import fla.ops.nsa.parallel as parallel
    import fla.ops.utils.pooling as pooling
    from triton.runtime.autotuner import Autotuner

    for module in (parallel, pooling):
        for value in vars(module).values():
            while not isinstance(value, Autotuner) and hasattr(value, "fn"):
                value = value.fn  # heuristics wrap the autotuner
            if isinstance(value, Autotuner):
                value.configs = value.configs[:1]


class ReleaseStackAttention:
    """One layer's attention run by the released VideoNSA code's kernel stack,
    as a drop-in for the adapter's compiled release attention
    (``attn(q, k, v, gates, token_types) -> out``, ``[B, Hq, L, D]`` in and out;
    ``k, v [B, Hkv, L, D]``; ``gates [B, Hq, L, 3]`` sigmoid values; ``token_types
    [B, L]``, 0 text). What the release does, step by step:

    * text keys, values and (for the sparse branches) queries zeroed (Q2, Q3);
      the sparse branches run on ``P`` padded slots ``[q, q, 0...]`` in fla's
      ``[B, L, P, D]`` layout, slot ``s`` on kv head ``s // (P / Hkv)`` (Q4);
    * fla's ``mean_pooling`` of the zeroed keys and values (last block partial);
    * compression: ``flex_attention`` with ``return_lse`` over a BlockMask that
      ``create_block_mask`` builds on every call from ``q_idx <= (kv_idx + 1) * l
      - 1`` (Q1) for ``B`` rows and ``P`` heads, as the release (compiled mask
      creation on CUDA, where the release's eager one would need ``B P L N``
      entries: 128 GiB at 128K);
    * top-n: fla's ``parallel_nsa_topk`` reading the ``[B, P, L]`` log-sum-exp as
      ``[B, L, P]`` (Q6), ``S`` rounded to a power of two by the kernel (Q7);
    * selection: fla's ``parallel_nsa_fwd`` on those indices;
    * window: causal band of ``w`` on FlexAttention (the release calls flash-attn's
      ``window_size=(w - 1, 0)``, not installed where this runs; the window
      BlockMask is built once per length and cached, since flash-attn needs none);
    * gates ``[g, g, 0...]`` with text rows' gates 0.5; head ``h`` the mean of
      slots ``h`` and ``Hq + h``; plus the dense pass (SDPA, causal, vision
      queries zeroed, every key) on every row (Q3).

    Where fla-core 0.6.0 departs from the release's fla: its ``parallel_nsa_topk``
    forces the first block and the block before the current one besides the
    current block (the release's forced only the current one, Q5), and takes the
    key length ``TK``. The cost is the release's; the selected blocks differ
    from :mod:`nsaflex.reference_release` for queries past the third block
    whose top-``S`` would not have included those blocks.
    """

    def __init__(self, pattern, compiled) -> None:
        self.pattern = pattern
        self.compiled = compiled  # the adapter's own release attention: backend, pooler, plan for describe()
        self._window_masks: dict = {}
        self._flex = None
        self.last_indices: torch.Tensor | None = None

    def __getattr__(self, name: str):
        if name == "compiled":
            raise AttributeError(name)
        return getattr(self.compiled, name)

    def flex(self, device: torch.device):
        """``flex_attention``, compiled on CUDA (the eager path materialises every score)."""
        from torch.nn.attention.flex_attention import flex_attention

        if device.type != "cuda":
            return flex_attention
        if self._flex is None:
            self._flex = torch.compile(flex_attention, dynamic=False)
        return self._flex

    def window_mask(self, length: int, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask

        size = self.pattern.window.size
        key = (length, str(device))
        if key not in self._window_masks:
            def band(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx < size)

            # Compiled mask creation on CUDA: the eager one materialises all L x L entries (16 GiB at 128K).
            self._window_masks[key] = create_block_mask(band, None, None, length, length, device=device,
                                                        _compile=device.type == "cuda")
        return self._window_masks[key]

    def __call__(self, q, k, v, gates=None, token_types=None, *, lengths=None, **unused):
        from fla.ops.nsa.parallel import parallel_nsa_fwd, parallel_nsa_topk
        from fla.ops.utils.pooling import mean_pooling
        from torch.nn.attention.flex_attention import create_block_mask

        from nsaflex.errors import InputError
        from nsaflex.reference_release import TEXT_GATE, padded_slots

        if lengths is not None:
            raise InputError("lengths", "None (the released stack runs whole rows, no padding)", "a tensor")
        pattern = self.pattern
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        block = pattern.compression.block
        slots = padded_slots(heads, kv_heads)
        scale = dim ** -0.5
        flex = self.flex(q.device)
        vision = token_types.to(q.device) != 0
        vis = vision[:, None, :, None].to(q.dtype)
        keys, values, queries = k * vis, v * vis, q * vis  # Q2, Q3
        slot_q = torch.cat([queries, queries, queries.new_zeros(batch, slots - 2 * heads, length, dim)], dim=1)  # Q4
        q_fla = slot_q.transpose(1, 2).contiguous()  # fla's [B, L, P, D]
        k_fla, v_fla = keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()
        k_cmp, v_cmp = mean_pooling(k_fla, block), mean_pooling(v_fla, block)  # [B, N, Hkv, D]

        def own_and_later(b, h, q_idx, kv_idx):  # Q1
            return q_idx <= (kv_idx + 1) * block - 1

        # Compiled mask creation on CUDA, as for the window: the release's eager one materialises
        # B x P x L x N entries (128 GiB at 128K, more than the card holds). The baseline is faster for it.
        mask = create_block_mask(own_and_later, batch, slots, length, k_cmp.shape[1], device=q.device,
                                 _compile=q.device.type == "cuda")
        o_cmp, lse = flex(slot_q, k_cmp.transpose(1, 2), v_cmp.transpose(1, 2), block_mask=mask, scale=scale,
                          enable_gqa=True, return_lse=True)
        misread = lse.contiguous().view(batch, length, slots)  # Q6: [B, P, L] read as [B, L, P]
        indices = parallel_nsa_topk(q_fla, k_cmp, length, misread, pattern.selection.count, block, scale)
        self.last_indices = indices  # [B, L, Hkv, S], for the tests
        o_slc, _ = parallel_nsa_fwd(q_fla, k_fla, v_fla, indices, indices.shape[-1], block, scale)
        o_win = flex(slot_q, keys, values, block_mask=self.window_mask(length, q.device), scale=scale, enable_gqa=True)

        if gates is None:
            gates = torch.tensor(pattern.gate.values, dtype=q.dtype, device=q.device).expand(batch, heads, length, 3)
        gates = torch.where(vision[:, None, :, None], gates.to(q.dtype), torch.full((), TEXT_GATE, dtype=q.dtype, device=q.device))
        slot_gates = torch.cat([gates, gates, gates.new_zeros(batch, slots - 2 * heads, length, 3)], dim=1)
        mixed = (slot_gates[..., 0:1] * o_cmp.to(q.dtype) + slot_gates[..., 1:2] * o_slc.transpose(1, 2).to(q.dtype)
                 + slot_gates[..., 2:3] * o_win.to(q.dtype))
        sparse = (mixed[:, :heads] + mixed[:, heads : 2 * heads]) * 0.5
        dense = torch.nn.functional.scaled_dot_product_attention(q * (1 - vis), k, v, is_causal=True, scale=scale,
                                                                 enable_gqa=True)
        return sparse + dense


def apply_release_stack(model, pattern):
    """The adapter in ``videonsa_release`` mode with each sparse layer's attention
    run by :class:`ReleaseStackAttention` (the gates stay the adapter's)."""
    adapter = adapter_module.apply(model, release_pattern(pattern), mode="videonsa_release")
    for layer in adapter.layers:
        if layer.compiled is not None and not layer.dense:
            layer.compiled = ReleaseStackAttention(layer.pattern, layer.compiled)
    return adapter


def correctness_check(report: dict, pattern, backends, device: str, mode: str = "faithful") -> None:
    """Before timing: a tiny model (hidden 128, 4/2 heads) on the same device and
    dtype, a padded batch of two rows with vision spans; logits and 4 greedy
    tokens of each backend against the reference backend (same gates), in
    adapter mode ``mode``."""
    check = report.setdefault("check", {})
    start = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    small = pattern_for(dataclasses.replace(pattern, model=Model()), mode)
    model = build_model(True, device, dtype)
    length = 320
    ids = torch.randint(3, 900, (2, length), device=device)
    mask = torch.ones(2, length, dtype=torch.long, device=device)
    mask[1, :37] = 0  # left padding
    ids[0, 20:300] = IMAGE_TOKEN
    ids[1, 60:200] = IMAGE_TOKEN
    ids[1, 220:310] = IMAGE_TOKEN
    ids[1, :37] = 2
    inputs = dict(input_ids=ids, attention_mask=mask)
    results = {}
    adapter = adapter_module.apply(model, small, backend="reference", mode=mode)
    with torch.no_grad():
        for parameter in adapter.gate_parameters():
            parameter.normal_(0, 0.05)
        expected = model(**inputs).logits.float()
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
    gates = {k: v.clone() for k, v in model.state_dict().items() if ".g_proj" in k}
    adapter.remove()
    scale = expected[mask.bool()].abs().max().item()
    for backend in backends:
        try:
            adapter = adapter_module.apply(model, small, backend=backend, state_dict=gates, mode=mode)
            name = adapter.describe()[0]["backend"] + ("" if mode == "faithful" else f" {mode}")
            with torch.no_grad():
                got = model(**inputs).logits.float()
            diff = (got - expected)[mask.bool()].abs().max().item()
            same = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
            results[name] = {
                "max_abs_logit_diff": diff,
                "logit_scale": scale,
                "greedy_tokens_equal": bool(torch.equal(same, tokens)),
            }
            adapter.remove()
        except Exception as error:
            results[backend] = {"error": f"{type(error).__name__}: {error}"}
            traceback.print_exc()
    check.update(results)
    check["seconds"] = time.perf_counter() - start
    print("check:", json.dumps(check), flush=True)
    del model


def write_markdown(report: dict, path: str) -> None:
    lines = [
        "# One Qwen2.5-VL-7B decoder layer: nsaflex adapter vs SDPA",
        "",
        f"Device: {report['device']}; torch {report['torch']}; transformers {report['transformers']}; "
        f"pattern `{report['pattern']}`; backends asked {report['backend']}; {report['dtype']}; {report['text']} text tokens, the rest image tokens.",
        "",
        "Times: CUDA-event medians (ms) of `Qwen2_5_VLModel.forward` with one decoder layer (hidden 3584, 28/4 heads, "
        "MLP 18944); fwd without grad, fwd+bwd with loss = mean of the output. Memory: peak allocated during the timed "
        "runs above what was resident before them (weights, inputs), GiB.",
        "",
        "| L | impl | backend | mode | fwd ms | fwd+bwd ms | fwd peak GiB | fwd+bwd peak GiB | note |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]

    def cell(entry, key, fmt):
        if entry is None or key not in entry:
            return "-"
        return fmt.format(entry[key])

    for row in report["results"]:
        fwd, bwd = row.get("fwd"), row.get("fwdbwd")
        note = row.get("error", "")
        if len(note) > 120:
            note = note[:117] + "..."
        lines.append(
            f"| {row['length']} | {row['impl']} | {row.get('backend', '-')} | {row.get('mode', '-')} | {cell(fwd, 'ms', '{:.1f}')} | "
            f"{cell(bwd, 'ms', '{:.1f}')} | {cell(fwd, 'peak_above_resident_gib', '{:.2f}')} | "
            f"{cell(bwd, 'peak_above_resident_gib', '{:.2f}')} | {note.replace('|', '/')} |"
        )
    speedups = []
    dense_rows = {r["length"]: r for r in report["results"] if r["impl"] == "sdpa"}
    for sparse in report["results"]:
        dense = dense_rows.get(sparse["length"])
        if sparse["impl"] not in ("nsaflex", RELEASE_STACK) or dense is None:
            continue
        name = sparse["backend"] if sparse["impl"] == "nsaflex" else RELEASE_STACK
        for mode in ("fwd", "fwdbwd"):
            if dense.get(mode) and sparse.get(mode):
                speedups.append(f"L={sparse['length']} {name} {sparse.get('mode', 'faithful')} {mode}: "
                                f"{dense[mode]['ms'] / sparse[mode]['ms']:.2f}x")
    if speedups:
        lines += ["", "SDPA time / sparse time: " + "; ".join(speedups) + "."]
    stack = {r["length"]: r for r in report["results"] if r["impl"] == RELEASE_STACK}
    against = []
    for ours in report["results"]:
        theirs = stack.get(ours["length"])
        if ours["impl"] != "nsaflex" or ours.get("mode") != "videonsa_release" or theirs is None:
            continue
        for mode in ("fwd", "fwdbwd"):
            if theirs.get(mode) and ours.get(mode):
                against.append(f"L={ours['length']} {ours['backend']} {mode}: {theirs[mode]['ms'] / ours[mode]['ms']:.2f}x")
    if against:
        lines += ["", f"{RELEASE_STACK} time / nsaflex videonsa_release time (the same numerics on the released kernels "
                  "and on nsaflex): " + "; ".join(against) + "."]
    if stack:
        lines += ["", f"{RELEASE_STACK}: {RELEASE_STACK_NOTE}; fla-core 0.6.0's top-n also forces the first block and "
                  "the block before the current one (the release's forced only the current block)."]
    if report.get("check"):
        lines += [
            "",
            "Correctness check on the same device and dtype (tiny model, 2 rows of 320 tokens, left padding, "
            "vision spans; against the reference backend with the same gates): "
            + "; ".join(
                f"{name}: " + (value["error"] if "error" in value else
                               f"max |logit diff| {value['max_abs_logit_diff']:.3g} (logits up to {value['logit_scale']:.3g}), "
                               f"4 greedy tokens {'equal' if value['greedy_tokens_equal'] else 'DIFFERENT'}")
                for name, value in report["check"].items() if isinstance(value, dict)
            )
            + ".",
        ]
    lines += ["", "Produced by `benchmarks/adapter_layer.py`; raw numbers in the JSON beside this file.", ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--text", type=int, default=200)
    parser.add_argument("--pattern", default="videonsa")
    parser.add_argument("--backends", nargs="+", default=["auto", "flex"],
                        help="nsaflex backends to measure, in order (one already measured is skipped)")
    parser.add_argument("--impls", nargs="+", default=["sdpa", "nsaflex"], choices=("sdpa", "nsaflex", RELEASE_STACK),
                        help=f"{RELEASE_STACK}: the released VideoNSA kernel stack (fla-core), mode videonsa_release")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"])
    parser.add_argument("--attention-modes", nargs="+", default=["faithful"], choices=adapter_module.MODES,
                        help="adapter modes to measure for each backend (videonsa_release: the released numerics)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds; later measurements are skipped")
    parser.add_argument("--json", default="benchmarks/adapter-layer.json")
    parser.add_argument("--md", default="benchmarks/adapter-layer.md")
    parser.add_argument("--tiny", action="store_true", help="small CPU configuration (checks the script)")
    parser.add_argument("--check", action="store_true", help="first compare each backend with the reference on a tiny model")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after each measurement, profile one more call and keep its N operators with the most "
                             "self time (device time on CUDA) in the JSON (top_ops)")
    args = parser.parse_args()

    started = time.perf_counter()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if args.tiny:
        args.backends = ["reference"]
    import transformers

    pattern = load_pattern(args.pattern)
    # One decoder layer: drop the pattern's layer count (and the shape check on a tiny config).
    model_section = Model() if args.tiny else dataclasses.replace(pattern.model, num_layers=None)
    pattern = dataclasses.replace(pattern, model=model_section, layers=())
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pattern": pattern.name,
        "backend": " ".join(args.backends),
        "attention_modes": args.attention_modes,
        "text": args.text,
        "dtype": str(dtype),
        "results": [],
    }

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        write_markdown(report, args.md)

    if args.check:
        for mode in args.attention_modes:
            try:
                correctness_check(report, pattern, [b for b in args.backends if b != "reference"] or ["reference"], device,
                                  mode)
            except Exception as error:
                report.setdefault("check", {})[f"error {mode}"] = {"error": f"{type(error).__name__}: {error}"}
                traceback.print_exc()
            save()
    model = build_model(args.tiny, device, dtype)
    runs = [("sdpa", None, None)] if "sdpa" in args.impls else []
    if "nsaflex" in args.impls:
        runs += [("nsaflex", backend, mode) for mode in args.attention_modes for backend in args.backends]
    if RELEASE_STACK in args.impls:
        runs.append((RELEASE_STACK, None, "videonsa_release"))
    measured_backends = set()
    for impl, asked, attention_mode in runs:
        adapter = None
        backend = "sdpa"
        if impl == RELEASE_STACK:
            reason = release_stack_unavailable(device)
            if time.perf_counter() - started > args.deadline:
                reason = "the deadline passed before it started"
            if reason is not None:
                report["results"] += [{"length": length, "impl": impl, "backend": "fla", "mode": attention_mode,
                                       "error": f"skipped: {reason}"} for length in args.lengths]
                print(f"{impl} skipped: {reason}", flush=True)
                save()
                continue
            try:
                if device != "cuda":
                    pin_fla_autotune()
                adapter = apply_release_stack(model, pattern)
            except Exception as error:  # record and go on, as for the nsaflex runs
                report["results"].append({"length": 0, "impl": impl, "backend": "fla", "mode": attention_mode,
                                          "error": f"apply: {type(error).__name__}: {error}"})
                traceback.print_exc()
                save()
                continue
            backend = "fla"
        elif impl == "nsaflex":
            if time.perf_counter() - started > args.deadline:
                break
            try:
                adapter = adapter_module.apply(model, pattern_for(pattern, attention_mode), backend=asked, mode=attention_mode)
            except Exception as error:  # record and go on: the other runs stay useful
                report["results"].append({"length": 0, "impl": impl, "backend": asked, "mode": attention_mode,
                                          "error": f"apply: {type(error).__name__}: {error}"})
                print(f"apply(backend={asked}, mode={attention_mode}) failed: {error}", flush=True)
                save()
                continue
            backend = adapter.describe()[0]["backend"]
            if (backend, attention_mode) in measured_backends:
                adapter.remove()
                continue
            measured_backends.add((backend, attention_mode))
        for length in args.lengths:
            row = {"length": length, "impl": impl, "backend": backend, "mode": attention_mode or "-"}
            if impl == RELEASE_STACK:
                row["note"] = RELEASE_STACK_NOTE
            report["results"].append(row)
            inputs = make_inputs(length, args.text, device)
            for mode in args.modes:
                if time.perf_counter() - started > args.deadline:
                    row["error"] = (row.get("error", "") + f" {mode}: skipped (deadline)").strip()
                    continue
                if impl == RELEASE_STACK and mode == "fwdbwd":
                    row["error"] = (row.get("error", "") + " fwdbwd: skipped (fla's parallel_nsa_topk / parallel_nsa_fwd "
                                    "are called forward-only, as the release's inference path)").strip()
                    continue
                try:
                    row[mode] = measure(model, inputs, device, mode == "fwdbwd", args.warmup, args.reps, args.profile)
                    print(f"{impl:8s} {backend:9s} {row['mode']:16s} L={length:7d} {mode:7s} {row[mode]['ms']:9.1f} ms  "
                          f"peak+{row[mode].get('peak_above_resident_gib', float('nan')):.2f} GiB  "
                          f"(warmup {row[mode]['warmup_s']:.1f} s)", flush=True)
                except Exception as error:
                    message = f"{mode}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    row["error"] = (row.get("error", "") + " " + message).strip()
                    print(f"{impl} {backend} L={length} {mode} failed: {message}", flush=True)
                    traceback.print_exc()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                save()
            del inputs
        if adapter is not None:
            adapter.remove()
    save()
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
