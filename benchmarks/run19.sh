#!/bin/bash
# GPU run 19 (2026-12-01): after run 18 (row masks, 3 pipeline stages in slc_win): the pipeline depth of
# slc_win (4 stages) and bwd_dq (2, 4 against the default 3) at 128K video, then the `nsaflex bench`
# table (16K-128K, video and random inputs, fwd and fwd+bwd, cuDNN in the same run).
# One device call: `bash benchmarks/run19.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 150 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs "${TILE_CONFIGS:-num_stages=3;num_stages=4;num_stages_dq=2;num_stages_dq=4}" \
  --json $OUT/triton-stages-128k.json > $OUT/triton-stages-128k.log 2>&1
echo "stage variants: rc=$? in $(( $(date +%s) - S )) s"; grep "^{" $OUT/triton-stages-128k.log | cut -c1-300; S=$(date +%s)
timeout 420 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | tail -32
