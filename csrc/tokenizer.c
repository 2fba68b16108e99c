/*
** tokenizer.c: o200k-style byte-level BPE from a Hugging Face tokenizer.json.
**
** Pre-tokenisation runs the file's Split regex through PCRE2 (UTF + UCP,
** JIT when available). Each piece is then merged with tiktoken's rule: the
** adjacent pair whose concatenated bytes have the lowest rank merges first,
** leftmost on ties, and token id = rank. The merges list of the file is not
** needed for that rule and is skipped unread.
*/
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>
#include "internal.h"
#include "utf8.h"

/* o200k_harmony's vocabulary ends at 201087 (reserved specials) */
#define HARMONY_N_VOCAB 201088
#define O200K_N_RANKS 199998

typedef struct tok_entry { uint32_t off, len; } tok_entry;

/* A hash slot: tokens of up to 8 bytes live in the slot itself, so a
   lookup touches one cache line instead of slot, entry and arena. */
typedef struct tok_slot {
  uint64_t bytes;             /* the token's bytes when len <= 8, zero-padded */
  uint32_t id1;               /* id + 1; 0 = empty */
  uint32_t tag;               /* length (low 8 bits, 255 = longer) and 24 hash bits */
} tok_slot;

struct gptoss_tokenizer {
  char *arena;                /* bytes of every token, back to back */
  size_t arena_len;
  tok_entry *tok;             /* [n_vocab]: bytes (ordinary) or name (special) */
  int n_ranks;                /* ordinary tokens: ids 0..n_ranks-1 */
  int n_vocab;
  unsigned char *special;     /* [n_vocab] 1 when special */
  tok_slot *slots;            /* ordinary tokens by bytes */
  size_t nslots;
  tok_slot *sslots;           /* special tokens by name */
  size_t nsslots;
  int32_t *pair;              /* [65536] rank of each 2-byte token, -1 if none */
  int32_t byte_id[256];       /* rank of each single byte */
  pcre2_code *re;
  int jit;
};

/* {====================================================== hashing of byte strings */
/* The n < 8 bytes at p as a zero-padded little-endian word, without a
   variable-length memcpy (a libc call): two overlapping loads agree on the
   bytes they share, so OR-ing them is exact. */
static inline uint64_t load_partial(const unsigned char *p, size_t n) {
  if (n >= 4) {
    uint32_t a, b;
    memcpy(&a, p, 4);
    memcpy(&b, p + n - 4, 4);
    return (uint64_t)a | ((uint64_t)b << (8 * (n - 4)));
  }
  if (n == 0) return 0;
  return (uint64_t)p[0] | ((uint64_t)p[n / 2] << (8 * (n / 2))) | ((uint64_t)p[n - 1] << (8 * (n - 1)));
}

static inline uint64_t bytes_hash(const unsigned char *p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ (n * 0xff51afd7ed558ccdull);
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  h = (h ^ load_partial(p, n)) * 0x94d049bb133111ebull;
  return h ^ (h >> 32);
}

static inline uint64_t load8(const unsigned char *p, size_t n) {
  if (n == 8) { uint64_t w; memcpy(&w, p, 8); return w; }
  return load_partial(p, n);
}

static inline uint32_t slot_tag(uint64_t hv, size_t n) {
  return (uint32_t)((hv >> 40) << 8) | (uint32_t)(n < 255 ? n : 255);
}

static int table_put(tok_slot *slots, size_t ns, const gptoss_tokenizer *t, uint32_t id) {
  const tok_entry *e = &t->tok[id];
  const unsigned char *b = (const unsigned char *)t->arena + e->off;
  uint64_t hv = bytes_hash(b, e->len);
  size_t h = (size_t)hv & (ns - 1);
  while (slots[h].id1) {
    const tok_entry *o = &t->tok[slots[h].id1 - 1];
    if (o->len == e->len && memcmp(t->arena + o->off, b, e->len) == 0) return -1;
    h = (h + 1) & (ns - 1);
  }
  slots[h].bytes = e->len <= 8 ? load8(b, e->len) : 0;
  slots[h].id1 = id + 1;
  slots[h].tag = slot_tag(hv, e->len);
  return 0;
}

static inline int table_get(const tok_slot *slots, size_t ns, const gptoss_tokenizer *t,
                            const unsigned char *p, size_t n) {
  uint64_t hv = bytes_hash(p, n);
  uint32_t tag = slot_tag(hv, n);
  size_t h = (size_t)hv & (ns - 1);
  if (n <= 8) {
    uint64_t w = load8(p, n);
    for (; slots[h].id1; h = (h + 1) & (ns - 1))
      if (slots[h].tag == tag && slots[h].bytes == w) return (int)slots[h].id1 - 1;
    return -1;
  }
  for (; slots[h].id1; h = (h + 1) & (ns - 1)) {
    if (slots[h].tag != tag) continue;
    const tok_entry *o = &t->tok[slots[h].id1 - 1];
    if (o->len == n && memcmp(t->arena + o->off, p, n) == 0) return (int)slots[h].id1 - 1;
  }
  return -1;
}

static inline int rank_of(const gptoss_tokenizer *t, const unsigned char *p, size_t n) {
  return table_get(t->slots, t->nslots, t, p, n);
}
/* }====================================================== */

/* {====================================================== loading */
/* GPT-2's bytes_to_unicode, inverted: code point -> byte (-1 if none) */
static void byte_decoder(int16_t dec[324]) {
  for (int i = 0; i < 324; i++) dec[i] = -1;
  int n = 0;
  for (int b = 0; b < 256; b++) {
    int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    if (printable) dec[b] = (int16_t)b;
    else dec[256 + n++] = (int16_t)b;
  }
}

static size_t pow2_above(size_t n) {
  size_t s = 16;
  while (s < n * 2 + 1) s <<= 1;
  return s;
}

/* Rust's \s (Unicode White_Space, what tiktoken matches) differs from
   PCRE2's UCP \s, which also takes U+180E; spell the class out. */
#define RUST_SPACE "\\x{09}-\\x{0D}\\x{85}\\p{Z}"

static char *rewrite_regex(const char *src, char *err, size_t errlen) {
  size_t n = strlen(src);
  char *out = malloc(n * 8 + 1);
  if (!out) { snprintf(err, errlen, "out of memory"); return NULL; }
  size_t k = 0;
  int in_class = 0;
  for (size_t i = 0; i < n; i++) {
    char c = src[i];
    if (c == '\\' && i + 1 < n) {
      char d = src[i + 1];
      if (d == 's') {
        k += (size_t)sprintf(out + k, in_class ? "%s" : "[%s]", RUST_SPACE);
        i++;
        continue;
      }
      if (d == 'S') {
        if (in_class) { free(out); snprintf(err, errlen, "\\S inside a character class is not supported"); return NULL; }
        k += (size_t)sprintf(out + k, "[^%s]", RUST_SPACE);
        i++;
        continue;
      }
      out[k++] = c;
      out[k++] = d;
      i++;
      continue;
    }
    if (c == '[' && !in_class) in_class = 1;
    else if (c == ']' && in_class) in_class = 0;
    out[k++] = c;
  }
  out[k] = 0;
  return out;
}

typedef struct loader {
  const char *path;
  cJSON *added, *vocab, *pretok;
  char *model_type;
  gptoss_tokenizer *t;
} loader;

static gptoss_status walk_model(loader *ld, gptoss_json_walk *w) {
  gptoss_json_walk mw;
  if (gptoss_json_walk_begin(&mw, w->p, w->end) != 0)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: 'model' is not a JSON object (byte %zu)", ld->path, gptoss_json_walk_offset(w));
  mw.start = w->start;
  char *key;
  int r;
  while ((r = gptoss_json_walk_next(&mw, &key)) == 1) {
    int ok;
    /* a repeated key: the last one wins, as with Python's json */
    if (strcmp(key, "vocab") == 0) { cJSON_Delete(ld->vocab); ok = (ld->vocab = gptoss_json_walk_value(&mw)) != NULL; }
    else if (strcmp(key, "type") == 0) {
      cJSON *v = gptoss_json_walk_value(&mw);
      ok = v != NULL;
      free(ld->model_type);
      ld->model_type = cJSON_IsString(v) ? strdup(v->valuestring) : NULL;
      cJSON_Delete(v);
    } else ok = gptoss_json_walk_skip(&mw) == 0;
    free(key);
    if (!ok) return gptoss_fail(GPTOSS_EFORMAT, "%s: invalid JSON near byte %zu", ld->path, gptoss_json_walk_offset(&mw));
  }
  if (r < 0) return gptoss_fail(GPTOSS_EFORMAT, "%s: invalid JSON near byte %zu", ld->path, gptoss_json_walk_offset(&mw));
  w->p = mw.p;
  return GPTOSS_OK;
}

static gptoss_status read_json(loader *ld, const char *txt, size_t len) {
  gptoss_json_walk w;
  if (gptoss_json_walk_begin(&w, txt, txt + len) != 0)
    return gptoss_fail(GPTOSS_EFORMAT, "%s: not a JSON object", ld->path);
  char *key;
  int r;
  while ((r = gptoss_json_walk_next(&w, &key)) == 1) {
    gptoss_status rc = GPTOSS_OK;
    int ok = 1;
    if (strcmp(key, "model") == 0) rc = walk_model(ld, &w);
    else if (strcmp(key, "added_tokens") == 0) { cJSON_Delete(ld->added); ok = (ld->added = gptoss_json_walk_value(&w)) != NULL; }
    else if (strcmp(key, "pre_tokenizer") == 0) { cJSON_Delete(ld->pretok); ok = (ld->pretok = gptoss_json_walk_value(&w)) != NULL; }
    else ok = gptoss_json_walk_skip(&w) == 0;
    free(key);
    if (rc) return rc;
    if (!ok) return gptoss_fail(GPTOSS_EFORMAT, "%s: invalid JSON near byte %zu", ld->path, gptoss_json_walk_offset(&w));
  }
  if (r < 0) return gptoss_fail(GPTOSS_EFORMAT, "%s: invalid JSON near byte %zu", ld->path, gptoss_json_walk_offset(&w));
  return GPTOSS_OK;
}

/* finds the Split regex in pre_tokenizer (alone or inside a Sequence) */
static const char *find_split_regex(const cJSON *p) {
  if (!cJSON_IsObject(p)) return NULL;
  const cJSON *ty = cJSON_GetObjectItemCaseSensitive(p, "type");
  if (cJSON_IsString(ty) && strcmp(ty->valuestring, "Split") == 0) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
    const cJSON *rx = pat ? cJSON_GetObjectItemCaseSensitive(pat, "Regex") : NULL;
    return cJSON_IsString(rx) ? rx->valuestring : NULL;
  }
  const cJSON *seq = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
  const cJSON *x;
  cJSON_ArrayForEach(x, seq) {
    const char *r = find_split_regex(x);
    if (r) return r;
  }
  return NULL;
}

static gptoss_status build(loader *ld) {
  gptoss_tokenizer *t = ld->t;
  const char *path = ld->path;
  if (!ld->model_type || strcmp(ld->model_type, "BPE") != 0)
    return gptoss_fail(GPTOSS_EUNSUP, "%s: model.type is '%s'; only byte-level BPE is supported", path,
                       ld->model_type ? ld->model_type : "(missing)");
  if (!cJSON_IsObject(ld->vocab)) return gptoss_fail(GPTOSS_EFORMAT, "%s: missing model.vocab object", path);
  int nr = cJSON_GetArraySize(ld->vocab);
  if (nr < 256) return gptoss_fail(GPTOSS_EFORMAT, "%s: model.vocab has %d entries; byte-level BPE needs all 256 bytes", path, nr);
  int maxid = nr - 1;
  const cJSON *x;
  if (ld->added && !cJSON_IsArray(ld->added)) return gptoss_fail(GPTOSS_EFORMAT, "%s: added_tokens is not an array", path);
  cJSON_ArrayForEach(x, ld->added) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(x, "id"), *ct = cJSON_GetObjectItemCaseSensitive(x, "content");
    if (!cJSON_IsNumber(id) || !cJSON_IsString(ct) || id->valuedouble < 0 || id->valuedouble > 16777215)
      return gptoss_fail(GPTOSS_EFORMAT, "%s: added_tokens entry needs an integer 'id' and a string 'content'", path);
    if ((int)id->valuedouble > maxid) maxid = (int)id->valuedouble;
  }
  t->n_ranks = nr;
  t->n_vocab = maxid + 1;
  if (nr == O200K_N_RANKS && t->n_vocab < HARMONY_N_VOCAB) t->n_vocab = HARMONY_N_VOCAB;
  t->tok = calloc((size_t)t->n_vocab, sizeof *t->tok);
  t->special = calloc((size_t)t->n_vocab, 1);
  size_t cap = 4 * 1024 * 1024;
  t->arena = malloc(cap);
  if (!t->tok || !t->special || !t->arena) return gptoss_fail(GPTOSS_ENOMEM, "out of memory loading %s", path);
  unsigned char *seen = calloc((size_t)nr, 1);
  if (!seen) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  int16_t dec[324];
  byte_decoder(dec);
  gptoss_status rc = GPTOSS_OK;
  cJSON_ArrayForEach(x, ld->vocab) {
    const unsigned char *k = (const unsigned char *)x->string;
    size_t kl = strlen(x->string);
    if (!cJSON_IsNumber(x) || x->valuedouble < 0 || x->valuedouble >= nr || x->valuedouble != (int)x->valuedouble) {
      rc = gptoss_fail(GPTOSS_EFORMAT, "%s: model.vocab['%s'] must be an id in 0..%d", path, x->string, nr - 1);
      break;
    }
    int id = (int)x->valuedouble;
    if (seen[id]) { rc = gptoss_fail(GPTOSS_EFORMAT, "%s: model.vocab id %d is given twice", path, id); break; }
    seen[id] = 1;
    if (t->arena_len + kl > cap) {
      cap *= 2;
      char *na = realloc(t->arena, cap);
      if (!na) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); break; }
      t->arena = na;
    }
    t->tok[id].off = (uint32_t)t->arena_len;
    size_t i = 0;
    while (i < kl) {
      uint32_t cp;
      int n = gptoss_utf8_decode(k + i, kl - i, &cp);
      if (!n || cp >= 324 || dec[cp] < 0) {
        rc = gptoss_fail(GPTOSS_EFORMAT, "%s: model.vocab key '%s' (id %d) is not byte-level BPE text", path, x->string, id);
        break;
      }
      t->arena[t->arena_len++] = (char)dec[cp];
      i += (size_t)n;
    }
    if (rc) break;
    t->tok[id].len = (uint32_t)(t->arena_len - t->tok[id].off);
  }
  free(seen);
  if (rc) return rc;
  /* specials: from added_tokens, then the reserved names for the rest */
  cJSON_ArrayForEach(x, ld->added) {
    int id = (int)cJSON_GetObjectItemCaseSensitive(x, "id")->valuedouble;
    const char *ct = cJSON_GetObjectItemCaseSensitive(x, "content")->valuestring;
    if (id < nr) {
      /* an added token over an ordinary id must spell the same bytes */
      size_t cl = strlen(ct);
      if (t->tok[id].len != cl || memcmp(t->arena + t->tok[id].off, ct, cl) != 0)
        return gptoss_fail(GPTOSS_EFORMAT, "%s: added token %d ('%s') collides with an ordinary token", path, id, ct);
      continue;
    }
    if (t->special[id]) return gptoss_fail(GPTOSS_EFORMAT, "%s: added token id %d is given twice", path, id);
    size_t cl = strlen(ct);
    if (t->arena_len + cl > cap) {
      cap = (t->arena_len + cl) * 2;
      char *na = realloc(t->arena, cap);
      if (!na) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
      t->arena = na;
    }
    t->tok[id].off = (uint32_t)t->arena_len;
    t->tok[id].len = (uint32_t)cl;
    memcpy(t->arena + t->arena_len, ct, cl);
    t->arena_len += cl;
    t->special[id] = 1;
  }
  for (int id = nr; id < t->n_vocab; id++) {
    if (t->special[id]) continue;
    char nm[40];
    int cl = snprintf(nm, sizeof nm, "<|reserved_%d|>", id);
    if (t->arena_len + (size_t)cl > cap) {
      cap = (t->arena_len + (size_t)cl) * 2;
      char *na = realloc(t->arena, cap);
      if (!na) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
      t->arena = na;
    }
    t->tok[id].off = (uint32_t)t->arena_len;
    t->tok[id].len = (uint32_t)cl;
    memcpy(t->arena + t->arena_len, nm, (size_t)cl);
    t->arena_len += (size_t)cl;
    t->special[id] = 1;
  }
  t->nslots = pow2_above((size_t)nr);
  t->slots = calloc(t->nslots, sizeof *t->slots);
  t->nsslots = pow2_above((size_t)(t->n_vocab - nr) + 1);
  t->sslots = calloc(t->nsslots, sizeof *t->sslots);
  if (!t->slots || !t->sslots) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  for (int id = 0; id < nr; id++)
    if (table_put(t->slots, t->nslots, t, (uint32_t)id) != 0)
      return gptoss_fail(GPTOSS_EFORMAT, "%s: token %d repeats the bytes of an earlier token", path, id);
  for (int id = nr; id < t->n_vocab; id++)
    if (table_put(t->sslots, t->nsslots, t, (uint32_t)id) != 0)
      return gptoss_fail(GPTOSS_EFORMAT, "%s: special token %d repeats the name of an earlier one", path, id);
  /* every single byte must be a token, or BPE cannot finish */
  for (int b = 0; b < 256; b++) {
    unsigned char c = (unsigned char)b;
    if ((t->byte_id[b] = rank_of(t, &c, 1)) < 0) return gptoss_fail(GPTOSS_EFORMAT, "%s: byte 0x%02x has no token", path, b);
  }
  /* every merge starts from byte pairs: look those up by index, not hash */
  t->pair = malloc(sizeof(int32_t) * 65536);
  if (!t->pair) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  for (int i = 0; i < 65536; i++) t->pair[i] = -1;
  for (int id = 0; id < nr; id++)
    if (t->tok[id].len == 2) {
      const unsigned char *b = (const unsigned char *)t->arena + t->tok[id].off;
      t->pair[b[0] << 8 | b[1]] = id;
    }

  const char *rx = find_split_regex(ld->pretok);
  if (!rx) return gptoss_fail(GPTOSS_EFORMAT, "%s: pre_tokenizer has no Split regex", path);
  char err[256];
  char *pat = rewrite_regex(rx, err, sizeof err);
  if (!pat) return gptoss_fail(GPTOSS_EFORMAT, "%s: pre_tokenizer regex: %s", path, err);
  int ec;
  PCRE2_SIZE eo;
  t->re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &ec, &eo, NULL);
  free(pat);
  if (!t->re) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(ec, msg, sizeof msg);
    return gptoss_fail(GPTOSS_EFORMAT, "%s: pre_tokenizer regex does not compile at offset %zu: %s", path, (size_t)eo, (char *)msg);
  }
  t->jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
  return GPTOSS_OK;
}

gptoss_status gptoss_tokenizer_load(const char *path, gptoss_tokenizer **out) {
  *out = NULL;
  char *file = NULL;
  if (gptoss_is_dir(path)) file = gptoss_path_join(path, "tokenizer.json");
  else file = strdup(path);
  if (!file) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  size_t len;
  char *txt = gptoss_read_file(file, &len);
  if (!txt) { free(file); return gptoss_errcode(); }
  loader ld = {0};
  ld.path = file;
  ld.t = calloc(1, sizeof *ld.t);
  gptoss_status rc = ld.t ? read_json(&ld, txt, len) : gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  free(txt);
  if (!rc) rc = build(&ld);
  cJSON_Delete(ld.added);
  cJSON_Delete(ld.vocab);
  cJSON_Delete(ld.pretok);
  free(ld.model_type);
  free(file);
  if (rc) { gptoss_tokenizer_free(ld.t); return rc; }
  *out = ld.t;
  return GPTOSS_OK;
}

void gptoss_tokenizer_free(gptoss_tokenizer *t) {
  if (!t) return;
  if (t->re) pcre2_code_free(t->re);
  free(t->arena);
  free(t->tok);
  free(t->special);
  free(t->slots);
  free(t->sslots);
  free(t->pair);
  free(t);
}

int gptoss_tokenizer_vocab_size(const gptoss_tokenizer *t) { return t->n_vocab; }
int gptoss_tokenizer_n_ordinary(const gptoss_tokenizer *t) { return t->n_ranks; }
/* }====================================================== */

/* {====================================================== encoding */
void gptoss_ids_free(gptoss_ids *ids) {
  free(ids->v);
  ids->v = NULL;
  ids->n = ids->cap = 0;
}

static int ids_push(gptoss_ids *ids, int32_t v) {
  if (ids->n == ids->cap) {
    size_t nc = ids->cap ? ids->cap * 2 : 256;
    int32_t *nv = realloc(ids->v, nc * sizeof *nv);
    if (!nv) return -1;
    ids->v = nv;
    ids->cap = nc;
  }
  ids->v[ids->n++] = v;
  return 0;
}

/* Short pieces: tiktoken's own loop over an array of part boundaries; its
   rescan per merge is O(n^2), so longer pieces take the heap below. */
#define SMALL_PIECE 16

static int bpe_small(const gptoss_tokenizer *t, const unsigned char *p, size_t n, gptoss_ids *out) {
  uint32_t start[SMALL_PIECE + 1];
  int rank[SMALL_PIECE + 1];
  int32_t tokid[SMALL_PIECE + 1];   /* the token each part is: a merge of rank r makes token r */
  for (size_t i = 0; i < n; i++) tokid[i] = t->byte_id[p[i]];
  size_t np = n + 1;          /* boundaries: parts are [start[i], start[i+1]) */
  for (size_t i = 0; i <= n; i++) start[i] = (uint32_t)i;
  for (size_t i = 0; i + 1 < n; i++) {
    int r = t->pair[p[i] << 8 | p[i + 1]];
    rank[i] = r < 0 ? INT32_MAX : r;
  }
  if (n >= 1) rank[n - 1] = INT32_MAX;
  rank[n] = INT32_MAX;
  for (;;) {
    int best = INT32_MAX;
    size_t bi = 0;
    for (size_t i = 0; i + 1 < np; i++)
      if (rank[i] < best) { best = rank[i]; bi = i; }
    if (best == INT32_MAX) break;
    /* merge part bi with bi+1: drop boundary bi+1 */
    tokid[bi] = best;
    memmove(start + bi + 1, start + bi + 2, (np - bi - 2) * sizeof *start);
    memmove(rank + bi + 1, rank + bi + 2, (np - bi - 2) * sizeof *rank);
    memmove(tokid + bi + 1, tokid + bi + 2, (np - bi - 2) * sizeof *tokid);
    np--;
    /* ranks of the pairs that now start at bi-1 and bi */
    if (bi + 2 < np) { int r = rank_of(t, p + start[bi], start[bi + 2] - start[bi]); rank[bi] = r < 0 ? INT32_MAX : r; }
    else rank[bi] = INT32_MAX;
    if (bi > 0) {
      if (bi + 1 < np) { int r = rank_of(t, p + start[bi - 1], start[bi + 1] - start[bi - 1]); rank[bi - 1] = r < 0 ? INT32_MAX : r; }
      else rank[bi - 1] = INT32_MAX;
    }
  }
  for (size_t i = 0; i + 1 < np; i++)
    if (ids_push(out, tokid[i]) != 0) return -1;
  return 0;
}

/* Longer pieces (words of scripts without spaces, long runs of letters,
   spaces or punctuation): the same merge order with a heap keyed by (rank,
   start offset) and lazy deletion, O(n log n) instead of O(n^2). */
typedef struct hent { int rank; uint32_t pos; uint32_t stamp; } hent;

static int hless(const hent *a, const hent *b) {
  return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void hpush(hent *h, size_t *n, hent e) {
  size_t i = (*n)++;
  while (i > 0) {
    size_t par = (i - 1) / 2;
    if (!hless(&e, &h[par])) break;
    h[i] = h[par];
    i = par;
  }
  h[i] = e;
}

static hent hpop(hent *h, size_t *n) {
  hent top = h[0], last = h[--(*n)];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= *n) break;
    if (c + 1 < *n && hless(&h[c + 1], &h[c])) c++;
    if (!hless(&h[c], &last)) break;
    h[i] = h[c];
    i = c;
  }
  if (*n) h[i] = last;
  return top;
}

static int bpe_large(const gptoss_tokenizer *t, const unsigned char *p, size_t n, gptoss_ids *out) {
  /* parts as a linked list over byte offsets: next[i] is the start of the
     part after the one starting at i; alive[i] when a part starts at i */
  enum { STACK = 256 };
  uint32_t s_next[STACK + 1], s_prev[STACK + 1], s_stamp[STACK + 1];
  int32_t s_tok[STACK + 1];
  hent s_heap[4 * STACK + 4];
  int big = n > STACK;
  uint32_t *next = big ? malloc(sizeof(uint32_t) * (n + 1)) : s_next;
  uint32_t *prev = big ? malloc(sizeof(uint32_t) * (n + 1)) : s_prev;
  uint32_t *stamp = big ? calloc(n + 1, sizeof(uint32_t)) : s_stamp;
  hent *heap = big ? malloc(sizeof(hent) * (4 * n + 4)) : s_heap;
  int32_t *tokid = big ? malloc(sizeof(int32_t) * (n + 1)) : s_tok;
  int rc = -1;
  if (!next || !prev || !stamp || !heap || !tokid) goto done;
  for (size_t i = 0; i < n; i++) tokid[i] = t->byte_id[p[i]];
  if (!big) memset(stamp, 0, sizeof(uint32_t) * (n + 1));
  size_t hn = 0;
  for (size_t i = 0; i <= n; i++) { next[i] = (uint32_t)(i + 1); prev[i] = i ? (uint32_t)(i - 1) : UINT32_MAX; }
  for (size_t i = 0; i + 1 < n; i++) {
    int r = t->pair[p[i] << 8 | p[i + 1]];
    if (r >= 0) hpush(heap, &hn, (hent){ r, (uint32_t)i, 0 });
  }
  while (hn) {
    hent e = hpop(heap, &hn);
    uint32_t i = e.pos;
    if (e.stamp != stamp[i] || next[i] > n) continue;   /* stale */
    uint32_t j = next[i];
    if (j >= n) continue;
    /* merge the parts starting at i and j */
    tokid[i] = e.rank;
    uint32_t k = next[j];
    next[i] = k;
    if (k <= n) prev[k] = i;
    stamp[i]++;
    stamp[j] = UINT32_MAX;     /* j no longer starts a part */
    if (k < n) {
      int r = rank_of(t, p + i, next[k] - i);
      if (r >= 0) hpush(heap, &hn, (hent){ r, i, stamp[i] });
    }
    if (prev[i] != UINT32_MAX) {
      uint32_t h = prev[i];
      stamp[h]++;
      int r = rank_of(t, p + h, k - h);
      if (r >= 0) hpush(heap, &hn, (hent){ r, h, stamp[h] });
    }
  }
  for (uint32_t i = 0; i < n; i = next[i])
    if (ids_push(out, tokid[i]) != 0) goto done;
  rc = 0;
done:
  if (big) { free(next); free(prev); free(stamp); free(heap); free(tokid); }
  return rc;
}

/* Pieces that are not tokens repeat a lot within a text (words, names,
   runs of a script); one call remembers where it already merged each, in
   the text it was given and the ids it already wrote, so the cache holds no
   copies and needs no lock. */
#define CACHE_SLOTS 4096
#define CACHE_MIN_TEXT 2048
typedef struct piece_cache {
  uint64_t hash[CACHE_SLOTS];
  uint32_t src[CACHE_SLOTS], at[CACHE_SLOTS];   /* piece offset in text, first id in out */
  uint16_t len[CACHE_SLOTS], nids[CACHE_SLOTS];
} piece_cache;

typedef struct enc_ctx {
  const gptoss_tokenizer *t;
  const unsigned char *text;   /* the whole input, for cached pieces */
  piece_cache *cache;          /* NULL for short inputs */
  gptoss_ids *out;
} enc_ctx;

static int encode_piece(enc_ctx *c, const unsigned char *p, size_t n) {
  const gptoss_tokenizer *t = c->t;
  gptoss_ids *out = c->out;
  int whole = rank_of(t, p, n);
  if (whole >= 0) return ids_push(out, whole);
  piece_cache *pc = c->cache;
  uint64_t h = 0;
  size_t slot = 0;
  if (pc && n < 65536) {
    h = bytes_hash(p, n) | 1;
    slot = (size_t)(h >> 20) & (CACHE_SLOTS - 1);
    if (pc->hash[slot] == h && pc->len[slot] == n && memcmp(c->text + pc->src[slot], p, n) == 0) {
      for (uint32_t i = 0; i < pc->nids[slot]; i++)
        if (ids_push(out, out->v[pc->at[slot] + i]) != 0) return -1;
      return 0;
    }
  }
  size_t before = out->n;
  int rc = n <= SMALL_PIECE ? bpe_small(t, p, n, out) : bpe_large(t, p, n, out);
  if (!rc && pc && n < 65536 && out->n - before < 65536 && before < UINT32_MAX) {
    pc->hash[slot] = h;
    pc->src[slot] = (uint32_t)(p - c->text);
    pc->at[slot] = (uint32_t)before;
    pc->len[slot] = (uint16_t)n;
    pc->nids[slot] = (uint16_t)(out->n - before);
  }
  return rc;
}

/* ordinary text that is valid UTF-8: the regex's matches, each BPE'd */
static gptoss_status encode_text(enc_ctx *c, const unsigned char *s, size_t n,
                                 size_t base, pcre2_match_data *md, pcre2_match_context *mc) {
  const gptoss_tokenizer *t = c->t;
  size_t at = 0;
  /* A run of whitespace backtracks once over its length (\s*[\r\n]+ before
     \s+(?!\S) matches it), so PCRE2's fixed default of 10^7 steps refused
     runs near 10 MB; the budget grows with the text instead: linear, bounded */
  uint64_t limit = 10000000u + 8u * (uint64_t)n;
  pcre2_set_match_limit(mc, limit > UINT32_MAX ? UINT32_MAX : (uint32_t)limit);
  while (at < n) {
    int r = t->jit ? pcre2_jit_match(t->re, s, n, at, PCRE2_NO_UTF_CHECK, md, mc)
                   : pcre2_match(t->re, s, n, at, PCRE2_NO_UTF_CHECK, md, mc);
    if (r == PCRE2_ERROR_NOMATCH) break;
    if (r < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(r, msg, sizeof msg);
      return gptoss_fail(GPTOSS_EFORMAT, "pre-tokenizer failed at byte %zu: %s", base + at, (char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    size_t b = ov[0], e = ov[1];
    if (e == b) {
      /* an empty match cannot happen with this regex; step past it anyway */
      uint32_t cp;
      int k = gptoss_utf8_decode(s + at, n - at, &cp);
      at += k ? (size_t)k : 1;
      continue;
    }
    if (encode_piece(c, s + b, e - b) != 0) return gptoss_fail(GPTOSS_ENOMEM, "out of memory encoding");
    at = e;
  }
  return GPTOSS_OK;
}

static gptoss_status encode_ordinary(enc_ctx *c, const unsigned char *s, size_t n, size_t base,
                                     int bytes_mode, pcre2_match_data *md, pcre2_match_context *mc) {
  size_t at = 0;
  while (at < n) {
    size_t ok = at + gptoss_utf8_valid(s + at, n - at);
    if (ok > at) {
      gptoss_status rc = encode_text(c, s + at, ok - at, base + at, md, mc);
      if (rc) return rc;
    }
    if (ok == n) break;
    if (!bytes_mode)
      return gptoss_fail(GPTOSS_EARG, "invalid UTF-8 at byte offset %zu (pass bytes mode to encode raw bytes)", base + ok);
    /* bytes mode: a maximal run of invalid bytes is BPE'd as one piece */
    size_t bad = ok;
    while (bad < n) {
      uint32_t cp;
      if (gptoss_utf8_decode(s + bad, n - bad, &cp)) break;
      bad++;
    }
    if (encode_piece(c, s + ok, bad - ok) != 0) return gptoss_fail(GPTOSS_ENOMEM, "out of memory encoding");
    at = bad;
  }
  return GPTOSS_OK;
}

/* the allowed special whose name starts at s[0..n), or -1 */
static int special_at(const gptoss_tokenizer *t, const unsigned char *s, size_t n, const char *const *allowed) {
  if (n < 4 || s[0] != '<' || s[1] != '|') return -1;
  for (size_t j = 2; j + 1 < n && j < 64; j++) {
    if (s[j] == '|' && s[j + 1] == '>') {
      int id = table_get(t->sslots, t->nsslots, t, s, j + 2);
      if (id < 0) return -1;
      if (!allowed) return id;
      for (const char *const *a = allowed; *a; a++)
        if (strlen(*a) == j + 2 && memcmp(*a, s, j + 2) == 0) return id;
      return -1;
    }
  }
  return -1;
}

gptoss_status gptoss_encode(const gptoss_tokenizer *t, const char *text, size_t len, int flags,
                            const char *const *allowed, gptoss_ids *out) {
  const unsigned char *s = (const unsigned char *)text;
  pcre2_match_data *md = pcre2_match_data_create_from_pattern(t->re, NULL);
  pcre2_match_context *mc = pcre2_match_context_create(NULL);
  pcre2_jit_stack *js = t->jit ? pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, NULL) : NULL;
  enc_ctx c = { t, s, NULL, out };
  gptoss_status rc = GPTOSS_OK;
  if (!md || !mc || (t->jit && !js)) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
  if (js) pcre2_jit_stack_assign(mc, NULL, js);
  int bytes_mode = (flags & GPTOSS_ENC_BYTES) != 0;
  if (len >= CACHE_MIN_TEXT) c.cache = calloc(1, sizeof *c.cache);   /* optional: no cache is only slower */
  if (!(flags & GPTOSS_ENC_SPECIAL)) {
    rc = encode_ordinary(&c, s, len, 0, bytes_mode, md, mc);
    goto done;
  }
  size_t seg = 0;
  for (size_t i = 0; i < len; i++) {
    if (s[i] != '<') continue;
    int id = special_at(t, s + i, len - i, allowed);
    if (id < 0) continue;
    if (i > seg && (rc = encode_ordinary(&c, s + seg, i - seg, seg, bytes_mode, md, mc))) goto done;
    if (ids_push(out, id) != 0) { rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory"); goto done; }
    i += t->tok[id].len - 1;
    seg = i + 1;
  }
  if (seg < len) rc = encode_ordinary(&c, s + seg, len - seg, seg, bytes_mode, md, mc);
done:
  free(c.cache);
  if (js) pcre2_jit_stack_free(js);
  pcre2_match_context_free(mc);
  pcre2_match_data_free(md);
  return rc;
}
/* }====================================================== */

/* {====================================================== ids to bytes */
const char *gptoss_token_bytes(const gptoss_tokenizer *t, int32_t id, size_t *len) {
  if (id < 0 || id >= t->n_vocab) return NULL;
  *len = t->tok[id].len;
  return t->arena + t->tok[id].off;
}

int32_t gptoss_special_id(const gptoss_tokenizer *t, const char *name) {
  int id = table_get(t->sslots, t->nsslots, t, (const unsigned char *)name, strlen(name));
  return id;
}

int gptoss_is_special(const gptoss_tokenizer *t, int32_t id) {
  return id >= 0 && id < t->n_vocab && t->special[id];
}
/* }====================================================== */
