#!/bin/bash
# GPU run 43 (2026-12-01, fourth session): the training forward's slc_win reads its fp32 selection
# output back after the window loop instead of holding it in registers through that loop
# (KernelConfig.reread_selection; compiled for sm_90 it spills 68 bytes a thread instead of 288).
# 128K video, against holding it, in one run; then the GPU tests on the default (read back), all but
# the descriptor test of run 42 (2 min of the 6 left).
# One device call: `bash benchmarks/run43.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 100 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs "reread_selection=0;" --json $OUT/triton-run43-reread-128k.json > $OUT/run43.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run43-reread-128k.json"))
for r in d["results"]:
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 0.3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kb, r.get("error", "")[:300])
PY
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 170 python -m pytest -q -p no:cacheprovider \
  -k "not descriptor" tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-run43-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -3 $OUT/triton-run43-gpu-tests.log | cut -c1-300
