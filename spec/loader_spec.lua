-- gptoss.load_async: the load on a thread of its own. Oracles: gptoss.load
-- of the same directory (the same logits, bit for bit, and the same
-- tokenizer), the checkpoint's tensor bytes summed from its safetensors
-- headers by gptoss.safetensors (an independent reader), a real poll(2) on
-- the descriptor.
local H = require "helpers"
local gptoss = require "gptoss"

local tensor_bytes = H.tensor_bytes

describe("gptoss.load_async", function()
  local ids = { 12, 345, 6789, 1011, 50 }

  it("loads on its own thread what gptoss.load loads, reporting the weights' bytes", function()
    local dir = H.tiny()
    local ld = assert(gptoss.load_async(dir, { threads = 1 }))
    assert.is_number(ld.fd)
    local fdpoll = H.fdpoll()
    assert.is_true(fdpoll.readable(ld.fd, 20000), "the descriptor never became readable")
    local done, total, ended = ld:progress()
    assert.is_true(ended)
    assert.equal(tensor_bytes(dir), total)
    assert.equal(total, done)
    local m = assert(ld:result())
    assert.matches("already taken", select(2, pcall(ld.result, ld)))
    ld:close()
    ld:close()   -- twice is fine
    assert.is_true(ld.closed)
    local ref = assert(gptoss.load(dir, { threads = 1 }))
    assert.equal(ref.config.vocab_size, m.config.vocab_size)
    assert.equal("exact", m.precision)
    assert.same(ref.tokenizer:encode("hello, world"), m.tokenizer:encode("hello, world"))
    assert.equal(H.session_logits(ref, ids):bytes(), H.session_logits(m, ids):bytes())
    m:close()
    ref:close()
  end)

  it("passes gptoss.load's options through (context, precision, no tokenizer)", function()
    local ld = assert(gptoss.load_async(H.tiny(), { context = 64, precision = "fast", tokenizer = false }))
    assert.is_true(ld:wait(20))
    local m = assert(ld:result())
    assert.equal(64, m.context)
    assert.equal("fast", m.precision)
    assert.is_nil(m.tokenizer)
    m:close()
    ld:close()
  end)

  it("reports a failed load as nil and the loader's message, on the caller's thread", function()
    local missing = H.tmpdir() .. "/none"
    local ld = assert(gptoss.load_async(missing))
    assert.is_true(ld:wait(20))
    local m, err = ld:result()
    assert.is_nil(m)
    assert.equal(select(2, gptoss.load(missing)), err)
    ld:close()
    -- a tokenizer.json that is not JSON: the model is freed, the message names the file
    local dir = H.tmpdir() .. "/badtok"
    H.copy_dir(H.tiny(), dir)
    H.write(dir .. "/tokenizer.json", "{ not json")
    ld = assert(gptoss.load_async(dir))
    m, err = ld:result()
    assert.is_nil(m)
    assert.matches("tokenizer.json", err, 1, true)
    ld:close()
  end)

  it("can be closed or collected unfinished, cancelled or not, and never taken", function()
    for i = 1, 6 do
      local ld = assert(gptoss.load_async(H.tiny()))
      if i % 2 == 0 then ld:cancel() end
      if i % 3 == 0 then ld:close() else ld = nil; collectgarbage(); collectgarbage() end
    end
    -- cancelled before it ends: nil and "cancelled", or the model if it had already loaded
    local ld = assert(gptoss.load_async(H.tiny()))
    ld:cancel()
    local m, err = ld:result()
    if m then m:close() else assert.matches("cancelled", err) end
    ld:close()
    assert.matches("loader is closed", select(2, pcall(ld.progress, ld)))
  end)

  it("refuses bad arguments, naming them", function()
    assert.matches("gptoss.load_async: dir must be a string %(got 5%)", select(2, pcall(gptoss.load_async, 5)))
    assert.matches("gptoss.load_async: unknown option 'devcie'", select(2, pcall(gptoss.load_async, H.tiny(), { devcie = "cpu" })), 1, true)
    local ld = assert(gptoss.load_async(H.tiny()))
    assert.matches("ld:wait: timeout must be a number >= 0 %(got %-1%)", select(2, pcall(ld.wait, ld, -1)))
    ld:close()
  end)
end)
