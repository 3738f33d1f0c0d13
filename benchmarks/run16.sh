#!/bin/bash
# GPU run 16 (2026-12-01): why the selection branch's forward on the anchor geometry (run 14:
# 7.26 ms) is slower than the anchor's construction (5.62 ms): the same call with every tile
# partial, and the anchor's random blocks split into full + diagonal lists as nsaflex does.
# One device call: `bash benchmarks/run16.sh`.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
CUDA_LAUNCH_BLOCKING=${CUDA_LAUNCH_BLOCKING:-0} timeout 300 python benchmarks/flex_selection_probe.py --lengths 128k --patterns benchmarks/qblock-anchor.yaml \
  --json $OUT/flex-selection-probe.json > $OUT/flex-selection-probe.log 2>&1
echo "selection probe: rc=$? in $(( $(date +%s) - S )) s"; grep "^{" $OUT/flex-selection-probe.log
