#!/bin/bash
# GPU run 15 (2026-12-01): the Triton bf16 hypothesis property with its default 8 draws (run 13's
# 200 s limit was too short for them). One device call: `bash benchmarks/run15.sh`.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti NSAFLEX_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 420 python -m pytest -x -q -rs -p no:cacheprovider --durations=3 tests/test_triton_gpu.py -k bf16_property \
  -o log_cli=false > $OUT/triton-bf16-property-8.log 2>&1
echo "bf16 property (8 draws): rc=$? in $(( $(date +%s) - S )) s"; tail -8 $OUT/triton-bf16-property-8.log
