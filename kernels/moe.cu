// moe.cu: the experts. MXFP4 weights stay MXFP4 in memory and are decoded
// inside these kernels: the FP4 code (low nibble first) times 2^(scale-127).
//
// Prefill and batched decode: assignments (token, slot) are counting-sorted
// by expert on the device, then grouped GEMMs run on tensor cores (WMMA,
// bf16 in, fp32 accumulate) over each expert's rows, the gate/up GEMM with
// bias and clamped SwiGLU fused in its epilogue, the down GEMM writing each
// assignment's row back in token order. Batch-1 decode uses GEMVs instead.
//
// CPU reference: the MoE part of layer_forward in csrc/cpu/forward.c.
#include <mma.h>
#include "common.cuh"

using namespace nvcuda;

// MXFP4 for the GEMVs (fp32 sums): the FP4 code (low nibble first) times
// 2^(scale-127)
__device__ __forceinline__ float e8m0(uint8_t e) {
  return e ? __uint_as_float((uint32_t)e << 23) : __uint_as_float(0x00400000u);
}

// Eight FP4 codes (one 32-bit word, value i in nibble i) as four half2,
// h[k] = (value k, value k + 4) * 2^-14: each code's sign and e2m1 bits go
// straight into an fp16 whose exponent bias is 15 instead of 1, which is
// exact (the code 0.5 lands on an fp16 subnormal) and costs about one and a
// half integer operations per value. A table in constant memory would
// serialise, since the lanes of a warp look up different codes.
__device__ __forceinline__ void fp4x8(uint32_t w, __half2 h[4]) {
  uint32_t r0 = ((w << 9) & 0x0E000E00u) | ((w << 12) & 0x80008000u);
  uint32_t r1 = ((w << 5) & 0x0E000E00u) | ((w << 8) & 0x80008000u);
  uint32_t r2 = ((w << 1) & 0x0E000E00u) | ((w << 4) & 0x80008000u);
  uint32_t r3 = ((w >> 3) & 0x0E000E00u) | (w & 0x80008000u);
  h[0] = *reinterpret_cast<__half2 *>(&r0);
  h[1] = *reinterpret_cast<__half2 *>(&r1);
  h[2] = *reinterpret_cast<__half2 *>(&r2);
  h[3] = *reinterpret_cast<__half2 *>(&r3);
}

#define FP4_UNBIAS 16384.f   // 2^14, what fp4x8 leaves out

// {====================================================== sorting
__global__ void moe_count_kernel(const int32_t *sel, int n, int lo, int hi, int32_t *counts) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && sel[i] >= lo && sel[i] < hi) atomicAdd(&counts[sel[i]], 1);
}

__global__ void moe_scan_kernel(const int32_t *counts, int E, int32_t *offsets, int32_t *tile_offsets, int32_t *cursor) {
  if (threadIdx.x != 0) return;
  int o = 0, to = 0;
  for (int e = 0; e < E; e++) {
    offsets[e] = o;
    tile_offsets[e] = to;
    cursor[e] = 0;
    o += counts[e];
    to += (counts[e] + 63) / 64;
  }
  offsets[E] = o;
  tile_offsets[E] = to;
}

__global__ void moe_scatter_kernel(const int32_t *sel, int n, int lo, int hi, const int32_t *offsets, int32_t *cursor, int32_t *perm) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && sel[i] >= lo && sel[i] < hi) {
    int e = sel[i];
    perm[offsets[e] + atomicAdd(&cursor[e], 1)] = i;   // order within an expert does not change any result
  }
}

void launch_moe_sort(const int32_t *sel, int T, int E, int K, int lo, int hi, moe_work *w, cudaStream_t s) {
  int n = T * K;
  cudaMemsetAsync(w->counts, 0, sizeof(int32_t) * E, s);
  moe_count_kernel<<<(n + 255) / 256, 256, 0, s>>>(sel, n, lo, hi, w->counts);
  moe_scan_kernel<<<1, 32, 0, s>>>(w->counts, E, w->offsets, w->tile_offsets, w->cursor);
  moe_scatter_kernel<<<(n + 255) / 256, 256, 0, s>>>(sel, n, lo, hi, w->offsets, w->cursor, w->perm);
}
// }======================================================

// {====================================================== grouped GEMM
#define BM 64
#define BN 64
#define BK 32
#define LDS (BK + 8)      // bf16 row stride in shared memory (WMMA wants a multiple of 8)
#define LDC (BN + 4)

// MODE 0: gate_up. A rows are tokens (xn[perm/K], bf16, with xn_lo when
//         split); out act[row][N/2] = SwiGLU(pairs), fp32.
// MODE 1: down. A rows are act (fp32) in expert order, split into bf16 hi +
//         lo on load when split; out y[perm][N] fp32, bias added.
// With split, each tile runs two MMAs, hi and lo, into one fp32 accumulator:
// the weights are exact in bf16, so the product has ~16-bit activations.
// Two shared-memory stages: step g+1's operands travel from global memory
// into registers while the tensor cores work on step g.
template <int MODE, bool SPLIT>
struct moe_stage {
  bf16 A[BM * LDS];
  bf16 Al[SPLIT ? BM * LDS : 8];
  bf16 B[BN * LDS];
};

template <int MODE, bool SPLIT>
__global__ void __launch_bounds__(128)
moe_gemm_kernel(const bf16 *A, const bf16 *A_lo, const float *Af, const int32_t *perm, const int32_t *offsets,
                const int32_t *tile_offsets, int E, int K, const uint8_t *blocks, const uint8_t *scales, const bf16 *bias,
                int N, int Kd, float limit, const float *delta, float *act, float *y) {
  typedef moe_stage<MODE, SPLIT> stage;
  constexpr size_t STAGES = 2 * sizeof(stage), CB = sizeof(float) * BM * LDC;
  __shared__ __align__(128) unsigned char raw[STAGES > CB ? STAGES : CB];
  stage *sg = reinterpret_cast<stage *>(raw);
  float *Cs = reinterpret_cast<float *>(raw);      // after the main loop
  __shared__ int rows_tok[BM];
  int mt = blockIdx.x, nt = blockIdx.y;
  if (mt >= tile_offsets[E]) return;
  int e = 0;
  while (tile_offsets[e + 1] <= mt) e++;
  int row0 = offsets[e] + (mt - tile_offsets[e]) * BM;
  int nrows = offsets[e + 1] - row0;
  if (nrows > BM) nrows = BM;
  int n0 = nt * BN;
  int tid = threadIdx.x, warp = tid >> 5;
  for (int r = tid; r < BM; r += 128) {
    int a = r < nrows ? perm[row0 + r] : -1;
    rows_tok[r] = MODE == 0 ? (a >= 0 ? a / K : -1) : (a >= 0 ? row0 + r : -1);
  }
  __syncthreads();
  int G = Kd / 32;
  // each thread stages half a row (16 values) of A and of B per step
  int r = tid >> 1, half = tid & 1;
  int src = rows_tok[r];
  const uint8_t *brow = blocks + ((size_t)e * N + n0 + r) * G * 16 + half * 8;
  const uint8_t *srow = scales + ((size_t)e * N + n0 + r) * G;
  uint4 a_hi[2], a_lo[2];
  float4 a_f[4];
  uint2 b_raw;
  uint8_t b_sc;
  auto fetch = [&](int g) {
    if (MODE == 0) {
      a_hi[0] = a_hi[1] = a_lo[0] = a_lo[1] = make_uint4(0, 0, 0, 0);
      if (src >= 0) {
        const uint4 *p = reinterpret_cast<const uint4 *>(A + (size_t)src * Kd + g * 32 + half * 16);
        a_hi[0] = p[0]; a_hi[1] = p[1];
        if (SPLIT) {
          const uint4 *q = reinterpret_cast<const uint4 *>(A_lo + (size_t)src * Kd + g * 32 + half * 16);
          a_lo[0] = q[0]; a_lo[1] = q[1];
        }
      }
    } else {
#pragma unroll
      for (int q = 0; q < 4; q++) a_f[q] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (src >= 0) {
        const float4 *p = reinterpret_cast<const float4 *>(Af + (size_t)src * Kd + g * 32 + half * 16);
#pragma unroll
        for (int q = 0; q < 4; q++) a_f[q] = p[q];
      }
    }
    b_raw = __ldg(reinterpret_cast<const uint2 *>(brow + (size_t)g * 16));
    b_sc = __ldg(srow + g);
  };
  auto store = [&](stage &S) {
    uint4 *da = reinterpret_cast<uint4 *>(S.A + r * LDS + half * 16);
    if (MODE == 0) {
      da[0] = a_hi[0]; da[1] = a_hi[1];
      if (SPLIT) { uint4 *dl = reinterpret_cast<uint4 *>(S.Al + r * LDS + half * 16); dl[0] = a_lo[0]; dl[1] = a_lo[1]; }
    } else {
      float v[16];
#pragma unroll
      for (int q = 0; q < 4; q++) { v[4 * q] = a_f[q].x; v[4 * q + 1] = a_f[q].y; v[4 * q + 2] = a_f[q].z; v[4 * q + 3] = a_f[q].w; }
      uint32_t hi[8], lo[8];
#pragma unroll
      for (int i = 0; i < 8; i++) hi[i] = split_pair(v[2 * i], v[2 * i + 1], SPLIT ? &lo[i] : NULL);
      da[0] = make_uint4(hi[0], hi[1], hi[2], hi[3]); da[1] = make_uint4(hi[4], hi[5], hi[6], hi[7]);
      if (SPLIT) {
        uint4 *dl = reinterpret_cast<uint4 *>(S.Al + r * LDS + half * 16);
        dl[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]); dl[1] = make_uint4(lo[4], lo[5], lo[6], lo[7]);
      }
    }
    uint4 *db = reinterpret_cast<uint4 *>(S.B + r * LDS + half * 16);
    db[0] = b_sc > 128 ? fp4x8_bf16<true>(b_raw.x, b_sc) : fp4x8_bf16<false>(b_raw.x, b_sc);
    db[1] = b_sc > 128 ? fp4x8_bf16<true>(b_raw.y, b_sc) : fp4x8_bf16<false>(b_raw.y, b_sc);
  };
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
  for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::fill_fragment(c[i][j], 0.f);
  int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  fetch(0);
  store(sg[0]);
  __syncthreads();
  for (int g = 0; g < G; g++) {
    if (g + 1 < G) fetch(g + 1);
    const stage &S = sg[g & 1];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb[2];
      for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], S.B + (wn + 16 * j) * LDS + kk, LDS);
      for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], S.A + (wm + 16 * i) * LDS + kk, LDS);
      for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
      if (SPLIT) {
        for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], S.Al + (wm + 16 * i) * LDS + kk, LDS);
        for (int i = 0; i < 2; i++)
          for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
      }
    }
    if (g + 1 < G) store(sg[(g + 1) & 1]);
    __syncthreads();
  }
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 2; j++)
      wmma::store_matrix_sync(Cs + (wm + 16 * i) * LDC + wn + 16 * j, c[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  const bf16 *eb_bias = bias + (size_t)e * N;
  if (MODE == 0) {
    int I = N / 2;
    for (int i = tid; i < BM * (BN / 2); i += 128) {
      int r = i / (BN / 2), j = i % (BN / 2);
      if (r >= nrows) continue;
      int n = n0 + 2 * j;
      float gt = Cs[r * LDC + 2 * j] + __bfloat162float(eb_bias[n]);
      float up = Cs[r * LDC + 2 * j + 1] + __bfloat162float(eb_bias[n + 1]);
      if (delta) { gt += delta[(size_t)(row0 + r) * N + n]; up += delta[(size_t)(row0 + r) * N + n + 1]; }
      act[(size_t)(row0 + r) * I + n / 2] = swiglu(gt, up, limit);
    }
  } else {
    for (int i = tid; i < BM * BN; i += 128) {
      int r = i / BN, j = i % BN;
      if (r >= nrows) continue;
      int a = perm[row0 + r];
      y[(size_t)a * N + n0 + j] = Cs[r * LDC + j] + __bfloat162float(eb_bias[n0 + j]);
    }
  }
}

void launch_moe_gate_up(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, int T, const dlayer *l, const dims *d,
                        const float *delta, float *act, cudaStream_t s) {
  int n = T * d->K;
  dim3 grid((n + BM - 1) / BM + d->E, (2 * d->I) / BN);
  if (xn_lo)
    moe_gemm_kernel<0, true><<<grid, 128, 0, s>>>(xn, xn_lo, NULL, w->perm, w->offsets, w->tile_offsets, d->E, d->K, l->gu_blocks,
                                                  l->gu_scales, l->gu_bias, 2 * d->I, d->H, d->limit, delta, act, NULL);
  else
    moe_gemm_kernel<0, false><<<grid, 128, 0, s>>>(xn, NULL, NULL, w->perm, w->offsets, w->tile_offsets, d->E, d->K, l->gu_blocks,
                                                   l->gu_scales, l->gu_bias, 2 * d->I, d->H, d->limit, delta, act, NULL);
}

void launch_moe_down(const float *act, int split, const moe_work *w, int T, const dlayer *l, const dims *d, float *y, cudaStream_t s) {
  int n = T * d->K;
  dim3 grid((n + BM - 1) / BM + d->E, d->H / BN);
  if (split)
    moe_gemm_kernel<1, true><<<grid, 128, 0, s>>>(NULL, NULL, act, w->perm, w->offsets, w->tile_offsets, d->E, d->K, l->dn_blocks,
                                                  l->dn_scales, l->dn_bias, d->H, d->I, d->limit, NULL, NULL, y);
  else
    moe_gemm_kernel<1, false><<<grid, 128, 0, s>>>(NULL, NULL, act, w->perm, w->offsets, w->tile_offsets, d->E, d->K, l->dn_blocks,
                                                   l->dn_scales, l->dn_bias, d->H, d->I, d->limit, NULL, NULL, y);
}

// {====================================================== prefill on wgmma
// On Hopper the two products run in mxfp4_gemm.cu's grouped kernel (wgmma,
// MXFP4 decoded while staged, 128 x 192 tiles; the same kernel as
// training's), which reads its rows in expert order: so the inputs are
// gathered into that order first and the outputs scattered back after. The
// moe_gemm_kernel above stays the path of the GPUs before Hopper and of
// GPTOSS_MOE_GEMM=wmma. Rows past offsets[E] (another rank's experts) are
// left alone.

// sorted row r = token perm[r] / K's input row, hi and (if lo) lo, 16 bytes at a time
__global__ void gather_sorted_kernel(const bf16 *xn, const bf16 *xn_lo, const int32_t *perm, const int32_t *offsets, int E,
                                     int K, int H, bf16 *hi, bf16 *lo) {
  int r = blockIdx.x;
  if (r >= offsets[E]) return;
  size_t src = (size_t)(perm[r] / K) * H, dst = (size_t)r * H;
  for (int i = threadIdx.x; i < H / 8; i += blockDim.x) {
    reinterpret_cast<uint4 *>(hi + dst)[i] = reinterpret_cast<const uint4 *>(xn + src)[i];
    if (lo) reinterpret_cast<uint4 *>(lo + dst)[i] = reinterpret_cast<const uint4 *>(xn_lo + src)[i];
  }
}

// act = SwiGLU(gu (+ delta)) over the sorted rows, as moe_gemm_kernel's epilogue
__global__ void swiglu_sorted_kernel(const float *gu, const float *delta, const int32_t *offsets, int E, int I, float limit,
                                     float *act) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)offsets[E] * I) return;
  float gt = gu[2 * i], up = gu[2 * i + 1];
  if (delta) { gt += delta[2 * i]; up += delta[2 * i + 1]; }
  act[i] = swiglu(gt, up, limit);
}

// y's row of assignment perm[r] = sorted row r of ys
__global__ void unsort_rows_kernel(const float *ys, const int32_t *perm, const int32_t *offsets, int E, int H, float *y) {
  int r = blockIdx.x;
  if (r >= offsets[E]) return;
  const float4 *src = reinterpret_cast<const float4 *>(ys + (size_t)r * H);
  float4 *dst = reinterpret_cast<float4 *>(y + (size_t)perm[r] * H);
  for (int i = threadIdx.x; i < H / 4; i += blockDim.x) dst[i] = src[i];
}

cudaError_t launch_moe_gate_up_wgmma(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, int T, const dlayer *l, const dims *d,
                                     const float *delta, bf16 *hi, bf16 *lo, float *gu, float *act, cudaStream_t s) {
  int n = T * d->K;
  if (d->H % 8) return cudaErrorInvalidValue;
  gather_sorted_kernel<<<n, 128, 0, s>>>(xn, xn_lo, w->perm, w->offsets, d->E, d->K, d->H, hi, xn_lo ? lo : NULL);
  cudaError_t e = launch_mxfp4_gemm(hi, xn_lo ? lo : NULL, w, n, d->E, l->gu_blocks, l->gu_scales, 2 * d->I, d->H, false,
                                    l->gu_bias, gu, 2 * d->I, s);
  if (e != cudaSuccess) return e;
  size_t m = (size_t)n * d->I;
  swiglu_sorted_kernel<<<(unsigned)((m + 255) / 256), 256, 0, s>>>(gu, delta, w->offsets, d->E, d->I, d->limit, act);
  return cudaGetLastError();
}

cudaError_t launch_moe_down_wgmma(const float *act, const moe_work *w, int T, const dlayer *l, const dims *d, bf16 *hi, bf16 *lo,
                                  float *ys, float *y, cudaStream_t s) {
  int n = T * d->K;
  if (d->H % 4) return cudaErrorInvalidValue;
  launch_split(act, n, d->I, d->I, hi, lo, s);
  cudaError_t e = launch_mxfp4_gemm(hi, lo, w, n, d->E, l->dn_blocks, l->dn_scales, d->H, d->I, false, l->dn_bias, ys, d->H, s);
  if (e != cudaSuccess) return e;
  unsort_rows_kernel<<<n, 128, 0, s>>>(ys, w->perm, w->offsets, d->E, d->H, y);
  return cudaGetLastError();
}
// }======================================================

// x[t] += sum_k w[t][k] * y[t*K + k]
__global__ void moe_combine_kernel(float *x, const float *y, const float *w, int H, int K, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  size_t t = i / H, c = i % H;
  float s = 0.f;
  for (int k = 0; k < K; k++) s += w[t * K + k] * y[(t * K + k) * H + c];
  x[i] += s;
}

void launch_moe_combine(float *x, const float *y, const float *w, int T, int H, int K, cudaStream_t s) {
  size_t n = (size_t)T * H;
  moe_combine_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(x, y, w, H, K, n);
}
// }======================================================

// {====================================================== decode GEMVs
// Four lanes share one 32-value block (4 bytes = 8 values each), so a warp
// reads 8 consecutive blocks (128 bytes) per step, coalesced, and the
// activations it needs are consecutive in shared memory. Steps go four at a
// time with their loads issued together: batch-1 decode is bound by how
// many bytes are in flight, not by arithmetic.
#define DSTEP 4

// the 8 values of one FP4 word as (value k, value k + 4) pairs, times 2^-14 (fp4x8's scaling)
__device__ __forceinline__ void fp4x8_f(uint32_t b, float2 f[4]) {
  __half2 h[4];
  fp4x8(b, h);
#pragma unroll
  for (int k = 0; k < 4; k++) f[k] = __half22float2(h[k]);
}

// their dot with x[0..7]
__device__ __forceinline__ float dot8_f(const float2 *f, const float *x) {
  float4 a = *reinterpret_cast<const float4 *>(x), c = *reinterpret_cast<const float4 *>(x + 4);
  return f[0].x * a.x + f[1].x * a.y + f[2].x * a.z + f[3].x * a.w + f[0].y * c.x + f[1].y * c.y + f[2].y * c.z + f[3].y * c.w;
}

// partial dot of 8 values: returns sum_i v_i x_i * 2^-14
__device__ __forceinline__ float dot_fp4x8(uint32_t b, const float *x) {
  float2 f[4];
  fp4x8_f(b, f);
  return dot8_f(f, x);
}

// NS steps of R rows' FP4 words and scales for this lane (blocks g0, g0 + 8,
// ...), issued together; past the row's G blocks they read as zero
template <int R, int NS>
__device__ __forceinline__ void fp4_load(const uint8_t *const *rows, const uint8_t *const *srows, int g0, int G, int sub,
                                         uint32_t (&w)[R][NS], uint8_t (&sc)[R][NS]) {
#pragma unroll
  for (int u = 0; u < NS; u++) {
    int g = g0 + 8 * u;
#pragma unroll
    for (int i = 0; i < R; i++) {
      w[i][u] = g < G ? __ldg(reinterpret_cast<const uint32_t *>(rows[i] + (size_t)g * 16) + sub) : 0u;
      sc[i][u] = g < G ? __ldg(srows[i] + g) : (uint8_t)0;
    }
  }
}

// acc[r] += scale * (the word's 8 values . x_r) for the m (<= SM_MT) rows x_r = x + r * stride
#define SM_MT 8
__device__ __forceinline__ void fp4_dot_rows(uint32_t w, uint8_t sc, const float *x, int stride, int m, float *acc) {
  float2 f[4];
  fp4x8_f(w, f);
  float s = e8m0(sc);
#pragma unroll
  for (int r = 0; r < SM_MT; r++) {
    if (r >= m) break;
    acc[r] += s * dot8_f(f, x + r * stride);
  }
}

// R rows' dots with x (shared memory), this lane's share; rows[i] points at
// a row's G blocks, srows[i] at its G scales
template <int R>
__device__ __forceinline__ void fp4_rows_dot(const uint8_t *const *rows, const uint8_t *const *srows, int G, const float *x,
                                             int lane, float *acc) {
  int sub = lane & 3, bi = lane >> 2;
#pragma unroll
  for (int i = 0; i < R; i++) acc[i] = 0.f;
  for (int g0 = bi; g0 < G; g0 += 8 * DSTEP) {
    uint32_t w[R][DSTEP];
    uint8_t sc[R][DSTEP];
    fp4_load<R, DSTEP>(rows, srows, g0, G, sub, w, sc);
#pragma unroll
    for (int u = 0; u < DSTEP; u++) {
      int g = g0 + 8 * u;
      if (g < G) {
#pragma unroll
        for (int i = 0; i < R; i++) acc[i] += e8m0(sc[i][u]) * dot_fp4x8(w[i][u], x + g * 32 + sub * 8);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < R; i++) acc[i] *= FP4_UNBIAS;
}


#define GU_WARPS 16

// grid (K, I / GU_WARPS): warp j of block y handles gate row 2j and up row 2j+1
__global__ void __launch_bounds__(GU_WARPS * 32)
moe_gate_up_decode_kernel(const float *xn, const int32_t *sel, dlayer l, dims d, const float *delta, float *act) {
  extern __shared__ __align__(16) float xs[];
  pdl_trigger();   // decode launches these with launch_pdl (common.cuh)
  pdl_wait();
  for (int i = threadIdx.x; i < d.H / 4; i += blockDim.x)
    reinterpret_cast<float4 *>(xs)[i] = reinterpret_cast<const float4 *>(xn)[i];
  __syncthreads();
  int k = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int j = blockIdx.y * GU_WARPS + warp;
  if (j >= d.I) return;
  int e = sel[k], G = d.H / 32;
  size_t rg = (size_t)e * 2 * d.I + 2 * j;
  const uint8_t *rows[2] = {l.gu_blocks + rg * G * 16, l.gu_blocks + (rg + 1) * G * 16};
  const uint8_t *srows[2] = {l.gu_scales + rg * G, l.gu_scales + (rg + 1) * G};
  float acc[2];
  fp4_rows_dot<2>(rows, srows, G, xs, lane, acc);
  float g = warp_sum(acc[0]), u = warp_sum(acc[1]);
  if (lane == 0) {
    g += __bfloat162float(l.gu_bias[rg]);
    u += __bfloat162float(l.gu_bias[rg + 1]);
    if (delta) { g += delta[(size_t)k * 2 * d.I + 2 * j]; u += delta[(size_t)k * 2 * d.I + 2 * j + 1]; }
    act[(size_t)k * d.I + j] = swiglu(g, u, d.limit);
  }
}

void launch_moe_gate_up_decode(const float *xn, const int32_t *sel, const dlayer *l, const dims *d, const float *delta, float *act,
                               cudaStream_t s) {
  dim3 grid(d->K, (d->I + GU_WARPS - 1) / GU_WARPS);
  launch_pdl(moe_gate_up_decode_kernel, grid, dim3(GU_WARPS * 32), sizeof(float) * d->H, s, xn, sel, *l, *d, delta, act);
}

#define DN_WARPS 8

// one warp per output row r: x[r] += sum_k w_k (W2[e_k][r] . act_k + b2[e_k][r]),
// the K experts' loads issued together
__global__ void __launch_bounds__(DN_WARPS * 32)
moe_down_decode_kernel(const float *act, const int32_t *sel, const float *w, dlayer l, dims d, float *x) {
  extern __shared__ __align__(16) float as[];
  pdl_trigger();   // decode launches these with launch_pdl (common.cuh)
  pdl_wait();
  for (int i = threadIdx.x; i < d.K * d.I / 4; i += blockDim.x)
    reinterpret_cast<float4 *>(as)[i] = reinterpret_cast<const float4 *>(act)[i];
  __syncthreads();
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int r = blockIdx.x * DN_WARPS + warp;
  if (r >= d.H) return;
  int G = d.I / 32;
  float total = 0.f;
  for (int k0 = 0; k0 < d.K; k0 += 4) {
    const uint8_t *rows[4], *srows[4];
    size_t row[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      int k = k0 + i < d.K ? k0 + i : k0;
      row[i] = (size_t)sel[k] * d.H + r;
      rows[i] = l.dn_blocks + row[i] * G * 16;
      srows[i] = l.dn_scales + row[i] * G;
    }
    float acc[4];
    // four experts share one pass over x, so each reads its own slice of act
    int sub = lane & 3, bi = lane >> 2;
#pragma unroll
    for (int i = 0; i < 4; i++) acc[i] = 0.f;
    for (int g0 = bi; g0 < G; g0 += 8 * 2) {
      uint32_t wv[4][2];
      uint8_t sc[4][2];
      fp4_load<4, 2>(rows, srows, g0, G, sub, wv, sc);
#pragma unroll
      for (int u = 0; u < 2; u++) {
        int g = g0 + 8 * u;
        if (g < G) {
#pragma unroll
          for (int i = 0; i < 4; i++)
            acc[i] += e8m0(sc[i][u]) * dot_fp4x8(wv[i][u], as + (size_t)(k0 + i < d.K ? k0 + i : k0) * d.I + g * 32 + sub * 8);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
      if (k0 + i >= d.K) break;
      float v = warp_sum(acc[i] * FP4_UNBIAS);
      total += w[k0 + i] * (v + __bfloat162float(l.dn_bias[row[i]]));
    }
  }
  if (lane == 0) x[r] += total;
}

void launch_moe_down_decode(const float *act, const int32_t *sel, const float *w, const dlayer *l, const dims *d, float *x,
                            cudaStream_t s) {
  size_t smem = sizeof(float) * (size_t)d->K * d->I;
  if (smem > 48 * 1024) cudaFuncSetAttribute(moe_down_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  launch_pdl(moe_down_decode_kernel, dim3((d->H + DN_WARPS - 1) / DN_WARPS), dim3(DN_WARPS * 32), smem, s, act, sel, w, *l, *d, x);
}
// }======================================================

// {====================================================== small-M expert GEMVs
// Batched decode of a few sessions gives each expert a row or two: the
// grouped GEMM's 64-row tiles would be nearly all padding, so these kernels
// read each expert's weights once, like the decode GEMVs, and apply them to
// its rows SM_MT at a time from shared memory. On CUDA cores every weight
// costs a shared-memory read and an FMA per row, so past ~2 rows per expert
// the tensor-core GEMM wins (bench/NOTES.md): the backend switches there.

// grid (E, I / GU_WARPS): warp j of block y computes gate row 2j and up row
// 2j+1 of expert blockIdx.x for all its rows; act in expert order, as the
// grouped GEMM writes it
__global__ void __launch_bounds__(GU_WARPS * 32)
moe_gate_up_small_kernel(const bf16 *xn, const bf16 *xn_lo, const int32_t *perm, const int32_t *offsets, int K, dlayer l,
                         dims d, const float *delta, float *act) {
  extern __shared__ __align__(16) float xs[];   // [SM_MT][H]
  int e = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int r0 = offsets[e], n = offsets[e + 1] - r0;
  if (n == 0) return;
  int G = d.H / 32, sub = lane & 3, bi = lane >> 2;
  for (int c0 = 0; c0 < n; c0 += SM_MT) {
    int m = n - c0 < SM_MT ? n - c0 : SM_MT;
    __syncthreads();                              // the previous chunk's readers are done
    for (int i = threadIdx.x; i < m * d.H; i += blockDim.x) {
      int r = i / d.H, c = i % d.H;
      size_t t = (size_t)(perm[r0 + c0 + r] / K) * d.H + c;
      xs[r * d.H + c] = __bfloat162float(xn[t]) + (xn_lo ? __bfloat162float(xn_lo[t]) : 0.f);
    }
    __syncthreads();
    for (int j = blockIdx.y * GU_WARPS + warp; j < d.I; j += gridDim.y * GU_WARPS) {
    size_t rg = (size_t)e * 2 * d.I + 2 * j;
    const uint8_t *rows[2] = {l.gu_blocks + rg * G * 16, l.gu_blocks + (rg + 1) * G * 16};
    const uint8_t *srows[2] = {l.gu_scales + rg * G, l.gu_scales + (rg + 1) * G};
    float acc[2][SM_MT];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
      for (int r = 0; r < SM_MT; r++) acc[i][r] = 0.f;
    for (int g0 = bi; g0 < G; g0 += 8 * DSTEP) {
      uint32_t w[2][DSTEP];
      uint8_t sc[2][DSTEP];
      fp4_load<2, DSTEP>(rows, srows, g0, G, sub, w, sc);
#pragma unroll
      for (int u = 0; u < DSTEP; u++) {
        int g = g0 + 8 * u;
        if (g >= G) continue;
#pragma unroll
        for (int i = 0; i < 2; i++) fp4_dot_rows(w[i][u], sc[i][u], xs + g * 32 + sub * 8, d.H, m, acc[i]);
      }
    }
#pragma unroll
    for (int r = 0; r < SM_MT; r++) {
      if (r >= m) break;
      float g = warp_sum(acc[0][r]) * FP4_UNBIAS, u = warp_sum(acc[1][r]) * FP4_UNBIAS;
      if (delta) {
        const float *dr = delta + (size_t)(r0 + c0 + r) * 2 * d.I + 2 * j;
        g += dr[0]; u += dr[1];
      }
      if (lane == 0)
        act[(size_t)(r0 + c0 + r) * d.I + j] =
            swiglu(g + __bfloat162float(l.gu_bias[rg]), u + __bfloat162float(l.gu_bias[rg + 1]), d.limit);
    }
    }
  }
}

// grid (E, H / DN_WARPS): warp r of block y computes output feature r of
// expert blockIdx.x for all its rows; y indexed by assignment, bias added
__global__ void __launch_bounds__(DN_WARPS * 32)
moe_down_small_kernel(const float *act, const int32_t *perm, const int32_t *offsets, dlayer l, dims d, float *y) {
  extern __shared__ __align__(16) float as[];   // [SM_MT][I]
  int e = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int r0 = offsets[e], n = offsets[e + 1] - r0;
  if (n == 0) return;
  int G = d.I / 32, sub = lane & 3, bi = lane >> 2;
  for (int c0 = 0; c0 < n; c0 += SM_MT) {
    int m = n - c0 < SM_MT ? n - c0 : SM_MT;
    __syncthreads();
    for (int i = threadIdx.x; i < m * d.I / 4; i += blockDim.x)
      reinterpret_cast<float4 *>(as)[i] = reinterpret_cast<const float4 *>(act + (size_t)(r0 + c0) * d.I)[i];
    __syncthreads();
    for (int row = blockIdx.y * DN_WARPS + warp; row < d.H; row += gridDim.y * DN_WARPS) {
    size_t rr = (size_t)e * d.H + row;
    const uint8_t *wrow[1] = {l.dn_blocks + rr * G * 16}, *srow[1] = {l.dn_scales + rr * G};
    float acc[SM_MT];
#pragma unroll
    for (int r = 0; r < SM_MT; r++) acc[r] = 0.f;
    for (int g0 = bi; g0 < G; g0 += 8 * DSTEP) {
      uint32_t w[1][DSTEP];
      uint8_t sc[1][DSTEP];
      fp4_load<1, DSTEP>(wrow, srow, g0, G, sub, w, sc);
#pragma unroll
      for (int u = 0; u < DSTEP; u++) {
        int g = g0 + 8 * u;
        if (g < G) fp4_dot_rows(w[0][u], sc[0][u], as + g * 32 + sub * 8, d.I, m, acc);
      }
    }
#pragma unroll
    for (int r = 0; r < SM_MT; r++) {
      if (r >= m) break;
      float v = warp_sum(acc[r]) * FP4_UNBIAS;
      if (lane == 0) y[(size_t)perm[r0 + c0 + r] * d.H + row] = v + __bfloat162float(l.dn_bias[rr]);
    }
    }
  }
}

void launch_moe_gate_up_small(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, const dlayer *l, const dims *d,
                              const float *delta, float *act, cudaStream_t s) {
  size_t smem = sizeof(float) * SM_MT * (size_t)d->H;
  if (smem > 48 * 1024) cudaFuncSetAttribute(moe_gate_up_small_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  dim3 grid(d->E, (d->I + GU_WARPS - 1) / GU_WARPS);
  moe_gate_up_small_kernel<<<grid, GU_WARPS * 32, smem, s>>>(xn, xn_lo, w->perm, w->offsets, d->K, *l, *d, delta, act);
}

void launch_moe_down_small(const float *act, const moe_work *w, const dlayer *l, const dims *d, float *y, cudaStream_t s) {
  size_t smem = sizeof(float) * SM_MT * (size_t)d->I;
  if (smem > 48 * 1024) cudaFuncSetAttribute(moe_down_small_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  dim3 grid(d->E, (d->H + DN_WARPS - 1) / DN_WARPS);
  moe_down_small_kernel<<<grid, DN_WARPS * 32, smem, s>>>(act, w->perm, w->offsets, *l, *d, y);
}
// }======================================================
