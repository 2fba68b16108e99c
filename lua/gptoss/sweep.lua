--- gptoss.sweep: hyperparameter sweeps, after W&B's sweep configuration.
--
--   local sweep = require "gptoss.sweep"
--   local res = sweep.run {
--     name = "lr-rank", dir = "sweeps/lr-rank",
--     method = "grid",                                -- or "random" (needs run_cap), seed = N
--     parameters = { lr = { values = { 1e-4, 2e-4 } }, r = { values = { 8, 16 } },
--                    dropout = { distribution = "uniform", min = 0, max = 0.1 } },   -- random only
--     metric = { name = "eval_loss", goal = "minimize" },
--     early_terminate = { type = "median" },        -- or { type = "asha" }
--     trial = function(params, report, ctx)          -- or trial = "lora" with lora = { ... }
--       for step = 1, 10 do report(step, { eval_loss = f(params, step) }) end
--     end,
--   }
--   print(res.best.index, res.best.metrics.eval_loss)
--
-- Parameters: { value = v } (fixed), { values = {...} } (grid: every one;
-- random: one drawn uniformly), or a distribution for random sweeps:
-- "uniform" (min, max), "log_uniform_values" (min, max: log-uniform between
-- them), "log_uniform" (W&B's: exp of a uniform draw between min and max),
-- "int_uniform" or "int" (an integer in [min, max]). Grids enumerate the
-- parameters in name order, the first name slowest; run_cap caps either.
-- Random draws come from the sweep's seed alone (the same in Lua 5.4 and
-- LuaJIT): a sweep is reproducible and resumes with the same trials, and
-- raising run_cap keeps the trials drawn before.
--
-- A trial calls report(step, metrics) for each step it wants recorded (one
-- line of steps.jsonl); when the metric is among them the pruner may stop
-- the trial there: report raises sweep.PRUNED, which the sweep catches (a
-- trial that must clean up can pcall and re-raise it). The trial returns
-- its final metrics (a table), or nothing to keep the last reported ones.
--
-- The sweep directory holds sweep.json (the spec's data), trials/NNNN/
-- (params.json, steps.jsonl, result.json once done; the LoRA trial adds
-- checkpoint/ and adapter/), and, after each run, trials.csv, best.json,
-- report.md and the plots (gptoss.sweep_report). Running a sweep again
-- skips finished trials and reruns an interrupted one: a function trial
-- from the start, the LoRA trial from its last training checkpoint.
-- gptoss.sweep_parallel runs the trials over several local devices, and
-- gptoss.slurm as a Slurm job array; both start `gptoss sweep --trial I`
-- processes that write into the same directory.
local json = require "gptoss.json"
local cjson = require "cjson"

local M = {}

--- what report() raises when the pruner stops a trial
M.PRUNED = setmetatable({}, { __tostring = function() return "gptoss.sweep: trial pruned" end })

-- {====================================================== files
local files = require "gptoss.files"
local write_file, read_file, mkdir_p = files.write_file, files.read_file, files.mkdir_p

-- JSON written whole or not at all (files.write_file renames a temporary
-- file into place), so a kill never leaves half a file
local function write_json(path, value)
  local ok, err = write_file(path, json.encode_compact(value) .. "\n")
  if not ok then error("sweep: " .. path .. ": " .. tostring(err), 0) end
end
M.write_json = write_json

-- lua-cjson decodes every number as a float in Lua 5.4: give integral ones back as integers
local function integers(v)
  if type(v) == "table" then
    for k, x in pairs(v) do v[k] = integers(x) end
  elseif math.tointeger and type(v) == "number" and math.tointeger(v) then
    return math.tointeger(v)
  end
  return v
end

local function decode(text)
  local ok, v = pcall(cjson.decode, text)
  if ok then return integers(v) end
end

local function read_json(path)
  local d = read_file(path)
  return d and decode(d)
end
M.read_json = read_json

--- the step records of a steps.jsonl (those with step <= upto, when given)
function M.read_steps(path, upto)
  local out = {}
  local d = read_file(path)
  if not d then return out end
  for line in d:gmatch("[^\n]+") do
    local rec = decode(line)                    -- a line cut by a kill is dropped
    if type(rec) == "table" and (not upto or rec.step <= upto) then out[#out + 1] = rec end
  end
  return out
end
-- }======================================================

-- {====================================================== parameters
-- A 32-bit LCG over doubles (exact in every Lua). Trial i draws from
-- one stream per sweep seed, after the draws of the trials before it:
-- streams seeded per trial would put consecutive trials on a lattice.
local function rng(seed)
  local x = (seed * 2654435761 + 12345) % 4294967296
  return function()
    x = (x * 1664525 + 1013904223) % 4294967296
    local hi = x
    x = (x * 1664525 + 1013904223) % 4294967296
    return (hi * 2097152 + math.floor(x / 2048)) / 9007199254740992   -- 53 bits in [0, 1)
  end
end
M.rng = rng

local function names(parameters)
  local t = {}
  for k in pairs(parameters or {}) do t[#t + 1] = k end
  table.sort(t)
  return t
end
M.param_names = names

local function check_param(name, p)
  if type(p) ~= "table" then error("sweep: parameter " .. name .. " must be a table", 0) end
  if p.value == nil and p.values == nil and p.distribution == nil then
    error("sweep: parameter " .. name .. " needs value, values or distribution", 0)
  end
  if p.values ~= nil and (type(p.values) ~= "table" or #p.values == 0) then
    error("sweep: parameter " .. name .. ": values must be a non-empty list", 0)
  end
  if p.distribution ~= nil and (type(p.min) ~= "number" or type(p.max) ~= "number" or p.min > p.max) then
    error("sweep: parameter " .. name .. ": distribution " .. tostring(p.distribution) .. " needs numbers min <= max", 0)
  end
end

-- one draw per parameter, whatever its kind, so each trial takes as many
local function draw(name, p, u)
  local x = u()
  if p.value ~= nil then return p.value end
  if p.values then return p.values[math.floor(x * #p.values) + 1] end
  local d, lo, hi = p.distribution, p.min, p.max
  if d == "uniform" then return lo + (hi - lo) * x
  elseif d == "log_uniform" then return math.exp(lo + (hi - lo) * x)
  elseif d == "log_uniform_values" then
    if lo <= 0 then error("sweep: parameter " .. name .. ": log_uniform_values needs min > 0", 0) end
    return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * x)
  elseif d == "int_uniform" or d == "int" then return math.floor(lo + (hi - lo + 1) * x)
  end
  error("sweep: parameter " .. name .. ": unknown distribution '" .. tostring(d) .. "'", 0)
end

--- the sweep's trials, in order: { index = i, params = {...} }
function M.trials(spec)
  local ps, ns = spec.parameters or {}, names(spec.parameters)
  for _, n in ipairs(ns) do check_param(n, ps[n]) end
  local out = {}
  local method = spec.method or "grid"
  if method == "grid" then
    local total = 1
    for _, n in ipairs(ns) do
      if ps[n].distribution then error("sweep: grid parameter " .. n .. " needs values, not a distribution", 0) end
      total = total * (ps[n].values and #ps[n].values or 1)
    end
    local cap = spec.run_cap and math.min(spec.run_cap, total) or total
    for i = 1, cap do
      local params, k = {}, i - 1
      for j = #ns, 1, -1 do                     -- the last name varies fastest
        local p = ps[ns[j]]
        if p.values then
          params[ns[j]] = p.values[k % #p.values + 1]
          k = math.floor(k / #p.values)
        else
          params[ns[j]] = p.value
        end
      end
      out[i] = { index = i, params = params }
    end
  elseif method == "random" then
    if type(spec.run_cap) ~= "number" or spec.run_cap < 1 then error("sweep: a random sweep needs run_cap", 0) end
    local u = rng(spec.seed or 0)
    for i = 1, spec.run_cap do
      local params = {}
      for _, n in ipairs(ns) do params[n] = draw(n, ps[n], u) end
      out[i] = { index = i, params = params }
    end
  else
    error("sweep: method must be \"grid\" or \"random\" (got " .. tostring(method) .. ")", 0)
  end
  return out
end
-- }======================================================

-- {====================================================== pruners
-- np.nanpercentile (linear interpolation), as Optuna's and Ray's pruners
-- take their cutoffs: a NaN (a diverged trial) is left out
local percentile = require("gptoss.stats").nanpercentile
M.percentile = percentile

--- Optuna's MedianPruner (a PercentilePruner at 50): once n_startup_trials
-- trials have finished, at steps >= n_warmup_steps and on the interval,
-- stop a trial whose best value so far is worse than the median of the
-- finished trials' values at the same step (none there: go on).
function M.median_pruner(opts)
  opts = opts or {}
  local n_startup, warmup = opts.n_startup_trials or 5, opts.n_warmup_steps or 0
  local interval, n_min = opts.interval_steps or opts.interval or 1, opts.n_min_trials or 1
  local pct = opts.percentile or 50
  return function(goal, curve, step, others, steps)
    local finished = {}
    for _, o in ipairs(others) do if o.state == "finished" then finished[#finished + 1] = o end end
    if #finished == 0 or #finished < n_startup then return false end
    if step < warmup then return false end
    -- Optuna's _is_first_in_interval_step: the first report at or past each interval boundary
    local boundary = math.floor((step - warmup) / interval) * interval + warmup
    local sorted = {}
    for i, s in ipairs(steps) do sorted[i] = s end
    table.sort(sorted)
    if (sorted[#sorted - 1] or -1) >= boundary then return false end
    local best
    for _, v in pairs(curve) do
      if v == v and (best == nil or (goal == "maximize" and v > best) or (goal ~= "maximize" and v < best)) then best = v end
    end
    if best == nil then return true end           -- only NaNs so far
    local at = {}
    for _, o in ipairs(finished) do if o.curve[step] ~= nil then at[#at + 1] = o.curve[step] end end
    if #at < n_min then return false end
    local p = percentile(at, goal == "maximize" and 100 - pct or pct)
    if goal == "maximize" then return best < p end
    return best > p
  end
end

--- Ray Tune's AsyncHyperBandScheduler (ASHA, one bracket): rungs at
-- grace_period * reduction_factor^k below max_t; the first time a trial
-- reaches a rung it is compared with every trial recorded there before it,
-- and stopped unless it is in their top 1 / reduction_factor; at max_t it
-- stops (as finished).
function M.asha(opts)
  opts = opts or {}
  local max_t, grace, rf = opts.max_t or 100, opts.grace_period or 1, opts.reduction_factor or 4
  if (opts.brackets or 1) ~= 1 then error("sweep: asha supports one bracket", 0) end
  local rungs = {}
  local n = math.floor(math.log(max_t / grace) / math.log(rf) + 1 + 1e-9)
  for k = n - 1, 0, -1 do rungs[#rungs + 1] = grace * rf ^ k end   -- highest first, as Ray keeps them
  -- Ray's on_result: the highest rung the report reaches that the trial has not recorded yet
  local function rung_of(recorded, step)
    for _, m in ipairs(rungs) do if step >= m and recorded[m] == nil then return m end end
  end
  -- a trial's recorded rungs, replaying its reports in order
  local function recorded_by(curve, steps, upto)
    local rec = {}
    for i = 1, upto or #steps do
      local m = rung_of(rec, steps[i])
      if m then rec[m] = curve[steps[i]] end
    end
    return rec
  end
  return function(goal, curve, step, others, steps)
    if step >= max_t then return "finish" end
    local m = rung_of(recorded_by(curve, steps, #steps - 1), step)
    if not m then return false end
    local sign = goal == "maximize" and 1 or -1
    local rec = {}
    for _, o in ipairs(others) do
      local v = recorded_by(o.curve, o.steps)[m]
      if v ~= nil then rec[#rec + 1] = sign * v end
    end
    return #rec > 0 and sign * curve[step] < percentile(rec, (1 - 1 / rf) * 100)
  end
end

local function make_pruner(et)
  if et == nil then return nil end
  local t = et.type
  if t == "median" then return M.median_pruner(et) end
  if t == "asha" or t == "hyperband" then return M.asha(et) end
  error("sweep: early_terminate.type must be \"median\" or \"asha\" (got " .. tostring(t) .. ")", 0)
end
-- }======================================================

-- {====================================================== running
local function trial_dir(dir, i) return string.format("%s/trials/%04d", dir, i) end
M.trial_dir = trial_dir

--- the other trials as the pruners see them: state, curve[step] of the
-- metric, and their reported steps in order
local function load_others(dir, trials, self, metric)
  local out = {}
  for _, t in ipairs(trials) do
    if t.index ~= self then
      local td = trial_dir(dir, t.index)
      local res = read_json(td .. "/result.json")
      local recs = M.read_steps(td .. "/steps.jsonl")
      if #recs > 0 then
        local curve, steps = {}, {}
        for _, r in ipairs(recs) do
          if type(r[metric]) == "number" then curve[r.step] = r[metric]; steps[#steps + 1] = r.step end
        end
        out[#out + 1] = { state = res and res.state or "running", curve = curve, steps = steps }
      end
    end
  end
  return out
end

-- the spec's data (no functions) as sweep.json keeps it
local function spec_data(spec)
  local function copy(v)
    if type(v) ~= "table" then return type(v) == "function" and "<function>" or v end
    local t = {}
    for k, x in pairs(v) do t[k] = copy(x) end
    return t
  end
  local d = copy(spec)
  d.trial = type(spec.trial) == "string" and spec.trial or "<function>"
  return d
end

local function check_spec(spec)
  if type(spec) ~= "table" then error("sweep: the spec must be a table", 0) end
  local m = spec.metric
  if type(m) ~= "table" or type(m.name) ~= "string" then error("sweep: metric = { name = ..., goal = ... } is required", 0) end
  if m.goal ~= nil and m.goal ~= "minimize" and m.goal ~= "maximize" then
    error("sweep: metric.goal must be \"minimize\" or \"maximize\"", 0)
  end
  if type(spec.trial) ~= "function" and spec.trial ~= "lora" then
    error("sweep: trial must be a function of the parameters or \"lora\"", 0)
  end
end

local function run_trial(spec, dir, t, trials, ctx_base)
  local td = trial_dir(dir, t.index)
  assert(mkdir_p(td))
  write_json(td .. "/params.json", { index = t.index, params = t.params })
  local metric, goal = spec.metric.name, spec.metric.goal or "minimize"
  local pruner = make_pruner(spec.early_terminate)
  local others = pruner and load_others(dir, trials, t.index, metric) or {}
  local runner = spec.trial == "lora" and require("gptoss.sweep_lora").trial or spec.trial
  -- where the trial restarts: a LoRA trial from its training checkpoint, others from 0
  local resume_step = spec.trial == "lora" and require("gptoss.sweep_lora").resume_step(td) or 0
  local kept = M.read_steps(td .. "/steps.jsonl", resume_step)
  local lines = {}
  for i, r in ipairs(kept) do lines[i] = json.encode_compact(r) end
  assert(write_file(td .. "/steps.jsonl", #lines > 0 and table.concat(lines, "\n") .. "\n" or ""))
  local curve, steps, last = {}, {}, {}
  for _, r in ipairs(kept) do
    if type(r[metric]) == "number" then curve[r.step] = r[metric]; steps[#steps + 1] = r.step end
    last = r
  end
  local log = assert(io.open(td .. "/steps.jsonl", "ab"))
  local finish_early = false
  local function report(step, metrics)
    if type(step) ~= "number" or type(metrics) ~= "table" then error("report(step, metrics): a number and a table", 2) end
    if math.tointeger then step = math.tointeger(step) or step end   -- 2.0 and 2 write alike
    local rec = { step = step }
    for k, v in pairs(metrics) do if k ~= "step" then rec[k] = v end end
    log:write(json.encode_compact(rec), "\n")
    log:flush()
    last = rec
    local v = metrics[metric]
    if pruner and type(v) == "number" then
      curve[step] = v
      steps[#steps + 1] = step
      local verdict = pruner(goal, curve, step, others, steps)
      if verdict == "finish" then finish_early = true; error(M.PRUNED, 0) end
      if verdict then error(M.PRUNED, 0) end
    end
  end
  local ctx = { dir = td, index = t.index, resume_step = resume_step, spec = spec }
  for k, v in pairs(ctx_base) do ctx[k] = v end
  local clock = require("gptoss.core").clock
  local t0 = clock()
  local ok, res = xpcall(runner, function(e)
    if e == M.PRUNED then return e end
    return debug.traceback(tostring(e), 2)
  end, t.params, report, ctx)
  log:close()
  local result = { index = t.index, params = t.params, seconds = clock() - t0, last_step = last.step }
  if ok then
    result.state = "finished"
    local m = {}
    for k, v in pairs(last) do if k ~= "step" then m[k] = v end end
    if type(res) == "table" then for k, v in pairs(res) do m[k] = v end end
    result.metrics = m
  elseif res == M.PRUNED then
    result.state = finish_early and "finished" or "pruned"
    result.metrics = {}
    for k, v in pairs(last) do if k ~= "step" then result.metrics[k] = v end end
  else
    result.state, result.error, result.metrics = "failed", tostring(res), {}
  end
  write_json(td .. "/result.json", result)
  return result
end

--- every trial's result.json that exists, in trial order
function M.results(dir, trials)
  local out = {}
  for _, t in ipairs(trials) do
    local r = read_json(trial_dir(dir, t.index) .. "/result.json")
    if r then out[#out + 1] = r end
  end
  return out
end

--- the best finished trial's result (nil when none has the metric)
function M.best(spec, results)
  local metric, goal = spec.metric.name, spec.metric.goal or "minimize"
  local best
  for _, r in ipairs(results) do
    local v = r.state == "finished" and r.metrics and r.metrics[metric]
    if type(v) == "number" and v == v then
      local bv = best and best.metrics[metric]
      if not best or (goal == "maximize" and v > bv) or (goal ~= "maximize" and v < bv) then best = r end
    end
  end
  return best
end

--- the sweep directory (opts.dir, spec.dir, or sweeps/<name>)
function M.directory(spec, opts)
  return (opts and opts.dir) or spec.dir or ("sweeps/" .. (spec.name or "sweep"))
end

--- the sweep directory made ready: sweep.json written (or checked against
-- this spec's trials); returns the directory and the trials
function M.prepare(spec, opts)
  check_spec(spec)
  local dir = M.directory(spec, opts)
  local trials = M.trials(spec)
  assert(mkdir_p(dir .. "/trials"))
  local saved = read_json(dir .. "/sweep.json")
  local listed = {}
  for i, t in ipairs(trials) do listed[i] = t.params end
  if saved and saved.trials and json.encode_compact(saved.trials) ~= json.encode_compact(decode(json.encode_compact(listed))) then
    error("sweep: " .. dir .. " holds a sweep with other trials; give another dir", 0)
  end
  if not saved then write_json(dir .. "/sweep.json", { spec = spec_data(spec), trials = listed }) end
  return dir, trials
end

--- runs the sweep's unfinished trials (all, or opts.trial = i alone), then
-- writes trials.csv, best.json, report.md and the plots (unless opts.trial
-- or opts.aggregate == false). opts: dir, trial, device, progress (a bar on
-- stderr), plots (default true). Returns { dir, trials, results, best, ran }.
function M.run(spec, opts)
  opts = opts or {}
  local dir, trials = M.prepare(spec, opts)
  local todo = {}
  for _, t in ipairs(trials) do
    if (not opts.trial or opts.trial == t.index) and not read_json(trial_dir(dir, t.index) .. "/result.json") then
      todo[#todo + 1] = t
    end
  end
  if opts.trial and not trials[opts.trial] then error("sweep: no trial " .. tostring(opts.trial) .. " (1.." .. #trials .. ")", 0) end
  local ctx, ran = { device = opts.device, progress = opts.progress }, {}
  local bar = opts.progress and require("gptoss.progress").new { label = "sweep", total = #trials, unit = "trials", interval = 0 }
  local function best_text()
    local b = M.best(spec, M.results(dir, trials))
    return b and { { "best", string.format("%.5g", b.metrics[spec.metric.name]) }, { "trial", b.index } } or nil
  end
  for _, t in ipairs(todo) do
    if bar then
      local ps = {}
      for _, n in ipairs(names(t.params)) do ps[#ps + 1] = n .. "=" .. tostring(t.params[n]) end
      bar:print(string.format("sweep: trial %d of %d: %s", t.index, #trials, table.concat(ps, " ")))
    end
    ran[#ran + 1] = run_trial(spec, dir, t, trials, ctx)
    if ran[#ran].state == "failed" and (bar or opts.verbose) then
      io.stderr:write("sweep: trial ", t.index, " failed: ", ran[#ran].error, "\n")
    end
    if bar then bar:update(#M.results(dir, trials), best_text()) end
  end
  if spec.trial == "lora" then require("gptoss.sweep_lora").close() end
  if bar then bar:finish() end
  local results = M.results(dir, trials)
  local out = { dir = dir, trials = trials, results = results, best = M.best(spec, results), ran = ran }
  if not opts.trial and opts.aggregate ~= false then
    out.report = require("gptoss.sweep_report").write(spec, dir, trials, results, out.best, opts)
  end
  return out
end
-- }======================================================

return M
