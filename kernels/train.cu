// train.cu: the CUDA backward pass for LoRA training: the trainer's state
// and the entry (train.cuh says which file holds the rest).
//
// The computation of csrc/cpu/train.c, its reference (and PEFT's): one
// sequence, each layer's input kept (activation checkpointing per layer),
// each layer recomputed and walked back. Activations and gradients are fp32.
// The frozen weights enter the tensor cores as bf16 (cuBLAS; the MXFP4
// experts decoded inside mxfp4_gemm.cu's grouped kernel, which is exact),
// against activations rounded to bf16 or split into two bf16 terms, as the
// model's precision says (train_precision in train.cuh). Attention
// (flash_attention.cu) takes the same operands in tiles that never hold the
// scores.
// LoRA weights, their products and their gradients stay fp32: they are the
// master weights, which the host's AdamW updates.
//
// Head sizes flash_attention.cu has no tiles for materialise the scores of
// a few heads at a time instead (sharing one key/value head, so the batched
// cuBLAS products broadcast it), in fp32 ("exact") or cuBLAS's bf16 mode.
// The experts' rows, sorted by launch_moe_sort, run through one grouped
// product per matrix.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "train.cuh"

// {====================================================== state
static void release_buffers(trainer *t) {
  if (t->buf) cudaFree(t->buf);
  free(t->grouped_dims);
  t->grouped_dims = NULL;
  if (t->off_host) cudaFreeHost(t->off_host);
  t->buf = NULL; t->off_host = NULL; t->cap = 0; t->buf_bytes = 0;
}

void cuda_train_release(void *state, size_t *bytes) {
  trainer *t = (trainer *)state;
  if (!t) return;
  if (t->cs) cudaStreamSynchronize(t->cs);   // the caller's stream is idle between calls
  *bytes -= t->buf_bytes + t->lbytes;
  release_buffers(t);
  adapter_copy_release(t);
}

void cuda_train_free(void *state) {
  trainer *t = (trainer *)state;
  if (!t) return;
  if (t->cs) cudaStreamSynchronize(t->cs);
  release_buffers(t);
  adapter_copy_free(t);
  if (t->pool) gptoss_pool_free(t->pool);
  free(t);
}

// carves the buffers for T tokens out of one allocation (size only when base is NULL)
static size_t carve(trainer *t, const dims &d, int T, int rmax, char *base) {
  // T K: every token's (expert, weight) pairs; CK: the sorted rows of one
  // chunk of the experts (moe_chunk)
  size_t off = 0, TK = (size_t)T * d.K, ldq = (size_t)d.Q + 2 * d.KV, HQ = (size_t)(d.H > d.Q ? d.H : d.Q);
  size_t CK = (size_t)(T < t->moe_tokens ? T : t->moe_tokens) * d.K;
  size_t gu_n = CK * 2 * d.I > (size_t)d.V ? CK * 2 * d.I : (size_t)d.V;   // the logits of a chunk live there too
#define CARVE_PART(p, type, n) do { if (base) p = (type *)(base + off); off += ALIGN256(sizeof(type) * (size_t)(n)); } while (0)
  CARVE_PART(t->xs, float, (size_t)(d.L + 1) * T * d.H);
  CARVE_PART(t->xn1, float, (size_t)T * d.H); CARVE_PART(t->inv1, float, T); CARVE_PART(t->dd, float, (size_t)T * d.Hq);
  CARVE_PART(t->qkv, float, T * ldq); CARVE_PART(t->att, float, (size_t)T * d.Q); CARVE_PART(t->lse, float, (size_t)T * d.Hq);
  CARVE_PART(t->xmid, float, (size_t)T * d.H); CARVE_PART(t->xn2, float, (size_t)T * d.H); CARVE_PART(t->inv2, float, T);
  CARVE_PART(t->rl, float, (size_t)T * d.E); CARVE_PART(t->w, float, TK);
  CARVE_PART(t->xg, float, CK * d.H); CARVE_PART(t->gu, float, gu_n); CARVE_PART(t->act, float, CK * d.I);
  CARVE_PART(t->ye, float, CK * (d.H > d.I ? d.H : d.I));   // rows of H, then of I (experts_bwd)
  CARVE_PART(t->dx, float, (size_t)T * d.H); CARVE_PART(t->dxn, float, T * HQ); CARVE_PART(t->datt, float, (size_t)T * d.Q);
  CARVE_PART(t->dqkv, float, T * ldq);
  // head sizes flash_attention.cu has no tiles for: a batch of heads'
  // scores at a time, about 128 MB each for S and dP
  if (!flash_supported(d.D)) {
    int G = d.Hq / d.Hkv;
    size_t per_head = (size_t)T * T;
    t->score_heads = (int)((size_t)(32u << 20) / per_head);
    if (t->score_heads < 1) t->score_heads = 1;
    if (t->score_heads > G) t->score_heads = G;
    CARVE_PART(t->S, float, per_head * t->score_heads); CARVE_PART(t->dP, float, per_head * t->score_heads);
  }
  CARVE_PART(t->xdrop, float, T * HQ); CARVE_PART(t->tmp, float, T * HQ);
  {
    size_t rows = CK > (size_t)T ? CK : (size_t)T;   // a chunk's expert rows at once, or the attention LoRAs' T
    CARVE_PART(t->lora_h, float, rows * rmax); CARVE_PART(t->lora_dh, float, rows * rmax);
  }
  CARVE_PART(t->expert_ax[0], float, CK * rmax); CARVE_PART(t->expert_ax[1], float, CK * rmax);
  {
    int kc = rank_chunk(rank_rounded(rmax)), wide = 2 * d.I > d.H ? 2 * d.I : d.H;
    CARVE_PART(t->rank_parts, float, CK * rmax * (size_t)((wide + kc - 1) / kc));   // rank_down's partial sums
  }
  CARVE_PART(t->grouped_ptrs, const float *, 3 * (size_t)d.E);
  CARVE_PART(t->xf, float, (size_t)T * d.H); CARVE_PART(t->lossrow, float, T);
  CARVE_PART(t->ids, int32_t, T); CARVE_PART(t->rows, int32_t, T); CARVE_PART(t->targets, int32_t, T);
  CARVE_PART(t->seg0, int32_t, T); CARVE_PART(t->pos, int32_t, T);
  CARVE_PART(t->sel, int32_t, TK); CARVE_PART(t->invp, int32_t, CK);
  CARVE_PART(t->mw.counts, int32_t, d.E); CARVE_PART(t->mw.offsets, int32_t, d.E + 1); CARVE_PART(t->mw.tile_offsets, int32_t, d.E + 1);
  CARVE_PART(t->mw.cursor, int32_t, d.E); CARVE_PART(t->mw.perm, int32_t, CK);
  t->logit_rows = (int)(gu_n / d.V);
  if (t->logit_rows > T) t->logit_rows = T;
  size_t big = CK * (2 * d.I > d.H ? 2 * d.I : d.H);
  if ((size_t)t->logit_rows * d.V > big) big = (size_t)t->logit_rows * d.V;
  if (T * (ldq + d.Q) > big) big = T * (ldq + d.Q);   // qkv and datt, the attention backward's operands
  if (T * HQ > big) big = T * HQ;
  t->hi_n = big;
  CARVE_PART(t->hi, bf16, big);
  bool split = t->prec.routing == ROUND_SPLIT;   // "exact" and "mixed": past_routing splits only where this does
  if (split) CARVE_PART(t->lo, bf16, big); else if (base) t->lo = NULL;
  if (!split) CARVE_PART(t->router_lo, bf16, (size_t)T * d.H); else if (base) t->router_lo = NULL;
#undef CARVE_PART
  return off;
}

static gptoss_status ensure_buffers(trainer *t, int T, int rmax) {
  const dims &d = t->v->d;
  if (T <= t->cap && rmax <= t->cap_r && t->buf) return GPTOSS_OK;
  CU(cudaStreamSynchronize(t->v->stream));
  *t->v->bytes -= t->buf_bytes;
  release_buffers(t);
  size_t n = carve(t, d, T, rmax, NULL);
  CU(cudaMalloc(&t->buf, n));
  CU(cudaHostAlloc((void **)&t->off_host, sizeof(int32_t) * (d.E + 1), cudaHostAllocDefault));
  if (!(t->grouped_dims = (int *)malloc(sizeof(int) * 7 * d.E + sizeof(float) * 2 * d.E + sizeof(cublasOperation_t) * 2 * d.E)))
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  carve(t, d, T, rmax, t->buf);
  t->cap = T; t->cap_r = rmax; t->buf_bytes = n;
  *t->v->bytes += n;
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== entry
static gptoss_status run(trainer *t, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n, const int32_t *seg0,
                         double *loss, int *count) {
  const dims &d = t->v->d;
  cudaStream_t st = t->v->stream;
  int rmax;
  t->a = a;
  TRY(layout_adapter(t, a, d.L, &rmax));
  TRY(ensure_buffers(t, n, rmax));
  t->T = n;
  uint64_t seed;
  t->drop = (float)gptoss_adapter_dropout(a, &seed);
  t->drop_key = gptoss_mix64(seed ^ ((uint64_t)gptoss_adapter_steps(a) << 32));
  // rows with a target: position p predicts ids[p + 1] where mask[p + 1]
  int32_t *host = (int32_t *)malloc(sizeof(int32_t) * 3 * (size_t)n);
  if (!host) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  int nr = 0;
  for (int p = 0; p + 1 < n; p++)
    if (mask[p + 1]) { host[nr] = p; host[n + nr] = ids[p + 1]; nr++; }
  // packed examples: each row's position within its example (RoPE), and
  // its example's start (attention's first key)
  t->packed = seg0 != NULL;
  if (seg0) for (int p = 0; p < n; p++) host[2 * n + p] = p - seg0[p];
  cudaError_t e = cudaMemcpyAsync(t->ids, ids, sizeof(int32_t) * n, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess && seg0) e = cudaMemcpyAsync(t->seg0, seg0, sizeof(int32_t) * n, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess && seg0) e = cudaMemcpyAsync(t->pos, host + 2 * n, sizeof(int32_t) * n, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess && nr) e = cudaMemcpyAsync(t->rows, host, sizeof(int32_t) * nr, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess && nr) e = cudaMemcpyAsync(t->targets, host + n, sizeof(int32_t) * nr, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);
  free(host);
  if (e != cudaSuccess) return cuda_fail(e, "copying the sequence", __FILE__, __LINE__);
  *loss = 0;
  *count = nr;
  if (!nr) return GPTOSS_OK;   // nothing to learn from: the gradients stay as they are
  cuda_prof_mark("start", st);
  launch_embed(t->ids, n, t->v->embed, t->xs, d.H, st);
  for (int l = 0; l < d.L; l++) {
    TRY(upload_layer(t, l));
    cuda_prof_mark("train adapter upload", st);
    TRY(layer_fwd(t, l, t->xs + (size_t)l * n * d.H, t->xs + (size_t)(l + 1) * n * d.H, t->prec.routing));
  }
  t->version = gptoss_adapter_version(a);
  CU(cudaMemsetAsync(t->dx, 0, sizeof(float) * n * d.H, st));
  TRY(loss_head(t, nr));
  for (int l = d.L - 1; l >= 0; l--) {
    TRY(grads_begin(t, l));
    TRY(layer_fwd(t, l, t->xs + (size_t)l * n * d.H, NULL, t->prec.past_routing));
    TRY(layer_bwd(t, l, t->xs + (size_t)l * n * d.H));
    TRY(grads_end(t, l));
    cuda_prof_mark("train gradients down", st);
  }
  float *lr = (float *)malloc(sizeof(float) * nr);
  if (!lr) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  e = cudaMemcpyAsync(lr, t->lossrow, sizeof(float) * nr, cudaMemcpyDeviceToHost, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);
  double total = 0;
  for (int i = 0; i < nr; i++) total += lr[i];
  free(lr);
  if (e != cudaSuccess) return cuda_fail(e, "the backward pass", __FILE__, __LINE__);
  if ((e = adder_wait(t)) != cudaSuccess) return cuda_fail(e, "copying the gradients to the host", __FILE__, __LINE__);
  cuda_prof_mark("train gradients down", st);
  cuda_prof_flush();
  *loss = total;
  return GPTOSS_OK;
}

gptoss_status cuda_lora_backward(const train_view *v, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                 const int32_t *seg0, double *loss, int *count) {
  trainer *t = (trainer *)*v->state;
  if (!t) {
    if (!(t = (trainer *)calloc(1, sizeof *t))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    // at most 8 threads: AdamW's update (adapter.c) runs on all cores but
    // two while the forward uploads, and more spinning workers on the same
    // cores starve the thread that drives the GPU
    if (!(t->pool = gptoss_pool_new(v->threads > 8 ? 8 : v->threads < 1 ? 1 : v->threads))) {
      free(t);
      return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the trainer's threads");
    }
    // the experts' chunk (moe_chunk): 4,096 tokens hold 16k sorted rows,
    // about 1.4 GB of expert buffers on the 20B, and sequences up to that
    // long run as one chunk; GPTOSS_TRAIN_MOE_TOKENS sets it (specs make it small)
    const char *mt = getenv("GPTOSS_TRAIN_MOE_TOKENS");
    t->moe_tokens = mt && atoi(mt) > 0 ? atoi(mt) : 4096;
    *v->state = t;
  }
  t->v = v;
  t->prec.routing = v->precision == GPTOSS_PRECISION_FAST ? ROUND_BF16 : ROUND_SPLIT;
  t->prec.past_routing = v->precision == GPTOSS_PRECISION_EXACT ? ROUND_SPLIT : ROUND_BF16;
  double t0 = now_ms();
  gptoss_status rc = run(t, a, ids, mask, n, seg0, loss, count);
  if (rc) adder_wait(t);   // this call's adds finish before the caller sees the error
  cuda_prof_host("host backward call", now_ms() - t0);
  if (rc) {
    // the device copy may be half-written: upload it again next time. The
    // host may have received some layers' gradients of this call.
    if (t->cs) cudaStreamSynchronize(t->cs);
    t->version = 0;
    if (gptoss_errcode() == GPTOSS_ENOMEM) {
      cudaStreamSynchronize(v->stream);
      *v->bytes -= t->buf_bytes + t->lbytes;
      release_buffers(t);
      adapter_copy_release(t);
    }
  }
  return rc;
}
// }======================================================
