--- gptoss.nvim.ask: :GptossAsk, a question about lines of a buffer; the
-- answer streams into a floating window.
local config = require "gptoss.nvim.config"
local job = require "gptoss.nvim.job"
local ui = require "gptoss.nvim.ui"
local api = vim.api

local M = {}

--- the user message of a question about lines (nil: no lines): the
-- question, a blank line, then the lines fenced with the buffer's filetype
function M.message(question, lines, filetype)
  if not lines then return question end
  return question .. "\n\n```" .. (filetype or "") .. "\n" .. table.concat(lines, "\n") .. "\n```"
end

--- asks about lines line1..line2 (1-based, inclusive) of buf; line1 nil:
-- the question alone. -> the ask: { float, job, messages, last }
function M.ask(question, buf, line1, line2)
  local lines = line1 and api.nvim_buf_get_lines(buf, line1 - 1, line2, false) or nil
  local messages = { { role = "user", content = M.message(question, lines, vim.bo[buf].filetype) } }
  local f = ui.float { filetype = "markdown" }
  local ask = { float = f, messages = messages, source = buf }
  M.last = ask
  ui.status(f, "gptoss: thinking...")
  local j, err = job.chat(messages, { adapter = config.values.adapter, buf = buf }, ui.final_into(f),
    function(res)
      ask.last = res
      if not api.nvim_buf_is_valid(f.buf) then return end
      -- the answer as parsed at its end (gptoss.chat's final)
      api.nvim_buf_set_lines(f.buf, 0, -1, false, ui.lines(res.final))
      ui.fit(f)
      ui.status(f, ui.finish_note(res))
    end)
  if not j then ui.close(f); error("gptoss.nvim: " .. tostring(err), 0) end
  ask.job = j
  j.on_superseded = function() ui.close(f) end
  ui.map(f.buf, "close", function() ui.close(f) end, "close the answer")
  ui.on_wipe(f.buf, function() j:cancel() end)   -- closing the float stops its answer
  return ask
end

return M
