-- The rock installs from its rockspec with luarocks (no rocks server is
-- reachable, hence --deps-mode none) and the installed module works.
local H = require "helpers"

local function run(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"rc=$?\"")
  local out = p:read("*a")
  p:close()
  return out, tonumber(out:match("rc=(%d+)%s*$"))
end

describe("rockspec", function()
  if jit then
    pending("luarocks for Lua 5.4 only (the LuaJIT build is made by the Makefile)")
    return
  end
  it("installs with luarocks make and loads from the installed tree", function()
    local tree = H.tmpdir() .. "/tree"
    local out, rc = run("luarocks --lua-version 5.4 --tree " .. tree .. " make --deps-mode none gptoss-scm-1.rockspec")
    assert.are.equal(0, rc, out)
    local check = string.format(
      "LUA_PATH='%s/share/lua/5.4/?.lua;%s/share/lua/5.4/?/init.lua;;' LUA_CPATH='%s/lib/lua/5.4/?.so;;' " ..
      "lua5.4 -e 'local g = require \"gptoss\"; local t = assert(g.tokenizer(\"%s\")); " ..
      "print(g.version, package.searchpath(\"gptoss.core\", package.cpath), #t:encode(\"hello world\"))'",
      tree, tree, tree, H.tokenizer_dir)
    out, rc = run("cd /tmp && " .. check)
    assert.are.equal(0, rc, out)
    assert.matches("^0%.1%.0%s+" .. tree:gsub("%p", "%%%0") .. "/lib/lua/5%.4/gptoss/core%.so%s+2", out)
    -- the command line, installed into the tree's bin (a tree of its own needs its paths, as `luarocks path` gives)
    out, rc = run(string.format("cd /tmp && LUA_PATH='%s/share/lua/5.4/?.lua;%s/share/lua/5.4/?/init.lua;;' " ..
      "LUA_CPATH='%s/lib/lua/5.4/?.so;;' %s/bin/gptoss --version", tree, tree, tree, tree))
    assert.are.equal(0, rc, out)
    assert.matches("^gptoss 0%.1%.0", out)
  end)
end)
