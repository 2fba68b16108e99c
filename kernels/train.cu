// train.cu: the CUDA backward pass for LoRA training.
//
// The computation of csrc/cpu/train.c, its reference (and PEFT's): one
// sequence, each layer's input kept (activation checkpointing per layer),
// each layer recomputed and walked back. Activations and gradients are fp32.
// The frozen weights enter the tensor cores as bf16 (cuBLAS; the MXFP4
// experts decoded inside mxfp4_gemm.cu's grouped kernel, which is exact),
// against activations rounded to bf16 (precision "fast") or split into two
// bf16 terms (precision "exact", about 16 significant bits). Precision
// "mixed" splits them where they decide which experts each token reaches
// (every layer's forward up to its router, and the forward's expert
// products, which feed the next layer's) and in the attention backward, and
// takes bf16 elsewhere (the recompute's expert products, the loss head, the
// backward's products): a rounding that tips a top-k moves the gradients
// by percents, where bf16 products after the routing move them by less
// than 1e-2. Attention (flash_attention.cu) takes the same operands in
// tiles that never hold the scores.
// LoRA weights, their products and their gradients stay fp32: they are the
// master weights, which the host's AdamW updates.
//
// Head sizes flash_attention.cu has no tiles for materialise the scores of
// a few heads at a time instead (sharing one key/value head, so the batched
// cuBLAS products broadcast it), in fp32 ("exact") or cuBLAS's bf16 mode.
// The experts' rows, sorted by launch_moe_sort, run through one grouped
// product per matrix.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include "common.cuh"

#define TRY(call) do { gptoss_status r_ = (call); if (r_) return r_; } while (0)

// for GPTOSS_PROFILE's host labels
static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// {====================================================== kernels
// x[rows[i]] (rows NULL: x[i]) normalised: out[i] = w * x / rms(x); inv[i] = 1 / rms
__global__ void rms_fwd_kernel(const float *x, const int32_t *rows, const bf16 *w, float *out, float *inv, int H, float eps) {
  __shared__ float red[32];
  int i = blockIdx.x;
  const float *xr = x + (size_t)(rows ? rows[i] : i) * H;
  float r = block_inv_rms(xr, H, eps, red);
  for (int c = threadIdx.x; c < H; c += blockDim.x) out[(size_t)i * H + c] = __bfloat162float(w[c]) * (xr[c] * r);
  if (threadIdx.x == 0) inv[i] = r;
}

// dx[row] += w dy r - x (sum w dy x) r^3 / H, row = rows[i] (or i)
__global__ void rms_bwd_kernel(float *dx, const float *x, const int32_t *rows, const float *inv, const bf16 *w, const float *dy,
                               int H) {
  __shared__ float red[32];
  int i = blockIdx.x;
  size_t row = (size_t)(rows ? rows[i] : i) * H;
  const float *xr = x + row, *g = dy + (size_t)i * H;
  float s = 0.f;
  for (int c = threadIdx.x; c < H; c += blockDim.x) s += __bfloat162float(w[c]) * g[c] * xr[c];
  s = block_sum(s, red);
  float r = inv[i], k = s * r * r * r / (float)H;
  for (int c = threadIdx.x; c < H; c += blockDim.x) dx[row + c] += __bfloat162float(w[c]) * g[c] * r - xr[c] * k;
}

// y[t][n] += bias[n] (row stride ld)
__global__ void bias_kernel(float *y, int ld, const bf16 *bias, int N, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i / N * ld + i % N] += __bfloat162float(bias[i % N]);
}

// rows x cols (row stride ld) into contiguous bf16 hi (+ lo: split bf16):
// a block per row, four columns a thread where the rows are whole float4s
__global__ void split_kernel(const float *x, int ld, int cols, bf16 *hi, bf16 *lo) {
  size_t r = blockIdx.x;
  const float *xr = x + r * ld;
  bf16 *h = hi + r * cols, *l = lo ? lo + r * cols : NULL;
  if ((cols & 3) || (ld & 3)) {
    for (int c = threadIdx.x; c < cols; c += blockDim.x) store_split(h, l, c, xr[c]);
    return;
  }
  for (int c = 4 * threadIdx.x; c < cols; c += 4 * blockDim.x) {
    float4 v = *reinterpret_cast<const float4 *>(xr + c);
    uint2 lv;
    *reinterpret_cast<uint2 *>(h + c) = make_uint2(split_pair(v.x, v.y, l ? &lv.x : NULL), split_pair(v.z, v.w, l ? &lv.y : NULL));
    if (l) *reinterpret_cast<uint2 *>(l + c) = lv;
  }
}

// RoPE on nh heads of each row (row stride ld): the half-split rotation of
// cpu_rope, by angle sign * t * inv_freq (sign -1: the backward)
__global__ void rope_kernel(float *y, int ld, int T, int nh, int D, const float *inv_freq, float scale, float sign) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, half = D / 2;
  if (i >= (size_t)T * nh * half) return;
  int t = (int)(i / (nh * half)), h = (int)(i / half % nh), k = (int)(i % half);
  float th = sign * (float)t * inv_freq[k], sn, cs;
  sincosf(th, &sn, &cs);
  cs *= scale; sn *= scale;
  float *p = y + (size_t)t * ld + (size_t)h * D;
  float a = p[k], b = p[k + half];
  p[k] = a * cs - b * sn;
  p[k + half] = b * cs + a * sn;
}

__device__ __forceinline__ float block_max(float v, float *red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
  return t;
}

struct att_rows {
  int T, Hq, h0;            // h0: the batch's first head
  int window;               // keys t - window + 1 .. t on a sliding layer, else 0
  const bf16 *sinks;
  float *lse;               // [T][Hq]
};

__device__ __forceinline__ int first_key(const att_rows &a, int t) {
  return a.window && t - a.window + 1 > 0 ? t - a.window + 1 : 0;
}

// One block per (query t, head i of the batch): scaled scores into
// probabilities over the causal window plus the head's sink (which takes
// probability but has no value); lse keeps log(sum) for the backward.
__global__ void softmax_kernel(float *S, att_rows a) {
  __shared__ float red[32];
  int t = blockIdx.x, i = blockIdx.y, h = a.h0 + i, j0 = first_key(a, t);
  float *row = S + ((size_t)i * a.T + t) * a.T;
  float sink = __bfloat162float(a.sinks[h]), mx = sink;
  for (int j = j0 + threadIdx.x; j <= t; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int j = j0 + threadIdx.x; j <= t; j += blockDim.x) sum += expf(row[j] - mx);
  sum = block_sum(sum, red) + expf(sink - mx);
  float lse = mx + logf(sum);
  for (int j = threadIdx.x; j < a.T; j += blockDim.x) row[j] = j >= j0 && j <= t ? expf(row[j] - lse) : 0.f;
  if (threadIdx.x == 0) a.lse[(size_t)t * a.Hq + h] = lse;
}

// The backward's recomputed scores into the forward's probabilities
__global__ void probs_kernel(float *S, att_rows a) {
  int t = blockIdx.x, i = blockIdx.y, h = a.h0 + i, j0 = first_key(a, t);
  float *row = S + ((size_t)i * a.T + t) * a.T;
  float lse = a.lse[(size_t)t * a.Hq + h];
  for (int j = threadIdx.x; j < a.T; j += blockDim.x) row[j] = j >= j0 && j <= t ? expf(row[j] - lse) : 0.f;
}

// dS = P (dP - dO.O) scale, into dP; dO and O: rows of Q floats, head h at h*D
__global__ void dsoftmax_kernel(const float *P, float *dP, const float *dO, const float *O, int Q, int D, float scale, att_rows a) {
  __shared__ float red[32];
  int t = blockIdx.x, i = blockIdx.y, h = a.h0 + i;
  size_t off = ((size_t)i * a.T + t) * a.T;
  const float *o = O + (size_t)t * Q + (size_t)h * D, *g = dO + (size_t)t * Q + (size_t)h * D;
  float dd = 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) dd += o[d] * g[d];
  dd = block_sum(dd, red);
  for (int j = threadIdx.x; j <= t; j += blockDim.x) dP[off + j] = P[off + j] * (dP[off + j] - dd) * scale;
  for (int j = t + 1 + threadIdx.x; j < a.T; j += blockDim.x) dP[off + j] = 0.f;
}

// one warp per token: the router's top-k and softmax, as the inference path
__global__ void topk_kernel(const float *rl, int T, int E, int K, int32_t *sel, float *w) {
  int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (t < T) warp_topk(rl + (size_t)t * E, E, K, sel + (size_t)t * K, w + (size_t)t * K);
}

__global__ void invperm_kernel(const int32_t *perm, int32_t *invp, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) invp[perm[i]] = i;
}

// xg[i] = xn[token of sorted row i]
__global__ void gather_kernel(const float *xn, const int32_t *perm, int K, int H, float *xg) {
  int i = blockIdx.x;
  const float *src = xn + (size_t)(perm[i] / K) * H;
  for (int c = threadIdx.x; c < H; c += blockDim.x) xg[(size_t)i * H + c] = src[c];
}

// clamped SwiGLU over interleaved (gate, up), as cpu_swiglu
__global__ void swiglu_kernel(const float *gu, float *act, size_t n, float limit) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float g = fminf(gu[2 * i], limit), u = fmaxf(fminf(gu[2 * i + 1], limit), -limit);
  act[i] = g / (1.f + expf(-1.702f * g)) * (u + 1.f);
}

// its backward, in place: gu (the pre-activations) becomes d gu, for d act
// = w_k ud (the routing weight of sorted row i / I times the unweighted
// gradient). A clamp passes the gradient where its input is inside [min, max].
__global__ void swiglu_bwd_kernel(float *gu, const float *ud, const float *w, const int32_t *perm, int I, size_t n, float limit) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gt = gu[2 * i], up = gu[2 * i + 1], g = ud[i] * w[perm[i / I]];
  float gc = fminf(gt, limit), uc = fmaxf(fminf(up, limit), -limit);
  float sg = 1.f / (1.f + expf(-1.702f * gc));
  gu[2 * i + 1] = up >= -limit && up <= limit ? g * gc * sg : 0.f;
  gu[2 * i] = gt <= limit ? g * (uc + 1.f) * (sg + gc * 1.702f * sg * (1.f - sg)) : 0.f;
}

// out[t] = xmid[t] + sum_k w[t][k] ye[row of (t, k)]
__global__ void combine_kernel(float *out, const float *xmid, const float *ye, const float *w, const int32_t *invp, int H, int K) {
  int t = blockIdx.x;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = xmid[(size_t)t * H + c];
    for (int k = 0; k < K; k++) v += w[t * K + k] * ye[(size_t)invp[t * K + k] * H + c];
    out[(size_t)t * H + c] = v;
  }
}

// One block per token, dy = d out: the routing weights' gradients dw_k =
// dy . ye_k, through the softmax over the k chosen logits into the router's
// input (dxn = sum_k w_k (dw_k - sum_j w_j dw_j) W_router[e_k]). The
// recompute leaves out the down product ye_k = W_e act_k + b_e + (LoRA),
// so dy . ye_k comes as ud_k . act_k + dy . b_e, where ud_k = W_e^T dy +
// (LoRA) is the backward's own product taken on unweighted rows (the
// LoRA's term is ud's: (A^T dh) . act = dh . (A act)).
__global__ void route_bwd_kernel(const float *dy, const float *ud, const float *act, const bf16 *bias, const float *w,
                                 const int32_t *sel, const int32_t *invp, const bf16 *Wr, float *dxn, int H, int I, int K) {
  __shared__ float red[32], dw[32];
  int t = blockIdx.x;
  const float *g = dy + (size_t)t * H;
  for (int k = 0; k < K; k++) {
    size_t row = invp[t * K + k];
    const float *u = ud + row * I, *a = act + row * I;
    const bf16 *b = bias ? bias + (size_t)sel[t * K + k] * H : NULL;
    float s = 0.f;
    for (int c = threadIdx.x; c < I; c += blockDim.x) s += u[c] * a[c];
    if (b)
      for (int c = threadIdx.x; c < H; c += blockDim.x) s += g[c] * __bfloat162float(b[c]);
    s = block_sum(s, red);
    if (threadIdx.x == 0) dw[k] = s;
  }
  __syncthreads();
  float wdw = 0.f;
  for (int k = 0; k < K; k++) wdw += w[t * K + k] * dw[k];
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = 0.f;
    for (int k = 0; k < K; k++) v += w[t * K + k] * (dw[k] - wdw) * __bfloat162float(Wr[(size_t)sel[t * K + k] * H + c]);
    dxn[(size_t)t * H + c] = v;
  }
}

// x[i][c] *= w[(token, expert) of sorted row i], rows of n: the routing
// weights on rank-r rows of an expert LoRA's backward, computed unweighted
__global__ void scale_rows_kernel(float *x, int n, const float *w, const int32_t *perm, size_t total) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < total) x[i] *= w[perm[i / n]];
}

// dxn[t] += sum_k dxg[row of (t, k)]
__global__ void scatter_kernel(float *dxn, const float *dxg, const int32_t *invp, int H, int K) {
  int t = blockIdx.x;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = 0.f;
    for (int k = 0; k < K; k++) v += dxg[(size_t)invp[t * K + k] * H + c];
    dxn[(size_t)t * H + c] += v;
  }
}

// Cross-entropy of R rows of logits: loss[i] = lse - z[y]; the row becomes
// softmax - onehot (the gradient of the summed loss)
__global__ void xent_kernel(float *z, int V, const int32_t *target, float *loss) {
  __shared__ float red[32];
  int i = blockIdx.x;
  float *row = z + (size_t)i * V;
  float mx = -INFINITY;
  for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, row[v]);
  mx = block_max(mx, red);
  float s = 0.f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(row[v] - mx);
  s = block_sum(s, red);
  int y = target[i];
  float zy = row[y];
  __syncthreads();
  for (int v = threadIdx.x; v < V; v += blockDim.x) row[v] = expf(row[v] - mx) / s - (v == y ? 1.f : 0.f);
  if (threadIdx.x == 0) loss[i] = mx + logf(s) - zy;
}

struct drop_args { uint64_t key; int layer, mod; float p; };
// add 0: out = x * keep (contiguous); add 1: out (row stride ld) += x * keep
__global__ void dropout_kernel(const float *x, int ldx, float *out, int ldo, int n, size_t total, drop_args d, int add) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  int t = (int)(i / n), c = (int)(i % n);
  float v = x[(size_t)t * ldx + c] * gptoss_lora_keep(d.key, d.layer, d.mod, t, c, d.p);
  if (add) out[(size_t)t * ldo + c] += v;
  else out[(size_t)t * ldo + c] = v;
}
// }======================================================

// {====================================================== state
// One LoRA module's device copy. Expert modules keep B (and its gradient)
// per expert, [E][out][r], so that each expert's B is a plain matrix; the
// host layout is PEFT's [out][r * E] with column k * E + e.
struct dlora {
  gptoss_lora *host;
  int r, in, out, E;
  float scale;
  float *A, *B, *gA, *gB;
  size_t off;                // of A in the parameter block (B follows)
};

struct trainer {
  // buffers, for up to cap tokens
  int cap, cap_r;
  char *buf;
  size_t buf_bytes;
  float *xs;                 // [L + 1][T][H]: each layer's input, then the output
  float *xn1, *inv1, *qkv, *att, *lse, *xmid, *xn2, *inv2, *rl, *w;
  float *xg, *gu, *act, *ye; // sorted (token, expert) rows; the backward writes gradients over xg and gu, and
                             // dy's rows, then W^T dy, into ye
  float *dx, *dxn, *datt, *dqkv, *S, *dP, *xd, *tmp, *lh, *ldh, *xf, *lossrow;
  float *dd;                 // [T][Hq]: O.dO per query and head (flash_attention.cu's backward)
  float *eu[2];              // [T K][r]: the experts' A x of gate_up and of down, from the recompute for the backward
  const float **ptrs;        // [3][E]: one grouped product's A, B and C per expert
  float *xpart;              // xdown's partial sums over column chunks
  int *xdims;                // host: its dimensions, leading dimensions, scalars and operations
  int32_t *ids, *rows, *targets, *sel, *invp;
  moe_work mw;
  bf16 *hi, *lo;             // GEMM inputs as bf16, and lo their split-bf16 rests for the products being
                             // queued: lo_buf, or NULL for bf16 alone ("fast"; "mixed"'s backward)
  bf16 *lo_buf;
  bf16 *rlo;                 // precision "fast": the router's input's split-bf16 rest (see router_logits)
  size_t hi_n;
  int hc, lg_rows;           // heads per score batch; logit rows per chunk
  int32_t *off_host;         // pinned [E + 1]
  // the adapter's copy
  uint64_t version;
  int upload;                // this call uploads the weights
  char *lmem;
  size_t lbytes, nparams, span;   // span: the most parameters one layer has
  size_t layer_off[GPTOSS_MAX_LAYERS + 1];
  float *params, *gbuf[2];
  float *xbuf;               // a layer's worth, for regrouping expert B's between PEFT's layout and ours
  float *stage;              // host (pinned), nparams, in PEFT's layout
  cudaStream_t cs;           // copies
  cudaEvent_t ev_up, ev_bwd[2];
  cudaEvent_t ev_down[GPTOSS_MAX_LAYERS];   // layer l's gradients are in stage
  cudaEvent_t ev_off;        // off_host has this layer's offsets
  dlora mod[GPTOSS_MAX_LAYERS][GPTOSS_LORA_MODULES];
  gptoss_pool *pool;
  // the thread that adds each layer's gradients to the host's (grads_end)
  struct {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started, stop, dev;
    int queue[GPTOSS_MAX_LAYERS], posted, done;   // layers queued this call, and added
    cudaError_t err;
  } add;
  // this call
  gptoss_adapter *a;
  const train_view *v;
  int T;
  float drop;
  uint64_t drop_key;
};

static void release_buffers(trainer *t) {
  if (t->buf) cudaFree(t->buf);
  free(t->xdims);
  t->xdims = NULL;
  if (t->off_host) cudaFreeHost(t->off_host);
  t->buf = NULL; t->off_host = NULL; t->cap = 0; t->buf_bytes = 0;
}

static void release_lora(trainer *t) {
  if (t->lmem) cudaFree(t->lmem);
  if (t->stage) cudaFreeHost(t->stage);
  t->lmem = NULL; t->stage = NULL; t->lbytes = 0; t->nparams = 0; t->span = 0; t->version = 0;
}

void cuda_train_release(void *state, size_t *bytes) {
  trainer *t = (trainer *)state;
  if (!t) return;
  if (t->cs) cudaStreamSynchronize(t->cs);   // the caller's stream is idle between calls
  *bytes -= t->buf_bytes + t->lbytes;
  release_buffers(t);
  release_lora(t);
}

void cuda_train_free(void *state) {
  trainer *t = (trainer *)state;
  if (!t) return;
  if (t->cs) cudaStreamSynchronize(t->cs);
  release_buffers(t);
  release_lora(t);
  if (t->cs) {
    cudaStreamDestroy(t->cs);
    cudaEventDestroy(t->ev_up);
    cudaEventDestroy(t->ev_off);
    for (int i = 0; i < 2; i++) cudaEventDestroy(t->ev_bwd[i]);
    for (int l = 0; l < GPTOSS_MAX_LAYERS; l++)
      if (t->ev_down[l]) cudaEventDestroy(t->ev_down[l]);
  }
  if (t->add.started) {
    pthread_mutex_lock(&t->add.mu);
    t->add.stop = 1;
    pthread_cond_broadcast(&t->add.cv);
    pthread_mutex_unlock(&t->add.mu);
    pthread_join(t->add.th, NULL);
    pthread_mutex_destroy(&t->add.mu);
    pthread_cond_destroy(&t->add.cv);
  }
  if (t->pool) gptoss_pool_free(t->pool);
  free(t);
}

#define ALIGN256(x) (((x) + 255) & ~(size_t)255)

// carves the buffers for T tokens out of one allocation (size only when base is NULL)
// The experts' LoRA kernels (below): ranks up to XR, 64-row tiles of one
// expert; a rank is rounded up to a power of two so their loops unroll
// exactly, and xdown stages 64 KB of an expert's matrix a column chunk.
#define XR 64
#define XT 64
static int xround(int r) { return r <= 8 ? 8 : r <= 16 ? 16 : r <= 32 ? 32 : 64; }
__device__ __host__ __forceinline__ int xchunk(int R) { return (16384 / R) / 32 * 32; }

static size_t carve(trainer *t, const dims &d, int T, int rmax, char *base) {
  size_t off = 0, TK = (size_t)T * d.K, ldq = (size_t)d.Q + 2 * d.KV, HQ = (size_t)(d.H > d.Q ? d.H : d.Q);
  size_t gu_n = TK * 2 * d.I > (size_t)d.V ? TK * 2 * d.I : (size_t)d.V;   // the logits of a chunk live there too
#define TAKE(p, type, n) do { if (base) p = (type *)(base + off); off += ALIGN256(sizeof(type) * (size_t)(n)); } while (0)
  TAKE(t->xs, float, (size_t)(d.L + 1) * T * d.H);
  TAKE(t->xn1, float, (size_t)T * d.H); TAKE(t->inv1, float, T); TAKE(t->dd, float, (size_t)T * d.Hq);
  TAKE(t->qkv, float, T * ldq); TAKE(t->att, float, (size_t)T * d.Q); TAKE(t->lse, float, (size_t)T * d.Hq);
  TAKE(t->xmid, float, (size_t)T * d.H); TAKE(t->xn2, float, (size_t)T * d.H); TAKE(t->inv2, float, T);
  TAKE(t->rl, float, (size_t)T * d.E); TAKE(t->w, float, TK);
  TAKE(t->xg, float, TK * d.H); TAKE(t->gu, float, gu_n); TAKE(t->act, float, TK * d.I);
  TAKE(t->ye, float, TK * (d.H > d.I ? d.H : d.I));   // rows of H, then of I (layer_bwd)
  TAKE(t->dx, float, (size_t)T * d.H); TAKE(t->dxn, float, T * HQ); TAKE(t->datt, float, (size_t)T * d.Q);
  TAKE(t->dqkv, float, T * ldq);
  // head sizes flash_attention.cu has no tiles for: a batch of heads'
  // scores at a time, about 128 MB each for S and dP
  if (!flash_supported(d.D)) {
    int G = d.Hq / d.Hkv;
    size_t per_head = (size_t)T * T;
    t->hc = (int)((size_t)(32u << 20) / per_head);
    if (t->hc < 1) t->hc = 1;
    if (t->hc > G) t->hc = G;
    TAKE(t->S, float, per_head * t->hc); TAKE(t->dP, float, per_head * t->hc);
  }
  TAKE(t->xd, float, T * HQ); TAKE(t->tmp, float, T * HQ);
  TAKE(t->lh, float, TK * rmax); TAKE(t->ldh, float, TK * rmax);   // every expert's rows at once
  TAKE(t->eu[0], float, TK * rmax); TAKE(t->eu[1], float, TK * rmax);
  {
    int kc = xchunk(xround(rmax)), wide = 2 * d.I > d.H ? 2 * d.I : d.H;
    TAKE(t->xpart, float, TK * rmax * (size_t)((wide + kc - 1) / kc));   // xdown's partial sums
  }
  TAKE(t->ptrs, const float *, 3 * (size_t)d.E);
  TAKE(t->xf, float, (size_t)T * d.H); TAKE(t->lossrow, float, T);
  TAKE(t->ids, int32_t, T); TAKE(t->rows, int32_t, T); TAKE(t->targets, int32_t, T);
  TAKE(t->sel, int32_t, TK); TAKE(t->invp, int32_t, TK);
  TAKE(t->mw.counts, int32_t, d.E); TAKE(t->mw.offsets, int32_t, d.E + 1); TAKE(t->mw.tile_offsets, int32_t, d.E + 1);
  TAKE(t->mw.cursor, int32_t, d.E); TAKE(t->mw.perm, int32_t, TK);
  t->lg_rows = (int)(gu_n / d.V);
  if (t->lg_rows > T) t->lg_rows = T;
  size_t big = TK * (2 * d.I > d.H ? 2 * d.I : d.H);
  if ((size_t)t->lg_rows * d.V > big) big = (size_t)t->lg_rows * d.V;
  if (T * (ldq + d.Q) > big) big = T * (ldq + d.Q);   // qkv and datt, the attention backward's operands
  if (T * HQ > big) big = T * HQ;
  t->hi_n = big;
  TAKE(t->hi, bf16, big);
  if (t->v->split) TAKE(t->lo_buf, bf16, big); else if (base) t->lo_buf = NULL;
  if (base) t->lo = t->lo_buf;
  if (!t->v->split) TAKE(t->rlo, bf16, (size_t)T * d.H); else if (base) t->rlo = NULL;
#undef TAKE
  return off;
}

static gptoss_status ensure_buffers(trainer *t, int T, int rmax) {
  const dims &d = t->v->d;
  if (T <= t->cap && rmax <= t->cap_r && t->buf) return GPTOSS_OK;
  CU(cudaStreamSynchronize(t->v->stream));
  *t->v->bytes -= t->buf_bytes;
  release_buffers(t);
  size_t n = carve(t, d, T, rmax, NULL);
  CU(cudaMalloc(&t->buf, n));
  CU(cudaHostAlloc((void **)&t->off_host, sizeof(int32_t) * (d.E + 1), cudaHostAllocDefault));
  if (!(t->xdims = (int *)malloc(sizeof(int) * 7 * d.E + sizeof(float) * 2 * d.E + sizeof(cublasOperation_t) * 2 * d.E)))
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  carve(t, d, T, rmax, t->buf);
  t->cap = T; t->cap_r = rmax; t->buf_bytes = n;
  *t->v->bytes += n;
  return GPTOSS_OK;
}

// {====================================================== the adapter's copy
// The host's adapter is the master copy (AdamW runs there). The device keeps
// the weights, uploaded again when gptoss_adapter_version says they changed,
// a layer at a time on a copy stream ahead of the forward; and the gradients
// of two layers, each copied down on the copy stream as soon as its layer's
// backward is done and added to the host's (gptoss_adapter_add_grads) while
// the next layers run.
struct copy_job {
  trainer *t;
  int layer;
};

// layer j->layer's host weights into stage
static void copy_part(void *ctx, int tid, int nth) {
  copy_job *j = (copy_job *)ctx;
  trainer *t = j->t;
  for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
    dlora *x = &t->mod[j->layer][m];
    if (!x->host) continue;
    gptoss_lora *h = x->host;
    size_t na = (size_t)h->rk * x->in, nb = (size_t)x->out * h->rk;
    float *sa = t->stage + x->off, *sb = sa + na;
    // A and B both as the host lays them out: the device regroups expert B's (regroup_b)
    float *dev[2] = {sa, sb}, *w[2] = {h->A, h->B};
    size_t len[2] = {na, nb};
    for (int k = 0; k < 2; k++) {
      size_t per = (len[k] + nth - 1) / nth, lo = per * tid, hi = lo + per < len[k] ? lo + per : len[k];
      if (lo < hi) memcpy(dev[k] + lo, w[k] + lo, sizeof(float) * (hi - lo));
    }
  }
}

// expert B between PEFT's [out][r * E] (rank-k column of expert e at k*E + e)
// and ours, [E][out][r]
__global__ void regroup_b_kernel(const float *src, float *dst, int E, int out, int r, int to_peft) {
  size_t n = (size_t)E * out * r;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    size_t e = i / ((size_t)out * r), o = i / r % out, k = i % r, h = o * (size_t)r * E + k * E + e;
    if (to_peft) dst[h] = src[i]; else dst[i] = src[h];
  }
}

// layer l's expert B's at base (the weights or a gradient buffer) from one
// layout to the other, through xbuf, on the copy stream
static gptoss_status regroup_b(trainer *t, int l, float *base, int to_peft) {
  for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
    dlora *x = &t->mod[l][m];
    if (!x->host || !x->E) continue;
    size_t nb = (size_t)x->out * x->host->rk;
    float *b = base + (x->off - t->layer_off[l]) + (size_t)x->host->rk * x->in;
    CU(cudaMemcpyAsync(t->xbuf, b, sizeof(float) * nb, cudaMemcpyDeviceToDevice, t->cs));
    regroup_b_kernel<<<(unsigned)((nb + 255) / 256 < 4096 ? (nb + 255) / 256 : 4096), 256, 0, t->cs>>>(t->xbuf, b, x->E, x->out,
                                                                                                       x->r, to_peft);
    CU(cudaGetLastError());
  }
  return GPTOSS_OK;
}

// Lays out the adapter's modules, layer after layer, and allocates their
// device copy; the weights are uploaded during the forward (upload_layer)
static gptoss_status layout_adapter(trainer *t, gptoss_adapter *a, int L, int *rmax) {
  size_t n = 0, span = 1;
  *rmax = 1;
  for (int l = 0; l < GPTOSS_MAX_LAYERS; l++) {
    t->layer_off[l] = n;
    for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
      dlora *x = &t->mod[l][m];
      // pointers only: the weights are read a layer at a time (upload_layer)
      gptoss_lora *h = l < L ? (gptoss_lora *)gptoss_adapter_slot(a, l, (gptoss_lora_module)m) : NULL;
      memset(x, 0, sizeof *x);
      if (!h) continue;
      x->host = h; x->r = h->experts ? h->rk / h->experts : h->rk; x->in = h->in; x->out = h->out; x->E = h->experts;
      x->scale = h->scale; x->off = n;
      if (x->r > *rmax) *rmax = x->r;
      n += (size_t)h->rk * h->in + (size_t)h->out * h->rk;
    }
    if (n - t->layer_off[l] > span) span = n - t->layer_off[l];
  }
  t->layer_off[GPTOSS_MAX_LAYERS] = n;
  if (n != t->nparams || span != t->span || !t->lmem) {
    CU(cudaStreamSynchronize(t->v->stream));
    *t->v->bytes -= t->lbytes;
    release_lora(t);
    t->lbytes = ALIGN256(sizeof(float) * n) + 2 * ALIGN256(sizeof(float) * span) + ALIGN256(sizeof(float) * span);
    CU(cudaMalloc(&t->lmem, t->lbytes));
    *t->v->bytes += t->lbytes;
    // pinned: the copies run at full PCIe speed (740 MB each way for r = 16 on a 20B model)
    CU(cudaHostAlloc((void **)&t->stage, sizeof(float) * (n ? n : 1), cudaHostAllocDefault));
    t->nparams = n;
    t->span = span;
  }
  t->params = (float *)t->lmem;
  t->gbuf[0] = (float *)(t->lmem + ALIGN256(sizeof(float) * n));
  t->gbuf[1] = t->gbuf[0] + ALIGN256(sizeof(float) * span) / sizeof(float);
  t->xbuf = t->gbuf[1] + ALIGN256(sizeof(float) * span) / sizeof(float);
  for (int l = 0; l < GPTOSS_MAX_LAYERS; l++)
    for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
      dlora *x = &t->mod[l][m];
      if (!x->host) continue;
      x->A = t->params + x->off;
      x->B = x->A + (size_t)x->host->rk * x->in;
    }
  if (!t->cs) {
    CU(cudaStreamCreateWithFlags(&t->cs, cudaStreamNonBlocking));
    CU(cudaEventCreateWithFlags(&t->ev_up, cudaEventDisableTiming));
    CU(cudaEventCreateWithFlags(&t->ev_off, cudaEventDisableTiming));
    for (int i = 0; i < 2; i++) CU(cudaEventCreateWithFlags(&t->ev_bwd[i], cudaEventDisableTiming));
  }
  for (int l = 0; l < L; l++)
    if (!t->ev_down[l]) CU(cudaEventCreateWithFlags(&t->ev_down[l], cudaEventDisableTiming));
  t->upload = t->version != gptoss_adapter_version(a);
  return GPTOSS_OK;
}

// layer l's weights onto the device, on the copy stream; the forward waits
// for them. The host may still be updating later layers (AdamW's update
// runs a layer at a time after the step returns): this waits for layer l.
static gptoss_status upload_layer(trainer *t, int l) {
  size_t lo = t->layer_off[l], n = t->layer_off[l + 1] - lo;
  if (!t->upload || !n) return GPTOSS_OK;
  double t0 = now_ms();
  gptoss_adapter_wait(t->a, l);
  double t1 = now_ms();
  copy_job j = {t, l};
  gptoss_pool_run(t->pool, copy_part, &j);
  cuda_prof_host("host update wait", t1 - t0);
  cuda_prof_host("host weights copy", now_ms() - t1);
  CU(cudaMemcpyAsync(t->params + lo, t->stage + lo, sizeof(float) * n, cudaMemcpyHostToDevice, t->cs));
  TRY(regroup_b(t, l, t->params + lo, 0));
  CU(cudaEventRecord(t->ev_up, t->cs));
  CU(cudaStreamWaitEvent(t->v->stream, t->ev_up, 0));
  return GPTOSS_OK;
}

// layer l's gradients into gbuf[l & 1], zeroed once its last copy is done
static gptoss_status grads_begin(trainer *t, int l) {
  size_t n = t->layer_off[l + 1] - t->layer_off[l];
  float *g = t->gbuf[l & 1];
  for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
    dlora *x = &t->mod[l][m];
    if (!x->host) continue;
    x->gA = g + (x->off - t->layer_off[l]);
    x->gB = x->gA + (size_t)x->host->rk * x->in;
  }
  if (!n) return GPTOSS_OK;
  if (l + 2 < t->v->d.L) CU(cudaStreamWaitEvent(t->v->stream, t->ev_down[l + 2], 0));   // the buffer's last copy
  CU(cudaMemsetAsync(g, 0, sizeof(float) * n, t->v->stream));
  return GPTOSS_OK;
}

// The adder: each layer's gradients, once copied into stage, added to the
// host's by t->pool on a thread of its own, in the order the layers finish
// (gptoss_adapter_add_grads, which also keeps their sums of squares, so that
// step need not read 740 MB of gradients again for their norm).
// Adding takes about as long as the GPU's layer (6 ms at r 16 on the 20B
// shape); on the thread that queues the GPU's work it had left the GPU idle
// a third of the time. The call waits for every add before it returns.
static void *adder_main(void *arg) {
  trainer *t = (trainer *)arg;
  cudaSetDevice(t->add.dev);   // the model's device, for the event waits
  pthread_mutex_lock(&t->add.mu);
  for (;;) {
    while (t->add.done == t->add.posted && !t->add.stop) pthread_cond_wait(&t->add.cv, &t->add.mu);
    if (t->add.done == t->add.posted) break;
    int l = t->add.queue[t->add.done];
    pthread_mutex_unlock(&t->add.mu);
    cudaError_t e = cudaEventSynchronize(t->ev_down[l]);
    if (e == cudaSuccess) gptoss_adapter_add_grads(t->a, l, t->stage + t->layer_off[l], t->pool);
    pthread_mutex_lock(&t->add.mu);
    if (e != cudaSuccess && t->add.err == cudaSuccess) t->add.err = e;
    t->add.done++;
    pthread_cond_broadcast(&t->add.cv);
  }
  pthread_mutex_unlock(&t->add.mu);
  return NULL;
}

static gptoss_status adder_post(trainer *t, int l) {
  if (!t->add.started) {
    CU(cudaGetDevice(&t->add.dev));
    pthread_mutex_init(&t->add.mu, NULL);
    pthread_cond_init(&t->add.cv, NULL);
    if (pthread_create(&t->add.th, NULL, adder_main, t)) {
      pthread_mutex_destroy(&t->add.mu);
      pthread_cond_destroy(&t->add.cv);
      return gptoss_fail(GPTOSS_ENOMEM, "cannot start the thread that adds the gradients");
    }
    t->add.started = 1;
  }
  pthread_mutex_lock(&t->add.mu);
  t->add.queue[t->add.posted++] = l;
  pthread_cond_broadcast(&t->add.cv);
  pthread_mutex_unlock(&t->add.mu);
  return GPTOSS_OK;
}

// waits for every add of this call; the first failed copy's error
static cudaError_t adder_wait(trainer *t) {
  if (!t->add.started) return cudaSuccess;
  double t0 = now_ms();
  pthread_mutex_lock(&t->add.mu);
  while (t->add.done < t->add.posted) pthread_cond_wait(&t->add.cv, &t->add.mu);
  cudaError_t e = t->add.err;
  t->add.err = cudaSuccess;
  t->add.posted = t->add.done = 0;
  pthread_mutex_unlock(&t->add.mu);
  cuda_prof_host("host gradients drain", now_ms() - t0);
  return e;
}

// layer l's backward is queued: copy its gradients down behind it, for the adder
static gptoss_status grads_end(trainer *t, int l) {
  size_t lo = t->layer_off[l], n = t->layer_off[l + 1] - lo;
  if (!n) return GPTOSS_OK;
  CU(cudaEventRecord(t->ev_bwd[l & 1], t->v->stream));
  CU(cudaStreamWaitEvent(t->cs, t->ev_bwd[l & 1], 0));
  TRY(regroup_b(t, l, t->gbuf[l & 1], 1));
  CU(cudaMemcpyAsync(t->stage + lo, t->gbuf[l & 1], sizeof(float) * n, cudaMemcpyDeviceToHost, t->cs));
  CU(cudaEventRecord(t->ev_down[l], t->cs));
  return adder_post(t, l);
}
// }======================================================

// {====================================================== products
// Row-major C[M][N] = alpha op(A) op(B) + beta C, `batch` times with strides
// (cuBLAS is column-major: it computes C^T = op(B)^T op(A)^T).
static gptoss_status gemm(trainer *t, bool ta, bool tb, int M, int N, int K, float alpha, const void *A, cudaDataType at,
                          int lda, long long sa, const void *B, cudaDataType bt, int ldb, long long sb, float beta, float *C,
                          int ldc, long long sc, int batch, cublasComputeType_t ct) {
  if (M <= 0 || N <= 0) return GPTOSS_OK;
  BLAS(cublasGemmStridedBatchedEx(t->v->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha,
                                  B, bt, ldb, sb, A, at, lda, sa, &beta, C, CUDA_R_32F, ldc, sc, batch, ct, CUBLAS_GEMM_DEFAULT));
  return GPTOSS_OK;
}

// fp32 operands: LoRA in fp32 always; attention's scores per precision
static gptoss_status fgemm(trainer *t, bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
                           const float *B, int ldb, float beta, float *C, int ldc) {
  return gemm(t, ta, tb, M, N, K, alpha, A, CUDA_R_32F, lda, 0, B, CUDA_R_32F, ldb, 0, beta, C, ldc, 0, 1, CUBLAS_COMPUTE_32F);
}

static cublasComputeType_t score_compute(const trainer *t) {
  return t->lo ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_16BF;
}

// Y[M][*] (row stride ldy) = X W^T (fwd: W [N][K]) or X W (!fwd: W [K][N]) + beta Y,
// X already split into hi (+ lo) bf16 rows of K
static gptoss_status wgemm_split(trainer *t, const bf16 *hi, const bf16 *lo, int M, const bf16 *W, int wrows, int wcols, bool fwd,
                                 float *Y, int ldy, float beta) {
  if (M <= 0) return GPTOSS_OK;
  int K = fwd ? wcols : wrows, N = fwd ? wrows : wcols;
  TRY(gemm(t, false, fwd, M, N, K, 1.f, hi, CUDA_R_16BF, K, 0, W, CUDA_R_16BF, wcols, 0, beta, Y, ldy, 0, 1, CUBLAS_COMPUTE_32F));
  if (lo) TRY(gemm(t, false, fwd, M, N, K, 1.f, lo, CUDA_R_16BF, K, 0, W, CUDA_R_16BF, wcols, 0, 1.f, Y, ldy, 0, 1, CUBLAS_COMPUTE_32F));
  return GPTOSS_OK;
}

// the split-bf16 rests for products past the routing (the backward's, the
// recompute's expert products, the loss head): NULL in "fast" and "mixed"
static bf16 *lo_bwd(const trainer *t) { return t->v->split_bwd ? t->lo_buf : NULL; }

// X fp32 [M][K] (row stride ldx) into t->hi (+ t->lo) from element at, rows of K
static void split_at(trainer *t, const float *X, int M, int ldx, int K, size_t at) {
  if (M > 0 && K > 0) split_kernel<<<M, 256, 0, t->v->stream>>>(X, ldx, K, t->hi + at, t->lo ? t->lo + at : NULL);
}

static void split(trainer *t, const float *X, int M, int ldx, int K) { split_at(t, X, M, ldx, K, 0); }

// as wgemm_split, X fp32 taken as bf16 (+ its split-bf16 rest)
static gptoss_status wgemm(trainer *t, const float *X, int M, int ldx, const bf16 *W, int wrows, int wcols, bool fwd, float *Y,
                           int ldy, float beta) {
  if (M <= 0) return GPTOSS_OK;
  split(t, X, M, ldx, fwd ? wcols : wrows);
  return wgemm_split(t, t->hi, t->lo, M, W, wrows, wcols, fwd, Y, ldy, beta);
}

// The router's logits from split-bf16 inputs in either precision: a top-k
// that bf16 rounding tips over sends a token to other experts altogether,
// which costs far more than the product (T x E, E = 32)
static gptoss_status router_logits(trainer *t, const dlayer *w) {
  const dims &d = t->v->d;
  int T = t->T;
  bf16 *lo = t->lo ? t->lo : t->rlo;
  split_kernel<<<T, 256, 0, t->v->stream>>>(t->xn2, d.H, d.H, t->hi, lo);
  return wgemm_split(t, t->hi, lo, T, w->router_w, d.E, d.H, true, t->rl, d.E, 0.f);
}

// {====================================================== grouped expert products
// One fp32 product per expert, all in one cuBLAS call: the experts' LoRA
// products are small (rank 16 against each expert's few hundred rows), so
// 32 calls of each were mostly launch overhead. An operand is rows of a
// sorted buffer (base + offset[e] * ld) or an expert's slice of a LoRA
// matrix (base + e * stride).
struct xop {
  const float *base;
  size_t stride;             // per expert; 0: rows at the expert's offset
  int ld;
};

__global__ void xptr_kernel(const float **ptrs, int E, const int32_t *off, xop a, xop b, xop c) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const xop ops[3] = {a, b, c};
  for (int i = 0; i < 3; i++)
    ptrs[i * E + e] = ops[i].base + (ops[i].stride ? e * ops[i].stride : (size_t)off[e] * ops[i].ld);
}

// Row-major C_e[M_e][N_e] = alpha op(A_e) op(B_e) + beta C_e for every expert;
// a dimension given as -1 is the expert's row count
static gptoss_status xgemm(trainer *t, bool ta, bool tb, int M, int N, int K, float alpha, xop A, xop B, float beta, xop C) {
  const dims &d = t->v->d;
  const int32_t *off = t->off_host;
  CU(cudaEventSynchronize(t->ev_off));
  int E = d.E;
  int *mm = t->xdims, *nn = mm + E, *kk = nn + E, *lda = kk + E, *ldb = lda + E, *ldc = ldb + E, *gs = ldc + E;
  float *al = (float *)(gs + E), *be = al + E;
  cublasOperation_t *opa = (cublasOperation_t *)(be + E), *opb = opa + E;
  for (int e = 0; e < E; e++) {
    int n = off[e + 1] - off[e];
    // cuBLAS is column-major: C^T = op(B)^T op(A)^T
    mm[e] = N < 0 ? n : N; nn[e] = M < 0 ? n : M; kk[e] = K < 0 ? n : K;
    opa[e] = tb ? CUBLAS_OP_T : CUBLAS_OP_N; opb[e] = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    lda[e] = B.ld; ldb[e] = A.ld; ldc[e] = C.ld; al[e] = alpha; be[e] = beta; gs[e] = 1;
  }
  xptr_kernel<<<(E + 127) / 128, 128, 0, t->v->stream>>>(t->ptrs, E, t->mw.offsets, B, A, C);
  BLAS(cublasSgemmGroupedBatched(t->v->blas, opa, opb, mm, nn, kk, al, t->ptrs, lda, t->ptrs + E, ldb, be,
                                 (float *const *)(t->ptrs + 2 * E), ldc, E, gs));
  return GPTOSS_OK;
}

// xop of rows of a sorted buffer, and of a LoRA matrix's expert slices
static xop rows_op(const float *base, int ld) { xop o = {base, 0, ld}; return o; }
static xop slice_op(const float *base, size_t per_expert, int ld) { xop o = {base, per_expert, ld}; return o; }

// The same products in kernels of their own, for ranks up to XR: cuBLAS's
// grouped fp32 products take 128 x 128 tiles against a side of 16 and ran
// at a few percent of the GPU. Rows come in 64-row tiles of one expert (the
// sort's tile_offsets); an expert's matrix W_e(a, b) lives at
// W + e * es + a * sa + b * sb, so A (r x in), B (out x r) and their
// transposes are all the same kind of operand.
struct xmat {
  const float *p;
  size_t es;
  int sa, sb;
};

__device__ __forceinline__ int tile_expert(const int32_t *tile_offsets, const int32_t *offsets, int E, int mt, int *row0, int *nrows) {
  if (mt >= tile_offsets[E]) return -1;
  int e = 0;
  while (tile_offsets[e + 1] <= mt) e++;
  *row0 = offsets[e] + (mt - tile_offsets[e]) * XT;
  int n = offsets[e + 1] - *row0;
  *nrows = n < XT ? n : XT;
  return e;
}

// Upart[ks][i][k] = sum over chunk ks of c of X[i][c] W_e(k, c), k < r: a
// block per (tile, chunk of xchunk(R) columns), the chunk of W_e in shared
// memory, a warp per row with its lanes across the columns (X read once,
// coalesced); xsum adds the chunks in order

template <int R>   // r <= R, rounded up to a power of two: the rank loops unroll exactly
__global__ void __launch_bounds__(256) xdown_kernel(const float *X, int ldx, int K, xmat W, int r, float *Upart, size_t pstride,
                                                    const int32_t *offsets, const int32_t *tile_offsets, int E) {
  extern __shared__ float Ws[];      // [r][kc]
  int row0, nrows, e = tile_expert(tile_offsets, offsets, E, blockIdx.x, &row0, &nrows);
  if (e < 0) return;
  int kc = xchunk(R), c0 = blockIdx.y * kc, nc = K - c0 < kc ? K - c0 : kc;
  const float *We = W.p + e * W.es;
  for (int i = threadIdx.x; i < R * kc; i += 256) {
    int k = i / kc, c = i % kc;
    Ws[i] = c < nc && k < r ? We[(size_t)k * W.sa + (size_t)(c0 + c) * W.sb] : 0.f;
  }
  __syncthreads();
  // RW rows a warp at once: each W value read from shared memory serves RW
  // rows
  constexpr int RW = R <= 16 ? 4 : R == 32 ? 2 : 1;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool vec = ((ldx | c0) & 3) == 0 && ((uintptr_t)X & 15) == 0;
  float *Up = Upart + blockIdx.y * pstride;
  for (int r0 = warp * RW; r0 < nrows; r0 += 8 * RW) {
    const float *x[RW];
#pragma unroll
    for (int j = 0; j < RW; j++) x[j] = X + (size_t)(row0 + (r0 + j < nrows ? r0 + j : r0)) * ldx + c0;
    float acc[RW][R];
#pragma unroll
    for (int j = 0; j < RW; j++)
#pragma unroll
      for (int k = 0; k < R; k++) acc[j][k] = 0.f;
    // rows k >= r of Ws are zero; four columns a lane (four loads in
    // flight a row) where the rows are whole float4s
    int nv = vec ? nc / 128 * 128 : 0;   // columns taken in float4s
    for (int c = 4 * lane; c < nv; c += 128) {
      float4 xv[RW];
#pragma unroll
      for (int j = 0; j < RW; j++) xv[j] = *reinterpret_cast<const float4 *>(x[j] + c);
#pragma unroll
      for (int k = 0; k < R; k++) {
        float4 w = *reinterpret_cast<const float4 *>(Ws + k * kc + c);
#pragma unroll
        for (int j = 0; j < RW; j++) acc[j][k] += xv[j].x * w.x + xv[j].y * w.y + xv[j].z * w.z + xv[j].w * w.w;
      }
    }
    for (int c = nv + lane; c < nc; c += 32) {
      float xv[RW];
#pragma unroll
      for (int j = 0; j < RW; j++) xv[j] = x[j][c];
#pragma unroll
      for (int k = 0; k < R; k++) {
        float w = Ws[k * kc + c];
#pragma unroll
        for (int j = 0; j < RW; j++) acc[j][k] += xv[j] * w;
      }
    }
#pragma unroll
    for (int j = 0; j < RW; j++)
#pragma unroll
      for (int k = 0; k < R; k++) {
        if (k >= r) break;
        float v = warp_sum(acc[j][k]);
        if (lane == 0 && r0 + j < nrows) Up[(size_t)(row0 + r0 + j) * r + k] = v;
      }
  }
}

// U[i][k] = alpha sum_ks Upart[ks][i][k], the chunks in order
__global__ void xsum_kernel(const float *Upart, size_t pstride, int nks, float alpha, float *U, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = 0.f;
  for (int ks = 0; ks < nks; ks++) s += Upart[ks * pstride + i];
  U[i] = alpha * s;
}

// Y[i][n] += alpha sum_k U[i][k] W_e(n, k): a block per (tile, 64 columns), a
// thread per (column, every 4th row) with its column of W_e in registers,
// reading each row of U four values at a time (one broadcast to the warp:
// W's values read from shared memory once a product had bound it by
// shared-memory reads)
template <int R>
__global__ void __launch_bounds__(256) xup_kernel(const float *U, int r, xmat W, int N, float alpha, float *Y, int ldy,
                                                  const int32_t *offsets, const int32_t *tile_offsets, int E) {
  __shared__ __align__(16) float Us[XT][R];
  int row0, nrows, e = tile_expert(tile_offsets, offsets, E, blockIdx.x, &row0, &nrows);
  if (e < 0) return;
  int tid = threadIdx.x, n0 = blockIdx.y * 64, nn = N - n0 < 64 ? N - n0 : 64;
  for (int i = tid; i < XT * R; i += 256) {
    int rr = i / R, k = i % R;
    Us[rr][k] = rr < nrows && k < r ? U[(size_t)(row0 + rr) * r + k] : 0.f;
  }
  __syncthreads();
  int n = tid % 64, quarter = tid / 64;
  if (n >= nn) return;
  const float *We = W.p + e * W.es + (size_t)(n0 + n) * W.sa;
  float w[R];
#pragma unroll
  for (int k = 0; k < R; k++) w[k] = k < r ? We[(size_t)k * W.sb] : 0.f;
  // every row's Y value loaded before any is stored (one at a time, each
  // load waited behind the previous row's store)
  float y[XT / 4];
#pragma unroll
  for (int q = 0; q < XT / 4; q++) {
    int rr = quarter + 4 * q;
    y[q] = rr < nrows ? Y[(size_t)(row0 + rr) * ldy + n0 + n] : 0.f;
  }
#pragma unroll
  for (int q = 0; q < XT / 4; q++) {
    int rr = quarter + 4 * q;
    if (rr >= nrows) break;
    const float4 *u4 = reinterpret_cast<const float4 *>(Us[rr]);
    float acc = 0.f;
#pragma unroll
    for (int k4 = 0; k4 < R / 4; k4++) {
      float4 u = u4[k4];
      acc += u.x * w[4 * k4];
      acc += u.y * w[4 * k4 + 1];
      acc += u.z * w[4 * k4 + 2];
      acc += u.w * w[4 * k4 + 3];
    }
    Y[(size_t)(row0 + rr) * ldy + n0 + n] = y[q] + alpha * acc;
  }
}

// G_e(n, k) += alpha sum over e's rows i of P[i][n] U[i][k]: a block per
// (expert, 128 columns), the rows in a fixed order; a thread per (column,
// half of the ranks), reading its half of U's row four values at a time,
// the next 32 rows of P loaded into registers while these are summed
template <int R>
__global__ void __launch_bounds__(256) xgrad_kernel(const float *P, int ldp, const float *U, int r, int N, float alpha, xmat G,
                                                    const int32_t *offsets) {
  constexpr int HR = R / 2, PRE = 32 * 128 / 256;
  __shared__ float Ps[32][128];
  __shared__ __align__(16) float Us[32][R];
  int e = blockIdx.x, tid = threadIdx.x, n0 = blockIdx.y * 128, nn = N - n0 < 128 ? N - n0 : 128;
  int n = tid % 128, kg = tid / 128, i1 = offsets[e + 1];
  float acc[HR], pre[PRE];
#pragma unroll
  for (int q = 0; q < HR; q++) acc[q] = 0.f;
  auto fetch = [&](int i0) {
#pragma unroll
    for (int j = 0; j < PRE; j++) {
      int i = tid + 256 * j, rr = i / 128, c = i % 128;
      pre[j] = i0 + rr < i1 && c < nn ? P[(size_t)(i0 + rr) * ldp + n0 + c] : 0.f;
    }
  };
  if (offsets[e] < i1) fetch(offsets[e]);
  for (int i0 = offsets[e]; i0 < i1; i0 += 32) {
    int ni = i1 - i0 < 32 ? i1 - i0 : 32;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < PRE; j++) Ps[(tid + 256 * j) / 128][(tid + 256 * j) % 128] = pre[j];
    for (int i = tid; i < 32 * R; i += 256) {
      int rr = i / R, k = i % R;
      Us[rr][k] = rr < ni && k < r ? U[(size_t)(i0 + rr) * r + k] : 0.f;
    }
    __syncthreads();
    if (i0 + 32 < i1) fetch(i0 + 32);
    for (int rr = 0; rr < ni; rr++) {
      float p = Ps[rr][n];
      const float4 *u4 = reinterpret_cast<const float4 *>(&Us[rr][kg * HR]);
#pragma unroll
      for (int q4 = 0; q4 < HR / 4; q4++) {   // columns k >= r of Us are zero
        float4 u = u4[q4];
        acc[4 * q4] += p * u.x;
        acc[4 * q4 + 1] += p * u.y;
        acc[4 * q4 + 2] += p * u.z;
        acc[4 * q4 + 3] += p * u.w;
      }
    }
  }
  if (n >= nn) return;
  float *Ge = (float *)G.p + e * G.es;
#pragma unroll
  for (int q = 0; q < HR; q++) {
    int k = kg * HR + q;
    if (k < r) Ge[(size_t)(n0 + n) * G.sa + (size_t)k * G.sb] += alpha * acc[q];
  }
}

static int xtiles(const trainer *t) { return t->T * t->v->d.K / XT + t->v->d.E; }

static gptoss_status xdown(trainer *t, const float *X, int ldx, int K, xmat W, int r, float alpha, float *U) {
  int R = xround(r), kc = xchunk(R), nks = (K + kc - 1) / kc;
  size_t n = (size_t)t->T * t->v->d.K * r, smem = sizeof(float) * R * kc;
  void (*k)(const float *, int, int, xmat, int, float *, size_t, const int32_t *, const int32_t *, int) =
      R == 8 ? xdown_kernel<8> : R == 16 ? xdown_kernel<16> : R == 32 ? xdown_kernel<32> : xdown_kernel<64>;
  CU(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  k<<<dim3(xtiles(t), nks), 256, smem, t->v->stream>>>(X, ldx, K, W, r, t->xpart, n, t->mw.offsets, t->mw.tile_offsets, t->v->d.E);
  xsum_kernel<<<(unsigned)((n + 255) / 256), 256, 0, t->v->stream>>>(t->xpart, n, nks, alpha, U, n);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

static gptoss_status xup(trainer *t, const float *U, int r, xmat W, int N, float alpha, float *Y, int ldy) {
  int R = xround(r);
  void (*k)(const float *, int, xmat, int, float, float *, int, const int32_t *, const int32_t *, int) =
      R == 8 ? xup_kernel<8> : R == 16 ? xup_kernel<16> : R == 32 ? xup_kernel<32> : xup_kernel<64>;
  k<<<dim3(xtiles(t), (N + 63) / 64), 256, 0, t->v->stream>>>(U, r, W, N, alpha, Y, ldy, t->mw.offsets, t->mw.tile_offsets,
                                                             t->v->d.E);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

static gptoss_status xgrad(trainer *t, const float *P, int ldp, const float *U, int r, int N, float alpha, xmat G) {
  int R = xround(r);
  void (*k)(const float *, int, const float *, int, int, float, xmat, const int32_t *) =
      R == 8 ? xgrad_kernel<8> : R == 16 ? xgrad_kernel<16> : R == 32 ? xgrad_kernel<32> : xgrad_kernel<64>;
  k<<<dim3(t->v->d.E, (N + 127) / 128), 256, 0, t->v->stream>>>(P, ldp, U, r, N, alpha, G, t->mw.offsets);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

static xmat xm(const float *p, size_t es, int sa, int sb) { xmat m = {p, es, sa, sb}; return m; }

// every expert's U = A_e x, which the backward that follows the recompute reads
static gptoss_status lora_experts_ax(trainer *t, const dlora *L, const float *x, int ldx, float *U) {
  if (!L->host) return GPTOSS_OK;
  int r = L->r;
  size_t sa = (size_t)r * L->in;
  if (r <= XR) return xdown(t, x, ldx, L->in, xm(L->A, sa, L->in, 1), r, 1.f, U);
  return xgemm(t, false, true, -1, r, L->in, 1.f, rows_op(x, ldx), slice_op(L->A, sa, L->in), 0.f, rows_op(U, r));
}

// every expert's y += s B_e (A_e x) (forward); A_e x into U
static gptoss_status lora_experts_fwd(trainer *t, const dlora *L, const float *x, int ldx, float *y, int ldy, float *U) {
  if (!L->host) return GPTOSS_OK;
  TRY(lora_experts_ax(t, L, x, ldx, U));
  int r = L->r;
  size_t sb = (size_t)L->out * r;
  if (r <= XR) return xup(t, U, r, xm(L->B, sb, r, 1), L->out, L->scale, y, ldy);
  return xgemm(t, false, true, -1, L->out, r, L->scale, rows_op(U, r), slice_op(L->B, sb, r), 1.f, rows_op(y, ldy));
}

// The backward of an expert LoRA, in three parts: gB += s dy^T U (U = A_e x,
// the recompute's), ldh = s dy B_e, gA += ldh^T x
static gptoss_status lora_experts_gB(trainer *t, const dlora *L, const float *dy, int ldy, const float *U) {
  int r = L->r;
  size_t sb = (size_t)L->out * r;
  if (r <= XR) return xgrad(t, dy, ldy, U, r, L->out, L->scale, xm(L->gB, sb, r, 1));
  return xgemm(t, true, false, L->out, r, -1, L->scale, rows_op(dy, ldy), rows_op(U, r), 1.f, slice_op(L->gB, sb, r));
}

static gptoss_status lora_experts_dh(trainer *t, const dlora *L, const float *dy, int ldy) {
  int r = L->r;
  size_t sb = (size_t)L->out * r;
  if (r <= XR) return xdown(t, dy, ldy, L->out, xm(L->B, sb, 1, r), r, L->scale, t->ldh);
  return xgemm(t, false, false, -1, r, L->out, L->scale, rows_op(dy, ldy), slice_op(L->B, sb, r), 0.f, rows_op(t->ldh, r));
}

static gptoss_status lora_experts_gA(trainer *t, const dlora *L, const float *x, int ldx) {
  int r = L->r;
  size_t sa = (size_t)r * L->in;
  if (r <= XR) return xgrad(t, x, ldx, t->ldh, r, L->in, 1.f, xm(L->gA, sa, 1, L->in));
  return xgemm(t, true, false, r, L->in, -1, 1.f, rows_op(t->ldh, r), rows_op(x, ldx), 1.f, slice_op(L->gA, sa, L->in));
}

// all three, for output gradient dy; leaves s dy B_e in ldh
static gptoss_status lora_experts_grads(trainer *t, const dlora *L, const float *x, int ldx, const float *U, const float *dy,
                                        int ldy) {
  if (!L->host) return GPTOSS_OK;
  TRY(lora_experts_gB(t, L, dy, ldy, U));
  TRY(lora_experts_dh(t, L, dy, ldy));
  return lora_experts_gA(t, L, x, ldx);
}

// every expert's dx += (s dy B_e) A_e, from ldh
static gptoss_status lora_experts_dx(trainer *t, const dlora *L, float *dx, int lddx) {
  if (!L->host) return GPTOSS_OK;
  if (L->r <= XR) return xup(t, t->ldh, L->r, xm(L->A, (size_t)L->r * L->in, 1, L->in), L->in, 1.f, dx, lddx);
  return xgemm(t, false, false, -1, L->in, L->r, 1.f, rows_op(t->ldh, L->r), slice_op(L->A, (size_t)L->r * L->in, L->in), 1.f,
               rows_op(dx, lddx));
}
// }======================================================

static void add_bias(trainer *t, float *y, int ld, const bf16 *bias, int rows, int N) {
  size_t n = (size_t)rows * N;
  if (n) bias_kernel<<<(unsigned)((n + 255) / 256), 256, 0, t->v->stream>>>(y, ld, bias, N, n);
}

// Y's rows of every expert = its rows of the input already split into
// t->hi (+ t->lo) times its MXFP4 matrix (fwd: X W^T + bias, W [rows][cols];
// else X W), in one grouped launch that decodes the weights as it goes
static gptoss_status expert_products(trainer *t, const uint8_t *blocks, const uint8_t *scales, int rows, int cols, bool fwd,
                                     const bf16 *bias, float *Y, int ldy) {
  const dims &d = t->v->d;
  CU(launch_mxfp4_gemm(t->hi, t->lo, &t->mw, t->T * d.K, d.E, blocks, scales, rows, cols, !fwd, fwd ? bias : NULL, Y, ldy,
                       t->v->stream));
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== LoRA
// The input of module m of layer l: x, or x with dropout (into t->xd).
// Dropout covers the attention projections, as in csrc/cpu/train.c.
static const float *lora_x(trainer *t, int l, int m, const float *x, int ldx, int in, int *ld) {
  *ld = ldx;
  if (t->drop <= 0) return x;
  size_t n = (size_t)t->T * in;
  drop_args d = {t->drop_key, l, m, t->drop};
  dropout_kernel<<<(unsigned)((n + 255) / 256), 256, 0, t->v->stream>>>(x, ldx, t->xd, in, in, n, d, 0);
  *ld = in;
  return t->xd;
}

// y += s B (A x) over T rows (attention modules)
static gptoss_status lora_fwd(trainer *t, int l, int m, const float *x, int ldx, float *y, int ldy) {
  dlora *L = &t->mod[l][m];
  if (!L->host) return GPTOSS_OK;
  int ld;
  const float *xi = lora_x(t, l, m, x, ldx, L->in, &ld);
  TRY(fgemm(t, false, true, t->T, L->r, L->in, 1.f, xi, ld, L->A, L->in, 0.f, t->lh, L->r));
  return fgemm(t, false, true, t->T, L->out, L->r, L->scale, t->lh, L->r, L->B, L->r, 1.f, y, ldy);
}

// gB += s dy^T h, dh = s dy B, gA += dh^T x, with h = A x (n rows; A, B, gA, gB one expert's or the module's)
static gptoss_status lora_grads(trainer *t, int n, int r, int in, int out, float s, const float *A, const float *B, float *gA,
                                float *gB, const float *x, int ldx, const float *dy, int ldy) {
  TRY(fgemm(t, false, true, n, r, in, 1.f, x, ldx, A, in, 0.f, t->lh, r));
  TRY(fgemm(t, true, false, out, r, n, s, dy, ldy, t->lh, r, 1.f, gB, r));
  TRY(fgemm(t, false, false, n, r, out, s, dy, ldy, B, r, 0.f, t->ldh, r));
  return fgemm(t, true, false, r, in, n, 1.f, t->ldh, r, x, ldx, 1.f, gA, in);
}

// an attention module's gradients, and its share of dx (through the dropout)
static gptoss_status lora_bwd(trainer *t, int l, int m, const float *x, int ldx, const float *dy, int ldy, float *dx, int lddx) {
  dlora *L = &t->mod[l][m];
  if (!L->host) return GPTOSS_OK;
  int ld;
  const float *xi = lora_x(t, l, m, x, ldx, L->in, &ld);
  TRY(lora_grads(t, t->T, L->r, L->in, L->out, L->scale, L->A, L->B, L->gA, L->gB, xi, ld, dy, ldy));
  if (t->drop <= 0) return fgemm(t, false, false, t->T, L->in, L->r, 1.f, t->ldh, L->r, L->A, L->in, 1.f, dx, lddx);
  TRY(fgemm(t, false, false, t->T, L->in, L->r, 1.f, t->ldh, L->r, L->A, L->in, 0.f, t->tmp, L->in));
  size_t n = (size_t)t->T * L->in;
  drop_args d = {t->drop_key, l, m, t->drop};
  dropout_kernel<<<(unsigned)((n + 255) / 256), 256, 0, t->v->stream>>>(t->tmp, L->in, dx, lddx, L->in, n, d, 1);
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== attention
static att_rows rows_of(trainer *t, int l, int h0) {
  const dims &d = t->v->d;
  att_rows a = {t->T, d.Hq, h0, t->v->layer_sliding[l] ? d.window : 0, t->v->layer[l].sinks, t->lse};
  return a;
}

// Up to t->hc query heads that share key/value head g, from head h0
struct head_batch {
  int h0, nb;
  const float *q, *k, *v;    // in qkv: the first head's queries; the shared keys and values
};

static head_batch batch_of(const trainer *t, int g, int i0) {
  const dims &d = t->v->d;
  int G = d.Hq / d.Hkv;
  head_batch b;
  b.nb = G - i0 < t->hc ? G - i0 : t->hc;
  b.h0 = g * G + i0;
  b.q = t->qkv + (size_t)b.h0 * d.D;
  b.k = t->qkv + d.Q + (size_t)g * d.D;
  b.v = b.k + d.KV;
  return b;
}

// S[i] = q_i k^T / sqrt(D) for the batch's heads (the key/value head broadcast)
static gptoss_status scores(trainer *t, const head_batch &b) {
  const dims &d = t->v->d;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  return gemm(t, false, true, T, T, d.D, 1.f / sqrtf((float)d.D), b.q, CUDA_R_32F, ldq, d.D, b.k, CUDA_R_32F, ldq, 0, 0.f, t->S,
              T, (long long)T * T, b.nb, score_compute(t));
}

// flash_attention.cu's operands: qkv split at t->hi (+ t->lo), and for the
// backward datt after it; the parts of dk and dv in t->xd and t->tmp, free
// between the o projection's LoRA backward and the q, k, v ones
static flash_args flash_of(trainer *t, int l, bool bwd) {
  const dims &d = t->v->d;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  size_t at = (size_t)T * ldq;
  split_at(t, t->qkv, T, ldq, ldq, 0);
  if (bwd) split_at(t, t->datt, T, d.Q, d.Q, at);
  flash_args a = {};
  a.qkv_hi = t->hi; a.qkv_lo = t->lo;
  a.dout_hi = t->hi + at; a.dout_lo = t->lo ? t->lo + at : NULL; a.dout = t->datt;
  a.sinks = t->v->layer[l].sinks;
  a.T = T; a.ldq = ldq; a.Q = d.Q; a.KV = d.KV; a.Hq = d.Hq; a.Hkv = d.Hkv; a.D = d.D;
  a.window = t->v->layer_sliding[l] ? d.window : 0;
  a.scale = 1.f / sqrtf((float)d.D);
  a.att = t->att; a.lse = t->lse; a.dd = t->dd; a.dqkv = t->dqkv; a.dk_part = t->xd; a.dv_part = t->tmp;
  return a;
}

// att = softmax(q k^T / sqrt(D), sink) v
static gptoss_status attention_fwd(trainer *t, int l) {
  const dims &d = t->v->d;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  if (flash_supported(d.D)) {
    flash_args a = flash_of(t, l, false);
    CU(launch_flash_fwd(&a, t->v->stream));
    return GPTOSS_OK;
  }
  for (int g = 0; g < d.Hkv; g++)
    for (int i0 = 0; i0 < d.Hq / d.Hkv; i0 += t->hc) {
      head_batch b = batch_of(t, g, i0);
      TRY(scores(t, b));
      softmax_kernel<<<dim3(T, b.nb), 256, 0, t->v->stream>>>(t->S, rows_of(t, l, b.h0));
      TRY(gemm(t, false, false, T, d.D, T, 1.f, t->S, CUDA_R_32F, T, (long long)T * T, b.v, CUDA_R_32F, ldq, 0, 0.f,
               t->att + (size_t)b.h0 * d.D, d.Q, d.D, b.nb, score_compute(t)));
    }
  return GPTOSS_OK;
}

// datt (rows of Q) into dqkv's q, k and v columns
static gptoss_status attention_bwd(trainer *t, int l) {
  const dims &d = t->v->d;
  int T = t->T, ldq = d.Q + 2 * d.KV;
  float scale = 1.f / sqrtf((float)d.D);
  long long tt = (long long)T * T;
  cublasComputeType_t ct = score_compute(t);
  if (flash_supported(d.D)) {
    flash_args a = flash_of(t, l, true);
    CU(launch_flash_bwd(&a, t->v->stream));
    return GPTOSS_OK;
  }
  CU(cudaMemsetAsync(t->dqkv, 0, sizeof(float) * T * ldq, t->v->stream));   // dk, dv accumulate over the heads
  for (int g = 0; g < d.Hkv; g++)
    for (int i0 = 0; i0 < d.Hq / d.Hkv; i0 += t->hc) {
      head_batch b = batch_of(t, g, i0);
      int h0 = b.h0, nb = b.nb;
      const float *q = b.q, *k = b.k, *v = b.v, *dout = t->datt + (size_t)h0 * d.D;
      float *dq = t->dqkv + (size_t)h0 * d.D, *dk = t->dqkv + d.Q + (size_t)g * d.D, *dv = dk + d.KV;
      att_rows a = rows_of(t, l, h0);
      TRY(scores(t, b));
      probs_kernel<<<dim3(T, nb), 256, 0, t->v->stream>>>(t->S, a);
      TRY(gemm(t, false, true, T, T, d.D, 1.f, dout, CUDA_R_32F, d.Q, d.D, v, CUDA_R_32F, ldq, 0, 0.f, t->dP, T, tt, nb, ct));
      dsoftmax_kernel<<<dim3(T, nb), 256, 0, t->v->stream>>>(t->S, t->dP, t->datt, t->att, d.Q, d.D, scale, a);
      TRY(gemm(t, false, false, T, d.D, T, 1.f, t->dP, CUDA_R_32F, T, tt, k, CUDA_R_32F, ldq, 0, 0.f, dq, ldq, d.D, nb, ct));
      for (int i = 0; i < nb; i++) {
        TRY(gemm(t, true, false, T, d.D, T, 1.f, t->dP + i * tt, CUDA_R_32F, T, 0, q + (size_t)i * d.D, CUDA_R_32F, ldq, 0, 1.f,
                 dk, ldq, 0, 1, ct));
        TRY(gemm(t, true, false, T, d.D, T, 1.f, t->S + i * tt, CUDA_R_32F, T, 0, dout + (size_t)i * d.D, CUDA_R_32F, d.Q, 0, 1.f,
                 dv, ldq, 0, 1, ct));
      }
    }
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== layers
#define GRID(n) (unsigned)(((n) + 255) / 256), 256, 0, st

// the experts' rows: sort (token, expert) pairs by expert, offsets to the host
static gptoss_status moe_route(trainer *t) {
  const dims &d = t->v->d;
  cudaStream_t st = t->v->stream;
  int T = t->T, TK = T * d.K;
  launch_moe_sort(t->sel, T, d.E, d.K, &t->mw, st);
  invperm_kernel<<<GRID(TK)>>>(t->mw.perm, t->invp, TK);
  gather_kernel<<<TK, 256, 0, st>>>(t->xn2, t->mw.perm, d.K, d.H, t->xg);
  // for the host's grouped cuBLAS calls (ranks over 64) alone, which wait
  // for it: everything else reads the offsets on the device, so the host
  // queues the layers without waiting for the GPU
  CU(cudaMemcpyAsync(t->off_host, t->mw.offsets, sizeof(int32_t) * (d.E + 1), cudaMemcpyDeviceToHost, st));
  CU(cudaEventRecord(t->ev_off, st));
  return GPTOSS_OK;
}

// The layer from x to xout (NULL: the backward's recompute, which needs only
// the intermediates); LAUNCHED catches bad launch configurations.
static gptoss_status layer_fwd(trainer *t, int l, const float *x, float *xout) {
  const dims &d = t->v->d;
  const dlayer *w = &t->v->layer[l];
  cudaStream_t st = t->v->stream;
  int T = t->T, ldq = d.Q + 2 * d.KV, TK = T * d.K;
  t->lo = t->lo_buf;
  rms_fwd_kernel<<<T, 256, 0, st>>>(x, NULL, w->attn_norm, t->xn1, t->inv1, d.H, d.eps);
  TRY(wgemm(t, t->xn1, T, d.H, w->qkv_w, ldq, d.H, true, t->qkv, ldq, 0.f));
  add_bias(t, t->qkv, ldq, w->qkv_b, T, ldq);
  TRY(lora_fwd(t, l, GPTOSS_LORA_Q, t->xn1, d.H, t->qkv, ldq));
  TRY(lora_fwd(t, l, GPTOSS_LORA_K, t->xn1, d.H, t->qkv + d.Q, ldq));
  TRY(lora_fwd(t, l, GPTOSS_LORA_V, t->xn1, d.H, t->qkv + d.Q + d.KV, ldq));
  rope_kernel<<<GRID((size_t)T * d.Hq * (d.D / 2))>>>(t->qkv, ldq, T, d.Hq, d.D, t->v->inv_freq, d.rope_scale, 1.f);
  rope_kernel<<<GRID((size_t)T * d.Hkv * (d.D / 2))>>>(t->qkv + d.Q, ldq, T, d.Hkv, d.D, t->v->inv_freq, d.rope_scale, 1.f);
  cuda_prof_mark("train qkv fwd", st);
  TRY(attention_fwd(t, l));
  cuda_prof_mark("train attention fwd", st);
  CU(cudaMemcpyAsync(t->xmid, x, sizeof(float) * T * d.H, cudaMemcpyDeviceToDevice, st));
  TRY(wgemm(t, t->att, T, d.Q, w->o_w, d.H, d.Q, true, t->xmid, d.H, 1.f));
  add_bias(t, t->xmid, d.H, w->o_b, T, d.H);
  TRY(lora_fwd(t, l, GPTOSS_LORA_O, t->att, d.Q, t->xmid, d.H));
  cuda_prof_mark("train o fwd", st);
  // MoE
  rms_fwd_kernel<<<T, 256, 0, st>>>(t->xmid, NULL, w->mlp_norm, t->xn2, t->inv2, d.H, d.eps);
  TRY(router_logits(t, w));
  add_bias(t, t->rl, d.E, w->router_b, T, d.E);
  topk_kernel<<<(T + 7) / 8, 256, 0, st>>>(t->rl, T, d.E, d.K, t->sel, t->w);
  TRY(moe_route(t));
  cuda_prof_mark("train router fwd", st);
  dlora *lgu = &t->mod[l][GPTOSS_LORA_GU], *ldn = &t->mod[l][GPTOSS_LORA_DN];
  // the experts' inputs split once for all their rows (mxfp4_gemm.cu
  // decodes the weights as it goes). The recompute's products from here on
  // feed only the backward, and take its precision.
  cuda_prof_mark("train moe lora and misc", st);
  if (!xout) t->lo = lo_bwd(t);
  split(t, t->xg, TK, d.H, d.H);
  TRY(expert_products(t, w->gu_blocks, w->gu_scales, 2 * d.I, d.H, true, w->gu_bias, t->gu, 2 * d.I));
  cuda_prof_mark("train experts mxfp4", st);
  TRY(lora_experts_fwd(t, lgu, t->xg, d.H, t->gu, 2 * d.I, t->eu[0]));
  cuda_prof_mark("train gate_up fwd", st);
  swiglu_kernel<<<GRID((size_t)TK * d.I)>>>(t->gu, t->act, (size_t)TK * d.I, d.limit);
  cuda_prof_mark("train moe lora and misc", st);
  if (!xout) {   // the backward needs only A act of the down product (route_bwd_kernel)
    TRY(lora_experts_ax(t, ldn, t->act, d.I, t->eu[1]));
    cuda_prof_mark("train down fwd", st);
    CU(cudaGetLastError());
    return GPTOSS_OK;
  }
  split(t, t->act, TK, d.I, d.I);
  TRY(expert_products(t, w->dn_blocks, w->dn_scales, d.H, d.I, true, w->dn_bias, t->ye, d.H));
  cuda_prof_mark("train experts mxfp4", st);
  TRY(lora_experts_fwd(t, ldn, t->act, d.I, t->ye, d.H, t->eu[1]));
  cuda_prof_mark("train down fwd", st);
  combine_kernel<<<T, 256, 0, st>>>(xout, t->xmid, t->ye, t->w, t->invp, d.H, d.K);
  cuda_prof_mark("train moe fwd", st);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

// dx (in: d loss / d x_out; out: d loss / d x) through layer l, whose
// intermediates layer_fwd has just left for input x
static gptoss_status layer_bwd(trainer *t, int l, const float *x) {
  const dims &d = t->v->d;
  const dlayer *w = &t->v->layer[l];
  cudaStream_t st = t->v->stream;
  int T = t->T, ldq = d.Q + 2 * d.KV, TK = T * d.K;
  t->lo = lo_bwd(t);
  dlora *lgu = &t->mod[l][GPTOSS_LORA_GU], *ldn = &t->mod[l][GPTOSS_LORA_DN];
  // MoE: ye takes dy's rows (unweighted), then ud = W_e^T dy (+ the
  // LoRA's) over them (route_bwd_kernel); gu becomes d gu, xg d xg
  gather_kernel<<<TK, 256, 0, st>>>(t->dx, t->mw.perm, d.K, d.H, t->ye);
  if (ldn->host) {   // gB += s (w_k dy)^T A act, with A act weighted in place
    TRY(lora_experts_dh(t, ldn, t->ye, d.H));
    scale_rows_kernel<<<GRID((size_t)TK * ldn->r)>>>(t->eu[1], ldn->r, t->w, t->mw.perm, (size_t)TK * ldn->r);
    TRY(lora_experts_gB(t, ldn, t->ye, d.H, t->eu[1]));
  }
  cuda_prof_mark("train moe lora and misc", st);
  split(t, t->ye, TK, d.H, d.H);
  TRY(expert_products(t, w->dn_blocks, w->dn_scales, d.H, d.I, false, NULL, t->ye, d.I));
  cuda_prof_mark("train experts mxfp4", st);
  TRY(lora_experts_dx(t, ldn, t->ye, d.I));
  route_bwd_kernel<<<T, 256, 0, st>>>(t->dx, t->ye, t->act, w->dn_bias, t->w, t->sel, t->invp, w->router_w, t->dxn, d.H, d.I,
                                      d.K);
  cuda_prof_mark("train router bwd", st);
  if (ldn->host) {   // gA += (w_k s dy B_e)^T act
    scale_rows_kernel<<<GRID((size_t)TK * ldn->r)>>>(t->ldh, ldn->r, t->w, t->mw.perm, (size_t)TK * ldn->r);
    TRY(lora_experts_gA(t, ldn, t->act, d.I));
  }
  cuda_prof_mark("train down bwd", st);
  swiglu_bwd_kernel<<<GRID((size_t)TK * d.I)>>>(t->gu, t->ye, t->w, t->mw.perm, d.I, (size_t)TK * d.I, d.limit);
  TRY(lora_experts_grads(t, lgu, t->xg, d.H, t->eu[0], t->gu, 2 * d.I));
  cuda_prof_mark("train moe lora and misc", st);
  split(t, t->gu, TK, 2 * d.I, 2 * d.I);
  TRY(expert_products(t, w->gu_blocks, w->gu_scales, 2 * d.I, d.H, false, NULL, t->xg, d.H));
  cuda_prof_mark("train experts mxfp4", st);
  TRY(lora_experts_dx(t, lgu, t->xg, d.H));
  scatter_kernel<<<T, 256, 0, st>>>(t->dxn, t->xg, t->invp, d.H, d.K);
  rms_bwd_kernel<<<T, 256, 0, st>>>(t->dx, t->xmid, NULL, t->inv2, w->mlp_norm, t->dxn, d.H);
  cuda_prof_mark("train gate_up bwd", st);
  // attention: dx is now d x_mid, the o projection's output gradient
  TRY(wgemm(t, t->dx, T, d.H, w->o_w, d.H, d.Q, false, t->datt, d.Q, 0.f));
  TRY(lora_bwd(t, l, GPTOSS_LORA_O, t->att, d.Q, t->dx, d.H, t->datt, d.Q));
  cuda_prof_mark("train o bwd", st);
  // the attention backward in split bf16 wherever the forward is: in
  // "mixed", its bf16 rounding had moved the attention LoRAs' gradients
  // most (1.5e-2 from PEFT's against 4e-3 with it split)
  t->lo = t->lo_buf;
  TRY(attention_bwd(t, l));
  t->lo = lo_bwd(t);
  cuda_prof_mark("train attention bwd", st);
  // RoPE is a scaled rotation: its transpose rotates back
  rope_kernel<<<GRID((size_t)T * d.Hq * (d.D / 2))>>>(t->dqkv, ldq, T, d.Hq, d.D, t->v->inv_freq, d.rope_scale, -1.f);
  rope_kernel<<<GRID((size_t)T * d.Hkv * (d.D / 2))>>>(t->dqkv + d.Q, ldq, T, d.Hkv, d.D, t->v->inv_freq, d.rope_scale, -1.f);
  TRY(wgemm(t, t->dqkv, T, ldq, w->qkv_w, ldq, d.H, false, t->dxn, d.H, 0.f));
  TRY(lora_bwd(t, l, GPTOSS_LORA_Q, t->xn1, d.H, t->dqkv, ldq, t->dxn, d.H));
  TRY(lora_bwd(t, l, GPTOSS_LORA_K, t->xn1, d.H, t->dqkv + d.Q, ldq, t->dxn, d.H));
  TRY(lora_bwd(t, l, GPTOSS_LORA_V, t->xn1, d.H, t->dqkv + d.Q + d.KV, ldq, t->dxn, d.H));
  rms_bwd_kernel<<<T, 256, 0, st>>>(t->dx, x, NULL, t->inv1, w->attn_norm, t->dxn, d.H);
  cuda_prof_mark("train qkv bwd", st);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}
// }======================================================

// {====================================================== entry
// The loss head: position rows[i] predicts targets[i]; chunks of lg_rows
// rows of logits (in t->gu, free between the layers' passes), their
// gradients back through lm_head and the final norm into dx.
static gptoss_status loss_head(trainer *t, int nr) {
  const dims &d = t->v->d;
  cudaStream_t st = t->v->stream;
  const float *xl = t->xs + (size_t)d.L * t->T * d.H;
  t->lo = lo_bwd(t);   // past every router: the backward's precision
  rms_fwd_kernel<<<nr, 256, 0, st>>>(xl, t->rows, t->v->norm, t->xf, t->inv1, d.H, d.eps);
  for (int r0 = 0; r0 < nr; r0 += t->lg_rows) {
    int n = nr - r0 < t->lg_rows ? nr - r0 : t->lg_rows;
    float *xf = t->xf + (size_t)r0 * d.H;
    TRY(wgemm(t, xf, n, d.H, t->v->lm_head, d.V, d.H, true, t->gu, d.V, 0.f));
    xent_kernel<<<n, 1024, 0, st>>>(t->gu, d.V, t->targets + r0, t->lossrow + r0);
    TRY(wgemm(t, t->gu, n, d.V, t->v->lm_head, d.V, d.H, false, xf, d.H, 0.f));   // xf becomes d xf
  }
  rms_bwd_kernel<<<nr, 256, 0, st>>>(t->dx, xl, t->rows, t->inv1, t->v->norm, t->xf, d.H);
  cuda_prof_mark("train loss head", st);
  CU(cudaGetLastError());
  return GPTOSS_OK;
}

static gptoss_status run(trainer *t, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n, double *loss, int *count) {
  const dims &d = t->v->d;
  cudaStream_t st = t->v->stream;
  int rmax;
  t->a = a;
  TRY(layout_adapter(t, a, d.L, &rmax));
  TRY(ensure_buffers(t, n, rmax));
  t->T = n;
  uint64_t seed;
  t->drop = (float)gptoss_adapter_dropout(a, &seed);
  t->drop_key = gptoss_mix64(seed ^ ((uint64_t)gptoss_adapter_steps(a) << 32));
  // rows with a target: position p predicts ids[p + 1] where mask[p + 1]
  int32_t *host = (int32_t *)malloc(sizeof(int32_t) * 2 * (size_t)n);
  if (!host) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  int nr = 0;
  for (int p = 0; p + 1 < n; p++)
    if (mask[p + 1]) { host[nr] = p; host[n + nr] = ids[p + 1]; nr++; }
  cudaError_t e = cudaMemcpyAsync(t->ids, ids, sizeof(int32_t) * n, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess && nr) e = cudaMemcpyAsync(t->rows, host, sizeof(int32_t) * nr, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess && nr) e = cudaMemcpyAsync(t->targets, host + n, sizeof(int32_t) * nr, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);
  free(host);
  if (e != cudaSuccess) return cuda_fail(e, "copying the sequence", __FILE__, __LINE__);
  *loss = 0;
  *count = nr;
  if (!nr) return GPTOSS_OK;   // nothing to learn from: the gradients stay as they are
  cuda_prof_mark("start", st);
  launch_embed(t->ids, n, t->v->embed, t->xs, d.H, st);
  for (int l = 0; l < d.L; l++) {
    TRY(upload_layer(t, l));
    cuda_prof_mark("train adapter upload", st);
    TRY(layer_fwd(t, l, t->xs + (size_t)l * n * d.H, t->xs + (size_t)(l + 1) * n * d.H));
  }
  t->version = gptoss_adapter_version(a);
  CU(cudaMemsetAsync(t->dx, 0, sizeof(float) * n * d.H, st));
  TRY(loss_head(t, nr));
  for (int l = d.L - 1; l >= 0; l--) {
    TRY(grads_begin(t, l));
    TRY(layer_fwd(t, l, t->xs + (size_t)l * n * d.H, NULL));
    TRY(layer_bwd(t, l, t->xs + (size_t)l * n * d.H));
    TRY(grads_end(t, l));
    cuda_prof_mark("train gradients down", st);
  }
  float *lr = (float *)malloc(sizeof(float) * nr);
  if (!lr) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  e = cudaMemcpyAsync(lr, t->lossrow, sizeof(float) * nr, cudaMemcpyDeviceToHost, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);
  double total = 0;
  for (int i = 0; i < nr; i++) total += lr[i];
  free(lr);
  if (e != cudaSuccess) return cuda_fail(e, "the backward pass", __FILE__, __LINE__);
  if ((e = adder_wait(t)) != cudaSuccess) return cuda_fail(e, "copying the gradients to the host", __FILE__, __LINE__);
  cuda_prof_mark("train gradients down", st);
  cuda_prof_flush();
  *loss = total;
  return GPTOSS_OK;
}

gptoss_status cuda_lora_backward(const train_view *v, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                 double *loss, int *count) {
  trainer *t = (trainer *)*v->state;
  if (!t) {
    if (!(t = (trainer *)calloc(1, sizeof *t))) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
    // at most 8 threads: AdamW's update (adapter.c) runs on all cores but
    // two while the forward uploads, and more spinning workers on the same
    // cores starve the thread that drives the GPU
    if (!(t->pool = gptoss_pool_new(v->threads > 8 ? 8 : v->threads < 1 ? 1 : v->threads))) {
      free(t);
      return gptoss_fail(GPTOSS_ENOMEM, "out of memory for the trainer's threads");
    }
    *v->state = t;
  }
  t->v = v;
  double t0 = now_ms();
  gptoss_status rc = run(t, a, ids, mask, n, loss, count);
  if (rc) adder_wait(t);   // this call's adds finish before the caller sees the error
  cuda_prof_host("host backward call", now_ms() - t0);
  if (rc) {
    // the device copy may be half-written: upload it again next time. The
    // host may have received some layers' gradients of this call.
    if (t->cs) cudaStreamSynchronize(t->cs);
    t->version = 0;
    if (gptoss_errcode() == GPTOSS_ENOMEM) {
      cudaStreamSynchronize(v->stream);
      *v->bytes -= t->buf_bytes + t->lbytes;
      release_buffers(t);
      release_lora(t);
    }
  }
  return rc;
}
// }======================================================
