#!/bin/bash
# GPU run 68 (2026-12-02, eleventh session): shared memory for deeper pipelines at four programs an SM.
# (1) slc_win_kernel with each 64-key selection block in two 32-column steps and 2 pipeline stages
#     (select_split=2: 49 KB of shared memory, as one stage of 64 columns, so four capped programs still fit);
# (2) the compression passes on 64-row, 4-warp tiles (score_tokens=8) with the lse pass at 32 compressed
#     tokens a step and 2 stages (49 KB), or 64 a step and 1 stage (33 KB): four programs an SM instead of two;
# alternating with the defaults at 128K video, three rounds. Then the GPU test of the split, and the
# forward's kernel timeline (gaps between launches). One device call: `bash benchmarks/run68.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S2="select_split=2,num_stages=2"
C1="score_tokens=8,num_warps_score=4,lse_block=32"
C2="score_tokens=8,num_warps_score=4,num_stages_lse=1"
S=$(date +%s)
timeout 280 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$S2;$C1;$C2;;$S2;$C1;$C2;;$S2;$C1;$C2" --json $OUT/triton-run68-fwd-128k.json > $OUT/run68-fwd.log 2>&1
echo "forward variants: rc=$? in $(( $(date +%s) - S )) s"
python - $OUT/triton-run68-fwd-128k.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    k = r.get("kernels_fwd_ms", {})
    print(r["variant"][:48], "fwd %.2f" % r.get("fwd_ms", 0), {n.split("(")[0][:12]: round(t, 2) for n, t in k.items() if t > 0.3},
          r.get("error", "")[:300])
PY
grep -v "^{" $OUT/run68-fwd.log | grep -iv warn | tail -5
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 120 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py -k split \
  > $OUT/triton-run68-split-test.log 2>&1
echo "split test: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run68-split-test.log
S=$(date +%s)
timeout 60 python benchmarks/forward_timeline.py --length 128k --json $OUT/triton-run68-timeline-128k.json \
  > $OUT/run68-timeline.log 2>&1
echo "timeline: rc=$? in $(( $(date +%s) - S )) s"; tail -n 30 $OUT/run68-timeline.log | cut -c1-120
