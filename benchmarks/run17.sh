#!/bin/bash
# GPU run 17 (2026-12-01): the atomic backward (selection dq added by bwd_slc_dkv_kernel with fp32
# atomics over the exact selected pairs; bwd_dq_kernel skips the union) at 128K, video inputs,
# against the deterministic default in the same process; then `nsaflex bench --atomic`'s own row.
# One device call: `bash benchmarks/run17.sh`. The atomic-dq variant (atomic_dq=1) ran at commit
# b0b3867 (TILE_CONFIGS=";atomic=1,atomic_dq=1;atomic=1,atomic_dq=1,num_warps_slc_dkv=8") and was removed after
# this run (2x slower); the default below is the variant that remains.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 140 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs "${TILE_CONFIGS:-;atomic=1}" --json $OUT/triton-atomic-128k.json > $OUT/triton-atomic-128k.log 2>&1
echo "atomic variants: rc=$? in $(( $(date +%s) - S )) s"; grep "^{" $OUT/triton-atomic-128k.log; S=$(date +%s)
[ -n "$SKIP_BENCH" ] || timeout 80 nsaflex bench videonsa --backends triton --baselines none --lengths 128k --inputs video --pass fwd+bwd --atomic \
  --json $OUT/triton-bench-atomic.json > $OUT/triton-bench-atomic.log 2>&1
echo "bench --atomic: rc=$? in $(( $(date +%s) - S )) s"; grep "131072" $OUT/triton-bench-atomic.log | head -3
