#!/bin/bash
# Device, nineteenth round: gpu_spec.lua first (the CUDA backend against
# the CPU, with the new case of a 2,000-token prompt in one pass), then
# issue 22's targets' table from one run at one
# commit, the peers beside it: bench/llm.lua in exact with transformers
# (BENCH_HF=1) and llama.cpp's llama-bench (LLAMA_CPP) on the same
# checkpoint, then in fast, then bench/serving.lua through the engine at 64
# and 256 concurrent requests, each while time is left. Carry .device-kit, .carry/bundle.tar.xz and
# .llama-cpp (bash ../shared/llama.cpp/kit.sh).
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-570}
gpu_line
tar -xJf .llama-cpp/llama.cpp.tar.xz -C /tmp && export LLAMA_CPP=/tmp/llama.cpp
timeout 90 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/gpu_spec.lua > $OUT/gpu_spec.log 2>&1
echo "gpu_spec rc=$? at $(( $(date +%s) - T0 )) s"; grep -aE "successes|one pass|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_spec.log | head -12
need_20b
t=$(( $(left) - 60 )); [ $t -gt 360 ] && t=360
BENCH_HF=1 BENCH_RESULTS=$OUT/llm_exact.md timeout $t lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 exact > $OUT/llm_exact.txt 2>&1
echo "bench/llm.lua exact rc=$? at $(( $(date +%s) - T0 )) s"; grep -a '^| ' $OUT/llm_exact.md || tail -40 $OUT/llm_exact.txt
# issue 24: the load-time quantizer against triton_kernels' downcast_to_mxfp
# (carry .triton-kernels too), its reports kept out of $OUT
if [ -d .triton-kernels ] && [ $(left) -gt 150 ]; then
  mkdir -p /tmp/tri; OUT=/tmp/tri timeout $(( $(left) - 60 )) bash tools/reference/device_triton_mxfp4.sh 2>&1 | tail -40
  echo "triton check at $(( $(date +%s) - T0 )) s"
fi
t=$(( $(left) - 5 )); [ $t -lt 60 ] && { echo "fast: no time left"; exit 0; }
BENCH_HF=0 BENCH_RESULTS=$OUT/llm_fast.md timeout $t lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 fast > /dev/null 2>&1
echo "bench/llm.lua fast rc=$? at $(( $(date +%s) - T0 )) s"; grep -a '^| ' $OUT/llm_fast.md
t=$(( $(left) - 5 )); [ $t -lt 30 ] && { echo "serving: no time left"; exit 0; }
BENCH_RESULTS=$OUT/serving.md timeout $t lua5.4 bench/serving.lua /tmp/gptoss-20b cuda:0 64,256 > $OUT/serving.txt 2>&1
echo "bench/serving.lua rc=$? at $(( $(date +%s) - T0 )) s"; tail -30 $OUT/serving.txt
