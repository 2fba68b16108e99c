--- tools/lora_resave.lua: loads a PEFT adapter with gptoss and saves it
-- again, for checking that PEFT reads what gptoss writes
-- (tools/reference/device_lora.sh).
--
--   lua5.4 tools/lora_resave.lua SRC_DIR DST_DIR
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local gptoss = require "gptoss"
local a = assert(gptoss.adapter.load(arg[1]))
assert(a:save(arg[2]))
print(string.format("%s -> %s: %s", arg[1], arg[2], tostring(a)))
