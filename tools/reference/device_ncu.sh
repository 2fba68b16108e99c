#!/bin/bash
# Device: Nsight Compute per-kernel durations and DRAM bytes of one decode
# step and the stage profile of 8- and 64-session batched steps on the 20B-shaped checkpoint (the
# numbers behind bench/NOTES.md). Clocks are left alone (METHOD.md).
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
[ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
timeout 250 ncu --clock-control none --csv --page raw --metrics $M \
  lua5.4 tools/profile.lua /tmp/gptoss-20b decode exact 3 > $OUT/ncu_decode.csv 2> $OUT/ncu_decode.err
echo "decode rc=$? $(wc -l < $OUT/ncu_decode.csv) rows"
# the sessions' prompts are profiled too: the difference of 8 steps and 0
# steps is the batched steps alone
for n in 64 8; do for k in 0 8; do
  echo "== batch $n sessions, $k steps" >> $OUT/profile_batch.txt
  GPTOSS_PROFILE=1 timeout 120 lua5.4 tools/profile.lua /tmp/gptoss-20b batch exact $n $k >> $OUT/profile_batch.txt 2>&1
done; done
tail -3 $OUT/ncu_decode.err
