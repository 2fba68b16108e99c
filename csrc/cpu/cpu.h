/*
** cpu.h: the CPU backend's kernels. fp32 arithmetic on bf16 and MXFP4
** weights read straight from the mapping; nothing is dequantized into a
** second copy of the model.
*/
#ifndef GPTOSS_CPU_H
#define GPTOSS_CPU_H

#include "../backend.h"
#include "../mxfp4.h"

/* the backend's model state (m->bm) */
typedef struct cpu_model {
  gptoss_pool *pool;
} cpu_model;

float cpu_dot(const float *a, const float *b, int n);
void cpu_bf16_row(float *dst, const uint16_t *src, int n);

/* out[t*os + r] = bias[r] + W[r,:] . in[t*is + :] for r < N, t < T; W bf16 [N][K] */
void cpu_matmul_bf16(gptoss_pool *p, float *out, int os, const float *in, int is, int T,
                     const uint16_t *W, int N, int K, const uint16_t *bias);
/* the same for the MXFP4 rows of one expert: blocks [N][K/32][16], scales [N][K/32] */
void cpu_matmul_mxfp4(gptoss_pool *p, float *out, int os, const float *in, int is, int T,
                      const uint8_t *blocks, const uint8_t *scales, int N, int K, const uint16_t *bias);

/* backward of those: dx[t*xs + k] += sum_r dy[t*ys + r] W[r,k] */
void cpu_matmul_t_bf16(gptoss_pool *p, float *dx, int xs, const float *dy, int ys, int T, const uint16_t *W, int N, int K);
void cpu_matmul_t_mxfp4(gptoss_pool *p, float *dx, int xs, const float *dy, int ys, int T,
                        const uint8_t *blocks, const uint8_t *scales, int N, int K);

void cpu_rmsnorm(float *out, const float *x, const uint16_t *w, int n, float eps);
/* half-split rotation of one head: pairs (i, i + d/2) by angle pos*inv_freq[i] */
void cpu_rope(float *x, int d, int pos, const float *inv_freq, float scale);
/* clamped SwiGLU over interleaved gate/up: out[j] from h[2j] (gate), h[2j+1] (up) */
void cpu_swiglu(float *out, const float *h, int n, float limit);
/* top-k of E router logits, sorted descending (ties: lower index first, as
   torch.topk), then softmax over the k */
void cpu_route(const float *logits, int E, int k, int32_t *sel, float *w);

/* expert e's share of an expert LoRA: y += scale * B_e (A_e x); h: r floats of scratch */
void cpu_lora_expert(const gptoss_lora *x, int e, const float *in, float *y, float *h);

/* LoRA training: loss of one sequence and the gradients of the adapter's
   weights (csrc/cpu/train.c) */
gptoss_status cpu_lora_backward(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                double *loss, int *count);

#endif
