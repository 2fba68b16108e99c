--- gptoss.checkpoint: writes gpt-oss checkpoints of any shape in the exact
-- Hugging Face layout (config.json, sharded safetensors with an index, MXFP4
-- expert blocks and scales, tokenizer files), from a seed. The experts can
-- go out in bf16 instead, as transformers holds unquantized gpt-oss
-- (gate_up_proj [E][hidden][2*inter], down_proj [E][inter][hidden], no
-- quantization_config): "bf16" writes the MXFP4 twin's values exactly (so
-- quantizing them gives the twin back), "bf16-generic" random bf16 values
-- off the FP4 grid, everything else the same.
--
-- Random values are chosen to keep activations finite through any depth:
-- linear weights ~ N(0, 1/fan_in), norm weights ~ N(1, 0.05), MXFP4 scales
-- set so an expert's output has a standard deviation near 2 (2^-6 for the
-- 20B shape), router weights wide enough that routing is never a near tie.
local core = require "gptoss.core"
local cjson = require "cjson"
local files = require "gptoss.files"

local M = {}

local function layers(n)
  local t = {}
  for i = 1, n do t[i] = (i % 2 == 1) and "sliding_attention" or "full_attention" end
  return t
end

local function base(over)
  local c = {
    model_type = "gpt_oss", hidden_size = 2880, intermediate_size = 2880, num_hidden_layers = 24,
    num_attention_heads = 64, num_key_value_heads = 8, head_dim = 64, num_local_experts = 32,
    num_experts_per_tok = 4, vocab_size = 201088, sliding_window = 128,
    max_position_embeddings = 131072, initial_context_length = 4096, rope_theta = 150000,
    rope_scaling = { rope_type = "yarn", factor = 32.0, beta_fast = 32.0, beta_slow = 1.0,
                     original_max_position_embeddings = 4096, truncate = false },
    swiglu_limit = 7.0, rms_norm_eps = 1e-5, eos_token_id = 200002, pad_token_id = 199999,
    tie_word_embeddings = false, attention_bias = true, quantization_config = { quant_method = "mxfp4" },
  }
  for k, v in pairs(over or {}) do c[k] = v end
  c.layer_types = c.layer_types or layers(c.num_hidden_layers)
  return c
end

--- Presets: `tiny` for tests (sliding window 16, two shards), `small` for
-- CPU benchmarks and GPU parity, `20b` and `120b` with the real shapes.
M.presets = {
  tiny = function() return base {
    hidden_size = 64, intermediate_size = 64, num_hidden_layers = 4, num_attention_heads = 4,
    num_key_value_heads = 2, head_dim = 16, num_local_experts = 8, sliding_window = 16 } end,
  small = function() return base {
    hidden_size = 512, intermediate_size = 512, num_hidden_layers = 8, num_attention_heads = 8,
    num_key_value_heads = 2, head_dim = 64, num_local_experts = 16 } end,
  ["20b"] = function() return base {} end,
  ["120b"] = function() return base { num_hidden_layers = 36, num_local_experts = 128 } end,
}

--- Shard size limit per preset (bytes of tensor data); transformers' 5 GB
-- default gives the real 20B split. tiny uses a small one so that tests
-- read a multi-file checkpoint.
M.shard_size = { tiny = 32000000, small = 5000000000, ["20b"] = 5000000000, ["120b"] = 5000000000 }

local function fan_in_std(spec) return 1 / math.sqrt(spec.shape[#spec.shape]) end

--- The fill (distribution) of each tensor of a config.
function M.fill(spec, cfg, seed)
  local n = spec.name
  if n:match("experts%.gate_up_proj$") or n:match("experts%.down_proj$") then
    -- bf16 experts [E][in][out]: the output std near 2, as the MXFP4 scales aim
    return { fill = "normal", mean = 0, std = 2 / math.sqrt(spec.shape[2]), seed = seed }
  elseif n:match("layernorm%.weight$") or n == "model.norm.weight" then
    return { fill = "normal", mean = 1, std = 0.05, seed = seed }
  elseif n:match("_blocks$") then
    return { fill = "uniform", min = 0, max = 255, seed = seed }
  elseif n:match("_scales$") then
    -- an FP4 code has RMS 2.93; aim for output std ~2 over fan_in inputs
    local fan = n:match("gate_up") and cfg.hidden_size or cfg.intermediate_size
    local e = 127 + math.floor(math.log(2 / (2.93 * math.sqrt(fan))) / math.log(2) + 0.5)
    return { fill = "uniform", min = e - 1, max = e + 1, seed = seed }
  elseif n:match("sinks$") then
    return { fill = "normal", mean = 0, std = 1, seed = seed }
  elseif n:match("bias$") then
    return { fill = "normal", mean = 0, std = 0.02, seed = seed }
  elseif n == "model.embed_tokens.weight" then
    return { fill = "normal", mean = 0, std = 1, seed = seed }
  elseif n:match("router%.weight$") then
    return { fill = "normal", mean = 0, std = 2 * fan_in_std(spec), seed = seed }
  end
  return { fill = "normal", mean = 0, std = fan_in_std(spec), seed = seed }
end

--- Config table for a preset name or a table of overrides on the tiny one.
function M.config(preset, overrides)
  local mk = M.presets[preset]
  if not mk then error("unknown preset '" .. tostring(preset) .. "' (tiny, small, 20b, 120b)", 2) end
  local c = mk()
  for k, v in pairs(overrides or {}) do c[k] = v end
  if overrides and overrides.num_hidden_layers and not overrides.layer_types then
    c.layer_types = layers(c.num_hidden_layers)
  end
  -- a vocabulary smaller than o200k's cannot hold its special ids: use its last ones
  if c.vocab_size <= c.eos_token_id and not (overrides and overrides.eos_token_id) then
    c.eos_token_id = c.vocab_size - 1
  end
  if c.pad_token_id and c.vocab_size <= c.pad_token_id and not (overrides and overrides.pad_token_id) then
    c.pad_token_id = c.vocab_size - 2
  end
  return c
end

M.expert_dtypes = { mxfp4 = true, bf16 = true, ["bf16-generic"] = true }

--- cfg for experts of expert_dtype ("mxfp4", "bf16", "bf16-generic"): a
-- copy without quantization_config unless mxfp4, which the tensor plan
-- (core.tensor_specs) and the written config.json follow.
function M.with_experts(cfg, expert_dtype)
  expert_dtype = expert_dtype or "mxfp4"
  if not M.expert_dtypes[expert_dtype] then
    error("unknown expert dtype '" .. tostring(expert_dtype) .. "' (mxfp4, bf16, bf16-generic)", 2)
  end
  if expert_dtype == "mxfp4" then return cfg end
  local c = {}
  for k, v in pairs(cfg) do c[k] = v end
  c.quantization_config = nil
  return c
end

-- The values of bf16 expert spec s that are its MXFP4 twin's (the blocks and
-- scales the mxfp4 checkpoint of this seed holds), dequantized into the bf16
-- layout: generated into a scratch file by the same fills, then converted.
local function twin_values(s, cfg, seed, scratch, threads)
  local E, inn, out = s.shape[1], s.shape[2], s.shape[3]
  local base = s.name
  local blocks = { name = base .. "_blocks", dtype = "U8", shape = { E, out, inn / 32, 16 } }
  local scales = { name = base .. "_scales", dtype = "U8", shape = { E, out, inn / 32 } }
  local w = core.writer(scratch)
  for _, t in ipairs { blocks, scales } do w:add(t.name, t.dtype, t.shape, M.fill(t, cfg, seed)) end
  local ok, err = w:commit(threads)
  if not ok then return nil, err end
  local r = assert(core.safetensors(scratch))
  local values = core.mxfp4_bf16(r:read(blocks.name), r:read(scales.name), E, out, inn)
  r:close()
  os.remove(scratch)
  return values
end

--- The plan without writing anything: tensors, bytes and shards.
function M.plan(cfg, shard_size)
  local json = cjson.encode(cfg)
  local specs = core.tensor_specs(json)
  local shards, cur, total = {}, nil, 0
  for _, s in ipairs(specs) do
    total = total + s.bytes
    if not cur or (cur.bytes + s.bytes > shard_size and #cur.tensors > 0) then
      cur = { tensors = {}, bytes = 0 }
      shards[#shards + 1] = cur
    end
    cur.tensors[#cur.tensors + 1] = s
    cur.bytes = cur.bytes + s.bytes
  end
  for i, sh in ipairs(shards) do
    sh.file = string.format("model-%05d-of-%05d.safetensors", i - 1, #shards - 1)
  end
  return { specs = specs, shards = shards, total = total, config_json = core.config_json(json) }
end

local function index_json(plan)
  local names = {}
  local where = {}
  for _, sh in ipairs(plan.shards) do
    for _, t in ipairs(sh.tensors) do names[#names + 1] = t.name; where[t.name] = sh.file end
  end
  table.sort(names)
  local out = { "{\n  \"metadata\": {\n    \"total_size\": ", string.format("%.0f", plan.total), "\n  },\n  \"weight_map\": {\n" }
  for i, n in ipairs(names) do
    out[#out + 1] = string.format("    %s: %s%s\n", cjson.encode(n), cjson.encode(where[n]), i < #names and "," or "")
  end
  out[#out + 1] = "  }\n}\n"
  return table.concat(out)
end

local GENERATION_CONFIG = [[{
  "bos_token_id": 199998,
  "do_sample": true,
  "eos_token_id": [
    200002,
    199999,
    200012
  ],
  "pad_token_id": 199999,
  "transformers_version": "4.55.0.dev0"
}
]]

--- Writes a checkpoint. opts: preset (default "tiny") or config (a table),
-- seed, out (directory), shard_size, threads, tokenizer (a directory holding
-- tokenizer.json, or false), force (replace an existing out), on_shard
-- (called as on_shard(i, n, bytes) after shard i of n is written),
-- expert_dtype ("mxfp4", the default; "bf16": the mxfp4 checkpoint's expert
-- values in bf16; "bf16-generic": random bf16 experts).
-- Everything is written under "<out>.partial" and renamed into place last.
-- Returns the plan, or nil and a message.
function M.write(opts)
  assert(type(opts) == "table" and opts.out, "checkpoint.write: opts.out is required")
  local preset = opts.preset or "tiny"
  local expert_dtype = opts.expert_dtype or "mxfp4"
  local cfg = M.with_experts(opts.config or M.config(preset, opts.overrides), expert_dtype)
  local plan = M.plan(cfg, opts.shard_size or M.shard_size[preset] or 5000000000)
  local lfs = require "lfs"
  local out = opts.out
  if lfs.attributes(out) and not opts.force then
    return nil, out .. ": already exists (pass force to replace it)"
  end
  local tmp = out .. ".partial"
  files.rm_tree(tmp)
  local ok, err = files.mkdir_p(tmp)
  if not ok then return nil, err end
  local function fail(msg) files.rm_tree(tmp); return nil, msg end
  local seed = opts.seed or 0
  for i, sh in ipairs(plan.shards) do
    local w = core.writer(tmp .. "/" .. sh.file)
    w:metadata("format", "pt")
    for _, s in ipairs(sh.tensors) do
      local fill = M.fill(s, cfg, seed)
      if expert_dtype == "bf16" and s.dtype == "BF16" and s.name:match("experts%.[%a_]+_proj$") then
        local err
        fill, err = twin_values(s, cfg, seed, tmp .. "/twin.safetensors", opts.threads)
        if not fill then w:close(); return fail(err) end
      end
      w:add(s.name, s.dtype, s.shape, fill)
    end
    local cok, cerr = w:commit(opts.threads)
    if not cok then return fail(cerr) end
    if opts.on_shard then opts.on_shard(i, #plan.shards, sh.bytes) end
  end
  ok, err = files.write_file(tmp .. "/model.safetensors.index.json", index_json(plan))
  if not ok then return fail(err) end
  ok, err = files.write_file(tmp .. "/config.json", plan.config_json)
  if not ok then return fail(err) end
  ok, err = files.write_file(tmp .. "/generation_config.json", GENERATION_CONFIG)
  if not ok then return fail(err) end
  if opts.tokenizer ~= false then
    local src = opts.tokenizer or os.getenv("GPTOSS_TOKENIZER_DIR") or "tokenizer"
    for _, f in ipairs { "tokenizer.json", "tokenizer_config.json" } do
      local data, rerr = files.read_file(src .. "/" .. f)
      if not data then return fail("tokenizer: " .. tostring(rerr)) end
      ok, err = files.write_file(tmp .. "/" .. f, data)
      if not ok then return fail(err) end
    end
  end
  if lfs.attributes(out) then files.rm_tree(out) end
  ok, err = os.rename(tmp, out)
  if not ok then return fail(err) end
  plan.config = cfg
  return plan
end

return M
