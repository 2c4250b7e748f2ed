/* kd_optim.h - optimisers over the graph's flat parameter array, learning-
 * rate schedules and gradient clipping. Semantics match torch.optim.SGD
 * (dampening 0) and torch.optim.AdamW; see docs/training.md. */
#ifndef KD_OPTIM_H
#define KD_OPTIM_H
#include "kd.h"

typedef enum kd_optim_kind { KD_OPTIM_SGD, KD_OPTIM_ADAMW } kd_optim_kind;
typedef enum kd_sched_kind { KD_SCHED_CONSTANT, KD_SCHED_COSINE, KD_SCHED_STEP } kd_sched_kind;

typedef struct kd_optim_cfg {
    kd_optim_kind kind;
    float lr;
    float momentum;
    int nesterov;
    float weight_decay;
    float beta1, beta2, eps;
    float clip; /* max global gradient norm; 0 = off */
    kd_sched_kind sched;
    float min_lr;          /* cosine floor */
    int64_t warmup_steps;  /* linear warm-up from lr/warmup to lr */
    int step_epochs;       /* step schedule: multiply by gamma every step_epochs epochs */
    float gamma;
} kd_optim_cfg;

typedef struct kd_optim {
    kd_optim_cfg cfg;
    size_t n;
    float *m, *v; /* momentum buffer / Adam moments */
    int64_t t;    /* updates done */
} kd_optim;

kd_optim *kd_optim_new(const kd_optim_cfg *cfg, size_t n);
void kd_optim_free(kd_optim *o);
/* One update of p (n) from g (n) with learning rate lr. */
void kd_optim_step(kd_optim *o, float *p, const float *g, float lr);
/* Learning rate for update number `step` (0-based) of `total` updates. */
float kd_schedule_lr(const kd_optim_cfg *cfg, int64_t step, int64_t total, int64_t steps_per_epoch);
/* Scales g so its L2 norm is at most max_norm; returns the norm before. */
float kd_clip_grad_norm(float *g, size_t n, float max_norm);

#endif
