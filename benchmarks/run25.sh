#!/bin/bash
# GPU run 25 (2026-12-01): run 24's steps (bench table 16K-128K with cuDNN, all GPU tests, 16K/32K
# kernel profile) after two changes: bwd_cmp_dkv_kernel gets enough query splits to fill the GPU
# (`ops._cmp_dkv_splits`), and the inverted index's empty segments are masked by a row bound (the
# interpreter refuses scalar bool masks; run 24 ran the scalar form on the GPU).
# One device call: `bash benchmarks/run25.sh`.
exec bash "$(dirname "$0")/run24.sh"
