-- LoRA training on the CPU backend against PEFT 0.21 + transformers 5.17
-- autograd (float32): loss, every LoRA gradient, and 5 AdamW steps with
-- clipping, on the tiny checkpoint (seed 1). Fixture:
-- tools/reference/peft_train.py, run on the device by device_lora.sh.
local H = require "helpers"
local gptoss = require "gptoss"
local train = require "gptoss.train"

local FX = "spec/fixtures/lora/"
local MODS = { "q", "k", "v", "o" }

local name, flat, v128 = H.peft_lora_name, H.flat, H.v128

local RUNS = { train_r4 = MODS, train_experts_r4 = { "o", "gate_up", "down" } }

describe("LoRA training (CPU) vs PEFT", function()
  local m
  setup(function() m = assert(gptoss.load(H.tiny(), { tokenizer = false })) end)
  teardown(function() m:close() end)

  for run, mods in pairs(RUNS) do
    local function fixture() return H.lora_fixture(run) end

    it(run .. ": gives PEFT's loss and every LoRA gradient (relative L2 <= 1e-4)", function()
      local fx, ids, mask = fixture()
      local a = assert(gptoss.adapter.load(FX .. run))
      assert.are.equal(4 * #mods, a.modules)
      local loss, n = m:lora_backward(a, ids, mask)
      assert.are.equal(25, n)                      -- 39 predicted positions, 14 masked
      local want = fx:numbers("loss")[1]
      assert.is_true(math.abs(loss / n - want) / want < 1e-5, string.format("loss %.8g vs %.8g", loss / n, want))
      local worst = H.check_peft_grads(a, fx, mods, n, 1e-4)
      print(string.format("\n  %s gradients: worst relative L2 %.3g over %d tensors", run, worst, 8 * #mods))
      -- gradients accumulate until zero_grad
      local x0 = a:module(2, mods[1])
      local g1 = x0.gA:get(1, 1)
      m:lora_backward(a, ids, mask)
      assert.near(2 * g1, a:module(2, mods[1]).gA:get(1, 1), math.abs(g1) * 1e-5)
      a:zero_grad()
      assert.are.equal(0, a:module(2, mods[1]).gA:get(1, 1))
      a:close(); fx:close()
    end)

    it(run .. ": follows PEFT through 5 AdamW steps with clipping (weights within 1e-3)", function()
      local fx, ids, mask = fixture()
      local a = assert(gptoss.adapter.load(FX .. run))
      local losses, norms = fx:numbers("losses"), fx:numbers("grad_norms")
      for s = 1, 5 do
        a:zero_grad()
        local loss, n = m:lora_backward(a, ids, mask)
        assert.is_true(math.abs(loss / n - losses[s]) / losses[s] < 1e-4, string.format("step %d loss %.6g vs %.6g", s, loss / n, losses[s]))
        local gn = a:step { lr = 1e-2, betas = { 0.9, 0.999 }, eps = 1e-8, weight_decay = 0.01, max_grad_norm = 1.0, grad_scale = 1 / n }
        assert.is_true(math.abs(gn - norms[s]) / norms[s] < 1e-4, string.format("step %d grad norm %.6g vs %.6g", s, gn, norms[s]))
      end
      assert.are.equal(5, a.steps)
      local worst = 0
      for l = 0, 3 do
        for _, p in ipairs(mods) do
          local x = a:module(l, p)
          for _, w in ipairs { "A", "B" } do
            local err = H.rel_l2(flat(x[w]), flat(fx:floats("step5." .. name(l, p, w))))
            worst = math.max(worst, err)
            assert.is_true(err <= 1e-3, string.format("layer %d %s lora_%s: relative L2 %.3g", l, p, w, err))
          end
        end
      end
      print(string.format("\n  %s after 5 steps: worst relative L2 %.3g", run, worst))
      a:close(); fx:close()
    end)
  end

  -- step returns once the gradient norm is known; the update itself runs on
  -- a thread a layer at a time (csrc/adapter.c). Whatever comes next sees
  -- the finished step: here a zero_grad straight after it (a) against a
  -- read that waits for the update first (b), same data, three steps.
  it("steps the same whether the next call comes during AdamW's update or after it", function()
    local fx, ids, mask = H.lora_fixture("train_experts_r4")
    local a = assert(gptoss.adapter.load(FX .. "train_experts_r4"))
    local b = assert(gptoss.adapter.load(FX .. "train_experts_r4"))
    for _ = 1, 3 do
      for _, x in ipairs { a, b } do
        if x == b then x:module(3, "down") end
        x:zero_grad()
        local _, n = m:lora_backward(x, ids, mask)
        x:step { lr = 1e-2, max_grad_norm = 1.0, grad_scale = 1 / n }
      end
    end
    a:zero_grad()
    for l = 0, 3 do
      for _, p in ipairs { "o", "gate_up", "down" } do
        local xa, xb = a:module(l, p), b:module(l, p)
        assert.are.same(flat(xb.A), flat(xa.A)); assert.are.same(flat(xb.B), flat(xa.B))
        for _, g in ipairs { "gA", "gB" } do
          for _, v in ipairs(flat(xa[g])) do assert.are.equal(0, v) end
        end
      end
    end
    local dir = H.tmpdir() .. "/stepped"
    assert.is_true(a:save(dir))   -- save waits too: what it writes is the finished step
    local c = assert(gptoss.adapter.load(dir))
    assert.are.same(flat(b:module(3, "down").B), flat(c:module(3, "down").B))
    a:close(); b:close(); c:close(); fx:close()
  end)

  it("makes new adapters as PEFT does: B zero, so the model starts unchanged", function()
    local a = gptoss.lora(m, { r = 4, alpha = 8, targets = { "q", "v" }, layers = { 1, 3 }, seed = 3 })
    assert.are.equal(4, a.modules)
    assert.is_nil(a:module(0, "q")); assert.is_nil(a:module(1, "k"))
    local q = a:module(1, "q")
    local bound, maxa = 1 / math.sqrt(64), 0
    for _, v in ipairs(flat(q.A)) do maxa = math.max(maxa, math.abs(v)) end
    assert.is_true(maxa <= bound and maxa > 0.8 * bound, "A ~ U(-1/sqrt(in), 1/sqrt(in))")
    for _, v in ipairs(flat(q.B)) do assert.are.equal(0, v) end
    local base, with = m:logits({ 5, 6, 7 }), nil
    local s = m:session { adapter = a }
    with = s:feed({ 5, 6, 7 }, "all")
    s:close()
    assert.are.same(base:row(3), with:row(3))
    -- the same seed gives the same adapter; another seed another
    local b = gptoss.lora(m, { r = 4, alpha = 8, targets = { "q", "v" }, layers = { 1, 3 }, seed = 3 })
    local c = gptoss.lora(m, { r = 4, alpha = 8, targets = { "q", "v" }, layers = { 1, 3 }, seed = 4 })
    assert.are.same(flat(q.A), flat(b:module(1, "q").A))
    assert.are_not.same(flat(q.A), flat(c:module(1, "q").A))
    a:close(); b:close(); c:close()
  end)

  it("makes expert LoRAs in PEFT's ParamWrapper layout, saved as PEFT names them", function()
    local a = gptoss.lora(m, { r = 4, alpha = 8, targets = { "o", "gate_up_proj", "down" }, seed = 1 })
    local gu = a:module(0, "gate_up")
    assert.are.equal(8, gu.experts)
    assert.are.same({ 32, 64 }, { gu.A:shape() }); assert.are.same({ 128, 32 }, { gu.B:shape() })
    local dir = H.tmpdir() .. "/experts"
    assert.is_true(a:save(dir))
    local mine, peft = assert(gptoss.safetensors(dir .. "/adapter_model.safetensors")),
      assert(gptoss.safetensors(FX .. "train_experts_r4/adapter_model.safetensors"))
    local function names(r) local t = {} for _, x in ipairs(r:tensors()) do t[#t + 1] = x.name .. tostring(x.shape[1]) .. "x" .. tostring(x.shape[2]) end table.sort(t) return t end
    assert.are.same(names(peft), names(mine))
    local cfg = require("cjson").decode(H.read(dir .. "/adapter_config.json"))
    assert.are.same({ "mlp.experts.gate_up_proj", "mlp.experts.down_proj" }, cfg.target_parameters)
    assert.are.same({ "o_proj" }, cfg.target_modules)
    local b = assert(gptoss.adapter.load(dir))
    assert.are.equal(12, b.modules)
    mine:close(); peft:close(); a:close(); b:close()
  end)

  it("trains with LoRA dropout: gradients match finite differences of the loss under the same masks", function()
    local a = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 3, dropout = 0.3 })
    local ids = {}
    for i = 1, 16 do ids[i] = (i * 7919) % 200000 end
    local checked = 0
    for _, w in ipairs { { 0, "k", "B", 7, 1 }, { 1, "v", "B", 3, 2 }, { 0, "o", "B", 9, 3 }, { 2, "q", "B", 11, 4 },
                         { 0, "q", "A", 2, 2 }, { 0, "k", "A", 3, 1 }, { 1, "o", "A", 1, 7 } } do
      a:zero_grad()
      m:lora_backward(a, ids)
      local x = a:module(w[1], w[2])
      local g, v0, eps = x["g" .. w[3]]:get(w[4], w[5]), x[w[3]]:get(w[4], w[5]), 1e-3
      a:set(w[1], w[2], w[3], w[4], w[5], v0 + eps)
      local lp = m:lora_backward(a, ids)
      a:set(w[1], w[2], w[3], w[4], w[5], v0 - eps)
      local lm = m:lora_backward(a, ids)
      a:set(w[1], w[2], w[3], w[4], w[5], v0)
      local fd = (lp - lm) / (2 * eps)
      assert.is_true(math.abs(g - fd) <= 0.02 * math.abs(fd), string.format("layer %d %s %s: %.5g vs %.5g", w[1], w[2], w[3], g, fd))
      checked = checked + 1
    end
    assert.are.equal(7, checked)
    -- the masks depend on the step: the same step gives the same loss, the next another
    local l1 = m:lora_backward(a, ids)
    assert.are.equal(l1, (m:lora_backward(a, ids)))
    a:step { lr = 0 }
    assert.are_not.equal(l1, (m:lora_backward(a, ids)))
    -- and dropout is off outside training: a session sees the plain adapter
    local b = gptoss.lora(m, { r = 4, alpha = 8, init = "random", seed = 3 })
    local sa, sb = m:session { adapter = a }, m:session { adapter = b }
    assert.are.same(sa:feed(ids, "last"):row(1), sb:feed(ids, "last"):row(1))
    sa:close(); sb:close(); a:close(); b:close()
    assert.has_error(function() gptoss.lora(m, { dropout = 0.1, targets = { "gate_up" } }) end,
      "lora: dropout cannot apply to expert LoRAs (as in PEFT): use 0 with gate_up/down")
  end)

  it("raises on bad options and bad input", function()
    assert.has_error(function() gptoss.lora(m, { r = 0 }) end, "gptoss.lora: r must be an integer in 1..1024 (got 0)")
    assert.has_error(function() gptoss.lora(m, { targets = { "router" } }) end,
      "gptoss.lora: targets[1] must be q, k, v, o, gate_up, down (or their _proj names), attn or experts (got router)")
    local all = gptoss.lora(m, { r = 2, targets = { "attn", "experts" } })
    assert.are.equal(24, all.modules)
    all:close()
    assert.has_error(function() gptoss.lora(m, { layers = { 4 } }) end, "gptoss.lora: layers[1] must be an integer in 0..3 (got 4)")
    assert.has_error(function() gptoss.lora(m, { rank = 4 }) end)
    local a = gptoss.lora(m, { r = 2 })
    assert.has_error(function() a:step { lr = 1e-3 } end, "adamw: no gradients yet (run a backward pass first)")
    assert.has_error(function() m:lora_backward(a, { 5 }) end, "lora backward: a sequence needs at least 2 tokens (got 1)")
    assert.has_error(function() m:lora_backward(a, { 5, 300000 }) end,
      "lora backward: token id 300000 at position 2 is outside the vocabulary (201088)")
    assert.has_error(function() m:lora_backward(a, { 5, 6 }, { true }) end, "model:lora_backward: mask has 1 entries for 2 ids")
    assert.has_error(function() train.train(m, a, { data = {}, steps = 1 }) end, "gptoss.train: data is empty")
    assert.has_error(function() train.train(m, a, { data = { { ids = { 1 } } } }) end, "gptoss.train: data[1] needs ids (at least 2) or text")
    assert.has_error(function() train.train(m, a, { data = { { ids = { 1, 2 } } }, sched = "x" }) end, "gptoss.train: unknown option 'sched'")
    a:close()
  end)
end)

describe("gptoss.train", function()
  it("schedules the learning rate as transformers does", function()
    local o = { lr = 1.0, warmup = 2, schedule = "linear" }
    assert.are.same({ 0, 0.5, 1, 0.75, 0.5, 0.25 }, { train.lr_at(1, 6, o), train.lr_at(2, 6, o), train.lr_at(3, 6, o),
      train.lr_at(4, 6, o), train.lr_at(5, 6, o), train.lr_at(6, 6, o) })
    o.schedule = "cosine"
    assert.near(0.5, train.lr_at(5, 6, o), 1e-12)
    assert.near(0.5 * (1 + math.cos(math.pi / 4)), train.lr_at(4, 6, o), 1e-12)
    o.schedule = "constant"
    assert.are.equal(1, train.lr_at(6, 6, o))
    assert.are.equal("overfitting", train.flag(0.2)); assert.are.equal("target", train.flag(0.45))
    assert.are.equal("training", train.flag(0.7)); assert.are.equal("underfitting", train.flag(1.5))
  end)

  it("overfits a small dataset (loss below 0.1), reproducibly, with eval", function()
    local m = v128()
    local data = H.overfit_data()
    local function run()
      local lora = gptoss.lora(m, { r = 8, alpha = 16, seed = 1 })
      local seen = {}
      local r = gptoss.train(m, lora, { data = data, steps = 60, lr = 1e-2, warmup = 3, schedule = "constant", batch = 3,
                                        eval = { data[1] }, eval_every = 30, seed = 5,
                                        on_step = function(step, info) seen[step] = info.loss end })
      return r, seen, lora
    end
    local r, seen, lora = run()
    assert.is_true(r.final_loss < 0.1, "final loss " .. r.final_loss)
    assert.are.equal("overfitting", r.flag)
    assert.is_true(seen[1] > 2, "starts high: " .. seen[1])
    assert.is_true(r.eval_loss < 0.1 and r.eval_perplexity < 1.11)
    assert.is_number(r.history[30].eval_loss)
    assert.is_true(r.history[60].tokens_per_s > 0 and r.history[60].grad_norm >= 0)
    assert.is_number(r.history[60].memory.total)         -- device bytes (0 on the CPU backend)
    assert.are.equal(60, lora.steps)
    local r2, seen2 = run()
    assert.are.same(seen, seen2)                   -- seedable and reproducible
    print(string.format("\n  overfit: loss %.3f -> %.4f in 60 steps", seen[1], r.final_loss))
    lora:close(); m:close()
  end)
end)

describe("training profiles", function()
  -- the oracle: the seeds' script (Maxli53/NeMo_NIM scripts/train.py), its
  -- PROFILES table and what main() derives from it, written out by hand
  local SEEDS = {
    quick_test   = { r = 16, batch = 4, grad_accum = 4, steps = 30,  dataset_size = 100,   checkpoint_every = 15,  log_every = 1 },
    standard     = { r = 16, batch = 4, grad_accum = 4, steps = 200, dataset_size = 1000,  checkpoint_every = 50,  log_every = 10 },
    full         = { r = 16, batch = 4, grad_accum = 4, steps = 500, dataset_size = 5000,  checkpoint_every = 100, log_every = 10 },
    max_quality  = { r = 16, batch = 6, grad_accum = 2, steps = 500, dataset_size = 10000, checkpoint_every = 50,  log_every = 10 },
    conservative = { r = 8,  batch = 2, grad_accum = 8, steps = 100, dataset_size = 1000,  checkpoint_every = 25,  log_every = 5 },
  }

  it("gives the seeds' steps, dataset sizes, ranks and batches, with their optimizer and schedule", function()
    for name, want in pairs(SEEDS) do
      local a = train.lora_options(name)
      assert.are.same({ r = want.r, alpha = 2 * want.r, rslora = want.r >= 16, dropout = 0, seed = 3407,
                        targets = { "attn", "experts" } }, a, name)
      local o = train.options(name, a.r)
      for k, v in pairs(want) do if k ~= "r" then assert.are.equal(v, o[k], name .. " " .. k) end end
      assert.are.equal(2e-4, o.lr); assert.are.equal("cosine", o.schedule); assert.are.equal(20, o.warmup)
      assert.are.equal(0.01, o.weight_decay); assert.are.equal(3407, o.seed); assert.are.equal(3, o.keep)
      assert.are.equal(want.r >= 16 and 2048 or 1024, o.max_len, name)
      assert.are.equal(0.5, o.target_loss)
    end
    -- what the caller gives wins, and what follows from it follows
    local o = train.options("standard", 8, { schedule = "linear", steps = 7 })
    assert.are.same({ 2, 8, 1024, 10, 7 }, { o.batch, o.grad_accum, o.max_len, o.warmup, o.steps })
    local a = train.lora_options("standard", { r = 32, rslora = false })
    assert.are.same({ 32, 64, false }, { a.r, a.alpha, a.rslora })
  end)

  it("drives gptoss.lora and gptoss.train: the first dataset_size examples, a log every log_every steps", function()
    local m = v128()
    local lora = gptoss.lora(m, { profile = "quick_test", r = 4 })
    assert.are.same({ 4, 8, 0 }, { lora.r, lora.alpha, lora.dropout })
    assert.are.equal(6 * m.config.num_hidden_layers, lora.modules)      -- q, k, v, o, gate_up, down
    local data = H.overfit_data()
    data[4] = { ids = { 5, 9, 17, 33, 65, 1, 2, 3 } }
    local logs, losses = {}, {}
    local opts = { profile = "quick_test", data = data, dataset_size = 3, steps = 5, batch = 1, grad_accum = 1,
                   lr = 1e-2, log_every = 2, on_log = function(step, info) logs[#logs + 1] = { step, info.loss, info.steps } end,
                   on_step = function(step, info) losses[step] = info.loss end }
    local r = gptoss.train(m, lora, opts)
    assert.are.equal(3, r.examples)
    assert.are.equal("cosine", r.options.schedule)
    assert.are.same({ 2, 4, 5 }, { logs[1][1], logs[2][1], logs[3][1] })
    assert.are.same({ 2, 2, 1 }, { logs[1][3], logs[2][3], logs[3][3] })
    assert.near((losses[1] + losses[2]) / 2, logs[1][2], 1e-12)
    assert.near((losses[3] + losses[4]) / 2, logs[2][2], 1e-12)
    assert.are.equal(losses[5], logs[3][2])
    -- the same run over just the first three examples gives the same curve
    local lora2 = gptoss.lora(m, { profile = "quick_test", r = 4 })
    opts.data, opts.dataset_size, opts.on_log = { data[1], data[2], data[3] }, nil, nil
    local losses1 = losses
    losses = {}
    gptoss.train(m, lora2, opts)
    assert.are.same(losses1, losses)
    lora:close(); lora2:close(); m:close()
  end)

  it("refuses an unknown profile and bad counts", function()
    local m = v128()
    assert.has_error(function() gptoss.lora(m, { profile = "fast" }) end,
      "gptoss.lora: unknown training profile 'fast' (conservative, full, max_quality, quick_test, standard)")
    local a = gptoss.lora(m, { r = 2 })
    assert.has_error(function() gptoss.train(m, a, { profile = "fast", data = H.overfit_data() }) end,
      "gptoss.train: unknown training profile 'fast' (conservative, full, max_quality, quick_test, standard)")
    assert.has_error(function() gptoss.train(m, a, { data = H.overfit_data(), log_every = 0 }) end,
      "gptoss.train: log_every must be an integer in 1..2147483647 (got 0)")
    assert.has_error(function() gptoss.train(m, a, { data = H.overfit_data(), dataset_size = 1.5 }) end,
      "gptoss.train: dataset_size must be an integer in 1..2147483647 (got 1.5)")
    a:close(); m:close()
  end)
end)

describe("training checkpoints", function()
  it("resumes after a kill and continues the loss curve exactly", function()
    local m = v128()
    local data = {}
    for k = 1, 5 do
      local ids = {}
      for i = 1, 8 + k do ids[i] = (i * 29 + k * 13) % 128 end
      data[k] = { ids = ids }
    end
    local opts = { data = data, steps = 12, lr = 5e-3, warmup = 2, schedule = "cosine", batch = 2, seed = 9 }
    local whole = gptoss.train(m, gptoss.lora(m, { r = 4, seed = 2 }), opts)

    local ck = H.tmpdir() .. "/ck"
    local o2 = {}
    for k, v in pairs(opts) do o2[k] = v end
    o2.checkpoint_dir, o2.checkpoint_every, o2.resume = ck, 4, true
    -- the run dies at step 10, after the checkpoint of step 8
    o2.on_step = function(step) if step == 10 then error("killed") end end
    assert.has_error(function() gptoss.train(m, gptoss.lora(m, { r = 4, seed = 2 }), o2) end)
    local path, state = train.latest(ck)
    assert.are.equal(ck .. "/step-000008", path)
    assert.are.equal(8, state.step)
    assert.is_true(H.exists(ck .. "/step-000004"))           -- keep = 2: steps 4 and 8 remain
    -- a fresh process would start from a new adapter: so do we
    o2.on_step = nil
    local lora = gptoss.lora(m, { r = 4, seed = 99 })
    local resumed = gptoss.train(m, lora, o2)
    assert.are.equal(12, lora.steps)
    for s = 1, 12 do
      assert.are.equal(whole.history[s].loss, resumed.history[s].loss, "step " .. s)
    end
    -- the final checkpoint is a PEFT adapter
    local last = train.latest(ck)
    assert.are.equal(ck .. "/step-000012", last)
    assert.is_truthy(gptoss.adapter.load(last))
    local names = {}
    for _, f in ipairs(H.files(ck)) do names[#names + 1] = f end
    table.sort(names)
    assert.are.same({ "latest", "step-000008", "step-000012" }, names)
    m:close()
  end)

  it("refuses a checkpoint of another run", function()
    local m = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    local a = gptoss.lora(m, { r = 2 })
    local bad = H.tmpdir() .. "/opt.safetensors"
    H.write(bad, "not safetensors")
    local ok, err = a:load_state(bad)
    assert.is_nil(ok); assert.matches("opt.safetensors", err, 1, true)
    local b = gptoss.lora(m, { r = 3 })
    assert.has_error(function() a:copy_from(b) end, "adapters differ at layer 0 q_proj (shapes)")
    a:close(); b:close(); m:close()
  end)
end)
