/*
** fuzz_files.h: what the file-reading fuzz targets share: a private
** directory under /dev/shm (tmpfs: no disk writes per input) and writing
** an input there under the name a loader looks for.
*/
#ifndef FUZZ_FILES_H
#define FUZZ_FILES_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char fuzz_dir[64];

/* the private directory, made on first use */
static const char *fuzz_tmpdir(void) {
  if (!fuzz_dir[0]) {
    snprintf(fuzz_dir, sizeof fuzz_dir, "%s/gptoss-fuzz-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    if (!mkdtemp(fuzz_dir)) { perror("fuzz: mkdtemp"); abort(); }
  }
  return fuzz_dir;
}

/* writes data to <dir>/name; returns the path (static) */
static const char *fuzz_put(const char *name, const uint8_t *data, size_t size) {
  static char path[256];
  snprintf(path, sizeof path, "%s/%s", fuzz_tmpdir(), name);
  FILE *f = fopen(path, "wb");
  if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0) { perror(path); abort(); }
  return path;
}

/* the status a parser may give bad input: anything but an internal error */
static void fuzz_expect_refusal(gptoss_status rc) {
  if (rc != GPTOSS_EFORMAT && rc != GPTOSS_EIO && rc != GPTOSS_EUNSUP && rc != GPTOSS_ERANGE && rc != GPTOSS_EARG) {
    fprintf(stderr, "fuzz: unexpected status %d: %s\n", (int)rc, gptoss_errmsg());
    abort();
  }
  if (!gptoss_errmsg()[0]) { fprintf(stderr, "fuzz: a refusal without a message\n"); abort(); }
}
#endif
