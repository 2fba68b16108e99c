/*
** lcompat.h: the few Lua C API differences between Lua 5.4 and LuaJIT 2.1
** (a 5.1 API with some 5.2 additions) and plain Lua 5.1, kept in this one header.
*/
#ifndef GPTOSS_LCOMPAT_H
#define GPTOSS_LCOMPAT_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>

#if LUA_VERSION_NUM < 502
#define lua_rawlen(L, i) lua_objlen(L, i)
#define lua_getuservalue(L, i) lua_getfenv(L, i)
#define lua_setuservalue(L, i) lua_setfenv(L, i)
#define lua_absindex(L, i) ((i) > 0 || (i) <= LUA_REGISTRYINDEX ? (i) : lua_gettop(L) + (i) + 1)
#ifndef luaL_newlib
#define luaL_newlib(L, f) (lua_createtable(L, 0, sizeof(f) / sizeof((f)[0]) - 1), luaL_setfuncs(L, f, 0))
#endif
#endif

/* plain Lua 5.1 (luarocks --lua-version 5.1 builds against its headers;
   Neovim then loads the module into LuaJIT): LuaJIT 2.1 has these 5.2
   functions, Lua 5.1 does not, so the module carries its own */
#if LUA_VERSION_NUM < 502 && !defined(LUA_LJDIR)
static inline void lcompat_setfuncs(lua_State *L, const luaL_Reg *l, int nup) {
  luaL_checkstack(L, nup, "too many upvalues");
  for (; l->name; l++) {
    for (int i = 0; i < nup; i++) lua_pushvalue(L, -nup);
    lua_pushcclosure(L, l->func, nup);
    lua_setfield(L, -(nup + 2), l->name);
  }
  lua_pop(L, nup);
}
static inline void lcompat_setmetatable(lua_State *L, const char *tname) {
  luaL_getmetatable(L, tname);
  lua_setmetatable(L, -2);
}
static inline void *lcompat_testudata(lua_State *L, int ud, const char *tname) {
  void *p = lua_touserdata(L, ud);
  if (!p || !lua_getmetatable(L, ud)) return NULL;
  luaL_getmetatable(L, tname);
  int same = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return same ? p : NULL;
}
#define luaL_setfuncs(L, l, n) lcompat_setfuncs(L, l, n)
#define luaL_testudata(L, i, t) lcompat_testudata(L, i, t)
#define luaL_setmetatable(L, t) lcompat_setmetatable(L, t)
#endif

#if LUA_VERSION_NUM < 504
#define lua_newuserdatauv(L, sz, nuv) lua_newuserdata(L, sz)
#endif

/* an integer argument that must be exactly integral, on either VM */
static inline int lcompat_tointeger(lua_State *L, int idx, lua_Integer *out) {
#if LUA_VERSION_NUM >= 503
  int ok;
  lua_Integer v = lua_tointegerx(L, idx, &ok);
  if (ok) { *out = v; return 1; }
  return 0;
#else
  if (lua_type(L, idx) != LUA_TNUMBER) return 0;
  lua_Number n = lua_tonumber(L, idx);
  if (n != n || n < -9007199254740992.0 || n > 9007199254740992.0 || (lua_Number)(lua_Integer)n != n) return 0;
  *out = (lua_Integer)n;
  return 1;
#endif
}

/* a value as the caller wrote it, for messages (pushed on the stack): LuaJIT
   prints numbers with 14 digits, so an id like 2^53 + 1 would read as another */
static inline const char *lcompat_quote(lua_State *L, int idx) {
#if LUA_VERSION_NUM >= 502
  return luaL_tolstring(L, idx, NULL);
#else
  char buf[40];
  if (lua_type(L, idx) == LUA_TNUMBER) {
    lua_Number n = lua_tonumber(L, idx);
    if (n == n && n > -9.2e18 && n < 9.2e18 && n == (lua_Number)(long long)n) snprintf(buf, sizeof buf, "%lld", (long long)n);
    else snprintf(buf, sizeof buf, "%.17g", (double)n);
    lua_pushstring(L, buf);
  } else if (lua_type(L, idx) == LUA_TSTRING) {
    lua_pushvalue(L, idx);
  } else {
    lua_pushstring(L, luaL_typename(L, idx));
  }
  return lua_tostring(L, -1);
#endif
}

#endif
