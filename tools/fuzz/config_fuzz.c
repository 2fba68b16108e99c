/*
** config_fuzz.c: libFuzzer target for config.json. A config that parses
** must serialise to JSON that parses back to the same config.
*/
#include "../../csrc/gptoss.h"
#include "fuzz_files.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  gptoss_config c, back;
  gptoss_status rc = gptoss_config_parse((const char *)data, size, "config.json", &c);
  if (rc) { fuzz_expect_refusal(rc); return 0; }
  char *js = gptoss_config_to_json(&c);
  if (!js) abort();
  if (gptoss_config_parse(js, strlen(js), "written config.json", &back)) {
    fprintf(stderr, "fuzz: the written config does not parse: %s\n%s\n", gptoss_errmsg(), js);
    abort();
  }
  /* initial_context_length and bos are not written back; compare the rest */
  back.initial_context_length = c.initial_context_length;
  back.bos_token_id = c.bos_token_id;
  if (memcmp(&c, &back, sizeof c) != 0) { fprintf(stderr, "fuzz: config changed in a round trip\n%s\n", js); abort(); }
  free(js);
  return 0;
}
