--- gptoss.bench_study_report: the latency study's results (gptoss.bench_study,
-- in process, or bench/serve.lua over HTTP) as a Markdown report, JSON and
-- gnuplot charts.
--
--   local report = require "gptoss.bench_study_report"
--   io.write(report.markdown(results, { charts = "dumb" }))   -- text charts inline
--   local files, notes = report.write(results, "out")
--   -- out/report.md (PNG links), out/study.json, out/latency_prompt.png,
--   -- latency_temperature.png, latency_concurrency.png, resources_cpu.png,
--   -- resources_memory.png and out/charts.txt (the same charts as text)
--
-- JSON: the results as they are, NaN (a statistic of no values) as null.
local json = require "gptoss.json"
local plot = require "gptoss.plot"
local files = require "gptoss.files"
local study = require "gptoss.bench_study"

local M = {}

-- {====================================================== tables
local function fmt(pattern)
  return function(x) return (type(x) ~= "number" or x ~= x) and "-" or string.format(pattern, x) end
end
local f0, f1, f2, f3 = fmt("%.0f"), fmt("%.1f"), fmt("%.2f"), fmt("%.3f")

local GROUP_ORDER = { prompt_length = { short = 1, medium = 2, long = 3 } }

--- the phases of a group ("prompt_length", "temperature", "workers") in the
-- plan's order: a list of { key, metrics }
function M.rows(results, group)
  local rows = {}
  for key, m in pairs(results[group] or {}) do rows[#rows + 1] = { key = key, m = m } end
  local order = GROUP_ORDER[group]
  table.sort(rows, function(a, b)
    if order then return (order[a.key] or 99) < (order[b.key] or 99) end
    return tonumber(a.key) < tonumber(b.key)
  end)
  return rows
end

local function table_text(head, rows)
  local L = { "| " .. table.concat(head, " | ") .. " |", "|" .. ("---:|"):rep(#head) }
  L[2] = "|---|" .. ("---:|"):rep(#head - 1)
  for _, r in ipairs(rows) do L[#L + 1] = "| " .. table.concat(r, " | ") .. " |" end
  return table.concat(L, "\n") .. "\n"
end

local function latency_cells(m)
  return { f3(m.mean_e2el_ms / 1000), f3(m.p95_e2el_ms / 1000), f1(m.mean_request_tps), f1(m.mean_ttft_ms),
           f1(m.p95_ttft_ms), f1(m.mean_tpot_ms) }
end
local LATENCY_HEAD = { "mean latency (s)", "P95 latency (s)", "tokens/s", "mean TTFT (ms)", "P95 TTFT (ms)", "mean TPOT (ms)" }

local function with(a, b)
  local t = {}
  for _, x in ipairs(a) do t[#t + 1] = x end
  for _, x in ipairs(b) do t[#t + 1] = x end
  return t
end

--- the prompt-length table (prompt, tokens, completed, failed, latency, tokens/s, TTFT, TPOT)
function M.prompt_table(results)
  local rows = {}
  for _, r in ipairs(M.rows(results, "prompt_length")) do
    rows[#rows + 1] = with({ r.key, tostring(r.m.prompt_len), tostring(r.m.completed), tostring(r.m.failed) }, latency_cells(r.m))
  end
  return table_text(with({ "prompt", "tokens", "completed", "failed" }, LATENCY_HEAD), rows)
end

function M.temperature_table(results)
  local rows = {}
  for _, r in ipairs(M.rows(results, "temperature")) do
    rows[#rows + 1] = with({ r.key, tostring(r.m.completed), tostring(r.m.failed) }, latency_cells(r.m))
  end
  return table_text(with({ "temperature", "completed", "failed" }, LATENCY_HEAD), rows)
end

function M.workers_table(results)
  local rows = {}
  for _, r in ipairs(M.rows(results, "workers")) do
    local m = r.m
    rows[#rows + 1] = with({ r.key, tostring(m.completed), tostring(m.failed), f2(m.request_throughput), f1(m.output_throughput) },
      latency_cells(m))
  end
  return table_text(with({ "concurrency", "completed", "failed", "requests/s", "output tok/s (all)" }, LATENCY_HEAD), rows)
end

--- the resources table of samples (CPU %, RSS, KV cache, GPU memory: mean and max)
function M.resources_table(samples)
  local s = study.resource_summary(samples)
  local rows = {}
  local names = { { "cpu_pct", "CPU (% of one core)" }, { "rss_mib", "RSS (MiB)" }, { "kv_mib", "KV cache in use (MiB)" },
                  { "gpu_mib", "GPU memory (MiB)" } }
  for _, k in ipairs(names) do
    local f = k[1] == "cpu_pct" and f0 or f1
    if s[k[1]] then rows[#rows + 1] = { k[2], f(s[k[1]].mean), f(s[k[1]].max) } end
  end
  return table_text({ "measure", "mean", "max" }, rows)
end
-- }======================================================

-- {====================================================== charts
local function series(title, rows, x, y, scale, style)
  local pts = {}
  for _, r in ipairs(rows) do
    local yv = r.m[y]
    if type(yv) == "number" and yv == yv then pts[#pts + 1] = { x(r), yv * (scale or 1) } end
  end
  return { title = title, points = pts, style = style or "linespoints" }
end

local function latency_series(rows, x)
  return { series("mean E2E latency", rows, x, "mean_e2el_ms"), series("P95 E2E latency", rows, x, "p95_e2el_ms"),
           series("mean TTFT", rows, x, "mean_ttft_ms"), series("P95 TTFT", rows, x, "p95_ttft_ms") }
end

local function xtics(rows, x)
  local t = {}
  for _, r in ipairs(rows) do t[#t + 1] = string.format("%g", x(r)) end
  return "(" .. table.concat(t, ", ") .. ")"
end

--- the charts of the results: a list of { name, spec } (gptoss.plot specs)
function M.charts(results)
  local out = {}
  local prompt = M.rows(results, "prompt_length")
  if #prompt > 0 then
    local x = function(r) return r.m.prompt_len end
    out[#out + 1] = { name = "latency_prompt", spec = { title = "Latency vs prompt length (concurrency 1)",
      xlabel = "prompt tokens", ylabel = "ms", logx = true, xtics = xtics(prompt, x), series = latency_series(prompt, x) } }
  end
  local temp = M.rows(results, "temperature")
  if #temp > 0 then
    local x = function(r) return tonumber(r.key) end
    out[#out + 1] = { name = "latency_temperature", spec = { title = "Latency vs temperature (medium prompt)",
      xlabel = "temperature", ylabel = "ms", xtics = xtics(temp, x), series = latency_series(temp, x) } }
  end
  local workers = M.rows(results, "workers")
  if #workers > 0 then
    local x = function(r) return tonumber(r.key) end
    out[#out + 1] = { name = "latency_concurrency", spec = { title = "Latency vs concurrency (medium prompt)",
      xlabel = "requests in flight", ylabel = "ms", logx = true, xtics = xtics(workers, x), series = latency_series(workers, x) } }
  end
  local samples = results.resources or {}
  if #samples > 0 then
    local function over_time(title, k)
      local pts = {}
      for _, s in ipairs(samples) do if s[k] then pts[#pts + 1] = { s.t, s[k] } end end
      return { title = title, points = pts, style = "lines" }
    end
    out[#out + 1] = { name = "resources_cpu", spec = { title = "CPU over the run", xlabel = "seconds",
      ylabel = "% of one core", series = { over_time("CPU", "cpu_pct") } } }
    out[#out + 1] = { name = "resources_memory", spec = { title = "Memory over the run", xlabel = "seconds", ylabel = "MiB",
      series = { over_time("RSS", "rss_mib"), over_time("KV cache in use", "kv_mib"), over_time("GPU memory", "gpu_mib") } } }
  end
  return out
end

--- a chart as text (gnuplot's dumb terminal, its leading form feed removed), or nil, message
function M.dumb(spec)
  local text, err = plot.chart(spec, "dumb", { width = 90, height = 24 })
  if not text then return nil, err end
  return (text:gsub("^\f", ""):gsub("^%s*\n", ""))
end
-- }======================================================

-- {====================================================== the report
--- the report in Markdown; opts.charts: "dumb" (text charts inline), a
-- table { name = true | message } (PNG links to name.png, or the message
-- why there is none), or nil (no charts)
function M.markdown(results, opts)
  opts = opts or {}
  local info, o = results.info or {}, results.options or {}
  local L = { "# Latency study: " .. (info.source or "") .. "\n" }
  L[#L + 1] = string.format("Model %s%s on %s%s, %s. %s requests a prompt length and temperature (concurrency: max(2N, C)), " ..
    "%s tokens out each (no stop tokens), prompts from %s.\n",
    info.model ~= "" and info.model and ("`" .. info.model .. "`") or "?", info.model_type and (" (" .. info.model_type .. ")") or "",
    info.device or "?", info.threads and (", threads " .. info.threads) or "", info.date or "",
    tostring(o.requests), tostring(o.max_tokens), info.prompts == "ids" and "random token ids" or "the tokenizer")
  if next(results.prompt_length or {}) then
    L[#L + 1] = "## Prompt-length impact (concurrency 1, temperature 1)\n"
    L[#L + 1] = M.prompt_table(results)
  end
  if next(results.temperature or {}) then
    L[#L + 1] = "## Temperature impact (medium prompt, concurrency 1)\n"
    L[#L + 1] = M.temperature_table(results)
  end
  if next(results.workers or {}) then
    L[#L + 1] = "## Concurrency (medium prompt, temperature 1)\n"
    L[#L + 1] = M.workers_table(results)
  end
  L[#L + 1] = "tokens/s: a request's output tokens over its E2E latency (the mean over requests); " ..
    "output tok/s (all): every output token of the phase over its duration (vLLM's output_throughput).\n"
  local samples = results.resources or {}
  L[#L + 1] = string.format("## Resources (%d samples, every %s s)\n", #samples, tostring(info.interval or "?"))
  if #samples > 0 then L[#L + 1] = M.resources_table(samples) end
  for _, k in ipairs { "resources_note", "gpu_note" } do
    if results[k] then L[#L + 1] = results[k] .. ".\n" end
  end
  if opts.charts then
    L[#L + 1] = "## Charts\n"
    for _, c in ipairs(M.charts(results)) do
      if opts.charts == "dumb" then
        local text, err = M.dumb(c.spec)
        L[#L + 1] = text and ("```\n" .. text:gsub("%s+$", "") .. "\n```\n") or ("(" .. c.name .. ": " .. err .. ")\n")
      else
        local made = opts.charts[c.name]
        L[#L + 1] = made == true and string.format("![%s](%s.png)\n", c.spec.title, c.name)
          or string.format("(%s: %s)\n", c.name, tostring(made or "not drawn"))
      end
    end
  end
  return table.concat(L, "\n")
end

-- a copy of the results that the JSON encoder writes: NaN as null, lists as arrays
local function jsonable(v)
  if type(v) == "number" then return v == v and v or json.null end
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = jsonable(x) end
  if #v > 0 or next(v) == nil then return json.array(out) end
  return out
end

--- the results as JSON text (keys sorted; NaN written as null)
function M.json(results)
  return json.encode_python(jsonable(results)) .. "\n"
end

--- write(results, dir) -> the files written, or nil, message: report.md,
-- study.json, the PNG charts and charts.txt. A chart gnuplot cannot draw is
-- left out, and the report says why.
function M.write(results, dir)
  local ok, err = files.mkdir_p(dir)
  if not ok then return nil, err end
  local written, made, dumb = {}, {}, {}
  for _, c in ipairs(M.charts(results)) do
    local path = dir .. "/" .. c.name .. ".png"
    local pok, perr = plot.chart(c.spec, path)
    made[c.name] = pok or perr
    if pok then written[#written + 1] = path end
    local text = M.dumb(c.spec)
    if text then dumb[#dumb + 1] = c.spec.title .. "\n\n" .. text end
  end
  local outputs = { { "report.md", M.markdown(results, { charts = made }) }, { "study.json", M.json(results) } }
  if #dumb > 0 then outputs[#outputs + 1] = { "charts.txt", table.concat(dumb, "\n\n") } end
  for _, f in ipairs(outputs) do
    local path = dir .. "/" .. f[1]
    local wok, werr = files.write_file(path, f[2])
    if not wok then return nil, path .. ": " .. tostring(werr) end
    written[#written + 1] = path
  end
  return written
end
-- }======================================================

return M
