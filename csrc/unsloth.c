/*
** unsloth.c: adapters in Unsloth's layout of gpt-oss's experts.
**
** Unsloth's gpt-oss port (unsloth-zoo's GptOssExperts) replaces the
** experts' 3-D parameters with a Linear per expert:
** mlp.experts.gate_up_projs.{e} (hidden -> 2 * intermediate, gate and up
** interleaved as in gate_up_proj) and mlp.experts.down_projs.{e}
** (intermediate -> hidden). PEFT puts its Linear LoRA on each:
**   base_model.model.model.layers.L.mlp.experts.gate_up_projs.E.lora_A.weight  [r][in]
**   base_model.model.model.layers.L.mlp.experts.gate_up_projs.E.lora_B.weight  [out][r]
** The engine keeps expert LoRAs in PEFT's ParamWrapper layout (expert e's
** rank-k row of A at e*r + k, its rank-k column of B at k*E + e): the same
** products, so an adapter moves between the two without arithmetic.
** peft.c reads and writes the files; this file maps the tensors.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "adapter_impl.h"

static const char *const PROJS[2] = {"gate_up_projs", "down_projs"};
static int module_of(int k) { return k == 0 ? GPTOSS_LORA_GU : GPTOSS_LORA_DN; }

int gptoss_unsloth_name(const char *name, int *layer, int *mod, int *expert, int *ab) {
  int l, e, n = 0;
  char proj[16], which;
  if (sscanf(name, "base_model.model.model.layers.%d.mlp.experts.%15[a-z_].%d.lora_%c.weight%n", &l, proj, &e, &which, &n) != 4 ||
      name[n] != '\0' || l < 0 || l >= GPTOSS_MAX_LAYERS || e < 0 || e >= 4096 || (which != 'A' && which != 'B'))
    return 0;
  for (int k = 0; k < 2; k++)
    if (strcmp(proj, PROJS[k]) == 0) {
      *layer = l; *mod = module_of(k); *expert = e; *ab = which == 'B';
      return 1;
    }
  return 0;
}

int gptoss_unsloth_target(const char *s) {
  size_t n = strlen(s);
  for (int k = 0; k < 2; k++) {
    size_t p = strlen(PROJS[k]);
    if (n >= p && strcmp(s + n - p, PROJS[k]) == 0 && (n == p || s[n - p - 1] == '.')) return 1;
  }
  return 0;
}

/* one expert module's tensors as they are met: shapes, and which arrived */
typedef struct slot {
  int experts, r, in, out;
  unsigned char *seen;        /* [experts cap][2] */
  int cap;
} slot;

gptoss_status gptoss_unsloth_load(gptoss_adapter *a, gptoss_st *st, const char *wpath, int *rb, int *nlayers,
                                  gptoss_status (*to_f32)(const gptoss_tensor *, float *)) {
  slot *s = calloc((size_t)GPTOSS_MAX_LAYERS * GPTOSS_LORA_MODULES, sizeof *s);
  if (!s) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  gptoss_status rc = GPTOSS_OK;
  float *tmp = NULL;
  size_t n = gptoss_st_count(st);
  /* the shapes first: how many experts each module has */
  for (size_t i = 0; i < n && !rc; i++) {
    const gptoss_tensor *t = gptoss_st_at(st, i);
    int l, m, e, ab;
    if (!gptoss_unsloth_name(t->name, &l, &m, &e, &ab)) continue;
    if (t->ndim != 2 || t->shape[0] < 1 || t->shape[1] < 1) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s must be a matrix", wpath, t->name); break; }
    slot *x = &s[l * GPTOSS_LORA_MODULES + m];
    int r = (int)t->shape[ab ? 1 : 0], dim = (int)t->shape[ab ? 0 : 1];
    if (r != a->r) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s has rank %d; adapter_config.json gives r = %d", wpath, t->name, r, a->r);
      break;
    }
    if (ab ? (x->out && x->out != dim) : (x->in && x->in != dim)) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s is %lld x %lld, unlike the module's other experts", wpath, t->name,
                       (long long)t->shape[0], (long long)t->shape[1]);
      break;
    }
    if (ab) x->out = dim; else x->in = dim;
    x->r = r;
    if (e >= x->cap) {
      int cap = x->cap ? x->cap : 32;
      while (cap <= e) cap *= 2;
      unsigned char *seen = realloc(x->seen, (size_t)cap * 2);
      if (!seen) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); break; }
      memset(seen + (size_t)x->cap * 2, 0, (size_t)(cap - x->cap) * 2);
      x->seen = seen;
      x->cap = cap;
    }
    if (x->seen[e * 2 + ab]) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s appears twice", wpath, t->name); break; }
    x->seen[e * 2 + ab] = 1;
    if (e + 1 > x->experts) x->experts = e + 1;
    if (l + 1 > *nlayers) *nlayers = l + 1;
  }
  /* every expert of a module, both halves; then the module in the engine's layout */
  for (int i = 0; i < GPTOSS_MAX_LAYERS * GPTOSS_LORA_MODULES && !rc; i++) {
    slot *x = &s[i];
    if (!x->experts) continue;
    int l = i / GPTOSS_LORA_MODULES, m = i % GPTOSS_LORA_MODULES;
    for (int e = 0; e < x->experts && !rc; e++)
      for (int ab = 0; ab < 2 && !rc; ab++)
        if (!x->seen[e * 2 + ab])
          rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s: expert %d has no lora_%c (base_model.model.model.layers.%d.mlp.experts."
                           "%s.%d.lora_%c.weight)", wpath, l, gptoss_lora_names[m], e, "AB"[ab], l,
                           PROJS[m == GPTOSS_LORA_GU ? 0 : 1], e, "AB"[ab]);
    if (rc) break;
    gptoss_lora *g = &a->mod[i];
    if (g->A || g->B) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s comes both per expert (Unsloth's layout) and whole (target_parameters)",
                       wpath, l, gptoss_lora_names[m]);
      break;
    }
    g->rk = x->experts * x->r;
    g->in = x->in;
    g->out = x->out;
    g->A = malloc(sizeof(float) * (size_t)g->rk * (size_t)g->in);
    g->B = malloc(sizeof(float) * (size_t)g->out * (size_t)g->rk);
    if (!g->A || !g->B) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory for layer %d %s", l, gptoss_lora_names[m]);
    rb[i] = g->rk;
  }
  /* the weights: A's rows in place, B's columns scattered to k*E + e */
  for (size_t i = 0; i < n && !rc; i++) {
    const gptoss_tensor *t = gptoss_st_at(st, i);
    int l, m, e, ab;
    if (!gptoss_unsloth_name(t->name, &l, &m, &e, &ab)) continue;
    gptoss_lora *g = &a->mod[l * GPTOSS_LORA_MODULES + m];
    int r = a->r, E = g->rk / r;
    if (!ab) { rc = to_f32(t, g->A + (size_t)e * r * g->in); continue; }
    float *b = realloc(tmp, sizeof(float) * (size_t)g->out * r);
    if (!b) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); break; }
    tmp = b;
    if ((rc = to_f32(t, tmp))) break;
    for (int o = 0; o < g->out; o++)
      for (int k = 0; k < r; k++) g->B[(size_t)o * g->rk + (size_t)k * E + e] = tmp[(size_t)o * r + k];
  }
  for (int i = 0; i < GPTOSS_MAX_LAYERS * GPTOSS_LORA_MODULES; i++) free(s[i].seen);
  free(s);
  free(tmp);
  return rc;
}

gptoss_status gptoss_unsloth_write(const gptoss_lora *x, int l, int m, gptoss_st_writer *w) {
  int E = x->experts, r = x->r;
  const char *proj = PROJS[m == GPTOSS_LORA_GU ? 0 : 1];
  float *b = malloc(sizeof(float) * (size_t)x->out * r);
  if (!b) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  gptoss_status rc = GPTOSS_OK;
  for (int e = 0; e < E && !rc; e++) {
    char name[160];
    int64_t sa[2] = {r, x->in}, sb[2] = {x->out, r};
    gptoss_fill fa = {GPTOSS_FILL_DATA, 0, 0, 0, x->A + (size_t)e * r * x->in, sizeof(float) * (size_t)r * x->in};
    snprintf(name, sizeof name, "base_model.model.model.layers.%d.mlp.experts.%s.%d.lora_A.weight", l, proj, e);
    rc = gptoss_stw_add(w, name, GPTOSS_F32, 2, sa, &fa);
    for (int o = 0; o < x->out; o++)
      for (int k = 0; k < r; k++) b[(size_t)o * r + k] = x->B[(size_t)o * x->rk + (size_t)k * E + e];
    gptoss_fill fb = {GPTOSS_FILL_DATA, 0, 0, 0, b, sizeof(float) * (size_t)x->out * r};
    snprintf(name, sizeof name, "base_model.model.model.layers.%d.mlp.experts.%s.%d.lora_B.weight", l, proj, e);
    if (!rc) rc = gptoss_stw_add(w, name, GPTOSS_F32, 2, sb, &fb);
  }
  free(b);
  return rc;
}

/* adapter_config.json for a layout: the attention's target_modules kept;
   the experts as Unsloth's Linear modules (unsloth) or as
   target_parameters, gate_up first (PEFT) */
cJSON *gptoss_unsloth_config(const gptoss_adapter *a, int unsloth) {
  cJSON *j = cJSON_Duplicate(a->config, 1), *tm = cJSON_CreateArray();
  if (!j || !tm) { cJSON_Delete(j); cJSON_Delete(tm); return NULL; }
  unsigned have = gptoss_adapter_held(a);
  for (int m = 0; m < GPTOSS_LORA_ATTN_MODULES; m++)
    if (have & (1u << m)) cJSON_AddItemToArray(tm, cJSON_CreateString(gptoss_lora_names[m]));
  cJSON *tp = cJSON_CreateArray();
  for (int k = 0; k < 2; k++)
    if (have & (1u << module_of(k))) {
      if (unsloth) cJSON_AddItemToArray(tm, cJSON_CreateString(PROJS[k]));
      else cJSON_AddItemToArray(tp, cJSON_CreateString(k == 0 ? "mlp.experts.gate_up_proj" : "mlp.experts.down_proj"));
    }
  cJSON_DeleteItemFromObjectCaseSensitive(j, "target_modules");
  cJSON_AddItemToObject(j, "target_modules", tm);
  cJSON_DeleteItemFromObjectCaseSensitive(j, "target_parameters");
  if (cJSON_GetArraySize(tp) > 0) cJSON_AddItemToObject(j, "target_parameters", tp);
  else { cJSON_Delete(tp); cJSON_AddNullToObject(j, "target_parameters"); }
  return j;
}
