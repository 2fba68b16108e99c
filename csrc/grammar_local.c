/*
** grammar_local.c: what a stack's top frames alone make of the vocabulary.
**
** grammar_mask.c splits a state's stacks into their top frames (a local
** grammar: a string's characters, say) and the context below. Here a
** local grammar is walked over the whole trie once, its entry made: the
** tokens it accepts, and the exits: trie nodes where it has ended and
** then dies, whose subtrees the context may take. An entry is named by
** the local grammar's shape (its frames' rest and every rule and byte set
** they reach, numbered as met), not by its grammar, and kept by the
** vocabulary for every matcher and grammar, the least recently used
** dropped past CACHE_BYTES: every JSON string of at most 16 characters of
** every schema shares the same 17 entries.
**
** A walk carries up to 32 local grammars side by side as one automaton of
** their tuples of states, one lookup per node whatever their number: when
** a walk is long, the local grammars it can end in and go on from (the
** string with room for 13 characters, after 3) are walked at once, so a
** string's first mask pays for the rest of them.
*/
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "grammar.h"

#define MAX_EXITS (1u << 18)     /* exit nodes an entry keeps; beyond, its stacks are walked */
#define CACHE_BYTES (64u << 20)  /* a vocabulary's entries, the least recently used dropped beyond */
#define MAX_FAMILY 32            /* local grammars one walk serves (bits of a word) */
#define FAMILY_WORTH 50000       /* a walk this long (tokens and new states) walks its family too */

/* {====================================================== the cache */
struct gmask_cache {
  pthread_mutex_t mu;
  gm_entry **ht;               /* chained by hash */
  uint32_t cap, n;
  gm_entry lru;                /* list head: lru.newer is the oldest, lru.older the newest */
  size_t bytes;
};

void gm_entry_unref(gm_entry *e) {
  if (!e || atomic_fetch_sub(&e->refs, 1) > 1) return;
  free(e->key); free(e->ids); free(e->bits); free(e->exit);
  free(e);
}

struct gmask_cache *gm_cache_new(void) {
  struct gmask_cache *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->cap = 256;
  if (!(c->ht = calloc(c->cap, sizeof *c->ht)) || pthread_mutex_init(&c->mu, NULL)) { free(c->ht); free(c); return NULL; }
  c->lru.older = c->lru.newer = &c->lru;
  return c;
}

void gm_cache_free(struct gmask_cache *c) {
  if (!c) return;
  for (gm_entry *e = c->lru.newer, *next; e != &c->lru; e = next) { next = e->newer; gm_entry_unref(e); }
  pthread_mutex_destroy(&c->mu);
  free(c->ht);
  free(c);
}

static void lru_unlink(gm_entry *e) { e->older->newer = e->newer; e->newer->older = e->older; }
static void lru_push(struct gmask_cache *c, gm_entry *e) {   /* as the newest */
  e->older = c->lru.older; e->newer = &c->lru;
  c->lru.older->newer = e; c->lru.older = e;
}

static gm_entry **bucket(struct gmask_cache *c, uint64_t h) { return &c->ht[h & (c->cap - 1)]; }

static gm_entry *find(struct gmask_cache *c, uint64_t h, const uint32_t *key, uint32_t n) {
  for (gm_entry *e = *bucket(c, h); e; e = e->chain)
    if (e->hash == h && e->key_n == n && memcmp(e->key, key, sizeof(uint32_t) * n) == 0) return e;
  return NULL;
}

/* the entry of key, referenced, or NULL */
static gm_entry *cache_get(struct gmask_cache *c, uint64_t h, const uint32_t *key, uint32_t n) {
  pthread_mutex_lock(&c->mu);
  gm_entry *e = find(c, h, key, n);
  if (e) { atomic_fetch_add(&e->refs, 1); lru_unlink(e); lru_push(c, e); }
  pthread_mutex_unlock(&c->mu);
  return e;
}

/* keeps e (referenced by the caller), or the equal one another thread kept first */
static gm_entry *cache_put(struct gmask_cache *c, gm_entry *e) {
  pthread_mutex_lock(&c->mu);
  gm_entry *had = find(c, e->hash, e->key, e->key_n);
  if (had) {
    atomic_fetch_add(&had->refs, 1);
    pthread_mutex_unlock(&c->mu);
    gm_entry_unref(e);
    return had;
  }
  if (c->n + 1 > c->cap) {   /* rehash: twice the buckets */
    gm_entry **ht = calloc((size_t)c->cap * 2, sizeof *ht);
    if (ht) {
      gm_entry **old = c->ht;
      uint32_t old_cap = c->cap;
      c->ht = ht; c->cap *= 2;
      for (uint32_t i = 0; i < old_cap; i++)
        for (gm_entry *x = old[i], *next; x; x = next) { next = x->chain; x->chain = *bucket(c, x->hash); *bucket(c, x->hash) = x; }
      free(old);
    }
  }
  atomic_fetch_add(&e->refs, 1);
  e->chain = *bucket(c, e->hash);
  *bucket(c, e->hash) = e;
  lru_push(c, e);
  c->n++;
  c->bytes += e->bytes;
  while (c->bytes > CACHE_BYTES && c->lru.newer != e) {
    gm_entry *old = c->lru.newer, **p = bucket(c, old->hash);
    while (*p != old) p = &(*p)->chain;
    *p = old->chain;
    lru_unlink(old);
    c->n--;
    c->bytes -= old->bytes;
    gm_entry_unref(old);
  }
  pthread_mutex_unlock(&c->mu);
  return e;
}
/* }====================================================== */

/* {====================================================== scratch */
/* One local grammar of a walk, its entry being made. */
typedef struct lgram {
  uint32_t start;              /* its state */
  gm_entry *e;                 /* key and hash set */
  uint32_t *acc;               /* [gvocab_words]: tokens accepted */
  uint32_t n_ids;
  wvec exits;
  int overflow;
  gbyteset goes_on;
} lgram;

struct glocal_scratch {
  wvec key, queue, sets, fam;
  uint32_t *rule_gen, *rule_id, *set_gen, *set_id;   /* canonical numbers, valid where gen matches */
  uint32_t gen;
  uint32_t *st_gen, st_cap, st_mark;   /* states met by family(), where st_gen is st_mark */
  lgram *lg;                   /* [MAX_FAMILY] */
  uint32_t *at, *live, *ends;  /* [max_depth + 1]: walk_locals' path */
  uint32_t goes_on[256];       /* per byte, the grammars of a walk that go on with it where they can end */
  wvec tu;                     /* a walk's tuples, m states each */
  uint32_t tu_n, tu_cap, *tu_ht, *tu_live;   /* tu_live: per tuple, the live and ending grammars */
  uint64_t *tu_next;           /* [tu_cap * n_cls]: successor | its live grammars << 32, ~0 not known */
  uint32_t *tmask;             /* [gvocab_words * 32]: per token, the grammars of a walk that accept it */
};

void gm_local_free(struct glocal_scratch *s) {
  if (!s) return;
  free(s->key.v); free(s->queue.v); free(s->sets.v); free(s->fam.v);
  free(s->rule_gen); free(s->rule_id); free(s->set_gen); free(s->set_id); free(s->st_gen);
  if (s->lg) for (int c = 0; c < MAX_FAMILY; c++) { free(s->lg[c].acc); free(s->lg[c].exits.v); }
  free(s->lg); free(s->at); free(s->tmask);
  free(s->tu.v); free(s->tu_ht); free(s->tu_live); free(s->tu_next);
  free(s);
}

static struct glocal_scratch *scratch(gptoss_matcher *M) {
  if (M->ls) return M->ls;
  struct glocal_scratch *s = calloc(1, sizeof *s);
  const gptoss_grammar *g = M->g;
  size_t depths = (size_t)M->voc->max_depth + 1;
  if (!s) return NULL;
  s->rule_gen = calloc(g->n_rules + 1, sizeof(uint32_t));
  s->rule_id = malloc(sizeof(uint32_t) * (g->n_rules + 1));
  s->set_gen = calloc(g->n_sets + 1, sizeof(uint32_t));
  s->set_id = malloc(sizeof(uint32_t) * (g->n_sets + 1));
  s->lg = calloc(MAX_FAMILY, sizeof *s->lg);
  s->at = malloc(sizeof(uint32_t) * depths * 3);
  if (!s->rule_gen || !s->rule_id || !s->set_gen || !s->set_id || !s->lg || !s->at) { gm_local_free(s); return NULL; }
  s->live = s->at + depths; s->ends = s->live + depths;
  return M->ls = s;
}
/* }====================================================== */

/* {====================================================== keys */
/* The shape of the grammar below the local stacks of state s: the rest of
   each frame's alternative, then every rule they reach, numbered as met,
   then the byte sets, numbered as met; equal shapes match the same bytes
   the same way whichever grammar they come from. */
static int key_elem(struct glocal_scratch *S, const gptoss_grammar *g, const gelem *x) {
  uint32_t w;
  if (x->type == GE_SET) {
    if (S->set_gen[x->v] != S->gen) {
      S->set_gen[x->v] = S->gen;
      S->set_id[x->v] = (uint32_t)S->sets.n;
      if (gm_push(&S->sets, x->v)) return -1;
    }
    w = S->set_id[x->v] << 2 | 1;
  } else if (x->type == GE_REF) {
    if (S->rule_gen[x->v] != S->gen) {
      S->rule_gen[x->v] = S->gen;
      S->rule_id[x->v] = (uint32_t)S->queue.n;
      if (gm_push(&S->queue, x->v)) return -1;
    }
    w = S->rule_id[x->v] << 2 | 2;
  } else w = x->type == GE_ALT ? 3 : 0;
  return gm_push(&S->key, w);
}

static uint64_t hash_words(const uint32_t *w, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
  for (size_t i = 0; i < n; i++) { h ^= w[i]; h *= 0xff51afd7ed558ccdull; h ^= h >> 32; }
  return h;
}

static int local_key(gptoss_matcher *M, uint32_t s, uint64_t *hash) {
  struct glocal_scratch *S = M->ls;
  const gptoss_grammar *g = M->g;
  S->key.n = S->queue.n = S->sets.n = 0;
  if (++S->gen == 0) {   /* the stamps wrapped: clear them */
    memset(S->rule_gen, 0, sizeof(uint32_t) * (g->n_rules + 1));
    memset(S->set_gen, 0, sizeof(uint32_t) * (g->n_sets + 1));
    S->gen = 1;
  }
  const dstate *d = &M->st[s];
  for (uint32_t i = 0; i < d->words;) {
    const uint32_t *stk = M->pool.v + d->off + i;
    i += stk[0] + 1;
    if (stk[0] == 0) continue;   /* the empty stack of a family member: set aside */
    if (gm_push(&S->key, stk[0])) return -1;
    for (uint32_t f = 1; f <= stk[0]; f++) {
      const gelem *x = g->e + stk[f];
      do { if (key_elem(S, g, x)) return -1; } while (!gelem_ends(x++));
    }
  }
  for (size_t q = 0; q < S->queue.n; q++) {
    const gelem *x = g->e + g->rule_at[S->queue.v[q]];
    do { if (key_elem(S, g, x)) return -1; } while (x++->type != GE_END);
  }
  for (size_t k = 0; k < S->sets.n; k++)
    for (int w = 0; w < 8; w++) if (gm_push(&S->key, g->sets[S->sets.v[k]].w[w])) return -1;
  *hash = hash_words(S->key.v, S->key.n);
  return 0;
}

/* }====================================================== */

/* {====================================================== a walk's tuples */
/* The m local grammars of a walk go through the trie together as one
   automaton: a tuple is the state of each (0: dead), interned per walk,
   with its successor per byte class memoised, so a node costs one lookup
   however many grammars share the walk. Tuple 0 is all dead. */
static int64_t tuple_intern(gptoss_matcher *M, const uint32_t *st, int m) {
  struct glocal_scratch *S = M->ls;
  uint64_t h = hash_words(st, (size_t)m);
  uint32_t mask = S->tu_cap * 2 - 1;
  for (uint32_t k = (uint32_t)h & mask; S->tu_ht[k]; k = (k + 1) & mask) {
    uint32_t id = S->tu_ht[k] - 1;
    if (memcmp(S->tu.v + (size_t)id * (size_t)m, st, sizeof(uint32_t) * (size_t)m) == 0) return id;
  }
  if (S->tu_n == S->tu_cap) {   /* twice the room: tables, then the hash rebuilt */
    uint32_t cap = S->tu_cap * 2;
    uint64_t *next = realloc(S->tu_next, sizeof(uint64_t) * cap * M->n_cls);
    if (next) S->tu_next = next;
    uint32_t *live = next ? realloc(S->tu_live, sizeof(uint32_t) * cap * 2) : NULL;
    if (live) S->tu_live = live;
    uint32_t *ht = live ? calloc((size_t)cap * 2, sizeof(uint32_t)) : NULL;
    if (!ht) return -1;
    free(S->tu_ht);
    S->tu_ht = ht;
    S->tu_cap = cap;
    mask = cap * 2 - 1;
    for (uint32_t id = 0; id < S->tu_n; id++) {
      uint32_t k = (uint32_t)hash_words(S->tu.v + (size_t)id * (size_t)m, (size_t)m) & mask;
      while (S->tu_ht[k]) k = (k + 1) & mask;
      S->tu_ht[k] = id + 1;
    }
  }
  uint32_t id = S->tu_n++, live = 0, ends = 0;
  for (int c = 0; c < m; c++) {
    if (gm_push(&S->tu, st[c])) return -1;
    if (st[c]) { live |= 1u << c; ends |= (uint32_t)M->accepting[st[c]] << c; }
  }
  S->tu_live[2 * id] = live;
  S->tu_live[2 * id + 1] = ends;
  memset(S->tu_next + (size_t)id * M->n_cls, 0xff, sizeof(uint64_t) * M->n_cls);
  uint32_t k = (uint32_t)h & mask;
  while (S->tu_ht[k]) k = (k + 1) & mask;
  S->tu_ht[k] = id + 1;
  return id;
}

static int tuples_start(gptoss_matcher *M, const lgram *lg, int m) {
  struct glocal_scratch *S = M->ls;
  uint32_t st[MAX_FAMILY];
  if (!S->tu_cap) {
    S->tu_cap = 256;
    S->tu_next = malloc(sizeof(uint64_t) * S->tu_cap * M->n_cls);
    S->tu_live = malloc(sizeof(uint32_t) * S->tu_cap * 2);
    S->tu_ht = malloc(sizeof(uint32_t) * S->tu_cap * 2);
    if (!S->tu_next || !S->tu_live || !S->tu_ht) return -1;
  }
  S->tu_n = 0;
  S->tu.n = 0;
  memset(S->tu_ht, 0, sizeof(uint32_t) * S->tu_cap * 2);
  memset(st, 0, sizeof st);
  if (tuple_intern(M, st, m) != 0) return -1;   /* all dead */
  for (int c = 0; c < m; c++) st[c] = lg[c].start;
  return (int)tuple_intern(M, st, m);
}

/* tuple t's successor on byte b, computed (the memo missed) */
static int64_t tuple_step(gptoss_matcher *M, uint32_t t, unsigned b, int m) {
  struct glocal_scratch *S = M->ls;
  uint32_t st[MAX_FAMILY];
  for (int c = 0; c < m; c++) {
    uint32_t s = S->tu.v[(size_t)t * (size_t)m + (size_t)c];
    int64_t x = s ? gm_step(M, s, b) : 0;
    if (x < 0) return -1;
    st[c] = (uint32_t)x;
  }
  int64_t id = tuple_intern(M, st, m);
  if (id < 0) { gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory"); return -1; }
  S->tu_next[(size_t)t * M->n_cls + M->g->cls[b]] = (uint64_t)S->tu_live[2 * id] << 32 | (uint64_t)id;
  return id;
}
/* }====================================================== */

/* {====================================================== walks */
/* Exit nodes as the walk finds them, with their byte on top when the
   trie is small enough (fill_entry then sorts them by byte alone). */
static inline int record_exits(lgram *lg, uint32_t who, uint32_t node, uint32_t tag) {
  for (; who; who &= who - 1) {
    wvec *x = &lg[__builtin_ctz(who)].exits;
    if (x->n < x->cap) x->v[x->n++] = tag | node;
    else if (x->n == MAX_EXITS) lg[__builtin_ctz(who)].overflow = 1;
    else if (gm_push(x, tag | node)) return -1;
  }
  return 0;
}

static inline uint32_t pop32(uint32_t x) {   /* (no popcnt instruction assumed) */
  x -= (x >> 1) & 0x55555555u;
  x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  return (((x + (x >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24;
}

/* x[k] bit c becomes x[c] bit k: a 32 by 32 bit transpose, swapping halves of halves */
static void transpose32(uint32_t *x) {
  uint32_t m = 0x0000FFFFu;
  for (int j = 16; j; j >>= 1, m ^= m << j)
    for (int k = 0; k < 32; k = (k + j + 1) & ~j) {
      uint32_t t = ((x[k] >> j) ^ x[k + j]) & m;
      x[k] ^= t << j;
      x[k + j] ^= t;
    }
}

/* Walks the whole trie once for m local grammars side by side (their
   stacks are top frames alone; the empty stack, once they are all done,
   is where the context takes over). Per depth of the current path, bit c
   of: live, grammar c's state there is alive; ends, it holds the empty
   stack. A node whose parent's state ends is where the context may take
   a token's rest: kept as an exit when the local grammar dies there, noted
   by its byte (goes_on) when it goes on (use_entry says why that is
   enough). Exits at a byte that goes on elsewhere are left out too. */
static int walk_locals(gptoss_matcher *M, lgram *lg, int m) {
  struct glocal_scratch *S = M->ls;
  const gptoss_vocab *v = M->voc;
  const uint8_t *cls = M->g->cls, *byte = v->byte;
  const uint16_t *depth = v->depth;
  const uint32_t *tok = v->tok;
  size_t words = (size_t)((v->V + 31) / 32), n_cls = M->n_cls;   /* (the bitsets' pad word after) */
  uint32_t *at = S->at, *live = S->live, *ends = S->ends, *goes_on = S->goes_on;
  int tagged = v->n < (1u << 24);
  for (int c = 0; c < m; c++) {
    if (!lg[c].acc && !(lg[c].acc = malloc(sizeof(uint32_t) * (words + 1)))) goto oom;
    lg[c].n_ids = 0; lg[c].exits.n = 0; lg[c].overflow = 0;
  }
  memset(goes_on, 0, sizeof S->goes_on);
  /* one grammar sets its bits; several note each token's grammars as a
     word, spread into their bitsets after */
  uint32_t *tmask = lg[0].acc;
  if (m == 1) memset(tmask, 0, sizeof(uint32_t) * (words + 1));
  else {
    if (!S->tmask && !(S->tmask = malloc(sizeof(uint32_t) * (words + 1) * 32))) goto oom;
    tmask = S->tmask;
    memset(tmask, 0, sizeof(uint32_t) * (words + 1) * 32);
  }
  int t0 = tuples_start(M, lg, m);
  if (t0 < 0) goto oom;
  const uint64_t *tnext = S->tu_next;
  const uint32_t *tlive = S->tu_live;
  at[0] = (uint32_t)t0;
  live[0] = tlive[2 * t0];
  ends[0] = 0;   /* before any byte the context is not asked: that is the stack's own mask */
  uint32_t n_one = 0;
  for (uint32_t i = 0, n = v->n; i < n;) {
    uint32_t d = depth[i], b = byte[i];
    uint64_t x = tnext[at[d] * n_cls + cls[b]];
    if (x == UINT64_MAX) {
      int64_t id = tuple_step(M, at[d], b, m);
      if (id < 0) return -1;
      tnext = S->tu_next; tlive = S->tu_live;   /* (they may have moved) */
      x = tnext[at[d] * n_cls + cls[b]];
    }
    uint32_t t = (uint32_t)x, nl = (uint32_t)(x >> 32), e = ends[d];
    if (e) {
      uint32_t rec = live[d] & ~nl & e & ~goes_on[b];
      if (rec && record_exits(lg, rec, i, tagged ? b << 24 : 0)) goto oom;
      goes_on[b] |= e & nl;
    }
    if (!nl) { i = v->skip[i]; continue; }
    at[d + 1] = (uint32_t)t; live[d + 1] = nl; ends[d + 1] = tlive[2 * t + 1];
    if (m == 1) {
      gvocab_set(v, i, tmask);
      n_one += (tok[i] & 0x7fffffffu) != v->pad;
      if (tok[i] >> 31) for (int32_t id = v->dup[tok[i] & 0x7fffffffu]; id >= 0; id = v->dup[id]) n_one++;
    } else {
      uint32_t first = tok[i] & 0x7fffffffu;
      tmask[first] = nl;
      if (tok[i] >> 31) for (int32_t id = v->dup[first]; id >= 0; id = v->dup[id]) tmask[id] = nl;
    }
    i++;
  }
  for (size_t w = 0; m > 1 && w < words; w++) {   /* 32 tokens' words to 32 grammars' words */
    uint32_t x[32];
    memcpy(x, tmask + w * 32, sizeof x);
    transpose32(x);
    for (int c = 0; c < m; c++) lg[c].acc[w] = x[c];
  }
  for (int c = 0; c < m; c++) {
    memset(&lg[c].goes_on, 0, sizeof lg[c].goes_on);
    for (int b = 0; b < 256; b++) lg[c].goes_on.w[b >> 5] |= ((goes_on[b] >> c) & 1u) << (b & 31);
    if (m == 1) lg[c].n_ids = n_one;
    else for (size_t w = 0; w < words; w++) lg[c].n_ids += pop32(lg[c].acc[w]);
  }
  return 0;
oom:
  gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  return -1;
}

/* the walk's results into lg's entry */
static int fill_entry(const gptoss_vocab *v, lgram *lg) {
  gm_entry *e = lg->e;
  size_t words = (size_t)((v->V + 31) / 32);
  e->overflow = lg->overflow;
  if (lg->overflow) return 0;
  e->n_ids = lg->n_ids;
  if (lg->n_ids < words) {   /* the ids take less room than the bitset */
    if (!(e->ids = malloc(sizeof(uint32_t) * (lg->n_ids ? lg->n_ids : 1)))) return -1;
    uint32_t k = 0;
    for (size_t w = 0; w < words; w++)
      for (uint32_t x = lg->acc[w]; x; x &= x - 1) e->ids[k++] = (uint32_t)(w * 32 + (size_t)__builtin_ctz(x));
    e->bytes += sizeof(uint32_t) * lg->n_ids;
  } else {
    if (!(e->bits = malloc(sizeof(uint32_t) * words))) return -1;
    memcpy(e->bits, lg->acc, sizeof(uint32_t) * words);
    e->bytes += sizeof(uint32_t) * words;
  }
  const wvec *x = &lg->exits;
  int tagged = v->n < (1u << 24);
  e->goes_on = lg->goes_on;
  uint32_t count[257] = {0};   /* by byte, those at a byte that goes on elsewhere left out */
  for (size_t k = 0; k < x->n; k++) {
    unsigned b = tagged ? x->v[k] >> 24 : v->byte[x->v[k]];
    if (!gset_has(&e->goes_on, b)) count[b + 1]++;
  }
  for (int b = 0; b < 256; b++) count[b + 1] += count[b];
  if (!(e->exit = malloc(sizeof(uint32_t) * (count[256] ? count[256] : 1)))) return -1;
  memcpy(e->exit_at, count, sizeof count);
  for (size_t k = 0; k < x->n; k++) {
    unsigned b = tagged ? x->v[k] >> 24 : v->byte[x->v[k]];
    if (!gset_has(&e->goes_on, b)) e->exit[count[b]++] = tagged ? x->v[k] & 0xffffff : x->v[k];
  }
  e->bytes += sizeof(uint32_t) * e->exit_at[256];
  return 0;
}
/* }====================================================== */

/* {====================================================== entries */
static gm_entry *new_entry(const uint32_t *key, uint32_t n, uint64_t hash) {
  gm_entry *e = calloc(1, sizeof *e);
  if (!e || !(e->key = malloc(sizeof(uint32_t) * (n ? n : 1)))) { free(e); return NULL; }
  atomic_init(&e->refs, 1);
  memcpy(e->key, key, sizeof(uint32_t) * n);
  e->key_n = n;
  e->hash = hash;
  e->bytes = sizeof *e + sizeof(uint32_t) * n;
  return e;
}

/* The local grammars a walk from s can end in and go on from (a string
   with room for 16 characters, after 3, is the one with room for 13):
   the states holding the empty stack among those the walk reached. Each
   is its own local grammar with the empty stack set aside; those not yet
   kept become lg[1..]. */
static int family(gptoss_matcher *M, uint32_t s, lgram *lg) {
  struct glocal_scratch *S = M->ls;
  int m = 1;
  S->fam.n = 0;
  if (++S->st_mark == 0) { memset(S->st_gen, 0, sizeof(uint32_t) * S->st_cap); S->st_mark = 1; }
  if (gm_push(&S->fam, s)) goto fail;
  S->st_gen[s] = S->st_mark;
  for (size_t q = 0; q < S->fam.n && m < MAX_FAMILY; q++) {
    uint32_t x = S->fam.v[q];
    const int32_t *row = M->next + (size_t)x * M->n_cls;
    if (M->accepting[x] && M->st[x].words > 1) {   /* (the empty stack alone: nothing goes on) */
      uint64_t h;
      if (local_key(M, x, &h)) goto fail;
      gm_entry *e = cache_get(M->voc->cache, h, S->key.v, (uint32_t)S->key.n);
      if (e) gm_entry_unref(e);
      else {
        if (!(lg[m].e = new_entry(S->key.v, (uint32_t)S->key.n, h))) goto fail;
        lg[m++].start = x;
      }
    }
    for (uint32_t c = 0; c < M->n_cls; c++) {
      uint32_t t = row[c] > 0 ? (uint32_t)row[c] : 0;
      if (t && t < S->st_cap && S->st_gen[t] != S->st_mark) {
        S->st_gen[t] = S->st_mark;
        if (gm_push(&S->fam, t)) goto fail;
      }
    }
  }
  return m;
fail:   /* (memory) */
  for (int c = 1; c < m; c++) { gm_entry_unref(lg[c].e); lg[c].e = NULL; }
  return -1;
}

gptoss_status gm_local_kept(gptoss_matcher *M, uint32_t s, gm_entry **e) {
  uint64_t h;
  *e = NULL;
  if (!scratch(M) || local_key(M, s, &h)) return gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  *e = cache_get(M->voc->cache, h, M->ls->key.v, (uint32_t)M->ls->key.n);
  return GPTOSS_OK;
}

/* The entry of the local grammar of state s: kept, or walked (and, when
   that walk was long, the rest of its family with it: their walk is not
   this mask's work, and failing, it leaves them for later). */
gm_entry *gm_local_make(gptoss_matcher *M, uint32_t s) {
  struct glocal_scratch *S = scratch(M);
  if (!S) goto oom;
  lgram *lg = S->lg;
  uint64_t h;
  if (local_key(M, s, &h)) goto oom;
  gm_entry *e = cache_get(M->voc->cache, h, S->key.v, (uint32_t)S->key.n);
  if (e) return e;
  if (!(lg[0].e = new_entry(S->key.v, (uint32_t)S->key.n, h))) goto oom;
  lg[0].start = s;
  uint32_t n_st = M->n_st;
  int m = 1;
  if (walk_locals(M, lg, 1)) goto fail;
  if (fill_entry(M->voc, &lg[0])) goto oom_lg;
  e = cache_put(M->voc->cache, lg[0].e);
  lg[0].e = NULL;
  if (M->n_st - n_st + lg[0].n_ids > FAMILY_WORTH) {   /* a long walk: its family too */
    uint64_t work = M->work;
    if (S->st_cap < M->n_st) {
      free(S->st_gen);
      S->st_cap = M->n_st * 2;
      if (!(S->st_gen = calloc(S->st_cap, sizeof(uint32_t)))) S->st_cap = 0;
    }
    if (S->st_cap && (m = family(M, s, lg)) > 1 && walk_locals(M, lg + 1, m - 1) == 0)
      for (int c = 1; c < m; c++)
        if (fill_entry(M->voc, &lg[c]) == 0) { gm_entry_unref(cache_put(M->voc->cache, lg[c].e)); lg[c].e = NULL; }
    for (int c = 1; c < m; c++) { gm_entry_unref(lg[c].e); lg[c].e = NULL; }
    M->work = work;
  }
  return e;
oom_lg:
  gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
fail:
  gm_entry_unref(lg[0].e);
  lg[0].e = NULL;
  return NULL;
oom:
  gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  return NULL;
}
/* }====================================================== */
