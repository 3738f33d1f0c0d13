#!/bin/bash
# GPU run 56 (2026-12-02, ninth session): union blocks that end before a tile's first token masked
# per row in slc_win_kernel and bwd_dq_kernel (`row_masks`, new default) against the per-entry masks,
# alternating at 128K video; the GPU check that both give identical outputs and gradients; then the
# GPU tests. One device call: `bash benchmarks/run56.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k row_masked > $OUT/triton-run56-row-masks-test.log 2>&1
echo "row-mask test: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run56-row-masks-test.log
S=$(date +%s)
OLD="row_masks=0"
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";$OLD;;$OLD;;$OLD" \
  --json $OUT/triton-run56-variants-128k.json > $OUT/run56.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run56-variants-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 3}
    ks = sum(t for t in r.get("kernels_fwd_ms", {}).values())
    kbs = sum(t for t in r.get("kernels_fwdbwd_ms", {}).values())
    print(r["variant"], "fwd %.2f fwdbwd %.2f (kernel sums %.2f / %.2f)" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0), ks, kbs), kf, kb, r.get("error", "")[:300])
PY
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 250 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py -k "not row_masked" > $OUT/triton-run56-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run56-gpu-tests.log
