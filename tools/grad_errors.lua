-- Every LoRA gradient's error against PEFT's, for the training fixtures of
-- spec/fixtures/lora (tools/reference/peft_train.py), on one device and
-- precision: where a precision's error lives, tensor by tensor.
--
--   lua5.4 tools/grad_errors.lua [device] [precision]     (cpu exact; cuda:0 mixed ...)
--
-- One line per fixture: the relative L2 of each (layer, module, A|B)
-- gradient, then the worst. The specs assert the bounds; this shows them.
package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path
local H = require "helpers"
local gptoss = require "gptoss"

local device, precision = arg[1] or "cpu", arg[2] or "exact"
local FX = "spec/fixtures/lora/"
local RUNS = { { "train_r4", { "q", "k", "v", "o" } }, { "train_experts_r4", { "o", "gate_up", "down" } } }

for _, run in ipairs(RUNS) do
  local name, mods = run[1], run[2]
  local m = assert(gptoss.load(H.tiny(), { tokenizer = false, device = device, precision = precision }))
  local fx, ids, mask = H.lora_fixture(name)
  local a = assert(gptoss.adapter.load(FX .. name))
  local _, n = m:lora_backward(a, ids, mask)
  local line, worst, at = {}, 0, ""
  for _, e in ipairs(H.peft_grad_errors(a, fx, mods, n)) do
    local tag = string.format("%d.%s.%s", e[1], e[2], e[3])
    line[#line + 1] = string.format("%s %.2e", tag, e[4])
    if e[4] > worst then worst, at = e[4], tag end
  end
  print(string.format("%s %s %s: worst %.3g (%s)", device, precision, name, worst, at))
  print("  " .. table.concat(line, ", "))
  a:close(); fx:close(); m:close()
end
