-- gptoss.schema's formats ipv4, hostname, uri, uri-reference and its
-- minProperties / maxProperties, against ajv (with ajv-formats, through
-- spec/support/ajv_verdicts.cjs) as the oracle: over a set of candidate
-- texts, every text the grammar accepts must validate, and where the grammar
-- is exact (ipv4; hostnames inside its length bounds) it must accept every
-- text that validates.
local H = require "helpers"
local gptoss = require "gptoss"
local json = require "gptoss.json"
local schema = require "gptoss.schema"
local unpack = table.unpack or unpack

local sh = require("support.npm").sh

local function install_ajv() assert(require("support.npm").install()) end

-- ajv's verdicts on texts against one schema (JSON text)
local function ajv(schema_text, texts)
  local parts = {}
  for i, t in ipairs(texts) do parts[i] = json.encode_compact(t) end
  local file = H.tmpdir() .. "/count_cases.json"
  H.write(file, '{"schema":' .. schema_text .. ',"texts":[' .. table.concat(parts, ",") .. "]}")
  local out, ok = sh("node spec/support/ajv_verdicts.cjs '" .. file .. "'")
  assert(ok, "ajv_verdicts: " .. out)
  local verdicts = json.decode(out)
  assert.are.equal(#texts, #verdicts)
  return verdicts
end

describe("gptoss.schema: formats ipv4, hostname, uri, uri-reference; minProperties, maxProperties", function()
  local core = gptoss.core
  local model, voc
  setup(function()
    install_ajv()
    model = assert(gptoss.load(H.tiny()))
    voc = core.vocab(model.tokenizer, model.config.vocab_size)
  end)
  teardown(function() if model then model:close() end end)

  -- the grammar's verdicts (compact: no whitespace) on texts
  local function accepts(schema_text, texts)
    local g = core.grammar(schema.to_gbnf(schema_text, { compact = true }))
    local out = {}
    for i, t in ipairs(texts) do
      local m = core.matcher(g, voc)
      out[i] = (m:accept_bytes(t) and m:accepting()) and true or false
      m:close()
    end
    return out
  end

  -- grammar accepts => ajv validates; exact: and the converse
  local function check(schema_text, texts, exact)
    local g, a = accepts(schema_text, texts), ajv(schema_text, texts)
    local n = 0
    for i, t in ipairs(texts) do
      if g[i] then n = n + 1 end
      assert(not g[i] or a[i], schema_text .. ": the grammar accepts " .. t .. ", ajv rejects it")
      if exact then assert(g[i] == a[i], schema_text .. ": " .. t .. " grammar " .. tostring(g[i]) .. ", ajv " .. tostring(a[i])) end
    end
    return g, n
  end

  local function strings(list)
    local out = {}
    for i, s in ipairs(list) do out[i] = json.encode_compact(s) end
    return out
  end

  it("ipv4: exactly ajv-formats' dotted quads (0-255, no leading zeros)", function()
    local list = {}
    for v = 0, 300 do
      list[#list + 1] = "10.0.1." .. v
      list[#list + 1] = v .. ".255.0.9"
    end
    for _, s in ipairs { "01.2.3.4", "1.2.3.00", "1.2.3", "1.2.3.4.5", "1..3.4", "-1.2.3.4", " 1.2.3.4", "1.2.3.4 ",
      "001.2.3.4", "1.2.3.4.", "a.b.c.d", "" } do list[#list + 1] = s end
    local _, n = check('{"type":"string","format":"ipv4"}', strings(list), true)
    assert.are.equal(2 * 256, n)
  end)

  it("hostname: exactly ajv-formats' RFC 1123 names within its bounds (lowercase, labels up to 16)", function()
    -- every string of up to 5 characters over a, 0, -, .
    local list, alphabet = { "" }, { "a", "0", "-", "." }
    local frontier = { "" }
    for _ = 1, 5 do
      local nxt = {}
      for _, p in ipairs(frontier) do
        for _, c in ipairs(alphabet) do nxt[#nxt + 1] = p .. c; list[#list + 1] = p .. c end
      end
      frontier = nxt
    end
    local texts = strings(list)
    -- trailing dots, the 63-character label limit and capitals are beyond the grammar's subset
    for i = #list, 1, -1 do if list[i]:sub(-1) == "." then table.remove(texts, i) end end
    local _, n = check('{"format":"hostname"}', texts, true)
    assert.is_true(n > 100, n)
    local g = check('{"format":"hostname"}', strings { "example.com", "a-b.c-d.e-f.gh", "x" .. ("y"):rep(15),
      "x" .. ("y"):rep(16), "a.b.c.d.e", "Example.com", "ex_ample.com", "-a.com", "a-.com" })
    assert.are.same({ true, true, true, false, false, false, false, false, false }, g)
  end)

  it("uri and uri-reference: a subset of ajv-formats', with the usual shapes", function()
    local list = { "https://example.com", "http://a.b.c:8080/x/y.z?q=1&r=2#top", "ftp://h/%7Efile", "urn://x",
      "https://example.com/", "h+s.x://a//b", "a://b?", "a://b#", "https://ex ample.com", "https://exa\"mple.com",
      "//example.com", "/abs/path?x=1", "#frag", "#", "rel/path", "https://example.com/a\\b", "1http://x",
      "https://example.com/%zz", "https://example.com/%7e", "mailto:someone@example.com", "" }
    local texts = strings(list)
    local g = check('{"format":"uri"}', texts)
    assert.are.same({ true, true, true, true, true, true, true, true }, { unpack(g, 1, 8) })
    for i = 9, #list do if list[i] ~= "https://example.com/%7e" then assert.is_false(g[i], list[i]) end end
    g = check('{"type":"string","format":"uri-reference"}', texts)
    assert.is_true(g[1] and g[2] and g[12] and g[13] and g[14])
    assert.is_false(g[11] or g[9] or g[16])
  end)

  it("minProperties / maxProperties: the grammar's objects have counts in range, and every count in range is reachable", function()
    for _, c in ipairs {
      { '{"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"integer"}},"minProperties":1,"maxProperties":3}', 1, 3 },
      { '{"properties":{"a":{"const":1}},"additionalProperties":false,"minProperties":1}', 1, 1 },
      { '{"type":"object","properties":{"ab":{"type":"integer"}},"required":["ab"],"minProperties":3}', 3, 5 },
      { '{"maxProperties":2}', 0, 2 },
      { '{"type":"object","required":["a"],"properties":{"a":{},"b":{},"c":{}},"additionalProperties":false,"maxProperties":2}', 1, 2 },
    } do
      local s, lo, hi = c[1], c[2], c[3]
      -- objects over keys: declared a, b, ab, c; extras of every length 1-4 (the
      -- grammar's needed extras are longer than every declared name), and a duplicate
      local keys = { "ab", "a", "b", "c", "zzz", "wwww", "x", "yy", "vvvvv" }
      local texts = {}
      local function build(i, chosen)
        if #chosen > 5 then return end
        if i > #keys then
          local kv = {}
          for j, k in ipairs(chosen) do kv[j] = json.encode_compact(k) .. ":1" end
          texts[#texts + 1] = "{" .. table.concat(kv, ",") .. "}"
          return
        end
        build(i + 1, chosen)
        local more = { unpack(chosen) }
        more[#more + 1] = keys[i]
        build(i + 1, more)
      end
      build(1, {})
      texts[#texts + 1] = '{"x":1,"x":1}'
      texts[#texts + 1] = '{"ab":1,"x":1,"x":1}'
      texts[#texts + 1] = '{"ab":1,"xxx":1,"xxx":1}'
      local g = check(s, texts)
      local reached = {}
      for i, t in ipairs(texts) do
        if g[i] then
          local n = 0
          for _ in pairs(json.decode(t)) do n = n + 1 end
          reached[n] = true
        end
      end
      for n = 0, 6 do
        assert((reached[n] or false) == (n >= lo and n <= hi),
          s .. ": " .. n .. " members " .. (reached[n] and "reached" or "not reached"))
      end
    end
  end)

  it("refuses what it cannot count", function()
    for _, c in ipairs {
      { '{"type":"object","properties":{"a":{}},"additionalProperties":false,"minProperties":2}', "minProperties is above what the object can hold at (root)" },
      { '{"type":"object","required":["a","b"],"maxProperties":1}', "maxProperties is below the number of required properties" },
      { '{"minProperties":3,"maxProperties":2}', "minProperties is above maxProperties at /minProperties" },
      { '{"type":"object","minProperties":-1}', "minProperties must be an integer >= 0 at /minProperties" },
      { '{"type":"object","maxProperties":1.5}', "maxProperties must be an integer >= 0 at /maxProperties" },
    } do
      local ok, err = pcall(schema.to_gbnf, c[1])
      assert.is_false(ok, c[1])
      assert.is_truthy(err:find(c[2], 1, true), err .. " (wanted " .. c[2] .. ")")
    end
  end)
end)
