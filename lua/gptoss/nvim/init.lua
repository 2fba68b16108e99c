--- gptoss.nvim: the model runs inside Neovim; generation runs on the
-- engine's thread and the editor wakes on the engine's fd, so the main
-- loop never waits on the model. Buffers are touched only in vim.schedule.
local M = {}
local uv = vim.uv or vim.loop

-- the LuaJIT build of the binding, found from this file's own path
do
  local here = debug.getinfo(1, "S").source:sub(2)
  local root = vim.fn.fnamemodify(here, ":h:h:h:h")
  local so = root .. "/build/luajit/?.so"
  if not package.cpath:find(so, 1, true) then package.cpath = so .. ";" .. package.cpath end
  M.root = root
end

M.config = { model = nil, device = "cpu", adapter = nil, reasoning = "low", max_tokens = 512, keymaps = true,
  threads = nil, prefill = nil }

local state = { model = nil, engine = nil, poll = nil, chats = {}, active = {}, status = "idle", tps = 0 }
M._state = state

--- setup{ model = dir, device = "cpu"|"cuda:0", adapter, reasoning, max_tokens, keymaps }
function M.setup(opts)
  for k, v in pairs(opts or {}) do
    if M.config[k] == nil and k ~= "model" and k ~= "adapter" and k ~= "threads" and k ~= "prefill" then
      error("gptoss.nvim: unknown option '" .. tostring(k) .. "'", 2)
    end
    M.config[k] = v
  end
  if M.config.keymaps then
    vim.keymap.set("n", "<leader>gs", "<cmd>GptossStop<cr>", { desc = "gptoss: stop" })
  end
end

-- wakes on the engine's fd: every request with news is polled
local function on_news()
  state.engine:drain()
  for req, h in pairs(state.active) do
    local ids, text, done, err = req:poll()
    if #ids > 0 or text ~= "" or done then h(ids, text, done, err) end
    if done then state.active[req] = nil end
  end
  if next(state.active) == nil then state.status = "idle" end
  local s = state.engine:stats()
  state.tps = s.tokens_per_s or 0
end

--- the engine, loading the model on first use. gptoss.load is blocking C:
-- the load itself holds the editor briefly (milliseconds for a small
-- model, about a second for 20B); generation never does.
function M.engine()
  if state.engine then return state.engine end
  local cfg = M.config
  if not cfg.model then error("gptoss.nvim: setup{ model = dir } first", 0) end
  state.status = "loading"
  vim.api.nvim_echo({ { "gptoss: loading " .. cfg.model .. " ..." } }, false, {})
  local gptoss = require "gptoss"
  local m, err = gptoss.load(cfg.model, { device = cfg.device, threads = cfg.threads })
  if not m then state.status = "error"; error("gptoss.nvim: " .. tostring(err), 0) end
  state.model = m
  state.engine = gptoss.engine(m)
  state.poll = uv.new_poll(state.engine.fd)
  state.poll:start("r", function() vim.schedule(on_news) end)
  state.status = "idle"
  return state.engine
end

--- submits ids; handler(ids, text, done, err) runs in the main loop
function M.submit(ids, opts, handler)
  local eng = M.engine()
  local req, err = eng:submit(ids, opts)
  if not req then return nil, err end
  state.active[req] = handler
  state.status = "generating"
  return req
end

--- stops every request in flight (each ends at the engine's next step)
function M.stop()
  for req in pairs(state.active) do req:cancel() end
end
function M.stop_command() M.stop() end

--- statusline: "gptoss: <state> [N tok/s]"
function M.statusline()
  if state.status == "generating" then return string.format("gptoss: generating %.1f tok/s", state.tps) end
  return "gptoss: " .. state.status
end

-- {====================================================== chat
local Chat = {}
Chat.__index = Chat

local function parse_args(fargs)
  local o = {}
  for _, a in ipairs(fargs or {}) do
    local k, v = a:match("^(%w+)=(.*)$")
    if k then o[k] = v else o.file = a end
  end
  return o
end

--- opens a chat buffer (markdown); opts: reasoning, adapter, file (a saved chat)
function M.open_chat(opts)
  opts = opts or {}
  local buf = vim.api.nvim_create_buf(true, false)
  vim.api.nvim_buf_set_option(buf, "filetype", "markdown")
  vim.api.nvim_buf_set_option(buf, "buftype", "nofile")
  local chat = setmetatable({ buf = buf, messages = {}, reasoning = opts.reasoning or M.config.reasoning,
    adapter = opts.adapter or M.config.adapter, analysis = {} }, Chat)
  state.chats[buf] = chat
  if opts.file then chat:load(opts.file) end
  vim.api.nvim_set_current_buf(buf)
  chat:render_history()
  return chat
end

function M.chat_command(a)
  local o = parse_args(a and a.fargs)
  local chat = state.chats[vim.api.nvim_get_current_buf()]
  if chat and not o.file then
    if o.reasoning then chat.reasoning = o.reasoning end
    if o.adapter then chat.adapter = o.adapter end
    return chat:send_from_buffer()
  end
  return M.open_chat(o)
end

--- the chat of buf (the current buffer by default)
function M.chat_of(buf) return state.chats[buf or vim.api.nvim_get_current_buf()] end

function Chat:render_history()
  local lines = {}
  for _, m in ipairs(self.messages) do
    lines[#lines + 1] = "## " .. m.role
    for l in (m.content .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = l end
  end
  lines[#lines + 1] = "## user"
  lines[#lines + 1] = ""
  vim.api.nvim_buf_set_lines(self.buf, 0, -1, false, lines)
  self.user_line = #lines - 1   -- 0-based first line of the user's next message
end

-- the text after the last "## user" heading
function Chat:send_from_buffer()
  local lines = vim.api.nvim_buf_get_lines(self.buf, self.user_line or 0, -1, false)
  local text = table.concat(lines, "\n"):gsub("^%s+", ""):gsub("%s+$", "")
  if text == "" then return nil, "empty message" end
  return self:send(text)
end

-- appends text at the end of the buffer (it may hold newlines)
local function append(buf, text)
  if text == "" or not vim.api.nvim_buf_is_valid(buf) then return end
  local last = vim.api.nvim_buf_line_count(buf)
  local tail = vim.api.nvim_buf_get_lines(buf, last - 1, last, false)[1]
  local parts = vim.split(tail .. text, "\n", { plain = true })
  vim.api.nvim_buf_set_lines(buf, last - 1, last, false, parts)
end

--- sends a user message; the reply streams into the buffer. A request in
-- flight on this chat is superseded (cancelled).
function Chat:send(text, on_done)
  if self.req then
    -- superseded: its user message goes, and its reply is dropped
    self:stop()
    table.remove(self.messages, self.req_message)
    self.req = nil
  end
  local harmony = require "gptoss.harmony"
  self.messages[#self.messages + 1] = { role = "user", content = text }
  M.engine()
  local tok = state.model.tokenizer
  local prefill = M.config.prefill
  local prompt = harmony.render({ system = { reasoning = self.reasoning }, messages = self.messages,
    mode = "completion", prefill = prefill }, tok)
  local parser = harmony.stream_parser { role = "assistant", lenient = true, tokenizer = tok }
  if prefill and prefill.channel then   -- the prompt opened the header: replay it to the parser
    parser:process_unit { s = "<|channel|>" }; parser:process_unit { b = prefill.channel }
    parser:process_unit { s = "<|message|>" }
  end
  local buf = self.buf
  append(buf, "\n\n## assistant\n")
  local reply, analysis, pieces = {}, {}, 0
  local req, err
  req, err = M.submit(prompt, { max_tokens = M.config.max_tokens, adapter = self.adapter }, function(ids, _, done, e)
    if self.req ~= req then return end   -- superseded
    for _, id in ipairs(ids) do
      parser:process(id)
      local d = parser.last_content_delta
      if d and d ~= "" then
        if parser:current_channel() == "analysis" then analysis[#analysis + 1] = d
        else reply[#reply + 1] = d; append(buf, d) end
      end
    end
    pieces = pieces + 1
    if done then
      parser:process_eos()
      local final = table.concat(reply)
      self.messages[#self.messages + 1] = { role = "assistant", content = final }
      self.analysis[#self.messages] = table.concat(analysis)
      self.last = { text = final, analysis = self.analysis[#self.messages], pieces = pieces, error = e,
        result = req:result() }
      self.req = nil
      append(buf, "\n\n## user\n")
      self.user_line = vim.api.nvim_buf_line_count(buf) - 1
      if on_done then on_done(self.last) end
    end
  end)
  if not req then error("gptoss.nvim: " .. tostring(err), 0) end
  self.req, self.req_message = req, #self.messages
  return req
end

--- cancels this chat's request (it ends at the engine's next step)
function Chat:stop()
  if self.req then self.req:cancel() end
end

--- saves the messages as JSON
function Chat:save(path)
  local json = require "gptoss.json"
  local f = assert(io.open(path, "wb"))
  f:write(json.encode_compact({ messages = self.messages, reasoning = self.reasoning, adapter = self.adapter }))
  f:close()
end

function Chat:load(path)
  local json = require "gptoss.json"
  local f = assert(io.open(path, "rb"))
  local t = json.decode(f:read("*a"))
  f:close()
  self.messages = t.messages or {}
  self.reasoning = t.reasoning or self.reasoning
  self.adapter = t.adapter or self.adapter
end
-- }======================================================

return M
