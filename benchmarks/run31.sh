#!/bin/bash
# GPU run 31 (2026-12-01, third session): topn_select_kernel bisects over the whole row only until at
# most topn_window scores lie in its window, then over those alone (copied into the head of the row's
# buffer). 128K video, forward and forward+backward: the default window (128) against 32 and 512.
# One device call: `bash benchmarks/run31.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";topn_window=32;topn_window=512" --json $OUT/triton-run31-topn-128k.json > $OUT/run31.log 2>&1
echo "128k: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run31-topn-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items()}
    print(r["L"], r["inputs"], r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, r.get("error", ""))
PY
