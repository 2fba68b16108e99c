--- gptoss.files: the file helpers the checkpoint generator and the trainer's
-- checkpoints share (each returns true, or the data, or nil and a message),
-- and the shell quoting of paths that the runners share.
local M = {}

--- write_file(path, data): atomically (a temporary file renamed into place)
function M.write_file(path, data)
  local tmp = path .. ".part"
  local f, err = io.open(tmp, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(data)
  local cok, cerr = f:close()
  if not ok or not cok then os.remove(tmp); return nil, werr or cerr end
  local rok, rerr = os.rename(tmp, path)
  if not rok then os.remove(tmp); return nil, rerr end
  return true
end

--- shell_quote(s): s as one word for sh, in single quotes
function M.shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

--- read_file(path): the whole file
function M.read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local d = f:read("*a")
  f:close()
  return d
end

--- mkdir_p(path): path and any missing parents
function M.mkdir_p(path)
  local lfs = require "lfs"
  local acc = path:sub(1, 1) == "/" and "" or nil
  for part in path:gmatch("[^/]+") do
    acc = acc and (acc .. "/" .. part) or part
    if not lfs.attributes(acc) then
      local ok, err = lfs.mkdir(acc)
      -- another process (a parallel trial) may have made it meanwhile
      if not ok and not lfs.attributes(acc) then return nil, acc .. ": " .. tostring(err) end
    end
  end
  return true
end

--- rm_tree(path): removes a file or a directory tree (links are not followed)
function M.rm_tree(path)
  local lfs = require "lfs"
  local attr = lfs.symlinkattributes(path)
  if not attr then return end
  if attr.mode == "directory" then
    for e in lfs.dir(path) do
      if e ~= "." and e ~= ".." then M.rm_tree(path .. "/" .. e) end
    end
    lfs.rmdir(path)
  else
    os.remove(path)
  end
end

return M
