-- A model split over devices by its experts ("cpu+cpu", "cuda:0+cuda:1"):
-- each rank holds a share of the experts, runs attention and the router on
-- every token and only its experts' rows; the ranks sum the rows inside each
-- layer. The oracle is the same checkpoint on one device (itself checked
-- against transformers in parity_spec): the split must give its logits bit
-- for bit, since each summed element is nonzero on one rank only.
local H = require "helpers"
local gptoss = require "gptoss"
local core = require "gptoss.core"

local function prompt(k, n) return H.prompt(k, n, 37, 11) end

local function same_bytes(want, got, what)
  assert.is_true(want == got, what .. " differ (" .. #want .. " and " .. #got .. " bytes)")
end

describe("a model split over devices by its experts (CPU ranks)", function()
  local one
  setup(function() one = assert(gptoss.load(H.tiny(), { threads = 1 })) end)
  teardown(function() one:close() end)

  -- tiny has 8 experts: two ranks hold 4 each; three hold 2, 3 and 3
  for _, dev in ipairs { "cpu+cpu", "cpu+cpu+cpu" } do
    it(dev .. ": every position's logits are the one-device model's, bit for bit", function()
      local m = assert(gptoss.load(H.tiny(), { device = dev, threads = 3 }))
      assert.equal(dev, m.device)
      -- 40 tokens: past the sliding window of 16, in one pass and then token by token
      local ids = prompt(1, 40)
      local s1, s2 = one:session(), m:session()
      same_bytes(s1:feed(ids, "all"):bytes(), s2:feed(ids, "all"):bytes(), "prefill logits")
      for i = 1, 5 do
        same_bytes(s1:feed({ 100 + i }, "last"):bytes(), s2:feed({ 100 + i }, "last"):bytes(), "decode logits " .. i)
      end
      same_bytes(s1:logits():bytes(), s2:logits():bytes(), "the session's logits")
      s1:close(); s2:close()
      local o = { max_tokens = 16, temperature = 0.8, seed = 5, stop_tokens = {} }
      assert.same(one:generate(prompt(2, 12), o).ids, m:generate(prompt(2, 12), o).ids)
      m:close()
    end)
  end

  it("routes each token as the one-device model does (the trace is rank 0's)", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cpu+cpu", threads = 2 }))
    local s1, s2 = one:session(), m:session()
    s1:trace(true); s2:trace(true)
    s1:feed(prompt(3, 20), "last"); s2:feed(prompt(3, 20), "last")
    local a, b = s1:trace_get(), s2:trace_get()
    assert.equal(20, #b)
    for t = 1, #a do
      for l = 1, #a[t] do
        assert.equal(table.concat(a[t][l].experts, ","), table.concat(b[t][l].experts, ","), "token " .. t .. " layer " .. l)
        assert.equal(table.concat(a[t][l].weights, ","), table.concat(b[t][l].weights, ","), "token " .. t .. " layer " .. l)
      end
    end
    s1:close(); s2:close(); m:close()
  end)

  it("forks, rewinds and samples under an adapter with experts' LoRA as one device does", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cpu+cpu", threads = 2 }))
    local a = assert(gptoss.adapter.load("spec/fixtures/lora/experts_r4"))
    local s1, s2 = one:session(), m:session()
    s1:set_adapter(a); s2:set_adapter(a)
    same_bytes(s1:feed(prompt(4, 24), "all"):bytes(), s2:feed(prompt(4, 24), "all"):bytes(), "logits under the adapter")
    local f1, f2 = s1:fork(), s2:fork()
    same_bytes(f1:feed({ 7, 8 }, "last"):bytes(), f2:feed({ 7, 8 }, "last"):bytes(), "a fork's logits")
    s1:rewind(20); s2:rewind(20)
    same_bytes(s1:feed({ 9 }, "last"):bytes(), s2:feed({ 9 }, "last"):bytes(), "logits after a rewind")
    local g1 = f1:fork { keep = 10, context = 64 }
    local g2 = f2:fork { keep = 10, context = 64 }
    same_bytes(g1:feed({ 11, 12 }, "last"):bytes(), g2:feed({ 11, 12 }, "last"):bytes(), "a fork into another capacity")
    for _, s in ipairs { s1, s2, f1, f2, g1, g2 } do s:close() end
    a:close(); m:close()
  end)

  it("serves an engine's mixed requests with the tokens each gets alone", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cpu+cpu", threads = 2 }))
    local eng = assert(gptoss.engine(m, { max_batch = 4 }))
    local reqs = {}
    for k = 1, 6 do
      reqs[k] = assert(eng:submit(prompt(k, 5 + k), { max_tokens = 10, temperature = 0.7, seed = k, stop_tokens = {} }))
    end
    for k, r in ipairs(reqs) do
      local want = one:generate(prompt(k, 5 + k), { max_tokens = 10, temperature = 0.7, seed = k, stop_tokens = {} }).ids
      assert.same(want, r:result().ids, "request " .. k)
    end
    eng:close(); m:close()
  end)

  it("serves as replicas of split models (devices = { 'cpu+cpu', 'cpu+cpu' })", function()
    local eng = assert(gptoss.engine(H.tiny(), { devices = { "cpu+cpu", "cpu+cpu" }, threads = 2, max_batch = 2 }))
    local reqs = {}
    for k = 1, 4 do reqs[k] = assert(eng:submit(prompt(k, 9), { max_tokens = 8, temperature = 0, stop_tokens = {} })) end
    for k, r in ipairs(reqs) do
      assert.same(one:generate(prompt(k, 9), { max_tokens = 8, temperature = 0, stop_tokens = {} }).ids, r:result().ids)
    end
    assert.equal("cpu+cpu", eng:stats().replicas[2].device)
    eng:close()
  end)

  it("fails a pass whose rank ran out of memory, naming the rank, and goes on exactly", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cpu+cpu", threads = 2, tokenizer = false }))
    local s1 = one:session()
    local want = s1:feed(prompt(6, 12), "all"):bytes()
    local more = s1:feed({ 5, 6 }, "all"):bytes()
    -- the n-th allocation of the pass fails on whichever rank makes it, for
    -- n = 1, 2, ... until a pass makes fewer; the other rank must not wait
    -- for the failed one forever, and the next pass must be exact
    local n = 0
    while true do
      n = n + 1
      local s2 = m:session()
      core.test_fail_alloc(n)
      local ok, err = pcall(function() return s2:feed(prompt(6, 12), "all") end)
      local left = core.test_fail_alloc(0)
      if ok then assert.is_true(left > 0); s2:close(); break end
      assert.matches("cpu%+cpu, rank %d %(cpu%): out of memory", tostring(err))
      assert.equal(0, s2:pos())
      same_bytes(want, s2:feed(prompt(6, 12), "all"):bytes(), "logits after failure " .. n)
      same_bytes(more, s2:feed({ 5, 6 }, "all"):bytes(), "the next logits after failure " .. n)
      s2:close()
    end
    assert.is_true(n > 3, "allocations failed: " .. (n - 1))
    s1:close(); m:close()
  end)

  it("refuses what it cannot do, by name", function()
    local dir = H.tiny()
    local m, err = gptoss.load(dir, { device = "cpu+cuda:0" })
    assert.is_nil(m)
    assert.matches("a split model's parts must all be cpu or all cuda", err, 1, true)
    m, err = gptoss.load(dir, { device = "cpu++cpu" })
    assert.is_nil(m)
    assert.matches("invalid device 'cpu++cpu': an empty part at offset 4", err, 1, true)
    m, err = gptoss.load(dir, { device = "cpu+gpu" })
    assert.is_nil(m)
    assert.matches("invalid device 'gpu'", err, 1, true)
    m, err = gptoss.load(dir, { device = string.rep("cpu+", 8) .. "cpu" })
    assert.is_nil(m)
    assert.matches("splits 8 experts over 9 ranks", err, 1, true)
    m, err = gptoss.load(dir, { device = string.rep("cpu+", 40) .. "cpu" })
    assert.is_nil(m)
    assert.matches("is longer than 127 characters", err, 1, true)
    -- training reads every expert's rows on one device
    m = assert(gptoss.load(dir, { device = "cpu+cpu", threads = 2, tokenizer = false }))
    local lora = assert(gptoss.adapter.load("spec/fixtures/lora/experts_r4"))
    local ok, e2 = pcall(function() return m:lora_backward(lora, { 1, 2, 3, 4 }) end)
    assert.is_false(ok)
    assert.matches("LoRA training is not supported on cpu+cpu", tostring(e2), 1, true)
    lora:close(); m:close()
  end)

  it("reports the memory of its ranks together", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cpu+cpu", threads = 2, tokenizer = false }))
    local mem = m:memory()
    assert.equal(0, mem.weights)     -- CPU ranks map the checkpoint; nothing allocated
    m:close()
  end)
end)

describe("a model split over GPUs #gpu", function()
  it("cuda:0+cuda:0: two ranks on one GPU (staged through the host) give one GPU's tokens in exact precision", function()
    local dir = H.tiny()
    -- batch-invariant: a row's bytes do not depend on what shares its batch
    -- (serving_engine_spec), so the engine below can be held to each
    -- request's tokens alone
    local one = assert(gptoss.load(dir, { device = "cuda:0", batch_invariant = true }))
    local two = assert(gptoss.load(dir, { device = "cuda:0+cuda:0", batch_invariant = true }))
    local cpu = assert(gptoss.load(dir, { threads = 4 }))
    local o = { max_tokens = 24, temperature = 0, stop_tokens = {} }
    local want = cpu:generate(prompt(1, 40), o).ids
    assert.same(want, one:generate(prompt(1, 40), o).ids)
    assert.same(want, two:generate(prompt(1, 40), o).ids)
    local s1, s2 = one:session(), two:session()
    same_bytes(s1:feed(prompt(2, 70), "all"):bytes(), s2:feed(prompt(2, 70), "all"):bytes(), "prefill logits")
    s1:close(); s2:close()
    -- eight requests batched by an engine: each gets its tokens alone
    local so = { max_tokens = 24, temperature = 0.8, stop_tokens = {} }
    local alone = {}
    for k = 1, 8 do so.seed = k; alone[k] = two:generate(prompt(k, 10 + k), so).ids end
    local eng = assert(gptoss.engine(two, { max_batch = 8 }))
    local reqs = {}
    for k = 1, 8 do so.seed = k; reqs[k] = assert(eng:submit(prompt(k, 10 + k), so)) end
    for k, r in ipairs(reqs) do assert.same(alone[k], r:result().ids, "request " .. k) end
    eng:close()
    one:close(); two:close(); cpu:close()
  end)
end)
