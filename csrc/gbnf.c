/*
** gbnf.c: llama.cpp's GBNF grammar format, parsed into grammar.h's rules.
**
**   rule    ::= name "::=" alternates (a newline ends it, outside brackets)
**   alternates: sequences separated by "|" (a "|" may start the next line)
**   atoms:  "literal"  [class]  [^negated]  .  name  ( alternates )
**   postfix: *  +  ?  {m}  {m,}  {m,n}  {,n}      # comments to the line's end
**
** Escapes in literals and classes: \n \r \t \\ \" \[ \] \- \xHH \uHHHH
** \UHHHHHHHH. Repetitions and groups become synthetic rules (x* is
** R ::= x R | empty, a right recursion that leaves the matcher's stacks
** flat), classes become byte sets over UTF-8. A grammar must not be left
** recursive (the matcher would expand such a rule forever): that is
** refused, naming the rule.
*/
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "grammar.h"
#include "utf8.h"

#define MAX_REPEAT 10000       /* {m,n}: bounds beyond are refused */
#define MAX_RULES (1u << 24)
#define MAX_NESTING 200       /* ( ... ) and classes being built: bounds the parser's recursion */

typedef struct evec { gelem *v; uint32_t n, cap; } evec;

typedef struct prule {
  char *name;
  evec body;
  int defined;
  int repeats;                 /* one link of a repetition's chain (x*, x{m,n}) */
  const char *used_at;         /* first reference, for "undefined rule" */
} prule;

typedef struct parser {
  const char *src, *p, *end;
  const char *rule;            /* the rule being parsed, for messages */
  prule *rules;
  uint32_t n_rules, cap_rules;
  gbyteset *sets;
  uint32_t n_sets, cap_sets;
  int32_t byte_set[256];       /* a singleton set per byte, made once */
  uint32_t synth;              /* counter naming synthetic rules */
  jmp_buf fail;
  gptoss_status code;
  void *scratch, *scratch2;    /* freed when parsing fails */
  /* element lists being filled before a rule owns them (bodies of rules and
     groups, a class's sequences): here, not in locals, so that a failure
     (longjmp) frees them; their count is the nesting depth */
  evec open[MAX_NESTING];
  int n_open;
  gptoss_grammar *g;           /* the result, being assembled */
  const char *root;            /* the start rule's name */
  uint8_t *marks;              /* nullable rules and the left-recursion search's marks */
} parser;

/* {====================================================== errors and storage */
static void line_col(const parser *P, const char *at, int *line, int *col) {
  *line = 1; *col = 1;
  for (const char *q = P->src; q < at && q < P->end; q++) {
    if (*q == '\n') { (*line)++; *col = 1; } else (*col)++;
  }
}

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4), noreturn))
#endif
static void fail_at(parser *P, const char *at, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  int line, col;
  line_col(P, at, &line, &col);
  if (P->rule) gptoss_fail(GPTOSS_EARG, "grammar: line %d col %d: %s (in rule '%s')", line, col, msg, P->rule);
  else gptoss_fail(GPTOSS_EARG, "grammar: line %d col %d: %s", line, col, msg);
  P->code = GPTOSS_EARG;
  longjmp(P->fail, 1);
}

static void nomem(parser *P) {
  P->code = gptoss_fail(GPTOSS_ENOMEM, "grammar: out of memory");
  longjmp(P->fail, 1);
}

static void grow(parser *P, void **v, uint32_t *cap, uint32_t need, size_t size) {
  if (need <= *cap) return;
  uint32_t c = *cap ? *cap : 16;
  while (c < need) c *= 2;
  void *n = realloc(*v, size * c);
  if (!n) nomem(P);
  *v = n;
  *cap = c;
}

static evec *open_vec(parser *P, const char *at) {
  if (P->n_open == MAX_NESTING) fail_at(P, at, "nesting deeper than %d", MAX_NESTING);
  evec *v = &P->open[P->n_open++];
  memset(v, 0, sizeof *v);
  return v;
}

/* the innermost open list, handed to its owner */
static evec close_vec(parser *P) { return P->open[--P->n_open]; }

static void push(parser *P, evec *v, unsigned type, uint32_t x) {
  grow(P, (void **)&v->v, &v->cap, v->n + 1, sizeof(gelem));
  v->v[v->n].type = type;
  v->v[v->n++].v = x;
}

static void append(parser *P, evec *v, const gelem *src, uint32_t n) {
  grow(P, (void **)&v->v, &v->cap, v->n + n, sizeof(gelem));
  memcpy(v->v + v->n, src, sizeof(gelem) * n);
  v->n += n;
}

static uint32_t add_set(parser *P, const gbyteset *s) {
  grow(P, (void **)&P->sets, &P->cap_sets, P->n_sets + 1, sizeof(gbyteset));
  P->sets[P->n_sets] = *s;
  return P->n_sets++;
}

static uint32_t byte_set(parser *P, unsigned b) {
  if (P->byte_set[b] < 0) {
    gbyteset s = {{0}};
    s.w[b >> 5] |= 1u << (b & 31);
    P->byte_set[b] = (int32_t)add_set(P, &s);
  }
  return (uint32_t)P->byte_set[b];
}

/* the rule named name[0..len), made (undefined) when new */
static uint32_t rule_id(parser *P, const char *name, size_t len, const char *at) {
  for (uint32_t i = 0; i < P->n_rules; i++)
    if (strlen(P->rules[i].name) == len && memcmp(P->rules[i].name, name, len) == 0) return i;
  if (P->n_rules >= MAX_RULES) fail_at(P, at, "too many rules");
  grow(P, (void **)&P->rules, &P->cap_rules, P->n_rules + 1, sizeof(prule));
  prule *r = &P->rules[P->n_rules];
  memset(r, 0, sizeof *r);
  if (!(r->name = malloc(len + 1))) nomem(P);
  memcpy(r->name, name, len);
  r->name[len] = 0;
  r->used_at = at;
  return P->n_rules++;
}

/* a new rule of the parser's making, named after the rule it serves */
static uint32_t synth_rule(parser *P) {
  /* the count first: a long rule name cut short by the buffer can never
     make two synthetic rules one (that lost a body once) */
  char name[96];
  snprintf(name, sizeof name, "~%u~%s", ++P->synth, P->rule ? P->rule : "");
  uint32_t id = rule_id(P, name, strlen(name), P->p);
  P->rules[id].defined = 1;
  return id;
}
/* }====================================================== */

/* {====================================================== lexing */
static int is_word(int c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'; }

static void skip_space(parser *P, int newline_ok) {
  while (P->p < P->end) {
    char c = *P->p;
    if (c == ' ' || c == '\t') P->p++;
    else if (c == '#') { while (P->p < P->end && *P->p != '\n') P->p++; }
    else if ((c == '\n' || c == '\r') && newline_ok) P->p++;
    else break;
  }
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* one code point of a literal or class, escapes decoded */
static uint32_t read_char(parser *P) {
  const char *at = P->p;
  if (P->p >= P->end) fail_at(P, at, "unexpected end of grammar");
  if (*P->p != '\\') {
    uint32_t cp;
    int n = gptoss_utf8_decode((const unsigned char *)P->p, (size_t)(P->end - P->p), &cp);
    if (n == 0) fail_at(P, at, "invalid UTF-8");
    P->p += n;
    return cp;
  }
  P->p++;
  if (P->p >= P->end) fail_at(P, at, "unexpected end of grammar after '\\'");
  char c = *P->p++;
  int digits = 0;
  switch (c) {
  case 'n': return '\n';
  case 'r': return '\r';
  case 't': return '\t';
  case '\\': case '"': case '[': case ']': case '-': case '\'': case '^': return (uint32_t)c;
  case 'x': digits = 2; break;
  case 'u': digits = 4; break;
  case 'U': digits = 8; break;
  default: fail_at(P, at, "unknown escape '\\%c'", c);
  }
  uint32_t v = 0;
  for (int i = 0; i < digits; i++) {
    int h = P->p < P->end ? hexval(*P->p) : -1;
    if (h < 0) fail_at(P, at, "escape '\\%c' needs %d hex digits", c, digits);
    v = v * 16 + (uint32_t)h;
    P->p++;
  }
  if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) fail_at(P, at, "escape names no Unicode scalar value (0x%X)", (unsigned)v);
  return v;
}

static int utf8_encode(uint32_t cp, unsigned char *b) {
  if (cp < 0x80) { b[0] = (unsigned char)cp; return 1; }
  if (cp < 0x800) { b[0] = (unsigned char)(0xC0 | cp >> 6); b[1] = (unsigned char)(0x80 | (cp & 63)); return 2; }
  if (cp < 0x10000) {
    b[0] = (unsigned char)(0xE0 | cp >> 12); b[1] = (unsigned char)(0x80 | ((cp >> 6) & 63));
    b[2] = (unsigned char)(0x80 | (cp & 63)); return 3;
  }
  b[0] = (unsigned char)(0xF0 | cp >> 18); b[1] = (unsigned char)(0x80 | ((cp >> 12) & 63));
  b[2] = (unsigned char)(0x80 | ((cp >> 6) & 63)); b[3] = (unsigned char)(0x80 | (cp & 63));
  return 4;
}
/* }====================================================== */

/* {====================================================== character classes */
/* A set of code points becomes byte sequences: the ASCII part one byte set,
   every other range split until each piece is a product of byte ranges
   (the method of RE2's and Rust regex's UTF-8 compilers). */
typedef struct crange { uint32_t lo, hi; } crange;

typedef struct cclass {
  gbyteset ascii;
  evec *alts;                  /* non-ASCII sequences, each ended by GE_ALT (an open list) */
} cclass;

static void set_range(gbyteset *s, unsigned lo, unsigned hi) {
  for (unsigned b = lo; b <= hi; b++) s->w[b >> 5] |= 1u << (b & 31);
}

static void utf8_ranges(parser *P, cclass *c, uint32_t lo, uint32_t hi) {
  static const uint32_t bound[] = {0x7F, 0x7FF, 0xFFFF};
  if (lo > hi) return;
  for (int i = 0; i < 3; i++)
    if (lo <= bound[i] && hi > bound[i]) {
      utf8_ranges(P, c, lo, bound[i]);
      utf8_ranges(P, c, bound[i] + 1, hi);
      return;
    }
  if (hi <= 0x7F) { set_range(&c->ascii, lo, hi); return; }
  unsigned char a[4], b[4];
  int n = utf8_encode(lo, a);
  utf8_encode(hi, b);
  for (int i = 1; i < n; i++) {
    uint32_t m = (1u << (6 * i)) - 1;
    if ((lo & ~m) != (hi & ~m)) {
      if ((lo & m) != 0) { utf8_ranges(P, c, lo, lo | m); utf8_ranges(P, c, (lo | m) + 1, hi); return; }
      if ((hi & m) != m) { utf8_ranges(P, c, lo, (hi & ~m) - 1); utf8_ranges(P, c, hi & ~m, hi); return; }
    }
  }
  for (int i = 0; i < n; i++) {
    gbyteset s = {{0}};
    set_range(&s, a[i], b[i]);
    push(P, c->alts, GE_SET, add_set(P, &s));
  }
  push(P, c->alts, GE_ALT, 0);
}

static int cmp_range(const void *x, const void *y) {
  const crange *a = x, *b = y;
  return a->lo < b->lo ? -1 : a->lo > b->lo;
}

/* the code points of ranges (negated when asked), as elements appended to out */
static void emit_class(parser *P, evec *out, crange *r, int n, int negate) {
  if (n) qsort(r, (size_t)n, sizeof *r, cmp_range);   /* [^] has none: r is NULL */
  int k = 0;
  for (int i = 0; i < n; i++) {   /* merge overlapping and adjacent */
    if (k && r[i].lo <= r[k - 1].hi + 1) { if (r[i].hi > r[k - 1].hi) r[k - 1].hi = r[i].hi; }
    else r[k++] = r[i];
  }
  crange *pos = r;
  if (negate) {   /* the complement, over all code points */
    if (!(pos = P->scratch2 = malloc(sizeof *pos * (size_t)(k + 1)))) nomem(P);
    uint32_t next = 0;
    int m = 0;
    for (int i = 0; i < k; i++) {
      if (r[i].lo > next) { pos[m].lo = next; pos[m++].hi = r[i].lo - 1; }
      next = r[i].hi + 1;
    }
    if (next <= 0x10FFFF) { pos[m].lo = next; pos[m++].hi = 0x10FFFF; }
    k = m;
  }
  cclass c;
  memset(&c, 0, sizeof c);
  c.alts = open_vec(P, P->p);
  for (int i = 0; i < k; i++) {   /* surrogates are no characters */
    uint32_t lo = pos[i].lo, hi = pos[i].hi;
    if (lo < 0xD800) utf8_ranges(P, &c, lo, hi < 0xD7FF ? hi : 0xD7FF);
    if (hi > 0xDFFF) utf8_ranges(P, &c, lo > 0xE000 ? lo : 0xE000, hi);
  }
  if (negate) { free(pos); P->scratch2 = NULL; }
  int has_ascii = 0;
  for (int i = 0; i < 4; i++) has_ascii |= c.ascii.w[i] != 0;
  if (!c.alts->n) {
    if (!has_ascii) fail_at(P, P->p, "empty character class");
    push(P, out, GE_SET, add_set(P, &c.ascii));
    free(close_vec(P).v);
    return;
  }
  uint32_t id = synth_rule(P);
  evec *body = &P->rules[id].body;
  if (has_ascii) { push(P, body, GE_SET, add_set(P, &c.ascii)); push(P, body, GE_ALT, 0); }
  append(P, body, c.alts->v, c.alts->n);
  body->v[body->n - 1].type = GE_END;
  free(close_vec(P).v);
  push(P, out, GE_REF, id);
}

static void parse_class(parser *P, evec *out) {
  const char *at = P->p;
  P->p++;   /* [ */
  int negate = 0;
  if (P->p < P->end && *P->p == '^') { negate = 1; P->p++; }
  crange *r = NULL;
  uint32_t n = 0, cap = 0;
  P->scratch = NULL;
  while (P->p < P->end && *P->p != ']') {
    crange x;
    x.lo = x.hi = read_char(P);
    if (P->p + 1 < P->end && *P->p == '-' && P->p[1] != ']') {
      P->p++;
      x.hi = read_char(P);
      if (x.hi < x.lo) { fail_at(P, at, "character range is backwards (U+%04X-U+%04X)", (unsigned)x.lo, (unsigned)x.hi); }
    }
    grow(P, &P->scratch, &cap, n + 1, sizeof *r);
    r = P->scratch;
    r[n++] = x;
  }
  if (P->p >= P->end) fail_at(P, at, "unterminated character class");
  P->p++;   /* ] */
  if (!n && !negate) fail_at(P, at, "empty character class");
  emit_class(P, out, r, (int)n, negate);
  P->scratch = NULL;
  free(r);
}
/* }====================================================== */

/* {====================================================== rules */
static void parse_alternates(parser *P, evec *out, int nested);

/* the atom out[from..] as one element: itself, or a rule made of it */
static gelem as_one(parser *P, evec *out, uint32_t from) {
  gelem g;
  if (out->n - from == 1) return out->v[from];
  uint32_t id = synth_rule(P);
  evec *body = &P->rules[id].body;
  append(P, body, out->v + from, out->n - from);
  push(P, body, GE_END, 0);
  g.type = GE_REF; g.v = id;
  return g;
}

/* R ::= x R | empty (x*), or R ::= x | empty (x?) */
static gelem repeat_rule(parser *P, gelem x, int star) {
  uint32_t id = synth_rule(P);
  P->rules[id].repeats = 1;
  evec *body = &P->rules[id].body;
  push(P, body, x.type, x.v);
  if (star) push(P, body, GE_REF, id);
  push(P, body, GE_ALT, 0);
  push(P, body, GE_END, 0);
  gelem g = {GE_REF, id};
  return g;
}

static int read_int(parser *P) {
  const char *at = P->p;
  long v = 0;
  if (P->p >= P->end || *P->p < '0' || *P->p > '9') fail_at(P, at, "a number expected in {m,n}");
  while (P->p < P->end && *P->p >= '0' && *P->p <= '9') {
    v = v * 10 + (*P->p++ - '0');
    if (v > MAX_REPEAT) fail_at(P, at, "repetition count above %d", MAX_REPEAT);
  }
  return (int)v;
}

/* applies *, +, ?, {m,n} to the atom at out[from..] */
static void postfix(parser *P, evec *out, uint32_t from) {
  const char *at = P->p;
  char op = *P->p++;
  int lo, hi;   /* hi < 0: unbounded */
  if (op == '*') { lo = 0; hi = -1; }
  else if (op == '+') { lo = 1; hi = -1; }
  else if (op == '?') { lo = 0; hi = 1; }
  else {
    skip_space(P, 1);
    lo = (P->p < P->end && *P->p == ',') ? 0 : read_int(P);
    skip_space(P, 1);
    if (P->p < P->end && *P->p == ',') {
      P->p++;
      skip_space(P, 1);
      hi = (P->p < P->end && *P->p == '}') ? -1 : read_int(P);
      skip_space(P, 1);
    } else hi = lo;
    if (P->p >= P->end || *P->p != '}') fail_at(P, at, "'}' expected to close the repetition");
    P->p++;
    if (hi >= 0 && hi < lo) fail_at(P, at, "repetition {%d,%d} has its maximum below its minimum", lo, hi);
  }
  gelem x = as_one(P, out, from);
  out->n = from;
  for (int i = 0; i < lo; i++) push(P, out, x.type, x.v);
  if (hi < 0) { gelem r = repeat_rule(P, x, 1); push(P, out, r.type, r.v); return; }
  /* up to hi - lo more, nested: (x (x ...)?)? */
  if (hi == lo) return;
  gelem opt = repeat_rule(P, x, 0);
  for (int i = lo + 1; i < hi; i++) {
    uint32_t id = synth_rule(P);
    P->rules[id].repeats = 1;
    evec *body = &P->rules[id].body;
    push(P, body, x.type, x.v);
    push(P, body, opt.type, opt.v);
    push(P, body, GE_ALT, 0);
    push(P, body, GE_END, 0);
    opt.type = GE_REF; opt.v = id;
  }
  push(P, out, opt.type, opt.v);
}

static void parse_sequence(parser *P, evec *out, int nested) {
  for (;;) {
    skip_space(P, nested);
    if (P->p >= P->end) return;
    char c = *P->p;
    uint32_t from = out->n;
    const char *at = P->p;
    if (c == '"') {
      P->p++;
      while (P->p < P->end && *P->p != '"') {
        unsigned char b[4];
        int n = utf8_encode(read_char(P), b);
        for (int i = 0; i < n; i++) push(P, out, GE_SET, byte_set(P, b[i]));
      }
      if (P->p >= P->end) fail_at(P, at, "unterminated literal");
      P->p++;
      if (out->n == from) continue;   /* "": matches the empty string */
    } else if (c == '[') parse_class(P, out);
    else if (c == '.') {
      crange any = {0, 0x10FFFF};
      P->p++;
      emit_class(P, out, &any, 1, 0);
    } else if (c == '(') {
      P->p++;
      uint32_t id = synth_rule(P);
      parse_alternates(P, open_vec(P, at), 1);
      skip_space(P, 1);
      if (P->p >= P->end || *P->p != ')') fail_at(P, at, "unclosed '('");
      P->rules[id].body = close_vec(P);   /* (id's entry may have moved: rules grow) */
      P->p++;
      push(P, out, GE_REF, id);
    } else if (is_word((unsigned char)c)) {
      const char *s = P->p;
      while (P->p < P->end && is_word((unsigned char)*P->p)) P->p++;
      push(P, out, GE_REF, rule_id(P, s, (size_t)(P->p - s), s));
    } else if (c == '|' || c == ')' || c == '\n' || c == '\r') return;
    else if (c == '*' || c == '+' || c == '?' || c == '{') fail_at(P, at, "'%c' follows nothing to repeat", c);
    else fail_at(P, at, "unexpected character '%c'", c);
    skip_space(P, nested);
    while (P->p < P->end && (*P->p == '*' || *P->p == '+' || *P->p == '?' || *P->p == '{')) {
      postfix(P, out, from);
      skip_space(P, nested);
    }
  }
}

static void parse_alternates(parser *P, evec *out, int nested) {
  for (;;) {
    parse_sequence(P, out, nested);
    if (!nested) {   /* a "|" starting the next line continues the rule */
      const char *keep = P->p;
      skip_space(P, 1);
      if (P->p >= P->end || *P->p != '|') P->p = keep;
    }
    if (P->p >= P->end || *P->p != '|') break;
    P->p++;
    skip_space(P, 1);
    push(P, out, GE_ALT, 0);
  }
  push(P, out, GE_END, 0);
}

static void parse_rules(parser *P) {
  skip_space(P, 1);
  while (P->p < P->end) {
    const char *s = P->p;
    while (P->p < P->end && is_word((unsigned char)*P->p)) P->p++;
    if (P->p == s) fail_at(P, s, "a rule name expected");
    uint32_t id = rule_id(P, s, (size_t)(P->p - s), s);
    P->rule = P->rules[id].name;
    if (P->rules[id].defined) fail_at(P, s, "rule '%s' is defined twice", P->rules[id].name);
    P->rules[id].defined = 1;
    skip_space(P, 0);
    if (P->end - P->p < 3 || memcmp(P->p, "::=", 3) != 0) fail_at(P, P->p, "'::=' expected after the rule's name");
    P->p += 3;
    skip_space(P, 1);
    parse_alternates(P, open_vec(P, s), 0);
    P->rules[id].body = close_vec(P);   /* (id's entry may have moved: rules grow) */
    if (P->p < P->end && *P->p == ')') fail_at(P, P->p, "unmatched ')'");
    P->rule = NULL;
    skip_space(P, 1);
  }
}
/* }====================================================== */

/* {====================================================== checks and assembly */
/* nullable[r]: rule r matches the empty string (a fixpoint) */
static void find_nullable(const gptoss_grammar *g, uint8_t *nullable) {
  for (int changed = 1; changed;) {
    changed = 0;
    for (uint32_t r = 0; r < g->n_rules; r++) {
      if (nullable[r]) continue;
      int all = 1;
      for (const gelem *e = g->e + g->rule_at[r];; e++) {
        if (e->type == GE_SET || (e->type == GE_REF && !nullable[e->v])) all = 0;
        if (gelem_ends(e)) {
          if (all) { nullable[r] = 1; changed = 1; break; }
          if (e->type == GE_END) break;
          all = 1;
        }
      }
    }
  }
}

/* depth-first over "r can start with a reference to x": a cycle is left recursion */
static int left_cycle(const gptoss_grammar *g, const uint8_t *nullable, uint8_t *mark, uint32_t r, uint32_t *at) {
  if (mark[r] == 1) { *at = r; return 1; }
  if (mark[r] == 2) return 0;
  mark[r] = 1;
  int skip = 0;   /* past the first non-nullable element of this alternative */
  for (const gelem *e = g->e + g->rule_at[r];; e++) {
    if (gelem_ends(e)) { if (e->type == GE_END) break; skip = 0; continue; }
    if (skip) continue;
    if (e->type == GE_SET) { skip = 1; continue; }
    if (left_cycle(g, nullable, mark, e->v, at)) return 1;
    if (!nullable[e->v]) skip = 1;
  }
  mark[r] = 2;
  return 0;
}

static void free_parser(parser *P) {
  for (uint32_t i = 0; i < P->n_rules; i++) { free(P->rules[i].name); free(P->rules[i].body.v); }
  free(P->rules);
  free(P->sets);
}

void gptoss_grammar_free(gptoss_grammar *g) {
  if (!g || atomic_fetch_sub(&g->refs, 1) > 1) return;
  free(g->e);
  free(g->rule_at);
  free(g->sets);
  free(g->rule_of);
  free(g->rule_kind);
  free(g);
}

gptoss_grammar *gptoss_grammar_ref(gptoss_grammar *g) {
  atomic_fetch_add(&g->refs, 1);
  return g;
}

/* Bytes every set holds or lacks together are one class: the matcher's
   tables are per class, not per byte (a JSON grammar has 6 to 60). */
static void byte_classes(gptoss_grammar *g) {
  memset(g->cls, 0, sizeof g->cls);
  g->n_cls = 1;
  for (uint32_t s = 0; s < g->n_sets && g->n_cls < 256; s++) {
    int16_t split[512];   /* (old class, in the set) -> new class */
    uint32_t n = 0;
    for (int i = 0; i < 512; i++) split[i] = -1;
    for (unsigned b = 0; b < 256; b++) {
      int key = g->cls[b] * 2 + gset_has(&g->sets[s], b);
      if (split[key] < 0) split[key] = (int16_t)n++;
      g->cls[b] = (uint8_t)split[key];
    }
    g->n_cls = n;
  }
  for (int b = 255; b >= 0; b--) g->cls_byte[g->cls[b]] = (uint8_t)b;
}

/* everything after the parse: checks, then the rules laid end to end */
static gptoss_grammar *assemble(parser *P, const char *root) {
  for (uint32_t i = 0; i < P->n_rules; i++)
    if (!P->rules[i].defined) fail_at(P, P->rules[i].used_at, "undefined rule '%s'", P->rules[i].name);
  uint32_t root_id = P->n_rules;
  for (uint32_t i = 0; i < P->n_rules; i++) if (strcmp(P->rules[i].name, root) == 0) root_id = i;
  if (root_id == P->n_rules) {
    P->code = gptoss_fail(GPTOSS_EARG, "grammar: no rule named '%s' (the start rule)", root);
    longjmp(P->fail, 1);
  }
  gptoss_grammar *g = P->g = calloc(1, sizeof *g);
  if (!g) nomem(P);
  atomic_init(&g->refs, 1);
  uint32_t total = 2;
  for (uint32_t i = 0; i < P->n_rules; i++) total += P->rules[i].body.n;
  g->e = malloc(sizeof(gelem) * total);
  g->rule_at = malloc(sizeof(uint32_t) * P->n_rules);
  g->rule_of = malloc(sizeof(uint32_t) * total);
  g->rule_kind = malloc(P->n_rules + 1);
  if (!g->e || !g->rule_at || !g->rule_of || !g->rule_kind) nomem(P);
  g->n_rules = P->n_rules;
  for (uint32_t i = 0; i < P->n_rules; i++) {
    g->rule_at[i] = g->n_e;
    /* synth_rule's names start so, a user's cannot */
    g->rule_kind[i] = P->rules[i].name[0] != '~' ? GR_NAMED : P->rules[i].repeats ? GR_REPEAT : GR_MADE;
    memcpy(g->e + g->n_e, P->rules[i].body.v, sizeof(gelem) * P->rules[i].body.n);
    for (uint32_t k = 0; k < P->rules[i].body.n; k++) g->rule_of[g->n_e + k] = i;
    g->n_e += P->rules[i].body.n;
  }
  g->rule_kind[P->n_rules] = GR_NAMED;
  g->rule_of[g->n_e] = g->rule_of[g->n_e + 1] = P->n_rules;
  g->start = g->n_e;
  g->e[g->n_e].type = GE_REF; g->e[g->n_e++].v = root_id;
  g->e[g->n_e].type = GE_END; g->e[g->n_e++].v = 0;
  g->sets = P->sets; g->n_sets = P->n_sets;
  P->sets = NULL;
  byte_classes(g);
  uint8_t *marks = P->marks = calloc(2, g->n_rules);
  if (!marks) nomem(P);
  find_nullable(g, marks);
  uint32_t at = 0;
  for (uint32_t r = 0; r < g->n_rules; r++)
    if (left_cycle(g, marks, marks + g->n_rules, r, &at)) {
      const char *name = P->rules[at].name;   /* a synthetic rule is named after its user's */
      P->code = gptoss_fail(GPTOSS_EARG, "grammar: rule '%.*s' is left recursive (it can reach itself before any character)",
                            (int)strcspn(name, "~"), name);
      longjmp(P->fail, 1);
    }
  free(marks);
  P->marks = NULL;
  P->g = NULL;
  return g;
}

gptoss_status gptoss_grammar_parse(const char *text, size_t len, const char *root, gptoss_grammar **out) {
  *out = NULL;
  parser P;
  memset(&P, 0, sizeof P);
  P.src = P.p = text;
  P.end = text + len;
  P.root = root ? root : "root";
  for (int i = 0; i < 256; i++) P.byte_set[i] = -1;
  if (setjmp(P.fail)) {   /* what is allocated lives in P: locals may not survive longjmp */
    free(P.marks);
    free(P.scratch);
    free(P.scratch2);
    for (int i = 0; i < P.n_open; i++) free(P.open[i].v);
    gptoss_grammar_free(P.g);
    free_parser(&P);
    return P.code;
  }
  parse_rules(&P);
  *out = assemble(&P, P.root);
  free_parser(&P);
  return GPTOSS_OK;
}
/* }====================================================== */
