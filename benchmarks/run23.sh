#!/bin/bash
# GPU run 23 (2026-12-01): branch outputs kept in fp32 (the backward's delta); the GPU property test
# without the kernel-precision compressed tokens of the previous session (its near-tie acceptance
# kept): the errors of its two pinned examples, the property test with 3 draws plus those examples,
# the other GPU tests, and `nsaflex bench` at 16K and 128K (video) for the cost of fp32 outputs.
# One device call: `bash benchmarks/run23.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
python - <<'PY' 2>&1 | grep -v Warn | tee $OUT/pinned-examples.log
import torch
from tests.test_triton_gpu import LARGE_BLOCKS, NEAR_TIED_ONE_TOKEN, run_case
from nsaflex.pooling import MLPPooling
torch.manual_seed(0)
pooler = MLPPooling(NEAR_TIED_ONE_TOKEN.compression, 64).to("cuda")
print("near-tied one token", run_case(NEAR_TIED_ONE_TOKEN, 1, 2, 1, 64, 64, 0, pooler=pooler))
print("large blocks", run_case(LARGE_BLOCKS, 1, 2, 8, 700, 64, 1301))
PY
echo "pinned: $(( $(date +%s) - S )) s"; S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=${EXAMPLES:-3} timeout 200 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py -k bf16_property > $OUT/triton-bf16-property.log 2>&1
echo "bf16 property: rc=$? in $(( $(date +%s) - S )) s"; tail -3 $OUT/triton-bf16-property.log; S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 200 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  tests/test_tile_scores.py -k "not bf16_property" > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -3 $OUT/triton-gpu-tests.log; S=$(date +%s)
timeout 150 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 16k,128k \
  --inputs video --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-110
