#!/bin/bash
# Device, thirteenth round (2026-12-07, about 500 s of device time left):
# issue 21's benchmark suite on the 20B shape (gptoss bench: llama-bench's
# tests in process, then the seeds' latency study through the engine), then
# issue 22's portable path at the current code (a build carrying compute_80
# PTX only: kernels_test and every #gpu spec). Carry .device-kit and .carry
# (bundle.tar.xz; pt80.tar.xz: build/pt80/lua5.4/gptoss and
# build/pt80/cuda/kernels_test, made with
# make BUILD=build/pt80 CUDA_ARCH="-gencode arch=compute_80,code=compute_80" all kernels-test).
set -u
source tools/reference/device_env.sh
round_clock 420
gpu_line
need_20b
GPTOSS_PROGRESS=lines timeout ${BENCH_S:-150} lua5.4 bin/gptoss bench /tmp/gptoss-20b --device cuda:0 -p 512,2048 -n 128 \
  -pg 512,128 -d 0,4096 -r 3 > $OUT/bench.md 2> $OUT/bench_progress.txt
echo "bench rc=$? at $(( $(date +%s) - T0 )) s"; cat $OUT/bench.md; grep -v "^\[" $OUT/bench_progress.txt | tail -3
GPTOSS_PROGRESS=lines timeout ${STUDY_S:-120} lua5.4 bin/gptoss bench study /tmp/gptoss-20b --device cuda:0 --requests 3 \
  --max-tokens 64 --out $OUT/study > $OUT/study.md 2> $OUT/study.err
echo "study rc=$? at $(( $(date +%s) - T0 )) s"; head -50 $OUT/study.md; tail -2 $OUT/study.err
(cd $OUT && ls study 2>/dev/null | head; tar czf study.tar.gz study 2>/dev/null && rm -rf study)
export CUDA_CACHE_MAXSIZE=4294967296
tar -xJf .carry/pt80.tar.xz
rm -rf build/lua5.4/gptoss && cp -r build/pt80/lua5.4/gptoss build/lua5.4/gptoss
timeout 120 build/pt80/cuda/kernels_test > $OUT/kernels_test_pt80.log 2>&1; echo "portable kernels_test rc=$?"
grep -aE "FAIL|passed|failed" $OUT/kernels_test_pt80.log | tail -3
gpu_specs=$(grep -l "#gpu" spec/*_spec.lua)
t=$(( $(left) - 5 ))
[ $t -gt 30 ] && timeout $t $BUSTED --cpath="$here" --tags=gpu -o utfTerminal $gpu_specs > $OUT/gpu_specs_pt80.log 2>&1
echo "portable #gpu specs rc=$? at $(( $(date +%s) - T0 )) s"
grep -aE "successes|^Failure|^Error|spec.lua:[0-9]+:" $OUT/gpu_specs_pt80.log | head -30
