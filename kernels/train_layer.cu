// train_layer.cu: LoRA training's passes through one layer (the forward,
// which the backward runs again as its recompute, and the backward) and the
// loss head, from the ops of norm.cu, attention.cu, flash_attention.cu,
// moe_rows.cu, mxfp4_gemm.cu, pointwise.cu and train_experts.cu, with the
// frozen dense weights in cuBLAS products.
#include "train.cuh"

// {====================================================== products
// Row-major C[M][N] = alpha op(A) op(B) + beta C, `batch` times with strides
// (cuBLAS is column-major: it computes C^T = op(B)^T op(A)^T).
static gptoss_status gemm(trainer *t, bool ta, bool tb, int M, int N, int K, float alpha, const void *A, cudaDataType at,
                          int lda, long long sa, const void *B, cudaDataType bt, int ldb, long long sb, float beta, float *C,
                          int ldc, long long sc, int batch, cublasComputeType_t ct) {
  if (M <= 0 || N <= 0) return GPTOSS_OK;
  BLAS(cublasGemmStridedBatchedEx(t->v->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha,
                                  B, bt, ldb, sb, A, at, lda, sa, &beta, C, CUDA_R_32F, ldc, sc, batch, ct, CUBLAS_GEMM_DEFAULT));
  return GPTOSS_OK;
}

// fp32 operands: LoRA in fp32 always; attention's scores per precision
static gptoss_status fgemm(trainer *t, bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
                           const float *B, int ldb, float beta, float *C, int ldc) {
  return gemm(t, ta, tb, M, N, K, alpha, A, CUDA_R_32F, lda, 0, B, CUDA_R_32F, ldb, 0, beta, C, ldc, 0, 1, CUBLAS_COMPUTE_32F);
}

// the score products in fp32 where the operands would be split, else in
// cuBLAS's bf16 mode
static cublasComputeType_t score_compute(const trainer *t, operand_rounding r) {
  return lo_of(t, r) ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_16BF;
}

// Y[M][*] (row stride ldy) = X W^T (fwd: W [N][K]) or X W (!fwd: W [K][N]) + beta Y,
// X already split into hi (+ lo) bf16 rows of K
static gptoss_status wgemm_split(trainer *t, const bf16 *hi, const bf16 *lo, int M, const bf16 *W, int wrows, int wcols, bool fwd,
                                 float *Y, int ldy, float beta) {
  if (M <= 0) return GPTOSS_OK;
  int K = fwd ? wcols : wrows, N = fwd ? wrows : wcols;
  TRY(gemm(t, false, fwd, M, N, K, 1.f, hi, CUDA_R_16BF, K, 0, W, CUDA_R_16BF, wcols, 0, beta, Y, ldy, 0, 1, CUBLAS_COMPUTE_32F));
  if (lo) TRY(gemm(t, false, fwd, M, N, K, 1.f, lo, CUDA_R_16BF, K, 0, W, CUDA_R_16BF, wcols, 0, 1.f, Y, ldy, 0, 1, CUBLAS_COMPUTE_32F));
  return GPTOSS_OK;
}

// X fp32 [M][K] (row stride ldx) into t->hi (+ t->lo where r splits) from
// element at, rows of K
static void split_at(trainer *t, operand_rounding r, const float *X, int M, int ldx, int K, size_t at) {
  bf16 *lo = lo_of(t, r);
  if (M > 0 && K > 0) launch_split(X, M, ldx, K, t->hi + at, lo ? lo + at : NULL, t->v->stream);
}

static void split(trainer *t, operand_rounding r, const float *X, int M, int ldx, int K) { split_at(t, r, X, M, ldx, K, 0); }

// as wgemm_split, X fp32 rounded as r
static gptoss_status wgemm(trainer *t, operand_rounding r, const float *X, int M, int ldx, const bf16 *W, int wrows, int wcols,
                           bool fwd, float *Y, int ldy, float beta) {
  if (M <= 0) return GPTOSS_OK;
  split(t, r, X, M, ldx, fwd ? wcols : wrows);
  return wgemm_split(t, t->hi, lo_of(t, r), M, W, wrows, wcols, fwd, Y, ldy, beta);
}

// The router's logits from split-bf16 inputs in either precision: a top-k
// that bf16 rounding tips over sends a token to other experts altogether,
// which costs far more than the product (T x E, E = 32)
static gptoss_status router_logits(trainer *t, const dlayer *w) {
  const dims &d = t->v->d;
  int T = t->T;
  bf16 *lo = t->lo ? t->lo : t->router_lo;   // one of the two is carved, by precision
  launch_split(t->xn2, T, d.H, d.H, t->hi, lo, t->v->stream);
  return wgemm_split(t, t->hi, lo, T, w->router_w, d.E, d.H, true, t->rl, d.E, 0.f);
}

// Y's rows of every expert = its rows of the input already split into
// t->hi (+ t->lo where r splits) times its MXFP4 matrix (fwd: X W^T + bias,
// W [rows][cols]; else X W), in one grouped launch that decodes the weights
// as it goes
static gptoss_status expert_products(trainer *t, operand_rounding r, const uint8_t *blocks, const uint8_t *scales, int rows,
                                     int cols, bool fwd, const bf16 *bias, float *Y, int ldy) {
  const dims &d = t->v->d;
  CU(launch_mxfp4_gemm(t->hi, lo_of(t, r), &t->mw, t->T * d.K, d.E, blocks, scales, rows, cols, !fwd, fwd ? bias : NULL, Y, ldy,
                       t->v->stream));
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== LoRA
// The input of module m of layer l: x, or x with dropout (into t->xdrop).
// Dropout covers the attention projections, as in csrc/cpu/train.c.
static const float *lora_x(trainer *t, int l, int m, const float *x, int ldx, int in, int *ld) {
  *ld = ldx;
  if (t->drop <= 0) return x;
  size_t n = (size_t)t->T * in;
  drop_args d = {t->drop_key, l, m, t->drop};
  launch_dropout(x, ldx, t->xdrop, in, in, n, d, 0, t->v->stream);
  *ld = in;
  return t->xdrop;
}

// y += s B (A x) over T rows (attention modules)
static gptoss_status lora_fwd(trainer *t, int l, int m, const float *x, int ldx, float *y, int ldy) {
  dlora *L = &t->mod[l][m];
  if (!L->host) return GPTOSS_OK;
  int ld;
  const float *xi = lora_x(t, l, m, x, ldx, L->in, &ld);
  TRY(fgemm(t, false, true, t->T, L->r, L->in, 1.f, xi, ld, L->A, L->in, 0.f, t->lora_h, L->r));
  return fgemm(t, false, true, t->T, L->out, L->r, L->scale, t->lora_h, L->r, L->B, L->r, 1.f, y, ldy);
}

// gB += s dy^T h, dh = s dy B, gA += dh^T x, with h = A x (n rows; A, B, gA, gB one expert's or the module's)
static gptoss_status lora_grads(trainer *t, int n, int r, int in, int out, float s, const float *A, const float *B, float *gA,
                                float *gB, const float *x, int ldx, const float *dy, int ldy) {
  TRY(fgemm(t, false, true, n, r, in, 1.f, x, ldx, A, in, 0.f, t->lora_h, r));
  TRY(fgemm(t, true, false, out, r, n, s, dy, ldy, t->lora_h, r, 1.f, gB, r));
  TRY(fgemm(t, false, false, n, r, out, s, dy, ldy, B, r, 0.f, t->lora_dh, r));
  return fgemm(t, true, false, r, in, n, 1.f, t->lora_dh, r, x, ldx, 1.f, gA, in);
}

// an attention module's gradients, and its share of dx (through the dropout)
static gptoss_status lora_bwd(trainer *t, int l, int m, const float *x, int ldx, const float *dy, int ldy, float *dx, int lddx) {
  dlora *L = &t->mod[l][m];
  if (!L->host) return GPTOSS_OK;
  int ld;
  const float *xi = lora_x(t, l, m, x, ldx, L->in, &ld);
  TRY(lora_grads(t, t->T, L->r, L->in, L->out, L->scale, L->A, L->B, L->gA, L->gB, xi, ld, dy, ldy));
  if (t->drop <= 0) return fgemm(t, false, false, t->T, L->in, L->r, 1.f, t->lora_dh, L->r, L->A, L->in, 1.f, dx, lddx);
  TRY(fgemm(t, false, false, t->T, L->in, L->r, 1.f, t->lora_dh, L->r, L->A, L->in, 0.f, t->tmp, L->in));
  size_t n = (size_t)t->T * L->in;
  drop_args d = {t->drop_key, l, m, t->drop};
  launch_dropout(t->tmp, L->in, dx, lddx, L->in, n, d, 1, t->v->stream);
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== attention
static att_rows rows_of(trainer *t, int l, int h0) {
  const dims &d = t->v->d;
  att_rows a = {t->T, d.Hq, h0, t->v->layer_sliding[l] ? d.window : 0, t->v->layer[l].sinks, t->lse,
                t->packed ? t->seg0 : NULL};
  return a;
}

// Up to t->score_heads query heads that share key/value head g, from head h0
struct head_batch {
  int h0, nb;
  const float *q, *k, *v;    // in qkv: the first head's queries; the shared keys and values
};

static head_batch batch_of(const trainer *t, int g, int i0) {
  const dims &d = t->v->d;
  int G = d.Hq / d.Hkv;
  head_batch b;
  b.nb = G - i0 < t->score_heads ? G - i0 : t->score_heads;
  b.h0 = g * G + i0;
  b.q = t->qkv + (size_t)b.h0 * d.D;
  b.k = t->qkv + d.Q + (size_t)g * d.D;
  b.v = b.k + d.KV;
  return b;
}

// S[i] = q_i k^T / sqrt(D) for the batch's heads (the key/value head broadcast)
static gptoss_status scores(trainer *t, operand_rounding r, const head_batch &b) {
  const dims &d = t->v->d;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  return gemm(t, false, true, T, T, d.D, 1.f / sqrtf((float)d.D), b.q, CUDA_R_32F, ldq, d.D, b.k, CUDA_R_32F, ldq, 0, 0.f, t->S,
              T, (long long)T * T, b.nb, score_compute(t, r));
}

// flash_attention.cu's operands: qkv split at t->hi (+ t->lo where r
// splits), and for the backward datt after it; the parts of dk and dv in
// t->xdrop and t->tmp, free between the o projection's LoRA backward and the
// q, k, v ones
static flash_args flash_of(trainer *t, operand_rounding r, int l, bool bwd) {
  const dims &d = t->v->d;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  size_t at = (size_t)T * ldq;
  bf16 *lo = lo_of(t, r);
  split_at(t, r, t->qkv, T, ldq, ldq, 0);
  if (bwd) split_at(t, r, t->datt, T, d.Q, d.Q, at);
  flash_args a = {};
  a.qkv_hi = t->hi; a.qkv_lo = lo;
  a.dout_hi = t->hi + at; a.dout_lo = lo ? lo + at : NULL; a.dout = t->datt;
  a.sinks = t->v->layer[l].sinks;
  a.T = T; a.ldq = ldq; a.Q = d.Q; a.KV = d.KV; a.Hq = d.Hq; a.Hkv = d.Hkv; a.D = d.D;
  a.window = t->v->layer_sliding[l] ? d.window : 0;
  a.scale = 1.f / sqrtf((float)d.D);
  a.att = t->att; a.lse = t->lse; a.dd = t->dd; a.dqkv = t->dqkv; a.dk_part = t->xdrop; a.dv_part = t->tmp;
  a.seg0 = t->packed ? t->seg0 : NULL;
  return a;
}

// att = softmax(q k^T / sqrt(D), sink) v
static gptoss_status attention_fwd(trainer *t, operand_rounding r, int l) {
  const dims &d = t->v->d;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  if (flash_supported(d.D)) {
    flash_args a = flash_of(t, r, l, false);
    CU(launch_flash_fwd(&a, t->v->stream));
    return GPTOSS_OK;
  }
  for (int g = 0; g < d.Hkv; g++)
    for (int i0 = 0; i0 < d.Hq / d.Hkv; i0 += t->score_heads) {
      head_batch b = batch_of(t, g, i0);
      TRY(scores(t, r, b));
      att_rows a = rows_of(t, l, b.h0);
      launch_softmax_rows(t->S, &a, b.nb, t->v->stream);
      TRY(gemm(t, false, false, T, d.D, T, 1.f, t->S, CUDA_R_32F, T, (long long)T * T, b.v, CUDA_R_32F, ldq, 0, 0.f,
               t->att + (size_t)b.h0 * d.D, d.Q, d.D, b.nb, score_compute(t, r)));
    }
  return GPTOSS_OK;
}

// datt (rows of Q) into dqkv's q, k and v columns
static gptoss_status attention_bwd(trainer *t, operand_rounding r, int l) {
  const dims &d = t->v->d;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  float scale = 1.f / sqrtf((float)d.D);
  long long tt = (long long)T * T;
  cublasComputeType_t ct = score_compute(t, r);
  if (flash_supported(d.D)) {
    flash_args a = flash_of(t, r, l, true);
    CU(launch_flash_bwd(&a, t->v->stream));
    return GPTOSS_OK;
  }
  CU(cudaMemsetAsync(t->dqkv, 0, sizeof(float) * T * ldq, t->v->stream));   // dk, dv accumulate over the heads
  for (int g = 0; g < d.Hkv; g++)
    for (int i0 = 0; i0 < d.Hq / d.Hkv; i0 += t->score_heads) {
      head_batch b = batch_of(t, g, i0);
      int h0 = b.h0, nb = b.nb;
      const float *q = b.q, *k = b.k, *v = b.v, *dout = t->datt + (size_t)h0 * d.D;
      float *dq = t->dqkv + (size_t)h0 * d.D, *dk = t->dqkv + d.Q + (size_t)g * d.D, *dv = dk + d.KV;
      att_rows a = rows_of(t, l, h0);
      TRY(scores(t, r, b));
      launch_probs_rows(t->S, &a, nb, t->v->stream);
      TRY(gemm(t, false, true, T, T, d.D, 1.f, dout, CUDA_R_32F, d.Q, d.D, v, CUDA_R_32F, ldq, 0, 0.f, t->dP, T, tt, nb, ct));
      launch_dsoftmax_rows(t->S, t->dP, t->datt, t->att, d.Q, d.D, scale, &a, nb, t->v->stream);
      TRY(gemm(t, false, false, T, d.D, T, 1.f, t->dP, CUDA_R_32F, T, tt, k, CUDA_R_32F, ldq, 0, 0.f, dq, ldq, d.D, nb, ct));
      for (int i = 0; i < nb; i++) {
        TRY(gemm(t, true, false, T, d.D, T, 1.f, t->dP + i * tt, CUDA_R_32F, T, 0, q + (size_t)i * d.D, CUDA_R_32F, ldq, 0, 1.f,
                 dk, ldq, 0, 1, ct));
        TRY(gemm(t, true, false, T, d.D, T, 1.f, t->S + i * tt, CUDA_R_32F, T, 0, dout + (size_t)i * d.D, CUDA_R_32F, d.Q, 0, 1.f,
                 dv, ldq, 0, 1, ct));
      }
    }
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== layers
// the experts' rows: sort (token, expert) pairs by expert, offsets to the host
static gptoss_status moe_route(trainer *t) {
  const dims &d = t->v->d;
  cudaStream_t st = t->v->stream;
  int T = t->T, TK = T * d.K;
  launch_moe_sort(t->sel, T, d.E, d.K, 0, d.E, &t->mw, st);
  launch_invperm(t->mw.perm, t->invp, TK, st);
  launch_gather_rows(t->xn2, t->mw.perm, TK, d.K, d.H, t->xg, st);
  // for the host's grouped cuBLAS calls (ranks over 64) alone, which wait
  // for it: everything else reads the offsets on the device, so the host
  // queues the layers without waiting for the GPU
  CU(cudaMemcpyAsync(t->off_host, t->mw.offsets, sizeof(int32_t) * (d.E + 1), cudaMemcpyDeviceToHost, st));
  CU(cudaEventRecord(t->ev_off, st));
  return GPTOSS_OK;
}

// The experts' chunk of the sequence, moe_chunk's (t->T tokens from its
// first), through both products: sorted by expert, gate_up, SwiGLU, down,
// combined into xout (= xmid + the experts' weighted sum) at the chunk's
// rows. xout NULL: the backward's recompute, which stops at what the
// backward reads (gu, act, and the LoRAs' A x of both products).
static gptoss_status experts_chunk(trainer *t, int l, operand_rounding r, float *xout, const float *xmid) {
  const dims &d = t->v->d;
  const dlayer *w = &t->v->layer[l];
  cudaStream_t st = t->v->stream;
  int T = t->T, TK = T * d.K;
  dlora *lgu = &t->mod[l][GPTOSS_LORA_GU], *ldn = &t->mod[l][GPTOSS_LORA_DN];
  TRY(moe_route(t));
  // the experts' inputs split once for all their rows (mxfp4_gemm.cu
  // decodes the weights as it goes)
  cuda_prof_mark("train moe lora and misc", st);
  split(t, r, t->xg, TK, d.H, d.H);
  TRY(expert_products(t, r, w->gu_blocks, w->gu_scales, 2 * d.I, d.H, true, w->gu_bias, t->gu, 2 * d.I));
  cuda_prof_mark("train experts mxfp4", st);
  TRY(lora_experts_fwd(t, lgu, t->xg, d.H, t->gu, 2 * d.I, t->expert_ax[0]));
  cuda_prof_mark("train gate_up fwd", st);
  launch_swiglu(t->gu, t->act, (size_t)TK * d.I, d.limit, st);
  cuda_prof_mark("train moe lora and misc", st);
  if (!xout) {   // the backward needs only A act of the down product (launch_route_bwd)
    TRY(lora_experts_ax(t, ldn, t->act, d.I, t->expert_ax[1]));
    cuda_prof_mark("train down fwd", st);
    CU(cudaGetLastError());
    return GPTOSS_OK;
  }
  split(t, r, t->act, TK, d.I, d.I);
  TRY(expert_products(t, r, w->dn_blocks, w->dn_scales, d.H, d.I, true, w->dn_bias, t->ye, d.H));
  cuda_prof_mark("train experts mxfp4", st);
  TRY(lora_experts_fwd(t, ldn, t->act, d.I, t->ye, d.H, t->expert_ax[1]));
  cuda_prof_mark("train down fwd", st);
  launch_combine_rows(xout, xmid, t->ye, t->w, t->invp, T, d.H, d.K, st);
  cuda_prof_mark("train moe fwd", st);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

// The training forward's layer, from x to xout (NULL: the backward's
// recompute, which needs only the intermediates), keeping the activations
// the backward reads. Its products to the router are rounded as
// t->prec.routing, the experts' as `rounding_experts` (the forward's:
// routing; the recompute's feed only the backward, and take its
// precision); cudaGetLastError catches bad launch configurations.
struct train_layer_ops : layer_ops {
  trainer *t;
  const dims &d;
  cudaStream_t st;
  const float *x;
  float *xout;
  operand_rounding rounding_experts;

  train_layer_ops(trainer *tr, const float *in, float *out, operand_rounding experts_rounding)
      : t(tr), d(tr->v->d), st(tr->v->stream), x(in), xout(out), rounding_experts(experts_rounding) {}

  gptoss_status attn_in(int l) override {
    const dlayer *w = &t->v->layer[l];
    int T = t->T, ldq = d.Q + 2 * d.KV;
    launch_rmsnorm_f32(x, NULL, T, w->attn_norm, t->xn1, t->inv1, d.H, d.eps, st);
    TRY(wgemm(t, t->prec.routing, t->xn1, T, d.H, w->qkv_w, ldq, d.H, true, t->qkv, ldq, 0.f));
    launch_add_bias(t->qkv, ldq, w->qkv_b, T, ldq, st);
    TRY(lora_fwd(t, l, GPTOSS_LORA_Q, t->xn1, d.H, t->qkv, ldq));
    TRY(lora_fwd(t, l, GPTOSS_LORA_K, t->xn1, d.H, t->qkv + d.Q, ldq));
    TRY(lora_fwd(t, l, GPTOSS_LORA_V, t->xn1, d.H, t->qkv + d.Q + d.KV, ldq));
    launch_rope_rows(t->qkv, ldq, T, d.Hq, d.D, t->v->inv_freq, d.rope_scale, 1.f, t->packed ? t->pos : NULL, st);
    launch_rope_rows(t->qkv + d.Q, ldq, T, d.Hkv, d.D, t->v->inv_freq, d.rope_scale, 1.f, t->packed ? t->pos : NULL, st);
    cuda_prof_mark("train qkv fwd", st);
    return GPTOSS_OK;
  }

  gptoss_status attention(int l) override {
    TRY(attention_fwd(t, t->prec.routing, l));
    cuda_prof_mark("train attention fwd", st);
    return GPTOSS_OK;
  }

  gptoss_status attn_out(int l) override {
    const dlayer *w = &t->v->layer[l];
    int T = t->T;
    CU(cudaMemcpyAsync(t->xmid, x, sizeof(float) * T * d.H, cudaMemcpyDeviceToDevice, st));
    TRY(wgemm(t, t->prec.routing, t->att, T, d.Q, w->o_w, d.H, d.Q, true, t->xmid, d.H, 1.f));
    launch_add_bias(t->xmid, d.H, w->o_b, T, d.H, st);
    TRY(lora_fwd(t, l, GPTOSS_LORA_O, t->att, d.Q, t->xmid, d.H));
    cuda_prof_mark("train o fwd", st);
    return GPTOSS_OK;
  }

  gptoss_status route(int l) override {
    const dlayer *w = &t->v->layer[l];
    int T = t->T;
    launch_rmsnorm_f32(t->xmid, NULL, T, w->mlp_norm, t->xn2, t->inv2, d.H, d.eps, st);
    TRY(router_logits(t, w));
    launch_add_bias(t->rl, d.E, w->router_b, T, d.E, st);
    launch_topk(t->rl, T, d.E, d.K, t->sel, t->w, st);
    cuda_prof_mark("train router fwd", st);
    return GPTOSS_OK;
  }

  // the forward's experts, chunk by chunk into xout; the recompute's wait
  // for layer_bwd, which runs them a chunk at a time beside their backward
  gptoss_status experts(int l) override {
    if (!xout) return GPTOSS_OK;
    for (int c0 = 0; c0 < t->T; c0 += t->moe_tokens) {
      moe_chunk c(t, c0);
      TRY(experts_chunk(t, l, rounding_experts, xout + (size_t)c0 * d.H, t->xmid + (size_t)c0 * d.H));
    }
    return GPTOSS_OK;
  }
};

gptoss_status layer_fwd(trainer *t, int l, const float *x, float *xout, operand_rounding experts) {
  train_layer_ops ops(t, x, xout, experts);
  return layer_sequence(ops, l);
}

// The experts' backward over moe_chunk's tokens, after experts_chunk's
// recompute: dy (d loss / d the layer's output at the chunk's rows) back
// through the down product, SwiGLU, the router's weights and gate_up into
// dxn (d loss / d the MLP norm's output at those rows), the expert LoRAs'
// gradients added. ye takes dy's rows (unweighted), then ud = W_e^T dy (+
// the LoRA's) over them (launch_route_bwd); gu becomes d gu, xg d xg.
static gptoss_status experts_bwd(trainer *t, int l, operand_rounding r, const float *dy, float *dxn) {
  const dims &d = t->v->d;
  const dlayer *w = &t->v->layer[l];
  cudaStream_t st = t->v->stream;
  int T = t->T, TK = T * d.K;
  dlora *lgu = &t->mod[l][GPTOSS_LORA_GU], *ldn = &t->mod[l][GPTOSS_LORA_DN];
  launch_gather_rows(dy, t->mw.perm, TK, d.K, d.H, t->ye, st);
  if (ldn->host) {   // gB += s (w_k dy)^T A act, with A act weighted in place
    TRY(lora_experts_dh(t, ldn, t->ye, d.H));
    launch_scale_rows(t->expert_ax[1], ldn->r, t->w, t->mw.perm, (size_t)TK * ldn->r, st);
    TRY(lora_experts_gB(t, ldn, t->ye, d.H, t->expert_ax[1]));
  }
  cuda_prof_mark("train moe lora and misc", st);
  split(t, r, t->ye, TK, d.H, d.H);
  TRY(expert_products(t, r, w->dn_blocks, w->dn_scales, d.H, d.I, false, NULL, t->ye, d.I));
  cuda_prof_mark("train experts mxfp4", st);
  TRY(lora_experts_dx(t, ldn, t->ye, d.I));
  launch_route_bwd(dy, t->ye, t->act, w->dn_bias, t->w, t->sel, t->invp, w->router_w, dxn, T, d.H, d.I, d.K, st);
  cuda_prof_mark("train router bwd", st);
  if (ldn->host) {   // gA += (w_k s dy B_e)^T act
    launch_scale_rows(t->lora_dh, ldn->r, t->w, t->mw.perm, (size_t)TK * ldn->r, st);
    TRY(lora_experts_gA(t, ldn, t->act, d.I));
  }
  cuda_prof_mark("train down bwd", st);
  launch_swiglu_bwd(t->gu, t->ye, t->w, t->mw.perm, d.I, (size_t)TK * d.I, d.limit, st);
  TRY(lora_experts_grads(t, lgu, t->xg, d.H, t->expert_ax[0], t->gu, 2 * d.I));
  cuda_prof_mark("train moe lora and misc", st);
  split(t, r, t->gu, TK, 2 * d.I, 2 * d.I);
  TRY(expert_products(t, r, w->gu_blocks, w->gu_scales, 2 * d.I, d.H, false, NULL, t->xg, d.H));
  cuda_prof_mark("train experts mxfp4", st);
  TRY(lora_experts_dx(t, lgu, t->xg, d.H));
  launch_scatter_rows(dxn, t->xg, t->invp, T, d.H, d.K, st);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

// dx (in: d loss / d x_out; out: d loss / d x) through layer l, whose
// intermediates layer_fwd has just left for input x; the products rounded
// as t->prec.past_routing, the attention backward as t->prec.routing
gptoss_status layer_bwd(trainer *t, int l, const float *x) {
  const dims &d = t->v->d;
  const dlayer *w = &t->v->layer[l];
  cudaStream_t st = t->v->stream;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  operand_rounding r = t->prec.past_routing;
  for (int c0 = 0; c0 < T; c0 += t->moe_tokens) {
    moe_chunk c(t, c0);
    TRY(experts_chunk(t, l, r, NULL, NULL));
    TRY(experts_bwd(t, l, r, t->dx + (size_t)c0 * d.H, t->dxn + (size_t)c0 * d.H));
  }
  launch_rmsnorm_bwd(t->dx, t->xmid, NULL, T, t->inv2, w->mlp_norm, t->dxn, d.H, st);
  cuda_prof_mark("train gate_up bwd", st);
  // attention: dx is now d x_mid, the o projection's output gradient
  TRY(wgemm(t, r, t->dx, T, d.H, w->o_w, d.H, d.Q, false, t->datt, d.Q, 0.f));
  TRY(lora_bwd(t, l, GPTOSS_LORA_O, t->att, d.Q, t->dx, d.H, t->datt, d.Q));
  cuda_prof_mark("train o bwd", st);
  // the attention backward in split bf16 wherever the forward is: in
  // "mixed", its bf16 rounding had moved the attention LoRAs' gradients
  // most (1.5e-2 from PEFT's against 4e-3 with it split)
  TRY(attention_bwd(t, t->prec.routing, l));
  cuda_prof_mark("train attention bwd", st);
  // RoPE is a scaled rotation: its transpose rotates back
  launch_rope_rows(t->dqkv, ldq, T, d.Hq, d.D, t->v->inv_freq, d.rope_scale, -1.f, t->packed ? t->pos : NULL, st);
  launch_rope_rows(t->dqkv + d.Q, ldq, T, d.Hkv, d.D, t->v->inv_freq, d.rope_scale, -1.f, t->packed ? t->pos : NULL, st);
  TRY(wgemm(t, r, t->dqkv, T, ldq, w->qkv_w, ldq, d.H, false, t->dxn, d.H, 0.f));
  TRY(lora_bwd(t, l, GPTOSS_LORA_Q, t->xn1, d.H, t->dqkv, ldq, t->dxn, d.H));
  TRY(lora_bwd(t, l, GPTOSS_LORA_K, t->xn1, d.H, t->dqkv + d.Q, ldq, t->dxn, d.H));
  TRY(lora_bwd(t, l, GPTOSS_LORA_V, t->xn1, d.H, t->dqkv + d.Q + d.KV, ldq, t->dxn, d.H));
  launch_rmsnorm_bwd(t->dx, x, NULL, T, t->inv1, w->attn_norm, t->dxn, d.H, st);
  cuda_prof_mark("train qkv bwd", st);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== loss head
// The loss head: position rows[i] predicts targets[i]; chunks of logit_rows
// rows of logits (in t->gu, free between the layers' passes), their
// gradients back through lm_head and the final norm into dx. Past every
// router: its products take the backward's rounding.
gptoss_status loss_head(trainer *t, int nr) {
  const dims &d = t->v->d;
  cudaStream_t st = t->v->stream;
  const float *xl = t->xs + (size_t)d.L * t->T * d.H;
  operand_rounding r = t->prec.past_routing;
  launch_rmsnorm_f32(xl, t->rows, nr, t->v->norm, t->xf, t->inv1, d.H, d.eps, st);
  for (int r0 = 0; r0 < nr; r0 += t->logit_rows) {
    int n = nr - r0 < t->logit_rows ? nr - r0 : t->logit_rows;
    float *xf = t->xf + (size_t)r0 * d.H;
    TRY(wgemm(t, r, xf, n, d.H, t->v->lm_head, d.V, d.H, true, t->gu, d.V, 0.f));
    launch_xent(t->gu, n, d.V, t->targets + r0, t->lossrow + r0, st);
    TRY(wgemm(t, r, t->gu, n, d.V, t->v->lm_head, d.V, d.H, false, xf, d.H, 0.f));   // xf becomes d xf
  }
  launch_rmsnorm_bwd(t->dx, xl, t->rows, nr, t->inv1, t->v->norm, t->xf, d.H, st);
  cuda_prof_mark("train loss head", st);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}
// }======================================================
