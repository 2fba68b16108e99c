-- LoRA adapters in PEFT's format on the CPU backend, against PEFT 0.21 +
-- transformers 5.17 (float32) on the tiny checkpoint (seed 1). Fixtures:
-- tools/reference/peft_lora.py, run on the device by device_lora.sh.
local H = require "helpers"
local gptoss = require "gptoss"

local FX = "spec/fixtures/lora/"

local compare, session_logits = H.compare_peft_logits, H.session_logits

describe("LoRA adapters (PEFT format, CPU)", function()
  local m
  setup(function() m = assert(gptoss.load(H.tiny(), { tokenizer = false })) end)
  teardown(function() m:close() end)

  for _, name in ipairs { "attn_r4", "qv_rslora_r8", "experts_r4" } do
    it(name .. ": PEFT's adapter gives PEFT's logits (relative L2 <= 1e-4)", function()
      local fx = assert(gptoss.safetensors(FX .. name .. ".safetensors"))
      local ids = fx:numbers("ids")
      local a = assert(gptoss.adapter.load(FX .. name))
      local worst, same = compare(session_logits(m, ids, a), fx)
      assert.is_true(worst <= 1e-4, string.format("relative L2 %.3g", worst))
      assert.is_true(same, "argmax differs")
      -- the oracle is not the base model: without the adapter we are far off
      local base_err = compare(session_logits(m, ids, nil), fx)
      assert.is_true(base_err > 0.1, string.format("adapter changes too little (%.3g)", base_err))
      -- and the base logits match PEFT's base logits
      local b_err = compare(session_logits(m, ids, nil), fx, "base_")
      assert.is_true(b_err <= 1e-4, string.format("base relative L2 %.3g", b_err))
      print(string.format("\n  %s: worst relative L2 %.3g (base model: %.3g)", name, worst, base_err))
      a:close(); fx:close()
    end)
  end

  it("reads the adapter's shape and scale as PEFT defines them", function()
    local a = assert(gptoss.adapter.load(FX .. "attn_r4"))
    assert.are.equal(4, a.r); assert.are.equal(8, a.alpha); assert.is_false(a.rslora)
    assert.are.equal(16, a.modules)                -- 4 projections x 4 layers
    local q = a:module(0, "q")
    assert.are.equal(4, q.r); assert.are.equal(2.0, q.scale)
    assert.are.same({ 4, 64 }, { q.A:shape() }); assert.are.same({ 64, 4 }, { q.B:shape() })
    a:close()
    local b = assert(gptoss.adapter.load(FX .. "qv_rslora_r8"))
    assert.is_true(b.rslora); assert.are.equal(4, b.modules)
    assert.is_nil(b:module(0, "q")); assert.is_nil(b:module(1, "k"))
    assert.near(16 / math.sqrt(8), b:module(2, "v").scale, 1e-6)
    b:close()
  end)

  it("serves several adapters at once: batched sessions each get their own", function()
    local fa = assert(gptoss.safetensors(FX .. "attn_r4.safetensors"))
    local fb = assert(gptoss.safetensors(FX .. "qv_rslora_r8.safetensors"))
    local a = assert(gptoss.adapter.load(FX .. "attn_r4"))
    local b = assert(gptoss.adapter.load(FX .. "qv_rslora_r8"))
    local ids = fa:numbers("ids")
    local prompt = {}
    for i = 1, #ids - 1 do prompt[i] = ids[i] end
    local ss = { m:session { adapter = a }, m:session { adapter = b }, m:session() }
    for _, s in ipairs(ss) do s:feed(prompt, "none") end
    local greedy = gptoss.sampler(m.config.vocab_size, { temperature = 0 })
    gptoss.batch_step(ss, { ids[#ids], ids[#ids], ids[#ids] }, { greedy, greedy, greedy })
    -- each session's last logits are its adapter's, as in the fixtures
    local want = { { fa, "" }, { fb, "" }, { fa, "base_" } }
    for i, s in ipairs(ss) do
      local fx, prefix = want[i][1], want[i][2]
      local subset, ref = fx:numbers("subset_ids"), fx:floats(prefix .. "logits_subset")
      local row, mine = s:logits(), {}
      for j, id in ipairs(subset) do mine[j] = row:get(1, id + 1) end
      local err = H.rel_l2(mine, ref:row(#ids))
      assert.is_true(err <= 1e-4, string.format("session %d: relative L2 %.3g", i, err))
      s:close()
    end
    a:close(); b:close(); fa:close(); fb:close()
  end)

  it("takes an adapter per generation call, and one per prompt in generate_batch", function()
    local fx = assert(gptoss.safetensors(FX .. "attn_r4.safetensors"))
    local ids = fx:numbers("ids")
    fx:close()
    local prompt = {}
    for i = 1, 20 do prompt[i] = ids[i] end
    local a = assert(gptoss.adapter.load(FX .. "attn_r4"))
    local b = assert(gptoss.adapter.load(FX .. "qv_rslora_r8"))
    local function through_session(ad)
      local s = m:session { adapter = ad }
      local r = m:generate(prompt, { temperature = 0, max_tokens = 6, session = s })
      s:close()
      return r.ids
    end
    local with_a = m:generate(prompt, { temperature = 0, max_tokens = 6, adapter = a }).ids
    local plain = m:generate(prompt, { temperature = 0, max_tokens = 6 }).ids
    assert.are.same(through_session(a), with_a)
    assert.are_not.same(plain, with_a)                 -- the adapter does change the tokens
    local seen = {}
    for _, id in m:stream(prompt, { temperature = 0, max_tokens = 6, adapter = a }) do seen[#seen + 1] = id end
    assert.are.same(with_a, seen)
    local rs = m:generate_batch({ prompt, prompt, prompt }, { temperature = 0, max_tokens = 6, adapter = { a, false, b } })
    assert.are.same(with_a, rs[1].ids)
    assert.are.same(plain, rs[2].ids)
    assert.are.same(through_session(b), rs[3].ids)
    local all_a = m:generate_batch({ prompt, prompt }, { temperature = 0, max_tokens = 6, adapter = a })
    assert.are.same(with_a, all_a[2].ids)
    local s = m:session()
    assert.has_error(function() m:generate(prompt, { adapter = a, session = s }) end,
      "model:generate: give adapter or session, not both (a session carries its own adapter)")
    assert.has_error(function() m:generate_batch({ prompt, prompt }, { adapter = { a } }) end,
      "model:generate_batch: adapter lists 1 entries for 2 prompts")
    s:close(); a:close(); b:close()
  end)

  it("keeps an adapter alive for its sessions and forks, and switches it off", function()
    local fx = assert(gptoss.safetensors(FX .. "attn_r4.safetensors"))
    local ids = fx:numbers("ids")
    local a = assert(gptoss.adapter.load(FX .. "attn_r4"))
    local s = m:session { adapter = a }
    assert.are.equal(a, s.adapter)
    a:close()                                      -- the session still holds it
    assert.has_error(function() m:session { adapter = a } end, "adapter is closed")
    s:feed(ids, "none")
    local f = s:fork()
    f:rewind(0)
    local worst = compare(f:feed(ids, "all"), fx)
    assert.is_true(worst <= 1e-4, string.format("fork: relative L2 %.3g", worst))
    f:set_adapter(nil); f:rewind(0)
    assert.is_true(compare(f:feed(ids, "all"), fx, "base_") <= 1e-4)
    assert.is_nil(f.adapter)
    s:close(); f:close(); fx:close()
    collectgarbage(); collectgarbage()
  end)

  it("saves what PEFT saved: same tensors, same config", function()
    local dir = H.tmpdir()
    local a = assert(gptoss.adapter.load(FX .. "qv_rslora_r8"))
    assert.is_true(a:save(dir .. "/copy"))
    local want = assert(gptoss.safetensors(FX .. "qv_rslora_r8/adapter_model.safetensors"))
    local got = assert(gptoss.safetensors(dir .. "/copy/adapter_model.safetensors"))
    local names = {}
    for _, t in ipairs(want:tensors()) do
      names[#names + 1] = t.name
      assert.are.same(want:numbers(t.name), got:numbers(t.name))
    end
    assert.are.equal(#names, #got:tensors())
    local cjson = require "cjson"
    assert.are.same(cjson.decode(H.read(FX .. "qv_rslora_r8/adapter_config.json")),
      cjson.decode(H.read(dir .. "/copy/adapter_config.json")))
    -- and it loads back with the same modules
    local b = assert(gptoss.adapter.load(dir .. "/copy"))
    assert.are.same(a:module(2, "v").B:get(3, 5), b:module(2, "v").B:get(3, 5))
    for _, f in ipairs(H.files(dir .. "/copy")) do assert.is_nil(f:match("%.tmp%-"), "leftover " .. f) end
    a:close(); b:close(); want:close(); got:close()
    H.rm_tree(dir)
  end)

  describe("bad input", function()
    local dir
    before_each(function() dir = H.tmpdir() end)
    after_each(function() H.rm_tree(dir) end)

    local function variant(edit_config, tensors)
      H.copy_dir(FX .. "attn_r4", dir .. "/a")
      if edit_config then
        local cjson = require "cjson"
        local c = cjson.decode(H.read(dir .. "/a/adapter_config.json"))
        edit_config(c)
        H.write(dir .. "/a/adapter_config.json", cjson.encode(c))
      end
      if tensors then
        local w = gptoss.writer(dir .. "/a/adapter_model.safetensors")
        for _, t in ipairs(tensors) do w:add(t[1], "F32", t[2], { fill = "const", value = 0.5 }) end
        assert(w:commit())
      end
      return dir .. "/a"
    end

    it("returns nil and a message naming the missing file", function()
      local a, err = gptoss.adapter.load(dir)
      assert.is_nil(a); assert.matches("adapter_model.safetensors: no such file", err, 1, true)
      H.copy_dir(FX .. "attn_r4", dir .. "/b")
      os.remove(dir .. "/b/adapter_config.json")
      a, err = gptoss.adapter.load(dir .. "/b")
      assert.is_nil(a); assert.matches("adapter_config.json", err, 1, true)
      a, err = gptoss.adapter.load(dir .. "/nothing")
      assert.is_nil(a); assert.matches("not a directory", err, 1, true)
    end)

    it("refuses what it does not implement, naming the field", function()
      for field, value in pairs { use_dora = true, target_parameters = { "mlp.router.weight" },
          alpha_pattern = { q_proj = 4 }, modules_to_save = { "lm_head" }, bias = "all", peft_type = "IA3" } do
        local a, err = gptoss.adapter.load(variant(function(c) c[field] = value end))
        assert.is_nil(a, field)
        assert.matches(field, err, 1, true)
        H.rm_tree(dir .. "/a")
      end
    end)

    it("names a tensor that is not an attention LoRA, or a broken pair", function()
      local a, err = gptoss.adapter.load(variant(nil, { { "base_model.model.model.layers.0.mlp.router.lora_A.weight", { 4, 64 } } }))
      assert.is_nil(a); assert.matches("mlp.router.lora_A.weight", err, 1, true)
      H.rm_tree(dir .. "/a")
      a, err = gptoss.adapter.load(variant(nil, { { "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", { 4, 64 } } }))
      assert.is_nil(a); assert.matches("layer 1 q_proj has lora_A but not lora_B", err, 1, true)
      H.rm_tree(dir .. "/a")
      a, err = gptoss.adapter.load(variant(nil, {
        { "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", { 4, 64 } },
        { "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", { 64, 8 } } }))
      assert.is_nil(a); assert.matches("lora_A has rank 4, lora_B rank 8", err, 1, true)
    end)

    it("raises when an adapter does not fit the model", function()
      local a = assert(gptoss.adapter.load(variant(nil, {
        { "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", { 4, 64 } },
        { "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight", { 64, 4 } } })))
      assert.has_error(function() m:session { adapter = a } end, "adapter has a LoRA on layer 7 but the model has 4 layers")
      a:close()
      H.rm_tree(dir .. "/a")
      a = assert(gptoss.adapter.load(variant(nil, {
        { "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", { 4, 64 } },
        { "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight", { 64, 4 } } })))
      local s = m:session()
      assert.has_error(function() s:set_adapter(a) end, "adapter's layer 0 k_proj maps 64 to 64 features; the model's maps 64 to 32")
      assert.has_error(function() s:set_adapter("x") end)
      s:close(); a:close()
    end)
  end)
end)

describe("merging an adapter into a checkpoint", function()
  it("merges expert LoRAs into bf16 experts laid out as transformers holds them", function()
    local m = assert(gptoss.load(H.tiny()))
    local a = assert(gptoss.adapter.load(FX .. "experts_r4"))
    local out = H.tmpdir() .. "/merged_experts"
    assert.are.equal(out, m:merge(a, out))
    local c = m.config
    local E, Hd, I = c.num_local_experts, c.hidden_size, c.intermediate_size
    local src, dst = assert(gptoss.safetensors(H.tiny())), assert(gptoss.safetensors(out))
    local have = {}
    for _, t in ipairs(dst:tensors()) do
      have[t.name] = t
      assert.is_nil(t.name:match("_blocks$") or t.name:match("_scales$"), t.name)
    end
    for l = 0, c.num_hidden_layers - 1 do
      local gu, dn = have[("model.layers.%d.mlp.experts.gate_up_proj"):format(l)], have[("model.layers.%d.mlp.experts.down_proj"):format(l)]
      assert.are.same({ E, Hd, 2 * I }, gu.shape); assert.are.equal("BF16", gu.dtype)
      assert.are.same({ E, I, Hd }, dn.shape); assert.are.equal("BF16", dn.dtype)
    end
    -- config.json without quantization_config, otherwise the same
    local cjson = require "cjson"
    local cfg0, cfg1 = cjson.decode(H.read(H.tiny() .. "/config.json")), cjson.decode(H.read(out .. "/config.json"))
    assert.is_table(cfg0.quantization_config); assert.is_nil(cfg1.quantization_config)
    cfg0.quantization_config = nil
    assert.are.same(cfg0, cfg1)
    -- values: W[e][o][i] from the MXFP4 bytes by the reference's table and
    -- formula (gpt-oss.md section 3), plus scale B A, rounded to bf16
    local FP4 = { 0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6 }
    for _, which in ipairs { { "gate_up", 2 * I, Hd }, { "down", Hd, I } } do
      local mod, rows, cols = which[1], which[2], which[3]
      local base = "model.layers.1.mlp.experts." .. mod .. "_proj"
      local blocks, scales = src:numbers(base .. "_blocks"), src:numbers(base .. "_scales")
      local merged = dst:floats(base)
      local x = assert(a:module(1, mod))
      local G = cols / 32
      for _, p in ipairs { { 0, 0, 0 }, { 3, 17, rows - 28 }, { E - 1, cols - 1, rows - 1 }, { 5, 40, 1 } } do
        local e, i, o = p[1], p[2], p[3]                       -- 0-based expert, input, output
        local r, g = e * rows + o, math.floor(i / 32)
        local byte = blocks[(r * G + g) * 16 + math.floor((i % 32) / 2) + 1]
        local code = i % 2 == 0 and byte % 16 or math.floor(byte / 16)
        local w = FP4[code + 1] * 2 ^ (scales[r * G + g + 1] - 127)
        local d = 0
        for k = 0, x.r - 1 do d = d + x.B:get(o + 1, k * E + e + 1) * x.A:get(e * x.r + k + 1, i + 1) end
        local want, got = w + x.scale * d, merged:get(1, (e * cols + i) * rows + o + 1)
        assert.is_true(math.abs(got - want) <= math.abs(want) * 2 ^ -8 + 1e-30,
          string.format("%s (%d, %d, %d): %.6g, want %.6g", mod, e, i, o, got, want))
      end
    end
    -- the index names what the shards hold
    local idx = H.exists(out .. "/model.safetensors.index.json") and cjson.decode(H.read(out .. "/model.safetensors.index.json"))
    if idx then
      local n = 0
      for name in pairs(idx.weight_map) do assert.is_table(have[name], name); n = n + 1 end
      assert.are.equal(#dst:tensors(), n)
    end
    -- and gptoss loads it, quantizing the experts back to MXFP4 (spec/bf16_spec.lua checks how)
    local mm = assert(gptoss.load(out, { tokenizer = false }))
    assert.is_nil(mm.config.quantization_config)
    mm:close()
    src:close(); dst:close(); a:close(); m:close()
  end)


  it("writes a loadable checkpoint whose logits are the adapter's (bf16 rounding aside)", function()
    local m = assert(gptoss.load(H.tiny()))
    local fx = assert(gptoss.safetensors(FX .. "attn_r4.safetensors"))
    local ids = fx:numbers("ids")
    local a = assert(gptoss.adapter.load(FX .. "attn_r4"))
    local out = H.tmpdir() .. "/merged"
    assert.are.equal(out, m:merge(a, out))
    local mm = assert(gptoss.load(out))
    local merged = mm:logits(ids)
    -- bf16 rounding of W + dW moves some near-tied routers of this random
    -- model, so the logits land near PEFT's with the adapter, not on them
    local worst = compare(merged, fx)
    local base = compare(merged, fx, "base_")
    assert.is_true(worst < 0.25 and worst < base / 5, string.format("merged: %.3g from the adapter's, %.3g from the base", worst, base))
    -- each merged weight is W + scale * B A within bf16 rounding
    local src0 = assert(gptoss.safetensors(H.tiny()))
    local dst0 = assert(gptoss.safetensors(out))
    local W = src0:floats("model.layers.1.self_attn.v_proj.weight")
    local M2 = dst0:floats("model.layers.1.self_attn.v_proj.weight")
    local v = a:module(1, "v")
    for _, oi in ipairs { { 1, 1 }, { 7, 30 }, { 32, 64 }, { 17, 2 } } do
      local o, i = oi[1], oi[2]
      local d = 0
      for k = 1, v.r do d = d + v.B:get(o, k) * v.A:get(k, i) end
      local want = W:get(o, i) + v.scale * d
      assert.is_true(math.abs(M2:get(o, i) - want) <= math.abs(want) * 2 ^ -8 + 1e-30, string.format("(%d, %d)", o, i))
    end
    src0:close(); dst0:close()
    -- only the projections changed; every other tensor is byte for byte the same
    local src, dst = assert(gptoss.safetensors(H.tiny())), assert(gptoss.safetensors(out))
    local changed = 0
    for _, t in ipairs(src:tensors()) do
      local same = src:read(t.name) == dst:read(t.name)
      if t.name:match("self_attn%.[qkvo]_proj%.weight$") then assert.is_false(same, t.name); changed = changed + 1
      else assert.is_true(same, t.name) end
    end
    assert.are.equal(16, changed)
    assert.are.equal(H.read(H.tiny() .. "/config.json"), H.read(out .. "/config.json"))
    assert.is_true(H.exists(out .. "/tokenizer.json"))
    -- no clobbering, no leftovers
    local again, err = m:merge(a, out)
    assert.is_nil(again); assert.matches("already exists", err, 1, true)
    for _, f in ipairs(H.files(out .. "/..")) do assert.is_nil(f:match("merged%.tmp"), f) end
    src:close(); dst:close(); mm:close(); a:close(); fx:close(); m:close()
  end)
end)
