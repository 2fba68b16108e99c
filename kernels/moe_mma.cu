// moe_mma.cu: the experts' two products for batched decode, where each
// expert gets a few to a few dozen rows a step (64 sessions: ~8; 256: ~32).
//
// The grouped GEMMs of prefill (mxfp4_gemm.cu's 128-row wgmma tiles,
// moe.cu's 64-row WMMA tiles) pad those rows to a full tile: at 64
// sessions 15/16 of the tensor work was padding, twice over with split
// activations, and the step ran at 0.4 TB/s (bench/NOTES.md, "64
// sessions"). The CUDA-core kernels of moe.cu read each weight once but pay
// a shared-memory read and an FMA per row per weight, so they lose past ~2
// rows an expert. Here the roles are swapped: the weights are mma.sync's A
// operand (m16n8k16: 16 weight rows, the output features) and the expert's
// rows its B operand, 8 at a time, so a step of 8 rows has no padding and
// the weights stream through registers once, decoded from MXFP4 on the way
// (exactly: an FP4 value times a power of two is a bf16).
//
// K is a sum, so its order inside a k16 step is ours to choose as long as
// both operands agree. A lane (group g = lane / 4, t = lane % 4) holds A's
// columns 2t, 2t+1, 2t+8, 2t+9 and B's rows 2t, 2t+1, 2t+8, 2t+9: we give
// it the values 4s..4s+3 of MXFP4 block kb + t in step s (eight steps, four
// blocks: 128 of K). So each lane loads one whole 16-byte block of each of
// its weight rows and its rows' 64 bytes of that block's activations, with
// no shuffles; four lanes read a weight row's 64 contiguous bytes.
//
// A warp computes 32 weight rows (two m16 tiles) for up to 32 of the
// expert's rows (four n8 tiles) at a time; past 32 it takes the next 32,
// reading its weights again (from L2). gate_up gives a warp 16 (gate, up)
// pairs with gate in the fragment's row g and up in row g + 8, so SwiGLU
// needs no exchange between lanes. With split activations (precision
// "exact") every product runs twice, hi and lo, into one fp32 accumulator.
//
// Layouts as moe.cu's small-M kernels: act [row][I] in expert order, y
// [assignment][H]. mma.sync bf16 is sm_80's, so every GPU the backend
// builds for runs this path. Reference: the double-precision MoE in
// kernels/test/kernels_test.cu.
#include "common.cuh"

namespace {
constexpr int WARPS = 4, ROWS_W = 32, NT = 4;   // a warp's weight rows; n8 tiles a pass (32 expert rows)

__device__ __forceinline__ uint4 decode_block_word(uint32_t w, uint32_t s) {
  return s > 128 ? fp4x8_bf16<true>(w, s) : fp4x8_bf16<false>(w, s);
}

__device__ __forceinline__ uint32_t word(const uint4 &v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// MODE 0, gate_up: B rows are tokens' xn (bf16 hi, and lo when SPLIT);
//   act[row][I] = SwiGLU(gate + bias (+ delta), up + bias (+ delta)).
// MODE 1, down: B rows are act (fp32, expert order), split on load when
//   SPLIT; y[perm[row]][N] = product + bias.
// grid (ceil(N / (WARPS ROWS_W)), E); N weight rows, Kd their length.
template <int MODE, bool SPLIT>
__global__ void __launch_bounds__(WARPS * 32)
moe_mma_kernel(const bf16 *__restrict__ xn, const bf16 *__restrict__ xn_lo, const float *__restrict__ actf,
               const int32_t *__restrict__ perm, const int32_t *__restrict__ offsets, int K, const uint8_t *__restrict__ blocks,
               const uint8_t *__restrict__ scales, const bf16 *__restrict__ bias, int N, int Kd, float limit,
               const float *__restrict__ delta, float *__restrict__ act, float *__restrict__ y) {
  const int e = blockIdx.y, r0 = offsets[e], n = offsets[e + 1] - r0;
  if (n <= 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int G = Kd / 32, base = (blockIdx.x * WARPS + warp) * ROWS_W;
  // this lane's four weight rows: (m tile 0, 1) x (fragment row g, g + 8)
  int wrow[4];
#pragma unroll
  for (int mt = 0; mt < 2; mt++) {
    if (MODE == 0) {   // pair p = base / 2 + 8 mt + g: gate 2p in row g, up 2p + 1 in row g + 8
      int p = base / 2 + 8 * mt + g;
      wrow[2 * mt] = 2 * p; wrow[2 * mt + 1] = 2 * p + 1;
    } else {
      wrow[2 * mt] = base + 16 * mt + g; wrow[2 * mt + 1] = base + 16 * mt + g + 8;
    }
  }
  if (base >= N) return;
  const uint8_t *wb[4], *wsc[4];
  bool wok[4];
#pragma unroll
  for (int i = 0; i < 4; i++) {
    wok[i] = wrow[i] < N;
    size_t r = (size_t)e * N + (wok[i] ? wrow[i] : 0);
    wb[i] = blocks + r * G * 16;
    wsc[i] = scales + r * G;
  }
  for (int c0 = 0; c0 < n; c0 += NT * 8) {
    const int tiles = min(NT, (n - c0 + 7) / 8);
    // this lane's B column in tile j: expert row c0 + 8 j + g
    const bf16 *bh[NT], *bl[NT];
    const float *bf[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) {
      int rr = c0 + 8 * j + g;
      bool ok = j < tiles && rr < n;
      if (MODE == 0) {
        size_t tok = ok ? (size_t)(perm[r0 + rr] / K) : 0;
        bh[j] = ok ? xn + tok * Kd : NULL;
        bl[j] = ok && SPLIT ? xn_lo + tok * Kd : NULL;
      } else {
        bf[j] = ok ? actf + (size_t)(r0 + rr) * Kd : NULL;
      }
    }
    float acc[NT][2][4] = {};
    // the weights of the next four blocks load while these are used
    uint4 wv[4], wn[4];
    uint32_t sc[4], scn[4];
    auto load_w = [&](int kb, uint4 *v, uint32_t *s) {
      int blk = kb + t;
#pragma unroll
      for (int i = 0; i < 4; i++) {
        bool ok = wok[i] && blk < G;
        v[i] = ok ? __ldg(reinterpret_cast<const uint4 *>(wb[i] + (size_t)blk * 16)) : make_uint4(0, 0, 0, 0);
        s[i] = ok ? __ldg(wsc[i] + blk) : 127u;
      }
    };
    load_w(0, wv, sc);
    for (int kb = 0; kb < G; kb += 4) {
      if (kb + 4 < G) load_w(kb + 4, wn, scn);
      const int blk = kb + t;
      const bool kok = blk < G;
#pragma unroll
      for (int wd = 0; wd < 4; wd++) {   // word wd of the block: values 8 wd .. 8 wd + 7, steps 2 wd and 2 wd + 1
        // the word's 8 weights of each row, bf16: m tile mt's rows g, g + 8 are dv[2 mt], dv[2 mt + 1]
        uint4 dv[4];
#pragma unroll
        for (int i = 0; i < 4; i++) dv[i] = decode_block_word(word(wv[i], wd), sc[i]);
#pragma unroll
        for (int j = 0; j < NT; j++) {
          if (j >= tiles) continue;   // warp-uniform
          uint4 hi = make_uint4(0, 0, 0, 0), lo = make_uint4(0, 0, 0, 0);
          size_t at = (size_t)blk * 32 + 8 * wd;
          if (MODE == 0) {
            if (bh[j] && kok) {
              hi = *reinterpret_cast<const uint4 *>(bh[j] + at);
              if (SPLIT) lo = *reinterpret_cast<const uint4 *>(bl[j] + at);
            }
          } else if (bf[j] && kok) {
            float4 f0 = *reinterpret_cast<const float4 *>(bf[j] + at), f1 = *reinterpret_cast<const float4 *>(bf[j] + at + 4);
            uint32_t l0 = 0, l1 = 0, l2 = 0, l3 = 0;
            hi.x = split_pair(f0.x, f0.y, SPLIT ? &l0 : NULL); hi.y = split_pair(f0.z, f0.w, SPLIT ? &l1 : NULL);
            hi.z = split_pair(f1.x, f1.y, SPLIT ? &l2 : NULL); hi.w = split_pair(f1.z, f1.w, SPLIT ? &l3 : NULL);
            lo = make_uint4(l0, l1, l2, l3);
          }
#pragma unroll
          for (int mt = 0; mt < 2; mt++) mma_k8x2<SPLIT>(acc[j][mt], dv[2 * mt], dv[2 * mt + 1], hi, lo);
        }
      }
      if (kb + 4 < G) {
#pragma unroll
        for (int i = 0; i < 4; i++) { wv[i] = wn[i]; sc[i] = scn[i]; }
      }
    }
    // D's (row g, columns 2t, 2t + 1) in [0], [1], row g + 8's in [2], [3]
#pragma unroll
    for (int j = 0; j < NT; j++) {
      if (j >= tiles) continue;
#pragma unroll
      for (int h = 0; h < 2; h++) {
        int rr = c0 + 8 * j + 2 * t + h;
        if (rr >= n) continue;
        size_t row = (size_t)(r0 + rr);
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          if (MODE == 0) {
            int gr = wrow[2 * mt], p = gr / 2;
            if (gr >= N) continue;
            float gt = acc[j][mt][h] + __bfloat162float(bias[(size_t)e * N + gr]);
            float up = acc[j][mt][2 + h] + __bfloat162float(bias[(size_t)e * N + gr + 1]);
            if (delta) { gt += delta[row * N + gr]; up += delta[row * N + gr + 1]; }
            act[row * (N / 2) + p] = swiglu(gt, up, limit);
          } else {
            float *yr = y + (size_t)perm[row] * N;
#pragma unroll
            for (int f = 0; f < 2; f++) {
              int o = wrow[2 * mt + f];
              if (o < N) yr[o] = acc[j][mt][2 * f + h] + __bfloat162float(bias[(size_t)e * N + o]);
            }
          }
        }
      }
    }
  }
}
}  // namespace

void launch_moe_gate_up_mma(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, const dlayer *l, const dims *d,
                            const float *delta, float *act, cudaStream_t s) {
  int N = 2 * d->I;
  dim3 grid((N + WARPS * ROWS_W - 1) / (WARPS * ROWS_W), d->E);
  if (xn_lo)
    moe_mma_kernel<0, true><<<grid, WARPS * 32, 0, s>>>(xn, xn_lo, NULL, w->perm, w->offsets, d->K, l->gu_blocks, l->gu_scales,
                                                        l->gu_bias, N, d->H, d->limit, delta, act, NULL);
  else
    moe_mma_kernel<0, false><<<grid, WARPS * 32, 0, s>>>(xn, NULL, NULL, w->perm, w->offsets, d->K, l->gu_blocks, l->gu_scales,
                                                         l->gu_bias, N, d->H, d->limit, delta, act, NULL);
}

void launch_moe_down_mma(const float *act, int split, const moe_work *w, const dlayer *l, const dims *d, float *y, cudaStream_t s) {
  dim3 grid((d->H + WARPS * ROWS_W - 1) / (WARPS * ROWS_W), d->E);
  if (split)
    moe_mma_kernel<1, true><<<grid, WARPS * 32, 0, s>>>(NULL, NULL, act, w->perm, w->offsets, d->K, l->dn_blocks, l->dn_scales,
                                                        l->dn_bias, d->H, d->I, d->limit, NULL, NULL, y);
  else
    moe_mma_kernel<1, false><<<grid, WARPS * 32, 0, s>>>(NULL, NULL, act, w->perm, w->offsets, d->K, l->dn_blocks, l->dn_scales,
                                                         l->dn_bias, d->H, d->I, d->limit, NULL, NULL, y);
}
