-- harmony's API beyond the vectors: bad input, lenient recovery, streaming
-- state, and post-processing.
local H = require "helpers"
local gptoss = require "gptoss"
local harmony = require "gptoss.harmony"
local post = require "gptoss.post"
local json = require "gptoss.json"

local tok = assert(gptoss.tokenizer(H.tokenizer_dir))

describe("harmony rendering", function()
  it("adds the default system message unless told not to", function()
    local t = harmony.render_text { messages = { { role = "user", content = "Hi" } } }
    assert.are.equal("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n" ..
      "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. " ..
      "Channel must be included for every message.<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant", t)
    assert.are.equal("<|start|>user<|message|>Hi<|end|><|start|>assistant",
      harmony.render_text { system = false, messages = { { role = "user", content = "Hi" } } })
  end)

  it("takes tool parameters as JSON text, json.object, or a list of pairs, keeping their order", function()
    local want = "type f = (_: {\nb: string,\na: number,\n}) => any;"
    local forms = {
      '{"type":"object","properties":{"b":{"type":"string"},"a":{"type":"number"}},"required":["b","a"]}',
      json.object { "type", "object", "properties", json.object { "b", { type = "string" }, "a", { type = "number" } }, "required", { "b", "a" } },
      { type = "object", properties = { { "b", { type = "string" } }, { "a", { type = "number" } } }, required = { "b", "a" } },
    }
    for _, params in ipairs(forms) do
      local t = harmony.render_text { system = false, mode = "conversation",
        developer = { tools = { { name = "f", description = "d", parameters = params } } } }
      assert.is_truthy(t:find(want, 1, true), t)
    end
  end)

  it("raises clear errors on malformed conversations", function()
    local function err(conv) local ok, e = pcall(harmony.render_text, conv); assert.is_false(ok); return e end
    assert.matches("unknown role 'bot'", err { messages = { { role = "bot", content = "x" } } })
    assert.matches("a tool message with no preceding tool call", err { messages = { { role = "tool", content = "x" } } })
    assert.matches("render: unknown field 'mesages'", err { mesages = {} })
    assert.matches("system: unknown field 'reasoningg'", err { system = { reasoningg = "low" } })
    assert.matches("reasoning must be low, medium or high", err { system = { reasoning = "extreme" } })
    assert.matches("flavour must be harmony or hf", err { flavour = "chatml", messages = {} })
    assert.matches("a tool message needs the tool's name",
      err { messages = { { role = "tool", channel = "commentary", content = "x" } } })
    assert.matches("tool parameters are not valid JSON",
      err { developer = { tools = { { name = "f", description = "d", parameters = "{oops" } } } })
    assert.matches("token ids need a tokenizer", select(2, pcall(harmony.render, { messages = {} })))
  end)

  it("names the message whose content is not valid UTF-8 when rendering tokens", function()
    local ok, e = pcall(harmony.render, { system = false, messages = { { role = "user", content = "ok" },
      { role = "user", content = "bad \xFF byte" } } }, tok)
    assert.is_false(ok)
    assert.matches("message 2: invalid UTF%-8 at byte offset 4", e)
  end)
end)

describe("harmony parsing", function()
  it("recovers in lenient mode what strict mode rejects", function()
    local text = "<|channel|>analysis<|message|>hmm<|end|>garbage<|start|>assistant<|channel|>final<|message|>ok"
    assert.has_error(function() harmony.parse(text, { role = "assistant" }) end)
    local msgs = harmony.parse(text, { role = "assistant", lenient = true })
    assert.are.same({ "hmm", "garbage", "ok" }, { msgs[1].content, msgs[2].content, msgs[3].content })
    assert.are.equal("final", msgs[3].channel)
  end)

  it("never raises in lenient mode, whatever the input", function()
    local inputs = { "", "<|end|><|end|>", "<|start|><|start|><|message|>", "<|channel|><|message|>x",
      "<|start|>assistant<|channel|>", "\xFF\xFE<|start|>x\xC3", "<|message|><|message|><|return|>" }
    for _, s in ipairs(inputs) do
      local ok = pcall(harmony.parse, s, { lenient = true })
      assert.is_true(ok, s)
      ok = pcall(harmony.parse, s, { lenient = true, role = "assistant" })
      assert.is_true(ok, s)
    end
  end)

  it("replaces invalid UTF-8 in content with U+FFFD", function()
    local msgs = harmony.parse("<|start|>user<|message|>a\xFFb\xE2\x82<|end|>")
    assert.are.equal("a\xEF\xBF\xBDb\xEF\xBF\xBD", msgs[1].content)
  end)

  it("streams: current channel, recipient, deltas and finished messages", function()
    local text = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>commentary to=functions.f " ..
      "<|constrain|>json<|message|>{\"a\":1}<|call|>"
    local ids = tok:encode(text, { allowed_special = "all" })
    local finished, deltas = {}, {}
    local p = harmony.stream_parser { role = "assistant", tokenizer = tok,
      on_message = function(m) finished[#finished + 1] = m end,
      on_delta = function(d) deltas[#deltas + 1] = d end }
    local seen_channel, seen_recipient
    for _, id in ipairs(ids) do
      p:process(id)
      seen_channel = p:current_channel() or seen_channel
      seen_recipient = p:current_recipient() or seen_recipient
      if p:current_channel() == "commentary" then assert.are.equal("<|constrain|>json", p:current_content_type()) end
    end
    assert.are.equal("commentary", seen_channel)
    assert.are.equal("functions.f", seen_recipient)
    assert.are.equal(2, #finished)
    assert.are.equal("Think.{\"a\":1}", table.concat(deltas))
    assert.are.equal("", p:current_content())
    assert.has_error(function() p:process(201088) end)
  end)
end)

describe("post-processing", function()
  local completion = "<|channel|>analysis<|message|>The user greets.<|end|><|start|>assistant<|channel|>final<|message|>Hello there!<|return|>"

  it("extracts the final and analysis text from messages or text", function()
    assert.are.equal("Hello there!", post.final_text(completion))
    assert.are.equal("The user greets.", post.analysis_text(completion))
    local msgs = harmony.parse(completion, { role = "assistant" })
    assert.are.equal("Hello there!", post.final_text(msgs))
    assert.is_nil(post.final_text("<|channel|>analysis<|message|>only thinking"))
    assert.are.equal("plain answer", post.final_text("plain answer"))
  end)

  it("decodes tool calls and reports bad arguments", function()
    local calls = post.tool_calls("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>" ..
      "{\"city\": \"Oslo\", \"days\": 3}<|call|>")
    assert.are.equal(1, #calls)
    assert.are.equal("get_weather", calls[1].name)
    assert.are.equal("functions", calls[1].namespace)
    assert.are.equal("Oslo", calls[1].arguments.city)
    assert.are.equal(3, calls[1].arguments.days)
    assert.are.same({ "city", "days" }, json.keys(calls[1].arguments))
    local bad = post.tool_calls("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"city\": <|call|>")
    assert.is_nil(bad[1].arguments)
    assert.matches("not valid JSON", bad[1].error)
    local code = post.tool_calls("<|channel|>analysis to=python code<|message|>print(1)<|call|>")
    assert.are.equal("python", code[1].name)
    assert.are.equal("print(1)", code[1].raw)
  end)

  it("strips reasoning and keeps the rest of the markup", function()
    assert.are.equal("<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>", post.strip_reasoning(completion))
    local full = "<|start|>assistant<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>y<|end|>"
    assert.are.equal("<|start|>assistant<|channel|>final<|message|>y<|end|>", post.strip_reasoning(full))
    local msgs = post.strip_reasoning(harmony.parse(completion, { role = "assistant" }))
    assert.are.equal(1, #msgs)
  end)

  it("cleans raw responses with or without markup", function()
    assert.are.equal("Hello there!", post.clean_response(completion))
    assert.are.equal("Just text.", post.clean_response("  Just text.\n"))
    assert.are.equal("2 + 2 = 4.", post.clean_response("analysisUser asks 2+2. Easy.assistantfinal2 + 2 = 4."))
    assert.are.equal("fine", post.clean_response("<|start|>assistant<|channel|>commentary<|message|>fine<|end|>"))
    assert.are.equal("", post.clean_response("<|channel|>analysis<|message|>truncated thought"))
  end)
end)
