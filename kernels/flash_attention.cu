// flash_attention.cu: training's attention, forward and backward, in tiles
// that never hold the T x T scores (FlashAttention-2, Dao 2023).
//
// A warp's 16 queries meet 64 keys at a time in registers (mma.sync
// m16n8k16, fp32 accumulators), and the softmax is taken online with the
// head's sink in its denominator from the start, so no row is ever empty.
// The forward keeps lse = log(denominator) per query and head. The backward
// recomputes the probabilities from lse in two kernels: dq over each query
// tile's keys, and dk, dv over each key tile's queries, one head at a time
// into per-head parts that a third kernel sums over the key/value head's
// group in a fixed order (no atomics: the same sums every run).
//
// Operands are the fp32 activations rounded to bf16 (precision "fast") or
// split, x = hi + lo, with each product taken as hi*hi + hi*lo + lo*hi
// (precision "exact": about 16 significant bits against bf16's 8). The
// probabilities enter the second products the same way.
#include "common.cuh"

namespace {
constexpr int BQ = 128, BK = 64, WARPS = 8;   // forward and dq: 8 warps of 16 queries; tiles of 64 keys
constexpr int KWARPS = 4, KQ = 64;            // dk, dv: 4 warps of 16 keys; tiles of 64 queries

__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm_t(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void wait_async() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// byte offset of 16-byte piece c of row r in a tile of rows of D bf16,
// XOR-swizzled: ldmatrix's eight rows of one piece land in distinct banks
template <int D> __device__ __forceinline__ uint32_t swz(int r, int c) {
  constexpr int CH = D / 8, M = (CH < 8 ? CH : 8) - 1;
  return (uint32_t)((r * CH + (c ^ (r & M))) * 16);
}

// rows r0 .. r0 + R - 1 (zeros from T on) of columns c0 .. c0 + D - 1 of a
// bf16 matrix into a tile, by NT threads, in flight until wait_async
template <int D, int R, int NT>
__device__ __forceinline__ void load_tile(uint32_t tile, const bf16 *src, int ld, int c0, int r0, int T) {
  constexpr int CH = D / 8, N = R * CH;
#pragma unroll
  for (int k = 0; k < (N + NT - 1) / NT; k++) {
    int i = (int)threadIdx.x + k * NT, r = i / CH, c = i % CH, row = r0 + r;
    if (N % NT && i >= N) break;
    bool ok = row < T;
    cp_async16(tile + swz<D>(r, c), src + (size_t)(ok ? row : 0) * ld + c0 + c * 8, ok);
  }
}

// n floats (zeros from row T on) of column c of rows r0 .. of an fp32 matrix into shared memory
__device__ __forceinline__ void load_col(uint32_t dst, const float *src, int ld, int c, int r0, int n, int T) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    bool ok = r0 + i < T;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst + 4 * i),
                 "l"(src + (size_t)(ok ? r0 + i : 0) * ld + c), "r"(ok ? 4 : 0));
  }
}

// a warp's 16 rows, r0 .. r0 + 15, of D columns, as mma A fragments: hi and (split) lo
template <int D> struct afrag { uint32_t h[D / 16][4], l[D / 16][4]; };

// f(ks, i, row, col) for register i of k-step ks of a lane's A fragments
// over rows r0 .. r0 + 15 and columns c0 .. c0 + D - 1: the pair of values
// at (row, col) and (row, col + 1)
template <int D, typename F>
__device__ __forceinline__ void each_a(int c0, int r0, F f) {
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
    for (int i = 0; i < 4; i++) f(ks, i, r0 + (lane >> 2) + (i & 1) * 8, c0 + ks * 16 + (i >> 1) * 8 + 2 * (lane & 3));
}

template <int D>
__device__ __forceinline__ void load_a(uint32_t a[D / 16][4], const bf16 *src, int ld, int c0, int r0, int T) {
  each_a<D>(c0, r0, [&](int ks, int i, int row, int col) {
    a[ks][i] = row < T ? *reinterpret_cast<const uint32_t *>(src + (size_t)row * ld + col) : 0u;
  });
}

template <int D, bool SPLIT>
__device__ __forceinline__ void load_rows(afrag<D> &a, const bf16 *hi, const bf16 *lo, int ld, int c0, int r0, int T) {
  load_a<D>(a.h, hi, ld, c0, r0, T);
  if (SPLIT) load_a<D>(a.l, lo, ld, c0, r0, T);
}

// c (16 x 64: eight 16 x 8 accumulators) += a (16 x D) . tile^T, the tile's
// 64 rows of D being c's columns
template <int D, bool SPLIT>
__device__ __forceinline__ void mma_rows(float c[8][4], const afrag<D> &a, uint32_t th, uint32_t tl) {
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      uint32_t off = swz<D>(8 * j + ((lane >> 4) << 3) + (lane & 7), 2 * ks + ((lane >> 3) & 1)), b[4];
      ldsm(b, th + off);
      mma(c[j], a.h[ks], b[0], b[1]);
      mma(c[j + 1], a.h[ks], b[2], b[3]);
      if (SPLIT) {
        mma(c[j], a.l[ks], b[0], b[1]);
        mma(c[j + 1], a.l[ks], b[2], b[3]);
        ldsm(b, tl + off);
        mma(c[j], a.h[ks], b[0], b[1]);
        mma(c[j + 1], a.h[ks], b[2], b[3]);
      }
    }
}

// accumulators x, y (columns 16k .. 16k + 7 and 16k + 8 .. 16k + 15) as the
// A fragment of k-step k: bf16 and (split) what bf16 rounded off
__device__ __forceinline__ void to_a(const float x[4], const float y[4], uint32_t h[4], uint32_t l[4], bool split) {
  const float v[8] = {x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3]};
#pragma unroll
  for (int i = 0; i < 4; i++) h[i] = split_pair(v[2 * i], v[2 * i + 1], split ? &l[i] : NULL);
}

// o (16 x D) += p (16 x 64, accumulators) . tile (64 rows of D)
template <int D, bool SPLIT>
__device__ __forceinline__ void mma_cols(float o[D / 8][4], const float p[8][4], uint32_t th, uint32_t tl) {
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < 4; kk++) {
    uint32_t ah[4], al[4];
    to_a(p[2 * kk], p[2 * kk + 1], ah, al, SPLIT);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
      uint32_t off = swz<D>(16 * kk + ((lane >> 3) & 1) * 8 + (lane & 7), dt + (lane >> 4)), b[4];
      ldsm_t(b, th + off);
      mma(o[dt], ah, b[0], b[1]);
      mma(o[dt + 1], ah, b[2], b[3]);
      if (SPLIT) {
        mma(o[dt], al, b[0], b[1]);
        mma(o[dt + 1], al, b[2], b[3]);
        ldsm_t(b, tl + off);
        mma(o[dt], ah, b[0], b[1]);
        mma(o[dt + 1], ah, b[2], b[3]);
      }
    }
  }
}

// does query q see key k: causal and in the window
__device__ __forceinline__ bool sees(int q, int k, int window) { return k <= q && (!window || k > q - window); }

// in training, and in q's example when packed (rows past T, padding of the
// last tile, have none)
__device__ __forceinline__ bool sees(const flash_args &a, int q, int k) {
  return sees(q, k, a.window) && (!a.seg0 || q >= a.T || k >= a.seg0[q]);
}

// the key tiles of query tile q0 .. q0 + BQ - 1
__device__ __forceinline__ void key_tiles(const flash_args &a, int q0, int *kb0, int *kb1) {
  int last = (q0 + BQ < a.T ? q0 + BQ : a.T) - 1;
  *kb0 = a.window && q0 - a.window + 1 > 0 ? (q0 - a.window + 1) / BK : 0;
  *kb1 = last / BK;
}

// A ring of two stages of `bytes` from base for tiles it0 .. it1: tile it's
// stage, and the wait for it, with the next tile's loads (if any) already
// queued behind it
__device__ __forceinline__ uint32_t ring_slot(int it, int it0, uint32_t base, int bytes) { return base + ((it - it0) & 1) * bytes; }

__device__ __forceinline__ uint32_t ring_wait(int it, int it0, int it1, uint32_t base, int bytes) {
  if (it < it1)
    wait_async<1>();
  else
    wait_async<0>();
  __syncthreads();
  return ring_slot(it, it0, base, bytes);
}

// A key tile's scores into the running softmax of a warp's two rows a
// lane holds (keys k0 ..; visible(i, key): whether row i sees it): masked and scaled,
// each row's maximum m and partial sum l brought up to date with o rescaled
// to match, and c turned into the tile's probabilities
template <int D, typename V>
__device__ __forceinline__ void online_softmax(float c[8][4], float m[2], float l[2], float o[D / 8][4], int k0, float scale,
                                               V visible) {
  int lane = threadIdx.x & 31;
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < 8; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      int key = k0 + 8 * j + 2 * (lane & 3) + (e & 1);
      c[j][e] = visible(e >> 1, key) ? c[j][e] * scale : -INFINITY;
      mx[e >> 1] = fmaxf(mx[e >> 1], c[j][e]);
    }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    float corr = expf(m[i] - mx[i]);
    m[i] = mx[i];
    l[i] *= corr;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) { o[dt][2 * i] *= corr; o[dt][2 * i + 1] *= corr; }
  }
#pragma unroll
  for (int j = 0; j < 8; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      c[j][e] = expf(c[j][e] - m[e >> 1]);
      l[e >> 1] += c[j][e];
    }
}

// keys kb * BK .. of key/value head g into stage s: K (hi, lo), then V (hi, lo)
template <int D, bool SPLIT>
__device__ __forceinline__ void stage_kv(const flash_args &a, uint32_t s, int kb, int g) {
  constexpr int TILE = BK * D * 2, NS = SPLIT ? 2 : 1;
  int k0 = kb * BK, ck = a.Q + g * D, cv = ck + a.KV;
  load_tile<D, BK, WARPS * 32>(s, a.qkv_hi, a.ldq, ck, k0, a.T);
  load_tile<D, BK, WARPS * 32>(s + NS * TILE, a.qkv_hi, a.ldq, cv, k0, a.T);
  if (SPLIT) {
    load_tile<D, BK, WARPS * 32>(s + TILE, a.qkv_lo, a.ldq, ck, k0, a.T);
    load_tile<D, BK, WARPS * 32>(s + 3 * TILE, a.qkv_lo, a.ldq, cv, k0, a.T);
  }
  commit();
}

template <int D, bool SPLIT> __host__ __device__ constexpr int kv_stage() { return 2 * (SPLIT ? 2 : 1) * BK * D * 2; }

// grid (query tiles, Hq): att and lse
template <int D, bool SPLIT>
__global__ void __launch_bounds__(WARPS * 32) fwd_kernel(flash_args a) {
  constexpr int TILE = BK * D * 2, NS = SPLIT ? 2 : 1, STAGE = kv_stage<D, SPLIT>();
  extern __shared__ __align__(128) unsigned char sm[];
  const uint32_t base = smem_addr(sm);
  int h = blockIdx.y, g = h / (a.Hq / a.Hkv), q0 = (gridDim.x - 1 - blockIdx.x) * BQ;   // the longest rows first
  int lane = threadIdx.x & 31, w0 = q0 + (threadIdx.x >> 5) * 16;
  const int row[2] = {w0 + (lane >> 2), w0 + (lane >> 2) + 8};
  afrag<D> q;
  load_rows<D, SPLIT>(q, a.qkv_hi, a.qkv_lo, a.ldq, h * D, w0, a.T);
  float sink = __bfloat162float(a.sinks[h]), m[2] = {sink, sink}, l[2] = {0.f, 0.f}, o[D / 8][4] = {};
  int kb0, kb1;
  key_tiles(a, q0, &kb0, &kb1);
  stage_kv<D, SPLIT>(a, base, kb0, g);
  for (int kb = kb0; kb <= kb1; kb++) {
    if (kb < kb1) stage_kv<D, SPLIT>(a, ring_slot(kb + 1, kb0, base, STAGE), kb + 1, g);
    uint32_t s = ring_wait(kb, kb0, kb1, base, STAGE);
    float c[8][4] = {};
    mma_rows<D, SPLIT>(c, q, s, s + TILE);
    online_softmax<D>(c, m, l, o, kb * BK, a.scale, [&](int i, int key) { return sees(a, row[i], key); });
    mma_cols<D, SPLIT>(o, c, s + NS * TILE, s + (NS + 1) * TILE);
    __syncthreads();   // the next iteration's loads overwrite this stage
  }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    float L = l[i] + expf(sink - m[i]), inv = 1.f / L;
    if (row[i] >= a.T) continue;
    float *out = a.att + (size_t)row[i] * a.Q + h * D + 2 * (lane & 3);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) *reinterpret_cast<float2 *>(out + dt * 8) = make_float2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
    if ((lane & 3) == 0) a.lse[(size_t)row[i] * a.Hq + h] = m[i] + logf(L);
  }
}

// grid (query tiles, Hq): dq, and dd = O.dO (which dkv_kernel reads)
template <int D, bool SPLIT>
__global__ void __launch_bounds__(WARPS * 32) dq_kernel(flash_args a) {
  constexpr int TILE = BK * D * 2, NS = SPLIT ? 2 : 1, STAGE = kv_stage<D, SPLIT>();
  extern __shared__ __align__(128) unsigned char sm[];
  const uint32_t base = smem_addr(sm);
  int h = blockIdx.y, g = h / (a.Hq / a.Hkv), q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
  int lane = threadIdx.x & 31, w0 = q0 + (threadIdx.x >> 5) * 16;
  const int row[2] = {w0 + (lane >> 2), w0 + (lane >> 2) + 8};
  int kb0, kb1;
  key_tiles(a, q0, &kb0, &kb1);
  stage_kv<D, SPLIT>(a, base, kb0, g);
  afrag<D> q, go;
  load_rows<D, SPLIT>(q, a.qkv_hi, a.qkv_lo, a.ldq, h * D, w0, a.T);
  load_rows<D, SPLIT>(go, a.dout_hi, a.dout_lo, a.Q, h * D, w0, a.T);
  float lse[2], dd[2];
#pragma unroll
  for (int i = 0; i < 2; i++) {
    float s = 0.f;
    bool in = row[i] < a.T;
    const float *o = a.att + (size_t)row[i] * a.Q + h * D, *go32 = a.dout + (size_t)row[i] * a.Q + h * D;
    if (in)
      for (int c = 2 * (lane & 3); c < D; c += 8) s += o[c] * go32[c] + o[c + 1] * go32[c + 1];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    dd[i] = s;
    lse[i] = in ? a.lse[(size_t)row[i] * a.Hq + h] : 0.f;
    if (in && (lane & 3) == 0) a.dd[(size_t)row[i] * a.Hq + h] = s;
  }
  float dq[D / 8][4] = {};
  for (int kb = kb0; kb <= kb1; kb++) {
    if (kb < kb1) stage_kv<D, SPLIT>(a, ring_slot(kb + 1, kb0, base, STAGE), kb + 1, g);
    uint32_t s = ring_wait(kb, kb0, kb1, base, STAGE);
    float p[8][4] = {}, dp[8][4] = {};
    mma_rows<D, SPLIT>(p, q, s, s + TILE);
    mma_rows<D, SPLIT>(dp, go, s + NS * TILE, s + (NS + 1) * TILE);
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int key = kb * BK + 8 * j + 2 * (lane & 3) + (e & 1), i = e >> 1;
        float pr = sees(a, row[i], key) ? expf(p[j][e] * a.scale - lse[i]) : 0.f;
        p[j][e] = pr * (dp[j][e] - dd[i]) * a.scale;
      }
    mma_cols<D, SPLIT>(dq, p, s, s + TILE);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    if (row[i] >= a.T) continue;
    float *out = a.dqkv + (size_t)row[i] * a.ldq + h * D + 2 * (lane & 3);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) *reinterpret_cast<float2 *>(out + dt * 8) = make_float2(dq[dt][2 * i], dq[dt][2 * i + 1]);
  }
}

// query tile qb of head h into stage s: Q (hi, lo), dO (hi, lo), then lse and dd
template <int D, bool SPLIT>
__device__ __forceinline__ void stage_q(const flash_args &a, uint32_t s, int qb, int h) {
  constexpr int TILE = KQ * D * 2, NS = SPLIT ? 2 : 1;
  int q0 = qb * KQ;
  load_tile<D, KQ, KWARPS * 32>(s, a.qkv_hi, a.ldq, h * D, q0, a.T);
  load_tile<D, KQ, KWARPS * 32>(s + NS * TILE, a.dout_hi, a.Q, h * D, q0, a.T);
  if (SPLIT) {
    load_tile<D, KQ, KWARPS * 32>(s + TILE, a.qkv_lo, a.ldq, h * D, q0, a.T);
    load_tile<D, KQ, KWARPS * 32>(s + 3 * TILE, a.dout_lo, a.Q, h * D, q0, a.T);
  }
  load_col(s + 2 * NS * TILE, a.lse, a.Hq, h, q0, KQ, a.T);
  load_col(s + 2 * NS * TILE + 4 * KQ, a.dd, a.Hq, h, q0, KQ, a.T);
  commit();
}

template <int D, bool SPLIT> __host__ __device__ constexpr int q_stage() { return 2 * (SPLIT ? 2 : 1) * KQ * D * 2 + 2 * 4 * KQ; }

// grid (key tiles, Hq): head h's share of dk and dv, into dk_part, dv_part
template <int D, bool SPLIT>
__global__ void __launch_bounds__(KWARPS * 32) dkv_kernel(flash_args a) {
  constexpr int TILE = KQ * D * 2, NS = SPLIT ? 2 : 1, STAGE = q_stage<D, SPLIT>();
  extern __shared__ __align__(128) unsigned char sm[];
  const uint32_t base = smem_addr(sm);
  int h = blockIdx.y, g = h / (a.Hq / a.Hkv), k0 = blockIdx.x * KQ;   // the first keys see the most queries
  int lane = threadIdx.x & 31, w0 = k0 + (threadIdx.x >> 5) * 16;
  const int key[2] = {w0 + (lane >> 2), w0 + (lane >> 2) + 8};
  int lastk = (k0 + KQ < a.T ? k0 + KQ : a.T) - 1, lastq = a.T - 1;
  if (a.window && lastk + a.window - 1 < lastq) lastq = lastk + a.window - 1;
  int qb0 = k0 / KQ, qb1 = lastq / KQ;
  stage_q<D, SPLIT>(a, base, qb0, h);
  afrag<D> k, v;
  load_rows<D, SPLIT>(k, a.qkv_hi, a.qkv_lo, a.ldq, a.Q + g * D, w0, a.T);
  load_rows<D, SPLIT>(v, a.qkv_hi, a.qkv_lo, a.ldq, a.Q + a.KV + g * D, w0, a.T);
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  for (int qb = qb0; qb <= qb1; qb++) {
    uint32_t s = base + ((qb - qb0) & 1) * STAGE;
    const float *ls = reinterpret_cast<const float *>(sm + ((qb - qb0) & 1) * STAGE + 2 * NS * TILE), *ds = ls + KQ;
    if (qb < qb1) {   // (ring_wait's order here spills two registers of the split kernel at D 64)
      stage_q<D, SPLIT>(a, ring_slot(qb + 1, qb0, base, STAGE), qb + 1, h);
      wait_async<1>();
    } else
      wait_async<0>();
    __syncthreads();
    float p[8][4] = {}, dp[8][4] = {};
    mma_rows<D, SPLIT>(p, k, s, s + TILE);                         // S^T: keys x queries
    mma_rows<D, SPLIT>(dp, v, s + NS * TILE, s + (NS + 1) * TILE); // dP^T = V dO^T
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int c = 8 * j + 2 * (lane & 3) + (e & 1), qi = qb * KQ + c;
        float pr = qi < a.T && sees(a, qi, key[e >> 1]) ? expf(p[j][e] * a.scale - ls[c]) : 0.f;
        p[j][e] = pr;
        dp[j][e] = pr * (dp[j][e] - ds[c]) * a.scale;
      }
    mma_cols<D, SPLIT>(dv, p, s + NS * TILE, s + (NS + 1) * TILE);   // P^T dO
    mma_cols<D, SPLIT>(dk, dp, s, s + TILE);                         // dS^T Q
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    if (key[i] >= a.T) continue;
    size_t at = ((size_t)key[i] * a.Hq + h) * D + 2 * (lane & 3);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
      *reinterpret_cast<float2 *>(a.dk_part + at + dt * 8) = make_float2(dk[dt][2 * i], dk[dt][2 * i + 1]);
      *reinterpret_cast<float2 *>(a.dv_part + at + dt * 8) = make_float2(dv[dt][2 * i], dv[dt][2 * i + 1]);
    }
  }
}

// dk, dv of each key and key/value column: its group's heads' parts, in order
__global__ void dkv_sum_kernel(flash_args a) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)a.T * a.KV) return;
  int t = (int)(i / a.KV), c = (int)(i % a.KV), G = a.Hq / a.Hkv, g = c / a.D;
  size_t at = (size_t)t * a.Hq * a.D + (size_t)g * G * a.D + c % a.D;
  float sk = 0.f, sv = 0.f;
  for (int j = 0; j < G; j++) {
    sk += a.dk_part[at + (size_t)j * a.D];
    sv += a.dv_part[at + (size_t)j * a.D];
  }
  float *out = a.dqkv + (size_t)t * a.ldq + a.Q + c;
  out[0] = sk;
  out[a.KV] = sv;
}

template <typename K, typename A> cudaError_t launch(K kernel, dim3 grid, int threads, int smem, const A &a, cudaStream_t s) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  kernel<<<grid, threads, smem, s>>>(a);
  return cudaGetLastError();
}

template <int D, bool SPLIT> cudaError_t fwd(const flash_args &a, cudaStream_t s) {
  return launch(fwd_kernel<D, SPLIT>, dim3((a.T + BQ - 1) / BQ, a.Hq), WARPS * 32, 2 * kv_stage<D, SPLIT>(), a, s);
}

template <int D, bool SPLIT> cudaError_t bwd(const flash_args &a, cudaStream_t s) {
  cudaError_t e = launch(dq_kernel<D, SPLIT>, dim3((a.T + BQ - 1) / BQ, a.Hq), WARPS * 32, 2 * kv_stage<D, SPLIT>(), a, s);
  if (e == cudaSuccess) e = launch(dkv_kernel<D, SPLIT>, dim3((a.T + KQ - 1) / KQ, a.Hq), KWARPS * 32, 2 * q_stage<D, SPLIT>(), a, s);
  if (e != cudaSuccess) return e;
  size_t n = (size_t)a.T * a.KV;
  dkv_sum_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(a);
  return cudaGetLastError();
}

// {====================================================== prefill
// Inference's prefill: a block takes 16 consecutive queries of one session
// and every query head of one key/value head (a warp a head), so each tile
// of keys and values, read once from the session's cache and converted to
// bf16 (hi and, split, lo) on the way into shared memory, serves the whole
// group. The tiles are at the keys' absolute positions (multiples of BK),
// so a query meets the same tiles, in the same order, whichever block and
// pass it is in. Positions a tile covers that no query of the block sees
// are loaded as zeros: on a sliding layer the ring holds other positions
// there (or nothing yet).
constexpr int PQ = FLASH_PREFILL_QUERIES;

__device__ __forceinline__ uint32_t split_word(float a, float b, uint32_t *lo, bool split) {
  return split_pair(a, b, split ? lo : NULL);
}

// 8 consecutive values of a cache row as floats
__device__ __forceinline__ void kv8(const float *p, float v[8]) {
  float4 a = reinterpret_cast<const float4 *>(p)[0], b = reinterpret_cast<const float4 *>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void kv8(const __half *p, float v[8]) {
  uint4 u = *reinterpret_cast<const uint4 *>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&w[i]));
    v[2 * i] = f.x; v[2 * i + 1] = f.y;
  }
}

// keys k0 .. k0 + BK - 1 of key/value head g (zeros outside [klo, khi]) into
// the tiles at s: K hi, K lo, V hi, V lo (without the split: K, V)
template <int D, bool SPLIT, typename KT>
__device__ __forceinline__ void stage_cache(const flash_prefill_args &a, const dsess *S, uint32_t s, int k0, int klo, int khi,
                                            int g) {
  constexpr int CH = D / 8, TILE = BK * D * 2, NS = SPLIT ? 2 : 1;
  const KT *kc = (const KT *)S->k[a.layer], *vc = (const KT *)S->v[a.layer];
  for (int i = threadIdx.x; i < BK * CH; i += blockDim.x) {
    int r = i / CH, c = i % CH, kp = k0 + r;
    uint4 kh = make_uint4(0, 0, 0, 0), kl = kh, vh = kh, vl = kh;
    if (kp >= klo && kp <= khi) {
      size_t off = (size_t)gptoss_kv_slot(a.window != 0, S->ring, kp) * a.KV + g * D + c * 8;
      float k[8], v[8];
      kv8(kc + off, k);
      kv8(vc + off, v);
      kh = make_uint4(split_word(k[0], k[1], &kl.x, SPLIT), split_word(k[2], k[3], &kl.y, SPLIT),
                      split_word(k[4], k[5], &kl.z, SPLIT), split_word(k[6], k[7], &kl.w, SPLIT));
      vh = make_uint4(split_word(v[0], v[1], &vl.x, SPLIT), split_word(v[2], v[3], &vl.y, SPLIT),
                      split_word(v[4], v[5], &vl.z, SPLIT), split_word(v[6], v[7], &vl.w, SPLIT));
    }
    uint32_t at = swz<D>(r, c);
    asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(s + at), "r"(kh.x), "r"(kh.y), "r"(kh.z), "r"(kh.w));
    asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(s + NS * TILE + at), "r"(vh.x), "r"(vh.y), "r"(vh.z), "r"(vh.w));
    if (SPLIT) {
      asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(s + TILE + at), "r"(kl.x), "r"(kl.y), "r"(kl.z), "r"(kl.w));
      asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(s + 3 * TILE + at), "r"(vl.x), "r"(vl.y), "r"(vl.z), "r"(vl.w));
    }
  }
}

// a warp's 16 query rows r0 .. (zeros from n on) of head h from fp32, as A fragments
template <int D, bool SPLIT>
__device__ __forceinline__ void load_q(afrag<D> &q, const float *src, int ld, int c0, int r0, int n) {
  each_a<D>(c0, r0, [&](int ks, int i, int row, int col) {
    float2 v = row < n ? *reinterpret_cast<const float2 *>(src + (size_t)row * ld + col) : make_float2(0.f, 0.f);
    q.h[ks][i] = split_word(v.x, v.y, &q.l[ks][i], SPLIT);
  });
}

// grid (query tiles of 16, Hkv), a warp per query head of the group (8 at most)
template <int D, bool SPLIT, typename KT>
__global__ void __launch_bounds__(8 * 32, 2) prefill_kernel(flash_prefill_args a) {
  constexpr int TILE = BK * D * 2, NS = SPLIT ? 2 : 1;
  extern __shared__ __align__(128) unsigned char sm[];
  const uint32_t s = smem_addr(sm);
  int G = a.Hq / a.Hkv, g = blockIdx.y, h = g * G + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  int i0 = (gridDim.x - 1 - blockIdx.x) * PQ;   // the longest rows first
  const dsess *S = a.sess[a.sess_index];
  const int row[2] = {i0 + (lane >> 2), i0 + (lane >> 2) + 8};
  afrag<D> q;
  load_q<D, SPLIT>(q, a.q, a.Q, h * D, i0, a.n);
  float sink = __bfloat162float(a.sinks[h]), m[2] = {sink, sink}, l[2] = {0.f, 0.f}, o[D / 8][4] = {};
  // the keys the block's queries see: positions klo .. khi
  int qa = a.p0 + i0, khi = a.p0 + (i0 + PQ < a.n ? i0 + PQ : a.n) - 1;
  int klo = a.window && qa - a.window + 1 > 0 ? qa - a.window + 1 : 0;
  for (int kb = klo / BK; kb <= khi / BK; kb++) {
    __syncthreads();   // the last tile's readers are done with it
    stage_cache<D, SPLIT, KT>(a, S, s, kb * BK, klo, khi, g);
    __syncthreads();
    float c[8][4] = {};
    mma_rows<D, SPLIT>(c, q, s, s + TILE);
    online_softmax<D>(c, m, l, o, kb * BK, a.scale, [&](int i, int key) { return sees(a.p0 + row[i], key, a.window); });
    mma_cols<D, SPLIT>(o, c, s + NS * TILE, s + (NS + 1) * TILE);
  }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    float inv = 1.f / (l[i] + expf(sink - m[i]));
    if (row[i] >= a.n) continue;
    float *out = a.att + (size_t)row[i] * a.Q + h * D + 2 * (lane & 3);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) *reinterpret_cast<float2 *>(out + dt * 8) = make_float2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
  }
}

template <int D, bool SPLIT, typename KT> cudaError_t prefill(const flash_prefill_args &a, cudaStream_t s) {
  int smem = 2 * (SPLIT ? 2 : 1) * BK * D * 2;
  return launch(prefill_kernel<D, SPLIT, KT>, dim3((a.n + PQ - 1) / PQ, a.Hkv), 32 * (a.Hq / a.Hkv), smem, a, s);
}

template <int D> cudaError_t prefill_d(const flash_prefill_args &a, cudaStream_t s) {
  if (a.kv32) return a.split ? prefill<D, true, float>(a, s) : prefill<D, false, float>(a, s);
  return a.split ? prefill<D, true, __half>(a, s) : prefill<D, false, __half>(a, s);
}
// }======================================================

}   // namespace

bool flash_supported(int D) { return D == 16 || D == 32 || D == 64; }

#define FLASH_DISPATCH(fn)                                                               \
  switch (a->D) {                                                                        \
    case 16: return a->qkv_lo ? fn<16, true>(*a, s) : fn<16, false>(*a, s);              \
    case 32: return a->qkv_lo ? fn<32, true>(*a, s) : fn<32, false>(*a, s);              \
    case 64: return a->qkv_lo ? fn<64, true>(*a, s) : fn<64, false>(*a, s);              \
    default: return cudaErrorInvalidValue;                                               \
  }

cudaError_t launch_flash_fwd(const flash_args *a, cudaStream_t s) { FLASH_DISPATCH(fwd) }
cudaError_t launch_flash_bwd(const flash_args *a, cudaStream_t s) { FLASH_DISPATCH(bwd) }

bool flash_prefill_supported(int D, int Hq, int Hkv) { return flash_supported(D) && Hq % Hkv == 0 && Hq / Hkv <= 8; }

cudaError_t launch_flash_prefill(const flash_prefill_args *a, cudaStream_t s) {
  if (!flash_prefill_supported(a->D, a->Hq, a->Hkv) || a->n <= 0) return cudaErrorInvalidValue;
  switch (a->D) {
    case 16: return prefill_d<16>(*a, s);
    case 32: return prefill_d<32>(*a, s);
    default: return prefill_d<64>(*a, s);
  }
}
