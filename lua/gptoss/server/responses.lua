--- gptoss.server.responses: POST /v1/responses, the API gpt-oss was made
-- for. input is text or items (messages, function_call,
-- function_call_output, reasoning); the reply's harmony messages become
-- output items: analysis a reasoning item, a call to functions.NAME a
-- function_call item, the final channel a message; streamed as the typed
-- events (response.created ... response.completed).
local json = require "gptoss.json"
local R = require "gptoss.server.request"
local LP = require "gptoss.server.logprobs"

local NULL, arr, obj = json.null, json.array, json.object
local M = {}

local TEXT_PARTS = { input_text = true, output_text = true, text = true }

-- input items as harmony.render's OpenAI-style messages
local function messages(b)
  local input = b.input
  if type(input) == "string" then return { { role = "user", content = input } } end
  if type(input) ~= "table" or (getmetatable(input) or {}).__jsontype ~= "array" or #input == 0 then
    R.fail(400, "Invalid 'input': expected a string or a non-empty array of input items.", "input")
  end
  local out, names = {}, {}
  for i, it in ipairs(input) do
    local where = string.format("input[%d]", i - 1)
    if type(it) ~= "table" then R.fail(400, string.format("Invalid '%s': expected an object.", where), where) end
    local t = it.type
    if t == nil or t == NULL or t == "message" then
      local role = it.role
      if role ~= "user" and role ~= "assistant" and role ~= "system" and role ~= "developer" then
        R.fail(400, string.format("Invalid value for '%s.role': '%s'.", where, tostring(role)), where .. ".role")
      end
      out[#out + 1] = { role = role, content = R.text_content(it.content, where .. ".content", TEXT_PARTS) or "" }
    elseif t == "reasoning" then
      local parts = {}
      for _, p in ipairs(type(it.content) == "table" and it.content or {}) do parts[#parts + 1] = p.text end
      out[#out + 1] = { role = "assistant", thinking = table.concat(parts), tool_calls = {} }
    elseif t == "function_call" then
      if type(it.name) ~= "string" then R.fail(400, string.format("Missing '%s.name'.", where), where .. ".name") end
      names[it.call_id or ""] = it.name
      out[#out + 1] = { role = "assistant", tool_calls = { { name = it.name, arguments = type(it.arguments) == "string" and it.arguments or "{}" } } }
    elseif t == "function_call_output" then
      if not names[it.call_id or ""] then
        R.fail(400, string.format("No function_call found for call_id '%s' of '%s'.", tostring(it.call_id), where), where .. ".call_id")
      end
      local o = it.output
      out[#out + 1] = { role = "tool", content = type(o) == "string" and o or R.text_content(o, where .. ".output", TEXT_PARTS) }
    else
      R.fail(400, string.format("Invalid value for '%s.type': '%s' is not supported.", where, tostring(t)), where .. ".type")
    end
  end
  -- system and developer items join the instructions; an assistant
  -- reasoning item goes with the call or answer after it
  local msgs, instructions = {}, {}
  for _, m in ipairs(out) do
    if m.role == "system" or m.role == "developer" then instructions[#instructions + 1] = m.content
    elseif m.role == "assistant" and m.tool_calls and #m.tool_calls > 0 and msgs[#msgs] and msgs[#msgs].thinking
        and #msgs[#msgs].tool_calls == 0 then
      msgs[#msgs].tool_calls, msgs[#msgs].content = m.tool_calls, nil
    else msgs[#msgs + 1] = m end
  end
  return msgs, #instructions > 0 and table.concat(instructions, "\n\n") or nil
end

-- {====================================================== events
local Choice = {}
Choice.__index = Choice

-- the output item a harmony message becomes
local function item_of(job, h)
  local recipient, channel = h.recipient, h.channel
  if recipient and recipient:match("^functions%.") then
    return obj { "id", job.new_id("fc_"), "type", "function_call", "status", "in_progress", "arguments", "",
                 "call_id", job.new_id("call_"), "name", recipient:sub(11) }
  elseif channel == "analysis" then
    return obj { "id", job.new_id("rs_"), "type", "reasoning", "summary", arr {}, "content", arr {} }
  end
  return obj { "id", job.new_id("msg_"), "type", "message", "status", "in_progress", "role", "assistant", "content", arr {} }
end

function Choice:event(kind, fields)
  local e = obj { "type", kind, "sequence_number", self.seq }
  self.seq = self.seq + 1
  for i = 1, #fields, 2 do e[fields[i]] = fields[i + 1]; table.insert(json.keys(e), fields[i]) end
  -- encoded now: the item goes on changing after this event
  self.out[#self.out + 1] = { event = kind, raw = json.encode_compact(e) }
end

local function part_of(item)
  if item.type == "reasoning" then return obj { "type", "reasoning_text", "text", "" } end
  return obj { "type", "output_text", "text", "", "annotations", arr {}, "logprobs", arr {} }
end

function Choice:open(h)
  local item = item_of(self.job, h)
  self.items[#self.items + 1] = item
  self.item, self.text = item, {}
  local idx = #self.items - 1
  self.lp_delta, self.lp_item = {}, {}
  self:event("response.output_item.added", { "output_index", idx, "item", item })
  if item.type ~= "function_call" then
    self:event("response.content_part.added", { "item_id", item.id, "output_index", idx, "content_index", 0, "part", part_of(item) })
  end
end

function Choice:delta(d)
  local item, idx = self.item, #self.items - 1
  self.text[#self.text + 1] = d
  if item.type == "function_call" then
    self:event("response.function_call_arguments.delta", { "item_id", item.id, "output_index", idx, "delta", d })
  elseif item.type == "reasoning" then
    self:event("response.reasoning_text.delta", { "item_id", item.id, "output_index", idx, "content_index", 0, "delta", d })
  else
    local lps = self.lp_delta
    self.lp_delta = {}
    self:event("response.output_text.delta", { "item_id", item.id, "output_index", idx, "content_index", 0, "delta", d,
                                               "logprobs", arr(lps) })
  end
end

function Choice:close()
  local item, idx = self.item, #self.items - 1
  if not item then return end
  local text = table.concat(self.text)
  self.item = nil
  if item.type == "function_call" then
    item.arguments, item.status = text, "completed"
    self:event("response.function_call_arguments.done", { "item_id", item.id, "output_index", idx, "name", item.name,
                                                          "arguments", text })
  else
    local part = part_of(item)
    part.text = text
    if part.logprobs then part.logprobs = arr(self.lp_item) end
    if item.type == "reasoning" then
      self:event("response.reasoning_text.done", { "item_id", item.id, "output_index", idx, "content_index", 0, "text", text })
    else
      item.status = "completed"
      self:event("response.output_text.done", { "item_id", item.id, "output_index", idx, "content_index", 0, "text", text,
                                                "logprobs", part.logprobs })
    end
    self:event("response.content_part.done", { "item_id", item.id, "output_index", idx, "content_index", 0, "part", part })
    item.content = arr { part }
  end
  self:event("response.output_item.done", { "output_index", idx, "item", item })
end

-- logprobs entries (self.lp's) of the open item's text: each delta
-- carries those since the last one (a piece of a character makes none),
-- the part all of them
function Choice:logprobs(entries)
  if not (entries and self.item and self.item.type == "message") then return end
  for _, x in ipairs(entries) do self.lp_delta[#self.lp_delta + 1], self.lp_item[#self.lp_item + 1] = x, x end
end

-- feeds ids to the parser: items open when a message's header completes
-- and close when it ends. lps: the engine's logprobs entry for each id,
-- when asked for
function Choice:feed(ids, lps)
  local p = self.parser
  for i, id in ipairs(ids) do
    local was_header, before = p.state == "header", #p.messages
    p:process(id)
    if #p.messages > before and self.item then self:close() end
    if p.state == "content" and not self.item then self:open(p.current_header) end
    if lps then self:logprobs((self.lp:step(p, id, lps[i], was_header, before))) end
    if p.last_content_delta and self.item then self:delta(p.last_content_delta) end
  end
end

function Choice:finish()
  local p = self.parser
  local was_header, before = p.state == "header", #p.messages
  p:process_eos()
  -- a reply that never opened a message (a header cut short) still answers
  if #p.messages > before and not self.item then
    local m = p.messages[#p.messages]
    self:open(m)
    if self.lp then self:logprobs((self.lp:eos(p, was_header, before))) end
    if m.content ~= "" then self:delta(m.content) end
  end
  self:close()
end
-- }======================================================

--- responses(body, ctx) -> job
function M.responses(b, ctx)
  local entry = R.model(b, ctx.served)
  local msgs, instructions = messages(b)
  local instr = R.string(b, "instructions")
  if instr then instructions = instructions and (instr .. "\n\n" .. instructions) or instr end
  local tools, prefill = R.tool_choice(b, R.tools(b))
  local effort
  local reasoning = R.object(b, "reasoning")
  if reasoning then effort = R.one_of(reasoning, "effort", R.EFFORTS, "reasoning.effort") end
  if R.string(b, "previous_response_id") then
    R.fail(400, "previous_response_id is not supported: this server stores no responses; send the items.", "previous_response_id")
  end
  local stream = R.boolean(b, "stream") or false
  local gen = R.sampling(b, ctx.limits, ctx.vocab)
  local logprobs = LP.response_params(b, gen)
  R.arms(gen, tools)
  local prompt = R.prompt(ctx.tokenizer, { instructions = instructions, tools = tools, messages = msgs, effort = effort,
                                           prefill = prefill, param = "input" })
  gen.max_tokens = R.limit(b, { "max_output_tokens", param = "input" }, #prompt, ctx.context)
  gen.adapter = entry.adapter
  local job = { kind = "response", model = entry.id, prompt = prompt, gen = gen, n = 1, stream = stream,
                id = ctx.new_id("resp_"), created = os.time(), new_id = ctx.new_id, sse_events = true,
                view = logprobs and LP.viewer(ctx.tokenizer) }
  local function response(status, items, totals, incomplete)
    local u = NULL
    if totals then
      u = obj { "input_tokens", #prompt, "input_tokens_details", obj { "cached_tokens", totals.cached or 0 },
                "output_tokens", totals.completion, "output_tokens_details", obj { "reasoning_tokens", 0 },
                "total_tokens", #prompt + totals.completion }
    end
    local tool_list = {}
    for i, t in ipairs(tools or {}) do
      tool_list[i] = obj { "type", "function", "name", t.name, "description", t.description or NULL,
                           "parameters", t.parameters or NULL, "strict", false }
    end
    return obj { "id", job.id, "object", "response", "created_at", job.created, "status", status,
      "error", NULL, "incomplete_details", incomplete and obj { "reason", "max_output_tokens" } or NULL,
      "instructions", instructions or NULL, "max_output_tokens", gen.max_tokens, "model", job.model,
      "output", arr(items or {}), "parallel_tool_calls", false, "previous_response_id", NULL,
      "reasoning", obj { "effort", effort or "medium", "summary", NULL }, "store", false,
      "temperature", gen.temperature, "text", obj { "format", obj { "type", "text" } },
      "tool_choice", type(b.tool_choice) == "string" and b.tool_choice or (b.tool_choice and b.tool_choice ~= NULL and b.tool_choice or "auto"),
      "tools", arr(tool_list), "top_p", gen.top_p or 1, "truncation", "disabled", "usage", u, "metadata", obj {} }
  end
  function job.choice(index)
    return setmetatable({ job = job, index = index, seq = 0, items = {}, out = {},
                          parser = R.parser(ctx.tokenizer, prefill),
                          lp = logprobs and LP.tracker(job.view, ctx.tokenizer) or nil }, Choice)
  end
  local function take(c)
    local out = c.out
    c.out = {}
    return out
  end
  function job.on_start(choices)
    local c = choices[1]
    c:event("response.created", { "response", response("in_progress") })
    c:event("response.in_progress", { "response", response("in_progress") })
    return take(c)
  end
  function job.on_tokens(c, ids, _, lps)
    c:feed(ids, lps)
    return take(c)
  end
  function job.on_finish(c) c:finish(); return take(c) end
  function job.on_end(choices, totals)
    local c = choices[1]
    local incomplete = c.result.finish_reason == "length"
    c:event(incomplete and "response.incomplete" or "response.completed",
            { "response", response(incomplete and "incomplete" or "completed", c.items, totals, incomplete) })
    return take(c)
  end
  function job.body(choices, totals)
    local c = choices[1]
    c:feed(c.result.ids, c.result.logprobs)
    c:finish()
    local incomplete = c.result.finish_reason == "length"
    return response(incomplete and "incomplete" or "completed", c.items, totals, incomplete)
  end
  return job
end

return M
