/*
** mxfp4.h: MXFP4 as gpt-oss stores its experts. A row of n = 32*G values
** is G blocks of 16 bytes, two E2M1 (FP4) codes a byte, low nibble first,
** and G E8M0 scales, one a block: value = code * 2^(scale - 127).
** The CPU backend and the merge decode rows here, and the load of a bf16
** checkpoint encodes them (quantize.c); the CUDA backend decodes
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

/* The inverse, as OpenAI's quantizer rounds (triton_kernels'
   downcast_to_mxfp, which transformers' quantize_to_mxfp4 calls with its
   default DequantScaleRoundingMode.ROUND_UP): one block of 32 finite
   values to 16 bytes of E2M1 codes, returning the E8M0 scale. The scale is
   the power of two at or above max|v| / 6 (so nothing clips), the codes v
   divided by it rounded to the nearest FP4 value, ties to the even code. */
uint8_t gptoss_mxfp4_quantize(const float v[32], uint8_t out[16]);

#endif
