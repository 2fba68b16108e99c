-- Hostile input: every case here crashed, hung or misled before it was
-- fixed (issue 17). Each asserts the exact refusal a caller now gets.
local H = require "helpers"
local gptoss = require "gptoss"
local core = require "gptoss.core"
local cjson = require "cjson"

local BIG = 2147483647   -- 2^31 - 1: the largest int; one more wraps

-- a copy of the micro checkpoint with its config.json edited by fn
local function micro_with(fn)
  local d = H.copy_dir(H.micro(), H.tmpdir() .. "/m")
  local cfg = cjson.decode(H.read(d .. "/config.json"))
  fn(cfg)
  H.write(d .. "/config.json", cjson.encode(cfg))
  return d
end

-- runs code in a child interpreter under `timeout`, so that a hang fails
-- the spec instead of stopping the run; returns the child's output
local function child(code, seconds)
  local script = H.tmpdir() .. "/child.lua"
  H.write(script, code)
  local cmd = string.format("LUA_PATH='%s' LUA_CPATH='%s' timeout %d %s %s 2>&1; echo rc=$?",
    package.path, package.cpath, seconds or 20, H.lua, script)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

describe("sizes and positions near 2^31", function()
  it("opens a session whose rewind allowance plus the sliding window passes 2^31", function()
    local m = assert(gptoss.load(H.micro()))
    local s = m:session({ rewind = BIG })
    s:feed({ 1, 2, 3 }, "none")
    assert.are.equal(3, s:pos())
    s:rewind(1)
    assert.are.equal(1, s:pos())
    m:close()
  end)

  it("loads a config whose sliding_window is 2^31 - 1 and runs it", function()
    local d = micro_with(function(c) c.sliding_window = BIG end)
    local m = assert(gptoss.load(d))
    assert.are.equal(BIG, m.config.sliding_window)
    -- a window wider than the context attends to everything, as full layers do
    local ref = assert(gptoss.load(micro_with(function(c) c.sliding_window = 4096 end)))
    local a, b = m:logits({ 5, 6, 7 }), ref:logits({ 5, 6, 7 })
    assert.are.equal(b:bytes(), a:bytes())
    m:close(); ref:close()
  end)

  it("refuses gptoss.floats shapes whose counts wrap", function()
    assert.has_error(function() core.floats("", 2147483648, 0) end,
      "gptoss.floats: rows must be an integer in 0..2147483647 (got 2147483648)")
    assert.has_error(function() core.floats("", 0, 4294967296) end,
      "gptoss.floats: cols must be an integer in 0..2147483647 (got 4294967296)")
    -- 2^31 x 2^31 x 4 bytes is 2^64: wrapped to 0 it matched the empty string
    assert.has_error(function() core.floats("", 2147483647, 2147483647) end)
    assert.has_error(function() core.floats("", 4294967296, 4294967296) end)
    local f = core.floats(H.f32le({ 1, 2, 3, 4, 5, 6 }), 2, 3)
    assert.are.same({ 4, 5, 6 }, f:row(2))
  end)

  it("refuses argmax on a Floats without columns instead of reading past it", function()
    local f = core.floats("", 1, 0)
    assert.has_error(function() f:argmax() end, "argmax: the Floats has no columns")
    assert.has_error(function() f:nll(1, 0) end)
    assert.are.equal(0, #f)
    assert.is_nil(f[1])
    local e = core.floats("", 0, 0)
    assert.has_error(function() e:argmax() end)
  end)
end)

describe("samplers", function()
  it("refuses a sampler made for another vocabulary (it walked past the logits)", function()
    local m = assert(gptoss.load(H.micro()))
    local s = m:session()
    s:feed({ 1, 2 })
    for _, v in ipairs { 50000, 10 } do
      local smp = gptoss.sampler(v, { temperature = 1, seed = 3 })
      local msg = "sampler 1 is for a vocabulary of " .. v .. ", the model's has 1000"
      assert.has_error(function() s:sample(smp) end, msg)
      assert.has_error(function() s:step(3, smp) end, msg)
      assert.has_error(function() gptoss.batch_step({ s }, { 3 }, { smp }) end, msg)
    end
    local ok = gptoss.sampler(1000, { temperature = 0 })
    assert.are.equal(s:logits():argmax(), s:sample(ok))
    m:close()
  end)
end)

describe("files that are not regular files", function()
  local function fifo(path) assert(os.execute("mkfifo " .. path)) end

  it("refuses a FIFO as config.json, a shard or tokenizer.json without blocking", function()
    local base = H.micro()
    local cfg = H.tmpdir() .. "/cfg"
    H.copy_dir(base, cfg)
    os.remove(cfg .. "/config.json"); fifo(cfg .. "/config.json")
    local shard = H.tmpdir() .. "/shard"
    H.copy_dir(base, shard)
    local shard_file = shard .. "/model-00000-of-00000.safetensors"
    os.remove(shard_file); fifo(shard_file)
    local tok = H.tmpdir() .. "/tok"
    H.copy_dir(base, tok)
    fifo(tok .. "/tokenizer.json")
    local out = child(string.format([[
      local gptoss = require "gptoss"
      print(select(2, gptoss.load(%q)))
      print(select(2, gptoss.load(%q)))
      print(select(2, gptoss.load(%q)))
      print(select(2, gptoss.tokenizer(%q)))
      print(select(2, gptoss.config(%q)))
      print(select(2, gptoss.safetensors(%q)))
    ]], cfg, shard, tok, tok, cfg, shard_file))
    assert.are.equal(table.concat({
      cfg .. "/config.json: not a regular file",
      shard_file .. ": not a regular file",
      tok .. "/tokenizer.json: not a regular file",
      tok .. "/tokenizer.json: not a regular file",
      cfg .. "/config.json: not a regular file",
      shard_file .. ": not a regular file",
      "rc=0", "" }, "\n"), out)
  end)
end)

describe("numbers quoted as given", function()
  it("reports ids past 2^31 as the caller wrote them", function()
    local m = assert(gptoss.load(H.micro()))
    local s = m:session()
    assert.has_error(function() m:logits({ 1, 4294967296 }) end, "model:logits: ids[2] must be an integer in -2147483648..2147483647 (got 4294967296)")
    assert.has_error(function() s:step(2147483648, gptoss.sampler(1000)) end, "s:step: id must be an integer in -2147483648..2147483647 (got 2147483648)")
    assert.has_error(function() s:rewind(-2147483649) end, "s:rewind: pos must be an integer in 0..2147483647 (got -2147483649)")
    assert.has_error(function() gptoss.sampler(1000, { logit_bias = { [1099511627777] = 1 } }) end,
      "gptoss.sampler: logit_bias key must be an integer in 0..999 (got 1099511627777)")
    m:close()
    local tok = assert(gptoss.tokenizer(H.tokenizer_dir))
    assert.has_error(function() tok:name(2147483648) end, "tok:name: token id 2147483648 is outside the vocabulary (0..201087)")
  end)

  it("refuses negative, NaN and infinite memory budgets and max_tokens", function()
    for v, quoted in pairs { [-1] = "%-1", [math.huge] = "inf", [1.5] = "1%.5", nan = "%-?nan" } do
      if v == "nan" then v = 0 / 0 end
      local ok, err = pcall(gptoss.load, H.micro(), { memory = v })
      assert.is_false(ok)
      assert.matches("^gptoss%.load: memory must be a whole number in %[0, 9007199254740992%] %(got " .. quoted .. "%)$", err)
    end
    local m = assert(gptoss.load(H.micro()))
    for _, v in ipairs { math.huge, -3, 0 } do
      assert.has_error(function() m:generate({ 1, 2 }, { max_tokens = v }) end,
        "model:generate: max_tokens must be an integer in 1..2147483647 (got " .. tostring(v) .. ")")
    end
    m:close()
  end)
end)

describe("sampling and sessions", function()
  it("gives a logit_bias of +inf its token, at any temperature", function()
    local m = assert(gptoss.load(H.micro()))
    local s = m:session()
    s:feed({ 1, 2, 3 })
    for seed = 1, 5 do
      local one = gptoss.sampler(1000, { temperature = 1, seed = seed, logit_bias = { [777] = math.huge } })
      assert.are.equal(777, s:sample(one))
      local two = gptoss.sampler(1000, { temperature = 0.7, top_p = 0.5, seed = seed, logit_bias = { [5] = math.huge, [9] = math.huge } })
      local id = s:sample(two)
      assert.is_true(id == 5 or id == 9, "sampled " .. id)
    end
    m:close()
  end)

  it("feeds with the documented default mode (\"last\")", function()
    local m = assert(gptoss.load(H.micro()))
    local a, b = m:session(), m:session()
    local fa, fb = a:feed({ 4, 5, 6 }), b:feed({ 4, 5, 6 }, "last")
    assert.are.same({ 1, 1000 }, { fa:shape() })
    assert.are.equal(fb:bytes(), fa:bytes())
    m:close()
  end)

  it("refuses a session of another model in generate and stream", function()
    local m1, m2 = assert(gptoss.load(H.micro())), assert(gptoss.load(H.micro()))
    local s = m2:session()
    assert.has_error(function() m1:generate({ 1, 2 }, { session = s, max_tokens = 1 }) end,
      "model:generate: the session given belongs to another model")
    assert.has_error(function() m1:stream({ 1, 2 }, { session = s }) end, "model:stream: the session given belongs to another model")
    m1:close(); m2:close()
  end)

  it("says a closed model is closed, for fields and methods written in Lua", function()
    local m = assert(gptoss.load(H.micro()))
    m:close()
    assert.is_true(m.closed)
    assert.has_error(function() return m.config end, "model is closed (reading its field 'config')")
    assert.has_error(function() m:generate({ 1, 2 }) end)
    local ok, err = pcall(m.generate, m, { 1, 2 })
    assert.is_false(ok)
    assert.matches("model is closed", err)
    assert.not_matches("attempt to", err)
  end)
end)

describe("configuration is never coerced", function()
  local text = H.read(H.micro() .. "/config.json")
  local function parse(edit) return core.config_parse((text:gsub("^%s*{", "{" .. edit .. ",", 1))) end
  local function with(fn) local c = cjson.decode(text); fn(c); return core.config_parse(cjson.encode(c)) end

  it("refuses fractional, overlong and mistyped fields, naming them", function()
    local c, err = with(function(c) c.eos_token_id = 2.5 end)
    assert.is_nil(c)
    assert.are.equal("config.json: field 'eos_token_id' must be an integer >= 0 (got 2.5)", err)
    _, err = with(function(c) c.eos_token_id = { 1, 2, 3, 4, 5, 6, 7, 8, 9 } end)
    assert.are.equal("config.json: eos_token_id lists 9 ids; this build keeps at most 8", err)
    _, err = with(function(c) c.pad_token_id = "x" end)
    assert.are.equal("config.json: field 'pad_token_id' must be an integer >= 0", err)
    _, err = with(function(c) c.tie_word_embeddings = "yes" end)
    assert.are.equal("config.json: field 'tie_word_embeddings' must be true or false", err)
    _, err = with(function(c) c.initial_context_length = 1e10 end)
    assert.are.equal("config.json: field 'initial_context_length' must be an integer >= 1 (got 10000000000)", err)
  end)

  it("resolves a repeated key as Python's json does: the last one wins", function()
    local first = assert(parse('"hidden_size": 96'))           -- the file's own hidden_size comes later
    local own = assert(core.config_parse(text))
    assert.are.equal(own.hidden_size, first.hidden_size)
    local last = core.config_parse((text:gsub("}%s*$", ', "sliding_window": 7}')))
    assert.are.equal(7, last.sliding_window)
  end)
end)

describe("adapters", function()
  local function adapter_with(fn)
    local d = H.copy_dir("spec/fixtures/lora/attn_r4", H.tmpdir() .. "/a")
    local cfg = cjson.decode(H.read(d .. "/adapter_config.json"))
    fn(cfg)
    H.write(d .. "/adapter_config.json", cjson.encode(cfg))
    return d
  end

  it("refuses a config rank its tensors disagree with, unless rank_pattern gives it", function()
    local a, err = gptoss.adapter.load(adapter_with(function(c) c.r = 8 end))
    assert.is_nil(a)
    assert.matches("layer %d q_proj has rank 4, but adapter_config.json gives r = 8 and no rank_pattern entry of 4", err)
    a = assert(gptoss.adapter.load(adapter_with(function(c) c.r = 8; c.rank_pattern = { q_proj = 4, k_proj = 4, v_proj = 4, o_proj = 4 } end)))
    a:close()
  end)

  it("refuses target_modules it would not apply", function()
    local a, err = gptoss.adapter.load(adapter_with(function(c) c.target_modules = { "q_proj", "gate_proj" } end))
    assert.is_nil(a)
    assert.matches("field target_modules: entry gate_proj is not a module this engine applies LoRA to", err)
    a = assert(gptoss.adapter.load(adapter_with(function(c) c.target_modules = { "self_attn.q_proj", "k_proj", "v_proj", "o_proj" } end)))
    a:close()
  end)

  it("refuses a scale that can only give NaN logits", function()
    local a, err = gptoss.adapter.load(adapter_with(function(c) c.lora_alpha = 1e30 end))
    assert.is_nil(a)
    assert.matches("lora_alpha 1e%+30 with r = 4 gives a scale of 2.5e%+29; at most 65536 is accepted", err)
    local m = assert(gptoss.load(H.micro()))
    assert.has_error(function() gptoss.lora(m, { r = 1, alpha = 1e9 }) end)
    m:close()
  end)
end)

describe("Lua parsers", function()
  local json = require "gptoss.json"
  local harmony = require "gptoss.harmony"
  local data = require "gptoss.data"

  it("refuses JSON nested past its limit with its own message", function()
    assert.are.same({ nil, "json: nested deeper than 64 levels" }, { json.decode(("["):rep(100000) .. ("]"):rep(100000)) })
    assert.is_table(json.decode(("["):rep(64) .. ("]"):rep(64)))
    assert.are.same({ nil, "json: invalid JSON" }, { json.decode("[1e400]") })
  end)

  it("names the field of a wrong type given to the renderer", function()
    assert.has_error(function() harmony.render_text { messages = { { role = "user", content = 5 } } } end,
      "harmony: render: messages[1].content must be a string or a table (got 5)")
    assert.has_error(function() harmony.render_text { messages = { 7 } } end, "harmony: render: messages[1] must be a table (got 7)")
    assert.has_error(function() harmony.render_text { messages = { { role = "user", content = "x", channel = {} } } } end,
      "harmony: render: messages[1].channel must be a string (got table)")
    assert.has_error(function() harmony.render_text(3) end, "harmony: render: conv must be a conversation table (got 3)")
  end)

  it("accepts an undecodable id inside streamed content, as harmony's StreamableParser does", function()
    local tok = assert(gptoss.tokenizer(H.tokenizer_dir))
    local ids = tok:encode("<|start|>assistant<|message|>Hello", { allowed_special = "all" })
    ids[#ids + 1] = 99999999
    for _, id in ipairs(tok:encode(" world<|end|>", { allowed_special = "all" })) do ids[#ids + 1] = id end
    local msgs = harmony.parse(ids, { tokenizer = tok, strict = true })
    assert.are.equal(1, #msgs)
    -- what follows the bad id waits on it, and the stop token ends the
    -- message with one U+FFFD for the queue (openai/harmony src/encoding.rs,
    -- StreamableParser::process_next: decode_utf8(undecoded_tokens) fails,
    -- Err(_) => REPLACEMENT)
    assert.are.equal("Hello\u{FFFD}", msgs[1].content)
    -- outside content an undecodable id is refused by name
    assert.has_error(function() harmony.parse({ 200006, 99999999 }, { tokenizer = tok }) end)
  end)

  -- openai/harmony's StreamableParser (src/encoding.rs, process_next, v0.0.8):
  -- in Content, a token that is not a stop token (<|return|>, <|call|>,
  -- <|end|>: registry.rs's stop_formatting_tokens) is pushed onto
  -- undecoded_tokens and the whole queue goes through decode_bytes, which
  -- fails while it holds an id of neither vocabulary; so a special token
  -- after such an id is queued like any other, never seen as text or as a
  -- control token, until a stop token ends the message with content_text +
  -- REPLACEMENT and clears the queue.
  it("queues special tokens behind an undecoded id, as harmony's StreamableParser does", function()
    local tok = assert(gptoss.tokenizer(H.tokenizer_dir))
    local function enc(t) return tok:encode(t, { allowed_special = "all" }) end
    local function cat(...)
      local out = {}
      for _, part in ipairs { ... } do
        for _, id in ipairs(type(part) == "table" and part or { part }) do out[#out + 1] = id end
      end
      return out
    end
    -- upstream's own case (src/tests.rs, test_parse_completion_with_invalid_content_token_errors_on_eos)
    local msgs = harmony.parse(cat(enc("<|start|>assistant<|channel|>analysis<|message|>Practice invalid token handling."),
                                   4294967295), { tokenizer = tok })
    assert.are.same({ { role = "assistant", channel = "analysis", content = "Practice invalid token handling.\u{FFFD}" } }, msgs)
    -- a <|channel|> and a <|start|> after the bad id stay queued: no text, no header
    for _, mode in ipairs { { strict = true }, { strict = false }, { lenient = true } } do
      local p = harmony.stream_parser { tokenizer = tok, strict = mode.strict, lenient = mode.lenient }
      local deltas = {}
      p.on_delta = function(d) deltas[#deltas + 1] = d end
      for _, id in ipairs(cat(enc("<|start|>assistant<|message|>Hello"), 99999999, enc("<|channel|>final x<|start|>user"))) do
        p:process(id)
      end
      assert.are.same({ "Hello" }, deltas)
      assert.are.equal("content", p.state)
      assert.is_nil(p.last_content_delta)
      assert.are.equal("Hello", p:current_content())
      for _, id in ipairs(enc("<|end|><|start|>user<|message|>hi<|end|>")) do p:process(id) end
      p:process_eos()
      assert.are.same({ "Hello\u{FFFD}", "hi" }, { p.messages[1].content, p.messages[2].content })
      assert.are.same({ "assistant", "user" }, { p.messages[1].role, p.messages[2].role })
      assert.is_nil(p.messages[1].channel)
    end
  end)

  it("reports an invalid UTF-8 training line by number and follows on_error", function()
    local tok = assert(gptoss.tokenizer(H.tokenizer_dir))
    local f = H.tmpdir() .. "/t.jsonl"
    local good = '{"text": "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>"}'
    H.write(f, good .. '\n{"text": "bad \255 byte"}\n' .. good .. "\n")
    local ex, skipped = data.read_jsonl(f, tok, { on_error = "skip" })
    assert.are.equal(2, #ex)
    assert.are.equal(1, #skipped)
    assert.are.equal(2, skipped[1].line)
    assert.matches("invalid UTF%-8", skipped[1].message)
    assert.has_error(function() data.read_jsonl(f, tok, { on_error = "reject" }) end)
    local ok, err = pcall(data.read_jsonl, f, tok, { on_error = "reject" })
    assert.is_false(ok)
    assert.matches(f:gsub("%p", "%%%0") .. ":2: .*invalid UTF%-8", err)
  end)
end)

describe("training checkpoints", function()
  local train = require "gptoss.train"

  it("refuses to resume from a latest that names a missing checkpoint", function()
    local ck = H.tmpdir() .. "/ck"
    require("lfs").mkdir(ck)
    H.write(ck .. "/latest", "step-000002\n")
    assert.has_error(function() train.latest(ck) end,
      "train: resume: " .. ck .. "/latest names step-000002, but " .. ck .. "/step-000002/trainer_state.json is missing")
    H.write(ck .. "/latest", "../../etc\n")
    assert.has_error(function() train.latest(ck) end, "train: resume: " .. ck .. "/latest names \"../../etc\", not a checkpoint (step-N)")
  end)

  it("prunes old checkpoints out of sight first and clears what a kill left", function()
    local m = H.v128()
    local ck = H.tmpdir() .. "/ck"
    require("lfs").mkdir(ck)
    require("lfs").mkdir(ck .. "/.step-000001.old")           -- a prune a kill interrupted
    H.write(ck .. "/.step-000001.old/adapter_config.json", "{")
    local data = { { ids = { 1, 2, 3, 4, 5, 6 } }, { ids = { 6, 5, 4, 3, 2, 1 } } }
    gptoss.train(m, gptoss.lora(m, { r = 2, seed = 1 }),
      { data = data, steps = 4, batch = 1, checkpoint_dir = ck, checkpoint_every = 2, keep = 1 })
    assert.are.same({ "latest", "step-000004" }, H.files(ck))
    m:close()
  end)
end)

describe("the tokenizer on long runs", function()
  it("encodes 10 MB of spaces (PCRE2's fixed match limit refused it) #long", function()
    local tok = assert(gptoss.tokenizer(H.tokenizer_dir))
    local s = (" "):rep(10 * 1000 * 1000)
    local ids = tok:encode(s)
    assert.are.equal(s, tok:decode(ids))
    -- the longest space token is 128 spaces: whole tokens and one remainder
    assert.are.equal(math.ceil(#s / 128), #ids)
  end)
end)

describe("gptoss.json's \\u escapes", function()
  -- Python's json reads these as the comments say (json.loads)
  it("joins a surrogate pair only after a high surrogate, as Python's json does", function()
    local J = require "gptoss.json"
    assert.equal("\u{20AC}\u{1F600}", J.decode([["\u20ac\ud83d\ude00"]]))   -- '€😀'
    assert.equal("\u{1F600}A", J.decode([["\ud83d\ude00\u0041"]]))         -- '😀A'
    assert.equal("\u{E9}\u{E8}", J.decode([["\u00e9\u00e8"]]))              -- 'éè'
  end)
end)
