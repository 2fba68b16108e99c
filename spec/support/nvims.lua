--- The Neovims the plugin's specs drive, oldest first: Debian 12's (the
-- `nvim` on PATH, 0.7.2, `vim.loop`) and current releases (`vim.uv`):
-- Debian 13's (0.10.4) and Debian unstable's (0.12 in December 2026),
-- fetched by tools/fetch_nvim.sh into build/ the first time a spec asks. Each entry: { cmd = path, version = "0.10.4" },
-- or { missing = why } for one that could not be had, which the specs
-- report as a failure, not a pending: CI has Debian's mirrors.
local N = {}

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("*a")
  local ok = p:close()
  return out, ok == true or ok == 0
end

local function version(cmd)
  local out, ok = sh(cmd .. " --version")
  return ok and out:match("^NVIM v(%d+%.%d+%.%d+)") or nil
end

-- Debian's stable release (13) and unstable (the newest Neovim Debian has)
N.FETCHED = { { dir = "build/nvim-current", suite = "trixie" }, { dir = "build/nvim-unstable", suite = "sid" } }

local list
function N.list()
  if list then return list end
  list = {}
  local v = version("nvim")
  list[1] = v and { cmd = "nvim", version = v } or { missing = "nvim is not installed (tools/install_deps.sh installs it)" }
  for _, d in ipairs(N.FETCHED) do
    local out, ok = sh("tools/fetch_nvim.sh " .. d.dir .. " " .. d.suite)
    local cmd = ok and out:match("([^\n]+)\n?$")
    v = cmd and version(cmd)
    list[#list + 1] = v and { cmd = cmd, version = v } or { missing = "tools/fetch_nvim.sh " .. d.suite .. ": " .. out }
  end
  return list
end

return N
