--- gptoss.sweep_report: what a sweep leaves for its user: trials.csv,
-- best.json, report.md and the plots (loss.png: every trial's train and
-- eval curves; metric_<param>.png: the metric against each parameter that
-- varies; plots.txt: the same charts as text), from the trials' files.
local sweep = require "gptoss.sweep"
local plot = require "gptoss.plot"

local M = {}

local function fmt(v)
  if type(v) == "number" then
    if v == math.floor(v) and math.abs(v) < 1e15 then return string.format("%d", v) end
    return string.format("%.10g", v)
  end
  if v == nil then return "" end
  return tostring(v)
end

local function csv_field(v)
  local s = fmt(v)
  if s:find('[,"\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
  return s
end

-- the metric names the results hold, the sweep's metric first
local function metric_names(spec, results)
  local seen, out = { [spec.metric.name] = true }, { spec.metric.name }
  local rest = {}
  for _, r in ipairs(results) do
    for k in pairs(r.metrics or {}) do if not seen[k] then seen[k] = true; rest[#rest + 1] = k end end
  end
  table.sort(rest)
  for _, k in ipairs(rest) do out[#out + 1] = k end
  return out
end

--- trials.csv's text: trial, state, the parameters, the metrics, last step
function M.csv(spec, trials, results)
  local ps, ms = sweep.param_names(spec.parameters), metric_names(spec, results)
  local head = { "trial", "state" }
  for _, p in ipairs(ps) do head[#head + 1] = p end
  for _, m in ipairs(ms) do head[#head + 1] = m end
  head[#head + 1] = "last_step"
  local lines = { table.concat(head, ",") }
  for _, r in ipairs(results) do
    local row = { fmt(r.index), r.state }
    for _, p in ipairs(ps) do row[#row + 1] = csv_field(r.params[p]) end
    for _, m in ipairs(ms) do row[#row + 1] = csv_field(r.metrics[m]) end
    row[#row + 1] = csv_field(r.last_step)
    lines[#lines + 1] = table.concat(row, ",")
  end
  return table.concat(lines, "\n") .. "\n"
end

-- the parameters whose values differ between trials
local function varying(spec, trials)
  local out = {}
  for _, p in ipairs(sweep.param_names(spec.parameters)) do
    local first, differs = fmt(trials[1] and trials[1].params[p]), false
    for _, t in ipairs(trials) do differs = differs or fmt(t.params[p]) ~= first end
    if differs then out[#out + 1] = p end
  end
  return out
end

local CURVES = { { "loss", "train" }, { "eval_loss", "eval" } }

--- the charts of a sweep: { file, title, spec } each
function M.charts(spec, dir, trials, results)
  local metric = spec.metric.name
  local charts = {}
  -- curves: train and eval loss when trials report them, else the metric
  local keys = {}
  local loss = { title = "loss per step", xlabel = "step", ylabel = "loss", series = {} }
  for _, r in ipairs(results) do
    local recs = sweep.read_steps(sweep.trial_dir(dir, r.index) .. "/steps.jsonl")
    for _, kv in ipairs(CURVES) do
      local pts = {}
      for _, rec in ipairs(recs) do if type(rec[kv[1]]) == "number" then pts[#pts + 1] = { rec.step, rec[kv[1]] } end end
      if #pts > 0 then
        keys[kv[1]] = true
        loss.series[#loss.series + 1] = { title = string.format("%d %s", r.index, kv[2]), points = pts,
          style = kv[1] == "loss" and "lines" or "linespoints", dash = kv[1] ~= "loss", color = r.index }
      end
    end
    if not keys.loss and not keys.eval_loss then
      local pts = {}
      for _, rec in ipairs(recs) do if type(rec[metric]) == "number" then pts[#pts + 1] = { rec.step, rec[metric] } end end
      if #pts > 0 then
        loss.series[#loss.series + 1] = { title = tostring(r.index), points = pts, style = "linespoints", color = r.index }
      end
    end
  end
  if not keys.loss and not keys.eval_loss then loss.title, loss.ylabel = metric .. " per step", metric end
  if #loss.series > 0 then charts[#charts + 1] = { file = "loss.png", title = loss.title, spec = loss } end
  -- the metric against each varying parameter
  for _, p in ipairs(varying(spec, trials)) do
    local finished, pruned, cats, xt = {}, {}, {}, nil
    local numeric = true
    for _, t in ipairs(trials) do numeric = numeric and type(t.params[p]) == "number" end
    if not numeric then       -- categories at 1..k, labelled
      local labels = {}
      for _, t in ipairs(trials) do
        local k = fmt(t.params[p])
        if not cats[k] then labels[#labels + 1] = k; cats[k] = #labels end
      end
      local parts = {}
      for i, l in ipairs(labels) do parts[i] = string.format('"%s" %d', l:gsub('"', "'"), i) end
      xt = "(" .. table.concat(parts, ", ") .. ")"
    end
    local lo, hi = math.huge, -math.huge
    for _, r in ipairs(results) do
      local v = r.metrics and r.metrics[metric]
      if type(v) == "number" then
        local x = numeric and r.params[p] or cats[fmt(r.params[p])]
        lo, hi = math.min(lo, x), math.max(hi, x)
        local into = r.state == "finished" and finished or pruned
        into[#into + 1] = { x, v }
      end
    end
    local dist = spec.parameters[p].distribution or ""
    local logx = numeric and (dist:match("^log") ~= nil or (lo > 0 and hi / lo >= 50))
    local c = { title = metric .. " against " .. p, xlabel = p, ylabel = metric, logx = logx, xtics = xt,
      series = { { title = "finished", points = finished, style = "points" },
                 { title = "pruned (last value)", points = pruned, style = "points" } } }
    if #finished + #pruned > 0 then
      local safe = p:gsub("[^%w_.-]", "_")
      charts[#charts + 1] = { file = "metric_" .. safe .. ".png", title = c.title, spec = c }
    end
  end
  return charts
end

local function md_table(spec, results, order)
  local ps, ms = sweep.param_names(spec.parameters), metric_names(spec, results)
  local head, rule = { "trial", "state" }, { "---:", "---" }
  for _, p in ipairs(ps) do head[#head + 1] = p; rule[#rule + 1] = "---:" end
  for _, m in ipairs(ms) do head[#head + 1] = m; rule[#rule + 1] = "---:" end
  head[#head + 1] = "steps"; rule[#rule + 1] = "---:"
  local lines = { "| " .. table.concat(head, " | ") .. " |", "|" .. table.concat(rule, "|") .. "|" }
  for _, r in ipairs(order) do
    local row = { fmt(r.index), r.state }
    for _, p in ipairs(ps) do row[#row + 1] = fmt(r.params[p]) end
    for _, m in ipairs(ms) do
      local v = r.metrics[m]
      row[#row + 1] = type(v) == "number" and string.format("%.5g", v) or fmt(v)
    end
    row[#row + 1] = fmt(r.last_step)
    lines[#lines + 1] = "| " .. table.concat(row, " | ") .. " |"
  end
  return table.concat(lines, "\n")
end

--- writes trials.csv, best.json, the plots and report.md into dir;
-- returns the report's text
function M.write(spec, dir, trials, results, best, opts)
  opts = opts or {}
  local metric, goal = spec.metric.name, spec.metric.goal or "minimize"
  local write_file = require("gptoss.files").write_file
  assert(write_file(dir .. "/trials.csv", M.csv(spec, trials, results)))
  sweep.write_json(dir .. "/best.json", best and { trial = best.index, params = best.params, metrics = best.metrics,
    metric = { name = metric, goal = goal, value = best.metrics[metric] } } or { trial = false })
  -- plots
  local plotted, note, text = {}, nil, {}
  if opts.plots ~= false then
    if plot.available() then
      for _, c in ipairs(M.charts(spec, dir, trials, results)) do
        local ok, err = plot.chart(c.spec, dir .. "/" .. c.file)
        if ok then plotted[#plotted + 1] = c else note = err end
        local t = plot.chart(c.spec, "dumb")
        if t then text[#text + 1] = t end
      end
      assert(write_file(dir .. "/plots.txt", table.concat(text, "\n")))
    else
      note = "gnuplot not found (Debian: apt-get install gnuplot-nox): no plots"
    end
  end
  -- report
  local counts = { finished = 0, pruned = 0, failed = 0 }
  for _, r in ipairs(results) do counts[r.state] = (counts[r.state] or 0) + 1 end
  local order = {}
  for i, r in ipairs(results) do order[i] = r end
  local function key(r)
    local v = r.metrics and r.metrics[metric]
    if type(v) ~= "number" or v ~= v then return math.huge end
    return goal == "maximize" and -v or v
  end
  local rank = { finished = 0, pruned = 1, failed = 2 }
  table.sort(order, function(a, b)
    if a.state ~= b.state then return (rank[a.state] or 3) < (rank[b.state] or 3) end
    if key(a) ~= key(b) then return key(a) < key(b) end
    return a.index < b.index
  end)
  local et = spec.early_terminate
  local L = {
    "# Sweep " .. (spec.name or dir), "",
    string.format("Method %s over %d trials (%d finished, %d pruned, %d failed, %d not run yet); metric %s, %s%s.",
      spec.method or "grid", #trials, counts.finished, counts.pruned, counts.failed, #trials - #results, metric, goal,
      et and (", early termination " .. tostring(et.type)) or ""), "",
  }
  if best then
    local ps = {}
    for _, p in ipairs(sweep.param_names(best.params)) do ps[#ps + 1] = p .. " = " .. fmt(best.params[p]) end
    L[#L + 1] = string.format("**Best: trial %d**, %s = %.6g, with %s.", best.index, metric, best.metrics[metric], table.concat(ps, ", "))
  else
    L[#L + 1] = "No trial has finished with the metric yet."
  end
  L[#L + 1] = ""
  L[#L + 1] = "## Trials (best first)"
  L[#L + 1] = ""
  L[#L + 1] = md_table(spec, results, order)
  for _, r in ipairs(results) do
    if r.state == "failed" then L[#L + 1] = ""; L[#L + 1] = string.format("Trial %d failed: `%s`", r.index, (r.error or ""):match("[^\n]*")) end
  end
  L[#L + 1] = ""
  L[#L + 1] = "## Plots"
  L[#L + 1] = ""
  for _, c in ipairs(plotted) do L[#L + 1] = string.format("![%s](%s)", c.title, c.file); L[#L + 1] = "" end
  if note then L[#L + 1] = note; L[#L + 1] = "" end
  L[#L + 1] = "Files: `trials.csv`, `best.json`, `plots.txt` (the charts as text), and per trial `trials/NNNN/` " ..
    "(`params.json`, `steps.jsonl`, `result.json`)."
  local report = table.concat(L, "\n") .. "\n"
  assert(write_file(dir .. "/report.md", report))
  return report
end

return M
