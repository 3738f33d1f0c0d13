#!/bin/bash
# GPU run 32 (2026-12-01, third session): the issue's measurement on the final code of the session
# (dense rows in slc_win, bwd_dq and cmp_lse): the `nsaflex bench` table (16K-128K, video and random
# inputs, fwd and fwd+bwd, cuDNN in the same run), then per-kernel times and counted TFLOP/s at 128K
# video (benchmarks/triton_bench.py --profile), then the GPU tests.
# One device call: `bash benchmarks/run32.sh` (LENGTHS=...: other table lengths, as run 41 asks).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 240 nsaflex bench videonsa --backends triton --baselines cudnn --lengths ${LENGTHS:-16k,32k,64k,128k} \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-110; S=$(date +%s)
timeout 120 python benchmarks/triton_bench.py --lengths 128k --inputs video --profile \
  --json $OUT/triton-profile-128k.json > $OUT/triton-profile.log 2>&1
echo "profile: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-profile-128k.json"))
for r in d["results"]:
    print(r["L"], r["inputs"], "fwd %.2f fwdbwd %.2f" % (r["fwd_ms"], r["fwdbwd_ms"]), "fwd TFLOP/s %.0f" % r.get("fwd_tflops", 0))
    for name, v in r.get("per_kernel_fwd", {}).items():
        print("  ", name, v)
    for name, ms in r.get("kernels_fwdbwd_ms", {}).items():
        if ms >= 0.5:
            print("   fwd+bwd", name[:40], round(ms, 2))
PY
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 240 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -4 $OUT/triton-gpu-tests.log
