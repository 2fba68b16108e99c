--- gptoss.learn: continuous learning on the GPU that serves. Conversations
-- are logged as JSONL with optional ratings (1-5) and corrections; a policy
-- (every N new examples, every so many seconds, at once on a correction,
-- or on demand) starts a training round that runs through the serving
-- engine (eng:train's jobs, at a share of its time), evaluates the result
-- on held-out conversations against the version being served, and makes it
-- the adapter's new version only if it is better. Versions stay on disk
-- and can be rolled back; requests already running keep the version they
-- started with (they hold its adapter), new ones get the new one.
--
--   local L = gptoss.learn.open("learn", { engine = eng, every = 16, share = 0.3 })
--   local id = L:log { messages = msgs, rating = 5 }   -- or correction = "the right answer"
--   local name, lora, version = L:choose(record)       -- the specialist for a request
--   eng:submit(ids, { adapter = lora, ... })
--   L:tick()                                          -- from the event loop: starts and polls rounds
--
-- The directory: log.jsonl (conversations, then feedback lines naming one),
-- state.json (per adapter: what was trained, when), adapters/NAME/vNNNN/
-- (PEFT files and meta.json) and adapters/NAME/current (the version served).
local cjson = require "cjson.safe"
local C = require "gptoss.check"
local files = require "gptoss.files"

local M = {}
local Learner = {}
Learner.__index = Learner

local OPEN_KEYS = {}
for k in ("engine train_engine lora train share every interval on_correction min_rating replay max_examples holdout_every eval "
    .. "min_improvement seed default specialists classify clock"):gmatch("%S+") do OPEN_KEYS[k] = true end

-- {====================================================== files
local function read_json(path)
  local text = files.read_file(path)
  if not text then return nil end
  local v, err = cjson.decode(text)
  if v == nil then error("gptoss.learn: " .. path .. ": " .. tostring(err), 0) end
  return v
end

local function write_json(path, v)
  local ok, err = files.write_file(path, cjson.encode(v))
  if not ok then error("gptoss.learn: " .. path .. ": " .. tostring(err), 0) end
end

local function version_dir(self, name, v) return string.format("%s/adapters/%s/v%04d", self.dir, name, v) end

-- the log's records by id, feedback lines folded into the conversation they
-- name; parsed again only when the file has grown (the policy asks often)
local parse_log
local function read_log(self)
  local size = require("lfs").attributes(self.dir .. "/log.jsonl", "size")
  local c = self.log_cache
  if c and c.size == size then return c.recs, c.order end
  local recs, order = parse_log(self)
  self.log_cache = { size = size, recs = recs, order = order }
  return recs, order
end

function parse_log(self)
  local recs, order = {}, {}
  local f = io.open(self.dir .. "/log.jsonl", "rb")
  if not f then return recs, order end
  local n = 0
  for line in f:lines() do
    n = n + 1
    if line ~= "" then
      local r, err = cjson.decode(line)
      if type(r) ~= "table" then
        f:close()
        error(string.format("gptoss.learn: %s/log.jsonl:%d: %s", self.dir, n, tostring(err or "not an object")), 0)
      end
      if r.feedback then
        local target = recs[r.feedback]
        if target then
          if r.rating ~= nil then target.rating = r.rating end
          if r.correction ~= nil then target.correction = r.correction end
          target.updated = math.max(target.updated or target.id, r.seq or 0)
        end
      else
        recs[r.id] = r
        order[#order + 1] = r.id
      end
    end
  end
  f:close()
  return recs, order
end

local function append_log(self, rec)
  local f, err = io.open(self.dir .. "/log.jsonl", "ab")
  if not f then error("gptoss.learn: " .. tostring(err), 0) end
  -- one write of a whole line: a reader never sees half a record
  local ok, werr = f:write(cjson.encode(rec) .. "\n")
  f:close()
  if not ok then error("gptoss.learn: " .. tostring(werr), 0) end
end
-- }======================================================

-- {====================================================== opening
local function check_messages(msgs, fn, level)
  C.table(msgs, fn, "messages", "a list of { role =, content = }", level)
  if #msgs == 0 then error(fn .. ": messages is empty", level) end
  for i, m in ipairs(msgs) do
    if type(m) ~= "table" or type(m.role) ~= "string" then
      error(string.format("%s: messages[%d] must be a table with a role", fn, i), level)
    end
  end
end

--- open(dir, opts) -> Learner. opts: engine (the gptoss.engine that serves
-- and trains, required), train_engine (an engine of a second copy of the
-- model, e.g. on another GPU: rounds train there, and only the finished
-- versions reach the serving engine), lora (gptoss.lora's options for a first version:
-- { r = 8, alpha = 16, seed = 0 }), train (gptoss.train's options for each
-- round: { epochs = 1, lr = 2e-4 }), share (eng:train's, 0.3), every (new
-- examples that make a round due: 32), interval (seconds after the last
-- round that make one due, e.g. 86400: nightly), on_correction (a
-- correction makes a round due at once: true), min_rating (rated examples
-- trained on: 4), replay (older examples drawn per new one: 1),
-- max_examples (per round: 256, the newest), holdout_every (every Nth
-- conversation is held out for evaluation: 5), eval (held-out examples
-- instead), min_improvement (of the held-out loss for a swap: 0), seed,
-- default (the adapter name: "default"), specialists (names a record's
-- tags may pick), classify (function(record) -> name), clock.
function M.open(dir, opts)
  local fn = "gptoss.learn.open"
  C.str(dir, fn, "dir", 2)
  opts = C.options(opts, fn, OPEN_KEYS)
  if opts.engine == nil then error(fn .. ": engine is required (the gptoss.engine that serves)", 2) end
  C.table(opts.engine, fn, "engine", "a gptoss.engine", 2)
  if opts.train_engine ~= nil then
    C.table(opts.train_engine, fn, "train_engine", "a gptoss.engine", 2)
    local a, b = opts.engine.model.config, opts.train_engine.model.config
    for _, k in ipairs { "num_hidden_layers", "hidden_size", "num_local_experts", "intermediate_size", "vocab_size" } do
      if a[k] ~= b[k] then
        error(string.format("%s: train_engine's model differs from engine's (%s %s, not %s)", fn, k, tostring(b[k]), tostring(a[k])), 2)
      end
    end
  end
  if opts.lora ~= nil then C.table(opts.lora, fn, "lora", "gptoss.lora's options", 2) end
  if opts.train ~= nil then C.table(opts.train, fn, "train", "gptoss.train's options", 2) end
  for _, k in ipairs { "every", "max_examples", "holdout_every" } do
    if opts[k] ~= nil then C.int(opts[k], fn, k, 1, 2 ^ 31, 2) end
  end
  if opts.interval ~= nil then C.num(opts.interval, fn, "interval", 0, nil, { gt = true }, 2) end
  if opts.min_rating ~= nil then C.int(opts.min_rating, fn, "min_rating", 1, 5, 2) end
  if opts.replay ~= nil then C.num(opts.replay, fn, "replay", 0, nil, nil, 2) end
  if opts.min_improvement ~= nil then C.num(opts.min_improvement, fn, "min_improvement", nil, nil, nil, 2) end
  if opts.on_correction ~= nil then C.bool(opts.on_correction, fn, "on_correction", 2) end
  if opts.eval ~= nil then C.table(opts.eval, fn, "eval", "a list of examples", 2) end
  if opts.classify ~= nil then C.func(opts.classify, fn, "classify", 2) end
  if opts.clock ~= nil then C.func(opts.clock, fn, "clock", 2) end
  if opts.seed ~= nil then C.int(opts.seed, fn, "seed", 0, 2 ^ 53, 2) end
  if opts.default ~= nil then C.str(opts.default, fn, "default", 2) end
  if opts.specialists ~= nil then C.table(opts.specialists, fn, "specialists", "a list of adapter names", 2) end
  local share = require("gptoss.engine").check_share(opts.share, fn, 2)
  local names = { opts.default or "default" }
  for _, n in ipairs(opts.specialists or {}) do names[#names + 1] = n end
  for i, n in ipairs(names) do
    if type(n) ~= "string" or not n:match("^[%w_%-%.]+$") then
      error(string.format("%s: adapter name %d ('%s') must be letters, digits, _ - .", fn, i, tostring(n)), 2)
    end
  end
  local ok, err = files.mkdir_p(dir .. "/adapters")
  if not ok then return nil, err end
  local self = setmetatable({
    dir = dir, engine = opts.engine, model = opts.engine.model, share = share, names = names,
    train_engine = opts.train_engine or opts.engine,
    lora_opts = opts.lora or { r = 8, alpha = 16, seed = 0 },
    train_opts = opts.train or { epochs = 1, lr = 2e-4 },
    every = opts.every or 32, interval = opts.interval, on_correction = opts.on_correction ~= false,
    min_rating = opts.min_rating or 4, replay = opts.replay or 1, max_examples = opts.max_examples or 256,
    holdout_every = opts.holdout_every or 5, eval = opts.eval, min_improvement = opts.min_improvement or 0,
    seed = opts.seed or 0, default = opts.default or "default", classify = opts.classify,
    clock = opts.clock or os.time, serving = {}, rounds = {},
  }, Learner)
  self.state = read_json(dir .. "/state.json") or { next_id = 1, adapters = {} }
  local _, order = read_log(self)
  for _, id in ipairs(order) do if id >= self.state.next_id then self.state.next_id = id + 1 end end
  return self
end
-- }======================================================

-- {====================================================== the log
local function check_feedback(rec, fn, level)
  if rec.rating ~= nil then C.int(rec.rating, fn, "rating", 1, 5, level) end
  if rec.correction ~= nil then C.str(rec.correction, fn, "correction", level) end
end

--- L:log{ messages, rating, correction, tags, adapter, meta } -> id.
-- messages as the chat API takes them, the last assistant message the
-- model's reply; correction: the reply it should have given; meta: any
-- JSON-able table kept with it (the server keeps the completion's id there)
function Learner:log(rec)
  local fn = "learn:log"
  C.table(rec, fn, "record", "a table", 2)
  check_messages(rec.messages, fn, 3)
  check_feedback(rec, fn, 2)
  if rec.tags ~= nil then C.table(rec.tags, fn, "tags", "a list of strings", 2) end
  if rec.adapter ~= nil then C.str(rec.adapter, fn, "adapter", 2) end
  if rec.meta ~= nil then C.table(rec.meta, fn, "meta", "a table", 2) end
  local id = self.state.next_id
  self.state.next_id = id + 1
  append_log(self, { id = id, time = self.clock(), messages = rec.messages, rating = rec.rating,
                     correction = rec.correction, tags = rec.tags, adapter = rec.adapter, meta = rec.meta })
  return id
end

--- L:find(key, value) -> the id of the last logged conversation whose
-- meta[key] is value, or nil
function Learner:find(key, value)
  local recs, order = read_log(self)
  for i = #order, 1, -1 do
    local r = recs[order[i]]
    if type(r.meta) == "table" and r.meta[key] == value then return r.id end
  end
end

--- L:feedback(id, { rating, correction }): for a logged conversation, later
function Learner:feedback(id, fb)
  local fn = "learn:feedback"
  C.int(id, fn, "id", 1, self.state.next_id - 1, 2)
  C.table(fb, fn, "feedback", "{ rating =, correction = }", 2)
  check_feedback(fb, fn, 2)
  local seq = self.state.next_id
  self.state.next_id = seq + 1
  append_log(self, { feedback = id, seq = seq, time = self.clock(), rating = fb.rating, correction = fb.correction })
end

--- L:route(record) -> the adapter name a record trains and a request is
-- served by: its adapter field, the classifier's answer, a tag naming a
-- specialist, else the default
function Learner:route(rec)
  if rec.adapter then return rec.adapter end
  if self.classify then
    local n = self.classify(rec)
    if n ~= nil then return n end
  end
  for _, t in ipairs(rec.tags or {}) do
    for _, n in ipairs(self.names) do if t == n then return n end end
  end
  return self.default
end

-- the names tick() looks after: the default, the specialists, and any a
-- record or the classifier named
local function known(self, name)
  if type(name) ~= "string" or not name:match("^[%w_%-%.]+$") then
    error("gptoss.learn: adapter name '" .. tostring(name) .. "' must be letters, digits, _ - .", 0)
  end
  for _, n in ipairs(self.names) do if n == name then return name end end
  self.names[#self.names + 1] = name
  return name
end

-- a record as a training example: the corrected reply in the last
-- assistant message's place, or the rated reply as it was; nil when it is
-- neither corrected nor rated well enough
local function as_example(self, r)
  local msgs = {}
  for i, m in ipairs(r.messages) do msgs[i] = m end
  if type(r.correction) == "string" then
    for i = #msgs, 1, -1 do
      if msgs[i].role == "assistant" then
        local m = {}
        for k, v in pairs(msgs[i]) do m[k] = v end
        m.content, m.thinking = r.correction, nil
        msgs[i] = m
        return { messages = msgs, id = r.id, kind = "correction" }
      end
    end
    msgs[#msgs + 1] = { role = "assistant", content = r.correction }
    return { messages = msgs, id = r.id, kind = "correction" }
  end
  if type(r.rating) == "number" and r.rating >= self.min_rating then return { messages = msgs, id = r.id, kind = "rated" } end
end

--- L:examples(name) -> training examples, held-out examples: the logged
-- conversations routed to name, every holdout_every-th one held out
function Learner:examples(name)
  local recs, order = read_log(self)
  local train, held = {}, {}
  for _, id in ipairs(order) do
    local r = recs[id]
    if known(self, self:route(r)) == name then
      local ex = as_example(self, r)
      if ex then
        ex.seen = r.updated or r.id
        if id % self.holdout_every == 0 then held[#held + 1] = ex else train[#train + 1] = ex end
      end
    end
  end
  return train, held
end
-- }======================================================

-- {====================================================== versions
local function astate(self, name)
  local a = self.state.adapters[name]
  if not a then a = { trained_upto = 0, rounds = 0, current = 0, versions = 0 }; self.state.adapters[name] = a end
  return a
end

local function load_version(self, name, v)
  local lora, err = require("gptoss").adapter.load(version_dir(self, name, v))
  if not lora then error("gptoss.learn: " .. name .. " v" .. v .. ": " .. tostring(err), 0) end
  self.serving[name] = { lora = lora, version = v }
  return lora
end

--- L:adapter(name) -> the served version's adapter (nil before the first
-- version: the base model), its version number
function Learner:adapter(name)
  name = name or self.default
  local a = astate(self, name)
  if a.current == 0 then return nil, 0 end
  local s = self.serving[name]
  if not s or s.version ~= a.current then load_version(self, name, a.current) end
  return self.serving[name].lora, a.current
end

--- L:choose(record) -> name, adapter, version: what serves a request
function Learner:choose(rec)
  local name = self:route(rec or {})
  return name, self:adapter(name)
end

--- L:versions(name) -> { { version, eval_loss, eval_before, examples, time }, ... }
function Learner:versions(name)
  name = name or self.default
  local out = {}
  for v = 1, astate(self, name).versions do
    local meta = read_json(version_dir(self, name, v) .. "/meta.json")
    if meta then out[#out + 1] = meta end
  end
  return out
end

--- L:publish(name, lora, meta) -> version: lora's weights as the next
-- version, served from now on
function Learner:publish(name, lora, meta)
  local fn = "learn:publish"
  C.str(name, fn, "name", 2)
  C.udata(lora, fn, "lora", "gptoss.Adapter", 2)
  local a = astate(self, name)
  local v = a.versions + 1
  local path = version_dir(self, name, v)
  local tmp = path .. ".part"
  files.rm_tree(tmp)
  local ok, err = files.mkdir_p(tmp)
  if ok then ok, err = lora:save(tmp) end
  meta = meta or {}
  meta.version, meta.time = v, self.clock()
  if ok then ok, err = files.write_file(tmp .. "/meta.json", cjson.encode(meta)) end
  if ok then ok, err = os.rename(tmp, path) end
  if not ok then files.rm_tree(tmp); error("gptoss.learn: publishing " .. name .. ": " .. tostring(err), 0) end
  a.versions, a.current = v, v
  write_json(self.dir .. "/state.json", self.state)
  load_version(self, name, v)
  return v
end

--- L:rollback(name, version) -> adapter: that version is served again
function Learner:rollback(name, v)
  local fn = "learn:rollback"
  C.str(name, fn, "name", 2)
  local a = astate(self, name)
  C.int(v, fn, "version", 1, math.max(1, a.versions), 2)
  if v > a.versions then error(string.format("%s: %s has no version %d", fn, name, v), 2) end
  a.current = v
  write_json(self.dir .. "/state.json", self.state)
  return load_version(self, name, v)
end
-- }======================================================

-- {====================================================== rounds
-- a seeded draw of k of the list (Lua 5.1, 5.4 and LuaJIT alike)
local function draw(list, k, seed)
  local idx, x = {}, seed % 2147483647 + 1
  for i = 1, #list do idx[i] = i end
  for i = #idx, 2, -1 do
    x = (x * 48271) % 2147483647
    local j = x % i + 1
    idx[i], idx[j] = idx[j], idx[i]
  end
  local out = {}
  for i = 1, math.min(k, #idx) do out[i] = list[idx[i]] end
  return out
end

--- L:due(name) -> true, why | false: whether the policy starts a round
function Learner:due(name)
  name = name or self.default
  local a = astate(self, name)
  local train = self:examples(name)
  local new, corrections = 0, 0
  for _, e in ipairs(train) do
    if e.seen > a.trained_upto then
      new = new + 1
      if e.kind == "correction" then corrections = corrections + 1 end
    end
  end
  if new == 0 then return false end
  if self.on_correction and corrections > 0 then return true, "correction" end
  if new >= self.every then return true, "examples" end
  if self.interval and self.clock() - (a.last_round or 0) >= self.interval then return true, "interval" end
  return false
end

--- L:round(name) -> Task (the engine's): trains on the new examples and a
-- replay of older ones, evaluates before and after on the held-out ones,
-- publishes a new version if the loss fell by more than min_improvement.
-- Its result: { name, accepted, version, eval_before, eval_after, examples =
-- { {id, kind}, ... }, history }. nil, message when there is nothing to do.
function Learner:round(name)
  name = name or self.default
  if self.rounds[name] then return nil, name .. ": a round is running" end
  local a = astate(self, name)
  local train, held = self:examples(name)
  local eval = self.eval or held
  if #eval == 0 then return nil, name .. ": no held-out conversations to evaluate on yet" end
  local new, old = {}, {}
  for _, e in ipairs(train) do
    if e.seen > a.trained_upto then new[#new + 1] = e else old[#old + 1] = e end
  end
  if #new == 0 then return nil, name .. ": no new examples" end
  local set = {}
  for i = math.max(1, #new - self.max_examples + 1), #new do set[#set + 1] = new[i] end
  for _, e in ipairs(draw(old, math.min(math.ceil(#set * self.replay), self.max_examples - #set), self.seed + a.rounds)) do
    set[#set + 1] = e
  end
  local upto = a.trained_upto
  for _, e in ipairs(new) do if e.seen > upto then upto = e.seen end end
  local gptoss = require "gptoss"
  local current = self:adapter(name)
  -- trained where rounds train (the serving engine, or train_engine), and
  -- published as files the serving side loads: no adapter object is shared
  local teng = self.train_engine
  local trainee = gptoss.lora(teng.model, self.lora_opts)
  if current then trainee:copy_from(current) end
  local opts = {}
  for k, v in pairs(self.train_opts) do opts[k] = v end
  opts.data, opts.seed = set, self.seed + a.rounds
  -- on an engine of its own, training need not leave room for serving
  local compute = teng:_compute(trainee, teng == self.engine and self.share or 1)
  local used = {}
  for i, e in ipairs(set) do used[i] = { id = e.id, kind = e.kind } end
  local task = teng:_task(function()
    -- a fresh LoRA is the base model, a copy the version served: either way
    -- the loss to beat
    local before = compute.evaluate(eval, opts)
    local res = require("gptoss.train")._run(teng.model, trainee, opts, compute, "learn:round")
    local after = compute.evaluate(eval, opts)
    local out = { name = name, eval_before = before, eval_after = after, examples = used, history = res.history,
                  accepted = after < before - self.min_improvement }
    a.trained_upto, a.rounds, a.last_round = upto, a.rounds + 1, self.clock()
    if out.accepted then
      out.version = self:publish(name, trainee, { eval_loss = after, eval_before = before, examples = #set,
                                                 parent = a.current })
    else
      out.version = a.current
      write_json(self.dir .. "/state.json", self.state)
    end
    trainee:close()
    return out
  end)
  self.rounds[name] = task
  if task.done and task.error then self.rounds[name] = nil; error(task.error, 0) end
  return task
end

--- L:tick() -> the rounds that ended now ({ result } or { error }): starts
-- a round for each adapter whose policy says so and polls those running;
-- never blocks (call it from the event loop, or after requests)
function Learner:tick()
  local ended = {}
  for _, name in ipairs(self.names) do
    local t = self.rounds[name]
    if t then
      local done, res, err = t:poll()
      if done then
        self.rounds[name] = nil
        ended[#ended + 1] = { name = name, result = res, error = err }
      end
    elseif self:due(name) then
      local task, why = self:round(name)
      if not task then ended[#ended + 1] = { name = name, error = why } end
    end
  end
  return ended
end

--- L:wait() -> the rounds' ends: blocks until no round runs (scripts)
function Learner:wait()
  local ended = {}
  for name, t in pairs(self.rounds) do
    local res, err = t:result()
    self.rounds[name] = nil
    ended[#ended + 1] = { name = name, result = res, error = err }
  end
  return ended
end
-- }======================================================

return M
