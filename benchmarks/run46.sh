#!/bin/bash
# GPU run 46 (2026-12-01, fifth session): topn_select_kernel walking consecutive tokens per row, each
# search after the first starting from a bracket around the previous token's threshold (topn_chain,
# topn_spread), against the plain bisection (topn_chain=1); 128K video, one run (the chain-1 variant
# first and again last: the first variant of a run has read slow on forward+backward wall time).
# Then Nsight Compute on the new topn_select (the second forward's last query chunk).
# One device call: `bash benchmarks/run46.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 300 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs "topn_chain=1;;topn_chain=8;topn_spread=2097152;topn_chain=1" \
  --json $OUT/triton-run46-topn-128k.json > $OUT/run46.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run46-topn-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    ks = sum(t for t in r.get("kernels_fwdbwd_ms", {}).values())
    print(r["variant"], "fwd %.2f fwdbwd %.2f (kernel sum %.1f)" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0), ks), kf, r.get("error", "")[:300])
PY
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECTIONS="--print-details all --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section LaunchStats"
S=$(date +%s)
timeout 100 $NCU --clock-control none --kernel-name regex:topn_select_kernel --launch-skip 15 --launch-count 1 $SECTIONS \
  python benchmarks/ncu_forward.py 128k > $OUT/ncu-topn-chain-128k.txt 2>&1
echo "topn: rc=$? in $(( $(date +%s) - S )) s"
grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Achieved Occupancy|Registers Per|Compute \(SM\) Throughput| ALU | LSU " $OUT/ncu-topn-chain-128k.txt | head -12
