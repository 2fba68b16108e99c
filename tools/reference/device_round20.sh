#!/bin/bash
# Device, twentieth round: the checks at the submitted commit. Every #gpu
# spec under Lua 5.4, then the LoRA and token specs again with the
# portable path forced (GPTOSS_CUDA_PORTABLE=1: mma.sync, no wgmma), then
# compute-sanitizer memcheck over a training step, a forward, a decode and a
# batch (issue 22); then issue 24's training targets at seq 2,048, r 16, in
# mixed: bench/train.lua beside transformers + peft in the same run, and
# the length ladder's 8k rung.
# Carry .device-kit and .carry/bundle.tar.xz.
set -u
source tools/reference/device_env.sh
round_clock ${ROUND_S:-570}
gpu_line
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua | grep -v llama_cpp)
timeout 200 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs.log 2>&1
echo "gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs.log | head -20
GPTOSS_CUDA_PORTABLE=1 timeout 120 $BUSTED --cpath="$here" --tags=gpu -o utfTerminal spec/lora_gpu_spec.lua spec/gpu_spec.lua > $OUT/portable_specs.log 2>&1
echo "portable specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/portable_specs.log | head -10
lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --out /tmp/tiny --tokenizer tokenizer >/dev/null
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 lua5.4 bench/train.lua /tmp/tiny cuda:0 exact 40 1 16 > /tmp/memcheck_train.log 2>&1
echo "memcheck train r16: rc=$? $(grep -a 'ERROR SUMMARY' /tmp/memcheck_train.log)"
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 lua5.4 tools/gpu_smoke.lua /tmp/tiny > /tmp/memcheck_fwd.log 2>&1
echo "memcheck forward/decode/batch: rc=$? $(grep -a 'ERROR SUMMARY' /tmp/memcheck_fwd.log)"
grep -a "=========" /tmp/memcheck_*.log | grep -v "ERROR SUMMARY" | head -10
need_20b
BENCH_JSON=$OUT/train_mixed.json timeout 100 lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 mixed 2048 3 16 2>&1 | tail -3
# the ladder's 8k rung (round 17 ran 2k, 32k and 96k), its peak sampled as there
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > /tmp/mem_8192.txt 2>/dev/null &
smi=$!
timeout 60 lua5.4 bench/train.lua /tmp/gptoss-20b cuda:0 mixed 8192 2 16 2>&1 | tail -3
kill $smi 2>/dev/null; echo "seq 8192: GPU memory in use at most $(sort -n /tmp/mem_8192.txt | tail -1) MiB"
t=$(( $(left) - 5 )); [ $t -lt 60 ] && { echo "transformers + peft: no time left"; exit 0; }
timeout $t python3 tools/reference/hf_train_bench.py /tmp/gptoss-20b $OUT/hf_train.json 2048 3 2>&1 | grep -v Warning | tail -8
echo "hf_train_bench rc=${PIPESTATUS[0]} at $(( $(date +%s) - T0 )) s"
