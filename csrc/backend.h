/*
** backend.h: the model and session as every backend sees them, and the
** narrow set of operations a backend implements.
**
** The model description (which tensors, in what order the ops run, the KV
** layout) lives in model.c and session.c once; a backend only runs blocks.
*/
#ifndef GPTOSS_BACKEND_H
#define GPTOSS_BACKEND_H

#include "internal.h"

#define GPTOSS_DEVICE_LEN 128            /* a device string's room, its NUL included */

typedef struct gptoss_backend gptoss_backend;
typedef struct gptoss_comm gptoss_comm;

struct gptoss_model {
  gptoss_config cfg;
  gptoss_st *st;
  char *dir;
  char device[GPTOSS_DEVICE_LEN];    /* "cpu", "cuda:N", or a split model's "cuda:0+cuda:1" */
  int device_index;
  /* the experts this model runs, [expert_lo, expert_hi): all of them, or a
     rank's share of a split model (split.c), whose other ranks run the rest;
     then comm joins the ranks and rank is this one's place among them */
  int expert_lo, expert_hi, rank;
  gptoss_comm *comm;
  int context;                       /* max positions per session */
  const gptoss_tensor *embed, *norm, *lm_head;
  const gptoss_tensor *(*layer)[GPTOSS_T_PER_LAYER];   /* [layer][role - GPTOSS_T_LAYER_FIRST] */
  float *inv_freq;                   /* head_dim/2 rotary frequencies (YaRN applied) */
  float rope_scale;                  /* YaRN attention scaling, applied to cos and sin */
  int threads;
  int batch_invariant;               /* gptoss_model_opts.batch_invariant: no fused one-token step */
  const gptoss_backend *be;
  void *bm;                          /* backend state */
  /* a bf16 checkpoint's experts (quantize.c): its mapped matrices, and the
     MXFP4 blocks and scales quantized from them at load, which the layer
     table points at; NULL for an MXFP4 checkpoint */
  const gptoss_tensor *(*experts_bf16)[2];   /* [layer][0: gate_up, 1: down], [E][in][out] */
  struct gptoss_qexperts *experts_q;         /* [layer] */
  uint8_t *experts_q_data;           /* the blocks' and scales' bytes; NULL once a device holds them */
  size_t experts_q_bytes;
};

/* quantize.c: the MXFP4 tensors of one layer made from bf16 experts */
typedef struct gptoss_qexperts {
  gptoss_tensor t[4];                /* gate_up blocks, scales, down blocks, scales */
  char name[4][96];
} gptoss_qexperts;

/* Quantizes every layer's bf16 experts (m->experts_bf16) to MXFP4 in memory
   the model owns, over threads, and points the layer table at them. After
   each layer it calls o->progress with the experts' bytes read so far out
   of total (0 unless report_bytes), stopping when it says so. Refuses a
   non-finite weight, naming its tensor and place. */
gptoss_status gptoss_experts_quantize(gptoss_model *m, int threads, const gptoss_model_opts *o, uint64_t total, int report_bytes);
/* frees the quantized bytes (the layer table's expert tensors then hold NULL data) */
void gptoss_experts_drop(gptoss_model *m);

#define LAYER_T(m, l, role) ((m)->layer[l][(role) - GPTOSS_T_LAYER_FIRST])

struct gptoss_session {
  gptoss_model *m;
  int pos;                           /* tokens in the cache */
  int context;                       /* hard limit on pos */
  int ring;                          /* positions a sliding layer keeps */
  int held_from;                     /* the oldest position a sliding layer still holds: feeds
                                        overwrite ring slots, rewinds do not bring them back */
  int32_t *history;                  /* every token fed, [context] */
  int has_logits;                    /* the last feed left logits to sample from */
  int lost;                          /* a failed feed overwrote keys its window needs (see gptoss_forward) */
  float *logits;                     /* host copy of the last position's logits (CPU backend) */
  int trace;
  int32_t *trace_e;                  /* [trace_cap][layers][k] */
  float *trace_w;
  int trace_n, trace_cap;
  gptoss_adapter *adapter;           /* LoRA applied to this session's tokens, or NULL */
  void *bs;                          /* backend state */
};

/* One forward pass over tokens of several sessions, planned once by
   session.c (gptoss_forward) for every backend: which tokens, at which
   positions, of which session, and which rows give logits. A pass never
   holds two pieces of one session (a session's next chunk must read the
   keys this one writes), never more of one session than its sliding ring
   can hold beside the window it attends to, and never more than the
   backend's max_pass_tokens. */
typedef struct gptoss_plan {
  gptoss_session **ss;               /* the sessions of this pass */
  int nss;
  int T;                             /* tokens */
  const int32_t *ids;                /* [T] */
  const int32_t *pos;                /* [T] absolute position of each token */
  const int32_t *sess;               /* [T] index into ss of each token's session; a session's tokens are consecutive */
  int nout;                          /* rows that give logits */
  const int32_t *rows;               /* [nout] token index of each, ascending */
  float *out;                        /* [nout][vocab] on the host, or NULL (only the kept rows matter) */
  const int32_t *keep;               /* [nss] index into rows of the row that becomes the session's
                                        current logits, or -1 (the session's feed goes on in a later pass) */
} gptoss_plan;

struct gptoss_backend {
  const char *name;
  gptoss_status (*model_init)(gptoss_model *m, const gptoss_model_opts *o);
  void (*model_free)(gptoss_model *m);
  gptoss_status (*session_init)(gptoss_session *s);
  void (*session_free)(gptoss_session *s);
  /* copies into dst (same model; any capacity holding keep positions) the
     keys and values of src's first keep positions that src still holds and
     dst has room for (gptoss_kv_copy_from), slot by slot in each session's
     own ring */
  gptoss_status (*session_copy)(gptoss_session *dst, const gptoss_session *src, int keep);
  /* Runs one pass the engine planned (see gptoss_plan): updates the caches
     at the plan's positions, writes its logits rows and keeps the rows the
     plan names as each session's current logits (for sample()). Session
     state (pos, history) is the engine's: a backend never advances it. */
  gptoss_status (*run)(const gptoss_plan *p);
  int max_pass_tokens;               /* most tokens one pass may hold (the workspace's bound) */
  gptoss_status (*sample)(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *out);
  void (*memory)(const gptoss_model *m, gptoss_memory *out);
  /* optional: feed one token and sample the next in one go (a backend can
     fuse and graph-capture the whole step); NULL = forward + sample */
  gptoss_status (*decode)(gptoss_session *s, int32_t id, gptoss_sampler *smp, int32_t *next);
  /* optional: copies the last position's logits to the host; NULL = s->logits holds them */
  gptoss_status (*logits)(const gptoss_session *s, float *out);
  /* optional: the device bytes a session of this capacity and ring takes
     when opened (a backend that allocates its whole cache up front); NULL:
     caches grow with the positions fed, budgeted by positions */
  uint64_t (*session_bytes)(const gptoss_model *m, int context, int ring);
  /* optional: LoRA training (gptoss_lora_backward's contract); NULL = refused.
     seg0: NULL, or [n] the offset where each token's example begins (packed
     examples: a token attends from there on, at position t - seg0[t]) */
  gptoss_status (*lora_backward)(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                 const int32_t *seg0, double *loss, int *count);
  /* optional: the communicator joining n ranks on these device indices
     (repeats allowed) for a model split over them; NULL = cannot be split */
  gptoss_status (*comm_new)(const int *devices, int n, gptoss_comm **out);
};

extern const gptoss_backend gptoss_cpu_backend;

/* {====================================================== ranks of a split model
** A model split over devices (split.c) runs one rank per device, each a
** whole model but for the experts: attention, router and head run on every
** rank over every token (the same inputs, so the same routing), and each
** rank runs only the (token, choice) rows whose expert it holds, leaving
** zeros in the others. One sum over the ranks then gives every rank every
** row, and since each element is nonzero on one rank at most the sum is
** exact: the combination that follows is the one-device model's, bit for
** bit. */
struct gptoss_comm {
  int ranks;
  /* Rank `rank` calls it at the same point of a pass as every other rank,
     with its own buf of n floats (host memory for a host comm; device
     memory on `stream` for a device comm); when it returns, buf holds the
     element-wise sum over the ranks. Fails at once after an abort. */
  gptoss_status (*sum)(gptoss_comm *c, int rank, float *buf, size_t n, void *stream);
  /* a rank that fails mid-pass wakes the others waiting in sum (their sums
     then fail), until reset, called once every rank has returned */
  void (*abort)(gptoss_comm *c);
  gptoss_status (*reset)(gptoss_comm *c);
  void (*free)(gptoss_comm *c);
};

/* ranks threads of one process exchanging host buffers (comm.c) */
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif
gptoss_status gptoss_comm_host(int ranks, gptoss_comm **out);
#if defined(__GNUC__)
#pragma GCC visibility pop
#endif
/* the split backend over ranks of rank_be (split.c); NULL after failing */
const gptoss_backend *gptoss_split_backend(const gptoss_backend *rank_be);
/* loads rank `rank` of a split model: experts [lo, hi) on o->device (model.c) */
gptoss_status gptoss_model_load_rank(const char *dir, const gptoss_model_opts *o, int lo, int hi, int rank,
                                     gptoss_comm *comm, gptoss_model **out);
/* the backend and device index a single device's name gives (model.c) */
gptoss_status gptoss_device_backend(const char *dev, const gptoss_backend **be, int *index);
/* a split device string's n parts, checked by name (model.c); dev is
   shorter than GPTOSS_DEVICE_LEN (model_load has refused longer ones) */
gptoss_status gptoss_device_parts(const char *dev, char (*part)[GPTOSS_DEVICE_LEN], int max, int *n);
/* }====================================================== */

/* packed examples' starts, as gptoss_lora_backward_packed takes them: fn names the caller in the error (optim.c) */
gptoss_status gptoss_check_starts(const char *fn, const int32_t *starts, int ns, int n);

#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

/* records one token's routing for layer l when tracing (called by backends) */
void gptoss_trace_record(gptoss_session *s, int token_index, int layer, const int32_t *experts, const float *w);
/* grows the trace buffers to hold `extra` more tokens */
gptoss_status gptoss_trace_reserve(gptoss_session *s, int extra);
/* what a backend that samples on its own device needs of a sampler */
const gptoss_sampling *gptoss_sampler_params(const gptoss_sampler *s);
uint64_t gptoss_sampler_draw(gptoss_sampler *s);   /* a fresh 64-bit random value per draw */
/* AdamW's update runs after gptoss_adapter_step returns, a layer at a time
   (see optim.c). gptoss_adapter_module and every other adapter function
   wait for all of it; a backend that reads one layer at a time takes the
   modules with slot (no waiting) and waits for layer l (-1: all) itself. */
void gptoss_adapter_wait(const gptoss_adapter *a, int layer);
const gptoss_lora *gptoss_adapter_slot(const gptoss_adapter *a, int layer, gptoss_lora_module m);
/* adds layer `layer`'s gradients, src (its modules in order, each A's then
   B's, as the host lays them out), to the adapter's over the pool's
   threads, keeping their sums of squares for step's gradient norm; during
   gptoss_lora_backward, from one thread at a time */
void gptoss_adapter_add_grads(gptoss_adapter *a, int layer, const float *src, gptoss_pool *pool);
/* changes whenever A or B may have changed (gptoss_adapter_touch): a
   backend that keeps a device copy compares versions to know when to copy
   them again. Versions are unique across adapters. */
uint64_t gptoss_adapter_version(const gptoss_adapter *a);
/* references held (a backend's cache of device copies drops its own when
   it is the last one) */
int gptoss_adapter_refs(const gptoss_adapter *a);
/* LoRA dropout on the attention projections' inputs during training (the
   masks are a function of seed, step, layer, projection, token and
   feature, so a recomputation sees the same ones) */
double gptoss_adapter_dropout(const gptoss_adapter *a, uint64_t *seed);
#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

/* positions a sliding layer of a session keeps (its ring): window +
   rewind, or the whole context when that is less or no layer slides */
int gptoss_session_ring(const gptoss_config *c, int context, int rewind);

/* The KV slot of absolute position p in a layer: full layers keep every
   position, sliding layers a ring of `ring` (the session's). The one rule,
   for the host and the CUDA kernels alike. */
static inline GPTOSS_HD int gptoss_kv_slot(int sliding, int ring, int p) { return sliding ? p % ring : p; }

/* The first position of a layer that a copy of a session's first keep
   positions moves (session_copy moves [from, keep)): 0 on a full layer; on
   a sliding one the oldest the source still holds (held_from) that the
   destination's ring of rd has room for, so that the copy can be rewound as
   far as its source could (gptoss_session_rewind has checked that the
   window before keep is among them). */
static inline int gptoss_kv_copy_from(int sliding, int keep, int held_from, int rd) {
  if (!sliding) return 0;
  int from = held_from > keep - rd ? held_from : keep - rd;
  return from > 0 ? from : 0;
}

/* how many positions from p on (below hi) sit in consecutive slots both in
   a ring of rs and in one of rd (a full layer: all of them) */
static inline int gptoss_kv_run(int sliding, int rs, int rd, int p, int hi) {
  int n = hi - p;
  if (sliding) {
    if (rs - p % rs < n) n = rs - p % rs;
    if (rd - p % rd < n) n = rd - p % rd;
  }
  return n;
}

/* Feeds counts[i] tokens to ss[i] (ids concatenated) through as many
   passes as the plan rules need, then advances every session. Logits:
   NONE, LAST (one row per session) or ALL (one per token), into out when
   not NULL. What gptoss_session_feed, gptoss_batch_step and the engine
   call. */
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif
/* samples sessions' last logits: the backend's sampler, or on the host for
   samplers under a grammar (session.c) */
gptoss_status gptoss_sample_sessions(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *out);
gptoss_status gptoss_forward(gptoss_session **ss, int nss, const int32_t *ids, const int *counts,
                             gptoss_logits_mode mode, float *out);
#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#endif
