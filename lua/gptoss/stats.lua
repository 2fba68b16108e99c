--- gptoss.stats: the summary statistics the benchmarks and sweeps report,
-- with numpy's definitions so that numbers compare with vLLM's and Optuna's.
--
--   local stats = require "gptoss.stats"
--   stats.percentile({ 15, 20, 35, 40, 50 }, 40)   --> 29 (np.percentile, linear)
--   stats.summary({ ... })   --> { n, mean, std, median, p90, p95, p99, min, max }
--
-- percentile is np.percentile's default method ("linear": the value at rank
-- (n - 1) * q / 100 of the sorted values, interpolated between the two
-- nearest); std is np.std (population, ddof 0) as vLLM reports it; mean_sd
-- gives the sample standard deviation (ddof 1) as llama-bench reports it.
-- An empty list has no statistics: every one is NaN (numpy raises instead;
-- a benchmark phase with no second token has no TPOT, and says so).
local M = {}

local NAN = 0 / 0

local function quote(v)
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

local function check_values(values, fn)
  if type(values) ~= "table" then
    error(string.format("stats.%s: values must be a list of numbers (got %s)", fn, quote(values)), 3)
  end
  for i, v in ipairs(values) do
    if type(v) ~= "number" or v ~= v then
      error(string.format("stats.%s: values[%d] must be a number (got %s)", fn, i, quote(v)), 3)
    end
  end
end

local function check_q(q, fn)
  if type(q) ~= "number" or not (q >= 0 and q <= 100) then
    error(string.format("stats.%s: q must be a number in 0..100 (got %s)", fn, quote(q)), 3)
  end
end

local function sorted_copy(values)
  local s = {}
  for i, v in ipairs(values) do s[i] = v end
  table.sort(s)
  return s
end

-- the q-th percentile of values already sorted
local function sorted_percentile(s, q)
  if #s == 0 then return NAN end
  local rank = (#s - 1) * q / 100 + 1
  local lo = math.floor(rank)
  local hi = math.min(lo + 1, #s)
  return s[lo] + (s[hi] - s[lo]) * (rank - lo)
end

--- percentile(values, q): np.percentile(values, q) (linear interpolation);
-- values need not be sorted; NaN for an empty list
function M.percentile(values, q)
  check_values(values, "percentile")
  check_q(q, "percentile")
  return sorted_percentile(sorted_copy(values), q)
end

--- nanpercentile(values, q): np.nanpercentile: the NaNs left out (as
-- Optuna's and Ray Tune's pruners take their cutoffs); NaN when none is left
function M.nanpercentile(values, q)
  if type(values) ~= "table" then check_values(values, "nanpercentile") end
  check_q(q, "nanpercentile")
  local kept = {}
  for i, v in ipairs(values) do
    if type(v) ~= "number" then
      error(string.format("stats.nanpercentile: values[%d] must be a number (got %s)", i, quote(v)), 2)
    end
    if v == v then kept[#kept + 1] = v end
  end
  return sorted_percentile(sorted_copy(kept), q)
end

--- mean(values): NaN for an empty list
function M.mean(values)
  check_values(values, "mean")
  if #values == 0 then return NAN end
  local sum = 0
  for _, v in ipairs(values) do sum = sum + v end
  return sum / #values
end

local function squares(values, mean)
  local q = 0
  for _, v in ipairs(values) do q = q + (v - mean) ^ 2 end
  return q
end

--- std(values): np.std, the population standard deviation (ddof 0)
function M.std(values)
  check_values(values, "std")
  if #values == 0 then return NAN end
  return math.sqrt(squares(values, M.mean(values)) / #values)
end

--- mean_sd(values) -> mean, sample standard deviation (ddof 1; 0 for one value)
function M.mean_sd(values)
  check_values(values, "mean_sd")
  local mean = M.mean(values)
  if #values < 2 then return mean, #values == 1 and 0 or NAN end
  return mean, math.sqrt(squares(values, mean) / (#values - 1))
end

--- the percentiles summary() reports, and their names (vLLM's p_word: 99 -> "p99")
M.PERCENTILES = { 90, 95, 99 }

--- summary(values [, percentiles]) -> { n, mean, std, median, min, max,
-- p90, p95, p99 } (or the percentiles given, each as "p" .. q)
function M.summary(values, percentiles)
  check_values(values, "summary")
  local s = sorted_copy(values)
  local out = { n = #s, mean = M.mean(s), std = M.std(s), median = sorted_percentile(s, 50),
                min = s[1] or NAN, max = s[#s] or NAN }
  for _, q in ipairs(percentiles or M.PERCENTILES) do
    check_q(q, "summary")
    out["p" .. (q == math.floor(q) and string.format("%d", q) or tostring(q))] = sorted_percentile(s, q)
  end
  return out
end

return M
