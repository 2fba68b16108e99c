-- Device: one request of serving_engine_spec's CUDA determinism check, alone
-- (model:generate: the fused decode step) against the engine (batched
-- forward), with each run's ids and finish reason.
--   lua5.4 tools/reference/engine_diag.lua DIR
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
local gptoss = require "gptoss"
local m = assert(gptoss.load(arg[1], { device = arg[2] or "cuda:0", batch_invariant = os.getenv("INVARIANT") == "1" }))
local a1 = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 11, targets = { "attn" } })
local tok = m.tokenizer
-- request 1's prompt (serving_engine_spec's prompt_of(tok, 1, 39))
local WORDS = { "river", "stone", "light", "seven", "orbit", "maple", "quiet", "hollow", "amber", "lantern", "drift",
  "copper", "meadow", "signal", "harbor", "velvet" }
local w = {}
for i = 1, 39 do w[i] = WORDS[(i * 7 + 3) % #WORDS + 1] end
local ids = tok:encode(table.concat(w, " "))
while #ids > 39 do ids[#ids] = nil end
local o = { temperature = 0, max_tokens = 9, adapter = a1 }
local alone = m:generate(ids, o)
local eng = gptoss.engine(m, { max_batch = 16, chunk_tokens = 24 })
local r = assert(eng:submit(ids, o)):result()
eng:close()
print("alone ", table.concat(alone.ids, ","), alone.finish_reason)
print("engine", table.concat(r.ids, ","), r.finish_reason)
local b = m:generate_batch({ ids }, o)[1]
print("batch ", table.concat(b.ids, ","), b.finish_reason)
m:close()
