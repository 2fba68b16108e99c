#!/bin/bash
# Device: tokenizer reference ids (tiktoken, cross-checked by tokenizers)
# and the side-by-side tokenizer benchmark.
set -u
source .device-kit/env.sh
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
python3 tools/reference/tokenizer_ids.py tokenizer/tokenizer.json spec/fixtures/tokenizer/corpus $OUT/expected
tar czf $OUT/tokenizer_expected.tgz -C $OUT expected && rm -rf $OUT/expected
lua5.4 bench/tokenizer.lua tokenizer 7 | tee $OUT/tokenizer_bench.txt
