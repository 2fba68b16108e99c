--- The npm packages the specs run (the independent validators and the real
-- client), installed into the repository's git-ignored node_modules. All of
-- them at once, whichever spec asks first: npm removes what a --no-save
-- install does not name, so installing one set apart would take the others
-- away from the next spec.
local H = require "helpers"

local N = {}

N.PACKAGES = { ajv = "8", ["ajv-formats"] = "3", ["ajv-draft-04"] = "1", openai = "6" }

function N.sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("*a")
  local ok = p:close()
  return out, ok
end

N.root = (function()
  local p = io.popen("pwd")
  local d = p:read("*l")
  p:close()
  return d
end)()

--- install() -> true | nil, message
function N.install()
  local missing, names = false, {}
  for name, major in pairs(N.PACKAGES) do
    if not H.exists("node_modules/" .. name .. "/package.json") then missing = true end
    names[#names + 1] = name .. "@" .. major
  end
  if not missing then return true end
  table.sort(names)
  local out, ok = N.sh("npm install --no-save --no-package-lock --no-audit --no-fund --prefix '" .. N.root .. "' "
    .. table.concat(names, " "))
  if not ok then return nil, "npm install " .. table.concat(names, " ") .. ": " .. out end
  return true
end

return N
