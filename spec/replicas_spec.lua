-- gptoss.engine over several devices (gptoss.replicas), with CPU devices:
-- requests spread by load, a prompt sent where its prefix is cached, and
-- every request's tokens those of model:generate alone (the oracle).
local H = require "helpers"
local gptoss = require "gptoss"

local function prompt(k, n) return H.prompt(k, n, 31, 17) end

describe("gptoss.engine over devices", function()
  local ref
  setup(function() ref = gptoss.load(H.tiny(), { threads = 1 }) end)
  teardown(function() ref:close() end)

  it("spreads requests by load and gives each its tokens alone", function()
    local eng = assert(gptoss.engine(H.tiny(), { devices = { "cpu", "cpu" }, threads = 1, max_batch = 2 }))
    assert.equal(2, #eng.fds)
    local reqs = {}
    for k = 1, 6 do
      reqs[k] = assert(eng:submit(prompt(k, 9), { max_tokens = 12, temperature = 0.9, seed = k, stop_tokens = {} }))
    end
    local placed = {}
    for k, r in ipairs(reqs) do
      placed[r.replica] = (placed[r.replica] or 0) + 1
      local got = r:result().ids
      assert.same(ref:generate(prompt(k, 9), { max_tokens = 12, temperature = 0.9, seed = k, stop_tokens = {} }).ids, got)
    end
    assert.equal(3, placed[1])
    assert.equal(3, placed[2])
    local st = eng:stats()
    assert.equal(6, st.completed)
    assert.equal(3, st.replicas[1].submitted)
    assert.equal(3, st.replicas[2].submitted)
    assert.equal("cpu", st.replicas[2].device)
    eng:close()
  end)

  it("eng:wait blocks on every replica's descriptor at once, for the news of any", function()
    local eng = assert(gptoss.engine(H.tiny(), { devices = { "cpu", "cpu" }, threads = 1 }))
    local clock = gptoss.core.clock
    eng:wait(0)   -- drained
    local t0 = clock()
    assert.is_false(eng:wait(0.2))   -- nothing runs: the whole timeout, and no news
    assert.is_true(clock() - t0 >= 0.19)
    -- a request on the second replica alone: its news ends the wait
    local first = assert(eng:submit(prompt(1, 9), { max_tokens = 2 }))
    local r = assert(eng:submit(prompt(2, 9), { max_tokens = 40, stop_tokens = {} }))
    assert.are_not.equal(first.replica, r.replica)
    first:result()
    eng:wait(0)
    t0 = clock()
    assert.is_true(eng:wait(5))
    assert.is_true(clock() - t0 < 2)
    r:result()
    -- no limit: math.huge, as a single engine's wait takes it
    r = assert(eng:submit(prompt(3, 9), { max_tokens = 2 }))
    assert.is_true(eng:wait(math.huge))
    r:result()
    -- the descriptors, as an event loop would watch them
    assert.same({}, gptoss.core.wait_fds({}, 0))
    assert.is_table(gptoss.core.wait_fds(eng.fds, 0))
    assert.has_error(function() gptoss.core.wait_fds({ -1 }, 0) end)
    assert.has_error(function() gptoss.core.wait_fds(eng.fds, -1) end)
    eng:close()
  end)

  it("sends a prompt to the replica holding its prefix, and its cache skips it", function()
    local eng = assert(gptoss.engine(H.tiny(), { devices = { "cpu", "cpu" }, threads = 1 }))
    -- two long conversations, one on each replica
    local a, b = prompt(1, 140), prompt(2, 140)
    local ra = assert(eng:submit(a, { max_tokens = 4, temperature = 0 }))
    local rb = assert(eng:submit(b, { max_tokens = 4, temperature = 0 }))
    assert.are_not.equal(ra.replica, rb.replica)
    ra:result(); rb:result()
    -- the second turn of b: to b's replica, whatever the turn order says
    local b2 = {}
    for i, id in ipairs(b) do b2[i] = id end
    for i = 1, 20 do b2[#b2 + 1] = 300 + i end
    local r2 = assert(eng:submit(b2, { max_tokens = 4, temperature = 0 }))
    assert.equal(rb.replica, r2.replica)
    local res = r2:result()
    assert.is_true(res.usage.prompt_tokens_details.cached_tokens >= 128)
    assert.same(ref:generate(b2, { max_tokens = 4, temperature = 0 }).ids, res.ids)
    -- a prompt sharing no whole block goes by load (both idle: in turn)
    local r3 = assert(eng:submit(prompt(9, 30), { max_tokens = 2 }))
    assert.is_number(r3.replica)
    r3:result()
    eng:close()
  end)

  it("checks its arguments", function()
    assert.has_error(function() gptoss.engine(H.tiny(), {}) end,
      "gptoss.engine: a checkpoint directory needs opts.devices (else pass a loaded model)")
    assert.has_error(function() gptoss.engine(H.tiny(), { devices = {} }) end, "gptoss.engine: devices is empty")
    assert.has_error(function() gptoss.engine(H.tiny(), { devices = { 3 } }) end)
    local eng, err = gptoss.engine(H.tmpdir() .. "/none", { devices = { "cpu" } })
    assert.is_nil(eng)
    assert.matches("on cpu", err)
  end)
end)
