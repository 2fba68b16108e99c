-- Training inside a running engine (engine_train.c, eng:train) on the tiny
-- checkpoint, CPU. Oracles: gptoss.train run directly on the model (the
-- same loop without an engine: every loss, norm and weight must agree bit
-- for bit, as the CPU is exact), model:generate alone for the tokens of
-- requests served meanwhile, and train.evaluate's Lua log-softmax for the
-- engine's C loss.
local H = require "helpers"
local gptoss = require "gptoss"

local model
local function tiny()
  if not model then model = gptoss.load(H.tiny(), { threads = 2 }) end
  return model
end

local function prompt(k, n)
  local ids = {}
  for i = 1, n do ids[i] = (i * 31 + k * 17) % 5000 + 100 end
  return ids
end

-- the weights of every module, as bytes, for bit-for-bit comparison
local function weights(m, lora)
  local out = {}
  for l = 0, m.config.num_hidden_layers - 1 do
    for _, mod in ipairs { "q", "k", "v", "o", "gate_up", "down" } do
      local x = lora:module(l, mod)
      if x then out[#out + 1] = x.A:bytes() .. x.B:bytes() end
    end
  end
  return out
end

local OPTS = { steps = 4, lr = 3e-3, batch = 2, warmup = 1, schedule = "cosine", max_grad_norm = 1.0 }
local function opts(extra)
  local o = { data = H.overfit_data(), eval = { H.overfit_data()[2] }, eval_every = 2 }
  for k, v in pairs(OPTS) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

describe("eng:train", function()
  teardown(function() if model then model:close() end end)

  it("gives gptoss.train's run exactly: losses, norms, eval losses and weights", function()
    local m = tiny()
    local direct = gptoss.lora(m, { r = 4, alpha = 8, seed = 5 })
    local want = gptoss.train(m, direct, opts())
    local lora = gptoss.lora(m, { r = 4, alpha = 8, seed = 5 })
    local eng = gptoss.engine(m)
    local seen = {}
    local t = eng:train(lora, opts { share = 1, on_step = function(step) seen[#seen + 1] = step end })
    local got = assert(t:result())
    local st = eng:stats()
    eng:close()
    assert.same({ 1, 2, 3, 4 }, seen)
    assert.equal(4, t.step)
    for s = 1, 4 do
      assert.equal(want.history[s].loss, got.history[s].loss)
      assert.equal(want.history[s].grad_norm, got.history[s].grad_norm)
      assert.equal(want.history[s].lr, got.history[s].lr)
    end
    -- evaluated by a loss_only job (C) against train.evaluate (Lua, over logits)
    assert.equal(want.history[2].eval_loss, got.history[2].eval_loss)
    assert.equal(want.eval_loss, got.eval_loss)
    local w = weights(m, lora)
    assert.is_true(#w > 0)
    assert.same(weights(m, direct), w)
    -- 4 steps of 2 examples, and 3 evaluations of 1 (steps 2, 4 and the end)
    assert.equal(4 + 3, st.train_jobs)
    assert.equal(8 + 3, st.train_examples)
    assert.equal(0, st.train_pending)
    assert.is_true(st.train_s > 0)
  end)

  it("gives gptoss.train's run with 8-bit AdamW too", function()
    local m = tiny()
    local direct = gptoss.lora(m, { r = 4, alpha = 8, seed = 6 })
    local want = gptoss.train(m, direct, opts { optim = "adamw_8bit", eval = nil, eval_every = nil })
    local lora = gptoss.lora(m, { r = 4, alpha = 8, seed = 6 })
    local eng = gptoss.engine(m)
    local got = assert(eng:train(lora, opts { optim = "adamw_bnb_8bit", eval = nil, eval_every = nil }):result())
    eng:close()
    assert.equal("adamw_8bit", lora.optim)
    for s = 1, 4 do assert.equal(want.history[s].loss, got.history[s].loss) end
    assert.same(weights(m, direct), weights(m, lora))
  end)

  it("serves while it trains: requests give their tokens alone, and training runs between their steps", function()
    local m = tiny()
    local served = gptoss.lora(m, { r = 4, alpha = 8, seed = 9, init = "random" })
    local want = {}
    for k = 1, 3 do
      want[k] = m:generate(prompt(k, 12), { max_tokens = 24, temperature = 0.8, seed = k, adapter = k == 2 and served or nil,
                                             stop_tokens = {} }).ids
    end
    local eng = gptoss.engine(m)
    local lora = gptoss.lora(m, { r = 4, alpha = 8, seed = 5 })
    local t = eng:train(lora, opts { steps = 6, share = 0.5 })
    local reqs = {}
    for k = 1, 3 do
      reqs[k] = assert(eng:submit(prompt(k, 12), { max_tokens = 24, temperature = 0.8, seed = k,
                                                    adapter = k == 2 and served or nil, stop_tokens = {} }))
    end
    local examples_while_serving
    for k = 1, 3 do
      local r = reqs[k]:result()
      assert.same(want[k], r.ids)
      if k == 3 then examples_while_serving = eng:stats().train_examples end
    end
    local res = assert(t:result())
    eng:close()
    assert.equal(6, #res.history)
    -- at share 0.5 training took turns with the 24 serving steps
    assert.is_true(examples_while_serving >= 1, "no training example ran while requests were served")
  end)

  it("with share = 'idle' trains only while no request is active", function()
    local m = tiny()
    local eng = gptoss.engine(m)
    local req = assert(eng:submit(prompt(1, 8), { max_tokens = 40, stop_tokens = {} }))
    local lora = gptoss.lora(m, { r = 4, alpha = 8, seed = 5 })
    local t = eng:train(lora, opts { steps = 2, share = "idle", eval = nil, eval_every = nil })
    -- stats first, then the request's state: an example counted while the
    -- request still reads as running would have run beside it
    while true do
      local n = eng:stats().train_examples
      local info = req.c:info()
      if info.state == "done" then break end
      assert.equal(0, n)
      req.c:wait(0.05)
    end
    assert.is_truthy(t:result())
    eng:close()
  end)

  it("polls without blocking, cancels, and checks its arguments", function()
    local m = tiny()
    local eng = gptoss.engine(m)
    local lora = gptoss.lora(m, { r = 4, alpha = 8, seed = 5 })
    assert.has_error(function() eng:train(lora, opts { share = 2 }) end,
      "eng:train: share must be a number in [0, 1] (got 2)")
    assert.has_error(function() eng:train(lora, opts { steps = 0 }) end)
    assert.has_error(function() eng:train("x", opts()) end)
    assert.has_error(function() eng:train(lora, opts { nonsense = 1 }) end)
    local t = eng:train(lora, opts { steps = 50 })
    local done = t:poll()
    assert.is_false(done)
    t:cancel()
    assert.is_true(t:wait(60))
    local d, res, err = t:poll()
    assert.is_true(d)
    assert.is_nil(res)
    assert.equal("train: cancelled", err)
    assert.is_true(t.step < 50)
    -- the C job: bad examples are named
    assert.has_error(function() eng.c:train_job(lora, { { ids = { 1 } } }) end,
      "eng:train_job: examples[1].ids needs at least 2 ids (got 1)")
    assert.has_error(function() eng.c:train_job(lora, { { ids = { 1, 2, 3 }, mask = { true } } }) end,
      "eng:train_job: examples[1].mask has 1 entries for 3 ids")
    assert.has_error(function() eng.c:train_job(lora, { { ids = { 1, 2, 999999 } } }) end,
      "train job: example 1: token id 999999 at position 3 is outside the vocabulary (201088)")
    assert.has_error(function() eng.c:train_job(lora, { { ids = { 1, 2 } } }, { loss_only = true, zero_grad = true }) end,
      "train job: loss_only takes neither step nor zero_grad")
    eng:close()
    assert.has_error(function() eng:train(lora, opts()) end, "eng:train: the engine is closed")
  end)

  it("ends the jobs left when the engine closes, and outlives it", function()
    local m = tiny()
    local eng = gptoss.engine(m)
    local lora = gptoss.lora(m, { r = 4, alpha = 8, seed = 5 })
    local ex = {}
    for i = 1, 40 do ex[i] = H.overfit_data()[i % 3 + 1] end
    local a = assert(eng.c:train_job(lora, ex, { zero_grad = true, step = { lr = 1e-3 } }))
    local b = assert(eng.c:train_job(lora, ex, { loss_only = true }))
    eng:close()
    assert.is_true(a:wait(0))
    local ia, ib = a:info(), b:info()
    assert.equal("cancelled", ia.finish_reason)
    assert.is_true(ia.done < 40)
    assert.equal("cancelled", ib.finish_reason)
    assert.equal(0, ib.done)
    a:close()
    collectgarbage()
    assert.equal("done", b:info().state)
    b:close()
    local job, err, code = eng.c:train_job(lora, ex, {})
    assert.is_nil(job)
    assert.equal("closed", code)
    assert.is_string(err)
  end)
end)

describe("eng:train on CUDA #gpu", function()
  it("trains between serving steps while a request gives its tokens alone", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cuda:0" }))
    local GEN = { max_tokens = 40, temperature = 0.8, seed = 4, stop_tokens = {} }
    local want = m:generate(prompt(4, 20), GEN).ids
    local direct = gptoss.lora(m, { r = 4, alpha = 8, seed = 5 })
    local ref = gptoss.train(m, direct, opts { eval = nil, eval_every = nil })
    local eng = gptoss.engine(m)
    local lora = gptoss.lora(m, { r = 4, alpha = 8, seed = 5 })
    local t = eng:train(lora, opts { share = 0.5, eval = nil, eval_every = nil })
    local req = assert(eng:submit(prompt(4, 20), GEN))
    local got = req:result().ids
    local res = assert(t:result())
    eng:close()
    assert.same(want, got)
    for s = 1, 4 do
      assert.is_true(math.abs(res.history[s].loss - ref.history[s].loss) <= 1e-4 * math.abs(ref.history[s].loss),
        string.format("step %d: %.9g against %.9g", s, res.history[s].loss, ref.history[s].loss))
    end
    m:close()
  end)
end)
