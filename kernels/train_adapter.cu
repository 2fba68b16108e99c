// train_adapter.cu: the trainer's device copy of the adapter and the
// thread that adds each layer's gradients to the host's.
//
// The host's adapter is the master copy (AdamW runs there). The device keeps
// the weights, uploaded again when gptoss_adapter_version says they changed,
// a layer at a time on a copy stream ahead of the forward; and the gradients
// of two layers, each copied down on the copy stream as soon as its layer's
// backward is done and added to the host's (gptoss_adapter_add_grads) while
// the next layers run.
#include <string.h>
#include "train.cuh"

void adapter_copy_release(trainer *t) {
  if (t->lmem) cudaFree(t->lmem);
  if (t->stage) cudaFreeHost(t->stage);
  t->lmem = NULL; t->stage = NULL; t->lbytes = 0; t->nparams = 0; t->span = 0; t->version = 0;
}

void adapter_copy_free(trainer *t) {
  adapter_copy_release(t);
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
}

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
gptoss_status layout_adapter(trainer *t, gptoss_adapter *a, int L, int *rmax) {
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
    adapter_copy_release(t);
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
gptoss_status upload_layer(trainer *t, int l) {
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
gptoss_status grads_begin(trainer *t, int l) {
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
cudaError_t adder_wait(trainer *t) {
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
gptoss_status grads_end(trainer *t, int l) {
  size_t lo = t->layer_off[l], n = t->layer_off[l + 1] - lo;
  if (!n) return GPTOSS_OK;
  CU(cudaEventRecord(t->ev_bwd[l & 1], t->v->stream));
  CU(cudaStreamWaitEvent(t->cs, t->ev_bwd[l & 1], 0));
  TRY(regroup_b(t, l, t->gbuf[l & 1], 1));
  CU(cudaMemcpyAsync(t->stage + lo, t->gbuf[l & 1], sizeof(float) * n, cudaMemcpyDeviceToHost, t->cs));
  CU(cudaEventRecord(t->ev_down[l], t->cs));
  return adder_post(t, l);
}
