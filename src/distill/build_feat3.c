/* build_feat3.c - loss table rows for the third family of feature losses:
 * freekd (frequency-band feature MSE on a one-level Haar transform), sokd
 * (feature MSE on the area both networks attend to, SoKD's distinctive-area
 * mask), unikd (several stages fused into one Gaussian per side, matched by
 * the closed-form KL) and ofa (auxiliary logit heads on student stages,
 * trained with KD against the teacher's logits). The ops are in feature3.c;
 * formulas, defaults and the choices made are in docs/losses/feature3.md.
 *
 * Lists of taps are written with '+' in one value: "s=block1+block2" (the
 * spec parser keeps '+' inside argument values).
 *
 * Trainable parts live outside the student's prefix, named after the term
 * number i (after the inputs' proj_prefix, if any): projectors "proj<i>..."
 * as fitnet; UniKD's heads "proj<i>.s.fuse/.s.mu/.s.logvar" and
 * "proj<i>.t.fuse/.t.mu/.t.logvar" (the teacher-side head is trained too)
 * and its anchor "proj<i>.t.readout"; OFA's heads "proj<i>.<k>" (k-th tap
 * of the list). None is part of the student's checkpoint or of inference.
 * What this file does not do: SoKD's learnable teacher-feature augmentation
 * (DAFA, a bi-level search; see the docs page for why).
 */
#include <math.h>
#include <string.h>

#include "distill/build.h"

#define MAX_LIST 8

/* "<proj_prefix>proj<index>", the stem of this term's parameter names (as kd_lproject) */
static const char *proj_base(const kd_lctx *c, char *buf, size_t n) {
    snprintf(buf, n, "%sproj%d", c->in->proj_prefix ? c->in->proj_prefix : "", c->index);
    return buf;
}

/* a feature as one vector per example: global average pooling of maps,
 * vectors as they are, anything else flattened */
static kd_node *pooled(kd_graph *g, kd_node *x) {
    if (x->val.ndim == 4) return kd_global_avgpool(g, x);
    return x->val.ndim == 2 ? x : kd_flatten(g, x);
}

/* the taps of model m named by the row's argument `side` ("s" or "t"), a
 * '+'-separated list of 1..MAX_LIST tap names ("feat" = the head's input) */
static kd_status tap_list(kd_lctx *c, const kd_loss_def *d, const kd_model *m, const char *side, kd_node **out,
                          int *n) {
    const char *who = side[0] == 's' ? "student" : "teacher";
    char list[64];
    snprintf(list, sizeof list, "%s", kd_larg_str(c, d, side)); /* kd_larg_str's buffer is reused */
    if (!m)
        return kd_errorf(KD_ECONFIG,
                         "loss '%s' needs the %s's feature taps, and there is no %s model here (a teacher cache "
                         "holds logits only)",
                         c->term->name, who, who);
    *n = 0;
    for (char *p = list;;) {
        char *e = strchr(p, '+');
        if (e) *e = '\0';
        if (!*p)
            return kd_errorf(KD_ECONFIG, "loss '%s': %s=%s has an empty tap name (write %s=block1+block2)",
                             c->term->name, side, kd_larg_str(c, d, side), side);
        if (*n == MAX_LIST)
            return kd_errorf(KD_ECONFIG, "loss '%s': %s= lists more than %d taps", c->term->name, side, MAX_LIST);
        kd_node *t = strcmp(p, "feat") == 0 ? m->feat : kd_model_tap(m, p);
        if (!t) {
            char known[512] = "feat";
            size_t k = strlen(known), pl = strlen(m->prefix);
            for (int i = 0; i < m->n_taps && k < sizeof known - 40; i++)
                k += (size_t)snprintf(known + k, sizeof known - k, ", %s", m->taps[i]->name + pl);
            return kd_errorf(KD_ECONFIG, "loss '%s': %s is not a tap of the %s '%s' (taps: %s)", c->term->name, p,
                             who, m->spec, known);
        }
        out[(*n)++] = t;
        if (!e) break;
        p = e + 1;
    }
    return KD_OK;
}

/* both taps are maps (N, C, H, W) with the same H and W */
static kd_status need_maps(kd_lctx *c, const kd_node *fs, const kd_node *ft) {
    if (fs->val.ndim == 4 && ft->val.ndim == 4 && fs->val.shape[2] == ft->val.shape[2] &&
        fs->val.shape[3] == ft->val.shape[3])
        return KD_OK;
    char shs[64], sht[64];
    kd_shape_str(fs->val.ndim, fs->val.shape, shs, sizeof shs);
    kd_shape_str(ft->val.ndim, ft->val.shape, sht, sizeof sht);
    return kd_errorf(KD_ESHAPE,
                     "loss '%s' needs feature maps (N, C, H, W) of the same height and width on both sides; "
                     "student %s, teacher %s",
                     c->term->name, shs, sht);
}

/* ---- freekd */

static kd_status b_freekd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("freekd");
    kd_node *fs, *ft, *y;
    float wl, wh;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_larg_float(c, d, "w_ll", 0, 1e4, &wl);
    if (st == KD_OK) st = kd_larg_float(c, d, "w_high", 0, 1e4, &wh);
    if (st == KD_OK) st = need_maps(c, fs, ft);
    if (st == KD_OK) st = kd_lproject(c, d, fs, ft, &y);
    if (st != KD_OK) return st;
    const float w[4] = {wl, wh, wh, wh}; /* LL, LH, HL, HH */
    *out = kd_band_mse(c->g, kd_haar2d(c->g, y), kd_haar2d(c->g, ft), 4, w);
    return KD_OK;
}

/* ---- sokd */

static kd_status b_sokd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("sokd");
    kd_node *fs, *ft, *y;
    float tau;
    int detach;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_larg_float(c, d, "tau", 1e-3, 1e3, &tau);
    if (st == KD_OK) st = kd_larg_int(c, d, "detach", 0, 1, &detach);
    if (st == KD_OK) st = need_maps(c, fs, ft);
    if (st == KD_OK) st = kd_lproject(c, d, fs, ft, &y);
    if (st != KD_OK) return st;
    /* the student's attention from its own feature, before the projector */
    *out = kd_masked_mse(c->g, y, ft, kd_attn_mask(c->g, fs, ft, tau, detach));
    return KD_OK;
}

/* ---- unikd */

/* one side's Gaussian: pooled taps, concatenated, fused by a linear layer
 * and a ReLU, then linear heads for the mean and the log-variance */
static void unikd_side(kd_lctx *c, const char *base, char side, kd_node **taps, int n, int dim, kd_node **mu,
                       kd_node **lv) {
    char p[96];
    kd_node *u = pooled(c->g, taps[0]);
    for (int k = 1; k < n; k++) u = kd_concat(c->g, u, pooled(c->g, taps[k]));
    snprintf(p, sizeof p, "%s.%c.fuse", base, side);
    kd_node *h = kd_relu(c->g, kd_dense(c->g, p, u, dim));
    snprintf(p, sizeof p, "%s.%c.mu", base, side);
    *mu = kd_dense(c->g, p, h, dim);
    snprintf(p, sizeof p, "%s.%c.logvar", base, side);
    *lv = kd_dense(c->g, p, h, dim);
}

static kd_status b_unikd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("unikd");
    kd_node *ts[MAX_LIST], *tt[MAX_LIST];
    int ns = 0, nt = 0, dim;
    float anchor;
    kd_status st = tap_list(c, d, c->in->student, "s", ts, &ns);
    if (st == KD_OK) st = tap_list(c, d, c->in->teacher, "t", tt, &nt);
    if (st == KD_OK) st = kd_larg_int(c, d, "dim", 1, 1 << 16, &dim);
    if (st == KD_OK) st = kd_larg_float(c, d, "anchor", 0, 1e4, &anchor);
    if (st == KD_OK && anchor > 0) st = kd_lneed_teacher(c);
    if (st != KD_OK) return st;
    if (anchor > 0 && c->in->t_logits->val.ndim != 2)
        return kd_errorf(KD_ESHAPE, "loss '%s': anchor= needs teacher logits (N, K); use anchor=0", c->term->name);
    char base[48];
    proj_base(c, base, sizeof base);
    kd_node *mus, *lvs, *mut, *lvt;
    unikd_side(c, base, 's', ts, ns, dim, &mus, &lvs);
    unikd_side(c, base, 't', tt, nt, dim, &mut, &lvt);
    kd_node *loss = kd_gauss_kl(c->g, mus, lvs, mut, lvt);
    if (anchor > 0) {
        /* keeps the teacher's Gaussian about the teacher: its mean must
         * predict the teacher's own outputs through a linear readout */
        char p[80];
        snprintf(p, sizeof p, "%s.t.readout", base);
        kd_node *r = kd_dense(c->g, p, mut, c->in->t_logits->val.shape[1]);
        kd_node *a = kd_divergence(c->g, r, c->in->t_logits, c->in->mask, KD_DIV_FKL, 1.0f, 0.0f, 1.0f);
        loss = kd_add(c->g, loss, anchor == 1.0f ? a : kd_scale(c->g, a, anchor));
    }
    *out = loss;
    return KD_OK;
}

/* ---- ofa */

static kd_status b_ofa(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("ofa");
    kd_node *ts[MAX_LIST];
    int n = 0;
    float T;
    kd_status st = kd_lneed_teacher(c);
    if (st == KD_OK) st = tap_list(c, d, c->in->student, "s", ts, &n);
    if (st == KD_OK) st = kd_larg_float(c, d, "T", 1e-3, 1e3, &T);
    if (st != KD_OK) return st;
    kd_node *tl = c->in->t_logits;
    if (tl->val.ndim != 2)
        return kd_errorf(KD_ESHAPE, "loss '%s' needs teacher logits (N, K)", c->term->name);
    char base[48], p[80];
    proj_base(c, base, sizeof base);
    kd_node *sum = NULL;
    for (int k = 0; k < n; k++) {
        snprintf(p, sizeof p, "%s.%d", base, k);
        kd_node *z = kd_dense(c->g, p, pooled(c->g, ts[k]), tl->val.shape[1]);
        kd_node *l = kd_divergence(c->g, z, tl, c->in->mask, KD_DIV_FKL, T, 0.0f, T * T);
        sum = sum ? kd_add(c->g, sum, l) : l;
    }
    *out = sum;
    return KD_OK;
}

const kd_loss_def kd_loss_defs_feat3[] = {
    {"freekd", "s=block2 t=block2 proj=auto bn=0 w_ll=1 w_high=0.5",
     "frequency-band KD: one-level Haar bands, band-weighted MSE (FreeKD, Zhang et al. 2024, simplified)", b_freekd,
     1},
    {"sokd", "s=block2 t=block2 proj=auto bn=0 tau=1 detach=1",
     "feature MSE on the area both attend to (SoKD's DAM, Shen et al. 2024)", b_sokd, 1},
    {"unikd", "s=block1+block2 t=block1+block2 dim=64 anchor=1",
     "fused stages -> Gaussian per side, KL(N_t || N_s) (UniKD, Huang et al. 2024)", b_unikd, 1},
    {"ofa", "s=block1+block2 T=1", "logit heads on student stages, KD vs the teacher (OFA, Hao et al. 2023)", b_ofa,
     1},
    {NULL, NULL, NULL, NULL, 0},
};
