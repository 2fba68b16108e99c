#!/bin/bash
# Device, twenty-second round (issue 22): batched decode on mma.sync tiles,
# the experts (kernels/moe_mma.cu) and the dense products of a few tokens
# (kernels/dense_mma.cu). kernels_test (both against double-precision
# references, beside the other paths); every #gpu spec (the 20B checkpoint
# is made meanwhile); bench/batch.lua on the 20B shape, the new paths
# against the old in the same run (GPTOSS_MOE_MMA_ROWS=0
# GPTOSS_DENSE_MMA_TOKENS=0) and each alone; then compute-sanitizer memcheck
# of tools/gpu_smoke.lua and gpu_spec.lua + lora_gpu_spec.lua with every
# batch pass's experts on moe_mma.cu (GPTOSS_MOE_SMALL_ROWS=0).
# Carry .device-kit, .carry/bundle.tar.xz and .carry/pt80.tar.xz.
set -u
source tools/reference/device_env.sh
# the new paths and the old, named whatever the build's defaults (backend.cuh)
NEW="GPTOSS_MOE_MMA_ROWS=32 GPTOSS_DENSE_MMA_TOKENS=64" OLD="GPTOSS_MOE_MMA_ROWS=0 GPTOSS_DENSE_MMA_TOKENS=0"
round_clock ${ROUND_S:-570}
gpu_line
(need_20b > /tmp/need_20b.log 2>&1 &)
timeout 120 build/cuda/kernels_test > $OUT/kernels_test.log 2>&1
echo "kernels_test rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "moe|dense|FAIL|all ok" $OUT/kernels_test.log | head -40
# SPECS="spec/a_spec.lua ...": those alone (a short round)
gpu_specs=${SPECS:-$(grep -l "#gpu" spec/*_spec.lua | grep -v llama_cpp)}
t=$(( $(left) - 200 )); [ $t -gt 200 ] && t=200
env $NEW timeout $t $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|24 sessions|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -20
while { [ ! -f /tmp/gptoss-20b/config.json ] || pgrep -f "preset 20b" >/dev/null; } && [ $(left) -gt 60 ]; do sleep 2; done
echo "20B checkpoint at $(( $(date +%s) - T0 )) s"
bb() { timeout 90 env "$@" 2>&1 | grep -aE "^batch|^\| [0-9]|not run"; }
for p in exact fast; do
  bb $NEW lua5.4 bench/batch.lua /tmp/gptoss-20b cuda:0 $p 8,32,64,256
  bb $OLD lua5.4 bench/batch.lua /tmp/gptoss-20b cuda:0 $p 8,32,64,256
done
[ $(left) -gt 150 ] && bb GPTOSS_MOE_MMA_ROWS=32 GPTOSS_DENSE_MMA_TOKENS=0 lua5.4 bench/batch.lua /tmp/gptoss-20b cuda:0 exact 8,64,256
[ $(left) -gt 140 ] && bb GPTOSS_MOE_MMA_ROWS=32 GPTOSS_DENSE_MMA_TOKENS=32 lua5.4 bench/batch.lua /tmp/gptoss-20b cuda:0 exact 64
[ $(left) -gt 120 ] && bb $NEW GPTOSS_MOE_SMALL_ROWS=0 lua5.4 bench/batch.lua /tmp/gptoss-20b cuda:0 exact 1,4,8
[ $(left) -lt 60 ] && exit 0
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
env $NEW GPTOSS_MOE_SMALL_ROWS=0 timeout 50 compute-sanitizer --tool memcheck --error-exitcode 9 lua5.4 tools/gpu_smoke.lua /tmp/tiny > /tmp/memcheck_fwd.log 2>&1
echo "memcheck forward/decode/batch, experts on moe_mma.cu: rc=$? $(grep -a 'ERROR SUMMARY' /tmp/memcheck_fwd.log)"
grep -a "=========" /tmp/memcheck_fwd.log | grep -v "ERROR SUMMARY" | head -8
t=$(( $(left) - 5 )); [ $t -lt 30 ] && exit 0
env $NEW GPTOSS_MOE_SMALL_ROWS=0 timeout $t $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/gpu_spec.lua spec/lora_gpu_spec.lua > $OUT/mma_specs.log 2>&1
echo "specs with every batch pass's experts on moe_mma.cu: rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|24 sessions|^Failure|^Error|spec.lua:[0-9]+:" $OUT/mma_specs.log | head -12
# while time is left: the portable build's round (device_round21.sh: its
# kernels_test, gpu_spec.lua and lora_gpu_spec.lua), the new paths on
t=$(( $(left) - 5 )); { [ $t -lt 60 ] || [ ! -f .carry/pt80.tar.xz ]; } && exit 0
env $NEW ROUND_S=$t bash tools/reference/device_round21.sh
