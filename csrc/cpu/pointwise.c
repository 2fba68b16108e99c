/*
** pointwise.c: the elementwise ops, forward and backward: the experts'
** clamped SwiGLU, the loss's cross-entropy, LoRA's dropout.
*/
#include <math.h>
#include "cpu.h"

#define SWIGLU_ALPHA 1.702f

/* {====================================================== SwiGLU */
void cpu_swiglu(float *out, const float *h, int n, float limit) {
  const float alpha = SWIGLU_ALPHA;
  for (int j = 0; j < n; j++) {
    float g = h[2 * j], u = h[2 * j + 1];
    if (g > limit) g = limit;
    if (u > limit) u = limit;
    if (u < -limit) u = -limit;
    float glu = g / (1.0f + expf(-alpha * g));
    out[j] = (u + 1.0f) * glu;
  }
}

/* the clamps pass the gradient on [min, max] */
void cpu_swiglu_backward(float *dh, const float *h, const float *dout, int n, float limit) {
  const float alpha = SWIGLU_ALPHA;
  for (int i = 0; i < n; i++) {
    float gt = h[2 * i], up = h[2 * i + 1];
    float gc = gt > limit ? limit : gt, uc = up > limit ? limit : up < -limit ? -limit : up;
    float sg = 1.0f / (1.0f + expf(-alpha * gc)), glu = gc * sg;
    dh[2 * i + 1] = up >= -limit && up <= limit ? dout[i] * glu : 0.0f;
    dh[2 * i] = gt <= limit ? dout[i] * (uc + 1.0f) * (sg + gc * alpha * sg * (1.0f - sg)) : 0.0f;
  }
}
/* }====================================================== */

/* {====================================================== cross-entropy */
/* the sums in double: a vocabulary of 201k fp32 exponentials loses digits */
double cpu_cross_entropy(float *z, int V, int y) {
  float mx = z[0];
  for (int v = 1; v < V; v++) if (z[v] > mx) mx = z[v];
  double s = 0;
  for (int v = 0; v < V; v++) s += exp((double)z[v] - mx);
  double loss = mx + log(s) - z[y];
  for (int v = 0; v < V; v++) z[v] = (float)(exp((double)z[v] - mx) / s);
  z[y] -= 1.0f;
  return loss;
}
/* }====================================================== */

/* {====================================================== dropout */
/* the mask depends only on (seed, step, layer, projection, t, i), so the
   backward's recomputation sees the forward's */
const float *cpu_dropout(const cpu_pass *p, cpu_acts *a, int l, int mod, int t, const float *x, int n) {
  if (p->drop <= 0) return x;
  for (int i = 0; i < n; i++) {
    a->drop_keep[i] = gptoss_lora_keep(p->drop_key, l, mod, t, i, p->drop);
    a->drop_x[i] = x[i] * a->drop_keep[i];
  }
  return a->drop_x;
}
/* }====================================================== */
