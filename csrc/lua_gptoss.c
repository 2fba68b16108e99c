/*
** lua_gptoss.c: the gptoss.core module: shared binding helpers, the
** Floats type, and luaopen_gptoss_core, which gathers every type.
*/
#include <math.h>
#include <string.h>
#include <time.h>
#include "lua_gptoss.h"

/* {====================================================== errors */
int lg_raise(lua_State *L) {
  return luaL_error(L, "%s", gptoss_errmsg());
}

int lg_fail(lua_State *L) {
  lua_pushnil(L);
  lua_pushstring(L, gptoss_errmsg());
  return 2;
}
/* }====================================================== */

/* {====================================================== classes */
/* __index: methods first (upvalue 1), then the fields function (upvalue 2) */
static int class_index(lua_State *L) {
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  if (!lua_isnil(L, -1)) return 1;
  lua_pop(L, 1);
  if (lua_isnil(L, lua_upvalueindex(2))) return 0;
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_call(L, 2, 1);
  return 1;
}

void lg_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta,
              lua_CFunction fields) {
  luaL_newmetatable(L, name);
  luaL_setfuncs(L, meta, 0);
  lua_newtable(L);                       /* methods */
  luaL_setfuncs(L, methods, 0);
  lua_pushfstring(L, "%s.methods", name);
  lua_pushvalue(L, -2);
  lua_settable(L, LUA_REGISTRYINDEX);
  if (fields) lua_pushcfunction(L, fields); else lua_pushnil(L);
  lua_pushcclosure(L, class_index, 2);
  lua_setfield(L, -2, "__index");
  lua_pushstring(L, name);
  lua_setfield(L, -2, "__name");
  lua_pop(L, 1);
}

void *lg_udata(lua_State *L, int idx, const char *tname) {
  return luaL_checkudata(L, idx, tname);
}
/* }====================================================== */

/* {====================================================== ids */
int32_t *lg_ids(lua_State *L, int idx, size_t *n) {
  idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
  luaL_checktype(L, idx, LUA_TTABLE);
  size_t len = lua_rawlen(L, idx);
  int32_t *v = lua_newuserdatauv(L, sizeof(int32_t) * (len ? len : 1), 0);
  for (size_t i = 0; i < len; i++) {
    lua_rawgeti(L, idx, (lua_Integer)(i + 1));
    lua_Integer x = 0;
    if (!lcompat_tointeger(L, -1, &x))
      luaL_error(L, "token ids: element %d is %s, not an integer", (int)(i + 1), luaL_typename(L, -1));
    if (x < INT32_MIN || x > INT32_MAX) luaL_error(L, "token ids: element %d (%d) is out of range", (int)(i + 1), (int)x);
    v[i] = (int32_t)x;
    lua_pop(L, 1);
  }
  *n = len;
  return v;
}

void lg_push_ids(lua_State *L, const int32_t *v, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_pushinteger(L, v[i]);
    lua_rawseti(L, -2, (lua_Integer)(i + 1));
  }
}
/* }====================================================== */

/* {====================================================== options */
void lg_check_keys(lua_State *L, int idx, const char *what, const char *const *known) {
  if (lua_isnoneornil(L, idx)) return;
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    int ok = 0;
    if (lua_type(L, -1) == LUA_TSTRING) {
      const char *k = lua_tostring(L, -1);
      for (const char *const *p = known; *p && !ok; p++) ok = strcmp(*p, k) == 0;
    }
    if (!ok) {
      const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1);
      luaL_error(L, "%s: unknown option '%s'", what, k);
    }
  }
}

int lg_opt_int(lua_State *L, int idx, const char *key, int dflt) {
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return dflt; }
  lua_Integer v = 0;
  if (!lcompat_tointeger(L, -1, &v) || v < INT32_MIN || v > INT32_MAX)
    luaL_error(L, "option '%s' must be an integer", key);
  lua_pop(L, 1);
  return (int)v;
}

double lg_opt_num(lua_State *L, int idx, const char *key, double dflt) {
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return dflt; }
  if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "option '%s' must be a number", key);
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

const char *lg_opt_str(lua_State *L, int idx, const char *key, const char *dflt) {
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return dflt; }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "option '%s' must be a string", key);
  const char *s = lua_tostring(L, -1);
  lua_pop(L, 1);   /* the string stays referenced by the options table */
  return s;
}
/* }====================================================== */

/* {====================================================== Floats */
lfloats *lg_floats_new(lua_State *L, int rows, int cols) {
  size_t n = (size_t)rows * (size_t)cols;
  lfloats *f = lua_newuserdatauv(L, sizeof(lfloats) + sizeof(float) * n, 0);
  f->rows = rows;
  f->cols = cols;
  luaL_setmetatable(L, FLOATS_T);
  return f;
}

static lfloats *checkfloats(lua_State *L) { return lg_udata(L, 1, FLOATS_T); }

static int fl_len(lua_State *L) {
  lfloats *f = checkfloats(L);
  lua_pushinteger(L, (lua_Integer)f->rows * f->cols);
  return 1;
}

/* f[i]: element i (1-based, row-major) */
static int fl_fields(lua_State *L) {
  lfloats *f = checkfloats(L);
  lua_Integer i;
  if (!lcompat_tointeger(L, 2, &i)) return 0;
  if (i < 1 || i > (lua_Integer)f->rows * f->cols) return 0;
  lua_pushnumber(L, f->v[i - 1]);
  return 1;
}

static int fl_row_index(lua_State *L, lfloats *f, int arg) {
  lua_Integer r = luaL_checkinteger(L, arg);
  luaL_argcheck(L, r >= 1 && r <= f->rows, arg, "row out of range");
  return (int)r - 1;
}

static int fl_row(lua_State *L) {
  lfloats *f = checkfloats(L);
  int r = fl_row_index(L, f, 2);
  lua_createtable(L, f->cols, 0);
  const float *p = f->v + (size_t)r * f->cols;
  for (int c = 0; c < f->cols; c++) {
    lua_pushnumber(L, p[c]);
    lua_rawseti(L, -2, c + 1);
  }
  return 1;
}

static int fl_argmax(lua_State *L) {
  lfloats *f = checkfloats(L);
  int r = f->rows == 1 && lua_isnoneornil(L, 2) ? 0 : fl_row_index(L, f, 2);
  const float *p = f->v + (size_t)r * f->cols;
  int best = 0;
  for (int c = 1; c < f->cols; c++) if (p[c] > p[best]) best = c;
  lua_pushinteger(L, best);
  lua_pushnumber(L, p[best]);
  return 2;
}

static int fl_shape(lua_State *L) {
  lfloats *f = checkfloats(L);
  lua_pushinteger(L, f->rows);
  lua_pushinteger(L, f->cols);
  return 2;
}

/* raw float32 little-endian bytes, e.g. to save a fixture */
static int fl_bytes(lua_State *L) {
  lfloats *f = checkfloats(L);
  lua_pushlstring(L, (const char *)f->v, sizeof(float) * (size_t)f->rows * f->cols);
  return 1;
}

/* f:get(row, col), both 1-based */
static int fl_get(lua_State *L) {
  lfloats *f = checkfloats(L);
  int r = fl_row_index(L, f, 2);
  lua_Integer c = luaL_checkinteger(L, 3);
  luaL_argcheck(L, c >= 1 && c <= f->cols, 3, "column out of range");
  lua_pushnumber(L, f->v[(size_t)r * f->cols + (size_t)(c - 1)]);
  return 1;
}

/* f:nll(row, id): -log softmax(row)[id], in double precision; id is 0-based
   like token ids */
static int fl_nll(lua_State *L) {
  lfloats *f = checkfloats(L);
  int r = fl_row_index(L, f, 2);
  lua_Integer id = luaL_checkinteger(L, 3);
  luaL_argcheck(L, id >= 0 && id < f->cols, 3, "id out of range");
  const float *p = f->v + (size_t)r * f->cols;
  double mx = p[0];
  for (int c = 1; c < f->cols; c++) if (p[c] > mx) mx = p[c];
  double s = 0;
  for (int c = 0; c < f->cols; c++) s += exp((double)p[c] - mx);
  lua_pushnumber(L, -((double)p[id] - mx - log(s)));
  return 1;
}

static int fl_tostring(lua_State *L) {
  lfloats *f = checkfloats(L);
  lua_pushfstring(L, "gptoss.Floats (%d x %d)", f->rows, f->cols);
  return 1;
}

/* a Floats from raw float32 bytes (rows x cols) */
static int l_floats(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_Integer rows = luaL_checkinteger(L, 2), cols = luaL_checkinteger(L, 3);
  luaL_argcheck(L, rows >= 0 && cols >= 0 && (size_t)(rows * cols) * sizeof(float) == n, 1,
                "byte length does not match rows x cols float32 values");
  lfloats *f = lg_floats_new(L, (int)rows, (int)cols);
  memcpy(f->v, s, n);
  return 1;
}
/* }====================================================== */

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

int luaopen_gptoss_core(lua_State *L) {
  static const luaL_Reg fl_methods[] = {
    {"row", fl_row}, {"argmax", fl_argmax}, {"shape", fl_shape}, {"bytes", fl_bytes}, {"get", fl_get}, {"nll", fl_nll}, {NULL, NULL}};
  static const luaL_Reg fl_meta[] = {{"__len", fl_len}, {"__tostring", fl_tostring}, {NULL, NULL}};
  lg_class(L, FLOATS_T, fl_methods, fl_meta, fl_fields);
  static const luaL_Reg funcs[] = {{"cpu_count", l_cpu_count}, {"floats", l_floats}, {"clock", l_clock}, {NULL, NULL}};
  luaL_newlib(L, funcs);
  lua_pushstring(L, GPTOSS_VERSION);
  lua_setfield(L, -2, "version");
  luaopen_gptoss_tokenizer(L);
  luaopen_gptoss_safetensors(L);
  luaopen_gptoss_model(L);
  luaopen_gptoss_adapter(L);
  lg_sys_register(L);
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
