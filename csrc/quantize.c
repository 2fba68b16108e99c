/*
** quantize.c: a bf16 checkpoint's experts to MXFP4 at load.
**
** Hugging Face's unquantized gpt-oss (unsloth/gpt-oss-20b-BF16, any model
** merged to 16 bits, gptoss's own merge with expert LoRAs) holds the
** experts as bf16 gate_up_proj [E][H][2I] and down_proj [E][I][H], used as
** x @ W. The engine runs MXFP4 experts only (the CPU decodes rows, the CUDA
** kernels decode in registers), so the load quantizes them once, the way
** OpenAI's quantizer does (gptoss_mxfp4_quantize), into the checkpoint
** layout [E][out][in/32][16] and [E][out][in/32]: blocks of 32 along the
** reduction dimension. Everything else stays mapped.
*/
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend.h"
#include "mxfp4.h"

/* {====================================================== one matrix */
typedef struct q_job {
  const uint16_t *src;               /* [E][in][out] bf16 */
  uint8_t *blocks, *scales;          /* [E][out][in/32][16], [E][out][in/32] */
  int E, in, out;
  _Atomic int64_t bad;               /* a non-finite element's index, or -1 */
} q_job;

/* A work item is (expert, block column g): the 32 input rows of g are read
   side by side, a row of `out` values at a time, so every read streams. */
static void quantize_part(void *ctx, int tid, int nth) {
  q_job *j = ctx;
  int G = j->in / 32;
  int64_t lo, hi;
  gptoss_split((int64_t)j->E * G, tid, nth, &lo, &hi);
  float v[32];
  for (int64_t it = lo; it < hi; it++) {
    int64_t e = it / G, g = it % G;
    const uint16_t *rows = j->src + ((size_t)e * j->in + (size_t)g * 32) * j->out;
    for (int o = 0; o < j->out; o++) {
      for (int k = 0; k < 32; k++) {
        uint16_t h = rows[(size_t)k * j->out + o];
        if ((h & 0x7F80) == 0x7F80) atomic_store(&j->bad, (int64_t)((size_t)(e * j->in + g * 32 + k) * j->out + o));
        v[k] = gptoss_bf16_to_f32(h);
      }
      size_t r = ((size_t)e * j->out + o) * G + g;   /* block g of output row o */
      j->scales[r] = gptoss_mxfp4_quantize(v, j->blocks + 16 * r);
    }
  }
}
/* }====================================================== */

/* {====================================================== the model's experts */
static void name_tensor(gptoss_qexperts *q, int k, int layer, const char *suffix, const gptoss_tensor *src) {
  snprintf(q->name[k], sizeof q->name[k], "model.layers.%d.mlp.experts.%s", layer, suffix);
  q->t[k].name = q->name[k];
  q->t[k].file = src->file;
}

gptoss_status gptoss_experts_quantize(gptoss_model *m, int threads, const gptoss_model_opts *o, uint64_t total, int report_bytes) {
  const gptoss_config *c = &m->cfg;
  int L = c->num_hidden_layers, E = c->num_local_experts, H = c->hidden_size, I = c->intermediate_size;
  /* per layer: gate_up's 2I rows of H/32 blocks, down's H rows of I/32 */
  size_t gu_n = (size_t)E * 2 * I * (H / 32), dn_n = (size_t)E * H * (I / 32);
  size_t per_layer = 17 * (gu_n + dn_n);   /* 16 bytes of codes and one scale a block */
  m->experts_q = calloc((size_t)L, sizeof *m->experts_q);
  m->experts_q_data = malloc(per_layer * (size_t)L);
  if (!m->experts_q || !m->experts_q_data)
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the MXFP4 experts (%.2f GB)", per_layer * (double)L / 1e9);
  m->experts_q_bytes = per_layer * (size_t)L;
  int nth = threads < 1 ? 1 : threads;
  gptoss_pool *pool = nth > 1 ? gptoss_pool_new(nth) : NULL;
  gptoss_status rc = GPTOSS_OK;
  uint64_t done = 0;
  for (int l = 0; l < L && !rc; l++) {
    gptoss_qexperts *q = &m->experts_q[l];
    uint8_t *p = m->experts_q_data + per_layer * (size_t)l;
    for (int w = 0; w < 2 && !rc; w++) {   /* 0: gate_up, 1: down */
      const gptoss_tensor *src = m->experts_bf16[l][w];
      int in = w ? I : H, out = w ? H : 2 * I;
      size_t nb = w ? dn_n : gu_n;
      gptoss_tensor *tb = &q->t[2 * w], *ts = &q->t[2 * w + 1];
      name_tensor(q, 2 * w, l, w ? "down_proj_blocks" : "gate_up_proj_blocks", src);
      name_tensor(q, 2 * w + 1, l, w ? "down_proj_scales" : "gate_up_proj_scales", src);
      tb->dtype = ts->dtype = GPTOSS_U8;
      tb->ndim = 4; ts->ndim = 3;
      tb->shape[0] = ts->shape[0] = E;
      tb->shape[1] = ts->shape[1] = out;
      tb->shape[2] = ts->shape[2] = in / 32;
      tb->shape[3] = 16;
      tb->data = p; tb->nbytes = 16 * nb; p += 16 * nb;
      ts->data = p; ts->nbytes = nb; p += nb;
      q_job j = {src->data, (uint8_t *)tb->data, (uint8_t *)ts->data, E, in, out, -1};
      gptoss_pool_run(pool, quantize_part, &j);
      int64_t bad = atomic_load(&j.bad);
      if (bad >= 0) {
        rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s' holds a non-finite value at [%lld][%lld][%lld]; MXFP4 has none",
                         src->file, src->name, (long long)(bad / ((int64_t)in * out)), (long long)(bad / out % in),
                         (long long)(bad % out));
        break;
      }
      LAYER_T(m, l, w ? GPTOSS_T_DN_BLOCKS : GPTOSS_T_GU_BLOCKS) = tb;
      LAYER_T(m, l, w ? GPTOSS_T_DN_SCALES : GPTOSS_T_GU_SCALES) = ts;
      done += src->nbytes;
    }
    if (!rc && o->progress && o->progress(o->progress_ud, report_bytes ? done : 0, total))
      rc = gptoss_fail(GPTOSS_ESTATE, "%s: the load was cancelled", m->dir);
  }
  gptoss_pool_free(pool);
  return rc;
}

void gptoss_experts_drop(gptoss_model *m) {
  if (!m->experts_q) return;
  for (int l = 0; l < m->cfg.num_hidden_layers; l++)
    for (int k = 0; k < 4; k++) m->experts_q[l].t[k].data = NULL;
  free(m->experts_q_data);
  m->experts_q_data = NULL;
}
/* }====================================================== */
