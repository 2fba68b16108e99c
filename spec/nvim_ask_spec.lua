-- :GptossAsk, :GptossRewrite, :GptossAdapter and the reasoning fold in a
-- real `nvim --headless --clean` on the tiny checkpoint on the CPU
-- (spec/support/nvim_ask_driver.lua drives it). The oracle for every text
-- is gptoss.chat in this process, greedy, for the messages doc/gptoss.txt
-- says each command sends.
local H = require "spec.helpers"
local json = require "gptoss.json"
local gptoss = require "gptoss"

local nvims = require("support.nvims").list()
local have_luajit_build = io.open("build/luajit/gptoss/core.so", "rb")
if have_luajit_build then have_luajit_build:close() end

local ADAPTER = "spec/fixtures/lora/attn_r4"
local MAX_TOKENS = 40
local CASES = {
  max_tokens = MAX_TOKENS,
  adapter_dir = os.getenv("PWD") .. "/" .. ADAPTER,
  ask = { filetype = "lua", line1 = 2, line2 = 3, question = "What does this function return?",
    lines = { "-- add", "local function add(a, b)", "  return a + b", "end" } },
  rewrite = { name = "rewrite", filetype = "python", line1 = 2, line2 = 4, instruction = "Use a list comprehension",
    lines = { "def squares(n):", "    out = []", "    for i in range(n):", "        out.append(i * i)",
      "    return out" }, edit_below = "    return out  # the squares" },
  reject = { name = "reject", filetype = "python", line1 = 1, line2 = 2, instruction = "Rename x to count",
    lines = { "x = 0", "x += 1", "print(x)" } },
  chat = { user = "hello there" },
  big = { nlines = 6000, line1 = 3001, line2 = 3012, question = "Which variable is largest?" },
  extract = { "a\nb\n\n", "Here:\n```lua\nx = 1\ny = 2\n```\nthanks", "```\ny\n", "one", "```\n```\nz",
    "p\n```\nq\n```\n```\nr\n```" },
}
-- what doc/gptoss.txt's rule makes of each, by hand
local EXTRACTED = { { "a", "b" }, { "x = 1", "y = 2" }, { "y" }, { "one" }, {}, { "q" } }

-- doc/gptoss.txt's prompts, written out here from the documentation
local function quoted(text, lines, ft)
  return text .. "\n\n```" .. ft .. "\n" .. table.concat(lines, "\n") .. "\n```"
end
local REWRITE_INSTRUCTIONS = "Rewrite the text the user gives as the user asks. Reply with the rewritten text alone: "
  .. "no explanation, no code fence."

-- the rewritten lines of a reply, as documented: the inside of its first
-- fenced block (fences: lines starting with ```), else the whole reply,
-- trailing newlines dropped
local function extract(reply)
  local all, inside, fences = {}, {}, 0
  for l in (reply:gsub("\n+$", "") .. "\n"):gmatch("(.-)\n") do
    all[#all + 1] = l
    if l:sub(1, 3) == "```" then fences = fences + 1
    elseif fences == 1 then inside[#inside + 1] = l end
  end
  return fences > 0 and inside or all
end

local function lines_of(text)
  local out = {}
  for l in (text .. "\n"):gmatch("(.-)\n") do out[#out + 1] = l end
  return out
end

-- on Debian 12's Neovim (0.7.2) and a current one (0.10+): support/nvims.lua
for _, nv in ipairs(nvims) do
describe("gptoss ask, rewrite and adapters in Neovim " .. (nv.version or "(missing)"), function()
  if nv.missing then it("has this Neovim", function() error(nv.missing) end); return end
  if not have_luajit_build then pending("build/luajit/gptoss/core.so is not built (make LUA=luajit)"); return end

  local res, model, adapter
  local function oracle(messages, opts)
    local o = { max_tokens = MAX_TOKENS, temperature = 0, prefill = { channel = "final" }, reasoning = "low" }
    for k, v in pairs(opts or {}) do o[k] = v end
    return gptoss.chat(model, messages, o)
  end

  setup(function()
    local out = H.tmpdir()
    H.write(out .. "/cases.json", json.encode_compact(CASES))
    local cmd = string.format("cd %q && GPTOSS_TOKENIZER_DIR=%q GPTOSS_NVIM_OUT=%q GPTOSS_NVIM_IN=%q GPTOSS_NVIM_MODEL=%q "
      .. "timeout 120 %q --headless --clean --cmd 'set rtp^=.' -c 'luafile spec/support/nvim_ask_driver.lua' >%q 2>&1",
      os.getenv("PWD"), os.getenv("GPTOSS_TOKENIZER_DIR") or "tokenizer", out, out .. "/cases.json", H.tiny(), nv.cmd, out .. "/log")
    os.execute(cmd)
    local text = H.read(out .. "/result.json")
    assert(text, "the driver wrote no result: " .. tostring(H.read(out .. "/log")))
    res = json.decode(text)
    if os.getenv("GPTOSS_NVIM_DEBUG") then io.stderr:write(text, "\n") end
    model = assert(gptoss.load(H.tiny(), { threads = 1 }))
    adapter = assert(gptoss.adapter.load(ADAPTER))
  end)

  teardown(function() if model then model:close() end end)

  it("runs every step without an error", function()
    assert.is_nil(res.error)
  end)

  it("loads the model off the main loop on the first command", function()
    assert.is_false(res.load.engine_after_command)
    assert.is_truthy(res.load.status:find("^gptoss: loading"))
    -- gptoss.load holds a thread about 140 ms on the tiny model: not this one
    assert.is_true(res.load.worst_delay_ms < 50, "worst delay " .. res.load.worst_delay_ms .. " ms")
  end)

  it(":GptossAsk streams gptoss.chat's answer into a float", function()
    local c, a = CASES.ask, res.ask
    local msg = quoted(c.question, { c.lines[2], c.lines[3] }, "lua")
    assert.same({ { role = "user", content = msg } }, a.messages)
    local want = oracle({ { role = "user", content = msg } })
    assert.is_true(#want.final > 0)
    assert.equals(want.final, a.text)
    assert.is_true(a.float)
    assert.is_true(a.pieces > 1)
    assert.is_true(a.sizes_growing)
    assert.is_true(a.source_unchanged)
    assert.is_true(a.float_closed)
  end)

  it("keeps the editor loop responsive while an answer streams", function()
    assert.is_true(res.ask.worst_delay_ms < 50, "worst delay " .. res.ask.worst_delay_ms .. " ms")
  end)

  it("a second ask on the same buffer supersedes the first", function()
    local s = res.ask_supersede
    assert.equals("cancelled", s.first)
    assert.is_true(s.first_closed)
    assert.is_true(s.second_running)
    assert.equals("again", s.second_message)   -- no range: the question alone
    assert.equals("cancelled", s.second)       -- :GptossStop
  end)

  it("asks about a range of a 6,000-line file: the range alone is sent, the same context again is a prefix hit", function()
    local c, b = CASES.big, res.big
    assert.equals(c.nlines, b.buffer_lines)
    local range = {}
    for i = c.line1, c.line2 do range[#range + 1] = string.format("local v%d = %d  -- line %d", i, i * 7, i) end
    local msg = { { role = "user", content = quoted(c.question, range, "lua") } }
    local first, second = b.asks[1], b.asks[2]
    assert.same(msg, first.messages)
    assert.same(msg, second.messages)
    -- the prompt's length from gptoss.chat's own rendering in this process
    local want = oracle(msg)
    assert.equals(want.final, first.text)
    assert.equals(want.final, second.text)
    local n = #want.prompt_ids
    assert.equals(n, first.prompt_tokens)
    assert.equals(n, second.prompt_tokens)
    -- the second reuses all of the first's prompt but the last token, which
    -- is fed again for its logits
    assert.equals(1, second.prefix_hits)
    assert.is_true(second.prefix_tokens >= n - 1 and second.prefix_tokens < n, second.prefix_tokens .. " of " .. n .. " prompt tokens reused")
    assert.is_true(first.cmd_ms < 50 and second.cmd_ms < 50, "the commands took " .. first.cmd_ms .. " and " .. second.cmd_ms .. " ms")
    assert.is_true(b.worst_delay_ms < 50, "worst delay " .. b.worst_delay_ms .. " ms")
  end)

  it(":GptossRewrite previews the diff and applies gptoss.chat's rewrite as one undo step", function()
    local c, r = CASES.rewrite, res.rewrite
    local orig = { c.lines[2], c.lines[3], c.lines[4] }
    local msg = quoted(c.instruction, orig, "python")
    assert.same({ { role = "user", content = msg } }, r.messages)
    local want = oracle({ { role = "user", content = msg } }, { instructions = REWRITE_INSTRUCTIONS })
    local new = extract(want.final)
    assert.same(new, r.new)
    -- the preview: a unified diff of the range, numbered as lines of the buffer
    assert.equals("diff", r.preview_ft)
    assert.is_truthy(r.preview[1]:find("^%-%-%- "))
    assert.is_truthy(r.preview[2]:find("^%+%+%+ "))
    assert.is_truthy(r.preview[3]:find("^@@ %-2,3 %+2"))
    local minus, plus = {}, {}
    for i = 4, #r.preview do
      local l = r.preview[i]
      if l:sub(1, 1) == "-" then minus[#minus + 1] = l:sub(2) elseif l:sub(1, 1) == "+" then plus[#plus + 1] = l:sub(2) end
    end
    assert.same(orig, minus)   -- the tiny model's noise shares no line with the original
    assert.same(new, plus)
    assert.is_true(r.current_is_preview)
    assert.same({ accept = "gptoss: accept the rewrite", reject = "gptoss: reject the rewrite" }, r.keymaps)
    assert.same(c.lines, r.before_decision)
    -- accepted: the range replaced by the rewrite
    local want_buf = { c.lines[1] }
    for _, l in ipairs(new) do want_buf[#want_buf + 1] = l end
    want_buf[#want_buf + 1] = c.edit_below
    assert.same(want_buf, r.after)
    assert.is_true(r.preview_closed)
    -- one undo gives the range back and keeps the edit made just before
    local undone = { c.lines[1], c.lines[2], c.lines[3], c.lines[4], c.edit_below }
    assert.same(undone, r.after_undo)
  end)

  it("rejecting with the preview's keymap leaves the buffer as it was", function()
    local c, r = CASES.reject, res.reject
    assert.is_truthy(r.finish == "stop" or r.finish == "length", r.finish)
    assert.is_truthy(r.new)
    assert.same(c.lines, r.after)
    assert.is_true(r.preview_closed)
  end)

  it("takes the rewritten lines from a reply as documented", function()
    assert.same(EXTRACTED, res.extract)
    for i, reply in ipairs(CASES.extract) do assert.same(EXTRACTED[i], extract(reply)) end   -- and this file's
  end)

  it("keeps the editor loop responsive while a rewrite streams", function()
    assert.is_true(res.rewrite.worst_delay_ms < 50, "worst delay " .. res.rewrite.worst_delay_ms .. " ms")
  end)

  it(":GptossAdapter switches a chat's adapter: gptoss.chat's text with the adapter", function()
    local msgs = { { role = "user", content = CASES.chat.user } }
    local base = oracle(msgs)
    local with = oracle(msgs, { adapter = adapter })
    assert.are_not.equal(base.final, with.final)   -- the adapter changes the greedy text
    assert.equals(base.final, res.chat_base.text)
    assert.is_nil(res.chat_base.adapter)
    assert.equals(with.final, res.chat_adapter.text)
    assert.equals("attn", res.chat_adapter.adapter)
    -- the buffer shows it under the heading
    local buf = table.concat(res.chat_adapter.buffer, "\n")
    assert.is_truthy(buf:find("## assistant\n" .. with.final .. "\n\n## user\n", 1, true))
    -- a second chat with adapter=attn: the same directory is loaded once
    assert.equals("attn", res.second_chat_adapter)
    assert.equals(1, res.adapters_loaded)
    assert.is_nil(res.after_none)
  end)

  it(":GptossSave saves a chat :GptossChat {file} reopens, its adapter with it; :checkhealth lists the adapters", function()
    assert.is_true(res.saved.other_buf)
    assert.equals("attn", res.saved.adapter)
    assert.same({ { role = "user", content = "hi" }, { role = "assistant", content = "hello" } }, res.saved.messages)
    assert.is_truthy(res.health:find("adapter attn: " .. CASES.adapter_dir .. " (loaded)", 1, true))
  end)

  it(":help has a tag for every command, option, keymap and highlight group", function()
    assert.is_true(res.doc.checked >= 8 + 10 + 4 + 5)
    assert.same({}, res.doc.missing)
  end)

  it("streams the reasoning into a fold, closed by default; reasoning=high reaches the prompt", function()
    local r = res.chat_reasoning
    assert.equals("high", r.reasoning)
    local msgs = { { role = "user", content = CASES.chat.user } }
    local want = oracle(msgs, { reasoning = "high", prefill = { channel = "analysis" } })
    local low = oracle(msgs, { reasoning = "low", prefill = { channel = "analysis" } })
    assert.are_not.equal(low.analysis, want.analysis)
    assert.is_true(#want.analysis > 0)
    assert.equals(want.analysis, r.analysis)
    assert.equals(want.final or "", r.text)
    -- the buffer: the heading, the fold's markers around the analysis, the final text
    assert.is_truthy(r.fold_open_line and r.fold_close_line)
    assert.equals("## assistant", r.buffer[r.fold_open_line - 1])
    local inside = {}
    for i = r.fold_open_line + 1, r.fold_close_line - 1 do inside[#inside + 1] = r.buffer[i] end
    assert.same(lines_of(want.analysis), inside)
    assert.equals("marker", r.foldmethod)
    assert.equals(r.fold_open_line, r.foldclosed)          -- closed: hidden by default
    assert.equals(r.fold_close_line, r.foldclosedend)
    -- and while the reasoning streamed
    assert.is_true(r.streaming.samples > 0)
    assert.equals(r.streaming.samples, r.streaming.closed)
  end)
end)
end
