--- bench/invariant.lua: what batch invariance costs (gptoss.load's
-- batch_invariant), and a lone stream through the engine against the same
-- decode called directly. One model of each kind, loaded in turn, same
-- workloads:
--   prefill      one 512-token prompt, tokens/s
--   decode_1     one session, 128 steps of gptoss.batch_step (the fused
--                CUDA step unless batch-invariant), tokens/s
--   decode_16    16 sessions decoding together, output tokens/s
--   decode_64    64 sessions, output tokens/s
--   engine_1     one request through gptoss.engine (512-token prompt, 128
--                generated): its decode tokens/s after the first token
--
--   lua5.4 bench/invariant.lua [DIR] [DEVICE]
-- Prints Markdown; BENCH_RESULTS=path appends it there.
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
local gptoss = require "gptoss"
local W = require "workload"
local now = gptoss.core.clock

local dir = arg[1] or os.getenv("GPTOSS_BENCH_DIR") or "/tmp/gptoss-20b"
local device = arg[2] or "cuda:0"
local STEPS = 128

local function prefill(m)
  local best = math.huge
  for rep = 1, 3 do
    local s = m:session { context = 1024 }
    local t0 = now()
    s:feed(W.ids(512, 40 + rep), "last")
    s:logits()   -- waits for the pass
    best = math.min(best, now() - t0)
    s:close()
  end
  return 512 / best
end

local function decode(m, n)
  local smp = gptoss.sampler(m.config.vocab_size, { temperature = 1.0, seed = 1 })
  local ss, last, sm = W.sessions(m, n, smp)
  for _ = 1, 4 do last = gptoss.batch_step(ss, last, sm) end   -- warm: graphs, workspace
  local t0 = now()
  for _ = 1, STEPS do last = gptoss.batch_step(ss, last, sm) end
  local dt = now() - t0
  for _, s in ipairs(ss) do s:close() end
  return n * STEPS / dt
end

local function engine_1(m)
  local eng = gptoss.engine(m, { max_batch = 1, prefix_cache = 0, context = 1024 })
  local req = assert(eng:submit(W.ids(512, 77), { temperature = 1.0, seed = 5, max_tokens = STEPS + 1, stop_tokens = {} }))
  local first, n, t_last
  repeat
    eng:wait(1)
    local ids, _, fin = req:poll()
    local t = now()
    if #ids > 0 then
      if not first then first, n = t, #ids - 1 else n = n + #ids end
      t_last = t
    end
  until fin
  eng:close()
  return n / (t_last - first)
end

local rows = {}
for _, inv in ipairs { false, true } do
  local m = assert(gptoss.load(dir, { device = device, context = 8192, batch_invariant = inv }))
  local r = { inv = inv }
  r.prefill = prefill(m)
  r.decode_1 = decode(m, 1)
  r.decode_16 = decode(m, 16)
  r.decode_64 = decode(m, 64)
  r.engine_1 = engine_1(m)
  m:close()
  rows[#rows + 1] = r
end

local out = {}
local function say(s) print(s); out[#out + 1] = s end
say(string.format("### batch invariance and the lone stream, %s, %s (%s)", dir, device, os.date("!%Y-%m-%d %H:%M UTC")))
say("")
say("| batch_invariant | prefill pp512 tok/s | decode 1 tok/s | decode 16 tok/s | decode 64 tok/s | engine, 1 stream tok/s |")
say("|---|---|---|---|---|---|")
for _, r in ipairs(rows) do
  say(string.format("| %s | %.1f | %.1f | %.1f | %.1f | %.1f |", tostring(r.inv), r.prefill, r.decode_1, r.decode_16,
    r.decode_64, r.engine_1))
end
if os.getenv("BENCH_RESULTS") then
  local f = assert(io.open(os.getenv("BENCH_RESULTS"), "a"))
  f:write(table.concat(out, "\n"), "\n\n")
  f:close()
end
