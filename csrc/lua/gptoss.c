/*
** gptoss.c: luaopen_gptoss_core, the module: every part's types and
** functions, the version, a clock and the CPU count.
*/
#include <string.h>
#include <time.h>
#include "binding.h"
#include "internal.h"   /* gptoss_test_fail_alloc */

/* core.clock(): seconds from a monotonic clock, for benchmarks */
static int l_clock(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

static int l_cpu_count(lua_State *L) {
  lua_pushinteger(L, gptoss_cpu_count());
  return 1;
}

/* core.test_fail_alloc(n) -> what was left of the last: a test hook, not
   API (csrc/internal.h): the n-th allocation of the CPU backend from now
   fails, 0 none; what comes back is 0 once the armed failure happened */
static int l_test_fail_alloc(lua_State *L) {
  lua_pushinteger(L, gptoss_test_fail_alloc((int)lg_check_int(L, 1, "core.test_fail_alloc", "n", 0, INT32_MAX)));
  return 1;
}

int luaopen_gptoss_core(lua_State *L) {
  static const luaL_Reg funcs[] = {{"cpu_count", l_cpu_count}, {"clock", l_clock},
                                   {"test_fail_alloc", l_test_fail_alloc}, {NULL, NULL}};
  luaL_newlib(L, funcs);
  lua_pushstring(L, GPTOSS_VERSION);
  lua_setfield(L, -2, "version");
  lg_open_floats(L);
  lg_open_tokenizer(L);
  lg_open_safetensors(L);
  lg_open_model(L);
  lg_open_adapter(L);
  lg_open_engine(L);
  lg_open_train_job(L);
  lg_open_loader(L);
  lg_open_sys(L);
  lg_open_grammar(L);
  /* core.methods.Model etc.: Lua libraries add methods written in Lua here */
  static const char *const types[] = {MODEL_T, SESSION_T, TOKENIZER_T, SAMPLER_T, FLOATS_T, WRITER_T, READER_T, ADAPTER_T, NULL};
  lua_newtable(L);
  for (const char *const *t = types; *t; t++) {
    lua_pushfstring(L, "%s.methods", *t);
    lua_gettable(L, LUA_REGISTRYINDEX);
    lua_setfield(L, -2, strchr(*t, '.') + 1);
  }
  lua_setfield(L, -2, "methods");
  return 1;
}
