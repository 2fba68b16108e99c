// backend.cuh: what the CUDA backend's host files share (backend.cu: the
// model, its weights and sessions, errors and profiling; forward.cu: the
// workspace, the forward passes and sampling).
#pragma once

#include "common.cuh"

#define BLAS_WS ((size_t)32 << 20)   // what NVIDIA suggests for Hopper
#define ALIGN(x) (((x) + 255) & ~(size_t)255)
// the most tokens one pass takes: the workspace is sized for this many
#define PASS_TOKENS 2048
#define FLASH_MIN_RUN 16
// a run whose tiles' blocks do not fill the GPU takes them only if its keys
// are this few: each block walks all of them, unsplit (below: the split kernel)
#define FLASH_SHORT_KEYS 1024
#define TRY(call) do { gptoss_status r_ = (call); if (r_) return r_; } while (0)

// the experts' paths' defaults (cuda_model's moe_small_rows, moe_mma_rows):
// the CUDA-core GEMVs up to 2 rows an expert (8 sessions: 372 -> 542 tok/s;
// at 4 or 8 rows they lost to the tensor-core tiles). moe_mma.cu and
// dense_mma.cu are off until a GPU has run them (bench/NOTES.md, "64
// sessions"): GPTOSS_MOE_MMA_ROWS=32 GPTOSS_DENSE_MMA_TOKENS=64 turn them on
#define MOE_SMALL_ROWS 2
#define MOE_MMA_ROWS 0
#define DENSE_MMA_TOKENS 0

struct cuda_model {
  int dev;
  cudaStream_t stream;
  cublasHandle_t blas;
  void *blas_ws;                           // BLAS_WS bytes, cuBLAS's workspace
  char *arena;
  size_t arena_bytes;
  dlayer layer[CUDA_MAX_LAYERS];
  const bf16 *embed, *norm, *lm_head;     // embed: the device's view of embed_host where that is set
  void *embed_host;                        // the untied embedding table, pinned host memory the GPU reads
  float *inv_freq;
  dims d;
  int sms;
  size_t budget, kv_bytes, ws_bytes;
  // general forward workspace, for up to ws_tokens tokens and ws_sess sessions
  int ws_tokens, ws_sess, ws_out;
  int ws_gen;                              // bumped when the workspace moves: graphs must be captured again
  float *x, *qkv, *q, *att, *tmp, *rl, *y, *wts, *part_ml, *part_acc, *logits, *act;
  bf16 *xn, *xn_lo, *att16, *att_lo;
  gptoss_precision precision;
  int split;                               // split-bf16 activations in the GEMMs (precision "exact", "mixed")
  int invariant;                           // batch-invariant (gptoss_model_opts): fixed-order products, splits and MoE kernels
  int32_t *ids, *tok_pos, *tok_sess, *sel, *rows;
  const dsess **sess_arr;
  moe_work mw;
  int32_t *trace_sel; float *trace_w;    // [L][ws_tokens][K]
  // prefill's experts on wgmma (moe.cu): whether (Hopper, not batch-invariant,
  // GPTOSS_MOE_GEMM not "wmma"), and their buffers in the workspace
  int moe_wgmma;
  // which experts' kernels a pass takes, by its (token, expert) rows per
  // expert on average: up to moe_small_rows the CUDA-core GEMVs, up to
  // moe_mma_rows moe_mma.cu's kernel, past it the tiled GEMMs (forward.cu;
  // GPTOSS_MOE_SMALL_ROWS and GPTOSS_MOE_MMA_ROWS set them, to compare)
  int moe_small_rows, moe_mma_rows;
  // the general pass's dense products of at most dense_mma_tokens tokens on
  // dense_mma.cu's kernel, not cuBLAS (GPTOSS_DENSE_MMA_TOKENS; 0: cuBLAS
  // always), and its K slices' buffer in the workspace
  int dense_mma_tokens;
  float *dense_part;
  size_t dense_part_floats;
  // prefill's attention in tiles (flash_attention.cu) for runs of at least
  // FLASH_MIN_RUN positions: whether (a head shape it takes; not
  // batch-invariant; GPTOSS_PREFILL_ATTENTION not "split")
  int flash_prefill;
  // the decode step's per-layer kernels and lm_head by programmatic
  // dependent launch (common.cuh): whether (this build's code for the
  // device is Hopper's; GPTOSS_PDL=1, since it measured slower)
  int pdl;
  bf16 *moe_hi, *moe_lo;                   // [ws_tokens K][max(H, I)]: sorted operands
  float *moe_f;                            // [ws_tokens K][max(2I, H)]: gate_up's, then down's products
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
  // a rank of a split model (csrc/split.c): the ranks' communicator (comm.cu), this one's place
  gptoss_comm *comm;
  int rank;
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

static inline cuda_model *model_of(const gptoss_model *m) { return (cuda_model *)m->bm; }
static inline cuda_session *session_of(const gptoss_session *s) { return (cuda_session *)s->bs; }

// backend.cu
// GPTOSS_OK, or the one message for a device whose context an earlier
// sticky error lost (cuda_fail)
gptoss_status cuda_device_usable(int dev);
bool cuda_prof_on(void);

// forward.cu
void free_workspace(cuda_model *cm);
gptoss_status ensure_workspace(cuda_model *cm, int T, int S);
gptoss_status cuda_run(const gptoss_plan *p);
gptoss_status cuda_sample(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *outids);
// a sampler's parameters for the GPU, its seed drawn
void to_gpu_params(const gptoss_sampling *p, gptoss_sampler *smp, gpu_sampling *g);
// decode.cu
gptoss_status cuda_decode(gptoss_session *s, int32_t id, gptoss_sampler *smp, int32_t *next);
// the communicator of a model split over these GPUs (comm.cu)
gptoss_status cuda_comm_new(const int *devices, int n, gptoss_comm **out);
// what lora.cu needs to make adapters' device copies (adapters: whether
// sessions use them, which gives back the trainer's memory first)
lora_view adapter_view(cuda_model *cm, int adapters);

// Where a forward's LoRA passes find their adapters (forward.cu, decode.cu):
// each token's table, the router's choices (K a token) and the rank
// products' rows (u, rmax)
struct lora_site {
  const dlora_mod *const *tok;
  const int32_t *sel;
  int K;
  float *u;
  int rmax;
  cudaStream_t stream;
};

// one delta pass (lora_pass_of's arguments)
static inline void lora_run(const lora_site &w, int l, int nm, const int *mods, const int *ooffs, int n, const int32_t *perm,
                            const float *xf, const bf16 *xh, const bf16 *xl, int in_sorted, float *out, int ostride, int mode,
                            int outs) {
  lora_pass p = lora_pass_of(w.tok, l, nm, mods, ooffs, n, perm, w.sel, w.K, xf, xh, xl, in_sorted, w.u, w.rmax, out, ostride, mode);
  launch_lora(&p, outs, w.stream);
}

// the modules of each LoRA pass (q, k and v share one), as lora_pass takes them
static const int qkv_mods[3] = {GPTOSS_LORA_Q, GPTOSS_LORA_K, GPTOSS_LORA_V};
static const int mod_o = GPTOSS_LORA_O, mod_gu = GPTOSS_LORA_GU, mod_dn = GPTOSS_LORA_DN, off0 = 0;
