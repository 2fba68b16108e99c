// warp.cpp: a warp run lane by lane on the CPU, for the mma.sync kernels
// (tools/warpsim/gen.lua makes their source ready). Each of a block's
// threads is a coroutine (ucontext) running the kernel body; a lane that
// reaches mma16816 parks there, and once all 32 lanes of the warp have
// arrived at the same call the product is rebuilt from their registers by
// the PTX ISA's fragment layouts of mma.m16n8k16 (.bf16, A row-major, B
// column-major, f32 accumulators), in double, and each lane's D updated.
// Lanes that reach different mma sites, or a warp with some lanes at an
// mma and others done, stop the run: a GPU would hang or sum garbage there.
#include "shim.h"
#include <assert.h>

void sim_check_align(const void *p, size_t a, const char *what) {
  if ((uintptr_t)p % a) { fprintf(stderr, "misaligned %s %p\n", what, p); abort(); }
}
namespace {
enum { RUNNING, AT_MMA, DONE };
struct lane_state {
  ucontext_t ctx;
  int st;
  uint32_t a[4], b[2];
  float *d;
  void *site;
  unsigned tid;
};
ucontext_t sched;
lane_state lanes[32];
int cur;
unsigned cur_warp_base;
dim3 g_grid, g_bid, g_bdim;
const std::function<void()> *g_body;
std::vector<char> stacks[32];
long mma_count;
void trampoline(int i) {
  (*g_body)();
  lanes[i].st = DONE;
  swapcontext(&lanes[i].ctx, &sched);
}
float bfbits(uint32_t r, int hi) { bf16 v{(uint16_t)(hi ? r >> 16 : r & 0xffff)}; return __bfloat162float(v); }
void do_mma(int nl) {
  // the PTX ISA's fragments of mma.m16n8k16 .bf16 (A row, B col, f32 C/D)
  double A[16][16], B[16][8];
  bool seenA[16][16] = {}, seenB[16][8] = {};
  for (int l = 0; l < 32; l++) {
    int g = l >> 2, t = l & 3;
    for (int i = 0; i < 8; i++) {   // a0..a7
      int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = bfbits(lanes[l].a[i / 2], i & 1);
      assert(!seenA[row][col]); seenA[row][col] = true;
    }
    for (int i = 0; i < 4; i++) {   // b0..b3
      int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0), col = g;
      B[row][col] = bfbits(lanes[l].b[i / 2], i & 1);
      assert(!seenB[row][col]); seenB[row][col] = true;
    }
  }
  for (int l = 0; l < 32; l++) {
    int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; i++) {   // c0..c3
      int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
      double s = 0;
      for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
      lanes[l].d[i] = (float)((double)lanes[l].d[i] + s);
    }
  }
  mma_count++;
}
}  // namespace

uint3s sim_tid() { return uint3s{lanes[cur].tid, 0, 0}; }
uint3s sim_bid() { return uint3s{g_bid.x, g_bid.y, 0}; }
dim3 sim_bdim() { return g_bdim; }
dim3 sim_gdim() { return g_grid; }

__attribute__((noinline)) void mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  lane_state &L = lanes[cur];
  memcpy(L.a, a, 16); L.b[0] = b0; L.b[1] = b1; L.d = d;
  L.site = __builtin_return_address(0);
  L.st = AT_MMA;
  swapcontext(&L.ctx, &sched);
}

void sim_run_block(dim3 grid, dim3 bid, int threads, const std::function<void()> &body) {
  g_grid = grid; g_bid = bid; g_bdim = dim3(threads); g_body = &body;
  for (int w0 = 0; w0 < threads; w0 += 32) {
    int nl = threads - w0 < 32 ? threads - w0 : 32;
    for (int i = 0; i < nl; i++) {
      if (stacks[i].empty()) stacks[i].resize(1 << 20);
      getcontext(&lanes[i].ctx);
      lanes[i].ctx.uc_stack.ss_sp = stacks[i].data();
      lanes[i].ctx.uc_stack.ss_size = stacks[i].size();
      lanes[i].ctx.uc_link = nullptr;
      lanes[i].st = RUNNING;
      lanes[i].tid = w0 + i;
      makecontext(&lanes[i].ctx, (void (*)())trampoline, 1, i);
    }
    for (;;) {
      for (int i = 0; i < nl; i++) {
        if (lanes[i].st == DONE) continue;
        lanes[i].st = RUNNING;
        cur = i;
        swapcontext(&sched, &lanes[i].ctx);
      }
      int done = 0, mma = 0;
      for (int i = 0; i < nl; i++) done += lanes[i].st == DONE, mma += lanes[i].st == AT_MMA;
      if (done == nl) break;
      if (mma != 32) { fprintf(stderr, "divergent mma.sync: %d of %d lanes at it, block (%u,%u) warp %d\n", mma, nl, bid.x, bid.y, w0 / 32); abort(); }
      for (int i = 1; i < 32; i++)
        if (lanes[i].site != lanes[0].site) { fprintf(stderr, "lanes at different mma sites\n"); abort(); }
      do_mma(nl);
    }
  }
}
