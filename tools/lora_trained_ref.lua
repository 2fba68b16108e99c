--- tools/lora_trained_ref.lua: trains a LoRA adapter with gptoss (CPU) for a
-- few steps, saves it in PEFT format, and writes the logits gptoss computes
-- with it, so that tools/reference/peft_lora.py --check can load the
-- adapter into PEFT and compare (tools/reference/device_lora.sh).
--
--   lua5.4 tools/lora_trained_ref.lua CHECKPOINT_DIR ADAPTER_OUT REF_OUT.safetensors
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"
local dir, out, ref = arg[1], arg[2], arg[3]
local m = assert(gptoss.load(dir, { tokenizer = false }))
local V = m.config.vocab_size
local ids = {}
for i = 1, 40 do ids[i] = (i * 104729 + 17) % 200000 end
local lora = gptoss.lora(m, { r = 4, alpha = 8, targets = { "q", "k", "v", "o" }, layers = { 0, 2, 3 }, rslora = true, seed = 7 })
local r = gptoss.train(m, lora, { data = { { ids = ids } }, steps = 8, lr = 2e-2, schedule = "constant" })
assert(lora:save(out))
local s = m:session { adapter = lora }
local lg = s:feed(ids, "all")
local subset, seen = {}, {}
for v = 0, V - 1, 997 do subset[#subset + 1] = v; seen[v] = true end
local argmax = {}
for t = 1, #ids do
  local a = lg:argmax(t)            -- 0-based token id
  argmax[t] = a
  if not seen[a] then subset[#subset + 1] = a; seen[a] = true end
end
local function pack(fmt, list) local p = {} for i, v in ipairs(list) do p[i] = string.pack(fmt, v) end return table.concat(p) end
local vals = {}
for t = 1, #ids do for _, v in ipairs(subset) do vals[#vals + 1] = lg:get(t, v + 1) end end
local w = gptoss.writer(ref)
w:add("ids", "I32", { #ids }, pack("<i4", ids))
w:add("subset_ids", "I32", { #subset }, pack("<i4", subset))
w:add("logits_subset", "F32", { #ids, #subset }, pack("<f", vals))
w:add("argmax", "I32", { #ids }, pack("<i4", argmax))
assert(w:commit())
print(string.format("trained 8 steps: loss %.4f -> %.4f; adapter in %s, logits in %s", r.history[1].loss, r.final_loss, out, ref))
