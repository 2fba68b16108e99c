// sampler.cu: sampling on the device, so that only the chosen id comes back.
//
// The same rules as csrc/sampler.c (the CPU reference): logit bias, then the
// repetition/presence/frequency penalties over the last penalty_window
// tokens; temperature 0 is greedy (ties to the lowest id). Temperature
// alone samples exactly from softmax(l/T) with the Gumbel-max trick
// (argmax of l/T + Gumbel noise), in one pass. top_k, top_p and min_p sort
// the logits once (CUB radix sort) and cut the candidates in that order.
// Random numbers are a pure function of (seed, counter, token id), never of
// a row's place in the batch: a request draws the same tokens alone as among
// others (the engine's determinism, issue 18).
#include <float.h>
#include <cub/cub.cuh>
#include "common.cuh"

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ double u01(uint64_t seed, uint64_t counter, uint64_t i) {
  uint64_t x = mix64(seed ^ mix64(counter * 0x632be59bd9b4e019ull + i));
  return (double)(x >> 11) * (1.0 / 9007199254740992.0);
}

// one block per row: penalties over the window (each distinct id once)
__global__ void penalties_kernel(float *logits, int V, const gpu_sampling *P, const int32_t *const *hist,
                                 const int32_t *hist_len, const int32_t *bias_ids, const float *bias_vals) {
  int row = blockIdx.x;
  const gpu_sampling p = P[row];
  float *l = logits + (size_t)row * V;
  if (p.n_bias > 0 && bias_ids)   // this row's list, at its offset in the launch's
    for (int i = threadIdx.x; i < p.n_bias; i += blockDim.x) l[bias_ids[p.bias_off + i]] += bias_vals[p.bias_off + i];
  __syncthreads();
  if (!hist || (p.repetition_penalty == 1.f && p.presence_penalty == 0.f && p.frequency_penalty == 0.f)) return;
  int n = hist_len[row];
  int w = p.penalty_window > 0 && p.penalty_window < n ? p.penalty_window : n;
  const int32_t *h = hist[row] + (n - w);
  for (int i = threadIdx.x; i < w; i += blockDim.x) {
    int id = h[i];
    bool first = true;
    for (int j = 0; j < i && first; j++) first = h[j] != id;
    if (!first || id < 0 || id >= V) continue;
    int count = 0;
    for (int j = 0; j < w; j++) count += h[j] == id;
    float v = l[id];
    if (p.repetition_penalty != 1.f) v = v > 0.f ? v / p.repetition_penalty : v * p.repetition_penalty;
    v -= p.presence_penalty + p.frequency_penalty * (float)count;
    l[id] = v;
  }
}

// argmax of score(i) over a row; gumbel != 0 adds Gumbel noise to l/T first
#define AB 256
__global__ void argmax_kernel(const float *logits, int V, const gpu_sampling *P, int gumbel, float *pv, int32_t *pi, int chunks) {
  __shared__ float sv[AB];
  __shared__ int si[AB];
  int row = blockIdx.y;
  const float *l = logits + (size_t)row * V;
  gpu_sampling p = P[row];
  float bv = -FLT_MAX;
  int bi = 0x7fffffff;
  int per = (V + chunks - 1) / chunks;
  int lo = blockIdx.x * per, hi = lo + per < V ? lo + per : V;
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    float v = l[i];
    if (gumbel && p.temperature > 0.f) {
      double u = u01(p.seed, p.counter, (uint64_t)i);
      v = v / p.temperature - (float)log(-log(u + 1e-300));
    }
    if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
  }
  sv[threadIdx.x] = bv;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (int s = AB / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      float ov = sv[threadIdx.x + s];
      int oi = si[threadIdx.x + s];
      if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) { sv[threadIdx.x] = ov; si[threadIdx.x] = oi; }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) { pv[row * chunks + blockIdx.x] = sv[0]; pi[row * chunks + blockIdx.x] = si[0]; }
}

__global__ void argmax_final_kernel(const float *pv, const int32_t *pi, int chunks, int32_t *out) {
  int row = blockIdx.x;
  if (threadIdx.x != 0) return;
  float bv = -FLT_MAX;
  int bi = 0;
  for (int c = 0; c < chunks; c++) {
    float v = pv[row * chunks + c];
    int i = pi[row * chunks + c];
    if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
  }
  out[row] = bi;
}

__global__ void iota_kernel(int32_t *idx, int V) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < V) idx[i] = i;
}

// One block over the sorted logits of one row, as csrc/sampler.c does it:
// the top_k candidates, softmax(l/T) renormalised over them, the smallest
// prefix whose mass reaches top_p, those at least min_p times the top one,
// then one draw in what is kept. Every pass is a block-wide reduction or
// scan, so no thread walks the vocabulary alone.
#define SB 1024
__device__ float block_total(float v, float *red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < SB / 32; w++) t += red[w];
  return t;
}

// first index i < n (in chunks) whose inclusive prefix of weight(i) exceeds
// `target` (strictly when strict, else reaches it); n when none
template <typename F>
__device__ int first_prefix_over(int n, float target, bool strict, F weight, void *scan_storage, float *carry, int *found) {
  typedef cub::BlockScan<float, SB> Scan;
  typename Scan::TempStorage &scan = *reinterpret_cast<typename Scan::TempStorage *>(scan_storage);
  if (threadIdx.x == 0) { *carry = 0.f; *found = n; }
  __syncthreads();
  for (int base = 0; base < n; base += SB) {
    int i = base + threadIdx.x;
    float w = i < n ? weight(i) : 0.f, incl;
    Scan(scan).InclusiveSum(w, incl);
    incl += *carry;
    if (i < n && (strict ? incl > target : incl >= target)) atomicMin(found, i);
    __syncthreads();
    if (threadIdx.x == SB - 1) *carry = incl;
    __syncthreads();
    if (*found < n) break;
  }
  return *found;
}

__global__ void __launch_bounds__(SB)
sorted_pick_kernel(const float *sorted, const int32_t *idx, int V, const gpu_sampling *P, int32_t *out) {
  __shared__ typename cub::BlockScan<float, SB>::TempStorage scan;
  __shared__ float red[SB / 32], carry;
  __shared__ int found, s_minp;
  gpu_sampling p = *P;
  float mx = sorted[0], invT = 1.f / p.temperature;
  // a +inf logit (a logit_bias of +inf) is certain: the draw is among those
  // alone, equally likely, as csrc/sampler.c has it (inf - inf would be NaN)
  bool certain = isinf(mx) && mx > 0.f;
  auto weight = [&](int i) { return certain ? (sorted[i] == mx ? 1.f : 0.f) : __expf((sorted[i] - mx) * invT); };
  int keep = p.top_k > 0 && p.top_k < V ? p.top_k : V;
  float part = 0.f;
  for (int i = threadIdx.x; i < keep; i += SB) part += weight(i);
  float total = block_total(part, red);
  if (p.min_p > 0.f) {
    // weights fall along the sorted order: the first one under min_p * top
    if (threadIdx.x == 0) s_minp = keep;
    __syncthreads();
    for (int i = threadIdx.x; i < keep; i += SB) if (weight(i) < p.min_p) atomicMin(&s_minp, i);
    __syncthreads();
    keep = s_minp;
  }
  if (p.top_p < 1.f) {
    int n = first_prefix_over(keep, p.top_p * total, false, weight, &scan, &carry, &found);
    if (n + 1 < keep) keep = n + 1;
  }
  if (keep < 1) keep = 1;
  part = 0.f;
  for (int i = threadIdx.x; i < keep; i += SB) part += weight(i);
  float kept = block_total(part, red);
  float u = (float)(u01(p.seed, p.counter, 0) * kept);
  int pick = first_prefix_over(keep, u, true, weight, &scan, &carry, &found);
  if (threadIdx.x == 0) out[0] = idx[pick < keep ? pick : keep - 1];
}

size_t sampler_cub_bytes(int V) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairsDescending(NULL, bytes, (const float *)NULL, (float *)NULL, (const int32_t *)NULL,
                                            (int32_t *)NULL, V);
  return bytes;
}

void launch_sample(float *logits, int rows, int V, const gpu_sampling *params_dev, const gpu_sampling *params_host,
                   const int32_t *const *hist, const int32_t *hist_len, sampler_work *w, int32_t *out, cudaStream_t s,
                   float *scratch) {
  bool adjust = false;
  for (int r = 0; r < rows; r++) {
    const gpu_sampling *p = &params_host[r];
    adjust |= p->n_bias > 0 || p->repetition_penalty != 1.f || p->presence_penalty != 0.f || p->frequency_penalty != 0.f;
  }
  if (adjust) {
    if (scratch) {
      cudaMemcpyAsync(scratch, logits, sizeof(float) * (size_t)rows * V, cudaMemcpyDeviceToDevice, s);
      logits = scratch;
    }
    penalties_kernel<<<rows, 256, 0, s>>>(logits, V, params_dev, hist, hist_len, w->bias_ids, w->bias_vals);
  }
  // rows with the same kind share launches; the kind is the host's choice
  bool all_argmax = true;
  for (int r = 0; r < rows; r++) {
    const gpu_sampling *p = &params_host[r];
    bool sorted = p->temperature > 0.f && (p->top_k > 0 || p->top_p < 1.f || p->min_p > 0.f);
    if (sorted) all_argmax = false;
  }
  const int chunks = 64;
  if (all_argmax) {
    // greedy and Gumbel-max rows: one argmax launch for all of them
    bool any_gumbel = false;
    for (int r = 0; r < rows; r++) any_gumbel |= params_host[r].temperature > 0.f;
    dim3 grid(chunks, rows);
    argmax_kernel<<<grid, AB, 0, s>>>(logits, V, params_dev, any_gumbel ? 1 : 0, w->partial_f, w->partial_i, chunks);
    argmax_final_kernel<<<rows, 32, 0, s>>>(w->partial_f, w->partial_i, chunks, out);
    return;
  }
  for (int r = 0; r < rows; r++) {
    const gpu_sampling *p = &params_host[r];
    float *row = logits + (size_t)r * V;
    bool sorted = p->temperature > 0.f && (p->top_k > 0 || p->top_p < 1.f || p->min_p > 0.f);
    if (!sorted) {
      dim3 grid(chunks, 1);
      argmax_kernel<<<grid, AB, 0, s>>>(row, V, params_dev + r, p->temperature > 0.f, w->partial_f, w->partial_i, chunks);
      argmax_final_kernel<<<1, 32, 0, s>>>(w->partial_f, w->partial_i, chunks, out + r);
      continue;
    }
    iota_kernel<<<(V + 255) / 256, 256, 0, s>>>(w->idx_in, V);
    size_t bytes = w->cub_bytes;
    cub::DeviceRadixSort::SortPairsDescending(w->cub_temp, bytes, row, w->keys_out, w->idx_in, w->idx_out, V, 0,
                                              sizeof(float) * 8, s);
    sorted_pick_kernel<<<1, SB, 0, s>>>(w->keys_out, w->idx_out, V, params_dev + r, out + r);
  }
}
