--- gptoss.sweep_parallel: a sweep's trials in parallel over the devices of
-- one machine (`gptoss sweep SPEC --devices cuda:0,cuda:1`, or the spec's
-- devices = { ... }; "cpu" may be listed several times), one trial per
-- device at a time. Each trial runs in a process of its own,
-- `gptoss sweep SPEC --dir DIR --trial I --device D` (a model per process:
-- CUDA contexts and CPU thread pools stay apart), and writes its own files
-- in the sweep directory, as a Slurm array task does; this process starts
-- them, waits for each to leave its exit status, and writes the report.
local sweep = require "gptoss.sweep"
local slurm = require "gptoss.slurm"

local M = {}

local q = require("gptoss.files").shell_quote

--- runs the unfinished trials over opts.devices (a list); opts as
-- sweep.run's, plus lua and bin (the interpreter and the gptoss script the
-- trials run; default: this process's) and poll (seconds, default 0.2).
-- Returns what sweep.run returns.
function M.run(spec_path, spec, opts)
  local devices = opts.devices
  local dir, trials = sweep.prepare(spec, opts)
  dir = slurm.absolute(dir)
  local todo = {}
  for _, t in ipairs(trials) do
    if not sweep.read_json(sweep.trial_dir(dir, t.index) .. "/result.json") then todo[#todo + 1] = t.index end
  end
  local lua = opts.lua or (arg and arg[-1]) or "lua5.4"
  local bin = slurm.absolute(opts.bin or (arg and arg[0]) or "gptoss")
  local spec_abs = slurm.absolute(spec_path)
  assert(require("gptoss.files").mkdir_p(dir .. "/parallel"))
  local bar = opts.progress and require("gptoss.progress").new { label = "sweep", total = #trials, unit = "trials", interval = 0 }
  local busy, next_i, ran = {}, 1, {}
  local function start(slot)
    local i = todo[next_i]
    next_i = next_i + 1
    local status = string.format("%s/parallel/%04d.exit", dir, i)
    os.remove(status)
    local log = string.format("%s/parallel/%04d.log", dir, i)
    os.execute(string.format("(%s %s sweep %s --dir %s --trial %d --device %s --no-plots >%s 2>&1; echo $? >%s.tmp; mv %s.tmp %s) &",
      q(lua), q(bin), q(spec_abs), q(dir), i, q(devices[slot]), q(log), q(status), q(status), q(status)))
    busy[slot] = { index = i, status = status }
    if bar then bar:print(string.format("sweep: trial %d of %d on %s", i, #trials, devices[slot])) end
  end
  while true do
    for slot = 1, #devices do
      if not busy[slot] and next_i <= #todo then start(slot) end
    end
    local any = false
    for slot = 1, #devices do
      local b = busy[slot]
      if b then
        any = true
        local code = require("gptoss.files").read_file(b.status)
        if code then
          busy[slot] = nil
          local r = sweep.read_json(sweep.trial_dir(dir, b.index) .. "/result.json")
          ran[#ran + 1] = r or { index = b.index, state = "failed", error = "exit " .. code:gsub("%s+$", "") ..
            ", no result (see " .. dir .. string.format("/parallel/%04d.log)", b.index) }
          if bar then
            local best = sweep.best(spec, sweep.results(dir, trials))
            bar:update(#sweep.results(dir, trials),
              best and { { "best", string.format("%.5g", best.metrics[spec.metric.name]) }, { "trial", best.index } } or nil)
          end
        end
      end
    end
    if not any and next_i > #todo then break end
    os.execute("sleep " .. (opts.poll or 0.2))
  end
  if bar then bar:finish() end
  local results = sweep.results(dir, trials)
  local res = { dir = dir, trials = trials, results = results, best = sweep.best(spec, results), ran = ran }
  res.report = require("gptoss.sweep_report").write(spec, dir, trials, results, res.best, opts)
  return res
end

return M
