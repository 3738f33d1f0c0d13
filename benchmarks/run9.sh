#!/bin/bash
# GPU run 9 (H200, 2026-12-01): confirm the Triton kernels on the GPU (the tests short of the
# bf16 hypothesis property, which compiles a kernel set per draw and runs alone in a later call),
# the flex backend's query-block selection with gradients on 64 x 64 tiles (backward configuration
# autotuned), and the flex tests on CUDA. Logs and JSON under $OUT.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
{ python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } | tee $OUT/gpu.txt
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout ${TRITON_TESTS_S:-150} python -m pytest -q -rs -p no:cacheprovider tests/test_triton_gpu.py tests/test_tile_scores.py \
  -k "not bf16_property" --durations=8 > $OUT/triton-gpu-tests.log 2>&1
echo "triton tests: rc=$? in $(( $(date +%s) - S )) s"; tail -15 $OUT/triton-gpu-tests.log; S=$(date +%s)
timeout ${BENCH_S:-200} nsaflex bench videonsa-qblock --lengths 128k --backends flex --baselines cudnn \
  --pass fwd,fwd+bwd --inputs video --json $OUT/flex-qblock-128k.json > $OUT/flex-qblock-128k.log 2>&1
echo "qblock bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/flex-qblock-128k.log | tail -25; S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout ${FLEX_TESTS_S:-120} python -m pytest -q -rs -p no:cacheprovider \
  tests/test_flex_runtime.py tests/test_flex_equivalence.py --durations=8 > $OUT/flex-gpu-tests.log 2>&1
echo "flex tests: rc=$? in $(( $(date +%s) - S )) s"; tail -15 $OUT/flex-gpu-tests.log
