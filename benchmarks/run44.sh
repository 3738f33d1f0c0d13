#!/bin/bash
# GPU run 44 (2026-12-01, fifth session): the compression output from the lse pass (flash-style online
# softmax; the score pass then loads no values), against the score pass computing it (the previous
# default), with and without register caps (128 a thread: two 8-warp programs per SM) on the two
# compression passes (128K video, one run); Nsight Compute on the new lse and score passes at 128K
# video (the second forward; the score pass's last query chunk); the GPU tests on the new default.
# One device call: `bash benchmarks/run44.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
timeout 240 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs "output_in_lse=0;;maxnreg_score=128;maxnreg_score=128,maxnreg_lse=128;output_in_lse=0,maxnreg_score=128" \
  --json $OUT/triton-run44-cmp-128k.json > $OUT/run44.log 2>&1
echo "variants: rc=$? in $(( $(date +%s) - S )) s"
python - <<'PY'
import json, os
d = json.load(open(os.environ.get("OUT", "/tmp/out") + "/triton-run44-cmp-128k.json"))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.3}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 0.3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb, r.get("error", "")[:300])
PY
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECTIONS="--print-details all --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats"
for K in cmp_lse:1 cmp_score:15; do
  S=$(date +%s)
  timeout 100 $NCU --clock-control none --kernel-name regex:${K%:*}_kernel --launch-skip ${K#*:} --launch-count 1 $SECTIONS \
    python benchmarks/ncu_forward.py 128k > $OUT/ncu-${K%:*}-128k.txt 2>&1
  echo "${K%:*}: rc=$? in $(( $(date +%s) - S )) s"
  grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput" $OUT/ncu-${K%:*}-128k.txt | head -30
done
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 170 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k "not descriptor" > $OUT/gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -3 $OUT/gpu-tests.log
