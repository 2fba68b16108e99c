-- CPU vs CUDA logits by prompt length and path, to locate a disagreement.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"
local dir = assert(arg[1])
local cpu = assert(gptoss.load(dir))
local gpu = assert(gptoss.load(dir, { device = "cuda:0" }))
local function rel(a, b)
  local n, d = 0, 0
  for i = 1, #b do local x = a[i] - b[i]; n = n + x * x; d = d + b[i] * b[i] end
  return math.sqrt(n / d)
end
local ids = cpu.tokenizer:encode(("The quick brown fox jumps over the lazy dog. "):rep(12))
local lc, lg = cpu:logits(ids), gpu:logits(ids)
local line = {}
for _, t in ipairs { 1, 2, 3, 4, 5, 8, 16, 32, 64, 65, 100, #ids } do
  if t <= #ids then line[#line + 1] = string.format("%d:%.3g", t, rel(lg:row(t), lc:row(t))) end
end
print(dir .. " prefill T=" .. #ids .. " by position: " .. table.concat(line, " "))
line = {}
for _, n in ipairs { 1, 2, 3, 4, 8, 16 } do
  local p = {}
  for i = 1, n do p[i] = ids[i] end
  line[#line + 1] = string.format("%d:%.3g", n, rel(gpu:logits(p):row(n), lc:row(n)))
end
print("prefill of n tokens, last row: " .. table.concat(line, " "))
local s = gpu:session()
line = {}
for t = 1, 16 do
  local r = s:feed({ ids[t] }, "last")
  if t <= 4 or t % 4 == 0 then line[#line + 1] = string.format("%d:%.3g", t, rel(r:row(1), lc:row(t))) end
end
print("one token at a time (general path, T=1): " .. table.concat(line, " "))
