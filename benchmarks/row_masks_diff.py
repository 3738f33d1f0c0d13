"""Run 57: where `row_masks` on and off differ on a GPU (run 56's bit-identity test
failed its first case without a message before its time ran out). Prints, for each
tensor of the videonsa forward (inference and training) and backward, the largest
absolute difference between two runs of the same config (a control: is the pipeline
itself run-to-run identical?) and between row_masks on and off.

    python benchmarks/row_masks_diff.py [--dtype bf16] [--dim 128]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from nsaflex.backends import triton as backend
from nsaflex.kernels import ops
from nsaflex.loader import load_pattern


def run(pattern, cfg, q, k, v, gates, types, grad_out):
    with torch.no_grad():
        inference = backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)
    out = backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)
    return (inference, out, *torch.autograd.grad(out, (q, k, v, gates), grad_out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pattern = load_pattern("videonsa")
    pattern = dataclasses.replace(pattern, model=dataclasses.replace(pattern.model, kv_heads=None, query_heads=None))
    gen = torch.Generator().manual_seed(11)
    batch, kv_heads, group, length = 2, 2, 7, 3000
    types = torch.ones(batch, length, dtype=torch.long)
    types[1, 1700:] = 0
    types = types.to("cuda")

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", dtype).requires_grad_()

    q, k, v = leaf(batch, kv_heads * group, length, args.dim), leaf(batch, kv_heads, length, args.dim), \
        leaf(batch, kv_heads, length, args.dim)
    gates = torch.rand(batch, kv_heads * group, length, 3, generator=gen).to("cuda", dtype).requires_grad_()
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", dtype)
    on = run(pattern, ops.make_config(pattern, row_masks=True), q, k, v, gates, types, grad_out)
    again = run(pattern, ops.make_config(pattern, row_masks=True), q, k, v, gates, types, grad_out)
    off = run(pattern, ops.make_config(pattern, row_masks=False), q, k, v, gates, types, grad_out)
    for name, a, b, c in zip(("inference", "out", "dq", "dk", "dv", "dgates"), on, again, off):
        def diff(x, y):
            return float((x.float() - y.float()).abs().max()), int((x != y).sum())
        print(f"{name:10s} on vs on again: max |diff| {diff(a, b)[0]:.3e} ({diff(a, b)[1]} entries)   "
              f"on vs off: {diff(a, c)[0]:.3e} ({diff(a, c)[1]} entries)   scale {float(a.float().abs().max()):.3e}")


if __name__ == "__main__":
    main()
