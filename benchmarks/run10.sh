#!/bin/bash
# GPU run 10 (H200, 2026-12-01): run 9's Triton tests again with NSAFLEX_TEST_DEVICE=cuda (run 9
# ran them under the interpreter that test_tile_scores switched on), the bf16 hypothesis property
# test alone, and the flex backend's videonsa-qblock forward+backward at 128K with 64 x 64
# backward tiles. Logs and JSON under $OUT.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti NSAFLEX_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 150 python -m pytest -q -rs -p no:cacheprovider tests/test_triton_gpu.py tests/test_tile_scores.py \
  -k "not bf16_property" --durations=8 > $OUT/triton-gpu-tests.log 2>&1
echo "triton tests: rc=$? in $(( $(date +%s) - S )) s"; tail -12 $OUT/triton-gpu-tests.log; S=$(date +%s)
timeout 200 nsaflex bench videonsa-qblock --lengths 128k --backends flex --baselines cudnn \
  --pass fwd,fwd+bwd --inputs video --json $OUT/flex-qblock-128k.json > $OUT/flex-qblock-128k.log 2>&1
echo "qblock bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/flex-qblock-128k.log | grep -v Warning | tail -20; S=$(date +%s)
timeout 170 python -m pytest -q -rs -p no:cacheprovider tests/test_triton_gpu.py -k bf16_property \
  --hypothesis-show-statistics > $OUT/triton-bf16-property.log 2>&1
echo "bf16 property: rc=$? in $(( $(date +%s) - S )) s"; tail -25 $OUT/triton-bf16-property.log
