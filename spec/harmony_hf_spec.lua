-- The hf flavour against the Hugging Face chat template rendered by a real
-- Jinja engine: jinja2 compiled the way transformers compiles chat
-- templates (tools/reference/hf_template.py, run on the device).
local H = require "helpers"
local gptoss = require "gptoss"
local harmony = require "gptoss.harmony"
local json = require "gptoss.json"

local DIR = "spec/fixtures/harmony/hf"
local cases = assert(json.decode(H.read(DIR .. "/inputs.json")))
local expected = assert(json.decode(H.read(DIR .. "/expected.json")))
local tok = assert(gptoss.tokenizer(H.tokenizer_dir))

-- a template input as the renderer's conversation
local function conversation(c)
  local conv = { flavour = "hf", messages = c.messages, mode = c.add_generation_prompt and "completion" or "conversation",
                 system = { date = c.date } }
  if c.model_identity then conv.system.identity = c.model_identity end
  if c.reasoning_effort then conv.system.reasoning = c.reasoning_effort end
  if c.builtin_tools then conv.system.tools = c.builtin_tools end
  if c.tools then conv.developer = { tools = c.tools } end
  return conv
end

describe("hf flavour vs the chat template (" .. tostring(expected._engine) .. ")", function()
  it("covers at least 15 conversations with tools, results, multiple turns and thinking", function()
    assert.is_true(#cases >= 15)
  end)
  for _, c in ipairs(cases) do
    it(c.name, function()
      local want = expected[c.name]
      assert.is_truthy(want, "no expected rendering for " .. c.name)
      if want.error then
        assert.has_error(function() harmony.render_text(conversation(c)) end)
      else
        assert.are.equal(want.text, harmony.render_text(conversation(c)))
        -- tokens: the text with its control tokens, as transformers tokenizes it
        assert.are.same(tok:encode(want.text, { allowed_special = "all" }), harmony.render(conversation(c), tok))
      end
    end)
  end
end)
