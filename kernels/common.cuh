// common.cuh: what the CUDA backend's files share: error checks, device
// views of the weights and sessions, and the kernel launchers each .cu
// file provides.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <math.h>
#include <cublas_v2.h>

extern "C" {
#include "../csrc/backend.h"
}

typedef __nv_bfloat16 bf16;
// The KV cache is fp32 (precision "exact": scores as the CPU computes them;
// near-tied routers downstream make key rounding visible) or fp16 (precision
// "fast": half the memory and bandwidth; eight times finer than bf16).

#define CUDA_MAX_LAYERS GPTOSS_MAX_LAYERS

// Records a CUDA failure in the engine's error and returns its status from
// the calling function. Sticky errors (a failed kernel) also mark the model
// broken, since every later call on that context fails too.
#define CU(call)                                                                  \
  do {                                                                            \
    cudaError_t e_ = (call);                                                      \
    if (e_ != cudaSuccess) return cuda_fail(e_, #call, __FILE__, __LINE__);       \
  } while (0)

gptoss_status cuda_fail(cudaError_t e, const char *what, const char *file, int line);
gptoss_status cuda_blas_fail(cublasStatus_t st, const char *what);
#define BLAS(call) do { cublasStatus_t s_ = (call); if (s_ != CUBLAS_STATUS_SUCCESS) return cuda_blas_fail(s_, #call); } while (0)

// GPTOSS_PROFILE=1 (backend.cu): events between launches; the time between
// two marks belongs to the later mark's label; totals print when the model
// is closed. flush collects the events recorded so far.
void cuda_prof_mark(const char *label, cudaStream_t s);
// the host's wall time of a blocking call, under a label that starts "host "
void cuda_prof_host(const char *label, double ms);
void cuda_prof_flush(void);

// {====================================================== device views
struct dlayer {
  const bf16 *attn_norm, *mlp_norm;   // [H]
  const bf16 *qkv_w, *qkv_b;          // [Q + 2 KV, H], [Q + 2 KV]: q, k, v rows back to back
  const bf16 *o_w, *o_b;              // [H, Q], [H]
  const bf16 *sinks;                  // [Hq]
  const bf16 *router_w, *router_b;    // [E, H], [E]
  const uint8_t *gu_blocks, *gu_scales; const bf16 *gu_bias;   // [E, 2I, H/32, 16], [E, 2I, H/32], [E, 2I]
  const uint8_t *dn_blocks, *dn_scales; const bf16 *dn_bias;   // [E, H, I/32, 16], [E, H, I/32], [E, H]
};

// Per-session KV cache pointers, kept in device memory so one kernel can
// serve tokens of many sessions.
struct dsess {
  void *k[CUDA_MAX_LAYERS];   // float or __half, as dims.kv32 says
  void *v[CUDA_MAX_LAYERS];
  int ring;                           // slots of a sliding layer
};

// Shapes every kernel needs.
struct dims {
  int H, I, L, Hq, Hkv, D, Q, KV, E, K, V, window;
  int e_lo, e_hi;             // the experts this device holds: all, or a rank's share of a split model
  int kv32;                   // KV cache in fp32 (else fp16)
  float eps, limit, rope_scale;
};
// }======================================================

// {====================================================== device helpers
// MXFP4 to bf16 for the tensor cores, shared by moe.cu's grouped GEMM and
// mxfp4_gemm.cu: eight FP4 codes (one word, value i in nibble i) as bf16 in
// order, times 2^(s - 127). Each code's sign and e2m1 bits go straight into
// a bf16 whose exponent field is the code's exponent: the value times
// 2^-126 (the code 0.5 lands on a subnormal), paired as (value i, value
// i + 4) and reordered by byte permutes; a bf16 multiply by 2^(s - 1)
// scales it exactly. That factor is a bf16 for s <= 128; BIG (scales above
// 2, which no trained checkpoint has) multiplies by 2^127 and then by
// 2^(s - 128).
template <bool BIG>
__device__ __forceinline__ uint4 fp4x8_bf16(uint32_t w, uint32_t s) {
  uint32_t p0 = ((w << 6) & 0x01C001C0u) | ((w << 12) & 0x80008000u);
  uint32_t p1 = ((w << 2) & 0x01C001C0u) | ((w << 8) & 0x80008000u);
  uint32_t p2 = ((w >> 2) & 0x01C001C0u) | ((w << 4) & 0x80008000u);
  uint32_t p3 = ((w >> 6) & 0x01C001C0u) | (w & 0x80008000u);
  uint32_t q[4] = {__byte_perm(p0, p1, 0x5410), __byte_perm(p2, p3, 0x5410), __byte_perm(p0, p1, 0x7632),
                   __byte_perm(p2, p3, 0x7632)};
  uint32_t f1 = ((BIG && s > 128 ? 254 : s + 126) << 7) * 0x10001u, f2 = (s > 128 ? (s - 1) << 7 : 0x3F80u) * 0x10001u;
  uint4 out;
  uint32_t *o = reinterpret_cast<uint32_t *>(&out);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    __nv_bfloat162 v = __hmul2(*reinterpret_cast<__nv_bfloat162 *>(&q[i]), *reinterpret_cast<__nv_bfloat162 *>(&f1));
    if (BIG) v = __hmul2(v, *reinterpret_cast<__nv_bfloat162 *>(&f2));
    o[i] = *reinterpret_cast<uint32_t *>(&v);
  }
  return out;
}

// gpt-oss's clamped SwiGLU of one (gate, up) pair, as the CPU's forward.c
__device__ __forceinline__ float swiglu(float g, float u, float limit) {
  g = fminf(g, limit);
  u = fminf(fmaxf(u, -limit), limit);
  float glu = g / (1.f + __expf(-1.702f * g));
  return (u + 1.f) * glu;
}

// two floats as a bf16 pair, a in the low half (the first element in memory)
__device__ __forceinline__ uint32_t pack_bf16(float a, float b) {
  __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t *>(&p);
}

// a and b as a bf16 pair and, when lo is given, what bf16 rounded off into
// *lo (split bf16)
__device__ __forceinline__ uint32_t split_pair(float a, float b, uint32_t *lo) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  if (lo) *lo = pack_bf16(a - __low2float(h), b - __high2float(h));
  return *reinterpret_cast<uint32_t *>(&h);
}

// D (16 x 8, fp32) += A (16 x 16) B (16 x 8), bf16 in (sm_80's mma.sync).
// Lane l (g = l / 4, t = l % 4) holds A's rows g and g + 8 at columns 2t,
// 2t + 1 (a[0], a[1]) and 2t + 8, 2t + 9 (a[2], a[3]), B's column g at rows
// 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1), D's rows g (d[0], d[1]) and g + 8
// (d[2], d[3]) at columns 2t, 2t + 1; each register a bf16 pair, the lower
// column or row first
__device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two k16 steps over the 8 consecutive K values a lane holds of each
// operand: w (A's row g), w8 (row g + 8) and x (B's column g), values 0-3 in
// the first step and 4-7 in the second. Inside a step K's order is free as
// long as both operands agree, so one 16-byte load of each serves two steps
// (moe_mma.cu, dense_mma.cu). With LO, x_lo's products go into d too.
template <bool LO>
__device__ __forceinline__ void mma_k8x2(float d[4], const uint4 &w, const uint4 &w8, const uint4 &x, const uint4 &x_lo) {
  const uint32_t a0[4] = {w.x, w8.x, w.y, w8.y}, a1[4] = {w.z, w8.z, w.w, w8.w};
  mma16816(d, a0, x.x, x.y);
  mma16816(d, a1, x.z, x.w);
  if (LO) {
    mma16816(d, a0, x_lo.x, x_lo.y);
    mma16816(d, a1, x_lo.z, x_lo.w);
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes global to shared, in flight until cp.async.wait_group; zeros when !pred
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 16 : 0));
}

// {====================================================== programmatic dependent launch
// On Hopper a kernel launched with programmatic stream serialization may
// start while the kernel before it in the stream is still running: its
// blocks take the SMs that kernel leaves idle and do what needs no earlier
// result (prefetching weights), then pdl_wait() holds them until every
// earlier kernel has finished and its writes are visible. So a kernel
// launched that way calls pdl_wait() before it reads what an earlier kernel
// wrote, and before it ends: a later kernel's wait covers only the kernel
// just before it. pdl_trigger() lets the next kernel launch once every block
// of this one has started. The decode step launches its per-layer kernels so
// (launch_pdl, while pdl_on is set on the calling thread); every other
// caller launches them plainly, where both calls do nothing. Compiled for
// GPUs before Hopper they are empty, so pdl_supported asks the device
// whether this build's code for it has them.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// bytes [p, p + n) on their way into L2 (n a multiple of 16; Hopper's bulk
// prefetch, nothing before it)
__device__ __forceinline__ void prefetch_l2(const void *p, uint32_t n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(n) : "memory");
#endif
}

inline thread_local bool pdl_on = false;   // launch_pdl's mode on this thread (decode_launches sets it)
struct pdl_scope {                          // pdl_on for a scope's launches
  explicit pdl_scope(bool on) { pdl_on = on; }
  ~pdl_scope() { pdl_on = false; }
};

template <typename... P, typename... A>
cudaError_t launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A... args) {
  if (!pdl_on) {
    kernel<<<grid, block, smem, s>>>(args...);
    return cudaPeekAtLastError();   // left set for the caller's LAUNCHED(), as a launch error is in PDL mode
  }
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid; cfg.blockDim = block; cfg.dynamicSmemBytes = smem; cfg.stream = s;
  cfg.attrs = at; cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}
// whether this build's code for the current device waits and triggers
// (mxfp4_gemm.cu asks the device, as for its wgmma kernel; not while a
// stream is being captured)
cudaError_t pdl_supported(bool *yes, cudaStream_t s);
// }======================================================

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// sum over the block; `red` is 32 floats of shared memory
__device__ __forceinline__ float block_sum(float v, float *red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  t = warp_sum(t);
  return t;
}

// max over the block; `red` is 32 floats of shared memory
__device__ __forceinline__ float block_max(float v, float *red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
  return t;
}

// 1 / rms(x) of one row, over the block, plus eps (every norm here sums in this order)
__device__ __forceinline__ float block_inv_rms(const float *x, int n, float eps, float *red) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss, red);
  return rsqrtf(ss / (float)n + eps);
}

// v as bf16 into hi[i] and, when lo is given, what bf16 rounded off (split bf16)
__device__ __forceinline__ void store_split(bf16 *hi, bf16 *lo, size_t i, float v) {
  bf16 h = __float2bfloat16(v);
  hi[i] = h;
  if (lo) lo[i] = __float2bfloat16(v - __bfloat162float(h));
}

// top-k of E logits (E <= 32 * ROUTER_EPL) by one warp, sorted descending,
// ties to the lower expert as torch.topk; then softmax over the k. Each lane
// holds experts lane, lane + 32, ...; a round is one warp argmax, so the
// decode step does not wait on a serial scan.
#define ROUTER_EPL 8
__device__ __forceinline__ void warp_topk(const float *logit, int E, int K, int32_t *sel, float *w) {
  int lane = threadIdx.x & 31;
  float v[ROUTER_EPL];
#pragma unroll
  for (int i = 0; i < ROUTER_EPL; i++) v[i] = lane + 32 * i < E ? logit[lane + 32 * i] : -INFINITY;
  float top = 0.f, sum = 0.f, mine = 0.f;
  int mine_idx = 0;
  for (int k = 0; k < K; k++) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < ROUTER_EPL; i++)
      if (lane + 32 * i < E && (v[i] > bv || bi == 0x7fffffff)) { bv = v[i]; bi = lane + 32 * i; }
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
#pragma unroll
    for (int i = 0; i < ROUTER_EPL; i++) if (lane + 32 * i == bi) v[i] = -INFINITY;
    if (k == 0) top = bv;
    float e = expf(bv - top);
    sum += e;
    if (lane == k) { mine = e; mine_idx = bi; }
  }
  if (lane < K) { sel[lane] = mine_idx; w[lane] = mine / sum; }
}
// }======================================================

// {====================================================== the layer
// One gpt-oss layer as every CUDA forward runs it, in csrc/cpu/forward.c's
// order. Each forward implements the five ops with the kernels of its
// shape (forward.cu: the general pass's GEMMs over many tokens, the decode
// step's GEMVs over one; train_layer.cu: the training forward, which keeps
// fp32 activations for the backward) and runs them through layer_sequence.
struct layer_ops {
  virtual gptoss_status attn_in(int l) = 0;     // RMSNorm, q/k/v (+ LoRA); the trainer also ropes q and k here
  virtual gptoss_status attention(int l) = 0;   // RoPE with the KV store (inference), attention with sinks and window
  virtual gptoss_status attn_out(int l) = 0;    // o (+ LoRA) into the residual
  virtual gptoss_status route(int l) = 0;       // RMSNorm, router, top-k and softmax (+ the experts' sort)
  virtual gptoss_status experts(int l) = 0;     // gate_up (+ LoRA) + SwiGLU, down (+ LoRA), weighted into the residual
};

static inline gptoss_status layer_sequence(layer_ops &ops, int l) {
  gptoss_status rc;
  if ((rc = ops.attn_in(l)) || (rc = ops.attention(l)) || (rc = ops.attn_out(l)) || (rc = ops.route(l))) return rc;
  return ops.experts(l);
}
// }======================================================

// {====================================================== launchers
// norm.cu: RMSNorm of rows (rows[i], or i when rows is NULL).
// split-bf16: where lo is given, x = hi + lo to ~16 bits; products with the
// (exactly bf16) weights then sum two tensor-core GEMMs in fp32
void launch_rmsnorm(const float *x, const int *rows, int T, const bf16 *w, bf16 *out, bf16 *lo, int H, float eps, cudaStream_t s);
// training: fp32 out, and inv[i] = 1 / rms for the backward, which adds
// its dx into dx's rows
void launch_rmsnorm_f32(const float *x, const int32_t *rows, int T, const bf16 *w, float *out, float *inv, int H, float eps,
                        cudaStream_t s);
void launch_rmsnorm_bwd(float *dx, const float *x, const int32_t *rows, int T, const float *inv, const bf16 *w, const float *dy,
                        int H, cudaStream_t s);

// pointwise.cu
void launch_add_bias_residual(float *x, const float *y, const bf16 *bias, int T, int H, cudaStream_t s);
void launch_bf16_from_f32(const float *x, bf16 *y, bf16 *lo, size_t n, cudaStream_t s);
// y[t][n] += bias[n] over rows x N (row stride ld)
void launch_add_bias(float *y, int ld, const bf16 *bias, int rows, int N, cudaStream_t s);
// rows x cols (row stride ld) into contiguous bf16 hi (+ lo: split bf16)
void launch_split(const float *x, int rows, int ld, int cols, bf16 *hi, bf16 *lo, cudaStream_t s);
// clamped SwiGLU over n interleaved (gate, up) pairs; the backward turns gu
// into d gu in place, for d act = w[row's assignment] ud (rows of I, perm:
// the sort's assignment of each row)
void launch_swiglu(const float *gu, float *act, size_t n, float limit, cudaStream_t s);
void launch_swiglu_bwd(float *gu, const float *ud, const float *w, const int32_t *perm, int I, size_t n, float limit, cudaStream_t s);
// cross-entropy of rows of V logits: loss[i] = lse - z[target]; z becomes softmax - onehot
void launch_xent(float *z, int rows, int V, const int32_t *target, float *loss, cudaStream_t s);
// LoRA dropout (masks from gptoss_lora_keep) over total values, rows of n:
// add 0: out = x * keep (contiguous); add 1: out (row stride ldo) += x * keep
struct drop_args { uint64_t key; int layer, mod; float p; };
void launch_dropout(const float *x, int ldx, float *out, int ldo, int n, size_t total, drop_args d, int add, cudaStream_t s);

// dense.cu
void launch_embed(const int32_t *ids, int T, const bf16 *embed, float *x, int H, cudaStream_t s);
// decode: out[r] = bias[r] + W[r] . rmsnorm(x) (or . x when norm_w is NULL); with
// residual, residual[r] += that instead
void launch_gemv_bf16(const float *x, const bf16 *norm_w, float eps, const bf16 *W, const bf16 *bias, float *out,
                      int rows, int cols, float *residual, cudaStream_t s);
// Y[t][r] = W[r] . x_t (x_t = X[t] + X_lo[t]) with each dot product summed
// in one order whatever T is: a batch-invariant model's products (cols % 8 == 0)
void launch_gemm_rows(const bf16 *W, const bf16 *X, const bf16 *X_lo, float *Y, int rows, int T, int cols, cudaStream_t s);
// Y[T][out] = X W^T (+ X_lo W^T) for a few tokens on mma.sync, K cut into
// slices summed through part (dense_mma.cu); part holds
// dense_mma_part_floats(T, out) floats for any out it is used for (fewer:
// fewer slices)
size_t dense_mma_part_floats(int T, int out);
cudaError_t launch_dense_mma(const bf16 *W, const bf16 *X, const bf16 *X_lo, float *Y, int out, int T, int in, float *part,
                             size_t part_floats, cudaStream_t s);
// RMSNorm + router + top-k + softmax in fp32, one block per token: routing
// is a discrete choice, so no rounded input sits right before it. Writes the
// normalised rows too (xn bf16 for the GEMMs, xnf fp32 for decode), either may be NULL.
void launch_router(const float *x, int T, const bf16 *norm_w, float eps, const bf16 *W, const bf16 *bias, int H, int E, int K,
                   bf16 *xn, bf16 *xn_lo, float *xnf, int32_t *sel, float *w, cudaStream_t s);

// attention.cu
struct attn_args {
  const float *qkv;          // [T, Q + 2 KV] after bias (q, k, v)
  float *q;                  // [T, Q]: roped queries
  const int32_t *tok_pos;    // [T] absolute positions, or NULL with pos_dev
  const int32_t *pos_dev;    // decode: the single token's position, read on the device
  const int32_t *tok_sess;   // [T] session index, or NULL for session 0
  const dsess *const *sess;  // device array of session views
  int T, layer, sliding;
  const float *inv_freq;
  const bf16 *bias;          // q, k, v bias to add (the GEMM path), or NULL (the GEMV already did)
};
void launch_rope_store(const attn_args *a, const dims *d, cudaStream_t s);
// partials: [T][Hq][nsplit] of (m, l) and [T][Hq][nsplit][D] accumulators;
// split_len 0: each token's keys in nsplit equal runs of whole tiles
void launch_attention(const attn_args *a, const dims *d, const bf16 *sinks, int nsplit, int split_len,
                      float *part_ml, float *part_acc, float *out, cudaStream_t s);
// training, for head sizes flash_attention.cu has no tiles for: RoPE on nh
// heads of fp32 rows (row stride ld) by angle sign * t * inv_freq (sign -1:
// the backward); the softmax of a batch of nb heads' materialised scores
// S [nb][T][T] (lse kept), its recomputation from lse, and its backward
// (dP becomes dS)
struct att_rows {
  int T, Hq, h0;            // h0: the batch's first head
  int window;               // keys t - window + 1 .. t on a sliding layer, else 0
  const bf16 *sinks;
  float *lse;               // [T][Hq]
  const int32_t *seg0;      // packed examples: [T] the row each token's example begins at (its keys start there); NULL: 0
};
// pos: [T] each row's position (packed examples), NULL: the row's index
void launch_rope_rows(float *y, int ld, int T, int nh, int D, const float *inv_freq, float scale, float sign,
                      const int32_t *pos, cudaStream_t s);
void launch_softmax_rows(float *S, const att_rows *a, int nb, cudaStream_t s);
void launch_probs_rows(float *S, const att_rows *a, int nb, cudaStream_t s);
void launch_dsoftmax_rows(const float *P, float *dP, const float *dO, const float *O, int Q, int D, float scale, const att_rows *a,
                          int nb, cudaStream_t s);

// moe.cu
struct moe_work {
  int32_t *counts;           // [E]
  int32_t *offsets;          // [E + 1] start of each expert's rows
  int32_t *tile_offsets;     // [E + 1] start of each expert's 64-row tiles
  int32_t *cursor;           // [E]
  int32_t *perm;             // [T*K]: assignment index (t*K + k) in expert order
};
// sorts the (token, choice) assignments of experts lo..hi-1 by expert; the
// others' are left out (a rank of a split model runs its own experts only)
void launch_moe_sort(const int32_t *sel, int T, int E, int K, int lo, int hi, moe_work *w, cudaStream_t s);
// grouped GEMMs over the sorted assignments; xn_lo NULL = plain bf16 inputs
// delta (or NULL): [T*K][2I] in expert order, added to gate_up before SwiGLU (LoRA)
void launch_moe_gate_up(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, int T, const dlayer *l, const dims *d,
                        const float *delta, float *act, cudaStream_t s);
void launch_moe_down(const float *act, int split, const moe_work *w, int T, const dlayer *l, const dims *d, float *y, cudaStream_t s);
void launch_moe_combine(float *x, const float *y, const float *w, int T, int H, int K, cudaStream_t s);
// the same two products on Hopper's wgmma (mxfp4_gemm.cu's grouped kernel):
// the inputs gathered into expert order as bf16 (hi, lo: [T*K][H], lo NULL
// without a split), gate_up into gu [T*K][2I] (+ delta) and SwiGLU into
// act; down from act, split into hi/lo [T*K][I], into ys [T*K][H] in
// expert order, then each row to its assignment's row of y
cudaError_t launch_moe_gate_up_wgmma(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, int T, const dlayer *l, const dims *d,
                                     const float *delta, bf16 *hi, bf16 *lo, float *gu, float *act, cudaStream_t s);
cudaError_t launch_moe_down_wgmma(const float *act, const moe_work *w, int T, const dlayer *l, const dims *d, bf16 *hi, bf16 *lo,
                                  float *ys, float *y, cudaStream_t s);
// the same two products for few rows per expert (batched decode): each
// expert's weights read once, its rows taken 8 at a time; same layouts
void launch_moe_gate_up_small(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, const dlayer *l, const dims *d,
                              const float *delta, float *act, cudaStream_t s);
void launch_moe_down_small(const float *act, const moe_work *w, const dlayer *l, const dims *d, float *y, cudaStream_t s);
// the same two products on mma.sync for a few dozen rows per expert
// (moe_mma.cu: weights as the 16-row operand, the expert's rows 8 at a time,
// nothing padded to a tile); same layouts; split: act split into bf16 hi/lo
void launch_moe_gate_up_mma(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, const dlayer *l, const dims *d,
                            const float *delta, float *act, cudaStream_t s);
void launch_moe_down_mma(const float *act, int split, const moe_work *w, const dlayer *l, const dims *d, float *y, cudaStream_t s);
// decode (one token): gate_up (+ delta [K][2I], or NULL) + SwiGLU into act [K][I]; down + weights added to the residual
void launch_moe_gate_up_decode(const float *xn, const int32_t *sel, const dlayer *l, const dims *d, const float *delta, float *act,
                               cudaStream_t s);
void launch_moe_down_decode(const float *act, const int32_t *sel, const float *w, const dlayer *l, const dims *d, float *x,
                            cudaStream_t s);

// moe_rows.cu: training's MoE over the sort's rows (row i holds assignment
// perm[i] = t K + k; invp is its inverse): top-k + softmax of the router's
// logits, the tokens' rows gathered into sorted rows (n of them), the
// weighted combine with the residual xmid, the routing weights' backward
// into dxn, rows of n values scaled by their routing weight, and the
// sorted rows' gradients added back to their tokens
void launch_topk(const float *rl, int T, int E, int K, int32_t *sel, float *w, cudaStream_t s);
void launch_invperm(const int32_t *perm, int32_t *invp, int n, cudaStream_t s);
void launch_gather_rows(const float *xn, const int32_t *perm, int n, int K, int H, float *xg, cudaStream_t s);
void launch_combine_rows(float *out, const float *xmid, const float *ye, const float *w, const int32_t *invp, int T, int H, int K,
                         cudaStream_t s);
void launch_route_bwd(const float *dy, const float *ud, const float *act, const bf16 *bias, const float *w, const int32_t *sel,
                      const int32_t *invp, const bf16 *Wr, float *dxn, int T, int H, int I, int K, cudaStream_t s);
void launch_scale_rows(float *x, int n, const float *w, const int32_t *perm, size_t total, cudaStream_t s);
void launch_scatter_rows(float *dxn, const float *dxg, const int32_t *invp, int T, int H, int K, cudaStream_t s);

// mxfp4_gemm.cu: training's expert products. Rows of expert e are
// hi/lo[offsets[e] .. offsets[e + 1]) (w->offsets; lo NULL: plain bf16), K
// wide; W [wrows][wcols] MXFP4 per expert; Y rows (same order, stride ldy)
// = X W^T (trans false; + bias [E][wrows] if not NULL) or X W (trans
// true). rows_bound >= all rows.
cudaError_t launch_mxfp4_gemm(const bf16 *hi, const bf16 *lo, const moe_work *w, int rows_bound, int E, const uint8_t *blocks,
                              const uint8_t *scales, int wrows, int wcols, bool trans, const bf16 *bias, float *Y, int ldy,
                              cudaStream_t s);
// whether launch_mxfp4_gemm runs the wgmma kernel on the current device
// (sm_90a code in this build, GPTOSS_CUDA_PORTABLE unset); asks the device
// once, so not while a stream is being captured
cudaError_t mxfp4_gemm_has_wgmma(bool *yes, cudaStream_t s);

// flash_attention.cu: training's attention of T tokens, causal with the
// heads' sinks and (window > 0) a sliding window, for head sizes
// flash_supported accepts. Operands bf16 (the lo's NULL) or split bf16.
struct flash_args {
  const bf16 *qkv_hi, *qkv_lo;     // [T][ldq]: roped q (head h at h D), k (at Q + g D), v (at Q + KV + g D)
  const bf16 *dout_hi, *dout_lo;   // [T][Q]: the output's gradient (backward)
  const float *dout;               // the same in fp32 (backward)
  const bf16 *sinks;               // [Hq]
  int T, ldq, Q, KV, Hq, Hkv, D, window;
  float scale;
  float *att;                      // [T][Q]: the output (forward writes it, backward reads it)
  float *lse;                      // [T][Hq]: log of each softmax's denominator (forward writes it)
  float *dd;                       // [T][Hq]: O.dO (backward writes it)
  float *dqkv;                     // [T][ldq]: the gradients of q, k and v (backward writes them)
  float *dk_part, *dv_part;        // [T][Hq][D]: each head's share of dk and dv (backward's scratch)
  const int32_t *seg0;             // packed examples: [T] where each query's example begins (no key before it); NULL: 0
};
bool flash_supported(int D);
cudaError_t launch_flash_fwd(const flash_args *a, cudaStream_t s);
cudaError_t launch_flash_bwd(const flash_args *a, cudaStream_t s);
// Prefill's attention in the same tiles: n consecutive queries of one
// session at positions p0 .. p0 + n - 1 (roped, fp32), their keys and values
// read from the session's KV cache (fp32 or fp16, the ring on a sliding
// layer, already holding the n new positions), split bf16 or plain bf16
struct flash_prefill_args {
  const float *q;                  // [n][Q]
  const dsess *const *sess;        // device array of session views
  const bf16 *sinks;               // [Hq]
  int sess_index, p0, n, layer, window;   // window 0: a full layer
  int Q, KV, Hq, Hkv, D, kv32, split;
  float scale;
  float *att;                      // [n][Q]
};
#define FLASH_PREFILL_QUERIES 16   // a block's queries: a launch is ceil(n / 16) x Hkv blocks
// whether launch_flash_prefill takes this shape (head size, heads a group)
bool flash_prefill_supported(int D, int Hq, int Hkv);
cudaError_t launch_flash_prefill(const flash_prefill_args *a, cudaStream_t s);

// lora.cu: adapters in the inference forward
// one LoRA module's device copy: A [E][r][in], B [E][out][r] (E = 1 for
// attention); r = 0 where the adapter has none
struct dlora_mod {
  const float *A, *B;
  int r, in, out;
  float scale;
};
struct lora_view {
  cudaStream_t stream;
  int L, I;                  // layers; the experts' intermediate size
  size_t budget, used;       // the model's memory budget (0: none) and the bytes it holds besides the adapters
};
struct lora_cache;
// Makes sure each session's adapter has a current device copy and points
// each token at its session's table ([T], NULL entries for sessions without
// one): *tok stays NULL when no session has an adapter. Also gives room for
// `rows` rows of rank products (u, [rows][rmax]) and gate_up deltas
// (delta, [rows][2I]). Copies of adapters nobody else holds are dropped.
gptoss_status lora_bind(lora_cache **c, const lora_view *v, gptoss_session *const *ss, int nss, const int32_t *sidx, int T,
                        int rows, const dlora_mod *const **tok, float **u, int *rmax, float **delta);
// one adapter's current device table ([L][modules]) and rank (batch-1 decode)
gptoss_status lora_table(lora_cache **c, const lora_view *v, gptoss_adapter *a, const dlora_mod **tab, int *r);
void lora_cache_drop(lora_cache *c);      // every copy and buffer (training wants the memory)
void lora_cache_free(lora_cache *c);
size_t lora_cache_bytes(const lora_cache *c);
enum { LORA_ADD_TOKEN, LORA_SET_ROW, LORA_ADD_ASSIGNMENT };
#define LORA_PASS_MODS 3
struct lora_pass {
  const dlora_mod *const *tok;
  int layer;
  int nm, mod[LORA_PASS_MODS], ooff[LORA_PASS_MODS];   // modules sharing the input (q, k, v), one launch
  int n;                     // rows: tokens, or with perm sorted (token, expert) assignments
  const int32_t *perm, *sel;
  int K;
  const float *xf;           // input rows, fp32, or
  const bf16 *xh, *xl;       // bf16 (+ lo when split)
  int in_sorted;             // input row j (else the row's token)
  float *u;                  // [nm][n][rmax]
  int rmax;
  float *out;                // ADD_TOKEN: out[t][ooff + c] +=; SET_ROW: out[j][c] = (0 without a LoRA);
  int ostride, mode;         // ADD_ASSIGNMENT: out[assignment][ooff + c] +=
};
lora_pass lora_pass_of(const dlora_mod *const *tok, int layer, int nm, const int *mods, const int *ooffs, int n, const int32_t *perm,
                       const int32_t *sel, int K, const float *xf, const bf16 *xh, const bf16 *xl, int in_sorted, float *u, int rmax,
                       float *out, int ostride, int mode);
// outs: the widest module's outputs
void launch_lora(const lora_pass *p, int outs, cudaStream_t s);

// sampler.cu
// a launch's logit biases, every row's list one after another (bias_off: where a row's begins)
#define SAMPLE_BIAS_CAP 4096
struct gpu_sampling {
  float temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
  int top_k, penalty_window, n_bias, bias_off;
  uint64_t seed, counter;
};
struct sampler_work {
  void *cub_temp; size_t cub_bytes;
  float *keys_in, *keys_out; int32_t *idx_in, *idx_out;
  float *partial_f; int32_t *partial_i;
  int32_t *bias_ids; float *bias_vals;
};
size_t sampler_cub_bytes(int V);
// samples one id per row of logits (rows of V) into out[row]; params on the device
// scratch (rows*V floats, or NULL): where biases and penalties are applied, so logits stay as they were
void launch_sample(float *logits, int rows, int V, const gpu_sampling *params_dev, const gpu_sampling *params_host,
                   const int32_t *const *hist, const int32_t *hist_len, sampler_work *w, int32_t *out, cudaStream_t s,
                   float *scratch);
// }======================================================

// {====================================================== training (train*.cu)
// What the LoRA training pass needs of the model; backend.cu fills it.
struct train_view {
  cudaStream_t stream;
  cublasHandle_t blas;
  const dlayer *layer;
  const bf16 *embed, *norm, *lm_head;
  const float *inv_freq;
  const unsigned char *layer_sliding;   // [L]
  dims d;
  gptoss_precision precision;   // the model's: which products take split-bf16 operands (train.cuh)
  int threads;               // host threads for the adapter's copies
  void **state;              // the trainer's buffers, kept between calls
  size_t *bytes;             // device bytes they hold (reported as workspace)
};
gptoss_status cuda_lora_backward(const train_view *v, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                 const int32_t *seg0, double *loss, int *count);
void cuda_train_free(void *state);
// gives back the trainer's device memory (the next backward allocates it
// again): sessions with adapters do, so training and generating with
// adapters never hold both their copies
void cuda_train_release(void *state, size_t *bytes);
// }======================================================
