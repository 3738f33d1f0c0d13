#!/bin/bash
# GPU run 3 of the flex backend (one lent H100, at most 420 s): the Triton scoring kernels
# (nsaflex/kernels/tile_scores.py). Tests on CUDA, the videonsa-qblock bench with --breakdown,
# scoring alone, then the videonsa (token) bench as time permits. Everything under $OUT.
S0=$(date +%s); BUDGET=${BUDGET:-405}
left() { local l=$(( BUDGET - ($(date +%s) - S0) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti
timeout 60 pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; echo "pip rc=$?"
if command -v nsaflex >/dev/null && python -c "import nsaflex.cli.main" 2>/dev/null; then NS=nsaflex
else export PYTHONPATH=.:benchmarks/flex-shim; NS="python benchmarks/flex-cli.py"; fi
echo "cli: $NS"
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=2 timeout $(left 55) python -m pytest -q -x -p no:cacheprovider \
  tests/test_tile_scores.py > $OUT/run3-tests.log 2>&1; echo "tests rc=$? in $(( $(date +%s) - S )) s"; tail -4 $OUT/run3-tests.log
S=$(date +%s)
timeout $(left 190) $NS bench videonsa-qblock --lengths 32k,64k,128k --backends flex --baselines cudnn,flex-dense \
  --pass fwd,fwd+bwd --inputs video --breakdown --json $OUT/flex-qblock-run3.json > $OUT/flex-qblock-run3.log 2>&1
echo "qblock bench rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/flex-qblock-run3.log | tail -32 | cut -c1-260
S=$(date +%s)
timeout $(left 50) python benchmarks/flex-run3-scoring.py 32k,64k,128k 64k > $OUT/run3-scoring.log 2>&1
echo "scoring rc=$? in $(( $(date +%s) - S )) s"; grep -v Warning $OUT/run3-scoring.log | tail -12
S=$(date +%s)
timeout $(left 400) $NS bench videonsa --lengths 32k,64k --backends flex --baselines cudnn \
  --pass fwd,fwd+bwd --inputs video --breakdown --json $OUT/flex-videonsa-run3.json > $OUT/flex-videonsa-run3.log 2>&1
echo "token bench rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/flex-videonsa-run3.log | tail -22 | cut -c1-260
echo "total $(( $(date +%s) - S0 )) s"
