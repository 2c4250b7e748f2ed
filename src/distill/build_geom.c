/* build_geom.c - loss table rows for geometry-aware alignment (procrustes,
 * gram, cka; Bhattarai et al. 2025) and DCD (discriminative and consistent
 * distillation, Giakoumoglou & Stathaki 2024). The ops are in geometry.c
 * and dcd.c; formulas, defaults and the choices made are in
 * docs/losses/geometry.md and docs/losses/dcd.md.
 *
 * procrustes, gram and cka compare the geometry of the two features of a
 * batch (widths may differ) and have no parameters. dcd trains, outside the
 * student's prefix and named after the term number i (after the inputs'
 * proj_prefix, if any): the student's linear head "proj<i>.embed_s" (to the
 * teacher's width when the widths differ, or to dim=), the teacher's head
 * "proj<i>.embed_t" (only with dim > 0, as CRD), and the scalars
 * "proj<i>.logit_scale" and "proj<i>.logit_bias" (stored as offsets from
 * their initial values: our parameters start at 0).
 */
#include <math.h>
#include <string.h>

#include "distill/build.h"

/* the taps, checked to be (B, ...) with the same B */
static kd_status feat_pair(kd_lctx *c, const kd_loss_def *d, kd_node **fs, kd_node **ft) {
    kd_status st = kd_ltaps(c, d, fs, ft);
    if (st != KD_OK) return st;
    char shs[64], sht[64];
    kd_shape_str((*fs)->val.ndim, (*fs)->val.shape, shs, sizeof shs);
    kd_shape_str((*ft)->val.ndim, (*ft)->val.shape, sht, sizeof sht);
    if ((*fs)->val.ndim < 2 || (*ft)->val.ndim < 2 || (*fs)->val.shape[0] != (*ft)->val.shape[0])
        return kd_errorf(KD_ESHAPE,
                         "loss '%s' needs student and teacher features (B, ...) with the same batch B; student %s, "
                         "teacher %s",
                         c->term->name, shs, sht);
    return KD_OK;
}

/* ---- geometry */

static kd_status b_procrustes(kd_lctx *c, kd_node **out) {
    kd_node *fs, *ft;
    kd_status st = feat_pair(c, kd_loss_def_of("procrustes"), &fs, &ft);
    if (st == KD_OK) *out = kd_procrustes(c->g, fs, ft);
    return st;
}

static kd_status b_gram(kd_lctx *c, kd_node **out) {
    kd_node *fs, *ft;
    kd_status st = feat_pair(c, kd_loss_def_of("gram"), &fs, &ft);
    if (st == KD_OK) *out = kd_gram_dist(c->g, fs, ft);
    return st;
}

static kd_status b_cka(kd_lctx *c, kd_node **out) {
    kd_node *fs, *ft;
    kd_status st = feat_pair(c, kd_loss_def_of("cka"), &fs, &ft);
    if (st == KD_OK) *out = kd_cka(c->g, fs, ft);
    return st;
}

/* ---- dcd */

static kd_status b_dcd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("dcd");
    kd_node *fs, *ft;
    int dim = 0;
    kd_dcd_args a = {0};
    kd_status st = feat_pair(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_larg_int(c, d, "dim", 0, 1 << 16, &dim);
    if (st == KD_OK) st = kd_larg_float(c, d, "weight_nce", 0, 1e4, &a.w_nce);
    if (st == KD_OK) st = kd_larg_float(c, d, "weight_kl", 0, 1e4, &a.w_kl);
    if (st == KD_OK) st = kd_larg_float(c, d, "init_logscale", -20, 20, &a.log_scale0);
    if (st == KD_OK) st = kd_larg_float(c, d, "init_bias", -1e3, 1e3, &a.bias0);
    if (st == KD_OK) st = kd_larg_float(c, d, "max_scale", 1e-3, 1e6, &a.max_scale);
    if (st != KD_OK) return st;
    const char *consist = kd_larg_str(c, d, "consist");
    if (strcmp(consist, "cross") == 0)
        a.consist = KD_DCD_CROSS;
    else if (strcmp(consist, "teacher") == 0)
        a.consist = KD_DCD_TEACHER;
    else
        return kd_errorf(KD_ECONFIG, "loss '%s': consist=%s is not one of cross, teacher", c->term->name, consist);
    if (exp((double)a.log_scale0) > a.max_scale)
        return kd_errorf(KD_ECONFIG,
                         "loss '%s': init_logscale=%g starts the scale at %g, above max_scale=%g (the clamp would "
                         "stop its gradient)",
                         c->term->name, a.log_scale0, exp((double)a.log_scale0), a.max_scale);
    char b[48], p[80];
    snprintf(b, sizeof b, "%sproj%d", c->in->proj_prefix ? c->in->proj_prefix : "", c->index);
    kd_node *xs = kd_lflat2(c->g, fs), *xt = kd_lflat2(c->g, ft);
    int Dt = xt->val.shape[1];
    if (dim > 0) {
        snprintf(p, sizeof p, "%s.embed_s", b);
        xs = kd_dense(c->g, p, xs, dim);
        snprintf(p, sizeof p, "%s.embed_t", b);
        xt = kd_dense(c->g, p, xt, dim);
    } else if (xs->val.shape[1] != Dt) {
        snprintf(p, sizeof p, "%s.embed_s", b);
        xs = kd_dense(c->g, p, xs, Dt);
    }
    kd_node *zs = kd_l2norm(c->g, xs), *zt = kd_l2norm(c->g, xt);
    int one = 1;
    snprintf(p, sizeof p, "%s.logit_scale", b);
    kd_node *theta = kd_param(c->g, p, 1, &one, KD_INIT_ZERO, 1);
    snprintf(p, sizeof p, "%s.logit_bias", b);
    kd_node *beta = kd_param(c->g, p, 1, &one, KD_INIT_ZERO, 1);
    *out = kd_dcd(c->g, zs, zt, theta, beta, &a);
    return KD_OK;
}

const kd_loss_def kd_loss_defs_geom[] = {
    {"procrustes", "s=feat t=feat",
     "Procrustes distance 2 - 2|Xt^T Xs|_* of centred unit-norm features (Bhattarai et al. 2025)", b_procrustes, 1},
    {"gram", "s=feat t=feat", "feature-Gram distance |Xt Xt^T - Xs Xs^T|_F, same features (Bhattarai et al. 2025)",
     b_gram, 1},
    {"cka", "s=feat t=feat", "1 - linear CKA of the centred features", b_cka, 1},
    {"dcd", "s=feat t=feat dim=0 weight_nce=1 weight_kl=1 consist=cross init_logscale=1 init_bias=0 max_scale=10",
     "DCD: InfoNCE with learned scale and bias + consistency KL (Giakoumoglou & Stathaki 2024)", b_dcd, 1},
    {NULL, NULL, NULL, NULL, 0},
};
