#!/bin/sh
# make check-memory: the lifetime (models, sessions, the serving engine), loader, tokenizer,
# UTF-8 and hardening specs
# under valgrind (Lua 5.4, real binaries) and under AddressSanitizer with
# UndefinedBehaviorSanitizer (a separate build of core.so preloaded with
# libasan; UBSan stops at the first report, so overflows such as a size
# wrapping past 2^31 fail the run), so that GC and :close() in any order, and
# every error path, are checked for invalid accesses, leaks and undefined
# behaviour. Specs tagged #long (a 10 MB encode) run only outside valgrind.
set -eu
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "check-memory: installing valgrind"; apt-get install -y -qq valgrind >/dev/null; }
make -s LUA=lua5.4 CUDA=0 all
specs="spec/lifecycle_spec.lua spec/safetensors_spec.lua spec/model_load_spec.lua spec/config_spec.lua spec/tokenizer_spec.lua
  spec/utf8_spec.lua spec/sampler_spec.lua spec/serving_lifecycle_spec.lua spec/hardening_spec.lua spec/fuzz_corpus_spec.lua
  spec/loader_spec.lua"
# training through the engine (jobs, their cancellation, the engine's end
# with jobs left) and the engine's sessions (forks, growth, prefix reuse)
# are too slow for valgrind: under the sanitizers only
asan_only="spec/engine_train_spec.lua spec/engine_spec.lua spec/serving_engine_spec.lua spec/split_spec.lua"
export GPTOSS_TOKENIZER_DIR="$PWD/tokenizer"
echo "== valgrind"
valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
  --suppressions=tools/valgrind.supp \
  lua5.4 /usr/bin/busted --cpath='build/lua5.4/?.so' --lpath='lua/?.lua;lua/?/init.lua;spec/?.lua' \
  --exclude-tags=gpu,slow,long $specs
echo "== AddressSanitizer + UndefinedBehaviorSanitizer"
asan=build/asan
make -s LUA=lua5.4 CUDA=0 BUILD=$asan \
  EXTRA_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
  LDFLAGS_EXTRA="-fsanitize=address,undefined" all
lib=$(gcc -print-file-name=libasan.so)
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=98 LSAN_OPTIONS=suppressions=tools/lsan.supp \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  LD_PRELOAD="$lib" lua5.4 /usr/bin/busted --cpath="$asan/lua5.4/?.so" \
  --lpath='lua/?.lua;lua/?/init.lua;spec/?.lua' --exclude-tags=gpu,slow $specs $asan_only
echo "check-memory: clean"
