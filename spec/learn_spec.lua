-- gptoss.learn on the tiny checkpoint, CPU: conversations logged, rounds
-- through the serving engine, versions swapped at request boundaries,
-- rollback, corrections, and the whole pipeline from a scripted log.
-- Oracles: model:generate alone with each version's adapter (loaded from
-- its directory by gptoss.adapter.load, not through the learner) for the
-- tokens of requests in flight across a swap; the rendered example of a
-- correction (the corrected messages, by hand) among a round's training
-- examples; held-out losses recomputed by train.evaluate.
local H = require "helpers"
local gptoss = require "gptoss"
local cjson = require "cjson"

local model
local function tiny()
  if not model then model = gptoss.load(H.tiny(), { threads = 2 }) end
  return model
end

local function convo(i, reply)
  return { { role = "user", content = "what colour is item " .. i .. "?" },
           { role = "assistant", content = reply or "blue, it is blue." } }
end

local function open(dir, eng, extra)
  local o = { engine = eng, every = 4, holdout_every = 3, lora = { r = 4, alpha = 16, seed = 1 },
              train = { epochs = 2, lr = 5e-3 }, share = 1 }
  for k, v in pairs(extra or {}) do o[k] = v end
  return gptoss.learn.open(dir, o)
end

local function prompt(k)
  local ids = {}
  for i = 1, 10 do ids[i] = (i * 29 + k * 13) % 4000 + 50 end
  return ids
end

describe("gptoss.learn", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rm_tree(dir) end)
  teardown(function() if model then model:close() end end)

  it("logs conversations and feedback as JSONL, and routes them", function()
    local m = tiny()
    local eng = gptoss.engine(m)
    local L = open(dir, eng, { specialists = { "code" }, classify = function(r) if r.tags and r.tags[1] == "py" then return "code" end end })
    local a = L:log { messages = convo(1), rating = 5 }
    local b = L:log { messages = convo(2), tags = { "code" } }
    local c = L:log { messages = convo(3), tags = { "py" } }
    L:feedback(b, { rating = 2, correction = "green." })
    assert.same({ 1, 2, 3 }, { a, b, c })
    local lines = {}
    for line in io.lines(dir .. "/log.jsonl") do lines[#lines + 1] = cjson.decode(line) end
    assert.equal(4, #lines)
    assert.equal(5, lines[1].rating)
    assert.equal(2, lines[4].feedback)
    assert.equal("green.", lines[4].correction)
    assert.equal("default", L:route(lines[1]))
    assert.equal("code", L:route(lines[2]))
    assert.equal("code", L:route(lines[3]))
    -- reopened, ids go on from the log
    local L2 = open(dir, eng)
    assert.equal(4, L2:log { messages = convo(4) })
    -- bad input is named
    assert.has_error(function() L:log { messages = {} } end, "learn:log: messages is empty")
    assert.has_error(function() L:log { messages = convo(1), rating = 6 } end)
    assert.has_error(function() L:feedback(99, { rating = 3 }) end)
    assert.has_error(function() gptoss.learn.open(dir, {}) end, "gptoss.learn.open: engine is required (the gptoss.engine that serves)")
    assert.has_error(function() open(dir, eng, { share = -1 }) end)
    eng:close()
  end)

  it("swaps versions at request boundaries, keeps them on disk and rolls back", function()
    local m = tiny()
    local eng = gptoss.engine(m)
    local L = open(dir, eng)
    assert.is_nil((L:adapter("default")))
    local v1lora = gptoss.lora(m, { r = 4, alpha = 16, seed = 3, init = "random" })
    local v2lora = gptoss.lora(m, { r = 4, alpha = 16, seed = 4, init = "random" })
    assert.equal(1, L:publish("default", v1lora, { note = "first" }))
    local served1, v = L:adapter("default")
    assert.equal(1, v)
    local GEN = { max_tokens = 30, temperature = 0.9, seed = 7, stop_tokens = {} }
    local o1 = { adapter = served1 }
    for k, x in pairs(GEN) do o1[k] = x end
    local r1 = assert(eng:submit(prompt(1), o1))
    assert.equal(2, L:publish("default", v2lora))
    local served2, v2 = L:adapter("default")
    assert.equal(2, v2)
    assert.are_not.equal(served1, served2)
    local o2 = { adapter = served2 }
    for k, x in pairs(GEN) do o2[k] = x end
    local r2 = assert(eng:submit(prompt(1), o2))
    local got1, got2 = r1:result().ids, r2:result().ids
    eng:close()
    -- the oracle: each version's files, loaded apart from the learner
    local want = {}
    for ver = 1, 2 do
      local a = assert(gptoss.adapter.load(string.format("%s/adapters/default/v%04d", dir, ver)))
      local o = { adapter = a }
      for k, x in pairs(GEN) do o[k] = x end
      want[ver] = m:generate(prompt(1), o).ids
      a:close()
    end
    assert.are_not.same(want[1], want[2])
    assert.same(want[1], got1)
    assert.same(want[2], got2)
    local vs = L:versions("default")
    assert.equal(2, #vs)
    assert.equal("first", vs[1].note)
    -- rollback serves version 1's weights again, and survives a reopen
    local back = L:rollback("default", 1)
    assert.equal(1, select(2, L:adapter("default")))
    assert.equal(served1:module(0, "q").A:bytes(), back:module(0, "q").A:bytes())
    local eng2 = gptoss.engine(m)
    local L2 = open(dir, eng2)
    assert.equal(1, select(2, L2:adapter("default")))
    assert.has_error(function() L2:rollback("default", 3) end)
    eng2:close()
  end)

  it("trains a correction in the next round, evaluates against the served version and publishes only if better", function()
    local m = tiny()
    local eng = gptoss.engine(m)
    local L = open(dir, eng, { every = 100 })
    for i = 1, 5 do L:log { messages = convo(i), rating = 5 } end
    L:log { messages = convo(6), rating = 1 }                    -- badly rated, uncorrected: not trained on
    assert.is_false((L:due("default")))                           -- 4 trainable, every = 100
    local cid = L:log { messages = convo(7, "red."), rating = 1 }
    L:feedback(cid, { correction = "blue, it is blue." })
    local due, why = L:due("default")
    assert.is_true(due)
    assert.equal("correction", why)
    local task = assert(L:round("default"))
    local res = assert(task:result())
    local kinds = {}
    for _, e in ipairs(res.examples) do kinds[e.id] = e.kind end
    assert.equal("correction", kinds[cid])
    assert.is_nil(kinds[6])
    assert.is_nil(kinds[3])                                       -- held out (every 3rd)
    -- the held-out losses, recomputed apart: the base model before, the version after
    local _, held = L:examples("default")
    local base = gptoss.lora(m, { r = 4, alpha = 16, seed = 1 })
    eng:close()
    local T = require "gptoss.train"
    local before = T.evaluate(m, base, held)
    assert.near(before, res.eval_before, 1e-9)
    assert.is_true(res.accepted)
    assert.equal(1, res.version)
    local v1 = assert(gptoss.adapter.load(dir .. "/adapters/default/v0001"))
    assert.near(T.evaluate(m, v1, held), res.eval_after, 1e-9)
    assert.is_true(res.eval_after < res.eval_before)
    -- the corrected reply is what it trained on, in the reply's place
    local train = L:examples("default")
    local found
    for _, e in ipairs(train) do if e.id == cid then found = e end end
    assert.equal("correction", found.kind)
    assert.same(convo(7, "blue, it is blue."), found.messages)
    -- nothing new since: no round is due, and none starts
    local eng2 = gptoss.engine(m)
    local L2 = open(dir, eng2, { every = 100 })
    assert.is_false((L2:due("default")))
    local t2, err = L2:round("default")
    assert.is_nil(t2)
    assert.equal("default: no new examples", err)
    eng2:close()
  end)

  it("trains on a second engine (another copy of the model) while the first serves untouched", function()
    local m = tiny()
    local m2 = gptoss.load(H.tiny(), { threads = 1 })
    local serving, training = gptoss.engine(m), gptoss.engine(m2)
    local L = open(dir, serving, { train_engine = training, every = 100 })
    for i = 1, 6 do L:log { messages = convo(i), rating = 5 } end
    local cid = L:log { messages = convo(7, "red."), rating = 1 }
    L:feedback(cid, { correction = "blue." })
    -- requests on the serving engine meanwhile give their tokens alone
    local GEN = { max_tokens = 16, temperature = 0.9, seed = 3, stop_tokens = {} }
    local req = assert(serving:submit(prompt(2), GEN))
    local task = assert(L:round("default"))
    local res = assert(task:result())
    local got = req:result().ids
    local sst, tst = serving:stats(), training:stats()
    serving:close(); training:close()
    local want = m:generate(prompt(2), GEN).ids
    assert.same(want, got)
    assert.equal(0, sst.train_examples)            -- the serving engine trained nothing
    assert.is_true(tst.train_examples > 0)         -- the second one did
    assert.is_true(res.accepted)
    local v1 = assert(gptoss.adapter.load(dir .. "/adapters/default/v0001"))
    assert.near(require("gptoss.train").evaluate(m, v1, select(2, L:examples("default"))), res.eval_after, 1e-9)
    m2:close()
    -- a model of another shape cannot train for this one
    local e1 = gptoss.engine(m)
    local ok, err = pcall(open, dir, e1, { train_engine = { model = { config = { num_hidden_layers = 99 } } } })
    e1:close()
    assert.is_false(ok)
    assert.matches("train_engine's model differs from engine's %(num_hidden_layers 99, not %d+%)", err)
  end)

  it("runs the pipeline end to end from a scripted log while serving", function()
    local m = tiny()
    local eng = gptoss.engine(m)
    local L = open(dir, eng, { every = 3, specialists = { "code" } })
    -- the script: conversations arrive with ratings, one is corrected, some are code
    local script = {}
    for i = 1, 20 do
      local r = { messages = convo(i), rating = (i % 4 == 0) and 2 or 5 }
      if i % 5 == 0 then r.tags = { "code" }; r.messages = convo(i, "print('blue')") end
      script[#script + 1] = r
    end
    local ended, served, reqs, versions = {}, 0, {}, {}
    for i, r in ipairs(script) do
      local id = L:log(r)
      if i == 7 then L:feedback(id, { correction = "blue, it is blue." }) end
      -- a request per conversation, served by the version current at submit
      local name, lora, version = L:choose(r)
      versions[#versions + 1] = version
      reqs[#reqs + 1] = assert(eng:submit(prompt(i), { max_tokens = 6, adapter = lora, stop_tokens = {} }))
      for _, e in ipairs(L:tick()) do ended[#ended + 1] = e end
      for j = #reqs, 1, -1 do
        local _, _, done = reqs[j]:poll()
        if done then served = served + 1; table.remove(reqs, j) end
      end
      assert.is_string(name)
    end
    -- what is due after the script's end runs too, until no round runs
    repeat
      for _, e in ipairs(L:wait()) do ended[#ended + 1] = e end
      for _, e in ipairs(L:tick()) do ended[#ended + 1] = e end
    until not next(L.rounds)
    for _, q in ipairs(reqs) do q:result(); served = served + 1 end
    eng:close()
    assert.equal(20, served)
    local rounds, accepted = 0, 0
    for _, e in ipairs(ended) do
      if e.result then
        rounds = rounds + 1
        if e.result.accepted then accepted = accepted + 1 end
      end
    end
    local why = {}
    for _, e in ipairs(ended) do why[#why + 1] = tostring(e.error) end
    assert.is_true(rounds >= 2, "rounds: " .. rounds .. " " .. table.concat(why, "; "))
    assert.is_true(accepted >= 1)
    -- requests submitted after the first swap were served by a version of it
    assert.equal(0, versions[1])
    assert.is_true(versions[#versions] >= 1 or select(2, L:adapter("default")) >= 1)
    local state = cjson.decode(H.read(dir .. "/state.json"))
    assert.is_true(state.adapters.default.current >= 1)
    assert.is_true(state.adapters.default.rounds >= 2)
    assert.is_true(H.exists(string.format("%s/adapters/default/v%04d/adapter_model.safetensors", dir, state.adapters.default.current)))
  end)
end)
