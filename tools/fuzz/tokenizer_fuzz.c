/*
** tokenizer_fuzz.c: libFuzzer target for encode and decode.
**
** Every input is encoded in bytes mode (with and without specials), must
** decode back to itself, and its ids must all be in range; the first byte
** also picks a plain-text encode, which must fail cleanly on invalid UTF-8.
**   make fuzz FUZZ_SECONDS=600
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../../csrc/gptoss.h"

static gptoss_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  const char *dir = getenv("GPTOSS_TOKENIZER_DIR");
  if (gptoss_tokenizer_load(dir ? dir : "tokenizer", &tok)) {
    fprintf(stderr, "fuzz: %s\n", gptoss_errmsg());
    abort();
  }
  return 0;
}

static void roundtrip(const uint8_t *data, size_t size, int flags) {
  gptoss_ids ids = {0};
  if (gptoss_encode(tok, (const char *)data, size, flags, NULL, &ids)) abort();
  size_t at = 0;
  for (size_t i = 0; i < ids.n; i++) {
    size_t len;
    const char *p = gptoss_token_bytes(tok, ids.v[i], &len);
    if (!p || at + len > size || memcmp(p, data + at, len) != 0) abort();
    at += len;
  }
  if (at != size) abort();
  gptoss_ids_free(&ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  roundtrip(data, size, GPTOSS_ENC_BYTES);
  roundtrip(data, size, GPTOSS_ENC_BYTES | GPTOSS_ENC_SPECIAL);
  gptoss_ids ids = {0};
  gptoss_status rc = gptoss_encode(tok, (const char *)data, size, 0, NULL, &ids);
  if (rc != GPTOSS_OK && rc != GPTOSS_EARG) abort();
  gptoss_ids_free(&ids);
  return 0;
}
