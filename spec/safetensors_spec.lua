-- The safetensors reader and writer, against files assembled by hand from
-- the format's definition (8-byte LE header length, JSON, data area).
local H = require "helpers"
local gptoss = require "gptoss"

local function st(path) return gptoss.safetensors(path) end

describe("safetensors reader", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  local function file(name, header, data)
    local p = dir .. "/" .. name
    H.write(p, H.st_bytes(header, data))
    return p
  end

  it("reads names, dtypes, shapes and bytes of a hand-made file, with no copy", function()
    local data = H.f32le { 1, 2, 3, 4, 5, 6 } .. "\1\2\3\4"
    local p = file("ok.safetensors",
      '{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},' ..
      '"b":{"dtype":"U8","shape":[4],"data_offsets":[24,28]}}', data)
    local r = assert(st(p))
    local ts = r:tensors()
    table.sort(ts, function(x, y) return x.name < y.name end)
    assert.are.same({ "a", "F32", { 2, 3 }, 24 }, { ts[1].name, ts[1].dtype, ts[1].shape, ts[1].bytes })
    assert.are.same({ "b", "U8", { 4 }, 4 }, { ts[2].name, ts[2].dtype, ts[2].shape, ts[2].bytes })
    assert.are.equal("\1\2\3\4", r:read("b"))
    local f = r:floats("a")
    assert.are.same({ 1, 2, 3 }, f:row(1))
    assert.are.same({ 4, 5, 6 }, f:row(2))
    assert.are.equal("pt", r:metadata("format"))
    assert.is_nil(r:tensor("missing"))
    r:close()
  end)

  local cases = {
    { "a file shorter than the length field", function() H.write(dir .. "/short.safetensors", "\1\2\3"); return dir .. "/short.safetensors" end,
      "too short for the 8%-byte header length" },
    { "a header longer than the file", function() local p = dir .. "/long.safetensors"; H.write(p, H.u64le(500) .. "{}"); return p end,
      "header length 500 runs past the end of the file" },
    { "a header over the size limit", function() local p = dir .. "/huge.safetensors"; H.write(p, H.u64le(200000000) .. "{}"); return p end,
      "exceeds the 100000000%-byte limit" },
    { "bad JSON", function() return file("json.safetensors", '{"a": {"dtype": "F32",', "") end,
      "header is not valid JSON" },
    { "an unknown dtype", function() return file("dt.safetensors", '{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}', "x") end,
      "tensor 'a': unknown dtype 'Q4'" },
    { "shape and offsets that disagree", function() return file("shape.safetensors", '{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', ("\0"):rep(8)) end,
      "tensor 'w': shape and dtype F32 need 12 bytes but data_offsets span 8" },
    { "offsets past the data area (truncated data)", function() return file("oob.safetensors", '{"w":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}', ("\0"):rep(10)) end,
      "tensor 'w': data_offsets %[0, 16%] run past the data area %(10 bytes%)" },
    { "overlapping tensors", function() return file("ovl.safetensors",
      '{"x":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"y":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}', ("\0"):rep(12)) end,
      "tensors 'x' %[0, 8%) and 'y' %[4, 12%) overlap" },
    { "a duplicate name", function() return file("dup.safetensors",
      '{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"x":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}', ("\0"):rep(4)) end,
      "tensor 'x' is listed twice" },
    { "backwards offsets", function() return file("back.safetensors", '{"x":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}}', ("\0"):rep(4)) end,
      "data_offsets %[4, 2%] run backwards" },
    { "a negative dimension", function() return file("neg.safetensors", '{"x":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}', "") end,
      "tensor 'x': shape%[0%] is not a non%-negative integer" },
  }
  for _, c in ipairs(cases) do
    it("rejects " .. c[1] .. ", naming the file and the problem", function()
      local p = c[2]()
      local r, err = st(p)
      assert.is_nil(r)
      assert.matches(c[3], err)
      assert.matches(p:match("[^/]+$"), err, 1, true)
    end)
  end

  it("reads a sharded checkpoint through its index and checks it", function()
    local d = H.tmpdir()
    H.write(d .. "/s0.safetensors", H.st_bytes('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', "\1\2"))
    H.write(d .. "/s1.safetensors", H.st_bytes('{"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "\3"))
    H.write(d .. "/model.safetensors.index.json", '{"metadata":{"total_size":3},"weight_map":{"a":"s0.safetensors","b":"s1.safetensors"}}')
    local r = assert(st(d))
    assert.are.equal("\3", r:read("b"))
    assert.are.equal(2, #r:tensors())
    r:close()
    H.write(d .. "/model.safetensors.index.json", '{"metadata":{"total_size":4},"weight_map":{"a":"s0.safetensors","b":"s1.safetensors"}}')
    local _, err = st(d)
    assert.matches("metadata.total_size is 4 but the tensors hold 3 bytes", err)
    H.write(d .. "/model.safetensors.index.json", '{"weight_map":{"a":"s0.safetensors","b":"s0.safetensors"}}')
    _, err = st(d)
    assert.matches("tensor 'b' is listed in the index but s0.safetensors does not hold it", err)
    -- an indexed file that holds a tensor the index does not list
    H.write(d .. "/s2.safetensors", H.st_bytes('{"c":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"d":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', "\4\5"))
    H.write(d .. "/model.safetensors.index.json", '{"weight_map":{"a":"s0.safetensors","c":"s2.safetensors"}}')
    _, err = st(d)
    assert.matches("tensor 'd' is not listed in the index", err)
    H.write(d .. "/model.safetensors.index.json", '{"weight_map":{"a":"s0.safetensors","b":"gone.safetensors"}}')
    _, err = st(d)
    assert.matches("gone.safetensors: cannot open", err)
    H.write(d .. "/model.safetensors.index.json", '{"weight_map":{"a":"../s0.safetensors"}}')
    _, err = st(d)
    assert.matches("is not a plain file name", err)
  end)
end)

describe("safetensors writer", function()
  it("writes exactly the bytes of the format, laid out like the safetensors crate", function()
    local d = H.tmpdir()
    local w = gptoss.writer(d .. "/w.safetensors")
    w:metadata("format", "pt")
    -- added out of order: the crate orders by dtype (descending), then name
    w:add("zeta", "U8", { 3 }, "\7\8\9")
    w:add("beta", "F32", { 2 }, H.f32le { 1.5, -2 })
    w:add("alpha", "F32", { 1 }, H.f32le { 0.25 })
    assert.is_true(w:commit())
    local header = '{"__metadata__":{"format":"pt"},' ..
      '"alpha":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' ..
      '"beta":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},' ..
      '"zeta":{"dtype":"U8","shape":[3],"data_offsets":[12,15]}}'
    header = header .. (" "):rep((8 - #header % 8) % 8)
    local want = H.st_bytes(header, H.f32le { 0.25 } .. H.f32le { 1.5, -2 } .. "\7\8\9")
    assert.are.equal(want, H.read(d .. "/w.safetensors"))
    assert.are.same({ "w.safetensors" }, H.files(d))
  end)

  it("leaves nothing behind when the target directory does not exist", function()
    local d = H.tmpdir()
    local w = gptoss.writer(d .. "/no/such/dir/w.safetensors")
    w:add("x", "U8", { 1 }, "\1")
    local ok, err = w:commit()
    assert.is_nil(ok)
    assert.matches("cannot create a temporary file", err)
    assert.are.same({}, H.files(d))
  end)

  it("writes nothing when discarded before commit, and replaces a file only at commit", function()
    local d = H.tmpdir()
    H.write(d .. "/keep.safetensors", "old")
    local w = gptoss.writer(d .. "/keep.safetensors")
    w:add("x", "U8", { 1 }, "\1")
    w:close()
    assert.are.equal("old", H.read(d .. "/keep.safetensors"))
    assert.has_error(function() w:commit() end, "writer is closed (committed or discarded)")
    local w2 = gptoss.writer(d .. "/keep.safetensors")
    w2:add("x", "U8", { 1 }, "\1")
    assert.is_true(w2:commit())
    assert.are.equal("\1", assert(gptoss.safetensors(d .. "/keep.safetensors")):read("x"))
    assert.are.same({ "keep.safetensors" }, H.files(d))
  end)

  it("rejects bad arguments", function()
    local w = gptoss.writer(H.tmpdir() .. "/x.safetensors")
    assert.has_error(function() w:add("a", "Q7", { 1 }, "x") end, "writer:add: unknown dtype 'Q7'")
    assert.has_error(function() w:add("a", "U8", { 2 }, "x") end)
    w:add("a", "U8", { 1 }, "x")
    assert.has_error(function() w:add("a", "U8", { 1 }, "y") end)
    assert.has_error(function() w:add("b", "F32", { 2 }, { fill = "gauss" }) end,
      "writer:add: fill must be \"normal\", \"uniform\" or \"const\" (got gauss)")
    w:close()
  end)

  it("generates fills that are a pure function of seed and name", function()
    local d = H.tmpdir()
    for i, seed in ipairs { 5, 5, 6 } do
      local w = gptoss.writer(d .. "/f" .. i .. ".safetensors")
      w:add("n", "F32", { 1000 }, { fill = "normal", mean = 1, std = 2, seed = seed })
      w:add("u", "U8", { 1000 }, { fill = "uniform", min = 10, max = 12, seed = seed })
      assert.is_true(w:commit(i))      -- 1, 2 and 3 threads
    end
    local a, b, c = H.read(d .. "/f1.safetensors"), H.read(d .. "/f2.safetensors"), H.read(d .. "/f3.safetensors")
    assert.are.equal(a, b)
    assert.are_not.equal(a, c)
    local r = assert(gptoss.safetensors(d .. "/f1.safetensors"))
    local f = r:floats("n"):row(1)
    local s, s2 = 0, 0
    for _, v in ipairs(f) do s = s + v; s2 = s2 + v * v end
    local mean = s / #f
    local sd = math.sqrt(s2 / #f - mean * mean)
    assert.is_true(math.abs(mean - 1) < 0.2, "mean " .. mean)
    assert.is_true(math.abs(sd - 2) < 0.2, "std " .. sd)
    for byte in r:read("u"):gmatch(".") do
      local v = byte:byte()
      assert.is_true(v >= 10 and v <= 12)
    end
  end)
end)
