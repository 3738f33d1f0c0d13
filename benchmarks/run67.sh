#!/bin/bash
# GPU run 67 (2026-12-02, tenth session): the issue's 128K row again on run 63's code (commit
# 8c331af), on the machine run 66 left warm, to show the spread between machine starts.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
S=$(date +%s)
timeout 150 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 128k --inputs video,random \
  --pass fwd,fwd+bwd --json $OUT/triton-bench-run67.json > $OUT/triton-bench-run67.log 2>&1
echo "rc=$? in $(( $(date +%s) - S )) s"; grep "│ *[0-9]" $OUT/triton-bench-run67.log | cut -c1-100 | head -8
