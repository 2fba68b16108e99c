/*
** comm.c: the host communicator of a split model's ranks (split.c): one
** thread per rank in one process, exchanging host buffers through memory
** they share. What the CPU ranks sum their experts' rows with, and what
** the CUDA ranks stage through when two of them share a GPU (NCCL takes
** one rank per GPU).
**
** A sum is three barriers: every rank's buffer is registered; each rank
** adds one slice of the elements over the ranks, in rank order, into the
** shared total; each copies the total back. The third barrier keeps a fast
** rank's next sum from growing the total while a slow one still copies it.
*/
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "backend.h"

typedef struct host_comm {
  gptoss_comm c;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int arrived, generation, aborted;
  float **bufs;                      /* [ranks] each rank's buffer in this sum */
  size_t *ns;                        /* [ranks] its length, which must agree */
  float *total;
  size_t cap;
  int grown;                         /* rank 0 could make total hold the sum */
} host_comm;

/* 0 once every rank has arrived, -1 when the comm is (or gets) aborted */
static int barrier(host_comm *h) {
  pthread_mutex_lock(&h->mu);
  int gen = h->generation;
  if (!h->aborted && ++h->arrived == h->c.ranks) {
    h->arrived = 0;
    h->generation++;
    pthread_cond_broadcast(&h->cv);
  } else
    while (!h->aborted && gen == h->generation) pthread_cond_wait(&h->cv, &h->mu);
  int r = h->aborted ? -1 : 0;
  pthread_mutex_unlock(&h->mu);
  return r;
}

static gptoss_status aborted(void) {
  return gptoss_fail(GPTOSS_ESTATE, "another rank of the split model failed during this pass");
}

static gptoss_status host_sum(gptoss_comm *c, int rank, float *buf, size_t n, void *stream) {
  (void)stream;
  host_comm *h = (host_comm *)c;
  h->bufs[rank] = buf;
  h->ns[rank] = n;
  if (rank == 0) {
    h->grown = 1;
    if (n > h->cap) {
      float *t = realloc(h->total, sizeof(float) * n);
      if (t) { h->total = t; h->cap = n; }
      else h->grown = 0;
    }
  }
  if (barrier(h)) return aborted();
  for (int r = 1; r < c->ranks; r++)
    if (h->ns[r] != h->ns[0])
      return gptoss_fail(GPTOSS_ESTATE, "the ranks of a split model summed %zu and %zu floats", h->ns[0], h->ns[r]);
  if (!h->grown) return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the ranks' sum of %zu floats", n);
  size_t lo = n * (size_t)rank / (size_t)c->ranks, hi = n * (size_t)(rank + 1) / (size_t)c->ranks;
  for (size_t i = lo; i < hi; i++) {
    float s = h->bufs[0][i];
    for (int r = 1; r < c->ranks; r++) s += h->bufs[r][i];
    h->total[i] = s;
  }
  if (barrier(h)) return aborted();
  memcpy(buf, h->total, sizeof(float) * n);
  if (barrier(h)) return aborted();
  return GPTOSS_OK;
}

static void host_abort(gptoss_comm *c) {
  host_comm *h = (host_comm *)c;
  pthread_mutex_lock(&h->mu);
  h->aborted = 1;
  pthread_cond_broadcast(&h->cv);
  pthread_mutex_unlock(&h->mu);
}

static gptoss_status host_reset(gptoss_comm *c) {
  host_comm *h = (host_comm *)c;
  pthread_mutex_lock(&h->mu);
  h->aborted = 0;
  h->arrived = 0;
  pthread_mutex_unlock(&h->mu);
  return GPTOSS_OK;
}

static void host_free(gptoss_comm *c) {
  host_comm *h = (host_comm *)c;
  if (!h) return;
  pthread_mutex_destroy(&h->mu);
  pthread_cond_destroy(&h->cv);
  free(h->bufs); free(h->ns); free(h->total);
  free(h);
}

gptoss_status gptoss_comm_host(int ranks, gptoss_comm **out) {
  *out = NULL;
  if (ranks < 1) return gptoss_fail(GPTOSS_EARG, "a communicator needs at least one rank (got %d)", ranks);
  host_comm *h = calloc(1, sizeof *h);
  if (!h) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  h->bufs = calloc((size_t)ranks, sizeof *h->bufs);
  h->ns = calloc((size_t)ranks, sizeof *h->ns);
  if (!h->bufs || !h->ns) { free(h->bufs); free(h->ns); free(h); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  pthread_mutex_init(&h->mu, NULL);
  pthread_cond_init(&h->cv, NULL);
  h->c.ranks = ranks;
  h->c.sum = host_sum;
  h->c.abort = host_abort;
  h->c.reset = host_reset;
  h->c.free = host_free;
  *out = &h->c;
  return GPTOSS_OK;
}
