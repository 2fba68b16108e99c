#!/bin/bash
# Device: per-kernel tests, GPU specs and sanitizers after the MoE/router/
# attention decode rewrite.
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
timeout 120 build/cuda/kernels_test 2>&1 | tee $OUT/kernels_test.log | tail -25
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
lua5.4 tools/make_checkpoint.lua --preset small --seed 2 --out /tmp/small --tokenizer tokenizer >/dev/null
timeout 60 lua5.4 tools/gpu_diag.lua /tmp/tiny 2>&1 | tail -8
timeout 60 lua5.4 tools/gpu_diag.lua /tmp/small 2>&1 | tail -8
timeout 300 $BUSTED --cpath='build/lua5.4/?.so' --tags=gpu -o utfTerminal spec/gpu_spec.lua > $OUT/gpu_spec.log 2>&1
grep -aE "^  [a-z]|successes|Failure|Error ->|spec.lua:[0-9]" $OUT/gpu_spec.log | head -30
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 lua5.4 tools/gpu_smoke.lua /tmp/tiny > $OUT/$tool.log 2>&1
  echo "$tool rc=$? $(tail -1 $OUT/$tool.log)"
done
