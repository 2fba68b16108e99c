-- Log-probabilities (issue 19): the engine's per-token logprobs and top
-- alternatives, gptoss.engine's Lua side, and the server's OpenAI objects.
-- The oracle never touches the engine's logprob code: log_softmax computed
-- here in Lua, in double, from a direct session's logits of the same
-- tokens, and the k most likely by k passes of argmax. The server runs in a
-- real nginx, driven with curl and OpenAI's Node SDK.
local H = require "helpers"
local gptoss = require "gptoss"

local TOL = 1e-5

-- {====================================================== the oracle
-- log_softmax of a row of logits (Lua array, index id + 1): lp(id), the k
-- most likely ids (the higher logit first, equal ones by id) and the sum of
-- exp(lp) over the whole vocabulary
local function oracle(row, k)
  local mx = -math.huge
  for i = 1, #row do if row[i] > mx then mx = row[i] end end
  local sum = 0
  for i = 1, #row do sum = sum + math.exp(row[i] - mx) end
  local lse = mx + math.log(sum)
  local total = 0
  for i = 1, #row do total = total + math.exp(row[i] - lse) end
  local top, taken = {}, {}
  for j = 1, k do
    local best
    for i = 1, #row do
      if not taken[i] and (not best or row[i] > row[best]) then best = i end
    end
    taken[best] = true
    top[j] = best - 1
  end
  return { lp = function(id) return row[id + 1] - lse end, top = top, total = total }
end

-- every entry of logprobs (the engine's, for the tokens `ids` after
-- `prompt`) against the oracle on a direct session's logits, within tol
-- (1e-5; the top ids exactly in the oracle's order), or, on CUDA, whose
-- engine and session run different kernels, within gpu_tol (the top list's
-- j-th entry has the oracle's j-th logprob); returns how many rows it checked
local function check_against_oracle(m, prompt, ids, logprobs, k, gpu_tol)
  local tol = gpu_tol or TOL
  assert.equal(#ids, #logprobs)
  local all = {}
  for _, id in ipairs(prompt) do all[#all + 1] = id end
  for _, id in ipairs(ids) do all[#all + 1] = id end
  local rows = H.session_logits(m, all)
  for i, id in ipairs(ids) do
    local o = oracle(rows:row(#prompt + i - 1), k)
    assert.is_true(math.abs(o.total - 1) < 1e-9, "the oracle's probabilities sum to " .. o.total)
    local e = logprobs[i]
    assert.equal(id, e.id)
    assert.is_true(math.abs(e.logprob - o.lp(id)) < tol, string.format("token %d: %.9g, the oracle %.9g", i, e.logprob, o.lp(id)))
    assert.equal(k, #e.top)
    for j, t in ipairs(e.top) do
      if gpu_tol then
        assert.is_true(math.abs(t.logprob - o.lp(o.top[j])) < tol, string.format("token %d, top %d", i, j))
      else
        assert.equal(o.top[j], t.id, string.format("token %d, top %d", i, j))
      end
      assert.is_true(math.abs(t.logprob - o.lp(t.id)) < tol)
    end
  end
  return #ids
end

local WORDS = { "river", "stone", "light", "seven", "orbit", "maple", "quiet", "hollow", "amber", "lantern" }
local function prompt_of(tok, k)
  local w = {}
  for i = 1, 6 + k do w[i] = WORDS[(i * 3 + k) % #WORDS + 1] end
  return tok:encode(table.concat(w, " "))
end

-- polls until done: the ids and logprobs as they came, and the result
local function drain(req)
  local ids, lps, saw_nil = {}, {}, false
  repeat
    req:wait(5)
    local got, _, done, _, lp = req:poll()
    saw_nil = saw_nil or lp == nil
    for i, id in ipairs(got) do ids[#ids + 1], lps[#lps + 1] = id, lp and lp[i] end
  until done
  return ids, (not saw_nil) and lps or nil, req:result()
end
-- }======================================================

describe("logprobs: the engine", function()
  local m, tok
  setup(function()
    m = assert(gptoss.load(H.tiny()))
    tok = m.tokenizer
  end)
  teardown(function() m:close() end)

  it("gives each sampled token's log_softmax of the raw logits and the k most likely, in requests batched together", function()
    local bias = tok:encode(" river")[1]
    local jobs = {
      { temperature = 0, max_tokens = 5, logprobs = true, top_logprobs = 5 },
      -- penalties, bias and temperature change what is sampled, not the logprobs (the raw distribution's)
      { temperature = 0.9, seed = 3, max_tokens = 5, logprobs = true, top_logprobs = 2, repetition_penalty = 1.3,
        logit_bias = { [bias] = 6 } },
      { temperature = 1.2, top_k = 20, seed = 4, max_tokens = 4, logprobs = true },
      { temperature = 0.7, seed = 5, max_tokens = 6 },
    }
    local eng = gptoss.engine(m, { max_batch = 8 })
    local reqs = {}
    for k, o in ipairs(jobs) do
      o.stop_tokens = {}
      reqs[k] = assert(eng:submit(prompt_of(tok, k), o))
    end
    local out = {}
    for k, req in ipairs(reqs) do
      local ids, lps, res = drain(req)
      out[k] = { ids = ids, lps = lps, res = res }
    end
    eng:close()
    local rows = 0
    for k, o in ipairs(jobs) do
      local r = out[k]
      assert.equal(o.max_tokens, #r.res.ids)
      assert.same(r.res.ids, r.ids)
      if o.logprobs then
        assert.same(r.res.logprobs, r.lps)   -- what poll gave, in order, is the result's list
        rows = rows + check_against_oracle(m, prompt_of(tok, k), r.res.ids, r.res.logprobs, o.top_logprobs or 0)
      else
        assert.is_nil(r.lps)
        assert.is_nil(r.res.logprobs)
      end
    end
    assert.equal(14, rows)
  end)

  it("under greedy decoding, the chosen token is the first of the top list and its logprob the list's max", function()
    local eng = gptoss.engine(m)
    local res = eng:submit(prompt_of(tok, 7), { temperature = 0, max_tokens = 6, logprobs = true, top_logprobs = 4 }):result()
    eng:close()
    assert.equal(6, #res.logprobs)
    for i, e in ipairs(res.logprobs) do
      assert.equal(res.ids[i], e.top[1].id)
      assert.equal(e.logprob, e.top[1].logprob)
      for j = 2, 4 do assert.is_true(e.top[j].logprob <= e.top[j - 1].logprob) end
      assert.is_true(e.logprob < 0)
    end
  end)

  it("records the 20 most likely, as many as the engine keeps", function()
    local eng = gptoss.engine(m)
    local prompt = prompt_of(tok, 2)
    local res = eng:submit(prompt, { temperature = 0.8, seed = 9, max_tokens = 1, logprobs = true, top_logprobs = 20 }):result()
    eng:close()
    assert.equal(20, gptoss.core.MAX_TOP_LOGPROBS)
    check_against_oracle(m, prompt, res.ids, res.logprobs, 20)
  end)

  it("samples the same tokens with and without logprobs", function()
    local eng = gptoss.engine(m)
    local o = { temperature = 1.0, seed = 11, max_tokens = 8 }
    local plain = eng:submit(prompt_of(tok, 3), o):result()
    o.logprobs, o.top_logprobs = true, 3
    local with = eng:submit(prompt_of(tok, 3), o):result()
    eng:close()
    assert.same(plain.ids, with.ids)
    assert.equal(8, #with.logprobs)
  end)

  it("keeps an entry per id the request keeps when a stop string ends it", function()
    local eng = gptoss.engine(m)
    local prompt = prompt_of(tok, 5)
    local full = eng:submit(prompt, { temperature = 0, max_tokens = 8, logprobs = true, stop_tokens = {} }):result()
    -- a stop string the text of a token from the third on completes (the
    -- first that is whole UTF-8 and not empty)
    local at
    for i = 3, #full.ids do
      local b = tok:decode_bytes { full.ids[i] }
      if b ~= "" and tok:decode { full.ids[i] } == b then at = i; break end
    end
    assert.is_number(at)
    local stop = tok:decode { full.ids[at] }
    local cut = eng:submit(prompt, { temperature = 0, max_tokens = 8, logprobs = true, stop_tokens = {}, stop = stop }):result()
    eng:close()
    assert.is_true(#cut.ids <= at)
    assert.equal(#cut.ids, #cut.logprobs)
    for i = 1, #cut.ids do
      assert.equal(full.ids[i], cut.logprobs[i].id)
      assert.is_true(math.abs(full.logprobs[i].logprob - cut.logprobs[i].logprob) < 1e-6)
    end
  end)

  it("refuses bad logprobs options, naming the function and the parameter and quoting the value", function()
    local eng = gptoss.engine(m)
    local ids = prompt_of(tok, 1)
    local cases = {
      { { logprobs = true, top_logprobs = 21 }, "submit: top_logprobs must be an integer in 0..20 (got 21)" },
      { { logprobs = true, top_logprobs = -1 }, "submit: top_logprobs must be an integer in 0..20 (got -1)" },
      { { logprobs = true, top_logprobs = 2.5 }, "submit: top_logprobs must be an integer in 0..20 (got 2.5)" },
      { { logprobs = true, top_logprobs = "3" }, "submit: top_logprobs must be an integer in 0..20 (got 3)" },
      { { top_logprobs = 2 }, "submit: top_logprobs needs logprobs = true" },
      { { logprobs = 1 }, "submit: logprobs must be a boolean (got 1)" },
      { { logprobs = "yes" }, "submit: logprobs must be a boolean (got yes)" },
    }
    for _, c in ipairs(cases) do
      c[1].max_tokens = 1
      local ok, err = pcall(eng.submit, eng, ids, c[1])
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(c[2], 1, true), tostring(err))
    end
    eng:close()
  end)
end)

describe("logprobs: the engine on CUDA #gpu", function()
  it("gives what a CUDA session's logits give, alone (the fused decode step) and batched", function()
    local m = assert(gptoss.load(H.tiny(), { device = "cuda:0" }))
    local tok = m.tokenizer
    local eng = gptoss.engine(m, { context = 256 })
    local o = { temperature = 0, max_tokens = 4, logprobs = true, top_logprobs = 5, stop_tokens = {} }
    local alone = eng:submit(prompt_of(tok, 1), o):result()
    local a, b = eng:submit(prompt_of(tok, 2), o), eng:submit(prompt_of(tok, 3), o)
    local ra, rb = a:result(), b:result()
    eng:close()
    check_against_oracle(m, prompt_of(tok, 1), alone.ids, alone.logprobs, 5, 2e-3)
    check_against_oracle(m, prompt_of(tok, 2), ra.ids, ra.logprobs, 5, 2e-3)
    check_against_oracle(m, prompt_of(tok, 3), rb.ids, rb.logprobs, 5, 2e-3)
    m:close()
  end)
end)

describe("logprobs: the server's objects", function()
  local LP = require "gptoss.server.logprobs"
  local tok
  setup(function() tok = gptoss.tokenizer(H.tokenizer_dir) end)

  -- ids of the o200k byte tokens: 158 is the byte 0xe2 alone, 43120 the
  -- first two bytes of U+1D518, 242 and 246 continuation bytes 0x94, 0x98
  it("shows a token that is a piece of a character as bytes:\\xNN, and every token's bytes", function()
    local view = LP.viewer(tok)
    local text, bytes = view(158)
    assert.equal("bytes:\\xe2", text)
    assert.same({ 226 }, bytes)
    text, bytes = view(5087)
    assert.equal("€", text)
    assert.same({ 0xe2, 0x82, 0xac }, bytes)
    assert.equal("bytes:\\xf0\\x9d", (view(43120)))
  end)

  it("writes the legacy object: the sampled token among the top ones, text offsets in characters", function()
    local view = LP.viewer(tok)
    local entries = {
      { id = 43120, logprob = -0.5, top = { { id = 158, logprob = -0.25 } } },
      { id = 242, logprob = -1, top = { { id = 242, logprob = -1 } } },
      { id = 246, logprob = -2, top = { { id = 246, logprob = -2 } } },
      { id = 5087, logprob = -3, top = { { id = 158, logprob = -0.5 } } },
    }
    local lp, after = LP.legacy(view, entries, 7)
    assert.same({ "bytes:\\xf0\\x9d", "bytes:\\x94", "bytes:\\x98", "€" }, lp.tokens)
    assert.same({ -0.5, -1, -2, -3 }, lp.token_logprobs)
    assert.same({ 7, 8, 8, 8 }, lp.text_offset)   -- U+1D518 is one character, over three tokens
    assert.equal(9, after)
    local json = require "gptoss.json"
    assert.equal('{"bytes:\\\\xe2":-0.25,"bytes:\\\\xf0\\\\x9d":-0.5}', json.encode_compact(lp.top_logprobs[1]))
    assert.equal('{"bytes:\\\\x94":-1}', json.encode_compact(lp.top_logprobs[2]))
    assert.equal('{"bytes:\\\\xe2":-0.5,"€":-3}', json.encode_compact(lp.top_logprobs[4]))
  end)
end)

-- {====================================================== the server
local X = require "server.harness"
local missing = X.missing()
if not jit then missing = "LuaJIT to run the server (nginx runs it in its own LuaJIT; once is enough)" end
if missing then
  describe("logprobs: the server", function() pending("needs " .. missing) end)
  return
end
local S = require "server.scripted"
local cjson = require "cjson"
local THINK_REPLY = "<|channel|>analysis<|message|>User greets.<|end|>Hello there!<|return|>"

describe("logprobs: the server", function()
  local tok, main, think, think_dir, R
  setup(function()
    X.sdk()
    R = require "gptoss.server.request"
    local model = assert(gptoss.load(H.tiny()))
    tok = model.tokenizer
    think_dir = S.write(H.tiny(), H.tmpdir() .. "/think-lp", THINK_REPLY, tok)
    model:close()
    main = X.start { GPTOSS_MODEL = H.tiny(), GPTOSS_THREADS = "1" }
    think = X.start { GPTOSS_MODEL = think_dir, GPTOSS_MODEL_NAME = "scripted", GPTOSS_THREADS = "1" }
  end)
  teardown(function()
    for _, s in ipairs { main, think } do if s then s:stop() end end
  end)

  local function bytes_of(s)
    local t = {}
    for i = 1, #s do t[i] = s:byte(i) end
    return t
  end

  -- an OpenAI entry ({ token, logprob, bytes, top_logprobs }) against the
  -- oracle's row for the token id
  local function check_entry(e, id, o, k)
    local b = tok:decode_bytes { id }
    assert.equal(b, e.token)
    assert.same(bytes_of(b), e.bytes)
    assert.is_true(math.abs(e.logprob - o.lp(id)) < TOL, string.format("%s: %.9g, the oracle %.9g", b, e.logprob, o.lp(id)))
    assert.equal(k, #e.top_logprobs)
    for j, t in ipairs(e.top_logprobs) do
      local tb = tok:decode_bytes { o.top[j] }
      if tok:decode { o.top[j] } == tb then assert.equal(tb, t.token) end
      assert.same(bytes_of(tb), t.bytes)
      assert.is_true(math.abs(t.logprob - o.lp(o.top[j])) < TOL)
    end
  end

  -- the scripted reply's content tokens ("Hello there!") and the oracle's
  -- rows for them, from a session of the scripted checkpoint fed the prompt
  -- the server renders and the whole reply
  local function scripted_oracle(k)
    local m = assert(gptoss.load(think_dir))
    local prompt = R.prompt(m.tokenizer, { messages = { { role = "user", content = "Hi" } }, effort = "low" })
    local reply = tok:encode(THINK_REPLY, { allowed_special = "all" })
    local content = tok:encode("Hello there!")
    local all = {}
    for _, id in ipairs(prompt) do all[#all + 1] = id end
    for _, id in ipairs(reply) do all[#all + 1] = id end
    local rows = H.session_logits(m, all)
    local first = #reply - #content   -- the reply's ids before the content, <|return|> after it
    local out = {}
    for i, id in ipairs(content) do
      assert.equal(reply[first + i - 1], id)
      out[i] = { id = id, o = oracle(rows:row(#prompt + first + i - 2), k) }
    end
    m:close()
    return out
  end

  it("chat: logprobs.content of the message's tokens against the oracle, streamed and not (curl)", function()
    local body = { model = "scripted", messages = { { role = "user", content = "Hi" } }, max_tokens = 30,
                   reasoning_effort = "low", logprobs = true, top_logprobs = 3 }
    local r = think:post("/v1/chat/completions", body)
    assert.equal(200, r.status, r.body)
    local c = r.json.choices[1]
    assert.equal("Hello there!", c.message.content)
    assert.equal(cjson.null, c.logprobs.refusal)
    local expect = scripted_oracle(3)
    assert.equal(#expect, #c.logprobs.content)
    local text = {}
    for i, x in ipairs(expect) do
      check_entry(c.logprobs.content[i], x.id, x.o, 3)
      text[i] = c.logprobs.content[i].token
    end
    assert.equal(c.message.content, table.concat(text))
    -- streamed: the chunks' logprobs add up to the same list
    body.stream = true
    local s = think:post("/v1/chat/completions", body)
    local got = {}
    for _, ch in ipairs((X.sse(s.body))) do
      if ch ~= "[DONE]" and ch.choices[1] and ch.choices[1].logprobs ~= cjson.null then
        for _, e in ipairs(ch.choices[1].logprobs.content) do got[#got + 1] = e end
      end
    end
    assert.equal(#expect, #got)
    for i, x in ipairs(expect) do check_entry(got[i], x.id, x.o, 3) end
    -- not asked: null
    body.stream, body.logprobs, body.top_logprobs = nil, nil, nil
    assert.equal(cjson.null, think:post("/v1/chat/completions", body).json.choices[1].logprobs)
  end)

  it("chat: a reply cut short in its header (the tiny model's) gives its text's tokens, streamed as not (curl)", function()
    local body = { model = "tiny", messages = { { role = "user", content = "Hi" } }, max_tokens = 5, temperature = 0,
                   logprobs = true, top_logprobs = 1 }
    local r = main:post("/v1/chat/completions", body)
    assert.equal(200, r.status, r.body)
    local c = r.json.choices[1]
    assert.is_string(c.message.content)
    local plain = c.logprobs.content
    assert.equal(5, #plain)
    body.stream = true
    local got = {}
    for _, ch in ipairs((X.sse(main:post("/v1/chat/completions", body).body))) do
      if ch ~= "[DONE]" and ch.choices[1] and ch.choices[1].logprobs ~= cjson.null then
        for _, e in ipairs(ch.choices[1].logprobs.content) do got[#got + 1] = e end
      end
    end
    assert.same(plain, got)
    for _, e in ipairs(plain) do
      assert.equal(e.token, e.top_logprobs[1].token)   -- greedy
      assert.equal(e.logprob, e.top_logprobs[1].logprob)
    end
  end)

  it("completions: the legacy object of a greedy completion against the oracle's own greedy decode (curl)", function()
    local prompt = prompt_of(tok, 4)
    local r = main:post("/v1/completions", { model = "tiny", prompt = prompt, max_tokens = 4, temperature = 0, logprobs = 3 })
    assert.equal(200, r.status, r.body)
    local lp = r.json.choices[1].logprobs
    assert.equal(4, #lp.tokens)
    -- the oracle decodes greedily from a session of the same checkpoint
    local m = assert(gptoss.load(H.tiny()))
    local s = m:session()
    local logits = s:feed(prompt, "last")
    local offset = 0
    for i = 1, 4 do
      local o = oracle(logits:row(1), 3)
      local id = o.top[1]
      local b = tok:decode_bytes { id }
      if tok:decode { id } == b then assert.equal(b, lp.tokens[i]) end
      assert.is_true(math.abs(lp.token_logprobs[i] - o.lp(id)) < TOL)
      local n = 0
      for j, t in ipairs(o.top) do
        local tb = tok:decode_bytes { t }
        if tok:decode { t } == tb then
          assert.is_true(math.abs(lp.top_logprobs[i][tb] - o.lp(t)) < TOL, tb)
        end
        n = j
      end
      local keys = 0
      for _ in pairs(lp.top_logprobs[i]) do keys = keys + 1 end
      assert.equal(n, keys)   -- greedy: the sampled token is the first of the top ones
      assert.equal(offset, lp.text_offset[i])
      offset = offset + #b:gsub("[\128-\191]", "")
      logits = s:feed({ id }, "last")
    end
    s:close()
    m:close()
  end)

  it("responses: include message.output_text.logprobs gives the output_text's logprobs (curl)", function()
    local body = { model = "scripted", input = "Hi", reasoning = { effort = "low" }, max_output_tokens = 30,
                   include = { "message.output_text.logprobs" }, top_logprobs = 2 }
    local r = think:post("/v1/responses", body)
    assert.equal(200, r.status, r.body)
    local part
    for _, item in ipairs(r.json.output) do if item.type == "message" then part = item.content[1] end end
    assert.equal("Hello there!", part.text)
    local expect = scripted_oracle(2)
    assert.equal(#expect, #part.logprobs)
    for i, x in ipairs(expect) do check_entry(part.logprobs[i], x.id, x.o, 2) end
    -- streamed: the deltas' logprobs add up to the done event's
    body.stream = true
    local data = X.sse(think:post("/v1/responses", body).body)
    local deltas, done = {}, nil
    for _, e in ipairs(data) do
      if e.type == "response.output_text.delta" then for _, x in ipairs(e.logprobs) do deltas[#deltas + 1] = x end end
      if e.type == "response.output_text.done" then done = e.logprobs end
    end
    assert.equal(#expect, #deltas)
    assert.same(done, deltas)
    for i, x in ipairs(expect) do check_entry(deltas[i], x.id, x.o, 2) end
  end)

  it("the OpenAI SDK reads them: chat (plain and through its stream helper), completions, responses", function()
    local r = think:sdk("logprobs", "scripted")
    local expect = scripted_oracle(3)
    assert.equal(#expect, #r.plain.logprobs.content)
    for i, x in ipairs(expect) do
      check_entry(r.plain.logprobs.content[i], x.id, x.o, 3)
      check_entry(r.streamed.logprobs.content[i], x.id, x.o, 3)
    end
    assert.equal(#expect, r.deltas)
    assert.equal(#expect, #r.done)
    assert.equal("Hello there!", r.streamed.message.content)
    assert.equal(3, #r.completion.logprobs.tokens)
    assert.equal(3, #r.completion.logprobs.token_logprobs)
    assert.equal("Hello there!", r.output_text)
    assert.equal(#expect, #r.response.logprobs)
    for i, x in ipairs(expect) do
      assert.equal(tok:decode_bytes { x.id }, r.response.logprobs[i].token)
      assert.equal(3, #r.response.logprobs[i].top_logprobs)
    end
  end)

  it("400 naming the parameter: top_logprobs without logprobs or past 20, completions' logprobs past 20", function()
    local function err(r, param)
      assert.equal(400, r.status, r.body)
      assert.equal(param, r.json.error.param)
      assert.equal("invalid_request_error", r.json.error.type)
    end
    local chat = { model = "tiny", messages = { { role = "user", content = "Hi" } }, max_tokens = 1 }
    local function with(t)
      local b = {}
      for k, v in pairs(chat) do b[k] = v end
      for k, v in pairs(t) do b[k] = v end
      return b
    end
    err(main:post("/v1/chat/completions", with { top_logprobs = 2 }), "top_logprobs")
    err(main:post("/v1/chat/completions", with { logprobs = false, top_logprobs = 0 }), "top_logprobs")
    err(main:post("/v1/chat/completions", with { logprobs = true, top_logprobs = 21 }), "top_logprobs")
    err(main:post("/v1/chat/completions", with { logprobs = true, top_logprobs = 1.5 }), "top_logprobs")
    err(main:post("/v1/chat/completions", with { logprobs = 1 }), "logprobs")
    err(main:post("/v1/completions", { model = "tiny", prompt = "Hi", logprobs = 21 }), "logprobs")
    err(main:post("/v1/completions", { model = "tiny", prompt = "Hi", logprobs = true }), "logprobs")
    err(main:post("/v1/responses", { model = "tiny", input = "Hi", top_logprobs = 30 }), "top_logprobs")
    -- 20 and 0 are served
    assert.equal(200, main:post("/v1/chat/completions", with { logprobs = true, top_logprobs = 20 }).status)
    local r = main:post("/v1/completions", { model = "tiny", prompt = "Hi", logprobs = 0, max_tokens = 2 })
    assert.equal(200, r.status, r.body)
    assert.equal(2, #r.json.choices[1].logprobs.tokens)
  end)
end)
-- }======================================================
