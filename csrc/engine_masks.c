/*
** engine_masks.c: the next step's grammar masks, computed while the
** forward pass runs.
**
** A constrained request's mask for its next token depends on its grammar's
** state alone, which is known as soon as its last token was sampled. So
** before each forward pass the engine thread hands the constrained
** samplers that will draw after it to a worker thread, which computes
** their masks (gptoss_sampler_prepare: into the matcher's cache of masks
** by state) while the engine thread waits on the pass (the GPU, on CUDA);
** the draw then finds its mask ready. A draw that comes first computes its
** own mask, as without the worker: the sampler's lock orders the two, and
** the worker leaves a sampler that has drawn since it was handed over.
** Either way the mask is the same, so the tokens are too.
*/
#include <stdlib.h>
#include "engine_impl.h"

static void *worker_main(void *arg) {
  engine_masks *w = arg;
  pthread_mutex_lock(&w->mu);
  for (;;) {
    while (!w->stopping && w->posted == w->taken) pthread_cond_wait(&w->go, &w->mu);
    if (w->stopping) break;
    int n = w->n;
    pthread_mutex_unlock(&w->mu);
    double t0 = engine_now();
    uint64_t done = 0;
    for (int k = 0; k < n; k++) done += (uint64_t)gptoss_sampler_prepare(w->smp[k], w->draws[k]);
    double took = engine_now() - t0;
    pthread_mutex_lock(&w->mu);
    w->taken = w->posted;
    w->prepared += done;
    w->busy_s += took;
    pthread_cond_broadcast(&w->done);
  }
  pthread_mutex_unlock(&w->mu);
  return NULL;
}

int engine_masks_start(engine_masks *w, int max_batch) {
  w->smp = malloc(sizeof *w->smp * (size_t)max_batch);
  w->draws = malloc(sizeof *w->draws * (size_t)max_batch);
  if (!w->smp || !w->draws) { free(w->smp); free(w->draws); return 0; }
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->go, NULL);
  pthread_cond_init(&w->done, NULL);
  if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
    pthread_mutex_destroy(&w->mu); pthread_cond_destroy(&w->go); pthread_cond_destroy(&w->done);
    free(w->smp); free(w->draws);
    return 0;
  }
  w->started = 1;
  return 1;
}

void engine_masks_stop(engine_masks *w) {
  if (!w->started) return;
  pthread_mutex_lock(&w->mu);
  w->stopping = 1;
  pthread_cond_signal(&w->go);
  pthread_mutex_unlock(&w->mu);
  pthread_join(w->thread, NULL);
  pthread_mutex_destroy(&w->mu);
  pthread_cond_destroy(&w->go);
  pthread_cond_destroy(&w->done);
  free(w->smp); free(w->draws);
  w->started = 0;
}

void engine_masks_post(engine_masks *w, gptoss_sampler *const *smp, int n) {
  if (!w->started || n == 0) return;
  for (int k = 0; k < n; k++) { w->smp[k] = smp[k]; w->draws[k] = gptoss_sampler_draws(smp[k]); }
  pthread_mutex_lock(&w->mu);
  w->n = n;
  w->posted++;
  pthread_cond_signal(&w->go);
  pthread_mutex_unlock(&w->mu);
}

void engine_masks_wait(engine_masks *w, uint64_t *prepared, double *busy_s) {
  if (!w->started) return;
  pthread_mutex_lock(&w->mu);
  while (w->taken != w->posted) pthread_cond_wait(&w->done, &w->mu);
  *prepared += w->prepared;
  *busy_s += w->busy_s;
  w->prepared = 0;
  w->busy_s = 0;
  pthread_mutex_unlock(&w->mu);
}
