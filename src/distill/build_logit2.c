/* build_logit2.c - loss table rows for the second family of logit losses:
 * mlkd and ctkd (ops in logit2.c), rlkd (op in rank.c).
 *
 * mlkd(temps, instance, batch, class, standardize): one kd_mlkd node per
 * temperature, summed. `temps` is a range "lo-hi" (lo, lo+1, ... up to hi;
 * the default 2-6 is the paper's {2,3,4,5,6}), a list "2_4_8.5" ('_'
 * separates, since ',' separates arguments) or one number. standardize=1
 * standardises the logits of the instance level only (the KL terms): the
 * batch and class Grams stay on the raw logits, as in the MLKD of Sun et
 * al.'s logit-standardisation code (its kd_loss takes logit_stand, its
 * bc_loss and cc_loss do not). Left out of the paper's recipe, deliberately:
 *   - the strong-augmentation branch (the student and teacher also see a
 *     strongly augmented view, and its losses are added): a data-pipeline
 *     choice, not a loss; a distiller that feeds such a view can add a
 *     second term;
 *   - the confidence masks (rows, and classes, at or below the median of
 *     the teacher's confidence). In the authors' code each level's loss is
 *     reduced to a scalar (reduce=True) before it is multiplied by the 0/1
 *     mask and averaged, so the mask only scales the term by the kept
 *     fraction (a little over 1/2); `weight` covers that.
 *
 * ctkd(tmin, tmax, t0, lambda_max, curriculum): T = tmin + (tmax - tmin) *
 * sigmoid(theta0 + x), x a zero-initialised parameter "ctkd<term>.temperature"
 * (outside the student's prefix: not in the student's checkpoint), reached
 * through a gradient reversal whose factor follows the cosine curriculum
 *   lambda(epoch) = lambda_max * (1 - cos(pi * min(epoch, curriculum) / curriculum)) / 2
 * (epoch 1-based as kd_loss_set_epoch gets it), so T ascends the loss while
 * the student descends it. The authors' code reaches the same factor by
 * another route: its reversal multiplies by lambda itself, and its
 * CosineDecay runs lambda from 0 to -1 (decay_max 0, decay_min -1,
 * decay_loops 10 in their CIFAR script, at 1-based epochs).
 * theta0 = 1 when t0=auto (the authors' nn.Parameter(ones(1))
 * with t_start=1, t_end=20: T starts at 1 + 20 sigmoid(1) = 15.62), else
 * logit((t0 - tmin) / (tmax - tmin)). Loss: kd_fkl_tnode, T^2 KL(p_t||p_s).
 * The instance-wise (MLP) temperature of the paper is not built.
 *
 * rlkd(k, tau): kd_rank_align, 1 - the soft Spearman correlation of the
 * student's and the teacher's logits on the union of their top-k ids
 * (Peng & Zhang, COLING 2025; docs/losses/rlkd.md). k is an integer in
 * [2, V] (V the logits' last dimension, known when the term is built), tau
 * > 0 the soft-rank temperature on the logits. No T: the ranks do not
 * depend on a temperature, and the soft ranks' dependence on the scale is
 * tau's. The paper adds it to a divergence, rank + divergence / 2 in the
 * authors' scripts: "rlkd + fkl(weight=0.5)".
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/build.h"

#define MLKD_MAX_TEMPS 16

static const kd_loss_def *row(const char *name) {
    const kd_loss_def *d = kd_loss_def_find(name);
    KD_ASSERT(d, "loss %s missing from the tables", name);
    return d;
}

/* temps=lo-hi | a_b_c | a -> temps[0..n) */
static kd_status parse_temps(kd_lctx *c, const char *v, float *temps, int *n) {
    const char *p = v, *bad = NULL;
    *n = 0;
    char *end;
    double a = strtod(p, &end);
    if (end == p) bad = "expected a number";
    if (!bad && *end == '-') {
        p = end + 1;
        double b = strtod(p, &end);
        if (end == p || *end)
            bad = "a range is lo-hi with numbers lo <= hi";
        else if (!(b >= a))
            bad = "a range needs lo <= hi";
        else if ((b - a) + 1 > MLKD_MAX_TEMPS)
            bad = "too many temperatures";
        for (double x = a; !bad && x <= b + 1e-9; x += 1.0) temps[(*n)++] = (float)x;
    } else {
        while (!bad) {
            if (*n == MLKD_MAX_TEMPS) {
                bad = "too many temperatures";
                break;
            }
            temps[(*n)++] = (float)a;
            if (!*end) break;
            if (*end != '_') {
                bad = "a list separates numbers with '_'";
                break;
            }
            p = end + 1;
            a = strtod(p, &end);
            if (end == p) bad = "expected a number after '_'";
        }
    }
    for (int i = 0; !bad && i < *n; i++)
        if (!(temps[i] >= 1e-3f && temps[i] <= 1e3f)) bad = "temperatures must lie in [0.001, 1000]";
    if (bad)
        return kd_errorf(KD_ECONFIG, "loss '%s': temps=%s: %s (e.g. temps=2-6, temps=1_2_4, temps=4; at most %d)",
                         c->term->name, v, bad, MLKD_MAX_TEMPS);
    return KD_OK;
}

static kd_status b_mlkd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = row("mlkd");
    float wi, wb, wc, st, temps[MLKD_MAX_TEMPS];
    int nt = 0;
    char v[64];
    kd_status rc = kd_lneed_teacher(c);
    if (rc == KD_OK) {
        snprintf(v, sizeof v, "%s", kd_larg_str(c, d, "temps"));
        rc = parse_temps(c, v, temps, &nt);
    }
    if (rc == KD_OK) rc = kd_larg_float(c, d, "instance", 0, 1e4, &wi);
    if (rc == KD_OK) rc = kd_larg_float(c, d, "batch", 0, 1e4, &wb);
    if (rc == KD_OK) rc = kd_larg_float(c, d, "class", 0, 1e4, &wc);
    if (rc == KD_OK) rc = kd_larg_float(c, d, "standardize", 0, 1, &st);
    if (rc != KD_OK) return rc;
    kd_node *s = c->in->s_logits, *t = c->in->t_logits, *zs = s, *zt = t;
    if (st != 0.0f) { /* the instance level only, as Sun et al.'s MLKD */
        zs = kd_standardize(c->g, s);
        zt = kd_standardize(c->g, t);
    }
    kd_node *sum = NULL;
    for (int i = 0; i < nt; i++) {
        kd_node *n;
        if (st != 0.0f)
            n = kd_add(c->g, kd_mlkd(c->g, zs, zt, c->in->mask, temps[i], wi, 0.0f, 0.0f),
                       kd_mlkd(c->g, s, t, c->in->mask, temps[i], 0.0f, wb, wc));
        else
            n = kd_mlkd(c->g, s, t, c->in->mask, temps[i], wi, wb, wc);
        sum = sum ? kd_add(c->g, sum, n) : n;
    }
    *out = sum;
    return KD_OK;
}

/* kd_loss_set_epoch's hook: the reversal factor's cosine curriculum.
 * sched_arg: lambda_max, curriculum (epochs) */
static void ctkd_sched(kd_built_term *t, double epoch) {
    double lmax = t->sched_arg[0], E = t->sched_arg[1];
    double f = E > 0.0 ? 0.5 * (1.0 - cos(M_PI * fmin(fmax(epoch, 0.0), E) / E)) : 1.0;
    t->sched_node->fp[0] = (float)(lmax * f);
}

static kd_status b_ctkd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = row("ctkd");
    float lo, hi, lmax, E, t0 = 0.0f;
    kd_status rc = kd_lneed_teacher(c);
    if (rc == KD_OK) rc = kd_larg_float(c, d, "tmin", 1e-3, 1e3, &lo);
    if (rc == KD_OK) rc = kd_larg_float(c, d, "tmax", 1e-3, 1e3, &hi);
    if (rc == KD_OK && !(lo < hi))
        rc = kd_errorf(KD_ECONFIG, "loss '%s': tmin=%g must be below tmax=%g", c->term->name, (double)lo, (double)hi);
    if (rc == KD_OK) rc = kd_larg_float(c, d, "lambda_max", 0, 1e3, &lmax);
    if (rc == KD_OK) rc = kd_larg_float(c, d, "curriculum", 0, 1e6, &E);
    int aut = rc == KD_OK && strcmp(kd_larg_str(c, d, "t0"), "auto") == 0;
    if (rc == KD_OK && !aut) {
        rc = kd_larg_float(c, d, "t0", lo, hi, &t0);
        if (rc == KD_OK && !(t0 > lo && t0 < hi))
            rc = kd_errorf(KD_ECONFIG, "loss '%s': t0=%g must lie strictly between tmin=%g and tmax=%g (or t0=auto)",
                           c->term->name, (double)t0, (double)lo, (double)hi);
    }
    if (rc != KD_OK) return rc;
    double theta0 = 1.0;
    if (!aut) {
        double u = ((double)t0 - lo) / ((double)hi - lo);
        theta0 = log(u / (1.0 - u));
    }
    char name[64];
    snprintf(name, sizeof name, "ctkd%d.temperature", c->index);
    int one[1] = {1};
    kd_node *x = kd_param(c->g, name, 1, one, KD_INIT_ZERO, 1);
    kd_node *grl = kd_grad_reverse(c->g, x, lmax);
    kd_node *T = kd_sigmoid_range(c->g, grl, lo, hi, (float)theta0);
    kd_node_set_name(T, "ctkd%d.T", c->index);
    T->flags |= KD_F_KEEP; /* logged after backward */
    c->sched = ctkd_sched;
    c->sched_node = grl;
    c->sched_arg[0] = lmax;
    c->sched_arg[1] = E;
    *out = kd_fkl_tnode(c->g, c->in->s_logits, c->in->t_logits, T, c->in->mask);
    return KD_OK;
}

static kd_status b_rlkd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = row("rlkd");
    float tau;
    int k;
    kd_status rc = kd_lneed_teacher(c);
    if (rc == KD_OK && !c->in->s_logits)
        rc = kd_errorf(KD_ECONFIG, "loss '%s' needs the student's logits", c->term->name);
    if (rc != KD_OK) return rc;
    const kd_tensor *z = &c->in->s_logits->val;
    int V = z->shape[z->ndim - 1];
    if (V < 2)
        return kd_errorf(KD_ESHAPE, "loss '%s' ranks the logits of each row, and the rows hold only V=%d",
                         c->term->name, V);
    rc = kd_larg_int(c, d, "k", 2, V, &k);
    if (rc == KD_OK) {
        const char *v = kd_larg_str(c, d, "tau");
        char *end;
        double x = strtod(v, &end);
        if (end == v || *end || !isfinite(x))
            rc = kd_errorf(KD_ECONFIG, "loss '%s': tau=%s is not a number", c->term->name, v);
        else if (!(x > 0.0))
            rc = kd_errorf(KD_ECONFIG, "loss '%s': tau=%s must be > 0 (the soft-rank temperature)", c->term->name, v);
    }
    if (rc == KD_OK) rc = kd_larg_float(c, d, "tau", 1e-4, 1e4, &tau);
    if (rc != KD_OK) return rc;
    *out = kd_rank_align(c->g, c->in->s_logits, c->in->t_logits, c->in->mask, k, tau);
    return KD_OK;
}

const kd_loss_def kd_loss_defs_logit2[] = {
    {"mlkd", "temps=2-6 instance=1 batch=1 class=1 standardize=0",
     "multi-level logit KD (Jin et al. 2023): instance + batch + class alignment, summed over temps", b_mlkd, 1},
    {"ctkd", "tmin=1 tmax=21 t0=auto lambda_max=1 curriculum=10",
     "curriculum temperature KD (Li et al. 2023): learned T via gradient reversal", b_ctkd, 1},
    {"rlkd", "k=10 tau=1", "rank alignment of the top-k peaks, 1 - soft Spearman (Peng & Zhang 2025)", b_rlkd, 1},
    {NULL, NULL, NULL, NULL, 0},
};
