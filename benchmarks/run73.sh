#!/bin/bash
# GPU run 73 (2026-12-02, twelfth session): the GPU tests that run the top-n on the review-mended
# topn_select_kernel (195e557: not yet compiled by triton 3.6); then Nsight Compute on the current
# slc_win_kernel at 128K video (inference: one stage, 128 registers, four programs an SM), the first
# counters since that launch became the default: pipe use, stalls, local-memory (spill) traffic.
# One device call: `bash benchmarks/run73.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 240 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k "topn or selected_indices or videonsa_bf16_4k" > $OUT/triton-run73-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run73-gpu-tests.log
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECTIONS="--print-details all --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats --section InstructionStats"
S=$(date +%s)
timeout 240 $NCU --clock-control none --kernel-name regex:slc_win_kernel --launch-skip 1 --launch-count 1 $SECTIONS \
  python benchmarks/ncu_forward.py 128k > $OUT/triton-run73-ncu-slc-win-128k.txt 2>&1
echo "ncu slc_win: rc=$? in $(( $(date +%s) - S )) s"
grep -E "Duration|Registers Per|Theoretical Occ|Achieved Occ|Issue Slots Busy|Warp Cycles Per Issued|Eligible Warps|Local Memory|Tensor|Xu|Pipe Fma |Pipe Alu|L2 Cache Throughput|Stall" \
  $OUT/triton-run73-ncu-slc-win-128k.txt | head -40
