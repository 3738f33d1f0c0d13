#!/bin/bash
# GPU run 37 (2026-12-01, third session): the compression passes' tiles. cmp_score runs 128 rows on
# 8 warps at 255 registers (one program per SM); against 64-row tiles on 4 warps (score_tokens=8,
# num_warps_score=4, which also sets the lse pass) and against 2 pipeline stages. 128K video.
# One device call: `bash benchmarks/run37.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
timeout 150 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";score_tokens=8,num_warps_score=4;num_stages_score=2,num_stages_lse=2" \
  --json $OUT/triton-run37-score-128k.json > $OUT/run37.log 2>&1
echo "rc=$?"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run37-score-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items()}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, r.get("error", ""))
PY
