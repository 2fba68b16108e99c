/*
** safetensors.c: mmap'd, fully validated reading of safetensors files and
** sharded checkpoints; atomic writing of new ones.
**
** Format: 8-byte little-endian header length N, N bytes of JSON, then the
** data area. Each JSON entry gives dtype, shape and [begin, end) offsets
** relative to the data area.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cjson/cJSON.h>
#include "internal.h"

/* The safetensors crate refuses headers over 100 MB; so do we, which also
   keeps a corrupt length from asking for a huge allocation. */
#define HEADER_LIMIT 100000000ull

typedef struct st_file {
  char *path;
  void *map;
  size_t size;
  const unsigned char *data;   /* start of the data area */
  size_t data_size;
} st_file;

typedef struct meta_kv { char *key, *value; } meta_kv;

struct gptoss_st {
  st_file *files;
  int nfiles;
  gptoss_tensor *t;
  size_t n, cap;
  size_t *slots;               /* open-addressing index by name: i+1, 0 = empty */
  size_t nslots;
  meta_kv *meta;
  size_t nmeta;
};

/* {====================================================== lookup */
static gptoss_status index_build(gptoss_st *st) {
  size_t ns = 16;
  while (ns < st->n * 2 + 1) ns <<= 1;
  free(st->slots);
  st->slots = calloc(ns, sizeof *st->slots);
  if (!st->slots) return gptoss_fail(GPTOSS_ENOMEM, "out of memory indexing tensors");
  st->nslots = ns;
  for (size_t i = 0; i < st->n; i++) {
    const char *nm = st->t[i].name;
    size_t h = (size_t)gptoss_fnv1a(nm, strlen(nm)) & (ns - 1);
    while (st->slots[h]) {
      const gptoss_tensor *o = &st->t[st->slots[h] - 1];
      if (strcmp(o->name, nm) == 0) {
        if (strcmp(o->file, st->t[i].file) == 0)
          return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s' is listed twice in the header", o->file, nm);
        return gptoss_fail(GPTOSS_EFORMAT, "tensor '%s' appears in both %s and %s", nm, o->file, st->t[i].file);
      }
      h = (h + 1) & (ns - 1);
    }
    st->slots[h] = i + 1;
  }
  return GPTOSS_OK;
}

const gptoss_tensor *gptoss_st_find(const gptoss_st *st, const char *name) {
  if (!st || !st->nslots) return NULL;
  size_t h = (size_t)gptoss_fnv1a(name, strlen(name)) & (st->nslots - 1);
  while (st->slots[h]) {
    const gptoss_tensor *t = &st->t[st->slots[h] - 1];
    if (strcmp(t->name, name) == 0) return t;
    h = (h + 1) & (st->nslots - 1);
  }
  return NULL;
}

size_t gptoss_st_count(const gptoss_st *st) { return st ? st->n : 0; }
const gptoss_tensor *gptoss_st_at(const gptoss_st *st, size_t i) { return st && i < st->n ? &st->t[i] : NULL; }

const char *gptoss_st_metadata(const gptoss_st *st, const char *key) {
  for (size_t i = 0; st && i < st->nmeta; i++)
    if (strcmp(st->meta[i].key, key) == 0) return st->meta[i].value;
  return NULL;
}
/* }====================================================== */

/* {====================================================== parsing one file */
static const char *base_name(const char *p) {
  const char *s = strrchr(p, '/');
  return s ? s + 1 : p;
}

typedef struct tspan { size_t begin, end, idx; } tspan;

static int tspan_cmp(const void *a, const void *b) {
  const tspan *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  return x->end < y->end ? -1 : x->end > y->end;
}

/* Reads a non-negative integer that a JSON number holds exactly. */
static int json_size(const cJSON *v, uint64_t *out) {
  if (!cJSON_IsNumber(v)) return 0;
  double d = v->valuedouble;
  if (!(d >= 0) || d > 9007199254740992.0 || d != (double)(uint64_t)d) return 0;
  *out = (uint64_t)d;
  return 1;
}

static gptoss_status push_tensor(gptoss_st *st, gptoss_tensor *t) {
  if (st->n == st->cap) {
    size_t nc = st->cap ? st->cap * 2 : 64;
    gptoss_tensor *nt = realloc(st->t, nc * sizeof *nt);
    if (!nt) return gptoss_fail(GPTOSS_ENOMEM, "out of memory reading tensor table");
    st->t = nt;
    st->cap = nc;
  }
  st->t[st->n++] = *t;
  return GPTOSS_OK;
}

static gptoss_status parse_entry(gptoss_st *st, st_file *f, const char *fname, const cJSON *e) {
  const char *name = e->string;
  if (!cJSON_IsObject(e))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': entry is not a JSON object", fname, name);
  const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
  const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
  const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
  if (!cJSON_IsString(dt))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': missing or non-string 'dtype'", fname, name);
  int dtype = gptoss_dtype_from_name(dt->valuestring);
  if (dtype < 0)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': unknown dtype '%s'", fname, name, dt->valuestring);
  if (!cJSON_IsArray(sh))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': missing or non-array 'shape'", fname, name);
  gptoss_tensor t;
  memset(&t, 0, sizeof t);
  t.dtype = (gptoss_dtype)dtype;
  t.ndim = cJSON_GetArraySize(sh);
  if (t.ndim > GPTOSS_MAX_DIMS)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': %d dimensions (at most %d)", fname, name, t.ndim, GPTOSS_MAX_DIMS);
  uint64_t elems = 1;
  int d = 0;
  const cJSON *x;
  cJSON_ArrayForEach(x, sh) {
    uint64_t v;
    if (!json_size(x, &v) || v > (uint64_t)INT64_MAX)
      return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer", fname, name, d);
    t.shape[d++] = (int64_t)v;
    if (v && elems > UINT64_MAX / v)
      return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': shape overflows", fname, name);
    elems *= v;
  }
  uint64_t es = gptoss_dtype_size(t.dtype);
  if (elems > UINT64_MAX / es)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': shape overflows", fname, name);
  uint64_t b, en;
  if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
      !json_size(cJSON_GetArrayItem(off, 0), &b) || !json_size(cJSON_GetArrayItem(off, 1), &en))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': 'data_offsets' must be two non-negative integers", fname, name);
  if (b > en)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] run backwards",
                       fname, name, (unsigned long long)b, (unsigned long long)en);
  if (en > f->data_size)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] run past the data area (%zu bytes)",
                       fname, name, (unsigned long long)b, (unsigned long long)en, f->data_size);
  if (en - b != elems * es)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s': shape and dtype %s need %llu bytes but data_offsets span %llu",
                       fname, name, gptoss_dtype_name(t.dtype), (unsigned long long)(elems * es),
                       (unsigned long long)(en - b));
  t.name = strdup(name);
  if (!t.name) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  t.file = f->path;
  t.data = f->data + b;
  t.nbytes = (size_t)(en - b);
  gptoss_status rc = push_tensor(st, &t);
  if (rc) free((char *)t.name);
  return rc;
}

static gptoss_status parse_metadata(gptoss_st *st, const char *fname, const cJSON *m) {
  if (cJSON_IsNull(m)) return GPTOSS_OK;
  if (!cJSON_IsObject(m))
    return gptoss_fail(GPTOSS_EFORMAT, "%s: '__metadata__' is not a JSON object", fname);
  const cJSON *x;
  cJSON_ArrayForEach(x, m) {
    if (!cJSON_IsString(x))
      return gptoss_fail(GPTOSS_EFORMAT, "%s: __metadata__ '%s' is not a string", fname, x->string);
    if (gptoss_st_metadata(st, x->string)) continue;   /* first file wins */
    meta_kv *nm = realloc(st->meta, (st->nmeta + 1) * sizeof *nm);
    if (!nm) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    st->meta = nm;
    st->meta[st->nmeta].key = strdup(x->string);
    st->meta[st->nmeta].value = strdup(x->valuestring);
    st->nmeta++;
  }
  return GPTOSS_OK;
}

static gptoss_status open_file(gptoss_st *st, const char *path) {
  const char *fname = path;
  st_file *nf = realloc(st->files, (size_t)(st->nfiles + 1) * sizeof *nf);
  if (!nf) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  st->files = nf;
  st_file *f = &st->files[st->nfiles];
  memset(f, 0, sizeof *f);
  f->path = strdup(path);
  if (!f->path) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  st->nfiles++;
  fname = f->path;

  size_t size;
  int fd = gptoss_open_regular(fname, &size);
  if (fd < 0) return gptoss_errcode();
  if (size < 8) {
    close(fd);
    return gptoss_fail(GPTOSS_EFORMAT, "%s: file is %zu bytes, too short for the 8-byte header length (truncated?)", fname, size);
  }
  void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd);
  if (map == MAP_FAILED) return gptoss_fail(GPTOSS_EIO, "%s: mmap failed: %s", fname, strerror(e));
  f->map = map;
  f->size = size;
  const unsigned char *b = map;
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
  if (hlen > HEADER_LIMIT)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: header length %llu exceeds the %llu-byte limit",
                       fname, (unsigned long long)hlen, HEADER_LIMIT);
  if (hlen > size - 8)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: header length %llu runs past the end of the file (%zu bytes; truncated?)",
                       fname, (unsigned long long)hlen, size);
  f->data = b + 8 + hlen;
  f->data_size = size - 8 - (size_t)hlen;

  const char *hdr = (const char *)b + 8;
  const char *perr = NULL;
  cJSON *j = cJSON_ParseWithLengthOpts(hdr, (size_t)hlen, &perr, 0);
  if (!j) {
    size_t at = perr ? (size_t)(perr - hdr) : 0;
    return gptoss_fail(GPTOSS_EFORMAT, "%s: header is not valid JSON (near byte %zu of the header)", fname, at);
  }
  if (!cJSON_IsObject(j)) {
    cJSON_Delete(j);
    return gptoss_fail(GPTOSS_EFORMAT, "%s: header is not a JSON object", fname);
  }
  size_t first = st->n;
  gptoss_status rc = GPTOSS_OK;
  const cJSON *e2;
  cJSON_ArrayForEach(e2, j) {
    if (strcmp(e2->string, "__metadata__") == 0) rc = parse_metadata(st, fname, e2);
    else rc = parse_entry(st, f, fname, e2);
    if (rc) break;
  }
  cJSON_Delete(j);
  if (rc) return rc;

  /* overlap: sort this file's spans by start and compare neighbours */
  size_t cnt = st->n - first;
  if (cnt > 1) {
    tspan *sp = malloc(cnt * sizeof *sp);
    if (!sp) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    for (size_t i = 0; i < cnt; i++) {
      const gptoss_tensor *t = &st->t[first + i];
      sp[i].begin = (size_t)((const unsigned char *)t->data - f->data);
      sp[i].end = sp[i].begin + t->nbytes;
      sp[i].idx = first + i;
    }
    qsort(sp, cnt, sizeof *sp, tspan_cmp);
    size_t far = 0;   /* the span reaching furthest so far */
    for (size_t i = 1; i < cnt; i++) {
      if (sp[i].end > sp[i].begin && sp[i].begin < sp[far].end) {
        rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensors '%s' [%zu, %zu) and '%s' [%zu, %zu) overlap", fname,
                         st->t[sp[far].idx].name, sp[far].begin, sp[far].end,
                         st->t[sp[i].idx].name, sp[i].begin, sp[i].end);
        break;
      }
      if (sp[i].end > sp[far].end) far = i;
    }
    free(sp);
  }
  return rc;
}
/* }====================================================== */

/* {====================================================== sharded checkpoints */
static char *dir_of(const char *path) {
  const char *s = strrchr(path, '/');
  if (!s) return strdup(".");
  size_t n = (size_t)(s - path);
  char *d = malloc(n + 2);
  if (!d) return NULL;
  memcpy(d, path, n ? n : 1);
  d[n ? n : 1] = 0;
  return d;
}

static gptoss_status open_index(gptoss_st *st, const char *ipath) {
  size_t len;
  char *txt = gptoss_read_file(ipath, &len);
  if (!txt) return gptoss_errcode();
  const char *perr = NULL;
  cJSON *j = cJSON_ParseWithLengthOpts(txt, len, &perr, 0);
  size_t at = perr ? (size_t)(perr - txt) : 0;
  free(txt);
  if (!j) return gptoss_fail(GPTOSS_EFORMAT, "%s: not valid JSON (near byte %zu)", ipath, at);
  gptoss_status rc = GPTOSS_OK;
  char *dir = dir_of(ipath);
  const cJSON *wm = cJSON_GetObjectItemCaseSensitive(j, "weight_map");
  char **files = NULL;
  size_t nfiles = 0;
  if (!dir) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  if (!cJSON_IsObject(wm)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: missing 'weight_map' object", ipath); goto done; }
  const cJSON *x;
  cJSON_ArrayForEach(x, wm) {
    if (!cJSON_IsString(x)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: weight_map['%s'] is not a file name", ipath, x->string); goto done; }
    const char *fn = x->valuestring;
    if (!*fn || strchr(fn, '/') || strcmp(fn, "..") == 0) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: weight_map['%s'] = '%s' is not a plain file name", ipath, x->string, fn);
      goto done;
    }
    size_t k = 0;
    while (k < nfiles && strcmp(files[k], fn) != 0) k++;
    if (k == nfiles) {
      char **nf = realloc(files, (nfiles + 1) * sizeof *nf);
      if (!nf) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
      files = nf;
      files[nfiles++] = (char *)fn;
    }
  }
  if (nfiles == 0) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: weight_map is empty", ipath); goto done; }
  for (size_t k = 0; k < nfiles && !rc; k++) {
    char *p = gptoss_path_join(dir, files[k]);
    if (!p) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); break; }
    rc = open_file(st, p);
    free(p);
  }
  if (rc) goto done;
  if ((rc = index_build(st))) goto done;
  /* every index entry exists where the index says, and nothing else does */
  cJSON_ArrayForEach(x, wm) {
    const gptoss_tensor *t = gptoss_st_find(st, x->string);
    if (!t) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s' is listed in the index but %s does not hold it", ipath, x->string, x->valuestring); goto done; }
    if (strcmp(base_name(t->file), x->valuestring) != 0) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s' is indexed in %s but found in %s", ipath, x->string, x->valuestring, base_name(t->file));
      goto done;
    }
  }
  if ((size_t)cJSON_GetArraySize(wm) != st->n) {
    for (size_t i = 0; i < st->n; i++)
      if (!cJSON_GetObjectItemCaseSensitive(wm, st->t[i].name)) {
        rc = gptoss_fail(GPTOSS_EFORMAT, "%s: tensor '%s' is not listed in the index %s", st->t[i].file, st->t[i].name, ipath);
        goto done;
      }
  }
  const cJSON *md = cJSON_GetObjectItemCaseSensitive(j, "metadata");
  const cJSON *ts = md ? cJSON_GetObjectItemCaseSensitive(md, "total_size") : NULL;
  if (ts) {
    uint64_t want, have = 0;
    if (!json_size(ts, &want)) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: metadata.total_size is not a size", ipath); goto done; }
    for (size_t i = 0; i < st->n; i++) have += st->t[i].nbytes;
    if (want != have) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: metadata.total_size is %llu but the tensors hold %llu bytes", ipath,
                       (unsigned long long)want, (unsigned long long)have);
      goto done;
    }
  }
done:
  free(files);
  free(dir);
  cJSON_Delete(j);
  return rc;
}

void gptoss_st_free(gptoss_st *st) {
  if (!st) return;
  for (size_t i = 0; i < st->n; i++) free((char *)st->t[i].name);
  for (int i = 0; i < st->nfiles; i++) {
    if (st->files[i].map) munmap(st->files[i].map, st->files[i].size);
    free(st->files[i].path);
  }
  for (size_t i = 0; i < st->nmeta; i++) { free(st->meta[i].key); free(st->meta[i].value); }
  free(st->meta);
  free(st->files);
  free(st->t);
  free(st->slots);
  free(st);
}

static int ends_with(const char *s, const char *suf) {
  size_t a = strlen(s), b = strlen(suf);
  return a >= b && strcmp(s + a - b, suf) == 0;
}

gptoss_status gptoss_st_open(const char *path, gptoss_st **out) {
  *out = NULL;
  gptoss_st *st = calloc(1, sizeof *st);
  if (!st) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  gptoss_status rc;
  if (gptoss_is_dir(path)) {
    char *ip = gptoss_path_join(path, "model.safetensors.index.json");
    char *sp = gptoss_path_join(path, "model.safetensors");
    if (!ip || !sp) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    else if (gptoss_path_exists(ip)) rc = open_index(st, ip);
    else if (gptoss_path_exists(sp)) { rc = open_file(st, sp); if (!rc) rc = index_build(st); }
    else rc = gptoss_fail(GPTOSS_EIO, "%s: no model.safetensors.index.json or model.safetensors in this directory", path);
    free(ip);
    free(sp);
  } else if (ends_with(path, ".json")) {
    rc = open_index(st, path);
  } else {
    rc = open_file(st, path);
    if (!rc) rc = index_build(st);
  }
  if (rc) { gptoss_st_free(st); return rc; }
  *out = st;
  return GPTOSS_OK;
}
/* }====================================================== */

/* {====================================================== writer */
typedef struct w_entry {
  char *name;
  gptoss_dtype dtype;
  int ndim;
  int64_t shape[GPTOSS_MAX_DIMS];
  uint64_t nbytes, offset;
  gptoss_fill fill;          /* fill.data is owned (a copy) */
} w_entry;

struct gptoss_st_writer {
  char *path;
  w_entry *e;
  size_t n, cap;
  meta_kv *meta;
  size_t nmeta;
};

gptoss_status gptoss_stw_new(const char *path, gptoss_st_writer **out) {
  *out = NULL;
  gptoss_st_writer *w = calloc(1, sizeof *w);
  if (!w || !(w->path = strdup(path))) { free(w); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  *out = w;
  return GPTOSS_OK;
}

void gptoss_stw_free(gptoss_st_writer *w) {
  if (!w) return;
  for (size_t i = 0; i < w->n; i++) { free(w->e[i].name); free((void *)w->e[i].fill.data); }
  for (size_t i = 0; i < w->nmeta; i++) { free(w->meta[i].key); free(w->meta[i].value); }
  free(w->meta);
  free(w->e);
  free(w->path);
  free(w);
}

gptoss_status gptoss_stw_metadata(gptoss_st_writer *w, const char *key, const char *value) {
  meta_kv *nm = realloc(w->meta, (w->nmeta + 1) * sizeof *nm);
  if (!nm) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  w->meta = nm;
  nm[w->nmeta].key = strdup(key);
  nm[w->nmeta].value = strdup(value);
  w->nmeta++;
  return GPTOSS_OK;
}

gptoss_status gptoss_stw_add(gptoss_st_writer *w, const char *name, gptoss_dtype dtype,
                             int ndim, const int64_t *shape, const gptoss_fill *fill) {
  if (!name || !*name || strcmp(name, "__metadata__") == 0)
    return gptoss_fail(GPTOSS_EARG, "%s: invalid tensor name '%s'", w->path, name ? name : "");
  if ((unsigned)dtype >= GPTOSS_DTYPE_COUNT)
    return gptoss_fail(GPTOSS_EARG, "%s: tensor '%s': invalid dtype", w->path, name);
  if (ndim < 0 || ndim > GPTOSS_MAX_DIMS)
    return gptoss_fail(GPTOSS_EARG, "%s: tensor '%s': %d dimensions (at most %d)", w->path, name, ndim, GPTOSS_MAX_DIMS);
  for (size_t i = 0; i < w->n; i++)
    if (strcmp(w->e[i].name, name) == 0)
      return gptoss_fail(GPTOSS_EARG, "%s: tensor '%s' added twice", w->path, name);
  uint64_t elems = 1;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] < 0) return gptoss_fail(GPTOSS_EARG, "%s: tensor '%s': negative dimension", w->path, name);
    elems *= (uint64_t)shape[d];
  }
  uint64_t nbytes = elems * gptoss_dtype_size(dtype);
  if (fill->kind == GPTOSS_FILL_DATA && fill->nbytes != nbytes)
    return gptoss_fail(GPTOSS_EARG, "%s: tensor '%s': shape and dtype need %llu bytes but %zu were given",
                       w->path, name, (unsigned long long)nbytes, fill->nbytes);
  if (fill->kind != GPTOSS_FILL_DATA && dtype != GPTOSS_F32 && dtype != GPTOSS_BF16 && dtype != GPTOSS_F16 &&
      dtype != GPTOSS_F64 && dtype != GPTOSS_U8 && dtype != GPTOSS_I32 && dtype != GPTOSS_I64)
    return gptoss_fail(GPTOSS_EARG, "%s: tensor '%s': generated fills support F32, F64, BF16, F16, U8, I32 and I64", w->path, name);
  if (w->n == w->cap) {
    size_t nc = w->cap ? w->cap * 2 : 64;
    w_entry *ne = realloc(w->e, nc * sizeof *ne);
    if (!ne) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    w->e = ne;
    w->cap = nc;
  }
  w_entry *e = &w->e[w->n];
  memset(e, 0, sizeof *e);
  e->name = strdup(name);
  e->dtype = dtype;
  e->ndim = ndim;
  for (int d = 0; d < ndim; d++) e->shape[d] = shape[d];
  e->nbytes = nbytes;
  e->fill = *fill;
  e->fill.data = NULL;
  if (fill->kind == GPTOSS_FILL_DATA && nbytes) {
    void *copy = malloc(nbytes);
    if (!copy) { free(e->name); return gptoss_fail(GPTOSS_ENOMEM, "out of memory copying tensor '%s'", name); }
    memcpy(copy, fill->data, nbytes);
    e->fill.data = copy;
  }
  /* random fills differ per tensor even when one seed is given for all */
  e->fill.seed = gptoss_mix64(fill->seed ^ gptoss_fnv1a(name, strlen(name)));
  w->n++;
  return GPTOSS_OK;
}

uint64_t gptoss_stw_data_bytes(const gptoss_st_writer *w) {
  uint64_t s = 0;
  for (size_t i = 0; w && i < w->n; i++) s += w->e[i].nbytes;
  return s;
}

static int entry_cmp(const void *a, const void *b) {
  const w_entry *x = a, *y = b;
  if (x->dtype != y->dtype) return x->dtype > y->dtype ? -1 : 1;
  return strcmp(x->name, y->name);
}

static void f16_from_f32(float f, uint16_t *out) {
  /* IEEE half, round to nearest even; used only for generated F16 fills */
  union { float f; uint32_t u; } v = { f };
  uint32_t sign = (v.u >> 16) & 0x8000u, ex = (v.u >> 23) & 0xff, man = v.u & 0x7fffffu;
  uint16_t h;
  if (ex == 0xff) h = (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
  else {
    int e = (int)ex - 127 + 15;
    if (e >= 31) h = (uint16_t)(sign | 0x7c00u);
    else if (e <= 0) {
      if (e < -10) h = (uint16_t)sign;
      else {
        man |= 0x800000u;
        int shift = 14 - e;
        uint32_t hm = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (hm & 1))) hm++;
        h = (uint16_t)(sign | hm);
      }
    } else {
      uint32_t hm = man >> 13, rem = man & 0x1fffu;
      h = (uint16_t)(sign | ((uint32_t)e << 10) | hm);
      if (rem > 0x1000u || (rem == 0x1000u && (hm & 1))) h++;
    }
  }
  *out = h;
}

/* value of element i of a generated fill */
static double fill_value(const gptoss_fill *f, uint64_t i) {
  switch (f->kind) {
    case GPTOSS_FILL_CONST: return f->a;
    case GPTOSS_FILL_UNIFORM: {
      double u = gptoss_u01(gptoss_mix64(f->seed + i));
      return f->a + (f->b - f->a) * u;
    }
    case GPTOSS_FILL_NORMAL: {
      /* Box-Muller from two counter-based uniforms: a pure function of i */
      double u1 = gptoss_u01(gptoss_mix64(f->seed + 2 * i)), u2 = gptoss_u01(gptoss_mix64(f->seed + 2 * i + 1));
      double r = sqrt(-2.0 * log(1.0 - u1));
      return f->a + f->b * r * cos(6.283185307179586 * u2);
    }
    default: return 0;
  }
}

typedef struct fill_job {
  const w_entry *e;
  unsigned char *buf;
  uint64_t first, count;     /* element range of this chunk */
} fill_job;

static void fill_range(const w_entry *e, unsigned char *buf, uint64_t first, uint64_t count) {
  const gptoss_fill *f = &e->fill;
  for (uint64_t k = 0; k < count; k++) {
    uint64_t i = first + k;
    if (e->dtype == GPTOSS_U8 || e->dtype == GPTOSS_I32 || e->dtype == GPTOSS_I64) {
      /* integers: uniform over [a, b] inclusive, or the constant */
      int64_t v;
      if (f->kind == GPTOSS_FILL_CONST) v = (int64_t)f->a;
      else {
        uint64_t span = (uint64_t)(f->b - f->a) + 1;
        v = (int64_t)f->a + (int64_t)(gptoss_mix64(f->seed + i) % (span ? span : 1));
      }
      if (e->dtype == GPTOSS_U8) buf[k] = (unsigned char)v;
      else if (e->dtype == GPTOSS_I32) { int32_t x = (int32_t)v; memcpy(buf + 4 * k, &x, 4); }
      else memcpy(buf + 8 * k, &v, 8);
      continue;
    }
    double v = fill_value(f, i);
    if (e->dtype == GPTOSS_F32) { float x = (float)v; memcpy(buf + 4 * k, &x, 4); }
    else if (e->dtype == GPTOSS_F64) memcpy(buf + 8 * k, &v, 8);
    else if (e->dtype == GPTOSS_BF16) { uint16_t h = gptoss_f32_to_bf16((float)v); memcpy(buf + 2 * k, &h, 2); }
    else { uint16_t h; f16_from_f32((float)v, &h); memcpy(buf + 2 * k, &h, 2); }
  }
}

static void fill_worker(void *ctx, int tid, int nth) {
  fill_job *j = ctx;
  int64_t lo, hi;
  gptoss_split((int64_t)j->count, tid, nth, &lo, &hi);
  size_t es = gptoss_dtype_size(j->e->dtype);
  fill_range(j->e, j->buf + (size_t)lo * es, j->first + (uint64_t)lo, (uint64_t)(hi - lo));
}

static char *build_header(gptoss_st_writer *w, size_t *len) {
  cJSON *h = cJSON_CreateObject();
  if (!h) return NULL;
  if (w->nmeta) {
    cJSON *m = cJSON_AddObjectToObject(h, "__metadata__");
    for (size_t i = 0; i < w->nmeta; i++) cJSON_AddStringToObject(m, w->meta[i].key, w->meta[i].value);
  }
  for (size_t i = 0; i < w->n; i++) {
    const w_entry *e = &w->e[i];
    cJSON *t = cJSON_AddObjectToObject(h, e->name);
    cJSON_AddStringToObject(t, "dtype", gptoss_dtype_name(e->dtype));
    cJSON *s = cJSON_AddArrayToObject(t, "shape");
    for (int d = 0; d < e->ndim; d++) cJSON_AddItemToArray(s, cJSON_CreateNumber((double)e->shape[d]));
    cJSON *o = cJSON_AddArrayToObject(t, "data_offsets");
    cJSON_AddItemToArray(o, cJSON_CreateNumber((double)e->offset));
    cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(e->offset + e->nbytes)));
  }
  char *txt = cJSON_PrintUnformatted(h);
  cJSON_Delete(h);
  if (!txt) return NULL;
  /* pad with spaces so the data area starts 8-byte aligned, as the crate does */
  size_t n = strlen(txt), padded = (n + 7) & ~(size_t)7;
  char *out = realloc(txt, padded + 1);
  if (!out) { free(txt); return NULL; }
  memset(out + n, ' ', padded - n);
  out[padded] = 0;
  *len = padded;
  return out;
}

gptoss_status gptoss_stw_commit(gptoss_st_writer *w, int threads) {
  qsort(w->e, w->n, sizeof *w->e, entry_cmp);
  uint64_t off = 0;
  for (size_t i = 0; i < w->n; i++) { w->e[i].offset = off; off += w->e[i].nbytes; }
  size_t hlen;
  char *hdr = build_header(w, &hlen);
  if (!hdr) return gptoss_fail(GPTOSS_ENOMEM, "%s: out of memory building the header", w->path);

  char *tmp;
  int fd = gptoss_temp_open(w->path, &tmp);
  if (fd < 0) { free(hdr); return gptoss_errcode(); }
  gptoss_status rc = GPTOSS_OK;
  unsigned char lenb[8];
  for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
  rc = gptoss_write_all(fd, lenb, 8, tmp);
  if (!rc) rc = gptoss_write_all(fd, hdr, hlen, tmp);
  free(hdr);

  const size_t CHUNK = (size_t)64 << 20;
  unsigned char *buf = NULL;
  gptoss_pool *pool = NULL;
  for (size_t i = 0; i < w->n && !rc; i++) {
    const w_entry *e = &w->e[i];
    if (e->fill.kind == GPTOSS_FILL_DATA) {
      if (e->nbytes) rc = gptoss_write_all(fd, e->fill.data, (size_t)e->nbytes, tmp);
      continue;
    }
    if (!buf && !(buf = malloc(CHUNK))) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); break; }
    if (!pool && threads > 1) pool = gptoss_pool_new(threads);
    size_t es = gptoss_dtype_size(e->dtype);
    uint64_t total = e->nbytes / es, per = CHUNK / es;
    for (uint64_t first = 0; first < total && !rc; first += per) {
      uint64_t cnt = total - first < per ? total - first : per;
      fill_job j = { e, buf, first, cnt };
      gptoss_pool_run(pool, fill_worker, &j);
      rc = gptoss_write_all(fd, buf, (size_t)(cnt * es), tmp);
    }
  }
  free(buf);
  gptoss_pool_free(pool);
  return gptoss_temp_commit(fd, tmp, w->path, rc);
}
/* }====================================================== */
