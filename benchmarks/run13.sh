#!/bin/bash
# GPU run 13 (2026-12-01): 1. the anchor's own geometry (benchmarks/qblock-anchor.yaml: 8 x 128
# query-block selection) through `nsaflex bench` at 128K with the stage breakdown, beside the
# anchor's 5.5 / 49 ms; 2. the flex suites on CUDA in fp32 (float64 scores); 3. the Triton bf16
# hypothesis property with its default number of draws. One device call: `bash benchmarks/run13.sh`.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti NSAFLEX_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 200 nsaflex bench benchmarks/qblock-anchor.yaml --lengths 128k --backends flex --baselines cudnn \
  --pass fwd,fwd+bwd --inputs video --breakdown --json $OUT/flex-anchor-128k.json > $OUT/flex-anchor-128k.log 2>&1
echo "anchor bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/flex-anchor-128k.log | grep -v Warning | tail -30; S=$(date +%s)
NSAFLEX_TEST_DTYPE=float32 NSAFLEX_SCORE_DTYPE=float64 NSAFLEX_TEST_EXAMPLES=2 timeout 150 python -m pytest -q -rs \
  -p no:cacheprovider tests/test_flex_runtime.py tests/test_flex_equivalence.py > $OUT/flex-gpu-tests-fp32.log 2>&1
echo "flex fp32 tests: rc=$? in $(( $(date +%s) - S )) s"; tail -6 $OUT/flex-gpu-tests-fp32.log; S=$(date +%s)
timeout 200 python -m pytest -x -q -rs -p no:cacheprovider tests/test_triton_gpu.py -k bf16_property \
  > $OUT/triton-bf16-property.log 2>&1
echo "bf16 property (default draws): rc=$? in $(( $(date +%s) - S )) s"; tail -5 $OUT/triton-bf16-property.log
