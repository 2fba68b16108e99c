--- Shared by the specs: temporary directories, generated checkpoints and
-- hand-assembled safetensors bytes (built here from the format's definition,
-- not by the writer under test).
local H = {}

local lfs = require "lfs"

--- the interpreter running the specs, for specs that start tools
H.lua = jit and "luajit" or "lua5.4"

H.tokenizer_dir = os.getenv("GPTOSS_TOKENIZER_DIR") or "tokenizer"

-- removes the specs' temporary tree when the interpreter closes (busted
-- exits through os.exit(code, true), which runs finalizers), so that a run
-- leaves nothing in /tmp; GPTOSS_SPEC_KEEP=1 keeps it for a look
local function remove_at_exit(path)
  if os.getenv("GPTOSS_SPEC_KEEP") == "1" then return end
  -- rm(1), not lfs: LuaJIT cannot make lfs.dir's finalized iterators while it closes
  local function gone() os.execute("rm -rf '" .. path:gsub("'", "'\\''") .. "'") end
  if newproxy then   -- Lua 5.1 / LuaJIT: only userdata have finalizers
    local p = newproxy(true)
    getmetatable(p).__gc = gone
    H._tmp_sentinel = p
  else
    H._tmp_sentinel = setmetatable({}, { __gc = gone })
  end
end

local tmp_root
function H.tmpdir()
  if not tmp_root then
    local n = os.tmpname()
    os.remove(n)
    tmp_root = n .. "-gptoss-spec"
    assert(lfs.mkdir(tmp_root))
    remove_at_exit(tmp_root)
  end
  H.counter = (H.counter or 0) + 1
  local d = string.format("%s/%d", tmp_root, H.counter)
  assert(lfs.mkdir(d))
  return d
end

H.rm_tree = require("gptoss.files").rm_tree

function H.read(path)
  local f = assert(io.open(path, "rb"))
  local d = f:read("*a")
  f:close()
  return d
end

function H.write(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

function H.exists(path) return lfs.attributes(path) ~= nil end

function H.files(dir)
  local t = {}
  for e in lfs.dir(dir) do if e ~= "." and e ~= ".." then t[#t + 1] = e end end
  table.sort(t)
  return t
end

function H.copy_dir(src, dst)
  assert(lfs.mkdir(dst))
  for _, e in ipairs(H.files(src)) do H.write(dst .. "/" .. e, H.read(src .. "/" .. e)) end
  return dst
end

--- little-endian unsigned 64-bit integer, for hand-made headers
function H.u64le(n)
  local b = {}
  for i = 1, 8 do b[i] = string.char(n % 256); n = math.floor(n / 256) end
  return table.concat(b)
end

--- a safetensors file: 8-byte length, header text, data
function H.st_bytes(header, data)
  return H.u64le(#header) .. header .. (data or "")
end

--- bytes of float32 values (IEEE 754 little-endian), written out by hand
function H.f32le(values)
  local out = {}
  for i, v in ipairs(values) do
    local sign = 0
    if v < 0 or (v == 0 and 1 / v < 0) then sign = 1; v = -v end
    local bits
    if v == 0 then bits = 0
    else
      -- normal numbers only: v = m * 2^e with 1 <= m < 2
      local e = math.floor(math.log(v) / math.log(2))
      local m = v / 2 ^ e
      if m >= 2 then m = m / 2; e = e + 1 elseif m < 1 then m = m * 2; e = e - 1 end
      bits = (e + 127) * 2 ^ 23 + math.floor((m - 1) * 2 ^ 23 + 0.5)
    end
    bits = bits + sign * 2 ^ 31
    local s = {}
    for k = 1, 4 do s[k] = string.char(bits % 256); bits = math.floor(bits / 256) end
    out[i] = table.concat(s)
  end
  return table.concat(out)
end

--- generated checkpoints, written once per process
local cache = {}
function H.checkpoint(name, opts)
  if cache[name] then return cache[name] end
  local checkpoint = require "gptoss.checkpoint"
  opts = opts or {}
  opts.out = H.tmpdir() .. "/" .. name
  if opts.tokenizer == nil then opts.tokenizer = H.tokenizer_dir end
  assert(checkpoint.write(opts))
  cache[name] = opts.out
  return opts.out
end

--- the tiny preset, as tests and the parity fixtures use it (seed 1)
function H.tiny() return H.checkpoint("tiny", { preset = "tiny", seed = 1 }) end

--- the tiny preset with gpt-oss-120b's 128 experts, 4 a token (seed 2): the
-- parity fixture's model (tools/reference/device_round8.sh)
function H.tiny128()
  return H.checkpoint("tiny128", { preset = "tiny", seed = 2, overrides = { num_local_experts = 128, num_experts_per_tok = 4 } })
end

--- n token ids of prompt k, different for each k: (i * a + k * b) % 5000 + 100
function H.prompt(k, n, a, b)
  local ids = {}
  for i = 1, n do ids[i] = (i * a + k * b) % 5000 + 100 end
  return ids
end

--- a very small model with a 1000-token vocabulary and no tokenizer, for
-- tests that copy and corrupt a whole checkpoint
function H.micro()
  return H.checkpoint("micro", { preset = "tiny", seed = 7, tokenizer = false,
                                 overrides = { vocab_size = 1000, num_hidden_layers = 2 } })
end

function H.cleanup()
  if tmp_root then H.rm_tree(tmp_root) end
end

--- relative L2 error ||a - b|| / ||b|| over two arrays of numbers
function H.rel_l2(a, b)
  local num, den = 0, 0
  for i = 1, #b do
    local d = a[i] - b[i]
    num = num + d * d
    den = den + b[i] * b[i]
  end
  return math.sqrt(num) / math.sqrt(den)
end

-- PEFT's tensor names; with target_parameters {gate_up_proj, down_proj},
-- gate_up is wrapped first and so sits one base_layer deeper
function H.peft_lora_name(l, p, w)
  if p == "gate_up" then return string.format("base_model.model.model.layers.%d.mlp.experts.base_layer.lora_%s.weight", l, w)
  elseif p == "down" then return string.format("base_model.model.model.layers.%d.mlp.experts.lora_%s.weight", l, w) end
  return string.format("base_model.model.model.layers.%d.self_attn.%s_proj.lora_%s.weight", l, p, w)
end
-- a generated model with a vocabulary of 128 and hidden 128, so that logits
-- can separate (a 201k vocabulary over a 64-wide random model cannot go
-- below a loss of ~12)
function H.v128(opts)
  local dir = H.checkpoint("v128", { preset = "tiny", seed = 3, tokenizer = false,
                                     overrides = { vocab_size = 128, hidden_size = 128 } })
  return assert(require("gptoss").load(dir, opts or { tokenizer = false }))
end

-- a gptoss float matrix's entries, row by row, times scale
function H.flat(fl, scale)
  local out, r, c = {}, fl:shape()
  for i = 1, r do for j = 1, c do out[#out + 1] = fl:get(i, j) * (scale or 1) end end
  return out
end

-- a LoRA training fixture of tools/reference/peft_train.py: the safetensors
-- file, its ids, and the loss mask (labels -100 are not targets)
function H.lora_fixture(run)
  local fx = assert(require("gptoss").safetensors("spec/fixtures/lora/" .. run .. ".safetensors"))
  local mask = {}
  for i, l in ipairs(fx:numbers("labels")) do mask[i] = l ~= -100 end
  return fx, fx:numbers("ids"), mask
end

-- The adapter's gradients (of the loss summed over n targets) against
-- PEFT's (of the mean) in fx, for modules mods of layers 0-3: a list of
-- { layer, module, "A" | "B", relative L2 }
function H.peft_grad_errors(a, fx, mods, n)
  local out = {}
  for l = 0, 3 do
    for _, p in ipairs(mods) do
      local x = a:module(l, p)
      for _, w in ipairs { "A", "B" } do
        out[#out + 1] = { l, p, w, H.rel_l2(H.flat(x["g" .. w], 1 / n), H.flat(fx:floats("grad." .. H.peft_lora_name(l, p, w)))) }
      end
    end
  end
  return out
end

-- each of those within tol; returns the worst
function H.check_peft_grads(a, fx, mods, n, tol)
  local worst = 0
  for _, e in ipairs(H.peft_grad_errors(a, fx, mods, n)) do
    worst = math.max(worst, e[4])
    assert(e[4] <= tol, string.format("layer %d %s lora_%s: relative L2 %.3g", e[1], e[2], e[3], e[4]))
  end
  return worst
end

-- the 3 ten-token sequences (vocabulary 128) the overfitting specs learn
function H.overfit_data()
  local data = {}
  for k = 1, 3 do
    local ids = {}
    for i = 1, 10 do ids[i] = (i * 37 + k * 11) % 128 end
    data[k] = { ids = ids }
  end
  return data
end

-- worst relative L2 over positions between logits and a PEFT fixture's
-- subset (tools/reference/peft_lora.py), and whether every row's argmax agrees
function H.compare_peft_logits(logits, fx, prefix)
  prefix = prefix or ""
  local subset, ref, argmax = fx:numbers("subset_ids"), fx:floats(prefix .. "logits_subset"), fx:numbers(prefix .. "argmax")
  local worst, same = 0, true
  for t = 1, #argmax do
    local mine = {}
    for j, id in ipairs(subset) do mine[j] = logits:get(t, id + 1) end
    worst = math.max(worst, H.rel_l2(mine, ref:row(t)))
    same = same and argmax[t] == (logits:argmax(t))
  end
  return worst, same
end

-- every position's logits of ids in a fresh session with the adapter (or none)
function H.session_logits(m, ids, adapter)
  local s = m:session { adapter = adapter }
  local l = s:feed(ids, "all")
  s:close()
  return l
end

--- a generation's bytes without its stop token (r: generate's result)
function H.reply_bytes(model, r)
  local ids = {}
  for i, id in ipairs(r.ids) do ids[i] = id end
  if r.finish_reason == "stop" then ids[#ids] = nil end
  return model.tokenizer:decode_bytes(ids)
end

--- the bytes of a checkpoint's tensors, summed from its safetensors headers
-- (gptoss.safetensors: the reader, not the loader)
function H.tensor_bytes(dir)
  local gptoss = require "gptoss"
  local total = 0
  for _, f in ipairs(H.files(dir)) do
    if f:match("%.safetensors$") then
      local st = assert(gptoss.safetensors(dir .. "/" .. f))
      for _, t in ipairs(st:tensors()) do total = total + t.bytes end
      st:close()
    end
  end
  return total
end

-- poll(2) through a tiny helper built for the running interpreter
-- (spec/support/fdpoll.c): H.fdpoll().readable(fd, timeout_ms)
local fdpoll
function H.fdpoll()
  if fdpoll then return fdpoll end
  local so = H.tmpdir() .. "/fdpoll.so"
  local inc = jit and "/usr/include/luajit-2.1" or "/usr/include/lua5.4"
  -- (without a preloaded sanitizer, which would report the compiler's own leaks)
  local ok = os.execute(string.format("env -u LD_PRELOAD cc -shared -fPIC -O1 -I%s -o %s spec/support/fdpoll.c", inc, so))
  assert(ok == true or ok == 0, "cannot build spec/support/fdpoll.c")
  fdpoll = assert(package.loadlib(so, "luaopen_fdpoll"))()
  return fdpoll
end

return H
