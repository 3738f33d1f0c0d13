#!/bin/bash
# GPU run 64 (2026-12-02, tenth session): the GPU tests on run 63's code (run 63's own test step
# stopped at its 220 s limit after 6 passing tests), on the machine run 63 left warm. One device call.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 420 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-run64-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 5 $OUT/triton-run64-gpu-tests.log
