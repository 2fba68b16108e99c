/*
** norm.c: RMSNorm, forward and backward.
*/
#include <math.h>
#include "cpu.h"

/* as transformers computes it: fp32 mean of squares, then the weight */
float cpu_rmsnorm(float *out, const float *x, const uint16_t *w, int n, float eps) {
  float ss = cpu_dot(x, x, n) / (float)n;
  float r = 1.0f / sqrtf(ss + eps);
  for (int i = 0; i < n; i++) out[i] = gptoss_bf16_to_f32(w[i]) * (x[i] * r);
  return r;
}

/* with y_i = w_i x_i r, r = (mean x^2 + eps)^-1/2 */
void cpu_rmsnorm_backward(float *dx, const float *x, float r, const uint16_t *w, const float *dy, int n) {
  double gx = 0;
  for (int i = 0; i < n; i++) gx += (double)gptoss_bf16_to_f32(w[i]) * dy[i] * x[i];
  float c = (float)(gx * r * r * r / n);
  for (int i = 0; i < n; i++) dx[i] += gptoss_bf16_to_f32(w[i]) * dy[i] * r - x[i] * c;
}
