--- gptoss.data: training examples from JSONL, rendered with harmony's
-- training mode, with a loss mask by role and channel.
--
--   local data = require "gptoss.data"
--   local examples, skipped = data.read_jsonl("train.jsonl", model.tokenizer,
--     { flavour = "harmony", loss_on = "assistant", on_error = "skip" })
--
-- A line is { "messages": [ { "role", "content", "thinking"? }, ... ] } (the
-- Multilingual-Thinking schema: a system message, the user's, and the
-- assistant's answer with its analysis in "thinking"), optionally with
-- "developer" and "reasoning_effort", or { "text": "<|start|>..." } (raw
-- harmony text, special tokens recognised). loss_on picks the target tokens:
-- "assistant" (every assistant message, from its role name to its closing
-- token), "final" (final-channel assistant messages only), or "all".
-- Bad lines are skipped and reported ({ line = n, message = ... }) or, with
-- on_error = "reject", raise an error naming the line.
local cjson = require "cjson"
local harmony = require "gptoss.harmony"

local check = require "gptoss.check"

local M = {}

--- the loss mask of harmony token ids: true for the tokens of the messages
-- loss_on selects, from the role name after <|start|> through the message's
-- <|end|>, <|return|> or <|call|>
function M.mask(ids, tok, loss_on)
  check.ids(ids, "data.mask", "ids")
  check.udata(tok, "data.mask", "tok", "gptoss.Tokenizer")
  loss_on = loss_on or "assistant"
  check.choice(loss_on, "data.mask", "loss_on", { "assistant", "final", "all" })
  local mask = {}
  if loss_on == "all" then                     -- the first token is never predicted
    for i = 1, #ids do mask[i] = i > 1 end
    return mask
  end
  local START, MESSAGE = tok:special("<|start|>"), tok:special("<|message|>")
  local closing = { [tok:special("<|end|>")] = true, [tok:special("<|return|>")] = true, [tok:special("<|call|>")] = true }
  local i = 1
  while i <= #ids do
    mask[i] = false
    if ids[i] == START then
      local j = i + 1                          -- header: role, channel, recipient, content type
      while j <= #ids and ids[j] ~= MESSAGE do j = j + 1 end
      local hdr = {}
      for k = i + 1, j - 1 do hdr[#hdr + 1] = ids[k] end
      local header = tok:decode(hdr)
      local role = header:match("^(%a+)")
      local on = role == "assistant" and (loss_on == "assistant" or header:find("<|channel|>final", 1, true) ~= nil)
      local e = j + 1
      while e <= #ids and not closing[ids[e]] do e = e + 1 end
      for k = i + 1, math.min(e, #ids) do mask[k] = on end
      i = math.min(e, #ids) + 1
    else
      i = i + 1
    end
  end
  return mask
end

--- the first n ids (and mask entries, when a mask is given)
function M.truncate(ids, mask, n)
  if not n or #ids <= n then return ids, mask end
  local a, b = {}, mask and {} or nil
  for t = 1, n do a[t] = ids[t]; if b then b[t] = mask[t] end end
  return a, b
end

--- one example { ids, mask } from a record (a decoded JSONL line: messages
-- or text), or nil and why not; opts: flavour, loss_on, text_loss_on, max_len
function M.example(rec, tok, opts)
  if type(rec) ~= "table" then return nil, "not a JSON object" end
  local ids
  if rec.text ~= nil then
    if type(rec.text) ~= "string" or rec.text == "" then return nil, "field text must be a non-empty string" end
    ids = tok:encode(rec.text, { allowed_special = "all" })
  else
    if type(rec.messages) ~= "table" or #rec.messages == 0 then return nil, "field messages missing or empty" end
    for i, m in ipairs(rec.messages) do
      if type(m) ~= "table" or type(m.role) ~= "string" then return nil, "messages[" .. i .. "] has no role" end
      if m.content == cjson.null then m.content = nil end
      if m.thinking == cjson.null then m.thinking = nil end
    end
    local conv = { messages = rec.messages, mode = "training", flavour = opts.flavour or "harmony" }
    -- the schema repeats the system message's text in "developer": use it
    -- only when the messages carry no system or developer message
    local has_instructions = false
    for _, m in ipairs(rec.messages) do has_instructions = has_instructions or m.role == "system" or m.role == "developer" end
    if type(rec.developer) == "string" and not has_instructions then conv.developer = { instructions = rec.developer } end
    if type(rec.reasoning_effort) == "string" then conv.system = { reasoning = rec.reasoning_effort } end
    local ok, res = pcall(harmony.render, conv, tok)
    if not ok then return nil, tostring(res):gsub("^[^:]*:%d+: ", "") end
    ids = res
  end
  if #ids < 2 then return nil, "renders to fewer than 2 tokens" end
  ids = M.truncate(ids, nil, opts.max_len)
  local mask = M.mask(ids, tok, rec.text ~= nil and (opts.text_loss_on or "all") or opts.loss_on)
  local any = false
  for i = 2, #mask do any = any or mask[i] end
  if not any then return nil, "no target tokens (loss_on = " .. tostring(opts.loss_on or "assistant") .. ")" end
  return { ids = ids, mask = mask }
end

--- examples from a JSONL file (see above); returns examples, skipped, or
-- nil and a message when the file cannot be read
function M.read_jsonl(path, tok, opts)
  local fn = "data.read_jsonl"
  check.str(path, fn, "path")
  if not tok then error(fn .. ": a tokenizer is needed to render examples", 2) end
  check.udata(tok, fn, "tok", "gptoss.Tokenizer")
  -- (opts may be gptoss.train's, with keys of its own: only these are read)
  opts = opts == nil and {} or check.table(opts, fn, "opts")
  local on_error = check.choice(opts.on_error or "skip", fn, "on_error", { "skip", "reject" })
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local examples, skipped, n = {}, {}, 0
  for line in f:lines() do
    n = n + 1
    if line:match("%S") then
      local ok, rec = pcall(cjson.decode, line)
      local ex, why
      if ok then
        -- a line the tokenizer refuses (invalid UTF-8, say) is that line's error
        local ok2, e, w = pcall(M.example, rec, tok, opts)
        if ok2 then ex, why = e, w else why = tostring(e):gsub("^[^:]*:%d+: ", "") end
      else
        why = "invalid JSON: " .. tostring(rec):gsub("^[^:]*:%d+: ", "")
      end
      if ex then
        ex.line = n
        examples[#examples + 1] = ex
      elseif on_error == "reject" then
        f:close()
        error(string.format("%s:%d: %s", path, n, why), 2)
      else
        skipped[#skipped + 1] = { line = n, message = why }
      end
    end
  end
  f:close()
  return examples, skipped
end

return M
