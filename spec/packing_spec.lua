-- Packing (issue 24): several examples in one sequence, each attending
-- within itself from position 0, on the tiny checkpoint on the CPU (and,
-- #gpu, on CUDA against the CPU). The oracle is the examples' backward
-- passes one by one (lora_train_spec checks those against PEFT): the packed
-- pass must give their loss sum, target count and gradient sums. The tiny model's sliding window is 16
-- tokens, so an example of 23 crosses it inside the pack.
local H = require "helpers"
local gptoss = require "gptoss"
local train = require "gptoss.train"

local MODS = { "q", "k", "v", "o", "gate_up", "down" }

local ids_of = require("gptoss.bench").ids

-- every module's A and B (or, with "g", their gradients), flattened
local function tensors(a, g)
  local out = {}
  for l = 0, 3 do
    for _, p in ipairs(MODS) do
      local x = a:module(l, p)
      out[#out + 1] = H.flat(x[(g or "") .. "A"])
      out[#out + 1] = H.flat(x[(g or "") .. "B"])
    end
  end
  return out
end
local function grads(a) return tensors(a, "g") end
local function weights(a) return tensors(a) end

local function worst_rel(a, b)
  local w = 0
  for i = 1, #b do w = math.max(w, H.rel_l2(a[i], b[i])) end
  return w
end

describe("packed examples (CPU)", function()
  local m
  setup(function() m = assert(gptoss.load(H.tiny(), { tokenizer = false })) end)
  teardown(function() m:close() end)

  local EX = { ids_of(9, 1), ids_of(23, 2), ids_of(14, 3) }
  local MASKS = { nil, {}, nil }
  for t = 1, 23 do MASKS[2][t] = t > 6 end   -- a prompt part that is no target
  local function lora() return gptoss.lora(m, { r = 4, alpha = 8, seed = 1, targets = { "attn", "experts" }, init = "random" }) end
  local function packed()
    local ids, mask, starts = {}, {}, {}
    for k, e in ipairs(EX) do
      starts[k] = #ids + 1
      for t, id in ipairs(e) do
        ids[#ids + 1] = id
        mask[#mask + 1] = MASKS[k] == nil or MASKS[k][t]
      end
    end
    return ids, mask, starts
  end

  it("gives the loss, target count and gradients of the examples one by one", function()
    local one = lora()
    local loss1, count1 = 0, 0
    for k, e in ipairs(EX) do
      local l, c = m:lora_backward(one, e, MASKS[k])
      loss1, count1 = loss1 + l, count1 + c
    end
    local pk = lora()
    local ids, mask, starts = packed()
    local loss2, count2 = m:lora_backward(pk, ids, mask, starts)
    assert.are.equal(count1, count2)
    assert.is_true(math.abs(loss2 - loss1) <= 1e-6 * loss1, loss2 .. " against " .. loss1)
    local w = worst_rel(grads(pk), grads(one))
    assert.is_true(w <= 1e-5, "worst relative L2 of the gradients " .. w)
    -- the same tokens concatenated without starts attend across the
    -- examples: the loss differs (so the comparison above can fail)
    local naive = lora()
    local loss3 = m:lora_backward(naive, ids, mask)
    assert.is_true(math.abs(loss3 - loss1) > 1e-3 * loss1)
    one:close(); pk:close(); naive:close()
  end)

  it("refuses bad starts, naming them", function()
    local a = lora()
    local ids = packed()
    assert.has_error(function() m:lora_backward(a, ids, nil, { 2, 10 }) end,
      "model:lora_backward: starts[1] must be 1, where the first example starts (got 2)")
    assert.has_error(function() m:lora_backward(a, ids, nil, { 1, 10, 10 }) end,
      "model:lora_backward: starts[3] (10) must be after starts[2] (10) and at most the 46 ids")
    assert.has_error(function() m:lora_backward(a, ids, nil, { 1, 47 }) end,
      "model:lora_backward: starts[2] (47) must be after starts[1] (1) and at most the 46 ids")
    assert.has_error(function() m:lora_backward(a, ids, nil, {}) end,
      "model:lora_backward: starts is empty (the first example starts at 1)")
    a:close()
  end)

  it("packs as TRL's bfd does: longest first, into the fullest sequence that holds it, never split", function()
    local data = {}
    for k, n in ipairs { 5, 12, 7, 3, 9, 4 } do data[k] = { ids = ids_of(n, k) } end
    local packs = train.pack(data, 16)
    -- by hand: 12 -> A (room 4); 9 -> B (7); 7 -> B (0); 5 -> C (11); 4 -> A (0); 3 -> C (8)
    local lens = {}
    for k, p in ipairs(packs) do
      lens[k] = {}
      for j, s in ipairs(p.starts) do
        local e = (p.starts[j + 1] or #p.ids + 1) - s
        lens[k][j] = e
      end
    end
    assert.same({ { 12, 4 }, { 9, 7 }, { 5, 3 } }, lens)
    assert.same({ 1, 13 }, packs[1].starts)
    assert.is_false(packs[1].mask[1])
    assert.is_false(packs[1].mask[13])   -- an example's first token is no target
    assert.is_true(packs[1].mask[14])
  end)

  it("gptoss.train with packing follows the unpacked run's losses and weights", function()
    local data = { { ids = ids_of(10, 7) }, { ids = ids_of(9, 8), mask = MASKS[2] and nil } }
    local common = { data = data, steps = 3, lr = 1e-2, seed = 5, max_len = 24, group_by_length = false }
    local a, b = lora(), lora()
    local o1 = {}
    for k, v in pairs(common) do o1[k] = v end
    o1.batch = 2
    local r1 = train.train(m, a, o1)
    local o2 = {}
    for k, v in pairs(common) do o2[k] = v end
    o2.batch, o2.packing = 1, true
    local r2 = train.train(m, b, o2)
    assert.are.equal(1, r2.examples)   -- both examples in one packed sequence
    for s = 1, 3 do
      assert.is_true(math.abs(r2.history[s].loss - r1.history[s].loss) <= 1e-5 * r1.history[s].loss,
        string.format("step %d: %.9g against %.9g", s, r2.history[s].loss, r1.history[s].loss))
    end
    local w = worst_rel(weights(b), weights(a))
    assert.is_true(w <= 1e-5, "worst relative L2 of the weights " .. w)
    a:close(); b:close()
  end)

  it("eng:train with packing trains as gptoss.train does", function()
    local data = { { ids = ids_of(10, 7) }, { ids = ids_of(9, 8) }, { ids = ids_of(6, 9) } }
    local o = { data = data, steps = 2, lr = 1e-2, seed = 5, max_len = 20, packing = true }
    local a, b = lora(), lora()
    local r1 = train.train(m, a, o)
    local eng = gptoss.engine(m, { max_batch = 2 })
    finally(function() eng:close() end)
    local t = eng:train(b, o)
    local r2 = assert(t:result())
    -- a train job takes starts; one that only scores refuses them
    local ids = {}
    for i = 1, 12 do ids[i] = 500 + i end
    assert.has_error(function() eng.c:train_job(b, { { ids = ids, starts = { 1, 5 } } }, { loss_only = true }) end,
      "train job: example 1: packed examples (starts) are for training; loss_only scores one sequence an example")
    assert.has_error(function() eng.c:train_job(b, { { ids = ids, starts = { 1, 13 } } }) end,
      "eng:train_job: examples[1].starts[2] (13) must be after examples[1].starts[1] (1) and at most the 12 ids")
    assert.are.equal(2, r1.examples)   -- 10 + 9 in one sequence, 6 in another
    for s = 1, 2 do assert.is_true(math.abs(r2.history[s].loss - r1.history[s].loss) <= 1e-9 * r1.history[s].loss) end
    assert.is_true(worst_rel(weights(b), weights(a)) <= 1e-9)
    a:close(); b:close()
  end)

  it("needs max_len, and refuses a non-boolean", function()
    local a = lora()
    assert.has_error(function() train.train(m, a, { data = { { ids = ids_of(5, 1) } }, steps = 1, packing = true }) end,
      "gptoss.train: packing needs max_len (the length of the packed sequences)")
    assert.has_error(function() train.train(m, a, { data = { { ids = ids_of(5, 1) } }, steps = 1, packing = 1, max_len = 8 }) end)
    a:close()
  end)
end)

-- the CUDA backend's packed pass against the CPU's (the reference above)
-- and against its own passes one by one
describe("packed examples on CUDA #gpu", function()
  it("give the CPU's loss and gradients, and the CUDA passes' one by one", function()
    local cpu = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    local gpu = assert(gptoss.load(H.tiny(), { tokenizer = false, device = "cuda:0" }))
    local opts = { r = 4, alpha = 8, seed = 1, targets = { "attn", "experts" }, init = "random" }
    local EX = { ids_of(9, 1), ids_of(23, 2), ids_of(14, 3) }
    local ids, starts = {}, {}
    for k, e in ipairs(EX) do
      starts[k] = #ids + 1
      for _, id in ipairs(e) do ids[#ids + 1] = id end
    end
    local a, b, c = gptoss.lora(cpu, opts), gptoss.lora(gpu, opts), gptoss.lora(gpu, opts)
    local la, na = cpu:lora_backward(a, ids, nil, starts)
    local lb, nb = gpu:lora_backward(b, ids, nil, starts)
    local lc, nc = 0, 0
    for _, e in ipairs(EX) do
      local l, k = gpu:lora_backward(c, e)
      lc, nc = lc + l, nc + k
    end
    assert.are.equal(na, nb)
    assert.are.equal(na, nc)
    assert.is_true(math.abs(lb - la) <= 1e-5 * la, lb .. " against the CPU's " .. la)
    assert.is_true(math.abs(lb - lc) <= 1e-5 * lc, lb .. " against one by one " .. lc)
    local w1, w2 = worst_rel(grads(b), grads(a)), worst_rel(grads(b), grads(c))
    print(string.format("\n  packed on CUDA: gradients within %.3g of the CPU's, %.3g of one by one", w1, w2))
    assert.is_true(w1 <= 1e-3 and w2 <= 1e-3)
    a:close(); b:close(); c:close(); cpu:close(); gpu:close()
  end)
end)
