#!/bin/bash
# Device, the shortest round for issues 25 and 23 (2026-12-07, for a
# session's last few minutes of device time): the 20B shape, bench/learn.lua
# at 8 and 32 streams with short phases, bench/constrained.lua at 1 and 8
# streams, and bench/grammar.lua on the device's CPU. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
T0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/device.txt
need_20b
BENCH_JSON=$OUT/learn.json timeout 100 lua5.4 bench/learn.lua /tmp/gptoss-20b cuda:0 8,32 0.3 ${LEARN_S:-5} > $OUT/learn.md 2> $OUT/learn.err
echo "learn rc=$? at $(( $(date +%s) - T0 )) s"; cat $OUT/learn.md; tail -3 $OUT/learn.err
BENCH_JSON=$OUT/constrained.json timeout 40 lua5.4 bench/constrained.lua /tmp/gptoss-20b cuda:0 1,8 1 > $OUT/constrained.md 2> $OUT/constrained.err
echo "constrained rc=$? at $(( $(date +%s) - T0 )) s"; cat $OUT/constrained.md; tail -3 $OUT/constrained.err
timeout 40 lua5.4 bench/grammar.lua tokenizer 40 > $OUT/grammar_cpu.txt 2>&1
echo "grammar rc=$?"; cat $OUT/grammar_cpu.txt; lscpu | grep "Model name"
