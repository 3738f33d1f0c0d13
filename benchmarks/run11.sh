#!/bin/bash
# GPU run 11 (H200, 2026-12-01): the bf16 hypothesis property test of the Triton backend with 3
# draws, then the flex qblock forward+backward probe at 128K with the selection backward on one
# 64 x 64 configuration (no autotuning). Logs and JSON under $OUT.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 110 python -m pytest -v -rs -p no:cacheprovider \
  tests/test_triton_gpu.py -k bf16_property --hypothesis-show-statistics > $OUT/triton-bf16-property.log 2>&1
echo "bf16 property: rc=$? in $(( $(date +%s) - S )) s"; grep -E "passed|failed|PASS|FAIL|examples|Error" $OUT/triton-bf16-property.log | head; S=$(date +%s)
timeout 130 python benchmarks/flex_bwd_probe.py --lengths 128k,16k --variants 64x64 --json $OUT/bwd-probe.json 2>&1 \
  | grep -v Warning | grep -v storage | tail -5
echo "probe: rc=$? in $(( $(date +%s) - S )) s"
