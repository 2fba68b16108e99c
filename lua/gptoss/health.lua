--- :checkhealth gptoss (Neovim 0.7's health API and 0.10's vim.health)
local M = {}

local function api()
  if vim.health and vim.health.start then
    return vim.health.start, vim.health.ok, vim.health.error, vim.health.info
  end
  local h = require "health"
  return h.report_start, h.report_ok, h.report_error, h.report_info
end

function M.check()
  local start, ok, err, info = api()
  start("gptoss")
  local nv = require "gptoss.nvim"
  local loaded, core = pcall(require, "gptoss.core")
  if loaded then ok("gptoss.core loaded from " .. (package.searchpath and package.searchpath("gptoss.core", package.cpath) or "package.cpath"))
  else err("gptoss.core not found (build it: make LUA=luajit): " .. tostring(core)) end
  local cfg = nv.config
  if not cfg.model then err("no model: call require('gptoss.nvim').setup{ model = dir }")
  elseif vim.fn.isdirectory(cfg.model) == 1 then ok("model: " .. cfg.model)
  else err("model directory not found: " .. cfg.model) end
  info("device: " .. tostring(cfg.device))
  local st = nv._state
  local names = {}
  for name in pairs(cfg.adapters or {}) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local dir = cfg.adapters[name]
    local note = st.adapters[vim.fn.fnamemodify(dir, ":p")] and " (loaded)" or ""
    if vim.fn.filereadable(dir .. "/adapter_config.json") == 1 then ok("adapter " .. name .. ": " .. dir .. note)
    else err("adapter " .. name .. ": " .. dir .. " has no adapter_config.json") end
  end
  info("adapter of new chats: " .. (cfg.adapter or "none"))
  if st.loader then
    info("engine: loading the model")
  elseif st.engine then
    local s = st.engine:stats()
    info(string.format("engine: %s, KV memory in use %d of %d bytes", st.status, s.kv_in_use or 0, s.kv_budget or 0))
  else
    info("engine: not started (the model loads on first use)")
  end
end

return M
