/*
** lua_sys.c: the few facts about the process and its terminal that Lua
** cannot get by itself, for progress bars and the command line:
** core.isatty(fd), core.term_columns(fd), core.getpid(), and
** core.wait_fds(fds, timeout) for a script that waits on several engines.
*/
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include "binding.h"

/* core.isatty(fd): whether fd (0 stdin, 1 stdout, 2 stderr) is a terminal */
static int l_isatty(lua_State *L) {
  lua_Integer fd = lg_check_int(L, 1, "core.isatty", "fd", INT64_MIN, INT64_MAX);
  lua_pushboolean(L, fd >= 0 && fd <= 0x7fffffff && isatty((int)fd));
  return 1;
}

/* core.term_columns(fd): the terminal's width, or nil when fd is not one */
static int l_term_columns(lua_State *L) {
  lua_Integer fd = lg_check_int(L, 1, "core.term_columns", "fd", INT64_MIN, INT64_MAX);
  struct winsize ws;
  if (fd < 0 || fd > 0x7fffffff || ioctl((int)fd, TIOCGWINSZ, &ws) != 0 || ws.ws_col == 0) return 0;
  lua_pushinteger(L, ws.ws_col);
  return 1;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

/* core.wait_fds(fds, timeout_s) -> a list of the 1-based indices of the
   descriptors readable within timeout_s (math.huge: no limit; empty when
   none became so): poll(2) over them all, for scripts without an event
   loop of their own. A descriptor that is not open raises. */
static int l_wait_fds(lua_State *L) {
  const char *fn = "core.wait_fds";
  lg_check_table(L, 1, fn, "fds", "a list of file descriptors");
  double timeout = lg_check_range(L, 2, fn, "timeout", 0, HUGE_VAL, LG_INF);
  size_t n = lua_rawlen(L, 1);
  struct pollfd *p = lua_newuserdatauv(L, sizeof *p * (n ? n : 1), 0);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (lua_Integer)i + 1);
    lua_pushfstring(L, "fds[%d]", (int)i + 1);
    p[i].fd = (int)lg_check_int(L, -2, fn, lua_tostring(L, -1), 0, 0x7fffffff);
    p[i].events = POLLIN;
    p[i].revents = 0;
    lua_pop(L, 2);
  }
  int ms = isinf(timeout) ? -1 : timeout > 2e6 ? 2000000000 : (int)(timeout * 1000 + 0.999);
  int rc;
  do rc = poll(p, (nfds_t)n, ms); while (rc < 0 && errno == EINTR);
  if (rc < 0) return luaL_error(L, "%s: poll: %s", fn, strerror(errno));
  for (size_t i = 0; rc > 0 && i < n; i++)
    if (p[i].revents & POLLNVAL) return luaL_error(L, "%s: fds[%d] (%d) is not an open descriptor", fn, (int)i + 1, p[i].fd);
  lua_createtable(L, rc > 0 ? rc : 0, 0);
  int k = 0;
  for (size_t i = 0; rc > 0 && i < n; i++)
    if (p[i].revents) { lua_pushinteger(L, (lua_Integer)i + 1); lua_rawseti(L, -2, ++k); }
  return 1;
}

/* adds the functions to the module table on top of the stack */
void lg_open_sys(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"isatty", l_isatty}, {"term_columns", l_term_columns}, {"getpid", l_getpid}, {"wait_fds", l_wait_fds}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
