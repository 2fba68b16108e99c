--- bench/constrained.lua: what a constraint costs decoding (issue 23). C
-- streams through gptoss.engine, each a 256-token prompt and 128 tokens
-- out (no stop: the grammar's end ids are its only way to finish early),
-- (a) free, (b) under a JSON Schema over the whole output (objects,
-- strings, numbers, arrays: strings of at most 24 characters so that the
-- walk goes on), (c) under harmony arms (a declared tool's parameters,
-- the prompt opening that tool's call). Reported: output tokens/s, the
-- share of masks the engine computed ahead during the forward pass and
-- their seconds, against the forward's.
--
--   lua5.4 bench/constrained.lua [DIR] [DEVICE] [CONCURRENCY] [ROUNDS]
--
-- DIR defaults to /tmp/gptoss-20b, DEVICE cuda:0, CONCURRENCY "1,8",
-- ROUNDS 3 (the median round is reported). BENCH_JSON=path writes JSON.
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local harmony = require "gptoss.harmony"
local constraint = require "gptoss.constraint"
local W = require "workload"
local now = gptoss.core.clock

local dir, device = arg[1] or "/tmp/gptoss-20b", arg[2] or "cuda:0"
local levels = {}
for c in (arg[3] or "1,8"):gmatch("%d+") do levels[#levels + 1] = tonumber(c) end
local ROUNDS = tonumber(arg[4] or "3")
local OUT = 128

local m = assert(gptoss.load(dir, { device = device, context = 1024 }))
local tok = m.tokenizer
local SCHEMA = [[{"type":"object","properties":{"name":{"type":"string","maxLength":24},
  "tags":{"type":"array","items":{"type":"string","maxLength":24}},"score":{"type":"number"},
  "items":{"type":"array","items":{"type":"object","properties":{"id":{"type":"integer"},
  "label":{"type":"string","maxLength":24}},"required":["id","label"]}}},"required":["name","tags","score","items"]}]]
local TOOLS = { { type = "function", ["function"] = { name = "record", description = "Record an entry",
  parameters = require("gptoss.json").decode(SCHEMA) } } }
local ASK = { { role = "user", content = "Record an entry." } }
local call_prompt = harmony.render({ developer = { tools = TOOLS }, messages = ASK, mode = "completion",
  prefill = { channel = "commentary", recipient = "functions.record", content_type = "<|constrain|>json" } }, tok)
local arms = constraint.chat_arms({}, TOOLS, "bench")

local KINDS = {
  { name = "free", prompt = function(k) return W.ids(256, 70 + k) end, opts = {} },
  { name = "json_schema", prompt = function(k) return W.ids(256, 70 + k) end,
    opts = { json_schema = SCHEMA, json_options = { max_items = 4 } } },
  { name = "tool arms", prompt = function() return call_prompt end, opts = { arms = arms } },
}

local function round(eng, C, kind)
  local st0, t0 = eng:stats(), now()
  local reqs = {}
  for k = 1, C do
    local o = { max_tokens = OUT, stop_tokens = {}, seed = k, temperature = 1.0 }
    for key, v in pairs(kind.opts) do o[key] = v end
    reqs[k] = assert(eng:submit(kind.prompt(k), o))
  end
  local out = 0
  for k = 1, C do out = out + #reqs[k]:result().ids end
  local dt, st1 = now() - t0, eng:stats()
  return { tok_s = out / dt, tokens = out, masks_ahead = st1.masks_ahead - st0.masks_ahead,
           masks_s = st1.masks_ahead_s - st0.masks_ahead_s, busy_s = st1.busy_s - st0.busy_s }
end

local rows, json = {}, {}
for _, C in ipairs(levels) do
  local eng = gptoss.engine(m, { max_batch = C, prefix_cache = 0, context = 1024 })
  round(eng, C, KINDS[1])   -- warm-up
  for _, kind in ipairs(KINDS) do
    local rs = {}
    for r = 1, ROUNDS do rs[r] = round(eng, C, kind) end
    table.sort(rs, function(a, b) return a.tok_s < b.tok_s end)
    local r = rs[math.ceil(#rs / 2)]
    rows[#rows + 1] = string.format("| %d | %s | %.1f | %d of %d | %.1f | %.1f |", C, kind.name, r.tok_s,
      r.masks_ahead, r.tokens, r.masks_s * 1e3, r.busy_s * 1e3)
    json[#json + 1] = { concurrency = C, kind = kind.name, result = r }
  end
  eng:close()
end
W.report(string.format("constrained decoding through the engine (%s, %s; prompt 256, output up to %d, median of %d rounds)",
  dir, device, OUT, ROUNDS), { "streams", "constraint", "out tok/s", "masks computed ahead", "their ms", "forward ms" }, rows, json)
