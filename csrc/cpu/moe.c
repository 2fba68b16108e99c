/*
** moe.c: the mixture of experts, forward and backward: the router's top-k
** and softmax, each chosen expert's MXFP4 gate_up, clamped SwiGLU and down
** (with their LoRAs), and the routing weights' sum.
**
** The forward runs expert by expert, so each expert's rows are read once
** for all the tokens that chose it; a->row says where each (token, choice)
** landed, for the backward. A rank of a split model runs its own experts'
** rows, zeroes the others' and sums the rows over the ranks before the
** combination (backend.h), which then runs as on one device.
*/
#include <math.h>
#include <string.h>
#include "cpu.h"

static const uint8_t *bytes_at(const gptoss_tensor *t, size_t off) { return (const uint8_t *)t->data + off; }

void cpu_route(const float *logits, int E, int k, int32_t *sel, float *w) {
  for (int i = 0; i < k; i++) {
    int best = -1;
    for (int e = 0; e < E; e++) {
      int taken = 0;
      for (int j = 0; j < i; j++) taken |= sel[j] == e;
      if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
    }
    sel[i] = best;
    w[i] = logits[best];
  }
  float mx = w[0], sum = 0;
  for (int i = 0; i < k; i++) { w[i] = expf(w[i] - mx); sum += w[i]; }
  for (int i = 0; i < k; i++) w[i] /= sum;
}

void cpu_moe(const cpu_pass *p, cpu_acts *a, int l, float *xout) {
  gptoss_model *m = p->m;
  const cpu_model *cm = p->cm;
  const gptoss_config *c = &m->cfg;
  int T = p->T, H = c->hidden_size, E = c->num_local_experts, K = c->num_experts_per_tok, I = c->intermediate_size;
  cpu_matmul_bf16(cm, a->rl, E, a->xn2, H, T, LAYER_T(m, l, GPTOSS_T_ROUTER_W)->data, E, H, LAYER_T(m, l, GPTOSS_T_ROUTER_B)->data);
  for (int t = 0; t < T; t++) {
    cpu_route(a->rl + (size_t)t * E, E, K, a->sel + (size_t)t * K, a->w + (size_t)t * K);
    if (!p->train) gptoss_trace_record(p->sess[t], p->trace_row[t], l, a->sel + (size_t)t * K, a->w + (size_t)t * K);
  }
  const gptoss_tensor *gub = LAYER_T(m, l, GPTOSS_T_GU_BLOCKS), *gus = LAYER_T(m, l, GPTOSS_T_GU_SCALES);
  const gptoss_tensor *dnb = LAYER_T(m, l, GPTOSS_T_DN_BLOCKS), *dns = LAYER_T(m, l, GPTOSS_T_DN_SCALES);
  const uint16_t *gubias = LAYER_T(m, l, GPTOSS_T_GU_BIAS)->data, *dnbias = LAYER_T(m, l, GPTOSS_T_DN_BIAS)->data;
  size_t gu_rows = (size_t)2 * I, gu_blk = gu_rows * (size_t)(H / 32), dn_blk = (size_t)H * (size_t)(I / 32);
  int r0 = 0;
  for (int e = 0; e < E; e++) {
    int n = 0;
    for (int ch = 0; ch < T * K; ch++)
      if (a->sel[ch] == e) {
        a->row[ch] = r0 + n;
        a->choice[r0 + n] = ch;
        memcpy(a->xin + (size_t)n * H, a->xn2 + (size_t)(ch / K) * H, sizeof(float) * (size_t)H);
        n++;
      }
    if (!n) continue;
    if (e < m->expert_lo || e >= m->expert_hi) {     /* another rank's */
      memset(a->ye + (size_t)r0 * H, 0, sizeof(float) * (size_t)n * H);
      r0 += n;
      continue;
    }
    float *gu = a->gu + (size_t)r0 * gu_rows, *act = a->act + (size_t)r0 * I, *ye = a->ye + (size_t)r0 * H;
    const int32_t *chs = a->choice + r0;
    cpu_matmul_mxfp4(cm, gu, (int)gu_rows, a->xin, H, n, bytes_at(gub, (size_t)e * gu_blk * 16), bytes_at(gus, (size_t)e * gu_blk),
                     (int)gu_rows, H, gubias + (size_t)e * gu_rows);
    if (p->lora)
      for (int i = 0; i < n; i++) {
        const gptoss_lora *x = cpu_token_lora(p, chs[i] / K, l, GPTOSS_LORA_GU);
        if (x) cpu_lora_expert(x, e, a->xin + (size_t)i * H, gu + (size_t)i * gu_rows, a->lora_h);
      }
    for (int i = 0; i < n; i++) cpu_swiglu(act + (size_t)i * I, gu + (size_t)i * gu_rows, I, (float)c->swiglu_limit);
    cpu_matmul_mxfp4(cm, ye, H, act, I, n, bytes_at(dnb, (size_t)e * dn_blk * 16), bytes_at(dns, (size_t)e * dn_blk),
                     H, I, dnbias + (size_t)e * H);
    if (p->lora)
      for (int i = 0; i < n; i++) {
        const gptoss_lora *x = cpu_token_lora(p, chs[i] / K, l, GPTOSS_LORA_DN);
        if (x) cpu_lora_expert(x, e, act + (size_t)i * I, ye + (size_t)i * H, a->lora_h);
      }
    r0 += n;
  }
  /* a failed sum leaves this rank's rows, and the pass is failed by the
     rank whose failure aborted it (split.c) */
  if (m->comm) (void)m->comm->sum(m->comm, m->rank, a->ye, (size_t)T * K * H, NULL);
  /* The weighted sum, in the order each path was checked in against its
     fixtures (transformers for inference, PEFT's autograd for training):
     inference sums a token's experts in expert order and then adds the
     sum to x_mid; training adds each expert to x_mid in top-k order. The
     two round differently, so one order for both would move the last bits
     of one path's logits or losses. */
  if (p->train) {
    for (int t = 0; t < T; t++) {
      float *xo = xout + (size_t)t * H;
      memcpy(xo, a->xmid + (size_t)t * H, sizeof(float) * (size_t)H);
      for (int j = 0; j < K; j++) {
        size_t ch = (size_t)t * K + j;
        const float *ye = a->ye + (size_t)a->row[ch] * H;
        for (int d = 0; d < H; d++) xo[d] += a->w[ch] * ye[d];
      }
    }
    return;
  }
  float *sum = a->xin;
  memset(sum, 0, sizeof(float) * (size_t)T * H);
  for (int r = 0; r < T * K; r++) {
    int ch = a->choice[r];
    float w = a->w[ch], *dst = sum + (size_t)(ch / K) * H;
    const float *src = a->ye + (size_t)r * H;
    for (int d = 0; d < H; d++) dst[d] += w * src[d];
  }
  for (size_t i = 0; i < (size_t)T * H; i++) xout[i] = a->xmid[i] + sum[i];
}

/* the routing weights are a softmax over the k chosen logits (the choice
   itself passes no gradient); a choice's weight multiplies its output */
void cpu_moe_backward(const cpu_pass *p, const cpu_acts *a, cpu_grads *g, int l, const float *dy, float *dxn2) {
  gptoss_model *m = p->m;
  const cpu_model *cm = p->cm;
  const gptoss_config *c = &m->cfg;
  int T = p->T, H = c->hidden_size, K = c->num_experts_per_tok, I = c->intermediate_size;
  size_t gu_rows = (size_t)2 * I, gu_blk = gu_rows * (size_t)(H / 32), dn_blk = (size_t)H * (size_t)(I / 32);
  const gptoss_tensor *gub = LAYER_T(m, l, GPTOSS_T_GU_BLOCKS), *gus = LAYER_T(m, l, GPTOSS_T_GU_SCALES);
  const gptoss_tensor *dnb = LAYER_T(m, l, GPTOSS_T_DN_BLOCKS), *dns = LAYER_T(m, l, GPTOSS_T_DN_SCALES);
  const uint16_t *router = LAYER_T(m, l, GPTOSS_T_ROUTER_W)->data;
  const gptoss_lora *lgu = gptoss_adapter_module(p->adapter, l, GPTOSS_LORA_GU);
  const gptoss_lora *ldn = gptoss_adapter_module(p->adapter, l, GPTOSS_LORA_DN);
  float *gu_gA = NULL, *gu_gB = NULL, *dn_gA = NULL, *dn_gB = NULL;
  if (lgu) gptoss_adapter_grads(p->adapter, l, GPTOSS_LORA_GU, &gu_gA, &gu_gB);
  if (ldn) gptoss_adapter_grads(p->adapter, l, GPTOSS_LORA_DN, &dn_gA, &dn_gB);
  for (int t = 0; t < T; t++) {
    const float *gt = dy + (size_t)t * H;
    float *dn = dxn2 + (size_t)t * H;
    double wdw = 0;
    for (int j = 0; j < K; j++) {
      size_t ch = (size_t)t * K + j, e = (size_t)a->sel[ch], r = (size_t)a->row[ch];
      const float *gu = a->gu + r * gu_rows, *ye = a->ye + r * H;
      g->dw[j] = cpu_dot(gt, ye, H);
      wdw += (double)a->w[ch] * g->dw[j];
      for (int d = 0; d < H; d++) g->dye[d] = a->w[ch] * gt[d];
      memset(g->dact, 0, sizeof(float) * (size_t)I);
      cpu_matmul_t_mxfp4(cm, g->dact, 0, g->dye, 0, 1, bytes_at(dnb, e * dn_blk * 16), bytes_at(dns, e * dn_blk), H, I);
      if (ldn) cpu_lora_expert_backward(ldn, dn_gA, dn_gB, (int)e, a->act + r * I, g->dye, g->dact, a->lora_h);
      cpu_swiglu_backward(g->dgu, gu, g->dact, I, (float)c->swiglu_limit);
      cpu_matmul_t_mxfp4(cm, dn, 0, g->dgu, 0, 1, bytes_at(gub, e * gu_blk * 16), bytes_at(gus, e * gu_blk), (int)gu_rows, H);
      if (lgu) cpu_lora_expert_backward(lgu, gu_gA, gu_gB, (int)e, a->xn2 + (size_t)t * H, g->dgu, dn, a->lora_h);
    }
    /* softmax over the k chosen logits; the router's input gets the rest */
    for (int j = 0; j < K; j++) {
      size_t ch = (size_t)t * K + j;
      float drl = a->w[ch] * (float)(g->dw[j] - wdw);
      cpu_bf16_row(g->wrow, router + (size_t)a->sel[ch] * H, H);
      for (int d = 0; d < H; d++) dn[d] += drl * g->wrow[d];
    }
  }
}
