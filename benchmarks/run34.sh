#!/bin/bash
# GPU run 34 (2026-12-01, third session): run 33 found topn_select_kernel at 228 registers, so 2 warps
# per scheduler, stalled on instruction fetch and memory; more warps per row (fewer scores per lane)
# against the one warp of 64 scores a lane at 2,048 candidates. 128K video; then the top-n GPU test.
# One device call: `bash benchmarks/run34.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";topn_lane_scores=32;topn_lane_scores=16;topn_lane_scores=8" --json $OUT/triton-run34-topn-128k.json > $OUT/run34.log 2>&1
echo "128k: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run34-topn-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items()}
    print(r["L"], r["inputs"], r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, r.get("error", ""))
PY
