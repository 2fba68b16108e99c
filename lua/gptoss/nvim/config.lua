--- gptoss.nvim.config: the plugin's options, their defaults and their
-- checks (setup's errors name the option and quote the value given).
local M = {}

local REASONING = { low = true, medium = true, high = true }
M.REASONING = REASONING

-- the keymaps setup's keymaps = true gives; a table overrides them one by
-- one (false turns one off)
M.DEFAULT_KEYMAPS = { stop = "<leader>gs", accept = "a", reject = "r", close = "q" }

--- the live options (every module reads them from here)
M.values = {
  model = nil,          -- the checkpoint's directory
  device = "cpu",       -- "cpu" or "cuda:N"
  threads = nil,        -- CPU threads of the model (the library's default)
  adapters = {},        -- name -> PEFT adapter directory
  adapter = nil,        -- the adapter of new chats, asks and rewrites (a name of adapters, or a directory)
  reasoning = "low",    -- the system message's reasoning effort
  max_tokens = 512,     -- tokens per reply
  sampling = {},        -- the engine's sampling options (temperature, top_p, seed, ...)
  prefill = nil,        -- opens the assistant's message, e.g. { channel = "final" }
  keymaps = M.DEFAULT_KEYMAPS,
}

local function quote(v)
  if type(v) == "string" then return "'" .. v .. "'" end
  return tostring(v) .. " (a " .. type(v) .. ")"
end

local function fail(key, want, v) error(string.format("setup: %s must be %s (got %s)", key, want, quote(v)), 3) end

local CHECKS = {
  model = function(v) if type(v) ~= "string" then fail("model", "a directory", v) end end,
  device = function(v) if type(v) ~= "string" then fail("device", '"cpu" or "cuda:N"', v) end end,
  threads = function(v)
    if type(v) ~= "number" or v < 0 or v ~= math.floor(v) then fail("threads", "an integer >= 0", v) end
  end,
  adapters = function(v)
    if type(v) ~= "table" then fail("adapters", "a table of name = directory", v) end
    for name, dir in pairs(v) do
      if type(name) ~= "string" or type(dir) ~= "string" then fail("adapters", "a table of name = directory", name) end
    end
  end,
  adapter = function(v) if type(v) ~= "string" then fail("adapter", "a name of adapters or a directory", v) end end,
  reasoning = function(v) if not REASONING[v] then fail("reasoning", '"low", "medium" or "high"', v) end end,
  max_tokens = function(v)
    if type(v) ~= "number" or v < 1 or v ~= math.floor(v) then fail("max_tokens", "an integer >= 1", v) end
  end,
  sampling = function(v) if type(v) ~= "table" then fail("sampling", "a table of sampling options", v) end end,
  prefill = function(v) if type(v) ~= "table" then fail("prefill", "a table like { channel = \"final\" }", v) end end,
  keymaps = function(v)
    if type(v) ~= "boolean" and type(v) ~= "table" then fail("keymaps", "true, false or a table", v) end
    if type(v) == "table" then
      for k, lhs in pairs(v) do
        if M.DEFAULT_KEYMAPS[k] == nil then fail("keymaps", "a table of stop, accept, reject, close", k) end
        if lhs ~= false and type(lhs) ~= "string" then fail("keymaps." .. k, "a key sequence or false", lhs) end
      end
    end
  end,
}

--- the names of every option, sorted
M.OPTIONS = {}
for k in pairs(CHECKS) do M.OPTIONS[#M.OPTIONS + 1] = k end
table.sort(M.OPTIONS)

--- checks opts and takes them into M.values
function M.apply(opts)
  if opts == nil then return M.values end
  if type(opts) ~= "table" then error("setup: options must be a table (got " .. quote(opts) .. ")", 2) end
  for k, v in pairs(opts) do
    if not CHECKS[k] then error("setup: unknown option " .. quote(k), 2) end
    CHECKS[k](v)
  end
  for k, v in pairs(opts) do M.values[k] = v end
  local km = M.values.keymaps
  if km == true then M.values.keymaps = M.DEFAULT_KEYMAPS
  elseif type(km) == "table" then
    local merged = {}
    for k, lhs in pairs(M.DEFAULT_KEYMAPS) do merged[k] = lhs end
    for k, lhs in pairs(km) do merged[k] = lhs end
    M.values.keymaps = merged
  end
  local a = M.values.adapter
  if a and not M.values.adapters[a] and vim.fn.isdirectory(a) ~= 1 then
    error("setup: adapter must be a name of adapters or a directory (got " .. quote(a) .. ")", 2)
  end
  return M.values
end

--- the key of a keymap, or nil when keymaps are off or that one is
function M.key(name)
  local km = M.values.keymaps
  if type(km) ~= "table" then return nil end
  return km[name] or nil
end

return M
