/*
** grammar_mask.c: which tokens a grammar allows next, over a whole vocabulary.
**
** The plain way is a depth-first walk of the vocabulary's byte trie over
** the matcher's lazy DFA (grammar.c), one table lookup per node, pruning a
** subtree at its first rejected byte: cheap where little is allowed (a
** literal, a number). Inside a string nearly every token is allowed, the
** walk visits the whole trie (400,000 nodes) and the state is new at every
** step (a string of at most 16 characters is 17 states), so keeping masks
** by state does not help.
**
** Such a state is split, XGrammar's way: each stack is its top frames (the
** top one and the parser-made ones under it, down to a repetition's link:
** a string's characters) and its context below. What the top frames alone
** make of a token does not depend on the context: they accept it, or die,
** or are done after some of its bytes, where the context takes the rest.
** The stacks sharing a context make one local grammar, whose entry
** (grammar_local.c: the tokens it accepts, the trie nodes where it is done
** and dies) the vocabulary keeps for every grammar; the mask is then those
** tokens as a bitset, plus walks from the context down those nodes'
** subtrees for the bytes the context takes (a string's context takes '"':
** the few tokens that close the string).
**
** A mask first looks its state's local grammars up: all kept, the split
** is used. If not, the state is walked the plain way, and split (its
** local grammars made and kept) only once that walk gets long.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "grammar.h"

#define WALK_FIRST 4096          /* trie nodes a mask walks before splitting the state */
#define BIG_LOCAL 20000          /* tokens a local grammar accepts that make its stacks' tops split at once */
#define MAX_SPLIT 64             /* stacks of a state that is split; beyond, one walk */

/* {====================================================== scratch */
/* A split of the current state: its stacks copied (interning moves the
   pool), each [offset, cut] in split, grouped by context; per group its
   first and end stack, local state and entry (NULL: not kept). */
typedef struct sgroup { uint32_t first, end, local; gm_entry *e; } sgroup;

struct gmask_scratch {
  wvec stacks, split;
  sgroup grp[MAX_SPLIT];
  uint32_t n_grp;
  uint8_t *big;                /* [n_e]: a stack topped out here had a large local grammar */
};

void gm_scratch_free(struct gmask_scratch *s) {
  if (!s) return;
  free(s->stacks.v); free(s->split.v); free(s->big);
  free(s);
}

static struct gmask_scratch *scratch(gptoss_matcher *M) {
  if (M->ms) return M->ms;
  struct gmask_scratch *s = calloc(1, sizeof *s);
  if (!s || !(s->big = calloc(M->g->n_e, 1))) { free(s); return NULL; }
  return M->ms = s;
}
/* }====================================================== */

/* {====================================================== walks */
/* Sets the tokens of nodes [i, end) whose bytes lead on from the state at
   their parent's depth (M->walk). 1 when budget nodes (0: no limit) were
   not enough, -1 when a transition failed. */
static int walk(gptoss_matcher *M, uint32_t i, uint32_t end, uint32_t *bits, uint32_t budget) {
  const gptoss_vocab *v = M->voc;
  uint32_t *at = M->walk;
  while (i < end) {
    if (budget && --budget == 0) return 1;
    int64_t t = gm_step(M, at[v->depth[i]], v->byte[i]);
    if (t <= 0) {
      if (t < 0) return -1;
      i = v->skip[i];
      continue;
    }
    at[v->depth[i] + 1] = (uint32_t)t;
    gvocab_set(v, i, bits);
    i++;
  }
  return 0;
}

/* the whole trie from state s */
static gptoss_status walk_all(gptoss_matcher *M, uint32_t s, uint32_t *bits) {
  M->walk[0] = s;
  return walk(M, 0, M->voc->n, bits, 0) ? gptoss_errcode() : GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== split masks */
/* The mask of an entry whose context's state is ctx (bits |=): 1 when the
   entry cannot tell, -1 failed. A token takes the context at an exit
   node; at a node where the local grammar goes on too, the entry kept no
   exit (inside a string nearly every node is one), which is right only
   while the context refuses that byte: one it takes (goes_on) means the
   stacks are walked whole instead. */
static int use_entry(gptoss_matcher *M, const gm_entry *e, uint32_t ctx, uint32_t *bits) {
  const gptoss_vocab *v = M->voc;
  for (int w = 0; w < 8; w++)
    for (uint32_t x = e->goes_on.w[w]; x; x &= x - 1) {
      int64_t t = gm_step(M, ctx, (unsigned)(w * 32 + __builtin_ctz(x)));
      if (t) return t < 0 ? -1 : 1;
    }
  if (e->bits) for (size_t w = 0; w < (size_t)((v->V + 31) / 32); w++) bits[w] |= e->bits[w];
  else for (uint32_t k = 0; k < e->n_ids; k++) bits[e->ids[k] >> 5] |= 1u << (e->ids[k] & 31);
  for (int b = 0; b < 256; b++) {
    if (e->exit_at[b] == e->exit_at[b + 1]) continue;
    int64_t t = gm_step(M, ctx, (unsigned)b);
    if (t <= 0) { if (t < 0) return -1; continue; }
    for (uint32_t k = e->exit_at[b]; k < e->exit_at[b + 1]; k++) {
      uint32_t u = e->exit[k];
      gvocab_set(v, u, bits);
      M->walk[v->depth[u] + 1] = (uint32_t)t;
      if (walk(M, u + 1, v->skip[u], bits, 0)) return -1;
    }
  }
  return 0;
}

/* Where a stack's top frames start: the top one and the parser-made ones
   under it, down to the first link of a repetition (a string's characters
   are local, what the string is in is context). */
static uint32_t local_from(const gptoss_grammar *g, const uint32_t *stk) {
  uint32_t f = stk[0];
  while (f > 1 && g->rule_kind[g->rule_of[stk[f]]] != GR_REPEAT && g->rule_kind[g->rule_of[stk[f - 1]]] != GR_NAMED) f--;
  return f;
}

/* the state of n stacks of the copy (grp: offset, cut), each cut to its top frames */
static int64_t local_state(gptoss_matcher *M, const uint32_t *stacks, const uint32_t *grp, uint32_t n) {
  M->out.n = 0;
  for (uint32_t k = 0; k < n; k++) {
    const uint32_t *stk = stacks + grp[2 * k];
    uint32_t cut = grp[2 * k + 1];
    if (gm_push(&M->out, stk[0] + 1 - cut)) goto oom;
    for (uint32_t f = cut; f <= stk[0]; f++) if (gm_push(&M->out, stk[f])) goto oom;
  }
  return gm_intern(M);
oom:
  gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  return -1;
}

/* the context's stacks expanded: where the stack goes once its top frames are done */
static int64_t context_state(gptoss_matcher *M, const uint32_t *stk, uint32_t cut) {
  M->out.n = 0;
  M->tmp.n = 0;
  for (uint32_t f = 1; f < cut; f++) if (gm_push(&M->tmp, stk[f])) goto oom;
  if (gm_expand(M, 0)) goto oom;
  return gm_intern(M);
oom:
  gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  return -1;
}

static int same_context(const uint32_t *a, uint32_t ca, const uint32_t *b, uint32_t cb) {
  return ca == cb && memcmp(a + 1, b + 1, sizeof(uint32_t) * (ca - 1)) == 0;
}

static void drop_groups(struct gmask_scratch *S) {
  for (uint32_t k = 0; k < S->n_grp; k++) { gm_entry_unref(S->grp[k].e); S->grp[k].e = NULL; }
  S->n_grp = 0;
}

/* The split and the kept entries: 1 when they are all kept, 0 when some
   are not, 2 when the state has too many stacks to split, -1 failed. */
static int split(gptoss_matcher *M) {
  struct gmask_scratch *S = scratch(M);
  if (!S) { gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory"); return -1; }
  const dstate *d = &M->st[M->cur];
  S->stacks.n = S->split.n = 0;
  S->n_grp = 0;
  for (uint32_t i = 0; i < d->words; i++) if (gm_push(&S->stacks, M->pool.v[d->off + i])) goto oom;
  const uint32_t *stacks = S->stacks.v;
  for (uint32_t i = 0; i < S->stacks.n; i += stacks[i] + 1) {
    if (stacks[i] == 0) continue;   /* the grammar may end: no token comes of it */
    if (S->split.n == 2 * MAX_SPLIT) return 2;
    if (gm_push(&S->split, i) || gm_push(&S->split, local_from(M->g, stacks + i))) goto oom;
  }
  uint32_t n = (uint32_t)S->split.n / 2, *st = S->split.v;
  int kept = 1;
  for (uint32_t first = 0; first < n;) {
    uint32_t end = first + 1;   /* the stacks of first's context, gathered after it */
    for (uint32_t k = end; k < n; k++)
      if (same_context(stacks + st[2 * first], st[2 * first + 1], stacks + st[2 * k], st[2 * k + 1])) {
        uint32_t x0 = st[2 * k], x1 = st[2 * k + 1];
        st[2 * k] = st[2 * end]; st[2 * k + 1] = st[2 * end + 1];
        st[2 * end] = x0; st[2 * end + 1] = x1;
        end++;
      }
    int64_t local = local_state(M, stacks, st + 2 * first, end - first);
    if (local < 0) return -1;
    sgroup *g = &S->grp[S->n_grp++];
    g->first = first; g->end = end; g->local = (uint32_t)local;
    if (gm_local_kept(M, (uint32_t)local, &g->e)) goto oom;
    if (!g->e) kept = 0;
    first = end;
  }
  return kept;
oom:
  gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  return -1;
}

/* The mask of the split state, entries not kept made first. */
static gptoss_status use_split(gptoss_matcher *M, uint32_t *bits) {
  struct gmask_scratch *S = M->ms;
  const uint32_t *stacks = S->stacks.v, *st = S->split.v;
  for (uint32_t k = 0; k < S->n_grp; k++)
    if (!S->grp[k].e && !(S->grp[k].e = gm_local_make(M, S->grp[k].local))) return gptoss_errcode();
  for (uint32_t k = 0; k < S->n_grp; k++) {
    const sgroup *g = &S->grp[k];
    const gm_entry *e = g->e;
    int r = 1;
    if (!e->overflow) {
      int64_t ctx = context_state(M, stacks + st[2 * g->first], st[2 * g->first + 1]);
      if (ctx < 0 || (r = use_entry(M, e, (uint32_t)ctx, bits)) < 0) return gptoss_errcode();
      if (!r && e->n_ids > BIG_LOCAL)   /* a state topped out the same way splits at once */
        for (uint32_t j = g->first; j < g->end; j++) { const uint32_t *stk = stacks + st[2 * j]; S->big[stk[stk[0]]] = 1; }
    }
    if (r) {   /* the entry cannot tell: these stacks walk the trie whole */
      M->out.n = 0;
      for (uint32_t j = g->first; j < g->end; j++) {
        const uint32_t *stk = stacks + st[2 * j];
        for (uint32_t f = 0; f <= stk[0]; f++)
          if (gm_push(&M->out, stk[f])) return gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
      }
      int64_t whole = gm_intern(M);
      gptoss_status rc = whole < 0 ? gptoss_errcode() : walk_all(M, (uint32_t)whole, bits);
      if (rc) return rc;
    }
  }
  return GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== masks */
/* whether a stack of the state tops out where a split was worth it before */
static int seen_big(gptoss_matcher *M, uint32_t s) {
  const struct gmask_scratch *S = M->ms;
  if (!S) return 0;
  for (uint32_t i = 0; i < M->st[s].words;) {
    const uint32_t *stk = M->pool.v + M->st[s].off + i;
    i += stk[0] + 1;
    if (stk[0] && S->big[stk[stk[0]]]) return 1;
  }
  return 0;
}

/* A state whose local grammars are all kept is split; one that topped out
   like a large one before is split; any other is walked, and split when
   that walk gets long. */
static gptoss_status compute(gptoss_matcher *M, uint32_t *bits) {
  size_t words = gvocab_words(M->voc);
  memset(bits, 0, sizeof(uint32_t) * words);
  M->work = 0;
  int kept = split(M);
  gptoss_status rc = GPTOSS_OK;
  if (kept < 0) rc = gptoss_errcode();
  else if (kept == 2) rc = walk_all(M, M->cur, bits);
  else {
    int r = 1;
    if (!kept && !seen_big(M, M->cur)) {
      M->walk[0] = M->cur;
      if ((r = walk(M, 0, M->voc->n, bits, WALK_FIRST)) < 0) rc = gptoss_errcode();
    }
    if (r > 0) {
      memset(bits, 0, sizeof(uint32_t) * words);
      M->work = 0;
      rc = use_split(M, bits);
    }
    if (rc == GPTOSS_EUNSUP) {   /* too much work split: the plain walk gets the budget whole */
      memset(bits, 0, sizeof(uint32_t) * words);
      M->work = 0;
      rc = walk_all(M, M->cur, bits);
    }
  }
  if (M->ms) drop_groups(M->ms);
  return rc;
}

/* the current state's mask, in its slot of the matcher's cache (computed
   there when missing: walks need the slot's pad word; *computed says so) */
static gptoss_status cached(gptoss_matcher *M, const uint32_t **bits, int *computed) {
  gptoss_status rc = gm_compact(M);
  if (rc) return rc;
  int slot = (int)(M->cur % MASK_CACHE);
  *computed = M->cache[slot].state != M->cur;
  if (*computed) {
    M->cache[slot].state = UINT32_MAX;
    if (!M->cache[slot].bits && !(M->cache[slot].bits = malloc(sizeof(uint32_t) * gvocab_words(M->voc))))
      return gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
    if ((rc = compute(M, M->cache[slot].bits))) return rc;
    M->cache[slot].state = M->cur;
  }
  *bits = M->cache[slot].bits;
  return GPTOSS_OK;
}

gptoss_status gptoss_matcher_prepare(gptoss_matcher *M, int *computed) {
  const uint32_t *bits;
  *computed = 0;
  return M->ended ? GPTOSS_OK : cached(M, &bits, computed);
}

gptoss_status gptoss_matcher_mask(gptoss_matcher *M, uint32_t *bits) {
  size_t words = (size_t)((M->voc->V + 31) / 32);
  if (M->ended) memset(bits, 0, sizeof(uint32_t) * words);
  else {
    const uint32_t *have;
    int computed;
    gptoss_status rc = cached(M, &have, &computed);
    if (rc) return rc;
    memcpy(bits, have, sizeof(uint32_t) * words);
  }
  if (M->ended || M->accepting[M->cur])
    for (int i = 0; i < M->n_end; i++) bits[M->end_ids[i] >> 5] |= 1u << (M->end_ids[i] & 31);
  return GPTOSS_OK;
}

/* Failing, it allows the end ids alone (and says why): the output stops. */
gptoss_status gptoss_matcher_apply(gptoss_matcher *M, float *logits) {
  int V = M->voc->V;
  gptoss_status rc = gptoss_matcher_mask(M, M->bits);
  if (rc) {
    memset(M->bits, 0, sizeof(uint32_t) * (size_t)((V + 31) / 32));
    for (int i = 0; i < M->n_end; i++) M->bits[M->end_ids[i] >> 5] |= 1u << (M->end_ids[i] & 31);
  }
  for (int w = 0; w * 32 < V; w++) {
    uint32_t x = M->bits[w];
    if (x == UINT32_MAX) continue;
    int hi = V - w * 32 < 32 ? V - w * 32 : 32;
    for (int k = 0; k < hi; k++) if (!((x >> k) & 1)) logits[w * 32 + k] = -INFINITY;
  }
  return rc;
}

/* whether the last mask (apply's) allowed id */
int gptoss_matcher_allows(const gptoss_matcher *M, int32_t id) {
  return id >= 0 && id < M->voc->V && ((M->bits[id >> 5] >> (id & 31)) & 1);
}
/* }====================================================== */
