#!/bin/bash
# Device, fourteenth round, for branch decode-pdl (everything on it waits
# for this run): issue 22's prefill on tensor cores (the experts through
# mxfp4_gemm.cu's wgmma kernel, attention in flash_attention.cu's prefill
# tiles, the embedding table in host memory), the decode step by
# programmatic dependent launch, issue 24's packing on CUDA, and
# cuda_sample's one pass.
# First the checks: kernels_test (the new kernels against double precision)
# and every #gpu spec; then the measures, each new path against the one it
# replaces in the same run (GPTOSS_MOE_GEMM=wmma, GPTOSS_PREFILL_ATTENTION=split,
# GPTOSS_PDL=1, opt-in since it measured slower),
# the stage profile, and bench/llm.lua's targets' table with transformers.
# GPTOSS_EMBED=device compares the embedding table on the device.
# Carry .device-kit and .carry (bundle.tar.xz with build/cuda/kernels_test:
# tar -cJf .carry/bundle.tar.xz tokenizer build/lua5.4/gptoss build/luajit/gptoss build/cuda/kernels_test).
set -u
source tools/reference/device_env.sh
round_clock 560
gpu_line
timeout 120 build/cuda/kernels_test > $OUT/kernels_test.log 2>&1; echo "kernels_test rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "prefill tiles|wgmma|FAIL|all ok|CUDA" $OUT/kernels_test.log | head -40
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua | grep -v llama_cpp)
timeout ${SPECS_S:-170} $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -30
need_20b
# prefill of 2,048 tokens, each path against the one it replaces
for v in "new" "GPTOSS_MOE_GEMM=wmma" "GPTOSS_PREFILL_ATTENTION=split" "GPTOSS_MOE_GEMM=wmma GPTOSS_PREFILL_ATTENTION=split"; do
  [ "$v" = new ] && e="" || e="$v"
  env $e GPTOSS_PROFILE=1 timeout 60 lua5.4 tools/profile.lua /tmp/gptoss-20b prefill exact > /tmp/prefill_$(echo $v | tr ' =' '_-').txt 2>&1
  echo "== prefill, $v: rc=$?"; grep -aE "total|tok/s|moe|attention" /tmp/prefill_$(echo $v | tr ' =' '_-').txt | head -8
done
# batch-1 decode (256 steps after 512 tokens) with and without PDL; 64
# sessions with the wgmma experts and with moe.cu's GEMM
for v in "new" "GPTOSS_PDL=1"; do
  [ "$v" = new ] && e="" || e="$v"
  echo "== decode, $v: $(env $e timeout 60 lua5.4 tools/profile.lua /tmp/gptoss-20b decode exact 256 2>&1 | tail -1)"
done
for v in "new" "GPTOSS_MOE_GEMM=wmma"; do
  [ "$v" = new ] && e="" || e="$v"
  echo "== 64 sessions x 16 steps, $v: $(env $e timeout 60 lua5.4 tools/profile.lua /tmp/gptoss-20b batch exact 64 16 2>&1 | tail -1)"
done
# a short turn deep in a long context (32 tokens after 8,000): the tiles
# must not be slower there than the split kernel (forward.cu's routing)
cat > /tmp/turn.lua <<'LUA'
local gptoss = require "gptoss"
local m = assert(gptoss.load(arg[1], { device = "cuda:0", context = 9000 }))
local s = m:session { context = 9000 }
local ids = {}
for i = 1, 8000 do ids[i] = 1000 + i % 5000 end
s:feed(ids, "none")
local turn = {}
for i = 1, 32 do turn[i] = 300 + i end
local t0 = gptoss.core.clock()
for _ = 1, 5 do s:rewind(8000); s:feed(turn, "last") end
print(string.format("32-token turn at 8000: %.2f ms", (gptoss.core.clock() - t0) / 5 * 1e3))
LUA
for v in "new" "GPTOSS_PREFILL_ATTENTION=split"; do
  [ "$v" = new ] && e="" || e="$v"
  echo "== $v: $(env $e timeout 60 lua5.4 /tmp/turn.lua /tmp/gptoss-20b 2>&1 | tail -1)"
done
t=$(( $(left) - 10 )); [ $t -gt 300 ] && t=300
[ $t -gt 60 ] && BENCH_RESULTS=$OUT/results_exact.md timeout $t lua5.4 bench/llm.lua /tmp/gptoss-20b cuda:0 exact > $OUT/llm.txt 2>&1
echo "bench/llm.lua rc=$? at $(( $(date +%s) - T0 )) s"; tail -30 $OUT/llm.txt
