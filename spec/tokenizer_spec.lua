-- The tokenizer against tiktoken (ids made on the device by
-- tools/reference/tokenizer_ids.py from the same tokenizer.json) over 2.5 MB
-- of text the project did not write, and against published vectors.
local H = require "helpers"
local gptoss = require "gptoss"

local CORPUS = "spec/fixtures/tokenizer/corpus"
local EXPECTED = "spec/fixtures/tokenizer/expected"

local function u32s(data)
  local ids = {}
  for i = 1, #data, 4 do
    local a, b, c, d = data:byte(i, i + 3)
    ids[#ids + 1] = a + b * 256 + c * 65536 + d * 16777216
  end
  return ids
end

describe("tokenizer", function()
  local tok
  setup(function() tok = assert(gptoss.tokenizer(H.tokenizer_dir)) end)

  it("matches tiktoken id for id over the whole corpus, and round-trips it", function()
    local files = {}
    for _, f in ipairs(H.files(CORPUS)) do if f:match("%.txt$") then files[#files + 1] = f end end
    local total_bytes, total_ids, mismatched = 0, 0, {}
    for _, f in ipairs(files) do
      local text = H.read(CORPUS .. "/" .. f)
      local want = u32s(H.read(EXPECTED .. "/" .. f:gsub("%.txt$", ".ids")))
      local got = tok:encode(text)
      total_bytes, total_ids = total_bytes + #text, total_ids + #want
      if #got ~= #want then mismatched[#mismatched + 1] = f .. " (length)" else
        for i = 1, #want do
          if got[i] ~= want[i] then mismatched[#mismatched + 1] = string.format("%s (id %d)", f, i); break end
        end
      end
      assert.are.equal(text, tok:decode_bytes(got))
    end
    assert.are.same({}, mismatched)
    assert.is_true(#files >= 40 and total_bytes >= 1e6 and total_ids > 600000)
  end)

  it("gives the published ids", function()
    assert.are.same({ 17, 659, 220, 17, 314, 220, 19, 13 }, tok:encode("2 + 2 = 4."))
    assert.are.same({ 24912, 2375 }, tok:encode("hello world"))
    assert.are.same({ 27, 91, 5236, 91, 29 }, tok:encode("<|start|>"))
    assert.are.same({ 200006 }, tok:encode("<|start|>", { allowed_special = "all" }))
    -- harmony's format doc: a completion, as ids and as text
    local ids = { 200005, 35644, 200008, 1844, 31064, 25, 392, 4827, 382, 220, 17, 659, 220, 17, 16842, 12295, 81645,
                  13, 51441, 6052, 13, 200007, 200006, 173781, 200005, 17196, 200008, 17, 659, 220, 17, 314, 220, 19, 13, 200002 }
    local text = '<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.<|end|>' ..
                 '<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>'
    assert.are.equal(text, tok:decode(ids))
    assert.are.same(ids, tok:encode(text, { allowed_special = "all" }))
  end)

  it("names every special and reserved id, up to 201087", function()
    assert.are.equal(201088, tok.vocab_size)
    assert.are.equal(199998, tok.n_ordinary)
    local named = { [199998] = "<|startoftext|>", [199999] = "<|endoftext|>", [200002] = "<|return|>",
      [200003] = "<|constrain|>", [200005] = "<|channel|>", [200006] = "<|start|>", [200007] = "<|end|>",
      [200008] = "<|message|>", [200012] = "<|call|>", [200018] = "<|endofprompt|>" }
    for id, name in pairs(named) do
      assert.are.equal(name, tok:name(id))
      assert.are.equal(id, tok:special(name))
      assert.is_true(tok:is_special(id))
    end
    for _, id in ipairs { 200000, 200001, 200004, 200009, 200013, 200014, 200017, 200019, 201087 } do
      assert.are.equal("<|reserved_" .. id .. "|>", tok:name(id))
      assert.are.equal(id, tok:special("<|reserved_" .. id .. "|>"))
    end
    assert.is_nil(tok:special("<|reserved_201088|>"))
    assert.is_nil(tok:special("hello"))
    assert.is_false(tok:is_special(24912))
    assert.are.equal("hello", tok:name(24912))
  end)

  it("recognises only the allowed specials", function()
    local s = "<|start|>user<|message|>hi<|end|>"
    local function cat(...)
      local out = {}
      for _, part in ipairs { ... } do
        if type(part) == "number" then out[#out + 1] = part
        else for _, id in ipairs(tok:encode(part)) do out[#out + 1] = id end end
      end
      return out
    end
    assert.are.same(cat(200006, "user<|message|>hi<|end|>"), tok:encode(s, { allowed_special = { "<|start|>" } }))
    assert.are.same(cat(200006, "user", 200008, "hi", 200007), tok:encode(s, { allowed_special = "all" }))
    assert.are.same(cat(s), tok:encode(s))
    assert.has_error(function() tok:encode(s, { allowed_special = { "<|nope|>" } }) end,
      "tok:encode: allowed_special[1] must be a special token name (got <|nope|>)")
    assert.has_error(function() tok:encode(s, { allowed_specials = "all" }) end, "tok:encode: unknown option 'allowed_specials'")
  end)

  it("rejects invalid UTF-8 with its byte offset, and encodes it in bytes mode", function()
    local bad = "ok \xE2\x82 then \xFF"
    assert.has_error(function() tok:encode(bad) end,
      "invalid UTF-8 at byte offset 3 (pass bytes mode to encode raw bytes)")
    local ids = tok:encode(bad, { bytes = true })
    assert.are.equal(bad, tok:decode_bytes(ids))
    assert.are.equal("ok \xEF\xBF\xBD then \xEF\xBF\xBD", tok:decode(ids))
  end)

  it("raises on ids outside the vocabulary", function()
    assert.has_error(function() tok:decode({ 1, 201088 }) end,
      "tok:decode: token id 201088 at index 2 is outside the vocabulary (0..201087)")
    assert.has_error(function() tok:decode({ -1 }) end)
    assert.has_error(function() tok:decode({ 1.5 }) end, "tok:decode: ids[1] must be an integer in -2147483648..2147483647 (got 1.5)")
    assert.has_error(function() tok:name(99999999) end)
  end)

  it("streams: holds back a split UTF-8 sequence until it completes", function()
    -- byte tokens of U+20AC (E2 82 AC) and of an emoji (F0 9F 98 80)
    local b = {}
    for _, byte in ipairs { 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80 } do b[#b + 1] = tok:encode(string.char(byte), { bytes = true })[1] end
    local d = tok:decoder()
    assert.are.same({ "", "", "\xE2\x82\xAC", "", "", "", "\xF0\x9F\x98\x80" },
      { d:feed(b[1]), d:feed(b[2]), d:feed(b[3]), d:feed(b[4]), d:feed(b[5]), d:feed(b[6]), d:feed(b[7]) })
    -- an unfinished sequence at the end becomes U+FFFD on flush
    d:feed(b[1])
    assert.are.equal("\xEF\xBF\xBD", d:flush())
    -- invalid bytes are replaced, not held
    local d2, out = tok:decoder(), {}
    for _, id in ipairs(tok:encode("\xFFa\xC3", { bytes = true })) do out[#out + 1] = d2:feed(id) end
    out[#out + 1] = d2:flush()
    assert.are.equal("\xEF\xBF\xBDa\xEF\xBF\xBD", table.concat(out))
    -- specials come out by name at once
    assert.are.equal("<|start|>", tok:decoder():feed(200006))
  end)

  it("encodes long runs (the heap merge path) exactly like whole-piece merging of shorter runs", function()
    -- pieces longer than 256 bytes take the O(n log n) path; the corpus
    -- checks them against tiktoken, this checks they round-trip on random text
    local rnd = 12345
    local function r(n) rnd = (rnd * 1103515245 + 12345) % 2147483648; return rnd % n end
    for _ = 1, 50 do
      local len = 200 + r(500)
      local chars = {}
      for i = 1, len do chars[i] = string.char(97 + r(3)) end
      local s = table.concat(chars)
      assert.are.equal(s, tok:decode(tok:encode(s)))
    end
  end)

  it("replays the fuzz corpus without a crash, round-tripping every input", function()
    local dir = "spec/fixtures/fuzz/tokenizer"
    local n = 0
    for _, f in ipairs(H.files(dir)) do
      local data = H.read(dir .. "/" .. f)
      local ids = tok:encode(data, { bytes = true })
      assert.are.equal(data, tok:decode_bytes(ids))
      local sp = tok:encode(data, { bytes = true, allowed_special = "all" })
      assert.are.equal(data, tok:decode_bytes(sp))
      n = n + 1
    end
    assert.is_true(n >= 50, "fuzz corpus has " .. n .. " inputs")
  end)

  it("reports a missing or broken tokenizer.json with nil, message", function()
    local t, err = gptoss.tokenizer("/nonexistent")
    assert.is_nil(t)
    assert.matches("/nonexistent: cannot open", err)
    local d = H.tmpdir()
    H.write(d .. "/tokenizer.json", '{"model": {"type": "WordPiece"}}')
    t, err = gptoss.tokenizer(d)
    assert.is_nil(t)
    assert.matches("model.type is 'WordPiece'; only byte%-level BPE is supported", err)
    H.write(d .. "/tokenizer.json", '{"added_tokens": [1,2,')
    t, err = gptoss.tokenizer(d)
    assert.is_nil(t)
    assert.matches("tokenizer.json: invalid JSON near byte", err)
  end)
end)
