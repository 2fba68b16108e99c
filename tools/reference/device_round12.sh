#!/bin/bash
# Device, twelfth round (2026-12-07): issue 18's CUDA determinism after the
# sampler fix (Gumbel noise no longer a function of a row's place in the
# batch; logit biases per row in one batch), every #gpu spec; then issue 19's
# HTTP benchmark at 1, 8, 32 and 64 streams. Its second part
# (device_round12b.sh) runs on the warm machine. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
for d in .carry/serve-debs/*.deb; do dpkg -x "$d" /; done; ldconfig
T0=$(date +%s)
gpu_line
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
timeout ${SPECS_S:-150} $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -30
need_20b
SERVE_TIMEOUT=${SERVE_TIMEOUT:-200} STAGES=serve bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -30
cp $OUT/serve.err $OUT/serve_http.err 2>/dev/null
sort $OUT/serve_http.err 2>/dev/null | uniq -c | sort -rn | head -5
grep -aE "\[(error|crit|alert|emerg)\]" $OUT/nginx_error.log 2>/dev/null | cut -c1-300 | sort | uniq -c | sort -rn | head -5
echo "done at $(( $(date +%s) - T0 )) s"
