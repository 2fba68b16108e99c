--- gptoss: run and adapt OpenAI's gpt-oss models from Lua.
--
-- The C engine (gptoss.core) loads checkpoints, tokenizes and runs the
-- forward pass; this module adds what is easier to write in Lua on top:
-- the streaming decoder, generation loops, chat, loss and perplexity.
local core = require "gptoss.core"

local M = {
  core = core,
  version = core.version,
  load = core.load,
  tokenizer = core.tokenizer,
  safetensors = core.safetensors,
  writer = core.writer,
  sampler = core.sampler,
  batch_step = core.batch_step,
  floats = core.floats,
}

local Tokenizer = core.methods.Tokenizer

--- config(path): the parsed config.json of a model directory (or file),
-- or nil and a message.
function M.config(path)
  local f = io.open(path .. "/config.json", "rb")
  if f then f:close(); path = path .. "/config.json" end
  return core.config_load(path)
end

--- tensor_specs(config): the tensors a checkpoint of this config holds.
function M.tensor_specs(cfg)
  return core.tensor_specs(require("cjson").encode(cfg))
end

-- {====================================================== streaming decoder
-- Number of bytes the UTF-8 sequence starting with byte b should have.
local function seqlen(b)
  if b < 0x80 then return 1 elseif b >= 0xC2 and b <= 0xDF then return 2
  elseif b >= 0xE0 and b <= 0xEF then return 3 elseif b >= 0xF0 and b <= 0xF4 then return 4 end
  return 1   -- invalid lead byte: stands alone (and becomes U+FFFD)
end

-- Splits s into the part that can be emitted now and a trailing incomplete
-- (but so far well-formed) sequence to hold back.
local function split_complete(s)
  local n = #s
  for back = 1, math.min(3, n) do
    local i = n - back + 1
    local b = s:byte(i)
    if b < 0x80 or b >= 0xC0 then
      local want = seqlen(b)
      if want > back then
        for j = i + 1, n do
          local c = s:byte(j)
          if c < 0x80 or c >= 0xC0 then return s, "" end
        end
        return s:sub(1, i - 1), s:sub(i)
      end
      return s, ""
    end
  end
  return s, ""
end
M._split_complete = split_complete

--- tok:decoder([{ bytes = true }]): a streaming decoder. d:feed(id) returns
-- the text that is complete so far (holding back a split UTF-8 sequence),
-- d:flush() what remains (an unfinished sequence becomes U+FFFD).
function Tokenizer:decoder(opts)
  local tok, pending, raw = self, "", opts and opts.bytes
  local d = {}
  function d.feed(_, id)
    local b = tok:decode_bytes({ id })
    if raw then return b end
    local ready
    ready, pending = split_complete(pending .. b)
    return core.utf8_clean(ready)
  end
  function d.flush()
    local rest = pending
    pending = ""
    return raw and "" or core.utf8_clean(rest)
  end
  return d
end
-- }======================================================

return M
