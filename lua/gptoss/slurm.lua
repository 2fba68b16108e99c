--- gptoss.slurm: a sweep as a Slurm job array (`gptoss sweep SPEC --slurm`).
--
-- Each unfinished trial becomes one array task (`sbatch --array=1,3-4%K`),
-- which runs `gptoss sweep SPEC --dir DIR --trial $SLURM_ARRAY_TASK_ID`
-- on its node, writing into the same sweep directory (a shared filesystem:
-- trials never write each other's files). The submitting command then
-- follows the job (squeue) with a progress line, and writes trials.csv,
-- best.json, report.md and the plots when the array has left the queue.
-- Task logs: DIR/slurm/<job>_<task>.out. sbatch and squeue come from PATH
-- and read SLURM_CONF as usual.
local sweep = require "gptoss.sweep"

local M = {}

local shell_quote = require("gptoss.files").shell_quote

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  local h = io.popen("pwd")
  local cwd = h:read("*l")
  h:close()
  return cwd .. "/" .. path:gsub("^%./", "")
end
M.absolute = absolute

local function capture(cmd)
  local h = io.popen(cmd .. " 2>&1; echo \"exit=$?\"")
  local out = h:read("*a")
  h:close()
  local body, code = out:match("^(.-)exit=(%d+)%s*$")
  return body or out, tonumber(code)
end

--- "1-3,5" from a sorted list of trial numbers
function M.array_spec(indices)
  local parts, i = {}, 1
  while i <= #indices do
    local j = i
    while j < #indices and indices[j + 1] == indices[j] + 1 do j = j + 1 end
    parts[#parts + 1] = i == j and tostring(indices[i]) or (indices[i] .. "-" .. indices[j])
    i = j + 1
  end
  return table.concat(parts, ",")
end

--- the batch script each task runs
function M.script(o)
  local cmd = { shell_quote(o.lua), shell_quote(o.bin), "sweep", shell_quote(o.spec), "--dir", shell_quote(o.dir),
                "--trial", "\"$SLURM_ARRAY_TASK_ID\"", "--no-plots" }
  if o.device then cmd[#cmd + 1] = "--device " .. shell_quote(o.device) end
  return table.concat({
    "#!/bin/sh",
    "#SBATCH --job-name=" .. (o.name or "gptoss-sweep"),
    "#SBATCH --output=" .. o.dir .. "/slurm/%A_%a.out",
    "cd " .. shell_quote(o.cwd),
    "exec " .. table.concat(cmd, " "),
  }, "\n") .. "\n"
end

--- submits the sweep's unfinished trials and follows them to the end;
-- opts: dir, device, max_parallel, sbatch (extra arguments), poll
-- (seconds), progress, plots, lua and bin (the interpreter and the gptoss
-- script the tasks run; default: this process's). Returns what
-- sweep.run returns, with job (the array's id).
function M.run(spec_path, spec, opts)
  opts = opts or {}
  local dir, trials = sweep.prepare(spec, opts)
  dir = absolute(dir)
  local todo = {}
  for _, t in ipairs(trials) do
    if not sweep.read_json(sweep.trial_dir(dir, t.index) .. "/result.json") then todo[#todo + 1] = t.index end
  end
  local job
  if #todo > 0 then
    assert(require("gptoss.files").mkdir_p(dir .. "/slurm"))
    local script = dir .. "/slurm/array.sh"
    local cwd = absolute(".")
    assert(require("gptoss.files").write_file(script, M.script {
      lua = opts.lua or (arg and arg[-1]) or "lua5.4", bin = absolute(opts.bin or (arg and arg[0]) or "gptoss"),
      spec = absolute(spec_path), dir = dir, device = opts.device, cwd = cwd, name = spec.name and ("sweep-" .. spec.name) }))
    local array = M.array_spec(todo) .. (opts.max_parallel and ("%" .. opts.max_parallel) or "")
    local out, code = capture(string.format("sbatch --parsable --array=%s %s %s", array, opts.sbatch or "", shell_quote(script)))
    job = code == 0 and out:match("^%s*(%d+)")
    if not job then error("sweep: sbatch failed: " .. out:gsub("%s+$", ""), 0) end
    local bar = opts.progress and require("gptoss.progress").new { label = "slurm job " .. job, total = #trials,
      unit = "trials", interval = 0 }
    if bar then bar:print(string.format("sweep: submitted %d trials as Slurm job %s (array %s)", #todo, job, array)) end
    local last = -1
    while true do
      local q, qcode = capture("squeue -h -j " .. job .. " -o %i")
      local n = #sweep.results(dir, trials)
      if bar and n ~= last then
        local b = sweep.best(spec, sweep.results(dir, trials))
        bar:update(n, b and { { "best", string.format("%.5g", b.metrics[spec.metric.name]) }, { "trial", b.index } } or nil)
        last = n
      end
      if qcode ~= 0 and not q:match("Invalid job id") then error("sweep: squeue failed: " .. q, 0) end
      if not q:match("%d") then break end
      os.execute("sleep " .. tonumber(opts.poll or 2))
    end
    if bar then bar:finish() end
  end
  local results = sweep.results(dir, trials)
  local res = { dir = dir, trials = trials, results = results, best = sweep.best(spec, results), job = job, ran = {} }
  res.report = require("gptoss.sweep_report").write(spec, dir, trials, results, res.best, opts)
  if #results < #trials then
    error(string.format("sweep: %d of %d trials left no result (see %s/slurm/*.out); the report covers the rest",
      #trials - #results, #trials, dir), 0)
  end
  return res
end

return M
