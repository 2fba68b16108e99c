/*
** lua_sys.c: the few facts about the process and its terminal that Lua
** cannot get by itself, for progress bars and the command line:
** core.isatty(fd), core.term_columns(fd), core.getpid().
*/
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

/* adds the functions to the module table on top of the stack */
void lg_open_sys(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"isatty", l_isatty}, {"term_columns", l_term_columns}, {"getpid", l_getpid}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
