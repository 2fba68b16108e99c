/*
** engine_train.c: LoRA training inside a running engine, between its
** serving steps, on the same model and weights.
**
** A job is a list of examples (copied at submit) and what to do with them:
** backward passes into an adapter's gradients, optionally an optimizer step
** after the last, or the loss alone. The engine thread runs one example of
** the first job between two serving steps, so a request's next token waits
** at most one example's pass. While requests are active, training earns
** credit as the engine serves: share/(1 - share) seconds per second of
** serving steps, and an example runs only once the credit covers what the
** last one took (then pays for itself), so training takes `share` of the
** engine's time and serving the rest, at any moment and not only on average. With no request active the share does
** not apply: training runs back to back, and a request that arrives waits
** at most the example under way.
**
** gptoss_lora_loss is here too: the forward-only loss a job evaluates with.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "engine_impl.h"

#define LOSS_CHUNK 32          /* positions whose logits one feed returns while computing a loss */
#define CREDIT_CAP 1.0         /* seconds of training credit kept at most (or the last example's time, when
                                  longer): no bursts after a long serve */

struct gptoss_train_job {
  gptoss_engine *e;
  int refs;                    /* the caller's and, until done, the engine's; under e->mu */
  gptoss_train_job *next;      /* the engine's queue */
  /* fixed at submit */
  gptoss_adapter *a;
  gptoss_train_job_opts o;
  int n;
  gptoss_train_example *ex;    /* ids and masks in one allocation each */
  int32_t *ids;
  uint8_t *masks;
  int32_t *starts;             /* the packed examples' starts, in one allocation too */
  double t_submit;
  /* under e->mu */
  int cancel;
  gptoss_train_job_info info;
};

/* {====================================================== the loss alone */
gptoss_status gptoss_lora_loss(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                               double *loss, int *count) {
  *loss = 0;
  *count = 0;
  if (n < 2) return gptoss_fail(GPTOSS_EARG, "lora loss: a sequence needs at least 2 tokens (got %d)", n);
  int V = m->cfg.vocab_size;
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= V)
      return gptoss_fail(GPTOSS_ERANGE, "lora loss: token id %d at position %d is outside the vocabulary (%d)", ids[i],
                         i + 1, V);
  if (n - 1 > m->context)
    return gptoss_fail(GPTOSS_ERANGE, "lora loss: %d tokens exceed the model's context of %d", n, m->context);
  if (a) {
    gptoss_status rc = gptoss_adapter_check(a, m);
    if (rc) return rc;
  }
  /* the last token is only a target: n - 1 positions are fed; the default
     rewind lets each LOSS_CHUNK go as one pass (a rewind of 0 would keep a
     ring of window + 1, a pass of one token) */
  gptoss_session_opts so = {n - 1, GPTOSS_SESSION_REWIND};
  gptoss_session *s;
  gptoss_status rc = gptoss_session_new(m, &so, &s);
  if (rc) return rc;
  float *lg = malloc(sizeof(float) * (size_t)V * LOSS_CHUNK);
  if (!lg) { gptoss_session_free(s); return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the loss's logits"); }
  if (a) rc = gptoss_session_set_adapter(s, a);
  double total = 0;
  int c = 0;
  for (int t0 = 0; !rc && t0 < n - 1; t0 += LOSS_CHUNK) {
    int k = n - 1 - t0 < LOSS_CHUNK ? n - 1 - t0 : LOSS_CHUNK;
    if ((rc = gptoss_session_feed(s, ids + t0, k, GPTOSS_LOGITS_ALL, lg))) break;
    for (int i = 0; i < k; i++) {
      int t = t0 + i + 1;   /* the target's position */
      if (mask && !mask[t]) continue;
      /* -log softmax(row)[target] in double, as the Lua Floats' nll */
      const float *p = lg + (size_t)i * V;
      double mx = p[0], sum = 0;
      for (int v = 1; v < V; v++) if (p[v] > mx) mx = p[v];
      for (int v = 0; v < V; v++) sum += exp((double)p[v] - mx);
      total += -((double)p[ids[t]] - mx - log(sum));
      c++;
    }
  }
  free(lg);
  gptoss_session_free(s);
  if (rc) return rc;
  *loss = total;
  *count = c;
  return GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== jobs */
static void job_release(gptoss_train_job *j) {
  gptoss_adapter_free(j->a);
  free(j->ex);
  free(j->ids);
  free(j->masks);
  free(j->starts);
  free(j);
}

/* drops a reference; the caller holds e->mu, which this releases. A job
   holds the engine as a request does: the last of them frees it */
static void job_unref_unlock(gptoss_train_job *j) {
  gptoss_engine *e = j->e;
  int last = --j->refs == 0;
  if (last) e->refs--;
  int engine_last = last && e->refs == 0;
  pthread_mutex_unlock(&e->mu);
  if (last) job_release(j);
  if (engine_last) engine_release(e);
}

/* under mu: the job is done and leaves the queue (it is its head) */
static void job_done(gptoss_engine *e, gptoss_train_job *j, int finish, const char *err) {
  j->info.state = GPTOSS_REQ_DONE;
  j->info.finish = finish;
  if (err) snprintf(j->info.error, sizeof j->info.error, "%s", err);
  e->jobs = j->next;
  if (!e->jobs) e->jobs_tail = NULL;
  j->next = NULL;
  pthread_cond_broadcast(&e->news);
  gptoss_wake_signal(e->fd);
}

gptoss_status gptoss_engine_train(gptoss_engine *e, gptoss_adapter *a, const gptoss_train_example *ex, int n,
                                  const gptoss_train_job_opts *o, gptoss_train_job **out) {
  *out = NULL;
  gptoss_train_job_opts d;
  memset(&d, 0, sizeof d);
  if (o) d = *o;
  const gptoss_model *m = e->m;
  if (!a) return gptoss_fail(GPTOSS_EARG, "train job: an adapter is required");
  if (n <= 0) return gptoss_fail(GPTOSS_EARG, "train job: no examples");
  if (!(d.share >= 0 && d.share <= 1)) return gptoss_fail(GPTOSS_EARG, "train job: share must be in 0..1 (got %g)", d.share);
  if (d.loss_only && (d.step || d.zero_grad))
    return gptoss_fail(GPTOSS_EARG, "train job: loss_only takes neither step nor zero_grad");
  gptoss_status rc = gptoss_adapter_check(a, m);
  if (rc) return rc;
  size_t total = 0, total_starts = 0;
  for (int i = 0; i < n; i++) {
    if (!ex[i].ids || ex[i].n < 2)
      return gptoss_fail(GPTOSS_EARG, "train job: example %d needs at least 2 tokens (got %d)", i + 1, ex[i].n);
    if (ex[i].n - 1 > e->o.context)
      return gptoss_fail(GPTOSS_ERANGE, "train job: example %d's %d tokens exceed the engine's context of %d", i + 1,
                         ex[i].n, e->o.context);
    for (int t = 0; t < ex[i].n; t++)
      if (ex[i].ids[t] < 0 || ex[i].ids[t] >= m->cfg.vocab_size)
        return gptoss_fail(GPTOSS_ERANGE, "train job: example %d: token id %d at position %d is outside the vocabulary (%d)",
                           i + 1, (int)ex[i].ids[t], t + 1, m->cfg.vocab_size);
    char what[64];
    snprintf(what, sizeof what, "train job: example %d", i + 1);
    if ((rc = gptoss_check_starts(what, ex[i].starts, ex[i].ns, ex[i].n))) return rc;
    if (d.loss_only && ex[i].ns)
      return gptoss_fail(GPTOSS_EARG, "train job: example %d: packed examples (starts) are for training; loss_only scores "
                         "one sequence an example", i + 1);
    total += (size_t)ex[i].n;
    total_starts += (size_t)ex[i].ns;
  }
  gptoss_train_job *j = calloc(1, sizeof *j);
  if (!j) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  j->ex = malloc(sizeof *j->ex * (size_t)n);
  j->ids = malloc(sizeof(int32_t) * total);
  j->masks = malloc(total);
  j->starts = malloc(sizeof(int32_t) * (total_starts ? total_starts : 1));
  if (!j->ex || !j->ids || !j->masks || !j->starts) { job_release(j); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  size_t at = 0, at_starts = 0;
  for (int i = 0; i < n; i++) {
    memcpy(j->ids + at, ex[i].ids, sizeof(int32_t) * (size_t)ex[i].n);
    /* the backward pass takes a mask always */
    if (ex[i].mask) memcpy(j->masks + at, ex[i].mask, (size_t)ex[i].n);
    else memset(j->masks + at, 1, (size_t)ex[i].n);
    j->ex[i].ids = j->ids + at;
    j->ex[i].mask = j->masks + at;
    j->ex[i].n = ex[i].n;
    if (ex[i].ns) memcpy(j->starts + at_starts, ex[i].starts, sizeof(int32_t) * (size_t)ex[i].ns);
    j->ex[i].starts = ex[i].ns ? j->starts + at_starts : NULL;
    j->ex[i].ns = ex[i].ns;
    at += (size_t)ex[i].n;
    at_starts += (size_t)ex[i].ns;
  }
  j->a = gptoss_adapter_ref(a);
  j->o = d;
  j->n = n;
  j->e = e;
  j->refs = 2;
  j->t_submit = engine_now();
  j->info.state = GPTOSS_REQ_QUEUED;
  j->info.examples = n;
  j->info.queued_s = -1;
  pthread_mutex_lock(&e->mu);
  if (!e->running || e->stopping) {
    pthread_mutex_unlock(&e->mu);
    job_release(j);
    return gptoss_fail(GPTOSS_ESTATE, "engine is closed");
  }
  if (e->jobs_tail) e->jobs_tail->next = j;
  else e->jobs = j;
  e->jobs_tail = j;
  e->refs++;
  e->st.train_jobs++;
  pthread_cond_signal(&e->work);
  pthread_mutex_unlock(&e->mu);
  *out = j;
  return GPTOSS_OK;
}

void gptoss_train_job_info_get(gptoss_train_job *j, gptoss_train_job_info *out) {
  pthread_mutex_lock(&j->e->mu);
  *out = j->info;
  pthread_mutex_unlock(&j->e->mu);
}

int gptoss_train_job_wait(gptoss_train_job *j, double timeout_s) {
  gptoss_engine *e = j->e;
  struct timespec until = engine_deadline(timeout_s);
  pthread_mutex_lock(&e->mu);
  int rc = 0;
  while (j->info.state != GPTOSS_REQ_DONE && rc == 0) rc = pthread_cond_timedwait(&e->news, &e->mu, &until);
  int done = j->info.state == GPTOSS_REQ_DONE;
  pthread_mutex_unlock(&e->mu);
  return done;
}

void gptoss_train_job_cancel(gptoss_train_job *j) {
  pthread_mutex_lock(&j->e->mu);
  j->cancel = 1;
  pthread_cond_signal(&j->e->work);
  pthread_mutex_unlock(&j->e->mu);
}

void gptoss_train_job_free(gptoss_train_job *j) {
  if (!j) return;
  pthread_mutex_lock(&j->e->mu);
  j->cancel = 1;
  pthread_cond_signal(&j->e->work);
  job_unref_unlock(j);
}
/* }====================================================== */

/* {====================================================== the engine thread */
int engine_train_pending(const gptoss_engine *e) { return e->jobs != NULL; }
int engine_train_count(const gptoss_engine *e) {
  int n = 0;
  for (const gptoss_train_job *j = e->jobs; j; j = j->next) n++;
  return n;
}

/* Runs the head job's next example (mu not held); publishes it, and the
   job's end, under mu. */
static void run_example(gptoss_engine *e, gptoss_train_job *j, int k) {
  const gptoss_train_example *x = &j->ex[k];
  double loss = 0, gn = 0, t0 = engine_now();
  int count = 0;
  gptoss_status rc = GPTOSS_OK;
  if (k == 0 && j->o.zero_grad) gptoss_adapter_zero_grad(j->a);
  if (j->o.loss_only) rc = gptoss_lora_loss(e->m, j->a, x->ids, x->mask, x->n, &loss, &count);
  else rc = gptoss_lora_backward_packed(e->m, j->a, x->ids, x->mask, x->n, x->starts, x->ns, &loss, &count);
  int last = k + 1 == j->n;
  if (!rc && last && j->o.step) {
    gptoss_adamw w = j->o.adamw;
    rc = gptoss_adapter_step(j->a, &w, &gn);
  }
  double dt = engine_now() - t0;
  char msg[256] = "";
  if (rc) snprintf(msg, sizeof msg, "%s", gptoss_errmsg());
  pthread_mutex_lock(&e->mu);
  gptoss_train_job_info *in = &j->info;
  in->train_s += dt;
  e->st.train_s += dt;
  if (!rc) {
    in->done = k + 1;
    in->loss += loss;
    in->count += count;
    in->tokens += x->n - 1;
    e->st.train_examples++;
    e->st.train_tokens += (uint64_t)(x->n - 1);
    if (last) in->grad_norm = gn;
  }
  if (rc) job_done(e, j, GPTOSS_FINISH_ERROR, msg);
  else if (last) job_done(e, j, GPTOSS_FINISH_STOP, NULL);
  else {   /* progress is news too */
    pthread_cond_broadcast(&e->news);
    gptoss_wake_signal(e->fd);
  }
  if (in->state == GPTOSS_REQ_DONE) job_unref_unlock(j);   /* the engine's reference */
  else pthread_mutex_unlock(&e->mu);
}

void engine_train_between(gptoss_engine *e, int idle, double step_s) {
  pthread_mutex_lock(&e->mu);
  gptoss_train_job *j = e->jobs;
  /* cancelled jobs end here, without running */
  while (j && j->cancel) {
    job_done(e, j, GPTOSS_FINISH_CANCELLED, NULL);
    job_unref_unlock(j);
    pthread_mutex_lock(&e->mu);
    j = e->jobs;
  }
  if (!j) { pthread_mutex_unlock(&e->mu); return; }
  double share = j->o.share;
  if (!idle) {
    if (share <= 0) { pthread_mutex_unlock(&e->mu); return; }
    /* an example waits until the credit covers what the last one took, so
       that training never runs ahead of its share, even at first (share 1:
       an example after every serving step) */
    double cap = e->train_last_s > CREDIT_CAP ? e->train_last_s : CREDIT_CAP;
    e->train_credit += share >= 1 ? cap : step_s * share / (1 - share);
    if (e->train_credit > cap) e->train_credit = cap;
    if (e->train_credit < e->train_last_s || e->train_credit <= 0) { pthread_mutex_unlock(&e->mu); return; }
  }
  int k = j->info.done;
  if (j->info.state == GPTOSS_REQ_QUEUED) {
    j->info.state = GPTOSS_REQ_RUNNING;
    j->info.queued_s = engine_now() - j->t_submit;
  }
  pthread_mutex_unlock(&e->mu);
  double t0 = engine_now();
  run_example(e, j, k);
  double took = engine_now() - t0;
  e->train_last_s = took;
  if (!idle) e->train_credit -= took;
}

void engine_train_stop(gptoss_engine *e) {
  pthread_mutex_lock(&e->mu);
  while (e->jobs) {
    gptoss_train_job *j = e->jobs;
    job_done(e, j, GPTOSS_FINISH_CANCELLED, NULL);
    job_unref_unlock(j);
    pthread_mutex_lock(&e->mu);
  }
  pthread_mutex_unlock(&e->mu);
}
/* }====================================================== */
