-- Issue 17: a bad argument's message names the function and the parameter,
-- and quotes the number the caller gave exactly. The oracle is the table
-- below (function -> parameter name), written by hand from the API.
local H = require "helpers"
local gptoss = require "gptoss"

local function raises(fn, pattern)
  local ok, err = pcall(fn)
  assert.is_false(ok, "no error; expected " .. pattern)
  err = tostring(err)
  assert(err:find(pattern), ("message %q does not match %q"):format(err, pattern))
end

describe("argument checks", function()
  local tok, m, s, st, w, f
  setup(function()
    tok = assert(gptoss.tokenizer(H.tokenizer_dir))
    m = assert(gptoss.load(H.micro()))
    s = m:session()
    local path = H.tmpdir() .. "/x.safetensors"
    local w1 = gptoss.writer(path)
    w1:add("x", "U8", { 1 }, "\1")
    assert(w1:commit())
    st = assert(gptoss.safetensors(path))
    w = gptoss.writer(H.tmpdir() .. "/y.safetensors")
    f = gptoss.floats(("\0"):rep(4 * 2 * 3), 2, 3)
  end)
  teardown(function() s:close(); m:close(); tok:close(); st:close(); w:close() end)

  -- name -> { call(arg), parameter, takes "int" | "str" }
  local oracle = {
    ["gptoss.tokenizer"] = { function(v) return gptoss.tokenizer(v) end, "path", "str" },
    ["gptoss.load"] = { function(v) return gptoss.load(v) end, "dir", "str" },
    ["tok:encode"] = { function(v) return tok:encode(v) end, "text", "str" },
    ["tok:special"] = { function(v) return tok:special(v) end, "name", "str" },
    ["tok:name"] = { function(v) return tok:name(v) end, "id", "int" },
    ["tok:is_special"] = { function(v) return tok:is_special(v) end, "id", "int" },
    ["s:step"] = { function(v) return s:step(v, gptoss.sampler(1000)) end, "id", "int" },
    ["gptoss.safetensors"] = { function(v) return gptoss.safetensors(v) end, "path", "str" },
    ["gptoss.writer"] = { function(v) return gptoss.writer(v) end, "path", "str" },
    ["gptoss.config_load"] = { function(v) return require("gptoss.core").config_load(v) end, "path", "str" },
    ["st:tensor"] = { function(v) return st:tensor(v) end, "name", "str" },
    ["st:metadata"] = { function(v) return st:metadata(v) end, "key", "str" },
    ["writer:metadata"] = { function(v) return w:metadata(v, "x") end, "key", "str" },
    ["writer:metadata "] = { function(v) return w:metadata("k", v) end, "value", "str" },
    ["gptoss.floats"] = { function(v) return gptoss.floats(v, 0, 0) end, "bytes", "str" },
    ["gptoss.floats "] = { function(v) return gptoss.floats("", v, 0) end, "rows", "int" },
    ["gptoss.floats  "] = { function(v) return gptoss.floats("", 0, v) end, "cols", "int" },
    ["f:row"] = { function(v) return f:row(v) end, "row", "int" },
    ["f:argmax"] = { function(v) return f:argmax(v) end, "row", "int" },
    ["f:get"] = { function(v) return f:get(v, 1) end, "row", "int" },
    ["f:get "] = { function(v) return f:get(1, v) end, "col", "int" },
    ["f:nll"] = { function(v) return f:nll(v, 0) end, "row", "int" },
    ["f:nll "] = { function(v) return f:nll(1, v) end, "id", "int" },
    ["s:rewind"] = { function(v) return s:rewind(v) end, "pos", "int" },
  }

  -- a method's message may start with the caller's position
  local function esc(x) return (x:gsub("%p", "%%%0")) end

  for fn, case in pairs(oracle) do
    local call, param, kind = case[1], case[2], case[3]
    local head = esc(fn:gsub(" +$", "") .. ": " .. param .. " must be ")
    it(fn .. " names " .. param .. " for a wrong type", function()
      raises(function() call({}) end, head .. ".*%(got table%)$")
      raises(function() call(nil) end, head .. ".*%(got nil%)$")
      if kind == "int" then raises(function() call("7") end, head .. ".*%(got 7%)$")
      else raises(function() call(true) end, head .. ".*%(got boolean%)$") end
    end)
    if kind == "int" then
      it(fn .. " quotes a non-integer, NaN, infinite or huge " .. param .. " exactly", function()
        raises(function() call(2.5) end, head .. "an integer in .*%(got 2%.5%)$")
        raises(function() call(0.1) end, head .. "an integer in .*%(got 0%.1%)$")
        raises(function() call(0 / 0) end, head .. "an integer in .*%(got %-?nan%)$")
        raises(function() call(math.huge) end, head .. "an integer in .*%(got inf%)$")
        raises(function() call(-math.huge) end, head .. "an integer in .*%(got %-inf%)$")
        raises(function() call(2 ^ 64) end, head .. "an integer in .*%(got 1%.8446744073709552e%+19%)$")
      end)
    end
  end

  it("quotes 2^53 and a negative position as written", function()
    raises(function() s:rewind(2 ^ 53) end, "s:rewind: pos must be an integer in 0%.%.2147483647 %(got 9007199254740992%)$")
    raises(function() s:rewind(-1) end, "s:rewind: pos must be an integer in 0%.%.2147483647 %(got %-1%)$")
    raises(function() f:get(3, 1) end, "f:get: row must be an integer in 1%.%.2 %(got 3%)$")
    raises(function() f:nll(1, 3) end, "f:nll: id must be an integer in 0%.%.2 %(got 3%)$")
  end)
end)
