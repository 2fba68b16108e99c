/*
** grammar.h: a compiled GBNF grammar, as gbnf.c leaves it for grammar.c.
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
};

/* the end of an alternative: no element follows in the sequence */
static inline int gelem_ends(const gelem *e) { return e->type == GE_END || e->type == GE_ALT; }

#endif
