#!/bin/bash
# GPU run 29 (2026-12-01, third session): dense rows now in slc_win, bwd_dq and the lse pass only
# (the dk, dv kernels are back on GP rows per token: they lost 7-12 % with dense rows in run 28);
# topn_select_kernel's search with 3 or 7 probes a step against the bisection (topn_probes=1).
# Variants at 16K (video, random) and 128K (video) in one run, then the GPU tests (the top-n paths
# test now also requires the 3-probe search to choose the same blocks).
# One device call: `bash benchmarks/run29.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 120 python benchmarks/triton_bench.py --lengths "" --tiles 16k --tile-inputs video,random \
  --tile-configs ";topn_probes=3;dense_rows=0" --json $OUT/triton-run29-16k.json > $OUT/run29-16k.log 2>&1
echo "16k: rc=$? in $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";topn_probes=3;topn_probes=7;dense_rows=0" --json $OUT/triton-run29-128k.json > $OUT/run29-128k.log 2>&1
echo "128k: rc=$? in $(( $(date +%s) - S )) s"; S=$(date +%s)
python - <<'PY'
import json, os
for name in ("16k", "128k"):
    try:
        d = json.load(open(os.environ.get("OUT", "/tmp/out") + f"/triton-run29-{name}.json"))
    except Exception as e:
        print(name, "no json", e); continue
    for r in d["results"]:
        kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items()}
        kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if "bwd" in n or "reduce" in n}
        print(r["L"], r["inputs"], r["variant"], "tok", r.get("tile_tokens"), "union/n %.2f" % r.get("union_over_n", 0),
              "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb, r.get("error", ""))
PY
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 240 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -4 $OUT/triton-gpu-tests.log
