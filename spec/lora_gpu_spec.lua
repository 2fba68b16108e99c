-- LoRA on the CUDA backend (#gpu): sessions with adapters against PEFT's
-- logits (the fixtures of lora_spec.lua) and the CPU backend; training
-- against PEFT 0.21 + transformers 5.17 autograd in float32 (the fixtures of
-- lora_train_spec.lua) and against the CPU backend, which computes the same
-- masks and steps in fp32.
local H = require "helpers"
local gptoss = require "gptoss"

local FX = "spec/fixtures/lora/"
local RUNS = { train_r4 = { "q", "k", "v", "o" }, train_experts_r4 = { "o", "gate_up", "down" } }
local flat = H.flat

local fixture = H.lora_fixture

-- worst relative L2 between two adapters' gradients (or weights), over mods of layers 0..3
local function worst_between(a, b, mods, what)
  local worst = 0
  for l = 0, 3 do
    for _, p in ipairs(mods) do
      local x, y = a:module(l, p), b:module(l, p)
      assert.are.equal(not x, not y)
      for _, w in ipairs(x and { "A", "B" } or {}) do
        worst = math.max(worst, H.rel_l2(flat(x[what .. w]), flat(y[what .. w])))
      end
    end
  end
  return worst
end

-- one backward pass of the same adapter on the CPU (a) and the GPU (b):
-- the same token count, the loss within 1e-5 and mods' gradients within 1e-3
-- (relative L2); returns the gradients' worst
local function backward_both(cpu, gpu, a, b, ids, mods, what)
  local la, na = cpu:lora_backward(a, ids)
  local lb, nb = gpu:lora_backward(b, ids)
  assert.are.equal(na, nb)
  assert.is_true(math.abs(la - lb) / la < 1e-5, string.format("%s: loss %.8g vs %.8g", what, lb, la))
  local err = worst_between(b, a, mods, "g")
  assert.is_true(err < 1e-3, string.format("%s: gradients worst relative L2 %.3g", what, err))
  return err
end

describe("LoRA training on CUDA #gpu", function()
  -- "exact" (split-bf16 products throughout) comes within about 1e-4, and
  -- is held to 1e-3 so that a regression shows; "mixed" (split bf16 up to
  -- each router and in the attention backward, bf16 after) within about
  -- 6e-3, held to the issue's 2e-2; "fast" rounds every activation to bf16
  -- before the GEMMs, and on this random 4-layer model a rounding in the
  -- forward tips some tokens' top-4 experts (its logits are already 0.18
  -- off, gpu_spec.lua): within about 0.15
  local TOL = { exact = 1e-3, mixed = 2e-2, fast = 0.25 }
  for _, precision in ipairs { "exact", "mixed", "fast" } do
    for run, mods in pairs(RUNS) do
      local tol = TOL[precision]
      it(precision .. ", " .. run .. ": PEFT's loss and every LoRA gradient within " .. tol, function()
        local m = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0", precision = precision }))
        local fx, ids, mask = fixture(run)
        local a = assert(gptoss.adapter.load(FX .. run))
        local loss, n = m:lora_backward(a, ids, mask)
        assert.are.equal(25, n)
        local want = fx:numbers("loss")[1]
        local lerr = math.abs(loss / n - want) / want
        assert.is_true(lerr <= tol, string.format("loss %.8g vs %.8g", loss / n, want))
        local worst = H.check_peft_grads(a, fx, mods, n, tol)
        print(string.format("\n  cuda %s %s: loss relative error %.3g, gradients worst relative L2 %.3g over %d tensors",
          precision, run, lerr, worst, 8 * #mods))
        -- gradients accumulate across calls, as on the CPU
        local g1 = a:module(1, mods[1]).gA:get(1, 1)
        m:lora_backward(a, ids, mask)
        assert.near(2 * g1, a:module(1, mods[1]).gA:get(1, 1), math.abs(g1) * 1e-4)
        a:close(); fx:close(); m:close()
      end)
    end
  end

  it("matches the CPU's gradients with dropout and a layer subset, step after step (the device copy follows each change)", function()
    local cpu = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    local gpu = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0" }))
    local opts = { r = 4, alpha = 8, init = "random", seed = 7, dropout = 0.2, layers = { 0, 2, 3 } }
    local a, b = gptoss.lora(cpu, opts), gptoss.lora(gpu, opts)
    local ids = {}
    for i = 1, 24 do ids[i] = (i * 7919) % 200000 end
    local worst = 0
    for s = 1, 3 do
      a:zero_grad(); b:zero_grad()
      worst = math.max(worst, backward_both(cpu, gpu, a, b, ids, { "q", "k", "v", "o" }, "step " .. s))
      -- Adam turns rounding-level differences in near-zero gradients into
      -- whole steps, so the GPU adapter takes the CPU's weights after each
      -- step: the next backward must see them (and the step's new masks)
      a:step { lr = 1e-2, max_grad_norm = 1 }
      b:copy_from(a); b:step { lr = 0 }
    end
    -- a weight set from Lua, and the GPU adapter's own step, reach the device copy too
    a:set(0, "q", "B", 1, 1, 0.5); b:set(0, "q", "B", 1, 1, 0.5)
    b:step { lr = 1e-2 }; a:copy_from(b); a:step { lr = 0 }
    a:zero_grad(); b:zero_grad()
    local la, lb = cpu:lora_backward(a, ids), gpu:lora_backward(b, ids)
    assert.is_true(math.abs(la - lb) / la < 1e-5, string.format("after set and step: loss %.8g vs %.8g", lb, la))
    print(string.format("\n  cuda vs cpu, 3 steps with dropout: gradients within %.3g", worst))
    a:close(); b:close(); cpu:close(); gpu:close()
  end)

  it("steps with the norm of the gradients the device added (kept as it adds them), through accumulation and a CPU pass", function()
    local cpu = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    local gpu = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0" }))
    local b = gptoss.lora(gpu, { r = 4, alpha = 8, init = "random", seed = 11, targets = { "attn", "experts" } })
    local ids, ids2 = {}, {}
    for i = 1, 24 do ids[i] = (i * 7919) % 200000; ids2[i] = (i * 104729 + 17) % 200000 end
    -- the norm from the gradients themselves, in double precision
    local function norm(scale)
      local s = 0
      for l = 0, 3 do
        for _, p in ipairs { "q", "k", "v", "o", "gate_up", "down" } do
          local x = b:module(l, p)
          for _, g in ipairs(x and { x.gA, x.gB } or {}) do
            for _, v in ipairs(flat(g)) do s = s + (v * scale) ^ 2 end
          end
        end
      end
      return math.sqrt(s)
    end
    local function check(what, scale)
      local want = norm(scale)
      local got = b:step { lr = 1e-3, grad_scale = scale }
      assert.is_true(want > 0 and math.abs(got - want) / want < 1e-6, string.format("%s: norm %.10g, want %.10g", what, got, want))
    end
    b:zero_grad(); gpu:lora_backward(b, ids)
    check("one pass", 1)
    b:zero_grad(); gpu:lora_backward(b, ids); gpu:lora_backward(b, ids2)
    check("two passes accumulated, scaled", 0.5)
    b:zero_grad(); gpu:lora_backward(b, ids); cpu:lora_backward(b, ids2)   -- the CPU's adds keep no sums
    check("a device pass and a CPU pass", 1 / 3)
    b:zero_grad(); cpu:lora_backward(b, ids); gpu:lora_backward(b, ids2)   -- the device's add covers whole layers
    check("a CPU pass, then a device pass", 1)
    b:close(); cpu:close(); gpu:close()
  end)

  it("takes head sizes without attention tiles (24) through materialised scores, windows included, with the CPU's gradients", function()
    local dir = H.checkpoint("tiny_d24", { preset = "tiny", seed = 5, tokenizer = false, overrides = { head_dim = 24 } })
    local cpu = assert(gptoss.load(dir, { tokenizer = false }))
    local gpu = assert(gptoss.load(dir, { tokenizer = false, device = "cuda:0" }))
    local ids = {}
    for i = 1, 40 do ids[i] = (i * 7919) % 200000 end   -- past the sliding window of 16
    local opts = { r = 4, alpha = 8, init = "random", seed = 5, targets = { "attn" } }
    local a, b = gptoss.lora(cpu, opts), gptoss.lora(gpu, opts)
    local err = backward_both(cpu, gpu, a, b, ids, { "q", "k", "v", "o" }, "head size 24")
    print(string.format("\n  cuda vs cpu, head size 24 (no attention tiles): gradients within %.3g", err))
    a:close(); b:close(); cpu:close(); gpu:close()
  end)

  it("matches the CPU's expert gradients at every rank path (rounded up to 8, 16, 64; past 64 through cuBLAS)", function()
    local cpu = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    local gpu = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0" }))
    local ids = {}
    for i = 1, 40 do ids[i] = (i * 104729) % 200000 end
    for _, r in ipairs { 3, 16, 40, 80 } do
      local opts = { r = r, alpha = 2 * r, init = "random", seed = r, targets = { "o", "gate_up", "down" } }
      local a, b = gptoss.lora(cpu, opts), gptoss.lora(gpu, opts)
      local err = backward_both(cpu, gpu, a, b, ids, { "o", "gate_up", "down" }, "r " .. r)
      print(string.format("\n  cuda vs cpu, experts at r %d: gradients within %.3g", r, err))
      a:close(); b:close()
    end
    cpu:close(); gpu:close()
  end)

  it("trains a sequence in chunks of experts (GPTOSS_TRAIN_MOE_TOKENS) with the CPU's gradients", function()
    -- in a child process, whose trainer takes 7-token chunks: 45 tokens
    -- run their experts in 7 chunks, the last of 3; the CPU, which never
    -- chunks, is the oracle
    local script = H.tmpdir() .. "/chunks.lua"
    H.write(script, string.format([[
package.path, package.cpath = %q, %q
local gptoss = require "gptoss"
local H = require "helpers"
local tiny = %q
local cpu = assert(gptoss.load(tiny, { tokenizer = false }))
local gpu = assert(gptoss.load(tiny, { tokenizer = false, device = "cuda:0" }))
local ids = {}
for i = 1, 45 do ids[i] = (i * 104729) %% 200000 end
local mods = { "q", "k", "v", "o", "gate_up", "down" }
local opts = { r = 16, alpha = 32, init = "random", seed = 7, targets = mods }
local a, b = gptoss.lora(cpu, opts), gptoss.lora(gpu, opts)
local la, na = cpu:lora_backward(a, ids)
local lb, nb = gpu:lora_backward(b, ids)
local worst = 0
for l = 0, 3 do
  for _, p in ipairs(mods) do
    local x, y = a:module(l, p), b:module(l, p)
    for _, w in ipairs { "gA", "gB" } do worst = math.max(worst, H.rel_l2(H.flat(y[w]), H.flat(x[w]))) end
  end
end
print(string.format("chunks %%d %%d %%.10g %%.10g %%.6g", na, nb, la, lb, worst))
]], package.path, package.cpath, H.tiny()))
    local f = assert(io.popen("GPTOSS_TRAIN_MOE_TOKENS=7 " .. H.lua .. " " .. script .. " 2>&1"))
    local out = f:read("a")
    f:close()
    local na, nb, la, lb, worst = out:match("chunks (%d+) (%d+) (%S+) (%S+) (%S+)")
    assert.is_not_nil(na, out)
    assert.are.equal(na, nb)
    la, lb, worst = tonumber(la), tonumber(lb), tonumber(worst)
    assert.is_true(math.abs(la - lb) / la < 1e-5, string.format("loss %.8g vs the CPU's %.8g", lb, la))
    assert.is_true(worst < 1e-3, string.format("gradients worst relative L2 %.3g", worst))
    print(string.format("\n  cuda in 7-token expert chunks vs cpu: gradients within %.3g", worst))
  end)

  for _, precision in ipairs { "exact", "mixed" } do
    it("overfits a small dataset with gptoss.train (loss below 0.1), precision " .. precision, function()
      local m = H.v128 { tokenizer = false, device = "cuda:0", precision = precision }
      local data = H.overfit_data()
      local lora = gptoss.lora(m, { r = 8, alpha = 16, seed = 1, targets = { "attn", "experts" } })
      local r = gptoss.train(m, lora, { data = data, steps = 60, lr = 1e-2, warmup = 3, schedule = "constant", batch = 3, seed = 5 })
      assert.is_true(r.final_loss < 0.1, "final loss " .. r.final_loss)
      assert.is_true(r.history[60].memory.workspace > 0)
      print(string.format("\n  cuda %s overfit: loss %.3f -> %.4f in 60 steps", precision, r.history[1].loss, r.final_loss))
      lora:close(); m:close()
    end)
  end

  it("refuses bad input plainly and stays usable", function()
    local m = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0" }))
    local a = gptoss.lora(m, { r = 4, alpha = 8 })
    assert.has_error(function() m:lora_backward(a, { 5, 300000 }) end)
    local other = H.v128()
    local b = gptoss.lora(other, { r = 4, alpha = 8 })
    assert.has_error(function() m:lora_backward(b, { 5, 6, 7 }) end)
    local loss, n = m:lora_backward(a, { 5, 6, 7 })
    assert.are.equal(2, n)
    assert.is_true(loss > 0)
    a:close(); b:close(); other:close(); m:close()
  end)
end)

describe("LoRA adapters in CUDA sessions #gpu", function()
  local NAMES = { "attn_r4", "qv_rslora_r8", "experts_r4" }
  local gpu, cpu
  setup(function()
    gpu = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0" }))
    cpu = assert(gptoss.load(H.tiny(), { tokenizer = false }))
  end)
  teardown(function() gpu:close(); cpu:close() end)

  for _, name in ipairs(NAMES) do
    it(name .. ": PEFT's adapter gives PEFT's logits (relative L2 <= 2e-2, same argmax)", function()
      local fx = assert(gptoss.safetensors(FX .. name .. ".safetensors"))
      local ids = fx:numbers("ids")
      local a = assert(gptoss.adapter.load(FX .. name))
      local lg = H.session_logits(gpu, ids, a)
      local worst = H.compare_peft_logits(lg, fx)
      local base = H.compare_peft_logits(H.session_logits(gpu, ids, nil), fx)
      print(string.format("\n  cuda %s: worst relative L2 %.3g (base model: %.3g)", name, worst, base))
      assert.is_true(worst <= 2e-2, string.format("relative L2 %.3g", worst))
      -- the same top token, or a near tie (1e-3) with PEFT's
      local want = fx:numbers("argmax")
      for t = 1, #want do
        local best, top = lg:argmax(t)
        local gap = top - lg:get(t, want[t] + 1)
        assert.is_true(best == want[t] or gap <= 1e-3 * math.max(1, math.abs(top)),
          string.format("position %d: argmax %d, PEFT's %d, %.3g below", t, best, want[t], gap))
      end
      assert.is_true(base > 0.1, "the adapter changes too little to tell")
      a:close(); fx:close()
    end)
  end

  it("decodes and batches several adapters at once, greedy tokens as the CPU's", function()
    local ad = {}
    for i, name in ipairs(NAMES) do ad[i] = assert(gptoss.adapter.load(FX .. name)) end
    local fx = assert(gptoss.safetensors(FX .. "attn_r4.safetensors"))
    local prompt = fx:numbers("ids")
    fx:close()
    local function run(m, batched)
      local greedy = gptoss.sampler(m.config.vocab_size, { temperature = 0 })
      local ss = { m:session { adapter = ad[1] }, m:session(), m:session { adapter = ad[3] }, m:session { adapter = ad[2] } }
      local out = {}
      for i, s in ipairs(ss) do s:feed(prompt, "last"); out[i] = {} end
      local last = {}
      for i, s in ipairs(ss) do last[i] = s:sample(greedy) end
      for step = 1, 8 do
        for i in ipairs(ss) do out[i][step] = last[i] end
        -- switching adapters mid-stream: another rank, and from none to one
        if step == 4 then ss[1]:set_adapter(ad[2]) end
        if step == 6 then ss[2]:set_adapter(ad[3]) end
        if batched then
          last = gptoss.batch_step(ss, last, { greedy, greedy, greedy, greedy })
        else
          for i, s in ipairs(ss) do last[i] = gptoss.batch_step({ s }, { last[i] }, { greedy })[1] end
        end
      end
      for _, s in ipairs(ss) do s:close() end
      return out
    end
    local want = run(cpu, false)
    assert.are.same(want, run(gpu, false))          -- one session a step: the decode path
    assert.are.same(want, run(gpu, true))           -- four sessions, three adapters and none, in one batch
    assert.are_not.same(want[1], want[2])           -- the adapters do change the tokens
    for _, a in ipairs(ad) do a:close() end
  end)

  it("follows writes to the adapter, training included, and gives its copy back when the adapter goes", function()
    local fx = assert(gptoss.safetensors(FX .. "experts_r4.safetensors"))
    local ids = fx:numbers("ids")
    fx:close()
    local a = assert(gptoss.adapter.load(FX .. "experts_r4"))
    local function agree(tag)
      local g, c = H.session_logits(gpu, ids, a), H.session_logits(cpu, ids, a)
      for t = 1, #ids do
        local e = H.rel_l2(g:row(t), c:row(t))
        assert.is_true(e <= 2e-2, string.format("%s: position %d relative L2 %.3g", tag, t, e))
      end
      return g
    end
    H.session_logits(gpu, ids, nil)                 -- drops the copies of adapters earlier specs closed
    local before = gpu:memory().workspace
    local g0 = agree("loaded")
    local with = gpu:memory().workspace
    assert.is_true(with > before, "the adapter's copy shows in the workspace")
    a:set(1, "gate_up", "B", 3, 2, 5.0)
    local g1 = agree("after set")
    assert.is_true(H.rel_l2(g1:row(#ids), g0:row(#ids)) > 1e-3, "the write reached the device copy")
    -- a training step on the GPU, then a session again: each backend sees the stepped weights
    gpu:lora_backward(a, ids)
    a:step { lr = 1e-2, grad_scale = 1 / (#ids - 1) }
    agree("after a step")
    a:close()
    collectgarbage(); collectgarbage()
    H.session_logits(gpu, ids, nil)                 -- the next forward drops the copy nobody holds
    assert.are.equal(before, gpu:memory().workspace)
  end)

  it("refuses an adapter that does not fit the memory budget plainly, and stays usable", function()
    local probe = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0" }))
    local s0 = probe:session()
    s0:feed({ 1, 2, 3, 4 }, "last")
    local need = probe:memory().total
    s0:close(); probe:close()
    local tight = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0", memory = need + 2e6 }))
    local big = gptoss.lora(tight, { r = 256, targets = { "attn", "experts" }, init = "random" })
    assert.is_true(big.params * 4 > 2e6)
    local s = tight:session { adapter = big }
    local ok, err = pcall(s.feed, s, { 1, 2, 3, 4 }, "last")
    assert.is_false(ok)
    assert.matches("adapter's device copy needs", tostring(err), 1, true)
    assert.matches("memory budget", tostring(err), 1, true)
    s:set_adapter(nil)                               -- the same session, without it, still runs
    s:feed({ 1, 2, 3, 4 }, "last")
    s:close(); big:close(); tight:close()
  end)

  it("refuses an adapter of another shape, as the CPU does", function()
    local other = H.v128()
    local b = gptoss.lora(other, { r = 4, targets = { "attn", "experts" } })
    local ok, err = pcall(function() gpu:session { adapter = b } end)
    local ok2, err2 = pcall(function() cpu:session { adapter = b } end)
    assert.is_false(ok); assert.is_false(ok2)
    assert.are.equal(tostring(err2):gsub("^.-:%d+: ", ""), (tostring(err):gsub("^.-:%d+: ", "")))
    assert.matches("adapter", tostring(err))
    b:close(); other:close()
  end)
end)

describe("merged checkpoints in transformers #gpu", function()
  it("a merge with expert LoRAs loads in transformers and gives the adapter's logits (bf16 rounding aside)", function()
    local m = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    local a = assert(gptoss.adapter.load(FX .. "experts_r4"))
    local fx = assert(gptoss.safetensors(FX .. "experts_r4.safetensors"))
    local dir = H.tmpdir()
    local out = dir .. "/merged"
    assert.are.equal(out, m:merge(a, out))
    local ids = fx:numbers("ids")
    H.write(dir .. "/ids.json", require("cjson").encode(ids))
    local ok = os.execute(string.format("python3 tools/reference/hf_merged_logits.py '%s' '%s' '%s'", out, dir .. "/ids.json",
      dir .. "/logits.safetensors"))
    assert.is_truthy(ok == true or ok == 0, "transformers could not run the merged checkpoint")
    local got = assert(gptoss.safetensors(dir .. "/logits.safetensors"))
    local lg = got:floats("logits")
    -- as for attention merges (lora_spec.lua): bf16 rounding of W + dW moves
    -- some near-tied routers of this random model
    local worst = H.compare_peft_logits(lg, fx)
    local base = H.compare_peft_logits(lg, fx, "base_")
    print(string.format("\n  transformers on the merged checkpoint: %.3g from PEFT's adapter logits, %.3g from the base's", worst, base))
    assert.is_true(worst < 0.25 and worst < base / 5, string.format("merged: %.3g from the adapter's, %.3g from the base", worst, base))
    got:close(); fx:close(); a:close(); m:close()
  end)
end)
