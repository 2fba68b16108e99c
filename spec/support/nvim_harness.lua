-- What the Neovim drivers (nvim_driver.lua, nvim_ask_driver.lua) share,
-- loaded with dofile inside `nvim --headless --clean`: the result written to
-- $GPTOSS_NVIM_OUT/result.json, steps run one after the other in the main
-- loop, the editor loop's worst delay measured by a 10 ms repeating timer,
-- and `when` to continue once a condition holds.
local uv = vim.uv or vim.loop
local json = require "gptoss.json"
local D = { res = {}, steps = {} }

--- writes the result (err: why the run stopped, or nil) and quits
function D.finish(err)
  D.res.error = err
  local f = io.open(os.getenv("GPTOSS_NVIM_OUT") .. "/result.json", "wb")
  f:write(json.encode_compact(D.res))
  f:close()
  vim.cmd("qall!")
end

-- the worst delay of the 10 ms timer, in ms past its period
local worst, last = 0, nil
local timer = uv.new_timer()
timer:start(10, 10, function()
  local now = uv.hrtime()
  if last then worst = math.max(worst, (now - last) / 1e6 - 10) end
  last = now
end)
function D.worst() return worst end
--- starts the measure over: from the next tick, or (from_now) from now, so
-- that a block right after the reset counts too
function D.reset_worst(from_now) last, worst = from_now and uv.hrtime() or nil, 0 end

--- then_fn runs in the main loop once cond() holds (checked every 5 ms)
function D.when(cond, then_fn)
  local t = uv.new_timer()
  t:start(5, 5, vim.schedule_wrap(function()
    if t:is_active() and cond() then t:stop(); t:close(); then_fn() end
  end))
end

-- each step gets next_step, which schedules the one after it
local function run(i)
  local s = D.steps[i]
  if not s then return D.finish(nil) end
  local ok, err = pcall(s, function() vim.schedule(function() run(i + 1) end) end)
  if not ok then D.finish(tostring(err)) end
end
function D.start() vim.schedule(function() run(1) end) end

return D
