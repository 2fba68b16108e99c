#!/usr/bin/env lua
--- examples/learn.lua: continuous learning from a conversation log, on one
-- model that keeps serving (gptoss.learn).
--
--   lua5.4 examples/learn.lua MODEL_DIR LOG.jsonl [LEARN_DIR]
--
-- LOG.jsonl holds one conversation a line as a server would log it:
-- { "messages": [...], "rating": 1-5, "correction": "...", "tags": [...] }.
-- Each line is logged into LEARN_DIR (default: a temporary directory) and
-- answered through the engine by the version of its adapter served at that
-- moment, while the learner's policy starts training rounds between the
-- serving steps (share 0.3); every round prints its held-out loss before and
-- after and whether it made a new version. DEVICE, THREADS, EVERY (new
-- examples per round, default 8) and MAX_TOKENS (default 32) from the
-- environment.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"
local cjson = require "cjson"

local dir, log = arg[1], arg[2]
if not dir or not log then
  io.stderr:write("usage: lua5.4 examples/learn.lua MODEL_DIR LOG.jsonl [LEARN_DIR]\n")
  os.exit(2)
end
local env = function(k, d) local v = os.getenv(k); if v == nil or v == "" then return d end return v end
local model, err = gptoss.load(dir, { device = env("DEVICE", "cpu"), threads = tonumber(env("THREADS", "0")) })
if not model then io.stderr:write("learn: ", err, "\n"); os.exit(1) end
local out = arg[3] or os.tmpname() .. ".learn"
local eng = gptoss.engine(model)
local L = assert(gptoss.learn.open(out, { engine = eng, every = tonumber(env("EVERY", "8")), share = 0.3 }))

local function report(events)
  for _, ev in ipairs(events) do
    if ev.result then
      local r = ev.result
      print(string.format("round %s: %d examples, held-out loss %.4f -> %.4f, %s (serving v%d)", ev.name, #r.examples,
        r.eval_before, r.eval_after, r.accepted and "new version" or "kept", r.version))
    elseif ev.error then
      print(string.format("round %s: %s", ev.name, ev.error))
    end
  end
end

local pending = {}
local n = 0
for line in io.lines(log) do
  if line ~= "" then
    n = n + 1
    local rec = cjson.decode(line)
    L:log(rec)
    -- answer the conversation's first user turn with the version served now
    local name, lora, version = L:choose(rec)
    local prompt = {}
    for _, m in ipairs(rec.messages) do if m.role ~= "assistant" then prompt[#prompt + 1] = m end end
    local ids = require("gptoss.harmony").render({ messages = prompt, mode = "completion" }, model.tokenizer)
    local req = assert(eng:submit(ids, { adapter = lora, max_tokens = tonumber(env("MAX_TOKENS", "32")) }))
    pending[#pending + 1] = { req = req, n = n, name = name, version = version }
    report(L:tick())
    for i = #pending, 1, -1 do
      local p = pending[i]
      local _, _, done = p.req:poll()
      if done then
        print(string.format("conversation %d answered by %s v%d", p.n, p.name, p.version))
        table.remove(pending, i)
      end
    end
  end
end
for _, p in ipairs(pending) do
  p.req:result()
  print(string.format("conversation %d answered by %s v%d", p.n, p.name, p.version))
end
repeat report(L:wait()); report(L:tick()) until not next(L.rounds)
for _, v in ipairs(L:versions()) do
  print(string.format("version %d: held-out loss %.4f (was %.4f), %d examples", v.version, v.eval_loss, v.eval_before, v.examples))
end
print("learner directory: " .. out)
eng:close()
