-- JSON Schema constraints (gptoss.schema, gptoss.constraint): on the tiny
-- random checkpoint, whose unconstrained output is noise, every constrained
-- generation must parse and validate against its schema by ajv (draft
-- 2020-12, with ajv-formats), installed by npm into the git-ignored
-- node_modules and run by spec/support/ajv_validate.cjs.
local H = require "helpers"
local gptoss = require "gptoss"
local json = require "gptoss.json"
local schema = require "gptoss.schema"

local sh = require("support.npm").sh

local function install_ajv() assert(require("support.npm").install()) end

-- the schemas, one JSON text per line: schemas.txt (bench/grammar.lua's
-- too), then schemas_more.txt; and how many came from schemas.txt
local function schemas()
  local out, first = {}, nil
  for _, file in ipairs { "spec/fixtures/grammar/schemas.txt", "spec/fixtures/grammar/schemas_more.txt" } do
    for line in io.lines(file) do
      if line ~= "" and line:sub(1, 1) ~= "#" then out[#out + 1] = line end
    end
    first = first or #out
  end
  return out, first
end

-- validates { {schema = text, text = text}, ... } with ajv; returns per-case results
local ajv = require("support.ajv").validate

local body = H.reply_bytes

-- JSON text with its strings taken out
local function outside_strings(text)
  local out, i, n = {}, 1, #text
  while i <= n do
    local c = text:sub(i, i)
    if c == '"' then
      i = i + 1
      while i <= n and text:sub(i, i) ~= '"' do i = i + (text:sub(i, i) == "\\" and 2 or 1) end
    else out[#out + 1] = c end
    i = i + 1
  end
  return table.concat(out)
end

local LIMITS = { max_string = 6, max_items = 3, max_properties = 2 }

local function expect_valid(cases, results, what)
  local bad = {}
  for i, r in ipairs(results) do
    if not r.ok then bad[#bad + 1] = string.format("%s %d: %s\n  schema %s\n  text %q", what, i, r.error, cases[i].schema, cases[i].text) end
  end
  assert(#bad == 0, table.concat(bad, "\n"))
end

describe("json_schema constraints", function()
  local model
  setup(function()
    install_ajv()
    model = assert(gptoss.load(H.tiny()))
  end)
  teardown(function() if model then model:close() end end)

  it("the unconstrained output is noise (so the constraint is what makes it JSON)", function()
    local prompt = model.tokenizer:encode("Answer in JSON:")
    local r = model:generate(prompt, { max_tokens = 30, seed = 3 })
    local res = ajv({ { schema = "{}", text = body(model, r) } })
    assert.is_false(res[1].ok)
  end)

  it("every schema's generation validates with ajv: all at once through the engine, mixed constraints in one batch", function()
    local list = schemas()
    assert.is_true(#list >= 140)
    local distinct, n = {}, 0
    for _, s in ipairs(list) do
      local key = json.encode_compact(json.decode(s))
      if not distinct[key] then distinct[key] = true; n = n + 1 end
    end
    assert.are.equal(#list, n, "a schema is listed twice")
    local eng = gptoss.engine(model, { max_batch = #list, max_queue = #list })
    finally(function() eng:close() end)
    local prompt = model.tokenizer:encode("Answer in JSON:")
    local reqs = {}
    for i, s in ipairs(list) do
      reqs[i] = assert(eng:submit(prompt, { json_schema = s, seed = i, max_tokens = 400,
        json_options = { max_string = 6, max_items = 3, max_properties = 2, compact = i % 3 == 0 } }))
    end
    local cases = {}
    for i, req in ipairs(reqs) do
      local r = req:result()
      assert.are.equal("stop", r.finish_reason, "schema " .. list[i] .. " ended by " .. tostring(r.finish_reason))
      cases[i] = { schema = list[i], text = body(model, r) }
      if i % 3 == 0 then   -- compact: no whitespace outside strings
        assert.is_nil(outside_strings(cases[i].text):find("%s"), "compact output has whitespace: " .. cases[i].text)
      end
    end
    expect_valid(cases, ajv(cases), "engine")
  end)

  it("model:generate, model:stream and gptoss.chat obey json_schema (Lua tables and JSON text)", function()
    local list, n_first = schemas()
    local prompt = model.tokenizer:encode("Answer in JSON:")
    local cases = {}
    -- a sample of about 13 (the engine test above takes them all)
    for i = 1, #list, math.ceil(#list / 13) do
      local s = list[i]
      local r = model:generate(prompt, { json_schema = i % 2 == 0 and s or json.decode(s), seed = 100 + i,
        max_tokens = 400, json_options = LIMITS })
      assert.are.equal("stop", r.finish_reason)
      cases[#cases + 1] = { schema = s, text = body(model, r) }
    end
    local s = list[n_first - 2]
    local it, info = model:stream(prompt, { json_schema = s, seed = 9, max_tokens = 400, json_options = LIMITS })
    for _ in it do end
    cases[#cases + 1] = { schema = s, text = body(model, info) }
    -- the reply pinned to the final channel: left free, the random model
    -- never opens it (spec/constraint_harmony_spec.lua covers that path)
    local c = gptoss.chat(model, { { role = "user", content = "Weather in Paris?" } },
      { json_schema = s, seed = 5, max_tokens = 400, json_options = LIMITS, prefill = { channel = "final" } })
    assert.are.equal("stop", c.finish_reason)
    cases[#cases + 1] = { schema = s, text = c.final }
    local batch = model:generate_batch({ prompt, prompt }, { json_schema = s, seed = 11, max_tokens = 400, json_options = LIMITS })
    for _, r in ipairs(batch) do cases[#cases + 1] = { schema = s, text = body(model, r) } end
    expect_valid(cases, ajv(cases), "generate/stream/chat")
  end)

  it("json = true gives any JSON value", function()
    local prompt = model.tokenizer:encode("JSON:")
    local cases = {}
    for i = 1, 6 do
      local r = model:generate(prompt, { json = true, seed = i, max_tokens = 400, json_options = LIMITS })
      assert.are.equal("stop", r.finish_reason)
      cases[i] = { schema = "{}", text = body(model, r) }
    end
    expect_valid(cases, ajv(cases), "json = true")
  end)

  it("an unsupported keyword is an error naming it and its JSON pointer", function()
    local cases = {
      { '{"not":{"type":"string"}}', "unsupported keyword 'not' at /not" },
      { '{"type":"object","properties":{"a":{"type":"integer","multipleOf":3}}}', "'multipleOf' at /properties/a/multipleOf" },
      { '{"type":"array","uniqueItems":true}', "'uniqueItems' at /uniqueItems" },
      { '{"type":"object","propertyNames":{"maxLength":3}}', "'propertyNames' at /propertyNames" },
      { '{"type":"object","patternProperties":{"^x":{}}}', "'patternProperties' at /patternProperties" },
      { '{"if":{}}', "'if' at /if" },
      { '{"type":"array","contains":{"type":"integer"}}', "'contains' at /contains" },
      { '{"type":"string","format":"ipv6"}', "format 'ipv6' at /format" },
      { '{"type":"number","maximum":3.5}', "'maximum' on a number is not supported" },
      { '{"$ref":"other.json#/a"}', "is not local" },
      { '{"$ref":"#/$defs/missing"}', "points at nothing" },
      { '{"type":"string","pattern":"^(a)\\\\1$"}', "backreference" },
      { '{"type":"string","pattern":"^(?=a)b$"}', "lookaround" },
      { '{"type":"string","pattern":"a\\\\bc"}', "word boundary" },
      { '{"type":"string","pattern":"a^b"}', "anchor" },
      { '{"type":"items","items":[]}', "unknown type 'items' at /type" },
      { '{"properties":{"x":{"dependentRequired":{}}}}', "'dependentRequired' at /properties/x/dependentRequired" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(schema.to_gbnf, c[1])
      assert.is_false(ok, c[1])
      assert.is_truthy(err:find(c[2], 1, true), err .. " (wanted " .. c[2] .. ")")
      assert.is_truthy(err:find("^json_schema: "), err)
    end
    -- through generate: the option named
    local ok, err = pcall(model.generate, model, { 1, 2 }, { json_schema = '{"not":{}}' })
    assert.is_false(ok)
    assert.is_truthy(err:find("generate: json_schema: unsupported keyword 'not' at /not", 1, true), err)
    ok, err = pcall(model.generate, model, { 1, 2 }, { json_schema = "{}", grammar = 'root ::= "a"' })
    assert.is_truthy(err:find("one of json_schema, grammar and json", 1, true), err)
    ok, err = pcall(model.generate, model, { 1, 2 }, { json = true, json_options = { max_string = -1 } })
    assert.is_truthy(err:find("json_options.max_string must be an integer >= 0 (got -1)", 1, true), err)
  end)

  it("integer bounds: each integer in a window is accepted exactly when it is in range", function()
    local core = gptoss.core
    local voc = core.vocab(model.tokenizer, model.config.vocab_size)
    for _, b in ipairs { { 0, 150 }, { -37, 1233 }, { 7, 7 }, { -500, -20 }, { 99, 1001 }, { nil, -3 }, { 40, nil }, { -9, 9 } } do
      local lo, hi = b[1], b[2]
      local g = core.grammar("root ::= " .. schema.int_range(lo, hi))
      for v = -1300, 1300 do
        local m = core.matcher(g, voc)
        local ok = (m:accept_bytes(tostring(v)) and m:accepting()) and true or false
        local want = (lo == nil or v >= lo) and (hi == nil or v <= hi)
        assert(ok == want, string.format("%d in [%s, %s]: matcher says %s", v, tostring(lo), tostring(hi), tostring(ok)))
        m:close()
      end
      -- leading zeros and "-0" are no JSON integers of the range
      local m = core.matcher(g, voc)
      assert.is_falsy(m:accept_bytes("-0") and m:accepting())
    end
  end)
end)
