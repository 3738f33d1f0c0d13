#!/bin/bash
# GPU run 50 (2026-12-02, eighth session): the compression passes without the per-element
# visibility mask on the chunks every row of a tile sees whole, the score pass's rows ordered so
# that the group sum shuffles a third as much, forced blocks written as -1 for topn_select_kernel
# (one comparison marks candidates there; no per-score candidate mask, no count). Profile at 128K
# video with these kernels, then with the previous forward kernels (090b0a5's forward.py copied over
# the device's copy of the tree: same process layout, same machine), the issue's table, the GPU tests.
# One device call: `bash benchmarks/run50.sh`, with benchmarks/old/forward_090b0a5.py made by
# `git show 090b0a5:nsaflex/kernels/forward.py` (not committed).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
summary() {
python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["results"]:
    print(r["L"], r["inputs"], "fwd %.2f fwdbwd %.2f" % (r["fwd_ms"], r["fwdbwd_ms"]), "fwd TFLOP/s %.0f" % r.get("fwd_tflops", 0))
    for name, v in r.get("per_kernel_fwd", {}).items():
        print("  ", name, v)
    for name, ms in r.get("kernels_fwdbwd_ms", {}).items():
        if ms >= 0.5:
            print("   fwd+bwd", name[:40], round(ms, 2))
PY
}
for tag in new old new2; do
  S=$(date +%s)
  if [ $tag = old ]; then cp nsaflex/kernels/forward.py /tmp/forward_new.py; cp benchmarks/old/forward_090b0a5.py nsaflex/kernels/forward.py; fi
  if [ $tag = new2 ]; then cp /tmp/forward_new.py nsaflex/kernels/forward.py; fi
  timeout 100 python benchmarks/triton_bench.py --lengths 128k --inputs video --profile \
    --json $OUT/triton-profile-128k-$tag.json > $OUT/triton-profile-$tag.log 2>&1
  echo "profile $tag: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-profile-128k-$tag.json
done
S=$(date +%s)
timeout 200 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 8k,12k,16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-110
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 280 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-gpu-tests.log
