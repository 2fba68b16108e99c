// train.cuh: what the trainer's files share (train.cu: its state and the
// entry; train_adapter.cu: the adapter's device copy and the gradient
// thread; train_experts.cu: the experts' LoRA products; train_layer.cu: the
// layer passes and the loss head).
#pragma once

#include <time.h>
#include <pthread.h>
#include "common.cuh"

#define TRY(call) do { gptoss_status r_ = (call); if (r_) return r_; } while (0)
#define ALIGN256(x) (((x) + 255) & ~(size_t)255)

// for GPTOSS_PROFILE's host labels
static inline double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// How an fp32 operand enters the tensor cores: rounded to bf16, or split
// into two bf16 terms (hi + lo, about 16 significant bits)
enum operand_rounding { ROUND_BF16, ROUND_SPLIT };

// The model's precision, as each phase of a training call takes it:
// "exact" splits everywhere, "fast" nowhere; "mixed" splits where the
// routing is decided (every layer's forward up to its router and the
// forward's expert products, which feed the next layer's router) and in the
// attention backward, and rounds to bf16 past the routing (the recompute's
// expert products, the loss head, the backward's products): a rounding that
// tips a top-k moves the gradients by percents, where bf16 products after
// the routing move them by less than 1e-2.
struct train_precision {
  operand_rounding routing;        // the forward to the router, the forward's expert products, attention
  operand_rounding past_routing;   // the recompute's expert products, the loss head, the backward's products
};

// The experts' LoRA kernels (train_experts.cu): ranks up to RANK_KERNEL_MAX
// (above it, grouped cuBLAS products), tiles of RANK_TILE rows of one
// expert; a rank is rounded up to a power of two so their loops unroll
// exactly, and rank_down_kernel stages 64 KB of an expert's matrix a
// column chunk.
#define RANK_KERNEL_MAX 64
#define RANK_TILE 64
static inline int rank_rounded(int r) { return r <= 8 ? 8 : r <= 16 ? 16 : r <= 32 ? 32 : 64; }
__device__ __host__ __forceinline__ int rank_chunk(int R) { return (16384 / R) / 32 * 32; }

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
  float *dx, *dxn, *datt, *dqkv, *S, *dP, *tmp, *xf, *lossrow;
  float *xdrop;              // a LoRA module's input after dropout; the attention backward's dk parts
  float *lora_h, *lora_dh;   // a LoRA's rank rows: h = A x, and dh = s dy B
  float *dd;                 // [T][Hq]: O.dO per query and head (flash_attention.cu's backward)
  float *expert_ax[2];       // [T K][r]: the experts' A x of gate_up and of down, from the recompute for the backward
  const float **grouped_ptrs;   // [3][E]: one grouped product's A, B and C per expert
  float *rank_parts;         // rank_down_kernel's partial sums over column chunks
  int *grouped_dims;         // host: a grouped product's dimensions, leading dimensions, scalars and operations
  int32_t *ids, *rows, *targets, *sel, *invp;
  int32_t *seg0, *pos;       // packed examples: each row's example start and position (used when packed)
  moe_work mw;
  bf16 *hi, *lo;             // GEMM inputs as bf16, and their split-bf16 rests (lo NULL in "fast")
  bf16 *router_lo;           // precision "fast": the router's input's split-bf16 rest (see router_logits)
  size_t hi_n;
  int score_heads, logit_rows;   // heads per score batch (materialised attention); logit rows per chunk
  int32_t *off_host;         // pinned [E + 1]
  // the adapter's copy (train_adapter.cu)
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
  train_precision prec;
  int T;
  int moe_tokens;            // the experts' chunk: buffers for T K rows of experts hold this many tokens' (moe_chunk)
  float drop;
  uint64_t drop_key;
  int packed;                // this call's sequence holds packed examples (seg0, pos)
};

// The experts run over a sequence in chunks of t->moe_tokens tokens, so that
// their buffers (T K sorted rows of up to 2I floats, 92 KB a token on the
// 20B) hold one chunk, not the sequence: how a 96k-token sequence fits. A
// chunk is a view of the trainer: t->T and the per-token arrays the
// experts read (xn2, sel, w) moved to its first token, until it ends.
struct moe_chunk {
  trainer *t;
  int T;
  float *xn2, *w;
  int32_t *sel;
  moe_chunk(trainer *tr, int c0) : t(tr), T(tr->T), xn2(tr->xn2), w(tr->w), sel(tr->sel) {
    int H = t->v->d.H, K = t->v->d.K;
    t->T = T - c0 < t->moe_tokens ? T - c0 : t->moe_tokens;
    t->xn2 += (size_t)c0 * H; t->w += (size_t)c0 * K; t->sel += (size_t)c0 * K;
  }
  ~moe_chunk() { t->T = T; t->xn2 = xn2; t->w = w; t->sel = sel; }
};

// the split-bf16 rests for products rounded as r: t->lo, or NULL for bf16 alone
static inline bf16 *lo_of(const trainer *t, operand_rounding r) { return r == ROUND_SPLIT ? t->lo : NULL; }

// train_adapter.cu
gptoss_status layout_adapter(trainer *t, gptoss_adapter *a, int L, int *rmax);
gptoss_status upload_layer(trainer *t, int l);
gptoss_status grads_begin(trainer *t, int l);
gptoss_status grads_end(trainer *t, int l);
cudaError_t adder_wait(trainer *t);
void adapter_copy_release(trainer *t);   // the device copy and its staging
void adapter_copy_free(trainer *t);      // and the copy stream, its events and the adder thread

// train_experts.cu: every expert's LoRA products over the sorted rows
gptoss_status lora_experts_ax(trainer *t, const dlora *L, const float *x, int ldx, float *U);
gptoss_status lora_experts_fwd(trainer *t, const dlora *L, const float *x, int ldx, float *y, int ldy, float *U);
gptoss_status lora_experts_gB(trainer *t, const dlora *L, const float *dy, int ldy, const float *U);
gptoss_status lora_experts_dh(trainer *t, const dlora *L, const float *dy, int ldy);
gptoss_status lora_experts_gA(trainer *t, const dlora *L, const float *x, int ldx);
gptoss_status lora_experts_grads(trainer *t, const dlora *L, const float *x, int ldx, const float *U, const float *dy, int ldy);
gptoss_status lora_experts_dx(trainer *t, const dlora *L, float *dx, int lddx);

// train_layer.cu
gptoss_status layer_fwd(trainer *t, int l, const float *x, float *xout, operand_rounding experts);
gptoss_status layer_bwd(trainer *t, int l, const float *x);
gptoss_status loss_head(trainer *t, int nr);
