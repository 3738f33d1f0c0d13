#!/bin/bash
# GPU run 78 (2026-12-02, twelfth session; run 76's warm machine): the new defaults against the
# previous ones (union entries loaded at the step, slc_win for inference with 1 stage under a cap
# of 128 registers), 128K video, forward, three times in turn.
# One device call: `bash benchmarks/run78.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
O="prefetch_union=0,num_stages=1,maxnreg_select=128"
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$O;;$O;;$O" --json $OUT/triton-run78-defaults-fwd-128k.json > $OUT/run78-fwd.log 2>&1
echo rc=$?
