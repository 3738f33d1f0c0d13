#!/bin/bash
# GPU run 14 (2026-12-01): 1. the flex selection branch alone beside the anchor's construction in
# the same process (benchmarks/flex_selection_probe.py); 2. the Triton backend's `nsaflex bench`
# table on this machine (videonsa, video and random inputs, 16K-128K, fwd and fwd+bwd, cuDNN).
# One device call: `bash benchmarks/run14.sh`.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 220 python benchmarks/flex_selection_probe.py --lengths 128k \
  --patterns benchmarks/qblock-anchor.yaml,videonsa-qblock --json $OUT/flex-selection-probe.json > $OUT/flex-selection-probe.log 2>&1
echo "selection probe: rc=$? in $(( $(date +%s) - S )) s"; grep "^{" $OUT/flex-selection-probe.log; S=$(date +%s)
timeout 320 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | tail -30
