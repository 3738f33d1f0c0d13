#!/bin/bash
# GPU run 35 (2026-12-01, third session): run 32's steps (the `nsaflex bench` table 16K-128K with
# cuDNN, per-kernel times at 128K video, the GPU tests) after the top-n kernel went to 4 warps per row
# (topn_lane_scores = 16; dense rows in slc_win, bwd_dq and cmp_lse as in run 32).
# One device call: `bash benchmarks/run35.sh`.
exec bash "$(dirname "$0")/run32.sh"
