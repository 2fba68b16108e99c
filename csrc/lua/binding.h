/*
** binding.h: what the binding's files share, all of it defined in
** binding.c. The binding is the only place that knows Lua. Each type's file
** (tokenizer.c, safetensors.c, model.c, adapter.c, floats.c) uses these
** helpers and nothing of another type's file; gptoss.c gathers them into
** the gptoss.core module.
*/
#ifndef GPTOSS_BINDING_H
#define GPTOSS_BINDING_H

#include "lcompat.h"
#include "gptoss.h"

/* {====================================================== types */
#define MODEL_T "gptoss.Model"
#define SESSION_T "gptoss.Session"
#define TOKENIZER_T "gptoss.Tokenizer"
#define SAMPLER_T "gptoss.Sampler"
#define FLOATS_T "gptoss.Floats"
#define WRITER_T "gptoss.Writer"
#define READER_T "gptoss.SafeTensors"
#define ADAPTER_T "gptoss.Adapter"
#define ENGINE_T "gptoss.Engine"
#define REQUEST_T "gptoss.Request"
#define LOADER_T "gptoss.Loader"
#define TRAIN_JOB_T "gptoss.TrainJob"

/* Registers a type: metatable `name` with meta functions, and a method
   table used by __index (also stored as registry["name.methods"] so Lua
   libraries can add methods). If fields is not NULL, __index falls back to
   fields(L) for keys that are not methods. */
void lg_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta,
              lua_CFunction fields);

/* a userdata of type tname at idx, raising if another type */
void *lg_udata(lua_State *L, int idx, const char *tname);

/* A box is a userdata whose first member points at an engine object, NULL
   once closed. lg_box pushes a new one of size bytes (closed until filled
   in), lg_open returns the box of type tname at idx, raising `closed` (the
   message) when it is closed. */
void *lg_box(lua_State *L, size_t size, const char *tname);
void *lg_open(lua_State *L, int idx, const char *tname, const char *closed);

/* the boxes more than one file opens or makes */
typedef struct ltokenizer { gptoss_tokenizer *t; } ltokenizer;
/* the engine object of the open model or adapter at idx, argument `name`
   of fn (a wrong type raises as lg_check_udata does) */
gptoss_model *lg_check_model(lua_State *L, int idx, const char *fn, const char *name);
gptoss_adapter *lg_check_adapter(lua_State *L, int idx, const char *fn, const char *name);

/* gptoss.load's arguments (model.c), shared with gptoss.load_async (loader.c) */
typedef struct lg_load { const char *dir, *precision, *tokenizer; gptoss_model_opts o; } lg_load;
void lg_load_args(lua_State *L, const char *fn, lg_load *a);
void lg_push_model(lua_State *L, gptoss_model *m, gptoss_tokenizer *t, const lg_load *a);

/* float array userdata (logits, tensors, LoRA weights) */
typedef struct lfloats { int rows, cols; float v[]; } lfloats;
lfloats *lg_floats_new(lua_State *L, int rows, int cols);
/* }====================================================== */

/* {====================================================== errors */
/* raises the engine's last error; never returns */
int lg_raise(lua_State *L);
/* pushes nil and the engine's last error: the loader convention */
int lg_fail(lua_State *L);
/* }====================================================== */

/* {====================================================== values */
/* Arguments: each raises "fn: name must be ... (got X)", fn the function as
   the user calls it (s:rewind, gptoss.load), X the value given quoted
   exactly (a number or string), a typed userdata's type name, or the type */
lua_Integer lg_check_int(lua_State *L, int idx, const char *fn, const char *name, lua_Integer lo, lua_Integer hi);
double lg_check_num(lua_State *L, int idx, const char *fn, const char *name, int finite);
/* a number in lo..hi, an infinite bound leaving that side open; NaN never
   passes, nor an infinity unless LG_INF */
enum { LG_GT = 1,      /* lo itself is outside */
       LG_LT = 2,      /* hi itself is outside */
       LG_INF = 4,     /* an infinite value within the bounds passes */
       LG_WHOLE = 8 }; /* only integral values pass (stays a double: bytes past 2^63) */
double lg_check_range(lua_State *L, int idx, const char *fn, const char *name, double lo, double hi, int flags);
const char *lg_check_str(lua_State *L, int idx, const char *fn, const char *name, size_t *len);
void lg_check_table(lua_State *L, int idx, const char *fn, const char *name, const char *what);
int lg_check_bool(lua_State *L, int idx, const char *fn, const char *name);
/* a string among names (NULL-terminated); its index */
int lg_check_choice(lua_State *L, int idx, const char *fn, const char *name, const char *const *names);
/* raises "fn: name must be what (got X)" for the value at idx */
int lg_arg_error(lua_State *L, int idx, const char *fn, const char *name, const char *what);
/* the most bytes a memory budget names: 2^53, past any device, exact in a double */
#define LG_MAX_BYTES 9007199254740992.0
/* a userdata of type tname (open or closed) */
void *lg_check_udata(lua_State *L, int idx, const char *fn, const char *name, const char *tname);

/* token ids from a Lua array at idx, each an int32, into a buffer owned by a
   userdata pushed on the stack (so a later error cannot leak it) */
int32_t *lg_ids(lua_State *L, int idx, const char *fn, const char *name, size_t *n);
/* packed examples' starts: a list of 1-based positions in n ids, the first
   1, increasing; pushes a buffer of them 0-based (*ns of them) */
int32_t *lg_starts(lua_State *L, int idx, const char *fn, const char *name, size_t n, int *ns);
void lg_push_ids(lua_State *L, const int32_t *v, size_t n);

/* Option tables: opts at idx is nil or a table whose keys are all in known
   (NULL-terminated), else "fn: unknown option 'k'". Each lg_opt_ gives
   opts[key], checked as its lg_check_ function does with key as the name,
   or dflt when opts or the field is nil. */
void lg_check_keys(lua_State *L, int idx, const char *fn, const char *const *known);
lua_Integer lg_opt_int(lua_State *L, int idx, const char *fn, const char *key, lua_Integer lo, lua_Integer hi, lua_Integer dflt);
double lg_opt_range(lua_State *L, int idx, const char *fn, const char *key, double lo, double hi, int flags, double dflt);
const char *lg_opt_str(lua_State *L, int idx, const char *fn, const char *key, const char *dflt);
int lg_opt_bool(lua_State *L, int idx, const char *fn, const char *key, int dflt);
int lg_opt_choice(lua_State *L, int idx, const char *fn, const char *key, const char *const *names, int dflt);

/* the config as the table of its config.json (config.c writes the text) */
void lg_push_config(lua_State *L, const gptoss_config *c);
/* {name=, dtype=, shape=, bytes=, file=}, and a list of them */
void lg_push_tensor(lua_State *L, const gptoss_tensor *t);
void lg_push_tensor_list(lua_State *L, const gptoss_st *st);
/* }====================================================== */

/* {====================================================== parts */
/* each registers its types, and its functions into the table on top */
void lg_open_floats(lua_State *L);
void lg_open_tokenizer(lua_State *L);
void lg_open_safetensors(lua_State *L);
void lg_open_model(lua_State *L);
void lg_open_adapter(lua_State *L);

__attribute__((visibility("default"))) int luaopen_gptoss_core(lua_State *L);
void lg_open_engine(lua_State *L);
void lg_open_train_job(lua_State *L);   /* after lg_open_engine: adds eng:train_job */
/* the engine at idx (engine.c), NULL once closed */
gptoss_engine *lg_check_engine(lua_State *L, int idx, const char *fn, const char *name);
void lg_open_loader(lua_State *L);
void lg_open_sys(lua_State *L);      /* isatty, term_columns, getpid */
/* marks the model at idx as owned by a running engine (NULL: free again);
   while owned, every direct use of it or its sessions raises */
void lg_model_own(lua_State *L, int idx, gptoss_engine *e);
void lg_open_grammar(lua_State *L);   /* grammar, vocab, matcher */
/* the matcher at idx, taken over by the caller (the Lua object is closed) */
gptoss_matcher *lg_take_matcher(lua_State *L, int idx);
/* adds the arm described by the table at idx to s (raising on bad fields) */
int lg_sampler_arm(lua_State *L, gptoss_sampler *s, int idx);
/* the sampler at idx, taken over by the caller (the Lua object is closed) */
gptoss_sampler *lg_take_sampler(lua_State *L, int idx);
/* }====================================================== */

#endif
