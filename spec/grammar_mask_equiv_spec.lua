-- Token masks (csrc/grammar_mask.c) against a per-token reference. Over
-- every schema of spec/fixtures/grammar/schemas.txt and the GBNF grammars
-- of spec/grammar_spec.lua, seeded random paths go through the grammar; at
-- every step the mask over the whole vocabulary is checked against a
-- second matcher of the same grammar that never computes a mask, asked
-- token by token whether the token's bytes keep the text in the language
-- (m:would_accept: the plain byte by byte transitions, none of the mask's
-- walks, splits, local grammars or their cache). Every allowed token is
-- checked, and a sample of the others (every one-byte token and a random
-- few thousand). The masks of all the grammars share one vocabulary, so
-- its cache of local grammars is filled by one grammar and used by the
-- next; a second vocabulary (an empty cache) must give the same masks.
local H = require "helpers"
local gptoss = require "gptoss"
local core = gptoss.core
local schema = require "gptoss.schema"

local V = 201088
local END = 200002   -- <|return|>

-- llama.cpp's example grammars (spec/fixtures/grammar/, as
-- spec/grammar_spec.lua reads them) and its whole-vocabulary checks
local GBNF = {}
for _, name in ipairs { "arithmetic", "list", "json" } do
  GBNF[#GBNF + 1] = H.read("spec/fixtures/grammar/" .. name .. ".gbnf")
end
for _, text in ipairs {
  'root ::= [0-9]+ "!"',
  'root ::= "ab" | "abc" "d"*',
  'root ::= [a-c]{2,3} "."',
} do GBNF[#GBNF + 1] = text end

local function schema_grammars()
  local out = {}
  for line in io.lines("spec/fixtures/grammar/schemas.txt") do
    if line ~= "" and line:sub(1, 1) ~= "#" then
      out[#out + 1] = { name = line, text = schema.to_gbnf(line, { max_string = 16, max_items = 4, max_properties = 3 }) }
    end
  end
  return out
end

-- xorshift: the same paths under Lua 5.4 and LuaJIT
local function rng(seed)
  local x = seed
  return function(n)
    x = (x * 1103515245 + 12345) % 2147483648
    return x % n + 1
  end
end

describe("grammar masks", function()
  local tok, bytes, special, onebyte
  setup(function()
    tok = assert(gptoss.tokenizer(H.tokenizer_dir .. "/tokenizer.json"))
    bytes, special, onebyte = {}, {}, {}
    for id = 0, V - 1 do
      special[id] = tok:is_special(id)
      bytes[id] = special[id] and "" or tok:decode_bytes({ id })
      if #bytes[id] == 1 then onebyte[#onebyte + 1] = id end
    end
    assert.are.equal(256, #onebyte)
  end)

  -- Walks steps tokens through g; checks every mask against the reference
  -- and returns the masks' allowed counts (for comparing vocabularies).
  local function check_path(g, voc, seed, steps, label)
    local m = core.matcher(g, voc, { END })
    local ref = core.matcher(g, voc, { END })
    local pick = rng(seed)
    local counts = {}
    for step = 1, steps do
      local count = m:mask()
      local ids = m:allowed()
      assert.are.equal(count, #ids)
      counts[step] = count
      local allowed = {}
      for _, id in ipairs(ids) do
        allowed[id] = true
        local want
        if id == END then want = ref:accepting()
        else want = not special[id] and #bytes[id] > 0 and ref:would_accept(bytes[id]) end
        if not want then
          error(string.format("%s, step %d: the mask allows token %d %q, the reference does not", label, step, id, bytes[id]))
        end
      end
      local function refused(id)
        if allowed[id] then return end
        local want
        if id == END then want = ref:accepting()
        else want = not special[id] and #bytes[id] > 0 and ref:would_accept(bytes[id]) end
        if want then
          error(string.format("%s, step %d: the mask refuses token %d %q, the reference takes it", label, step, id, bytes[id]))
        end
      end
      refused(END)
      for _, id in ipairs(onebyte) do refused(id) end
      for _ = 1, 2000 do refused(pick(V) - 1) end
      if count == 0 then break end
      -- mostly inside the grammar's text, ending now and then
      local id = ids[pick(#ids)]
      if id == END and #ids > 1 and pick(4) > 1 then id = ids[pick(#ids)] end
      if id == END then break end
      assert(m:accept(id))
      assert(ref:accept(id))
    end
    m:close()
    ref:close()
    return counts
  end

  it("every schema's masks along random paths are the tokens whose bytes the grammar takes", function()
    local voc = core.vocab(tok, V)
    for i, c in ipairs(schema_grammars()) do
      local g = core.grammar(c.text)
      check_path(g, voc, i, 10, "schema " .. c.name)
      -- a second matcher of the grammar: local grammars now kept
      check_path(g, voc, 1000 + i, 6, "schema " .. c.name .. " (again)")
    end
  end)

  it("llama.cpp's grammars and the whole-vocabulary cases likewise", function()
    local voc = core.vocab(tok, V)
    for i, text in ipairs(GBNF) do
      local g = core.grammar(text)
      for seed = 1, 3 do check_path(g, voc, 100 * i + seed, 25, "gbnf " .. i) end
    end
  end)

  it("a vocabulary with nothing kept yet gives the same masks as one that has seen every schema", function()
    local seen = core.vocab(tok, V)
    local list = schema_grammars()
    for i = 1, #list do check_path(core.grammar(list[i].text), seen, 7 * i, 4, "warm-up") end
    for i = 1, #list, 9 do
      local g = core.grammar(list[i].text)
      local fresh = core.vocab(tok, V)
      local a = check_path(g, fresh, 31 * i, 8, "schema " .. list[i].name .. " (fresh vocabulary)")
      local b = check_path(g, seen, 31 * i, 8, "schema " .. list[i].name .. " (seen vocabulary)")
      assert.are.same(a, b)
    end
  end)

  it("m:would_accept leaves the matcher where it was and names bad arguments", function()
    local voc = core.vocab(tok, V)
    local m = core.matcher(core.grammar('root ::= "ab" "c"'), voc)
    assert.is_true(m:would_accept("a"))
    assert.is_true(m:would_accept("abc"))
    assert.is_false(m:would_accept("abd"))
    assert.is_false(m:would_accept("b"))
    assert.is_true(m:accept_bytes("a"))
    assert.is_true(m:would_accept("bc"))
    assert.is_false(m:would_accept("a"))
    local ok, err = pcall(m.would_accept, m, {})
    assert.is_false(ok)
    assert.matches("m:would_accept", err)
  end)
end)
