/*
** grammar.c: a grammar's state over bytes, and the vocabulary's trie.
**
** A matcher's state is llama.cpp's: the set of pushdown stacks of grammar
** positions (grammar.h) that the bytes so far leave open, each stack's top
** a byte set. Unlike llama.cpp, states are interned and their transitions
** memoised as they are first needed: the matcher is a lazy DFA over the
** pushdown configurations it has met. A transition found for one byte is
** recorded for every byte that the state's stack tops cannot tell apart
** from it, so a state inside a string, say, computes a handful of
** successors, not one per byte. The vocabulary's trie is built once per
** tokenizer, flat in depth-first order; masks over it are grammar_mask.c's.
*/
#include <stdlib.h>
#include <string.h>
#include "grammar.h"

#define MAX_STATES 20000       /* interned states before the memo starts over */
#define MAX_STACKS 4096        /* stacks in one state: beyond, the grammar is too ambiguous */
/* stack steps one mask may take: an ambiguous grammar ("x?{63}") keeps
   thousands of parses alive at once, and a walk over the vocabulary's trie
   multiplies them; past this it is refused (under 0.1 s of work) rather
   than holding a request's step for seconds */
#define MASK_BUDGET 3000000ull

/* {====================================================== vocabulary trie */
typedef struct tokref { const char *b; uint32_t len; int32_t id; } tokref;

static int cmp_tok(const void *x, const void *y) {
  const tokref *a = x, *b = y;
  uint32_t n = a->len < b->len ? a->len : b->len;
  int c = memcmp(a->b, b->b, n);
  if (c) return c;
  if (a->len != b->len) return a->len < b->len ? -1 : 1;
  return a->id < b->id ? -1 : a->id > b->id;
}

void gptoss_vocab_free(gptoss_vocab *v) {
  if (!v || atomic_fetch_sub(&v->refs, 1) > 1) return;
  free(v->byte); free(v->depth); free(v->skip); free(v->tok); free(v->dup); free(v->off); free(v->text);
  gm_cache_free(v->cache);
  free(v);
}

gptoss_vocab *gptoss_vocab_ref(gptoss_vocab *v) {
  atomic_fetch_add(&v->refs, 1);
  return v;
}

int gptoss_vocab_size(const gptoss_vocab *v) { return v->V; }

gptoss_status gptoss_vocab_new(const gptoss_tokenizer *t, int V, gptoss_vocab **out) {
  *out = NULL;
  if (V <= 0) return gptoss_fail(GPTOSS_EARG, "vocab: size must be > 0 (got %d)", V);
  gptoss_vocab *v = calloc(1, sizeof *v);
  tokref *refs = malloc(sizeof *refs * (size_t)V);
  if (!v || !refs) goto oom;
  atomic_init(&v->refs, 1);
  v->V = V;
  v->dup = malloc(sizeof(int32_t) * (size_t)V);
  v->off = malloc(sizeof(uint32_t) * ((size_t)V + 1));
  v->cache = gm_cache_new();
  if (!v->dup || !v->off || !v->cache) goto oom;
  size_t total = 0, nodes = 0;
  int n = 0;
  for (int32_t id = 0; id < V; id++) {
    size_t len = 0;
    const char *b = gptoss_is_special(t, id) ? NULL : gptoss_token_bytes(t, id, &len);
    v->dup[id] = -1;
    if (!b || len == 0 || len > 65535) continue;
    refs[n].b = b; refs[n].len = (uint32_t)len; refs[n++].id = id;
    total += len;
  }
  if (!(v->text = malloc(total ? total : 1))) goto oom;
  total = 0;
  for (int32_t id = 0, k = 0; id < V; id++) {   /* refs are in id order still */
    v->off[id] = (uint32_t)total;
    if (k < n && refs[k].id == id) { memcpy(v->text + total, refs[k].b, refs[k].len); total += refs[k].len; k++; }
  }
  v->off[V] = (uint32_t)total;
  qsort(refs, (size_t)n, sizeof *refs, cmp_tok);
  for (int i = 0; i < n; i++) {   /* new nodes: the bytes past the common prefix with the previous token */
    uint32_t l = 0;
    if (i) while (l < refs[i].len && l < refs[i - 1].len && refs[i].b[l] == refs[i - 1].b[l]) l++;
    nodes += refs[i].len - l;
  }
  v->byte = malloc(nodes ? nodes : 1);
  v->depth = malloc(sizeof(uint16_t) * (nodes ? nodes : 1));
  v->skip = malloc(sizeof(uint32_t) * (nodes ? nodes : 1));
  v->tok = malloc(sizeof(uint32_t) * (nodes ? nodes : 1));
  uint32_t *open = malloc(sizeof(uint32_t) * 65536);
  if (!v->byte || !v->depth || !v->skip || !v->tok || !open) { free(open); goto oom; }
  v->pad = (uint32_t)((V + 31) / 32) * 32;
  uint32_t depth_open = 0;
  for (int i = 0; i < n; i++) {
    uint32_t l = 0;
    if (i) while (l < refs[i].len && l < refs[i - 1].len && refs[i].b[l] == refs[i - 1].b[l]) l++;
    while (depth_open > l) v->skip[open[--depth_open]] = v->n;   /* close what this token leaves */
    for (uint32_t d = l; d < refs[i].len; d++) {
      uint32_t k = v->n++;
      v->byte[k] = (uint8_t)refs[i].b[d];
      v->depth[k] = (uint16_t)d;
      v->tok[k] = v->pad;
      open[depth_open++] = k;
    }
    uint32_t at = open[refs[i].len - 1];
    if (v->tok[at] == v->pad) v->tok[at] = (uint32_t)refs[i].id;
    else {   /* the ids of equal bytes come in order: the first stays, the rest follow on dup */
      int32_t *p = &v->dup[v->tok[at] & 0x7fffffffu];
      while (*p >= 0) p = &v->dup[*p];
      *p = refs[i].id;
      v->tok[at] |= 0x80000000u;
    }
    if ((int)refs[i].len > v->max_depth) v->max_depth = (int)refs[i].len;
  }
  while (depth_open) v->skip[open[--depth_open]] = v->n;
  free(open);
  free(refs);
  *out = v;
  return GPTOSS_OK;
oom:
  free(refs);
  gptoss_vocab_free(v);
  return gptoss_fail(GPTOSS_ENOMEM, "vocab: out of memory");
}
/* }====================================================== */

/* {====================================================== states */
int gm_push(wvec *w, uint32_t x) {
  if (w->n == w->cap) {
    size_t c = w->cap ? w->cap * 2 : 256;
    uint32_t *n = realloc(w->v, sizeof(uint32_t) * c);
    if (!n) return -1;
    w->v = n; w->cap = c;
  }
  w->v[w->n++] = x;
  return 0;
}

/* Expands the stack in tmp[base..] (its top last) until every stack's top
   is a byte set, appending each to out. Left recursion is refused when the
   grammar is parsed, so this ends. */
int gm_expand(gptoss_matcher *M, size_t base) {
  const gelem *e = M->g->e;
  size_t len = M->tmp.n - base;
  if (len == 0 || e[M->tmp.v[M->tmp.n - 1]].type == GE_SET) {
    if (gm_push(&M->out, (uint32_t)len)) return -1;
    for (size_t i = 0; i < len; i++) if (gm_push(&M->out, M->tmp.v[base + i])) return -1;
    return 0;
  }
  uint32_t top = M->tmp.v[M->tmp.n - 1];
  uint32_t rule = e[top].v;
  /* the copy without the reference, its continuation pushed when there is one */
  for (uint32_t a = M->g->rule_at[rule];;) {
    size_t mark = M->tmp.n;
    for (size_t i = 0; i + 1 < len; i++) if (gm_push(&M->tmp, M->tmp.v[base + i])) return -1;
    if (!gelem_ends(&e[top + 1]) && gm_push(&M->tmp, top + 1)) return -1;
    if (!gelem_ends(&e[a]) && gm_push(&M->tmp, a)) return -1;
    if (gm_expand(M, mark)) return -1;
    M->tmp.n = mark;
    while (!gelem_ends(&e[a])) a++;
    if (e[a].type == GE_END) break;
    a++;
  }
  return 0;
}

static int cmp_stacks(const uint32_t *a, const uint32_t *b) {
  if (a[0] != b[0]) return a[0] < b[0] ? -1 : 1;
  for (uint32_t i = 1; i <= a[0]; i++) if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
  return 0;
}

/* qsort's comparator over offsets into the stacks being interned */
static _Thread_local const uint32_t *sort_base;
static int cmp_at(const void *x, const void *y) {
  return cmp_stacks(sort_base + *(const uint32_t *)x, sort_base + *(const uint32_t *)y);
}

static int grow_states(gptoss_matcher *M) {
  if (M->n_st == M->cap_st) {
    uint32_t c = M->cap_st ? M->cap_st * 2 : 64;
    dstate *n = realloc(M->st, sizeof *n * c);
    if (n) M->st = n;
    int32_t *next = n ? realloc(M->next, sizeof *next * c * M->n_cls) : NULL;
    if (next) M->next = next;
    uint8_t *acc = next ? realloc(M->accepting, c) : NULL;
    if (!acc) return -1;
    M->accepting = acc; M->cap_st = c;
  }
  if ((M->n_st + 1) * 2 > M->ht_cap) {
    uint32_t c = M->ht_cap ? M->ht_cap * 2 : 256;
    uint32_t *h = calloc(c, sizeof *h);
    if (!h) return -1;
    for (uint32_t i = 0; i < M->n_st; i++) {
      uint32_t k = (uint32_t)M->st[i].hash & (c - 1);
      while (h[k]) k = (k + 1) & (c - 1);
      h[k] = i + 1;
    }
    free(M->ht);
    M->ht = h; M->ht_cap = c;
  }
  return 0;
}

/* the id of the state made of the stacks in out: sorted, deduplicated, interned */
int64_t gm_intern(gptoss_matcher *M) {
  uint32_t n = 0;
  for (size_t i = 0; i < M->out.n; i += M->out.v[i] + 1) {
    if (n == MAX_STACKS) { gptoss_fail(GPTOSS_EUNSUP, "grammar: too ambiguous (more than %d parses at once)", MAX_STACKS); return -1; }
    M->order[n++] = (uint32_t)i;
  }
  const uint32_t *w = M->out.v;
  if (n > 16) { sort_base = w; qsort(M->order, n, sizeof *M->order, cmp_at); }
  else for (uint32_t i = 1; i < n; i++) {   /* insertion sort: a state mostly holds few stacks */
    uint32_t x = M->order[i], j = i;
    while (j > 0 && cmp_stacks(w + M->order[j - 1], w + x) > 0) { M->order[j] = M->order[j - 1]; j--; }
    M->order[j] = x;
  }
  size_t at = M->pool.n;
  int accepting = 0;
  for (uint32_t i = 0; i < n; i++) {
    const uint32_t *s = w + M->order[i];
    if (i && cmp_stacks(w + M->order[i - 1], s) == 0) continue;
    accepting |= s[0] == 0;
    for (uint32_t k = 0; k <= s[0]; k++) if (gm_push(&M->pool, s[k])) goto oom;
  }
  uint32_t words = (uint32_t)(M->pool.n - at);
  if (words == 0) return 0;   /* no stack survives: dead */
  uint64_t h = gptoss_fnv1a(M->pool.v + at, sizeof(uint32_t) * words);
  for (uint32_t k = (uint32_t)h & (M->ht_cap - 1); M->ht[k]; k = (k + 1) & (M->ht_cap - 1)) {
    dstate *d = &M->st[M->ht[k] - 1];
    if (d->hash == h && d->words == words && memcmp(M->pool.v + d->off, M->pool.v + at, sizeof(uint32_t) * words) == 0) {
      M->pool.n = at;
      return M->ht[k] - 1;
    }
  }
  if (grow_states(M)) goto oom;
  dstate *d = &M->st[M->n_st];
  d->off = (uint32_t)at; d->words = words; d->hash = h;
  memset(M->next + (size_t)M->n_st * M->n_cls, 0xff, sizeof(int32_t) * M->n_cls);   /* -1: not known */
  M->accepting[M->n_st] = (uint8_t)accepting;
  uint32_t k = (uint32_t)h & (M->ht_cap - 1);
  while (M->ht[k]) k = (k + 1) & (M->ht_cap - 1);
  M->ht[k] = M->n_st + 1;
  return M->n_st++;
oom:
  gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  return -1;
}

/* the state after byte b in state s, computed (the memo missed) */
static int64_t transition(gptoss_matcher *M, uint32_t s, unsigned b) {
  const gelem *e = M->g->e;
  M->out.n = 0;
  M->work += M->st[s].words;
  if (M->work > MASK_BUDGET) {
    gptoss_fail(GPTOSS_EUNSUP, "grammar: too ambiguous (a mask took more than %llu parse steps)", MASK_BUDGET);
    return -1;
  }
  for (uint32_t i = 0; i < M->st[s].words;) {
    const uint32_t *stk = M->pool.v + M->st[s].off + i;
    uint32_t len = stk[0];
    i += len + 1;
    if (len == 0) continue;
    uint32_t top = stk[len];
    if (!gset_has(&M->g->sets[e[top].v], b)) continue;
    M->tmp.n = 0;
    for (uint32_t k = 1; k < len; k++) if (gm_push(&M->tmp, stk[k])) goto oom;
    if (!gelem_ends(&e[top + 1]) && gm_push(&M->tmp, top + 1)) goto oom;
    if (gm_expand(M, 0)) goto oom;   /* (only out and tmp grow: stk stays valid) */
  }
  return gm_intern(M);
oom:
  gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  return -1;
}

/* The state after byte b in state s, the memo having missed. A byte
   stands for its class (grammar.h): every set holds all of it or none.
   Which of s's stacks go on is all a transition depends on, so with
   classes set the successor is recorded for every class that each stack
   top's set holds or lacks as it holds or lacks b (masks ask for most of
   a state's classes; accepting a token asks for a few, and keeps to the
   plain transition, which is also what the mask specs check against). */
int64_t gm_step_miss(gptoss_matcher *M, uint32_t s, unsigned b, int classes) {
  const gptoss_grammar *g = M->g;
  size_t row = (size_t)s * M->n_cls;
  if (M->next[row + g->cls[b]] >= 0) return M->next[row + g->cls[b]];
  if (!classes) {
    int64_t t = transition(M, s, b);
    if (t >= 0) M->next[row + g->cls[b]] = (int32_t)t;   /* (next may have moved: index again) */
    return t;
  }
  gbyteset same;
  memset(&same, 0xff, sizeof same);
  for (uint32_t i = 0; i < M->st[s].words;) {
    const uint32_t *stk = M->pool.v + M->st[s].off + i;
    i += stk[0] + 1;
    if (stk[0] == 0) continue;
    const gbyteset *set = &g->sets[g->e[stk[stk[0]]].v];
    uint32_t flip = gset_has(set, b) ? 0 : UINT32_MAX;
    for (int w = 0; w < 8; w++) same.w[w] &= set->w[w] ^ flip;
  }
  int64_t t = transition(M, s, b);
  if (t < 0) return t;
  for (uint32_t c = 0; c < M->n_cls; c++)
    if (gset_has(&same, g->cls_byte[c])) M->next[row + c] = (int32_t)t;
  return t;
}
/* }====================================================== */

/* {====================================================== matcher */
static inline int64_t step_byte(gptoss_matcher *M, uint32_t s, unsigned b) {
  int32_t t = M->next[(size_t)s * M->n_cls + M->g->cls[b]];
  return t >= 0 ? t : gm_step_miss(M, s, b, 0);
}

static void forget(gptoss_matcher *M) {
  M->n_st = 0;
  M->pool.n = 0;
  if (M->ht) memset(M->ht, 0, sizeof(uint32_t) * M->ht_cap);
  for (int i = 0; i < MASK_CACHE; i++) M->cache[i].state = UINT32_MAX;
}

/* state 0 (dead), then the start: the root rule expanded */
static gptoss_status start_states(gptoss_matcher *M) {
  M->out.n = 0;
  if (grow_states(M)) return gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  M->st[0] = (dstate){0, 0, 0};
  memset(M->next, 0, sizeof(int32_t) * M->n_cls);   /* the dead state stays dead */
  M->accepting[0] = 0;
  M->n_st = 1;
  M->tmp.n = 0;
  M->order = realloc(M->order, sizeof(uint32_t) * MAX_STACKS);
  if (!M->order || gm_push(&M->tmp, M->g->start) || gm_expand(M, 0)) return gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  int64_t s = gm_intern(M);
  if (s < 0) return gptoss_errcode();
  M->cur = (uint32_t)s;
  return GPTOSS_OK;
}

void gptoss_matcher_free(gptoss_matcher *M) {
  if (!M) return;
  forget(M);
  for (int i = 0; i < MASK_CACHE; i++) free(M->cache[i].bits);
  free(M->st); free(M->next); free(M->accepting); free(M->pool.v); free(M->ht); free(M->out.v); free(M->tmp.v); free(M->order);
  free(M->walk); free(M->bits); free(M->end_ids);
  gm_scratch_free(M->ms);
  gm_local_free(M->ls);
  gptoss_grammar_free(M->g);
  gptoss_vocab_free(M->voc);
  free(M);
}

gptoss_status gptoss_matcher_new(gptoss_grammar *g, gptoss_vocab *voc, const int32_t *end_ids, int n_end,
                                 gptoss_matcher **out) {
  *out = NULL;
  gptoss_matcher *M = calloc(1, sizeof *M);
  if (!M) return gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  M->g = gptoss_grammar_ref(g);
  M->n_cls = g->n_cls;
  M->voc = gptoss_vocab_ref(voc);
  for (int i = 0; i < MASK_CACHE; i++) M->cache[i].state = UINT32_MAX;
  M->end_ids = malloc(sizeof(int32_t) * (size_t)(n_end > 0 ? n_end : 1));
  M->walk = malloc(sizeof(uint32_t) * (size_t)(voc->max_depth + 1));
  M->bits = malloc(sizeof(uint32_t) * (size_t)((voc->V + 31) / 32));
  if (!M->end_ids || !M->walk || !M->bits) { gptoss_matcher_free(M); return gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory"); }
  for (int i = 0; i < n_end; i++) {
    if (end_ids[i] < 0 || end_ids[i] >= voc->V) {
      gptoss_matcher_free(M);
      return gptoss_fail(GPTOSS_EARG, "matcher: end id %d is outside the vocabulary (0..%d)", (int)end_ids[i], voc->V - 1);
    }
    M->end_ids[i] = end_ids[i];
  }
  M->n_end = n_end;
  gptoss_status rc = start_states(M);
  if (rc) { gptoss_matcher_free(M); return rc; }
  *out = M;
  return GPTOSS_OK;
}

/* the memo grew too large: start over from the current state's stacks */
gptoss_status gm_compact(gptoss_matcher *M) {
  if (M->n_st < MAX_STATES) return GPTOSS_OK;
  const dstate *d = &M->st[M->cur];
  wvec keep = {0};
  for (uint32_t i = 0; i < d->words; i++)
    if (gm_push(&keep, M->pool.v[d->off + i])) { free(keep.v); return gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory"); }
  forget(M);
  M->st[0] = (dstate){0, 0, 0};
  memset(M->next, 0, sizeof(int32_t) * M->n_cls);   /* the dead state stays dead */
  M->accepting[0] = 0;
  M->n_st = 1;
  wvec swap = M->out;
  M->out = keep;
  int64_t s = gm_intern(M);
  free(M->out.v);
  M->out = swap;
  if (s < 0) return gptoss_errcode();
  M->cur = (uint32_t)s;
  return GPTOSS_OK;
}

static int is_end(const gptoss_matcher *M, int32_t id) {
  for (int i = 0; i < M->n_end; i++) if (M->end_ids[i] == id) return 1;
  return 0;
}

int gptoss_matcher_accepting(const gptoss_matcher *M) { return M->ended || M->accepting[M->cur]; }
int gptoss_matcher_ended(const gptoss_matcher *M) { return M->ended; }

gptoss_status gptoss_matcher_accept_bytes(gptoss_matcher *M, const char *b, size_t n) {
  M->work = 0;
  gptoss_status rc = gm_compact(M);
  if (rc) return rc;
  if (M->ended) return gptoss_fail(GPTOSS_ESTATE, "matcher: the output has ended");
  uint32_t s = M->cur;
  for (size_t i = 0; i < n; i++) {
    int64_t t = step_byte(M, s, (unsigned char)b[i]);
    if (t < 0) return gptoss_errcode();
    if (t == 0) return gptoss_fail(GPTOSS_EARG, "matcher: the grammar forbids byte %u at offset %zu", (unsigned char)b[i], i);
    s = (uint32_t)t;
  }
  M->cur = s;
  return GPTOSS_OK;
}

gptoss_status gptoss_matcher_would_accept(gptoss_matcher *M, const char *b, size_t n, int *ok) {
  *ok = 0;
  M->work = 0;
  gptoss_status rc = gm_compact(M);
  if (rc) return rc;
  if (M->ended) return GPTOSS_OK;
  uint32_t s = M->cur;
  for (size_t i = 0; i < n; i++) {
    int64_t t = step_byte(M, s, (unsigned char)b[i]);
    if (t <= 0) return t < 0 ? gptoss_errcode() : GPTOSS_OK;
    s = (uint32_t)t;
  }
  *ok = 1;
  return GPTOSS_OK;
}

gptoss_status gptoss_matcher_accept(gptoss_matcher *M, int32_t id) {
  if (id < 0 || id >= M->voc->V) return gptoss_fail(GPTOSS_EARG, "matcher: token id %d is outside the vocabulary", (int)id);
  if (M->ended) return gptoss_fail(GPTOSS_ESTATE, "matcher: the output has ended");
  if (is_end(M, id)) {
    if (!M->accepting[M->cur]) return gptoss_fail(GPTOSS_EARG, "matcher: token %d ends the output before the grammar allows", (int)id);
    M->ended = 1;
    return GPTOSS_OK;
  }
  uint32_t len = M->voc->off[id + 1] - M->voc->off[id];
  if (len == 0) return gptoss_fail(GPTOSS_EARG, "matcher: the grammar forbids token %d (a special token)", (int)id);
  uint32_t keep = M->cur;
  gptoss_status rc = gptoss_matcher_accept_bytes(M, M->voc->text + M->voc->off[id], len);
  if (rc == GPTOSS_EARG) { M->cur = keep; return gptoss_fail(GPTOSS_EARG, "matcher: the grammar forbids token %d here", (int)id); }
  return rc;
}

/* }====================================================== */
