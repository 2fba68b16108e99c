/*
** internal.h: what the engine's files share and the public API hides.
*/
#ifndef GPTOSS_INTERNAL_H
#define GPTOSS_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include "gptoss.h"

typedef struct gptoss_pool gptoss_pool;
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif
/* sets this thread's message (gptoss_errmsg) and returns code */
gptoss_status gptoss_fail(gptoss_status code, const char *fmt, ...)
#if defined(__GNUC__)
  __attribute__((format(printf, 2, 3)))
#endif
  ;
/* wake.c: fd[0] turns readable when signalled (an eventfd, or a pipe's
   ends); event loops watch it, drain resets it */
gptoss_status gptoss_wake_open(int fd[2]);
void gptoss_wake_close(int fd[2]);
void gptoss_wake_signal(const int fd[2]);
int gptoss_wake_drain(const int fd[2]);                  /* 1 if it was signalled */
int gptoss_wake_poll(const int fd[2], double timeout_s); /* 1 once readable */
gptoss_pool *gptoss_pool_new(int nthreads);
void gptoss_pool_free(gptoss_pool *p);
void gptoss_pool_run(gptoss_pool *p, void (*fn)(void *ctx, int tid, int nth), void *ctx);
#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

/* Hot loops, cloned for AVX2/AVX-512 and picked at load time, so one binary
   runs on any x86-64 and uses what the machine has */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define GPTOSS_HOT __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define GPTOSS_HOT
#endif

/* {====================================================== hashing */
static inline uint64_t gptoss_fnv1a(const void *p, size_t n) {
  const unsigned char *s = (const unsigned char *)p;
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) { h ^= s[i]; h *= 1099511628211ull; }
  return h;
}

/* what the CUDA backend also runs on the device (same arithmetic) */
#ifdef __CUDACC__
#define GPTOSS_HD __host__ __device__
#else
#define GPTOSS_HD
#endif

/* splitmix64's finaliser: a good 64-bit mix, used as a counter-based RNG */
static inline GPTOSS_HD uint64_t gptoss_mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* uniform double in [0, 1) from 53 random bits */
static inline GPTOSS_HD double gptoss_u01(uint64_t x) { return (double)(x >> 11) * (1.0 / 9007199254740992.0); }

/* LoRA dropout's mask (training): feature i of token t at projection mod of
   layer l is kept, scaled by 1/(1-p), or dropped (0), from these alone, so a
   recomputation sees the forward's masks and both backends draw the same */
static inline GPTOSS_HD float gptoss_lora_keep(uint64_t key, int l, int mod, int t, int i, float p) {
  uint64_t k = gptoss_mix64(key ^ ((uint64_t)l << 48) ^ ((uint64_t)mod << 40) ^ ((uint64_t)t << 20));
  return gptoss_u01(gptoss_mix64(k + (uint64_t)i)) < p ? 0.0f : 1.0f / (1.0f - p);
}
/* }====================================================== */

/* {====================================================== thread pool */
/* Fork-join pool (gptoss_pool_new, _run, _free above): run() calls
   fn(ctx, tid, nthreads) on every thread (the caller is thread 0) and
   returns when all are done. Workers spin briefly before sleeping, since a
   forward pass issues hundreds of short regions. pool_size: the threads
   run() uses, fewer than asked when some failed to start. */
int gptoss_pool_size(const gptoss_pool *p);

/* [lo, hi) share of n items for thread tid of nth */
static inline void gptoss_split(int64_t n, int tid, int nth, int64_t *lo, int64_t *hi) {
  *lo = n * tid / nth;
  *hi = n * (tid + 1) / nth;
}
/* }====================================================== */

/* {====================================================== files */
/* Opens path for reading, refusing (without blocking) anything but a regular
   file; returns the descriptor and sets *size, or -1 and the error. */
int gptoss_open_regular(const char *path, size_t *size);
/* Reads a whole file; returns NULL and sets the error (naming path) on failure. */
char *gptoss_read_file(const char *path, size_t *len);
/* Writes len bytes to "<path>.tmp-XXXXXX", syncs, and renames it into
   place: readers see the old file or the whole new one. */
gptoss_status gptoss_write_file(const char *path, const void *data, size_t len);
gptoss_status gptoss_copy_file(const char *src, const char *dst);   /* through gptoss_write_file */
/* The same protocol for a writer that writes piece by piece: temp_open
   creates "<path>.tmp-XXXXXX" (mode 0644) and returns its descriptor, with
   its name in *tmp (-1 and the error set when it cannot); temp_commit takes
   the result so far, syncs, closes and renames it into place when that is
   GPTOSS_OK, else removes it; it frees tmp and returns the result. */
int gptoss_temp_open(const char *path, char **tmp);
gptoss_status gptoss_write_all(int fd, const void *data, size_t len, const char *name);
gptoss_status gptoss_temp_commit(int fd, char *tmp, const char *path, gptoss_status rc);
/* "<path>.tmp-XXXXXX", malloc'd (NULL and the error set when out of memory),
   for mkstemp or mkdtemp */
char *gptoss_temp_name(const char *path);
/* removes dir and the files in it (one level: what the engine writes) */
void gptoss_remove_tree(const char *dir);
/* dir + "/" + name, malloc'd */
char *gptoss_path_join(const char *dir, const char *name);
int gptoss_is_dir(const char *path);
int gptoss_file_exists(const char *path);
int gptoss_path_exists(const char *path);   /* of any type, so that the opener can say what is wrong */
/* }====================================================== */

/* {====================================================== JSON helpers (over cJSON) */
struct cJSON;
/* Walks a JSON object one member at a time with cJSON, so that large members
   the caller does not need can be skipped without building them. */
typedef struct gptoss_json_walk {
  const char *p, *end, *start;
  int first;
} gptoss_json_walk;
int gptoss_json_walk_begin(gptoss_json_walk *w, const char *p, const char *end);
/* 1: key in *key (malloc'd), cursor at the value; 0: object ended; -1: error */
int gptoss_json_walk_next(gptoss_json_walk *w, char **key);
struct cJSON *gptoss_json_walk_value(gptoss_json_walk *w);   /* parses the value */
int gptoss_json_walk_skip(gptoss_json_walk *w);              /* skips the value */
size_t gptoss_json_walk_offset(const gptoss_json_walk *w);
/* }====================================================== */

/* {====================================================== log-probabilities */
/* The log_softmax of logits[vocab] (sampler.c): out[0] = {id, its
   log-probability}, out[1..k] the k most likely tokens (the higher logit
   first, equal ones by id). */
void gptoss_logprobs(const float *logits, int vocab, int32_t id, int k, gptoss_logprob *out);
/* }====================================================== */

/* {====================================================== test hooks */
/* Not API: the n-th allocation of the CPU backend from now fails (n >= 1;
   0: none does), so that a spec can reach every out-of-memory path.
   Returns what was left of the previous count: 0 once its failure came
   (or none was armed), more when fewer allocations were made */
int gptoss_test_fail_alloc(int n);
/* }====================================================== */

#endif
