#!/bin/bash
# GPU run 47 (2026-12-01, fifth session): the session's code (compression output from the lse pass,
# register caps on both compression passes, the inference's compression output in q's dtype,
# topn_select walking 4 tokens a row from the previous token's threshold, the tie scan only where
# a row ties). The issue's table from 8K to 128K with cuDNN in the same run, the 128K video profile
# (run 32's steps, without its GPU tests), then the GPU test that runs every descriptor load against
# the pointer loads (the lse pass now also loads values through a descriptor).
# One device call: `bash benchmarks/run47.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 230 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 8k,12k,16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-110; S=$(date +%s)
timeout 110 python benchmarks/triton_bench.py --lengths 128k --inputs video --profile \
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
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 200 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py -k descriptor > $OUT/triton-descriptor-test.log 2>&1
echo "descriptor test: rc=$? in $(( $(date +%s) - S )) s"; tail -n 2 $OUT/triton-descriptor-test.log
