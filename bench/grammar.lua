-- Constrained decoding's costs on this CPU: compiling each schema of
-- spec/fixtures/grammar/schemas.txt (JSON Schema -> GBNF -> grammar) and the
-- token mask over the whole vocabulary at every step of a walk through
-- the grammar, each step taking a token the mask allowed (seeded random
-- choice, as a sampler over noise would). Mask times are per call of
-- gptoss_matcher_mask (the bitmask; applying it to logits is not counted).
-- Twice: with the schema options users get by default, and with strings,
-- arrays and objects bounded as the specs bound them.
--   luajit bench/grammar.lua [tokenizer_dir] [steps_per_schema]
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/" .. (jit and "luajit" or "lua5.4") .. "/?.so;" .. package.cpath
local core = require "gptoss.core"
local schema = require "gptoss.schema"

local dir = arg[1] or "tokenizer"
local steps = tonumber(arg[2] or "40")
local tok = assert(core.tokenizer(dir .. "/tokenizer.json"))
local V = 201088
local clock = os.clock
local ret = tok:special("<|return|>")

local function stats(t)
  table.sort(t)
  local s = 0
  for _, v in ipairs(t) do s = s + v end
  local function q(p) return t[math.max(1, math.ceil(p * #t))] end
  return s / #t, q(0.5), q(0.99), t[#t]
end

-- one pass over the schemas with these schema options, on a vocabulary of
-- its own (its cache of local grammars starts empty)
local function run(label, opts)
  local t0 = clock()
  local voc = core.vocab(tok, V)
  local trie_s = clock() - t0
  local compile, masks = {}, {}
  local n = 0
  math.randomseed(1)
  for line in io.lines("spec/fixtures/grammar/schemas.txt") do
    if line ~= "" and line:sub(1, 1) ~= "#" then
      n = n + 1
      local c0 = clock()
      local text = schema.to_gbnf(line, opts)
      local g = core.grammar(text)
      compile[#compile + 1] = clock() - c0
      local m = core.matcher(g, voc, { ret })
      for _ = 1, steps do
        local count, dt = m:mask()
        masks[#masks + 1] = dt
        if count == 0 then break end
        local ids = m:allowed()
        local id = ids[math.random(#ids)]
        if id == ret then break end
        assert(m:accept(id))
      end
    end
  end
  print(string.format("%s: vocabulary %d tokens, trie built in %.1f ms; schemas %d; masks %d", label, V, trie_s * 1e3, n, #masks))
  local mean, p50, p99, mx = stats(masks)
  print(string.format("  mask    mean %7.1f us  p50 %7.1f us  p99 %8.1f us  max %8.1f us", mean * 1e6, p50 * 1e6, p99 * 1e6, mx * 1e6))
  mean, p50, p99, mx = stats(compile)
  print(string.format("  compile mean %7.2f ms  p50 %7.2f ms  p99 %8.2f ms  max %8.2f ms", mean * 1e3, p50 * 1e3, p99 * 1e3, mx * 1e3))
end

-- the options users get by default (strings, arrays and objects as long as
-- the schema allows: unbounded unless it bounds them), then bounds on all
-- three, as the specs set them: each bounded length is a local grammar of
-- its own, so first masks inside strings are more often walks of the trie
run("default options", nil)
run("bounded (max_string 16, max_items 4, max_properties 3)", { max_string = 16, max_items = 4, max_properties = 3 })
