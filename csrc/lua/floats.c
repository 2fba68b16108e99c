/*
** floats.c: gptoss.Floats, a rows x cols float32 array (logits, tensors,
** LoRA weights).
*/
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "binding.h"

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

static int fl_row_index(lua_State *L, lfloats *f, int arg, const char *fn) {
  return (int)lg_check_int(L, arg, fn, "row", 1, f->rows) - 1;
}

static int fl_row(lua_State *L) {
  lfloats *f = checkfloats(L);
  int r = fl_row_index(L, f, 2, "f:row");
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
  int r = f->rows == 1 && lua_isnoneornil(L, 2) ? 0 : fl_row_index(L, f, 2, "f:argmax");
  if (f->cols == 0) return luaL_error(L, "argmax: the Floats has no columns");
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
  int r = fl_row_index(L, f, 2, "f:get");
  lua_Integer c = lg_check_int(L, 3, "f:get", "col", 1, f->cols);
  lua_pushnumber(L, f->v[(size_t)r * f->cols + (size_t)(c - 1)]);
  return 1;
}

/* f:nll(row, id): -log softmax(row)[id], in double precision; id is 0-based
   like token ids */
static int fl_nll(lua_State *L) {
  lfloats *f = checkfloats(L);
  int r = fl_row_index(L, f, 2, "f:nll");
  lua_Integer id = lg_check_int(L, 3, "f:nll", "id", 0, (lua_Integer)f->cols - 1);
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
  const char *s = lg_check_str(L, 1, "gptoss.floats", "bytes", &n);
  lua_Integer rows = lg_check_int(L, 2, "gptoss.floats", "rows", 0, INT32_MAX);
  lua_Integer cols = lg_check_int(L, 3, "gptoss.floats", "cols", 0, INT32_MAX);
  /* rows, cols < 2^31: their product and its bytes fit in 64 bits */
  if ((uint64_t)rows * (uint64_t)cols * sizeof(float) != n)
    return luaL_error(L, "gptoss.floats: bytes must hold rows x cols = %d x %d float32 values (4 bytes each)", (int)rows, (int)cols);
  lfloats *f = lg_floats_new(L, (int)rows, (int)cols);
  memcpy(f->v, s, n);
  return 1;
}

void lg_open_floats(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"row", fl_row}, {"argmax", fl_argmax}, {"shape", fl_shape}, {"bytes", fl_bytes}, {"get", fl_get}, {"nll", fl_nll}, {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__len", fl_len}, {"__tostring", fl_tostring}, {NULL, NULL}};
  lg_class(L, FLOATS_T, methods, meta, fl_fields);
  lua_pushcfunction(L, l_floats);
  lua_setfield(L, -2, "floats");
}
