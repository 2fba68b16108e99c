--- gptoss.sweep_lora: the built-in LoRA trial of gptoss.sweep (trial = "lora").
--
--   sweep.run {
--     method = "grid", metric = { name = "eval_loss", goal = "minimize" },
--     parameters = { r = { values = { 8, 16 } }, lr = { values = { 1e-4, 2e-4 } } },
--     trial = "lora",
--     lora = {
--       model = "/models/gpt-oss-20b", device = "cuda:0",   -- load = { precision = "mixed" }
--       data = "train.jsonl", eval = "held_out.jsonl",      -- JSONL files or lists of records
--       adapter = { alpha = 32, targets = { "attn", "experts" } },
--       train = { steps = 30, batch = 2, eval_every = 10, checkpoint_every = 10 },
--       task = { data = "qa.jsonl", max_tokens = 64, temperature = 0 },   -- optional exact match
--     },
--   }
--
-- Each trial trains a fresh adapter with gptoss.train, checkpointing into
-- its trials/NNNN/checkpoint (so a killed trial resumes where it stopped),
-- reports every step (loss, lr, grad_norm, and eval_loss / eval_perplexity
-- at eval_every), evaluates the held-out data at the end (eval_loss,
-- eval_perplexity), scores the task if given, and saves the adapter into
-- trials/NNNN/adapter (save_adapter = false skips it).
--
-- A parameter goes to gptoss.lora when it is one of its options (r, alpha,
-- rslora, targets, layers, init, dropout), to both when it is seed or
-- profile, to the task's sampling when it is temperature, top_p, top_k,
-- min_p, max_tokens or reasoning, and to gptoss.train otherwise (any of its
-- options: lr, schedule, warmup, batch, max_len, ...); "dataset" names the
-- training data and "template" its flavour. Prefixes force a place:
-- "adapter.r", "train.seed", "task.temperature".
--
-- The task: records { messages = {...}, answer = "..." } (or a JSONL file
-- of them); each conversation goes through gptoss.chat with the adapter,
-- the reply's final text through `post` (a function; default: trimmed),
-- and exact_match is the fraction equal to the trimmed answer.
local gptoss = require "gptoss"
local train = require "gptoss.train"

local M = {}

local LORA = { r = true, alpha = true, rslora = true, targets = true, layers = true, init = true, dropout = true }
local BOTH = { seed = true, profile = true }
local TASK = { temperature = true, top_p = true, top_k = true, min_p = true, max_tokens = true, reasoning = true }

--- the gptoss.lora, gptoss.train and task options of a trial's parameters
function M.split(params, spec)
  local function copy(t)
    local o = {}
    for k, v in pairs(t or {}) do o[k] = v end
    return o
  end
  local a, t, k = copy(spec.adapter), copy(spec.train), copy(spec.task)
  for name, v in pairs(params) do
    local where, key = name:match("^(%a+)%.(.+)$")
    if where == "adapter" or where == "lora" then a[key] = v
    elseif where == "train" then t[key] = v
    elseif where == "task" then k[key] = v
    elseif LORA[name] then a[name] = v
    elseif BOTH[name] then a[name] = v; t[name] = v
    elseif TASK[name] then k[name] = v
    elseif name == "dataset" then t.data = v
    elseif name == "template" then t.flavour = v
    else t[name] = v end
  end
  return a, t, k
end

--- the step a trial's training checkpoint holds (0: none)
function M.resume_step(trial_dir)
  local _, state = train.latest(trial_dir .. "/checkpoint")
  return state and state.step or 0
end

-- models stay loaded across trials: one per (directory, device)
local models = {}
local function model_for(spec, device)
  device = device or spec.device or "cpu"
  local key = spec.model .. "\0" .. device
  if not models[key] then
    local o = { device = device }
    for k, v in pairs(spec.load or {}) do o[k] = v end
    local m, err = require("gptoss.progress").load(spec.model, o)
    if not m then error("sweep: " .. err, 0) end
    models[key] = m
  end
  return models[key]
end

--- closes the models the trials loaded
function M.close()
  for k, m in pairs(models) do m:close(); models[k] = nil end
end

local function records(x, what)
  if type(x) == "table" then return x end
  local f, err = io.open(x, "rb")
  if not f then error("sweep: " .. what .. ": " .. tostring(err), 0) end
  local out = {}
  for line in f:lines() do
    if line:match("%S") then out[#out + 1] = require("cjson").decode(line) end
  end
  f:close()
  return out
end

local function trim(s) return (tostring(s or ""):gsub("^%s+", ""):gsub("%s+$", "")) end

--- exact match of the adapter's replies on the task's records
function M.exact_match(model, lora, task)
  local recs = records(task.data, "task data")
  local hits = 0
  for i, rec in ipairs(recs) do
    local reply = gptoss.chat(model, rec.messages, {
      adapter = lora, max_tokens = task.max_tokens or 64, temperature = task.temperature or 0,
      top_p = task.top_p, top_k = task.top_k, min_p = task.min_p, seed = task.seed or i,
      reasoning = task.reasoning or "low", prefill = task.prefill })
    local got = task.post and task.post(reply, rec) or trim(reply.final or reply.text)
    if got == trim(rec.answer) then hits = hits + 1 end
  end
  return hits / math.max(1, #recs)
end

--- the trial: train, evaluate, score, save (see above)
function M.trial(params, report, ctx)
  local spec = ctx.spec.lora
  if type(spec) ~= "table" or type(spec.model) ~= "string" then
    error("sweep: trial = \"lora\" needs lora = { model = DIR, data = ..., eval = ... }", 0)
  end
  local model = model_for(spec, ctx.device)
  local aopts, topts, task = M.split(params, spec)
  topts.data = topts.data or spec.data
  local eval = topts.eval or spec.eval
  if type(eval) == "string" then
    local ex, err = require("gptoss.data").read_jsonl(eval, model.tokenizer, topts)
    if not ex then error("sweep: eval data: " .. err, 0) end
    eval = ex
  end
  topts.eval = eval
  topts.checkpoint_dir = ctx.dir .. "/checkpoint"
  topts.checkpoint_every = topts.checkpoint_every or 10
  topts.keep = topts.keep or 1
  topts.resume = true
  topts.progress = ctx.progress and { label = "trial " .. ctx.index } or nil
  topts.on_step = function(step, info)
    -- no timings: a trial's records depend on its parameters alone
    report(step, { loss = info.loss, learning_rate = info.lr, grad_norm = info.grad_norm,
                   eval_loss = info.eval_loss, eval_perplexity = info.eval_perplexity })
  end
  local lora = gptoss.lora(model, aopts)
  local ok, res = pcall(function()
    local run = train.train(model, lora, topts)
    local m = { loss = run.final_loss, eval_loss = run.eval_loss, eval_perplexity = run.eval_perplexity }
    if task.data then m.exact_match = M.exact_match(model, lora, task) end
    if spec.save_adapter ~= false then
      local saved, err = lora:save(ctx.dir .. "/adapter")
      if not saved then error("sweep: saving the adapter: " .. tostring(err), 0) end
    end
    return m
  end)
  lora:close()
  if not ok then error(res, 0) end
  return res
end

return M
