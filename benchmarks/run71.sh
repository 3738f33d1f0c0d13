#!/bin/bash
# GPU run 71 (2026-12-02, eleventh session): topn_select_kernel with rows in two power-of-two parts
# (topn_parts, new default: 1,024 + 256 or + 512 for the chunks from 64K to 96K tokens, 512 + 256 from
# 32K to 48K) against one part of next_pow2 width, alternating four times at 128K video (forward);
# the GPU tests that run the top-n; then the issue's table on the new defaults.
# One device call: `bash benchmarks/run71.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
OLD="topn_parts=0"
S=$(date +%s)
timeout 170 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$OLD;;$OLD;;$OLD;;$OLD" --json $OUT/triton-run71-parts-fwd-128k.json > $OUT/run71-fwd.log 2>&1
echo "forward variants: rc=$? in $(( $(date +%s) - S )) s"
python - $OUT/triton-run71-parts-fwd-128k.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    k = r.get("kernels_fwd_ms", {})
    print(r["variant"][:24], "fwd %.2f" % r.get("fwd_ms", 0), {n.split("(")[0][:12]: round(t, 2) for n, t in k.items() if t > 0.3},
          r.get("error", "")[:300])
PY
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda NSAFLEX_TEST_EXAMPLES=3 timeout 170 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k "topn or selected_indices or videonsa_bf16_4k or bf16_property" > $OUT/triton-run71-gpu-tests.log 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run71-gpu-tests.log
S=$(date +%s)
timeout 200 nsaflex bench videonsa --backends triton --baselines cudnn --lengths 8k,12k,16k,32k,64k,128k \
  --inputs video,random --pass fwd,fwd+bwd --json $OUT/triton-bench.json > $OUT/triton-bench.log 2>&1
echo "triton bench: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/triton-bench.log | grep -v Warning | grep "│ *[0-9]" | cut -c1-100 | head -36
