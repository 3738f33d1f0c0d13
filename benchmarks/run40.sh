#!/bin/bash
# GPU run 40 (2026-12-01, fourth session): the session's final defaults (tensor-descriptor loads in
# slc_win, bwd_dq and the lse pass; not in the score pass or the dk, dv kernels, run 39). First
# 8 warps for the selection kernel and bwd_dq against the default 4, and 2 stages for the lse pass
# against 3 (128K video, one run); then the
# issue's table (`nsaflex bench`, cuDNN in the same run), the 128K video profile, the GPU tests (run 32's steps).
# One device call: `bash benchmarks/run40.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 120 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";num_warps_select=8;num_stages_lse=2" --json $OUT/triton-run40-warps-128k.json > $OUT/run40.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run40-warps-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 0.3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb, r.get("error", "")[:300])
PY
# The table, the profile and the GPU tests: run 32's steps.
exec bash benchmarks/run32.sh
