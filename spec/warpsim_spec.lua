-- kernels/moe_mma.cu and kernels/dense_mma.cu, their own source run lane by
-- lane on the CPU (tools/warpsim, built by make warpsim): each warp's
-- mma.sync is rebuilt from the PTX ISA's fragment layouts, a lane's loads
-- go through exact-size buffers under AddressSanitizer, and the products
-- are checked against double-precision sums, over the tails a GPU meets
-- (experts of 0 to 70 rows, weight rows and K no multiple of the tiles, K
-- slices down to a short last one). The GPU runs the same kernels in
-- kernels_test; this runs them where there is none.
-- a command's output and whether it exited 0 (the status printed by the
-- shell: LuaJIT's close does not give it)
local function run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"exit=$?\""))
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("exit=(%d+)%s*$"))
  return out, code == 0
end

describe("the mma.sync kernels in the warp simulation", function()
  local bin = "build/warpsim/mma_test"

  it("are built from the kernels' source (make warpsim)", function()
    local f = io.open(bin, "rb")
    assert.is_truthy(f, bin .. " is missing: make warpsim builds it (make test does)")
    f:close()
  end)

  it("give the double-precision sums of every case, with no access out of bounds", function()
    local out, ok = run("ASAN_OPTIONS=detect_leaks=0 " .. bin)
    local cases, good = 0, 0
    for line in out:gmatch("[^\n]+") do
      if line:match("max rel") then
        cases = cases + 1
        if line:match(" ok$") then good = good + 1 end
      end
    end
    assert.is_true(ok, out)
    assert.are.equal(cases, good, out)
    assert.is_true(cases >= 26, "too few cases ran:\n" .. out)
    assert.is_truthy(out:match("0 failures"), out)
    assert.is_falsy(out:match("AddressSanitizer"), out)
  end)
end)
