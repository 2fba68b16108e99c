--- gptoss.progress: progress bars on stderr.
--
--   local progress = require "gptoss.progress"
--   local bar = progress.new { label = "train", total = 60, unit = "step" }
--   for step = 1, 60 do ...; bar:update(step, { loss = "2.31", lr = "2.0e-04" }) end
--   bar:finish()
--
-- On a terminal (the stream is stderr, and stderr is a tty) the bar redraws
-- one line in place, at most 10 times a second. Anywhere else (a log file,
-- a pipe, CI) it writes a plain line every `interval` seconds (default 10;
-- 0 writes every update) and one at the end, so logs stay readable.
-- GPTOSS_PROGRESS=0 silences every bar; GPTOSS_PROGRESS=lines forces
-- plain lines on a terminal too.
local core = require "gptoss.core"

local M = {}

local Bar = {}
Bar.__index = Bar

-- the non-empty parts, two spaces apart
local function join(parts)
  local t = {}
  for _, p in ipairs(parts) do if p ~= "" then t[#t + 1] = p end end
  return table.concat(t, "  ")
end

--- seconds as 1h02m, 3m05s or 12s
function M.duration(s)
  if s ~= s or s == math.huge or s < 0 then return "?" end
  s = math.floor(s + 0.5)
  local f = math.floor
  if s >= 3600 then return string.format("%dh%02dm", f(s / 3600), f(s % 3600 / 60)) end
  if s >= 60 then return string.format("%dm%02ds", f(s / 60), s % 60) end
  return string.format("%ds", s)
end

--- a new bar; opts: label, total (nil: a counter without a bar), unit,
-- stream (default io.stderr), tty (default: whether the stream is
-- stderr and stderr a terminal), interval (seconds between plain lines),
-- clock (a function giving seconds; default gptoss.core.clock)
local NEW_KEYS = { label = true, total = true, unit = true, stream = true, tty = true, interval = true, clock = true,
  first = true }

function M.new(opts)
  local C = require "gptoss.check"
  local fn = "progress.new"
  opts = C.options(opts, fn, NEW_KEYS)
  if opts.label ~= nil then C.str(opts.label, fn, "label") end
  if opts.total ~= nil then C.num(opts.total, fn, "total", 0) end
  if opts.unit ~= nil then C.str(opts.unit, fn, "unit") end
  if opts.tty ~= nil then C.bool(opts.tty, fn, "tty") end
  if opts.interval ~= nil then C.num(opts.interval, fn, "interval", 0) end
  if opts.clock ~= nil then C.func(opts.clock, fn, "clock") end
  if opts.first ~= nil then C.num(opts.first, fn, "first", 0) end
  if opts.stream ~= nil and not (type(opts.stream) == "table" or io.type(opts.stream) == "file") then
    C.fail(fn, "stream", "a file or a table with write and flush", opts.stream)
  end
  local mode = os.getenv("GPTOSS_PROGRESS")
  local stream = opts.stream or io.stderr
  local tty = opts.tty
  if tty == nil then tty = stream == io.stderr and core.isatty(2) end
  if mode == "lines" then tty = false end
  local clock = opts.clock or core.clock
  local now = clock()
  return setmetatable({
    label = opts.label or "", total = opts.total, unit = opts.unit or "", stream = stream, tty = tty,
    interval = opts.interval or 10, clock = clock, start = now, last_draw = -math.huge, done = 0,
    silent = mode == "0", width = tty and core.term_columns(2) or 80, first = opts.first or 0,
  }, Bar)
end

-- the fields as " k v" pairs, in the order given (a list of { k, v }) or
-- sorted by name (a table)
local function fields_text(fields)
  if not fields then return "" end
  local parts = {}
  if fields[1] then
    for _, kv in ipairs(fields) do parts[#parts + 1] = kv[1] .. " " .. tostring(kv[2]) end
  else
    local keys = {}
    for k in pairs(fields) do keys[#keys + 1] = k end
    table.sort(keys)
    for _, k in ipairs(keys) do parts[#parts + 1] = k .. " " .. tostring(fields[k]) end
  end
  return table.concat(parts, ", ")
end

--- the line for `done` units at time t (what the bar draws), without the bar itself
function Bar:text(done, fields, t)
  local elapsed = t - self.start
  local head = self.label ~= "" and self.label .. " " or ""
  local count
  if self.total then
    count = string.format("%d/%d%s", done, self.total, self.unit ~= "" and " " .. self.unit or "")
  else
    count = string.format("%d%s", done, self.unit ~= "" and " " .. self.unit or "")
  end
  local tail = fields_text(fields)
  local rate_done = done - self.first              -- what this run did (a resumed run starts past 0)
  local eta = ""
  if self.total and rate_done > 0 and done < self.total then
    eta = "ETA " .. M.duration(elapsed / rate_done * (self.total - done))
  elseif self.total and done >= self.total then
    eta = "in " .. M.duration(elapsed)
  end
  return head, count, tail, eta
end

--- moves the bar to `done` units with the given fields (a table, or a
-- list of { name, value } pairs to keep their order)
function Bar:update(done, fields)
  self.done, self.fields = done, fields
  if self.silent then return end
  local t = self.clock()
  local final = self.total and done >= self.total
  if self.tty then
    if t - self.last_draw < 0.1 and not final then return end
  elseif t - self.last_draw < self.interval and not final then
    return
  end
  self.last_draw = t
  local head, count, tail, eta = self:text(done, fields, t)
  local rest = join { count, tail, eta }
  if self.tty then
    local bar = ""
    local room = self.width - #head - #rest - 4
    if self.total and self.total > 0 and room >= 10 then
      local n = math.min(room, 40)
      local fill = math.floor(n * math.min(1, done / self.total) + 0.5)
      bar = "[" .. string.rep("#", fill) .. string.rep(".", n - fill) .. "] "
    end
    local line = (head .. bar .. rest):sub(1, self.width - 1)
    self.stream:write("\r", line, "\27[K")
    self.drawn = true
  else
    self.stream:write(head, rest, "\n")
  end
  self.stream:flush()
end

--- a final line (and, on a terminal, the newline that keeps the bar)
function Bar:finish(fields)
  if self.silent then return end
  if fields then self.fields = fields end
  if self.total and self.done < self.total then
    local head, count, tail = self:text(self.done, self.fields, self.clock())
    local line = head .. join { count, tail, "stopped" }
    if self.tty then self.stream:write("\r", line, "\27[K\n") else self.stream:write(line, "\n") end
  elseif self.tty and self.drawn then
    self.stream:write("\n")
  elseif not self.tty and self.total == nil then
    local head, count, tail = self:text(self.done, self.fields, self.clock())
    self.stream:write(head, join { count, tail }, "\n")
  end
  self.stream:flush()
end

--- gptoss.load with a bar of the weights' megabytes read (gptoss.load_async
-- does the load; CUDA counts as it uploads, the CPU maps its checkpoint
-- and counts it at once): the Model, or nil and the loader's message.
-- opts: gptoss.load's; bar: progress.new's options (label "load DIR")
function M.load(dir, opts, bar_opts)
  local gptoss = require "gptoss"
  local ld, err = gptoss.load_async(dir, opts)
  if not ld then return nil, err end
  local o = { label = "load " .. tostring(dir), unit = "MB", interval = 5 }
  for k, v in pairs(require("gptoss.check").options(bar_opts, "progress.load", NEW_KEYS)) do o[k] = v end
  local bar
  repeat
    local ended = ld:wait(0.1)
    local done, total = ld:progress()
    if total > 0 then
      local mb = function(b) return math.floor(b / 1e6 + 0.5) end
      bar = bar or M.new(setmetatable({ total = mb(total) }, { __index = o }))
      bar.total = mb(total)   -- (the backend's count may name another total than the checkpoint's)
      if mb(done) ~= bar.done or not bar.last_shown then bar:update(mb(done)); bar.last_shown = true end
    end
  until ended
  local m, lerr = ld:result()
  ld:close()
  if bar then bar:finish() end
  return m, lerr
end

--- a message on its own line, clearing a bar drawn on a terminal first
function Bar:print(msg)
  if self.tty and self.drawn then self.stream:write("\r\27[K") end
  self.stream:write(msg, "\n")
  self.last_draw = -math.huge
  self.stream:flush()
end

return M
