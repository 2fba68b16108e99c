--- bench/serve.lua: the OpenAI-compatible server (make serve) measured over
-- HTTP, as `vllm bench serve` and the seeds' Ollama study measure a server.
--
--   luajit bench/serve.lua [--url http://127.0.0.1:8080] [--model ID] [--key KEY]
--       [--prompt 512] [--output 256] [--requests N] [--concurrency 1,8,32,64]
--       [--study] [--temperatures 0,0.7,1] [--duration 30] [--pid WORKER_PID]
--       [--inprocess DIR [--device cuda:0] [--threads N]] [--only serve|study|inprocess] [--json FILE]
--
-- serve: at each concurrency, --requests streamed /v1/completions of
-- --prompt random token ids and exactly --output tokens (the stop tokens are
-- biased away, as vLLM's ignore_eos does), and vLLM's serving metrics under
-- their names: request and token throughput, TTFT, TPOT, ITL and E2E latency
-- (mean, median, P90, P99; ITL between SSE chunks as vLLM times them).
-- study (--study): the seeds' Ollama study, gptoss.bench_study's plan,
-- metrics and tables over HTTP (`gptoss bench study` runs it in process):
-- short, medium and long prompts (mean and P95 latency, tokens/s, TTFT: the
-- prompt-length impact), temperatures, 1/2/4/8 concurrent workers, then
-- CPU, RSS and GPU memory of the worker sampled each second over a
-- --duration run at concurrency 8.
-- inprocess (--inprocess DIR): the same serve workload through
-- gptoss.engine in this process, so the table shows what HTTP costs.
--
-- The client is one event loop over non-blocking sockets (LuaJIT's FFI), so
-- 64 streams are timed from one thread without skew. Prints Markdown.
local ffi = require "ffi"
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/luajit/?.so;" .. package.cpath
local cjson = require "cjson"
local study = require "gptoss.bench_study"
local report = require "gptoss.bench_study_report"

-- {====================================================== options
local opt = { url = "http://127.0.0.1:8080", prompt = 512, output = 256, concurrency = "1,8,32,64", duration = 30,
              device = "cuda:0" }
do
  local i = 1
  while i <= #arg do
    local k = arg[i]:match("^%-%-(.+)$")
    if not k then error("bench/serve.lua: unexpected argument " .. arg[i]) end
    if k == "study" then opt.study = true; i = i + 1
    else opt[k] = arg[i + 1]; i = i + 2 end
  end
  for _, k in ipairs { "prompt", "output", "requests", "duration", "pid", "threads" } do opt[k] = tonumber(opt[k]) end
end
local host, port = opt.url:match("^http://([^:/]+):?(%d*)")
port = tonumber(port) or 80
if host == "localhost" then host = "127.0.0.1" end
-- }======================================================

-- {====================================================== sockets
ffi.cdef [[
typedef struct { uint16_t family; uint16_t port; uint32_t addr; uint8_t zero[8]; } sockaddr_in_t;
typedef struct { int fd; short events; short revents; } pollfd_t;
typedef struct { long tv_sec; long tv_nsec; } timespec_t;
int socket(int, int, int);
int connect(int, const void *, uint32_t);
long send(int, const void *, size_t, int);
long recv(int, void *, size_t, int);
int poll(pollfd_t *, unsigned long, int);
int close(int);
int fcntl(int, int, ...);
int inet_pton(int, const char *, void *);
int clock_gettime(int, timespec_t *);
char *strerror(int);
]]
local C = ffi.C
local AF_INET, SOCK_STREAM, F_SETFL, O_NONBLOCK, POLLIN, POLLOUT = 2, 1, 4, 2048, 1, 4
local EINPROGRESS, EAGAIN = 115, 11

local ts = ffi.new("timespec_t")
local function now()
  C.clock_gettime(1, ts)   -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local addr = ffi.new("sockaddr_in_t")
addr.family = AF_INET
addr.port = bit.bor(bit.rshift(port, 8), bit.lshift(bit.band(port, 0xff), 8))
assert(C.inet_pton(AF_INET, host, ffi.cast("void *", ffi.cast("char *", addr) + 4)) == 1, "bench: bad host " .. host)

local function connect()
  local fd = C.socket(AF_INET, SOCK_STREAM, 0)
  assert(fd >= 0, "socket failed")
  C.fcntl(fd, F_SETFL, ffi.new("int", O_NONBLOCK))
  local r = C.connect(fd, addr, ffi.sizeof(addr))
  if r ~= 0 and ffi.errno() ~= EINPROGRESS then error("connect: " .. ffi.string(C.strerror(ffi.errno()))) end
  return fd
end
-- }======================================================

-- {====================================================== streams
-- One HTTP request: sent when the socket is writable, its response read as
-- it comes; SSE data events are timestamped on arrival.
local buf = ffi.new("char[65536]")

local function request_text(path, body)
  return table.concat {
    "POST ", path, " HTTP/1.1\r\nHost: ", host, "\r\nContent-Type: application/json\r\nConnection: close\r\n",
    opt.key and ("Authorization: Bearer " .. opt.key .. "\r\n") or "", "Content-Length: ", #body, "\r\n\r\n", body }
end

local function new_stream(path, body)
  return { fd = connect(), out = request_text(path, body), sent = 0, raw = {}, events = {}, t0 = now(), pending = "" }
end

-- takes SSE events out of the received bytes (chunked encoding removed)
local function dechunk(s)
  local out, pos = {}, 1
  while true do
    local size_hex, after = s:match("^(%x+)\r\n()", pos)
    if not size_hex then break end
    local n = tonumber(size_hex, 16)
    if n == 0 or #s < after + n + 1 then break end
    out[#out + 1] = s:sub(after, after + n - 1)
    pos = after + n + 2
  end
  return table.concat(out), s:sub(pos)
end

local function on_bytes(st, data)
  local t = now()
  if not st.head then
    st.pending = st.pending .. data
    local hend = st.pending:find("\r\n\r\n", 1, true)
    if not hend then return end
    st.head = st.pending:sub(1, hend)
    st.status = tonumber(st.head:match("^HTTP/%S+ (%d+)"))
    st.chunked = st.head:lower():find("transfer%-encoding: chunked") ~= nil
    data, st.pending = st.pending:sub(hend + 4), ""
    st.body_raw = ""
  end
  st.body_raw = st.body_raw .. data
  if not st.chunked then return end
  local text
  text, st.body_raw = dechunk(st.body_raw)
  st.text = (st.text or "") .. text
  st.sse = (st.sse or "") .. text
  while true do
    local ev, rest = st.sse:match("^(.-)\n\n(.*)$")
    if not ev then break end
    st.sse = rest
    local d = ev:match("data: (.*)")
    if d then st.events[#st.events + 1] = { t = t, data = d } end
  end
end

--- runs the streams to their end; start(i) makes the i-th (nil: no more),
-- at most `conc` at a time; tick() (optional) is called on every turn of
-- the loop. Returns them.
local function run_streams(n, conc, start, tick)
  local active, done, next_i = {}, {}, 1
  local fds = ffi.new("pollfd_t[?]", conc)
  while #done < n do
    while #active < conc and next_i <= n do
      local st = start(next_i)
      if not st then n = next_i - 1; break end
      active[#active + 1] = st
      next_i = next_i + 1
    end
    if #active == 0 then break end
    if tick then tick() end
    for i, st in ipairs(active) do
      fds[i - 1].fd = st.fd
      fds[i - 1].events = st.sent < #st.out and POLLOUT or POLLIN
      fds[i - 1].revents = 0
    end
    C.poll(fds, #active, 1000)
    local keep = {}
    for i, st in ipairs(active) do
      local rev = fds[i - 1].revents
      local finished = false
      if rev ~= 0 then
        if st.sent < #st.out then
          local piece = st.out:sub(st.sent + 1)
          local w = C.send(st.fd, piece, #piece, 0x4000)   -- MSG_NOSIGNAL
          if w > 0 then st.sent = st.sent + tonumber(w) elseif ffi.errno() ~= EAGAIN then st.failed = "send"; finished = true end
        else
          local r = C.recv(st.fd, buf, 65536, 0)
          if r > 0 then on_bytes(st, ffi.string(buf, r))
          elseif r == 0 then finished = true
          elseif ffi.errno() ~= EAGAIN then st.failed = "recv"; finished = true end
        end
      end
      if finished then
        st.t_end = now()
        C.close(st.fd)
        done[#done + 1] = st
      else keep[#keep + 1] = st end
    end
    active = keep
  end
  return done
end
-- }======================================================

-- {====================================================== metrics
-- the finished streams as gptoss.bench_study's records: tokens arrive with
-- each SSE chunk that carries text; usage (include_usage) counts them
local failures = {}   -- reason -> count, over the whole run
local function stream_records(streams, prompt_len)
  local records = {}
  for _, st in ipairs(streams) do
    local usage, chunks = nil, {}
    for _, e in ipairs(st.events) do
      if e.data ~= "[DONE]" then
        local ok, j = pcall(cjson.decode, e.data)
        if ok and j.usage and j.usage ~= cjson.null then usage = j.usage end
        if ok and j.choices and j.choices[1] and j.choices[1].text and j.choices[1].text ~= "" then chunks[#chunks + 1] = e.t end
      end
    end
    local ok = st.status == 200 and usage ~= nil
    if not ok then
      -- why, once per distinct reason, on stderr: a status and the error's message, or the socket call that failed
      local why = st.failed and ("socket " .. st.failed) or string.format("HTTP %s: %s", tostring(st.status),
        tostring((st.text or st.body_raw or ""):sub(1, 300)):gsub("%s+", " "))
      failures[why] = (failures[why] or 0) + 1
      if failures[why] == 1 then io.stderr:write("bench/serve.lua: a request failed: ", why, "\n") end
    end
    records[#records + 1] = { ok = ok, t0 = st.t0, t_first = chunks[1], chunks = chunks,
      t_end = st.t_end, prompt_tokens = usage and usage.prompt_tokens or prompt_len,
      output_tokens = usage and usage.completion_tokens or 0 }
  end
  return records
end

-- vLLM's serving metrics of finished streams (times in ms)
local function serving_metrics(streams, duration, prompt_len)
  return study.metrics(stream_records(streams, prompt_len), duration)
end
-- }======================================================

-- {====================================================== workloads
local rng = 12345
local function rand(n)   -- a small LCG: the same prompts every run
  rng = (rng * 1103515245 + 12345) % 2147483648
  return rng % n
end
local function prompt_ids(len)
  local t = {}
  for i = 1, len do t[i] = 1000 + rand(90000) end   -- ordinary tokens of o200k
  return t
end

local NO_STOP = { ["200002"] = -100, ["200012"] = -100, ["200007"] = -100 }

local function completion_body(ids, out, extra)
  local b = { model = opt.model, prompt = ids, max_tokens = out, stream = true, logit_bias = NO_STOP,
              stream_options = { include_usage = true }, temperature = 1, seed = rand(1000000) }
  for k, v in pairs(extra or {}) do b[k] = v end
  return cjson.encode(b)
end

local function get_json(path)
  local st = { fd = connect(), sent = 0, raw = {}, events = {}, t0 = now(), pending = "" }
  st.out = "GET " .. path .. " HTTP/1.1\r\nHost: " .. host .. "\r\nConnection: close\r\n" ..
    (opt.key and ("Authorization: Bearer " .. opt.key .. "\r\n") or "") .. "\r\n"
  local got = run_streams(1, 1, function() return st end)[1]
  return cjson.decode(got.chunked and got.text or got.body_raw)
end

-- n streamed completions at concurrency c; the metrics
local function serve_run(n, c, prompt_len, out, extra)
  local prompts = {}
  for i = 1, n do prompts[i] = completion_body(prompt_ids(prompt_len), out, extra) end
  local t0 = now()
  local streams = run_streams(n, c, function(i) return new_stream("/v1/completions", prompts[i]) end)
  return serving_metrics(streams, now() - t0, prompt_len)
end
-- }======================================================

-- {====================================================== output
local function f1(x) return x ~= x and "-" or string.format("%.1f", x) end
local function f2(x) return x ~= x and "-" or string.format("%.2f", x) end

local function serve_table(title, rows)
  print("\n#### " .. title .. "\n")
  print("| concurrency | completed | failed | request_throughput (req/s) | output_throughput (tok/s) | total_token_throughput (tok/s) " ..
        "| mean_ttft_ms | median_ttft_ms | p90_ttft_ms | p99_ttft_ms | mean_tpot_ms | median_tpot_ms | p90_tpot_ms | p99_tpot_ms " ..
        "| mean_itl_ms | median_itl_ms | p90_itl_ms | p99_itl_ms | mean_e2el_ms | median_e2el_ms | p90_e2el_ms | p99_e2el_ms |")
  print("|" .. ("---:|"):rep(22))
  for _, r in ipairs(rows) do
    local m = r.m
    local cells = { r.c, m.completed, m.failed, f2(m.request_throughput), f1(m.output_throughput), f1(m.total_token_throughput) }
    for _, k in ipairs { "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms" } do
      for _, p in ipairs { "mean", "median", "p90", "p99" } do cells[#cells + 1] = f1(m[p .. "_" .. k]) end
    end
    print("| " .. table.concat(cells, " | ") .. " |")
  end
end

local results = { options = opt }   -- the study's options replace these when it runs
local function levels()
  local t = {}
  for c in opt.concurrency:gmatch("%d+") do t[#t + 1] = tonumber(c) end
  return t
end
-- }======================================================

-- {====================================================== in-process
-- The serve workload through gptoss.engine, in this process, through
-- gptoss.bench_study's loop: requests polled on the engine's wake-ups,
-- timed as the HTTP client times chunks.
local function inprocess()
  local gptoss = require "gptoss"
  local model = assert(gptoss.load(opt.inprocess, { device = opt.device, threads = opt.threads }))
  local eng = gptoss.engine(model, { max_batch = 64 })
  local bias = {}
  for k, v in pairs(NO_STOP) do bias[tonumber(k)] = v end
  local rows = {}
  for _, c in ipairs(levels()) do
    local n = opt.requests or math.max(2 * c, 16)
    local prompts = {}
    for i = 1, n do prompts[i] = prompt_ids(opt.prompt) end
    local records, duration = study.engine_phase(eng, prompts, { concurrency = c, max_tokens = opt.output,
      logit_bias = bias, temperature = 1, seed = rand(1000000) })
    rows[#rows + 1] = { c = c, m = study.metrics(records, duration) }
  end
  eng:close()
  model:close()
  return rows
end
-- }======================================================

-- {====================================================== the study
local function gpu_memory_mib()
  local h = io.popen("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null")
  local out = h and h:read("*a") or ""
  if h then h:close() end
  return tonumber(out:match("%d+"))
end

local function study_run()
  local temperatures
  if opt.temperatures then
    temperatures = {}
    for t in opt.temperatures:gmatch("[^,]+") do temperatures[#temperatures + 1] = assert(tonumber(t), "bad --temperatures") end
  end
  local so = { requests = opt.requests or 10, prompt = opt.prompt, max_tokens = opt.output, temperatures = temperatures }
  local res = study.study(function(phase)
    return serve_run(phase.n, phase.concurrency, phase.prompt_len, opt.output, { temperature = phase.temperature })
  end, so)
  for k, v in pairs(res) do results[k] = v end
  so = study.options(so)
  results.options = {}
  for k, v in pairs(opt) do results.options[k] = v end
  for _, k in ipairs { "requests", "prompt", "max_tokens", "temperatures", "concurrency" } do results.options[k] = so[k] end
  results.info = { source = "HTTP (" .. opt.url .. ", streamed /v1/completions)", model = tostring(opt.model), device = "the server's",
    date = os.date("!%Y-%m-%d %H:%M UTC"), prompts = "ids", interval = 1 }
  -- resources: load at concurrency 8 for --duration seconds, the worker sampled each second
  local pid = opt.pid
  if not pid then
    local h = io.popen("pgrep -n -f 'nginx: worker process'")
    pid = tonumber(h:read("*a"):match("%d+"))
    h:close()
  end
  local count = 0
  if pid then
    local sampler = study.sampler { pid = pid, interval = 1, clock = now, extra = function() return { gpu_mib = gpu_memory_mib() } end }
    local t_start = now()
    run_streams(1e9, 8, function()
      if now() - t_start >= opt.duration then return nil end
      count = count + 1
      return new_stream("/v1/completions", completion_body(prompt_ids(opt.prompt), opt.output))
    end, function() sampler:tick("load at concurrency 8") end)
    results.resources = sampler.samples
    results.resources_note = string.format("Resources: worker %d over %ds at concurrency 8 (%d requests)%s", pid, opt.duration,
      count, (sampler.samples[1] or {}).gpu_mib and "; GPU memory: the whole device (nvidia-smi)" or "")
  else
    results.resources = {}
    results.resources_note = "No worker pid: pass --pid for the resource run"
  end
  print(report.markdown(results))
end
-- }======================================================

local function main()
  local only = opt.only
  if only ~= "inprocess" then
    local models = get_json("/v1/models")
    opt.model = opt.model or models.data[1].id
  end
  print(string.format("\n### bench/serve.lua, %s, %s, model %s, prompt %d, output %d\n", os.date("!%Y-%m-%d %H:%M UTC"),
    only == "inprocess" and ("in-process " .. opt.inprocess) or opt.url, tostring(opt.model), opt.prompt, opt.output))
  if not only or only == "serve" then
    local rows = {}
    for _, c in ipairs(levels()) do
      rows[#rows + 1] = { c = c, m = serve_run(opt.requests or math.max(2 * c, 16), c, opt.prompt, opt.output) }
    end
    results.serve = rows
    if next(failures) then results.failures = failures end
    serve_table("HTTP (" .. opt.url .. ", streamed /v1/completions)", rows)
  end
  if opt.inprocess and (not only or only == "inprocess") then
    local rows = inprocess()
    results.inprocess = rows
    serve_table("In-process engine (gptoss.engine, same workload)", rows)
  end
  if opt.study or only == "study" then study_run() end
  if opt.json then
    local f = assert(io.open(opt.json, "w"))
    f:write(report.json(results))
    f:close()
  end
end

main()
