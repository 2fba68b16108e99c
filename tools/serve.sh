#!/bin/sh
# Renders server/nginx.conf.in into a run directory and starts nginx (or
# OpenResty) on it: the OpenAI-compatible API of lua/gptoss/server.
#   GPTOSS_MODEL=dir tools/serve.sh            in the foreground; Ctrl-C stops it
# PORT (8080), HOST (127.0.0.1), RUN_DIR (a fresh temporary directory),
# DAEMON (off; on: nginx detaches and writes RUN_DIR/nginx.pid), LOG_LEVEL
# (notice), ACCESS_LOG (off, or a file), MAX_BODY (8m), NGINX (the binary:
# openresty when installed, else nginx). `make serve` builds first and picks
# the model; this script only configures and starts.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
port=${PORT:-8080}
host=${HOST:-127.0.0.1}
run=${RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gptoss-serve.XXXXXX")}
mkdir -p "$run"
nginx=${NGINX:-$(command -v openresty || command -v nginx || echo /usr/sbin/nginx)}
# OpenResty has the Lua module built in; Debian's nginx loads it
modules=""
case "$(basename "$nginx")" in
  openresty) ;;
  *) for m in ndk_http_module ngx_http_lua_module; do
       f=/usr/lib/nginx/modules/$m.so
       [ -f "$f" ] || { echo "serve: $f is missing (apt-get install libnginx-mod-http-lua)" >&2; exit 1; }
       modules="$modules load_module $f;"
     done ;;
esac
[ -f "$root/build/luajit/gptoss/core.so" ] || { echo "serve: build the LuaJIT module first (make LUA=luajit)" >&2; exit 1; }
sed -e "s|@LOAD_MODULES@|$modules|" -e "s|@DAEMON@|${DAEMON:-off}|" -e "s|@USER@|$(id -un)|" \
    -e "s|@RUN_DIR@|$run|g" -e "s|@LOG_LEVEL@|${LOG_LEVEL:-notice}|" -e "s|@ACCESS_LOG@|${ACCESS_LOG:-off}|" \
    -e "s|@ROOT@|$root|g" -e "s|@MAX_BODY@|${MAX_BODY:-8m}|g" -e "s|@LISTEN@|$host:$port|" \
    "$root/server/nginx.conf.in" > "$run/nginx.conf"
[ "${DAEMON:-off}" = on ] || echo "gptoss: http://$host:$port/v1 (model ${GPTOSS_MODEL:-unset}; log $run/error.log; Ctrl-C stops)" >&2
exec "$nginx" -p "$run" -c "$run/nginx.conf" -e "$run/error.log"
