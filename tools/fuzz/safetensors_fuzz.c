/*
** safetensors_fuzz.c: libFuzzer target for safetensors files and their
** index: the first byte picks which one the rest of the input is.
**   0..127   a .safetensors file
**   128..255 a model.safetensors.index.json next to a valid shard "a.st"
** An open that succeeds must describe every tensor inside its file: the
** harness reads each tensor's bytes, so ASan sees any range past the map.
*/
#include "../../csrc/gptoss.h"
#include "fuzz_files.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* a shard with one tensor, x: F32 [2] = {1, 2}, that index inputs name */
static const char shard_header[] = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  uint8_t b[256] = {0};
  size_t h = sizeof shard_header - 1;
  b[0] = (uint8_t)h;
  memcpy(b + 8, shard_header, h);
  float v[2] = {1, 2};
  memcpy(b + 8 + h, v, sizeof v);
  fuzz_put("a.st", b, 8 + h + sizeof v);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  const char *path = data[0] < 128 ? fuzz_put("in.safetensors", data + 1, size - 1)
                                   : fuzz_put("model.safetensors.index.json", data + 1, size - 1);
  gptoss_st *st;
  gptoss_status rc = gptoss_st_open(path, &st);
  if (rc) { fuzz_expect_refusal(rc); return 0; }
  volatile uint8_t sink = 0;
  for (size_t i = 0; i < gptoss_st_count(st); i++) {
    const gptoss_tensor *t = gptoss_st_at(st, i);
    if (gptoss_st_find(st, t->name) == NULL) abort();
    uint64_t n = gptoss_dtype_size(t->dtype);
    for (int d = 0; d < t->ndim; d++) n *= (uint64_t)t->shape[d];
    if (n != t->nbytes) { fprintf(stderr, "%s: %llu bytes for %zu\n", t->name, (unsigned long long)n, t->nbytes); abort(); }
    const uint8_t *p = t->data;
    for (size_t k = 0; k < t->nbytes; k++) sink ^= p[k];
  }
  (void)gptoss_st_metadata(st, "format");
  gptoss_st_free(st);
  return 0;
}
