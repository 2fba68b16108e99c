/*
** lora.c: LoRA, forward and backward, as PEFT computes it: y += scale *
** B (A x) on an attention projection (PEFT's Linear), per expert inside the
** MoE (PEFT's ParamWrapper layout, see gptoss.h). Inference takes each
** token's module from its session's adapter, so one pass can mix adapters;
** training has one adapter and dropout on the attention LoRAs' inputs.
*/
#include <string.h>
#include "cpu.h"

/* {====================================================== projections */
void cpu_lora(const cpu_pass *p, cpu_acts *a, int l, gptoss_lora_module mod, float *y, int ys, const float *x, int xs) {
  float *h = a->lora_h;
  for (int t = 0; t < p->T; t++) {
    const gptoss_lora *L = cpu_token_lora(p, t, l, mod);
    if (!L) continue;
    const float *xt = cpu_dropout(p, a, l, mod, t, x + (size_t)t * xs, L->in);
    float *yt = y + (size_t)t * ys;
    for (int i = 0; i < L->r; i++) h[i] = cpu_dot(L->A + (size_t)i * L->in, xt, L->in);
    for (int o = 0; o < L->out; o++) yt[o] += L->scale * cpu_dot(L->B + (size_t)o * L->r, h, L->r);
  }
}

/* with h = A x: dB += s dy h^T, dA += (s B^T dy) x^T, dx += A^T (s B^T dy);
   training's one adapter */
void cpu_lora_backward(const cpu_pass *p, cpu_acts *a, int l, gptoss_lora_module mod,
                       const float *x, int xs, const float *dy, int ys, float *dx) {
  const gptoss_lora *L = gptoss_adapter_module(p->adapter, l, mod);
  if (!L) return;
  float *gA, *gB;
  gptoss_adapter_grads(p->adapter, l, mod, &gA, &gB);
  float *h = a->lora_h, *dh = a->lora_h + L->r;
  for (int t = 0; t < p->T; t++) {
    const float *xt = cpu_dropout(p, a, l, mod, t, x + (size_t)t * xs, L->in), *dyt = dy + (size_t)t * ys;
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
        dxt[c] += p->drop > 0 ? dh[i] * ar[c] * a->drop_keep[c] : dh[i] * ar[c];
      }
    }
  }
}
/* }====================================================== */

/* {====================================================== experts */
/* expert e's rank-k column of B sits at k*E + e */
void cpu_lora_expert(const gptoss_lora *x, int e, const float *in, float *y, float *h) {
  int E = x->experts, r = x->r;
  for (int k = 0; k < r; k++) h[k] = cpu_dot(x->A + (size_t)(e * r + k) * x->in, in, x->in);
  for (int o = 0; o < x->out; o++) {
    const float *b = x->B + (size_t)o * x->rk + e;
    float acc = 0;
    for (int k = 0; k < r; k++) acc += b[(size_t)k * E] * h[k];
    y[o] += x->scale * acc;
  }
}

/* with h = A_e x, dh = s B_e^T dy; gA, gB: the module's gradients */
void cpu_lora_expert_backward(const gptoss_lora *x, float *gA, float *gB, int e, const float *in, const float *dy,
                              float *din, float *h) {
  int E = x->experts, r = x->r;
  float *dh = h + r;
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
/* }====================================================== */
