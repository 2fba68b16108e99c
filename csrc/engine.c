/*
** engine.c: continuous batching. One thread per engine owns the model
** while the engine runs; callers on any thread submit requests and read
** what they produced without ever waiting for a forward pass.
**
** Each step the thread admits waiting requests (bounded by max_batch and
** the KV budget), then runs ONE gptoss_forward over every active request:
** a prefill chunk for those still reading their prompt (all chunks of a
** step together at most chunk_tokens, so a long prompt delays the others'
** next token by a bounded amount) and one token for every decoding one.
** Every request whose feed ended samples with its own sampler, and the new
** tokens are published under the mutex, which is held only to copy ids and
** flags, never across a forward pass. A request that asks for log-
** probabilities gets them from its session's logits after the step, on this
** thread and outside the mutex; the others pay nothing for them.
**
** Prefix reuse: finished requests leave their session in an LRU cache keyed
** by its token history (and adapter). A new request forks the entry with the
** longest common prefix and rewinds the fork to it, so only the rest of its
** prompt is computed. Sessions are opened with the engine's rewind
** allowance, which sliding layers need to go back over a reply; the KV they
** hold is budgeted with it.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "engine_impl.h"

/* {====================================================== memory estimate */
/* A request's session is opened for the positions it can reach (prompt +
   max_tokens, within the engine's context) in blocks of kv_block, at most
   a block past its prompt at first, and grows a block or more at a time as
   it generates (grow, below): on a backend that allocates a session's whole
   cache when it opens it (CUDA), a request pays for what it holds, not for
   the model's 131,072 positions. */
static int capacity_for(const gptoss_engine *e, int64_t positions) {
  int64_t b = e->o.kv_block, c = (positions + b - 1) / b * b;
  return c > e->o.context ? e->o.context : (int)c;
}

/* What the budget counts for a session of this capacity that reaches
   `positions`: on a backend that allocates up front, what it takes when
   opened (gptoss_backend.session_bytes). One that grows its caches as
   tokens come (the CPU) is budgeted by positions: full layers keep every
   position, sliding layers at most window + rewind, K and V in fp32, so a
   request counts prompt + max_tokens positions, what it can reach. */
static uint64_t kv_bytes_at(const gptoss_engine *e, int capacity, int positions) {
  const gptoss_model *m = e->m;
  const gptoss_config *c = &m->cfg;
  if (m->be->session_bytes)
    return m->be->session_bytes(m, capacity, gptoss_session_ring(c, capacity, e->o.rewind));
  int ctx = e->o.context;
  if (positions > ctx) positions = ctx;
  int ring = gptoss_session_ring(c, ctx, e->o.rewind);   /* what its sessions keep */
  uint64_t per = 2ull * (uint64_t)c->num_key_value_heads * (uint64_t)c->head_dim * sizeof(float), total = 0;
  for (int l = 0; l < c->num_hidden_layers; l++)
    total += per * (uint64_t)(c->layer_sliding[l] && ring < positions ? ring : positions);
  return total;
}

uint64_t gptoss_engine_kv_bytes(const gptoss_engine *e, int positions) {
  return kv_bytes_at(e, capacity_for(e, positions), positions);
}
/* }====================================================== */

/* {====================================================== wake-up descriptor */
static gptoss_status fd_open(gptoss_engine *e) { return gptoss_wake_open(e->fd); }
static void fd_close(gptoss_engine *e) { gptoss_wake_close(e->fd); }
static void fd_signal(gptoss_engine *e) { gptoss_wake_signal(e->fd); }

int gptoss_engine_fd(const gptoss_engine *e) { return e->fd[0]; }
int gptoss_engine_drain(gptoss_engine *e) { return gptoss_wake_drain(e->fd); }
int gptoss_engine_wait(gptoss_engine *e, double timeout_s) {
  return gptoss_wake_poll(e->fd, timeout_s) && gptoss_engine_drain(e);
}
/* }====================================================== */

/* {====================================================== requests */
static void request_release(gptoss_request *r) {
  gptoss_sampler_free(r->smp);
  gptoss_adapter_free(r->adapter);
  free(r->prompt);
  free(r->stop);
  free(r->gen);
  free(r->lp);
  free(r);
}


/* drops a reference; the caller holds e->mu, which this releases */
static void request_unref_unlock(gptoss_request *r) {
  gptoss_engine *e = r->e;
  int last = --r->refs == 0;
  if (last) e->refs--;
  int engine_last = last && e->refs == 0;
  pthread_mutex_unlock(&e->mu);
  if (last) request_release(r);
  if (engine_last) engine_release(e);
}

/* under mu: the request is done; the caller then drops the engine's reference */
static void request_done(gptoss_engine *e, gptoss_request *r, int finish, const char *err) {
  r->state = GPTOSS_REQ_DONE;
  r->finish = finish;
  r->t_done = engine_now();
  if (err) snprintf(r->err, sizeof r->err, "%s", err);
  if (finish == GPTOSS_FINISH_CANCELLED) e->st.cancelled++;
  else if (finish == GPTOSS_FINISH_ERROR) e->st.failed++;
  else e->st.completed++;
  pthread_cond_broadcast(&e->news);
  fd_signal(e);
}

/* under mu: appends a sampled id and, when the request records them, its
   1 + top_logprobs log-probabilities from lp */
static gptoss_status gen_push(gptoss_request *r, int32_t id, const gptoss_logprob *lp) {
  size_t per = r->logprobs ? 1 + (size_t)r->top_logprobs : 0;
  if (r->gen_n == r->gen_cap) {
    size_t cap = r->gen_cap ? r->gen_cap * 2 : 64;
    int32_t *g = realloc(r->gen, sizeof(int32_t) * cap);
    if (!g) return GPTOSS_ENOMEM;
    r->gen = g;
    if (per) {
      gptoss_logprob *l = realloc(r->lp, sizeof *l * per * cap);
      if (!l) return GPTOSS_ENOMEM;
      r->lp = l;
    }
    r->gen_cap = cap;
  }
  if (per) memcpy(r->lp + r->gen_n * per, lp, sizeof *lp * per);
  r->gen[r->gen_n++] = id;
  return GPTOSS_OK;
}

size_t gptoss_request_take(gptoss_request *r, int32_t *ids, size_t cap, gptoss_request_info *info) {
  return gptoss_request_take_logprobs(r, ids, NULL, cap, info);
}

size_t gptoss_request_take_logprobs(gptoss_request *r, int32_t *ids, gptoss_token_logprobs *lps, size_t cap,
                                    gptoss_request_info *info) {
  gptoss_engine *e = r->e;
  pthread_mutex_lock(&e->mu);
  size_t n = r->gen_n - r->taken;
  if (n > cap) n = cap;
  if (n) memcpy(ids, r->gen + r->taken, sizeof(int32_t) * n);
  if (lps && r->logprobs) {
    size_t per = 1 + (size_t)r->top_logprobs;
    for (size_t i = 0; i < n; i++) {
      const gptoss_logprob *l = r->lp + (r->taken + i) * per;
      lps[i].token = l[0];
      lps[i].n_top = r->top_logprobs;
      memcpy(lps[i].top, l + 1, sizeof *l * (size_t)r->top_logprobs);
    }
  }
  r->taken += n;
  if (info) {
    info->state = r->state;
    info->finish = r->finish;
    info->prompt_tokens = r->n_prompt;
    info->cached_tokens = r->cached_tokens;
    info->generated = (int)r->gen_n;
    info->left = r->gen_n - r->taken;
    info->queued_s = r->t_admit > 0 ? r->t_admit - r->t_submit : -1;
    info->first_token_s = r->t_first > 0 ? r->t_first - r->t_submit : -1;
    info->finished_s = r->t_done > 0 ? r->t_done - r->t_submit : -1;
    memcpy(info->error, r->err, sizeof info->error);
  }
  pthread_mutex_unlock(&e->mu);
  return n;
}

int gptoss_request_wait(gptoss_request *r, double timeout_s) {
  gptoss_engine *e = r->e;
  struct timespec until = engine_deadline(timeout_s);
  pthread_mutex_lock(&e->mu);
  int rc = 0;
  while (r->gen_n == r->taken && r->state != GPTOSS_REQ_DONE && rc == 0)
    rc = pthread_cond_timedwait(&e->news, &e->mu, &until);
  int news = r->gen_n > r->taken || r->state == GPTOSS_REQ_DONE;
  pthread_mutex_unlock(&e->mu);
  return news;
}

void gptoss_request_cancel(gptoss_request *r) {
  gptoss_engine *e = r->e;
  pthread_mutex_lock(&e->mu);
  if (r->state != GPTOSS_REQ_DONE) {
    r->cancel = 1;
    pthread_cond_signal(&e->work);
  }
  pthread_mutex_unlock(&e->mu);
}

void gptoss_request_free(gptoss_request *r) {
  if (!r) return;
  gptoss_request_cancel(r);
  pthread_mutex_lock(&r->e->mu);
  request_unref_unlock(r);
}
/* }====================================================== */

/* {====================================================== prefix cache (engine thread) */
static void cache_drop(gptoss_engine *e, int i) {
  gptoss_session_free(e->cache[i].s);
  uint64_t b = e->cache[i].bytes;
  e->cache[i] = e->cache[--e->ncache];
  pthread_mutex_lock(&e->mu);
  e->kv_cached -= b;
  e->st.cached_sessions = e->ncache;
  pthread_mutex_unlock(&e->mu);
}

static int cache_lru(const gptoss_engine *e) {
  int best = -1;
  for (int i = 0; i < e->ncache; i++)
    if (best < 0 || e->cache[i].used < e->cache[best].used) best = i;
  return best;
}

/* frees cached sessions, oldest first, until the budget holds what is
   active and `extra` bytes more */
static void cache_fit(gptoss_engine *e, uint64_t extra) {
  for (;;) {
    pthread_mutex_lock(&e->mu);
    int over = e->kv_active + e->kv_cached + extra > e->o.kv_budget;
    pthread_mutex_unlock(&e->mu);
    if (!over || e->ncache == 0) return;
    cache_drop(e, cache_lru(e));
  }
}

/* a finished request's session joins the cache (or is freed) */
static void cache_put(gptoss_engine *e, gptoss_session *s) {
  if (e->o.prefix_cache <= 0 || s->pos == 0) { gptoss_session_free(s); return; }
  if (e->ncache == e->o.prefix_cache) cache_drop(e, cache_lru(e));
  cache_entry *c = &e->cache[e->ncache++];
  c->s = s;
  c->adapter = s->adapter;
  c->version = s->adapter ? gptoss_adapter_version(s->adapter) : 0;
  c->used = ++e->tick;
  c->bytes = kv_bytes_at(e, s->context, s->pos);
  pthread_mutex_lock(&e->mu);
  e->kv_cached += c->bytes;
  e->st.cached_sessions = e->ncache;
  pthread_mutex_unlock(&e->mu);
  cache_fit(e, 0);
}

/* The session a request starts from: a fork of the cached one sharing the
   longest prefix of its prompt (at least one prompt token is left to feed,
   since sampling needs its logits), rewound to that prefix; else a new one. */
static gptoss_status request_session(gptoss_engine *e, gptoss_request *r) {
  uint64_t version = r->adapter ? gptoss_adapter_version(r->adapter) : 0;
  int best = -1, best_n = 0;
  for (int i = 0; i < e->ncache; i++) {
    cache_entry *c = &e->cache[i];
    if (c->adapter != r->adapter || c->version != version) continue;
    int lim = c->s->pos < r->n_prompt - 1 ? c->s->pos : r->n_prompt - 1, n = 0;
    while (n < lim && c->s->history[n] == r->prompt[n]) n++;
    if (n > best_n) { best = i; best_n = n; }
  }
  gptoss_session_opts so = {r->cap, e->o.rewind};
  if (best >= 0) {
    /* a copy of the cached session's first best_n positions, with the
       request's own capacity (refused when the window before best_n has
       left the cached session's sliding ring: then it starts fresh) */
    gptoss_session *f;
    if (gptoss_session_fork_at(e->cache[best].s, &so, best_n, &f) == GPTOSS_OK) {
      e->cache[best].used = ++e->tick;
      r->s = f;
      r->fed = best_n;
      pthread_mutex_lock(&e->mu);
      r->cached_tokens = best_n;
      e->st.prefix_hits++;
      e->st.prefix_tokens += (uint64_t)best_n;
      pthread_mutex_unlock(&e->mu);
      return GPTOSS_OK;
    }
  }
  gptoss_status rc = gptoss_session_new(e->m, &so, &r->s);
  if (!rc && r->adapter) rc = gptoss_session_set_adapter(r->s, r->adapter);
  if (rc) { gptoss_session_free(r->s); r->s = NULL; }
  r->fed = 0;
  return rc;
}

/* Room for r's next token: a full session that may reach further is copied
   into one of twice its capacity (in blocks, at most what r can reach).
   The budget takes the difference, cached sessions making way first; when
   it cannot, r sits this step out, unless it is the oldest running request
   (which always goes on, so that the batch never stalls: it may take the
   budget past its mark, its old session and the new one both held while
   the copy is made). 0: room made (or none needed), 1:
   wait, -1: failed (the error is set). */
static int grow(gptoss_engine *e, gptoss_request *r, int oldest) {
  gptoss_session *s = r->s;
  if (s->pos < s->context || s->context >= r->cap_max) return 0;
  int cap = capacity_for(e, 2 * (int64_t)s->context);
  if (cap > r->cap_max) cap = r->cap_max;
  uint64_t bytes = kv_bytes_at(e, cap, r->reach), before = r->kv_bytes, more = bytes > before ? bytes - before : 0;
  pthread_mutex_lock(&e->mu);
  int room = e->kv_active + more <= e->o.kv_budget;   /* with the cache emptied, if need be */
  if (!room && !oldest) {   /* emptying the cache would not make room: keep it */
    e->st.kv_waits++;
    pthread_mutex_unlock(&e->mu);
    return 1;
  }
  pthread_mutex_unlock(&e->mu);
  cache_fit(e, more);
  pthread_mutex_lock(&e->mu);
  e->kv_active += more;
  r->kv_bytes = bytes;
  pthread_mutex_unlock(&e->mu);
  gptoss_session_opts so = {cap, e->o.rewind};
  gptoss_session *g;
  if (gptoss_session_fork_at(s, &so, s->pos, &g)) {
    pthread_mutex_lock(&e->mu);
    e->kv_active -= more;
    r->kv_bytes = before;
    pthread_mutex_unlock(&e->mu);
    return -1;
  }
  gptoss_session_free(s);
  r->s = g;
  pthread_mutex_lock(&e->mu);
  e->st.kv_grows++;
  pthread_mutex_unlock(&e->mu);
  return 0;
}
/* }====================================================== */

/* {====================================================== log-probabilities (engine thread) */
/* for sample k of this step (whose session still holds the logits it was
   sampled from: samplers work on copies), into b->lp; -1 as the id and
   b->lp_err when the logits cannot be had */
static void step_logprobs(gptoss_engine *e, step_buf *b, int k, gptoss_request *r, int32_t id) {
  int V = e->m->cfg.vocab_size;
  gptoss_logprob *out = b->lp + (size_t)k * LP_STRIDE;
  if (!b->logits && !(b->logits = malloc(sizeof(float) * (size_t)V))) {
    snprintf(b->lp_err, sizeof b->lp_err, "out of memory for log-probabilities");
    out[0].id = -1;
    return;
  }
  if (gptoss_session_logits(r->s, b->logits)) {
    snprintf(b->lp_err, sizeof b->lp_err, "log-probabilities: %s", gptoss_errmsg());
    out[0].id = -1;
    return;
  }
  gptoss_logprobs(b->logits, V, id, r->top_logprobs, out);
}
/* }====================================================== */

/* {====================================================== the engine thread */
/* under mu: removes active[i]; the request's session is the caller's to free */
static void active_remove(gptoss_engine *e, int i) {
  gptoss_request *r = e->active[i];
  memmove(e->active + i, e->active + i + 1, sizeof *e->active * (size_t)(e->nactive - i - 1));
  e->nactive--;
  e->kv_active -= r->kv_bytes;
}

/* under mu: active[i] is done (published with its last token, its memory
   returned to the budget); its session is returned for end_session */
static gptoss_session *end_active(gptoss_engine *e, int i, int finish, const char *err) {
  gptoss_request *r = e->active[i];
  gptoss_session *s = r->s;
  r->s = NULL;
  active_remove(e, i);
  request_done(e, r, finish, err);
  return s;
}

/* mu not held: a done request's session goes to the cache or is freed */
static void end_session(gptoss_engine *e, gptoss_session *s, int finish) {
  if (!s) return;
  if (finish == GPTOSS_FINISH_STOP || finish == GPTOSS_FINISH_LENGTH) cache_put(e, s);
  else gptoss_session_free(s);
}

/* Ends active[i] (mu not held) and drops the engine's reference. */
static void finish_active(gptoss_engine *e, int i, int finish, const char *err) {
  pthread_mutex_lock(&e->mu);
  gptoss_request *r = e->active[i];
  gptoss_session *s = end_active(e, i, finish, err);
  request_unref_unlock(r);
  end_session(e, s, finish);
}

/* Moves waiting requests into the batch while there is room in it and in
   the budget (cached sessions can always make way). Queued cancellations
   end here too. Returns with mu held. */
static void admit(gptoss_engine *e, gptoss_request **fresh, int *nfresh) {
  *nfresh = 0;
  int kept = 0;
  for (int i = 0; i < e->nq; i++) {
    gptoss_request *r = e->queue[i];
    if (r->cancel) {
      request_done(e, r, GPTOSS_FINISH_CANCELLED, NULL);
      if (--r->refs == 0) { e->refs--; request_release(r); }   /* the caller let go of it already */
      continue;
    }
    if (e->nactive < e->o.max_batch && e->kv_active + r->kv_bytes <= e->o.kv_budget && kept == 0) {
      r->state = GPTOSS_REQ_RUNNING;
      r->t_admit = engine_now();
      e->kv_active += r->kv_bytes;
      e->active[e->nactive++] = r;
      fresh[(*nfresh)++] = r;
      continue;
    }
    e->queue[kept++] = r;   /* order is kept: a request never overtakes an earlier one of its priority */
  }
  e->nq = kept;
}


static gptoss_status step_buf_fit(step_buf *b, size_t tokens) {
  if (tokens > b->ids_cap) {
    int32_t *ids = realloc(b->ids, sizeof(int32_t) * tokens);
    if (!ids) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for an engine step");
    b->ids = ids;
    b->ids_cap = tokens;
  }
  return GPTOSS_OK;
}

/* One step over the active requests: their feeds in one forward, then
   sampling for those whose feed ended. */
static void step(gptoss_engine *e, step_buf *b) {
  int n = 0, budget = e->o.chunk_tokens, prefill = 0;
  size_t total = 0;
  /* room for each decoding request's next token (from the last, since a
     failure ends the request and leaves the array) */
  uint64_t oldest_seq = UINT64_MAX;
  for (int i = 0; i < e->nactive; i++)
    if (e->active[i]->seq < oldest_seq) oldest_seq = e->active[i]->seq;
  for (int i = e->nactive - 1; i >= 0; i--) {
    gptoss_request *r = e->active[i];
    r->waits = 0;
    if (r->fed < r->n_prompt) continue;
    int g = grow(e, r, r->seq == oldest_seq);
    if (g > 0) r->waits = 1;
    else if (g < 0) {
      char msg[256];
      snprintf(msg, sizeof msg, "growing the KV cache to the next block: %s", gptoss_errmsg());
      finish_active(e, i, GPTOSS_FINISH_ERROR, msg);
    }
  }
  for (int i = 0; i < e->nactive; i++) {
    gptoss_request *r = e->active[i];
    if (r->waits) continue;   /* its session is full and the budget has no room yet */
    int c = r->fed < r->n_prompt ? r->n_prompt - r->fed : 1;
    if (r->fed < r->n_prompt) {
      if (c > budget) c = budget;
      budget -= c;
      prefill += c;
    }
    if (c <= 0) continue;
    if (step_buf_fit(b, total + (size_t)c)) {
      for (int j = e->nactive - 1; j >= 0; j--) finish_active(e, j, GPTOSS_FINISH_ERROR, gptoss_errmsg());
      return;
    }
    if (r->fed < r->n_prompt) memcpy(b->ids + total, r->prompt + r->fed, sizeof(int32_t) * (size_t)c);
    else b->ids[total] = r->last;
    b->ss[n] = r->s;
    b->counts[n] = c;
    b->who[n] = i;
    total += (size_t)c;
    n++;
  }
  if (n == 0) return;
  /* the constrained requests that draw after this pass: their masks are
     computed meanwhile (engine_masks.c) */
  int nm = 0;
  for (int k = 0; k < n; k++) {
    gptoss_request *r = e->active[b->who[k]];
    if (r->fed + (r->fed < r->n_prompt ? b->counts[k] : 0) >= r->n_prompt && gptoss_sampler_constrained(r->smp))
      b->masked[nm++] = r->smp;
  }
  engine_masks_post(&e->masks, b->masked, nm);
  double t0 = engine_now();
  gptoss_status rc;
  int ns = 0;
  if (prefill == 0) {
    /* every request decodes one token: gptoss_batch_step, whose one-session
       case is the backend's fused step (CUDA: the graph-captured decode, as
       model:generate runs it), and otherwise the same forward and sample */
    for (int k = 0; k < n; k++) {
      b->sample_ss[k] = b->ss[k];
      b->smp[k] = e->active[b->who[k]]->smp;
      b->sample_who[k] = b->who[k];
    }
    ns = n;
    rc = gptoss_batch_step(b->ss, n, b->ids, b->smp, b->next);
  } else if (!(rc = gptoss_forward(b->ss, n, b->ids, b->counts, GPTOSS_LOGITS_LAST, NULL))) {
    for (int k = 0; k < n; k++) {
      gptoss_request *r = e->active[b->who[k]];
      if (r->fed < r->n_prompt) {
        r->fed += b->counts[k];
        if (r->fed < r->n_prompt) continue;
      }
      b->sample_ss[ns] = r->s;
      b->smp[ns] = r->smp;
      b->sample_who[ns++] = b->who[k];
    }
    if (ns) rc = gptoss_sample_sessions(b->sample_ss, ns, b->smp, b->next);
  }
  double t1 = engine_now();
  uint64_t masks = 0;
  double masks_s = 0;
  if (nm) engine_masks_wait(&e->masks, &masks, &masks_s);
  if (rc) {
    char msg[256];
    snprintf(msg, sizeof msg, "%s", gptoss_errmsg());
    for (int k = n - 1; k >= 0; k--) finish_active(e, b->who[k], GPTOSS_FINISH_ERROR, msg);
    return;
  }
  for (int k = 0; k < ns; k++) {   /* only for the requests that ask: the others pay nothing */
    gptoss_request *r = e->active[b->sample_who[k]];
    if (r->logprobs) step_logprobs(e, b, k, r, b->next[k]);
  }
  /* publish: what each request does next is decided under the lock, the
     sessions of those that ended are cached or freed after it */
  pthread_mutex_lock(&e->mu);
  e->st.steps++;
  e->st.busy_s += t1 - t0;
  e->st.masks_ahead += masks;
  e->st.masks_ahead_s += masks_s;
  e->st.prefill_tokens += (uint64_t)prefill;
  for (int k = 0; k < ns; k++) {
    gptoss_request *r = e->active[b->sample_who[k]];
    int32_t id = b->next[k];
    int finish = 0;
    const gptoss_logprob *lp = b->lp + (size_t)k * LP_STRIDE;
    /* sampled at the context's end (a session that can grow no more): no place for it */
    if (r->s->pos >= r->s->context && r->s->context >= r->cap_max) finish = GPTOSS_FINISH_LENGTH;
    else if (r->logprobs && lp[0].id < 0) finish = GPTOSS_FINISH_ERROR, snprintf(r->err, sizeof r->err, "%s", b->lp_err);
    else if (gen_push(r, id, lp)) finish = GPTOSS_FINISH_ERROR, snprintf(r->err, sizeof r->err, "out of memory for the output");
    else {
      e->st.generated_tokens++;
      if (r->t_first == 0) r->t_first = t1;
      for (int j = 0; j < r->n_stop && !finish; j++)
        if (r->stop[j] == id) finish = GPTOSS_FINISH_STOP;
      if (!finish && (int)r->gen_n >= r->max_tokens) finish = GPTOSS_FINISH_LENGTH;
      r->last = id;
    }
    r->ending = finish;
  }
  /* a request's last token and its end are seen together */
  int ended = 0;
  for (int i = e->nactive - 1; i >= 0; i--) {
    gptoss_request *r = e->active[i];
    if (!r->ending) continue;
    b->ended[ended] = r;
    b->ended_s[ended++] = end_active(e, i, r->ending, r->err[0] ? r->err : NULL);
  }
  /* signalled under the lock: whoever sees this step's news and then
     drains the descriptor finds it empty until the next news */
  pthread_cond_broadcast(&e->news);
  fd_signal(e);
  pthread_mutex_unlock(&e->mu);
  for (int k = 0; k < ended; k++) {
    gptoss_request *r = b->ended[k];
    int finish = r->ending;
    end_session(e, b->ended_s[k], finish);
    pthread_mutex_lock(&e->mu);
    request_unref_unlock(r);
  }
}

/* under mu: ends the active requests a caller cancelled; returns with mu held */
static void reap_cancelled(gptoss_engine *e) {
  for (int i = e->nactive - 1; i >= 0; i--) {
    if (!e->active[i]->cancel) continue;
    pthread_mutex_unlock(&e->mu);
    finish_active(e, i, GPTOSS_FINISH_CANCELLED, NULL);
    pthread_mutex_lock(&e->mu);
  }
}

static void *engine_main(void *arg) {
  gptoss_engine *e = arg;
  gptoss_request **fresh = e->b.fresh;
  pthread_mutex_lock(&e->mu);
  while (!e->stopping) {
    reap_cancelled(e);
    int nfresh;
    admit(e, fresh, &nfresh);
    if (e->nactive == 0) {   /* nothing admitted: the queue is empty (a request alone always fits) */
      if (engine_train_pending(e)) {   /* idle: training runs freely, an example at a time */
        pthread_mutex_unlock(&e->mu);
        engine_train_between(e, 1, 0);
        pthread_mutex_lock(&e->mu);
        continue;
      }
      /* reap_cancelled let go of mu: a stop signalled then is seen here, not waited past */
      if (!e->stopping) pthread_cond_wait(&e->work, &e->mu);
      continue;
    }
    pthread_mutex_unlock(&e->mu);
    if (nfresh) cache_fit(e, 0);
    for (int k = 0; k < nfresh; k++) {
      gptoss_request *r = fresh[k];
      if (request_session(e, r) == GPTOSS_OK) continue;
      char msg[256];
      snprintf(msg, sizeof msg, "%s", gptoss_errmsg());
      for (int i = 0; i < e->nactive; i++)
        if (e->active[i] == r) { finish_active(e, i, GPTOSS_FINISH_ERROR, msg); break; }
    }
    if (nfresh) {
      pthread_mutex_lock(&e->mu);
      pthread_cond_broadcast(&e->news);   /* admitted: their queued time is known */
      pthread_mutex_unlock(&e->mu);
    }
    double t0 = engine_now();
    step(e, &e->b);
    engine_train_between(e, 0, engine_now() - t0);
    pthread_mutex_lock(&e->mu);
  }
  pthread_mutex_unlock(&e->mu);
  return NULL;
}

static int step_buf_new(step_buf *b, int mb) {
  memset(b, 0, sizeof *b);
  b->ss = malloc(sizeof *b->ss * (size_t)mb);
  b->sample_ss = malloc(sizeof *b->sample_ss * (size_t)mb);
  b->smp = malloc(sizeof *b->smp * (size_t)mb);
  b->masked = malloc(sizeof *b->masked * (size_t)mb);
  b->next = malloc(sizeof *b->next * (size_t)mb);
  b->counts = malloc(sizeof *b->counts * (size_t)mb);
  b->who = malloc(sizeof *b->who * (size_t)mb);
  b->sample_who = malloc(sizeof *b->sample_who * (size_t)mb);
  b->ended = malloc(sizeof *b->ended * (size_t)mb);
  b->ended_s = malloc(sizeof *b->ended_s * (size_t)mb);
  b->fresh = malloc(sizeof *b->fresh * (size_t)mb);
  b->lp = malloc(sizeof *b->lp * LP_STRIDE * (size_t)mb);
  return b->ss && b->sample_ss && b->smp && b->masked && b->next && b->counts && b->who && b->sample_who && b->ended && b->ended_s
         && b->fresh && b->lp;
}

static void step_buf_free(step_buf *b) {
  free(b->ss); free(b->sample_ss); free(b->smp); free(b->masked); free(b->next); free(b->counts); free(b->who); free(b->sample_who);
  free(b->ended); free(b->ended_s); free(b->fresh); free(b->ids); free(b->lp); free(b->logits);
}
/* }====================================================== */

/* {====================================================== public */
gptoss_status gptoss_engine_new(gptoss_model *m, const gptoss_engine_opts *o, gptoss_engine **out) {
  *out = NULL;
  gptoss_engine_opts d;
  memset(&d, 0, sizeof d);
  if (o) d = *o;
  if (d.max_batch < 0 || d.max_queue < 0 || d.chunk_tokens < 0 || d.rewind < 0 || d.context < 0 || d.kv_block < 0)
    return gptoss_fail(GPTOSS_EARG, "engine: max_batch, max_queue, chunk_tokens, context, rewind and kv_block must be >= 0");
  if (d.context > m->context)
    return gptoss_fail(GPTOSS_EARG, "engine: context %d exceeds the model's %d", d.context, m->context);
  if (!d.context) d.context = m->context;
  if (!d.max_batch) d.max_batch = DEFAULT_MAX_BATCH;
  if (!d.max_queue) d.max_queue = DEFAULT_MAX_QUEUE;
  if (!d.chunk_tokens) d.chunk_tokens = DEFAULT_CHUNK;
  if (!d.rewind) d.rewind = ENGINE_REWIND;
  if (!d.kv_block) d.kv_block = DEFAULT_KV_BLOCK;
  if (d.prefix_cache == 0) d.prefix_cache = DEFAULT_CACHE;
  if (d.prefix_cache < 0) d.prefix_cache = 0;
  if (!d.kv_budget) {
    /* half the device memory free now (the rest: workspaces that grow with
       the batch), or a quarter of the host's */
    gptoss_memory mem;
    memset(&mem, 0, sizeof mem);
    gptoss_model_memory(m, &mem);
    if (mem.device_free) d.kv_budget = mem.device_free / 2;
    else d.kv_budget = (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE) / 4;
  }
  gptoss_engine *e = calloc(1, sizeof *e);
  if (!e) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  e->m = m;
  e->o = d;
  e->fd[0] = e->fd[1] = -1;
  e->refs = 1;
  e->queue = malloc(sizeof *e->queue * (size_t)d.max_queue);
  e->active = malloc(sizeof *e->active * (size_t)d.max_batch);
  e->cache = malloc(sizeof *e->cache * (size_t)(d.prefix_cache ? d.prefix_cache : 1));
  int buffers = step_buf_new(&e->b, d.max_batch);
  if (!e->queue || !e->active || !e->cache || !buffers) {
    free(e->queue); free(e->active); free(e->cache); step_buf_free(&e->b); free(e);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  }
  gptoss_status rc = fd_open(e);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->work, NULL);
  pthread_cond_init(&e->news, &ca);
  pthread_condattr_destroy(&ca);
  e->st.kv_budget = d.kv_budget;
  e->t_start = engine_now();
  if (!rc && !engine_masks_start(&e->masks, d.max_batch))
    rc = gptoss_fail(GPTOSS_ENOMEM, "engine: cannot start its mask thread");
  if (!rc && pthread_create(&e->thread, NULL, engine_main, e) != 0)
    rc = gptoss_fail(GPTOSS_ENOMEM, "engine: cannot start its thread");
  if (rc) { engine_release(e); return rc; }
  e->running = 1;
  *out = e;
  return GPTOSS_OK;
}

void engine_release(gptoss_engine *e) {
  engine_masks_stop(&e->masks);   /* a start that failed part-way; stopped already otherwise */
  fd_close(e);
  pthread_mutex_destroy(&e->mu);
  pthread_cond_destroy(&e->work);
  pthread_cond_destroy(&e->news);
  free(e->queue);
  free(e->active);
  free(e->cache);
  step_buf_free(&e->b);
  free(e);
}

void gptoss_engine_stop(gptoss_engine *e) {
  if (!e || !e->running) return;
  pthread_mutex_lock(&e->mu);
  e->stopping = 1;
  pthread_cond_signal(&e->work);
  pthread_mutex_unlock(&e->mu);
  pthread_join(e->thread, NULL);
  e->running = 0;
  engine_masks_stop(&e->masks);
  /* the thread is gone: what it owned is this thread's now */
  while (e->nactive) finish_active(e, e->nactive - 1, GPTOSS_FINISH_CANCELLED, NULL);
  while (e->ncache) cache_drop(e, e->ncache - 1);
  engine_train_stop(e);
  pthread_mutex_lock(&e->mu);
  for (int i = 0; i < e->nq; i++) {
    gptoss_request *r = e->queue[i];
    request_done(e, r, GPTOSS_FINISH_CANCELLED, NULL);
    if (--r->refs == 0) { e->refs--; request_release(r); }
  }
  e->nq = 0;
  pthread_cond_broadcast(&e->news);
  pthread_mutex_unlock(&e->mu);
  fd_signal(e);
}

void gptoss_engine_free(gptoss_engine *e) {
  if (!e) return;
  gptoss_engine_stop(e);
  pthread_mutex_lock(&e->mu);
  int last = --e->refs == 0;
  pthread_mutex_unlock(&e->mu);
  if (last) engine_release(e);
}

int gptoss_engine_running(const gptoss_engine *e) { return e->running; }

gptoss_status gptoss_engine_submit(gptoss_engine *e, const int32_t *ids, int n, gptoss_sampler *smp,
                                   const gptoss_request_opts *o, gptoss_request **out) {
  *out = NULL;
  gptoss_request *r = calloc(1, sizeof *r);
  if (!r) { gptoss_sampler_free(smp); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  r->smp = smp;
  gptoss_status rc = GPTOSS_OK;
  const gptoss_model *m = e->m;
  if (!smp) rc = gptoss_fail(GPTOSS_EARG, "submit: a sampler is required");
  else if (n <= 0) rc = gptoss_fail(GPTOSS_EARG, "submit: empty prompt");
  else if (!o || o->max_tokens <= 0) rc = gptoss_fail(GPTOSS_EARG, "submit: max_tokens must be a positive integer");
  else if (o->n_stop < 0) rc = gptoss_fail(GPTOSS_EARG, "submit: negative stop id count");
  else if (o->top_logprobs < 0 || o->top_logprobs > GPTOSS_MAX_TOP_LOGPROBS)
    rc = gptoss_fail(GPTOSS_EARG, "submit: top_logprobs must be in 0..%d (got %d)", GPTOSS_MAX_TOP_LOGPROBS, o->top_logprobs);
  else if (o->top_logprobs && !o->logprobs) rc = gptoss_fail(GPTOSS_EARG, "submit: top_logprobs needs logprobs");
  else if (n > e->o.context)
    rc = gptoss_fail(GPTOSS_ERANGE, "context limit: the prompt's %d tokens exceed the engine's context of %d", n,
                     e->o.context);
  for (int i = 0; !rc && i < n; i++)
    if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size)
      rc = gptoss_fail(GPTOSS_EARG, "token id %d at index %d is outside the vocabulary (0..%d)", (int)ids[i], i,
                       m->cfg.vocab_size - 1);
  if (!rc && o->adapter) rc = gptoss_adapter_check(o->adapter, m);
  if (!rc) {
    r->prompt = malloc(sizeof(int32_t) * (size_t)n);
    r->stop = malloc(sizeof(int32_t) * (size_t)(o->n_stop ? o->n_stop : 1));
    if (!r->prompt || !r->stop) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  }
  if (rc) { request_release(r); return rc; }
  memcpy(r->prompt, ids, sizeof(int32_t) * (size_t)n);
  if (o->n_stop) memcpy(r->stop, o->stop_ids, sizeof(int32_t) * (size_t)o->n_stop);
  r->n_prompt = n;
  r->n_stop = o->n_stop;
  r->max_tokens = o->max_tokens;
  r->priority = o->priority;
  r->logprobs = o->logprobs != 0;
  r->top_logprobs = o->top_logprobs;
  r->adapter = gptoss_adapter_ref(o->adapter);
  int64_t reach = (int64_t)n + o->max_tokens;
  r->reach = reach > e->o.context ? e->o.context : (int)reach;
  r->cap_max = capacity_for(e, r->reach);
  r->cap = capacity_for(e, (int64_t)n + e->o.kv_block < r->reach ? (int64_t)n + e->o.kv_block : r->reach);
  r->kv_bytes = kv_bytes_at(e, r->cap, r->reach);
  uint64_t most = kv_bytes_at(e, r->cap_max, r->reach);
  r->e = e;
  r->refs = 2;
  r->t_submit = engine_now();
  pthread_mutex_lock(&e->mu);
  if (!e->running || e->stopping) rc = gptoss_fail(GPTOSS_ESTATE, "engine is closed");
  else if (most > e->o.kv_budget)
    rc = gptoss_fail(GPTOSS_ENOMEM, "request too large: %d prompt + %d new tokens need %.1f MB of KV cache, the engine's "
                     "memory budget is %.1f MB", n, o->max_tokens, (double)most / 1e6, (double)e->o.kv_budget / 1e6);
  else if (e->nq >= e->o.max_queue)
    rc = gptoss_fail(GPTOSS_EBUSY, "queue full: %d requests are waiting (max_queue)", e->nq);
  if (rc) {
    pthread_mutex_unlock(&e->mu);
    request_release(r);
    return rc;
  }
  /* by priority, then in order of arrival */
  int at = e->nq;
  while (at > 0 && e->queue[at - 1]->priority < r->priority) at--;
  memmove(e->queue + at + 1, e->queue + at, sizeof *e->queue * (size_t)(e->nq - at));
  e->queue[at] = r;
  e->nq++;
  e->refs++;
  r->seq = ++e->seq;
  e->st.submitted++;
  e->st.prompt_tokens += (uint64_t)n;
  pthread_cond_signal(&e->work);
  pthread_mutex_unlock(&e->mu);
  *out = r;
  return GPTOSS_OK;
}

void gptoss_engine_stats_get(gptoss_engine *e, gptoss_engine_stats *out) {
  pthread_mutex_lock(&e->mu);
  *out = e->st;
  out->queued = e->nq;
  out->active = e->nactive;
  out->kv_active = e->kv_active;
  out->kv_cached = e->kv_cached;
  out->kv_budget = e->o.kv_budget;
  out->max_batch = e->o.max_batch;
  out->max_queue = e->o.max_queue;
  out->chunk_tokens = e->o.chunk_tokens;
  out->uptime_s = engine_now() - e->t_start;
  out->tokens_per_s = out->busy_s > 0 ? (double)out->generated_tokens / out->busy_s : 0;
  out->train_pending = engine_train_count(e);
  pthread_mutex_unlock(&e->mu);
}
/* }====================================================== */
