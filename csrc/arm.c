/*
** arm.c: harmony-aware constraints. An arm is a grammar for the body of
** one kind of harmony message, named by the channel or recipient of its
** header; a sampler with arms reads each header the history closes and
** masks the message that follows with the arm it names, if any.
**
** Headers are read as harmony's parser reads them (harmony.lua's
** parse_header, the chat API's lenient parser), so that a message the
** parser reports as a call to functions.get_weather is the one the sampler
** held to get_weather's schema, however odd the header the model wrote.
**
** The sampler learns where it is from the history alone: a history one
** token longer than the last, ending in the token it sampled, continues
** the last step (an O(1) check, and a header read after each <|message|>);
** any other (the first sample, a rewind, a prompt fed) is read afresh from
** its last message boundary, replaying into the matcher the part of a
** message body the prompt already holds.
*/
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "arm.h"

/* {====================================================== headers */
struct gptoss_headers {
  atomic_int refs;
  int V;
  uint32_t *off;               /* [V + 1]: token bytes in text */
  char *text;
  int32_t start, message;      /* <|start|>, <|message|> */
  int32_t stop[3];             /* <|end|>, <|return|>, <|call|> (-1 when absent) */
};

gptoss_headers *gptoss_headers_ref(gptoss_headers *h) {
  atomic_fetch_add(&h->refs, 1);
  return h;
}

void gptoss_headers_free(gptoss_headers *h) {
  if (!h || atomic_fetch_sub(&h->refs, 1) > 1) return;
  free(h->off);
  free(h->text);
  free(h);
}

gptoss_status gptoss_headers_new(const gptoss_tokenizer *t, int V, gptoss_headers **out) {
  *out = NULL;
  if (!t) return gptoss_fail(GPTOSS_EARG, "headers: no tokenizer");
  if (V <= 0) return gptoss_fail(GPTOSS_EARG, "headers: vocab must be > 0 (got %d)", V);
  int32_t start = gptoss_special_id(t, "<|start|>"), message = gptoss_special_id(t, "<|message|>");
  if (start < 0 || message < 0 || start >= V || message >= V)
    return gptoss_fail(GPTOSS_EARG, "headers: the tokenizer has no harmony <|start|> and <|message|> in its first %d ids", V);
  gptoss_headers *h = calloc(1, sizeof *h);
  if (!h || !(h->off = malloc(sizeof(uint32_t) * ((size_t)V + 1)))) goto oom;
  atomic_init(&h->refs, 1);
  h->V = V;
  h->start = start;
  h->message = message;
  const char *stops[3] = { "<|end|>", "<|return|>", "<|call|>" };
  for (int i = 0; i < 3; i++) h->stop[i] = gptoss_special_id(t, stops[i]);
  size_t total = 0;
  for (int32_t id = 0; id < V; id++) {
    size_t len = 0;
    if (gptoss_token_bytes(t, id, &len)) total += len;
  }
  if (total > UINT32_MAX || !(h->text = malloc(total ? total : 1))) goto oom;
  total = 0;
  for (int32_t id = 0; id < V; id++) {
    size_t len = 0;
    const char *b = gptoss_token_bytes(t, id, &len);
    h->off[id] = (uint32_t)total;
    if (b) { memcpy(h->text + total, b, len); total += len; }
  }
  h->off[V] = (uint32_t)total;
  *out = h;
  return GPTOSS_OK;
oom:
  gptoss_headers_free(h);
  return gptoss_fail(GPTOSS_ENOMEM, "headers: out of memory");
}

/* a token that opens or closes a message (the parser's <|start|> and STOP) */
static int boundary(const gptoss_headers *h, int32_t id) {
  return id == h->start || id == h->message || id == h->stop[0] || id == h->stop[1] || id == h->stop[2];
}
/* }====================================================== */

/* {====================================================== reading a header */
typedef struct span { const char *p; size_t n; } span;

static int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

static const char *find(const char *s, size_t n, const char *lit, size_t m) {
  for (size_t i = 0; i + m <= n; i++) if (memcmp(s + i, lit, m) == 0) return s + i;
  return NULL;
}

static int starts(span w, const char *lit) {
  size_t m = strlen(lit);
  return w.n >= m && memcmp(w.p, lit, m) == 0;
}

static int equals(span w, const char *s, size_t n) { return w.n == n && memcmp(w.p, s, n) == 0; }

static const char *const ROLES[] = { "system", "developer", "user", "assistant", "tool", NULL };

#define CHANNEL "<|channel|>"
#define CONSTRAIN "<|constrain|>"

/* harmony.lua's parse_header on text[0..len) (rest, the text without the
   channel, is written to scratch): [text] <|channel|> CHANNEL [text],
   CHANNEL up to whitespace or '<'; then words, a <|constrain|> starting one
   of its own; the role (given, or the first word: a role, or a tool's name
   when more follows); the last word a recipient (to=X) or a content type
   whose recipient is the word before */
static int parse(const char *text, size_t len, const char *role, char *scratch, gptoss_header *out) {
  const char *mk = find(text, len, CHANNEL, sizeof CHANNEL - 1), *end = text + len;
  size_t m = len;
  if (mk) {
    const char *c = mk + sizeof CHANNEL - 1, *e = c;
    while (e < end && !is_space((unsigned char)*e) && *e != '<') e++;
    if (e == c) return 0;   /* "channel marker present but no channel value" */
    out->channel = c;
    out->channel_len = (size_t)(e - c);
    m = (size_t)(mk - text);
    memcpy(scratch, text, m);
    memcpy(scratch + m, e, (size_t)(end - e));
    m += (size_t)(end - e);
  } else {
    memcpy(scratch, text, len);
  }
  span w[GPTOSS_HEADER_MAX / 2 + 1];
  int nw = 0;
  for (size_t i = 0; i < m;) {
    if (is_space((unsigned char)scratch[i])) { i++; continue; }
    size_t b = i++;
    while (i < m && !is_space((unsigned char)scratch[i]) &&
           !(m - i >= sizeof CONSTRAIN - 1 && memcmp(scratch + i, CONSTRAIN, sizeof CONSTRAIN - 1) == 0)) i++;
    w[nw++] = (span){ scratch + b, i - b };
  }
  int first = 0;
  const char *r = role;
  size_t rn = role ? strlen(role) : 0;
  if (!role) {
    if (nw == 0) return 0;   /* "message header did not contain a role" */
    for (int k = 0; ROLES[k] && !r; k++) if (equals(w[0], ROLES[k], strlen(ROLES[k]))) { r = ROLES[k]; rn = strlen(r); }
    if (!r) {
      if (!(nw > 1 || starts(w[0], "to="))) return 0;   /* "unknown role" */
      first = 1;   /* a tool's message: its name, then the rest */
      r = "tool";
      rn = 4;
    }
  }
  if (first < nw && equals(w[first], r, rn)) first++;
  int left = nw - first;
  span to = { NULL, 0 };
  if (left > 0) {
    span last = w[nw - 1];
    if (starts(last, "to=")) to = (span){ last.p + 3, last.n - 3 };
    else if (left == 1 && !starts(last, CONSTRAIN)) to = last;
    else if (left >= 2) {
      span raw = w[nw - 2];   /* last is the content type */
      to = starts(raw, "to=") ? (span){ raw.p + 3, raw.n - 3 } : raw;
    }
  }
  out->recipient = to.p;
  out->recipient_len = to.n;
  return 1;
}

int gptoss_headers_read(const gptoss_headers *h, const int32_t *ids, size_t n, const char *role, gptoss_header *out) {
  out->channel = out->recipient = NULL;
  out->channel_len = out->recipient_len = 0;
  char *text = out->buf;
  size_t len = 0;
  for (size_t i = 0; i < n; i++) {
    if (ids[i] < 0 || ids[i] >= h->V) return 0;
    size_t l = h->off[ids[i] + 1] - h->off[ids[i]];
    if (len + l > GPTOSS_HEADER_MAX) return 0;
    memcpy(text + len, h->text + h->off[ids[i]], l);
    len += l;
  }
  return parse(text, len, role, out->buf + GPTOSS_HEADER_MAX, out);
}
/* }====================================================== */

/* {====================================================== arms */
typedef struct arm {
  char *channel, *recipient;   /* NULL: any */
  gptoss_grammar *g;
  gptoss_vocab *v;
  int32_t *ends;
  int n_end;
} arm;

struct gptoss_arms {
  gptoss_headers *h;
  arm *a;
  int n;
  int active;                  /* the arm whose message is open, -1: none */
  gptoss_matcher *m;           /* its matcher; NULL while active: it could not be made */
  size_t seen;                 /* the history's length at the last sample */
  int32_t last;                /* and the id sampled then */
  int primed;                  /* a sample was taken */
};

static char *dup_str(const char *s) {
  if (!s) return NULL;
  size_t n = strlen(s) + 1;
  char *d = malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

static void drop(gptoss_arms *A) {
  gptoss_matcher_free(A->m);
  A->m = NULL;
  A->active = -1;
}

void gptoss_arms_free(gptoss_arms *A) {
  if (!A) return;
  drop(A);
  for (int i = 0; i < A->n; i++) {
    free(A->a[i].channel);
    free(A->a[i].recipient);
    free(A->a[i].ends);
    gptoss_grammar_free(A->a[i].g);
    gptoss_vocab_free(A->a[i].v);
  }
  free(A->a);
  gptoss_headers_free(A->h);
  free(A);
}

gptoss_status gptoss_arms_add(gptoss_arms **pa, gptoss_headers *h, gptoss_vocab *v, const gptoss_arm *x, int vocab) {
  if (!h || !v || !x || !x->grammar) return gptoss_fail(GPTOSS_EARG, "arm: headers, vocab and grammar are required");
  if (!x->channel && !x->recipient) return gptoss_fail(GPTOSS_EARG, "arm: give a channel or a recipient (or both)");
  if (h->V != vocab || gptoss_vocab_size(v) != vocab)
    return gptoss_fail(GPTOSS_EARG, "arm: headers of %d ids and a vocab of %d for a sampler of %d", h->V, gptoss_vocab_size(v), vocab);
  if (x->n_end < 1 || !x->end_ids) return gptoss_fail(GPTOSS_EARG, "arm: at least one end id is required");
  for (int i = 0; i < x->n_end; i++)
    if (x->end_ids[i] < 0 || x->end_ids[i] >= vocab)
      return gptoss_fail(GPTOSS_EARG, "arm: end id %d is outside the vocabulary (0..%d)", (int)x->end_ids[i], vocab - 1);
  gptoss_arms *A = *pa;
  if (A && A->h != h) return gptoss_fail(GPTOSS_EARG, "arm: every arm of a sampler reads headers with the same gptoss_headers");
  int fresh = !A;
  if (fresh) {
    if (!(A = calloc(1, sizeof *A))) return gptoss_fail(GPTOSS_ENOMEM, "arm: out of memory");
    A->h = gptoss_headers_ref(h);
    A->active = -1;
  }
  arm *grown = realloc(A->a, sizeof *A->a * (size_t)(A->n + 1));
  if (!grown) goto oom;
  A->a = grown;
  arm *a = &A->a[A->n];
  memset(a, 0, sizeof *a);
  a->channel = dup_str(x->channel);
  a->recipient = dup_str(x->recipient);
  a->ends = malloc(sizeof(int32_t) * (size_t)x->n_end);
  if ((x->channel && !a->channel) || (x->recipient && !a->recipient) || !a->ends) {
    free(a->channel); free(a->recipient); free(a->ends);
    goto oom;
  }
  memcpy(a->ends, x->end_ids, sizeof(int32_t) * (size_t)x->n_end);
  a->n_end = x->n_end;
  a->g = gptoss_grammar_ref(x->grammar);
  a->v = gptoss_vocab_ref(v);
  A->n++;
  *pa = A;
  return GPTOSS_OK;
oom:
  if (fresh) gptoss_arms_free(A);
  return gptoss_fail(GPTOSS_ENOMEM, "arm: out of memory");
}

static int fits(const arm *a, const gptoss_header *r) {
  if (a->channel && !(r->channel && equals((span){ r->channel, r->channel_len }, a->channel, strlen(a->channel)))) return 0;
  if (a->recipient && !(r->recipient && equals((span){ r->recipient, r->recipient_len }, a->recipient, strlen(a->recipient))))
    return 0;
  return 1;
}

/* The arm a header names, or -1. The parser reads the reply's first
   header knowing its role (the prompt wrote "<|start|>assistant") and any
   later one from its first word; the sampler cannot tell which is which
   from a history alone, so a header whose first token is a role takes
   both readings: a message either names is masked (masking more never lets
   through one that a reading reports). A header at the history's start is
   an assistant's, as harmony.parse reads a completion that begins inside
   one. */
static int named_arm(const gptoss_arms *A, const int32_t *ids, size_t n, int at_start) {
  const gptoss_headers *h = A->h;
  gptoss_header r[2];
  int nr = 0;
  if (at_start) nr += gptoss_headers_read(h, ids, n, "assistant", &r[nr]);
  else {
    nr += gptoss_headers_read(h, ids, n, NULL, &r[nr]);
    if (n > 0 && ids[0] >= 0 && ids[0] < h->V) {
      span t0 = { h->text + h->off[ids[0]], h->off[ids[0] + 1] - h->off[ids[0]] };
      for (int k = 0; ROLES[k]; k++)
        if (equals(t0, ROLES[k], strlen(ROLES[k]))) { nr += gptoss_headers_read(h, ids + 1, n - 1, ROLES[k], &r[nr]); break; }
    }
  }
  for (int i = 0; i < A->n; i++)
    for (int j = 0; j < nr; j++)
      if (fits(&A->a[i], &r[j])) return i;
  return -1;
}

/* Reads the history afresh: the message body it ends in, if any (after a
   <|message|> closing a header that opened at a <|start|> or at the
   history's start), its arm, and the body so far replayed into a fresh
   matcher. A body the grammar refuses (a prompt's own) is left free. */
static void locate(gptoss_arms *A, const int32_t *hist, size_t n) {
  const gptoss_headers *h = A->h;
  drop(A);
  size_t k = n;
  while (k > 0 && !boundary(h, hist[k - 1])) k--;
  if (k == 0 || hist[k - 1] != h->message) return;
  size_t body = k--, j = k;   /* hist[k] is the <|message|> */
  while (j > 0 && !boundary(h, hist[j - 1])) j--;
  if (j > 0 && hist[j - 1] != h->start) return;
  int i = named_arm(A, hist + j, k - j, j == 0);
  if (i < 0) return;
  A->active = i;
  arm *a = &A->a[i];
  if (gptoss_matcher_new(a->g, a->v, a->ends, a->n_end, &A->m)) { A->m = NULL; return; }   /* end ids alone */
  for (size_t t = body; t < n; t++)
    if (gptoss_matcher_accept(A->m, hist[t]) || gptoss_matcher_ended(A->m)) { drop(A); return; }
}

void gptoss_arms_begin(gptoss_arms *A, const int32_t *hist, size_t n, gptoss_arm_mask *out) {
  int next = A->primed && n == A->seen + 1 && hist[n - 1] == A->last;
  A->seen = n;
  if (!next) locate(A, hist, n);
  else if (A->active < 0 && hist[n - 1] == A->h->message) locate(A, hist, n);
  out->m = A->m;
  out->ends = NULL;
  out->n_end = 0;
  if (A->active >= 0 && !A->m) {
    out->ends = A->a[A->active].ends;
    out->n_end = A->a[A->active].n_end;
  }
}

void gptoss_arms_end(gptoss_arms *A, int32_t id) {
  A->last = id;
  A->primed = 1;
  if (A->active < 0) return;
  /* the mask allowed id: it fails, or ends the message, only at its end */
  if (!A->m || gptoss_matcher_accept(A->m, id) || gptoss_matcher_ended(A->m)) drop(A);
}

int gptoss_arms_active(const gptoss_arms *A) { return A->active; }

gptoss_matcher *gptoss_arms_matcher(const gptoss_arms *A) { return A->active >= 0 ? A->m : NULL; }
/* }====================================================== */
