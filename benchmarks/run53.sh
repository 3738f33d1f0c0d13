#!/bin/bash
# GPU run 53 (2026-12-02, eighth session): the score pass is now bound by its L1/LSU wavefronts
# (run 52: 78 % "Data Pipe Lsu Wavefronts", ALU 19 %), which its per-element cp.async loads of the
# compressed keys feed; tensor descriptors (tma_score) lost in run 39, when the pass was bound
# elsewhere. 128K video, one run, the defaults first (thrown away) and again.
# One device call: `bash benchmarks/run53.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 150 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";;tma_score=True;tma_score=True,num_stages_score=2;;tma_score=True" \
  --json $OUT/triton-run53-variants-128k.json > $OUT/run53.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run53-variants-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    ks = sum(t for t in r.get("kernels_fwd_ms", {}).values())
    print(r["variant"], "fwd %.2f fwdbwd %.2f (fwd kernel sum %.2f)" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0), ks), kf, r.get("error", "")[:300])
PY
