--- Harmony-aware constraints (gptoss.constraint's arms, csrc/arm.c): on the
-- tiny random checkpoint, whose free output is noise, a call to a declared
-- tool must carry arguments that ajv (draft 2020-12) validates against the
-- tool's schema, and a json_schema chat's final message the response's,
-- while the analysis channel stays exactly as free sampling makes it.
-- Headers are read as harmony's parser (gptoss.harmony) reads them, which
-- is the oracle for which arm a header names; scripted checkpoints
-- (spec/server/scripted.lua) write a header themselves when a test needs
-- the model, not a prompt, to open a message.
local H = require "helpers"
local A = require "support.ajv"
local S = require "server.scripted"
local gptoss = require "gptoss"
local json = require "gptoss.json"
local harmony = require "gptoss.harmony"
local constraint = require "gptoss.constraint"

local LIMITS = { max_string = 6, max_items = 3, max_properties = 2 }
-- get_weather's and get_weather2's schemas: no value valid for both
local W = '{"type":"object","properties":{"city":{"enum":["Paris","Oslo"]}},"required":["city"],"additionalProperties":false}'
local W2 = '{"type":"object","properties":{"days":{"type":"integer","minimum":1,"maximum":7}},"required":["days"],' ..
  '"additionalProperties":false}'
local FINAL = '{"type":"object","properties":{"answer":{"type":"boolean"},"n":{"type":"integer"}},"required":["answer","n"],' ..
  '"additionalProperties":false}'
local TOOLS = {
  { name = "get_weather", description = "Weather for a city.", parameters = json.decode(W) },
  { name = "get_weather2", description = "Weather for some days.", parameters = json.decode(W2) },
}
local ASK = { { role = "user", content = "What is the weather in Paris?" } }

local function call_prefill(name)
  return { channel = "commentary", recipient = "functions." .. name, content_type = "<|constrain|>json" }
end

-- the fixtures' schemas whose instances are objects: tool parameters
local function object_schemas()
  local out = {}
  for line in io.lines("spec/fixtures/grammar/schemas.txt") do
    if line:match('^{"type":"object"') then out[#out + 1] = line end
  end
  return out
end

describe("harmony-aware constraints", function()
  local model, tok, ids_of, special
  setup(function()
    A.install()
    model = assert(gptoss.load(H.tiny()))
    tok = model.tokenizer
    ids_of = function(text) return tok:encode(text, { allowed_special = "all" }) end
    special = function(name) return assert(tok:special(name)) end
  end)
  teardown(function() if model then model:close() end end)

  -- {====================================================== (1) forced calls
  it("a forced call's arguments validate against the tool's schema: every object schema of the fixtures, batched", function()
    -- what gptoss.chat and the server submit: the conversation rendered with
    -- the tool and the call's header, the arms chat_arms makes of the tools
    local list, reqs = object_schemas(), {}
    assert.is_true(#list >= 20)
    local eng = gptoss.engine(model, { max_batch = 64 })
    finally(function() eng:close() end)
    for i, s in ipairs(list) do
      local tools = { { name = "lookup", description = "Looks it up.", parameters = json.decode(s) }, TOOLS[1] }
      local prompt = harmony.render({ developer = { tools = tools }, messages = ASK, mode = "completion",
        prefill = call_prefill("lookup") }, tok)
      local arms = constraint.chat_arms({ json_options = LIMITS }, tools, "spec")
      for _, seed in ipairs(i <= 2 and { 1, 2, 3 } or { 10 + i }) do
        reqs[#reqs + 1] = { schema = s, req = assert(eng:submit(prompt, { arms = arms, seed = seed, max_tokens = 500 })) }
      end
    end
    local cases = {}
    for i, x in ipairs(reqs) do
      local r = x.req:result()
      assert.equal("stop", r.finish_reason, x.schema)
      assert.equal(special("<|call|>"), r.ids[#r.ids])
      cases[i] = { schema = x.schema, text = H.reply_bytes(model, r) }
    end
    A.expect_valid(cases, "forced call")
  end)

  it("gptoss.chat: a forced call (prefill) to a declared tool comes back in tool_calls, valid for the tool's schema", function()
    local cases = {}
    for i, s in ipairs { W2, object_schemas()[3], object_schemas()[19] } do
      local tools = { { name = "lookup", description = "Looks it up.", parameters = json.decode(s) }, TOOLS[1] }
      for seed = 1, 2 do
        local r = gptoss.chat(model, ASK, { tools = tools, prefill = call_prefill("lookup"), seed = 10 * i + seed,
          max_tokens = 400, json_options = LIMITS })
        assert.equal("stop", r.finish_reason, s)
        assert.equal(special("<|call|>"), r.ids[#r.ids])
        assert.equal(1, #r.tool_calls)
        assert.equal("lookup", r.tool_calls[1].name)
        cases[#cases + 1] = { schema = s, text = r.tool_calls[1].raw }
      end
    end
    A.expect_valid(cases, "chat call")
  end)

  it("the same forced call without the tool declared is noise (what makes it valid is the arm)", function()
    local free = gptoss.chat(model, ASK, { prefill = call_prefill("get_weather"), seed = 1, max_tokens = 40 })
    local held = gptoss.chat(model, ASK, { tools = TOOLS, prefill = call_prefill("get_weather"), seed = 1, max_tokens = 40 })
    local res = A.validate { { schema = W, text = free.tool_calls[1].raw }, { schema = W, text = held.tool_calls[1].raw } }
    assert.is_false(res[1].ok)
    assert.is_true(res[2].ok, res[2].error)
  end)
  -- }======================================================

  -- {====================================================== (2) calls the model opens
  it("auto: a call whose header the model writes validates against that tool's schema, not its namesake's", function()
    -- the scripted model writes the header; the arguments are the random model's
    local dir = S.write(H.tiny(), H.tmpdir() .. "/caller", "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>", tok)
    local caller = assert(gptoss.load(dir))
    finally(function() caller:close() end)
    local cases = {}
    for seed = 1, 4 do
      local r = gptoss.chat(caller, ASK, { tools = TOOLS, seed = seed, max_tokens = 200, temperature = 1 })
      assert.equal("stop", r.finish_reason)
      assert.equal(1, #r.tool_calls)
      assert.equal("get_weather", r.tool_calls[1].name)
      cases[#cases + 1] = { schema = W, text = r.tool_calls[1].raw }
      cases[#cases + 1] = { schema = '{"not":' .. W2 .. "}", text = r.tool_calls[1].raw }
    end
    A.expect_valid(cases, "auto call")
    -- undeclared, the same header opens free noise
    local r = gptoss.chat(caller, ASK, { seed = 1, max_tokens = 60 })
    assert.equal("get_weather", r.tool_calls[1].name)
    assert.is_false(A.validate({ { schema = W, text = r.tool_calls[1].raw } })[1].ok)
  end)

  it("auto: a header the prompt leaves open and the model closes with <|message|> arms the tool's grammar (raw prompt)", function()
    local base = harmony.render({ developer = { tools = TOOLS }, messages = ASK, mode = "completion" }, tok)
    local head = ids_of("<|channel|>commentary to=functions.get_weather2 <|constrain|>json")
    local prompt = {}
    for _, id in ipairs(base) do prompt[#prompt + 1] = id end
    for _, id in ipairs(head) do prompt[#prompt + 1] = id end
    local arms = constraint.chat_arms({}, TOOLS, "spec")
    local cases = {}
    for seed = 1, 3 do
      local r = model:generate(prompt, { arms = arms, seed = seed, max_tokens = 200, logit_bias = { [special("<|message|>")] = 100 } })
      assert.equal(special("<|message|>"), r.ids[1])   -- the model's own
      assert.equal("stop", r.finish_reason)
      local body = {}
      for i = 2, #r.ids - 1 do body[#body + 1] = r.ids[i] end
      cases[#cases + 1] = { schema = W2, text = tok:decode_bytes(body) }
    end
    A.expect_valid(cases, "raw call")
  end)

  -- }======================================================

  -- {====================================================== (3) json_schema: the final channel only
  it("json_schema leaves the analysis free: the same tokens as without it, the schema's forbidden ones among them", function()
    local opts = { prefill = { channel = "analysis" }, seed = 7, max_tokens = 40 }
    local free = gptoss.chat(model, ASK, opts)
    opts.json_schema = FINAL
    local held = gptoss.chat(model, ASK, opts)
    assert.same(free.ids, held.ids)
    assert.is_truthy(held.analysis)
    -- the analysis opens on a token no JSON value of the schema starts with
    local m = gptoss.core.matcher(constraint.compile(constraint.gbnf({ json_schema = FINAL }, "spec")), constraint.vocab(model))
    assert.is_nil((m:accept(held.ids[1])))
  end)

  it("json_schema: a final message whose header the model writes validates; without it, noise", function()
    local dir = S.write(H.tiny(), H.tmpdir() .. "/final", "<|channel|>final<|message|>", tok)
    local answerer = assert(gptoss.load(dir))
    finally(function() answerer:close() end)
    local cases = {}
    for seed = 1, 4 do
      local r = gptoss.chat(answerer, ASK, { json_schema = FINAL, seed = seed, max_tokens = 300, json_options = LIMITS })
      assert.equal("stop", r.finish_reason)
      assert.equal(special("<|return|>"), r.ids[#r.ids])
      cases[#cases + 1] = { schema = FINAL, text = r.final }
    end
    A.expect_valid(cases, "final")
    local r = gptoss.chat(answerer, ASK, { seed = 1, max_tokens = 30 })
    assert.is_false(A.validate({ { schema = FINAL, text = r.final } })[1].ok)
  end)

  it("prefill = { channel = 'final' } pins the whole reply to the answer, as before arms", function()
    local r = gptoss.chat(model, ASK, { json_schema = FINAL, prefill = { channel = "final" }, seed = 3, max_tokens = 300,
      json_options = LIMITS })
    assert.equal("stop", r.finish_reason)
    assert.is_nil(r.analysis)
    A.expect_valid({ { schema = FINAL, text = r.final } }, "pinned final")
  end)
  -- }======================================================

  -- {====================================================== (4) reading headers
  it("reads a header as harmony's parser does: channel and recipient of generated headers, odd ones too", function()
    local h = constraint.headers(model)
    local pieces = { "assistant", " ", "  ", "to=functions.get_weather", "to=functions.get_weather2", "functions.get_weather",
      "<|channel|>", "final", "commentary", "analysis", "json", "<|constrain|>", "<|constrain|>json", "x", "to=", "tool",
      "user", "\n", "<|channel|>final", " to=functions.get_weather" }
    local rng = 12345
    local function rand(n) rng = (rng * 1103515245 + 12345) % 2147483648; return rng % n + 1 end
    local checked, named = 0, 0
    for _ = 1, 400 do
      local parts = {}
      for k = 1, rand(6) do parts[k] = pieces[rand(#pieces)] end
      local text = table.concat(parts)
      for _, role in ipairs { false, "assistant" } do
        -- the parser's reading: a message after <|start|>, or one known to be the assistant's
        local msgs = harmony.parse((role and "" or "<|start|>") .. text .. "<|message|>body<|end|>",
          { role = role or nil, lenient = true })
        local m = msgs[#msgs]
        local want = m and m.content == "body" and m or {}
        local got = h:read(ids_of(text), role or nil) or {}
        assert.equal(want.channel, got.channel, string.format("%q as %s", text, tostring(role)))
        assert.equal(want.recipient, got.recipient, string.format("%q as %s", text, tostring(role)))
        checked = checked + 1
        if got.channel or got.recipient then named = named + 1 end
      end
    end
    assert.is_true(named > 200, "only " .. named .. " of " .. checked .. " headers named something")
    assert.same({ channel = "commentary", recipient = "functions.get_weather2" },
      h:read(ids_of("assistant<|channel|>commentary to=functions.get_weather2 <|constrain|>json")))
  end)

  -- A sampler driven step by step as a generation loop drives it, through
  -- a session of the random model, except where the script forces a token
  -- (logits that leave it alone): the script writes an analysis the
  -- schemas forbid, then headers; each arm's body is the model's
  local function drive(smp, prompt, script)
    local V = model.config.vocab_size
    local sess = model:session()
    finally(function() sess:close() end)
    local hist = {}
    local logits = sess:feed(prompt, "last")
    for _, id in ipairs(prompt) do hist[#hist + 1] = id end
    local function step(forced)
      local f = logits
      if forced then f = gptoss.floats(("\0\0\0\0"):rep(forced) .. H.f32le { 1e4 } .. ("\0\0\0\0"):rep(V - forced - 1), 1, V) end
      local id = smp:sample(f, 1, hist)
      hist[#hist + 1] = id
      logits = sess:feed({ id }, "last")
      return id
    end
    local bodies = {}
    for _, part in ipairs(script) do
      if part.text then
        for _, want in ipairs(ids_of(part.text)) do
          assert.is_nil(smp:armed())
          assert.equal(want, step(want), "a free step did not follow the script at " .. part.text)
        end
      else
        -- a body: the model's tokens under the arm, forced toward a token
        -- its grammar forbids at the first step (the mask wins)
        local ids, id = {}, step(ids_of("}")[1])
        assert.equal(part.arm, smp:armed())
        while smp:armed() do
          ids[#ids + 1] = id
          assert.is_true(#ids < 400, "the arm never ended")
          id = step()
        end
        assert.equal(part.ends, id)
        bodies[#bodies + 1] = tok:decode_bytes(ids)
      end
    end
    return bodies
  end

  it("a reply calling two tools in turn, then answering: each arm re-arms on its header, the analysis stays free", function()
    local prompt = harmony.render({ developer = { tools = TOOLS }, messages = ASK, mode = "completion" }, tok)
    local arms = constraint.chat_arms({ json_schema = FINAL, json_options = LIMITS }, TOOLS, "spec")
    for seed = 1, 2 do
      local smp = gptoss.sampler(model.config.vocab_size, { seed = seed })
      for _, a in ipairs(constraint.arms(model, { arms = arms }, "spec")) do
        smp:arm { headers = constraint.headers(model), grammar = a.grammar, vocab = constraint.vocab(model), end_ids = a.end_ids,
                  channel = a.channel, recipient = a.recipient }
      end
      local bodies = drive(smp, prompt, {
        { text = "<|channel|>analysis<|message|>}{ not JSON: \"] at all<|end|>" },
        { text = "<|start|>assistant<|channel|>commentary to=functions.get_weather2 <|constrain|>json<|message|>" },
        { arm = 2, ends = special("<|call|>") },
        { text = "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>" },
        { arm = 1, ends = special("<|call|>") },
        { text = "<|start|>assistant<|channel|>commentary<|message|>Free again }<|end|>" },
        { text = "<|start|>assistant<|channel|>final<|message|>" },
        { arm = 3, ends = special("<|return|>") },
      })
      A.expect_valid({ { schema = W2, text = bodies[1] }, { schema = W, text = bodies[2] }, { schema = FINAL, text = bodies[3] } },
        "seed " .. seed)
    end
  end)

  it("a prompt that ends inside a call's arguments: the sampler replays them and goes on in the grammar", function()
    local prompt = harmony.render({ developer = { tools = TOOLS }, messages = ASK, mode = "completion",
      prefill = { channel = "commentary", recipient = "functions.get_weather", content_type = "<|constrain|>json",
                  content = '{"city": "Os' } }, tok)
    local arms = constraint.chat_arms({}, TOOLS, "spec")
    for seed = 1, 2 do
      local r = model:generate(prompt, { arms = arms, seed = seed, max_tokens = 100 })
      assert.equal("stop", r.finish_reason)
      local text = '{"city": "Os' .. H.reply_bytes(model, r)
      A.expect_valid({ { schema = W, text = text } }, "replayed")
      assert.same({ city = "Oslo" }, json.decode(text))
    end
    -- a prompt's body the grammar refuses is left free
    prompt = harmony.render({ developer = { tools = TOOLS }, messages = ASK, mode = "completion",
      prefill = { channel = "commentary", recipient = "functions.get_weather", content_type = "<|constrain|>json",
                  content = "no JSON" } }, tok)
    local free = model:generate(prompt, { seed = 1, max_tokens = 12 })
    assert.same(free.ids, model:generate(prompt, { arms = arms, seed = 1, max_tokens = 12 }).ids)
  end)

  it("a header naming another tool, get_weather2 for get_weather's arm, leaves the call free", function()
    local prompt = harmony.render({ developer = { tools = TOOLS }, messages = ASK, mode = "completion",
      prefill = call_prefill("get_weather2") }, tok)
    local only = constraint.chat_arms({}, { TOOLS[1] }, "spec")
    local free = model:generate(prompt, { seed = 2, max_tokens = 12 })
    assert.same(free.ids, model:generate(prompt, { arms = only, seed = 2, max_tokens = 12 }).ids)
    -- and the arm of its own name holds it
    local held = model:generate(prompt, { arms = constraint.chat_arms({}, TOOLS, "spec"), seed = 2, max_tokens = 200 })
    assert.are_not.same(free.ids, held.ids)
    A.expect_valid({ { schema = W2, text = H.reply_bytes(model, held) } }, "own arm")
  end)

  it("names the option at fault in arms", function()
    local function err(opts) local ok, e = pcall(model.generate, model, { 1, 2 }, opts); assert.is_false(ok); return e end
    assert.matches("model:generate: arms%[1%]: give a channel or a recipient", err { arms = { { json = true } } })
    assert.matches("model:generate: arms%[1%]: give one of json_schema, grammar and json", err { arms = { { channel = "final" } } })
    assert.matches("model:generate: arms%[2%]: json_schema: unsupported keyword 'not' at /not",
      err { arms = { { channel = "final", json = true }, { recipient = "functions.f", json_schema = { ["not"] = {} } } } })
    assert.matches("model:generate: arms%[1%]: unknown key 'chanel'", err { arms = { { chanel = "final", json = true } } })
    assert.matches("model:generate: arms%[1%]%.channel must be a non%-empty string %(got 3%)",
      err { arms = { { channel = 3, json = true } } })
    assert.matches("end_tokens%[1%] must be an integer", err { arms = { { channel = "final", json = true, end_tokens = { "x" } } } })
    assert.matches("give arms or one of json_schema, grammar and json", err { arms = { { channel = "final", json = true } }, json = true })
    local smp = gptoss.sampler(model.config.vocab_size, {})
    local g = constraint.compile('root ::= "a"')
    local ok, e = pcall(smp.arm, smp, { headers = constraint.headers(model), grammar = g, vocab = constraint.vocab(model), end_ids = {} })
    assert.is_false(ok)
    assert.matches("give a channel or a recipient", e)
    ok, e = pcall(smp.arm, smp, { headers = constraint.headers(model), grammar = g, vocab = constraint.vocab(model), end_ids = {},
      channel = "final" })
    assert.matches("at least one end id", e)
    ok, e = pcall(smp.arm, smp, { headers = g, grammar = g, vocab = constraint.vocab(model), end_ids = { 1 }, channel = "final" })
    assert.matches("sampler:arm: headers must be a gptoss.Headers %(got gptoss.Grammar%)", e)
  end)
  -- }======================================================

  -- {====================================================== (5) through the engine
  it("through the engine: the same tokens as model:generate and gptoss.chat alone, several requests batched", function()
    local prompt = harmony.render({ developer = { tools = TOOLS }, messages = ASK, mode = "completion",
      prefill = call_prefill("get_weather") }, tok)
    local arms = constraint.chat_arms({ json_schema = FINAL }, TOOLS, "spec")
    local alone, chats = {}, {}
    for seed = 1, 3 do
      alone[seed] = model:generate(prompt, { arms = arms, seed = seed, max_tokens = 60 }).ids
    end
    chats[1] = gptoss.chat(model, ASK, { tools = TOOLS, seed = 1, max_tokens = 60, prefill = call_prefill("get_weather") }).ids
    local eng = gptoss.engine(model, { max_batch = 8 })
    finally(function() eng:close() end)
    local reqs = {}
    for seed = 1, 3 do reqs[seed] = assert(eng:submit(prompt, { arms = arms, seed = seed, max_tokens = 60 })) end
    for seed = 1, 3 do assert.same(alone[seed], reqs[seed]:result().ids) end
    -- gptoss.chat goes through the running engine
    assert.same(chats[1], gptoss.chat(model, ASK, { tools = TOOLS, seed = 1, max_tokens = 60,
      prefill = call_prefill("get_weather") }).ids)
  end)

  it("through the engine: the next masks are computed while the forward pass runs, and the tokens stay model:generate's", function()
    -- arms (a tool call's arguments) and a grammar over the whole output, mixed in one batch
    local prompt = harmony.render({ developer = { tools = TOOLS }, messages = ASK, mode = "completion",
      prefill = call_prefill("get_weather") }, tok)
    local arms = constraint.chat_arms({}, TOOLS, "spec")
    local plain = tok:encode("Answer in JSON:")
    local schema = '{"type":"object","properties":{"n":{"type":"integer"},"s":{"type":"string"}},"required":["n","s"]}'
    local function opts(k)
      if k % 2 == 1 then return prompt, { arms = arms, seed = k, max_tokens = 40 } end
      return plain, { json_schema = schema, json_options = { max_string = 8 }, seed = k, max_tokens = 40 }
    end
    local alone = {}
    for k = 1, 6 do
      local ids, o = opts(k)
      alone[k] = model:generate(ids, o).ids
    end
    local eng = gptoss.engine(model, { max_batch = 6 })
    finally(function() eng:close() end)
    local reqs, drawn = {}, 0
    for k = 1, 6 do reqs[k] = assert(eng:submit(opts(k))) end
    for k = 1, 6 do
      local got = reqs[k]:result().ids
      assert.same(alone[k], got)
      drawn = drawn + #got
    end
    local st = eng:stats()
    -- every draw after a request's first has its grammar's state known a
    -- step ahead; some are computed by the draw itself when it comes first
    assert.is_true(st.masks_ahead > 0 and st.masks_ahead <= drawn, st.masks_ahead .. " of " .. drawn)
    assert.is_true(st.masks_ahead_s > 0)
  end)
  -- }======================================================
end)
