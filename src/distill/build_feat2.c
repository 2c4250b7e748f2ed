/* build_feat2.c - loss table rows for the second family of feature losses:
 * vid, crd (memory bank or in-batch), simkd and mm (Miles & Mikolajczyk's
 * projector recipe), plus the projector ensemble (proj_ensemble=M, Chen et
 * al. 2022) shared with fitnet. The ops are in feature2.c; formulas,
 * defaults and the choices made are in docs/losses/feature2.md.
 *
 * Trainable parts live outside the student's prefix, named after the term
 * number i (after the inputs' proj_prefix, if any): VID's regressor "proj<i>.0/.2/.4" (RepDistiller's Sequential
 * indices) and variances "proj<i>.log_scale"; CRD's heads "proj<i>.embed_s"
 * and "proj<i>.embed_t" (the teacher's head is trained, as in CRD);
 * projectors "proj<i>..." (an ensemble member m: "proj<i>e<m>...").
 * What this file does not do: fill CRD's "idx" input (the trainer does:
 * one float per row, the example's index in the training set).
 */
#include <math.h>
#include <string.h>

#include "distill/build.h"

/* "<proj_prefix>proj<index>", the stem of this term's parameter names (as kd_lproject) */
static const char *proj_base(const kd_lctx *c, char *buf, size_t n) {
    snprintf(buf, n, "%sproj%d", c->in->proj_prefix ? c->in->proj_prefix : "", c->index);
    return buf;
}

/* ---- projector ensemble */

kd_status kd_lproject_ensemble(kd_lctx *c, const kd_loss_def *d, kd_node *fs, kd_node *ft, kd_node **out) {
    int M;
    kd_status st = kd_larg_int(c, d, "proj_ensemble", 1, 16, &M);
    if (st != KD_OK) return st;
    if (M == 1) return kd_lproject(c, d, fs, ft, out);
    char base[48];
    proj_base(c, base, sizeof base);
    size_t bl = strlen(base);
    kd_node *sum = NULL;
    for (int m = 0; m < M; m++) {
        int n0 = kd_graph_n_nodes(c->g);
        kd_node *y;
        st = kd_lproject(c, d, fs, ft, &y);
        if (st != KD_OK) return st;
        if (y == fs)
            return kd_errorf(KD_ECONFIG, "loss '%s': proj_ensemble=%d needs a projector (proj=none, or auto with equal shapes)",
                             c->term->name, M);
        /* "proj3.weight" -> "proj3e1.weight": unique names per member */
        for (int i = n0; i < kd_graph_n_nodes(c->g); i++) {
            kd_node *v = kd_graph_node(c->g, i);
            if (strncmp(v->name, base, bl) == 0 && (v->name[bl] == '.' || v->name[bl] == '\0')) {
                char rest[96];
                snprintf(rest, sizeof rest, "%s", v->name + bl);
                kd_node_set_name(v, "%se%d%s", base, m, rest);
            }
        }
        sum = sum ? kd_add(c->g, sum, y) : y;
    }
    *out = kd_scale(c->g, sum, 1.0f / (float)M);
    return KD_OK;
}

/* ---- vid */

/* x (N, IN) -> (N, OUT) through a bias-free linear map named "<p>.weight" */
static kd_node *linear_nobias(kd_graph *g, const char *p, kd_node *x, int out) {
    char name[96];
    int IN = x->val.shape[1], ws[2] = {out, IN};
    snprintf(name, sizeof name, "%s.weight", p);
    kd_node *y = kd_matmul(g, x, kd_param(g, name, 2, ws, KD_INIT_UNIFORM_FANIN, IN), NULL);
    kd_node_set_name(y, "%s", p);
    return y;
}

static kd_status b_vid(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("vid");
    kd_node *fs, *ft;
    float init_var, eps;
    int mid;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_larg_int(c, d, "mid", 0, 1 << 16, &mid);
    if (st == KD_OK) st = kd_larg_float(c, d, "init_var", 1e-4, 1e4, &init_var);
    if (st == KD_OK) st = kd_larg_float(c, d, "eps", 0, 1, &eps);
    if (st != KD_OK) return st;
    if (!(init_var > eps))
        return kd_errorf(KD_ECONFIG, "loss '%s': init_var=%g must exceed eps=%g", c->term->name, init_var, eps);
    char shs[64], sht[64];
    kd_shape_str(fs->val.ndim, fs->val.shape, shs, sizeof shs);
    kd_shape_str(ft->val.ndim, ft->val.shape, sht, sizeof sht);
    int four = ft->val.ndim == 4;
    if (four && (fs->val.ndim != 4 || fs->val.shape[2] != ft->val.shape[2] || fs->val.shape[3] != ft->val.shape[3]))
        return kd_errorf(KD_ESHAPE,
                         "loss '%s': the teacher map %s needs a student map of the same height and width (student %s)",
                         c->term->name, sht, shs);
    if (!four && ft->val.ndim != 2)
        return kd_errorf(KD_ESHAPE, "loss '%s': teacher feature %s is neither (N, C) nor (N, C, H, W)", c->term->name, sht);
    int C = ft->val.shape[1], H = mid ? mid : C;
    char p[48], q[80];
    proj_base(c, p, sizeof p);
    /* mu = W4 relu(W2 relu(W0 f_s)): 1x1 convs on maps, linear maps on vectors, no biases */
    kd_node *x = four ? fs : kd_lflat2(c->g, fs);
    const int widths[3] = {H, H, C};
    for (int l = 0; l < 3; l++) {
        snprintf(q, sizeof q, "%s.%d", p, 2 * l);
        x = four ? kd_conv(c->g, q, x, widths[l], 1, 1, 0, 0) : linear_nobias(c->g, q, x, widths[l]);
        if (l < 2) x = kd_relu(c->g, x);
    }
    snprintf(q, sizeof q, "%s.log_scale", p);
    kd_node *alpha = kd_param(c->g, q, 1, &C, KD_INIT_ZERO, 1);
    /* softplus(alpha0 + 0) + eps = init_var:  alpha0 = log(expm1(init_var - eps)) */
    double v = (double)init_var - eps;
    float alpha0 = (float)(v > 30.0 ? v + log1p(-exp(-v)) : log(expm1(v)));
    *out = kd_vid_nll(c->g, x, ft, alpha, alpha0, eps);
    return KD_OK;
}

/* ---- crd */

static kd_status b_crd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("crd");
    kd_node *fs, *ft;
    int dim, inbatch, K, n_data;
    float T, mom;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_larg_int(c, d, "dim", 1, 1 << 16, &dim);
    if (st == KD_OK) st = kd_larg_int(c, d, "inbatch", 0, 1, &inbatch);
    if (st == KD_OK) st = kd_larg_float(c, d, "nce_t", 1e-3, 1e3, &T);
    if (st == KD_OK) st = kd_larg_int(c, d, "nce_k", 1, 1 << 24, &K);
    if (st == KD_OK) st = kd_larg_float(c, d, "momentum", 0, 1, &mom);
    if (st == KD_OK) st = kd_larg_int(c, d, "n_data", 0, 1 << 24, &n_data);
    if (st != KD_OK) return st;
    if (!inbatch) {
        /* the trainer feeds every example's index; a smaller bank would
         * abort on the first index past it */
        if (n_data > 0 && c->in->n_data > n_data)
            return kd_errorf(KD_ECONFIG,
                             "loss '%s': n_data=%d is smaller than the training set (%lld examples); leave it out to "
                             "use the training-set size",
                             c->term->name, n_data, (long long)c->in->n_data);
        if (n_data == 0) n_data = (int)c->in->n_data;
        if (n_data <= 0)
            return kd_errorf(KD_ECONFIG,
                             "loss '%s': the memory bank (inbatch=0) needs the training-set size; give n_data=<examples> "
                             "or use inbatch=1",
                             c->term->name);
        if (n_data > (1 << 24))
            return kd_errorf(KD_ECONFIG, "loss '%s': n_data=%d is above 2^24 (indices travel as floats)",
                             c->term->name, n_data);
    }
    char b[48], p[80];
    proj_base(c, b, sizeof b);
    snprintf(p, sizeof p, "%s.embed_s", b);
    kd_node *zs = kd_l2norm(c->g, kd_dense(c->g, p, kd_lflat2(c->g, fs), dim));
    snprintf(p, sizeof p, "%s.embed_t", b);
    kd_node *zt = kd_l2norm(c->g, kd_dense(c->g, p, kd_lflat2(c->g, ft), dim));
    if (inbatch) {
        *out = kd_crd_infonce(c->g, zs, zt, T);
        return KD_OK;
    }
    kd_node *idx = kd_graph_find(c->g, "idx");
    int N = zs->val.shape[0];
    if (idx && (!(idx->flags & KD_F_INPUT) || idx->val.ndim != 1 || idx->val.shape[0] != N))
        return kd_errorf(KD_ECONFIG, "loss '%s': a node named 'idx' exists and is not an (N) input", c->term->name);
    if (!idx) idx = kd_input(c->g, "idx", 1, &N);
    *out = kd_crd_nce(c->g, zs, zt, idx, n_data, K, T, mom);
    return KD_OK;
}

/* ---- simkd */

static kd_status b_simkd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("simkd");
    kd_node *fs, *ft, *y;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_lproject(c, d, fs, ft, &y);
    if (st != KD_OK) return st;
    *out = kd_mse(c->g, y, ft);
    const kd_model *tm = c->in->teacher;
    if (!tm) return KD_OK; /* features only (`distill loss`): no head to reuse */
    char name[64];
    snprintf(name, sizeof name, "%shead.weight", tm->prefix);
    kd_node *w = kd_graph_find(c->g, name);
    snprintf(name, sizeof name, "%shead.bias", tm->prefix);
    kd_node *b = kd_graph_find(c->g, name);
    if (!w || w->val.ndim != 2)
        return kd_errorf(KD_ECONFIG, "loss '%s': the teacher has no classifier '%shead.weight' to reuse",
                         c->term->name, tm->prefix);
    kd_node *h = y->val.ndim == 4 ? kd_global_avgpool(c->g, y) : kd_lflat2(c->g, y);
    if (h->val.shape[1] != w->val.shape[1]) {
        char sh[64];
        kd_shape_str(y->val.ndim, y->val.shape, sh, sizeof sh);
        return kd_errorf(KD_ESHAPE,
                         "loss '%s': the teacher's head takes %d features, the projected student feature is %s "
                         "(tap t=feat, or a teacher map with %d channels)",
                         c->term->name, w->val.shape[1], sh, w->val.shape[1]);
    }
    kd_node *logits = kd_matmul(c->g, h, w, b);
    kd_node_set_name(logits, "%ssimkd%d.logits", c->in->proj_prefix ? c->in->proj_prefix : "", c->index);
    logits->flags |= KD_F_KEEP;
    c->infer_logits = logits;
    return KD_OK;
}

/* ---- mm */

static kd_status b_mm(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("mm");
    kd_node *fs, *ft, *y;
    float alpha, eps;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_larg_float(c, d, "alpha", 1, 8, &alpha);
    if (st == KD_OK) st = kd_larg_float(c, d, "eps", 1e-12, 1, &eps);
    if (st != KD_OK) return st;
    kd_node *t2 = kd_lflat2(c->g, ft);
    st = kd_lproject_ensemble(c, d, fs, t2, &y);
    if (st != KD_OK) return st;
    *out = kd_logsum(c->g, kd_bn_noaffine(c->g, y, eps), kd_bn_noaffine(c->g, t2, eps), alpha);
    return KD_OK;
}

const kd_loss_def kd_loss_defs_feat2[] = {
    {"vid", "s=feat t=feat mid=0 init_var=5 eps=1e-5",
     "variational information distillation (Ahn et al. 2019), RepDistiller's VIDLoss", b_vid, 1},
    {"crd", "s=feat t=feat dim=128 inbatch=0 nce_t=0.07 nce_k=16384 momentum=0.5 n_data=0",
     "contrastive representation distillation (Tian et al. 2020); inbatch=1: InfoNCE", b_crd, 1},
    {"simkd", "s=feat t=feat proj=mlp bn=0",
     "SimKD (Chen et al. 2022): feature MSE, predict with the teacher's head", b_simkd, 1},
    {"mm", "s=feat t=feat proj=linear bn=0 proj_ensemble=1 alpha=4 eps=1e-4",
     "projector recipe (Miles & Mikolajczyk 2024): BN, log-sum distance", b_mm, 1},
    {NULL, NULL, NULL, NULL, 0},
};
