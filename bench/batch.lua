--- bench/batch.lua: decode throughput of N sessions stepping together
-- (gptoss.batch_step, greedy, 128-token prompts), one row per N.
--
--   lua5.4 bench/batch.lua DIR [DEVICE] [PRECISION] [N,N,...]
--
-- DEVICE defaults to cuda:0, PRECISION to exact, the counts to 8,32,64,256.
-- bench/llm.lua measures the same rows among the issue's others; this one
-- runs them alone, so that the experts' paths can be compared in one run:
-- the CUDA backend takes the experts' path per pass by (token, expert) rows
-- per expert and the dense products' by tokens, and GPTOSS_MOE_SMALL_ROWS,
-- GPTOSS_MOE_MMA_ROWS and GPTOSS_DENSE_MMA_TOKENS move the thresholds
-- (kernels/backend.cuh; GPTOSS_MOE_MMA_ROWS=32 GPTOSS_DENSE_MMA_TOKENS=64
-- turn moe_mma.cu and dense_mma.cu on). Prints a Markdown table;
-- BENCH_JSON=file writes the rows.
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local workload = require "workload"

local dir = assert(arg[1], "usage: lua5.4 bench/batch.lua DIR [DEVICE] [PRECISION] [N,N,...]")
local device, precision = arg[2] or "cuda:0", arg[3] or "exact"
local counts = {}
for c in (arg[4] or "8,32,64,256"):gmatch("[^,]+") do
  local n = tonumber(c)
  assert(n and n >= 1 and n == math.floor(n), "bench/batch.lua: session counts are positive integers, got " .. c)
  counts[#counts + 1] = n
end

local m = assert(gptoss.load(dir, { device = device, precision = precision }))
local greedy = gptoss.sampler(m.config.vocab_size, { temperature = 0 })
local paths = string.format("GPTOSS_MOE_SMALL_ROWS=%s GPTOSS_MOE_MMA_ROWS=%s GPTOSS_DENSE_MMA_TOKENS=%s",
  os.getenv("GPTOSS_MOE_SMALL_ROWS") or "default", os.getenv("GPTOSS_MOE_MMA_ROWS") or "default",
  os.getenv("GPTOSS_DENSE_MMA_TOKENS") or "default")
local rows, json = {}, { device = device, precision = precision, paths = paths, rows = {} }
for _, n in ipairs(counts) do
  local ok, step = pcall(workload.batch_rate, gptoss, m, n, greedy, 32)
  if not ok then
    io.stderr:write(string.format("bench/batch.lua: %d sessions not run: %s\n", n, tostring(step)))
    break
  end
  rows[#rows + 1] = string.format("| %d | %.0f | %.2f |", n, n / step, step * 1e3)
  json.rows[#json.rows + 1] = { sessions = n, tok_s = n / step, ms_step = step * 1e3 }
end
m:close()
workload.report(string.format("batch_step on %s, %s, %s", device, precision, paths), { "sessions", "tok/s", "ms/step" }, rows, json)
