/*
** grammar.c (binding): grammars, vocabulary tries and matchers for Lua.
**
**   gptoss.grammar(text [, root]) -> Grammar      (bad GBNF raises, naming line:col and rule)
**   gptoss.vocab(tokenizer, vocab_size) -> Vocab  (build once per tokenizer: gptoss.constraint caches it)
**   gptoss.matcher(grammar, vocab [, end_ids]) -> Matcher
**   m:mask() -> allowed count, seconds   m:allows(id)   m:allowed() -> ids
**   m:accept(id) -> true | nil, msg      m:accept_bytes(s) -> true | nil, msg
**   m:would_accept(s) -> whether bytes s may come next (nothing accepted)
**   m:accepting()  m:ended()  m:close()
**   sampler:constrain(matcher)           (model.c: the matcher is taken over)
**   gptoss.headers(tokenizer, vocab_size) -> Headers   (harmony headers, for arms; gptoss.constraint caches it)
**   h:read(ids [, role]) -> { channel, recipient } | nil   (as harmony's parser reads a header)
**   sampler:arm{ headers, grammar, vocab, end_ids, channel, recipient }   sampler:armed() -> index | nil
*/
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "binding.h"

#define GRAMMAR_T "gptoss.Grammar"
#define VOCAB_T "gptoss.Vocab"
#define MATCHER_T "gptoss.Matcher"
#define HEADERS_T "gptoss.Headers"

typedef struct lgrammar { gptoss_grammar *g; } lgrammar;
typedef struct lvocab { gptoss_vocab *v; } lvocab;
typedef struct lmatcher { gptoss_matcher *m; uint32_t *bits; int V; } lmatcher;
typedef struct lheaders { gptoss_headers *h; } lheaders;

static int l_grammar(lua_State *L) {
  size_t len;
  const char *text = lg_check_str(L, 1, "gptoss.core.grammar", "text", &len);
  const char *root = lua_isnoneornil(L, 2) ? "root" : lg_check_str(L, 2, "gptoss.core.grammar", "root", NULL);
  lgrammar *b = lg_box(L, sizeof *b, GRAMMAR_T);
  if (gptoss_grammar_parse(text, len, root, &b->g)) return lg_raise(L);
  return 1;
}

static int grammar_gc(lua_State *L) {
  lgrammar *b = lg_udata(L, 1, GRAMMAR_T);
  gptoss_grammar_free(b->g);
  b->g = NULL;
  return 0;
}

static int l_vocab(lua_State *L) {
  ltokenizer *t = lg_open(L, 1, TOKENIZER_T, "vocab: the tokenizer is closed");
  int V = (int)lg_check_int(L, 2, "gptoss.core.vocab", "vocab_size", 1, 1 << 30);
  lvocab *b = lg_box(L, sizeof *b, VOCAB_T);
  if (gptoss_vocab_new(t->t, V, &b->v)) return lg_raise(L);
  return 1;
}

static int vocab_gc(lua_State *L) {
  lvocab *b = lg_udata(L, 1, VOCAB_T);
  gptoss_vocab_free(b->v);
  b->v = NULL;
  return 0;
}

static int l_matcher(lua_State *L) {
  lgrammar *g = lg_open(L, 1, GRAMMAR_T, "matcher: the grammar is closed");
  lvocab *v = lg_open(L, 2, VOCAB_T, "matcher: the vocabulary is closed");
  size_t n = 0;
  int32_t *ends = lua_isnoneornil(L, 3) ? NULL : lg_ids(L, 3, "gptoss.core.matcher", "end_ids", &n);
  lmatcher *b = lg_box(L, sizeof *b, MATCHER_T);
  b->V = gptoss_vocab_size(v->v);
  if (!(b->bits = malloc(sizeof(uint32_t) * (size_t)((b->V + 31) / 32)))) return luaL_error(L, "matcher: out of memory");
  if (gptoss_matcher_new(g->g, v->v, ends, (int)n, &b->m)) return lg_raise(L);
  return 1;
}

static lmatcher *checkm(lua_State *L) {
  lmatcher *b = lg_open(L, 1, MATCHER_T, "matcher is closed (a sampler took it over, or it was closed)");
  return b;
}

static int matcher_gc(lua_State *L) {
  lmatcher *b = lg_udata(L, 1, MATCHER_T);
  gptoss_matcher_free(b->m);
  b->m = NULL;
  free(b->bits);
  b->bits = NULL;
  return 0;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* m:mask() -> how many tokens are allowed, and the seconds the mask took */
static int matcher_mask(lua_State *L) {
  lmatcher *b = checkm(L);
  double t0 = now_s();
  if (gptoss_matcher_mask(b->m, b->bits)) return lg_raise(L);
  double dt = now_s() - t0;
  lua_Integer n = 0;
  for (int w = 0; w < (b->V + 31) / 32; w++) {   /* (no popcnt instruction assumed: GCC's call is slower) */
    uint32_t x = b->bits[w] - ((b->bits[w] >> 1) & 0x55555555u);
    x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
    n += (((x + (x >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24;
  }
  lua_pushinteger(L, n);
  lua_pushnumber(L, dt);
  return 2;
}

/* m:allows(id): by the last m:mask() */
static int matcher_allows(lua_State *L) {
  lmatcher *b = checkm(L);
  lua_Integer id = lg_check_int(L, 2, "m:allows", "id", INT32_MIN, INT32_MAX);
  lua_pushboolean(L, id >= 0 && id < b->V && ((b->bits[id >> 5] >> (id & 31)) & 1));
  return 1;
}

/* m:allowed() -> the ids the last m:mask() allowed, ascending */
static int matcher_allowed(lua_State *L) {
  lmatcher *b = checkm(L);
  lua_newtable(L);
  lua_Integer k = 0;
  for (int id = 0; id < b->V; id++)
    if ((b->bits[id >> 5] >> (id & 31)) & 1) { lua_pushinteger(L, id); lua_rawseti(L, -2, ++k); }
  return 1;
}

static int matcher_accept(lua_State *L) {
  lmatcher *b = checkm(L);
  lua_Integer id = lg_check_int(L, 2, "m:accept", "id", INT32_MIN, INT32_MAX);
  if (gptoss_matcher_accept(b->m, (int32_t)id)) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}

static int matcher_accept_bytes(lua_State *L) {
  lmatcher *b = checkm(L);
  size_t n;
  const char *s = lg_check_str(L, 2, "m:accept_bytes", "bytes", &n);
  if (gptoss_matcher_accept_bytes(b->m, s, n)) return lg_fail(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* m:would_accept(bytes) -> true | false (| nil, msg when the grammar is too ambiguous) */
static int matcher_would_accept(lua_State *L) {
  lmatcher *b = checkm(L);
  size_t n;
  const char *s = lg_check_str(L, 2, "m:would_accept", "bytes", &n);
  int ok;
  if (gptoss_matcher_would_accept(b->m, s, n, &ok)) return lg_fail(L);
  lua_pushboolean(L, ok);
  return 1;
}

static int matcher_accepting(lua_State *L) { lua_pushboolean(L, gptoss_matcher_accepting(checkm(L)->m)); return 1; }
static int matcher_ended(lua_State *L) { lua_pushboolean(L, gptoss_matcher_ended(checkm(L)->m)); return 1; }

gptoss_matcher *lg_take_matcher(lua_State *L, int idx) {
  lmatcher *b = lg_open(L, idx, MATCHER_T, "the matcher is closed (a sampler took it over, or it was closed)");
  gptoss_matcher *m = b->m;
  b->m = NULL;
  free(b->bits);
  b->bits = NULL;
  return m;
}

/* {====================================================== harmony headers and arms */
static int l_headers(lua_State *L) {
  ltokenizer *t = lg_open(L, 1, TOKENIZER_T, "headers: the tokenizer is closed");
  int V = (int)lg_check_int(L, 2, "gptoss.core.headers", "vocab_size", 1, 1 << 30);
  lheaders *b = lg_box(L, sizeof *b, HEADERS_T);
  if (gptoss_headers_new(t->t, V, &b->h)) return lg_raise(L);
  return 1;
}

static int headers_gc(lua_State *L) {
  lheaders *b = lg_udata(L, 1, HEADERS_T);
  gptoss_headers_free(b->h);
  b->h = NULL;
  return 0;
}

static int headers_read(lua_State *L) {
  lheaders *b = lg_open(L, 1, HEADERS_T, "headers are closed");
  const char *role = lua_isnoneornil(L, 3) ? NULL : lg_check_str(L, 3, "h:read", "role", NULL);   /* before lg_ids pushes */
  size_t n;
  int32_t *ids = lg_ids(L, 2, "h:read", "ids", &n);
  gptoss_header *r = lua_newuserdatauv(L, sizeof *r, 0);
  if (!gptoss_headers_read(b->h, ids, n, role, r)) { lua_pushnil(L); return 1; }
  lua_createtable(L, 0, 2);
  if (r->channel) { lua_pushlstring(L, r->channel, r->channel_len); lua_setfield(L, -2, "channel"); }
  if (r->recipient) { lua_pushlstring(L, r->recipient, r->recipient_len); lua_setfield(L, -2, "recipient"); }
  return 1;
}

/* the box of type tname in field k of the table at idx (pushed) */
static void *field_box(lua_State *L, int idx, const char *fn, const char *k, const char *tname) {
  lua_getfield(L, idx, k);
  lg_check_udata(L, -1, fn, k, tname);
  lua_pushfstring(L, "%s: %s is closed", fn, k);
  void *b = lg_open(L, -2, tname, lua_tostring(L, -1));
  lua_pop(L, 1);
  return b;
}

/* a string field of the table at idx, or NULL (pushed) */
static const char *field_str(lua_State *L, int idx, const char *fn, const char *k) {
  lua_getfield(L, idx, k);
  return lua_isnil(L, -1) ? NULL : lg_check_str(L, -1, fn, k, NULL);
}

int lg_sampler_arm(lua_State *L, gptoss_sampler *s, int idx) {
  static const char *const keys[] = { "headers", "grammar", "vocab", "end_ids", "channel", "recipient", NULL };
  const char *fn = "sampler:arm";
  idx = lua_absindex(L, idx);
  lg_check_table(L, idx, fn, "arm", "a table { headers, grammar, vocab, end_ids, channel, recipient }");
  lg_check_keys(L, idx, fn, keys);
  lheaders *h = field_box(L, idx, fn, "headers", HEADERS_T);
  lgrammar *g = field_box(L, idx, fn, "grammar", GRAMMAR_T);
  lvocab *v = field_box(L, idx, fn, "vocab", VOCAB_T);
  lua_getfield(L, idx, "end_ids");
  size_t n;
  int32_t *ends = lg_ids(L, -1, fn, "end_ids", &n);
  gptoss_arm a = { field_str(L, idx, fn, "channel"), field_str(L, idx, fn, "recipient"), g->g, ends, (int)n };
  if (gptoss_sampler_arm(s, h->h, v->v, &a)) return lg_raise(L);
  return 0;
}
/* }====================================================== */

void lg_open_grammar(lua_State *L) {
  static const luaL_Reg none[] = {{NULL, NULL}};
  static const luaL_Reg g_meta[] = {{"__gc", grammar_gc}, {NULL, NULL}};
  static const luaL_Reg g_methods[] = {{"close", grammar_gc}, {NULL, NULL}};
  lg_class(L, GRAMMAR_T, g_methods, g_meta, NULL);
  static const luaL_Reg v_meta[] = {{"__gc", vocab_gc}, {NULL, NULL}};
  lg_class(L, VOCAB_T, none, v_meta, NULL);
  static const luaL_Reg m_methods[] = {
    {"mask", matcher_mask}, {"allows", matcher_allows}, {"allowed", matcher_allowed}, {"accept", matcher_accept},
    {"accept_bytes", matcher_accept_bytes}, {"would_accept", matcher_would_accept},
    {"accepting", matcher_accepting}, {"ended", matcher_ended},
    {"close", matcher_gc}, {NULL, NULL}};
  static const luaL_Reg m_meta[] = {{"__gc", matcher_gc}, {NULL, NULL}};
  lg_class(L, MATCHER_T, m_methods, m_meta, NULL);
  static const luaL_Reg h_methods[] = {{"read", headers_read}, {"close", headers_gc}, {NULL, NULL}};
  static const luaL_Reg h_meta[] = {{"__gc", headers_gc}, {NULL, NULL}};
  lg_class(L, HEADERS_T, h_methods, h_meta, NULL);
  static const luaL_Reg funcs[] = {{"grammar", l_grammar}, {"vocab", l_vocab}, {"matcher", l_matcher},
    {"headers", l_headers}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
