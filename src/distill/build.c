/* build.c - turns a parsed loss spec into graph nodes.
 *
 * One table row per loss: its name, its arguments with defaults, a one-line
 * reference, and a builder. Every argument a term gives must be in its row
 * (unknown arguments are errors, as are bad numbers), and every term is
 * multiplied by its `weight` through a scale node, so a schedule (DKD's
 * warm-up) can change the factor without rebuilding the graph.
 *
 * Feature losses read named taps of the student and teacher models; a
 * projector (1x1 conv, linear or two-layer MLP, optional BN) maps the
 * student's feature to the teacher's shape. Projector parameters are named
 * "proj<term>.<...>", outside the student's prefix, so a distilled
 * student's checkpoint holds only the student.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/build.h"

/* ---- arguments */

const char *kd_larg_default(const char *args, const char *key, char *buf, size_t n) {
    size_t kl = strlen(key);
    const char *p = args;
    while (p && *p) {
        while (*p == ' ') p++;
        if (strncmp(p, key, kl) == 0 && p[kl] == '=') {
            const char *v = p + kl + 1;
            size_t L = strcspn(v, " ");
            if (L >= n) L = n - 1;
            memcpy(buf, v, L);
            buf[L] = '\0';
            return buf;
        }
        p = strchr(p, ' ');
    }
    return NULL;
}

const char *kd_larg_str(kd_lctx *c, const kd_loss_def *d, const char *key) {
    for (int i = 0; i < c->term->n_args; i++)
        if (strcmp(c->term->args[i].key, key) == 0) return c->term->args[i].value;
    static _Thread_local char buf[64];
    const char *v = kd_larg_default(d->args, key, buf, sizeof buf);
    KD_ASSERT(v, "loss %s has no argument %s in its table row", d->name, key);
    return v;
}

kd_status kd_larg_float(kd_lctx *c, const kd_loss_def *d, const char *key, double lo, double hi, float *out) {
    const char *v = kd_larg_str(c, d, key);
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || !isfinite(x))
        return kd_errorf(KD_ECONFIG, "loss '%s': %s=%s is not a number", c->term->name, key, v);
    if (x < lo || x > hi)
        return kd_errorf(KD_ECONFIG, "loss '%s': %s=%s is outside [%g, %g]", c->term->name, key, v, lo, hi);
    *out = (float)x;
    return KD_OK;
}

/* ---- helpers */

static kd_node *maybe_standardize(kd_lctx *c, const kd_loss_def *d, kd_node *z, int *err) {
    float st;
    if (kd_larg_float(c, d, "standardize", 0, 1, &st) != KD_OK) {
        *err = 1;
        return NULL;
    }
    return st != 0.0f ? kd_standardize(c->g, z) : z;
}

kd_status kd_lneed_labels(kd_lctx *c) {
    if (!c->in->labels) return kd_errorf(KD_ECONFIG, "loss '%s' needs labels", c->term->name);
    return KD_OK;
}

kd_status kd_lneed_teacher(kd_lctx *c) {
    if (!c->in->t_logits) return kd_errorf(KD_ECONFIG, "loss '%s' needs a teacher", c->term->name);
    return KD_OK;
}


/* ---- logit losses */

static kd_status b_ce(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("ce");
    float eps;
    kd_status st = kd_lneed_labels(c);
    if (st == KD_OK) st = kd_larg_float(c, d, "smoothing", 0, 0.999, &eps);
    if (st == KD_OK)
        *out = c->in->ce && eps == 0.0f ? c->in->ce : kd_cross_entropy(c->g, c->in->s_logits, c->in->labels, eps);
    return st;
}

static kd_status divergence(kd_lctx *c, const char *name, kd_div_kind kind, const char *param_key, int t2,
                            kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of(name);
    float T = 1.0f, p = 0.0f;
    kd_status st = kd_lneed_teacher(c);
    if (st == KD_OK) st = kd_larg_float(c, d, "T", 1e-3, 1e3, &T);
    if (st == KD_OK && param_key) st = kd_larg_float(c, d, param_key, 1e-6, 1 - 1e-6, &p);
    if (st != KD_OK) return st;
    kd_node *s = c->in->s_logits, *t = c->in->t_logits;
    if (strstr(d->args, "standardize")) {
        int err = 0;
        s = maybe_standardize(c, d, s, &err);
        if (!err) t = maybe_standardize(c, d, t, &err);
        if (err) return KD_ECONFIG;
    }
    *out = kd_divergence(c->g, s, t, c->in->mask, kind, T, p, t2 ? T * T : 1.0f);
    return KD_OK;
}

#define DIV_BUILDER(fn, name, kind, param, t2) \
    static kd_status fn(kd_lctx *c, kd_node **out) { return divergence(c, name, kind, param, t2, out); }
DIV_BUILDER(b_kd, "kd", KD_DIV_FKL, NULL, 1)
DIV_BUILDER(b_fkl, "fkl", KD_DIV_FKL, NULL, 1)
DIV_BUILDER(b_rkl, "rkl", KD_DIV_RKL, NULL, 1)
DIV_BUILDER(b_jsd, "jsd", KD_DIV_JSD, "beta", 0)
DIV_BUILDER(b_tvd, "tvd", KD_DIV_TVD, NULL, 0)
DIV_BUILDER(b_skl, "skl", KD_DIV_SKL, "alpha", 0)
DIV_BUILDER(b_srkl, "srkl", KD_DIV_SRKL, "alpha", 0)

static kd_status b_dkd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("dkd");
    float a, b, T, w;
    kd_status st = kd_lneed_teacher(c);
    if (st == KD_OK) st = kd_lneed_labels(c);
    if (st == KD_OK) st = kd_larg_float(c, d, "alpha", 0, 1e4, &a);
    if (st == KD_OK) st = kd_larg_float(c, d, "beta", 0, 1e4, &b);
    if (st == KD_OK) st = kd_larg_float(c, d, "T", 1e-3, 1e3, &T);
    if (st == KD_OK) st = kd_larg_float(c, d, "warmup", 0, 1e6, &w);
    if (st != KD_OK) return st;
    int err = 0;
    kd_node *s = maybe_standardize(c, d, c->in->s_logits, &err);
    kd_node *t = err ? NULL : maybe_standardize(c, d, c->in->t_logits, &err);
    if (err) return KD_ECONFIG;
    c->warmup = (int)w;
    *out = kd_dkd(c->g, s, t, c->in->labels, a, b, T);
    return KD_OK;
}

static kd_status b_dist(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("dist");
    float b, gm, tau;
    kd_status st = kd_lneed_teacher(c);
    if (st == KD_OK) st = kd_larg_float(c, d, "beta", 0, 1e4, &b);
    if (st == KD_OK) st = kd_larg_float(c, d, "gamma", 0, 1e4, &gm);
    if (st == KD_OK) st = kd_larg_float(c, d, "tau", 1e-3, 1e3, &tau);
    if (st == KD_OK) *out = kd_dist(c->g, c->in->s_logits, c->in->t_logits, b, gm, tau);
    return st;
}

static kd_status b_nkd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("nkd");
    float T, gm;
    kd_status st = kd_lneed_teacher(c);
    if (st == KD_OK) st = kd_lneed_labels(c);
    if (st == KD_OK) st = kd_larg_float(c, d, "T", 1e-3, 1e3, &T);
    if (st == KD_OK) st = kd_larg_float(c, d, "gamma", 0, 1e4, &gm);
    if (st == KD_OK) *out = kd_nkd(c->g, c->in->s_logits, c->in->t_logits, c->in->labels, T, gm);
    return st;
}

static kd_status b_mse_logits(kd_lctx *c, kd_node **out) {
    kd_status st = kd_lneed_teacher(c);
    if (st == KD_OK) *out = kd_mse(c->g, c->in->s_logits, c->in->t_logits);
    return st;
}

/* ---- feature losses: taps and projectors */

kd_status kd_ltap(kd_lctx *c, const kd_loss_def *d, const kd_model *m, const char *side, kd_node *fallback,
                     kd_node **out) {
    char name[64];
    snprintf(name, sizeof name, "%s", kd_larg_str(c, d, side)); /* arg_str's buffer is reused */
    if (!m) {
        if (!fallback)
            return kd_errorf(KD_ECONFIG,
                             "loss '%s' needs %s features, and there are none here (a teacher cache holds logits "
                             "only; distill loss reads s_feat/t_feat)",
                             c->term->name, side[0] == 's' ? "student" : "teacher");
        *out = fallback;
        return KD_OK;
    }
    kd_node *n = strcmp(name, "feat") == 0 ? m->feat : kd_model_tap(m, name);
    if (!n) {
        char known[512] = "feat";
        size_t k = strlen(known), pl = strlen(m->prefix);
        for (int i = 0; i < m->n_taps && k < sizeof known - 40; i++)
            k += (size_t)snprintf(known + k, sizeof known - k, ", %s", m->taps[i]->name + pl);
        return kd_errorf(KD_ECONFIG, "loss '%s': %s=%s is not a tap of the %s '%s' (taps: %s)", c->term->name, side,
                         name, side[0] == 's' ? "student" : "teacher", m->spec, known);
    }
    *out = n;
    return KD_OK;
}

int kd_lsame_shape(const kd_node *a, const kd_node *b) {
    return a->val.ndim == b->val.ndim && memcmp(a->val.shape, b->val.shape, (size_t)a->val.ndim * sizeof(int)) == 0;
}

kd_status kd_lproject(kd_lctx *c, const kd_loss_def *d, kd_node *fs, kd_node *ft, kd_node **out) {
    char projbuf[64];
    snprintf(projbuf, sizeof projbuf, "%s", kd_larg_str(c, d, "proj")); /* arg_str's buffer is reused */
    const char *proj = projbuf;
    float bn = 0.0f;
    kd_status st = kd_larg_float(c, d, "bn", 0, 1, &bn);
    if (st != KD_OK) return st;
    char shs[64], sht[64];
    kd_shape_str(fs->val.ndim, fs->val.shape, shs, sizeof shs);
    kd_shape_str(ft->val.ndim, ft->val.shape, sht, sizeof sht);
    if (strcmp(proj, "auto") == 0) {
        if (kd_lsame_shape(fs, ft))
            proj = "none";
        else if (fs->val.ndim == 4 && ft->val.ndim == 4)
            proj = "conv1x1";
        else
            proj = "linear";
    }
    char p[64];
    snprintf(p, sizeof p, "%sproj%d", c->in->proj_prefix ? c->in->proj_prefix : "", c->index);
    kd_node *y = NULL;
    if (strcmp(proj, "none") == 0) {
        y = fs;
    } else if (strcmp(proj, "conv1x1") == 0) {
        if (fs->val.ndim != 4 || ft->val.ndim != 4 || fs->val.shape[2] != ft->val.shape[2] ||
            fs->val.shape[3] != ft->val.shape[3])
            return kd_errorf(KD_ESHAPE,
                             "loss '%s': proj=conv1x1 needs student and teacher maps of the same height and width; "
                             "student %s, teacher %s",
                             c->term->name, shs, sht);
        y = kd_conv(c->g, p, fs, ft->val.shape[1], 1, 1, 0, !bn);
    } else if (strcmp(proj, "linear") == 0 || strcmp(proj, "mlp") == 0) {
        if (ft->val.ndim != 2)
            return kd_errorf(KD_ESHAPE, "loss '%s': proj=%s maps to a flat teacher feature; the teacher tap is %s",
                             c->term->name, proj, sht);
        kd_node *x = fs->val.ndim == 2 ? fs : kd_flatten(c->g, fs);
        if (strcmp(proj, "mlp") == 0) {
            char h[72];
            snprintf(h, sizeof h, "%s.0", p);
            x = kd_relu(c->g, kd_dense(c->g, h, x, ft->val.shape[1]));
            snprintf(h, sizeof h, "%s.2", p);
            y = kd_dense(c->g, h, x, ft->val.shape[1]);
        } else {
            y = kd_dense(c->g, p, x, ft->val.shape[1]);
        }
    } else {
        return kd_errorf(KD_ECONFIG, "loss '%s': proj=%s is not one of auto, none, linear, conv1x1, mlp",
                         c->term->name, proj);
    }
    if (bn && y != fs) {
        char b[72];
        snprintf(b, sizeof b, "%s.bn", p);
        y = kd_bn(c->g, b, y);
    }
    if (!kd_lsame_shape(y, ft)) {
        char shy[64];
        kd_shape_str(y->val.ndim, y->val.shape, shy, sizeof shy);
        return kd_errorf(KD_ESHAPE, "loss '%s': student feature %s%s does not match the teacher's %s%s",
                         c->term->name, shs, y == fs ? "" : " (after the projector)", sht,
                         y == fs ? " (add proj=conv1x1, linear or mlp)" : "");
    }
    *out = y;
    return KD_OK;
}

kd_status kd_ltaps(kd_lctx *c, const kd_loss_def *d, kd_node **fs, kd_node **ft) {
    kd_status st = kd_ltap(c, d, c->in->student, "s", c->in->s_feat, fs);
    if (st == KD_OK) st = kd_ltap(c, d, c->in->teacher, "t", c->in->t_feat, ft);
    return st;
}

static kd_status b_fitnet(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("fitnet");
    kd_node *fs, *ft, *y;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_lproject_ensemble(c, d, fs, ft, &y);
    if (st == KD_OK) *out = kd_mse(c->g, y, ft);
    return st;
}

static kd_status b_at(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("at");
    kd_node *fs, *ft;
    float p;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_larg_float(c, d, "p", 0.5, 8, &p);
    if (st != KD_OK) return st;
    if (fs->val.ndim != 4 || ft->val.ndim != 4 || fs->val.shape[2] != ft->val.shape[2] ||
        fs->val.shape[3] != ft->val.shape[3])
        return kd_errorf(KD_ESHAPE, "loss 'at' needs feature maps (N, C, H, W) of the same H and W on both sides");
    *out = kd_at(c->g, fs, ft, p);
    return KD_OK;
}

static kd_status b_sp(kd_lctx *c, kd_node **out) {
    kd_node *fs, *ft;
    kd_status st = kd_ltaps(c, kd_loss_def_of("sp"), &fs, &ft);
    if (st == KD_OK) *out = kd_sp(c->g, fs, ft);
    return st;
}

static kd_status b_rkd(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_of("rkd");
    kd_node *fs, *ft;
    float wd, wa;
    kd_status st = kd_ltaps(c, d, &fs, &ft);
    if (st == KD_OK) st = kd_larg_float(c, d, "dist", 0, 1e6, &wd);
    if (st == KD_OK) st = kd_larg_float(c, d, "angle", 0, 1e6, &wa);
    if (st == KD_OK) *out = kd_rkd(c->g, fs, ft, wd, wa);
    return st;
}

static kd_status b_pkt(kd_lctx *c, kd_node **out) {
    kd_node *fs, *ft;
    kd_status st = kd_ltaps(c, kd_loss_def_of("pkt"), &fs, &ft);
    if (st == KD_OK) *out = kd_pkt(c->g, fs, ft);
    return st;
}

const kd_loss_def kd_loss_defs_core[] = {
    {"ce", "smoothing=0", "cross-entropy with the labels (label smoothing as torch)", b_ce, 0},
    {"kd", "T=4 standardize=0", "T^2 KL(p_t || p_s) on softmax(z/T) (Hinton et al. 2015)", b_kd, 1},
    {"fkl", "T=1 standardize=0", "forward KL, T^2 KL(p_t || p_s)", b_fkl, 1},
    {"rkl", "T=1 standardize=0", "reverse KL, T^2 KL(p_s || p_t)", b_rkl, 1},
    {"jsd", "beta=0.5 T=1", "generalised Jensen-Shannon (GKD, Agarwal et al. 2024)", b_jsd, 1},
    {"tvd", "T=1", "total variation distance", b_tvd, 1},
    {"skl", "alpha=0.1 T=1", "skew KL, KL(p_t || a p_t + (1-a) p_s) (DistiLLM, Ko et al. 2024)", b_skl, 1},
    {"srkl", "alpha=0.1 T=1", "skew reverse KL, KL(p_s || a p_s + (1-a) p_t)", b_srkl, 1},
    {"dkd", "alpha=1 beta=8 T=4 warmup=20 standardize=0", "decoupled KD (Zhao et al. 2022), warm-up in epochs", b_dkd, 1},
    {"dist", "beta=1 gamma=1 tau=1", "DIST: inter/intra-class correlation (Huang et al. 2022)", b_dist, 1},
    {"nkd", "T=1 gamma=1.5", "normalised KD (Yang et al. 2023)", b_nkd, 1},
    {"mse_logits", "", "mean squared error between logits", b_mse_logits, 1},
    {"fitnet", "s=feat t=feat proj=auto bn=0 proj_ensemble=1", "FitNets hint: MSE(P(f_s), f_t) (Romero et al. 2015)", b_fitnet, 1},
    {"at", "s=block1 t=block1 p=2", "attention transfer (Zagoruyko & Komodakis 2017)", b_at, 1},
    {"sp", "s=feat t=feat", "similarity-preserving (Tung & Mori 2019)", b_sp, 1},
    {"rkd", "s=feat t=feat dist=25 angle=50", "relational KD, distance + angle (Park et al. 2019)", b_rkd, 1},
    {"pkt", "s=feat t=feat", "probabilistic knowledge transfer (Passalis & Tefas 2018)", b_pkt, 1},
    {NULL, NULL, NULL, NULL, 0},
};

static const kd_loss_def *const tables[] = {kd_loss_defs_core, kd_loss_defs_feat2, kd_loss_defs_logit2,
                                            kd_loss_defs_feat3, kd_loss_defs_geom, kd_loss_defs_anneal};
#define N_TABLES ((int)(sizeof tables / sizeof tables[0]))

const kd_loss_def *kd_loss_def_find(const char *name) {
    for (int t = 0; t < N_TABLES; t++)
        for (const kd_loss_def *d = tables[t]; d->name; d++)
            if (strcmp(d->name, name) == 0) return d;
    return NULL;
}

const kd_loss_def *kd_loss_def_of(const char *name) {
    const kd_loss_def *d = kd_loss_def_find(name);
    KD_ASSERT(d, "loss %s missing from the tables", name);
    return d;
}

kd_status kd_larg_int(kd_lctx *c, const kd_loss_def *d, const char *key, int lo, int hi, int *out) {
    float v;
    kd_status st = kd_larg_float(c, d, key, lo, hi, &v);
    if (st != KD_OK) return st;
    if (v != floorf(v)) return kd_errorf(KD_ECONFIG, "loss '%s': %s=%g is not an integer", c->term->name, key, v);
    *out = (int)v;
    return KD_OK;
}

kd_node *kd_lflat2(kd_graph *g, kd_node *x) { return x->val.ndim == 2 ? x : kd_flatten(g, x); }

static int key_allowed(const kd_loss_def *d, const char *key) {
    char buf[64];
    return strcmp(key, "weight") == 0 || kd_larg_default(d->args, key, buf, sizeof buf) != NULL;
}

kd_status kd_loss_build(kd_graph *g, const kd_loss_spec *spec, const kd_loss_inputs *in, kd_built_loss *out) {
    memset(out, 0, sizeof *out);
    kd_node *total = NULL;
    for (int i = 0; i < spec->n; i++) {
        const kd_loss_term *t = &spec->terms[i];
        const kd_loss_def *d = kd_loss_def_find(t->name);
        if (!d) {
            char names[1024];
            size_t k = 0;
            for (int tb = 0; tb < N_TABLES; tb++)
                for (const kd_loss_def *e = tables[tb]; e->name && k < sizeof names - 40; e++)
                    k += (size_t)snprintf(names + k, sizeof names - k, "%s%s", k ? ", " : "", e->name);
            return kd_errorf(KD_ECONFIG, "unknown loss '%s' (known: %s)", t->name, names);
        }
        for (int j = 0; j < t->n_args; j++)
            if (!key_allowed(d, t->args[j].key))
                return kd_errorf(KD_ECONFIG, "loss '%s' has no argument '%s' (it takes: %s%sweight)", t->name,
                                 t->args[j].key, d->args, *d->args ? " " : "");
        kd_lctx c = {.g = g, .term = t, .in = in, .index = i + 1};
        float w = 1.0f;
        for (int j = 0; j < t->n_args; j++)
            if (strcmp(t->args[j].key, "weight") == 0) {
                char *end;
                double x = strtod(t->args[j].value, &end);
                if (end == t->args[j].value || *end || !isfinite(x) || x < 0)
                    return kd_errorf(KD_ECONFIG, "loss '%s': weight=%s is not a non-negative number", t->name,
                                     t->args[j].value);
                w = (float)x;
            }
        kd_node *v = NULL;
        kd_status st = d->build(&c, &v);
        if (st != KD_OK) return st;
        kd_built_term *bt = &out->terms[out->n++];
        snprintf(bt->name, sizeof bt->name, "%s", t->name);
        bt->weight = w;
        bt->warmup_epochs = c.warmup;
        bt->sched = c.sched;
        bt->sched_node = c.sched_node;
        memcpy(bt->sched_arg, c.sched_arg, sizeof bt->sched_arg);
        bt->value = v;
        kd_node_set_name(v, "loss.%d.%s", i + 1, t->name);
        v->flags |= KD_F_KEEP; /* logged after backward */
        bt->scaled = kd_scale(g, v, w);
        out->uses_teacher |= d->teacher;
        if (c.infer_logits) out->infer_logits = c.infer_logits;
        total = total ? kd_add(g, total, bt->scaled) : bt->scaled;
    }
    kd_node_set_name(total, "loss");
    out->total = total;
    kd_loss_set_epoch(out, 1e9);
    return KD_OK;
}

void kd_loss_set_epoch(kd_built_loss *l, double epoch) {
    for (int i = 0; i < l->n; i++) {
        kd_built_term *t = &l->terms[i];
        double f = t->warmup_epochs > 0 ? fmin(epoch / t->warmup_epochs, 1.0) : 1.0;
        t->scaled->fp[0] = (float)(t->weight * f);
        if (t->sched) t->sched(t, epoch);
    }
}

void kd_loss_print_help(FILE *f) {
    for (int t = 0; t < N_TABLES; t++)
        for (const kd_loss_def *d = tables[t]; d->name; d++)
            fprintf(f, "  %-11s %-44s %s\n", d->name, *d->args ? d->args : "-", d->help);
    fprintf(f, "  every term also takes weight=1; terms add: \"ce(weight=0.1) + kd(T=4, weight=0.9)\"\n");
}
