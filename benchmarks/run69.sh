#!/bin/bash
# GPU run 69 (2026-12-02, eleventh session): the two-step top-n on a side stream (topn_streams=2: the
# top-n of chunk c beside the score pass of chunk c + 1, two chunk buffers) against one stream,
# alternating four times at 128K video (forward); the GPU bit-identity test of the side stream; the
# forward's kernel timeline with the side stream. One device call: `bash benchmarks/run69.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
V="topn_streams=2"
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$V;;$V;;$V;;$V" --json $OUT/triton-run69-fwd-128k.json > $OUT/run69-fwd.log 2>&1
echo "forward variants: rc=$? in $(( $(date +%s) - S )) s"
python - $OUT/triton-run69-fwd-128k.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    k = r.get("kernels_fwd_ms", {})
    print(r["variant"][:48], "fwd %.2f" % r.get("fwd_ms", 0), {n.split("(")[0][:12]: round(t, 2) for n, t in k.items() if t > 0.3},
          r.get("error", "")[:300])
PY
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py -k side_stream \
  > $OUT/triton-run69-side-stream-test.log 2>&1
echo "side-stream test: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run69-side-stream-test.log
S=$(date +%s)
timeout 60 python benchmarks/forward_timeline.py --length 128k --config $V --json $OUT/triton-run69-timeline-128k.json \
  > $OUT/run69-timeline.log 2>&1
echo "timeline: rc=$? in $(( $(date +%s) - S )) s"; tail -n 21 $OUT/run69-timeline.log | cut -c1-110
