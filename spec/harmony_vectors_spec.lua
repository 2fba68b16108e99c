-- Every harmony vector: the upstream ones (openai/harmony v0.0.8 tests,
-- spec/fixtures/harmony/upstream, see its README for the schema) and the
-- project's own (spec/fixtures/harmony/own), by exact text and exact tokens.
local H = require "helpers"
local gptoss = require "gptoss"
local harmony = require "gptoss.harmony"
local json = require "gptoss.json"

local tok = assert(gptoss.tokenizer(H.tokenizer_dir))

local function val(v) if v == json.null then return nil end return v end

-- a vector message as the renderer takes it
local function message(m)
  local out = {}
  for _, k in ipairs(json.keys(m)) do out[k] = val(m[k]) end
  return out
end

local function conversation(v)
  local msgs = {}
  for i, m in ipairs(v.messages) do msgs[i] = message(m) end
  local conv = { messages = msgs, system = false }
  if v.kind == "render_completion" then conv.mode = "completion"; conv.next_role = val(v.next_role)
  elseif v.kind == "render_training" then conv.mode = "training"
  else conv.mode = "conversation" end
  if v.config and v.config ~= json.null then conv.keep_analysis = not v.config.auto_drop_analysis end
  for _, k in ipairs { "flavour", "prefill", "developer", "keep_analysis" } do
    if v[k] ~= nil then conv[k] = val(v[k]) end
  end
  if v.system ~= nil then conv.system = val(v.system) end
  return conv
end

local FIELDS = { "role", "name", "channel", "recipient", "content_type", "content" }
local function same_messages(want, got)
  local w, g = {}, {}
  for i, m in ipairs(want) do
    w[i] = {}
    for _, f in ipairs(FIELDS) do w[i][f] = val(m[f]) end
  end
  for i, m in ipairs(got) do
    g[i] = {}
    for _, f in ipairs(FIELDS) do g[i][f] = m[f] end
  end
  assert.are.same(w, g)
end

local function ids_of(v)
  local out = {}
  for i, id in ipairs(v) do out[i] = id end
  return out
end

local runners = {}

function runners.render(v)
  local conv = conversation(v)
  assert.are.equal(v.expected_text, harmony.render_text(conv))
  local ids = harmony.render(conv, tok)
  if v.expected_pieces then
    -- control tokens by id, each text piece as ordinary text
    local want = {}
    for _, p in ipairs(v.expected_pieces) do
      if p.special then want[#want + 1] = tok:special(p.special)
      else for _, id in ipairs(tok:encode(p.text)) do want[#want + 1] = id end end
    end
    assert.are.same(want, ids)
  else
    assert.are.same(tok:encode(v.expected_text, { allowed_special = "all" }), ids)
  end
  if v.expected_tokens then assert.are.same(ids_of(v.expected_tokens), ids) end
end
runners.render_completion, runners.render_conversation, runners.render_training = runners.render, runners.render, runners.render

local function parse_opts(v)
  return { role = val(v.parse_role), strict = val(v.strict) ~= false, lenient = val(v.lenient) == true, tokenizer = tok }
end

-- the completion as ids: given, or the text with its control tokens
local function completion_ids(v)
  if val(v.completion_tokens) then return ids_of(v.completion_tokens) end
  return tok:encode(v.completion_text, { allowed_special = "all" })
end

function runners.parse_completion(v)
  local tokens = completion_ids(v)
  same_messages(v.expected_messages, harmony.parse(tokens, parse_opts(v)))
  -- the text form parses to the same messages
  if v.completion_text and val(v.completion_text) and not v.completion_pieces then
    same_messages(v.expected_messages, harmony.parse(v.completion_text, parse_opts(v)))
  end
end

function runners.parse_stream(v)
  local o = parse_opts(v)
  local p = harmony.stream_parser { role = o.role, strict = o.strict, lenient = o.lenient, tokenizer = tok }
  local all_deltas = {}
  local function feed(ids)
    local d = {}
    for _, id in ipairs(ids) do
      p:process(id)
      if p.last_content_delta then d[#d + 1] = p.last_content_delta; all_deltas[#all_deltas + 1] = p.last_content_delta end
    end
    return table.concat(d)
  end
  if v.steps then
    for _, step in ipairs(v.steps) do
      local joined = step.process and feed(ids_of(step.process)) or ""
      if step.process_eos then p:process_eos() end
      local e = step.expect
      if e then
        if e.messages then same_messages(e.messages, p.messages) end
        if e.current_content ~= nil then assert.are.equal(e.current_content, p:current_content()) end
        if e.last_content_delta ~= nil then assert.are.equal(val(e.last_content_delta), p.last_content_delta) end
        if e.content_deltas_joined ~= nil then assert.are.equal(e.content_deltas_joined, joined) end
      end
    end
  else
    feed(ids_of(v.completion_tokens))
    if v.process_eos then p:process_eos() end
  end
  if v.expected_message_count then assert.are.equal(v.expected_message_count, #p.messages) end
  if v.expected_messages then same_messages(v.expected_messages, p.messages) end
  if v.expected_content_deltas_joined then assert.are.equal(v.expected_content_deltas_joined, table.concat(all_deltas)) end
end

function runners.error(v)
  local ok, err = pcall(function()
    if v.operation == "parse_stream" then
      local o = parse_opts(v)
      local p = harmony.stream_parser { role = o.role, strict = o.strict, tokenizer = tok }
      for _, id in ipairs(completion_ids(v)) do p:process(id) end
      if v.process_eos ~= false then p:process_eos() end
    elseif v.operation == "render" then
      harmony.render_text(conversation(v))
    else
      harmony.parse(completion_ids(v), parse_opts(v))
    end
  end)
  assert.is_false(ok, "expected an error")
  assert.is_truthy(tostring(err):find(v.expected_error, 1, true), "error '" .. tostring(err) .. "' lacks '" .. v.expected_error .. "'")
end

for _, set in ipairs { "upstream", "own" } do
  local dir = "spec/fixtures/harmony/" .. set
  describe("harmony vectors (" .. set .. ")", function()
    for _, f in ipairs(H.files(dir)) do
      if f:match("%.json$") then
        local v = assert(json.decode(H.read(dir .. "/" .. f)), f)
        local rule = v.rule and (" - " .. v.rule) or ""
        it(f .. rule, function()
          local run = runners[v.kind]
          assert(run, "unknown vector kind " .. tostring(v.kind))
          run(v)
        end)
      end
    end
  end)
end
