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
  lg_check_keys(L, 2, "load", load_keys);
  gptoss_model_opts *o = &a->o;
  memset(o, 0, sizeof *o);
  o->device = lg_opt_str(L, 2, "device", "cpu");
  o->threads = lg_opt_int(L, 2, "threads", 0);
  o->context = lg_opt_int(L, 2, "context", 0);
  double memory = lg_opt_num(L, 2, "memory", 0);
  /* bytes: a whole number, finite, >= 0 (0: no budget); 2^53 is past any device */
  if (!(memory >= 0 && memory <= 9007199254740992.0 && memory == floor(memory))) {
    lua_getfield(L, 2, "memory");
    luaL_error(L, "load: memory must be a whole number of bytes >= 0 (got %s)", lcompat_quote(L, -1));
  }
  o->memory_budget = (size_t)memory;
  a->precision = lg_opt_str(L, 2, "precision", "exact");
  if (strcmp(a->precision, "exact") == 0) o->precision = GPTOSS_PRECISION_EXACT;
  else if (strcmp(a->precision, "fast") == 0) o->precision = GPTOSS_PRECISION_FAST;
  else if (strcmp(a->precision, "mixed") == 0) o->precision = GPTOSS_PRECISION_MIXED;
  else luaL_error(L, "load: precision must be \"exact\", \"mixed\" or \"fast\" (got '%s')", a->precision);
  o->batch_invariant = lg_opt_bool(L, 2, "batch_invariant", 0);
  if (o->threads < 0) luaL_error(L, "load: threads must be >= 0");
  if (o->context < 0) luaL_error(L, "load: context must be >= 0");
  int want_tok = 1;
  a->tokenizer = NULL;
  if (!lua_isnoneornil(L, 2)) {
    lua_getfield(L, 2, "tokenizer");
    if (lua_type(L, -1) == LUA_TBOOLEAN) want_tok = lua_toboolean(L, -1);
    else if (lua_type(L, -1) == LUA_TSTRING) a->tokenizer = lua_tostring(L, -1);
    else if (!lua_isnil(L, -1)) luaL_error(L, "load: tokenizer must be false or a path");
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

static int model_memory(lua_State *L) {
  lmodel *b = checkmodel(L, 1);
  gptoss_memory mem;
  gptoss_model_memory(b->m, &mem);
  lua_createtable(L, 0, 6);
#define F(k) lua_pushnumber(L, (lua_Number)mem.k); lua_setfield(L, -2, #k)
  F(weights); F(kv); F(workspace); F(total); F(device_free); F(device_total);
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
static void session_use_adapter(lua_State *L, int idx, gptoss_session *s, int aidx) {
  gptoss_adapter *a = lua_isnil(L, aidx) ? NULL : lg_check_adapter(L, aidx);
  if (gptoss_session_set_adapter(s, a)) lg_raise(L);
  lua_getuservalue(L, idx);
  lua_pushvalue(L, aidx);
  lua_setfield(L, -2, "adapter");
  lua_pop(L, 1);
}

/* model:session([{ context = n, rewind = n, adapter = Adapter }]) */
static int model_session(lua_State *L) {
  lmodel *b = checkmodel(L, 1);
  static const char *const keys[] = {"context", "rewind", "adapter", NULL};
  lg_check_keys(L, 2, "session", keys);
  gptoss_session_opts o;
  o.context = lg_opt_int(L, 2, "context", 0);
  o.rewind = lg_opt_int(L, 2, "rewind", 512);
  int aidx = 0;
  if (lua_istable(L, 2)) {
    lua_getfield(L, 2, "adapter");
    aidx = lua_gettop(L);
    if (!lua_isnil(L, aidx)) lg_check_adapter(L, aidx);
  }
  gptoss_session *s;
  if (gptoss_session_new(b->m, &o, &s)) return lg_raise(L);
  push_session(L, 1, b, s);
  if (aidx && !lua_isnil(L, aidx)) session_use_adapter(L, lua_gettop(L), s, aidx);
  return 1;
}

/* model:logits(ids) -> Floats [#ids x vocab], from a fresh session */
static int model_logits(lua_State *L) {
  lmodel *b = checkmodel(L, 1);
  size_t n;
  int32_t *ids = lg_ids(L, 2, &n);
  if (n == 0) return luaL_error(L, "logits: empty input");
  int V = gptoss_model_config(b->m)->vocab_size;
  if ((int)n > gptoss_model_context(b->m))
    return luaL_error(L, "logits: %d tokens exceed the model's context of %d", (int)n, gptoss_model_context(b->m));
  lfloats *f = lg_floats_new(L, (int)n, V);
  gptoss_session_opts o = {0, 512};
  gptoss_session *s;
  if (gptoss_session_new(b->m, &o, &s)) return lg_raise(L);
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
  const char *w = luaL_optstring(L, idx, "last");
  if (strcmp(w, "last") == 0) return GPTOSS_LOGITS_LAST;
  if (strcmp(w, "all") == 0) return GPTOSS_LOGITS_ALL;
  if (strcmp(w, "none") == 0) return GPTOSS_LOGITS_NONE;
  luaL_error(L, "feed: logits must be \"last\", \"all\" or \"none\" (got '%s')", w);
  return GPTOSS_LOGITS_NONE;
}

/* s:feed(ids [, "last"|"all"|"none"]) -> Floats | nothing */
static int session_feed(lua_State *L) {
  lsession *s = checksession(L, 1);
  gptoss_logits_mode mode = want_mode(L, 3);   /* before lg_ids pushes its copy above argument 3 */
  size_t n;
  int32_t *ids = lg_ids(L, 2, &n);
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

static int session_sample(lua_State *L) {
  lsession *s = checksession(L, 1);
  lsampler *p = checksampler(L, 2);
  int32_t id;
  if (gptoss_session_sample(s->s, p->s, &id)) return lg_raise(L);
  lua_pushinteger(L, id);
  return 1;
}

/* s:step(id, sampler) -> next id: feed one token, sample the next */
static int session_step(lua_State *L) {
  lsession *s = checksession(L, 1);
  lua_Integer id = lg_check_int(L, 2, "s:step", "id", INT32_MIN, INT32_MAX);
  lsampler *p = checksampler(L, 3);
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

static int session_fork(lua_State *L) {
  lsession *s = checksession(L, 1);
  gptoss_session *c;
  if (gptoss_session_fork(s->s, &c)) return lg_raise(L);
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
  session_use_adapter(L, 1, s->s, 2);
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
  gptoss_session_trace(s->s, lua_isnone(L, 2) ? 1 : lua_toboolean(L, 2));
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

/* gptoss.sampler(vocab, opts) -> Sampler; bad options raise */
static int l_sampler(lua_State *L) {
  lua_Integer vocab = luaL_checkinteger(L, 1);
  luaL_argcheck(L, vocab > 0 && vocab <= INT32_MAX, 1, "vocabulary size must be positive");
  lg_check_keys(L, 2, "sampler", sampler_keys);
  gptoss_sampling s;
  gptoss_sampling_default(&s);
  s.temperature = (float)lg_opt_num(L, 2, "temperature", s.temperature);
  s.top_k = lg_opt_int(L, 2, "top_k", 0);
  s.top_p = (float)lg_opt_num(L, 2, "top_p", 1.0);
  s.min_p = (float)lg_opt_num(L, 2, "min_p", 0);
  s.repetition_penalty = (float)lg_opt_num(L, 2, "repetition_penalty", 1.0);
  s.presence_penalty = (float)lg_opt_num(L, 2, "presence_penalty", 0);
  s.frequency_penalty = (float)lg_opt_num(L, 2, "frequency_penalty", 0);
  s.penalty_window = lg_opt_int(L, 2, "penalty_window", s.penalty_window);
  double seed = lg_opt_num(L, 2, "seed", 0);
  if (seed < 0 || seed != (double)(uint64_t)seed) luaL_error(L, "sampler: seed must be a non-negative integer");
  s.seed = (uint64_t)seed;
  int32_t *ids = NULL;
  float *vals = NULL;
  if (!lua_isnoneornil(L, 2)) {
    lua_getfield(L, 2, "logit_bias");
    if (lua_istable(L, -1)) {
      int n = 0;
      lua_pushnil(L);
      while (lua_next(L, -2)) { n++; lua_pop(L, 1); }
      ids = lua_newuserdatauv(L, sizeof(int32_t) * (size_t)(n ? n : 1), 0);
      vals = lua_newuserdatauv(L, sizeof(float) * (size_t)(n ? n : 1), 0);
      int i = 0;
      lua_pushnil(L);
      while (lua_next(L, -4)) {
        lua_Integer id = 0;
        if (!lcompat_tointeger(L, -2, &id) || lua_type(L, -1) != LUA_TNUMBER)
          luaL_error(L, "sampler: logit_bias maps integer token ids to numbers");
        if (id < 0 || id >= vocab)
          luaL_error(L, "logit_bias id %s is outside the vocabulary (0..%d)", lcompat_quote(L, -2), (int)vocab - 1);
        ids[i] = (int32_t)id;
        vals[i] = (float)lua_tonumber(L, -1);
        i++;
        lua_pop(L, 1);
      }
      s.n_bias = n;
      s.bias_ids = ids;
      s.bias_values = vals;
    } else if (!lua_isnil(L, -1)) {
      luaL_error(L, "sampler: logit_bias must be a table");
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
  lsampler *p = checksampler(L, 1);
  lfloats *f = lg_udata(L, 2, FLOATS_T);
  lua_Integer row = luaL_optinteger(L, 3, 1);
  luaL_argcheck(L, row >= 1 && row <= f->rows, 3, "row out of range");
  if (f->cols != p->vocab) return luaL_error(L, "sampler is for %d logits, got %d", p->vocab, f->cols);
  size_t nh = 0;
  int32_t *hist = lua_isnoneornil(L, 4) ? NULL : lg_ids(L, 4, &nh);
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

gptoss_sampler *lg_take_sampler(lua_State *L, int idx) {
  lsampler *p = checksampler(L, idx);
  gptoss_sampler *s = p->s;
  p->s = NULL;
  return s;
}
/* }====================================================== */

/* gptoss.batch_step(sessions, ids, samplers) -> next ids */
static int l_batch_step(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t n;
  int32_t *ids = lg_ids(L, 2, &n);
  luaL_checktype(L, 3, LUA_TTABLE);
  if (lua_rawlen(L, 1) != n || lua_rawlen(L, 3) != n)
    return luaL_error(L, "batch_step: sessions, ids and samplers must have the same length");
  if (n == 0) return luaL_error(L, "batch_step: empty batch");
  gptoss_session **ss = lua_newuserdatauv(L, sizeof *ss * n, 0);
  gptoss_sampler **sp = lua_newuserdatauv(L, sizeof *sp * n, 0);
  int32_t *next = lua_newuserdatauv(L, sizeof(int32_t) * n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (lua_Integer)(i + 1));
    ss[i] = checksession(L, lua_gettop(L))->s;
    lua_pop(L, 1);
    lua_rawgeti(L, 3, (lua_Integer)(i + 1));
    sp[i] = checksampler(L, lua_gettop(L))->s;
    lua_pop(L, 1);
  }
  if (gptoss_batch_step(ss, (int)n, ids, sp, next)) return lg_raise(L);
  lg_push_ids(L, next, n);
  return 1;
}

void lg_open_model(lua_State *L) {
  static const luaL_Reg m_methods[] = {
    {"close", model_gc}, {"tensors", model_tensors}, {"memory", model_memory},
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
  static const luaL_Reg p_methods[] = {{"sample", sampler_sample}, {"constrain", sampler_constrain}, {"close", sampler_gc}, {NULL, NULL}};
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
