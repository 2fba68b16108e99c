#!/bin/bash
# Device, fifteenth round: gpt-oss-120b's shape on one GPU (issue 22: loads,
# runs, decodes at >= 250 tok/s; issue 24: weights, one 8k session, memory
# reported). The checkpoint is 65.2 GB: more than a one-GPU machine's
# 64 GiB disk holds beside the rest, so it goes to /dev/shm (tmpfs, half the
# RAM by default: 64 GiB of 128) when that has room, grown by a remount
# when not, else to the disk if that has room. The loader maps the files
# (MAP_PRIVATE, read only), so the tmpfs pages are the only host copy.
# Carry .device-kit and .carry (bundle.tar.xz).
set -u
source tools/reference/device_env.sh
round_clock 580
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit,memory.total --format=csv,noheader | tee $OUT/device.txt
df -h /dev/shm | tail -1; free -g | head -2
# for issue 24's quantizer check: is OpenAI's triton_kernels (downcast_to_mxfp) importable here?
python3 -c "import importlib.util as u, triton; print('triton', triton.__version__, 'triton_kernels:', bool(u.find_spec('triton_kernels')))" 2>&1 | tail -1
place_120b || exit 3
echo "120B checkpoint goes to $dir"
# round 17 may have started it in the background: wait for its end
while [ ! -f $dir.complete ] && pgrep -f "preset 120b" >/dev/null && [ $(left) -gt 200 ]; do sleep 5; done
pgrep -f "preset 120b" >/dev/null && { echo "the background 120B checkpoint is not done: $(tail -c 300 /tmp/ck120.log)"; exit 4; }
[ -f $dir.complete ] || { timeout 300 lua5.4 tools/make_checkpoint.lua --preset 120b --seed 0 --out $dir --tokenizer tokenizer --force >/dev/null && touch $dir.complete; }
echo "120B checkpoint rc=$? at $(( $(date +%s) - T0 )) s: $(du -sh $dir | cut -f1)"
t=$(( $(left) - 10 ))
BENCH_HF=0 BENCH_RESULTS=$OUT/results_120b.md timeout $t lua5.4 bench/llm.lua $dir cuda:0 exact > $OUT/llm_120b.txt 2>&1
echo "bench/llm.lua (120b) rc=$? at $(( $(date +%s) - T0 )) s"; tail -30 $OUT/llm_120b.txt
