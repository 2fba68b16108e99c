/*
** loader.c: gptoss_model_load (and the tokenizer's) on a thread of its own,
** so that an event loop (nginx's worker, Neovim's) keeps answering while a
** checkpoint loads, and can show how far it got.
**
** The thread owns everything it makes until it ends; it then publishes the
** model, the tokenizer or its error under the mutex and signals the
** descriptor. Progress counters are atomics the caller reads without the
** lock. Errors are per-thread (error.c), so the thread keeps its message
** and take() raises it again on the caller's thread.
*/
#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "internal.h"

struct gptoss_loader {
  pthread_t thread;
  char *dir, *device, *tokenizer;   /* the caller's strings, copied */
  gptoss_model_opts opts;
  _Atomic uint64_t done, total;
  atomic_int cancel, ended;
  int fd[2];                        /* eventfd in both, or a pipe's two ends */
  pthread_mutex_t mu;
  gptoss_model *m;                  /* what the thread made, until taken */
  gptoss_tokenizer *t;
  gptoss_status rc;
  char msg[1024];
  int taken;
};

/* {====================================================== the thread */
static int on_progress(void *ud, uint64_t done, uint64_t total) {
  gptoss_loader *l = ud;
  atomic_store(&l->total, total);
  atomic_store(&l->done, done);
  return atomic_load(&l->cancel);
}

static void *load_main(void *arg) {
  gptoss_loader *l = arg;
  gptoss_model *m = NULL;
  gptoss_tokenizer *t = NULL;
  gptoss_status rc = gptoss_model_load(l->dir, &l->opts, &m);
  if (!rc && l->tokenizer) {
    if (atomic_load(&l->cancel)) rc = gptoss_fail(GPTOSS_ESTATE, "%s: the load was cancelled", l->dir);
    else rc = gptoss_tokenizer_load(l->tokenizer, &t);
    if (rc) { gptoss_model_free(m); m = NULL; }
  }
  pthread_mutex_lock(&l->mu);
  l->m = m;
  l->t = t;
  l->rc = rc;
  if (rc) snprintf(l->msg, sizeof l->msg, "%s", gptoss_errmsg());
  atomic_store(&l->ended, 1);
  pthread_mutex_unlock(&l->mu);
  gptoss_wake_signal(l->fd);   /* never drained: it stays readable */
  return NULL;
}
/* }====================================================== */

/* {====================================================== the caller's side */
static void loader_release(gptoss_loader *l) {
  gptoss_wake_close(l->fd);
  free(l->dir);
  free(l->device);
  free(l->tokenizer);
  free(l);
}

gptoss_status gptoss_loader_start(const char *dir, const gptoss_model_opts *o, const char *tokenizer, gptoss_loader **out) {
  *out = NULL;
  if (!dir) return gptoss_fail(GPTOSS_EARG, "loader: dir is NULL");
  gptoss_loader *l = calloc(1, sizeof *l);
  if (!l) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  l->fd[0] = l->fd[1] = -1;
  if (o) l->opts = *o;
  l->dir = strdup(dir);
  l->device = o && o->device ? strdup(o->device) : NULL;
  l->tokenizer = tokenizer ? strdup(tokenizer) : NULL;
  if (!l->dir || (o && o->device && !l->device) || (tokenizer && !l->tokenizer)) {
    loader_release(l);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  }
  l->opts.device = l->device;
  l->opts.progress = on_progress;
  l->opts.progress_ud = l;
  gptoss_status wrc = gptoss_wake_open(l->fd);
  if (wrc) { loader_release(l); return wrc; }
  pthread_mutex_init(&l->mu, NULL);
  int e = pthread_create(&l->thread, NULL, load_main, l);
  if (e) {
    pthread_mutex_destroy(&l->mu);
    loader_release(l);
    return gptoss_fail(GPTOSS_ENOMEM, "cannot start the loading thread: %s", strerror(e));
  }
  *out = l;
  return GPTOSS_OK;
}

int gptoss_loader_fd(const gptoss_loader *l) { return l->fd[0]; }

int gptoss_loader_progress(const gptoss_loader *l, uint64_t *done, uint64_t *total) {
  if (done) *done = atomic_load(&((gptoss_loader *)l)->done);
  if (total) *total = atomic_load(&((gptoss_loader *)l)->total);
  return atomic_load(&((gptoss_loader *)l)->ended);
}

void gptoss_loader_cancel(gptoss_loader *l) { atomic_store(&l->cancel, 1); }

gptoss_status gptoss_loader_take(gptoss_loader *l, gptoss_model **m, gptoss_tokenizer **t) {
  if (m) *m = NULL;
  if (t) *t = NULL;
  while (!atomic_load(&l->ended)) gptoss_wake_poll(l->fd, 0.1);
  pthread_mutex_lock(&l->mu);
  gptoss_status rc = l->rc;
  if (l->taken) rc = gptoss_fail(GPTOSS_ESTATE, "the loaded model was already taken");
  else if (rc) gptoss_fail(rc, "%s", l->msg);
  else {
    if (m) { *m = l->m; l->m = NULL; }
    if (t) { *t = l->t; l->t = NULL; }
    l->taken = 1;
  }
  pthread_mutex_unlock(&l->mu);
  return rc;
}

void gptoss_loader_free(gptoss_loader *l) {
  if (!l) return;
  gptoss_loader_cancel(l);
  pthread_join(l->thread, NULL);
  gptoss_model_free(l->m);
  gptoss_tokenizer_free(l->t);
  pthread_mutex_destroy(&l->mu);
  loader_release(l);
}
/* }====================================================== */
