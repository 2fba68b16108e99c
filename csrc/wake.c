/*
** wake.c: a descriptor that turns readable when signalled, for event loops
** (libuv's poll in Neovim, nginx's timers) to wake on: an eventfd on Linux,
** a pipe elsewhere. The engine signals news of its requests through one,
** the loader the end of a load.
*/
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif
#include "internal.h"

gptoss_status gptoss_wake_open(int fd[2]) {
#ifdef __linux__
  fd[0] = fd[1] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd[0] < 0) return gptoss_fail(GPTOSS_EIO, "eventfd: %s", strerror(errno));
#else
  if (pipe(fd) != 0) { fd[0] = fd[1] = -1; return gptoss_fail(GPTOSS_EIO, "pipe: %s", strerror(errno)); }
  for (int i = 0; i < 2; i++) {
    fcntl(fd[i], F_SETFL, fcntl(fd[i], F_GETFL) | O_NONBLOCK);
    fcntl(fd[i], F_SETFD, FD_CLOEXEC);
  }
#endif
  return GPTOSS_OK;
}

void gptoss_wake_close(int fd[2]) {
  if (fd[0] >= 0) close(fd[0]);
  if (fd[1] >= 0 && fd[1] != fd[0]) close(fd[1]);
  fd[0] = fd[1] = -1;
}

/* a full pipe or a saturated counter is already readable: nothing to do */
void gptoss_wake_signal(const int fd[2]) {
#ifdef __linux__
  uint64_t one = 1;
  ssize_t w = write(fd[1], &one, sizeof one);
#else
  char one = 1;
  ssize_t w = write(fd[1], &one, 1);
#endif
  (void)w;
}

int gptoss_wake_drain(const int fd[2]) {
  char buf[64];
  int any = 0;
  while (read(fd[0], buf, sizeof buf) > 0) {
    any = 1;
#ifdef __linux__
    break;   /* one read resets an eventfd */
#endif
  }
  return any;
}

int gptoss_wake_poll(const int fd[2], double timeout_s) {
  struct pollfd p = { fd[0], POLLIN, 0 };
  double ms = timeout_s * 1e3;
  return poll(&p, 1, ms < 0 ? 0 : ms > 2e9 ? 2000000000 : (int)ms) > 0;
}
