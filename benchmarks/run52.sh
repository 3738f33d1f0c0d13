#!/bin/bash
# GPU run 52 (2026-12-02, eighth session): where the compression passes and the top-n stand after
# run 50's changes. Query chunks of the two-step top-n (16 launches at 128K with 16K-token chunks:
# each launch ends in a tail), 128K video, one run, the defaults first (thrown away) and again; then
# Nsight Compute on the lse pass, the score pass and topn_select (the second forward's last chunk).
# One device call: `bash benchmarks/run52.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 120 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";;topn_chunk=32768;topn_chunk=8192;" \
  --json $OUT/triton-run52-variants-128k.json > $OUT/run52.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run52-variants-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    ks = sum(t for t in r.get("kernels_fwd_ms", {}).values())
    print(r["variant"], "fwd %.2f fwdbwd %.2f (fwd kernel sum %.2f)" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0), ks), kf, r.get("error", "")[:300])
PY
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECTIONS="--print-details all --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats"
for K in cmp_lse:1 cmp_score:15 topn_select:15; do
  S=$(date +%s)
  timeout 100 $NCU --clock-control none --kernel-name regex:${K%:*}_kernel --launch-skip ${K#*:} --launch-count 1 $SECTIONS \
    python benchmarks/ncu_forward.py 128k > $OUT/ncu-${K%:*}-128k.txt 2>&1
  echo "${K%:*}: rc=$? in $(( $(date +%s) - S )) s"
  grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Achieved Occupancy|Registers Per|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput| ALU | LSU | FMA | Tensor| XU " $OUT/ncu-${K%:*}-128k.txt | head -24
done
