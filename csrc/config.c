/*
** config.c: config.json of model_type gpt_oss, parsed, checked and written.
*/
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>
#include "internal.h"

static const cJSON *get(const cJSON *j, const char *key);
static gptoss_status int_value(const cJSON *v, const char *w, const char *key, int min, int *out);

static gptoss_status want_int(const cJSON *j, const char *where, const char *key, int min, int *out) {
  const cJSON *v = get(j, key);
  if (!v) return gptoss_fail(GPTOSS_EFORMAT, "%s: missing field '%s'", where, key);
  return int_value(v, where, key, min, out);
}

static gptoss_status want_num(const cJSON *j, const char *where, const char *key, double *out) {
  const cJSON *v = get(j, key);
  if (!v) return gptoss_fail(GPTOSS_EFORMAT, "%s: missing field '%s'", where, key);
  if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: field '%s' must be a number", where, key);
  *out = v->valuedouble;
  return GPTOSS_OK;
}

/* cJSON's lookup gives a repeated key's first value; Python's json (which
   transformers reads configs with) keeps the last, so the last one wins */
static const cJSON *get(const cJSON *j, const char *key) {
  const cJSON *found = NULL, *x;
  cJSON_ArrayForEach(x, j) if (x->string && strcmp(x->string, key) == 0) found = x;
  return found;
}

/* a number that is an integer in [min, INT_MAX]; where names the field in errors */
static gptoss_status int_value(const cJSON *v, const char *w, const char *key, int min, int *out) {
  if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < min ||
      v->valuedouble > 2147483647.0) {
    if (cJSON_IsNumber(v))
      return gptoss_fail(GPTOSS_EFORMAT, "%s: field '%s' must be an integer >= %d (got %.17g)", w, key, min, v->valuedouble);
    return gptoss_fail(GPTOSS_EFORMAT, "%s: field '%s' must be an integer >= %d", w, key, min);
  }
  *out = (int)v->valuedouble;
  return GPTOSS_OK;
}

/* an optional integer: absent or null gives dflt; anything else must be one */
static gptoss_status opt_int(const cJSON *j, const char *w, const char *key, int min, int dflt, int *out) {
  const cJSON *v = get(j, key);
  if (!v || cJSON_IsNull(v)) { *out = dflt; return GPTOSS_OK; }
  return int_value(v, w, key, min, out);
}

/* an optional boolean: absent or null is false */
static gptoss_status opt_bool(const cJSON *j, const char *w, const char *key, int *out) {
  const cJSON *v = get(j, key);
  if (v && !cJSON_IsNull(v) && !cJSON_IsBool(v))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: field '%s' must be true or false", w, key);
  *out = cJSON_IsTrue(v);
  return GPTOSS_OK;
}

gptoss_status gptoss_config_check(const gptoss_config *c, const char *w) {
  if (c->num_hidden_layers > GPTOSS_MAX_LAYERS)
    return gptoss_fail(GPTOSS_EUNSUP, "%s: num_hidden_layers %d exceeds this build's limit of %d", w, c->num_hidden_layers, GPTOSS_MAX_LAYERS);
  if (c->hidden_size % 32)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: hidden_size %d is not a multiple of 32, as MXFP4 blocks need", w, c->hidden_size);
  if (c->intermediate_size % 32)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: intermediate_size %d is not a multiple of 32, as MXFP4 blocks need", w, c->intermediate_size);
  if (c->head_dim % 2)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: head_dim %d must be even for rotary embeddings", w, c->head_dim);
  if (c->num_attention_heads % c->num_key_value_heads)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d", w,
                       c->num_attention_heads, c->num_key_value_heads);
  if (c->num_experts_per_tok > c->num_local_experts)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: num_experts_per_tok %d exceeds num_local_experts %d", w,
                       c->num_experts_per_tok, c->num_local_experts);
  int any_sliding = 0;
  for (int i = 0; i < c->num_hidden_layers; i++) any_sliding |= c->layer_sliding[i];
  if (any_sliding && c->sliding_window < 1)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: sliding_window must be >= 1 when a layer is sliding_attention", w);
  if (!(c->rms_norm_eps > 0)) return gptoss_fail(GPTOSS_EFORMAT, "%s: rms_norm_eps must be > 0", w);
  if (!(c->swiglu_limit > 0)) return gptoss_fail(GPTOSS_EFORMAT, "%s: swiglu_limit must be > 0", w);
  if (!(c->rope_theta > 1)) return gptoss_fail(GPTOSS_EFORMAT, "%s: rope_theta must be > 1", w);
  if (c->rope_yarn) {
    if (!(c->rope_factor >= 1)) return gptoss_fail(GPTOSS_EFORMAT, "%s: rope_scaling.factor must be >= 1", w);
    if (c->rope_original_max_position_embeddings < 1)
      return gptoss_fail(GPTOSS_EFORMAT, "%s: rope_scaling.original_max_position_embeddings must be >= 1", w);
    if (!(c->rope_beta_fast > c->rope_beta_slow) || !(c->rope_beta_slow > 0))
      return gptoss_fail(GPTOSS_EFORMAT, "%s: rope_scaling needs beta_fast > beta_slow > 0", w);
  }
  for (int i = 0; i < c->n_eos; i++)
    if (c->eos_token_ids[i] < 0 || c->eos_token_ids[i] >= c->vocab_size)
      return gptoss_fail(GPTOSS_EFORMAT, "%s: eos_token_id %d is outside the vocabulary (%d)", w, c->eos_token_ids[i], c->vocab_size);
  if (c->pad_token_id >= c->vocab_size)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: pad_token_id %d is outside the vocabulary (%d)", w, c->pad_token_id, c->vocab_size);
  return GPTOSS_OK;
}

gptoss_status gptoss_config_parse(const char *json, size_t len, const char *w, gptoss_config *c) {
  memset(c, 0, sizeof *c);
  const char *perr = NULL;
  cJSON *j = cJSON_ParseWithLengthOpts(json, len, &perr, 0);
  if (!j) return gptoss_fail(GPTOSS_EFORMAT, "%s: not valid JSON (near byte %zu)", w, perr ? (size_t)(perr - json) : 0);
  gptoss_status rc = GPTOSS_OK;
  if (!cJSON_IsObject(j)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: not a JSON object", w); goto done; }
  const cJSON *mt = get(j, "model_type");
  if (!cJSON_IsString(mt)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: missing field 'model_type'", w); goto done; }
  if (strcmp(mt->valuestring, "gpt_oss") != 0) {
    rc = gptoss_fail(GPTOSS_EUNSUP, "%s: model_type is '%s'; gptoss runs only model_type 'gpt_oss'", w, mt->valuestring);
    goto done;
  }
#define INT(k, min) if ((rc = want_int(j, w, #k, min, &c->k))) goto done
  INT(hidden_size, 1);
  INT(intermediate_size, 1);
  INT(num_hidden_layers, 1);
  INT(num_attention_heads, 1);
  INT(num_key_value_heads, 1);
  INT(head_dim, 2);
  INT(num_local_experts, 1);
  INT(vocab_size, 1);
  INT(max_position_embeddings, 1);
#undef INT
  if (get(j, "num_experts_per_tok")) rc = want_int(j, w, "num_experts_per_tok", 1, &c->num_experts_per_tok);
  else rc = want_int(j, w, "experts_per_token", 1, &c->num_experts_per_tok);
  if (rc) goto done;
  if ((rc = opt_int(j, w, "initial_context_length", 1, c->max_position_embeddings, &c->initial_context_length))) goto done;
  if ((rc = want_num(j, w, "rope_theta", &c->rope_theta))) goto done;
  if ((rc = want_num(j, w, "rms_norm_eps", &c->rms_norm_eps))) goto done;
  if ((rc = want_num(j, w, "swiglu_limit", &c->swiglu_limit))) goto done;
  if (c->num_hidden_layers > GPTOSS_MAX_LAYERS) { rc = gptoss_config_check(c, w); goto done; }

  const cJSON *lt = get(j, "layer_types");
  if (lt && !cJSON_IsNull(lt)) {
    if (!cJSON_IsArray(lt)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: field 'layer_types' must be an array", w); goto done; }
    if (cJSON_GetArraySize(lt) != c->num_hidden_layers) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer_types has %d entries but num_hidden_layers is %d", w,
                       cJSON_GetArraySize(lt), c->num_hidden_layers);
      goto done;
    }
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, lt) {
      if (cJSON_IsString(x) && strcmp(x->valuestring, "sliding_attention") == 0) c->layer_sliding[i] = 1;
      else if (cJSON_IsString(x) && strcmp(x->valuestring, "full_attention") == 0) c->layer_sliding[i] = 0;
      else { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: layer_types[%d] must be \"sliding_attention\" or \"full_attention\"", w, i); goto done; }
      i++;
    }
  } else {
    /* the transformers default: even layers slide */
    for (int i = 0; i < c->num_hidden_layers; i++) c->layer_sliding[i] = (i % 2) == 0;
  }
  const cJSON *sw = get(j, "sliding_window");
  if (sw && !cJSON_IsNull(sw)) { if ((rc = want_int(j, w, "sliding_window", 1, &c->sliding_window))) goto done; }

  const cJSON *rs = get(j, "rope_scaling");
  if (rs && !cJSON_IsNull(rs)) {
    if (!cJSON_IsObject(rs)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: field 'rope_scaling' must be an object", w); goto done; }
    const cJSON *ty = get(rs, "rope_type");
    if (!ty) ty = get(rs, "type");
    if (!cJSON_IsString(ty)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: missing field 'rope_scaling.rope_type'", w); goto done; }
    if (strcmp(ty->valuestring, "yarn") == 0) {
      char where2[512];
      snprintf(where2, sizeof where2, "%s: rope_scaling", w);
      c->rope_yarn = 1;
      if ((rc = want_num(rs, where2, "factor", &c->rope_factor))) goto done;
      if ((rc = want_num(rs, where2, "beta_fast", &c->rope_beta_fast))) goto done;
      if ((rc = want_num(rs, where2, "beta_slow", &c->rope_beta_slow))) goto done;
      if ((rc = want_int(rs, where2, "original_max_position_embeddings", 1, &c->rope_original_max_position_embeddings))) goto done;
      const cJSON *tr = get(rs, "truncate");
      /* transformers' default when the key is absent is to truncate */
      if (tr && !cJSON_IsBool(tr)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: rope_scaling.truncate must be true or false", w); goto done; }
      c->rope_truncate = tr ? cJSON_IsTrue(tr) : 1;
    } else if (strcmp(ty->valuestring, "default") != 0) {
      rc = gptoss_fail(GPTOSS_EUNSUP, "%s: rope_scaling.rope_type '%s' is not supported (yarn or default)", w, ty->valuestring);
      goto done;
    }
  }

  const cJSON *eos = get(j, "eos_token_id");
  if (cJSON_IsNumber(eos)) { if ((rc = int_value(eos, w, "eos_token_id", 0, &c->eos_token_ids[c->n_eos++]))) goto done; }
  else if (cJSON_IsArray(eos)) {
    if (cJSON_GetArraySize(eos) > GPTOSS_MAX_EOS) {
      rc = gptoss_fail(GPTOSS_EUNSUP, "%s: eos_token_id lists %d ids; this build keeps at most %d", w, cJSON_GetArraySize(eos), GPTOSS_MAX_EOS);
      goto done;
    }
    const cJSON *x;
    cJSON_ArrayForEach(x, eos)
      if ((rc = int_value(x, w, "eos_token_id", 0, &c->eos_token_ids[c->n_eos++]))) goto done;
  } else if (eos && !cJSON_IsNull(eos)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: eos_token_id must be an integer or a list", w); goto done; }
  if ((rc = opt_int(j, w, "pad_token_id", 0, -1, &c->pad_token_id))) goto done;
  if ((rc = opt_int(j, w, "bos_token_id", 0, -1, &c->bos_token_id))) goto done;
  if ((rc = opt_bool(j, w, "tie_word_embeddings", &c->tie_word_embeddings))) goto done;
  const cJSON *ab = get(j, "attention_bias");
  if (ab && !cJSON_IsTrue(ab)) { rc = gptoss_fail(GPTOSS_EUNSUP, "%s: attention_bias false is not supported (gpt-oss has biases)", w); goto done; }
  const cJSON *qc = get(j, "quantization_config");
  if (qc && !cJSON_IsNull(qc)) {
    const cJSON *qm = get(qc, "quant_method");
    if (!cJSON_IsString(qm)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: quantization_config has no quant_method", w); goto done; }
    if (strcmp(qm->valuestring, "mxfp4") != 0) {
      rc = gptoss_fail(GPTOSS_EUNSUP, "%s: quantization_config.quant_method '%s' is not supported (mxfp4)", w, qm->valuestring);
      goto done;
    }
    c->experts_mxfp4 = 1;
  }
  rc = gptoss_config_check(c, w);
done:
  cJSON_Delete(j);
  return rc;
}

gptoss_status gptoss_config_load(const char *path, gptoss_config *out) {
  char *file = gptoss_is_dir(path) ? gptoss_path_join(path, "config.json") : strdup(path);
  if (!file) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  size_t len;
  char *txt = gptoss_read_file(file, &len);
  gptoss_status rc = txt ? gptoss_config_parse(txt, len, file, out) : gptoss_errcode();
  free(txt);
  free(file);
  return rc;
}

/* {====================================================== writing */
typedef struct sbuf { char *p; size_t n, cap; int oom; } sbuf;

static void put(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(sbuf *b, const char *fmt, ...) {
  va_list ap;
  for (;;) {
    va_start(ap, fmt);
    int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
    va_end(ap);
    if (k < 0) { b->oom = 1; return; }
    if (b->p && b->n + (size_t)k < b->cap) { b->n += (size_t)k; return; }
    size_t nc = (b->cap ? b->cap * 2 : 1024) + (size_t)k;
    char *np = realloc(b->p, nc);
    if (!np) { b->oom = 1; return; }
    b->p = np;
    b->cap = nc;
  }
}

/* Python's repr of a float: shortest round-trip digits, ".0" on integers */
static void put_float(sbuf *b, double v) {
  char tmp[40];
  for (int prec = 1; prec <= 17; prec++) {
    snprintf(tmp, sizeof tmp, "%.*g", prec, v);
    if (strtod(tmp, NULL) == v) break;
  }
  if (!strpbrk(tmp, ".eEn")) strcat(tmp, ".0");
  /* Python writes 1e-05, C writes 1e-05 too; nothing else to adjust */
  put(b, "%s", tmp);
}

char *gptoss_config_to_json(const gptoss_config *c) {
  sbuf b = {0};
  put(&b, "{\n  \"architectures\": [\n    \"GptOssForCausalLM\"\n  ],\n");
  put(&b, "  \"attention_bias\": true,\n  \"attention_dropout\": 0.0,\n");
  if (c->bos_token_id >= 0) put(&b, "  \"bos_token_id\": %d,\n", c->bos_token_id);
  if (c->n_eos == 1) put(&b, "  \"eos_token_id\": %d,\n", c->eos_token_ids[0]);
  else {
    put(&b, "  \"eos_token_id\": [");
    for (int i = 0; i < c->n_eos; i++) put(&b, "%s%d", i ? ", " : "", c->eos_token_ids[i]);
    put(&b, "],\n");
  }
  put(&b, "  \"experts_per_token\": %d,\n", c->num_experts_per_tok);
  put(&b, "  \"head_dim\": %d,\n  \"hidden_act\": \"silu\",\n  \"hidden_size\": %d,\n", c->head_dim, c->hidden_size);
  put(&b, "  \"initial_context_length\": %d,\n  \"initializer_range\": 0.02,\n", c->initial_context_length);
  put(&b, "  \"intermediate_size\": %d,\n  \"layer_types\": [\n", c->intermediate_size);
  for (int i = 0; i < c->num_hidden_layers; i++)
    put(&b, "    \"%s\"%s\n", c->layer_sliding[i] ? "sliding_attention" : "full_attention",
        i + 1 < c->num_hidden_layers ? "," : "");
  put(&b, "  ],\n  \"max_position_embeddings\": %d,\n  \"model_type\": \"gpt_oss\",\n", c->max_position_embeddings);
  put(&b, "  \"num_attention_heads\": %d,\n  \"num_experts_per_tok\": %d,\n", c->num_attention_heads, c->num_experts_per_tok);
  put(&b, "  \"num_hidden_layers\": %d,\n  \"num_key_value_heads\": %d,\n", c->num_hidden_layers, c->num_key_value_heads);
  put(&b, "  \"num_local_experts\": %d,\n  \"output_router_logits\": false,\n", c->num_local_experts);
  if (c->pad_token_id >= 0) put(&b, "  \"pad_token_id\": %d,\n", c->pad_token_id);
  if (c->experts_mxfp4)
    put(&b, "  \"quantization_config\": {\n    \"modules_to_not_convert\": [\n      \"model.layers.*.self_attn\",\n"
          "      \"model.layers.*.mlp.router\",\n      \"model.embed_tokens\",\n      \"lm_head\"\n    ],\n"
          "    \"quant_method\": \"mxfp4\"\n  },\n");
  put(&b, "  \"rms_norm_eps\": ");
  put_float(&b, c->rms_norm_eps);
  put(&b, ",\n");
  if (c->rope_yarn) {
    put(&b, "  \"rope_scaling\": {\n    \"beta_fast\": ");
    put_float(&b, c->rope_beta_fast);
    put(&b, ",\n    \"beta_slow\": ");
    put_float(&b, c->rope_beta_slow);
    put(&b, ",\n    \"factor\": ");
    put_float(&b, c->rope_factor);
    put(&b, ",\n    \"original_max_position_embeddings\": %d,\n    \"rope_type\": \"yarn\",\n    \"truncate\": %s\n  },\n",
        c->rope_original_max_position_embeddings, c->rope_truncate ? "true" : "false");
  } else {
    put(&b, "  \"rope_scaling\": null,\n");
  }
  if (c->rope_theta == floor(c->rope_theta) && c->rope_theta < 1e15) put(&b, "  \"rope_theta\": %.0f,\n", c->rope_theta);
  else { put(&b, "  \"rope_theta\": "); put_float(&b, c->rope_theta); put(&b, ",\n"); }
  put(&b, "  \"router_aux_loss_coef\": 0.9,\n  \"sliding_window\": %d,\n  \"swiglu_limit\": ", c->sliding_window);
  put_float(&b, c->swiglu_limit);
  put(&b, ",\n  \"tie_word_embeddings\": %s,\n  \"transformers_version\": \"4.55.0.dev0\",\n", c->tie_word_embeddings ? "true" : "false");
  put(&b, "  \"use_cache\": true,\n  \"vocab_size\": %d\n}\n", c->vocab_size);
  if (b.oom) { free(b.p); return NULL; }
  return b.p;
}
/* }====================================================== */
