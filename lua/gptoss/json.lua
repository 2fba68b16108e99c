--- gptoss.json: JSON that keeps object key order, for tool schemas.
--
-- Lua tables have no key order, but a tool's parameters render in the order
-- of their JSON properties. decode() returns objects whose key order is kept
-- in their metatable (json.keys(t) lists it); arrays carry a marker so an
-- empty one stays an array; null decodes to json.null.
--
-- Encoders match the two writers the chat templates use: encode_compact is
-- serde_json's (Rust harmony: no spaces), encode_python is Python's
-- json.dumps(ensure_ascii=False) as transformers' tojson filter calls it.
local lpeg = require "lpeg"
local P, S, R, C, Ct, Cc, Cf, Cg, V = lpeg.P, lpeg.S, lpeg.R, lpeg.C, lpeg.Ct, lpeg.Cc, lpeg.Cf, lpeg.Cg, lpeg.V

local M = {}

local ARRAY = { __jsontype = "array" }
local NULL = setmetatable({}, { __tostring = function() return "null" end, __jsontype = "null" })
M.null = NULL

--- an object with the given key order: json.object({"b", 2, "a", 1})
function M.object(pairs_list)
  local t, keys = {}, {}
  for i = 1, #pairs_list, 2 do
    keys[#keys + 1] = pairs_list[i]
    t[pairs_list[i]] = pairs_list[i + 1]
  end
  return setmetatable(t, { __jsontype = "object", __order = keys })
end

function M.array(t) return setmetatable(t or {}, ARRAY) end

local function jtype(v)
  local mt = getmetatable(v)
  return mt and mt.__jsontype
end

--- keys of a table in their JSON order (decoded or json.object order);
-- plain tables give their string keys sorted, so output is deterministic
function M.keys(t)
  local mt = getmetatable(t)
  if mt and mt.__order then return mt.__order end
  local ks = {}
  for k in pairs(t) do if type(k) == "string" then ks[#ks + 1] = k end end
  table.sort(ks)
  return ks
end


-- {====================================================== decoder
local function utf8char(cp)
  if cp < 0x80 then return string.char(cp)
  elseif cp < 0x800 then return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64)
  elseif cp < 0x10000 then
    return string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return string.char(0xF0 + math.floor(cp / 262144), 0x80 + math.floor(cp / 4096) % 64,
    0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

M.utf8char = utf8char   -- a code point's UTF-8 bytes (schema_pattern.lua too)

local ws = S(" \t\r\n") ^ 0
local hex = R("09", "af", "AF")
local escapes = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }
local function unicode_escape(hi, lo)
  local a = tonumber(hi, 16)
  if lo then
    local b = tonumber(lo, 16)
    if a >= 0xD800 and a <= 0xDBFF and b >= 0xDC00 and b <= 0xDFFF then
      return utf8char(0x10000 + (a - 0xD800) * 0x400 + (b - 0xDC00))
    end
    return utf8char(a) .. utf8char(b)
  end
  return utf8char(a)
end
local uesc = P"\\u" * C(hex * hex * hex * hex)
-- only a high surrogate takes the next escape with it: "\u20ac\ud83d\ude00"
-- is three escapes, the last two one code point (as Python's json reads it)
local uhigh = P"\\u" * C(S"dD" * S"89abAB" * hex * hex)
local escape = (uhigh * uesc) / unicode_escape + uesc / unicode_escape + P"\\" * C(S'"\\/bfnrt') / escapes
local str = P'"' * Cf(Cc"" * (C((P(1) - S'"\\' - R"\0\31") ^ 1) + escape) ^ 0, function(a, b) return a .. b end) * P'"'
-- a number past the doubles (1e400) is refused, as serde_json does, rather
-- than read as infinity, which no JSON text can hold
local num = lpeg.Cmt(C(P"-" ^ -1 * (P"0" + R"19" * R"09" ^ 0) * (P"." * R"09" ^ 1) ^ -1 * (S"eE" * S"+-" ^ -1 * R"09" ^ 1) ^ -1),
  function(_, i, s)
    local v = tonumber(s)
    if v == math.huge or v == -math.huge then return false end
    return i, v
  end)

local function mkobject(list)
  local t, keys = {}, {}
  for i = 1, #list, 2 do
    local k = list[i]
    if t[k] == nil then keys[#keys + 1] = k end   -- a repeated key keeps its first place, last value
    t[k] = list[i + 1]
  end
  return setmetatable(t, { __jsontype = "object", __order = keys })
end

local grammar = P{
  "doc",
  doc = ws * V"value" * ws * -P(1),
  value = V"object" + V"array" + str + num + P"true" * Cc(true) + P"false" * Cc(false) + P"null" * Cc(NULL),
  member = ws * str * ws * P":" * ws * V"value" * ws,
  object = P"{" * ws * Ct((V"member" * (P"," * V"member") ^ 0) ^ -1) / mkobject * ws * P"}",
  array = P"[" * ws * Ct((ws * V"value" * ws * (P"," * ws * V"value" * ws) ^ 0) ^ -1) / M.array * P"]",
}

-- nesting deeper than this is refused up front: LPeg's own limits (its
-- backtrack stack and capture nesting) end near 99 levels with an internal
-- error; tool schemas nest a few levels
M.MAX_DEPTH = 64
local function too_deep(text)
  local depth, i, in_str = 0, 1, false
  while true do
    local j = text:find(in_str and '["\\]' or '[%[%]{}"]', i)
    if not j then return false end
    local c = text:byte(j)
    i = j + 1
    if in_str then
      if c == 92 then i = j + 2 else in_str = false end
    elseif c == 34 then in_str = true
    elseif c == 91 or c == 123 then
      depth = depth + 1
      if depth > M.MAX_DEPTH then return true end
    else
      depth = depth - 1
    end
  end
end

--- decode(text) -> value | nil, message
function M.decode(text)
  if type(text) ~= "string" then return nil, "json: text expected" end
  if too_deep(text) then return nil, "json: nested deeper than " .. M.MAX_DEPTH .. " levels" end
  local ok, v = pcall(grammar.match, grammar, text)
  if not ok then return nil, "json: " .. tostring(v):gsub("^[^:]*:%d+: ", "") end
  if v == nil then return nil, "json: invalid JSON" end
  return v
end
-- }======================================================

-- {====================================================== encoders
local function is_array(t)
  local jt = jtype(t)
  if jt == "array" then return true end
  if jt == "object" then return false end
  if next(t) == nil then return false end
  local n = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k ~= math.floor(k) then return false end
    n = n + 1
  end
  return n == #t
end

local function escape_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\"
    elseif c == "\n" then return "\\n" elseif c == "\r" then return "\\r" elseif c == "\t" then return "\\t"
    elseif c == "\b" then return "\\b" elseif c == "\f" then return "\\f" end
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

-- Numbers as Python's repr and serde_json write them: integers bare, floats
-- in the shortest text that reads back the same, an integral float with
-- ".0". (LuaJIT has no integer subtype, so there 20.0 writes as 20.)
local function number_text(v)
  if v ~= v then return "NaN" end
  if v == math.huge then return "Infinity" elseif v == -math.huge then return "-Infinity" end
  if math.type then
    if math.type(v) == "integer" then return tostring(v) end
    if v == math.floor(v) and math.abs(v) < 1e16 then return string.format("%.1f", v) end
  elseif v == math.floor(v) and math.abs(v) < 2 ^ 53 then
    return string.format("%.0f", v)
  end
  for prec = 1, 17 do
    local s = string.format("%." .. prec .. "g", v)
    if tonumber(s) == v then return s end
  end
  return string.format("%.17g", v)
end

local function encoder(python)
  local comma, colon = python and ", " or ",", python and ": " or ":"
  local enc
  enc = function(v, out)
    local tv = type(v)
    if v == nil or v == NULL then out[#out + 1] = "null"
    elseif tv == "boolean" then out[#out + 1] = v and "true" or "false"
    elseif tv == "number" then out[#out + 1] = number_text(v)
    elseif tv == "string" then out[#out + 1] = escape_string(v)
    elseif tv == "table" then
      if is_array(v) then
        out[#out + 1] = "["
        for i = 1, #v do
          if i > 1 then out[#out + 1] = comma end
          enc(v[i], out)
        end
        out[#out + 1] = "]"
      else
        out[#out + 1] = "{"
        for i, k in ipairs(M.keys(v)) do
          if i > 1 then out[#out + 1] = comma end
          out[#out + 1] = escape_string(k)
          out[#out + 1] = colon
          enc(v[k], out)
        end
        out[#out + 1] = "}"
      end
    else
      error("json: cannot encode a " .. tv, 0)
    end
  end
  return function(v)
    local out = {}
    enc(v, out)
    return table.concat(out)
  end
end

--- serde_json's compact form: {"a":1,"b":[true,null]}
M.encode_compact = encoder(false)
--- Python's json.dumps(ensure_ascii=False): {"a": 1, "b": [true, null]}
M.encode_python = encoder(true)
-- }======================================================

return M
