--- gptoss.schema_pattern: JSON Schema's `pattern` (ECMA-262 regular
-- expressions) to a GBNF expression for the inside of a JSON string.
--
-- The regular subset: literals, escapes (\d \w \s \D \W \S, \n \t \r \f \v,
-- \xHH, \uHHHH, escaped punctuation), classes with ranges and negation, the
-- dot, groups ((...), (?:...), (?<name>...)), alternation, * + ? {m} {m,}
-- {m,n} (lazy forms too: they match the same strings), and ^ / $ at the
-- ends of a top-level alternative. A pattern not anchored at an end may
-- have any characters there: JSON Schema searches, it does not match
-- whole. What lies beyond (backreferences, lookaround, \b, anchors
-- elsewhere, flags) is refused, naming it.
--
-- A character becomes its JSON form: " and \ and control characters are
-- escaped. The negated classes and \S, \W, \D and . produce a subset of
-- what they match (printable characters), which every output still satisfies.
local M = {}

local function refuse(what) error("pattern: " .. what .. " is not supported", 0) end

-- code point -> the GBNF literal of its JSON-escaped form
local ESC = { [8] = "\\b", [9] = "\\t", [10] = "\\n", [12] = "\\f", [13] = "\\r", [34] = '\\"', [92] = "\\\\" }

local utf8 = require("gptoss.json").utf8char   -- a code point's UTF-8 bytes

local function json_form(cp)
  if ESC[cp] then return ESC[cp] end
  if cp < 0x20 or cp == 0x7F then return string.format("\\u%04x", cp) end
  return utf8(cp)
end

local function gbnf_lit(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
    return string.format("\\x%02X", c:byte())
  end) .. '"'
end

-- a code point inside a GBNF class
local function class_char(cp)
  if cp < 0x20 or cp == 0x7F or cp == 0x5D or cp == 0x5C or cp == 0x5E or cp == 0x2D or cp == 0x22 then
    return string.format("\\x%02X", cp)
  end
  return utf8(cp)
end

local DIGIT = { { 48, 57 } }
local WORD = { { 48, 57 }, { 65, 90 }, { 95, 95 }, { 97, 122 } }
local SPACE = { { 9, 13 }, { 32, 32 } }
-- the printable ASCII complements (a subset of what \D, \W, \S match)
local NOT_DIGIT = { { 32, 47 }, { 58, 126 } }
local NOT_WORD = { { 32, 47 }, { 58, 64 }, { 91, 94 }, { 96, 96 }, { 123, 126 } }
local NOT_SPACE = { { 33, 126 } }

-- a set of ranges as GBNF: direct characters in one class, the ones JSON
-- escapes as literal alternatives
local function ranges_gbnf(ranges, negate)
  local direct, escaped = {}, {}
  if negate then
    local parts = { '[^"\\\\\\x00-\\x1F\\x7F' }
    for _, r in ipairs(ranges) do
      parts[#parts + 1] = class_char(r[1]) .. (r[2] > r[1] and "-" .. class_char(r[2]) or "")
    end
    return "(" .. table.concat(parts) .. "])"
  end
  for _, r in ipairs(ranges) do
    local lo, hi = r[1], r[2]
    for cp = lo, math.min(hi, 0x7F) do
      if cp < 0x20 or cp == 0x7F or cp == 34 or cp == 92 then escaped[#escaped + 1] = gbnf_lit(json_form(cp)) end
    end
    -- the directly written part: cut around the escaped ones
    local segs, s = {}, lo
    for cp = lo, math.min(hi, 0x7F) do
      if cp < 0x20 or cp == 0x7F or cp == 34 or cp == 92 then
        if s < cp then segs[#segs + 1] = { s, cp - 1 } end
        s = cp + 1
      end
    end
    if s <= hi then segs[#segs + 1] = { s, hi } end
    for _, g in ipairs(segs) do
      direct[#direct + 1] = class_char(g[1]) .. (g[2] > g[1] and "-" .. class_char(g[2]) or "")
    end
  end
  local alts = {}
  if #direct > 0 then alts[1] = "[" .. table.concat(direct) .. "]" end
  for _, e in ipairs(escaped) do alts[#alts + 1] = e end
  if #alts == 0 then refuse("an empty character class") end
  return "(" .. table.concat(alts, " | ") .. ")"
end

--- to_gbnf(pattern [, bound]) -> GBNF expression for the string's inside;
-- bound caps *, + and the unanchored ends (the schema's max_string)
function M.to_gbnf(src, bound)
  local pos, n = 1, #src
  local function peek(k) return src:sub(pos + (k or 0), pos + (k or 0)) end
  local anychar = "char" .. (bound and "{0," .. bound .. "}" or "*")

  local function hex(k)
    local h = src:sub(pos, pos + k - 1)
    if #h < k or not h:match("^%x+$") then refuse("a malformed \\x or \\u escape") end
    pos = pos + k
    return tonumber(h, 16)
  end

  -- an escape after "\": returns ranges (a class) or a code point
  local function escape(in_class)
    local c = peek()
    pos = pos + 1
    if c == "" then refuse("a trailing backslash") end
    if c == "d" then return DIGIT elseif c == "w" then return WORD elseif c == "s" then return SPACE
    elseif c == "D" then return NOT_DIGIT elseif c == "W" then return NOT_WORD elseif c == "S" then return NOT_SPACE end
    if c == "n" then return 10 elseif c == "t" then return 9 elseif c == "r" then return 13
    elseif c == "f" then return 12 elseif c == "v" then return 11 end
    if c == "x" then return hex(2) end
    if c == "u" then
      if peek() == "{" then refuse("\\u{...}") end
      return hex(4)
    end
    if c == "b" then if in_class then return 8 end refuse("\\b (a word boundary)") end
    if c == "B" then refuse("\\B") end
    if c:match("%d") then refuse("a backreference (\\" .. c .. ")") end
    if c == "k" then refuse("a named backreference (\\k)") end
    if c == "p" or c == "P" then refuse("Unicode property escapes (\\" .. c .. ")") end
    if c == "c" then refuse("control escapes (\\c)") end
    if c:match("%w") then refuse("the escape \\" .. c) end
    return c:byte()
  end

  -- one code point of the source (UTF-8)
  local function literal_cp()
    local b = src:byte(pos)
    local len = b < 0x80 and 1 or b < 0xE0 and 2 or b < 0xF0 and 3 or 4
    local s = src:sub(pos, pos + len - 1)
    pos = pos + len
    local cp = 0
    if len == 1 then return b end
    cp = b % (len == 2 and 32 or len == 3 and 16 or 8)
    for i = 2, len do cp = cp * 64 + s:byte(i) % 64 end
    return cp
  end

  local function class()
    pos = pos + 1   -- [
    local negate = false
    if peek() == "^" then negate = true; pos = pos + 1 end
    local ranges = {}
    local first = true
    while pos <= n and (peek() ~= "]" or false) do
      first = false
      local lo
      if peek() == "\\" then
        pos = pos + 1
        lo = escape(true)
      else lo = literal_cp() end
      if type(lo) == "table" then
        for _, r in ipairs(lo) do ranges[#ranges + 1] = r end
      elseif peek() == "-" and peek(1) ~= "]" and peek(1) ~= "" then
        pos = pos + 1
        local hi
        if peek() == "\\" then pos = pos + 1; hi = escape(true) else hi = literal_cp() end
        if type(hi) == "table" then refuse("a class escape as a range's end") end
        if hi < lo then refuse("a backwards range") end
        ranges[#ranges + 1] = { lo, hi }
      else ranges[#ranges + 1] = { lo, lo } end
    end
    if pos > n then refuse("an unterminated class") end
    pos = pos + 1   -- ]
    if first and not negate then refuse("an empty class") end
    return ranges_gbnf(ranges, negate)
  end

  local alternation
  local function atom()
    local c = peek()
    if c == "(" then
      pos = pos + 1
      if peek() == "?" then
        local k = peek(1)
        if k == ":" then pos = pos + 2
        elseif k == "<" and peek(2) ~= "=" and peek(2) ~= "!" then
          local close = src:find(">", pos, true)
          if not close then refuse("an unterminated group name") end
          pos = close + 1
        else refuse("lookaround and group flags ((?" .. k .. ")") end
      end
      local inner = alternation(false)
      if peek() ~= ")" then refuse("an unclosed group") end
      pos = pos + 1
      return "(" .. inner .. ")"
    elseif c == "[" then return class()
    elseif c == "." then
      pos = pos + 1
      return '([^"\\\\\\x00-\\x1F\\x7F\\u2028\\u2029] | "\\\\\\"" | "\\\\\\\\")'
    elseif c == "\\" then
      pos = pos + 1
      local e = escape(false)
      if type(e) == "table" then return ranges_gbnf(e, false) end
      return gbnf_lit(json_form(e))
    elseif c == "^" or c == "$" then refuse("the anchor '" .. c .. "' inside the pattern")
    elseif c == "*" or c == "+" or c == "?" or c == "{" then refuse("a quantifier with nothing to repeat ('" .. c .. "')")
    elseif c == "]" or c == "}" then pos = pos + 1; return gbnf_lit(c)
    end
    return gbnf_lit(json_form(literal_cp()))
  end

  local function quantifier(a)
    local c = peek()
    local q
    if c == "*" then q = bound and "{0," .. bound .. "}" or "*"; pos = pos + 1
    elseif c == "+" then q = bound and "{1," .. math.max(1, bound) .. "}" or "+"; pos = pos + 1
    elseif c == "?" then q = "?"; pos = pos + 1
    elseif c == "{" then
      local m, rest = src:match("^{(%d+)(,?%d*)}", pos)
      if not m then return a end   -- a literal "{" (ECMA's annex B)
      pos = pos + #m + #rest + 2
      if rest == "," then
        q = bound and "{" .. m .. "," .. math.max(tonumber(m), bound) .. "}" or "{" .. m .. ",}"
      elseif rest ~= "" and tonumber(rest:sub(2)) < tonumber(m) then refuse("a repetition {m,n} with n < m")
      else q = "{" .. m .. rest .. "}" end
    else return a end
    if peek() == "?" then pos = pos + 1 end   -- lazy: the same strings
    if peek() == "*" or peek() == "+" or (peek() == "?" ) then refuse("a nested quantifier") end
    return "(" .. a .. ")" .. q
  end

  local function sequence(top)
    local parts = {}
    local start_anchor, end_anchor = false, false
    if top and peek() == "^" then start_anchor = true; pos = pos + 1 end
    while pos <= n and peek() ~= "|" and peek() ~= ")" do
      if top and peek() == "$" and (pos == n or peek(1) == "|") then end_anchor = true; pos = pos + 1; break end
      parts[#parts + 1] = quantifier(atom())
    end
    local body = #parts > 0 and table.concat(parts, " ") or '""'
    if top then
      if not start_anchor then body = anychar .. " " .. body end
      if not end_anchor then body = body .. " " .. anychar end
    end
    return body
  end

  function alternation(top)
    local alts = { sequence(top) }
    while peek() == "|" do
      pos = pos + 1
      alts[#alts + 1] = sequence(top)
    end
    return table.concat(alts, " | ")
  end

  local out = alternation(true)
  if pos <= n then refuse("an unmatched ')'") end
  return "(" .. out .. ")"
end

return M
