/*
** layer.c: the gpt-oss layer, once, for inference and training alike,
** with its backward; the embedding and the head around the layers.
**
**   x_mid = x + Wo attn(rope(Wq h), rope(Wk h), Wv h) + LoRA terms, h = rms(x)
**   x_out = x_mid + sum_k w_k (Wd_e swiglu(Wgu_e rms(x_mid) + bgu) + bd),
**           w = softmax over the fixed top-k of the router logits
**
** An inference pass (cpu_pass.train = 0) writes its keys and values into
** the sessions' caches and keeps nothing; a training pass keeps in its
** cpu_acts every intermediate the backward reads (1/rms of both norms,
** q, k, v after RoPE, the attention's output and log-sum-exp, x_mid, the
** routing, each expert's gate_up, SwiGLU and down outputs). The sink,
** norms, router and experts are frozen; their inputs still get gradients,
** so every layer's LoRA sees the whole model's gradient.
*/
#include <stdlib.h>
#include <string.h>
#include "cpu.h"

/* {====================================================== workspaces */
/* each array 64-byte aligned in one allocation; base NULL only sizes it */
static void *carve(char *base, size_t *off, size_t bytes) {
  void *at = base ? base + *off : NULL;
  *off += (bytes + 63) & ~(size_t)63;
  return at;
}

static size_t acts_layout(cpu_acts *a, char *base, const cpu_pass *p, int longest) {
  const gptoss_config *c = &p->m->cfg;
  size_t T = (size_t)p->T, H = (size_t)c->hidden_size, Q = (size_t)c->num_attention_heads * (size_t)c->head_dim;
  size_t KV = (size_t)c->num_key_value_heads * (size_t)c->head_dim, TK = T * (size_t)c->num_experts_per_tok;
  size_t I = (size_t)c->intermediate_size, wide = H > Q ? H : Q, f = sizeof(float), off = 0;
  a->xn1 = carve(base, &off, f * T * H);
  a->q = carve(base, &off, f * T * Q);
  a->k = carve(base, &off, f * T * KV);
  a->v = carve(base, &off, f * T * KV);
  a->att = carve(base, &off, f * T * Q);
  a->xmid = carve(base, &off, f * T * H);
  a->xn2 = carve(base, &off, f * T * H);
  a->rl = carve(base, &off, f * T * (size_t)c->num_local_experts);
  a->w = carve(base, &off, f * TK);
  a->sel = carve(base, &off, sizeof(int32_t) * TK);
  a->row = carve(base, &off, sizeof(int32_t) * TK);
  a->choice = carve(base, &off, sizeof(int32_t) * TK);
  a->gu = carve(base, &off, f * TK * 2 * I);
  a->act = carve(base, &off, f * TK * I);
  a->ye = carve(base, &off, f * TK * H);
  a->xin = carve(base, &off, f * T * H);
  a->scores_len = longest;
  a->scores = carve(base, &off, f * (size_t)p->cm->nth * (size_t)longest);
  a->lora_h = carve(base, &off, f * 2 * GPTOSS_LORA_MAX_RANK);
  a->drop_x = carve(base, &off, f * wide);
  a->drop_keep = carve(base, &off, f * wide);
  a->inv1 = a->inv2 = a->lse = NULL;
  if (p->train) {
    a->inv1 = carve(base, &off, f * T);
    a->inv2 = carve(base, &off, f * T);
    a->lse = carve(base, &off, f * T * (size_t)c->num_attention_heads);
  }
  return off;
}

gptoss_status cpu_acts_alloc(cpu_acts *a, const cpu_pass *p, int longest) {
  a->slab = cpu_alloc(acts_layout(a, NULL, p, longest));
  if (!a->slab) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the activations of a pass of %d tokens", p->T);
  acts_layout(a, a->slab, p, longest);
  return GPTOSS_OK;
}

void cpu_acts_free(cpu_acts *a) {
  free(a->slab);
  a->slab = NULL;
}

static size_t grads_layout(cpu_grads *g, char *base, const gptoss_config *c, int T) {
  size_t H = (size_t)c->hidden_size, Q = (size_t)c->num_attention_heads * (size_t)c->head_dim;
  size_t KV = (size_t)c->num_key_value_heads * (size_t)c->head_dim, I = (size_t)c->intermediate_size;
  size_t f = sizeof(float), off = 0;
  g->dxn = carve(base, &off, f * (size_t)T * (H > Q ? H : Q));
  g->datt = carve(base, &off, f * (size_t)T * Q);
  g->dq = carve(base, &off, f * (size_t)T * Q);
  g->dk = carve(base, &off, f * (size_t)T * KV);
  g->dv = carve(base, &off, f * (size_t)T * KV);
  g->dye = carve(base, &off, f * H);
  g->dact = carve(base, &off, f * I);
  g->dgu = carve(base, &off, f * 2 * I);
  g->wrow = carve(base, &off, f * H);
  g->dw = carve(base, &off, f * (size_t)c->num_experts_per_tok);
  return off;
}

gptoss_status cpu_grads_alloc(cpu_grads *g, const gptoss_config *c, int T) {
  g->slab = cpu_alloc(grads_layout(g, NULL, c, T));
  if (!g->slab) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the gradients of a pass of %d tokens", T);
  grads_layout(g, g->slab, c, T);
  return GPTOSS_OK;
}

void cpu_grads_free(cpu_grads *g) {
  free(g->slab);
  g->slab = NULL;
}
/* }====================================================== */

/* {====================================================== the layer */
void cpu_embed(const cpu_pass *p, float *x, const int32_t *ids) {
  int H = p->m->cfg.hidden_size;
  const uint16_t *emb = p->m->embed->data;
  for (int t = 0; t < p->T; t++) cpu_bf16_row(x + (size_t)t * H, emb + (size_t)ids[t] * H, H);
}

void cpu_layer_forward(const cpu_pass *p, cpu_acts *a, int l, const float *x, float *xout) {
  gptoss_model *m = p->m;
  const cpu_model *cm = p->cm;
  const gptoss_config *c = &m->cfg;
  int T = p->T, H = c->hidden_size, Q = c->num_attention_heads * c->head_dim, kd = c->num_key_value_heads * c->head_dim;
  float eps = (float)c->rms_norm_eps;

  for (int t = 0; t < T; t++) {
    float r = cpu_rmsnorm(a->xn1 + (size_t)t * H, x + (size_t)t * H, LAYER_T(m, l, GPTOSS_T_ATTN_NORM)->data, H, eps);
    if (a->inv1) a->inv1[t] = r;
  }
  cpu_matmul_bf16(cm, a->q, Q, a->xn1, H, T, LAYER_T(m, l, GPTOSS_T_Q_W)->data, Q, H, LAYER_T(m, l, GPTOSS_T_Q_B)->data);
  cpu_matmul_bf16(cm, a->k, kd, a->xn1, H, T, LAYER_T(m, l, GPTOSS_T_K_W)->data, kd, H, LAYER_T(m, l, GPTOSS_T_K_B)->data);
  cpu_matmul_bf16(cm, a->v, kd, a->xn1, H, T, LAYER_T(m, l, GPTOSS_T_V_W)->data, kd, H, LAYER_T(m, l, GPTOSS_T_V_B)->data);
  if (p->lora) {
    cpu_lora(p, a, l, GPTOSS_LORA_Q, a->q, Q, a->xn1, H);
    cpu_lora(p, a, l, GPTOSS_LORA_K, a->k, kd, a->xn1, H);
    cpu_lora(p, a, l, GPTOSS_LORA_V, a->v, kd, a->xn1, H);
  }
  cpu_rope_qk(p, a->q, a->k, 0);
  if (!p->train)
    for (int t = 0; t < T; t++) {
      gptoss_session *s = p->sess[t];
      cpu_session *cs = s->bs;
      size_t slot = (size_t)gptoss_kv_slot(c->layer_sliding[l], s->ring, p->pos[t]);
      memcpy(cs->k[l] + slot * kd, a->k + (size_t)t * kd, sizeof(float) * (size_t)kd);
      memcpy(cs->v[l] + slot * kd, a->v + (size_t)t * kd, sizeof(float) * (size_t)kd);
    }
  cpu_attention(p, a, l);
  cpu_matmul_bf16(cm, a->xmid, H, a->att, Q, T, LAYER_T(m, l, GPTOSS_T_O_W)->data, H, Q, LAYER_T(m, l, GPTOSS_T_O_B)->data);
  if (p->lora) cpu_lora(p, a, l, GPTOSS_LORA_O, a->xmid, H, a->att, Q);
  for (size_t i = 0; i < (size_t)T * H; i++) a->xmid[i] += x[i];

  for (int t = 0; t < T; t++) {
    float r = cpu_rmsnorm(a->xn2 + (size_t)t * H, a->xmid + (size_t)t * H, LAYER_T(m, l, GPTOSS_T_MLP_NORM)->data, H, eps);
    if (a->inv2) a->inv2[t] = r;
  }
  cpu_moe(p, a, l, xout);
}

void cpu_layer_backward(const cpu_pass *p, cpu_acts *a, cpu_grads *g, int l, const float *x, float *dx) {
  gptoss_model *m = p->m;
  const cpu_model *cm = p->cm;
  const gptoss_config *c = &m->cfg;
  int T = p->T, H = c->hidden_size, Q = c->num_attention_heads * c->head_dim, KV = c->num_key_value_heads * c->head_dim;

  /* MoE: dx (d/d x_out) flows to x_mid directly and through the experts */
  memset(g->dxn, 0, sizeof(float) * (size_t)T * H);
  cpu_moe_backward(p, a, g, l, dx, g->dxn);
  const uint16_t *mlp_norm = LAYER_T(m, l, GPTOSS_T_MLP_NORM)->data;
  for (int t = 0; t < T; t++)                  /* dx becomes d/d x_mid */
    cpu_rmsnorm_backward(dx + (size_t)t * H, a->xmid + (size_t)t * H, a->inv2[t], mlp_norm, g->dxn + (size_t)t * H, H);

  /* o_proj: its output gradient is dx (x_mid = x + o) */
  memset(g->datt, 0, sizeof(float) * (size_t)T * Q);
  memset(g->dq, 0, sizeof(float) * (size_t)T * Q);
  memset(g->dk, 0, sizeof(float) * (size_t)T * KV);
  memset(g->dv, 0, sizeof(float) * (size_t)T * KV);
  cpu_matmul_t_bf16(cm, g->datt, Q, dx, H, T, LAYER_T(m, l, GPTOSS_T_O_W)->data, H, Q);
  cpu_lora_backward(p, a, l, GPTOSS_LORA_O, a->att, Q, dx, H, g->datt);
  cpu_attention_backward(p, a, l, g->datt, g->dq, g->dk, g->dv);
  cpu_rope_qk(p, g->dq, g->dk, 1);
  memset(g->dxn, 0, sizeof(float) * (size_t)T * H);
  cpu_matmul_t_bf16(cm, g->dxn, H, g->dq, Q, T, LAYER_T(m, l, GPTOSS_T_Q_W)->data, Q, H);
  cpu_matmul_t_bf16(cm, g->dxn, H, g->dk, KV, T, LAYER_T(m, l, GPTOSS_T_K_W)->data, KV, H);
  cpu_matmul_t_bf16(cm, g->dxn, H, g->dv, KV, T, LAYER_T(m, l, GPTOSS_T_V_W)->data, KV, H);
  cpu_lora_backward(p, a, l, GPTOSS_LORA_Q, a->xn1, H, g->dq, Q, g->dxn);
  cpu_lora_backward(p, a, l, GPTOSS_LORA_K, a->xn1, H, g->dk, KV, g->dxn);
  cpu_lora_backward(p, a, l, GPTOSS_LORA_V, a->xn1, H, g->dv, KV, g->dxn);
  const uint16_t *attn_norm = LAYER_T(m, l, GPTOSS_T_ATTN_NORM)->data;
  for (int t = 0; t < T; t++)                  /* dx becomes d/d x_in */
    cpu_rmsnorm_backward(dx + (size_t)t * H, x + (size_t)t * H, a->inv1[t], attn_norm, g->dxn + (size_t)t * H, H);
}

void cpu_head(const cpu_pass *p, const float *x, const int32_t *rows, int n, float *xn, float *inv, float *logits) {
  const gptoss_model *m = p->m;
  int H = m->cfg.hidden_size, V = m->cfg.vocab_size;
  if (n <= 0) return;
  for (int i = 0; i < n; i++) {
    float r = cpu_rmsnorm(xn + (size_t)i * H, x + (size_t)rows[i] * H, m->norm->data, H, (float)m->cfg.rms_norm_eps);
    if (inv) inv[i] = r;
  }
  cpu_matmul_bf16(p->cm, logits, V, xn, H, n, m->lm_head->data, V, H, NULL);
}
/* }====================================================== */
