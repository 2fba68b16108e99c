-- gptoss.engine (continuous batching on its own thread) on the tiny
-- checkpoint, CPU. The oracle for every token is model:generate run alone
-- with the same options; memory against the KV size computed here from the
-- config by hand; fd readiness with a real poll(2).
local H = require "helpers"
local gptoss = require "gptoss"
local clock = gptoss.core.clock

local get_fdpoll = H.fdpoll

local WORDS = { "river", "stone", "light", "seven", "orbit", "maple", "quiet", "hollow", "amber", "lantern", "drift",
  "copper", "meadow", "signal", "harbor", "velvet" }
-- a prompt of about n tokens, different for each k
local function prompt_of(tok, k, n)
  local w = {}
  for i = 1, n do w[i] = WORDS[(i * 7 + k * 3) % #WORDS + 1] end
  local ids = tok:encode(table.concat(w, " "))
  while #ids > n do ids[#ids] = nil end
  return ids
end

-- the id lists one after another, in a new list
local function join(...)
  local out = {}
  for _, ids in ipairs { ... } do
    for _, id in ipairs(ids) do out[#out + 1] = id end
  end
  return out
end

-- runs until done, polling (never blocking but in wait)
local function drain_request(req)
  local ids, text = {}, {}
  repeat
    req:wait(5)
    local got, t, done = req:poll()
    for _, id in ipairs(got) do ids[#ids + 1] = id end
    text[#text + 1] = t
  until done
  return ids, table.concat(text)
end

local function wait_until(what, pred, timeout)
  local t0 = clock()
  while not pred() do
    if clock() - t0 > (timeout or 60) then error("timed out waiting for " .. what) end
    local t = clock() + 0.002
    while clock() < t do end
  end
end

-- KV bytes of a session of `positions` tokens, by hand from the config:
-- every layer keeps K and V for each position (as long as the positions fit
-- in a sliding layer's window + rewind), fp32
local function kv_bytes(cfg, positions)
  return positions * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
end

-- 16 requests with different prompt lengths, sampling options, seeds and
-- adapters, half of them submitted while the first ones decode, each against
-- model:generate alone on the same model (the oracle)
local function check_mixed_requests(m, tok, a1, a2, eopts)
  local samplings = {
    { temperature = 0 },
    { temperature = 0.8, seed = 1 },
    { temperature = 1.2, top_k = 20, seed = 2 },
    { temperature = 0.9, top_p = 0.8, seed = 3 },
    { temperature = 1.0, min_p = 0.05, seed = 4 },
    { temperature = 0.7, repetition_penalty = 1.3, seed = 5 },
    { temperature = 1.1, presence_penalty = 0.5, frequency_penalty = 0.3, seed = 6 },
    { temperature = 0.6, logit_bias = { [tok:encode(" river")[1]] = 4.0 }, seed = 7 },
  }
  local jobs = {}
  for k = 1, 16 do
    local o = {}
    for key, v in pairs(samplings[(k - 1) % #samplings + 1]) do o[key] = v end
    if o.seed then o.seed = o.seed * 100 + k end
    o.max_tokens = 4 + (k * 5) % 9
    o.stop_tokens = k % 4 == 0 and {} or nil
    o.adapter = (k % 3 == 1 and a1) or (k % 3 == 2 and a2) or nil
    -- prompts from 2 to ~70 tokens: several prefill in chunks (chunk_tokens below)
    jobs[k] = { ids = prompt_of(tok, k, 2 + (k * 37) % 70), opts = o }
  end
  for _, j in ipairs(jobs) do j.alone = m:generate(j.ids, j.opts) end

  local o = { max_batch = 16, chunk_tokens = 24 }
  for k, v in pairs(eopts or {}) do o[k] = v end
  local eng = gptoss.engine(m, o)

  finally(function() eng:close() end)
  local reqs = {}
  for k = 1, 8 do reqs[k] = assert(eng:submit(jobs[k].ids, jobs[k].opts)) end
  -- the rest arrive while the first ones decode
  local seen = {}
  wait_until("a request to decode", function()
    for k = 1, 8 do
      local got, _, done = reqs[k]:poll()
      seen[k] = seen[k] or {}
      for _, id in ipairs(got) do table.insert(seen[k], id) end
      if #seen[k] > 0 and not done then return true end
    end
  end)
  for k = 9, 16 do reqs[k] = assert(eng:submit(jobs[k].ids, jobs[k].opts)) end
  for k, req in ipairs(reqs) do
    local r = req:result()
    local alone = jobs[k].alone
    assert.are.same(alone.ids, r.ids, "request " .. k)
    assert.are.equal(alone.text, r.text, "request " .. k)
    assert.are.equal(alone.finish_reason, r.finish_reason, "request " .. k)
    assert.are.same(alone.usage.prompt_tokens, r.usage.prompt_tokens)
    assert.is_true(r.timings.queued >= 0 and r.timings.first_token >= r.timings.queued
                   and r.timings.finished >= r.timings.first_token)
    -- what poll handed out is a prefix of the result
    for i, id in ipairs(seen[k] or {}) do assert.are.equal(r.ids[i], id) end
  end
  local st = eng:stats()
  local total = 0
  for _, j in ipairs(jobs) do total = total + #j.alone.ids end
  assert.are.equal(total, st.generated_tokens)
  -- batched: far fewer steps than tokens
  assert.is_true(st.steps < total / 2, st.steps .. " steps for " .. total .. " tokens")
  eng:close()
  return st, jobs
end

describe("gptoss.engine", function()
  local m, tok, a1, a2
  setup(function()
    m = assert(gptoss.load(H.tiny(), { threads = 2 }))
    tok = m.tokenizer
    a1 = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 11, targets = { "attn" } })
    a2 = gptoss.lora(m, { r = 2, alpha = 4, init = "random", seed = 12, targets = { "attn", "experts" } })
  end)
  teardown(function()
    m:close()
  end)

  it("gives 16 mixed requests, some submitted mid-decode, exactly model:generate's tokens alone", function()
    check_mixed_requests(m, tok, a1, a2)
  end)

  it("grows each request's session a block at a time as it generates, with the same tokens", function()
    -- blocks of 2 positions: a session opens with room for its prompt and
    -- 2 more, and each request generates 4 to 12 tokens
    local st, jobs = check_mixed_requests(m, tok, a1, a2, { kv_block = 2 })
    -- by hand: a session opens for its prompt and a block (in blocks, at most
    -- what prompt + max_tokens reach) and doubles when the next token has no
    -- place; every generated token but the last is fed
    local function blocks(n) return math.ceil(n / 2) * 2 end
    local grows = 0
    for _, j in ipairs(jobs) do
      local n = #j.ids
      local most = blocks(n + j.opts.max_tokens)
      local cap, pos = math.min(blocks(n + 2), most), n
      for _ = 1, #j.alone.ids - 1 do
        if pos >= cap and cap < most then cap = math.min(blocks(2 * cap), most); grows = grows + 1 end
        pos = pos + 1
      end
    end
    assert.is_true(grows >= 8)
    assert.are.equal(grows, st.kv_grows)
    -- a cached session of one capacity serves a request of another
    local system = prompt_of(tok, 20, 40)
    local o = { temperature = 0.8, seed = 5, max_tokens = 30, stop_tokens = {} }
    local first = m:generate(system, o)
    local turn2 = join(system, first.ids, prompt_of(tok, 21, 7))
    local short = { temperature = 0.8, seed = 5, max_tokens = 3, stop_tokens = {} }
    local turn2_alone = m:generate(turn2, short)
    local eng = gptoss.engine(m, { kv_block = 8 })
    finally(function() eng:close() end)
    assert.are.same(first.ids, assert(eng:submit(system, o)):result().ids)
    local r2 = assert(eng:submit(turn2, short)):result()
    assert.are.same(turn2_alone.ids, r2.ids)
    assert.are.equal(#system + #first.ids - 1, r2.usage.prompt_tokens_details.cached_tokens)
    -- the first opened with 40 + 8 positions, grew once to 72 (40 + 30, in
    -- blocks); the second opened with all it reaches (77 + 3, in blocks)
    assert.are.equal(1, eng:stats().kv_grows)
    eng:close()
    assert.matches("kv_block must be an integer", select(2, pcall(gptoss.engine, m, { kv_block = -1 })))
  end)

  it("routes model:generate through a running engine, and generate_batch through one of its own", function()
    local ids = prompt_of(tok, 40, 12)
    local opts = { temperature = 0.9, seed = 77, max_tokens = 6 }
    local alone = m:generate(ids, opts)
    local batch = m:generate_batch({ ids, prompt_of(tok, 41, 20) }, opts)
    local eng = gptoss.engine(m)
    finally(function() eng:close() end)
    local through = m:generate(ids, opts)
    assert.is_table(through.timings)
    for _, k in ipairs { "ids", "text", "finish_reason" } do assert.are.same(alone[k], through[k]) end
    assert.are.equal(alone.usage.total_tokens, through.usage.total_tokens)
    -- a direct use of the model or its sessions is refused while the engine runs
    assert.has_error(function() m:session() end,
      "model is owned by a running engine: submit requests to it (eng:submit), or eng:close() first")
    assert.are.same(batch, m:generate_batch({ ids, prompt_of(tok, 41, 20) }, opts))
    -- on_token sees the same pieces, and returning false stops at the same token
    local function stopper(seen)
      return function(piece, id)
        seen[#seen + 1] = { piece, id }
        if #seen == 3 then return false end
      end
    end
    local seen_engine, seen_alone = {}, {}
    local o3 = { temperature = 0.9, seed = 79, max_tokens = 6, on_token = stopper(seen_engine) }
    local via = m:generate(ids, o3)
    eng:close()
    o3.on_token = stopper(seen_alone)
    local direct = m:generate(ids, o3)
    assert.are.same(seen_alone, seen_engine)
    assert.are.equal("callback", via.finish_reason)
    for _, k in ipairs { "ids", "text", "finish_reason" } do assert.are.same(direct[k], via[k]) end
    -- given back
    assert.are.same(alone, m:generate(ids, opts))
    local o2 = { temperature = 0.9, seed = 78, max_tokens = 6 }
    assert.are.same(m:generate(prompt_of(tok, 41, 20), o2), batch[2])
  end)

  it("applies stop strings and holds back incomplete text", function()
    local ids = prompt_of(tok, 5, 10)
    local ref = m:generate(ids, { temperature = 0, max_tokens = 12, stop_tokens = {} })
    assert.is_true(#ref.text > 6)
    local stop = ref.text:sub(4, 6)
    local alone = m:generate(ids, { temperature = 0, max_tokens = 12, stop_tokens = {}, stop = stop })
    local eng = gptoss.engine(m)
    finally(function() eng:close() end)
    local req = assert(eng:submit(ids, { temperature = 0, max_tokens = 12, stop_tokens = {}, stop = stop }))
    local _, text = drain_request(req)
    local r = req:result()
    assert.are.equal("stop_string", r.finish_reason)
    assert.are.equal(alone.text, r.text)
    assert.are.equal(alone.text, text)
    eng:close()
  end)

  it("cancels a request mid-stream and frees its memory at the next step", function()
    local eng = gptoss.engine(m, { prefix_cache = 0 })
    finally(function() eng:close() end)
    local before = eng:stats()
    assert.are.equal(0, before.kv_active)
    local ids = prompt_of(tok, 9, 20)
    local req = assert(eng:submit(ids, { temperature = 0, max_tokens = 400, stop_tokens = {} }))
    local n = 0
    wait_until("two tokens", function() n = n + #req:poll(); return n >= 2 end)
    local busy = eng:stats()
    assert.are.equal(1, busy.active)
    assert.are.equal(kv_bytes(m.config, #ids + 400), busy.kv_active)
    req:cancel()
    drain_request(req)
    local r = req:result()
    assert.are.equal("cancelled", r.finish_reason)
    assert.is_true(#r.ids < 400)
    local after = eng:stats()
    assert.are.equal(before.kv_active, after.kv_active)
    assert.are.equal(before.kv_in_use, after.kv_in_use)
    assert.are.equal(0, after.active)
    assert.are.equal(1, after.cancelled)
    -- a queued one is cancelled without running
    local q = assert(eng:submit(ids, { temperature = 0, max_tokens = 400, stop_tokens = {} }))
    q:cancel()
    assert.are.equal("cancelled", q:result().finish_reason)
    assert.are.equal(0, eng:stats().kv_active)
    eng:close()
  end)

  it("refuses beyond its queue with queue_full", function()
    local eng = gptoss.engine(m, { max_batch = 1, max_queue = 2 })
    finally(function() eng:close() end)
    local ids = prompt_of(tok, 3, 8)
    local o = { temperature = 0, max_tokens = 300, stop_tokens = {} }
    local first = assert(eng:submit(ids, o))
    wait_until("the first to run", function() return first.c:info().state == "running" end)
    local b = assert(eng:submit(ids, o))
    local c = assert(eng:submit(ids, o))
    local d, msg, code = eng:submit(ids, o)
    assert.is_nil(d)
    assert.are.equal("queue_full", code)
    assert.matches("queue full", msg)
    assert.are.equal(2, eng:stats().queued)
    for _, r in ipairs { first, b, c } do r:cancel() end
    for _, r in ipairs { first, b, c } do assert.are.equal("cancelled", r:result().finish_reason) end
    -- room again
    local e = assert(eng:submit(ids, { temperature = 0, max_tokens = 2 }))
    assert.are.equal(2, #e:result().ids)
    eng:close()
  end)

  it("budgets KV memory: a request that never fits is refused, one that does not fit yet waits", function()
    local budget = kv_bytes(m.config, 64)
    local eng = gptoss.engine(m, { memory = budget, prefix_cache = 0 })
    finally(function() eng:close() end)
    local ids = prompt_of(tok, 4, 10)
    local r, msg, code = eng:submit(ids, { max_tokens = 65 - #ids })   -- 65 positions
    assert.is_nil(r)
    assert.are.equal("too_large", code)
    assert.matches("request too large", msg)
    local o = { temperature = 0, max_tokens = 40 - #ids, stop_tokens = {} }   -- 40 positions each: one at a time
    local alone = m:generate(ids, o)
    eng:close()
    eng = gptoss.engine(m, { memory = budget, prefix_cache = 0 })
    local c0 = clock()
    local a = assert(eng:submit(ids, o))
    local b = assert(eng:submit(ids, o))
    local gap = clock() - c0   -- at least the time between the two submits
    wait_until("the first to run", function() return a.c:info().state == "running" end)
    assert.are.equal("queued", b.c:info().state)
    assert.are.equal(kv_bytes(m.config, 40), eng:stats().kv_active)
    assert.are.equal(kv_bytes(m.config, 40), eng:kv_bytes(40))   -- on the CPU: by positions, whatever the block
    local ra = a:result()
    local rb = b:result()
    assert.are.same(alone.ids, ra.ids)
    assert.are.same(alone.ids, rb.ids)
    -- timings count from each one's submit: b was admitted once a was done
    assert.is_true(rb.timings.queued >= ra.timings.finished - gap - 1e-3, "the second waited for the first")
    eng:close()
  end)

  it("opens sessions of its context: longer prompts are refused, requests stop at its end", function()
    local eng = gptoss.engine(m, { context = 30 })
    finally(function() eng:close() end)
    local long = prompt_of(tok, 30, 40)
    assert.is_true(#long > 30)
    local none, msg, code = eng:submit(long, { max_tokens = 1 })
    assert.is_nil(none)
    assert.are.equal("context_length_exceeded", code)
    assert.matches("exceed the engine's context of 30", msg)
    local ids = {}
    for i = 1, 25 do ids[i] = long[i] end
    local req = assert(eng:submit(ids, { temperature = 0, max_tokens = 100, stop_tokens = {} }))
    local r = req:result()
    assert.are.equal("length", r.finish_reason)
    eng:close()
    assert.are.same(m:generate(ids, { temperature = 0, max_tokens = 5, stop_tokens = {} }).ids, r.ids)
  end)

  it("reuses a cached prefix, reporting hits, with identical tokens", function()
    local system = prompt_of(tok, 20, 40)
    local o = { temperature = 0.8, seed = 5, max_tokens = 8, stop_tokens = {} }
    local first_alone = m:generate(system, o)
    local turn2 = join(system, first_alone.ids, prompt_of(tok, 21, 7))
    local other = join(system, prompt_of(tok, 22, 9))
    local turn2_alone = m:generate(turn2, o)
    local other_alone = m:generate(other, o)
    -- the longest common prefix with the first request's session (its
    -- history: the prompt and every generated token but the last)
    local hist = {}
    for i = 1, #system + #first_alone.ids - 1 do hist[i] = turn2[i] end
    local function lcp(a, b)
      local n = 0
      while n < #a and n < #b - 1 and a[n + 1] == b[n + 1] do n = n + 1 end
      return n
    end

    local eng = gptoss.engine(m)

    finally(function() eng:close() end)
    assert.are.same(first_alone.ids, assert(eng:submit(system, o)):result().ids)
    local r2 = assert(eng:submit(turn2, o)):result()
    assert.are.same(turn2_alone.ids, r2.ids)
    assert.are.equal(lcp(hist, turn2), r2.usage.prompt_tokens_details.cached_tokens)
    assert.are.equal(#system + #first_alone.ids - 1, r2.usage.prompt_tokens_details.cached_tokens)
    local r3 = assert(eng:submit(other, o)):result()
    assert.are.same(other_alone.ids, r3.ids)
    assert.is_true(r3.usage.prompt_tokens_details.cached_tokens >= #system)
    local st = eng:stats()
    assert.are.equal(2, st.prefix_hits)
    assert.are.equal(r2.usage.prompt_tokens_details.cached_tokens + r3.usage.prompt_tokens_details.cached_tokens,
                     st.prefix_tokens)
    assert.are.equal(st.prompt_tokens - st.prefix_tokens, st.prefill_tokens)
    -- another adapter never reuses the base model's KV
    local ra = assert(eng:submit(turn2, { temperature = 0.8, seed = 5, max_tokens = 8, stop_tokens = {}, adapter = a1 }))
    assert.are.equal(0, ra:result().usage.prompt_tokens_details.cached_tokens)
    eng:close()

    -- a rewind past what the sliding layers keep starts afresh, still exact
    eng = gptoss.engine(m, { rewind = 4 })
    assert(eng:submit(turn2, o)):result()
    local short = {}
    for i = 1, 30 do short[i] = turn2[i] end
    short[#short + 1] = tok:encode(" amber")[1]
    local rs = assert(eng:submit(short, o)):result()
    assert.are.equal(0, rs.usage.prompt_tokens_details.cached_tokens)
    eng:close()
    assert.are.same(m:generate(short, o).ids, rs.ids)
  end)

  it("makes eng.fd readable when a request has news", function()
    local P = get_fdpoll()
    local eng = gptoss.engine(m)
    finally(function() eng:close() end)
    assert.is_number(eng.fd)
    assert.is_false(P.readable(eng.fd, 0))
    local req = assert(eng:submit(prompt_of(tok, 6, 6), { temperature = 0, max_tokens = 1 }))
    assert.is_true(P.readable(eng.fd, 20000))
    req:result()
    assert.is_true(eng:drain())
    assert.is_false(P.readable(eng.fd, 0))
    assert.is_false(eng:drain())
    eng:close()
  end)

  it("answers poll in well under a millisecond while the engine is busy", function()
    local eng = gptoss.engine(m, { max_batch = 8 })
    finally(function() eng:close() end)
    local reqs = {}
    for k = 1, 8 do reqs[k] = assert(eng:submit(prompt_of(tok, k, 30), { temperature = 0, max_tokens = 40, stop_tokens = {} })) end
    local times = {}
    wait_until("a step", function() return eng:stats().steps > 0 end)
    local t_end = clock() + 1.0
    while clock() < t_end do
      for _, r in ipairs(reqs) do
        local t0 = clock()
        r:poll()
        times[#times + 1] = clock() - t0
      end
    end
    local st = eng:stats()
    assert.is_true(st.active > 0 or st.steps > 1, "the engine was busy")
    table.sort(times)
    local median, p90 = times[math.floor(#times / 2)], times[math.floor(#times * 0.9)]
    local step = st.busy_s / st.steps
    assert.is_true(median < 1e-3, string.format("median poll %.1f us", median * 1e6))
    assert.is_true(p90 < 1e-3, string.format("p90 poll %.1f us", p90 * 1e6))
    assert.is_true(p90 < step, string.format("p90 poll %.1f us against a step of %.1f us", p90 * 1e6, step * 1e6))
    for _, r in ipairs(reqs) do r:cancel() end
    eng:close()
  end)
end)

describe("gptoss.load's batch_invariant", function()
  it("takes a boolean, reports it, and leaves the CPU's logits as they are (its sums are per row already)", function()
    assert.has_error(function() gptoss.load(H.tiny(), { batch_invariant = 1 }) end,
                     "gptoss.load: batch_invariant must be a boolean (got 1)")
    local plain = assert(gptoss.load(H.tiny()))
    local inv = assert(gptoss.load(H.tiny(), { batch_invariant = true }))
    assert.is_false(plain.batch_invariant)
    assert.is_true(inv.batch_invariant)
    local ids = prompt_of(plain.tokenizer, 5, 30)
    local a, b = plain:session(), inv:session()
    a:feed(ids, "last"); b:feed(ids, "last")
    assert.is_true(a:logits():bytes() == b:logits():bytes())
    a:close(); b:close(); plain:close(); inv:close()
  end)
end)

describe("gptoss.engine on CUDA #gpu", function()
  -- cuBLAS picks its kernels (and split-K) by the number of rows, and the
  -- attention splits by the batch's longest position: a row's logits then
  -- depend on what shares its batch. batch_invariant fixes the order of
  -- every sum; the oracle is the bytes of the same row computed alone.
  it("computes a row of a batch-invariant model bit for bit as it does alone", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cuda:0", batch_invariant = true }))
    assert.is_true(m.batch_invariant)
    local tok = m.tokenizer
    local greedy = gptoss.sampler(m.config.vocab_size, { temperature = 0 })
    local ids = prompt_of(tok, 3, 90)
    -- alone: one prefill of 90 tokens, then one decode step
    local a = m:session()
    a:feed(ids, "last")
    local prefill = a:logits():bytes()
    local t1 = a:sample(greedy)
    local stepped = gptoss.batch_step({ a }, { t1 }, { greedy })
    local after = a:logits():bytes()
    -- the same prompt in chunks of 7, 40 and 43 tokens
    local b = m:session()
    local unpack = table.unpack or unpack
    b:feed({ unpack(ids, 1, 7) }, "none")
    b:feed({ unpack(ids, 8, 47) }, "none")
    b:feed({ unpack(ids, 48, 90) }, "last")
    assert.is_true(prefill == b:logits():bytes(), "the prefill's last row, fed in chunks")
    -- the decode step among 11 other sessions of other lengths and positions
    local ss, toks, smps = { b }, { t1 }, { greedy }
    for k = 1, 11 do
      local o = m:session()
      o:feed(prompt_of(tok, 50 + k, 5 + 23 * k), "last")
      ss[#ss + 1], toks[#toks + 1], smps[#smps + 1] = o, o:sample(greedy), greedy
    end
    local nxt = gptoss.batch_step(ss, toks, smps)
    assert.is_true(after == b:logits():bytes(), "the decode row in a batch of 12")
    assert.are.equal(stepped[1], nxt[1])
    for _, x in ipairs(ss) do x:close() end
    a:close()
    m:close()
  end)

  it("computes a row with an adapter bit for bit as it does alone, among rows of other adapters", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cuda:0", batch_invariant = true }))
    local tok = m.tokenizer
    local a1 = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 11, targets = { "attn" } })
    local a2 = gptoss.lora(m, { r = 2, alpha = 4, init = "random", seed = 12, targets = { "attn", "experts" } })
    local greedy = gptoss.sampler(m.config.vocab_size, { temperature = 0 })
    local ids = prompt_of(tok, 1, 39)
    local a = m:session { adapter = a1 }
    a:feed(ids, "last")
    local prefill = a:logits():bytes()
    local t1 = a:sample(greedy)
    gptoss.batch_step({ a }, { t1 }, { greedy })
    local after = a:logits():bytes()
    local b = m:session { adapter = a1 }
    local unpack = table.unpack or unpack
    b:feed({ unpack(ids, 1, 24) }, "none")
    b:feed({ unpack(ids, 25, 39) }, "last")
    assert.is_true(prefill == b:logits():bytes(), "the prefill's last row, fed in chunks")
    local ss, toks, smps = { b }, { t1 }, { greedy }
    for k = 1, 7 do
      local o = m:session { adapter = k % 3 == 0 and a1 or k % 3 == 1 and a2 or nil }
      o:feed(prompt_of(tok, 60 + k, 5 + 11 * k), "last")
      ss[#ss + 1], toks[#toks + 1], smps[#smps + 1] = o, o:sample(greedy), greedy
    end
    gptoss.batch_step(ss, toks, smps)
    assert.is_true(after == b:logits():bytes(), "the decode row among rows of other adapters")
    for _, x in ipairs(ss) do x:close() end
    a:close(); a1:close(); a2:close()
    m:close()
  end)

  it("draws a row's tokens as it does alone, whatever its place in the batch, logit biases included", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cuda:0", batch_invariant = true }))
    local tok, V = m.tokenizer, m.config.vocab_size
    local river = tok:encode(" river")[1]
    local kinds = {
      { temperature = 1.5 },
      { temperature = 1.2, logit_bias = { [river] = 3.0, [7] = -2.0 } },
      { temperature = 1.3, top_p = 0.95 },
      { temperature = 1.0, top_k = 40, logit_bias = { [river] = 2.0 } },
      { temperature = 1.4, presence_penalty = 0.4 },
      { temperature = 1.1, min_p = 0.02 },
    }
    local ids = prompt_of(tok, 5, 12)
    local function run(order)   -- order[row] = which kind; six steps of every row together
      local ss, toks, smps, got = {}, {}, {}, {}
      for row, k in ipairs(order) do
        local o = {}
        for key, v in pairs(kinds[k]) do o[key] = v end
        o.seed = 40 + k
        ss[row] = m:session()
        ss[row]:feed(ids, "last")
        smps[row] = gptoss.sampler(V, o)
        toks[row] = ss[row]:sample(smps[row])
        got[k] = { toks[row] }
      end
      for _ = 1, 5 do
        toks = gptoss.batch_step(ss, toks, smps)
        for row, k in ipairs(order) do table.insert(got[k], toks[row]) end
      end
      for _, s in ipairs(ss) do s:close() end
      return got
    end
    local alone = {}
    for k = 1, #kinds do alone[k] = run({ k })[k] end
    local forward, backward = run({ 1, 2, 3, 4, 5, 6 }), run({ 6, 5, 4, 3, 2, 1 })
    local distinct = {}
    for k = 1, #kinds do
      assert.are.same(alone[k], forward[k], "kind " .. k .. " in row " .. k)
      assert.are.same(alone[k], backward[k], "kind " .. k .. " in row " .. (#kinds + 1 - k))
      distinct[table.concat(alone[k], ",")] = true
    end
    local n = 0
    for _ in pairs(distinct) do n = n + 1 end
    assert.is_true(n >= 4, "the kinds draw different tokens (" .. n .. " distinct sequences)")
    m:close()
  end)

  it("grows sessions within its memory budget: one that cannot grow yet waits for the oldest, tokens exact", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cuda:0", batch_invariant = true }))
    local tok = m.tokenizer
    local probe = gptoss.engine(m, { kv_block = 8 })
    -- what a session takes grows with its capacity (it is allocated whole)
    local b32, b64, b80 = probe:kv_bytes(28), probe:kv_bytes(60), probe:kv_bytes(80)
    probe:close()
    assert.is_true(b32 < b64 and b64 < b80)
    -- two requests of 20 + 60 positions open with 32 each and grow to 64,
    -- then 80: the budget holds one grown and one not, never both at 64
    local o = { temperature = 0.9, seed = 3, max_tokens = 60, stop_tokens = {} }
    local p1, p2 = prompt_of(tok, 71, 20), prompt_of(tok, 72, 20)
    assert.are.equal(20, #p1); assert.are.equal(20, #p2)
    local alone1, alone2 = m:generate(p1, o), m:generate(p2, o)
    local eng = gptoss.engine(m, { kv_block = 8, memory = b32 + b80, prefix_cache = 0 })
    finally(function() eng:close() end)
    local r1, r2 = assert(eng:submit(p1, o)), assert(eng:submit(p2, o))
    assert.are.same(alone1.ids, r1:result().ids)
    assert.are.same(alone2.ids, r2:result().ids)
    local st = eng:stats()
    assert.are.equal(4, st.kv_grows)
    assert.is_true(st.kv_waits > 0, "the second waited for room")
    assert.are.equal(0, st.kv_active)
    eng:close()
    m:close()
  end)

  it("gives 16 mixed requests, some submitted mid-decode, exactly model:generate's tokens alone (batch-invariant)", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cuda:0", batch_invariant = true }))
    local a1 = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 11, targets = { "attn" } })
    local a2 = gptoss.lora(m, { r = 2, alpha = 4, init = "random", seed = 12, targets = { "attn", "experts" } })
    check_mixed_requests(m, m.tokenizer, a1, a2)
    m:close()
  end)
end)
