--- gptoss.bench_study: the seeds' Ollama latency study, run in this process
-- through gptoss.engine (bench/serve.lua runs the same plan over HTTP with
-- the metrics, tables and JSON layout from here, so the two sit side by side).
--
--   local study = require "gptoss.bench_study"
--   local results = study.run(model, { requests = 10, prompt = 512, max_tokens = 256, progress = true })
--   io.write(study.markdown(results, { charts = "dumb" }))
--   study.write(results, "out")      -- report.md, study.json and the PNG charts
--
-- The phases, each a closed loop that keeps `concurrency` requests in the
-- engine (a finished one is replaced at once):
--   prompt_length  short (max(8, prompt/16) tokens), medium (prompt), long
--                  (4 * prompt): `requests` each, concurrency 1, temperature 1
--   temperature    each of `temperatures` (0, 0.7, 1.0) on the medium prompt
--   workers        each of `concurrency` (1, 2, 4, 8) on the medium prompt,
--                  max(2 * requests, c) requests
-- Every request generates exactly max_tokens (no stop tokens: vLLM's
-- ignore_eos), with its own seed. Prompts are text of common words encoded
-- by the model's tokenizer and cut to the length (random ordinary ids when
-- the model has none), different for every request and the same every run;
-- the engine's prefix cache is off so no prompt is served from another's.
--
-- Each phase's metrics are vLLM's (benchmark_serving's result names):
-- completed, failed, duration, total_input_tokens, total_output_tokens,
-- request_throughput, output_throughput, total_token_throughput and
-- mean_/median_/std_/p90_/p95_/p99_ of ttft_ms, tpot_ms, itl_ms, e2el_ms
-- (percentiles as np.percentile, std as np.std), plus the same summary of
-- request_tps (a request's output tokens over its E2E latency, Ollama's
-- tokens/s) and vLLM's per-request lists input_lens, output_lens, ttfts,
-- itls and latencies (seconds). TTFT, ITL and E2E are timed here as a
-- client times them: from submit to the poll that returns the first ids,
-- between such polls, and to the poll that returns the end; engine_ttfts
-- and engine_latencies are the engine's own times (req:result().timings).
--
-- Resources are sampled every `interval` seconds over the whole run: CPU
-- (the process's user + system time from /proc/self/stat, as % of one
-- core), RSS (/proc/self/status), the engine's KV cache in use
-- (eng:stats()), and on CUDA gptoss's device memory (weights and workspace
-- from model:memory() before the engine starts, plus the KV in use; the
-- engine owns the model while it runs, so model:memory() cannot be asked
-- then). On the CPU there is no GPU memory, and the report says so.
local stats = require "gptoss.stats"

local M = {}

-- {====================================================== arguments
local function quote(v)
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

local function check_int(fn, name, v, lo)
  if type(v) ~= "number" or v ~= math.floor(v) or v < lo or v > 2147483647 then
    error(string.format("%s: %s must be an integer >= %d (got %s)", fn, name, lo, quote(v)), 3)
  end
  return v
end

local function check_list(fn, name, v, lo, int)
  if type(v) ~= "table" or #v == 0 then error(string.format("%s: %s must be a non-empty list (got %s)", fn, name, quote(v)), 3) end
  for i, x in ipairs(v) do
    if type(x) ~= "number" or x ~= x or x < lo or x == math.huge or (int and x ~= math.floor(x)) then
      error(string.format("%s: %s[%d] must be %s >= %s (got %s)", fn, name, i, int and "an integer" or "a number", lo, quote(x)), 3)
    end
  end
  return v
end

--- the study's options with their defaults, checked (fn names the caller in messages)
function M.options(opts, fn)
  fn = fn or "bench_study"
  if opts ~= nil and type(opts) ~= "table" then error(fn .. ": options must be a table (got " .. quote(opts) .. ")", 3) end
  opts = opts or {}
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.requests = check_int(fn, "requests", o.requests or 10, 1)
  o.prompt = check_int(fn, "prompt", o.prompt or 512, 1)
  o.max_tokens = check_int(fn, "max_tokens", o.max_tokens or 256, 1)
  o.seed = check_int(fn, "seed", o.seed or 1, 0)
  o.temperatures = check_list(fn, "temperatures", o.temperatures or { 0, 0.7, 1.0 }, 0)
  o.concurrency = check_list(fn, "concurrency", o.concurrency or { 1, 2, 4, 8 }, 1, true)
  o.interval = o.interval or 0.5
  if type(o.interval) ~= "number" or not (o.interval > 0) then
    error(string.format("%s: interval must be a number > 0 (got %s)", fn, quote(o.interval)), 3)
  end
  return o
end
-- }======================================================

-- {====================================================== the plan
--- the key of a temperature in the results (the same text in every Lua: "0", "0.7", "1")
function M.temperature_key(t) return string.format("%g", t) end

--- the phases of the study, in order: { group, key, label, prompt_len, n,
-- concurrency, temperature }; opts as M.options takes them
function M.plan(opts)
  local o = M.options(opts, "bench_study.plan")
  local sizes = { { "short", math.max(8, math.floor(o.prompt / 16)) }, { "medium", o.prompt }, { "long", o.prompt * 4 } }
  local phases = {}
  for _, s in ipairs(sizes) do
    phases[#phases + 1] = { group = "prompt_length", key = s[1], label = "prompt " .. s[1], prompt_len = s[2],
                            n = o.requests, concurrency = 1, temperature = 1 }
  end
  for _, t in ipairs(o.temperatures) do
    phases[#phases + 1] = { group = "temperature", key = M.temperature_key(t), label = "temperature " .. M.temperature_key(t),
                            prompt_len = o.prompt, n = o.requests, concurrency = 1, temperature = t }
  end
  for _, c in ipairs(o.concurrency) do
    phases[#phases + 1] = { group = "workers", key = tostring(math.floor(c)), label = "concurrency " .. math.floor(c),
                            prompt_len = o.prompt, n = math.max(2 * o.requests, c), concurrency = math.floor(c), temperature = 1 }
  end
  return phases
end

--- runs the plan: runner(phase) -> metrics for each phase (after
-- on_phase(phase, i, #phases) if given); results.prompt_length[key],
-- results.temperature[key], results.workers[key] hold the metrics, each
-- with the phase's prompt_len, concurrency, temperature and requests
function M.study(runner, opts, on_phase)
  local plan = M.plan(opts)
  local results = { prompt_length = {}, temperature = {}, workers = {}, plan = plan }
  for i, phase in ipairs(plan) do
    if on_phase then on_phase(phase, i, #plan) end
    local m = runner(phase)
    m.prompt_len, m.concurrency, m.temperature, m.requests = phase.prompt_len, phase.concurrency, phase.temperature, phase.n
    results[phase.group][phase.key] = m
  end
  return results
end
-- }======================================================

-- {====================================================== metrics
local SUMMARY = { "mean", "median", "std", "p90", "p95", "p99" }

-- adds vLLM's names for a summary of values: mean_ttft_ms, p95_ttft_ms, ...
local function add_summary(m, name, values)
  local s = stats.summary(values)
  for _, k in ipairs(SUMMARY) do m[k .. "_" .. name] = s[k] end
end

--- metrics(records, duration) -> vLLM's serving metrics of finished
-- requests. A record: ok, t0 (sent), t_first (first tokens), chunks (the
-- times tokens arrived, t_first first), t_end, prompt_tokens, output_tokens
-- (seconds on one clock). A record not ok, or without tokens, is failed.
function M.metrics(records, duration)
  local ttft, tpot, itl, e2el, tps = {}, {}, {}, {}, {}
  local m = { completed = 0, failed = 0, duration = duration, total_input_tokens = 0, total_output_tokens = 0,
              input_lens = {}, output_lens = {}, ttfts = {}, itls = {}, latencies = {} }
  for _, r in ipairs(records) do
    if r.ok and r.t_first then
      m.completed = m.completed + 1
      m.total_input_tokens = m.total_input_tokens + r.prompt_tokens
      m.total_output_tokens = m.total_output_tokens + r.output_tokens
      local first, latency = r.t_first - r.t0, r.t_end - r.t0
      ttft[#ttft + 1], e2el[#e2el + 1] = first * 1000, latency * 1000
      if r.output_tokens > 1 then tpot[#tpot + 1] = (latency - first) * 1000 / (r.output_tokens - 1) end
      local gaps = {}
      for k = 2, #r.chunks do
        gaps[k - 1] = r.chunks[k] - r.chunks[k - 1]
        itl[#itl + 1] = gaps[k - 1] * 1000
      end
      if latency > 0 then tps[#tps + 1] = r.output_tokens / latency end
      local n = m.completed
      m.input_lens[n], m.output_lens[n], m.ttfts[n], m.itls[n], m.latencies[n] = r.prompt_tokens, r.output_tokens, first, gaps, latency
      if r.engine_ttft then
        m.engine_ttfts, m.engine_latencies = m.engine_ttfts or {}, m.engine_latencies or {}
        m.engine_ttfts[n], m.engine_latencies[n] = r.engine_ttft, r.engine_latency
      end
    else
      m.failed = m.failed + 1
    end
  end
  m.request_throughput = m.completed / duration
  m.output_throughput = m.total_output_tokens / duration
  m.total_token_throughput = (m.total_input_tokens + m.total_output_tokens) / duration
  add_summary(m, "ttft_ms", ttft)
  add_summary(m, "tpot_ms", tpot)
  add_summary(m, "itl_ms", itl)
  add_summary(m, "e2el_ms", e2el)
  add_summary(m, "request_tps", tps)
  return m
end
-- }======================================================

-- {====================================================== resources
local clk_tck
local function ticks_per_second()
  if not clk_tck then
    local h = io.popen("getconf CLK_TCK 2>/dev/null")
    clk_tck = h and tonumber((h:read("*a") or ""):match("%d+")) or 100
    if h then h:close() end
  end
  return clk_tck
end

--- proc_sample(pid) -> CPU seconds (user + system, all threads), RSS bytes
-- of a process ("self": this one) from /proc; nil where there is no /proc
function M.proc_sample(pid)
  local f = io.open("/proc/" .. pid .. "/stat", "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  local fields = {}
  for x in (s:match("%) (.*)$") or ""):gmatch("%S+") do fields[#fields + 1] = x end
  local ticks = tonumber(fields[12]) + tonumber(fields[13])   -- utime, stime: fields 14 and 15 of proc(5)
  f = io.open("/proc/" .. pid .. "/status", "rb")
  if not f then return nil end
  local st = f:read("*a")
  f:close()
  return ticks / ticks_per_second(), tonumber(st:match("VmRSS:%s*(%d+)")) * 1024
end

local Sampler = {}
Sampler.__index = Sampler

--- a resource sampler: sampler:tick(phase) samples when `interval` seconds
-- have passed since the last sample; opts: pid ("self"), interval, clock,
-- extra (a function returning fields to add, e.g. kv_mib and gpu_mib)
function M.sampler(opts)
  local clock = opts.clock or require("gptoss").core.clock
  local cpu = M.proc_sample(opts.pid or "self")
  local now = clock()
  return setmetatable({ pid = opts.pid or "self", interval = opts.interval or 1, clock = clock, extra = opts.extra,
    start = now, last_t = now, last_cpu = cpu, available = cpu ~= nil, samples = {} }, Sampler)
end

--- takes a sample now: { t (seconds since the start), cpu_pct, rss_mib, phase, ... }
function Sampler:sample(phase)
  local cpu, rss = M.proc_sample(self.pid)
  local t = self.clock()
  if not cpu or not self.last_cpu or t <= self.last_t then return nil end
  local s = { t = t - self.start, cpu_pct = (cpu - self.last_cpu) / (t - self.last_t) * 100, rss_mib = rss / 2 ^ 20,
              phase = phase }
  if self.extra then for k, v in pairs(self.extra()) do s[k] = v end end
  self.samples[#self.samples + 1] = s
  self.last_t, self.last_cpu = t, cpu
  return s
end

function Sampler:tick(phase)
  if self.available and self.clock() - self.last_t >= self.interval then return self:sample(phase) end
end

--- the summary of samples by field: { cpu_pct = { mean, max }, rss_mib = ..., ... }
function M.resource_summary(samples)
  local out = {}
  for _, k in ipairs { "cpu_pct", "rss_mib", "kv_mib", "gpu_mib" } do
    local v = {}
    for _, s in ipairs(samples) do if s[k] then v[#v + 1] = s[k] end end
    if #v > 0 then
      local s = stats.summary(v)
      out[k] = { mean = s.mean, max = s.max, n = s.n }
    end
  end
  return out
end
-- }======================================================

-- {====================================================== prompts
local WORDS = {
  "the", "model", "reads", "a", "long", "letter", "about", "rivers", "and", "mountains", "in", "spring", "while",
  "quiet", "engineers", "measure", "every", "token", "that", "passes", "through", "its", "layers", "of", "attention",
  "experts", "weigh", "small", "numbers", "before", "morning", "light", "returns", "to", "city", "where", "trains",
  "carry", "books", "bread", "music", "under", "bridges", "old", "stone", "green", "fields", "clear", "water", "wind",
}

-- a Park-Miller generator: its products stay below 2^53, so the sequence is
-- the same in Lua 5.4's integers and LuaJIT's doubles
local function lcg(seed)
  local x = seed % 2147483646 + 1
  return function(n)
    x = x * 16807 % 2147483647
    return x % n
  end
end

--- prompt_ids(tokenizer, len, index [, vocab]) -> exactly len token ids:
-- sentences of common words, chosen by index, encoded by the tokenizer and
-- cut to len (tokenizer nil: pseudo-random ids, ordinary o200k ones where
-- the vocabulary has them, all below vocab)
function M.prompt_ids(tokenizer, len, index, vocab)
  local rand = lcg(index * 7919 + len)
  if not tokenizer then
    local ids, hi = {}, math.min(vocab or 100000, 100000)
    for i = 1, len do ids[i] = (hi > 2000 and 1000 or 0) + rand(hi > 2000 and hi - 1000 or hi) end
    return ids
  end
  local words, ids = {}, {}
  while #ids < len do
    for _ = 1, len - #ids + 8 do   -- a word is a token or more
      local n = #words
      local w = WORDS[rand(#WORDS) + 1]
      if n == 0 or words[n]:sub(-1) == "." then w = w:sub(1, 1):upper() .. w:sub(2) end
      words[n + 1] = rand(9) == 0 and w .. "." or w
    end
    ids = tokenizer:encode(table.concat(words, " "))
  end
  for i = #ids, len + 1, -1 do ids[i] = nil end
  return ids
end
-- }======================================================

-- {====================================================== the engine
local function now() return require("gptoss").core.clock() end

--- engine_phase(eng, prompts, opts) -> records, duration: the prompts
-- through the engine, opts.concurrency of them in flight at once (a
-- finished one replaced at once); opts: concurrency, max_tokens,
-- temperature, seed (the first request's; then one more each), stop_tokens
-- ({}: none), logit_bias, tick (called on every turn), on_done(record)
function M.engine_phase(eng, prompts, opts)
  local n, c = #prompts, opts.concurrency or 1
  local records, active, next_i = {}, {}, 1
  local t_start = now()
  while #records < n do
    while #active < c and next_i <= n do
      local rec = { t0 = now(), chunks = {}, prompt_tokens = #prompts[next_i], output_tokens = 0 }
      local req, err = eng:submit(prompts[next_i], { max_tokens = opts.max_tokens, temperature = opts.temperature,
        seed = (opts.seed or 0) + next_i - 1, stop_tokens = opts.stop_tokens, logit_bias = opts.logit_bias })
      next_i = next_i + 1
      if req then rec.req = req; active[#active + 1] = rec
      else
        rec.ok, rec.error, rec.t_end = false, err, now()
        records[#records + 1] = rec
        if opts.on_done then opts.on_done(rec) end
      end
    end
    if #active > 0 then eng:wait(0.25) end
    local t = now()
    local keep = {}
    for _, rec in ipairs(active) do
      local ids, _, done = rec.req:poll()
      if #ids > 0 then
        rec.t_first = rec.t_first or t
        rec.chunks[#rec.chunks + 1] = t
        rec.output_tokens = rec.output_tokens + #ids
      end
      if done then
        local res = rec.req:result()
        rec.t_end, rec.finish_reason, rec.error = t, res.finish_reason, res.error
        rec.ok = res.finish_reason ~= "error" and res.finish_reason ~= "cancelled"
        rec.usage_tokens = res.usage.completion_tokens
        rec.engine_ttft, rec.engine_latency = res.timings.first_token, res.timings.finished
        rec.req:close()
        rec.req = nil
        records[#records + 1] = rec
        if opts.on_done then opts.on_done(rec) end
      else
        keep[#keep + 1] = rec
      end
    end
    active = keep
    if opts.tick then opts.tick() end
  end
  return records, now() - t_start
end

local ENGINE_COUNTERS = { "generated_tokens", "prompt_tokens", "prefill_tokens", "steps", "completed", "failed" }

--- run(model, opts) -> results: the study in this process. opts: as
-- M.options (requests, prompt, max_tokens, temperatures, concurrency,
-- interval, seed) plus warmup (true: one short untimed request first),
-- progress (a bar on stderr), dir and device (for the report)
function M.run(model, opts)
  local gptoss = require "gptoss"
  if type(model) ~= "userdata" and type(model) ~= "table" then
    error("bench_study.run: model must be a loaded model (got " .. quote(model) .. ")", 2)
  end
  local o = M.options(opts, "bench_study.run")
  local plan = M.plan(o)
  local longest, most, total = 0, 0, 0
  for _, p in ipairs(plan) do
    longest, most, total = math.max(longest, p.prompt_len), math.max(most, p.concurrency), total + p.n
  end
  local cfg = model.config
  local context = longest + o.max_tokens + 1
  if cfg.max_position_embeddings and context > cfg.max_position_embeddings then
    error(string.format("bench_study.run: the long prompt (%d tokens) and max_tokens (%d) exceed the model's context (%d)",
      longest, o.max_tokens, cfg.max_position_embeddings), 2)
  end
  local device = model.device or o.device or "cpu"
  local mem_before = model:memory()
  local on_gpu = (mem_before.device_total or 0) > 0
  local eng = gptoss.engine(model, { max_batch = most, max_queue = math.max(most, 16), prefix_cache = 0, context = context })
  local base_bytes = (mem_before.total or 0) - (mem_before.kv or 0)   -- weights and workspace; the KV comes from the engine
  local sampler = M.sampler { interval = o.interval, extra = function()
    local s = eng:stats()
    local extra = { kv_mib = s.kv_in_use / 2 ^ 20 }
    if on_gpu then extra.gpu_mib = (base_bytes + s.kv_in_use) / 2 ^ 20 end
    return extra
  end }
  local bar = o.progress and require("gptoss.progress").new { label = "study", total = total, unit = "requests" }
  local tok = model.tokenizer
  local index, done, phase_now = 0, 0, "warmup"
  local function tick() sampler:tick(phase_now) end
  local ok, results = pcall(function()
    if o.warmup ~= false then
      M.engine_phase(eng, { M.prompt_ids(tok, math.min(8, longest), 0, cfg.vocab_size) },
        { max_tokens = math.min(2, o.max_tokens), temperature = 1, seed = o.seed, stop_tokens = {}, tick = tick })
    end
    sampler:sample("start")
    return M.study(function(phase)
      phase_now = phase.label
      local prompts = {}
      for i = 1, phase.n do prompts[i] = M.prompt_ids(tok, phase.prompt_len, index + i, cfg.vocab_size) end
      local before = eng:stats()
      local records, duration = M.engine_phase(eng, prompts, {
        concurrency = phase.concurrency, max_tokens = o.max_tokens, temperature = phase.temperature,
        seed = o.seed + index, stop_tokens = {}, tick = tick,
        on_done = function(rec)
          done = done + 1
          if bar then
            bar:update(done, { { "phase", phase.label },
              { "latency", rec.t_end and string.format("%.2fs", rec.t_end - rec.t0) or "-" } })
          end
        end })
      index = index + phase.n
      local after = eng:stats()
      sampler:sample(phase.label)
      local m = M.metrics(records, duration)
      m.engine = {}
      for _, k in ipairs(ENGINE_COUNTERS) do m.engine[k] = after[k] - before[k] end
      m.usage_output_tokens = 0
      for _, r in ipairs(records) do m.usage_output_tokens = m.usage_output_tokens + (r.usage_tokens or 0) end
      return m
    end, o)
  end)
  if bar then bar:finish() end
  eng:close()
  if not ok then error(results, 0) end
  results.resources = sampler.samples
  results.resources_note = not sampler.available and "no /proc here: no CPU or RSS samples" or nil
  results.gpu_note = not on_gpu and "no GPU memory: the model runs on the CPU" or nil
  results.memory = { before = mem_before, after = model:memory() }
  local info = require("gptoss.bench").model_info(model, o.dir or "")
  results.info = { source = "in-process (gptoss.engine)", model = o.dir or "", model_type = info.type, device = device,
    threads = o.threads, date = os.date("!%Y-%m-%d %H:%M UTC"), prompts = tok and "tokenizer" or "ids",
    interval = o.interval }
  results.options = { requests = o.requests, prompt = o.prompt, max_tokens = o.max_tokens, seed = o.seed,
    temperatures = o.temperatures, concurrency = o.concurrency, warmup = o.warmup ~= false }
  return results
end
-- }======================================================

return M
