--- gptoss.server.learn: continuous learning in the server (gptoss.learn).
-- With GPTOSS_LEARN_DIR set, the worker serves one more model id,
-- GPTOSS_LEARN_NAME (default: the base id with "-learned"), whose adapter
-- is the learner's current version (the base model before the first). Every
-- chat completion with it is logged (the request's messages and the reply),
-- POST /v1/feedback { id, rating, correction } rates or corrects one by its
-- completion id, and a timer ticks the learner's policy every second:
-- rounds train between the serving steps at GPTOSS_LEARN_SHARE of the
-- engine's time, and a better version is served from the next request on
-- (system_fingerprint names the version: NAME-vN). GPTOSS_LEARN_EVERY,
-- GPTOSS_LEARN_HOLDOUT (every Nth conversation held out), GPTOSS_LEARN_LR,
-- GPTOSS_LEARN_EPOCHS, GPTOSS_LEARN_RANK set the policy and the rounds.
local json = require "gptoss.json"
local R = require "gptoss.server.request"

local obj = json.object
local M = {}

--- settings(env, env_int, base) -> the learner's settings, or nil when off
function M.settings(env, env_int, base)
  local dir = env("GPTOSS_LEARN_DIR")
  if not dir then return nil end
  local function env_num(name, default)
    local v = env(name)
    if v == nil then return default end
    local n = tonumber(v)
    if not n or n <= 0 then error(name .. " must be a positive number (got '" .. v .. "')", 0) end
    return n
  end
  local share = env("GPTOSS_LEARN_SHARE", "0.3")
  if share ~= "idle" then
    share = tonumber(share)
    if not share or share < 0 or share > 1 then error("GPTOSS_LEARN_SHARE must be in 0..1 or idle (got '" .. env("GPTOSS_LEARN_SHARE") .. "')", 0) end
  end
  return { dir = dir, name = env("GPTOSS_LEARN_NAME", base .. "-learned"), share = share,
           every = env_int("GPTOSS_LEARN_EVERY", 32), holdout = env_int("GPTOSS_LEARN_HOLDOUT", 5),
           lr = env_num("GPTOSS_LEARN_LR", 2e-4), epochs = env_num("GPTOSS_LEARN_EPOCHS", 1),
           r = env_int("GPTOSS_LEARN_RANK", 8) }
end

--- start(state, lc): the learner over the worker's engine, its model id in
-- state.served, and the timer that ticks it
function M.start(state, lc)
  local gptoss = require "gptoss"
  -- one learner per worker: workers (one per GPU) learn apart
  local dir = lc.dir
  if ngx.worker.count() > 1 then dir = dir .. "/worker-" .. ngx.worker.id() end
  local L, err = gptoss.learn.open(dir, {
    engine = state.engine, default = lc.name, share = lc.share, every = math.max(1, lc.every),
    holdout_every = math.max(1, lc.holdout), lora = { r = math.max(1, lc.r), alpha = 2 * math.max(1, lc.r), seed = 0 },
    train = { epochs = lc.epochs, lr = lc.lr },
  })
  if not L then error("GPTOSS_LEARN_DIR: " .. tostring(err), 0) end
  state.learner, state.learn = L, lc
  local entry = { id = lc.name, parent = state.cfg.name, learned = true }
  state.served[lc.name] = entry
  state.order[#state.order + 1] = entry
  M.refresh(state, entry)
  -- one timer for the worker's life, not ngx.timer.every: a round is a
  -- coroutine, and lua-nginx-module resumes a coroutine only in the light
  -- thread that made it (another timer's resume crashes the worker)
  ngx.timer.at(0, function(premature)
    if premature then return end
    local said
    while not ngx.worker.exiting() do
      local ok, ended = pcall(L.tick, L)
      if not ok then ended = { { name = lc.name, error = ended } } end
      for _, ev in ipairs(ended) do
        if ev.result then
          local r = ev.result
          ngx.log(ngx.NOTICE, string.format("gptoss: learn: round of %s on %d examples: held-out loss %.4f -> %.4f, %s (v%d)",
            ev.name, #r.examples, r.eval_before, r.eval_after, r.accepted and "new version" or "kept", r.version))
          said = nil
        elseif tostring(ev.error) ~= said then   -- a reason not to train is said once, not every second
          said = tostring(ev.error)
          ngx.log(ngx.NOTICE, "gptoss: learn: ", ev.name, ": ", said)
        end
      end
      ngx.sleep(next(L.rounds) and 0.01 or 1)
    end
  end)
end

--- refresh(state, entry): a learned entry takes the version served now
-- (a request keeps the adapter it was submitted with)
function M.refresh(state, entry)
  if not (entry and entry.learned) then return end
  local lora, version = state.learner:adapter(entry.id)
  entry.adapter, entry.version = lora, version
  entry.fingerprint = entry.id .. "-v" .. version
end

-- a message's text: a string, or the text parts of a list of parts
local function text_of(content)
  if type(content) == "string" then return content end
  if type(content) ~= "table" then return nil end
  local parts = {}
  for _, p in ipairs(content) do
    if type(p) == "table" and type(p.text) == "string" then parts[#parts + 1] = p.text end
  end
  return table.concat(parts)
end

--- log(state, body, job, choices): a finished chat completion with a
-- learned model, as the learner's record (the first choice's reply)
function M.log(state, body, job, choices)
  local msgs = {}
  for _, m in ipairs(body.messages or {}) do
    if type(m) == "table" and type(m.role) == "string" then
      msgs[#msgs + 1] = { role = m.role, content = text_of(m.content) or "" }
    end
  end
  local reply = choices[1] and choices[1]:message()
  msgs[#msgs + 1] = { role = "assistant", content = reply and type(reply.content) == "string" and reply.content or "" }
  state.learner:log { messages = msgs, adapter = job.model, meta = { completion_id = job.id } }
end

--- POST /v1/feedback { id = "chatcmpl-...", rating = 1..5, correction = "..." }
function M.feedback(state, b)
  local L = state.learner
  if not L then R.fail(404, "Feedback needs a learning server (GPTOSS_LEARN_DIR).", nil, "unknown_url") end
  local id = b.id
  if type(id) ~= "string" or id == "" then R.fail(400, "You must provide the completion's id.", "id") end
  local rating = b.rating
  if rating ~= nil and rating ~= json.null then
    if type(rating) ~= "number" or rating ~= math.floor(rating) or rating < 1 or rating > 5 then
      R.fail(400, "Invalid 'rating': expected an integer from 1 to 5.", "rating")
    end
  else rating = nil end
  local correction = b.correction
  if correction ~= nil and correction ~= json.null then
    if type(correction) ~= "string" or correction == "" then R.fail(400, "Invalid 'correction': expected a non-empty string.", "correction") end
  else correction = nil end
  if not rating and not correction then R.fail(400, "You must provide a rating or a correction.", "rating") end
  local logged = L:find("completion_id", id)
  if not logged then
    R.fail(404, string.format("No completion `%s` was logged by this server.", id), "id", "completion_not_found")
  end
  L:feedback(logged, { rating = rating, correction = correction })
  return obj { "object", "feedback", "id", id, "logged", logged }
end

return M
