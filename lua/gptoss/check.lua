--- gptoss.check: argument checks for gptoss's Lua functions, with the
-- binding's messages (csrc/lua/binding.c): "fn: name must be ... (got X)",
-- fn the function as the user calls it (model:generate, gptoss.chat), X the
-- value given quoted exactly (a number or string), a typed userdata's type
-- name, or the type.
--
-- Each check returns the value; `level` is error()'s, as if the function
-- that checks had raised (default 2: its caller, the user's line).
local M = {}

local mtype = math.type   -- nil on LuaJIT, whose numbers are all doubles

-- a number in the fewest digits that read back to it, as binding.c's fmt_num
local function num_text(v)
  if mtype and mtype(v) == "integer" then return tostring(v) end
  local s = string.format("%.15g", v)
  if v == v and tonumber(s) ~= v then s = string.format("%.17g", v) end
  return s
end

--- the value as the caller wrote it, for messages
function M.given(v)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return num_text(v) end
  if t == "userdata" then
    local mt = getmetatable(v)
    if type(mt) == "table" and type(mt.__name) == "string" then return mt.__name end
  end
  return t
end

--- raises "fn: name must be what (got X)"
function M.fail(fn, name, what, v, level)
  error(fn .. ": " .. name .. " must be " .. what .. " (got " .. M.given(v) .. ")", (level or 2) + 1)
end

local function is_int(v) return type(v) == "number" and v == math.floor(v) and v - v == 0 end

--- an integer in lo..hi (integral floats pass, as lua_tointegerx takes them)
function M.int(v, fn, name, lo, hi, level)
  if not (is_int(v) and v >= lo and v <= hi) then
    M.fail(fn, name, "an integer in " .. num_text(lo) .. ".." .. num_text(hi), v, (level or 2) + 1)
  end
  return v
end

-- binding.c's range_words: "a finite number >= 0", "a number in (0, 1]"
local function range_words(lo, hi, o)
  local kind = o.whole and "whole number" or "number"
  local finite = (not o.inf and (lo == -math.huge or hi == math.huge)) and "finite " or ""
  if lo > -math.huge and hi < math.huge then
    return "a " .. kind .. " in " .. (o.gt and "(" or "[") .. num_text(lo) .. ", " .. num_text(hi) .. (o.lt and ")" or "]")
  elseif lo > -math.huge then return "a " .. finite .. kind .. (o.gt and " > " or " >= ") .. num_text(lo)
  elseif hi < math.huge then return "a " .. finite .. kind .. (o.lt and " < " or " <= ") .. num_text(hi)
  elseif finite ~= "" then return "a finite " .. kind
  end
  return "a " .. kind .. ", not NaN"
end

--- a number in lo..hi (nil: unbounded on that side, the number still
-- finite); o: { gt = lo excluded, lt = hi excluded, inf = infinities within
-- the bounds pass, whole = integral only }. NaN never passes.
function M.num(v, fn, name, lo, hi, o, level)
  lo, hi, o = lo or -math.huge, hi or math.huge, o or {}
  local ok = type(v) == "number" and (o.gt and v > lo or not o.gt and v >= lo) and (o.lt and v < hi or not o.lt and v <= hi)
    and (o.inf or v - v == 0) and (not o.whole or v == math.floor(v))
  if not ok then M.fail(fn, name, range_words(lo, hi, o), v, (level or 2) + 1) end
  return v
end

local function typed(t, what)
  return function(v, fn, name, level)
    if type(v) ~= t then M.fail(fn, name, what, v, (level or 2) + 1) end
    return v
  end
end
M.str = typed("string", "a string")
M.bool = typed("boolean", "a boolean")
M.func = typed("function", "a function")

--- a table; what says which ("a list of messages"; default "a table")
function M.table(v, fn, name, what, level)
  if type(v) ~= "table" then M.fail(fn, name, what or "a table", v, (level or 2) + 1) end
  return v
end

--- one of the strings in list: "a", "b" or "c"
function M.choice(v, fn, name, list, level)
  for _, s in ipairs(list) do if v == s then return v end end
  local q = {}
  for i, s in ipairs(list) do q[i] = '"' .. s .. '"' end
  local words = #q > 1 and table.concat(q, ", ", 1, #q - 1) .. " or " .. q[#q] or q[1]
  M.fail(fn, name, words, v, (level or 2) + 1)
end

--- a userdata of the binding's type tname (gptoss.Model, gptoss.Adapter, ...)
function M.udata(v, fn, name, tname, level)
  local mt = type(v) == "userdata" and getmetatable(v)
  if not (type(mt) == "table" and mt.__name == tname) then M.fail(fn, name, "a " .. tname, v, (level or 2) + 1) end
  return v
end

--- token ids: a table of integers in int32 range, each named name[i]
function M.ids(v, fn, name, level)
  M.table(v, fn, name, "a table of token ids", (level or 2) + 1)
  for i = 1, #v do M.int(v[i], fn, name .. "[" .. i .. "]", -2147483648, 2147483647, (level or 2) + 1) end
  return v
end

--- an options table: nil (read as {}) or a table whose keys are all in
-- known (a set), else "fn: unknown option 'k'"
function M.options(opts, fn, known, level)
  if opts == nil then return {} end
  M.table(opts, fn, "opts", nil, (level or 2) + 1)
  for k in pairs(opts) do
    if not known[k] then error(fn .. ": unknown option '" .. M.given(k) .. "'", (level or 2) + 1) end
  end
  return opts
end

return M
