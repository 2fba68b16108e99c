#!/bin/bash
# Device: issue 21's sweep on the 20B shape (bench/sweep/lr_rank_20b.lua) and
# the benchmark suite (gptoss bench, llama-bench's tests) beside it. Carry
# build/lua5.4 (made with CUDA) and tokenizer. The sweep's files come back
# as sweep.tar.gz (no adapters or checkpoints); run
#   bin/gptoss sweep bench/sweep/lr_rank_20b.lua --dir bench/sweep/lr_rank_20b --report
# on the dev machine for the plots (the device has no gnuplot).
#   STAGES="sweep bench" (default both)
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
STAGES=${STAGES:-sweep bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader | tee $OUT/device.txt
t0=$(date +%s)
[ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer >/dev/null
echo "checkpoint ready in $(( $(date +%s) - t0 )) s"
if has sweep; then
  t0=$(date +%s)
  GPTOSS_PROGRESS=lines timeout 420 lua5.4 bin/gptoss sweep bench/sweep/lr_rank_20b.lua --dir /tmp/lr_rank_20b --no-plots \
    > $OUT/sweep_report.md 2> $OUT/sweep_progress.txt
  echo "sweep rc=$? in $(( $(date +%s) - t0 )) s"
  tail -5 $OUT/sweep_progress.txt
  (cd /tmp && tar czf $OUT/sweep.tar.gz --exclude=checkpoint --exclude=adapter lr_rank_20b)
  du -sh /tmp/lr_rank_20b/trials/0001/adapter 2>/dev/null
fi
if has bench; then
  # JSON only: gptoss.bench.format turns it into the table on the dev machine
  GPTOSS_PROGRESS=lines timeout 240 lua5.4 bin/gptoss bench /tmp/gptoss-20b --device cuda:0 -p 512 -n 128 -pg 512,128 \
    -d 0,4096 -r 5 -o json > $OUT/bench.json 2> $OUT/bench_progress.txt
  echo "bench rc=$?"
  tail -3 $OUT/bench_progress.txt
fi
