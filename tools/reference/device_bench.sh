#!/bin/bash
# Device: the 20B-shaped benchmark (bench/llm.lua, with transformers and the
# copy bandwidth measured in the same run) in both precisions, and a stage
# profile of decode and prefill. BENCH_COMMIT names the commit benchmarked.
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader
t0=$(date +%s)
[ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer
echo "generated in $(( $(date +%s) - t0 )) s"
BENCH_RESULTS=$OUT/results_exact.md timeout 300 lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 exact
BENCH_HF=0 BENCH_RESULTS=$OUT/results_fast.md timeout 120 lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 fast
for w in ${PROFILE:-decode prefill}; do
  GPTOSS_PROFILE=1 timeout 60 lua5.4 tools/profile.lua /tmp/gptoss-20b $w exact 2>&1 | tee -a $OUT/profile.txt
done
