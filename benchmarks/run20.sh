#!/bin/bash
# GPU run 20 (2026-12-01): after run 19 (bwd_dq on 2 pipeline stages by default): the pipeline depth of
# cmp_lse, the cmp/win dkv kernels and bwd_slc_dkv (2 against 3) at 128K video, then the `nsaflex bench`
# table: run 19's two steps with these stage variants.
# One device call: `bash benchmarks/run20.sh`.
TILE_CONFIGS="${TILE_CONFIGS:-num_stages_dq=2;num_stages_lse=2;num_stages_dkv=2;num_stages_slc_dkv=2}" \
  exec bash "$(dirname "$0")/run19.sh"
