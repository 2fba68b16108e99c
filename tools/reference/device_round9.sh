#!/bin/bash
# Device, ninth round (2026-12-07): issue 21's benchmark suite on the 20B
# shape with issue 22's llama.cpp side by side in the same run (gptoss bench
# --llama-cpp: llama-bench's tests through both), llama_cpp_spec's #gpu case,
# then the seeds' latency study in-process (gptoss bench study) while time
# is left. Carry .device-kit, .carry (bundle.tar.xz) and .llama-cpp
# (bash ../shared/llama.cpp/kit.sh).
set -u
source tools/reference/device_env.sh
round_clock 570
gpu_line
tar -xJf .llama-cpp/llama.cpp.tar.xz -C /tmp && export LLAMA_CPP=/tmp/llama.cpp
need_20b
timeout 120 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/llama_cpp_spec.lua > $OUT/llama_spec.log 2>&1
echo "llama_cpp_spec rc=$? at $(( $(date +%s) - T0 )) s"; grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/llama_spec.log | head
t=$(( $(left) - 120 )); [ $t -gt 330 ] && t=330
GPTOSS_GGUF_DIR=/tmp GPTOSS_PROGRESS=lines timeout $t lua5.4 bin/gptoss bench /tmp/gptoss-20b --device cuda:0 -p 512,2048 -n 128 \
  -pg 512,128 -d 0,4096 -r 3 --llama-cpp $LLAMA_CPP > $OUT/bench.md 2> $OUT/bench_progress.txt
echo "bench rc=$? at $(( $(date +%s) - T0 )) s"; cat $OUT/bench.md; grep -v "^\[" $OUT/bench_progress.txt | tail -4
t=$(( $(left) - 5 ))
if [ $t -gt 60 ]; then
  GPTOSS_PROGRESS=lines timeout $t lua5.4 bin/gptoss bench study /tmp/gptoss-20b --device cuda:0 --requests 3 \
    --max-tokens 64 --out $OUT/study > $OUT/study.md 2> $OUT/study.err
  echo "study rc=$? at $(( $(date +%s) - T0 )) s"; head -40 $OUT/study.md; tail -2 $OUT/study.err
fi
