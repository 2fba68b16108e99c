-- The CPU engine's sessions, generation API and error handling, on the tiny
-- checkpoint (sliding window 16).
local H = require "helpers"
local gptoss = require "gptoss"

local function max_rel_diff(a, b)
  local worst = 0
  for i = 1, #a do
    local d = math.abs(a[i] - b[i]) / math.max(1e-6, math.abs(b[i]))
    if d > worst then worst = d end
  end
  return worst
end

local function row(f, r) return f:row(r) end

describe("sessions", function()
  local m, ids
  setup(function()
    m = assert(gptoss.load(H.tiny(), { threads = 2 }))
    ids = m.tokenizer:encode("The sliding window of this model is sixteen tokens, so forty tokens of text make it slide twice over.")
    assert.is_true(#ids > 20)
  end)
  teardown(function() m:close() end)

  it("gives the same logits for prefill-then-decode as for one long prefill", function()
    local all = m:logits(ids)
    local s = m:session()
    local half = math.floor(#ids / 2)
    local part = {}
    for i = 1, half do part[i] = ids[i] end
    local lg = s:feed(part, "all")
    for t = 1, half do assert.is_true(max_rel_diff(row(lg, t), row(all, t)) < 1e-5, "prefill position " .. t) end
    for t = half + 1, #ids do
      local one = s:feed({ ids[t] }, "last")
      assert.is_true(max_rel_diff(row(one, 1), row(all, t)) < 1e-5, "decode position " .. t)
    end
    assert.are.equal(#ids, s:pos())
    assert.are.same(ids, s:history())
  end)

  it("plans a feed the sliding ring cannot hold at once as several passes, with the same logits and trace", function()
    -- rewind 4: a ring of 16 + 4 slots, so passes of at most 4 tokens
    local narrow, wide = m:session { rewind = 4 }, m:session()
    narrow:trace(true); wide:trace(true)
    local a = narrow:feed(ids, "all")
    local b = wide:feed(ids, "all")
    assert.are.equal(#ids, narrow:pos())
    for t = 1, #ids do assert.is_true(max_rel_diff(row(a, t), row(b, t)) < 1e-5, "position " .. t) end
    local ta, tb = narrow:trace_get(), wide:trace_get()
    assert.are.equal(#ids, #ta)
    for t = 1, #ids do
      for l = 1, #tb[t] do
        assert.are.equal(table.concat(tb[t][l].experts, ","), table.concat(ta[t][l].experts, ","), "token " .. t .. " layer " .. l)
      end
    end
    -- the last row is what the session samples from
    local last = narrow:logits()
    assert.are.equal(a:row(#ids)[1], last:row(1)[1])
    narrow:close(); wide:close()
  end)

  it("forks: the fork continues exactly like the original", function()
    local s = m:session()
    s:feed(ids, "none")
    local f = s:fork()
    local a = s:feed({ 1000, 2000 }, "all")
    local b = f:feed({ 1000, 2000 }, "all")
    assert.are.equal(a:bytes(), b:bytes())
    -- and they are independent afterwards
    local c = s:feed({ 5 }, "last")
    local d = f:feed({ 6 }, "last")
    assert.are_not.equal(c:bytes(), d:bytes())
  end)

  it("forks the first keep positions into a session of another capacity, which continues as a fresh one fed them", function()
    local long = {}
    for i = 1, 60 do long[i] = ids[(i - 1) % #ids + 1] end
    local tail = { 1000, 2000, 3000 }
    -- the continuation of a fresh session fed long[1..keep]: the oracle
    local function fresh(keep)
      local s = m:session()
      local head = {}
      for i = 1, keep do head[i] = long[i] end
      s:feed(head, "none")
      return s:feed(tail, "all"):bytes()
    end
    local s = m:session()
    s:feed(long, "none")
    local f = s:fork { keep = 30, context = 64 }
    assert.are.equal(30, f:pos())
    assert.are.equal(64, f:context())
    local head30 = {}
    for i = 1, 30 do head30[i] = long[i] end
    assert.are.same(head30, f:history())
    assert.are.equal(fresh(30), f:feed(tail, "all"):bytes())
    -- a source whose sliding ring (16 + 4) has wrapped, into a wider ring
    local w = m:session { rewind = 4 }
    w:feed(long, "none")
    local g = w:fork { keep = 58, context = 128, rewind = 8 }
    assert.are.equal(fresh(58), g:fork():feed(tail, "all"):bytes())
    -- the copy rewinds as far as its source could: to 56 (the window before
    -- it, positions 40 on, is still held), not to 54
    g:rewind(56)
    assert.are.equal(fresh(56), g:feed(tail, "all"):bytes())
    local ok, err = pcall(g.rewind, g, 54)
    assert.is_false(ok)
    assert.matches("sliding layers keep only", err)
    -- keep alone: the session's own capacity
    local k = s:fork { keep = 10 }
    assert.are.equal(s:context(), k:context())
    assert.are.equal(fresh(10), k:feed(tail, "all"):bytes())
    -- what cannot be: past the end, a context too small, a window no longer held
    assert.matches("keep must be an integer in 0..60", select(2, pcall(s.fork, s, { keep = 61 })))
    assert.matches("a context of 20 cannot hold the 30 positions kept", select(2, pcall(s.fork, s, { keep = 30, context = 20 })))
    assert.matches("cannot rewind from 60 to 50", select(2, pcall(w.fork, w, { keep = 50 })))
    assert.matches("s:fork: unknown option 'size'", select(2, pcall(s.fork, s, { size = 3 })))
    -- back to 0 and fed again, a wrapped ring holds the new positions: a
    -- fork of them (and one of nothing, fed afterwards) copies them all
    w:rewind(0)
    local head30 = {}
    for i = 1, 30 do head30[i] = long[i] end
    w:feed(head30, "none")
    assert.are.equal(fresh(30), w:fork():feed(tail, "all"):bytes())
    local z = w:fork { keep = 0 }
    z:feed(head30, "none")
    assert.are.equal(fresh(30), z:fork():feed(tail, "all"):bytes())
  end)

  it("checks a second rewind against what the ring still holds, not against where the first left it", function()
    local s = m:session { rewind = 4 }   -- ring of 16 + 4: feeding 60 overwrote positions before 40
    local long = {}
    for i = 1, 60 do long[i] = ids[(i - 1) % #ids + 1] end
    s:feed(long, "none")
    s:rewind(57)
    -- 54's window reaches back to 38: gone, though 57 - 20 = 37 would suggest otherwise
    local ok, err = pcall(s.rewind, s, 54)
    assert.is_false(ok)
    assert.matches("cannot rewind from 57 to 54", err)
    s:rewind(56)
    assert.are.equal(56, s:pos())
  end)

  it("rewinds: re-feeding the same tokens reproduces the logits", function()
    local s = m:session()
    local first = s:feed(ids, "all")
    local back = #ids - 10
    s:rewind(back)
    assert.are.equal(back, s:pos())
    local tail = {}
    for i = back + 1, #ids do tail[#tail + 1] = ids[i] end
    local again = s:feed(tail, "all")
    for k = 1, #tail do assert.are.equal(first:get(back + k, 1), again:get(k, 1)) end
    assert.are.same(row(first, #ids), row(again, #tail))
  end)

  it("refuses a rewind further back than the sliding ring keeps", function()
    local s = m:session { rewind = 4 }   -- ring of 16 + 4
    local long = {}
    for i = 1, 60 do long[i] = ids[(i - 1) % #ids + 1] end
    s:feed(long, "none")
    assert.has_error(function() s:rewind(50) end)
    s:rewind(57)
    assert.are.equal(57, s:pos())
    local ok, err = pcall(s.rewind, s, 50)
    assert.is_false(ok)
    assert.matches("sliding layers keep only the last 20 positions", err)
    s:rewind(0)   -- back to empty is always possible
    assert.are.equal(0, s:pos())
  end)

  it("a fork into a new context keeps its source's rewind unless given one", function()
    local s = m:session { context = 200, rewind = 4 }   -- ring of 16 + 4
    local long = {}
    for i = 1, 60 do long[i] = ids[(i - 1) % #ids + 1] end
    s:feed(long, "none")
    local f = s:fork { context = 100 }
    f:feed({ ids[1], ids[2], ids[3], ids[4], ids[5], ids[6] }, "none")
    -- at 66 a ring of 20 keeps 46..65; a rewind to 58 needs the window 42..57
    local ok, err = pcall(f.rewind, f, 58)
    assert.is_false(ok)
    assert.matches("sliding layers keep only the last 20 positions", err)
    local g = s:fork { context = 100, rewind = 40 }   -- asked for: a ring of 16 + 40
    g:feed({ ids[1], ids[2], ids[3], ids[4], ids[5], ids[6] }, "none")
    g:rewind(58)
    assert.are.equal(58, g:pos())
    s:close(); f:close(); g:close()
  end)

  it("prefills prompts longer than one chunk the same as token by token", function()
    local long = {}
    for i = 1, 300 do long[i] = ids[(i * 7) % #ids + 1] end
    local s1 = m:session()
    local a = s1:feed(long, "last")
    local s2 = m:session()
    for i = 1, #long - 1 do s2:feed({ long[i] }, "none") end
    local b = s2:feed({ long[#long] }, "last")
    assert.is_true(max_rel_diff(row(a, 1), row(b, 1)) < 1e-5)
  end)

  it("enforces the context limit with a clear error", function()
    local small = assert(gptoss.load(H.tiny(), { context = 32, threads = 1 }))
    local s = small:session()
    local many = {}
    for i = 1, 33 do many[i] = 100 + i end
    local ok, err = pcall(s.feed, s, many, "none")
    assert.is_false(ok)
    assert.matches("context limit: the session holds 0 tokens and 33 more exceed its context of 32", err)
    s:feed({ 1, 2, 3 }, "none")
    -- generation stops at the context with finish_reason "length"
    local r = small:generate({ 1, 2, 3 }, { temperature = 0, max_tokens = 100, stop_tokens = {} })
    assert.are.equal("length", r.finish_reason)
    assert.are.equal(32, r.usage.total_tokens)
    small:close()
  end)
end)

describe("generation API", function()
  local m, prompt
  setup(function()
    m = assert(gptoss.load(H.tiny(), { threads = 2 }))
    prompt = m.tokenizer:encode("Once upon a time")
  end)
  teardown(function() m:close() end)

  it("chat: the rendered prompt as prompt_ids, its length as usage.prompt_tokens", function()
    local harmony = require "gptoss.harmony"
    local msgs = { { role = "user", content = "Hi" } }
    local r = gptoss.chat(m, msgs, { temperature = 0, max_tokens = 3, date = "2026-11-22" })
    local want = harmony.render({ system = { date = "2026-11-22" }, messages = msgs, mode = "completion" }, m.tokenizer)
    assert.are.same(want, r.prompt_ids)
    assert.are.same({ prompt_tokens = #want, completion_tokens = #r.ids, total_tokens = #want + #r.ids }, r.usage)
    assert.is_nil(r.prompt_tokens)
  end)

  it("returns ids, text, finish reason and usage; greedy equals the argmax chain", function()
    local r = m:generate(prompt, { temperature = 0, max_tokens = 6 })
    assert.are.equal("length", r.finish_reason)
    assert.are.equal(6, #r.ids)
    assert.are.same({ prompt_tokens = #prompt, completion_tokens = 6, total_tokens = #prompt + 6 }, r.usage)
    assert.are.equal(m.tokenizer:decode(r.ids), r.text)
    local seq = {}
    for i, id in ipairs(prompt) do seq[i] = id end
    for _ = 1, 6 do
      local lg = m:logits(seq)
      seq[#seq + 1] = (lg:argmax(#seq))
    end
    for k = 1, 6 do assert.are.equal(seq[#prompt + k], r.ids[k]) end
  end)

  it("stops on stop tokens and on stop strings", function()
    local r = m:generate(prompt, { temperature = 0, max_tokens = 8 })
    local third = r.ids[3]
    local s = m:generate(prompt, { temperature = 0, max_tokens = 8, stop_tokens = { third } })
    assert.are.equal("stop", s.finish_reason)
    assert.are.same({ r.ids[1], r.ids[2], r.ids[3] }, s.ids)
    local piece = m.tokenizer:decode({ r.ids[4] })
    local ss = m:generate(prompt, { temperature = 0, max_tokens = 8, stop = { piece } })
    assert.are.equal("stop_string", ss.finish_reason)
    assert.are.equal(m.tokenizer:decode({ r.ids[1], r.ids[2], r.ids[3] }), ss.text)
  end)

  it("streams (piece, id) pairs that add up to generate's result", function()
    local r = m:generate(prompt, { temperature = 0.8, seed = 5, max_tokens = 10 })
    local ids, text = {}, {}
    local it, info = m:stream(prompt, { temperature = 0.8, seed = 5, max_tokens = 10 })
    for piece, id in it do ids[#ids + 1] = id; text[#text + 1] = piece end
    assert.are.same(r.ids, ids)
    assert.are.equal(r.text, table.concat(text))
    assert.are.equal("length", info.finish_reason)
  end)

  it("is reproducible with a seed", function()
    local a = m:generate(prompt, { seed = 9, max_tokens = 12, temperature = 1.0 })
    local b = m:generate(prompt, { seed = 9, max_tokens = 12, temperature = 1.0 })
    local c = m:generate(prompt, { seed = 10, max_tokens = 12, temperature = 1.0 })
    assert.are.same(a.ids, b.ids)
    assert.are_not.same(a.ids, c.ids)
  end)

  it("lets on_token stop generation by returning false", function()
    local n = 0
    local r = m:generate(prompt, { max_tokens = 20, on_token = function() n = n + 1; return n < 3 end })
    assert.are.equal(3, #r.ids)
    assert.are.equal("callback", r.finish_reason)
  end)

  it("propagates an error raised in a callback and stays usable", function()
    local s = m:session()
    s:feed({ 1, 2 }, "none")
    local ok, err = pcall(m.generate, m, prompt, { max_tokens = 5, session = s,
      on_token = function() error("callback failed on purpose") end })
    assert.is_false(ok)
    assert.matches("callback failed on purpose", err)
    -- the session holds the prompt and is still consistent
    assert.are.equal(2 + #prompt, s:pos())   -- the token handed to the failing callback was not fed
    local r = m:generate(prompt, { temperature = 0, max_tokens = 3 })
    assert.are.equal(3, #r.ids)
    s:feed({ 3 }, "last")
  end)

  it("continues a given session (multi-turn reuse)", function()
    local s = m:session()
    local r1 = m:generate(prompt, { temperature = 0, max_tokens = 4, session = s })
    assert.are.equal(#prompt + 3, s:pos())   -- the last sampled token is not fed
    local more = m.tokenizer:encode(" and then")
    local r2 = m:generate(more, { temperature = 0, max_tokens = 4, session = s })
    local whole = {}
    for _, id in ipairs(prompt) do whole[#whole + 1] = id end
    for i = 1, 3 do whole[#whole + 1] = r1.ids[i] end
    for _, id in ipairs(more) do whole[#whole + 1] = id end
    local direct = m:generate(whole, { temperature = 0, max_tokens = 4 })
    assert.are.same(direct.ids, r2.ids)
  end)

  it("steps a batch together with the same results as one at a time", function()
    local prompts = { prompt, m.tokenizer:encode("The quick brown fox"), m.tokenizer:encode("1 2 3 4") }
    local batch = m:generate_batch(prompts, { temperature = 0, max_tokens = 7 })
    for i, p in ipairs(prompts) do
      assert.are.same(m:generate(p, { temperature = 0, max_tokens = 7 }).ids, batch[i].ids)
    end
    local sampled = m:generate_batch(prompts, { temperature = 1, seed = 3, max_tokens = 5 })
    for i, p in ipairs(prompts) do
      assert.are.same(m:generate(p, { temperature = 1, seed = 3 + i - 1, max_tokens = 5 }).ids, sampled[i].ids)
    end
  end)

  it("computes loss and perplexity as the mean next-token cross-entropy", function()
    local lg = m:logits(prompt)
    local s = 0
    for t = 1, #prompt - 1 do
      local r = lg:row(t)
      local mx = -math.huge
      for _, v in ipairs(r) do if v > mx then mx = v end end
      local z = 0
      for _, v in ipairs(r) do z = z + math.exp(v - mx) end
      s = s - (r[prompt[t + 1] + 1] - mx - math.log(z))
    end
    local want = s / (#prompt - 1)
    assert.is_true(math.abs(m:loss(prompt) - want) < 1e-6)
    assert.is_true(math.abs(m:perplexity("Once upon a time") - math.exp(want)) / math.exp(want) < 1e-6)
  end)
end)

describe("engine errors", function()
  local m
  setup(function() m = assert(gptoss.load(H.tiny(), { threads = 1 })) end)
  teardown(function() m:close() end)

  it("rejects an empty prompt, out-of-range ids and bad options", function()
    assert.has_error(function() m:generate({}, {}) end, "model:generate: ids must be a non-empty table of token ids (got table)")
    assert.has_error(function() m:logits({}) end, "model:logits: ids is empty")
    local ok, err = pcall(m.generate, m, { 5, 201088 }, { max_tokens = 2 })
    assert.is_false(ok)
    assert.matches("token id 201088 at index 1 is outside the vocabulary %(0%.%.201087%)", err)
    assert.has_error(function() m:generate({ 1 }, { temprature = 1 }) end, "model:generate: unknown option 'temprature'")
    assert.has_error(function() m:generate({ 1 }, { temperature = -1 }) end)
    assert.has_error(function() m:generate({ 1 }, { top_p = 0 }) end)
    assert.has_error(function() m:generate({ 1 }, { max_tokens = 0 }) end)
    assert.has_error(function() m:generate({ 1 }, { stop = { "" } }) end)
    assert.has_error(function() m:session():feed({ 1 }, "most") end)
    assert.has_error(function() m:generate({ 1.5 }) end)
  end)

  it("raises when the model is closed mid-stream", function()
    local m2 = assert(gptoss.load(H.tiny(), { threads = 1 }))
    local it = m2:stream({ 1, 2, 3 }, { max_tokens = 10, temperature = 0 })
    assert.is_number(select(2, it()))
    m2:close()
    local ok, err = pcall(it)
    assert.is_false(ok)
    assert.matches("closed", err)
  end)

  it("batches only distinct sessions of one model", function()
    local s = m:session()
    s:feed({ 1 }, "last")
    local smp = gptoss.sampler(m.config.vocab_size, { temperature = 0 })
    assert.has_error(function() gptoss.batch_step({ s, s }, { 1, 2 }, { smp, smp }) end)
    assert.has_error(function() gptoss.batch_step({ s }, { 1, 2 }, { smp }) end)
  end)
end)
