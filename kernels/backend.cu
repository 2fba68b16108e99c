// backend.cu: the CUDA backend: the model (weight upload, memory
// accounting), sessions and their KV caches, errors and profiling, and the
// backend's table. The forward passes and sampling are forward.cu's;
// LoRA training is train.cu's.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend.cuh"

// {====================================================== errors
// A sticky error (an illegal address, a failed or timed-out kernel, ...)
// leaves the CUDA context of its device unusable for the rest of the
// process: every later call in that context fails with the same error, for
// every model on the device, and freeing or loading a model does not bring
// it back (cudaDeviceReset would, but it also frees the memory of every
// other model there). So the lost state is the device's, as the context
// is; models on other devices keep working.
#define LOST_DEVICES 65   // cuda:0 .. cuda:64, as model.c accepts
static int g_lost[LOST_DEVICES];

static const char *const LOST = "the CUDA context of this process on that device is lost: every model on it fails from now on; "
                                "restart the process";

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
  if (!sticky(e))
    return gptoss_fail(GPTOSS_EDEVICE, "CUDA error %s: %s (%s at %s:%d)", cudaGetErrorName(e), cudaGetErrorString(e), what, file, line);
  // the failing call ran on the calling thread's current device, which each
  // entry point set to its model's; where that cannot be read, every device
  // counts as lost
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= LOST_DEVICES) dev = -1;
  for (int i = 0; i < LOST_DEVICES; i++)
    if (dev < 0 || i == dev) __atomic_store_n(&g_lost[i], 1, __ATOMIC_RELAXED);
  return gptoss_fail(GPTOSS_EDEVICE, "CUDA error %s: %s (%s at %s:%d) on cuda:%d; %s", cudaGetErrorName(e), cudaGetErrorString(e),
                     what, file, line, dev, LOST);
}

gptoss_status cuda_device_usable(int dev) {
  if (dev >= 0 && dev < LOST_DEVICES && !__atomic_load_n(&g_lost[dev], __ATOMIC_RELAXED)) return GPTOSS_OK;
  return gptoss_fail(GPTOSS_EDEVICE, "an earlier CUDA error on cuda:%d; %s", dev, LOST);
}

gptoss_status cuda_blas_fail(cublasStatus_t st, const char *what) {
  if (st == CUBLAS_STATUS_ALLOC_FAILED) return gptoss_fail(GPTOSS_ENOMEM, "cuBLAS out of memory (%s)", what);
  return gptoss_fail(GPTOSS_EDEVICE, "cuBLAS error %d in %s", (int)st, what);
}
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

bool cuda_prof_on(void) { return g_prof.on; }

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
// Reports the bytes copied so far to the load's progress callback, whose
// nonzero answer cancels the load between chunks.
static gptoss_status upload(cuda_model *cm, const upload_item *items, int n, int threads, const gptoss_model_opts *o) {
  uint64_t total = 0, copied = 0;
  for (int i = 0; i < n; i++) total += items[i].n;
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
      copied += len;
      if (o->progress && o->progress(o->progress_ud, copied, total)) { rc = gptoss_fail(GPTOSS_ESTATE, "the load was cancelled"); break; }
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

// {====================================================== model
// whether environment variable name is set to value (the switches that
// put back the code a new path replaces, to compare)
static bool env_is(const char *name, const char *value) {
  const char *v = getenv(name);
  return v && strcmp(v, value) == 0;
}

// a non-negative integer from the environment, else dflt
static int env_int(const char *name, int dflt) {
  const char *v = getenv(name);
  char *end = NULL;
  long n = v && *v ? strtol(v, &end, 10) : -1;
  return n >= 0 && n <= 1 << 20 && end && !*end ? (int)n : dflt;
}

static gptoss_status cuda_model_init(gptoss_model *m, const gptoss_model_opts *o) {
  if (m->device_index < 0 || m->device_index >= LOST_DEVICES)
    return gptoss_fail(GPTOSS_EARG, "device cuda:%d: at most cuda:%d", m->device_index, LOST_DEVICES - 1);
  TRY(cuda_device_usable(m->device_index));
  const gptoss_config *c = &m->cfg;
  if (c->hidden_size % 64 || (2 * c->intermediate_size) % 64 || c->num_experts_per_tok > 32 || c->num_local_experts > 256 || c->head_dim > 256 ||
      c->num_attention_heads / c->num_key_value_heads > 32 || (c->num_attention_heads * c->head_dim) % 8)
    return gptoss_fail(GPTOSS_EUNSUP, "the CUDA backend needs hidden_size and 2*intermediate_size multiples of 64, "
                       "at most 256 experts and 32 per token, head_dim <= 256 and at most 32 query heads per kv head");
  int ndev = 0;
  cudaError_t e = cudaGetDeviceCount(&ndev);
  if (e != cudaSuccess || ndev == 0) return gptoss_fail(GPTOSS_EUNSUP, "no CUDA device (%s)", e ? cudaGetErrorString(e) : "none found");
  if (m->device_index >= ndev) return gptoss_fail(GPTOSS_EARG, "device cuda:%d does not exist (%d devices)", m->device_index, ndev);
  // bf16 tensor cores (wmma, mma.sync) and cp.async: Ampere on
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, m->device_index);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, m->device_index);
  if (major < 8)
    return gptoss_fail(GPTOSS_EUNSUP, "cuda:%d is sm_%d%d: the CUDA backend needs compute capability 8.0 or later "
                       "(Ampere, Ada, Hopper)", m->device_index, major, minor);
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
  d.e_lo = m->expert_lo; d.e_hi = m->expert_hi;
  cm->comm = m->comm;
  cm->rank = m->rank;
  cm->precision = o->precision;
  cm->split = o->precision != GPTOSS_PRECISION_FAST;
  cm->invariant = o->batch_invariant != 0;
  {
    // a batch-invariant model keeps its MoE and attention kernels (per-row
    // sums, splits of fixed length); GPTOSS_MOE_GEMM=wmma keeps moe.cu's own
    // GEMM on Hopper too, GPTOSS_PREFILL_ATTENTION=split the split kernel
    // for prompts (to compare)
    bool wg = false, pdl = false;
    CU(mxfp4_gemm_has_wgmma(&wg, cm->stream));
    CU(pdl_supported(&pdl, cm->stream));
    cm->moe_wgmma = wg && !cm->invariant && !env_is("GPTOSS_MOE_GEMM", "wmma")
                    && d.H % 32 == 0 && d.I % 32 == 0;   // launch_mxfp4_gemm's shapes
    cm->moe_small_rows = env_int("GPTOSS_MOE_SMALL_ROWS", MOE_SMALL_ROWS);
    cm->moe_mma_rows = env_int("GPTOSS_MOE_MMA_ROWS", MOE_MMA_ROWS);
    // at most 64: past 32 tokens each further 32 read the weights again
    // (dense_mma.cu), and its slice buffer grows with the tokens
    cm->dense_mma_tokens = cm->invariant ? 0 : env_int("GPTOSS_DENSE_MMA_TOKENS", DENSE_MMA_TOKENS);
    if (cm->dense_mma_tokens > 64) cm->dense_mma_tokens = 64;
    cm->flash_prefill = flash_prefill_supported(d.D, d.Hq, d.Hkv) && !cm->invariant && !env_is("GPTOSS_PREFILL_ATTENTION", "split");
    // programmatic dependent launch of the decode step is opt-in
    // (GPTOSS_PDL=1): on the H100 it made the step slower, 3.16 ms against
    // 2.85 (bench/NOTES.md)
    cm->pdl = pdl && env_is("GPTOSS_PDL", "1");
  }
  d.kv32 = o->precision != GPTOSS_PRECISION_FAST;
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
  size_t tensor_off[CUDA_MAX_LAYERS][GPTOSS_T_PER_LAYER];   // each layer tensor's offset in the arena
  // A rank of a split model uploads its own experts [e_lo, e_hi) alone; the
  // layer's pointers are set as if expert 0 were there (offset back by
  // e_lo experts), so that the kernels index experts by their number and
  // only ever reach the ones this rank holds (the sort leaves out the rest).
  size_t expert_back[CUDA_MAX_LAYERS][GPTOSS_T_PER_LAYER] = {};
  for (int l = 0; l < L; l++) {
    for (int r = 0; r < GPTOSS_T_PER_LAYER; r++) {
      int role = r + GPTOSS_T_LAYER_FIRST;
      const gptoss_tensor *t = m->layer[l][r];
      if (role == GPTOSS_T_GU_BLOCKS || role == GPTOSS_T_GU_SCALES || role == GPTOSS_T_GU_BIAS ||
          role == GPTOSS_T_DN_BLOCKS || role == GPTOSS_T_DN_SCALES || role == GPTOSS_T_DN_BIAS) {
        size_t per = t->nbytes / (size_t)d.E;
        expert_back[l][r] = per * (size_t)d.e_lo;
        tensor_off[l][r] = off;
        items[nit++] = {(const char *)t->data + per * (size_t)d.e_lo, per * (size_t)(d.e_hi - d.e_lo), off};
        off = ALIGN(off + per * (size_t)(d.e_hi - d.e_lo));
        continue;
      }
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
      tensor_off[l][r] = off;
      items[nit++] = {t->data, t->nbytes, off};
      off = ALIGN(off + t->nbytes);
    }
  }
  // An untied embedding table stays in host memory that the GPU reads
  // (pinned and mapped): a token reads one row of it (5.6 KB on the 20B),
  // which PCIe brings in microseconds, and its 1.16 GB stay off the device.
  // Tied to lm_head, it is on the device anyway; GPTOSS_EMBED=device keeps
  // it there too (to compare), and so does a host that cannot pin that
  // much (a locked-memory limit) or a device that cannot map host memory:
  // both are asked here, before the layout. model:memory() counts the
  // table as host.
  bool embed_host = m->lm_head != m->embed && !env_is("GPTOSS_EMBED", "device");
  void *embed_dev = NULL;
  bool pinned = embed_host && cudaHostAlloc(&cm->embed_host, m->embed->nbytes, cudaHostAllocMapped | cudaHostAllocWriteCombined) == cudaSuccess;
  if (embed_host && (!pinned || cudaHostGetDevicePointer(&embed_dev, cm->embed_host, 0) != cudaSuccess)) {
    cudaGetLastError();   // not sticky; cleared so that the next check does not see it
    if (pinned) cudaFreeHost(cm->embed_host);
    cm->embed_host = NULL;
    embed_host = false;
  }
  size_t embed_off = off;
  if (!embed_host) {
    items[nit++] = {m->embed->data, m->embed->nbytes, off};
    off = ALIGN(off + m->embed->nbytes);
  }
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
  gptoss_status rc = upload(cm, items, nit, m->threads, o);
  free(items);
  if (rc) return rc;
  CU(cudaMemcpy(cm->arena + rope_off, m->inv_freq, sizeof(float) * (size_t)(d.D / 2), cudaMemcpyHostToDevice));
  cm->inv_freq = (float *)(cm->arena + rope_off);
  for (int l = 0; l < L; l++) {
    dlayer &y = cm->layer[l];
#define AT(role, type) ((type)(cm->arena + tensor_off[l][(role) - GPTOSS_T_LAYER_FIRST] - expert_back[l][(role) - GPTOSS_T_LAYER_FIRST]))
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
  if (embed_host) {
    memcpy(cm->embed_host, m->embed->data, m->embed->nbytes);
    cm->embed = (const bf16 *)embed_dev;
  } else {
    cm->embed = (const bf16 *)(cm->arena + embed_off);
  }
  cm->norm = (const bf16 *)(cm->arena + norm_off);
  cm->lm_head = (const bf16 *)(cm->arena + head_off);
  cm->sw.cub_bytes = sampler_cub_bytes(d.V);
  return ensure_workspace(cm, 64, 64);
}

static void cuda_model_free(gptoss_model *m) {
  cuda_model *cm = model_of(m);
  if (!cm) return;
  prof_print();
  cudaSetDevice(cm->dev);
  if (cm->stream) cudaStreamSynchronize(cm->stream);
  free_workspace(cm);
  lora_cache_free(cm->lora);
  cuda_train_free(cm->train);
  if (cm->arena) cudaFree(cm->arena);
  if (cm->embed_host) cudaFreeHost(cm->embed_host);
  if (cm->blas) cublasDestroy(cm->blas);
  if (cm->blas_ws) cudaFree(cm->blas_ws);
  if (cm->stream) cudaStreamDestroy(cm->stream);
  free(cm);
  m->bm = NULL;
}

static void cuda_memory(const gptoss_model *m, gptoss_memory *out) {
  cuda_model *cm = model_of(m);
  out->weights = cm->arena_bytes;
  out->kv = cm->kv_bytes;
  out->workspace = cm->ws_bytes + cm->train_bytes + lora_cache_bytes(cm->lora) + BLAS_WS;
  out->total = out->weights + out->kv + out->workspace;
  out->host = cm->embed_host ? m->embed->nbytes : 0;
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

// what a session of this capacity and ring takes: its K and V, then its logits, history and view
static size_t session_parts(const gptoss_model *m, int context, int ring, size_t *kv) {
  const cuda_model *cm = model_of(m);
  const dims &d = cm->d;
  *kv = 0;
  for (int l = 0; l < d.L; l++) *kv += 2 * ALIGN(kv_size(cm) * (size_t)(m->cfg.layer_sliding[l] ? ring : context) * d.KV);
  return ALIGN(sizeof(float) * d.V) + ALIGN(sizeof(int32_t) * context) + ALIGN(sizeof(dsess)) + 256;
}

static uint64_t cuda_session_bytes(const gptoss_model *m, int context, int ring) {
  size_t kv, extra = session_parts(m, context, ring, &kv);
  return kv + extra;
}

static gptoss_status cuda_session_init(gptoss_session *s) {
  cuda_model *cm = model_of(s->m);
  TRY(cuda_device_usable(cm->dev));
  const dims &d = cm->d;
  CU(cudaSetDevice(cm->dev));
  cuda_session *cs = (cuda_session *)calloc(1, sizeof *cs);
  if (!cs) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  size_t kv, extra = session_parts(s->m, s->context, s->ring, &kv);
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
  cuda_session *cs = session_of(s);
  if (!cs) return;
  cuda_model *cm = model_of(s->m);
  cudaSetDevice(cm->dev);
  cudaStreamSynchronize(cm->stream);
  session_release(cs, cm);
  s->bs = NULL;
}

static gptoss_status cuda_session_copy(gptoss_session *dst, const gptoss_session *src, int keep) {
  cuda_model *cm = model_of(src->m);
  CU(cudaSetDevice(cm->dev));   // the caller's thread may be on another device (replicas, split ranks)
  cuda_session *d = session_of(dst), *s = session_of(src);
  size_t row = kv_size(cm) * (size_t)cm->d.KV;
  for (int l = 0; l < cm->d.L; l++) {
    int sl = src->m->cfg.layer_sliding[l];
    for (int p = gptoss_kv_copy_from(sl, keep, src->held_from, dst->ring), n; p < keep; p += n) {
      n = gptoss_kv_run(sl, src->ring, dst->ring, p, keep);
      size_t from = row * (size_t)gptoss_kv_slot(sl, src->ring, p), to = row * (size_t)gptoss_kv_slot(sl, dst->ring, p);
      CU(cudaMemcpyAsync((char *)d->view.k[l] + to, (const char *)s->view.k[l] + from, row * n, cudaMemcpyDeviceToDevice, cm->stream));
      CU(cudaMemcpyAsync((char *)d->view.v[l] + to, (const char *)s->view.v[l] + from, row * n, cudaMemcpyDeviceToDevice, cm->stream));
    }
  }
  if (keep == src->pos) CU(cudaMemcpyAsync(d->logits, s->logits, sizeof(float) * cm->d.V, cudaMemcpyDeviceToDevice, cm->stream));
  CU(cudaMemcpyAsync(d->hist, s->hist, sizeof(int32_t) * keep, cudaMemcpyDeviceToDevice, cm->stream));
  CU(cudaStreamSynchronize(cm->stream));
  return GPTOSS_OK;
}
// }======================================================

static gptoss_status cuda_logits(const gptoss_session *s, float *out) {
  cuda_model *cm = model_of(s->m);
  CU(cudaSetDevice(cm->dev));
  CU(cudaMemcpyAsync(out, session_of(s)->logits, sizeof(float) * cm->d.V, cudaMemcpyDeviceToHost, cm->stream));
  CU(cudaStreamSynchronize(cm->stream));
  return GPTOSS_OK;
}

static gptoss_status cuda_train(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                const int32_t *seg0, double *loss, int *count) {
  cuda_model *cm = model_of(m);
  TRY(cuda_device_usable(cm->dev));
  CU(cudaSetDevice(cm->dev));
  lora_cache_drop(cm->lora);     // sessions' adapter copies: made again when next used
  train_view v = {cm->stream, cm->blas, cm->layer, cm->embed, cm->norm, cm->lm_head, cm->inv_freq, m->cfg.layer_sliding, cm->d,
                  cm->precision, m->threads, &cm->train, &cm->train_bytes};
  return cuda_lora_backward(&v, a, ids, mask, n, seg0, loss, count);
}

static const gptoss_backend cuda_backend = {
  "cuda", cuda_model_init, cuda_model_free, cuda_session_init, cuda_session_free, cuda_session_copy,
  cuda_run, PASS_TOKENS, cuda_sample, cuda_memory, cuda_decode, cuda_logits, cuda_session_bytes, cuda_train, cuda_comm_new,
};

extern "C" __attribute__((visibility("default"))) const gptoss_backend *gptoss_cuda_backend(void) { return &cuda_backend; }
