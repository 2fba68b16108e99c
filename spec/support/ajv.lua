--- ajv (draft 2020-12, with ajv-formats), the independent JSON Schema
-- validator of the constraint specs: installed by npm into the git-ignored
-- node_modules, run by spec/support/ajv_validate.cjs.
local H = require "helpers"
local json = require "gptoss.json"

local A = {}

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("*a")
  local ok = p:close()
  return out, ok
end

function A.install()
  if H.exists("node_modules/ajv/package.json") and H.exists("node_modules/ajv-formats/package.json") then return end
  local p = io.popen("pwd")
  local root = p:read("*l")
  p:close()
  local out, ok = sh("npm install --no-save --no-package-lock --no-audit --no-fund --prefix '" .. root .. "' ajv@8 ajv-formats@3")
  assert(ok, "npm install ajv: " .. out)
end

--- validate({ { schema = JSON text, text = JSON text to check }, ... }) -> { { ok, error }, ... }
function A.validate(cases)
  local parts = {}
  for i, c in ipairs(cases) do parts[i] = '{"schema":' .. c.schema .. ',"text":' .. json.encode_compact(c.text) .. "}" end
  local file = H.tmpdir() .. "/cases.json"
  H.write(file, "[" .. table.concat(parts, ",") .. "]")
  local out, ok = sh("node spec/support/ajv_validate.cjs '" .. file .. "'")
  assert(ok, "ajv_validate: " .. out)
  return json.decode(out)
end

--- raises listing every case ajv rejects
function A.expect_valid(cases, what)
  local res, bad = A.validate(cases), {}
  for i, r in ipairs(res) do
    if not r.ok then bad[#bad + 1] = string.format("%s %d: %s\n  schema %s\n  text %q", what, i, r.error, cases[i].schema, cases[i].text) end
  end
  assert(#bad == 0, table.concat(bad, "\n"))
end

return A
