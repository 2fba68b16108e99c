#!/bin/bash
# Device: the 20B-shaped benchmark (bench/llm.lua) in both precisions.
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader
free -g | head -2
df -h /tmp | tail -1
t0=$(date +%s)
lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer
echo "generated in $(( $(date +%s) - t0 )) s"
BENCH_OUT=$OUT/bench_exact.md timeout 300 lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 exact
BENCH_OUT=$OUT/bench_fast.md timeout 200 lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 fast
