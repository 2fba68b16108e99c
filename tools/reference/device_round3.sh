#!/bin/bash
# Device, third round (2026-12-06, late): the #gpu specs of every file;
# issue 18's determinism diagnosed (engine_diag, batch-invariant and not);
# issue 25's serving-with-training benchmark on the 20B shape (bench/learn.lua);
# the HTTP benchmark at 8 streams with its failures' reasons.
set -u
source tools/reference/device_env.sh
T0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/device.txt
git log -1 --format=%h 2>/dev/null | tee $OUT/commit.txt
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
timeout ${SPECS_S:-150} $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -30
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
INVARIANT=1 timeout 60 lua5.4 tools/reference/engine_diag.lua /tmp/tiny cuda:0 > $OUT/diag_inv.txt 2>&1; tail -4 $OUT/diag_inv.txt
t0=$(date +%s)
[ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer >/dev/null
echo "20B checkpoint ready in $(( $(date +%s) - t0 )) s (at $(( $(date +%s) - T0 )) s)"
BENCH_JSON=$OUT/learn.json timeout 240 lua5.4 bench/learn.lua /tmp/gptoss-20b cuda:0 8,32 0.3 ${LEARN_S:-12} > $OUT/learn.md 2> $OUT/learn.err
echo "learn rc=$? at $(( $(date +%s) - T0 )) s"; cat $OUT/learn.md; tail -5 $OUT/learn.err
left=$(( ${ROUND_S:-570} - ($(date +%s) - T0) ))
echo "serve gets ${left} s"
if [ $left -gt 90 ]; then
  SERVE_TIMEOUT=$(( left - 40 )) SERVE_CONC=8 STAGES=serve bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -14
  grep -E "error|fail" /tmp/serve/error.log 2>/dev/null | head -10
fi
