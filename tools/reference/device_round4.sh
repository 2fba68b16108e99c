#!/bin/bash
# Device, a short last round (2026-12-07): the #gpu specs of engine training
# and the serving engine, then issue 25's serving-with-training benchmark on
# the 20B shape at 8 streams.
set -u
source tools/reference/device_env.sh
T0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/device.txt
timeout ${SPECS_S:-70} $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/engine_train_spec.lua spec/serving_engine_spec.lua > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -20
need_20b
BENCH_JSON=$OUT/learn.json timeout ${LEARN_T:-110} lua5.4 bench/learn.lua /tmp/gptoss-20b cuda:0 ${LEARN_C:-8} 0.3 ${LEARN_S:-6} > $OUT/learn.md 2> $OUT/learn.err
echo "learn rc=$? at $(( $(date +%s) - T0 )) s"; cat $OUT/learn.md; tail -5 $OUT/learn.err
