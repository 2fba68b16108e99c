-- config.json: the published gpt-oss-20b file (reference section 1.1) and
-- the consistency checks.
local gptoss = require "gptoss"
local core = gptoss.core
local cjson = require "cjson"

-- gpt-oss-20b's config.json as published on the Hugging Face Hub
local PUBLISHED_20B = [[{
  "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
  "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
  "intermediate_size": 2880,
  "layer_types": ["sliding_attention","full_attention","sliding_attention","full_attention",
    "sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention",
    "full_attention","sliding_attention","full_attention","sliding_attention","full_attention",
    "sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention",
    "full_attention","sliding_attention","full_attention","sliding_attention","full_attention"],
  "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
  "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
  "num_local_experts": 32, "output_router_logits": false, "pad_token_id": 199999,
  "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
    "model.layers.*.mlp.router","model.embed_tokens","lm_head"], "quant_method": "mxfp4"},
  "rms_norm_eps": 1e-05,
  "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
    "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
  "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
  "tie_word_embeddings": false, "transformers_version": "4.55.0.dev0", "use_cache": true,
  "vocab_size": 201088
}]]

describe("config.json", function()
  it("reads every field of the published gpt-oss-20b config", function()
    local c = assert(core.config_parse(PUBLISHED_20B))
    assert.are.same({ 2880, 2880, 24, 64, 8, 64, 32, 4, 201088, 128, 131072, 4096 },
      { c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
        c.num_key_value_heads, c.head_dim, c.num_local_experts, c.num_experts_per_tok,
        c.vocab_size, c.sliding_window, c.max_position_embeddings, c.initial_context_length })
    assert.are.equal(150000, c.rope_theta)
    assert.are.same({ rope_type = "yarn", factor = 32, beta_fast = 32, beta_slow = 1,
                      original_max_position_embeddings = 4096, truncate = false }, c.rope_scaling)
    assert.are.equal(7, c.swiglu_limit)
    assert.are.equal(1e-5, c.rms_norm_eps)
    assert.are.equal(200002, c.eos_token_id)
    assert.are.equal(199999, c.pad_token_id)
    assert.are.equal("sliding_attention", c.layer_types[1])
    assert.are.equal("full_attention", c.layer_types[24])
    assert.are.equal("mxfp4", c.quantization_config.quant_method)
    assert.is_false(c.tie_word_embeddings)
  end)

  it("gives the config as the table of the config.json it writes", function()
    local c = assert(core.config_parse(PUBLISHED_20B))
    assert.are.same(cjson.decode(core.config_json(PUBLISHED_20B)), c)
    -- a field the published file lacks comes back when present
    local t = cjson.decode(PUBLISHED_20B)
    t.bos_token_id = 199998
    assert.are.equal(199998, assert(core.config_parse(cjson.encode(t))).bos_token_id)
    assert.matches('"bos_token_id": 199998,', core.config_json(cjson.encode(t)))
  end)

  it("writes the canonical form and reads it back unchanged", function()
    local c = assert(core.config_parse(PUBLISHED_20B))
    local again = assert(core.config_parse(core.config_json(PUBLISHED_20B)))
    assert.are.same(c, again)
    local text = core.config_json(PUBLISHED_20B)
    assert.matches('"rms_norm_eps": 1e%-05,', text)
    assert.matches('"rope_theta": 150000,', text)
    assert.matches('"swiglu_limit": 7.0,', text)
  end)

  local function with(patch)
    local t = cjson.decode(PUBLISHED_20B)
    patch(t)
    return cjson.encode(t)
  end

  local bad = {
    { "another model_type", function(t) t.model_type = "llama" end, "model_type is 'llama'; gptoss runs only model_type 'gpt_oss'" },
    { "a missing hidden_size", function(t) t.hidden_size = nil end, "missing field 'hidden_size'" },
    { "a missing head_dim", function(t) t.head_dim = nil end, "missing field 'head_dim'" },
    { "a missing swiglu_limit", function(t) t.swiglu_limit = nil end, "missing field 'swiglu_limit'" },
    { "a missing rope_scaling.factor", function(t) t.rope_scaling.factor = nil end, "rope_scaling: missing field 'factor'" },
    { "a non-integer layer count", function(t) t.num_hidden_layers = 2.5 end, "field 'num_hidden_layers' must be an integer" },
    { "hidden_size not a multiple of 32", function(t) t.hidden_size = 2888 end, "hidden_size 2888 is not a multiple of 32" },
    { "layer_types of the wrong length", function(t) t.num_hidden_layers = 12 end, "layer_types has 24 entries but num_hidden_layers is 12" },
    { "an unknown layer type", function(t) t.layer_types[3] = "local" end, "layer_types%[2%] must be" },
    { "heads not divisible by kv heads", function(t) t.num_key_value_heads = 7 end, "not a multiple of num_key_value_heads 7" },
    { "top-k above the expert count", function(t) t.num_experts_per_tok = 33 end, "num_experts_per_tok 33 exceeds num_local_experts 32" },
    { "an unsupported rope type", function(t) t.rope_scaling.rope_type = "dynamic" end, "rope_type 'dynamic' is not supported" },
    { "an eos id outside the vocabulary", function(t) t.eos_token_id = 300000 end, "eos_token_id 300000 is outside the vocabulary" },
    { "another quantization", function(t) t.quantization_config.quant_method = "gptq" end, "quant_method 'gptq' is not supported" },
  }
  for _, b in ipairs(bad) do
    it("rejects " .. b[1] .. " with a message naming it", function()
      local c, err = core.config_parse(with(b[2]), "gpt-oss-20b/config.json")
      assert.is_nil(c)
      assert.matches("gpt%-oss%-20b/config.json: ", err)
      assert.matches(b[3], err)
    end)
  end

  it("rejects invalid JSON with the position", function()
    local c, err = core.config_parse('{"model_type": "gpt_oss", "hidden_size": }', "x/config.json")
    assert.is_nil(c)
    assert.matches("x/config.json: not valid JSON %(near byte %d+%)", err)
  end)

  it("defaults layer_types to alternating sliding/full and truncate to true, as transformers does", function()
    local c = assert(core.config_parse(with(function(t) t.layer_types = nil; t.rope_scaling.truncate = nil end)))
    assert.are.equal("sliding_attention", c.layer_types[1])
    assert.are.equal("full_attention", c.layer_types[2])
    assert.is_true(c.rope_scaling.truncate)
  end)

  it("loads from a directory and reports a missing file", function()
    local c, err = gptoss.config("/nonexistent-dir")
    assert.is_nil(c)
    assert.matches("/nonexistent%-dir: cannot open", err)
  end)
end)
