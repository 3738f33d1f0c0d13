#!/bin/bash
# GPU run 12 (prepared 2026-12-01, NOT RUN yet): what runs 9-11 left unconfirmed, in order of need.
# 1. the Triton bf16 hypothesis property with the selection-step padding fix (3 draws, then stop);
# 2. `nsaflex bench`'s own videonsa-qblock forward+backward row at 128K with the 64 x 64 selection
#    backward (the figure of runs 9-11 comes from benchmarks/flex_bwd_probe.py);
# 3. the flex suites on CUDA (bf16), as far as the limit allows.
# One device call: `bash benchmarks/run12.sh` (~9 minutes with the limits below). Logs/JSON under $OUT.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti NSAFLEX_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_EXAMPLES=3 timeout 150 python -m pytest -x -q -rs -p no:cacheprovider tests/test_triton_gpu.py \
  -k bf16_property > $OUT/triton-bf16-property.log 2>&1
echo "bf16 property: rc=$? in $(( $(date +%s) - S )) s"; tail -5 $OUT/triton-bf16-property.log; S=$(date +%s)
timeout 180 nsaflex bench videonsa-qblock --lengths 128k --backends flex --baselines cudnn \
  --pass fwd,fwd+bwd --inputs video --json $OUT/flex-qblock-128k.json > $OUT/flex-qblock-128k.log 2>&1
echo "qblock bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/flex-qblock-128k.log | grep -v Warning | tail -12; S=$(date +%s)
NSAFLEX_TEST_EXAMPLES=2 timeout 170 python -m pytest -q -rs -p no:cacheprovider --durations=10 \
  tests/test_flex_runtime.py tests/test_flex_equivalence.py > $OUT/flex-gpu-tests.log 2>&1
echo "flex tests: rc=$? in $(( $(date +%s) - S )) s"; tail -14 $OUT/flex-gpu-tests.log
