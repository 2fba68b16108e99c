#!/bin/sh
# Installs the Debian 12 packages gptoss builds, tests and runs with, when
# they are missing. Needs root (or sudo). The list is the one in README.md.
# nginx, its Lua module and lua-resty-core serve the API (make serve).
# json-schema-test-suite: the official JSON Schema Test Suite (spec/schema_suite_spec.lua).
set -eu
PKGS="gcc g++ make pkg-config lua5.4 liblua5.4-dev lua5.1 liblua5.1-0-dev luajit2 libluajit2-5.1-dev lua-lpeg lua-cjson \
lua-filesystem lua-busted libpcre2-dev libcjson-dev luarocks gnuplot-nox slurm-wlm munge nginx libnginx-mod-http-lua lua-resty-core curl neovim patchelf \
json-schema-test-suite"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# npm may come with a Node.js from outside Debian; Debian's npm would clash with it
command -v npm >/dev/null 2>&1 || missing="$missing npm"
[ -z "$missing" ] && exit 0
echo "installing:$missing"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
