--- gptoss.nvim.chat: chat buffers. A chat is markdown: a "## user" or
-- "## assistant" heading above each message; the reply streams in under
-- "## assistant", its reasoning (the analysis channel) in a closed fold.
local config = require "gptoss.nvim.config"
local job = require "gptoss.nvim.job"
local ui = require "gptoss.nvim.ui"
local api = vim.api

local M = {}

local chats = {}   -- buffer -> Chat
M.chats = chats

local Chat = {}
Chat.__index = Chat
M.Chat = Chat

local count = 0

--- opens a chat buffer (markdown) in the current window; opts: reasoning,
-- adapter (a name), file (a saved chat)
function M.open(opts)
  opts = opts or {}
  local cfg = config.values
  local buf = api.nvim_create_buf(true, false)
  vim.bo[buf].filetype = "markdown"
  vim.bo[buf].buftype = "nofile"
  count = count + 1
  pcall(api.nvim_buf_set_name, buf, "gptoss-chat-" .. count)
  local chat = setmetatable({ buf = buf, messages = {}, analysis = {}, reasoning = opts.reasoning or cfg.reasoning,
    adapter = opts.adapter or cfg.adapter }, Chat)
  chats[buf] = chat
  if opts.file then
    local ok, err = chat:load(opts.file)
    if not ok then chats[buf] = nil; api.nvim_buf_delete(buf, { force = true }); error("gptoss.nvim: " .. err, 0) end
  end
  api.nvim_set_current_buf(buf)
  ui.fold_reasoning(buf)
  ui.on_wipe(buf, function() chat:stop(); chats[buf] = nil end)
  chat:render_history()
  return chat
end

--- the chat of buf (the current buffer by default), or nil
function M.of(buf) return chats[buf or api.nvim_get_current_buf()] end

-- the lines of one assistant reply: its reasoning in a fold, then its text
local function reply_lines(final, analysis)
  local lines = {}
  if analysis and analysis ~= "" then
    lines[1] = ui.FOLD_OPEN
    for _, l in ipairs(ui.lines(analysis)) do lines[#lines + 1] = l end
    lines[#lines + 1] = ui.FOLD_CLOSE
  end
  if final ~= "" or #lines == 0 then
    for _, l in ipairs(ui.lines(final)) do lines[#lines + 1] = l end
  end
  return lines
end

-- highlights the reasoning folds of lines from `from` (0-based) on
local function mark_folds(buf, from)
  local lines = api.nvim_buf_get_lines(buf, from, -1, false)
  local open
  for i, l in ipairs(lines) do
    if l == ui.FOLD_OPEN then open = from + i - 1
    elseif l == ui.FOLD_CLOSE and open then ui.mark_reasoning(buf, open, from + i - 1); open = nil end
  end
end

function Chat:render_history()
  local lines = {}
  for i, m in ipairs(self.messages) do
    lines[#lines + 1] = "## " .. m.role
    local body = m.role == "assistant" and reply_lines(m.content, self.analysis[i]) or ui.lines(m.content)
    for _, l in ipairs(body) do lines[#lines + 1] = l end
    lines[#lines + 1] = ""
  end
  lines[#lines + 1] = "## user"
  lines[#lines + 1] = ""
  api.nvim_buf_set_lines(self.buf, 0, -1, false, lines)
  mark_folds(self.buf, 0)
  self.user_line = #lines - 1   -- 0-based first line of the user's next message
end

--- sends the text under the last "## user" heading
function Chat:send_from_buffer()
  if self.req then return nil, "a reply is streaming (:GptossStop stops it)" end
  local lines = api.nvim_buf_get_lines(self.buf, self.user_line or 0, -1, false)
  local text = table.concat(lines, "\n"):gsub("^%s+", ""):gsub("%s+$", "")
  if text == "" then return nil, "empty message" end
  return self:send(text)
end

--- sends a user message; the reply streams into the buffer. A request in
-- flight on this chat is superseded: its user message goes, its reply is
-- dropped. -> the engine's request
function Chat:send(text, on_done)
  if self.req then
    self:stop()
    table.remove(self.messages, self.req_message)
    self.req = nil
  end
  self.messages[#self.messages + 1] = { role = "user", content = text }
  local buf = self.buf
  -- the buffer shows the conversation as sent, then the reply's heading
  self:render_history()
  api.nvim_buf_set_lines(buf, self.user_line - 1, -1, false, { "## assistant", "" })
  -- the reply's heading, followed through edits above it
  local heading = api.nvim_buf_set_extmark(buf, ui.ns, api.nvim_buf_line_count(buf) - 2, 0, {})
  local fold, mark   -- the reasoning fold being streamed: its first line, its highlight
  local j, err = job.chat(self.messages, { reasoning = self.reasoning, adapter = self.adapter, buf = buf },
    function(d, channel, recipient)
      if recipient or not api.nvim_buf_is_valid(buf) then return end   -- a tool call: not shown
      if channel == "analysis" then
        if not fold then
          ui.new_line(buf)
          ui.append(buf, ui.FOLD_OPEN .. "\n")
          fold = api.nvim_buf_line_count(buf) - 2
        end
        ui.append(buf, d)
        mark = ui.mark_reasoning(buf, fold, api.nvim_buf_line_count(buf) - 1, mark)
      elseif channel == "final" or channel == nil then
        if fold then ui.new_line(buf); ui.append(buf, ui.FOLD_CLOSE .. "\n"); fold = nil end
        ui.append(buf, d)
      end
    end,
    function(res)
      -- the reply as parsed at its end (gptoss.chat's final and analysis)
      self.messages[#self.messages + 1] = { role = "assistant", content = res.final }
      self.analysis[#self.messages] = res.analysis
      self.last = { text = res.final, analysis = res.analysis, pieces = res.pieces, error = res.error,
        result = res.result }
      self.req = nil
      if api.nvim_buf_is_valid(buf) then
        local head = api.nvim_buf_get_extmark_by_id(buf, ui.ns, heading, {})[1] + 1   -- the reply's first line
        api.nvim_buf_del_extmark(buf, ui.ns, heading)
        local lines = reply_lines(res.final, res.analysis)
        lines[#lines + 1] = ""
        lines[#lines + 1] = "## user"
        lines[#lines + 1] = ""
        api.nvim_buf_set_lines(buf, head, -1, false, lines)
        mark_folds(buf, head)
        self.user_line = api.nvim_buf_line_count(buf) - 1
      end
      if res.error then vim.notify("gptoss: " .. tostring(res.error), vim.log.levels.ERROR) end
      if on_done then on_done(self.last) end
    end)
  if not j then
    table.remove(self.messages)
    self:render_history()
    error("gptoss.nvim: " .. tostring(err), 0)
  end
  self.job, self.req, self.req_message = j, j.req, #self.messages
  return j.req
end

--- cancels this chat's request (it ends at the engine's next step)
function Chat:stop()
  if self.req then self.req:cancel() end
end

--- saves the chat as JSON: its messages, their reasoning, its settings
function Chat:save(path)
  local json = require "gptoss.json"
  local analysis = {}
  for i = 1, #self.messages do analysis[i] = self.analysis[i] or "" end
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  f:write(json.encode_compact({ messages = self.messages, analysis = analysis, reasoning = self.reasoning,
    adapter = self.adapter }))
  f:close()
  return true
end

--- loads a saved chat -> true | nil, message
function Chat:load(path)
  local json = require "gptoss.json"
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local ok, t = pcall(json.decode, f:read("*a"))
  f:close()
  if not ok or type(t) ~= "table" then return nil, path .. ": not a saved chat" end
  self.messages = t.messages or {}
  self.analysis = {}
  for i, a in ipairs(t.analysis or {}) do if a ~= "" then self.analysis[i] = a end end
  self.reasoning = t.reasoning or self.reasoning
  self.adapter = t.adapter or self.adapter
  return true
end

return M
