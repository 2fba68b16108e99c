#!/bin/bash
# Device, eighteenth round, for a session with little device time left
# (issue 24): the Unsloth-layout PEFT fixture, gpu_spec.lua, bench/train.lua
# at 2,048 tokens, then ONE backward pass at 98,304 tokens (tools/train_once.lua:
# its seconds, tokens/s and the GPU memory in use, sampled every 0.5 s).
# Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-400}
gpu_line
timeout 60 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/gpu_spec.lua 2>&1 | grep -aE "successes|Failure|spec.lua:[0-9]+:" | head -8
bash tools/reference/device_unsloth.sh
need_20b
[ "${BENCH2K:-1}" = 1 ] && timeout 90 lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 mixed 2048 2 16 2>&1 | tail -3
for seq in ${SEQS:-98304}; do
  t=$(( $(left) - 5 )); [ $t -lt 30 ] && { echo "seq $seq: no time left"; break; }
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > /tmp/mem_$seq.txt 2>/dev/null &
  smi=$!
  timeout $t lua5.4 tools/train_once.lua /tmp/gptoss-20b cuda:0 mixed $seq 16 2>&1 | tail -4
  rc=${PIPESTATUS[0]}; kill $smi 2>/dev/null
  echo "== seq $seq rc=$rc at $(( $(date +%s) - T0 )) s; GPU memory in use at most $(sort -n /tmp/mem_$seq.txt | tail -1) MiB"
done
