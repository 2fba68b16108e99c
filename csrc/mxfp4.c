/*
** mxfp4.c: MXFP4 rows to fp32 (see mxfp4.h).
*/
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
