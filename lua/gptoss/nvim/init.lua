--- gptoss.nvim: the model runs inside Neovim. This file holds setup, the
-- commands and the Lua functions users call; job.lua runs the requests,
-- chat.lua, ask.lua and rewrite.lua are the three ways to use them, ui.lua
-- draws. Nothing here loads the model: it loads on first use.
local config = require "gptoss.nvim.config"
local job = require "gptoss.nvim.job"
local api = vim.api

local M = {}

M.root = job.root
M.config = config.values
M._state = job.state

local function chat() return require "gptoss.nvim.chat" end
local function rewrite() return require "gptoss.nvim.rewrite" end

--- setup{ model = dir, device, threads, adapters = { name = dir }, adapter,
-- reasoning, max_tokens, sampling, prefill, keymaps }
function M.setup(opts)
  config.apply(opts)
  require("gptoss.nvim.ui").define_highlights()
  local stop = config.key("stop")
  if stop then vim.keymap.set("n", stop, "<cmd>GptossStop<cr>", { desc = "gptoss: stop" }) end
end

local function notify_error(err) vim.notify(tostring(err):gsub("^gptoss%.nvim: ", "gptoss: "), vim.log.levels.ERROR) end

-- k=v words into a table; the last other word is the file
local function parse_args(fargs)
  local o = {}
  for _, a in ipairs(fargs or {}) do
    local k, v = a:match("^(%w+)=(.*)$")
    if k then o[k] = v else o.file = a end
  end
  return o
end

--- loads the model off the main loop; on_ready(err) runs once it is loaded
M.load = job.load
--- the engine, loading the model on first use (waiting for it: the
-- commands use M.load instead)
M.engine = job.engine
--- submits ids to the engine; handler(ids, text, done, err) runs in the main loop
M.submit = job.submit
--- statusline: "gptoss: idle", "gptoss: loading", "gptoss: generating N tok/s"
M.statusline = job.statusline
--- stops every request in flight (each ends at the engine's next step)
function M.stop() job.stop() end

--- the chat of buf (the current buffer by default), or nil
function M.chat_of(buf) return chat().of(buf) end
--- opens a chat buffer; opts: reasoning, adapter, file
function M.open_chat(opts) return chat().open(opts) end
-- buf as a buffer number (nil and 0: the current one), the key of what works for it
local function buffer(buf)
  if buf == nil or buf == 0 then return api.nvim_get_current_buf() end
  return buf
end

--- asks about lines line1..line2 of buf (line1 nil: the question alone)
function M.ask(question, buf, line1, line2) return require("gptoss.nvim.ask").ask(question, buffer(buf), line1, line2) end
--- rewrites lines line1..line2 of buf as instructed; a preview to accept or reject
function M.rewrite(instruction, buf, line1, line2) return rewrite().rewrite(instruction, buffer(buf), line1, line2) end
function M.accept(rw) return rewrite().accept(rw) end
function M.reject(rw) return rewrite().reject(rw) end

-- {====================================================== commands
-- runs fn once the model is loaded (loading it off the main loop)
local function when_loaded(fn)
  job.load(function(err)
    if err then return notify_error(err) end
    local ok, ferr = pcall(fn)
    if not ok then notify_error(ferr) end
  end)
end

local function checked(o)
  if o.reasoning and not config.REASONING[o.reasoning] then
    error("gptoss.nvim: reasoning must be low, medium or high (got '" .. o.reasoning .. "')", 0)
  end
  if o.adapter then
    if o.adapter == "none" then o.adapter = false else
      local ok, err = job.adapter(o.adapter)
      if not ok then error("gptoss.nvim: " .. err, 0) end
    end
  end
  return o
end

-- :GptossChat [reasoning=R] [adapter=A] [file]
function M.chat_command(a)
  local ok, err = pcall(function()
    local o = checked(parse_args(a and a.fargs))
    local c = chat().of()
    if c and not o.file then
      if o.reasoning then c.reasoning = o.reasoning end
      if o.adapter ~= nil then c.adapter = o.adapter or nil end
      return when_loaded(function()
        local sent, why = c:send_from_buffer()
        if not sent and why and not (o.reasoning or o.adapter ~= nil) then vim.notify("gptoss: " .. why) end
      end)
    end
    if o.adapter == false then o.adapter = nil end
    chat().open(o)
  end)
  if not ok then notify_error(err) end
end

function M.stop_command() job.stop() end

-- the lines a command's range names (nil for no range)
local function range_of(a)
  if a.range and a.range > 0 then return a.line1, a.line2 end
end

-- :[range]GptossAsk {question}
function M.ask_command(a)
  local line1, line2 = range_of(a)
  local buf = api.nvim_get_current_buf()
  when_loaded(function() M.ask(a.args, buf, line1, line2) end)
end

-- :[range]GptossRewrite {instruction} (the current line without a range)
function M.rewrite_command(a)
  local buf = api.nvim_get_current_buf()
  when_loaded(function() M.rewrite(a.args, buf, a.line1, a.line2) end)
end

function M.accept_command()
  local ok, err = M.accept()
  if not ok then notify_error(err) end
end

function M.reject_command()
  local ok, err = M.reject()
  if not ok then notify_error(err) end
end

-- :GptossSave {file}: the current chat as JSON (:GptossChat {file} reopens it)
function M.save_command(a)
  local c = chat().of()
  if not c then return notify_error("gptoss: not a chat buffer") end
  local ok, err = c:save(vim.fn.expand(a.args))
  if not ok then notify_error("gptoss: " .. tostring(err)) end
end

--- :GptossAdapter [name|none]: in a chat buffer, that chat's adapter;
-- elsewhere the adapter of new chats, asks and rewrites. Without a name it
-- says which is in use.
function M.adapter_command(a)
  local name = a and a.args ~= "" and a.args or nil
  local c = chat().of()
  if not name then
    local cur = (c and c.adapter) or (not c and config.values.adapter) or "none"
    vim.notify("gptoss: adapter " .. cur .. (c and " (this chat)" or ""))
    return
  end
  local ok, err = pcall(function()
    if name ~= "none" then
      local loaded, why = job.adapter(name)
      if not loaded then error("gptoss.nvim: " .. why, 0) end
    else
      name = nil
    end
    if c then c.adapter = name else config.values.adapter = name end
  end)
  if not ok then notify_error(err) end
end

--- completion of :GptossAdapter: setup's adapter names and none
function M.complete_adapter(lead)
  local out = {}
  for n in pairs(config.values.adapters or {}) do if n:sub(1, #lead) == lead then out[#out + 1] = n end end
  table.sort(out)
  if ("none"):sub(1, #lead) == lead then out[#out + 1] = "none" end
  return out
end
-- }======================================================

return M
