// forward.cu: the CUDA backend's general forward pass (any tokens of any
// sessions: prefill, batched decode) over a workspace sized for the largest
// pass, and sampling on the GPU for it. decode.cu has the batch-1 decode
// step, captured once per session into a CUDA graph.
//
// Shapes and order of operations follow csrc/cpu/forward.c, the reference
// this backend is tested against. docs/ARCHITECTURE.md says why the
// general pass, the decode step and the trainer's layer (train_layer.cu)
// are three sequences.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend.cuh"

// after a batch of launches: a bad launch configuration shows up here
#define LAUNCHED() CU(cudaGetLastError())
// a batch-invariant model's attention splits: keys a split (a TILE multiple)
#define INVARIANT_SPLIT 256

// {====================================================== workspace
void free_workspace(cuda_model *cm) {
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
gptoss_status ensure_workspace(cuda_model *cm, int T, int S) {
  if (T <= cm->ws_tokens && S <= cm->ws_sess) return GPTOSS_OK;
  int nt = T > cm->ws_tokens ? T : cm->ws_tokens, ns = S > cm->ws_sess ? S : cm->ws_sess;
  if (ns < 64) ns = 64;
  free_workspace(cm);
  const dims &d = cm->d;
  size_t TK = (size_t)nt * d.K;
  int outrows = 64;
  // attention partials: T <= 64 tokens may split their keys up to 64 ways
  size_t prows = (size_t)(nt > 64 * 64 ? nt : 64 * 64) * d.Hq;
  // the few-token dense products' K slices: qkv's and o_proj's outputs (lm_head runs unsliced)
  int dense_t = nt < cm->dense_mma_tokens ? nt : cm->dense_mma_tokens;
  size_t dense_part = dense_t ? dense_mma_part_floats(dense_t, d.Q + 2 * d.KV > d.H ? d.Q + 2 * d.KV : d.H) : 0;
  size_t sorted = cm->moe_wgmma ? sizeof(bf16) * TK * (d.H > d.I ? d.H : d.I) : 0;
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
    sizeof(int32_t) * SAMPLE_BIAS_CAP, sizeof(float) * SAMPLE_BIAS_CAP,     // logit bias
    sizeof(gpu_sampling) * ns, sizeof(int32_t) * ns, sizeof(int32_t *) * ns, sizeof(int32_t) * ns,
    // the wgmma experts' sorted operands (bf16 hi, lo) and fp32 products (gate_up, then down)
    sorted, cm->split ? sorted : 0, cm->moe_wgmma ? sizeof(float) * TK * (2 * d.I > d.H ? 2 * d.I : d.H) : 0,
    sizeof(float) * dense_part,                   // dense_mma.cu's slices (qkv, o_proj)
  };
  size_t total = 0;
  for (size_t i = 0; i < sizeof sz / sizeof sz[0]; i++) total += ALIGN(sz[i]);
  if (cm->budget && cm->arena_bytes + cm->kv_bytes + total > cm->budget)
    return gptoss_fail(GPTOSS_ENOMEM, "a forward pass of %d tokens needs %.1f MB of workspace beyond the memory budget of %.1f MB",
                       T, total / 1e6, cm->budget / 1e6);
  CU(cudaMalloc((void **)&cm->ws, total));
  char *p = cm->ws;
  size_t k = 0;
#define NEXT_PART(ptr, type) do { ptr = (type)p; p += ALIGN(sz[k]); k++; } while (0)
  NEXT_PART(cm->x, float *); NEXT_PART(cm->qkv, float *); NEXT_PART(cm->q, float *); NEXT_PART(cm->att, float *); NEXT_PART(cm->tmp, float *);
  NEXT_PART(cm->rl, float *); NEXT_PART(cm->y, float *); NEXT_PART(cm->wts, float *); NEXT_PART(cm->part_ml, float *); NEXT_PART(cm->part_acc, float *);
  NEXT_PART(cm->logits, float *); NEXT_PART(cm->act, float *); NEXT_PART(cm->xn, bf16 *); NEXT_PART(cm->xn_lo, bf16 *);
  NEXT_PART(cm->att16, bf16 *); NEXT_PART(cm->att_lo, bf16 *);
  NEXT_PART(cm->ids, int32_t *); NEXT_PART(cm->tok_pos, int32_t *); NEXT_PART(cm->tok_sess, int32_t *); NEXT_PART(cm->sel, int32_t *);
  NEXT_PART(cm->rows, int32_t *); NEXT_PART(cm->sess_arr, const dsess **);
  int32_t *mw;
  NEXT_PART(mw, int32_t *);
  cm->mw.counts = mw; cm->mw.offsets = mw + (d.E + 1); cm->mw.tile_offsets = mw + 2 * (d.E + 1);
  cm->mw.cursor = mw + 3 * (d.E + 1); cm->mw.perm = mw + 4 * (d.E + 1);
  NEXT_PART(cm->trace_sel, int32_t *); NEXT_PART(cm->trace_w, float *);
  NEXT_PART(cm->sw.cub_temp, void *);
  float *keys; int32_t *idx;
  NEXT_PART(keys, float *); NEXT_PART(idx, int32_t *);
  cm->sw.keys_in = keys; cm->sw.keys_out = keys + d.V; cm->sw.idx_in = idx; cm->sw.idx_out = idx + d.V;
  NEXT_PART(cm->sw.partial_f, float *); NEXT_PART(cm->sw.partial_i, int32_t *);
  NEXT_PART(cm->sw.bias_ids, int32_t *); NEXT_PART(cm->sw.bias_vals, float *);
  NEXT_PART(cm->params_dev, gpu_sampling *); NEXT_PART(cm->out_dev, int32_t *); NEXT_PART(cm->hist_arr, const int32_t **);
  NEXT_PART(cm->hist_len, int32_t *);
  NEXT_PART(cm->moe_hi, bf16 *); NEXT_PART(cm->moe_lo, bf16 *); NEXT_PART(cm->moe_f, float *);
  NEXT_PART(cm->dense_part, float *);
  cm->dense_part_floats = dense_part;
  if (!cm->moe_wgmma) { cm->moe_hi = cm->moe_lo = NULL; cm->moe_f = NULL; }
  if (!cm->split) cm->moe_lo = NULL;
#undef NEXT_PART
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

// {====================================================== general forward
// Y[T, out] = X[T, in] . W^T, W row-major [out, in] bf16, Y fp32; with
// X_lo (split bf16) Y += X_lo . W^T in a second product
static gptoss_status gemm(cuda_model *cm, const bf16 *W, const bf16 *X, const bf16 *X_lo, float *Y, int out, int T, int in) {
  const float one = 1.f, zero = 0.f;
  if (cm->invariant) {
    if (in % 8) return gptoss_fail(GPTOSS_EUNSUP, "batch-invariant products need an input size divisible by 8 (got %d)", in);
    launch_gemm_rows(W, X, X_lo, Y, out, T, in, cm->stream);
    return GPTOSS_OK;
  }
  // a few tokens (batched decode): mma.sync over K slices, not cuBLAS's tiles
  if (T <= cm->dense_mma_tokens && in % 8 == 0) {
    CU(launch_dense_mma(W, X, X_lo, Y, out, T, in, cm->dense_part, cm->dense_part_floats, cm->stream));
    return GPTOSS_OK;
  }
  BLAS(cublasGemmEx(cm->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, &one, W, CUDA_R_16BF, in, X, CUDA_R_16BF, in, &zero,
                    Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (X_lo)
    BLAS(cublasGemmEx(cm->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, &one, W, CUDA_R_16BF, in, X_lo, CUDA_R_16BF, in, &one,
                      Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return GPTOSS_OK;
}

// Sessions that use adapters give back the trainer's memory first
// (training drops the copies in turn), so the two never hold memory at once.
lora_view adapter_view(cuda_model *cm, int adapters) {
  if (adapters && cm->train_bytes) cuda_train_release(cm->train, &cm->train_bytes);
  lora_view v = {cm->stream, cm->d.L, cm->d.I, cm->budget, cm->arena_bytes + cm->kv_bytes + cm->ws_bytes + cm->train_bytes};
  return v;
}

// The general pass's layer: T tokens of many sessions in the workspace's
// rows, products in cuBLAS and the grouped MoE GEMMs
struct batch_layer : layer_ops {
  cuda_model *cm;
  const dims &d;
  cudaStream_t st;
  const unsigned char *sliding;   // [L]
  int T, maxpos, any_trace;
  const int32_t *hpos, *hsess;    // [T] on the host: each token's position and session
  lora_site ls;
  float *ldelta;                  // the gate_up LoRA's deltas, a row per assignment

  explicit batch_layer(cuda_model *model) : cm(model), d(model->d), st(model->stream) {}

  bf16 *xn_lo() const { return cm->split ? cm->xn_lo : NULL; }

  gptoss_status attn_in(int l) override {
    const dlayer &y = cm->layer[l];
    const int qkv_off[3] = {0, d.Q, d.Q + d.KV};
    launch_rmsnorm(cm->x, NULL, T, y.attn_norm, cm->xn, xn_lo(), d.H, d.eps, st);
    cuda_prof_mark("fwd norm", st);
    TRY(gemm(cm, y.qkv_w, cm->xn, xn_lo(), cm->qkv, d.Q + 2 * d.KV, T, d.H));
    if (ls.tok) {
      lora_run(ls, l, 3, qkv_mods, qkv_off, T, NULL, NULL, cm->xn, xn_lo(), 0, cm->qkv, d.Q + 2 * d.KV, LORA_ADD_TOKEN, d.Q);
      cuda_prof_mark("fwd lora", st);
    }
    cuda_prof_mark("fwd qkv", st);
    return GPTOSS_OK;
  }

  gptoss_status attention(int l) override {
    const dlayer &y = cm->layer[l];
    attn_args a;
    memset(&a, 0, sizeof a);
    a.qkv = cm->qkv; a.q = cm->q; a.tok_pos = cm->tok_pos; a.tok_sess = cm->tok_sess; a.sess = cm->sess_arr;
    a.T = T; a.layer = l; a.sliding = sliding[l]; a.inv_freq = cm->inv_freq; a.bias = y.qkv_b;
    launch_rope_store(&a, &d, st);
    int span = sliding[l] ? d.window : maxpos + 1;
    if (cm->invariant) {
      // a query's splits cover the same keys whatever the batch's longest
      // position is (splits past its own are empty and add exact zeros); in
      // groups of tokens whose partials fit the workspace (4096 a head)
      int nsplit = (span + INVARIANT_SPLIT - 1) / INVARIANT_SPLIT, group = 4096 / nsplit;
      for (int t0 = 0; t0 < T; t0 += group) {
        attn_args g = a;
        g.q = a.q + (size_t)t0 * d.Q; g.tok_pos = a.tok_pos + t0; g.tok_sess = a.tok_sess + t0;
        g.T = T - t0 < group ? T - t0 : group;
        launch_attention(&g, &d, y.sinks, nsplit, INVARIANT_SPLIT, cm->part_ml, cm->part_acc, cm->att + (size_t)t0 * d.Q, st);
      }
      cuda_prof_mark("fwd rope+attention", st);
      return GPTOSS_OK;
    }
    if (!cm->flash_prefill) {
      keys_split(a, y, span, 0, T);
      cuda_prof_mark("fwd rope+attention", st);
      return GPTOSS_OK;
    }
    // a session's run of FLASH_MIN_RUN or more consecutive positions (a
    // prompt's chunk) goes to the tiles (flash_attention.cu), unless their
    // blocks would not fill the GPU and each would walk many keys (a short
    // turn deep in a long context), where the split kernel, which splits
    // the keys, is faster; the tokens between such runs (decode steps,
    // short feeds) go to the split kernel too
    int rest = 0;
    for (int t0 = 0; t0 < T;) {
      int u = t0 + 1;
      while (u < T && hsess[u] == hsess[t0] && hpos[u] == hpos[u - 1] + 1) u++;
      int n = u - t0, keys = sliding[l] ? d.window + n : hpos[t0] + n;
      int blocks = (n + FLASH_PREFILL_QUERIES - 1) / FLASH_PREFILL_QUERIES * d.Hkv;
      if (n >= FLASH_MIN_RUN && (blocks >= cm->sms || keys <= FLASH_SHORT_KEYS)) {
        if (rest < t0) keys_split(a, y, span, rest, t0);
        flash_prefill_args f;
        memset(&f, 0, sizeof f);
        f.q = cm->q + (size_t)t0 * d.Q; f.sess = cm->sess_arr; f.sinks = y.sinks;
        f.sess_index = hsess[t0]; f.p0 = hpos[t0]; f.n = n; f.layer = l; f.window = sliding[l] ? d.window : 0;
        f.Q = d.Q; f.KV = d.KV; f.Hq = d.Hq; f.Hkv = d.Hkv; f.D = d.D; f.kv32 = d.kv32; f.split = cm->split;
        f.scale = 1.f / sqrtf((float)d.D);
        f.att = cm->att + (size_t)t0 * d.Q;
        CU(launch_flash_prefill(&f, st));
        rest = u;
      }
      t0 = u;
    }
    if (rest < T) keys_split(a, y, span, rest, T);
    cuda_prof_mark("fwd rope+attention", st);
    return GPTOSS_OK;
  }

  // the split kernel (attention.cu) on tokens t0 .. t1 - 1; few tokens
  // split their keys (up to 64 ways) to fill the multiprocessors
  void keys_split(const attn_args &a, const dlayer &y, int span, int t0, int t1) {
    attn_args g = a;
    int n = t1 - t0;
    g.q = a.q + (size_t)t0 * d.Q; g.tok_pos = a.tok_pos + t0; g.tok_sess = a.tok_sess + t0; g.T = n;
    int nsplit = 1, split_len = span;
    if (n <= 64 && n * d.Hkv < 2 * cm->sms) {
      nsplit = (span + 255) / 256;
      if (nsplit > 64) nsplit = 64;
      split_len = (span + nsplit - 1) / nsplit;
    }
    launch_attention(&g, &d, y.sinks, nsplit, split_len, cm->part_ml, cm->part_acc, cm->att + (size_t)t0 * d.Q, st);
  }

  gptoss_status attn_out(int l) override {
    const dlayer &y = cm->layer[l];
    bf16 *att_lo = cm->split ? cm->att_lo : NULL;
    launch_bf16_from_f32(cm->att, cm->att16, att_lo, (size_t)T * d.Q, st);
    TRY(gemm(cm, y.o_w, cm->att16, att_lo, cm->tmp, d.H, T, d.Q));
    if (ls.tok) {
      cuda_prof_mark("fwd o_proj", st);
      lora_run(ls, l, 1, &mod_o, &off0, T, NULL, cm->att, NULL, NULL, 0, cm->tmp, d.H, LORA_ADD_TOKEN, d.H);
      cuda_prof_mark("fwd lora", st);
    }
    launch_add_bias_residual(cm->x, cm->tmp, y.o_b, T, d.H, st);
    cuda_prof_mark("fwd o_proj", st);
    return GPTOSS_OK;
  }

  gptoss_status route(int l) override {
    const dlayer &y = cm->layer[l];
    launch_router(cm->x, T, y.mlp_norm, d.eps, y.router_w, y.router_b, d.H, d.E, d.K, cm->xn, xn_lo(), NULL, cm->sel, cm->wts, st);
    cuda_prof_mark("fwd router", st);
    if (any_trace) {
      CU(cudaMemcpyAsync(cm->trace_sel + (size_t)l * T * d.K, cm->sel, sizeof(int32_t) * T * d.K, cudaMemcpyDeviceToDevice, st));
      CU(cudaMemcpyAsync(cm->trace_w + (size_t)l * T * d.K, cm->wts, sizeof(float) * T * d.K, cudaMemcpyDeviceToDevice, st));
    }
    launch_moe_sort(cm->sel, T, d.E, d.K, d.e_lo, d.e_hi, &cm->mw, st);
    cuda_prof_mark("fwd moe sort", st);
    return GPTOSS_OK;
  }

  gptoss_status experts(int l) override {
    const dlayer &y = cm->layer[l];
    bf16 *xn_lo = this->xn_lo();
    // few rows per expert (batched decode): read each expert once, no padded
    // tiles; a batch-invariant model always takes the CUDA-core GEMVs, whose
    // sums are per row (the tensor cores' are not)
    bool small = cm->invariant || T * d.K <= cm->moe_small_rows * d.E;
    bool mma = !small && T * d.K <= cm->moe_mma_rows * d.E;
    const float *delta = NULL;
    if (ls.tok) {
      lora_run(ls, l, 1, &mod_gu, &off0, T * d.K, cm->mw.perm, NULL, cm->xn, xn_lo, 0, ldelta, 2 * d.I, LORA_SET_ROW, 2 * d.I);
      delta = ldelta;
      cuda_prof_mark("fwd lora", st);
    }
    // prefill's rows: Hopper's wgmma kernel where the model has its buffers
    bool wgmma = !small && !mma && cm->moe_f;
    if (small) launch_moe_gate_up_small(cm->xn, xn_lo, &cm->mw, &y, &d, delta, cm->act, st);
    else if (mma) launch_moe_gate_up_mma(cm->xn, xn_lo, &cm->mw, &y, &d, delta, cm->act, st);
    else if (wgmma) CU(launch_moe_gate_up_wgmma(cm->xn, xn_lo, &cm->mw, T, &y, &d, delta, cm->moe_hi, cm->moe_lo, cm->moe_f, cm->act, st));
    else launch_moe_gate_up(cm->xn, xn_lo, &cm->mw, T, &y, &d, delta, cm->act, st);
    cuda_prof_mark("fwd moe gate_up", st);
    // a rank of a split model writes its experts' rows; the others' are
    // zeros until the ranks' sum brings them (csrc/backend.h)
    if (cm->comm) CU(cudaMemsetAsync(cm->y, 0, sizeof(float) * T * d.K * d.H, st));
    if (small) launch_moe_down_small(cm->act, &cm->mw, &y, &d, cm->y, st);
    else if (mma) launch_moe_down_mma(cm->act, cm->split, &cm->mw, &y, &d, cm->y, st);
    else if (wgmma) CU(launch_moe_down_wgmma(cm->act, &cm->mw, T, &y, &d, cm->moe_hi, cm->moe_lo, cm->moe_f, cm->y, st));
    else launch_moe_down(cm->act, cm->split, &cm->mw, T, &y, &d, cm->y, st);
    if (ls.tok) {
      cuda_prof_mark("fwd moe down", st);
      lora_run(ls, l, 1, &mod_dn, &off0, T * d.K, cm->mw.perm, cm->act, NULL, NULL, 1, cm->y, d.H, LORA_ADD_ASSIGNMENT, d.H);
      cuda_prof_mark("fwd lora", st);
    }
    cuda_prof_mark("fwd moe down", st);
    if (cm->comm) {
      TRY(cm->comm->sum(cm->comm, cm->rank, cm->y, (size_t)T * d.K * d.H, st));
      cuda_prof_mark("fwd ranks' sum", st);
    }
    launch_moe_combine(cm->x, cm->y, cm->wts, T, d.H, d.K, st);
    cuda_prof_mark("fwd moe combine", st);
    LAUNCHED();
    return GPTOSS_OK;
  }
};

// Runs T tokens (of nss sessions) through the layers; out rows (token
// indices in rows_host) get logits, written to host out and/or kept.
static gptoss_status forward_tokens(const gptoss_plan *p) {
  gptoss_model *m = p->ss[0]->m;
  int T = p->T, nss = p->nss, nout = p->nout;
  gptoss_session **ss = p->ss;
  const int32_t *ids = p->ids, *pos = p->pos, *sidx = p->sess, *orows = p->rows;
  float *out = p->out;
  cuda_model *cm = model_of(m);
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
  for (int i = 0; i < nss; i++) sa[i] = session_of(ss[i])->dev;
  cudaError_t e = cudaMemcpyAsync(cm->sess_arr, sa, sizeof(dsess *) * nss, cudaMemcpyHostToDevice, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);   // sa is pageable: copy before it is freed
  free(sa);
  if (e != cudaSuccess) return cuda_fail(e, "forward inputs", __FILE__, __LINE__);
  // the device copy of each session's history (its tokens are consecutive here), for penalties
  for (int t = 0; t < T;) {
    int u = t;
    while (u < T && sidx[u] == sidx[t]) u++;
    CU(cudaMemcpyAsync(session_of(ss[sidx[t]])->hist + pos[t], h + t, sizeof(int32_t) * (u - t), cudaMemcpyHostToDevice, st));
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
  int maxpos = 0;
  for (int t = 0; t < T; t++) if (pos[t] > maxpos) maxpos = pos[t];
  cuda_prof_mark("start", st);
  launch_embed(cm->ids, T, cm->embed, cm->x, d.H, st);
  cuda_prof_mark("fwd embed", st);
  int any_trace = 0;
  for (int i = 0; i < nss; i++) any_trace |= ss[i]->trace;
  batch_layer ops(cm);
  ops.sliding = m->cfg.layer_sliding; ops.T = T; ops.maxpos = maxpos; ops.any_trace = any_trace;
  ops.hpos = pos; ops.hsess = sidx;
  ops.ls = {ltok, cm->sel, d.K, lu, lr, st};
  ops.ldelta = ldelta;
  for (int l = 0; l < d.L; l++) TRY(layer_sequence(ops, l));
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
        CU(cudaMemcpyAsync(session_of(s)->logits, cm->logits + (size_t)i * d.V, sizeof(float) * d.V, cudaMemcpyDeviceToDevice, st));
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

gptoss_status cuda_run(const gptoss_plan *p) {
  cuda_model *cm = model_of(p->ss[0]->m);
  TRY(cuda_device_usable(cm->dev));
  CU(cudaSetDevice(cm->dev));
  return forward_tokens(p);
}
// }======================================================

// {====================================================== sampling
void to_gpu_params(const gptoss_sampling *p, gptoss_sampler *smp, gpu_sampling *g) {
  g->temperature = p->temperature; g->top_p = p->top_p; g->min_p = p->min_p;
  g->repetition_penalty = p->repetition_penalty; g->presence_penalty = p->presence_penalty;
  g->frequency_penalty = p->frequency_penalty; g->top_k = p->top_k; g->penalty_window = p->penalty_window;
  g->n_bias = p->n_bias;
  g->bias_off = 0;
  g->seed = gptoss_sampler_draw(smp);
  g->counter = 0;
}

gptoss_status cuda_sample(gptoss_session **ss, int n, gptoss_sampler **smp, int32_t *outids) {
  cuda_model *cm = model_of(ss[0]->m);
  const dims &d = cm->d;
  gptoss_status rc = ensure_workspace(cm, 1, n);
  if (rc) return rc;
  cudaStream_t st = cm->stream;
  CU(cudaSetDevice(cm->dev));
  int any_bias = 0;
  for (int i = 0; i < n; i++) {
    int b = gptoss_sampler_params(smp[i])->n_bias;
    if (b > SAMPLE_BIAS_CAP)
      return gptoss_fail(GPTOSS_EUNSUP, "sampler %d: more than %d logit biases on CUDA", i + 1, SAMPLE_BIAS_CAP);
    any_bias |= b > 0;
  }
  const int32_t **hp = (const int32_t **)malloc(sizeof(int32_t *) * cm->ws_out);
  int32_t *hl = (int32_t *)malloc(sizeof(int32_t) * cm->ws_out);
  int32_t *bid = any_bias ? (int32_t *)malloc(sizeof(int32_t) * SAMPLE_BIAS_CAP) : NULL;
  float *bval = any_bias ? (float *)malloc(sizeof(float) * SAMPLE_BIAS_CAP) : NULL;
  if (!hp || !hl || (any_bias && (!bid || !bval))) {
    free(hp); free(hl); free(bid); free(bval);
    return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  }
  // in groups of rows whose logit biases fit the workspace together: each
  // session's logits, then the samplers' parameters and biases (a sampler
  // draws its seed here, so a row is taken only once it is known to fit)
  int done = 0;
  cudaError_t e = cudaSuccess;
  while (done < n && e == cudaSuccess) {
    int rows = 0, nb = 0;
    for (; done + rows < n && rows < cm->ws_out && e == cudaSuccess; rows++) {
      const gptoss_sampling *p = gptoss_sampler_params(smp[done + rows]);
      if (nb + p->n_bias > SAMPLE_BIAS_CAP) break;
      e = cudaMemcpyAsync(cm->logits + (size_t)rows * d.V, session_of(ss[done + rows])->logits, sizeof(float) * d.V,
                          cudaMemcpyDeviceToDevice, st);
      to_gpu_params(p, smp[done + rows], &cm->params_host[rows]);
      cm->params_host[rows].bias_off = nb;
      if (p->n_bias) {
        memcpy(bid + nb, p->bias_ids, sizeof(int32_t) * p->n_bias);
        memcpy(bval + nb, p->bias_values, sizeof(float) * p->n_bias);
        nb += p->n_bias;
      }
      hp[rows] = session_of(ss[done + rows])->hist;
      hl[rows] = ss[done + rows]->pos;
    }
    if (e == cudaSuccess) e = cudaMemcpyAsync(cm->params_dev, cm->params_host, sizeof(gpu_sampling) * rows, cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) e = cudaMemcpyAsync(cm->hist_arr, hp, sizeof(int32_t *) * rows, cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) e = cudaMemcpyAsync(cm->hist_len, hl, sizeof(int32_t) * rows, cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess && nb) e = cudaMemcpyAsync(cm->sw.bias_ids, bid, sizeof(int32_t) * nb, cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess && nb) e = cudaMemcpyAsync(cm->sw.bias_vals, bval, sizeof(float) * nb, cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);   // the host arrays are reused by the next group
    if (e != cudaSuccess) break;
    launch_sample(cm->logits, rows, d.V, cm->params_dev, cm->params_host, cm->hist_arr, cm->hist_len, &cm->sw, cm->out_dev, st, NULL);
    e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaMemcpyAsync(cm->out_host, cm->out_dev, sizeof(int32_t) * rows, cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);
    if (e == cudaSuccess) for (int i = 0; i < rows; i++) outids[done + i] = cm->out_host[i];
    done += rows;
  }
  free(hp); free(hl); free(bid); free(bval);
  if (e != cudaSuccess) return cuda_fail(e, "sampling", __FILE__, __LINE__);
  return GPTOSS_OK;
}
// }======================================================
