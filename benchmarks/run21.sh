#!/bin/bash
# GPU run 21 (2026-12-01): the defaults after runs 18-20 (row masks; pipeline stages: slc_win 3,
# bwd_dq 2, cmp/win dkv 2): the `nsaflex bench` table (16K-128K, video and random inputs, fwd and
# fwd+bwd, cuDNN in the same run), then the GPU tests on these defaults.
# One device call: `bash benchmarks/run21.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 200 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-110; S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 170 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  tests/test_tile_scores.py -k "not bf16_property" > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -3 $OUT/triton-gpu-tests.log; S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=${EXAMPLES:-8} timeout 170 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py -k bf16_property > $OUT/triton-bf16-property.log 2>&1
echo "bf16 property: rc=$? in $(( $(date +%s) - S )) s"; tail -3 $OUT/triton-bf16-property.log
