// train_experts.cu: the experts' LoRA products in LoRA training, every
// expert at once over the rows launch_moe_sort put in expert order: the
// forward's s B_e (A_e x), and the backward's gradients of A_e and B_e and
// share of dx. Ranks up to RANK_KERNEL_MAX run in kernels of their own
// (rank_down, rank_up, rank_grad); larger ones in grouped cuBLAS products.
#include "train.cuh"

// One fp32 product per expert, all in one cuBLAS call: the experts' LoRA
// products are small (rank 16 against each expert's few hundred rows), so
// 32 calls of each were mostly launch overhead. An operand is rows of a
// sorted buffer (base + offset[e] * ld) or an expert's slice of a LoRA
// matrix (base + e * stride).
struct grouped_operand {
  const float *base;
  size_t stride;             // per expert; 0: rows at the expert's offset
  int ld;
};

__global__ void grouped_ptrs_kernel(const float **ptrs, int E, const int32_t *off, grouped_operand a, grouped_operand b, grouped_operand c) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const grouped_operand ops[3] = {a, b, c};
  for (int i = 0; i < 3; i++)
    ptrs[i * E + e] = ops[i].base + (ops[i].stride ? e * ops[i].stride : (size_t)off[e] * ops[i].ld);
}

// Row-major C_e[M_e][N_e] = alpha op(A_e) op(B_e) + beta C_e for every expert;
// a dimension given as -1 is the expert's row count
static gptoss_status grouped_gemm(trainer *t, bool ta, bool tb, int M, int N, int K, float alpha, grouped_operand A,
                                  grouped_operand B, float beta, grouped_operand C) {
  const dims &d = t->v->d;
  const int32_t *off = t->off_host;
  CU(cudaEventSynchronize(t->ev_off));
  int E = d.E;
  int *mm = t->grouped_dims, *nn = mm + E, *kk = nn + E, *lda = kk + E, *ldb = lda + E, *ldc = ldb + E, *gs = ldc + E;
  float *al = (float *)(gs + E), *be = al + E;
  cublasOperation_t *opa = (cublasOperation_t *)(be + E), *opb = opa + E;
  for (int e = 0; e < E; e++) {
    int n = off[e + 1] - off[e];
    // cuBLAS is column-major: C^T = op(B)^T op(A)^T
    mm[e] = N < 0 ? n : N; nn[e] = M < 0 ? n : M; kk[e] = K < 0 ? n : K;
    opa[e] = tb ? CUBLAS_OP_T : CUBLAS_OP_N; opb[e] = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    lda[e] = B.ld; ldb[e] = A.ld; ldc[e] = C.ld; al[e] = alpha; be[e] = beta; gs[e] = 1;
  }
  grouped_ptrs_kernel<<<(E + 127) / 128, 128, 0, t->v->stream>>>(t->grouped_ptrs, E, t->mw.offsets, B, A, C);
  BLAS(cublasSgemmGroupedBatched(t->v->blas, opa, opb, mm, nn, kk, al, t->grouped_ptrs, lda, t->grouped_ptrs + E, ldb, be,
                                 (float *const *)(t->grouped_ptrs + 2 * E), ldc, E, gs));
  return GPTOSS_OK;
}

// grouped_operand of rows of a sorted buffer, and of a LoRA matrix's expert slices
static grouped_operand sorted_rows(const float *base, int ld) { grouped_operand o = {base, 0, ld}; return o; }
static grouped_operand expert_slices(const float *base, size_t per_expert, int ld) {
  grouped_operand o = {base, per_expert, ld};
  return o;
}

// The same products in kernels of their own, for ranks up to
// RANK_KERNEL_MAX: cuBLAS's grouped fp32 products take 128 x 128 tiles against a side of 16 and ran
// at a few percent of the GPU. Rows come in 64-row tiles of one expert (the
// sort's tile_offsets); an expert's matrix W_e(a, b) lives at
// W + e * es + a * sa + b * sb, so A (r x in), B (out x r) and their
// transposes are all the same kind of operand.
struct expert_matrix {
  const float *p;
  size_t es;
  int sa, sb;
};

__device__ __forceinline__ int tile_expert(const int32_t *tile_offsets, const int32_t *offsets, int E, int mt, int *row0, int *nrows) {
  if (mt >= tile_offsets[E]) return -1;
  int e = 0;
  while (tile_offsets[e + 1] <= mt) e++;
  *row0 = offsets[e] + (mt - tile_offsets[e]) * RANK_TILE;
  int n = offsets[e + 1] - *row0;
  *nrows = n < RANK_TILE ? n : RANK_TILE;
  return e;
}

// Upart[ks][i][k] = sum over chunk ks of c of X[i][c] W_e(k, c), k < r: a
// block per (tile, chunk of rank_chunk(R) columns), the chunk of W_e in
// shared memory, a warp per row with its lanes across the columns (X read once,
// coalesced); rank_sum_kernel adds the chunks in order

template <int R>   // r <= R, rounded up to a power of two: the rank loops unroll exactly
__global__ void __launch_bounds__(256) rank_down_kernel(const float *X, int ldx, int K, expert_matrix W, int r, float *Upart, size_t pstride,
                                                    const int32_t *offsets, const int32_t *tile_offsets, int E) {
  extern __shared__ float Ws[];      // [r][kc]
  int row0, nrows, e = tile_expert(tile_offsets, offsets, E, blockIdx.x, &row0, &nrows);
  if (e < 0) return;
  int kc = rank_chunk(R), c0 = blockIdx.y * kc, nc = K - c0 < kc ? K - c0 : kc;
  const float *We = W.p + e * W.es;
  for (int i = threadIdx.x; i < R * kc; i += 256) {
    int k = i / kc, c = i % kc;
    Ws[i] = c < nc && k < r ? We[(size_t)k * W.sa + (size_t)(c0 + c) * W.sb] : 0.f;
  }
  __syncthreads();
  // RW rows a warp at once: each W value read from shared memory serves RW
  // rows
  constexpr int RW = R <= 16 ? 4 : R == 32 ? 2 : 1;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool vec = ((ldx | c0) & 3) == 0 && ((uintptr_t)X & 15) == 0;
  float *Up = Upart + blockIdx.y * pstride;
  for (int r0 = warp * RW; r0 < nrows; r0 += 8 * RW) {
    const float *x[RW];
#pragma unroll
    for (int j = 0; j < RW; j++) x[j] = X + (size_t)(row0 + (r0 + j < nrows ? r0 + j : r0)) * ldx + c0;
    float acc[RW][R];
#pragma unroll
    for (int j = 0; j < RW; j++)
#pragma unroll
      for (int k = 0; k < R; k++) acc[j][k] = 0.f;
    // rows k >= r of Ws are zero; four columns a lane (four loads in
    // flight a row) where the rows are whole float4s
    int nv = vec ? nc / 128 * 128 : 0;   // columns taken in float4s
    for (int c = 4 * lane; c < nv; c += 128) {
      float4 xv[RW];
#pragma unroll
      for (int j = 0; j < RW; j++) xv[j] = *reinterpret_cast<const float4 *>(x[j] + c);
#pragma unroll
      for (int k = 0; k < R; k++) {
        float4 w = *reinterpret_cast<const float4 *>(Ws + k * kc + c);
#pragma unroll
        for (int j = 0; j < RW; j++) acc[j][k] += xv[j].x * w.x + xv[j].y * w.y + xv[j].z * w.z + xv[j].w * w.w;
      }
    }
    for (int c = nv + lane; c < nc; c += 32) {
      float xv[RW];
#pragma unroll
      for (int j = 0; j < RW; j++) xv[j] = x[j][c];
#pragma unroll
      for (int k = 0; k < R; k++) {
        float w = Ws[k * kc + c];
#pragma unroll
        for (int j = 0; j < RW; j++) acc[j][k] += xv[j] * w;
      }
    }
#pragma unroll
    for (int j = 0; j < RW; j++)
#pragma unroll
      for (int k = 0; k < R; k++) {
        if (k >= r) break;
        float v = warp_sum(acc[j][k]);
        if (lane == 0 && r0 + j < nrows) Up[(size_t)(row0 + r0 + j) * r + k] = v;
      }
  }
}

// U[i][k] = alpha sum_ks Upart[ks][i][k], the chunks in order
__global__ void rank_sum_kernel(const float *Upart, size_t pstride, int nks, float alpha, float *U, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = 0.f;
  for (int ks = 0; ks < nks; ks++) s += Upart[ks * pstride + i];
  U[i] = alpha * s;
}

// Y[i][n] += alpha sum_k U[i][k] W_e(n, k): a block per (tile, 64 columns), a
// thread per (column, every 4th row) with its column of W_e in registers,
// reading each row of U four values at a time (one broadcast to the warp:
// W's values read from shared memory once a product had bound it by
// shared-memory reads)
template <int R>
__global__ void __launch_bounds__(256) rank_up_kernel(const float *U, int r, expert_matrix W, int N, float alpha, float *Y, int ldy,
                                                  const int32_t *offsets, const int32_t *tile_offsets, int E) {
  __shared__ __align__(16) float Us[RANK_TILE][R];
  int row0, nrows, e = tile_expert(tile_offsets, offsets, E, blockIdx.x, &row0, &nrows);
  if (e < 0) return;
  int tid = threadIdx.x, n0 = blockIdx.y * 64, nn = N - n0 < 64 ? N - n0 : 64;
  for (int i = tid; i < RANK_TILE * R; i += 256) {
    int rr = i / R, k = i % R;
    Us[rr][k] = rr < nrows && k < r ? U[(size_t)(row0 + rr) * r + k] : 0.f;
  }
  __syncthreads();
  int n = tid % 64, quarter = tid / 64;
  if (n >= nn) return;
  const float *We = W.p + e * W.es + (size_t)(n0 + n) * W.sa;
  float w[R];
#pragma unroll
  for (int k = 0; k < R; k++) w[k] = k < r ? We[(size_t)k * W.sb] : 0.f;
  // every row's Y value loaded before any is stored (one at a time, each
  // load waited behind the previous row's store)
  float y[RANK_TILE / 4];
#pragma unroll
  for (int q = 0; q < RANK_TILE / 4; q++) {
    int rr = quarter + 4 * q;
    y[q] = rr < nrows ? Y[(size_t)(row0 + rr) * ldy + n0 + n] : 0.f;
  }
#pragma unroll
  for (int q = 0; q < RANK_TILE / 4; q++) {
    int rr = quarter + 4 * q;
    if (rr >= nrows) break;
    const float4 *u4 = reinterpret_cast<const float4 *>(Us[rr]);
    float acc = 0.f;
#pragma unroll
    for (int k4 = 0; k4 < R / 4; k4++) {
      float4 u = u4[k4];
      acc += u.x * w[4 * k4];
      acc += u.y * w[4 * k4 + 1];
      acc += u.z * w[4 * k4 + 2];
      acc += u.w * w[4 * k4 + 3];
    }
    Y[(size_t)(row0 + rr) * ldy + n0 + n] = y[q] + alpha * acc;
  }
}

// G_e(n, k) += alpha sum over e's rows i of P[i][n] U[i][k]: a block per
// (expert, 128 columns), the rows in a fixed order; a thread per (column,
// half of the ranks), reading its half of U's row four values at a time,
// the next 32 rows of P loaded into registers while these are summed
template <int R>
__global__ void __launch_bounds__(256) rank_grad_kernel(const float *P, int ldp, const float *U, int r, int N, float alpha, expert_matrix G,
                                                    const int32_t *offsets) {
  constexpr int HR = R / 2, PRE = 32 * 128 / 256;
  __shared__ float Ps[32][128];
  __shared__ __align__(16) float Us[32][R];
  int e = blockIdx.x, tid = threadIdx.x, n0 = blockIdx.y * 128, nn = N - n0 < 128 ? N - n0 : 128;
  int n = tid % 128, kg = tid / 128, i1 = offsets[e + 1];
  float acc[HR], pre[PRE];
#pragma unroll
  for (int q = 0; q < HR; q++) acc[q] = 0.f;
  auto fetch = [&](int i0) {
#pragma unroll
    for (int j = 0; j < PRE; j++) {
      int i = tid + 256 * j, rr = i / 128, c = i % 128;
      pre[j] = i0 + rr < i1 && c < nn ? P[(size_t)(i0 + rr) * ldp + n0 + c] : 0.f;
    }
  };
  if (offsets[e] < i1) fetch(offsets[e]);
  for (int i0 = offsets[e]; i0 < i1; i0 += 32) {
    int ni = i1 - i0 < 32 ? i1 - i0 : 32;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < PRE; j++) Ps[(tid + 256 * j) / 128][(tid + 256 * j) % 128] = pre[j];
    for (int i = tid; i < 32 * R; i += 256) {
      int rr = i / R, k = i % R;
      Us[rr][k] = rr < ni && k < r ? U[(size_t)(i0 + rr) * r + k] : 0.f;
    }
    __syncthreads();
    if (i0 + 32 < i1) fetch(i0 + 32);
    for (int rr = 0; rr < ni; rr++) {
      float p = Ps[rr][n];
      const float4 *u4 = reinterpret_cast<const float4 *>(&Us[rr][kg * HR]);
#pragma unroll
      for (int q4 = 0; q4 < HR / 4; q4++) {   // columns k >= r of Us are zero
        float4 u = u4[q4];
        acc[4 * q4] += p * u.x;
        acc[4 * q4 + 1] += p * u.y;
        acc[4 * q4 + 2] += p * u.z;
        acc[4 * q4 + 3] += p * u.w;
      }
    }
  }
  if (n >= nn) return;
  float *Ge = (float *)G.p + e * G.es;
#pragma unroll
  for (int q = 0; q < HR; q++) {
    int k = kg * HR + q;
    if (k < r) Ge[(size_t)(n0 + n) * G.sa + (size_t)k * G.sb] += alpha * acc[q];
  }
}

static int rank_tiles(const trainer *t) { return t->T * t->v->d.K / RANK_TILE + t->v->d.E; }

static gptoss_status rank_down(trainer *t, const float *X, int ldx, int K, expert_matrix W, int r, float alpha, float *U) {
  int R = rank_rounded(r), kc = rank_chunk(R), nks = (K + kc - 1) / kc;
  size_t n = (size_t)t->T * t->v->d.K * r, smem = sizeof(float) * R * kc;
  void (*k)(const float *, int, int, expert_matrix, int, float *, size_t, const int32_t *, const int32_t *, int) =
      R == 8 ? rank_down_kernel<8> : R == 16 ? rank_down_kernel<16> : R == 32 ? rank_down_kernel<32> : rank_down_kernel<64>;
  CU(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  k<<<dim3(rank_tiles(t), nks), 256, smem, t->v->stream>>>(X, ldx, K, W, r, t->rank_parts, n, t->mw.offsets, t->mw.tile_offsets, t->v->d.E);
  rank_sum_kernel<<<(unsigned)((n + 255) / 256), 256, 0, t->v->stream>>>(t->rank_parts, n, nks, alpha, U, n);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

static gptoss_status rank_up(trainer *t, const float *U, int r, expert_matrix W, int N, float alpha, float *Y, int ldy) {
  int R = rank_rounded(r);
  void (*k)(const float *, int, expert_matrix, int, float, float *, int, const int32_t *, const int32_t *, int) =
      R == 8 ? rank_up_kernel<8> : R == 16 ? rank_up_kernel<16> : R == 32 ? rank_up_kernel<32> : rank_up_kernel<64>;
  k<<<dim3(rank_tiles(t), (N + 63) / 64), 256, 0, t->v->stream>>>(U, r, W, N, alpha, Y, ldy, t->mw.offsets, t->mw.tile_offsets,
                                                             t->v->d.E);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

static gptoss_status rank_grad(trainer *t, const float *P, int ldp, const float *U, int r, int N, float alpha, expert_matrix G) {
  int R = rank_rounded(r);
  void (*k)(const float *, int, const float *, int, int, float, expert_matrix, const int32_t *) =
      R == 8 ? rank_grad_kernel<8> : R == 16 ? rank_grad_kernel<16> : R == 32 ? rank_grad_kernel<32> : rank_grad_kernel<64>;
  k<<<dim3(t->v->d.E, (N + 127) / 128), 256, 0, t->v->stream>>>(P, ldp, U, r, N, alpha, G, t->mw.offsets);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

static expert_matrix expert_matrix_of(const float *p, size_t es, int sa, int sb) { expert_matrix m = {p, es, sa, sb}; return m; }

// every expert's U = A_e x, which the backward that follows the recompute reads
gptoss_status lora_experts_ax(trainer *t, const dlora *L, const float *x, int ldx, float *U) {
  if (!L->host) return GPTOSS_OK;
  int r = L->r;
  size_t sa = (size_t)r * L->in;
  if (r <= RANK_KERNEL_MAX) return rank_down(t, x, ldx, L->in, expert_matrix_of(L->A, sa, L->in, 1), r, 1.f, U);
  return grouped_gemm(t, false, true, -1, r, L->in, 1.f, sorted_rows(x, ldx), expert_slices(L->A, sa, L->in), 0.f, sorted_rows(U, r));
}

// every expert's y += s B_e (A_e x) (forward); A_e x into U
gptoss_status lora_experts_fwd(trainer *t, const dlora *L, const float *x, int ldx, float *y, int ldy, float *U) {
  if (!L->host) return GPTOSS_OK;
  TRY(lora_experts_ax(t, L, x, ldx, U));
  int r = L->r;
  size_t sb = (size_t)L->out * r;
  if (r <= RANK_KERNEL_MAX) return rank_up(t, U, r, expert_matrix_of(L->B, sb, r, 1), L->out, L->scale, y, ldy);
  return grouped_gemm(t, false, true, -1, L->out, r, L->scale, sorted_rows(U, r), expert_slices(L->B, sb, r), 1.f, sorted_rows(y, ldy));
}

// The backward of an expert LoRA, in three parts: gB += s dy^T U (U = A_e x,
// the recompute's), lora_dh = s dy B_e, gA += lora_dh^T x
gptoss_status lora_experts_gB(trainer *t, const dlora *L, const float *dy, int ldy, const float *U) {
  int r = L->r;
  size_t sb = (size_t)L->out * r;
  if (r <= RANK_KERNEL_MAX) return rank_grad(t, dy, ldy, U, r, L->out, L->scale, expert_matrix_of(L->gB, sb, r, 1));
  return grouped_gemm(t, true, false, L->out, r, -1, L->scale, sorted_rows(dy, ldy), sorted_rows(U, r), 1.f, expert_slices(L->gB, sb, r));
}

gptoss_status lora_experts_dh(trainer *t, const dlora *L, const float *dy, int ldy) {
  int r = L->r;
  size_t sb = (size_t)L->out * r;
  if (r <= RANK_KERNEL_MAX) return rank_down(t, dy, ldy, L->out, expert_matrix_of(L->B, sb, 1, r), r, L->scale, t->lora_dh);
  return grouped_gemm(t, false, false, -1, r, L->out, L->scale, sorted_rows(dy, ldy), expert_slices(L->B, sb, r), 0.f, sorted_rows(t->lora_dh, r));
}

gptoss_status lora_experts_gA(trainer *t, const dlora *L, const float *x, int ldx) {
  int r = L->r;
  size_t sa = (size_t)r * L->in;
  if (r <= RANK_KERNEL_MAX) return rank_grad(t, x, ldx, t->lora_dh, r, L->in, 1.f, expert_matrix_of(L->gA, sa, 1, L->in));
  return grouped_gemm(t, true, false, r, L->in, -1, 1.f, sorted_rows(t->lora_dh, r), sorted_rows(x, ldx), 1.f, expert_slices(L->gA, sa, L->in));
}

// all three, for output gradient dy; leaves s dy B_e in lora_dh
gptoss_status lora_experts_grads(trainer *t, const dlora *L, const float *x, int ldx, const float *U, const float *dy,
                                        int ldy) {
  if (!L->host) return GPTOSS_OK;
  TRY(lora_experts_gB(t, L, dy, ldy, U));
  TRY(lora_experts_dh(t, L, dy, ldy));
  return lora_experts_gA(t, L, x, ldx);
}

// every expert's dx += (s dy B_e) A_e, from lora_dh
gptoss_status lora_experts_dx(trainer *t, const dlora *L, float *dx, int lddx) {
  if (!L->host) return GPTOSS_OK;
  if (L->r <= RANK_KERNEL_MAX) return rank_up(t, t->lora_dh, L->r, expert_matrix_of(L->A, (size_t)L->r * L->in, 1, L->in), L->in, 1.f, dx, lddx);
  return grouped_gemm(t, false, false, -1, L->in, L->r, 1.f, sorted_rows(t->lora_dh, L->r), expert_slices(L->A, (size_t)L->r * L->in, L->in), 1.f,
               sorted_rows(dx, lddx));
}
