--- gptoss.constraint: the json_schema / grammar / json options of
-- generate, stream, chat, generate_batch and engine requests, turned into a
-- matcher a sampler obeys (csrc/grammar.c); and their arms option, grammars
-- for kinds of harmony message (csrc/arm.c), which chat builds from its
-- tools and json_schema so that the analysis channel stays free.
--
-- GBNF text was chosen as the one form every constraint compiles to: users'
-- llama.cpp grammars work as they are, and JSON Schema converts to it
-- (gptoss.schema). LPeg patterns are not taken: an LPeg pattern is a
-- program (captures, match-time functions, lookahead), not a language the
-- mask can walk byte by byte without running it once per token.
local core = require "gptoss.core"
local schema = require "gptoss.schema"

local M = {}

M.KEYS = { json_schema = true, grammar = true, json = true, json_options = true, arms = true }

local vocabs = setmetatable({}, { __mode = "k" })   -- tokenizer -> { [vocab_size] = Vocab }
local headers = setmetatable({}, { __mode = "k" })  -- tokenizer -> { [vocab_size] = Headers }
local grammars = setmetatable({}, { __mode = "v" }) -- GBNF text -> Grammar

-- what make(tok, V) builds once per tokenizer and vocabulary size, kept in cache
local function per_tokenizer(cache, make, model)
  local tok = model.tokenizer
  if not tok then return nil end
  local V = model.config.vocab_size
  local per = cache[tok] or {}
  cache[tok] = per
  per[V] = per[V] or make(tok, V)
  return per[V]
end

--- the vocabulary trie of a model's tokenizer, built once
function M.vocab(model) return per_tokenizer(vocabs, core.vocab, model) end

--- the harmony header reader of a model's tokenizer, built once
function M.headers(model) return per_tokenizer(headers, core.headers, model) end

--- gbnf(opts, what) -> GBNF text or nil when opts ask for no constraint;
-- raises "<what>: ..." naming the option at fault
function M.gbnf(opts, what)
  local n = (opts.json_schema ~= nil and 1 or 0) + (opts.grammar ~= nil and 1 or 0) + (opts.json and 1 or 0)
  if n == 0 then
    if opts.json_options ~= nil then error(what .. ": json_options needs json_schema or json", 3) end
    return nil
  end
  if n > 1 then error(what .. ": give one of json_schema, grammar and json", 3) end
  if opts.json ~= nil and opts.json ~= true and opts.json ~= false then
    error(what .. ": json must be true or false (got " .. tostring(opts.json) .. ")", 3)
  end
  local jo = opts.json_options or {}
  if type(jo) ~= "table" then error(what .. ": json_options must be a table", 3) end
  for k, v in pairs(jo) do
    if k == "compact" then
      if type(v) ~= "boolean" then error(what .. ": json_options.compact must be a boolean", 3) end
    elseif k == "max_string" or k == "max_items" or k == "max_properties" then
      if type(v) ~= "number" or v < 0 or v ~= math.floor(v) then
        error(what .. ": json_options." .. k .. " must be an integer >= 0 (got " .. tostring(v) .. ")", 3)
      end
    else error(what .. ": unknown json_options key '" .. tostring(k) .. "'", 3) end
  end
  if opts.grammar ~= nil then
    if type(opts.grammar) ~= "string" then error(what .. ": grammar must be GBNF text (a string)", 3) end
    return opts.grammar
  end
  local s = opts.json and {} or opts.json_schema
  if type(s) ~= "table" and type(s) ~= "string" and type(s) ~= "boolean" then
    error(what .. ": json_schema must be a table or JSON text", 3)
  end
  local ok, g = pcall(schema.to_gbnf, s, jo)
  if not ok then error(what .. ": " .. tostring(g):gsub("^.-:%d+: ", ""), 3) end
  return g
end

--- compile(text) -> Grammar (cached by text); raises on bad GBNF
function M.compile(text)
  local g = grammars[text]
  if not g then
    g = core.grammar(text)
    grammars[text] = g
  end
  return g
end

-- {====================================================== arms
-- An arm: { channel = "final" | nil, recipient = "functions.NAME" | nil,
-- one of json_schema, grammar and json, json_options, end_tokens }: the
-- grammar applies to the body of each message whose header names that
-- channel and recipient (as harmony's parser reads it), up to one of its
-- end tokens: by default <|call|> for a recipient's (a tool call),
-- <|return|> for the final channel's, <|end|> for another's.
local ARM_KEYS = { channel = true, recipient = true, json_schema = true, grammar = true, json = true,
  json_options = true, end_tokens = true }

local function strip(msg) return (tostring(msg):gsub("^.-:%d+: ", "")) end

-- the arms of opts.arms as { channel, recipient, text (GBNF), ends (ids or
-- nil: the default) }; raises "<what>: arms[i]...: ..." at level
local function arm_specs(list, what, level)
  if type(list) ~= "table" then error(what .. ": arms must be a list of arm tables (got " .. type(list) .. ")", level + 1) end
  local out = {}
  for i, a in ipairs(list) do
    local w = what .. ": arms[" .. i .. "]"
    if type(a) ~= "table" then error(w .. " must be a table (got " .. type(a) .. ")", level + 1) end
    for k in pairs(a) do
      if not ARM_KEYS[k] then error(w .. ": unknown key '" .. tostring(k) .. "'", level + 1) end
    end
    for _, k in ipairs { "channel", "recipient" } do
      if a[k] ~= nil and (type(a[k]) ~= "string" or a[k] == "") then
        error(w .. "." .. k .. " must be a non-empty string (got " .. require("gptoss.check").given(a[k]) .. ")", level + 1)
      end
    end
    if a.channel == nil and a.recipient == nil then error(w .. ": give a channel or a recipient (or both)", level + 1) end
    local ok, text = pcall(M.gbnf, a, w)
    if not ok then error(strip(text), level + 1) end
    if not text then error(w .. ": give one of json_schema, grammar and json", level + 1) end
    local ends = a.end_tokens
    if ends ~= nil then
      local ok2, err = pcall(require("gptoss.check").ids, ends, w, "end_tokens")
      if not ok2 then error(strip(err), level + 1) end
      if #ends == 0 then error(w .. ": end_tokens must hold at least one id", level + 1) end
    end
    out[i] = { channel = a.channel, recipient = a.recipient, text = text, ends = ends }
  end
  if #out == 0 then error(what .. ": arms must hold at least one arm", level + 1) end
  return out
end

-- the end tokens an arm takes when it names none
local function default_ends(model, a, what)
  local name = a.recipient and "<|call|>" or a.channel == "final" and "<|return|>" or "<|end|>"
  local id = model.tokenizer:special(name)
  if not id then error(what .. ": the tokenizer has no " .. name .. " to end an arm's message", 4) end
  return { id }
end

local function exclusive(opts, what, level)
  if opts.json_schema ~= nil or opts.grammar ~= nil or opts.json ~= nil then
    error(what .. ": give arms or one of json_schema, grammar and json (over the whole output), not both", level + 1)
  end
end

--- arms(model, opts, what) -> { { channel, recipient, grammar, end_ids }, ... }:
-- opts.arms compiled for a sampler; raises "<what>: arms[i]: ..." naming the fault
function M.arms(model, opts, what)
  exclusive(opts, what, 2)
  local specs = arm_specs(opts.arms, what, 2)
  if not model.tokenizer then error(what .. ": arms need the model's tokenizer", 2) end
  for i, a in ipairs(specs) do
    local ok, g = pcall(M.compile, a.text)
    if not ok then error(what .. ": arms[" .. i .. "]: " .. strip(g), 2) end
    a.grammar = g
    a.end_ids = a.ends or default_ends(model, a, what)
  end
  return specs
end

--- tool_arms(tools, json_options) -> arms, unconstrained: an arm per
-- function tool ({ name, parameters }, or { function = { ... } }, as
-- harmony.render takes them), holding a call's arguments to its parameters
-- schema (a tool without one takes any JSON object); a schema that
-- gptoss.schema cannot express leaves that tool's calls free, its name
-- listed in unconstrained
function M.tool_arms(tools, jo)
  local arms, free = {}, {}
  for _, t in ipairs(tools or {}) do
    local fn = type(t) == "table" and (t["function"] or t) or {}
    if type(fn.name) == "string" then
      local params = fn.parameters
      if params == nil or params == require("gptoss.json").null then params = { type = "object" } end
      local spec = { recipient = "functions." .. fn.name, json_schema = params, json_options = jo }
      local ok, text = pcall(M.gbnf, spec, "tool")
      if ok then ok = pcall(M.compile, text) end
      if ok then arms[#arms + 1] = { recipient = spec.recipient, grammar = text }
      else free[#free + 1] = fn.name end
    end
  end
  return arms, free
end

--- chat_arms(opts, tools, what) -> arms or nil: what a chat constrains,
-- the analysis channel left free: opts.arms, then a call to each function
-- tool (tool_arms, with opts.json_options), then the final channel's
-- message under opts.json_schema, grammar or json. Raises "<what>:
-- json_schema: ..." for a bad constraint, as check does.
function M.chat_arms(opts, tools, what)
  local arms = {}
  if opts.arms ~= nil then
    if type(opts.arms) ~= "table" then error(what .. ": arms must be a list of arm tables (got " .. type(opts.arms) .. ")", 3) end
    for _, a in ipairs(opts.arms) do arms[#arms + 1] = a end
  end
  local sub = { json_schema = opts.json_schema, grammar = opts.grammar, json = opts.json, json_options = opts.json_options }
  local final = sub.json_schema ~= nil or sub.grammar ~= nil or sub.json
  tools = tools or {}
  local ok, err
  if final or sub.json_options == nil or #tools == 0 then ok, err = pcall(M.check, sub, what)
  else ok, err = pcall(M.check, { json = true, json_options = sub.json_options }, what) end   -- for the tools' schemas
  if not ok then error(strip(err), 3) end
  for _, a in ipairs((M.tool_arms(tools, sub.json_options))) do arms[#arms + 1] = a end
  if final then arms[#arms + 1] = { channel = "final", grammar = M.gbnf(sub, what) } end
  return #arms > 0 and arms or nil
end
-- }======================================================

--- check(opts, what): raises, as matcher would, when the constraint is bad
function M.check(opts, what)
  if opts.arms ~= nil then
    exclusive(opts, what, 3)
    local specs = arm_specs(opts.arms, what, 3)
    for i, a in ipairs(specs) do
      local ok, g = pcall(M.compile, a.text)
      if not ok then error(what .. ": arms[" .. i .. "]: " .. strip(g), 3) end
    end
    return
  end
  local text = M.gbnf(opts, what)
  if not text then return end
  local ok, g = pcall(M.compile, text)
  if not ok then error(what .. ": " .. tostring(g):gsub("^.-:%d+: ", ""), 3) end
end

--- matcher(model, opts, end_ids, what) -> Matcher or nil (no constraint asked)
function M.matcher(model, opts, end_ids, what)
  local text = M.gbnf(opts, what)
  if not text then return nil end
  local voc = M.vocab(model)
  if not voc then error(what .. ": constraints need the model's tokenizer", 3) end
  local ok, g = pcall(M.compile, text)
  if not ok then error(what .. ": " .. tostring(g):gsub("^.-:%d+: ", ""), 3) end
  return core.matcher(g, voc, end_ids)
end

return M
