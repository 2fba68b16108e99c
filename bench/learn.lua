--- bench/learn.lua: serving and training on one engine (issue 25). For
-- each concurrency C: C clients stream requests (each submits again when
-- its request ends) for DURATION seconds, (a) alone and (b) while eng:train
-- trains a LoRA at SHARE of the engine's time; then (c) training alone for
-- the same time. Reported: output tokens/s, P50/P99 inter-token latency
-- (each token's arrival as a client polling after every engine step sees
-- it; numpy's percentiles) and training tokens/s (fed tokens of finished
-- backward passes). The clients' first requests are of staggered lengths.
--
--   lua5.4 bench/learn.lua [DIR] [DEVICE] [CONCURRENCY] [SHARE] [DURATION]
--
-- DIR defaults to /tmp/gptoss-20b, DEVICE cuda:0, CONCURRENCY "8,32",
-- SHARE 0.3, DURATION 20 s; prompts 512 tokens, replies 128, training
-- sequences 1,024 tokens (TRAIN_LEN), LoRA r 16 on attention and experts.
-- Prints Markdown; BENCH_JSON=path writes the numbers as JSON.
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local W = require "workload"
local now = gptoss.core.clock

local dir = arg[1] or "/tmp/gptoss-20b"
local device = arg[2] or "cuda:0"
local levels = {}
for c in (arg[3] or "8,32"):gmatch("%d+") do levels[#levels + 1] = tonumber(c) end
local SHARE = tonumber(arg[4] or "0.3")
local DURATION = tonumber(arg[5] or "20")
local PROMPT, OUTPUT = tonumber(os.getenv("PROMPT") or 512), tonumber(os.getenv("OUTPUT") or 128)
local TRAIN_LEN = tonumber(os.getenv("TRAIN_LEN") or 1024)

local m = assert(gptoss.load(dir, { device = device, context = math.max(PROMPT + OUTPUT, TRAIN_LEN) }))
-- numpy's percentile, as vLLM's benchmarks report them
local function pct(t, p) return #t > 0 and require("gptoss.stats").percentile(t, p) or 0 end

local data = {}
for k = 1, 64 do data[k] = { ids = W.ids(TRAIN_LEN, 900 + k) } end

-- C streaming clients for `duration` seconds on eng; train: a Task to poll meanwhile
local function serve(eng, C, duration, task)
  local live, n = {}, 0
  local itl, out_tokens = {}, 0
  local function submit(len)
    n = n + 1
    local req = assert(eng:submit(W.ids(PROMPT, 5000 + n), { temperature = 1.0, max_tokens = len or OUTPUT, stop_tokens = {}, seed = n }))
    live[#live + 1] = { req = req, last = nil }
  end
  local st0 = eng:stats()
  local t0 = now()
  -- the clients' first requests end at staggered times (client k's after
  -- k/C of the output), so that the streams do not all end at one step and
  -- leave the engine idle together, as steady traffic would not
  for k = 1, C do submit(math.max(1, math.ceil(OUTPUT * k / C))) end
  while true do
    eng:wait(1)
    if task then task:poll() end
    local t = now()
    local stopping = t - t0 >= duration
    for i = #live, 1, -1 do
      local c = live[i]
      local ids, _, fin = c.req:poll()
      if #ids > 0 then
        if c.last and not stopping then itl[#itl + 1] = (t - c.last) * 1e3 end
        for _ = 2, #ids do if not stopping then itl[#itl + 1] = 0 end end
        if not stopping then out_tokens = out_tokens + #ids end
        c.last = t
      end
      if fin or stopping then
        if not fin then c.req:cancel() end
        c.req:close()
        table.remove(live, i)
        if not stopping then submit() end
      end
    end
    if stopping and #live == 0 then break end
  end
  local dt = now() - t0
  local st1 = eng:stats()
  return { tok_s = out_tokens / math.min(dt, duration), p50 = pct(itl, 50), p99 = pct(itl, 99),
           train_tok_s = (st1.train_tokens - st0.train_tokens) / dt }
end

local function trainer(eng, share)
  local lora = gptoss.lora(m, { r = 16, alpha = 32, seed = 1 })
  return eng:train(lora, { data = data, steps = 100000, batch = 1, lr = 1e-5, share = share }), lora
end

local rows, json = {}, {}
for _, C in ipairs(levels) do
  local eng = gptoss.engine(m, { max_batch = C, max_queue = 4 * C, prefix_cache = 0, context = math.max(PROMPT + OUTPUT, TRAIN_LEN) })
  serve(eng, C, math.min(3, DURATION))   -- warm-up
  local alone = serve(eng, C, DURATION)
  local task, lora = trainer(eng, SHARE)
  local both = serve(eng, C, DURATION, task)
  task:cancel(); task:wait(); lora:close()
  local st0, t0 = eng:stats(), now()
  task, lora = trainer(eng, SHARE)
  while now() - t0 < DURATION do task:wait(1) end
  local train_alone = (eng:stats().train_tokens - st0.train_tokens) / (now() - t0)
  task:cancel(); task:wait(); lora:close()
  eng:close()
  rows[#rows + 1] = string.format("| %d | %.0f | %.0f | %.1f | %.1f | %.1f | %.1f | %.0f | %.0f |", C, alone.tok_s, both.tok_s,
    alone.p50, both.p50, alone.p99, both.p99, both.train_tok_s, train_alone)
  json[#json + 1] = { concurrency = C, share = SHARE, alone = alone, with_training = both, train_alone_tok_s = train_alone }
end
W.report(string.format("serving with training at share %.2f (prompt %d, output %d, training sequences %d tokens, %d s per phase, %s)",
  SHARE, PROMPT, OUTPUT, TRAIN_LEN, DURATION, device),
  { "streams", "out tok/s alone", "out tok/s training", "ITL p50 alone (ms)", "ITL p50 training", "ITL p99 alone",
    "ITL p99 training", "train tok/s serving", "train tok/s alone" }, rows, json)
