-- Drives :GptossAsk, :GptossRewrite, :GptossAdapter and the reasoning fold
-- inside `nvim --headless --clean`. The cases come from
-- $GPTOSS_NVIM_IN (spec/nvim_ask_spec.lua writes them); what the editor
-- showed goes to $GPTOSS_NVIM_OUT/result.json for the spec to compare with
-- gptoss.chat in a plain Lua process.
local uv = vim.uv or vim.loop
local api = vim.api
local out_dir = os.getenv("GPTOSS_NVIM_OUT")
local json = require "gptoss.json"
local D = dofile("spec/support/nvim_harness.lua")
local res, steps, finish, when = D.res, D.steps, D.finish, D.when
local cases = json.decode(assert(io.open(os.getenv("GPTOSS_NVIM_IN"), "rb")):read("*a"))

local nv = require "gptoss.nvim"
nv.setup { model = os.getenv("GPTOSS_NVIM_MODEL"), device = "cpu", threads = 1, max_tokens = cases.max_tokens,
  keymaps = true, sampling = { temperature = 0 }, prefill = { channel = "final" },
  adapters = { attn = cases.adapter_dir } }
local ask_mod, rewrite_mod = require "gptoss.nvim.ask", require "gptoss.nvim.rewrite"

local function reset_worst() D.reset_worst(true) end

local function lines(buf) return api.nvim_buf_get_lines(buf, 0, -1, false) end

-- a source buffer holding the case's lines, in a window of its own
local function source(case)
  vim.cmd("enew")
  local buf = api.nvim_get_current_buf()
  vim.bo[buf].filetype = case.filetype
  api.nvim_buf_set_lines(buf, 0, -1, false, case.lines)
  return buf
end


-- ask, before the model is loaded: the command loads it off the main loop,
-- then the answer streams into a float
steps[#steps + 1] = function(next_step)
  local case = cases.ask
  local buf = source(case)
  reset_worst()
  vim.cmd(string.format("%d,%dGptossAsk %s", case.line1, case.line2, case.question))
  res.load = { status = nv.statusline(), engine_after_command = nv._state.engine ~= nil }
  local a
  when(function() return ask_mod.last ~= nil end, function()
    res.load.worst_delay_ms = D.worst()
    a = ask_mod.last
    reset_worst()
  end)
  local sizes = {}
  local watch = uv.new_timer()
  watch:start(1, 1, vim.schedule_wrap(function()
    if a and not a.last and api.nvim_buf_is_valid(a.float.buf) then sizes[#sizes + 1] = #table.concat(lines(a.float.buf), "\n") end
  end))
  when(function() return a ~= nil and a.last ~= nil end, function()
    watch:stop()
    local cfg = api.nvim_win_get_config(a.float.win)
    res.ask = { text = table.concat(lines(a.float.buf), "\n"), messages = a.messages, pieces = a.last.pieces,
      finish = a.last.finish_reason, generated = #a.last.result.ids, worst_delay_ms = D.worst(),
      float = cfg.relative ~= "", source_unchanged = vim.deep_equal(lines(buf), case.lines),
      sizes_growing = #sizes > 1 and sizes[#sizes] > sizes[1] }
    vim.cmd("close")   -- the float: its buffer goes with it
    res.ask.float_closed = not api.nvim_buf_is_valid(a.float.buf)
    next_step()
  end)
end

-- ask superseded: a second ask on the same buffer cancels the first
steps[#steps + 1] = function(next_step)
  local case = cases.ask
  local buf = source(case)
  nv.config.max_tokens = 2000
  vim.cmd(string.format("%d,%dGptossAsk %s", case.line1, case.line2, case.question))
  local first = ask_mod.last
  api.nvim_set_current_win(vim.fn.win_findbuf(buf)[1])
  vim.cmd("GptossAsk again")
  local second = ask_mod.last
  when(function() return first.job.req.done end, function()
    res.ask_supersede = { first = first.job.req:result().finish_reason, first_closed = not api.nvim_buf_is_valid(first.float.buf),
      second_running = second.job.req.done == false, second_message = second.messages[1].content }
    vim.cmd("GptossStop")
    when(function() return second.job.req.done end, function()
      nv.config.max_tokens = cases.max_tokens
      res.ask_supersede.second = second.job.req:result().finish_reason
      vim.cmd("close")
      next_step()
    end)
  end)
end

-- a file of several thousand lines: the ask's context is its range alone,
-- and asking again about the same range reuses the first one's KV (the
-- engine's prefix cache); the editor stays responsive throughout
steps[#steps + 1] = function(next_step)
  local case = cases.big
  local big = {}
  for i = 1, case.nlines do big[i] = string.format("local v%d = %d  -- line %d", i, i * 7, i) end
  local buf = source({ filetype = "lua", lines = big })
  -- Neovim 0.10 highlights Lua with tree-sitter: its first parse of the
  -- file (about 40 ms here) is the editor's own cost of opening it, paid
  -- when the file is first shown, before anyone selects a range in it
  local ts = vim.treesitter
  if ts and ts.highlighter and ts.highlighter.active and ts.highlighter.active[buf] then ts.get_parser(buf):parse() end
  local eng = nv.engine()
  local asks = {}
  reset_worst()
  local function ask(k, after)
    local st0 = eng:stats()
    local t0 = uv.hrtime()
    vim.cmd(string.format("%d,%dGptossAsk %s", case.line1, case.line2, case.question))
    local cmd_ms = (uv.hrtime() - t0) / 1e6   -- the command itself runs in the main loop
    local a = ask_mod.last
    when(function() return a.last ~= nil end, function()
      local st1 = eng:stats()
      asks[k] = { messages = a.messages, text = table.concat(lines(a.float.buf), "\n"), cmd_ms = cmd_ms,
        prompt_tokens = st1.prompt_tokens - st0.prompt_tokens, prefix_tokens = st1.prefix_tokens - st0.prefix_tokens,
        prefix_hits = st1.prefix_hits - st0.prefix_hits }
      vim.cmd("close")
      api.nvim_set_current_win(vim.fn.win_findbuf(buf)[1])
      after()
    end)
  end
  ask(1, function() ask(2, function()
    res.big = { asks = asks, worst_delay_ms = D.worst(), buffer_lines = api.nvim_buf_line_count(buf) }
    next_step()
  end) end)
end

-- rewrite: a preview, then a decision
local function rewrite_case(case, decide)
  return function(next_step)
    local buf = source(case)
    reset_worst()
    vim.cmd(string.format("%d,%dGptossRewrite %s", case.line1, case.line2, case.instruction))
    local rw = rewrite_mod.last
    when(function() return rw.last ~= nil end, function()
      local r = { preview = lines(rw.float.buf), preview_ft = vim.bo[rw.float.buf].filetype, messages = rw.messages,
        new = rw.new, finish = rw.last.finish_reason, pieces = rw.last.pieces, worst_delay_ms = D.worst(),
        before_decision = lines(buf) }
      decide(r, rw, buf)
      r.preview_closed = not api.nvim_buf_is_valid(rw.float.buf)
      r.after = lines(buf)
      api.nvim_buf_call(buf, function() vim.cmd("undo") end)
      r.after_undo = lines(buf)
      res[case.name] = r
      next_step()
    end)
  end
end

steps[#steps + 1] = rewrite_case(cases.rewrite, function(r, _, buf)
  r.current_is_preview = api.nvim_get_current_buf() == rewrite_mod.last.float.buf
  r.keymaps = { accept = vim.fn.maparg("a", "n", false, true).desc, reject = vim.fn.maparg("r", "n", false, true).desc }
  -- a change below the range just before: an API change in the same
  -- callback, so the rewrite joins its undo block unless it closes it
  api.nvim_buf_set_lines(buf, -2, -1, false, { cases.rewrite.edit_below })
  vim.cmd("GptossAccept")   -- (typed keys would close the block themselves)
end)
steps[#steps + 1] = rewrite_case(cases.reject, function()
  api.nvim_feedkeys("r", "x", false)   -- the preview's reject keymap
end)

-- a chat with the base model, then one switched to the adapter by name
local function chat_case(name, before_send, after, during)
  return function(next_step)
    vim.cmd("enew")
    vim.cmd("GptossChat")
    local chat = nv.chat_of()
    if before_send then before_send(chat) end
    api.nvim_buf_set_lines(chat.buf, chat.user_line, -1, false, { cases.chat.user })
    vim.cmd("GptossChat")
    local watch = uv.new_timer()
    if during then watch:start(1, 1, vim.schedule_wrap(function() if not chat.last then during(chat) end end)) end
    when(function() return chat.last ~= nil end, function()
      watch:stop()
      local win = vim.fn.win_findbuf(chat.buf)[1]
      res[name] = { text = chat.last.text, analysis = chat.last.analysis, adapter = chat.adapter,
        reasoning = chat.reasoning, buffer = lines(chat.buf), pieces = chat.last.pieces }
      if after then after(chat, win, res[name]) end
      next_step()
    end)
  end
end

steps[#steps + 1] = chat_case("chat_base")
steps[#steps + 1] = chat_case("chat_adapter", function() vim.cmd("GptossAdapter attn") end, function()
  -- the same adapter for a second chat (GptossChat adapter=): loaded once
  vim.cmd("enew")
  vim.cmd("GptossChat adapter=attn")
  local n = 0
  for _ in pairs(nv._state.adapters) do n = n + 1 end
  res.adapters_loaded = n
  res.second_chat_adapter = nv.chat_of().adapter
  vim.cmd("GptossAdapter none")
  res.after_none = nv.chat_of().adapter
end)

-- the reasoning: the analysis channel streams into a closed fold
local seen = { samples = 0, closed = 0 }
steps[#steps + 1] = chat_case("chat_reasoning", function()
  nv.config.prefill = { channel = "analysis" }
  vim.cmd("GptossChat reasoning=high")
end, function(chat, win, r)
  nv.config.prefill = { channel = "final" }
  local b = r.buffer
  local open, close
  for i, l in ipairs(b) do
    if l == "<!-- reasoning {{{ -->" and not open then open = i end
    if l == "<!-- }}} -->" and open and not close then close = i end
  end
  r.fold_open_line, r.fold_close_line = open, close
  if open then
    api.nvim_win_call(win, function()
      r.foldclosed = vim.fn.foldclosed(open + 1)
      r.foldclosedend = vim.fn.foldclosedend(open + 1)
      r.foldmethod = vim.wo.foldmethod
    end)
  end
  r.streaming = seen
end, function(chat)
  -- while it streams: every look at the reasoning finds its fold closed
  local b = lines(chat.buf)
  for i, l in ipairs(b) do
    if l == "<!-- reasoning {{{ -->" and b[i + 1] then
      seen.samples = seen.samples + 1
      api.nvim_win_call(vim.fn.win_findbuf(chat.buf)[1], function()
        if vim.fn.foldclosed(i + 1) == i then seen.closed = seen.closed + 1 end
      end)
    end
  end
end)

-- the rewritten lines of hand-made replies
steps[#steps + 1] = function(next_step)
  res.extract = {}
  for i, reply in ipairs(cases.extract) do res.extract[i] = rewrite_mod.extract(reply) end
  next_step()
end

-- :GptossSave and :GptossChat {file} keep the adapter; :checkhealth lists it
steps[#steps + 1] = function(next_step)
  vim.cmd("enew")
  vim.cmd("GptossChat adapter=attn")
  local chat = nv.chat_of()
  chat.messages = { { role = "user", content = "hi" }, { role = "assistant", content = "hello" } }
  vim.cmd("GptossSave " .. out_dir .. "/saved.json")
  vim.cmd("GptossChat " .. out_dir .. "/saved.json")
  local again = nv.chat_of()
  res.saved = { other_buf = again.buf ~= chat.buf, adapter = again.adapter, messages = again.messages }
  vim.cmd("checkhealth gptoss")
  res.health = table.concat(lines(0), "\n")
  -- the help has a tag for every command, option, keymap and highlight group the plugin has
  local want = {}
  for name in pairs(api.nvim_get_commands({})) do if name:match("^Gptoss") then want[#want + 1] = ":" .. name end end
  for _, k in ipairs(require("gptoss.nvim.config").OPTIONS) do want[#want + 1] = "gptoss-opt-" .. k end
  for k in pairs(require("gptoss.nvim.config").DEFAULT_KEYMAPS) do want[#want + 1] = "gptoss-keymap-" .. k end
  for g in pairs(require("gptoss.nvim.ui").HIGHLIGHTS) do
    want[#want + 1] = "hl-" .. g
    if vim.fn.hlexists(g) == 0 then want[#want + 1] = "(not defined) " .. g end
  end
  res.doc = { checked = #want, missing = {} }
  for _, tag in ipairs(want) do
    local found = pcall(vim.cmd, "help " .. vim.fn.escape(tag, " "))
    if not found or not vim.api.nvim_get_current_line():find("*" .. tag .. "*", 1, true) then
      table.insert(res.doc.missing, tag)
    end
  end
  next_step()
end

D.start()
