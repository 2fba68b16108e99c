--- bench/tokenizer.lua: encode and decode throughput on the parity corpus,
-- single-threaded, beside tiktoken on the same machine in the same run when
-- python3 and tiktoken are there; and the time to load tokenizer.json.
--
--   lua5.4 bench/tokenizer.lua [TOKENIZER_DIR] [REPEATS]
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"

local dir = arg[1] or "tokenizer"
local repeats = tonumber(arg[2] or "5")
local corpus = "spec/fixtures/tokenizer/corpus"

local clock = gptoss.core.clock   -- wall time

local loads = {}
for i = 1, 5 do
  local t0 = clock()
  local t = assert(gptoss.tokenizer(dir))
  loads[i] = clock() - t0
  t:close()
end
table.sort(loads)
local tok = assert(gptoss.tokenizer(dir))

local docs, nbytes = {}, 0
local p = io.popen("ls " .. corpus .. "/*.txt")
for f in p:lines() do
  local h = assert(io.open(f, "rb"))
  docs[#docs + 1] = h:read("*a")
  h:close()
  nbytes = nbytes + #docs[#docs]
end
p:close()

local ids = {}
for i, d in ipairs(docs) do ids[i] = tok:encode(d) end
local enc, dec = {}, {}
for r = 1, repeats do
  local t0 = clock()
  for _, d in ipairs(docs) do tok:encode(d) end
  enc[r] = clock() - t0
  t0 = clock()
  for _, v in ipairs(ids) do tok:decode_bytes(v) end
  dec[r] = clock() - t0
end
table.sort(enc)
table.sort(dec)
local med = function(v) return v[math.floor(#v / 2) + 1] end
local ntok = 0
for _, v in ipairs(ids) do ntok = ntok + #v end

local rows = { { "gptoss " .. gptoss.version, nbytes / med(enc) / 1e6, nbytes / med(dec) / 1e6, med(loads) } }
local py = io.popen(string.format("python3 tools/reference/tokenizer_bench.py %s/tokenizer.json %s %d 2>/dev/null", dir, corpus, repeats))
local line = py and py:read("*l")
if py then py:close() end
if line then
  local cjson = require "cjson"
  local ok, r = pcall(cjson.decode, line)
  if ok then rows[#rows + 1] = { r.impl, r.encode_MBps, r.decode_MBps, r.load_s } end
end

print(string.format("corpus: %d documents, %.2f MB, %d tokens; %d repeats, median; one thread", #docs, nbytes / 1e6, ntok, repeats))
print(string.format("| %-22s | %12s | %12s | %10s |", "tokenizer", "encode MB/s", "decode MB/s", "load s"))
print("|------------------------|--------------|--------------|------------|")
for _, r in ipairs(rows) do
  print(string.format("| %-22s | %12.2f | %12.2f | %10.3f |", r[1], r[2], r[3], r[4]))
end
if #rows == 2 then print(string.format("encode ratio gptoss/tiktoken: %.2f", rows[1][2] / rows[2][2])) end
