-- Loading checkpoints: the tensor table against the config, and every way a
-- checkpoint can be wrong.
local H = require "helpers"
local gptoss = require "gptoss"
local cjson = require "cjson"

-- Copies the micro checkpoint, letting edit() change its tensor list
-- ({name, dtype, shape, data}) and config table before writing them back.
local function variant(edit_tensors, edit_config)
  local src = H.micro()
  local dir = H.tmpdir() .. "/variant"
  H.copy_dir(src, dir)
  if edit_tensors then
    local r = assert(gptoss.safetensors(dir))
    local list = {}
    for _, t in ipairs(r:tensors()) do list[#list + 1] = { name = t.name, dtype = t.dtype, shape = t.shape, data = r:read(t.name) } end
    r:close()
    edit_tensors(list)
    local file = "model-00000-of-00000.safetensors"
    local w = gptoss.writer(dir .. "/" .. file)
    local map, total = {}, 0
    for _, t in ipairs(list) do
      w:add(t.name, t.dtype, t.shape, t.data)
      map[t.name] = file
      total = total + #t.data
    end
    assert(w:commit())
    H.write(dir .. "/model.safetensors.index.json", cjson.encode { metadata = { total_size = total }, weight_map = map })
  end
  if edit_config then
    local c = cjson.decode(H.read(dir .. "/config.json"))
    edit_config(c)
    H.write(dir .. "/config.json", cjson.encode(c))
  end
  return dir
end

local function find(list, name)
  for i, t in ipairs(list) do if t.name == name then return i, t end end
end

describe("gptoss.load", function()
  it("loads the tiny checkpoint with its config, tensor table and tokenizer", function()
    local m = assert(gptoss.load(H.tiny(), { threads = 2 }))
    local c = m.config
    assert.are.same({ 64, 64, 4, 4, 2, 16, 8, 4, 201088, 16 },
      { c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
        c.head_dim, c.num_local_experts, c.num_experts_per_tok, c.vocab_size, c.sliding_window })
    local ts = m:tensors()
    assert.are.equal(4 * 19 + 3, #ts)
    local by = {}
    for _, t in ipairs(ts) do by[t.name] = t end
    assert.are.same({ "U8", { 8, 128, 2, 16 } }, { by["model.layers.3.mlp.experts.gate_up_proj_blocks"].dtype, by["model.layers.3.mlp.experts.gate_up_proj_blocks"].shape })
    assert.are.same({ "U8", { 8, 64, 2 } }, { by["model.layers.0.mlp.experts.down_proj_scales"].dtype, by["model.layers.0.mlp.experts.down_proj_scales"].shape })
    assert.are.same({ "BF16", { 64, 64 } }, { by["model.layers.2.self_attn.o_proj.weight"].dtype, by["model.layers.2.self_attn.o_proj.weight"].shape })
    assert.are.same({ "BF16", { 32, 64 } }, { by["model.layers.2.self_attn.k_proj.weight"].dtype, by["model.layers.2.self_attn.k_proj.weight"].shape })
    assert.are.same({ 201088, 64 }, by["lm_head.weight"].shape)
    assert.are.equal(201088, m.tokenizer.vocab_size)
    assert.are.equal("cpu", m.device)
    m:close()
  end)

  it("works with no tokenizer: by option, or when the directory has none", function()
    local m = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    assert.is_nil(m.tokenizer)
    m:close()
    local m2 = assert(gptoss.load(H.micro()))
    assert.is_nil(m2.tokenizer)
    local lg = m2:logits({ 1, 2, 3 })
    assert.are.equal(3, (lg:shape()))
    m2:close()
  end)

  local bad = {
    { "a missing tensor", function(l) table.remove(l, (find(l, "model.layers.1.self_attn.sinks"))) end, nil,
      "missing tensor 'model.layers.1.self_attn.sinks' %(expected BF16 %[4%]%)" },
    { "a wrong dtype", function(l) local _, t = find(l, "model.norm.weight"); t.dtype = "F16" end, nil,
      "tensor 'model.norm.weight' is F16 %[64%] but the config needs BF16 %[64%]" },
    { "a wrong shape", function(l)
        local _, t = find(l, "model.layers.0.mlp.router.bias")
        t.shape = { 4 }; t.data = t.data:sub(1, 8)
      end, nil, "tensor 'model.layers.0.mlp.router.bias' is BF16 %[4%] but the config needs BF16 %[8%]" },
    { "an extra tensor", function(l) l[#l + 1] = { name = "model.layers.0.mlp.gate.weight", dtype = "U8", shape = { 1 }, data = "\0" } end, nil,
      "unexpected tensor 'model.layers.0.mlp.gate.weight'" },
    { "a config that disagrees with the weights", nil, function(c) c.intermediate_size = 96 end,
      "tensor 'model.layers.0.mlp.experts.gate_up_proj_blocks' is U8 %[8, 128, 2, 16%] but the config needs U8 %[8, 192, 2, 16%]" },
    { "a config missing a field", nil, function(c) c.num_key_value_heads = nil end, "config.json: missing field 'num_key_value_heads'" },
    { "another model type", nil, function(c) c.model_type = "mixtral" end, "model_type is 'mixtral'" },
  }
  for _, b in ipairs(bad) do
    it("reports " .. b[1] .. " by name and returns nil, message", function()
      local m, err = gptoss.load(variant(b[2], b[3]))
      assert.is_nil(m)
      assert.matches(b[4], err)
    end)
  end

  it("reports a config.json that is not JSON", function()
    local dir = variant()
    H.write(dir .. "/config.json", "{ nope")
    local m, err = gptoss.load(dir)
    assert.is_nil(m)
    assert.matches("config.json: not valid JSON", err)
  end)

  it("reports a truncated shard", function()
    local dir = variant()
    local p = dir .. "/model-00000-of-00000.safetensors"
    local data = H.read(p)
    H.write(p, data:sub(1, #data - 100))
    local m, err = gptoss.load(dir)
    assert.is_nil(m)
    assert.matches("model%-00000%-of%-00000.safetensors: tensor '.*': data_offsets %[%d+, %d+%] run past the data area", err)
  end)

  it("reports a corrupt tokenizer.json by returning nil, message", function()
    local dir = variant()
    H.write(dir .. "/tokenizer.json", '{"model": {"type": "BPE", "vocab": {"a": 0}}}')
    local m, err = gptoss.load(dir)
    assert.is_nil(m)
    assert.matches("tokenizer.json: model.vocab has 1 entries", err)
  end)

  it("returns nil, message for a missing directory and raises on bad options", function()
    local m, err = gptoss.load("/no/such/model")
    assert.is_nil(m)
    assert.matches("/no/such/model: not a directory", err)
    assert.has_error(function() gptoss.load(H.micro(), { thread = 2 }) end, "gptoss.load: unknown option 'thread'")
    assert.has_error(function() gptoss.load(H.micro(), { threads = -1 }) end, "gptoss.load: threads must be an integer in 0..2147483647 (got -1)")
    assert.has_error(function() gptoss.load(H.micro(), { precision = "bf16" }) end,
      "gptoss.load: precision must be \"exact\", \"mixed\" or \"fast\" (got bf16)")
    -- the precisions choose the CUDA backend's products; the CPU's stay fp32 whichever is named
    for _, p in ipairs { "exact", "mixed", "fast" } do
      local m = assert(gptoss.load(H.micro(), { precision = p }))
      assert.are.equal(p, m.precision)
      m:close()
    end
    local d = assert(gptoss.load(H.micro()))
    assert.are.equal("exact", d.precision)   -- the default
    d:close()
    local m2, err2 = gptoss.load(H.micro(), { device = "tpu" })
    assert.is_nil(m2)
    assert.matches("invalid device 'tpu'", err2)
    local m3, err3 = gptoss.load(H.micro(), { context = 10 ^ 7 })
    assert.is_nil(m3)
    assert.matches("exceeds the model's max_position_embeddings", err3)
  end)
end)
