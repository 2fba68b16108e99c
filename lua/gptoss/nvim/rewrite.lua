--- gptoss.nvim.rewrite: :GptossRewrite, lines of a buffer rewritten as
-- instructed. The rewrite streams into a floating preview, which then shows
-- the unified diff; accepting applies it as one undo step.
local config = require "gptoss.nvim.config"
local job = require "gptoss.nvim.job"
local ui = require "gptoss.nvim.ui"
local ask = require "gptoss.nvim.ask"
local api = vim.api
local unpack = table.unpack or unpack   -- LuaJIT's is a global

local M = {}

--- the developer instructions of a rewrite
M.INSTRUCTIONS = "Rewrite the text the user gives as the user asks. Reply with the rewritten text alone: "
  .. "no explanation, no code fence."

local pending = {}   -- source buffer -> its rewrite (in flight, or waiting for accept or reject)
M.pending = pending

--- the lines a reply stands for: the inside of its first fenced block if
-- it has one (a line starting with ```), else the whole reply; trailing
-- newlines dropped
function M.extract(reply)
  local lines = ui.lines((reply:gsub("\n+$", "")))
  local first
  for i, l in ipairs(lines) do
    if l:sub(1, 3) == "```" then
      if first then return { unpack(lines, first + 1, i - 1) } end
      first = i
    end
  end
  if first then return { unpack(lines, first + 1) } end
  return lines
end

--- the unified diff of old and new lines, its hunks numbered as lines of
-- the buffer (the range starts at line1)
function M.diff(old, new, line1, name)
  local d = ((vim.text and vim.text.diff) or vim.diff)(table.concat(old, "\n") .. "\n", table.concat(new, "\n") .. "\n", { result_type = "unified" })
  local out = { "--- " .. name, "+++ " .. name .. " (rewritten)" }
  for _, l in ipairs(ui.lines((d:gsub("\n$", "")))) do
    if l:sub(1, 2) == "@@" then
      l = l:gsub("^@@ %-(%d+)(%S*) %+(%d+)(%S*) @@", function(a, ac, b, bc)
        return string.format("@@ -%d%s +%d%s @@", tonumber(a) + line1 - 1, ac, tonumber(b) + line1 - 1, bc)
      end)
    end
    if l ~= "" then out[#out + 1] = l end
  end
  if #out == 2 then out[3] = "(no change)" end
  return out
end

-- colours the diff without relying on syntax highlighting
local function mark_diff(buf, lines)
  for i, l in ipairs(lines) do
    local c = l:sub(1, 1)
    local group = (i > 2 and (c == "+" and "GptossDiffAdd" or c == "-" and "GptossDiffDelete")) or
      (l:sub(1, 2) == "@@" and "GptossDiffHunk") or nil
    if group then api.nvim_buf_add_highlight(buf, ui.ns, group, i - 1, 0, -1) end
  end
end

local function close(rw)
  if pending[rw.source] == rw then pending[rw.source] = nil end
  rw.closed = true
  if rw.job then rw.job:cancel() end
  ui.close(rw.float)
end

--- rewrites lines line1..line2 (1-based, inclusive) of buf as instructed
-- -> the rewrite: { float, job, messages, original, new (when done) }
function M.rewrite(instruction, buf, line1, line2)
  local old = pending[buf]
  if old then close(old) end
  local original = api.nvim_buf_get_lines(buf, line1 - 1, line2, false)
  local messages = { { role = "user", content = ask.message(instruction, original, vim.bo[buf].filetype) } }
  local f = ui.float { filetype = "markdown" }
  local rw = { float = f, messages = messages, source = buf, line1 = line1, line2 = line2, original = original,
    tick = api.nvim_buf_get_changedtick(buf) }
  pending[buf], M.last = rw, rw
  ui.status(f, "gptoss: rewriting...")
  local j, err = job.chat(messages, { adapter = config.values.adapter, instructions = M.INSTRUCTIONS, buf = buf },
    ui.final_into(f),
    function(res)
      rw.last = res
      if rw.closed then return end
      if res.finish_reason == "cancelled" or res.finish_reason == "error" then
        ui.status(f, ui.finish_note(res))
        if pending[buf] == rw then pending[buf] = nil end
        return
      end
      rw.new = M.extract(res.final)
      local name = vim.fn.fnamemodify(api.nvim_buf_get_name(buf), ":~:.")
      local lines = M.diff(original, rw.new, line1, name ~= "" and name or ("buffer " .. buf))
      vim.bo[f.buf].filetype = "diff"
      api.nvim_buf_set_lines(f.buf, 0, -1, false, lines)
      mark_diff(f.buf, lines)
      ui.fit(f)
      local a, r = config.key("accept"), config.key("reject")
      local note = ui.finish_note(res)
      ui.status(f, (note and note .. "; " or "gptoss: ")
        .. ((a and r) and string.format("%s accepts, %s rejects", a, r) or ":GptossAccept or :GptossReject"))
    end)
  if not j then pending[buf] = nil; ui.close(f); error("gptoss.nvim: " .. tostring(err), 0) end
  rw.job = j
  j.on_superseded = function() close(rw) end
  local function say(ok, why) if not ok then vim.notify("gptoss: " .. why, vim.log.levels.WARN) end end
  ui.map(f.buf, "accept", function() say(M.accept(rw)) end, "accept the rewrite")
  ui.map(f.buf, "reject", function() say(M.reject(rw)) end, "reject the rewrite")
  ui.map(f.buf, "close", function() say(M.reject(rw)) end, "reject the rewrite")
  ui.on_wipe(f.buf, function() if not rw.closed then close(rw) end end)
  return rw
end

--- the rewrite a command means from the current buffer: the preview's own,
-- else the current buffer's, else nil
function M.current()
  local cur = api.nvim_get_current_buf()
  for _, rw in pairs(pending) do if rw.float.buf == cur then return rw end end
  return pending[cur]
end

--- applies a finished rewrite with one nvim_buf_set_lines: one undo step.
-- -> true | nil, message
function M.accept(rw)
  rw = rw or M.current()
  if not rw or rw.closed then return nil, "no rewrite to accept" end
  if not rw.new then return nil, "the rewrite is not finished" end
  local buf = rw.source
  if not api.nvim_buf_is_valid(buf) then close(rw); return nil, "its buffer is gone" end
  if api.nvim_buf_get_changedtick(buf) ~= rw.tick then
    local now = api.nvim_buf_get_lines(buf, rw.line1 - 1, rw.line2, false)
    if not vim.deep_equal(now, rw.original) then
      return nil, "the lines changed since the rewrite began: reject it and rewrite again"
    end
  end
  close(rw)
  api.nvim_buf_call(buf, function()
    -- setting 'undolevels' closes the undo block: the rewrite is a step of its own
    vim.cmd("let &l:undolevels = &l:undolevels")
    api.nvim_buf_set_lines(buf, rw.line1 - 1, rw.line2, false, rw.new)
    vim.cmd("let &l:undolevels = &l:undolevels")
  end)
  rw.accepted = true
  return true
end

--- closes the preview and leaves the buffer as it is (a rewrite in flight
-- is cancelled)
function M.reject(rw)
  rw = rw or M.current()
  if not rw or rw.closed then return nil, "no rewrite to reject" end
  close(rw)
  rw.rejected = true
  return true
end

return M
