/*
** tokenizer.c: gptoss.Tokenizer, and the UTF-8 functions (utf8.c) the Lua
** libraries use: core.utf8_clean, core.utf8_check, core.utf8_tail.
*/
#include <string.h>
#include "binding.h"
#include "utf8.h"

static ltokenizer *checktok(lua_State *L) { return lg_open(L, 1, TOKENIZER_T, "tokenizer is closed"); }

/* gptoss.tokenizer(path) -> Tokenizer | nil, message */
static int l_tokenizer(lua_State *L) {
  const char *path = lg_check_str(L, 1, "gptoss.tokenizer", "path", NULL);
  ltokenizer *b = lg_box(L, sizeof *b, TOKENIZER_T);   /* boxed first: no leak if loading fails */
  gptoss_tokenizer *t;
  if (gptoss_tokenizer_load(path, &t)) return lg_fail(L);
  b->t = t;
  return 1;
}

static int tok_gc(lua_State *L) {
  ltokenizer *b = lg_udata(L, 1, TOKENIZER_T);
  gptoss_tokenizer_free(b->t);
  b->t = NULL;
  return 0;
}

/* tok:encode(text [, { allowed_special = "all" | {names}, bytes = true }]) */
static int tok_encode(lua_State *L) {
  ltokenizer *b = checktok(L);
  size_t len;
  const char *s = lg_check_str(L, 2, "tok:encode", "text", &len);
  static const char *const keys[] = {"allowed_special", "bytes", NULL};
  const char *fn = "tok:encode";
  lg_check_keys(L, 3, fn, keys);
  int flags = lg_opt_bool(L, 3, fn, "bytes", 0) ? GPTOSS_ENC_BYTES : 0;
  const char **allowed = NULL;
  if (!lua_isnoneornil(L, 3)) {
    lua_getfield(L, 3, "allowed_special");
    if (lua_type(L, -1) == LUA_TSTRING) {
      if (strcmp(lua_tostring(L, -1), "all") != 0) lg_arg_error(L, -1, fn, "allowed_special", "\"all\" or a list of special token names");
      flags |= GPTOSS_ENC_SPECIAL;
    } else if (lua_istable(L, -1)) {
      size_t n = lua_rawlen(L, -1);
      allowed = lua_newuserdatauv(L, sizeof(char *) * (n + 1), 0);
      for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -2, (lua_Integer)(i + 1));
        const char *nm = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        if (!nm || gptoss_special_id(b->t, nm) < 0) {
          lua_pushfstring(L, "allowed_special[%d]", (int)(i + 1));
          lg_arg_error(L, -2, fn, lua_tostring(L, -1), "a special token name");
        }
        allowed[i] = nm;   /* kept alive by the options table */
        lua_pop(L, 1);
      }
      allowed[n] = NULL;
      flags |= GPTOSS_ENC_SPECIAL;
    } else if (!lua_isnil(L, -1)) {
      lg_arg_error(L, -1, fn, "allowed_special", "\"all\" or a list of special token names");
    }
  }
  gptoss_ids ids = {0};
  gptoss_status rc = gptoss_encode(b->t, s, len, flags, allowed, &ids);
  if (rc) { gptoss_ids_free(&ids); return lg_raise(L); }
  lg_push_ids(L, ids.v, ids.n);
  gptoss_ids_free(&ids);
  return 1;
}

/* concatenated bytes of ids (specials as their names) into a buffer */
static void push_bytes(lua_State *L, gptoss_tokenizer *t, int idx, const char *fn) {
  size_t n;
  int32_t *ids = lg_ids(L, idx, fn, "ids", &n);
  luaL_Buffer B;
  luaL_buffinit(L, &B);
  for (size_t i = 0; i < n; i++) {
    size_t len;
    const char *p = gptoss_token_bytes(t, ids[i], &len);
    if (!p) luaL_error(L, "%s: token id %d at index %d is outside the vocabulary (0..%d)", fn, (int)ids[i], (int)(i + 1),
                       gptoss_tokenizer_vocab_size(t) - 1);
    luaL_addlstring(&B, p, len);
  }
  luaL_pushresult(&B);
}

/* {====================================================== UTF-8 */
/* s with each ill-formed subpart replaced by U+FFFD, as tiktoken's decode
   (errors="replace") does */
static void push_clean(lua_State *L, const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s;
  size_t ok = gptoss_utf8_valid(p, n);
  if (ok == n) { lua_pushlstring(L, s, n); return; }
  luaL_Buffer B;
  luaL_buffinit(L, &B);
  for (;;) {
    luaL_addlstring(&B, s, ok);
    p += ok; s += ok; n -= ok;
    if (!n) break;
    int incomplete;
    size_t bad = gptoss_utf8_subpart(p, n, &incomplete);
    luaL_addlstring(&B, "\xEF\xBF\xBD", 3);
    p += bad; s += bad; n -= bad;
    ok = gptoss_utf8_valid(p, n);
  }
  luaL_pushresult(&B);
}

/* core.utf8_clean(s): s with each ill-formed subpart replaced by U+FFFD */
static int l_utf8_clean(lua_State *L) {
  size_t n;
  const char *s = lg_check_str(L, 1, "core.utf8_clean", "s", &n);
  push_clean(L, s, n);
  return 1;
}

/* core.utf8_check(s) -> the length of s's longest well-formed prefix, and
   the length of the ill-formed subpart after it, or nil when there is none
   or when more bytes could still complete it */
static int l_utf8_check(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)lg_check_str(L, 1, "core.utf8_check", "s", &n);
  size_t ok = gptoss_utf8_valid(s, n);
  lua_pushinteger(L, (lua_Integer)ok);
  int incomplete = 1;
  size_t bad = ok < n ? gptoss_utf8_subpart(s + ok, n - ok, &incomplete) : 0;
  if (incomplete) lua_pushnil(L); else lua_pushinteger(L, (lua_Integer)bad);
  return 2;
}

/* core.utf8_tail(s) -> the length of the sequence cut short at the end of
   s (0..3), which a streaming decoder holds back */
static int l_utf8_tail(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)lg_check_str(L, 1, "core.utf8_tail", "s", &n);
  lua_pushinteger(L, (lua_Integer)gptoss_utf8_tail(s, n));
  return 1;
}
/* }====================================================== */

static int tok_decode(lua_State *L) {
  ltokenizer *b = checktok(L);
  push_bytes(L, b->t, 2, "tok:decode");
  size_t n;
  const char *s = lua_tolstring(L, -1, &n);
  push_clean(L, s, n);
  return 1;
}

static int tok_decode_bytes(lua_State *L) {
  ltokenizer *b = checktok(L);
  push_bytes(L, b->t, 2, "tok:decode_bytes");
  return 1;
}

static int tok_special(lua_State *L) {
  ltokenizer *b = checktok(L);
  int32_t id = gptoss_special_id(b->t, lg_check_str(L, 2, "tok:special", "name", NULL));
  if (id < 0) lua_pushnil(L); else lua_pushinteger(L, id);
  return 1;
}

/* tok:name(id): a special's name, or an ordinary token's bytes */
static int tok_name(lua_State *L) {
  ltokenizer *b = checktok(L);
  lua_Integer id = lg_check_int(L, 2, "tok:name", "id", INT64_MIN, INT64_MAX);
  size_t len;
  const char *p = id >= INT32_MIN && id <= INT32_MAX ? gptoss_token_bytes(b->t, (int32_t)id, &len) : NULL;
  if (!p) luaL_error(L, "tok:name: token id %s is outside the vocabulary (0..%d)", lcompat_quote(L, 2), gptoss_tokenizer_vocab_size(b->t) - 1);
  lua_pushlstring(L, p, len);
  return 1;
}

static int tok_is_special(lua_State *L) {
  ltokenizer *b = checktok(L);
  lua_Integer id = lg_check_int(L, 2, "tok:is_special", "id", INT64_MIN, INT64_MAX);
  lua_pushboolean(L, id >= 0 && id <= INT32_MAX && gptoss_is_special(b->t, (int32_t)id));
  return 1;
}

static int tok_fields(lua_State *L) {
  ltokenizer *b = lg_udata(L, 1, TOKENIZER_T);
  const char *k = lua_tostring(L, 2);
  if (!k || !b->t) return 0;
  if (strcmp(k, "vocab_size") == 0) { lua_pushinteger(L, gptoss_tokenizer_vocab_size(b->t)); return 1; }
  if (strcmp(k, "n_ordinary") == 0) { lua_pushinteger(L, gptoss_tokenizer_n_ordinary(b->t)); return 1; }
  return 0;
}

static int tok_tostring(lua_State *L) {
  ltokenizer *b = lg_udata(L, 1, TOKENIZER_T);
  if (!b->t) lua_pushstring(L, "gptoss.Tokenizer (closed)");
  else lua_pushfstring(L, "gptoss.Tokenizer (%d tokens)", gptoss_tokenizer_vocab_size(b->t));
  return 1;
}

void lg_open_tokenizer(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"encode", tok_encode}, {"decode", tok_decode}, {"decode_bytes", tok_decode_bytes},
    {"special", tok_special}, {"name", tok_name}, {"is_special", tok_is_special},
    {"close", tok_gc}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
    {"__gc", tok_gc}, {"__tostring", tok_tostring},
#if LUA_VERSION_NUM >= 504
    {"__close", tok_gc},
#endif
    {NULL, NULL}};
  lg_class(L, TOKENIZER_T, methods, meta, tok_fields);
  static const luaL_Reg funcs[] = {
    {"tokenizer", l_tokenizer}, {"utf8_clean", l_utf8_clean}, {"utf8_check", l_utf8_check}, {"utf8_tail", l_utf8_tail},
    {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
}
