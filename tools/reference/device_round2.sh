#!/bin/bash
# Device: CUDA correctness (GPU specs against the CPU backend and the
# transformers fixture), compute-sanitizer, hf-template fixtures with jinja2.
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer PYTHONUNBUFFERED=1
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
echo "== hf template fixtures (jinja2)"
# (done: spec/fixtures/harmony/hf/expected.json) python3 tools/reference/hf_template.py tools/reference/chat_template.jinja spec/fixtures/harmony/hf/inputs.json $OUT/hf_expected.json
echo "== GPU specs"
timeout 400 $BUSTED --cpath='build/lua5.4/?.so' --tags=gpu -o utfTerminal spec/gpu_spec.lua > $OUT/gpu_spec.log 2>&1
grep -aE "^  [a-z]|successes|Failure|Error ->|spec.lua:[0-9]" $OUT/gpu_spec.log | head -40
echo "== compute-sanitizer"
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
for tool in memcheck racecheck; do
  timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 lua5.4 tools/gpu_smoke.lua /tmp/tiny 2>&1 | tail -4
  echo "$tool rc=${PIPESTATUS[0]}"
done
