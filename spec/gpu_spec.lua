-- The CUDA backend against the CPU backend (its oracle) and the
-- transformers fixture. Runs on the GPU machine: make test-gpu (#gpu).
local H = require "helpers"
local gptoss = require "gptoss"

local function rel_l2(a, b)
  local num, den = 0, 0
  for i = 1, #b do local d = a[i] - b[i]; num = num + d * d; den = den + b[i] * b[i] end
  return math.sqrt(num / den)
end

local function agreement(lg_a, lg_b, rows)
  local same = 0
  for t = 1, rows do if (lg_a:argmax(t)) == (lg_b:argmax(t)) then same = same + 1 end end
  return same / rows
end

-- how many (token, layer) expert sets two sessions' traces (s:trace_get())
-- share, and how many there are
local function same_routes(ta, tb)
  local same, total = 0, 0
  for t = 1, #tb do
    for l = 1, #tb[t] do
      total = total + 1
      if table.concat(ta[t][l].experts, ",") == table.concat(tb[t][l].experts, ",") then same = same + 1 end
    end
  end
  return same, total
end

local function small()
  return H.checkpoint("small", { preset = "small", seed = 2 })
end

describe("CUDA backend #gpu", function()
  local cpu, gpu, prompt
  setup(function()
    cpu = assert(gptoss.load(H.tiny()))
    gpu = assert(gptoss.load(H.tiny(), { device = "cuda:0" }))
    local fx = assert(gptoss.safetensors("spec/fixtures/parity/tiny_seed1.safetensors"))
    prompt = fx:numbers("prompt_ids")
    fx:close()
  end)

  it("reports its device and memory", function()
    assert.are.equal("cuda:0", gpu.device)
    local mem = gpu:memory()
    -- the untied embedding table (201,088 x 64 bf16) may stay in pinned host
    -- memory, which host counts and weights does not
    local embed = 201088 * 64 * 2
    assert.is_true(mem.host == 0 or mem.host == embed, "host " .. mem.host)
    assert.is_true(mem.weights + mem.host >= 51804896, "weights " .. mem.weights)
    assert.is_true(mem.device_total > 0)
  end)

  it("matches the CPU logits (relative L2 <= 2e-2, top-1 >= 98%) on the tiny fixture's prompt", function()
    local a, b = gpu:logits(prompt), cpu:logits(prompt)
    local worst = 0
    for t = 1, #prompt do
      local e = rel_l2(a:row(t), b:row(t))
      worst = math.max(worst, e)
      assert.is_true(e <= 2e-2, string.format("position %d: relative L2 %.4f", t, e))
    end
    local agree = agreement(a, b, #prompt)
    print(string.format("\n  tiny: worst relative L2 %.3g, top-1 agreement %.1f%%", worst, 100 * agree))
    assert.is_true(agree >= 0.98)
  end)

  it("stays within 2e-2 of the CPU with precision = \"fast\" (bf16 GEMM inputs, fp16 KV)", function()
    local fast = assert(gptoss.load(H.tiny(), { device = "cuda:0", precision = "fast" }))
    local a, b = fast:logits(prompt), cpu:logits(prompt)
    local worst = 0
    for t = 1, #prompt do worst = math.max(worst, rel_l2(a:row(t), b:row(t))) end
    print(string.format("\n  tiny, fast precision: worst relative L2 %.3g, top-1 agreement %.1f%%", worst, 100 * agreement(a, b, #prompt)))
    assert.is_true(worst <= 2e-2 * 10)   -- routing flips on a random model: reported, loosely bounded
    fast:close()
  end)

  it("runs inference in precision \"mixed\" as in \"exact\" (mixed differs in training alone): the same logits, bit for bit", function()
    local mixed = assert(gptoss.load(H.tiny(), { device = "cuda:0", precision = "mixed" }))
    local a, b = mixed:logits(prompt), gpu:logits(prompt)
    for t = 1, #prompt do assert.are.same(b:row(t), a:row(t)) end
    mixed:close()
  end)

  it("matches transformers' logits on the fixture's vocabulary sample", function()
    local fx = assert(gptoss.safetensors("spec/fixtures/parity/tiny_seed1.safetensors"))
    local subset, ref = fx:numbers("subset_ids"), fx:floats("logits_subset")
    local lg = gpu:logits(prompt)
    for t = 1, #prompt do
      local mine = {}
      for j, id in ipairs(subset) do mine[j] = lg:get(t, id + 1) end
      assert.is_true(rel_l2(mine, ref:row(t)) <= 2e-2)
    end
    fx:close()
  end)

  it("keeps the session invariants: prefill+decode = one prefill, fork, rewind", function()
    local whole = gpu:logits(prompt)
    local s = gpu:session()
    local half = math.floor(#prompt / 2)
    local part = {}
    for i = 1, half do part[i] = prompt[i] end
    s:feed(part, "none")
    for t = half + 1, #prompt do
      local one = s:feed({ prompt[t] }, "last")
      assert.is_true(rel_l2(one:row(1), whole:row(t)) < 1e-3, "decode position " .. t)
    end
    local f = s:fork()
    assert.are.equal(s:feed({ 42 }, "last"):bytes(), f:feed({ 42 }, "last"):bytes())
    s:rewind(half)
    local again = s:feed({ prompt[half + 1] }, "last")
    assert.is_true(rel_l2(again:row(1), whole:row(half + 1)) < 1e-3)
  end)

  it("decodes on the graph-captured path with the CPU's logits and top-1, teacher-forced", function()
    -- the CPU's greedy continuation, fed token by token to both backends
    local want = cpu:generate(prompt, { temperature = 0, max_tokens = 40, stop_tokens = {} }).ids
    local sg, sc = gpu:session(), cpu:session()
    sg:feed(prompt, "last")
    sc:feed(prompt, "last")
    local greedy = gptoss.sampler(gpu.config.vocab_size, { temperature = 0 })
    local agree, worst = 0, 0
    for i = 1, #want - 1 do
      local g = sg:step(want[i], greedy)          -- the fused, graph-captured step
      local c = sc:feed({ want[i] }, "last")
      worst = math.max(worst, rel_l2(sg:logits():row(1), c:row(1)))
      if g == want[i + 1] then agree = agree + 1 end
    end
    agree = agree / (#want - 1)
    print(string.format("\n  decode (teacher-forced, %d steps): worst relative L2 %.3g, top-1 agreement %.1f%%",
      #want - 1, worst, 100 * agree))
    assert.is_true(worst <= 2e-2)
    assert.is_true(agree >= 0.98)
  end)

  it("gives batched results equal to single-session results", function()
    local prompts = { prompt, { 1, 2, 3, 4, 5 }, { 900, 800, 700 } }
    local batch = gpu:generate_batch(prompts, { temperature = 0, max_tokens = 12, stop_tokens = {} })
    for i, p in ipairs(prompts) do
      local single = gpu:generate(p, { temperature = 0, max_tokens = 12, stop_tokens = {} })
      assert.are.same(single.ids, batch[i].ids)
    end
  end)

  it("steps 24 sessions together with the CPU's logits and top-1, teacher-forced", function()
    -- the tiny model routes each token to 4 of 8 experts: 24 sessions give
    -- 12 rows an expert a step, past the CUDA-core GEMVs' 2, so the experts
    -- run on the tiled GEMMs, or on moe_mma.cu with GPTOSS_MOE_MMA_ROWS=32
    -- (and the dense products on dense_mma.cu with GPTOSS_DENSE_MMA_TOKENS=64:
    -- tools/reference/device_round22.sh runs the #gpu specs so)
    local n, gs, cs, ids, smp = 24, {}, {}, {}, {}
    local greedy = gptoss.sampler(gpu.config.vocab_size, { temperature = 0 })
    for i = 1, n do
      local p = {}
      for j = 1, 3 + i % 5 do p[j] = (i * 37 + j * 11) % 900 + 1 end
      gs[i], cs[i] = gpu:session(), cpu:session()
      gs[i]:feed(p, "last")
      ids[i] = cs[i]:feed(p, "last"):argmax(1)
      smp[i] = greedy
    end
    local worst, agree, total = 0, 0, 0
    for _ = 1, 6 do
      local want = gptoss.batch_step(cs, ids, smp)   -- the CPU's greedy tokens, fed to both
      local got = gptoss.batch_step(gs, ids, smp)
      for i = 1, n do
        worst = math.max(worst, rel_l2(gs[i]:logits():row(1), cs[i]:logits():row(1)))
        if got[i] == want[i] then agree = agree + 1 end
        total = total + 1
      end
      ids = want
    end
    print(string.format("\n  24 sessions, 6 steps: worst relative L2 %.3g, top-1 agreement %d of %d", worst, agree, total))
    assert.is_true(worst <= 1e-3)
    assert.is_true(agree / total >= 0.98)
    for i = 1, n do gs[i]:close(); cs[i]:close() end
  end)

  it("samples reproducibly with a seed, with every sampler", function()
    for _, o in ipairs { { temperature = 1.0 }, { temperature = 0.8, top_p = 0.9 }, { top_k = 20 },
                         { min_p = 0.1, repetition_penalty = 1.3, presence_penalty = 0.2 } } do
      o.max_tokens, o.seed, o.stop_tokens = 16, 1234, {}
      local a, b = gpu:generate(prompt, o), gpu:generate(prompt, o)
      assert.are.same(a.ids, b.ids)
      o.seed = 99
      local c = gpu:generate(prompt, o)
      assert.are.equal(16, #c.ids)
    end
  end)

  it("samples a token whose logit_bias is +inf, with and without filters, as the CPU does", function()
    local id = 1234
    for _, o in ipairs { { temperature = 1, seed = 1 }, { temperature = 0.8, top_p = 0.9, seed = 2 },
                         { temperature = 1, top_k = 5, min_p = 0.1, seed = 3 }, { temperature = 0 } } do
      o.max_tokens = 3
      o.logit_bias = { [id] = math.huge }
      for _, m in ipairs { gpu, cpu } do
        local r = m:generate(prompt, o)
        assert.are.same({ id, id, id }, r.ids)
      end
    end
  end)

  it("traces expert routing like the CPU backend", function()
    local a, b = gpu:trace_experts(prompt), cpu:trace_experts(prompt)
    local same, total = 0, 0
    for l = 1, #a do
      for t = 1, #prompt do
        total = total + 1
        if table.concat(a[l][t].experts, ",") == table.concat(b[l][t].experts, ",") then same = same + 1 end
      end
    end
    print(string.format("\n  routing: %d of %d (layer, token) expert sets agree", same, total))
    assert.is_true(same / total >= 0.98, string.format("%d of %d routings agree", same, total))
  end)

  it("feeds in passes the sliding ring can hold, with the CPU's logits and routing at every position", function()
    -- rewind 4: a ring of 16 + 4 slots, so the plan cuts the prompt into passes of 4 tokens
    local g, c = gpu:session { rewind = 4 }, cpu:session()
    g:trace(true); c:trace(true)
    local a, b = g:feed(prompt, "all"), c:feed(prompt, "all")
    local worst = 0
    for t = 1, #prompt do worst = math.max(worst, rel_l2(a:row(t), b:row(t))) end
    local ta, tb = g:trace_get(), c:trace_get()
    assert.are.equal(#prompt, #ta)
    local same, total = same_routes(ta, tb)
    print(string.format("\n  passes of 4: worst relative L2 %.3g, %d of %d routings agree", worst, same, total))
    assert.is_true(worst <= 2e-2)
    assert.is_true(same / total >= 0.98)
    g:close(); c:close()
  end)

  it("prefills a long prompt in one pass (the default rewind's ring), with the CPU's logits, routing and tokens", function()
    -- the default rewind (2,048) gives a sliding ring of 16 + 2,048, so the
    -- plan runs 2,000 tokens as one pass (the CPU runs passes of 256); then
    -- 2,048 more after a first 100, one pass whose keys wrap the ring
    -- (positions 2,064.. reuse slots 0..) while its first tokens still read
    -- the window at 84..99
    local function agree(g, c, ids)
      g:trace(true); c:trace(true)
      local a, b = g:feed(ids, "last"), c:feed(ids, "last")
      local worst = rel_l2(a:row(1), b:row(1))
      local ta, tb = g:trace_get(), c:trace_get()
      assert.are.equal(#tb, #ta)
      local same, total = same_routes(ta, tb)
      g:trace(false); c:trace(false)
      return worst, same / total
    end
    local ws0 = gpu:memory().workspace
    local p512 = gpu:session { rewind = 512 }
    p512:feed(H.prompt(5, 2000, 7919, 13), "none")
    local ws512 = gpu:memory().workspace
    p512:close()
    local g, c = gpu:session(), cpu:session()
    local worst, routed = agree(g, c, H.prompt(5, 2000, 7919, 13))
    local ws1 = gpu:memory().workspace
    print(string.format("\n  one pass of 2,000: relative L2 %.3g at the last position, %.1f%% of routings agree; workspace %d -> %d (passes of 512) -> %d (one pass)",
      worst, routed * 100, ws0, ws512, ws1))
    -- the workspace grows to the longest pass run: one of 2,000 needs more than passes of 512
    assert.is_true(ws1 > ws512, "the prompt did not run as one pass")
    assert.is_true(worst <= 1e-3, string.format("relative L2 %.3g", worst))
    assert.is_true(routed >= 0.98)
    local greedy = gptoss.sampler(gpu.config.vocab_size, { temperature = 0 })
    local x, y = g:sample(greedy), c:sample(greedy)
    assert.are.equal(y, x)
    for i = 1, 8 do
      x, y = g:step(x, greedy), c:step(y, greedy)
      assert.are.equal(y, x, "step " .. i)
    end
    g:close(); c:close()
    g, c = gpu:session(), cpu:session()
    g:feed(H.prompt(6, 100, 7919, 13), "none"); c:feed(H.prompt(6, 100, 7919, 13), "none")
    worst, routed = agree(g, c, H.prompt(7, 2048, 7919, 13))
    print(string.format("  2,048 after 100, the ring wrapping inside the pass: relative L2 %.3g, %.1f%% of routings agree", worst, routed * 100))
    assert.is_true(worst <= 1e-3, string.format("relative L2 %.3g", worst))
    assert.is_true(routed >= 0.98)
    g:close(); c:close()
  end)

  it("matches the CPU on a mid-size model (top-1 >= 98%)", function()
    local dir = small()
    local c2 = assert(gptoss.load(dir))
    local g2 = assert(gptoss.load(dir, { device = "cuda:0" }))
    local ids = c2.tokenizer:encode(("The quick brown fox jumps over the lazy dog. "):rep(12))
    local a, b = g2:logits(ids), c2:logits(ids)
    local worst = 0
    for t = 1, #ids do worst = math.max(worst, rel_l2(a:row(t), b:row(t))) end
    local agree = agreement(a, b, #ids)
    print(string.format("\n  small (%d tokens): worst relative L2 %.3g, top-1 agreement %.1f%%", #ids, worst, 100 * agree))
    assert.is_true(worst <= 2e-2)
    assert.is_true(agree >= 0.98)
    g2:close()
    c2:close()
  end)

  it("fails clearly when the model does not fit, and for a missing device", function()
    local m, err = gptoss.load(H.tiny(), { device = "cuda:0", memory = 1e6 })
    assert.is_nil(m)
    assert.matches("memory budget", err)
    m, err = gptoss.load(H.tiny(), { device = "cuda:63" })
    assert.is_nil(m)
    assert.matches("does not exist", err)
    -- a budget with 10 MB to spare after the weights and workspace
    local probe = assert(gptoss.load(H.tiny(), { device = "cuda:0" }))
    local need = probe:memory().total
    probe:close()
    local tight = assert(gptoss.load(H.tiny(), { device = "cuda:0", memory = need + 10e6, context = 131072 }))
    local ok, e2 = pcall(tight.session, tight, { context = 131072 })
    assert.is_false(ok)
    assert.matches("KV cache", e2)
    local s = tight:session { context = 256 }   -- still usable after the refusal
    s:feed({ 1, 2, 3 }, "last")
    tight:close()
  end)
end)
