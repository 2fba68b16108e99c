-- gptoss.stats against numpy's definitions, with the values worked out by
-- hand (np.percentile's default "linear" method: rank (n - 1) * q / 100 of
-- the sorted values, interpolated; np.std with ddof 0).
local stats = require "gptoss.stats"

local function nan(x) return x ~= x end

describe("gptoss.stats", function()
  it("percentile is np.percentile (linear), worked by hand", function()
    local v = { 15, 20, 35, 40, 50 }
    -- rank 4 * q / 100: 40 -> 1.6: 20 + 0.6 * 15; 5 -> 0.2: 15 + 0.2 * 5; 30 -> 1.2: 20 + 0.2 * 15
    assert.near(29, stats.percentile(v, 40), 1e-12)
    assert.near(16, stats.percentile(v, 5), 1e-12)
    assert.near(23, stats.percentile(v, 30), 1e-12)
    assert.are.equal(35, stats.percentile(v, 50))
    assert.are.equal(15, stats.percentile(v, 0))
    assert.are.equal(50, stats.percentile(v, 100))
    -- {1, 2, 3, 4}: rank 3 * q / 100; 90 -> 2.7, 95 -> 2.85, 99 -> 2.97
    assert.near(3.7, stats.percentile({ 4, 2, 1, 3 }, 90), 1e-12)
    assert.near(3.85, stats.percentile({ 1, 2, 3, 4 }, 95), 1e-12)
    assert.near(3.97, stats.percentile({ 1, 2, 3, 4 }, 99), 1e-12)
    -- numpy's documentation: a = [[10, 7, 4], [3, 2, 1]]; np.percentile(a, 50) -> 3.5
    assert.near(3.5, stats.percentile({ 10, 7, 4, 3, 2, 1 }, 50), 1e-12)
    -- negatives and fractions: sorted {-1.25, 0.5, 3, 8}, 75 -> rank 2.25: 3 + 0.25 * 5
    assert.near(4.25, stats.percentile({ 0.5, -1.25, 3, 8 }, 75), 1e-12)
    -- 1..20, 95 -> rank 18.05: 19.05
    local t = {}
    for i = 20, 1, -1 do t[#t + 1] = i end
    assert.near(19.05, stats.percentile(t, 95), 1e-12)
    assert.are.equal(42, stats.percentile({ 42 }, 99))
    assert.is_true(nan(stats.percentile({}, 50)))
  end)

  it("leaves its input unsorted", function()
    local v = { 3, 1, 2 }
    stats.percentile(v, 50)
    assert.are.same({ 3, 1, 2 }, v)
  end)

  it("nanpercentile leaves NaN out (np.nanpercentile)", function()
    assert.are.equal(2, stats.nanpercentile({ 1, 0 / 0, 3, 0 / 0, 2 }, 50))
    assert.near(2.5, stats.nanpercentile({ 0 / 0, 1, 4 }, 50), 1e-12)
    assert.is_true(nan(stats.nanpercentile({ 0 / 0 }, 50)))
  end)

  it("std is np.std (ddof 0); mean_sd the sample deviation (ddof 1)", function()
    local v = { 2, 4, 4, 4, 5, 5, 7, 9 }   -- mean 5, squares 32
    assert.are.equal(5, stats.mean(v))
    assert.near(2, stats.std(v), 1e-12)
    local mean, sd = stats.mean_sd(v)
    assert.are.equal(5, mean)
    assert.near(math.sqrt(32 / 7), sd, 1e-12)
    assert.are.same({ 3, 0 }, { stats.mean_sd({ 3 }) })
    assert.is_true(nan(stats.mean({})))
    assert.is_true(nan(stats.std({})))
  end)

  it("summary gives vLLM's statistics of a list", function()
    local s = stats.summary({ 4, 1, 3, 2 })
    assert.are.equal(4, s.n)
    assert.are.equal(2.5, s.mean)
    assert.near(math.sqrt(1.25), s.std, 1e-12)
    assert.are.equal(2.5, s.median)
    assert.near(3.7, s.p90, 1e-12)
    assert.near(3.85, s.p95, 1e-12)
    assert.near(3.97, s.p99, 1e-12)
    assert.are.same({ 1, 4 }, { s.min, s.max })
    local custom = stats.summary({ 15, 20, 35, 40, 50 }, { 40, 99.9 })
    assert.near(29, custom.p40, 1e-12)
    assert.near(40 + 0.996 * 10, custom["p99.9"], 1e-9)   -- rank 3.996
    local empty = stats.summary({})
    assert.are.equal(0, empty.n)
    assert.is_true(nan(empty.mean) and nan(empty.p99) and nan(empty.median))
  end)

  it("names the function, the parameter and the value on bad arguments", function()
    local cases = {
      { function() stats.percentile({ 1 }, 101) end, "stats.percentile: q must be a number in 0..100 (got 101)" },
      { function() stats.percentile({ 1 }, -1) end, "stats.percentile: q must be a number in 0..100 (got -1)" },
      { function() stats.percentile({ 1 }, "50") end, 'stats.percentile: q must be a number in 0..100 (got "50")' },
      { function() stats.percentile("x", 50) end, 'stats.percentile: values must be a list of numbers (got "x")' },
      { function() stats.percentile({ 1, "a" }, 50) end, 'stats.percentile: values[2] must be a number (got "a")' },
      { function() stats.summary({ 1, 2 }, { 200 }) end, "stats.summary: q must be a number in 0..100 (got 200)" },
      { function() stats.nanpercentile({ 1, true }, 50) end, "stats.nanpercentile: values[2] must be a number (got true)" },
      { function() stats.mean(nil) end, "stats.mean: values must be a list of numbers (got nil)" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(c[1])
      assert.is_false(ok)
      assert.matches(c[2], err, 1, true)
    end
    local ok, err = pcall(stats.std, { 1, 0 / 0 })
    assert.is_false(ok)
    assert.matches("stats.std: values[2] must be a number (got ", err, 1, true)
  end)
end)
