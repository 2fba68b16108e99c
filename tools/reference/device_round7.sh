#!/bin/bash
# Device, seventh round (2026-12-07): every #gpu spec (packing on CUDA, the
# adapter row among other adapters' rows, the 16 mixed engine requests);
# engine_diag on a batch-invariant model; the HTTP benchmark at 8, 32 and
# 64 streams with each failure's reason (sessions now sized by kv_block, not
# the model's 131,072 positions); then
# issue 18's serving benchmark at 1, 8, 32, 64 and 256 clients (512-token
# prompts, 256 generated) while time is left. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
for d in .carry/serve-debs/*.deb; do dpkg -x "$d" /; done; ldconfig
T0=$(date +%s)
left() { echo $(( ${ROUND_S:-570} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader | tee $OUT/device.txt
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
timeout ${SPECS_S:-170} $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -30
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
INVARIANT=1 timeout 40 lua5.4 tools/reference/engine_diag.lua /tmp/tiny cuda:0 > $OUT/diag_inv.txt 2>&1; tail -6 $OUT/diag_inv.txt
lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer >/dev/null
echo "20B checkpoint at $(( $(date +%s) - T0 )) s"
J="env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 /usr/bin/luajit"
serve_round() {   # $1: a label, then env settings for the server
  local label=$1; shift
  rm -rf /tmp/serve
  env RUN_DIR=/tmp/serve PORT=8080 DAEMON=on LOG_LEVEL=notice GPTOSS_MODEL=/tmp/gptoss-20b GPTOSS_DEVICE=cuda:0 "$@" \
    env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 tools/serve.sh || { tail -5 /tmp/serve/error.log; return; }
  for i in $(seq 300); do curl -sf http://127.0.0.1:8080/health >/dev/null && break; sleep 0.2; done
  echo "[$label] ready: $(curl -s http://127.0.0.1:8080/health | head -c 300)"
  timeout 150 $J bench/serve.lua --url http://127.0.0.1:8080 --prompt 512 --output 128 --concurrency ${HTTP_C:-8,32,64} \
    --only serve --json $OUT/serve_$label.json > $OUT/serve_$label.md 2> $OUT/serve_$label.err
  echo "[$label] serve rc=$?"; grep -v "^|---" $OUT/serve_$label.md | tail -6; sort $OUT/serve_$label.err | uniq -c | sort -rn | head -6
  curl -s http://127.0.0.1:8080/metrics | grep -E "^vllm:(num_requests|gpu_cache|prompt_tokens_total|generation_tokens_total)" | head -8
  kill -QUIT "$(cat /tmp/serve/nginx.pid)"; sleep 2
  cp /tmp/serve/error.log $OUT/nginx_error_$label.log 2>/dev/null
  grep -aE "\[(error|crit|alert|emerg)\]" /tmp/serve/error.log | cut -c1-300 | sort | uniq -c | sort -rn | head -5
}
serve_round default
echo "serving gets $(left) s"
t=$(( $(left) - 5 ))
if [ $t -gt 60 ]; then
  timeout $t lua5.4 bench/serving.lua /tmp/gptoss-20b cuda:0 ${SERVING_C:-1,8,32,64,256} 512 256 > $OUT/serving.md 2> $OUT/serving.err
  echo "serving rc=$? at $(( $(date +%s) - T0 )) s"; grep -v "^|---" $OUT/serving.md | tail -12; tail -3 $OUT/serving.err
fi
