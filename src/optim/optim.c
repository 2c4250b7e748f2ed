/* optim.c - SGD (momentum, Nesterov, weight decay) and AdamW over one flat
 * parameter array, schedules (constant, cosine per step, step decay, linear
 * warm-up) and clipping by global norm.
 *
 * SGD follows torch.optim.SGD with dampening 0: g += wd*p; buf = mu*buf + g;
 * g = nesterov ? g + mu*buf : buf; p -= lr*g. AdamW follows torch.optim.AdamW:
 * p *= 1 - lr*wd, then the bias-corrected Adam update. One loop each: the
 * parameters, gradients and moments are flat arrays (llm.c's layout).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_optim.h"

kd_optim *kd_optim_new(const kd_optim_cfg *cfg, size_t n) {
    kd_optim *o = kd_calloc(1, sizeof *o);
    o->cfg = *cfg;
    o->n = n;
    o->m = kd_calloc(n, sizeof(float));
    if (cfg->kind == KD_OPTIM_ADAMW) o->v = kd_calloc(n, sizeof(float));
    return o;
}

void kd_optim_free(kd_optim *o) {
    if (!o) return;
    free(o->m);
    free(o->v);
    free(o);
}

void kd_optim_step(kd_optim *o, float *p, const float *g, float lr) {
    const kd_optim_cfg *c = &o->cfg;
    size_t n = o->n;
    o->t++;
    if (c->kind == KD_OPTIM_SGD) {
        float mu = c->momentum, wd = c->weight_decay;
        float *buf = o->m;
#pragma omp parallel for if (n > 65536) schedule(static)
        for (size_t i = 0; i < n; i++) {
            float d = g[i] + wd * p[i];
            if (mu != 0.0f) {
                buf[i] = mu * buf[i] + d;
                d = c->nesterov ? d + mu * buf[i] : buf[i];
            }
            p[i] -= lr * d;
        }
    } else {
        float b1 = c->beta1, b2 = c->beta2;
        float bc1 = 1.0f - powf(b1, (float)o->t), bc2 = 1.0f - powf(b2, (float)o->t);
        float decay = 1.0f - lr * c->weight_decay;
        float *m = o->m, *v = o->v;
#pragma omp parallel for if (n > 65536) schedule(static)
        for (size_t i = 0; i < n; i++) {
            p[i] *= decay;
            m[i] = b1 * m[i] + (1.0f - b1) * g[i];
            v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
            float mh = m[i] / bc1, vh = v[i] / bc2;
            p[i] -= lr * mh / (sqrtf(vh) + c->eps);
        }
    }
}

float kd_schedule_lr(const kd_optim_cfg *c, int64_t step, int64_t total, int64_t steps_per_epoch) {
    if (c->warmup_steps > 0 && step < c->warmup_steps) return c->lr * (float)(step + 1) / (float)c->warmup_steps;
    switch (c->sched) {
    case KD_SCHED_CONSTANT: return c->lr;
    case KD_SCHED_COSINE: {
        int64_t span = total - c->warmup_steps, t = step - c->warmup_steps;
        if (span <= 0) return c->lr;
        double f = 0.5 * (1.0 + cos(M_PI * (double)t / (double)span));
        return c->min_lr + (c->lr - c->min_lr) * (float)f;
    }
    case KD_SCHED_STEP: {
        int64_t epoch = steps_per_epoch > 0 ? step / steps_per_epoch : 0;
        int k = c->step_epochs > 0 ? (int)(epoch / c->step_epochs) : 0;
        return c->lr * powf(c->gamma, (float)k);
    }
    }
    return c->lr;
}

float kd_clip_grad_norm(float *g, size_t n, float max_norm) {
    double ss = 0.0;
    for (size_t i = 0; i < n; i++) ss += (double)g[i] * g[i];
    float norm = (float)sqrt(ss);
    if (max_norm > 0.0f && norm > max_norm) {
        /* as torch.nn.utils.clip_grad_norm_: scale by max/(norm + 1e-6) */
        float s = max_norm / (norm + 1e-6f);
        for (size_t i = 0; i < n; i++) g[i] *= s;
    }
    return norm;
}
