"""Two forwards of the videonsa pattern (B = 1, 28/4 heads, D = 128, bf16, video
inputs) for Nsight Compute: the first compiles and warms up, the second is the
one to profile (skip the first call's launches with ``--launch-skip``).

    ncu --clock-control none --kernel-name regex:slc_win_kernel --launch-skip 1 --launch-count 1 \\
        --section WarpStateStats --section SchedulerStats python benchmarks/ncu_forward.py 16k
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from triton_bench import make_inputs, parse_len  # noqa: E402

from nsaflex.backends import triton as backend  # noqa: E402
from nsaflex.kernels import ops  # noqa: E402
from nsaflex.loader import load_pattern  # noqa: E402

if __name__ == "__main__":
    L = parse_len(sys.argv[1] if len(sys.argv) > 1 else "16k")
    pattern = load_pattern("videonsa")
    cfg = ops.make_config(pattern)
    q, k, v, gates = make_inputs("video", L)
    types = torch.ones(1, L, dtype=torch.long, device="cuda")
    for _ in range(2):
        with torch.no_grad():
            backend._sparse_forward(pattern, cfg, q, k, v, gates, types, None)
    torch.cuda.synchronize()
