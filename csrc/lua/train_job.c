/*
** lua_train_job.c: gptoss.TrainJob, a training job a running engine runs
** between its serving steps (engine_train.c). Every call returns at once
** except job:wait. gptoss.engine's eng:train drives jobs from Lua.
*/
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "binding.h"

typedef struct ljob { gptoss_train_job *j; } ljob;

static const char *const finish_names[] = {NULL, "stop", "length", "cancelled", "error"};
static const char *const state_names[] = {"queued", "running", "done"};

/* {====================================================== submit */
static const char *const job_keys[] = {"loss_only", "zero_grad", "step", "share", NULL};
static const char *const step_keys[] = {"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "grad_scale", "optim",
                                        NULL};
static const char *const optim_names[] = {"adamw", "adamw_8bit", NULL};   /* as lora:step's */

/* example i's mask (nil: all) into a buffer the caller owns */
static void read_mask(lua_State *L, int idx, const char *fn, int i, uint8_t *mask, size_t n) {
  char name[64];
  snprintf(name, sizeof name, "examples[%d].mask", i);
  lg_check_table(L, idx, fn, name, "a list of booleans, one per id");
  if (lua_rawlen(L, idx) != n) luaL_error(L, "%s: %s has %d entries for %d ids", fn, name, (int)lua_rawlen(L, idx), (int)n);
  for (size_t t = 0; t < n; t++) {
    lua_rawgeti(L, idx, (lua_Integer)t + 1);
    if (lua_type(L, -1) == LUA_TNUMBER) mask[t] = lua_tonumber(L, -1) != 0;   /* 0 / 1, as tensors hold masks */
    else {
      lua_pushfstring(L, "%s[%d]", name, (int)t + 1);
      mask[t] = (uint8_t)lg_check_bool(L, -2, fn, lua_tostring(L, -1));
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
}

/* eng:train_job(lora, examples, { loss_only, zero_grad, share, step = { lr, beta1, beta2, eps, weight_decay,
   max_grad_norm, grad_scale, optim = "adamw" | "adamw_8bit" } }) -> TrainJob | nil, message, "closed".
   examples: a list of { ids = {...}, mask = {...} | nil } */
static int engine_train_job(lua_State *L) {
  const char *fn = "eng:train_job";
  lua_settop(L, 4);
  gptoss_engine *e = lg_check_engine(L, 1, fn, "self");
  gptoss_adapter *a = lg_check_adapter(L, 2, fn, "lora");
  lg_check_table(L, 3, fn, "examples", "a list of { ids = {...}, mask = {...} }");
  lg_check_keys(L, 4, fn, job_keys);
  gptoss_train_job_opts o;
  memset(&o, 0, sizeof o);
  if (!e) {   /* as eng:submit answers */
    lua_pushnil(L);
    lua_pushstring(L, "engine is closed");
    lua_pushstring(L, "closed");
    return 3;
  }
  o.loss_only = lg_opt_bool(L, 4, fn, "loss_only", 0);
  o.zero_grad = lg_opt_bool(L, 4, fn, "zero_grad", 0);
  o.share = lg_opt_range(L, 4, fn, "share", 0, 1, 0, 0);
  if (lua_istable(L, 4)) {
    lua_getfield(L, 4, "step");
    if (!lua_isnil(L, -1)) {
      int s = lua_gettop(L);
      lg_check_table(L, s, fn, "step", "a table of AdamW settings");
      lg_check_keys(L, s, fn, step_keys);
      double inf = HUGE_VAL;
      o.step = 1;
      o.adamw.lr = lg_opt_range(L, s, fn, "lr", 0, inf, 0, 2e-4);
      o.adamw.beta1 = lg_opt_range(L, s, fn, "beta1", 0, 1, LG_LT, 0.9);
      o.adamw.beta2 = lg_opt_range(L, s, fn, "beta2", 0, 1, LG_LT, 0.999);
      o.adamw.eps = lg_opt_range(L, s, fn, "eps", 0, inf, LG_GT, 1e-8);
      o.adamw.weight_decay = lg_opt_range(L, s, fn, "weight_decay", 0, inf, 0, 0.01);
      o.adamw.max_grad_norm = lg_opt_range(L, s, fn, "max_grad_norm", 0, inf, 0, 0);
      o.adamw.grad_scale = lg_opt_range(L, s, fn, "grad_scale", 0, inf, LG_GT, 1);
      o.adamw.bits8 = lg_opt_choice(L, s, fn, "optim", optim_names, 0) == 1;
    }
    lua_settop(L, 4);
  }
  int n = (int)lua_rawlen(L, 3);
  if (n == 0) return luaL_error(L, "%s: examples is empty", fn);
  /* the ids and masks live in userdata on the stack until submit copies them */
  gptoss_train_example *ex = lua_newuserdatauv(L, sizeof *ex * (size_t)n, 0);
  for (int i = 0; i < n; i++) {
    luaL_checkstack(L, 12, fn);   /* an example keeps 5 values; reading its mask takes a few more, its errors more */
    lua_rawgeti(L, 3, i + 1);
    int x = lua_gettop(L);
    char name[64];
    snprintf(name, sizeof name, "examples[%d]", i + 1);
    lg_check_table(L, x, fn, name, "a table { ids = {...}, mask = {...} }");
    lua_getfield(L, x, "ids");
    snprintf(name, sizeof name, "examples[%d].ids", i + 1);
    size_t len;
    ex[i].ids = lg_ids(L, -1, fn, name, &len);   /* pushes its buffer */
    if (len < 2) return luaL_error(L, "%s: %s needs at least 2 ids (got %d)", fn, name, (int)len);
    ex[i].n = (int)len;
    ex[i].mask = NULL;
    ex[i].starts = NULL;
    ex[i].ns = 0;
    lua_getfield(L, x, "starts");
    if (!lua_isnil(L, -1)) {
      snprintf(name, sizeof name, "examples[%d].starts", i + 1);
      ex[i].starts = lg_starts(L, -1, fn, name, len, &ex[i].ns);
      lua_replace(L, lua_gettop(L) - 1);   /* the buffer in the starts table's place */
    } else lua_pop(L, 1);
    lua_getfield(L, x, "mask");
    if (!lua_isnil(L, -1)) {
      uint8_t *mask = lua_newuserdatauv(L, len, 0);
      read_mask(L, lua_gettop(L) - 1, fn, i + 1, mask, len);
      ex[i].mask = mask;
      lua_replace(L, lua_gettop(L) - 1);   /* the buffer in the mask table's place */
    } else lua_pop(L, 1);
    /* the stack keeps: the example table, its ids table and both buffers */
  }
  ljob *b = lua_newuserdatauv(L, sizeof *b, 1);
  b->j = NULL;
  luaL_setmetatable(L, TRAIN_JOB_T);
  gptoss_status rc = gptoss_engine_train(e, a, ex, n, &o, &b->j);
  if (rc == GPTOSS_ESTATE) {
    lua_pushnil(L);
    lua_pushstring(L, gptoss_errmsg());
    lua_pushstring(L, "closed");
    return 3;
  }
  if (rc) return lg_raise(L);
  lua_createtable(L, 0, 2);   /* the engine and the adapter live while the job does */
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "engine");
  lua_pushvalue(L, 2);
  lua_setfield(L, -2, "lora");
  lua_setuservalue(L, -2);
  return 1;
}
/* }====================================================== */

/* {====================================================== TrainJob */
static ljob *checkjob(lua_State *L, int idx) {
  ljob *b = lg_udata(L, idx, TRAIN_JOB_T);
  if (!b->j) luaL_error(L, "train job is closed");
  return b;
}

/* job:info() -> { state, finish_reason, examples, done, loss, count, tokens, grad_norm, queued, train_s, error } */
static int job_info(lua_State *L) {
  ljob *b = checkjob(L, 1);
  gptoss_train_job_info in;
  gptoss_train_job_info_get(b->j, &in);
  lua_createtable(L, 0, 11);
  lua_pushstring(L, state_names[in.state]);
  lua_setfield(L, -2, "state");
  if (in.state == GPTOSS_REQ_DONE) { lua_pushstring(L, finish_names[in.finish]); lua_setfield(L, -2, "finish_reason"); }
#define I(k) lua_pushinteger(L, (lua_Integer)in.k); lua_setfield(L, -2, #k)
#define N(k) lua_pushnumber(L, (lua_Number)in.k); lua_setfield(L, -2, #k)
  I(examples); I(done); N(loss); I(count); I(tokens); N(grad_norm); N(train_s);
#undef I
#undef N
  if (in.queued_s >= 0) { lua_pushnumber(L, in.queued_s); lua_setfield(L, -2, "queued"); }
  if (in.finish == GPTOSS_FINISH_ERROR) { lua_pushstring(L, in.error); lua_setfield(L, -2, "error"); }
  return 1;
}

/* job:wait([timeout_s]) -> true once done */
static int job_wait(lua_State *L) {
  ljob *b = checkjob(L, 1);
  double t = lua_isnoneornil(L, 2) ? 1e9 : lg_check_range(L, 2, "job:wait", "timeout", 0, HUGE_VAL, LG_INF);
  lua_pushboolean(L, gptoss_train_job_wait(b->j, t));
  return 1;
}

static int job_cancel(lua_State *L) {
  gptoss_train_job_cancel(checkjob(L, 1)->j);
  return 0;
}

static int job_gc(lua_State *L) {
  ljob *b = lg_udata(L, 1, TRAIN_JOB_T);
  gptoss_train_job_free(b->j);
  b->j = NULL;
  return 0;
}
/* }====================================================== */

void lg_open_train_job(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"info", job_info}, {"wait", job_wait}, {"cancel", job_cancel}, {"close", job_gc}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
    {"__gc", job_gc},
#if LUA_VERSION_NUM >= 504
    {"__close", job_gc},
#endif
    {NULL, NULL}};
  lg_class(L, TRAIN_JOB_T, methods, meta, NULL);
  /* a method of gptoss.Engine: its method table is in the registry */
  lua_getfield(L, LUA_REGISTRYINDEX, ENGINE_T ".methods");
  lua_pushcfunction(L, engine_train_job);
  lua_setfield(L, -2, "train_job");
  lua_pop(L, 1);
}
