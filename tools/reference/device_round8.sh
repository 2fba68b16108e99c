#!/bin/bash
# Device, eighth round (2026-12-07): issue 24's small 128-expert model
# against transformers (the parity fixture); issue 21's LoRA sweep on the
# 20B shape (resumable: a sweep directory carried in .carry/lr_rank_20b goes
# on where it stopped); then issue 22's portable path, a build that carries
# only compute_80 PTX (what sm_80, sm_86 and sm_89 run: no wgmma), which the
# driver JIT-compiles for the H100, through every #gpu spec. Carry
# .device-kit and .carry (bundle.tar.xz; pt80.tar.xz: build/pt80/lua5.4/gptoss
# and build/pt80/cuda/kernels_test, made with CUDA_ARCH="-gencode arch=compute_80,code=compute_80").
set -u
source tools/reference/device_env.sh
round_clock 570
gpu_line
# spec/fixtures/parity/tiny128_seed2.safetensors (H.tiny128())
t0=$(date +%s)
lua5.4 -e 'assert(require("gptoss.checkpoint").write { preset = "tiny", seed = 2, out = "/tmp/tiny128", tokenizer = "tokenizer",
  overrides = { num_local_experts = 128, num_experts_per_tok = 4 } })'
timeout 120 python3 tools/reference/transformers_logits.py /tmp/tiny128 tokenizer/tokenizer.json $OUT/tiny128_seed2.safetensors \
  > $OUT/parity128.log 2>&1
echo "128-expert fixture rc=$? in $(( $(date +%s) - t0 )) s"; tail -3 $OUT/parity128.log
need_20b
[ -d .carry/lr_rank_20b ] && cp -r .carry/lr_rank_20b /tmp/
t=$(( $(left) - ${PORTABLE_S:-200} )); [ $t -gt 300 ] && t=300
if [ $t -gt 60 ]; then
  GPTOSS_PROGRESS=lines timeout $t lua5.4 bin/gptoss sweep bench/sweep/lr_rank_20b.lua --dir /tmp/lr_rank_20b --no-plots \
    > $OUT/sweep_report.md 2> $OUT/sweep_progress.txt
  echo "sweep rc=$? at $(( $(date +%s) - T0 )) s"; tail -4 $OUT/sweep_progress.txt; head -30 $OUT/sweep_report.md
  (cd /tmp && tar czf $OUT/sweep.tar.gz --exclude=checkpoint --exclude=adapter lr_rank_20b)
fi
export CUDA_CACHE_MAXSIZE=4294967296
tar -xJf .carry/pt80.tar.xz
rm -rf build/lua5.4/gptoss && cp -r build/pt80/lua5.4/gptoss build/lua5.4/gptoss
t0=$(date +%s)
lua5.4 -e 'local g = require "gptoss"; local m = assert(g.load("/tmp/tiny128", { device = "cuda:0" })); print(m.device, #m:generate({1,2,3}, {max_tokens = 4, temperature = 0}).ids)'
echo "portable build: first load (the driver JIT-compiles the PTX) in $(( $(date +%s) - t0 )) s"
# each kernel against its double-precision reference, the portable MXFP4 GEMM (mma.sync) among them
timeout 120 build/pt80/cuda/kernels_test > $OUT/kernels_test_pt80.log 2>&1; echo "portable kernels_test rc=$?"
grep -aE "FAIL|mxfp4|kernels_test" $OUT/kernels_test_pt80.log | head -12
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
t=$(( $(left) - 5 ))
timeout $t $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs_pt80.log 2>&1
echo "portable #gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs_pt80.log | head -30
