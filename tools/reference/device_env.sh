# Sourced by the device scripts (tools/reference/device_*.sh): the kit's Lua
# and busted (.device-kit), the bundle of CUDA builds and the tokenizer
# (.carry/bundle.tar.xz, made on the dev machine), and the paths the Lua 5.4
# build is found by. Sets $here, the build's cpath pattern.
source .device-kit/env.sh
[ -f .carry/bundle.tar.xz ] && tar -xJf .carry/bundle.tar.xz
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
here="build/lua5.4/?.so"
export LUA_CPATH="$here;$LUA_CPATH" LUA_CPATH_5_4="$here;$LUA_CPATH_5_4"
# round_clock S starts a round's clock; then `left` prints the seconds left
# of its ROUND_S (S unless the caller set ROUND_S)
round_clock() { T0=$(date +%s); ROUND_S=${ROUND_S:-$1}; }
left() { echo $(( ROUND_S - ($(date +%s) - T0) )); }
# gpu_line: the GPU's name, clocks and power limit, to the log and $OUT/device.txt
gpu_line() { nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader | tee $OUT/device.txt; }
# need_20b: the 20B-shaped checkpoint at /tmp/gptoss-20b (made unless a
# warm machine has it already), then the round's clock at that point
need_20b() {
  [ -f /tmp/gptoss-20b/config.json ] || lua5.4 tools/make_checkpoint.lua --preset 20b --seed 0 --out /tmp/gptoss-20b --tokenizer tokenizer >/dev/null
  echo "20B checkpoint at $(( $(date +%s) - T0 )) s"
}
# place_120b: sets dir to where the 120B checkpoint (65.2 GB) goes or is:
# /dev/shm (tmpfs, half the RAM by default) when it has room, grown by a
# remount when not, else /tmp when the disk has room; a made one is marked
# by $dir.complete. Fails, saying why, when neither has room.
place_120b() {
  local need=66   # GB: 65.2 of tensors, the tokenizer, and a margin
  avail_gb() { df -BG --output=avail "$1" 2>/dev/null | tail -1 | tr -dc 0-9; }
  dir=""
  for base in /dev/shm /tmp; do
    [ -e $base/gptoss-120b ] && { dir=$base/gptoss-120b; return 0; }
  done
  [ "$(avail_gb /dev/shm)" -lt $need ] && mount -o remount,size=110G /dev/shm 2>&1 | tail -1
  if [ "$(avail_gb /dev/shm)" -ge $need ]; then dir=/dev/shm/gptoss-120b
  elif [ "$(avail_gb /tmp)" -ge $need ]; then dir=/tmp/gptoss-120b
  else echo "no room for the 120B checkpoint: /dev/shm $(avail_gb /dev/shm) GB, /tmp $(avail_gb /tmp) GB free"; return 1; fi
}
# jit_busted ARGS: busted under the kit's LuaJIT with the LuaJIT build
# (build/luajit, carried in the bundle); exported, so that `timeout N bash
# -c "jit_busted ..."` bounds it
jit_busted() {
  local kit=/opt/kit
  LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;$kit/usr/share/lua/5.1/?.lua;$kit/usr/share/lua/5.1/?/init.lua;;" \
  LUA_CPATH="build/luajit/?.so;$kit/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;;" \
    luajit $kit/usr/bin/busted --cpath='build/luajit/?.so' "$@"
}
export -f jit_busted
