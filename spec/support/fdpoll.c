/*
** fdpoll.c: poll(2) for the specs, which check that gptoss.engine's fd
** becomes readable as an event loop sees it (Lua has no poll of its own,
** and Debian's luaposix has no Lua 5.4 build). Built by the spec itself.
**
**   fdpoll.readable(fd, timeout_ms) -> true | false
*/
#include <poll.h>
#include <lua.h>
#include <lauxlib.h>

static int readable(lua_State *L) {
  struct pollfd p;
  p.fd = (int)luaL_checkinteger(L, 1);
  p.events = POLLIN;
  p.revents = 0;
  int rc = poll(&p, 1, (int)luaL_optinteger(L, 2, 0));
  if (rc < 0) return luaL_error(L, "poll failed");
  lua_pushboolean(L, rc > 0 && (p.revents & POLLIN));
  return 1;
}

int luaopen_fdpoll(lua_State *L);
int luaopen_fdpoll(lua_State *L) {
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, readable);
  lua_setfield(L, -2, "readable");
  return 1;
}
