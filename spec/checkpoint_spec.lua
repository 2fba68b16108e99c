-- The checkpoint generator: the tensor table against the published sizes,
-- the Hugging Face file layout, and determinism.
local H = require "helpers"
local checkpoint = require "gptoss.checkpoint"
local gptoss = require "gptoss"
local cjson = require "cjson"

describe("checkpoint generator", function()
  it("plans the 20b tensor table at exactly the published 13,761,264,768 bytes, without writing", function()
    local plan = checkpoint.plan(checkpoint.config("20b"), checkpoint.shard_size["20b"])
    assert.are.equal(13761264768, plan.total)
    assert.are.equal(24 * 19 + 3, #plan.specs)
    -- three shards numbered from 0, embed/norm/lm_head in the last one
    assert.are.same({ "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors" },
      { plan.shards[1].file, plan.shards[2].file, plan.shards[3].file })
    local last = {}
    for _, t in ipairs(plan.shards[3].tensors) do last[t.name] = true end
    assert.is_true(last["model.embed_tokens.weight"] and last["model.norm.weight"] and last["lm_head.weight"])
    local by = {}
    for _, s in ipairs(plan.specs) do by[s.name] = s end
    local gu = by["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert.are.same({ "U8", { 32, 5760, 90, 16 } }, { gu.dtype, gu.shape })
    assert.are.same({ "U8", { 32, 2880, 90 } }, { by["model.layers.23.mlp.experts.down_proj_scales"].dtype, by["model.layers.23.mlp.experts.down_proj_scales"].shape })
    assert.are.same({ "BF16", { 4096, 2880 } }, { by["model.layers.5.self_attn.q_proj.weight"].dtype, by["model.layers.5.self_attn.q_proj.weight"].shape })
    assert.are.same({ "BF16", { 64 } }, { by["model.layers.5.self_attn.sinks"].dtype, by["model.layers.5.self_attn.sinks"].shape })
    assert.are.same({ 201088, 2880 }, by["lm_head.weight"].shape)
  end)

  it("plans 120b at the 65,248,815,744 bytes of its published inventory", function()
    assert.are.equal(65248815744, checkpoint.plan(checkpoint.config("120b"), 5e9).total)
  end)

  it("writes the Hugging Face layout: config, index, shards, tokenizer and generation config", function()
    local dir = H.tiny()
    assert.are.same({ "config.json", "generation_config.json", "model-00000-of-00001.safetensors",
                      "model-00001-of-00001.safetensors", "model.safetensors.index.json",
                      "tokenizer.json", "tokenizer_config.json" }, H.files(dir))
    local index = cjson.decode(H.read(dir .. "/model.safetensors.index.json"))
    local n, total = 0, 0
    local r = assert(gptoss.safetensors(dir))
    for _, t in ipairs(r:tensors()) do
      n = n + 1
      total = total + t.bytes
      assert.are.equal(t.file:match("[^/]+$"), index.weight_map[t.name])
    end
    assert.are.equal(4 * 19 + 3, n)
    assert.are.equal(index.metadata.total_size, total)
    assert.are.equal("pt", r:metadata("format"))
    local gen = cjson.decode(H.read(dir .. "/generation_config.json"))
    assert.are.same({ 200002, 199999, 200012 }, gen.eos_token_id)
    r:close()
  end)

  it("draws sensible values: norms near 1, MXFP4 scales near their target, small biases", function()
    local r = assert(gptoss.safetensors(H.tiny()))
    local norm = r:floats("model.layers.0.input_layernorm.weight"):row(1)
    for _, v in ipairs(norm) do assert.is_true(math.abs(v - 1) < 0.4) end
    -- tiny: fan-in 64, target 2 / (2.93 * 8) = 2^-3.55, so exponents 123..125 (2^-4 +- 1)
    for b in r:read("model.layers.1.mlp.experts.gate_up_proj_scales"):gmatch(".") do
      local e = b:byte()
      assert.is_true(e >= 122 and e <= 124, "scale exponent " .. e)
    end
    local bias = r:floats("model.layers.2.self_attn.q_proj.bias"):row(1)
    for _, v in ipairs(bias) do assert.is_true(math.abs(v) < 0.2) end
    r:close()
  end)

  it("is deterministic in the seed", function()
    local c = checkpoint.config("tiny", { vocab_size = 512, num_hidden_layers = 2 })
    local d = H.tmpdir()
    for i, seed in ipairs { 3, 3, 4 } do
      assert(checkpoint.write { config = c, seed = seed, out = d .. "/c" .. i, tokenizer = false, shard_size = 1e9 })
    end
    local a = H.read(d .. "/c1/model-00000-of-00000.safetensors")
    assert.are.equal(a, H.read(d .. "/c2/model-00000-of-00000.safetensors"))
    assert.are_not.equal(a, H.read(d .. "/c3/model-00000-of-00000.safetensors"))
  end)

  it("refuses to overwrite unless forced, and leaves no partial directory on failure", function()
    local d = H.tmpdir()
    local c = checkpoint.config("tiny", { vocab_size = 512, num_hidden_layers = 2 })
    assert(checkpoint.write { config = c, out = d .. "/m", tokenizer = false })
    local ok, err = checkpoint.write { config = c, out = d .. "/m", tokenizer = false }
    assert.is_nil(ok)
    assert.matches("already exists", err)
    ok, err = checkpoint.write { config = c, out = d .. "/n", tokenizer = d .. "/no-tokenizer-here" }
    assert.is_nil(ok)
    assert.matches("tokenizer", err)
    assert.are.same({ "m" }, H.files(d))
  end)

  it("runs as a command line tool", function()
    local out = H.tmpdir() .. "/cli"
    local cmd = string.format("LUA_CPATH=%q %s tools/make_checkpoint.lua --preset tiny --layers 2 --vocab 300 --seed 2 --out %s --no-tokenizer 2>&1",
      package.cpath, H.lua, out)
    local p = io.popen(cmd)
    local text = p:read("*a")
    p:close()
    assert.matches("wrote .*: 1 shards", text)
    local c = assert(gptoss.config(out))
    assert.are.equal(2, c.num_hidden_layers)
    assert.are.equal(300, c.vocab_size)
    local p2 = io.popen(string.format("LUA_CPATH=%q %s tools/make_checkpoint.lua --preset huge 2>&1; echo rc=$?", package.cpath, H.lua))
    local t2 = p2:read("*a")
    p2:close()
    assert.matches("unknown preset 'huge'", t2)
    assert.matches("rc=2", t2)
  end)
end)
