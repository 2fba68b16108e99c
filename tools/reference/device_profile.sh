#!/bin/bash
# Device: stage profile of prefill, decode and batched decode on the
# 20B-shaped checkpoint; transformers and copy bandwidth (hf_bench.py); the
# tokenizer side by side with tiktoken.
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
[ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer
for w in prefill decode batch; do
  GPTOSS_PROFILE=1 timeout 120 lua5.4 tools/profile.lua /tmp/gptoss-20b $w exact 2>&1 | tee -a $OUT/profile.txt
done
GPTOSS_PROFILE=1 timeout 60 lua5.4 tools/profile.lua /tmp/gptoss-20b prefill exact 512 2>&1 | tee -a $OUT/profile.txt
${HF_BENCH:-true} && timeout 400 python3 tools/reference/hf_bench.py /tmp/gptoss-20b $OUT/hf_bench.json 2>&1 | tail -5
${TOK_BENCH:-true} && lua5.4 bench/tokenizer.lua tokenizer 5 2>&1 | tail -20 | tee $OUT/tokenizer_bench.txt
