-- GBNF grammars (csrc/gbnf.c, csrc/grammar.c): llama.cpp's example
-- grammars, written out here, constrain the tiny random checkpoint, and an
-- LPeg parser of each language (not the mask code) checks every output;
-- the mask is checked token by token against Lua patterns over the whole
-- vocabulary; bad grammars fail naming line, column and rule.
local H = require "helpers"
local gptoss = require "gptoss"
local lpeg = require "lpeg"
local P, R, S, V = lpeg.P, lpeg.R, lpeg.S, lpeg.V

-- llama.cpp's example grammars (grammars/arithmetic.gbnf, list.gbnf,
-- json.gbnf), in spec/fixtures/grammar/
local ARITHMETIC = H.read("spec/fixtures/grammar/arithmetic.gbnf")
local LIST = H.read("spec/fixtures/grammar/list.gbnf")
local JSON = H.read("spec/fixtures/grammar/json.gbnf")

-- (arithmetic's ws, ident and num are bounded here, unbounded in
-- llama.cpp's: the random model would otherwise never end a line)
-- the same languages in LPeg, written from the grammars' meaning
local ws_ar = S" \t\n"^-2
local arith = P{ "root",
  root = (V"expr" * "=" * ws_ar * V"term" * "\n")^1 * -1,
  expr = V"term" * (S"-+*/" * V"term")^0,
  term = V"ident" + V"num" + "(" * ws_ar * V"expr" * ")" * ws_ar,
  ident = R"az" * (R("az", "09") + "_")^-3 * ws_ar,
  num = R"09" * R"09"^-3 * ws_ar,
}
local utf8_char = R"\0\127" + R"\194\223" * R"\128\191" + R"\224\239" * R"\128\191" * R"\128\191"
  + R"\240\244" * R"\128\191" * R"\128\191" * R"\128\191"
local line_break = S"\r\n\11\12" + P"\194\133" + P"\226\128\168" + P"\226\128\169"
local list = (P"- " * (utf8_char - line_break)^1 * "\n")^1 * -1
local ws_j = P"" * (P" " + "\n" * S" \t"^-20)^-1
local hex = R("09", "af", "AF")
local jstring = '"' * ((utf8_char - S'"\\' - R"\0\31" - "\127") + "\\" * (S'"\\bfnrt' + "u" * hex * hex * hex * hex))^0 * '"' * ws_j
local jnumber = P"-"^-1 * (R"19" * R"09"^-15 + R"09") * ("." * R"09"^1)^-1 * (S"eE" * S"-+"^-1 * R"09" * R"19"^-15)^-1 * ws_j
local jgrammar = P{ "root",
  root = V"object" * -1,
  value = V"object" + V"array" + jstring + jnumber + (P"true" + "false" + "null") * ws_j,
  object = "{" * ws_j * (jstring * ":" * ws_j * V"value" * ("," * ws_j * jstring * ":" * ws_j * V"value")^0)^-1 * "}" * ws_j,
  array = "[" * ws_j * (V"value" * ("," * ws_j * V"value")^0)^-1 * "]" * ws_j,
}

local body = H.reply_bytes

describe("GBNF grammars", function()
  local model, voc
  setup(function()
    model = assert(gptoss.load(H.tiny()))
    voc = gptoss.core.vocab(model.tokenizer, model.config.vocab_size)
  end)
  teardown(function() if model then model:close() end end)

  for _, case in ipairs { { "arithmetic", ARITHMETIC, arith }, { "list", LIST, list }, { "json", JSON, jgrammar } } do
    it("llama.cpp's " .. case[1] .. " grammar: every generation is in its language (an LPeg parser says)", function()
      local prompt = model.tokenizer:encode("Write:")
      local ended = 0
      for seed = 1, 12 do
        local r = model:generate(prompt, { grammar = case[2], seed = seed, max_tokens = 120 })
        local text = body(model, r)
        if r.finish_reason == "stop" then
          ended = ended + 1
          assert(case[3]:match(text), case[1] .. ": not in the language: " .. string.format("%q", text))
        else
          -- cut short: still a prefix of the language, and never broken UTF-8 or a forbidden byte
          assert.are.equal("length", r.finish_reason)
        end
        -- unconstrained, the same seed gives text outside the language
        local free = model:generate(prompt, { seed = seed, max_tokens = 20 })
        assert.is_nil(case[3]:match(body(model, free)))
      end
      if case[1] == "list" then assert(ended > 0, case[1] .. ": no generation ended") end
    end)
  end

  it("the mask allows exactly the tokens whose bytes keep the text in the language (whole vocabulary)", function()
    local core = gptoss.core
    local tok = model.tokenizer
    local V = model.config.vocab_size
    local checks = {
      -- grammar, text so far, a Lua predicate on a token's bytes (independent of the matcher)
      { "root ::= [0-9]+ \"!\"", "", function(b) return b:match("^%d+!?$") ~= nil end },
      { "root ::= [0-9]+ \"!\"", "12", function(b) return b:match("^%d*!?$") ~= nil end },
      { 'root ::= "ab" | "abc" "d"*', "", function(b) return ("ab"):sub(1, #b) == b or b:match("^abcd*$") ~= nil or ("abc"):sub(1, #b) == b end },
      { 'root ::= [a-c]{2,3} "."', "a", function(b) return b:match("^[a-c]?[a-c]?%.?$") ~= nil and #b:match("^[a-c]*") <= 2 and (b:find("%.") == nil or #b:match("^[a-c]*") >= 1) end },
    }
    for _, c in ipairs(checks) do
      local m = core.matcher(core.grammar(c[1]), voc)
      assert(m:accept_bytes(c[2]))
      m:mask()
      local allowed = 0
      for id = 0, V - 1 do
        local want = false
        if not tok:is_special(id) then
          local b = tok:decode_bytes({ id })
          want = #b > 0 and c[3](b)
        end
        local got = m:allows(id)
        if want ~= got then error(string.format("%s after %q: token %d %q: mask %s, oracle %s", c[1], c[2], id, tok:decode_bytes({ id }), tostring(got), tostring(want))) end
        if got then allowed = allowed + 1 end
      end
      assert(allowed > 0)
    end
  end)

  it("ids the grammar forbids are never sampled, even pushed by logit_bias", function()
    local tok = model.tokenizer
    local prompt = tok:encode("Say yes or no:")
    local push = {}
    for _, w in ipairs { "maybe", " yes", "Yes", "{", "0" } do push[tok:encode(w)[1]] = 100 end
    for seed = 1, 10 do
      for _, t in ipairs { 1.0, 0 } do
        local r = model:generate(prompt, { grammar = 'root ::= "yes" | "no"', seed = seed, temperature = t,
          logit_bias = push, max_tokens = 10 })
        assert.are.equal("stop", r.finish_reason)
        local text = body(model, r)
        assert.is_truthy(text == "yes" or text == "no", text)
      end
    end
    -- a bias of -inf on every allowed token leaves them equally likely, not the forbidden ones
    local ban = {}
    for _, w in ipairs { "yes", "no", "y", "n", "ye" } do ban[tok:encode(w)[1]] = -math.huge end
    local r = model:generate(prompt, { grammar = 'root ::= "yes" | "no"', seed = 3, logit_bias = ban, max_tokens = 10 })
    local text = body(model, r)
    assert.is_truthy(text == "yes" or text == "no", text)
  end)

  it("bad grammars fail naming the line, column and rule", function()
    local cases = {
      { 'root ::= "abc', "line 1 col 10: unterminated literal (in rule 'root')" },
      { 'root ::= a\na ::= [z-a]', "line 2 col 7: character range is backwards (U+007A-U+0061) (in rule 'a')" },
      { 'root ::= missing', "line 1 col 10: undefined rule 'missing'" },
      { 'root ::= "a"\nroot ::= "b"', "line 2 col 1: rule 'root' is defined twice" },
      { 'root ::= ("a" | "b"', "line 1 col 10: unclosed '('" },
      { 'root "a"', "line 1 col 6: '::=' expected after the rule's name" },
      { 'root ::= "a"{3,1}', "line 1 col 13: repetition {3,1} has its maximum below its minimum (in rule 'root')" },
      { 'root ::= * "a"', "line 1 col 10: '*' follows nothing to repeat (in rule 'root')" },
      { 'root ::= "\\q"', "line 1 col 11: unknown escape '\\q' (in rule 'root')" },
      { 'root ::= x "a"\nx ::= x "b" | "c"', "rule 'x' is left recursive" },
      { 'start ::= "a"', "no rule named 'root'" },
      { 'root ::= []', "empty character class" },
      { 'root ::= "a" @', "line 1 col 14: unexpected character '@' (in rule 'root')" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(gptoss.core.grammar, c[1])
      assert.is_false(ok, c[1])
      assert.is_truthy(err:find(c[2], 1, true), err .. "\n(wanted " .. c[2] .. ")")
    end
    -- through generate, named
    local ok, err = pcall(model.generate, model, { 1, 2 }, { grammar = 'root ::= "abc' })
    assert.is_false(ok)
    assert.is_truthy(err:find("generate: grammar: line 1 col 10: unterminated literal", 1, true), err)
  end)
end)
