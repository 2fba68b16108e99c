/*
** adapter.c: the LoRA adapter object: its modules, references and
** versions, its check against a model, a new one for training, and
** copying weights between two. Its files are PEFT's (peft.c); training
** adds gradients and AdamW (optim.c); merge.c folds it into a checkpoint.
**
** PEFT names a LoRA on gpt-oss's attention projections
**   base_model.model.model.layers.<l>.self_attn.<q|k|v|o>_proj.lora_A.weight [r][in]
**   base_model.model.model.layers.<l>.self_attn.<q|k|v|o>_proj.lora_B.weight [out][r]
** and computes y = W x + b + s * B (A x), s = alpha / r, or alpha / sqrt(r)
** with use_rslora.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapter_impl.h"

const char *const gptoss_lora_names[GPTOSS_LORA_MODULES] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"};

/* one counter for all adapters, so that a version is never reused, even by
   an adapter allocated where a freed one was */
static uint64_t g_version;
void gptoss_adapter_touch(gptoss_adapter *a) { a->version = __atomic_add_fetch(&g_version, 1, __ATOMIC_RELAXED); }
uint64_t gptoss_adapter_version(const gptoss_adapter *a) { return a->version; }
int gptoss_adapter_refs(const gptoss_adapter *a) { return a->refs; }

double gptoss_lora_scale(double alpha, int r, int rslora) { return rslora ? alpha / sqrt((double)r) : alpha / r; }

/* Scales past this make a LoRA's term overflow fp32 activations (NaN
   logits) long before they could mean anything; real ones are 0.1 .. 64. */
#define LORA_MAX_SCALE 65536.0
gptoss_status gptoss_lora_check_scale(const char *where, double alpha, int r, int rslora) {
  double s = gptoss_lora_scale(alpha, r, rslora);
  if (!(s <= LORA_MAX_SCALE))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: lora_alpha %.17g with r = %d gives a scale of %.17g; at most %.0f is accepted",
                       where, alpha, r, s, LORA_MAX_SCALE);
  return GPTOSS_OK;
}

gptoss_adapter *gptoss_adapter_alloc(int nlayers) {
  gptoss_adapter *a = calloc(1, sizeof *a);
  if (!a) return NULL;
  a->refs = 1;
  a->nlayers = nlayers;
  gptoss_adapter_touch(a);
  size_t n = (size_t)(nlayers ? nlayers : 1) * GPTOSS_LORA_MODULES;
  a->mod = calloc(n, sizeof *a->mod);
  a->train = calloc(n, sizeof *a->train);
  if (!a->mod || !a->train) { free(a->mod); free(a->train); free(a); return NULL; }
  return a;
}

void gptoss_adapter_free(gptoss_adapter *a) {
  if (!a || --a->refs > 0) return;
  gptoss_optim_free(a);
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++) { free(a->mod[i].A); free(a->mod[i].B); }
  free(a->mod);
  cJSON_Delete(a->config);
  free(a);
}

gptoss_adapter *gptoss_adapter_ref(gptoss_adapter *a) { if (a) a->refs++; return a; }

const gptoss_lora *gptoss_adapter_slot(const gptoss_adapter *a, int layer, gptoss_lora_module m) {
  if (!a || layer < 0 || layer >= a->nlayers) return NULL;
  const gptoss_lora *l = &a->mod[layer * GPTOSS_LORA_MODULES + m];
  return l->r ? l : NULL;
}

unsigned gptoss_adapter_held(const gptoss_adapter *a) {
  unsigned have = 0;
  for (int l = 0; l < a->nlayers; l++)
    for (int m = 0; m < GPTOSS_LORA_MODULES; m++)
      if (gptoss_adapter_slot(a, l, (gptoss_lora_module)m)) have |= 1u << m;
  return have;
}

const gptoss_lora *gptoss_adapter_module(const gptoss_adapter *a, int layer, gptoss_lora_module m) {
  if (a) gptoss_adapter_wait(a, -1);
  return gptoss_adapter_slot(a, layer, m);
}

void gptoss_adapter_info(const gptoss_adapter *a, gptoss_adapter_desc *out) {
  memset(out, 0, sizeof *out);
  out->r = a->r;
  out->alpha = a->alpha;
  out->dropout = a->dropout;
  out->rslora = a->rslora;
  out->nlayers = a->nlayers;
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++)
    if (a->mod[i].r) { out->modules++; out->params += (size_t)a->mod[i].rk * (a->mod[i].in + a->mod[i].out); }
}

double gptoss_adapter_dropout(const gptoss_adapter *a, uint64_t *seed) {
  if (seed) *seed = a->seed;
  return a->dropout;
}

/* {====================================================== check against a model */
/* each module's input and output features in a model of config c */
static void module_shapes(const gptoss_config *c, int *in, int *out) {
  int H = c->hidden_size, Q = c->num_attention_heads * c->head_dim, KV = c->num_key_value_heads * c->head_dim;
  int I = c->intermediate_size;
  const int fin[GPTOSS_LORA_MODULES] = {H, H, H, Q, H, I}, fout[GPTOSS_LORA_MODULES] = {Q, KV, KV, H, 2 * I, H};
  memcpy(in, fin, sizeof fin);
  memcpy(out, fout, sizeof fout);
}

gptoss_status gptoss_adapter_check(const gptoss_adapter *a, const gptoss_model *m) {
  const gptoss_config *c = &m->cfg;
  int in[GPTOSS_LORA_MODULES], outd[GPTOSS_LORA_MODULES];
  module_shapes(c, in, outd);
  for (int l = 0; l < a->nlayers; l++)
    for (int i = 0; i < GPTOSS_LORA_MODULES; i++) {
      const gptoss_lora *x = gptoss_adapter_slot(a, l, i);   /* shapes only: no need to wait for an update */
      if (!x) continue;
      if (l >= c->num_hidden_layers)
        return gptoss_fail(GPTOSS_EARG, "adapter has a LoRA on layer %d but the model has %d layers", l, c->num_hidden_layers);
      if (x->experts && x->experts != c->num_local_experts)
        return gptoss_fail(GPTOSS_EARG, "adapter's layer %d %s has LoRAs for %d experts; the model has %d", l, gptoss_lora_names[i],
                           x->experts, c->num_local_experts);
      if (x->in != in[i] || x->out != outd[i])
        return gptoss_fail(GPTOSS_EARG, "adapter's layer %d %s maps %d to %d features; the model's maps %d to %d", l,
                           gptoss_lora_names[i], x->in, x->out, in[i], outd[i]);
    }
  return GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== new, for training */
gptoss_status gptoss_adapter_new(const gptoss_model *m, const gptoss_lora_opts *o, gptoss_adapter **out) {
  *out = NULL;
  const gptoss_config *c = &m->cfg;
  if (o->r < 1 || o->r > GPTOSS_LORA_MAX_RANK) return gptoss_fail(GPTOSS_EARG, "lora: rank %d must be in 1..%d", o->r, GPTOSS_LORA_MAX_RANK);
  if (!(o->alpha > 0)) return gptoss_fail(GPTOSS_EARG, "lora: alpha must be positive");
  if (gptoss_lora_check_scale("lora", o->alpha, o->r, o->rslora)) return GPTOSS_EARG;
  if (!(o->dropout >= 0 && o->dropout < 1)) return gptoss_fail(GPTOSS_EARG, "lora: dropout must be in [0, 1)");
  if (o->dropout > 0 && (o->modules >> GPTOSS_LORA_ATTN_MODULES))
    return gptoss_fail(GPTOSS_EUNSUP, "lora: dropout cannot apply to expert LoRAs (as in PEFT): use 0 with gate_up/down");
  if (!o->modules || o->modules >> GPTOSS_LORA_MODULES) return gptoss_fail(GPTOSS_EARG, "lora: no valid target module");
  int E = c->num_local_experts, in[GPTOSS_LORA_MODULES], outd[GPTOSS_LORA_MODULES];
  module_shapes(c, in, outd);
  gptoss_adapter *a = gptoss_adapter_alloc(c->num_hidden_layers);
  if (!a) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  a->r = o->r; a->alpha = o->alpha; a->rslora = o->rslora; a->dropout = o->dropout; a->seed = o->seed;
  for (int i = GPTOSS_LORA_GU; i <= GPTOSS_LORA_DN; i++) if (o->modules & (1u << i)) a->tp[a->ntp++] = i;
  if (!(a->config = gptoss_peft_new_config(m, o))) { gptoss_adapter_free(a); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  uint64_t ctr = 0;
  for (int l = 0; l < c->num_hidden_layers; l++) {
    if (o->layers && !o->layers[l]) continue;
    for (int i = 0; i < GPTOSS_LORA_MODULES; i++) {
      if (!(o->modules & (1u << i))) continue;
      gptoss_lora *x = &a->mod[l * GPTOSS_LORA_MODULES + i];
      x->experts = i >= GPTOSS_LORA_ATTN_MODULES ? E : 0;
      x->r = o->r; x->rk = o->r * (x->experts ? x->experts : 1); x->in = in[i]; x->out = outd[i];
      x->scale = (float)gptoss_lora_scale(o->alpha, o->r, o->rslora);
      x->A = malloc(sizeof(float) * (size_t)x->rk * x->in);
      x->B = calloc((size_t)x->out * x->rk, sizeof(float));
      if (!x->A || !x->B) { gptoss_adapter_free(a); return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the adapter"); }
      /* kaiming_uniform_(a=sqrt(5)) on [r][in]: U(-1/sqrt(in), 1/sqrt(in)) */
      double ba = 1.0 / sqrt((double)x->in), bb = 1.0 / sqrt((double)x->r);
      for (size_t k = 0; k < (size_t)x->rk * x->in; k++)
        x->A[k] = (float)(ba * (2 * gptoss_u01(gptoss_mix64(o->seed * 0x9e3779b97f4a7c15ull + ctr++)) - 1));
      if (o->init == 1)
        for (size_t k = 0; k < (size_t)x->out * x->rk; k++)
          x->B[k] = (float)(bb * (2 * gptoss_u01(gptoss_mix64(o->seed * 0x9e3779b97f4a7c15ull + ctr++)) - 1));
    }
  }
  *out = a;
  return GPTOSS_OK;
}
/* }====================================================== */

gptoss_status gptoss_adapter_copy_weights(gptoss_adapter *dst, const gptoss_adapter *src) {
  gptoss_adapter_wait(dst, -1);
  gptoss_adapter_wait(src, -1);
  int nl = dst->nlayers > src->nlayers ? dst->nlayers : src->nlayers;
  for (int l = 0; l < nl; l++)
    for (int i = 0; i < GPTOSS_LORA_MODULES; i++) {
      const gptoss_lora *s = gptoss_adapter_module(src, l, i), *d = gptoss_adapter_module(dst, l, i);
      if (!s != !d || (s && (s->rk != d->rk || s->in != d->in || s->out != d->out)))
        return gptoss_fail(GPTOSS_EARG, "adapters differ at layer %d %s (%s)", l, gptoss_lora_names[i],
                           !s != !d ? "present in one only" : "shapes");
    }
  for (int l = 0; l < dst->nlayers; l++)
    for (int i = 0; i < GPTOSS_LORA_MODULES; i++) {
      gptoss_lora *d = (gptoss_lora *)gptoss_adapter_module(dst, l, i);
      const gptoss_lora *s = gptoss_adapter_module(src, l, i);
      if (!d) continue;
      memcpy(d->A, s->A, sizeof(float) * (size_t)d->rk * d->in);
      memcpy(d->B, s->B, sizeof(float) * (size_t)d->out * d->rk);
    }
  gptoss_adapter_touch(dst);
  return GPTOSS_OK;
}
