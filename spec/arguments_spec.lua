-- Issue 17: a bad argument's message names the function and the parameter,
-- and quotes the value the caller gave exactly (a number or string as
-- written, a typed userdata by its type's name, else the type). The oracle
-- is the table below (function, parameter, what it takes), written by hand
-- from the API; each row is called with values of the wrong type, fractions,
-- NaN, infinities and 2^64 as its kind calls for.
local H = require "helpers"
local gptoss = require "gptoss"
local harmony = require "gptoss.harmony"
local train = require "gptoss.train"

local function raises(fn, pattern)
  local ok, err = pcall(fn)
  assert.is_false(ok, "no error; expected " .. pattern)
  err = tostring(err)
  assert(err:find(pattern), ("message %q does not match %q"):format(err, pattern))
end

-- a method's message may start with the caller's position
local function esc(x) return (x:gsub("%p", "%%%0")) end

describe("argument checks", function()
  local tok, m, s, st, w, f, a, m2, eng, req, mt
  setup(function()
    tok = assert(gptoss.tokenizer(H.tokenizer_dir))
    m = assert(gptoss.load(H.micro()))
    s = m:session()
    local path = H.tmpdir() .. "/x.safetensors"
    local w1 = gptoss.writer(path)
    w1:add("x", "U8", { 1 }, "\1")
    assert(w1:commit())
    st = assert(gptoss.safetensors(path))
    w = gptoss.writer(H.tmpdir() .. "/y.safetensors")
    f = gptoss.floats(("\0"):rep(4 * 2 * 3), 2, 3)
    a = gptoss.lora(m, { r = 2 })
    m2 = assert(gptoss.load(H.micro()))
    eng = gptoss.engine(m2)
    req = assert(eng:submit({ 1, 2 }, { max_tokens = 1, seed = 1 }))
    mt = assert(gptoss.load(H.tiny()))
  end)
  teardown(function()
    req:close(); eng:close(); m2:close(); mt:close()
    a:close(); s:close(); m:close(); tok:close(); st:close(); w:close()
  end)

  local function smp() return gptoss.sampler(1000) end

  -- { function, parameter, kind, call(v) [, opt = nil is taken] [, inf = an
  -- infinity is taken] [, bad = { { value, as quoted } ... } further values refused] }
  -- kinds: int, num (NaN refused; infinities unless inf), str, bool, func,
  -- table, udata, ids (a table of token ids), any (only the bad list);
  -- no_nil: nil is no value there (a list's element, a key); no_nan: NaN is
  -- no key; other = "session": the other userdata given is a session
  local oracle = {
    -- the tokenizer, safetensors and Floats (commit 4b2b33f)
    { "gptoss.tokenizer", "path", "str", function(v) return gptoss.tokenizer(v) end },
    { "tok:encode", "text", "str", function(v) return tok:encode(v) end },
    { "tok:encode", "opts", "table", function(v) return tok:encode("x", v) end, opt = true },
    { "tok:encode", "bytes", "bool", function(v) return tok:encode("x", { bytes = v }) end, opt = true },
    { "tok:encode", "allowed_special", "any", function(v) return tok:encode("x", { allowed_special = v }) end,
      bad = { { 5, "5" }, { "some", "some" }, { true, "boolean" } } },
    { "tok:encode", "allowed_special[1]", "any", function(v) return tok:encode("x", { allowed_special = { v } }) end,
      bad = { { 5, "5" }, { "<|nope|>", "<|nope|>" } } },
    { "tok:decode", "ids", "ids", function(v) return tok:decode(v) end },
    { "tok:decode", "ids[1]", "int", function(v) return tok:decode({ v }) end, no_nil = true },
    { "tok:decode_bytes", "ids", "ids", function(v) return tok:decode_bytes(v) end },
    { "tok:special", "name", "str", function(v) return tok:special(v) end },
    { "tok:name", "id", "int", function(v) return tok:name(v) end },
    { "tok:is_special", "id", "int", function(v) return tok:is_special(v) end },
    { "tok:decoder", "opts", "table", function(v) return tok:decoder(v) end, opt = true },
    { "tok:decoder", "bytes", "bool", function(v) return tok:decoder { bytes = v } end, opt = true },
    { "d:feed", "id", "int", function(v) return tok:decoder():feed(v) end },
    { "gptoss.safetensors", "path", "str", function(v) return gptoss.safetensors(v) end },
    { "gptoss.writer", "path", "str", function(v) return gptoss.writer(v) end },
    { "gptoss.config_load", "path", "str", function(v) return require("gptoss.core").config_load(v) end },
    { "gptoss.tensor_specs", "config", "table", function(v) return gptoss.tensor_specs(v) end },
    { "st:tensor", "name", "str", function(v) return st:tensor(v) end },
    { "st:read", "name", "str", function(v) return st:read(v) end },
    { "st:metadata", "key", "str", function(v) return st:metadata(v) end },
    { "writer:metadata", "key", "str", function(v) return w:metadata(v, "x") end },
    { "writer:metadata", "value", "str", function(v) return w:metadata("k", v) end },
    { "writer:add", "name", "str", function(v) return w:add(v, "U8", { 1 }, "x") end },
    { "writer:add", "dtype", "str", function(v) return w:add("n", v, { 1 }, "x") end },
    { "writer:add", "shape", "table", function(v) return w:add("n", "U8", v, "x") end },
    { "writer:add", "shape[1]", "int", function(v) return w:add("n", "U8", { v }, "x") end, no_nil = true, bad = { { -1, "-1" } } },
    { "writer:add", "data", "any", function(v) return w:add("n", "U8", { 1 }, v) end, bad = { { 5, "5" }, { true, "boolean" } } },
    { "writer:add", "fill", "any", function(v) return w:add("n", "F32", { 1 }, { fill = v }) end,
      bad = { { "gauss", "gauss" }, { 5, "5" } } },
    { "writer:add", "std", "num", function(v) return w:add("n", "F32", { 1 }, { fill = "normal", std = v }) end, opt = true,
      bad = { { -1, "-1" } } },
    { "writer:add", "seed", "int", function(v) return w:add("n", "F32", { 1 }, { fill = "normal", seed = v }) end, opt = true },
    { "writer:commit", "threads", "int", function(v) return w:commit(v) end, opt = true },
    { "gptoss.floats", "bytes", "str", function(v) return gptoss.floats(v, 0, 0) end },
    { "gptoss.floats", "rows", "int", function(v) return gptoss.floats("", v, 0) end },
    { "gptoss.floats", "cols", "int", function(v) return gptoss.floats("", 0, v) end },
    { "f:row", "row", "int", function(v) return f:row(v) end },
    { "f:argmax", "row", "int", function(v) return f:argmax(v) end },
    { "f:get", "row", "int", function(v) return f:get(v, 1) end },
    { "f:get", "col", "int", function(v) return f:get(1, v) end },
    { "f:nll", "row", "int", function(v) return f:nll(v, 0) end },
    { "f:nll", "id", "int", function(v) return f:nll(1, v) end },

    -- models and sessions
    { "gptoss.load", "dir", "str", function(v) return gptoss.load(v) end },
    { "gptoss.load", "opts", "table", function(v) return gptoss.load(H.micro(), v) end, opt = true },
    { "gptoss.load", "device", "str", function(v) return gptoss.load(H.micro(), { device = v }) end, opt = true },
    { "gptoss.load", "threads", "int", function(v) return gptoss.load(H.micro(), { threads = v }) end, opt = true,
      bad = { { -1, "-1" } } },
    { "gptoss.load", "context", "int", function(v) return gptoss.load(H.micro(), { context = v }) end, opt = true },
    { "gptoss.load", "memory", "num", function(v) return gptoss.load(H.micro(), { memory = v }) end, opt = true,
      bad = { { -1, "-1" }, { 1.5, "1.5" }, { 2 ^ 64, "1.8446744073709552e+19" } } },
    { "gptoss.load", "precision", "any", function(v) return gptoss.load(H.micro(), { precision = v }) end,
      bad = { { "bf16", "bf16" }, { 5, "5" } } },
    { "gptoss.load", "batch_invariant", "bool", function(v) return gptoss.load(H.micro(), { batch_invariant = v }) end, opt = true },
    { "gptoss.load", "tokenizer", "any", function(v) return gptoss.load(H.micro(), { tokenizer = v }) end,
      bad = { { 5, "5" }, { {}, "table" } } },
    { "model:session", "opts", "table", function(v) return m:session(v) end, opt = true },
    { "model:session", "context", "int", function(v) return m:session { context = v } end, opt = true },
    { "model:session", "rewind", "int", function(v) return m:session { rewind = v } end, opt = true, bad = { { -1, "-1" } } },
    { "model:session", "adapter", "udata", function(v) return m:session { adapter = v } end, opt = true },
    { "model:logits", "ids", "ids", function(v) return m:logits(v) end },
    { "model:logits", "ids[2]", "int", function(v) return m:logits({ 1, v }) end, no_nil = true },
    { "s:feed", "ids", "ids", function(v) return s:feed(v) end },
    { "s:feed", "ids[1]", "int", function(v) return s:feed({ v }) end, no_nil = true },
    { "s:feed", "logits", "any", function(v) return s:feed({ 1 }, v) end, bad = { { "most", "most" }, { 5, "5" } } },
    { "s:sample", "sampler", "udata", function(v) return s:sample(v) end },
    { "s:step", "id", "int", function(v) return s:step(v, smp()) end },
    { "s:step", "sampler", "udata", function(v) return s:step(1, v) end },
    { "s:rewind", "pos", "int", function(v) return s:rewind(v) end },
    { "s:set_adapter", "adapter", "any", function(v) return s:set_adapter(v) end,
      bad = { { 5, "5" }, { {}, "table" }, { "x", "x" } } },
    { "s:trace", "on", "bool", function(v) return s:trace(v) end, opt = true },
    { "gptoss.sampler", "vocab", "int", function(v) return gptoss.sampler(v) end, bad = { { 0, "0" } } },
    { "gptoss.sampler", "opts", "table", function(v) return gptoss.sampler(1000, v) end, opt = true },
    { "gptoss.sampler", "temperature", "num", function(v) return gptoss.sampler(1000, { temperature = v }) end, opt = true,
      bad = { { -0.5, "-0.5" } } },
    { "gptoss.sampler", "top_k", "int", function(v) return gptoss.sampler(1000, { top_k = v }) end, opt = true },
    { "gptoss.sampler", "top_p", "num", function(v) return gptoss.sampler(1000, { top_p = v }) end, opt = true,
      bad = { { 0, "0" }, { 1.5, "1.5" } } },
    { "gptoss.sampler", "min_p", "num", function(v) return gptoss.sampler(1000, { min_p = v }) end, opt = true,
      bad = { { -0.1, "-0.1" } } },
    { "gptoss.sampler", "repetition_penalty", "num", function(v) return gptoss.sampler(1000, { repetition_penalty = v }) end,
      opt = true, bad = { { 0, "0" } } },
    { "gptoss.sampler", "presence_penalty", "num", function(v) return gptoss.sampler(1000, { presence_penalty = v }) end, opt = true },
    { "gptoss.sampler", "frequency_penalty", "num", function(v) return gptoss.sampler(1000, { frequency_penalty = v }) end, opt = true },
    { "gptoss.sampler", "penalty_window", "int", function(v) return gptoss.sampler(1000, { penalty_window = v }) end, opt = true },
    { "gptoss.sampler", "seed", "int", function(v) return gptoss.sampler(1000, { seed = v }) end, opt = true,
      bad = { { -3, "-3" } } },
    { "gptoss.sampler", "logit_bias", "table", function(v) return gptoss.sampler(1000, { logit_bias = v }) end, opt = true },
    { "gptoss.sampler", "logit_bias key", "int", function(v) return gptoss.sampler(1000, { logit_bias = { [v] = 1 } }) end,
      bad = { { 1000, "1000" }, { -1, "-1" } }, no_nil = true, no_nan = true },
    { "gptoss.sampler", "logit_bias[5]", "num", function(v) return gptoss.sampler(1000, { logit_bias = { [5] = v } }) end,
      opt = true, inf = true },
    { "sampler:sample", "logits", "udata", function(v) return smp():sample(v) end, other = "session" },
    { "sampler:sample", "row", "int", function(v) return gptoss.sampler(3):sample(f, v) end, opt = true },
    { "sampler:sample", "history", "ids", function(v) return gptoss.sampler(3):sample(f, 1, v) end, opt = true },
    { "gptoss.batch_step", "sessions", "table", function(v) return gptoss.batch_step(v, { 1 }, { smp() }) end },
    { "gptoss.batch_step", "ids", "ids", function(v) return gptoss.batch_step({ s }, v, { smp() }) end },
    { "gptoss.batch_step", "samplers", "table", function(v) return gptoss.batch_step({ s }, { 1 }, v) end },
    { "gptoss.batch_step", "sessions[1]", "udata", function(v) return gptoss.batch_step({ v }, { 1 }, { smp() }) end, no_nil = true },
    { "gptoss.batch_step", "samplers[1]", "udata", function(v) return gptoss.batch_step({ s }, { 1 }, { v }) end, no_nil = true },

    -- LoRA adapters
    { "gptoss.adapter.load", "dir", "str", function(v) return gptoss.adapter.load(v) end },
    { "lora:save", "dir", "str", function(v) return a:save(v) end },
    { "lora:save_state", "path", "str", function(v) return a:save_state(v) end },
    { "lora:load_state", "path", "str", function(v) return a:load_state(v) end },
    { "lora:module", "layer", "int", function(v) return a:module(v, "q") end, bad = { { -1, "-1" } } },
    { "lora:module", "module", "any", function(v) return a:module(0, v) end, bad = { { "up", "up" }, { 5, "5" } } },
    { "lora:set", "which", "any", function(v) return a:set(0, "q", v, 1, 1, 0) end, bad = { { "C", "C" }, { 1, "1" } } },
    { "lora:set", "row", "int", function(v) return a:set(0, "q", "A", v, 1, 0) end, bad = { { 0, "0" } } },
    { "lora:set", "col", "int", function(v) return a:set(0, "q", "A", 1, v, 0) end },
    { "lora:set", "value", "num", function(v) return a:set(0, "q", "A", 1, 1, v) end },
    { "lora:copy_from", "other", "udata", function(v) return a:copy_from(v) end },
    { "lora:step", "opts", "table", function(v) return a:step(v) end, opt = true },
    { "lora:step", "lr", "num", function(v) return a:step { lr = v } end, opt = true, bad = { { -1, "-1" } } },
    { "lora:step", "eps", "num", function(v) return a:step { eps = v } end, opt = true, bad = { { 0, "0" } } },
    { "lora:step", "weight_decay", "num", function(v) return a:step { weight_decay = v } end, opt = true },
    { "lora:step", "max_grad_norm", "num", function(v) return a:step { max_grad_norm = v } end, opt = true },
    { "lora:step", "grad_scale", "num", function(v) return a:step { grad_scale = v } end, opt = true },
    { "lora:step", "betas", "table", function(v) return a:step { betas = v } end, opt = true },
    { "lora:step", "betas[2]", "num", function(v) return a:step { betas = { 0.9, v } } end, bad = { { 1, "1" } } },
    { "gptoss.lora", "model", "udata", function(v) return gptoss.lora(v) end },
    { "gptoss.lora", "opts", "table", function(v) return gptoss.lora(m, v) end, opt = true },
    { "gptoss.lora", "r", "int", function(v) return gptoss.lora(m, { r = v }) end, opt = true, bad = { { 0, "0" } } },
    { "gptoss.lora", "alpha", "num", function(v) return gptoss.lora(m, { alpha = v }) end, opt = true, bad = { { 0, "0" } } },
    { "gptoss.lora", "dropout", "num", function(v) return gptoss.lora(m, { dropout = v }) end, opt = true, bad = { { 1, "1" } } },
    { "gptoss.lora", "seed", "int", function(v) return gptoss.lora(m, { seed = v }) end, opt = true },
    { "gptoss.lora", "init", "any", function(v) return gptoss.lora(m, { init = v }) end, bad = { { "zeros", "zeros" }, { 1, "1" } } },
    { "gptoss.lora", "rslora", "bool", function(v) return gptoss.lora(m, { rslora = v }) end, opt = true },
    { "gptoss.lora", "targets", "table", function(v) return gptoss.lora(m, { targets = v }) end, opt = true },
    { "gptoss.lora", "targets[1]", "any", function(v) return gptoss.lora(m, { targets = { v } }) end,
      bad = { { "router", "router" }, { 5, "5" } } },
    { "gptoss.lora", "layers", "table", function(v) return gptoss.lora(m, { layers = v }) end, opt = true },
    { "gptoss.lora", "layers[1]", "int", function(v) return gptoss.lora(m, { layers = { v } }) end, no_nil = true,
      bad = { { -1, "-1" } } },
    { "model:lora_backward", "adapter", "udata", function(v) return m:lora_backward(v, { 1, 2 }) end },
    { "model:lora_backward", "ids", "ids", function(v) return m:lora_backward(a, v) end },
    { "model:lora_backward", "mask", "table", function(v) return m:lora_backward(a, { 1, 2 }, v) end, opt = true },
    { "model:lora_backward", "mask[1]", "any", function(v) return m:lora_backward(a, { 1, 2 }, { v, true }) end,
      bad = { { "yes", "yes" }, { {}, "table" } } },
    { "model:merge", "adapter", "udata", function(v) return m:merge(v, H.tmpdir() .. "/merged") end },
    { "model:merge", "out_dir", "str", function(v) return m:merge(a, v) end },
    { "model:merge", "threads", "int", function(v) return m:merge(a, H.tmpdir() .. "/merged", v) end, opt = true },

    -- the serving engine
    { "gptoss.engine", "model", "udata", function(v) return gptoss.engine(v) end },
    { "gptoss.engine", "opts", "table", function(v) return gptoss.engine(m, v) end, opt = true },
    { "gptoss.engine", "max_batch", "int", function(v) return gptoss.engine(m, { max_batch = v }) end, opt = true,
      bad = { { -1, "-1" } } },
    { "gptoss.engine", "max_queue", "int", function(v) return gptoss.engine(m, { max_queue = v }) end, opt = true,
      bad = { { -1, "-1" } } },
    { "gptoss.engine", "chunk_tokens", "int", function(v) return gptoss.engine(m, { chunk_tokens = v }) end, opt = true },
    { "gptoss.engine", "context", "int", function(v) return gptoss.engine(m, { context = v }) end, opt = true },
    { "gptoss.engine", "rewind", "int", function(v) return gptoss.engine(m, { rewind = v }) end, opt = true },
    { "gptoss.engine", "prefix_cache", "int", function(v) return gptoss.engine(m, { prefix_cache = v }) end, opt = true },
    { "gptoss.engine", "memory", "num", function(v) return gptoss.engine(m, { memory = v }) end, opt = true,
      bad = { { -1, "-1" }, { 0.5, "0.5" } } },
    { "eng:submit", "ids", "ids", function(v) return eng:submit(v) end },
    { "eng:submit", "opts", "table", function(v) return eng:submit({ 1 }, v) end, opt = true },
    { "eng:submit", "max_tokens", "int", function(v) return eng:submit({ 1 }, { max_tokens = v }) end, opt = true,
      bad = { { 0, "0" } } },
    { "eng:submit", "priority", "int", function(v) return eng:submit({ 1 }, { priority = v }) end, opt = true },
    { "eng:submit", "temperature", "num", function(v) return eng:submit({ 1 }, { temperature = v }) end, opt = true },
    { "eng:submit", "adapter", "udata", function(v) return eng:submit({ 1 }, { adapter = v }) end, opt = true },
    { "eng:generate", "ids", "ids", function(v) return eng:generate(v) end },
    { "eng:generate", "top_k", "int", function(v) return eng:generate({ 1 }, { top_k = v }) end, opt = true },
    { "eng:wait", "timeout", "num", function(v) return eng:wait(v) end, opt = true, inf = true, bad = { { -1, "-1" } } },
    { "req:wait", "timeout", "num", function(v) return req:wait(v) end, opt = true, inf = true, bad = { { -0.5, "-0.5" } } },

    -- generation, in Lua; the sampler's options are checked by gptoss.sampler under the caller's name
    { "model:generate", "ids", "ids", function(v) return m:generate(v) end },
    { "model:generate", "ids[1]", "int", function(v) return m:generate({ v }) end, no_nil = true },
    { "model:generate", "opts", "table", function(v) return m:generate({ 1 }, v) end, opt = true },
    { "model:generate", "max_tokens", "int", function(v) return m:generate({ 1 }, { max_tokens = v }) end, opt = true,
      bad = { { 0, "0" } } },
    { "model:generate", "seed", "int", function(v) return m:generate({ 1 }, { seed = v }) end, opt = true, bad = { { -1, "-1" } } },
    { "model:generate", "temperature", "num", function(v) return m:generate({ 1 }, { temperature = v }) end, opt = true,
      bad = { { -1, "-1" } } },
    { "model:generate", "top_k", "int", function(v) return m:generate({ 1 }, { top_k = v }) end, opt = true },
    { "model:generate", "top_p", "num", function(v) return m:generate({ 1 }, { top_p = v }) end, opt = true, bad = { { 0, "0" } } },
    { "model:generate", "min_p", "num", function(v) return m:generate({ 1 }, { min_p = v }) end, opt = true, bad = { { 2, "2" } } },
    { "model:generate", "repetition_penalty", "num", function(v) return m:generate({ 1 }, { repetition_penalty = v }) end, opt = true },
    { "model:generate", "presence_penalty", "num", function(v) return m:generate({ 1 }, { presence_penalty = v }) end, opt = true },
    { "model:generate", "frequency_penalty", "num", function(v) return m:generate({ 1 }, { frequency_penalty = v }) end, opt = true },
    { "model:generate", "penalty_window", "int", function(v) return m:generate({ 1 }, { penalty_window = v }) end, opt = true },
    { "model:generate", "logit_bias", "table", function(v) return m:generate({ 1 }, { logit_bias = v }) end, opt = true },
    { "model:generate", "logit_bias key", "int", function(v) return m:generate({ 1 }, { logit_bias = { [v] = 1 } }) end,
      no_nil = true, no_nan = true },
    { "model:generate", "logit_bias[3]", "num", function(v) return m:generate({ 1 }, { logit_bias = { [3] = v } }) end,
      opt = true, inf = true },
    { "model:generate", "stop", "any", function(v) return m:generate({ 1 }, { stop = v }) end,
      bad = { { "", "" }, { 5, "5" }, { true, "boolean" } } },
    { "model:generate", "stop[1]", "any", function(v) return m:generate({ 1 }, { stop = { v } }) end, bad = { { 5, "5" } } },
    { "model:generate", "stop_tokens", "ids", function(v) return m:generate({ 1 }, { stop_tokens = v }) end, opt = true },
    { "model:generate", "on_token", "func", function(v) return m:generate({ 1 }, { on_token = v }) end, opt = true },
    { "model:generate", "session", "udata", function(v) return m:generate({ 1 }, { session = v }) end, opt = true },
    { "model:generate", "adapter", "udata", function(v) return m:generate({ 1 }, { adapter = v }) end, opt = true },
    { "model:stream", "ids", "ids", function(v) return m:stream(v) end },
    { "model:stream", "top_p", "num", function(v) return m:stream({ 1 }, { top_p = v }) end, opt = true },
    { "model:generate_batch", "prompts", "table", function(v) return m:generate_batch(v) end },
    { "model:generate_batch", "prompts[1]", "ids", function(v) return m:generate_batch({ v }) end, no_nil = true },
    { "model:generate_batch", "adapter[1]", "udata", function(v) return m:generate_batch({ { 1 } }, { adapter = { v } }) end,
      no_nil = true },
    { "model:generate_batch", "seed", "int", function(v) return m:generate_batch({ { 1 } }, { seed = v }) end, opt = true },
    { "model:loss", "ids", "ids", function(v) return m:loss(v) end },
    { "model:perplexity", "x", "any", function(v) return m:perplexity(v) end, bad = { { 5, "5" }, { true, "boolean" } } },
    { "model:trace_experts", "ids", "ids", function(v) return m:trace_experts(v) end },
    { "gptoss.chat", "model", "udata", function(v) return gptoss.chat(v, {}) end },
    { "gptoss.chat", "messages", "table", function(v) return gptoss.chat(m, v) end },
    { "gptoss.chat", "opts", "table", function(v) return gptoss.chat(m, {}, v) end, opt = true },
    { "gptoss.chat", "on_delta", "func", function(v) return gptoss.chat(m, {}, { on_delta = v }) end, opt = true },
    { "gptoss.chat", "prefill", "table", function(v) return gptoss.chat(m, {}, { prefill = v }) end, opt = true },
    { "gptoss.chat", "prefill.channel", "str", function(v) return gptoss.chat(m, {}, { prefill = { channel = v } }) end, opt = true },
    { "gptoss.chat", "max_tokens", "int", function(v) return gptoss.chat(m, {}, { max_tokens = v }) end, opt = true },
    -- the sampler's options reach gptoss.sampler after rendering: a model with a tokenizer
    { "gptoss.chat", "top_p", "num", function(v) return gptoss.chat(mt, {}, { top_p = v }) end, opt = true },
    { "gptoss.chat", "logit_bias", "table", function(v) return gptoss.chat(mt, {}, { logit_bias = v }) end, opt = true },

    -- training, in Lua
    { "gptoss.train", "model", "udata", function(v) return gptoss.train(v, a, { data = {} }) end },
    { "gptoss.train", "lora", "udata", function(v) return gptoss.train(m, v, { data = {} }) end },
    { "gptoss.train", "opts", "table", function(v) return gptoss.train(m, a, v) end, opt = true },
    { "gptoss.train", "steps", "int", function(v) return gptoss.train(m, a, { data = {}, steps = v }) end, opt = true,
      bad = { { 0, "0" } } },
    { "gptoss.train", "batch", "int", function(v) return gptoss.train(m, a, { data = {}, batch = v }) end, opt = true },
    { "gptoss.train", "warmup", "int", function(v) return gptoss.train(m, a, { data = {}, warmup = v }) end, opt = true },
    { "gptoss.train", "seed", "int", function(v) return gptoss.train(m, a, { data = {}, seed = v }) end, opt = true },
    { "gptoss.train", "lr", "num", function(v) return gptoss.train(m, a, { data = {}, lr = v }) end, opt = true },
    { "gptoss.train", "epochs", "num", function(v) return gptoss.train(m, a, { data = {}, epochs = v }) end, opt = true,
      bad = { { 0, "0" } } },
    { "gptoss.train", "betas", "table", function(v) return gptoss.train(m, a, { data = {}, betas = v }) end, opt = true },
    { "gptoss.train", "betas[1]", "num", function(v) return gptoss.train(m, a, { data = {}, betas = { v, 0.9 } }) end },
    { "gptoss.train", "schedule", "any", function(v) return gptoss.train(m, a, { data = {}, schedule = v }) end,
      bad = { { "step", "step" }, { 1, "1" } } },
    { "gptoss.train", "data", "any", function(v) return gptoss.train(m, a, { data = v }) end, bad = { { 5, "5" } } },
    { "gptoss.train", "on_step", "func", function(v) return gptoss.train(m, a, { data = {}, on_step = v }) end, opt = true },
    { "gptoss.train", "group_by_length", "bool", function(v) return gptoss.train(m, a, { data = {}, group_by_length = v }) end,
      opt = true },
    { "gptoss.train", "loss_on", "any", function(v) return gptoss.train(m, a, { data = {}, loss_on = v }) end,
      bad = { { "users", "users" } } },
    { "train.evaluate", "lora", "udata", function(v) return train.evaluate(m, v, {}) end },

    -- harmony
    { "harmony: render", "conv", "any", function(v) return harmony.render_text(v) end, bad = { { 3, "3" }, { "x", "x" } } },
    { "harmony: render", "system.reasoning", "any", function(v) return harmony.render_text { system = { reasoning = v } } end,
      bad = { { 5, "5" }, { {}, "table" } } },
    { "harmony: render", "system.tools[1]", "any", function(v) return harmony.render_text { system = { tools = { v } } } end,
      bad = { { 5, "5" }, { true, "boolean" } } },
    { "harmony: render", "developer.instructions", "str", function(v) return harmony.render_text { developer = { instructions = v } } end,
      opt = true },
    { "harmony: render", "developer.response_formats", "table",
      function(v) return harmony.render_text { developer = { response_formats = v } } end, opt = true },
    { "harmony: render", "prefill", "table", function(v) return harmony.render_text { prefill = v } end, opt = true },
    { "harmony: render", "keep_analysis", "bool", function(v) return harmony.render_text { keep_analysis = v } end, opt = true },
    { "harmony: render", "messages[1]", "table", function(v) return harmony.render_text { messages = { v } } end, no_nil = true },
    { "harmony: render", "tokenizer", "udata", function(v) return harmony.render({ messages = {} }, v) end, opt = true },
    { "harmony: units", "text", "str", function(v) return harmony.units(v) end },
    { "harmony: schema_to_typescript", "schema", "any", function(v) return harmony.schema_to_typescript(v) end,
      bad = { { 5, "5" }, { true, "boolean" } } },
    { "harmony: stream_parser", "opts", "table", function(v) return harmony.stream_parser(v) end, opt = true },
    { "harmony: stream_parser", "strict", "bool", function(v) return harmony.stream_parser { strict = v } end, opt = true },
    { "harmony: stream_parser", "role", "any", function(v) return harmony.stream_parser { role = v } end,
      bad = { { "bot", "bot" }, { 1, "1" } } },
    { "harmony: stream_parser", "tokenizer", "udata", function(v) return harmony.stream_parser { tokenizer = v } end, opt = true },
    { "harmony: stream_parser", "on_message", "func", function(v) return harmony.stream_parser { on_message = v } end, opt = true },
    { "harmony: process_text", "text", "str", function(v) return harmony.stream_parser():process_text(v) end },
    { "harmony: process_unit", "u", "any", function(v) return harmony.stream_parser():process_unit(v) end,
      bad = { { 5, "5" }, { {}, "table" } } },
    { "harmony: process", "id", "int", function(v) return harmony.stream_parser { tokenizer = tok }:process(v) end,
      bad = { { -1, "-1" } } },
    { "harmony: parse", "completion", "any", function(v) return harmony.parse(v) end, bad = { { 5, "5" }, { true, "boolean" } } },
    { "harmony: parse", "opts", "table", function(v) return harmony.parse("", v) end, opt = true },
  }

  -- each kind's wrong values, with the text they are quoted as
  local function wrong(case)
    local kind, out = case[3], {}
    local function add(v, q) out[#out + 1] = { v, q } end
    if not case.opt and not case.no_nil and kind ~= "any" then add(nil, "nil") end
    if kind == "int" or kind == "num" then
      add({}, "table")
      add("7", "7")
      if not case.no_nan then add(0 / 0, "%-?nan") end
      if not case.inf then add(math.huge, "inf"); add(-math.huge, "%-inf") end
    end
    if kind == "int" then
      add(2.5, "2%.5"); add(0.1, "0%.1"); add(2 ^ 64, "1%.8446744073709552e%+19")
    elseif kind == "str" then add(true, "boolean"); add(7, "7"); add({}, "table")
    elseif kind == "bool" then add(1, "1"); add("yes", "yes")
    elseif kind == "func" then add(5, "5"); add({}, "table")
    elseif kind == "table" or kind == "ids" then add(5, "5"); add("x", "x"); add(true, "boolean")
    elseif kind == "udata" then
      add({}, "table"); add(5, "5")
      -- a userdata of another type (Floats; a session where Floats is wanted)
      if case.other == "session" then add(s, "gptoss%.Session") else add(f, "gptoss%.Floats") end
    end
    for _, b in ipairs(case.bad or {}) do add(b[1], esc(b[2])) end
    return out
  end

  for _, case in ipairs(oracle) do
    local fn, param, kind, call = case[1], case[2], case[3], case[4]
    local head = esc(fn .. ": " .. param .. " must be ")
    it(fn .. " names " .. param .. " (" .. kind .. ") and quotes what it was given", function()
      for _, w in ipairs(wrong(case)) do
        raises(function() call(w[1]) end, head .. ".*%(got " .. w[2] .. "%)$")
      end
    end)
  end

  it("says what each kind wants, in the same words from C and from Lua", function()
    raises(function() s:rewind(2 ^ 53) end, "s:rewind: pos must be an integer in 0%.%.2147483647 %(got 9007199254740992%)$")
    raises(function() s:rewind(-1) end, "s:rewind: pos must be an integer in 0%.%.2147483647 %(got %-1%)$")
    raises(function() f:get(3, 1) end, "f:get: row must be an integer in 1%.%.2 %(got 3%)$")
    raises(function() f:nll(1, 3) end, "f:nll: id must be an integer in 0%.%.2 %(got 3%)$")
    -- numbers: finite, in an interval, with or without its bounds
    local c = {
      { function() gptoss.sampler(1000, { temperature = math.huge }) end, "gptoss.sampler: temperature must be a finite number >= 0 (got inf)" },
      { function() m:generate({ 1 }, { top_p = 0 }) end, "model:generate: top_p must be a number in (0, 1] (got 0)" },
      { function() m:generate({ 1 }, { temperature = -1 }) end, "model:generate: temperature must be a finite number >= 0 (got -1)" },
      { function() m:generate({ 1 }, { max_tokens = math.huge }) end, "model:generate: max_tokens must be an integer in 1..2147483647 (got inf)" },
      { function() m:generate({ 1 }, { logit_bias = { [3] = 0 / 0 } }) end, "model:generate: logit_bias[3] must be a number, not NaN (got " },
      { function() m:generate({ 1 }, { logit_bias = { [1000] = 1 } }) end, "model:generate: logit_bias key must be an integer in 0..999 (got 1000)" },
      { function() gptoss.chat(mt, {}, { temperature = -2 }) end, "gptoss.chat: temperature must be a finite number >= 0 (got -2)" },
      { function() eng:submit({ 1 }, { min_p = 2 }) end, "eng:submit: min_p must be a number in [0, 1] (got 2)" },
      { function() a:step { betas = { 0.9, 1 } } end, "lora:step: betas[2] must be a number in [0, 1) (got 1)" },
      { function() gptoss.lora(m, { dropout = 1 }) end, "gptoss.lora: dropout must be a number in [0, 1) (got 1)" },
      { function() gptoss.engine(m, { memory = -1 }) end, "gptoss.engine: memory must be a whole number in [0, 9007199254740992] (got -1)" },
      { function() eng:wait(0 / 0) end, "eng:wait: timeout must be a number >= 0 (got " },
      { function() gptoss.train(m, a, { data = {}, betas = { 1, 0.9 } }) end, "gptoss.train: betas[1] must be a number in [0, 1) (got 1)" },
      { function() gptoss.train(m, a, { data = {}, epochs = 0 }) end, "gptoss.train: epochs must be a finite number > 0 (got 0)" },
      { function() s:feed({ 1 }, "most") end, 's:feed: logits must be "last", "all" or "none" (got most)' },
      { function() gptoss.train(m, a, { data = {}, schedule = "step" }) end,
        'gptoss.train: schedule must be "linear", "cosine" or "constant" (got step)' },
      { function() m:session { adapter = f } end, "model:session: adapter must be a gptoss.Adapter (got gptoss.Floats)" },
      { function() m:generate({ 1 }, { adapter = f }) end, "model:generate: adapter must be a gptoss.Adapter (got gptoss.Floats)" },
      { function() gptoss.load(H.micro(), 5) end, "gptoss.load: opts must be a table (got 5)" },
      { function() m:generate({ 1 }, { tempreature = 1 }) end, "model:generate: unknown option 'tempreature'" },
      { function() eng:submit({ 1 }, { session = s }) end, "eng:submit: session is not an option here" },
    }
    for _, x in ipairs(c) do
      local ok, err = pcall(x[1])
      assert.is_false(ok)
      err = tostring(err):gsub("^[^\n]-:%d+: ", "")
      assert.are.equal(x[2], err:sub(1, #x[2]))
    end
  end)

  it("still takes what each check lets through", function()
    assert.is_userdata(gptoss.sampler(1000, { logit_bias = { [5] = math.huge, [6] = -math.huge }, seed = 2 ^ 53 }))
    assert.is_boolean(eng:wait(0))
    assert.is_boolean(req:wait(math.huge))
    local one = m:generate({ 1, 2 }, { max_tokens = 1, seed = 3, temperature = 0.5, top_p = 1, min_p = 0, stop_tokens = {} })
    assert.are.equal(1, #one.ids)
    assert.is_table(harmony.parse("<|start|>user<|message|>hi<|end|>"))
  end)
end)
