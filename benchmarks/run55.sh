#!/bin/bash
# GPU run 55 (2026-12-02, ninth session): slc_win's union loop with each step's p.v issued after the
# next step's q.k (`overlap_qk`), so that the matrix units run it during the softmax; first the GPU
# check that it is bit-identical to the plain loop, then the two alternating at 128K video (the GPU's
# clock drifts down over a run). One device call: `bash benchmarks/run55.sh`.
# The option ran in commit adac8e1 (reverted by the commit after it: no gain).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 200 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k overlapped > $OUT/triton-run55-overlap-test.log 2>&1
echo "overlap test: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run55-overlap-test.log
S=$(date +%s)
NEW="overlap_qk=1"
timeout 240 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";$NEW;;$NEW;;$NEW" \
  --json $OUT/triton-run55-variants-128k.json > $OUT/run55.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run55-variants-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    ks = sum(t for t in r.get("kernels_fwd_ms", {}).values())
    print(r["variant"], "fwd %.2f fwdbwd %.2f (fwd kernel sum %.2f)" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0), ks), kf, r.get("error", "")[:300])
PY
