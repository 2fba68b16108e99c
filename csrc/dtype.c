/*
** dtype.c: safetensors dtype names and sizes.
*/
#include <string.h>
#include "gptoss.h"

static const struct { const char *name; size_t size; } dtypes[GPTOSS_DTYPE_COUNT] = {
  {"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1},
  {"I16", 2}, {"U16", 2}, {"F16", 2}, {"BF16", 2}, {"I32", 4}, {"U32", 4},
  {"F32", 4}, {"F64", 8}, {"I64", 8}, {"U64", 8},
};

const char *gptoss_dtype_name(gptoss_dtype t) {
  return (unsigned)t < GPTOSS_DTYPE_COUNT ? dtypes[t].name : "?";
}

size_t gptoss_dtype_size(gptoss_dtype t) {
  return (unsigned)t < GPTOSS_DTYPE_COUNT ? dtypes[t].size : 0;
}

int gptoss_dtype_from_name(const char *name) {
  for (int i = 0; i < GPTOSS_DTYPE_COUNT; i++)
    if (strcmp(dtypes[i].name, name) == 0) return i;
  return -1;
}
