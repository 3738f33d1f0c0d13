#!/bin/bash
# GPU run 1 of the flex backend: calibration bench (compile and run times at 8k/32k) and the
# equivalence + runtime tests on CUDA (bf16, then a few fp32). Logs under $OUT.
export PYTHONPATH=.:benchmarks/flex-shim PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
S=$(date +%s)
timeout 170 python benchmarks/flex-cli.py bench videonsa-qblock --lengths 8k,32k --pass fwd,fwd+bwd --inputs video \
  --baselines sdpa,cudnn,flex-dense --check-length 256 --json $OUT/cal-qblock.json 2>&1 | tee $OUT/cal-qblock.log
echo "qblock bench took $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 80 python benchmarks/flex-cli.py bench videonsa --lengths 8k --pass fwd,fwd+bwd --inputs video --baselines none \
  --check-length 256 --json $OUT/cal-token.json 2>&1 | tee $OUT/cal-token.log
echo "token bench took $(( $(date +%s) - S )) s"; S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_DTYPE=bfloat16 NSAFLEX_TEST_EXAMPLES=4 timeout 150 python -m pytest -q -x -p no:cacheprovider \
  tests/test_flex_runtime.py tests/test_flex_equivalence.py tests/test_scoring.py 2>&1 | tee $OUT/tests-bf16.log | tail -40
echo "bf16 tests took $(( $(date +%s) - S )) s"; S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_DTYPE=float32 NSAFLEX_SCORE_DTYPE=float64 NSAFLEX_TEST_EXAMPLES=2 timeout 60 python -m pytest -q -x -p no:cacheprovider \
  tests/test_flex_equivalence.py -k "outputs or gradients or compiled" 2>&1 | tee $OUT/tests-fp32.log | tail -20
echo "fp32 tests took $(( $(date +%s) - S )) s"
