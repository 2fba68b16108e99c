/*
** adapter.c: the gptoss.Adapter type (a LoRA adapter in PEFT format)
** and its use by sessions.
*/
#include <string.h>
#include "binding.h"

/* the engine adapter comes first: lg_check_adapter reads it for model.c */
typedef struct ladapter { gptoss_adapter *a; } ladapter;

static ladapter *push_adapter(lua_State *L) { return lg_box(L, sizeof(ladapter), ADAPTER_T); }

/* gptoss.core.adapter_load(dir) -> Adapter | nil, message */
static int l_adapter_load(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  ladapter *b = push_adapter(L);
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

/* the Lua names of the modules, in gptoss_lora_module order */
static const char *const module_names[] = {"q", "k", "v", "o", "gate_up", "down", NULL};

/* the LoRA named by (layer, module) at arguments li, li + 1, or NULL; *m gets the module */
static gptoss_lora *arg_module(lua_State *L, gptoss_adapter *a, int li, int *m) {
  lua_Integer l = luaL_checkinteger(L, li);
  *m = luaL_checkoption(L, li + 1, NULL, module_names);
  return l < 0 || l >= GPTOSS_MAX_LAYERS ? NULL : (gptoss_lora *)gptoss_adapter_module(a, (int)l, (gptoss_lora_module)*m);
}

/* a:module(layer, "q"|"k"|"v"|"o"|"gate_up"|"down") -> { r, experts, scale, A = Floats [rk x in],
   B = Floats [out x rk], gA, gB (once trained) } | nil */
static int adapter_module(lua_State *L) {
  int m;
  gptoss_adapter *a = lg_check_adapter(L, 1);
  const gptoss_lora *x = arg_module(L, a, 2, &m);
  if (!x) { lua_pushnil(L); return 1; }
  float *gA, *gB;
  gptoss_adapter_grads(a, (int)lua_tointeger(L, 2), (gptoss_lora_module)m, &gA, &gB);
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
  gptoss_model *m = lg_check_model(L, 1);
  static const char *const keys[] = {"r", "alpha", "rslora", "targets", "layers", "init", "seed", "dropout", NULL};
  lg_check_keys(L, 2, "lora", keys);
  gptoss_lora_opts o;
  memset(&o, 0, sizeof o);
  o.r = lg_opt_int(L, 2, "r", 8);
  o.alpha = lg_opt_num(L, 2, "alpha", 2.0 * o.r);
  o.dropout = lg_opt_num(L, 2, "dropout", 0);
  o.seed = (uint64_t)lg_opt_num(L, 2, "seed", 0);
  const char *init = lg_opt_str(L, 2, "init", "peft");
  if (strcmp(init, "peft") == 0) o.init = 0;
  else if (strcmp(init, "random") == 0) o.init = 1;
  else return luaL_error(L, "lora: init must be \"peft\" or \"random\" (got '%s')", init);
  int nl = gptoss_model_config(m)->num_hidden_layers;
  unsigned char *layers = NULL;
  if (lua_istable(L, 2)) {
    lua_getfield(L, 2, "rslora");
    o.rslora = lua_toboolean(L, -1);
    lua_getfield(L, 2, "targets");
    if (lua_isnil(L, -1)) o.modules = 15;
    else {
      luaL_argcheck(L, lua_istable(L, -1), 2, "lora: targets must be a list of \"q\", \"k\", \"v\", \"o\"");
      for (int i = 1; i <= (int)lua_rawlen(L, -1); i++) {
        lua_rawgeti(L, -1, i);
        const char *t = lua_tostring(L, -1);
        const char *const *names = module_names;
        if (t && strcmp(t, "attn") == 0) { o.modules |= 15u; lua_pop(L, 1); continue; }
        if (t && strcmp(t, "experts") == 0) { o.modules |= 48u; lua_pop(L, 1); continue; }
        int k = 0;
        while (k < 6 && !(t && (strcmp(t, names[k]) == 0 ||
                                (strncmp(t, names[k], strlen(names[k])) == 0 && strcmp(t + strlen(names[k]), "_proj") == 0))))
          k++;
        if (k == 6) return luaL_error(L, "lora: unknown target '%s' (q, k, v, o, gate_up, down, attn, experts)", t ? t : "?");
        o.modules |= 1u << k;
        lua_pop(L, 1);
      }
    }
    lua_getfield(L, 2, "layers");
    if (!lua_isnil(L, -1)) {
      luaL_argcheck(L, lua_istable(L, -1), 2, "lora: layers must be a list of 0-based layer indices");
      layers = lua_newuserdatauv(L, (size_t)nl, 0);
      memset(layers, 0, (size_t)nl);
      for (int i = 1; i <= (int)lua_rawlen(L, -2); i++) {
        lua_rawgeti(L, -2, i);
        lua_Number v = lua_tonumber(L, -1);
        if (!lua_isnumber(L, -1) || v != (lua_Number)(int)v || v < 0 || v >= nl)
          return luaL_error(L, "lora: layers[%d] is not a layer index in 0..%d", i, nl - 1);
        lua_Integer l = (lua_Integer)v;
        layers[l] = 1;
        lua_pop(L, 1);
      }
    }
  } else
    o.modules = 15;
  o.layers = layers;
  ladapter *b = push_adapter(L);
  if (gptoss_adapter_new(m, &o, &b->a)) return lg_raise(L);
  return 1;
}

/* gptoss.core.lora_backward(model, adapter, ids [, mask]) -> loss sum, count */
static int l_lora_backward(lua_State *L) {
  lua_settop(L, 4);                      /* the mask stays at 4 whatever lg_ids pushes */
  gptoss_model *m = lg_check_model(L, 1);
  gptoss_adapter *a = lg_check_adapter(L, 2);
  size_t n;
  int32_t *ids = lg_ids(L, 3, &n);
  uint8_t *mask = lua_newuserdatauv(L, n ? n : 1, 0);
  if (lua_isnil(L, 4)) memset(mask, 1, n);
  else {
    luaL_checktype(L, 4, LUA_TTABLE);
    if (lua_rawlen(L, 4) != n) return luaL_error(L, "lora_backward: mask has %d entries for %d ids", (int)lua_rawlen(L, 4), (int)n);
    for (size_t i = 0; i < n; i++) {
      lua_rawgeti(L, 4, (lua_Integer)i + 1);
      mask[i] = lua_isnumber(L, -1) ? lua_tonumber(L, -1) != 0 : lua_toboolean(L, -1);
      lua_pop(L, 1);
    }
  }
  double loss = 0;
  int count = 0;
  if (gptoss_lora_backward(m, a, ids, mask, (int)n, &loss, &count)) return lg_raise(L);
  lua_pushnumber(L, loss);
  lua_pushinteger(L, count);
  return 2;
}

/* a:save_state(path) / a:load_state(path) -> true | nil, message */
static int adapter_save_state(lua_State *L) {
  if (gptoss_adapter_save_state(lg_check_adapter(L, 1), luaL_checkstring(L, 2))) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}

static int adapter_load_state(lua_State *L) {
  if (gptoss_adapter_load_state(lg_check_adapter(L, 1), luaL_checkstring(L, 2))) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* gptoss.core.lora_merge(model, adapter, out_dir [, threads]) -> out_dir | nil, message */
static int l_lora_merge(lua_State *L) {
  gptoss_model *m = lg_check_model(L, 1);
  gptoss_adapter *a = lg_check_adapter(L, 2);
  const char *out = luaL_checkstring(L, 3);
  int threads = (int)luaL_optinteger(L, 4, 0);
  if (gptoss_adapter_merge(m, a, out, threads)) return lg_fail(L);
  lua_pushvalue(L, 3);
  return 1;
}

/* a:set(layer, module, "A"|"B", row, col, value) -> a: one weight (1-based row and col) */
static int adapter_set(lua_State *L) {
  int m;
  gptoss_lora *x = arg_module(L, lg_check_adapter(L, 1), 2, &m);
  const char *w = luaL_checkstring(L, 4);
  lua_Integer i = luaL_checkinteger(L, 5), j = luaL_checkinteger(L, 6);
  float v = (float)luaL_checknumber(L, 7);
  if (!x) return luaL_error(L, "set: the adapter has no LoRA on layer %d %s", (int)lua_tointeger(L, 2), module_names[m]);
  int isA = strcmp(w, "A") == 0;
  if (!isA && strcmp(w, "B") != 0) return luaL_error(L, "set: which must be \"A\" or \"B\"");
  int rows = isA ? x->rk : x->out, cols = isA ? x->in : x->rk;
  if (i < 1 || i > rows || j < 1 || j > cols) return luaL_error(L, "set: (%d, %d) is outside %dx%d", (int)i, (int)j, rows, cols);
  (isA ? x->A : x->B)[(size_t)(i - 1) * cols + (size_t)(j - 1)] = v;
  gptoss_adapter_touch(lg_check_adapter(L, 1));
  lua_settop(L, 1);
  return 1;
}

/* a:copy_from(b) -> a: b's LoRA weights into a (same layout) */
static int adapter_copy_from(lua_State *L) {
  if (gptoss_adapter_copy_weights(lg_check_adapter(L, 1), lg_check_adapter(L, 2))) return lg_raise(L);
  lua_settop(L, 1);
  return 1;
}

static int adapter_zero_grad(lua_State *L) {
  gptoss_adapter_zero_grad(lg_check_adapter(L, 1));
  lua_settop(L, 1);
  return 1;
}

/* a:step{ lr, betas = {b1, b2}, eps, weight_decay, max_grad_norm, grad_scale } -> gradient norm */
static int adapter_step(lua_State *L) {
  gptoss_adapter *a = lg_check_adapter(L, 1);
  static const char *const keys[] = {"lr", "betas", "eps", "weight_decay", "max_grad_norm", "grad_scale", NULL};
  lg_check_keys(L, 2, "step", keys);
  gptoss_adamw o = {lg_opt_num(L, 2, "lr", 2e-4), 0.9, 0.999, lg_opt_num(L, 2, "eps", 1e-8), lg_opt_num(L, 2, "weight_decay", 0.01),
                    lg_opt_num(L, 2, "max_grad_norm", 0), lg_opt_num(L, 2, "grad_scale", 1)};
  if (lua_istable(L, 2)) {
    lua_getfield(L, 2, "betas");
    if (!lua_isnil(L, -1)) {
      luaL_argcheck(L, lua_istable(L, -1), 2, "step: betas must be { beta1, beta2 }");
      lua_rawgeti(L, -1, 1); o.beta1 = luaL_checknumber(L, -1);
      lua_rawgeti(L, -2, 2); o.beta2 = luaL_checknumber(L, -1);
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
                                   {"lora_backward", l_lora_backward}, {"lora_merge", l_lora_merge}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
