-- gptoss.progress: what a bar writes on a terminal and elsewhere, with a
-- hand-driven clock; ETAs computed by hand.
local progress = require "gptoss.progress"

local function sink()
  local s = { text = "" }
  function s.write(self, ...) for _, x in ipairs { ... } do self.text = self.text .. x end end
  function s.flush() end
  return s
end

describe("progress", function()
  it("formats durations", function()
    assert.are.equal("12s", progress.duration(12.4))
    assert.are.equal("3m05s", progress.duration(185))
    assert.are.equal("1h02m", progress.duration(3720))
    assert.are.equal("?", progress.duration(0 / 0))
  end)

  it("writes a plain line per interval off a terminal, with the ETA, and a last line at the end", function()
    local now, out = 0, sink()
    local bar = progress.new { label = "train", total = 20, unit = "steps", stream = out, tty = false, interval = 10,
                               clock = function() return now end }
    now = 2; bar:update(1, { { "loss", "2.5" } })          -- the first update always writes
    now = 5; bar:update(2)                                 -- within the interval: nothing
    now = 12; bar:update(5, { { "loss", "2.0" }, { "lr", "1e-4" } })   -- 5 in 12 s: 15 left take 36 s
    now = 40; bar:update(20)
    assert.are.equal("train 1/20 steps  loss 2.5  ETA 38s\n" ..
                     "train 5/20 steps  loss 2.0, lr 1e-4  ETA 36s\n" ..
                     "train 20/20 steps  in 40s\n", out.text)
  end)

  it("redraws one line in place on a terminal, with a bar, and ends it with a newline", function()
    local now, out = 0, sink()
    local bar = progress.new { label = "bench", total = 4, stream = out, tty = true, clock = function() return now end }
    bar.width = 60
    now = 1; bar:update(1)
    now = 1.05; bar:update(2)                             -- redraws at most 10 times a second
    now = 2; bar:update(4)
    bar:finish()
    local lines = {}
    for l in out.text:gmatch("\r([^\r]*)") do lines[#lines + 1] = l end
    assert.are.equal(2, #lines)
    assert.matches("^bench %[#+%.+%] 1/4  ETA 3s\27%[K$", lines[1])
    assert.matches("^bench %[#+%] 4/4  in 2s\27%[K\n$", lines[2])
    assert.is_nil(out.text:find("\n", 1, true) < #out.text and true or nil)
  end)

  it("loads a checkpoint with a bar of the megabytes read, as the safetensors headers count them", function()
    local H = require "helpers"
    local dir = H.tiny()
    local bytes = H.tensor_bytes(dir)
    local mb = math.floor(bytes / 1e6 + 0.5)
    local out = sink()
    local m = assert(progress.load(dir, { threads = 1 }, { stream = out, tty = false }))
    assert.equal(201088, m.config.vocab_size)
    assert.matches("^load " .. dir:gsub("%p", "%%%0") .. " " .. mb .. "/" .. mb .. " MB  in %d+s\n$", out.text)
    m:close()
    local none, err = progress.load(dir .. "/missing", nil, { stream = out, tty = false })
    assert.is_nil(none)
    assert.matches("not a directory", err)
  end)

  it("refuses bad options, naming them", function()
    for _, case in ipairs {
      { { totl = 3 }, "progress.new: unknown option 'totl'" },
      { { total = -1 }, "progress.new: total must be a finite number >= 0 (got -1)" },
      { { total = 0 / 0 }, "progress.new: total must be a finite number >= 0 (got " },
      { { label = 5 }, "progress.new: label must be a string (got 5)" },
      { { tty = "yes" }, "progress.new: tty must be a boolean (got yes)" },
      { { interval = -2 }, "progress.new: interval must be a finite number >= 0 (got -2)" },
      { { clock = 1 }, "progress.new: clock must be a function (got 1)" },
      { { stream = "stderr" }, "progress.new: stream must be a file or a table with write and flush (got stderr)" },
      { 7, "progress.new: opts must be a table (got 7)" },
    } do
      local ok, err = pcall(progress.new, case[1])
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(case[2], 1, true), tostring(err))
    end
  end)

  it("says where a bar stopped short", function()
    local out = sink()
    local bar = progress.new { label = "trial 3", total = 10, stream = out, tty = false, clock = function() return 0 end }
    bar:update(4)
    bar:finish()
    assert.matches("\ntrial 3 4/10  stopped\n$", out.text)
  end)
end)
