#!/bin/bash
# Device, twenty-third round (issue 22), at the submitted commit: every
# #gpu spec under LuaJIT, the engine's serving benchmark at 64 and 256
# concurrent requests on the 20B shape, then the portable build's round
# (device_round21.sh: compute_80 PTX only, JIT-compiled for the H100, no
# wgmma or TMA: the path sm_80/86/89 take) while time is left.
# Carry .device-kit, .carry/bundle.tar.xz and .carry/pt80.tar.xz
# (make BUILD=build/pt80 CUDA_ARCH="-gencode arch=compute_80,code=compute_80" all kernels-test).
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-570}
gpu_line
(need_20b > /tmp/need_20b.log 2>&1 &)
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua | grep -v llama_cpp)
timeout 220 bash -c "jit_busted --tags=gpu -o utfTerminal $gpu_specs" > $OUT/gpu_specs_luajit.log 2>&1
echo "gpu specs (LuaJIT) rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs_luajit.log | head -20
while { [ ! -f /tmp/gptoss-20b/config.json ] || pgrep -f "preset 20b" >/dev/null; } && [ $(left) -gt 60 ]; do sleep 2; done
t=$(( $(left) - 160 )); [ $t -gt 200 ] && t=200
[ $t -ge 60 ] && BENCH_RESULTS=$OUT/serving.md timeout $t lua5.4 bench/serving.lua /tmp/gptoss-20b cuda:0 64,256 > $OUT/serving.txt 2>&1
echo "bench/serving.lua rc=$? at $(( $(date +%s) - T0 )) s"; tail -12 $OUT/serving.txt 2>/dev/null
t=$(( $(left) - 5 )); [ $t -lt 60 ] && exit 0
ROUND_S=$t bash tools/reference/device_round21.sh
