/*
** adapter.c: the gptoss.Adapter type (a LoRA adapter in PEFT format)
** and its use by sessions.
*/
#include <math.h>
#include <string.h>
#include "binding.h"

/* the engine adapter comes first: lg_check_adapter reads it for model.c */
typedef struct ladapter { gptoss_adapter *a; } ladapter;

static ladapter *push_adapter(lua_State *L) { return lg_box(L, sizeof(ladapter), ADAPTER_T); }

/* gptoss.core.adapter_load(dir) -> Adapter | nil, message */
static int l_adapter_load(lua_State *L) {
  const char *dir = lg_check_str(L, 1, "gptoss.adapter.load", "dir", NULL);
  ladapter *b = push_adapter(L);
  if (gptoss_adapter_load(dir, &b->a)) return lg_fail(L);
  return 1;
}

/* a:save(dir [, { layout = "peft" | "unsloth" }]) -> true | nil, message */
static int adapter_save(lua_State *L) {
  const char *fn = "lora:save";
  static const char *const keys[] = {"layout", NULL}, *const layouts[] = {"peft", "unsloth", NULL};
  gptoss_adapter *a = lg_check_adapter(L, 1, fn, "self");
  const char *dir = lg_check_str(L, 2, fn, "dir", NULL);
  int layout = GPTOSS_LAYOUT_PEFT;
  if (!lua_isnoneornil(L, 3)) {
    lg_check_keys(L, 3, fn, keys);
    layout = lg_opt_choice(L, 3, fn, "layout", layouts, 0) == 1 ? GPTOSS_LAYOUT_UNSLOTH : GPTOSS_LAYOUT_PEFT;
  }
  if (gptoss_adapter_save_layout(a, dir, (gptoss_layout)layout)) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* the Lua names of the modules, in gptoss_lora_module order */
static const char *const module_names[] = {"q", "k", "v", "o", "gate_up", "down", NULL};

/* the LoRA named by (layer, module) at arguments li, li + 1 of fn, or NULL
   (none there); *l and *m get the layer and module */
static gptoss_lora *arg_module(lua_State *L, gptoss_adapter *a, int li, const char *fn, int *l, int *m) {
  *l = (int)lg_check_int(L, li, fn, "layer", 0, GPTOSS_MAX_LAYERS - 1);
  *m = lg_check_choice(L, li + 1, fn, "module", module_names);
  return (gptoss_lora *)gptoss_adapter_module(a, *l, (gptoss_lora_module)*m);
}

/* a:module(layer, "q"|"k"|"v"|"o"|"gate_up"|"down") -> { r, experts, scale, A = Floats [rk x in],
   B = Floats [out x rk], gA, gB (once trained) } | nil */
static int adapter_module(lua_State *L) {
  int l, m;
  gptoss_adapter *a = lg_check_adapter(L, 1, "lora:module", "self");
  const gptoss_lora *x = arg_module(L, a, 2, "lora:module", &l, &m);
  if (!x) { lua_pushnil(L); return 1; }
  float *gA, *gB;
  gptoss_adapter_grads(a, l, (gptoss_lora_module)m, &gA, &gB);
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, x->r); lua_setfield(L, -2, "r");
  lua_pushinteger(L, x->experts); lua_setfield(L, -2, "experts");
  lua_pushnumber(L, x->scale); lua_setfield(L, -2, "scale");
  lfloats *f = lg_floats_new(L, x->rk, x->in);
  memcpy(f->v, x->A, sizeof(float) * (size_t)x->rk * x->in);
  lua_setfield(L, -2, "A");
  f = lg_floats_new(L, x->out, x->rk);
  memcpy(f->v, x->B, sizeof(float) * (size_t)x->out * x->rk);
  lua_setfield(L, -2, "B");
  if (gA) {
    f = lg_floats_new(L, x->rk, x->in);
    memcpy(f->v, gA, sizeof(float) * (size_t)x->rk * x->in);
    lua_setfield(L, -2, "gA");
    f = lg_floats_new(L, x->out, x->rk);
    memcpy(f->v, gB, sizeof(float) * (size_t)x->out * x->rk);
    lua_setfield(L, -2, "gB");
  }
  return 1;
}

/* gptoss.core.lora_new(model, { r, alpha, rslora, targets = {"q","k","v","o","gate_up","down"} or groups
   {"attn", "experts"} (default: attn), layers = {0-based},
   init = "peft"|"random", seed, dropout }) -> Adapter; bad options raise */
static int l_lora_new(lua_State *L) {
  const char *fn = "gptoss.lora";
  gptoss_model *m = lg_check_model(L, 1, fn, "model");
  static const char *const keys[] = {"r", "alpha", "rslora", "targets", "layers", "init", "seed", "dropout", NULL};
  static const char *const inits[] = {"peft", "random", NULL};
  lg_check_keys(L, 2, fn, keys);
  gptoss_lora_opts o;
  memset(&o, 0, sizeof o);
  o.r = (int)lg_opt_int(L, 2, fn, "r", 1, GPTOSS_LORA_MAX_RANK, 8);
  o.alpha = lg_opt_range(L, 2, fn, "alpha", 0, HUGE_VAL, LG_GT, 2.0 * o.r);
  o.dropout = lg_opt_range(L, 2, fn, "dropout", 0, 1, LG_LT, 0);
  o.seed = (uint64_t)lg_opt_int(L, 2, fn, "seed", 0, (lua_Integer)1 << 53, 0);
  o.init = lg_opt_choice(L, 2, fn, "init", inits, 0);
  o.rslora = lg_opt_bool(L, 2, fn, "rslora", 0);
  int nl = gptoss_model_config(m)->num_hidden_layers;
  unsigned char *layers = NULL;
  o.modules = 15;   /* attention */
  if (lua_istable(L, 2)) {
    lua_getfield(L, 2, "targets");
    if (!lua_isnil(L, -1)) {
      lg_check_table(L, -1, fn, "targets", "a list of module names");
      o.modules = 0;
      for (int i = 1; i <= (int)lua_rawlen(L, -1); i++) {
        lua_rawgeti(L, -1, i);
        const char *t = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        const char *const *names = module_names;
        if (t && strcmp(t, "attn") == 0) { o.modules |= 15u; lua_pop(L, 1); continue; }
        if (t && strcmp(t, "experts") == 0) { o.modules |= 48u; lua_pop(L, 1); continue; }
        int k = 0;
        while (k < 6 && !(t && (strcmp(t, names[k]) == 0 ||
                                (strncmp(t, names[k], strlen(names[k])) == 0 && strcmp(t + strlen(names[k]), "_proj") == 0))))
          k++;
        if (k == 6) {
          lua_pushfstring(L, "targets[%d]", i);
          lg_arg_error(L, -2, fn, lua_tostring(L, -1), "q, k, v, o, gate_up, down (or their _proj names), attn or experts");
        }
        o.modules |= 1u << k;
        lua_pop(L, 1);
      }
    }
    lua_getfield(L, 2, "layers");
    if (!lua_isnil(L, -1)) {
      lg_check_table(L, -1, fn, "layers", "a list of 0-based layer indices");
      layers = lua_newuserdatauv(L, (size_t)nl, 0);
      memset(layers, 0, (size_t)nl);
      for (int i = 1; i <= (int)lua_rawlen(L, -2); i++) {
        lua_rawgeti(L, -2, i);
        lua_pushfstring(L, "layers[%d]", i);
        layers[lg_check_int(L, -2, fn, lua_tostring(L, -1), 0, nl - 1)] = 1;
        lua_pop(L, 2);
      }
    }
  }
  o.layers = layers;
  ladapter *b = push_adapter(L);
  if (gptoss_adapter_new(m, &o, &b->a)) return lg_raise(L);
  return 1;
}

/* gptoss.core.lora_backward(model, adapter, ids [, mask [, starts]]) -> loss sum, count;
   starts: packed examples' first positions (gptoss_lora_backward_packed) */
static int l_lora_backward(lua_State *L) {
  const char *fn = "model:lora_backward";
  lua_settop(L, 5);                      /* the mask stays at 4 whatever lg_ids pushes */
  gptoss_model *m = lg_check_model(L, 1, fn, "self");
  gptoss_adapter *a = lg_check_adapter(L, 2, fn, "adapter");
  size_t n;
  int32_t *ids = lg_ids(L, 3, fn, "ids", &n);
  uint8_t *mask = lua_newuserdatauv(L, n ? n : 1, 0);
  if (lua_isnil(L, 4)) memset(mask, 1, n);
  else {
    lg_check_table(L, 4, fn, "mask", "a list of booleans, one per id");
    if (lua_rawlen(L, 4) != n) return luaL_error(L, "%s: mask has %d entries for %d ids", fn, (int)lua_rawlen(L, 4), (int)n);
    for (size_t i = 0; i < n; i++) {
      lua_rawgeti(L, 4, (lua_Integer)i + 1);
      if (lua_type(L, -1) == LUA_TNUMBER) mask[i] = lua_tonumber(L, -1) != 0;   /* 0 / 1, as tensors hold masks */
      else {
        lua_pushfstring(L, "mask[%d]", (int)i + 1);
        mask[i] = (uint8_t)lg_check_bool(L, -2, fn, lua_tostring(L, -1));
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
  }
  int32_t *starts = NULL;
  int ns = 0;
  if (!lua_isnil(L, 5)) starts = lg_starts(L, 5, fn, "starts", n, &ns);
  double loss = 0;
  int count = 0;
  if (gptoss_lora_backward_packed(m, a, ids, mask, (int)n, starts, ns, &loss, &count)) return lg_raise(L);
  lua_pushnumber(L, loss);
  lua_pushinteger(L, count);
  return 2;
}

/* a:save_state(path) / a:load_state(path) -> true | nil, message */
static int adapter_save_state(lua_State *L) {
  gptoss_adapter *a = lg_check_adapter(L, 1, "lora:save_state", "self");
  if (gptoss_adapter_save_state(a, lg_check_str(L, 2, "lora:save_state", "path", NULL))) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}

static int adapter_load_state(lua_State *L) {
  gptoss_adapter *a = lg_check_adapter(L, 1, "lora:load_state", "self");
  if (gptoss_adapter_load_state(a, lg_check_str(L, 2, "lora:load_state", "path", NULL))) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* gptoss.core.dynamic_map(signed) -> the 256 values of bitsandbytes'
   dynamic map (the 8-bit AdamW's codes), ascending */
static int l_dynamic_map(lua_State *L) {
  const float *map = gptoss_dynamic_map(lg_check_bool(L, 1, "gptoss.core.dynamic_map", "signed"));
  lua_createtable(L, 256, 0);
  for (int i = 0; i < 256; i++) { lua_pushnumber(L, map[i]); lua_rawseti(L, -2, i + 1); }
  return 1;
}

/* gptoss.core.quantize_blockwise(values, signed) -> codes (0..255), absmax
   (one per 256 values): the 8-bit AdamW's quantization of a list */
static int l_quantize_blockwise(lua_State *L) {
  const char *fn = "gptoss.core.quantize_blockwise";
  lg_check_table(L, 1, fn, "values", "a list of numbers");
  int is_signed = lg_check_bool(L, 2, fn, "signed");
  size_t n = lua_rawlen(L, 1), blocks = (n + GPTOSS_Q8_BLOCK - 1) / GPTOSS_Q8_BLOCK;
  float *x = lua_newuserdatauv(L, sizeof(float) * (n + blocks) + n + 1, 0), *absmax = x + n;
  uint8_t *codes = (uint8_t *)(absmax + blocks);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (lua_Integer)i + 1);
    lua_pushfstring(L, "values[%d]", (int)i + 1);
    x[i] = (float)lg_check_num(L, -2, fn, lua_tostring(L, -1), 1);
    lua_pop(L, 2);
  }
  gptoss_quantize_blockwise(x, n, is_signed, codes, absmax);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) { lua_pushinteger(L, codes[i]); lua_rawseti(L, -2, (lua_Integer)i + 1); }
  lua_createtable(L, (int)blocks, 0);
  for (size_t b = 0; b < blocks; b++) { lua_pushnumber(L, absmax[b]); lua_rawseti(L, -2, (lua_Integer)b + 1); }
  return 2;
}

/* gptoss.core.lora_merge(model, adapter, out_dir [, threads]) -> out_dir | nil, message */
static int l_lora_merge(lua_State *L) {
  const char *fn = "model:merge";
  gptoss_model *m = lg_check_model(L, 1, fn, "self");
  gptoss_adapter *a = lg_check_adapter(L, 2, fn, "adapter");
  const char *out = lg_check_str(L, 3, fn, "out_dir", NULL);
  int threads = lua_isnoneornil(L, 4) ? 0 : (int)lg_check_int(L, 4, fn, "threads", 0, INT32_MAX);
  if (gptoss_adapter_merge(m, a, out, threads)) return lg_fail(L);
  lua_pushvalue(L, 3);
  return 1;
}

/* a:set(layer, module, "A"|"B", row, col, value) -> a: one weight (1-based row and col) */
static int adapter_set(lua_State *L) {
  const char *fn = "lora:set";
  static const char *const which[] = {"A", "B", NULL};
  int l, m;
  gptoss_adapter *a = lg_check_adapter(L, 1, fn, "self");
  gptoss_lora *x = arg_module(L, a, 2, fn, &l, &m);
  int isA = lg_check_choice(L, 4, fn, "which", which) == 0;
  if (!x) return luaL_error(L, "%s: the adapter has no LoRA on layer %d %s", fn, l, module_names[m]);
  int rows = isA ? x->rk : x->out, cols = isA ? x->in : x->rk;
  lua_Integer i = lg_check_int(L, 5, fn, "row", 1, rows), j = lg_check_int(L, 6, fn, "col", 1, cols);
  float v = (float)lg_check_num(L, 7, fn, "value", 1);
  (isA ? x->A : x->B)[(size_t)(i - 1) * cols + (size_t)(j - 1)] = v;
  gptoss_adapter_touch(a);
  lua_settop(L, 1);
  return 1;
}

/* a:copy_from(b) -> a: b's LoRA weights into a (same layout) */
static int adapter_copy_from(lua_State *L) {
  gptoss_adapter *a = lg_check_adapter(L, 1, "lora:copy_from", "self");
  if (gptoss_adapter_copy_weights(a, lg_check_adapter(L, 2, "lora:copy_from", "other"))) return lg_raise(L);
  lua_settop(L, 1);
  return 1;
}

static int adapter_zero_grad(lua_State *L) {
  gptoss_adapter_zero_grad(lg_check_adapter(L, 1, "lora:zero_grad", "self"));
  lua_settop(L, 1);
  return 1;
}

/* the optimizers, in gptoss_optim order after NONE */
static const char *const optim_names[] = {"adamw", "adamw_8bit", NULL};

/* a:step{ lr, betas = {b1, b2}, eps, weight_decay, max_grad_norm, grad_scale,
   optim = "adamw" | "adamw_8bit" } -> gradient norm */
static int adapter_step(lua_State *L) {
  const char *fn = "lora:step";
  gptoss_adapter *a = lg_check_adapter(L, 1, fn, "self");
  static const char *const keys[] = {"lr", "betas", "eps", "weight_decay", "max_grad_norm", "grad_scale", "optim", NULL};
  lg_check_keys(L, 2, fn, keys);
  double inf = HUGE_VAL;   /* the ranges gptoss_adapter_step holds them to, checked here to name them */
  gptoss_adamw o = {lg_opt_range(L, 2, fn, "lr", 0, inf, 0, 2e-4), 0.9, 0.999, lg_opt_range(L, 2, fn, "eps", 0, inf, LG_GT, 1e-8),
                    lg_opt_range(L, 2, fn, "weight_decay", 0, inf, 0, 0.01), lg_opt_range(L, 2, fn, "max_grad_norm", 0, inf, 0, 0),
                    lg_opt_range(L, 2, fn, "grad_scale", 0, inf, LG_GT, 1), lg_opt_choice(L, 2, fn, "optim", optim_names, 0)};
  if (lua_istable(L, 2)) {
    lua_getfield(L, 2, "betas");
    if (!lua_isnil(L, -1)) {
      lg_check_table(L, -1, fn, "betas", "{ beta1, beta2 }");
      lua_rawgeti(L, -1, 1); o.beta1 = lg_check_range(L, -1, fn, "betas[1]", 0, 1, LG_LT);
      lua_rawgeti(L, -2, 2); o.beta2 = lg_check_range(L, -1, fn, "betas[2]", 0, 1, LG_LT);
    }
  }
  double norm = 0;
  if (gptoss_adapter_step(a, &o, &norm)) return lg_raise(L);
  lua_pushnumber(L, norm);
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
  else if (strcmp(k, "dropout") == 0) lua_pushnumber(L, d.dropout);
  else if (strcmp(k, "layers") == 0) lua_pushinteger(L, d.nlayers);
  else if (strcmp(k, "modules") == 0) lua_pushinteger(L, d.modules);
  else if (strcmp(k, "params") == 0) lua_pushinteger(L, (lua_Integer)d.params);
  else if (strcmp(k, "steps") == 0) lua_pushinteger(L, gptoss_adapter_steps(b->a));
  else if (strcmp(k, "optim") == 0) {   /* nil until a step or a loaded state chooses */
    gptoss_optim o = gptoss_adapter_optim(b->a, NULL);
    if (o == GPTOSS_OPTIM_NONE) return 0;
    lua_pushstring(L, optim_names[o - 1]);
  } else if (strcmp(k, "optimizer_bytes") == 0) {
    size_t bytes;
    gptoss_adapter_optim(b->a, &bytes);
    lua_pushinteger(L, (lua_Integer)bytes);
  } else return 0;
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

void lg_open_adapter(lua_State *L) {
  static const luaL_Reg methods[] = {{"save", adapter_save}, {"module", adapter_module}, {"zero_grad", adapter_zero_grad},
                                     {"save_state", adapter_save_state}, {"load_state", adapter_load_state},
                                     {"copy_from", adapter_copy_from}, {"set", adapter_set},
                                     {"step", adapter_step}, {"close", adapter_gc}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
    {"__gc", adapter_gc}, {"__tostring", adapter_tostring},
#if LUA_VERSION_NUM >= 504
    {"__close", adapter_gc},
#endif
    {NULL, NULL}};
  lg_class(L, ADAPTER_T, methods, meta, adapter_fields);
  static const luaL_Reg funcs[] = {{"adapter_load", l_adapter_load}, {"lora_new", l_lora_new},
                                   {"lora_backward", l_lora_backward}, {"lora_merge", l_lora_merge},
                                   {"dynamic_map", l_dynamic_map}, {"quantize_blockwise", l_quantize_blockwise}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
