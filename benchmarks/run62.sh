#!/bin/bash
# GPU run 62 (2026-12-02, tenth session): the selection tiles' union lists built by their own
# kernel (tile_union_kernel, 48 registers, many programs an SM) ahead of slc_win_kernel instead of
# in its prologue (`union_pass`), against the defaults, alternating at 128K video; first the GPU
# test that both give bit-identical outputs and gradients. One device call: `bash benchmarks/run62.sh`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
S=$(date +%s)
NSAFLEX_TEST_DEVICE=cuda timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py \
  -k "bit_identical and union_pass" > $OUT/triton-run62-union-pass-test.log 2>&1
echo "bit-identity test: rc=$? in $(( $(date +%s) - S )) s"; tail -n 3 $OUT/triton-run62-union-pass-test.log
summary() {
python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["results"]:
    kf = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwd_ms", {}).items() if t > 0.1}
    kb = {n.split("(")[0][:12]: round(t, 2) for n, t in r.get("kernels_fwdbwd_ms", {}).items() if t > 3}
    print(r["variant"], "fwd %.2f fwdbwd %.2f" % (r.get("fwd_ms", 0), r.get("fwdbwd_ms", 0)), kf, kb, r.get("error", "")[:300])
PY
}
U="union_pass=1"
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video --no-backward \
  --tile-configs ";$U;;$U;;$U;;$U" --json $OUT/triton-run62-union-pass-fwd-128k.json > $OUT/run62-fwd.log 2>&1
echo "forward variants: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-run62-union-pass-fwd-128k.json
S=$(date +%s)
timeout 200 python benchmarks/triton_bench.py --lengths "" --tiles 128k --tile-inputs video \
  --tile-configs ";$U;;$U" --json $OUT/triton-run62-union-pass-fwdbwd-128k.json > $OUT/run62-fwdbwd.log 2>&1
echo "forward+backward variants: rc=$? in $(( $(date +%s) - S )) s"; summary $OUT/triton-run62-union-pass-fwdbwd-128k.json
