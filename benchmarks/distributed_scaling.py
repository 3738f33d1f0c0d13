"""Scaling of a pattern under sequence parallelism (Ulysses all-to-all).

Run with torchrun on one host, e.g.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 2 \\
        benchmarks/distributed_scaling.py --pattern videonsa --lengths 131072,262144 \\
        --json benchmarks/results/distributed-2gpu.json

and ``python benchmarks/results.py`` renders the record into RESULTS.md.

Each rank holds a contiguous shard of the sequence (B = 1, 28 query heads,
4 kv heads, D = 128, bf16, all-vision tokens). Rank 0 prints and writes the
median forward and forward+backward times (CUDA events around the whole
exchange + attention + exchange, after warm-up) and the peak memory of each
rank. Compare runs with different --nproc_per_node made on the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys

import torch
import torch.distributed as dist

import nsaflex
from nsaflex.distributed import SequenceParallelAttention


def _time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pattern", default="videonsa")
    parser.add_argument("--lengths", default="131072,262144")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())

    attention = nsaflex.compile(args.pattern, backend=args.backend, device="cuda").to(device)
    parallel = SequenceParallelAttention(attention)
    pattern = attention.pattern
    heads, kv_heads, dim = 28, 4, 128
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        shard = torch.tensor_split(torch.arange(length), world)[rank].numel()
        generator = torch.Generator(device=device).manual_seed(rank)

        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=generator)

        q = randn(1, heads, shard, dim).requires_grad_()
        k = randn(1, kv_heads, shard, dim).requires_grad_()
        v = randn(1, kv_heads, shard, dim).requires_grad_()
        gates = torch.rand(1, heads, shard, len(pattern.branches), device=device, dtype=torch.bfloat16) if pattern.gate.kind != "constant" else None
        types = torch.ones(1, shard, dtype=torch.long, device=device) if pattern.hybrid is not None else None
        torch.cuda.reset_peak_memory_stats()

        def forward():
            with torch.no_grad():
                parallel(q, k, v, gates, types)

        def forward_backward():
            out = parallel(q, k, v, gates, types)
            out.backward(torch.ones_like(out))

        row = {"length": length, "world": world, "shard": shard}
        row["fwd_ms"] = _time(forward, args.repeats)
        row["fwdbwd_ms"] = _time(forward_backward, args.repeats)
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        row["peak_gib_max_rank"] = round(float(peak.item()), 2)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0 and args.json:
        record = {
            "pattern": args.pattern,
            "backend": attention.backend,
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "world": world,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "torchrun --nproc_per_node " + str(world) + " benchmarks/distributed_scaling.py " + " ".join(map(shlex.quote, sys.argv[1:])),
            "rows": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
