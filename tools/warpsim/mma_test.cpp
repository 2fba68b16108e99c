// mma_test.cpp: moe_mma.cu's and dense_mma.cu's launchers, run through
// warp.cpp, against double-precision sums of the same operands; every
// buffer is exactly its size (AddressSanitizer catches a byte past it) and
// outputs start as NaN (an element no lane writes shows). Cases cover the
// tails: experts of 0 to 70 rows, K blocks and weight rows no multiple of
// the tiles, scales above 2^1 (the decode's second factor), K slices down
// to a short last one. `mma_test 1` runs the experts' cases, `2` the dense.
#include "shim.h"
#include <random>
static std::mt19937_64 rng(12345);
static double urand() { return std::uniform_real_distribution<double>(0, 1)(rng); }
static double nrand() { return std::normal_distribution<double>(0, 1)(rng); }
static const float FP4H[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};
static int failures;

// exact-size buffer (ASan sees any byte past it), 16-byte aligned start
template <typename T> static T *buf(size_t n) {
  void *p = nullptr;
  if (posix_memalign(&p, 16, n ? n * sizeof(T) : 1)) abort();
  return (T *)p;
}
template <typename T> static T *copy(const std::vector<T> &v) { T *p = buf<T>(v.size()); memcpy(p, v.data(), v.size() * sizeof(T)); return p; }

static double swiglu_ref(double g, double u, double lim) {
  g = g < lim ? g : lim;
  u = u < -lim ? -lim : (u > lim ? lim : u);
  return (u + 1) * (g / (1 + exp(-1.702 * g)));
}

static void check(const char *what, const float *got, const std::vector<double> &want, double tol) {
  double maxe = 0, scale = 0; size_t bad = 0, worst = 0, nans = 0;
  for (double w : want) scale = std::max(scale, fabs(w));
  for (size_t i = 0; i < want.size(); i++) {
    if (got[i] != got[i]) { nans++; if (!bad++) worst = i; continue; }
    double e = fabs(got[i] - want[i]) / (scale > 0 ? scale : 1);
    if (e > maxe) { maxe = e; worst = i; }
    if (e > tol) bad++;
  }
  printf("%-60s max rel %.2e  bad %zu nan %zu / %zu %s\n", what, maxe, bad, nans, want.size(), bad ? "FAIL" : "ok");
  if (bad) { printf("   first/worst at %zu: got %g want %g\n", worst, got[worst], want[worst]); failures++; }
}

// ---------------------------------------------------------------- moe
static void test_moe(const char *tag, int H, int I, int K, const std::vector<int> &counts, bool split, bool with_delta, int scale_lo = 120, int scale_hi = 131) {
  int E = (int)counts.size(), n = 0;
  for (int c : counts) n += c;
  if (n % K) { printf("bad test: rows %% K\n"); exit(1); }
  int T = n / K;
  // assignments given experts in the counts, shuffled
  std::vector<int> sel;
  for (int e = 0; e < E; e++) for (int i = 0; i < counts[e]; i++) sel.push_back(e);
  std::shuffle(sel.begin(), sel.end(), rng);
  std::vector<int32_t> offsets(E + 1, 0), perm(n);
  for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int> cur(offsets.begin(), offsets.end() - 1);
  for (int a = 0; a < n; a++) perm[cur[sel[a]]++] = a;
  auto fp4 = [&](int rows, int Kd, std::vector<uint8_t> &blk, std::vector<uint8_t> &sc, std::vector<float> &val) {
    int G = Kd / 32;
    blk.resize((size_t)E * rows * G * 16); sc.resize((size_t)E * rows * G); val.resize((size_t)E * rows * Kd);
    for (auto &b : blk) b = (uint8_t)(urand() * 256);
    for (auto &s : sc) s = (uint8_t)(scale_lo + (int)(urand() * (scale_hi - scale_lo + 1)));
    for (size_t r = 0; r < (size_t)E * rows; r++)
      for (int g = 0; g < G; g++) {
        float f = ldexpf(1.f, (int)sc[r * G + g] - 127);
        for (int j = 0; j < 16; j++) {
          uint8_t b = blk[(r * G + g) * 16 + j];
          val[r * Kd + g * 32 + 2 * j] = FP4H[b & 15] * f;
          val[r * Kd + g * 32 + 2 * j + 1] = FP4H[b >> 4] * f;
        }
      }
  };
  std::vector<uint8_t> gub, gus, dnb, dns; std::vector<float> guv, dnv;
  fp4(2 * I, H, gub, gus, guv);
  fp4(H, I, dnb, dns, dnv);
  // scale the values so activations stay moderate: sums of H terms
  std::vector<bf16> gubias((size_t)E * 2 * I), dnbias((size_t)E * H);
  for (auto &b : gubias) b = f2bf((float)(nrand() * 0.5));
  for (auto &b : dnbias) b = f2bf((float)(nrand() * 0.5));
  std::vector<float> xf((size_t)T * H);
  for (auto &v : xf) v = (float)(nrand() / sqrt((double)H) * 8);
  std::vector<bf16> xh(xf.size()), xl(xf.size());
  for (size_t i = 0; i < xf.size(); i++) { xh[i] = f2bf(xf[i]); xl[i] = f2bf(xf[i] - __bfloat162float(xh[i])); }
  std::vector<float> delta((size_t)n * 2 * I);
  for (auto &v : delta) v = (float)(nrand() * 0.3);
  // device-like buffers
  int32_t *dperm = copy(perm), *doff = copy(offsets);
  moe_work w = {}; w.perm = dperm; w.offsets = doff;
  dlayer l = {};
  l.gu_blocks = copy(gub); l.gu_scales = copy(gus); l.gu_bias = copy(gubias);
  l.dn_blocks = copy(dnb); l.dn_scales = copy(dns); l.dn_bias = copy(dnbias);
  dims d = {}; d.H = H; d.I = I; d.E = E; d.K = K; d.limit = 7.f;
  bf16 *dxh = copy(xh), *dxl = copy(xl);
  float *ddelta = with_delta ? copy(delta) : nullptr;
  float *act = buf<float>((size_t)n * I), *y = buf<float>((size_t)n * H);
  for (size_t i = 0; i < (size_t)n * I; i++) act[i] = NAN;
  for (size_t i = 0; i < (size_t)n * H; i++) y[i] = NAN;
  launch_moe_gate_up_mma(dxh, split ? dxl : nullptr, &w, &l, &d, ddelta, act, nullptr);
  // reference act, rows in expert order
  std::vector<double> want_act((size_t)n * I);
  for (int e = 0; e < E; e++)
    for (int r = offsets[e]; r < offsets[e + 1]; r++) {
      int tok = perm[r] / K;
      for (int j = 0; j < I; j++) {
        double g = __bfloat162float(gubias[(size_t)e * 2 * I + 2 * j]), u = __bfloat162float(gubias[(size_t)e * 2 * I + 2 * j + 1]);
        const float *rg = &guv[((size_t)e * 2 * I + 2 * j) * H], *ru = rg + H;
        for (int c = 0; c < H; c++) {
          double x = __bfloat162float(xh[(size_t)tok * H + c]) + (split ? __bfloat162float(xl[(size_t)tok * H + c]) : 0.0);
          g += (double)rg[c] * x; u += (double)ru[c] * x;
        }
        if (with_delta) { g += delta[(size_t)r * 2 * I + 2 * j]; u += delta[(size_t)r * 2 * I + 2 * j + 1]; }
        want_act[(size_t)r * I + j] = swiglu_ref(g, u, 7.0);
      }
    }
  char name[160];
  snprintf(name, sizeof name, "moe gate_up %s %s%s H=%d I=%d", tag, split ? "split" : "bf16", with_delta ? "+delta" : "", H, I);
  check(name, act, want_act, 2e-5);
  // down from the kernel's act (where finite)
  for (size_t i = 0; i < (size_t)n * I; i++) if (act[i] != act[i]) act[i] = 0;
  launch_moe_down_mma(act, split, &w, &l, &d, y, nullptr);
  std::vector<double> want_y((size_t)n * H);
  for (int e = 0; e < E; e++)
    for (int r = offsets[e]; r < offsets[e + 1]; r++)
      for (int o = 0; o < H; o++) {
        double v = __bfloat162float(dnbias[(size_t)e * H + o]);
        const float *rw = &dnv[((size_t)e * H + o) * I];
        for (int j = 0; j < I; j++) {
          float a = act[(size_t)r * I + j];
          double x = split ? (double)a : (double)__bfloat162float(f2bf(a));
          v += (double)rw[j] * x;
        }
        want_y[(size_t)perm[r] * H + o] = v;
      }
  snprintf(name, sizeof name, "moe down    %s %s H=%d I=%d", tag, split ? "split" : "bf16", H, I);
  check(name, y, want_y, split ? 2e-5 : 2e-5);
  free(dperm); free(doff); free((void *)l.gu_blocks); free((void *)l.gu_scales); free((void *)l.gu_bias);
  free((void *)l.dn_blocks); free((void *)l.dn_scales); free((void *)l.dn_bias); free(dxh); free(dxl); free(ddelta); free(act); free(y);
}

// ---------------------------------------------------------------- dense
static void test_dense(int out, int in, int T, size_t part_floats, bool split) {
  std::vector<bf16> W((size_t)out * in), xh((size_t)T * in), xl((size_t)T * in);
  for (auto &v : W) v = f2bf((float)(nrand() / sqrt((double)in)));
  std::vector<float> xf((size_t)T * in);
  for (auto &v : xf) v = (float)nrand();
  for (size_t i = 0; i < xf.size(); i++) { xh[i] = f2bf(xf[i]); xl[i] = f2bf(xf[i] - __bfloat162float(xh[i])); }
  std::vector<double> want((size_t)T * out);
  for (int t = 0; t < T; t++)
    for (int r = 0; r < out; r++) {
      double a = 0;
      for (int c = 0; c < in; c++)
        a += (double)__bfloat162float(W[(size_t)r * in + c]) *
             ((double)__bfloat162float(xh[(size_t)t * in + c]) + (split ? __bfloat162float(xl[(size_t)t * in + c]) : 0.0));
      want[(size_t)t * out + r] = a;
    }
  bf16 *dW = copy(W), *dh = copy(xh), *dl = copy(xl);
  float *Y = buf<float>((size_t)T * out), *part = buf<float>(part_floats);
  for (size_t i = 0; i < (size_t)T * out; i++) Y[i] = NAN;
  for (size_t i = 0; i < part_floats; i++) part[i] = NAN;
  int rc = launch_dense_mma(dW, dh, split ? dl : nullptr, Y, out, T, in, part, part_floats, nullptr);
  char name[160];
  snprintf(name, sizeof name, "dense %s out=%d in=%d T=%d part=%zu rc=%d", split ? "split" : "bf16", out, in, T, part_floats, rc);
  check(name, Y, want, 2e-5);
  free(dW); free(dh); free(dl); free(Y); free(part);
}

int main(int argc, char **argv) {
  int which = argc > 1 ? atoi(argv[1]) : 0;
  if (which == 0 || which == 1) {
    // counts: 0 rows, 1, 7, 8, 9, 31, 32, 33, 40, 70 an expert
    std::vector<int> c1 = {0, 1, 7, 8, 9, 31, 32, 33, 40, 70, 0, 3};   // sum 234
    for (int split = 0; split < 2; split++) {
      test_moe("mixed", 96, 64, 2, c1, split, split);        // gate_up G=3 (<4), N=128; down N=96 (not 128k), G=2
      test_moe("mixed", 160, 96, 2, c1, split, !split);      // G=5, N=192; down N=160, G=3
    }
    test_moe("big-scale", 288, 160, 2, {5, 0, 12, 37}, true, false, 126, 132);   // G=9, 5; scales over 128
    test_moe("one", 64, 32, 1, {1}, false, false);
  }
  if (which == 0 || which == 2) {
    for (int split = 0; split < 2; split++) {
      test_dense(1000, 136, 37, 8 * 37 * 1000, split);
      test_dense(37, 72, 5, 8 * 5 * 37, split);
      test_dense(130, 264, 33, 0, split);
      test_dense(130, 1032, 65, 8 * 65 * 130, split);
      test_dense(64, 8, 1, 8 * 64, split);
      test_dense(200, 1000, 9, 3 * 9 * 200, split);
      test_dense(16, 4104, 3, 8 * 3 * 16, split);   // many slices, K tail of 8
    }
  }
  printf("%d failures\n", failures);
  return failures != 0;
}
