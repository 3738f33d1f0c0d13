#!/bin/bash
# GPU run 24 (2026-12-01): no host synchronisation in the identity path's forward and backward
# (token-type checks and layout read once per tensor, the inverted index with fixed shapes).
# The `nsaflex bench` table (16K-128K, video and random inputs, fwd and fwd+bwd, cuDNN in the
# same run), the GPU tests (the bf16 property test with 3 draws plus its pinned examples, and a new
# test that turns any synchronisation into an error), then per-kernel device times at 16K and 32K
# beside the wall-clock forward to show what is left between them.
# One device call: `bash benchmarks/run24.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 200 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-110; S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 240 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_gpu.py tests/test_tile_scores.py > $OUT/triton-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -4 $OUT/triton-gpu-tests.log; S=$(date +%s)
timeout 90 python benchmarks/triton_bench.py --lengths 16k,32k --inputs video --profile \
  --json $OUT/triton-profile.json > $OUT/triton-profile.log 2>&1
echo "profile: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-profile.json"))
for r in d["results"]:
    for name, wall in (("kernels_fwd_ms", r["fwd_ms"]), ("kernels_fwdbwd_ms", r["fwdbwd_ms"])):
        device = sum(r[name].values())
        print(f'{r["L"]} {name[8:-3]}: wall {wall:.3f} ms, device kernels {device:.3f} ms, gap {wall - device:.3f} ms')
PY
