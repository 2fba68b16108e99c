/*
** loader.c: gptoss.Loader, gptoss.load_async's handle on a load running on
** a thread of its own (csrc/loader.c). An event loop watches ld.fd (or
** polls ld:progress()) and takes the model with ld:result() once the load
** has ended; nothing here blocks except result() and wait().
*/
#include <math.h>
#include <poll.h>
#include <string.h>
#include "binding.h"

typedef struct lloader {
  gptoss_loader *l;
  lg_load a;           /* the options as given (for the Model's fields) */
  int taken;
} lloader;

static lloader *checkloader(lua_State *L, int idx) {
  return lg_open(L, idx, LOADER_T, "loader is closed");
}

/* gptoss.load_async(dir [, opts]) -> Loader | nil, message: gptoss.load's arguments */
static int l_load_async(lua_State *L) {
  lg_load a;
  lg_load_args(L, "gptoss.load_async", &a);
  lloader *b = lg_box(L, sizeof *b, LOADER_T);
  b->a = a;   /* precision is static; the loader copies the strings its thread reads */
  b->a.dir = b->a.tokenizer = b->a.o.device = NULL;
  if (gptoss_loader_start(a.dir, &a.o, a.tokenizer, &b->l)) return lg_fail(L);
  return 1;
}

static int loader_progress(lua_State *L) {
  lloader *b = checkloader(L, 1);
  uint64_t done, total;
  int ended = gptoss_loader_progress(b->l, &done, &total);
  lua_pushnumber(L, (lua_Number)done);
  lua_pushnumber(L, (lua_Number)total);
  lua_pushboolean(L, ended);
  return 3;
}

/* ld:wait([timeout_s]) -> true once the load has ended, false at the timeout */
static int loader_wait(lua_State *L) {
  lloader *b = checkloader(L, 1);
  double timeout = lua_isnoneornil(L, 2) ? -1 : lg_check_range(L, 2, "ld:wait", "timeout", 0, HUGE_VAL, LG_INF);
  double ms = timeout < 0 ? -1 : timeout * 1e3 > 2e9 ? 2e9 : timeout * 1e3;
  while (!gptoss_loader_progress(b->l, NULL, NULL)) {
    struct pollfd p = { gptoss_loader_fd(b->l), POLLIN, 0 };
    if (poll(&p, 1, ms < 0 ? 100 : (int)ms) == 0 && ms >= 0) break;
  }
  lua_pushboolean(L, gptoss_loader_progress(b->l, NULL, NULL));
  return 1;
}

/* ld:result() -> Model | nil, message: waits for the end; the model once */
static int loader_result(lua_State *L) {
  lloader *b = checkloader(L, 1);
  if (b->taken) return luaL_error(L, "ld:result: the model was already taken");
  gptoss_model *m;
  gptoss_tokenizer *t;
  if (gptoss_loader_take(b->l, &m, &t)) return lg_fail(L);
  b->taken = 1;
  lg_push_model(L, m, t, &b->a);
  return 1;
}

static int loader_cancel(lua_State *L) {
  lloader *b = checkloader(L, 1);
  gptoss_loader_cancel(b->l);
  return 0;
}

/* closing waits for the thread (a cancelled CUDA load stops at its next
   64 MB chunk) and frees a model nobody took */
static int loader_gc(lua_State *L) {
  lloader *b = lg_udata(L, 1, LOADER_T);
  gptoss_loader_free(b->l);
  b->l = NULL;
  return 0;
}

static int loader_fields(lua_State *L) {
  lloader *b = lg_udata(L, 1, LOADER_T);
  const char *k = lua_tostring(L, 2);
  if (!k) return 0;
  if (strcmp(k, "fd") == 0) { if (!b->l) return 0; lua_pushinteger(L, gptoss_loader_fd(b->l)); return 1; }
  if (strcmp(k, "closed") == 0) { lua_pushboolean(L, b->l == NULL); return 1; }
  return 0;
}

static int loader_tostring(lua_State *L) {
  lloader *b = lg_udata(L, 1, LOADER_T);
  if (!b->l) { lua_pushstring(L, "gptoss.Loader (closed)"); return 1; }
  uint64_t done, total;
  int ended = gptoss_loader_progress(b->l, &done, &total);
  lua_pushfstring(L, "gptoss.Loader (%s, %f of %f MB)", ended ? "ended" : "loading", done / 1e6, total / 1e6);
  return 1;
}

void lg_open_loader(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"progress", loader_progress}, {"wait", loader_wait}, {"result", loader_result}, {"cancel", loader_cancel},
    {"close", loader_gc}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
    {"__gc", loader_gc}, {"__tostring", loader_tostring},
#if LUA_VERSION_NUM >= 504
    {"__close", loader_gc},
#endif
    {NULL, NULL}};
  lg_class(L, LOADER_T, methods, meta, loader_fields);
  lua_pushcfunction(L, l_load_async);
  lua_setfield(L, -2, "load_async");
}
