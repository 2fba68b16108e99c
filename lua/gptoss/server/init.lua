--- gptoss.server: an OpenAI-compatible API served by nginx itself, through
-- lua-nginx-module (server/nginx.conf.in; `make serve`).
--
-- The model loads in each worker after the fork (CUDA does not survive a
-- fork), in a timer right after the worker starts, so that /health answers
-- 503 until it is ready. Requests of every connection go into the worker's
-- one engine (gptoss.engine) and batch together there. A handler never
-- blocks the event loop: it waits on a semaphore that one pump thread posts
-- when the engine signals news (eng:drain(), checked every GPTOSS_POLL_MS
-- with ngx.sleep), then polls its request; without drain it polls on the
-- same clock itself (bench/RESULTS.md, "Serving over HTTP", measures both).
-- A client that goes away cancels its request (lua_check_client_abort).
--
-- Settings come from the environment (the config's env directives pass
-- them): GPTOSS_MODEL (a checkpoint directory), GPTOSS_DEVICE, GPTOSS_CONTEXT,
-- GPTOSS_THREADS, GPTOSS_ADAPTERS (name=dir,...), GPTOSS_MODEL_NAME (the base
-- model's id; default the directory's name), GPTOSS_API_KEY (bearer token
-- required on /v1/), GPTOSS_MAX_BATCH, GPTOSS_MAX_QUEUE, GPTOSS_POLL_MS,
-- GPTOSS_MAX_DEPTH (JSON nesting), GPTOSS_MAX_N; GPTOSS_LEARN_DIR and its
-- fellows turn on continuous learning (gptoss.server.learn).
local json = require "gptoss.json"
local R = require "gptoss.server.request"
local metrics = require "gptoss.server.metrics"

local NULL, arr, obj = json.null, json.array, json.object
local encode = json.encode_compact
local M = {}

local state = { status = "loading" }
M.state = state

-- {====================================================== settings
local function env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return v
end

local function env_int(name, default)
  local v = env(name)
  if v == nil then return default end
  local n = tonumber(v)
  if not n or n ~= math.floor(n) or n < 0 then error(name .. " must be a non-negative integer (got '" .. v .. "')", 0) end
  return n
end

local function settings()
  local model = env("GPTOSS_MODEL")
  local adapters = {}
  for spec in (env("GPTOSS_ADAPTERS", "")):gmatch("[^,]+") do
    local name, dir = spec:match("^%s*([^=]+)=(.-)%s*$")
    if not name then error("GPTOSS_ADAPTERS: '" .. spec .. "' is not name=dir", 0) end
    adapters[#adapters + 1] = { name = name, dir = dir }
  end
  local name = env("GPTOSS_MODEL_NAME", model and model:gsub("/+$", ""):match("[^/]+$") or "gpt-oss")
  return {
    learn = require("gptoss.server.learn").settings(env, env_int, name),
    model = model, device = env("GPTOSS_DEVICE"), context = env_int("GPTOSS_CONTEXT", 0),
    threads = env_int("GPTOSS_THREADS", 0), adapters = adapters, api_key = env("GPTOSS_API_KEY"),
    name = name,
    max_batch = env_int("GPTOSS_MAX_BATCH", 64), max_queue = env_int("GPTOSS_MAX_QUEUE", 256),
    poll_s = env_int("GPTOSS_POLL_MS", 2) / 1000, pump = env("GPTOSS_PUMP", "1") ~= "0",
    limits = { max_depth = env_int("GPTOSS_MAX_DEPTH", 64), max_n = env_int("GPTOSS_MAX_N", 8), max_stop = 4 },
  }
end
-- }======================================================

-- {====================================================== loading
local function load()
  local cfg = state.cfg
  local gptoss = require "gptoss"
  if not cfg.model then error("GPTOSS_MODEL is not set (a checkpoint directory)", 0) end
  if not gptoss.engine then error("this gptoss has no engine (gptoss.engine, issue 18) to serve from", 0) end
  -- on a thread of its own: the worker keeps answering (503 "model_loading",
  -- /health with the bytes read so far) while the weights load; a copy per
  -- device when GPTOSS_DEVICE lists several (replicas)
  local devices = {}
  for d in (cfg.device or "cpu"):gmatch("[^,%s]+") do devices[#devices + 1] = d end
  local models = {}
  local function close_all() for _, x in ipairs(models) do x:close() end end
  for i, device in ipairs(devices) do
    local ld, lerr = gptoss.load_async(cfg.model, { device = device, context = cfg.context > 0 and cfg.context or nil,
                                                    threads = cfg.threads > 0 and cfg.threads or nil })
    if not ld then close_all(); error(lerr, 0) end
    state.loader = ld
    repeat
      local done, total, ended = ld:progress()
      state.progress = { done = done, total = total, device = i, devices = #devices }
      if not ended then ngx.sleep(0.01) end
    until ended or ngx.worker.exiting()
    if not select(3, ld:progress()) then ld:close(); state.loader = nil; close_all(); error("the worker is exiting", 0) end
    local m, err = ld:result()
    ld:close()
    state.loader = nil
    if not m then close_all(); error(#devices > 1 and device .. ": " .. tostring(err) or err, 0) end
    models[i] = m
  end
  local model = models[1]
  if not model.tokenizer then error(cfg.model .. ": the checkpoint has no tokenizer.json", 0) end
  local served = { [cfg.name] = { id = cfg.name } }
  local order = { served[cfg.name] }
  for _, a in ipairs(cfg.adapters) do
    local ad, aerr = gptoss.adapter.load(a.dir)
    if not ad then error("adapter " .. a.name .. ": " .. tostring(aerr), 0) end
    served[a.name] = { id = a.name, adapter = ad, parent = cfg.name }
    order[#order + 1] = served[a.name]
  end
  state.model, state.served, state.order, state.created = model, served, order, os.time()
  local eopts = { max_batch = cfg.max_batch, max_queue = cfg.max_queue }
  if #models > 1 then state.engine = require("gptoss.replicas").of_models(models, eopts)
  else state.engine = gptoss.engine(model, eopts) end
  if state.engine.drain and cfg.pump then
    state.waiting = {}
    ngx.timer.at(0, M.pump)
  end
  if cfg.learn then require("gptoss.server.learn").start(state, cfg.learn) end
  state.ctx = { served = served, tokenizer = model.tokenizer, context = model.context, vocab = model.config.vocab_size,
                limits = cfg.limits, new_id = M.new_id }
end

--- init_worker_by_lua: reads the settings and loads the model in a timer
function M.init_worker()
  math.randomseed(math.floor(ngx.now() * 1000) + ngx.worker.pid() * 7919)
  local ok, cfg = pcall(settings)
  state.metrics = metrics.new(ok and cfg.name or "gpt-oss")
  if not ok then state.status, state.error = "failed", cfg; return end
  state.cfg = cfg
  ngx.timer.at(0, function(premature)
    if premature then return end
    local t0 = ngx.now()
    local lok, err = pcall(load)
    ngx.update_time()
    if lok then
      state.status = "ready"
      ngx.log(ngx.NOTICE, string.format("gptoss: %s ready in %.1f s (%s)", cfg.name, ngx.now() - t0, cfg.model))
    else
      state.status, state.error = "failed", tostring(err)
      ngx.log(ngx.ERR, "gptoss: the model failed to load: ", tostring(err))
    end
  end)
end

--- the pump: wakes the handlers whose engine has news (a timer's loop)
function M.pump(premature)
  if premature then return end
  local eng, waiting, poll_s = state.engine, state.waiting, state.cfg.poll_s
  while not ngx.worker.exiting() do
    if next(waiting) and eng:drain() then
      for sema in pairs(waiting) do sema:post(1) end
    end
    ngx.sleep(poll_s)
  end
end

local id_counter = 0
--- a fresh id with the given prefix (chatcmpl-, resp_, call_, ...)
function M.new_id(prefix)
  id_counter = id_counter + 1
  return string.format("%s%08x%08x%04x", prefix, math.random(0, 0x7fffffff), math.floor(ngx.now() * 1000) % 0x7fffffff,
                       id_counter % 0x10000)
end
-- }======================================================

-- {====================================================== replies
local function send_json(status, value)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.print(encode(value))
end

local function error_object(e)
  return obj { "error", obj { "message", e.message, "type", e.type or "invalid_request_error", "param", e.param or NULL,
                              "code", e.code or NULL } }
end

local function send_error(e)
  if e.retry_after then ngx.header["Retry-After"] = tostring(e.retry_after) end
  send_json(e.status or 500, error_object(e))
end

local function sse(payload)
  if payload.event then return "event: " .. payload.event .. "\ndata: " .. payload.raw .. "\n\n" end
  return "data: " .. encode(payload) .. "\n\n"
end

-- writes SSE payloads; false when the client is gone
local function emit(list)
  if not list or #list == 0 then return true end
  local parts = {}
  for i, p in ipairs(list) do parts[i] = sse(p) end
  local ok = ngx.print(parts)
  if not ok then return false end
  return ngx.flush(true) ~= nil
end
-- }======================================================

-- {====================================================== generation
-- Submits the job's choices, waits on them without blocking the worker,
-- streams or answers, and cancels everything when the client leaves.
local function generate(job, endpoint)
  local eng, m, cfg = state.engine, state.metrics, state.cfg
  ngx.update_time()
  local t0 = ngx.now()
  local choices = {}
  -- registered before the first poll, so that no news is missed between a
  -- poll and the wait after it (posts while busy leave the count up)
  local sema = state.waiting and require("ngx.semaphore").new()
  if sema then state.waiting[sema] = true end
  -- a request is let go of as soon as it is done or abandoned (close, where
  -- the engine has it, frees it now rather than at collection)
  local function close(req) if req.close then req:close() end end
  local function release()
    if sema then state.waiting[sema] = nil end
    for _, c in ipairs(choices) do
      if not c.closed then c.closed = true; c.req:cancel(); close(c.req) end
    end
  end
  for i = 1, job.n do
    local gen = job.gen
    if job.n > 1 then
      gen = {}
      for k, v in pairs(job.gen) do gen[k] = v end
      if gen.seed then gen.seed = gen.seed + i - 1 end
    end
    local req, msg, code = eng:submit(job.prompt, gen)
    if not req then
      release()
      if code == "queue_full" then
        error({ status = 429, message = "The server's queue is full (" .. tostring(msg) .. "); retry later.",
                type = "requests", code = "rate_limit_exceeded", retry_after = 1 }, 0)
      elseif code == "too_large" then
        R.fail(413, "The request needs more KV memory than the server has: " .. tostring(msg), "messages", "request_too_large")
      end
      R.fail(503, "The engine refused the request: " .. tostring(msg), nil, code)
    end
    local c = job.choice(i - 1)
    c.req, c.tokens = req, 0
    choices[i] = c
  end
  local ended = false
  local function finish(reason)
    if ended then return end
    ended = true
    release()
    for _, c in ipairs(choices) do
      metrics.count_finished(m, reason or (c.result and c.result.finish_reason) or "abort", #job.prompt, c.tokens)
    end
    ngx.update_time()
    m.e2e:observe(ngx.now() - t0)
  end
  local ok_abort = ngx.on_abort(function()
    finish("abort")
    metrics.count_request(m, endpoint, 499)
    m.in_flight = m.in_flight - 1
    ngx.exit(499)
  end)
  if not ok_abort then ngx.log(ngx.WARN, "gptoss: lua_check_client_abort is off: a client that leaves keeps its request") end

  -- the wait on the engine and the reply
  local function serve()
    local alive = true
    if job.stream then
      ngx.status = 200
      ngx.header["Content-Type"] = "text/event-stream"
      ngx.header["Cache-Control"] = "no-cache"
      ngx.header["X-Accel-Buffering"] = "no"
      alive = emit(job.on_start(choices))
    end
    local pending = #choices
    while pending > 0 and alive do
      for _, c in ipairs(choices) do
        if not c.result and alive then
          local ids, text, done, _, lps = c.req:poll()
          if #ids > 0 then
            ngx.update_time()
            local now = ngx.now()
            if not c.last then m.ttft:observe(now - t0)
            else for _ = 1, #ids do m.itl:observe((now - c.last) / #ids) end end
            c.last, c.tokens = now, c.tokens + #ids
          end
          if job.stream and (#ids > 0 or text ~= "") then alive = emit(job.on_tokens(c, ids, text, lps)) end
          if done then
            c.result = c.req:result()
            c.closed = true
            close(c.req)
            pending = pending - 1
            if job.stream and alive then alive = emit(job.on_finish(c, c.result)) end
          end
        end
      end
      if pending > 0 and alive then
        if sema then sema:wait(1) else ngx.sleep(cfg.poll_s) end
      end
    end
    if not alive then finish("abort"); return 499 end
    local totals = { completion = 0, cached = 0 }
    for _, c in ipairs(choices) do
      totals.completion = totals.completion + #c.result.ids
      local d = c.result.usage and c.result.usage.prompt_tokens_details
      totals.cached = math.max(totals.cached, d and d.cached_tokens or 0)
      if c.result.finish_reason == "error" then
        finish("error")
        if job.stream then
          emit { error_object { message = "generation failed: " .. tostring(c.result.error), type = "server_error" } }
          return 200
        end
        R.fail(500, "generation failed: " .. tostring(c.result.error), nil, "generation_failed", "server_error")
      end
    end
    if job.stream then
      local tail = job.on_end(choices, totals)
      if not job.sse_events then tail[#tail + 1] = "[DONE]" end
      local parts = {}
      for i, p in ipairs(tail) do parts[i] = p == "[DONE]" and "data: [DONE]\n\n" or sse(p) end
      ngx.print(parts)
      ngx.flush(true)
    else
      send_json(200, job.body(choices, totals))
    end
    finish()
    job.finished = choices
    return 200
  end
  -- whatever fails there (a reply that cannot be shaped, a lost engine)
  -- still lets go of the engine's requests
  local ok, status = pcall(serve)
  if not ok then finish("error"); error(status, 0) end
  return status
end
-- }======================================================

-- {====================================================== endpoints
local function read_body()
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  if not data then
    local file = ngx.req.get_body_file()
    if file then
      local f = io.open(file, "rb")
      if f then data = f:read("*a"); f:close() end
    end
  end
  return R.body(data, state.cfg.limits.max_depth)
end

local function model_entry(e)
  return obj { "id", e.id, "object", "model", "created", state.created or 0, "owned_by", "gptoss",
               "root", e.parent or e.id, "parent", e.parent or NULL, "max_model_len", state.model.context }
end

local GENERATE = {
  ["/v1/chat/completions"] = function(b, ctx) return require("gptoss.server.chat").chat(b, ctx) end,
  ["/v1/completions"] = function(b, ctx) return require("gptoss.server.chat").completions(b, ctx) end,
  ["/v1/responses"] = function(b, ctx) return require("gptoss.server.responses").responses(b, ctx) end,
}

local function authorized()
  local key = state.cfg and state.cfg.api_key
  if not key then return true end
  local h = ngx.var.http_authorization or ""
  return h == "Bearer " .. key
end

local function ready()
  if state.status == "ready" then return end
  if state.status == "loading" then
    error({ status = 503, message = "The model is loading; retry shortly.", type = "server_error", code = "model_loading",
            retry_after = 1 }, 0)
  end
  error({ status = 503, message = "The model failed to load: " .. tostring(state.error), type = "server_error",
          code = "model_unavailable" }, 0)
end

local function route(uri, method)
  if uri == "/health" then
    if state.status == "ready" then send_json(200, obj { "status", "ok" }); return 200 end
    local p = state.status == "loading" and state.progress
    send_json(503, obj { "status", state.status, "error", state.error or NULL,
                         "loaded_bytes", p and p.done or NULL, "total_bytes", p and p.total or NULL })
    return 503
  elseif uri == "/metrics" then
    ngx.header["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    ngx.print(metrics.render(state.metrics, state.engine and state.engine:stats()))
    return 200
  end
  if uri:sub(1, 4) ~= "/v1/" then
    R.fail(404, string.format("Unknown request URL: %s %s.", method, uri), nil, "unknown_url")
  end
  if not authorized() then
    R.fail(401, "Incorrect API key provided. You can find your API key in the server's GPTOSS_API_KEY.", nil, "invalid_api_key")
  end
  local gen = GENERATE[uri]
  if gen then
    if method ~= "POST" then R.fail(405, string.format("Method %s is not allowed on %s; use POST.", method, uri), nil, "method_not_allowed") end
    ready()
    local body = read_body()
    local learned = state.learner and type(body.model) == "string" and state.served[body.model]
    if learned and learned.learned then require("gptoss.server.learn").refresh(state, learned) end
    local job = gen(body, state.ctx)
    local status = generate(job, uri)
    if status == 200 and learned and learned.learned and job.kind == "chat" and job.finished then
      local ok, err = pcall(require("gptoss.server.learn").log, state, body, job, job.finished)
      if not ok then ngx.log(ngx.ERR, "gptoss: learn: logging ", job.id, ": ", tostring(err)) end
    end
    return status
  end
  if uri == "/v1/feedback" then
    if method ~= "POST" then R.fail(405, string.format("Method %s is not allowed on %s; use POST.", method, uri), nil, "method_not_allowed") end
    ready()
    send_json(200, require("gptoss.server.learn").feedback(state, read_body()))
    return 200
  end
  if uri == "/v1/models" or uri:match("^/v1/models/") then
    if method ~= "GET" then R.fail(405, string.format("Method %s is not allowed on %s; use GET.", method, uri), nil, "method_not_allowed") end
    ready()
    if uri == "/v1/models" then
      local list = {}
      for i, e in ipairs(state.order) do list[i] = model_entry(e) end
      send_json(200, obj { "object", "list", "data", arr(list) })
      return 200
    end
    local id = ngx.unescape_uri(uri:sub(#"/v1/models/" + 1))
    local e = state.served[id]
    if not e then R.fail(404, string.format("The model `%s` does not exist or you do not have access to it.", id), "model", "model_not_found") end
    send_json(200, model_entry(e))
    return 200
  end
  R.fail(404, string.format("Unknown request URL: %s %s.", method, uri), nil, "unknown_url")
end

--- content_by_lua: every request
function M.handle()
  local m = state.metrics
  local uri, method = ngx.var.uri, ngx.req.get_method()
  local endpoint = (GENERATE[uri] or uri == "/v1/models" or uri == "/health" or uri == "/metrics" or uri == "/v1/feedback") and uri
    or (uri:match("^/v1/models/") and "/v1/models/{id}") or "other"
  m.in_flight = m.in_flight + 1
  local ok, res = pcall(route, uri, method)
  local status = res
  if not ok then
    if type(res) == "table" and res.status then
      status = res.status
      if ngx.headers_sent then
        emit { error_object(res) }
      else
        send_error(res)
      end
    else
      ngx.log(ngx.ERR, "gptoss: ", tostring(res))
      status = 500
      if not ngx.headers_sent then
        send_error { status = 500, message = "internal error: " .. tostring(res), type = "server_error" }
      end
    end
  end
  metrics.count_request(m, endpoint, status or 200)
  m.in_flight = m.in_flight - 1
end

--- error_page target: nginx's own refusals (a body over client_max_body_size)
-- in OpenAI's shape
function M.nginx_error()
  local status = ngx.status
  local messages = {
    [413] = "The request body is larger than this server accepts (client_max_body_size).",
    [400] = "The request is malformed.", [408] = "The request timed out.",
  }
  ngx.header["Content-Type"] = "application/json"
  ngx.print(encode(error_object { message = messages[status] or ("HTTP " .. status),
                                  code = status == 413 and "request_too_large" or NULL }))
  if state.metrics then metrics.count_request(state.metrics, "other", status) end
end
-- }======================================================

return M
