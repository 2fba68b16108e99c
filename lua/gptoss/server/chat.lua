--- gptoss.server.chat: POST /v1/chat/completions and POST /v1/completions.
-- Each builds a job from the request body: the prompt ids and generation
-- options the engine takes, and how a choice's tokens become OpenAI's
-- objects (chat.completion, chat.completion.chunk, text_completion).
local json = require "gptoss.json"
local post = require "gptoss.post"
local R = require "gptoss.server.request"
local LP = require "gptoss.server.logprobs"

local NULL, arr, obj = json.null, json.array, json.object
local M = {}

local ROLES = { system = true, developer = true, user = true, assistant = true, tool = true }
local TEXT_PARTS = { text = true, input_text = true, output_text = true }

-- a finish reason of the engine as OpenAI names it
local function finish_reason(res, called)
  local f = res.finish_reason
  if f == "length" then return "length" end
  if called then return "tool_calls" end
  return "stop"
end

local function usage(prompt_len, completion, cached)
  return obj { "prompt_tokens", prompt_len, "completion_tokens", completion, "total_tokens", prompt_len + completion,
               "prompt_tokens_details", obj { "cached_tokens", cached or 0 } }
end

-- a streamed chunk (chat.completion.chunk, text_completion) of job; with
-- stream_options.include_usage every chunk has usage (null but the last)
local function chunk(job, object, choices, u)
  local c = obj { "id", job.id, "object", object, "created", job.created, "model", job.model,
                  "system_fingerprint", NULL, "choices", arr(choices) }
  if job.include_usage then c.usage = u or NULL; table.insert(json.keys(c), "usage") end
  return c
end

-- the stream's end: the usage chunk, when asked for
local function usage_tail(job, object)
  return function(_, totals)
    if job.include_usage then return { chunk(job, object, {}, usage(#job.prompt, totals.completion, totals.cached)) } end
    return {}
  end
end

-- {====================================================== messages
-- OpenAI chat messages as harmony.render takes them: system and developer
-- messages become the developer message's instructions (as vLLM does for
-- gpt-oss), assistant tool_calls and reasoning_content their harmony
-- messages, tool results tool messages after the call they answer.
local function messages(b)
  local list = R.array(b, "messages")
  if not list or #list == 0 then R.fail(400, "'messages' must contain at least one message.", "messages") end
  local instructions, out = {}, {}
  for i, m in ipairs(list) do
    local where = string.format("messages[%d]", i - 1)
    if type(m) ~= "table" or (getmetatable(m) or {}).__jsontype ~= "object" then
      R.fail(400, string.format("Invalid type for '%s': expected an object.", where), where)
    end
    if not ROLES[m.role] then
      R.fail(400, string.format("Invalid value for '%s.role': '%s'. Supported values are: 'system', 'developer', 'user', " ..
        "'assistant' and 'tool'.", where, tostring(m.role)), where .. ".role")
    end
    local text = R.text_content(m.content, where .. ".content", TEXT_PARTS)
    if m.role == "system" or m.role == "developer" then
      instructions[#instructions + 1] = text or ""
    elseif m.role == "assistant" then
      local calls
      local tcs = R.array(m, "tool_calls", where .. ".tool_calls")
      for j, tc in ipairs(tcs or {}) do
        local fn = type(tc) == "table" and tc["function"]
        local w = string.format("%s.tool_calls[%d].function", where, j - 1)
        if type(fn) ~= "table" or type(fn.name) ~= "string" then R.fail(400, string.format("Missing '%s.name'.", w), w .. ".name") end
        local args = fn.arguments
        if args ~= nil and args ~= NULL and type(args) ~= "string" then
          R.fail(400, string.format("Invalid type for '%s.arguments': expected a string.", w), w .. ".arguments")
        end
        calls = calls or {}
        calls[#calls + 1] = { ["function"] = { name = fn.name, arguments = type(args) == "string" and args or "{}" } }
      end
      local thinking = R.string(m, "reasoning_content", where .. ".reasoning_content") or R.string(m, "reasoning", where .. ".reasoning")
      if calls then out[#out + 1] = { role = "assistant", content = text, tool_calls = calls, thinking = thinking }
      elseif thinking then out[#out + 1] = { role = "assistant", content = text or "", thinking = thinking, tool_calls = {} }
      else out[#out + 1] = { role = "assistant", content = text or "" } end
    elseif m.role == "tool" then
      local last = out[#out]
      if not (last and (last.tool_calls and #last.tool_calls > 0 or last.role == "tool")) then
        R.fail(400, string.format("Invalid '%s': messages with role 'tool' must be a response to a preceding message " ..
          "with 'tool_calls'.", where), where .. ".role")
      end
      out[#out + 1] = { role = "tool", content = text or "" }
    else
      out[#out + 1] = { role = "user", content = text or "" }
    end
  end
  return out, #instructions > 0 and table.concat(instructions, "\n\n") or nil
end
-- }======================================================

-- {====================================================== chat
local ChatChoice = {}
ChatChoice.__index = ChatChoice

-- logprobs entries of a message's content (self.lp's step or eos): those
-- of a message to no one outside the analysis channel go with the next
-- chunk, as its text goes in delta.content
function ChatChoice:_logprobs(entries, h)
  if not entries or h.recipient or h.channel == "analysis" then return end
  for _, x in ipairs(entries) do self.lp_pending[#self.lp_pending + 1] = x end
end

-- feeds ids to the parser; returns the delta fields they make
-- (content, reasoning_content, tool_calls) or nil. lps: the engine's
-- logprobs entry for each id, when asked for
function ChatChoice:feed(ids, lps)
  local p = self.parser
  local content, reasoning, calls = {}, {}, {}
  for i, id in ipairs(ids) do
    local was_header, before = p.state == "header", #p.messages
    p:process(id)
    if lps then self:_logprobs(self.lp:step(p, id, lps[i], was_header, before)) end
    if p.state == "content" then
      local recipient = p:current_recipient()
      local open = #p.messages + 1
      if recipient and recipient:match("^functions%.") and self.announced ~= open then
        self.announced, self.calls = open, self.calls + 1
        calls[#calls + 1] = obj { "index", self.calls - 1, "id", self.job.new_id("call_"), "type", "function",
          "function", obj { "name", recipient:sub(11), "arguments", "" } }
      end
      local d = p.last_content_delta
      if d then
        if recipient and recipient:match("^functions%.") then
          calls[#calls + 1] = obj { "index", self.calls - 1, "function", obj { "arguments", d } }
        elseif p:current_channel() == "analysis" then reasoning[#reasoning + 1] = d
        elseif not recipient then content[#content + 1] = d end
      end
    end
  end
  if #content == 0 and #reasoning == 0 and #calls == 0 then return nil end
  self.sent_content = self.sent_content .. table.concat(content)
  self.sent_reasoning = self.sent_reasoning .. table.concat(reasoning)
  local delta = {}
  if #content > 0 then delta.content = table.concat(content) end
  if #reasoning > 0 then delta.reasoning_content = table.concat(reasoning) end
  if #calls > 0 then delta.tool_calls = arr(calls) end
  return delta
end

-- the whole reply once generation ended
function ChatChoice:message()
  local p = self.parser
  local was_header, before = p.state == "header", #p.messages
  p:process_eos()
  if self.lp then self:_logprobs(self.lp:eos(p, was_header, before)) end
  local msgs = p.messages
  local calls = {}
  for _, c in ipairs(post.tool_calls(msgs)) do
    if c.namespace == "functions" then
      calls[#calls + 1] = obj { "id", self.job.new_id("call_"), "type", "function",
        "function", obj { "name", c.name, "arguments", c.raw or "" } }
    end
  end
  local content = post.final_text(msgs)
  if content and self.job.stop then
    for _, s in ipairs(self.job.stop) do
      local at = content:find(s, 1, true)
      if at then content = content:sub(1, at - 1) end
    end
  end
  local m = obj { "role", "assistant", "content", content or NULL, "reasoning_content", post.analysis_text(msgs) or NULL,
                  "refusal", NULL }
  if #calls > 0 then m.tool_calls = arr(calls); table.insert(json.keys(m), "tool_calls") end
  return m, #calls > 0
end

-- the logprobs of the reply's content: its messages' entries, of the
-- messages post.final_text takes the answer from (the final channel's, or
-- without channels those to no one)
function ChatChoice:content_logprobs()
  local msgs, final = self.parser.messages, false
  local function assistant(m) return m.role == "assistant" or m.role == nil end
  for _, m in ipairs(msgs) do final = final or assistant(m) and m.channel == "final" end
  return self.lp:of(msgs, function(m)
    if final then return assistant(m) and m.channel == "final" end
    return assistant(m) and m.channel == nil and m.recipient == nil
  end)
end

--- chat(body, ctx) -> job. ctx: served (model ids), tokenizer, context,
-- vocab, limits, new_id
-- response_format (OpenAI's Structured Outputs): json_object constrains the
-- final channel's message to any JSON value, json_schema to its schema
-- (gptoss.constraint compiles it to a grammar masking each step's tokens;
-- R.arms applies it to that message alone, the analysis left free). true
-- when constrained
local FORMATS = { text = true, json_object = true, json_schema = true }
local function response_format(b, gen)
  local rf = R.object(b, "response_format")
  if not rf then return false end
  local t = R.one_of(rf, "type", FORMATS, "response_format.type")
  if t == nil then R.fail(400, "Missing required parameter: 'response_format.type'.", "response_format.type") end
  if t == "text" then return false end
  local param = "response_format"
  if t == "json_object" then gen.json = true
  else
    param = "response_format.json_schema"
    local js = R.object(rf, "json_schema", param)
    if not js then R.fail(400, "Missing required parameter: 'response_format.json_schema'.", param) end
    R.string(js, "name", param .. ".name")
    R.boolean(js, "strict", param .. ".strict")
    param = param .. ".schema"
    local schema = R.object(js, "schema", param)
    gen.json_schema = schema and json.encode_compact(schema) or "{}"
  end
  local ok, err = pcall(require("gptoss.constraint").check, gen, "response_format")
  if not ok then
    R.fail(400, "Invalid schema for response_format: " .. tostring(err):gsub("^.-:%d+: ", ""):gsub("^response_format: ", "") .. ".",
           param)
  end
  return true
end

function M.chat(b, ctx)
  local entry = R.model(b, ctx.served)
  local msgs, instructions = messages(b)
  local tools, prefill = R.tool_choice(b, R.tools(b))
  local effort = R.one_of(b, "reasoning_effort", R.EFFORTS)
  if not effort and R.object(b, "reasoning") then effort = R.one_of(b.reasoning, "effort", R.EFFORTS, "reasoning.effort") end
  local n = R.integer(b, "n", 1, ctx.limits.max_n) or 1
  local stream = R.boolean(b, "stream") or false
  local so = R.object(b, "stream_options")
  local include_usage = so and R.boolean(so, "include_usage", "stream_options.include_usage") or false
  local gen = R.sampling(b, ctx.limits, ctx.vocab)
  local logprobs = LP.chat_params(b, gen)
  response_format(b, gen)
  R.arms(gen, tools)
  local prompt = R.prompt(ctx.tokenizer, { instructions = instructions, tools = tools, messages = msgs, effort = effort,
                                           prefill = prefill })
  gen.max_tokens = R.limit(b, { "max_completion_tokens", "max_tokens" }, #prompt, ctx.context)
  gen.adapter = entry.adapter
  local job = { kind = "chat", model = entry.id, prompt = prompt, gen = gen, n = n, stream = stream,
    include_usage = include_usage, stop = gen.stop, id = ctx.new_id("chatcmpl-"), created = os.time(),
    new_id = ctx.new_id, view = logprobs and LP.viewer(ctx.tokenizer) }
  function job.choice(index)
    return setmetatable({ job = job, index = index, calls = 0, sent_content = "", sent_reasoning = "",
                          parser = R.parser(ctx.tokenizer, prefill), lp_pending = {},
                          lp = logprobs and LP.tracker(job.view, ctx.tokenizer) or nil }, ChatChoice)
  end
  -- a chunk of choice c; the content logprobs not sent yet go with it
  local function choice_chunk(c, delta, reason)
    local d = obj {}
    for _, k in ipairs { "role", "content", "reasoning_content", "tool_calls" } do
      if delta[k] ~= nil then d[k] = delta[k]; table.insert(json.keys(d), k) end
    end
    local lp = NULL
    if #c.lp_pending > 0 then lp, c.lp_pending = LP.chat(c.lp_pending), {} end
    return chunk(job, "chat.completion.chunk", { obj { "index", c.index, "delta", d, "logprobs", lp,
                                                       "finish_reason", reason or NULL } })
  end
  -- streaming: what to send when generation starts, on new tokens, when a
  -- choice ends, and after every choice ended
  function job.on_start(choices)
    local out = {}
    for _, c in ipairs(choices) do out[#out + 1] = choice_chunk(c, { role = "assistant", content = "" }) end
    return out
  end
  -- (a piece of a character makes no delta: its logprobs wait for one)
  function job.on_tokens(c, ids, _, lps)
    local delta = c:feed(ids, lps)
    if delta then return { choice_chunk(c, delta) } end
  end
  -- what the parser held back (a header cut short by the end, text past a
  -- stop string) goes out with the last chunk, so that a stream adds up to
  -- the message a request without stream gets
  function job.on_finish(c, res)
    local m, called = c:message()
    local out, rest = {}, {}
    for _, k in ipairs { "content", "reasoning_content" } do
      local full, sent = m[k], k == "content" and c.sent_content or c.sent_reasoning
      if type(full) == "string" and #full > #sent and full:sub(1, #sent) == sent then rest[k] = full:sub(#sent + 1) end
    end
    if next(rest) then out[1] = choice_chunk(c, rest) end
    out[#out + 1] = choice_chunk(c, {}, finish_reason(res, called))
    return out
  end
  job.on_end = usage_tail(job, "chat.completion.chunk")
  -- not streaming: the chat.completion object
  function job.body(choices, totals)
    local list = {}
    for i, c in ipairs(choices) do
      c:feed(c.result.ids, c.result.logprobs)
      local m, called = c:message()
      list[i] = obj { "index", c.index, "message", m, "logprobs", logprobs and LP.chat(c:content_logprobs()) or NULL,
                      "finish_reason", finish_reason(c.result, called) }
    end
    return obj { "id", job.id, "object", "chat.completion", "created", job.created, "model", job.model,
                 "choices", arr(list), "usage", usage(#prompt, totals.completion, totals.cached),
                 "system_fingerprint", entry.fingerprint or NULL }
  end
  return job
end
-- }======================================================

-- {====================================================== completions
--- completions(body, ctx) -> job: a raw prompt (text, whose harmony control
-- tokens are read as such, or token ids)
function M.completions(b, ctx)
  local entry = R.model(b, ctx.served)
  local p = b.prompt
  if type(p) == "table" and #p == 1 and type(p[1]) ~= "number" then p = p[1] end
  local prompt
  if type(p) == "string" then
    if p == "" then R.fail(400, "Invalid 'prompt': the prompt is empty.", "prompt") end
    prompt = ctx.tokenizer:encode(p, { allowed_special = "all" })
  elseif type(p) == "table" and #p > 0 and type(p[1]) == "number" then
    for i, id in ipairs(p) do
      if type(id) ~= "number" or id ~= math.floor(id) or id < 0 or id >= ctx.vocab then
        R.fail(400, string.format("Invalid 'prompt[%d]': not a token id of this model.", i - 1), "prompt")
      end
    end
    prompt = p
  elseif p == nil or p == NULL then
    R.fail(400, "You must provide a prompt parameter.", "prompt")
  else
    R.fail(400, "Invalid 'prompt': expected a string, an array of one string, or an array of token ids.", "prompt")
  end
  if R.boolean(b, "echo") then R.fail(400, "echo is not supported by this server.", "echo") end
  if R.string(b, "suffix") then R.fail(400, "suffix is not supported by this server.", "suffix") end
  local n = R.integer(b, "n", 1, ctx.limits.max_n) or 1
  local stream = R.boolean(b, "stream") or false
  local so = R.object(b, "stream_options")
  local gen = R.sampling(b, ctx.limits, ctx.vocab)
  local logprobs = LP.completion_params(b, gen)
  local view = logprobs and LP.viewer(ctx.tokenizer)
  gen.max_tokens = R.limit(b, { "max_tokens", param = "prompt" }, #prompt, ctx.context)
  if not R.integer(b, "max_tokens", 1, 2 ^ 31) then gen.max_tokens = math.min(gen.max_tokens, 16) end  -- OpenAI's default
  gen.adapter = entry.adapter
  local job = { kind = "completion", model = entry.id, prompt = prompt, gen = gen, n = n, stream = stream,
    include_usage = so and R.boolean(so, "include_usage", "stream_options.include_usage") or false,
    id = ctx.new_id("cmpl-"), created = os.time() }
  -- a streamed choice's logprobs entries wait with text held back (a piece
  -- of a character, what may start a stop string) for a chunk to carry them
  function job.choice(index) return { index = index, text = {}, lp_pending = {}, offset = 0 } end
  local function choice(c, text, reason, entries)
    local lp = NULL
    if logprobs then lp, c.offset = LP.legacy(view, entries or {}, c.offset) end
    return obj { "text", text, "index", c.index, "logprobs", lp, "finish_reason", reason or NULL }
  end
  local function pending(c)
    local e = c.lp_pending
    c.lp_pending = {}
    return e
  end
  function job.on_start() return {} end
  function job.on_tokens(c, _, text, lps)
    for _, e in ipairs(lps or {}) do c.lp_pending[#c.lp_pending + 1] = e end
    if text ~= "" then return { chunk(job, "text_completion", { choice(c, text, nil, pending(c)) }) } end
  end
  function job.on_finish(c, res)
    return { chunk(job, "text_completion", { choice(c, "", finish_reason(res), pending(c)) }) }
  end
  job.on_end = usage_tail(job, "text_completion")
  function job.body(choices, totals)
    local list = {}
    for i, c in ipairs(choices) do
      list[i] = choice(c, c.result.text or "", finish_reason(c.result), c.result.logprobs)
    end
    return obj { "id", job.id, "object", "text_completion", "created", job.created, "model", job.model,
                 "system_fingerprint", NULL, "choices", arr(list), "usage", usage(#prompt, totals.completion, totals.cached) }
  end
  return job
end
-- }======================================================

return M
