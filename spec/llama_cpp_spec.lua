-- gptoss bench beside llama.cpp (gptoss.llama_cpp). The real llama.cpp
-- (a CUDA build: bin/llama-bench and convert_hf_to_gguf.py) exists on the
-- GPU machine only, where tools/reference/device_round9.sh unpacks it and
-- sets LLAMA_CPP; there the #gpu case converts the tiny checkpoint and
-- runs both benchmarks. What needs no build runs everywhere.
local H = require "helpers"
local llama = require "gptoss.llama_cpp"


describe("gptoss.llama_cpp", function()
  it("names what is missing from a build directory", function()
    local none, err = llama.find(nil)
    assert.is_nil(none)
    assert.matches("no directory given %(LLAMA_CPP or %-%-llama%-cpp%)", err)
    local dir = H.tmpdir() .. "/llama-empty"
    os.execute("mkdir -p '" .. dir .. "/bin'")
    none, err = llama.find(dir)
    assert.is_nil(none)
    assert.are.equal("llama.cpp: " .. dir .. "/bin/llama-bench not found", err)
  end)

  it("puts each test's two rates and their ratio side by side", function()
    local ours = { { test = "pp512", avg_ts = 200, stddev_ts = 2 }, { test = "tg128 @ d4096", avg_ts = 30, stddev_ts = 1 } }
    local theirs = { { test = "tg128 @ d4096", avg_ts = 60, stddev_ts = 3 } }
    local md = llama.side_by_side(ours, theirs)
    assert.matches("| pp512 | 200.00 ± 2.00 | - | - |", md, 1, true)
    assert.matches("| tg128 @ d4096 | 30.00 ± 1.00 | 60.00 ± 3.00 | 0.50x |", md, 1, true)
  end)

  it("runs llama-bench on the same checkpoint after gptoss, the same tests, side by side #gpu", function()
    local dir = os.getenv("LLAMA_CPP")
    if not dir then pending("LLAMA_CPP is not set (no llama.cpp build on this machine)") return end
    local ckpt = H.tiny()
    local gguf_dir = H.tmpdir()   -- where the GGUF and its stamp go (each H.tmpdir() is a new one)
    local out = gguf_dir .. "/bench.json"
    local cmd = string.format("GPTOSS_GGUF_DIR=%s %s bin/gptoss bench %s --device cuda:0 -p 64 -n 16 -r 2 --llama-cpp %s -o json > %s",
      gguf_dir, H.lua, ckpt, dir, out)
    local ok = os.execute(cmd)
    assert.is_true(ok == true or ok == 0, cmd)
    local f = assert(io.open(out, "rb"))
    local rows = require("gptoss.json").decode(f:read("*a"))
    f:close()
    local by = {}
    for _, r in ipairs(rows) do by[(r.backends == "llama.cpp" and "llama " or "gptoss ") .. r.n_prompt .. "/" .. r.n_gen] = r end
    for _, k in ipairs { "gptoss 64/0", "gptoss 0/16", "llama 64/0", "llama 0/16" } do
      assert.is_table(by[k], k)
      assert.is_true(by[k].avg_ts > 0, k)
    end
    -- the GGUF is made once: a second run finds it by its stamp
    local gguf = gguf_dir .. "/" .. ckpt:match("[^/]+$") .. ".q8_0.gguf"
    local f2 = assert(io.open(gguf .. ".stamp", "rb")); f2:close()
    local L = assert(llama.find(dir))
    local t0 = os.time()
    assert.are.equal(gguf, assert(L:convert(ckpt, gguf)))
    assert.is_true(os.time() - t0 <= 1, "converted again")
  end)
end)
