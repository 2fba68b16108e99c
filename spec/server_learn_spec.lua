-- Continuous learning in the server (gptoss.server.learn) in a real nginx:
-- the learned model id, every chat completion logged with its reply (the
-- oracle: the HTTP replies themselves), feedback by completion id with
-- OpenAI-shaped errors, and a round started by corrections that makes the
-- next requests' system_fingerprint name a new version, whose files are on
-- disk.
local H = require "helpers"
local X = require "server.harness"
local gptoss = require "gptoss"
local cjson = require "cjson"

local missing = X.missing()
if not jit then missing = "LuaJIT to run the specs (the server runs in nginx's LuaJIT; once is enough)" end
if missing then
  describe("server learning", function() pending("needs " .. missing) end)
  return
end

describe("server learning", function()
  local srv, dir
  setup(function()
    dir = H.tmpdir() .. "/learn"
    srv = X.start { GPTOSS_MODEL = H.tiny(), GPTOSS_THREADS = "1", GPTOSS_LEARN_DIR = dir, GPTOSS_LEARN_EVERY = "100",
                    GPTOSS_LEARN_HOLDOUT = "3", GPTOSS_LEARN_LR = "0.005", GPTOSS_LEARN_EPOCHS = "3",
                    GPTOSS_LEARN_RANK = "4", GPTOSS_LEARN_SHARE = "1" }
  end)
  teardown(function() if srv then srv:stop() end end)

  -- the first replica a model split by its experts over two CPU ranks
  -- (split_spec); equal loads take turns, so both replicas answer
  it("serves from replicas on several devices (GPTOSS_DEVICE=cpu+cpu,cpu) the replies one device gives", function()
    local rep = X.start { GPTOSS_MODEL = H.tiny(), GPTOSS_THREADS = "1", GPTOSS_DEVICE = "cpu+cpu,cpu" }
    local ok, err = pcall(function()
      for i = 1, 4 do
        local body = { model = "tiny", max_tokens = 6, seed = i, temperature = 0.9,
                       messages = { { role = "user", content = "Say something " .. i } } }
        local a, b = rep:post("/v1/chat/completions", body), srv:post("/v1/chat/completions", body)
        assert.equal(200, a.status, a.body)
        assert.equal(b.json.choices[1].message.content, a.json.choices[1].message.content)
      end
      local m = rep:get("/metrics").body
      assert.equal(24, X.metric(m, "gptoss:generation_tokens_total"))
    end)
    rep:stop()
    assert(ok, err)
  end)

  local function chat(i, extra)
    local body = { model = "tiny-learned", max_tokens = 4, seed = i,
                   messages = { { role = "user", content = "What colour is item " .. i .. "?" } } }
    for k, v in pairs(extra or {}) do body[k] = v end
    return srv:post("/v1/chat/completions", body)
  end

  local function log_lines()
    local out = {}
    for line in io.lines(dir .. "/log.jsonl") do out[#out + 1] = cjson.decode(line) end
    return out
  end

  it("serves, logs, takes feedback and swaps in a better version", function()
    local models = srv:get("/v1/models").json
    local ids = {}
    for _, m in ipairs(models.data) do ids[m.id] = m.parent end
    assert.equal("tiny", ids["tiny-learned"])

    local replies = {}
    for i = 1, 5 do
      local r = chat(i)
      assert.equal(200, r.status, r.body)
      assert.equal("tiny-learned-v0", r.json.system_fingerprint)
      replies[i] = r.json
    end
    -- a streamed one is logged with what its deltas add up to
    local s = chat(6, { stream = true })
    assert.equal(200, s.status)
    local events = X.sse(s.body)
    local text, sid = {}, events[1].id
    for _, e in ipairs(events) do
      if e ~= "[DONE]" and e.choices[1] and e.choices[1].delta.content then text[#text + 1] = e.choices[1].delta.content end
    end
    local lines = log_lines()
    assert.equal(6, #lines)
    for i = 1, 5 do
      assert.equal(replies[i].id, lines[i].meta.completion_id)
      assert.equal("What colour is item " .. i .. "?", lines[i].messages[1].content)
      assert.equal("assistant", lines[i].messages[2].role)
      assert.equal(replies[i].choices[1].message.content, lines[i].messages[2].content)
      assert.equal("tiny-learned", lines[i].adapter)
    end
    assert.equal(sid, lines[6].meta.completion_id)
    assert.equal(table.concat(text), lines[6].messages[2].content)

    -- feedback errors are OpenAI's error objects naming the parameter
    local bad = srv:post("/v1/feedback", { id = "chatcmpl-nope", rating = 5 })
    assert.equal(404, bad.status)
    assert.equal("completion_not_found", bad.json.error.code)
    assert.equal("id", bad.json.error.param)
    bad = srv:post("/v1/feedback", { id = replies[1].id, rating = 9 })
    assert.equal(400, bad.status)
    assert.equal("rating", bad.json.error.param)
    bad = srv:post("/v1/feedback", { id = replies[1].id })
    assert.equal(400, bad.status)
    assert.equal(405, srv:get("/v1/feedback").status)

    -- corrections: the same answer for every conversation, so that the
    -- held-out ones (every 3rd) are learnable from the others
    local all = { replies[1].id, replies[2].id, replies[3].id, replies[4].id, replies[5].id, sid }
    for _, id in ipairs(all) do
      local f = srv:post("/v1/feedback", { id = id, correction = "Blue.", rating = 5 })
      assert.equal(200, f.status, f.body .. H.read(srv.run .. "/error.log"))
      assert.equal("feedback", f.json.object)
    end
    -- the round runs between serving steps; the next requests see its version
    local fp
    for i = 1, 240 do
      local r = chat(100 + i)
      assert.equal(200, r.status, r.body)
      fp = r.json.system_fingerprint
      if fp ~= "tiny-learned-v0" then break end
      X.sleep(0.25)
    end
    assert.equal("tiny-learned-v1", fp, H.read(srv.run .. "/error.log"))
    assert.is_true(H.exists(dir .. "/adapters/tiny-learned/v0001/adapter_model.safetensors"))
    local meta = cjson.decode(H.read(dir .. "/adapters/tiny-learned/v0001/meta.json"))
    assert.is_true(meta.eval_loss < meta.eval_before)
    assert.matches("new version", H.read(srv.run .. "/error.log"))
    -- the version loads as any PEFT adapter
    local a = assert(gptoss.adapter.load(dir .. "/adapters/tiny-learned/v0001"))
    a:close()
  end)
end)
