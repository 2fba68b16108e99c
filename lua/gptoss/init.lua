--- gptoss: run and adapt OpenAI's gpt-oss models from Lua.
--
-- The C engine (gptoss.core) loads checkpoints, tokenizes and runs the
-- forward pass; this module adds what is easier to write in Lua on top:
-- the streaming decoder, generation loops, chat, loss and perplexity.
local core = require "gptoss.core"
local C = require "gptoss.check"

local M = {
  core = core,
  version = core.version,
  load = core.load,
  -- gptoss.load_async(dir, opts) -> Loader: the same load on a thread of its own;
  -- ld.fd / ld:progress() (bytes done, total, ended) / ld:wait(s) / ld:result() / ld:cancel()
  load_async = core.load_async,
  tokenizer = core.tokenizer,
  safetensors = core.safetensors,
  writer = core.writer,
  sampler = core.sampler,
  batch_step = core.batch_step,
  floats = core.floats,
  -- LoRA adapters in PEFT's format: gptoss.adapter.load(dir) -> Adapter | nil, message
  adapter = { load = core.adapter_load },
}

--- gptoss.lora(model, opts) -> a new, trainable Adapter (also model:lora(opts));
-- opts.profile names one of gptoss.train's profiles, whose rank, alpha,
-- rsLoRA, dropout, targets and seed fill in what opts leaves out
function M.lora(model, opts)
  if type(opts) == "table" and opts.profile ~= nil then
    -- what the profile's defaults are computed from (the rest core.lora_new checks)
    if opts.r ~= nil then C.int(opts.r, "gptoss.lora", "r", 1, 1024) end
    local ok, res = pcall(require("gptoss.train").lora_options, opts.profile, opts)
    if not ok then error("gptoss.lora: " .. tostring(res):gsub("^.-:%d+: ", ""), 2) end
    opts = res
  end
  return core.lora_new(model, opts)
end

--- gptoss.engine(model, opts) -> Engine: continuous batching on a thread of
-- its own, non-blocking from any event loop (gptoss.engine)
-- gptoss.engine(dir, { devices = { "cuda:0", "cuda:1" }, ... }): a model
-- loaded on each device and requests placed among them (gptoss.replicas)
function M.engine(model, opts)
  if type(model) == "string" then
    if type(opts) ~= "table" or opts.devices == nil then
      error("gptoss.engine: a checkpoint directory needs opts.devices (else pass a loaded model)", 2)
    end
    return require("gptoss.replicas").new(model, opts)
  end
  return require("gptoss.engine").new(model, opts)
end

--- gptoss.train(model, lora, opts): the LoRA training loop (gptoss.train)
function M.train(model, lora, opts) return require("gptoss.train").train(model, lora, opts) end

--- gptoss.learn.open(dir, opts): continuous learning through a serving
-- engine: logged conversations, rounds, versions (gptoss.learn)
M.learn = setmetatable({}, { __index = function(_, k) return require("gptoss.learn")[k] end })

local Tokenizer = core.methods.Tokenizer

--- config(path): the parsed config.json of a model directory (or file),
-- or nil and a message.
function M.config(path)
  return core.config_load(path)   -- a directory's config.json, checked to be a regular file before it is opened
end

--- tensor_specs(config): the tensors a checkpoint of this config holds.
function M.tensor_specs(cfg)
  C.table(cfg, "gptoss.tensor_specs", "config")
  return core.tensor_specs(require("cjson").encode(cfg))
end

-- {====================================================== streaming decoder
--- tok:decoder([{ bytes = true }]): a streaming decoder. d:feed(id) returns
-- the text that is complete so far (holding back a split UTF-8 sequence),
-- d:flush() what remains (an unfinished sequence becomes U+FFFD).
function Tokenizer:decoder(opts)
  opts = C.options(opts, "tok:decoder", { bytes = true })
  if opts.bytes ~= nil then C.bool(opts.bytes, "tok:decoder", "bytes") end
  local tok, pending, raw = self, "", opts.bytes
  local d = {}
  function d.feed(_, id)
    C.int(id, "d:feed", "id", -2147483648, 2147483647)
    local b = tok:decode_bytes({ id })
    if raw then return b end
    local s = pending .. b
    local keep = core.utf8_tail(s)
    pending = s:sub(#s - keep + 1)
    return core.utf8_clean(s:sub(1, #s - keep))
  end
  function d.flush()
    local rest = pending
    pending = ""
    return raw and "" or core.utf8_clean(rest)
  end
  return d
end
-- }======================================================

-- {====================================================== generation
local Model = core.methods.Model

Model.lora = M.lora
--- model:lora_backward(adapter, ids [, mask]) -> loss sum, count: the
-- summed next-token loss over positions whose mask entry is set (the first
-- position is never a target), its gradients added into the adapter's.
Model.lora_backward = core.lora_backward
--- model:merge(adapter, out_dir) -> out_dir | nil, message: a new checkpoint
-- with the adapter merged into the bf16 projections (load it with
-- gptoss.load); with expert LoRAs the experts go out merged in bf16, as
-- transformers holds unquantized gpt-oss (gptoss.load quantizes them back
-- to MXFP4)
Model.merge = core.lora_merge

local SAMPLER_KEYS = { temperature = true, top_k = true, top_p = true, min_p = true,
  repetition_penalty = true, presence_penalty = true, frequency_penalty = true,
  penalty_window = true, seed = true, logit_bias = true }
local GEN_KEYS = { max_tokens = true, stop = true, stop_tokens = true, on_token = true, session = true, adapter = true,
  json_schema = true, grammar = true, json = true, json_options = true, arms = true }

local seed_counter = 0
local function fresh_seed()
  seed_counter = seed_counter + 1
  return (os.time() * 1000 + math.floor(os.clock() * 1e6) + seed_counter * 7919) % 2 ^ 52
end

-- fn's options, checked: the keys, and the values Lua reads itself (the
-- sampler's are checked by core.sampler, which names fn too); extra: the
-- further keys fn takes; batch: adapter may be a list, one per prompt
local function check_options(opts, fn, extra, batch, level)
  level = level or 3
  opts = C.options(opts, fn, setmetatable({}, { __index = function(_, k)
    return SAMPLER_KEYS[k] or GEN_KEYS[k] or (extra and extra[k])
  end }), level)
  if opts.max_tokens ~= nil then C.int(opts.max_tokens, fn, "max_tokens", 1, 2147483647, level) end
  if opts.seed ~= nil then C.int(opts.seed, fn, "seed", 0, 2 ^ 53, level) end
  local stop = opts.stop
  if type(stop) == "table" then
    for i = 1, #stop do
      if type(stop[i]) ~= "string" or stop[i] == "" then C.fail(fn, "stop[" .. i .. "]", "a non-empty string", stop[i], level) end
    end
  elseif stop ~= nil and (type(stop) ~= "string" or stop == "") then
    C.fail(fn, "stop", "a non-empty string or a list of them", stop, level)
  end
  if opts.stop_tokens ~= nil then C.ids(opts.stop_tokens, fn, "stop_tokens", level) end
  if opts.on_token ~= nil then C.func(opts.on_token, fn, "on_token", level) end
  if opts.session ~= nil then C.udata(opts.session, fn, "session", "gptoss.Session", level) end
  local ad = opts.adapter
  if batch and type(ad) == "table" then
    for i = 1, #ad do
      if ad[i] ~= false then C.udata(ad[i], fn, "adapter[" .. i .. "]", "gptoss.Adapter", level) end
    end
  elseif ad ~= nil and ad ~= false then
    C.udata(ad, fn, "adapter", "gptoss.Adapter", level)
  end
  if opts.priority ~= nil then C.int(opts.priority, fn, "priority", -2147483648, 2147483647, level) end
  return opts
end

--- the default stop tokens: <|return|> and <|call|>
local function default_stops(model)
  local t, V, ids = model.tokenizer, model.config.vocab_size, {}
  local a = t and t:special("<|return|>") or 200002
  local b = t and t:special("<|call|>") or 200012
  for _, id in ipairs { a, b } do if id < V then ids[#ids + 1] = id end end
  return ids
end

-- a sampler for opts; under json_schema, grammar or json it obeys the
-- grammar, whose end allows the stop tokens; under arms, each arm's grammar
-- in the harmony messages it names (gptoss.constraint)
local function sampler_for(model, opts, seed_offset, fn)
  local s = {}
  for k in pairs(SAMPLER_KEYS) do s[k] = opts[k] end
  s.seed = s.seed and (s.seed + (seed_offset or 0)) or fresh_seed()
  local constraint = require "gptoss.constraint"
  local m, arms
  if opts.arms ~= nil then arms = constraint.arms(model, opts, fn)
  elseif opts.json_schema ~= nil or opts.grammar ~= nil or opts.json ~= nil or opts.json_options ~= nil then
    m = constraint.matcher(model, opts, opts.stop_tokens or default_stops(model), fn)
  end
  local smp = core.sampler(model.config.vocab_size, s, fn)
  if m then smp:constrain(m) end
  if arms then
    local h, voc = constraint.headers(model), constraint.vocab(model)
    for _, a in ipairs(arms) do
      smp:arm { headers = h, grammar = a.grammar, vocab = voc, end_ids = a.end_ids, channel = a.channel, recipient = a.recipient }
    end
  end
  return smp
end

local function check_ids(ids, fn, level)
  level = level or 3
  C.ids(ids, fn, "ids", level)
  if #ids == 0 then C.fail(fn, "ids", "a non-empty table of token ids", ids, level) end
end

-- One generation in progress: turns sampled ids into text pieces and
-- decides when to stop. Pieces that might start a stop string are held back
-- until they either complete it or cannot.
local Run = {}
Run.__index = Run

-- (opts checked by check_options; fn names the caller in messages)
local function new_run(model, opts, prompt_len, fn)
  local r = setmetatable({ model = model, ids = {}, parts = {}, pending = "",
    max_tokens = opts.max_tokens or 256, prompt_tokens = prompt_len }, Run)
  r.stop_ids = {}
  for _, id in ipairs(opts.stop_tokens or default_stops(model)) do r.stop_ids[id] = true end
  local stop = opts.stop
  if type(stop) == "string" then stop = { stop } end
  r.stops = {}
  for _, s in ipairs(stop or {}) do r.stops[#r.stops + 1] = s end
  if #r.stops > 0 and not model.tokenizer then error(fn .. ": stop strings need a tokenizer, and the model has none", 4) end
  r.decoder = model.tokenizer and model.tokenizer:decoder()
  return r
end

-- longest suffix of s that is a proper prefix of a stop string
local function held(s, stops)
  local best = 0
  for _, st in ipairs(stops) do
    for n = math.min(#s, #st - 1), 1, -1 do
      if n > best and s:sub(-n) == st:sub(1, n) then best = n; break end
    end
  end
  return best
end

--- Accepts a sampled id; returns the text to emit now and whether the run ended.
function Run:accept(id)
  self.ids[#self.ids + 1] = id
  local piece = self.decoder and self.decoder:feed(id) or ""
  if self.stop_ids[id] then
    self.finish = "stop"
    piece = self.pending .. piece .. (self.decoder and self.decoder:flush() or "")
    self.pending = ""
    self.parts[#self.parts + 1] = piece
    return piece, true
  end
  local out = piece
  if #self.stops > 0 then
    local buf = self.pending .. piece
    local cut
    for _, st in ipairs(self.stops) do
      local at = buf:find(st, 1, true)
      if at and (not cut or at < cut) then cut = at end
    end
    if cut then
      self.finish = "stop_string"
      out = buf:sub(1, cut - 1)
      self.pending = ""
      self.parts[#self.parts + 1] = out
      return out, true
    end
    local h = held(buf, self.stops)
    out, self.pending = buf:sub(1, #buf - h), buf:sub(#buf - h + 1)
  end
  self.parts[#self.parts + 1] = out
  if #self.ids >= self.max_tokens then
    local before = #self.parts
    self:stop("length")
    return out .. self.parts[before + 1], true
  end
  return out, false
end

--- ends the run without a new token: held-back text is released
function Run:stop(reason)
  self.finish = self.finish or reason
  self.parts[#self.parts + 1] = self.pending .. (self.decoder and self.decoder:flush() or "")
  self.pending = ""
end

function Run:result()
  return {
    ids = self.ids,
    text = self.decoder and table.concat(self.parts) or nil,   -- the model may be closed by now
    finish_reason = self.finish,
    usage = { prompt_tokens = self.prompt_tokens, completion_tokens = #self.ids,
              total_tokens = self.prompt_tokens + #self.ids },
  }
end

-- Feeds the prompt to the session (fresh or given) and returns it with the
-- first sampled id.
local function start(model, ids, opts, smp)
  local sess = opts.session
  local own = sess == nil
  if own then sess = model:session { adapter = opts.adapter or nil } end
  local ok, first = pcall(function()
    sess:feed(ids, "last")
    return sess:sample(smp)
  end)
  if not ok then
    if own then sess:close() end
    error(first, 0)
  end
  return sess, own, first
end

-- generate_batch's arguments, checked; returns the options and a function
-- giving prompt i's adapter
local function check_batch(prompts, opts, fn, level)
  level = level or 3
  opts = check_options(opts, fn, nil, true, level + 1)
  if opts.session ~= nil then error(fn .. ": session is not an option here", level) end
  C.table(prompts, fn, "prompts", "a non-empty list of token id tables", level)
  if #prompts == 0 then C.fail(fn, "prompts", "a non-empty list of token id tables", prompts, level) end
  local adapters = opts.adapter
  if type(adapters) == "table" and #adapters ~= #prompts then
    error(string.format("%s: adapter lists %d entries for %d prompts", fn, #adapters, #prompts), level)
  end
  for i, ids in ipairs(prompts) do
    C.ids(ids, fn, "prompts[" .. i .. "]", level)
    if #ids == 0 then C.fail(fn, "prompts[" .. i .. "]", "a non-empty table of token ids", ids, level) end
  end
  return opts, function(i)
    if type(adapters) == "table" then return adapters[i] or nil end
    return adapters
  end
end

-- what gptoss.engine shares with the loops here, so that a request through
-- the engine is seeded, stopped and shaped exactly as model:generate's
M._gen = { check_options = check_options, check_ids = check_ids, check_batch = check_batch, new_run = new_run,
  sampler_for = sampler_for }

-- the engine that owns the model now, if any (gptoss.engine registers it)
local function engine_of(model)
  local E = package.loaded["gptoss.engine"]
  return E and E.of(model)
end

--- model:stream(ids, opts): an iterator of (piece, id) over generated tokens.
-- The second value returned is a table that holds the result (finish_reason,
-- usage, ids, text) once the iterator is exhausted; info.close() ends the
-- stream early and frees its session (Lua 5.4's for loop does that itself on
-- break, through the fourth, to-be-closed value).
function Model:stream(ids, opts)
  return self:_stream(ids, opts, "model:stream")
end

function Model:_stream(ids, opts, fn)
  opts = check_options(opts, fn, nil, nil, 4)
  check_ids(ids, fn, 4)
  if opts.session and opts.adapter then
    error(fn .. ": give adapter or session, not both (a session carries its own adapter)", 3)
  end
  if opts.session ~= nil and opts.session.model ~= self then
    error(fn .. ": the session given belongs to another model", 3)
  end
  local run = new_run(self, opts, #ids, fn)
  local smp = sampler_for(self, opts, 0, fn)
  local info = {}
  local sess, own, prev
  local done = false
  local function finish()
    done = true
    local res = run:result()
    for k, v in pairs(res) do info[k] = v end
    if own and sess then sess:close() end
  end
  -- A token is handed out before it is fed: the next call feeds it and
  -- samples the one after, so stopping early costs no forward pass and a
  -- failing callback leaves the session holding only what was consumed.
  local function iter()
    if done then return nil end
    local id
    if not sess then sess, own, id = start(self, ids, opts, smp)
    else
      local ok, n = pcall(sess.step, sess, prev, smp)
      if not ok then finish(); error(n, 0) end
      id = n
    end
    -- a token sampled at the context's end has no place to go
    if sess:pos() >= sess:context() then
      run:stop("length")
      finish()
      return nil
    end
    local piece, ended = run:accept(id)
    if ended then finish() else prev = id end
    return piece, id
  end
  function info.close()
    if done then return end
    run:stop("cancelled")
    finish()
  end
  return iter, info, nil, setmetatable({}, { __close = info.close })
end

--- model:generate(ids, opts) -> { ids, text, finish_reason, usage }
-- opts: the sampler's (temperature, top_k, top_p, min_p, repetition_penalty,
-- presence_penalty, frequency_penalty, penalty_window, seed, logit_bias),
-- max_tokens, stop (strings), stop_tokens (ids; default <|return|>, <|call|>),
-- on_token(piece, id) (return false to stop), session (continue one),
-- adapter (a LoRA adapter for this call's fresh session; several can serve
-- calls at once); json_schema, grammar or json (the whole output held to
-- it) or arms (a grammar per kind of harmony message: gptoss.constraint).
function Model:generate(ids, opts)
  return self:_generate(ids, opts, "model:generate")
end

function Model:_generate(ids, opts, fn)
  opts = check_options(opts, fn, nil, nil, 4)
  check_ids(ids, fn, 4)
  local cb = opts.on_token
  require("gptoss.constraint").check(opts, fn)   -- a bad constraint raises here, named for the caller
  local eng = not opts.session and engine_of(self)
  if eng then return eng:_generate(ids, opts, fn) end   -- the engine owns the model: through it
  local it, info = self:_stream(ids, opts, fn)
  for piece, id in it do
    if cb then
      local ok, r = pcall(cb, piece, id)
      if not ok then info.close(); error(r, 0) end
      if r == false then
        info.close()
        info.finish_reason = "callback"
        break
      end
    end
  end
  info.close = nil
  return info
end

--- model:generate_batch({ids1, ids2, ...}, opts) -> { result1, result2, ... }
-- Through the engine (the running one, or one for this call): prompts are
-- prefilled and decoded together. With a seed, prompt i samples with
-- seed + i - 1. adapter: one adapter for every prompt, or a list with an
-- adapter (or false) per prompt.
function Model:generate_batch(prompts, opts)
  return require("gptoss.engine").generate_batch(self, prompts, opts, "model:generate_batch")
end

--- the same without the engine: sessions fed one after the other, then
-- decoded together with gptoss.batch_step (what bench/ compares against)
function Model:generate_batch_sessions(prompts, opts)
  local fn = "model:generate_batch_sessions"
  local adapter_of
  opts, adapter_of = check_batch(prompts, opts, fn)
  if opts.on_token ~= nil then error(fn .. ": on_token is not an option here", 2) end
  local runs, sessions, samplers, last = {}, {}, {}, {}
  for i, ids in ipairs(prompts) do
    runs[i] = new_run(self, opts, #ids, fn)
    samplers[i] = sampler_for(self, opts, i - 1, fn)
  end
  local ok, err = pcall(function()
    local active = {}
    for i, ids in ipairs(prompts) do
      sessions[i] = self:session { adapter = adapter_of(i) }
      sessions[i]:feed(ids, "last")
      if sessions[i]:pos() >= sessions[i]:context() then runs[i]:stop("length")
      else last[i] = sessions[i]:sample(samplers[i]); active[#active + 1] = i end
    end
    while #active > 0 do
      local stepping, ss, ids, sm = {}, {}, {}, {}
      for _, i in ipairs(active) do
        local _, ended = runs[i]:accept(last[i])
        if not ended then
          stepping[#stepping + 1] = i
          ss[#ss + 1], ids[#ids + 1], sm[#sm + 1] = sessions[i], last[i], samplers[i]
        end
      end
      active = {}
      if #stepping > 0 then
        local nxt = core.batch_step(ss, ids, sm)
        for k, i in ipairs(stepping) do
          -- sampled at the context's end: no place for it
          if sessions[i]:pos() >= sessions[i]:context() then runs[i]:stop("length")
          else last[i] = nxt[k]; active[#active + 1] = i end
        end
      end
    end
  end)
  for _, s in pairs(sessions) do s:close() end
  if not ok then error(err, 0) end
  local out = {}
  for i, r in ipairs(runs) do out[i] = r:result() end
  return out
end

--- model:loss(ids): mean next-token cross-entropy over the sequence (nats)
function Model:loss(ids)
  return self:_loss(ids, "model:loss")
end

function Model:_loss(ids, fn)
  C.ids(ids, fn, "ids", 3)
  if #ids < 2 then C.fail(fn, "ids", "a table of at least two token ids", ids, 3) end
  local lg = self:logits(ids)
  local s = 0
  for t = 1, #ids - 1 do s = s + lg:nll(t, ids[t + 1]) end
  return s / (#ids - 1)
end

--- model:perplexity(text_or_ids): exp(loss)
function Model:perplexity(x)
  local fn = "model:perplexity"
  if type(x) == "string" then
    if not self.tokenizer then error(fn .. ": text needs a tokenizer, and the model has none", 2) end
    x = self.tokenizer:encode(x)
  elseif type(x) ~= "table" then
    C.fail(fn, "x", "a string or a table of token ids", x)
  end
  return math.exp(self:_loss(x, fn))
end

--- model:trace_experts(ids) -> trace[layer][token] = { experts = {...}, weights = {...} }
-- (layers and tokens 1-based; expert numbers as in the checkpoint, 0-based)
function Model:trace_experts(ids)
  check_ids(ids, "model:trace_experts")
  local s = self:session()
  s:trace(true)
  local ok, err = pcall(s.feed, s, ids, "none")
  if not ok then s:close(); error(err, 0) end
  local per_token = s:trace_get()
  s:close()
  local out = {}
  for t, layers in ipairs(per_token) do
    for l, e in ipairs(layers) do
      out[l] = out[l] or {}
      out[l][t] = e
    end
  end
  return out
end
-- }======================================================

-- {====================================================== chat
local CHAT_KEYS = { system = true, developer = true, instructions = true, tools = true, builtin_tools = true,
  reasoning = true, date = true, identity = true, prefill = true, flavour = true, keep_analysis = true,
  on_delta = true }

--- gptoss.chat(model, messages, opts) -> { final, analysis, tool_calls,
-- messages, text, ids, finish_reason, usage, prompt_ids }
-- Renders the conversation with harmony, generates until <|return|> or
-- <|call|>, and parses the reply as it streams. opts: the system message's
-- reasoning, date, identity, builtin_tools (or a whole system table);
-- instructions and tools (or a whole developer table); prefill (e.g.
-- { channel = "final" }), flavour, keep_analysis; on_delta(delta, channel)
-- for streamed content; and every generate option. A call to a declared
-- function tool is held to its parameters schema, and json_schema, grammar
-- or json hold the final channel's message, the analysis left free
-- (gptoss.constraint.chat_arms); prefill = { channel = "final" } skips the
-- analysis, the whole reply then the constrained answer.
function M.chat(model, messages, opts)
  local fn = "gptoss.chat"
  local harmony = require "gptoss.harmony"
  local post = require "gptoss.post"
  C.udata(model, fn, "model", "gptoss.Model")
  C.table(messages, fn, "messages", "a list of messages")
  opts = check_options(opts, fn, CHAT_KEYS)
  if opts.on_delta ~= nil then C.func(opts.on_delta, fn, "on_delta") end
  local pf = opts.prefill
  if pf ~= nil then
    C.table(pf, fn, "prefill", "a table { channel, recipient, content_type }")
    for _, k in ipairs { "channel", "recipient", "content_type", "content" } do
      if pf[k] ~= nil then C.str(pf[k], fn, "prefill." .. k) end
    end
  end
  local tok = model.tokenizer
  if not tok then error(fn .. ": the model has no tokenizer", 2) end
  local system = opts.system
  if system == nil then
    system = { reasoning = opts.reasoning, date = opts.date, identity = opts.identity, tools = opts.builtin_tools }
  end
  local developer = opts.developer
  if developer == nil and (opts.instructions or opts.tools) then
    developer = { instructions = opts.instructions, tools = opts.tools }
  end
  -- the renderer checks the conversation's fields and names them; raised here as chat's
  local ok, prompt = pcall(harmony.render, { system = system, developer = developer, messages = messages,
    mode = "completion", prefill = pf, flavour = opts.flavour, keep_analysis = opts.keep_analysis }, tok)
  if not ok then error(fn .. ": " .. tostring(prompt):gsub("^.-:%d+: ", ""):gsub("^harmony: render: ", ""), 2) end
  local parser = harmony.stream_parser { role = "assistant", lenient = true, tokenizer = tok }
  if pf then
    -- the prompt already opened the header: replay it to the parser
    if pf.recipient then parser:process_unit { b = " to=" .. pf.recipient } end
    if pf.channel then parser:process_unit { s = "<|channel|>" }; parser:process_unit { b = pf.channel } end
    if pf.content_type then parser:process_unit { b = " " .. pf.content_type } end
    parser:process_unit { s = "<|message|>" }
  end
  local on_delta, on_token = opts.on_delta, opts.on_token
  local constraint = require "gptoss.constraint"
  local gen = {}
  for k, v in pairs(opts) do if not CHAT_KEYS[k] and not constraint.KEYS[k] then gen[k] = v end end
  -- what the renderer took as the function tools (it checked them above)
  local dev_tools = type(developer) == "table" and (developer.tools or developer.function_tools) or nil
  gen.arms = constraint.chat_arms(opts, harmony.function_tools(dev_tools), fn)
  gen.on_token = function(piece, id)
    parser:process(id)
    if on_delta and parser.last_content_delta then on_delta(parser.last_content_delta, parser:current_channel()) end
    if on_token then return on_token(piece, id) end
  end
  local r = model:_generate(prompt, gen, fn)
  parser:process_eos()
  local msgs = parser.messages
  return {
    final = post.final_text(msgs), analysis = post.analysis_text(msgs), tool_calls = post.tool_calls(msgs),
    messages = msgs, text = r.text, ids = r.ids, finish_reason = r.finish_reason, usage = r.usage,
    prompt_ids = prompt,
  }
end
-- }======================================================

return M
