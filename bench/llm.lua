--- bench/llm.lua: gptoss on a 20B-shaped checkpoint (or any), on one device.
--
--   lua5.4 bench/llm.lua [DIR] [DEVICE] [PRECISION]
--
-- DIR defaults to $GPTOSS_BENCH_DIR or /tmp/gptoss-20b, generated there
-- first (tools/make_checkpoint.lua --preset 20b) when absent; DEVICE to
-- cuda:0 (cpu works too); PRECISION to exact. Prints a Markdown table and
-- appends it to bench/RESULTS.md (BENCH_RESULTS=path elsewhere, =- nowhere),
-- with the date, device and commit (BENCH_COMMIT, else git). Wall-clock time
-- throughout (the work runs on the device or on engine threads).
--
-- On a CUDA device where python3 has torch and transformers (BENCH_HF=0
-- turns it off), tools/reference/hf_bench.py first measures transformers on
-- the same checkpoint and the device-to-device copy bandwidth, in the same
-- run; the table then gives the ratios and the bandwidth floor. With
-- LLAMA_CPP=dir (a llama.cpp build, as gptoss.llama_cpp takes it) llama-bench
-- runs on the same checkpoint, converted to a GGUF, in the same run too.
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local checkpoint = require "gptoss.checkpoint"

local dir = arg[1] or os.getenv("GPTOSS_BENCH_DIR") or "/tmp/gptoss-20b"
local device = arg[2] or "cuda:0"
local precision = arg[3] or "exact"

local now = gptoss.core.clock
local cjson = require "cjson"

local function shell(cmd)
  local h = io.popen(cmd .. " 2>/dev/null")
  if not h then return nil end
  local out = h:read("*a"); h:close()
  out = out and out:gsub("%s+$", "")
  return out ~= "" and out or nil
end

local rows = {}
-- each row also goes to stderr as it is measured, so that a run cut short
-- still shows what it measured
local function row(what, value, unit, note)
  rows[#rows + 1] = { what, value, unit, note or "" }
  io.stderr:write(string.format("  %s: %.2f %s %s\n", what, value, unit, note or ""))
end

local f = io.open(dir .. "/config.json")
if f then f:close() else
  local t0 = now()
  assert(checkpoint.write { preset = "20b", seed = 0, out = dir, tokenizer = os.getenv("GPTOSS_TOKENIZER_DIR") or "tokenizer" })
  row("generate the checkpoint", now() - t0, "s", "tools/make_checkpoint.lua --preset 20b")
end

-- transformers first, in its own process, so neither holds the other's memory
local hf
if device:match("^cuda") and os.getenv("BENCH_HF") ~= "0"
    and shell("python3 -c 'import torch, transformers' && echo ok") == "ok" then
  local json = os.tmpname()
  local ok = os.execute(string.format("python3 tools/reference/hf_bench.py '%s' '%s' >&2", dir, json))
  local h = ok and io.open(json)
  if h then hf = cjson.decode(h:read("*a")); h:close() end
  os.remove(json)
  if not hf then io.stderr:write("bench: transformers run failed; its rows are left out\n") end
end

-- llama.cpp next (LLAMA_CPP=dir, a build: gptoss.llama_cpp), in its own
-- process as well: llama-bench's pp2048 and tg128, fresh and at depth 4096
local peer, peer_rows
if os.getenv("LLAMA_CPP") and device:match("^cuda") then
  local L, err = require("gptoss.llama_cpp").find(os.getenv("LLAMA_CPP"))
  local gguf
  if L then gguf, err = L:convert(dir) end
  if gguf then peer_rows, err = L:bench(gguf, { n_prompt = { 2048 }, n_gen = { 128 }, n_depth = { 0, 4096 }, repetitions = 3 }) end
  if peer_rows then peer = {}; for _, r in ipairs(peer_rows) do peer[r.test] = r end
  else io.stderr:write("bench: llama.cpp run failed; its rows are left out: ", tostring(err), "\n") end
end

local t0 = now()
local m = assert(gptoss.load(dir, { device = device, precision = precision, context = 8192 }))
local load_s = now() - t0
row("cold load (page cache)", load_s, "s")
local c = m.config
local V = c.vocab_size

-- bytes one decoded token must read: active experts, attention, router,
-- lm_head, norms, one embedding row (the KV cache comes on top)
local per_token = 0
for _, t in ipairs(m:tensors()) do
  local n = t.name
  if n:match("experts%.") then per_token = per_token + t.bytes * c.num_experts_per_tok / c.num_local_experts
  elseif n == "model.embed_tokens.weight" then per_token = per_token + t.bytes / V
  else per_token = per_token + t.bytes end
end

local workload = require "workload"
local ids = workload.ids
local greedy = gptoss.sampler(V, { temperature = 0 })

-- prefill of a 2048-token prompt: the median of 3, after a warm-up of the
-- same length (the workspace grows to the longest pass once)
local function prefill_s(opts)
  local s = m:session(opts)
  s:feed(ids(2048, 1), "last"); s:rewind(0)
  local t = {}
  for k = 1, 3 do
    local a = now()
    s:feed(ids(2048, 2), "last")
    t[k] = now() - a
    s:rewind(0)
  end
  s:close()
  table.sort(t)
  return t[2]
end
local pf = prefill_s()
row("prefill, 2048-token prompt", 2048 / pf, "tok/s", string.format("%.1f ms, median of 3", pf * 1e3))
local results = { prefill = 2048 / pf }
-- the same prompt in the passes of 512 that a ring kept for a rewind of 512
-- allows (the default before GPTOSS_SESSION_REWIND was 2,048): what one pass gains
local pf512 = prefill_s { rewind = 512 }
row("prefill, 2048-token prompt, passes of 512 (rewind 512)", 2048 / pf512, "tok/s", string.format("%.1f ms, median of 3", pf512 * 1e3))

-- TTFT and batch-1 decode: 128 tokens after a 512-token prompt
s = m:session()
t0 = now()
s:feed(ids(512, 3), "last")
local id = s:sample(greedy)
local ttft = now() - t0
row("TTFT, 512-token prompt", ttft * 1e3, "ms")
results.ttft = ttft * 1e3
for _ = 1, 8 do id = s:step(id, greedy) end         -- captures the decode graph
t0 = now()
for _ = 1, 128 do id = s:step(id, greedy) end
local dt = now() - t0
row("decode, batch 1 (after 512 + 8)", 128 / dt, "tok/s", string.format("%.3f ms/token", dt / 128 * 1e3))
results.decode = 128 / dt
local sample = gptoss.sampler(V, { temperature = 1.0, seed = 1 })
t0 = now()
for _ = 1, 64 do id = s:step(id, sample) end
dt = now() - t0
row("decode, batch 1, temperature 1", 64 / dt, "tok/s")
s:close()

-- deeper context: 4096 tokens
s = m:session()
s:feed(ids(4096, 4), "last")
id = s:sample(greedy)
for _ = 1, 4 do id = s:step(id, greedy) end
t0 = now()
for _ = 1, 64 do id = s:step(id, greedy) end
dt = now() - t0
row("decode, batch 1, at depth 4096", 64 / dt, "tok/s")
results.decode_4096 = 64 / dt
s:close()

-- weights plus one 8k-token session
s = m:session { context = 8192 }
s:feed(ids(1024, 5), "none")
local mem = m:memory()
row("device memory: weights + one 8k session + workspace", mem.total / 1e9, "GB",
  string.format("weights %.2f, KV %.2f, workspace %.2f; device in use %.2f GB", mem.weights / 1e9, mem.kv / 1e9,
    mem.workspace / 1e9, (mem.device_total - mem.device_free) / 1e9))
s:close()
results.load, results.memory = load_s, mem.total / 1e9

-- aggregate decode with N sessions stepping together
-- (a count whose sessions the device cannot hold, 256 on the 120b, is
-- reported as not run and the rest goes on)
for _, n in ipairs { 8, 32, 64, 256 } do
  local ok, step = pcall(workload.batch_rate, gptoss, m, n, greedy, 32)
  if not ok then
    io.stderr:write(string.format("bench: %d sessions together not run: %s\n", n, tostring(step)))
    break
  end
  row(string.format("decode, %d sessions together", n), n / step, "tok/s", string.format("%.2f ms/step", step * 1e3))
end

row("bytes read per decoded token (weights)", per_token / 1e9, "GB")

if hf then
  local bw = hf.copy_bytes_per_s
  row("device-to-device copy bandwidth (read + write)", bw / 1e12, "TB/s", "torch copy_ of 2 GiB, median of 10")
  row("bandwidth floor, batch-1 decode", bw / per_token, "tok/s",
    string.format("%.3f ms/token; gptoss at %.0f%% of it", per_token / bw * 1e3, results.decode / (bw / per_token) * 100))
  local function vs(what, theirs, ours, unit, higher_better)
    row("transformers " .. hf.transformers .. ": " .. what, theirs, unit,
      string.format("gptoss %.2f, ratio %.2fx", ours, higher_better and ours / theirs or theirs / ours))
  end
  vs("decode, batch 1", hf.decode_tok_s, results.decode, "tok/s", true)
  vs("prefill, 2048-token prompt", hf.prefill_2048_tok_s, results.prefill, "tok/s", true)
  vs("TTFT, 512-token prompt", hf.ttft_512_ms, results.ttft, "ms", false)
  vs("peak device memory", hf.peak_memory_gb, results.memory, "GB", false)
  vs("load", hf.load_s, results.load, "s", false)
end

if peer then
  local build = peer_rows[1] and peer_rows[1].build_commit or "?"
  local function vs(what, test, ours)
    local r = peer[test]
    if r then
      row("llama.cpp " .. build .. ": " .. what, r.avg_ts, "tok/s",
        string.format("llama-bench %s, ± %.2f; gptoss %.2f, ratio %.2fx", test, r.stddev_ts or 0, ours, ours / r.avg_ts))
    end
  end
  vs("decode, batch 1", "tg128", results.decode)
  vs("prefill, 2048-token prompt", "pp2048", results.prefill)
  vs("decode, batch 1, at depth 4096", "tg128 @ d4096", results.decode_4096)
end

local gpu = device:match("^cuda") and shell("nvidia-smi --query-gpu=name --format=csv,noheader | head -1") or "cpu"
local commit = os.getenv("BENCH_COMMIT") or shell("git rev-parse --short HEAD") or "unknown"
local lines = { string.format("### bench/llm.lua, %s, %s (%s), commit %s", os.date("!%Y-%m-%d %H:%M UTC"), device, gpu, commit), "",
  string.format("gptoss %s, precision %s, %s: %d layers, %d experts. Command: `lua5.4 bench/llm.lua %s %s %s`",
    gptoss.version, precision, dir, c.num_hidden_layers, c.num_local_experts, dir, device, precision), "",
  "| measure | value | unit | note |", "|---|---:|---|---|" }
for _, r in ipairs(rows) do
  lines[#lines + 1] = string.format("| %s | %.2f | %s | %s |", r[1], r[2], r[3], r[4])
end
local text = table.concat(lines, "\n")
print(text)
local out = os.getenv("BENCH_RESULTS") or "bench/RESULTS.md"
if out ~= "-" then
  local h, err = io.open(out, "a")
  if h then h:write("\n", text, "\n"); h:close() else io.stderr:write("bench: ", err, "\n") end
end
m:close()
