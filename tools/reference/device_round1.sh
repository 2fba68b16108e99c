#!/bin/bash
# One device call: reference fixtures for the tokenizer and the CPU forward
# pass, our parity spec against them, and the tokenizer benchmark.
#   (device) bash tools/reference/device_round1.sh
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer PYTHONUNBUFFERED=1
export LUA_PATH="lua/?.lua;lua/?/init.lua;spec/?.lua;$LUA_PATH" LUA_PATH_5_4="lua/?.lua;lua/?/init.lua;spec/?.lua;$LUA_PATH_5_4"
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
echo "== machine"; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, tiktoken, tokenizers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tiktoken', tiktoken.__version__, 'tokenizers', tokenizers.__version__, 'peft', peft.__version__)"
echo "== tokenizer reference ids"
python3 tools/reference/tokenizer_ids.py tokenizer/tokenizer.json spec/fixtures/tokenizer/corpus $OUT/expected
tar czf $OUT/tokenizer_expected.tgz -C $OUT expected && rm -rf $OUT/expected
echo "== tiny checkpoint and transformers reference"
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer
python3 tools/reference/transformers_logits.py /tmp/tiny tokenizer/tokenizer.json $OUT/tiny_seed1.safetensors
mkdir -p spec/fixtures/parity && cp $OUT/tiny_seed1.safetensors spec/fixtures/parity/
echo "== parity spec"
$BUSTED --cpath='build/lua5.4/?.so' spec/parity_spec.lua
echo "== tokenizer bench"
lua5.4 bench/tokenizer.lua tokenizer 7 | tee $OUT/tokenizer_bench.txt
