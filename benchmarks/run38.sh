#!/bin/bash
# GPU run 38 (2026-12-01, fourth session): key and value blocks through tensor descriptors (TMA)
# in slc_win, bwd_dq, cmp_lse and cmp_score (KernelConfig.tma) against the per-element pointer
# loads, at 128K video, forward and forward+backward, per kernel; then the GPU tests on the
# default (tma on). One device call: `bash benchmarks/run38.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 280 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs "tma=0;tma=1;tma=1,num_stages_dq=3;tma=1,num_stages=2" \
  --json $OUT/triton-run38-tma-128k.json > $OUT/run38.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run38-tma-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 0.3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb, r.get("error", ""))
PY
tail -3 $OUT/run38.log | cut -c1-300
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 240 python -m pytest -q -p no:cacheprovider -x \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-run38-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -15 $OUT/triton-run38-gpu-tests.log | cut -c1-400
