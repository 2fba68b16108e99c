-- CPU backend against Hugging Face transformers (float32), on the tiny
-- checkpoint (seed 1; sliding window 16 < the 70-token prompt) and on a
-- tiny one with gpt-oss-120b's 128 experts (seed 2, 4 a token). The
-- fixtures come from tools/reference/transformers_logits.py run on the
-- device (device_round8.sh made the 128-expert one).
local H = require "helpers"
local gptoss = require "gptoss"

local CASES = {
  { what = "the tiny checkpoint", fixture = "spec/fixtures/parity/tiny_seed1.safetensors", dir = H.tiny, experts = 8 },
  { what = "a tiny checkpoint of 128 experts", fixture = "spec/fixtures/parity/tiny128_seed2.safetensors", dir = H.tiny128,
    experts = 128 },
}

for _, case in ipairs(CASES) do
describe("CPU forward pass vs transformers, " .. case.what, function()
  local m, fx, prompt, logits
  setup(function()
    m = assert(gptoss.load(case.dir()))
    assert.are.equal(case.experts, m.config.num_local_experts)
    fx = assert(gptoss.safetensors(case.fixture))
    prompt = fx:numbers("prompt_ids")
    logits = m:logits(prompt)
  end)
  teardown(function() m:close(); fx:close() end)

  it("uses a prompt of at least 48 tokens, longer than the sliding window", function()
    assert.is_true(#prompt >= 48)
    assert.is_true(#prompt > m.config.sliding_window)
    -- the reference tokenized it with tiktoken; ours must agree
    local text = m.tokenizer:decode(prompt)
    assert.are.same(prompt, m.tokenizer:encode(text, { allowed_special = "all" }))
  end)

  it("matches the logits with a relative L2 error under 1e-4 at every position", function()
    -- a uniform sample of 4096 vocabulary columns (plus each row's argmax),
    -- and the full rows' norms and argmax
    local subset = fx:numbers("subset_ids")
    local ref = fx:floats("logits_subset")
    local norms = fx:numbers("logits_norm")
    local argmax = fx:numbers("argmax")
    local worst = 0
    for t = 1, #prompt do
      local mine = {}
      for j, id in ipairs(subset) do mine[j] = logits:get(t, id + 1) end
      local err = H.rel_l2(mine, ref:row(t))
      worst = math.max(worst, err)
      assert.is_true(err < 1e-4, string.format("position %d: relative L2 %.3g", t, err))
      local n2 = 0
      for _, v in ipairs(logits:row(t)) do n2 = n2 + v * v end
      assert.is_true(math.abs(math.sqrt(n2) - norms[t]) / norms[t] < 1e-5, "norm at position " .. t)
      assert.are.equal(argmax[t], (logits:argmax(t)))
    end
    print(string.format("\n  parity: worst relative L2 over %d positions: %.3g", #prompt, worst))
  end)

  it("continues greedily with the same 32 tokens", function()
    local r = m:generate(prompt, { temperature = 0, max_tokens = 32, stop_tokens = {} })
    assert.are.same(fx:numbers("greedy_ids"), r.ids)
  end)

  it("routes every token of every layer to the same experts with the same weights", function()
    local tr = m:trace_experts(prompt)
    local top, w = fx:numbers("router_top"), fx:numbers("router_w")
    local L, T, K = m.config.num_hidden_layers, #prompt, m.config.num_experts_per_tok
    for l = 1, L do
      for t = 1, T do
        local e = tr[l][t]
        for k = 1, K do
          local at = ((l - 1) * T + (t - 1)) * K + k
          assert.are.equal(top[at], e.experts[k])
          assert.is_true(math.abs(w[at] - e.weights[k]) < 1e-4)
        end
      end
    end
  end)
end)
end
