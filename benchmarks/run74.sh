#!/bin/bash
# GPU run 74 (2026-12-02, twelfth session): the union loops load the next step's list entry during
# this step (prefetch_union, new default) against loading it at the step: 128K video, forward
# alternating four times, then forward+backward twice (bwd_dq runs the same loop); the GPU
# bit-identity test (outputs and gradients equal with and without the prefetch).
# One device call: `bash benchmarks/run74.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
OLD="prefetch_union=0"
summary() {
python - "$1" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    k = r.get("kernels_fwd_ms", {})
    kb = r.get("kernels_fwdbwd_ms", {})
    print(r["variant"][:20], "fwd %.2f" % r.get("fwd_ms", 0), "fwdbwd %.2f" % r.get("fwdbwd_ms", 0),
          {n.split("(")[0][:12]: round(t, 2) for n, t in {**k, **kb}.items() if t > 0.3}, r.get("error", "")[:300])
PY
}
S=$(date +%s)
timeout 170 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$OLD;;$OLD;;$OLD;;$OLD" --json $OUT/triton-run74-prefetch-fwd-128k.json > $OUT/run74-fwd.log 2>&1
echo "forward variants: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-run74-prefetch-fwd-128k.json
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";$OLD;;$OLD" --json $OUT/triton-run74-prefetch-fwdbwd-128k.json > $OUT/run74-fwdbwd.log 2>&1
echo "forward+backward variants: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-run74-prefetch-fwdbwd-128k.json
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k "bit_identical" > $OUT/triton-run74-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run74-gpu-tests.log
