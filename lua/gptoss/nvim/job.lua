--- gptoss.nvim.job: the model, its engine, the adapters, and the requests
-- in flight. Generation runs on the engine's thread; the editor wakes on
-- the engine's fd (a uv poll), so the main loop never waits on the model.
-- Every handler runs in vim.schedule, where buffers may be touched.
local config = require "gptoss.nvim.config"
local uv = vim.uv or vim.loop   -- 0.10+ names it vim.uv; 0.7 vim.loop

local M = {}

-- the LuaJIT build of the binding, found from this file's own path
do
  local here = debug.getinfo(1, "S").source:sub(2)
  local root = vim.fn.fnamemodify(here, ":p:h:h:h:h")
  local so = root .. "/build/luajit/?.so"
  if not package.cpath:find(so, 1, true) then package.cpath = so .. ";" .. package.cpath end
  M.root = root
end

-- adapters: loaded Adapter objects by their absolute directory (each is
-- loaded once); active: engine request -> its handler; owners: buffer ->
-- the job working for it (a new one supersedes it)
local state = { model = nil, engine = nil, poll = nil, loader = nil, adapters = {}, active = {}, owners = {},
  status = "idle", tps = 0 }
M.state = state

local function report(err)
  vim.notify("gptoss: " .. tostring(err), vim.log.levels.ERROR)
end

-- wakes on the engine's fd: every request with news is polled
local function on_news()
  if not state.engine then return end
  state.engine:drain()
  for req, handler in pairs(state.active) do
    local ids, text, done, err = req:poll()
    if #ids > 0 or text ~= "" or done then
      local ok, herr = pcall(handler, ids, text, done, err)
      if not ok then
        -- a broken handler must not keep its request (nor the others') running
        req:cancel()
        state.active[req] = nil
        report(herr)
      end
    end
    if done then state.active[req] = nil end
  end
  if next(state.active) == nil and state.status == "generating" then state.status = "idle" end
  state.tps = state.engine:stats().tokens_per_s or 0
end

-- the engine of a loaded model, woken on through its fd
local function start(m)
  state.model = m
  state.engine = require("gptoss").engine(m)
  state.poll = uv.new_poll(state.engine.fd)
  state.poll:start("r", function() vim.schedule(on_news) end)
  state.status = "idle"
end

local function progress(text)
  vim.api.nvim_echo({ { text, "GptossStatus" } }, false, {})
end

-- the load in flight is done: its Model becomes the engine's, and whoever
-- waited for it is told (err: why it failed)
local function loaded()
  local ld = state.loader
  if not ld then return end
  local m, err = ld.loader:result()
  ld.loader:close()
  state.loader = nil
  ld.poll:stop(); ld.poll:close()
  ld.timer:stop(); ld.timer:close()
  if m then
    start(m)
    progress(string.format("gptoss: %s loaded in %.1f s", config.values.model, (uv.hrtime() - ld.t0) / 1e9))
  else
    state.status = "error"
    err = "gptoss.nvim: " .. tostring(err)
    state.load_error = err
  end
  for _, fn in ipairs(ld.waiting) do
    local ok, ferr = pcall(fn, err)
    if not ok then report(ferr) end
  end
  if err and #ld.waiting == 0 then report(err) end
end

--- loads the model off the main loop (gptoss.load_async: the load runs on a
-- thread of its own), showing its progress; on_ready(err) runs in the main
-- loop once the engine is up (at once if it is), err a message if the load
-- failed. Calls while it loads wait for the same load.
function M.load(on_ready)
  if state.engine then
    if on_ready then on_ready(nil) end
    return
  end
  local cfg = config.values
  if not cfg.model then
    local err = "gptoss.nvim: setup{ model = dir } first"
    if on_ready then on_ready(err) else report(err) end
    return
  end
  if not state.loader then
    local loader = assert(require("gptoss").load_async(cfg.model, { device = cfg.device, threads = cfg.threads }))
    local ld = { loader = loader, waiting = {}, t0 = uv.hrtime(), poll = uv.new_poll(loader.fd), timer = uv.new_timer() }
    state.loader, state.status = ld, "loading"
    ld.poll:start("r", function() ld.poll:stop(); vim.schedule(loaded) end)
    ld.timer:start(0, 250, vim.schedule_wrap(function()
      if state.loader == ld then progress("gptoss: loading " .. cfg.model .. " ... " .. M.loading_text()) end
    end))
  end
  if on_ready then table.insert(state.loader.waiting, on_ready) end
end

--- seconds the load in flight has taken, or nil
function M.loading_s()
  local ld = state.loader
  return ld and (uv.hrtime() - ld.t0) / 1e9 or nil
end

--- the load in flight as "37% of 13.8 GB, 4.2 s" (the weights' bytes read so
-- far: CUDA counts them as it uploads, the CPU maps them all at once), or nil
function M.loading_text()
  local ld = state.loader
  if not ld then return nil end
  local done, total = ld.loader:progress()
  local s = M.loading_s()
  if total > 0 then return string.format("%d%% of %.1f GB, %.1f s", math.floor(100 * done / total), total / 1e9, s) end
  return string.format("%.1f s", s)
end

--- the engine, loading the model on first use. This waits for the load
-- (for scripts and tests); commands go through job.load, which does not.
function M.engine()
  if state.engine then return state.engine end
  if state.loader then
    loaded()
    if state.engine then return state.engine end
    error(state.load_error, 0)
  end
  local cfg = config.values
  if not cfg.model then error("gptoss.nvim: setup{ model = dir } first", 0) end
  state.status = "loading"
  local m, err = require("gptoss").load(cfg.model, { device = cfg.device, threads = cfg.threads })
  if not m then state.status = "error"; error("gptoss.nvim: " .. tostring(err), 0) end
  start(m)
  return state.engine
end

--- the model (loading it on first use)
function M.model()
  M.engine()
  return state.model
end

-- {====================================================== adapters
--- the directory an adapter name stands for: a name of setup's adapters,
-- or a directory; nil, message for neither
function M.adapter_dir(name)
  local dirs = config.values.adapters or {}
  if dirs[name] then return dirs[name] end
  if type(name) == "string" and vim.fn.isdirectory(name) == 1 then return name end
  local names = {}
  for n in pairs(dirs) do names[#names + 1] = n end
  table.sort(names)
  return nil, string.format("unknown adapter '%s' (setup's adapters: %s)", tostring(name),
    #names > 0 and table.concat(names, ", ") or "none")
end

--- the loaded Adapter of a name (loaded once per directory), or nil, message
function M.adapter(name)
  local dir, err = M.adapter_dir(name)
  if not dir then return nil, err end
  local key = vim.fn.fnamemodify(dir, ":p")
  if state.adapters[key] then return state.adapters[key] end
  local a, lerr = require("gptoss").adapter.load(dir)
  if not a then return nil, string.format("adapter '%s': %s", name, tostring(lerr)) end
  state.adapters[key] = a
  return a
end
-- }======================================================

-- {====================================================== requests
--- submits prompt ids; handler(ids, text, done, err) runs in the main loop.
-- opts: as eng:submit takes them. -> Request | nil, message
function M.submit(ids, opts, handler)
  local eng = M.engine()
  local req, err = eng:submit(ids, opts)
  if not req then return nil, err end
  state.active[req] = handler
  state.status = "generating"
  return req
end

local Job = {}
Job.__index = Job

--- cancels the job's request (it ends at the engine's next step)
function Job:cancel() if self.req and not self.req.done then self.req:cancel() end end

-- a job for buf supersedes the one in flight for it
local function claim(buf, job)
  local old = state.owners[buf]
  if old and old ~= job and not old.finished then
    old.superseded = true
    old:cancel()
    if old.on_superseded then old.on_superseded() end
  end
  state.owners[buf] = job
end

--- job.chat(messages, opts, on_delta, on_done) -> Job | nil, message: a
-- harmony conversation through the engine, rendered and parsed as
-- gptoss.chat does (so its text is gptoss.chat's for the same messages and
-- options). opts: reasoning, adapter (a name), instructions (the developer
-- message's), prefill, buf (the buffer the job works for: a job in flight
-- for it is superseded). on_delta(delta, channel, recipient) gets the
-- content as it streams; on_done(res) gets { final, analysis, messages,
-- pieces, finish_reason, error, result }; neither runs for a superseded job.
function M.chat(messages, opts, on_delta, on_done)
  local cfg = config.values
  local harmony, post = require "gptoss.harmony", require "gptoss.post"
  local model = M.model()
  local adapter
  if opts.adapter then
    local err
    adapter, err = M.adapter(opts.adapter)
    if not adapter then return nil, err end
  end
  local tok = model.tokenizer
  local prefill = opts.prefill or cfg.prefill
  local developer = opts.instructions and { instructions = opts.instructions } or nil
  local prompt = harmony.render({ system = { reasoning = opts.reasoning or cfg.reasoning }, developer = developer,
    messages = messages, mode = "completion", prefill = prefill }, tok)
  local parser = harmony.stream_parser { role = "assistant", lenient = true, tokenizer = tok }
  if prefill then   -- the prompt opened the header: replay it to the parser
    if prefill.recipient then parser:process_unit { b = " to=" .. prefill.recipient } end
    if prefill.channel then parser:process_unit { s = "<|channel|>" }; parser:process_unit { b = prefill.channel } end
    if prefill.content_type then parser:process_unit { b = " " .. prefill.content_type } end
    parser:process_unit { s = "<|message|>" }
  end
  local gen = { max_tokens = cfg.max_tokens, adapter = adapter }
  for k, v in pairs(cfg.sampling or {}) do gen[k] = v end
  local job = setmetatable({ buf = opts.buf, pieces = 0, messages = messages }, Job)
  local req, err = M.submit(prompt, gen, function(ids, _, done, e)
    if job.superseded then return end
    for _, id in ipairs(ids) do
      parser:process(id)
      local d = parser.last_content_delta
      if d and d ~= "" and on_delta then
        local h = parser.current_header or {}
        on_delta(d, parser:current_channel(), h.recipient)
      end
    end
    job.pieces = job.pieces + 1
    if done then
      parser:process_eos()
      job.finished = true
      if opts.buf and state.owners[opts.buf] == job then state.owners[opts.buf] = nil end
      local r = job.req:result()
      local msgs = parser.messages
      job.last = { final = post.final_text(msgs) or "", analysis = post.analysis_text(msgs) or "", messages = msgs,
        pieces = job.pieces, finish_reason = r.finish_reason, error = e, result = r }
      if on_done then on_done(job.last) end
    end
  end)
  if not req then return nil, err end
  job.req = req
  if opts.buf then claim(opts.buf, job) end
  return job
end

--- the job working for buf, or nil
function M.owner(buf) return state.owners[buf] end

--- stops the job of buf, or with no buf every request in flight (each
-- ends at the engine's next step)
function M.stop(buf)
  if buf then
    local job = state.owners[buf]
    if job then job:cancel() end
    return
  end
  for req in pairs(state.active) do req:cancel() end
end
-- }======================================================

--- statusline: "gptoss: <state> [N tok/s]"
function M.statusline()
  if state.status == "generating" then return string.format("gptoss: generating %.1f tok/s", state.tps) end
  if state.loader then return string.format("gptoss: loading %.0f s", M.loading_s()) end
  return "gptoss: " .. state.status
end

return M
