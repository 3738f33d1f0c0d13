#!/bin/bash
# GPU run 66 (2026-12-02, tenth session), on run 63's defaults (slc_win for inference capped at 128
# registers, one stage): (1) the union lists built by their own kernel (`union_pass`, code of commit
# 6d5d291 re-applied on 8c331af for this run only, not committed) against the defaults, forward
# only; (2) the training forward under the same cap (`num_stages_save=1,maxnreg_select_save=128`)
# against 3 stages uncapped, forward+backward; both alternating at 128K video. One device call.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
summary() {
python - "$1" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.1}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb, r.get("error", "")[:300])
PY
}
U="union_pass=1"; T="num_stages_save=1,maxnreg_select_save=128"
S=$(date +%s)
timeout 150 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$U;;$U;;$U" --json $OUT/triton-run66-union-pass-fwd-128k.json > $OUT/run66-fwd.log 2>&1
echo "forward variants: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-run66-union-pass-fwd-128k.json
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";$T;;$T" --json $OUT/triton-run66-train-cap-fwdbwd-128k.json > $OUT/run66-fwdbwd.log 2>&1
echo "forward+backward variants: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-run66-train-cap-fwdbwd-128k.json
