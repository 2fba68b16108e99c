/*
** files.c: whole-file reads and writes, and path helpers.
*/
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "internal.h"

/* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
   (forever); the mode is checked on the open descriptor, so what was checked
   is what is read, and blocking reads are restored for a regular file. */
int gptoss_open_regular(const char *path, size_t *size) {
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) { gptoss_fail(GPTOSS_EIO, "%s: cannot open: %s", path, strerror(errno)); return -1; }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    gptoss_fail(GPTOSS_EIO, "%s: not a regular file", path);
    return -1;
  }
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
    int e = errno;
    close(fd);
    gptoss_fail(GPTOSS_EIO, "%s: %s", path, strerror(e));
    return -1;
  }
  *size = (size_t)st.st_size;
  return fd;
}

char *gptoss_read_file(const char *path, size_t *len) {
  size_t n;
  int fd = gptoss_open_regular(path, &n);
  if (fd < 0) return NULL;
  FILE *f = fdopen(fd, "rb");
  if (!f) { close(fd); gptoss_fail(GPTOSS_EIO, "%s: cannot open: %s", path, strerror(errno)); return NULL; }
  char *buf = malloc(n + 1);
  if (!buf) { fclose(f); gptoss_fail(GPTOSS_ENOMEM, "%s: out of memory reading %zu bytes", path, n); return NULL; }
  if (n && fread(buf, 1, n, f) != n) {
    int e = errno;
    free(buf); fclose(f);
    gptoss_fail(GPTOSS_EIO, "%s: read failed: %s", path, e ? strerror(e) : "short read");
    return NULL;
  }
  fclose(f);
  buf[n] = 0;
  if (len) *len = n;
  return buf;
}

gptoss_status gptoss_write_file(const char *path, const void *data, size_t len) {
  size_t n = strlen(path) + 16;
  char *tmp = malloc(n);
  if (!tmp) return gptoss_fail(GPTOSS_ENOMEM, "out of memory");
  snprintf(tmp, n, "%s.tmp-XXXXXX", path);
  int fd = mkstemp(tmp);
  if (fd < 0) { gptoss_status rc = gptoss_fail(GPTOSS_EIO, "%s: %s", tmp, strerror(errno)); free(tmp); return rc; }
  const char *p = data;
  size_t off = 0;
  int err = 0;
  while (off < len && !err) {
    ssize_t w = write(fd, p + off, len - off);
    if (w > 0) off += (size_t)w;
    else if (w < 0 && errno != EINTR) err = errno;
    else if (w == 0) err = EIO;
  }
  if (!err && fsync(fd) != 0) err = errno;
  if (close(fd) != 0 && !err) err = errno;
  if (!err && rename(tmp, path) != 0) err = errno;
  gptoss_status rc = GPTOSS_OK;
  if (err) { unlink(tmp); rc = gptoss_fail(GPTOSS_EIO, "%s: %s", path, strerror(err)); }
  free(tmp);
  return rc;
}

char *gptoss_path_join(const char *dir, const char *name) {
  size_t a = strlen(dir), b = strlen(name);
  char *s = malloc(a + b + 2);
  if (!s) return NULL;
  memcpy(s, dir, a);
  size_t k = a;
  if (a && dir[a - 1] != '/') s[k++] = '/';
  memcpy(s + k, name, b + 1);
  return s;
}

int gptoss_is_dir(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int gptoss_file_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int gptoss_path_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}
