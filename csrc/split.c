/*
** split.c: one model split over several devices by its experts (expert
** parallelism), as a backend over backends. A device string of parts
** joined by '+' ("cuda:0+cuda:1", "cpu+cpu") loads one rank per part, each
** a model of the part's own backend that holds every weight but the
** experts outside its share; the ranks' communicator (comm_new of their
** backend: NCCL across GPUs, host memory otherwise) sums the experts' rows
** inside each layer (see backend.h). To the engine and sessions a split
** model is one model: this backend runs each planned pass on every rank at
** once, one thread a rank, and answers for rank 0, whose sessions hold the
** logits and sample.
**
** Each session is one session a rank, with the same capacity and ring; the
** fields the engine keeps (position, rewinds, adapter, trace) are copied to
** the ranks' sessions before each operation, so the ranks never advance
** state of their own.
*/
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend.h"

typedef struct split_model {
  int n;                             /* ranks */
  gptoss_model **rank;               /* [n] */
  gptoss_comm *comm;
  gptoss_pool *pool;                 /* n threads: rank r's pass runs on thread r */
  const gptoss_backend *rbe;         /* the ranks' backend */
} split_model;

typedef struct split_session {
  gptoss_session **rank;             /* [n] */
} split_session;

static split_model *split_of(const gptoss_model *m) { return m->bm; }
static gptoss_session *rank_session(const gptoss_session *s, int r) { return ((split_session *)s->bs)->rank[r]; }

/* {====================================================== model */
static gptoss_status split_model_init(gptoss_model *m, const gptoss_model_opts *o) {
  int E = m->cfg.num_local_experts, n;
  char (*part)[GPTOSS_DEVICE_LEN] = calloc(GPTOSS_DEVICE_LEN / 2, sizeof *part);
  if (!part) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  gptoss_status rc = gptoss_device_parts(m->device, part, GPTOSS_DEVICE_LEN / 2, &n);
  if (!rc && n > E)
    rc = gptoss_fail(GPTOSS_EARG, "device '%s' splits %d experts over %d ranks: at most one rank an expert", m->device, E, n);
  split_model *sm = rc ? NULL : calloc(1, sizeof *sm);
  if (!rc && !sm) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  if (rc) { free(part); return rc; }
  m->bm = sm;                        /* model_free releases what is set up from here on */
  sm->n = n;
  sm->rank = calloc((size_t)n, sizeof *sm->rank);
  int *devs = calloc((size_t)n, sizeof *devs);
  if (!sm->rank || !devs) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  for (int r = 0; r < n; r++)
    if ((rc = gptoss_device_backend(part[r], &sm->rbe, &devs[r]))) goto done;
  if (!sm->rbe->comm_new) { rc = gptoss_fail(GPTOSS_EUNSUP, "the %s backend cannot split a model", sm->rbe->name); goto done; }
  if ((rc = sm->rbe->comm_new(devs, n, &sm->comm))) goto done;
  if (!(sm->pool = gptoss_pool_new(n)) || gptoss_pool_size(sm->pool) < n) {
    rc = gptoss_fail(GPTOSS_ENOMEM, "cannot start %d threads for the ranks of %s", n, m->device);
    goto done;
  }
  /* each rank loads on the caller's thread in turn; CPU ranks share the
     model's threads among them */
  gptoss_model_opts ro = *o;
  ro.progress = NULL;
  ro.progress_ud = NULL;
  ro.context = m->context;
  if (sm->rbe == &gptoss_cpu_backend) ro.threads = m->threads / n > 0 ? m->threads / n : 1;
  for (int r = 0; r < n && !rc; r++) {
    ro.device = part[r];
    int lo = (int)((long)E * r / n), hi = (int)((long)E * (r + 1) / n);
    if ((rc = gptoss_model_load_rank(m->dir, &ro, lo, hi, r, sm->comm, &sm->rank[r])))
      rc = gptoss_fail(rc, "%s, rank %d (%s, experts %d..%d): %s", m->device, r, part[r], lo, hi - 1, gptoss_errmsg());
  }
done:
  free(devs);
  free(part);
  return rc;
}

static void split_model_free(gptoss_model *m) {
  split_model *sm = split_of(m);
  if (!sm) return;
  for (int r = 0; sm->rank && r < sm->n; r++) gptoss_model_free(sm->rank[r]);
  if (sm->comm) sm->comm->free(sm->comm);
  if (sm->pool) gptoss_pool_free(sm->pool);
  free(sm->rank);
  free(sm);
  m->bm = NULL;
}

static void split_memory(const gptoss_model *m, gptoss_memory *out) {
  split_model *sm = split_of(m);
  memset(out, 0, sizeof *out);
  for (int r = 0; r < sm->n; r++) {
    gptoss_memory x;
    gptoss_model_memory(sm->rank[r], &x);
    out->weights += x.weights; out->kv += x.kv; out->workspace += x.workspace; out->total += x.total; out->host += x.host;
    /* a GPU shared by two ranks is counted once */
    int seen = 0;
    for (int q = 0; q < r; q++) seen |= strcmp(sm->rank[q]->device, sm->rank[r]->device) == 0;
    if (!seen) { out->device_free += x.device_free; out->device_total += x.device_total; }
  }
}

static uint64_t split_session_bytes(const gptoss_model *m, int context, int ring) {
  split_model *sm = split_of(m);
  uint64_t total = 0;
  for (int r = 0; r < sm->n; r++) total += sm->rbe->session_bytes(sm->rank[r], context, ring);
  return total;
}
/* }====================================================== */

/* {====================================================== sessions */
/* the engine's fields of s onto its rank sessions; rank 0 alone traces, into s's buffers */
static void mirror(const gptoss_session *s) {
  split_model *sm = split_of(s->m);
  for (int r = 0; r < sm->n; r++) {
    gptoss_session *x = rank_session(s, r);
    x->pos = s->pos; x->context = s->context; x->ring = s->ring; x->held_from = s->held_from;
    x->has_logits = s->has_logits; x->lost = s->lost; x->adapter = s->adapter;
    x->history = s->history;
    x->trace = r == 0 && s->trace;
    x->trace_e = s->trace_e; x->trace_w = s->trace_w; x->trace_n = s->trace_n; x->trace_cap = s->trace_cap;
  }
}

static void split_session_free(gptoss_session *s) {
  split_session *ss = s->bs;
  if (!ss) return;
  split_model *sm = split_of(s->m);
  for (int r = 0; r < sm->n; r++) {
    gptoss_session *x = ss->rank[r];
    if (!x) continue;
    if (x->bs) x->m->be->session_free(x);
    free(x->logits);
    free(x);
  }
  free(ss->rank);
  free(ss);
  s->bs = NULL;
}

static gptoss_status split_session_init(gptoss_session *s) {
  split_model *sm = split_of(s->m);
  split_session *ss = calloc(1, sizeof *ss);
  if (!ss || !(ss->rank = calloc((size_t)sm->n, sizeof *ss->rank))) {
    free(ss);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory for a session");
  }
  s->bs = ss;
  for (int r = 0; r < sm->n; r++) {
    gptoss_session *x = calloc(1, sizeof *x);
    if (!x) { split_session_free(s); return gptoss_fail(GPTOSS_ENOMEM, "out of memory for a session"); }
    ss->rank[r] = x;
    x->m = sm->rank[r];
    x->context = s->context;
    x->ring = s->ring;
    if (!(x->logits = malloc(sizeof(float) * (size_t)s->m->cfg.vocab_size))) {
      split_session_free(s);
      return gptoss_fail(GPTOSS_ENOMEM, "out of memory for a session");
    }
    gptoss_status rc = x->m->be->session_init(x);
    if (rc) { split_session_free(s); return rc; }
  }
  return GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== passes over the ranks */
/* What one call gives every rank: an operation and its arguments, and
   each rank's result and message (errors are per thread). */
typedef struct split_call {
  split_model *sm;
  gptoss_status (*op)(struct split_call *c, int r);
  const gptoss_plan *plan;
  gptoss_session *dst;
  const gptoss_session *src;
  int keep;
  gptoss_status *rc;                 /* [n] */
  char (*msg)[256];                  /* [n] */
} split_call;

static void rank_thread(void *ctx, int tid, int nth) {
  (void)nth;
  split_call *c = ctx;
  gptoss_status rc = c->op(c, tid);
  c->rc[tid] = rc;
  if (rc) {
    snprintf(c->msg[tid], sizeof c->msg[tid], "%s", gptoss_errmsg());
    c->sm->comm->abort(c->sm->comm);   /* no rank waits for this one's sums */
  }
}

/* Runs c->op on every rank at once; the first failure that is not another
   rank's abort is the call's, named by its rank's device. */
static gptoss_status on_ranks(gptoss_model *m, split_call *c) {
  split_model *sm = split_of(m);
  gptoss_status rcs[16], *rc = sm->n <= 16 ? rcs : calloc((size_t)sm->n, sizeof *rc);
  char (*msg)[256] = calloc((size_t)sm->n, sizeof *msg);
  if (!rc || !msg) {
    if (rc != rcs) free(rc);
    free(msg);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  }
  c->sm = sm;
  c->rc = rc;
  c->msg = msg;
  gptoss_pool_run(sm->pool, rank_thread, c);
  int bad = -1;
  for (int r = 0; r < sm->n; r++)
    if (rc[r] && (bad < 0 || (rc[bad] == GPTOSS_ESTATE && rc[r] != GPTOSS_ESTATE))) bad = r;
  gptoss_status out = GPTOSS_OK;
  if (bad >= 0) {
    out = gptoss_fail(rc[bad], "%s, rank %d (%s): %s", m->device, bad, sm->rank[bad]->device, msg[bad]);
    gptoss_status again = sm->comm->reset(sm->comm);
    if (again) out = gptoss_fail(again, "%s: cannot join its ranks again after a failed pass: %s", m->device, gptoss_errmsg());
  }
  if (rc != rcs) free(rc);
  free(msg);
  return out;
}

/* ss's rank-r sessions, in stack (room for RANK_STACK) when they fit, else
   in memory the caller frees when it is not stack; NULL when out of memory */
#define RANK_STACK 64
static gptoss_session **rank_sessions(gptoss_session *const *ss, int n, int r, gptoss_session **stack) {
  gptoss_session **rs = n <= RANK_STACK ? stack : malloc(sizeof *rs * (size_t)n);
  if (!rs) { gptoss_fail(GPTOSS_ENOMEM, "out of memory"); return NULL; }
  for (int i = 0; i < n; i++) rs[i] = rank_session(ss[i], r);
  return rs;
}

/* Rank 0 computes the head for the plan's rows; the others run the layers
   alone (no output rows, no session keeps logits): only rank 0's logits
   are ever read (split_sample, split_logits), so the vocabulary-wide
   product is made once a pass, not once a rank. */
static gptoss_status run_op(split_call *c, int r) {
  const gptoss_plan *p = c->plan;
  gptoss_session *stack[RANK_STACK], **rs = rank_sessions(p->ss, p->nss, r, stack);
  int32_t none[RANK_STACK], *keep = r == 0 || p->nss <= RANK_STACK ? none : malloc(sizeof *keep * (size_t)p->nss);
  if (!rs || !keep) {
    if (rs && rs != stack) free(rs);
    return rs ? gptoss_fail(GPTOSS_ENOMEM, "out of memory") : gptoss_errcode();
  }
  gptoss_plan rp = *p;
  rp.ss = rs;
  if (r) {
    for (int i = 0; i < p->nss; i++) keep[i] = -1;
    rp.nout = 0; rp.rows = NULL; rp.out = NULL; rp.keep = keep;
  }
  gptoss_status rc = c->sm->rbe->run(&rp);
  if (rs != stack) free(rs);
  if (keep != none) free(keep);
  return rc;
}

static gptoss_status split_run(const gptoss_plan *p) {
  gptoss_model *m = p->ss[0]->m;
  split_model *sm = split_of(m);
  for (int i = 0; i < p->nss; i++) {
    /* the ranks' experts LoRA reads rows of every expert (checked on the CPU only) */
    if (p->ss[i]->adapter && sm->rbe != &gptoss_cpu_backend)
      return gptoss_fail(GPTOSS_EUNSUP, "LoRA adapters on a model split over GPUs (%s) are not supported yet", m->device);
    mirror(p->ss[i]);
  }
  split_call c = { .op = run_op, .plan = p };
  return on_ranks(m, &c);
}

static gptoss_status copy_op(split_call *c, int r) {
  gptoss_session *d = rank_session(c->dst, r);
  const gptoss_session *s = rank_session(c->src, r);
  gptoss_status rc = c->sm->rbe->session_copy(d, s, c->keep);
  /* a host backend's logits are the session's own buffer, which it leaves to the caller */
  if (!rc && !c->sm->rbe->logits && c->keep == s->pos) memcpy(d->logits, s->logits, sizeof(float) * (size_t)s->m->cfg.vocab_size);
  return rc;
}

static gptoss_status split_session_copy(gptoss_session *dst, const gptoss_session *src, int keep) {
  mirror(src);
  mirror(dst);
  split_call c = { .op = copy_op, .dst = dst, .src = src, .keep = keep };
  return on_ranks(src->m, &c);
}

/* sampling and logits are rank 0's, whose sessions hold the pass's logits */
static gptoss_status split_sample(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *out) {
  split_model *sm = split_of(ss[0]->m);
  for (int i = 0; i < n; i++) mirror(ss[i]);
  gptoss_session *stack[RANK_STACK], **rs = rank_sessions(ss, n, 0, stack);
  if (!rs) return gptoss_errcode();
  gptoss_status rc = sm->rbe->sample(rs, n, smp, out);
  if (rs != stack) free(rs);
  return rc;
}

static gptoss_status split_logits(const gptoss_session *s, float *out) {
  split_model *sm = split_of(s->m);
  mirror(s);
  gptoss_session *x = rank_session(s, 0);
  if (sm->rbe->logits) return sm->rbe->logits(x, out);
  memcpy(out, x->logits, sizeof(float) * (size_t)s->m->cfg.vocab_size);
  return GPTOSS_OK;
}
/* }====================================================== */

/* One table per kind of rank: what a split model may hold in a pass and
   whether its sessions are budgeted in bytes are its ranks' backend's.
   No fused decode step (each token's experts cross the ranks) and no
   training (refused by name). */
static gptoss_backend split_tables[2];
static const gptoss_backend *split_ranks_of[2];
static pthread_mutex_t split_mu = PTHREAD_MUTEX_INITIALIZER;

const gptoss_backend *gptoss_split_backend(const gptoss_backend *rbe) {
  const gptoss_backend *out = NULL;
  pthread_mutex_lock(&split_mu);
  for (int i = 0; i < 2 && !out; i++) {
    if (split_ranks_of[i] == rbe) out = &split_tables[i];
    else if (!split_ranks_of[i]) {
      gptoss_backend b = {
        "split", split_model_init, split_model_free, split_session_init, split_session_free, split_session_copy,
        split_run, rbe->max_pass_tokens, split_sample, split_memory, NULL, split_logits,
        rbe->session_bytes ? split_session_bytes : NULL, NULL, NULL,
      };
      split_tables[i] = b;
      split_ranks_of[i] = rbe;
      out = &split_tables[i];
    }
  }
  pthread_mutex_unlock(&split_mu);
  if (!out) gptoss_fail(GPTOSS_EUNSUP, "no split backend over %s", rbe->name);
  return out;
}
