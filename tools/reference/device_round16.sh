#!/bin/bash
# Device, sixteenth round (issue 24): the training length ladder through the
# chunked experts (moe_chunk, train.cuh): bench/train.lua on the 20B shape,
# r 16 on attention and experts, "mixed", at 2k, 8k, 32k and 96k tokens
# (98,304), tokens/s and device memory each; then the Unsloth-layout PEFT
# fixture (device_unsloth.sh) if time is left. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-570}
gpu_line
need_20b
for seq in ${SEQS:-2048 8192 32768 98304}; do
  steps=2; [ $seq -ge 32768 ] && steps=1
  t=$(( $(left) - 100 )); [ $t -lt 30 ] && { echo "seq $seq: no time left"; break; }
  timeout $t lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 mixed $seq $steps 16 > /tmp/train_$seq.txt 2>&1
  echo "== seq $seq rc=$? at $(( $(date +%s) - T0 )) s"; tail -3 /tmp/train_$seq.txt
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
done
[ $(left) -gt 90 ] && bash tools/reference/device_unsloth.sh
