"""Benchmark of the Triton NSA backend (until `nsaflex bench` exists).

    PYTHONPATH=. python benchmarks/triton_bench.py --lengths 16k,32k,64k,128k --inputs video,random \
        --json $OUT/triton.json [--variants] [--baselines] [--profile]

B = 1, 28 query heads over 4 kv heads, D = 128, bf16, the bundled ``videonsa``
pattern (token-level selection), every token vision (the hybrid layout is then
the identity). Inputs:

* ``random``: q, k, v ~ N(0, 1): selections of neighbouring tokens share little.
* ``video``: :func:`nsaflex.video_inputs.video_qkv` (frames of 256 patches from
  a slowly varying latent field), the generator of ``nsaflex bench --inputs video``.

Reports medians of ``triton.testing.do_bench`` (forward; forward+backward), the
per-kernel device times of one profiled forward+backward, the union of a
row tile's selected blocks against the n blocks one token selects, counted
FLOPs and achieved TFLOP/s, and cuDNN dense causal SDPA measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

from nsaflex.backends import triton as backend
from nsaflex.kernels import ops
from nsaflex.loader import load_pattern

H, HKV, D = 28, 4, 128
CONFIG: dict = {}  # KernelConfig overrides of the main table (--config)


def parse_config(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        for conv in (int, float):
            try:
                value = conv(value)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def parse_len(s: str) -> int:
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def make_inputs(kind: str, L: int, seed: int = 0):
    """The inputs of ``nsaflex bench --inputs video|random`` (nsaflex.video_inputs)."""
    from nsaflex.video_inputs import random_qkv, video_qkv

    maker = video_qkv if kind == "video" else random_qkv
    q, k, v = maker(1, H, HKV, L, D, seed=seed, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 7)
    gates = torch.rand(1, H, L, 3, generator=g).to("cuda", torch.bfloat16)
    return q.contiguous(), k.contiguous(), v.contiguous(), gates


def bench(fn, rep=200):
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def counted_flops(L: int, pattern, sel_counts=None):
    """Useful forward FLOPs per kernel (dense-equivalent of attended pairs):
    ``cmp_lse`` the compression's QK, ``cmp_score`` its QK and PV (the split
    when the score pass computes the output)."""
    c, s, w = pattern.compression, pattern.selection, pattern.window
    t = torch.arange(L, dtype=torch.float64)
    n_vis = torch.clamp((t + 1 - c.block) // c.stride + 1, min=0).sum().item()
    win = torch.clamp(t + 1, max=w.size).sum().item()
    if sel_counts is None:
        blocks = torch.clamp(torch.div(t, s.block, rounding_mode="floor") + 1, max=s.count)
        slc = (blocks * s.block).sum().item()
    else:
        slc = sel_counts
    f = 4 * H * D
    return {"cmp_lse": f / 2 * n_vis, "cmp_score": f * n_vis, "selection": f * slc, "window": f * win}


def kernel_breakdown(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        dt = getattr(evt, "device_time_total", None)
        if dt is None:
            dt = getattr(evt, "cuda_time_total", 0)
        if dt and evt.key:
            out[evt.key[:80]] = out.get(evt.key[:80], 0.0) + dt / 1000.0
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def compiled_resources(name: str) -> list[dict]:
    """Registers, spilled bytes, shared memory and launch options of every compiled
    specialisation of kernel ``name`` (forward or backward module) so far: a
    variant's cap or pipeline depth shows in what ptxas made of it. Empty where
    this triton keeps its caches elsewhere."""
    from nsaflex.kernels import backward as bwd_mod
    from nsaflex.kernels import forward as fwd_mod

    kernel = getattr(fwd_mod, name, None) or getattr(bwd_mod, name, None)
    rows = []
    for entry in getattr(kernel, "device_caches", {}).values():
        for compiled in (entry[0] if isinstance(entry, tuple) else entry).values():
            meta = compiled.metadata
            rows.append({"regs": getattr(compiled, "n_regs", None), "spill": getattr(compiled, "n_spills", None),
                         "shared": getattr(meta, "shared", None), "stages": getattr(meta, "num_stages", None),
                         "maxnreg": getattr(meta, "maxnreg", None)})
    return rows


def spy_forward(pattern, cfg, q, k, v, gates, types):
    """The forward kernels' residuals (block lists, tile unions) for one call."""
    with ops.record_forward() as seen, torch.no_grad():
        backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)
    return seen


def union_stats(seen, cfg, L):
    tiles = seen["tiles"]
    uc = seen["UC"].double()
    sel = seen["sel"]
    per_token = (sel >= 0).sum(-1).double().mean().item()
    return {
        "tile_tokens": tiles.bt_sel,
        "union_blocks_per_tile_mean": uc.mean().item(),
        "union_blocks_per_tile_late_half_mean": uc.view(HKV, -1)[:, uc.shape[0] // HKV // 2:].mean().item(),
        "selected_blocks_per_token_mean": per_token,
        "union_over_n": uc.mean().item() / max(per_token, 1e-9),
        "selected_keys_total": float((sel >= 0).sum().item()) * cfg.slc_block / HKV,
    }


def run_length(pattern, L, kind, args, results):
    q, k, v, gates = make_inputs(kind, L)
    types = torch.ones(1, L, dtype=torch.long, device="cuda")
    row = {"L": L, "inputs": kind}
    cfg = ops.make_config(pattern, **CONFIG)
    row["config"] = {"topn": cfg.topn, "topn_chunk": cfg.topn_chunk, "select_tokens": cfg.select_tokens}
    fwd = lambda: backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)  # noqa: E731
    with torch.no_grad():
        row["fwd_ms"] = bench(fwd)
    seen = spy_forward(pattern, cfg, q, k, v, gates, types)
    row.update(union_stats(seen, cfg, L))
    flops = counted_flops(L, pattern)
    row["counted_fwd_tflop"] = sum(flops.values()) / 1e12
    row["fwd_tflops"] = row["counted_fwd_tflop"] / row["fwd_ms"] * 1e3
    if args.backward:
        qg, kg, vg, gg = (x.detach().requires_grad_() for x in (q, k, v, gates))
        do = torch.randn_like(q)

        def fb():
            out = backend._sparse_forward(pattern, cfg, qg, kg, vg, gg, types, None)
            torch.autograd.grad(out, (qg, kg, vg, gg), do)

        row["fwdbwd_ms"] = bench(fb, rep=300)
        if args.profile:
            row["kernels_fwdbwd_ms"] = kernel_breakdown(fb)
    if args.profile:
        with torch.no_grad():
            row["kernels_fwd_ms"] = kernel_breakdown(fwd)
        ks = row["kernels_fwd_ms"]
        per = {}
        for name, key in (("cmp_lse", "cmp_lse_kernel"), ("cmp_score", "cmp_score_kernel"), ("slc_win", "slc_win_kernel")):
            ms = sum(v for n, v in ks.items() if key in n)
            if ms:
                f = flops[name] if name != "slc_win" else flops["selection"] + flops["window"]
                if cfg.output_in_lse and name in ("cmp_lse", "cmp_score"):
                    # the lse pass then does QK and PV, the score pass QK only
                    f = flops["cmp_score" if name == "cmp_lse" else "cmp_lse"]
                per[name] = {"ms": ms, "tflop": f / 1e12, "tflops": f / ms / 1e9}
        per["topn_select"] = {"ms": sum(v for n, v in ks.items() if "topn_select_kernel" in n)}
        row["per_kernel_fwd"] = per
    if args.baselines:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["cudnn_causal_fwd_ms"] = bench(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
                if args.backward:
                    qg, kg, vg = (x.detach().requires_grad_() for x in (q, kr, vr))
                    do = torch.randn_like(q)
                    row["cudnn_causal_fwdbwd_ms"] = bench(lambda: torch.autograd.grad(
                        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), do))
            row["fwd_speedup_vs_cudnn"] = row["cudnn_causal_fwd_ms"] / row["fwd_ms"]
        except Exception as e:  # noqa: BLE001
            row["cudnn_error"] = repr(e)[:200]
    results.append(row)
    print(json.dumps({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items() if not k_.startswith("kernels")}), flush=True)
    del q, k, v, gates
    torch.cuda.empty_cache()


def run_variants(pattern, L, results):
    """Selection-kernel tile shapes: tokens per row tile x warps, both input kinds (forward only)."""
    for kind in ("video", "random"):
        q, k, v, gates = make_inputs(kind, L)
        types = torch.ones(1, L, dtype=torch.long, device="cuda")
        variants = [dict(), dict(insert_max=4), dict(insert_max=16), dict(num_stages=3), dict(num_stages=1),
                    dict(score_tokens=32, num_warps_score=8), dict(num_warps_score=4)]
        for over in variants:
            cfg = ops.make_config(pattern, **over)
            row = {"variant": ", ".join(f"{a}={b}" for a, b in over.items()) or "default", "L": L, "inputs": kind}
            try:
                with torch.no_grad():
                    fwd = lambda: backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)  # noqa: E731
                    row["fwd_ms"] = bench(fwd, rep=100)
                    row["kernels_fwd_ms"] = {n: t for n, t in kernel_breakdown(fwd).items() if "kernel" in n}
                seen = spy_forward(pattern, cfg, q, k, v, gates, types)
                row["union_blocks_per_tile_mean"] = seen["UC"].double().mean().item()
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:300]
            results.append(row)
            print(json.dumps(row), flush=True)


def run_topn_compare(pattern, lengths, kinds, results, rep=100):
    """The top-n paths in one run: in-kernel running top-n ("fused"), the
    two-step select kernel, and torch.topk on packed int64 keys (forward only,
    per-kernel times of one profiled forward). Also checks that the three
    paths select the same blocks."""
    for L in lengths:
        for kind in kinds:
            q, k, v, gates = make_inputs(kind, L)
            types = torch.ones(1, L, dtype=torch.long, device="cuda")
            sels = {}
            for topn in ("fused", "select", "torch"):
                cfg = ops.make_config(pattern, topn=topn)
                row = {"what": "topn", "topn": topn, "L": L, "inputs": kind}
                try:
                    with torch.no_grad():
                        fwd = lambda: backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)  # noqa: E731
                        row["fwd_ms"] = bench(fwd, rep=rep)
                        kern = kernel_breakdown(fwd)
                    row["kernels_fwd_ms"] = {n: t for n, t in kern.items() if t >= 0.05}
                    row["score_ms"] = sum(t for n, t in kern.items() if "cmp_score_kernel" in n)
                    row["topn_ms"] = sum(t for n, t in kern.items() if any(x in n.lower() for x in (
                        "topn_select", "topk", "radix", "gathertopk", "fill", "sort")))
                    seen = spy_forward(pattern, cfg, q, k, v, gates, types)
                    sel = seen["sel"]
                    sels[topn] = torch.sort(torch.where(sel >= 0, sel, 1 << 30), dim=-1).values
                    if "fused" in sels and topn != "fused":
                        row["same_blocks_as_fused"] = bool(torch.equal(sels[topn], sels["fused"]))
                        row["rows_differing_from_fused"] = int((sels[topn] != sels["fused"]).any(-1).sum())
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    row["error"] = repr(e)[:300]
                results.append(row)
                print(json.dumps({a: b for a, b in row.items() if a != "kernels_fwd_ms"}), flush=True)
            del q, k, v, gates, sels
            torch.cuda.empty_cache()


def run_tile_variants(pattern, L, results, variants, inputs=("video", "random"), backward=True):
    """Selection tile variants (item 2): forward and (``backward``) forward+backward, per input kind."""
    for kind in inputs:
        q, k, v, gates = make_inputs(kind, L)
        types = torch.ones(1, L, dtype=torch.long, device="cuda")
        for over in variants:
            cfg = ops.make_config(pattern, **over)
            row = {"what": "tile", "variant": ", ".join(f"{a}={b}" for a, b in over.items()) or "default", "L": L, "inputs": kind}
            try:
                with torch.no_grad():
                    fwd = lambda: backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)  # noqa: E731
                    row["fwd_ms"] = bench(fwd, rep=100)
                    kern = kernel_breakdown(fwd)
                row["slc_win_ms"] = sum(t for n, t in kern.items() if "slc_win_kernel" in n)
                row["kernels_fwd_ms"] = {n: t for n, t in kern.items() if t >= 0.05}
                row["slc_win_compiled"] = compiled_resources("slc_win_kernel")
                if not backward:
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                qg, kg, vg, gg = (x.detach().requires_grad_() for x in (q, k, v, gates))
                do = torch.randn_like(q)

                def fb():
                    out = backend._sparse_forward(pattern, cfg, qg, kg, vg, gg, types, None)
                    torch.autograd.grad(out, (qg, kg, vg, gg), do)

                row["fwdbwd_ms"] = bench(fb, rep=100)
                kern = kernel_breakdown(fb)
                row["bwd_dq_ms"] = sum(t for n, t in kern.items() if "bwd_dq_kernel" in n)
                row["bwd_slc_dkv_ms"] = sum(t for n, t in kern.items() if "bwd_slc_dkv_kernel" in n)
                row["kernels_fwdbwd_ms"] = {n: t for n, t in kern.items() if t >= 0.05}
                seen = spy_forward(pattern, cfg, q, k, v, gates, types)
                row.update(union_stats(seen, cfg, L))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row["error"] = repr(e)[:300]
            results.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v, gates
        torch.cuda.empty_cache()


def run_window_vs_flex(L, results):
    """Window branch alone: the custom kernel against FlexAttention (item 3 of the issue)."""
    from nsaflex.spec import Gate, Pattern, Window
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    W = 256
    pattern = Pattern(name="w", window=Window(size=W), gate=Gate(kind="constant", values=(1.0,)))
    q, k, v, _ = make_inputs("random", L)
    cfg = ops.make_config(pattern)
    gates = torch.ones(1, H, L, 1, device="cuda", dtype=q.dtype)
    row = {"what": "window 256 alone", "L": L}
    with torch.no_grad():
        row["triton_fwd_ms"] = bench(lambda: backend._sparse_forward(pattern, cfg, q, k, v, gates, None, None))

    def sw(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < W)

    bm = torch.compile(create_block_mask)(sw, None, None, L, L, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    row["flex_fwd_ms"] = bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
    results.append(row)
    print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16k,32k,64k,128k")
    ap.add_argument("--inputs", default="video,random")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "triton_bench.json"))
    ap.add_argument("--no-backward", dest="backward", action="store_false")
    ap.add_argument("--baselines", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--variants", default="", help="length for the tile-shape variants (e.g. 64k)")
    ap.add_argument("--window", default="", help="length for window-vs-flex")
    ap.add_argument("--topn-compare", default="", help="lengths for the top-n paths compared (e.g. 16k,128k)")
    ap.add_argument("--tiles", default="", help="length for the selection tile variants (item 2)")
    ap.add_argument("--tile-inputs", default="video,random", help="input kinds of the --tiles variants")
    ap.add_argument("--config", default="", help="KernelConfig overrides for the main table, e.g. topn=fused")
    ap.add_argument("--tile-configs", default="",
                    help="';'-separated KernelConfig overrides for --tiles, e.g. ';pair_blocks=1;dq_tokens=4' ('' = default)")
    args = ap.parse_args()
    pattern = load_pattern("videonsa")
    CONFIG.update(parse_config(args.config))
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shape": f"B=1, Hq={H}, Hkv={HKV}, D={D}, bf16, pattern videonsa (all tokens vision)",
    }
    results: list = []

    def dump():
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)

    if args.topn_compare:
        run_topn_compare(pattern, [parse_len(x) for x in args.topn_compare.split(",") if x], args.inputs.split(","), results)
        dump()
    for L in [parse_len(x) for x in args.lengths.split(",") if x]:
        for kind in args.inputs.split(","):
            try:
                run_length(pattern, L, kind, args, results)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                results.append({"L": L, "inputs": kind, "error": repr(e)[:500]})
            dump()
    if args.tiles:
        variants = [parse_config(v) for v in args.tile_configs.split(";")] if args.tile_configs else [dict(), dict(select_tokens=4)]
        run_tile_variants(pattern, parse_len(args.tiles), results, variants, tuple(args.tile_inputs.split(",")),
                          args.backward)
        dump()
    if args.variants:
        run_variants(pattern, parse_len(args.variants), results)
        dump()
    if args.window:
        try:
            run_window_vs_flex(parse_len(args.window), results)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results.append({"what": "window", "error": repr(e)[:500]})
        dump()


if __name__ == "__main__":
    main()
