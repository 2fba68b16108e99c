-- Replays the corpora `make fuzz` keeps (spec/fixtures/fuzz/<target>/) and
-- every crash it found (spec/fixtures/fuzz/crashes/<target>-*) through the
-- same contracts the fuzz targets check: a loader returns its object or nil
-- and a message, a Lua parser accepts or refuses in its documented way.
-- The tokenizer's corpus is replayed by tokenizer_spec.
local H = require "helpers"
local gptoss = require "gptoss"
local core = require "gptoss.core"
local lfs = require "lfs"
local targets = dofile("tools/fuzz/lua_targets.lua")

local FUZZ = "spec/fixtures/fuzz"

-- the inputs of a target: its corpus and its crashes
local function inputs(target)
  local list = {}
  for _, f in ipairs(H.files(FUZZ .. "/" .. target)) do list[#list + 1] = FUZZ .. "/" .. target .. "/" .. f end
  if lfs.attributes(FUZZ .. "/crashes") then
    for _, f in ipairs(H.files(FUZZ .. "/crashes")) do
      if f:sub(1, #target + 1) == target .. "-" then list[#list + 1] = FUZZ .. "/crashes/" .. f end
    end
  end
  return list
end

-- a loader's answer: an object, or nil and a message (never a raise)
local function loaded_or_refused(path, ok, obj, err)
  assert(ok, path .. ": raised " .. tostring(obj))
  if obj == nil then
    assert(type(err) == "string" and err ~= "", path .. ": refused without a message")
    return false
  end
  return true
end

local dir = H.tmpdir()

local vocab   -- the real vocabulary's trie, built once for gbnf

local replay = {
  -- first byte < 128: a .safetensors file; else an index next to shard a.st
  safetensors = function(path, data)
    local file
    if data:byte(1) < 128 then
      file = dir .. "/in.safetensors"
    else
      file = dir .. "/model.safetensors.index.json"
      local h = '{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
      H.write(dir .. "/a.st", H.st_bytes(h, H.f32le({ 1, 2 })))
    end
    H.write(file, data:sub(2))
    local ok, r, err = pcall(gptoss.safetensors, file)
    if loaded_or_refused(path, ok, r, err) then
      for _, t in ipairs(r:tensors()) do assert(r:tensor(t.name)) end
      r:close()
    end
  end,
  config = function(path, data)
    local ok, c, err = pcall(core.config_parse, data)
    if loaded_or_refused(path, ok, c, err) then
      -- what the engine writes back parses to the same config
      local back = assert(core.config_parse(core.config_json(data)))
      c.bos_token_id, back.bos_token_id = nil, nil   -- config.json as written has no bos_token_id
      assert.are.same(c, back)
    end
  end,
  -- adapter_config.json, FF FE, adapter_model.safetensors
  adapter = function(path, data)
    local cut = data:find("\255\254", 1, true)
    if not cut then return end
    H.write(dir .. "/adapter_config.json", data:sub(1, cut - 1))
    H.write(dir .. "/adapter_model.safetensors", data:sub(cut + 2))
    local ok, a, err = pcall(core.adapter_load, dir)
    if loaded_or_refused(path, ok, a, err) then a:close() end
  end,
  tokjson = function(path, data)
    H.write(dir .. "/tokenizer.json", data)
    local ok, t, err = pcall(gptoss.tokenizer, dir .. "/tokenizer.json")
    if loaded_or_refused(path, ok, t, err) then
      -- a fuzzed vocabulary may not cover every byte: encode may refuse
      local ok2, ids = pcall(t.encode, t, "Hello, world! <|start|>x", { bytes = true, allowed_special = "all" })
      if ok2 then assert(pcall(t.decode_bytes, t, ids)) end
    end
  end,
  -- GBNF text [FF FE bytes]: compiled or refused naming a position; a
  -- grammar that compiles gets a matcher over the real vocabulary whose
  -- masks and byte steps succeed or refuse (too ambiguous, bytes not allowed)
  gbnf = function(path, data)
    local cut = data:find("\255\254", 1, true)
    local text, feed = data, nil
    if cut then text, feed = data:sub(1, cut - 1), data:sub(cut + 2) end
    local ok, g = pcall(core.grammar, text)
    if not ok then
      assert.matches("^grammar: ", tostring(g):gsub("^.-:%d+: ", ""), nil, path)
      return
    end
    vocab = vocab or core.vocab(assert(gptoss.tokenizer(H.tokenizer_dir .. "/tokenizer.json")), 201088)
    local m = core.matcher(g, vocab, { 200002 })
    local refused = "^[^\n]*grammar: too ambiguous"
    local mok, merr = pcall(m.mask, m)
    if not mok then assert.matches(refused, tostring(merr):gsub("^.-:%d+: ", ""), nil, path) end
    if feed then
      local fok, ferr = pcall(m.accept_bytes, m, feed)
      assert(fok, path .. ": accept_bytes raised " .. tostring(ferr))
      mok, merr = pcall(m.mask, m)
      if not mok then assert.matches(refused, tostring(merr):gsub("^.-:%d+: ", ""), nil, path) end
    end
    m:close()
  end,
}

describe("fuzz corpora", function()
  for _, target in ipairs { "safetensors", "config", "adapter", "tokjson", "json", "harmony_text", "harmony_tokens", "jsonl", "gbnf" } do
    it("replays " .. target .. "'s corpus and crashes", function()
      local list = inputs(target)
      assert.is_true(#list >= 2, target .. " has " .. #list .. " inputs")
      for _, path in ipairs(list) do
        local data = H.read(path)
        if replay[target] then replay[target](path, data)
        else
          local ok, err = pcall(targets[target], data)
          assert(ok, path .. ": " .. tostring(err))
        end
      end
    end)
  end
end)
