/*
** train.c: LoRA training's pass on the CPU, fp32: the reference that PEFT
** + transformers' autograd is checked against.
**
** One sequence at a time, positions 0..n-1 (packed examples: each from 0,
** attending within itself), no cache, through the layer of
** layer.c in training mode. The forward keeps only each layer's input
** (activation checkpointing per layer); the backward runs that layer
** forward again, keeping its intermediates, then walks back through it.
** Everything is allocated before the first layer: a failed allocation
** leaves the adapter's gradients as they were.
*/
#include <stdlib.h>
#include <string.h>
#include "cpu.h"

gptoss_status cpu_lora_train(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                             const int32_t *seg0, double *loss, int *count) {
  const gptoss_config *cfg = &m->cfg;
  cpu_model *cm = m->bm;
  int T = n, H = cfg->hidden_size, L = cfg->num_hidden_layers, V = cfg->vocab_size;
  int32_t *pos = cpu_alloc(sizeof(int32_t) * (size_t)T), *rows = cpu_alloc(sizeof(int32_t) * (size_t)T);
  float *xs = cpu_alloc(sizeof(float) * (size_t)(L + 1) * T * H);   /* each layer's input, then the output */
  float *dx = cpu_zalloc(sizeof(float) * (size_t)T * H), *xf = cpu_alloc(sizeof(float) * (size_t)T * H);
  float *inv = cpu_alloc(sizeof(float) * (size_t)T), *lg = cpu_alloc(sizeof(float) * (size_t)V * T);
  uint64_t dseed;
  float drop = (float)gptoss_adapter_dropout(a, &dseed);
  cpu_pass p = { .m = m, .cm = cm, .T = T, .pos = pos, .seg0 = seg0, .lora = 1, .train = 1, .adapter = a, .drop = drop,
                 .drop_key = gptoss_mix64(dseed ^ ((uint64_t)gptoss_adapter_steps(a) << 32)) };
  cpu_acts acts = {0};
  cpu_grads g = {0};
  gptoss_status rc = GPTOSS_OK;
  if (!pos || !rows || !xs || !dx || !xf || !inv || !lg || cpu_acts_alloc(&acts, &p, T) || cpu_grads_alloc(&g, cfg, T)) {
    rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory for the backward pass of %d tokens", n);
    goto done;
  }
  for (int t = 0; t < T; t++) pos[t] = seg0 ? t - seg0[t] : t;   /* packed: each example from 0 */
  cpu_embed(&p, xs, ids);
  for (int l = 0; l < L; l++) cpu_layer_forward(&p, &acts, l, xs + (size_t)l * T * H, xs + (size_t)(l + 1) * T * H);
  /* loss: position t predicts ids[t + 1] where mask[t + 1] */
  const float *xl = xs + (size_t)L * T * H;
  int nr = 0;
  for (int t = 0; t + 1 < T; t++) if (mask[t + 1]) rows[nr++] = t;
  cpu_head(&p, xl, rows, nr, xf, inv, lg);
  double total = 0;
  for (int i = 0; i < nr; i++)                 /* lg becomes d(loss sum)/d logits */
    total += cpu_cross_entropy(lg + (size_t)i * V, V, ids[rows[i] + 1]);
  memset(xf, 0, sizeof(float) * (size_t)T * H);
  cpu_matmul_t_bf16(cm, xf, H, lg, V, nr, m->lm_head->data, V, H);
  for (int i = 0; i < nr; i++)
    cpu_rmsnorm_backward(dx + (size_t)rows[i] * H, xl + (size_t)rows[i] * H, inv[i], m->norm->data, xf + (size_t)i * H, H);
  for (int l = L - 1; l >= 0; l--) {
    /* recompute the layer's intermediates (the last layer's are still
       there from the forward); xf takes the unused output */
    if (l < L - 1) cpu_layer_forward(&p, &acts, l, xs + (size_t)l * T * H, xf);
    cpu_layer_backward(&p, &acts, &g, l, xs + (size_t)l * T * H, dx);
  }
  *loss = total;
  *count = nr;
done:
  free(pos); free(rows); free(xs); free(dx); free(xf); free(inv); free(lg);
  cpu_acts_free(&acts);
  cpu_grads_free(&g);
  return rc;
}
