/*
** session.c: one sequence's state (position, history, KV cache through its
** backend) and the checks every backend relies on.
*/
#include <stdlib.h>
#include <string.h>
#include "backend.h"

static int uses_sliding(const gptoss_config *c) {
  for (int i = 0; i < c->num_hidden_layers; i++)
    if (c->layer_sliding[i]) return 1;
  return 0;
}

/* A feed that fails after a second pass of a session ran has already
   overwritten, in the sliding ring, keys that the session's window at its
   old position reads: it cannot go on from there, and says so. */
#define LOST_WINDOW "the session lost its sliding window to a feed that failed after writing part of it; " \
  "open a new session (the model and other sessions are unaffected)"
static gptoss_status check_usable(const gptoss_session *s, int entry) {
  if (!s->lost) return GPTOSS_OK;
  if (entry) return gptoss_fail(GPTOSS_ESTATE, "batch entry %d: " LOST_WINDOW, entry);
  return gptoss_fail(GPTOSS_ESTATE, LOST_WINDOW);
}

/* the rewind a session was opened with, as its ring tells it (a ring that
   is the whole context tells none: the default then) */
static int session_rewind(const gptoss_session *s) {
  if (!uses_sliding(&s->m->cfg) || s->ring >= s->context) return GPTOSS_SESSION_REWIND;
  return s->ring - s->m->cfg.sliding_window;
}

int gptoss_session_ring(const gptoss_config *c, int context, int rewind) {
  /* a ring needs room for the window plus one chunk of new tokens; the sum
     in 64 bits, since both may come near 2^31 */
  int64_t rw = rewind > 0 ? rewind : 1;
  return uses_sliding(c) && (int64_t)c->sliding_window + rw < context ? (int)(c->sliding_window + rw) : context;
}

gptoss_status gptoss_session_new(gptoss_model *m, const gptoss_session_opts *o, gptoss_session **out) {
  *out = NULL;
  gptoss_session_opts dflt = {0, GPTOSS_SESSION_REWIND};
  if (!o) o = &dflt;
  int ctx = o->context ? o->context : m->context;
  if (o->context < 0 || ctx > m->context)
    return gptoss_fail(GPTOSS_EARG, "session context %d must be between 1 and the model's context %d", o->context, m->context);
  if (o->rewind < 0) return gptoss_fail(GPTOSS_EARG, "rewind must be >= 0");
  gptoss_session *s = calloc(1, sizeof *s);
  if (!s) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  s->m = m;
  s->context = ctx;
  s->ring = gptoss_session_ring(&m->cfg, ctx, o->rewind);
  s->history = malloc(sizeof(int32_t) * (size_t)ctx);
  s->logits = malloc(sizeof(float) * (size_t)m->cfg.vocab_size);
  if (!s->history || !s->logits) { gptoss_session_free(s); return gptoss_fail(GPTOSS_ENOMEM, "out of memory for a session"); }
  gptoss_status rc = m->be->session_init(s);
  if (rc) { free(s->history); free(s->logits); free(s); return rc; }
  *out = s;
  return GPTOSS_OK;
}

void gptoss_session_free(gptoss_session *s) {
  if (!s) return;
  if (s->bs) s->m->be->session_free(s);
  free(s->history);
  free(s->logits);
  free(s->trace_e);
  free(s->trace_w);
  gptoss_adapter_free(s->adapter);
  free(s);
}

gptoss_status gptoss_session_set_adapter(gptoss_session *s, gptoss_adapter *a) {
  if (a) {
    gptoss_status rc = gptoss_adapter_check(a, s->m);
    if (rc) return rc;
  }
  gptoss_adapter_free(s->adapter);
  s->adapter = gptoss_adapter_ref(a);
  return GPTOSS_OK;
}

int gptoss_session_pos(const gptoss_session *s) { return s->pos; }
int gptoss_session_context(const gptoss_session *s) { return s->context; }
const int32_t *gptoss_session_history(const gptoss_session *s) { return s->history; }

/* whether a session rewound to pos still holds the keys its next token
   attends to: a sliding layer's ring has overwritten every position before
   held_from (which a rewind leaves where it was) */
static gptoss_status rewind_reach(const gptoss_session *s, int pos) {
  if (uses_sliding(&s->m->cfg) && pos < s->pos) {
    int need = pos - s->m->cfg.sliding_window;   /* oldest position the next token attends to */
    if (pos > 0 && (need > 0 ? need : 0) < s->held_from)
      return gptoss_fail(GPTOSS_ERANGE,
                         "cannot rewind from %d to %d: sliding layers keep only the last %d positions; "
                         "open the session with a larger rewind (it allows %d)",
                         s->pos, pos, s->ring, s->ring - s->m->cfg.sliding_window);
  }
  return GPTOSS_OK;
}

/* after keys up to position end (exclusive) were written, or may have been
   (a pass that failed): the positions their ring slots overwrote */
static void held_through(gptoss_session *s, int end) {
  if (end - s->ring > s->held_from) s->held_from = end - s->ring;
}

gptoss_status gptoss_session_fork_at(const gptoss_session *s, const gptoss_session_opts *o, int keep,
                                     gptoss_session **out) {
  *out = NULL;
  gptoss_status urc = check_usable(s, 0);
  if (urc) return urc;
  if (keep < 0 || keep > s->pos)
    return gptoss_fail(GPTOSS_ERANGE, "fork: keep must be in 0..%d, the positions the session holds (got %d)", s->pos, keep);
  int ctx = o && o->context ? o->context : s->context;
  if (o && (o->context < 0 || ctx > s->m->context))
    return gptoss_fail(GPTOSS_EARG, "fork: context %d must be between 1 and the model's context %d", o->context,
                       s->m->context);
  if (o && o->rewind < 0) return gptoss_fail(GPTOSS_EARG, "fork: rewind must be >= 0");
  if (ctx < keep)
    return gptoss_fail(GPTOSS_ERANGE, "fork: a context of %d cannot hold the %d positions kept", ctx, keep);
  urc = rewind_reach(s, keep);
  if (urc) return urc;
  gptoss_session *c = calloc(1, sizeof *c);
  if (!c) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  c->m = s->m;
  c->context = ctx;
  /* the same ring unless asked otherwise; a new context with no rewind
     keeps the rewind the source allowed */
  c->ring = o ? gptoss_session_ring(&s->m->cfg, ctx, o->rewind ? o->rewind : session_rewind(s)) : s->ring;
  c->history = malloc(sizeof(int32_t) * (size_t)ctx);
  c->logits = malloc(sizeof(float) * (size_t)s->m->cfg.vocab_size);
  gptoss_status rc = GPTOSS_OK;
  if (!c->history || !c->logits) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory for a session");
  if (!rc) rc = s->m->be->session_init(c);
  if (!rc) rc = s->m->be->session_copy(c, s, keep);
  if (rc) { gptoss_session_free(c); return rc; }
  memcpy(c->history, s->history, sizeof(int32_t) * (size_t)keep);
  c->pos = keep;
  c->held_from = gptoss_kv_copy_from(1, keep, s->held_from, c->ring);   /* what the copy moved */
  if (c->held_from > keep) c->held_from = keep;                           /* keep 0 */
  /* the logits are the last position's: kept only with every position */
  c->has_logits = keep == s->pos && s->has_logits;
  if (c->has_logits) memcpy(c->logits, s->logits, sizeof(float) * (size_t)s->m->cfg.vocab_size);
  c->trace = s->trace;
  c->adapter = gptoss_adapter_ref(s->adapter);
  *out = c;
  return GPTOSS_OK;
}

gptoss_status gptoss_session_fork(const gptoss_session *s, gptoss_session **out) {
  return gptoss_session_fork_at(s, NULL, s ? s->pos : 0, out);
}

gptoss_status gptoss_session_rewind(gptoss_session *s, int pos) {
  gptoss_status urc = check_usable(s, 0);
  if (urc) return urc;
  if (pos < 0 || pos > s->pos)
    return gptoss_fail(GPTOSS_ERANGE, "cannot rewind to position %d: the session holds %d tokens", pos, s->pos);
  if (pos == s->pos) return GPTOSS_OK;
  if ((urc = rewind_reach(s, pos))) return urc;
  /* back past what the ring holds (only to 0: rewind_reach allows no
     other): what is fed next is held again from there */
  if (s->held_from > pos) s->held_from = pos;
  s->pos = pos;
  s->has_logits = 0;
  return GPTOSS_OK;
}

static gptoss_status check_ids(const gptoss_session *s, const int32_t *ids, int n) {
  int V = s->m->cfg.vocab_size;
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= V)
      return gptoss_fail(GPTOSS_ERANGE, "token id %d at index %d is outside the vocabulary (0..%d)", (int)ids[i], i, V - 1);
  return GPTOSS_OK;
}

gptoss_status gptoss_trace_reserve(gptoss_session *s, int extra) {
  if (!s->trace) return GPTOSS_OK;
  int need = s->trace_n + extra;
  if (need <= s->trace_cap) return GPTOSS_OK;
  int cap = s->trace_cap ? s->trace_cap : 64;
  while (cap < need) cap *= 2;
  size_t per = (size_t)s->m->cfg.num_hidden_layers * (size_t)s->m->cfg.num_experts_per_tok;
  int32_t *e = realloc(s->trace_e, sizeof(int32_t) * per * (size_t)cap);
  if (!e) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the expert trace");
  s->trace_e = e;
  float *w = realloc(s->trace_w, sizeof(float) * per * (size_t)cap);
  if (!w) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the expert trace");
  s->trace_w = w;
  s->trace_cap = cap;
  return GPTOSS_OK;
}

void gptoss_trace_record(gptoss_session *s, int t, int layer, const int32_t *experts, const float *w) {
  if (!s->trace) return;
  int k = s->m->cfg.num_experts_per_tok, L = s->m->cfg.num_hidden_layers;
  size_t at = ((size_t)(s->trace_n + t) * (size_t)L + (size_t)layer) * (size_t)k;
  memcpy(s->trace_e + at, experts, sizeof(int32_t) * (size_t)k);
  memcpy(s->trace_w + at, w, sizeof(float) * (size_t)k);
}

gptoss_status gptoss_session_trace(gptoss_session *s, int enable) {
  s->trace = enable != 0;
  s->trace_n = 0;
  return GPTOSS_OK;
}

gptoss_status gptoss_session_trace_get(const gptoss_session *s, int32_t *experts, float *weights, int *n) {
  *n = s->trace_n;
  size_t cnt = (size_t)s->trace_n * (size_t)s->m->cfg.num_hidden_layers * (size_t)s->m->cfg.num_experts_per_tok;
  if (experts && cnt) memcpy(experts, s->trace_e, sizeof(int32_t) * cnt);
  if (weights && cnt) memcpy(weights, s->trace_w, sizeof(float) * cnt);
  return GPTOSS_OK;
}

/* {====================================================== the batch plan */
/* Most tokens of s one pass may take: a sliding layer's ring must still hold
   every key a token of the pass attends to after the pass writes its own. */
static int pass_room(const gptoss_session *s) {
  if (!uses_sliding(&s->m->cfg) || s->ring >= s->context) return s->context;
  int room = s->ring - s->m->cfg.sliding_window;
  return room < 1 ? 1 : room;
}

/* what the caller asked of every pass's logits */
typedef struct plan_req {
  gptoss_session **ss;
  const int32_t *ids;
  const int *counts;
  gptoss_logits_mode mode;
  float *out;
  int vocab;
} plan_req;

/* A pass over sessions [s0, s1] of the request: the tokens from
   concatenated index t0, the first session starting at its token off0.
   Every session but possibly the last ends in this pass; `last_ends` says
   whether the last one does. */
static gptoss_status run_pass(const plan_req *q, int s0, int s1, int off0, int t0, int T, int last_ends,
                              int32_t *pos, int32_t *sess, int32_t *rows, int32_t *keep) {
  gptoss_plan p;
  p.ss = q->ss + s0;
  p.nss = s1 - s0 + 1;
  p.T = T;
  p.ids = q->ids + t0;
  p.pos = pos;
  p.sess = sess;
  p.rows = rows;
  p.keep = keep;
  p.nout = 0;
  p.out = NULL;
  int t = 0;
  for (int i = s0; i <= s1; i++) {
    gptoss_session *s = q->ss[i];
    int first = i == s0 ? off0 : 0;
    int ends = i < s1 || last_ends;
    int n = (i < s1 || last_ends) ? q->counts[i] - first : T - t;
    for (int k = 0; k < n; k++, t++) {
      pos[t] = s->pos + first + k;
      sess[t] = i - s0;
      if (q->mode == GPTOSS_LOGITS_ALL && q->out) rows[p.nout++] = t;
    }
    keep[i - s0] = -1;
    if (ends && q->mode != GPTOSS_LOGITS_NONE) {
      if (!(q->mode == GPTOSS_LOGITS_ALL && q->out)) rows[p.nout++] = t - 1;
      keep[i - s0] = p.nout - 1;
    }
  }
  if (q->out && q->mode == GPTOSS_LOGITS_ALL) p.out = q->out + (size_t)t0 * (size_t)q->vocab;
  else if (q->out && q->mode == GPTOSS_LOGITS_LAST && p.nout) p.out = q->out + (size_t)s0 * (size_t)q->vocab;
  return q->ss[0]->m->be->run(&p);
}

gptoss_status gptoss_forward(gptoss_session **ss, int nss, const int32_t *ids, const int *counts,
                             gptoss_logits_mode mode, float *out) {
  if (nss <= 0) return gptoss_fail(GPTOSS_EARG, "empty batch");
  gptoss_model *m = ss[0]->m;
  gptoss_status rc = GPTOSS_OK;
  int64_t total = 0;
  for (int i = 0; i < nss; i++) {
    gptoss_session *s = ss[i];
    if (s->m != m) return gptoss_fail(GPTOSS_EARG, "batch entry %d belongs to another model", i + 1);
    if ((rc = check_usable(s, nss > 1 ? i + 1 : 0))) return rc;
    if (counts[i] <= 0) return gptoss_fail(GPTOSS_EARG, "batch entry %d has no tokens to feed", i + 1);
    if (counts[i] > s->context - s->pos) {
      if (nss == 1)
        return gptoss_fail(GPTOSS_ERANGE, "context limit: the session holds %d tokens and %d more exceed its context of %d",
                           s->pos, counts[i], s->context);
      return gptoss_fail(GPTOSS_ERANGE, "context limit: batch entry %d holds %d tokens, its context is %d", i + 1, s->pos,
                         s->context);
    }
    for (int j = 0; j < i; j++)
      if (ss[j] == s) return gptoss_fail(GPTOSS_EARG, "batch entries %d and %d are the same session", j + 1, i + 1);
    if ((rc = check_ids(s, ids + total, counts[i]))) return rc;
    total += counts[i];
  }
  for (int i = 0; i < nss; i++)
    if ((rc = gptoss_trace_reserve(ss[i], counts[i]))) return rc;
  int cap = m->be->max_pass_tokens;
  int most = (int)(total < cap ? total : cap);
  int32_t *pos = malloc(sizeof(int32_t) * (size_t)most * 3), *keep = malloc(sizeof(int32_t) * (size_t)nss);
  int *pieces = calloc((size_t)nss, sizeof(int));   /* each session's pieces run so far */
  if (!pos || !keep || !pieces) {
    free(pos); free(keep); free(pieces);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory for a batch plan");
  }
  plan_req q = {ss, ids, counts, mode, out, m->cfg.vocab_size};
  /* Greedy over the concatenation: sessions in order, each cut into
     pieces of at most its ring's room; a pass ends when it is full or
     when a session does not end in it (its next piece needs this one's keys). */
  int s0 = 0, off0 = 0, T = 0;
  int64_t t0 = 0;
  for (int i = 0; i < nss && !rc; i++) {
    int room = pass_room(ss[i]);
    int off = i == s0 ? off0 : 0;
    while (!rc) {
      int left = counts[i] - off;
      int take = left < room ? left : room;
      if (take > cap - T) take = cap - T;
      T += take;
      off += take;
      if (off == counts[i]) {
        if (T == cap || i == nss - 1) {
          rc = run_pass(&q, s0, i, off0, (int)t0, T, 1, pos, pos + most, pos + 2 * most, keep);
          for (int j = s0; j <= i && !rc; j++) pieces[j]++;
          t0 += T; T = 0; s0 = i + 1; off0 = 0;
        }
        break;
      }
      /* s continues in the next pass */
      rc = run_pass(&q, s0, i, off0, (int)t0, T, 0, pos, pos + most, pos + 2 * most, keep);
      for (int j = s0; j <= i && !rc; j++) pieces[j]++;
      t0 += T; T = 0; s0 = i; off0 = off;
    }
  }
  free(pos);
  free(keep);
  if (rc) {
    /* a session's second piece overwrote ring slots of its old window; a
       first may have written its slots before the pass failed */
    for (int i = 0; i < nss; i++) {
      if (pieces[i] >= 2) ss[i]->lost = 1;
      held_through(ss[i], ss[i]->pos + counts[i]);
    }
    free(pieces);
    return rc;
  }
  free(pieces);
  const int32_t *at = ids;
  for (int i = 0; i < nss; i++) {
    gptoss_session *s = ss[i];
    memcpy(s->history + s->pos, at, sizeof(int32_t) * (size_t)counts[i]);
    at += counts[i];
    s->pos += counts[i];
    held_through(s, s->pos);
    if (s->trace) s->trace_n += counts[i];
    s->has_logits = mode != GPTOSS_LOGITS_NONE;
  }
  return GPTOSS_OK;
}
/* }====================================================== */

gptoss_status gptoss_session_feed(gptoss_session *s, const int32_t *ids, int n, gptoss_logits_mode mode, float *out) {
  if (n <= 0) return gptoss_fail(GPTOSS_EARG, "no tokens to feed (empty input)");
  return gptoss_forward(&s, 1, ids, &n, mode, out);
}

gptoss_status gptoss_session_logits(const gptoss_session *s, float *out) {
  if (!s->has_logits) return gptoss_fail(GPTOSS_ESTATE, "no logits: feed tokens with logits first");
  if (s->m->be->logits) return s->m->be->logits(s, out);
  memcpy(out, s->logits, sizeof(float) * (size_t)s->m->cfg.vocab_size);
  return GPTOSS_OK;
}

/* a sampler walks its own vocabulary over the session's logits: they must agree */
static gptoss_status check_samplers(gptoss_session *const *ss, gptoss_sampler *const *smp, int n) {
  for (int i = 0; i < n; i++) {
    int want = ss[i]->m->cfg.vocab_size, got = gptoss_sampler_vocab(smp[i]);
    if (got != want)
      return gptoss_fail(GPTOSS_EARG, "sampler %d is for a vocabulary of %d, the model's has %d", i + 1, got, want);
  }
  return GPTOSS_OK;
}

/* The backend samples, except for samplers under a grammar (a matcher, or
   arms that read the history's harmony headers): their masks are computed
   on the host, so those sessions' logits come to the host and the sampler
   runs there (on the CPU backend that is what sample does anyway). */
gptoss_status gptoss_sample_sessions(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *out) {
  const gptoss_backend *be = ss[0]->m->be;
  int constrained = 0;
  for (int i = 0; i < n; i++) constrained += gptoss_sampler_constrained(smp[i]);
  if (constrained == 0 || be == &gptoss_cpu_backend) return be->sample(ss, n, smp, out);
  int V = ss[0]->m->cfg.vocab_size;
  float *host = malloc(sizeof(float) * (size_t)V);
  gptoss_session **fs = malloc(sizeof *fs * (size_t)n);
  gptoss_sampler **fp = malloc(sizeof *fp * (size_t)n);
  int32_t *fo = malloc(sizeof *fo * (size_t)n);
  int *who = malloc(sizeof *who * (size_t)n);
  gptoss_status rc = host && fs && fp && fo && who ? GPTOSS_OK : gptoss_fail(GPTOSS_ENOMEM, "out of memory for sampling");
  int nf = 0;
  for (int i = 0; i < n && !rc; i++) {
    if (!gptoss_sampler_constrained(smp[i])) { fs[nf] = ss[i]; fp[nf] = smp[i]; who[nf++] = i; continue; }
    if (!(rc = gptoss_session_logits(ss[i], host)))
      out[i] = gptoss_sampler_sample(smp[i], host, ss[i]->history, (size_t)ss[i]->pos);
  }
  if (!rc && nf) rc = be->sample(fs, nf, fp, fo);
  for (int k = 0; k < nf && !rc; k++) out[who[k]] = fo[k];
  free(host); free(fs); free(fp); free(fo); free(who);
  return rc;
}

gptoss_status gptoss_session_sample(gptoss_session *s, gptoss_sampler *smp, int32_t *id) {
  gptoss_status rc = check_samplers(&s, &smp, 1);
  if (!rc) rc = check_usable(s, 0);
  if (rc) return rc;
  if (!s->has_logits) return gptoss_fail(GPTOSS_ESTATE, "nothing to sample from: feed tokens with logits first");
  return gptoss_sample_sessions(&s, 1, &smp, id);
}

gptoss_status gptoss_batch_step(gptoss_session **ss, int n, const int32_t *ids, gptoss_sampler **smp, int32_t *next) {
  if (n <= 0) return gptoss_fail(GPTOSS_EARG, "empty batch");
  gptoss_model *m = ss[0]->m;
  if (smp && next) {
    gptoss_status rc = check_samplers(ss, smp, n);
    if (rc) return rc;
  }
  if (n == 1 && smp && next && m->be->decode && !ss[0]->trace && !m->batch_invariant && !gptoss_sampler_constrained(smp[0])) {
    /* one token of one session: the backend's fused step (its kernels are
       not the batched pass's, so a batch-invariant model takes the general pass) */
    gptoss_session *s = ss[0];
    gptoss_status urc = check_usable(s, 0);
    if (urc) return urc;
    if (s->pos >= s->context)
      return gptoss_fail(GPTOSS_ERANGE, "context limit: batch entry 1 holds %d tokens, its context is %d", s->pos, s->context);
    gptoss_status rc = check_ids(s, ids, 1);
    if (rc) return rc;
    if ((rc = m->be->decode(s, ids[0], smp[0], next))) {
      held_through(s, s->pos + 1);   /* its slot may be written */
      return rc;
    }
    s->history[s->pos++] = ids[0];
    held_through(s, s->pos);
    s->has_logits = 1;
    return GPTOSS_OK;
  }
  int *counts = malloc(sizeof(int) * (size_t)n);
  if (!counts) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  for (int i = 0; i < n; i++) counts[i] = 1;
  gptoss_status rc = gptoss_forward(ss, n, ids, counts, GPTOSS_LOGITS_LAST, NULL);
  free(counts);
  if (rc || !smp || !next) return rc;
  return gptoss_sample_sessions(ss, n, smp, next);
}
