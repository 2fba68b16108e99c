--- gptoss.plot: line and scatter charts through gnuplot (Debian's
-- gnuplot-nox), as PNG (the pngcairo terminal) or as text (dumb).
--
--   local plot = require "gptoss.plot"
--   assert(plot.chart({ title = "loss", xlabel = "step", ylabel = "loss",
--     series = { { title = "train", points = { { 1, 2.3 }, { 2, 2.1 } } },
--                { title = "eval", points = { { 2, 2.2 } }, style = "points" } } }, "loss.png"))
--   print(plot.chart(spec, "dumb"))          -- the same chart as text
--
-- The data goes into the script as datablocks, so one script file is all
-- gnuplot reads. Returns true (PNG) or the text (dumb), or nil and a message
-- (gnuplot missing, or its error).
local M = {}

--- whether gnuplot is on PATH
function M.available()
  local h = io.popen("command -v gnuplot 2>/dev/null")
  local out = h and h:read("*a") or ""
  if h then h:close() end
  return out:match("%S") ~= nil
end

local function quote(s)
  return '"' .. tostring(s):gsub("\\", "\\\\"):gsub('"', '\\"') .. '"'
end

local function num(v)
  if v ~= v then return "NaN" end
  if v == math.huge then return "Inf" elseif v == -math.huge then return "-Inf" end
  return string.format("%.10g", v)
end

--- the gnuplot script of a chart for a terminal line and output
function M.script(spec, terminal, output)
  local s = { terminal, output and ("set output " .. quote(output)) or nil }
  for i, ser in ipairs(spec.series) do
    s[#s + 1] = string.format("$d%d << EOD", i)
    for _, p in ipairs(ser.points) do s[#s + 1] = num(p[1]) .. " " .. num(p[2]) end
    s[#s + 1] = "EOD"
  end
  if spec.title then s[#s + 1] = "set title " .. quote(spec.title) end
  if spec.xlabel then s[#s + 1] = "set xlabel " .. quote(spec.xlabel) end
  if spec.ylabel then s[#s + 1] = "set ylabel " .. quote(spec.ylabel) end
  if spec.logx then s[#s + 1] = "set logscale x" end
  if spec.logy then s[#s + 1] = "set logscale y" end
  if spec.xtics then s[#s + 1] = "set xtics " .. spec.xtics end
  s[#s + 1] = "set key " .. (spec.key or "outside right top")
  s[#s + 1] = "set grid"
  s[#s + 1] = "set offsets graph 0.05, graph 0.05, graph 0.05, graph 0.05"
  local parts = {}
  for i, ser in ipairs(spec.series) do
    local style = ser.style or "lines"
    local with = style == "points" and "points pt 7 ps 1.2"
      or style == "linespoints" and "linespoints pt 7 ps 0.8" or "lines lw 2"
    if ser.dash then with = with .. " dt 2" end
    if ser.color then with = with .. " lc " .. ser.color end
    if #ser.points > 0 then
      parts[#parts + 1] = string.format("$d%d using 1:2 with %s title %s", i, with, quote(ser.title or ""))
    end
  end
  if #parts == 0 then return nil, "nothing to plot" end
  s[#s + 1] = "plot " .. table.concat(parts, ", \\\n  ")
  return table.concat(s, "\n") .. "\n"
end

local function run(script)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(script)
  f:close()
  -- the exit status as text: io.popen's close reports it differently in Lua 5.1/LuaJIT and 5.4
  local h = io.popen("gnuplot '" .. path .. "' 2>&1; echo \"gnuplot-exit=$?\"")
  local out = h:read("*a")
  h:close()
  os.remove(path)
  local body, code = out:match("^(.-)gnuplot%-exit=(%d+)%s*$")
  if code == "0" then return body end
  return nil, body or out
end

--- draws the chart into a PNG file (`out` ending in .png) or returns it as
-- text (`out` = "dumb"); opts.width, opts.height in pixels or characters
function M.chart(spec, out, opts)
  opts = opts or {}
  if not M.available() then return nil, "gnuplot not found (Debian: apt-get install gnuplot-nox)" end
  local script, err
  if out == "dumb" then
    script, err = M.script(spec, string.format("set terminal dumb noenhanced size %d,%d", opts.width or 100, opts.height or 28))
  else
    script, err = M.script(spec, string.format("set terminal pngcairo noenhanced size %d,%d font \"sans,10\"",
      opts.width or 900, opts.height or 540), out)
  end
  if not script then return nil, err end
  local text, gerr = run(script)
  if not text then return nil, "gnuplot: " .. tostring(gerr):gsub("%s+$", "") end
  if out == "dumb" then return text end
  local f = io.open(out, "rb")
  if not f then return nil, "gnuplot wrote no " .. out .. ": " .. text end
  f:close()
  return true
end

return M
