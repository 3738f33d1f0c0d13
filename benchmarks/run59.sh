#!/bin/bash
# GPU run 59 (2026-12-02, ninth session): Nsight Compute on slc_win_kernel at 128K video (the second
# forward's launch), to see whether its loads bound it (run 56: 18 % fewer loop instructions, no
# faster). One device call: `bash benchmarks/run59.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
S=$(date +%s)
timeout 280 $NCU --clock-control none --kernel-name regex:slc_win_kernel --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
  --section WarpStateStats --section SchedulerStats --section Occupancy --section ComputeWorkloadAnalysis \
  --metrics lts__t_sector_hit_rate.pct,dram__bytes_read.sum,lts__t_bytes.sum,l1tex__m_xbar2l1tex_read_bytes.sum \
  python benchmarks/ncu_forward.py 128k > $OUT/triton-run59-ncu-slc-win-128k.txt 2>&1
echo "ncu: rc=$? in $(( $(date +%s) - S )) s"
grep -E "Duration|Memory Throughput|L2 Cache Throughput|DRAM Throughput|L1/TEX Hit|L2 Hit|hit_rate|bytes|Issue Slots Busy|Warp Cycles Per Issued|Stall|Tensor|Compute \(SM\)|Mem Busy|Max Bandwidth|Achieved Occupancy" \
  $OUT/triton-run59-ncu-slc-win-128k.txt | head -40
