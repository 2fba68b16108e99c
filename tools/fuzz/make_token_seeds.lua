-- The harmony_tokens seeds: each harmony_text seed encoded with the real
-- tokenizer, written 3 bytes an id as lua_targets.lua reads them.
--   lua5.4 tools/fuzz/make_token_seeds.lua   (from the repository root)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local gptoss = require "gptoss"
local lfs = require "lfs"
local tok = assert(gptoss.tokenizer(os.getenv("GPTOSS_TOKENIZER_DIR") or "tokenizer"))
local src, dst = "spec/fixtures/fuzz/harmony_text", "spec/fixtures/fuzz/harmony_tokens"
lfs.mkdir(dst)
for name in lfs.dir(src) do
  if name:match("^seed%-") then
    local f = assert(io.open(src .. "/" .. name, "rb"))
    local ids = tok:encode(f:read("a"), { allowed_special = "all" })
    f:close()
    local out = {}
    for i, id in ipairs(ids) do
      -- specials (>= 199998) through the top-bit form, the rest as they are
      if id >= 199990 then out[i] = string.char(128, (id - 199990) // 256, (id - 199990) % 256)
      else out[i] = string.char(id // 65536, id // 256 % 256, id % 256) end
    end
    local o = assert(io.open(dst .. "/" .. name, "wb"))
    o:write(table.concat(out))
    o:close()
  end
end
