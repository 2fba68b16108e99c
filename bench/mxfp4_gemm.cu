// bench/mxfp4_gemm.cu: training's grouped expert products (kernels/mxfp4_gemm.cu)
// against cuBLAS on the same products with the weights already expanded to
// bf16 (what the trainer ran before, less the expansion), on the 20B shape:
// 32 experts, 2048 tokens x 4 slots routed at random.
//
//   make bench-kernels && build/cuda/mxfp4_bench [reps]
#include <stdio.h>
#include <stdlib.h>
#include <vector>
#include "../kernels/common.cuh"

#define CK(x) do { cudaError_t err_ = (x); if (err_ != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__); exit(2); } } while (0)
#define CB(x) do { cublasStatus_t st_ = (x); if (st_ != CUBLAS_STATUS_SUCCESS) { printf("cuBLAS %d at %s:%d\n", (int)st_, __FILE__, __LINE__); exit(2); } } while (0)

static uint64_t rng = 88172645463325252ull;
static uint32_t next32() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)(rng >> 11); }

// expands one matrix of MXFP4 to bf16 (the bench's cuBLAS operand only)
__global__ void expand(const uint8_t *blocks, const uint8_t *scales, bf16 *out, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint8_t b = blocks[i / 2];
  int code = i & 1 ? b >> 4 : b & 15;
  const float v[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  float x = v[code & 7] * (code & 8 ? -1.f : 1.f);
  out[i] = __float2bfloat16(ldexpf(x, (int)scales[i / 32] - 127));
}

int main(int argc, char **argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 20;
  const int E = 32, T = 2048, Kslots = 4, H = 2880, I = 2880, TK = T * Kslots;
  std::vector<int32_t> counts(E, 0), off(E + 1, 0);
  for (int i = 0; i < TK; i++) counts[next32() % E]++;
  for (int e = 0; e < E; e++) off[e + 1] = off[e] + counts[e];
  moe_work mw = {};
  CK(cudaMalloc(&mw.offsets, sizeof(int32_t) * (E + 1)));
  CK(cudaMemcpy(mw.offsets, off.data(), sizeof(int32_t) * (E + 1), cudaMemcpyHostToDevice));
  size_t wmax = (size_t)E * 2 * I * H;
  std::vector<uint8_t> hb(wmax / 2), hs(wmax / 32);
  for (auto &b : hb) b = (uint8_t)next32();
  for (auto &s : hs) s = (uint8_t)(121 + next32() % 3);
  uint8_t *blocks, *scales;
  CK(cudaMalloc(&blocks, hb.size()));
  CK(cudaMalloc(&scales, hs.size()));
  CK(cudaMemcpy(blocks, hb.data(), hb.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(scales, hs.data(), hs.size(), cudaMemcpyHostToDevice));
  bf16 *wx, *hi, *lo, *bias;
  float *Y;
  CK(cudaMalloc(&wx, sizeof(bf16) * wmax));
  CK(cudaMalloc(&hi, sizeof(bf16) * (size_t)TK * 2 * I));
  CK(cudaMalloc(&lo, sizeof(bf16) * (size_t)TK * 2 * I));
  CK(cudaMalloc(&bias, sizeof(bf16) * (size_t)E * 2 * I));
  CK(cudaMalloc(&Y, sizeof(float) * (size_t)TK * 2 * I));
  CK(cudaMemset(hi, 0x3c, sizeof(bf16) * (size_t)TK * 2 * I));
  CK(cudaMemset(lo, 0x30, sizeof(bf16) * (size_t)TK * 2 * I));
  CK(cudaMemset(bias, 0, sizeof(bf16) * (size_t)E * 2 * I));
  cublasHandle_t blas;
  CB(cublasCreate(&blas));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  struct shape { const char *name; int wrows, wcols; bool trans; } shapes[] = {
    {"gate_up X W^T", 2 * I, H, false}, {"down X W^T", H, I, false}, {"down X W", H, I, true}, {"gate_up X W", 2 * I, H, true}};
  printf("%-16s %-6s %10s %10s %10s %10s\n", "product", "split", "ours ms", "TFLOP/s", "cuBLAS ms", "TFLOP/s");
  for (auto &s : shapes) {
    int N = s.trans ? s.wcols : s.wrows, K = s.trans ? s.wrows : s.wcols;
    size_t per = (size_t)s.wrows * s.wcols;
    expand<<<(unsigned)((E * per + 255) / 256), 256>>>(blocks, scales, wx, E * per);
    CK(cudaGetLastError());
    for (int sp = 0; sp < 2; sp++) {
      double flop = 2.0 * TK * N * K * (sp ? 2 : 1);
      float ms_ours, ms_blas;
      for (int pass = 0; pass < 2; pass++) {   // a warm-up pass, then the timed one
        CK(cudaEventRecord(a));
        for (int r = 0; r < reps; r++)
          CK(launch_mxfp4_gemm(hi, sp ? lo : NULL, &mw, TK, E, blocks, scales, s.wrows, s.wcols, s.trans, s.trans ? NULL : bias, Y, N, 0));
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&ms_ours, a, b));
      }
      const float one = 1.f, zero = 0.f;
      for (int pass = 0; pass < 2; pass++) {
        CK(cudaEventRecord(a));
        for (int r = 0; r < reps; r++)
          for (int e = 0; e < E; e++)
            for (int h = 0; h <= sp; h++) {
              int n = counts[e];
              if (!n) continue;
              // row-major Y[n][N] = X[n][K] op(W): column-major Y^T = op(W)^T X^T
              CB(cublasGemmEx(blas, s.trans ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, N, n, K, &one, wx + e * per, CUDA_R_16BF,
                              s.wcols, (h ? lo : hi) + (size_t)off[e] * K, CUDA_R_16BF, K, h ? &one : &zero,
                              Y + (size_t)off[e] * N, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            }
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&ms_blas, a, b));
      }
      ms_ours /= reps; ms_blas /= reps;
      printf("%-16s %-6s %10.3f %10.1f %10.3f %10.1f\n", s.name, sp ? "yes" : "no", ms_ours, flop / ms_ours / 1e9, ms_blas,
             flop / ms_blas / 1e9);
    }
  }
  return 0;
}
