/*
** grammar.h: a compiled GBNF grammar, as gbnf.c leaves it for grammar.c,
** and the matcher's insides that grammar.c, grammar_mask.c and
** grammar_local.c share.
**
** Every rule is a run of elements in one array: its alternatives one after
** the other, each ended by GE_ALT, the last by GE_END. A terminal is one
** byte from a 256-bit set: character classes and literals are compiled to
** their UTF-8 bytes (a class over code points becomes alternatives of byte
** sequences), so the matcher works on bytes alone and a token that ends
** inside a multi-byte character needs no special case.
*/
#ifndef GPTOSS_GRAMMAR_H
#define GPTOSS_GRAMMAR_H

#include <stdatomic.h>
#include <stdint.h>
#include "internal.h"

enum { GE_END, GE_ALT, GE_REF, GE_SET };

typedef struct gelem {
  uint32_t type : 2;
  uint32_t v : 30;         /* GE_REF: the rule; GE_SET: the set */
} gelem;

typedef struct gbyteset { uint32_t w[8]; } gbyteset;

static inline int gset_has(const gbyteset *s, unsigned b) { return (s->w[b >> 5] >> (b & 31)) & 1; }

struct gptoss_grammar {
  atomic_int refs;
  gelem *e;                /* every rule's elements, then [REF root, END]: where matching starts */
  uint32_t n_e, start;
  uint32_t *rule_at;       /* [n_rules]: a rule's first element */
  uint32_t n_rules;
  gbyteset *sets;
  uint32_t n_sets;
  uint32_t *rule_of;       /* [n_e]: the rule an element is in (n_rules for the start pair) */
  uint8_t *rule_kind;      /* [n_rules + 1]: GR_*, who made the rule */
  uint8_t cls[256];        /* bytes no set tells apart share a class: the matcher's unit */
  uint8_t cls_byte[256];   /* [n_cls]: a byte of each class */
  uint32_t n_cls;
};

/* a rule is the user's, or the parser's: a link of a repetition's chain, or a group or class */
enum { GR_NAMED, GR_MADE, GR_REPEAT };

/* the end of an alternative: no element follows in the sequence */
static inline int gelem_ends(const gelem *e) { return e->type == GE_END || e->type == GE_ALT; }

/* {====================================================== matcher insides */
/* The vocabulary's token bytes as a trie, flat in depth-first order. */
struct gptoss_vocab {
  atomic_int refs;
  int V;                       /* ids 0..V-1 */
  uint32_t n;                  /* trie nodes, depth-first */
  uint8_t *byte;
  uint16_t *depth;             /* 0 for a first byte */
  uint32_t *skip;              /* the node after this one's subtree */
  /* the bit a walk sets at this node: the token ending here, or pad when
     none (a set with a word to spare takes it, and no branch is missed);
     the top bit: more tokens have these bytes, along dup */
  uint32_t *tok;
  uint32_t pad;                /* the first bit past the vocabulary's words */
  int32_t *dup;                /* [V]: the next token with the same bytes, or -1 */
  uint32_t *off;               /* [V + 1]: token bytes in text (specials: none) */
  char *text;
  int max_depth;
  struct gmask_cache *cache;   /* local grammars' entries, for every matcher (grammar_local.c) */
};

/* A state is its stacks, each [len, position...] bottom to top, in a
   canonical order, stored once in the pool. State 0 is the dead one. What
   walks read per trie node (successors, accepting) is in arrays of its own. */
typedef struct dstate {
  uint32_t off, words;         /* in pool */
  uint64_t hash;
} dstate;

typedef struct wvec { uint32_t *v; size_t n, cap; } wvec;

#define MASK_CACHE 8           /* masks kept, by state */

struct gptoss_matcher {
  gptoss_grammar *g;
  gptoss_vocab *voc;
  int32_t *end_ids;
  int n_end;
  dstate *st;
  int32_t *next;               /* [cap_st * n_cls]: successor per byte class, -1 = not yet known */
  uint8_t *accepting;          /* [cap_st]: the state holds an empty stack, the grammar may end here */
  uint32_t n_st, cap_st, n_cls;
  wvec pool;
  uint32_t *ht;                /* open addressing: state id + 1, 0 = empty */
  uint32_t ht_cap;
  uint32_t cur;
  int ended;                   /* an end id was accepted */
  wvec out, tmp;               /* scratch of a transition: stacks found, one stack being expanded */
  uint32_t *order;             /* scratch: offsets of the stacks in out */
  uint32_t *walk;              /* [max_depth + 1]: the state at each trie depth */
  uint32_t *bits;              /* [words]: apply's mask */
  struct { uint32_t state; uint32_t *bits; } cache[MASK_CACHE];
  int fail;                    /* a transition failed (memory, ambiguity): gptoss_errmsg says */
  uint64_t work;               /* stack steps of the mask being computed (MASK_BUDGET) */
  struct gmask_scratch *ms;    /* grammar_mask.c's scratch, made on the first split */
  struct glocal_scratch *ls;   /* grammar_local.c's, made on the first local grammar */
};

/* the words of a walk's bitset: the vocabulary's and one for pad */
static inline size_t gvocab_words(const gptoss_vocab *v) { return (size_t)((v->V + 31) / 32) + 1; }

/* sets the bits of the tokens ending at node (bits |=, gvocab_words long) */
static inline void gvocab_set(const gptoss_vocab *v, uint32_t node, uint32_t *bits) {
  uint32_t x = v->tok[node], id = x & 0x7fffffffu;
  bits[id >> 5] |= 1u << (id & 31);
  if (x >> 31)
    for (int32_t d = v->dup[id]; d >= 0; d = v->dup[d]) bits[d >> 5] |= 1u << (d & 31);
}

/* grammar.c */
int gm_push(wvec *w, uint32_t x);
int gm_expand(gptoss_matcher *M, size_t base);    /* the stack in tmp[base..], expanded into out */
int64_t gm_intern(gptoss_matcher *M);             /* the state of the stacks in out */
int64_t gm_step_miss(gptoss_matcher *M, uint32_t s, unsigned b, int classes);
gptoss_status gm_compact(gptoss_matcher *M);      /* the memo, started over when too large */

/* the state after byte b in state s: -1 failed (gptoss_errmsg), 0 dead */
static inline int64_t gm_step(gptoss_matcher *M, uint32_t s, unsigned b) {
  int32_t t = M->next[(size_t)s * M->n_cls + M->g->cls[b]];
  return t >= 0 ? t : gm_step_miss(M, s, b, 1);
}

/* What a local grammar (a stack's top frames alone, grammar_local.c)
   makes of the vocabulary, immutable once made. */
typedef struct gm_entry {
  atomic_int refs;
  uint64_t hash;
  uint32_t *key, key_n;        /* the local grammar's shape */
  int overflow;                /* too many exits: its stacks are walked instead */
  uint32_t n_ids;              /* tokens it accepts ... */
  uint32_t *ids;               /* ... as ascending ids when few */
  uint32_t *bits;              /* ... or as a bitset */
  uint32_t exit_at[257];       /* exit nodes by byte: exit[exit_at[b] .. exit_at[b + 1]) */
  uint32_t *exit;
  gbyteset goes_on;            /* bytes it also goes on with where it can end (grammar_mask.c's use_entry) */
  size_t bytes;
  struct gm_entry *chain, *older, *newer;   /* the cache's */
} gm_entry;

/* grammar_local.c */
struct gmask_cache *gm_cache_new(void);
void gm_cache_free(struct gmask_cache *c);
void gm_local_free(struct glocal_scratch *s);
void gm_entry_unref(gm_entry *e);
/* the entry of the local grammar of state s: kept (*e NULL when not), or made */
gptoss_status gm_local_kept(gptoss_matcher *M, uint32_t s, gm_entry **e);
gm_entry *gm_local_make(gptoss_matcher *M, uint32_t s);

/* grammar_mask.c */
void gm_scratch_free(struct gmask_scratch *s);
/* }====================================================== */

#endif
