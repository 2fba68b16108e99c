--- gptoss.train: the LoRA training loop over the engine's backward pass
-- (CPU or CUDA, as the model was loaded).
--
--   local lora = gptoss.lora(model, { r = 16, alpha = 32, seed = 3407 })
--   local run = gptoss.train(model, lora, {
--     data = examples, steps = 60, lr = 2e-4, warmup = 5, schedule = "cosine",
--     batch = 2, grad_accum = 2, max_len = 2048, eval = held_out,
--     on_step = function(step, info) print(step, info.loss, info.lr, info.grad_norm, info.flag) end })
--
-- data is a JSONL file (gptoss.data: messages or raw harmony text; options
-- loss_on, flavour, on_error) or a list of examples: { ids = {...}, mask =
-- {...} } (mask[t] true where token t is a target; default: all), or
-- records as a JSONL line holds them ({ messages = ... } or { text = ... }),
-- rendered and masked by gptoss.data. Each optimizer step
-- takes batch * grad_accum examples, in an order drawn from `seed`, and
-- averages the loss over all their target tokens, as transformers does.
-- packing = true packs several examples into each sequence of at most
-- max_len tokens (TRL's packing, its default "bfd" strategy: longest first,
-- each into the fullest sequence it fits, never split), each token
-- attending within its own example from position 0 (TRL's position ids
-- restarting per example): a step then takes batch * grad_accum packed
-- sequences, and its loss and gradients are those of their examples one by
-- one (with LoRA dropout 0: dropout's draws follow a token's row in the
-- sequence). It needs max_len.
-- optim = "adamw" (fp32 moments, the default) or "adamw_8bit" (8-bit
-- moments, as bitsandbytes' AdamW8bit; "adamw_torch" and "adamw_bnb_8bit",
-- transformers' names, also do).
--
-- profile = "quick_test" | "standard" | "full" | "max_quality" |
-- "conservative" fills in the seeds' settings (M.profiles); any option given
-- beside it wins. gptoss.lora(model, { profile = ... }) makes the adapter
-- the same profile asks for.
local C = require "gptoss.check"

local M = {}

local KNOWN = {}
for k in ("data steps epochs batch grad_accum lr schedule warmup weight_decay max_grad_norm betas eps max_len seed "
    .. "group_by_length eval eval_every on_step on_log log_every target_loss overfit_below underfit_above checkpoint_dir "
    .. "checkpoint_every keep resume loss_on flavour on_error profile dataset_size progress optim packing"):gmatch("%S+") do KNOWN[k] = true end

-- optim: AdamW with fp32 moments, or with 8-bit ones as bitsandbytes'
-- AdamW8bit (csrc/optim8.c); transformers' names for them are accepted too
local OPTIMS = { "adamw", "adamw_8bit", "adamw_torch", "adamw_bnb_8bit" }
local OPTIM_ALIAS = { adamw_torch = "adamw", adamw_bnb_8bit = "adamw_8bit" }

-- {====================================================== profiles
-- The seeds' training profiles: PROFILES and main() of their training
-- script (github.com/Maxli53/NeMo_NIM, scripts/train.py, "V3"). Their
-- logging_steps and save_steps are log_every and checkpoint_every here; the
-- rest of each profile follows from the rank, as main() derives it.
M.profiles = {
  quick_test   = { steps = 30,  dataset_size = 100,   checkpoint_every = 15,  log_every = 1,
                   description = "quick test run (30 steps, 100 samples): for testing configurations" },
  standard     = { steps = 200, dataset_size = 1000,  checkpoint_every = 50,  log_every = 10,
                   description = "standard training (200 steps, 1000 samples)" },
  full         = { steps = 500, dataset_size = 5000,  checkpoint_every = 100, log_every = 10,
                   description = "full training (500 steps, 5000 samples)" },
  max_quality  = { steps = 500, dataset_size = 10000, checkpoint_every = 50,  log_every = 10, r = 16, batch = 6,
                   description = "maximum quality (500 steps, 10k samples, r=16)" },
  conservative = { steps = 100, dataset_size = 1000,  checkpoint_every = 25,  log_every = 5,  r = 8, batch = 2,
                   description = "conservative, safe settings (r=8, batch=2)" },
}

local function find_profile(name, level)
  local p = M.profiles[name]
  if not p then
    local names = {}
    for k in pairs(M.profiles) do names[#names + 1] = k end
    table.sort(names)
    error("unknown training profile '" .. tostring(name) .. "' (" .. table.concat(names, ", ") .. ")", level + 1)
  end
  return p
end

--- the adapter options a profile asks for, under `over` (gptoss.lora's
-- options, which win): rank 16 (8 for conservative), alpha twice the rank,
-- rsLoRA from rank 16 up, no dropout, attention and experts, seed 3407
function M.lora_options(name, over)
  local p = find_profile(name, 2)
  local o = {}
  for k, v in pairs(over or {}) do if k ~= "profile" then o[k] = v end end
  o.r = o.r or p.r or 16          -- conservative names its 8
  if o.alpha == nil then o.alpha = 2 * o.r end
  if o.rslora == nil then o.rslora = o.r >= 16 end
  if o.dropout == nil then o.dropout = 0 end
  if o.targets == nil then o.targets = { "attn", "experts" } end
  if o.seed == nil then o.seed = 3407 end
  return o
end

--- the training options a profile asks for, for an adapter of rank r,
-- under `over` (gptoss.train's options, which win)
function M.options(name, r, over)
  local p = find_profile(name, 2)
  local o = {}
  for k, v in pairs(over or {}) do o[k] = v end
  r = r or p.r or 16
  for _, k in ipairs { "steps", "dataset_size", "checkpoint_every", "log_every" } do
    if o[k] == nil then o[k] = p[k] end
  end
  if o.batch == nil then o.batch = p.batch or (r == 8 and 2 or 4) end
  if o.grad_accum == nil then o.grad_accum = math.max(1, math.floor(16 / o.batch)) end
  if o.lr == nil then o.lr = 2e-4 end
  if o.schedule == nil then o.schedule = "cosine" end
  if o.warmup == nil then o.warmup = o.schedule == "cosine" and 20 or 10 end
  if o.weight_decay == nil then o.weight_decay = 0.01 end
  if o.max_len == nil then o.max_len = r >= 16 and 2048 or 1024 end
  if o.seed == nil then o.seed = 3407 end
  if o.optim == nil then o.optim = "adamw_8bit" end   -- their SFTConfig's optim
  if o.keep == nil then o.keep = 3 end
  if o.target_loss == nil then o.target_loss = 0.5 end
  return o
end
-- }======================================================

local DEFAULTS = {
  steps = nil, epochs = 1, batch = 1, grad_accum = 1, lr = 2e-4, schedule = "linear", warmup = 0,
  weight_decay = 0.01, max_grad_norm = 1.0, betas = { 0.9, 0.999 }, eps = 1e-8, max_len = nil, seed = 0, optim = "adamw",
  group_by_length = true, eval = nil, eval_every = nil, on_step = nil,
  target_loss = 0.5, overfit_below = 0.3, underfit_above = 1.0,
  checkpoint_dir = nil, checkpoint_every = nil, keep = 2, resume = false,
}

--- learning rate at optimizer step s (1-based) of n: linear warmup, then
-- constant, linear decay to 0, or cosine decay to 0 (as transformers'
-- get_*_schedule_with_warmup)
function M.lr_at(s, n, opts)
  local w, base = opts.warmup or 0, opts.lr
  local k = s - 1
  if k < w then return base * k / math.max(1, w) end
  local frac = (k - w) / math.max(1, n - w)
  if opts.schedule == "constant" then return base
  elseif opts.schedule == "linear" then return base * math.max(0, 1 - frac)
  elseif opts.schedule == "cosine" then return base * 0.5 * (1 + math.cos(math.pi * frac))
  end
  C.choice(opts.schedule, "train.lr_at", "schedule", { "linear", "cosine", "constant" }, 2)
end

--- the loss monitor's verdict on a loss, as the seeds' workflow reads it
function M.flag(loss, opts)
  opts = opts or DEFAULTS
  if loss < (opts.overfit_below or 0.3) then return "overfitting"
  elseif loss > (opts.underfit_above or 1.0) then return "underfitting"
  elseif loss <= (opts.target_loss or 0.5) then return "target"
  end
  return "training"
end

local function prepare(model, data, max_len, what, opts, fn)
  C.table(data, fn, what, "a list of examples", 3)
  local D = require "gptoss.data"
  local out = {}
  for i, ex in ipairs(data) do
    local ids, mask = ex.ids, ex.mask
    if ids == nil and (ex.text or ex.messages) then   -- rendered and masked as gptoss.data does for JSONL
      if not model.tokenizer then error(string.format("%s: %s[%d] needs a tokenizer, and the model has none", fn, what, i), 3) end
      local e, why = D.example(ex, model.tokenizer, { flavour = opts and opts.flavour, loss_on = opts and opts.loss_on,
                                                       max_len = max_len })
      if not e then error(string.format("%s: %s[%d]: %s", fn, what, i, why), 3) end
      ids, mask = e.ids, e.mask
    end
    if type(ids) ~= "table" or #ids < 2 then
      error(string.format("%s: %s[%d] needs ids (at least 2) or text", fn, what, i), 3)
    end
    if mask and #mask ~= #ids then
      error(string.format("%s: %s[%d] has %d mask entries for %d ids", fn, what, i, #mask, #ids), 3)
    end
    ids, mask = D.truncate(ids, mask, max_len)
    out[#out + 1] = { ids = ids, mask = mask, index = i }
  end
  if #out == 0 then error(fn .. ": " .. what .. " is empty", 3) end
  return out
end

-- whether example e's mask makes token t a target (no mask: all; 0 / false: not)
local function allows(e, t)
  local m = e.mask and e.mask[t]
  return not e.mask or (m and m ~= 0) and true or false
end

-- packing: best-fit decreasing (TRL's "bfd"): the examples longest first
-- (the earlier first among equals), each into the sequence with the least
-- room left that still holds it, else a new one; the sequences in the
-- order they were opened, their examples in the order they went in. An
-- example's first token is never a target: it would be predicted from the
-- example before it.
function M.pack(data, max_len)
  local order = {}
  for i = 1, #data do order[i] = i end
  table.sort(order, function(a, b)
    if #data[a].ids ~= #data[b].ids then return #data[a].ids > #data[b].ids end
    return a < b
  end)
  local packs = {}
  for _, i in ipairs(order) do
    local n, best = #data[i].ids, nil
    for _, p in ipairs(packs) do
      if p.room >= n and (not best or p.room < best.room) then best = p end
    end
    if not best then best = { room = max_len, members = {} }; packs[#packs + 1] = best end
    best.room = best.room - n
    best.members[#best.members + 1] = data[i]
  end
  local out = {}
  for k, p in ipairs(packs) do
    local ids, mask, starts = {}, {}, {}
    for _, e in ipairs(p.members) do
      starts[#starts + 1] = #ids + 1
      for t, id in ipairs(e.ids) do
        ids[#ids + 1] = id
        mask[#mask + 1] = t > 1 and allows(e, t)
      end
    end
    out[k] = { ids = ids, mask = mask, starts = starts, index = k, examples = #p.members }
  end
  return out
end

-- a permutation of 1..n from a seed (xorshift-free LCG: reproducible in
-- Lua 5.1, 5.4 and LuaJIT alike)
local function shuffle(n, seed)
  local p, x = {}, (seed * 2654435761 + 1) % 4294967296
  for i = 1, n do p[i] = i end
  for i = n, 2, -1 do
    x = (x * 1664525 + 1013904223) % 4294967296
    local j = x % i + 1
    p[i], p[j] = p[j], p[i]
  end
  return p
end

-- {====================================================== checkpoints
-- checkpoint_dir/step-NNNNNN/ holds the adapter (PEFT files), the optimizer
-- state and trainer_state.json; it is written under a temporary name and
-- renamed into place, then checkpoint_dir/latest (a one-line file, replaced
-- by rename) points at it. A kill at any moment leaves the previous
-- checkpoint whole.
local rm_tree = require("gptoss.files").rm_tree
local write_file = require("gptoss.files").write_file

local function save_checkpoint(dir, lora, state, keep)
  local lfs = require "lfs"
  lfs.mkdir(dir)
  local name = string.format("step-%06d", state.step)
  local tmp, final = dir .. "/." .. name .. ".tmp", dir .. "/" .. name
  rm_tree(tmp)
  local ok, err = lora:save(tmp)
  if ok then ok, err = lora:save_state(tmp .. "/optimizer.safetensors") end
  if ok then ok, err = write_file(tmp .. "/trainer_state.json", require("cjson").encode(state)) end
  if ok then rm_tree(final); ok, err = os.rename(tmp, final) end
  if ok then ok, err = write_file(dir .. "/latest", name .. "\n") end
  if not ok then rm_tree(tmp); error("train: checkpoint " .. final .. ": " .. tostring(err), 3) end
  -- pruning renames a checkpoint out of sight first (one atomic step), so a
  -- kill mid-deletion leaves no half-deleted step-N; leftovers go next time
  local names, gone = {}, {}
  for f in lfs.dir(dir) do
    if f:match("^step%-%d+$") then names[#names + 1] = f
    elseif f:match("^%.step%-%d+%.old$") then gone[#gone + 1] = f end
  end
  table.sort(names)
  for i = 1, #names - keep do
    local hidden = "." .. names[i] .. ".old"
    if os.rename(dir .. "/" .. names[i], dir .. "/" .. hidden) then gone[#gone + 1] = hidden end
  end
  for _, f in ipairs(gone) do rm_tree(dir .. "/" .. f) end
end

--- the latest checkpoint of a checkpoint_dir: its path and trainer state,
-- or nil when there is none (no latest file); a latest that names a missing
-- or broken checkpoint raises rather than restarting from step 1
function M.latest(dir)
  local f = io.open(dir .. "/latest", "rb")
  if not f then return nil end
  local name = f:read("*l")
  f:close()
  if type(name) ~= "string" or not name:match("^step%-%d+$") then
    error(string.format("train: resume: %s/latest names %q, not a checkpoint (step-N)", dir, tostring(name)), 0)
  end
  local path = dir .. "/" .. name
  local h = io.open(path .. "/trainer_state.json", "rb")
  if not h then error("train: resume: " .. dir .. "/latest names " .. name .. ", but " .. path .. "/trainer_state.json is missing", 0) end
  local ok, state = pcall(require("cjson").decode, h:read("*a"))
  h:close()
  if not ok or type(state) ~= "table" then error("train: resume: " .. path .. "/trainer_state.json is not valid JSON", 0) end
  return path, state
end
-- }======================================================

--- mean loss and perplexity of the adapter on examples (no gradients)
function M.evaluate(model, lora, data, opts)
  local fn = "train.evaluate"
  C.udata(model, fn, "model", "gptoss.Model")
  C.udata(lora, fn, "lora", "gptoss.Adapter")
  if opts ~= nil then C.table(opts, fn, "opts") end
  local ex = prepare(model, data, opts and opts.max_len, "eval", opts, fn)
  local total, count = 0, 0
  for _, e in ipairs(ex) do
    local s = model:session { adapter = lora }
    local lg = s:feed(e.ids, "all")
    s:close()
    for t = 1, #e.ids - 1 do
      if not e.mask or e.mask[t + 1] then total = total + lg:nll(t, e.ids[t + 1]); count = count + 1 end
    end
  end
  if count == 0 then error(fn .. ": the eval examples have no target tokens", 2) end
  return total / count, math.exp(total / count)
end

-- gptoss.train's options, defaults and profile filled in, checked
local function check_train(o, fn, level)
  local big = 2147483647
  for _, k in ipairs { "steps", "batch", "grad_accum", "dataset_size", "log_every", "checkpoint_every", "eval_every", "keep" } do
    if o[k] ~= nil then C.int(o[k], fn, k, 1, big, level) end
  end
  if o.warmup ~= nil then C.int(o.warmup, fn, "warmup", 0, big, level) end
  if o.max_len ~= nil then C.int(o.max_len, fn, "max_len", 2, big, level) end
  C.int(o.seed, fn, "seed", 0, 2 ^ 53, level)
  C.num(o.epochs, fn, "epochs", 0, nil, { gt = true }, level)
  C.num(o.lr, fn, "lr", 0, nil, nil, level)
  C.num(o.weight_decay, fn, "weight_decay", 0, nil, nil, level)
  C.num(o.max_grad_norm, fn, "max_grad_norm", 0, nil, nil, level)
  C.num(o.eps, fn, "eps", 0, nil, { gt = true }, level)
  C.table(o.betas, fn, "betas", "{ beta1, beta2 }", level)
  C.num(o.betas[1], fn, "betas[1]", 0, 1, { lt = true }, level)
  C.num(o.betas[2], fn, "betas[2]", 0, 1, { lt = true }, level)
  for _, k in ipairs { "target_loss", "overfit_below", "underfit_above" } do C.num(o[k], fn, k, nil, nil, nil, level) end
  C.choice(o.schedule, fn, "schedule", { "linear", "cosine", "constant" }, level)
  C.choice(o.optim, fn, "optim", OPTIMS, level)
  C.bool(o.group_by_length, fn, "group_by_length", level)
  if o.packing ~= nil then C.bool(o.packing, fn, "packing", level) end
  if o.packing and not o.max_len then error(fn .. ": packing needs max_len (the length of the packed sequences)", level + 1) end
  C.bool(o.resume, fn, "resume", level)
  if type(o.data) ~= "string" then C.table(o.data, fn, "data", "a list of examples or a JSONL path", level) end
  if o.eval ~= nil then C.table(o.eval, fn, "eval", "a list of examples", level) end
  if o.on_step ~= nil then C.func(o.on_step, fn, "on_step", level) end
  if o.on_log ~= nil then C.func(o.on_log, fn, "on_log", level) end
  if o.checkpoint_dir ~= nil then C.str(o.checkpoint_dir, fn, "checkpoint_dir", level) end
  if o.loss_on ~= nil then C.choice(o.loss_on, fn, "loss_on", { "assistant", "final", "all" }, level) end
  if o.flavour ~= nil then C.choice(o.flavour, fn, "flavour", { "harmony", "hf" }, level) end
  if o.on_error ~= nil then C.choice(o.on_error, fn, "on_error", { "skip", "reject" }, level) end
  if o.progress ~= nil and type(o.progress) ~= "boolean" then C.table(o.progress, fn, "progress", "a boolean or a table", level) end
end

-- {====================================================== how a step's passes run
-- Directly on the model (gptoss.train), or as jobs of the engine that owns
-- it (eng:train: gptoss.engine drives this loop in a coroutine, and each
-- job yields it until the engine has run the job between serving steps).
-- step(group, adamw, n) -> loss sum, target count, tokens, gradient norm;
-- evaluate(examples) -> mean loss, perplexity.

-- the positions a pass counts: t >= 2 where the mask allows (0 / false: not)
local function targets(e)
  local n = 0
  for t = 2, #e.ids do
    if allows(e, t) then n = n + 1 end
  end
  return n
end

local function direct(model, lora, o)
  local c = {}
  function c.step(group, w, n)
    lora:zero_grad()
    local loss, count, tokens = 0, 0, 0
    for _, e in ipairs(group) do
      local l, k = model:lora_backward(lora, e.ids, e.mask, e.starts)
      loss, count, tokens = loss + l, count + k, tokens + #e.ids
    end
    if count == 0 then error(string.format("train: step %d's examples have no target tokens", n), 0) end
    w.grad_scale = 1 / count
    return loss, count, tokens, lora:step(w)
  end
  function c.evaluate(data) return M.evaluate(model, lora, data, o) end
  function c.memory() return model:memory() end
  return c
end

-- waits for an engine job by yielding the coroutine that runs the loop
local function await(job, what)
  while not job:wait(0) do coroutine.yield(job) end
  local info = job:info()
  job:close()
  if info.finish_reason == "cancelled" then error("train: cancelled", 0) end
  if info.finish_reason ~= "stop" then error(string.format("train: %s: %s", what, tostring(info.error)), 0) end
  return info
end

--- (for gptoss.engine) the passes as jobs of the running engine `eng`
-- (its C object), taking `share` of its time while it serves
function M._engine_compute(eng, model, lora, share)
  local c = {}
  local function submit(ex, opts)
    local list = {}
    for i, e in ipairs(ex) do list[i] = { ids = e.ids, mask = e.mask, starts = e.starts } end
    opts.share = share
    local job, err = eng:train_job(lora, list, opts)
    if not job then error("train: " .. err, 0) end
    return job
  end
  function c.step(group, w, n)
    local count, tokens = 0, 0
    for _, e in ipairs(group) do count, tokens = count + targets(e), tokens + #e.ids end
    if count == 0 then error(string.format("train: step %d's examples have no target tokens", n), 0) end
    local info = await(submit(group, { zero_grad = true, step = { lr = w.lr, beta1 = w.betas[1], beta2 = w.betas[2],
      eps = w.eps, weight_decay = w.weight_decay, max_grad_norm = w.max_grad_norm, grad_scale = 1 / count,
      optim = w.optim } }),
      "step " .. n)
    return info.loss, info.count, tokens, info.grad_norm
  end
  function c.evaluate(data, o)
    local ex = prepare(model, data, o and o.max_len, "eval", o, "eng:train")
    local info = await(submit(ex, { loss_only = true }), "evaluation")
    if info.count == 0 then error("train.evaluate: the eval examples have no target tokens", 0) end
    return info.loss / info.count, math.exp(info.loss / info.count)
  end
  -- the model is the engine thread's: its memory is not read from here
  function c.memory() return nil end
  return c
end
-- }======================================================

function M.train(model, lora, opts)
  return M._run(model, lora, opts, nil, "gptoss.train")
end

-- the loop; compute: how its passes run (nil: directly)
function M._run(model, lora, opts, compute, fn)
  C.udata(model, fn, "model", "gptoss.Model")
  C.udata(lora, fn, "lora", "gptoss.Adapter")
  opts = C.options(opts, fn, KNOWN)
  if opts.profile ~= nil then
    -- what the profile's defaults are computed from
    if opts.batch ~= nil then C.int(opts.batch, fn, "batch", 1, 2147483647) end
    local ok, res = pcall(M.options, opts.profile, lora.r, opts)
    if not ok then error(fn .. ": " .. tostring(res):gsub("^.-:%d+: ", ""), 2) end
    opts = res
  end
  local o = {}
  for k, v in pairs(DEFAULTS) do o[k] = v end
  for k, v in pairs(opts) do o[k] = v end
  check_train(o, fn, 3)
  o.optim = OPTIM_ALIAS[o.optim] or o.optim
  local skipped
  if type(o.data) == "string" then          -- a JSONL file
    local ex, err = require("gptoss.data").read_jsonl(o.data, model.tokenizer, o)
    if not ex then error(fn .. ": " .. err, 2) end
    o.data, skipped = ex, err
  end
  if o.dataset_size and type(o.data) == "table" and #o.data > o.dataset_size then   -- the first N, as train[:N]
    local head = {}
    for i = 1, o.dataset_size do head[i] = o.data[i] end
    o.data = head
  end
  local data = prepare(model, o.data, o.max_len, "data", o, fn)
  if o.packing then data = M.pack(data, o.max_len) end
  if not compute then compute = direct(model, lora, o) end
  local per_step = o.batch * o.grad_accum
  local steps = o.steps or math.max(1, math.floor(#data * o.epochs / per_step))
  local clock = require("gptoss.core").clock
  local order, pos, epoch = shuffle(#data, o.seed), 0, 0
  local function next_example()
    pos = pos + 1
    if pos > #order then epoch = epoch + 1; order, pos = shuffle(#data, o.seed + epoch), 1 end
    return data[order[pos]]
  end
  local history, t_start, first = {}, clock(), 1
  if o.resume then
    if not o.checkpoint_dir then error(fn .. ": resume needs checkpoint_dir", 2) end
    local path, state = M.latest(o.checkpoint_dir)
    if path then
      local saved = assert(require("gptoss").adapter.load(path))
      lora:copy_from(saved)
      saved:close()
      local ok, err = lora:load_state(path .. "/optimizer.safetensors")
      if not ok then error("train: resume: " .. err, 2) end
      if lora.optim and lora.optim ~= o.optim then
        error(string.format("train: resume: the checkpoint's optimizer state is %s's, and this run's optim is %s", lora.optim, o.optim), 2)
      end
      if state.steps ~= steps or state.data ~= #data then
        error(string.format("train: resume: the checkpoint is of a run of %d steps over %d examples, not %d over %d",
          state.steps, state.data, steps, #data), 2)
      end
      epoch, pos, first = state.epoch, state.pos, state.step + 1
      order = shuffle(#data, o.seed + epoch)
      for i, h in ipairs(state.history) do
        history[i] = { step = i, loss = tonumber(h.loss), lr = tonumber(h.lr), grad_norm = tonumber(h.grad_norm) }
        history[i].flag = M.flag(history[i].loss, o)
      end
    end
  end
  local window = {}
  -- progress = true: a bar on stderr (gptoss.progress); a table: options over its defaults
  local bar
  if o.progress then
    local po = { label = "train", total = steps, unit = "steps", first = first - 1 }
    if type(o.progress) == "table" then for k, v in pairs(o.progress) do po[k] = v end end
    bar = require("gptoss.progress").new(po)
  end
  for step = first, steps do
    local t0 = clock()
    local group = {}
    for i = 1, per_step do group[i] = next_example() end
    if o.group_by_length then table.sort(group, function(a, b) return #a.ids < #b.ids end) end
    local lr = M.lr_at(step, steps, o)
    local loss, count, tokens, gn = compute.step(group, { lr = lr, betas = o.betas, eps = o.eps,
      weight_decay = o.weight_decay, max_grad_norm = o.max_grad_norm, optim = o.optim }, step)
    local dt = clock() - t0
    local info = { step = step, loss = loss / count, lr = lr, grad_norm = gn, tokens = tokens,
                   tokens_per_s = tokens / dt, elapsed = clock() - t_start, memory = compute.memory() }
    info.flag = M.flag(info.loss, o)
    if o.eval and o.eval_every and step % o.eval_every == 0 then
      info.eval_loss, info.eval_perplexity = compute.evaluate(o.eval, o)
    end
    history[step] = info
    window[#window + 1] = info
    if o.on_log and (#window >= (o.log_every or 1) or step == steps) then
      -- as transformers logs: the mean loss over the steps since the last log
      local l, tps = 0, 0
      for _, w in ipairs(window) do l, tps = l + w.loss, tps + w.tokens_per_s end
      local m = { step = step, loss = l / #window, steps = #window, lr = lr, grad_norm = gn,
                  tokens_per_s = tps / #window, elapsed = info.elapsed, memory = info.memory,
                  eval_loss = info.eval_loss, eval_perplexity = info.eval_perplexity }
      m.flag = M.flag(m.loss, o)
      o.on_log(step, m)
      window = {}
    end
    -- reported before it is checkpointed: a run resumed after a kill never lacks a reported step
    if o.on_step then o.on_step(step, info) end
    if o.checkpoint_dir and o.checkpoint_every and (step % o.checkpoint_every == 0 or step == steps) then
      local h = {}
      -- as %.17g text: lua-cjson keeps only 14 digits, and a resumed curve must be exact
      local function x(v) return string.format("%.17g", v) end
      for i = 1, step do h[i] = { step = i, loss = x(history[i].loss), lr = x(history[i].lr), grad_norm = x(history[i].grad_norm) } end
      save_checkpoint(o.checkpoint_dir, lora, { step = step, steps = steps, data = #data, epoch = epoch, pos = pos,
                                                seed = o.seed, history = h }, o.keep)
    end
    if bar then
      bar:update(step, { { "loss", string.format("%.4f", info.loss) }, { "lr", string.format("%.2e", lr) },
                         { "tok/s", string.format("%.0f", info.tokens_per_s) } })
    end
  end
  if bar then bar:finish() end
  local result = { history = history, steps = steps, final_loss = history[steps].loss, flag = history[steps].flag,
                   skipped = skipped, examples = #data, options = o }
  if o.eval then result.eval_loss, result.eval_perplexity = compute.evaluate(o.eval, o) end
  return result
end

return M
