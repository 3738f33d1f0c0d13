#!/bin/bash
# GPU run 41 (2026-12-01, fourth session): the session's final code (descriptor loads; the lse pass
# at 2 stages). The table from 8K (where the forward breaks even with cuDNN) to 128K, cuDNN
# in the same run; the 128K video profile; the GPU tests; then Nsight Compute on slc_win_kernel at
# 16K video (the second forward), as run 33 read it with pointer loads.
# One device call: `bash benchmarks/run41.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
LENGTHS=8k,12k,16k,32k,64k,128k bash benchmarks/run32.sh  # the table, the profile, the GPU tests
S=$(date +%s)
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECTIONS="--print-details all --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats"
timeout 100 $NCU --clock-control none --kernel-name regex:slc_win_kernel --launch-skip 1 --launch-count 1 $SECTIONS \
  python benchmarks/ncu_forward.py 16k > $OUT/ncu-slc-win-16k.txt 2>&1
echo "ncu slc_win: rc=$? in $(( $(date +%s) - S )) s"
grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Achieved Occupancy|Registers Per|Stall|Compute \(SM\) Throughput|L2 Cache Throughput|Dynamic Shared" $OUT/ncu-slc-win-16k.txt | head -30
