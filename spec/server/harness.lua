--- The server specs' harness: real nginx instances started with
-- tools/serve.sh on free local ports, and HTTP through curl and through the
-- official OpenAI SDK for Node (spec/server/sdk.mjs).
local cjson = require "cjson"
local H = require "helpers"

local X = {}

X.root = require("support.npm").root

-- runs a shell command: its output (stdout and stderr) and whether it
-- exited 0 (read from the shell, as LuaJIT's close does not give it)
local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1; echo \"rc=$?\"")
  local out = p:read("*a")
  p:close()
  local text, rc = out:match("^(.-)rc=(%d+)\n?$")
  return text, rc == "0", tonumber(rc)
end
X.sh = sh

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
X.q = q

function X.sleep(s) sh("sleep " .. s) end

--- whether this machine can run the specs: nginx with the Lua module, the
-- LuaJIT build, curl and node
function X.missing()
  for _, need in ipairs {
    { "command -v nginx || command -v openresty", "nginx (apt-get install nginx libnginx-mod-http-lua lua-resty-core)" },
    { "test -f /usr/lib/nginx/modules/ngx_http_lua_module.so || command -v openresty", "libnginx-mod-http-lua" },
    { "test -f build/luajit/gptoss/core.so", "the LuaJIT build (make LUA=luajit)" },
    { "command -v curl", "curl" }, { "command -v node", "node" },
  } do
    local _, ok = sh(need[1])
    if not ok then return need[2] end
  end
end

--- installs the SDK into the repository's (git-ignored) node_modules
function X.sdk() return assert(require("support.npm").install()) end

-- {====================================================== instances
local Instance = {}
Instance.__index = Instance

--- X.start(env, opts) -> an instance serving on a free port; env: the
-- GPTOSS_* settings; opts.wait = false returns before the model is ready
function X.start(env, opts)
  opts = opts or {}
  local run = H.tmpdir()
  for _ = 1, 20 do
    local port = math.random(20000, 60000)
    local vars = { "RUN_DIR=" .. q(run), "PORT=" .. port, "DAEMON=on", "GPTOSS_TOKENIZER_DIR=" .. q(H.tokenizer_dir) }
    for k, v in pairs(env) do vars[#vars + 1] = k .. "=" .. q(v) end
    if opts.max_body then vars[#vars + 1] = "MAX_BODY=" .. opts.max_body end
    local out, ok = sh("env " .. table.concat(vars, " ") .. " tools/serve.sh")
    if ok then
      local inst = setmetatable({ port = port, run = run, base = "http://127.0.0.1:" .. port,
                                  pid = tonumber(H.read(run .. "/nginx.pid")) }, Instance)
      if opts.wait ~= false then inst:wait_ready() end
      return inst
    end
    if not out:find("in use", 1, true) then error("nginx did not start: " .. out .. "\n" .. (H.exists(run .. "/error.log") and H.read(run .. "/error.log") or "")) end
  end
  error("no free port found")
end

function Instance:wait_ready(status)
  for _ = 1, 200 do
    local r = self:get("/health")
    if r.status == (status or 200) then return r end
    X.sleep(0.1)
  end
  error("the server did not become ready: " .. H.read(self.run .. "/error.log"))
end

--- the worker process (one worker per instance)
function Instance:worker()
  local out = sh("pgrep -P " .. self.pid)
  return tonumber(out:match("%d+"))
end

function Instance:rss_kb()
  local s = H.read("/proc/" .. self:worker() .. "/status")
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

function Instance:stop()
  sh("kill -QUIT " .. self.pid)
  for _ = 1, 100 do
    local _, alive = sh("kill -0 " .. self.pid)
    if not alive then return end
    X.sleep(0.05)
  end
  sh("kill -KILL " .. self.pid)
end

--- curl: { status, headers (lower-case names), body, json, time }
function Instance:request(method, path, body, headers)
  local args = { "curl -s -S -o - -D " .. q(self.run .. "/headers") .. " -w '\\n%{time_total}' -X " .. method }
  for k, v in pairs(headers or {}) do args[#args + 1] = "-H " .. q(k .. ": " .. v) end
  if body then
    local f = self.run .. "/request.json"
    H.write(f, type(body) == "table" and cjson.encode(body) or body)
    args[#args + 1] = "-H 'Content-Type: application/json' --data-binary @" .. q(f)
  end
  args[#args + 1] = q(self.base .. path)
  local out = sh(table.concat(args, " "))
  local text, time = out:match("^(.*)\n([%d.]+)$")
  local raw = H.read(self.run .. "/headers")
  local r = { status = tonumber(raw:match("^HTTP/%S+ (%d+)")), headers = {}, body = text, time = tonumber(time) }
  for k, v in raw:gmatch("\n([^:\r\n]+):%s*([^\r\n]*)") do r.headers[k:lower()] = v end
  local ok, j = pcall(cjson.decode, text or "")
  if ok then r.json = j end
  return r
end

function Instance:get(path, headers) return self:request("GET", path, nil, headers) end
function Instance:post(path, body, headers) return self:request("POST", path, body, headers) end

--- the SSE events of a streamed reply: a list of data payloads (decoded,
-- or the literal "[DONE]") and the event names
function X.sse(body)
  local data, names = {}, {}
  for block in (body .. "\n\n"):gmatch("(.-)\n\n") do
    local ev = block:match("^event: ([^\n]+)")
    local d = block:match("data: (.*)$")
    if d then
      names[#names + 1] = ev
      data[#data + 1] = d == "[DONE]" and d or cjson.decode(d)
    end
  end
  return data, names
end

--- one Prometheus sample's value from /metrics text
function X.metric(text, name, labels)
  for line in text:gmatch("[^\n]+") do
    if line:sub(1, #name + 1) == name .. "{" and (not labels or line:find(labels, 1, true)) then
      return tonumber(line:match(" (%S+)$"))
    end
  end
end

--- the SDK scenario's findings
function Instance:sdk(scenario, model, env)
  local vars = ""
  for k, v in pairs(env or {}) do vars = vars .. k .. "=" .. q(v) .. " " end
  local err = self.run .. "/sdk.err"
  local out, ok = sh(vars .. "node spec/server/sdk.mjs " .. q(self.base .. "/v1") .. " " .. scenario .. " " .. q(model or "")
    .. " 2>" .. q(err))
  assert(ok, "sdk " .. scenario .. ": " .. out .. H.read(err))
  return cjson.decode(out)
end
-- }======================================================

return X
