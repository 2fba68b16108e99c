--- tools/warpsim/gen.lua: the kernels' own source, made ready for the warp
-- simulation (tools/warpsim/warp.cpp): the device helpers the mma.sync
-- kernels call, cut out of kernels/common.cuh, and kernels/moe_mma.cu and
-- kernels/dense_mma.cu with their launches turned into launch_k calls.
-- Nothing of a kernel's body is rewritten, so the simulation runs what the
-- GPU runs, lane by lane.
--
--   lua5.4 tools/warpsim/gen.lua OUTDIR     (make warpsim runs it)
local out = assert(arg[1], "usage: gen.lua OUTDIR")

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end
local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- a helper's definition: its line (and a template line above), through the
-- first line that is a lone "}"
local lines = {}
for l in (read("kernels/common.cuh") .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
local function definition(name)
  for i, l in ipairs(lines) do
    if l:match("^__device__ __forceinline__ .-[%s%*&]" .. name .. "%(") then
      local first = lines[i - 1] and lines[i - 1]:match("^template") and i - 1 or i
      for j = i, #lines do
        if lines[j] == "}" then return table.concat(lines, "\n", first, j) .. "\n" end
      end
    end
  end
  error("kernels/common.cuh: no definition of " .. name)
end
local helpers = {}
for _, name in ipairs { "fp4x8_bf16", "swiglu", "pack_bf16", "split_pair", "mma_k8x2" } do
  helpers[#helpers + 1] = definition(name)
end
write(out .. "/helpers.inc", "// cut out of kernels/common.cuh by tools/warpsim/gen.lua\n" .. table.concat(helpers, "\n"))

for _, name in ipairs { "moe_mma", "dense_mma" } do
  local s = read("kernels/" .. name .. ".cu")
  local launches = 0
  local function launch(k, grid, block) launches = launches + 1; return "launch_k(" .. k .. ", " .. grid .. ", " .. block .. ", " end
  s = s:gsub('#include "common.cuh"', '#include "shim.h"')
  s = s:gsub("%f[%w_]NULL%f[^%w_]", "nullptr")
  s = s:gsub("([%w_]+<[^<>]*>)<<<([^,]+), ([^,]+), 0, s>>>%(", launch)
  s = s:gsub("([%w_]+)<<<([^,]+), ([^,]+), 0, s>>>%(", launch)
  assert(launches > 0 and not s:find("<<<"), "kernels/" .. name .. ".cu: a launch gen.lua cannot turn into launch_k")
  write(out .. "/" .. name .. ".cpp", "// made from kernels/" .. name .. ".cu by tools/warpsim/gen.lua\n#line 1 \"kernels/" .. name .. ".cu\"\n" .. s)
end
