// kernels_test.cu: each CUDA kernel against a double-precision CPU
// computation of the same formula, on fresh random inputs. Prints one line
// per kernel with the relative L2 error; exits non-zero if any is over its
// bound (bf16 operands: 1e-2; fp32 paths: 1e-4).
//
//   make kernels-test && build/cuda/kernels_test
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include "../common.cuh"

static uint64_t rng = 88172645463325252ull;
static double urand() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (rng >> 11) * (1.0 / 9007199254740992.0); }
static double nrand() { double u = urand() + 1e-12, v = urand(); return sqrt(-2 * log(u)) * cos(6.283185307179586 * v); }
static float hf(float x) { return __half2float(__float2half(x)); }
static const float FP4H[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); exit(2); } } while (0)

template <typename T> static T *dev(const std::vector<T> &h) {
  T *p;
  CK(cudaMalloc(&p, sizeof(T) * (h.size() ? h.size() : 1)));
  if (h.size()) CK(cudaMemcpy(p, h.data(), sizeof(T) * h.size(), cudaMemcpyHostToDevice));
  return p;
}
template <typename T> static std::vector<T> host(const T *p, size_t n) {
  std::vector<T> h(n);
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(h.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost));
  return h;
}

static int failures;
static void report(const char *what, const std::vector<float> &got, const std::vector<double> &want, double bound) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); i++) { double d = got[i] - want[i]; num += d * d; den += want[i] * want[i]; }
  double e = sqrt(num / (den > 0 ? den : 1));
  bool ok = e <= bound && e == e;
  printf("%-44s rel L2 %.3e (bound %.0e) %s\n", what, e, bound, ok ? "ok" : "FAIL");
  if (!ok) failures++;
}

static std::vector<bf16> rand_bf16(size_t n, double std) {
  std::vector<bf16> v(n);
  for (auto &x : v) x = __float2bfloat16((float)(nrand() * std));
  return v;
}
static std::vector<float> to_f(const std::vector<bf16> &v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); i++) o[i] = __bfloat162float(v[i]);
  return o;
}

// x as bf16 and what bf16 rounded off (split bf16, the "exact" inputs)
static void split_bf16(const std::vector<float> &x, std::vector<bf16> &hi, std::vector<bf16> &lo) {
  hi.resize(x.size());
  lo.resize(x.size());
  for (size_t i = 0; i < x.size(); i++) {
    hi[i] = __float2bfloat16(x[i]);
    lo[i] = __float2bfloat16(x[i] - __bfloat162float(hi[i]));
  }
}

// an MXFP4 weight [E][N][K] (blocks, scales) and its dequantised values
struct fp4w { std::vector<uint8_t> blocks, scales; std::vector<float> val; };
static fp4w rand_fp4(int E, int N, int K, int scale_exp) {
  fp4w w;
  int G = K / 32;
  w.blocks.resize((size_t)E * N * G * 16);
  w.scales.resize((size_t)E * N * G);
  w.val.resize((size_t)E * N * K);
  for (auto &b : w.blocks) b = (uint8_t)(urand() * 256);
  for (auto &s : w.scales) s = (uint8_t)(scale_exp + (int)(urand() * 3) - 1);
  for (size_t r = 0; r < (size_t)E * N; r++)
    for (int g = 0; g < G; g++) {
      float sc = ldexpf(1.f, (int)w.scales[r * G + g] - 127);
      for (int j = 0; j < 16; j++) {
        uint8_t b = w.blocks[(r * G + g) * 16 + j];
        w.val[r * K + g * 32 + 2 * j] = FP4H[b & 15] * sc;
        w.val[r * K + g * 32 + 2 * j + 1] = FP4H[b >> 4] * sc;
      }
    }
  return w;
}

static double swiglu_ref(double g, double u, double lim) {
  g = g < lim ? g : lim;
  u = u < -lim ? -lim : (u > lim ? lim : u);
  return (u + 1) * (g / (1 + exp(-1.702 * g)));
}

// the MoE block for T tokens: grouped GEMMs (prefill, plain and split
// bf16) and GEMVs (decode), against fp32 inputs
static void test_moe(int T, int H, int I, int E, int K) {
  dims d = {};
  d.H = H; d.I = I; d.E = E; d.K = K; d.limit = 7.f;
  fp4w gu = rand_fp4(E, 2 * I, H, 127 + (int)lround(log2(2.0 / (2.93 * sqrt((double)H)))));
  fp4w dn = rand_fp4(E, H, I, 127 + (int)lround(log2(2.0 / (2.93 * sqrt((double)I)))));
  std::vector<bf16> gub = rand_bf16((size_t)E * 2 * I, 0.02), dnb = rand_bf16((size_t)E * H, 0.02);
  std::vector<float> xnf((size_t)T * H);
  for (auto &v : xnf) v = (float)nrand();
  std::vector<bf16> xn, xn_lo;
  split_bf16(xnf, xn, xn_lo);
  std::vector<int32_t> sel((size_t)T * K);
  std::vector<float> w((size_t)T * K);
  for (int t = 0; t < T; t++) {
    std::vector<int> pool(E);
    for (int e = 0; e < E; e++) pool[e] = e;
    double s = 0;
    for (int k = 0; k < K; k++) {
      int j = k + (int)(urand() * (E - k));
      std::swap(pool[k], pool[j]);
      sel[t * K + k] = pool[k];
      w[t * K + k] = (float)(urand() + 0.1);
      s += w[t * K + k];
    }
    for (int k = 0; k < K; k++) w[t * K + k] /= (float)s;
  }
  // reference: x[t] = sum_k w (W2 swiglu(W1 xn + b1) + b2), from the bf16 input
  std::vector<double> want((size_t)T * H, 0.0);
  std::vector<float> gubf = to_f(gub), dnbf = to_f(dnb);
  for (int t = 0; t < T; t++)
    for (int k = 0; k < K; k++) {
      int e = sel[t * K + k];
      std::vector<double> act(I);
      for (int j = 0; j < I; j++) {
        double g = gubf[(size_t)e * 2 * I + 2 * j], u = gubf[(size_t)e * 2 * I + 2 * j + 1];
        const float *rg = &gu.val[((size_t)e * 2 * I + 2 * j) * H], *ru = rg + H;
        for (int c = 0; c < H; c++) { g += (double)rg[c] * xnf[(size_t)t * H + c]; u += (double)ru[c] * xnf[(size_t)t * H + c]; }
        act[j] = swiglu_ref(g, u, 7.0);
      }
      for (int r = 0; r < H; r++) {
        double v = dnbf[(size_t)e * H + r];
        const float *rw = &dn.val[((size_t)e * H + r) * I];
        for (int j = 0; j < I; j++) v += (double)rw[j] * act[j];
        want[(size_t)t * H + r] += w[t * K + k] * v;
      }
    }
  dlayer l = {};
  l.gu_blocks = dev(gu.blocks); l.gu_scales = dev(gu.scales); l.gu_bias = dev(gub);
  l.dn_blocks = dev(dn.blocks); l.dn_scales = dev(dn.scales); l.dn_bias = dev(dnb);
  bf16 *dxn = dev(xn), *dxn_lo = dev(xn_lo);
  int32_t *dsel = dev(sel);
  float *dw = dev(w);
  std::vector<float> zeros((size_t)T * H, 0.f);
  float *x = dev(zeros);
  // prefill path
  moe_work mw;
  std::vector<int32_t> zi((size_t)(E + 1) * 4 + (size_t)T * K, 0);
  int32_t *mwb = dev(zi);
  mw.counts = mwb; mw.offsets = mwb + (E + 1); mw.tile_offsets = mwb + 2 * (E + 1); mw.cursor = mwb + 3 * (E + 1);
  mw.perm = mwb + 4 * (E + 1);
  std::vector<float> actz((size_t)T * K * I);
  float *act = dev(actz);
  std::vector<float> yz((size_t)T * K * H);
  float *y = dev(yz);
  char name[96];
  for (int split = 0; split < 2; split++) {
    CK(cudaMemcpy(x, zeros.data(), sizeof(float) * zeros.size(), cudaMemcpyHostToDevice));
    launch_moe_sort(dsel, T, E, K, 0, E, &mw, 0);   // every expert: no split
    launch_moe_gate_up(dxn, split ? dxn_lo : NULL, &mw, T, &l, &d, NULL, act, 0);
    launch_moe_down(act, split, &mw, T, &l, &d, y, 0);
    launch_moe_combine(x, y, dw, T, H, K, 0);
    CK(cudaGetLastError());
    snprintf(name, sizeof name, "moe grouped GEMMs %s T=%d H=%d I=%d E=%d", split ? "split" : "bf16", T, H, I, E);
    report(name, host(x, (size_t)T * H), want, split ? 1e-4 : 1e-2);
    // the small-M path on the same sorted rows (any number per expert: 8 at a time)
    CK(cudaMemcpy(x, zeros.data(), sizeof(float) * zeros.size(), cudaMemcpyHostToDevice));
    launch_moe_gate_up_small(dxn, split ? dxn_lo : NULL, &mw, &l, &d, NULL, act, 0);
    launch_moe_down_small(act, &mw, &l, &d, y, 0);
    launch_moe_combine(x, y, dw, T, H, K, 0);
    CK(cudaGetLastError());
    snprintf(name, sizeof name, "moe small-M GEMVs %s T=%d H=%d I=%d E=%d", split ? "split" : "bf16", T, H, I, E);
    report(name, host(x, (size_t)T * H), want, split ? 1e-4 : 1e-2);
    // batched decode's mma.sync path (moe_mma.cu): 32 rows an expert a pass, 8 a tile
    CK(cudaMemcpy(x, zeros.data(), sizeof(float) * zeros.size(), cudaMemcpyHostToDevice));
    launch_moe_gate_up_mma(dxn, split ? dxn_lo : NULL, &mw, &l, &d, NULL, act, 0);
    launch_moe_down_mma(act, split, &mw, &l, &d, y, 0);
    launch_moe_combine(x, y, dw, T, H, K, 0);
    CK(cudaGetLastError());
    snprintf(name, sizeof name, "moe mma.sync %s T=%d H=%d I=%d E=%d", split ? "split" : "bf16", T, H, I, E);
    report(name, host(x, (size_t)T * H), want, split ? 1e-4 : 1e-2);
    // prefill's path on Hopper: gathered rows through mxfp4_gemm.cu's kernel
    // (where this device has no wgmma, its portable kernel: the same formula)
    if (H % 32 == 0 && I % 32 == 0) {
      int mx = H > I ? H : I;
      std::vector<bf16> sz((size_t)T * K * mx);
      std::vector<float> fz((size_t)T * K * (2 * I > H ? 2 * I : H));
      bf16 *shi = dev(sz), *slo = dev(sz);
      float *f = dev(fz);
      CK(cudaMemcpy(x, zeros.data(), sizeof(float) * zeros.size(), cudaMemcpyHostToDevice));
      CK(launch_moe_gate_up_wgmma(dxn, split ? dxn_lo : NULL, &mw, T, &l, &d, NULL, shi, slo, f, act, 0));
      CK(launch_moe_down_wgmma(act, &mw, T, &l, &d, shi, split ? slo : NULL, f, y, 0));
      launch_moe_combine(x, y, dw, T, H, K, 0);
      CK(cudaGetLastError());
      snprintf(name, sizeof name, "moe wgmma GEMMs %s T=%d H=%d I=%d E=%d", split ? "split" : "bf16", T, H, I, E);
      report(name, host(x, (size_t)T * H), want, split ? 1e-4 : 1e-2);
      CK(cudaFree(shi)); CK(cudaFree(slo)); CK(cudaFree(f));
    }
  }
  // decode path, token 0 (fp32 input)
  std::vector<float> x0(H, 0.f), xn0(xnf.begin(), xnf.begin() + H);
  float *dx0 = dev(x0), *dxn0 = dev(xn0);
  std::vector<float> actd((size_t)K * I);
  float *dact = dev(actd);
  launch_moe_gate_up_decode(dxn0, dsel, &l, &d, NULL, dact, 0);
  launch_moe_down_decode(dact, dsel, dw, &l, &d, dx0, 0);
  CK(cudaGetLastError());
  snprintf(name, sizeof name, "moe decode GEMVs H=%d I=%d", H, I);
  report(name, host(dx0, H), std::vector<double>(want.begin(), want.begin() + H), 1e-4);
}

template <typename KT> static KT kv_from(float v);
template <> float kv_from<float>(float v) { return v; }
template <> __half kv_from<__half>(float v) { return __float2half(v); }
static float kv_round(float v, bool f32) { return f32 ? v : hf(v); }

// attention of T consecutive tokens (positions p0..p0+T-1) of one session,
// with a KV cache of KT (fp32 or fp16): by the split kernel (flash 0), or by
// prefill's tiles (flash_attention.cu) in bf16 (flash 1) or split bf16 (2)
template <typename KT>
static void test_attention_t(int T, int p0, int Hq, int Hkv, int D, int window, int sliding, int ring, int nsplit, bool f32,
                             int flash = 0) {
  dims d = {};
  d.kv32 = f32;
  d.Hq = Hq; d.Hkv = Hkv; d.D = D; d.Q = Hq * D; d.KV = Hkv * D; d.window = window; d.rope_scale = 1.3f;
  int P = p0 + T, slots = sliding ? ring : P;
  int half = D / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; i++) inv[i] = (float)(1.0 / pow(150000.0, 2.0 * i / D));
  // keys/values of the earlier positions already in the cache, and the chunk's q, k, v
  std::vector<KT> kc((size_t)slots * d.KV), vc((size_t)slots * d.KV);
  std::vector<std::vector<double>> K(P, std::vector<double>(d.KV)), Vv(P, std::vector<double>(d.KV));
  std::vector<float> qkv((size_t)T * (d.Q + 2 * d.KV));
  for (auto &x : qkv) x = (float)nrand();
  for (int p = 0; p < p0; p++)
    for (int i = 0; i < d.KV; i++) {
      float kv = (float)nrand(), vv = (float)nrand();
      int s = sliding ? p % ring : p;
      kc[(size_t)s * d.KV + i] = kv_from<KT>(kv);
      vc[(size_t)s * d.KV + i] = kv_from<KT>(vv);
      K[p][i] = kv_round(kv, f32);
      Vv[p][i] = kv_round(vv, f32);
    }
  std::vector<bf16> sinks = rand_bf16(Hq, 1.0);
  auto rope = [&](const float *x, int p, double *out) {
    for (int j = 0; j < half; j++) {
      float th = (float)p * inv[j];
      double c = cosf(th) * d.rope_scale, s = sinf(th) * d.rope_scale;
      out[j] = x[j] * c - x[j + half] * s;
      out[j + half] = x[j + half] * c + x[j] * s;
    }
  };
  std::vector<std::vector<double>> Q(T, std::vector<double>(d.Q));
  for (int t = 0; t < T; t++) {
    int p = p0 + t;
    const float *row = &qkv[(size_t)t * (d.Q + 2 * d.KV)];
    for (int h = 0; h < Hq; h++) rope(row + h * D, p, &Q[t][h * D]);
    std::vector<double> kr(D);
    for (int h = 0; h < Hkv; h++) {
      rope(row + d.Q + h * D, p, kr.data());
      for (int i = 0; i < D; i++) K[p][h * D + i] = kv_round((float)kr[i], f32);
    }
    for (int i = 0; i < d.KV; i++) Vv[p][i] = kv_round(row[d.Q + d.KV + i], f32);
  }
  std::vector<double> want((size_t)T * d.Q);
  int G = Hq / Hkv;
  for (int t = 0; t < T; t++) {
    int p = p0 + t, start = sliding && p - window + 1 > 0 ? p - window + 1 : 0;
    for (int h = 0; h < Hq; h++) {
      int kh = h / G;
      double sink = __bfloat162float(sinks[h]), M = sink;
      std::vector<double> s(p + 1);
      for (int j = start; j <= p; j++) {
        double v = 0;
        for (int i = 0; i < D; i++) v += Q[t][h * D + i] * K[j][kh * D + i];
        s[j] = v / sqrt((double)D);
        M = fmax(M, s[j]);
      }
      double den = exp(sink - M);
      for (int j = start; j <= p; j++) den += exp(s[j] - M);
      for (int i = 0; i < D; i++) {
        double o = 0;
        for (int j = start; j <= p; j++) o += exp(s[j] - M) * Vv[j][kh * D + i];
        want[(size_t)t * d.Q + h * D + i] = o / den;
      }
    }
  }
  dsess S = {};
  S.k[0] = dev(kc);
  S.v[0] = dev(vc);
  S.ring = ring;
  dsess *dS = dev(std::vector<dsess>{S});
  const dsess **arr = dev(std::vector<const dsess *>{dS});
  std::vector<int32_t> pos(T), sidx(T, 0);
  for (int t = 0; t < T; t++) pos[t] = p0 + t;
  attn_args a = {};
  a.qkv = dev(qkv);
  std::vector<float> qz((size_t)T * d.Q);
  a.q = dev(qz);
  a.tok_pos = dev(pos);
  a.tok_sess = dev(sidx);
  a.sess = arr;
  a.T = T; a.layer = 0; a.sliding = sliding;
  a.inv_freq = dev(inv);
  float *out = dev(qz);
  std::vector<float> pz((size_t)T * Hq * (nsplit < 0 ? -nsplit : nsplit) * (D + 2));
  float *ml = dev(pz), *acc = dev(pz);
  int span = sliding ? window : P;
  int split_len = (span + nsplit - 1) / nsplit;
  bool dynamic = nsplit < 0;                       // decode's split sizing, from the position
  if (dynamic) { nsplit = -nsplit; split_len = 0; }
  launch_rope_store(&a, &d, 0);
  char name[128];
  if (flash) {
    flash_prefill_args f = {};
    f.q = a.q; f.sess = arr; f.sinks = dev(sinks); f.sess_index = 0; f.p0 = p0; f.n = T; f.layer = 0;
    f.window = sliding ? window : 0;
    f.Q = d.Q; f.KV = d.KV; f.Hq = Hq; f.Hkv = Hkv; f.D = D; f.kv32 = f32; f.split = flash == 2;
    f.scale = 1.f / sqrtf((float)D); f.att = out;
    CK(launch_flash_prefill(&f, 0));
    snprintf(name, sizeof name, "prefill tiles %s %s T=%d p0=%d D=%d G=%d %s", flash == 2 ? "split" : "bf16",
             f32 ? "f32" : "f16", T, p0, D, G, sliding ? "sliding" : "full");
    // split bf16 keeps about 16 bits of each operand; bf16 8
    report(name, host(out, (size_t)T * d.Q), want, flash == 2 ? 1e-4 : 2e-2);
    return;
  }
  launch_attention(&a, &d, dev(sinks), nsplit, split_len, ml, acc, out, 0);
  CK(cudaGetLastError());
  snprintf(name, sizeof name, "attention %s T=%d p0=%d D=%d G=%d %s split %d%s", f32 ? "f32" : "f16", T, p0, D, G,
           sliding ? "sliding" : "full", nsplit, dynamic ? " dyn" : "");
  report(name, host(out, (size_t)T * d.Q), want, 2e-2);
}

// prefill's tiles in the four ways the backend runs them (KV fp32 or fp16, operands split or not)
static void test_prefill(int T, int p0, int Hq, int Hkv, int D, int window, int sliding, int ring) {
  for (int flash = 1; flash <= 2; flash++) {
    test_attention_t<float>(T, p0, Hq, Hkv, D, window, sliding, ring, 1, true, flash);
    test_attention_t<__half>(T, p0, Hq, Hkv, D, window, sliding, ring, 1, false, flash);
  }
}

static void test_attention(int T, int p0, int Hq, int Hkv, int D, int window, int sliding, int ring, int nsplit) {
  test_attention_t<float>(T, p0, Hq, Hkv, D, window, sliding, ring, nsplit, true);
  test_attention_t<__half>(T, p0, Hq, Hkv, D, window, sliding, ring, nsplit, false);
}

// the few-token dense product (dense_mma.cu): Y = X W^T from fp32 inputs
// split into bf16 hi + lo (or hi alone), over part_floats of slice buffer
static void test_dense_mma(int out, int in, int T, size_t part_floats) {
  std::vector<bf16> W = rand_bf16((size_t)out * in, 1.0 / sqrt(in));
  std::vector<float> xf((size_t)T * in);
  for (auto &v : xf) v = (float)nrand();
  std::vector<bf16> hi, lo;
  split_bf16(xf, hi, lo);
  std::vector<double> want((size_t)T * out);
  for (int t = 0; t < T; t++)
    for (int r = 0; r < out; r++) {
      double a = 0;
      for (int c = 0; c < in; c++) a += (double)__bfloat162float(W[(size_t)r * in + c]) * xf[(size_t)t * in + c];
      want[(size_t)t * out + r] = a;
    }
  bf16 *dW = dev(W), *dhi = dev(hi), *dlo = dev(lo);
  std::vector<float> yz((size_t)T * out, -1.f), pz(part_floats ? part_floats : 1);
  float *y = dev(yz), *part = dev(pz);
  char name[96];
  for (int split = 0; split < 2; split++) {
    CK(launch_dense_mma(dW, dhi, split ? dlo : NULL, y, out, T, in, part, part_floats, 0));
    snprintf(name, sizeof name, "dense mma.sync %s out=%d in=%d T=%d slices<=%zu", split ? "split" : "bf16", out, in, T,
             part_floats / ((size_t)T * out));
    report(name, host(y, (size_t)T * out), want, split ? 1e-4 : 1e-2);
  }
  CK(cudaFree(dW)); CK(cudaFree(dhi)); CK(cudaFree(dlo)); CK(cudaFree(y)); CK(cudaFree(part));
}

// decode GEMV with the fused RMSNorm, and the router
static void test_gemv(int rows, int cols) {
  std::vector<float> x(cols);
  for (auto &v : x) v = (float)nrand() * 3;
  std::vector<bf16> nw = rand_bf16(cols, 0.05), W = rand_bf16((size_t)rows * cols, 1.0 / sqrt(cols)), b = rand_bf16(rows, 0.02);
  for (auto &v : nw) v = __float2bfloat16(1.f + __bfloat162float(v));
  double ss = 0;
  for (float v : x) ss += (double)v * v;
  double inv = 1 / sqrt(ss / cols + 1e-5);
  std::vector<double> want(rows);
  for (int r = 0; r < rows; r++) {
    double a = __bfloat162float(b[r]);
    for (int c = 0; c < cols; c++) a += (double)__bfloat162float(W[(size_t)r * cols + c]) * __bfloat162float(nw[c]) * x[c] * inv;
    want[r] = a;
  }
  std::vector<float> oz(rows);
  float *out = dev(oz);
  launch_gemv_bf16(dev(x), dev(nw), 1e-5f, dev(W), dev(b), out, rows, cols, NULL, 0);
  CK(cudaGetLastError());
  char name[64];
  snprintf(name, sizeof name, "gemv bf16 + rmsnorm %dx%d", rows, cols);
  report(name, host(out, rows), want, 1e-4);
}

// RMSNorm + router + top-k + softmax (fp32 throughout)
static void test_router(int T, int H, int E, int K) {
  std::vector<float> x((size_t)T * H);
  for (auto &v : x) v = (float)nrand() * 2;
  std::vector<bf16> nw = rand_bf16(H, 0.05), W = rand_bf16((size_t)E * H, 1.0 / sqrt(H)), b = rand_bf16(E, 0.1);
  for (auto &v : nw) v = __float2bfloat16(1.f + __bfloat162float(v));
  std::vector<double> want((size_t)T * K);
  std::vector<int> want_sel((size_t)T * K);
  for (int t = 0; t < T; t++) {
    const float *xr = &x[(size_t)t * H];
    double ss = 0;
    for (int c = 0; c < H; c++) ss += (double)xr[c] * xr[c];
    double inv = 1 / sqrt(ss / H + 1e-5);
    std::vector<double> lg(E);
    for (int e = 0; e < E; e++) {
      double a = __bfloat162float(b[e]);
      for (int c = 0; c < H; c++) a += (double)__bfloat162float(W[(size_t)e * H + c]) * __bfloat162float(nw[c]) * xr[c] * inv;
      lg[e] = a;
    }
    std::vector<int> taken(E, 0);
    double mx = 0, sum = 0;
    for (int k = 0; k < K; k++) {
      int best = -1;
      for (int e = 0; e < E; e++) if (!taken[e] && (best < 0 || lg[e] > lg[best])) best = e;
      taken[best] = 1;
      want_sel[(size_t)t * K + k] = best;
      if (k == 0) mx = lg[best];
      want[(size_t)t * K + k] = exp(lg[best] - mx);
      sum += want[(size_t)t * K + k];
    }
    for (int k = 0; k < K; k++) want[(size_t)t * K + k] /= sum;
  }
  std::vector<int32_t> sz((size_t)T * K);
  std::vector<float> wz((size_t)T * K);
  int32_t *sel = dev(sz);
  float *w = dev(wz);
  launch_router(dev(x), T, dev(nw), 1e-5f, dev(W), dev(b), H, E, K, NULL, NULL, NULL, sel, w, 0);
  CK(cudaGetLastError());
  std::vector<int32_t> got_sel = host(sel, (size_t)T * K);
  int wrong = 0;
  for (size_t i = 0; i < got_sel.size(); i++) wrong += got_sel[i] != want_sel[i];
  char name[96];
  snprintf(name, sizeof name, "router T=%d H=%d E=%d K=%d (%d choices differ)", T, H, E, K, wrong);
  report(name, host(w, (size_t)T * K), want, 1e-4);
  if (wrong) { printf("  router choices differ\n"); failures++; }
}

// training's grouped expert products (mxfp4_gemm.cu): each expert's rows
// times its MXFP4 matrix, plain (+ bias) or transposed, bf16 or split-bf16
// rows; `counts` rows per expert (zeros and partial tiles included); block
// scales 2^(scale_exp - 127) give or take one
static void test_mxfp4_gemm(const std::vector<int> &counts, int wrows, int wcols, bool trans, bool split, int scale_exp = 127 - 4) {
  int E = (int)counts.size(), N = trans ? wcols : wrows, K = trans ? wrows : wcols;
  fp4w w = rand_fp4(E, wrows, wcols, scale_exp);
  std::vector<bf16> bias = rand_bf16((size_t)E * wrows, 0.5);
  std::vector<int32_t> off(E + 1, 0);
  for (int e = 0; e < E; e++) off[e + 1] = off[e] + counts[e];
  int M = off[E];
  std::vector<float> xf((size_t)M * K);
  for (auto &v : xf) v = (float)nrand();
  std::vector<bf16> hi, lo;
  split_bf16(xf, hi, lo);
  std::vector<double> want((size_t)M * N);
  for (int e = 0; e < E; e++)
    for (int r = off[e]; r < off[e + 1]; r++)
      for (int n = 0; n < N; n++) {
        double v = trans ? 0 : __bfloat162float(bias[(size_t)e * wrows + n]);
        for (int k = 0; k < K; k++) {
          double x = (double)__bfloat162float(hi[(size_t)r * K + k]) + (split ? __bfloat162float(lo[(size_t)r * K + k]) : 0.0);
          v += x * w.val[(size_t)e * wrows * wcols + (trans ? (size_t)k * wcols + n : (size_t)n * wcols + k)];
        }
        want[(size_t)r * N + n] = v;
      }
  moe_work mw = {};
  mw.offsets = dev(off);
  float *y = dev(std::vector<float>((size_t)(M ? M : 1) * N, 0.f));
  cudaError_t err = launch_mxfp4_gemm(dev(hi), split ? dev(lo) : NULL, &mw, M, E, dev(w.blocks), dev(w.scales), wrows, wcols, trans,
                                      trans ? NULL : dev(bias), y, N, 0);
  CK(err);
  char what[96];
  snprintf(what, sizeof what, "mxfp4_gemm %s%s E%d M%d %dx%d", trans ? "X W" : "X W^T+b", split ? " split" : "", E, M, wrows, wcols);
  report(what, host(y, (size_t)M * N), want, 1e-5);
}

// training's attention (flash_attention.cu), forward and backward, against
// double-precision attention of the fp32 inputs: causal, sinks, a window
// when window > 0; bf16 operands (bound 2e-2) or split bf16 (1e-4). The
// backward takes the reference's output and lse, as training's recompute
// hands it the forward's.
static void test_flash(int T, int Hq, int Hkv, int D, int window, bool split) {
  int Q = Hq * D, KV = Hkv * D, ldq = Q + 2 * KV, G = Hq / Hkv;
  double scale = 1.0 / sqrt((double)D);
  std::vector<float> qkv((size_t)T * ldq), dout((size_t)T * Q);
  for (auto &v : qkv) v = (float)(1.5 * nrand());
  for (auto &v : dout) v = (float)nrand();
  std::vector<bf16> sinks = rand_bf16(Hq, 1.0);
  std::vector<double> O((size_t)T * Q, 0), lse((size_t)T * Hq), dq((size_t)T * Q, 0), dk((size_t)T * KV, 0), dv((size_t)T * KV, 0);
  std::vector<double> p(T);
  for (int h = 0; h < Hq; h++) {
    int g = h / G;
    const float *qc = &qkv[(size_t)h * D], *kc = &qkv[(size_t)Q + g * D], *vc = &qkv[(size_t)Q + KV + g * D];
    for (int t = 0; t < T; t++) {
      int j0 = window && t - window + 1 > 0 ? t - window + 1 : 0;
      double sink = __bfloat162float(sinks[h]), m = sink;
      for (int j = j0; j <= t; j++) {
        double s = 0;
        for (int d = 0; d < D; d++) s += (double)qc[(size_t)t * ldq + d] * kc[(size_t)j * ldq + d];
        p[j] = s * scale;
        if (p[j] > m) m = p[j];
      }
      double L = exp(sink - m);
      for (int j = j0; j <= t; j++) L += (p[j] = exp(p[j] - m));
      lse[(size_t)t * Hq + h] = m + log(L);
      double *o = &O[(size_t)t * Q + h * D], dd = 0;
      for (int j = j0; j <= t; j++) {
        p[j] /= L;
        for (int d = 0; d < D; d++) o[d] += p[j] * vc[(size_t)j * ldq + d];
      }
      const float *go = &dout[(size_t)t * Q + h * D];
      for (int d = 0; d < D; d++) dd += o[d] * go[d];
      for (int j = j0; j <= t; j++) {
        double dp = 0;
        for (int d = 0; d < D; d++) dp += (double)go[d] * vc[(size_t)j * ldq + d];
        double ds = p[j] * (dp - dd) * scale;
        for (int d = 0; d < D; d++) {
          dq[(size_t)t * Q + h * D + d] += ds * kc[(size_t)j * ldq + d];
          dk[(size_t)j * KV + g * D + d] += ds * qc[(size_t)t * ldq + d];
          dv[(size_t)j * KV + g * D + d] += p[j] * go[d];
        }
      }
    }
  }
  std::vector<bf16> qh, ql, gh, gl;
  split_bf16(qkv, qh, ql);
  split_bf16(dout, gh, gl);
  std::vector<float> Of(O.begin(), O.end()), lsef(lse.begin(), lse.end());
  flash_args a = {};
  a.qkv_hi = dev(qh); a.qkv_lo = split ? dev(ql) : NULL;
  a.dout_hi = dev(gh); a.dout_lo = split ? dev(gl) : NULL;
  a.dout = dev(dout); a.sinks = dev(sinks);
  a.T = T; a.ldq = ldq; a.Q = Q; a.KV = KV; a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.window = window;
  a.scale = (float)scale;
  a.att = dev(std::vector<float>((size_t)T * Q, 0.f));
  a.lse = dev(std::vector<float>((size_t)T * Hq, 0.f));
  a.dd = dev(std::vector<float>((size_t)T * Hq, 0.f));
  a.dqkv = dev(std::vector<float>((size_t)T * ldq, NAN));
  a.dk_part = dev(std::vector<float>((size_t)T * Q, 0.f));
  a.dv_part = dev(std::vector<float>((size_t)T * Q, 0.f));
  CK(launch_flash_fwd(&a, 0));
  char what[96];
  double bound = split ? 1e-4 : 2e-2;
  const char *how = split ? "split" : "bf16";
  snprintf(what, sizeof what, "flash fwd %s T%d %d/%d D%d w%d", how, T, Hq, Hkv, D, window);
  report(what, host(a.att, (size_t)T * Q), O, bound);
  snprintf(what, sizeof what, "flash lse %s T%d %d/%d D%d w%d", how, T, Hq, Hkv, D, window);
  report(what, host(a.lse, (size_t)T * Hq), lse, bound);
  CK(cudaMemcpy(a.att, Of.data(), sizeof(float) * Of.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(a.lse, lsef.data(), sizeof(float) * lsef.size(), cudaMemcpyHostToDevice));
  CK(launch_flash_bwd(&a, 0));
  std::vector<float> got = host(a.dqkv, (size_t)T * ldq), gq((size_t)T * Q), gk((size_t)T * KV), gv((size_t)T * KV);
  for (int t = 0; t < T; t++) {
    std::copy(&got[(size_t)t * ldq], &got[(size_t)t * ldq + Q], &gq[(size_t)t * Q]);
    std::copy(&got[(size_t)t * ldq + Q], &got[(size_t)t * ldq + Q + KV], &gk[(size_t)t * KV]);
    std::copy(&got[(size_t)t * ldq + Q + KV], &got[(size_t)t * ldq + Q + 2 * KV], &gv[(size_t)t * KV]);
  }
  const char *name[3] = {"dq", "dk", "dv"};
  const std::vector<float> *gs[3] = {&gq, &gk, &gv};
  const std::vector<double> *ws[3] = {&dq, &dk, &dv};
  for (int i = 0; i < 3; i++) {
    snprintf(what, sizeof what, "flash %s %s T%d %d/%d D%d w%d", name[i], how, T, Hq, Hkv, D, window);
    report(what, *gs[i], *ws[i], bound);
  }
  for (void *q : {(void *)a.qkv_hi, (void *)a.qkv_lo, (void *)a.dout_hi, (void *)a.dout_lo, (void *)a.dout, (void *)a.sinks,
                  (void *)a.att, (void *)a.lse, (void *)a.dd, (void *)a.dqkv, (void *)a.dk_part, (void *)a.dv_part})
    if (q) CK(cudaFree(q));
}

int main() {
  test_router(1, 2880, 32, 4);
  test_router(17, 2880, 128, 4);
  test_router(5, 64, 8, 2);
  test_gemv(5120, 2880);
  test_gemv(37, 64);
  test_dense_mma(2880, 4096, 64, dense_mma_part_floats(64, 5120));   // the 20B's o_proj at 64 sessions: 8 slices
  test_dense_mma(5120, 2880, 8, dense_mma_part_floats(64, 5120));    // its qkv at 8
  test_dense_mma(1000, 136, 37, dense_mma_part_floats(37, 1000));    // rows and K no multiple of the tiles
  test_dense_mma(2880, 4096, 40, (size_t)3 * 40 * 2880);             // a buffer for 3 slices
  test_dense_mma(4000, 64, 5, 0);                                    // one slice, written straight to Y
  test_moe(1, 128, 128, 8, 4);
  test_moe(37, 128, 128, 8, 4);
  test_moe(150, 512, 512, 16, 4);
  test_moe(300, 64, 64, 8, 4);
  test_moe(8, 2880, 2880, 32, 4);
  test_moe(64, 2880, 2880, 32, 4);      // 64 sessions of the 20B shape: some experts get more than 8 rows
  test_moe(20, 128, 160, 4, 2);         // gate_up rows no multiple of a block's 128, down K no multiple of 128
  test_attention(1, 40, 64, 8, 64, 128, 0, 0, 1);
  test_attention(1, 900, 64, 8, 64, 128, 0, 0, 4);
  test_attention(1, 300, 64, 8, 64, 128, 1, 640, 1);
  test_attention(50, 0, 8, 2, 64, 16, 0, 0, 1);
  test_attention(50, 0, 8, 2, 64, 16, 1, 528, 1);
  test_attention(83, 0, 4, 2, 16, 16, 0, 0, 1);
  test_attention(83, 0, 4, 2, 16, 16, 1, 528, 1);
  test_attention(20, 100, 16, 4, 64, 32, 1, 64, 1);
  test_attention(1, 900, 64, 8, 64, 128, 0, 0, -64);
  test_attention(1, 3, 64, 8, 64, 128, 0, 0, -64);
  test_attention(1, 4000, 64, 8, 64, 128, 0, 0, -64);
  test_attention(1, 300, 64, 8, 64, 128, 1, 640, -4);
  test_attention(20, 0, 4, 2, 6, 16, 0, 0, 1);     // D % 4 != 0: scalar tile loads
  test_attention(1, 50, 4, 2, 6, 16, 1, 64, -4);
  test_prefill(512, 0, 64, 8, 64, 128, 0, 0);      // the 20B's first chunk, a full layer
  test_prefill(256, 512, 64, 8, 64, 128, 1, 640);  // a later chunk on a sliding layer's ring
  test_prefill(200, 700, 64, 8, 64, 128, 0, 0);    // after a prefix, partial tiles
  test_prefill(83, 0, 4, 2, 16, 16, 1, 528);       // the tiny checkpoint's shape
  test_prefill(83, 5, 4, 2, 16, 16, 0, 0);
  test_prefill(20, 100, 16, 4, 64, 32, 1, 64);     // a ring no larger than the window and the run need
  test_prefill(17, 3, 8, 1, 32, 40, 1, 64);        // eight heads a group, a window no multiple of the tiles
  for (int tr = 0; tr < 2; tr++)
    for (int sp = 0; sp < 2; sp++) {
      test_mxfp4_gemm({0, 1, 64, 130, 0, 7}, 416, 320, tr, sp);   // N and K tails against the 192 x 64 steps
      test_mxfp4_gemm({37, 200}, 128, 64, tr, sp);                   // the tiny checkpoint's gate_up
      test_mxfp4_gemm({3, 250, 70}, 576, 384, tr, sp);
    }
  test_mxfp4_gemm({5, 40}, 64, 96, false, false, 129);               // scales past 2^1: the decode's two factors
  test_mxfp4_gemm({300, 0, 129}, 5760, 2880, false, true);            // the 20B gate_up
  test_mxfp4_gemm({129, 64}, 5760, 2880, true, false);
  for (int sp = 0; sp < 2; sp++) {
    test_flash(300, 8, 2, 64, 0, sp);       // partial tiles of queries and keys
    test_flash(300, 8, 2, 64, 128, sp);     // the 20B's window
    test_flash(1024, 8, 1, 64, 0, sp);      // eight heads on one key/value head
    test_flash(83, 4, 2, 16, 16, sp);       // the tiny checkpoint's shape
    test_flash(130, 4, 1, 32, 40, sp);      // a window that is no multiple of the tiles
    test_flash(5, 4, 2, 64, 0, sp);
  }
  printf("%s\n", failures ? "kernels_test: FAILED" : "kernels_test: all ok");
  return failures ? 1 : 0;
}
