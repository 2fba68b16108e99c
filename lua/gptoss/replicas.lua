--- gptoss.replicas: one engine over several devices. A copy of the model
-- is loaded on each device with an engine of its own; a request goes to the
-- replica that holds the longest prefix of its prompt (its prefix cache can
-- then skip it), unless that one is busier than the least loaded by more than
-- `affinity_slack` requests, else to the least loaded (requests active and
-- waiting; ties in turn).
--
--   local eng = gptoss.engine("/models/gpt-oss-20b", { devices = { "cuda:0", "cuda:1" }, max_batch = 64 })
--   local req = eng:submit(ids, opts)     -- as an engine's; the request is its replica's
--   eng.fds                              -- one descriptor a replica: an event loop watches them all
--   eng:drain(); eng:wait(1); eng:stats() -- over every replica (stats().replicas: each one's)
local C = require "gptoss.check"

local M = {}
local Replicas = {}
Replicas.__index = Replicas

local BLOCK = 64          -- prompt tokens a prefix hash covers
local REMEMBER = 256      -- prompts remembered a replica

-- the hashes of a prompt's whole 64-token blocks, each over every token up
-- to its end (so equal hashes mean equal prefixes, barring collisions)
local function block_hashes(ids)
  local out, h = {}, 2166136261
  for i = 1, #ids - #ids % BLOCK do
    -- a multiplicative hash kept in 32 bits, its products under 2^53 so
    -- that doubles (Lua 5.1, LuaJIT) compute it exactly
    h = ((h + ids[i] + 1) * 1000003) % 4294967296
    if i % BLOCK == 0 then out[#out + 1] = h end
  end
  return out
end

local KNOWN = { devices = true, affinity_slack = true, threads = true, precision = true, batch_invariant = true }

--- new(dir, opts): opts.devices (a list of at least one device), every
-- engine option, and gptoss.load's threads, precision, batch_invariant
function M.new(dir, opts)
  local fn = "gptoss.engine"
  C.str(dir, fn, "model", 3)
  C.table(opts, fn, "opts", nil, 3)
  C.table(opts.devices, fn, "devices", "a list of devices", 3)
  if #opts.devices == 0 then error(fn .. ": devices is empty", 3) end
  for i, d in ipairs(opts.devices) do C.str(d, fn, "devices[" .. i .. "]", 3) end
  if opts.affinity_slack ~= nil then C.int(opts.affinity_slack, fn, "affinity_slack", 0, 2 ^ 31, 3) end
  local eopts, lopts = {}, { context = opts.context }
  for k, v in pairs(opts) do
    if not KNOWN[k] then eopts[k] = v elseif k ~= "devices" and k ~= "affinity_slack" then lopts[k] = v end
  end
  local gptoss = require "gptoss"
  local models = {}
  for i, d in ipairs(opts.devices) do
    local lo = { device = d }
    for k, v in pairs(lopts) do lo[k] = v end
    local model, err = gptoss.load(dir, lo)
    if not model then
      for _, m in ipairs(models) do m:close() end
      return nil, string.format("%s on %s: %s", dir, d, tostring(err))
    end
    models[i] = model
  end
  return M.of_models(models, eopts, opts.affinity_slack)
end

--- of_models(models, engine_opts[, slack]): replicas over models already
-- loaded (the server loads them off its event loop); they are closed with it
function M.of_models(models, eopts, slack)
  local self = setmetatable({ replicas = {}, fds = {}, turn = 0, slack = slack or 4 }, Replicas)
  for i, model in ipairs(models) do
    local ok, eng = pcall(require("gptoss.engine").new, model, eopts)
    if not ok then
      self:close()
      for j = i, #models do models[j]:close() end
      error(eng, 0)
    end
    self.replicas[i] = { device = model.device, model = model, engine = eng, prompts = {}, seen = 0 }
    self.fds[i] = eng.fd
  end
  self.model = self.replicas[1].model
  return self
end

-- training (eng:train, gptoss.learn) runs on the first replica
function Replicas:train(lora, opts) return self.replicas[1].engine:train(lora, opts) end
function Replicas:_compute(lora, share) return self.replicas[1].engine:_compute(lora, share) end
function Replicas:_task(body, fields) return self.replicas[1].engine:_task(body, fields) end

-- how many whole blocks of hashes a replica remembers a prompt beginning with
local function affinity(r, hs)
  local best = 0
  for _, p in pairs(r.prompts) do
    local n = 0
    while n < #hs and n < #p.h and p.h[n + 1] == hs[n + 1] do n = n + 1 end
    if n > best then best = n end
  end
  return best
end

local function load_of(r)
  local s = r.engine:stats()
  return s.active + s.queued
end

--- eng:place(ids) -> the replica's index a prompt goes to
function Replicas:place(ids)
  local hs = block_hashes(ids)
  local loads, least = {}, math.huge
  for i, r in ipairs(self.replicas) do
    loads[i] = load_of(r)
    if loads[i] < least then least = loads[i] end
  end
  local pick, pick_aff = nil, 0
  if #hs > 0 then
    for i, r in ipairs(self.replicas) do
      local a = affinity(r, hs)
      if a > pick_aff and loads[i] <= least + self.slack then pick, pick_aff = i, a end
    end
  end
  if not pick then
    -- the least loaded, in turn among equals
    local n = #self.replicas
    for k = 1, n do
      local i = (self.turn + k - 1) % n + 1
      if loads[i] == least then pick = i; break end
    end
    self.turn = pick % n
  end
  return pick, hs
end

function Replicas:submit(ids, opts)
  local i, hs = self:place(ids)
  local r = self.replicas[i]
  local req, err, code = r.engine:submit(ids, opts)
  if not req then return nil, err, code end
  if #hs > 0 then
    r.seen = r.seen + 1
    r.prompts[(r.seen - 1) % REMEMBER + 1] = { h = hs }
  end
  req.replica = i
  return req
end

function Replicas:generate(ids, opts)
  local i = self:place(ids)
  return self.replicas[i].engine:_generate(ids, opts, "eng:generate")
end

function Replicas:drain()
  local any = false
  for _, r in ipairs(self.replicas) do any = r.engine:drain() or any end
  return any
end

--- eng:wait([timeout_s]) -> true when some replica has news
function Replicas:wait(timeout)
  -- one poll(2) over every replica's descriptor; those with news are drained
  local ready = require("gptoss.core").wait_fds(self.fds, timeout or math.huge)
  for _, i in ipairs(ready) do self.replicas[i].engine:wait(0) end
  return #ready > 0
end

local SUM = { "queued", "active", "submitted", "completed", "cancelled", "failed", "prompt_tokens", "prefill_tokens",
  "prefix_hits", "prefix_tokens", "generated_tokens", "steps", "kv_budget", "kv_active", "kv_cached", "kv_in_use",
  "busy_s", "train_examples", "train_tokens", "train_jobs", "kv_grows", "kv_waits" }

function Replicas:stats()
  local out, each = { replicas = {} }, {}
  for _, k in ipairs(SUM) do out[k] = 0 end
  for i, r in ipairs(self.replicas) do
    local s = r.engine:stats()
    s.device = r.device
    each[i] = s
    for _, k in ipairs(SUM) do out[k] = out[k] + (s[k] or 0) end
  end
  out.replicas = each
  out.running = true
  return out
end

--- eng:close(): every replica's engine, and the models it loaded
function Replicas:close()
  for _, r in ipairs(self.replicas) do
    r.engine:close()
    r.model:close()
  end
  self.replicas = {}
end
Replicas.__close = Replicas.close

return M
