"""GPU run 3: time nsaflex.scoring.select alone (VideoNSA geometry, 28/4 heads, D = 128, bf16):
the Triton scoring kernels (default on CUDA) and, where asked, the torch path
(NSAFLEX_SCORING_KERNEL=0), plus the two kernels on their own.

    python benchmarks/flex-run3-scoring.py KERNEL_LENGTHS [TORCH_LENGTHS]
"""
import os
import sys
import time

import torch
from triton.testing import do_bench

from nsaflex import scoring
from nsaflex.kernels import tile_scores
from nsaflex.pooling import compress
from nsaflex.spec import Compression, Selection


def parse(text):
    return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in text.split(",") if x]


kernel_lengths = parse(sys.argv[1])
torch_lengths = parse(sys.argv[2]) if len(sys.argv) > 2 else []
compression = Compression(block=64, stride=64)
for granularity in ("query_block", "token"):
    selection = Selection(block=64, count=32, forced=("current",), scoring="group", granularity=granularity,
                          query_block=64 if granularity == "query_block" else None)
    for mode, lengths in (("kernel", kernel_lengths), ("torch", torch_lengths)):
        os.environ["NSAFLEX_SCORING_KERNEL"] = "1" if mode == "kernel" else "0"
        for length in lengths:
            if granularity == "token" and length > 65536:
                continue
            torch.manual_seed(0)
            q = torch.randn(1, 28, length, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, 4, length, 128, device="cuda", dtype=torch.bfloat16)
            ck, _ = compress(k, k, compression)
            start = time.time()
            fn = lambda: scoring.select(q, ck, compression, selection)  # noqa: E731
            first = fn().indices
            torch.cuda.synchronize()
            warm = time.time() - start
            ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
            line = f"{granularity:11s} {mode:6s} L={length:6d}: select {ms:8.2f} ms (first call {warm:.1f} s)"
            if mode == "kernel":
                lengths_t = torch.full((1,), length, device="cuda", dtype=torch.long)
                rows = torch.clamp((lengths_t - 64) // 64 + 1, min=0)
                lse = tile_scores.log_sum_exp(q, ck, 64, 64, False, lengths_t, rows)
                t_lse = do_bench(lambda: tile_scores.log_sum_exp(q, ck, 64, 64, False, lengths_t, rows), warmup=10, rep=50, return_mode="median")
                n = length if granularity == "query_block" else min(length, 8192)
                t_sc = do_bench(lambda: tile_scores.unit_scores(q, ck, lse, 64, 64, False, lengths_t, rows, per_head=False,
                                                                unit=selection.query_block or 1, start=0, rows=n),
                                warmup=10, rep=50, return_mode="median")
                flop = 2 * 28 * length * (length // 64) / 2 * 128 * 8 / 7
                line += (f"; lse kernel {t_lse:.2f} ms ({flop / t_lse / 1e9:.0f} TFLOP/s), score kernel {t_sc:.2f} ms over "
                         f"{n} queries ({flop * n / length / t_sc / 1e9:.0f} TFLOP/s, padded heads, causal half)")
            else:
                os.environ["NSAFLEX_SCORING_KERNEL"] = "1"
                other = scoring.select(q, ck, compression, selection).indices
                os.environ["NSAFLEX_SCORING_KERNEL"] = "0"
                differ = (other != first).any(dim=-1).float().mean().item()
                line += f"; units whose selection differs from the kernel's: {differ:.2e}"
            print(line, flush=True)
            del q, k, ck
            torch.cuda.empty_cache()
