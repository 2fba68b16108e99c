/*
** binding.c: the helpers every file of the binding uses (binding.h):
** engine errors to Lua, classes and boxes, ids, options, and the values
** more than one type pushes (configs, tensor lists, Floats).
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>
#include "binding.h"

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

void *lg_box(lua_State *L, size_t size, const char *tname) {
  void *b = lua_newuserdatauv(L, size, 0);
  memset(b, 0, size);
  luaL_setmetatable(L, tname);
  return b;
}

void *lg_open(lua_State *L, int idx, const char *tname, const char *closed) {
  void *b = lg_udata(L, idx, tname), *engine;
  memcpy(&engine, b, sizeof engine);   /* the first member, whatever its pointer type */
  if (!engine) luaL_error(L, "%s", closed);
  return b;
}

/* a pointer to a box is a pointer to its first member (C11 6.7.2.1) */
gptoss_model *lg_check_model(lua_State *L, int idx, const char *fn, const char *name) {
  lg_check_udata(L, idx, fn, name, MODEL_T);
  return *(gptoss_model **)lg_open(L, idx, MODEL_T, "model is closed");
}

gptoss_adapter *lg_check_adapter(lua_State *L, int idx, const char *fn, const char *name) {
  lg_check_udata(L, idx, fn, name, ADAPTER_T);
  return *(gptoss_adapter **)lg_open(L, idx, ADAPTER_T, "adapter is closed");
}

lfloats *lg_floats_new(lua_State *L, int rows, int cols) {
  size_t n = (size_t)rows * (size_t)cols;   /* both < 2^31: no wrap in 64 bits */
  if (rows < 0 || cols < 0 || n > (PTRDIFF_MAX - sizeof(lfloats)) / sizeof(float))
    luaL_error(L, "Floats of %d x %d values is too large", rows, cols);
  lfloats *f = lua_newuserdatauv(L, sizeof(lfloats) + sizeof(float) * n, 0);
  f->rows = rows;
  f->cols = cols;
  luaL_setmetatable(L, FLOATS_T);
  return f;
}
/* }====================================================== */

/* {====================================================== arguments */
/* a number in the fewest digits that read back to it (Lua 5.4's %.14g
   would round 2^53) */
static void fmt_num(char *buf, size_t size, double n) {
  snprintf(buf, size, "%.15g", n);
  if (n == n && strtod(buf, NULL) != n) snprintf(buf, size, "%.17g", n);
}

/* the value at idx as the caller wrote it: a number or string exactly, a
   typed userdata by its type's name, anything else by its type */
static const char *given(lua_State *L, int idx) {
  int t = lua_type(L, idx);
  if (t == LUA_TSTRING) return lcompat_quote(L, idx);
#if LUA_VERSION_NUM >= 503
  if (t == LUA_TNUMBER && lua_isinteger(L, idx)) return lcompat_quote(L, idx);
#endif
  if (t == LUA_TUSERDATA && luaL_getmetafield(L, idx, "__name")) {
    if (lua_type(L, -1) == LUA_TSTRING) return lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  if (t != LUA_TNUMBER) return luaL_typename(L, idx);
  char buf[40];
  fmt_num(buf, sizeof buf, (double)lua_tonumber(L, idx));
  lua_pushstring(L, buf);
  return lua_tostring(L, -1);
}

int lg_arg_error(lua_State *L, int idx, const char *fn, const char *name, const char *what) {
  return luaL_error(L, "%s: %s must be %s (got %s)", fn, name, what, given(L, lua_absindex(L, idx)));
}

static lua_Integer check_int(lua_State *L, int idx, const char *fn, const char *name, lua_Integer lo, lua_Integer hi) {
  lua_Integer v = 0;
  if (lua_type(L, idx) != LUA_TNUMBER || !lcompat_tointeger(L, idx, &v) || v < lo || v > hi) {
    char what[64];   /* lua_pushfstring has no %lld */
    snprintf(what, sizeof what, "an integer in %lld..%lld", (long long)lo, (long long)hi);
    lg_arg_error(L, idx, fn, name, what);
  }
  return v;
}

lua_Integer lg_check_int(lua_State *L, int idx, const char *fn, const char *name, lua_Integer lo, lua_Integer hi) {
  return check_int(L, lua_absindex(L, idx), fn, name, lo, hi);
}

double lg_check_num(lua_State *L, int idx, const char *fn, const char *name, int finite) {
  return lg_check_range(L, idx, fn, name, -HUGE_VAL, HUGE_VAL, finite ? 0 : LG_INF);
}

/* what lg_check_range wants, in words: "a finite number >= 0", "a number in (0, 1]" */
static void range_words(char *out, size_t size, double lo, double hi, int flags) {
  char a[40], b[40];
  fmt_num(a, sizeof a, lo);
  fmt_num(b, sizeof b, hi);
  const char *kind = flags & LG_WHOLE ? "whole number" : "number";
  const char *finite = !(flags & LG_INF) && (lo == -HUGE_VAL || hi == HUGE_VAL) ? "finite " : "";
  if (lo > -HUGE_VAL && hi < HUGE_VAL)
    snprintf(out, size, "a %s in %c%s, %s%c", kind, flags & LG_GT ? '(' : '[', a, b, flags & LG_LT ? ')' : ']');
  else if (lo > -HUGE_VAL) snprintf(out, size, "a %s%s %s %s", finite, kind, flags & LG_GT ? ">" : ">=", a);
  else if (hi < HUGE_VAL) snprintf(out, size, "a %s%s %s %s", finite, kind, flags & LG_LT ? "<" : "<=", b);
  else if (*finite) snprintf(out, size, "a finite %s", kind);
  else snprintf(out, size, "a %s, not NaN", kind);
}

double lg_check_range(lua_State *L, int idx, const char *fn, const char *name, double lo, double hi, int flags) {
  idx = lua_absindex(L, idx);
  double v = lua_type(L, idx) == LUA_TNUMBER ? (double)lua_tonumber(L, idx) : NAN;
  int ok = (flags & LG_GT ? v > lo : v >= lo) && (flags & LG_LT ? v < hi : v <= hi)   /* NaN fails both */
           && ((flags & LG_INF) || v - v == 0) && (!(flags & LG_WHOLE) || v == floor(v));
  if (!ok) {
    char what[128];
    range_words(what, sizeof what, lo, hi, flags);
    lg_arg_error(L, idx, fn, name, what);
  }
  return v;
}

const char *lg_check_str(lua_State *L, int idx, const char *fn, const char *name, size_t *len) {
  if (lua_type(L, idx) != LUA_TSTRING) lg_arg_error(L, lua_absindex(L, idx), fn, name, "a string");
  return lua_tolstring(L, idx, len);
}

void lg_check_table(lua_State *L, int idx, const char *fn, const char *name, const char *what) {
  if (lua_type(L, idx) != LUA_TTABLE) lg_arg_error(L, lua_absindex(L, idx), fn, name, what);
}

int lg_check_bool(lua_State *L, int idx, const char *fn, const char *name) {
  if (lua_type(L, idx) != LUA_TBOOLEAN) lg_arg_error(L, lua_absindex(L, idx), fn, name, "a boolean");
  return lua_toboolean(L, idx);
}

int lg_check_choice(lua_State *L, int idx, const char *fn, const char *name, const char *const *names) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING)
    for (int i = 0; names[i]; i++) if (strcmp(names[i], lua_tostring(L, idx)) == 0) return i;
  luaL_Buffer B;   /* "a", "b" or "c" */
  luaL_buffinit(L, &B);
  for (int i = 0; names[i]; i++) {
    if (i) luaL_addstring(&B, names[i + 1] ? ", " : " or ");
    luaL_addchar(&B, '"');
    luaL_addstring(&B, names[i]);
    luaL_addchar(&B, '"');
  }
  luaL_pushresult(&B);
  lg_arg_error(L, idx, fn, name, lua_tostring(L, -1));
  return -1;
}

void *lg_check_udata(lua_State *L, int idx, const char *fn, const char *name, const char *tname) {
  idx = lua_absindex(L, idx);
  void *p = luaL_testudata(L, idx, tname);
  if (!p) {
    lua_pushfstring(L, "a %s", tname);
    lg_arg_error(L, idx, fn, name, lua_tostring(L, -1));
  }
  return p;
}
/* }====================================================== */

/* {====================================================== ids */
int32_t *lg_ids(lua_State *L, int idx, const char *fn, const char *name, size_t *n) {
  idx = lua_absindex(L, idx);
  lg_check_table(L, idx, fn, name, "a table of token ids");
  size_t len = lua_rawlen(L, idx);
  int32_t *v = lua_newuserdatauv(L, sizeof(int32_t) * (len ? len : 1), 0);
  for (size_t i = 0; i < len; i++) {
    lua_rawgeti(L, idx, (lua_Integer)(i + 1));
    lua_Integer x = 0;
    if (lua_type(L, -1) != LUA_TNUMBER || !lcompat_tointeger(L, -1, &x) || x < INT32_MIN || x > INT32_MAX) {
      int at = lua_gettop(L);
      lua_pushfstring(L, "%s[%d]", name, (int)(i + 1));
      check_int(L, at, fn, lua_tostring(L, -1), INT32_MIN, INT32_MAX);
    }
    v[i] = (int32_t)x;
    lua_pop(L, 1);
  }
  *n = len;
  return v;
}

int32_t *lg_starts(lua_State *L, int idx, const char *fn, const char *name, size_t n, int *ns) {
  idx = lua_absindex(L, idx);
  size_t len;
  int32_t *v = lg_ids(L, idx, fn, name, &len);
  if (len == 0) luaL_error(L, "%s: %s is empty (the first example starts at 1)", fn, name);
  for (size_t k = 0; k < len; k++) {
    if (k == 0 && v[0] != 1) luaL_error(L, "%s: %s[1] must be 1, where the first example starts (got %d)", fn, name, (int)v[0]);
    if (k > 0 && (v[k] <= v[k - 1] || (size_t)v[k] > n))
      luaL_error(L, "%s: %s[%d] (%d) must be after %s[%d] (%d) and at most the %d ids", fn, name, (int)k + 1, (int)v[k], name,
                 (int)k, (int)v[k - 1], (int)n);
  }
  for (size_t k = 0; k < len; k++) v[k]--;
  *ns = (int)len;
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
void lg_check_keys(lua_State *L, int idx, const char *fn, const char *const *known) {
  if (lua_isnoneornil(L, idx)) return;
  idx = lua_absindex(L, idx);
  lg_check_table(L, idx, fn, "opts", "a table");
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    int ok = 0;
    if (lua_type(L, -1) == LUA_TSTRING) {
      const char *k = lua_tostring(L, -1);
      for (const char *const *p = known; *p && !ok; p++) ok = strcmp(*p, k) == 0;
    }
    if (!ok) luaL_error(L, "%s: unknown option '%s'", fn, given(L, lua_gettop(L)));
  }
}

/* pushes opts[key] and returns its index, or 0 (nothing pushed) when the
   options or the field are nil */
static int opt_field(lua_State *L, int idx, const char *key) {
  if (lua_isnoneornil(L, idx)) return 0;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return 0; }
  return lua_gettop(L);
}

lua_Integer lg_opt_int(lua_State *L, int idx, const char *fn, const char *key, lua_Integer lo, lua_Integer hi, lua_Integer dflt) {
  int at = opt_field(L, idx, key);
  if (!at) return dflt;
  lua_Integer v = check_int(L, at, fn, key, lo, hi);
  lua_pop(L, 1);
  return v;
}

double lg_opt_range(lua_State *L, int idx, const char *fn, const char *key, double lo, double hi, int flags, double dflt) {
  int at = opt_field(L, idx, key);
  if (!at) return dflt;
  double v = lg_check_range(L, at, fn, key, lo, hi, flags);
  lua_pop(L, 1);
  return v;
}

int lg_opt_bool(lua_State *L, int idx, const char *fn, const char *key, int dflt) {
  int at = opt_field(L, idx, key);
  if (!at) return dflt;
  int v = lg_check_bool(L, at, fn, key);
  lua_pop(L, 1);
  return v;
}

const char *lg_opt_str(lua_State *L, int idx, const char *fn, const char *key, const char *dflt) {
  int at = opt_field(L, idx, key);
  if (!at) return dflt;
  const char *s = lg_check_str(L, at, fn, key, NULL);
  lua_pop(L, 1);   /* the string stays referenced by the options table */
  return s;
}

int lg_opt_choice(lua_State *L, int idx, const char *fn, const char *key, const char *const *names, int dflt) {
  int at = opt_field(L, idx, key);
  if (!at) return dflt;
  int v = lg_check_choice(L, at, fn, key, names);
  lua_pop(L, 1);
  return v;
}
/* }====================================================== */

/* {====================================================== values */
/* a JSON value as Lua: objects and arrays as tables, a null member left
   out, numbers with an integral value as integers */
static void push_json(lua_State *L, const cJSON *j) {
  if (cJSON_IsArray(j) || cJSON_IsObject(j)) {
    int array = cJSON_IsArray(j), i = 0;
    lua_createtable(L, array ? cJSON_GetArraySize(j) : 0, array ? 0 : cJSON_GetArraySize(j));
    const cJSON *x;
    cJSON_ArrayForEach(x, j) {
      i++;
      if (cJSON_IsNull(x)) continue;
      push_json(L, x);
      if (array) lua_rawseti(L, -2, i);
      else lua_setfield(L, -2, x->string);
    }
  } else if (cJSON_IsString(j)) lua_pushstring(L, j->valuestring);
  else if (cJSON_IsBool(j)) lua_pushboolean(L, cJSON_IsTrue(j));
  else if (cJSON_IsNumber(j) && j->valuedouble == (double)(int64_t)j->valuedouble &&
           j->valuedouble >= -9007199254740992.0 && j->valuedouble <= 9007199254740992.0)
    lua_pushinteger(L, (lua_Integer)j->valuedouble);
  else if (cJSON_IsNumber(j)) lua_pushnumber(L, j->valuedouble);
  else lua_pushnil(L);
}

/* The table is config.json read back, so that config.c's writer is the one
   place that maps a config to its fields. */
void lg_push_config(lua_State *L, const gptoss_config *c) {
  char *text = gptoss_config_to_json(c);
  cJSON *j = text ? cJSON_Parse(text) : NULL;
  free(text);
  if (!j) luaL_error(L, "out of memory");
  push_json(L, j);
  cJSON_Delete(j);
}

void lg_push_tensor(lua_State *L, const gptoss_tensor *t) {
  lua_createtable(L, 0, 5);
  lua_pushstring(L, t->name); lua_setfield(L, -2, "name");
  lua_pushstring(L, gptoss_dtype_name(t->dtype)); lua_setfield(L, -2, "dtype");
  lua_createtable(L, t->ndim, 0);
  for (int d = 0; d < t->ndim; d++) { lua_pushinteger(L, (lua_Integer)t->shape[d]); lua_rawseti(L, -2, d + 1); }
  lua_setfield(L, -2, "shape");
  lua_pushnumber(L, (lua_Number)t->nbytes); lua_setfield(L, -2, "bytes");
  lua_pushstring(L, t->file); lua_setfield(L, -2, "file");
}

void lg_push_tensor_list(lua_State *L, const gptoss_st *st) {
  size_t n = gptoss_st_count(st);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lg_push_tensor(L, gptoss_st_at(st, i));
    lua_rawseti(L, -2, (lua_Integer)(i + 1));
  }
}
/* }====================================================== */
