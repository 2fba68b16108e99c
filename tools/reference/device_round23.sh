#!/bin/bash
# Device, twenty-third round (issue 22), at the submitted commit: the
# portable build (compute_80 PTX only, JIT-compiled for the H100: no wgmma,
# no TMA; the path sm_80/86/89 take) through its kernels_test, gpu_spec.lua
# and lora_gpu_spec.lua; every #gpu spec under LuaJIT; then the engine's
# serving benchmark at 64 and 256 concurrent requests on the 20B shape.
# Carry .device-kit, .carry/bundle.tar.xz and .carry/pt80.tar.xz
# (make BUILD=build/pt80 CUDA_ARCH="-gencode arch=compute_80,code=compute_80" all kernels-test).
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-570}
gpu_line
export CUDA_CACHE_MAXSIZE=4294967296
tar -xJf .carry/pt80.tar.xz
timeout 150 build/pt80/cuda/kernels_test > $OUT/pt80_kernels_test.log 2>&1
echo "portable kernels_test rc=$? at $(( $(date +%s) - T0 )) s"; grep -aE "FAIL|all ok" $OUT/pt80_kernels_test.log | head -10
rm -rf /tmp/pt80cpath && mkdir -p /tmp/pt80cpath && cp -r build/pt80/lua5.4/gptoss /tmp/pt80cpath/
timeout 150 $BUSTED --cpath="/tmp/pt80cpath/?.so" --tags=gpu -o utfTerminal spec/gpu_spec.lua spec/lora_gpu_spec.lua > $OUT/portable_specs.log 2>&1
echo "portable specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|24 sessions|one pass|^Failure|^Error|spec.lua:[0-9]+:" $OUT/portable_specs.log | head -12
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua | grep -v llama_cpp)
kit=/opt/kit
LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;$kit/usr/share/lua/5.1/?.lua;$kit/usr/share/lua/5.1/?/init.lua;;" \
LUA_CPATH="build/luajit/?.so;$kit/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;;" \
  timeout 220 luajit $kit/usr/bin/busted --cpath='build/luajit/?.so' --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs_luajit.log 2>&1
echo "gpu specs (LuaJIT) rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs_luajit.log | head -20
need_20b
t=$(( $(left) - 5 )); [ $t -lt 60 ] && { echo "serving: no time left"; exit 0; }
BENCH_RESULTS=$OUT/serving.md timeout $t lua5.4 bench/serving.lua /tmp/gptoss-20b cuda:0 64,256 > $OUT/serving.txt 2>&1
echo "bench/serving.lua rc=$? at $(( $(date +%s) - T0 )) s"; tail -12 $OUT/serving.txt
