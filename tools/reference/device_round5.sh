#!/bin/bash
# Device, one round for the numbers issues 25 and 21 still lack (2026-12-07):
# serving with training on the 20B shape (bench/learn.lua at 8 and 32
# streams), issue 23's constrained decoding (bench/constrained.lua) and
# masks on the device's CPU (bench/grammar.lua), then the LoRA sweep (bench/sweep/lr_rank_20b.lua) and the
# benchmark suite (gptoss bench, llama-bench's tests; then the in-process
# study while time is left). Each stage gets what is left of ROUND_S.
# Carry .device-kit and .carry (bundle.tar.xz).
set -u
source tools/reference/device_env.sh
round_clock 570
gpu_line
need_20b
BENCH_JSON=$OUT/learn.json timeout ${LEARN_T:-150} lua5.4 bench/learn.lua /tmp/gptoss-20b cuda:0 8,32 0.3 ${LEARN_S:-10} > $OUT/learn.md 2> $OUT/learn.err
echo "learn rc=$? at $(( $(date +%s) - T0 )) s"; cat $OUT/learn.md; tail -5 $OUT/learn.err
# issue 23: a constraint's cost to decoding on the GPU, and the masks on this CPU
BENCH_JSON=$OUT/constrained.json timeout 60 lua5.4 bench/constrained.lua /tmp/gptoss-20b cuda:0 1,8 3 > $OUT/constrained.md 2> $OUT/constrained.err
echo "constrained rc=$? at $(( $(date +%s) - T0 )) s"; cat $OUT/constrained.md; tail -3 $OUT/constrained.err
timeout 60 lua5.4 bench/grammar.lua tokenizer 40 > $OUT/grammar_cpu.txt 2>&1
echo "grammar rc=$?"; cat $OUT/grammar_cpu.txt; lscpu | grep "Model name" >> $OUT/grammar_cpu.txt
# the LoRA training specs on CUDA (to run packing_spec's #gpu case too: re-apply 2d0e934 first)
timeout 120 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/packing_spec.lua spec/lora_gpu_spec.lua > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"; grep -aE "successes|packed on CUDA|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -12
t=$(( $(left) - 150 )); [ $t -gt 240 ] && t=240
if [ $t -gt 60 ]; then
  GPTOSS_PROGRESS=lines timeout $t lua5.4 bin/gptoss sweep bench/sweep/lr_rank_20b.lua --dir /tmp/lr_rank_20b --no-plots \
    > $OUT/sweep_report.md 2> $OUT/sweep_progress.txt
  echo "sweep rc=$? at $(( $(date +%s) - T0 )) s"; tail -4 $OUT/sweep_progress.txt
  (cd /tmp && tar czf $OUT/sweep.tar.gz --exclude=checkpoint --exclude=adapter lr_rank_20b)
fi
t=$(( $(left) - 10 )); [ $t -gt 150 ] && t=150
if [ $t -gt 40 ]; then
  GPTOSS_PROGRESS=lines timeout $t lua5.4 bin/gptoss bench /tmp/gptoss-20b --device cuda:0 -p 512 -n 128 -pg 512,128 \
    -d 0,4096 -r 3 -o json > $OUT/bench.json 2> $OUT/bench_progress.txt
  echo "bench rc=$? at $(( $(date +%s) - T0 )) s"; tail -2 $OUT/bench_progress.txt
fi
t=$(( $(left) - 5 ))
if [ $t -gt 60 ]; then
  GPTOSS_PROGRESS=lines timeout $t lua5.4 bin/gptoss bench study /tmp/gptoss-20b --device cuda:0 --requests 3 \
    --max-tokens 64 --out $OUT/study > $OUT/study.md 2> $OUT/study.err
  echo "study rc=$? at $(( $(date +%s) - T0 )) s"; tail -2 $OUT/study.err
fi
