/*
** mxfp4.h: MXFP4 as gpt-oss stores its experts. A row of n = 32*G values
** is G blocks of 16 bytes, two E2M1 (FP4) codes a byte, low nibble first,
** and G E8M0 scales, one a block: value = code * 2^(scale - 127).
** The CPU backend and the merge decode rows here; the CUDA backend decodes
** in registers (kernels/common.cuh, kernels/moe.cu) with the same values.
*/
#ifndef GPTOSS_MXFP4_H
#define GPTOSS_MXFP4_H

#include <stdint.h>

/* the FP4 (E2M1) code points, bit 3 the sign */
extern const float gptoss_fp4_values[16];

/* 2^(e - 127); e = 0 is the subnormal 2^-127 */
static inline float gptoss_e8m0(uint8_t e) {
  union { uint32_t u; float f; } v;
  v.u = e ? (uint32_t)e << 23 : 0x00400000u;
  return v.f;
}

/* one MXFP4 row of n = 32*G values: blocks[G][16], scales[G] */
void gptoss_mxfp4_row(float *dst, const uint8_t *blocks, const uint8_t *scales, int n);

#endif
