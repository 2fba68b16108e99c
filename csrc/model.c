/*
** model.c: the one description of a gpt-oss checkpoint (tensor names,
** dtypes, shapes), loading it against a config, and choosing a backend.
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend.h"

/* {====================================================== tensor specs */
static void spec(gptoss_tensor_spec *s, const char *name, gptoss_dtype dt, gptoss_role role, int layer,
                 int ndim, int64_t a, int64_t b, int64_t c, int64_t d) {
  snprintf(s->name, sizeof s->name, "%s", name);
  s->dtype = dt;
  s->role = role;
  s->layer = layer;
  s->ndim = ndim;
  s->shape[0] = a; s->shape[1] = b; s->shape[2] = c; s->shape[3] = d;
}

gptoss_status gptoss_tensor_specs(const gptoss_config *c, gptoss_tensor_spec **out, size_t *n) {
  int L = c->num_hidden_layers;
  size_t cap = (size_t)L * GPTOSS_T_PER_LAYER + 3;
  gptoss_tensor_spec *v = calloc(cap, sizeof *v);
  if (!v) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  int64_t H = c->hidden_size, I = c->intermediate_size, E = c->num_local_experts;
  int64_t Q = (int64_t)c->num_attention_heads * c->head_dim, KV = (int64_t)c->num_key_value_heads * c->head_dim;
  size_t k = 0;
  char nm[80];
  for (int l = 0; l < L; l++) {
#define S(suffix, dt, role, nd, a, b, cc, d) \
    snprintf(nm, sizeof nm, "model.layers.%d.%s", l, suffix); spec(&v[k++], nm, dt, role, l, nd, a, b, cc, d)
    S("input_layernorm.weight", GPTOSS_BF16, GPTOSS_T_ATTN_NORM, 1, H, 0, 0, 0);
    S("self_attn.q_proj.weight", GPTOSS_BF16, GPTOSS_T_Q_W, 2, Q, H, 0, 0);
    S("self_attn.q_proj.bias", GPTOSS_BF16, GPTOSS_T_Q_B, 1, Q, 0, 0, 0);
    S("self_attn.k_proj.weight", GPTOSS_BF16, GPTOSS_T_K_W, 2, KV, H, 0, 0);
    S("self_attn.k_proj.bias", GPTOSS_BF16, GPTOSS_T_K_B, 1, KV, 0, 0, 0);
    S("self_attn.v_proj.weight", GPTOSS_BF16, GPTOSS_T_V_W, 2, KV, H, 0, 0);
    S("self_attn.v_proj.bias", GPTOSS_BF16, GPTOSS_T_V_B, 1, KV, 0, 0, 0);
    S("self_attn.o_proj.weight", GPTOSS_BF16, GPTOSS_T_O_W, 2, H, Q, 0, 0);
    S("self_attn.o_proj.bias", GPTOSS_BF16, GPTOSS_T_O_B, 1, H, 0, 0, 0);
    S("self_attn.sinks", GPTOSS_BF16, GPTOSS_T_SINKS, 1, c->num_attention_heads, 0, 0, 0);
    S("post_attention_layernorm.weight", GPTOSS_BF16, GPTOSS_T_MLP_NORM, 1, H, 0, 0, 0);
    S("mlp.router.weight", GPTOSS_BF16, GPTOSS_T_ROUTER_W, 2, E, H, 0, 0);
    S("mlp.router.bias", GPTOSS_BF16, GPTOSS_T_ROUTER_B, 1, E, 0, 0, 0);
    if (c->experts_mxfp4) {
      S("mlp.experts.gate_up_proj_blocks", GPTOSS_U8, GPTOSS_T_GU_BLOCKS, 4, E, 2 * I, H / 32, 16);
      S("mlp.experts.gate_up_proj_scales", GPTOSS_U8, GPTOSS_T_GU_SCALES, 3, E, 2 * I, H / 32, 0);
    } else {
      S("mlp.experts.gate_up_proj", GPTOSS_BF16, GPTOSS_T_GU_BLOCKS, 3, E, H, 2 * I, 0);
    }
    S("mlp.experts.gate_up_proj_bias", GPTOSS_BF16, GPTOSS_T_GU_BIAS, 2, E, 2 * I, 0, 0);
    if (c->experts_mxfp4) {
      S("mlp.experts.down_proj_blocks", GPTOSS_U8, GPTOSS_T_DN_BLOCKS, 4, E, H, I / 32, 16);
      S("mlp.experts.down_proj_scales", GPTOSS_U8, GPTOSS_T_DN_SCALES, 3, E, H, I / 32, 0);
    } else {
      S("mlp.experts.down_proj", GPTOSS_BF16, GPTOSS_T_DN_BLOCKS, 3, E, I, H, 0);
    }
    S("mlp.experts.down_proj_bias", GPTOSS_BF16, GPTOSS_T_DN_BIAS, 2, E, H, 0, 0);
#undef S
  }
  spec(&v[k++], "model.embed_tokens.weight", GPTOSS_BF16, GPTOSS_T_EMBED, -1, 2, c->vocab_size, H, 0, 0);
  spec(&v[k++], "model.norm.weight", GPTOSS_BF16, GPTOSS_T_NORM, -1, 1, H, 0, 0, 0);
  if (!c->tie_word_embeddings)
    spec(&v[k++], "lm_head.weight", GPTOSS_BF16, GPTOSS_T_LM_HEAD, -1, 2, c->vocab_size, H, 0, 0);
  *out = v;
  *n = k;
  return GPTOSS_OK;
}

uint64_t gptoss_tensor_spec_bytes(const gptoss_tensor_spec *s) {
  uint64_t n = gptoss_dtype_size(s->dtype);
  for (int d = 0; d < s->ndim; d++) n *= (uint64_t)s->shape[d];
  return n;
}
/* }====================================================== */

/* {====================================================== rotary tables */
/* transformers' _compute_yarn_parameters, in the same float32 steps */
static void rope_tables(const gptoss_config *c, float *inv_freq, float *scale) {
  int dim = c->head_dim, half = dim / 2;
  float base = (float)c->rope_theta;
  if (!c->rope_yarn) {
    for (int i = 0; i < half; i++) inv_freq[i] = 1.0f / powf(base, (float)(2 * i) / (float)dim);
    *scale = 1.0f;
    return;
  }
  double factor = c->rope_factor;
  double orig = c->rope_original_max_position_embeddings;
  double low = (dim * log(orig / (c->rope_beta_fast * 2 * M_PI))) / (2 * log(c->rope_theta));
  double high = (dim * log(orig / (c->rope_beta_slow * 2 * M_PI))) / (2 * log(c->rope_theta));
  if (c->rope_truncate) { low = floor(low); high = ceil(high); }
  if (low < 0) low = 0;
  if (high > dim - 1) high = dim - 1;
  if (low == high) high += 0.001;
  for (int i = 0; i < half; i++) {
    float pos_freq = powf(base, (float)(2 * i) / (float)dim);
    float extrap = 1.0f / pos_freq, interp = 1.0f / ((float)factor * pos_freq);
    float ramp = (float)(((float)i - (float)low) / ((float)high - (float)low));
    if (ramp < 0) ramp = 0;
    if (ramp > 1) ramp = 1;
    float ef = 1.0f - ramp;   /* extrapolation factor */
    inv_freq[i] = interp * (1.0f - ef) + extrap * ef;
  }
  *scale = factor <= 1 ? 1.0f : (float)(0.1 * log(factor) + 1.0);
}
/* }====================================================== */

/* {====================================================== loading */
/* The experts' layout, from the tensors present (a config without
   quantization_config may hold either; a bf16 export may keep a stale
   one): MXFP4 blocks and scales, or bf16 matrices, the same in every layer.
   With neither present, the config's word stands and binding names the
   first missing tensor. */
static gptoss_status experts_layout(gptoss_model *m) {
  static const char *const mx[] = {"gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"};
  static const char *const bf[] = {"gate_up_proj", "down_proj"};
  char nm[96], first_mx[96] = "", first_bf[96] = "";
  for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
    for (int k = 0; k < 4 && !*first_mx; k++) {
      snprintf(nm, sizeof nm, "model.layers.%d.mlp.experts.%s", l, mx[k]);
      if (gptoss_st_find(m->st, nm)) memcpy(first_mx, nm, sizeof nm);
    }
    for (int k = 0; k < 2 && !*first_bf; k++) {
      snprintf(nm, sizeof nm, "model.layers.%d.mlp.experts.%s", l, bf[k]);
      if (gptoss_st_find(m->st, nm)) memcpy(first_bf, nm, sizeof nm);
    }
  }
  if (*first_mx && *first_bf)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: the experts mix two layouts: '%s' is MXFP4 but '%s' is a bf16 matrix (a checkpoint "
                       "holds every layer's experts as _blocks and _scales, or every layer's as bf16 gate_up_proj and down_proj)",
                       m->dir, first_mx, first_bf);
  if (*first_mx) m->cfg.experts_mxfp4 = 1;
  else if (*first_bf) m->cfg.experts_mxfp4 = 0;
  return GPTOSS_OK;
}

static gptoss_status bind_tensors(gptoss_model *m) {
  gptoss_status rc = experts_layout(m);
  if (rc) return rc;
  gptoss_tensor_spec *specs;
  size_t n;
  if ((rc = gptoss_tensor_specs(&m->cfg, &specs, &n))) return rc;
  int L = m->cfg.num_hidden_layers;
  m->layer = calloc((size_t)L, sizeof *m->layer);
  if (!m->cfg.experts_mxfp4) m->experts_bf16 = calloc((size_t)L, sizeof *m->experts_bf16);
  if (!m->layer || (!m->cfg.experts_mxfp4 && !m->experts_bf16)) { free(specs); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  for (size_t i = 0; i < n && !rc; i++) {
    const gptoss_tensor_spec *s = &specs[i];
    const gptoss_tensor *t = gptoss_st_find(m->st, s->name);
    char want[96], got[96];
    int k = snprintf(want, sizeof want, "%s [", gptoss_dtype_name(s->dtype));
    for (int d = 0; d < s->ndim; d++) k += snprintf(want + k, sizeof want - (size_t)k, "%s%lld", d ? ", " : "", (long long)s->shape[d]);
    snprintf(want + k, sizeof want - (size_t)k, "]");
    int expert = s->role == GPTOSS_T_GU_BLOCKS || s->role == GPTOSS_T_GU_SCALES || s->role == GPTOSS_T_DN_BLOCKS ||
                 s->role == GPTOSS_T_DN_SCALES;
    if (!t) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: missing tensor '%s' (expected %s%s)", m->dir, s->name, want,
                       !expert ? "" : m->cfg.experts_mxfp4 ? "; MXFP4 experts are _blocks and _scales of gate_up_proj and down_proj"
                                                           : "; bf16 experts are gate_up_proj [E, hidden, 2*intermediate] and "
                                                             "down_proj [E, intermediate, hidden]");
      break;
    }
    int same = t->ndim == s->ndim;
    for (int d = 0; same && d < s->ndim; d++) same = t->shape[d] == s->shape[d];
    if (t->dtype != s->dtype || !same) {
      k = snprintf(got, sizeof got, "%s [", gptoss_dtype_name(t->dtype));
      for (int d = 0; d < t->ndim; d++) k += snprintf(got + k, sizeof got - (size_t)k, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
      snprintf(got + k, sizeof got - (size_t)k, "]");
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s' is %s but the config needs %s%s",
                       t->file, s->name, got, want,
                       expert && !m->cfg.experts_mxfp4 ? " (bf16 experts are [E, in, out] as transformers holds them, used as x @ W)" : "");
      break;
    }
    if (expert && !m->cfg.experts_mxfp4) m->experts_bf16[s->layer][s->role == GPTOSS_T_DN_BLOCKS] = t;
    else if (s->layer >= 0) m->layer[s->layer][s->role - GPTOSS_T_LAYER_FIRST] = t;
    else if (s->role == GPTOSS_T_EMBED) m->embed = t;
    else if (s->role == GPTOSS_T_NORM) m->norm = t;
    else m->lm_head = t;
  }
  if (!rc && gptoss_st_count(m->st) != n) {
    /* something beyond the description: name the first one */
    for (size_t i = 0; i < gptoss_st_count(m->st); i++) {
      const gptoss_tensor *t = gptoss_st_at(m->st, i);
      size_t j = 0;
      while (j < n && strcmp(specs[j].name, t->name) != 0) j++;
      if (j == n) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: unexpected tensor '%s' (not part of a gpt-oss model of this config)", t->file, t->name); break; }
    }
  }
  if (m->cfg.tie_word_embeddings) m->lm_head = m->embed;
  free(specs);
  return rc;
}

/* The CUDA backend is a separate shared object beside core.so, so that the
   core loads on machines without the CUDA runtime. */
typedef const gptoss_backend *(*backend_entry)(void);

static const gptoss_backend *cuda_backend(void) {
  static const gptoss_backend *be;
  if (be) return be;
  const char *env = getenv("GPTOSS_CUDA_LIB");
  char path[4096];
  if (env && *env) snprintf(path, sizeof path, "%s", env);
  else {
    Dl_info info;
    if (!dladdr((void *)&gptoss_model_load, &info) || !info.dli_fname) {
      gptoss_fail(GPTOSS_EUNSUP, "cannot locate the gptoss library to find its CUDA backend");
      return NULL;
    }
    snprintf(path, sizeof path, "%s", info.dli_fname);
    char *slash = strrchr(path, '/');
    if (slash) slash[1] = 0; else path[0] = 0;
    strncat(path, "cuda.so", sizeof path - strlen(path) - 1);
  }
  /* Lua opens core.so with local symbols; the backend links against the
     engine's C API, so make those visible before opening it. */
  Dl_info self;
  if (dladdr((void *)&gptoss_model_load, &self) && self.dli_fname)
    dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    gptoss_fail(GPTOSS_EUNSUP, "CUDA backend unavailable: %s (build with nvcc present, or set GPTOSS_CUDA_LIB)", dlerror());
    return NULL;
  }
  backend_entry entry = (backend_entry)dlsym(h, "gptoss_cuda_backend");
  if (!entry) { gptoss_fail(GPTOSS_EUNSUP, "%s has no gptoss_cuda_backend", path); return NULL; }
  be = entry();
  return be;
}

gptoss_status gptoss_device_backend(const char *dev, const gptoss_backend **be, int *index) {
  *index = 0;
  if (strcmp(dev, "cpu") == 0) { *be = &gptoss_cpu_backend; return GPTOSS_OK; }
  if (strncmp(dev, "cuda", 4) == 0 && (dev[4] == 0 || dev[4] == ':')) {
    if (dev[4] == ':') {
      char *end;
      long v = strtol(dev + 5, &end, 10);
      if (end == dev + 5 || *end || v < 0 || v > 64) return gptoss_fail(GPTOSS_EARG, "invalid device '%s' (cpu, cuda or cuda:N)", dev);
      *index = (int)v;
    }
    return (*be = cuda_backend()) ? GPTOSS_OK : gptoss_errcode();
  }
  return gptoss_fail(GPTOSS_EARG, "invalid device '%s' (cpu, cuda or cuda:N, or several joined by '+' to split the experts)", dev);
}

/* The backend a device string names: one device's, or for "a+b+..." the
   split backend over theirs (which must be one kind; split.c checks the rest) */
/* The parts of a split device string ("cuda:0+cuda:1"), each checked by
   name: none empty, all cpu or all cuda (so that mixing is refused as such,
   not as a CUDA backend that failed to open). part holds n of them, room for
   `max`; what choose_backend and the split backend (split.c) both read. */
gptoss_status gptoss_device_parts(const char *dev, char (*part)[GPTOSS_DEVICE_LEN], int max, int *n) {
  *n = 0;
  int kind = -1;
  for (const char *p = dev, *q;; p = q + 1) {
    q = strchr(p, '+');
    size_t len = q ? (size_t)(q - p) : strlen(p);
    if (len == 0) return gptoss_fail(GPTOSS_EARG, "invalid device '%s': an empty part at offset %d", dev, (int)(p - dev));
    int k = strncmp(p, "cuda", 4) == 0;
    if (kind >= 0 && k != kind)
      return gptoss_fail(GPTOSS_EARG, "invalid device '%s': a split model's parts must all be cpu or all cuda", dev);
    kind = k;
    if (*n >= max) return gptoss_fail(GPTOSS_EARG, "invalid device '%s': more than %d parts", dev, max);
    memcpy(part[*n], p, len);
    part[(*n)++][len] = 0;
    if (!q) return GPTOSS_OK;
  }
}

/* the one check of a device string's length: every later use (a split
   model's parts, its ranks) copies it into GPTOSS_DEVICE_LEN bytes */
static gptoss_status choose_backend(const char *dev, const gptoss_backend **be, int *index) {
  if (strlen(dev) >= GPTOSS_DEVICE_LEN)
    return gptoss_fail(GPTOSS_EARG, "device '%.40s...' is longer than %d characters", dev, GPTOSS_DEVICE_LEN - 1);
  if (!strchr(dev, '+')) return gptoss_device_backend(dev, be, index);
  char part[GPTOSS_DEVICE_LEN / 2][GPTOSS_DEVICE_LEN];
  int n;
  gptoss_status rc = gptoss_device_parts(dev, part, GPTOSS_DEVICE_LEN / 2, &n);
  const gptoss_backend *b = NULL;
  for (int i = 0; i < n && !rc; i++) rc = gptoss_device_backend(part[i], &b, index);
  if (rc) return rc;
  *index = 0;
  return (*be = gptoss_split_backend(b)) ? GPTOSS_OK : gptoss_errcode();
}

static gptoss_status model_load(const char *dir, const gptoss_model_opts *o, int lo, int hi, int rank, gptoss_comm *comm,
                                gptoss_model **out) {
  *out = NULL;
  gptoss_model_opts dflt = {0};
  if (!o) o = &dflt;
  const gptoss_backend *be;
  int devidx;
  const char *dev = o->device && *o->device ? o->device : "cpu";
  gptoss_status rc0 = choose_backend(dev, &be, &devidx);
  if (rc0) return rc0;
  int split = strchr(dev, '+') != NULL;
  if (o->threads < 0) return gptoss_fail(GPTOSS_EARG, "threads must be >= 0");
  if (o->context < 0) return gptoss_fail(GPTOSS_EARG, "context must be >= 0");
  if (o->precision != GPTOSS_PRECISION_EXACT && o->precision != GPTOSS_PRECISION_MIXED && o->precision != GPTOSS_PRECISION_FAST)
    return gptoss_fail(GPTOSS_EARG, "precision must be GPTOSS_PRECISION_EXACT, _MIXED or _FAST (got %d)", (int)o->precision);

  gptoss_model *m = calloc(1, sizeof *m);
  if (!m || !(m->dir = strdup(dir))) { free(m); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  m->rank = rank;
  m->comm = comm;
  gptoss_status rc;
  if (!gptoss_is_dir(dir)) { rc = gptoss_fail(GPTOSS_EIO, "%s: not a directory", dir); goto fail; }
  char *cp = gptoss_path_join(dir, "config.json");
  if (!cp) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto fail; }
  rc = gptoss_config_load(cp, &m->cfg);
  free(cp);
  if (rc) goto fail;
  if ((rc = gptoss_st_open(dir, &m->st))) goto fail;
  if ((rc = bind_tensors(m))) goto fail;
  m->expert_lo = lo < 0 ? 0 : lo;
  m->expert_hi = hi < 0 ? m->cfg.num_local_experts : hi;
  uint64_t total = 0;
  for (size_t i = 0; i < gptoss_st_count(m->st); i++) total += gptoss_st_at(m->st, i)->nbytes;
  if (o->progress && o->progress(o->progress_ud, 0, total)) { rc = gptoss_fail(GPTOSS_ESTATE, "%s: the load was cancelled", dir); goto fail; }
  m->threads = o->threads ? o->threads : gptoss_cpu_count();
  m->inv_freq = malloc(sizeof(float) * (size_t)(m->cfg.head_dim / 2));
  if (!m->inv_freq) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto fail; }
  rope_tables(&m->cfg, m->inv_freq, &m->rope_scale);
  m->context = o->context ? o->context : (m->cfg.max_position_embeddings < 8192 ? m->cfg.max_position_embeddings : 8192);
  if (m->context > m->cfg.max_position_embeddings) {
    rc = gptoss_fail(GPTOSS_ERANGE, "context %d exceeds the model's max_position_embeddings %d", m->context, m->cfg.max_position_embeddings);
    goto fail;
  }
  /* the CPU's load is the quantization (it reports bytes read as it goes); a
     device backend reports its upload from 0 after it, so here only cancels */
  /* (a split model's ranks quantize for themselves) */
  if (m->experts_bf16 && !split && (rc = gptoss_experts_quantize(m, m->threads, o, total, be == &gptoss_cpu_backend))) goto fail;
  m->batch_invariant = o->batch_invariant != 0;
  m->device_index = devidx;
  snprintf(m->device, sizeof m->device, "%s", be == &gptoss_cpu_backend ? "cpu" : dev);
  if (!split && be != &gptoss_cpu_backend && dev[4] == 0) snprintf(m->device, sizeof m->device, "cuda:%d", devidx);
  m->be = be;
  if ((rc = be->model_init(m, o))) goto fail;   /* model_free releases what init had set up */
  /* a device backend holds its own copy of the quantized experts (read
     only at upload); a merge reads the bf16 matrices, so the host's go */
  if (be != &gptoss_cpu_backend) gptoss_experts_drop(m);
  if (o->progress && o->progress(o->progress_ud, total, total)) { rc = gptoss_fail(GPTOSS_ESTATE, "%s: the load was cancelled", dir); goto fail; }
  *out = m;
  return GPTOSS_OK;
fail:
  gptoss_model_free(m);
  return rc;
}

gptoss_status gptoss_model_load(const char *dir, const gptoss_model_opts *o, gptoss_model **out) {
  return model_load(dir, o, -1, -1, 0, NULL, out);
}

gptoss_status gptoss_model_load_rank(const char *dir, const gptoss_model_opts *o, int lo, int hi, int rank,
                                     gptoss_comm *comm, gptoss_model **out) {
  return model_load(dir, o, lo, hi, rank, comm, out);
}

void gptoss_model_free(gptoss_model *m) {
  if (!m) return;
  if (m->be && m->bm) m->be->model_free(m);
  gptoss_st_free(m->st);
  gptoss_experts_drop(m);
  free(m->experts_q);
  free(m->experts_bf16);
  free(m->layer);
  free(m->inv_freq);
  free(m->dir);
  free(m);
}

const gptoss_config *gptoss_model_config(const gptoss_model *m) { return &m->cfg; }
const gptoss_st *gptoss_model_weights(const gptoss_model *m) { return m->st; }
const char *gptoss_model_device(const gptoss_model *m) { return m->device; }
int gptoss_model_context(const gptoss_model *m) { return m->context; }

gptoss_status gptoss_model_mxfp4(const gptoss_model *m, int layer, int which, const gptoss_tensor **blocks,
                                 const gptoss_tensor **scales) {
  if (layer < 0 || layer >= m->cfg.num_hidden_layers)
    return gptoss_fail(GPTOSS_EARG, "layer %d is outside the model's 0..%d", layer, m->cfg.num_hidden_layers - 1);
  if (which != 0 && which != 1) return gptoss_fail(GPTOSS_EARG, "which must be 0 (gate_up) or 1 (down), got %d", which);
  *blocks = LAYER_T(m, layer, which ? GPTOSS_T_DN_BLOCKS : GPTOSS_T_GU_BLOCKS);
  *scales = LAYER_T(m, layer, which ? GPTOSS_T_DN_SCALES : GPTOSS_T_GU_SCALES);
  if (!(*blocks)->data)
    return gptoss_fail(GPTOSS_EUNSUP, "%s keeps the experts it quantized on the device only", m->device);
  return GPTOSS_OK;
}

void gptoss_model_memory(const gptoss_model *m, gptoss_memory *out) {
  memset(out, 0, sizeof *out);
  if (m->be && m->be->memory) m->be->memory(m, out);
}
/* }====================================================== */
