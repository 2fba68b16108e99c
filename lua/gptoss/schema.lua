--- gptoss.schema: JSON Schema to a GBNF grammar (gptoss.grammar's format).
--
-- In the manner of llama.cpp's json_schema_to_grammar, with two differences:
-- additionalProperties defaults as the schema says (allowed unless false),
-- and a keyword the grammar cannot express is an error naming it and its
-- JSON pointer, never silently dropped. Covered: type (and lists of types),
-- properties, required, additionalProperties, enum, const, anyOf, oneOf
-- (as alternatives, so only alternatives provably disjoint: by type, by
-- const / enum, or by a required property's const / enum), allOf (merged
-- with the keywords beside it), items, prefixItems (and draft 4's items list with
-- additionalItems), minItems, maxItems, minLength, maxLength, pattern (a
-- regular subset: gptoss.schema_pattern), minimum / maximum /
-- exclusiveMinimum / exclusiveMaximum on integers, $ref into the document
-- ($defs, definitions, "#"), minProperties / maxProperties (the grammar
-- counts: additional properties a minimum needs get keys of distinct
-- lengths, so they cannot collapse into one), format date, time, date-time,
-- uuid, email, ipv4, hostname, uri, uri-reference (subsets of ajv-formats');
-- annotations (title, description, default, examples, $schema, $id,
-- $comment, deprecated, readOnly, writeOnly) are ignored.
--
-- opts: compact (no whitespace between tokens; otherwise llama.cpp's: one
-- space, or a newline and up to 20 spaces or tabs), and bounds for what
-- the schema leaves unbounded: max_string (characters), max_items,
-- max_properties (additional properties per object).
local json = require "gptoss.json"
local pattern = require "gptoss.schema_pattern"

local M = {}
local unpack = table.unpack or unpack

local ANNOTATIONS = { title = true, description = true, default = true, examples = true, ["$schema"] = true,
  ["$id"] = true, ["$comment"] = true, deprecated = true, readOnly = true, writeOnly = true,
  ["$defs"] = true, definitions = true }

local KNOWN = { type = true, properties = true, required = true, additionalProperties = true, enum = true,
  const = true, anyOf = true, oneOf = true, allOf = true, items = true, prefixItems = true, additionalItems = true,
  minItems = true, maxItems = true, minProperties = true, maxProperties = true, minLength = true, maxLength = true,
  pattern = true, minimum = true, maximum = true, exclusiveMinimum = true, exclusiveMaximum = true, ["$ref"] = true, format = true }

-- each format's rule: a subset of what ajv-formats (full mode) accepts, so
-- every string generated validates there
local FORMATS = { date = "date-part", time = "time-part", ["date-time"] = "date-time-part", uuid = "uuid-part",
  email = "email-part", ipv4 = "ipv4-part", hostname = "hostname-part", uri = "uri-part",
  ["uri-reference"] = "uri-reference-part" }

local CHAR = [=[[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-CefEF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}))]=]

local PRIMITIVES = {
  boolean = '("true" | "false") space',
  null = '"null" space',
  ["integral-part"] = '"0" | [1-9] [0-9]{0,15}',
  ["decimal-part"] = '[0-9]{1,16}',
  integer = '"-"? integral-part space',
  number = '"-"? integral-part ("." decimal-part)? ([eE] [-+]? [0-9]{1,3})? space',
  char = CHAR,
  value = 'object | array | string | number | boolean | null',
  ["date-part"] = '[0-9]{4} "-" ( ("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
    .. ' | ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30") | "02" "-" ("0" [1-9] | "1" [0-9] | "2" [0-8]) )',
  ["time-part"] = '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
  ["date-time-part"] = 'date-part "T" time-part',
  ["uuid-part"] = '[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}',
  ["email-part"] = '[a-z0-9]{1,16} ("." [a-z0-9]{1,16})? "@" [a-z0-9]{1,16} ("." [a-z]{2,8}){1,2}',
  -- 0-255 without leading zeros, as ajv-formats' ipv4
  ["ipv4-octet"] = '"25" [0-5] | "2" [0-4] [0-9] | "1" [0-9]{2} | [1-9]? [0-9]',
  ["ipv4-part"] = 'ipv4-octet "." ipv4-octet "." ipv4-octet "." ipv4-octet',
  -- RFC 1123 labels (letters, digits, inner hyphens; up to 16 of the 63
  -- characters, 4 labels: far below the 253 in all)
  ["hostname-label"] = '[a-z0-9] ([a-z0-9-]{0,14} [a-z0-9])?',
  ["hostname-part"] = 'hostname-label ("." hostname-label){0,3}',
  -- scheme "://" host, port, path, query, fragment of RFC 3986's unreserved
  -- characters and percent escapes: inside ajv-formats' uri and uri-reference
  ["uri-char"] = '[a-z0-9._~-] | "%" [0-9A-F]{2}',
  ["uri-tail"] = '("/" uri-char{0,12}){0,3} ("?" (uri-char | [=&]){0,16})? ("#" uri-char{0,16})?',
  ["uri-part"] = '[a-z] [a-z0-9+.-]{0,7} "://" hostname-part (":" [0-9]{1,5})? uri-tail',
  -- a uri, or a reference relative to one: an absolute path, or a fragment
  ["uri-reference-part"] = 'uri-part | "/" uri-char{1,12} uri-tail | "#" uri-char{0,16}',
}
-- what each primitive uses
local DEPS = { boolean = { "space" }, null = { "space" }, integer = { "integral-part", "space" },
  number = { "integral-part", "decimal-part", "space" },
  ["ipv4-part"] = { "ipv4-octet" }, ["hostname-part"] = { "hostname-label" },
  ["uri-tail"] = { "uri-char" }, ["uri-part"] = { "hostname-part", "uri-tail" },
  ["uri-reference-part"] = { "uri-part", "uri-char", "uri-tail" },
  ["date-time-part"] = { "date-part", "time-part" }, value = { "object", "array", "string", "number", "boolean", "null" } }

local function pointer(path)
  local out = {}
  for i, p in ipairs(path) do out[i] = "/" .. tostring(p):gsub("~", "~0"):gsub("/", "~1") end
  return #out > 0 and table.concat(out) or "(root)"
end

local function is_int(x) return type(x) == "number" and x == math.floor(x) and x > -2 ^ 53 and x < 2 ^ 53 end

--- a GBNF literal: "..." with escapes
local function lit(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" elseif c == "\n" then return "\\n" end
    return string.format("\\x%02X", c:byte())
  end) .. '"'
end
M.literal = lit

local function keys_of(t)
  local ks = json.keys(t)
  if #ks == 0 then for k in pairs(t) do ks[#ks + 1] = k end; table.sort(ks) end
  return ks
end

-- {====================================================== integer ranges
-- digits strings of equal length lo <= hi: the numbers between, as GBNF
local function same_length(lo, hi)
  if lo == "" then return "" end
  local a, b = lo:sub(1, 1), hi:sub(1, 1)
  local rl, rh = lo:sub(2), hi:sub(2)
  if a == b then
    local rest = same_length(rl, rh)
    return '"' .. a .. '"' .. (rest ~= "" and " " .. rest or "")
  end
  local n = #rl
  local any = n > 0 and (" [0-9]" .. (n > 1 and "{" .. n .. "}" or "")) or ""
  local alts = {}
  if rl == ("0"):rep(n) and rh == ("9"):rep(n) then
    return "[" .. a .. "-" .. b .. "]" .. any
  end
  local first, last = tonumber(a), tonumber(b)
  if rl == ("0"):rep(n) then first = first - 1   -- a's whole block joins the middle
  else alts[#alts + 1] = '"' .. a .. '" ' .. "(" .. same_length(rl, ("9"):rep(n)) .. ")" end
  local mid_lo, mid_hi = first + 1, rh == ("9"):rep(n) and last or last - 1
  if mid_lo <= mid_hi then alts[#alts + 1] = "[" .. mid_lo .. "-" .. mid_hi .. "]" .. any end
  if rh ~= ("9"):rep(n) then alts[#alts + 1] = '"' .. b .. '" ' .. "(" .. same_length(("0"):rep(n), rh) .. ")" end
  return "(" .. table.concat(alts, " | ") .. ")"
end

-- non-negative integers in [lo, hi] (hi = nil: unbounded), no leading zeros
local function nonneg_range(lo, hi)
  local alts = {}
  local dl = #string.format("%d", lo)
  local dh = hi and #string.format("%d", hi) or 16
  for d = dl, dh do
    local a = math.max(lo, d == 1 and 0 or 10 ^ (d - 1))
    local b = hi and math.min(hi, 10 ^ d - 1) or 10 ^ d - 1
    if a <= b then alts[#alts + 1] = same_length(string.format("%d", a), string.format("%d", b)) end
  end
  if not hi then alts[#alts + 1] = "[1-9] [0-9]{16,18}" end
  return "(" .. table.concat(alts, " | ") .. ")"
end

--- integers in [lo, hi] (either nil: unbounded) as a GBNF expression
function M.int_range(lo, hi)
  local alts = {}
  if lo == nil or lo < 0 then   -- negatives: "-" and a magnitude in [max(1, -hi), -lo]
    local mlo = math.max(1, hi and -hi or 1)
    local mhi = lo and -lo or nil
    if not mhi or mlo <= mhi then alts[#alts + 1] = '"-" ' .. nonneg_range(mlo, mhi) end
  end
  if hi == nil or hi >= 0 then alts[#alts + 1] = nonneg_range(math.max(lo or 0, 0), hi) end
  if #alts == 0 then return nil end
  return "(" .. table.concat(alts, " | ") .. ")"
end
-- }======================================================

-- {====================================================== converter
local Conv = {}
Conv.__index = Conv

local function fail(path, msg) error({ schema_error = "json_schema: " .. msg .. " at " .. pointer(path) }, 0) end

function Conv:rule(name, body)
  name = name:gsub("[^%w%-]", "-"):gsub("%-+", "-")
  local base, i = name, 1
  while self.rules[name] and self.rules[name] ~= body do i = i + 1; name = base .. i end
  if not self.rules[name] then self.rules[name] = body; self.order[#self.order + 1] = name end
  return name
end

-- a new name, reserved (its body comes later: references may recurse)
function Conv:fresh(name)
  name = name:gsub("[^%w%-]", "-"):gsub("%-+", "-")
  local base, i = name, 1
  while self.rules[name] do i = i + 1; name = base .. i end
  self.rules[name] = '""'
  self.order[#self.order + 1] = name
  return name
end

function Conv:prim(name)
  if self.rules[name] then return name end
  if name == "space" then return self:rule("space", self.opts.compact and '""' or '| " " | "\\n" [ \\t]{0,20}') end
  if name == "string" then
    self:prim("char")
    local ms = self.opts.max_string
    return self:rule("string", '"\\"" char' .. (ms and "{0," .. ms .. "}" or "*") .. ' "\\"" space')
  end
  if name == "object" or name == "array" then
    self:fresh(name)   -- value refers back to it
    self.rules[name] = name == "object" and self:object_rule({}, {}, true, {}) or self:array_rule({}, nil, {}, {})
    return name
  end
  for _, d in ipairs(DEPS[name] or {}) do self:prim(d) end
  return self:rule(name, assert(PRIMITIVES[name], name))
end

function Conv:resolve(ref, path)
  if self.refs[ref] then return self.refs[ref] end
  if ref:sub(1, 1) ~= "#" then fail(path, "$ref '" .. ref .. "' is not local (only '#...' references are supported)") end
  local node, parts = self.root, {}
  for part in ref:sub(2):gmatch("[^/]+") do
    part = part:gsub("~1", "/"):gsub("~0", "~"):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    parts[#parts + 1] = part
    node = type(node) == "table" and (node[part] or node[tonumber(part) and tonumber(part) + 1]) or nil
    if node == nil then fail(path, "$ref '" .. ref .. "' points at nothing") end
  end
  local name = self:fresh("ref-" .. (#parts > 0 and parts[#parts] or "root"))
  self.refs[ref] = name
  self.rules[name] = self:visit(node, parts)
  return name
end

-- a sub-schema as a rule's name
function Conv:sub(schema, path, hint)
  local body = self:visit(schema, path)
  if body:match("^[%w%-]+$") and self.rules[body] then return body end
  return self:rule(hint, body)
end

function Conv:kv(name, schema, path)
  self:prim("space")
  return lit(json.encode_compact(name)) .. ' space ":" space ' .. self:sub(schema, path, "p-" .. name)
end

-- an object: properties (name -> schema), the required ones, additional
-- (false | true | schema), count (nil, or { lo, hi }: minProperties,
-- maxProperties, hi nil when unbounded)
function Conv:object_rule(props, required, additional, path, count)
  self:prim("space")
  local req, opt = {}, {}
  local is_req = {}
  for _, r in ipairs(required) do is_req[r] = true end
  for _, k in ipairs(keys_of(props)) do
    local s = props[k]
    local p = { unpack(path) }
    p[#p + 1] = "properties"; p[#p + 1] = k
    if s == false then
      if is_req[k] then fail(p, "required property '" .. k .. "' has schema false (the schema admits nothing)") end
    else
      local kv = self:kv(k, s, p)
      if is_req[k] then req[#req + 1] = kv else opt[#opt + 1] = kv end
    end
  end
  for _, r in ipairs(required) do
    if props[r] == nil then
      if additional == false then fail(path, "required property '" .. r .. "' is not in properties and additionalProperties is false") end
      req[#req + 1] = self:kv(r, additional == true and {} or additional, path)
    end
  end
  local extra, names, val
  if additional ~= false then
    local ap = { unpack(path) }
    ap[#ap + 1] = "additionalProperties"
    names = keys_of(props)
    for _, r in ipairs(required) do if props[r] == nil then names[#names + 1] = r end end
    local key = self:rule("key-" .. #self.order, self:other_key(names))
    val = self:sub(additional == true and {} or additional, ap, "additional")
    extra = self:rule("kv-" .. #self.order, key .. ' ":" space ' .. val)
  end
  local mp = self.opts.max_properties
  if count then
    -- the j-th additional property a minimum needs: a key longer than any
    -- declared name (so none of them), of its own length (so no two alike:
    -- JSON.parse keeps one of equal keys, and the count would fall short)
    local longest = 0
    for _, n in ipairs(names or {}) do longest = math.max(longest, #n) end
    local function needed(j)
      self:rule("key-char", '[^"\\\\\\x7F\\x00-\\x1F]')
      return self:rule("kv-needed-" .. j, '"\\"" key-char{' .. (longest + j) .. '} "\\"" space ":" space ' .. val)
    end
    return '"{" space ' .. self:counted_members(req, opt, extra, needed, count[1], count[2], mp, path) .. ' "}" space'
  end
  local rep = mp and "{0," .. mp .. "}" or "*"
  local function tail(list, from)
    local t = {}
    for i = from, #list do t[#t + 1] = '("," space ' .. list[i] .. ")?" end
    if extra then t[#t + 1] = '("," space ' .. extra .. ")" .. rep end
    return table.concat(t, " ")
  end
  local body
  if #req > 0 then
    local seq = { req[1] }
    for i = 2, #req do seq[#seq + 1] = '"," space ' .. req[i] end
    body = table.concat(seq, " ") .. " " .. tail(opt, 1)
  else
    local alts = {}
    for i = 1, #opt do alts[#alts + 1] = opt[i] .. " " .. tail(opt, i + 1) end
    if extra then
      alts[#alts + 1] = extra .. (mp and mp > 1 and ' ("," space ' .. extra .. "){0," .. (mp - 1) .. "}" or mp and "" or ' ("," space ' .. extra .. ")*")
      if mp == 0 then alts[#alts] = nil end
    end
    body = #alts > 0 and "(" .. table.concat(alts, " | ") .. ")?" or ""
  end
  return '"{" space ' .. body .. ' "}" space'
end

-- an object's members when their count must lie in [lo, hi] (hi nil:
-- unbounded): the required ones, each optional one present or not, then
-- additional ones (extra; needed(j): the j-th of those the minimum needs,
-- mp: at most this many others). A rule per (next optional, members so far):
-- at most (#opt + 1) * (#req + #opt + 1) of them, whatever lo and hi; with
-- no hi, counts past max(lo, 1) are all alike.
function Conv:counted_members(req, opt, extra, needed, lo, hi, mp, path)
  if hi and #req > hi then fail(path, "maxProperties is below the number of required properties") end
  local function cap(c) return hi and c or math.min(c, math.max(lo, 1)) end
  local function sep(c) return c > 0 and '"," space ' or "" end
  local memo = {}
  local function state(i, c)   -- a GBNF expression, or false where no count in [lo, hi] can be reached
    local key = i .. ":" .. c
    if memo[key] ~= nil then return memo[key] end
    local out = false
    if i > #opt then   -- the additional ones
      local need = math.max(0, lo - c)
      local top = 0
      if extra then
        top = math.max(need, mp or math.huge)
        if hi then top = math.min(top, hi - c) end
      end
      if top >= need then
        local parts = {}
        for j = 1, need do parts[#parts + 1] = sep(c + j - 1) .. needed(j) end
        local more = top - need
        local rep = more == math.huge and "*" or "{0," .. more .. "}"
        if more > 0 then
          if c + need > 0 then parts[#parts + 1] = '("," space ' .. extra .. ")" .. rep
          else
            rep = more == math.huge and "*" or "{0," .. (more - 1) .. "}"
            parts[#parts + 1] = "(" .. extra .. ' ("," space ' .. extra .. ")" .. rep .. ")?"
          end
        end
        out = #parts > 0 and table.concat(parts, " ") or '""'
      end
    else
      local alts = {}
      local present = (not hi or c < hi) and state(i + 1, cap(c + 1))
      if present then alts[#alts + 1] = sep(c) .. opt[i] .. " " .. present end
      local absent = state(i + 1, c)
      if absent then alts[#alts + 1] = absent end
      if #alts > 0 then out = self:rule("members", "(" .. table.concat(alts, " | ") .. ")") end
    end
    memo[key] = out
    return out
  end
  local rest = state(1, cap(#req))
  if not rest then fail(path, "minProperties is above what the object can hold") end
  local seq = {}
  for i, kv in ipairs(req) do seq[i] = (i > 1 and '"," space ' or "") .. kv end
  seq[#seq + 1] = rest
  return table.concat(seq, " ")
end

-- a key: any JSON string but the given names (an additional property must not
-- take a declared one's name), as a trie of the names with exits at each node
function Conv:other_key(names)
  -- unescaped characters only: "\u0061" would be "a" again
  self:rule("key-char", '[^"\\\\\\x7F\\x00-\\x1F]')
  local ms = self.opts.max_string
  local rest = "key-char" .. (ms and "{0," .. ms .. "}" or "*")
  if #names == 0 then return '"\\"" ' .. rest .. ' "\\"" space' end
  local function node(list, depth)
    -- list: names sharing their first depth bytes
    local ends, kids, order = false, {}, {}
    for _, n in ipairs(list) do
      if #n == depth then ends = true
      else
        local c = n:sub(depth + 1, depth + 1)
        if not kids[c] then kids[c] = {}; order[#order + 1] = c end
        table.insert(kids[c], n)
      end
    end
    table.sort(order)
    local alts = {}
    if not ends then alts[#alts + 1] = '"\\""' end   -- the key may end here
    local excl = {}
    for _, c in ipairs(order) do
      -- names are matched byte by byte on their JSON-escaped form
      alts[#alts + 1] = lit(c) .. " " .. node(kids[c], depth + 1)
      excl[#excl + 1] = c:byte() < 128 and c or nil
    end
    -- any other character, then anything: only ASCII bytes can be excluded
    -- here, so names' multi-byte characters are handled by exclusion of the prefix byte's whole class
    local cls = {}
    for _, c in ipairs(excl) do cls[#cls + 1] = string.format("\\x%02X", c:byte()) end
    local hi = {}
    for _, c in ipairs(order) do if c:byte() >= 128 then hi[#hi + 1] = string.format("\\x%02X", c:byte()) end end
    if #hi > 0 then fail({}, "additional properties beside non-ASCII property names are not supported") end
    alts[#alts + 1] = '[^"\\\\\\x7F\\x00-\\x1F' .. table.concat(cls) .. '] ' .. rest .. ' "\\""'
    return "(" .. table.concat(alts, " | ") .. ")"
  end
  local escaped = {}
  for i, n in ipairs(names) do escaped[i] = json.encode_compact(n):sub(2, -2) end
  return '"\\"" ' .. node(escaped, 0) .. " space"
end

function Conv:array_rule(prefix, items, path, s)
  self:prim("space")
  local lo, hi = s.minItems or 0, s.maxItems
  local seq = {}
  for i, ps in ipairs(prefix) do
    local p = { unpack(path) }
    p[#p + 1] = "prefixItems"; p[#p + 1] = i - 1
    seq[#seq + 1] = self:sub(ps, p, "item" .. i)
  end
  local n = #seq
  if lo < n then
    -- the tuple may stop after lo of its items
    if items ~= false and hi == nil then hi = math.huge end
  end
  local item
  if items ~= false then
    local p = { unpack(path) }
    p[#p + 1] = s.prefixItems and "items" or (s.additionalItems ~= nil and "additionalItems" or "items")
    item = self:sub(items == nil and {} or items, p, "item")
  end
  if hi == nil then hi = self.opts.max_items and math.max(lo, self.opts.max_items, n) or math.huge end
  if items == false then hi = math.min(hi, n) end
  if hi < lo or (items == false and lo > n) then fail(path, "minItems is above what the array can hold") end
  -- element k (1-based) is seq[k] or item; elements 1..lo are mandatory
  local function elem(k) return seq[k] or item end
  local function from(k)   -- elements k.. optional (k > lo), each after a comma
    if k > hi then return "" end
    if k > n and hi == math.huge then return '("," space ' .. item .. ")*" end
    if k > n then return '("," space ' .. item .. "){0," .. (hi - k + 1) .. "}" end
    local rest = from(k + 1)
    return '("," space ' .. elem(k) .. (rest ~= "" and " " .. rest or "") .. ")?"
  end
  local body
  if lo == 0 then
    if hi == 0 then body = ""
    else
      local rest = from(2)
      body = "(" .. elem(1) .. (rest ~= "" and " " .. rest or "") .. ")?"
    end
  else
    local parts = { elem(1) }
    for k = 2, lo do parts[#parts + 1] = '"," space ' .. elem(k) end
    local rest = from(lo + 1)
    if rest ~= "" then parts[#parts + 1] = rest end
    body = table.concat(parts, " ")
  end
  return '"[" space ' .. body .. ' "]" space'
end

function Conv:string_rule(s, path)
  self:prim("space")
  if s.format then
    if not FORMATS[s.format] then
      local p = { unpack(path) }
      p[#p + 1] = "format"
      fail(p, "unsupported format '" .. tostring(s.format) .. "'")
    end
    if s.pattern or s.minLength or s.maxLength then fail(path, "format with pattern, minLength or maxLength is not supported") end
    local part = FORMATS[s.format]
    self:prim(part)
    return '"\\"" ' .. part .. ' "\\"" space'
  end
  if s.pattern then
    if s.minLength or s.maxLength then fail(path, "pattern with minLength or maxLength is not supported") end
    local p = { unpack(path) }
    p[#p + 1] = "pattern"
    self:prim("char")
    local ok, g = pcall(pattern.to_gbnf, s.pattern, self.opts.max_string)
    if not ok then fail(p, tostring(g):gsub("^.-:%d+: ", "")) end
    return '"\\"" ' .. g .. ' "\\"" space'
  end
  local lo, hi = s.minLength or 0, s.maxLength or self.opts.max_string
  if hi and lo > hi then hi = lo end
  self:prim("char")
  if lo == 0 and not hi then return '"\\"" char* "\\"" space' end
  return '"\\"" char{' .. lo .. "," .. (hi or "") .. '} "\\"" space'
end

function Conv:integer_rule(s, path)
  local lo, hi = s.minimum, s.maximum
  local function num(k)
    local v = s[k]
    if v ~= nil and type(v) ~= "number" and type(v) ~= "boolean" then fail(path, k .. " must be a number") end
  end
  for _, k in ipairs { "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum" } do num(k) end
  if s.exclusiveMinimum == true then lo = lo + 1   -- draft 4: a flag on minimum
  elseif type(s.exclusiveMinimum) == "number" then lo = math.max(lo or -math.huge, math.floor(s.exclusiveMinimum) + 1) end
  if s.exclusiveMaximum == true then hi = hi - 1
  elseif type(s.exclusiveMaximum) == "number" then hi = math.min(hi or math.huge, math.ceil(s.exclusiveMaximum) - 1) end
  if lo then lo = math.ceil(lo) end
  if hi then hi = math.floor(hi) end
  if lo == -math.huge then lo = nil end
  if hi == math.huge then hi = nil end
  if lo == nil and hi == nil then return self:prim("integer") end
  if (lo and math.abs(lo) >= 1e15) or (hi and math.abs(hi) >= 1e15) then fail(path, "integer bounds beyond 1e15 are not supported") end
  if lo and hi and lo > hi then fail(path, "minimum is above maximum") end
  self:prim("space")
  return M.int_range(lo, hi) .. " space"
end

-- allOf's schemas merged into one, with base (the schema holding the allOf,
-- whose own keywords hold too)
function Conv:merge_all(list, path, base)
  local out, parts, seen_required = {}, {}, {}
  if base then parts[1] = { base, path, true } end
  for i, sub in ipairs(list) do
    local p = { unpack(path) }
    p[#p + 1] = "allOf"; p[#p + 1] = i - 1
    parts[#parts + 1] = { sub, p }
  end
  for _, part in ipairs(parts) do
    local sub, p, is_base = part[1], part[2], part[3]
    if type(sub) == "table" and sub["$ref"] then sub = self:deref(sub["$ref"], p) end
    if sub == true then sub = {} end   -- admits everything: adds nothing to the merge
    if sub == false then fail(p, "schema false admits nothing") end
    if type(sub) ~= "table" then fail(p, "allOf needs schemas (objects or booleans)") end
    if sub.allOf and not is_base then sub = self:merge_all(sub.allOf, p, sub) end
    for k, v in pairs(sub) do
      if k == "properties" then
        out.properties = out.properties or {}
        for name, ps in pairs(v) do
          if out.properties[name] ~= nil and json.encode_compact(out.properties[name]) ~= json.encode_compact(ps) then
            fail(p, "allOf: property '" .. name .. "' is given two different schemas")
          end
          out.properties[name] = ps
        end
      elseif k == "required" then
        out.required = out.required or {}
        for _, r in ipairs(v) do
          if not seen_required[r] then seen_required[r] = true; out.required[#out.required + 1] = r end
        end
      elseif k == "additionalProperties" and v == false then
        out.closed = out.closed or {}
        local names = {}
        for name in pairs(sub.properties or {}) do names[name] = true end
        out.closed[#out.closed + 1] = names
      elseif k ~= "allOf" and not ANNOTATIONS[k] then
        if out[k] ~= nil and json.encode_compact(out[k]) ~= json.encode_compact(v) then
          fail(p, "allOf: '" .. k .. "' is given two different values")
        end
        out[k] = v
      end
    end
  end
  if out.closed then   -- only names every closed part declares may appear
    local props = {}
    for name, ps in pairs(out.properties or {}) do
      local ok = true
      for _, names in ipairs(out.closed) do ok = ok and names[name] or false end
      if ok then props[name] = ps end
    end
    out.properties = props
    out.additionalProperties = false
    out.closed = nil
  end
  return out
end

-- the JSON types a schema admits, as a set (nil: any), read from type,
-- const or enum alone; integer is a number too
local function json_type(v)
  if v == json.null then return "null" end
  if type(v) == "table" then   -- json.decode marks arrays and objects; a Lua table by its shape
    local mt = getmetatable(v)
    return mt and mt.__jsontype or (v[1] ~= nil and "array" or "object")
  end
  if type(v) == "number" then return v == math.floor(v) and "integer" or "number" end
  return type(v)
end
local function type_set(s)
  local set = {}
  local values = s.enum or (s.const ~= nil and { s.const }) or nil
  if values then for _, v in ipairs(values) do set[json_type(v)] = true end
  elseif type(s.type) == "string" then set[s.type] = true
  elseif type(s.type) == "table" then for _, t in ipairs(s.type) do set[t] = true end
  else return nil end
  if set.integer then set.number = true end
  if set.number then set.integer = true end
  return set
end
-- const / enum values as a set of JSON texts (nil: not fixed)
local function value_set(s)
  if type(s) ~= "table" then return nil end
  local values = s.enum or (s.const ~= nil and { s.const }) or nil
  if not values then return nil end
  local set = {}
  for _, v in ipairs(values) do set[json.encode_compact(v)] = true end
  return set
end
local function meet(a, b)
  for k in pairs(a) do if b[k] then return true end end
  return false
end
local function has(list, x)
  for _, v in ipairs(list or {}) do if v == x then return true end end
  return false
end

-- oneOf is generated as alternatives, so no instance may match two of them:
-- only alternatives provably disjoint are accepted (by type, by const / enum
-- values, or by a required property whose const / enum values differ)
function Conv:check_disjoint(alts, path)
  local function resolved(s, i)
    if type(s) == "table" and s["$ref"] then
      local p = { unpack(path) }
      p[#p + 1] = i - 1
      return self:deref(s["$ref"], p)
    end
    return s
  end
  local function disjoint(a, b)
    if type(a) ~= "table" or type(b) ~= "table" then return false end
    local ta, tb = type_set(a), type_set(b)
    if ta and tb and not meet(ta, tb) then return true end
    local va, vb = value_set(a), value_set(b)
    if va and vb and not meet(va, vb) then return true end
    if type(a.properties) == "table" and type(b.properties) == "table" then
      for name, pa in pairs(a.properties) do
        local pva, pvb = value_set(pa), value_set(b.properties[name])
        if pva and pvb and not meet(pva, pvb) and has(a.required, name) and has(b.required, name) then return true end
      end
    end
    return false
  end
  for i = 1, #alts do
    for j = i + 1, #alts do
      if not disjoint(resolved(alts[i], i), resolved(alts[j], j)) then
        local p = { unpack(path) }
        p[#p + 1] = j - 1
        fail(p, string.format("oneOf alternatives %d and %d may both match (an instance matching two is invalid;"
          .. " anyOf admits it)", i - 1, j - 1))
      end
    end
  end
end

function Conv:deref(ref, path)
  local node = self.root
  for part in ref:sub(2):gmatch("[^/]+") do
    part = part:gsub("~1", "/"):gsub("~0", "~")
    node = type(node) == "table" and node[part] or nil
  end
  if node == nil then fail(path, "$ref '" .. ref .. "' points at nothing") end
  return node
end

-- a schema as a GBNF expression
function Conv:visit(s, path)
  if s == true or (type(s) == "table" and next(s) == nil) then return self:prim("value") end
  if s == false then fail(path, "schema false admits nothing") end
  if type(s) ~= "table" then fail(path, "a schema must be an object or a boolean") end
  for k in pairs(s) do
    if not KNOWN[k] and not ANNOTATIONS[k] then
      local p = { unpack(path) }
      p[#p + 1] = k
      fail(p, "unsupported keyword '" .. tostring(k) .. "'")
    end
  end
  local function at(...)
    local p = { unpack(path) }
    for _, x in ipairs { ... } do p[#p + 1] = x end
    return p
  end
  if s["$ref"] then
    local others = {}
    for k in pairs(s) do if KNOWN[k] and k ~= "$ref" then others[#others + 1] = k end end
    if #others > 0 then fail(at(others[1]), "'" .. others[1] .. "' beside $ref is not supported") end
    return self:resolve(s["$ref"], at("$ref"))
  end
  if s.allOf then return self:visit(self:merge_all(s.allOf, path, s), path) end
  if s.const ~= nil or s.enum ~= nil then
    local values = s.enum or { s.const }
    if s.enum and s.const ~= nil then fail(at("const"), "const beside enum is not supported") end
    local alts = {}
    self:prim("space")
    for _, v in ipairs(values) do alts[#alts + 1] = lit(json.encode_compact(v)) end
    if #alts == 0 then fail(at("enum"), "an empty enum admits nothing") end
    return "(" .. table.concat(alts, " | ") .. ") space"
  end
  local alts = s.anyOf or s.oneOf
  if alts then
    if s.anyOf and s.oneOf then fail(at("oneOf"), "oneOf beside anyOf is not supported") end
    local kw = s.anyOf and "anyOf" or "oneOf"
    if kw == "oneOf" then self:check_disjoint(alts, at("oneOf")) end
    local out = {}
    for i, sub in ipairs(alts) do out[i] = self:sub(sub, at(kw, i - 1), kw .. (i - 1)) end
    return "(" .. table.concat(out, " | ") .. ")"
  end
  local t = s.type
  if type(t) == "table" then
    local out = {}
    for i, ty in ipairs(t) do
      local c = {}
      for k, v in pairs(s) do c[k] = v end
      c.type = ty
      out[i] = self:sub(c, path, "t-" .. ty)
    end
    return "(" .. table.concat(out, " | ") .. ")"
  end
  if t == nil then   -- inferred from the keywords, as llama.cpp does
    if s.properties or s.required or s.additionalProperties ~= nil or s.minProperties or s.maxProperties then
      t = "object"
    elseif s.items ~= nil or s.prefixItems or s.minItems or s.maxItems then t = "array"
    elseif s.minLength or s.maxLength or s.pattern or s.format then t = "string"
    elseif s.minimum or s.maximum or s.exclusiveMinimum or s.exclusiveMaximum then t = "integer"
    else return self:prim("value") end
  end
  -- keywords of another type are no-ops for this one (JSON Schema's rule)
  local NUMERIC = { minimum = true, maximum = true, exclusiveMinimum = true, exclusiveMaximum = true }
  if t == "number" then
    for k in pairs(NUMERIC) do
      if s[k] ~= nil and not (k == "minimum" and s[k] == 0) then
        fail(at(k), "'" .. k .. "' on a number is not supported (use type integer, or minimum 0)")
      end
    end
    if s.minimum == 0 then self:prim("number"); return 'integral-part ("." decimal-part)? ([eE] [-+]? [0-9]{1,3})? space' end
  end
  if t == "object" then
    local ap = s.additionalProperties
    if ap == nil then ap = true end
    local count
    if s.minProperties ~= nil or s.maxProperties ~= nil then
      for _, k in ipairs { "minProperties", "maxProperties" } do
        local v = s[k]
        if v ~= nil and not (is_int(v) and v >= 0) then fail(at(k), k .. " must be an integer >= 0") end
      end
      count = { s.minProperties or 0, s.maxProperties }
      if count[2] and count[1] > count[2] then fail(at("minProperties"), "minProperties is above maxProperties") end
    end
    return self:object_rule(s.properties or {}, s.required or {}, ap, path, count)
  elseif t == "array" then
    local prefix, items = s.prefixItems or {}, s.items
    if type(items) == "table" and #items > 0 and not s.prefixItems then   -- draft 4 tuple
      prefix, items = items, s.additionalItems
    end
    return self:array_rule(prefix, items, path, s)
  elseif t == "string" then return self:string_rule(s, path)
  elseif t == "integer" then return self:integer_rule(s, path)
  elseif t == "number" or t == "boolean" or t == "null" then return self:prim(t)
  end
  fail(at("type"), "unknown type '" .. tostring(t) .. "'")
end
-- }======================================================

--- to_gbnf(schema, opts) -> GBNF text (root rule "root"); schema is a Lua
-- table (json.decode's, to keep property order) or JSON text. Raises
-- "json_schema: ... at /pointer" for what it cannot express.
function M.to_gbnf(schema, opts)
  opts = opts or {}
  if type(schema) == "string" then
    local ok, v = pcall(json.decode, schema)
    if not ok or v == nil then error("json_schema: not valid JSON", 2) end
    schema = v
  end
  local c = setmetatable({ rules = {}, order = {}, refs = {}, root = schema, opts = opts }, Conv)
  local ok, body = pcall(c.visit, c, schema, {})
  if not ok then
    if type(body) == "table" and body.schema_error then error(body.schema_error, 2) end
    error(body, 0)
  end
  local out = { "root ::= " .. body }
  for _, name in ipairs(c.order) do out[#out + 1] = name .. " ::= " .. c.rules[name] end
  return table.concat(out, "\n") .. "\n"
end

return M
