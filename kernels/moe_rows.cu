// moe_rows.cu: LoRA training's MoE rows: the router's top-k, the sorted
// (token, expert) rows gathered from and scattered back to the tokens, the
// weighted combine, and the routing weights' backward.
//
// CPU reference: csrc/cpu/train.c. The sort itself is moe.cu's.
#include "common.cuh"

// one warp per token: the router's top-k and softmax, as the inference path
__global__ void topk_kernel(const float *rl, int T, int E, int K, int32_t *sel, float *w) {
  int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (t < T) warp_topk(rl + (size_t)t * E, E, K, sel + (size_t)t * K, w + (size_t)t * K);
}

__global__ void invperm_kernel(const int32_t *perm, int32_t *invp, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) invp[perm[i]] = i;
}

// xg[i] = xn[token of sorted row i]
__global__ void gather_kernel(const float *xn, const int32_t *perm, int K, int H, float *xg) {
  int i = blockIdx.x;
  const float *src = xn + (size_t)(perm[i] / K) * H;
  for (int c = threadIdx.x; c < H; c += blockDim.x) xg[(size_t)i * H + c] = src[c];
}

// out[t] = xmid[t] + sum_k w[t][k] ye[row of (t, k)]
__global__ void combine_kernel(float *out, const float *xmid, const float *ye, const float *w, const int32_t *invp, int H, int K) {
  int t = blockIdx.x;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = xmid[(size_t)t * H + c];
    for (int k = 0; k < K; k++) v += w[t * K + k] * ye[(size_t)invp[t * K + k] * H + c];
    out[(size_t)t * H + c] = v;
  }
}

// One block per token, dy = d out: the routing weights' gradients dw_k =
// dy . ye_k, through the softmax over the k chosen logits into the router's
// input (dxn = sum_k w_k (dw_k - sum_j w_j dw_j) W_router[e_k]). The
// recompute leaves out the down product ye_k = W_e act_k + b_e + (LoRA),
// so dy . ye_k comes as ud_k . act_k + dy . b_e, where ud_k = W_e^T dy +
// (LoRA) is the backward's own product taken on unweighted rows (the
// LoRA's term is ud's: (A^T dh) . act = dh . (A act)).
__global__ void route_bwd_kernel(const float *dy, const float *ud, const float *act, const bf16 *bias, const float *w,
                                 const int32_t *sel, const int32_t *invp, const bf16 *Wr, float *dxn, int H, int I, int K) {
  __shared__ float red[32], dw[32];
  int t = blockIdx.x;
  const float *g = dy + (size_t)t * H;
  for (int k = 0; k < K; k++) {
    size_t row = invp[t * K + k];
    const float *u = ud + row * I, *a = act + row * I;
    const bf16 *b = bias ? bias + (size_t)sel[t * K + k] * H : NULL;
    float s = 0.f;
    for (int c = threadIdx.x; c < I; c += blockDim.x) s += u[c] * a[c];
    if (b)
      for (int c = threadIdx.x; c < H; c += blockDim.x) s += g[c] * __bfloat162float(b[c]);
    s = block_sum(s, red);
    if (threadIdx.x == 0) dw[k] = s;
  }
  __syncthreads();
  float wdw = 0.f;
  for (int k = 0; k < K; k++) wdw += w[t * K + k] * dw[k];
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = 0.f;
    for (int k = 0; k < K; k++) v += w[t * K + k] * (dw[k] - wdw) * __bfloat162float(Wr[(size_t)sel[t * K + k] * H + c]);
    dxn[(size_t)t * H + c] = v;
  }
}

// x[i][c] *= w[(token, expert) of sorted row i], rows of n: the routing
// weights on rank-r rows of an expert LoRA's backward, computed unweighted
__global__ void scale_rows_kernel(float *x, int n, const float *w, const int32_t *perm, size_t total) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < total) x[i] *= w[perm[i / n]];
}

// dxn[t] += sum_k dxg[row of (t, k)]
__global__ void scatter_kernel(float *dxn, const float *dxg, const int32_t *invp, int H, int K) {
  int t = blockIdx.x;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = 0.f;
    for (int k = 0; k < K; k++) v += dxg[(size_t)invp[t * K + k] * H + c];
    dxn[(size_t)t * H + c] += v;
  }
}

void launch_topk(const float *rl, int T, int E, int K, int32_t *sel, float *w, cudaStream_t s) {
  topk_kernel<<<(T + 7) / 8, 256, 0, s>>>(rl, T, E, K, sel, w);
}

void launch_invperm(const int32_t *perm, int32_t *invp, int n, cudaStream_t s) {
  invperm_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(perm, invp, n);
}

void launch_gather_rows(const float *xn, const int32_t *perm, int n, int K, int H, float *xg, cudaStream_t s) {
  gather_kernel<<<n, 256, 0, s>>>(xn, perm, K, H, xg);
}

void launch_combine_rows(float *out, const float *xmid, const float *ye, const float *w, const int32_t *invp, int T, int H, int K,
                         cudaStream_t s) {
  combine_kernel<<<T, 256, 0, s>>>(out, xmid, ye, w, invp, H, K);
}

void launch_route_bwd(const float *dy, const float *ud, const float *act, const bf16 *bias, const float *w, const int32_t *sel,
                      const int32_t *invp, const bf16 *Wr, float *dxn, int T, int H, int I, int K, cudaStream_t s) {
  route_bwd_kernel<<<T, 256, 0, s>>>(dy, ud, act, bias, w, sel, invp, Wr, dxn, H, I, K);
}

void launch_scale_rows(float *x, int n, const float *w, const int32_t *perm, size_t total, cudaStream_t s) {
  scale_rows_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(x, n, w, perm, total);
}

void launch_scatter_rows(float *dxn, const float *dxg, const int32_t *invp, int T, int H, int K, cudaStream_t s) {
  scatter_kernel<<<T, 256, 0, s>>>(dxn, dxg, invp, H, K);
}
