-- Out of memory in the CPU backend: the test hook core.test_fail_alloc(n)
-- (not API) fails the n-th allocation the backend makes from then on. Each
-- walk below fails n = 1, 2, 3, ... in turn until a request makes fewer
-- than n allocations; every failure must come back as an error saying so,
-- and the model must then give what an undisturbed run gives, bit for bit.
local H = require "helpers"
local gptoss = require "gptoss"
local core = require "gptoss.core"
local unpack = table.unpack or unpack

-- runs request() with allocation n failing, for n = 1, 2, ...; after each
-- failure, check(). Returns the number of failures seen.
local function walk(request, check)
  local n = 0
  while true do
    n = n + 1
    core.test_fail_alloc(n)
    local ok, err = pcall(request)
    local left = core.test_fail_alloc(0)
    if ok then
      -- the request made fewer than n allocations; had it made n, its
      -- failure would have been swallowed
      assert.is_true(left > 0, string.format("allocation %d failed and the request still succeeded", n))
      return n - 1
    end
    assert.are.equal(0, left)
    assert.is_truthy(tostring(err):find("out of memory", 1, true), tostring(err))
    check(n)
  end
end

-- two byte strings alike, without printing them
local function same(want, got, what)
  assert.is_true(want == got, what .. " differ (" .. #want .. " and " .. #got .. " bytes)")
end

describe("CPU backend out of memory (test hook)", function()
  local m, dir
  local ids = {}
  for i = 1, 100 do ids[i] = (i * 7919 + 13) % 1000 end
  local prompt = { unpack(ids, 1, 20) }   -- past the sliding window of 16
  setup(function()
    dir = H.micro()   -- the tiny preset with a vocabulary of 1000: cheap logits
    -- one thread: a pass of this model takes a millisecond, and waking a
    -- second thread on a busy machine can take a hundred
    m = assert(gptoss.load(dir, { tokenizer = false, threads = 1 }))
  end)
  teardown(function() core.test_fail_alloc(0); m:close() end)

  local function logits(s, x, mode) return s:feed(x, mode or "all"):bytes() end

  it("loading: the backend's state", function()
    local failures = walk(function()
      local m2, err = gptoss.load(dir, { tokenizer = false, threads = 2 })
      if not m2 then error(err, 0) end
      m2:close()
    end, function() end)
    assert.is_true(failures >= 2, "failures: " .. failures)
    print(string.format("\n  loading: %d allocations failed in turn", failures))
  end)

  it("generation: sessions, prefill, decode, a batch with adapters, sampling", function()
    local a = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 3, targets = { "q", "v", "gate_up", "down" } })
    local greedy = gptoss.sampler(m.config.vocab_size, { temperature = 0 })
    local function run()
      local out = {}
      local s = m:session()
      out[#out + 1] = logits(s, prompt)
      local id = s:sample(greedy)
      out[#out + 1] = logits(s, { id }, "last")
      local ss = { m:session { adapter = a }, m:session(), m:session { adapter = a } }
      ss[1]:feed({ unpack(ids, 1, 5) }, "none")
      ss[2]:feed({ unpack(ids, 6, 30) }, "none")
      ss[3]:feed({ unpack(ids, 31, 33) }, "none")
      local nxt = gptoss.batch_step(ss, { 7, 8, 9 }, { greedy, greedy, greedy })
      for i, x in ipairs(ss) do out[#out + 1] = tostring(nxt[i]) .. x:logits():bytes(); x:close() end
      s:close()
      return table.concat(out)
    end
    local want = run()
    local failures = walk(run, function() same(want, run(), "results after a failure") end)
    assert.is_true(failures >= 10, "failures: " .. failures)
    print(string.format("\n  generation: %d allocations failed in turn", failures))
    a:close()
  end)

  -- A pass allocates all it needs before it writes a key, so a feed of one
  -- pass that fails leaves the session as it was. (A feed that the engine
  -- cuts into several passes, one per ring's room, is another matter: the
  -- passes before the failing one have already overwritten ring slots the
  -- session's window still reads; the next spec.)
  it("a feed that fails leaves its session where it was", function()
    local s = m:session()
    logits(s, prompt)
    local fresh = m:session()
    local want = logits(fresh, ids)
    fresh:close()
    local V4 = 4 * m.config.vocab_size
    -- positions 20..39 fit the caches; 40..99 grow them past 64 slots (a
    -- growth that failed half-way stays: the caches are larger, no worse)
    local total = 0
    for _, part in ipairs { { 21, 40 }, { 41, 100 } } do
      local got
      local failures = walk(function() got = logits(s, { unpack(ids, part[1], part[2]) }) end, function()
        assert.are.equal(part[1] - 1, s:pos())
      end)
      -- after every failure the same session went on as though none had come
      assert.are.equal(part[2], s:pos())
      same(want:sub((part[1] - 1) * V4 + 1, part[2] * V4), got, "logits")
      assert.is_true(failures >= 3, "failures: " .. failures)
      total = total + failures
    end
    print(string.format("\n  feed: %d allocations failed in turn", total))
    s:close()
  end)

  it("a feed in several passes that fails after its second refuses the session from then on, and says why", function()
    -- rewind 2: a ring of window + 2 slots, so the feed runs in passes of 2
    local fresh = m:session { rewind = 2 }
    local want = logits(fresh, ids)
    fresh:close()
    local lost, kept = 0, 0
    local n = 0
    while true do
      n = n + 1
      local s = m:session { rewind = 2 }
      core.test_fail_alloc(n)
      local ok, err = pcall(logits, s, ids)
      local left = core.test_fail_alloc(0)
      if ok then assert.is_true(left > 0); s:close(); break end
      assert.is_truthy(tostring(err):find("out of memory", 1, true), tostring(err))
      assert.are.equal(0, s:pos())
      local ok2, err2 = pcall(logits, s, ids)
      if ok2 then
        -- the failure came before a second pass wrote anything: it went on as though none had come
        same(want, err2, "logits")
        kept = kept + 1
      else
        assert.matches("lost its sliding window", err2)
        assert.has_error(function() s:fork() end)
        lost = lost + 1
      end
      s:close()
    end
    -- a new session of the same model gives the undisturbed logits
    local s = m:session { rewind = 2 }
    same(want, logits(s, ids), "logits")
    s:close()
    print(string.format("\n  feed in passes: %d failures refused the session after, %d left it usable", lost, kept))
    assert.is_true(lost > 0 and kept > 0)
  end)

  it("training: a failed step leaves the gradients untouched", function()
    local a = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 5, targets = { "q", "k", "v", "o", "gate_up", "down" } })
    local mask = {}
    for i = 1, 12 do mask[i] = i > 3 end
    local x = { unpack(ids, 1, 12) }
    local function grads()
      local out = {}
      for l = 0, m.config.num_hidden_layers - 1 do
        for _, p in ipairs { "q", "k", "v", "o", "gate_up", "down" } do
          local mod = a:module(l, p)
          out[#out + 1] = mod.gA:bytes() .. mod.gB:bytes()
        end
      end
      return table.concat(out)
    end
    local loss, n = m:lora_backward(a, x, mask)
    local want = grads()
    a:zero_grad()
    local zero = grads()
    assert.is_true(zero ~= want)
    local failures = walk(function() m:lora_backward(a, x, mask) end, function()
      same(zero, grads(), "gradients after the failure")
      local l2, n2 = m:lora_backward(a, x, mask)
      assert.are.equal(loss, l2); assert.are.equal(n, n2)
      same(want, grads(), "gradients of the next step")
      a:zero_grad()
    end)
    assert.is_true(failures >= 3, "failures: " .. failures)
    print(string.format("\n  training: %d allocations failed in turn", failures))
    a:close()
  end)
end)
