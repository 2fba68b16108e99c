#!/bin/bash
# Device: issue 18's batch invariance checked and measured. Carry
# .device-kit and .carry (bundle.tar.xz: tokenizer and build/lua5.4/gptoss,
# made with CUDA on the dev machine). Stages (STAGES, default all):
#   specs      the #gpu cases of the engine's specs (Lua 5.4)
#   invariant  bench/invariant.lua on the 20B shape: batch_invariant off and on
#   serving    bench/serving.lua at 1 and 64 concurrent requests
#   study      gptoss bench study (the seeds' study through the engine) on the 20B shape
set -u
source tools/reference/device_env.sh
STAGES=${STAGES:-specs invariant serving study}
has() { [[ " $STAGES " == *" $1 "* ]]; }
gpu_line
if has specs; then
  t0=$(date +%s)
  timeout 150 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/serving_engine_spec.lua spec/engine_spec.lua spec/logprobs_spec.lua spec/loader_spec.lua > $OUT/gpu_specs.log 2>&1
  echo "gpu specs rc=$? in $(( $(date +%s) - t0 )) s"
  grep -aE "successes|Failure|Error|spec.lua:[0-9]" $OUT/gpu_specs.log | head -30
fi
if has invariant || has serving || has study; then
  t0=$(date +%s)
  [ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer >/dev/null
  echo "20B checkpoint ready in $(( $(date +%s) - t0 )) s"
fi
if has invariant; then
  t0=$(date +%s)
  timeout 150 lua5.4 bench/invariant.lua /tmp/gptoss-20b cuda:0 > $OUT/invariant.md 2> $OUT/invariant.err
  echo "invariant rc=$? in $(( $(date +%s) - t0 )) s"; cat $OUT/invariant.md; tail -3 $OUT/invariant.err
fi
if has serving; then
  timeout 200 lua5.4 bench/serving.lua /tmp/gptoss-20b cuda:0 1,64 512 128 > $OUT/serving.md 2> $OUT/serving.err
  echo "serving rc=$?"; cat $OUT/serving.md; tail -3 $OUT/serving.err
fi
if has study; then
  t0=$(date +%s)
  GPTOSS_PROGRESS=lines timeout ${STUDY_TIMEOUT:-200} lua5.4 bin/gptoss bench study /tmp/gptoss-20b --device cuda:0 --requests 5 \
    --max-tokens 128 --out $OUT/study > $OUT/study.md 2> $OUT/study.err
  echo "study rc=$? in $(( $(date +%s) - t0 )) s"; head -40 $OUT/study.md; tail -3 $OUT/study.err
fi
