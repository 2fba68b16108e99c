// backend.cu: the CUDA backend: weight upload, sessions and their KV caches,
// the general forward pass (prefill, batched decode), the graph-captured
// batch-1 decode step, sampling, and memory accounting.
//
// Shapes and order of operations follow csrc/cpu/forward.c, the reference
// this backend is tested against.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cublas_v2.h>
#include "common.cuh"

// {====================================================== errors
static int g_broken;   // a sticky CUDA error: the context is lost

static bool sticky(cudaError_t e) {
  return e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure || e == cudaErrorIllegalInstruction ||
         e == cudaErrorMisalignedAddress || e == cudaErrorHardwareStackError || e == cudaErrorAssert ||
         e == cudaErrorInvalidPc || e == cudaErrorLaunchTimeout || e == cudaErrorECCUncorrectable;
}

gptoss_status cuda_fail(cudaError_t e, const char *what, const char *file, int line) {
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();   // not sticky: clear it, the model stays usable
    return gptoss_fail(GPTOSS_ENOMEM, "CUDA out of memory (%s)", what);
  }
  if (sticky(e)) g_broken = 1;
  return gptoss_fail(GPTOSS_EDEVICE, "CUDA error %s: %s (%s at %s:%d)%s", cudaGetErrorName(e), cudaGetErrorString(e),
                     what, file, line, g_broken ? "; the device context is lost: close the model and load it again" : "");
}

gptoss_status cuda_blas_fail(cublasStatus_t st, const char *what) {
  if (st == CUBLAS_STATUS_ALLOC_FAILED) return gptoss_fail(GPTOSS_ENOMEM, "cuBLAS out of memory (%s)", what);
  return gptoss_fail(GPTOSS_EDEVICE, "cuBLAS error %d in %s", (int)st, what);
}
// after a batch of launches: a bad launch configuration shows up here
#define LAUNCHED() CU(cudaGetLastError())
// }======================================================

// {====================================================== profiling
// GPTOSS_PROFILE=1: stages are timed with events between launches (the
// decode step then runs without its graph) and the totals print when the
// model is closed. GPTOSS_PROFILE_TIMELINE=FILE also appends each mark of
// each flush to FILE: its label, when the host queued it and when the GPU
// reached it (ms from the flush's first mark); where the two meet, the GPU
// was waiting for the host.
#define PROF_MAX 64
#define PROF_EVENTS 2048   // a training step marks about 700
struct prof {
  int on, n;
  const char *label[PROF_MAX];
  double ms[PROF_MAX];
  long calls[PROF_MAX];
  cudaEvent_t ev[PROF_EVENTS];
  int ev_label[PROF_EVENTS], nev;
  double host[PROF_EVENTS];  // when each mark was queued
  long flushes;
};
static prof g_prof;

static int prof_label(const char *label) {
  int k = 0;
  while (k < g_prof.n && strcmp(g_prof.label[k], label) != 0) k++;
  if (k == g_prof.n && g_prof.n < PROF_MAX) g_prof.label[g_prof.n++] = label;
  return k;
}

void cuda_prof_host(const char *label, double ms) {
  if (!g_prof.on) return;
  int k = prof_label(label);
  if (k == PROF_MAX) return;
  g_prof.ms[k] += ms;
  g_prof.calls[k]++;
}

void cuda_prof_mark(const char *label, cudaStream_t s) {
  if (!g_prof.on || g_prof.nev >= PROF_EVENTS) return;
  int k = prof_label(label);
  if (!g_prof.ev[g_prof.nev]) cudaEventCreate(&g_prof.ev[g_prof.nev]);
  cudaEventRecord(g_prof.ev[g_prof.nev], s);
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  g_prof.host[g_prof.nev] = ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  g_prof.ev_label[g_prof.nev++] = k;
}

// the time between consecutive marks belongs to the later mark's label
void cuda_prof_flush(void) {
  if (!g_prof.on || g_prof.nev < 2) { g_prof.nev = 0; return; }
  cudaEventSynchronize(g_prof.ev[g_prof.nev - 1]);
  for (int i = 1; i < g_prof.nev; i++) {
    float ms = 0;
    cudaEventElapsedTime(&ms, g_prof.ev[i - 1], g_prof.ev[i]);
    g_prof.ms[g_prof.ev_label[i]] += ms;
    g_prof.calls[g_prof.ev_label[i]]++;
  }
  const char *path = getenv("GPTOSS_PROFILE_TIMELINE");
  FILE *f = path && *path ? fopen(path, "a") : NULL;
  if (f) {
    for (int i = 0; i < g_prof.nev; i++) {
      float ms = 0;
      cudaEventElapsedTime(&ms, g_prof.ev[0], g_prof.ev[i]);
      fprintf(f, "%ld %4d %-26s host %9.3f gpu %9.3f\n", g_prof.flushes, i, g_prof.label[g_prof.ev_label[i]],
              g_prof.host[i] - g_prof.host[0], ms);
    }
    fclose(f);
  }
  g_prof.flushes++;
  g_prof.nev = 0;
}

static void prof_print(void) {
  if (!g_prof.on || !g_prof.n) return;
  double total = 0;
  for (int k = 0; k < g_prof.n; k++)
    if (strncmp(g_prof.label[k], "host ", 5)) total += g_prof.ms[k];
  fprintf(stderr, "gptoss profile (ms total, calls, %% of the GPU's timed total; host: the host's own wall time):\n");
  for (int k = 0; k < g_prof.n; k++)
    fprintf(stderr, "  %-26s %10.3f %8ld %6.1f%%\n", g_prof.label[k], g_prof.ms[k], g_prof.calls[k],
            strncmp(g_prof.label[k], "host ", 5) ? 100 * g_prof.ms[k] / total : 0.0);
  memset(g_prof.ms, 0, sizeof g_prof.ms);
  memset(g_prof.calls, 0, sizeof g_prof.calls);
}
// }======================================================

#define BLAS_WS ((size_t)32 << 20)   // what NVIDIA suggests for Hopper

// {====================================================== state
struct cuda_model {
  int dev;
  cudaStream_t stream;
  cublasHandle_t blas;
  void *blas_ws;                           // BLAS_WS bytes, cuBLAS's workspace
  char *arena;
  size_t arena_bytes;
  dlayer layer[CUDA_MAX_LAYERS];
  const bf16 *embed, *norm, *lm_head;
  float *inv_freq;
  dims d;
  int sms;
  size_t budget, kv_bytes, ws_bytes;
  // general forward workspace, for up to ws_tokens tokens and ws_sess sessions
  int ws_tokens, ws_sess, ws_out;
  int ws_gen;                              // bumped when the workspace moves: graphs must be captured again
  float *x, *qkv, *q, *att, *tmp, *rl, *y, *wts, *part_ml, *part_acc, *logits, *act;
  bf16 *xn, *xn_lo, *att16, *att_lo;
  int split;                               // split-bf16 activations in the GEMMs (precision "exact", "mixed")
  int split_bwd;                           // and in the training backward's ("exact")
  int32_t *ids, *tok_pos, *tok_sess, *sel, *rows;
  const dsess **sess_arr;
  moe_work mw;
  int32_t *trace_sel; float *trace_w;    // [L][ws_tokens][K]
  char *ws;                                // the workspace allocation
  // host staging for per-call inputs
  int32_t *h_ints;                         // pinned: ids | pos | sess | rows
  // sampling
  sampler_work sw;
  gpu_sampling *params_dev, *params_host;  // [ws_sess]
  int32_t *out_dev, *out_host;             // [ws_sess]
  const int32_t **hist_arr; int32_t *hist_len;
  // LoRA training (train.cu)
  void *train;
  size_t train_bytes;
  // adapters' device copies for sessions that use them (lora.cu)
  lora_cache *lora;
};

struct cuda_session {
  dsess view;
  dsess *dev;
  char *kv;
  size_t kv_bytes;
  float *logits;          // device [V]: the last position's logits
  int32_t *hist;          // device copy of the token history [context]
  int32_t *hist_len;      // device [1]
  // the batch-1 decode step, as a CUDA graph
  int32_t *step;          // device {token, pos}
  int32_t *step_host;     // pinned {token, pos}
  gpu_sampling *params;   // device [1]
  gpu_sampling *params_host;   // pinned
  int32_t *next;          // device [1]
  int32_t *next_host;     // pinned [1]
  const int32_t **hist_ptr;    // device [1] -> hist
  float *d_qkv, *d_q, *d_att, *d_rl, *d_w, *d_act, *d_ml, *d_acc;
  float *d_xnf;           // the normalised MoE input, fp32
  float *d_x;
  int32_t *d_sel;
  char *dec;              // the decode scratch allocation
  // LoRA in the decode step (the session's adapter): the table pointer
  // (pinned staging in step_host), rank products, deltas, expert slots
  // 0..K-1, the attention input normalised (bf16 hi + lo)
  char *ldec;
  const dlora_mod **l_tok, **l_tok_host;
  float *l_u, *l_delta;
  int32_t *l_slots;
  bf16 *l_xn, *l_xl;
  cudaGraphExec_t graph;
  int graph_lora;         // the adapter rank it was captured with (0: none)
  int graph_kind;         // which sampling the graph was captured with
  int graph_gen;          // the workspace generation it was captured in
  int nsplit_full;
};

static cuda_model *CM(const gptoss_model *m) { return (cuda_model *)m->bm; }
static cuda_session *CS(const gptoss_session *s) { return (cuda_session *)s->bs; }

#define ALIGN(x) (((x) + 255) & ~(size_t)255)
// at most this many (token, expert) rows per expert on average take the
// small-M MoE path (measured: 8 sessions 372 -> 542 tok/s; at 4 or 8 rows
// per expert the CUDA-core path lost to the 64-row tensor-core tiles)
#define MOE_SMALL_ROWS 2
// }======================================================

// {====================================================== upload
struct stage_job {
  const char *src;
  char *dst;
  size_t n;
};

static void stage_copy(void *ctx, int tid, int nth) {
  stage_job *j = (stage_job *)ctx;
  size_t per = (j->n + nth - 1) / nth, lo = per * tid, hi = lo + per < j->n ? lo + per : j->n;
  if (lo < hi) memcpy(j->dst + lo, j->src + lo, hi - lo);
}

struct upload_item { const void *src; size_t n, off; };

// Copies tensors into the arena through two pinned buffers: while one chunk
// crosses PCIe, the pool copies the next out of the mapped file.
static gptoss_status upload(cuda_model *cm, const upload_item *items, int n, int threads) {
  const size_t CHUNK = (size_t)64 << 20;
  char *pinned[2] = {NULL, NULL};
  cudaEvent_t done[2] = {NULL, NULL};
  gptoss_status rc = GPTOSS_OK;
  gptoss_pool *pool = gptoss_pool_new(threads > 16 ? 16 : threads);
  int cur = 0;
  cudaError_t e = cudaHostAlloc((void **)&pinned[0], CHUNK, cudaHostAllocDefault);
  if (e == cudaSuccess) e = cudaHostAlloc((void **)&pinned[1], CHUNK, cudaHostAllocDefault);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&done[0], cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&done[1], cudaEventDisableTiming);
  if (e != cudaSuccess) { rc = cuda_fail(e, "pinned staging buffers", __FILE__, __LINE__); goto out; }
  for (int i = 0; i < n && !rc; i++) {
    const char *src = (const char *)items[i].src;
    for (size_t off = 0; off < items[i].n && !rc; off += CHUNK) {
      size_t len = items[i].n - off < CHUNK ? items[i].n - off : CHUNK;
      e = cudaEventSynchronize(done[cur]);     // the buffer's previous copy finished
      if (e != cudaSuccess) { rc = cuda_fail(e, "staging", __FILE__, __LINE__); break; }
      stage_job j = {src + off, pinned[cur], len};
      gptoss_pool_run(pool, stage_copy, &j);
      e = cudaMemcpyAsync(cm->arena + items[i].off + off, pinned[cur], len, cudaMemcpyHostToDevice, cm->stream);
      if (e == cudaSuccess) e = cudaEventRecord(done[cur], cm->stream);
      if (e != cudaSuccess) { rc = cuda_fail(e, "weight upload", __FILE__, __LINE__); break; }
      cur ^= 1;
    }
  }
  if (!rc) { e = cudaStreamSynchronize(cm->stream); if (e != cudaSuccess) rc = cuda_fail(e, "weight upload", __FILE__, __LINE__); }
out:
  for (int i = 0; i < 2; i++) {
    if (done[i]) cudaEventDestroy(done[i]);
    if (pinned[i]) cudaFreeHost(pinned[i]);
  }
  gptoss_pool_free(pool);
  return rc;
}
// }======================================================

// {====================================================== workspace
static void free_workspace(cuda_model *cm) {
  if (cm->ws) cudaFree(cm->ws);
  if (cm->h_ints) cudaFreeHost(cm->h_ints);
  if (cm->params_host) cudaFreeHost(cm->params_host);
  if (cm->out_host) cudaFreeHost(cm->out_host);
  cm->ws = NULL; cm->h_ints = NULL; cm->params_host = NULL; cm->out_host = NULL;
  cm->ws_tokens = cm->ws_sess = 0;
  cm->ws_bytes = 0;
  cm->ws_gen++;
}

// (Re)allocates the general workspace for T tokens of up to S sessions.
static gptoss_status ensure_workspace(cuda_model *cm, int T, int S) {
  if (T <= cm->ws_tokens && S <= cm->ws_sess) return GPTOSS_OK;
  int nt = T > cm->ws_tokens ? T : cm->ws_tokens, ns = S > cm->ws_sess ? S : cm->ws_sess;
  if (ns < 64) ns = 64;
  free_workspace(cm);
  const dims &d = cm->d;
  size_t TK = (size_t)nt * d.K;
  int outrows = 64;
  // attention partials: T <= 64 tokens may split their keys up to 64 ways
  size_t prows = (size_t)(nt > 64 * 64 ? nt : 64 * 64) * d.Hq;
  size_t sz[] = {
    sizeof(float) * nt * d.H,                     // x
    sizeof(float) * nt * (d.Q + 2 * d.KV),        // qkv
    sizeof(float) * nt * d.Q,                     // q
    sizeof(float) * nt * d.Q,                     // att
    sizeof(float) * nt * (d.H > d.E ? d.H : d.E), // tmp
    sizeof(float) * nt * d.E,                     // rl
    sizeof(float) * TK * d.H,                     // y
    sizeof(float) * TK,                           // wts
    sizeof(float) * 2 * prows,                    // part_ml
    sizeof(float) * (size_t)d.D * prows,          // part_acc
    sizeof(float) * (size_t)outrows * d.V,        // logits
    sizeof(float) * TK * d.I,                     // act
    sizeof(bf16) * nt * d.H, sizeof(bf16) * nt * d.H,   // xn, xn_lo
    sizeof(bf16) * nt * d.Q, sizeof(bf16) * nt * d.Q,   // att16, att_lo
    sizeof(int32_t) * nt, sizeof(int32_t) * nt, sizeof(int32_t) * nt, sizeof(int32_t) * TK, sizeof(int32_t) * nt,
    sizeof(dsess *) * ns,
    sizeof(int32_t) * (d.E + 1) * 4 + sizeof(int32_t) * TK,  // moe work
    sizeof(int32_t) * (size_t)d.L * TK, sizeof(float) * (size_t)d.L * TK,   // trace
    cm->sw.cub_bytes, sizeof(float) * d.V * 2, sizeof(int32_t) * d.V * 2,   // sampler sort
    sizeof(float) * 64 * ns, sizeof(int32_t) * 64 * ns,                     // argmax partials
    sizeof(int32_t) * 4096, sizeof(float) * 4096,                           // logit bias
    sizeof(gpu_sampling) * ns, sizeof(int32_t) * ns, sizeof(int32_t *) * ns, sizeof(int32_t) * ns,
  };
  size_t total = 0;
  for (size_t i = 0; i < sizeof sz / sizeof sz[0]; i++) total += ALIGN(sz[i]);
  if (cm->budget && cm->arena_bytes + cm->kv_bytes + total > cm->budget)
    return gptoss_fail(GPTOSS_ENOMEM, "a forward pass of %d tokens needs %.1f MB of workspace beyond the memory budget of %.1f MB",
                       T, total / 1e6, cm->budget / 1e6);
  CU(cudaMalloc((void **)&cm->ws, total));
  char *p = cm->ws;
  size_t k = 0;
#define TAKE(ptr, type) do { ptr = (type)p; p += ALIGN(sz[k]); k++; } while (0)
  TAKE(cm->x, float *); TAKE(cm->qkv, float *); TAKE(cm->q, float *); TAKE(cm->att, float *); TAKE(cm->tmp, float *);
  TAKE(cm->rl, float *); TAKE(cm->y, float *); TAKE(cm->wts, float *); TAKE(cm->part_ml, float *); TAKE(cm->part_acc, float *);
  TAKE(cm->logits, float *); TAKE(cm->act, float *); TAKE(cm->xn, bf16 *); TAKE(cm->xn_lo, bf16 *);
  TAKE(cm->att16, bf16 *); TAKE(cm->att_lo, bf16 *);
  TAKE(cm->ids, int32_t *); TAKE(cm->tok_pos, int32_t *); TAKE(cm->tok_sess, int32_t *); TAKE(cm->sel, int32_t *);
  TAKE(cm->rows, int32_t *); TAKE(cm->sess_arr, const dsess **);
  int32_t *mw;
  TAKE(mw, int32_t *);
  cm->mw.counts = mw; cm->mw.offsets = mw + (d.E + 1); cm->mw.tile_offsets = mw + 2 * (d.E + 1);
  cm->mw.cursor = mw + 3 * (d.E + 1); cm->mw.perm = mw + 4 * (d.E + 1);
  TAKE(cm->trace_sel, int32_t *); TAKE(cm->trace_w, float *);
  TAKE(cm->sw.cub_temp, void *);
  float *keys; int32_t *idx;
  TAKE(keys, float *); TAKE(idx, int32_t *);
  cm->sw.keys_in = keys; cm->sw.keys_out = keys + d.V; cm->sw.idx_in = idx; cm->sw.idx_out = idx + d.V;
  TAKE(cm->sw.partial_f, float *); TAKE(cm->sw.partial_i, int32_t *);
  TAKE(cm->sw.bias_ids, int32_t *); TAKE(cm->sw.bias_vals, float *);
  TAKE(cm->params_dev, gpu_sampling *); TAKE(cm->out_dev, int32_t *); TAKE(cm->hist_arr, const int32_t **);
  TAKE(cm->hist_len, int32_t *);
#undef TAKE
  cudaError_t e = cudaHostAlloc((void **)&cm->h_ints, sizeof(int32_t) * (size_t)nt * 4, cudaHostAllocDefault);
  if (e == cudaSuccess) e = cudaHostAlloc((void **)&cm->params_host, sizeof(gpu_sampling) * ns, cudaHostAllocDefault);
  if (e == cudaSuccess) e = cudaHostAlloc((void **)&cm->out_host, sizeof(int32_t) * ns, cudaHostAllocDefault);
  if (e != cudaSuccess) { free_workspace(cm); return cuda_fail(e, "pinned workspace", __FILE__, __LINE__); }
  cm->ws_tokens = nt;
  cm->ws_sess = ns;
  cm->ws_out = outrows;
  cm->ws_bytes = total;
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== model
static gptoss_status cuda_model_init(gptoss_model *m, const gptoss_model_opts *o) {
  if (g_broken) return gptoss_fail(GPTOSS_EDEVICE, "an earlier CUDA error lost the device context; restart the process");
  const gptoss_config *c = &m->cfg;
  if (c->hidden_size % 64 || (2 * c->intermediate_size) % 64 || c->num_experts_per_tok > 32 || c->num_local_experts > 256 || c->head_dim > 256 ||
      c->num_attention_heads / c->num_key_value_heads > 32 || (c->num_attention_heads * c->head_dim) % 8)
    return gptoss_fail(GPTOSS_EUNSUP, "the CUDA backend needs hidden_size and 2*intermediate_size multiples of 64, "
                       "at most 256 experts and 32 per token, head_dim <= 256 and at most 32 query heads per kv head");
  int ndev = 0;
  cudaError_t e = cudaGetDeviceCount(&ndev);
  if (e != cudaSuccess || ndev == 0) return gptoss_fail(GPTOSS_EUNSUP, "no CUDA device (%s)", e ? cudaGetErrorString(e) : "none found");
  if (m->device_index >= ndev) return gptoss_fail(GPTOSS_EARG, "device cuda:%d does not exist (%d devices)", m->device_index, ndev);
  cuda_model *cm = (cuda_model *)calloc(1, sizeof *cm);
  if (!cm) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  m->bm = cm;
  cm->dev = m->device_index;
  const char *pe = getenv("GPTOSS_PROFILE");
  g_prof.on = pe && *pe && strcmp(pe, "0") != 0;
  CU(cudaSetDevice(cm->dev));
  CU(cudaDeviceGetAttribute(&cm->sms, cudaDevAttrMultiProcessorCount, cm->dev));
  CU(cudaStreamCreateWithFlags(&cm->stream, cudaStreamNonBlocking));
  BLAS(cublasCreate(&cm->blas));
  BLAS(cublasSetStream(cm->blas, cm->stream));
  // cuBLAS's own workspace pool would allocate (and synchronise the device)
  // inside GEMM calls; a workspace of our own keeps prefill asynchronous.
  // Set after the stream, which resets it.
  CU(cudaMalloc(&cm->blas_ws, BLAS_WS));
  BLAS(cublasSetWorkspace(cm->blas, cm->blas_ws, BLAS_WS));
  dims &d = cm->d;
  d.H = c->hidden_size; d.I = c->intermediate_size; d.L = c->num_hidden_layers; d.Hq = c->num_attention_heads;
  d.Hkv = c->num_key_value_heads; d.D = c->head_dim; d.Q = d.Hq * d.D; d.KV = d.Hkv * d.D; d.E = c->num_local_experts;
  d.K = c->num_experts_per_tok; d.V = c->vocab_size; d.window = c->sliding_window; d.eps = (float)c->rms_norm_eps;
  d.limit = (float)c->swiglu_limit; d.rope_scale = m->rope_scale;
  cm->split = !o->fast;
  cm->split_bwd = cm->split && !o->bf16_backward;
  d.kv32 = !o->fast;
  size_t free_b, total_b;
  CU(cudaMemGetInfo(&free_b, &total_b));
  // a budget given covers cuBLAS's workspace too, which is already taken
  if (o->memory_budget) cm->budget = o->memory_budget > BLAS_WS ? o->memory_budget - BLAS_WS : 1;
  else cm->budget = (size_t)(free_b * 0.9);

  // arena layout: every tensor at a 256-byte boundary; q, k, v of a layer
  // back to back so that they are one [Q + 2 KV, H] matrix
  int L = d.L, nit = 0;
  upload_item *items = (upload_item *)calloc((size_t)L * 20 + 4, sizeof *items);
  if (!items) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  size_t off = 0;
  size_t qkv_w_off[CUDA_MAX_LAYERS], qkv_b_off[CUDA_MAX_LAYERS];
  size_t lo[CUDA_MAX_LAYERS][GPTOSS_T_PER_LAYER];
  for (int l = 0; l < L; l++) {
    for (int r = 0; r < GPTOSS_T_PER_LAYER; r++) {
      int role = r + GPTOSS_T_LAYER_FIRST;
      const gptoss_tensor *t = m->layer[l][r];
      if (role == GPTOSS_T_K_W || role == GPTOSS_T_V_W || role == GPTOSS_T_K_B || role == GPTOSS_T_V_B) continue;
      if (role == GPTOSS_T_Q_W || role == GPTOSS_T_Q_B) {
        int w = role == GPTOSS_T_Q_W;
        const gptoss_tensor *k = LAYER_T(m, l, w ? GPTOSS_T_K_W : GPTOSS_T_K_B), *v = LAYER_T(m, l, w ? GPTOSS_T_V_W : GPTOSS_T_V_B);
        (w ? qkv_w_off : qkv_b_off)[l] = off;
        items[nit++] = {t->data, t->nbytes, off};
        items[nit++] = {k->data, k->nbytes, off + t->nbytes};
        items[nit++] = {v->data, v->nbytes, off + t->nbytes + k->nbytes};
        off = ALIGN(off + t->nbytes + k->nbytes + v->nbytes);
        continue;
      }
      lo[l][r] = off;
      items[nit++] = {t->data, t->nbytes, off};
      off = ALIGN(off + t->nbytes);
    }
  }
  size_t embed_off = off;
  items[nit++] = {m->embed->data, m->embed->nbytes, off};
  off = ALIGN(off + m->embed->nbytes);
  size_t norm_off = off;
  items[nit++] = {m->norm->data, m->norm->nbytes, off};
  off = ALIGN(off + m->norm->nbytes);
  size_t head_off = embed_off;
  if (m->lm_head != m->embed) {
    head_off = off;
    items[nit++] = {m->lm_head->data, m->lm_head->nbytes, off};
    off = ALIGN(off + m->lm_head->nbytes);
  }
  size_t rope_off = off;
  off = ALIGN(off + sizeof(float) * (size_t)(d.D / 2));
  cm->arena_bytes = off;
  if (off > cm->budget) {
    free(items);
    return gptoss_fail(GPTOSS_ENOMEM, "the weights need %.2f GB but the memory budget is %.2f GB (free %.2f GB)",
                       off / 1e9, cm->budget / 1e9, free_b / 1e9);
  }
  e = cudaMalloc((void **)&cm->arena, off);
  if (e != cudaSuccess) { free(items); return cuda_fail(e, "weight arena", __FILE__, __LINE__); }
  gptoss_status rc = upload(cm, items, nit, m->threads);
  free(items);
  if (rc) return rc;
  CU(cudaMemcpy(cm->arena + rope_off, m->inv_freq, sizeof(float) * (size_t)(d.D / 2), cudaMemcpyHostToDevice));
  cm->inv_freq = (float *)(cm->arena + rope_off);
  for (int l = 0; l < L; l++) {
    dlayer &y = cm->layer[l];
#define AT(role, type) ((type)(cm->arena + lo[l][(role) - GPTOSS_T_LAYER_FIRST]))
    y.attn_norm = AT(GPTOSS_T_ATTN_NORM, const bf16 *);
    y.mlp_norm = AT(GPTOSS_T_MLP_NORM, const bf16 *);
    y.qkv_w = (const bf16 *)(cm->arena + qkv_w_off[l]);
    y.qkv_b = (const bf16 *)(cm->arena + qkv_b_off[l]);
    y.o_w = AT(GPTOSS_T_O_W, const bf16 *); y.o_b = AT(GPTOSS_T_O_B, const bf16 *);
    y.sinks = AT(GPTOSS_T_SINKS, const bf16 *);
    y.router_w = AT(GPTOSS_T_ROUTER_W, const bf16 *); y.router_b = AT(GPTOSS_T_ROUTER_B, const bf16 *);
    y.gu_blocks = AT(GPTOSS_T_GU_BLOCKS, const uint8_t *); y.gu_scales = AT(GPTOSS_T_GU_SCALES, const uint8_t *);
    y.gu_bias = AT(GPTOSS_T_GU_BIAS, const bf16 *);
    y.dn_blocks = AT(GPTOSS_T_DN_BLOCKS, const uint8_t *); y.dn_scales = AT(GPTOSS_T_DN_SCALES, const uint8_t *);
    y.dn_bias = AT(GPTOSS_T_DN_BIAS, const bf16 *);
#undef AT
  }
  cm->embed = (const bf16 *)(cm->arena + embed_off);
  cm->norm = (const bf16 *)(cm->arena + norm_off);
  cm->lm_head = (const bf16 *)(cm->arena + head_off);
  cm->sw.cub_bytes = sampler_cub_bytes(d.V);
  return ensure_workspace(cm, 64, 64);
}

static void cuda_model_free(gptoss_model *m) {
  cuda_model *cm = CM(m);
  if (!cm) return;
  prof_print();
  cudaSetDevice(cm->dev);
  if (cm->stream) cudaStreamSynchronize(cm->stream);
  free_workspace(cm);
  lora_cache_free(cm->lora);
  cuda_train_free(cm->train);
  if (cm->arena) cudaFree(cm->arena);
  if (cm->blas) cublasDestroy(cm->blas);
  if (cm->blas_ws) cudaFree(cm->blas_ws);
  if (cm->stream) cudaStreamDestroy(cm->stream);
  free(cm);
  m->bm = NULL;
}

static void cuda_memory(const gptoss_model *m, gptoss_memory *out) {
  cuda_model *cm = CM(m);
  out->weights = cm->arena_bytes;
  out->kv = cm->kv_bytes;
  out->workspace = cm->ws_bytes + cm->train_bytes + lora_cache_bytes(cm->lora) + BLAS_WS;
  out->total = out->weights + out->kv + out->workspace;
  size_t f = 0, t = 0;
  if (cudaSetDevice(cm->dev) == cudaSuccess && cudaMemGetInfo(&f, &t) == cudaSuccess) { out->device_free = f; out->device_total = t; }
}
// }======================================================

// {====================================================== sessions
static int layer_slots(const gptoss_session *s, int l) { return s->m->cfg.layer_sliding[l] ? s->ring : s->context; }
static size_t kv_size(const cuda_model *cm) { return cm->d.kv32 ? sizeof(float) : sizeof(__half); }

static void session_release(cuda_session *cs, cuda_model *cm) {
  if (cs->graph) cudaGraphExecDestroy(cs->graph);
  if (cs->kv) cudaFree(cs->kv);
  if (cs->dec) cudaFree(cs->dec);
  if (cs->ldec) cudaFree(cs->ldec);
  if (cs->step_host) cudaFreeHost(cs->step_host);
  if (cm) cm->kv_bytes -= cs->kv_bytes;
  free(cs);
}

static gptoss_status cuda_session_init(gptoss_session *s) {
  cuda_model *cm = CM(s->m);
  if (g_broken) return gptoss_fail(GPTOSS_EDEVICE, "an earlier CUDA error lost the device context; reload the model");
  const dims &d = cm->d;
  CU(cudaSetDevice(cm->dev));
  cuda_session *cs = (cuda_session *)calloc(1, sizeof *cs);
  if (!cs) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  size_t kv = 0;
  for (int l = 0; l < d.L; l++) kv += 2 * ALIGN(kv_size(cm) * (size_t)layer_slots(s, l) * d.KV);
  size_t extra = ALIGN(sizeof(float) * d.V) + ALIGN(sizeof(int32_t) * s->context) + ALIGN(sizeof(dsess)) + 256;
  if (cm->budget && cm->arena_bytes + cm->kv_bytes + cm->ws_bytes + kv + extra > cm->budget) {
    free(cs);
    return gptoss_fail(GPTOSS_ENOMEM, "a session of %d positions needs %.1f MB of KV cache; the memory budget of %.2f GB "
                       "has %.1f MB left", s->context, (kv + extra) / 1e6, cm->budget / 1e9,
                       ((double)cm->budget - (double)(cm->arena_bytes + cm->kv_bytes + cm->ws_bytes)) / 1e6);
  }
  cudaError_t e = cudaMalloc((void **)&cs->kv, kv + extra);
  if (e != cudaSuccess) { free(cs); return cuda_fail(e, "KV cache", __FILE__, __LINE__); }
  cs->kv_bytes = kv + extra;
  cm->kv_bytes += cs->kv_bytes;
  char *p = cs->kv;
  for (int l = 0; l < d.L; l++) {
    size_t b = ALIGN(kv_size(cm) * (size_t)layer_slots(s, l) * d.KV);
    cs->view.k[l] = p; p += b;
    cs->view.v[l] = p; p += b;
  }
  cs->view.ring = s->ring;
  cs->logits = (float *)p; p += ALIGN(sizeof(float) * d.V);
  cs->hist = (int32_t *)p; p += ALIGN(sizeof(int32_t) * s->context);
  cs->dev = (dsess *)p;
  s->bs = cs;
  e = cudaMemcpy(cs->dev, &cs->view, sizeof(dsess), cudaMemcpyHostToDevice);
  if (e != cudaSuccess) { s->bs = NULL; session_release(cs, cm); return cuda_fail(e, "session", __FILE__, __LINE__); }
  return GPTOSS_OK;
}

static void cuda_session_free(gptoss_session *s) {
  cuda_session *cs = CS(s);
  if (!cs) return;
  cuda_model *cm = CM(s->m);
  cudaSetDevice(cm->dev);
  cudaStreamSynchronize(cm->stream);
  session_release(cs, cm);
  s->bs = NULL;
}

static gptoss_status cuda_session_copy(gptoss_session *dst, const gptoss_session *src) {
  cuda_model *cm = CM(src->m);
  cuda_session *d = CS(dst), *s = CS(src);
  for (int l = 0; l < cm->d.L; l++) {
    size_t b = kv_size(cm) * (size_t)layer_slots(src, l) * cm->d.KV;
    CU(cudaMemcpyAsync(d->view.k[l], s->view.k[l], b, cudaMemcpyDeviceToDevice, cm->stream));
    CU(cudaMemcpyAsync(d->view.v[l], s->view.v[l], b, cudaMemcpyDeviceToDevice, cm->stream));
  }
  CU(cudaMemcpyAsync(d->logits, s->logits, sizeof(float) * cm->d.V, cudaMemcpyDeviceToDevice, cm->stream));
  CU(cudaMemcpyAsync(d->hist, s->hist, sizeof(int32_t) * src->pos, cudaMemcpyDeviceToDevice, cm->stream));
  CU(cudaStreamSynchronize(cm->stream));
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== general forward
// Y[T, out] = X[T, in] . W^T, W row-major [out, in] bf16, Y fp32; with
// X_lo (split bf16) Y += X_lo . W^T in a second product
static gptoss_status gemm(cuda_model *cm, const bf16 *W, const bf16 *X, const bf16 *X_lo, float *Y, int out, int T, int in) {
  const float one = 1.f, zero = 0.f;
  BLAS(cublasGemmEx(cm->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, &one, W, CUDA_R_16BF, in, X, CUDA_R_16BF, in, &zero,
                    Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (X_lo)
    BLAS(cublasGemmEx(cm->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, &one, W, CUDA_R_16BF, in, X_lo, CUDA_R_16BF, in, &one,
                      Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return GPTOSS_OK;
}

// What lora.cu needs to make adapters' device copies. Sessions that use
// adapters give back the trainer's memory first (training drops the
// copies in turn), so the two never hold memory at once.
static lora_view adapter_view(cuda_model *cm, int adapters) {
  if (adapters && cm->train_bytes) cuda_train_release(cm->train, &cm->train_bytes);
  lora_view v = {cm->stream, cm->d.L, cm->d.I, cm->budget, cm->arena_bytes + cm->kv_bytes + cm->ws_bytes + cm->train_bytes};
  return v;
}

// the modules of each LoRA pass (q, k and v share one), as lora_pass takes them
static const int qkv_mods[3] = {GPTOSS_LORA_Q, GPTOSS_LORA_K, GPTOSS_LORA_V};
static const int mod_o = GPTOSS_LORA_O, mod_gu = GPTOSS_LORA_GU, mod_dn = GPTOSS_LORA_DN, off0 = 0;

// Runs T tokens (of nss sessions) through the layers; out rows (token
// indices in rows_host) get logits, written to host out and/or kept.
static gptoss_status forward_tokens(const gptoss_plan *p) {
  gptoss_model *m = p->ss[0]->m;
  int T = p->T, nss = p->nss, nout = p->nout;
  gptoss_session **ss = p->ss;
  const int32_t *ids = p->ids, *pos = p->pos, *sidx = p->sess, *orows = p->rows;
  float *out = p->out;
  cuda_model *cm = CM(m);
  const dims &d = cm->d;
  gptoss_status rc = ensure_workspace(cm, T, nss);
  if (rc) return rc;
  cudaStream_t st = cm->stream;
  // inputs: ids, positions, session indices, output rows, through pinned memory
  int32_t *h = cm->h_ints;
  memcpy(h, ids, sizeof(int32_t) * T);
  memcpy(h + T, pos, sizeof(int32_t) * T);
  memcpy(h + 2 * T, sidx, sizeof(int32_t) * T);
  for (int i = 0; i < nout; i++) h[3 * T + i] = orows[i];
  CU(cudaMemcpyAsync(cm->ids, h, sizeof(int32_t) * T, cudaMemcpyHostToDevice, st));
  CU(cudaMemcpyAsync(cm->tok_pos, h + T, sizeof(int32_t) * T, cudaMemcpyHostToDevice, st));
  CU(cudaMemcpyAsync(cm->tok_sess, h + 2 * T, sizeof(int32_t) * T, cudaMemcpyHostToDevice, st));
  if (nout) CU(cudaMemcpyAsync(cm->rows, h + 3 * T, sizeof(int32_t) * nout, cudaMemcpyHostToDevice, st));
  const dsess **sa = (const dsess **)malloc(sizeof(dsess *) * nss);
  if (!sa) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  for (int i = 0; i < nss; i++) sa[i] = CS(ss[i])->dev;
  cudaError_t e = cudaMemcpyAsync(cm->sess_arr, sa, sizeof(dsess *) * nss, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);   // sa is pageable: copy before it is freed
  free(sa);
  if (e != cudaSuccess) return cuda_fail(e, "forward inputs", __FILE__, __LINE__);
  // the device copy of each session's history (its tokens are consecutive here), for penalties
  for (int t = 0; t < T;) {
    int u = t;
    while (u < T && sidx[u] == sidx[t]) u++;
    CU(cudaMemcpyAsync(CS(ss[sidx[t]])->hist + pos[t], h + t, sizeof(int32_t) * (u - t), cudaMemcpyHostToDevice, st));
    t = u;
  }

  // sessions' adapters: a delta pass after each targeted product
  const dlora_mod *const *ltok = NULL;
  float *lu = NULL, *ldelta = NULL;
  int lr = 0;
  {
    int any = 0;
    for (int i = 0; i < nss; i++) any |= ss[i]->adapter != NULL;
    lora_view lv = adapter_view(cm, any);
    int rows = T * d.K > LORA_PASS_MODS * T ? T * d.K : LORA_PASS_MODS * T;   // rank products of the experts', or of q, k, v
    if ((rc = lora_bind(&cm->lora, &lv, ss, nss, sidx, T, rows, &ltok, &lu, &lr, &ldelta))) return rc;
  }
  auto lora = [&](int l, int nm, const int *mods, const int *ooffs, int n, const int32_t *perm, const float *xf, const bf16 *xh,
                  const bf16 *xl, int in_sorted, float *out, int ostride, int mode, int outs) {
    lora_pass p = lora_pass_of(ltok, l, nm, mods, ooffs, n, perm, cm->sel, d.K, xf, xh, xl, in_sorted, lu, lr, out, ostride, mode);
    launch_lora(&p, outs, st);
  };
  const int qkv_off[3] = {0, d.Q, d.Q + d.KV};

  int maxpos = 0;
  for (int t = 0; t < T; t++) if (pos[t] > maxpos) maxpos = pos[t];
  cuda_prof_mark("start", st);
  launch_embed(cm->ids, T, cm->embed, cm->x, d.H, st);
  cuda_prof_mark("fwd embed", st);
  int any_trace = 0;
  for (int i = 0; i < nss; i++) any_trace |= ss[i]->trace;
  for (int l = 0; l < d.L; l++) {
    const dlayer &y = cm->layer[l];
    int sliding = m->cfg.layer_sliding[l];
    bf16 *xn_lo = cm->split ? cm->xn_lo : NULL, *att_lo = cm->split ? cm->att_lo : NULL;
    launch_rmsnorm(cm->x, NULL, T, y.attn_norm, cm->xn, xn_lo, d.H, d.eps, st);
    cuda_prof_mark("fwd norm", st);
    if ((rc = gemm(cm, y.qkv_w, cm->xn, xn_lo, cm->qkv, d.Q + 2 * d.KV, T, d.H))) return rc;
    if (ltok) {
      lora(l, 3, qkv_mods, qkv_off, T, NULL, NULL, cm->xn, xn_lo, 0, cm->qkv, d.Q + 2 * d.KV, LORA_ADD_TOKEN, d.Q);
      cuda_prof_mark("fwd lora", st);
    }
    cuda_prof_mark("fwd qkv", st);
    attn_args a;
    memset(&a, 0, sizeof a);
    a.qkv = cm->qkv; a.q = cm->q; a.tok_pos = cm->tok_pos; a.tok_sess = cm->tok_sess; a.sess = cm->sess_arr;
    a.T = T; a.layer = l; a.sliding = sliding; a.inv_freq = cm->inv_freq; a.bias = y.qkv_b;
    launch_rope_store(&a, &d, st);
    int span = sliding ? d.window : maxpos + 1;
    int nsplit = 1, split_len = span;
    if (T <= 64 && T * d.Hkv < 2 * cm->sms) {
      nsplit = (span + 255) / 256;
      if (nsplit > 64) nsplit = 64;
      split_len = (span + nsplit - 1) / nsplit;
    }
    launch_attention(&a, &d, y.sinks, nsplit, split_len, cm->part_ml, cm->part_acc, cm->att, st);
    cuda_prof_mark("fwd rope+attention", st);
    launch_bf16_from_f32(cm->att, cm->att16, att_lo, (size_t)T * d.Q, st);
    if ((rc = gemm(cm, y.o_w, cm->att16, att_lo, cm->tmp, d.H, T, d.Q))) return rc;
    if (ltok) {
      cuda_prof_mark("fwd o_proj", st);
      lora(l, 1, &mod_o, &off0, T, NULL, cm->att, NULL, NULL, 0, cm->tmp, d.H, LORA_ADD_TOKEN, d.H);
      cuda_prof_mark("fwd lora", st);
    }
    launch_add_bias_residual(cm->x, cm->tmp, y.o_b, T, d.H, st);
    cuda_prof_mark("fwd o_proj", st);
    launch_router(cm->x, T, y.mlp_norm, d.eps, y.router_w, y.router_b, d.H, d.E, d.K, cm->xn, xn_lo, NULL, cm->sel, cm->wts, st);
    cuda_prof_mark("fwd router", st);
    if (any_trace) {
      CU(cudaMemcpyAsync(cm->trace_sel + (size_t)l * T * d.K, cm->sel, sizeof(int32_t) * T * d.K, cudaMemcpyDeviceToDevice, st));
      CU(cudaMemcpyAsync(cm->trace_w + (size_t)l * T * d.K, cm->wts, sizeof(float) * T * d.K, cudaMemcpyDeviceToDevice, st));
    }
    launch_moe_sort(cm->sel, T, d.E, d.K, &cm->mw, st);
    cuda_prof_mark("fwd moe sort", st);
    // few rows per expert (batched decode): read each expert once, no padded tiles
    bool small = T * d.K <= MOE_SMALL_ROWS * d.E;
    const float *delta = NULL;
    if (ltok) {
      lora(l, 1, &mod_gu, &off0, T * d.K, cm->mw.perm, NULL, cm->xn, xn_lo, 0, ldelta, 2 * d.I, LORA_SET_ROW, 2 * d.I);
      delta = ldelta;
      cuda_prof_mark("fwd lora", st);
    }
    if (small) launch_moe_gate_up_small(cm->xn, xn_lo, &cm->mw, &y, &d, delta, cm->act, st);
    else launch_moe_gate_up(cm->xn, xn_lo, &cm->mw, T, &y, &d, delta, cm->act, st);
    cuda_prof_mark("fwd moe gate_up", st);
    if (small) launch_moe_down_small(cm->act, &cm->mw, &y, &d, cm->y, st);
    else launch_moe_down(cm->act, cm->split, &cm->mw, T, &y, &d, cm->y, st);
    if (ltok) {
      cuda_prof_mark("fwd moe down", st);
      lora(l, 1, &mod_dn, &off0, T * d.K, cm->mw.perm, cm->act, NULL, NULL, 1, cm->y, d.H, LORA_ADD_ASSIGNMENT, d.H);
      cuda_prof_mark("fwd lora", st);
    }
    cuda_prof_mark("fwd moe down", st);
    launch_moe_combine(cm->x, cm->y, cm->wts, T, d.H, d.K, st);
    cuda_prof_mark("fwd moe combine", st);
    LAUNCHED();
  }
  // logits, in groups of at most ws_out rows
  for (int r0 = 0; r0 < nout; r0 += cm->ws_out) {
    int nr = nout - r0 < cm->ws_out ? nout - r0 : cm->ws_out;
    bf16 *xn_lo = cm->split ? cm->xn_lo : NULL;
    launch_rmsnorm(cm->x, cm->rows + r0, nr, cm->norm, cm->xn, xn_lo, d.H, d.eps, st);
    if ((rc = gemm(cm, cm->lm_head, cm->xn, xn_lo, cm->logits, d.V, nr, d.H))) return rc;
    if (out) CU(cudaMemcpyAsync(out + (size_t)r0 * d.V, cm->logits, sizeof(float) * (size_t)nr * d.V, cudaMemcpyDeviceToHost, st));
    // the kept rows become their sessions' current logits
    for (int i = 0; i < nr; i++) {
      gptoss_session *s = ss[sidx[orows[r0 + i]]];
      if (p->keep[sidx[orows[r0 + i]]] == r0 + i)
        CU(cudaMemcpyAsync(CS(s)->logits, cm->logits + (size_t)i * d.V, sizeof(float) * d.V, cudaMemcpyDeviceToDevice, st));
    }
  }
  LAUNCHED();
  cuda_prof_mark("fwd lm_head", st);
  cuda_prof_flush();
  if (any_trace) {
    int32_t *te = (int32_t *)malloc(sizeof(int32_t) * (size_t)d.L * T * d.K);
    float *tw = (float *)malloc(sizeof(float) * (size_t)d.L * T * d.K);
    if (!te || !tw) { free(te); free(tw); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
    e = cudaMemcpyAsync(te, cm->trace_sel, sizeof(int32_t) * (size_t)d.L * T * d.K, cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess) e = cudaMemcpyAsync(tw, cm->trace_w, sizeof(float) * (size_t)d.L * T * d.K, cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);
    if (e == cudaSuccess) {
      // a token's trace row is its index within its session's feed
      for (int t = 0; t < T; t++) {
        gptoss_session *s = ss[sidx[t]];
        for (int l = 0; l < d.L; l++)
          gptoss_trace_record(s, pos[t] - s->pos, l, te + ((size_t)l * T + t) * d.K, tw + ((size_t)l * T + t) * d.K);
      }
    }
    free(te);
    free(tw);
    if (e != cudaSuccess) return cuda_fail(e, "expert trace", __FILE__, __LINE__);
  }
  CU(cudaStreamSynchronize(st));
  return GPTOSS_OK;
}

// the most tokens one pass takes: the workspace is sized for this many
#define PASS_TOKENS 2048

static gptoss_status cuda_run(const gptoss_plan *p) {
  cuda_model *cm = CM(p->ss[0]->m);
  if (g_broken) return gptoss_fail(GPTOSS_EDEVICE, "an earlier CUDA error lost the device context; reload the model");
  CU(cudaSetDevice(cm->dev));
  return forward_tokens(p);
}
// }======================================================

// {====================================================== sampling
static void to_gpu_params(const gptoss_sampling *p, gptoss_sampler *smp, gpu_sampling *g) {
  g->temperature = p->temperature; g->top_p = p->top_p; g->min_p = p->min_p;
  g->repetition_penalty = p->repetition_penalty; g->presence_penalty = p->presence_penalty;
  g->frequency_penalty = p->frequency_penalty; g->top_k = p->top_k; g->penalty_window = p->penalty_window;
  g->n_bias = p->n_bias;
  g->seed = gptoss_sampler_draw(smp);
  g->counter = 0;
}

static gptoss_status cuda_sample(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *outids) {
  cuda_model *cm = CM(ss[0]->m);
  const dims &d = cm->d;
  gptoss_status rc = ensure_workspace(cm, 1, n);
  if (rc) return rc;
  cudaStream_t st = cm->stream;
  CU(cudaSetDevice(cm->dev));
  // in groups of rows: each session's logits, then the samplers' parameters
  int done = 0;
  while (done < n) {
    int rows = n - done < cm->ws_out ? n - done : cm->ws_out;
    for (int i = 0; i < rows; i++)
      CU(cudaMemcpyAsync(cm->logits + (size_t)i * d.V, CS(ss[done + i])->logits, sizeof(float) * d.V, cudaMemcpyDeviceToDevice, st));
    const int32_t **hp = (const int32_t **)malloc(sizeof(int32_t *) * rows);
    int32_t *hl = (int32_t *)malloc(sizeof(int32_t) * rows);
    if (!hp || !hl) { free(hp); free(hl); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
    for (int i = 0; i < rows; i++) {
      const gptoss_sampling *p = gptoss_sampler_params(smp[done + i]);
      to_gpu_params(p, smp[done + i], &cm->params_host[i]);
      hp[i] = CS(ss[done + i])->hist;
      hl[i] = ss[done + i]->pos;
      if (p->n_bias) {
        if (p->n_bias > 4096) { free(hp); free(hl); return gptoss_fail(GPTOSS_EUNSUP, "more than 4096 logit biases on CUDA"); }
        // bias lists are applied one row at a time
        if (rows > 1) { free(hp); free(hl); return gptoss_fail(GPTOSS_EUNSUP, "logit_bias in a CUDA batch"); }
        CU(cudaMemcpyAsync(cm->sw.bias_ids, p->bias_ids, sizeof(int32_t) * p->n_bias, cudaMemcpyHostToDevice, st));
        CU(cudaMemcpyAsync(cm->sw.bias_vals, p->bias_values, sizeof(float) * p->n_bias, cudaMemcpyHostToDevice, st));
      }
    }
    cudaError_t e = cudaMemcpyAsync(cm->params_dev, cm->params_host, sizeof(gpu_sampling) * rows, cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) e = cudaMemcpyAsync(cm->hist_arr, hp, sizeof(int32_t *) * rows, cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) e = cudaMemcpyAsync(cm->hist_len, hl, sizeof(int32_t) * rows, cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);
    free(hp);
    free(hl);
    if (e != cudaSuccess) return cuda_fail(e, "sampling inputs", __FILE__, __LINE__);
    launch_sample(cm->logits, rows, d.V, cm->params_dev, cm->params_host, cm->hist_arr, cm->hist_len, &cm->sw, cm->out_dev, st, NULL);
    LAUNCHED();
    CU(cudaMemcpyAsync(cm->out_host, cm->out_dev, sizeof(int32_t) * rows, cudaMemcpyDeviceToHost, st));
    CU(cudaStreamSynchronize(st));
    for (int i = 0; i < rows; i++) outids[done + i] = cm->out_host[i];
    done += rows;
  }
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== batch-1 decode
// Decode splits each layer's keys over at most DEC_SPLITS blocks per KV
// head; the kernel sizes the splits from the position it reads on the
// device (split_len 0), so a graph captured early stays right later on.
#define DEC_SPLITS 64
#define DEC_TILE 32

static int dec_splits(int span) {
  int n = (span + DEC_TILE - 1) / DEC_TILE;
  return n < DEC_SPLITS ? n : DEC_SPLITS;
}

// one device allocation cut into n parts of the given sizes (each 256-aligned)
static gptoss_status alloc_parts(char **mem, const size_t *sz, void **const *parts, size_t n) {
  size_t total = 0;
  for (size_t i = 0; i < n; i++) total += ALIGN(sz[i]);
  CU(cudaMalloc((void **)mem, total));
  char *p = *mem;
  for (size_t i = 0; i < n; i++) { *parts[i] = p; p += ALIGN(sz[i]); }
  return GPTOSS_OK;
}

static gptoss_status decode_scratch(cuda_model *cm, gptoss_session *s, cuda_session *cs) {
  if (cs->dec) return GPTOSS_OK;
  const dims &d = cm->d;
  cs->nsplit_full = dec_splits(s->context);
  int ns = cs->nsplit_full > dec_splits(d.window) ? cs->nsplit_full : dec_splits(d.window);
  size_t sz[] = {
    sizeof(float) * (d.Q + 2 * d.KV), sizeof(float) * d.Q, sizeof(float) * d.Q, sizeof(float) * d.E,
    sizeof(float) * d.K, sizeof(float) * (size_t)d.K * d.I, sizeof(float) * 2 * (size_t)d.Hq * ns,
    sizeof(float) * (size_t)d.D * d.Hq * ns, sizeof(float) * d.H, sizeof(float) * d.H, sizeof(int32_t) * d.K,
    sizeof(int32_t) * 4, sizeof(gpu_sampling), sizeof(int32_t) * 4, sizeof(int32_t *) * 2,
  };
  void **parts[] = {(void **)&cs->d_qkv, (void **)&cs->d_q, (void **)&cs->d_att, (void **)&cs->d_rl, (void **)&cs->d_w,
                     (void **)&cs->d_act, (void **)&cs->d_ml, (void **)&cs->d_acc, (void **)&cs->d_xnf, (void **)&cs->d_x,
                     (void **)&cs->d_sel, (void **)&cs->step, (void **)&cs->params, (void **)&cs->next, (void **)&cs->hist_ptr};
  gptoss_status rc = alloc_parts(&cs->dec, sz, parts, sizeof sz / sizeof sz[0]);
  if (rc) return rc;
  cs->hist_len = cs->step + 2;
  CU(cudaHostAlloc((void **)&cs->step_host, 256, cudaHostAllocDefault));
  cs->params_host = (gpu_sampling *)((char *)cs->step_host + 64);
  cs->l_tok_host = (const dlora_mod **)((char *)cs->step_host + 128);
  cs->next_host = cs->step_host + 48;
  CU(cudaMemcpy(cs->hist_ptr, &cs->hist, sizeof(int32_t *), cudaMemcpyHostToDevice));
  return GPTOSS_OK;
}

// the decode step's LoRA buffers, sized for the largest rank, so that a
// graph's pointers stay valid whatever adapter the session takes next
static gptoss_status decode_lora_scratch(cuda_model *cm, cuda_session *cs) {
  if (cs->ldec) return GPTOSS_OK;
  const dims &d = cm->d;
  int wide = 2 * d.I > d.H ? 2 * d.I : d.H;
  int urows = d.K > LORA_PASS_MODS ? d.K : LORA_PASS_MODS;   // the experts' slots, or q, k and v
  size_t sz[] = {sizeof(dlora_mod *), sizeof(float) * (size_t)urows * GPTOSS_LORA_MAX_RANK, sizeof(float) * (size_t)d.K * wide,
                 sizeof(int32_t) * d.K, sizeof(bf16) * d.H, sizeof(bf16) * d.H};
  void **parts[] = {(void **)&cs->l_tok, (void **)&cs->l_u, (void **)&cs->l_delta, (void **)&cs->l_slots, (void **)&cs->l_xn,
                     (void **)&cs->l_xl};
  gptoss_status rc = alloc_parts(&cs->ldec, sz, parts, sizeof sz / sizeof sz[0]);
  if (rc) return rc;
  int32_t *slots = (int32_t *)malloc(sizeof(int32_t) * d.K);
  if (!slots) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  for (int i = 0; i < d.K; i++) slots[i] = i;
  cudaError_t e = cudaMemcpy(cs->l_slots, slots, sizeof(int32_t) * d.K, cudaMemcpyHostToDevice);
  free(slots);
  if (e != cudaSuccess) return cuda_fail(e, "decode LoRA slots", __FILE__, __LINE__);
  return GPTOSS_OK;
}

// step = {token, pos, hist_len}: append the token to the device history
__global__ void decode_prologue_kernel(int32_t *step, int32_t *hist) {
  hist[step[1]] = step[0];
  step[2] = step[1] + 1;
}

static int sampling_kind(const gptoss_sampling *p) {
  int kind = p->temperature == 0 ? 0 : (p->top_k > 0 || p->top_p < 1 || p->min_p > 0) ? 2 : 1;
  if (p->repetition_penalty != 1 || p->presence_penalty != 0 || p->frequency_penalty != 0) kind |= 4;
  if (p->n_bias) kind |= 8;
  return kind;
}

// the kernels of one decode step, in order (captured into the graph); lr:
// the rank of the session's adapter, 0 for none
static gptoss_status decode_launches(gptoss_model *m, cuda_session *cs, const gpu_sampling *host_params, int lr) {
  cuda_model *cm = CM(m);
  const dims &d = cm->d;
  cudaStream_t st = cm->stream;
  auto lora = [&](int l, int nm, const int *mods, const int *ooffs, int n, const int32_t *slots, const float *xf, const bf16 *xh,
                  const bf16 *xl, int in_sorted, float *out, int ostride, int mode, int outs) {
    lora_pass p = lora_pass_of(cs->l_tok, l, nm, mods, ooffs, n, slots, cs->d_sel, d.K, xf, xh, xl, in_sorted, cs->l_u, lr, out,
                               ostride, mode);
    launch_lora(&p, outs, st);
  };
  const int qkv_off[3] = {0, d.Q, d.Q + d.KV};
  cuda_prof_mark("start", st);
  decode_prologue_kernel<<<1, 1, 0, st>>>(cs->step, cs->hist);
  launch_embed(cs->step, 1, cm->embed, cs->d_x, d.H, st);
  cuda_prof_mark("dec embed", st);
  for (int l = 0; l < d.L; l++) {
    const dlayer &y = cm->layer[l];
    int sliding = m->cfg.layer_sliding[l];
    launch_gemv_bf16(cs->d_x, y.attn_norm, d.eps, y.qkv_w, y.qkv_b, cs->d_qkv, d.Q + 2 * d.KV, d.H, NULL, st);
    cuda_prof_mark("dec qkv gemv", st);
    if (lr) {
      launch_rmsnorm(cs->d_x, NULL, 1, y.attn_norm, cs->l_xn, cs->l_xl, d.H, d.eps, st);
      lora(l, 3, qkv_mods, qkv_off, 1, NULL, NULL, cs->l_xn, cs->l_xl, 0, cs->d_qkv, d.Q + 2 * d.KV, LORA_ADD_TOKEN, d.Q);
      cuda_prof_mark("dec lora", st);
    }
    attn_args a;
    memset(&a, 0, sizeof a);
    a.qkv = cs->d_qkv; a.q = cs->d_q; a.pos_dev = cs->step + 1; a.sess = (const dsess *const *)cm->sess_arr;
    a.T = 1; a.layer = l; a.sliding = sliding; a.inv_freq = cm->inv_freq;
    launch_rope_store(&a, &d, st);
    cuda_prof_mark("dec rope", st);
    int nsplit = sliding ? dec_splits(d.window) : cs->nsplit_full;
    launch_attention(&a, &d, y.sinks, nsplit, 0, cs->d_ml, cs->d_acc, cs->d_att, st);
    cuda_prof_mark("dec attention", st);
    launch_gemv_bf16(cs->d_att, NULL, d.eps, y.o_w, y.o_b, NULL, d.H, d.Q, cs->d_x, st);
    cuda_prof_mark("dec o gemv", st);
    if (lr) {
      lora(l, 1, &mod_o, &off0, 1, NULL, cs->d_att, NULL, NULL, 0, cs->d_x, d.H, LORA_ADD_TOKEN, d.H);
      cuda_prof_mark("dec lora", st);
    }
    launch_router(cs->d_x, 1, y.mlp_norm, d.eps, y.router_w, y.router_b, d.H, d.E, d.K, NULL, NULL, cs->d_xnf, cs->d_sel, cs->d_w, st);
    cuda_prof_mark("dec router", st);
    if (lr) {
      lora(l, 1, &mod_gu, &off0, d.K, cs->l_slots, cs->d_xnf, NULL, NULL, 0, cs->l_delta, 2 * d.I, LORA_SET_ROW, 2 * d.I);
      cuda_prof_mark("dec lora", st);
    }
    launch_moe_gate_up_decode(cs->d_xnf, cs->d_sel, &y, &d, lr ? cs->l_delta : NULL, cs->d_act, st);
    cuda_prof_mark("dec moe gate_up", st);
    launch_moe_down_decode(cs->d_act, cs->d_sel, cs->d_w, &y, &d, cs->d_x, st);
    cuda_prof_mark("dec moe down", st);
    if (lr) {
      // each slot's delta, then weighted into the residual in slot order (no atomics: the same sums every run)
      lora(l, 1, &mod_dn, &off0, d.K, cs->l_slots, cs->d_act, NULL, NULL, 1, cs->l_delta, d.H, LORA_SET_ROW, d.H);
      launch_moe_combine(cs->d_x, cs->l_delta, cs->d_w, 1, d.H, d.K, st);
      cuda_prof_mark("dec lora", st);
    }
  }
  launch_gemv_bf16(cs->d_x, cm->norm, d.eps, cm->lm_head, NULL, cs->logits, d.V, d.H, NULL, st);
  cuda_prof_mark("dec lm_head", st);
  launch_sample(cs->logits, 1, d.V, cs->params, host_params, cs->hist_ptr, cs->hist_len, &cm->sw, cs->next, st, cm->sw.keys_in);
  cuda_prof_mark("dec sample", st);
  cudaMemcpyAsync(cs->next_host, cs->next, sizeof(int32_t), cudaMemcpyDeviceToHost, st);
  return GPTOSS_OK;
}

static gptoss_status cuda_decode(gptoss_session *s, int32_t id, gptoss_sampler *smp, int32_t *next) {
  gptoss_model *m = s->m;
  cuda_model *cm = CM(m);
  cuda_session *cs = CS(s);
  if (g_broken) return gptoss_fail(GPTOSS_EDEVICE, "an earlier CUDA error lost the device context; reload the model");
  CU(cudaSetDevice(cm->dev));
  gptoss_status rc = decode_scratch(cm, s, cs);
  if (!rc) rc = ensure_workspace(cm, 1, 1);
  if (rc) return rc;
  int lr = 0;
  if (s->adapter) {
    lora_view lv = adapter_view(cm, 1);
    const dlora_mod *tab;
    if ((rc = lora_table(&cm->lora, &lv, s->adapter, &tab, &lr)) || (rc = decode_lora_scratch(cm, cs))) return rc;
    *cs->l_tok_host = tab;
    CU(cudaMemcpyAsync(cs->l_tok, cs->l_tok_host, sizeof tab, cudaMemcpyHostToDevice, cm->stream));
  }
  const gptoss_sampling *p = gptoss_sampler_params(smp);
  if (p->n_bias > 4096) return gptoss_fail(GPTOSS_EUNSUP, "more than 4096 logit biases on CUDA");
  cudaStream_t st = cm->stream;
  // the sessions array's first entry is this session while the graph runs
  const dsess *self = cs->dev;
  cs->step_host[0] = id;
  cs->step_host[1] = s->pos;
  to_gpu_params(p, smp, cs->params_host);
  CU(cudaMemcpyAsync(cs->step, cs->step_host, sizeof(int32_t) * 2, cudaMemcpyHostToDevice, st));
  CU(cudaMemcpyAsync(cs->params, cs->params_host, sizeof(gpu_sampling), cudaMemcpyHostToDevice, st));
  CU(cudaMemcpyAsync((void *)cm->sess_arr, &self, sizeof self, cudaMemcpyHostToDevice, st));
  if (p->n_bias) {
    CU(cudaMemcpyAsync(cm->sw.bias_ids, p->bias_ids, sizeof(int32_t) * p->n_bias, cudaMemcpyHostToDevice, st));
    CU(cudaMemcpyAsync(cm->sw.bias_vals, p->bias_values, sizeof(float) * p->n_bias, cudaMemcpyHostToDevice, st));
  }
  int kind = sampling_kind(p);
  if (g_prof.on) {
    // profiled: the same launches, uncaptured, timed
    rc = decode_launches(m, cs, cs->params_host, lr);
    if (rc) return rc;
    cuda_prof_flush();
    CU(cudaStreamSynchronize(st));
    *next = cs->next_host[0];
    return GPTOSS_OK;
  }
  if (!cs->graph || cs->graph_kind != kind || cs->graph_gen != cm->ws_gen || cs->graph_lora != lr) {
    if (cs->graph) { cudaGraphExecDestroy(cs->graph); cs->graph = NULL; }
    cudaGraph_t g;
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed));
    rc = decode_launches(m, cs, cs->params_host, lr);
    cudaError_t e = cudaStreamEndCapture(st, &g);
    if (rc) { if (e == cudaSuccess) cudaGraphDestroy(g); return rc; }
    if (e != cudaSuccess) return cuda_fail(e, "capturing the decode step", __FILE__, __LINE__);
    e = cudaGraphInstantiate(&cs->graph, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) { cs->graph = NULL; return cuda_fail(e, "instantiating the decode graph", __FILE__, __LINE__); }
    cs->graph_kind = kind;
    cs->graph_gen = cm->ws_gen;
    cs->graph_lora = lr;
  }
  CU(cudaGraphLaunch(cs->graph, st));
  CU(cudaStreamSynchronize(st));
  *next = cs->next_host[0];
  return GPTOSS_OK;
}
// }======================================================

static gptoss_status cuda_logits(const gptoss_session *s, float *out) {
  cuda_model *cm = CM(s->m);
  CU(cudaSetDevice(cm->dev));
  CU(cudaMemcpyAsync(out, CS(s)->logits, sizeof(float) * cm->d.V, cudaMemcpyDeviceToHost, cm->stream));
  CU(cudaStreamSynchronize(cm->stream));
  return GPTOSS_OK;
}

static gptoss_status cuda_train(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                double *loss, int *count) {
  cuda_model *cm = CM(m);
  if (g_broken) return gptoss_fail(GPTOSS_EDEVICE, "an earlier CUDA error lost the device context; reload the model");
  CU(cudaSetDevice(cm->dev));
  lora_cache_drop(cm->lora);     // sessions' adapter copies: made again when next used
  train_view v = {cm->stream, cm->blas, cm->layer, cm->embed, cm->norm, cm->lm_head, cm->inv_freq, m->cfg.layer_sliding, cm->d,
                  cm->split, cm->split_bwd,
                  m->threads, &cm->train, &cm->train_bytes};
  return cuda_lora_backward(&v, a, ids, mask, n, loss, count);
}

static const gptoss_backend cuda_backend = {
  "cuda", cuda_model_init, cuda_model_free, cuda_session_init, cuda_session_free, cuda_session_copy,
  cuda_run, PASS_TOKENS, cuda_sample, cuda_memory, cuda_decode, cuda_logits, cuda_train,
};

extern "C" __attribute__((visibility("default"))) const gptoss_backend *gptoss_cuda_backend(void) { return &cuda_backend; }
