// dense.cu: embedding, the bf16 GEMV of batch-1 decode (with the RMSNorm
// of its input fused in) and the router (RMSNorm, logits, top-k, softmax).
//
// CPU references: csrc/cpu/kernels.c (cpu_rmsnorm, cpu_matmul_bf16) and
// cpu_route() in csrc/cpu/kernels.c.
#include "common.cuh"

// The table may be in host memory the GPU reads across PCIe (backend.cu):
// where rows are whole 16-byte pieces, each thread takes one piece at a
// time, so a row is a few round trips rather than one per element.
__global__ void embed_kernel(const int32_t *__restrict__ ids, const bf16 *__restrict__ embed, float *__restrict__ x, int H) {
  int t = blockIdx.x;
  const bf16 *row = embed + (size_t)ids[t] * H;
  float *out = x + (size_t)t * H;
  if (H % 8) {
    for (int i = threadIdx.x; i < H; i += blockDim.x) out[i] = __bfloat162float(row[i]);
    return;
  }
  for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
    uint4 u = reinterpret_cast<const uint4 *>(row)[c];
    const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&u);
    float2 a = __bfloat1622float2(p[0]), b = __bfloat1622float2(p[1]), e = __bfloat1622float2(p[2]), f = __bfloat1622float2(p[3]);
    reinterpret_cast<float4 *>(out)[2 * c] = make_float4(a.x, a.y, b.x, b.y);
    reinterpret_cast<float4 *>(out)[2 * c + 1] = make_float4(e.x, e.y, f.x, f.y);
  }
}

void launch_embed(const int32_t *ids, int T, const bf16 *embed, float *x, int H, cudaStream_t s) {
  embed_kernel<<<T, 256, 0, s>>>(ids, embed, x, H);
}

// {====================================================== decode GEMV
// One warp per row, rows strided over a persistent grid so the fused norm
// is computed once per block. Each lane reads 16 bytes (8 bf16) per step,
// and two rows are in flight per warp to keep enough loads outstanding.
#define GEMV_WARPS 8
#define GEMV_UNROLL 4

__device__ __forceinline__ float dot8(uint4 w, const float *x) {
  const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&w);
  float4 a = *reinterpret_cast<const float4 *>(x), b = *reinterpret_cast<const float4 *>(x + 4);
  float2 w0 = __bfloat1622float2(p[0]), w1 = __bfloat1622float2(p[1]);
  float2 w2 = __bfloat1622float2(p[2]), w3 = __bfloat1622float2(p[3]);
  return w0.x * a.x + w0.y * a.y + w1.x * a.z + w1.y * a.w + w2.x * b.x + w2.y * b.y + w3.x * b.z + w3.y * b.w;
}

__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_bf16_kernel(const float *x, const bf16 *norm_w, float eps, const bf16 *W, const bf16 *bias, float *out,
                 int rows, int cols, float *residual) {
  extern __shared__ __align__(16) float xs[];
  __shared__ float red[32];
  pdl_trigger();   // decode launches this with launch_pdl (common.cuh)
  {
    // the weights need no earlier result: each warp's first two rows head
    // for L2 while the kernel before this one finishes; where the whole
    // matrix fits in about half of L2 (qkv, o: 30 and 24 MB on the 20B),
    // not lm_head's 1.16 GB, whose first rows alone would be twice L2
    int r0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * 2;
    if ((threadIdx.x & 31) == 0 && r0 < rows && (size_t)rows * cols * sizeof(bf16) <= ((size_t)32 << 20))
      prefetch_l2(W + (size_t)r0 * cols, (uint32_t)((rows - r0 < 2 ? rows - r0 : 2) * cols * sizeof(bf16)));
  }
  pdl_wait();
  float inv = norm_w ? block_inv_rms(x, cols, eps, red) : 1.f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) xs[i] = norm_w ? __bfloat162float(norm_w[i]) * (x[i] * inv) : x[i];
  __syncthreads();
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int chunks = cols / 8;                         // 16-byte chunks per row
  int nwarps = gridDim.x * GEMV_WARPS;
  for (int r0 = (blockIdx.x * GEMV_WARPS + warp) * 2; r0 < rows; r0 += nwarps * 2) {
    int r1 = r0 + 1 < rows ? r0 + 1 : r0;
    const uint4 *w0 = reinterpret_cast<const uint4 *>(W + (size_t)r0 * cols);
    const uint4 *w1 = reinterpret_cast<const uint4 *>(W + (size_t)r1 * cols);
    float a0 = 0.f, a1 = 0.f;
    // GEMV_UNROLL chunks of each row in flight per lane: batch-1 decode is
    // bound by the round trips, not by the bytes
    for (int c0 = lane; c0 < chunks; c0 += 32 * GEMV_UNROLL) {
      uint4 p[GEMV_UNROLL], q[GEMV_UNROLL];
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; u++) {
        int c = c0 + 32 * u;
        if (c < chunks) { p[u] = __ldg(w0 + c); q[u] = __ldg(w1 + c); }
      }
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; u++) {
        int c = c0 + 32 * u;
        if (c < chunks) { a0 += dot8(p[u], xs + 8 * c); a1 += dot8(q[u], xs + 8 * c); }
      }
    }
    a0 = warp_sum(a0);
    a1 = warp_sum(a1);
    if (lane == 0) {
      float v0 = a0 + (bias ? __bfloat162float(bias[r0]) : 0.f);
      if (residual) residual[r0] += v0; else out[r0] = v0;
      if (r1 != r0) {
        float v1 = a1 + (bias ? __bfloat162float(bias[r1]) : 0.f);
        if (residual) residual[r1] += v1; else out[r1] = v1;
      }
    }
  }
}

void launch_gemv_bf16(const float *x, const bf16 *norm_w, float eps, const bf16 *W, const bf16 *bias, float *out,
                      int rows, int cols, float *residual, cudaStream_t s) {
  static int sms = 0;
  if (!sms) { int dev; cudaGetDevice(&dev); cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev); }
  int need = (rows + GEMV_WARPS * 2 - 1) / (GEMV_WARPS * 2);
  int blocks = need < sms * 8 ? need : sms * 8;
  size_t smem = sizeof(float) * (size_t)cols;
  if (smem > 48 * 1024) cudaFuncSetAttribute(gemv_bf16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  launch_pdl(gemv_bf16_kernel, dim3(blocks), dim3(GEMV_WARPS * 32), smem, s, x, norm_w, eps, W, bias, out, rows, cols, residual);
}
// }======================================================

// {====================================================== batch-invariant products
// cuBLAS picks its kernel (tile, split-K) by the number of rows, so one
// token's product can round differently in batches of 1 and of 16. Here
// every dot product is summed in the same order whatever T is: each lane
// takes the 16-byte chunks lane, lane + 32, ... in turn, then the warp sums
// its lanes. A warp computes one weight row for ROWS_TOK tokens of the
// block's group, so the weights are read once per group (from L2 mostly).
#define ROWS_WARPS 8
#define ROWS_TOK 4

__global__ void __launch_bounds__(ROWS_WARPS * 32)
gemm_rows_kernel(const bf16 *W, const bf16 *X, const bf16 *X_lo, float *Y, int rows, int T, int cols) {
  extern __shared__ __align__(16) float xt[];   // [ROWS_TOK][cols]
  int t0 = blockIdx.y * ROWS_TOK, nt = T - t0 < ROWS_TOK ? T - t0 : ROWS_TOK;
  for (int i = threadIdx.x; i < nt * cols; i += blockDim.x) {
    size_t at = (size_t)t0 * cols + i;
    xt[i] = __bfloat162float(X[at]) + (X_lo ? __bfloat162float(X_lo[at]) : 0.f);
  }
  __syncthreads();
  int lane = threadIdx.x & 31, r = blockIdx.x * ROWS_WARPS + (threadIdx.x >> 5);
  if (r >= rows) return;
  const uint4 *w = reinterpret_cast<const uint4 *>(W + (size_t)r * cols);
  float acc[ROWS_TOK];
#pragma unroll
  for (int j = 0; j < ROWS_TOK; j++) acc[j] = 0.f;
  for (int c = lane; c < cols / 8; c += 32) {
    uint4 p = __ldg(w + c);
#pragma unroll
    for (int j = 0; j < ROWS_TOK; j++)
      if (j < nt) acc[j] += dot8(p, xt + (size_t)j * cols + 8 * c);
  }
#pragma unroll
  for (int j = 0; j < ROWS_TOK; j++) {
    float v = warp_sum(acc[j]);
    if (lane == 0 && j < nt) Y[(size_t)(t0 + j) * rows + r] = v;
  }
}

void launch_gemm_rows(const bf16 *W, const bf16 *X, const bf16 *X_lo, float *Y, int rows, int T, int cols, cudaStream_t s) {
  size_t smem = sizeof(float) * ROWS_TOK * (size_t)cols;
  if (smem > 48 * 1024) cudaFuncSetAttribute(gemm_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  dim3 grid((rows + ROWS_WARPS - 1) / ROWS_WARPS, (T + ROWS_TOK - 1) / ROWS_TOK);
  gemm_rows_kernel<<<grid, ROWS_WARPS * 32, smem, s>>>(W, X, X_lo, Y, rows, T, cols);
}
// }======================================================

__global__ void __launch_bounds__(1024)
router_kernel(const float *x, const bf16 *norm_w, float eps, const bf16 *W, const bf16 *bias, int H, int E, int K,
              bf16 *xn, bf16 *xn_lo, float *xnf, int32_t *sel, float *w) {
  extern __shared__ __align__(16) float sm[];
  pdl_trigger();   // decode launches these with launch_pdl (common.cuh)
  pdl_wait();
  float *xs = sm, *logit = sm + H;
  __shared__ float red[32];
  int t = blockIdx.x;
  const float *xr = x + (size_t)t * H;
  float inv = block_inv_rms(xr, H, eps, red);
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float v = __bfloat162float(norm_w[i]) * (xr[i] * inv);
    xs[i] = v;
    if (xn) store_split(xn, xn_lo, (size_t)t * H + i, v);
    if (xnf) xnf[(size_t)t * H + i] = v;
  }
  __syncthreads();
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int e = warp; e < E; e += nw) {
    const uint4 *wr = reinterpret_cast<const uint4 *>(W + (size_t)e * H);
    float acc = 0.f;
#pragma unroll 4
    for (int c = lane; c < H / 8; c += 32) acc += dot8(__ldg(wr + c), xs + 8 * c);
    acc = warp_sum(acc);
    if (lane == 0) logit[e] = acc + __bfloat162float(bias[e]);
  }
  __syncthreads();
  if (warp == 0) warp_topk(logit, E, K, sel + (size_t)t * K, w + (size_t)t * K);
}

void launch_router(const float *x, int T, const bf16 *norm_w, float eps, const bf16 *W, const bf16 *bias, int H, int E, int K,
                   bf16 *xn, bf16 *xn_lo, float *xnf, int32_t *sel, float *w, cudaStream_t s) {
  size_t smem = sizeof(float) * (size_t)(H + E);
  if (smem > 48 * 1024) cudaFuncSetAttribute(router_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  // a warp per expert: batch-1 decode waits on this kernel's latency
  int threads = E * 32 < 1024 ? E * 32 : 1024;
  launch_pdl(router_kernel, dim3(T), dim3(threads), smem, s, x, norm_w, eps, W, bias, H, E, K, xn, xn_lo, xnf, sel, w);
}
