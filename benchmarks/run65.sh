#!/bin/bash
# GPU run 65 (2026-12-02, tenth session): with slc_win_kernel capped at 128 registers, 18-token
# tiles on 8 warps (128 rows; a union per token ~27 % smaller than 9-token tiles') with one or two
# pipeline stages against the defaults, forward only at 128K video. One device call.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
V1="select_tokens=16,num_warps_select=8"; V2="select_tokens=16,num_warps_select=8,num_stages=2"
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$V1;$V2;;$V1;$V2" --json $OUT/triton-run65-wide-fwd-128k.json > $OUT/run65-fwd.log 2>&1
echo "rc=$? in $(( $(date +%s) - S )) s"
python - $OUT/triton-run65-wide-fwd-128k.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    k = r.get("kernels_fwd_ms", {})
    print(r["variant"][:60], "fwd %.2f" % r.get("fwd_ms", 0), {n.split("(")[0][:12]: round(t, 2) for n, t in k.items() if t > 0.3},
          r.get("slc_win_compiled", [])[-1:], r.get("error", "")[:300])
PY
