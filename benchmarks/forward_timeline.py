"""Where a forward's wall time goes between its kernels (GPU only).

    python benchmarks/forward_timeline.py --length 128k --inputs video --json $OUT/timeline.json

Runs the triton backend's forward (the ``videonsa`` pattern, B = 1, 28 query
heads over 4 kv heads, D = 128, bf16, as ``triton_bench.py``) under the torch
profiler and lists each kernel launch in order with its start, duration and
the idle time before it, then the totals: the span from the first kernel's
start to the last one's end, the sum of kernel durations and of the gaps. The
median of ``do_bench`` is printed beside them: a wall time above the span is
spent before the first kernel or after the last one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from triton_bench import bench, make_inputs, parse_config, parse_len  # noqa: E402

from nsaflex.backends import triton as backend  # noqa: E402
from nsaflex.kernels import ops  # noqa: E402
from nsaflex.loader import load_pattern  # noqa: E402


def kernel_events(fn) -> list[dict]:
    """Kernel events (name, start and duration in microseconds) of one call of
    ``fn`` from the profiler's trace, in start order."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        prof.export_chrome_trace(handle.name)
        trace = json.load(open(handle.name))
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    return sorted(({"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"])} for e in events),
                  key=lambda e: e["ts"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", default="128k")
    ap.add_argument("--inputs", default="video")
    ap.add_argument("--config", default="", help="KernelConfig overrides, e.g. topn_parts=0,topn_chain=1")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    pattern = load_pattern("videonsa")
    cfg = ops.make_config(pattern, **parse_config(args.config))
    L = parse_len(args.length)
    q, k, v, gates = make_inputs(args.inputs, L)
    types = torch.ones(1, L, dtype=torch.long, device="cuda")

    def forward():
        with torch.no_grad():
            return backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)

    wall_ms = bench(forward, rep=100)
    events = kernel_events(forward)
    rows, end = [], None
    for e in events:
        gap = 0.0 if end is None else max(0.0, e["ts"] - end)
        rows.append({"kernel": e["name"][:60], "start_us": round(e["ts"] - events[0]["ts"], 1),
                     "dur_us": round(e["dur"], 1), "gap_before_us": round(gap, 1)})
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
    span_ms = (end - events[0]["ts"]) / 1000 if events else 0.0
    summary = {"L": L, "inputs": args.inputs, "config": args.config, "wall_median_ms": wall_ms,
               "span_ms": span_ms, "kernels_ms": sum(e["dur"] for e in events) / 1000,
               "gaps_ms": sum(r["gap_before_us"] for r in rows) / 1000, "launches": len(rows),
               "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for r in rows:
        print(f"{r['start_us']:10.1f} {r['dur_us']:9.1f} gap {r['gap_before_us']:7.1f}  {r['kernel']}")
    print(json.dumps(summary))
    if args.json:
        json.dump({"summary": summary, "kernels": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
