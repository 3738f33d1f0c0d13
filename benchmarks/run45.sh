#!/bin/bash
# GPU run 45 (2026-12-01, fifth session): the new defaults (compression output from the lse pass,
# both compression passes capped at 128 registers, the inference's compression output in bf16)
# against the previous defaults, and variants around them: 128 compressed tokens per lse step, 3
# pipeline stages in the lse pass, 16-token selection tiles on 8 warps (128K video, one run); then
# Nsight Compute on topn_select (128K video, the second forward's last query chunk).
# One device call: `bash benchmarks/run45.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 300 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";output_in_lse=0,maxnreg_lse=0,maxnreg_score=0;lse_block=128;num_stages_lse=3;select_tokens=16,num_warps_select=8" \
  --json $OUT/triton-run45-variants-128k.json > $OUT/run45.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run45-variants-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 0.3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb, r.get("error", "")[:300])
PY
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECTIONS="--print-details all --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats"
S=$(date +%s)
timeout 100 $NCU --clock-control none --kernel-name regex:topn_select_kernel --launch-skip 15 --launch-count 1 $SECTIONS \
  python benchmarks/ncu_forward.py 128k > $OUT/ncu-topn-128k.txt 2>&1
echo "topn: rc=$? in $(( $(date +%s) - S )) s"
grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|ALU|LSU" $OUT/ncu-topn-128k.txt | head -40
