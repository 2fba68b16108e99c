// shim.h: what kernels/common.cuh gives the mma.sync kernels, for the CPU:
// CUDA's vector types and bf16 (round to nearest even), the intrinsics the
// device helpers use, the thread indices of warp.cpp's lanes, mma16816 as
// warp.cpp's meeting point, and launch_k for a kernel launch. The device
// helpers themselves are common.cuh's, cut out by gen.lua (helpers.inc).
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <math.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <algorithm>
#include <functional>
#include <vector>
#include <ucontext.h>
#include <utility>
using std::min; using std::max;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
struct uint4 { uint32_t x, y, z, w; };
struct float4 { float x, y, z, w; };
struct uint3s { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
typedef int cudaError_t; typedef void *cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return 0; }
struct bf16 { uint16_t b; };
typedef bf16 __nv_bfloat16;
struct __nv_bfloat162 { bf16 x, y; };
inline float __bfloat162float(bf16 v) { uint32_t u = (uint32_t)v.b << 16; float f; memcpy(&f, &u, 4); return f; }
inline bf16 f2bf(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{(uint16_t)((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1);
  return bf16{(uint16_t)(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{f2bf(a), f2bf(b)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162{f2bf(__bfloat162float(a.x) * __bfloat162float(b.x)), f2bf(__bfloat162float(a.y) * __bfloat162float(b.y))};
}
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  uint8_t b[8]; memcpy(b, &x, 4); memcpy(b + 4, &y, 4);
  uint32_t r = 0;
  for (int i = 0; i < 4; i++) r |= (uint32_t)b[(s >> (4 * i)) & 7] << (8 * i);
  return r;
}
inline float __expf(float x) { return expf(x); }
void sim_check_align(const void *p, size_t a, const char *what);
template <typename T> inline T __ldg(const T *p) { sim_check_align(p, sizeof(T) >= 16 ? 16 : sizeof(T), "__ldg"); return *p; }

struct moe_work { int32_t *counts, *offsets, *tile_offsets, *cursor, *perm; };
struct dlayer {
  const bf16 *attn_norm, *mlp_norm, *qkv_w, *qkv_b, *o_w, *o_b, *sinks, *router_w, *router_b;
  const uint8_t *gu_blocks, *gu_scales; const bf16 *gu_bias;
  const uint8_t *dn_blocks, *dn_scales; const bf16 *dn_bias;
};
struct dims { int H, I, L, Hq, Hkv, D, Q, KV, E, K, V, window; int e_lo, e_hi; int kv32; float eps, limit, rope_scale; };

// ---- SIMT emulation: one coroutine a lane; mma16816 is the warp's meeting point
uint3s sim_tid(); uint3s sim_bid(); dim3 sim_bdim(); dim3 sim_gdim();
#define threadIdx (sim_tid())
#define blockIdx (sim_bid())
#define blockDim (sim_bdim())
#define gridDim (sim_gdim())
void mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
void sim_run_block(dim3 grid, dim3 bid, int threads, const std::function<void()> &body);
template <typename... P, typename... A> void launch_k(void (*k)(P...), dim3 grid, int threads, A... args) {
  std::function<void()> body = [=]() { k(args...); };
  for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) sim_run_block(grid, dim3(bx, by), threads, body);
}
#include "helpers.inc"   // common.cuh's device helpers, extracted by gen.lua
size_t dense_mma_part_floats(int T, int out);
cudaError_t launch_dense_mma(const bf16 *W, const bf16 *X, const bf16 *X_lo, float *Y, int out, int T, int in, float *part,
                             size_t part_floats, cudaStream_t s);
void launch_moe_gate_up_mma(const bf16 *xn, const bf16 *xn_lo, const moe_work *w, const dlayer *l, const dims *d,
                            const float *delta, float *act, cudaStream_t s);
void launch_moe_down_mma(const float *act, int split, const moe_work *w, const dlayer *l, const dims *d, float *y, cudaStream_t s);
