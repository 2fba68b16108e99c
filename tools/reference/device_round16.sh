#!/bin/bash
# Device, sixteenth round (issue 24): the training length ladder through the
# chunked experts (moe_chunk, train.cuh): bench/train.lua on the 20B shape,
# r 16 on attention and experts, "mixed", at 2k, 8k, 32k and 96k tokens
# (98,304), tokens/s and device memory each; first the Unsloth-layout PEFT
# fixture (device_unsloth.sh) and gpu_spec.lua. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-570}
gpu_line
# the 120B checkpoint for round 15, on 6 of the 16 cores in the background
# (setsid: it outlives this call while the machine stays warm); the ladder
# below is GPU-bound at length, but its host-side AdamW shares the CPUs
if place_120b && [ ! -e $dir ]; then
  setsid bash -c "lua5.4 tools/make_checkpoint.lua --preset 120b --seed 0 --out $dir --tokenizer tokenizer --threads 6 > /tmp/ck120.log 2>&1 && touch $dir.complete" < /dev/null > /dev/null 2>&1 &
  echo "120B checkpoint started in the background at $dir"
fi
timeout 60 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/gpu_spec.lua 2>&1 | grep -aE "successes|Failure|spec.lua:[0-9]+:" | head -8
bash tools/reference/device_unsloth.sh
need_20b
for seq in ${SEQS:-2048 8192 32768 98304}; do
  steps=2; [ $seq -ge 32768 ] && steps=1
  t=$(( $(left) - 100 )); [ $t -lt 30 ] && { echo "seq $seq: no time left"; break; }
  timeout $t lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 mixed $seq $steps 16 > /tmp/train_$seq.txt 2>&1
  echo "== seq $seq rc=$? at $(( $(date +%s) - T0 )) s"; tail -3 /tmp/train_$seq.txt
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
done
