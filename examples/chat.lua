#!/usr/bin/env lua
--- examples/chat.lua: chat with a gpt-oss checkpoint (the `make run` job).
--
--   lua5.4 examples/chat.lua MODEL_DIR ["a question"]
--
-- Prints the model's configuration and tokenizer facts, then answers the
-- question (or each line typed on stdin), streaming the reasoning and the
-- answer as they are generated. Environment: DEVICE (cpu, cuda:0),
-- REASONING (low, medium, high), MAX_TOKENS, TEMPERATURE, SEED, THREADS.
--
-- The checkpoint `make run` generates has random weights: its replies are
-- noise, but every stage (tokenizer, harmony rendering, forward pass,
-- sampling, streaming parse) runs exactly as it would on gpt-oss-20b.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"

local dir = arg[1]
if not dir then
  io.stderr:write("usage: lua5.4 examples/chat.lua MODEL_DIR [\"question\"]\n")
  os.exit(2)
end
local env = function(k, d) local v = os.getenv(k); if v == nil or v == "" then return d end return v end

local t0 = os.clock()
local model, err = gptoss.load(dir, { device = env("DEVICE", "cpu"), threads = tonumber(env("THREADS", "0")) })
if not model then
  io.stderr:write("chat: ", err, "\n")
  os.exit(1)
end
local c = model.config
print(string.format("model   %s (%s), loaded in %.2f s CPU time", dir, model.device, os.clock() - t0))
print(string.format("shape   %d layers (%s), hidden %d, %d q / %d kv heads x %d, %d experts (top %d), vocab %d",
  c.num_hidden_layers, c.layer_types[1] .. "/" .. (c.layer_types[2] or c.layer_types[1]), c.hidden_size,
  c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_local_experts, c.num_experts_per_tok, c.vocab_size))
print(string.format("rope    theta %g, %s, sliding window %d, context %d", c.rope_theta,
  c.rope_scaling and string.format("YaRN x%g (beta %g/%g, original %d)", c.rope_scaling.factor, c.rope_scaling.beta_fast,
    c.rope_scaling.beta_slow, c.rope_scaling.original_max_position_embeddings) or "no scaling",
  c.sliding_window, model.context))
local bytes = 0
for _, t in ipairs(model:tensors()) do bytes = bytes + t.bytes end
print(string.format("weights %d tensors, %.1f MB (MXFP4 experts), mapped, not copied", #model:tensors(), bytes / 1e6))
local tok = model.tokenizer
if not tok then
  print("tokenizer: none in " .. dir .. "; only token ids can be used")
  os.exit(0)
end
local hello = tok:encode("Hello, world!")
print(string.format("tokens  %d ordinary + %d special; \"Hello, world!\" -> {%s}; <|return|> = %d, <|call|> = %d",
  tok.n_ordinary, tok.vocab_size - tok.n_ordinary, table.concat(hello, ", "), tok:special("<|return|>"), tok:special("<|call|>")))
print()

local history = {}
local function ask(question)
  history[#history + 1] = { role = "user", content = question }
  local current
  local reply = gptoss.chat(model, history, {
    reasoning = env("REASONING", "low"), date = os.date("%Y-%m-%d"),
    max_tokens = tonumber(env("MAX_TOKENS", "64")), temperature = tonumber(env("TEMPERATURE", "1.0")),
    seed = tonumber(env("SEED", "") or ""),
    on_delta = function(delta, channel)
      channel = channel or "reply"
      if channel ~= current then io.write(current and "\n" or "", "[", channel, "] "); current = channel end
      io.write(delta)
      io.flush()
    end,
  })
  if not current then io.write("[reply] ", reply.final or reply.text or "") end
  print(string.format("\n-- %s, %d prompt + %d generated tokens", reply.finish_reason,
    reply.usage.prompt_tokens, reply.usage.completion_tokens))
  history[#history + 1] = { role = "assistant", content = reply.final or "" }
end

if arg[2] then
  ask(arg[2])
else
  io.write("> ")
  for line in io.lines() do
    if line ~= "" then ask(line) end
    io.write("> ")
  end
end
model:close()
