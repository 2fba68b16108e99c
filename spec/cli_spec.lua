-- bin/gptoss: every command's --help, exit codes, results on stdout and
-- progress on stderr, each command's output against the library's own
-- calls (the oracle: the same work done in-process).
local H = require "helpers"
local cjson = require "cjson"
local gptoss = require "gptoss"
local bench = require "gptoss.bench"

local tmp = H.tmpdir()
local n = 0
-- runs bin/gptoss; returns the exit code, stdout and stderr
local function gptoss_cli(args, stdin)
  n = n + 1
  local base = string.format("%s/run%d", tmp, n)
  local cmd = string.format("%s bin/gptoss %s <%s >%s.out 2>%s.err; echo $? >%s.code", H.lua, args,
    stdin or "/dev/null", base, base, base)
  os.execute(cmd)
  return tonumber(H.read(base .. ".code")), H.read(base .. ".out"), H.read(base .. ".err")
end

local COMMANDS = { "chat", "generate", "train", "sweep", "bench", "merge", "checkpoint", "serve" }

describe("gptoss command line", function()
  local tiny
  setup(function() tiny = H.tiny() end)

  it("answers --help for itself and every command on stdout, exit 0", function()
    local code, out, err = gptoss_cli("--help")
    assert.are.equal(0, code); assert.are.equal("", err)
    for _, c in ipairs(COMMANDS) do
      assert.matches("\n  " .. c .. " ", out, 1, true)
      local ccode, cout, cerr = gptoss_cli(c .. " --help")
      assert.are.equal(0, ccode, c)
      assert.are.equal("", cerr, c)
      assert.matches("^usage: gptoss " .. c .. " ", cout)
      assert.matches("--help, -h", cout, 1, true)
    end
  end)

  it("exits 2 on usage errors and 1 on failures, with the message on stderr", function()
    local cases = {
      { "", 2, "usage: gptoss COMMAND" }, { "frobnicate", 2, "unknown command 'frobnicate'" },
      { "bench", 2, "gptoss bench needs MODEL" }, { "bench " .. tiny .. " --frob", 2, "unknown option --frob" },
      { "bench " .. tiny .. " -o xml", 2, "-o must be md, csv or json" }, { "bench " .. tiny .. " -r x", 2, "-r needs an integer" },
      { "train " .. tiny, 2, "needs --data" }, { "serve", 2, "MODEL" },
      { "bench " .. tmp .. "/nothing -p 8", 1, "cannot load" }, { "sweep " .. tmp .. "/none.lua", 1, "cannot read" },
    }
    for _, c in ipairs(cases) do
      local code, out, err = gptoss_cli(c[1])
      assert.are.equal(c[2], code, c[1])
      assert.are.equal("", out, c[1])
      assert.matches(c[3], err, 1, true)
    end
  end)

  it("bench prints llama-bench's table, CSV and JSON on stdout, its progress on stderr", function()
    local args = "bench " .. tiny .. " -p 16 -n 4 -pg 16,4 -d 0,32 -r 2 --threads 1"
    local code, out, err = gptoss_cli(args)
    assert.are.equal(0, code, err)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal(8, #lines)
    assert.matches("^| model +| +size | +params | backend | threads | +test | +t/s |$", lines[1])
    assert.matches("^| %-+ | %-+: |", lines[2])
    local tests = {}
    for i = 3, 8 do
      local test, mean, sd = lines[i]:match("| +([%w+@ ]-) | +([%d.]+) ± ([%d.]+) |$")
      assert.is_truthy(test, lines[i])
      assert.is_true(tonumber(mean) > 0 and tonumber(sd) >= 0)
      tests[#tests + 1] = test
    end
    assert.are.same({ "pp16", "tg4", "pp16+tg4", "pp16 @ d32", "tg4 @ d32", "pp16+tg4 @ d32" }, tests)
    assert.matches("bench 12/12 runs", err, 1, true)
    assert.is_nil(out:find("runs", 1, true))

    code, out = gptoss_cli(args .. " -o json")
    assert.are.equal(0, code)
    local rows = cjson.decode(out)
    assert.are.equal(6, #rows)
    for _, r in ipairs(rows) do
      -- every sample's t/s is its tokens over its time; the summary is their mean and sample stddev
      local sum = 0
      for i, ns in ipairs(r.samples_ns) do
        assert.near((r.n_prompt + r.n_gen) / (ns * 1e-9), r.samples_ts[i], 1e-3 * r.samples_ts[i])
        sum = sum + r.samples_ts[i]
      end
      local mean = sum / #r.samples_ts
      local sd = math.sqrt(((r.samples_ts[1] - mean) ^ 2 + (r.samples_ts[2] - mean) ^ 2) / 1)
      assert.near(mean, r.avg_ts, 1e-9 * mean)
      assert.near(sd, r.stddev_ts, 1e-9 * mean)
      assert.near((r.samples_ns[1] + r.samples_ns[2]) / 2, r.avg_ns, 1)
      assert.are.equal(tiny, r.model_filename)
      assert.are.equal("CPU", r.backends)
    end
    assert.are.same({ 16, 0, 16, 16, 0, 16 }, { rows[1].n_prompt, rows[2].n_prompt, rows[3].n_prompt,
                                               rows[4].n_prompt, rows[5].n_prompt, rows[6].n_prompt })
    assert.are.same({ 0, 0, 0, 32, 32, 32 }, { rows[1].n_depth, rows[2].n_depth, rows[3].n_depth,
                                              rows[4].n_depth, rows[5].n_depth, rows[6].n_depth })

    code, out = gptoss_cli("bench " .. tiny .. " -p 8 -n 0 -r 2 --threads 1 -o csv")
    assert.are.equal(0, code)
    local csv = {}
    for l in out:gmatch("[^\n]+") do csv[#csv + 1] = l end
    assert.are.equal(2, #csv)
    assert.are.equal(table.concat(bench.FIELDS, ","), csv[1])
    local cells = {}
    for c in csv[2]:gmatch('"([^"]*)"') do cells[#cells + 1] = c end
    assert.are.equal(#bench.FIELDS, #cells)
    local rec = {}
    for i, f in ipairs(bench.FIELDS) do rec[f] = cells[i] end
    assert.are.same({ "8", "0", "0" }, { rec.n_prompt, rec.n_gen, rec.n_depth })
  end)

  it("train saves the adapter, history.csv and loss.png, with the library's losses; merge and generate use it", function()
    local data = tmp .. "/train.jsonl"
    local recs = {}
    for i = 1, 3 do
      recs[i] = cjson.encode { messages = { { role = "user", content = "Count to " .. i }, { role = "assistant", content = "1 2 " .. i } } }
    end
    H.write(data, table.concat(recs, "\n") .. "\n")
    local out_dir = tmp .. "/adapter"
    local code, out, err = gptoss_cli(string.format("train %s --data %s --steps 2 --r 2 --targets attn --max-len 64 --seed 5 --out %s --threads 1",
      tiny, data, out_dir))
    assert.are.equal(0, code, err)
    assert.matches("train 2/2 steps", err, 1, true)
    assert.is_nil(out:find("ETA", 1, true))
    local loss = tonumber(out:match("final loss ([%d.]+)"))
    assert.is_number(loss)
    -- the same training in-process
    local m = assert(gptoss.load(tiny, { threads = 1 }))
    local lora = gptoss.lora(m, { r = 2, targets = { "attn" }, seed = 5 })
    local run = gptoss.train(m, lora, { data = data, steps = 2, max_len = 64, seed = 5 })
    assert.near(run.final_loss, loss, 1e-4)
    lora:close()
    local hist = {}
    for l in H.read(out_dir .. "/history.csv"):gmatch("[^\n]+") do hist[#hist + 1] = l end
    assert.are.equal("step,loss,learning_rate,grad_norm,eval_loss", hist[1])
    assert.are.equal(3, #hist)
    assert.near(run.history[2].loss, tonumber(hist[3]:match("^2,([^,]+)")), 1e-6)
    assert.are.equal("\137PNG", H.read(out_dir .. "/loss.png"):sub(1, 4))
    assert.is_true(H.exists(out_dir .. "/adapter_config.json"))

    -- generate: the library's greedy continuation with that adapter
    local a = assert(gptoss.adapter.load(out_dir))
    local want = m:generate(m.tokenizer:encode("Count to 3", { allowed_special = "all" }),
      { max_tokens = 6, temperature = 0, adapter = a })
    code, out, err = gptoss_cli(string.format("generate %s 'Count to 3' --max-tokens 6 --temperature 0 --adapter %s --threads 1",
      tiny, out_dir))
    assert.are.equal(0, code, err)
    assert.are.equal(want.text .. "\n", out)
    assert.matches("6 generated tokens", err, 1, true)
    a:close(); m:close()

    local merged = tmp .. "/merged"
    code, out, err = gptoss_cli(string.format("merge %s %s %s --threads 1", tiny, out_dir, merged))
    assert.are.equal(0, code, err)
    assert.are.equal(merged .. "\n", out)
    local mm = assert(gptoss.load(merged, { threads = 1 }))
    mm:close()
  end)

  it("chat answers a prompt on stdout as gptoss.chat does", function()
    local m = assert(gptoss.load(tiny, { threads = 1 }))
    local want = gptoss.chat(m, { { role = "user", content = "Hi" } }, { max_tokens = 12, temperature = 0, reasoning = "low",
      date = os.date("%Y-%m-%d") })
    m:close()
    local code, out, err = gptoss_cli("chat " .. tiny .. " Hi --max-tokens 12 --temperature 0 --threads 1")
    assert.are.equal(0, code, err)
    assert.are.equal((want.final or "") .. "\n", out)
  end)

  it("checkpoint writes the generator's checkpoint, with its progress on stderr", function()
    local out_dir = tmp .. "/ckpt"
    local code, out, err = gptoss_cli("checkpoint --preset tiny --seed 1 --out " .. out_dir .. " --no-tokenizer")
    assert.are.equal(0, code, err)
    assert.matches("^" .. out_dir:gsub("%p", "%%%0") .. ": tiny, %d+ tensors", out)
    assert.matches("checkpoint 2/2 shards", err, 1, true)
    for _, f in ipairs(H.files(tiny)) do
      if f:match("%.safetensors$") then assert.is_true(H.read(tiny .. "/" .. f) == H.read(out_dir .. "/" .. f), f) end
    end
  end)
end)
