#!/bin/bash
# Device, nineteenth round: issue 22's targets' table from one run at one
# commit, the peers beside it: bench/llm.lua in exact with transformers
# (BENCH_HF=1) and llama.cpp's llama-bench (LLAMA_CPP) on the same
# checkpoint, then in fast, then bench/serving.lua through the engine at 64
# and 256 concurrent requests. Carry .device-kit, .carry/bundle.tar.xz and
# .llama-cpp (bash ../shared/llama.cpp/kit.sh).
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-570}
gpu_line
tar -xJf .llama-cpp/llama.cpp.tar.xz -C /tmp && export LLAMA_CPP=/tmp/llama.cpp
need_20b
BENCH_HF=1 BENCH_RESULTS=$OUT/llm_exact.md timeout 330 lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 exact > $OUT/llm_exact.txt 2>&1
echo "bench/llm.lua exact rc=$? at $(( $(date +%s) - T0 )) s"; grep -a '^| ' $OUT/llm_exact.md
BENCH_HF=0 BENCH_RESULTS=$OUT/llm_fast.md timeout 90 lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 fast > /dev/null 2>&1
echo "bench/llm.lua fast rc=$? at $(( $(date +%s) - T0 )) s"; grep -a '^| ' $OUT/llm_fast.md
t=$(( $(left) - 5 )); [ $t -lt 30 ] && { echo "serving: no time left"; exit 0; }
BENCH_RESULTS=$OUT/serving.md timeout $t lua5.4 bench/serving.lua /tmp/gptoss-20b cuda:0 64,256 > $OUT/serving.txt 2>&1
echo "bench/serving.lua rc=$? at $(( $(date +%s) - T0 )) s"; tail -30 $OUT/serving.txt
