/*
** optim8.c: AdamW with 8-bit moments, as bitsandbytes' AdamW8bit
** (optim_bits=8, its blockwise kernel kOptimizerStatic8bit2StateBlockwise):
** each moment is a uint8 code per weight into a map of 256 values, scaled
** by an fp32 absmax per block of 256 weights. A step dequantizes a block,
** updates it in float, and quantizes it again to the nearest codes.
** optim.c drives it (threads, clipping, the state file).
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include "adapter_impl.h"

/* This file is built with -ffp-contract=off (Makefile): every product and
   sum below rounds on its own, in bitsandbytes' order, on every target, so
   that a reference in another language can follow it to the bit. */
/* {====================================================== the dynamic map */
/* create_dynamic_map(signed, max_exponent_bits=7, total_bits=8) of
   bitsandbytes.functional: for exponents i = 0..6, the midpoints of
   torch.linspace(0.1, 1, 2^i + 1) (signed; unsigned 2^(i+1) + 1) times
   10^(i-6), with their negatives when signed, then 0 and 1, sorted. All
   float32, as torch computes it. */
static float dyn_map[2][257];   /* [is_signed]; [256] is +inf, for the search below */
static pthread_once_t dyn_once = PTHREAD_ONCE_INIT;

/* torch.linspace(lo, hi, n)[i] in float32 as its CPU kernel computes it:
   the first half up from lo, the rest down from hi */
static float linspace_at(float lo, float hi, int n, int i) {
  float step = (hi - lo) / (float)(n - 1);
  return i < n / 2 ? lo + step * (float)i : hi - step * (float)(n - 1 - i);
}

static int by_value(const void *x, const void *y) {
  float a = *(const float *)x, b = *(const float *)y;
  return (a > b) - (a < b);
}

static void build_map(float *map, int is_signed) {
  /* Python's 10 ** (i - 6) (a double; 1 for i = 6), as torch takes it into float */
  static const double tens[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1};
  int k = 0;
  for (int i = 0; i < 7; i++) {
    int n = (is_signed ? 1 << i : 2 << i) + 1;   /* boundaries; n - 1 midpoints */
    for (int j = 0; j + 1 < n; j++) {
      float mid = (linspace_at((float)0.1, 1.0f, n, j) + linspace_at((float)0.1, 1.0f, n, j + 1)) / 2.0f;
      float v = (float)tens[i] * mid;
      map[k++] = v;
      if (is_signed) map[k++] = -v;
    }
  }
  map[k++] = 0;
  map[k++] = 1;
  qsort(map, 256, sizeof(float), by_value);
}

/* bitsandbytes' kernels find a value's code by bisecting the map from 127
   (dQuantize, quantize_2D without rounding at random): seven halvings land
   on an even index p, and x goes to p's neighbour on its side when it is
   past their float midpoint. The code so found is the nearer end of the
   interval [map[k], map[k + 1]) holding x, judged against the float
   midpoint, and on the midpoint the even one. Here the interval comes from
   a table over x's top 14 bits (as an ordered integer: sign, exponent, 5
   bits of mantissa) and a step or two up: 3 ns a value against the
   bisection's 15 (seven dependent loads). */
#define LUT_BITS 14
static uint8_t dyn_lut[2][1 << LUT_BITS];   /* [is_signed][bucket]: the interval of the bucket's least value */
static int dyn_steps[2];                     /* the most steps up any bucket in [-1, 1] needs */

/* float bits as an integer in the floats' order (-0 just below +0) */
static uint32_t ordered(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u >> 31 ? ~u : u | 0x80000000u;
}

static float from_ordered(uint32_t k) {
  uint32_t u = k >> 31 ? k & 0x7fffffffu : ~k;
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

/* the largest k with map[k] <= x (0 below map[0]) */
static int interval(const float *map, float x) {
  int k = 0;
  while (k < 255 && map[k + 1] <= x) k++;
  return k;
}

static void build_lut(const float *map, uint8_t *lut, int *steps) {
  *steps = 0;
  for (uint32_t b = 0; b < 1u << LUT_BITS; b++) {
    float lo = from_ordered(b << (32 - LUT_BITS)), hi = from_ordered(((b + 1) << (32 - LUT_BITS)) - 1);
    lut[b] = (uint8_t)interval(map, lo);
    if (lo <= 1 && hi >= -1) {   /* x / absmax is in [-1, 1] */
      int up = interval(map, hi < 1 ? hi : 1) - lut[b];
      if (up > *steps) *steps = up;
    }
  }
}

/* without branches (which way a value goes is a coin toss): map[256] = inf
   ends the steps up at 255, and its midpoint with 255 is inf */
static inline int nearest_code(const float *map, const uint8_t *lut, int steps, float x) {
  int k = lut[ordered(x) >> (32 - LUT_BITS)];
  for (int s = 0; s < steps; s++) k += map[k + 1] <= x;
  float mid = (map[k] + map[k + 1]) * 0.5f;
  return k + (x > mid) + ((x == mid) & k & 1);
}

static void build_maps(void) {
  for (int s = 0; s < 2; s++) {
    build_map(dyn_map[s], s);
    dyn_map[s][256] = INFINITY;
    build_lut(dyn_map[s], dyn_lut[s], &dyn_steps[s]);
  }
}

const float *gptoss_dynamic_map(int is_signed) {
  pthread_once(&dyn_once, build_maps);
  return dyn_map[is_signed != 0];
}
/* }====================================================== */

/* {====================================================== quantization */
size_t gptoss_q8_blocks(size_t n) { return (n + GPTOSS_Q8_BLOCK - 1) / GPTOSS_Q8_BLOCK; }

/* one block of len values, its absmax given: codes. fix_sign: the
   optimizer's first moment keeps its sign (a small negative value would
   round to the zero code, whose sign bit is clear: it takes the code
   below, as the kernel does). */
static void quantize_block(int is_signed, const float *x, size_t len, float absmax, uint8_t *codes, int fix_sign) {
  const float *map = dyn_map[is_signed];
  const uint8_t *lut = dyn_lut[is_signed];
  int steps = dyn_steps[is_signed];
  if (!(absmax > 0)) {   /* all zeros: what bitsandbytes' quantize_blockwise writes */
    memset(codes, 0, len);
    return;
  }
  for (size_t k = 0; k < len; k++) {
    int c = nearest_code(map, lut, steps, x[k] / absmax);
    if (fix_sign && !signbit(map[c]) != !signbit(x[k])) c += x[k] > 0 ? 1 : -1;
    codes[k] = (uint8_t)c;
  }
}

void gptoss_quantize_blockwise(const float *x, size_t n, int is_signed, uint8_t *codes, float *absmax) {
  gptoss_dynamic_map(is_signed);   /* built */
  is_signed = is_signed != 0;
  for (size_t lo = 0, b = 0; lo < n; lo += GPTOSS_Q8_BLOCK, b++) {
    size_t len = n - lo < GPTOSS_Q8_BLOCK ? n - lo : GPTOSS_Q8_BLOCK;
    float mx = 0;
    for (size_t k = 0; k < len; k++) mx = fmaxf(mx, fabsf(x[lo + k]));
    absmax[b] = mx;
    quantize_block(is_signed, x + lo, len, mx, codes + lo, 0);
  }
}
/* }====================================================== */

/* {====================================================== the update */
/* The kernel's constants: lr, betas, eps and weight decay as float, the
   bias corrections from the float betas (bitsandbytes takes beta^t with
   the GPU's fast __powf; here pow, rounded) */
void gptoss_adamw8_prepare(adamw8_step *c, const gptoss_adamw *o, float gs, int step) {
  float lr = (float)o->lr, wd = (float)o->weight_decay;
  c->beta1 = (float)o->beta1;
  c->beta2 = (float)o->beta2;
  c->gs = gs;
  float bc1 = 1.0f - (float)pow(c->beta1, step), bc2 = sqrtf(1.0f - (float)pow(c->beta2, step));
  c->step_size = -lr * bc2 / bc1;
  c->eps = bc2 * (float)o->eps;
  c->decay = wd > 0 ? 1.0f - lr * wd : 1.0f;
}

/* Per weight, in the kernel's order: the moments from their codes, then
   v = v b2 + (1 - b2) g g and m = m b1 + (1 - b1) g, the weight
   p += step_size m / (sqrt(v) + eps) and then decayed (bitsandbytes
   decays after the update, torch before it); then the block's new absmax
   and codes. Divisions are exact here (the GPU's __fdividef is not). */
void gptoss_adamw8_span(float *p, const float *g, lora_train *t, int w, size_t lo, size_t n, const adamw8_step *c) {
  const float *smap = gptoss_dynamic_map(1), *umap = gptoss_dynamic_map(0);
  uint8_t *cm = t->q8[2 * w] + lo, *cv = t->q8[2 * w + 1] + lo;
  float *am = t->absmax8[2 * w] + lo / GPTOSS_Q8_BLOCK, *av = t->absmax8[2 * w + 1] + lo / GPTOSS_Q8_BLOCK;
  const float b1 = c->beta1, b2 = c->beta2, gs = c->gs, step_size = c->step_size, eps = c->eps, decay = c->decay;
  float m[GPTOSS_Q8_BLOCK], v[GPTOSS_Q8_BLOCK];
  for (size_t b0 = 0, b = 0; b0 < n; b0 += GPTOSS_Q8_BLOCK, b++) {
    size_t len = n - b0 < GPTOSS_Q8_BLOCK ? n - b0 : GPTOSS_Q8_BLOCK;
    float m_abs = 0, v_abs = 0, am_old = am[b], av_old = av[b];
    for (size_t k = 0; k < len; k++) {
      size_t i = b0 + k;
      float gk = g[i] * gs;
      float vk = umap[cv[i]] * av_old, mk = smap[cm[i]] * am_old;
      vk = vk * b2 + (1.0f - b2) * gk * gk;
      mk = mk * b1 + (1.0f - b1) * gk;
      m[k] = mk;
      v[k] = vk;
      m_abs = fmaxf(m_abs, fabsf(mk));
      v_abs = fmaxf(v_abs, fabsf(vk));
      p[i] = (p[i] + step_size * (mk / (sqrtf(vk) + eps))) * decay;   /* decay 1: exactly the update */
    }
    am[b] = m_abs;
    av[b] = v_abs;
    quantize_block(1, m, len, m_abs, cm + b0, 1);
    quantize_block(0, v, len, v_abs, cv + b0, 0);
  }
}

gptoss_status gptoss_adamw8_alloc(lora_train *t, size_t nA, size_t nB) {
  for (int k = 0; k < 4; k++) {
    size_t n = k < 2 ? nA : nB, blocks = gptoss_q8_blocks(n);
    if (!t->q8[k]) t->q8[k] = calloc(n ? n : 1, 1);
    if (!t->absmax8[k]) t->absmax8[k] = calloc(blocks ? blocks : 1, sizeof(float));
    if (!t->q8[k] || !t->absmax8[k]) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the optimizer state");
  }
  return GPTOSS_OK;
}
/* }====================================================== */
