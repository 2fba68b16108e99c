/*
** adapter_fuzz.c: libFuzzer target for PEFT adapters: the input is
** adapter_config.json, then the bytes FF FE (never in UTF-8 JSON), then
** adapter_model.safetensors. A loaded adapter must describe itself.
*/
#include "../../csrc/gptoss.h"
#include "fuzz_files.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  size_t cut = 0;
  while (cut + 1 < size && !(data[cut] == 0xff && data[cut + 1] == 0xfe)) cut++;
  if (cut + 1 >= size) return 0;
  fuzz_put("adapter_config.json", data, cut);
  fuzz_put("adapter_model.safetensors", data + cut + 2, size - cut - 2);
  gptoss_adapter *a;
  gptoss_status rc = gptoss_adapter_load(fuzz_tmpdir(), &a);
  if (rc) { fuzz_expect_refusal(rc); return 0; }
  gptoss_adapter_desc d;
  gptoss_adapter_info(a, &d);
  for (int l = 0; l < d.nlayers; l++)
    for (int m = 0; m < GPTOSS_LORA_MODULES; m++) {
      const gptoss_lora *lo = gptoss_adapter_module(a, l, (gptoss_lora_module)m);
      if (!lo) continue;
      volatile float s = 0;
      size_t na = (size_t)lo->rk * (size_t)lo->in, nb = (size_t)lo->out * (size_t)lo->rk;
      if (na) s += lo->A[0] + lo->A[na - 1];
      if (nb) s += lo->B[0] + lo->B[nb - 1];
    }
  gptoss_adapter_free(a);
  return 0;
}
