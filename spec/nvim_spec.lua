-- The Neovim plugin in a real `nvim --headless --clean`, on the tiny
-- checkpoint on the CPU (spec/support/nvim_driver.lua drives it)
local H = require "spec.helpers"
local json = require "gptoss.json"

local nvims = require("support.nvims").list()
local have_luajit_build = io.open("build/luajit/gptoss/core.so", "rb")
if have_luajit_build then have_luajit_build:close() end

-- on Debian 12's Neovim (0.7.2) and a current one (0.10+): support/nvims.lua
for _, nv in ipairs(nvims) do
describe("gptoss in Neovim " .. (nv.version or "(missing)"), function()
  if nv.missing then it("has this Neovim", function() error(nv.missing) end); return end
  if not have_luajit_build then pending("build/luajit/gptoss/core.so is not built (make LUA=luajit)"); return end

  local res
  setup(function()
    local out = H.tmpdir()
    local cmd = string.format("cd %q && GPTOSS_TOKENIZER_DIR=%q GPTOSS_NVIM_OUT=%q GPTOSS_NVIM_MODEL=%q "
      .. "timeout 120 %q --headless --clean --cmd 'set rtp^=.' -c 'luafile spec/support/nvim_driver.lua' >%q 2>&1",
      os.getenv("PWD"), os.getenv("GPTOSS_TOKENIZER_DIR") or "tokenizer", out, H.tiny(), nv.cmd, out .. "/log")
    os.execute(cmd)
    local text = H.read(out .. "/result.json")
    assert(text, "the driver wrote no result: " .. tostring(H.read(out .. "/log")))
    res = json.decode(text)
    if os.getenv("GPTOSS_NVIM_DEBUG") then io.stderr:write(text, "\n") end
  end)

  it("runs every step without an error", function()
    assert.is_nil(res.error)
  end)

  it("streams a chat reply in pieces; the final text is the engine's", function()
    local c = res.chat
    assert.is_true(c.pieces > 1)
    assert.is_true(c.sizes_growing)
    assert.is_true(c.generated > 1)
    -- the prompt opened the final channel: the reply is the engine's text up to harmony's end marker
    local cut = #c.result_text + 1
    for _, m in ipairs { "<|end|>", "<|return|>", "<|call|>" } do cut = math.min(cut, c.result_text:find(m, 1, true) or cut) end
    assert.equals(c.result_text:sub(1, cut - 1), c.final)
    assert.is_true(#c.final > 0)
    assert.is_truthy(c.buffer:find("## assistant\n" .. c.final, 1, true))
    assert.equals(2, c.messages)
  end)

  it("keeps the editor loop responsive while a reply streams", function()
    assert.is_true(res.chat.worst_delay_ms < 50, "worst delay " .. res.chat.worst_delay_ms .. " ms")
  end)

  it("stops mid-stream", function()
    assert.equals("cancelled", res.stop.finish)
    assert.is_true(res.stop.generated > 0 and res.stop.generated < 2000)
    assert.is_truthy(res.status_during:find("generating", 1, true))
  end)

  it("supersedes a request in flight on the same chat", function()
    assert.equals("cancelled", res.supersede.first)
    assert.is_true(res.supersede.second_running)
    assert.same({ "hello there", "again", "two" }, res.supersede.users)
  end)

  it("saves and reopens a chat", function()
    assert.is_false(res.reopen.same_buf)
    assert.equals(res.reopen.saved, res.reopen.reopened)
    assert.is_true(res.reopen.buffer_has_user)
  end)

  it("reports :checkhealth gptoss", function()
    assert.is_truthy(res.health:find("gptoss.core loaded", 1, true))
    assert.is_truthy(res.health:find("model: ", 1, true))
    assert.is_truthy(res.health:find("KV memory in use", 1, true))
  end)

  it("resolves :help gptoss", function()
    assert.equals("gptoss.txt", res.help.file)
    assert.is_truthy(res.help.line:find("*gptoss*", 1, true))
    assert.is_truthy(res.help_stop:find("*:GptossStop*", 1, true))
  end)
end)
end
