#!/bin/bash
# Device, seventh round (2026-12-07): every #gpu spec (packing on CUDA once
# 2d0e934 is applied again, the adapter row among other adapters' rows, the 16 mixed engine requests, the
# KV budget's growth); issue 19's HTTP benchmark at 1, 8, 32 and 64 streams
# with each failure's reason (sessions now sized by kv_block, not the
# model's 131,072 positions), its study over HTTP and the in-process
# figures beside; then
# issue 18's serving benchmark at 1, 8, 32, 64 and 256 clients (512-token
# prompts, 256 generated) while time is left. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
for d in .carry/serve-debs/*.deb; do dpkg -x "$d" /; done; ldconfig
round_clock 570
gpu_line
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
timeout ${SPECS_S:-150} $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -30
need_20b
# issue 19: HTTP at 1, 8, 32 and 64 streams (each failure's reason), the
# seeds' study over HTTP (30 s of CPU, RSS and GPU memory), the same load in
# process beside it
SERVE_TIMEOUT=120 STAGES=serve bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -30
cp $OUT/serve.err $OUT/serve_http.err 2>/dev/null
t=$(( $(left) - 150 )); [ $t -gt 110 ] && t=110
[ $t -gt 50 ] && STUDY_S=30 STUDY_TIMEOUT=$t STAGES=study bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -40
t=$(( $(left) - 60 )); [ $t -gt 90 ] && t=90
[ $t -gt 40 ] && INPROCESS_TIMEOUT=$t STAGES=inprocess bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -12
sort $OUT/serve_http.err 2>/dev/null | uniq -c | sort -rn | head -5
grep -aE "\[(error|crit|alert|emerg)\]" $OUT/nginx_error.log 2>/dev/null | cut -c1-300 | sort | uniq -c | sort -rn | head -5
echo "serving gets $(left) s"
t=$(( $(left) - 5 ))
if [ $t -gt 60 ]; then
  timeout $t lua5.4 bench/serving.lua /tmp/gptoss-20b cuda:0 ${SERVING_C:-1,8,32,64,256} 512 256 > $OUT/serving.md 2> $OUT/serving.err
  echo "serving rc=$? at $(( $(date +%s) - T0 )) s"; grep -v "^|---" $OUT/serving.md | tail -12; tail -3 $OUT/serving.err
fi
