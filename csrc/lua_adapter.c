/*
** lua_adapter.c: the gptoss.Adapter type (a LoRA adapter in PEFT format)
** and its use by sessions.
*/
#include <string.h>
#include "lua_gptoss.h"

typedef struct ladapter { gptoss_adapter *a; } ladapter;

gptoss_adapter *lg_check_adapter(lua_State *L, int idx) {
  ladapter *b = lg_udata(L, idx, ADAPTER_T);
  if (!b->a) luaL_error(L, "adapter is closed");
  return b->a;
}

/* gptoss.core.adapter_load(dir) -> Adapter | nil, message */
static int l_adapter_load(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  ladapter *b = lua_newuserdatauv(L, sizeof *b, 0);
  b->a = NULL;
  luaL_setmetatable(L, ADAPTER_T);
  if (gptoss_adapter_load(dir, &b->a)) return lg_fail(L);
  return 1;
}

/* a:save(dir) -> true | nil, message */
static int adapter_save(lua_State *L) {
  gptoss_adapter *a = lg_check_adapter(L, 1);
  if (gptoss_adapter_save(a, luaL_checkstring(L, 2))) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* a:module(layer, "q"|"k"|"v"|"o") -> { r, scale, A = Floats [r x in], B = Floats [out x r] } | nil */
static int adapter_module(lua_State *L) {
  gptoss_adapter *a = lg_check_adapter(L, 1);
  lua_Integer l = luaL_checkinteger(L, 2);
  static const char *const names[] = {"q", "k", "v", "o", NULL};
  int m = luaL_checkoption(L, 3, NULL, names);
  const gptoss_lora *x = l < 0 || l > GPTOSS_MAX_LAYERS ? NULL : gptoss_adapter_module(a, (int)l, (gptoss_lora_module)m);
  if (!x) { lua_pushnil(L); return 1; }
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, x->r); lua_setfield(L, -2, "r");
  lua_pushnumber(L, x->scale); lua_setfield(L, -2, "scale");
  lfloats *f = lg_floats_new(L, x->r, x->in);
  memcpy(f->v, x->A, sizeof(float) * (size_t)x->r * x->in);
  lua_setfield(L, -2, "A");
  f = lg_floats_new(L, x->out, x->r);
  memcpy(f->v, x->B, sizeof(float) * (size_t)x->out * x->r);
  lua_setfield(L, -2, "B");
  return 1;
}

static int adapter_gc(lua_State *L) {
  ladapter *b = lg_udata(L, 1, ADAPTER_T);
  gptoss_adapter_free(b->a);   /* sessions using it hold their own references */
  b->a = NULL;
  return 0;
}

static int adapter_fields(lua_State *L) {
  ladapter *b = lg_udata(L, 1, ADAPTER_T);
  const char *k = lua_tostring(L, 2);
  if (!k) return 0;
  if (strcmp(k, "closed") == 0) { lua_pushboolean(L, b->a == NULL); return 1; }
  if (!b->a) return 0;
  gptoss_adapter_desc d;
  gptoss_adapter_info(b->a, &d);
  if (strcmp(k, "r") == 0) lua_pushinteger(L, d.r);
  else if (strcmp(k, "alpha") == 0) lua_pushnumber(L, d.alpha);
  else if (strcmp(k, "rslora") == 0) lua_pushboolean(L, d.rslora);
  else if (strcmp(k, "layers") == 0) lua_pushinteger(L, d.nlayers);
  else if (strcmp(k, "modules") == 0) lua_pushinteger(L, d.modules);
  else if (strcmp(k, "params") == 0) lua_pushinteger(L, (lua_Integer)d.params);
  else return 0;
  return 1;
}

static int adapter_tostring(lua_State *L) {
  ladapter *b = lg_udata(L, 1, ADAPTER_T);
  if (!b->a) { lua_pushstring(L, "gptoss.Adapter (closed)"); return 1; }
  gptoss_adapter_desc d;
  gptoss_adapter_info(b->a, &d);
  lua_pushfstring(L, "gptoss.Adapter (LoRA r=%d, %d modules, %d parameters)", d.r, d.modules, (int)d.params);
  return 1;
}

int luaopen_gptoss_adapter(lua_State *L) {
  static const luaL_Reg methods[] = {{"save", adapter_save}, {"module", adapter_module}, {"close", adapter_gc}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
    {"__gc", adapter_gc}, {"__tostring", adapter_tostring},
#if LUA_VERSION_NUM >= 504
    {"__close", adapter_gc},
#endif
    {NULL, NULL}};
  lg_class(L, ADAPTER_T, methods, meta, adapter_fields);
  lua_pushcfunction(L, l_adapter_load);
  lua_setfield(L, -2, "adapter_load");
  return 0;
}
