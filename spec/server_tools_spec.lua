-- The server's constraints (lua/gptoss/server): a call to a declared tool
-- is held to the tool's parameters schema, response_format to the final
-- channel's message, the analysis left free (gptoss.constraint's arms).
-- Real nginx instances (spec/server/harness.lua): the tiny random model,
-- whose free output is noise, and scripted ones (spec/server/scripted.lua)
-- that write a header themselves, the message after it the random model's.
-- Arguments and answers are checked by ajv (spec/support/ajv.lua).
local H = require "helpers"
local A = require "support.ajv"
local X = require "server.harness"
local S = require "server.scripted"
local gptoss = require "gptoss"
local cjson = require "cjson"

-- nginx runs the server in its own LuaJIT whichever interpreter runs the
-- specs, so once (under LuaJIT) is enough
local missing = X.missing()
if not jit then missing = "LuaJIT to run the specs (the server runs in nginx's LuaJIT; once is enough)" end
if missing then
  describe("server tools", function() pending("needs " .. missing) end)
  return
end

local W = '{"type":"object","properties":{"city":{"type":"string","maxLength":8},"days":{"type":"integer","minimum":1,' ..
  '"maximum":7}},"required":["city","days"],"additionalProperties":false}'
local W2 = '{"type":"object","properties":{"unit":{"enum":["c","f"]}},"required":["unit"],"additionalProperties":false}'
local ANSWER = '{"type":"object","properties":{"answer":{"enum":["yes","no"]},"n":{"type":"integer","minimum":0,' ..
  '"maximum":9}},"required":["answer","n"],"additionalProperties":false}'

local function tools()
  return { { type = "function", ["function"] = { name = "get_weather", description = "Weather for a city.",
             parameters = cjson.decode(W) } },
           { type = "function", ["function"] = { name = "get_weather2", description = "Units.", parameters = cjson.decode(W2) } } }
end
local ASK = { { role = "user", content = "What is the weather in Paris?" } }

describe("server tools", function()
  local main, caller, answerer
  setup(function()
    A.install()
    local model = assert(gptoss.load(H.tiny()))
    local tok = model.tokenizer
    local caller_dir = S.write(H.tiny(), H.tmpdir() .. "/caller",
      "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>", tok)
    local final_dir = S.write(H.tiny(), H.tmpdir() .. "/final", "<|channel|>final<|message|>", tok)
    model:close()
    main = X.start { GPTOSS_MODEL = H.tiny(), GPTOSS_THREADS = "1" }
    caller = X.start { GPTOSS_MODEL = caller_dir, GPTOSS_MODEL_NAME = "scripted", GPTOSS_THREADS = "1" }
    answerer = X.start { GPTOSS_MODEL = final_dir, GPTOSS_MODEL_NAME = "scripted", GPTOSS_THREADS = "1" }
  end)
  teardown(function()
    for _, s in ipairs { main, caller, answerer } do if s then s:stop() end end
  end)

  it("tool_choice naming a function: the call's arguments validate against its parameters (chat and responses)", function()
    local cases = {}
    for seed = 1, 4 do
      local r = main:post("/v1/chat/completions", { model = "tiny", seed = seed, max_tokens = 300, messages = ASK,
        tools = tools(), tool_choice = { type = "function", ["function"] = { name = "get_weather" } } })
      assert.equal(200, r.status, r.body)
      local c = r.json.choices[1]
      assert.equal("tool_calls", c.finish_reason, r.body)
      assert.equal("get_weather", c.message.tool_calls[1]["function"].name)
      cases[#cases + 1] = { schema = W, text = c.message.tool_calls[1]["function"].arguments }
    end
    local r = main:post("/v1/responses", { model = "tiny", seed = 9, max_output_tokens = 300, input = ASK[1].content,
      tools = { { type = "function", name = "get_weather2", parameters = cjson.decode(W2) } },
      tool_choice = { type = "function", name = "get_weather2" } })
    assert.equal(200, r.status, r.body)
    local call = r.json.output[#r.json.output]
    assert.equal("function_call", call.type, r.body)
    cases[#cases + 1] = { schema = W2, text = call.arguments }
    A.expect_valid(cases, "forced")
  end)

  it("tool_choice auto: a call whose header the model writes validates, streamed deltas too", function()
    local cases = {}
    for seed = 1, 3 do
      local r = caller:post("/v1/chat/completions", { model = "scripted", seed = seed, max_tokens = 300, messages = ASK,
        tools = tools(), tool_choice = "auto" })
      assert.equal(200, r.status, r.body)
      local c = r.json.choices[1]
      assert.equal("tool_calls", c.finish_reason, r.body)
      assert.equal("get_weather", c.message.tool_calls[1]["function"].name)
      cases[#cases + 1] = { schema = W, text = c.message.tool_calls[1]["function"].arguments }
    end
    local r = caller:post("/v1/chat/completions", { model = "scripted", seed = 5, max_tokens = 300, messages = ASK,
      tools = tools(), stream = true })
    assert.equal(200, r.status, r.body)
    local args = {}
    for _, e in ipairs(X.sse(r.body)) do
      if type(e) == "table" then
        for _, tc in ipairs(e.choices[1].delta.tool_calls or {}) do args[#args + 1] = tc["function"].arguments end
      end
    end
    cases[#cases + 1] = { schema = W, text = table.concat(args) }
    A.expect_valid(cases, "auto")
    -- without tools the same header opens noise: the schema is what holds it
    r = caller:post("/v1/chat/completions", { model = "scripted", seed = 1, max_tokens = 60, messages = ASK })
    assert.is_false(A.validate({ { schema = W, text = r.json.choices[1].message.tool_calls[1]["function"].arguments } })[1].ok)
  end)

  it("a tool whose schema cannot be constrained is still served, its calls free", function()
    local t = { { type = "function", ["function"] = { name = "odd", parameters = { type = "object",
      properties = { n = { type = "integer", multipleOf = 3 } } } } } }
    local r = main:post("/v1/chat/completions", { model = "tiny", seed = 1, max_tokens = 20, messages = ASK, tools = t,
      tool_choice = { type = "function", ["function"] = { name = "odd" } } })
    assert.equal(200, r.status, r.body)
    assert.equal("odd", r.json.choices[1].message.tool_calls[1]["function"].name)
  end)

  it("response_format holds the final channel's message to its schema, json_object to any JSON (the analysis free)", function()
    -- moved from server_spec.lua: the reply is no longer pinned to the
    -- final channel, so the model (scripted) writes its header itself
    local cases = {}
    for seed = 1, 3 do
      local r = answerer:post("/v1/chat/completions", { model = "scripted", max_tokens = 80, seed = seed, temperature = 1,
        messages = { { role = "user", content = "Answer in JSON." } },
        response_format = { type = "json_schema", json_schema = { name = "answer", strict = true, schema = cjson.decode(ANSWER) } } })
      assert.equal(200, r.status, r.body)
      local c = r.json.choices[1]
      assert.equal("stop", c.finish_reason, r.body)
      cases[#cases + 1] = { schema = ANSWER, text = c.message.content }
    end
    local r = answerer:post("/v1/chat/completions", { model = "scripted", max_tokens = 40, seed = 4,
      messages = { { role = "user", content = "JSON please." } }, response_format = { type = "json_object" } })
    assert.equal(200, r.status, r.body)
    if r.json.choices[1].finish_reason == "stop" then cases[#cases + 1] = { schema = "{}", text = r.json.choices[1].message.content }
    else assert.matches("^%s*[%[{\"%-0-9tfn]", r.json.choices[1].message.content) end   -- cut by max_tokens: a JSON value's start
    A.expect_valid(cases, "response_format")
    -- the random model never opens the final channel: its free reply stays as it is
    r = main:post("/v1/chat/completions", { model = "tiny", max_tokens = 12, seed = 1, messages = { { role = "user", content = "Hi" } },
      response_format = { type = "json_schema", json_schema = { name = "answer", schema = cjson.decode(ANSWER) } } })
    local plain = main:post("/v1/chat/completions", { model = "tiny", max_tokens = 12, seed = 1,
      messages = { { role = "user", content = "Hi" } } })
    assert.equal(200, r.status, r.body)
    assert.same(plain.json.choices[1].message, r.json.choices[1].message)
  end)
end)
