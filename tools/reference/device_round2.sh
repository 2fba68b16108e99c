#!/bin/bash
# Device, second round of 2026-12-06: the #gpu specs of every file; issue
# 18's determinism diagnosed (engine_diag on a batch-invariant model); the
# HTTP benchmark at 8 streams with its failures' reasons beside the engine
# in process; then issue 21's 20B sweep with what time is left.
set -u
source tools/reference/device_env.sh
T0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/device.txt
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
timeout 120 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -30
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
INVARIANT=1 timeout 60 lua5.4 tools/reference/engine_diag.lua /tmp/tiny cuda:0 2>&1 | tail -4
INVARIANT=0 timeout 60 lua5.4 tools/reference/engine_diag.lua /tmp/tiny cuda:0 2>&1 | tail -4
SERVE_TIMEOUT=60 SERVE_CONC=8 STAGES=serve bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -12
timeout 60 lua5.4 bench/serving.lua /tmp/gptoss-20b cuda:0 8 512 128 2>&1 | grep -E "^\| 8 |overhead|error" | head -5
left=$(( ${ROUND_S:-560} - ($(date +%s) - T0) ))
echo "sweep gets ${left} s"
if [ $left -gt 120 ]; then
  GPTOSS_PROGRESS=lines timeout $left lua5.4 bin/gptoss sweep bench/sweep/lr_rank_20b.lua --dir /tmp/lr_rank_20b --no-plots \
    > $OUT/sweep_report.md 2> $OUT/sweep_progress.txt
  echo "sweep rc=$?"; tail -4 $OUT/sweep_progress.txt
  (cd /tmp && tar czf $OUT/sweep.tar.gz --exclude=checkpoint --exclude=adapter lr_rank_20b)
fi
