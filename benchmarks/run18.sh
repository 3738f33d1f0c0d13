#!/bin/bash
# GPU run 18 (2026-12-01): the selection loops find their rows from per-block row masks written with
# the tile's union (one scalar load per step instead of comparing the block with the tile's whole
# block lists and moving the answer into the matrix layout), and the score scale enters through one
# fused multiply-add. Part "a": the previous kernels (commit d125637, copied to _ab_old/ on the device
# copy, not committed) and the new ones at 128K video in one process each, back to back, plus two
# schedule variants; then the GPU tests. Part "b": the `nsaflex bench` table.
# Device calls: `bash benchmarks/run18.sh a`, then `bash benchmarks/run18.sh b`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
if [ "$1" = a ]; then
  if [ -d _ab_old ]; then
    (cd _ab_old && timeout 100 python triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
      --tile-configs "num_stages=2" --json $OUT/triton-old-128k.json > $OUT/triton-old-128k.log 2>&1)
    echo "old kernels: rc=$? in $(( $(date +%s) - S )) s"; grep "^{" $OUT/triton-old-128k.log | cut -c1-400; S=$(date +%s)
  fi
  timeout 170 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
    --tile-configs "${TILE_CONFIGS:-num_stages=2;num_stages=3;select_tokens=16,num_warps_select=8}" \
    --json $OUT/triton-new-128k.json > $OUT/triton-new-128k.log 2>&1
  echo "new kernels: rc=$? in $(( $(date +%s) - S )) s"; grep "^{" $OUT/triton-new-128k.log | cut -c1-400; S=$(date +%s)
  NSAFLEX_TEST_DEVICE=cuda timeout 170 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
    tests/test_tile_scores.py -k "not bf16_property" > $OUT/triton-gpu-tests.log 2>&1
  echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -3 $OUT/triton-gpu-tests.log; S=$(date +%s)
  NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=${EXAMPLES:-3} timeout 110 python -m pytest -q -p no:cacheprovider \
    tests/test_triton_gpu.py -k bf16_property > $OUT/triton-bf16-property.log 2>&1
  echo "bf16 property: rc=$? in $(( $(date +%s) - S )) s"; tail -3 $OUT/triton-bf16-property.log
else
  timeout 500 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 16k,32k,64k,128k \
    --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
  echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | tail -30
fi
