-- Drives the gptoss plugin inside `nvim --headless --clean`; writes what it
-- saw to $GPTOSS_NVIM_OUT/result.json for spec/nvim_spec.lua to check.
local out_dir, model = os.getenv("GPTOSS_NVIM_OUT"), os.getenv("GPTOSS_NVIM_MODEL")
local uv = vim.uv or vim.loop
local json = require "gptoss.json"
local D = dofile("spec/support/nvim_harness.lua")
local res, steps, finish, when = D.res, D.steps, D.finish, D.when

local nv = require "gptoss.nvim"
nv.setup { model = model, device = "cpu", threads = 1, max_tokens = 48, keymaps = false,
  prefill = { channel = "final" } }   -- the tiny model's noise never opens a message itself

-- chat: streams and finishes, the buffer grows while the request runs
steps[#steps + 1] = function(next_step)
  vim.cmd("GptossChat")
  local chat = nv.chat_of()
  nv.engine()
  D.reset_worst()
  local sizes = {}
  vim.api.nvim_buf_set_lines(chat.buf, chat.user_line, -1, false, { "hello there" })
  vim.cmd("GptossChat")
  local req = chat.req
  local watch = uv.new_timer()
  watch:start(1, 1, vim.schedule_wrap(function()
    if chat.req == req then sizes[#sizes + 1] = #table.concat(vim.api.nvim_buf_get_lines(chat.buf, 0, -1, false), "\n") end
  end))
  when(function() return chat.last ~= nil end, function()
    watch:stop()
    local l = chat.last
    res.chat = { pieces = l.pieces, final = l.text, result_text = l.result.text, finish = l.result.finish_reason,
      generated = #l.result.ids, sizes_growing = sizes[1] ~= nil and sizes[#sizes] > sizes[1],
      buffer = table.concat(vim.api.nvim_buf_get_lines(chat.buf, 0, -1, false), "\n"),
      messages = #chat.messages, worst_delay_ms = D.worst(), statusline = nv.statusline() }
    next_step()
  end)
end

-- stop mid-stream: cancelled before max_tokens
steps[#steps + 1] = function(next_step)
  local chat = nv.chat_of()
  nv.config.max_tokens = 2000
  local req = chat:send("again")
  local function size() return #table.concat(vim.api.nvim_buf_get_lines(chat.buf, 0, -1, false), "\n") end
  local before = size()
  when(function() return size() > before end, function()   -- the reply has begun streaming
    res.status_during = nv.statusline()
    vim.cmd("GptossStop")
  end)
  when(function() return chat.req == nil end, function()
    res.stop = { finish = req:result().finish_reason, generated = #req:result().ids }
    next_step()
  end)
end

-- supersede: a second send cancels the first
steps[#steps + 1] = function(next_step)
  local chat = nv.chat_of()
  local first = chat:send("one")
  local second = chat:send("two")
  when(function() return first.done end, function()
    res.supersede = { first = first:result().finish_reason, second_running = chat.req == second, users = {} }
    for _, m in ipairs(chat.messages) do if m.role == "user" then table.insert(res.supersede.users, m.content) end end
    chat:stop()
    when(function() return chat.req == nil end, next_step)
  end)
end

-- save and reopen
steps[#steps + 1] = function(next_step)
  local chat = nv.chat_of()
  chat:save(out_dir .. "/chat.json")
  vim.cmd("GptossChat " .. out_dir .. "/chat.json")
  local again = nv.chat_of()
  res.reopen = { same_buf = again.buf == chat.buf, saved = json.encode_compact(chat.messages),
    reopened = json.encode_compact(again.messages),
    buffer_has_user = table.concat(vim.api.nvim_buf_get_lines(again.buf, 0, -1, false), "\n"):find("hello there", 1, true) ~= nil }
  next_step()
end

-- checkhealth and help
steps[#steps + 1] = function(next_step)
  vim.cmd("checkhealth gptoss")
  res.health = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  vim.cmd("help gptoss")
  res.help = { file = vim.fn.expand("%:t"), line = vim.api.nvim_get_current_line() }
  vim.cmd("help :GptossStop")
  res.help_stop = vim.api.nvim_get_current_line()
  next_step()
end

D.start()
