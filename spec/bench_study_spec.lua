-- gptoss.bench_study and `gptoss bench study`: vLLM's metrics of hand-made
-- timings worked out by hand; a small study of the tiny checkpoint on the
-- CPU whose counts match the engine's own counters and the plan, whose
-- timings are consistent (TTFT within latency, requests one after another
-- within the phase's duration), whose RSS matches /proc read here; the
-- report, JSON and gnuplot's PNGs; the command line's help, errors, and
-- progress on stderr only.
local H = require "helpers"
local cjson = require "cjson"
local gptoss = require "gptoss"
local study = require "gptoss.bench_study"
local report = require "gptoss.bench_study_report"

local METRICS = { "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
  "output_throughput", "total_token_throughput" }
for _, name in ipairs { "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "request_tps" } do
  for _, s in ipairs { "mean", "median", "std", "p90", "p95", "p99" } do METRICS[#METRICS + 1] = s .. "_" .. name end
end

local function sum(t)
  local s = 0
  for _, v in ipairs(t) do s = s + v end
  return s
end

local function max(t)
  local m = -math.huge
  for _, v in ipairs(t) do m = math.max(m, v) end
  return m
end

-- a PNG's signature and its IHDR width and height (big-endian at bytes 17..24)
local function png_size(path)
  local d = H.read(path)
  if d:sub(1, 8) ~= "\137PNG\r\n\26\n" or d:sub(13, 16) ~= "IHDR" then return nil end
  local function u32(at) local a, b, c, e = d:byte(at, at + 3); return ((a * 256 + b) * 256 + c) * 256 + e end
  return u32(17), u32(21)
end

local KEYS = { prompt_length = { "short", "medium", "long" }, temperature = { "0", "1" }, workers = { "1", "2", "4" } }

-- every phase's metrics: present, numbers, and consistent with the plan
local function check_phases(results, max_tokens, keys)
  for group, list in pairs(keys) do
    for _, key in ipairs(list) do
      local m = results[group][key]
      assert.is_table(m, group .. " " .. key)
      for _, k in ipairs(METRICS) do
        assert.is_number(m[k], group .. " " .. key .. " " .. k)
        assert.is_true(m[k] == m[k] and m[k] < math.huge, group .. " " .. key .. " " .. k .. " is finite")
      end
      assert.are.equal(m.requests, m.completed)
      assert.are.equal(0, m.failed)
      assert.are.equal(m.completed * max_tokens, m.total_output_tokens)   -- no stop tokens: exactly max_tokens each
      assert.are.equal(m.completed * m.prompt_len, m.total_input_tokens)
      for i = 1, m.completed do
        assert.are.equal(m.prompt_len, m.input_lens[i])
        assert.are.equal(max_tokens, m.output_lens[i])
        assert.is_true(m.ttfts[i] > 0 and m.ttfts[i] <= m.latencies[i], "TTFT within latency")
        assert.is_true(m.latencies[i] <= m.duration, "a request within its phase")
        -- the first chunk, the gaps between chunks, and the end with the last chunk
        assert.near(m.latencies[i], m.ttfts[i] + sum(m.itls[i]), 1e-6)
        if m.engine_ttfts then   -- no client sees a token before the engine made it
          assert.is_true(m.ttfts[i] >= m.engine_ttfts[i] - 1e-6, "TTFT after the engine's")
          assert.is_true(m.latencies[i] >= m.engine_latencies[i] - 1e-6, "latency after the engine's")
        end
      end
      for _, name in ipairs { "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms" } do
        assert.is_true(m["median_" .. name] <= m["p90_" .. name] and m["p90_" .. name] <= m["p95_" .. name]
          and m["p95_" .. name] <= m["p99_" .. name], name .. " percentiles in order")
        assert.is_true(m["std_" .. name] >= 0)
      end
      assert.is_true(m.p99_e2el_ms <= max(m.latencies) * 1000 + 1e-9)
      assert.near(sum(m.latencies) / m.completed * 1000, m.mean_e2el_ms, 1e-6)
      assert.near(sum(m.ttfts) / m.completed * 1000, m.mean_ttft_ms, 1e-6)
      assert.near(m.completed / m.duration, m.request_throughput, 1e-9)
      assert.near(m.total_output_tokens / m.duration, m.output_throughput, 1e-9)
      if m.concurrency == 1 then assert.is_true(sum(m.latencies) <= m.duration + 1e-9, "one request at a time") end
    end
  end
end

describe("gptoss.bench_study", function()
  it("metrics are vLLM's serving metrics, worked by hand", function()
    local records = {
      { ok = true, t0 = 0, t_first = 0.1, chunks = { 0.1, 0.15, 0.25 }, t_end = 0.3, prompt_tokens = 10, output_tokens = 4 },
      { ok = true, t0 = 0.05, t_first = 0.25, chunks = { 0.25, 0.45 }, t_end = 0.45, prompt_tokens = 20, output_tokens = 2 },
      { ok = false, t0 = 0.1, chunks = {}, t_end = 0.2, prompt_tokens = 5, output_tokens = 0 },
    }
    local m = study.metrics(records, 0.5)
    assert.are.same({ 2, 1, 30, 6 }, { m.completed, m.failed, m.total_input_tokens, m.total_output_tokens })
    assert.near(4, m.request_throughput, 1e-12)
    assert.near(12, m.output_throughput, 1e-12)
    assert.near(72, m.total_token_throughput, 1e-12)
    -- TTFT 100 and 200 ms: P95 at rank 0.95
    assert.near(150, m.mean_ttft_ms, 1e-9); assert.near(150, m.median_ttft_ms, 1e-9)
    assert.near(50, m.std_ttft_ms, 1e-9); assert.near(195, m.p95_ttft_ms, 1e-9); assert.near(199, m.p99_ttft_ms, 1e-9)
    -- E2E 300 and 400 ms
    assert.near(350, m.mean_e2el_ms, 1e-9); assert.near(390, m.p90_e2el_ms, 1e-9)
    -- TPOT: (300 - 100) / 3 and (400 - 200) / 1
    assert.near((200 / 3 + 200) / 2, m.mean_tpot_ms, 1e-9)
    -- ITL 50, 100 (the first request) and 200 (the second): P99 at rank 1.98
    assert.near(350 / 3, m.mean_itl_ms, 1e-9); assert.near(100, m.median_itl_ms, 1e-9); assert.near(198, m.p99_itl_ms, 1e-9)
    -- tokens/s of a request: 4 / 0.3 and 2 / 0.4
    assert.near((4 / 0.3 + 5) / 2, m.mean_request_tps, 1e-9)
    assert.are.same({ 10, 20 }, m.input_lens)
    assert.are.same({ 4, 2 }, m.output_lens)
  end)

  it("plans the seeds' phases and checks its options", function()
    local plan = study.plan { requests = 3, prompt = 64, temperatures = { 0, 0.7 }, concurrency = { 1, 8 } }
    local got = {}
    for _, p in ipairs(plan) do got[#got + 1] = { p.group, p.key, p.prompt_len, p.n, p.concurrency, p.temperature } end
    assert.are.same({
      { "prompt_length", "short", 8, 3, 1, 1 }, { "prompt_length", "medium", 64, 3, 1, 1 }, { "prompt_length", "long", 256, 3, 1, 1 },
      { "temperature", "0", 64, 3, 1, 0 }, { "temperature", "0.7", 64, 3, 1, 0.7 },
      { "workers", "1", 64, 6, 1, 1 }, { "workers", "8", 64, 8, 8, 1 },
    }, got)
    local cases = {
      { { requests = 0 }, "bench_study.plan: requests must be an integer >= 1 (got 0)" },
      { { max_tokens = 2.5 }, "bench_study.plan: max_tokens must be an integer >= 1 (got 2.5)" },
      { { temperatures = { 1, -1 } }, "bench_study.plan: temperatures[2] must be a number >= 0 (got -1)" },
      { { concurrency = { 0 } }, "bench_study.plan: concurrency[1] must be an integer >= 1 (got 0)" },
      { { interval = "1" }, 'bench_study.plan: interval must be a number > 0 (got "1")' },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(study.plan, c[1])
      assert.is_false(ok)
      assert.matches(c[2], err, 1, true)
    end
  end)

  it("builds prompts from the tokenizer: exact lengths, the same text in every Lua, one per index", function()
    local tok = gptoss.tokenizer(H.tokenizer_dir)
    local ids = study.prompt_ids(tok, 12, 1)
    assert.are.equal(12, #ids)
    -- worked out once; the spec runs under Lua 5.4 and LuaJIT
    assert.are.equal("Attention measure where small the a token about to a before model", tok:decode(ids))
    assert.are.same(ids, study.prompt_ids(tok, 12, 1))
    assert.are_not.same(ids, study.prompt_ids(tok, 12, 2))
    for _, len in ipairs { 1, 8, 300, 2048 } do
      local p = study.prompt_ids(tok, len, 9)
      assert.are.equal(len, #p)
      assert.matches("^[%a][%a%s%.]*$", tok:decode(p))
    end
    local raw = study.prompt_ids(nil, 50, 3, 1000)   -- no tokenizer: ids below the vocabulary
    assert.are.equal(50, #raw)
    for _, id in ipairs(raw) do assert.is_true(id >= 0 and id < 1000) end
  end)

  describe("on the tiny checkpoint (CPU)", function()
    local model, results, rss_here
    setup(function()
      model = assert(gptoss.load(H.tiny(), { threads = 1 }))
      results = study.run(model, { requests = 3, prompt = 32, max_tokens = 5, temperatures = { 0, 1 },
        concurrency = { 1, 2, 4 }, interval = 0.02, dir = "tiny" })
      rss_here = tonumber(H.read("/proc/self/status"):match("VmRSS:%s*(%d+)")) / 1024
    end)
    teardown(function() if model then model:close() end end)

    it("measures every phase, with the engine's own counts", function()
      check_phases(results, 5, KEYS)
      for _, group in ipairs { "prompt_length", "temperature", "workers" } do
        for key, m in pairs(results[group]) do
          assert.are.equal(m.total_output_tokens, m.engine.generated_tokens, group .. " " .. key)
          assert.are.equal(m.total_output_tokens, m.usage_output_tokens)
          assert.are.equal(m.total_input_tokens, m.engine.prompt_tokens)
          assert.are.equal(m.completed, m.engine.completed)
        end
      end
      assert.are.same({ 8, 32, 128 }, { results.prompt_length.short.prompt_len, results.prompt_length.medium.prompt_len,
        results.prompt_length.long.prompt_len })
      assert.are.same({ 3, 3, 6 }, { results.temperature["0"].completed, results.prompt_length.long.completed,
        results.workers["4"].completed })   -- concurrency c: max(2 * requests, c)
    end)

    it("samples CPU and RSS over the run, and says there is no GPU memory on the CPU", function()
      local s = results.resources
      assert.is_true(#s >= 3)
      for i, x in ipairs(s) do
        if i > 1 then assert.is_true(x.t > s[i - 1].t) end
        assert.is_true(x.cpu_pct >= 0)
        assert.is_true(x.rss_mib > 0 and x.kv_mib >= 0)
        assert.is_nil(x.gpu_mib)
        assert.is_string(x.phase)
      end
      -- the last sample's RSS against /proc read here just after the run
      assert.is_true(math.abs(s[#s].rss_mib - rss_here) < 0.25 * rss_here, s[#s].rss_mib .. " vs " .. rss_here)
      assert.matches("no GPU memory", results.gpu_note, 1, true)
    end)

    it("writes the report, the JSON and gnuplot's PNG charts", function()
      local dir = H.tmpdir() .. "/study"
      local written = assert(report.write(results, dir))
      assert.is_true(#written >= 8)
      local md = H.read(dir .. "/report.md")
      for _, h in ipairs { "## Prompt-length impact", "## Temperature impact", "## Concurrency", "## Resources",
                           "| long | 128 | 3 | 0 |", "| 4 | 6 | 0 |", "no GPU memory" } do
        assert.matches(h, md, 1, true)
      end
      for _, name in ipairs { "latency_prompt", "latency_temperature", "latency_concurrency", "resources_cpu", "resources_memory" } do
        assert.matches("](" .. name .. ".png)", md, 1, true)
        local w, h = png_size(dir .. "/" .. name .. ".png")
        assert.are.same({ 900, 540 }, { w, h }, name)
      end
      assert.matches("Latency vs prompt length", H.read(dir .. "/charts.txt"), 1, true)
      local j = cjson.decode(H.read(dir .. "/study.json"))
      for _, k in ipairs(METRICS) do
        assert.near(results.workers["2"][k], j.workers["2"][k], 1e-9 * math.max(1, math.abs(results.workers["2"][k])))
      end
      assert.are.equal(#results.resources, #j.resources)
      local text = report.markdown(results, { charts = "dumb" })
      assert.matches("```\n", text, 1, true)
      assert.matches("Latency vs concurrency", text, 1, true)
    end)
  end)
end)

describe("gptoss bench study", function()
  local tmp = H.tmpdir()
  local n = 0
  -- bin/gptoss's exit code, stdout and stderr
  local function cli(args)
    n = n + 1
    local out, err, code = tmp .. "/o" .. n, tmp .. "/e" .. n, tmp .. "/c" .. n
    os.execute(string.format("%s bin/gptoss %s </dev/null >%s 2>%s; echo $? >%s", H.lua, args, out, err, code))
    return tonumber(H.read(code)), H.read(out), H.read(err)
  end

  it("answers --help on stdout, and usage errors with exit 2", function()
    local code, out, err = cli("bench study --help")
    assert.are.equal(0, code)
    assert.are.equal("", err)
    assert.matches("^usage: gptoss bench study %[options%] MODEL\n", out)
    for _, o in ipairs { "--requests", "--max-tokens", "--out", "--json", "--device", "--concurrency", "--temperatures" } do
      assert.matches(o, out, 1, true)
    end
    code, out = cli("bench --help")
    assert.are.equal(0, code)
    assert.matches("gptoss bench study --help", out, 1, true)
    code, out = cli("--help")
    assert.matches("\n  bench study ", out, 1, true)
    for _, c in ipairs {
      { "bench study", 2, "gptoss bench study needs MODEL" },
      { "bench study " .. tmp .. " --temperatures hot", 2, "--temperatures needs numbers >= 0 (got hot)" },
      { "bench study " .. tmp .. " --requests 0", 2, "--requests needs an integer >= 1" },
      { "bench study " .. tmp .. " --concurrency 0", 2, "--concurrency needs integers >= 1" },
      { "bench study " .. tmp .. "/none", 1, "cannot load" },
    } do
      local ccode, cout, cerr = cli(c[1])
      assert.are.equal(c[2], ccode, c[1])
      assert.are.equal("", cout, c[1])
      assert.matches(c[3], cerr, 1, true)
    end
  end)

  it("prints the report on stdout and its progress on stderr only; writes --out and --json", function()
    local dir, json_file = tmp .. "/out", tmp .. "/study.json"
    local code, out, err = cli(string.format("bench study %s --requests 2 --prompt 16 --max-tokens 3 --temperatures 0,1 " ..
      "--concurrency 1,2,4 --threads 1 --interval 0.02 --out %s --json %s", H.tiny(), dir, json_file))
    assert.are.equal(0, code, err)
    -- 3 lengths and 2 temperatures of 2 requests, then concurrency 1, 2, 4 of max(4, c)
    assert.matches("study 22/22 requests", err, 1, true)
    assert.is_nil(err:find("|", 1, true))
    assert.matches("^# Latency study: in%-process", out)
    assert.is_nil(out:find("study %d+/%d+ requests"))
    assert.is_nil(out:find("ETA", 1, true))
    assert.matches("| short | 8 | 2 | 0 |", out, 1, true)
    assert.matches("Latency vs temperature", out, 1, true)   -- the dumb chart
    local results = cjson.decode(H.read(json_file))
    assert.are.equal(H.read(json_file), H.read(dir .. "/study.json"))
    check_phases(results, 3, KEYS)
    assert.are.same({ 8, 16, 64 }, { results.prompt_length.short.prompt_len, results.prompt_length.medium.prompt_len,
      results.prompt_length.long.prompt_len })
    for _, name in ipairs { "latency_prompt", "latency_temperature", "latency_concurrency", "resources_cpu", "resources_memory" } do
      assert.is_number(png_size(dir .. "/" .. name .. ".png"), name)
    end
  end)
end)
