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
