#!/bin/bash
# GPU run 27 (2026-12-01): the GPU tests after bwd_cmp_dkv_kernel reads its split count from the grid
# (tl.num_programs(1)) instead of a compile-time constant, and the tensor memo drops an entry when its
# tensor is freed. The session's remaining device time allowed the tests only, not the bench.
# One device call: `bash benchmarks/run27.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=2 timeout 200 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -4 $OUT/triton-gpu-tests.log
