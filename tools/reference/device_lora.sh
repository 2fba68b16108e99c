#!/bin/bash
# Device: PEFT adapters and their logits on the tiny checkpoint (seed 1), and
# a PEFT training reference (loss, gradients, 5 AdamW steps): the fixtures of
# spec/lora_spec.lua and spec/lora_train_spec.lua; with GPTOSS_SAVED set, also PEFT loading
# the adapters gptoss saved there (the reverse direction).
set -u
source .device-kit/env.sh
export GPTOSS_TOKENIZER_DIR=$PWD/tokenizer PYTHONUNBUFFERED=1
export LUA_CPATH="build/lua5.4/?.so;$LUA_CPATH" LUA_CPATH_5_4="build/lua5.4/?.so;$LUA_CPATH_5_4"
python3 -c "import peft, transformers, torch; print('peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
python3 tools/reference/peft_lora.py /tmp/tiny $OUT/lora 2>&1 | grep -v Warning
python3 tools/reference/peft_train.py /tmp/tiny $OUT/lora 2>&1 | grep -v Warning
for d in $OUT/lora/*/; do echo "== $d"; cat $d/adapter_config.json; python3 -c "
from safetensors import safe_open; import sys
h = safe_open(sys.argv[1] + '/adapter_model.safetensors', 'pt')
ks = sorted(h.keys()); print(len(ks), 'tensors'); [print(k, h.get_slice(k).get_shape(), h.get_slice(k).get_dtype()) for k in ks[:6]]" $d; done
if [ -n "${GPTOSS_SAVED:-}" ]; then
  # an adapter trained here, and the logits gptoss gives with it
  lua5.4 tools/lora_trained_ref.lua /tmp/tiny /tmp/trained $OUT/trained_ref.safetensors
  python3 tools/reference/peft_lora.py --check /tmp/tiny /tmp/trained $OUT/trained_ref.safetensors
  cp -r /tmp/trained $OUT/trained
  for name in attn_r4 qv_rslora_r8; do
    lua5.4 tools/lora_resave.lua spec/fixtures/lora/$name /tmp/resaved_$name
    python3 tools/reference/peft_lora.py --check /tmp/tiny /tmp/resaved_$name spec/fixtures/lora/$name.safetensors
  done
fi
