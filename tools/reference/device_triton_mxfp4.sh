#!/bin/bash
# Device: gptoss's load-time MXFP4 quantizer of bf16 experts (csrc/quantize.c)
# against OpenAI's, triton_kernels' downcast_to_mxfp on the GPU
# (tools/reference/triton_mxfp4_check.py). bf16 checkpoints made here: tiny
# with the MXFP4 twin's values (maxima of 6 * 2^k), tiny and small with random
# values, a two-layer 20B shape (hidden 2880: 90 blocks a row, a ragged tail
# for the kernel's 128-wide tiles) and tiny of hard cases; each is loaded on
# the CPU, dumped by mxfp4_dump.lua and checked. Full reports in $OUT/*.txt.
# Carry .device-kit, .carry and .triton-kernels (triton_kernels at the v3.6
# cut, see .triton-kernels/SOURCE). About a minute.
set -u
source tools/reference/device_env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.triton-kernels
python3 -c "import torch, triton, triton_kernels.numerics_details.mxfp as m; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), m.__file__)"
W=/tmp/triton_mxfp4
mkdir -p $W
mk() { [ -f $W/$1/config.json ] || lua5.4 tools/make_checkpoint.lua --seed 1 --no-tokenizer --out $W/$1 "${@:2}" >/dev/null; }
mk tiny-twin --preset tiny --expert-dtype bf16
mk tiny-generic --preset tiny --expert-dtype bf16-generic
mk small-generic --preset small --expert-dtype bf16-generic
mk 20b2-generic --preset 20b --layers 2 --vocab 2048 --expert-dtype bf16-generic
[ -d $W/tiny-hard ] || python3 tools/reference/triton_mxfp4_check.py --adversarial $W/tiny-generic $W/tiny-hard
rc=0
for c in tiny-twin tiny-generic tiny-hard small-generic 20b2-generic; do
  echo "== $c"
  lua5.4 tools/reference/mxfp4_dump.lua $W/$c $W/$c.mxfp4.safetensors || { rc=1; continue; }
  timeout 150 python3 tools/reference/triton_mxfp4_check.py $W/$c $W/$c.mxfp4.safetensors > $OUT/$c.txt 2>&1
  r=$?; [ $r -ne 0 ] && rc=1
  grep -v -e '^torch ' -e ' -> identical$' -e '^triton_mxfp4_check:' $OUT/$c.txt | cut -c1-400 | head -8
  tail -1 $OUT/$c.txt; echo "rc=$r"
done
echo "device_triton_mxfp4: rc=$rc (0: every tensor identical to downcast_to_mxfp)"
