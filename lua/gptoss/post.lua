--- gptoss.post: getting answers out of gpt-oss completions.
--
-- Every function takes parsed messages (from harmony.parse or gptoss.chat)
-- or raw text; text is parsed leniently, so it may or may not hold harmony
-- markup.
local lpeg = require "lpeg"
local harmony = require "gptoss.harmony"
local json = require "gptoss.json"

local check = require "gptoss.check"

local P, C, Cs = lpeg.P, lpeg.C, lpeg.Cs

local M = {}

-- Text to messages. A completion may start inside an assistant header
-- ("<|channel|>final<|message|>..."), at a <|start|>, or be plain text.
local function messages_of(x, fn)
  if type(x) == "table" then return x end
  if type(x) ~= "string" then check.fail(fn or "post.messages", "x", "messages or text", x, 3) end
  local first_start = x:find("<|start|>", 1, true)
  local first_message = x:find("<|message|>", 1, true)
  local role
  if first_message and (not first_start or first_message < first_start) and x:sub(1, 9) ~= "<|start|>" then
    role = "assistant"
  end
  local msgs = harmony.parse(x, { role = role, lenient = true })
  return msgs
end
M.messages = messages_of

local function join(msgs, pred, sep)
  local parts = {}
  for _, m in ipairs(msgs) do
    if pred(m) then parts[#parts + 1] = m.content end
  end
  if #parts == 0 then return nil end
  return table.concat(parts, sep)
end

local function is_assistant(m) return m.role == "assistant" or m.role == nil end

--- final_text(messages | text): the answer, from the final channel (or, for
-- a reply without channels, its plain text); nil when there is none
function M.final_text(x)
  local msgs = messages_of(x, "post.final_text")
  local f = join(msgs, function(m) return is_assistant(m) and m.channel == "final" end, "")
  if f then return f end
  return join(msgs, function(m) return is_assistant(m) and m.channel == nil and m.recipient == nil end, "")
end

--- analysis_text(messages | text): the chain of thought, nil when there is none
function M.analysis_text(x)
  return join(messages_of(x, "post.analysis_text"), function(m) return is_assistant(m) and m.channel == "analysis" and m.recipient == nil end, "\n")
end

--- tool_calls(messages | text): { { recipient, name, namespace, channel,
-- content_type, raw, arguments, error }, ... }. JSON arguments are decoded
-- (objects keep their key order); a decoding failure is reported in error
-- with arguments nil.
function M.tool_calls(x)
  local out = {}
  for _, m in ipairs(messages_of(x, "post.tool_calls")) do
    if is_assistant(m) and m.recipient and m.recipient ~= "all" then
      local ns, name = m.recipient:match("^([^.]+)%.(.+)$")
      local call = { recipient = m.recipient, namespace = ns, name = name or m.recipient, channel = m.channel,
                     content_type = m.content_type, raw = m.content }
      local ct = m.content_type or ""
      local body = (m.content or ""):match("^%s*(.-)%s*$")
      if ct:find("json", 1, true) or body:match("^[{%[]") then
        local v, err = json.decode(body)
        if v == nil then call.error = "arguments are not valid JSON (" .. err .. ")"
        else call.arguments = v end
      end
      out[#out + 1] = call
    end
  end
  return out
end

-- an analysis message in text: from its <|start|> (if any) through its stop
-- token (or the end), header in between naming the analysis channel
local stop = P"<|end|>" + P"<|return|>" + P"<|call|>"
local header_char = P(1) - P"<|message|>" - P"<|start|>"
local analysis_msg = (P"<|start|>" * (header_char - P"<|channel|>") ^ 0) ^ -1 * P"<|channel|>analysis" *
  header_char ^ 0 * P"<|message|>" * (P(1) - stop - P"<|start|>") ^ 0 * stop ^ -1
local strip = Cs((analysis_msg / "" + P(1)) ^ 0)

--- strip_reasoning(messages | text): without the analysis messages. Text
-- keeps the rest of its markup as it was.
function M.strip_reasoning(x)
  if type(x) == "table" then
    local out = {}
    for _, m in ipairs(x) do if m.channel ~= "analysis" then out[#out + 1] = m end end
    return out
  end
  if type(x) ~= "string" then check.fail("post.strip_reasoning", "x", "messages or text", x) end
  return strip:match(x)
end

local markers = P"<|channel|>" + P"<|message|>" + P"<|start|>" + P"<|end|>" + P"<|return|>" + P"<|call|>"
local has_markup = (P(1) - markers) ^ 0 * markers

-- "analysis...assistantfinal..." is what a pipeline that drops special
-- tokens when decoding leaves of a harmony completion
local flattened = P"analysis" * C((P(1) - P"assistantfinal") ^ 0) * P"assistantfinal" * C(P(1) ^ 0)

--- clean_response(text): the user-visible answer from a raw string that may
-- or may not hold channel markup (or its flattened, tokens-dropped form)
function M.clean_response(text)
  check.str(text, "post.clean_response", "text")
  local trimmed = text:match("^%s*(.-)%s*$")
  if has_markup:match(text) then
    local msgs = messages_of(text)
    local f = M.final_text(msgs)
    if f then return (f:match("^%s*(.-)%s*$")) end
    for i = #msgs, 1, -1 do
      local m = msgs[i]
      if is_assistant(m) and m.channel ~= "analysis" and not m.recipient then return (m.content:match("^%s*(.-)%s*$")) end
    end
    return ""
  end
  local _, answer = flattened:match(trimmed)
  if answer then
    -- the last final section wins when several turns were flattened together
    local last = answer
    while true do
      local at = last:find("assistantfinal", 1, true)
      if not at then break end
      last = last:sub(at + #"assistantfinal")
    end
    return (last:match("^%s*(.-)%s*$"))
  end
  return trimmed
end

return M
