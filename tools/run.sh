#!/bin/sh
# make run: install what is missing, build, and run the main job
# (examples/chat.lua) on $MODEL, or on a tiny checkpoint generated here.
set -eu
cd "$(dirname "$0")/.."
tools/install_deps.sh
tools/fetch_tokenizer.sh tokenizer
make -s all
export LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/lua5.4/?.so;;"
model=${MODEL:-}
if [ -z "$model" ]; then
  model=build/models/tiny
  if [ ! -f "$model/config.json" ]; then
    lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out "$model" --tokenizer tokenizer --force
  fi
fi
exec lua5.4 examples/chat.lua "$model" ${PROMPT:+"$PROMPT"}
