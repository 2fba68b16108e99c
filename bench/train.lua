--- bench/train.lua: LoRA training speed and memory on a checkpoint.
--
--   lua5.4 bench/train.lua CHECKPOINT_DIR [device] [precision] [seq] [steps] [rank]
--
-- One optimizer step per sequence (batch 1): zero_grad, the backward pass,
-- AdamW. r = 16 (or rank), alpha = 2r on attention (q, k, v, o) and the experts
-- (gate_up, down), as tools/reference/hf_train_bench.py sets up
-- transformers + peft. After one warm-up step it times `steps` steps and
-- prints tokens/s, the split between the backward pass and the optimizer,
-- and device memory. BENCH_JSON=path also writes the numbers as JSON.
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local workload = require "workload"
local cjson = require "cjson"

local dir, device, precision = arg[1], arg[2] or "cuda:0", arg[3] or "exact"
local seq, steps, rank = tonumber(arg[4] or 2048), tonumber(arg[5] or 5), tonumber(arg[6] or 16)
if not dir then
  io.stderr:write("usage: lua5.4 bench/train.lua CHECKPOINT_DIR [device] [precision] [seq] [steps] [rank]\n")
  os.exit(2)
end

local now = gptoss.core.clock

local t0 = now()
local m = assert(gptoss.load(dir, { device = device, precision = precision, tokenizer = false }))
local load_s = now() - t0
local lora = gptoss.lora(m, { r = rank, alpha = 2 * rank, targets = { "attn", "experts" }, seed = 1 })
local ids = workload.ids(seq, 42)

local function step()
  lora:zero_grad()
  local a = now()
  local loss, n = m:lora_backward(lora, ids)
  local b = now()
  lora:step { lr = 1e-4, max_grad_norm = 1, grad_scale = 1 / n }
  return loss / n, b - a, now() - b
end

-- AdamW's update runs behind step (csrc/adapter.c); reading a module waits
-- for it: the clock takes in every step's whole update
local function updated() lora:module(0, "q") end

local first_loss = step()                          -- warm-up: buffers, the device copy
updated()                                          -- and the optimizer state's first touch
local back, opt, last_loss = 0, 0, first_loss
local t_start = now()
for _ = 1, steps do
  local l, b, o = step()
  back, opt, last_loss = back + b, opt + o, l
end
local u0 = now()
updated()
local total, last_update = now() - t_start, now() - u0
local mem = m:memory()
local res = {
  device = device, precision = precision, seq = seq, steps = steps, load_s = load_s,
  params = lora.params, tokens_per_s = seq * steps / total, step_s = total / steps,
  backward_s = back / steps, optimizer_s = opt / steps, first_loss = first_loss, last_loss = last_loss,
  last_update_s = last_update,
  weights_gb = mem.weights / 1e9, workspace_gb = mem.workspace / 1e9,
  device_in_use_gb = (mem.device_total - mem.device_free) / 1e9,
}
print(string.format("gptoss LoRA training, %s %s, seq %d, batch 1, r %d on attention + experts (%d parameters)",
  device, precision, seq, rank, res.params or -1))
print(string.format("  %.0f tokens/s (%.3f s a step: backward %.3f, step %.3f (the update itself runs behind the next backward; the last one took %.3f s more)); loss %.4f -> %.4f",
  res.tokens_per_s, res.step_s, res.backward_s, res.optimizer_s, last_update, first_loss, last_loss))
print(string.format("  memory: weights %.2f GB, workspace + adapter %.2f GB; device in use %.2f GB (CUDA context included)",
  res.weights_gb, res.workspace_gb, res.device_in_use_gb))
if os.getenv("BENCH_JSON") then
  local f = assert(io.open(os.getenv("BENCH_JSON"), "w"))
  f:write(cjson.encode(res), "\n")
  f:close()
end
lora:close()
m:close()
