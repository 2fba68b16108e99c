#!/bin/bash
# Device, twenty-first round (issue 22, a session's last ~150 s): the
# portable path at the current code, one-pass prefill included: a build
# carrying compute_80 PTX only, JIT-compiled for the H100, so every kernel
# takes the path sm_80/86/89 take (no wgmma, no TMA), through gpu_spec.lua
# (the CPU's logits and tokens) and lora_gpu_spec.lua (training against the
# CPU). Carry .device-kit, .carry/bundle.tar.xz and .carry/pt80.tar.xz
# (make BUILD=build/pt80 CUDA_ARCH="-gencode arch=compute_80,code=compute_80" all kernels-test).
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-150}
gpu_line
export CUDA_CACHE_MAXSIZE=4294967296
tar -xJf .carry/pt80.tar.xz
timeout 150 build/pt80/cuda/kernels_test > $OUT/pt80_kernels_test.log 2>&1
echo "portable kernels_test rc=$? at $(( $(date +%s) - T0 )) s"; grep -aE "FAIL|all ok" $OUT/pt80_kernels_test.log | head -10
# the portable modules take the place of the sm_90a ones on the cpath: a
# caller runs this round last
rm -rf build/lua5.4/gptoss && cp -r build/pt80/lua5.4/gptoss build/lua5.4/gptoss
timeout $(( $(left) - 5 )) $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/gpu_spec.lua spec/lora_gpu_spec.lua > $OUT/portable_specs.log 2>&1
echo "portable specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|one pass|24 sessions|^Failure|^Error|spec.lua:[0-9]+:" $OUT/portable_specs.log | head -20
