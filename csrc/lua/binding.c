/*
** binding.c: the helpers every file of the binding uses (binding.h):
** engine errors to Lua, classes and boxes, ids, options, and the values
** more than one type pushes (configs, tensor lists, Floats).
*/
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
gptoss_model *lg_check_model(lua_State *L, int idx) {
  return *(gptoss_model **)lg_open(L, idx, MODEL_T, "model is closed");
}

gptoss_adapter *lg_check_adapter(lua_State *L, int idx) {
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
/* the value at idx as the caller wrote it: a float in the fewest digits
   that read back to it (Lua 5.4's %.14g would round 2^53), else its type */
static const char *given(lua_State *L, int idx) {
  int t = lua_type(L, idx);
  if (t == LUA_TSTRING) return lcompat_quote(L, idx);
#if LUA_VERSION_NUM >= 503
  if (t == LUA_TNUMBER && lua_isinteger(L, idx)) return lcompat_quote(L, idx);
#endif
  if (t != LUA_TNUMBER) return luaL_typename(L, idx);
  double n = (double)lua_tonumber(L, idx);
  char buf[40];
  snprintf(buf, sizeof buf, "%.15g", n);
  if (n == n && strtod(buf, NULL) != n) snprintf(buf, sizeof buf, "%.17g", n);
  lua_pushstring(L, buf);
  return lua_tostring(L, -1);
}

lua_Integer lg_check_int(lua_State *L, int idx, const char *fn, const char *name, lua_Integer lo, lua_Integer hi) {
  lua_Integer v = 0;
  if (lua_type(L, idx) != LUA_TNUMBER || !lcompat_tointeger(L, idx, &v) || v < lo || v > hi) {
    char range[48];   /* lua_pushfstring has no %lld */
    snprintf(range, sizeof range, "%lld..%lld", (long long)lo, (long long)hi);
    luaL_error(L, "%s: %s must be an integer in %s (got %s)", fn, name, range, given(L, idx));
  }
  return v;
}

double lg_check_num(lua_State *L, int idx, const char *fn, const char *name, int finite) {
  double v = lua_type(L, idx) == LUA_TNUMBER ? (double)lua_tonumber(L, idx) : 0;
  if (lua_type(L, idx) != LUA_TNUMBER || (finite && !(v - v == 0)))
    luaL_error(L, "%s: %s must be a %snumber (got %s)", fn, name, finite ? "finite " : "", given(L, idx));
  return v;
}

const char *lg_check_str(lua_State *L, int idx, const char *fn, const char *name, size_t *len) {
  if (lua_type(L, idx) != LUA_TSTRING) luaL_error(L, "%s: %s must be a string (got %s)", fn, name, given(L, idx));
  return lua_tolstring(L, idx, len);
}

void lg_check_table(lua_State *L, int idx, const char *fn, const char *name, const char *what) {
  if (lua_type(L, idx) != LUA_TTABLE) luaL_error(L, "%s: %s must be %s (got %s)", fn, name, what, given(L, idx));
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
    if (x < INT32_MIN || x > INT32_MAX)
      luaL_error(L, "token ids: element %d (%s) is out of range", (int)(i + 1), lcompat_quote(L, -1));
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
    luaL_error(L, "option '%s' must be an integer in -2^31..2^31-1 (got %s)", key, lcompat_quote(L, -1));
  lua_pop(L, 1);
  return (int)v;
}

double lg_opt_num(lua_State *L, int idx, const char *key, double dflt) {
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return dflt; }
  if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "option '%s' must be a number (got %s)", key, luaL_typename(L, -1));
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

int lg_opt_bool(lua_State *L, int idx, const char *key, int dflt) {
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return dflt; }
  if (lua_type(L, -1) != LUA_TBOOLEAN) luaL_error(L, "option '%s' must be a boolean (got %s)", key, luaL_typename(L, -1));
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

const char *lg_opt_str(lua_State *L, int idx, const char *key, const char *dflt) {
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return dflt; }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "option '%s' must be a string (got %s)", key, luaL_typename(L, -1));
  const char *s = lua_tostring(L, -1);
  lua_pop(L, 1);   /* the string stays referenced by the options table */
  return s;
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
