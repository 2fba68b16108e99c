#!/bin/bash
# Device, seventeenth round: the training ladder and round 15 in one call, for a session
# with one call's device time left. Issue 24: the Unsloth-layout PEFT
# fixture, gpu_spec.lua, the training length ladder (2k, 32k, 96k) through
# the chunked experts; issues 22/24: gpt-oss-120b's shape on this one GPU
# with what time is left, its checkpoint made in the background meanwhile.
# The GPU's memory in use is sampled every 0.5 s during each ladder step,
# so a step cut short still tells its peak. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-575}
gpu_line
df -h /dev/shm /tmp | tail -2; free -g | head -2
if place_120b && [ ! -e $dir ]; then
  setsid bash -c "lua5.4 tools/make_checkpoint.lua --preset 120b --seed 0 --out $dir --tokenizer tokenizer --threads 6 > /tmp/ck120.log 2>&1 && touch $dir.complete" < /dev/null > /dev/null 2>&1 &
  echo "120B checkpoint started in the background at $dir"
fi
timeout 60 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/gpu_spec.lua 2>&1 | grep -aE "successes|Failure|spec.lua:[0-9]+:" | head -8
bash tools/reference/device_unsloth.sh
need_20b
for seq in ${SEQS:-2048 32768 98304}; do
  steps=2; [ $seq -ge 32768 ] && steps=1
  t=$(( $(left) - 170 )); [ $t -lt 30 ] && { echo "seq $seq: no time left"; break; }
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > /tmp/mem_$seq.txt 2>/dev/null &
  smi=$!
  timeout $t lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 mixed $seq $steps 16 > /tmp/train_$seq.txt 2>&1
  rc=$?; kill $smi 2>/dev/null
  echo "== seq $seq rc=$rc at $(( $(date +%s) - T0 )) s; GPU memory in use at most $(sort -n /tmp/mem_$seq.txt | tail -1) MiB"
  tail -3 /tmp/train_$seq.txt
done
echo "120B: $(ls $dir.complete 2>&1), $(tail -c 200 /tmp/ck120.log 2>/dev/null) at $(( $(date +%s) - T0 )) s"
if [ -f $dir.complete ] && [ $(left) -gt 40 ]; then
  BENCH_HF=0 BENCH_RESULTS=$OUT/results_120b.md timeout $(( $(left) - 5 )) lua5.4 bench/llm.lua $dir cuda:0 exact > $OUT/llm_120b.txt 2>&1
  echo "bench/llm.lua (120b) rc=$? at $(( $(date +%s) - T0 )) s"; tail -22 $OUT/llm_120b.txt
fi
