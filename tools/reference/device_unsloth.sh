#!/bin/bash
# Device: the fixture of spec/unsloth_spec.lua's PEFT case (issue 24): an
# adapter PEFT writes on Unsloth's per-expert module layout of the tiny
# checkpoint (seed 1), and the logits transformers + PEFT give with it.
# Writes $OUT/lora/unsloth_r4/ and $OUT/lora/unsloth_r4.safetensors, to be
# copied to spec/fixtures/lora/. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
export PYTHONUNBUFFERED=1
python3 -c "import peft, transformers, torch; print('peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
[ -f /tmp/tiny/config.json ] || lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
timeout 240 python3 tools/reference/peft_unsloth.py /tmp/tiny $OUT/lora 2>&1 | grep -v Warning
echo "peft_unsloth rc=${PIPESTATUS[0]}"
ls -la $OUT/lora $OUT/lora/unsloth_r4 2>&1 | tail -6
cat $OUT/lora/unsloth_r4/adapter_config.json 2>/dev/null | head -40
python3 -c "
from safetensors import safe_open; import sys
h = safe_open(sys.argv[1] + '/adapter_model.safetensors', 'pt')
ks = sorted(h.keys()); print(len(ks), 'tensors'); [print(k, h.get_slice(k).get_shape()) for k in ks[:8]]" $OUT/lora/unsloth_r4 2>&1 | tail -9
