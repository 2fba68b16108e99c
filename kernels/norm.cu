// norm.cu: RMSNorm, forward and backward.
//
// CPU reference: cpu_rmsnorm in csrc/cpu/kernels.c; csrc/cpu/train.c for
// the backward. Every norm sums in block_inv_rms's order (common.cuh). The
// decode GEMV and the router fuse the same norm into their own kernels
// (dense.cu).
#include "common.cuh"

// out[t] = w * x[rows[t]] / rms(x[rows[t]]), as bf16 (the GEMMs' input);
// lo, if given, receives what bf16 rounded off (split-bf16: hi + lo)
__global__ void rmsnorm_kernel(const float *x, const int *rows, const bf16 *w, bf16 *out, bf16 *lo, int H, float eps) {
  __shared__ float red[32];
  int t = blockIdx.x, r = rows ? rows[t] : t;
  const float *xr = x + (size_t)r * H;
  float inv = block_inv_rms(xr, H, eps, red);
  for (int i = threadIdx.x; i < H; i += blockDim.x)
    store_split(out, lo, (size_t)t * H + i, __bfloat162float(w[i]) * (xr[i] * inv));
}

void launch_rmsnorm(const float *x, const int *rows, int T, const bf16 *w, bf16 *out, bf16 *lo, int H, float eps,
                    cudaStream_t s) {
  rmsnorm_kernel<<<T, 256, 0, s>>>(x, rows, w, out, lo, H, eps);
}

// {====================================================== training (fp32 out)
// x[rows[i]] (rows NULL: x[i]) normalised: out[i] = w * x / rms(x); inv[i] = 1 / rms
__global__ void rms_fwd_kernel(const float *x, const int32_t *rows, const bf16 *w, float *out, float *inv, int H, float eps) {
  __shared__ float red[32];
  int i = blockIdx.x;
  const float *xr = x + (size_t)(rows ? rows[i] : i) * H;
  float r = block_inv_rms(xr, H, eps, red);
  for (int c = threadIdx.x; c < H; c += blockDim.x) out[(size_t)i * H + c] = __bfloat162float(w[c]) * (xr[c] * r);
  if (threadIdx.x == 0) inv[i] = r;
}

// dx[row] += w dy r - x (sum w dy x) r^3 / H, row = rows[i] (or i)
__global__ void rms_bwd_kernel(float *dx, const float *x, const int32_t *rows, const float *inv, const bf16 *w, const float *dy,
                               int H) {
  __shared__ float red[32];
  int i = blockIdx.x;
  size_t row = (size_t)(rows ? rows[i] : i) * H;
  const float *xr = x + row, *g = dy + (size_t)i * H;
  float s = 0.f;
  for (int c = threadIdx.x; c < H; c += blockDim.x) s += __bfloat162float(w[c]) * g[c] * xr[c];
  s = block_sum(s, red);
  float r = inv[i], k = s * r * r * r / (float)H;
  for (int c = threadIdx.x; c < H; c += blockDim.x) dx[row + c] += __bfloat162float(w[c]) * g[c] * r - xr[c] * k;
}

void launch_rmsnorm_f32(const float *x, const int32_t *rows, int T, const bf16 *w, float *out, float *inv, int H, float eps,
                        cudaStream_t s) {
  rms_fwd_kernel<<<T, 256, 0, s>>>(x, rows, w, out, inv, H, eps);
}

void launch_rmsnorm_bwd(float *dx, const float *x, const int32_t *rows, int T, const float *inv, const bf16 *w, const float *dy,
                        int H, cudaStream_t s) {
  rms_bwd_kernel<<<T, 256, 0, s>>>(dx, x, rows, inv, w, dy, H);
}
// }======================================================
