/*
** matmul.c: weight rows (bf16, MXFP4) into fp32, the dot product, and the
** products against a layer's weights with their transposes (the backward),
** in plain C the compiler vectorises. Hot loops are cloned for AVX2/AVX-512
** and picked at load time, so one binary runs on any x86-64 and uses what
** the machine has.
*/
#include "cpu.h"

#define HOT GPTOSS_HOT

/* Sixteen partial sums: enough independent chains for the vector units, and
   a summation order that does not depend on the thread count. */
HOT float cpu_dot(const float *a, const float *b, int n) {
  float acc[16] = {0};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (int j = 0; j < 16; j++) s += acc[j];
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

HOT void cpu_bf16_row(float *dst, const uint16_t *src, int n) {
  uint32_t *d = (uint32_t *)dst;
  for (int i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}

typedef struct mm_job {
  const cpu_model *cm;
  float *out;
  int os, is, T, N, K;
  const float *in;
  const uint16_t *W, *bias;
  const uint8_t *blocks, *scales;
} mm_job;

/* Rows are independent, so each thread takes a contiguous range of them and
   converts each row once for all T tokens. */
static void mm_bf16_worker(void *ctx, int tid, int nth) {
  mm_job *j = ctx;
  int64_t lo, hi;
  gptoss_split(j->N, tid, nth, &lo, &hi);
  float *row = j->cm->rows + (size_t)tid * (size_t)j->cm->row_len;
  for (int64_t r = lo; r < hi; r++) {
    cpu_bf16_row(row, j->W + (size_t)r * (size_t)j->K, j->K);
    float b = j->bias ? gptoss_bf16_to_f32(j->bias[r]) : 0.0f;
    for (int t = 0; t < j->T; t++)
      j->out[(size_t)t * (size_t)j->os + (size_t)r] = cpu_dot(row, j->in + (size_t)t * (size_t)j->is, j->K) + b;
  }
}

void cpu_matmul_bf16(const cpu_model *cm, float *out, int os, const float *in, int is, int T,
                     const uint16_t *W, int N, int K, const uint16_t *bias) {
  mm_job j = { cm, out, os, is, T, N, K, in, W, bias, NULL, NULL };
  gptoss_pool_run(cm->pool, mm_bf16_worker, &j);
}

static void mm_mxfp4_worker(void *ctx, int tid, int nth) {
  mm_job *j = ctx;
  int64_t lo, hi;
  gptoss_split(j->N, tid, nth, &lo, &hi);
  float *row = j->cm->rows + (size_t)tid * (size_t)j->cm->row_len;
  int G = j->K / 32;
  for (int64_t r = lo; r < hi; r++) {
    gptoss_mxfp4_row(row, j->blocks + (size_t)r * (size_t)G * 16, j->scales + (size_t)r * (size_t)G, j->K);
    float b = j->bias ? gptoss_bf16_to_f32(j->bias[r]) : 0.0f;
    for (int t = 0; t < j->T; t++)
      j->out[(size_t)t * (size_t)j->os + (size_t)r] = cpu_dot(row, j->in + (size_t)t * (size_t)j->is, j->K) + b;
  }
}

void cpu_matmul_mxfp4(const cpu_model *cm, float *out, int os, const float *in, int is, int T,
                      const uint8_t *blocks, const uint8_t *scales, int N, int K, const uint16_t *bias) {
  mm_job j = { cm, out, os, is, T, N, K, in, NULL, bias, blocks, scales };
  gptoss_pool_run(cm->pool, mm_mxfp4_worker, &j);
}

/* {====================================================== transposed products (backward) */
/* Each thread owns a range of input features k (whole 32-blocks for MXFP4),
   walks every row once and adds dy[t][r] * W[r][k] for all t: no two
   threads write the same dx element. */
typedef struct mmt_job {
  const cpu_model *cm;
  float *dx;
  int xs, ys, T, N, K;
  const float *dy;
  const uint16_t *W;
  const uint8_t *blocks, *scales;
} mmt_job;

static void mmt_worker(void *ctx, int tid, int nth) {
  mmt_job *j = ctx;
  int64_t lo, hi;
  int unit = j->W ? 1 : 32;
  gptoss_split(j->K / unit, tid, nth, &lo, &hi);
  int k0 = (int)lo * unit, n = (int)(hi - lo) * unit, G = j->K / 32;
  if (n <= 0) return;
  float *row = j->cm->rows + (size_t)tid * (size_t)j->cm->row_len;
  for (int r = 0; r < j->N; r++) {
    if (j->W) cpu_bf16_row(row, j->W + (size_t)r * (size_t)j->K + k0, n);
    else gptoss_mxfp4_row(row, j->blocks + ((size_t)r * (size_t)G + (size_t)(k0 / 32)) * 16,
                       j->scales + (size_t)r * (size_t)G + (size_t)(k0 / 32), n);
    for (int t = 0; t < j->T; t++) {
      float a = j->dy[(size_t)t * (size_t)j->ys + (size_t)r];
      if (a == 0.0f) continue;
      float *d = j->dx + (size_t)t * (size_t)j->xs + k0;
      for (int i = 0; i < n; i++) d[i] += a * row[i];
    }
  }
}

void cpu_matmul_t_bf16(const cpu_model *cm, float *dx, int xs, const float *dy, int ys, int T, const uint16_t *W, int N, int K) {
  mmt_job j = { cm, dx, xs, ys, T, N, K, dy, W, NULL, NULL };
  gptoss_pool_run(cm->pool, mmt_worker, &j);
}

void cpu_matmul_t_mxfp4(const cpu_model *cm, float *dx, int xs, const float *dy, int ys, int T,
                        const uint8_t *blocks, const uint8_t *scales, int N, int K) {
  mmt_job j = { cm, dx, xs, ys, T, N, K, dy, NULL, blocks, scales };
  gptoss_pool_run(cm->pool, mmt_worker, &j);
}
/* }====================================================== */
