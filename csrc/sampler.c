/*
** sampler.c: turning logits into the next token, and into log-probabilities.
**
** Order of operations: logit bias, penalties over the recent history,
** then greedy (temperature 0) or temperature, top-k, softmax, top-p,
** min-p, and one draw from a seeded xoshiro256** stream. A grammar's mask
** (a matcher over the whole output, or the arm of the harmony message
** being written: arm.c) comes after bias and penalties.
*/
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "arm.h"
#include "backend.h"

struct gptoss_sampler {
  gptoss_sampling cfg;
  int vocab;
  uint64_t rng[4];
  int32_t *bias_ids;
  float *bias_values;
  int32_t *order;        /* candidate ids */
  int32_t *counts;       /* per-id counts in the penalty window, zero between calls */
  gptoss_matcher *gm;    /* a grammar's constraint over the whole output, or NULL */
  gptoss_arms *arms;     /* grammars for kinds of harmony message, or NULL */
  /* a sample and a mask computed ahead on another thread (the engine's)
     take turns; draws counts the samples, so that a mask computed ahead is
     not for a state already passed */
  pthread_mutex_t mu;
  uint64_t draws;
};

void gptoss_sampling_default(gptoss_sampling *s) {
  memset(s, 0, sizeof *s);
  s->temperature = 1.0f;
  s->top_p = 1.0f;
  s->repetition_penalty = 1.0f;
  s->penalty_window = 64;
}

gptoss_status gptoss_sampling_check(const gptoss_sampling *s, int vocab) {
  if (!(s->temperature >= 0) || isinf(s->temperature))
    return gptoss_fail(GPTOSS_EARG, "temperature must be a finite number >= 0 (got %g)", (double)s->temperature);
  if (!(s->top_p > 0 && s->top_p <= 1))
    return gptoss_fail(GPTOSS_EARG, "top_p must be in (0, 1] (got %g)", (double)s->top_p);
  if (!(s->min_p >= 0 && s->min_p <= 1))
    return gptoss_fail(GPTOSS_EARG, "min_p must be in [0, 1] (got %g)", (double)s->min_p);
  if (s->top_k < 0) return gptoss_fail(GPTOSS_EARG, "top_k must be >= 0 (got %d)", s->top_k);
  if (!(s->repetition_penalty > 0) || isinf(s->repetition_penalty))
    return gptoss_fail(GPTOSS_EARG, "repetition_penalty must be > 0 (got %g)", (double)s->repetition_penalty);
  if (!isfinite(s->presence_penalty) || !isfinite(s->frequency_penalty))
    return gptoss_fail(GPTOSS_EARG, "presence_penalty and frequency_penalty must be finite");
  if (s->penalty_window < 0) return gptoss_fail(GPTOSS_EARG, "penalty_window must be >= 0");
  for (int i = 0; i < s->n_bias; i++) {
    if (s->bias_ids[i] < 0 || s->bias_ids[i] >= vocab)
      return gptoss_fail(GPTOSS_EARG, "logit_bias id %d is outside the vocabulary (0..%d)", (int)s->bias_ids[i], vocab - 1);
    if (isnan(s->bias_values[i])) return gptoss_fail(GPTOSS_EARG, "logit_bias for id %d is NaN", (int)s->bias_ids[i]);
  }
  return GPTOSS_OK;
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(uint64_t *s) {
  uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return r;
}

gptoss_status gptoss_sampler_new(const gptoss_sampling *s, int vocab, gptoss_sampler **out) {
  *out = NULL;
  gptoss_status rc = gptoss_sampling_check(s, vocab);
  if (rc) return rc;
  gptoss_sampler *p = calloc(1, sizeof *p);
  if (!p) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  p->cfg = *s;
  p->vocab = vocab;
  if (pthread_mutex_init(&p->mu, NULL)) { free(p); return gptoss_fail(GPTOSS_ENOMEM, "sampler: cannot make its lock"); }
  p->order = malloc(sizeof(int32_t) * (size_t)vocab);
  p->counts = calloc((size_t)vocab, sizeof(int32_t));
  if (s->n_bias) {
    p->bias_ids = malloc(sizeof(int32_t) * (size_t)s->n_bias);
    p->bias_values = malloc(sizeof(float) * (size_t)s->n_bias);
  }
  if (!p->order || !p->counts || (s->n_bias && (!p->bias_ids || !p->bias_values))) {
    gptoss_sampler_free(p);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  }
  if (s->n_bias) {
    memcpy(p->bias_ids, s->bias_ids, sizeof(int32_t) * (size_t)s->n_bias);
    memcpy(p->bias_values, s->bias_values, sizeof(float) * (size_t)s->n_bias);
  }
  p->cfg.bias_ids = p->bias_ids;
  p->cfg.bias_values = p->bias_values;
  uint64_t z = s->seed;
  for (int i = 0; i < 4; i++) { z += 0x9e3779b97f4a7c15ull; p->rng[i] = gptoss_mix64(z); }
  *out = p;
  return GPTOSS_OK;
}

int gptoss_sampler_vocab(const gptoss_sampler *p) { return p->vocab; }

const gptoss_sampling *gptoss_sampler_params(const gptoss_sampler *p) { return &p->cfg; }

uint64_t gptoss_sampler_draw(gptoss_sampler *p) { return next_u64(p->rng); }

void gptoss_sampler_free(gptoss_sampler *p) {
  if (!p) return;
  free(p->order);
  free(p->counts);
  free(p->bias_ids);
  free(p->bias_values);
  gptoss_matcher_free(p->gm);
  gptoss_arms_free(p->arms);
  pthread_mutex_destroy(&p->mu);
  free(p);
}

void gptoss_sampler_constrain(gptoss_sampler *p, gptoss_matcher *m) {
  gptoss_matcher_free(p->gm);
  p->gm = m;
  gptoss_arms_free(p->arms);
  p->arms = NULL;
}

gptoss_matcher *gptoss_sampler_matcher(const gptoss_sampler *p) { return p->gm; }

gptoss_status gptoss_sampler_arm(gptoss_sampler *p, gptoss_headers *h, gptoss_vocab *v, const gptoss_arm *arm) {
  if (p->gm) return gptoss_fail(GPTOSS_EARG, "arm: the sampler is under a matcher for its whole output");
  return gptoss_arms_add(&p->arms, h, v, arm, p->vocab);
}

int gptoss_sampler_armed(const gptoss_sampler *p) { return p->arms ? gptoss_arms_active(p->arms) : -1; }

int gptoss_sampler_constrained(const gptoss_sampler *p) { return p->gm != NULL || p->arms != NULL; }

static void penalise(gptoss_sampler *p, float *logits, const int32_t *hist, size_t n) {
  const gptoss_sampling *c = &p->cfg;
  if (c->repetition_penalty == 1.0f && c->presence_penalty == 0 && c->frequency_penalty == 0) return;
  size_t w = c->penalty_window > 0 && (size_t)c->penalty_window < n ? (size_t)c->penalty_window : n;
  const int32_t *h = hist + (n - w);
  for (size_t i = 0; i < w; i++) if (h[i] >= 0 && h[i] < p->vocab) p->counts[h[i]]++;
  for (size_t i = 0; i < w; i++) {
    int32_t id = h[i];
    if (id < 0 || id >= p->vocab || p->counts[id] == 0) continue;
    float l = logits[id];
    /* CTRL's rule, as transformers applies it: shrink toward zero */
    if (c->repetition_penalty != 1.0f) l = l > 0 ? l / c->repetition_penalty : l * c->repetition_penalty;
    l -= c->presence_penalty + c->frequency_penalty * (float)p->counts[id];
    logits[id] = l;
    p->counts[id] = 0;   /* once per distinct id; also leaves counts zeroed */
  }
}

/* Moves the m largest of order[0..n) to the front (any order): quickselect. */
static void select_top(int32_t *order, int n, int m, const float *v) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    float pivot = v[order[(lo + hi) / 2]];
    int i = lo, j = hi;
    while (i <= j) {
      while (v[order[i]] > pivot) i++;
      while (v[order[j]] < pivot) j--;
      if (i <= j) { int32_t t = order[i]; order[i] = order[j]; order[j] = t; i++; j--; }
    }
    if (m - 1 <= j) hi = j;
    else if (m - 1 >= i) lo = i;
    else break;
  }
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Sorts ids by probability, larger first, equal ones by id, so that results
   never depend on a sort's stability. Probabilities are >= 0, so their bit
   patterns order like their values and one 64-bit key carries both. */
static int sort_by_prob(int32_t *order, int n, const float *v) {
  uint64_t *key = malloc(sizeof(uint64_t) * (size_t)n);
  if (!key) return -1;
  for (int i = 0; i < n; i++) {
    uint32_t bits;
    memcpy(&bits, &v[order[i]], 4);
    key[i] = ((uint64_t)(0xffffffffu - bits) << 32) | (uint32_t)order[i];
  }
  qsort(key, (size_t)n, sizeof *key, cmp_u64);
  for (int i = 0; i < n; i++) order[i] = (int32_t)(key[i] & 0xffffffffu);
  free(key);
  return 0;
}

static int is_end(const gptoss_arm_mask *mask, int32_t id) {
  for (int i = 0; i < mask->n_end; i++) if (mask->ends[i] == id) return 1;
  return 0;
}

/* The grammar's mask over biased, penalised logits. When the bias leaves
   every allowed token at -inf, they become equally likely: the output must
   still go on in the grammar. A mask that cannot be computed (memory, a
   grammar too ambiguous) leaves only the end ids: the output stops. */
static void constrain(gptoss_sampler *p, const gptoss_arm_mask *mask, float *logits) {
  int V = p->vocab, live = 0;
  gptoss_matcher *m = mask->m;
  if (m) (void)gptoss_matcher_apply(m, logits);   /* failing, it leaves the end ids */
  else for (int i = 0; i < V; i++) if (!is_end(mask, i)) logits[i] = -INFINITY;
  for (int i = 0; i < V && !live; i++) live = logits[i] > -INFINITY && !isnan(logits[i]);
  if (!live)
    for (int i = 0; i < V; i++) logits[i] = (m ? gptoss_matcher_allows(m, i) : is_end(mask, i)) ? 0.0f : -INFINITY;
}

static int32_t sample(gptoss_sampler *p, const gptoss_arm_mask *mask, float *logits, const int32_t *hist, size_t nhist);

int32_t gptoss_sampler_sample(gptoss_sampler *p, float *logits, const int32_t *hist, size_t nhist) {
  pthread_mutex_lock(&p->mu);
  gptoss_arm_mask mask = { p->gm, NULL, 0 };
  if (!p->gm && p->arms) gptoss_arms_begin(p->arms, hist, nhist, &mask);
  int32_t id = sample(p, &mask, logits, hist, nhist);
  /* the mask allowed it: this only fails when the mask failed too */
  if (p->gm) (void)gptoss_matcher_accept(p->gm, id);
  else if (p->arms) gptoss_arms_end(p->arms, id);
  p->draws++;
  pthread_mutex_unlock(&p->mu);
  return id;
}

uint64_t gptoss_sampler_draws(gptoss_sampler *p) {
  pthread_mutex_lock(&p->mu);
  uint64_t n = p->draws;
  pthread_mutex_unlock(&p->mu);
  return n;
}

/* The next draw's matcher: the grammar's, or the arm's under way (an arm
   that the next token's header opens is found by that draw). A failure is
   left for the draw to meet and report on its own thread. */
int gptoss_sampler_prepare(gptoss_sampler *p, uint64_t draws) {
  pthread_mutex_lock(&p->mu);
  gptoss_matcher *m = p->draws != draws ? NULL : p->gm ? p->gm : p->arms ? gptoss_arms_matcher(p->arms) : NULL;
  int computed = 0;
  if (m && !gptoss_matcher_ended(m) && gptoss_matcher_prepare(m, &computed) != GPTOSS_OK) computed = 0;
  pthread_mutex_unlock(&p->mu);
  return computed;
}

static int32_t sample(gptoss_sampler *p, const gptoss_arm_mask *mask, float *logits, const int32_t *hist, size_t nhist) {
  const gptoss_sampling *c = &p->cfg;
  int V = p->vocab;
  for (int i = 0; i < c->n_bias; i++) logits[c->bias_ids[i]] += c->bias_values[i];
  penalise(p, logits, hist, nhist);
  if (mask->m || mask->n_end) constrain(p, mask, logits);
  if (c->temperature == 0) {
    int best = 0;
    for (int i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
    return best;
  }
  int n = 0;
  float mx = -INFINITY;
  for (int i = 0; i < V; i++) {
    if (logits[i] == -INFINITY || isnan(logits[i])) continue;
    p->order[n++] = i;
    if (logits[i] > mx) mx = logits[i];
  }
  if (n == 0) return 0;
  if (mx == INFINITY) {
    /* a +inf logit (a logit_bias of +inf) is certain: the draw is among
       those alone, equally likely, as the softmax limit has it */
    int k = 0;
    for (int i = 0; i < n; i++)
      if (logits[p->order[i]] == INFINITY) { logits[p->order[i]] = 0; p->order[k++] = p->order[i]; }
    n = k;
    mx = 0;
  }
  if (c->top_k > 0 && c->top_k < n) {
    select_top(p->order, n, c->top_k, logits);
    n = c->top_k;
  }
  /* softmax over the candidates, in place */
  double sum = 0;
  for (int i = 0; i < n; i++) {
    int32_t id = p->order[i];
    float e = expf((logits[id] - mx) / c->temperature);
    logits[id] = e;
    sum += e;
  }
  for (int i = 0; i < n; i++) logits[p->order[i]] = (float)(logits[p->order[i]] / sum);
  if (c->top_p < 1.0f) {
    /* the nucleus is inside the top m for the first m whose mass reaches top_p */
    int m = 64;
    for (;;) {
      if (m > n) m = n;
      select_top(p->order, n, m, logits);
      double mass = 0;
      for (int i = 0; i < m; i++) mass += logits[p->order[i]];
      if (mass >= c->top_p || m == n) break;
      m *= 4;
    }
    if (sort_by_prob(p->order, m, logits) != 0) return p->order[0];
    double cum = 0;
    int keep = 0;
    while (keep < m) {
      cum += logits[p->order[keep]];
      keep++;
      if (cum >= c->top_p) break;
    }
    n = keep;
  }
  if (c->min_p > 0) {
    float pmax = 0;
    for (int i = 0; i < n; i++) if (logits[p->order[i]] > pmax) pmax = logits[p->order[i]];
    int k = 0;
    for (int i = 0; i < n; i++) if (logits[p->order[i]] >= c->min_p * pmax) p->order[k++] = p->order[i];
    n = k;
  }
  double tot = 0;
  for (int i = 0; i < n; i++) tot += logits[p->order[i]];
  double u = gptoss_u01(next_u64(p->rng)) * tot, acc = 0;
  for (int i = 0; i < n; i++) {
    acc += logits[p->order[i]];
    if (u < acc) return p->order[i];
  }
  return p->order[n - 1];
}

/* {====================================================== log-probabilities */
/* What a request's logprobs report (internal.h): the raw distribution's,
   whatever the sampler does to it. One pass for the maximum, one for the
   sum (in double, of max-shifted terms), one keeping the k best by
   insertion, ties to the lower id (one order the specs can reproduce): a
   logit below the k-th best costs one comparison. */
void gptoss_logprobs(const float *x, int V, int32_t id, int k, gptoss_logprob *out) {
  float mx = x[0];
  for (int i = 1; i < V; i++) if (x[i] > mx) mx = x[i];
  double sum = 0;
  for (int i = 0; i < V; i++) sum += expf(x[i] - mx);
  double lse = (double)mx + log(sum);
  gptoss_logprob *top = out + 1;
  int n = 0;
  for (int i = 0; i < V && k > 0; i++) {
    if (n == k && !(x[i] > x[top[k - 1].id])) continue;
    int j = n < k ? n++ : k - 1;
    for (; j > 0 && x[i] > x[top[j - 1].id]; j--) top[j] = top[j - 1];
    top[j].id = i;
  }
  for (int j = 0; j < n; j++) top[j].logprob = (float)(x[top[j].id] - lse);
  out[0].id = id;
  out[0].logprob = (float)(x[id] - lse);
}
/* }====================================================== */
