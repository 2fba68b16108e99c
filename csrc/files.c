/*
** files.c: whole-file reads and writes, the temporary-then-rename protocol
** every writer of the engine follows, and path helpers.
*/
#define _GNU_SOURCE   /* mkostemp */
#include <dirent.h>
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

/* {====================================================== temporary files */
char *gptoss_temp_name(const char *path) {
  size_t n = strlen(path);
  char *tmp = malloc(n + 12);
  if (!tmp) { gptoss_fail(GPTOSS_ENOMEM, "out of memory"); return NULL; }
  memcpy(tmp, path, n);
  memcpy(tmp + n, ".tmp-XXXXXX", 12);
  return tmp;
}

int gptoss_temp_open(const char *path, char **tmp) {
  if (!(*tmp = gptoss_temp_name(path))) return -1;
  int fd = mkostemp(*tmp, O_CLOEXEC);
  if (fd < 0) {
    gptoss_fail(GPTOSS_EIO, "%s: cannot create a temporary file beside it: %s", path, strerror(errno));
    free(*tmp);
    *tmp = NULL;
    return -1;
  }
  fchmod(fd, 0644);   /* mkstemp's 0600 would make the file private to its writer */
  return fd;
}

gptoss_status gptoss_write_all(int fd, const void *data, size_t len, const char *name) {
  const char *c = data;
  while (len) {
    ssize_t k = write(fd, c, len);
    if (k < 0) {
      if (errno == EINTR) continue;
      return gptoss_fail(GPTOSS_EIO, "%s: write failed: %s", name, strerror(errno));
    }
    c += k;
    len -= (size_t)k;
  }
  return GPTOSS_OK;
}

gptoss_status gptoss_temp_commit(int fd, char *tmp, const char *path, gptoss_status rc) {
  if (!rc && fsync(fd) != 0) rc = gptoss_fail(GPTOSS_EIO, "%s: fsync failed: %s", tmp, strerror(errno));
  if (close(fd) != 0 && !rc) rc = gptoss_fail(GPTOSS_EIO, "%s: close failed: %s", tmp, strerror(errno));
  if (!rc && rename(tmp, path) != 0) rc = gptoss_fail(GPTOSS_EIO, "%s: rename into place failed: %s", path, strerror(errno));
  if (rc) unlink(tmp);
  free(tmp);
  return rc;
}
/* }====================================================== */

gptoss_status gptoss_write_file(const char *path, const void *data, size_t len) {
  char *tmp;
  int fd = gptoss_temp_open(path, &tmp);
  if (fd < 0) return gptoss_errcode();
  return gptoss_temp_commit(fd, tmp, path, gptoss_write_all(fd, data, len, tmp));
}

gptoss_status gptoss_copy_file(const char *src, const char *dst) {
  size_t len;
  char *data = gptoss_read_file(src, &len);
  if (!data) return gptoss_errcode();
  gptoss_status rc = gptoss_write_file(dst, data, len);
  free(data);
  return rc;
}

void gptoss_remove_tree(const char *dir) {
  DIR *d = opendir(dir);
  if (d) {
    struct dirent *e;
    while ((e = readdir(d))) {
      if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
      char *p = gptoss_path_join(dir, e->d_name);
      if (p) { unlink(p); free(p); }
    }
    closedir(d);
  }
  rmdir(dir);
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
