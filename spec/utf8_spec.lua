-- UTF-8 (csrc/utf8.c) through the binding, the tokenizer's streaming
-- decoder and harmony's stream parser. The oracle is the Unicode standard's
-- U+FFFD substitution of maximal subparts (chapter 3, table 3-8), which is
-- what Python's bytes.decode("utf-8", "replace") produces; every expected
-- string below is worked out by hand from table 3-7 (the well-formed byte
-- sequences) and that rule.
local H = require "helpers"
local core = require "gptoss.core"
local gptoss = require "gptoss"
local harmony = require "gptoss.harmony"

local R = "\xEF\xBF\xBD"   -- U+FFFD

-- { bytes, what Python's decode(errors="replace") gives, why }
local CASES = {
  { "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80", "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80", "2-, 3- and 4-byte sequences" },
  { "\xC2\x80\xE0\xA0\x80\xED\x9F\xBF\xEE\x80\x80\xF0\x90\x80\x80\xF4\x8F\xBF\xBF",
    "\xC2\x80\xE0\xA0\x80\xED\x9F\xBF\xEE\x80\x80\xF0\x90\x80\x80\xF4\x8F\xBF\xBF",
    "the edges: U+0080, U+0800, U+D7FF, U+E000, U+10000, U+10FFFF" },
  { "\xC0\xAF", R .. R, "overlong '/' in 2 bytes: C0 never leads" },
  { "\xE0\x80\xAF", R .. R .. R, "overlong in 3 bytes: E0 takes A0..BF next" },
  { "\xF0\x80\x80\xAF", R .. R .. R .. R, "overlong in 4 bytes: F0 takes 90..BF next" },
  { "\xED\xA0\x80", R .. R .. R, "the surrogate U+D800: ED takes 80..9F next" },
  { "\xED\xBF\xBF", R .. R .. R, "the surrogate U+DFFF" },
  { "\xF4\x90\x80\x80", R .. R .. R .. R, "U+110000: F4 takes 80..8F next" },
  { "\xF5\x80\x80\x80", R .. R .. R .. R, "F5 never leads" },
  { "\xFE\xFF", R .. R, "FE and FF never occur" },
  { "\x80\xBF", R .. R, "lone continuation bytes, one each" },
  { "a\xE2\x82", "a" .. R, "a 3-byte sequence cut short at the end: one for both bytes" },
  { "\xF0\x9F\x98", R, "a 4-byte sequence cut short at the end" },
  { "\xE2\x82a", R .. "a", "cut short by an ASCII byte" },
  { "\xE2\x82\xE2\x82\xAC", R .. "\xE2\x82\xAC", "cut short by the next sequence's lead" },
  { "a\xF1\x80\x80\xE1\x80\xC2b\x80c\x80\xBFd", "a" .. R .. R .. R .. "b" .. R .. "c" .. R .. R .. "d",
    "the standard's table 3-8 example" },
  { "", "", "nothing" },
}

describe("UTF-8", function()
  it("replaces each maximal ill-formed subpart with one U+FFFD", function()
    for _, c in ipairs(CASES) do
      assert.are.equal(c[2], core.utf8_clean(c[1]), c[3])
    end
  end)

  it("gives the valid prefix and the first ill-formed subpart, nil while more bytes could complete it", function()
    local function check(s) return { core.utf8_check(s) } end
    assert.are.same({ 10 }, check("a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"))
    assert.are.same({ 0 }, check(""))
    assert.are.same({ 2 }, check("ab\xE2\x82"))          -- cut short: wait
    assert.are.same({ 0 }, check("\xF4\x8F\xBF"))        -- U+10FFFF so far
    assert.are.same({ 2, 2 }, check("ab\xE2\x82x"))
    assert.are.same({ 2, 1 }, check("ab\xED\xA0\x80"))   -- ED A0 can never be completed
    assert.are.same({ 0, 1 }, check("\xC0"))             -- nor can C0, even alone at the end
    assert.are.same({ 0, 1 }, check("\xF4\x90"))
    assert.are.same({ 1, 3 }, check("a\xF1\x80\x80\xE1"))
  end)

  it("measures the sequence cut short at the end, which a stream holds back", function()
    local want = {
      { "a\xE2", 1 }, { "a\xE2\x82", 2 }, { "a\xE2\x82\xAC", 0 }, { "\xF0\x9F\x98", 3 }, { "\xF0\x9F\x98\x80", 0 },
      { "\xF4\x8F\xBF", 3 }, { "\xE0\x80", 0 }, { "\xED\xA0", 0 }, { "\xF4\x90", 0 }, { "\xC0", 0 }, { "\x80", 0 },
      { "abc", 0 }, { "", 0 }, { "\xE2\x82\xAC\xE2", 1 },
    }
    for _, w in ipairs(want) do
      assert.are.equal(w[2], core.utf8_tail(w[1]), string.format("%q", w[1]))
    end
  end)

  describe("in the streaming decoder", function()
    local tok
    setup(function() tok = assert(gptoss.tokenizer(H.tokenizer_dir)) end)

    -- feeds s one byte token at a time; every piece fed and the flush
    local function stream(s)
      local d, out = tok:decoder(), {}
      for i = 1, #s do out[i] = d:feed(tok:encode(s:sub(i, i), { bytes = true })[1]) end
      out[#out + 1] = d:flush()
      return out
    end

    it("gives what a whole decode gives, fed a byte at a time", function()
      for _, c in ipairs(CASES) do
        assert.are.equal(c[2], table.concat(stream(c[1])), c[3])
      end
    end)

    it("holds back only what more bytes could complete", function()
      assert.are.same({ "", "", "\xE2\x82\xAC", "" }, stream("\xE2\x82\xAC"))
      -- E0 80 can never be completed: both come out at the second byte
      assert.are.same({ "", R .. R, "a", "" }, stream("\xE0\x80a"))
      assert.are.same({ "", R .. "A", "" }, stream("\xE2A"))
    end)
  end)

  describe("in harmony's stream parser", function()
    local function content(bytes_list)
      local p, deltas = harmony.stream_parser { role = "assistant" }, {}
      p:process_unit { s = "<|message|>" }
      for _, b in ipairs(bytes_list) do
        p:process_unit { b = b }
        deltas[#deltas + 1] = p.last_content_delta or ""
      end
      p:process_unit { s = "<|end|>" }
      return p.messages[1].content, deltas
    end

    it("replaces as a whole decode does, whatever the split", function()
      for _, c in ipairs(CASES) do
        local bytes = {}
        for i = 1, #c[1] do bytes[i] = c[1]:sub(i, i) end
        assert.are.equal(c[2], (content(bytes)), c[3])
        assert.are.equal(c[2], (content { c[1] }), c[3])
      end
    end)

    it("waits for a split sequence and replaces at most one subpart per token, as harmony does", function()
      local _, deltas = content { "\xE2", "\x82", "\xAC" }
      assert.are.same({ "", "", "\xE2\x82\xAC" }, deltas)
      -- two ill-formed subparts in one token: one U+FFFD now, the other with
      -- the next token, whose own text then waits for the one after
      local text
      text, deltas = content { "\xC0\xC0", "a", "b" }
      assert.are.same({ R, R, "ab" }, deltas)
      assert.are.equal(R .. R .. "ab", text)
    end)
  end)
end)
