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

__constant__ float FP4[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

__device__ __forceinline__ float e8m0(uint8_t e) {
  return e ? __uint_as_float((uint32_t)e << 23) : __uint_as_float(0x00400000u);
}

__device__ __forceinline__ float swiglu(float g, float u, float limit) {
  g = fminf(g, limit);
  u = fminf(fmaxf(u, -limit), limit);
  float glu = g / (1.f + __expf(-1.702f * g));
  return (u + 1.f) * glu;
}

// {====================================================== sorting
__global__ void moe_count_kernel(const int32_t *sel, int n, int32_t *counts) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(&counts[sel[i]], 1);
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

__global__ void moe_scatter_kernel(const int32_t *sel, int n, const int32_t *offsets, int32_t *cursor, int32_t *perm) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    int e = sel[i];
    perm[offsets[e] + atomicAdd(&cursor[e], 1)] = i;   // order within an expert does not change any result
  }
}

void launch_moe_sort(const int32_t *sel, int T, int E, int K, moe_work *w, cudaStream_t s) {
  int n = T * K;
  cudaMemsetAsync(w->counts, 0, sizeof(int32_t) * E, s);
  moe_count_kernel<<<(n + 255) / 256, 256, 0, s>>>(sel, n, w->counts);
  moe_scan_kernel<<<1, 32, 0, s>>>(w->counts, E, w->offsets, w->tile_offsets, w->cursor);
  moe_scatter_kernel<<<(n + 255) / 256, 256, 0, s>>>(sel, n, w->offsets, w->cursor, w->perm);
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
template <int MODE, bool SPLIT>
__global__ void __launch_bounds__(128)
moe_gemm_kernel(const bf16 *A, const bf16 *A_lo, const float *Af, const int32_t *perm, const int32_t *offsets,
                const int32_t *tile_offsets, int E, int K, const uint8_t *blocks, const uint8_t *scales, const bf16 *bias,
                int N, int Kd, float limit, float *act, float *y) {
  __shared__ __align__(32) bf16 As[BM * LDS];
  __shared__ __align__(32) bf16 Al[SPLIT ? BM * LDS : 16];
  __shared__ __align__(32) bf16 Bs[BN * LDS];
  __shared__ __align__(32) float Cs[BM * LDC];
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
  const uint8_t *eb = blocks + (size_t)e * N * G * 16;
  const uint8_t *es = scales + (size_t)e * N * G;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
  for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::fill_fragment(c[i][j], 0.f);
  int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  for (int g = 0; g < G; g++) {
    // A: 64 rows x 32 values; two threads per row, 16 values each
    {
      int r = tid >> 1, half = tid & 1;
      int src = rows_tok[r];
      if (MODE == 0) {
        uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0, l0 = v0, l1 = v0;
        if (src >= 0) {
          const uint4 *p = reinterpret_cast<const uint4 *>(A + (size_t)src * Kd + g * 32 + half * 16);
          v0 = p[0]; v1 = p[1];
          if (SPLIT) {
            const uint4 *q = reinterpret_cast<const uint4 *>(A_lo + (size_t)src * Kd + g * 32 + half * 16);
            l0 = q[0]; l1 = q[1];
          }
        }
        uint4 *d = reinterpret_cast<uint4 *>(As + r * LDS + half * 16);
        d[0] = v0; d[1] = v1;
        if (SPLIT) { uint4 *dl = reinterpret_cast<uint4 *>(Al + r * LDS + half * 16); dl[0] = l0; dl[1] = l1; }
      } else {
        bf16 *d = As + r * LDS + half * 16, *dl = SPLIT ? Al + r * LDS + half * 16 : NULL;
        const float4 *p = src >= 0 ? reinterpret_cast<const float4 *>(Af + (size_t)src * Kd + g * 32 + half * 16) : NULL;
        for (int q = 0; q < 4; q++) {
          float4 v = p ? p[q] : make_float4(0.f, 0.f, 0.f, 0.f);
          float vv[4] = {v.x, v.y, v.z, v.w};
          for (int u = 0; u < 4; u++) {
            bf16 h = __float2bfloat16(vv[u]);
            d[4 * q + u] = h;
            if (SPLIT) dl[4 * q + u] = __float2bfloat16(vv[u] - __bfloat162float(h));
          }
        }
      }
    }
    // B: 64 output rows; two threads per row decode 8 bytes (16 values) each
    {
      int r = tid >> 1, half = tid & 1;
      int n = n0 + r;
      const uint8_t *b = eb + ((size_t)n * G + g) * 16 + half * 8;
      float sc = e8m0(es[(size_t)n * G + g]);
      uint2 raw = *reinterpret_cast<const uint2 *>(b);
      const uint8_t *bb = reinterpret_cast<const uint8_t *>(&raw);
      bf16 *d = Bs + r * LDS + half * 16;
      for (int j = 0; j < 8; j++) {
        d[2 * j] = __float2bfloat16(FP4[bb[j] & 15] * sc);
        d[2 * j + 1] = __float2bfloat16(FP4[bb[j] >> 4] * sc);
      }
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb[2];
      for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], Bs + (wn + 16 * j) * LDS + kk, LDS);
      for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], As + (wm + 16 * i) * LDS + kk, LDS);
      for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
      if (SPLIT) {
        for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], Al + (wm + 16 * i) * LDS + kk, LDS);
        for (int i = 0; i < 2; i++)
          for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
      }
    }
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

void launch_moe_gate_up(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, int T, const dlayer *l, const dims *d, float *act,
                        cudaStream_t s) {
  int n = T * d->K;
  dim3 grid((n + BM - 1) / BM + d->E, (2 * d->I) / BN);
  if (xn_lo)
    moe_gemm_kernel<0, true><<<grid, 128, 0, s>>>(xn, xn_lo, NULL, w->perm, w->offsets, w->tile_offsets, d->E, d->K, l->gu_blocks,
                                                  l->gu_scales, l->gu_bias, 2 * d->I, d->H, d->limit, act, NULL);
  else
    moe_gemm_kernel<0, false><<<grid, 128, 0, s>>>(xn, NULL, NULL, w->perm, w->offsets, w->tile_offsets, d->E, d->K, l->gu_blocks,
                                                   l->gu_scales, l->gu_bias, 2 * d->I, d->H, d->limit, act, NULL);
}

void launch_moe_down(const float *act, int split, const moe_work *w, int T, const dlayer *l, const dims *d, float *y, cudaStream_t s) {
  int n = T * d->K;
  dim3 grid((n + BM - 1) / BM + d->E, d->H / BN);
  if (split)
    moe_gemm_kernel<1, true><<<grid, 128, 0, s>>>(NULL, NULL, act, w->perm, w->offsets, w->tile_offsets, d->E, d->K, l->dn_blocks,
                                                  l->dn_scales, l->dn_bias, d->H, d->I, d->limit, NULL, y);
  else
    moe_gemm_kernel<1, false><<<grid, 128, 0, s>>>(NULL, NULL, act, w->perm, w->offsets, w->tile_offsets, d->E, d->K, l->dn_blocks,
                                                   l->dn_scales, l->dn_bias, d->H, d->I, d->limit, NULL, y);
}

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
// activations it needs are consecutive in shared memory.
#define DW 8   // warps per block

__device__ __forceinline__ float dot_fp4x8(uint32_t b, float sc, const float *x) {
  float4 a = *reinterpret_cast<const float4 *>(x), c = *reinterpret_cast<const float4 *>(x + 4);
  return sc * (FP4[b & 15] * a.x + FP4[(b >> 4) & 15] * a.y + FP4[(b >> 8) & 15] * a.z + FP4[(b >> 12) & 15] * a.w +
               FP4[(b >> 16) & 15] * c.x + FP4[(b >> 20) & 15] * c.y + FP4[(b >> 24) & 15] * c.z + FP4[b >> 28] * c.w);
}

// dot of MXFP4 row (G blocks) with x (in shared memory)
__device__ __forceinline__ float fp4_row_dot(const uint8_t *blocks, const uint8_t *scales, int G, const float *x, int lane) {
  int sub = lane & 3, bi = lane >> 2;
  float acc = 0.f;
  for (int g = bi; g < G; g += 8) {
    uint32_t b = __ldg(reinterpret_cast<const uint32_t *>(blocks + (size_t)g * 16) + sub);
    acc += dot_fp4x8(b, e8m0(__ldg(scales + g)), x + g * 32 + sub * 8);
  }
  return acc;
}

__device__ __forceinline__ float warp_sum_m(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid (K, I / DW): warp j of block y handles gate row 2j and up row 2j+1
__global__ void __launch_bounds__(DW * 32)
moe_gate_up_decode_kernel(const float *xn, const int32_t *sel, dlayer l, dims d, float *act) {
  extern __shared__ __align__(16) float xs[];
  for (int i = threadIdx.x; i < d.H; i += blockDim.x) xs[i] = xn[i];
  __syncthreads();
  int k = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int j = blockIdx.y * DW + warp;
  if (j >= d.I) return;
  int e = sel[k], G = d.H / 32;
  size_t rg = (size_t)e * 2 * d.I + 2 * j, ru = rg + 1;
  float g = fp4_row_dot(l.gu_blocks + rg * G * 16, l.gu_scales + rg * G, G, xs, lane);
  float u = fp4_row_dot(l.gu_blocks + ru * G * 16, l.gu_scales + ru * G, G, xs, lane);
  g = warp_sum_m(g);
  u = warp_sum_m(u);
  if (lane == 0) {
    g += __bfloat162float(l.gu_bias[rg]);
    u += __bfloat162float(l.gu_bias[ru]);
    act[(size_t)k * d.I + j] = swiglu(g, u, d.limit);
  }
}

void launch_moe_gate_up_decode(const float *xn, const int32_t *sel, const dlayer *l, const dims *d, float *act, cudaStream_t s) {
  dim3 grid(d->K, (d->I + DW - 1) / DW);
  moe_gate_up_decode_kernel<<<grid, DW * 32, sizeof(float) * d->H, s>>>(xn, sel, *l, *d, act);
}

// one warp per output row r: x[r] += sum_k w_k (W2[e_k][r] . act_k + b2[e_k][r])
__global__ void __launch_bounds__(DW * 32)
moe_down_decode_kernel(const float *act, const int32_t *sel, const float *w, dlayer l, dims d, float *x) {
  extern __shared__ __align__(16) float as[];
  for (int i = threadIdx.x; i < d.K * d.I; i += blockDim.x) as[i] = act[i];
  __syncthreads();
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int r = blockIdx.x * DW + warp;
  if (r >= d.H) return;
  int G = d.I / 32;
  float total = 0.f;
  for (int k = 0; k < d.K; k++) {
    int e = sel[k];
    size_t row = (size_t)e * d.H + r;
    float v = warp_sum_m(fp4_row_dot(l.dn_blocks + row * G * 16, l.dn_scales + row * G, G, as + (size_t)k * d.I, lane));
    total += w[k] * (v + __bfloat162float(l.dn_bias[row]));
  }
  if (lane == 0) x[r] += total;
}

void launch_moe_down_decode(const float *act, const int32_t *sel, const float *w, const dlayer *l, const dims *d, float *x,
                            cudaStream_t s) {
  size_t smem = sizeof(float) * (size_t)d->K * d->I;
  if (smem > 48 * 1024) cudaFuncSetAttribute(moe_down_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  moe_down_decode_kernel<<<(d->H + DW - 1) / DW, DW * 32, smem, s>>>(act, sel, w, *l, *d, x);
}
// }======================================================
