-- Training data: JSONL in the messages format (Multilingual-Thinking
-- schema) or raw harmony text, rendered in harmony's training mode, with
-- loss masks by role and channel; bad lines reported by number.
local H = require "helpers"
local gptoss = require "gptoss"
local data = require "gptoss.data"
local harmony = require "gptoss.harmony"

local FILE = "spec/fixtures/lora/train.jsonl"

describe("training data", function()
  local tok
  setup(function() tok = assert(gptoss.tokenizer(H.tokenizer_dir)) end)

  -- the text of the target tokens, as runs joined by "|"
  local function targets(ex)
    local runs, cur = {}, {}
    for i, id in ipairs(ex.ids) do
      if ex.mask[i] then cur[#cur + 1] = id
      elseif #cur > 0 then runs[#runs + 1] = tok:decode(cur); cur = {} end
    end
    if #cur > 0 then runs[#runs + 1] = tok:decode(cur) end
    return table.concat(runs, "|")
  end

  it("renders messages with their analysis and masks all but the assistant's tokens", function()
    local ex, skipped = data.read_jsonl(FILE, tok)
    assert.are.equal(3, #ex)
    assert.are.same({ 1, 2, 6 }, { ex[1].line, ex[2].line, ex[3].line })
    -- the ids are harmony's training rendering of the same conversation
    local want = harmony.render({ messages = {
      { role = "system", content = "reasoning language: French" }, { role = "user", content = "What is 2+2?" },
      { role = "assistant", content = "It is 4.", thinking = "D'accord, deux plus deux font quatre." } }, mode = "training" }, tok)
    assert.are.same(want, ex[1].ids)
    assert.are.equal("assistant<|channel|>analysis<|message|>D'accord, deux plus deux font quatre.<|end|>" ..
      "|assistant<|channel|>final<|message|>It is 4.<|return|>", targets(ex[1]))
    assert.are.equal("assistant<|channel|>final<|message|>Blue.<|return|>", targets(ex[2]))
    -- raw text: every token is a target
    assert.are.equal(tok:decode(ex[3].ids):sub(#"<|start|>" + 1), targets(ex[3]))
    assert.are.same({ { line = 3 }, { line = 4 }, { line = 7 } },
      { { line = skipped[1].line }, { line = skipped[2].line }, { line = skipped[3].line } })
    assert.matches("invalid JSON", skipped[1].message)
    assert.matches("field messages missing", skipped[2].message)
    assert.matches("no target tokens", skipped[3].message)
  end)

  it("masks only final answers with loss_on = \"final\", and rejects bad lines on request", function()
    local ex = data.read_jsonl(FILE, tok, { loss_on = "final", text_loss_on = "final" })
    assert.are.equal("assistant<|channel|>final<|message|>It is 4.<|return|>", targets(ex[1]))
    assert.are.equal("assistant<|channel|>final<|message|>Hello!<|return|>", targets(ex[3]))
    assert.has_error(function() data.read_jsonl(FILE, tok, { on_error = "reject" }) end)
    local ok, err = pcall(data.read_jsonl, FILE, tok, { on_error = "reject" })
    assert.is_false(ok); assert.matches("train.jsonl:3: invalid JSON", err, 1, true)
    local none, msg = data.read_jsonl("spec/fixtures/lora/missing.jsonl", tok)
    assert.is_nil(none); assert.matches("missing.jsonl", msg, 1, true)
    assert.has_error(function() data.mask({ 1, 2 }, tok, "users") end)
  end)

  it("truncates to max_len and feeds gptoss.train", function()
    local m = assert(gptoss.load(H.tiny()))
    local ex = data.read_jsonl(FILE, tok, { max_len = 12 })
    for _, e in ipairs(ex) do assert.is_true(#e.ids <= 12 and #e.mask == #e.ids) end
    local lora = gptoss.lora(m, { r = 2, seed = 1 })
    local r = gptoss.train(m, lora, { data = FILE, steps = 2, lr = 1e-3, max_len = 64 })
    assert.are.equal(2, #r.history)
    assert.are.equal(3, #r.skipped)
    assert.is_true(r.history[1].loss > 0)
    lora:close(); m:close()
  end)
end)
