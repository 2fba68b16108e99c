--- A checkpoint whose reply is known in advance, for the server specs: the
-- tiny random model with a few rows of its embedding and unembedding
-- rewritten so that each token of a chain predicts the next one.
--
-- Token a_i's embedding is 1000 along axis i (and 0 elsewhere), which
-- outweighs everything the layers add to the residual stream, so the final
-- norm sees ~8 e_i; the unembedding row of a_(i+1) is 10 e_i, a logit of
-- ~80 against ~N(0,1) for every other token. Whatever the context, after
-- a_i the model says a_(i+1) (with any sampling setting). The chain starts
-- at "assistant", the last token of every harmony prompt, so every chat
-- request gets the scripted reply; tokens in a chain must be distinct.
local cjson = require "cjson"
local H = require "helpers"

local S = {}

local function u64(s, at)
  local n = 0
  for i = at + 7, at, -1 do n = n * 256 + s:byte(i) end
  return n
end

-- bf16 bytes of a row of `width` values, all 0 but `value` at axis
local function bf16_row(width, axis, value)
  local hi = { [1000] = "\x7a\x44", [10] = "\x20\x41" }   -- 1000 = 0x447A, 10 = 0x4120 (bf16, little-endian)
  local zero = "\0\0"
  return zero:rep(axis) .. hi[value] .. zero:rep(width - axis - 1)
end

--- S.write(src_dir, out_dir, chain_text, tokenizer) -> out_dir: src_dir's
-- checkpoint with the chain "assistant" .. chain_text scripted in
function S.write(src, out, text, tok)
  local chain = { tok:encode("assistant")[1] }
  for _, id in ipairs(tok:encode(text, { allowed_special = "all" })) do chain[#chain + 1] = id end
  local seen = {}
  for _, id in ipairs(chain) do
    assert(not seen[id], "scripted: token " .. id .. " appears twice in the chain")
    seen[id] = true
  end
  H.copy_dir(src, out)
  local patches = { ["model.embed_tokens.weight"] = {}, ["lm_head.weight"] = {} }
  for i = 1, #chain - 1 do
    patches["model.embed_tokens.weight"][chain[i]] = { axis = i - 1, value = 1000 }
    patches["lm_head.weight"][chain[i + 1]] = { axis = i - 1, value = 10 }
  end
  for _, f in ipairs(H.files(out)) do
    if f:match("%.safetensors$") then
      local data = H.read(out .. "/" .. f)
      local hlen = u64(data, 1)
      local header = cjson.decode(data:sub(9, 8 + hlen))
      local base = 8 + hlen
      local pieces, pos = {}, 1
      local edits = {}
      for name, rows in pairs(patches) do
        local t = header[name]
        if t then
          assert(t.dtype == "BF16", name .. " is not bf16")
          local width = t.shape[2]
          assert(#chain <= width, "scripted: the chain is longer than the hidden size")
          for id, p in pairs(rows) do
            edits[#edits + 1] = { at = base + t.data_offsets[1] + id * width * 2, bytes = bf16_row(width, p.axis, p.value) }
          end
        end
      end
      table.sort(edits, function(a, b) return a.at < b.at end)
      for _, e in ipairs(edits) do
        pieces[#pieces + 1] = data:sub(pos, e.at)
        pieces[#pieces + 1] = e.bytes
        pos = e.at + #e.bytes + 1
      end
      pieces[#pieces + 1] = data:sub(pos)
      H.write(out .. "/" .. f, table.concat(pieces))
    end
  end
  return out
end

return S
