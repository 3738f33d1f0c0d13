#!/bin/bash
# GPU run 60 (2026-12-02, ninth session): the hybrid batch's gradients bit-reproducible again after
# the text attention's kernel pin was limited to inputs SDPA's memory-efficient kernel takes.
# One device call: `bash benchmarks/run60.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 200 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k bit_reproducible > $OUT/triton-run60-gpu-tests.log 2>&1
echo "reproducibility test: rc=$? in $(( $(date +%s) - S )) s"; tail -n 5 $OUT/triton-run60-gpu-tests.log
