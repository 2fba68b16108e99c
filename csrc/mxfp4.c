/*
** mxfp4.c: MXFP4 rows to fp32 and blocks of fp32 to MXFP4 (see mxfp4.h).
*/
#include <math.h>
#include <string.h>
#include "mxfp4.h"

const float gptoss_fp4_values[16] = {
  +0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f,
};

/* byte -> (low nibble value, high nibble value): the low nibble comes first */
static float fp4_pairs[256][2];
__attribute__((constructor)) static void fp4_init(void) {
  for (int b = 0; b < 256; b++) {
    fp4_pairs[b][0] = gptoss_fp4_values[b & 15];
    fp4_pairs[b][1] = gptoss_fp4_values[b >> 4];
  }
}

void gptoss_mxfp4_row(float *dst, const uint8_t *blocks, const uint8_t *scales, int n) {
  int G = n / 32;
  for (int g = 0; g < G; g++) {
    float s = gptoss_e8m0(scales[g]);
    const uint8_t *b = blocks + 16 * g;
    float *o = dst + 32 * g;
    for (int j = 0; j < 16; j++) {
      o[2 * j] = fp4_pairs[b[j]][0] * s;
      o[2 * j + 1] = fp4_pairs[b[j]][1] * s;
    }
  }
}

/* The E2M1 code of q (|q| <= 6 by the choice of scale), rounded to nearest,
   ties to even, on q's bits as triton_kernels does: E2M1 keeps an exponent
   of 0..3 (bias 1) and one mantissa bit; below 1 it is subnormal (steps of
   0.5), so the implicit bit joins the mantissa there. Bits shifted out count
   as sticky, so a value just above a midpoint rounds up. */
static uint8_t e2m1(float q) {
  uint32_t u;
  memcpy(&u, &q, sizeof u);
  uint32_t sign = u >> 31, exp = (u >> 23) & 0xFF, man = u & 0x7FFFFF, sticky = 0;
  if (exp < 127) {
    uint32_t full = exp ? 0x800000u | man : man, shift = 127 - exp;
    sticky = shift < 32 ? (full & ((1u << shift) - 1)) != 0 : full != 0;
    man = shift < 32 ? full >> shift : 0;
    exp = 0;
  } else exp -= 126;
  uint32_t m2 = man >> 21, guard = m2 & 1, lsb = m2 >> 1;
  sticky |= (man & 0x1FFFFF) != 0;
  uint32_t code = (((exp << 2) | m2) + (guard & (sticky | lsb))) >> 1;
  return (uint8_t)(sign << 3 | (code > 7 ? 7 : code));
}

uint8_t gptoss_mxfp4_quantize(const float v[32], uint8_t out[16]) {
  float amax = 0;
  for (int k = 0; k < 32; k++) amax = fmaxf(amax, fabsf(v[k]));
  /* the fp32 quotient's bits rounded up to a power of two (its mantissa
     cleared, the exponent raised unless the mantissa was zero) */
  float d = amax / 6.0f;
  uint32_t bits;
  memcpy(&bits, &d, sizeof bits);
  uint32_t pow2 = (bits + 0x007FFFFFu) & 0x7F800000u;
  float scale;
  memcpy(&scale, &pow2, sizeof scale);
  float inv = pow2 ? 1.0f / scale : 0.0f;   /* exact: a power of two */
  for (int j = 0; j < 16; j++) out[j] = (uint8_t)(e2m1(v[2 * j] * inv) | e2m1(v[2 * j + 1] * inv) << 4);
  return (uint8_t)(pow2 >> 23);
}
