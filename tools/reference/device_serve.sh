#!/bin/bash
# Device: issue 19's HTTP benchmark. The device has no nginx: Debian 12's
# nginx, its Lua module (with ndk, lua-resty-core, lrucache, libpcre3) and
# LuaJIT (luajit2) are unpacked over / from .carry/serve-debs (made on the
# dev machine with `apt-get download`, with lua-lpeg and lua-filesystem
# for nginx's LuaJIT), so server/nginx.conf.in runs as it
# does on Debian. Carry .device-kit and .carry (bundle.tar.xz: tokenizer,
# build/lua5.4/gptoss and build/luajit/gptoss, both made with CUDA).
#   serve       bench/serve.lua over HTTP at 1, 8, 32, 64 concurrent streams
#   inprocess   the same workload through gptoss.engine in one process
#   study       the seeds' study over HTTP (CPU, RSS, GPU memory of the worker)
set -u
source .device-kit/env.sh
[ -f .carry/bundle.tar.xz ] && tar -xJf .carry/bundle.tar.xz
for d in .carry/serve-debs/*.deb; do dpkg -x "$d" /; done
ldconfig
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
STAGES=${STAGES:-serve inprocess study}
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader | tee $OUT/device.txt
/usr/sbin/nginx -V 2>&1 | head -1
t0=$(date +%s)
[ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer >/dev/null
echo "20B checkpoint ready in $(( $(date +%s) - t0 )) s"
# nginx's LuaJIT and the client's take Debian's paths (lua-cjson for 5.1
# unpacked above), not the kit's Lua 5.4 ones
J="env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 /usr/bin/luajit"
if has serve || has study; then
  t0=$(date +%s)
  RUN_DIR=/tmp/serve PORT=8080 DAEMON=on LOG_LEVEL=notice GPTOSS_MODEL=/tmp/gptoss-20b GPTOSS_DEVICE=cuda:0 \
    GPTOSS_MAX_BATCH=64 env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 tools/serve.sh || { cat /tmp/serve/error.log; exit 1; }
  for i in $(seq 300); do curl -sf http://127.0.0.1:8080/health >/dev/null && break; sleep 0.2; done
  echo "server ready in $(( $(date +%s) - t0 )) s: $(curl -s http://127.0.0.1:8080/health)"
  pid=$(pgrep -P "$(cat /tmp/serve/nginx.pid)" | head -1)
  if has serve; then
    t0=$(date +%s)
    timeout ${SERVE_TIMEOUT:-170} $J bench/serve.lua --url http://127.0.0.1:8080 --prompt 512 --output 128 --concurrency ${SERVE_CONC:-1,8,32,64} \
      --only serve --json $OUT/serve.json > $OUT/serve.md 2> $OUT/serve.err
    echo "serve rc=$? in $(( $(date +%s) - t0 )) s"; cat $OUT/serve.md; tail -3 $OUT/serve.err
  fi
  if has study; then
    t0=$(date +%s)
    timeout ${STUDY_TIMEOUT:-200} $J bench/serve.lua --url http://127.0.0.1:8080 --prompt 512 --output 128 --requests 3 --duration ${STUDY_S:-30} \
      --pid "$pid" --only study --json $OUT/study_http.json > $OUT/study_http.md 2> $OUT/study_http.err
    echo "study rc=$? in $(( $(date +%s) - t0 )) s"; head -60 $OUT/study_http.md; tail -3 $OUT/study_http.err
  fi
  kill -QUIT "$(cat /tmp/serve/nginx.pid)"; sleep 2
  cp /tmp/serve/error.log $OUT/nginx_error.log 2>/dev/null
fi
if has inprocess; then
  t0=$(date +%s)
  timeout ${INPROCESS_TIMEOUT:-200} $J bench/serve.lua --inprocess /tmp/gptoss-20b --device cuda:0 --prompt 512 --output 128 \
    --concurrency 1,8,32,64 --only inprocess --json $OUT/inprocess.json > $OUT/inprocess.md 2> $OUT/inprocess.err
  echo "inprocess rc=$? in $(( $(date +%s) - t0 )) s"; cat $OUT/inprocess.md; tail -3 $OUT/inprocess.err
fi
