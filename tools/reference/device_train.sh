#!/bin/bash
# Device: LoRA training on CUDA. The #gpu training specs (PEFT fixtures, the
# CPU backend), a compute-sanitizer pass over one training step, then the
# 20B-shaped benchmark: bench/train.lua in each precision (PRECISIONS) and
# transformers + peft (tools/reference/hf_train_bench.py) in the same run.
#   STAGES="kernels specs jit sanitize bench hf" (default all but jit; jit runs the
#   specs under LuaJIT and needs build/luajit carried); SEQ (2048), STEPS (3);
#   PRECISIONS (default "exact mixed fast");
#   KBIN: where kernels_test and mxfp4_bench are (build/cuda);
#   AB=1: bench/train.lua also with the build in build/ab (the build before a change)
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer PYTHONUNBUFFERED=1
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
STAGES=${STAGES:-kernels specs sanitize bench hf}
SEQ=${SEQ:-2048} STEPS=${STEPS:-3}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has kernels; then
  timeout 120 ${KBIN:-build/cuda}/kernels_test > $OUT/kernels_test.log 2>&1; echo "kernels_test rc=$?"
  grep -aE "mxfp4|FAIL|kernels_test" $OUT/kernels_test.log
  # the compute_90 PTX the driver compiles for GPUs after Hopper: mxfp4_gemm's portable loop
  CUDA_FORCE_PTX_JIT=1 timeout 300 ${KBIN:-build/cuda}/kernels_test > $OUT/kernels_test_ptx.log 2>&1; echo "kernels_test (PTX JIT) rc=$?"
  grep -aE "FAIL|kernels_test" $OUT/kernels_test_ptx.log
  timeout 60 ${KBIN:-build/cuda}/mxfp4_bench 2>&1 | tee $OUT/mxfp4_bench.txt
fi
if has specs; then
  timeout 300 $BUSTED --cpath='build/lua5.4/?.so' --tags=gpu -o utfTerminal spec/lora_gpu_spec.lua spec/gpu_spec.lua > $OUT/train_spec.log 2>&1
  grep -aE "^  [a-z]|successes|Failure|Error|spec.lua:[0-9]" $OUT/train_spec.log | head -40
fi
if has jit; then   # the same specs under LuaJIT (carry build/luajit): the kit's 5.1 modules
  kit=/opt/kit
  LUA_PATH="./lua/?.lua;./lua/?/init.lua;$kit/usr/share/lua/5.1/?.lua;$kit/usr/share/lua/5.1/?/init.lua;;" \
  LUA_CPATH="build/luajit/?.so;$kit/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;;" \
    timeout 300 luajit $kit/usr/bin/busted --cpath='build/luajit/?.so' --tags=gpu -o utfTerminal spec/lora_gpu_spec.lua \
    spec/gpu_spec.lua > $OUT/train_spec_jit.log 2>&1
  echo "LuaJIT: $(grep -aE 'successes' $OUT/train_spec_jit.log)"
  grep -aE "Failure|Error|spec.lua:[0-9]" $OUT/train_spec_jit.log | head -20
fi
if has sanitize; then
  lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
  # rank 16, and 6: the expert LoRA kernels round the rank up to a power of two
  for r in 16 6; do
    timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 lua5.4 bench/train.lua /tmp/tiny cuda:0 exact 40 1 $r > $OUT/train_memcheck_r$r.log 2>&1
    echo "memcheck r $r: rc=$? $(grep -a 'ERROR SUMMARY' $OUT/train_memcheck_r$r.log)"
  done
fi
if has bench || has hf; then
  t0=$(date +%s)
  [ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer
  echo "generated in $(( $(date +%s) - t0 )) s"
fi
if has bench; then
  for p in ${PRECISIONS:-exact mixed fast}; do
    BENCH_JSON=$OUT/train_$p.json timeout 200 lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 $p $SEQ $STEPS 2>&1 | tee -a $OUT/train_bench.txt
    [ "${AB:-0}" = 1 ] && LUA_CPATH="build/ab/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/ab/?.so;$LUA_CPATH_5_4" BENCH_JSON=$OUT/train_${p}_ab.json \
      timeout 200 lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 $p $SEQ $STEPS 2>&1 | sed 's/^/[ab] /' | tee -a $OUT/train_bench.txt
  done
fi
if has hf; then
  timeout 400 python3 tools/reference/hf_train_bench.py /tmp/gptoss-20b $OUT/hf_train.json $SEQ $STEPS 2>&1 | grep -v Warning | tail -25
fi
