// dense_mma.cu: the general pass's dense products (qkv, o_proj, lm_head)
// when it holds a few tokens (batched decode: one a session), Y[T][out] =
// X W^T (+ X_lo W^T), W bf16 [out][in].
//
// cuBLAS takes such a product as a GEMM with a few dozen columns and tiles
// the weight rows 128 or so at a time: o_proj's 2,880 rows are ~23 tiles
// for 132 multiprocessors, and at 8 and 64 sessions o_proj took 125 and
// 62 µs a layer against a bandwidth floor of 8 (bench/NOTES.md, "64
// sessions"). Here, as in moe_mma.cu, the weights are mma.sync's 16-row
// operand and the tokens its 8 columns, and K is cut into up to SPLIT_MAX
// slices so that enough warps stream the weights: each slice's sums go to
// a partial buffer, added in slice order afterwards (the same result every
// run, unlike atomics). A lane holds columns 2t, 2t + 1, 2t + 8, 2t + 9 of
// a k16 step; K's order inside a step is free as long as both operands
// agree, so a lane's 16-byte load of 8 consecutive weights of a row (and of
// a token's 8 inputs) serves two steps: values 0-3 the first, 4-7 the
// second.
//
// Reference: the double-precision product in kernels/test/kernels_test.cu.
#include "common.cuh"

namespace {
constexpr int WARPS = 4, ROWS_W = 32, NT = 4, SPLIT_MAX = 8;

// grid (ceil(out / (WARPS ROWS_W)), slices): a warp's 32 rows over its slice
// [blockIdx.y ks, + ks) of K, for all T tokens, 32 at a time; into P's
// slice blockIdx.y ([slices][T][out])
template <bool LO>
__global__ void __launch_bounds__(WARPS * 32)
dense_mma_kernel(const bf16 *__restrict__ W, const bf16 *__restrict__ X, const bf16 *__restrict__ X_lo, int out, int T, int in,
                 int ks, float *__restrict__ P) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int base = (blockIdx.x * WARPS + warp) * ROWS_W;
  if (base >= out) return;
  const int k0 = blockIdx.y * ks, k1 = min(in, k0 + ks);
  // rows g, g + 8 of m tile 0, then of m tile 1
  int wrow[4] = {base + g, base + g + 8, base + 16 + g, base + 24 + g};
  const bf16 *wr[4];
#pragma unroll
  for (int i = 0; i < 4; i++) wr[i] = wrow[i] < out ? W + (size_t)wrow[i] * in : NULL;
  float *Ps = P + (size_t)blockIdx.y * T * out;
  for (int c0 = 0; c0 < T; c0 += NT * 8) {
    const int tiles = min(NT, (T - c0 + 7) / 8);
    const bf16 *xr[NT], *xl[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) {
      int tok = c0 + 8 * j + g;
      bool ok = j < tiles && tok < T;
      xr[j] = ok ? X + (size_t)tok * in : NULL;
      xl[j] = ok && LO ? X_lo + (size_t)tok * in : NULL;
    }
    float acc[NT][2][4] = {};
    // a lane's 8 values of each row at k + 8t; the next 32 of K load while these are used
    uint4 wv[4], wn[4];
    auto load_w = [&](int k, uint4 *v) {
      int kk = k + 8 * t;
#pragma unroll
      for (int i = 0; i < 4; i++)
        v[i] = wr[i] && kk < k1 ? __ldg(reinterpret_cast<const uint4 *>(wr[i] + kk)) : make_uint4(0, 0, 0, 0);
    };
    if (k0 < k1) load_w(k0, wv);
    for (int k = k0; k < k1; k += 32) {
      if (k + 32 < k1) load_w(k + 32, wn);
      const int kk = k + 8 * t;
#pragma unroll
      for (int j = 0; j < NT; j++) {
        if (j >= tiles) continue;   // warp-uniform
        uint4 hi = make_uint4(0, 0, 0, 0), lo = make_uint4(0, 0, 0, 0);
        if (xr[j] && kk < k1) {
          hi = *reinterpret_cast<const uint4 *>(xr[j] + kk);
          if (LO) lo = *reinterpret_cast<const uint4 *>(xl[j] + kk);
        }
        // m tile mt: rows g, g + 8 are wv[2 mt], wv[2 mt + 1]
#pragma unroll
        for (int mt = 0; mt < 2; mt++) mma_k8x2<LO>(acc[j][mt], wv[2 * mt], wv[2 * mt + 1], hi, lo);
      }
      if (k + 32 < k1) {
#pragma unroll
        for (int i = 0; i < 4; i++) wv[i] = wn[i];
      }
    }
    // D: (row g, tokens 2t, 2t + 1) in [0], [1], row g + 8's in [2], [3]
#pragma unroll
    for (int j = 0; j < NT; j++) {
      if (j >= tiles) continue;
#pragma unroll
      for (int h = 0; h < 2; h++) {
        int tok = c0 + 8 * j + 2 * t + h;
        if (tok >= T) continue;
        float *pr = Ps + (size_t)tok * out;
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          if (wrow[2 * mt] < out) pr[wrow[2 * mt]] = acc[j][mt][h];
          if (wrow[2 * mt + 1] < out) pr[wrow[2 * mt + 1]] = acc[j][mt][2 + h];
        }
      }
    }
  }
}

// Y[i] = the slices' P[s][i] summed in slice order
__global__ void sum_slices_kernel(const float *__restrict__ P, int slices, size_t n, float *__restrict__ Y) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = P[i];
  for (int k = 1; k < slices; k++) s += P[(size_t)k * n + i];
  Y[i] = s;
}
}  // namespace

size_t dense_mma_part_floats(int T, int out) { return (size_t)SPLIT_MAX * T * out; }

cudaError_t launch_dense_mma(const bf16 *W, const bf16 *X, const bf16 *X_lo, float *Y, int out, int T, int in, float *part,
                             size_t part_floats, cudaStream_t s) {
  if (in % 8 || T <= 0 || out <= 0) return cudaErrorInvalidValue;
  const int row_blocks = (out + WARPS * ROWS_W - 1) / (WARPS * ROWS_W);
  // slices: enough warps to keep ~8 a multiprocessor streaming (about
  // 1,024 on an H100), each slice at least 128 of K, within the buffer
  int slices = (1024 + row_blocks * WARPS - 1) / (row_blocks * WARPS);
  if (slices > SPLIT_MAX) slices = SPLIT_MAX;
  if (slices > in / 128) slices = in / 128;
  if (slices < 1) slices = 1;
  while (slices > 1 && (size_t)slices * T * out > part_floats) slices--;
  int ks = (in + slices - 1) / slices;
  ks = (ks + 31) / 32 * 32;
  slices = (in + ks - 1) / ks;
  float *P = slices > 1 ? part : Y;
  dim3 grid((unsigned)row_blocks, (unsigned)slices);
  if (X_lo) dense_mma_kernel<true><<<grid, WARPS * 32, 0, s>>>(W, X, X_lo, out, T, in, ks, P);
  else dense_mma_kernel<false><<<grid, WARPS * 32, 0, s>>>(W, X, NULL, out, T, in, ks, P);
  if (slices > 1) {
    size_t n = (size_t)T * out;
    sum_slices_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(P, slices, n, Y);
  }
  return cudaGetLastError();
}
