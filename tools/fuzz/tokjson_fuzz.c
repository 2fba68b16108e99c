/*
** tokjson_fuzz.c: libFuzzer target for tokenizer.json. A tokenizer that
** loads must encode and decode its own vocabulary without a fault.
*/
#include "../../csrc/gptoss.h"
#include "fuzz_files.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *path = fuzz_put("tokenizer.json", data, size);
  gptoss_tokenizer *t;
  gptoss_status rc = gptoss_tokenizer_load(path, &t);
  if (rc) { fuzz_expect_refusal(rc); return 0; }
  static const char text[] = "Hello, world! 123 <|start|>user<|message|>\xc3\xa9\xf0\x9f\x98\x80  \n\n x";
  gptoss_ids ids = {0};
  rc = gptoss_encode(t, text, sizeof text - 1, GPTOSS_ENC_BYTES | GPTOSS_ENC_SPECIAL, NULL, &ids);
  if (rc == GPTOSS_OK) {
    for (size_t i = 0; i < ids.n; i++) {
      size_t len;
      if (!gptoss_token_bytes(t, ids.v[i], &len)) abort();
    }
    gptoss_ids_free(&ids);
  } else {
    fuzz_expect_refusal(rc);
  }
  gptoss_tokenizer_free(t);
  return 0;
}
