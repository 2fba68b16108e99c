/*
** adapter.c: LoRA adapters in Hugging Face PEFT's format (a directory with
** adapter_config.json and adapter_model.safetensors), held in fp32.
**
** PEFT names a LoRA on gpt-oss's attention projections
**   base_model.model.model.layers.<l>.self_attn.<q|k|v|o>_proj.lora_A.weight [r][in]
**   base_model.model.model.layers.<l>.self_attn.<q|k|v|o>_proj.lora_B.weight [out][r]
** and computes y = W x + b + s * B (A x), s = alpha / r, or alpha / sqrt(r)
** with use_rslora. The rank of each module is read from its tensors, so
** rank_pattern needs no parsing; alpha_pattern would, and is refused.
*/
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <dirent.h>
#include <pthread.h>
#include <cjson/cJSON.h>

#include "backend.h"
#include "cpu/cpu.h"

static const char *const module_name[GPTOSS_LORA_MODULES] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"};

struct gptoss_adapter {
  int refs;
  int nlayers;                  /* 1 + the highest layer with a module */
  gptoss_lora *mod;             /* [nlayers][GPTOSS_LORA_MODULES]; r == 0: absent */
  double alpha;
  int r, rslora;
  int steps;                    /* AdamW steps taken */
  int tp[2], ntp;               /* target_parameters in listed order (expert modules) */
  double dropout;               /* training only */
  uint64_t seed;
  cJSON *config;                /* adapter_config.json as read, written back by save */
  uint64_t version;             /* changes whenever A or B may have changed (see gptoss_adapter_touch) */
  struct update *update;        /* AdamW's update, once a step has run */
  /* each STEP_CHUNK chunk's sum of squares of the gradients (in step's
     chunk order), kept by gptoss_adapter_add_grads; gsq_ok[l]: layer l's
     are current, so step need not read them again (see step) */
  double *gsq;
  unsigned char *gsq_ok;
  size_t *chunk0;               /* [nlayers * GPTOSS_LORA_MODULES]: each module's first chunk */
  size_t chunk0_total;          /* chunks in all */
};

/* one counter for all adapters, so that a version is never reused, even by
   an adapter allocated where a freed one was */
static uint64_t g_version;
void gptoss_adapter_touch(gptoss_adapter *a) { a->version = __atomic_add_fetch(&g_version, 1, __ATOMIC_RELAXED); }
uint64_t gptoss_adapter_version(const gptoss_adapter *a) { return a->version; }
int gptoss_adapter_refs(const gptoss_adapter *a) { return a->refs; }

static double lora_scale(double alpha, int r, int rslora) { return rslora ? alpha / sqrt((double)r) : alpha / r; }

/* Scales past this make a LoRA's term overflow fp32 activations (NaN
   logits) long before they could mean anything; real ones are 0.1 .. 64. */
#define LORA_MAX_SCALE 65536.0
static gptoss_status check_scale(const char *where, double alpha, int r, int rslora) {
  double s = lora_scale(alpha, r, rslora);
  if (!(s <= LORA_MAX_SCALE))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: lora_alpha %.17g with r = %d gives a scale of %.17g; at most %.0f is accepted",
                       where, alpha, r, s, LORA_MAX_SCALE);
  return GPTOSS_OK;
}

static gptoss_adapter *adapter_alloc(int nlayers) {
  gptoss_adapter *a = calloc(1, sizeof *a);
  if (!a) return NULL;
  a->refs = 1;
  a->nlayers = nlayers;
  gptoss_adapter_touch(a);
  a->mod = calloc((size_t)(nlayers ? nlayers : 1) * GPTOSS_LORA_MODULES, sizeof *a->mod);
  if (!a->mod) { free(a); return NULL; }
  return a;
}

static void update_free(gptoss_adapter *a);

void gptoss_adapter_free(gptoss_adapter *a) {
  if (!a || --a->refs > 0) return;
  update_free(a);
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++) {
    gptoss_lora *x = &a->mod[i];
    free(x->A); free(x->B); free(x->gA); free(x->gB); free(x->mA); free(x->mB); free(x->vA); free(x->vB);
  }
  free(a->mod);
  free(a->gsq); free(a->gsq_ok); free(a->chunk0);
  cJSON_Delete(a->config);
  free(a);
}

gptoss_adapter *gptoss_adapter_ref(gptoss_adapter *a) { if (a) a->refs++; return a; }

const gptoss_lora *gptoss_adapter_slot(const gptoss_adapter *a, int layer, gptoss_lora_module m) {
  if (!a || layer < 0 || layer >= a->nlayers) return NULL;
  const gptoss_lora *l = &a->mod[layer * GPTOSS_LORA_MODULES + m];
  return l->r ? l : NULL;
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

/* {====================================================== config */
static gptoss_status config_fail(const char *path, const char *what) {
  return gptoss_fail(GPTOSS_EUNSUP, "%s: %s", path, what);
}

static int json_set(const cJSON *v) {   /* present and neither null, false, {} nor [] */
  if (!v || cJSON_IsNull(v) || cJSON_IsFalse(v)) return 0;
  if ((cJSON_IsObject(v) || cJSON_IsArray(v)) && !v->child) return 0;
  return 1;
}

static gptoss_status read_config(const char *path, gptoss_adapter *a) {
  size_t len;
  char *text = gptoss_read_file(path, &len);
  if (!text) return gptoss_errcode();
  cJSON *j = cJSON_ParseWithLength(text, len);
  free(text);
  if (!j || !cJSON_IsObject(j)) { cJSON_Delete(j); return gptoss_fail(GPTOSS_EFORMAT, "%s: not a JSON object", path); }
  a->config = j;
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, "peft_type");
  if (!cJSON_IsString(v)) return gptoss_fail(GPTOSS_EFORMAT, "%s: peft_type missing", path);
  if (strcmp(v->valuestring, "LORA") != 0)
    return gptoss_fail(GPTOSS_EUNSUP, "%s: peft_type \"%s\" is not LORA", path, v->valuestring);
  v = cJSON_GetObjectItemCaseSensitive(j, "r");
  if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble != (int)v->valuedouble)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: field r must be a positive integer", path);
  a->r = (int)v->valuedouble;
  v = cJSON_GetObjectItemCaseSensitive(j, "lora_alpha");
  if (!cJSON_IsNumber(v) || !(v->valuedouble > 0))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: field lora_alpha must be a positive number", path);
  a->alpha = v->valuedouble;
  if (!isfinite(a->alpha)) return gptoss_fail(GPTOSS_EFORMAT, "%s: field lora_alpha must be finite", path);
  v = cJSON_GetObjectItemCaseSensitive(j, "use_rslora");
  if (v && !cJSON_IsNull(v) && !cJSON_IsBool(v)) return gptoss_fail(GPTOSS_EFORMAT, "%s: field use_rslora must be true or false", path);
  a->rslora = cJSON_IsTrue(v);
  v = cJSON_GetObjectItemCaseSensitive(j, "lora_dropout");
  if (v && !cJSON_IsNull(v) && !(cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < 1))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: field lora_dropout must be a number in [0, 1)", path);
  a->dropout = cJSON_IsNumber(v) ? v->valuedouble : 0;
  /* the rank a module's tensors may have: r, or a value of rank_pattern */
  v = cJSON_GetObjectItemCaseSensitive(j, "rank_pattern");
  if (json_set(v) && !cJSON_IsObject(v)) return gptoss_fail(GPTOSS_EFORMAT, "%s: field rank_pattern must be an object", path);
  /* target_modules as a list names modules; this engine applies LoRA to the
     attention projections only (the experts come through target_parameters),
     so any other entry would be trained or loaded and then ignored. A string
     (a regex, or "all-linear") names no module by itself: the tensors decide. */
  v = cJSON_GetObjectItemCaseSensitive(j, "target_modules");
  if (cJSON_IsArray(v)) {
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
      const char *s = cJSON_IsString(e) ? e->valuestring : NULL;
      size_t n = s ? strlen(s) : 0;
      int ok = 0;
      for (int i = 0; s && i < GPTOSS_LORA_ATTN_MODULES && !ok; i++)
        ok = n >= 6 && strcmp(s + n - 6, module_name[i]) == 0 && (n == 6 || s[n - 7] == '.');
      if (!ok)
        return gptoss_fail(GPTOSS_EUNSUP, "%s: field target_modules: entry %s is not a module this engine applies LoRA to "
                           "(q_proj, k_proj, v_proj, o_proj; the experts through target_parameters)", path, s ? s : "(not a string)");
    }
  } else if (v && !cJSON_IsNull(v) && !cJSON_IsString(v)) {
    return gptoss_fail(GPTOSS_EFORMAT, "%s: field target_modules must be a list or a string", path);
  }
  /* what would change the arithmetic and is not implemented: refuse by name */
  static const char *const unsupported[] = {
    "use_dora", "DoRA (use_dora)", "alpha_pattern", "per-module alpha (alpha_pattern)",
    "modules_to_save", "fully trained modules (modules_to_save)", "fan_in_fan_out", "fan_in_fan_out weights",
    "lora_bias", "LoRA biases (lora_bias)", "trainable_token_indices", "trainable tokens (trainable_token_indices)",
    "layer_replication", "layer_replication", "use_qalora", "QA-LoRA (use_qalora)", NULL};
  for (int i = 0; unsupported[i]; i += 2)
    if (json_set(cJSON_GetObjectItemCaseSensitive(j, unsupported[i]))) {
      char msg[160];
      snprintf(msg, sizeof msg, "field %s is set: %s", unsupported[i], unsupported[i + 1]);
      return config_fail(path, msg);
    }
  v = cJSON_GetObjectItemCaseSensitive(j, "target_parameters");
  if (json_set(v)) {
    if (!cJSON_IsArray(v)) return config_fail(path, "field target_parameters must be a list");
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
      size_t n = cJSON_IsString(e) ? strlen(e->valuestring) : 0;
      int m = n >= 20 && !strcmp(e->valuestring + n - 20, "experts.gate_up_proj") ? GPTOSS_LORA_GU
            : n >= 17 && !strcmp(e->valuestring + n - 17, "experts.down_proj") ? GPTOSS_LORA_DN : -1;
      if (m < 0 || a->ntp >= 2) {
        char msg[200];
        snprintf(msg, sizeof msg, "field target_parameters: entry %s is not supported (mlp.experts.gate_up_proj, mlp.experts.down_proj)",
                 cJSON_IsString(e) ? e->valuestring : "(not a string)");
        return config_fail(path, msg);
      }
      a->tp[a->ntp++] = m;
    }
  }
  v = cJSON_GetObjectItemCaseSensitive(j, "bias");
  if (v && !cJSON_IsNull(v) && (!cJSON_IsString(v) || strcmp(v->valuestring, "none") != 0))
    return config_fail(path, "field bias must be \"none\" (trained biases are not supported)");
  return GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== load */
/* whether rank_pattern (module pattern -> rank) gives some module rank r */
static int rank_allowed(const gptoss_adapter *a, int r) {
  const cJSON *rp = cJSON_GetObjectItemCaseSensitive(a->config, "rank_pattern"), *e;
  cJSON_ArrayForEach(e, rp) if (cJSON_IsNumber(e) && e->valuedouble == r) return 1;
  return 0;
}

/* layer and module of a PEFT tensor name; ab: 0 for lora_A, 1 for lora_B.
   Expert LoRAs nest: with target_parameters [p1, ..., pn] PEFT wraps p1
   first, so pn's tensors are mlp.experts.lora_*, and each earlier one sits
   one ".base_layer" deeper. */
static int parse_name(const gptoss_adapter *a, const char *name, int *layer, int *mod, int *ab) {
  int l, n = 0;
  char p, which;
  if (sscanf(name, "base_model.model.model.layers.%d.self_attn.%c_proj.lora_%c.weight%n", &l, &p, &which, &n) == 3 &&
      name[n] == '\0' && l >= 0 && l < GPTOSS_MAX_LAYERS && (which == 'A' || which == 'B')) {
    for (int i = 0; i < GPTOSS_LORA_ATTN_MODULES; i++)
      if (module_name[i][0] == p) { *layer = l; *mod = i; *ab = which == 'B'; return 1; }
    return 0;
  }
  n = 0;
  if (sscanf(name, "base_model.model.model.layers.%d.mlp.experts%n", &l, &n) != 1 || n == 0 || l < 0 || l >= GPTOSS_MAX_LAYERS)
    return 0;
  const char *q = name + n;
  int depth = 0;
  while (strncmp(q, ".base_layer", 11) == 0) { q += 11; depth++; }
  if (strcmp(q, ".lora_A.weight") != 0 && strcmp(q, ".lora_B.weight") != 0) return 0;
  if (depth >= a->ntp) return 0;
  *layer = l;
  *mod = a->tp[a->ntp - 1 - depth];
  *ab = q[6] == 'B';
  return 1;
}

/* a module's tensor name as PEFT writes it */
static void tensor_name(const gptoss_adapter *a, int l, int m, char ab, char *buf, size_t n) {
  if (m < GPTOSS_LORA_ATTN_MODULES) {
    snprintf(buf, n, "base_model.model.model.layers.%d.self_attn.%s.lora_%c.weight", l, module_name[m], ab);
    return;
  }
  int depth = 0;
  for (int k = a->ntp - 1; k >= 0 && a->tp[k] != m; k--) depth++;
  int w = snprintf(buf, n, "base_model.model.model.layers.%d.mlp.experts", l);
  for (int d = 0; d < depth && w > 0 && (size_t)w < n; d++) w += snprintf(buf + w, n - (size_t)w, ".base_layer");
  if (w > 0 && (size_t)w < n) snprintf(buf + w, n - (size_t)w, ".lora_%c.weight", ab);
}

static gptoss_status to_f32(const gptoss_tensor *t, float *dst) {
  size_t n = t->nbytes / gptoss_dtype_size(t->dtype);
  if (t->dtype == GPTOSS_F32) memcpy(dst, t->data, t->nbytes);
  else if (t->dtype == GPTOSS_BF16) for (size_t i = 0; i < n; i++) dst[i] = gptoss_bf16_to_f32(((const uint16_t *)t->data)[i]);
  else if (t->dtype == GPTOSS_F16) {
    for (size_t i = 0; i < n; i++) {
      uint16_t h = ((const uint16_t *)t->data)[i];
      int e = (h >> 10) & 31, mnt = h & 1023;
      double v = e == 0 ? ldexp(mnt, -24) : e == 31 ? (mnt ? NAN : INFINITY) : ldexp(1024 + mnt, e - 25);
      dst[i] = (float)((h & 0x8000) ? -v : v);
    }
  } else
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s has dtype %s; LoRA weights must be F32, BF16 or F16", t->file, t->name,
                       gptoss_dtype_name(t->dtype));
  for (size_t i = 0; i < n; i++)
    if (!isfinite(dst[i])) return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s holds a non-finite value at element %zu", t->file, t->name, i);
  return GPTOSS_OK;
}

gptoss_status gptoss_adapter_load(const char *dir, gptoss_adapter **out) {
  *out = NULL;
  if (!gptoss_is_dir(dir)) return gptoss_fail(GPTOSS_EIO, "%s: not a directory", dir);
  char *cpath = gptoss_path_join(dir, "adapter_config.json"), *wpath = gptoss_path_join(dir, "adapter_model.safetensors");
  gptoss_adapter *a = NULL;
  gptoss_st *st = NULL;
  gptoss_status rc = GPTOSS_OK;
  if (!cpath || !wpath) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  if (!gptoss_path_exists(wpath)) { rc = gptoss_fail(GPTOSS_EIO, "%s: no such file (PEFT adapters keep their weights there)", wpath); goto done; }
  if (!(a = adapter_alloc(GPTOSS_MAX_LAYERS))) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  if ((rc = read_config(cpath, a))) goto done;
  if ((rc = gptoss_st_open(wpath, &st))) goto done;
  int nl = 0;
  size_t n = gptoss_st_count(st);
  if (n == 0) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: holds no tensors", wpath); goto done; }
  for (size_t i = 0; i < n; i++) {
    const gptoss_tensor *t = gptoss_st_at(st, i);
    int l, m, ab;
    if (!parse_name(a, t->name, &l, &m, &ab)) {
      rc = gptoss_fail(GPTOSS_EUNSUP, "%s: tensor %s is not a LoRA weight of an attention projection "
                       "(base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight) or of the experts "
                       "named in target_parameters", wpath, t->name);
      goto done;
    }
    if (l + 1 > nl) nl = l + 1;
    if (t->ndim != 2 || t->shape[0] < 1 || t->shape[1] < 1) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s must be a matrix", wpath, t->name);
      goto done;
    }
    gptoss_lora *x = &a->mod[l * GPTOSS_LORA_MODULES + m];
    float **dst = ab ? &x->B : &x->A;
    if (*dst) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s appears twice", wpath, t->name); goto done; }
    *dst = malloc(sizeof(float) * (size_t)(t->shape[0] * t->shape[1]));
    if (!*dst) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory for %s", t->name); goto done; }
    if ((rc = to_f32(t, *dst))) goto done;
    if (ab) { x->out = (int)t->shape[0]; x->rb = (int)t->shape[1]; }
    else { x->rk = (int)t->shape[0]; x->in = (int)t->shape[1]; }
    if (t->shape[ab] > (m < GPTOSS_LORA_ATTN_MODULES ? GPTOSS_LORA_MAX_RANK : GPTOSS_LORA_MAX_RANK * 256)) {
      rc = gptoss_fail(GPTOSS_EUNSUP, "%s: tensor %s has rank %lld; at most %d is supported", wpath, t->name,
                       (long long)t->shape[ab], GPTOSS_LORA_MAX_RANK);
      goto done;
    }
  }
  a->nlayers = nl;
  for (int l = 0; l < nl; l++)
    for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
      gptoss_lora *x = &a->mod[l * GPTOSS_LORA_MODULES + m];
      if (!x->A && !x->B) continue;
      if (!x->A || !x->B) {
        rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s has lora_%c but not lora_%c", wpath, l, module_name[m],
                         x->A ? 'A' : 'B', x->A ? 'B' : 'A');
        goto done;
      }
      if (x->rb != x->rk) {
        rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s: lora_A has rank %d, lora_B rank %d", wpath, l, module_name[m],
                         x->rk, x->rb);
        goto done;
      }
      if (m < GPTOSS_LORA_ATTN_MODULES) {
        x->r = x->rk;
        x->experts = 0;
        if (x->r != a->r && !rank_allowed(a, x->r)) {
          rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s has rank %d, but adapter_config.json gives r = %d and no rank_pattern "
                           "entry of %d", wpath, l, module_name[m], x->r, a->r, x->r);
          goto done;
        }
      }
      else {                                    /* r per expert comes from the config */
        if (x->rk % a->r) {
          rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s: lora_A has %d rows, not a multiple of r = %d", wpath, l,
                           module_name[m], x->rk, a->r);
          goto done;
        }
        x->r = a->r;
        x->experts = x->rk / a->r;
      }
      if ((rc = check_scale(cpath, a->alpha, x->r, a->rslora))) goto done;
      x->scale = (float)lora_scale(a->alpha, x->r, a->rslora);
    }
done:
  free(cpath);
  free(wpath);
  gptoss_st_free(st);
  if (rc) { gptoss_adapter_free(a); return rc; }
  *out = a;
  return GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== check against a model */
gptoss_status gptoss_adapter_check(const gptoss_adapter *a, const gptoss_model *m) {
  const gptoss_config *c = &m->cfg;
  int H = c->hidden_size, Q = c->num_attention_heads * c->head_dim, KV = c->num_key_value_heads * c->head_dim;
  int I = c->intermediate_size;
  const int in[GPTOSS_LORA_MODULES] = {H, H, H, Q, H, I}, outd[GPTOSS_LORA_MODULES] = {Q, KV, KV, H, 2 * I, H};
  for (int l = 0; l < a->nlayers; l++)
    for (int i = 0; i < GPTOSS_LORA_MODULES; i++) {
      const gptoss_lora *x = gptoss_adapter_slot(a, l, i);   /* shapes only: no need to wait for an update */
      if (!x) continue;
      if (l >= c->num_hidden_layers)
        return gptoss_fail(GPTOSS_EARG, "adapter has a LoRA on layer %d but the model has %d layers", l, c->num_hidden_layers);
      if (x->experts && x->experts != c->num_local_experts)
        return gptoss_fail(GPTOSS_EARG, "adapter's layer %d %s has LoRAs for %d experts; the model has %d", l, module_name[i],
                           x->experts, c->num_local_experts);
      if (x->in != in[i] || x->out != outd[i])
        return gptoss_fail(GPTOSS_EARG, "adapter's layer %d %s maps %d to %d features; the model's maps %d to %d", l,
                           module_name[i], x->in, x->out, in[i], outd[i]);
    }
  return GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== save */
gptoss_status gptoss_adapter_save(const gptoss_adapter *a, const char *dir) {
  gptoss_adapter_wait(a, -1);
  if (mkdir(dir, 0777) != 0 && errno != EEXIST) return gptoss_fail(GPTOSS_EIO, "%s: %s", dir, strerror(errno));
  if (!gptoss_is_dir(dir)) return gptoss_fail(GPTOSS_EIO, "%s: not a directory", dir);
  char *wpath = gptoss_path_join(dir, "adapter_model.safetensors"), *cpath = gptoss_path_join(dir, "adapter_config.json");
  gptoss_st_writer *w = NULL;
  char *json = NULL;
  gptoss_status rc = GPTOSS_OK;
  if (!wpath || !cpath) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  if ((rc = gptoss_stw_new(wpath, &w))) goto done;
  for (int l = 0; l < a->nlayers && !rc; l++)
    for (int i = 0; i < GPTOSS_LORA_MODULES && !rc; i++) {
      const gptoss_lora *x = gptoss_adapter_module(a, l, i);
      if (!x) continue;
      char name[160];
      int64_t sa[2] = {x->rk, x->in}, sb[2] = {x->out, x->rk};
      gptoss_fill fa = {GPTOSS_FILL_DATA, 0, 0, 0, x->A, sizeof(float) * (size_t)x->rk * x->in};
      gptoss_fill fb = {GPTOSS_FILL_DATA, 0, 0, 0, x->B, sizeof(float) * (size_t)x->out * x->rk};
      tensor_name(a, l, i, 'A', name, sizeof name);
      rc = gptoss_stw_add(w, name, GPTOSS_F32, 2, sa, &fa);
      tensor_name(a, l, i, 'B', name, sizeof name);
      if (!rc) rc = gptoss_stw_add(w, name, GPTOSS_F32, 2, sb, &fb);
    }
  if (!rc) rc = gptoss_stw_metadata(w, "format", "pt");
  if (!rc) rc = gptoss_stw_commit(w, 1);
  if (rc) goto done;
  json = cJSON_Print(a->config);
  if (!json) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  rc = gptoss_write_file(cpath, json, strlen(json));
done:
  gptoss_stw_free(w);
  free(json);
  free(wpath);
  free(cpath);
  return rc;
}
/* }====================================================== */

/* {====================================================== training */
/* PEFT's adapter_config.json for a new adapter */
static cJSON *new_config(const gptoss_model *m, const gptoss_lora_opts *o) {
  cJSON *j = cJSON_CreateObject(), *tm = cJSON_CreateArray();
  if (!j || !tm) { cJSON_Delete(j); cJSON_Delete(tm); return NULL; }
  cJSON_AddStringToObject(j, "peft_type", "LORA");
  cJSON_AddStringToObject(j, "task_type", "CAUSAL_LM");
  cJSON_AddStringToObject(j, "base_model_name_or_path", m->dir);
  cJSON_AddNumberToObject(j, "r", o->r);
  cJSON_AddNumberToObject(j, "lora_alpha", o->alpha);
  cJSON_AddNumberToObject(j, "lora_dropout", o->dropout);
  cJSON_AddBoolToObject(j, "use_rslora", o->rslora);
  cJSON_AddStringToObject(j, "bias", "none");
  cJSON_AddBoolToObject(j, "fan_in_fan_out", 0);
  cJSON_AddBoolToObject(j, "inference_mode", 1);
  cJSON_AddBoolToObject(j, "init_lora_weights", o->init == 0);
  cJSON_AddBoolToObject(j, "use_dora", 0);
  cJSON_AddNullToObject(j, "modules_to_save");
  for (int i = 0; i < GPTOSS_LORA_ATTN_MODULES; i++)
    if (o->modules & (1u << i)) cJSON_AddItemToArray(tm, cJSON_CreateString(module_name[i]));
  cJSON_AddItemToObject(j, "target_modules", tm);
  if (o->modules >> GPTOSS_LORA_ATTN_MODULES) {   /* PEFT's ParamWrapper, gate_up first (innermost) */
    cJSON *tp = cJSON_AddArrayToObject(j, "target_parameters");
    if (o->modules & (1u << GPTOSS_LORA_GU)) cJSON_AddItemToArray(tp, cJSON_CreateString("mlp.experts.gate_up_proj"));
    if (o->modules & (1u << GPTOSS_LORA_DN)) cJSON_AddItemToArray(tp, cJSON_CreateString("mlp.experts.down_proj"));
  } else
    cJSON_AddNullToObject(j, "target_parameters");
  if (o->layers) {
    cJSON *ls = cJSON_AddArrayToObject(j, "layers_to_transform");
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) if (o->layers[l]) cJSON_AddItemToArray(ls, cJSON_CreateNumber(l));
  } else
    cJSON_AddNullToObject(j, "layers_to_transform");
  return j;
}

gptoss_status gptoss_adapter_new(const gptoss_model *m, const gptoss_lora_opts *o, gptoss_adapter **out) {
  *out = NULL;
  const gptoss_config *c = &m->cfg;
  if (o->r < 1 || o->r > GPTOSS_LORA_MAX_RANK) return gptoss_fail(GPTOSS_EARG, "lora: rank %d must be in 1..%d", o->r, GPTOSS_LORA_MAX_RANK);
  if (!(o->alpha > 0)) return gptoss_fail(GPTOSS_EARG, "lora: alpha must be positive");
  if (check_scale("lora", o->alpha, o->r, o->rslora)) return GPTOSS_EARG;
  if (!(o->dropout >= 0 && o->dropout < 1)) return gptoss_fail(GPTOSS_EARG, "lora: dropout must be in [0, 1)");
  if (o->dropout > 0 && (o->modules >> GPTOSS_LORA_ATTN_MODULES))
    return gptoss_fail(GPTOSS_EUNSUP, "lora: dropout cannot apply to expert LoRAs (as in PEFT): use 0 with gate_up/down");
  if (!o->modules || o->modules >> GPTOSS_LORA_MODULES) return gptoss_fail(GPTOSS_EARG, "lora: no valid target module");
  int H = c->hidden_size, Q = c->num_attention_heads * c->head_dim, KV = c->num_key_value_heads * c->head_dim;
  int I = c->intermediate_size, E = c->num_local_experts;
  const int in[GPTOSS_LORA_MODULES] = {H, H, H, Q, H, I}, outd[GPTOSS_LORA_MODULES] = {Q, KV, KV, H, 2 * I, H};
  gptoss_adapter *a = adapter_alloc(c->num_hidden_layers);
  if (!a) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  a->r = o->r; a->alpha = o->alpha; a->rslora = o->rslora; a->dropout = o->dropout; a->seed = o->seed;
  for (int i = GPTOSS_LORA_GU; i <= GPTOSS_LORA_DN; i++) if (o->modules & (1u << i)) a->tp[a->ntp++] = i;
  if (!(a->config = new_config(m, o))) { gptoss_adapter_free(a); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  uint64_t ctr = 0;
  for (int l = 0; l < c->num_hidden_layers; l++) {
    if (o->layers && !o->layers[l]) continue;
    for (int i = 0; i < GPTOSS_LORA_MODULES; i++) {
      if (!(o->modules & (1u << i))) continue;
      gptoss_lora *x = &a->mod[l * GPTOSS_LORA_MODULES + i];
      x->experts = i >= GPTOSS_LORA_ATTN_MODULES ? E : 0;
      x->r = o->r; x->rk = x->rb = o->r * (x->experts ? x->experts : 1); x->in = in[i]; x->out = outd[i];
      x->scale = (float)lora_scale(o->alpha, o->r, o->rslora);
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

#define STEP_CHUNK ((size_t)1 << 16)

static size_t chunks_of(size_t n) { return (n + STEP_CHUNK - 1) / STEP_CHUNK; }

/* the gradients (zeros) and their sums of squares (zeros, current) */
static gptoss_status grads_alloc(gptoss_adapter *a) {
  int nm = a->nlayers * GPTOSS_LORA_MODULES;
  if (!a->chunk0) {
    size_t c = 0;
    if (!(a->chunk0 = malloc(sizeof(size_t) * (size_t)(nm ? nm : 1)))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    for (int i = 0; i < nm; i++) {
      gptoss_lora *x = &a->mod[i];
      a->chunk0[i] = c;
      if (x->r) c += chunks_of((size_t)x->rk * x->in) + chunks_of((size_t)x->out * x->rk);
    }
    a->gsq = calloc(c ? c : 1, sizeof(double));
    a->chunk0_total = c;
    a->gsq_ok = malloc((size_t)(a->nlayers ? a->nlayers : 1));
    if (!a->gsq || !a->gsq_ok) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    memset(a->gsq_ok, 1, (size_t)a->nlayers);
  }
  for (int i = 0; i < nm; i++) {
    gptoss_lora *x = &a->mod[i];
    if (!x->r || x->gA) continue;
    x->gA = calloc((size_t)x->rk * x->in, sizeof(float));
    x->gB = calloc((size_t)x->out * x->rk, sizeof(float));
    if (!x->gA || !x->gB) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the adapter's gradients");
  }
  return GPTOSS_OK;
}

/* A backward pass adds to the gradients; a backend that adds a layer
   through gptoss_adapter_add_grads makes its sums current again. */
static void grads_stale(gptoss_adapter *a) {
  if (a->gsq_ok) memset(a->gsq_ok, 0, (size_t)a->nlayers);
}

typedef struct {
  gptoss_adapter *a;
  int layer;
  const float *src;
  size_t off[GPTOSS_LORA_MODULES];   /* each module's place in src */
} add_job;

/* sum of (g scale)^2 in eight fixed lanes (the order never changes) */
GPTOSS_HOT static double sum_squares(const float *g, size_t n, float scale) {
  double acc[8] = {0};
  size_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; j++) { double x = (double)(g[k + j] * scale); acc[j] += x * x; }
  for (; k < n; k++) { double x = (double)(g[k] * scale); acc[0] += x * x; }
  double s = 0;
  for (int j = 0; j < 8; j++) s += acc[j];
  return s;
}

/* chunk by chunk over threads: the add, and the chunk's sum of squares of
   the result while it is in cache */
static void add_chunks(void *ctx, int tid, int nth) {
  add_job *j = ctx;
  gptoss_adapter *a = j->a;
  size_t k = 0;
  for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
    int i = j->layer * GPTOSS_LORA_MODULES + m;
    gptoss_lora *x = &a->mod[i];
    if (!x->r) continue;
    size_t n[2] = {(size_t)x->rk * x->in, (size_t)x->out * x->rk}, c = a->chunk0[i];
    float *g[2] = {x->gA, x->gB};
    const float *src[2] = {j->src + j->off[m], j->src + j->off[m] + n[0]};
    for (int w = 0; w < 2; w++)
      for (size_t lo = 0; lo < n[w]; lo += STEP_CHUNK, c++, k++) {
        if ((int)(k % (size_t)nth) != tid) continue;
        size_t len = lo + STEP_CHUNK < n[w] ? STEP_CHUNK : n[w] - lo;
        float *restrict d = g[w] + lo;
        const float *restrict s = src[w] + lo;
        for (size_t q = 0; q < len; q++) d[q] += s[q];
        a->gsq[c] = sum_squares(d, len, 1.f);
      }
  }
}

void gptoss_adapter_add_grads(gptoss_adapter *a, int layer, const float *src, gptoss_pool *pool) {
  add_job j = {a, layer, src, {0}};
  size_t off = 0;
  for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
    gptoss_lora *x = &a->mod[layer * GPTOSS_LORA_MODULES + m];
    j.off[m] = off;
    if (x->r) off += (size_t)x->rk * x->in + (size_t)x->out * x->rk;
  }
  gptoss_pool_run(pool, add_chunks, &j);
  a->gsq_ok[layer] = 1;
}

gptoss_status gptoss_lora_backward(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                   double *loss, int *count) {
  if (!m->be->lora_backward) return gptoss_fail(GPTOSS_EUNSUP, "LoRA training is not supported on %s", m->device);
  if (n < 2) return gptoss_fail(GPTOSS_EARG, "lora backward: a sequence needs at least 2 tokens (got %d)", n);
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size)
      return gptoss_fail(GPTOSS_ERANGE, "lora backward: token id %d at position %d is outside the vocabulary (%d)", ids[i], i + 1,
                         m->cfg.vocab_size);
  gptoss_status rc = gptoss_adapter_check(a, m);
  if (!rc) rc = grads_alloc(a);
  if (!rc) {
    grads_stale(a);
    rc = m->be->lora_backward(m, a, ids, mask, n, loss, count);
  }
  return rc;
}

int gptoss_adapter_steps(const gptoss_adapter *a) { return a->steps; }

double gptoss_adapter_dropout(const gptoss_adapter *a, uint64_t *seed) {
  if (seed) *seed = a->seed;
  return a->dropout;
}

/* AdamW runs over fixed chunks (STEP_CHUNK) of each weight array, spread
   over threads: the gradient norm sums per chunk and then over chunks in
   order, so it is the same whatever the thread count (a 20B adapter has
   185M weights). */

typedef struct step_job {
  gptoss_adapter *a;
  gptoss_adamw o;
  int pass;                     /* 0: squared gradient sums per chunk; 1: the update */
  int layer;                    /* the update's layer (pass 1) */
  int zero;                     /* pass 1 also zeroes the gradients it has used */
  double *partial;              /* [chunks] */
  float gs;                     /* grad_scale times the clipping coefficient */
  double bc1, bc2;
} step_job;

/* The update (pass 1) is memory-bound: 185M weights, each with its
   gradient and two moments, 0.05-0.1 s on the host for a 20B adapter. It
   runs on a thread of its own, layer after layer, after step returns, so a
   trainer's next forward (the CUDA one uploads layer l as soon as layer l
   is updated) runs alongside. Every other reader waits for all of it
   (gptoss_adapter_wait). A zero_grad that comes during the update zeroes
   each layer once it is updated: the layers already done at once, the rest
   as the update goes (each chunk of gradients as soon as it is used). */
struct update {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t th;
  int running, joinable;
  int done;                     /* layers updated (and zeroed, if asked) */
  int zero;                     /* zero_grad came during the update */
  step_job job;
  gptoss_pool *pool;            /* the optimizer's threads, kept between steps */
};


/* torch's AdamW: decay, the moments, then p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
   The moments are taken in double (float would add rounding of its own to
   torch's, and PEFT's 5-step trajectory drifts past 1e-4); the step's
   square root and division in float, in torch's order (in double they
   made the update bound by their throughput, twice the time a weight).
   Written so that it vectorises (no errno from sqrt). */
GPTOSS_HOT static void adamw_span(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, size_t n,
                                  float gs, float decay, double b1, double b2, double step, double bc2, double eps) {
  float sbc2 = (float)sqrt(bc2), st = (float)step, ep = (float)eps;
  for (size_t k = 0; k < n; k++) {
    float gk = g[k] * gs;
    float mk = (float)(b1 * m[k] + (1 - b1) * gk), vk = (float)(b2 * v[k] + (1 - b2) * (double)gk * gk);
    m[k] = mk;
    v[k] = vk;
    p[k] = p[k] * decay - st * mk / (sqrtf(vk) / sbc2 + ep);
  }
}

/* pass 0 over every module, pass 1 over one layer's */
static void step_chunks(void *ctx, int tid, int nth) {
  step_job *j = ctx;
  const gptoss_adamw *o = &j->o;
  size_t chunk = 0;
  int i0 = j->pass ? j->layer * GPTOSS_LORA_MODULES : 0;
  int i1 = j->pass ? i0 + GPTOSS_LORA_MODULES : j->a->nlayers * GPTOSS_LORA_MODULES;
  for (int i = i0; i < i1; i++) {
    gptoss_lora *x = &j->a->mod[i];
    if (!x->r) continue;
    float *p[2] = {x->A, x->B}, *g[2] = {x->gA, x->gB}, *mm[2] = {x->mA, x->mB}, *vv[2] = {x->vA, x->vB};
    size_t n[2] = {(size_t)x->rk * x->in, (size_t)x->out * x->rk};
    for (int w = 0; w < 2; w++)
      for (size_t lo = 0; lo < n[w]; lo += STEP_CHUNK, chunk++) {
        if ((int)(chunk % (size_t)nth) != tid) continue;
        size_t len = lo + STEP_CHUNK < n[w] ? STEP_CHUNK : n[w] - lo;
        if (j->pass == 0) j->partial[chunk] = sum_squares(g[w] + lo, len, (float)o->grad_scale);
        else {
          adamw_span(p[w] + lo, g[w] + lo, mm[w] + lo, vv[w] + lo, len, j->gs, (float)(1 - o->lr * o->weight_decay),
                     o->beta1, o->beta2, o->lr / j->bc1, j->bc2, o->eps);
          if (j->zero) memset(g[w] + lo, 0, sizeof(float) * len);   /* still in cache */
        }
      }
  }
}

static void zero_layer(gptoss_adapter *a, int l) {
  for (int i = l * GPTOSS_LORA_MODULES; i < (l + 1) * GPTOSS_LORA_MODULES; i++) {
    gptoss_lora *x = &a->mod[i];
    if (x->gA) memset(x->gA, 0, sizeof(float) * (size_t)x->rk * x->in);
    if (x->gB) memset(x->gB, 0, sizeof(float) * (size_t)x->out * x->rk);
  }
}

static void *update_main(void *arg) {
  gptoss_adapter *a = arg;
  struct update *u = a->update;
  for (int l = 0; l < a->nlayers; l++) {
    pthread_mutex_lock(&u->mu);
    u->job.zero = u->zero;
    pthread_mutex_unlock(&u->mu);
    u->job.layer = l;
    gptoss_pool_run(u->pool, step_chunks, &u->job);
    /* reading zero and publishing done under one lock: a zero_grad either
       comes first (and this thread zeroes layer l, here if it came while
       the layer was being updated) or finds l done and zeroes it itself */
    pthread_mutex_lock(&u->mu);
    if (u->zero && !u->job.zero) {
      pthread_mutex_unlock(&u->mu);
      zero_layer(a, l);
      pthread_mutex_lock(&u->mu);
    }
    u->done = l + 1;
    pthread_cond_broadcast(&u->cv);
    pthread_mutex_unlock(&u->mu);
  }
  pthread_mutex_lock(&u->mu);
  u->running = 0;
  pthread_cond_broadcast(&u->cv);
  pthread_mutex_unlock(&u->mu);
  return NULL;
}

void gptoss_adapter_wait(const gptoss_adapter *ca, int layer) {
  struct update *u = ca->update;
  if (!u) return;
  pthread_mutex_lock(&u->mu);
  while (u->running && (layer < 0 || u->done <= layer)) pthread_cond_wait(&u->cv, &u->mu);
  int join = !u->running && u->joinable;
  if (join) u->joinable = 0;
  pthread_mutex_unlock(&u->mu);
  if (join) pthread_join(u->th, NULL);
}

static void update_free(gptoss_adapter *a) {
  if (!a->update) return;
  gptoss_adapter_wait(a, -1);
  pthread_mutex_destroy(&a->update->mu);
  pthread_cond_destroy(&a->update->cv);
  gptoss_pool_free(a->update->pool);
  free(a->update);
  a->update = NULL;
}

gptoss_status gptoss_adapter_step(gptoss_adapter *a, const gptoss_adamw *o, double *grad_norm) {
  if (!(o->lr >= 0) || !(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1) || !(o->eps > 0) || o->weight_decay < 0)
    return gptoss_fail(GPTOSS_EARG, "adamw: lr >= 0, betas in [0, 1), eps > 0 and weight_decay >= 0");
  gptoss_adapter_wait(a, -1);
  size_t chunks = 0, total = 0;
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++) {
    gptoss_lora *x = &a->mod[i];
    if (!x->r) continue;
    if (!x->gA) return gptoss_fail(GPTOSS_ESTATE, "adamw: no gradients yet (run a backward pass first)");
    if (!x->mA) {
      x->mA = calloc((size_t)x->rk * x->in, sizeof(float)); x->vA = calloc((size_t)x->rk * x->in, sizeof(float));
      x->mB = calloc((size_t)x->out * x->rk, sizeof(float)); x->vB = calloc((size_t)x->out * x->rk, sizeof(float));
      if (!x->mA || !x->vA || !x->mB || !x->vB) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the optimizer state");
    }
    size_t n[2] = {(size_t)x->rk * x->in, (size_t)x->out * x->rk};
    for (int w = 0; w < 2; w++) { chunks += chunks_of(n[w]); total += n[w]; }
  }
  struct update *u = a->update;
  if (!u) {
    if (!(u = calloc(1, sizeof *u))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the optimizer");
    /* all cores but two, at most 14: the update is memory-bound and runs
       while a CUDA trainer's forward waits for it a layer at a time; the
       two are the thread that drives the GPU and the trainer's copies */
    int most = gptoss_cpu_count() - 2, nth = total < ((size_t)1 << 20) || most < 1 ? 1 : most > 14 ? 14 : most;
    u->pool = nth > 1 ? gptoss_pool_new(nth) : NULL;   /* NULL: the calling thread alone */
    if (pthread_mutex_init(&u->mu, NULL)) { gptoss_pool_free(u->pool); free(u); return gptoss_fail(GPTOSS_ENOMEM, "adamw: no mutex"); }
    if (pthread_cond_init(&u->cv, NULL)) {
      pthread_mutex_destroy(&u->mu); gptoss_pool_free(u->pool); free(u);
      return gptoss_fail(GPTOSS_ENOMEM, "adamw: no condition variable");
    }
    a->update = u;
  }
  step_job *j = &u->job;
  memset(j, 0, sizeof *j);
  j->a = a;
  j->o = *o;
  /* the sums of squares gptoss_adapter_add_grads kept, when every layer's
     are current; else pass 0 reads the gradients */
  int current = a->gsq_ok != NULL;
  for (int l = 0; current && l < a->nlayers; l++) current = a->gsq_ok[l];
  double ss = 0;
  if (current) {
    double gs = (float)o->grad_scale;
    for (size_t c = 0; c < chunks; c++) ss += a->gsq[c];
    ss *= gs * gs;
  } else {
    if (!(j->partial = calloc(chunks ? chunks : 1, sizeof(double)))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the optimizer");
    gptoss_pool_run(u->pool, step_chunks, j);
    for (size_t c = 0; c < chunks; c++) ss += j->partial[c];
    free(j->partial);
    j->partial = NULL;
  }
  double norm = sqrt(ss), clip = 1;
  if (!isfinite(norm)) return gptoss_fail(GPTOSS_ERANGE, "adamw: the gradient norm is not finite; no step taken");
  /* torch.nn.utils.clip_grad_norm_: coefficient max / (norm + 1e-6), capped at 1 */
  if (o->max_grad_norm > 0 && o->max_grad_norm / (norm + 1e-6) < 1) clip = o->max_grad_norm / (norm + 1e-6);
  a->steps++;
  gptoss_adapter_touch(a);
  j->pass = 1;
  j->gs = (float)(o->grad_scale * clip);
  j->bc1 = 1 - pow(o->beta1, a->steps);
  j->bc2 = 1 - pow(o->beta2, a->steps);
  if (grad_norm) *grad_norm = norm;
  u->done = 0;
  u->zero = 0;
  u->running = 1;
  if (pthread_create(&u->th, NULL, update_main, a) == 0) {
    u->joinable = 1;
    return GPTOSS_OK;
  }
  update_main(a);   /* no thread to be had: the update here and now */
  return GPTOSS_OK;
}

/* in 1M-float pieces over threads: a 20B adapter's gradients are 740 MB */
#define ZERO_PIECE ((size_t)1 << 20)

static void zero_pieces(void *ctx, int tid, int nth) {
  gptoss_adapter *a = ctx;
  size_t piece = 0;
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++) {
    gptoss_lora *x = &a->mod[i];
    float *g[2] = {x->gA, x->gB};
    size_t n[2] = {(size_t)x->rk * x->in, (size_t)x->out * x->rk};
    for (int w = 0; w < 2; w++)
      for (size_t lo = 0; g[w] && lo < n[w]; lo += ZERO_PIECE, piece++)
        if ((int)(piece % (size_t)nth) == tid) memset(g[w] + lo, 0, sizeof(float) * (lo + ZERO_PIECE < n[w] ? ZERO_PIECE : n[w] - lo));
  }
}

void gptoss_adapter_zero_grad(gptoss_adapter *a) {
  struct update *u = a->update;
  /* zeros, or zeros by the time anything reads them (the update's, below) */
  if (a->gsq) {
    memset(a->gsq, 0, sizeof(double) * a->chunk0_total);
    memset(a->gsq_ok, 1, (size_t)a->nlayers);
  }
  if (u) {
    pthread_mutex_lock(&u->mu);
    int running = u->running, done = u->done;
    if (running) u->zero = 1;
    pthread_mutex_unlock(&u->mu);
    if (running) {   /* the updated layers here, the rest by the update's thread */
      for (int l = 0; l < done; l++) zero_layer(a, l);
      return;
    }
    gptoss_adapter_wait(a, -1);   /* joins the finished thread */
    gptoss_pool_run(u->pool, zero_pieces, a);   /* its threads, idle now */
    return;
  }
  size_t total = 0;
  for (int i = 0; i < a->nlayers * GPTOSS_LORA_MODULES; i++)
    if (a->mod[i].gA) total += (size_t)a->mod[i].rk * (a->mod[i].in + a->mod[i].out);
  int nth = total < 8 * ZERO_PIECE ? 1 : gptoss_cpu_count() > 16 ? 16 : gptoss_cpu_count();
  gptoss_pool *pool = nth > 1 ? gptoss_pool_new(nth) : NULL;   /* NULL (or none to be had): this thread alone */
  gptoss_pool_run(pool, zero_pieces, a);
  gptoss_pool_free(pool);
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
        return gptoss_fail(GPTOSS_EARG, "adapters differ at layer %d %s (%s)", l, module_name[i],
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

/* {====================================================== optimizer state */
gptoss_status gptoss_adapter_save_state(const gptoss_adapter *a, const char *path) {
  gptoss_adapter_wait(a, -1);
  gptoss_st_writer *w = NULL;
  gptoss_status rc = gptoss_stw_new(path, &w);
  char steps[32];
  snprintf(steps, sizeof steps, "%d", a->steps);
  if (!rc) rc = gptoss_stw_metadata(w, "steps", steps);
  for (int l = 0; l < a->nlayers && !rc; l++)
    for (int i = 0; i < GPTOSS_LORA_MODULES && !rc; i++) {
      const gptoss_lora *x = gptoss_adapter_module(a, l, i);
      if (!x || !x->mA) continue;
      float *const buf[4] = {x->mA, x->vA, x->mB, x->vB};
      static const char *const what[4] = {"lora_A.exp_avg", "lora_A.exp_avg_sq", "lora_B.exp_avg", "lora_B.exp_avg_sq"};
      for (int k = 0; k < 4 && !rc; k++) {
        char name[128];
        snprintf(name, sizeof name, "layers.%d.%s.%s", l, module_name[i], what[k]);
        int64_t shape[2] = {k < 2 ? x->rk : x->out, k < 2 ? x->in : x->rk};
        gptoss_fill f = {GPTOSS_FILL_DATA, 0, 0, 0, buf[k], sizeof(float) * (size_t)(shape[0] * shape[1])};
        rc = gptoss_stw_add(w, name, GPTOSS_F32, 2, shape, &f);
      }
    }
  if (!rc) rc = gptoss_stw_commit(w, 1);
  gptoss_stw_free(w);
  return rc;
}

gptoss_status gptoss_adapter_load_state(gptoss_adapter *a, const char *path) {
  gptoss_adapter_wait(a, -1);
  gptoss_st *st = NULL;
  gptoss_status rc = gptoss_st_open(path, &st);
  if (rc) return rc;
  const char *steps = gptoss_st_metadata(st, "steps");
  char *end = NULL;
  long n = steps ? strtol(steps, &end, 10) : -1;
  if (!steps || *end || n < 0) { gptoss_st_free(st); return gptoss_fail(GPTOSS_EFORMAT, "%s: metadata field steps missing or invalid", path); }
  /* check everything first, so a bad file leaves the adapter as it was */
  for (int pass = 0; pass < 2 && !rc; pass++)
    for (int l = 0; l < a->nlayers && !rc; l++)
      for (int i = 0; i < GPTOSS_LORA_MODULES && !rc; i++) {
        gptoss_lora *x = (gptoss_lora *)gptoss_adapter_module(a, l, i);
        if (!x) continue;
        static const char *const what[4] = {"lora_A.exp_avg", "lora_A.exp_avg_sq", "lora_B.exp_avg", "lora_B.exp_avg_sq"};
        for (int k = 0; k < 4 && !rc; k++) {
          char name[128];
          snprintf(name, sizeof name, "layers.%d.%s.%s", l, module_name[i], what[k]);
          const gptoss_tensor *t = gptoss_st_find(st, name);
          int64_t r0 = k < 2 ? x->rk : x->out, r1 = k < 2 ? x->in : x->rk;
          if (!t) { if (n > 0) rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s missing", path, name); continue; }
          if (t->dtype != GPTOSS_F32 || t->ndim != 2 || t->shape[0] != r0 || t->shape[1] != r1) {
            rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor %s must be F32 [%lld, %lld]", path, name, (long long)r0, (long long)r1);
            continue;
          }
          if (pass == 0) continue;
          float **dst = k == 0 ? &x->mA : k == 1 ? &x->vA : k == 2 ? &x->mB : &x->vB;
          if (!*dst && !(*dst = malloc(t->nbytes))) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); continue; }
          memcpy(*dst, t->data, t->nbytes);
        }
      }
  if (!rc) a->steps = (int)n;
  gptoss_st_free(st);
  return rc;
}
/* }====================================================== */

/* {====================================================== merge */
static gptoss_status copy_file(const char *src, const char *dst) {
  size_t len;
  char *data = gptoss_read_file(src, &len);
  if (!data) return gptoss_errcode();
  gptoss_status rc = gptoss_write_file(dst, data, len);
  free(data);
  return rc;
}

static void remove_tree(const char *dir) {
  DIR *d = opendir(dir);
  if (d) {
    struct dirent *e;
    while ((e = readdir(d))) {
      if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
      char *p = gptoss_path_join(dir, e->d_name);
      if (p) { unlink(p); free(p); }
    }
    closedir(d);
  }
  rmdir(dir);
}

/* the merged bf16 weight of one projection */
/* d = scale * B[o] . A: output row o of a LoRA's delta, of expert e for a
   ParamWrapper LoRA (A rows e*r .. e*r+r-1, B column k*E + e; attention:
   e = 0, one "expert") */
static void lora_delta_row(const gptoss_lora *x, int e, int o, float *d) {
  int E = x->experts ? x->experts : 1;
  memset(d, 0, sizeof(float) * (size_t)x->in);
  for (int k = 0; k < x->r; k++) {
    float b = x->scale * x->B[(size_t)o * x->rk + (size_t)k * E + e];
    const float *ar = x->A + ((size_t)e * x->r + k) * x->in;
    for (int i = 0; i < x->in; i++) d[i] += b * ar[i];
  }
}

static uint16_t *merged(const gptoss_tensor *t, const gptoss_lora *x) {
  uint16_t *w = malloc(t->nbytes);
  float *d = malloc(sizeof(float) * (size_t)x->in);
  if (!w || !d) { free(w); free(d); return NULL; }
  const uint16_t *src = t->data;
  for (int o = 0; o < x->out; o++) {
    lora_delta_row(x, 0, o, d);
    for (int i = 0; i < x->in; i++) {
      size_t j = (size_t)o * x->in + i;
      w[j] = gptoss_f32_to_bf16(gptoss_bf16_to_f32(src[j]) + d[i]);
    }
  }
  free(d);
  return w;
}

/* An expert matrix with its LoRA merged, laid out as transformers holds
   unquantized gpt-oss experts: bf16 [E][in][out] (used as x @ W), from the
   MXFP4 blocks [E][out][in/32][16] and scales [E][out][in/32]. MXFP4 cannot
   hold a LoRA's delta (requantizing would round most of it away), so a
   merge with expert LoRAs writes every expert matrix this way. */
typedef struct expert_job {
  const uint8_t *blocks, *scales;
  const gptoss_lora *x;          /* NULL: the experts of a layer without this LoRA */
  int E, out, in;
  uint16_t *w;
  int failed;
} expert_job;

static void merge_experts_part(void *ctx, int tid, int nth) {
  expert_job *j = ctx;
  float *row = malloc(sizeof(float) * (size_t)j->in), *d = malloc(sizeof(float) * (size_t)j->in);
  if (!row || !d) { free(row); free(d); j->failed = 1; return; }
  int G = j->in / 32;
  for (int e = tid; e < j->E; e += nth)
    for (int o = 0; o < j->out; o++) {
      size_t r = (size_t)e * j->out + o;
      cpu_mxfp4_row(row, j->blocks + r * G * 16, j->scales + r * G, j->in);
      if (j->x) {
        lora_delta_row(j->x, e, o, d);
        for (int i = 0; i < j->in; i++) row[i] += d[i];
      }
      for (int i = 0; i < j->in; i++) j->w[((size_t)e * j->in + i) * j->out + o] = gptoss_f32_to_bf16(row[i]);
    }
  free(row);
  free(d);
}

static uint16_t *merged_experts(const gptoss_tensor *blocks, const gptoss_tensor *scales, const gptoss_lora *x, int E, int out,
                                int in, int threads) {
  expert_job j = {blocks->data, scales->data, x, E, out, in, malloc(sizeof(uint16_t) * (size_t)E * in * out), 0};
  if (!j.w) return NULL;
  int nth = threads < 1 ? 1 : threads > E ? E : threads;
  gptoss_pool *pool = nth > 1 ? gptoss_pool_new(nth) : NULL;
  gptoss_pool_run(pool, merge_experts_part, &j);
  gptoss_pool_free(pool);
  if (j.failed) { free(j.w); return NULL; }
  return j.w;
}

/* config.json without quantization_config, and the index with the expert
   matrices under their unquantized names (when the experts go out in bf16) */
static gptoss_status unquantized_json(const char *src, const char *dst, int index, uint64_t total_size) {
  size_t len;
  char *text = gptoss_read_file(src, &len);
  if (!text) return gptoss_errcode();
  cJSON *j = cJSON_ParseWithLength(text, len);
  free(text);
  if (!j) return gptoss_fail(GPTOSS_EFORMAT, "%s: not valid JSON", src);
  if (!index) cJSON_DeleteItemFromObjectCaseSensitive(j, "quantization_config");
  else {
    cJSON *map = cJSON_GetObjectItemCaseSensitive(j, "weight_map"), *out = cJSON_CreateObject(), *e;
    if (!out) { cJSON_Delete(j); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
    cJSON_ArrayForEach(e, map) {
      size_t n = strlen(e->string);
      if (n > 7 && !strcmp(e->string + n - 7, "_scales")) continue;
      char *name = strdup(e->string);
      if (!name) { cJSON_Delete(out); cJSON_Delete(j); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
      if (n > 7 && !strcmp(name + n - 7, "_blocks")) name[n - 7] = 0;
      cJSON_AddItemToObject(out, name, cJSON_Duplicate(e, 0));
      free(name);
    }
    cJSON_ReplaceItemInObjectCaseSensitive(j, "weight_map", out);
    cJSON *meta = cJSON_GetObjectItemCaseSensitive(j, "metadata");
    if (cJSON_IsObject(meta)) cJSON_ReplaceItemInObjectCaseSensitive(meta, "total_size", cJSON_CreateNumber((double)total_size));
  }
  char *txt = cJSON_Print(j);
  cJSON_Delete(j);
  if (!txt) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  gptoss_status rc = gptoss_write_file(dst, txt, strlen(txt));
  free(txt);
  return rc;
}

gptoss_status gptoss_adapter_merge(const gptoss_model *m, const gptoss_adapter *a, const char *out_dir, int threads) {
  gptoss_adapter_wait(a, -1);
  gptoss_status rc = gptoss_adapter_check(a, m);
  if (rc) return rc;
  int bf16_experts = 0;
  uint64_t total_size = 0;   /* of the tensors written, for the index */
  for (int l = 0; l < a->nlayers; l++)
    bf16_experts |= gptoss_adapter_module(a, l, GPTOSS_LORA_GU) || gptoss_adapter_module(a, l, GPTOSS_LORA_DN);
  struct stat sb;
  if (stat(out_dir, &sb) == 0) return gptoss_fail(GPTOSS_EIO, "%s: already exists; merge writes a new directory", out_dir);
  size_t n = strlen(out_dir) + 16;
  char *tmp = malloc(n);
  if (!tmp) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  snprintf(tmp, n, "%s.tmp-XXXXXX", out_dir);
  if (!mkdtemp(tmp)) { rc = gptoss_fail(GPTOSS_EIO, "%s: %s", tmp, strerror(errno)); free(tmp); return rc; }
  const gptoss_st *st = m->st;
  size_t nt = gptoss_st_count(st);
  /* one output file per input file, in the same layout, so the index stays valid */
  const char **files = calloc(nt, sizeof *files);
  size_t nf = 0;
  if (!files) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  for (size_t i = 0; i < nt && !rc; i++) {
    const char *f = gptoss_st_at(st, i)->file;
    size_t k = 0;
    while (k < nf && strcmp(files[k], f) != 0) k++;
    if (k == nf) files[nf++] = f;
  }
  for (size_t fi = 0; fi < nf && !rc; fi++) {
    const char *base = strrchr(files[fi], '/');
    char *path = gptoss_path_join(tmp, base ? base + 1 : files[fi]);
    gptoss_st_writer *w = NULL;
    if (!path) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    if (!rc) rc = gptoss_stw_new(path, &w);
    for (size_t i = 0; i < nt && !rc; i++) {
      const gptoss_tensor *t = gptoss_st_at(st, i);
      if (strcmp(t->file, files[fi]) != 0) continue;
      const gptoss_lora *x = NULL;
      int expert = -1, el = -1;   /* 0: gate_up, 1: down (blocks), 2: their scales, in layer el */
      for (int l = 0; l < m->cfg.num_hidden_layers && !x && expert < 0; l++) {
        static const gptoss_role role[GPTOSS_LORA_ATTN_MODULES] = {GPTOSS_T_Q_W, GPTOSS_T_K_W, GPTOSS_T_V_W, GPTOSS_T_O_W};
        for (int k = 0; k < GPTOSS_LORA_ATTN_MODULES && !x; k++)
          if (LAYER_T(m, l, role[k]) == t) x = gptoss_adapter_module(a, l, k);
        if (!bf16_experts) continue;
        if (LAYER_T(m, l, GPTOSS_T_GU_BLOCKS) == t) expert = 0;
        else if (LAYER_T(m, l, GPTOSS_T_DN_BLOCKS) == t) expert = 1;
        else if (LAYER_T(m, l, GPTOSS_T_GU_SCALES) == t || LAYER_T(m, l, GPTOSS_T_DN_SCALES) == t) expert = 2;
        if (expert >= 0) el = l;
      }
      if (expert == 2) continue;   /* folded into its matrix */
      if (expert >= 0) {
        const gptoss_config *c = &m->cfg;
        int E = c->num_local_experts, H = c->hidden_size, I = c->intermediate_size;
        int out = expert == 0 ? 2 * I : H, in = expert == 0 ? H : I;
        const gptoss_tensor *sc = LAYER_T(m, el, expert == 0 ? GPTOSS_T_GU_SCALES : GPTOSS_T_DN_SCALES);
        uint16_t *mw = merged_experts(t, sc, gptoss_adapter_module(a, el, expert == 0 ? GPTOSS_LORA_GU : GPTOSS_LORA_DN), E, out, in,
                                      threads);
        if (!mw) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory merging %s", t->name); break; }
        char name[160];
        snprintf(name, sizeof name, "%.*s", (int)(strlen(t->name) - 7), t->name);   /* without "_blocks" */
        int64_t shape[3] = {E, in, out};
        gptoss_fill f = {GPTOSS_FILL_DATA, 0, 0, 0, mw, sizeof(uint16_t) * (size_t)E * in * out};
        rc = gptoss_stw_add(w, name, GPTOSS_BF16, 3, shape, &f);
        total_size += f.nbytes;
        free(mw);
        continue;
      }
      uint16_t *mw = NULL;
      if (x && !(mw = merged(t, x))) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory merging %s", t->name); break; }
      gptoss_fill f = {GPTOSS_FILL_DATA, 0, 0, 0, mw ? (const void *)mw : t->data, t->nbytes};
      rc = gptoss_stw_add(w, t->name, t->dtype, t->ndim, t->shape, &f);
      total_size += t->nbytes;
      free(mw);
    }
    if (!rc) {
      const char *fmt = gptoss_st_metadata(st, "format");
      rc = gptoss_stw_metadata(w, "format", fmt ? fmt : "pt");
    }
    if (!rc) rc = gptoss_stw_commit(w, threads);
    gptoss_stw_free(w);
    free(path);
  }
  /* every other file of the model directory: config, index, tokenizer */
  DIR *d = rc ? NULL : opendir(m->dir);
  if (!rc && !d) rc = gptoss_fail(GPTOSS_EIO, "%s: %s", m->dir, strerror(errno));
  if (d) {
    struct dirent *e;
    while (!rc && (e = readdir(d))) {
      size_t len = strlen(e->d_name);
      if (e->d_name[0] == '.' || (len > 12 && !strcmp(e->d_name + len - 12, ".safetensors"))) continue;
      char *src = gptoss_path_join(m->dir, e->d_name), *dst = gptoss_path_join(tmp, e->d_name);
      struct stat fs;
      if (!src || !dst) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory");
      else if (stat(src, &fs) == 0 && S_ISREG(fs.st_mode)) {
        int index = !strcmp(e->d_name, "model.safetensors.index.json");
        if (bf16_experts && (index || !strcmp(e->d_name, "config.json"))) rc = unquantized_json(src, dst, index, total_size);
        else rc = copy_file(src, dst);
      }
      free(src);
      free(dst);
    }
    closedir(d);
  }
  if (!rc && rename(tmp, out_dir) != 0) rc = gptoss_fail(GPTOSS_EIO, "%s: %s", out_dir, strerror(errno));
  if (rc) remove_tree(tmp);
  free(files);
  free(tmp);
  return rc;
}
/* }====================================================== */
