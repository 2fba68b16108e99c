#!/bin/bash
# Device: LoRA adapters in CUDA sessions. The #gpu specs (PEFT's logits, the
# CPU's greedy tokens, mixed batches, the device copy following writes), a
# compute-sanitizer pass over bench/adapter.lua on the tiny checkpoint (the
# prefill, decode and batched MoE paths with an adapter), then
# bench/adapter.lua on the 20B-shaped checkpoint in both precisions.
#   STAGES="specs sanitize bench" (default all)
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
STAGES=${STAGES:-specs sanitize bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader
if has specs; then
  timeout 300 $BUSTED --cpath='build/lua5.4/?.so' --tags=gpu -o utfTerminal spec/lora_gpu_spec.lua spec/gpu_spec.lua > $OUT/adapter_spec.log 2>&1
  grep -aE "^  [a-z]|successes|Failure|Error|spec.lua:[0-9]|relative" $OUT/adapter_spec.log | head -60
fi
if has sanitize; then
  lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
  timeout 250 compute-sanitizer --tool memcheck --error-exitcode 9 lua5.4 bench/adapter.lua /tmp/tiny cuda:0 exact 4 > $OUT/adapter_memcheck.log 2>&1
  echo "memcheck rc=$? $(grep -a 'ERROR SUMMARY' $OUT/adapter_memcheck.log)"
  grep -a "^|" $OUT/adapter_memcheck.log | head
fi
if has bench; then
  t0=$(date +%s)
  [ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer
  echo "generated in $(( $(date +%s) - t0 )) s"
  for p in exact fast; do
    BENCH_JSON=$OUT/adapter_$p.json timeout 200 lua5.4 bench/adapter.lua /tmp/gptoss-20b cuda:0 $p 16 2>&1 | tee -a $OUT/adapter_bench.txt
  done
fi
