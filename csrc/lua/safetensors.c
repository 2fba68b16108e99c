/*
** safetensors.c: gptoss.SafeTensors (reader), gptoss.Writer, and the
** config and tensor-table functions the checkpoint generator is built on.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "binding.h"
#include "mxfp4.h"

/* {====================================================== config */
/* config_parse(json [, where]) -> table | nil, message */
static int l_config_parse(lua_State *L) {
  size_t len;
  const char *s = lg_check_str(L, 1, "core.config_parse", "json", &len);
  const char *where = lua_isnoneornil(L, 2) ? "config.json" : lg_check_str(L, 2, "core.config_parse", "where", NULL);
  gptoss_config c;
  if (gptoss_config_parse(s, len, where, &c)) return lg_fail(L);
  lg_push_config(L, &c);
  return 1;
}

/* config_load(path) -> table | nil, message */
static int l_config_load(lua_State *L) {
  gptoss_config c;
  if (gptoss_config_load(lg_check_str(L, 1, "gptoss.config_load", "path", NULL), &c)) return lg_fail(L);
  lg_push_config(L, &c);
  return 1;
}

static void parse_or_raise(lua_State *L, int idx, gptoss_config *c, const char *fn) {
  size_t len;
  const char *s = lg_check_str(L, idx, fn, "json", &len);
  if (gptoss_config_parse(s, len, "config", c)) lg_raise(L);
}

/* config_json(json) -> the canonical Hugging Face config.json text */
static int l_config_json(lua_State *L) {
  gptoss_config c;
  parse_or_raise(L, 1, &c, "core.config_json");
  char *s = gptoss_config_to_json(&c);
  if (!s) return luaL_error(L, "out of memory");
  lua_pushstring(L, s);
  free(s);
  return 1;
}

/* tensor_specs(json) -> { {name=, dtype=, shape={...}, bytes=, layer=}, ... } */
static int l_tensor_specs(lua_State *L) {
  gptoss_config c;
  parse_or_raise(L, 1, &c, "core.tensor_specs");
  gptoss_tensor_spec *v;
  size_t n;
  if (gptoss_tensor_specs(&c, &v, &n)) return lg_raise(L);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_createtable(L, 0, 5);
    lua_pushstring(L, v[i].name); lua_setfield(L, -2, "name");
    lua_pushstring(L, gptoss_dtype_name(v[i].dtype)); lua_setfield(L, -2, "dtype");
    lua_createtable(L, v[i].ndim, 0);
    for (int d = 0; d < v[i].ndim; d++) { lua_pushinteger(L, (lua_Integer)v[i].shape[d]); lua_rawseti(L, -2, d + 1); }
    lua_setfield(L, -2, "shape");
    lua_pushnumber(L, (lua_Number)gptoss_tensor_spec_bytes(&v[i])); lua_setfield(L, -2, "bytes");
    lua_pushinteger(L, v[i].layer); lua_setfield(L, -2, "layer");
    lua_rawseti(L, -2, (lua_Integer)(i + 1));
  }
  free(v);
  return 1;
}
/* mxfp4_bf16(blocks, scales, E, out, in) -> the bf16 bytes [E][in][out]
   of MXFP4 experts [E][out][in/32][16] and [E][out][in/32]: the layout
   transformers holds unquantized gpt-oss in (for writing bf16 checkpoints) */
static int l_mxfp4_bf16(lua_State *L) {
  const char *fn = "core.mxfp4_bf16";
  size_t nb, ns;
  const char *blocks = lg_check_str(L, 1, fn, "blocks", &nb), *scales = lg_check_str(L, 2, fn, "scales", &ns);
  int E = (int)lg_check_int(L, 3, fn, "E", 1, INT32_MAX), out = (int)lg_check_int(L, 4, fn, "out", 1, INT32_MAX);
  int in = (int)lg_check_int(L, 5, fn, "in", 32, INT32_MAX);
  size_t n = (size_t)E * out * in;
  if (in % 32 || ns != n / 32 || nb != n / 2)
    return luaL_error(L, "%s: %d x %d x %d values need %d-wide rows and %zu bytes of blocks, %zu of scales (got %zu, %zu)", fn, E,
                      out, in, in, n / 2, n / 32, nb, ns);
  float *row = malloc(sizeof(float) * (size_t)in);
  uint16_t *w = malloc(sizeof(uint16_t) * n);
  if (!row || !w) { free(row); free(w); return luaL_error(L, "out of memory"); }
  for (size_t r = 0; r < (size_t)E * out; r++) {
    gptoss_mxfp4_row(row, (const uint8_t *)blocks + r * (size_t)in / 2, (const uint8_t *)scales + r * (size_t)in / 32, in);
    size_t e = r / (size_t)out, o = r % (size_t)out;
    for (int i = 0; i < in; i++) w[(e * in + i) * out + o] = gptoss_f32_to_bf16(row[i]);
  }
  free(row);
  lua_pushlstring(L, (const char *)w, sizeof(uint16_t) * n);
  free(w);
  return 1;
}
/* }====================================================== */

/* {====================================================== reader */
typedef struct lreader { gptoss_st *st; } lreader;

static lreader *checkreader(lua_State *L) { return lg_open(L, 1, READER_T, "safetensors reader is closed"); }

static int l_safetensors(lua_State *L) {
  const char *path = lg_check_str(L, 1, "gptoss.safetensors", "path", NULL);
  lreader *r = lg_box(L, sizeof *r, READER_T);
  if (gptoss_st_open(path, &r->st)) return lg_fail(L);
  return 1;
}

static int rd_gc(lua_State *L) {
  lreader *r = lg_udata(L, 1, READER_T);
  gptoss_st_free(r->st);
  r->st = NULL;
  return 0;
}

static int rd_tensors(lua_State *L) {
  lg_push_tensor_list(L, checkreader(L)->st);
  return 1;
}

static const gptoss_tensor *find_or_raise(lua_State *L, lreader *r, const char *fn) {
  const char *name = lg_check_str(L, 2, fn, "name", NULL);
  const gptoss_tensor *t = gptoss_st_find(r->st, name);
  if (!t) luaL_error(L, "%s: no tensor named '%s'", fn, name);
  return t;
}

static int rd_tensor(lua_State *L) {
  lreader *r = checkreader(L);
  const gptoss_tensor *t = gptoss_st_find(r->st, lg_check_str(L, 2, "st:tensor", "name", NULL));
  if (!t) return 0;
  lg_push_tensor(L, t);
  return 1;
}

static int rd_read(lua_State *L) {
  const gptoss_tensor *t = find_or_raise(L, checkreader(L), "st:read");
  lua_pushlstring(L, t->data, t->nbytes);
  return 1;
}

/* r:floats(name) -> Floats (F32, BF16 or F16 converted), 2-D as rows x cols,
   any other rank as 1 x n */
static int rd_floats(lua_State *L) {
  const gptoss_tensor *t = find_or_raise(L, checkreader(L), "st:floats");
  size_t n = 1;
  for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
  int rows = t->ndim == 2 ? (int)t->shape[0] : 1, cols = t->ndim == 2 ? (int)t->shape[1] : (int)n;
  lfloats *f = NULL;
  if (t->dtype == GPTOSS_F32) { f = lg_floats_new(L, rows, cols); memcpy(f->v, t->data, n * 4); }
  else if (t->dtype == GPTOSS_F64) {
    f = lg_floats_new(L, rows, cols);
    const double *p = t->data;
    for (size_t i = 0; i < n; i++) f->v[i] = (float)p[i];
  }
  else if (t->dtype == GPTOSS_BF16) {
    f = lg_floats_new(L, rows, cols);
    const uint16_t *p = t->data;
    for (size_t i = 0; i < n; i++) f->v[i] = gptoss_bf16_to_f32(p[i]);
  } else if (t->dtype == GPTOSS_F16) {
    f = lg_floats_new(L, rows, cols);
    const uint16_t *p = t->data;
    for (size_t i = 0; i < n; i++) {
      uint32_t h = p[i], s = (h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 0x3ffu, u;
      if (e == 0) {
        if (!m) u = s;
        else { e = 113; while (!(m & 0x400u)) { m <<= 1; e--; } u = s | (e << 23) | ((m & 0x3ffu) << 13); }
      } else if (e == 31) u = s | 0x7f800000u | (m << 13);
      else u = s | ((e + 112) << 23) | (m << 13);
      memcpy(&f->v[i], &u, 4);
    }
  } else {
    return luaL_error(L, "tensor '%s' is %s, not a float type", t->name, gptoss_dtype_name(t->dtype));
  }
  return 1;
}

/* r:numbers(name) -> flat Lua array of every element, any numeric dtype
   (integers exactly, F64 in full precision) */
static int rd_numbers(lua_State *L) {
  const gptoss_tensor *t = find_or_raise(L, checkreader(L), "st:numbers");
  size_t n = 1;
  for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    const unsigned char *p = (const unsigned char *)t->data;
    switch (t->dtype) {
      case GPTOSS_U8: lua_pushinteger(L, p[i]); break;
      case GPTOSS_I8: lua_pushinteger(L, (int8_t)p[i]); break;
      case GPTOSS_I16: { int16_t v; memcpy(&v, p + 2 * i, 2); lua_pushinteger(L, v); break; }
      case GPTOSS_U16: { uint16_t v; memcpy(&v, p + 2 * i, 2); lua_pushinteger(L, v); break; }
      case GPTOSS_I32: { int32_t v; memcpy(&v, p + 4 * i, 4); lua_pushinteger(L, v); break; }
      case GPTOSS_U32: { uint32_t v; memcpy(&v, p + 4 * i, 4); lua_pushinteger(L, (lua_Integer)v); break; }
      case GPTOSS_I64: { int64_t v; memcpy(&v, p + 8 * i, 8); lua_pushinteger(L, (lua_Integer)v); break; }
      case GPTOSS_F32: { float v; memcpy(&v, p + 4 * i, 4); lua_pushnumber(L, v); break; }
      case GPTOSS_F64: { double v; memcpy(&v, p + 8 * i, 8); lua_pushnumber(L, v); break; }
      case GPTOSS_BF16: { uint16_t v; memcpy(&v, p + 2 * i, 2); lua_pushnumber(L, gptoss_bf16_to_f32(v)); break; }
      default: return luaL_error(L, "tensor '%s': numbers() does not read %s", t->name, gptoss_dtype_name(t->dtype));
    }
    lua_rawseti(L, -2, (lua_Integer)(i + 1));
  }
  return 1;
}

static int rd_metadata(lua_State *L) {
  lreader *r = checkreader(L);
  const char *v = gptoss_st_metadata(r->st, lg_check_str(L, 2, "st:metadata", "key", NULL));
  if (v) lua_pushstring(L, v); else lua_pushnil(L);
  return 1;
}
/* }====================================================== */

/* {====================================================== writer */
typedef struct lwriter { gptoss_st_writer *w; } lwriter;

static lwriter *checkwriter(lua_State *L) { return lg_open(L, 1, WRITER_T, "writer is closed (committed or discarded)"); }

static int l_writer(lua_State *L) {
  const char *path = lg_check_str(L, 1, "gptoss.writer", "path", NULL);
  lwriter *w = lg_box(L, sizeof *w, WRITER_T);
  if (gptoss_stw_new(path, &w->w)) return lg_raise(L);
  return 1;
}

static int wr_gc(lua_State *L) {
  lwriter *w = lg_udata(L, 1, WRITER_T);
  gptoss_stw_free(w->w);
  w->w = NULL;
  return 0;
}

/* w:add(name, dtype, shape, data_string | { fill = "normal"|"uniform"|"const", ... }) */
static int wr_add(lua_State *L) {
  const char *fn = "writer:add";
  lwriter *w = checkwriter(L);
  const char *name = lg_check_str(L, 2, fn, "name", NULL);
  const char *dtn = lg_check_str(L, 3, fn, "dtype", NULL);
  int dt = gptoss_dtype_from_name(dtn);
  if (dt < 0) return luaL_error(L, "%s: unknown dtype '%s'", fn, dtn);
  lg_check_table(L, 4, fn, "shape", "a list of dimensions");
  int nd = (int)lua_rawlen(L, 4);
  if (nd > GPTOSS_MAX_DIMS) return luaL_error(L, "%s: at most %d dimensions (got %d)", fn, GPTOSS_MAX_DIMS, nd);
  int64_t shape[GPTOSS_MAX_DIMS];
  for (int d = 0; d < nd; d++) {
    lua_rawgeti(L, 4, d + 1);
    lua_pushfstring(L, "shape[%d]", d + 1);
    shape[d] = (int64_t)lg_check_int(L, -2, fn, lua_tostring(L, -1), 0, INT64_MAX);
    lua_pop(L, 2);
  }
  gptoss_fill f;
  memset(&f, 0, sizeof f);
  if (lua_type(L, 5) == LUA_TSTRING) {
    f.kind = GPTOSS_FILL_DATA;
    f.data = lua_tolstring(L, 5, &f.nbytes);
  } else if (lua_istable(L, 5)) {
    static const char *const keys[] = {"fill", "mean", "std", "min", "max", "value", "seed", NULL};
    static const char *const fills[] = {"normal", "uniform", "const", NULL};
    lg_check_keys(L, 5, fn, keys);
    lua_getfield(L, 5, "fill");
    int k = lg_check_choice(L, -1, fn, "fill", fills);
    lua_pop(L, 1);
    double inf = HUGE_VAL;
    if (k == 0) { f.kind = GPTOSS_FILL_NORMAL; f.a = lg_opt_range(L, 5, fn, "mean", -inf, inf, 0, 0); f.b = lg_opt_range(L, 5, fn, "std", 0, inf, 0, 1); }
    else if (k == 1) { f.kind = GPTOSS_FILL_UNIFORM; f.a = lg_opt_range(L, 5, fn, "min", -inf, inf, 0, 0); f.b = lg_opt_range(L, 5, fn, "max", -inf, inf, 0, 1); }
    else { f.kind = GPTOSS_FILL_CONST; f.a = lg_opt_range(L, 5, fn, "value", -inf, inf, LG_INF, 0); }
    f.seed = (uint64_t)lg_opt_int(L, 5, fn, "seed", 0, (lua_Integer)1 << 53, 0);
  } else {
    return lg_arg_error(L, 5, fn, "data", "a string of bytes or a fill table");
  }
  if (gptoss_stw_add(w->w, name, (gptoss_dtype)dt, nd, shape, &f)) return lg_raise(L);
  lua_settop(L, 1);
  return 1;
}

static int wr_metadata(lua_State *L) {
  lwriter *w = checkwriter(L);
  if (gptoss_stw_metadata(w->w, lg_check_str(L, 2, "writer:metadata", "key", NULL), lg_check_str(L, 3, "writer:metadata", "value", NULL))) return lg_raise(L);
  lua_settop(L, 1);
  return 1;
}

static int wr_bytes(lua_State *L) {
  lwriter *w = checkwriter(L);
  lua_pushnumber(L, (lua_Number)gptoss_stw_data_bytes(w->w));
  return 1;
}

/* w:commit([threads]) -> true | nil, message; the writer is closed after */
static int wr_commit(lua_State *L) {
  lwriter *w = checkwriter(L);
  int threads = lua_isnoneornil(L, 2) ? gptoss_cpu_count() : (int)lg_check_int(L, 2, "writer:commit", "threads", 0, INT32_MAX);
  gptoss_status rc = gptoss_stw_commit(w->w, threads);
  gptoss_stw_free(w->w);
  w->w = NULL;
  if (rc) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}
/* }====================================================== */

void lg_open_safetensors(lua_State *L) {
  static const luaL_Reg rd_methods[] = {
    {"tensors", rd_tensors}, {"tensor", rd_tensor}, {"read", rd_read}, {"floats", rd_floats}, {"numbers", rd_numbers},
    {"metadata", rd_metadata}, {"close", rd_gc}, {NULL, NULL}};
  static const luaL_Reg rd_meta[] = {
    {"__gc", rd_gc},
#if LUA_VERSION_NUM >= 504
    {"__close", rd_gc},
#endif
    {NULL, NULL}};
  lg_class(L, READER_T, rd_methods, rd_meta, NULL);
  static const luaL_Reg wr_methods[] = {
    {"add", wr_add}, {"metadata", wr_metadata}, {"bytes", wr_bytes}, {"commit", wr_commit},
    {"close", wr_gc}, {NULL, NULL}};
  static const luaL_Reg wr_meta[] = {
    {"__gc", wr_gc},
#if LUA_VERSION_NUM >= 504
    {"__close", wr_gc},
#endif
    {NULL, NULL}};
  lg_class(L, WRITER_T, wr_methods, wr_meta, NULL);
  static const luaL_Reg funcs[] = {
    {"safetensors", l_safetensors}, {"writer", l_writer}, {"config_parse", l_config_parse},
    {"config_load", l_config_load}, {"config_json", l_config_json}, {"tensor_specs", l_tensor_specs},
    {"mxfp4_bf16", l_mxfp4_bf16}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
