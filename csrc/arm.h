/*
** arm.h: the arms a sampler carries (arm.c), as sampler.c drives them.
*/
#ifndef GPTOSS_ARM_H
#define GPTOSS_ARM_H

#include "internal.h"

typedef struct gptoss_arms gptoss_arms;

/* what masks the next sample: m, the active arm's matcher; or, when it
   could not be made, that arm's end ids alone (the message ends); or
   neither (no arm active: free) */
typedef struct gptoss_arm_mask {
  gptoss_matcher *m;
  const int32_t *ends;
  int n_end;
} gptoss_arm_mask;

/* adds an arm to *A (made on the first), for a sampler of vocab ids */
gptoss_status gptoss_arms_add(gptoss_arms **A, gptoss_headers *h, gptoss_vocab *v, const gptoss_arm *arm, int vocab);
void gptoss_arms_free(gptoss_arms *A);
/* before a sample from hist[0..n): which arm is active, and its mask */
void gptoss_arms_begin(gptoss_arms *A, const int32_t *hist, size_t n, gptoss_arm_mask *out);
/* after it: the sampled id */
void gptoss_arms_end(gptoss_arms *A, int32_t id);
int gptoss_arms_active(const gptoss_arms *A);
/* the matcher of the arm under way, or NULL (for computing its next mask ahead) */
gptoss_matcher *gptoss_arms_matcher(const gptoss_arms *A);

#endif
