/*
** forward.c: the CPU backend: the gpt-oss forward pass in fp32, KV caches,
** and sampling on host logits. This is the reference the CUDA backend is
** tested against.
*/
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "cpu.h"

/* KV cache: per layer, K and V as [slots][kv_heads*head_dim] fp32. Full
   layers grow toward the context; sliding layers are a ring. */
typedef struct cpu_session {
  float **k, **v;
  int *cap;                      /* slots allocated per layer */
} cpu_session;

/* a pass's workspace stays bounded: at most this many tokens */
#define CPU_PASS_TOKENS 256

static int kvdim(const gptoss_config *c) { return c->num_key_value_heads * c->head_dim; }

static gptoss_status cpu_model_init(gptoss_model *m, const gptoss_model_opts *o) {
  (void)o;
  cpu_model *cm = calloc(1, sizeof *cm);
  if (!cm) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  cm->pool = gptoss_pool_new(m->threads);
  if (!cm->pool) { free(cm); return gptoss_fail(GPTOSS_ENOMEM, "cannot start %d threads", m->threads); }
  m->bm = cm;
  return GPTOSS_OK;
}

static void cpu_model_free(gptoss_model *m) {
  cpu_model *cm = m->bm;
  if (!cm) return;
  gptoss_pool_free(cm->pool);
  free(cm);
  m->bm = NULL;
}

static gptoss_status cpu_session_init(gptoss_session *s) {
  int L = s->m->cfg.num_hidden_layers;
  cpu_session *cs = calloc(1, sizeof *cs);
  if (!cs) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  cs->k = calloc((size_t)L, sizeof *cs->k);
  cs->v = calloc((size_t)L, sizeof *cs->v);
  cs->cap = calloc((size_t)L, sizeof *cs->cap);
  if (!cs->k || !cs->v || !cs->cap) {
    free(cs->k); free(cs->v); free(cs->cap); free(cs);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
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
    float *k = realloc(cs->k[l], sizeof(float) * kd * (size_t)cap);
    if (!k) return gptoss_fail(GPTOSS_ENOMEM, "out of memory growing the KV cache to %d positions", cap);
    cs->k[l] = k;
    float *v = realloc(cs->v[l], sizeof(float) * kd * (size_t)cap);
    if (!v) return gptoss_fail(GPTOSS_ENOMEM, "out of memory growing the KV cache to %d positions", cap);
    cs->v[l] = v;
    cs->cap[l] = cap;
  }
  return GPTOSS_OK;
}

static gptoss_status cpu_session_copy(gptoss_session *dst, const gptoss_session *src) {
  gptoss_status rc = kv_reserve(dst, src->pos);
  if (rc) return rc;
  cpu_session *d = dst->bs, *s = src->bs;
  size_t kd = (size_t)kvdim(&src->m->cfg);
  for (int l = 0; l < src->m->cfg.num_hidden_layers; l++) {
    int n = slots_needed(src, l, src->pos);
    if (!n) continue;
    memcpy(d->k[l], s->k[l], sizeof(float) * kd * (size_t)n);
    memcpy(d->v[l], s->v[l], sizeof(float) * kd * (size_t)n);
  }
  return GPTOSS_OK;
}

static inline int kv_slot(const gptoss_session *s, int l, int p) {
  return gptoss_kv_slot(s->m->cfg.layer_sliding[l], s->ring, p);
}

/* {====================================================== one forward chunk */
typedef struct fwd {
  gptoss_model *m;
  gptoss_pool *pool;
  int T;
  gptoss_session **tsess;        /* session of each token */
  const int32_t *tpos;                    /* absolute position of each token */
  int *tidx;                     /* index of the token within its session's feed */
  float *x, *xn, *q, *k, *v, *att, *tmp, *rl, *act, *y;
  int layer;
  int lora;                      /* some token's session has an adapter */
  /* MoE grouping */
  int32_t *sel;                  /* [T][k] experts */
  float *selw;                   /* [T][k] weights */
} fwd;

typedef struct att_job { fwd *f; } att_job;

static void attention_worker(void *ctx, int tid, int nth) {
  fwd *f = ctx;
  const gptoss_config *c = &f->m->cfg;
  int Hq = c->num_attention_heads, D = c->head_dim, G = Hq / c->num_key_value_heads, kd = kvdim(c);
  int l = f->layer, sliding = c->layer_sliding[l], W = c->sliding_window;
  const uint16_t *sinks = LAYER_T(f->m, l, GPTOSS_T_SINKS)->data;
  float scale = 1.0f / sqrtf((float)D);
  int64_t lo, hi;
  gptoss_split((int64_t)f->T * Hq, tid, nth, &lo, &hi);
  float *sc = NULL;
  int sccap = 0;
  for (int64_t it = lo; it < hi; it++) {
    int t = (int)(it / Hq), h = (int)(it % Hq), kvh = h / G;
    gptoss_session *s = f->tsess[t];
    cpu_session *cs = s->bs;
    int p = f->tpos[t];
    int j0 = sliding && p - W + 1 > 0 ? p - W + 1 : 0;
    int n = p - j0 + 1;
    if (n > sccap) { free(sc); sccap = n; sc = malloc(sizeof(float) * (size_t)n); if (!sc) abort(); }
    const float *qh = f->q + (size_t)t * (size_t)(Hq * D) + (size_t)h * (size_t)D;
    float mx = gptoss_bf16_to_f32(sinks[h]);
    float sink = mx;
    for (int j = j0; j <= p; j++) {
      const float *kr = cs->k[l] + (size_t)kv_slot(s, l, j) * (size_t)kd + (size_t)kvh * (size_t)D;
      float v = cpu_dot(qh, kr, D) * scale;
      sc[j - j0] = v;
      if (v > mx) mx = v;
    }
    float den = expf(sink - mx);
    for (int i = 0; i < n; i++) { sc[i] = expf(sc[i] - mx); den += sc[i]; }
    float *o = f->att + (size_t)t * (size_t)(Hq * D) + (size_t)h * (size_t)D;
    memset(o, 0, sizeof(float) * (size_t)D);
    for (int j = j0; j <= p; j++) {
      const float *vr = cs->v[l] + (size_t)kv_slot(s, l, j) * (size_t)kd + (size_t)kvh * (size_t)D;
      float w = sc[j - j0] / den;
      for (int d = 0; d < D; d++) o[d] += w * vr[d];
    }
  }
  free(sc);
}

/* LoRA of each token's session adapter on one projection:
   out[t] += scale * B (A in[t]), as PEFT's LoRA Linear computes it */
static void lora_add(fwd *f, int l, gptoss_lora_module mod, float *out, int os, const float *in, int is) {
  float h[GPTOSS_LORA_MAX_RANK];
  for (int t = 0; t < f->T; t++) {
    const gptoss_lora *x = gptoss_adapter_module(f->tsess[t]->adapter, l, mod);
    if (!x) continue;
    const float *xt = in + (size_t)t * is;
    float *yt = out + (size_t)t * os;
    for (int i = 0; i < x->r; i++) h[i] = cpu_dot(x->A + (size_t)i * x->in, xt, x->in);
    for (int o = 0; o < x->out; o++) yt[o] += x->scale * cpu_dot(x->B + (size_t)o * x->r, h, x->r);
  }
}

static void layer_forward(fwd *f, int l) {
  gptoss_model *m = f->m;
  const gptoss_config *c = &m->cfg;
  int T = f->T, H = c->hidden_size, Hq = c->num_attention_heads, D = c->head_dim;
  int Q = Hq * D, kd = kvdim(c), E = c->num_local_experts, K = c->num_experts_per_tok, I = c->intermediate_size;
  float eps = (float)c->rms_norm_eps;
  f->layer = l;

  for (int t = 0; t < T; t++)
    cpu_rmsnorm(f->xn + (size_t)t * H, f->x + (size_t)t * H, LAYER_T(m, l, GPTOSS_T_ATTN_NORM)->data, H, eps);
  cpu_matmul_bf16(f->pool, f->q, Q, f->xn, H, T, LAYER_T(m, l, GPTOSS_T_Q_W)->data, Q, H, LAYER_T(m, l, GPTOSS_T_Q_B)->data);
  cpu_matmul_bf16(f->pool, f->k, kd, f->xn, H, T, LAYER_T(m, l, GPTOSS_T_K_W)->data, kd, H, LAYER_T(m, l, GPTOSS_T_K_B)->data);
  cpu_matmul_bf16(f->pool, f->v, kd, f->xn, H, T, LAYER_T(m, l, GPTOSS_T_V_W)->data, kd, H, LAYER_T(m, l, GPTOSS_T_V_B)->data);
  if (f->lora) {
    lora_add(f, l, GPTOSS_LORA_Q, f->q, Q, f->xn, H);
    lora_add(f, l, GPTOSS_LORA_K, f->k, kd, f->xn, H);
    lora_add(f, l, GPTOSS_LORA_V, f->v, kd, f->xn, H);
  }
  for (int t = 0; t < T; t++) {
    for (int h = 0; h < Hq; h++) cpu_rope(f->q + (size_t)t * Q + (size_t)h * D, D, f->tpos[t], m->inv_freq, m->rope_scale);
    for (int h = 0; h < c->num_key_value_heads; h++) cpu_rope(f->k + (size_t)t * kd + (size_t)h * D, D, f->tpos[t], m->inv_freq, m->rope_scale);
    gptoss_session *s = f->tsess[t];
    cpu_session *cs = s->bs;
    int slot = kv_slot(s, l, f->tpos[t]);
    memcpy(cs->k[l] + (size_t)slot * kd, f->k + (size_t)t * kd, sizeof(float) * (size_t)kd);
    memcpy(cs->v[l] + (size_t)slot * kd, f->v + (size_t)t * kd, sizeof(float) * (size_t)kd);
  }
  gptoss_pool_run(f->pool, attention_worker, f);
  cpu_matmul_bf16(f->pool, f->tmp, H, f->att, Q, T, LAYER_T(m, l, GPTOSS_T_O_W)->data, H, Q, LAYER_T(m, l, GPTOSS_T_O_B)->data);
  if (f->lora) lora_add(f, l, GPTOSS_LORA_O, f->tmp, H, f->att, Q);
  for (size_t i = 0; i < (size_t)T * H; i++) f->x[i] += f->tmp[i];

  /* MoE */
  for (int t = 0; t < T; t++)
    cpu_rmsnorm(f->xn + (size_t)t * H, f->x + (size_t)t * H, LAYER_T(m, l, GPTOSS_T_MLP_NORM)->data, H, eps);
  cpu_matmul_bf16(f->pool, f->rl, E, f->xn, H, T, LAYER_T(m, l, GPTOSS_T_ROUTER_W)->data, E, H, LAYER_T(m, l, GPTOSS_T_ROUTER_B)->data);
  for (int t = 0; t < T; t++) {
    cpu_route(f->rl + (size_t)t * E, E, K, f->sel + (size_t)t * K, f->selw + (size_t)t * K);
    gptoss_trace_record(f->tsess[t], f->tidx[t], l, f->sel + (size_t)t * K, f->selw + (size_t)t * K);
  }
  const gptoss_tensor *gub = LAYER_T(m, l, GPTOSS_T_GU_BLOCKS), *gus = LAYER_T(m, l, GPTOSS_T_GU_SCALES);
  const gptoss_tensor *gubias = LAYER_T(m, l, GPTOSS_T_GU_BIAS);
  const gptoss_tensor *dnb = LAYER_T(m, l, GPTOSS_T_DN_BLOCKS), *dns = LAYER_T(m, l, GPTOSS_T_DN_SCALES);
  const gptoss_tensor *dnbias = LAYER_T(m, l, GPTOSS_T_DN_BIAS);
  size_t gu_rows = (size_t)2 * I, gu_blk = gu_rows * (size_t)(H / 32), dn_blk = (size_t)H * (size_t)(I / 32);
  memset(f->tmp, 0, sizeof(float) * (size_t)T * H);
  /* group the tokens by expert so each expert's rows are read once */
  int *idx = malloc(sizeof(int) * (size_t)T);
  float *xin = malloc(sizeof(float) * (size_t)T * H);
  float lh[GPTOSS_LORA_MAX_RANK];
  if (!idx || !xin) abort();
  for (int e = 0; e < E; e++) {
    int n = 0;
    for (int t = 0; t < T; t++)
      for (int j = 0; j < K; j++)
        if (f->sel[t * K + j] == e) idx[n++] = t * K + j;
    if (!n) continue;
    for (int i = 0; i < n; i++) memcpy(xin + (size_t)i * H, f->xn + (size_t)(idx[i] / K) * H, sizeof(float) * (size_t)H);
    cpu_matmul_mxfp4(f->pool, f->y, (int)gu_rows, xin, H, n,
                     (const uint8_t *)gub->data + (size_t)e * gu_blk * 16, (const uint8_t *)gus->data + (size_t)e * gu_blk,
                     (int)gu_rows, H, (const uint16_t *)gubias->data + (size_t)e * gu_rows);
    if (f->lora)
      for (int i = 0; i < n; i++) {
        const gptoss_lora *x = gptoss_adapter_module(f->tsess[idx[i] / K]->adapter, l, GPTOSS_LORA_GU);
        if (x) cpu_lora_expert(x, e, xin + (size_t)i * H, f->y + (size_t)i * gu_rows, lh);
      }
    for (int i = 0; i < n; i++) cpu_swiglu(f->act + (size_t)i * I, f->y + (size_t)i * gu_rows, I, (float)c->swiglu_limit);
    cpu_matmul_mxfp4(f->pool, f->y, H, f->act, I, n,
                     (const uint8_t *)dnb->data + (size_t)e * dn_blk * 16, (const uint8_t *)dns->data + (size_t)e * dn_blk,
                     H, I, (const uint16_t *)dnbias->data + (size_t)e * (size_t)H);
    if (f->lora)
      for (int i = 0; i < n; i++) {
        const gptoss_lora *x = gptoss_adapter_module(f->tsess[idx[i] / K]->adapter, l, GPTOSS_LORA_DN);
        if (x) cpu_lora_expert(x, e, f->act + (size_t)i * I, f->y + (size_t)i * H, lh);
      }
    for (int i = 0; i < n; i++) {
      int t = idx[i] / K;
      float w = f->selw[idx[i]];
      float *dst = f->tmp + (size_t)t * H;
      const float *src = f->y + (size_t)i * H;
      for (int d = 0; d < H; d++) dst[d] += w * src[d];
    }
  }
  free(idx);
  free(xin);
  for (size_t i = 0; i < (size_t)T * H; i++) f->x[i] += f->tmp[i];
}

static gptoss_status forward_chunk(gptoss_model *m, int T, gptoss_session **tsess, const int32_t *tpos, int *tidx,
                                   const int32_t *ids, const int32_t *out_rows, int nout, float *out) {
  const gptoss_config *c = &m->cfg;
  cpu_model *cm = m->bm;
  int H = c->hidden_size, Q = c->num_attention_heads * c->head_dim, kd = kvdim(c);
  int E = c->num_local_experts, K = c->num_experts_per_tok, I = c->intermediate_size;
  int V = c->vocab_size;
  fwd f = {0};
  f.m = m;
  f.pool = cm->pool;
  f.T = T;
  f.tsess = tsess;
  f.tpos = tpos;
  f.tidx = tidx;
  for (int t = 0; t < T; t++) f.lora |= tsess[t]->adapter != NULL;
  size_t TK = (size_t)T * (size_t)K;
  size_t wide = (size_t)(2 * I > H ? 2 * I : H);
  f.x = malloc(sizeof(float) * (size_t)T * H);
  f.xn = malloc(sizeof(float) * (size_t)T * H);
  f.q = malloc(sizeof(float) * (size_t)T * Q);
  f.k = malloc(sizeof(float) * (size_t)T * kd);
  f.v = malloc(sizeof(float) * (size_t)T * kd);
  f.att = malloc(sizeof(float) * (size_t)T * Q);
  f.tmp = malloc(sizeof(float) * (size_t)T * H);
  f.rl = malloc(sizeof(float) * (size_t)T * E);
  f.act = malloc(sizeof(float) * TK * (size_t)I);
  f.y = malloc(sizeof(float) * TK * wide);
  f.sel = malloc(sizeof(int32_t) * TK);
  f.selw = malloc(sizeof(float) * TK);
  gptoss_status rc = GPTOSS_OK;
  if (!f.x || !f.xn || !f.q || !f.k || !f.v || !f.att || !f.tmp || !f.rl || !f.act || !f.y || !f.sel || !f.selw) {
    rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory for a forward pass of %d tokens", T);
    goto done;
  }
  const uint16_t *emb = m->embed->data;
  for (int t = 0; t < T; t++) cpu_bf16_row(f.x + (size_t)t * H, emb + (size_t)ids[t] * H, H);
  for (int l = 0; l < c->num_hidden_layers; l++) layer_forward(&f, l);
  if (nout > 0) {
    for (int i = 0; i < nout; i++)
      cpu_rmsnorm(f.xn + (size_t)i * H, f.x + (size_t)out_rows[i] * H, m->norm->data, H, (float)c->rms_norm_eps);
    cpu_matmul_bf16(f.pool, out, V, f.xn, H, nout, m->lm_head->data, V, H, NULL);
  }
done:
  free(f.x); free(f.xn); free(f.q); free(f.k); free(f.v); free(f.att); free(f.tmp);
  free(f.rl); free(f.act); free(f.y); free(f.sel); free(f.selw);
  return rc;
}
/* }====================================================== */

/* One planned pass: each token's session and index within its session's
   feed (the trace's row), the caches grown to the pass's last positions,
   the rows' logits into the plan's out (or a scratch block when the caller
   wants only the kept rows). */
static gptoss_status cpu_run(const gptoss_plan *p) {
  gptoss_model *m = p->ss[0]->m;
  size_t V = (size_t)m->cfg.vocab_size;
  gptoss_status rc = GPTOSS_OK;
  for (int t = 0; t < p->T && !rc; t++)
    if (t + 1 == p->T || p->sess[t + 1] != p->sess[t]) rc = kv_reserve(p->ss[p->sess[t]], p->pos[t] + 1);
  if (rc) return rc;
  gptoss_session **ts = malloc(sizeof *ts * (size_t)p->T);
  int *ti = malloc(sizeof(int) * (size_t)p->T);
  float *dst = p->out, *scratch = NULL;
  if (p->nout && !dst) dst = scratch = malloc(sizeof(float) * (size_t)p->nout * V);
  if (!ts || !ti || (p->nout && !dst)) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory for a forward pass of %d tokens", p->T); goto done; }
  for (int t = 0; t < p->T; t++) {
    ts[t] = p->ss[p->sess[t]];
    ti[t] = p->pos[t] - ts[t]->pos;
  }
  rc = forward_chunk(m, p->T, ts, p->pos, ti, p->ids, p->rows, p->nout, dst);
  for (int i = 0; i < p->nss && !rc; i++)
    if (p->keep[i] >= 0) memcpy(p->ss[i]->logits, dst + (size_t)p->keep[i] * V, sizeof(float) * V);
done:
  free(ts); free(ti); free(scratch);
  return rc;
}

static gptoss_status cpu_sample(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *out) {
  int V = ss[0]->m->cfg.vocab_size;
  float *scratch = malloc(sizeof(float) * (size_t)V);
  if (!scratch) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  for (int i = 0; i < n; i++) {
    memcpy(scratch, ss[i]->logits, sizeof(float) * (size_t)V);
    out[i] = gptoss_sampler_sample(smp[i], scratch, ss[i]->history, (size_t)ss[i]->pos);
  }
  free(scratch);
  return GPTOSS_OK;
}

static void cpu_memory(const gptoss_model *m, gptoss_memory *out) {
  (void)m;
  out->weights = 0;   /* mapped from the page cache, not allocated */
}

const gptoss_backend gptoss_cpu_backend = {
  "cpu", cpu_model_init, cpu_model_free, cpu_session_init, cpu_session_free, cpu_session_copy,
  cpu_run, CPU_PASS_TOKENS, cpu_sample, cpu_memory, NULL, NULL, cpu_lora_backward,
};
