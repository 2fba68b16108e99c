-- Samplers against their definitions: fixed seeds, many draws, empirical
-- frequencies compared with distributions computed here in Lua.
local H = require "helpers"
local gptoss = require "gptoss"

local function logits_of(values) return gptoss.floats(H.f32le(values), 1, #values) end

local LOGITS = { 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0 }
local N = 20000

local function softmax(l, t)
  local mx = -math.huge
  for _, v in ipairs(l) do mx = math.max(mx, v / t) end
  local p, s = {}, 0
  for i, v in ipairs(l) do p[i] = math.exp(v / t - mx); s = s + p[i] end
  for i = 1, #p do p[i] = p[i] / s end
  return p
end

local function draw(opts, logits, history, n)
  local smp = gptoss.sampler(#logits, opts)
  local f = logits_of(logits)
  local counts = {}
  for i = 0, #logits - 1 do counts[i] = 0 end
  for _ = 1, n or N do
    local id = smp:sample(f, 1, history)
    counts[id] = counts[id] + 1
  end
  return counts
end

-- every empirical frequency within 4.5 standard errors of the expected one
local function matches(counts, p, n)
  n = n or N
  for i, pi in ipairs(p) do
    local got = counts[i - 1] / n
    local se = math.sqrt(math.max(pi * (1 - pi), 1e-9) / n)
    assert.is_true(math.abs(got - pi) <= 4.5 * se + 1e-9,
      string.format("token %d: frequency %.4f, expected %.4f", i - 1, got, pi))
  end
end

describe("sampler", function()
  it("is greedy at temperature 0, ties going to the lowest id", function()
    for seed = 1, 20 do
      local l = {}
      local rnd = seed * 7919
      for i = 1, 50 do rnd = (rnd * 1103515245 + 12345) % 2147483648; l[i] = (rnd % 1000) / 100 end
      local best = 1
      for i = 2, #l do if l[i] > l[best] then best = i end end
      assert.are.equal(best - 1, gptoss.sampler(#l, { temperature = 0 }):sample(logits_of(l)))
    end
    assert.are.equal(1, gptoss.sampler(3, { temperature = 0 }):sample(logits_of { 0, 5, 5 }))
  end)

  it("samples softmax(logits / T) at temperature T", function()
    for _, t in ipairs { 1.0, 0.5, 2.0 } do
      matches(draw({ temperature = t, seed = 11 }, LOGITS), softmax(LOGITS, t))
    end
  end)

  it("keeps only the top k, renormalised", function()
    local p = softmax({ 2.0, 1.5, 1.0 }, 1)
    for i = 4, #LOGITS do p[i] = 0 end
    matches(draw({ top_k = 3, seed = 12 }, LOGITS), p)
  end)

  it("never leaves the top-p nucleus, and samples it renormalised", function()
    -- sorted probabilities of LOGITS at T=1: the nucleus for 0.8 is the
    -- smallest prefix whose mass reaches 0.8
    local p = softmax(LOGITS, 1)
    local cum, k = 0, 0
    repeat k = k + 1; cum = cum + p[k] until cum >= 0.8
    local want = {}
    for i = 1, #p do want[i] = i <= k and p[i] / cum or 0 end
    matches(draw({ top_p = 0.8, seed = 13 }, LOGITS), want)
    -- with a flat tail over a large vocabulary too
    local big = {}
    for i = 1, 5000 do big[i] = (i <= 3) and 5 or 0 end
    local pb = softmax(big, 1)
    local counts = draw({ top_p = 0.9, seed = 14 }, big, nil, 3000)
    local mass, nucleus = 0, 0
    repeat nucleus = nucleus + 1; mass = mass + pb[nucleus] until mass >= 0.9
    for id, c in pairs(counts) do
      if c > 0 then assert.is_true(id + 1 <= nucleus, "token " .. id .. " is outside the nucleus of " .. nucleus) end
    end
  end)

  it("drops tokens under min_p times the top probability", function()
    local p = softmax(LOGITS, 1)
    local want = {}
    local s = 0
    for i = 1, #p do want[i] = p[i] >= 0.3 * p[1] and p[i] or 0; s = s + want[i] end
    for i = 1, #p do want[i] = want[i] / s end
    matches(draw({ min_p = 0.3, seed = 15 }, LOGITS), want)
  end)

  it("applies the repetition, presence and frequency penalties over the window", function()
    local history = { 0, 0, 2, 7, 7, 7 }
    -- repetition 1.5: positive logits divided, negative multiplied (CTRL)
    local l = {}
    for i, v in ipairs(LOGITS) do l[i] = v end
    l[1], l[3], l[8] = l[1] / 1.5, l[3] / 1.5, l[8] * 1.5
    matches(draw({ repetition_penalty = 1.5, seed = 16 }, LOGITS, history), softmax(l, 1))
    -- presence 0.5 once per seen token, frequency 0.25 per occurrence
    for i, v in ipairs(LOGITS) do l[i] = v end
    l[1] = l[1] - 0.5 - 0.25 * 2
    l[3] = l[3] - 0.5 - 0.25 * 1
    l[8] = l[8] - 0.5 - 0.25 * 3
    matches(draw({ presence_penalty = 0.5, frequency_penalty = 0.25, seed = 17 }, LOGITS, history), softmax(l, 1))
    -- a window of 3 sees only the last three tokens (7, 7, 7)
    for i, v in ipairs(LOGITS) do l[i] = v end
    l[8] = l[8] - 0.5 - 0.25 * 3
    matches(draw({ presence_penalty = 0.5, frequency_penalty = 0.25, penalty_window = 3, seed = 18 }, LOGITS, history), softmax(l, 1))
  end)

  it("adds logit biases by id: a large negative bias bans, a large positive one forces", function()
    local counts = draw({ logit_bias = { [0] = -1000 }, seed = 19 }, LOGITS, nil, 5000)
    assert.are.equal(0, counts[0])
    counts = draw({ logit_bias = { [7] = 1000 }, seed = 20 }, LOGITS, nil, 500)
    assert.are.equal(500, counts[7])
    local l = {}
    for i, v in ipairs(LOGITS) do l[i] = v end
    l[4] = l[4] + 1.25
    matches(draw({ logit_bias = { [3] = 1.25 }, seed = 21 }, LOGITS), softmax(l, 1))
  end)

  it("is reproducible with a seed and differs between seeds", function()
    local function seq(seed)
      local smp, f, out = gptoss.sampler(#LOGITS, { seed = seed }), logits_of(LOGITS), {}
      for i = 1, 200 do out[i] = smp:sample(f) end
      return out
    end
    assert.are.same(seq(42), seq(42))
    assert.are_not.same(seq(42), seq(43))
  end)

  it("rejects invalid options with a message naming the option", function()
    local V = #LOGITS
    local bad = {
      { { temperature = -0.5 }, "temperature must be a finite number >= 0 (got -0.5)" },
      { { top_p = 0 }, "top_p must be a number in (0, 1] (got 0)" },
      { { top_p = 1.5 }, "top_p must be a number in (0, 1] (got 1.5)" },
      { { min_p = 2 }, "min_p must be a number in [0, 1] (got 2)" },
      { { top_k = -1 }, "top_k must be an integer in 0..2147483647 (got -1)" },
      { { repetition_penalty = 0 }, "repetition_penalty must be a finite number > 0 (got 0)" },
      { { temp = 1 }, "unknown option 'temp'" },
      { { logit_bias = { [10] = 1 } }, "logit_bias key must be an integer in 0.." .. (V - 1) .. " (got 10)" },
      { { seed = -3 }, "seed must be an integer in 0..9007199254740992 (got -3)" },
      { { top_k = 1.5 }, "top_k must be an integer in 0..2147483647 (got 1.5)" },
    }
    for _, b in ipairs(bad) do
      local ok, err = pcall(gptoss.sampler, V, b[1])
      assert.is_false(ok)
      assert.are.equal("gptoss.sampler: " .. b[2], err)
    end
  end)
end)
