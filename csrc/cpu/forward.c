/*
** forward.c: the CPU backend's table: model and session state, KV caches,
** the forward pass over a planned batch (embedding, the layers of layer.c,
** the head), and sampling on host logits. This is the reference the CUDA
** backend is tested against.
**
** A pass allocates everything it needs before its first layer: a failed
** allocation leaves the caches and the sessions' logits as they were.
*/
#include <stdlib.h>
#include <string.h>
#include "cpu.h"

/* a pass's workspace stays bounded: at most this many tokens */
#define CPU_PASS_TOKENS 256

static int kvdim(const gptoss_config *c) { return c->num_key_value_heads * c->head_dim; }

static gptoss_status cpu_model_init(gptoss_model *m, const gptoss_model_opts *o) {
  (void)o;
  const gptoss_config *c = &m->cfg;
  cpu_model *cm = cpu_zalloc(sizeof *cm);
  if (!cm) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  cm->pool = gptoss_pool_new(m->threads);
  if (!cm->pool) { free(cm); return gptoss_fail(GPTOSS_ENOMEM, "cannot start %d threads", m->threads); }
  /* the products' widest input: hidden (q, k, v, router, gate_up, lm_head),
     the heads (o) or the experts' intermediate (down) */
  int q = c->num_attention_heads * c->head_dim;
  cm->row_len = c->hidden_size > q ? c->hidden_size : q;
  if (c->intermediate_size > cm->row_len) cm->row_len = c->intermediate_size;
  cm->nth = gptoss_pool_size(cm->pool);
  cm->rows = cpu_alloc(sizeof(float) * (size_t)cm->nth * (size_t)cm->row_len);
  if (!cm->rows) {
    gptoss_pool_free(cm->pool); free(cm);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory for %d threads' weight rows", m->threads);
  }
  m->bm = cm;
  return GPTOSS_OK;
}

static void cpu_model_free(gptoss_model *m) {
  cpu_model *cm = m->bm;
  if (!cm) return;
  gptoss_pool_free(cm->pool);
  free(cm->rows);
  free(cm);
  m->bm = NULL;
}

static gptoss_status cpu_session_init(gptoss_session *s) {
  int L = s->m->cfg.num_hidden_layers;
  cpu_session *cs = cpu_zalloc(sizeof *cs);
  if (!cs) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for a session");
  cs->k = cpu_zalloc((size_t)L * sizeof *cs->k);
  cs->v = cpu_zalloc((size_t)L * sizeof *cs->v);
  cs->cap = cpu_zalloc((size_t)L * sizeof *cs->cap);
  if (!cs->k || !cs->v || !cs->cap) {
    free(cs->k); free(cs->v); free(cs->cap); free(cs);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory for a session's caches");
  }
  s->bs = cs;
  return GPTOSS_OK;
}

static void cpu_session_free(gptoss_session *s) {
  cpu_session *cs = s->bs;
  if (!cs) return;
  for (int l = 0; l < s->m->cfg.num_hidden_layers; l++) { free(cs->k[l]); free(cs->v[l]); }
  free(cs->k); free(cs->v); free(cs->cap);
  free(cs);
  s->bs = NULL;
}

/* slots layer l needs to hold positions up to `upto` (exclusive) */
static int slots_needed(const gptoss_session *s, int l, int upto) {
  if (s->m->cfg.layer_sliding[l]) return upto < s->ring ? upto : s->ring;
  return upto;
}

static gptoss_status kv_reserve(gptoss_session *s, int upto) {
  cpu_session *cs = s->bs;
  size_t kd = (size_t)kvdim(&s->m->cfg);
  for (int l = 0; l < s->m->cfg.num_hidden_layers; l++) {
    int need = slots_needed(s, l, upto);
    if (need <= cs->cap[l]) continue;
    int cap = cs->cap[l] ? cs->cap[l] : 64;
    while (cap < need) cap *= 2;
    int limit = s->m->cfg.layer_sliding[l] ? s->ring : s->context;
    if (cap > limit) cap = limit;
    float *k = cpu_realloc(cs->k[l], sizeof(float) * kd * (size_t)cap);
    if (!k) return gptoss_fail(GPTOSS_ENOMEM, "out of memory growing the KV cache to %d positions", cap);
    cs->k[l] = k;
    float *v = cpu_realloc(cs->v[l], sizeof(float) * kd * (size_t)cap);
    if (!v) return gptoss_fail(GPTOSS_ENOMEM, "out of memory growing the KV cache to %d positions", cap);
    cs->v[l] = v;
    cs->cap[l] = cap;
  }
  return GPTOSS_OK;
}

static gptoss_status cpu_session_copy(gptoss_session *dst, const gptoss_session *src, int keep) {
  gptoss_status rc = kv_reserve(dst, keep);
  if (rc) return rc;
  const gptoss_config *c = &src->m->cfg;
  cpu_session *d = dst->bs, *s = src->bs;
  size_t kd = (size_t)kvdim(c);
  for (int l = 0; l < c->num_hidden_layers; l++) {
    int sl = c->layer_sliding[l];
    for (int p = gptoss_kv_copy_from(sl, keep, src->held_from, dst->ring), n; p < keep; p += n) {
      n = gptoss_kv_run(sl, src->ring, dst->ring, p, keep);
      size_t from = kd * (size_t)gptoss_kv_slot(sl, src->ring, p), to = kd * (size_t)gptoss_kv_slot(sl, dst->ring, p);
      memcpy(d->k[l] + to, s->k[l] + from, sizeof(float) * kd * (size_t)n);
      memcpy(d->v[l] + to, s->v[l] + from, sizeof(float) * kd * (size_t)n);
    }
  }
  return GPTOSS_OK;
}

/* One planned pass: each token's session and index within its session's
   feed (the trace's row), the caches grown to the pass's last positions,
   the rows' logits into the plan's out (or a scratch block when the caller
   wants only the kept rows). */
static gptoss_status cpu_run(const gptoss_plan *pl) {
  gptoss_model *m = pl->ss[0]->m;
  int T = pl->T, H = m->cfg.hidden_size;
  size_t V = (size_t)m->cfg.vocab_size;
  gptoss_status rc = GPTOSS_OK;
  for (int t = 0; t < T && !rc; t++)
    if (t + 1 == T || pl->sess[t + 1] != pl->sess[t]) rc = kv_reserve(pl->ss[pl->sess[t]], pl->pos[t] + 1);
  if (rc) return rc;
  gptoss_session **ts = cpu_alloc(sizeof *ts * (size_t)T);
  int *ti = cpu_alloc(sizeof(int) * (size_t)T);
  float *x = cpu_alloc(sizeof(float) * (size_t)T * H);
  float *dst = pl->out, *scratch = NULL;
  if (pl->nout && !dst) dst = scratch = cpu_alloc(sizeof(float) * (size_t)pl->nout * V);
  cpu_pass p = { .m = m, .cm = m->bm, .T = T, .pos = pl->pos, .sess = ts, .trace_row = ti };
  cpu_acts a = {0};
  int longest = 0;                     /* the most keys a token attends to */
  for (int t = 0; t < T; t++) if (pl->pos[t] + 1 > longest) longest = pl->pos[t] + 1;
  if (!ts || !ti || !x || (pl->nout && !dst) || cpu_acts_alloc(&a, &p, longest)) {
    rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory for a forward pass of %d tokens", T);
    goto done;
  }
  for (int t = 0; t < T; t++) {
    ts[t] = pl->ss[pl->sess[t]];
    ti[t] = pl->pos[t] - ts[t]->pos;
    p.lora |= ts[t]->adapter != NULL;
  }
  cpu_embed(&p, x, pl->ids);
  for (int l = 0; l < m->cfg.num_hidden_layers; l++) cpu_layer_forward(&p, &a, l, x, x);
  cpu_head(&p, x, pl->rows, pl->nout, a.xn1, NULL, dst);
  for (int i = 0; i < pl->nss; i++)
    if (pl->keep[i] >= 0) memcpy(pl->ss[i]->logits, dst + (size_t)pl->keep[i] * V, sizeof(float) * V);
done:
  free(ts); free(ti); free(x); free(scratch);
  cpu_acts_free(&a);
  return rc;
}

static gptoss_status cpu_sample(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *out) {
  int V = ss[0]->m->cfg.vocab_size;
  float *scratch = cpu_alloc(sizeof(float) * (size_t)V);
  if (!scratch) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for sampling");
  for (int i = 0; i < n; i++) {
    memcpy(scratch, ss[i]->logits, sizeof(float) * (size_t)V);
    out[i] = gptoss_sampler_sample(smp[i], scratch, ss[i]->history, (size_t)ss[i]->pos);
  }
  free(scratch);
  return GPTOSS_OK;
}

/* the CPU ranks of a split model share the process's memory */
static gptoss_status cpu_comm_new(const int *devices, int n, gptoss_comm **out) {
  (void)devices;
  return gptoss_comm_host(n, out);
}

static void cpu_memory(const gptoss_model *m, gptoss_memory *out) {
  /* the checkpoint is mapped from the page cache, not allocated; what the
     model allocates is the MXFP4 it quantized a bf16 checkpoint's experts to */
  out->weights = m->experts_q_data ? m->experts_q_bytes : 0;
  out->total = out->weights;
}

const gptoss_backend gptoss_cpu_backend = {
  "cpu", cpu_model_init, cpu_model_free, cpu_session_init, cpu_session_free, cpu_session_copy,
  cpu_run, CPU_PASS_TOKENS, cpu_sample, cpu_memory, NULL, NULL, NULL, cpu_lora_train, cpu_comm_new,
};
