/*
** attention.c: RoPE and attention with the sink and sliding window,
** forward and backward.
**
** Token t at position p attends to keys max(0, p-W+1)..p on sliding layers
** (0..p on full ones) plus a learned sink logit per head that takes part
** in the softmax but has no value. Inference reads the keys and values of
** the token's session cache (which the layer has just written); training
** reads them from the activations, and keeps each row's log-sum-exp so the
** backward recomputes the probabilities instead of storing them.
*/
#include <math.h>
#include <string.h>
#include "cpu.h"

/* {====================================================== RoPE */
void cpu_rope(float *x, int d, int pos, const float *inv_freq, float scale) {
  int h = d / 2;
  for (int i = 0; i < h; i++) {
    float th = (float)pos * inv_freq[i];
    float c = cosf(th) * scale, s = sinf(th) * scale;
    float a = x[i], b = x[i + h];
    x[i] = a * c - b * s;
    x[i + h] = b * c + a * s;
  }
}

/* RoPE is a scaled rotation: its transpose rotates back (the backward) */
void cpu_rope_qk(const cpu_pass *p, float *q, float *k, int backward) {
  const gptoss_model *m = p->m;
  int Hq = m->cfg.num_attention_heads, Hkv = m->cfg.num_key_value_heads, D = m->cfg.head_dim;
  size_t Q = (size_t)Hq * D, KV = (size_t)Hkv * D;
  for (int t = 0; t < p->T; t++) {
    int pos = backward ? -p->pos[t] : p->pos[t];
    for (int h = 0; h < Hq; h++) cpu_rope(q + (size_t)t * Q + (size_t)h * D, D, pos, m->inv_freq, m->rope_scale);
    for (int h = 0; h < Hkv; h++) cpu_rope(k + (size_t)t * KV + (size_t)h * D, D, pos, m->inv_freq, m->rope_scale);
  }
}
/* }====================================================== */

/* {====================================================== attention */
typedef struct att_job {
  const cpu_pass *p;
  cpu_acts *a;
  int l;
} att_job;

/* the (token, head) rows split over the threads; each thread's scores in
   its own row of a->scores */
static void attention_worker(void *ctx, int tid, int nth) {
  const att_job *j = ctx;
  const cpu_pass *p = j->p;
  cpu_acts *a = j->a;
  const gptoss_config *c = &p->m->cfg;
  int Hq = c->num_attention_heads, D = c->head_dim, G = Hq / c->num_key_value_heads, kd = c->num_key_value_heads * D;
  int l = j->l, sliding = c->layer_sliding[l], W = c->sliding_window;
  const uint16_t *sinks = LAYER_T(p->m, l, GPTOSS_T_SINKS)->data;
  float scale = 1.0f / sqrtf((float)D);
  float *sc = a->scores + (size_t)tid * (size_t)a->scores_len;
  int64_t lo, hi;
  gptoss_split((int64_t)p->T * Hq, tid, nth, &lo, &hi);
  for (int64_t it = lo; it < hi; it++) {
    int t = (int)(it / Hq), h = (int)(it % Hq), kvh = h / G;
    const float *kc = a->k, *vc = a->v;
    int ring = 0;                      /* training: position j is row j */
    if (!p->train) {
      const gptoss_session *s = p->sess[t];
      const cpu_session *cs = s->bs;
      kc = cs->k[l]; vc = cs->v[l];
      ring = sliding ? s->ring : 0;
    }
    /* keys j0..last: rows of the session's cache, or of the sequence in
       training, where a packed example's tokens see its own alone */
    int pos = p->pos[t], last = p->train ? t : pos, first = p->seg0 ? p->seg0[t] : 0;
    int j0 = sliding && last - W + 1 > first ? last - W + 1 : first;
    int n = last - j0 + 1;
    const float *qh = a->q + (size_t)t * (size_t)(Hq * D) + (size_t)h * (size_t)D;
    float mx = gptoss_bf16_to_f32(sinks[h]);
    float sink = mx;
    for (int i = j0; i <= last; i++) {
      const float *kr = kc + (size_t)gptoss_kv_slot(ring > 0, ring, i) * (size_t)kd + (size_t)kvh * (size_t)D;
      float v = cpu_dot(qh, kr, D) * scale;
      sc[i - j0] = v;
      if (v > mx) mx = v;
    }
    float den = expf(sink - mx);
    for (int i = 0; i < n; i++) { sc[i] = expf(sc[i] - mx); den += sc[i]; }
    float *o = a->att + (size_t)t * (size_t)(Hq * D) + (size_t)h * (size_t)D;
    memset(o, 0, sizeof(float) * (size_t)D);
    for (int i = j0; i <= last; i++) {
      const float *vr = vc + (size_t)gptoss_kv_slot(ring > 0, ring, i) * (size_t)kd + (size_t)kvh * (size_t)D;
      float w = sc[i - j0] / den;
      for (int d = 0; d < D; d++) o[d] += w * vr[d];
    }
    if (a->lse) a->lse[(size_t)t * Hq + h] = mx + logf(den);
  }
}

void cpu_attention(const cpu_pass *p, cpu_acts *a, int l) {
  att_job j = { p, a, l };
  gptoss_pool_run(p->cm->pool, attention_worker, &j);
}

/* with P = softmax(s), s = q.k * scale: dv += P dout, ds = P (dout.v - dout.o),
   dq += ds k * scale, dk += ds q * scale; training's rows 0..T-1 (a packed
   example's from its start) */
void cpu_attention_backward(const cpu_pass *p, const cpu_acts *a, int l, const float *datt,
                            float *dq, float *dk, float *dv) {
  const gptoss_config *c = &p->m->cfg;
  int T = p->T, Hq = c->num_attention_heads, D = c->head_dim, G = Hq / c->num_key_value_heads;
  int Q = Hq * D, KV = c->num_key_value_heads * D;
  int W = c->sliding_window, sliding = c->layer_sliding[l];
  float scale = 1.0f / sqrtf((float)D);
  for (int t = 0; t < T; t++)
    for (int h = 0; h < Hq; h++) {
      int first = p->seg0 ? p->seg0[t] : 0, j0 = sliding && t - W + 1 > first ? t - W + 1 : first, kvh = h / G;
      const float *qh = a->q + (size_t)t * Q + (size_t)h * D, *o = a->att + (size_t)t * Q + (size_t)h * D;
      const float *dout = datt + (size_t)t * Q + (size_t)h * D;
      float lse = a->lse[(size_t)t * Hq + h], dd = cpu_dot(dout, o, D);
      float *dqh = dq + (size_t)t * Q + (size_t)h * D;
      for (int j = j0; j <= t; j++) {
        const float *kr = a->k + (size_t)j * KV + (size_t)kvh * D, *vr = a->v + (size_t)j * KV + (size_t)kvh * D;
        float pr = expf(cpu_dot(qh, kr, D) * scale - lse);
        float ds = pr * (cpu_dot(dout, vr, D) - dd) * scale;
        float *dvr = dv + (size_t)j * KV + (size_t)kvh * D, *dkr = dk + (size_t)j * KV + (size_t)kvh * D;
        for (int d = 0; d < D; d++) { dvr[d] += pr * dout[d]; dqh[d] += ds * kr[d]; dkr[d] += ds * qh[d]; }
      }
    }
}
/* }====================================================== */
