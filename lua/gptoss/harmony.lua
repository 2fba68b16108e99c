--- gptoss.harmony: the harmony chat format of gpt-oss, in Lua.
--
-- Rendering follows the canonical renderer (openai/harmony) by default, and
-- the Hugging Face chat template (chat_template.jinja) byte for byte with
-- flavour = "hf". Parsing and streaming parsing follow harmony's
-- StreamableParser, with a lenient mode that recovers what it can from a
-- truncated or malformed completion.
--
-- A conversation:
--   {
--     system = { reasoning = "low", date = "2026-11-22", ... } | false,
--     developer = { instructions = "...", tools = { ... }, response_formats = { ... } },
--     messages = { { role = "user", content = "..." }, ... },
--     mode = "completion" | "conversation" | "training",   -- default completion
--     prefill = { channel = "final" },                      -- opens the assistant turn
--     keep_analysis = false,                                -- harmony's CoT dropping off
--     flavour = "harmony" | "hf",
--   }
-- Messages are harmony-style ({ role, name, channel, recipient, content_type,
-- content }) or OpenAI/Hugging Face-style (assistant { content, thinking,
-- tool_calls }, tool { content }); each flavour accepts both.
--
-- Key order: tool parameters render in JSON property order. Lua tables are
-- unordered, so give parameters either as JSON text (decoded with order
-- kept), as tables from gptoss.json.decode / json.object, or with properties
-- as a list of { name, schema } pairs. Plain tables render in sorted order.
local lpeg = require "lpeg"
local core = require "gptoss.core"
local json = require "gptoss.json"
local check = require "gptoss.check"

local P, S, C, Ct, Cs = lpeg.P, lpeg.S, lpeg.C, lpeg.Ct, lpeg.Cs

local M = {}

M.DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
M.DEFAULT_CUTOFF = "2024-06"
M.CHANNELS = { "analysis", "commentary", "final" }
M.ROLES = { system = true, developer = true, user = true, assistant = true, tool = true }
--- harmony's stop tokens for parsing, and for sampling an assistant action
M.STOP = { ["<|end|>"] = true, ["<|return|>"] = true, ["<|call|>"] = true }
M.STOP_SAMPLING = { "<|return|>", "<|call|>" }

local CONSTRAIN = "<|constrain|>"

-- {====================================================== built-in tools
M.BROWSER = {
  name = "browser",
  description = "Tool for browsing.\nThe `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n" ..
    "Cite information from the tool using the following format:\n" ..
    "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n" ..
    "Do not quote more than 10 words directly from the tool output.\nsources=web (default: web)",
  tools = {
    { name = "search", description = "Searches for information related to `query` and displays `topn` results.",
      parameters = assert(json.decode('{"type":"object","properties":{"query":{"type":"string"},' ..
        '"topn":{"type":"number","default":10},"source":{"type":"string"}},"required":["query"]}')) },
    { name = "open", description = "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.\n" ..
        "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n" ..
        "If `cursor` is not provided, the most recent page is implied.\n" ..
        "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n" ..
        "If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.\n" ..
        "Use this function without `id` to scroll to a new location of an opened page.",
      parameters = assert(json.decode('{"type":"object","properties":{"id":{"type":["number","string"],"default":-1},' ..
        '"cursor":{"type":"number","default":-1},"loc":{"type":"number","default":-1},' ..
        '"num_lines":{"type":"number","default":-1},"view_source":{"type":"boolean","default":false},' ..
        '"source":{"type":"string"}}}')) },
    { name = "find", description = "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
      parameters = assert(json.decode('{"type":"object","properties":{"pattern":{"type":"string"},' ..
        '"cursor":{"type":"number","default":-1}},"required":["pattern"]}')) },
  },
}
M.PYTHON = {
  name = "python",
  description = "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. " ..
    "This tool should be used for internal reasoning, but not for code that is intended to be visible to the user " ..
    "(e.g. when creating plots, tables, or files).\n\nWhen you send a message containing Python code to python, it will be " ..
    "executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time out " ..
    "after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this " ..
    "session is UNKNOWN. Depends on the cluster.",
  tools = {},
}
-- }======================================================

-- {====================================================== small helpers
local function fail(msg, level) error("harmony: " .. msg, (level or 1) + 1) end

local function check_keys(t, known, what)
  for k in pairs(t) do
    if not known[k] then fail(what .. ": unknown field '" .. tostring(k) .. "'", 3) end
  end
end

-- Rust's str::lines(): split on \n, drop a \r before it, no trailing empty line
local function lines(s)
  local out = {}
  for line in (s .. "\n"):gmatch("(.-)\n") do out[#out + 1] = line:gsub("\r$", "") end
  if s:sub(-1) == "\n" then out[#out] = nil end
  if s == "" then out = {} end
  return out
end

local function get(t, k)
  if type(t) ~= "table" then return nil end
  local v = t[k]
  if v == json.null then return nil end
  return v
end

local function is_list(t)
  if type(t) ~= "table" then return false end
  local mt = getmetatable(t)
  if mt and mt.__jsontype == "array" then return true end
  if mt and mt.__jsontype == "object" then return false end
  return #t > 0 or next(t) == nil
end

--- properties of a schema in order: decoded JSON keeps its order; a list of
-- { name, schema } pairs is taken in list order; plain tables sort by name
local function properties(schema)
  local props = get(schema, "properties")
  if type(props) ~= "table" then return {} end
  local out = {}
  if #props > 0 and type(props[1]) == "table" and type(props[1][1]) == "string" then
    for _, pair in ipairs(props) do out[#out + 1] = { pair[1], pair[2] } end
  else
    for _, k in ipairs(json.keys(props)) do out[#out + 1] = { k, props[k] } end
  end
  return out
end

local function as_schema(p)
  if type(p) == "string" then
    local v, err = json.decode(p)
    if v == nil then fail("tool parameters are not valid JSON: " .. err, 3) end
    return v
  end
  return p
end
-- }======================================================

-- {====================================================== JSON schema to TypeScript (harmony)
local function is_enum(s)
  local e = get(s, "enum")
  return type(e) == "table" and #e > 0
end

-- serde_json's Display of a default value
local function default_text(d, schema)
  if type(d) == "string" then
    if is_enum(schema) then return "default: " .. d end
    return 'default: "' .. d .. '"'
  end
  return "default: " .. json.encode_compact(d)
end

local function nullable(s) return get(s, "nullable") == true end

local ts
ts = function(schema, indent)
  local one_of = get(schema, "oneOf")
  if type(one_of) == "table" then
    local out = {}
    for i, variant in ipairs(one_of) do
      out[#out + 1] = "\n" .. indent .. " | "
      local t = ts(variant, indent .. "   ")
      if nullable(variant) and not t:find("null", 1, true) then t = t .. " | null" end
      out[#out + 1] = t
      local trailing = {}
      if type(get(variant, "description")) == "string" then trailing[#trailing + 1] = variant.description end
      if get(variant, "default") ~= nil then trailing[#trailing + 1] = default_text(variant.default, variant) end
      if #trailing > 0 then out[#out + 1] = " // " .. table.concat(trailing, " ") end
    end
    return table.concat(out)
  end
  local ty = get(schema, "type")
  if type(ty) == "table" then
    local names = {}
    for _, t in ipairs(ty) do
      if type(t) == "string" then names[#names + 1] = t == "integer" and "number" or t end
    end
    if #names > 0 then return table.concat(names, " | ") end
  end
  if type(ty) ~= "string" then return "any" end
  if ty == "object" then
    local out = {}
    if type(get(schema, "description")) == "string" then out[#out + 1] = indent .. "// " .. schema.description .. "\n" end
    out[#out + 1] = "{\n"
    local required = {}
    for _, r in ipairs(get(schema, "required") or {}) do required[r] = true end
    for _, kv in ipairs(properties(schema)) do
      local key, val = kv[1], kv[2]
      if type(get(val, "title")) == "string" then out[#out + 1] = indent .. "// " .. val.title .. "\n" .. indent .. "//\n" end
      local val_one_of = get(val, "oneOf")
      if val_one_of == nil and type(get(val, "description")) == "string" then
        out[#out + 1] = indent .. "// " .. val.description .. "\n"
      end
      local ex = get(val, "examples")
      if type(ex) == "table" and #ex > 0 then
        out[#out + 1] = indent .. "// Examples:\n"
        for _, e in ipairs(ex) do
          if type(e) == "string" then out[#out + 1] = indent .. '// - "' .. e .. '"\n' end
        end
      end
      local opt = required[key] and "" or "?"
      if type(val_one_of) == "table" then
        local pdesc = type(get(val, "description")) == "string" and val.description or nil
        local first_desc = val_one_of[1] and get(val_one_of[1], "description")
        local above = false
        if pdesc and pdesc ~= first_desc then
          out[#out + 1] = indent .. "// " .. pdesc .. "\n"
          above = true
        end
        if get(val, "default") ~= nil then out[#out + 1] = indent .. "// " .. default_text(val.default, val) .. "\n" end
        out[#out + 1] = indent .. key .. opt .. ":\n"
        for i, variant in ipairs(val_one_of) do
          out[#out + 1] = indent .. " | "
          local t = ts(variant, indent .. "   ")
          if nullable(variant) and not t:find("null", 1, true) then t = t .. " | null" end
          out[#out + 1] = t
          local trailing = {}
          local vdesc = get(variant, "description")
          if not (i == 1 and above) and type(vdesc) == "string" and vdesc ~= pdesc then trailing[#trailing + 1] = vdesc end
          if get(variant, "default") ~= nil then trailing[#trailing + 1] = default_text(variant.default, variant) end
          if #trailing > 0 then out[#out + 1] = " // " .. table.concat(trailing, " ") end
          out[#out + 1] = "\n"
        end
        out[#out + 1] = indent .. ",\n"
      else
        out[#out + 1] = indent .. key .. opt .. ": "
        local t = ts(val, indent .. "    ")
        if nullable(val) and not t:find("null", 1, true) then t = t .. " | null" end
        out[#out + 1] = t .. ","
        if get(val, "default") ~= nil then out[#out + 1] = " // " .. default_text(val.default, val) end
        out[#out + 1] = "\n"
      end
    end
    out[#out + 1] = indent .. "}"
    return table.concat(out)
  elseif ty == "string" then
    local e = get(schema, "enum")
    if type(e) == "table" then
      local vals = {}
      for _, v in ipairs(e) do if type(v) == "string" then vals[#vals + 1] = '"' .. v .. '"' end end
      if #vals > 0 then return table.concat(vals, " | ") end
    end
    return "string"
  elseif ty == "number" or ty == "integer" then return "number"
  elseif ty == "boolean" then return "boolean"
  elseif ty == "array" then
    local items = get(schema, "items")
    if items ~= nil then return ts(items, indent) .. "[]" end
    return "Array<any>"
  end
  return "any"
end
M.schema_to_typescript = function(schema)
  if type(schema) ~= "table" and type(schema) ~= "string" then
    check.fail("harmony: schema_to_typescript", "schema", "a table or JSON text", schema)
  end
  return ts(as_schema(schema), "")
end
-- }======================================================

-- {====================================================== system and developer text (harmony)
-- a namespace: { name, description, tools = { { name, description, parameters }, ... } }
local function tools_section(namespaces)
  local sections = { "# Tools" }
  for _, ns in ipairs(namespaces) do
    local c = { "## " .. ns.name .. "\n" }
    local has_tools = ns.tools and #ns.tools > 0
    if ns.description then
      for _, line in ipairs(lines(ns.description)) do c[#c + 1] = has_tools and ("// " .. line) or line end
    end
    if has_tools then
      c[#c + 1] = "namespace " .. ns.name .. " {\n"
      for _, tool in ipairs(ns.tools) do
        for _, line in ipairs(lines(tool.description or "")) do c[#c + 1] = "// " .. line end
        if tool.parameters ~= nil then
          c[#c + 1] = "type " .. tool.name .. " = (_: " .. ts(tool.parameters, "") .. ") => any;\n"
        else
          c[#c + 1] = "type " .. tool.name .. " = () => any;\n"
        end
      end
      c[#c + 1] = "} // namespace " .. ns.name
    end
    sections[#sections + 1] = table.concat(c, "\n")
  end
  return table.concat(sections, "\n\n")
end

local function tool_entry(t, i)
  if type(t) ~= "table" then fail("tool " .. i .. " must be a table", 4) end
  local fn = t["function"] or t
  if type(fn.name) ~= "string" or fn.name == "" then fail("tool " .. i .. " needs a name", 4) end
  local params = fn.parameters
  if params == json.null then params = nil end
  local desc = fn.description
  if desc == json.null then desc = nil end
  return { name = fn.name, description = desc, parameters = as_schema(params) }
end

--- function tools as a list (order kept) or a map of name -> { description,
-- parameters } (sorted by name)
local function function_tools(tools)
  if tools == nil or tools == json.null then return {} end
  if type(tools) ~= "table" then fail("tools must be a list or a map", 3) end
  local out = {}
  if is_list(tools) then
    for i, t in ipairs(tools) do out[i] = tool_entry(t, i) end
  else
    local names = {}
    for k in pairs(tools) do names[#names + 1] = k end
    table.sort(names)
    for i, k in ipairs(names) do
      local t = tools[k]
      out[i] = tool_entry({ name = k, description = t.description, parameters = t.parameters }, k)
    end
  end
  return out
end

M.function_tools = function_tools

-- system tools: names ("browser", "python") or namespace tables, rendered in
-- name order as harmony keeps them in a BTreeMap
local function builtin_namespaces(tools)
  if tools == nil or tools == json.null then return {} end
  local list = {}
  local function add(ns)
    if type(ns) == "string" then
      if ns == "browser" then ns = M.BROWSER elseif ns == "python" then ns = M.PYTHON
      else fail("unknown built-in tool '" .. ns .. "' (browser, python, or a namespace table)", 4) end
    end
    local tl = {}
    for i, t in ipairs(ns.tools or {}) do tl[i] = tool_entry(t, i) end
    list[#list + 1] = { name = ns.name, description = ns.description, tools = tl }
  end
  if is_list(tools) then for _, ns in ipairs(tools) do add(ns) end
  else
    for name, ns in pairs(tools) do
      if type(ns) == "table" and ns.name == nil then ns = { name = name, description = ns.description, tools = ns.tools } end
      add(ns)
    end
  end
  table.sort(list, function(a, b) return a.name < b.name end)
  return list
end

local SYSTEM_KEYS = { identity = true, model_identity = true, knowledge_cutoff = true, cutoff = true,
  date = true, conversation_start_date = true, reasoning = true, reasoning_effort = true, channels = true,
  required_channels = true, channel_required = true, tools = true, builtin_tools = true }

-- A system content table normalised: nil fields stay nil where harmony's
-- default has them; `false` drops a default.
local function system_fields(sys)
  check_keys(sys, SYSTEM_KEYS, "system")
  local function pick(a, b, dflt)
    local v = sys[a]
    if v == nil then v = sys[b] end
    if v == nil then return dflt end
    if v == false or v == json.null then return nil end
    return v
  end
  local f = {
    identity = pick("identity", "model_identity", M.DEFAULT_IDENTITY),
    cutoff = pick("knowledge_cutoff", "cutoff", M.DEFAULT_CUTOFF),
    date = pick("date", "conversation_start_date", nil),
    reasoning = pick("reasoning", "reasoning_effort", "medium"),
    channels = pick("channels", "required_channels", M.CHANNELS),
    tools = pick("tools", "builtin_tools", nil),
  }
  f.channel_required = sys.channel_required ~= false
  if f.reasoning and not ({ low = true, medium = true, high = true })[f.reasoning] then
    fail("reasoning must be low, medium or high (got '" .. tostring(f.reasoning) .. "')", 3)
  end
  return f
end

local function system_text(sys, has_functions)
  local f = system_fields(sys)
  local sections = {}
  local top = {}
  if f.identity then top[#top + 1] = f.identity end
  if f.cutoff then top[#top + 1] = "Knowledge cutoff: " .. f.cutoff end
  if f.date then top[#top + 1] = "Current date: " .. f.date end
  if #top > 0 then sections[#sections + 1] = table.concat(top, "\n") end
  if f.reasoning then sections[#sections + 1] = "Reasoning: " .. f.reasoning end
  local ns = builtin_namespaces(f.tools)
  if #ns > 0 then sections[#sections + 1] = tools_section(ns) end
  if f.channels and #f.channels > 0 then
    local h = "# Valid channels: " .. table.concat(f.channels, ", ") .. "."
    if f.channel_required then h = h .. " Channel must be included for every message." end
    if has_functions then h = h .. "\nCalls to these tools must go to the commentary channel: 'functions'." end
    sections[#sections + 1] = h
  end
  return table.concat(sections, "\n\n")
end

local DEVELOPER_KEYS = { instructions = true, tools = true, function_tools = true, response_formats = true }

local function developer_text(dev)
  check_keys(dev, DEVELOPER_KEYS, "developer")
  local sections = {}
  local instr = get(dev, "instructions")
  if instr ~= nil then
    sections[#sections + 1] = "# Instructions"
    sections[#sections + 1] = instr
  end
  local fns = function_tools(get(dev, "tools") or get(dev, "function_tools"))
  if #fns > 0 then sections[#sections + 1] = tools_section { { name = "functions", tools = fns } } end
  local formats = get(dev, "response_formats")
  if formats and #formats > 0 then
    local parts = { "# Response Formats" }
    for _, rf in ipairs(formats) do
      local body = "## " .. rf.name .. "\n\n"
      if rf.description then body = body .. "// " .. rf.description .. "\n" end
      local schema = as_schema(rf.schema)
      body = body .. (type(schema) == "string" and schema or json.encode_compact(schema))
      parts[#parts + 1] = body
    end
    sections[#sections + 1] = table.concat(parts, "\n\n")
  end
  return table.concat(sections, "\n\n")
end

local function developer_has_functions(dev)
  if type(dev) ~= "table" then return false end
  local t = get(dev, "tools") or get(dev, "function_tools")
  return type(t) == "table" and next(t) ~= nil
end
-- }======================================================

-- {====================================================== conversations
-- A piece list: strings are text, { special = "<|...|>" } are control tokens.
local function sp(name) return { special = name } end

-- messages of OpenAI/Hugging Face shape become harmony messages
local function to_harmony(messages)
  local out, last_call = {}, nil
  for i, m in ipairs(messages) do
    if type(m) ~= "table" then fail("message " .. i .. " must be a table", 4) end
    if not M.ROLES[m.role] then fail("message " .. i .. " has unknown role '" .. tostring(m.role) .. "'", 4) end
    local hf_style = m.role == "assistant" and (m.thinking ~= nil or m.tool_calls ~= nil) and m.channel == nil
    if hf_style then
      if m.thinking ~= nil and m.thinking ~= "" then
        out[#out + 1] = { role = "assistant", channel = "analysis", content = m.thinking }
      end
      if m.tool_calls and #m.tool_calls > 0 then
        if m.content and m.content ~= "" and (m.thinking == nil or m.thinking == "") then
          out[#out + 1] = { role = "assistant", channel = "analysis", content = m.content }
        end
        for _, tc in ipairs(m.tool_calls) do
          local fn = tc["function"] or tc
          local args = fn.arguments
          if type(args) ~= "string" then args = json.encode_compact(args == nil and json.object {} or args) end
          out[#out + 1] = { role = "assistant", channel = "commentary", recipient = "functions." .. fn.name,
                            content_type = CONSTRAIN .. "json", content = args }
          last_call = fn.name
        end
      elseif m.content ~= nil then
        out[#out + 1] = { role = "assistant", channel = "final", content = m.content }
      end
    elseif m.role == "tool" and m.name == nil and m.channel == nil then
      if not last_call then fail("message " .. i .. ": a tool message with no preceding tool call", 4) end
      out[#out + 1] = { role = "tool", name = "functions." .. last_call, recipient = "assistant", channel = "commentary",
                        content = m.content }
    elseif m.role == "assistant" and m.channel == nil and m.recipient == nil then
      out[#out + 1] = { role = "assistant", channel = "final", content = m.content, name = m.name, content_type = m.content_type }
    else
      if m.role == "assistant" and m.recipient and m.recipient:match("^functions%.") then last_call = m.recipient:sub(11) end
      out[#out + 1] = m
    end
  end
  return out
end

local MESSAGE_KEYS = { role = true, name = true, channel = true, recipient = true, content_type = true, content = true,
  thinking = true, tool_calls = true, tool_call_id = true }

local function render_message(m, pieces, has_functions, index)
  check_keys(m, MESSAGE_KEYS, "message")
  pieces[#pieces + 1] = { message = index }   -- where errors are reported
  pieces[#pieces + 1] = sp("<|start|>")
  if m.role == "tool" then
    if type(m.name) ~= "string" then fail("a tool message needs the tool's name (name = \"functions.x\")", 4) end
    pieces[#pieces + 1] = m.name
  else
    pieces[#pieces + 1] = m.role
    if m.name then pieces[#pieces + 1] = ":" .. m.name end
  end
  if m.recipient and m.recipient ~= "all" then pieces[#pieces + 1] = " to=" .. m.recipient end
  if m.channel then
    pieces[#pieces + 1] = sp("<|channel|>")
    pieces[#pieces + 1] = m.channel
  end
  if m.content_type then
    if m.content_type:sub(1, #CONSTRAIN) == CONSTRAIN then
      pieces[#pieces + 1] = " "
      pieces[#pieces + 1] = sp(CONSTRAIN)
      local rest = m.content_type:sub(#CONSTRAIN + 1)
      if rest ~= "" then pieces[#pieces + 1] = rest end
    else
      pieces[#pieces + 1] = " " .. m.content_type
    end
  end
  pieces[#pieces + 1] = sp("<|message|>")
  local c = m.content
  if m.role == "system" and type(c) == "table" then c = system_text(c, has_functions)
  elseif m.role == "developer" and type(c) == "table" then c = developer_text(c)
  elseif c == nil then c = ""
  elseif type(c) ~= "string" then fail("message content must be a string", 4) end
  pieces[#pieces + 1] = c
  if m.role == "assistant" and m.recipient then pieces[#pieces + 1] = sp("<|call|>")
  else pieces[#pieces + 1] = sp("<|end|>") end
end

local CONV_KEYS = { system = true, developer = true, messages = true, mode = true, next_role = true, prefill = true,
  keep_analysis = true, flavour = true, tokenizer = true }

local function harmony_pieces(conv)
  local msgs = {}
  if conv.system ~= false then
    local has_sys = false
    for _, m in ipairs(conv.messages or {}) do has_sys = has_sys or m.role == "system" end
    if conv.system ~= nil or not has_sys then msgs[#msgs + 1] = { role = "system", content = conv.system or {} } end
  end
  if conv.developer ~= nil then msgs[#msgs + 1] = { role = "developer", content = conv.developer } end
  for _, m in ipairs(to_harmony(conv.messages or {})) do msgs[#msgs + 1] = m end
  local has_functions = false
  for _, m in ipairs(msgs) do
    if m.role == "developer" and developer_has_functions(m.content) then has_functions = true end
  end
  local mode = conv.mode or "completion"
  local keep = conv.keep_analysis
  if keep == nil then keep = mode == "training" end
  local last_final = false
  for i = #msgs, 1, -1 do
    if msgs[i].role == "assistant" then last_final = msgs[i].channel == "final"; break end
  end
  local first_final
  for i, m in ipairs(msgs) do if m.channel == "final" then first_final = i; break end end
  local drop = not keep and last_final
  local pieces = {}
  for i, m in ipairs(msgs) do
    if not (drop and first_final and i < first_final and m.channel == "analysis") then
      render_message(m, pieces, has_functions, i)
    end
  end
  if mode == "training" then
    local last = msgs[#msgs]
    if last and last.role == "assistant" and last.channel == "final" then pieces[#pieces] = sp("<|return|>") end
  elseif mode == "completion" then
    pieces[#pieces + 1] = sp("<|start|>")
    pieces[#pieces + 1] = conv.next_role or "assistant"
    local pf = conv.prefill
    if pf then
      if pf.recipient then pieces[#pieces + 1] = " to=" .. pf.recipient end
      if pf.channel then pieces[#pieces + 1] = sp("<|channel|>"); pieces[#pieces + 1] = pf.channel end
      if pf.content_type then
        if pf.content_type:sub(1, #CONSTRAIN) == CONSTRAIN then
          pieces[#pieces + 1] = " "
          pieces[#pieces + 1] = sp(CONSTRAIN)
          if #pf.content_type > #CONSTRAIN then pieces[#pieces + 1] = pf.content_type:sub(#CONSTRAIN + 1) end
        else
          pieces[#pieces + 1] = " " .. pf.content_type
        end
      end
      pieces[#pieces + 1] = sp("<|message|>")
      if pf.content then pieces[#pieces + 1] = pf.content end
    end
  elseif mode ~= "conversation" then
    fail("mode must be completion, conversation or training (got '" .. tostring(mode) .. "')", 3)
  end
  return pieces
end
-- }======================================================

-- {====================================================== the Hugging Face template
-- A port of chat_template.jinja, rendered as Jinja2 with trim_blocks and
-- lstrip_blocks does (transformers' settings): the newline-and-spaces runs
-- below are what those settings leave of the template's own indentation
-- before a {{ ... }} that does not strip whitespace.
local HF_PAD = "\n" .. (" "):rep(16)        -- before a nested property's type
local HF_DEFAULT_PAD = (" "):rep(20)         -- before a oneOf variant's default

local function pyjson(v) return json.encode_python(v) end

local hf_type
hf_type = function(spec)
  local ty = get(spec, "type")
  if ty == "array" then
    local out
    local items = get(spec, "items")
    if items then
      local it = get(items, "type")
      if it == "string" then out = "string[]"
      elseif it == "number" or it == "integer" then out = "number[]"
      elseif it == "boolean" then out = "boolean[]"
      else
        local inner = hf_type(items)
        if inner == "object | object" or #inner > 50 then out = "any[]" else out = inner .. "[]" end
      end
    else
      out = "any[]"
    end
    if get(spec, "nullable") then out = out .. " | null" end
    return out
  elseif type(ty) == "table" and ty[1] ~= nil then
    if #ty > 1 then return table.concat(ty, " | ") end
    return ty[1]
  elseif get(spec, "oneOf") then
    -- the template's has_object_variants is set inside a for loop, where a
    -- Jinja assignment does not reach the outer scope: it is always false
    local out = {}
    local variants = spec.oneOf
    for i, variant in ipairs(variants) do
      out[#out + 1] = hf_type(variant)
      if get(variant, "description") then out[#out + 1] = "// " .. variant.description end
      if get(variant, "default") ~= nil then out[#out + 1] = HF_DEFAULT_PAD .. "// default: " .. pyjson(variant.default) end
      if i < #variants then out[#out + 1] = " | \n" end
    end
    return table.concat(out)
  elseif ty == "string" then
    local e = get(spec, "enum")
    if e and #e > 0 then return '"' .. table.concat(e, '" | "') .. '"' end
    if get(spec, "nullable") then return "string | null" end
    return "string"
  elseif ty == "number" or ty == "integer" then return "number"
  elseif ty == "boolean" then return "boolean"
  elseif ty == "object" then
    local props = properties(spec)
    if #props == 0 then return "object" end
    local required = {}
    for _, r in ipairs(get(spec, "required") or {}) do required[r] = true end
    local out = { "{\n" }
    for i, kv in ipairs(props) do
      out[#out + 1] = kv[1] .. (required[kv[1]] and "" or "?") .. ": " .. HF_PAD .. hf_type(kv[2])
      if i < #props then out[#out + 1] = ", " end
    end
    out[#out + 1] = "}"
    return table.concat(out)
  end
  return "any"
end

local function hf_tool_namespace(tools)
  local out = { "## functions\n\nnamespace functions {\n\n" }
  for _, tool in ipairs(tools) do
    if type(tool.description) ~= "string" then fail("the hf template needs a description for tool '" .. tool.name .. "'", 4) end
    out[#out + 1] = "// " .. tool.description .. "\n"
    out[#out + 1] = "type " .. tool.name .. " = "
    local params = tool.parameters
    local props = params and properties(params) or {}
    if #props > 0 then
      out[#out + 1] = "(_: {\n"
      local required = {}
      for _, r in ipairs(get(params, "required") or {}) do required[r] = true end
      for _, kv in ipairs(props) do
        local name, spec = kv[1], kv[2]
        if get(spec, "description") then out[#out + 1] = "// " .. spec.description .. "\n" end
        out[#out + 1] = name .. (required[name] and "" or "?") .. ": " .. hf_type(spec)
        local d = get(spec, "default")
        if d ~= nil then
          if get(spec, "enum") then
            if type(d) ~= "string" then fail("the hf template adds an enum default as a string", 4) end
            out[#out + 1] = ", // default: " .. d
          elseif get(spec, "oneOf") then
            if type(d) ~= "string" then d = pyjson(d) end
            out[#out + 1] = "// default: " .. d
          else
            out[#out + 1] = ", // default: " .. pyjson(d)
          end
        end
        out[#out + 1] = ",\n"
      end
      out[#out + 1] = "}) => any;\n\n"
    else
      out[#out + 1] = "() => any;\n\n"
    end
  end
  out[#out + 1] = "} // namespace functions"
  return table.concat(out)
end

-- harmony-style messages become the OpenAI shape the template reads
local function to_hf(messages)
  local out = {}
  local pending_thinking
  for i, m in ipairs(messages) do
    if m.role == "assistant" and m.channel ~= nil then
      if m.channel == "analysis" and not m.recipient then
        pending_thinking = (pending_thinking and pending_thinking .. "\n" or "") .. (m.content or "")
      elseif m.recipient then
        local args = m.content
        if type(args) == "string" then args = json.decode(args) or args end
        local name = m.recipient:gsub("^functions%.", "")
        local prev = out[#out]
        if prev and prev.role == "assistant" and prev.tool_calls and not pending_thinking then
          prev.tool_calls[#prev.tool_calls + 1] = { ["function"] = { name = name, arguments = args } }
        else
          out[#out + 1] = { role = "assistant", thinking = pending_thinking,
                            tool_calls = { { ["function"] = { name = name, arguments = args } } } }
        end
        pending_thinking = nil
      else
        out[#out + 1] = { role = "assistant", thinking = pending_thinking, content = m.content }
        pending_thinking = nil
      end
    elseif m.role == "tool" and m.name then
      out[#out + 1] = { role = "tool", content = m.content }
    else
      if type(m) ~= "table" or not M.ROLES[m.role] then fail("message " .. i .. " has unknown role '" .. tostring(m and m.role) .. "'", 4) end
      out[#out + 1] = m
    end
  end
  if pending_thinking then out[#out + 1] = { role = "assistant", thinking = pending_thinking, content = "" } end
  return out
end

local function hf_text(conv)
  local sys = conv.system ~= false and system_fields(conv.system or {}) or system_fields {}
  local messages = to_hf(conv.messages or {})
  local dev = conv.developer
  local tools = {}
  if dev ~= nil then
    check_keys(dev, DEVELOPER_KEYS, "developer")
    tools = function_tools(get(dev, "tools") or get(dev, "function_tools"))
  end
  local developer_message = ""
  local loop = messages
  if dev and get(dev, "instructions") then developer_message = dev.instructions
  elseif messages[1] and (messages[1].role == "developer" or messages[1].role == "system") then
    developer_message = messages[1].content
    loop = {}
    for i = 2, #messages do loop[#loop + 1] = messages[i] end
  end
  local add_generation_prompt = (conv.mode or "completion") == "completion"
  local out = { "<|start|>system<|message|>" }
  out[#out + 1] = (sys.identity or M.DEFAULT_IDENTITY) .. "\n"
  out[#out + 1] = "Knowledge cutoff: 2024-06\n"
  out[#out + 1] = "Current date: " .. (sys.date or os.date("%Y-%m-%d")) .. "\n\n"
  out[#out + 1] = "Reasoning: " .. (sys.reasoning or "medium") .. "\n\n"
  local builtin = sys.tools
  if builtin and #builtin > 0 then
    out[#out + 1] = "# Tools\n\n"
    local has = {}
    for _, t in ipairs(builtin) do has[type(t) == "table" and t.name or t] = true end
    if has.browser then
      local ns = tools_section { M.BROWSER }:gsub("^# Tools\n\n", "")
      out[#out + 1] = ns .. "\n\n"
    end
    if has.python then out[#out + 1] = "## python\n\n" .. M.PYTHON.description .. "\n\n" end
  end
  out[#out + 1] = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
  if #tools > 0 then out[#out + 1] = "\nCalls to these tools must go to the commentary channel: 'functions'." end
  out[#out + 1] = "<|end|>"
  if developer_message ~= "" or #tools > 0 then
    out[#out + 1] = "<|start|>developer<|message|>"
    if developer_message ~= "" then out[#out + 1] = "# Instructions\n\n" .. developer_message .. "\n\n" end
    if #tools > 0 then out[#out + 1] = "# Tools\n\n" .. hf_tool_namespace(tools) end
    out[#out + 1] = "<|end|>"
  end
  local last_call
  for i, m in ipairs(loop) do
    if m.role == "assistant" then
      for _, f in ipairs { "content", "thinking" } do
        local v = m[f]
        if type(v) == "string" and (v:find("<|channel|>analysis<|message|>", 1, true) or v:find("<|channel|>final<|message|>", 1, true)) then
          fail("message " .. i .. ": pass analysis in 'thinking' and the answer in 'content', not channel markup in '" .. f .. "'", 3)
        end
      end
      if m.tool_calls then
        local future_final = false
        for j = i + 1, #loop do
          if loop[j].role == "assistant" and loop[j].tool_calls == nil then future_final = true end
        end
        local tc = m.tool_calls[1]
        tc = tc["function"] or tc
        local content, thinking = m.content, m.thinking
        if content and content ~= "" and thinking and thinking ~= "" then
          fail("message " .. i .. ": an assistant message with tool calls cannot have both content and thinking", 3)
        elseif content and content ~= "" and not future_final then
          out[#out + 1] = "<|start|>assistant<|channel|>analysis<|message|>" .. content .. "<|end|>"
        elseif thinking and thinking ~= "" and not future_final then
          out[#out + 1] = "<|start|>assistant<|channel|>analysis<|message|>" .. thinking .. "<|end|>"
        end
        out[#out + 1] = "<|start|>assistant to=functions." .. tc.name .. "<|channel|>commentary " ..
          (tc.content_type or "json") .. "<|message|>" .. pyjson(tc.arguments) .. "<|call|>"
        last_call = tc.name
      elseif i == #loop and not add_generation_prompt then
        if m.thinking ~= nil then
          out[#out + 1] = "<|start|>assistant<|channel|>analysis<|message|>" .. m.thinking .. "<|end|>"
        end
        out[#out + 1] = "<|start|>assistant<|channel|>final<|message|>" .. (m.content or "") .. "<|return|>"
      else
        out[#out + 1] = "<|start|>assistant<|channel|>final<|message|>" .. (m.content or "") .. "<|end|>"
        last_call = nil
      end
    elseif m.role == "tool" then
      if not last_call then fail("message " .. i .. ": a tool message with no preceding assistant tool call", 3) end
      out[#out + 1] = "<|start|>functions." .. last_call .. " to=assistant<|channel|>commentary<|message|>" ..
        pyjson(m.content) .. "<|end|>"
    elseif m.role == "user" then
      out[#out + 1] = "<|start|>user<|message|>" .. (m.content or "") .. "<|end|>"
    end
  end
  if add_generation_prompt then
    out[#out + 1] = "<|start|>assistant"
    local pf = conv.prefill
    if pf then
      if pf.channel then out[#out + 1] = "<|channel|>" .. pf.channel end
      out[#out + 1] = "<|message|>" .. (pf.content or "")
    end
  end
  return table.concat(out)
end
-- }======================================================

-- {====================================================== render API
-- each field's type, checked before rendering so that a wrong one is named
-- rather than met as "attempt to index a number value" deep inside; raised
-- without a position, which check_conv's callers add (the user's line)
local function bad(what, v, types)
  error("harmony: render: " .. what .. " must be " .. types .. " (got " .. check.given(v) .. ")", 0)
end

local function want(v, types, what)
  if v == nil or v == json.null then return end
  local t = type(v)
  for ty in types:gmatch("%a+") do if t == ty then return end end
  bad(what, v, "a " .. types:gsub(",", " or a "))
end

-- a table's entries as (key, value, "at[key]"), a list's in order
local function entries(t, at)
  local out = {}
  if is_list(t) then
    for i, v in ipairs(t) do out[#out + 1] = { i, v, at .. "[" .. i .. "]" } end
  else
    for k, v in pairs(t) do out[#out + 1] = { k, v, at .. "[" .. check.given(k) .. "]" } end
  end
  return out
end

local function check_tool(t, at)
  want(t, "table", at)
  local fn = t["function"] or t
  want(fn, "table", at .. ".function")
  want(fn.name, "string", at .. ".name")
  want(fn.description, "string", at .. ".description")
  want(fn.parameters, "table,string", at .. ".parameters")
end

-- a system message's content table (harmony's SystemContent)
local function check_system(sys, at)
  for _, k in ipairs { "identity", "model_identity", "knowledge_cutoff", "cutoff", "date", "conversation_start_date",
                       "reasoning", "reasoning_effort" } do
    want(sys[k], "string,boolean", at .. "." .. k)
  end
  for _, k in ipairs { "channels", "required_channels" } do
    want(sys[k], "table,boolean", at .. "." .. k)
    if type(sys[k]) == "table" then
      for _, e in ipairs(entries(sys[k], at .. "." .. k)) do want(e[2], "string", e[3]) end
    end
  end
  want(sys.channel_required, "boolean", at .. ".channel_required")
  for _, k in ipairs { "tools", "builtin_tools" } do
    want(sys[k], "table,boolean", at .. "." .. k)
    if type(sys[k]) == "table" then
      for _, e in ipairs(entries(sys[k], at .. "." .. k)) do
        local ns = e[2]
        want(ns, "string,table", e[3])
        if type(ns) == "table" then
          want(ns.name, "string", e[3] .. ".name")
          want(ns.description, "string", e[3] .. ".description")
          want(ns.tools, "table", e[3] .. ".tools")
          for j, t in ipairs(type(ns.tools) == "table" and ns.tools or {}) do check_tool(t, e[3] .. ".tools[" .. j .. "]") end
        end
      end
    end
  end
end

-- a developer message's content table (harmony's DeveloperContent)
local function check_developer(dev, at)
  want(dev.instructions, "string", at .. ".instructions")
  for _, k in ipairs { "tools", "function_tools" } do
    want(dev[k], "table", at .. "." .. k)
    if type(dev[k]) == "table" then
      for _, e in ipairs(entries(dev[k], at .. "." .. k)) do
        -- a map's values hold { description, parameters } under the tool's name
        if is_list(dev[k]) then check_tool(e[2], e[3])
        else
          want(e[2], "table", e[3])
          want(e[2].description, "string", e[3] .. ".description")
          want(e[2].parameters, "table,string", e[3] .. ".parameters")
        end
      end
    end
  end
  want(dev.response_formats, "table", at .. ".response_formats")
  for i, rf in ipairs(type(dev.response_formats) == "table" and dev.response_formats or {}) do
    local rat = at .. ".response_formats[" .. i .. "]"
    want(rf, "table", rat)
    if type(rf.name) ~= "string" then bad(rat .. ".name", rf.name, "a string") end
    want(rf.description, "string", rat .. ".description")
    want(rf.schema, "table,string", rat .. ".schema")
  end
end

local function check_message_types(m, i)
  local at = "messages[" .. i .. "]"
  if type(m) ~= "table" then bad(at, m, "a table") end
  for _, k in ipairs { "role", "name", "channel", "recipient", "content_type", "thinking", "tool_call_id" } do
    want(m[k], "string", at .. "." .. k)
  end
  want(m.content, "string,table", at .. ".content")
  if m.role == "system" and type(m.content) == "table" then check_system(m.content, at .. ".content")
  elseif m.role == "developer" and type(m.content) == "table" then check_developer(m.content, at .. ".content") end
  want(m.tool_calls, "table", at .. ".tool_calls")
  if type(m.tool_calls) == "table" then
    for j, tc in ipairs(m.tool_calls) do
      local tat = at .. ".tool_calls[" .. j .. "]"
      want(tc, "table", tat)
      local fn = tc["function"] or tc
      want(fn, "table", tat .. ".function")
      if type(fn.name) ~= "string" then bad(tat .. ".function.name", fn.name, "a string") end
      want(fn.arguments, "string,table", tat .. ".arguments")
    end
  end
end

local function check_fields(conv)
  if type(conv) ~= "table" then bad("conv", conv, "a conversation table") end
  for k in pairs(conv) do
    if not CONV_KEYS[k] then error("harmony: render: unknown field '" .. tostring(k) .. "'", 0) end
  end
  if conv.messages ~= nil and type(conv.messages) ~= "table" then bad("messages", conv.messages, "a list") end
  for i, m in ipairs(conv.messages or {}) do check_message_types(m, i) end
  local fl = conv.flavour or "harmony"
  if fl ~= "harmony" and fl ~= "hf" then error("harmony: render: flavour must be harmony or hf (got '" .. tostring(fl) .. "')", 0) end
  -- the hf template reads system and developer fields: no text of their own there
  want(conv.system, fl == "hf" and "table,boolean" or "string,table,boolean", "system")
  want(conv.developer, fl == "hf" and "table" or "string,table,boolean", "developer")
  if type(conv.system) == "table" then check_system(conv.system, "system") end
  if type(conv.developer) == "table" then check_developer(conv.developer, "developer") end
  want(conv.mode, "string", "mode")
  want(conv.next_role, "string", "next_role")
  want(conv.keep_analysis, "boolean", "keep_analysis")
  want(conv.prefill, "table", "prefill")
  if type(conv.prefill) == "table" then
    for _, k in ipairs { "channel", "recipient", "content_type", "content" } do want(conv.prefill[k], "string", "prefill." .. k) end
  end
  return fl
end

-- the conversation checked (its flavour returned), raised at level as the
-- render function's own error
local function check_conv(conv, level)
  local ok, fl = pcall(check_fields, conv)
  if not ok then error(fl, level + 1) end
  return fl
end

--- render_text(conv): the rendered text, control tokens written literally
function M.render_text(conv)
  if check_conv(conv, 2) == "hf" then return hf_text(conv) end
  local out = {}
  for _, p in ipairs(harmony_pieces(conv)) do
    if type(p) ~= "table" then out[#out + 1] = p elseif p.special then out[#out + 1] = p.special end
  end
  return table.concat(out)
end

--- render(conv [, tokenizer]): token ids. Control tokens become their ids and
-- each text piece is encoded on its own as ordinary text, as the canonical
-- renderer does (so special-token strings in user text stay text). The hf
-- flavour tokenizes the template's text as transformers does.
function M.render(conv, tok)
  local fl = check_conv(conv, 2)
  tok = tok or conv.tokenizer
  if not tok then fail("render: token ids need a tokenizer (render(conv, tokenizer) or conv.tokenizer)", 2) end
  check.udata(tok, "harmony: render", "tokenizer", "gptoss.Tokenizer")
  if fl == "hf" then return tok:encode(hf_text(conv), { allowed_special = "all" }) end
  local ids, where = {}, nil
  for _, p in ipairs(harmony_pieces(conv)) do
    if type(p) == "table" then
      if p.message then where = p.message
      else
        local id = tok:special(p.special)
        if not id then fail("tokenizer has no special token " .. p.special, 2) end
        ids[#ids + 1] = id
      end
    elseif p ~= "" then
      local ok, enc = pcall(tok.encode, tok, p)
      if not ok then fail((where and ("message " .. where .. ": ") or "") .. tostring(enc), 2) end
      for _, id in ipairs(enc) do ids[#ids + 1] = id end
    end
  end
  return ids
end
-- }======================================================

-- {====================================================== parsing
-- Input units: { s = "<|name|>" } for a control token, { b = bytes } for text.
local KNOWN_SPECIALS = { "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
  "<|endoftext|>", "<|startoftext|>", "<|endofprompt|>" }
local special_name = P"<|" * (P"reserved_" * lpeg.R"09" ^ 1) * P"|>"
for _, s in ipairs(KNOWN_SPECIALS) do special_name = special_name + P(s) end
-- text into units: a control token, or the longest run without one
local units_of = Ct(((special_name / function(s) return { s = s } end) +
  (C((P(1) - special_name) ^ 1) / function(b) return { b = b } end)) ^ 0)

--- units(text): the text split into control tokens and text runs
function M.units(text)
  check.str(text, "harmony: units", "text")
  return units_of:match(text)
end

-- the header grammar: [text] <|channel|> CHANNEL [rest], CHANNEL up to
-- whitespace or '<'
local channel_marker = P"<|channel|>"
local ch_header = C((P(1) - channel_marker) ^ 0) * channel_marker * C((P(1) - S" \t\r\n\f\v<") ^ 0) * C(P(1) ^ 0)
local spaces = S" \t\r\n\f\v"
local trim = spaces ^ 0 * C((spaces ^ 0 * (P(1) - spaces) ^ 1) ^ 0)
local words_of = Ct((spaces ^ 0 * C((P(1) - spaces) ^ 1)) ^ 0)
local add_space_before_constrain = Cs((P(CONSTRAIN) / (" " .. CONSTRAIN) + P(1)) ^ 0)

-- harmony's parse_header_from_string; returns header and leftover words
local function parse_header(text, role, parse_recipient_and_type)
  local channel
  local before, ch, after = ch_header:match(text)
  if before then
    if ch == "" then return nil, "channel marker present but no channel value found in header" end
    channel = ch
    text = before .. after
  end
  text = trim:match(text)
  if text:find(CONSTRAIN, 1, true) then text = trim:match(add_space_before_constrain:match(text)) end
  local parts = words_of:match(text)
  local role_str
  if not role then
    role_str = parts[1]
    if not role_str then return nil, "message header did not contain a role" end
    if M.ROLES[role_str] then role = role_str
    elseif #parts > 1 or (#parts == 1 and role_str:sub(1, 3) == "to=") then
      table.remove(parts, 1)
      role = "tool"
    else
      return nil, "unknown role: " .. role_str
    end
  end
  if parts[1] == role then table.remove(parts, 1) end
  local recipient, content_type, rest
  if parse_recipient_and_type and #parts > 0 then
    local n = #parts
    local last = table.remove(parts)
    if last:sub(1, 3) == "to=" then recipient = last:sub(4)
    elseif n == 1 and last:sub(1, #CONSTRAIN) ~= CONSTRAIN then recipient = last
    else
      content_type = last
      local raw = table.remove(parts)
      if raw then recipient = raw:sub(1, 3) == "to=" and raw:sub(4) or raw end
    end
  end
  if #parts > 0 then rest = table.concat(parts, " ") end
  local h = { role = role, channel = channel, recipient = recipient, content_type = content_type }
  if role == "tool" then h.name = role_str end
  return h, rest
end

-- UTF-8 (utf8.c): the length of the longest valid prefix of s, and for the
-- first invalid spot either the length of its maximal invalid subpart or nil
-- when the rest could still become valid with more bytes
local utf8_check = core.utf8_check

local REPLACEMENT = "\239\191\189"

local Parser = {}
Parser.__index = Parser

--- stream_parser{ role = "assistant" | nil, strict = true, lenient = false,
--   tokenizer = tok, on_message = f(msg), on_delta = f(delta, parser) }
-- strict = false is harmony's non-strict mode; lenient goes further and
-- recovers text outside messages, truncated headers and missing <|end|>s.
local PARSER_KEYS = { role = true, strict = true, lenient = true, tokenizer = true, on_message = true, on_delta = true }

-- the stream parser's options, checked as fn's
local function check_parser_options(opts, fn, known, level)
  opts = check.options(opts, fn, known, level + 1)
  if opts.role ~= nil then check.choice(opts.role, fn, "role", { "system", "developer", "user", "assistant", "tool" }, level + 1) end
  if opts.strict ~= nil then check.bool(opts.strict, fn, "strict", level + 1) end
  if opts.lenient ~= nil then check.bool(opts.lenient, fn, "lenient", level + 1) end
  if opts.tokenizer ~= nil then check.udata(opts.tokenizer, fn, "tokenizer", "gptoss.Tokenizer", level + 1) end
  if opts.on_message ~= nil then check.func(opts.on_message, fn, "on_message", level + 1) end
  if opts.on_delta ~= nil then check.func(opts.on_delta, fn, "on_delta", level + 1) end
  return opts
end

function M.stream_parser(opts)
  opts = check_parser_options(opts, "harmony: stream_parser", PARSER_KEYS, 2)
  local lenient = opts.lenient == true
  local p = setmetatable({
    tok = opts.tokenizer, strict = opts.strict ~= false and not lenient, lenient = lenient,
    next_role = opts.role, messages = {}, state = opts.role and "header" or "start",
    header = {}, content = {}, undecoded = "", on_message = opts.on_message, on_delta = opts.on_delta,
  }, Parser)
  return p
end

function Parser:_finish_message(h, text)
  -- text recovered from headers (lenient) was never decoded: lossy, as
  -- harmony's content always is (each maximal ill-formed subpart one U+FFFD)
  text = core.utf8_clean(text)
  local m = { role = h.role, name = h.name, channel = h.channel, recipient = h.recipient,
              content_type = h.content_type, content = text }
  self.messages[#self.messages + 1] = m
  if self.on_message then self.on_message(m, self) end
  return m
end

function Parser:_content_text()
  return table.concat(self.content)
end

-- feeds text bytes to the open message, as harmony does: at most one
-- invalid subpart is replaced per token; a split sequence waits
function Parser:_content_bytes(b)
  self.undecoded = self.undecoded .. b
  local valid, err = utf8_check(self.undecoded)
  local delta = ""
  if valid == #self.undecoded then
    delta = self.undecoded
    self.undecoded = ""
  else
    if valid > 0 then delta = self.undecoded:sub(1, valid); self.undecoded = self.undecoded:sub(valid + 1) end
    if err then delta = delta .. REPLACEMENT; self.undecoded = self.undecoded:sub(err + 1) end
  end
  if delta ~= "" then
    self.content[#self.content + 1] = delta
    self.last_content_delta = delta
    if self.on_delta then self.on_delta(delta, self) end
  else
    self.last_content_delta = nil
  end
end

function Parser:_end_content()
  -- as harmony: the content, one U+FFFD for ids that never decoded, then
  -- the bytes of a sequence left unfinished
  local text = self:_content_text() .. (self.undecoded_ids and REPLACEMENT or "") .. core.utf8_clean(self.undecoded)
  local m = self:_finish_message(self.current_header, text)
  self.state, self.current_header, self.content, self.undecoded = "start", nil, {}, ""
  self.undecoded_ids = nil
  self.last_content_delta = nil
  return m
end

local function unit_text(u) return u.s or u.b end

--- p:process_unit({ s = "<|...|>" } | { b = bytes })
function Parser:process_unit(u)
  if type(u) ~= "table" or (type(u.s) == "string") == (type(u.b) == "string") then
    check.fail("harmony: process_unit", "u", '{ s = "<|name|>" } or { b = bytes }', u)
  end
  local st = self.state
  if st == "start" then
    if u.s == "<|start|>" then self.state, self.header = "header", {}
    elseif self.lenient then
      if u.s and M.STOP[u.s] then return self end
      -- text outside any message: an assistant message with no header
      self.state, self.current_header, self.content, self.undecoded = "content", { role = self.next_role or "assistant" }, {}, ""
      self.next_role = nil
      if u.b then self:_content_bytes(u.b) end
    else
      fail("unexpected " .. (u.s or string.format("text %q", u.b)) .. " while expecting <|start|>", 2)
    end
  elseif st == "header" then
    if u.s == "<|message|>" then
      local h, rest = parse_header(table.concat(self.header), self.next_role, true)
      if not h then
        if not self.lenient then fail(rest, 2) end
        h = { role = self.next_role or "assistant" }
      elseif rest then
        if not self.lenient then fail("unexpected tokens remaining in message header: " .. rest, 2) end
      end
      self.next_role = nil
      self.state, self.current_header, self.content, self.undecoded = "content", h, {}, ""
    elseif u.s and M.STOP[u.s] and not self.strict then
      if self.next_role and #self.header > 0 then
        local h, rest = parse_header(table.concat(self.header), self.next_role, false)
        if h then self:_finish_message(h, rest or "")
        elseif not self.lenient then fail(rest, 2) end
      elseif self.lenient and #self.header > 0 then
        local h, rest = parse_header(table.concat(self.header), nil, false)
        if h then self:_finish_message(h, rest or "") end
      end
      self.state, self.next_role, self.header = "start", nil, {}
    elseif self.lenient and u.s == "<|start|>" then
      self.header = {}   -- a header that never finished: start over
    else
      self.header[#self.header + 1] = unit_text(u)
    end
  else -- content
    if u.s and M.STOP[u.s] then
      self:_end_content()
    elseif self.lenient and u.s == "<|start|>" then
      self:_end_content()       -- a message that lost its <|end|>
      self.state, self.header = "header", {}
    else
      self:_content_bytes(unit_text(u))
    end
  end
  return self
end

--- p:process(id): one token id (needs the tokenizer); ids are harmony's
-- ranks, 0..2^32-1
function Parser:process(id)
  local tok = self.tok
  if not tok then fail("stream_parser: process(id) needs a tokenizer; use process_text or process_unit", 2) end
  check.int(id, "harmony: process", "id", 0, 4294967295)
  local special = tok:is_special(id) and tok:name(id)
  if self.state == "content" and not (special and M.STOP[special]) and (self.undecoded_ids or not special) then
    -- As harmony's StreamableParser (src/encoding.rs, process_next): in a
    -- message's content every id but a stop token joins the ids not yet
    -- decoded, a special token too, and the queue is decoded whole. An id
    -- that never decodes (past the vocabulary) holds back all that follows
    -- it until a stop token ends the message, with one U+FFFD for the queue.
    local pending = self.undecoded_ids or {}
    pending[#pending + 1] = id
    local ok, b = pcall(tok.decode_bytes, tok, pending)
    if not ok then self.undecoded_ids, self.last_content_delta = pending, nil; return self end
    self.undecoded_ids = nil
    return self:process_unit { b = b }
  end
  if special then return self:process_unit { s = special } end
  local ok, b = pcall(tok.decode_bytes, tok, { id })
  if not ok then fail("invalid token for decoding: " .. tostring(id), 2) end
  return self:process_unit { b = b }
end

--- p:process_text(text): a chunk of text whose control tokens are written out
function Parser:process_text(text)
  check.str(text, "harmony: process_text", "text")
  for _, u in ipairs(M.units(text)) do self:process_unit(u) end
  return self
end

--- p:process_eos(): the end of input; an open message ends here
function Parser:process_eos()
  if self.state == "content" then self:_end_content()
  elseif self.state == "header" then
    if self.lenient and #self.header > 0 then
      local h, rest = parse_header(table.concat(self.header), self.next_role, false)
      if h then self:_finish_message(h, rest or "") end
      self.state, self.header, self.next_role = "start", {}, nil
    elseif self.lenient then
      self.state = "start"
    else
      fail("unexpected end of input while waiting for the message header to complete", 2)
    end
  end
  return self
end

--- the text of the open message so far ("" when none is open)
function Parser:current_content()
  if self.state ~= "content" then return "" end
  return self:_content_text()
end

function Parser:current_role()
  if self.state == "content" then return self.current_header.role end
  return self.next_role
end
function Parser:current_channel() return self.state == "content" and self.current_header.channel or nil end
function Parser:current_recipient() return self.state == "content" and self.current_header.recipient or nil end
function Parser:current_content_type() return self.state == "content" and self.current_header.content_type or nil end

--- parse(completion, opts) -> messages
-- completion: token ids (with opts.tokenizer) or text with control tokens
-- written out; opts: role (the role whose header the completion starts in,
-- or nil when it starts with <|start|>), strict, lenient.
-- Strict and non-strict errors raise; lenient mode never does.
function M.parse(completion, opts)
  opts = check_parser_options(opts, "harmony: parse", { role = true, strict = true, lenient = true, tokenizer = true }, 2)
  if type(completion) ~= "string" and type(completion) ~= "table" then
    check.fail("harmony: parse", "completion", "token ids or text", completion)
  end
  local popts = { role = opts.role, strict = opts.strict, lenient = opts.lenient, tokenizer = opts.tokenizer }
  local p = M.stream_parser(popts)
  local function run()
    if type(completion) == "string" then p:process_text(completion)
    elseif type(completion) == "table" then
      for _, id in ipairs(completion) do p:process(id) end
    end
    p:process_eos()
  end
  if opts.lenient then
    local ok, err = pcall(run)
    if not ok then p.error = err end
    return p.messages, p.error
  end
  run()
  return p.messages
end
-- }======================================================

return M
