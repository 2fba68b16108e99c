-- A short generation on the GPU, for compute-sanitizer (memcheck, racecheck):
-- prefill, graph-captured decode with each sampler, a batch, a fork, a
-- prefill in passes (a narrow sliding ring) with the expert trace, and a
-- batch mixing an adapter with plain sessions.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"
local dir = assert(arg[1], "usage: gpu_smoke.lua CHECKPOINT")
local m = assert(gptoss.load(dir, { device = "cuda:0", context = 512 }))
local ids = m.tokenizer:encode("A short prompt for the memory checker, long enough to slide past the window of sixteen.")
for _, o in ipairs { { temperature = 0 }, { temperature = 1, seed = 1 }, { top_p = 0.9, seed = 2 }, { top_k = 5, repetition_penalty = 1.2, seed = 3 } } do
  o.max_tokens = 8
  local r = m:generate(ids, o)
  io.write(#r.ids, " ")
end
local b = m:generate_batch({ ids, { 1, 2, 3 } }, { temperature = 0, max_tokens = 4 })
local s = m:session()
s:feed(ids, "last")
local f = s:fork()
f:feed({ 5 }, "last")
local narrow = m:session { rewind = 4 }
narrow:trace(true)
narrow:feed(ids, "all")
assert(#narrow:trace_get() == #ids)
local lora = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 11, targets = { "attn", "experts" } })
local b2 = m:generate_batch({ ids, { 1, 2, 3 }, { 7, 8 } }, { max_tokens = 4, adapter = { lora, false, lora } })
print("smoke ok", #b, #b2)
m:close()
