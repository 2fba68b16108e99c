/*
** optim.c: training's side of an adapter: the gradients a backward pass
** adds to (and their sums of squares), AdamW's step and the thread its
** update runs on, zero_grad, and the optimizer state's file.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include "adapter_impl.h"

/* {====================================================== gradients */
#define STEP_CHUNK ((size_t)1 << 16)

static size_t chunks_of(size_t n) { return (n + STEP_CHUNK - 1) / STEP_CHUNK; }

/* the gradients (zeros) and their sums of squares (zeros, current) */
static gptoss_status grads_alloc(gptoss_adapter *a) {
  int nm = a->nlayers * GPTOSS_LORA_MODULES;
  if (!a->chunk0) {
    size_t c = 0;
    if (!(a->chunk0 = malloc(sizeof(size_t) * (size_t)(nm ? nm : 1)))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    for (int i = 0; i < nm; i++) {
      gptoss_lora *x = &a->mod[i];
      a->chunk0[i] = c;
      if (x->r) c += chunks_of((size_t)x->rk * x->in) + chunks_of((size_t)x->out * x->rk);
    }
    a->gsq = calloc(c ? c : 1, sizeof(double));
    a->chunk0_total = c;
    a->gsq_ok = malloc((size_t)(a->nlayers ? a->nlayers : 1));
    if (!a->gsq || !a->gsq_ok) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    memset(a->gsq_ok, 1, (size_t)a->nlayers);
  }
  for (int i = 0; i < nm; i++) {
    gptoss_lora *x = &a->mod[i];
    lora_train *g = &a->train[i];
    if (!x->r || g->gA) continue;
    g->gA = calloc((size_t)x->rk * x->in, sizeof(float));
    g->gB = calloc((size_t)x->out * x->rk, sizeof(float));
    if (!g->gA || !g->gB) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the adapter's gradients");
  }
  return GPTOSS_OK;
}

/* A backward pass adds to the gradients; a backend that adds a layer
   through gptoss_adapter_add_grads makes its sums current again. */
static void grads_stale(gptoss_adapter *a) {
  if (a->gsq_ok) memset(a->gsq_ok, 0, (size_t)a->nlayers);
}

typedef struct {
  gptoss_adapter *a;
  int layer;
  const float *src;
  size_t off[GPTOSS_LORA_MODULES];   /* each module's place in src */
} add_job;

/* sum of (g scale)^2 in eight fixed lanes (the order never changes) */
GPTOSS_HOT static double sum_squares(const float *g, size_t n, float scale) {
  double acc[8] = {0};
  size_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; j++) { double x = (double)(g[k + j] * scale); acc[j] += x * x; }
  for (; k < n; k++) { double x = (double)(g[k] * scale); acc[0] += x * x; }
  double s = 0;
  for (int j = 0; j < 8; j++) s += acc[j];
  return s;
}

/* chunk by chunk over threads: the add, and the chunk's sum of squares of
   the result while it is in cache */
static void add_chunks(void *ctx, int tid, int nth) {
  add_job *j = ctx;
  gptoss_adapter *a = j->a;
  size_t k = 0;
  for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
    int i = j->layer * GPTOSS_LORA_MODULES + m;
    gptoss_lora *x = &a->mod[i];
    if (!x->r) continue;
    size_t n[2] = {(size_t)x->rk * x->in, (size_t)x->out * x->rk}, c = a->chunk0[i];
    float *g[2] = {a->train[i].gA, a->train[i].gB};
    const float *src[2] = {j->src + j->off[m], j->src + j->off[m] + n[0]};
    for (int w = 0; w < 2; w++)
      for (size_t lo = 0; lo < n[w]; lo += STEP_CHUNK, c++, k++) {
        if ((int)(k % (size_t)nth) != tid) continue;
        size_t len = lo + STEP_CHUNK < n[w] ? STEP_CHUNK : n[w] - lo;
        float *restrict d = g[w] + lo;
        const float *restrict s = src[w] + lo;
        for (size_t q = 0; q < len; q++) d[q] += s[q];
        a->gsq[c] = sum_squares(d, len, 1.f);
      }
  }
}

void gptoss_adapter_add_grads(gptoss_adapter *a, int layer, const float *src, gptoss_pool *pool) {
  add_job j = {a, layer, src, {0}};
  size_t off = 0;
  for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
    gptoss_lora *x = &a->mod[layer * GPTOSS_LORA_MODULES + m];
    j.off[m] = off;
    if (x->r) off += (size_t)x->rk * x->in + (size_t)x->out * x->rk;
  }
  gptoss_pool_run(pool, add_chunks, &j);
  a->gsq_ok[layer] = 1;
}

gptoss_status gptoss_lora_backward(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                   double *loss, int *count) {
  return gptoss_lora_backward_packed(m, a, ids, mask, n, NULL, 0, loss, count);
}

gptoss_status gptoss_check_starts(const char *fn, const int32_t *starts, int ns, int n) {
  if (ns < 0) return gptoss_fail(GPTOSS_EARG, "%s: the number of example starts must be >= 0 (got %d)", fn, ns);
  if (ns == 0) return GPTOSS_OK;
  if (!starts) return gptoss_fail(GPTOSS_EARG, "%s: %d example starts given as NULL", fn, ns);
  if (starts[0] != 0) return gptoss_fail(GPTOSS_EARG, "%s: the first example must start at offset 0 (got %d)", fn, starts[0]);
  for (int k = 1; k < ns; k++)
    if (starts[k] <= starts[k - 1] || starts[k] >= n)
      return gptoss_fail(GPTOSS_EARG, "%s: example start %d (offset %d) must come after the one before (%d) and inside "
                         "the %d tokens", fn, k + 1, starts[k], starts[k - 1], n);
  return GPTOSS_OK;
}

/* packed examples: each token's example start, and the mask without the
   examples' first tokens (as targets they would be predicted from the
   example before) */
static gptoss_status unpack(const int32_t *starts, int ns, const uint8_t *mask, int n, int32_t **seg0, uint8_t **mask2) {
  *seg0 = NULL;
  *mask2 = NULL;
  gptoss_status rc = gptoss_check_starts("lora backward", starts, ns, n);
  if (rc || ns == 0) return rc;
  int32_t *s = malloc(sizeof(int32_t) * (size_t)n);
  uint8_t *mk = malloc((size_t)n);
  if (!s || !mk) { free(s); free(mk); return gptoss_fail(GPTOSS_ENOMEM, "out of memory for packed examples"); }
  for (int k = 0, t = 0; k < ns; k++) {
    int end = k + 1 < ns ? starts[k + 1] : n;
    for (; t < end; t++) {
      s[t] = starts[k];
      mk[t] = t == starts[k] ? 0 : mask ? mask[t] : 1;
    }
  }
  *seg0 = s;
  *mask2 = mk;
  return GPTOSS_OK;
}

gptoss_status gptoss_lora_backward_packed(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                          const int32_t *starts, int ns, double *loss, int *count) {
  if (!m->be->lora_backward) return gptoss_fail(GPTOSS_EUNSUP, "LoRA training is not supported on %s", m->device);
  if (n < 2) return gptoss_fail(GPTOSS_EARG, "lora backward: a sequence needs at least 2 tokens (got %d)", n);
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size)
      return gptoss_fail(GPTOSS_ERANGE, "lora backward: token id %d at position %d is outside the vocabulary (%d)", ids[i], i + 1,
                         m->cfg.vocab_size);
  int32_t *seg0;
  uint8_t *mask2;
  gptoss_status rc = unpack(starts, ns, mask, n, &seg0, &mask2);
  if (!rc) rc = gptoss_adapter_check(a, m);
  if (!rc) rc = grads_alloc(a);
  if (!rc) {
    grads_stale(a);
    rc = m->be->lora_backward(m, a, ids, seg0 ? mask2 : mask, n, seg0, loss, count);
  }
  free(seg0);
  free(mask2);
  return rc;
}

void gptoss_adapter_grads(const gptoss_adapter *a, int layer, gptoss_lora_module m, float **gA, float **gB) {
  *gA = *gB = NULL;
  if (!gptoss_adapter_module(a, layer, m)) return;   /* waits for the update */
  *gA = a->train[layer * GPTOSS_LORA_MODULES + m].gA;
  *gB = a->train[layer * GPTOSS_LORA_MODULES + m].gB;
}

/* }====================================================== */

/* {====================================================== AdamW */
int gptoss_adapter_steps(const gptoss_adapter *a) { return a->steps; }

/* AdamW runs over fixed chunks (STEP_CHUNK) of each weight array, spread
   over threads: the gradient norm sums per chunk and then over chunks in
   order, so it is the same whatever the thread count (a 20B adapter has
   185M weights). */

typedef struct step_job {
  gptoss_adapter *a;
  gptoss_adamw o;
  int pass;                     /* 0: squared gradient sums per chunk; 1: the update */
  int layer;                    /* the update's layer (pass 1) */
  int zero;                     /* pass 1 also zeroes the gradients it has used */
  double *partial;              /* [chunks] */
  float gs;                     /* grad_scale times the clipping coefficient */
  double bc1, bc2;
  adamw8_step c8;               /* the 8-bit AdamW's constants (o.bits8) */
} step_job;

/* The update (pass 1) is memory-bound: 185M weights, each with its
   gradient and two moments, 0.05-0.1 s on the host for a 20B adapter. It
   runs on a thread of its own, layer after layer, after step returns, so a
   trainer's next forward (the CUDA one uploads layer l as soon as layer l
   is updated) runs alongside. Every other reader waits for all of it
   (gptoss_adapter_wait). A zero_grad that comes during the update zeroes
   each layer once it is updated: the layers already done at once, the rest
   as the update goes (each chunk of gradients as soon as it is used). */
struct update {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t th;
  int running, joinable;
  int done;                     /* layers updated (and zeroed, if asked) */
  int zero;                     /* zero_grad came during the update */
  step_job job;
  gptoss_pool *pool;            /* the optimizer's threads, kept between steps */
};

/* torch's AdamW: decay, the moments, then p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
   The moments are taken in double (float would add rounding of its own to
   torch's, and PEFT's 5-step trajectory drifts past 1e-4); the step's
   square root and division in float, in torch's order (in double they
   made the update bound by their throughput, twice the time a weight).
   Written so that it vectorises (no errno from sqrt). */
GPTOSS_HOT static void adamw_span(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, size_t n,
                                  float gs, float decay, double b1, double b2, double step, double bc2, double eps) {
  float sbc2 = (float)sqrt(bc2), st = (float)step, ep = (float)eps;
  for (size_t k = 0; k < n; k++) {
    float gk = g[k] * gs;
    float mk = (float)(b1 * m[k] + (1 - b1) * gk), vk = (float)(b2 * v[k] + (1 - b2) * (double)gk * gk);
    m[k] = mk;
    v[k] = vk;
    p[k] = p[k] * decay - st * mk / (sqrtf(vk) / sbc2 + ep);
  }
}

/* pass 0 over every module, pass 1 over one layer's */
static void step_chunks(void *ctx, int tid, int nth) {
  step_job *j = ctx;
  const gptoss_adamw *o = &j->o;
  size_t chunk = 0;
  int i0 = j->pass ? j->layer * GPTOSS_LORA_MODULES : 0;
  int i1 = j->pass ? i0 + GPTOSS_LORA_MODULES : j->a->nlayers * GPTOSS_LORA_MODULES;
  for (int i = i0; i < i1; i++) {
    gptoss_lora *x = &j->a->mod[i];
    lora_train *t = &j->a->train[i];
    if (!x->r) continue;
    float *p[2] = {x->A, x->B}, *g[2] = {t->gA, t->gB}, *mm[2] = {t->mA, t->mB}, *vv[2] = {t->vA, t->vB};
    size_t n[2] = {(size_t)x->rk * x->in, (size_t)x->out * x->rk};
    for (int w = 0; w < 2; w++)
      for (size_t lo = 0; lo < n[w]; lo += STEP_CHUNK, chunk++) {
        if ((int)(chunk % (size_t)nth) != tid) continue;
        size_t len = lo + STEP_CHUNK < n[w] ? STEP_CHUNK : n[w] - lo;
        if (j->pass == 0) j->partial[chunk] = sum_squares(g[w] + lo, len, (float)o->grad_scale);
        else if (o->bits8) {   /* chunks are whole blocks of 256: STEP_CHUNK is a multiple */
          gptoss_adamw8_span(p[w] + lo, g[w] + lo, t, w, lo, len, &j->c8);
          if (j->zero) memset(g[w] + lo, 0, sizeof(float) * len);
        } else {
          adamw_span(p[w] + lo, g[w] + lo, mm[w] + lo, vv[w] + lo, len, j->gs, (float)(1 - o->lr * o->weight_decay),
                     o->beta1, o->beta2, o->lr / j->bc1, j->bc2, o->eps);
          if (j->zero) memset(g[w] + lo, 0, sizeof(float) * len);   /* still in cache */
        }
      }
  }
}

static void zero_layer(gptoss_adapter *a, int l) {
  for (int i = l * GPTOSS_LORA_MODULES; i < (l + 1) * GPTOSS_LORA_MODULES; i++) {
    gptoss_lora *x = &a->mod[i];
    lora_train *g = &a->train[i];
    if (g->gA) memset(g->gA, 0, sizeof(float) * (size_t)x->rk * x->in);
    if (g->gB) memset(g->gB, 0, sizeof(float) * (size_t)x->out * x->rk);
  }
}

static void *update_main(void *arg) {
  gptoss_adapter *a = arg;
  struct update *u = a->update;
  for (int l = 0; l < a->nlayers; l++) {
    pthread_mutex_lock(&u->mu);
    u->job.zero = u->zero;
    pthread_mutex_unlock(&u->mu);
    u->job.layer = l;
    gptoss_pool_run(u->pool, step_chunks, &u->job);
    /* reading zero and publishing done under one lock: a zero_grad either
       comes first (and this thread zeroes layer l, here if it came while
       the layer was being updated) or finds l done and zeroes it itself */
    pthread_mutex_lock(&u->mu);
    if (u->zero && !u->job.zero) {
      pthread_mutex_unlock(&u->mu);
      zero_layer(a, l);
      pthread_mutex_lock(&u->mu);
    }
    u->done = l + 1;
    pthread_cond_broadcast(&u->cv);
    pthread_mutex_unlock(&u->mu);
  }
  pthread_mutex_lock(&u->mu);
  u->running = 0;
  pthread_cond_broadcast(&u->cv);
  pthread_mutex_unlock(&u->mu);
  return NULL;
}

void gptoss_adapter_wait(const gptoss_adapter *ca, int layer) {
  struct update *u = ca->update;
  if (!u) return;
  pthread_mutex_lock(&u->mu);
  while (u->running && (layer < 0 || u->done <= layer)) pthread_cond_wait(&u->cv, &u->mu);
  int join = !u->running && u->joinable;
  if (join) u->joinable = 0;
  pthread_mutex_unlock(&u->mu);
  if (join) pthread_join(u->th, NULL);
}

void gptoss_optim_free(gptoss_adapter *a) {
  if (a->update) {
    gptoss_adapter_wait(a, -1);
    pthread_mutex_destroy(&a->update->mu);
    pthread_cond_destroy(&a->update->cv);
    gptoss_pool_free(a->update->pool);
    free(a->update);
    a->update = NULL;
  }
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++) {
    lora_train *t = &a->train[i];
    free(t->gA); free(t->gB); free(t->mA); free(t->mB); free(t->vA); free(t->vB);
    for (int k = 0; k < 4; k++) { free(t->q8[k]); free(t->absmax8[k]); }
  }
  free(a->train);
  free(a->gsq); free(a->gsq_ok); free(a->chunk0);
}

static const char *optim_name(gptoss_optim k) { return k == GPTOSS_OPTIM_ADAMW_8BIT ? "adamw_8bit" : "adamw"; }

gptoss_optim gptoss_adapter_optim(const gptoss_adapter *a, size_t *bytes) {
  size_t sum = 0;
  for (int i = 0; bytes && i < a->nlayers * GPTOSS_LORA_MODULES; i++) {
    const gptoss_lora *x = &a->mod[i];
    const lora_train *t = &a->train[i];
    size_t nA = (size_t)x->rk * x->in, nB = (size_t)x->out * x->rk;
    if (t->mA) sum += 2 * sizeof(float) * (nA + nB);
    if (t->q8[0]) sum += 2 * (nA + nB) + 2 * sizeof(float) * (gptoss_q8_blocks(nA) + gptoss_q8_blocks(nB));
  }
  if (bytes) *bytes = sum;
  return a->optim;
}

gptoss_status gptoss_adapter_step(gptoss_adapter *a, const gptoss_adamw *o, double *grad_norm) {
  if (!(o->lr >= 0) || !(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1) || !(o->eps > 0) || o->weight_decay < 0)
    return gptoss_fail(GPTOSS_EARG, "adamw: lr >= 0, betas in [0, 1), eps > 0 and weight_decay >= 0");
  gptoss_adapter_wait(a, -1);
  gptoss_optim kind = o->bits8 ? GPTOSS_OPTIM_ADAMW_8BIT : GPTOSS_OPTIM_ADAMW;
  if (a->optim != GPTOSS_OPTIM_NONE && a->optim != kind)
    return gptoss_fail(GPTOSS_ESTATE, "adamw: the adapter's optimizer state is %s (its first step or a loaded state chose it), "
                       "so it cannot step with %s", optim_name(a->optim), optim_name(kind));
  size_t chunks = 0, total = 0;
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++) {
    gptoss_lora *x = &a->mod[i];
    lora_train *t = &a->train[i];
    if (!x->r) continue;
    if (!t->gA) return gptoss_fail(GPTOSS_ESTATE, "adamw: no gradients yet (run a backward pass first)");
    if (o->bits8 && !t->q8[0]) {
      a->optim = kind;
      gptoss_status rc = gptoss_adamw8_alloc(t, (size_t)x->rk * x->in, (size_t)x->out * x->rk);
      if (rc) return rc;
    } else if (!o->bits8 && !t->mA) {
      a->optim = kind;
      t->mA = calloc((size_t)x->rk * x->in, sizeof(float)); t->vA = calloc((size_t)x->rk * x->in, sizeof(float));
      t->mB = calloc((size_t)x->out * x->rk, sizeof(float)); t->vB = calloc((size_t)x->out * x->rk, sizeof(float));
      if (!t->mA || !t->vA || !t->mB || !t->vB) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the optimizer state");
    }
    size_t n[2] = {(size_t)x->rk * x->in, (size_t)x->out * x->rk};
    for (int w = 0; w < 2; w++) { chunks += chunks_of(n[w]); total += n[w]; }
  }
  struct update *u = a->update;
  if (!u) {
    if (!(u = calloc(1, sizeof *u))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the optimizer");
    /* all cores but two, at most 14: the update is memory-bound and runs
       while a CUDA trainer's forward waits for it a layer at a time; the
       two are the thread that drives the GPU and the trainer's copies */
    int most = gptoss_cpu_count() - 2, nth = total < ((size_t)1 << 20) || most < 1 ? 1 : most > 14 ? 14 : most;
    u->pool = nth > 1 ? gptoss_pool_new(nth) : NULL;   /* NULL: the calling thread alone */
    if (pthread_mutex_init(&u->mu, NULL)) { gptoss_pool_free(u->pool); free(u); return gptoss_fail(GPTOSS_ENOMEM, "adamw: no mutex"); }
    if (pthread_cond_init(&u->cv, NULL)) {
      pthread_mutex_destroy(&u->mu); gptoss_pool_free(u->pool); free(u);
      return gptoss_fail(GPTOSS_ENOMEM, "adamw: no condition variable");
    }
    a->update = u;
  }
  step_job *j = &u->job;
  memset(j, 0, sizeof *j);
  j->a = a;
  j->o = *o;
  /* the sums of squares gptoss_adapter_add_grads kept, when every layer's
     are current; else pass 0 reads the gradients */
  int current = a->gsq_ok != NULL;
  for (int l = 0; current && l < a->nlayers; l++) current = a->gsq_ok[l];
  double ss = 0;
  if (current) {
    double gs = (float)o->grad_scale;
    for (size_t c = 0; c < chunks; c++) ss += a->gsq[c];
    ss *= gs * gs;
  } else {
    if (!(j->partial = calloc(chunks ? chunks : 1, sizeof(double)))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the optimizer");
    gptoss_pool_run(u->pool, step_chunks, j);
    for (size_t c = 0; c < chunks; c++) ss += j->partial[c];
    free(j->partial);
    j->partial = NULL;
  }
  double norm = sqrt(ss), clip = 1;
  if (!isfinite(norm)) return gptoss_fail(GPTOSS_ERANGE, "adamw: the gradient norm is not finite; no step taken");
  /* torch.nn.utils.clip_grad_norm_: coefficient max / (norm + 1e-6), capped at 1 */
  if (o->max_grad_norm > 0 && o->max_grad_norm / (norm + 1e-6) < 1) clip = o->max_grad_norm / (norm + 1e-6);
  a->steps++;
  gptoss_adapter_touch(a);
  j->pass = 1;
  j->gs = (float)(o->grad_scale * clip);
  j->bc1 = 1 - pow(o->beta1, a->steps);
  j->bc2 = 1 - pow(o->beta2, a->steps);
  if (o->bits8) gptoss_adamw8_prepare(&j->c8, o, j->gs, a->steps);
  if (grad_norm) *grad_norm = norm;
  u->done = 0;
  u->zero = 0;
  u->running = 1;
  if (pthread_create(&u->th, NULL, update_main, a) == 0) {
    u->joinable = 1;
    return GPTOSS_OK;
  }
  update_main(a);   /* no thread to be had: the update here and now */
  return GPTOSS_OK;
}

/* in 1M-float pieces over threads: a 20B adapter's gradients are 740 MB */
#define ZERO_PIECE ((size_t)1 << 20)

static void zero_pieces(void *ctx, int tid, int nth) {
  gptoss_adapter *a = ctx;
  size_t piece = 0;
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++) {
    gptoss_lora *x = &a->mod[i];
    float *g[2] = {a->train[i].gA, a->train[i].gB};
    size_t n[2] = {(size_t)x->rk * x->in, (size_t)x->out * x->rk};
    for (int w = 0; w < 2; w++)
      for (size_t lo = 0; g[w] && lo < n[w]; lo += ZERO_PIECE, piece++)
        if ((int)(piece % (size_t)nth) == tid) memset(g[w] + lo, 0, sizeof(float) * (lo + ZERO_PIECE < n[w] ? ZERO_PIECE : n[w] - lo));
  }
}

void gptoss_adapter_zero_grad(gptoss_adapter *a) {
  struct update *u = a->update;
  /* zeros, or zeros by the time anything reads them (the update's, below) */
  if (a->gsq) {
    memset(a->gsq, 0, sizeof(double) * a->chunk0_total);
    memset(a->gsq_ok, 1, (size_t)a->nlayers);
  }
  if (u) {
    pthread_mutex_lock(&u->mu);
    int running = u->running, done = u->done;
    if (running) u->zero = 1;
    pthread_mutex_unlock(&u->mu);
    if (running) {   /* the updated layers here, the rest by the update's thread */
      for (int l = 0; l < done; l++) zero_layer(a, l);
      return;
    }
    gptoss_adapter_wait(a, -1);   /* joins the finished thread */
    gptoss_pool_run(u->pool, zero_pieces, a);   /* its threads, idle now */
    return;
  }
  size_t total = 0;
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++)
    if (a->train[i].gA) total += (size_t)a->mod[i].rk * (a->mod[i].in + a->mod[i].out);
  int nth = total < 8 * ZERO_PIECE ? 1 : gptoss_cpu_count() > 16 ? 16 : gptoss_cpu_count();
  gptoss_pool *pool = nth > 1 ? gptoss_pool_new(nth) : NULL;   /* NULL (or none to be had): this thread alone */
  gptoss_pool_run(pool, zero_pieces, a);
  gptoss_pool_free(pool);
}
/* }====================================================== */

/* {====================================================== optimizer state */
/* moment k of module (l, i) in the state file: 0, 1 lora_A's exp_avg and
   exp_avg_sq, 2, 3 lora_B's; its name and shape (its weight's) */
static void moment_name(const gptoss_adapter *a, int l, int i, int k, char *name, size_t n, int64_t shape[2]) {
  static const char *const what[4] = {"lora_A.exp_avg", "lora_A.exp_avg_sq", "lora_B.exp_avg", "lora_B.exp_avg_sq"};
  const gptoss_lora *x = &a->mod[l * GPTOSS_LORA_MODULES + i];
  snprintf(name, n, "layers.%d.%s.%s", l, gptoss_lora_names[i], what[k]);
  shape[0] = k < 2 ? x->rk : x->out;
  shape[1] = k < 2 ? x->in : x->rk;
}

static float **moment(lora_train *t, int k) { return k == 0 ? &t->mA : k == 1 ? &t->vA : k == 2 ? &t->mB : &t->vB; }

/* the 8-bit AdamW's maps, qmap1 for exp_avg and qmap2 for exp_avg_sq (as
   bitsandbytes names them in its state) */
static const char *const qmap_names[2] = {"qmap1", "qmap2"};

gptoss_status gptoss_adapter_save_state(const gptoss_adapter *a, const char *path) {
  gptoss_adapter_wait(a, -1);
  int q8 = a->optim == GPTOSS_OPTIM_ADAMW_8BIT;
  gptoss_st_writer *w = NULL;
  gptoss_status rc = gptoss_stw_new(path, &w);
  char steps[32];
  snprintf(steps, sizeof steps, "%d", a->steps);
  if (!rc) rc = gptoss_stw_metadata(w, "steps", steps);
  if (!rc && q8) rc = gptoss_stw_metadata(w, "optim", "adamw_8bit");
  for (int s = 0; s < 2 && q8 && !rc; s++) {
    int64_t n = 256;
    gptoss_fill f = {GPTOSS_FILL_DATA, 0, 0, 0, gptoss_dynamic_map(s == 0), sizeof(float) * 256};
    rc = gptoss_stw_add(w, qmap_names[s], GPTOSS_F32, 1, &n, &f);
  }
  for (int l = 0; l < a->nlayers && !rc; l++)
    for (int i = 0; i < GPTOSS_LORA_MODULES && !rc; i++) {
      lora_train *t = &a->train[l * GPTOSS_LORA_MODULES + i];
      if (!gptoss_adapter_slot(a, l, i) || !(q8 ? t->q8[0] != NULL : t->mA != NULL)) continue;
      for (int k = 0; k < 4 && !rc; k++) {
        char name[128];
        int64_t shape[2];
        moment_name(a, l, i, k, name, sizeof name, shape);
        size_t n = (size_t)(shape[0] * shape[1]);
        const void *data = q8 ? (const void *)t->q8[k] : (const void *)*moment(t, k);
        gptoss_fill f = {GPTOSS_FILL_DATA, 0, 0, 0, data, (q8 ? 1 : sizeof(float)) * n};
        rc = gptoss_stw_add(w, name, q8 ? GPTOSS_U8 : GPTOSS_F32, 2, shape, &f);
        if (rc || !q8) continue;
        int64_t blocks = (int64_t)gptoss_q8_blocks(n);
        gptoss_fill fa = {GPTOSS_FILL_DATA, 0, 0, 0, t->absmax8[k], sizeof(float) * (size_t)blocks};
        size_t len = strlen(name);
        snprintf(name + len, sizeof name - len, ".absmax");
        rc = gptoss_stw_add(w, name, GPTOSS_F32, 1, &blocks, &fa);
      }
    }
  if (!rc) rc = gptoss_stw_commit(w, 1);
  gptoss_stw_free(w);
  return rc;
}

/* the file's tensor `name` when it is dtype [d0] or [d0, d1] (ndim 1, 2);
   NULL when missing (*rc stays) or else (*rc set) */
static const gptoss_tensor *state_tensor(gptoss_st *st, const char *path, const char *name, gptoss_dtype dtype, int ndim,
                                         int64_t d0, int64_t d1, gptoss_status *rc) {
  const gptoss_tensor *t = gptoss_st_find(st, name);
  if (t && (t->dtype != dtype || t->ndim != ndim || t->shape[0] != d0 || (ndim == 2 && t->shape[1] != d1))) {
    const char *dt = dtype == GPTOSS_U8 ? "U8" : "F32";
    if (ndim == 1) *rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s must be %s [%lld]", path, name, dt, (long long)d0);
    else *rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s must be %s [%lld, %lld]", path, name, dt, (long long)d0, (long long)d1);
    return NULL;
  }
  return t;
}

gptoss_status gptoss_adapter_load_state(gptoss_adapter *a, const char *path) {
  gptoss_adapter_wait(a, -1);
  gptoss_st *st = NULL;
  gptoss_status rc = gptoss_st_open(path, &st);
  if (rc) return rc;
  const char *steps = gptoss_st_metadata(st, "steps"), *optim = gptoss_st_metadata(st, "optim");
  char *end = NULL;
  long n = steps ? strtol(steps, &end, 10) : -1;
  if (!steps || *end || n < 0) rc = gptoss_fail(GPTOSS_EFORMAT, "%s: metadata field steps missing or invalid", path);
  /* no optim field: a state of the fp32 AdamW, as files before the 8-bit one */
  gptoss_optim kind = !optim || strcmp(optim, "adamw") == 0 ? GPTOSS_OPTIM_ADAMW
                      : strcmp(optim, "adamw_8bit") == 0  ? GPTOSS_OPTIM_ADAMW_8BIT
                                                          : GPTOSS_OPTIM_NONE;
  int q8 = kind == GPTOSS_OPTIM_ADAMW_8BIT;
  if (!rc && kind == GPTOSS_OPTIM_NONE)
    rc = gptoss_fail(GPTOSS_EFORMAT, "%s: metadata field optim is \"%s\" (adamw or adamw_8bit)", path, optim);
  /* the codes mean something only through the maps they were made with */
  for (int s = 0; s < 2 && q8 && !rc; s++) {
    const gptoss_tensor *t = state_tensor(st, path, qmap_names[s], GPTOSS_F32, 1, 256, 0, &rc);
    if (!rc && !t) rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s missing", path, qmap_names[s]);
    else if (!rc && memcmp(t->data, gptoss_dynamic_map(s == 0), sizeof(float) * 256) != 0)
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: %s is not bitsandbytes' %s dynamic map", path, qmap_names[s], s == 0 ? "signed" : "unsigned");
  }
  /* check everything first, so a bad file leaves the adapter as it was */
  int loaded = 0;
  for (int pass = 0; pass < 2 && !rc; pass++)
    for (int l = 0; l < a->nlayers && !rc; l++)
      for (int i = 0; i < GPTOSS_LORA_MODULES && !rc; i++) {
        if (!gptoss_adapter_slot(a, l, i)) continue;
        lora_train *tr = &a->train[l * GPTOSS_LORA_MODULES + i];
        const gptoss_lora *x = &a->mod[l * GPTOSS_LORA_MODULES + i];
        for (int k = 0; k < 4 && !rc; k++) {
          char name[128];
          int64_t shape[2];
          moment_name(a, l, i, k, name, sizeof name, shape);
          if (gptoss_st_find(st, name) && a->optim != GPTOSS_OPTIM_NONE && a->optim != kind) {   /* (a file without moments fits any) */
            rc = gptoss_fail(GPTOSS_ESTATE, "%s: the file holds %s optimizer state, but the adapter's moments are %s's", path,
                             optim_name(kind), optim_name(a->optim));
            continue;
          }
          const gptoss_tensor *t = state_tensor(st, path, name, q8 ? GPTOSS_U8 : GPTOSS_F32, 2, shape[0], shape[1], &rc), *ta = NULL;
          if (!t) { if (!rc && n > 0) rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s missing", path, name); continue; }
          if (q8) {
            size_t len = strlen(name);
            snprintf(name + len, sizeof name - len, ".absmax");
            ta = state_tensor(st, path, name, GPTOSS_F32, 1, (int64_t)gptoss_q8_blocks((size_t)(shape[0] * shape[1])), 0, &rc);
            if (!rc && !ta) rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s missing", path, name);
          }
          if (rc || pass == 0) continue;
          if (q8) {
            if ((rc = gptoss_adamw8_alloc(tr, (size_t)x->rk * x->in, (size_t)x->out * x->rk))) continue;
            memcpy(tr->q8[k], t->data, t->nbytes);
            memcpy(tr->absmax8[k], ta->data, ta->nbytes);
          } else {
            float **dst = moment(tr, k);
            if (!*dst && !(*dst = malloc(t->nbytes))) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); continue; }
            memcpy(*dst, t->data, t->nbytes);
          }
          loaded = 1;
        }
      }
  if (!rc) a->steps = (int)n;
  if (loaded) a->optim = kind;
  gptoss_st_free(st);
  return rc;
}
/* }====================================================== */
