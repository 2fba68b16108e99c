/*
** lua_gptoss.h: what the binding's files share. The binding is the only
** place that knows Lua; it turns engine status codes into Lua errors (bad
** arguments, misuse) or nil, message (loaders and I/O) in lg_raise/lg_fail.
*/
#ifndef GPTOSS_LUA_H
#define GPTOSS_LUA_H

#include "lcompat.h"
#include "gptoss.h"

#define MODEL_T "gptoss.Model"
#define SESSION_T "gptoss.Session"
#define TOKENIZER_T "gptoss.Tokenizer"
#define SAMPLER_T "gptoss.Sampler"
#define FLOATS_T "gptoss.Floats"
#define WRITER_T "gptoss.Writer"
#define READER_T "gptoss.SafeTensors"
#define ADAPTER_T "gptoss.Adapter"

/* raises the engine's last error; never returns */
int lg_raise(lua_State *L);
/* pushes nil and the engine's last error: the loader convention */
int lg_fail(lua_State *L);

/* Registers a type: metatable `name` with meta functions, and a method
   table used by __index (also stored as registry["name.methods"] so Lua
   libraries can add methods). If fields is not NULL, __index falls back to
   fields(L) for keys that are not methods. */
void lg_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta,
              lua_CFunction fields);

/* a userdata of type tname at idx, raising if another type */
void *lg_udata(lua_State *L, int idx, const char *tname);

/* token ids from a Lua array at idx, into a buffer owned by a userdata
   pushed on the stack (so a later error cannot leak it) */
int32_t *lg_ids(lua_State *L, int idx, size_t *n);
void lg_push_ids(lua_State *L, const int32_t *v, size_t n);

/* the tokenizer box, shared with lua_model.c for model.tokenizer */
typedef struct ltokenizer { gptoss_tokenizer *t; } ltokenizer;
ltokenizer *lg_tokenizer_push(lua_State *L, gptoss_tokenizer *t);

/* float array userdata for logits */
typedef struct lfloats { int rows, cols; float v[]; } lfloats;
lfloats *lg_floats_new(lua_State *L, int rows, int cols);

/* option tables: raise on keys outside `known` (NULL-terminated) */
void lg_check_keys(lua_State *L, int idx, const char *what, const char *const *known);
int lg_opt_int(lua_State *L, int idx, const char *key, int dflt);
double lg_opt_num(lua_State *L, int idx, const char *key, double dflt);
const char *lg_opt_str(lua_State *L, int idx, const char *key, const char *dflt);

void lg_push_config(lua_State *L, const gptoss_config *c);
void lg_push_tensor_list(lua_State *L, const gptoss_st *st);

__attribute__((visibility("default"))) int luaopen_gptoss_core(lua_State *L);
int luaopen_gptoss_tokenizer(lua_State *L);
int luaopen_gptoss_safetensors(lua_State *L);
int luaopen_gptoss_model(lua_State *L);
int luaopen_gptoss_adapter(lua_State *L);
void lg_sys_register(lua_State *L);   /* lua_sys.c: isatty, term_columns, getpid */
/* the adapter at idx, raising if closed or another type */
gptoss_adapter *lg_check_adapter(lua_State *L, int idx);
/* the open model at idx, raising if closed or another type */
gptoss_model *lg_check_model(lua_State *L, int idx);

#endif
