--- mxfp4_dump: the MXFP4 experts gptoss runs, as bytes, for an outside check.
--
--   lua5.4 tools/reference/mxfp4_dump.lua CHECKPOINT_DIR OUT.safetensors
--
-- Loads the checkpoint on the CPU (a bf16 one is quantized by the load,
-- csrc/quantize.c) and writes every layer's model:mxfp4 bytes as U8
-- tensors named as an MXFP4 checkpoint names them:
--   model.layers.L.mlp.experts.gate_up_proj_blocks [E][2I][H/32][16]
--   model.layers.L.mlp.experts.gate_up_proj_scales [E][2I][H/32]
--   model.layers.L.mlp.experts.down_proj_blocks    [E][H][I/32][16]
--   model.layers.L.mlp.experts.down_proj_scales    [E][H][I/32]
-- tools/reference/triton_mxfp4_check.py compares them with triton_kernels'.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"

local dir, out = arg[1], arg[2]
if not dir or not out then
  io.stderr:write("usage: lua5.4 tools/reference/mxfp4_dump.lua CHECKPOINT_DIR OUT.safetensors\n")
  os.exit(2)
end

local m = assert(gptoss.load(dir, { tokenizer = false }))
local c = m.config
local E, H, I = c.num_local_experts, c.hidden_size, c.intermediate_size
local w = gptoss.core.writer(out)
w:metadata("format", "pt")
local n = 0
for l = 0, c.num_hidden_layers - 1 do
  for _, which in ipairs { "gate_up", "down" } do
    local rows, inn = which == "gate_up" and 2 * I or H, which == "gate_up" and H or I
    local blocks, scales = m:mxfp4(l, which)
    assert(#blocks == E * rows * inn / 2 and #scales == E * rows * inn / 32, "unexpected byte counts")
    local base = ("model.layers.%d.mlp.experts.%s_proj"):format(l, which)
    w:add(base .. "_blocks", "U8", { E, rows, inn // 32, 16 }, blocks)
    w:add(base .. "_scales", "U8", { E, rows, inn // 32 }, scales)
    n = n + 2
  end
end
m:close()
assert(w:commit())
print(("mxfp4_dump: %s -> %s, %d tensors (%d layers)"):format(dir, out, n, c.num_hidden_layers))
