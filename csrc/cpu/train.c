/*
** train.c: the CPU backward pass for LoRA training, fp32: the reference
** that PEFT + transformers' autograd is checked against.
**
** One sequence at a time, positions 0..n-1, no cache. The forward keeps
** only each layer's input (activation checkpointing per layer); the
** backward recomputes one layer's intermediates from it, then walks back:
**   MoE: y = x + sum_k w_k (Wd_e swiglu(Wgu_e rms(x) + bgu) + bd),
**        w = softmax over the fixed top-k of the router logits
**   attention: x + Wo attn(rope(Wq h), rope(Wk h), Wv h) + LoRA terms,
**        h = rms(x), softmax over the window plus the sink logit
** The sink, norms, router and experts are frozen; their inputs still get
** gradients, so every layer's LoRA sees the whole model's gradient.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* one layer's intermediates for T tokens */
typedef struct lcache {
  float *xn1, *inv1, *q, *k, *v, *lse, *att, *xmid, *xn2, *inv2, *rl, *w, *gu, *act, *ye;
  int32_t *sel;
} lcache;

typedef struct trainer {
  gptoss_model *m;
  gptoss_adapter *a;
  gptoss_pool *pool;
  int T, H, Q, KV, Hq, Hkv, D, E, K, I;
  float eps;
  lcache c;
  float *h;                      /* LoRA scratch, GPTOSS_LORA_MAX_RANK */
  float *xd, *keep;              /* a dropped-out input row and its mask (0 or 1/(1-p)) */
  float drop;                    /* LoRA dropout probability (attention projections) */
  uint64_t drop_key;             /* seed and step */
} trainer;

/* the LoRA input of token t: x, or x with dropout (kept features scaled by
   1/(1-p)); the mask depends only on (seed, step, layer, projection, t, i) */
static const float *lora_input(trainer *tr, int l, int mod, int t, const float *x, int n) {
  if (tr->drop <= 0) return x;
  for (int i = 0; i < n; i++) {
    tr->keep[i] = gptoss_lora_keep(tr->drop_key, l, mod, t, i, tr->drop);
    tr->xd[i] = x[i] * tr->keep[i];
  }
  return tr->xd;
}

static float rmsnorm_fwd(float *out, const float *x, const uint16_t *w, int n, float eps) {
  float ss = cpu_dot(x, x, n) / (float)n;
  float r = 1.0f / sqrtf(ss + eps);
  for (int i = 0; i < n; i++) out[i] = gptoss_bf16_to_f32(w[i]) * (x[i] * r);
  return r;
}

/* dx += d rms(x)/dx . dy, with y_i = w_i x_i r, r = (mean x^2 + eps)^-1/2 */
static void rmsnorm_bwd(float *dx, const float *x, float r, const uint16_t *w, const float *dy, int n) {
  double gx = 0;
  for (int i = 0; i < n; i++) gx += (double)gptoss_bf16_to_f32(w[i]) * dy[i] * x[i];
  float c = (float)(gx * r * r * r / n);
  for (int i = 0; i < n; i++) dx[i] += gptoss_bf16_to_f32(w[i]) * dy[i] * r - x[i] * c;
}

/* y[t] += s B (A x[t]) for the tokens of one module */
static void lora_fwd(trainer *tr, int l, gptoss_lora_module mod, float *y, int ys, const float *x, int xs) {
  const gptoss_lora *L = gptoss_adapter_module(tr->a, l, mod);
  if (!L) return;
  for (int t = 0; t < tr->T; t++) {
    const float *xt = lora_input(tr, l, mod, t, x + (size_t)t * xs, L->in);
    for (int i = 0; i < L->r; i++) tr->h[i] = cpu_dot(L->A + (size_t)i * L->in, xt, L->in);
    float *yt = y + (size_t)t * ys;
    for (int o = 0; o < L->out; o++) yt[o] += L->scale * cpu_dot(L->B + (size_t)o * L->r, tr->h, L->r);
  }
}

/* gradients of one module from its input x and output gradient dy; dx gets
   the LoRA path's share: dB += s dy h^T, dA += (s B^T dy) x^T, dx += A^T (s B^T dy) */
static void lora_bwd(trainer *tr, int l, gptoss_lora_module mod, const float *x, int xs, const float *dy, int ys, float *dx) {
  const gptoss_lora *L = gptoss_adapter_module(tr->a, l, mod);
  if (!L) return;
  float *gA, *gB, *h = tr->h, *dh = tr->h + L->r;
  gptoss_adapter_grads(tr->a, l, mod, &gA, &gB);
  for (int t = 0; t < tr->T; t++) {
    const float *xt = lora_input(tr, l, mod, t, x + (size_t)t * xs, L->in), *dyt = dy + (size_t)t * ys;
    for (int i = 0; i < L->r; i++) { h[i] = cpu_dot(L->A + (size_t)i * L->in, xt, L->in); dh[i] = 0; }
    for (int o = 0; o < L->out; o++) {
      float g = L->scale * dyt[o];
      if (g == 0.0f) continue;
      float *gb = gB + (size_t)o * L->r;
      const float *b = L->B + (size_t)o * L->r;
      for (int i = 0; i < L->r; i++) { gb[i] += g * h[i]; dh[i] += g * b[i]; }
    }
    float *dxt = dx + (size_t)t * xs;
    for (int i = 0; i < L->r; i++) {
      float *ga = gA + (size_t)i * L->in;
      const float *ar = L->A + (size_t)i * L->in;
      for (int c = 0; c < L->in; c++) {
        ga[c] += dh[i] * xt[c];
        /* through the dropout: zero where dropped, 1/(1-p) where kept */
        dxt[c] += tr->drop > 0 ? dh[i] * ar[c] * tr->keep[c] : dh[i] * ar[c];
      }
    }
  }
}

/* expert e's share of an expert LoRA's gradients (PEFT's ParamWrapper
   layout): with h = A_e x, dh = s B_e^T dy: gB_e += s dy h^T, gA_e += dh x^T,
   dx += A_e^T dh */
static void lora_expert_bwd(trainer *tr, const gptoss_lora *x, float *gA, float *gB, int e, const float *in, const float *dy,
                            float *din) {
  int E = x->experts, r = x->r;
  float *h = tr->h, *dh = tr->h + r;
  for (int k = 0; k < r; k++) { h[k] = cpu_dot(x->A + (size_t)(e * r + k) * x->in, in, x->in); dh[k] = 0; }
  for (int o = 0; o < x->out; o++) {
    float g = x->scale * dy[o];
    if (g == 0.0f) continue;
    const float *b = x->B + (size_t)o * x->rk + e;
    float *gb = gB + (size_t)o * x->rk + e;
    for (int k = 0; k < r; k++) { gb[(size_t)k * E] += g * h[k]; dh[k] += g * b[(size_t)k * E]; }
  }
  for (int k = 0; k < r; k++) {
    float *ga = gA + (size_t)(e * r + k) * x->in;
    const float *ar = x->A + (size_t)(e * r + k) * x->in;
    for (int i = 0; i < x->in; i++) { ga[i] += dh[k] * in[i]; din[i] += dh[k] * ar[i]; }
  }
}

static const uint8_t *blk(const gptoss_tensor *t, size_t off) { return (const uint8_t *)t->data + off; }

/* the layer forward from x_in to x_out, keeping every intermediate in tr->c */
static void layer_fwd(trainer *tr, int l, const float *x, float *xout) {
  gptoss_model *m = tr->m;
  const gptoss_config *cfg = &m->cfg;
  lcache *c = &tr->c;
  int T = tr->T, H = tr->H, Q = tr->Q, KV = tr->KV, D = tr->D, Hq = tr->Hq, G = tr->Hq / tr->Hkv, K = tr->K, I = tr->I;
  for (int t = 0; t < T; t++)
    c->inv1[t] = rmsnorm_fwd(c->xn1 + (size_t)t * H, x + (size_t)t * H, LAYER_T(m, l, GPTOSS_T_ATTN_NORM)->data, H, tr->eps);
  cpu_matmul_bf16(tr->pool, c->q, Q, c->xn1, H, T, LAYER_T(m, l, GPTOSS_T_Q_W)->data, Q, H, LAYER_T(m, l, GPTOSS_T_Q_B)->data);
  cpu_matmul_bf16(tr->pool, c->k, KV, c->xn1, H, T, LAYER_T(m, l, GPTOSS_T_K_W)->data, KV, H, LAYER_T(m, l, GPTOSS_T_K_B)->data);
  cpu_matmul_bf16(tr->pool, c->v, KV, c->xn1, H, T, LAYER_T(m, l, GPTOSS_T_V_W)->data, KV, H, LAYER_T(m, l, GPTOSS_T_V_B)->data);
  lora_fwd(tr, l, GPTOSS_LORA_Q, c->q, Q, c->xn1, H);
  lora_fwd(tr, l, GPTOSS_LORA_K, c->k, KV, c->xn1, H);
  lora_fwd(tr, l, GPTOSS_LORA_V, c->v, KV, c->xn1, H);
  for (int t = 0; t < T; t++) {
    for (int h = 0; h < Hq; h++) cpu_rope(c->q + (size_t)t * Q + (size_t)h * D, D, t, m->inv_freq, m->rope_scale);
    for (int h = 0; h < tr->Hkv; h++) cpu_rope(c->k + (size_t)t * KV + (size_t)h * D, D, t, m->inv_freq, m->rope_scale);
  }
  /* attention with the sink; lse keeps log(sum) for the backward */
  const uint16_t *sinks = LAYER_T(m, l, GPTOSS_T_SINKS)->data;
  int W = cfg->sliding_window, sliding = cfg->layer_sliding[l];
  float scale = 1.0f / sqrtf((float)D);
  float *sc = malloc(sizeof(float) * (size_t)T);
  if (!sc) abort();
  for (int t = 0; t < T; t++)
    for (int h = 0; h < Hq; h++) {
      int j0 = sliding && t - W + 1 > 0 ? t - W + 1 : 0, kvh = h / G;
      const float *qh = c->q + (size_t)t * Q + (size_t)h * D;
      float sink = gptoss_bf16_to_f32(sinks[h]), mx = sink;
      for (int j = j0; j <= t; j++) {
        sc[j - j0] = cpu_dot(qh, c->k + (size_t)j * KV + (size_t)kvh * D, D) * scale;
        if (sc[j - j0] > mx) mx = sc[j - j0];
      }
      float den = expf(sink - mx);
      for (int j = j0; j <= t; j++) { sc[j - j0] = expf(sc[j - j0] - mx); den += sc[j - j0]; }
      float *o = c->att + (size_t)t * Q + (size_t)h * D;
      memset(o, 0, sizeof(float) * (size_t)D);
      for (int j = j0; j <= t; j++) {
        const float *vr = c->v + (size_t)j * KV + (size_t)kvh * D;
        float p = sc[j - j0] / den;
        for (int d = 0; d < D; d++) o[d] += p * vr[d];
      }
      c->lse[(size_t)t * Hq + h] = mx + logf(den);
    }
  free(sc);
  cpu_matmul_bf16(tr->pool, c->xmid, H, c->att, Q, T, LAYER_T(m, l, GPTOSS_T_O_W)->data, H, Q, LAYER_T(m, l, GPTOSS_T_O_B)->data);
  lora_fwd(tr, l, GPTOSS_LORA_O, c->xmid, H, c->att, Q);
  for (size_t i = 0; i < (size_t)T * H; i++) c->xmid[i] += x[i];
  /* MoE, one (token, expert) pair at a time */
  int E = tr->E;
  for (int t = 0; t < T; t++)
    c->inv2[t] = rmsnorm_fwd(c->xn2 + (size_t)t * H, c->xmid + (size_t)t * H, LAYER_T(m, l, GPTOSS_T_MLP_NORM)->data, H, tr->eps);
  cpu_matmul_bf16(tr->pool, c->rl, E, c->xn2, H, T, LAYER_T(m, l, GPTOSS_T_ROUTER_W)->data, E, H, LAYER_T(m, l, GPTOSS_T_ROUTER_B)->data);
  const gptoss_tensor *gub = LAYER_T(m, l, GPTOSS_T_GU_BLOCKS), *gus = LAYER_T(m, l, GPTOSS_T_GU_SCALES);
  const gptoss_tensor *dnb = LAYER_T(m, l, GPTOSS_T_DN_BLOCKS), *dns = LAYER_T(m, l, GPTOSS_T_DN_SCALES);
  const uint16_t *gubias = LAYER_T(m, l, GPTOSS_T_GU_BIAS)->data, *dnbias = LAYER_T(m, l, GPTOSS_T_DN_BIAS)->data;
  size_t gu_rows = (size_t)2 * I, gu_g = gu_rows * (size_t)(H / 32), dn_g = (size_t)H * (size_t)(I / 32);
  memcpy(xout, c->xmid, sizeof(float) * (size_t)T * H);
  const gptoss_lora *lgu = gptoss_adapter_module(tr->a, l, GPTOSS_LORA_GU), *ldn = gptoss_adapter_module(tr->a, l, GPTOSS_LORA_DN);
  for (int t = 0; t < T; t++) {
    cpu_route(c->rl + (size_t)t * E, E, K, c->sel + (size_t)t * K, c->w + (size_t)t * K);
    for (int j = 0; j < K; j++) {
      size_t p = (size_t)t * K + j, e = (size_t)c->sel[p];
      float *gu = c->gu + p * gu_rows, *act = c->act + p * I, *ye = c->ye + p * H;
      cpu_matmul_mxfp4(tr->pool, gu, 0, c->xn2 + (size_t)t * H, H, 1, blk(gub, e * gu_g * 16), blk(gus, e * gu_g),
                       (int)gu_rows, H, gubias + e * gu_rows);
      if (lgu) cpu_lora_expert(lgu, (int)e, c->xn2 + (size_t)t * H, gu, tr->h);
      cpu_swiglu(act, gu, I, (float)cfg->swiglu_limit);
      cpu_matmul_mxfp4(tr->pool, ye, 0, act, I, 1, blk(dnb, e * dn_g * 16), blk(dns, e * dn_g), H, I, dnbias + e * (size_t)H);
      if (ldn) cpu_lora_expert(ldn, (int)e, act, ye, tr->h);
      float *xo = xout + (size_t)t * H;
      for (int d = 0; d < H; d++) xo[d] += c->w[p] * ye[d];
    }
  }
}

/* dx (in: d loss / d x_out; out: d loss / d x_in) through layer l, whose
   intermediates layer_fwd left in tr->c for input x */
static void layer_bwd(trainer *tr, int l, const float *x, float *dx) {
  gptoss_model *m = tr->m;
  const gptoss_config *cfg = &m->cfg;
  lcache *c = &tr->c;
  int T = tr->T, H = tr->H, Q = tr->Q, KV = tr->KV, D = tr->D, Hq = tr->Hq, G = tr->Hq / tr->Hkv, K = tr->K, I = tr->I;
  size_t gu_rows = (size_t)2 * I, gu_g = gu_rows * (size_t)(H / 32), dn_g = (size_t)H * (size_t)(I / 32);
  const gptoss_tensor *gub = LAYER_T(m, l, GPTOSS_T_GU_BLOCKS), *gus = LAYER_T(m, l, GPTOSS_T_GU_SCALES);
  const gptoss_tensor *dnb = LAYER_T(m, l, GPTOSS_T_DN_BLOCKS), *dns = LAYER_T(m, l, GPTOSS_T_DN_SCALES);
  const uint16_t *router = LAYER_T(m, l, GPTOSS_T_ROUTER_W)->data;
  float limit = (float)cfg->swiglu_limit, alpha = 1.702f;
  const gptoss_lora *lgu = gptoss_adapter_module(tr->a, l, GPTOSS_LORA_GU), *ldn = gptoss_adapter_module(tr->a, l, GPTOSS_LORA_DN);
  float *ggu[2], *gdn[2];   /* their gradients, A's and B's */
  gptoss_adapter_grads(tr->a, l, GPTOSS_LORA_GU, &ggu[0], &ggu[1]);
  gptoss_adapter_grads(tr->a, l, GPTOSS_LORA_DN, &gdn[0], &gdn[1]);

  /* MoE: dx (d/d x_out) flows to x_mid directly and through the experts */
  float *dxn = calloc((size_t)T * (H > Q ? H : Q), sizeof(float));
  float *dye = malloc(sizeof(float) * (size_t)H), *dact = malloc(sizeof(float) * (size_t)I);
  float *dgu = malloc(sizeof(float) * gu_rows), *wrow = malloc(sizeof(float) * (size_t)H);
  float *dw = malloc(sizeof(float) * (size_t)K);
  if (!dxn || !dye || !dact || !dgu || !wrow || !dw) abort();
  for (int t = 0; t < T; t++) {
    const float *g = dx + (size_t)t * H;
    float *dn = dxn + (size_t)t * H;
    double wdw = 0;
    for (int j = 0; j < K; j++) {
      size_t p = (size_t)t * K + j, e = (size_t)c->sel[p];
      const float *gu = c->gu + p * gu_rows, *ye = c->ye + p * H;
      dw[j] = cpu_dot(g, ye, H);
      wdw += (double)c->w[p] * dw[j];
      for (int d = 0; d < H; d++) dye[d] = c->w[p] * g[d];
      memset(dact, 0, sizeof(float) * (size_t)I);
      cpu_matmul_t_mxfp4(tr->pool, dact, 0, dye, 0, 1, blk(dnb, e * dn_g * 16), blk(dns, e * dn_g), H, I);
      if (ldn) lora_expert_bwd(tr, ldn, gdn[0], gdn[1], (int)e, c->act + p * I, dye, dact);
      for (int i = 0; i < I; i++) {       /* clamped SwiGLU; clamp passes gradient on [min, max] */
        float gt = gu[2 * i], up = gu[2 * i + 1];
        float gc = gt > limit ? limit : gt, uc = up > limit ? limit : up < -limit ? -limit : up;
        float sg = 1.0f / (1.0f + expf(-alpha * gc)), glu = gc * sg;
        dgu[2 * i + 1] = up >= -limit && up <= limit ? dact[i] * glu : 0.0f;
        dgu[2 * i] = gt <= limit ? dact[i] * (uc + 1.0f) * (sg + gc * alpha * sg * (1.0f - sg)) : 0.0f;
      }
      cpu_matmul_t_mxfp4(tr->pool, dn, 0, dgu, 0, 1, blk(gub, e * gu_g * 16), blk(gus, e * gu_g), (int)gu_rows, H);
      if (lgu) lora_expert_bwd(tr, lgu, ggu[0], ggu[1], (int)e, c->xn2 + (size_t)t * H, dgu, dn);
    }
    /* softmax over the k chosen logits; the router's input gets the rest */
    for (int j = 0; j < K; j++) {
      size_t p = (size_t)t * K + j;
      float drl = c->w[p] * (float)(dw[j] - wdw);
      cpu_bf16_row(wrow, router + (size_t)c->sel[p] * H, H);
      for (int d = 0; d < H; d++) dn[d] += drl * wrow[d];
    }
  }
  const uint16_t *mlp_norm = LAYER_T(m, l, GPTOSS_T_MLP_NORM)->data;
  for (int t = 0; t < T; t++)                  /* dx becomes d/d x_mid */
    rmsnorm_bwd(dx + (size_t)t * H, c->xmid + (size_t)t * H, c->inv2[t], mlp_norm, dxn + (size_t)t * H, H);

  /* o_proj: its output gradient is dx (x_mid = x + o) */
  float *datt = calloc((size_t)T * Q, sizeof(float));
  float *dq = calloc((size_t)T * Q, sizeof(float)), *dk = calloc((size_t)T * KV, sizeof(float));
  float *dv = calloc((size_t)T * KV, sizeof(float));
  if (!datt || !dq || !dk || !dv) abort();
  cpu_matmul_t_bf16(tr->pool, datt, Q, dx, H, T, LAYER_T(m, l, GPTOSS_T_O_W)->data, H, Q);
  lora_bwd(tr, l, GPTOSS_LORA_O, c->att, Q, dx, H, datt);

  /* attention: recompute each row's probabilities from lse */
  int W = cfg->sliding_window, sliding = cfg->layer_sliding[l];
  float scale = 1.0f / sqrtf((float)D);
  for (int t = 0; t < T; t++)
    for (int h = 0; h < Hq; h++) {
      int j0 = sliding && t - W + 1 > 0 ? t - W + 1 : 0, kvh = h / G;
      const float *qh = c->q + (size_t)t * Q + (size_t)h * D, *o = c->att + (size_t)t * Q + (size_t)h * D;
      const float *dout = datt + (size_t)t * Q + (size_t)h * D;
      float lse = c->lse[(size_t)t * Hq + h], dd = cpu_dot(dout, o, D);
      float *dqh = dq + (size_t)t * Q + (size_t)h * D;
      for (int j = j0; j <= t; j++) {
        const float *kr = c->k + (size_t)j * KV + (size_t)kvh * D, *vr = c->v + (size_t)j * KV + (size_t)kvh * D;
        float p = expf(cpu_dot(qh, kr, D) * scale - lse);
        float ds = p * (cpu_dot(dout, vr, D) - dd) * scale;
        float *dvr = dv + (size_t)j * KV + (size_t)kvh * D, *dkr = dk + (size_t)j * KV + (size_t)kvh * D;
        for (int d = 0; d < D; d++) { dvr[d] += p * dout[d]; dqh[d] += ds * kr[d]; dkr[d] += ds * qh[d]; }
      }
    }
  /* RoPE is a scaled rotation: its transpose rotates back */
  for (int t = 0; t < T; t++) {
    for (int h = 0; h < Hq; h++) cpu_rope(dq + (size_t)t * Q + (size_t)h * D, D, -t, m->inv_freq, m->rope_scale);
    for (int h = 0; h < tr->Hkv; h++) cpu_rope(dk + (size_t)t * KV + (size_t)h * D, D, -t, m->inv_freq, m->rope_scale);
  }
  memset(dxn, 0, sizeof(float) * (size_t)T * H);
  cpu_matmul_t_bf16(tr->pool, dxn, H, dq, Q, T, LAYER_T(m, l, GPTOSS_T_Q_W)->data, Q, H);
  cpu_matmul_t_bf16(tr->pool, dxn, H, dk, KV, T, LAYER_T(m, l, GPTOSS_T_K_W)->data, KV, H);
  cpu_matmul_t_bf16(tr->pool, dxn, H, dv, KV, T, LAYER_T(m, l, GPTOSS_T_V_W)->data, KV, H);
  lora_bwd(tr, l, GPTOSS_LORA_Q, c->xn1, H, dq, Q, dxn);
  lora_bwd(tr, l, GPTOSS_LORA_K, c->xn1, H, dk, KV, dxn);
  lora_bwd(tr, l, GPTOSS_LORA_V, c->xn1, H, dv, KV, dxn);
  const uint16_t *attn_norm = LAYER_T(m, l, GPTOSS_T_ATTN_NORM)->data;
  for (int t = 0; t < T; t++)                  /* dx becomes d/d x_in */
    rmsnorm_bwd(dx + (size_t)t * H, x + (size_t)t * H, c->inv1[t], attn_norm, dxn + (size_t)t * H, H);
  free(dxn); free(dye); free(dact); free(dgu); free(wrow); free(dw);
  free(datt); free(dq); free(dk); free(dv);
}

gptoss_status cpu_lora_backward(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                double *loss, int *count) {
  const gptoss_config *cfg = &m->cfg;
  trainer tr = {0};
  tr.m = m; tr.a = a; tr.pool = ((cpu_model *)m->bm)->pool;
  tr.T = n; tr.H = cfg->hidden_size; tr.Hq = cfg->num_attention_heads; tr.Hkv = cfg->num_key_value_heads;
  tr.D = cfg->head_dim; tr.Q = tr.Hq * tr.D; tr.KV = tr.Hkv * tr.D; tr.E = cfg->num_local_experts;
  tr.K = cfg->num_experts_per_tok; tr.I = cfg->intermediate_size; tr.eps = (float)cfg->rms_norm_eps;
  int T = n, H = tr.H, L = cfg->num_hidden_layers, V = cfg->vocab_size;
  size_t TK = (size_t)T * tr.K;
  lcache *c = &tr.c;
  float *xs = malloc(sizeof(float) * (size_t)(L + 1) * T * H);   /* each layer's input, then the output */
  c->xn1 = malloc(sizeof(float) * (size_t)T * H); c->inv1 = malloc(sizeof(float) * (size_t)T);
  c->q = malloc(sizeof(float) * (size_t)T * tr.Q); c->k = malloc(sizeof(float) * (size_t)T * tr.KV);
  c->v = malloc(sizeof(float) * (size_t)T * tr.KV); c->lse = malloc(sizeof(float) * (size_t)T * tr.Hq);
  c->att = malloc(sizeof(float) * (size_t)T * tr.Q); c->xmid = malloc(sizeof(float) * (size_t)T * H);
  c->xn2 = malloc(sizeof(float) * (size_t)T * H); c->inv2 = malloc(sizeof(float) * (size_t)T);
  c->rl = malloc(sizeof(float) * (size_t)T * tr.E); c->w = malloc(sizeof(float) * TK);
  c->sel = malloc(sizeof(int32_t) * TK); c->gu = malloc(sizeof(float) * TK * 2 * (size_t)tr.I);
  c->act = malloc(sizeof(float) * TK * (size_t)tr.I); c->ye = malloc(sizeof(float) * TK * H);
  tr.h = malloc(sizeof(float) * 2 * GPTOSS_LORA_MAX_RANK);
  uint64_t dseed;
  tr.drop = (float)gptoss_adapter_dropout(a, &dseed);
  tr.drop_key = gptoss_mix64(dseed ^ ((uint64_t)gptoss_adapter_steps(a) << 32));
  tr.xd = malloc(sizeof(float) * (size_t)(H > tr.Q ? H : tr.Q));
  tr.keep = malloc(sizeof(float) * (size_t)(H > tr.Q ? H : tr.Q));
  float *dx = calloc((size_t)T * H, sizeof(float)), *xf = malloc(sizeof(float) * (size_t)T * H);
  float *inv = malloc(sizeof(float) * (size_t)T), *lg = malloc(sizeof(float) * (size_t)V * T);
  int *rows = malloc(sizeof(int) * (size_t)T);
  gptoss_status rc = GPTOSS_OK;
  if (!xs || !c->xn1 || !c->inv1 || !c->q || !c->k || !c->v || !c->lse || !c->att || !c->xmid || !c->xn2 || !c->inv2 ||
      !c->rl || !c->w || !c->sel || !c->gu || !c->act || !c->ye || !tr.h || !tr.xd || !tr.keep || !dx || !xf || !inv || !lg || !rows) {
    rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory for the backward pass of %d tokens", n);
    goto done;
  }
  const uint16_t *emb = m->embed->data;
  for (int t = 0; t < T; t++) cpu_bf16_row(xs + (size_t)t * H, emb + (size_t)ids[t] * H, H);
  for (int l = 0; l < L; l++) layer_fwd(&tr, l, xs + (size_t)l * T * H, xs + (size_t)(l + 1) * T * H);
  /* loss: position t predicts ids[t + 1] where mask[t + 1] */
  const float *xl = xs + (size_t)L * T * H;
  int nr = 0;
  for (int t = 0; t + 1 < T; t++) if (mask[t + 1]) rows[nr++] = t;
  for (int i = 0; i < nr; i++) inv[i] = rmsnorm_fwd(xf + (size_t)i * H, xl + (size_t)rows[i] * H, m->norm->data, H, tr.eps);
  cpu_matmul_bf16(tr.pool, lg, V, xf, H, nr, m->lm_head->data, V, H, NULL);
  double total = 0;
  for (int i = 0; i < nr; i++) {               /* lg becomes d(loss sum)/d logits */
    float *z = lg + (size_t)i * V, mx = z[0];
    for (int v = 1; v < V; v++) if (z[v] > mx) mx = z[v];
    double s = 0;
    for (int v = 0; v < V; v++) s += exp((double)z[v] - mx);
    int y = ids[rows[i] + 1];
    total += mx + log(s) - z[y];
    for (int v = 0; v < V; v++) z[v] = (float)(exp((double)z[v] - mx) / s);
    z[y] -= 1.0f;
  }
  memset(xf, 0, sizeof(float) * (size_t)T * H);
  cpu_matmul_t_bf16(tr.pool, xf, H, lg, V, nr, m->lm_head->data, V, H);
  for (int i = 0; i < nr; i++)
    rmsnorm_bwd(dx + (size_t)rows[i] * H, xl + (size_t)rows[i] * H, inv[i], m->norm->data, xf + (size_t)i * H, H);
  for (int l = L - 1; l >= 0; l--) {
    /* recompute the layer's intermediates (the last layer's are still
       there from the forward); xf takes the unused output */
    if (l < L - 1) layer_fwd(&tr, l, xs + (size_t)l * T * H, xf);
    layer_bwd(&tr, l, xs + (size_t)l * T * H, dx);
  }
  *loss = total;
  *count = nr;
done:
  free(xs); free(c->xn1); free(c->inv1); free(c->q); free(c->k); free(c->v); free(c->lse); free(c->att);
  free(c->xmid); free(c->xn2); free(c->inv2); free(c->rl); free(c->w); free(c->sel); free(c->gu); free(c->act);
  free(c->ye); free(tr.h); free(tr.xd); free(tr.keep); free(dx); free(xf); free(inv); free(lg); free(rows);
  return rc;
}
