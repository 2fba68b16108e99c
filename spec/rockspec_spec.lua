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

  -- what rocks.nvim and lazy.nvim's luarocks support do: a Lua 5.1 tree,
  -- built against Lua 5.1's headers, then loaded into LuaJIT and Neovim
  it("installs for Lua 5.1 with luarocks and loads into LuaJIT and a real Neovim", function()
    local tree = H.tmpdir() .. "/tree51"
    local out, rc = run("luarocks --lua-version 5.1 --tree " .. tree .. " make --deps-mode none gptoss-scm-1.rockspec")
    assert.are.equal(0, rc, out)
    local so = tree .. "/lib/lua/5.1/gptoss/core.so"
    assert.is_true(io.open(so) ~= nil, "no " .. so)
    local paths = string.format("package.path = '%s/share/lua/5.1/?.lua;%s/share/lua/5.1/?/init.lua;' .. package.path; " ..
      "package.cpath = '%s/lib/lua/5.1/?.so'; ", tree, tree, tree)
    local probe = "local g = require 'gptoss'; local t = assert(g.tokenizer('" .. H.tokenizer_dir .. "')); " ..
      "local ids = t:encode('hello world'); print(package.cpath .. ' ' .. #ids .. ' ' .. t:decode(ids))"
    local cmds = {
      "lua5.1 -e \"" .. paths .. probe .. "\"",
      "luajit -e \"" .. paths .. probe .. "\"",
    }
    -- Debian 12's Neovim and a current one (support/nvims.lua). package.cpath
    -- is the tree's alone (5.1 has no package.searchpath); Neovim's :lua
    -- print goes to its messages; io.write reaches stdout headless
    for _, nv in ipairs(require("support.nvims").list()) do
      assert(not nv.missing, nv.missing)
      cmds[#cmds + 1] = string.format("%q", nv.cmd) .. " --headless -u NONE -c \"lua " .. paths
        .. probe:gsub("print%((.*)%)$", "io.write(%1, '\\n')") .. "\" -c q"
    end
    for _, cmd in ipairs(cmds) do
      out, rc = run("cd /tmp && " .. cmd)
      assert.are.equal(0, rc, cmd .. "\n" .. out)
      assert.matches(tree:gsub("%p", "%%%0") .. "/lib/lua/5%.1/%?%.so%s+2%s+hello world", out, 1, false)
    end
  end)
end)
