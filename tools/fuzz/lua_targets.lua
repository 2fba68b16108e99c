--- The fuzz targets over the parsers written in Lua. Each gets one input
-- (a string) and returns when the parser behaved: it accepted the input, or
-- refused it in its documented way. Anything else raises. lua_fuzz.c runs
-- them under libFuzzer; spec/fuzz_corpus_spec.lua replays the kept corpora
-- through them under Lua 5.4 and LuaJIT.
local T = {}

local json = require "gptoss.json"
local harmony = require "gptoss.harmony"
local data = require "gptoss.data"

local tok
local function tokenizer()
  if not tok then
    tok = assert(require("gptoss").tokenizer(os.getenv("GPTOSS_TOKENIZER_DIR") or "tokenizer"))
  end
  return tok
end

-- an error the parser raises on purpose: its own prefix, no Lua fault
local function refusal(err, prefix)
  err = tostring(err)
  if not err:find(prefix, 1, true) then error("not a refusal: " .. err, 0) end
end

--- gptoss.json.decode: a value, or nil and "json: ..."; a value re-encodes
-- to text that decodes to the same encoding
function T.json(s)
  local ok, v, err = pcall(json.decode, s)
  if not ok then error("json.decode raised: " .. tostring(v), 0) end
  if v == nil then refusal(err, "json: "); return end
  local ok2, out = pcall(json.encode_compact, v)
  if not ok2 then refusal(out, "json: "); return end
  local back = json.decode(out)
  if back == nil then error("re-encoded JSON does not decode: " .. out, 0) end
  if json.encode_compact(back) ~= out then error("JSON round trip changed: " .. out, 0) end
end

-- UTF-8 validity, from an oracle independent of harmony's own check: the
-- tokenizer's plain-text encode, which refuses invalid UTF-8 (LuaJIT has no
-- utf8 library)
local function valid_utf8(s)
  return (pcall(tokenizer().encode, tokenizer(), s))
end

-- harmony.parse in each mode and from each start; lenient never raises
local function parse_all(input, opts)
  for _, role in ipairs { false, "assistant" } do
    for _, mode in ipairs { "strict", "nonstrict", "lenient" } do
      local o = { role = role or nil, strict = mode == "strict", lenient = mode == "lenient", tokenizer = opts.tokenizer }
      local ok, msgs, lerr = pcall(harmony.parse, input, o)
      if not ok then
        if mode == "lenient" then error("lenient parse raised: " .. tostring(msgs), 0) end
        refusal(msgs, "harmony: ")
      else
        if type(msgs) ~= "table" then error("parse returned " .. type(msgs), 0) end
        if lerr ~= nil then refusal(lerr, "harmony: ") end
        for _, m in ipairs(msgs) do
          if type(m.content) ~= "string" or type(m.role) ~= "string" then error("a message without role or content", 0) end
          if not valid_utf8(m.content) then error("message content is not UTF-8", 0) end
        end
      end
    end
  end
end

--- harmony text with its control tokens written out
function T.harmony_text(s) parse_all(s, {}) end

--- harmony token ids: every 3 bytes are one id, the first byte's top bit
-- picking a special token (200000 + a small number) or any id below 2^23,
-- so that ids past the vocabulary come too
function T.harmony_tokens(s)
  local ids = {}
  for i = 1, #s - 2, 3 do
    local a, b, c = s:byte(i, i + 2)
    if a >= 128 then ids[#ids + 1] = 199990 + (b * 256 + c) % 1200
    else ids[#ids + 1] = a * 65536 + b * 256 + c end
  end
  parse_all(ids, { tokenizer = tokenizer() })
end

local tmp
--- a training JSONL file: skip mode returns examples and numbered skips;
-- reject mode either returns the same examples or names the line
function T.jsonl(s)
  tmp = tmp or os.tmpname()
  local f = assert(io.open(tmp, "wb"))
  f:write(s)
  f:close()
  local ok, ex, skipped = pcall(data.read_jsonl, tmp, tokenizer(), { on_error = "skip", max_len = 256 })
  if not ok then error("read_jsonl (skip) raised: " .. tostring(ex), 0) end
  if type(ex) ~= "table" or type(skipped) ~= "table" then error("read_jsonl returned " .. type(ex), 0) end
  for _, e in ipairs(skipped) do
    if math.type and math.type(e.line) ~= "integer" or type(e.message) ~= "string" then error("a skip without line or message", 0) end
  end
  local ok2, err = pcall(data.read_jsonl, tmp, tokenizer(), { on_error = "reject", max_len = 256 })
  if not ok2 then
    if #skipped == 0 then error("reject mode raised with nothing skipped: " .. tostring(err), 0) end
    if not tostring(err):find(":" .. skipped[1].line .. ": ", 1, true) then error("reject without the line: " .. tostring(err), 0) end
  elseif #skipped > 0 then
    error("reject mode accepted a file with a skipped line", 0)
  end
end

return T
