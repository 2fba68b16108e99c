// lora.cu: LoRA adapters in the inference forward (sessions with an
// adapter). Each adapter a batch uses gets a device copy, made again when
// gptoss_adapter_version changes; each token finds its session's copy
// through a per-token pointer, so one batch can mix adapters and plain
// sessions. A projection's delta, scale * B (A x), joins the base product
// before anything nonlinear: q, k and v before RoPE, o before the residual,
// an expert's gate_up before SwiGLU (moe.cu's epilogue adds it), its down
// before the routing weights.
//
// The deltas run in fp32 from the activations the base GEMMs read (split
// bf16 in precision "exact", so within ~1e-5 of the CPU's fp32).
//
// CPU reference: lora_add and cpu_lora_expert in csrc/cpu/forward.c.
#include "common.cuh"

// {====================================================== device copies
struct lora_entry {
  gptoss_adapter *a;         // a reference of our own: dropped when it is the last one
  uint64_t version;
  char *mem;
  size_t bytes;
};

struct lora_cache {
  lora_entry *e;
  int n, cap;
  size_t bytes;              // entries' device bytes
  const dlora_mod **tok_host, **tok_dev;   // pinned / device [tok_cap]
  int tok_cap;
  float *work;               // u [rows][rmax], then the gate_up delta [rows][2I]
  size_t work_bytes;
};

static void entry_free(lora_entry *x) {
  if (x->mem) cudaFree(x->mem);
  gptoss_adapter_free(x->a);
  x->mem = NULL; x->a = NULL;
}

void lora_cache_drop(lora_cache *c) {
  if (!c) return;
  for (int i = 0; i < c->n; i++) entry_free(&c->e[i]);
  c->n = 0;
  c->bytes = 0;
  if (c->work) cudaFree(c->work);
  c->work = NULL;
  c->work_bytes = 0;
}

void lora_cache_free(lora_cache *c) {
  if (!c) return;
  lora_cache_drop(c);
  if (c->tok_host) cudaFreeHost(c->tok_host);
  if (c->tok_dev) cudaFree(c->tok_dev);
  free(c->e);
  free(c);
}

size_t lora_cache_bytes(const lora_cache *c) { return c ? c->bytes + c->work_bytes : 0; }

// One allocation per adapter: its [L][modules] table, then each module's A
// as the host holds it ([E][r][in]) and B regrouped per expert, [E][out][r],
// so that an output's r weights are consecutive.
static gptoss_status upload(lora_entry *x, const lora_view *v) {
  const int M = GPTOSS_LORA_MODULES;
  size_t tab_bytes = (sizeof(dlora_mod) * (size_t)v->L * M + 255) & ~(size_t)255, floats = 0;
  for (int l = 0; l < v->L; l++)
    for (int m = 0; m < M; m++) {
      const gptoss_lora *h = gptoss_adapter_module(x->a, l, (gptoss_lora_module)m);
      if (h) floats += (size_t)h->rk * (h->in + h->out);
    }
  size_t bytes = tab_bytes + sizeof(float) * floats;
  if (v->budget && v->used + bytes > v->budget)
    return gptoss_fail(GPTOSS_ENOMEM, "the adapter's device copy needs %.1f MB beyond the memory budget of %.1f MB",
                       bytes / 1e6, v->budget / 1e6);
  char *host = (char *)malloc(bytes);
  if (!host) return gptoss_fail(GPTOSS_ENOMEM, "out of memory (%.1f MB staging an adapter)", bytes / 1e6);
  cudaError_t e = cudaMalloc((void **)&x->mem, bytes);
  if (e != cudaSuccess) { free(host); x->mem = NULL; return cuda_fail(e, "the adapter's device copy", __FILE__, __LINE__); }
  dlora_mod *tab = (dlora_mod *)host;
  memset(tab, 0, tab_bytes);
  size_t off = tab_bytes;
  for (int l = 0; l < v->L; l++)
    for (int m = 0; m < M; m++) {
      const gptoss_lora *h = gptoss_adapter_module(x->a, l, (gptoss_lora_module)m);
      if (!h) continue;
      int E = h->experts ? h->experts : 1, r = h->r;
      float *A = (float *)(host + off), *B = A + (size_t)h->rk * h->in;
      memcpy(A, h->A, sizeof(float) * (size_t)h->rk * h->in);
      for (int ex = 0; ex < E; ex++)
        for (int o = 0; o < h->out; o++)
          for (int k = 0; k < r; k++) B[((size_t)ex * h->out + o) * r + k] = h->B[(size_t)o * h->rk + (size_t)k * E + ex];
      dlora_mod *d = &tab[l * M + m];
      d->A = (const float *)(x->mem + off);
      d->B = (const float *)(x->mem + off + sizeof(float) * (size_t)h->rk * h->in);
      d->r = r; d->in = h->in; d->out = h->out; d->scale = h->scale;
      off += sizeof(float) * (size_t)h->rk * (h->in + h->out);
    }
  e = cudaMemcpy(x->mem, host, bytes, cudaMemcpyHostToDevice);
  free(host);
  if (e != cudaSuccess) { cudaFree(x->mem); x->mem = NULL; return cuda_fail(e, "uploading an adapter", __FILE__, __LINE__); }
  x->bytes = bytes;
  x->version = gptoss_adapter_version(x->a);
  return GPTOSS_OK;
}

static gptoss_status entry_for(lora_cache *c, gptoss_adapter *a, const lora_view *v, lora_entry **out) {
  for (int i = 0; i < c->n; i++) {
    lora_entry *x = &c->e[i];
    if (x->a != a) continue;
    if (x->version != gptoss_adapter_version(a)) {   // written since: copied again
      c->bytes -= x->bytes;
      cudaFree(x->mem);
      x->mem = NULL;
      lora_view w = *v;
      w.used += c->bytes + c->work_bytes;
      gptoss_status rc = upload(x, &w);
      if (rc) { gptoss_adapter_free(x->a); c->e[i] = c->e[--c->n]; return rc; }
      c->bytes += x->bytes;
    }
    *out = x;
    return GPTOSS_OK;
  }
  if (c->n == c->cap) {
    int cap = c->cap ? 2 * c->cap : 4;
    lora_entry *e = (lora_entry *)realloc(c->e, sizeof(lora_entry) * cap);
    if (!e) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    c->e = e; c->cap = cap;
  }
  lora_entry *x = &c->e[c->n];
  memset(x, 0, sizeof *x);
  x->a = gptoss_adapter_ref(a);
  lora_view w = *v;
  w.used += c->bytes + c->work_bytes;
  gptoss_status rc = upload(x, &w);
  if (rc) { gptoss_adapter_free(x->a); return rc; }
  c->n++;
  c->bytes += x->bytes;
  *out = x;
  return GPTOSS_OK;
}

// drops the entries nobody else holds any more; makes the cache when want
static gptoss_status sweep(lora_cache **pc, bool want) {
  lora_cache *c = *pc;
  if (c)
    for (int i = 0; i < c->n;)
      if (gptoss_adapter_refs(c->e[i].a) == 1) { c->bytes -= c->e[i].bytes; entry_free(&c->e[i]); c->e[i] = c->e[--c->n]; }
      else i++;
  if (c && c->n == 0 && c->work) { cudaFree(c->work); c->work = NULL; c->work_bytes = 0; }
  if (!c && want) {
    if (!(c = (lora_cache *)calloc(1, sizeof *c))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    *pc = c;
  }
  return GPTOSS_OK;
}

// the adapter's current table (the first part of its copy) and its rank
static gptoss_status table_of(lora_cache *c, const lora_view *v, gptoss_adapter *a, const dlora_mod **tab, int *r) {
  lora_entry *x;
  gptoss_status rc = entry_for(c, a, v, &x);
  if (rc) return rc;
  gptoss_adapter_desc dsc;
  gptoss_adapter_info(a, &dsc);
  *tab = (const dlora_mod *)x->mem;
  *r = dsc.r;
  return GPTOSS_OK;
}

gptoss_status lora_table(lora_cache **pc, const lora_view *v, gptoss_adapter *a, const dlora_mod **tab, int *r) {
  gptoss_status rc = sweep(pc, true);
  return rc ? rc : table_of(*pc, v, a, tab, r);
}

gptoss_status lora_bind(lora_cache **pc, const lora_view *v, gptoss_session *const *ss, int nss, const int32_t *sidx, int T,
                        int rows, const dlora_mod *const **tok, float **u, int *rmax, float **delta) {
  *tok = NULL;
  int any = 0;
  for (int i = 0; i < nss; i++) any |= ss[i]->adapter != NULL;
  gptoss_status rc0 = sweep(pc, any);   // whether or not this batch has adapters
  if (rc0 || !any) return rc0;
  lora_cache *c = *pc;
  if (T > c->tok_cap) {
    if (c->tok_host) cudaFreeHost(c->tok_host);
    if (c->tok_dev) cudaFree(c->tok_dev);
    c->tok_host = NULL; c->tok_dev = NULL; c->tok_cap = 0;
    CU(cudaHostAlloc((void **)&c->tok_host, sizeof(dlora_mod *) * T, cudaHostAllocDefault));
    CU(cudaMalloc((void **)&c->tok_dev, sizeof(dlora_mod *) * T));
    c->tok_cap = T;
  }
  // each session's table (the first entry of its copy), and the largest rank
  const dlora_mod **st = (const dlora_mod **)calloc((size_t)nss, sizeof *st);
  if (!st) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  int r = 0;
  for (int i = 0; i < nss; i++) {
    int ri;
    if (!ss[i]->adapter) continue;
    gptoss_status rc = table_of(c, v, ss[i]->adapter, &st[i], &ri);
    if (rc) { free(st); return rc; }
    if (ri > r) r = ri;
  }
  size_t need = sizeof(float) * (size_t)rows * r + sizeof(float) * (size_t)rows * 2 * v->I;
  if (need > c->work_bytes) {
    if (c->work) cudaFree(c->work);
    c->work = NULL; c->work_bytes = 0;
    if (v->budget && v->used + c->bytes + need > v->budget) {
      free(st);
      return gptoss_fail(GPTOSS_ENOMEM, "LoRA on %d tokens needs %.1f MB of workspace beyond the memory budget of %.1f MB", T,
                         need / 1e6, v->budget / 1e6);
    }
    cudaError_t e = cudaMalloc((void **)&c->work, need);
    if (e != cudaSuccess) { free(st); return cuda_fail(e, "LoRA workspace", __FILE__, __LINE__); }
    c->work_bytes = need;
  }
  for (int t = 0; t < T; t++) c->tok_host[t] = st[sidx[t]];
  free(st);
  CU(cudaMemcpyAsync(c->tok_dev, c->tok_host, sizeof(dlora_mod *) * T, cudaMemcpyHostToDevice, v->stream));
  *tok = c->tok_dev;
  *u = c->work;
  *rmax = r;
  *delta = c->work + (size_t)rows * r;
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== deltas
// Row j of a pass is token j, or with perm the j-th (token, expert)
// assignment in expert order. Its module, or NULL where its token's session
// has no adapter or the adapter no LoRA here.
__device__ __forceinline__ const dlora_mod *pass_row(const lora_pass &p, int mod, int j, int *t, int *e, int *a) {
  int tt = j, ee = 0, aa = j;
  if (p.perm) { aa = p.perm[j]; tt = aa / p.K; ee = p.sel[aa]; }
  *t = tt; *e = ee; *a = aa;
  const dlora_mod *tab = p.tok[tt];
  if (!tab) return NULL;
  const dlora_mod *m = tab + p.layer * GPTOSS_LORA_MODULES + mod;
  return m->r ? m : NULL;
}

// u[j][k0 .. k0 + LORA_RB) = A_e x_j: a block per row and LORA_RB ranks, the
// threads across the input (four values a load), so that one row, as in
// decode, is not a few threads walking 3k values one latency at a time
#define LORA_RB 4
#define LORA_THREADS 256

__device__ __forceinline__ float4 lora_x4(const lora_pass &p, size_t at) {
  if (p.xf) return *reinterpret_cast<const float4 *>(p.xf + at);
  uint2 h = *reinterpret_cast<const uint2 *>(p.xh + at);
  float2 a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&h.x));
  float2 b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&h.y));
  float4 v = make_float4(a.x, a.y, b.x, b.y);
  if (p.xl) {
    uint2 l = *reinterpret_cast<const uint2 *>(p.xl + at);
    a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&l.x));
    b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&l.y));
    v.x += a.x; v.y += a.y; v.z += b.x; v.w += b.y;
  }
  return v;
}

__device__ __forceinline__ float lora_x1(const lora_pass &p, size_t at) {
  if (p.xf) return p.xf[at];
  return __bfloat162float(p.xh[at]) + (p.xl ? __bfloat162float(p.xl[at]) : 0.f);
}

__global__ void __launch_bounds__(LORA_THREADS) lora_a_kernel(lora_pass p) {
  __shared__ float red[LORA_RB][LORA_THREADS / 32];
  int j = blockIdx.x, z = blockIdx.z, t, e, a;
  const dlora_mod *m = pass_row(p, p.mod[z], j, &t, &e, &a);
  int k0 = blockIdx.y * LORA_RB;
  if (!m || k0 >= m->r) return;
  int nk = m->r - k0 < LORA_RB ? m->r - k0 : LORA_RB;
  int in = m->in;
  size_t x0 = (size_t)(p.in_sorted ? j : t) * in;
  const float *A = m->A + ((size_t)e * m->r + k0) * in;
  float acc[LORA_RB] = {0.f, 0.f, 0.f, 0.f};
  if ((in & 3) == 0) {
    for (int h = 4 * threadIdx.x; h < in; h += 4 * LORA_THREADS) {
      float4 x = lora_x4(p, x0 + h);
#pragma unroll
      for (int kk = 0; kk < LORA_RB; kk++) {
        if (kk >= nk) break;
        float4 w = *reinterpret_cast<const float4 *>(A + (size_t)kk * in + h);
        acc[kk] += w.x * x.x + w.y * x.y + w.z * x.z + w.w * x.w;
      }
    }
  } else {
    for (int h = threadIdx.x; h < in; h += LORA_THREADS) {
      float x = lora_x1(p, x0 + h);
#pragma unroll
      for (int kk = 0; kk < LORA_RB; kk++)
        if (kk < nk) acc[kk] += A[(size_t)kk * in + h] * x;
    }
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int kk = 0; kk < LORA_RB; kk++) {
    float v = warp_sum(acc[kk]);
    if (lane == 0) red[kk][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < nk) {
    float v = 0.f;
    for (int w = 0; w < LORA_THREADS / 32; w++) v += red[threadIdx.x][w];
    p.u[((size_t)z * p.n + j) * p.rmax + k0 + threadIdx.x] = v;
  }
}

// out[.][c] (+)= scale * B_e[c] . u[j]: blocks of 256 outputs of one row
__global__ void lora_b_kernel(lora_pass p) {
  extern __shared__ float us[];
  int j = blockIdx.y, z = blockIdx.z, t, e, a;
  const dlora_mod *m = pass_row(p, p.mod[z], j, &t, &e, &a);
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (!m) {
    if (p.mode == LORA_SET_ROW && c < p.ostride) p.out[(size_t)j * p.ostride + c] = 0.f;
    return;
  }
  int r = m->r;
  for (int k = threadIdx.x; k < r; k += blockDim.x) us[k] = p.u[((size_t)z * p.n + j) * p.rmax + k];
  __syncthreads();
  if (c >= m->out) {
    if (p.mode == LORA_SET_ROW && c < p.ostride) p.out[(size_t)j * p.ostride + c] = 0.f;
    return;
  }
  const float *B = m->B + ((size_t)e * m->out + c) * r;
  float s = 0.f;
  if ((r & 3) == 0) {
    for (int k = 0; k < r; k += 4) {
      float4 b = *reinterpret_cast<const float4 *>(B + k);
      s += b.x * us[k] + b.y * us[k + 1] + b.z * us[k + 2] + b.w * us[k + 3];
    }
  } else
    for (int k = 0; k < r; k++) s += B[k] * us[k];
  s *= m->scale;
  if (p.mode == LORA_ADD_TOKEN) p.out[(size_t)t * p.ostride + p.ooff[z] + c] += s;
  else if (p.mode == LORA_SET_ROW) p.out[(size_t)j * p.ostride + c] = s;
  else p.out[(size_t)a * p.ostride + p.ooff[z] + c] += s;
}

lora_pass lora_pass_of(const dlora_mod *const *tok, int layer, int nm, const int *mods, const int *ooffs, int n, const int32_t *perm,
                       const int32_t *sel, int K, const float *xf, const bf16 *xh, const bf16 *xl, int in_sorted, float *u, int rmax,
                       float *out, int ostride, int mode) {
  lora_pass p;
  memset(&p, 0, sizeof p);
  p.tok = tok; p.layer = layer; p.nm = nm;
  for (int i = 0; i < nm && i < LORA_PASS_MODS; i++) { p.mod[i] = mods[i]; p.ooff[i] = ooffs[i]; }
  p.n = n; p.perm = perm; p.sel = sel; p.K = K; p.xf = xf; p.xh = xh; p.xl = xl; p.in_sorted = in_sorted;
  p.u = u; p.rmax = rmax; p.out = out; p.ostride = ostride; p.mode = mode;
  return p;
}

void launch_lora(const lora_pass *p, int outs, cudaStream_t s) {
  if (p->n <= 0) return;
  lora_a_kernel<<<dim3(p->n, (p->rmax + LORA_RB - 1) / LORA_RB, p->nm), LORA_THREADS, 0, s>>>(*p);
  dim3 grid((outs + 255) / 256, p->n, p->nm);
  lora_b_kernel<<<grid, 256, sizeof(float) * p->rmax, s>>>(*p);
}
// }======================================================
