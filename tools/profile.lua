--- tools/profile.lua: one workload under GPTOSS_PROFILE=1, whose stage
-- timings the CUDA backend prints when the model closes.
--
--   GPTOSS_PROFILE=1 lua5.4 tools/profile.lua DIR prefill|decode|batch [PRECISION] [N] [STEPS]
--
-- prefill: one N-token prompt (default 2048); decode: N steps (default 64)
-- after a 512-token prompt; batch: STEPS steps (default 16) of N sessions
-- (default 64) together. Without GPTOSS_PROFILE it also serves as the
-- workload for ncu (tools/reference/device_ncu.sh). LORA=r gives every
-- session a random adapter of rank r on attention and experts.
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local dir, what, precision = arg[1], arg[2], arg[3] or "exact"
local n = tonumber(arg[4] or "")
local m = assert(gptoss.load(dir, { device = "cuda:0", precision = precision, context = 4096 }))
local V = m.config.vocab_size
local workload = require "workload"
local ids = workload.ids
local greedy = gptoss.sampler(V, { temperature = 0 })
local now = gptoss.core.clock
local lora = tonumber(os.getenv("LORA") or "")
if lora then lora = gptoss.lora(m, { r = lora, targets = { "attn", "experts" }, init = "random", seed = 1 }) end
local t0
if what == "prefill" then
  local s = m:session { adapter = lora }
  t0 = now()
  s:feed(ids(n or 2048, 2), "last")
  s:close()
elseif what == "decode" then
  local s = m:session { adapter = lora }
  s:feed(ids(512, 3), "last")
  local id = s:sample(greedy)
  t0 = now()
  for _ = 1, n or 64 do id = s:step(id, greedy) end
  s:close()
elseif what == "batch" then
  n = n or 64
  local ss, last, smp = workload.sessions(m, n, greedy)
  if lora then for _, s in ipairs(ss) do s:set_adapter(lora) end end
  t0 = now()
  for _ = 1, tonumber(arg[5] or "") or 16 do last = gptoss.batch_step(ss, last, smp) end
  for i = 1, n do ss[i]:close() end
else
  error("what: prefill, decode or batch")
end
print(string.format("%s: %.1f ms wall", what, (now() - t0) * 1e3))
m:close()
