--- gptoss.server.logprobs: each endpoint's logprobs parameters, and
-- OpenAI's logprobs objects made from the engine's entries (per sampled
-- token { id, logprob, top = { { id, logprob }, ... } }: log_softmax of the
-- model's raw logits, before temperature, penalties and logit_bias, as vLLM
-- returns them by default; see gptoss.engine).
local json = require "gptoss.json"
local R = require "gptoss.server.request"

local NULL, arr, obj = json.null, json.array, json.object
local M = {}

M.MAX_TOP = 20   -- OpenAI's bound, and the engine's (GPTOSS_MAX_TOP_LOGPROBS)

-- {====================================================== parameters
--- chat: logprobs (a boolean) and top_logprobs (0..20, only beside
-- logprobs = true); sets the engine's options in gen, returns whether asked
function M.chat_params(b, gen)
  local want = R.boolean(b, "logprobs")
  local top = R.integer(b, "top_logprobs", 0, M.MAX_TOP)
  if top and not want then
    R.fail(400, "Invalid value for 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is used.", "top_logprobs")
  end
  if want then gen.logprobs, gen.top_logprobs = true, top or 0 end
  return want or false
end

--- completions: logprobs, how many of the most likely tokens (0..20) to
-- give beside the sampled one
function M.completion_params(b, gen)
  local n = R.integer(b, "logprobs", 0, M.MAX_TOP)
  if n then gen.logprobs, gen.top_logprobs = true, n end
  return n ~= nil
end

--- responses: include = { "message.output_text.logprobs" } asks for them,
-- top_logprobs (0..20) says how many alternatives
function M.response_params(b, gen)
  local top = R.integer(b, "top_logprobs", 0, M.MAX_TOP)
  local want = false
  for i, v in ipairs(R.array(b, "include") or {}) do
    local where = string.format("include[%d]", i - 1)
    if type(v) ~= "string" then R.fail(400, string.format("Invalid type for '%s': expected a string.", where), where) end
    want = want or v == "message.output_text.logprobs"
  end
  if want then gen.logprobs, gen.top_logprobs = true, top or 0 end
  return want
end
-- }======================================================

-- {====================================================== tokens
--- viewer(tok) -> function(id) -> text, bytes: a token as logprobs show
-- it, its text (its bytes when they are whole UTF-8, else "bytes:" and each
-- byte as \xNN, as OpenAI writes a piece of a character) and its bytes as
-- integers (a JSON array)
function M.viewer(tok)
  local seen = {}
  return function(id)
    local v = seen[id]
    if not v then
      local b = tok:decode_bytes { id }
      local text = b
      if tok:decode { id } ~= b then
        text = "bytes:" .. b:gsub(".", function(c) return string.format("\\x%02x", c:byte()) end)
      end
      local bytes = {}
      for i = 1, #b do bytes[i] = b:byte(i) end
      v = { text, arr(bytes) }
      seen[id] = v
    end
    return v[1], v[2]
  end
end

--- chat's and responses' entry for one token: { token, logprob, bytes,
-- top_logprobs = { { token, logprob, bytes }, ... } }
function M.entry(view, e)
  local top = {}
  for i, t in ipairs(e.top) do
    local text, bytes = view(t.id)
    top[i] = obj { "token", text, "logprob", t.logprob, "bytes", bytes }
  end
  local text, bytes = view(e.id)
  return obj { "token", text, "logprob", e.logprob, "bytes", bytes, "top_logprobs", arr(top) }
end

-- }======================================================

-- {====================================================== messages
-- A tracker follows a reply's harmony stream parser and gives each message
-- the entries of the tokens whose bytes are its content: the ordinary
-- tokens read while it is open, or, for a message the lenient parser makes
-- of header text (a reply cut short, or text with no header before a
-- stop), that header's tokens.
local Tracker = {}
Tracker.__index = Tracker

--- tracker(view, tok) -> a tracker
function M.tracker(view, tok)
  return setmetatable({ view = view, tok = tok, by_message = {}, header = {} }, Tracker)
end

-- the engine's entries raw, as entries of message index
function Tracker:_add(index, raw)
  local list, out = self.by_message[index] or {}, {}
  self.by_message[index] = list
  for i, e in ipairs(raw) do
    out[i] = M.entry(self.view, e)
    list[#list + 1] = out[i]
  end
  return out
end

-- a message made of header text by the last call of p (whose state before
-- it was_header, with `before` messages): its entries and the message
function Tracker:_made(p, was_header, before)
  if not (was_header and #p.messages > before) then return nil end
  local raw, m = self.header, p.messages[#p.messages]
  self.header = {}
  if m.content == "" then return nil end
  return self:_add(#p.messages, raw), m
end

--- after p:process(id), e the engine's entry for id: the entries id gave a
-- message's content and that message's header ({ channel, recipient }), or nil
function Tracker:step(p, id, e, was_header, before)
  local made, m = self:_made(p, was_header, before)
  if made then return made, m end
  local special = self.tok:is_special(id)
  if p.state == "header" then
    if special then self.header = {} else self.header[#self.header + 1] = e end
    return nil
  end
  self.header = {}
  if p.state == "content" and not special then return self:_add(#p.messages + 1, { e }), p.current_header end
end

--- after p:process_eos(): as step
function Tracker:eos(p, was_header, before) return self:_made(p, was_header, before) end

--- the entries of the messages keep(message) keeps, in order
function Tracker:of(messages, keep)
  local out = {}
  for i, m in ipairs(messages) do
    if keep(m) then for _, x in ipairs(self.by_message[i] or {}) do out[#out + 1] = x end end
  end
  return out
end
-- }======================================================

-- {====================================================== objects
--- a chat choice's logprobs: { content = entries, refusal = null }
function M.chat(entries)
  return obj { "content", arr(entries), "refusal", NULL }
end

--- completions' (legacy) logprobs of entries: tokens, token_logprobs,
-- top_logprobs (per token an object of the most likely tokens' texts and
-- the sampled one's: up to logprobs + 1, as OpenAI gives them) and
-- text_offset (characters of the completion before each token, counting
-- from offset); returns it and the offset after the last token
function M.legacy(view, entries, offset)
  local tokens, lps, tops, offsets = {}, {}, {}, {}
  for i, e in ipairs(entries) do
    local text, bytes = view(e.id)
    tokens[i], lps[i], offsets[i] = text, e.logprob, offset
    local d = obj {}
    local function put(k, v)
      if d[k] == nil then d[k] = v; table.insert(json.keys(d), k) end
    end
    for _, t in ipairs(e.top) do put((view(t.id)), t.logprob) end
    put(text, e.logprob)
    tops[i] = d
    for j = 1, #bytes do   -- a character begins at each byte that does not continue one
      if bytes[j] < 0x80 or bytes[j] >= 0xC0 then offset = offset + 1 end
    end
  end
  return obj { "tokens", arr(tokens), "token_logprobs", arr(lps), "top_logprobs", arr(tops), "text_offset", arr(offsets) },
         offset
end
-- }======================================================

return M
