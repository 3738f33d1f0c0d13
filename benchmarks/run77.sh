#!/bin/bash
# GPU run 77 (2026-12-02, twelfth session; run 76's warm machine): the rest of the GPU tests of
# tests/test_triton_gpu.py on the new defaults (run 76 ran the bit-identity tests).
# One device call: `bash benchmarks/run77.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 480 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k "not bit_identical" > $OUT/triton-run77-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 5 $OUT/triton-run77-gpu-tests.log
