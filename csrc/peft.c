/*
** peft.c: an adapter's files as Hugging Face PEFT saves them: a directory
** with adapter_config.json and adapter_model.safetensors.
**
** The rank of each module is read from its tensors, so rank_pattern needs
** no parsing; alpha_pattern would, and is refused.
*/
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapter_impl.h"

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
        ok = n >= 6 && strcmp(s + n - 6, gptoss_lora_names[i]) == 0 && (n == 6 || s[n - 7] == '.');
      if (s && !ok) ok = gptoss_unsloth_target(s);   /* Unsloth's experts, a Linear each (unsloth.c) */
      if (!ok)
        return gptoss_fail(GPTOSS_EUNSUP, "%s: field target_modules: entry %s is not a module this engine applies LoRA to "
                           "(q_proj, k_proj, v_proj, o_proj, Unsloth's gate_up_projs and down_projs; the experts also through "
                           "target_parameters)", path, s ? s : "(not a string)");
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
      if (gptoss_lora_names[i][0] == p) { *layer = l; *mod = i; *ab = which == 'B'; return 1; }
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

/* a module's tensor name as PEFT writes it, target_parameters tp[0..ntp) */
static void tensor_name(const int *tp, int ntp, int l, int m, char ab, char *buf, size_t n) {
  if (m < GPTOSS_LORA_ATTN_MODULES) {
    snprintf(buf, n, "base_model.model.model.layers.%d.self_attn.%s.lora_%c.weight", l, gptoss_lora_names[m], ab);
    return;
  }
  int depth = 0;
  for (int k = ntp - 1; k >= 0 && tp[k] != m; k--) depth++;
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
  int rb[GPTOSS_MAX_LAYERS * GPTOSS_LORA_MODULES];   /* lora_B's columns as read, to check against lora_A's rows */
  if (!cpath || !wpath) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  if (!gptoss_path_exists(wpath)) { rc = gptoss_fail(GPTOSS_EIO, "%s: no such file (PEFT adapters keep their weights there)", wpath); goto done; }
  if (!(a = gptoss_adapter_alloc(GPTOSS_MAX_LAYERS))) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  if ((rc = read_config(cpath, a))) goto done;
  if ((rc = gptoss_st_open(wpath, &st))) goto done;
  int nl = 0;
  size_t n = gptoss_st_count(st);
  if (n == 0) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: holds no tensors", wpath); goto done; }
  for (size_t i = 0; i < n; i++) {
    const gptoss_tensor *t = gptoss_st_at(st, i);
    int l, m, ab, e;
    if (gptoss_unsloth_name(t->name, &l, &m, &e, &ab)) continue;   /* per expert: gptoss_unsloth_load below */
    if (!parse_name(a, t->name, &l, &m, &ab)) {
      rc = gptoss_fail(GPTOSS_EUNSUP, "%s: tensor %s is not a LoRA weight of an attention projection "
                       "(base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight), of the experts "
                       "named in target_parameters, or of Unsloth's per-expert modules "
                       "(base_model.model.model.layers.N.mlp.experts.{gate_up,down}_projs.E.lora_{A,B}.weight)", wpath, t->name);
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
    if (ab) { x->out = (int)t->shape[0]; rb[l * GPTOSS_LORA_MODULES + m] = (int)t->shape[1]; }
    else { x->rk = (int)t->shape[0]; x->in = (int)t->shape[1]; }
    if (t->shape[ab] > (m < GPTOSS_LORA_ATTN_MODULES ? GPTOSS_LORA_MAX_RANK : GPTOSS_LORA_MAX_RANK * 256)) {
      rc = gptoss_fail(GPTOSS_EUNSUP, "%s: tensor %s has rank %lld; at most %d is supported", wpath, t->name,
                       (long long)t->shape[ab], GPTOSS_LORA_MAX_RANK);
      goto done;
    }
  }
  if ((rc = gptoss_unsloth_load(a, st, wpath, rb, &nl, to_f32))) goto done;
  a->nlayers = nl;
  for (int l = 0; l < nl; l++)
    for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
      gptoss_lora *x = &a->mod[l * GPTOSS_LORA_MODULES + m];
      if (!x->A && !x->B) continue;
      if (!x->A || !x->B) {
        rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s has lora_%c but not lora_%c", wpath, l, gptoss_lora_names[m],
                         x->A ? 'A' : 'B', x->A ? 'B' : 'A');
        goto done;
      }
      if (rb[l * GPTOSS_LORA_MODULES + m] != x->rk) {
        rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s: lora_A has rank %d, lora_B rank %d", wpath, l, gptoss_lora_names[m],
                         x->rk, rb[l * GPTOSS_LORA_MODULES + m]);
        goto done;
      }
      if (m < GPTOSS_LORA_ATTN_MODULES) {
        x->r = x->rk;
        x->experts = 0;
        if (x->r != a->r && !rank_allowed(a, x->r)) {
          rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s has rank %d, but adapter_config.json gives r = %d and no rank_pattern "
                           "entry of %d", wpath, l, gptoss_lora_names[m], x->r, a->r, x->r);
          goto done;
        }
      }
      else {                                    /* r per expert comes from the config */
        if (x->rk % a->r) {
          rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer %d %s: lora_A has %d rows, not a multiple of r = %d", wpath, l,
                           gptoss_lora_names[m], x->rk, a->r);
          goto done;
        }
        x->r = a->r;
        x->experts = x->rk / a->r;
      }
      if ((rc = gptoss_lora_check_scale(cpath, a->alpha, x->r, a->rslora))) goto done;
      x->scale = (float)gptoss_lora_scale(a->alpha, x->r, a->rslora);
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

/* {====================================================== save */
gptoss_status gptoss_adapter_save(const gptoss_adapter *a, const char *dir) {
  return gptoss_adapter_save_layout(a, dir, GPTOSS_LAYOUT_PEFT);
}

gptoss_status gptoss_adapter_save_layout(const gptoss_adapter *a, const char *dir, gptoss_layout layout) {
  if (layout != GPTOSS_LAYOUT_PEFT && layout != GPTOSS_LAYOUT_UNSLOTH)
    return gptoss_fail(GPTOSS_EARG, "adapter save: unknown layout %d", (int)layout);
  gptoss_adapter_wait(a, -1);
  /* the expert modules it has, and the order PEFT's files name them in:
     the config's target_parameters when it lists them all (an adapter read
     from PEFT's files), else gate_up first, as the config is then written */
  unsigned have = gptoss_adapter_held(a) & ~((1u << GPTOSS_LORA_ATTN_MODULES) - 1), listed = 0;
  for (int k = 0; k < a->ntp; k++) listed |= 1u << a->tp[k];
  int keep = layout == GPTOSS_LAYOUT_PEFT && (have & ~listed) == 0;
  int tp[2], ntp = 0;
  if (keep) for (int k = 0; k < a->ntp; k++) tp[ntp++] = a->tp[k];
  else for (int i = GPTOSS_LORA_GU; i <= GPTOSS_LORA_DN; i++) if (have & (1u << i)) tp[ntp++] = i;
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
      if (layout == GPTOSS_LAYOUT_UNSLOTH && i >= GPTOSS_LORA_ATTN_MODULES) { rc = gptoss_unsloth_write(x, l, i, w); continue; }
      tensor_name(tp, ntp, l, i, 'A', name, sizeof name);
      rc = gptoss_stw_add(w, name, GPTOSS_F32, 2, sa, &fa);
      tensor_name(tp, ntp, l, i, 'B', name, sizeof name);
      if (!rc) rc = gptoss_stw_add(w, name, GPTOSS_F32, 2, sb, &fb);
    }
  if (!rc) rc = gptoss_stw_metadata(w, "format", "pt");
  if (!rc) rc = gptoss_stw_commit(w, 1);
  if (rc) goto done;
  if (keep) json = cJSON_Print(a->config);
  else {
    cJSON *c = gptoss_unsloth_config(a, layout == GPTOSS_LAYOUT_UNSLOTH);
    json = c ? cJSON_Print(c) : NULL;
    cJSON_Delete(c);
  }
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

/* {====================================================== a new adapter's config */
/* PEFT's adapter_config.json for a new adapter */
cJSON *gptoss_peft_new_config(const gptoss_model *m, const gptoss_lora_opts *o) {
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
    if (o->modules & (1u << i)) cJSON_AddItemToArray(tm, cJSON_CreateString(gptoss_lora_names[i]));
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
/* }====================================================== */
