#!/bin/bash
# GPU run 51 (2026-12-02, eighth session): the GPU tests on run 50's kernels (run 50's test step ran
# out of its 280 s after 7 passing tests), then the score pass's and top-n's tile choices again on
# the new kernels (their ALU work fell): 128K video, one run, the defaults first (thrown away: the
# first variant of a run reads slow on forward+backward) and again.
# One device call: `bash benchmarks/run51.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 420 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-gpu-tests.log
S=$(date +%s)
timeout 150 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";;maxnreg_score=0;num_stages_score=2;score_tokens=32;topn_chain=8" \
  --json $OUT/triton-run51-variants-128k.json > $OUT/run51.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run51-variants-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    ks = sum(t for t in r.get("kernels_fwdbwd_ms", {}).values())
    print(r["variant"], "fwd %.2f fwdbwd %.2f (kernel sum %.1f)" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0), ks), kf, r.get("error", "")[:300])
PY
