/*
** merge.c: an adapter folded into a copy of its model's checkpoint,
** W' = bf16(W + scale B A) (see gptoss_adapter_merge in gptoss.h).
*/
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapter_impl.h"
#include "mxfp4.h"

/* {====================================================== merge */
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

/* the merged bf16 weight of one projection */
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
   MXFP4 blocks [E][out][in/32][16] and scales [E][out][in/32], or from the
   bf16 matrix a bf16 checkpoint held (not from what its load quantized).
   MXFP4 cannot hold a LoRA's delta (requantizing would round most of it
   away), so a merge with expert LoRAs writes every expert matrix this way. */
typedef struct expert_job {
  const uint8_t *blocks, *scales;
  const uint16_t *bf16;          /* instead of blocks and scales: [E][in][out] */
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
      if (j->bf16)
        for (int i = 0; i < j->in; i++) row[i] = gptoss_bf16_to_f32(j->bf16[((size_t)e * j->in + i) * j->out + o]);
      else gptoss_mxfp4_row(row, j->blocks + r * G * 16, j->scales + r * G, j->in);
      if (j->x) {
        lora_delta_row(j->x, e, o, d);
        for (int i = 0; i < j->in; i++) row[i] += d[i];
      }
      for (int i = 0; i < j->in; i++) j->w[((size_t)e * j->in + i) * j->out + o] = gptoss_f32_to_bf16(row[i]);
    }
  free(row);
  free(d);
}

/* blocks and scales, or bf16 alone (scales NULL) */
static uint16_t *merged_experts(const gptoss_tensor *blocks, const gptoss_tensor *scales, const gptoss_lora *x, int E, int out,
                                int in, int threads) {
  expert_job j = {scales ? blocks->data : NULL, scales ? scales->data : NULL, scales ? NULL : blocks->data, x, E, out, in,
                  malloc(sizeof(uint16_t) * (size_t)E * in * out), 0};
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
  char *tmp = gptoss_temp_name(out_dir);
  if (!tmp) return gptoss_errcode();
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
        if (m->experts_bf16 && m->experts_bf16[l][0] == t) expert = 0;
        else if (m->experts_bf16 && m->experts_bf16[l][1] == t) expert = 1;
        else if (LAYER_T(m, l, GPTOSS_T_GU_BLOCKS) == t) expert = 0;
        else if (LAYER_T(m, l, GPTOSS_T_DN_BLOCKS) == t) expert = 1;
        else if (LAYER_T(m, l, GPTOSS_T_GU_SCALES) == t || LAYER_T(m, l, GPTOSS_T_DN_SCALES) == t) expert = 2;
        if (expert >= 0) el = l;
      }
      if (expert == 2) continue;   /* folded into its matrix */
      if (expert >= 0) {
        const gptoss_config *c = &m->cfg;
        int E = c->num_local_experts, H = c->hidden_size, I = c->intermediate_size;
        int out = expert == 0 ? 2 * I : H, in = expert == 0 ? H : I;
        const gptoss_tensor *sc = m->experts_bf16 ? NULL : LAYER_T(m, el, expert == 0 ? GPTOSS_T_GU_SCALES : GPTOSS_T_DN_SCALES);
        uint16_t *mw = merged_experts(t, sc, gptoss_adapter_module(a, el, expert == 0 ? GPTOSS_LORA_GU : GPTOSS_LORA_DN), E, out, in,
                                      threads);
        if (!mw) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory merging %s", t->name); break; }
        char name[160];
        snprintf(name, sizeof name, "%.*s", (int)(strlen(t->name) - (sc ? 7 : 0)), t->name);   /* without "_blocks" */
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
        else rc = gptoss_copy_file(src, dst);
      }
      free(src);
      free(dst);
    }
    closedir(d);
  }
  if (!rc && rename(tmp, out_dir) != 0) rc = gptoss_fail(GPTOSS_EIO, "%s: %s", out_dir, strerror(errno));
  if (rc) gptoss_remove_tree(tmp);
  free(files);
  free(tmp);
  return rc;
}
/* }====================================================== */
