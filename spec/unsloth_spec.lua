-- Adapters in Unsloth's layout of gpt-oss's experts (a Linear LoRA per
-- expert: mlp.experts.gate_up_projs.E, down_projs.E), on the tiny
-- checkpoint on the CPU. The oracle is PEFT's experts_r4 fixture (its
-- ParamWrapper tensors and its logits, tools/reference/peft_lora.py): an
-- Unsloth-layout adapter is assembled here from its tensors by PEFT's
-- ParamWrapper convention (expert e's A rows e*r .. e*r+r-1, its rank-k
-- column of B at k*E + e: the same product per expert), and must give
-- PEFT's logits. A second oracle is independent of that convention:
-- unsloth_r4, an adapter PEFT itself wrote on Unsloth's per-expert modules
-- with the logits transformers + PEFT gave (tools/reference/peft_unsloth.py,
-- run on the device by device_unsloth.sh).
local H = require "helpers"
local gptoss = require "gptoss"
local json = require "gptoss.json"

local FX = "spec/fixtures/lora/"
local E, R, L = 8, 4, 4

-- the fixture as an Unsloth-layout adapter directory, by hand: tensor bytes
-- sliced and gathered (float32, 4 bytes a value), the config's experts as
-- target_modules; drop: a tensor name to leave out
local function unsloth_dir(drop)
  local st = assert(gptoss.safetensors(FX .. "experts_r4/adapter_model.safetensors"))
  local dir = H.tmpdir() .. "/unsloth"
  os.execute("mkdir -p " .. dir)
  local w = gptoss.core.writer(dir .. "/adapter_model.safetensors")
  for _, t in ipairs(st:tensors()) do
    local name = t.name
    local l = tonumber(name:match("layers%.(%d+)%."))
    local which = name:match("lora_(%u)%.weight$")
    if name:find("self_attn", 1, true) then
      w:add(name, "F32", t.shape, st:read(name))
    else
      assert(t.dtype == "F32")
      local proj = name:find("base_layer", 1, true) and "gate_up_projs" or "down_projs"
      local bytes = st:read(name)
      for e = 0, E - 1 do
        local out = string.format("base_model.model.model.layers.%d.mlp.experts.%s.%d.lora_%s.weight", l, proj, e, which)
        if out ~= drop then
          if which == "A" then   -- [E*r][in]: rows e*r ..
            local cols = t.shape[2]
            w:add(out, "F32", { R, cols }, bytes:sub(e * R * cols * 4 + 1, (e + 1) * R * cols * 4))
          else                   -- [out][r*E]: column k*E + e of each row
            local rows, parts = t.shape[1], {}
            for o = 0, rows - 1 do
              for k = 0, R - 1 do
                local at = (o * R * E + k * E + e) * 4
                parts[#parts + 1] = bytes:sub(at + 1, at + 4)
              end
            end
            w:add(out, "F32", { rows, R }, table.concat(parts))
          end
        end
      end
    end
  end
  assert(w:commit())
  st:close()
  local cfg = json.decode(H.read(FX .. "experts_r4/adapter_config.json"))
  cfg.target_modules = { "q_proj", "v_proj", "gate_up_projs", "down_projs" }
  cfg.target_parameters = nil
  H.write(dir .. "/adapter_config.json", json.encode_compact(cfg))
  return dir
end

local function same_modules(a, b)
  for l = 0, L - 1 do
    for _, p in ipairs { "q", "k", "v", "o", "gate_up", "down" } do
      local x, y = a:module(l, p), b:module(l, p)
      assert.are.equal(not x, not y, string.format("layer %d %s", l, p))
      if x then
        assert.are.equal(x.A:bytes(), y.A:bytes(), string.format("layer %d %s A", l, p))
        assert.are.equal(x.B:bytes(), y.B:bytes(), string.format("layer %d %s B", l, p))
      end
    end
  end
end

describe("adapters in Unsloth's expert layout (CPU)", function()
  local m
  setup(function() m = assert(gptoss.load(H.tiny(), { tokenizer = false })) end)
  teardown(function() m:close() end)

  it("loads one made from PEFT's tensors, and gives PEFT's logits", function()
    local a = assert(gptoss.adapter.load(unsloth_dir()))
    local peft = assert(gptoss.adapter.load(FX .. "experts_r4"))
    same_modules(a, peft)
    local x = a:module(0, "gate_up")
    assert.are.equal(E, x.experts)
    assert.are.equal(R, x.r)
    local fx = assert(gptoss.safetensors(FX .. "experts_r4.safetensors"))
    local worst, same = H.compare_peft_logits(H.session_logits(m, fx:numbers("ids"), a), fx)
    assert.is_true(worst <= 1e-4 and same, string.format("relative L2 %.3g against PEFT's logits", worst))
    fx:close(); a:close(); peft:close()
  end)

  it("saves in Unsloth's layout and back in PEFT's, the weights unchanged", function()
    local peft = assert(gptoss.adapter.load(FX .. "experts_r4"))
    local d1, d2 = H.tmpdir() .. "/u", H.tmpdir() .. "/p"
    assert(peft:save(d1, { layout = "unsloth" }))
    local names = {}
    local st = assert(gptoss.safetensors(d1 .. "/adapter_model.safetensors"))
    for _, t in ipairs(st:tensors()) do names[t.name] = t.shape end
    st:close()
    assert.same({ R, 64 }, names["base_model.model.model.layers.3.mlp.experts.gate_up_projs.7.lora_A.weight"])
    assert.same({ 64, R }, names["base_model.model.model.layers.0.mlp.experts.down_projs.0.lora_B.weight"])
    assert.is_nil(names["base_model.model.model.layers.0.mlp.experts.lora_A.weight"])
    local cfg = json.decode(H.read(d1 .. "/adapter_config.json"))
    assert.same({ "q_proj", "v_proj", "gate_up_projs", "down_projs" }, cfg.target_modules)
    assert.are.equal(json.null, cfg.target_parameters)   -- as PEFT writes an unset field
    local u = assert(gptoss.adapter.load(d1))
    same_modules(u, peft)
    -- the same bytes as the adapter assembled by hand above
    local hand = assert(gptoss.adapter.load(unsloth_dir()))
    same_modules(u, hand)
    assert(u:save(d2))   -- PEFT's layout: the experts as target_parameters again
    cfg = json.decode(H.read(d2 .. "/adapter_config.json"))
    assert.same({ "mlp.experts.gate_up_proj", "mlp.experts.down_proj" }, cfg.target_parameters)
    assert.same({ "q_proj", "v_proj" }, cfg.target_modules)
    local p = assert(gptoss.adapter.load(d2))
    same_modules(p, peft)
    u:close(); hand:close(); p:close(); peft:close()
  end)

  -- the oracle independent of experts_r4: PEFT itself wrote this adapter on
  -- Unsloth's module layout (a Linear per expert, built over transformers'
  -- model on the device: tools/reference/peft_unsloth.py), and transformers
  -- + PEFT computed its logits
  it("loads the adapter PEFT wrote on Unsloth's per-expert modules, and gives PEFT's logits", function()
    local cfg = json.decode(H.read(FX .. "unsloth_r4/adapter_config.json"))
    assert.are.equal("string", type(cfg.target_modules))   -- PEFT's regex, as written
    local a = assert(gptoss.adapter.load(FX .. "unsloth_r4"))
    for l = 0, L - 1 do
      for _, p in ipairs { "q", "v", "gate_up", "down" } do assert.is_table(a:module(l, p), string.format("layer %d %s", l, p)) end
      assert.is_nil(a:module(l, "k")); assert.is_nil(a:module(l, "o"))
    end
    local x = a:module(2, "down")
    assert.are.equal(E, x.experts); assert.are.equal(R, x.r); assert.are.equal(2.0, x.scale)
    local fx = assert(gptoss.safetensors(FX .. "unsloth_r4.safetensors"))
    local ids = fx:numbers("ids")
    local worst, same = H.compare_peft_logits(H.session_logits(m, ids, a), fx)
    assert.is_true(worst <= 1e-4 and same, string.format("relative L2 %.3g against PEFT's logits", worst))
    -- and without it, the layout's base logits (the per-expert rebuild of
    -- the fused model) are the model's own
    local bworst, bsame = H.compare_peft_logits(H.session_logits(m, ids), fx, "base_")
    assert.is_true(bworst <= 1e-4 and bsame, string.format("relative L2 %.3g against the base logits", bworst))
    -- written back in Unsloth's layout, PEFT's tensor names and bytes return
    local d = H.tmpdir() .. "/resaved"
    assert(a:save(d, { layout = "unsloth" }))
    local src, dst = assert(gptoss.safetensors(FX .. "unsloth_r4/adapter_model.safetensors")), assert(gptoss.safetensors(d .. "/adapter_model.safetensors"))
    local n = 0
    for _, t in ipairs(src:tensors()) do
      assert.are.equal(src:read(t.name), dst:read(t.name), t.name)
      n = n + 1
    end
    assert.are.equal(n, #dst:tensors())
    src:close(); dst:close(); fx:close(); a:close()
  end)

  it("refuses a missing expert, a wrong rank and an unknown layout, naming them", function()
    local missing = "base_model.model.model.layers.2.mlp.experts.down_projs.5.lora_B.weight"
    local a, err = gptoss.adapter.load(unsloth_dir(missing))
    assert.is_nil(a)
    assert.matches("layer 2 down_proj: expert 5 has no lora_B (" .. missing .. ")", err, 1, true)
    local dir = unsloth_dir()
    local cfg = json.decode(H.read(dir .. "/adapter_config.json"))
    cfg.r = 8
    H.write(dir .. "/adapter_config.json", json.encode_compact(cfg))
    a, err = gptoss.adapter.load(dir)
    assert.is_nil(a)
    assert.matches("has rank 4; adapter_config.json gives r = 8", err, 1, true)
    local peft = assert(gptoss.adapter.load(FX .. "experts_r4"))
    assert.has_error(function() peft:save(H.tmpdir() .. "/x", { layout = "llama" }) end)
    assert.has_error(function() peft:save(H.tmpdir() .. "/x", { layuot = "unsloth" }) end)
    peft:close()
  end)
end)
