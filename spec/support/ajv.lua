--- ajv (draft 2020-12, with ajv-formats), the independent JSON Schema
-- validator of the constraint specs: installed by npm into the git-ignored
-- node_modules, run by spec/support/ajv_validate.cjs.
local H = require "helpers"
local json = require "gptoss.json"

local A = {}

local sh = require("support.npm").sh

function A.install() assert(require("support.npm").install()) end

--- validate({ { schema = JSON text, text = JSON text to check }, ... }) -> { { ok, error }, ... }
-- script: the node validator (default spec/support/ajv_validate.cjs); a
-- case's draft, when it has one, goes to it beside the schema
function A.validate(cases, script)
  script = script or "spec/support/ajv_validate.cjs"
  local parts = {}
  for i, c in ipairs(cases) do
    parts[i] = "{" .. (c.draft and '"draft":"' .. c.draft .. '",' or "") .. '"schema":' .. c.schema .. ',"text":'
      .. json.encode_compact(c.text) .. "}"
  end
  local file = H.tmpdir() .. "/cases.json"
  H.write(file, "[" .. table.concat(parts, ",") .. "]")
  local out, ok = sh("node " .. script .. " '" .. file .. "'")
  assert(ok, script .. ": " .. out)
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
