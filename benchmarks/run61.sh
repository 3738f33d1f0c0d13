#!/bin/bash
# GPU run 61 (2026-12-02, tenth session): slc_win_kernel under a register cap with one pipeline
# stage, so that three 4-warp programs share an SM (run 59: latency-bound at two), against the
# defaults, alternating at 128K video: forward only first (the 40 ms target), then forward+backward
# for the defaults and the cap of 168. One device call: `bash benchmarks/run61.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
summary() {
python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb,
          r.get("slc_win_compiled", ""), r.get("error", "")[:300])
PY
}
A=""; B="maxnreg_select=168,num_stages=1"; C="maxnreg_select=152,num_stages=1"
D="maxnreg_select=128,num_stages=1"; E="num_stages=1"
S=$(date +%s)
timeout 330 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs "$A;$B;$C;$D;$E;$A;$B;$C;$D;$E" --json $OUT/triton-run61-cap-fwd-128k.json > $OUT/run61-fwd.log 2>&1
echo "forward variants: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-run61-cap-fwd-128k.json
S=$(date +%s)
timeout 220 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs "$A;$B;$A;$B" --json $OUT/triton-run61-cap-fwdbwd-128k.json > $OUT/run61-fwdbwd.log 2>&1
echo "forward+backward variants: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-run61-cap-fwdbwd-128k.json
