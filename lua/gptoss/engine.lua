--- gptoss.engine: continuous batching on a thread of its own, polled from
-- any event loop without blocking it.
--
--   local eng = gptoss.engine(model, { max_batch = 32 })
--   local req = eng:submit(ids, { max_tokens = 64, temperature = 0.7, seed = 1 })
--   -- in an event loop: wake on eng.fd, eng:drain(), then for each request
--   local new_ids, text, done = req:poll()
--   -- or, in a script: local r = req:result()   -- blocks until done
--
-- The C engine (engine.c) batches, samples and applies stop ids and
-- max_tokens; this module turns ids into text with the streaming UTF-8
-- decoder, applies stop strings, and shapes results as model:generate's.
local gptoss = require "gptoss"
local core = gptoss.core
local G = gptoss._gen

local M = {}

-- the running engine of each model, for model:generate to go through
local running = setmetatable({}, { __mode = "kv" })

--- the engine that owns model now, or nil
function M.of(model) return running[model] end

local SUBMIT_EXTRA = { priority = true, logprobs = true, top_logprobs = true }

-- {====================================================== requests
local Request = {}
Request.__index = Request

-- Takes what the engine produced: per id, its text piece (the run holds
-- back incomplete UTF-8 and what may start a stop string). A run that ends
-- here (a stop string, on_id returning false) cancels the C request; one
-- the engine ended (context full, cancelled, an error) is ended here.
function Request:_pump(on_id)
  local ids, pieces, lps = {}, {}, self.logprobs and {} or nil
  if self.done then return ids, pieces, lps end
  local got, _, finish, got_lps = self.c:take()
  local run = self.run
  for i, id in ipairs(got) do
    local piece, ended = run:accept(id)
    ids[#ids + 1], pieces[#pieces + 1] = id, piece
    if lps then
      lps[#lps + 1] = got_lps[i]
      self.logprobs[#self.logprobs + 1] = got_lps[i]
    end
    if on_id and on_id(piece, id) == false then
      if not ended then run:stop("cancelled") end
      self.callback_stop, finish = true, nil
      break
    end
    if ended then break end
  end
  if not run.finish and finish then
    local before = #run.parts
    run:stop(finish == "stop" and "stop" or finish)
    local tail = run.parts[before + 1]
    if tail ~= "" then pieces[#pieces + 1] = tail end
  end
  if run.finish then
    self.done = true
    self.info = self.c:info()
    if self.info.state ~= "done" then self.c:cancel() end   -- ended here: the engine stops at its next step
  end
  return ids, pieces, lps
end

--- req:poll() -> ids, text, done, error, logprobs: what was produced since
-- the last poll; never blocks. text holds only complete UTF-8 (and nothing
-- that may still turn out to start a stop string). logprobs (a request
-- submitted with logprobs = true) has an entry per id:
-- { id, logprob, top = { { id, logprob }, ... } } (see Engine:submit).
function Request:poll()
  local ids, pieces, lps = self:_pump()
  local err = self.done and self.info and self.info.error or nil
  return ids, table.concat(pieces), self.done, err, lps
end

--- req:wait([timeout_s]) -> true when poll has news (or the request is
-- done); blocks the calling thread, for scripts and worker threads
function Request:wait(timeout)
  if self.done then return true end
  return self.c:wait(timeout)
end

--- req:cancel(): the engine frees its memory at its next step
function Request:cancel()
  if self.done then return end
  self.c:cancel()
end

--- req:result() -> { ids, text, finish_reason, usage, timings [, logprobs] }:
-- as model:generate returns it, plus timings (seconds after submit: queued,
-- first_token, finished), usage.prompt_tokens_details.cached_tokens and,
-- when asked for, logprobs (an entry per id, as poll gives them); blocks
-- until the request is done
function Request:result()
  while not self.done do
    self.c:wait(1)
    self:_pump()
  end
  local res = self.run:result()
  local info = self.info
  res.timings = { queued = info.queued, first_token = info.first_token, finished = info.finished }
  res.usage.prompt_tokens_details = { cached_tokens = info.cached_tokens }
  res.error = info.error
  res.logprobs = self.logprobs
  return res
end

--- req:close(): cancels it unless done and lets go of it (also on collection)
function Request:close()
  if not self.done then
    self.done = true
    self.run:stop("cancelled")
    self.info = {}
  end
  self.c:close()
end
Request.__close = Request.close
-- }======================================================

-- {====================================================== the engine
local Engine = {}
Engine.__index = function(self, k)
  if k == "fd" then return rawget(self, "c").fd end
  return Engine[k]
end

--- gptoss.engine(model, opts) -> Engine. opts: max_batch (requests decoded
-- together, 64), max_queue (waiting requests, 1024; beyond it submit fails
-- with "queue_full"), chunk_tokens (prompt tokens per step across prefills,
-- 256: what one long prompt may delay the others), memory (KV budget in
-- bytes; default a quarter of RAM, or half the free GPU memory), context
-- (the most positions a request may reach, the model's by default),
-- kv_block (256: a request's session opens with room for its prompt and a
-- block more, or all that prompt + max_tokens reach if less, and doubles,
-- in blocks, when full; CUDA allocates a session's cache when it opens it,
-- so a request holds what it uses, not the whole context; a session that
-- cannot grow within the budget waits, unless it is the oldest),
-- prefix_cache (finished sessions kept for prefix reuse, 16; 0 turns it
-- off), rewind (how far a cached session may be rewound past the sliding
-- window, 512).
function M.new(model, opts)
  local c = core.engine(model, opts)   -- checks them, named as gptoss.engine's
  local eng = setmetatable({ c = c, model = model }, Engine)
  running[model] = eng
  return eng
end

--- eng:submit(ids, opts) -> Request | nil, message, code. opts: as
-- model:generate takes them (sampling options and seed, max_tokens, stop,
-- stop_tokens, adapter) plus priority (higher first), logprobs (true: each
-- token's log-probability, log_softmax of the model's raw logits, before
-- temperature, penalties and logit_bias, as vLLM gives them by default) and
-- top_logprobs (0..20 most likely tokens at each position beside it, the
-- most likely first, equal ones by id; needs logprobs). code is "queue_full"
-- (a server's 429), "too_large" (the request alone exceeds the memory
-- budget), "context_length_exceeded" (the prompt is longer than the
-- engine's context) or "closed". Returns at once.
function Engine:submit(ids, opts)
  local fn = "eng:submit"
  opts = G.check_options(opts, fn, SUBMIT_EXTRA)
  G.check_ids(ids, fn)
  if opts.session ~= nil then error(fn .. ": session is not an option here", 2) end
  if opts.on_token ~= nil then error(fn .. ": on_token is not an option here (poll the request)", 2) end
  return self:_submit(ids, opts, 0, fn)
end

-- (ids and opts checked; fn names the caller in messages)
function Engine:_submit(ids, opts, seed_offset, fn)
  if self.c.closed then return nil, "engine is closed", "closed" end
  local model = self.model
  local run = G.new_run(model, opts, #ids, fn)
  local smp = G.sampler_for(model, opts, seed_offset, fn)
  local stops = {}
  for id in pairs(run.stop_ids) do stops[#stops + 1] = id end
  local c, err, code = self.c:submit(ids, smp, { max_tokens = run.max_tokens, stop_tokens = stops,
    adapter = opts.adapter or nil, priority = opts.priority, logprobs = opts.logprobs, top_logprobs = opts.top_logprobs })
  if not c then return nil, err, code end
  return setmetatable({ c = c, run = run, engine = self, done = false, logprobs = opts.logprobs and {} or nil }, Request)
end

--- eng:generate(ids, opts): model:generate through the engine (blocks the
-- caller; on_token(piece, id) is called as the tokens arrive, and returning
-- false from it stops the generation)
function Engine:generate(ids, opts)
  return self:_generate(ids, opts, "eng:generate")
end

function Engine:_generate(ids, opts, fn)
  opts = G.check_options(opts, fn, SUBMIT_EXTRA, nil, 4)
  G.check_ids(ids, fn, 4)
  if opts.session ~= nil then error(fn .. ": session is not an option here", 3) end
  local cb = opts.on_token
  local req, err = self:_submit(ids, opts, 0, fn)
  if not req then error(fn .. ": " .. err, 3) end
  local cb_err
  local on_id = cb and function(piece, id)
    local ok, r = pcall(cb, piece, id)
    if not ok then cb_err = r; return false end
    return r
  end
  while not req.done do
    req.c:wait(1)
    req:_pump(on_id)
  end
  local res = req:result()
  req.c:close()
  if cb_err then error(cb_err, 0) end
  if req.callback_stop then res.finish_reason = "callback" end
  if res.finish_reason == "error" then error(fn .. ": " .. tostring(res.error), 3) end
  return res
end

-- {====================================================== training
--- eng:train(lora, opts) -> Training: gptoss.train's loop (every option of
-- it: data, steps, lr, eval, checkpoint_dir, resume, on_step, ...) run
-- between the engine's serving steps, on the model the engine serves.
-- share (0..1, default 0.3): the part of the engine's time training may
-- take while requests are active; "idle" (or 0): only while none is.
-- Training alone runs as fast as gptoss.train. Bad options raise here; the
-- loop then advances as it is polled (a Task):
--   t:poll() -> done, result | nil, message      (never blocks: event loops)
--   t:wait([timeout_s]) -> done                  (blocks, for scripts)
--   t:result() -> result | nil, message          (waits for the end)
--   t:cancel()                                   (ends it before its next example)
--   t.step, t.steps, t.last (the last step's info), t.done
-- The adapter being trained must not serve requests meanwhile (their tokens
-- would mix versions): serve a copy, as gptoss.learn does.
local Task = {}
Task.__index = Task

local TRAIN_EXTRA = { share = true }

-- "lua/gptoss/x.lua:12: msg" -> "msg": errors raised inside the coroutine
-- carry the loop's position, not the caller's
local function bare(msg) return (tostring(msg):gsub("^[^\n]-%.lua:%d+: ", "")) end

function Task:_resume()
  if self.cancelled then   -- the job under way ended on its own: nothing more starts
    self.done, self.error, self.job = true, "train: cancelled", nil
    return
  end
  local ok, job = coroutine.resume(self.co, self)
  if not ok then
    self.done, self.error, self.job = true, bare(job), nil
  elseif coroutine.status(self.co) == "dead" then
    self.done, self.result_, self.job = true, job, nil
  else
    self.job = job
  end
end

function Task:poll()
  while not self.done and self.job:wait(0) do self:_resume() end
  if not self.done then return false end
  if self.error then return true, nil, self.error end
  return true, self.result_
end

function Task:wait(timeout)
  local clock = require("gptoss.core").clock
  local until_ = timeout and clock() + timeout
  while not self.done do
    local left = until_ and until_ - clock() or 1
    if left <= 0 then break end
    if self.job:wait(math.min(left, 1)) then self:_resume() end
  end
  return self.done
end

function Task:result()
  self:wait()
  if self.error then return nil, self.error end
  return self.result_
end

function Task:cancel()
  self.cancelled = true
  if self.job then self.job:cancel() end
end

--- (for gptoss.learn) body(task) in a coroutine whose engine jobs yield
-- it; run up to its first job now: a Task as eng:train returns
function Engine:_task(body, fields)
  local t = setmetatable(fields or {}, Task)
  t.engine, t.done = self, false
  t.co = coroutine.create(body)
  t:_resume()
  return t
end

--- (for gptoss.learn) the passes of gptoss.train's loop as jobs of this
-- engine, for lora, at share
function Engine:_compute(lora, share)
  return require("gptoss.train")._engine_compute(self.c, self.model, lora, share)
end

--- (for gptoss.learn) eng:train's share option, checked: 0..1 or "idle"
function M.check_share(v, fn, level)
  if v == nil then return 0.3 end
  if v == "idle" then return 0 end
  return require("gptoss.check").num(v, fn, "share", 0, 1, nil, level + 1)
end

function Engine:train(lora, opts)
  local fn = "eng:train"
  local C = require "gptoss.check"
  C.udata(lora, fn, "lora", "gptoss.Adapter")
  if opts ~= nil then C.table(opts, fn, "opts") end
  if self.c.closed then error(fn .. ": the engine is closed", 2) end
  local o = {}
  for k, v in pairs(opts or {}) do if not TRAIN_EXTRA[k] then o[k] = v end end
  local share = M.check_share(opts and opts.share, fn, 2)
  local on_step = o.on_step
  local compute = self:_compute(lora, share)
  local t = self:_task(function(task)
    o.on_step = function(step, info)
      task.step, task.last = step, info
      if on_step then return on_step(step, info) end
    end
    return require("gptoss.train")._run(self.model, lora, o, compute, fn)
  end, { lora = lora, share = share, step = 0 })
  -- the options are checked and the data prepared before the first job: a
  -- mistake in them raises here, as gptoss.train's would
  if t.error then error(t.error, 2) end
  return t
end
-- }======================================================

--- eng:drain() -> true when eng.fd was signalled: reads it empty. An event
-- loop that wakes on eng.fd calls this, then polls its requests.
function Engine:drain() return self.c:drain() end

--- eng:wait([timeout_s]) -> true when some request has news: blocks on
-- eng.fd and drains it (for scripts and worker threads that serve many
-- requests; an event loop watches eng.fd instead)
function Engine:wait(timeout) return self.c:wait(timeout) end

--- eng:stats() -> { queued, active, kv_active, kv_cached, kv_in_use,
-- kv_budget, prefix_hits, prefix_tokens, prompt_tokens, prefill_tokens,
-- generated_tokens, tokens_per_s, steps, ... }
function Engine:stats() return self.c:stats() end

--- eng:kv_bytes(positions): the KV bytes the engine budgets for a request
-- reaching that many positions (prompt + max_tokens; on CUDA, what a session
-- of that capacity in kv_block positions takes)
function Engine:kv_bytes(positions) return self.c:kv_bytes(positions) end

--- eng:close(): cancels what is left and gives the model back to direct use
function Engine:close()
  if running[self.model] == self then running[self.model] = nil end
  self.c:close()
end
Engine.__close = Engine.close
Engine.__gc = Engine.close   -- Lua 5.4 (LuaJIT: the C object closes itself when collected)
-- }======================================================

--- generate_batch(model, prompts, opts): model:generate_batch through the
-- model's running engine, or one started for this call
function M.generate_batch(model, prompts, opts, fn)
  fn = fn or "engine.generate_batch"
  local adapter_of
  opts, adapter_of = G.check_batch(prompts, opts, fn, 4)
  if opts.on_token ~= nil then error(fn .. ": on_token is not an option here", 3) end
  local eng, own = running[model], false
  if not eng then
    eng, own = M.new(model, { max_batch = math.min(#prompts, 256), max_queue = #prompts }), true
  end
  local reqs = {}
  local ok, err = pcall(function()
    for i, ids in ipairs(prompts) do
      local o = {}
      for k, v in pairs(opts) do o[k] = v end
      o.adapter = adapter_of(i)
      local req, msg = eng:_submit(ids, o, i - 1, fn)
      if not req then error(fn .. ": " .. msg, 0) end
      reqs[i] = req
    end
  end)
  local out = {}
  if ok then
    ok, err = pcall(function()
      for i, req in ipairs(reqs) do
        out[i] = req:result()
        if out[i].finish_reason == "error" then error(fn .. ": " .. tostring(out[i].error), 0) end
        out[i].timings, out[i].error = nil, nil
        out[i].usage.prompt_tokens_details = nil
      end
    end)
  end
  for _, req in ipairs(reqs) do req.c:close() end
  if own then eng:close() end
  if not ok then error(err, 0) end
  return out
end

return setmetatable(M, { __call = function(_, model, opts) return M.new(model, opts) end })
