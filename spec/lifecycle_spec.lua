-- Closing and collecting objects in any order never crashes or reaches freed
-- memory. `make check-memory` runs this under valgrind and AddressSanitizer.
local H = require "helpers"
local gptoss = require "gptoss"

describe("object lifetimes", function()
  it("lets close be called twice and then refuses use", function()
    local m = assert(gptoss.load(H.micro()))
    m:close()
    m:close()
    assert.is_true(m.closed)
    assert.has_error(function() m:tensors() end, "model is closed")
    assert.has_error(function() m:session() end, "model is closed")
    assert.matches("closed", tostring(m))
  end)

  it("closes a model's sessions with it", function()
    local m = assert(gptoss.load(H.micro()))
    local s1, s2 = m:session(), m:session()
    s1:feed({ 1, 2, 3 }, "none")
    local f = s1:fork()
    m:close()
    for _, s in ipairs { s1, s2, f } do
      assert.is_true(s.closed)
      assert.has_error(function() s:pos() end, "session is closed (closed directly, or its model was closed)")
      s:close()
    end
  end)

  it("survives sessions closed before, after and without their model", function()
    for order = 1, 4 do
      local m = assert(gptoss.load(H.micro()))
      local s = m:session()
      s:feed({ 5, 6 }, "last")
      if order == 1 then s:close(); m:close()
      elseif order == 2 then m:close(); s:close()
      elseif order == 3 then s = nil; collectgarbage(); m:close()
      else m = nil; collectgarbage(); assert.are.equal(2, s:pos()); s:close() end
      collectgarbage()
    end
  end)

  it("keeps a model alive while a session holds it", function()
    local s
    do
      local m = assert(gptoss.load(H.micro()))
      s = m:session()
    end
    collectgarbage()
    collectgarbage()
    local lg = s:feed({ 1 }, "last")
    assert.are.equal(1000, select(2, lg:shape()))
    assert.are.equal(s.model.config.vocab_size, 1000)
  end)

  it("lets tokenizers, samplers, readers and writers close twice", function()
    local t = assert(gptoss.tokenizer(H.tokenizer_dir))
    t:close(); t:close()
    assert.has_error(function() t:encode("x") end, "tokenizer is closed")
    local smp = gptoss.sampler(10, { temperature = 0 })
    smp:close(); smp:close()
    local r = assert(gptoss.safetensors(H.micro()))
    r:close(); r:close()
    assert.has_error(function() r:tensors() end, "safetensors reader is closed")
    local w = gptoss.writer(H.tmpdir() .. "/x.safetensors")
    w:close(); w:close()
    collectgarbage()
  end)

  if _VERSION == "Lua 5.4" then
    it("closes to-be-closed variables (Lua 5.4)", function()
      local chunk = assert(load([[
        local gptoss, dir = ...
        local m <close> = assert(gptoss.load(dir))
        local s <close> = m:session()
        s:feed({ 1, 2 }, "none")
        return m, s
      ]]))
      local m, s = chunk(gptoss, H.micro())
      assert.is_true(m.closed)
      assert.is_true(s.closed)
    end)
  end

  it("collects many unclosed objects in arbitrary order", function()
    local keep = {}
    for i = 1, 20 do
      local m = assert(gptoss.load(H.micro()))
      local s = m:session()
      s:feed({ i % 7 + 1 }, "none")
      keep[#keep + 1] = (i % 3 == 0) and s or m
    end
    keep = nil
    collectgarbage()
    collectgarbage()
  end)
end)
