// mxfp4_gemm.cu: the experts' products in training. Every expert's rows (a
// contiguous run of a sorted bf16 buffer, hi and optionally lo: split bf16)
// times that expert's MXFP4 matrix W, plain (Y = X W^T, the forward) or
// transposed (Y = X W, the backward's input gradient), fp32 out, in one
// launch for all experts.
//
// The weights are decoded from MXFP4 while they are staged into shared
// memory, so no bf16 copy of an expert exists (expanding each expert before
// a cuBLAS call cost 12% of a training step, three expansions an expert a
// step). A block takes 128 of an expert's rows by 192 columns: two
// warpgroups, each 64 rows, on Hopper's asynchronous wgmma (m64n192k16,
// bf16 in, fp32 accumulate, both operands read from shared memory). K runs
// in steps of 64. The activations and the raw MXFP4 bytes of step s + 3 are
// on their way by cp.async (a ring of four stages: one block per
// multiprocessor, so the loads' latency is hidden by depth, not by other
// blocks) while the tensor cores work on step s and the threads decode step
// s + 1's weights into the other of two bf16 buffers: decoding costs no
// tensor time. (The same tiles on mma.sync, where every warp reads its
// fragments through ldmatrix, ran at 190 TFLOP/s: shared-memory bandwidth
// bound; two stages left wgmma waiting on the loads, at 165.) With split
// activations each stage runs the products twice, hi and lo, against one
// decode of the weights. (A warpgroup whose rows lie past the expert's last
// row runs its products on zeros all the same: branching around wgmma makes
// ptxas serialise every wgmma of the kernel.)
//
// Shared memory holds each operand in wgmma's 128-byte swizzled layout: a
// row's 64 values of a step (128 bytes) with its 16-byte pieces permuted by
// the row's index mod 8, so that the tensor cores' reads and the threads'
// 16-byte writes spread over all banks. (Without swizzling wgmma ran at a
// quarter of its rate.) The transposed weights are stored N-major: 64
// columns of a K row in each 128-byte row, three such atoms across 192.
//
// Reference: a double-precision product in kernels/test/kernels_test.cu.
#include <mma.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>
#include "common.cuh"

// wgmma is sm_90a's alone; the other GPUs (and the compute_90 PTX for those
// after Hopper) run portable_kernel, below, on mma.sync
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WGMMA 1
#endif

namespace {
constexpr int MB = 128, NB = 192, KB = 64, THREADS = 256;   // two warpgroups of 64 rows
// bytes of a step's operands: rows of 128 bytes (see above)
constexpr int A_BYTES = MB * 128, B_BYTES = NB * 128, ATOM = 8 * 128;
constexpr int STAGES = 4, RAW_BYTES = NB * KB / 2;   // a step's MXFP4 bytes (scales apart)
// the ring's slots (A, its lo, the raw weights), then the two decoded weight buffers
template <bool SPLIT> struct layout {
  static constexpr int SLOT = (SPLIT ? 2 : 1) * A_BYTES + RAW_BYTES;   // the raw weights last
  static constexpr int DEC = STAGES * SLOT;
  static constexpr size_t BYTES = (size_t)DEC + 2 * (size_t)B_BYTES + ATOM;   // + room to align to an atom
};

#ifdef WGMMA
// a thread decodes WORDS words (8 weights each) a step and copies CHUNKS 16-byte pieces of A
constexpr int WORDS = NB * KB / 8 / THREADS, CHUNKS = MB * KB / 8 / THREADS;
static_assert(NB * KB / 8 % THREADS == 0 && MB * KB / 8 % THREADS == 0, "staging work per thread");

// wgmma's shared-memory operand: start, leading and stride byte offsets,
// 128-byte swizzle
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr >> 4) & 0x3FFF) | (uint64_t)((lbo >> 4) & 0x3FFF) << 16 | (uint64_t)((sbo >> 4) & 0x3FFF) << 32 |
         (uint64_t)1 << 62;
}

// byte offset of the 16-byte piece c (of 8) of row r in a swizzled tile
__device__ __forceinline__ uint32_t swz(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// d (64 x 192 over the warpgroup, 96 floats a thread) += A B, B transposed (N-major) when TRANS
template <int TRANS>
__device__ __forceinline__ void wgmma192(float d[96], uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "
      "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
      "%96, %97, 1, 1, 1, 0, %98;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]),
        "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
        "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
        "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]),
        "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
        "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),
        "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]),
        "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
      : "l"(a), "l"(b), "n"(TRANS));
}

#endif

// This block's expert and its rows: the experts' tiles of tile_rows rows
// lie back to back along blockIdx.y (E: a spare block, past the last tile)
__device__ __forceinline__ int block_rows(const int32_t *offsets, int E, int tile_rows, int *row0, int *nrows) {
  int mt = blockIdx.y, e = 0;
  for (; e < E; e++) {
    int tiles = (offsets[e + 1] - offsets[e] + tile_rows - 1) / tile_rows;
    if (mt < tiles) break;
    mt -= tiles;
  }
  if (e < E) {
    *row0 = offsets[e] + mt * tile_rows;
    *nrows = min(tile_rows, offsets[e + 1] - *row0);
  }
  return e;
}

// K and N are multiples of 32 (MXFP4 blocks run along W's columns), so a
// word of 8 weights or a chunk of 8 activations is wholly in or wholly out.
template <bool SPLIT, bool TRANS>
__global__ void __launch_bounds__(THREADS, 1)
mxfp4_gemm_kernel(const bf16 *__restrict__ hi, const bf16 *__restrict__ lo, const int32_t *__restrict__ offsets, int E,
                  const uint8_t *__restrict__ blocks, const uint8_t *__restrict__ scales, int N, int K,
                  const bf16 *__restrict__ bias, float *__restrict__ Y, int ldy) {
  typedef layout<SPLIT> L;
  extern __shared__ __align__(128) unsigned char smem[];
  int row0, nrows;
  const int e = block_rows(offsets, E, MB, &row0, &nrows);
  if (e == E) return;
  const int n0 = blockIdx.x * NB;
  const int tid = threadIdx.x;
  // W rows of this expert: [N][K] plain, [K][N] transposed; blocks along the rows
  const int cols = TRANS ? N : K;
  const uint8_t *wb = blocks + (size_t)e * N * K / 2;
  const uint8_t *ws = scales + (size_t)e * N * K / 32;
#ifdef WGMMA
  const int wg = tid / 128, G = cols / 32;
  const uint32_t base = (smem_addr(smem) + ATOM - 1) & ~(uint32_t)(ATOM - 1);   // swizzling works on address bits
  unsigned char *const sbase = smem + (base - smem_addr(smem));

  // step k0 into a ring slot: A's piece c is row c / 8, k-chunk c % 8 (a
  // row's 128 bytes by 8 neighbouring threads); the raw weights as they lie,
  // W's rows of this step's 32 (plain) or 96 (transposed) bytes
  auto stage = [&](uint32_t st, int k0) {
#pragma unroll
    for (int i = 0; i < CHUNKS; i++) {
      int c = tid + i * THREADS, r = c / (KB / 8), kc = c % (KB / 8), k = k0 + kc * 8;
      bool ok = r < nrows && k < K;
      size_t at = ok ? (size_t)(row0 + r) * K + k : 0;
      uint32_t d = st + swz(r, kc);
      cp_async16(d, hi + at, ok);
      if (SPLIT) cp_async16(d + A_BYTES, lo + at, ok);
    }
    constexpr int PER_ROW = TRANS ? NB / 32 : KB / 32;   // 16-byte pieces of a W row in a step
    for (int c = tid; c < RAW_BYTES / 16; c += THREADS) {
      int wr = c / PER_ROW, q = c % PER_ROW;
      int gr = (TRANS ? k0 : n0) + wr, gc = (TRANS ? n0 : k0) + q * 32;
      bool ok = gr < (TRANS ? K : N) && gc < cols;
      cp_async16(st + L::SLOT - RAW_BYTES + c * 16, ok ? wb + (size_t)gr * cols / 2 + gc / 2 : wb, ok);
    }
  };
  auto commit = []() { asm volatile("cp.async.commit_group;\n"); };
  // Word i of a thread: 8 weights of W row wr at column wc, neighbouring
  // threads along the row. Its place in the raw bytes is (tid + i THREADS) * 4
  // every step; its place in the decoded tile and its scale's offset (less
  // the step's) are worked out once. Scales are fetched a step ahead.
  uint32_t dst[WORDS], sc_off[WORDS], sc[WORDS];
  int wr0[WORDS], wc0[WORDS];
#pragma unroll
  for (int i = 0; i < WORDS; i++) {
    int task = tid + i * THREADS, j = task % (NB / 8);
    if (TRANS) {   // atom n / 64, row k, piece n / 8 % 8
      wr0[i] = task / (NB / 8); wc0[i] = n0 + j * 8;
      dst[i] = (j >> 3) * (KB * 128) + swz(wr0[i], j & 7);
    } else {       // row n, piece k / 8
      wr0[i] = n0 + task / (KB / 8); wc0[i] = task % (KB / 8) * 8;
      dst[i] = swz(task / (KB / 8), task % (KB / 8));
    }
    sc_off[i] = (uint32_t)(wr0[i] * G + wc0[i] / 32);
  }
  auto fetch_scales = [&](int k0) {
    // the step moves the row (transposed) or the column (plain)
    const uint32_t step = TRANS ? (uint32_t)k0 * G : (uint32_t)k0 / 32;
#pragma unroll
    for (int i = 0; i < WORDS; i++) {
      bool ok = TRANS ? wr0[i] + k0 < K && wc0[i] < N : wr0[i] < N && wc0[i] + k0 < K;
      sc[i] = ok ? __ldg(ws + sc_off[i] + step) : 127;
    }
  };
  auto decode = [&](uint32_t slot, unsigned char *out) {
    const uint32_t *raw = reinterpret_cast<const uint32_t *>(sbase + (slot - base) + L::SLOT - RAW_BYTES);
    bool big = false;
#pragma unroll
    for (int i = 0; i < WORDS; i++) big |= sc[i] > 128;
    if (__builtin_expect(__any_sync(0xffffffffu, big), 0)) {
#pragma unroll
      for (int i = 0; i < WORDS; i++) *reinterpret_cast<uint4 *>(out + dst[i]) = fp4x8_bf16<true>(raw[tid + i * THREADS], sc[i]);
    } else {
#pragma unroll
      for (int i = 0; i < WORDS; i++) *reinterpret_cast<uint4 *>(out + dst[i]) = fp4x8_bf16<false>(raw[tid + i * THREADS], sc[i]);
    }
  };
  auto slot = [&](int s) { return base + (uint32_t)(s % STAGES) * L::SLOT; };
  auto dec = [&](int s) { return sbase + L::DEC + (s & 1) * B_BYTES; };

  float acc[96];
#pragma unroll
  for (int i = 0; i < 96; i++) acc[i] = 0.f;

  // Step s + 1 is decoded while the tensor cores work on step s; step s + 2
  // has landed (and is visible to all threads after the step's barrier) by
  // the time it is decoded; step s + 3 is on its way.
  const int steps = (K + KB - 1) / KB;
  for (int p = 0; p < STAGES - 1; p++) {
    if (p < steps) stage(slot(p), p * KB);
    commit();
  }
  fetch_scales(0);
  asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
  __syncthreads();
  decode(slot(0), dec(0));
  if (steps > 1) fetch_scales(KB);
  asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 3));
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  for (int s = 0; s < steps; s++) {
    if (s + STAGES - 1 < steps) stage(slot(s + STAGES - 1), (s + STAGES - 1) * KB);
    commit();
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    {
      // a k16 step: 32 bytes into each K-major row (the hardware applies the
      // swizzle to the address), 16 rows into the N-major weights
      const uint32_t a0 = slot(s) + wg * 64 * 128, b0 = smem_addr(dec(s));
#pragma unroll
      for (int kk = 0; kk < KB / 16; kk++) {
        uint64_t db = TRANS ? desc(b0 + kk * 16 * 128, KB * 128, ATOM) : desc(b0 + kk * 32, 16, ATOM);
        wgmma192<TRANS>(acc, desc(a0 + kk * 32, 16, ATOM), db);
        if (SPLIT) wgmma192<TRANS>(acc, desc(a0 + A_BYTES + kk * 32, 16, ATOM), db);
      }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    if (s + 1 < steps) {
      decode(slot(s + 1), dec(s + 1));
      if (s + 2 < steps) fetch_scales((s + 2) * KB);
    }
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 3));
    // the tensor cores read what the threads wrote: hand it to the async proxy
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    __syncthreads();
  }

  // d[4i + h] of thread t: row 16 (t / 32 % 4) + t % 32 / 4 (+ 8 for h >= 2), column 8i + 2 (t % 4) + h % 2
  const bf16 *eb = bias ? bias + (size_t)e * N : NULL;
  const int lane = tid & 31, r0 = wg * 64 + (tid / 32 % 4) * 16 + lane / 4;
#pragma unroll
  for (int i = 0; i < 24; i++) {
    int n = n0 + i * 8 + (lane & 3) * 2;
    if (n >= N) continue;
    float b0 = eb ? __bfloat162float(eb[n]) : 0.f, b1 = eb ? __bfloat162float(eb[n + 1]) : 0.f;
#pragma unroll
    for (int h = 0; h < 2; h++) {
      int r = r0 + h * 8;
      if (r < nrows)
        *reinterpret_cast<float2 *>(Y + (size_t)(row0 + r) * ldy + n) = make_float2(acc[4 * i + 2 * h] + b0, acc[4 * i + 2 * h + 1] + b1);
    }
  }
#else
  // not compiled with wgmma: launch_mxfp4_gemm runs portable_kernel instead
  (void)wb; (void)ws; (void)smem; (void)n0; (void)tid; (void)nrows; (void)row0; (void)cols;
#endif
}

// {====================================================== the portable path
// Where wgmma was not compiled (sm_80, sm_86, sm_89, or a build carrying
// only their PTX): the same products on mma.sync through wmma, bf16 in,
// fp32 accumulate, as moe.cu's inference GEMM. A block takes 64 rows by 64
// columns, four warps of 32 x 32; K in steps of 32: the activations copied
// and the weights decoded from MXFP4 into shared memory (exactly: an FP4
// value times a power of two is a bf16), then two k16 products (four with
// split activations). No pipelining: it is the path that runs, not yet the
// path that is fast (nothing here can time it).
constexpr int PB_M = 64, PB_N = 64, PB_K = 32, PB_THREADS = 128;
constexpr int PLD_A = PB_K + 8, PLD_BP = PB_K + 8, PLD_BT = PB_N + 8, PLD_C = PB_N + 4;

__device__ __forceinline__ float mxfp4_value(const uint8_t *wb, const uint8_t *ws, size_t at) {
  const float fp4[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  int code = at & 1 ? wb[at / 2] >> 4 : wb[at / 2] & 15;
  return ldexpf(code & 8 ? -fp4[code & 7] : fp4[code & 7], (int)ws[at / 32] - 127);
}

template <bool SPLIT, bool TRANS>
__global__ void __launch_bounds__(PB_THREADS)
portable_kernel(const bf16 *__restrict__ hi, const bf16 *__restrict__ lo, const int32_t *__restrict__ offsets, int E,
                const uint8_t *__restrict__ blocks, const uint8_t *__restrict__ scales, int N, int K,
                const bf16 *__restrict__ bias, float *__restrict__ Y, int ldy) {
  using namespace nvcuda;
  __shared__ __align__(32) bf16 sA[PB_M * PLD_A];
  __shared__ __align__(32) bf16 sAl[SPLIT ? PB_M * PLD_A : 16];
  __shared__ __align__(32) bf16 sB[TRANS ? PB_K * PLD_BT : PB_N * PLD_BP];
  __shared__ __align__(32) float sC[PB_M * PLD_C];
  int row0, nrows;
  const int e = block_rows(offsets, E, PB_M, &row0, &nrows);
  if (e == E) return;
  const int n0 = blockIdx.x * PB_N;
  const int tid = threadIdx.x, warp = tid / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int cols = TRANS ? N : K;   // W: [N][K] plain, [K][N] transposed; MXFP4 blocks along its rows
  const uint8_t *wb = blocks + (size_t)e * N * K / 2, *ws = scales + (size_t)e * N * K / 32;
  typedef typename std::conditional<TRANS, wmma::row_major, wmma::col_major>::type b_layout;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
  for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::fill_fragment(c[i][j], 0.f);
  for (int k0 = 0; k0 < K; k0 += PB_K) {
    for (int i = tid; i < PB_M * PB_K; i += PB_THREADS) {
      int r = i / PB_K, k = i % PB_K;
      size_t x = (size_t)(row0 + r) * K + k0 + k;
      sA[r * PLD_A + k] = r < nrows ? hi[x] : __float2bfloat16(0.f);
      if (SPLIT) sAl[r * PLD_A + k] = r < nrows ? lo[x] : __float2bfloat16(0.f);
    }
    for (int i = tid; i < PB_N * PB_K; i += PB_THREADS) {
      if (TRANS) {   // B[k][n] = W[k][n]: row-major, K rows of the tile
        int k = i / PB_N, n = i % PB_N;
        float v = n0 + n < N ? mxfp4_value(wb, ws, (size_t)(k0 + k) * cols + n0 + n) : 0.f;
        sB[k * PLD_BT + n] = __float2bfloat16(v);
      } else {       // B[k][n] = W[n][k]: column-major, a column a weight row
        int n = i / PB_K, k = i % PB_K;
        float v = n0 + n < N ? mxfp4_value(wb, ws, (size_t)(n0 + n) * cols + k0 + k) : 0.f;
        sB[n * PLD_BP + k] = __float2bfloat16(v);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < PB_K; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, b_layout> fb[2];
      for (int j = 0; j < 2; j++) {
        if (TRANS) wmma::load_matrix_sync(fb[j], sB + kk * PLD_BT + wn + 16 * j, PLD_BT);
        else wmma::load_matrix_sync(fb[j], sB + (wn + 16 * j) * PLD_BP + kk, PLD_BP);
      }
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
      for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], sA + (wm + 16 * i) * PLD_A + kk, PLD_A);
      for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
      if (SPLIT) {
        for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], sAl + (wm + 16 * i) * PLD_A + kk, PLD_A);
        for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 2; j++) wmma::store_matrix_sync(sC + (wm + 16 * i) * PLD_C + wn + 16 * j, c[i][j], PLD_C, wmma::mem_row_major);
  __syncthreads();
  for (int i = tid; i < PB_M * PB_N; i += PB_THREADS) {
    int r = i / PB_N, n = n0 + i % PB_N;
    if (r >= nrows || n >= N) continue;
    float b = bias ? __bfloat162float(bias[(size_t)e * N + n]) : 0.f;
    Y[(size_t)(row0 + r) * ldy + n] = sC[r * PLD_C + i % PB_N] + b;
  }
}

// What this binary's code for the current device is, asked of the device
// once: the compute capability it was compiled for (__CUDA_ARCH__, e.g. 800
// for the compute_80 PTX that other GPUs, and a portable build on the H100,
// run) and whether it has sm_90a's features (the wgmma kernel)
__global__ void code_probe(int *out) {
#if defined(__CUDA_ARCH__)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 2 * __CUDA_ARCH__ + 1;
#else
  *out = 2 * __CUDA_ARCH__;
#endif
#endif
}

static int code_of[65];   // per device (cuda:0 .. cuda:64, as model.c accepts): 0 unknown, else the probe's answer

static cudaError_t device_code(int *code, cudaStream_t s) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 65) return cudaErrorInvalidDevice;
  if (!code_of[dev]) {
    int *d = NULL, h = 0;
    if ((err = cudaMalloc((void **)&d, sizeof(int))) != cudaSuccess) return err;
    code_probe<<<1, 1, 0, s>>>(d);
    err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaMemcpyAsync(&h, d, sizeof(int), cudaMemcpyDeviceToHost, s);
    if (err == cudaSuccess) err = cudaStreamSynchronize(s);
    cudaFree(d);
    if (err != cudaSuccess) return err;
    code_of[dev] = h;
  }
  *code = code_of[dev];
  return cudaSuccess;
}

static cudaError_t has_wgmma(bool *yes, cudaStream_t s) {
  int code = 0;
  cudaError_t err = device_code(&code, s);
  if (err != cudaSuccess) return err;
  // GPTOSS_CUDA_PORTABLE=1: the portable kernel on a Hopper too (to check it there)
  const char *force = getenv("GPTOSS_CUDA_PORTABLE");
  *yes = (code & 1) && !(force && *force && strcmp(force, "0") != 0);
  return cudaSuccess;
}
// }======================================================

template <bool SPLIT, bool TRANS>
cudaError_t launch(const bf16 *hi, const bf16 *lo, const moe_work *w, int rows_bound, int E, const uint8_t *blocks,
                   const uint8_t *scales, int N, int K, const bf16 *bias, float *Y, int ldy, cudaStream_t s) {
  bool wg = false;
  cudaError_t err = has_wgmma(&wg, s);
  if (err != cudaSuccess) return err;
  if (!wg) {
    dim3 grid((unsigned)((N + PB_N - 1) / PB_N), (unsigned)((rows_bound + PB_M - 1) / PB_M + E));
    portable_kernel<SPLIT, TRANS><<<grid, PB_THREADS, 0, s>>>(hi, lo, w->offsets, E, blocks, scales, N, K, bias, Y, ldy);
    return cudaGetLastError();
  }
  auto k = mxfp4_gemm_kernel<SPLIT, TRANS>;
  err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)layout<SPLIT>::BYTES);
  if (err != cudaSuccess) return err;
  // column tiles fastest: the blocks running together share one tile of
  // rows, which L2 then serves (a layer's rows, 47 MB a half, do not fit)
  dim3 grid((unsigned)((N + NB - 1) / NB), (unsigned)((rows_bound + MB - 1) / MB + E));
  k<<<grid, THREADS, layout<SPLIT>::BYTES, s>>>(hi, lo, w->offsets, E, blocks, scales, N, K, bias, Y, ldy);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_mxfp4_gemm(const bf16 *hi, const bf16 *lo, const moe_work *w, int rows_bound, int E, const uint8_t *blocks,
                              const uint8_t *scales, int wrows, int wcols, bool trans, const bf16 *bias, float *Y, int ldy,
                              cudaStream_t s) {
  if (wrows % 32 || wcols % 32 || ldy % 2) return cudaErrorInvalidValue;
  int N = trans ? wcols : wrows, K = trans ? wrows : wcols;
  if (lo) return trans ? launch<true, true>(hi, lo, w, rows_bound, E, blocks, scales, N, K, bias, Y, ldy, s)
                       : launch<true, false>(hi, lo, w, rows_bound, E, blocks, scales, N, K, bias, Y, ldy, s);
  return trans ? launch<false, true>(hi, lo, w, rows_bound, E, blocks, scales, N, K, bias, Y, ldy, s)
               : launch<false, false>(hi, lo, w, rows_bound, E, blocks, scales, N, K, bias, Y, ldy, s);
}

cudaError_t mxfp4_gemm_has_wgmma(bool *yes, cudaStream_t s) { return has_wgmma(yes, s); }

cudaError_t pdl_supported(bool *yes, cudaStream_t s) {
  int code = 0;
  cudaError_t err = device_code(&code, s);
  *yes = err == cudaSuccess && code / 2 >= 900;
  return err;
}
