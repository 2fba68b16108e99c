-- bf16 gpt-oss checkpoints (experts as transformers holds them unquantized:
-- gate_up_proj [E][hidden][2*inter], down_proj [E][inter][hidden], no
-- quantization_config), quantized to MXFP4 at load. The oracles: the
-- checkpoint generator's bf16 twin of an MXFP4 model (its values exactly,
-- so the load must give the twin back bit for bit), a quantizer written
-- here from the rule (triton_kernels' downcast_to_mxfp, ROUND_UP scales,
-- round-to-nearest-even codes) and checked on hand-computed blocks, and
-- PEFT's merge arithmetic for a merged export.
local gptoss = require "gptoss"
local core = require "gptoss.core"
local checkpoint = require "gptoss.checkpoint"
local cjson = require "cjson"
local H = require "helpers"

local FX = "spec/fixtures/lora/"
local FP4 = { [0] = 0, 0.5, 1, 1.5, 2, 3, 4, 6 }

-- {====================================================== the spec's quantizer
-- Magnitudes between FP4 values: above midpoint k the code is k; on it, the
-- even one of the two codes (k - 1 or k)
local MID = { 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 }

local function negative(v) return v < 0 or (v == 0 and 1 / v < 0) end

local function code_of(q)
  local a, c = math.abs(q), 0
  for k = 1, 7 do
    if a > MID[k] then c = k
    elseif a == MID[k] then c = k % 2 == 0 and k or k - 1; break
    else break end
  end
  return c + (negative(q) and 8 or 0)
end

-- 32 values -> scale byte, 16 code bytes (low nibble first): the scale is the
-- least power of two 2^k with 2^k >= max|v| / 6 (byte 127 + k; 0 for an
-- all-zero block, whose codes keep their signs)
local function quantize_block(v)
  local amax = 0
  for i = 1, 32 do amax = math.max(amax, math.abs(v[i])) end
  local codes = {}
  if amax == 0 then
    for i = 1, 32 do codes[i] = negative(v[i]) and 8 or 0 end
    return 0, codes
  end
  local x, k = amax / 6, 0
  while 2 ^ k < x do k = k + 1 end
  while 2 ^ (k - 1) >= x do k = k - 1 end
  for i = 1, 32 do codes[i] = code_of(v[i] / 2 ^ k) end
  return 127 + k, codes
end

local function pack(codes)
  local b = {}
  for j = 1, 16 do b[j] = string.char(codes[2 * j - 1] + 16 * codes[2 * j]) end
  return table.concat(b)
end

-- bf16 values [E][in][out] (a flat 1-based array) -> blocks [E][out][in/32][16]
-- and scales [E][out][in/32], as strings
local function quantize_matrix(w, E, inn, out)
  local blocks, scales, G = {}, {}, inn / 32
  for e = 0, E - 1 do
    for o = 0, out - 1 do
      for g = 0, G - 1 do
        local v = {}
        for k = 0, 31 do v[k + 1] = w[(e * inn + g * 32 + k) * out + o + 1] end
        local s, codes = quantize_block(v)
        scales[#scales + 1] = string.char(s)
        blocks[#blocks + 1] = pack(codes)
      end
    end
  end
  return table.concat(blocks), table.concat(scales)
end

-- the value of element (row r, column i) of MXFP4 bytes of rows of `inn` inputs
local function dequant(blocks, scales, inn, r, i)
  local G = inn / 32
  local g = math.floor(i / 32)
  local byte = blocks:byte((r * G + g) * 16 + math.floor((i % 32) / 2) + 1)
  local c = i % 2 == 0 and byte % 16 or math.floor(byte / 16)
  local v = FP4[c % 8] * 2 ^ (scales:byte(r * G + g + 1) - 127)
  return c >= 8 and -v or v
end

-- bf16 bytes of values that bf16 holds exactly (normal numbers and zeros)
local function bf16le(values)
  local f = H.f32le(values)
  local out = {}
  for i = 1, #values do out[i] = f:sub(4 * i - 1, 4 * i) end
  return table.concat(out)
end
-- }======================================================

-- {====================================================== checkpoints
local function write(name, expert_dtype, overrides)
  return H.checkpoint(name, { preset = "tiny", seed = 5, tokenizer = false, expert_dtype = expert_dtype,
                              overrides = overrides or { vocab_size = 256 } })
end

-- A copy of checkpoint src as dst with tensors edited: edit(name, reader)
-- returns nil (kept) or a list of { name, dtype, shape, bytes } in its place;
-- config(cfg) edits the decoded config.json. The index follows.
local function rewrite(src, dst, edit, config)
  assert(H.exists(src .. "/model.safetensors.index.json"))
  local lfs = require "lfs"
  assert(lfs.mkdir(dst))
  local index = cjson.decode(H.read(src .. "/model.safetensors.index.json"))
  local map, total = {}, 0
  for _, f in ipairs(H.files(src)) do
    if f:match("%.safetensors$") then
      local r = assert(gptoss.safetensors(src .. "/" .. f))
      local w = core.writer(dst .. "/" .. f)
      w:metadata("format", "pt")
      for _, t in ipairs(r:tensors()) do
        local repl = edit(t.name, r)
        if repl then
          for _, x in ipairs(repl) do w:add(x[1], x[2], x[3], x[4]); map[x[1]] = f; total = total + #x[4] end
        else
          w:add(t.name, t.dtype, t.shape, r:read(t.name)); map[t.name] = f; total = total + t.bytes
        end
      end
      assert(w:commit())
      r:close()
    elseif f ~= "model.safetensors.index.json" then
      H.write(dst .. "/" .. f, H.read(src .. "/" .. f))
    end
  end
  index.weight_map = map
  index.metadata.total_size = total
  H.write(dst .. "/model.safetensors.index.json", cjson.encode(index))
  if config then
    local c = cjson.decode(H.read(dst .. "/config.json"))
    config(c)
    H.write(dst .. "/config.json", cjson.encode(c))
  end
  return dst
end

local function expert_dims(c, which)
  local E, Hd, I = c.num_local_experts, c.hidden_size, c.intermediate_size
  if which == "gate_up" then return E, Hd, 2 * I end
  return E, I, Hd
end

-- the MXFP4 twin of a bf16 checkpoint, quantized by this spec
local function lua_twin(src, dst)
  local c = cjson.decode(H.read(src .. "/config.json"))
  return rewrite(src, dst, function(name, r)
    local which = name:match("experts%.([%a_]+)_proj$")
    if not which or (which ~= "gate_up" and which ~= "down") then return nil end
    local E, inn, out = expert_dims(c, which)
    local blocks, scales = quantize_matrix(r:numbers(name), E, inn, out)
    return { { name .. "_blocks", "U8", { E, out, inn / 32, 16 }, blocks }, { name .. "_scales", "U8", { E, out, inn / 32 }, scales } }
  end, function(cfg) cfg.quantization_config = { quant_method = "mxfp4" } end)
end

local function same_logits(a, b)
  local r, c = a:shape()
  local r2, c2 = b:shape()
  assert.are.same({ r, c }, { r2, c2 })
  local differ = 0
  for i = 1, r do for j = 1, c do if a:get(i, j) ~= b:get(i, j) then differ = differ + 1 end end end
  return differ
end

-- relative L2 distance between two logit matrices
local function dist(a, b)
  local r, c = a:shape()
  local num, den = 0, 0
  for i = 1, r do for j = 1, c do local d = a:get(i, j) - b:get(i, j); num = num + d * d; den = den + b:get(i, j) ^ 2 end end
  return math.sqrt(num / den)
end

local IDS = { 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26 }
-- }======================================================

describe("the spec's MXFP4 quantizer", function()
  it("rounds hand-computed blocks as the rule says", function()
    -- max 6 * 2^-6: scale 2^-6 (byte 121); values in units of 2^-6, with the
    -- codes worked out by hand: ties (.25 .75 1.25 1.75 2.5 3.5 5) go to the
    -- even code, a value just past a tie to the nearer one
    local u = 2 ^ -6
    local units = { 6, -6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, 0.28125, 4.5, 5.5, 0, -0.0,
                    1, 1.5, 3, 2, 0.5, 0.125, 0.71875, 2.75, -3.25, -5, 4, -1.25, 3.75, -2.5, 0.375, 1.125 }
    local want = { 7, 15, 0, 2, 2, 4, 4, 6, 6, 8, 10, 1, 6, 7, 0, 8,
                   2, 3, 5, 4, 1, 0, 1, 5, 13, 14, 6, 10, 6, 12, 1, 2 }
    local v = {}
    for i, x in ipairs(units) do v[i] = x * u end
    local s, codes = quantize_block(v)
    assert.are.equal(121, s)
    assert.are.same(want, codes)
    -- a max just above 6 * 2^-6 needs the next scale: 6.5 -> 3.25 -> 3
    local s2, c2 = quantize_block { 6.5 * u, u, 0.5 * u, 1.5 * u, -6.5 * u, 7 * u, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }
    assert.are.equal(122, s2)
    assert.are.same({ 5, 1, 0, 2, 13, 6 }, { c2[1], c2[2], c2[3], c2[4], c2[5], c2[6] })
    -- a max of 4 * 2^-3 keeps 2^-3 (4/6 rounds up to 1): 4 -> code 6
    local s3, c3 = quantize_block { 0.5, 0.25, -0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }
    assert.are.equal(124, s3)
    assert.are.same({ 6, 4, 14 }, { c3[1], c3[2], c3[3] })
    -- an all-zero block: scale byte 0, the signs kept
    local z = {}
    for i = 1, 32 do z[i] = i % 2 == 0 and -0.0 or 0 end
    local s4, c4 = quantize_block(z)
    assert.are.equal(0, s4)
    assert.are.same({ 0, 8, 0, 8 }, { c4[1], c4[2], c4[3], c4[4] })
  end)
end)

describe("bf16 checkpoints (CPU)", function()
  local twin_dir, exact_dir, generic_dir
  setup(function()
    twin_dir = write("bf16_twin", "mxfp4")
    exact_dir = write("bf16_exact", "bf16")
    generic_dir = write("bf16_generic", "bf16-generic")
  end)

  it("the generator writes transformers' layout, without quantization_config", function()
    local st = assert(gptoss.safetensors(exact_dir))
    local c = cjson.decode(H.read(exact_dir .. "/config.json"))
    assert.is_nil(c.quantization_config)
    assert.is_table(cjson.decode(H.read(twin_dir .. "/config.json")).quantization_config)
    local E, Hd, I = c.num_local_experts, c.hidden_size, c.intermediate_size
    local n = 0
    for _, t in ipairs(st:tensors()) do
      assert.is_nil(t.name:match("_blocks$") or t.name:match("_scales$"), t.name)
      if t.name:match("experts%.gate_up_proj$") then assert.are.same({ E, Hd, 2 * I }, t.shape); n = n + 1 end
      if t.name:match("experts%.down_proj$") then assert.are.same({ E, I, Hd }, t.shape); n = n + 1 end
    end
    assert.are.equal(2 * c.num_hidden_layers, n)
    -- bf16 values = the twin's MXFP4 values (gpt-oss.md section 3), at sample points
    local tw = assert(gptoss.safetensors(twin_dir))
    for _, which in ipairs { "gate_up", "down" } do
      local name = "model.layers.2.mlp.experts." .. which .. "_proj"
      local _, inn, out = expert_dims(c, which)
      local w, blocks, scales = st:numbers(name), tw:read(name .. "_blocks"), tw:read(name .. "_scales")
      for _, p in ipairs { { 0, 0, 0 }, { 3, 17, out - 5 }, { E - 1, inn - 1, out - 1 }, { 5, 40, 1 } } do
        local e, i, o = p[1], p[2], p[3]
        assert.are.equal(dequant(blocks, scales, inn, e * out + o, i), w[(e * inn + i) * out + o + 1])
      end
    end
    -- every other tensor is the twin's, byte for byte
    for _, t in ipairs(tw:tensors()) do
      if not t.name:match("_blocks$") and not t.name:match("_scales$") then assert.are.equal(tw:read(t.name), st:read(t.name), t.name) end
    end
    st:close(); tw:close()
  end)

  it("quantizing the twin's values gives the twin back: its bytes' values and its logits bit for bit", function()
    local twin = assert(gptoss.load(twin_dir, { tokenizer = false }))
    local m = assert(gptoss.load(exact_dir, { tokenizer = false }))
    assert.is_nil(m.config.quantization_config)
    local c = m.config
    for l = 0, c.num_hidden_layers - 1 do
      for _, which in ipairs { "gate_up", "down" } do
        local _, inn, out = expert_dims(c, which)
        local b1, s1 = twin:mxfp4(l, which)
        local b2, s2 = m:mxfp4(l, which)
        assert.are.equal(#b1, #b2); assert.are.equal(#s1, #s2)
        local G = inn / 32
        for r = 0, #s1 - 1 do
          -- a block whose largest code is 4 or 6 keeps its scale, so its bytes;
          -- any block keeps its values (a smaller max rescales exactly)
          local top = 0
          for j = 1, 16 do
            local byte = b1:byte(16 * r + j)
            top = math.max(top, FP4[byte % 8], FP4[math.floor(byte / 16) % 8])
          end
          if top >= 4 then
            assert.are.equal(s1:byte(r + 1), s2:byte(r + 1))
            assert.are.equal(b1:sub(16 * r + 1, 16 * r + 16), b2:sub(16 * r + 1, 16 * r + 16))
          end
          local row = math.floor(r / G)
          for i = (r % G) * 32, (r % G) * 32 + 31 do
            assert.are.equal(dequant(b1, s1, inn, row, i), dequant(b2, s2, inn, row, i))
          end
        end
      end
    end
    assert.are.equal(0, same_logits(twin:logits(IDS), m:logits(IDS)))
    -- the quantized experts are memory the model owns; the MXFP4 checkpoint's are mapped
    local Ls, E, Hd, I = c.num_hidden_layers, c.num_local_experts, c.hidden_size, c.intermediate_size
    assert.are.equal(Ls * 17 * (E * 2 * I * Hd / 32 + E * Hd * I / 32), m:memory().weights)
    assert.are.equal(0, twin:memory().weights)
    twin:close(); m:close()
  end)

  it("generic bf16 values: the blocks and scales are the spec's quantizer's, and so are the logits", function()
    local m = assert(gptoss.load(generic_dir, { tokenizer = false }))
    local st = assert(gptoss.safetensors(generic_dir))
    local c = m.config
    local off_grid = 0
    for l = 0, c.num_hidden_layers - 1 do
      for _, which in ipairs { "gate_up", "down" } do
        local E, inn, out = expert_dims(c, which)
        local w = st:numbers(("model.layers.%d.mlp.experts.%s_proj"):format(l, which))
        local blocks, scales = quantize_matrix(w, E, inn, out)
        local b, s = m:mxfp4(l, which)
        assert.are.equal(scales, s, ("layer %d %s scales"):format(l, which))
        assert.are.equal(blocks, b, ("layer %d %s blocks"):format(l, which))
        -- and the values really are off the grid (the check is not the exact case again)
        for e = 0, E - 1, 3 do
          local v = w[(e * inn + 5) * out + 7 + 1]
          if v ~= dequant(b, s, inn, e * out + 7, 5) then off_grid = off_grid + 1 end
        end
      end
    end
    assert.is_true(off_grid > 0)
    local dir = lua_twin(generic_dir, H.tmpdir() .. "/generic_twin")
    local twin = assert(gptoss.load(dir, { tokenizer = false }))
    assert.are.equal(0, same_logits(twin:logits(IDS), m:logits(IDS)))
    twin:close(); st:close(); m:close()
  end)

  it("hand-computed blocks come out of the load as worked out by hand", function()
    local u = 2 ^ -6
    local units = { 6, -6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, 0.28125, 4.5, 5.5, 0, -0.0,
                    1, 1.5, 3, 2, 0.5, 0.125, 0.71875, 2.75, -3.25, -5, 4, -1.25, 3.75, -2.5, 0.375, 1.125 }
    local want = { 7, 15, 0, 2, 2, 4, 4, 6, 6, 8, 10, 1, 6, 7, 0, 8,
                   2, 3, 5, 4, 1, 0, 1, 5, 13, 14, 6, 10, 6, 12, 1, 2 }
    local c = cjson.decode(H.read(generic_dir .. "/config.json"))
    local E, inn, out = expert_dims(c, "gate_up")
    local name = "model.layers.1.mlp.experts.gate_up_proj"
    -- expert 2, output column 9, inputs 32..63 (block 1): the hand block;
    -- output column 10 the same block scaled by 2^-3 and with 6.5 on top
    local dir = rewrite(generic_dir, H.tmpdir() .. "/hand", function(n, r)
      if n ~= name then return nil end
      local w = r:numbers(n)
      for k = 0, 31 do
        w[(2 * inn + 32 + k) * out + 9 + 1] = units[k + 1] * u
        w[(2 * inn + 32 + k) * out + 10 + 1] = (k == 0 and 6.5 or units[k + 1]) * u * 2 ^ -3
      end
      return { { n, "BF16", { E, inn, out }, bf16le(w) } }
    end)
    local m = assert(gptoss.load(dir, { tokenizer = false }))
    local b, s = m:mxfp4(1, "gate_up")
    local G = inn / 32
    local r = (2 * out + 9) * G + 1
    assert.are.equal(121, s:byte(r + 1))
    assert.are.equal(pack(want), b:sub(16 * r + 1, 16 * r + 16))
    -- 6.5 * 2^-9 needs 2^-8 (byte 119); the rest halve: worked out by the spec's quantizer
    r = (2 * out + 10) * G + 1
    local v = {}
    for k = 1, 32 do v[k] = (k == 1 and 6.5 or units[k]) * u * 2 ^ -3 end
    local s2, codes = quantize_block(v)
    assert.are.equal(119, s2)
    assert.are.equal(s2, s:byte(r + 1))
    assert.are.equal(pack(codes), b:sub(16 * r + 1, 16 * r + 16))
    m:close()
  end)

  it("refuses bad expert tensors, naming them", function()
    local c = cjson.decode(H.read(generic_dir .. "/config.json"))
    local E, inn, out = expert_dims(c, "gate_up")
    -- nn.Linear's [E][out][in] instead of transformers' [E][in][out]
    local dir = rewrite(generic_dir, H.tmpdir() .. "/transposed", function(n, r)
      if n ~= "model.layers.3.mlp.experts.gate_up_proj" then return nil end
      return { { n, "BF16", { E, out, inn }, r:read(n) } }
    end)
    local m, err = gptoss.load(dir, { tokenizer = false })
    assert.is_nil(m)
    assert.matches("tensor 'model.layers.3.mlp.experts.gate_up_proj' is BF16 [8, 128, 64] but the config needs BF16 [8, 64, 128]", err, 1, true)
    assert.matches("[E, in, out]", err, 1, true)
    -- layer 0 in MXFP4 (the spec's), the rest bf16: one layout or the other
    local mixed = rewrite(generic_dir, H.tmpdir() .. "/mixed", function(n, r)
      local which = n:match("^model%.layers%.0%.mlp%.experts%.([%a_]+)_proj$")
      if which ~= "gate_up" and which ~= "down" then return nil end
      local e2, i2, o2 = expert_dims(c, which)
      local blocks, scales = quantize_matrix(r:numbers(n), e2, i2, o2)
      return { { n .. "_blocks", "U8", { e2, o2, i2 / 32, 16 }, blocks }, { n .. "_scales", "U8", { e2, o2, i2 / 32 }, scales } }
    end)
    m, err = gptoss.load(mixed, { tokenizer = false })
    assert.is_nil(m)
    assert.matches("the experts mix two layouts: 'model.layers.0.mlp.experts.gate_up_proj_blocks' is MXFP4 but "
                   .. "'model.layers.1.mlp.experts.gate_up_proj' is a bf16 matrix", err, 1, true)
    -- neither layout complete: a bf16 gate_up without its down
    local missing = rewrite(generic_dir, H.tmpdir() .. "/missing", function(n)
      if n == "model.layers.2.mlp.experts.down_proj" then return {} end
    end)
    m, err = gptoss.load(missing, { tokenizer = false })
    assert.is_nil(m)
    assert.matches("missing tensor 'model.layers.2.mlp.experts.down_proj' (expected BF16 [8, 64, 64]; bf16 experts are", err, 1, true)
    -- MXFP4 has no infinity: say where one is
    local inf = rewrite(generic_dir, H.tmpdir() .. "/inf", function(n, r)
      if n ~= "model.layers.1.mlp.experts.down_proj" then return nil end
      local e2, i2, o2 = expert_dims(c, "down")
      local w = r:read(n)
      local at = ((3 * i2 + 7) * o2 + 11) * 2   -- [3][7][11]
      return { { n, "BF16", { e2, i2, o2 }, w:sub(1, at) .. "\128\127" .. w:sub(at + 3) } }
    end)
    m, err = gptoss.load(inf, { tokenizer = false })
    assert.is_nil(m)
    assert.matches("tensor 'model.layers.1.mlp.experts.down_proj' holds a non-finite value at [3][7][11]", err, 1, true)
  end)

  it("merges an adapter into a bf16 model from its bf16 experts", function()
    local m = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    -- the tiny model's bf16 twin, as the merge's base
    local bdir = H.checkpoint("tiny_bf16", { preset = "tiny", seed = 1, expert_dtype = "bf16", tokenizer = H.tokenizer_dir })
    local mb = assert(gptoss.load(bdir, { tokenizer = false }))
    local a = assert(gptoss.adapter.load(FX .. "experts_r4"))
    local out = H.tmpdir() .. "/bf16_merged"
    assert.are.equal(out, mb:merge(a, out))
    local src, dst = assert(gptoss.safetensors(bdir)), assert(gptoss.safetensors(out))
    local c = mb.config
    local E = c.num_local_experts
    for _, which in ipairs { "gate_up", "down" } do
      local name = "model.layers.1.mlp.experts." .. which .. "_proj"
      local _, inn, out_ = expert_dims(c, which)
      local w0, w1 = src:numbers(name), dst:numbers(name)
      local x = assert(a:module(1, which))
      for _, p in ipairs { { 0, 0, 0 }, { 3, 17, out_ - 28 }, { E - 1, inn - 1, out_ - 1 } } do
        local e, i, o = p[1], p[2], p[3]
        local d = 0
        for k = 0, x.r - 1 do d = d + x.B:get(o + 1, k * E + e + 1) * x.A:get(e * x.r + k + 1, i + 1) end
        local want, got = w0[(e * inn + i) * out_ + o + 1] + x.scale * d, w1[(e * inn + i) * out_ + o + 1]
        assert.is_true(math.abs(got - want) <= math.abs(want) * 2 ^ -8 + 1e-30, ("%s (%d, %d, %d)"):format(which, e, i, o))
      end
    end
    -- the same merge from the MXFP4 model writes the same checkpoint (the bf16
    -- twin holds the MXFP4 values exactly)
    local out2 = H.tmpdir() .. "/mx_merged"
    assert(m:merge(a, out2))
    local dst2 = assert(gptoss.safetensors(out2))
    for _, t in ipairs(dst:tensors()) do assert.are.equal(dst2:read(t.name), dst:read(t.name), t.name) end
    -- without expert LoRAs the bf16 experts go out as they came
    local aa = assert(gptoss.adapter.load(FX .. "attn_r4"))
    local out3 = H.tmpdir() .. "/bf16_attn_merged"
    assert(mb:merge(aa, out3))
    local dst3 = assert(gptoss.safetensors(out3))
    assert.are.equal(src:read("model.layers.0.mlp.experts.gate_up_proj"), dst3:read("model.layers.0.mlp.experts.gate_up_proj"))
    assert.are.equal(H.read(bdir .. "/config.json"), H.read(out3 .. "/config.json"))
    src:close(); dst:close(); dst2:close(); dst3:close(); a:close(); aa:close(); mb:close(); m:close()
  end)
end)

describe("the merged export with expert LoRAs", function()
  it("loads; its experts are the spec's quantization of W + scale B A, and its logits the adapter's within that", function()
    local m = assert(gptoss.load(H.tiny(), { tokenizer = false }))
    local a = assert(gptoss.adapter.load(FX .. "experts_r4"))
    local fx = assert(gptoss.safetensors(FX .. "experts_r4.safetensors"))
    local ids = fx:numbers("ids")
    local out = H.tmpdir() .. "/merged_experts"
    assert.are.equal(out, m:merge(a, out))
    local mm = assert(gptoss.load(out, { tokenizer = false }))
    local st = assert(gptoss.safetensors(out))
    local c = mm.config
    assert.is_nil(c.quantization_config)
    -- the bytes: the spec's quantizer on the merged bf16 experts; each value
    -- within half an FP4 step of the merged one (the quantizer's error bound:
    -- 2^-2 of the block's scale below 2, 2^-1 below 4, the scale itself to 6)
    local worst = 0
    for l = 0, c.num_hidden_layers - 1 do
      for _, which in ipairs { "gate_up", "down" } do
        local E, inn, o = expert_dims(c, which)
        local w = st:numbers(("model.layers.%d.mlp.experts.%s_proj"):format(l, which))
        local blocks, scales = quantize_matrix(w, E, inn, o)
        local b, s = mm:mxfp4(l, which)
        assert.are.equal(scales, s); assert.are.equal(blocks, b)
        local G = inn / 32
        for e = 0, E - 1 do
          for oo = 0, o - 1, 7 do
            for i = 0, inn - 1 do
              local r = e * o + oo
              local scale = 2 ^ (s:byte(r * G + math.floor(i / 32) + 1) - 127)
              local x, q = w[(e * inn + i) * o + oo + 1], dequant(b, s, inn, r, i)
              local half = math.abs(x) < 2 * scale and scale / 4 or math.abs(x) < 4 * scale and scale / 2 or scale
              assert(math.abs(q - x) <= half, ("layer %d %s [%d][%d][%d]: %.6g for %.6g"):format(l, which, e, i, oo, q, x))
              worst = math.max(worst, math.abs(q - x) / scale)
            end
          end
        end
      end
    end
    assert.is_true(worst > 0)
    -- the logits: those of the same bytes in an MXFP4 checkpoint, bit for bit
    local twin = assert(gptoss.load(lua_twin(out, H.tmpdir() .. "/merged_twin"), { tokenizer = false }))
    local merged = mm:logits(ids)
    assert.are.equal(0, same_logits(twin:logits(ids), merged))
    -- and near the base + adapter session's: requantizing W + dW rounds each
    -- expert weight by up to half an FP4 step (on the order of the LoRA's own
    -- delta), which moves this random model's near-tied routing; still the
    -- merge lands far nearer the adapter than the base (measured: relative L2
    -- 0.46 from the adapter, the base 1.06 from it)
    local with, base = H.session_logits(m, ids, a), H.session_logits(m, ids)
    local d_adapter, d_base = dist(merged, with), dist(base, with)
    assert.is_true(d_adapter < 0.6 and d_adapter < d_base / 2, ("merged %.3g from the adapter, base %.3g"):format(d_adapter, d_base))
    twin:close(); st:close(); fx:close(); mm:close(); a:close(); m:close()
  end)
end)

describe("make_checkpoint --expert-dtype", function()
  it("plans bf16 experts and refuses an unknown kind", function()
    local run = ("LUA_CPATH=%q %s tools/make_checkpoint.lua --preset tiny --dry-run "):format(package.cpath, H.lua)
    local p = io.popen(run .. "--expert-dtype bf16 2>&1")
    local text = p:read("*a")
    p:close()
    assert.matches("model.layers.0.mlp.experts.gate_up_proj%s+BF16%s+%[8, 64, 128%]", text)
    assert.matches("model.layers.0.mlp.experts.down_proj%s+BF16%s+%[8, 64, 64%]", text)
    assert.is_nil(text:match("_blocks"))
    p = io.popen(run .. "--expert-dtype fp8 2>&1")
    text = p:read("*a")
    p:close()
    assert.matches("--expert-dtype is mxfp4, bf16 or bf16-generic", text, 1, true)
    assert.has_error(function() checkpoint.with_experts({}, "fp8") end, "unknown expert dtype 'fp8' (mxfp4, bf16, bf16-generic)")
  end)
end)

teardown(function() H.cleanup() end)
