/*
** lua_engine.c: gptoss.Engine and gptoss.Request, the serving engine's
** thin binding. The Lua side (gptoss.engine) adds text, stop strings and
** result tables; here every call returns at once except req:wait.
**
** Lifetimes: a request keeps its engine's Lua object alive, the engine its
** model's. Closing the model stops the engine first (lua_model.c), closing
** the engine gives the model back; the C objects are reference counted, so
** any order of close and collection is safe.
*/
#include <math.h>
#include <string.h>
#include "binding.h"

typedef struct lengine { gptoss_engine *e; int open; } lengine;
typedef struct lrequest { gptoss_request *r; int logprobs; } lrequest;

static const char *const finish_names[] = {NULL, "stop", "length", "cancelled", "error"};
static const char *const state_names[] = {"queued", "running", "done"};

/* {====================================================== Engine */
static const char *const engine_keys[] = {"max_batch", "max_queue", "chunk_tokens", "memory", "prefix_cache", "rewind",
                                          "context", "kv_block", NULL};

/* core.engine(model [, opts]) -> Engine */
static int l_engine(lua_State *L) {
  const char *fn = "gptoss.engine";
  gptoss_model *m = lg_check_model(L, 1, fn, "model");
  lg_check_keys(L, 2, fn, engine_keys);
  gptoss_engine_opts o;
  memset(&o, 0, sizeof o);
  /* 0: the engine's default */
  o.max_batch = (int)lg_opt_int(L, 2, fn, "max_batch", 0, INT32_MAX, 0);
  o.max_queue = (int)lg_opt_int(L, 2, fn, "max_queue", 0, INT32_MAX, 0);
  o.chunk_tokens = (int)lg_opt_int(L, 2, fn, "chunk_tokens", 0, INT32_MAX, 0);
  o.rewind = (int)lg_opt_int(L, 2, fn, "rewind", 0, INT32_MAX, 0);
  o.context = (int)lg_opt_int(L, 2, fn, "context", 0, INT32_MAX, 0);
  o.kv_block = (int)lg_opt_int(L, 2, fn, "kv_block", 0, INT32_MAX, 0);
  o.kv_budget = (uint64_t)lg_opt_range(L, 2, fn, "memory", 0, LG_MAX_BYTES, LG_WHOLE, 0);
  int cache = (int)lg_opt_int(L, 2, fn, "prefix_cache", 0, INT32_MAX, 16);
  o.prefix_cache = cache ? cache : -1;
  lengine *b = lua_newuserdatauv(L, sizeof *b, 1);
  b->e = NULL;
  b->open = 0;
  luaL_setmetatable(L, ENGINE_T);
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "model");
  lua_setuservalue(L, -2);
  if (gptoss_engine_new(m, &o, &b->e)) return lg_raise(L);
  b->open = 1;
  lg_model_own(L, 1, b->e);
  return 1;
}

gptoss_engine *lg_check_engine(lua_State *L, int idx, const char *fn, const char *name) {
  lengine *b = lg_check_udata(L, idx, fn, name, ENGINE_T);
  return b->open ? b->e : NULL;
}

static int engine_close(lua_State *L) {
  lengine *b = lg_udata(L, 1, ENGINE_T);
  if (!b->open) return 0;
  b->open = 0;
  gptoss_engine_stop(b->e);
  lua_getuservalue(L, 1);
  lua_getfield(L, -1, "model");
  lg_model_own(L, lua_gettop(L), NULL);
  return 0;
}

static int engine_gc(lua_State *L) {
  lengine *b = lg_udata(L, 1, ENGINE_T);
  engine_close(L);
  gptoss_engine_free(b->e);
  b->e = NULL;
  return 0;
}

static const char *const submit_keys[] = {"max_tokens", "stop_tokens", "adapter", "priority", "logprobs", "top_logprobs",
                                          NULL};

/* eng:submit(ids, sampler, { max_tokens, stop_tokens, adapter, priority, logprobs, top_logprobs })
   -> Request | nil, message, "queue_full" | "too_large" | "context_length_exceeded" | "closed".
   The sampler is taken over (closed here). */
static int engine_submit(lua_State *L) {
  const char *fn = "eng:submit";
  lengine *b = lg_udata(L, 1, ENGINE_T);
  size_t n;
  int32_t *ids = lg_ids(L, 2, fn, "ids", &n);
  lg_check_udata(L, 3, fn, "sampler", SAMPLER_T);
  lg_check_table(L, 4, fn, "opts", "a table");
  lg_check_keys(L, 4, fn, submit_keys);
  gptoss_request_opts o;
  memset(&o, 0, sizeof o);
  o.max_tokens = (int)lg_opt_int(L, 4, fn, "max_tokens", 1, INT32_MAX, 0);
  o.priority = (int)lg_opt_int(L, 4, fn, "priority", INT32_MIN, INT32_MAX, 0);
  o.logprobs = lg_opt_bool(L, 4, fn, "logprobs", 0);
  o.top_logprobs = (int)lg_opt_int(L, 4, fn, "top_logprobs", 0, GPTOSS_MAX_TOP_LOGPROBS, 0);
  if (o.top_logprobs && !o.logprobs) return luaL_error(L, "%s: top_logprobs needs logprobs = true", fn);
  lua_getfield(L, 4, "adapter");
  if (!lua_isnil(L, -1)) o.adapter = lg_check_adapter(L, lua_gettop(L), fn, "adapter");
  lua_getfield(L, 4, "stop_tokens");
  int32_t *stops = NULL;
  if (!lua_isnil(L, -1)) {
    size_t ns;
    stops = lg_ids(L, lua_gettop(L), fn, "stop_tokens", &ns);
    o.stop_ids = stops;
    o.n_stop = (int)ns;
  }
  gptoss_sampler *smp = lg_take_sampler(L, 3);
  if (!b->open) {
    gptoss_sampler_free(smp);
    lua_pushnil(L);
    lua_pushstring(L, "engine is closed");
    lua_pushstring(L, "closed");
    return 3;
  }
  lrequest *rb = lua_newuserdatauv(L, sizeof *rb, 1);
  rb->r = NULL;
  rb->logprobs = o.logprobs;
  luaL_setmetatable(L, REQUEST_T);
  gptoss_status rc = gptoss_engine_submit(b->e, ids, (int)n, smp, &o, &rb->r);
  if (rc == GPTOSS_EBUSY || rc == GPTOSS_ENOMEM || rc == GPTOSS_ERANGE || rc == GPTOSS_ESTATE) {
    lua_pushnil(L);
    lua_pushstring(L, gptoss_errmsg());
    lua_pushstring(L, rc == GPTOSS_EBUSY    ? "queue_full"
                    : rc == GPTOSS_ENOMEM   ? "too_large"
                    : rc == GPTOSS_ERANGE   ? "context_length_exceeded"
                                            : "closed");
    return 3;
  }
  if (rc) return lg_raise(L);
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "engine");
  lua_setuservalue(L, -2);
  return 1;
}

static int engine_drain(lua_State *L) {
  lengine *b = lg_udata(L, 1, ENGINE_T);
  lua_pushboolean(L, b->e && gptoss_engine_drain(b->e));
  return 1;
}

/* eng:wait([timeout_s]) -> true when some request has news (drains eng.fd) */
static int engine_wait(lua_State *L) {
  lengine *b = lg_udata(L, 1, ENGINE_T);
  double t = lua_isnoneornil(L, 2) ? 1e9 : lg_check_range(L, 2, "eng:wait", "timeout", 0, HUGE_VAL, LG_INF);
  lua_pushboolean(L, b->e && gptoss_engine_wait(b->e, t));
  return 1;
}

/* eng:kv_bytes(positions) -> the bytes of KV the engine budgets for a
   request reaching that many positions (prompt + max_tokens) */
static int engine_kv_bytes(lua_State *L) {
  lengine *b = lg_udata(L, 1, ENGINE_T);
  int n = (int)lg_check_int(L, 2, "eng:kv_bytes", "positions", 1, INT32_MAX);
  if (!b->e) return luaL_error(L, "engine is closed");
  lua_pushinteger(L, (lua_Integer)gptoss_engine_kv_bytes(b->e, n));
  return 1;
}

static int engine_stats(lua_State *L) {
  lengine *b = lg_udata(L, 1, ENGINE_T);
  if (!b->e) return luaL_error(L, "engine is closed");
  gptoss_engine_stats s;
  gptoss_engine_stats_get(b->e, &s);
  lua_createtable(L, 0, 24);
#define I(k) lua_pushinteger(L, (lua_Integer)s.k); lua_setfield(L, -2, #k)
#define N(k) lua_pushnumber(L, (lua_Number)s.k); lua_setfield(L, -2, #k)
  I(queued); I(active); I(cached_sessions); I(max_batch); I(max_queue); I(chunk_tokens);
  N(kv_budget); N(kv_active); N(kv_cached);
  I(submitted); I(completed); I(cancelled); I(failed);
  I(prompt_tokens); I(prefill_tokens); I(prefix_hits); I(prefix_tokens); I(generated_tokens); I(steps);
  N(busy_s); N(uptime_s); N(tokens_per_s);
  I(train_jobs); I(train_pending); I(train_examples); I(train_tokens); N(train_s);
  I(masks_ahead); N(masks_ahead_s); I(kv_grows); I(kv_waits);
#undef I
#undef N
  lua_pushnumber(L, (lua_Number)(s.kv_active + s.kv_cached));
  lua_setfield(L, -2, "kv_in_use");
  lua_pushboolean(L, b->open);
  lua_setfield(L, -2, "running");
  return 1;
}

static int engine_fields(lua_State *L) {
  lengine *b = lg_udata(L, 1, ENGINE_T);
  const char *k = lua_tostring(L, 2);
  if (!k) return 0;
  if (strcmp(k, "fd") == 0) { if (!b->e) return 0; lua_pushinteger(L, gptoss_engine_fd(b->e)); return 1; }
  if (strcmp(k, "closed") == 0) { lua_pushboolean(L, !b->open || !gptoss_engine_running(b->e)); return 1; }
  if (strcmp(k, "model") == 0) { lua_getuservalue(L, 1); lua_getfield(L, -1, "model"); return 1; }
  return 0;
}

static int engine_tostring(lua_State *L) {
  lengine *b = lg_udata(L, 1, ENGINE_T);
  if (!b->open) { lua_pushstring(L, "gptoss.Engine (closed)"); return 1; }
  gptoss_engine_stats s;
  gptoss_engine_stats_get(b->e, &s);
  lua_pushfstring(L, "gptoss.Engine (%d active, %d queued)", s.active, s.queued);
  return 1;
}
/* }====================================================== */

/* {====================================================== Request */
static lrequest *checkrequest(lua_State *L, int idx) {
  lrequest *b = lg_udata(L, idx, REQUEST_T);
  if (!b->r) luaL_error(L, "request is closed");
  return b;
}

/* { id =, logprob = } */
static void push_logprob(lua_State *L, const gptoss_logprob *l) {
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, l->id);
  lua_setfield(L, -2, "id");
  lua_pushnumber(L, l->logprob);
  lua_setfield(L, -2, "logprob");
}

/* req:take() -> ids produced since the last take, state, finish reason (nil
   until done) [, logprobs: per id { id, logprob, top = { {id, logprob}, ... } }
   when the request was submitted with logprobs] */
static int request_take(lua_State *L) {
  enum { CHUNK = 64 };
  lrequest *b = checkrequest(L, 1);
  int32_t buf[CHUNK];
  gptoss_token_logprobs lps[CHUNK];
  gptoss_request_info info;
  size_t got = gptoss_request_take_logprobs(b->r, buf, b->logprobs ? lps : NULL, CHUNK, &info);
  lua_createtable(L, (int)(got + info.left), 0);
  int ids = lua_gettop(L);
  if (b->logprobs) lua_createtable(L, (int)(got + info.left), 0);
  lua_Integer at = 0;
  for (;;) {
    for (size_t i = 0; i < got; i++) {
      lua_pushinteger(L, buf[i]);
      lua_rawseti(L, ids, ++at);
      if (!b->logprobs) continue;
      push_logprob(L, &lps[i].token);
      lua_createtable(L, lps[i].n_top, 0);
      for (int j = 0; j < lps[i].n_top; j++) {
        push_logprob(L, &lps[i].top[j]);
        lua_rawseti(L, -2, j + 1);
      }
      lua_setfield(L, -2, "top");
      lua_rawseti(L, ids + 1, at);
    }
    if (got < CHUNK) break;
    got = gptoss_request_take_logprobs(b->r, buf, b->logprobs ? lps : NULL, CHUNK, &info);
  }
  lua_pushstring(L, state_names[info.state]);
  if (info.state == GPTOSS_REQ_DONE) lua_pushstring(L, finish_names[info.finish]);
  else lua_pushnil(L);
  if (!b->logprobs) return 3;
  lua_pushvalue(L, ids + 1);   /* the logprobs after the finish reason */
  lua_remove(L, ids + 1);
  return 4;
}

static void push_time(lua_State *L, double v, const char *k) {
  if (v < 0) return;
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

/* req:info() -> { state, finish_reason, prompt_tokens, cached_tokens,
   generated, queued, first_token, finished (seconds after submit), error } */
static int request_info(lua_State *L) {
  lrequest *b = checkrequest(L, 1);
  gptoss_request_info info;
  gptoss_request_take(b->r, NULL, 0, &info);
  lua_createtable(L, 0, 9);
  lua_pushstring(L, state_names[info.state]);
  lua_setfield(L, -2, "state");
  if (info.state == GPTOSS_REQ_DONE) { lua_pushstring(L, finish_names[info.finish]); lua_setfield(L, -2, "finish_reason"); }
  lua_pushinteger(L, info.prompt_tokens);
  lua_setfield(L, -2, "prompt_tokens");
  lua_pushinteger(L, info.cached_tokens);
  lua_setfield(L, -2, "cached_tokens");
  lua_pushinteger(L, info.generated);
  lua_setfield(L, -2, "generated");
  push_time(L, info.queued_s, "queued");
  push_time(L, info.first_token_s, "first_token");
  push_time(L, info.finished_s, "finished");
  if (info.finish == GPTOSS_FINISH_ERROR) { lua_pushstring(L, info.error); lua_setfield(L, -2, "error"); }
  return 1;
}

/* req:wait([timeout_s]) -> true when the request has news */
static int request_wait(lua_State *L) {
  lrequest *b = checkrequest(L, 1);
  double t = lua_isnoneornil(L, 2) ? 1e9 : lg_check_range(L, 2, "req:wait", "timeout", 0, HUGE_VAL, LG_INF);
  lua_pushboolean(L, gptoss_request_wait(b->r, t));
  return 1;
}

static int request_cancel(lua_State *L) {
  gptoss_request_cancel(checkrequest(L, 1)->r);
  return 0;
}

static int request_gc(lua_State *L) {
  lrequest *b = lg_udata(L, 1, REQUEST_T);
  gptoss_request_free(b->r);
  b->r = NULL;
  return 0;
}
/* }====================================================== */

void lg_open_engine(lua_State *L) {
  static const luaL_Reg e_methods[] = {
    {"submit", engine_submit}, {"stats", engine_stats}, {"kv_bytes", engine_kv_bytes}, {"drain", engine_drain}, {"wait", engine_wait}, {"close", engine_close}, {NULL, NULL}};
  static const luaL_Reg e_meta[] = {
    {"__gc", engine_gc}, {"__tostring", engine_tostring},
#if LUA_VERSION_NUM >= 504
    {"__close", engine_close},
#endif
    {NULL, NULL}};
  lg_class(L, ENGINE_T, e_methods, e_meta, engine_fields);
  static const luaL_Reg r_methods[] = {
    {"take", request_take}, {"info", request_info}, {"wait", request_wait}, {"cancel", request_cancel},
    {"close", request_gc}, {NULL, NULL}};
  static const luaL_Reg r_meta[] = {
    {"__gc", request_gc},
#if LUA_VERSION_NUM >= 504
    {"__close", request_gc},
#endif
    {NULL, NULL}};
  lg_class(L, REQUEST_T, r_methods, r_meta, NULL);
  lua_pushcfunction(L, l_engine);
  lua_setfield(L, -2, "engine");
  lua_pushinteger(L, GPTOSS_MAX_TOP_LOGPROBS);
  lua_setfield(L, -2, "MAX_TOP_LOGPROBS");
}
