-- gptoss.engine's lifetimes: engines, models and requests closed or
-- collected in any order, with requests queued, running or finished. Short
-- generations, so that tools/check_memory.sh runs it under valgrind and
-- AddressSanitizer.
local H = require "helpers"
local gptoss = require "gptoss"

local function ids_of(m, text) return m.tokenizer:encode(text) end

local function wait_running(req)
  for _ = 1, 200000 do
    local info = req.c:info()
    if info.state ~= "queued" then return info end
    req:wait(0.01)
  end
  error("the request never started")
end

describe("gptoss.engine lifetimes", function()
  local dir
  setup(function() dir = H.tiny() end)

  it("stops when its model is closed under it: requests end cancelled, submit says closed", function()
    local m = assert(gptoss.load(dir, { threads = 2 }))
    local eng = gptoss.engine(m, { max_batch = 1 })
    local a = assert(eng:submit(ids_of(m, "one two three"), { temperature = 0, max_tokens = 500, stop_tokens = {} }))
    local b = assert(eng:submit(ids_of(m, "four five"), { temperature = 0, max_tokens = 500, stop_tokens = {} }))
    wait_running(a)
    local six = ids_of(m, "six")
    m:close()
    assert.are.equal("cancelled", a:result().finish_reason)
    assert.are.equal("cancelled", b:result().finish_reason)
    assert.are.same({}, b:result().ids)
    local r, msg, code = eng:submit(six, { max_tokens = 1 })
    assert.is_nil(r)
    assert.are.equal("closed", code)
    assert.matches("closed", msg)
    eng:close()
    a:close()
  end)

  it("gives the model back when closed, cancelling what is left", function()
    local m = assert(gptoss.load(dir, { threads = 2 }))
    local s = m:session()
    s:feed(ids_of(m, "a session from before"), "last")
    local eng = gptoss.engine(m, { max_batch = 1 })
    assert.has_error(function() s:feed({ 1 }, "last") end,
      "the session's model is owned by a running engine: close the engine first")
    assert.has_error(function() gptoss.engine(m) end)
    local done = assert(eng:submit(ids_of(m, "seven eight"), { temperature = 0, max_tokens = 2 }))
    assert.are.equal(2, #done:result().ids)
    local a = assert(eng:submit(ids_of(m, "nine ten"), { temperature = 0, max_tokens = 500, stop_tokens = {} }))
    local b = assert(eng:submit(ids_of(m, "eleven"), { temperature = 0, max_tokens = 500, stop_tokens = {} }))
    wait_running(a)
    eng:close()
    eng:close()
    assert.are.equal("cancelled", a:result().finish_reason)
    assert.are.equal("cancelled", b:result().finish_reason)
    -- direct use again, the old session included
    s:feed({ 1 }, "last")
    assert.are.equal(2, #m:generate(ids_of(m, "twelve"), { temperature = 0, max_tokens = 2 }).ids)
    m:close()
    done:close(); a:close(); b:close()
  end)

  it("cancels requests that are collected while they run, and frees their memory", function()
    local m = assert(gptoss.load(dir, { threads = 2 }))
    local eng = gptoss.engine(m, { max_batch = 2, prefix_cache = 0 })
    do
      local a = assert(eng:submit(ids_of(m, "thirteen"), { temperature = 0, max_tokens = 500, stop_tokens = {} }))
      assert(eng:submit(ids_of(m, "fourteen"), { temperature = 0, max_tokens = 500, stop_tokens = {} }))
      wait_running(a)
    end
    collectgarbage()
    collectgarbage()
    local st
    for _ = 1, 20000 do
      st = eng:stats()
      if st.active == 0 and st.queued == 0 then break end
      eng:wait(0.01)   -- sleeps in poll(2): a busy wait would starve the engine's thread under valgrind
    end
    assert.are.equal(0, st.active)
    assert.are.equal(0, st.kv_active)
    assert.are.equal(2, st.cancelled)
    eng:close()
    m:close()
  end)

  it("survives an engine collected while its requests are held, and everything dropped at once", function()
    local m = assert(gptoss.load(dir, { threads = 2 }))
    local req
    do
      local eng = gptoss.engine(m)
      req = assert(eng:submit(ids_of(m, "fifteen"), { temperature = 0, max_tokens = 3 }))
    end
    collectgarbage()
    -- the request keeps its engine alive
    assert.are.equal(3, #req:result().ids)
    req = nil
    collectgarbage()
    collectgarbage()
    -- the engine was collected: the model is free again
    assert.are.equal(1, #m:generate(ids_of(m, "sixteen"), { temperature = 0, max_tokens = 1 }).ids)
    do
      local m2 = assert(gptoss.load(dir, { threads = 2 }))
      local eng = gptoss.engine(m2, { max_batch = 1 })
      assert(eng:submit(ids_of(m2, "seventeen"), { temperature = 0, max_tokens = 500, stop_tokens = {} }))
      assert(eng:submit(ids_of(m2, "eighteen"), { temperature = 0, max_tokens = 2 }))
    end
    collectgarbage()
    collectgarbage()
    m:close()
  end)
end)
