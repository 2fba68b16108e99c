/*
** engine_impl.h: the engine's state, shared by engine.c (requests and the
** serving step) and engine_train.c (training jobs run between steps).
*/
#ifndef GPTOSS_ENGINE_IMPL_H
#define GPTOSS_ENGINE_IMPL_H
#include <pthread.h>
#include <time.h>
#include "backend.h"

#define DEFAULT_MAX_BATCH 64
#define DEFAULT_MAX_QUEUE 1024
#define DEFAULT_CHUNK 256
#define DEFAULT_CACHE 16
#define ENGINE_REWIND 512
#define DEFAULT_KV_BLOCK 256
#define LP_STRIDE (1 + GPTOSS_MAX_TOP_LOGPROBS)   /* a sampled token's entry in step_buf.lp */

struct gptoss_request {
  gptoss_engine *e;
  int refs;                        /* the caller's and, until it is done, the engine's; under e->mu */
  /* fixed at submit */
  int32_t *prompt;
  int n_prompt, max_tokens, priority;
  int32_t *stop;
  int n_stop;
  int logprobs, top_logprobs;      /* gptoss_request_opts' */
  gptoss_adapter *adapter;
  gptoss_sampler *smp;
  uint64_t kv_bytes, seq;         /* kv_bytes: budgeted for its session now (under e->mu) */
  int reach, cap_max;              /* prompt + max_tokens within the context; the capacity that holds it */
  int cap;                         /* the capacity its session opens with */
  double t_submit;
  /* the engine thread's alone */
  gptoss_session *s;
  int fed;                         /* prompt tokens in the session */
  int32_t last;                    /* sampled, to be fed next step */
  int ending;                      /* the finish this step decided */
  int waits;                       /* this step: its full session waits for the budget to grow */
  /* shared, under e->mu */
  int state, finish, cancel;
  int32_t *gen;
  gptoss_logprob *lp;              /* with logprobs: 1 + top_logprobs entries per gen token, the token's first */
  size_t gen_n, gen_cap, taken;
  int cached_tokens;
  double t_admit, t_first, t_done;
  char err[256];
};

/* the engine thread's scratch, sized for max_batch when the engine starts */
typedef struct step_buf {
  gptoss_session **ss, **sample_ss;
  gptoss_sampler **smp, **masked;   /* masked: the constrained ones whose masks are computed ahead */
  int32_t *ids, *next;
  int *counts, *who, *sample_who;
  gptoss_request **ended;
  gptoss_session **ended_s;
  gptoss_request **fresh;          /* admitted this step */
  size_t ids_cap;
  gptoss_logprob *lp;              /* [max_batch][LP_STRIDE]: the log-probabilities of this step's samples */
  float *logits;                   /* [vocab], the host copy they are computed from; allocated when first needed */
  char lp_err[256];                /* why this step's log-probabilities failed (lp[k*LP_STRIDE].id is then -1) */
} step_buf;

typedef struct cache_entry {
  gptoss_session *s;
  gptoss_adapter *adapter;         /* compared by identity and version, never dereferenced for more */
  uint64_t version, used, bytes;
} cache_entry;

/* the thread computing the next step's grammar masks during the forward
   pass (engine_masks.c); the engine thread posts a batch and waits for it */
typedef struct engine_masks {
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t go, done;
  gptoss_sampler **smp;            /* [max_batch]: the batch posted, and each one's draws then */
  uint64_t *draws;
  int n, started, stopping;
  uint64_t posted, taken;          /* batches posted, and done */
  uint64_t prepared;               /* masks computed since the last wait, and their seconds */
  double busy_s;
} engine_masks;

struct gptoss_engine {
  gptoss_model *m;
  gptoss_engine_opts o;
  pthread_mutex_t mu;
  pthread_cond_t work, news;
  pthread_t thread;
  int running, stopping, refs;
  int fd[2];                       /* eventfd in both, or a pipe's read and write ends */
  /* under mu */
  gptoss_request **queue, **active;
  int nq, nactive;
  uint64_t seq, kv_active, kv_cached;
  gptoss_engine_stats st;
  double t_start;
  /* the engine thread's alone */
  step_buf b;
  cache_entry *cache;
  int ncache;
  uint64_t tick;
  /* training jobs (engine_train.c): a FIFO under mu; the credit is the
     engine thread's (seconds of training the share allows before the next
     serving step) */
  gptoss_train_job *jobs, *jobs_tail;
  double train_credit, train_last_s;   /* the credit; what the last example took */  engine_masks masks;
};

static inline double engine_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* timeout_s from now on CLOCK_MONOTONIC (e->news's clock), for waits on news */
static inline struct timespec engine_deadline(double timeout_s) {
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  if (!(timeout_s > 0)) timeout_s = 0;
  if (timeout_s > 1e9) timeout_s = 1e9;
  double whole = (double)(time_t)timeout_s;
  until.tv_sec += (time_t)whole;
  until.tv_nsec += (long)((timeout_s - whole) * 1e9);
  if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
  return until;
}

/* engine_train.c, on the engine thread: whether a job waits (under mu),
   and one unit of it run between serving steps (mu not held). idle: no
   request is active, so the share does not apply; step_s: the serving
   step just run, which earns training its share */
int engine_train_pending(const gptoss_engine *e);
int engine_train_count(const gptoss_engine *e);   /* jobs waiting or running; under mu */
void engine_train_between(gptoss_engine *e, int idle, double step_s);
/* engine_masks.c: start (0: it could not) and stop the worker; post the
   samplers that draw after the next forward pass; wait for that batch,
   adding the masks computed and their seconds */
int engine_masks_start(engine_masks *w, int max_batch);
void engine_masks_stop(engine_masks *w);
void engine_masks_post(engine_masks *w, gptoss_sampler *const *smp, int n);
void engine_masks_wait(engine_masks *w, uint64_t *prepared, double *busy_s);
/* frees what the engine holds once its last reference is gone (engine.c) */
void engine_release(gptoss_engine *e);
/* at stop, with the thread gone: every job left ends cancelled */
void engine_train_stop(gptoss_engine *e);
#endif
