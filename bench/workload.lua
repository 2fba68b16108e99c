--- bench/workload.lua: the synthetic workloads bench/llm.lua measures and
-- tools/profile.lua replays under the profiler, written once.
local M = {}

--- n pseudo-random ordinary token ids from a seed (an LCG: the same in
-- every Lua)
function M.ids(n, seed)
  local out, x = {}, seed
  for i = 1, n do x = (x * 1103515245 + 12345) % 2147483648; out[i] = 1000 + x % 150000 end
  return out
end

--- n sessions, each fed a 128-token prompt, with their first sampled ids
-- and samplers, ready for gptoss.batch_step; into ss when given, so that a
-- caller can close those opened before an error
function M.sessions(m, n, sampler, ss)
  local last, smp = {}, {}
  ss = ss or {}
  for i = 1, n do
    ss[i] = m:session { context = 1024 }
    ss[i]:feed(M.ids(128, 10 + i), "last")
    last[i] = ss[i]:sample(sampler)
    smp[i] = sampler
  end
  return ss, last, smp
end

--- n sessions stepping together (gptoss.batch_step) for `steps` steps
-- after one that sizes the workspace: seconds a step. The sessions are
-- closed whatever happens; an error (a count the device cannot hold) is
-- raised after.
function M.batch_rate(gptoss, m, n, sampler, steps)
  local ss = {}
  local ok, dt = pcall(function()
    local last, smp
    ss, last, smp = M.sessions(m, n, sampler, ss)
    last = gptoss.batch_step(ss, last, smp)
    local t0 = gptoss.core.clock()
    for _ = 1, steps do last = gptoss.batch_step(ss, last, smp) end
    return (gptoss.core.clock() - t0) / steps
  end)
  for _, x in ipairs(ss) do x:close() end
  if not ok then error(dt, 0) end
  return dt
end

--- prints a benchmark's Markdown (a title line, then the table: header
-- cells and rows of preformatted "| ... |" lines) and, when BENCH_JSON
-- names a file, writes json there
function M.report(title, header, rows, json)
  print(title)
  print("")
  print("| " .. table.concat(header, " | ") .. " |")
  print(string.rep("|---", #header) .. "|")
  for _, r in ipairs(rows) do print(r) end
  if os.getenv("BENCH_JSON") then
    local f = assert(io.open(os.getenv("BENCH_JSON"), "w"))
    f:write(require("cjson").encode(json))
    f:close()
  end
end

return M
