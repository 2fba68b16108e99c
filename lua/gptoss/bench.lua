--- gptoss.bench: llama-bench's tests, in-process, on any device.
--
--   local bench = require "gptoss.bench"
--   local results = bench.run(model, { n_prompt = { 512 }, n_gen = { 128 }, pg = { { 512, 128 } },
--                                      n_depth = { 0, 4096 }, repetitions = 5 })
--   io.write(bench.format(results, "md"))          -- or "csv", "json"
--
-- As llama-bench (ggml-org/llama.cpp, tools/llama-bench): pp N feeds an
-- N-token prompt in one pass (logits for its last token), tg N feeds N
-- tokens one at a time through the decode step that generation takes (with
-- its greedy draw, on the device on CUDA), pp N+tg M does both in one
-- timed run, and "@ dD"
-- first fills the KV cache with D tokens, untimed (once a test: each run
-- rewinds to it). Every test runs once
-- untimed (the prompt and one generated token) and then `repetitions`
-- times; t/s is (prompt + generated tokens) / seconds, given as mean ±
-- sample standard deviation over the repetitions. Token ids are a fixed
-- pseudo-random sequence; tokenization and sampling are not timed.
-- The CSV and JSON fields are llama-bench's names where gptoss has the
-- same fact (build_commit, cpu_info, gpu_info, backends, model_filename,
-- model_type, model_size, model_n_params, n_threads, n_prompt, n_gen,
-- n_depth, test_time, avg_ns, stddev_ns, avg_ts, stddev_ts, samples_ns,
-- samples_ts) plus device and precision.
local gptoss = require "gptoss"

local M = {}

--- M.ids(n, seed): n ordinary token ids from a seed (an LCG, the same in every Lua)
function M.ids(n, seed)
  local out, x = {}, seed
  for i = 1, n do x = (x * 1103515245 + 12345) % 2147483648; out[i] = 1000 + x % 100000 end
  return out
end
local ids = M.ids

local function shell(cmd)
  local h = io.popen(cmd .. " 2>/dev/null")
  if not h then return nil end
  local out = h:read("*a") or ""
  h:close()
  out = out:gsub("%s+$", "")
  return out ~= "" and out or nil
end

-- mean and sample standard deviation (llama-bench's stddev)
local mean_sd = require("gptoss.stats").mean_sd
M.mean_sd = mean_sd

--- the model's facts the tables show
function M.model_info(model, dir)
  local size, params = 0, 0
  for _, t in ipairs(model:tensors()) do
    size = size + t.bytes
    if t.name:match("_blocks$") then params = params + 2 * t.bytes          -- MXFP4: two values a byte
    elseif not t.name:match("_scales$") then
      local n = 1
      for _, d in ipairs(t.shape) do n = n * d end
      params = params + n
    end
  end
  local c = model.config
  size, params = math.floor(size), math.floor(params)   -- integers in Lua 5.4's JSON
  return { size = size, params = params, dir = dir,
           type = string.format("gpt-oss %s MXFP4 (%d layers, %d experts)",
             params >= 1e9 and string.format("%.0fB", params / 1e9) or string.format("%.0fM", params / 1e6),
             c.num_hidden_layers, c.num_local_experts) }
end

--- the tests of the options, in llama-bench's order: every pp, then every
-- tg, then every pg, each at every depth
function M.tests(opts)
  local out = {}
  for _, d in ipairs(opts.n_depth or { 0 }) do
    for _, p in ipairs(opts.n_prompt or { 512 }) do if p > 0 then out[#out + 1] = { n_prompt = p, n_gen = 0, n_depth = d } end end
    for _, g in ipairs(opts.n_gen or { 128 }) do if g > 0 then out[#out + 1] = { n_prompt = 0, n_gen = g, n_depth = d } end end
    for _, pg in ipairs(opts.pg or {}) do out[#out + 1] = { n_prompt = pg[1], n_gen = pg[2], n_depth = d } end
  end
  return out
end

--- the test's name as llama-bench writes it: pp512, tg128, pp512+tg128, "@ d4096"
function M.name(t)
  local s
  if t.n_prompt > 0 and t.n_gen > 0 then s = string.format("pp%d+tg%d", t.n_prompt, t.n_gen)
  elseif t.n_prompt > 0 then s = "pp" .. t.n_prompt else s = "tg" .. t.n_gen end
  if t.n_depth > 0 then s = s .. " @ d" .. t.n_depth end
  return s
end

-- One session a test: the depth is fed once, untimed, and each run rewinds
-- to it, so that the session's decode step (on CUDA a graph captured on a
-- session's first step) is made once, as in a generation, not once a run.
local function test_session(model, t)
  local n = t.n_prompt + t.n_gen + 1
  local s = model:session { context = t.n_depth + n + 8, rewind = n }
  if t.n_depth > 0 then s:feed(ids(t.n_depth, 7), "none") end
  return s
end

-- one run of a test: seconds for its prompt and generation
local function once(s, t, rep, n_gen, greedy)
  local clock = gptoss.core.clock
  s:rewind(t.n_depth)
  local gen = ids(math.max(1, n_gen), 1000 + rep)
  local t0 = clock()
  if t.n_prompt > 0 then s:feed(ids(t.n_prompt, 100 + rep), "last") end
  -- each token through the decode step model:generate takes (on CUDA the
  -- graph-captured fused step); the token it draws is not used
  for i = 1, n_gen do s:step(gen[i], greedy) end
  return clock() - t0
end

--- runs the tests; opts: n_prompt, n_gen (lists), pg (list of { pp, tg }),
-- n_depth (list), repetitions (5), warmup (true), threads (for the
-- record), device, precision, dir, progress (a bar on stderr)
function M.run(model, opts)
  opts = opts or {}
  local reps = opts.repetitions or 5
  local info = M.model_info(model, opts.dir or "")
  local tests = M.tests(opts)
  local device = model.device or opts.device or "cpu"
  local common = {
    build_commit = opts.commit or shell("git rev-parse --short HEAD") or "unknown", build_number = 0,
    cpu_info = (shell("grep -m1 'model name' /proc/cpuinfo") or ""):gsub("^.-:%s*", ""),
    gpu_info = device:match("^cuda") and (shell("nvidia-smi --query-gpu=name --format=csv,noheader | head -1") or "") or "",
    backends = device:match("^cuda") and "CUDA" or "CPU", model_filename = info.dir, model_type = info.type,
    model_size = info.size, model_n_params = info.params, n_threads = opts.threads or gptoss.core.cpu_count(),
    device = device, precision = model.precision or "exact",
  }
  local bar = opts.progress and require("gptoss.progress").new { label = "bench", total = #tests * reps, unit = "runs" }
  local results, done = {}, 0
  local greedy = gptoss.sampler(model.config.vocab_size, { temperature = 0 })
  for _, t in ipairs(tests) do
    local s = test_session(model, t)
    if opts.warmup ~= false then once(s, t, 0, t.n_gen > 0 and 1 or 0, greedy) end
    local ns, ts = {}, {}
    for rep = 1, reps do
      local dt = once(s, t, rep, t.n_gen, greedy)
      ns[rep] = math.floor(dt * 1e9 + 0.5)
      ts[rep] = (t.n_prompt + t.n_gen) / dt
      done = done + 1
      if bar then bar:update(done, { { "test", M.name(t) }, { "t/s", string.format("%.2f", ts[rep]) } }) end
    end
    s:close()
    local r = {}
    for k, v in pairs(common) do r[k] = v end
    r.n_prompt, r.n_gen, r.n_depth = t.n_prompt, t.n_gen, t.n_depth
    r.test_time = os.date("!%Y-%m-%dT%H:%M:%SZ")
    local avg_ns, sd_ns = mean_sd(ns)
    r.avg_ns, r.stddev_ns = math.floor(avg_ns + 0.5), math.floor(sd_ns + 0.5)
    r.avg_ts, r.stddev_ts = mean_sd(ts)
    r.samples_ns, r.samples_ts = ns, ts
    r.test = M.name(t)
    results[#results + 1] = r
  end
  if bar then bar:finish() end
  return results
end

M.FIELDS = { "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type",
  "model_size", "model_n_params", "n_threads", "device", "precision", "n_prompt", "n_gen", "n_depth", "test_time",
  "avg_ns", "stddev_ns", "avg_ts", "stddev_ts" }

local function size_text(b)
  if b >= 2 ^ 30 then return string.format("%.2f GiB", b / 2 ^ 30) end
  return string.format("%.2f MiB", b / 2 ^ 20)
end

local function params_text(n)
  if n >= 1e9 then return string.format("%.2f B", n / 1e9) end
  if n >= 1e6 then return string.format("%.2f M", n / 1e6) end
  return string.format("%.2f K", n / 1e3)
end

local function csv_value(v)
  if type(v) == "number" then
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return string.format('"%d"', v) end
    return string.format('"%.6f"', v)
  end
  return '"' .. tostring(v):gsub('"', '""') .. '"'
end

--- the results as llama-bench prints them: "md" (the table), "csv", "json"
-- (results read back from the JSON format again too)
function M.format(results, fmt)
  fmt = fmt or "md"
  if fmt == "md" then
    local rows = { { "model", "size", "params", "backend", "threads", "test", "t/s" } }
    for _, r in ipairs(results) do
      rows[#rows + 1] = { r.model_type, size_text(r.model_size), params_text(r.model_n_params), r.backends,
        tostring(r.n_threads), r.test or M.name(r), string.format("%.2f ± %.2f", r.avg_ts, r.stddev_ts) }
    end
    local right = { false, true, true, false, true, true, true }
    local w = {}
    for c = 1, 7 do
      w[c] = 0
      for _, row in ipairs(rows) do w[c] = math.max(w[c], utf8 and utf8.len(row[c]) or #row[c]:gsub("[\128-\191]", "")) end
    end
    local function cell(s, c)
      local len = utf8 and utf8.len(s) or #s:gsub("[\128-\191]", "")
      local pad = string.rep(" ", w[c] - len)
      return right[c] and pad .. s or s .. pad
    end
    local lines = {}
    for i, row in ipairs(rows) do
      local cells = {}
      for c = 1, 7 do cells[c] = cell(row[c], c) end
      lines[#lines + 1] = "| " .. table.concat(cells, " | ") .. " |"
      if i == 1 then
        local rule = {}
        for c = 1, 7 do rule[c] = right[c] and string.rep("-", w[c] - 1) .. ":" or string.rep("-", w[c]) end
        lines[#lines + 1] = "| " .. table.concat(rule, " | ") .. " |"
      end
    end
    return table.concat(lines, "\n") .. "\n"
  elseif fmt == "csv" then
    local lines = { table.concat(M.FIELDS, ",") }
    for _, r in ipairs(results) do
      local row = {}
      for i, f in ipairs(M.FIELDS) do row[i] = csv_value(r[f]) end
      lines[#lines + 1] = table.concat(row, ",")
    end
    return table.concat(lines, "\n") .. "\n"
  elseif fmt == "json" then
    local json = require "gptoss.json"
    local out = {}
    for i, r in ipairs(results) do
      local kv = {}
      for _, f in ipairs(M.FIELDS) do kv[#kv + 1] = f; kv[#kv + 1] = r[f] end
      kv[#kv + 1] = "samples_ns"; kv[#kv + 1] = json.array(r.samples_ns)
      kv[#kv + 1] = "samples_ts"; kv[#kv + 1] = json.array(r.samples_ts)
      out[i] = json.object(kv)
    end
    return json.encode_python(json.array(out)) .. "\n"
  end
  error("bench: output format must be md, csv or json (got " .. tostring(fmt) .. ")", 2)
end

return M
