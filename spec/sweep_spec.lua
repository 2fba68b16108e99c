-- gptoss.sweep: trial lists, the pruners against hand-computed cutoffs,
-- a LoRA grid sweep and a random sweep with their files and plots, and a
-- sweep killed mid-trial that resumes to the uninterrupted results.
local H = require "helpers"
local sweep = require "gptoss.sweep"
local cjson = require "cjson"

local function csv_rows(path)
  local rows, head = {}, nil
  for line in H.read(path):gmatch("[^\n]+") do
    local cells = {}
    for c in (line .. ","):gmatch("([^,]*),") do cells[#cells + 1] = c end
    if not head then head = cells else
      local r = {}
      for i, k in ipairs(head) do r[k] = cells[i] end
      rows[#rows + 1] = r
    end
  end
  return rows, head
end

local function is_png(path)
  return H.exists(path) and H.read(path):sub(1, 8) == "\137PNG\r\n\26\n"
end

-- a trial following known curves: value(params, step)
local function curve_trial(value, steps)
  return function(params, report)
    for s = 1, steps do report(s, { score = value(params, s) }) end
  end
end

describe("sweep trials", function()
  it("enumerates a grid in name order, the last name fastest, capped by run_cap", function()
    local t = sweep.trials { method = "grid", metric = { name = "x" },
      parameters = { lr = { values = { 1, 2 } }, r = { values = { 8, 16 } }, fixed = { value = "f" } } }
    local got = {}
    for i, x in ipairs(t) do got[i] = { x.params.lr, x.params.r, x.params.fixed } end
    assert.are.same({ { 1, 8, "f" }, { 1, 16, "f" }, { 2, 8, "f" }, { 2, 16, "f" } }, got)
    assert.are.equal(3, #sweep.trials { method = "grid", run_cap = 3, metric = { name = "x" },
      parameters = { a = { values = { 1, 2, 3, 4 } } } })
    assert.has_error(function() sweep.trials { method = "grid", parameters = { a = { distribution = "uniform", min = 0, max = 1 } } } end)
    assert.has_error(function() sweep.trials { method = "random", parameters = { a = { values = { 1 } } } } end)
  end)

  it("draws random trials from the seed alone, inside each distribution", function()
    local spec = { method = "random", run_cap = 40, seed = 7, parameters = {
      u = { distribution = "uniform", min = -1, max = 3 },
      lv = { distribution = "log_uniform_values", min = 1e-5, max = 1e-3 },
      l = { distribution = "log_uniform", min = -2, max = 0 },
      n = { distribution = "int_uniform", min = 2, max = 4 },
      c = { values = { "a", "b" } } } }
    local a, b = sweep.trials(spec), sweep.trials(spec)
    assert.are.same(a, b)
    local seen_n, seen_c, low, high = {}, {}, 0, 0
    for _, t in ipairs(a) do
      local p = t.params
      assert.is_true(p.u >= -1 and p.u < 3)
      assert.is_true(p.lv >= 1e-5 and p.lv <= 1e-3)
      if p.lv < 1e-4 then low = low + 1 else high = high + 1 end   -- log-uniform: half each side of 1e-4
      assert.is_true(p.l >= math.exp(-2) and p.l <= 1)
      assert.are.equal(math.floor(p.n), p.n)
      seen_n[p.n] = true; seen_c[p.c] = true
    end
    assert.are.same({ [2] = true, [3] = true, [4] = true }, seen_n)
    assert.are.same({ a = true, b = true }, seen_c)
    assert.is_true(low >= 10 and high >= 10, low .. " below 1e-4, " .. high .. " above")
    spec.seed = 8
    assert.are_not.same(a[1].params, sweep.trials(spec)[1].params)
  end)
end)

describe("pruners", function()
  it("median: stops a trial worse than the finished trials' median at the same step, after 5 finished", function()
    local dir = H.tmpdir() .. "/median"
    -- trials 1-5 finish with score = k * 10 - step at steps 1..4 (median at step s: 30 - s);
    -- trial 6 scores 29 flat (better than 30 - s up to step 1, worse from step 2: 29 > 28);
    -- trial 7 scores 25 flat (always better)
    local values = { 10, 20, 30, 40, 50, "flat29", "flat25" }
    local res = sweep.run({ dir = dir, method = "grid", metric = { name = "score", goal = "minimize" },
      early_terminate = { type = "median" }, parameters = { k = { values = values } },
      trial = curve_trial(function(p, s)
        if p.k == "flat29" then return 29 elseif p.k == "flat25" then return 25 end
        return p.k - s
      end, 4) }, { plots = false })
    local by = {}
    for _, r in ipairs(res.results) do by[r.params.k] = r end
    for _, k in ipairs { 10, 20, 30, 40, 50 } do assert.are.equal("finished", by[k].state) end
    assert.are.equal("pruned", by.flat29.state)
    assert.are.equal(2, by.flat29.last_step)            -- median at step 2 is 28 < 29
    assert.are.equal("finished", by.flat25.state)
    assert.are.equal(4, by.flat25.last_step)
    -- the pruned trial's steps stop where it was stopped
    local steps = sweep.read_steps(sweep.trial_dir(dir, 6) .. "/steps.jsonl")
    assert.are.equal(2, #steps)
  end)

  it("median: prunes nothing before n_startup_trials have finished, nor before n_warmup_steps", function()
    local f = sweep.median_pruner {}
    local finished = {}
    for i = 1, 4 do finished[i] = { state = "finished", curve = { [1] = 0 }, steps = { 1 } } end
    assert.is_false(f("minimize", { [1] = 5 }, 1, finished, { 1 }))
    finished[5] = { state = "finished", curve = { [1] = 0 }, steps = { 1 } }
    assert.is_true(f("minimize", { [1] = 5 }, 1, finished, { 1 }))
    assert.is_false(sweep.median_pruner { n_warmup_steps = 2 }("minimize", { [1] = 5 }, 1, finished, { 1 }))
    -- maximize: worse means lower
    assert.is_true(f("maximize", { [1] = -1 }, 1, finished, { 1 }))
    assert.is_false(f("maximize", { [1] = 1 }, 1, finished, { 1 }))
    -- no finished trial reported that step: go on
    assert.is_false(f("minimize", { [1] = 5, [2] = 5 }, 2, finished, { 1, 2 }))
  end)

  it("asha: keeps the top quarter at each rung (cutoff by numpy's linear percentile)", function()
    local f = sweep.asha {}                        -- grace 1, factor 4, max_t 100: rungs 1, 4, 16, 64
    local others = {}
    for i, v in ipairs { 1, 2, 3, 4 } do others[i] = { state = "finished", curve = { [1] = v }, steps = { 1 } } end
    -- rewards -1..-4; 75th percentile of {-4,-3,-2,-1} = -2 + 0.25 = -1.75: stop when -v < -1.75
    assert.is_false(f("minimize", { [1] = 1.7 }, 1, others, { 1 }))
    assert.is_true(f("minimize", { [1] = 1.8 }, 1, others, { 1 }))
    -- step 2 reaches no new rung: never stopped there
    assert.is_false(f("minimize", { [1] = 1.7, [2] = 99 }, 2, others, { 1, 2 }))
    -- maximize: 75th percentile of {1,2,3,4} = 3.25
    assert.is_true(f("maximize", { [1] = 3.2 }, 1, others, { 1 }))
    assert.is_false(f("maximize", { [1] = 3.3 }, 1, others, { 1 }))
    assert.are.equal("finish", sweep.asha { max_t = 3 }("minimize", { [3] = 0 }, 3, others, { 3 }))
  end)
end)

describe("sweep runs", function()
  local tiny, data, spec_text
  local grid_dir = H.tmpdir() .. "/grid"
  setup(function()
    tiny = H.tiny()
    data = {}
    for i = 1, 4 do
      data[i] = { messages = { { role = "user", content = "What is " .. i .. "+" .. i .. "?" },
                               { role = "assistant", content = "It is " .. 2 * i .. "." } } }
    end
    -- the LoRA grid, as a spec file the command line can run too
    spec_text = string.format([[
local data = %s
return {
  name = "grid", method = "grid", metric = { name = "eval_loss", goal = "minimize" },
  parameters = { r = { values = { 2, 4 } }, lr = { values = { 1e-3, 3e-3 } } },
  trial = "lora",
  lora = { model = %q, load = { threads = 1 }, data = data, eval = { data[1], data[2] },
           adapter = { seed = 1, targets = { "attn" } },
           train = { steps = 3, eval_every = 3, checkpoint_every = 1, max_len = 64 } },
}]], "require('cjson').decode([==[" .. cjson.encode(data) .. "]==])", tiny)
  end)

  it("a 2x2 LoRA grid writes trials.csv, best.json, the report, the plots and each adapter", function()
    local path = H.tmpdir() .. "/grid_spec.lua"
    H.write(path, spec_text)
    local spec = dofile(path)
    local res = sweep.run(spec, { dir = grid_dir })
    local rows, head = csv_rows(grid_dir .. "/trials.csv")
    assert.are.equal(4, #rows)
    assert.are.same({ "trial", "state", "lr", "r", "eval_loss" }, { head[1], head[2], head[3], head[4], head[5] })
    local best_row
    for _, r in ipairs(rows) do
      assert.are.equal("finished", r.state)
      if not best_row or tonumber(r.eval_loss) < tonumber(best_row.eval_loss) then best_row = r end
    end
    local best = cjson.decode(H.read(grid_dir .. "/best.json"))
    assert.are.equal(tonumber(best_row.trial), best.trial)
    assert.are.equal(res.best.index, best.trial)
    assert.near(tonumber(best_row.eval_loss), best.metric.value, 1e-9 * best.metric.value)
    -- the saved adapter gives the recorded eval loss (an independent evaluation)
    local gptoss = require "gptoss"
    local m = assert(gptoss.load(tiny, { threads = 1 }))
    local a = assert(gptoss.adapter.load(sweep.trial_dir(grid_dir, best.trial) .. "/adapter"))
    local loss = require("gptoss.train").evaluate(m, a, { data[1], data[2] }, { max_len = 64 })
    assert.near(loss, best.metrics.eval_loss, 1e-9 * loss)
    a:close(); m:close()
    -- each trial: params.json, 3 steps, result.json
    for i = 1, 4 do
      local td = sweep.trial_dir(grid_dir, i)
      assert.are.same(res.trials[i].params, cjson.decode(H.read(td .. "/params.json")).params)
      local steps = sweep.read_steps(td .. "/steps.jsonl")
      assert.are.same({ 1, 2, 3 }, { steps[1].step, steps[2].step, steps[3].step })
      assert.is_number(steps[3].eval_loss)
    end
    local report = H.read(grid_dir .. "/report.md")
    assert.matches(string.format("**Best: trial %d**", best.trial), report, 1, true)
    assert.matches("| trial | state | lr | r | eval_loss |", report, 1, true)
    for _, f in ipairs { "loss.png", "metric_lr.png", "metric_r.png" } do
      assert.is_true(is_png(grid_dir .. "/" .. f), f)
      assert.matches("](" .. f .. ")", report, 1, true)
    end
    assert.matches("loss per step", H.read(grid_dir .. "/plots.txt"), 1, true)
  end)

  it("a random sweep writes its files, and the same seed gives the same trials and results", function()
    local function spec(dir)
      return { dir = dir, method = "random", run_cap = 5, seed = 3, metric = { name = "score", goal = "maximize" },
        parameters = { x = { distribution = "uniform", min = 0, max = 1 }, lr = { distribution = "log_uniform_values", min = 1e-4, max = 1e-2 } },
        trial = function(p, report)
          for s = 1, 3 do report(s, { score = -(p.x - 0.3) ^ 2 * s, loss = p.lr * s }) end
        end }
    end
    local d1, d2 = H.tmpdir() .. "/random1", H.tmpdir() .. "/random2"
    local r1 = sweep.run(spec(d1))
    sweep.run(spec(d2))
    assert.are.equal(H.read(d1 .. "/trials.csv"), H.read(d2 .. "/trials.csv"))
    local rows = csv_rows(d1 .. "/trials.csv")
    assert.are.equal(5, #rows)
    local best_x, best_v
    for _, r in ipairs(rows) do
      local v = -(tonumber(r.x) - 0.3) ^ 2 * 3            -- the metric, computed again from the parameter
      assert.near(v, tonumber(r.score), 1e-9)
      if not best_v or v > best_v then best_x, best_v = r.trial, v end
    end
    assert.are.equal(tonumber(best_x), cjson.decode(H.read(d1 .. "/best.json")).trial)
    assert.are.equal(r1.best.index, tonumber(best_x))
    for _, f in ipairs { "loss.png", "metric_x.png", "metric_lr.png", "report.md" } do assert.is_true(H.exists(d1 .. "/" .. f), f) end
    assert.is_true(is_png(d1 .. "/metric_lr.png"))
  end)

  it("killed mid-trial and run again, finishes with the uninterrupted results", function()
    local dir = H.tmpdir() .. "/killed"
    local path = dir .. ".lua"
    H.write(path, spec_text)
    local pidfile = dir .. ".pid"
    -- the command line runs the sweep in a child process; kill it once trial 2 has a checkpoint
    os.execute(string.format("sh -c 'echo $$ > %s; exec %s bin/gptoss sweep %s --dir %s --no-plots' >/dev/null 2>%s.err &",
      pidfile, H.lua, path, dir, dir))
    local latest = sweep.trial_dir(dir, 2) .. "/checkpoint/latest"
    for _ = 1, 1200 do
      if H.exists(latest) then break end
      os.execute("sleep 0.1")
    end
    local pid = H.read(pidfile):match("%d+")
    assert.is_true(H.exists(latest), "trial 2 never checkpointed: " .. (H.exists(dir .. ".err") and H.read(dir .. ".err") or ""))
    os.execute("kill -9 " .. pid)
    os.execute("sleep 0.2")
    assert.is_false(H.exists(sweep.trial_dir(dir, 2) .. "/result.json"))
    assert.is_false(H.exists(dir .. "/trials.csv"))
    local ok = os.execute(string.format("%s bin/gptoss sweep %s --dir %s >/dev/null 2>%s.err2", H.lua, path, dir, dir))
    assert.is_truthy(ok == true or ok == 0, H.read(dir .. ".err2"))
    assert.are.equal(H.read(grid_dir .. "/trials.csv"), H.read(dir .. "/trials.csv"))
    for i = 1, 4 do
      assert.are.equal(H.read(sweep.trial_dir(grid_dir, i) .. "/steps.jsonl"), H.read(sweep.trial_dir(dir, i) .. "/steps.jsonl"))
    end
  end)

  it("runs trials in parallel over the devices listed, one process a trial", function()
    local dir = H.tmpdir() .. "/parallel"
    local path = dir .. ".lua"
    -- each trial holds its device for 0.5 s and records when, where and in which process
    H.write(path, [[
local core = require "gptoss.core"
return {
  name = "par", method = "grid", metric = { name = "score", goal = "minimize" },
  parameters = { x = { values = { 1, 2, 3, 4 } } }, devices = { "cpu", "cpu" },
  trial = function(p, report, ctx)
    local t0 = core.clock()
    os.execute("sleep 0.5")
    report(1, { score = p.x * 2 })
    return { pid = core.getpid(), t0 = t0, t1 = core.clock(), on_cpu = ctx.device == "cpu" and 1 or 0 }
  end,
}]])
    local ok = os.execute(string.format("%s bin/gptoss sweep %s --dir %s >/dev/null 2>%s.err", H.lua, path, dir, dir))
    assert.is_truthy(ok == true or ok == 0, H.read(dir .. ".err"))
    local rs, pids = {}, {}
    for i = 1, 4 do
      rs[i] = cjson.decode(H.read(sweep.trial_dir(dir, i) .. "/result.json"))
      assert.are.equal("finished", rs[i].state)
      assert.are.equal(2 * i, rs[i].metrics.score)
      assert.are.equal(1, rs[i].metrics.on_cpu)
      pids[rs[i].metrics.pid] = true
    end
    local n = 0
    for _ in pairs(pids) do n = n + 1 end
    assert.are.equal(4, n)
    -- two at a time: trials 1 and 2 overlap, and no three trials ever run at once
    assert.is_true(rs[1].metrics.t0 < rs[2].metrics.t1 and rs[2].metrics.t0 < rs[1].metrics.t1)
    for i = 1, 4 do
      local at = 0
      for j = 1, 4 do
        if rs[j].metrics.t0 <= rs[i].metrics.t0 and rs[i].metrics.t0 < rs[j].metrics.t1 then at = at + 1 end
      end
      assert.is_true(at <= 2)
    end
    assert.matches("**Best: trial 1**", H.read(dir .. "/report.md"), 1, true)
  end)

  it("refuses a directory holding another sweep, and a spec without metric or trial", function()
    assert.has_error(function()
      sweep.run({ dir = grid_dir, method = "grid", metric = { name = "x" }, parameters = { a = { values = { 1 } } },
        trial = function() end })
    end, "sweep: " .. grid_dir .. " holds a sweep with other trials; give another dir")
    assert.has_error(function() sweep.run { parameters = {}, trial = function() end } end)
    assert.has_error(function() sweep.run { metric = { name = "x" }, parameters = {} } end)
  end)
end)
