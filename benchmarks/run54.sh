#!/bin/bash
# GPU run 54 (2026-12-02, eighth session): the score pass's keys through tensor descriptors with 2
# pipeline stages as the new defaults (run 53), against the previous pointer loads with 3 stages,
# alternating in one run (the GPU's clock drifts down over a run: run 53's kernels slowed 5-10 %
# from first to last variant); then the GPU tests and the issue's table on the new defaults.
# One device call: `bash benchmarks/run54.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
OLD="tma_score=False,num_stages_score=3"
timeout 150 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";$OLD;;$OLD;;$OLD;" \
  --json $OUT/triton-run54-variants-128k.json > $OUT/run54.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run54-variants-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    ks = sum(t for t in r.get("kernels_fwd_ms", {}).values())
    print(r["variant"], "fwd %.2f fwdbwd %.2f (fwd kernel sum %.2f)" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0), ks), kf, r.get("error", "")[:300])
PY
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 300 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 2 $OUT/triton-gpu-tests.log
S=$(date +%s)
timeout 150 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 8k,12k,16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-100 | head -36
