// decode.cu: the batch-1 decode step: one token through GEMVs with the
// norm fused, split-K attention and the experts' GEMVs, lm_head and
// sampling, captured once per session into a CUDA graph that later steps
// replay (the position lives on the device). Same order of operations as
// csrc/cpu/forward.c, the reference this backend is tested against.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend.cuh"

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

// The decode step's layer: one token in the session's own buffers (fixed
// when the graph is captured), the position read on the device, GEMVs with
// the norm fused in; lr: the rank of the session's adapter, 0 for none
struct decode_layer : layer_ops {
  cuda_model *cm;
  const dims &d;
  cudaStream_t st;
  cuda_session *cs;
  const unsigned char *sliding;   // [L]
  int lr;
  lora_site ls;

  explicit decode_layer(cuda_model *model) : cm(model), d(model->d), st(model->stream) {}

  gptoss_status attn_in(int l) override {
    const dlayer &y = cm->layer[l];
    const int qkv_off[3] = {0, d.Q, d.Q + d.KV};
    launch_gemv_bf16(cs->d_x, y.attn_norm, d.eps, y.qkv_w, y.qkv_b, cs->d_qkv, d.Q + 2 * d.KV, d.H, NULL, st);
    cuda_prof_mark("dec qkv gemv", st);
    if (lr) {
      launch_rmsnorm(cs->d_x, NULL, 1, y.attn_norm, cs->l_xn, cs->l_xl, d.H, d.eps, st);
      lora_run(ls, l, 3, qkv_mods, qkv_off, 1, NULL, NULL, cs->l_xn, cs->l_xl, 0, cs->d_qkv, d.Q + 2 * d.KV, LORA_ADD_TOKEN, d.Q);
      cuda_prof_mark("dec lora", st);
    }
    return GPTOSS_OK;
  }

  gptoss_status attention(int l) override {
    const dlayer &y = cm->layer[l];
    attn_args a;
    memset(&a, 0, sizeof a);
    a.qkv = cs->d_qkv; a.q = cs->d_q; a.pos_dev = cs->step + 1; a.sess = (const dsess *const *)cm->sess_arr;
    a.T = 1; a.layer = l; a.sliding = sliding[l]; a.inv_freq = cm->inv_freq;
    launch_rope_store(&a, &d, st);
    cuda_prof_mark("dec rope", st);
    int nsplit = sliding[l] ? dec_splits(d.window) : cs->nsplit_full;
    launch_attention(&a, &d, y.sinks, nsplit, 0, cs->d_ml, cs->d_acc, cs->d_att, st);
    cuda_prof_mark("dec attention", st);
    return GPTOSS_OK;
  }

  gptoss_status attn_out(int l) override {
    const dlayer &y = cm->layer[l];
    launch_gemv_bf16(cs->d_att, NULL, d.eps, y.o_w, y.o_b, NULL, d.H, d.Q, cs->d_x, st);
    cuda_prof_mark("dec o gemv", st);
    if (lr) {
      lora_run(ls, l, 1, &mod_o, &off0, 1, NULL, cs->d_att, NULL, NULL, 0, cs->d_x, d.H, LORA_ADD_TOKEN, d.H);
      cuda_prof_mark("dec lora", st);
    }
    return GPTOSS_OK;
  }

  gptoss_status route(int l) override {
    const dlayer &y = cm->layer[l];
    launch_router(cs->d_x, 1, y.mlp_norm, d.eps, y.router_w, y.router_b, d.H, d.E, d.K, NULL, NULL, cs->d_xnf, cs->d_sel, cs->d_w, st);
    cuda_prof_mark("dec router", st);
    return GPTOSS_OK;
  }

  gptoss_status experts(int l) override {
    const dlayer &y = cm->layer[l];
    if (lr) {
      lora_run(ls, l, 1, &mod_gu, &off0, d.K, cs->l_slots, cs->d_xnf, NULL, NULL, 0, cs->l_delta, 2 * d.I, LORA_SET_ROW, 2 * d.I);
      cuda_prof_mark("dec lora", st);
    }
    launch_moe_gate_up_decode(cs->d_xnf, cs->d_sel, &y, &d, lr ? cs->l_delta : NULL, cs->d_act, st);
    cuda_prof_mark("dec moe gate_up", st);
    launch_moe_down_decode(cs->d_act, cs->d_sel, cs->d_w, &y, &d, cs->d_x, st);
    cuda_prof_mark("dec moe down", st);
    if (lr) {
      // each slot's delta, then weighted into the residual in slot order (no atomics: the same sums every run)
      lora_run(ls, l, 1, &mod_dn, &off0, d.K, cs->l_slots, cs->d_act, NULL, NULL, 1, cs->l_delta, d.H, LORA_SET_ROW, d.H);
      launch_moe_combine(cs->d_x, cs->l_delta, cs->d_w, 1, d.H, d.K, st);
      cuda_prof_mark("dec lora", st);
    }
    return GPTOSS_OK;
  }
};

// the kernels of one decode step, in order (captured into the graph); lr:
// the rank of the session's adapter, 0 for none
static gptoss_status decode_launches(gptoss_model *m, cuda_session *cs, const gpu_sampling *host_params, int lr) {
  cuda_model *cm = model_of(m);
  const dims &d = cm->d;
  cudaStream_t st = cm->stream;
  cuda_prof_mark("start", st);
  decode_prologue_kernel<<<1, 1, 0, st>>>(cs->step, cs->hist);
  launch_embed(cs->step, 1, cm->embed, cs->d_x, d.H, st);
  cuda_prof_mark("dec embed", st);
  decode_layer ops(cm);
  ops.cs = cs; ops.sliding = m->cfg.layer_sliding; ops.lr = lr;
  ops.ls = {cs->l_tok, cs->d_sel, d.K, cs->l_u, lr, st};
  {
    // each kernel starts while the one before finishes (common.cuh); the
    // sampler's kernels after are launched plainly
    pdl_scope pdl(cm->pdl != 0);
    for (int l = 0; l < d.L; l++) TRY(layer_sequence(ops, l));
    launch_gemv_bf16(cs->d_x, cm->norm, d.eps, cm->lm_head, NULL, cs->logits, d.V, d.H, NULL, st);
  }
  cuda_prof_mark("dec lm_head", st);
  launch_sample(cs->logits, 1, d.V, cs->params, host_params, cs->hist_ptr, cs->hist_len, &cm->sw, cs->next, st, cm->sw.keys_in);
  cuda_prof_mark("dec sample", st);
  cudaMemcpyAsync(cs->next_host, cs->next, sizeof(int32_t), cudaMemcpyDeviceToHost, st);
  return GPTOSS_OK;
}

gptoss_status cuda_decode(gptoss_session *s, int32_t id, gptoss_sampler *smp, int32_t *next) {
  gptoss_model *m = s->m;
  cuda_model *cm = model_of(m);
  cuda_session *cs = session_of(s);
  TRY(cuda_device_usable(cm->dev));
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
  if (p->n_bias > SAMPLE_BIAS_CAP) return gptoss_fail(GPTOSS_EUNSUP, "more than %d logit biases on CUDA", SAMPLE_BIAS_CAP);
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
  if (cuda_prof_on()) {
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
    // A driver or chip that cannot capture programmatic launches (seen on
    // sm_120 elsewhere) gets the plain launches: once a capture with PDL
    // fails, the model drops PDL and captures again.
    for (;;) {
      cudaGraph_t g;
      const char *stage = "capturing the decode step";
      CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed));
      rc = decode_launches(m, cs, cs->params_host, lr);
      cudaError_t e = cudaStreamEndCapture(st, &g);
      if (!rc && e == cudaSuccess) {
        stage = "instantiating the decode graph";
        e = cudaGraphInstantiate(&cs->graph, g, 0);
        cudaGraphDestroy(g);
        if (e == cudaSuccess) break;
        cs->graph = NULL;
      } else if (e == cudaSuccess) {
        cudaGraphDestroy(g);
      }
      if (cm->pdl) { cudaGetLastError(); cm->pdl = 0; continue; }
      if (rc) return rc;
      return cuda_fail(e, stage, __FILE__, __LINE__);
    }
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
