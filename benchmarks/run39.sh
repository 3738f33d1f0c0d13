#!/bin/bash
# GPU run 39 (2026-12-01, fourth session): tensor-descriptor loads, same-run comparison at 128K video
# (run 38's pointer-path variant failed to compile on triton 3.6: a jit helper returned None): all
# off; the default (slc_win, bwd_dq, the lse pass, the q/dO rows of the compression and window dk,
# dv kernels); the default with the score pass too; the default without the dk, dv kernels'.
# Then the issue's table on the default and the GPU tests. One device call: `bash benchmarks/run39.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs "tma=0,tma_lse=0,tma_dkv=0;;tma_score=1;tma_dkv=0" \
  --json $OUT/triton-run39-tma-128k.json > $OUT/run39.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run39-tma-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 0.3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb, r.get("error", "")[:300])
PY
S=$(date +%s)
timeout 240 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-110
