/*
** pool.c: a fork-join thread pool for the CPU backend and the writer.
*/
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#include <sched.h>
#include "internal.h"

struct gptoss_pool {
  int n;
  pthread_t *threads;
  pthread_mutex_t mu;
  pthread_cond_t wake, done;
  atomic_uint gen;          /* bumped once per run(); workers wait for a change */
  atomic_int pending;       /* workers still busy in the current run */
  int quit;
  void (*fn)(void *, int, int);
  void *ctx;
};

typedef struct { gptoss_pool *p; int tid; } worker_arg;

/* Spinning this long covers the gap between two regions of one forward
   pass; after it, a worker sleeps so an idle model costs no CPU. */
#define SPIN_ROUNDS 20000

static void *worker(void *arg) {
  worker_arg *wa = arg;
  gptoss_pool *p = wa->p;
  int tid = wa->tid;
  free(wa);
  /* the pool is created before any run(), so every worker starts at
     generation 0, however late the thread itself gets going */
  unsigned seen = 0;
  for (;;) {
    unsigned g;
    int spins = 0;
    while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen && spins < SPIN_ROUNDS) {
      spins++;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    if (g == seen) {
      pthread_mutex_lock(&p->mu);
      while ((g = atomic_load(&p->gen)) == seen && !p->quit) pthread_cond_wait(&p->wake, &p->mu);
      pthread_mutex_unlock(&p->mu);
    }
    if (p->quit) return NULL;
    seen = g;
    p->fn(p->ctx, tid, p->n);
    if (atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel) == 1) {
      pthread_mutex_lock(&p->mu);
      pthread_cond_signal(&p->done);
      pthread_mutex_unlock(&p->mu);
    }
  }
}

gptoss_pool *gptoss_pool_new(int n) {
  if (n < 1) n = 1;
  gptoss_pool *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->n = n;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->wake, NULL);
  pthread_cond_init(&p->done, NULL);
  p->threads = calloc((size_t)n, sizeof *p->threads);
  if (!p->threads) { free(p); return NULL; }
  for (int i = 1; i < n; i++) {
    worker_arg *wa = malloc(sizeof *wa);
    if (!wa) { p->n = i; break; }
    wa->p = p; wa->tid = i;
    if (pthread_create(&p->threads[i], NULL, worker, wa) != 0) { free(wa); p->n = i; break; }
  }
  return p;
}

int gptoss_pool_size(const gptoss_pool *p) { return p ? p->n : 1; }

void gptoss_pool_run(gptoss_pool *p, void (*fn)(void *, int, int), void *ctx) {
  if (!p || p->n == 1) { fn(ctx, 0, 1); return; }
  p->fn = fn;
  p->ctx = ctx;
  atomic_store(&p->pending, p->n - 1);
  pthread_mutex_lock(&p->mu);
  atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  fn(ctx, 0, p->n);
  int spins = 0;
  while (atomic_load_explicit(&p->pending, memory_order_acquire) > 0 && spins < SPIN_ROUNDS) {
    spins++;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  if (atomic_load(&p->pending) > 0) {
    pthread_mutex_lock(&p->mu);
    while (atomic_load(&p->pending) > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
  }
}

void gptoss_pool_free(gptoss_pool *p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  p->quit = 1;
  atomic_fetch_add(&p->gen, 1);
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->wake);
  pthread_cond_destroy(&p->done);
  free(p->threads);
  free(p);
}

int gptoss_cpu_count(void) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}
