--- gptoss.nvim.ui: what the plugin draws: streamed text, floating windows,
-- status hints, the reasoning folds and the highlight groups. Called only
-- from the main loop (vim.schedule), never from a uv callback.
local config = require "gptoss.nvim.config"
local api = vim.api

local M = {}

M.ns = api.nvim_create_namespace("gptoss")

--- the highlight groups, linked by default (a colorscheme may set them)
M.HIGHLIGHTS = {
  GptossStatus = "Comment",      -- status hints in floats and messages
  GptossReasoning = "Comment",   -- the reasoning (analysis channel) in chat buffers
  GptossDiffAdd = "DiffAdd",     -- added lines of a rewrite's preview
  GptossDiffDelete = "DiffDelete", -- removed lines of a rewrite's preview
  GptossDiffHunk = "DiffChange", -- hunk headers of a rewrite's preview
}

function M.define_highlights()
  for group, link in pairs(M.HIGHLIGHTS) do vim.cmd("highlight default link " .. group .. " " .. link) end
end

--- text split at newlines into buffer lines
function M.lines(text) return vim.split(text, "\n", { plain = true }) end

--- appends text at the end of buf (it may hold newlines)
function M.append(buf, text)
  if text == "" or not api.nvim_buf_is_valid(buf) then return end
  local last = api.nvim_buf_line_count(buf)
  local tail = api.nvim_buf_get_lines(buf, last - 1, last, false)[1]
  api.nvim_buf_set_lines(buf, last - 1, last, false, M.lines(tail .. text))
end

--- starts a new line at the end of buf unless its last line is empty
function M.new_line(buf)
  local last = api.nvim_buf_line_count(buf)
  if api.nvim_buf_get_lines(buf, last - 1, last, false)[1] ~= "" then M.append(buf, "\n") end
end

--- the whole text of buf
function M.text(buf) return table.concat(api.nvim_buf_get_lines(buf, 0, -1, false), "\n") end

-- {====================================================== floats
--- a scratch buffer in a floating window, entered. opts: filetype, title
-- (shown as the first status hint), height (the most lines). The window
-- closes with the buffer (bufhidden=wipe). -> { buf, win }
function M.float(opts)
  local buf = api.nvim_create_buf(false, true)
  vim.bo[buf].bufhidden = "wipe"
  vim.bo[buf].filetype = opts.filetype or "markdown"
  local cols, rows = vim.o.columns, vim.o.lines
  local width = math.max(20, math.min(100, math.floor(cols * 0.7), cols - 4))
  local max_height = math.max(3, math.min(opts.height or 30, rows - 6))
  local win = api.nvim_open_win(buf, true, { relative = "editor", style = "minimal", border = "rounded",
    width = width, height = 1, row = math.floor((rows - max_height) / 2) - 1, col = math.floor((cols - width) / 2) })
  vim.wo[win].wrap = true
  vim.wo[win].linebreak = true
  local f = { buf = buf, win = win, max_height = max_height }
  if opts.title then M.status(f, opts.title) end
  return f
end

--- grows the float to its text (up to its max_height)
function M.fit(f)
  if not api.nvim_win_is_valid(f.win) then return end
  local width = api.nvim_win_get_width(f.win)
  local rows = 0
  for _, l in ipairs(api.nvim_buf_get_lines(f.buf, 0, -1, false)) do
    rows = rows + math.max(1, math.ceil(vim.fn.strdisplaywidth(l) / width))
  end
  api.nvim_win_set_height(f.win, math.max(1, math.min(rows, f.max_height)))
end

--- a status hint after the float's first line (virtual text: never part of
-- the buffer's text); nil clears it
function M.status(f, text)
  if not api.nvim_buf_is_valid(f.buf) then return end
  if f.status_mark then api.nvim_buf_del_extmark(f.buf, M.ns, f.status_mark); f.status_mark = nil end
  if text then
    f.status_mark = api.nvim_buf_set_extmark(f.buf, M.ns, 0, 0, { virt_text = { { text, "GptossStatus" } },
      virt_text_pos = "eol" })
  end
end

--- an on_delta (gptoss.chat's) streaming the final channel's text into the
-- float f, its status hint cleared at the first piece
function M.final_into(f)
  local started = false
  return function(d, channel, recipient)
    if recipient or (channel ~= "final" and channel ~= nil) or not api.nvim_buf_is_valid(f.buf) then return end
    if not started then started = true; M.status(f, nil) end
    M.append(f.buf, d)
    M.fit(f)
  end
end

--- what a reply's end says when it is not the model's own: cut at
-- max_tokens, cancelled, an error; nil for a reply that ended itself
function M.finish_note(res)
  if res.error then return "gptoss: " .. tostring(res.error) end
  if res.finish_reason == "length" then return "gptoss: cut at max_tokens" end
  if res.finish_reason == "cancelled" then return "gptoss: cancelled" end
  if res.finish_reason ~= "stop" then return "gptoss: " .. tostring(res.finish_reason) end
end

function M.close(f)
  if f.win and api.nvim_win_is_valid(f.win) then api.nvim_win_close(f.win, true) end
  if f.buf and api.nvim_buf_is_valid(f.buf) then api.nvim_buf_delete(f.buf, { force = true }) end
end

--- maps keymap `name` (config's keymaps) in normal mode, buffer-local
function M.map(buf, name, fn, desc)
  local lhs = config.key(name)
  if lhs then vim.keymap.set("n", lhs, fn, { buffer = buf, nowait = true, desc = "gptoss: " .. desc }) end
end

--- runs fn when buf is wiped out (its window closed or :bwipeout)
function M.on_wipe(buf, fn)
  api.nvim_create_autocmd("BufWipeout", { buffer = buf, once = true, callback = function() fn() end })
end
-- }======================================================

-- {====================================================== reasoning folds
-- The reasoning sits between markers (HTML comments: the chat stays plain
-- markdown); foldmethod=marker with foldlevel=0 keeps it closed.
M.FOLD_OPEN, M.FOLD_CLOSE = "<!-- reasoning {{{ -->", "<!-- }}} -->"

--- folds the reasoning in every window showing buf, now and later
function M.fold_reasoning(buf)
  local function set(win)
    vim.wo[win].foldmethod = "marker"
    vim.wo[win].foldlevel = 0
    vim.wo[win].foldenable = true
  end
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do set(win) end
  api.nvim_create_autocmd("BufWinEnter", { buffer = buf, callback = function() set(api.nvim_get_current_win()) end })
end

--- highlights lines first..last (0-based, inclusive) of buf as reasoning
function M.mark_reasoning(buf, first, last, id)
  local tail = api.nvim_buf_get_lines(buf, last, last + 1, false)[1] or ""
  return api.nvim_buf_set_extmark(buf, M.ns, first, 0, { id = id, end_row = last, end_col = #tail,
    hl_group = "GptossReasoning", hl_eol = true })
end
-- }======================================================

return M
