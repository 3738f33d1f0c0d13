#!/bin/bash
# GPU run 76 (2026-12-02, twelfth session): the new defaults (union entries a step ahead in slc_win;
# slc_win for inference with 3 stages, uncapped): the GPU bit-identity test (row masks; the prefetch
# on and off in both union loops), then the table.
# One device call: `bash benchmarks/run76.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 280 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k "bit_identical" > $OUT/triton-run76-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run76-gpu-tests.log
S=$(date +%s)
timeout 250 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 8k,12k,16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-100 | head -36
