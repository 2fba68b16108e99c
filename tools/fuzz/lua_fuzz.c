/*
** lua_fuzz.c: libFuzzer over the parsers written in Lua (JSON decoder,
** harmony text and tokens, training JSONL). GPTOSS_FUZZ_TARGET names one of
** tools/fuzz/lua_targets.lua's functions; it gets the input as a string and
** raises only on a defect (any error that is not the parser's own refusal).
**
** The interpreter is not instrumented, so a line hook gives libFuzzer the
** coverage it steers by: each (chunk, previous line, line) edge bumps a
** counter in __libfuzzer_extra_counters, which libFuzzer reads like its own.
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NCOUNTERS (1 << 16)
__attribute__((section("__libfuzzer_extra_counters"))) static uint8_t counters[NCOUNTERS];

static lua_State *L;
static int target_ref;
static uintptr_t prev_loc;

static void line_hook(lua_State *l, lua_Debug *ar) {
  if (!lua_getinfo(l, "S", ar)) return;
  uintptr_t loc = ((uintptr_t)ar->source * 31u) ^ (uintptr_t)ar->currentline * 2654435761u;
  counters[(loc ^ (prev_loc >> 1)) & (NCOUNTERS - 1)]++;
  prev_loc = loc;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  const char *target = getenv("GPTOSS_FUZZ_TARGET");
  if (!target) { fprintf(stderr, "fuzz: set GPTOSS_FUZZ_TARGET\n"); abort(); }
  L = luaL_newstate();
  luaL_openlibs(L);
  /* the specs' paths: the repository's Lua files and its Lua 5.4 core.so */
  if (luaL_dostring(L, "package.path = 'lua/?.lua;lua/?/init.lua;' .. package.path\n"
                       "package.cpath = 'build/lua5.4/?.so;' .. package.cpath")) abort();
  if (luaL_dofile(L, "tools/fuzz/lua_targets.lua")) { fprintf(stderr, "fuzz: %s\n", lua_tostring(L, -1)); abort(); }
  lua_getfield(L, -1, target);
  if (!lua_isfunction(L, -1)) { fprintf(stderr, "fuzz: no target '%s'\n", target); abort(); }
  target_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_settop(L, 0);
  lua_sethook(L, line_hook, LUA_MASKLINE, 0);
  return 0;
}

static int traceback(lua_State *l) {
  luaL_traceback(l, l, lua_tostring(l, 1), 1);
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_pushcfunction(L, traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, target_ref);
  lua_pushlstring(L, (const char *)data, size);
  prev_loc = 0;
  if (lua_pcall(L, 1, 0, 1) != LUA_OK) {
    fprintf(stderr, "fuzz: %s\n", lua_tostring(L, -1));
    abort();
  }
  lua_settop(L, 0);
  lua_gc(L, LUA_GCSTEP, 0);
  return 0;
}
