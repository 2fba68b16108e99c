// comm.cu: the communicator of a model split over GPUs (csrc/split.c,
// csrc/backend.h): each layer, every rank's experts' rows (zeros where
// another rank's expert) are summed over the ranks in place, on the rank's
// stream.
//
// Across distinct GPUs the sum is NCCL's all-reduce. NCCL is opened with
// dlopen when a split model is loaded (GPTOSS_NCCL_LIB, else libnccl.so.2
// on the library path or beside CUDA), so cuda.so loads where NCCL is
// missing and only a split over several GPUs needs it. NCCL takes one rank
// a GPU; ranks that share a GPU (cuda:0+cuda:0), or a machine without
// NCCL, stage the rows through pinned host memory and sum them there
// (csrc/comm.c). GPTOSS_COMM=nccl or =host chooses; NCCL's NVLink
// multicast (NVLS) is left off unless NCCL_NVLS_ENABLE is set.
//
// Every element is nonzero on one rank at most, so either sum is exact and
// the ranks combine the same rows as one GPU would.
#include <dlfcn.h>
#include "backend.cuh"
#if __has_include(<nccl.h>)
#include <nccl.h>
#define HAVE_NCCL 1
#else
// built where CUDA came without NCCL's header: the ranks stage through the host
#define HAVE_NCCL 0
typedef struct ncclComm *ncclComm_t;
typedef int ncclResult_t;
#endif

// {====================================================== NCCL, opened at run time
#if HAVE_NCCL
struct nccl_api {
  decltype(&ncclCommInitAll) init_all;
  decltype(&ncclAllReduce) all_reduce;
  decltype(&ncclCommAbort) abort;
  decltype(&ncclCommDestroy) destroy;
  decltype(&ncclGetErrorString) error;
};

static gptoss_status nccl_open(nccl_api *api) {
  static const char *const places[] = {"libnccl.so.2", "/usr/local/cuda/lib/libnccl.so.2", "/usr/local/cuda/lib64/libnccl.so.2"};
  const char *env = getenv("GPTOSS_NCCL_LIB");
  void *h = NULL;
  if (env && *env) {
    if (!(h = dlopen(env, RTLD_NOW | RTLD_LOCAL)))
      return gptoss_fail(GPTOSS_EUNSUP, "GPTOSS_NCCL_LIB=%s: %s", env, dlerror());
  } else
    for (int i = 0; i < 3 && !h; i++) h = dlopen(places[i], RTLD_NOW | RTLD_LOCAL);
  if (!h) return gptoss_fail(GPTOSS_EUNSUP, "NCCL (libnccl.so.2) was not found; set GPTOSS_NCCL_LIB to its path");
  api->init_all = (decltype(api->init_all))dlsym(h, "ncclCommInitAll");
  api->all_reduce = (decltype(api->all_reduce))dlsym(h, "ncclAllReduce");
  api->abort = (decltype(api->abort))dlsym(h, "ncclCommAbort");
  api->destroy = (decltype(api->destroy))dlsym(h, "ncclCommDestroy");
  api->error = (decltype(api->error))dlsym(h, "ncclGetErrorString");
  if (!api->init_all || !api->all_reduce || !api->abort || !api->destroy || !api->error)
    return gptoss_fail(GPTOSS_EUNSUP, "the NCCL library found lacks ncclCommInitAll, ncclAllReduce or ncclCommAbort");
  return GPTOSS_OK;
}
#else
struct nccl_api {
  void (*abort)(ncclComm_t);
  void (*destroy)(ncclComm_t);
};
static gptoss_status nccl_open(nccl_api *) {
  return gptoss_fail(GPTOSS_EUNSUP, "this cuda.so was built without NCCL's header (nccl.h)");
}
#endif
// }======================================================

struct gpu_comm {
  gptoss_comm c;
  int *devs;                 // [ranks]
  // NCCL: one communicator a rank, made together
  nccl_api nccl;
  ncclComm_t *comms;         // [ranks], NULL when staging through the host
  int broken;                // aborted: made again at reset
  // staging: each rank's pinned buffer, and the host comm that sums them
  gptoss_comm *host;
  float **stage;             // [ranks]
  size_t *stage_cap;         // [ranks] floats
};

#if HAVE_NCCL
static gptoss_status nccl_fail(gpu_comm *g, ncclResult_t r, const char *what) {
  return gptoss_fail(GPTOSS_EDEVICE, "NCCL %s: %s", what, g->nccl.error(r));
}

static gptoss_status nccl_make(gpu_comm *g) {
  // NVLink multicast stays off on the lent machines (and costs memory): only
  // when the user has not said otherwise
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  ncclResult_t r = g->nccl.init_all(g->comms, g->c.ranks, g->devs);
  if (r != ncclSuccess) return nccl_fail(g, r, "ncclCommInitAll");
  g->broken = 0;
  return GPTOSS_OK;
}
#else
static gptoss_status nccl_make(gpu_comm *) { return gptoss_fail(GPTOSS_EUNSUP, "no NCCL"); }
#endif

static gptoss_status gpu_sum(gptoss_comm *c, int rank, float *buf, size_t n, void *stream) {
  gpu_comm *g = (gpu_comm *)c;
  cudaStream_t st = (cudaStream_t)stream;
#if HAVE_NCCL
  if (g->comms) {
    if (g->broken) return gptoss_fail(GPTOSS_ESTATE, "another rank of the split model failed during this pass");
    ncclResult_t r = g->nccl.all_reduce(buf, buf, n, ncclFloat32, ncclSum, g->comms[rank], st);
    return r == ncclSuccess ? GPTOSS_OK : nccl_fail(g, r, "ncclAllReduce");
  }
#endif
  if (n > g->stage_cap[rank]) {
    if (g->stage[rank]) cudaFreeHost(g->stage[rank]);
    g->stage[rank] = NULL;
    g->stage_cap[rank] = 0;
    CU(cudaHostAlloc((void **)&g->stage[rank], sizeof(float) * n, cudaHostAllocPortable));
    g->stage_cap[rank] = n;
  }
  float *h = g->stage[rank];
  CU(cudaMemcpyAsync(h, buf, sizeof(float) * n, cudaMemcpyDeviceToHost, st));
  CU(cudaStreamSynchronize(st));
  TRY(g->host->sum(g->host, rank, h, n, NULL));
  // the stream's next operations wait for the copy back; the next sum's
  // synchronize keeps h from being written before it is done
  CU(cudaMemcpyAsync(buf, h, sizeof(float) * n, cudaMemcpyHostToDevice, st));
  return GPTOSS_OK;
}

static void gpu_abort(gptoss_comm *c) {
  gpu_comm *g = (gpu_comm *)c;
  if (g->comms) {
    if (g->broken) return;
    g->broken = 1;
    // wakes the ranks whose all-reduce waits for the failed one
    for (int r = 0; r < c->ranks; r++) g->nccl.abort(g->comms[r]);
  } else
    g->host->abort(g->host);
}

static gptoss_status gpu_reset(gptoss_comm *c) {
  gpu_comm *g = (gpu_comm *)c;
  if (g->comms) return g->broken ? nccl_make(g) : GPTOSS_OK;
  return g->host->reset(g->host);
}

static void gpu_free(gptoss_comm *c) {
  gpu_comm *g = (gpu_comm *)c;
  if (!g) return;
  if (g->comms && !g->broken)
    for (int r = 0; r < c->ranks; r++) g->nccl.destroy(g->comms[r]);
  for (int r = 0; g->stage && r < c->ranks; r++)
    if (g->stage[r]) cudaFreeHost(g->stage[r]);
  if (g->host) g->host->free(g->host);
  free(g->comms); free(g->devs); free(g->stage); free(g->stage_cap);
  free(g);
}

gptoss_status cuda_comm_new(const int *devices, int n, gptoss_comm **out) {
  *out = NULL;
  gpu_comm *g = (gpu_comm *)calloc(1, sizeof *g);
  if (!g) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  g->c.ranks = n;
  g->c.sum = gpu_sum; g->c.abort = gpu_abort; g->c.reset = gpu_reset; g->c.free = gpu_free;
  g->devs = (int *)calloc((size_t)n, sizeof(int));
  if (!g->devs) { free(g); return gptoss_fail(GPTOSS_ENOMEM, "out of memory"); }
  memcpy(g->devs, devices, sizeof(int) * (size_t)n);
  int distinct = 1;
  for (int i = 0; i < n; i++)
    for (int j = 0; j < i; j++) distinct &= devices[i] != devices[j];
  const char *want = getenv("GPTOSS_COMM");
  int nccl = distinct && !(want && strcmp(want, "host") == 0);
  gptoss_status rc = GPTOSS_OK;
  if (want && strcmp(want, "nccl") == 0 && !distinct)
    rc = gptoss_fail(GPTOSS_EARG, "GPTOSS_COMM=nccl: NCCL takes one rank a GPU, and this split repeats a GPU");
  if (!rc && nccl) {
    rc = nccl_open(&g->nccl);
    // without NCCL the ranks stage through the host, unless NCCL was asked for
    if (rc && !(want && strcmp(want, "nccl") == 0)) { rc = GPTOSS_OK; nccl = 0; }
    if (!rc && nccl) {
      if (!(g->comms = (ncclComm_t *)calloc((size_t)n, sizeof *g->comms))) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory");
      else rc = nccl_make(g);
      if (rc) { free(g->comms); g->comms = NULL; }
    }
  }
  if (!rc && !nccl) {
    g->stage = (float **)calloc((size_t)n, sizeof *g->stage);
    g->stage_cap = (size_t *)calloc((size_t)n, sizeof *g->stage_cap);
    if (!g->stage || !g->stage_cap) rc = gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    else rc = gptoss_comm_host(n, &g->host);
  }
  if (rc) { g->broken = 1; gpu_free(&g->c); return rc; }
  *out = &g->c;
  return GPTOSS_OK;
}
