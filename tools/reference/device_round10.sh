#!/bin/bash
# Device, the shortest round (2026-12-07, little device time left): every
# #gpu spec (the engine's growth within its KV budget on CUDA, the adapter
# row among other adapters', the 16 mixed requests; packing on CUDA once
# 2d0e934 is applied again), then
# the LoRA training specs with the portable expert GEMM forced
# (GPTOSS_CUDA_PORTABLE=1) while time is left. Carry .device-kit and .carry.
set -u
source tools/reference/device_env.sh
round_clock 230
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/device.txt
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
timeout ${SPECS_S:-170} $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -40
t=$(( $(left) - 3 ))
if [ $t -gt 30 ]; then
  GPTOSS_CUDA_PORTABLE=1 timeout $t $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/lora_gpu_spec.lua spec/packing_spec.lua \
    > $OUT/portable_specs.log 2>&1
  echo "portable GEMM specs rc=$? at $(( $(date +%s) - T0 )) s"
  grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/portable_specs.log | head -20
fi
