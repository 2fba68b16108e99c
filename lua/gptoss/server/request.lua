--- gptoss.server.request: OpenAI request bodies checked and turned into
-- what the engine takes (prompt ids and generation options). Nothing here
-- touches nginx; a bad parameter raises an error table { status, message,
-- param, code, type } that the server sends as OpenAI does.
local json = require "gptoss.json"
local harmony = require "gptoss.harmony"

local NULL = json.null
local M = {}

--- the error OpenAI sends for a request it cannot serve
function M.fail(status, message, param, code, etype)
  error({ status = status, message = message, param = param, code = code,
          type = etype or (status >= 500 and "server_error" or "invalid_request_error") }, 0)
end
local fail = M.fail

local function bad(param, message) fail(400, message, param) end

-- {====================================================== values
local function present(v) return v ~= nil and v ~= NULL end

local function describe(v)
  if type(v) == "table" then return getmetatable(v) and getmetatable(v).__jsontype or "object" end
  if type(v) == "string" then return string.format("%q", #v > 40 and v:sub(1, 40) .. "..." or v) end
  return tostring(v)
end

function M.number(b, k, lo, hi, param)
  local v = b[k]
  if not present(v) then return nil end
  param = param or k
  if type(v) ~= "number" or v ~= v then bad(param, string.format("Invalid type for '%s': expected a number, but got %s instead.", param, describe(v))) end
  if v < lo then bad(param, string.format("Invalid '%s': value below minimum. Expected a value >= %s, but got %s instead.", param, lo, v)) end
  if v > hi then bad(param, string.format("Invalid '%s': value above maximum. Expected a value <= %s, but got %s instead.", param, hi, v)) end
  return v
end

function M.integer(b, k, lo, hi, param)
  local v = M.number(b, k, lo, hi, param)
  if v and v ~= math.floor(v) then bad(param or k, string.format("Invalid type for '%s': expected an integer, but got %s instead.", param or k, v)) end
  return v
end

function M.boolean(b, k, param)
  local v = b[k]
  if not present(v) then return nil end
  if type(v) ~= "boolean" then bad(param or k, string.format("Invalid type for '%s': expected a boolean, but got %s instead.", param or k, describe(v))) end
  return v
end

function M.string(b, k, param)
  local v = b[k]
  if not present(v) then return nil end
  if type(v) ~= "string" then bad(param or k, string.format("Invalid type for '%s': expected a string, but got %s instead.", param or k, describe(v))) end
  return v
end

function M.object(b, k, param)
  local v = b[k]
  if not present(v) then return nil end
  if type(v) ~= "table" or (getmetatable(v) or {}).__jsontype ~= "object" then
    bad(param or k, string.format("Invalid type for '%s': expected an object, but got %s instead.", param or k, describe(v)))
  end
  return v
end

function M.array(b, k, param)
  local v = b[k]
  if not present(v) then return nil end
  if type(v) ~= "table" or (getmetatable(v) or {}).__jsontype ~= "array" then
    bad(param or k, string.format("Invalid type for '%s': expected an array, but got %s instead.", param or k, describe(v)))
  end
  return v
end

local function one_of(b, k, allowed, param)
  local v = M.string(b, k, param)
  if v and not allowed[v] then
    local names = {}
    for n in pairs(allowed) do names[#names + 1] = "'" .. n .. "'" end
    table.sort(names)
    bad(param or k, string.format("Invalid value: '%s'. Supported values are: %s.", v, table.concat(names, ", ")))
  end
  return v
end
M.one_of = one_of
-- }======================================================

-- {====================================================== body and model
--- body(text, max_depth) -> the decoded JSON object (key order kept, so tool
-- schemas render as sent)
function M.body(text, max_depth)
  if type(text) ~= "string" or text == "" then
    bad(nil, "We could not parse the JSON body of your request: the body is empty. (HINT: send a JSON object.)")
  end
  -- cjson bounds the nesting depth before the LPeg decoder recurses into it
  local cj = require("cjson").new()
  cj.decode_max_depth(max_depth)
  local ok, err = pcall(cj.decode, text)
  if not ok then
    local deep = tostring(err):find("too many nested", 1, true)
    bad(nil, deep and string.format("The JSON body nests deeper than %d levels.", max_depth)
      or "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
  end
  local v = json.decode(text)
  if type(v) ~= "table" or (getmetatable(v) or {}).__jsontype ~= "object" then
    bad(nil, "The JSON body of your request must be an object.")
  end
  return v
end

--- model(body, served) -> the served entry ({ id, adapter }) the body names
function M.model(b, served)
  local id = b.model
  if not present(id) then bad("model", "You must provide a model parameter.") end
  if type(id) ~= "string" then bad("model", "Invalid type for 'model': expected a string.") end
  local entry = served[id]
  if not entry then
    fail(404, string.format("The model `%s` does not exist or you do not have access to it.", id), "model", "model_not_found")
  end
  return entry
end
-- }======================================================

-- {====================================================== sampling
--- generation options shared by every endpoint: the engine's submit options
-- (names as model:generate takes them); max_key names the token limit
function M.sampling(b, cfg, vocab)
  local o = {
    temperature = M.number(b, "temperature", 0, 2),
    top_p = M.number(b, "top_p", 0, 1),
    top_k = M.integer(b, "top_k", -1, vocab),
    min_p = M.number(b, "min_p", 0, 1),
    seed = M.integer(b, "seed", -2 ^ 63, 2 ^ 63),
    frequency_penalty = M.number(b, "frequency_penalty", -2, 2),
    presence_penalty = M.number(b, "presence_penalty", -2, 2),
    repetition_penalty = M.number(b, "repetition_penalty", 0.01, 10),
  }
  if o.temperature == nil then o.temperature = 1 end
  if o.top_k == -1 or o.top_k == 0 then o.top_k = nil end
  if o.top_p == 0 then bad("top_p", "Invalid 'top_p': value must be above 0.") end
  if o.seed then o.seed = math.abs(o.seed) % 2 ^ 52 end
  local lb = M.object(b, "logit_bias")
  if lb then
    o.logit_bias = {}
    for _, k in ipairs(json.keys(lb)) do
      local id = tonumber(k)
      if not id or id ~= math.floor(id) or id < 0 or id >= vocab then
        bad("logit_bias", string.format("Invalid key in 'logit_bias': '%s' is not a token id of this model (0..%d).", k, vocab - 1))
      end
      o.logit_bias[id] = M.number(lb, k, -100, 100, "logit_bias." .. k)
    end
  end
  local stop = b.stop
  if present(stop) then
    if type(stop) == "string" then stop = { stop } end
    if type(stop) ~= "table" then bad("stop", "Invalid type for 'stop': expected a string or an array of strings.") end
    if #stop > cfg.max_stop then bad("stop", string.format("Invalid 'stop': at most %d stop sequences are allowed.", cfg.max_stop)) end
    for i, s in ipairs(stop) do
      if type(s) ~= "string" or s == "" then bad("stop", string.format("Invalid 'stop[%d]': expected a non-empty string.", i - 1)) end
    end
    if #stop > 0 then o.stop = { table.unpack and table.unpack(stop) or unpack(stop) } end
  end
  return o
end

--- the completion's token limit: the first of keys present, else what the
-- context leaves; a prompt the context cannot hold is refused as OpenAI does
function M.limit(b, keys, prompt_len, context)
  local max
  for _, k in ipairs(keys) do
    max = M.integer(b, k, 1, 2 ^ 31, k)
    if max then break end
  end
  if prompt_len >= context or (max and prompt_len + max > context) then
    fail(400, string.format("This model's maximum context length is %d tokens. However, you requested %d tokens " ..
      "(%d in the messages, %d in the completion). Please reduce the length of the messages or completion.",
      context, prompt_len + (max or 0), prompt_len, max or 0), keys.param or "messages", "context_length_exceeded")
  end
  return max or (context - prompt_len)
end
-- }======================================================

-- {====================================================== harmony
--- the text of a message's content: a string, or an array of text parts
function M.text_content(c, param, part_types)
  if not present(c) then return nil end
  if type(c) == "string" then return c end
  if type(c) ~= "table" or (getmetatable(c) or {}).__jsontype ~= "array" then
    bad(param, string.format("Invalid type for '%s': expected a string or an array of content parts.", param))
  end
  local parts = {}
  for i, p in ipairs(c) do
    local where = string.format("%s[%d]", param, i - 1)
    if type(p) ~= "table" or not part_types[p.type] then
      bad(where .. ".type", string.format("Invalid content part in '%s': only text parts are supported.", where))
    end
    if type(p.text) ~= "string" then bad(where .. ".text", string.format("Missing or invalid '%s.text'.", where)) end
    parts[#parts + 1] = p.text
  end
  return table.concat(parts)
end

--- function tools of chat ({ type, function = { name, description,
-- parameters } }) or of responses ({ type, name, description, parameters })
function M.tools(b, key)
  local tools = M.array(b, key or "tools")
  if not tools or #tools == 0 then return nil end
  local out = {}
  for i, t in ipairs(tools) do
    local where = string.format("tools[%d]", i - 1)
    if type(t) ~= "table" or t.type ~= "function" then
      bad(where .. ".type", string.format("Invalid value for '%s.type': only 'function' tools are supported.", where))
    end
    local fn = present(t["function"]) and t["function"] or t
    if type(fn.name) ~= "string" or not fn.name:match("^[%w_%-%.]+$") or #fn.name > 64 then
      bad(where .. ".name", string.format("Invalid '%s.name': a function name of letters, digits, '_', '-' and '.' is required.", where))
    end
    local params = fn.parameters
    if present(params) and (type(params) ~= "table" or (getmetatable(params) or {}).__jsontype ~= "object") then
      bad(where .. ".parameters", string.format("Invalid '%s.parameters': expected a JSON Schema object.", where))
    end
    out[i] = { name = fn.name, description = present(fn.description) and fn.description or nil,
               parameters = present(params) and params or nil }
  end
  return out
end

--- tool_choice: "auto" | "none" | "required" | { type = "function", name } ;
-- returns the tools to render and the prefill that forces a named call
function M.tool_choice(b, tools)
  local tc = b.tool_choice
  if not present(tc) or tc == "auto" or tc == "required" then return tools, nil end
  if tc == "none" then return nil, nil end
  if type(tc) ~= "table" or tc.type ~= "function" then
    bad("tool_choice", "Invalid 'tool_choice': expected 'none', 'auto', 'required' or a function.")
  end
  local name = present(tc["function"]) and tc["function"].name or tc.name
  local known = false
  for _, t in ipairs(tools or {}) do known = known or t.name == name end
  if not known then bad("tool_choice", string.format("Invalid 'tool_choice': no function named '%s' in 'tools'.", tostring(name))) end
  return tools, { channel = "commentary", recipient = "functions." .. name, content_type = "<|constrain|>json" }
end

M.EFFORTS = { low = true, medium = true, high = true }

--- arms(gen, tools): what the reply is held to, its analysis left free
-- (gptoss.constraint.chat_arms): a call to a declared function tool to the
-- tool's parameters schema (one that gptoss.schema cannot express leaves
-- that tool's calls free), and under gen.json or gen.json_schema
-- (response_format, checked already) the final channel's message
function M.arms(gen, tools)
  gen.arms = require("gptoss.constraint").chat_arms(gen, tools, "response_format")
  gen.json, gen.json_schema = nil, nil
end

--- prompt(tok, spec) -> ids: the harmony rendering of a conversation.
-- spec: instructions, tools, messages (harmony.render's OpenAI-style
-- messages), effort, prefill
function M.prompt(tok, spec)
  local developer
  if spec.instructions or spec.tools then developer = { instructions = spec.instructions, tools = spec.tools } end
  local ok, ids = pcall(harmony.render, {
    system = { reasoning = spec.effort or "medium", date = os.date("!%Y-%m-%d") },
    developer = developer, messages = spec.messages, mode = "completion", prefill = spec.prefill,
  }, tok)
  if not ok then bad(spec.param or "messages", "Invalid conversation: " .. tostring(ids):gsub("^.-harmony: ", "")) end
  return ids
end

--- a harmony stream parser for the reply, primed with the prefill's header
function M.parser(tok, prefill)
  local p = harmony.stream_parser { role = "assistant", lenient = true, tokenizer = tok }
  if prefill then
    if prefill.recipient then p:process_unit { b = " to=" .. prefill.recipient } end
    if prefill.channel then p:process_unit { s = "<|channel|>" }; p:process_unit { b = prefill.channel } end
    if prefill.content_type then p:process_unit { b = " " }; p:process_unit { s = "<|constrain|>" }
      p:process_unit { b = prefill.content_type:gsub("^<|constrain|>", "") } end
    p:process_unit { s = "<|message|>" }
  end
  return p
end
-- }======================================================

return M
