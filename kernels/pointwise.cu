// pointwise.cu: the elementwise ops: bias and residual adds, fp32 to
// (split) bf16, clamped SwiGLU forward and backward, cross-entropy, LoRA
// dropout.
//
// CPU references: csrc/cpu/kernels.c (cpu_swiglu), csrc/cpu/train.c (the
// backward, the loss, the dropout masks).
#include "common.cuh"

__global__ void add_bias_residual_kernel(float *x, const float *y, const bf16 *bias, int H, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += y[i] + (bias ? __bfloat162float(bias[i % H]) : 0.f);
}

void launch_add_bias_residual(float *x, const float *y, const bf16 *bias, int T, int H, cudaStream_t s) {
  size_t n = (size_t)T * H;
  add_bias_residual_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(x, y, bias, H, n);
}

__global__ void bf16_from_f32_kernel(const float *x, bf16 *y, bf16 *lo, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) store_split(y, lo, i, x[i]);
}

void launch_bf16_from_f32(const float *x, bf16 *y, bf16 *lo, size_t n, cudaStream_t s) {
  bf16_from_f32_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(x, y, lo, n);
}

// y[t][n] += bias[n] (row stride ld)
__global__ void bias_kernel(float *y, int ld, const bf16 *bias, int N, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i / N * ld + i % N] += __bfloat162float(bias[i % N]);
}

// rows x cols (row stride ld) into contiguous bf16 hi (+ lo: split bf16):
// a block per row, four columns a thread where the rows are whole float4s
__global__ void split_kernel(const float *x, int ld, int cols, bf16 *hi, bf16 *lo) {
  size_t r = blockIdx.x;
  const float *xr = x + r * ld;
  bf16 *h = hi + r * cols, *l = lo ? lo + r * cols : NULL;
  if ((cols & 3) || (ld & 3)) {
    for (int c = threadIdx.x; c < cols; c += blockDim.x) store_split(h, l, c, xr[c]);
    return;
  }
  for (int c = 4 * threadIdx.x; c < cols; c += 4 * blockDim.x) {
    float4 v = *reinterpret_cast<const float4 *>(xr + c);
    uint2 lv;
    *reinterpret_cast<uint2 *>(h + c) = make_uint2(split_pair(v.x, v.y, l ? &lv.x : NULL), split_pair(v.z, v.w, l ? &lv.y : NULL));
    if (l) *reinterpret_cast<uint2 *>(l + c) = lv;
  }
}

void launch_add_bias(float *y, int ld, const bf16 *bias, int rows, int N, cudaStream_t s) {
  size_t n = (size_t)rows * N;
  if (n) bias_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(y, ld, bias, N, n);
}

void launch_split(const float *x, int rows, int ld, int cols, bf16 *hi, bf16 *lo, cudaStream_t s) {
  split_kernel<<<rows, 256, 0, s>>>(x, ld, cols, hi, lo);
}

// {====================================================== SwiGLU
// clamped SwiGLU over interleaved (gate, up), as cpu_swiglu
__global__ void swiglu_kernel(const float *gu, float *act, size_t n, float limit) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float g = fminf(gu[2 * i], limit), u = fmaxf(fminf(gu[2 * i + 1], limit), -limit);
  act[i] = g / (1.f + expf(-1.702f * g)) * (u + 1.f);
}

// its backward, in place: gu (the pre-activations) becomes d gu, for d act
// = w_k ud (the routing weight of sorted row i / I times the unweighted
// gradient). A clamp passes the gradient where its input is inside [min, max].
__global__ void swiglu_bwd_kernel(float *gu, const float *ud, const float *w, const int32_t *perm, int I, size_t n, float limit) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gt = gu[2 * i], up = gu[2 * i + 1], g = ud[i] * w[perm[i / I]];
  float gc = fminf(gt, limit), uc = fmaxf(fminf(up, limit), -limit);
  float sg = 1.f / (1.f + expf(-1.702f * gc));
  gu[2 * i + 1] = up >= -limit && up <= limit ? g * gc * sg : 0.f;
  gu[2 * i] = gt <= limit ? g * (uc + 1.f) * (sg + gc * 1.702f * sg * (1.f - sg)) : 0.f;
}

void launch_swiglu(const float *gu, float *act, size_t n, float limit, cudaStream_t s) {
  swiglu_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(gu, act, n, limit);
}

void launch_swiglu_bwd(float *gu, const float *ud, const float *w, const int32_t *perm, int I, size_t n, float limit,
                       cudaStream_t s) {
  swiglu_bwd_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(gu, ud, w, perm, I, n, limit);
}
// }======================================================

// {====================================================== cross-entropy
// Cross-entropy of R rows of logits: loss[i] = lse - z[y]; the row becomes
// softmax - onehot (the gradient of the summed loss)
__global__ void xent_kernel(float *z, int V, const int32_t *target, float *loss) {
  __shared__ float red[32];
  int i = blockIdx.x;
  float *row = z + (size_t)i * V;
  float mx = -INFINITY;
  for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, row[v]);
  mx = block_max(mx, red);
  float s = 0.f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(row[v] - mx);
  s = block_sum(s, red);
  int y = target[i];
  float zy = row[y];
  __syncthreads();
  for (int v = threadIdx.x; v < V; v += blockDim.x) row[v] = expf(row[v] - mx) / s - (v == y ? 1.f : 0.f);
  if (threadIdx.x == 0) loss[i] = mx + logf(s) - zy;
}

void launch_xent(float *z, int rows, int V, const int32_t *target, float *loss, cudaStream_t s) {
  xent_kernel<<<rows, 1024, 0, s>>>(z, V, target, loss);
}
// }======================================================

// {====================================================== dropout
// add 0: out = x * keep (contiguous); add 1: out (row stride ld) += x * keep
__global__ void dropout_kernel(const float *x, int ldx, float *out, int ldo, int n, size_t total, drop_args d, int add) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  int t = (int)(i / n), c = (int)(i % n);
  float v = x[(size_t)t * ldx + c] * gptoss_lora_keep(d.key, d.layer, d.mod, t, c, d.p);
  if (add) out[(size_t)t * ldo + c] += v;
  else out[(size_t)t * ldo + c] = v;
}

void launch_dropout(const float *x, int ldx, float *out, int ldo, int n, size_t total, drop_args d, int add, cudaStream_t s) {
  dropout_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(x, ldx, out, ldo, n, total, d, add);
}
// }======================================================
