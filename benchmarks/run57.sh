#!/bin/bash
# GPU run 57 (2026-12-02, ninth session): where row_masks on and off differ (benchmarks/row_masks_diff.py),
# then the issue's table on the new defaults (row_masks on). One device call: `bash benchmarks/run57.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 200 python benchmarks/row_masks_diff.py > $OUT/triton-run57-row-masks-diff.log 2>&1
echo "diff: rc=$? in $(( $(date +%s) - S )) s"; grep -v Warn $OUT/triton-run57-row-masks-diff.log | tail -n 8
S=$(date +%s)
timeout 200 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 8k,12k,16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-100 | head -36
