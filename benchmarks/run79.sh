#!/bin/bash
# GPU run 79 (2026-12-02, twelfth session): the table again on a new machine start, on
# a7c95a9 (the run 76 code): how the 128K forward stands across machine starts.
# One device call: `bash benchmarks/run79.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 250 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 8k,12k,16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-100 | head -36
