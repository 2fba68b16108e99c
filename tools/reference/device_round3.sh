#!/bin/bash
# Device: per-kernel tests, and CPU/CUDA bisection on tiny and small models.
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
build/cuda/kernels_test
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
lua5.4 tools/make_checkpoint.lua --preset small --seed 2 --out /tmp/small --tokenizer tokenizer >/dev/null
lua5.4 tools/gpu_diag.lua /tmp/tiny
lua5.4 tools/gpu_diag.lua /tmp/small
