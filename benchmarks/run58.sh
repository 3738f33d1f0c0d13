#!/bin/bash
# GPU run 58 (2026-12-02, ninth session): the GPU checks of this session's last changes: row_masks on
# and off bit-identical on all-vision inputs (run 56's version of the test mixed in text tokens, whose
# SDPA backward was not run-to-run reproducible: run 57), and the hybrid batch's gradients
# bit-reproducible now that the text attention's backward runs under torch's deterministic mode;
# then test_tile_scores.py. One device call: `bash benchmarks/run58.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 240 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k "row_masked or bit_reproducible" > $OUT/triton-run58-gpu-tests.log 2>&1
echo "row-mask and reproducibility tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 15 $OUT/triton-run58-gpu-tests.log
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 150 python -m pytest -q -p no:cacheprovider \
  tests/test_tile_scores.py > $OUT/triton-run58-tile-scores-tests.log 2>&1
echo "tile-score tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run58-tile-scores-tests.log
