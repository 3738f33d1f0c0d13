#!/bin/bash
# GPU run 70 (2026-12-02, eleventh session): the two-step top-n beside the score passes, second form:
# the score passes on a high-priority stream, the top-n on another, 2 or 3 chunk buffers
# (topn_buffers), so that the GPU places the score pass of chunk c + 1 first and the top-n of chunk c
# fills the room it leaves (run 69's side stream, with the score passes on the caller's stream,
# overlapped the two kernels only at their tails). Alternating with one stream at 128K video
# (forward); the GPU bit-identity test; the kernel timelines. One device call: `bash benchmarks/run70.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
V="topn_buffers=2"; V3="topn_buffers=3"
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$V;$V3;;$V;$V3;;$V;$V3" --json $OUT/triton-run70-fwd-128k.json > $OUT/run70-fwd.log 2>&1
echo "forward variants: rc=$? in $(( $(date +%s) - S )) s"
python - $OUT/triton-run70-fwd-128k.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    k = r.get("kernels_fwd_ms", {})
    print(r["variant"][:48], "fwd %.2f" % r.get("fwd_ms", 0), {n.split("(")[0][:12]: round(t, 2) for n, t in k.items() if t > 0.3},
          r.get("error", "")[:300])
PY
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py -k side_stream \
  > $OUT/triton-run70-side-stream-test.log 2>&1
echo "side-stream test: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run70-side-stream-test.log
S=$(date +%s)
for C in $V $V3; do
  timeout 60 python benchmarks/forward_timeline.py --length 128k --config $C --json $OUT/triton-run70-timeline-$C-128k.json \
    > $OUT/run70-timeline-$C.log 2>&1
  echo "timeline $C: rc=$? in $(( $(date +%s) - S )) s"; tail -n 22 $OUT/run70-timeline-$C.log | cut -c1-100
done
