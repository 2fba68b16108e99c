#!/bin/bash
# Device: a change checked and measured against the build before it, in one
# run on one machine. Stages (STAGES, default all):
#   kernels   kernels_test (PTX=1: also through the PTX JIT)
#   specs     the #gpu specs under Lua 5.4 (and LuaJIT when build/luajit is carried)
#   sanitize  compute-sanitizer memcheck over a forward, a decode and a training step
#   llm       bench/llm.lua in exact and fast (BENCH_HF=0), this build then build/ab
#   train     bench/train.lua in exact and mixed, this build then build/ab
# build/ab/gptoss holds the other build's core.so and cuda.so (made on the dev
# machine from the commit before the change); results under $OUT.
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer PYTHONUNBUFFERED=1
here="build/lua5.4/?.so"
export LUA_CPATH="$here;$LUA_CPATH" LUA_CPATH_5_4="$here;$LUA_CPATH_5_4"
STAGES=${STAGES:-kernels specs sanitize llm train}
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader
with_ab() { LUA_CPATH="build/ab/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/ab/?.so;$LUA_CPATH_5_4" "$@"; }

if has kernels; then
  timeout 120 build/cuda/kernels_test > $OUT/kernels_test.log 2>&1; echo "kernels_test rc=$?"
  grep -aE "FAIL|kernels_test" $OUT/kernels_test.log
  if [ "${PTX:-0}" = 1 ]; then
    CUDA_FORCE_PTX_JIT=1 timeout 300 build/cuda/kernels_test > $OUT/kernels_test_ptx.log 2>&1; echo "kernels_test (PTX JIT) rc=$?"
    grep -aE "FAIL|kernels_test" $OUT/kernels_test_ptx.log
  fi
fi
if has specs; then
  gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
  timeout 300 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
  grep -aE "^  [a-z]|successes|Failure|Error|spec.lua:[0-9]" $OUT/gpu_specs.log | head -60
  if [ -d build/luajit ]; then
    timeout 300 bash -c "jit_busted --tags=gpu -o utfTerminal $gpu_specs" > $OUT/gpu_specs_jit.log 2>&1
    echo "LuaJIT: $(grep -aE 'successes' $OUT/gpu_specs_jit.log)"
    grep -aE "Failure|Error|spec.lua:[0-9]" $OUT/gpu_specs_jit.log | head -20
  fi
fi
if has sanitize; then
  lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 lua5.4 bench/train.lua /tmp/tiny cuda:0 exact 40 1 16 > $OUT/memcheck_train.log 2>&1
  echo "memcheck train r16: rc=$? $(grep -a 'ERROR SUMMARY' $OUT/memcheck_train.log)"
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 lua5.4 tools/gpu_smoke.lua /tmp/tiny > $OUT/memcheck_fwd.log 2>&1
  echo "memcheck forward/decode/batch: rc=$? $(grep -a 'ERROR SUMMARY' $OUT/memcheck_fwd.log)"
fi
if has llm || has train; then
  t0=$(date +%s)
  [ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer >/dev/null
  echo "20B checkpoint generated in $(( $(date +%s) - t0 )) s"
fi
if has llm; then
  for p in ${LLM_PRECISIONS:-exact fast}; do
    BENCH_HF=0 BENCH_RESULTS=$OUT/llm_$p.md timeout 200 lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 $p > /dev/null 2>&1
    BENCH_HF=0 BENCH_RESULTS=$OUT/llm_${p}_ab.md BENCH_COMMIT=${AB_COMMIT:-ab} with_ab timeout 200 lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 $p > /dev/null 2>&1
    paste -d'|' <(grep -a '^| [a-z]' $OUT/llm_$p.md | cut -d'|' -f2,3) <(grep -a '^| [a-z]' $OUT/llm_${p}_ab.md | cut -d'|' -f3) | sed "s/^/$p: /"
  done
fi
if has train; then
  for p in ${TRAIN_PRECISIONS:-exact mixed}; do
    BENCH_JSON=$OUT/train_$p.json timeout 200 lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 $p 2048 ${STEPS:-5} 2>&1 | tail -3
    BENCH_JSON=$OUT/train_${p}_ab.json with_ab timeout 200 lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 $p 2048 ${STEPS:-5} 2>&1 | tail -3 | sed 's/^/[ab] /'
  done
fi
