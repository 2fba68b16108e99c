/*
** adapter_impl.h: the adapter object as its files share it: adapter.c
** (the object), peft.c (PEFT's files), optim.c (gradients and AdamW) and
** merge.c (merging into a checkpoint).
*/
#ifndef GPTOSS_ADAPTER_IMPL_H
#define GPTOSS_ADAPTER_IMPL_H

#include <cjson/cJSON.h>
#include "backend.h"

/* unsloth.c: Unsloth's per-expert layout. A tensor name's layer, module,
   expert and half (0: lora_A); whether a target_modules entry names its
   modules; reading its tensors into the engine's layout (after peft.c's
   own, into a->mod; rb: each module's B columns; *nlayers raised); writing
   one expert module's tensors; the config for a layout (1: Unsloth's) */
int gptoss_unsloth_name(const char *name, int *layer, int *mod, int *expert, int *ab);
int gptoss_unsloth_target(const char *s);
gptoss_status gptoss_unsloth_load(gptoss_adapter *a, gptoss_st *st, const char *wpath, int *rb, int *nlayers,
                                  gptoss_status (*to_f32)(const gptoss_tensor *, float *));
gptoss_status gptoss_unsloth_write(const gptoss_lora *x, int l, int m, gptoss_st_writer *w);
cJSON *gptoss_unsloth_config(const gptoss_adapter *a, int unsloth);

/* the modules any layer of a holds, a bit each (1u << gptoss_lora_module) */
unsigned gptoss_adapter_held(const gptoss_adapter *a);

/* PEFT's names of the modules, in gptoss_lora_module order */
extern const char *const gptoss_lora_names[GPTOSS_LORA_MODULES];

/* what training keeps beside a module's weights, shaped like its A and B */
typedef struct lora_train {
  float *gA, *gB;               /* gradients, NULL until the first backward */
  float *mA, *mB, *vA, *vB;     /* AdamW's moments, NULL until the first step */
  /* the 8-bit AdamW's moments instead (optim8.c), in the state file's
     order: A's exp_avg, A's exp_avg_sq, B's exp_avg, B's exp_avg_sq; each
     a code per weight and an absmax per block of GPTOSS_Q8_BLOCK */
  uint8_t *q8[4];
  float *absmax8[4];
} lora_train;

struct gptoss_adapter {
  int refs;
  int nlayers;                  /* 1 + the highest layer with a module */
  gptoss_lora *mod;             /* [nlayers][GPTOSS_LORA_MODULES]; r == 0: absent */
  lora_train *train;            /* [nlayers][GPTOSS_LORA_MODULES], beside mod */
  double alpha;
  int r, rslora;
  int steps;                    /* AdamW steps taken */
  gptoss_optim optim;           /* what the moments are kept for: the first step's (or a loaded state's) choice */
  int tp[2], ntp;               /* target_parameters in listed order (expert modules) */
  double dropout;               /* training only */
  uint64_t seed;
  cJSON *config;                /* adapter_config.json as read, written back by save */
  uint64_t version;             /* changes whenever A or B may have changed (see gptoss_adapter_touch) */
  struct update *update;        /* AdamW's update, once a step has run */
  /* each STEP_CHUNK chunk's sum of squares of the gradients (in step's
     chunk order), kept by gptoss_adapter_add_grads; gsq_ok[l]: layer l's
     are current, so step need not read them again (see optim.c) */
  double *gsq;
  unsigned char *gsq_ok;
  size_t *chunk0;               /* [nlayers * GPTOSS_LORA_MODULES]: each module's first chunk */
  size_t chunk0_total;          /* chunks in all */
};

/* adapter.c: an adapter with room for nlayers layers and no modules yet */
gptoss_adapter *gptoss_adapter_alloc(int nlayers);
double gptoss_lora_scale(double alpha, int r, int rslora);
/* refuses a scale so large that the LoRA's term overflows fp32 activations */
gptoss_status gptoss_lora_check_scale(const char *where, double alpha, int r, int rslora);
/* peft.c: PEFT's adapter_config.json for a new adapter */
cJSON *gptoss_peft_new_config(const gptoss_model *m, const gptoss_lora_opts *o);
/* optim.c: stops the update's thread and frees the optimizer's state */
void gptoss_optim_free(gptoss_adapter *a);

/* optim8.c: AdamW with 8-bit moments, as bitsandbytes' AdamW8bit. Its
   step's constants, in float as bitsandbytes' kernel takes them: */
typedef struct adamw8_step {
  float beta1, beta2, gs;       /* gs: grad_scale times the clipping coefficient */
  float step_size;              /* -lr sqrt(1 - beta2^t) / (1 - beta1^t) */
  float eps;                    /* eps sqrt(1 - beta2^t) */
  float decay;                  /* 1 - lr weight_decay; 1 when weight_decay is 0 */
} adamw8_step;
void gptoss_adamw8_prepare(adamw8_step *c, const gptoss_adamw *o, float gs, int step);
/* weights p[lo, lo + n) of module t's A (w 0) or B (w 1), lo a multiple of GPTOSS_Q8_BLOCK */
void gptoss_adamw8_span(float *p, const float *g, lora_train *t, int w, size_t lo, size_t n, const adamw8_step *c);
/* the 8-bit moments of a module with nA weights in A and nB in B (zeros: codes 0, absmax 0) */
gptoss_status gptoss_adamw8_alloc(lora_train *t, size_t nA, size_t nB);
size_t gptoss_q8_blocks(size_t n);

#endif
