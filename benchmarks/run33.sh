#!/bin/bash
# GPU run 33 (2026-12-01, third session): where the time of slc_win_kernel and topn_select_kernel goes,
# read from the hardware counters (Nsight Compute, clocks left alone): warp states (stall reasons),
# scheduler issue rates, occupancy, throughput against peak. slc_win at 16K video (the second forward),
# topn_select at 128K video (the second forward's last query chunk: 2,048 candidate blocks a row).
# One device call: `bash benchmarks/run33.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
which ncu || ls /opt/nvidia/nsight-compute/*/ncu
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECTIONS="--print-details all --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats"
S=$(date +%s)
timeout 200 $NCU --clock-control none --kernel-name regex:slc_win_kernel --launch-skip 1 --launch-count 1 $SECTIONS \
  python benchmarks/ncu_forward.py 16k > $OUT/ncu-slc-win-16k.txt 2>&1
echo "slc_win: rc=$? in $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 240 $NCU --clock-control none --kernel-name regex:topn_select_kernel --launch-skip 15 --launch-count 1 $SECTIONS \
  python benchmarks/ncu_forward.py 128k > $OUT/ncu-topn-128k.txt 2>&1
echo "topn: rc=$? in $(( $(date +%s) - S )) s"
grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Issued Ipc|No Eligible|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Executed Ipc" $OUT/ncu-slc-win-16k.txt | head -40
echo ----
grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Issued Ipc|No Eligible|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc" $OUT/ncu-topn-128k.txt | head -40
tail -5 $OUT/ncu-topn-128k.txt
