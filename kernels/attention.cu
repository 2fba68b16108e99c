// attention.cu: YaRN RoPE with the KV cache write, and attention with sinks
// and the sliding window, split over the keys (flash-decoding) and combined.
//
// CPU reference: cpu_rope in csrc/cpu/kernels.c and attention_worker in
// csrc/cpu/forward.c: scores q.k/sqrt(D) over keys max(0, p-W+1)..p on
// sliding layers (0..p on full ones); the sink joins the softmax as one more
// logit with no value.
#include <float.h>
#include "common.cuh"

__device__ __forceinline__ int token_pos(const attn_args &a, int t) {
  return a.tok_pos ? a.tok_pos[t] : *a.pos_dev;
}

__device__ __forceinline__ const dsess *token_sess(const attn_args &a, int t) {
  return a.sess[a.tok_sess ? a.tok_sess[t] : 0];
}

__device__ __forceinline__ int kv_slot(const dsess *S, int sliding, int p) { return gptoss_kv_slot(sliding, S->ring, p); }

__device__ __forceinline__ void kv_put(float *p, float v) { *p = v; }
__device__ __forceinline__ void kv_put(__half *p, float v) { *p = __float2half(v); }
__device__ __forceinline__ float kv_get(const float *p) { return *p; }
__device__ __forceinline__ float kv_get(const __half *p) { return __half2float(*p); }
// four neighbours at once (16 or 8 bytes, aligned when D % 4 == 0)
__device__ __forceinline__ float4 kv_get4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ float4 kv_get4(const __half *p) {
  uint2 u = *reinterpret_cast<const uint2 *>(p);
  float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&u.x)), b = __half22float2(*reinterpret_cast<const __half2 *>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

// grid (tokens, chunks): rotate q and k (pairs (i, i + D/2)), store k and v.
// Chunks spread one token over several SMs, since the exact sincosf of a
// large angle takes a slow path and batch-1 decode waits on it.
template <typename KT>
__global__ void rope_store_kernel(attn_args a, dims d) {
  pdl_trigger();   // decode launches these with launch_pdl (common.cuh)
  pdl_wait();
  int t = blockIdx.x, p = token_pos(a, t);
  const dsess *S = token_sess(a, t);
  int half = d.D / 2;
  const float *row = a.qkv + (size_t)t * (d.Q + 2 * d.KV);
  size_t slot = (size_t)kv_slot(S, a.sliding, p) * d.KV;
  KT *kc = (KT *)S->k[a.layer] + slot, *vc = (KT *)S->v[a.layer] + slot;
  int nheads = d.Hq + d.Hkv;
  int first = blockIdx.y * blockDim.x + threadIdx.x, stride = gridDim.y * blockDim.x;
  for (int i = first; i < nheads * half; i += stride) {
    int h = i / half, j = i % half;
    float th = (float)p * a.inv_freq[j];
    float sn, cs;
    sincosf(th, &sn, &cs);
    cs *= d.rope_scale;
    sn *= d.rope_scale;
    if (h < d.Hq) {
      const float *x = row + h * d.D;
      float x1 = x[j], x2 = x[j + half];
      if (a.bias) { x1 += __bfloat162float(a.bias[h * d.D + j]); x2 += __bfloat162float(a.bias[h * d.D + j + half]); }
      float *q = a.q + (size_t)t * d.Q + h * d.D;
      q[j] = x1 * cs - x2 * sn;
      q[j + half] = x2 * cs + x1 * sn;
    } else {
      int kh = h - d.Hq;
      const float *x = row + d.Q + kh * d.D;
      float x1 = x[j], x2 = x[j + half];
      if (a.bias) {
        x1 += __bfloat162float(a.bias[d.Q + kh * d.D + j]);
        x2 += __bfloat162float(a.bias[d.Q + kh * d.D + j + half]);
      }
      kv_put(kc + kh * d.D + j, x1 * cs - x2 * sn);
      kv_put(kc + kh * d.D + j + half, x2 * cs + x1 * sn);
    }
  }
  const float *v = row + d.Q + d.KV;
  for (int i = first; i < d.KV; i += stride)
    kv_put(vc + i, v[i] + (a.bias ? __bfloat162float(a.bias[d.Q + d.KV + i]) : 0.f));
}

void launch_rope_store(const attn_args *a, const dims *d, cudaStream_t s) {
  dim3 grid(a->T, ((d->Hq + d->Hkv) * d->D / 2 + 255) / 256);
  if (d->kv32) launch_pdl(rope_store_kernel<float>, grid, dim3(256), 0, s, *a, *d);
  else launch_pdl(rope_store_kernel<__half>, grid, dim3(256), 0, s, *a, *d);
}

#define TILE 32
#define MAX_DPL 8   // D up to 256

// grid (T * Hkv, nsplit); block: one warp per q head of the kv group
template <typename KT>
__global__ void attention_kernel(attn_args a, dims d, int nsplit, int split_len, float *part_ml, float *part_acc) {
  pdl_trigger();   // decode launches these with launch_pdl (common.cuh)
  pdl_wait();
  extern __shared__ float sm[];
  int G = d.Hq / d.Hkv, D = d.D, DP = D + 1;     // padded rows: lanes read different rows, same column
  float *Ks = sm, *Vs = Ks + TILE * DP, *Qs = Vs + TILE * D;
  int t = blockIdx.x / d.Hkv, kvh = blockIdx.x % d.Hkv, split = blockIdx.y;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int h = kvh * G + warp;
  int p = token_pos(a, t);
  const dsess *S = token_sess(a, t);
  int start = a.sliding && p - d.window + 1 > 0 ? p - d.window + 1 : 0;
  if (split_len <= 0) {                           // decode: sized from the position
    int per = (p + 1 - start + nsplit - 1) / nsplit;
    split_len = (per + TILE - 1) / TILE * TILE;
  }
  int lo = start + split * split_len, hi = lo + split_len;
  if (hi > p + 1) hi = p + 1;
  const KT *kc = (const KT *)S->k[a.layer], *vc = (const KT *)S->v[a.layer];
  // the query of this warp's head, scaled by 1/sqrt(D)
  float scale = rsqrtf((float)D);
  for (int i = lane; i < D; i += 32) Qs[warp * D + i] = a.q[(size_t)t * d.Q + h * D + i] * scale;
  float m = -FLT_MAX, l = 0.f, acc[MAX_DPL];
  int dpl = (D + 31) / 32;
  for (int i = 0; i < MAX_DPL; i++) acc[i] = 0.f;
  __syncthreads();
  for (int k0 = lo; k0 < hi; k0 += TILE) {
    int n = hi - k0 < TILE ? hi - k0 : TILE;
    // the block loads the tile's keys and values of this kv head
    if ((D & 3) == 0) {                           // vector loads: one round trip, not D/8
      int D4 = D >> 2;
#pragma unroll 4
      for (int i = threadIdx.x; i < n * D4; i += blockDim.x) {
        int j = i / D4, c = (i % D4) << 2;
        size_t off = (size_t)kv_slot(S, a.sliding, k0 + j) * d.KV + kvh * D + c;
        float4 kk = kv_get4(kc + off), vv = kv_get4(vc + off);
        float *kr = Ks + j * DP + c, *vr = Vs + j * D + c;
        kr[0] = kk.x; kr[1] = kk.y; kr[2] = kk.z; kr[3] = kk.w;
        vr[0] = vv.x; vr[1] = vv.y; vr[2] = vv.z; vr[3] = vv.w;
      }
    } else {
      for (int i = threadIdx.x; i < n * D; i += blockDim.x) {
        int j = i / D, c = i % D;
        size_t off = (size_t)kv_slot(S, a.sliding, k0 + j) * d.KV + kvh * D + c;
        Ks[j * DP + c] = kv_get(kc + off);
        Vs[j * D + c] = kv_get(vc + off);
      }
    }
    __syncthreads();
    float s = -FLT_MAX;
    if (lane < n) {
      s = 0.f;
      const float *kr = Ks + lane * DP, *q = Qs + warp * D;
      for (int c = 0; c < D; c++) s += q[c] * kr[c];
    }
    float mx = s;
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float m_new = fmaxf(m, mx);
    float corr = __expf(m - m_new);
    float pj = lane < n ? __expf(s - m_new) : 0.f;
    float ps = pj;
    for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
    l = l * corr + ps;
    for (int i = 0; i < dpl; i++) acc[i] *= corr;
    for (int j = 0; j < n; j++) {
      float pv = __shfl_sync(0xffffffffu, pj, j);
      for (int i = 0; i < dpl; i++) {
        int c = lane + 32 * i;
        if (c < D) acc[i] += pv * Vs[j * D + c];
      }
    }
    m = m_new;
    __syncthreads();
  }
  size_t slot = ((size_t)t * d.Hq + h) * nsplit + split;
  if (lane == 0) { part_ml[2 * slot] = m; part_ml[2 * slot + 1] = l; }
  for (int i = 0; i < dpl; i++) {
    int c = lane + 32 * i;
    if (c < D) part_acc[slot * D + c] = acc[i];
  }
}

// merges the splits with the sink: o = sum_j e^(s_j - M) v_j / (sum_j e^(s_j - M) + e^(sink - M)).
// The splits' maxima and weights are reduced across the block (batch-1
// decode waits on this kernel's latency), then each thread sums one column.
#define COMBINE_THREADS 64
__global__ void attention_combine_kernel(attn_args a, dims d, const bf16 *sinks, int nsplit, const float *part_ml,
                                         const float *part_acc, float *out) {
  pdl_trigger();   // decode launches these with launch_pdl (common.cuh)
  pdl_wait();
  extern __shared__ float wts[];                  // [nsplit]
  __shared__ float red[COMBINE_THREADS / 32];
  int t = blockIdx.x / d.Hq, h = blockIdx.x % d.Hq;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  size_t base = ((size_t)t * d.Hq + h) * nsplit;
  float sink = __bfloat162float(sinks[h]);
  float M = sink;
  for (int s = threadIdx.x; s < nsplit; s += blockDim.x)
    if (part_ml[2 * (base + s) + 1] > 0.f) M = fmaxf(M, part_ml[2 * (base + s)]);
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  if (lane == 0) red[warp] = M;
  __syncthreads();
  M = red[0];
  for (int w = 1; w < COMBINE_THREADS / 32; w++) M = fmaxf(M, red[w]);
  __syncthreads();
  float den = 0.f;
  for (int s = threadIdx.x; s < nsplit; s += blockDim.x) {
    float l = part_ml[2 * (base + s) + 1];
    float e = l > 0.f ? __expf(part_ml[2 * (base + s)] - M) : 0.f;
    wts[s] = e;
    den += l * e;
  }
  for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
  if (lane == 0) red[warp] = den;
  __syncthreads();
  den = __expf(sink - M);
  for (int w = 0; w < COMBINE_THREADS / 32; w++) den += red[w];
  for (int c = threadIdx.x; c < d.D; c += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < nsplit; s++)
      if (wts[s] != 0.f) o += part_acc[(base + s) * d.D + c] * wts[s];
    out[(size_t)t * d.Q + h * d.D + c] = o / den;
  }
}

void launch_attention(const attn_args *a, const dims *d, const bf16 *sinks, int nsplit, int split_len,
                      float *part_ml, float *part_acc, float *out, cudaStream_t s) {
  int G = d->Hq / d->Hkv;
  size_t smem = sizeof(float) * ((size_t)TILE * (d->D + 1) + (size_t)TILE * d->D + (size_t)G * d->D);
  dim3 grid(a->T * d->Hkv, nsplit);
  if (d->kv32) launch_pdl(attention_kernel<float>, grid, dim3(32 * G), smem, s, *a, *d, nsplit, split_len, part_ml, part_acc);
  else launch_pdl(attention_kernel<__half>, grid, dim3(32 * G), smem, s, *a, *d, nsplit, split_len, part_ml, part_acc);
  // whole 16-byte groups: nvcc reads the weights with vector loads that
  // can run past an odd count (compute-sanitizer saw 12-byte reads at nsplit 1)
  size_t wsz = sizeof(float) * (size_t)((nsplit + 3) & ~3);
  launch_pdl(attention_combine_kernel, dim3(a->T * d->Hq), dim3(COMBINE_THREADS), wsz, s, *a, *d, sinks, nsplit,
             (const float *)part_ml, (const float *)part_acc, out);
}

// {====================================================== training
// LoRA training's attention for head sizes flash_attention.cu has no tiles
// for: the scores of a few heads at a time, materialised (train_layer.cu
// runs the products through cuBLAS). CPU reference: csrc/cpu/train.c.
// RoPE on nh heads of each row (row stride ld): the half-split rotation of
// cpu_rope, by angle sign * t * inv_freq (sign -1: the backward)
__global__ void rope_kernel(float *y, int ld, int T, int nh, int D, const float *inv_freq, float scale, float sign,
                            const int32_t *pos) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, half = D / 2;
  if (i >= (size_t)T * nh * half) return;
  int t = (int)(i / (nh * half)), h = (int)(i / half % nh), k = (int)(i % half);
  float th = sign * (float)(pos ? pos[t] : t) * inv_freq[k], sn, cs;
  sincosf(th, &sn, &cs);
  cs *= scale; sn *= scale;
  float *p = y + (size_t)t * ld + (size_t)h * D;
  float a = p[k], b = p[k + half];
  p[k] = a * cs - b * sn;
  p[k + half] = b * cs + a * sn;
}

void launch_rope_rows(float *y, int ld, int T, int nh, int D, const float *inv_freq, float scale, float sign,
                      const int32_t *pos, cudaStream_t s) {
  size_t n = (size_t)T * nh * (D / 2);
  rope_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(y, ld, T, nh, D, inv_freq, scale, sign, pos);
}

// a packed example's tokens see from its start on (csrc/cpu/attention.c)
__device__ __forceinline__ int first_key(const att_rows &a, int t) {
  int f = a.seg0 ? a.seg0[t] : 0;
  return a.window && t - a.window + 1 > f ? t - a.window + 1 : f;
}

// One block per (query t, head i of the batch): scaled scores into
// probabilities over the causal window plus the head's sink (which takes
// probability but has no value); lse keeps log(sum) for the backward.
__global__ void softmax_kernel(float *S, att_rows a) {
  __shared__ float red[32];
  int t = blockIdx.x, i = blockIdx.y, h = a.h0 + i, j0 = first_key(a, t);
  float *row = S + ((size_t)i * a.T + t) * a.T;
  float sink = __bfloat162float(a.sinks[h]), mx = sink;
  for (int j = j0 + threadIdx.x; j <= t; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int j = j0 + threadIdx.x; j <= t; j += blockDim.x) sum += expf(row[j] - mx);
  sum = block_sum(sum, red) + expf(sink - mx);
  float lse = mx + logf(sum);
  for (int j = threadIdx.x; j < a.T; j += blockDim.x) row[j] = j >= j0 && j <= t ? expf(row[j] - lse) : 0.f;
  if (threadIdx.x == 0) a.lse[(size_t)t * a.Hq + h] = lse;
}

// The backward's recomputed scores into the forward's probabilities
__global__ void probs_kernel(float *S, att_rows a) {
  int t = blockIdx.x, i = blockIdx.y, h = a.h0 + i, j0 = first_key(a, t);
  float *row = S + ((size_t)i * a.T + t) * a.T;
  float lse = a.lse[(size_t)t * a.Hq + h];
  for (int j = threadIdx.x; j < a.T; j += blockDim.x) row[j] = j >= j0 && j <= t ? expf(row[j] - lse) : 0.f;
}

// dS = P (dP - dO.O) scale, into dP; dO and O: rows of Q floats, head h at h*D
__global__ void dsoftmax_kernel(const float *P, float *dP, const float *dO, const float *O, int Q, int D, float scale, att_rows a) {
  __shared__ float red[32];
  int t = blockIdx.x, i = blockIdx.y, h = a.h0 + i;
  size_t off = ((size_t)i * a.T + t) * a.T;
  const float *o = O + (size_t)t * Q + (size_t)h * D, *g = dO + (size_t)t * Q + (size_t)h * D;
  float dd = 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) dd += o[d] * g[d];
  dd = block_sum(dd, red);
  for (int j = threadIdx.x; j <= t; j += blockDim.x) dP[off + j] = P[off + j] * (dP[off + j] - dd) * scale;
  for (int j = t + 1 + threadIdx.x; j < a.T; j += blockDim.x) dP[off + j] = 0.f;
}

void launch_softmax_rows(float *S, const att_rows *a, int nb, cudaStream_t s) {
  softmax_kernel<<<dim3(a->T, nb), 256, 0, s>>>(S, *a);
}

void launch_probs_rows(float *S, const att_rows *a, int nb, cudaStream_t s) {
  probs_kernel<<<dim3(a->T, nb), 256, 0, s>>>(S, *a);
}

void launch_dsoftmax_rows(const float *P, float *dP, const float *dO, const float *O, int Q, int D, float scale, const att_rows *a,
                          int nb, cudaStream_t s) {
  dsoftmax_kernel<<<dim3(a->T, nb), 256, 0, s>>>(P, dP, dO, O, Q, D, scale, *a);
}
// }======================================================
