--- gptoss.llama_cpp: llama.cpp's llama-bench on the same checkpoint, for
-- side-by-side numbers in one run (`gptoss bench --llama-cpp DIR`, or
-- LLAMA_CPP=DIR; bench/llm.lua too).
--
--   local L = assert(require("gptoss.llama_cpp").find(os.getenv("LLAMA_CPP")))
--   local gguf = assert(L:convert("/tmp/gptoss-20b"))          -- MXFP4 experts, Q8_0 elsewhere
--   local rows = assert(L:bench(gguf, { n_prompt = { 512 }, n_gen = { 128 }, n_depth = { 0 }, repetitions = 3 }))
--
-- DIR is a llama.cpp build as its own tree lays it out: bin/llama-bench
-- (with its shared libraries beside it) and convert_hf_to_gguf.py with
-- gguf-py/. The conversion is llama.cpp's own (`--outtype q8_0`, which keeps
-- the experts MXFP4: how gpt-oss GGUFs are published); its output is kept
-- beside a stamp of the checkpoint it came from and made again only when the
-- checkpoint changes. llama-bench runs with every layer on the GPU and flash
-- attention (-ngl 99 -fa 1), the same tests as gptoss.bench (pp, tg, pp+tg,
-- at depth) and repetitions, and its JSON is read back. Failures return nil
-- and a message naming the file or the command.
local files = require "gptoss.files"

local M = {}
M.__index = M

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local quote, read_all = files.shell_quote, files.read_file

--- M.find(dir) -> the build, or nil and what is missing
function M.find(dir)
  if type(dir) ~= "string" or dir == "" then return nil, "llama.cpp: no directory given (LLAMA_CPP or --llama-cpp)" end
  dir = dir:gsub("/+$", "")
  local self = setmetatable({ dir = dir, bench_bin = dir .. "/bin/llama-bench", converter = dir .. "/convert_hf_to_gguf.py" }, M)
  if not exists(self.bench_bin) then return nil, "llama.cpp: " .. self.bench_bin .. " not found" end
  if not exists(self.converter) then return nil, "llama.cpp: " .. self.converter .. " not found" end
  return self
end

-- the environment its binaries and converter run in: their shared libraries
-- (beside them, and NCCL's from the Python wheel where the build links it),
-- gguf-py on the Python path
function M:env()
  local libs = { self.dir .. "/bin" }
  local h = io.popen("python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) + \"/lib\")' 2>/dev/null")
  local nccl = h and h:read("*l")
  if h then h:close() end
  if nccl and nccl ~= "" then libs[#libs + 1] = nccl end
  libs[#libs + 1] = "/usr/local/cuda/lib64"
  local ld = os.getenv("LD_LIBRARY_PATH")
  if ld and ld ~= "" then libs[#libs + 1] = ld end
  return string.format("LD_LIBRARY_PATH=%s PYTHONPATH=%s", quote(table.concat(libs, ":")),
    quote(self.dir .. "/gguf-py:" .. self.dir))
end

-- what identifies a checkpoint's contents: its files' names, sizes and times
local function stamp_of(ckpt)
  local h = io.popen("cd " .. quote(ckpt) .. " && ls -l --time-style=+%s -- *.json *.safetensors 2>/dev/null")
  if not h then return nil end
  local s = h:read("*a")
  h:close()
  return s ~= "" and s or nil
end

--- L:convert(checkpoint_dir [, out]) -> the GGUF's path, or nil and why.
-- out defaults to <checkpoint_dir>.q8_0.gguf beside it (GPTOSS_GGUF_DIR
-- elsewhere).
function M:convert(ckpt, out)
  ckpt = ckpt:gsub("/+$", "")
  if not exists(ckpt .. "/config.json") then return nil, "llama.cpp: " .. ckpt .. "/config.json not found" end
  if not out then
    local where = os.getenv("GPTOSS_GGUF_DIR")
    out = where and (where:gsub("/+$", "") .. "/" .. ckpt:match("[^/]+$") .. ".q8_0.gguf") or ckpt .. ".q8_0.gguf"
  end
  local stamp = stamp_of(ckpt)
  if not stamp then return nil, "llama.cpp: cannot list " .. ckpt end
  if exists(out) and read_all(out .. ".stamp") == stamp then return out end
  os.remove(out)
  local tmp = out .. ".part"
  local log = out .. ".log"
  local cmd = string.format("%s python3 %s %s --outtype q8_0 --outfile %s > %s 2>&1", self:env(), quote(self.converter),
    quote(ckpt), quote(tmp), quote(log))
  local ok = os.execute(cmd)
  if ok ~= true and ok ~= 0 then
    os.remove(tmp)
    local tail = (read_all(log) or ""):match("([^\n]*\n?[^\n]*)\n?$") or ""
    return nil, "llama.cpp: convert_hf_to_gguf.py failed on " .. ckpt .. " (" .. log .. "): " .. tail
  end
  local ren, rerr = os.rename(tmp, out)
  if not ren then return nil, "llama.cpp: " .. tostring(rerr) end
  files.write_file(out .. ".stamp", stamp)
  return out
end

local function list(t) local s = {} for i, v in ipairs(t) do s[i] = tostring(v) end return table.concat(s, ",") end

--- L:bench(gguf, opts) -> llama-bench's results, or nil and why. opts as
-- gptoss.bench.run takes them: n_prompt, n_gen (lists), pg (list of
-- { pp, tg }), n_depth (list), repetitions. Each result is llama-bench's
-- JSON object (n_prompt, n_gen, n_depth, avg_ts, stddev_ts, samples_ts,
-- build_commit, ...) with test, its name as gptoss.bench writes it.
function M:bench(gguf, opts)
  local json = require "gptoss.json"
  local name = require("gptoss.bench").name
  local args = { "-m", quote(gguf), "-ngl", "99", "-fa", "1", "-r", tostring(opts.repetitions or 5), "-o", "json" }
  local p, n = opts.n_prompt or { 512 }, opts.n_gen or { 128 }
  -- llama-bench runs no pp test for -p 0 and no tg test for -n 0, as gptoss.bench
  args[#args + 1] = "-p " .. list(p)
  args[#args + 1] = "-n " .. list(n)
  for _, pg in ipairs(opts.pg or {}) do args[#args + 1] = string.format("-pg %d,%d", pg[1], pg[2]) end
  args[#args + 1] = "-d " .. list(opts.n_depth or { 0 })
  local out = os.tmpname()
  local errf = out .. ".err"
  local cmd = string.format("%s %s %s > %s 2> %s", self:env(), quote(self.bench_bin), table.concat(args, " "), quote(out), quote(errf))
  local ok = os.execute(cmd)
  local text, err = read_all(out), read_all(errf) or ""
  os.remove(out); os.remove(errf)
  if ok ~= true and ok ~= 0 then
    return nil, "llama.cpp: llama-bench failed: " .. (err:match("([^\n]+)\n?$") or "no message")
  end
  local okj, rows = pcall(json.decode, text or "")
  if not okj or type(rows) ~= "table" then return nil, "llama.cpp: llama-bench printed no JSON array" end
  for _, r in ipairs(rows) do
    r.test = name { n_prompt = r.n_prompt or 0, n_gen = r.n_gen or 0, n_depth = r.n_depth or 0 }
  end
  return rows
end

--- M.side_by_side(ours, theirs) -> a Markdown table: each test's t/s in
-- gptoss and in llama.cpp, and their ratio (gptoss / llama.cpp)
function M.side_by_side(ours, theirs)
  local by = {}
  for _, r in ipairs(theirs) do by[r.test] = r end
  local lines = { "| test | gptoss t/s | llama.cpp t/s | gptoss / llama.cpp |", "| --- | ---: | ---: | ---: |" }
  for _, r in ipairs(ours) do
    local t = by[r.test]
    lines[#lines + 1] = string.format("| %s | %.2f ± %.2f | %s | %s |", r.test, r.avg_ts, r.stddev_ts,
      t and string.format("%.2f ± %.2f", t.avg_ts, t.stddev_ts or 0) or "-",
      t and string.format("%.2fx", r.avg_ts / t.avg_ts) or "-")
  end
  return table.concat(lines, "\n") .. "\n"
end

return M
