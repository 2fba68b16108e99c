--- gptoss.constraint: the json_schema / grammar / json options of
-- generate, stream, chat, generate_batch and engine requests, turned into a
-- matcher a sampler obeys (csrc/grammar.c).
--
-- GBNF text was chosen as the one form every constraint compiles to: users'
-- llama.cpp grammars work as they are, and JSON Schema converts to it
-- (gptoss.schema). LPeg patterns are not taken: an LPeg pattern is a
-- program (captures, match-time functions, lookahead), not a language the
-- mask can walk byte by byte without running it once per token.
local core = require "gptoss.core"
local schema = require "gptoss.schema"

local M = {}

M.KEYS = { json_schema = true, grammar = true, json = true, json_options = true }

local vocabs = setmetatable({}, { __mode = "k" })   -- tokenizer -> { [vocab_size] = Vocab }
local grammars = setmetatable({}, { __mode = "v" }) -- GBNF text -> Grammar

--- the vocabulary trie of a model's tokenizer, built once
function M.vocab(model)
  local tok = model.tokenizer
  if not tok then return nil end
  local V = model.config.vocab_size
  local per = vocabs[tok] or {}
  vocabs[tok] = per
  per[V] = per[V] or core.vocab(tok, V)
  return per[V]
end

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

--- check(opts, what): raises, as matcher would, when the constraint is bad
function M.check(opts, what)
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
