--- bench/adapter.lua: what a LoRA adapter costs a session: prefill, batch-1
-- decode and 8 sessions stepping together, each without an adapter and with
-- one (the seeds' shape: r 16 on q, k, v, o and every expert's gate_up and
-- down, weights drawn at random so that every delta is live), plus the
-- device memory its copy takes.
--
--   lua5.4 bench/adapter.lua [DIR] [DEVICE] [PRECISION] [RANK]
--
-- DIR defaults to /tmp/gptoss-20b (tools/make_checkpoint.lua --preset 20b).
-- Prints a Markdown table; BENCH_JSON=path also writes the numbers as JSON.
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local workload = require "workload"

local dir = arg[1] or "/tmp/gptoss-20b"
local device = arg[2] or "cuda:0"
local precision = arg[3] or "exact"
local rank = tonumber(arg[4] or "16")
local now = gptoss.core.clock

local m = assert(gptoss.load(dir, { device = device, precision = precision, context = 4096 }))
local V = m.config.vocab_size
local greedy = gptoss.sampler(V, { temperature = 0 })
local lora = gptoss.lora(m, { r = rank, alpha = 2 * rank, targets = { "attn", "experts" }, init = "random", seed = 1 })

local rows, out = {}, { params = lora.params }
local function row(what, plain, with, unit)
  rows[#rows + 1] = string.format("| %s | %.1f | %.1f | %s | %.2f |", what, plain, with, unit, with / plain)
end

local function prefill(adapter)
  local s = m:session { adapter = adapter }
  s:feed(workload.ids(64, 1), "last"); s:rewind(0)          -- warm-up (and the adapter's upload)
  local t0 = now()
  s:feed(workload.ids(2048, 2), "last")
  local dt = now() - t0
  s:close()
  return 2048 / dt
end

local function decode(adapter)
  local s = m:session { adapter = adapter }
  s:feed(workload.ids(512, 3), "last")
  local id = s:sample(greedy)
  for _ = 1, 8 do id = s:step(id, greedy) end
  local t0 = now()
  for _ = 1, 128 do id = s:step(id, greedy) end
  local dt = now() - t0
  s:close()
  return 128 / dt
end

local function batch(adapter, n)
  local ss, last, smp = workload.sessions(m, n, greedy)
  if adapter then for _, s in ipairs(ss) do s:set_adapter(adapter) end end
  last = gptoss.batch_step(ss, last, smp)
  local t0 = now()
  for _ = 1, 32 do last = gptoss.batch_step(ss, last, smp) end
  local dt = now() - t0
  for _, s in ipairs(ss) do s:close() end
  return n * 32 / dt
end

local base_ws = m:memory().workspace
out.prefill = { prefill(nil), prefill(lora) }
out.decode = { decode(nil), decode(lora) }
out.batch8 = { batch(nil, 8), batch(lora, 8) }
local s = m:session { adapter = lora }
s:feed(workload.ids(16, 9), "last")
local mem = m:memory()
s:close()
out.adapter_gb = (mem.workspace - base_ws) / 1e9
out.device_gb = (mem.device_total - mem.device_free) / 1e9

print(string.format("\n%s, %s, precision %s; adapter r %d on attention and experts, %d weights\n", dir, device, precision,
  rank, lora.params))
print("| measure | no adapter | with the adapter | unit | ratio |")
print("|---|---|---|---|---|")
row("prefill, 2048-token prompt", out.prefill[1], out.prefill[2], "tok/s")
row("decode, batch 1 (after 512 + 8)", out.decode[1], out.decode[2], "tok/s")
row("decode, 8 sessions together", out.batch8[1], out.batch8[2], "tok/s")
for _, r in ipairs(rows) do print(r) end
print(string.format("\nthe adapter's device copy and buffers: %.2f GB; device in use %.2f GB", out.adapter_gb, out.device_gb))
local path = os.getenv("BENCH_JSON")
if path then
  local f = assert(io.open(path, "w"))
  f:write(require("cjson").encode(out))
  f:close()
end
lora:close()
m:close()
