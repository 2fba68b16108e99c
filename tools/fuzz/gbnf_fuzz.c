/*
** gbnf_fuzz.c: libFuzzer target for the GBNF compiler (gbnf.c) and the
** matcher (grammar.c). An input is grammar text, optionally followed by
** FF FE and bytes to feed the matcher. A grammar parses or is refused
** with a message; one that parses gets a matcher over the real vocabulary,
** whose mask is computed before and after the bytes are accepted or
** refused (GPTOSS_EARG, state unchanged). Each mask is checked against a
** second matcher asked byte by byte (gptoss_matcher_would_accept) for a
** sample of the tokens: the first allowed ones and one in 251 of all.
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../../csrc/gptoss.h"
#include "fuzz_files.h"

static gptoss_tokenizer *tok;
static gptoss_vocab *vocab;
static uint32_t *bits;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  const char *dir = getenv("GPTOSS_TOKENIZER_DIR");
  if (gptoss_tokenizer_load(dir ? dir : "tokenizer", &tok) || gptoss_vocab_new(tok, 201088, &vocab)) {
    fprintf(stderr, "fuzz: %s\n", gptoss_errmsg());
    abort();
  }
  bits = malloc(sizeof(uint32_t) * ((201088 + 31) / 32));
  if (!bits) abort();
  return 0;
}

static void check_mask(gptoss_grammar *g, const char *fed, size_t n_fed) {
  gptoss_matcher *ref;
  const int32_t end = 200002;
  if (gptoss_matcher_new(g, vocab, &end, 1, &ref)) return;
  if (n_fed && gptoss_matcher_accept_bytes(ref, fed, n_fed)) { gptoss_matcher_free(ref); return; }
  int checked = 0;
  for (int32_t id = 0; id < 201088; id++) {
    int allowed = (bits[id >> 5] >> (id & 31)) & 1, ok = 0;
    if (!(allowed && checked < 2000) && id % 251) continue;
    checked += allowed;
    size_t len = 0;
    const char *b = gptoss_is_special(tok, id) ? NULL : gptoss_token_bytes(tok, id, &len);
    if (id == end) ok = gptoss_matcher_accepting(ref);
    else if (b && len && gptoss_matcher_would_accept(ref, b, len, &ok)) break;   /* too ambiguous to tell */
    if (ok != allowed) {
      fprintf(stderr, "fuzz: the mask %s token %d, byte steps say otherwise\n", allowed ? "allows" : "refuses", (int)id);
      abort();
    }
  }
  gptoss_matcher_free(ref);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  size_t glen = size, at = size;
  for (size_t i = 0; i + 1 < size; i++)
    if (data[i] == 0xff && data[i + 1] == 0xfe) { glen = i; at = i + 2; break; }
  gptoss_grammar *g;
  gptoss_status rc = gptoss_grammar_parse((const char *)data, glen, "root", &g);
  if (rc) { fuzz_expect_refusal(rc); return 0; }
  gptoss_matcher *m;
  const int32_t end = 200002;   /* <|return|> */
  if (gptoss_matcher_new(g, vocab, &end, 1, &m)) { fuzz_expect_refusal(gptoss_errcode()); gptoss_grammar_free(g); return 0; }
  if ((rc = gptoss_matcher_mask(m, bits))) fuzz_expect_refusal(rc);
  else check_mask(g, NULL, 0);
  if (at < size) {
    gptoss_status fed = gptoss_matcher_accept_bytes(m, (const char *)data + at, size - at);
    if (fed) fuzz_expect_refusal(fed);
    if ((rc = gptoss_matcher_mask(m, bits))) fuzz_expect_refusal(rc);
    else check_mask(g, fed ? NULL : (const char *)data + at, fed ? 0 : size - at);
  }
  (void)gptoss_matcher_accepting(m);
  gptoss_matcher_free(m);
  gptoss_grammar_free(g);
  return 0;
}
