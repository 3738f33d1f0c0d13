#!/bin/bash
# GPU run 75 (2026-12-02, twelfth session; a call on run 74's warm machine): with the union entries
# loaded a step ahead (prefetch_union), slc_win for inference with 3 or 2 stages uncapped against
# the then default (1 stage, 128 registers) and against no prefetch; 128K video, forward, twice in turn.
# One device call: `bash benchmarks/run75.sh` (the call ran these lines with $OUT set by the device).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
O=prefetch_union=0; B="num_stages=3,maxnreg_select=0"; C="num_stages=2,maxnreg_select=0"
timeout 280 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$B;$C;$O;;$B;$C;$O" --json $OUT/triton-run75-stages-fwd-128k.json > $OUT/run75-fwd.log 2>&1
echo rc=$?
