#!/bin/bash
# The flex backend's benchmark record (GPU run 2): videonsa-qblock and videonsa, 8k..128k,
# fwd and fwd+bwd, video and random inputs, dense baselines measured in the same runs.
# On a machine where nsaflex is installed, drop the PYTHONPATH shim and call `nsaflex bench` directly.
export PYTHONPATH=.:benchmarks/flex-shim PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ti
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee $OUT/flex-gpu.txt
for P in videonsa-qblock:250 videonsa:200; do
  NAME=${P%%:*}; LIMIT=${P##*:}; S=$(date +%s)
  timeout $LIMIT python benchmarks/flex-cli.py bench $NAME --lengths 8k,32k,64k,128k --backends flex \
    --baselines sdpa,cudnn,flex-dense --pass fwd,fwd+bwd --inputs video,random \
    --json $OUT/flex-$NAME.json > $OUT/flex-$NAME.log 2>&1
  echo "$NAME: rc=$? in $(( $(date +%s) - S )) s"; grep -v "^$" $OUT/flex-$NAME.log | tail -45
done
