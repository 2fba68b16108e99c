/*
** alloc.c: the CPU backend's allocations, and the test hook that fails one
** of them, so that a spec can walk every allocation of a pass and check
** that each failure comes back as an error and leaves the model usable.
*/
#include <stdatomic.h>
#include <stdlib.h>
#include "cpu.h"

/* allocations left before the one that fails; 0: none fails */
static atomic_int fail_countdown;

int gptoss_test_fail_alloc(int n) { return atomic_exchange(&fail_countdown, n > 0 ? n : 0); }

static int failing(void) {
  int left = atomic_load(&fail_countdown);
  while (left > 0 && !atomic_compare_exchange_weak(&fail_countdown, &left, left - 1)) {}
  return left == 1;
}

void *cpu_alloc(size_t n) { return failing() ? NULL : malloc(n); }
void *cpu_zalloc(size_t n) { return failing() ? NULL : calloc(1, n); }
void *cpu_realloc(void *p, size_t n) { return failing() ? NULL : realloc(p, n); }
