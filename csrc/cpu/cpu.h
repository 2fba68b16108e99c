/*
** cpu.h: the CPU backend. fp32 arithmetic on bf16 and MXFP4 weights read
** straight from the mapping; nothing is dequantized into a second copy of
** the model. One file per op, its forward and backward together:
**   matmul.c     weight rows (bf16, MXFP4), dot, products and their transposes
**   norm.c       RMSNorm
**   attention.c  RoPE, attention with the sink and window
**   moe.c        router, experts (MXFP4 + SwiGLU), their combination
**   lora.c       LoRA on the projections and the experts
**   pointwise.c  SwiGLU, cross-entropy, dropout
**   layer.c      the layer, for inference and training alike; embedding, head
**   forward.c    the backend: sessions, KV caches, a planned pass, sampling
**   train.c      LoRA training's pass (forward keeping activations, backward)
**   alloc.c      allocation, with the test hook that makes it fail
*/
#ifndef GPTOSS_CPU_H
#define GPTOSS_CPU_H

#include "../backend.h"
#include "../mxfp4.h"

/* the backend's model state (m->bm) */
typedef struct cpu_model {
  gptoss_pool *pool;
  int nth;                       /* the pool's threads */
  float *rows;                   /* [nth][row_len]: each thread's weight row, converted to fp32 */
  int row_len;                   /* the widest row a product reads */
} cpu_model;

/* a session's KV cache: per layer, K and V as [slots][kv_heads*head_dim]
   fp32. Full layers grow toward the context; sliding layers are a ring. */
typedef struct cpu_session {
  float **k, **v;
  int *cap;                      /* slots allocated per layer */
} cpu_session;

/* {====================================================== allocation (alloc.c) */
/* malloc, calloc and realloc for the backend: every allocation of the CPU
   backend goes through these, so that gptoss_test_fail_alloc can fail any
   one of them */
void *cpu_alloc(size_t n);
void *cpu_zalloc(size_t n);
void *cpu_realloc(void *p, size_t n);
/* }====================================================== */

/* {====================================================== weights and products (matmul.c) */
float cpu_dot(const float *a, const float *b, int n);
void cpu_bf16_row(float *dst, const uint16_t *src, int n);

/* out[t*os + r] = bias[r] + W[r,:] . in[t*is + :] for r < N, t < T; W bf16 [N][K]; K <= cm->row_len */
void cpu_matmul_bf16(const cpu_model *cm, float *out, int os, const float *in, int is, int T,
                     const uint16_t *W, int N, int K, const uint16_t *bias);
/* the same for the MXFP4 rows of one expert: blocks [N][K/32][16], scales [N][K/32] */
void cpu_matmul_mxfp4(const cpu_model *cm, float *out, int os, const float *in, int is, int T,
                      const uint8_t *blocks, const uint8_t *scales, int N, int K, const uint16_t *bias);
/* backward of those: dx[t*xs + k] += sum_r dy[t*ys + r] W[r,k] */
void cpu_matmul_t_bf16(const cpu_model *cm, float *dx, int xs, const float *dy, int ys, int T,
                       const uint16_t *W, int N, int K);
void cpu_matmul_t_mxfp4(const cpu_model *cm, float *dx, int xs, const float *dy, int ys, int T,
                        const uint8_t *blocks, const uint8_t *scales, int N, int K);
/* }====================================================== */

/* {====================================================== a pass and its activations */
/* The tokens one layer call runs over: a planned inference pass (tokens of
   several sessions, keys and values into their caches) or training's one
   sequence (positions 0..T-1, no cache) */
typedef struct cpu_pass {
  gptoss_model *m;
  const cpu_model *cm;
  int T;
  const int32_t *pos;            /* [T] absolute position of each token */
  const int32_t *seg0;           /* training, packed examples: [T] the row where each token's example begins; else NULL */
  gptoss_session **sess;         /* [T] each token's session (cache, adapter, trace); NULL when training */
  const int *trace_row;          /* [T] the token's index within its session's feed */
  int lora;                      /* some token has an adapter */
  /* training: keep what the backward reads, keys and values stay in the
     activations, one adapter for every token, LoRA dropout */
  int train;
  gptoss_adapter *adapter;
  float drop;                    /* dropout probability on the attention LoRAs' inputs */
  uint64_t drop_key;             /* seed and step */
} cpu_pass;

/* one layer's activations for a pass's T tokens; a token's k experts
   (choices t*k .. t*k+k-1) run expert by expert, so gu, act and ye hold
   one row per choice in that order, row[choice] saying which */
typedef struct cpu_acts {
  float *xn1, *q, *k, *v, *att, *xmid, *xn2, *rl, *w, *gu, *act, *ye;
  int32_t *sel, *row, *choice;   /* choice -> row, row -> choice */
  float *inv1, *inv2, *lse;      /* RMSNorm's 1/rms and attention's log-sum-exp: training only */
  float *xin;                    /* scratch: one expert's input rows */
  float *scores;                 /* scratch: [nth][scores_len] attention scores */
  int scores_len;
  float *lora_h;                 /* scratch: [2 * GPTOSS_LORA_MAX_RANK] LoRA's A x and its gradient */
  float *drop_x, *drop_keep;     /* scratch: a dropped-out LoRA input row and its mask (training) */
  void *slab;                    /* the one allocation all of these live in */
} cpu_acts;

/* longest: the most keys a token of the pass attends to */
gptoss_status cpu_acts_alloc(cpu_acts *a, const cpu_pass *p, int longest);
void cpu_acts_free(cpu_acts *a);

/* the backward's scratch for one layer */
typedef struct cpu_grads {
  float *dxn, *datt, *dq, *dk, *dv;
  float *dye, *dact, *dgu, *wrow, *dw;
  void *slab;
} cpu_grads;
gptoss_status cpu_grads_alloc(cpu_grads *g, const gptoss_config *c, int T);
void cpu_grads_free(cpu_grads *g);

/* the LoRA module of token t at projection mod of layer l, or NULL */
static inline const gptoss_lora *cpu_token_lora(const cpu_pass *p, int t, int l, gptoss_lora_module mod) {
  return gptoss_adapter_module(p->train ? p->adapter : p->sess[t]->adapter, l, mod);
}
/* }====================================================== */

/* {====================================================== the layer (layer.c) */
/* x[t] = the embedding of ids[t] */
void cpu_embed(const cpu_pass *p, float *x, const int32_t *ids);
/* x_out = layer l of x_in (they may be the same buffer); training keeps in a
   every intermediate the backward reads */
void cpu_layer_forward(const cpu_pass *p, cpu_acts *a, int l, const float *x, float *xout);
/* dx (in: d loss / d x_out; out: d loss / d x_in) through layer l, whose
   intermediates cpu_layer_forward left in a for input x; the LoRA
   gradients accumulate in the adapter */
void cpu_layer_backward(const cpu_pass *p, cpu_acts *a, cpu_grads *g, int l, const float *x, float *dx);
/* logits[i] = lm_head rms(x[rows[i]]) for i < n; xn: [n][hidden] scratch;
   inv: 1/rms of each (NULL: not kept) */
void cpu_head(const cpu_pass *p, const float *x, const int32_t *rows, int n, float *xn, float *inv, float *logits);
/* }====================================================== */

/* {====================================================== the ops */
/* RMSNorm as transformers computes it; returns 1/rms */
float cpu_rmsnorm(float *out, const float *x, const uint16_t *w, int n, float eps);
/* dx += d rms(x)/dx . dy, r the forward's 1/rms */
void cpu_rmsnorm_backward(float *dx, const float *x, float r, const uint16_t *w, const float *dy, int n);

/* half-split rotation of one head: pairs (i, i + d/2) by angle pos*inv_freq[i] */
void cpu_rope(float *x, int d, int pos, const float *inv_freq, float scale);
/* rotates q and k of every token of the pass (back, when backward) */
void cpu_rope_qk(const cpu_pass *p, float *q, float *k, int backward);
/* att = attention of layer l over the pass's tokens, keys and values from
   the sessions' caches (inference) or a->k, a->v (training, keeping a->lse) */
void cpu_attention(const cpu_pass *p, cpu_acts *a, int l);
/* dq, dk, dv (zeroed by the caller) from datt, the probabilities
   recomputed from a->lse (training) */
void cpu_attention_backward(const cpu_pass *p, const cpu_acts *a, int l, const float *datt,
                            float *dq, float *dk, float *dv);

/* top-k of E router logits, sorted descending (ties: lower index first, as
   torch.topk), then softmax over the k */
void cpu_route(const float *logits, int E, int k, int32_t *sel, float *w);
/* the MoE block of layer l on a->xn2: routes, runs the experts and writes
   xout = a->xmid + their weighted sum */
void cpu_moe(const cpu_pass *p, cpu_acts *a, int l, float *xout);
/* dxn2 (zeroed by the caller) += d loss / d xn2 from dy = d loss / d xout
   through the experts and the router's softmax */
void cpu_moe_backward(const cpu_pass *p, const cpu_acts *a, cpu_grads *g, int l, const float *dy, float *dxn2);

/* y[t] += scale * B (A x[t]) for each token's module at projection mod of layer l */
void cpu_lora(const cpu_pass *p, cpu_acts *a, int l, gptoss_lora_module mod, float *y, int ys, const float *x, int xs);
/* the module's gradients from its input x and output gradient dy; dx += the LoRA path's share */
void cpu_lora_backward(const cpu_pass *p, cpu_acts *a, int l, gptoss_lora_module mod,
                       const float *x, int xs, const float *dy, int ys, float *dx);
/* expert e's share of an expert LoRA: y += scale * B_e (A_e x); h: r floats of scratch */
void cpu_lora_expert(const gptoss_lora *x, int e, const float *in, float *y, float *h);
/* its gradients: gB_e += s dy h^T, gA_e += dh x^T, din += A_e^T dh; h: 2r floats of scratch */
void cpu_lora_expert_backward(const gptoss_lora *x, float *gA, float *gB, int e, const float *in, const float *dy,
                              float *din, float *h);

/* clamped SwiGLU over interleaved gate/up: out[j] from h[2j] (gate), h[2j+1] (up) */
void cpu_swiglu(float *out, const float *h, int n, float limit);
/* dh[2j], dh[2j+1] from dout[j] and the forward's input h */
void cpu_swiglu_backward(float *dh, const float *h, const float *dout, int n, float limit);
/* cross-entropy of logits z[V] against target y: returns the loss (nats)
   and turns z into its gradient, softmax(z) - onehot(y) */
double cpu_cross_entropy(float *z, int V, int y);
/* token t's LoRA input at projection mod of layer l: x, or x with dropout
   (training; kept features scaled by 1/(1-p), the mask into a->drop_keep) */
const float *cpu_dropout(const cpu_pass *p, cpu_acts *a, int l, int mod, int t, const float *x, int n);
/* }====================================================== */

/* LoRA training: loss of one sequence and the gradients of the adapter's
   weights (train.c, the backend's lora_backward) */
gptoss_status cpu_lora_train(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                             const int32_t *seg0,
                             double *loss, int *count);

#endif
