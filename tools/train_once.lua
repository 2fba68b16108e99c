-- tools/train_once.lua: one LoRA backward pass over one long sequence, timed,
-- with the device memory after it: the length ladder's longest rung, where
-- bench/train.lua's warm-up step and timed steps would take minutes each.
--
--   lua5.4 tools/train_once.lua CHECKPOINT_DIR [device] [precision] [seq] [rank]
--
-- r = rank (16) on attention and the experts, alpha 2r, random init (a
-- fresh adapter's B = 0 would make the experts' LoRA products zeros).
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local workload = require "workload"

local dir, device, precision = arg[1], arg[2] or "cuda:0", arg[3] or "mixed"
local seq, rank = tonumber(arg[4] or 98304), tonumber(arg[5] or 16)
if not dir or not seq or not rank then
  io.stderr:write("usage: lua5.4 tools/train_once.lua CHECKPOINT_DIR [device] [precision] [seq] [rank]\n")
  os.exit(2)
end
local now = gptoss.core.clock
local m = assert(gptoss.load(dir, { device = device, precision = precision, tokenizer = false }))
local lora = gptoss.lora(m, { r = rank, alpha = 2 * rank, targets = { "attn", "experts" }, init = "random", seed = 1 })
local ids = workload.ids(seq, 42)
local t0 = now()
local loss, n = m:lora_backward(lora, ids)
local dt = now() - t0
local mem = m:memory()
print(string.format("one backward pass, %s %s, %d tokens, r %d on attention + experts: %.2f s, %.0f tokens/s, loss %.4f",
  device, precision, seq, rank, dt, seq / dt, loss / n))
print(string.format("  memory: weights %.2f GB, workspace + adapter %.2f GB; device in use %.2f GB (CUDA context included)",
  mem.weights / 1e9, mem.workspace / 1e9, (mem.device_total - mem.device_free) / 1e9))
lora:close()
m:close()
