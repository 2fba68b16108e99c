rockspec_format = "3.0"
package = "gptoss"
version = "scm-1"
source = { url = "git+https://github.com/gptoss/gptoss.git" }
description = {
  summary = "Run and fine-tune OpenAI's gpt-oss models in-process from Lua",
  detailed = [[
A C engine (CPU reference backend, CUDA backend for sm_80 to sm_90a) with a
thin Lua binding: gpt-oss checkpoint loading (safetensors, MXFP4 experts),
the exact o200k_harmony tokenizer, sessions with KV caches, sampling and
generation, harmony chat rendering and parsing (LPeg), and LoRA training.
Optional at run time: cuBLAS (the CUDA backend) and NCCL (a model split
over several GPUs by its experts), found where NVIDIA's packages put them.]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.1",
  "lpeg >= 1.0",
  "lua-cjson >= 2.1",
  "luafilesystem >= 1.8",
}
external_dependencies = {
  PCRE2 = { header = "pcre2.h", library = "pcre2-8" },
  CJSON = { header = "cjson/cJSON.h", library = "cjson" },
}
build = {
  type = "make",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LUA = "$(LUA)",
    LUA_INCDIR = "$(LUA_INCDIR)",
  },
  install_variables = {
    LUA = "$(LUA)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    INST_LIBDIR = "$(LIBDIR)",
    INST_LUADIR = "$(LUADIR)",
    INST_BINDIR = "",
  },
  -- the command line, wrapped by luarocks for the tree's Lua
  install = { bin = { gptoss = "bin/gptoss" } },
}
test = {
  type = "command",
  command = "make test",
}
