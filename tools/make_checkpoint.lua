#!/usr/bin/env lua
--- make_checkpoint: writes a gpt-oss checkpoint in the Hugging Face layout.
--
--   lua tools/make_checkpoint.lua --preset tiny|small|20b|120b --seed N --out DIR
--       [--hidden N] [--intermediate N] [--layers N] [--heads N] [--kv-heads N]
--       [--head-dim N] [--experts N] [--top-k N] [--vocab N] [--window N]
--       [--shard-size BYTES] [--threads N] [--tokenizer DIR | --no-tokenizer]
--       [--expert-dtype mxfp4|bf16|bf16-generic] [--force] [--dry-run]
--
-- --dry-run prints the tensor table and shard plan without writing.
-- --expert-dtype bf16 writes the experts as transformers holds unquantized
-- gpt-oss (bf16 gate_up_proj and down_proj, no quantization_config) with the
-- values of the MXFP4 checkpoint of the same seed; bf16-generic with random
-- bf16 values instead.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local checkpoint = require "gptoss.checkpoint"

local flags = {
  ["--hidden"] = "hidden_size", ["--intermediate"] = "intermediate_size", ["--layers"] = "num_hidden_layers",
  ["--heads"] = "num_attention_heads", ["--kv-heads"] = "num_key_value_heads", ["--head-dim"] = "head_dim",
  ["--experts"] = "num_local_experts", ["--top-k"] = "num_experts_per_tok", ["--vocab"] = "vocab_size",
  ["--window"] = "sliding_window",
}

local function usage(msg)
  io.stderr:write("make_checkpoint: ", msg, "\n")
  io.stderr:write("usage: lua tools/make_checkpoint.lua --preset tiny|small|20b|120b --seed N --out DIR [options]\n")
  os.exit(2)
end

local opts = { preset = "tiny", seed = 0, overrides = {} }
local i = 1
local function value(name)
  i = i + 1
  local v = arg[i]
  if v == nil then usage(name .. " needs a value") end
  return v
end
local function integer(name)
  local v = tonumber(value(name))
  if not v or v ~= math.floor(v) or v < 0 then usage(name .. " needs a non-negative integer") end
  return math.floor(v)
end
local dry = false
while i <= #arg do
  local a = arg[i]
  if a == "--preset" then opts.preset = value(a)
  elseif a == "--seed" then opts.seed = integer(a)
  elseif a == "--out" then opts.out = value(a)
  elseif a == "--shard-size" then opts.shard_size = integer(a)
  elseif a == "--threads" then opts.threads = integer(a)
  elseif a == "--tokenizer" then opts.tokenizer = value(a)
  elseif a == "--no-tokenizer" then opts.tokenizer = false
  elseif a == "--expert-dtype" then
    opts.expert_dtype = value(a)
    if not checkpoint.expert_dtypes[opts.expert_dtype] then usage("--expert-dtype is mxfp4, bf16 or bf16-generic") end
  elseif a == "--force" then opts.force = true
  elseif a == "--dry-run" then dry = true
  elseif flags[a] then opts.overrides[flags[a]] = integer(a)
  else usage("unknown argument '" .. a .. "'") end
  i = i + 1
end
if not checkpoint.presets[opts.preset] then usage("unknown preset '" .. opts.preset .. "'") end

local ok, cfg = pcall(checkpoint.config, opts.preset, opts.overrides)
if not ok then usage(cfg) end
cfg = checkpoint.with_experts(cfg, opts.expert_dtype)
local size = opts.shard_size or checkpoint.shard_size[opts.preset]
local pok, plan = pcall(checkpoint.plan, cfg, size)
if not pok then usage(plan) end
if dry then
  for _, s in ipairs(plan.specs) do
    print(string.format("%-48s %-5s [%s] %.0f", s.name, s.dtype, table.concat(s.shape, ", "), s.bytes))
  end
  for _, sh in ipairs(plan.shards) do print(string.format("%s: %d tensors, %.0f bytes", sh.file, #sh.tensors, sh.bytes)) end
  print(string.format("total: %.0f bytes", plan.total))
  os.exit(0)
end
if not opts.out then usage("--out DIR is required") end
local t0 = os.time()
opts.config = cfg
local res, err = checkpoint.write(opts)
if not res then io.stderr:write("make_checkpoint: ", err, "\n"); os.exit(1) end
print(string.format("wrote %s: %d shards, %.0f bytes of tensors in %ds", opts.out, #res.shards, res.total, os.time() - t0))
