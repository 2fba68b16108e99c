-- Device: every forward path of the CUDA backend once, for compute-sanitizer
-- (tools/reference/device_ab.sh): a prefill in one pass and in passes, the
-- fused decode step, a batch step of sessions at different depths, a batch
-- with an adapter, and the expert trace.
--   lua5.4 tools/reference/gpu_smoke.lua DIR [DEVICE]
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"
local dir, device = arg[1], arg[2] or "cuda:0"
local m = assert(gptoss.load(dir, { device = device }))
local ids = m.tokenizer:encode(("The sliding window slides over forty tokens of text. "):rep(3))
local s = m:session()
s:feed(ids, "last")
local n = 0
for _ in m:stream(ids, { max_tokens = 8 }) do n = n + 1 end
local narrow = m:session { rewind = 4 }
narrow:trace(true)
narrow:feed(ids, "all")
assert(#narrow:trace_get() == #ids)
local prompts = { ids, { 1, 2, 3 }, { table.unpack(ids, 1, 7) } }
local outs = m:generate_batch(prompts, { max_tokens = 6, temperature = 0.8, seed = 3 })
local lora = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 11, targets = { "attn", "experts" } })
local outs2 = m:generate_batch(prompts, { max_tokens = 4, adapter = { lora, false, lora } })
print(string.format("smoke: %d streamed, %d and %d batch results", n, #outs, #outs2))
m:close()
