/*
** model.c: gptoss.Model, gptoss.Session and gptoss.Sampler.
**
** A model owns its sessions: closing the model closes them, so a session
** left in a Lua variable can never reach freed engine memory.
*/
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include "binding.h"

typedef struct lsession lsession;
typedef struct lmodel { gptoss_model *m; lsession *sessions; gptoss_engine *engine; } lmodel;
struct lsession { gptoss_session *s; lmodel *owner; lsession *next, *prev; };
typedef struct lsampler { gptoss_sampler *s; int vocab; } lsampler;

/* {====================================================== Model */
/* the engine model comes first: lg_check_model reads it for adapter.c */
static lmodel *checkmodel(lua_State *L, int idx) {
  lmodel *b = lg_open(L, idx, MODEL_T, "model is closed");
  if (b->engine) luaL_error(L, "model is owned by a running engine: submit requests to it (eng:submit), or eng:close() first");
  return b;
}

void lg_model_own(lua_State *L, int idx, gptoss_engine *e) {
  lmodel *b = lg_udata(L, idx, MODEL_T);
  if (e) checkmodel(L, idx);
  b->engine = e;
}

static void session_close(lsession *s) {
  if (!s->s) return;
  gptoss_session_free(s->s);
  s->s = NULL;
  if (s->prev) s->prev->next = s->next; else if (s->owner) s->owner->sessions = s->next;
  if (s->next) s->next->prev = s->prev;
  s->next = s->prev = NULL;
}

static int model_gc(lua_State *L) {
  lmodel *b = lg_udata(L, 1, MODEL_T);
  if (b->engine) gptoss_engine_stop(b->engine);   /* its thread runs the model: stop it first */
  b->engine = NULL;
  while (b->sessions) session_close(b->sessions);
  gptoss_model_free(b->m);
  b->m = NULL;
  return 0;
}

static const char *const load_keys[] = {"device", "threads", "context", "tokenizer", "memory", "precision", "batch_invariant", NULL};

/* gptoss.load's and gptoss.load_async's arguments (fn names them in errors):
   the options, and the tokenizer to load (NULL: none). Strings stay on the
   Lua stack, at or above the options */
void lg_load_args(lua_State *L, const char *fn, lg_load *a) {
  a->dir = lg_check_str(L, 1, fn, "dir", NULL);
  lg_check_keys(L, 2, fn, load_keys);
  gptoss_model_opts *o = &a->o;
  memset(o, 0, sizeof *o);
  o->device = lg_opt_str(L, 2, fn, "device", "cpu");
  o->threads = (int)lg_opt_int(L, 2, fn, "threads", 0, INT32_MAX, 0);
  o->context = (int)lg_opt_int(L, 2, fn, "context", 0, INT32_MAX, 0);
  /* bytes (0: no budget); 2^53 is past any device */
  o->memory_budget = (size_t)lg_opt_range(L, 2, fn, "memory", 0, LG_MAX_BYTES, LG_WHOLE, 0);
  static const char *const precisions[] = {"exact", "mixed", "fast", NULL};
  static const gptoss_precision precision_of[] = {GPTOSS_PRECISION_EXACT, GPTOSS_PRECISION_MIXED, GPTOSS_PRECISION_FAST};
  int prec = lg_opt_choice(L, 2, fn, "precision", precisions, 0);
  o->precision = precision_of[prec];
  a->precision = precisions[prec];   /* static: outlives the call */
  o->batch_invariant = lg_opt_bool(L, 2, fn, "batch_invariant", 0);
  int want_tok = 1;
  a->tokenizer = NULL;
  if (!lua_isnoneornil(L, 2)) {
    lua_getfield(L, 2, "tokenizer");
    if (lua_type(L, -1) == LUA_TBOOLEAN) want_tok = lua_toboolean(L, -1);
    else if (lua_type(L, -1) == LUA_TSTRING) a->tokenizer = lua_tostring(L, -1);
    else if (!lua_isnil(L, -1)) lg_arg_error(L, -1, fn, "tokenizer", "false or a path");
    /* left on the stack: a->tokenizer points into it */
  }
  if (want_tok && !a->tokenizer) {
    lua_pushfstring(L, "%s/tokenizer.json", a->dir);
    /* no tokenizer files: ids only; one that is there but is not a regular
       file is the loader's to refuse (opening it here could block) */
    struct stat st;
    if (stat(lua_tostring(L, -1), &st) == 0) a->tokenizer = lua_tostring(L, -1);
  }
}

/* pushes the Model of a loaded engine model (and its tokenizer, or NULL),
   owning both from here on */
void lg_push_model(lua_State *L, gptoss_model *m, gptoss_tokenizer *t, const lg_load *a) {
  lmodel *b = lua_newuserdatauv(L, sizeof *b, 1);
  b->m = m;
  b->sessions = NULL;
  b->engine = NULL;
  luaL_setmetatable(L, MODEL_T);
  ltokenizer *tb = NULL;
  if (t) { tb = lg_box(L, sizeof *tb, TOKENIZER_T); tb->t = t; }
  lua_newtable(L);   /* fields */
  int fields = lua_gettop(L);
  if (tb) { lua_pushvalue(L, -2); lua_setfield(L, fields, "tokenizer"); }
  lg_push_config(L, gptoss_model_config(m));
  lua_setfield(L, fields, "config");
  lua_pushstring(L, a->precision);   /* as named: the CPU computes in fp32 whichever it is */
  lua_setfield(L, fields, "precision");
  lua_pushboolean(L, a->o.batch_invariant);
  lua_setfield(L, fields, "batch_invariant");
  lua_setuservalue(L, tb ? -3 : -2);
  if (tb) lua_pop(L, 1);
}

/* gptoss.load(dir [, opts]) -> Model | nil, message */
static int l_load(lua_State *L) {
  lg_load a;
  lg_load_args(L, "gptoss.load", &a);
  gptoss_model *m;
  gptoss_tokenizer *t = NULL;
  if (gptoss_model_load(a.dir, &a.o, &m)) return lg_fail(L);
  if (a.tokenizer && gptoss_tokenizer_load(a.tokenizer, &t)) {
    lg_fail(L);   /* the message, before freeing could replace it */
    gptoss_model_free(m);
    return 2;
  }
  lg_push_model(L, m, t, &a);
  return 1;
}

static int model_fields(lua_State *L) {
  lmodel *b = lg_udata(L, 1, MODEL_T);
  const char *k = lua_tostring(L, 2);
  if (!k) return 0;
  if (strcmp(k, "closed") == 0) { lua_pushboolean(L, b->m == NULL); return 1; }
  if (!b->m) return luaL_error(L, "model is closed (reading its field '%s')", k);
  if (strcmp(k, "device") == 0) { lua_pushstring(L, gptoss_model_device(b->m)); return 1; }
  if (strcmp(k, "context") == 0) { lua_pushinteger(L, gptoss_model_context(b->m)); return 1; }
  lua_getuservalue(L, 1);
  if (!lua_istable(L, -1)) return 0;
  lua_getfield(L, -1, k);
  return 1;
}

static int model_tensors(lua_State *L) {
  lmodel *b = checkmodel(L, 1);
  lg_push_tensor_list(L, gptoss_model_weights(b->m));
  return 1;
}

/* model:mxfp4(layer, "gate_up" | "down") -> blocks, scales: the bytes of
   the MXFP4 experts the model runs, in the checkpoint's layout (a bf16
   checkpoint's as the load quantized them); for inspecting the quantizer */
static int model_mxfp4(lua_State *L) {
  const char *fn = "model:mxfp4";
  lmodel *b = checkmodel(L, 1);
  int layers = gptoss_model_config(b->m)->num_hidden_layers;
  int layer = (int)lg_check_int(L, 2, fn, "layer", 0, layers - 1);
  static const char *const which[] = {"gate_up", "down", NULL};
  int w = lg_check_choice(L, 3, fn, "which", which);
  const gptoss_tensor *blocks, *scales;
  if (gptoss_model_mxfp4(b->m, layer, w, &blocks, &scales)) return lg_fail(L);
  lua_pushlstring(L, blocks->data, blocks->nbytes);
  lua_pushlstring(L, scales->data, scales->nbytes);
  return 2;
}

static int model_memory(lua_State *L) {
  lmodel *b = checkmodel(L, 1);
  gptoss_memory mem;
  gptoss_model_memory(b->m, &mem);
  lua_createtable(L, 0, 8);
#define F(k) lua_pushnumber(L, (lua_Number)mem.k); lua_setfield(L, -2, #k)
  F(weights); F(kv); F(workspace); F(total); F(device_free); F(device_total); F(host);
#undef F
  lua_pushnumber(L, (lua_Number)mem.total);
  lua_setfield(L, -2, "device_bytes");
  return 1;
}

static lsession *push_session(lua_State *L, int model_idx, lmodel *owner, gptoss_session *s) {
  lsession *sb = lua_newuserdatauv(L, sizeof *sb, 1);
  sb->s = s;
  sb->owner = owner;
  sb->prev = NULL;
  sb->next = owner->sessions;
  if (owner->sessions) owner->sessions->prev = sb;
  owner->sessions = sb;
  luaL_setmetatable(L, SESSION_T);
  /* the session keeps its model alive; a table, since LuaJIT's userdata
     environments must be tables */
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, model_idx);
  lua_setfield(L, -2, "model");
  lua_setuservalue(L, -2);
  return sb;
}

/* the session at idx uses the adapter at aidx (nil: none); the Lua
   adapter object is kept in the session's environment for tostring/fields */
static void session_use_adapter(lua_State *L, int idx, gptoss_session *s, int aidx, const char *fn) {
  gptoss_adapter *a = lua_isnil(L, aidx) ? NULL : lg_check_adapter(L, aidx, fn, "adapter");
  if (gptoss_session_set_adapter(s, a)) lg_raise(L);
  lua_getuservalue(L, idx);
  lua_pushvalue(L, aidx);
  lua_setfield(L, -2, "adapter");
  lua_pop(L, 1);
}

/* model:session([{ context = n, rewind = n, adapter = Adapter }]) */
static int model_session(lua_State *L) {
  lmodel *b = checkmodel(L, 1);
  const char *fn = "model:session";
  static const char *const keys[] = {"context", "rewind", "adapter", NULL};
  lg_check_keys(L, 2, fn, keys);
  gptoss_session_opts o;
  o.context = (int)lg_opt_int(L, 2, fn, "context", 0, INT32_MAX, 0);
  o.rewind = (int)lg_opt_int(L, 2, fn, "rewind", 0, INT32_MAX, GPTOSS_SESSION_REWIND);
  int aidx = 0;
  if (lua_istable(L, 2)) {
    lua_getfield(L, 2, "adapter");
    aidx = lua_gettop(L);
    if (!lua_isnil(L, aidx)) lg_check_adapter(L, aidx, fn, "adapter");
  }
  gptoss_session *s;
  if (gptoss_session_new(b->m, &o, &s)) return lg_raise(L);
  push_session(L, 1, b, s);
  if (aidx && !lua_isnil(L, aidx)) session_use_adapter(L, lua_gettop(L), s, aidx, fn);
  return 1;
}

/* model:logits(ids) -> Floats [#ids x vocab], from a fresh session */
static int model_logits(lua_State *L) {
  lmodel *b = checkmodel(L, 1);
  size_t n;
  int32_t *ids = lg_ids(L, 2, "model:logits", "ids", &n);
  if (n == 0) return luaL_error(L, "model:logits: ids is empty");
  int V = gptoss_model_config(b->m)->vocab_size;
  if ((int)n > gptoss_model_context(b->m))
    return luaL_error(L, "model:logits: %d tokens exceed the model's context of %d", (int)n, gptoss_model_context(b->m));
  lfloats *f = lg_floats_new(L, (int)n, V);
  gptoss_session *s;   /* the default rewind: a prompt of a CUDA pass's length in one pass */
  if (gptoss_session_new(b->m, NULL, &s)) return lg_raise(L);
  gptoss_status rc = gptoss_session_feed(s, ids, (int)n, GPTOSS_LOGITS_ALL, f->v);
  gptoss_session_free(s);
  if (rc) return lg_raise(L);
  return 1;
}

static int model_tostring(lua_State *L) {
  lmodel *b = lg_udata(L, 1, MODEL_T);
  if (!b->m) lua_pushstring(L, "gptoss.Model (closed)");
  else {
    const gptoss_config *c = gptoss_model_config(b->m);
    lua_pushfstring(L, "gptoss.Model (%d layers, %d experts, %s)", c->num_hidden_layers, c->num_local_experts,
                    gptoss_model_device(b->m));
  }
  return 1;
}
/* }====================================================== */

/* {====================================================== Session */
static lsession *checksession(lua_State *L, int idx) {
  lsession *s = lg_udata(L, idx, SESSION_T);
  if (!s->s) luaL_error(L, "session is closed (closed directly, or its model was closed)");
  if (s->owner->engine) luaL_error(L, "the session's model is owned by a running engine: close the engine first");
  return s;
}

static int session_gc(lua_State *L) {
  lsession *s = lg_udata(L, 1, SESSION_T);
  session_close(s);
  return 0;
}

static gptoss_logits_mode want_mode(lua_State *L, int idx) {
  static const char *const names[] = {"last", "all", "none", NULL};
  static const gptoss_logits_mode modes[] = {GPTOSS_LOGITS_LAST, GPTOSS_LOGITS_ALL, GPTOSS_LOGITS_NONE};
  return lua_isnoneornil(L, idx) ? GPTOSS_LOGITS_LAST : modes[lg_check_choice(L, idx, "s:feed", "logits", names)];
}

/* s:feed(ids [, "last"|"all"|"none"]) -> Floats | nothing */
static int session_feed(lua_State *L) {
  lsession *s = checksession(L, 1);
  gptoss_logits_mode mode = want_mode(L, 3);   /* before lg_ids pushes its copy above argument 3 */
  size_t n;
  int32_t *ids = lg_ids(L, 2, "s:feed", "ids", &n);
  int V = gptoss_model_config(s->owner->m)->vocab_size;
  float *out = NULL;
  if (mode != GPTOSS_LOGITS_NONE && n > 0) {
    lfloats *f = lg_floats_new(L, mode == GPTOSS_LOGITS_ALL ? (int)n : 1, V);
    out = f->v;
  }
  if (gptoss_session_feed(s->s, ids, (int)n, mode, out)) return lg_raise(L);
  return out ? 1 : 0;
}

static lsampler *checksampler(lua_State *L, int idx) {
  lsampler *p = lg_udata(L, idx, SAMPLER_T);
  if (!p->s) luaL_error(L, "sampler is closed");
  return p;
}

/* the open sampler given as argument `name` of fn */
static lsampler *argsampler(lua_State *L, int idx, const char *fn, const char *name) {
  lg_check_udata(L, idx, fn, name, SAMPLER_T);
  return checksampler(L, idx);
}

static int session_sample(lua_State *L) {
  lsession *s = checksession(L, 1);
  lsampler *p = argsampler(L, 2, "s:sample", "sampler");
  int32_t id;
  if (gptoss_session_sample(s->s, p->s, &id)) return lg_raise(L);
  lua_pushinteger(L, id);
  return 1;
}

/* s:step(id, sampler) -> next id: feed one token, sample the next */
static int session_step(lua_State *L) {
  lsession *s = checksession(L, 1);
  lua_Integer id = lg_check_int(L, 2, "s:step", "id", INT32_MIN, INT32_MAX);
  lsampler *p = argsampler(L, 3, "s:step", "sampler");
  int32_t in = (int32_t)id, next;
  if (gptoss_batch_step(&s->s, 1, &in, &p->s, &next)) return lg_raise(L);
  lua_pushinteger(L, next);
  return 1;
}

/* s:logits() -> Floats [1 x vocab]: the last position's logits */
static int session_logits(lua_State *L) {
  lsession *s = checksession(L, 1);
  lfloats *f = lg_floats_new(L, 1, gptoss_model_config(s->owner->m)->vocab_size);
  if (gptoss_session_logits(s->s, f->v)) return lg_raise(L);
  return 1;
}

static int session_pos(lua_State *L) {
  lua_pushinteger(L, gptoss_session_pos(checksession(L, 1)->s));
  return 1;
}

static int session_context(lua_State *L) {
  lua_pushinteger(L, gptoss_session_context(checksession(L, 1)->s));
  return 1;
}

static int session_history(lua_State *L) {
  lsession *s = checksession(L, 1);
  lg_push_ids(L, gptoss_session_history(s->s), (size_t)gptoss_session_pos(s->s));
  return 1;
}

/* s:fork([{ context = n, rewind = n, keep = n }]): a copy of the session,
   or of its first `keep` positions, in a session of another capacity */
static int session_fork(lua_State *L) {
  lsession *s = checksession(L, 1);
  const char *fn = "s:fork";
  static const char *const keys[] = {"context", "rewind", "keep", NULL};
  lg_check_keys(L, 2, fn, keys);
  gptoss_session *c;
  int pos = gptoss_session_pos(s->s);
  if (lua_istable(L, 2)) {
    gptoss_session_opts o;
    o.context = (int)lg_opt_int(L, 2, fn, "context", 0, INT32_MAX, 0);
    o.rewind = (int)lg_opt_int(L, 2, fn, "rewind", 0, INT32_MAX, 0);
    int keep = (int)lg_opt_int(L, 2, fn, "keep", 0, pos, pos);
    lua_getfield(L, 2, "context");
    lua_getfield(L, 2, "rewind");
    int same = lua_isnil(L, -1) && lua_isnil(L, -2);   /* only keep: the session's own capacity and ring */
    lua_pop(L, 2);
    if (gptoss_session_fork_at(s->s, same ? NULL : &o, keep, &c)) return lg_raise(L);
  } else if (gptoss_session_fork(s->s, &c)) return lg_raise(L);
  lua_getuservalue(L, 1);
  int env = lua_gettop(L);
  lua_getfield(L, env, "model");
  push_session(L, lua_gettop(L), s->owner, c);
  lua_getuservalue(L, -1);
  lua_getfield(L, env, "adapter");
  lua_setfield(L, -2, "adapter");      /* the fork uses the same adapter (gptoss_session_fork shares it) */
  lua_pop(L, 1);
  return 1;
}

/* s:set_adapter(Adapter | nil) -> s */
static int session_set_adapter(lua_State *L) {
  lsession *s = checksession(L, 1);
  if (lua_isnoneornil(L, 2)) { lua_settop(L, 1); lua_pushnil(L); }
  else if (!luaL_testudata(L, 2, ADAPTER_T)) lg_arg_error(L, 2, "s:set_adapter", "adapter", "a gptoss.Adapter or nil");
  session_use_adapter(L, 1, s->s, 2, "s:set_adapter");
  lua_settop(L, 1);
  return 1;
}

static int session_rewind(lua_State *L) {
  lsession *s = checksession(L, 1);
  lua_Integer p = lg_check_int(L, 2, "s:rewind", "pos", 0, INT32_MAX);
  if (gptoss_session_rewind(s->s, (int)p)) return lg_raise(L);
  lua_settop(L, 1);
  return 1;
}

static int session_trace(lua_State *L) {
  lsession *s = checksession(L, 1);
  gptoss_session_trace(s->s, lua_isnone(L, 2) ? 1 : !lua_isnil(L, 2) && lg_check_bool(L, 2, "s:trace", "on"));
  lua_settop(L, 1);
  return 1;
}

/* s:trace_get() -> { {layer1 = {experts={...}, weights={...}}, ...} per token } */
static int session_trace_get(lua_State *L) {
  lsession *s = checksession(L, 1);
  int n;
  gptoss_session_trace_get(s->s, NULL, NULL, &n);
  const gptoss_config *c = gptoss_model_config(s->owner->m);
  int Lyr = c->num_hidden_layers, K = c->num_experts_per_tok;
  size_t cnt = (size_t)n * (size_t)Lyr * (size_t)K;
  int32_t *e = lua_newuserdatauv(L, sizeof(int32_t) * (cnt ? cnt : 1), 0);
  float *w = lua_newuserdatauv(L, sizeof(float) * (cnt ? cnt : 1), 0);
  gptoss_session_trace_get(s->s, e, w, &n);
  lua_createtable(L, n, 0);
  for (int t = 0; t < n; t++) {
    lua_createtable(L, Lyr, 0);
    for (int l = 0; l < Lyr; l++) {
      lua_createtable(L, 0, 2);
      lua_createtable(L, K, 0);
      lua_createtable(L, K, 0);
      for (int k = 0; k < K; k++) {
        size_t at = ((size_t)t * Lyr + (size_t)l) * K + (size_t)k;
        lua_pushinteger(L, e[at]);
        lua_rawseti(L, -3, k + 1);
        lua_pushnumber(L, w[at]);
        lua_rawseti(L, -2, k + 1);
      }
      lua_setfield(L, -3, "weights");
      lua_setfield(L, -2, "experts");
      lua_rawseti(L, -2, l + 1);
    }
    lua_rawseti(L, -2, t + 1);
  }
  return 1;
}

static int session_tostring(lua_State *L) {
  lsession *s = lg_udata(L, 1, SESSION_T);
  if (!s->s) lua_pushstring(L, "gptoss.Session (closed)");
  else lua_pushfstring(L, "gptoss.Session (%d of %d tokens)", gptoss_session_pos(s->s), gptoss_session_context(s->s));
  return 1;
}

static int session_fields(lua_State *L) {
  lsession *s = lg_udata(L, 1, SESSION_T);
  const char *k = lua_tostring(L, 2);
  if (k && strcmp(k, "closed") == 0) { lua_pushboolean(L, s->s == NULL); return 1; }
  if (k && (strcmp(k, "model") == 0 || strcmp(k, "adapter") == 0)) { lua_getuservalue(L, 1); lua_getfield(L, -1, k); return 1; }
  return 0;
}
/* }====================================================== */

/* {====================================================== Sampler */
static const char *const sampler_keys[] = {
  "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
  "frequency_penalty", "penalty_window", "seed", "logit_bias", NULL};

/* gptoss.sampler(vocab, opts [, fn]) -> Sampler; bad options raise, named
   as fn's (gptoss's own functions pass theirs: model:generate, ...) */
static int l_sampler(lua_State *L) {
  const char *fn = lua_isnoneornil(L, 3) ? "gptoss.sampler" : lg_check_str(L, 3, "gptoss.sampler", "fn", NULL);
  lua_Integer vocab = lg_check_int(L, 1, fn, "vocab", 1, INT32_MAX);
  lg_check_keys(L, 2, fn, sampler_keys);
  gptoss_sampling s;
  gptoss_sampling_default(&s);
  /* the ranges gptoss_sampling_check holds them to, checked here to name fn */
  s.temperature = (float)lg_opt_range(L, 2, fn, "temperature", 0, HUGE_VAL, 0, s.temperature);
  s.top_k = (int)lg_opt_int(L, 2, fn, "top_k", 0, INT32_MAX, 0);
  s.top_p = (float)lg_opt_range(L, 2, fn, "top_p", 0, 1, LG_GT, 1.0);
  s.min_p = (float)lg_opt_range(L, 2, fn, "min_p", 0, 1, 0, 0);
  s.repetition_penalty = (float)lg_opt_range(L, 2, fn, "repetition_penalty", 0, HUGE_VAL, LG_GT, 1.0);
  s.presence_penalty = (float)lg_opt_range(L, 2, fn, "presence_penalty", -HUGE_VAL, HUGE_VAL, 0, 0);
  s.frequency_penalty = (float)lg_opt_range(L, 2, fn, "frequency_penalty", -HUGE_VAL, HUGE_VAL, 0, 0);
  s.penalty_window = (int)lg_opt_int(L, 2, fn, "penalty_window", 0, INT32_MAX, s.penalty_window);
  /* 2^53: the largest seed LuaJIT's numbers hold exactly, so one range on both VMs */
  s.seed = (uint64_t)lg_opt_int(L, 2, fn, "seed", 0, (lua_Integer)1 << 53, 0);
  if (!lua_isnoneornil(L, 2)) {
    lua_getfield(L, 2, "logit_bias");
    int bias = lua_gettop(L);
    if (!lua_isnil(L, bias)) {
      lg_check_table(L, bias, fn, "logit_bias", "a table of token id = bias");
      int n = 0;
      lua_pushnil(L);
      while (lua_next(L, bias)) { n++; lua_pop(L, 1); }
      int32_t *ids = lua_newuserdatauv(L, sizeof(int32_t) * (size_t)(n ? n : 1), 0);
      float *vals = lua_newuserdatauv(L, sizeof(float) * (size_t)(n ? n : 1), 0);
      int i = 0;
      lua_pushnil(L);
      while (lua_next(L, bias)) {
        ids[i] = (int32_t)lg_check_int(L, -2, fn, "logit_bias key", 0, vocab - 1);
        lua_pushfstring(L, "logit_bias[%d]", (int)ids[i]);
        /* +-inf force or forbid a token; NaN has no meaning */
        vals[i] = (float)lg_check_range(L, -2, fn, lua_tostring(L, -1), -HUGE_VAL, HUGE_VAL, LG_INF);
        i++;
        lua_pop(L, 2);
      }
      s.n_bias = n;
      s.bias_ids = ids;
      s.bias_values = vals;
    }
  }
  lsampler *p = lua_newuserdatauv(L, sizeof *p, 0);
  p->s = NULL;
  p->vocab = (int)vocab;
  luaL_setmetatable(L, SAMPLER_T);
  if (gptoss_sampler_new(&s, (int)vocab, &p->s)) return lg_raise(L);
  return 1;
}

static int sampler_gc(lua_State *L) {
  lsampler *p = lg_udata(L, 1, SAMPLER_T);
  gptoss_sampler_free(p->s);
  p->s = NULL;
  return 0;
}

/* sampler:sample(floats [, row [, history]]) -> id: sampling on given logits */
static int sampler_sample(lua_State *L) {
  const char *fn = "sampler:sample";
  lsampler *p = checksampler(L, 1);
  lfloats *f = lg_check_udata(L, 2, fn, "logits", FLOATS_T);
  lua_Integer row = lua_isnoneornil(L, 3) ? 1 : lg_check_int(L, 3, fn, "row", 1, f->rows);
  if (f->cols != p->vocab) return luaL_error(L, "%s: the sampler is for %d logits, the Floats has %d columns", fn, p->vocab, f->cols);
  size_t nh = 0;
  int32_t *hist = lua_isnoneornil(L, 4) ? NULL : lg_ids(L, 4, fn, "history", &nh);
  float *scratch = lua_newuserdatauv(L, sizeof(float) * (size_t)f->cols, 0);
  memcpy(scratch, f->v + (size_t)(row - 1) * f->cols, sizeof(float) * (size_t)f->cols);
  lua_pushinteger(L, gptoss_sampler_sample(p->s, scratch, hist, nh));
  return 1;
}

/* sampler:constrain(matcher): every later sample obeys the matcher's grammar
   (the matcher is taken over) */
static int sampler_constrain(lua_State *L) {
  lsampler *p = checksampler(L, 1);
  gptoss_sampler_constrain(p->s, lg_take_matcher(L, 2));
  lua_settop(L, 1);
  return 1;
}

/* sampler:arm{ headers, grammar, vocab, end_ids, channel, recipient }: a
   grammar for the body of the harmony messages whose header names that
   channel or recipient (grammar.c's binding checks the fields) */
static int sampler_arm(lua_State *L) {
  lsampler *p = checksampler(L, 1);
  lg_sampler_arm(L, p->s, 2);
  lua_settop(L, 1);
  return 1;
}

/* sampler:armed() -> the arm part-way through a message (1-based), or nil */
static int sampler_armed(lua_State *L) {
  int a = gptoss_sampler_armed(checksampler(L, 1)->s);
  if (a < 0) lua_pushnil(L);
  else lua_pushinteger(L, a + 1);
  return 1;
}

gptoss_sampler *lg_take_sampler(lua_State *L, int idx) {
  lsampler *p = checksampler(L, idx);
  gptoss_sampler *s = p->s;
  p->s = NULL;
  return s;
}
/* }====================================================== */

/* gptoss.batch_step(sessions, ids, samplers) -> next ids */
static int l_batch_step(lua_State *L) {
  const char *fn = "gptoss.batch_step";
  lg_check_table(L, 1, fn, "sessions", "a list of gptoss.Session");
  size_t n;
  int32_t *ids = lg_ids(L, 2, fn, "ids", &n);
  lg_check_table(L, 3, fn, "samplers", "a list of gptoss.Sampler");
  if (lua_rawlen(L, 1) != n || lua_rawlen(L, 3) != n)
    return luaL_error(L, "%s: sessions, ids and samplers must have the same length (%d, %d and %d)", fn,
                      (int)lua_rawlen(L, 1), (int)n, (int)lua_rawlen(L, 3));
  if (n == 0) return luaL_error(L, "%s: empty batch", fn);
  gptoss_session **ss = lua_newuserdatauv(L, sizeof *ss * n, 0);
  gptoss_sampler **sp = lua_newuserdatauv(L, sizeof *sp * n, 0);
  int32_t *next = lua_newuserdatauv(L, sizeof(int32_t) * n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (lua_Integer)(i + 1));
    lua_pushfstring(L, "sessions[%d]", (int)(i + 1));
    lg_check_udata(L, -2, fn, lua_tostring(L, -1), SESSION_T);
    ss[i] = checksession(L, -2)->s;
    lua_pop(L, 2);
    lua_rawgeti(L, 3, (lua_Integer)(i + 1));
    lua_pushfstring(L, "samplers[%d]", (int)(i + 1));
    sp[i] = argsampler(L, -2, fn, lua_tostring(L, -1))->s;
    lua_pop(L, 2);
  }
  if (gptoss_batch_step(ss, (int)n, ids, sp, next)) return lg_raise(L);
  lg_push_ids(L, next, n);
  return 1;
}

void lg_open_model(lua_State *L) {
  static const luaL_Reg m_methods[] = {
    {"close", model_gc}, {"tensors", model_tensors}, {"memory", model_memory}, {"mxfp4", model_mxfp4},
    {"session", model_session}, {"logits", model_logits}, {NULL, NULL}};
  static const luaL_Reg m_meta[] = {
    {"__gc", model_gc}, {"__tostring", model_tostring},
#if LUA_VERSION_NUM >= 504
    {"__close", model_gc},
#endif
    {NULL, NULL}};
  lg_class(L, MODEL_T, m_methods, m_meta, model_fields);
  static const luaL_Reg s_methods[] = {
    {"feed", session_feed}, {"sample", session_sample}, {"logits", session_logits}, {"step", session_step}, {"pos", session_pos},
    {"context", session_context}, {"history", session_history}, {"fork", session_fork},
    {"rewind", session_rewind}, {"set_adapter", session_set_adapter}, {"trace", session_trace}, {"trace_get", session_trace_get},
    {"close", session_gc}, {NULL, NULL}};
  static const luaL_Reg s_meta[] = {
    {"__gc", session_gc}, {"__tostring", session_tostring},
#if LUA_VERSION_NUM >= 504
    {"__close", session_gc},
#endif
    {NULL, NULL}};
  lg_class(L, SESSION_T, s_methods, s_meta, session_fields);
  static const luaL_Reg p_methods[] = {{"sample", sampler_sample}, {"constrain", sampler_constrain}, {"arm", sampler_arm},
    {"armed", sampler_armed}, {"close", sampler_gc}, {NULL, NULL}};
  static const luaL_Reg p_meta[] = {
    {"__gc", sampler_gc},
#if LUA_VERSION_NUM >= 504
    {"__close", sampler_gc},
#endif
    {NULL, NULL}};
  lg_class(L, SAMPLER_T, p_methods, p_meta, NULL);
  static const luaL_Reg funcs[] = {{"load", l_load}, {"sampler", l_sampler}, {"batch_step", l_batch_step}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
