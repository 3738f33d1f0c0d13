#!/bin/bash
# GPU run 28 (2026-12-01, third session): rows packed densely over the GQA group (9 tokens x 7 heads
# in 64 rows instead of 8 x 8 with one head row in eight idle) in slc_win, bwd_dq and the dk, dv
# kernels (KernelConfig.dense_rows, default on). First the GPU tests on the new default (which also
# run the previous session's last, unverified, change to reduce_slc_kernel), then the padded layout
# (dense_rows=0) against the dense one at 16K (video, random) and 128K (video), same run.
# One device call: `bash benchmarks/run28.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 240 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -4 $OUT/triton-gpu-tests.log; S=$(date +%s)
timeout 120 python benchmarks/triton_bench.py --lengths "" --tiles 16k --tile-inputs video,random \
  --tile-configs ";dense_rows=0" --json $OUT/triton-run28-rows-16k.json > $OUT/rows-16k.log 2>&1
echo "rows 16k: rc=$? in $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";dense_rows=0" --json $OUT/triton-run28-rows-128k.json > $OUT/rows-128k.log 2>&1
echo "rows 128k: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
for name in ("16k", "128k"):
    try:
        d = json.load(open(os.environ.get("OUT", "/tmp/out") + f"/triton-run28-rows-{name}.json"))
    except Exception as e:
        print(name, "no json", e); continue
    for r in d["results"]:
        k = r.get("kernels_fwdbwd_ms", {})
        pick = {n.split("(")[0][:14]: round(t, 2) for n, t in k.items() if any(s in n for s in ("slc_win", "bwd_", "reduce"))}
        print(r["L"], r["inputs"], r["variant"], "tok", r.get("tile_tokens"), "union/n %.2f" % r.get("union_over_n", 0),
              "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), pick, r.get("error", ""))
PY
