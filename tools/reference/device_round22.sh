#!/bin/bash
# Device, twenty-second round (issue 22): batched decode's experts on
# mma.sync tiles (kernels/moe_mma.cu). kernels_test (the new kernel against
# the double-precision MoE, beside the other paths), gpu_spec.lua and
# lora_gpu_spec.lua with every batch pass on the new kernel
# (GPTOSS_MOE_SMALL_ROWS=0), compute-sanitizer memcheck of tools/gpu_smoke.lua
# so, then bench/batch.lua on the 20B shape in exact and fast, new paths
# against the old (GPTOSS_MOE_MMA_ROWS=0) in the same run, then every #gpu
# spec with the defaults while time is left.
# Carry .device-kit and .carry/bundle.tar.xz.
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-570}
gpu_line
timeout 120 build/cuda/kernels_test > $OUT/kernels_test.log 2>&1
echo "kernels_test rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "moe|FAIL|all ok" $OUT/kernels_test.log | head -40
GPTOSS_MOE_SMALL_ROWS=0 timeout 100 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/gpu_spec.lua spec/lora_gpu_spec.lua > $OUT/mma_specs.log 2>&1
echo "specs with every batch pass on mma.sync: rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|24 sessions|^Failure|^Error|spec.lua:[0-9]+:" $OUT/mma_specs.log | head -12
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
GPTOSS_MOE_SMALL_ROWS=0 timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 lua5.4 tools/gpu_smoke.lua /tmp/tiny > /tmp/memcheck_fwd.log 2>&1
echo "memcheck forward/decode/batch on mma.sync: rc=$? $(grep -a 'ERROR SUMMARY' /tmp/memcheck_fwd.log)"
grep -a "=========" /tmp/memcheck_fwd.log | grep -v "ERROR SUMMARY" | head -8
need_20b
for p in exact fast; do
  for rows in default 0; do
    [ $(left) -lt 150 ] && break
    if [ $rows = default ]; then env=""; else env="GPTOSS_MOE_MMA_ROWS=$rows"; fi
    env $env timeout 100 lua5.4 bench/batch.lua /tmp/gptoss-20b cuda:0 $p 8,32,64,256 2>&1 | grep -aE "^batch|^\| [0-9]|not run"
  done
done
[ $(left) -gt 120 ] && GPTOSS_MOE_SMALL_ROWS=0 timeout 60 lua5.4 bench/batch.lua /tmp/gptoss-20b cuda:0 exact 1,4,8,16 2>&1 | grep -aE "^batch|^\| [0-9]|not run"
t=$(( $(left) - 5 )); [ $t -lt 60 ] && { echo "gpu specs: no time left"; exit 0; }
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua | grep -v llama_cpp)
timeout $t $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -20
