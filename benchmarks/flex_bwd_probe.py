"""First-call (compile) and steady forward+backward times of the flex backend on
``videonsa-qblock`` with the selection branch on 64 x 64 tiles (backward compiled
with max_autotune, configuration pinned) against 128 x 128 tiles (torch's default
backward), growing lengths; each step printed and written as it completes.

    python benchmarks/flex_bwd_probe.py --lengths 16k,64k,128k --json $OUT/bwd-probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import nsaflex
from nsaflex.bench import environment
from nsaflex.cli.common import parse_length
from nsaflex.video_inputs import video_qkv


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="16k,64k,128k")
    parser.add_argument("--variants", default="64x64,128x128")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    results: dict = {"environment": environment("cuda"), "steps": []}
    for length in map(parse_length, args.lengths.split(",")):  # in the order given
        q, k, v = video_qkv(1, 28, 4, length, 128, device="cuda", dtype=torch.bfloat16)
        gates = torch.rand(1, 28, length, 3, device="cuda")
        vision = torch.ones(1, length, dtype=torch.long, device="cuda")  # every token vision, as the bench
        for variant in args.variants.split(","):
            attn = nsaflex.compile("videonsa-qblock", backend="flex", device="cuda", head_dim=128).cuda()
            if variant == "128x128":
                attn._kernel.blocks = (128, 128)
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gates)]

            def step():
                out = attn(*leaves[:3], leaves[3], vision)
                out.float().sum().backward()

            record = {"length": length, "variant": variant}
            try:
                record["first_call_s"] = round(timed(step), 2)
                record["steady_ms"] = sorted(1000 * timed(step) for _ in range(5))[2]
                record["selection"] = attn._kernel.stats.get("selection")
            except Exception as error:  # keep the other steps
                record["error"] = f"{type(error).__name__}: {str(error)[:800]}"
            results["steps"].append(record)
            print(json.dumps(record, default=str), flush=True)
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
