/*
** gptoss.h: the public C API of the gptoss engine.
**
** Plain C11, no Lua. Every function that can fail returns a gptoss_status
** (0 on success) and leaves a message for gptoss_errmsg(); the message is
** per thread, so engine threads and Lua states never see each other's.
** Objects are opaque and freed by their *_free function, which accepts NULL.
*/
#ifndef GPTOSS_H
#define GPTOSS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* the C API is what the shared objects export; everything else is hidden */
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

#define GPTOSS_VERSION "0.1.0"

/* {====================================================== errors */
typedef enum gptoss_status {
  GPTOSS_OK = 0,
  GPTOSS_EARG = 1,     /* bad argument: a programming error of the caller */
  GPTOSS_EIO = 2,      /* open/read/write/mmap/rename failed */
  GPTOSS_EFORMAT = 3,  /* a file's contents are invalid */
  GPTOSS_ENOMEM = 4,   /* host or device memory exhausted */
  GPTOSS_ERANGE = 5,   /* a position, id or size past a limit */
  GPTOSS_EDEVICE = 6,  /* a CUDA or backend failure */
  GPTOSS_ESTATE = 7,   /* object closed or in the wrong state */
  GPTOSS_EUNSUP = 8,   /* valid input that this build does not support */
  GPTOSS_EBUSY = 9     /* a queue is full: try again later (a server's HTTP 429) */
} gptoss_status;

const char *gptoss_errmsg(void);           /* message of this thread's last failure */
gptoss_status gptoss_errcode(void);        /* code of this thread's last failure */
/* }====================================================== */

/* {====================================================== dtypes */
/* Same order as the safetensors crate: tensors are laid out by dtype
   descending, then by name, and this enum's order decides that. */
typedef enum gptoss_dtype {
  GPTOSS_BOOL, GPTOSS_U8, GPTOSS_I8, GPTOSS_F8_E5M2, GPTOSS_F8_E4M3,
  GPTOSS_I16, GPTOSS_U16, GPTOSS_F16, GPTOSS_BF16, GPTOSS_I32, GPTOSS_U32,
  GPTOSS_F32, GPTOSS_F64, GPTOSS_I64, GPTOSS_U64,
  GPTOSS_DTYPE_COUNT
} gptoss_dtype;

const char *gptoss_dtype_name(gptoss_dtype t);
int gptoss_dtype_from_name(const char *name);     /* -1 when unknown */
size_t gptoss_dtype_size(gptoss_dtype t);
/* }====================================================== */

/* {====================================================== safetensors */
#define GPTOSS_MAX_DIMS 8

typedef struct gptoss_tensor {
  const char *name;
  gptoss_dtype dtype;
  int ndim;
  int64_t shape[GPTOSS_MAX_DIMS];
  const void *data;        /* points into the mapping: no copy */
  size_t nbytes;
  const char *file;        /* the file it was read from */
} gptoss_tensor;

typedef struct gptoss_st gptoss_st;  /* a set of mapped safetensors files */

/* path: a .safetensors file, a model.safetensors.index.json, or a directory
   holding either model.safetensors.index.json or model.safetensors. */
gptoss_status gptoss_st_open(const char *path, gptoss_st **out);
size_t gptoss_st_count(const gptoss_st *st);
const gptoss_tensor *gptoss_st_at(const gptoss_st *st, size_t i);
const gptoss_tensor *gptoss_st_find(const gptoss_st *st, const char *name);
/* "__metadata__" entry of the (first) file, or NULL */
const char *gptoss_st_metadata(const gptoss_st *st, const char *key);
void gptoss_st_free(gptoss_st *st);

/* Writer: tensors are declared first, then the file is written in the
   safetensors crate's layout to "<path>.tmp-XXXXXX" and renamed into place
   by commit, so no reader ever sees a half-written file. */
typedef struct gptoss_st_writer gptoss_st_writer;

typedef enum gptoss_fill_kind {
  GPTOSS_FILL_DATA,        /* copy of caller bytes */
  GPTOSS_FILL_NORMAL,      /* a + b * N(0,1), for float dtypes */
  GPTOSS_FILL_UNIFORM,     /* uniform in [a, b), float dtypes; ints in [a, b] */
  GPTOSS_FILL_CONST        /* every element = a */
} gptoss_fill_kind;

typedef struct gptoss_fill {
  gptoss_fill_kind kind;
  double a, b;
  uint64_t seed;           /* random fills are a pure function of (seed, element index) */
  const void *data;        /* GPTOSS_FILL_DATA: nbytes of it are copied at add time */
  size_t nbytes;
} gptoss_fill;

gptoss_status gptoss_stw_new(const char *path, gptoss_st_writer **out);
gptoss_status gptoss_stw_add(gptoss_st_writer *w, const char *name, gptoss_dtype dtype,
                             int ndim, const int64_t *shape, const gptoss_fill *fill);
gptoss_status gptoss_stw_metadata(gptoss_st_writer *w, const char *key, const char *value);
uint64_t gptoss_stw_data_bytes(const gptoss_st_writer *w);
gptoss_status gptoss_stw_commit(gptoss_st_writer *w, int threads);
void gptoss_stw_free(gptoss_st_writer *w);  /* without commit: nothing is left on disk */
/* }====================================================== */

/* {====================================================== config */
#define GPTOSS_MAX_LAYERS 256
#define GPTOSS_MAX_EOS 8

typedef struct gptoss_config {
  int hidden_size, intermediate_size, num_hidden_layers;
  int num_attention_heads, num_key_value_heads, head_dim;
  int num_local_experts, num_experts_per_tok;
  int vocab_size, sliding_window;
  int max_position_embeddings, initial_context_length;
  double rope_theta;
  int rope_yarn;                       /* 0: plain RoPE, 1: YaRN */
  double rope_factor, rope_beta_fast, rope_beta_slow;
  int rope_original_max_position_embeddings, rope_truncate;
  double swiglu_limit, rms_norm_eps;
  int eos_token_ids[GPTOSS_MAX_EOS], n_eos;
  int pad_token_id, bos_token_id;      /* -1 when absent */
  int tie_word_embeddings;
  int experts_mxfp4;                   /* the experts' layout: 1: MXFP4 _blocks and _scales (what
                                          quantization_config mxfp4 announces), 0: bf16 gate_up_proj and
                                          down_proj; a loaded model's is the layout its tensors have */
  unsigned char layer_sliding[GPTOSS_MAX_LAYERS];
} gptoss_config;

/* Parses and validates a config.json text; `where` names it in errors. */
gptoss_status gptoss_config_parse(const char *json, size_t len, const char *where,
                                  gptoss_config *out);
gptoss_status gptoss_config_load(const char *path, gptoss_config *out);
/* Serialises the config in the Hugging Face config.json form. Caller frees. */
char *gptoss_config_to_json(const gptoss_config *c);
/* Validates a config built in memory (also used by the parser). */
gptoss_status gptoss_config_check(const gptoss_config *c, const char *where);
/* }====================================================== */

/* {====================================================== model description */
typedef enum gptoss_role {
  GPTOSS_T_EMBED, GPTOSS_T_NORM, GPTOSS_T_LM_HEAD,
  GPTOSS_T_ATTN_NORM, GPTOSS_T_Q_W, GPTOSS_T_Q_B, GPTOSS_T_K_W, GPTOSS_T_K_B,
  GPTOSS_T_V_W, GPTOSS_T_V_B, GPTOSS_T_O_W, GPTOSS_T_O_B, GPTOSS_T_SINKS,
  GPTOSS_T_MLP_NORM, GPTOSS_T_ROUTER_W, GPTOSS_T_ROUTER_B,
  GPTOSS_T_GU_BLOCKS, GPTOSS_T_GU_SCALES, GPTOSS_T_GU_BIAS,
  GPTOSS_T_DN_BLOCKS, GPTOSS_T_DN_SCALES, GPTOSS_T_DN_BIAS,
  GPTOSS_T_ROLE_COUNT
} gptoss_role;
#define GPTOSS_T_LAYER_FIRST GPTOSS_T_ATTN_NORM
#define GPTOSS_T_PER_LAYER (GPTOSS_T_ROLE_COUNT - GPTOSS_T_LAYER_FIRST)

typedef struct gptoss_tensor_spec {
  char name[80];
  gptoss_dtype dtype;
  int ndim;
  int64_t shape[4];
  gptoss_role role;
  int layer;                /* -1 for global tensors */
} gptoss_tensor_spec;

/* The tensors a gpt-oss checkpoint of this config holds, in Hugging Face
   names and layout, in state-dict order (layers, then embed, norm, lm_head).
   Experts as c->experts_mxfp4 says: MXFP4 blocks [E][out][in/32][16] and
   scales [E][out][in/32] (roles GU/DN_BLOCKS and _SCALES), or bf16 matrices
   [E][in][out] as transformers holds unquantized gpt-oss, used as x @ W
   (roles GU_BLOCKS and DN_BLOCKS, no scales). */
gptoss_status gptoss_tensor_specs(const gptoss_config *c, gptoss_tensor_spec **out, size_t *n);
uint64_t gptoss_tensor_spec_bytes(const gptoss_tensor_spec *s);
/* }====================================================== */

/* {====================================================== tokenizer */
typedef struct gptoss_tokenizer gptoss_tokenizer;

gptoss_status gptoss_tokenizer_load(const char *path, gptoss_tokenizer **out);
void gptoss_tokenizer_free(gptoss_tokenizer *t);
int gptoss_tokenizer_vocab_size(const gptoss_tokenizer *t);   /* incl. specials */
int gptoss_tokenizer_n_ordinary(const gptoss_tokenizer *t);   /* mergeable ranks */

/* A growable id buffer owned by the caller. */
typedef struct gptoss_ids { int32_t *v; size_t n, cap; } gptoss_ids;
void gptoss_ids_free(gptoss_ids *ids);

enum {
  GPTOSS_ENC_SPECIAL = 1,   /* recognise special-token strings (all, or those allowed) */
  GPTOSS_ENC_BYTES = 2      /* accept invalid UTF-8 (bytes mode) */
};
/* allowed: NULL = every special when GPTOSS_ENC_SPECIAL; else a NULL-terminated
   list of special names. Appends to out. */
gptoss_status gptoss_encode(const gptoss_tokenizer *t, const char *text, size_t len,
                            int flags, const char *const *allowed, gptoss_ids *out);
/* Bytes of one token (specials give their name); NULL when out of range. */
const char *gptoss_token_bytes(const gptoss_tokenizer *t, int32_t id, size_t *len);
int32_t gptoss_special_id(const gptoss_tokenizer *t, const char *name);  /* -1 if none */
int gptoss_is_special(const gptoss_tokenizer *t, int32_t id);
/* }====================================================== */

/* {====================================================== constrained decoding */
/* A grammar in llama.cpp's GBNF (gbnf.c), compiled once and shared: matchers
   hold references (the _free functions drop one). Bad text fails with
   GPTOSS_EARG and a message naming the line, column and rule. */
typedef struct gptoss_grammar gptoss_grammar;
gptoss_status gptoss_grammar_parse(const char *text, size_t len, const char *root, gptoss_grammar **out);
gptoss_grammar *gptoss_grammar_ref(gptoss_grammar *g);
void gptoss_grammar_free(gptoss_grammar *g);

/* A vocabulary's token bytes as a trie, built once per tokenizer (ids
   0..vocab-1; special tokens are left out: a grammar never produces them). */
typedef struct gptoss_vocab gptoss_vocab;
gptoss_status gptoss_vocab_new(const gptoss_tokenizer *t, int vocab, gptoss_vocab **out);
gptoss_vocab *gptoss_vocab_ref(gptoss_vocab *v);
void gptoss_vocab_free(gptoss_vocab *v);
int gptoss_vocab_size(const gptoss_vocab *v);

/* Where one output stands in a grammar (grammar.c). end_ids are the tokens
   (stop tokens) allowed once the grammar is complete; accepting one ends
   the output. */
typedef struct gptoss_matcher gptoss_matcher;
gptoss_status gptoss_matcher_new(gptoss_grammar *g, gptoss_vocab *v, const int32_t *end_ids, int n_end,
                                 gptoss_matcher **out);
void gptoss_matcher_free(gptoss_matcher *m);
/* bits[(vocab + 31) / 32]: bit id set when the grammar allows token id next */
gptoss_status gptoss_matcher_mask(gptoss_matcher *m, uint32_t *bits);
/* computes the current state's mask ahead (into the matcher's cache of
   masks by state), for the next mask or apply to copy; *computed: 0 when
   it was there already */
gptoss_status gptoss_matcher_prepare(gptoss_matcher *m, int *computed);
/* sets the logits of the tokens the grammar forbids to -inf */
gptoss_status gptoss_matcher_apply(gptoss_matcher *m, float *logits);
int gptoss_matcher_allows(const gptoss_matcher *m, int32_t id);   /* by the last apply */
/* advances by a token (GPTOSS_EARG, state unchanged, when it is forbidden) or by raw bytes */
gptoss_status gptoss_matcher_accept(gptoss_matcher *m, int32_t id);
gptoss_status gptoss_matcher_accept_bytes(gptoss_matcher *m, const char *b, size_t n);
/* *ok = 1 when the grammar allows bytes b next (the state is left as it is) */
gptoss_status gptoss_matcher_would_accept(gptoss_matcher *m, const char *b, size_t n, int *ok);
int gptoss_matcher_accepting(const gptoss_matcher *m);   /* the grammar may end here */
int gptoss_matcher_ended(const gptoss_matcher *m);       /* an end id was accepted */
/* }====================================================== */

/* {====================================================== sampling */
typedef struct gptoss_sampling {
  float temperature;        /* 0 = greedy */
  int top_k;                /* 0 = off */
  float top_p;              /* 1 = off; in (0, 1] */
  float min_p;              /* 0 = off; in [0, 1] */
  float repetition_penalty; /* 1 = off; > 0 */
  float presence_penalty, frequency_penalty;  /* 0 = off */
  int penalty_window;       /* last N tokens of the session; 0 = whole history */
  uint64_t seed;
  int n_bias;
  const int32_t *bias_ids;
  const float *bias_values;
} gptoss_sampling;

void gptoss_sampling_default(gptoss_sampling *s);
gptoss_status gptoss_sampling_check(const gptoss_sampling *s, int vocab);

typedef struct gptoss_sampler gptoss_sampler;
gptoss_status gptoss_sampler_new(const gptoss_sampling *s, int vocab, gptoss_sampler **out);
void gptoss_sampler_free(gptoss_sampler *s);
int gptoss_sampler_vocab(const gptoss_sampler *s);   /* the vocabulary size it was made for */
/* Samples from logits[vocab] given the token history (for penalties). The
   logits array is used as scratch. */
int32_t gptoss_sampler_sample(gptoss_sampler *s, float *logits,
                              const int32_t *history, size_t n_history);
/* Constrains every later sample to what m allows (after bias and penalties,
   so no bias brings back a forbidden token) and advances m by each sampled
   id. The sampler owns m from here on; a backend that samples on its device
   hands constrained samplers to the host. */
void gptoss_sampler_constrain(gptoss_sampler *s, gptoss_matcher *m);
gptoss_matcher *gptoss_sampler_matcher(const gptoss_sampler *s);   /* NULL when free */
/* }====================================================== */

/* {====================================================== harmony-aware constraints */
/* Arms (arm.c): a grammar for the body of one kind of harmony message, so
   that a reply's analysis stays free while a call to a tool follows the
   tool's schema and the final answer the response's. The sampler reads the
   headers in the history it samples from (the prompt's too, so a header the
   prompt ends in counts as one the model wrote): when the history ends in
   the <|message|> that closes a header (the tokens after the last <|start|>,
   or from the history's start), the first arm whose channel or recipient
   the header names (as harmony's parser reads it) starts a fresh matcher;
   it masks every token up to and including one of its end ids, and the
   next header is read afresh (a reply may call several tools in turn).
   With no arm active, sampling is free.

   gptoss_headers holds what reading a header takes: every token's bytes
   (special tokens: their names, as the parser joins them) and the ids of
   <|start|>, <|message|> and the stop tokens, copied from a tokenizer so
   that a sampler on an engine's thread outlives it. Built once per
   tokenizer and shared (the _free function drops one reference). */
typedef struct gptoss_headers gptoss_headers;
gptoss_status gptoss_headers_new(const gptoss_tokenizer *t, int vocab, gptoss_headers **out);
gptoss_headers *gptoss_headers_ref(gptoss_headers *h);
void gptoss_headers_free(gptoss_headers *h);

/* A header as harmony's parser reads it (harmony.lua's parse_header, lenient):
   role NULL for one after <|start|> (its first word names the role), else
   the role the message is known to have. Returns 1 and the channel and
   recipient (NULL when it names none; they point into out->buf), or 0 when
   the parser refuses it or it is longer than GPTOSS_HEADER_MAX bytes. */
#define GPTOSS_HEADER_MAX 1024
typedef struct gptoss_header {
  const char *channel, *recipient;
  size_t channel_len, recipient_len;
  char buf[2 * GPTOSS_HEADER_MAX];
} gptoss_header;
int gptoss_headers_read(const gptoss_headers *h, const int32_t *ids, size_t n, const char *role, gptoss_header *out);

typedef struct gptoss_arm {
  const char *channel;      /* the message's channel ("final"), or NULL: any */
  const char *recipient;    /* its recipient ("functions.get_weather"), or NULL: any; one of the two is needed */
  gptoss_grammar *grammar;  /* referenced by the sampler */
  const int32_t *end_ids;   /* what may end the message once the grammar is complete (>= 1 of them) */
  int n_end;
} gptoss_arm;
/* Adds an arm (tried in the order added); h and v are referenced, and must
   be for the sampler's vocabulary, h the same for every arm. GPTOSS_EARG on
   a sampler under a matcher (gptoss_sampler_constrain drops the arms). */
gptoss_status gptoss_sampler_arm(gptoss_sampler *s, gptoss_headers *h, gptoss_vocab *v, const gptoss_arm *arm);
int gptoss_sampler_armed(const gptoss_sampler *s);   /* the arm part-way through a message (0-based), -1: none */
/* a matcher or arms: the sampler must see the history and run on the host */
int gptoss_sampler_constrained(const gptoss_sampler *s);
/* For computing a constrained sampler's next mask ahead, on another thread
   while the logits are computed (the engine does). gptoss_sampler_draws:
   samples drawn so far; gptoss_sampler_prepare computes the mask the next
   draw will take (its grammar's, or its active arm's), unless a draw
   happened since `draws` (then there is nothing to do): 1 when it
   computed one (0: nothing to do, or the mask was known already).
   The two threads are ordered by the sampler's lock. */
uint64_t gptoss_sampler_draws(gptoss_sampler *s);
int gptoss_sampler_prepare(gptoss_sampler *s, uint64_t draws);
/* }====================================================== */

/* {====================================================== model and sessions */
typedef struct gptoss_model gptoss_model;
typedef struct gptoss_session gptoss_session;

/* How the CUDA backend rounds (the CPU computes in fp32 whichever is asked) */
typedef enum gptoss_precision {
  GPTOSS_PRECISION_EXACT = 0,  /* the default: every GEMM input split into two bf16 terms, fp32 KV cache;
                                  the CPU's tokens */
  GPTOSS_PRECISION_MIXED,      /* as exact for inference; LoRA training takes plain bf16 past the routing
                                  (the loss head, the recompute's expert products, the backward's products
                                  but attention's): what decides each token's experts stays split */
  GPTOSS_PRECISION_FAST        /* plain bf16 GEMM inputs everywhere, fp16 KV cache */
} gptoss_precision;

typedef struct gptoss_model_opts {
  const char *device;      /* "cpu" (default) or "cuda[:N]" */
  int threads;             /* CPU threads; 0 = number of cores */
  int context;             /* max tokens per session; 0 = min(max_position_embeddings, 8192) */
  size_t memory_budget;    /* CUDA: bytes the model may hold; 0 = 90% of free memory */
  gptoss_precision precision;   /* CUDA; 0 = GPTOSS_PRECISION_EXACT */
  int batch_invariant;     /* CUDA: a row's results never depend on what else is in its batch (the
                              engine's tokens equal a request's tokens alone), at some speed; the CPU
                              always is */
  /* called on the loading thread as the weights are read: bytes so far and
     in all (the CPU maps its checkpoint, so it reports them all at once; CUDA
     as it uploads). A nonzero return stops the load (GPTOSS_ESTATE) */
  int (*progress)(void *ud, uint64_t done, uint64_t total);
  void *progress_ud;
} gptoss_model_opts;

gptoss_status gptoss_model_load(const char *dir, const gptoss_model_opts *o, gptoss_model **out);
void gptoss_model_free(gptoss_model *m);
const gptoss_config *gptoss_model_config(const gptoss_model *m);
const gptoss_st *gptoss_model_weights(const gptoss_model *m);
const char *gptoss_model_device(const gptoss_model *m);
int gptoss_model_context(const gptoss_model *m);
/* The MXFP4 experts layer `layer` runs (which: 0 gate_up, 1 down) in the
   checkpoint's layout: the mapped bytes of an MXFP4 checkpoint, or what the
   load quantized a bf16 checkpoint's experts to (quantize.c). Fails when
   the host holds none (a CUDA model keeps quantized experts on the device). */
gptoss_status gptoss_model_mxfp4(const gptoss_model *m, int layer, int which, const gptoss_tensor **blocks,
                                 const gptoss_tensor **scales);

/* Loading off the caller's thread, for event loops (nginx, Neovim): the
   model, and the tokenizer at `tokenizer` when it is not NULL, load on a
   thread of the loader's own. The options' strings are copied; their
   progress callback is the loader's. */
typedef struct gptoss_loader gptoss_loader;
gptoss_status gptoss_loader_start(const char *dir, const gptoss_model_opts *o, const char *tokenizer, gptoss_loader **out);
/* a descriptor that becomes readable once the load has ended */
int gptoss_loader_fd(const gptoss_loader *l);
/* bytes of weights read so far and in all (0 until known); 1 once the load has ended */
int gptoss_loader_progress(const gptoss_loader *l, uint64_t *done, uint64_t *total);
/* asks the load to stop at its next progress report (it ends GPTOSS_ESTATE "cancelled") */
void gptoss_loader_cancel(gptoss_loader *l);
/* waits for the end, then hands over the model and the tokenizer (NULL when
   none was asked), or fails with the load's own error; once */
gptoss_status gptoss_loader_take(gptoss_loader *l, gptoss_model **m, gptoss_tokenizer **t);
/* cancels, waits for the thread and frees whatever was not taken */
void gptoss_loader_free(gptoss_loader *l);

typedef struct gptoss_memory {
  uint64_t weights, kv, workspace, total, device_free, device_total;
  uint64_t host;   /* pinned host memory the device reads in place (CUDA: the
                      untied embedding table), not counted in total */
} gptoss_memory;
void gptoss_model_memory(const gptoss_model *m, gptoss_memory *out);

typedef struct gptoss_session_opts {
  int context;             /* 0 = the model's */
  int rewind;              /* how many positions a rewind may go back past the
                              sliding window; sliding layers keep window+rewind
                              (gptoss_session_new takes 0 as it is: a ring of
                              window + 1, passes of one token) */
} gptoss_session_opts;
/* A session's rewind when none is asked for (NULL opts, Lua's default).
   Besides the rewinds it allows, it bounds a pass: a sliding layer's ring
   must keep the window before a pass's first token while the pass writes
   its own keys, so one pass holds at most `rewind` tokens. 2,048 is the
   CUDA backend's pass, so a prompt of up to 2,048 tokens prefills in one
   pass (each expert's rows in the fewest tensor-core tiles; 1.39x the rate
   of passes of 512 on the H100). The cost, on the 20B in exact: 12 x 1,536
   more sliding-ring positions than 512 would keep (75 MB a session, only
   up to its context), and a workspace sized for the longer pass (0.85 GB
   against 0.33 after a 2,048-token prompt), so a load's memory budget that
   fitted passes of 512 may need `rewind = 512` sessions. The engine keeps
   512: its prefill chunks (chunk_tokens, 256 by default) fit in that. */
#define GPTOSS_SESSION_REWIND 2048

gptoss_status gptoss_session_new(gptoss_model *m, const gptoss_session_opts *o,
                                 gptoss_session **out);
void gptoss_session_free(gptoss_session *s);
int gptoss_session_pos(const gptoss_session *s);
int gptoss_session_context(const gptoss_session *s);
const int32_t *gptoss_session_history(const gptoss_session *s);
gptoss_status gptoss_session_fork(const gptoss_session *s, gptoss_session **out);
/* A new session holding s's first keep positions (0..pos; what a fork
   rewound to keep holds, the logits only when keep is pos), with o's
   context and rewind (NULL, or a rewind of 0: s's own), which may be
   smaller or larger than s's as long as they hold keep positions. What
   the engine grows a request's session with. ERANGE when keep is past
   what s holds or the window before it is no longer in s's sliding
   layers. */
gptoss_status gptoss_session_fork_at(const gptoss_session *s, const gptoss_session_opts *o, int keep,
                                     gptoss_session **out);
gptoss_status gptoss_session_rewind(gptoss_session *s, int pos);

typedef enum { GPTOSS_LOGITS_NONE, GPTOSS_LOGITS_LAST, GPTOSS_LOGITS_ALL } gptoss_logits_mode;
/* Runs n tokens through the model at the session's position. With
   GPTOSS_LOGITS_ALL, out receives n*vocab floats; with LAST, vocab floats. */
gptoss_status gptoss_session_feed(gptoss_session *s, const int32_t *ids, int n,
                                  gptoss_logits_mode mode, float *out);
/* Copies the logits of the last fed position (vocab floats). */
gptoss_status gptoss_session_logits(const gptoss_session *s, float *out);
/* Samples the next token from the logits of the last fed position. */
gptoss_status gptoss_session_sample(gptoss_session *s, gptoss_sampler *smp, int32_t *id);
/* One decode step for many sessions at once: feeds ids[i] to ss[i] and
   samples next[i] with smp[i]. */
gptoss_status gptoss_batch_step(gptoss_session **ss, int n, const int32_t *ids,
                                gptoss_sampler **smp, int32_t *next);

/* Expert routing trace: while enabled, every fed token records, per layer,
   its top-k experts and their weights. */
gptoss_status gptoss_session_trace(gptoss_session *s, int enable);
/* Copies the recorded trace: experts[t][layer][k], weights likewise;
   returns the number of traced tokens in *n. Buffers may be NULL to query. */
gptoss_status gptoss_session_trace_get(const gptoss_session *s, int32_t *experts,
                                       float *weights, int *n);
/* }====================================================== */

/* {====================================================== LoRA adapters */
/* A LoRA adapter in Hugging Face PEFT's format, held in fp32. A session
   with an adapter computes each targeted projection as
   y = W x + b + scale * B (A x). Adapters are shared: every session that
   uses one holds a reference, so freeing it while sessions use it is safe. */
typedef struct gptoss_adapter gptoss_adapter;
#define GPTOSS_LORA_MAX_RANK 1024
typedef enum {
  GPTOSS_LORA_Q, GPTOSS_LORA_K, GPTOSS_LORA_V, GPTOSS_LORA_O,
  GPTOSS_LORA_GU, GPTOSS_LORA_DN,    /* the experts' gate_up_proj and down_proj, one LoRA per expert */
  GPTOSS_LORA_MODULES
} gptoss_lora_module;
#define GPTOSS_LORA_ATTN_MODULES 4
/* For the experts, PEFT's ParamWrapper layout: A [experts*r][in] with
   expert e's rows e*r .. e*r+r-1, and B [out][r*experts] with expert e's
   rank-k column at k*experts + e. rk = r * experts (r for attention). */
typedef struct gptoss_lora {
  int r, rk, in, out;
  int experts;             /* 0 for an attention projection */
  float scale;             /* alpha / r, or alpha / sqrt(r) with rslora */
  float *A, *B;            /* A [rk][in], B [out][rk], row-major */
} gptoss_lora;
typedef struct gptoss_adapter_desc {
  int r, rslora, nlayers, modules;
  double alpha, dropout;
  size_t params;
} gptoss_adapter_desc;

/* dir: adapter_config.json + adapter_model.safetensors, as PEFT saves them */
gptoss_status gptoss_adapter_load(const char *dir, gptoss_adapter **out);
/* writes both files (each atomically); creates dir when missing */
gptoss_status gptoss_adapter_save(const gptoss_adapter *a, const char *dir);
/* the same in a layout: PEFT's (the experts as target_parameters, as
   gptoss_adapter_save writes) or Unsloth's (a Linear LoRA per expert,
   mlp.experts.{gate_up,down}_projs.E: what its gpt-oss port trains) */
typedef enum { GPTOSS_LAYOUT_PEFT = 0, GPTOSS_LAYOUT_UNSLOTH = 1 } gptoss_layout;
gptoss_status gptoss_adapter_save_layout(const gptoss_adapter *a, const char *dir, gptoss_layout layout);
void gptoss_adapter_free(gptoss_adapter *a);      /* drops one reference */
gptoss_adapter *gptoss_adapter_ref(gptoss_adapter *a);
void gptoss_adapter_info(const gptoss_adapter *a, gptoss_adapter_desc *out);
/* NULL when the adapter has no LoRA on that projection of that layer */
const gptoss_lora *gptoss_adapter_module(const gptoss_adapter *a, int layer, gptoss_lora_module m);
/* every module's layer and shapes fit the model */
gptoss_status gptoss_adapter_check(const gptoss_adapter *a, const gptoss_model *m);
/* A new adapter for training, in PEFT's layout. init 0 is PEFT's default
   (A Kaiming-uniform, B zero, so the model starts unchanged); init 1 draws B
   like A (for tests). modules: bit (1 << gptoss_lora_module) per projection;
   layers: NULL = every layer, else one flag per layer. */
typedef struct gptoss_lora_opts {
  int r;
  double alpha, dropout;
  int rslora, init;
  unsigned modules;
  const unsigned char *layers;
  uint64_t seed;
} gptoss_lora_opts;
gptoss_status gptoss_adapter_new(const gptoss_model *m, const gptoss_lora_opts *o, gptoss_adapter **out);
/* Loss of one sequence (CPU: fp32; CUDA: the model's precision): the sum over positions t >= 1
   with mask[t] of -log p(ids[t] | ids[<t]), in *loss, and their number in
   *count; adds d(loss)/d(LoRA weights) into the adapter's gradients. */
gptoss_status gptoss_lora_backward(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                   double *loss, int *count);
/* The same over several examples packed into one sequence: starts[0..ns)
   are the 0-based offsets where they begin (0 first, increasing). Each
   token attends to its own example's tokens alone and takes its RoPE
   position from its example's start, and an example's first token is no
   target, so the loss and gradients are those of the examples one by one
   (TRL's packing with position ids restarting per example). ns = 0: one. */
gptoss_status gptoss_lora_backward_packed(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                                          const int32_t *starts, int ns, double *loss, int *count);
/* The same loss without gradients (a forward pass in a session of its own;
   a = NULL: the base model), as evaluation needs it. */
gptoss_status gptoss_lora_loss(gptoss_model *m, gptoss_adapter *a, const int32_t *ids, const uint8_t *mask, int n,
                               double *loss, int *count);
void gptoss_adapter_zero_grad(gptoss_adapter *a);
/* the gradients summed so far for one module, shaped like its A and B;
   both NULL before the first backward or where the adapter has no LoRA */
void gptoss_adapter_grads(const gptoss_adapter *a, int layer, gptoss_lora_module m, float **gA, float **gB);
/* AdamW as torch.optim.AdamW, after scaling the gradients by grad_scale and
   clipping their total norm to max_grad_norm (0 = no clipping); *grad_norm
   gets the norm before clipping. It returns once the norm is known: the
   update itself then runs on a thread of its own, and every other call on
   the adapter (and any use of it by a model) waits for it to finish, so
   callers see the finished step; a CUDA backward overlaps it. */
typedef struct gptoss_adamw {
  double lr, beta1, beta2, eps, weight_decay, max_grad_norm, grad_scale;
  /* 1: the moments in 8 bits, as bitsandbytes' AdamW8bit (its blockwise
     optim_bits=8); the adapter's first step chooses for all later ones */
  int bits8;
} gptoss_adamw;
gptoss_status gptoss_adapter_step(gptoss_adapter *a, const gptoss_adamw *o, double *grad_norm);
int gptoss_adapter_steps(const gptoss_adapter *a);   /* optimizer steps taken */
/* what the adapter's optimizer state is kept for (NONE before its first
   step or a loaded state); *bytes (when not NULL): that state's size */
typedef enum gptoss_optim { GPTOSS_OPTIM_NONE, GPTOSS_OPTIM_ADAMW, GPTOSS_OPTIM_ADAMW_8BIT } gptoss_optim;
gptoss_optim gptoss_adapter_optim(const gptoss_adapter *a, size_t *bytes);
/* The 8-bit moments: bitsandbytes' dynamic map (create_dynamic_map: 256
   ascending float32 values; signed for exp_avg, unsigned for exp_avg_sq)
   and its blockwise quantization: per block of GPTOSS_Q8_BLOCK values an
   absmax (absmax[ceil(n / GPTOSS_Q8_BLOCK)]) and per value the code whose
   map value is nearest x / absmax (a block of zeros: codes 0). */
#define GPTOSS_Q8_BLOCK 256
const float *gptoss_dynamic_map(int is_signed);
void gptoss_quantize_blockwise(const float *x, size_t n, int is_signed, uint8_t *codes, float *absmax);
/* Whoever writes A or B other than through this API calls touch: a backend
   that keeps a device copy of the weights then knows to copy them again. */
void gptoss_adapter_touch(gptoss_adapter *a);
/* The optimizer state (AdamW moments and step count) in one safetensors
   file, written atomically: with the adapter's own files it makes a
   checkpoint that a resumed run continues exactly. Per module
   layers.L.<module>.lora_A / lora_B .exp_avg and .exp_avg_sq: F32 like
   the weight, or for the 8-bit AdamW U8 codes like the weight with
   <name>.absmax F32 [blocks] beside them, the maps as qmap1 (signed) and
   qmap2 (unsigned) and metadata optim = "adamw_8bit". Loading a state of
   the other kind than the adapter's moments fails. */
gptoss_status gptoss_adapter_save_state(const gptoss_adapter *a, const char *path);
/* Writes out_dir: the model's checkpoint with the adapter merged into its
   projections, W' = bf16(W + scale B A), every other tensor and file copied.
   With expert LoRAs the experts cannot stay MXFP4 (it would round the delta
   away): every expert matrix goes out merged in bf16 as transformers holds
   unquantized gpt-oss ([E][in][out] mlp.experts.gate_up_proj and down_proj),
   config.json without quantization_config and the index renamed to match.
   That checkpoint is for transformers, vLLM and the like: gptoss runs MXFP4
   experts only and says so when asked to load it. The directory appears
   whole (built under a temporary name, then renamed); out_dir must not
   exist yet. */
gptoss_status gptoss_adapter_merge(const gptoss_model *m, const gptoss_adapter *a, const char *out_dir, int threads);
/* dst's LoRA weights become src's: same layers, modules and shapes */
gptoss_status gptoss_adapter_copy_weights(gptoss_adapter *dst, const gptoss_adapter *src);
gptoss_status gptoss_adapter_load_state(gptoss_adapter *a, const char *path);

/* a = NULL: the base model. The session's cache is not recomputed: switch
   adapters on an empty session, or after a rewind to 0, for clean results. */
gptoss_status gptoss_session_set_adapter(gptoss_session *s, gptoss_adapter *a);
/* }====================================================== */

/* {====================================================== serving engine */
/* Continuous batching on a thread of its own (engine.c). While an engine
   runs it owns its model: nothing else may call into the model, its
   sessions or an adapter's training on it until gptoss_engine_stop. Every
   other function here may be called from any thread and never waits for a
   forward pass. */
typedef struct gptoss_engine gptoss_engine;
typedef struct gptoss_request gptoss_request;

typedef struct gptoss_engine_opts {
  int max_batch;           /* requests decoding together; 0 = 64 */
  int max_queue;           /* requests waiting for admission; beyond it submit fails with GPTOSS_EBUSY; 0 = 1024 */
  int chunk_tokens;        /* prompt tokens one step feeds across all prefills; 0 = 256 */
  uint64_t kv_budget;      /* bytes of KV cache for active and cached sessions (see gptoss_engine_kv_bytes);
                              0 = half the free device memory, or a quarter of the host's */
  int context;             /* positions per session; 0 = the model's */
  int prefix_cache;        /* finished sessions kept for prefix reuse; 0 = 16, < 0 = none */
  int rewind;              /* the sessions' rewind allowance (gptoss_session_opts); 0 = 512 */
  int kv_block;            /* positions a request's session is sized and grown by: it opens with room for its
                              prompt and one block more (or all it can reach, if less) and grows as it
                              generates; 0 = 256 */
} gptoss_engine_opts;

typedef struct gptoss_request_opts {
  int max_tokens;          /* > 0 */
  const int32_t *stop_ids; /* a sampled id among these ends the request (it is kept) */
  int n_stop;
  gptoss_adapter *adapter; /* referenced while the request lives; NULL = the base model */
  int priority;            /* higher is admitted first; equal ones in order of submission */
  int logprobs;            /* nonzero: record each sampled token's log-probability (gptoss_request_take_logprobs) */
  int top_logprobs;        /* 0..GPTOSS_MAX_TOP_LOGPROBS most likely tokens recorded beside it; needs logprobs */
} gptoss_request_opts;

/* Log-probabilities are the model's own: log_softmax of the raw logits at
   the position the token was sampled from, before temperature, penalties,
   logit_bias and truncation change the distribution (vLLM's default,
   logprobs_mode "raw_logprobs"), so that they do not depend on how a
   request samples. Computed on the host after the step, only for the
   requests that ask. */
#define GPTOSS_MAX_TOP_LOGPROBS 20
typedef struct gptoss_logprob {
  int32_t id;
  float logprob;
} gptoss_logprob;
typedef struct gptoss_token_logprobs {
  gptoss_logprob token;                          /* the sampled one */
  int n_top;                                     /* the request's top_logprobs */
  gptoss_logprob top[GPTOSS_MAX_TOP_LOGPROBS];   /* most likely first; equal ones by id */
} gptoss_token_logprobs;

enum { GPTOSS_REQ_QUEUED, GPTOSS_REQ_RUNNING, GPTOSS_REQ_DONE };
enum { GPTOSS_FINISH_NONE, GPTOSS_FINISH_STOP, GPTOSS_FINISH_LENGTH, GPTOSS_FINISH_CANCELLED, GPTOSS_FINISH_ERROR };

typedef struct gptoss_request_info {
  int state, finish;       /* GPTOSS_REQ_*, GPTOSS_FINISH_* */
  int prompt_tokens;
  int cached_tokens;       /* prompt tokens whose KV came from the prefix cache */
  int generated;           /* tokens produced so far */
  size_t left;             /* produced but not taken yet */
  double queued_s, first_token_s, finished_s;   /* seconds from submit; -1 until known */
  char error[256];         /* GPTOSS_FINISH_ERROR's message */
} gptoss_request_info;

typedef struct gptoss_engine_stats {
  int queued, active, cached_sessions, max_batch, max_queue, chunk_tokens;
  uint64_t kv_budget, kv_active, kv_cached;   /* bytes: budgeted for active requests, held by the prefix cache */
  uint64_t submitted, completed, cancelled, failed;
  uint64_t prompt_tokens, prefill_tokens;     /* submitted, and computed (the rest came from the cache) */
  uint64_t prefix_hits, prefix_tokens, generated_tokens, steps;
  double busy_s, uptime_s, tokens_per_s;      /* tokens_per_s: generated per second of forward passes */
  /* training jobs: submitted, waiting or running, examples run, tokens
     fed, seconds of training passes */
  uint64_t train_jobs, train_examples, train_tokens;
  int train_pending;
  double train_s;
  /* grammar masks computed ahead, while the forward pass ran (engine_masks.c),
     and the seconds spent on them */
  uint64_t masks_ahead;
  double masks_ahead_s;
  /* sessions grown (copied into larger ones) as their requests generated,
     and steps a request sat out because the budget had no room to grow it */
  uint64_t kv_grows, kv_waits;
} gptoss_engine_stats;

gptoss_status gptoss_engine_new(gptoss_model *m, const gptoss_engine_opts *o, gptoss_engine **out);
/* cancels what is left, stops the thread and frees the engine's sessions:
   the model is the caller's again. Requests stay valid (finished). */
void gptoss_engine_stop(gptoss_engine *e);
void gptoss_engine_free(gptoss_engine *e);   /* stop, and drop the caller's reference */
int gptoss_engine_running(const gptoss_engine *e);
/* readable (an eventfd on Linux, a pipe elsewhere) once any request has
   news; gptoss_engine_drain reads it empty and says whether it was signalled */
int gptoss_engine_fd(const gptoss_engine *e);
int gptoss_engine_drain(gptoss_engine *e);
/* blocks until the descriptor is signalled or timeout_s passed, then drains
   it; 1: some request has news (for scripts and worker threads) */
int gptoss_engine_wait(gptoss_engine *e, double timeout_s);
void gptoss_engine_stats_get(gptoss_engine *e, gptoss_engine_stats *out);
/* KV bytes the engine budgets for a session reaching that many positions
   (on a backend that allocates a session up front: what one of that
   capacity, in kv_block positions, takes when opened) */
uint64_t gptoss_engine_kv_bytes(const gptoss_engine *e, int positions);
/* Queues a request; smp is taken over (freed by the request, or now on
   failure). GPTOSS_EBUSY: the queue is full; GPTOSS_ENOMEM: the request
   alone exceeds the memory budget; GPTOSS_ERANGE: the prompt exceeds the
   engine's context; GPTOSS_ESTATE: the engine is stopped. */
gptoss_status gptoss_engine_submit(gptoss_engine *e, const int32_t *ids, int n, gptoss_sampler *smp,
                                   const gptoss_request_opts *o, gptoss_request **out);
/* Copies up to cap ids produced since the last take; info (may be NULL)
   gets the request's state. Never waits for the engine. */
size_t gptoss_request_take(gptoss_request *r, int32_t *ids, size_t cap, gptoss_request_info *info);
/* the same, and lps[i] (may be NULL) gets ids[i]'s log-probabilities when
   the request records them (submitted with logprobs; untouched otherwise) */
size_t gptoss_request_take_logprobs(gptoss_request *r, int32_t *ids, gptoss_token_logprobs *lps, size_t cap,
                                    gptoss_request_info *info);
/* blocks until the request has news or timeout_s passed; 1: news */
int gptoss_request_wait(gptoss_request *r, double timeout_s);
void gptoss_request_cancel(gptoss_request *r);   /* its memory is freed at the engine's next step */
void gptoss_request_free(gptoss_request *r);     /* cancels it unless done; drops the caller's reference */

/* Training between serving steps (engine_train.c). A job is a list of
   examples the engine thread runs one at a time, each a LoRA backward pass
   (or, with loss_only, the loss alone), between its serving steps: an
   example is the unit, so a request waits at most one example's pass for
   its next token. While requests are active, training takes at most
   `share` of the engine's time (0: only while no request is active); with
   none active it runs freely. Jobs run in order of submission, the first
   job's share governing. An adapter being trained must not also serve
   requests (their tokens would mix its versions): serve a copy
   (gptoss_adapter_copy_weights) and swap versions at request boundaries. */
typedef struct gptoss_train_job gptoss_train_job;
typedef struct gptoss_train_example {
  const int32_t *ids;
  const uint8_t *mask;     /* NULL: every position t >= 1 counts */
  int n;                   /* >= 2 */
  const int32_t *starts;   /* packed examples: as gptoss_lora_backward_packed takes them (ns = 0: one) */
  int ns;
} gptoss_train_example;
typedef struct gptoss_train_job_opts {
  int loss_only;           /* evaluate: gptoss_lora_loss per example, no gradients */
  int zero_grad;           /* zero the adapter's gradients before the first example */
  int step;                /* after the last example, gptoss_adapter_step with `adamw` */
  gptoss_adamw adamw;
  double share;            /* 0..1, see above */
} gptoss_train_job_opts;
typedef struct gptoss_train_job_info {
  int state, finish;       /* GPTOSS_REQ_*, GPTOSS_FINISH_* (STOP once every example ran) */
  int examples, done;      /* in the job, and run so far */
  double loss;             /* summed over the examples run */
  int64_t count, tokens;   /* target positions, and tokens fed */
  double grad_norm;        /* the step's, once done (with step) */
  double queued_s, train_s;   /* seconds waiting before its first example; seconds of passes */
  char error[256];
} gptoss_train_job_info;
/* The examples are copied; the adapter is referenced while the job lives.
   GPTOSS_ESTATE: the engine is stopped. */
gptoss_status gptoss_engine_train(gptoss_engine *e, gptoss_adapter *a, const gptoss_train_example *ex, int n,
                                  const gptoss_train_job_opts *o, gptoss_train_job **out);
void gptoss_train_job_info_get(gptoss_train_job *j, gptoss_train_job_info *out);
int gptoss_train_job_wait(gptoss_train_job *j, double timeout_s);   /* 1: done */
void gptoss_train_job_cancel(gptoss_train_job *j);   /* before its next example; the gradients so far stay */
void gptoss_train_job_free(gptoss_train_job *j);     /* cancels it unless done; drops the caller's reference */
/* }====================================================== */

/* {====================================================== misc */
int gptoss_cpu_count(void);
/* bf16 helpers shared by the CPU backend and the tools */
static inline float gptoss_bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } v; v.u = (uint32_t)h << 16; return v.f;
}
static inline uint16_t gptoss_f32_to_bf16(float f) {  /* round to nearest even */
  union { uint32_t u; float f; } v; v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* NaN */
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
/* }====================================================== */

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#ifdef __cplusplus
}
#endif
#endif
