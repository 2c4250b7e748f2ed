/* test_geom.c - tests for src/distill/geometry.c (procrustes, gram_dist,
 * cka), src/distill/dcd.c (dcd) and the loss rows of build_geom.c.
 *
 *   1. finite-difference gradient checks of every op w.r.t. both features
 *      (and DCD's log-scale): odd B, Ds != Dt, B above and below the
 *      widths, 4-D inputs, both procrustes paths; random features give
 *      distinct singular values, and every case keeps Xt^T Xs at the rank of
 *      Xs and Xt (rank B - 1 when B <= the widths), where the nuclear norm
 *      is differentiable;
 *   2. closed forms: identical features, an orthogonal rotation (and an
 *      isometric embedding into a wider space) of the teacher's features,
 *      scaling and translation invariance, orthogonal features, a batch of
 *      one; DCD on orthonormal rows, its bias invariance, N = 1;
 *   3. PyTorch parity via tests/fixtures/geom.safetensors (written by
 *      tests/fixtures/gen_geom.py; a missing fixture is a failure), every
 *      procrustes case on both paths;
 *   4. the direct and reduced paths agree; results do not depend on the
 *      thread count or on the maximum batch the graph was compiled for;
 *   5. the loss rows on real models (no parameters for the geometry losses,
 *      DCD's heads and scalars, a naive recomputation of DCD) and their
 *      errors;
 *   6. `distill loss` on s_feat/t_feat (against the PyTorch fixture).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "gradcheck.h"
#include "kd_distill.h"
#include "kd_io.h"
#include "kd_losses.h"
#include "test.h"

/* see test_features.c: losses are doubles rounded once to float32; correct
 * backwards measure 1e-7..1e-4, a wrong term 1e-2 and more */
#define GC_TOL 1e-3

static kd_rng rng;

typedef kd_node *(*geo_fn)(kd_graph *, kd_node *, kd_node *);
static const struct {
    const char *name;
    geo_fn fn;
} GEO[3] = {{"procrustes", kd_procrustes}, {"gram", kd_gram_dist}, {"cka", kd_cka}};
enum { PR, GR, CK };
static const char *PATHS[3] = {"auto", "direct", "reduced"};

/* a shape as {ndim, d0, d1, ...} */
static int64_t numel_of(const int *sh) { return kd_shape_numel(sh[0], sh + 1); }

/* op `op` on two trainable leaves of shapes ss, ts; procrustes on `path` */
static kd_node *geo_build(kd_graph *g, int op, const int *ss, const int *ts, int path, kd_node **s, kd_node **t) {
    *s = kd_gc_param(g, "s", ss[0], ss + 1);
    *t = kd_gc_param(g, "t", ts[0], ts + 1);
    kd_node *l = GEO[op].fn(g, *s, *t);
    if (op == PR) l->ip[0] = path;
    return l;
}

/* evaluates op on given values; returns the loss, gradients into gs, gt (may be NULL) */
static double geo_eval(int op, const int *ss, const int *ts, int path, const float *sv, const float *tv, float *gs,
                       float *gt) {
    kd_graph *g = kd_graph_new();
    kd_node *s, *t, *l = geo_build(g, op, ss, ts, path, &s, &t);
    double v = NAN;
    if (kd_gc_compile(g, ss[1], 7)) {
        memcpy(s->val.data, sv, (size_t)numel_of(ss) * sizeof(float));
        memcpy(t->val.data, tv, (size_t)numel_of(ts) * sizeof(float));
        kd_gc_step(g, l, 1);
        v = l->val.data[0];
        if (gs) memcpy(gs, s->grad.data, (size_t)numel_of(ss) * sizeof(float));
        if (gt) memcpy(gt, t->grad.data, (size_t)numel_of(ts) * sizeof(float));
    }
    kd_graph_free(g);
    return v;
}

static void fill(float *p, int64_t n, float scale, float shift) {
    for (int64_t i = 0; i < n; i++) p[i] = shift + scale * kd_rng_normal(&rng);
}

/* ============================================================ 1. gradients */

static void gc_geo(int op, const int *ss, const int *ts, int path, double eps) {
    static uint64_t calls;
    kd_graph *g = kd_graph_new();
    kd_node *s, *t, *l = geo_build(g, op, ss, ts, path, &s, &t);
    kd_gc p = kd_gradcheck_project(g, l);
    if (kd_gc_compile(g, ss[1], 7)) {
        kd_gc_fill(&rng, s, 1.0f, 0.0f);
        kd_gc_fill(&rng, t, 2.0f, 0.5f);
        kd_gradcheck_randomize(&p, 500 + calls++);
        kd_node *wrt[2] = {s, t};
        double err = kd_gradcheck(g, &p, wrt, 2, eps, 1);
        char a[64], b[64];
        kd_shape_str(ss[0], ss + 1, a, sizeof a);
        kd_shape_str(ts[0], ts + 1, b, sizeof b);
        CHECK_MSG(err < GC_TOL, "%s %s vs %s (%s): gradient error %.3g", GEO[op].name, a, b,
                  op == PR ? PATHS[path] : "-", err);
    }
    kd_graph_free(g);
}

typedef struct dcd_g {
    kd_graph *g;
    kd_node *es, *et, *th, *be, *l;
} dcd_g;

static int dcd_new(dcd_g *q, int N, int D, const kd_dcd_args *a) {
    q->g = kd_graph_new();
    q->es = kd_gc_param(q->g, "es", 2, (int[]){N, D});
    q->et = kd_gc_param(q->g, "et", 2, (int[]){N, D});
    q->th = kd_gc_param(q->g, "theta", 1, (int[]){1});
    q->be = kd_gc_param(q->g, "beta", 1, (int[]){1});
    q->l = kd_dcd(q->g, kd_l2norm(q->g, q->es), kd_l2norm(q->g, q->et), q->th, q->be, a);
    return 1;
}

/* wrt: the first n_wrt of (es, et, theta). The teacher target is detached
 * (a stop-gradient finite differences cannot see), so teacher cases check
 * es only; the fixture checks their et and theta gradients against torch. */
static void gc_dcd(int N, int D, kd_dcd_args a, float theta, int n_wrt, const char *what) {
    dcd_g q;
    dcd_new(&q, N, D, &a);
    kd_gc p = kd_gradcheck_project(q.g, q.l);
    if (kd_gc_compile(q.g, N, 7)) {
        kd_gc_fill(&rng, q.es, 1.0f, 0.0f);
        kd_gc_fill(&rng, q.et, 1.0f, 0.2f);
        q.th->val.data[0] = theta;
        q.be->val.data[0] = 0.4f;
        kd_gradcheck_randomize(&p, 77);
        kd_node *wrt[3] = {q.es, q.et, q.th};
        double err = kd_gradcheck(q.g, &p, wrt, n_wrt, 2e-3, 1);
        CHECK_MSG(err < GC_TOL, "dcd %s: gradient error %.3g", what, err);
        /* the bias cancels in every softmax */
        CHECK_MSG(fabs(q.be->grad.data[0]) < 1e-6, "dcd %s: bias gradient %g", what, q.be->grad.data[0]);
    }
    kd_graph_free(q.g);
}

static void gradchecks(void) {
    TEST("gradcheck procrustes: B above and below the widths, both paths, 4-D, rank B - 1") {
        const int cases[][2][6] = {
            {{2, 7, 3}, {2, 7, 5}},       /* B > D: full-rank 5 x 3 cross matrix */
            {{2, 9, 12}, {2, 9, 5}},      /* B < Ds */
            {{2, 4, 6}, {2, 4, 9}},       /* B < both: rank 3 */
            {{2, 6, 6}, {2, 6, 6}},       /* square, rank 5 of 6 */
            {{4, 5, 2, 2, 2}, {2, 5, 3}}, /* a map flattened to 8 */
            {{2, 3, 4}, {2, 3, 2}},       /* B = 3: rank 2 */
        };
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
            for (int path = 0; path < 3; path++) gc_geo(PR, cases[c][0], cases[c][1], path, 1e-2);
    }
    TEST("gradcheck gram_dist and cka: odd B, Ds != Dt, B above and below the widths, 4-D") {
        const int cases[][2][6] = {
            {{2, 7, 3}, {2, 7, 5}}, {{2, 4, 6}, {2, 4, 9}}, {{4, 5, 2, 2, 2}, {2, 5, 3}}, {{2, 3, 4}, {2, 3, 2}}};
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
            for (int op = GR; op <= CK; op++) gc_geo(op, cases[c][0], cases[c][1], 0, 1e-2);
    }
    TEST("gradcheck dcd: cross and teacher targets, each part alone, the log-scale") {
        kd_dcd_args a = {.consist = KD_DCD_CROSS, .log_scale0 = 1.0f, .max_scale = 10.0f, .w_nce = 1.0f, .w_kl = 0.5f};
        gc_dcd(5, 4, a, 0.2f, 3, "cross");
        a.w_nce = 0.0f, a.w_kl = 1.0f;
        gc_dcd(3, 7, a, -0.3f, 3, "cross KL alone");
        a.consist = KD_DCD_TEACHER;
        gc_dcd(6, 3, a, 0.5f, 1, "teacher KL alone (student side)");
        a.w_nce = 1.0f, a.w_kl = 1.0f, a.log_scale0 = 1.5f;
        gc_dcd(7, 5, a, -0.1f, 1, "teacher (student side)");
        a.w_kl = 0.0f;
        gc_dcd(4, 6, a, 0.0f, 3, "InfoNCE alone");
    }
    TEST("dcd: no log-scale gradient while the clamp holds the scale at max_scale") {
        kd_dcd_args a = {.consist = KD_DCD_CROSS, .log_scale0 = 1.0f, .max_scale = 10.0f, .w_nce = 1.0f, .w_kl = 1.0f};
        gc_dcd(5, 4, a, 1.6f, 2, "clamped");
        dcd_g q;
        dcd_new(&q, 5, 4, &a);
        if (kd_gc_compile(q.g, 5, 7)) {
            kd_gc_fill(&rng, q.es, 1, 0), kd_gc_fill(&rng, q.et, 1, 0);
            q.th->val.data[0] = 1.6f;
            kd_gc_step(q.g, q.l, 1);
            CHECK(q.th->grad.data[0] == 0.0f && kd_test_max_abs(q.es->grad.data, 20) > 0.0);
        }
        kd_graph_free(q.g);
    }
}

/* ============================================================ 2. closed forms */

/* Q (D x D) random orthogonal, by Gram-Schmidt in double */
static void orthogonal(double *Q, int D) {
    for (int i = 0; i < D * D; i++) Q[i] = kd_rng_normal(&rng);
    for (int i = 0; i < D; i++) {
        double *q = Q + (size_t)i * D;
        for (int j = 0; j < i; j++) {
            const double *p = Q + (size_t)j * D;
            double d = 0;
            for (int k = 0; k < D; k++) d += q[k] * p[k];
            for (int k = 0; k < D; k++) q[k] -= d * p[k];
        }
        double n = 0;
        for (int k = 0; k < D; k++) n += q[k] * q[k];
        for (int k = 0; k < D; k++) q[k] /= sqrt(n);
    }
}

static void closed_forms(void) {
    TEST("identical features: procrustes 0, gram 0, cka 0") {
        const int sh[3] = {2, 9, 6};
        float x[54];
        fill(x, 54, 1.0f, 0.3f);
        for (int op = 0; op < 3; op++)
            for (int path = 0; path < (op == PR ? 3 : 1); path++) {
                float gs[54];
                double v = geo_eval(op, sh, sh, path, x, x, gs, NULL);
                CHECK_MSG(fabs(v) < 1e-6, "%s (%s): %g", GEO[op].name, PATHS[path], v);
                /* a minimum: the student's gradient vanishes (gram: 0 by convention at the kink) */
                CHECK_MSG(kd_test_max_abs(gs, 54) < 1e-4, "%s: gradient %g at the minimum", GEO[op].name, kd_test_max_abs(gs, 54));
            }
    }
    TEST("teacher = student rotated (orthogonal Q), or embedded isometrically into a wider space: all 0") {
        enum { B = 8, D = 5, W = 7 };
        float s[B * D], t[B * D], tw[B * W];
        double Q[D * D], Qw[W * W];
        fill(s, B * D, 1.0f, -0.2f);
        orthogonal(Q, D);
        orthogonal(Qw, W);
        for (int b = 0; b < B; b++) {
            for (int j = 0; j < D; j++) {
                double a = 0;
                for (int k = 0; k < D; k++) a += s[b * D + k] * Q[k * D + j];
                t[b * D + j] = (float)a;
            }
            /* tw = s times the first D rows of Qw: orthonormal rows, D -> W */
            for (int j = 0; j < W; j++) {
                double a = 0;
                for (int k = 0; k < D; k++) a += s[b * D + k] * Qw[k * W + j];
                tw[b * W + j] = (float)a;
            }
        }
        const int ss[3] = {2, B, D}, tsw[3] = {2, B, W};
        for (int op = 0; op < 3; op++)
            for (int path = 0; path < (op == PR ? 3 : 1); path++) {
                double v = geo_eval(op, ss, ss, path, s, t, NULL, NULL);
                double w = geo_eval(op, ss, tsw, path, s, tw, NULL, NULL);
                CHECK_MSG(fabs(v) < 1e-6 && fabs(w) < 1e-6, "%s (%s): rotated %g, embedded %g", GEO[op].name,
                          PATHS[path], v, w);
            }
        /* but not invariant to a non-orthogonal map: stretch one column */
        for (int b = 0; b < B; b++) t[b * D] *= 3.0f;
        CHECK(geo_eval(PR, ss, ss, 0, s, t, NULL, NULL) > 1e-3);
    }
    TEST("scaling and translation of either side change nothing") {
        const int ss[3] = {2, 7, 4}, ts[3] = {2, 7, 6};
        float s[28], t[42], s2[28], t2[42];
        fill(s, 28, 1.0f, 0.0f);
        fill(t, 42, 1.0f, 0.5f);
        for (int i = 0; i < 28; i++) s2[i] = 3.7f * s[i] + (float)(i % 4);      /* per-column offset */
        for (int i = 0; i < 42; i++) t2[i] = 0.05f * t[i] - 2.0f * (float)(i % 6); /* another */
        for (int op = 0; op < 3; op++) {
            double a = geo_eval(op, ss, ts, 0, s, t, NULL, NULL), b = geo_eval(op, ss, ts, 0, s2, t2, NULL, NULL);
            CHECK_MSG(fabs(a - b) <= 1e-5 * fabs(a) && a > 1e-3, "%s: %g vs %g", GEO[op].name, a, b);
        }
    }
    TEST("orthogonal features: procrustes 2, cka loss 1, gram sqrt(2)") {
        /* rank-1 sides on disjoint pairs of examples: Xs^T Xt = 0, |Ks| = |Kt| = 1 */
        const int sh[3] = {2, 4, 1};
        float s[4] = {1, -1, 0, 0}, t[4] = {0, 0, 2, -2};
        double want[3] = {2.0, sqrt(2.0), 1.0};
        for (int op = 0; op < 3; op++)
            for (int path = 0; path < (op == PR ? 3 : 1); path++)
                CHECK_CLOSE(geo_eval(op, sh, sh, path, s, t, NULL, NULL), want[op], 0, 1e-6);
    }
    TEST("a batch of one (no shape): procrustes 2, gram 0, cka 1, no gradient, no NaN") {
        const int ss[3] = {2, 1, 5}, ts[3] = {2, 1, 3};
        float s[5] = {1, 2, 3, 4, 5}, t[3] = {-1, 0, 1}, gs[5], gt[3];
        double want[3] = {2.0, 0.0, 1.0};
        for (int op = 0; op < 3; op++) {
            CHECK_CLOSE(geo_eval(op, ss, ts, 0, s, t, gs, gt), want[op], 0, 0);
            CHECK(kd_test_max_abs(gs, 5) == 0.0 && kd_test_max_abs(gt, 3) == 0.0);
        }
    }
    TEST("dcd on orthonormal rows (zs = zt): w_nce (log(e^s + N - 1) - s), no KL, either target") {
        enum { N = 4 };
        for (int c = 0; c < 2; c++) {
            kd_dcd_args a = {.consist = c ? KD_DCD_TEACHER : KD_DCD_CROSS, .log_scale0 = 1.0f, .bias0 = -2.0f,
                             .max_scale = 10.0f, .w_nce = 0.7f, .w_kl = 3.0f};
            kd_graph *g = kd_graph_new();
            kd_node *s = kd_gc_param(g, "s", 2, (int[]){N, N}), *t = kd_gc_param(g, "t", 2, (int[]){N, N});
            kd_node *th = kd_gc_param(g, "th", 1, (int[]){1}), *be = kd_gc_param(g, "be", 1, (int[]){1});
            kd_node *l = kd_dcd(g, s, t, th, be, &a);
            if (kd_gc_compile(g, N, 7)) {
                for (int i = 0; i < N * N; i++) s->val.data[i] = t->val.data[i] = i % (N + 1) == 0 ? 1.0f : 0.0f;
                th->val.data[0] = 0.25f, be->val.data[0] = 0.5f;
                kd_gc_step(g, l, 1);
                double sc = exp(1.25);
                CHECK_CLOSE(l->val.data[0], 0.7 * (log(exp(sc) + N - 1) - sc), 0, 1e-6);
                CHECK(fabs(be->grad.data[0]) < 1e-7);
            }
            kd_graph_free(g);
        }
    }
    TEST("dcd: the bias changes no value; N = 1 gives 0") {
        kd_dcd_args a = {.consist = KD_DCD_CROSS, .log_scale0 = 1.0f, .max_scale = 10.0f, .w_nce = 1.0f, .w_kl = 1.0f};
        dcd_g q;
        dcd_new(&q, 5, 3, &a);
        if (kd_gc_compile(q.g, 5, 7)) {
            kd_gc_fill(&rng, q.es, 1, 0), kd_gc_fill(&rng, q.et, 1, 0);
            kd_graph_forward(q.g, 1);
            float v0 = q.l->val.data[0];
            q.be->val.data[0] = 7.0f;
            kd_graph_forward(q.g, 1);
            CHECK_CLOSE(q.l->val.data[0], v0, 0, 1e-6);
            CHECK(v0 > 0.0f);
        }
        kd_graph_free(q.g);
        dcd_new(&q, 1, 3, &a);
        if (kd_gc_compile(q.g, 1, 7)) {
            kd_gc_fill(&rng, q.es, 1, 0), kd_gc_fill(&rng, q.et, 1, 0);
            kd_gc_step(q.g, q.l, 1);
            CHECK(q.l->val.data[0] == 0.0f && kd_test_all_finite(q.es->grad.data, 3));
        }
        kd_graph_free(q.g);
    }
}

/* ============================================================ 3. PyTorch fixture */

/* Tolerances against the float64 reference stored as float32: the ops
 * compute in double from the same float32 inputs, so losses agree to a few
 * ulp; gradients are rounded to float32 on both sides (and the reduced path
 * goes through the Grams' eigenvalues, squares of the singular values),
 * hence 1e-5 relative with an absolute part scaled by the largest element.
 * A wrong formula is off by 1e-3 or more. */
#define FX_RTOL 1e-5
#define FX_ATOL_REL 1e-5

static int fx_get(const kd_safetensors *st, const char *key, float *dst, int ndim, const int *shape) {
    kd_status rc = kd_st_get_f32(st, key, dst, ndim, shape);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    return rc == KD_OK;
}

static void fx_expect(const kd_safetensors *st, const char *key, const float *have, int ndim, const int *shape) {
    int64_t k = kd_shape_numel(ndim, shape);
    float *want = kd_malloc((size_t)k * sizeof *want);
    if (fx_get(st, key, want, ndim, shape)) {
        double m = kd_test_max_abs(want, k);
        CHECK_MSG(m > 0.0, "%s: reference all zero", key);
        CHECK_ARRAYS(key, have, want, k, FX_ATOL_REL * m, FX_RTOL);
    }
    free(want);
}

static void fx_loss(const kd_safetensors *st, const char *key, double have) {
    float want;
    if (fx_get(st, key, &want, 1, (int[]){1}))
        CHECK_MSG(fabs(have - want) <= FX_RTOL * fabs(want), "%s: %.9g, PyTorch %.9g", key, have, want);
}

static void fx_geo(const kd_safetensors *st, const char *name, int op, const int *ss, const int *ts) {
    char k[64];
    int64_t ns = numel_of(ss), nt = numel_of(ts);
    float *s = kd_malloc((size_t)(2 * ns + 2 * nt) * sizeof *s), *t = s + ns, *gs = t + nt, *gt = gs + ns;
    snprintf(k, sizeof k, "%s.s", name);
    int ok = fx_get(st, k, s, ss[0], ss + 1);
    snprintf(k, sizeof k, "%s.t", name);
    ok = ok && fx_get(st, k, t, ts[0], ts + 1);
    for (int path = 0; ok && path < (op == PR ? 3 : 1); path++) {
        double v = geo_eval(op, ss, ts, path, s, t, gs, gt);
        snprintf(k, sizeof k, "%s.loss", name), fx_loss(st, k, v);
        snprintf(k, sizeof k, "%s.grad_s", name), fx_expect(st, k, gs, ss[0], ss + 1);
        snprintf(k, sizeof k, "%s.grad_t", name), fx_expect(st, k, gt, ts[0], ts + 1);
    }
    free(s);
}

static void fx_dcd(const kd_safetensors *st, const char *name, int N, int D, kd_dcd_args a) {
    char k[64];
    dcd_g q;
    dcd_new(&q, N, D, &a);
    if (kd_gc_compile(q.g, N, 7)) {
        int ok = 1;
        snprintf(k, sizeof k, "%s.es", name), ok &= fx_get(st, k, q.es->val.data, 2, (int[]){N, D});
        snprintf(k, sizeof k, "%s.et", name), ok &= fx_get(st, k, q.et->val.data, 2, (int[]){N, D});
        snprintf(k, sizeof k, "%s.theta", name), ok &= fx_get(st, k, q.th->val.data, 1, (int[]){1});
        snprintf(k, sizeof k, "%s.beta", name), ok &= fx_get(st, k, q.be->val.data, 1, (int[]){1});
        if (ok) {
            kd_gc_step(q.g, q.l, 1);
            snprintf(k, sizeof k, "%s.loss", name), fx_loss(st, k, q.l->val.data[0]);
            snprintf(k, sizeof k, "%s.grad_es", name), fx_expect(st, k, q.es->grad.data, 2, (int[]){N, D});
            snprintf(k, sizeof k, "%s.grad_et", name), fx_expect(st, k, q.et->grad.data, 2, (int[]){N, D});
            float want;
            snprintf(k, sizeof k, "%s.grad_theta", name);
            if (fx_get(st, k, &want, 1, (int[]){1}))
                CHECK_MSG(fabs(q.th->grad.data[0] - want) <= 1e-5 * fabs(want) + 1e-7, "%s: %.9g, PyTorch %.9g", k,
                          q.th->grad.data[0], want);
        }
    }
    kd_graph_free(q.g);
}

static void fixture(void) {
    TEST("PyTorch parity (tests/fixtures/geom.safetensors)") {
        char path[512];
        kd_test_fixture("geom.safetensors", path, sizeof path);
        kd_safetensors st;
        kd_status rc = kd_st_read(path, &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_geom.py)", kd_error_message());
        if (rc != KD_OK) break;
        fx_geo(&st, "pr_a", PR, (int[]){2, 7, 3}, (int[]){2, 7, 5});
        fx_geo(&st, "pr_b", PR, (int[]){2, 9, 12}, (int[]){2, 9, 5});
        fx_geo(&st, "pr_c", PR, (int[]){2, 4, 6}, (int[]){2, 4, 9});
        fx_geo(&st, "pr_d", PR, (int[]){2, 6, 6}, (int[]){2, 6, 6});
        fx_geo(&st, "pr_e", PR, (int[]){4, 5, 2, 2, 2}, (int[]){2, 5, 3});
        fx_geo(&st, "gr_a", GR, (int[]){2, 7, 3}, (int[]){2, 7, 5});
        fx_geo(&st, "gr_b", GR, (int[]){2, 4, 6}, (int[]){2, 4, 9});
        fx_geo(&st, "ck_a", CK, (int[]){2, 7, 3}, (int[]){2, 7, 5});
        fx_geo(&st, "ck_b", CK, (int[]){4, 5, 2, 2, 2}, (int[]){2, 5, 3});
        /* the arguments of gen_geom.py's dcd_case calls */
        fx_dcd(&st, "dcd_cross", 6, 5,
               (kd_dcd_args){.consist = KD_DCD_CROSS, .log_scale0 = 1.0f, .max_scale = 10.0f, .w_nce = 1.0f, .w_kl = 0.5f});
        fx_dcd(&st, "dcd_teacher", 5, 4,
               (kd_dcd_args){.consist = KD_DCD_TEACHER, .log_scale0 = 2.0f, .bias0 = 0.25f, .max_scale = 10.0f,
                             .w_nce = 1.0f, .w_kl = 1.0f});
        fx_dcd(&st, "dcd_clamp", 4, 3,
               (kd_dcd_args){.consist = KD_DCD_CROSS, .log_scale0 = 1.0f, .max_scale = 10.0f, .w_nce = 0.7f, .w_kl = 2.0f});
        kd_st_free(&st);
    }
}

/* ============================================================ 4. paths, threads, batch */

static void paths_and_determinism(void);

/* loss and the gradients of two trainable maps in front of op (0..2 geometry,
 * 3 dcd) at `threads`, compiled for max_batch and run at batch N; inputs from
 * a fixed seed */
static float *run_op(int op, int threads, int max_batch, int N, int Ds, int Dt, int path, int *k_out) {
    enum { IN = 16 };
    kd_graph *g = kd_graph_new();
    kd_graph_set_threads(g, threads);
    kd_node *xs = kd_input(g, "xs", 2, (int[]){max_batch, IN}), *xt = kd_input(g, "xt", 2, (int[]){max_batch, IN});
    kd_node *ws = kd_gc_param(g, "ws", 2, (int[]){Ds, IN}), *wt = kd_gc_param(g, "wt", 2, (int[]){Dt, IN});
    kd_node *fs = kd_matmul(g, xs, ws, NULL), *ft = kd_matmul(g, xt, wt, NULL), *l;
    if (op < 3) {
        l = GEO[op].fn(g, fs, ft);
        if (op == PR) l->ip[0] = path;
    } else {
        kd_node *th = kd_gc_param(g, "th", 1, (int[]){1}), *be = kd_gc_param(g, "be", 1, (int[]){1});
        kd_dcd_args a = {.consist = path, .log_scale0 = 1.0f, .max_scale = 10.0f, .w_nce = 1.0f, .w_kl = 1.0f};
        l = kd_dcd(g, kd_l2norm(g, fs), kd_l2norm(g, ft), th, be, &a);
    }
    float *out = NULL;
    if (kd_gc_compile(g, max_batch, 7)) {
        kd_graph_set_batch(g, N);
        kd_rng r;
        kd_rng_seed(&r, 4242);
        kd_gc_fill(&r, ws, 0.3f, 0), kd_gc_fill(&r, wt, 0.3f, 0), kd_gc_fill(&r, xs, 1, 0), kd_gc_fill(&r, xt, 1, 0.1f);
        kd_gc_step(g, l, 1);
        *k_out = 1 + (Ds + Dt) * IN;
        out = kd_malloc((size_t)*k_out * sizeof *out);
        out[0] = l->val.data[0];
        memcpy(out + 1, ws->grad.data, (size_t)Ds * IN * sizeof *out);
        memcpy(out + 1 + Ds * IN, wt->grad.data, (size_t)Dt * IN * sizeof *out);
    }
    kd_graph_free(g);
    return out;
}

static void paths_and_determinism(void) {
    TEST("procrustes: the direct and the reduced path agree (values and gradients)") {
        const int dims[][3] = {{7, 3, 5}, {4, 6, 9}, {9, 12, 5}, {6, 6, 6}, {12, 10, 14}};
        for (size_t c = 0; c < sizeof dims / sizeof dims[0]; c++) {
            int k = 0;
            float *a = run_op(PR, 1, dims[c][0], dims[c][0], dims[c][1], dims[c][2], 1, &k);
            float *b = run_op(PR, 1, dims[c][0], dims[c][0], dims[c][1], dims[c][2], 2, &k);
            if (a && b) {
                CHECK_CLOSE(a[0], b[0], 0, 1e-6);
                CHECK_ARRAYS("direct vs reduced gradients", a + 1, b + 1, k - 1, 1e-6 * kd_test_max_abs(b + 1, k - 1), 1e-5);
                CHECK(kd_test_max_abs(a + 1, k - 1) > 0.0);
            }
            free(a), free(b);
        }
    }
    TEST("all ops: bitwise the same on 1 and 3 threads, and at batch 23 compiled for 23 or for 64") {
        /* widths 40: auto takes the direct path at batch 64 and the reduced one at 23 */
        for (int op = 0; op < 5; op++) {
            int k = 0, o = op < 4 ? op : 3, path = op == 4 ? KD_DCD_TEACHER : 0;
            float *a = run_op(o, 1, 23, 23, 40, 40, path, &k), *b = run_op(o, 3, 23, 23, 40, 40, path, &k);
            float *c = run_op(o, 1, 64, 23, 40, 40, path, &k);
            if (a && b && c) {
                CHECK_MSG(memcmp(a, b, (size_t)k * sizeof *a) == 0, "op %d: depends on the thread count", op);
                CHECK_MSG(memcmp(a, c, (size_t)k * sizeof *a) == 0, "op %d: depends on the max batch", op);
                CHECK_MSG(kd_test_all_finite(a, k) && kd_test_max_abs(a + 1, k - 1) > 0.0, "op %d: degenerate", op);
            }
            free(a), free(b), free(c);
        }
        /* at 64 auto is direct; it agrees with the forced reduced path */
        int k = 0;
        float *a = run_op(PR, 1, 64, 64, 40, 40, 0, &k), *b = run_op(PR, 1, 64, 64, 40, 40, 2, &k);
        if (a && b) CHECK_CLOSE(a[0], b[0], 0, 1e-6);
        free(a), free(b);
    }
}

/* ============================================================ 5. loss rows */

typedef struct pair {
    kd_graph *g;
    kd_node *x, *y;
    kd_model s, t;
    kd_built_loss L;
} pair;

/* student and teacher on one input (6, 1, 6, 6), teacher frozen, then the
 * spec; the students' and teachers' features kept alive; compiled */
static kd_status pair_build(pair *p, const char *sspec, const char *tspec, const char *spec) {
    memset(p, 0, sizeof *p);
    p->g = kd_graph_new();
    p->x = kd_input(p->g, "x", 4, (int[]){6, 1, 6, 6});
    p->y = kd_input(p->g, "y", 1, (int[]){6});
    kd_status st = kd_model_build(p->g, sspec, "s.", p->x, 5, &p->s);
    kd_graph_set_frozen(p->g, 1);
    if (st == KD_OK) st = kd_model_build(p->g, tspec, "t.", p->x, 5, &p->t);
    kd_graph_set_frozen(p->g, 0);
    kd_loss_spec ls;
    if (st == KD_OK) st = kd_loss_spec_parse(spec, &ls);
    kd_loss_inputs in = {.student = &p->s,
                         .teacher = &p->t,
                         .s_logits = p->s.logits,
                         .t_logits = p->t.logits,
                         .labels = p->y};
    if (st == KD_OK) st = kd_loss_build(p->g, &ls, &in, &p->L);
    if (st == KD_OK) {
        p->s.feat->flags |= KD_F_KEEP;
        p->t.feat->flags |= KD_F_KEEP;
        st = kd_graph_compile(p->g, 6, 11);
    }
    if (st == KD_OK) {
        kd_gc_fill(&rng, p->x, 1, 0);
        for (int i = 0; i < 6; i++) p->y->val.data[i] = (float)(i % 5);
    }
    return st;
}

static kd_node *find(pair *p, const char *name) {
    kd_node *n = kd_graph_find(p->g, name);
    CHECK_MSG(n != NULL, "no node '%s'", name);
    return n;
}

static int shape_is(const kd_node *n, int ndim, const int *sh) {
    return n && n->val.ndim == ndim && memcmp(n->val.shape, sh, (size_t)ndim * sizeof(int)) == 0;
}

/* DCD (cross target) in double from embeddings zs, zt (N, D) already normalised */
static double naive_dcd(const double *zs, const double *zt, int N, int D, double scale, double w_nce, double w_kl) {
    double L[36], lr[6], lc[6], nce = 0, kl = 0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int d = 0; d < D; d++) s += zs[i * D + d] * zt[j * D + d];
            L[i * N + j] = scale * s;
        }
    for (int i = 0; i < N; i++) {
        double a = 0, b = 0;
        for (int j = 0; j < N; j++) a += exp(L[i * N + j]), b += exp(L[j * N + i]);
        lr[i] = log(a), lc[i] = log(b);
    }
    for (int i = 0; i < N; i++) {
        nce += (lr[i] - L[i * N + i]) / N;
        for (int j = 0; j < N; j++) {
            double lq = L[j * N + i] - lc[i], lp = L[i * N + j] - lr[i];
            kl += exp(lq) * (lq - lp) / N;
        }
    }
    return w_nce * nce + w_kl * kl;
}

static void loss_rows(void) {
    pair p;
    TEST("procrustes + gram + cka on models: no parameters, values as the ops on the features, student gradients") {
        kd_status st = pair_build(&p, "mlp: 12", "mlp: 20", "ce + procrustes + gram(weight=2) + cka");
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            pair q;
            size_t n_ce = 0;
            if (pair_build(&q, "mlp: 12", "mlp: 20", "ce") == KD_OK) n_ce = kd_graph_param_count(q.g);
            kd_graph_free(q.g);
            CHECK(kd_graph_param_count(p.g) == n_ce && n_ce > 0);
            kd_gc_step(p.g, p.L.total, 1);
            const int ss[3] = {2, 6, 12}, ts[3] = {2, 6, 20};
            for (int op = 0; op < 3; op++) {
                double v = geo_eval(op, ss, ts, 0, p.s.feat->val.data, p.t.feat->val.data, NULL, NULL);
                CHECK_CLOSE(p.L.terms[op + 1].value->val.data[0], v, 0, 1e-6);
                CHECK(p.L.terms[op + 1].value->op == (op == PR ? KD_OP_PROCRUSTES : op == GR ? KD_OP_GRAM_DIST : KD_OP_CKA));
            }
            CHECK(p.L.terms[2].weight == 2.0f);
            kd_node *w = find(&p, "s.fc1.weight");
            CHECK(w && kd_test_max_abs(w->grad.data, kd_numel(&w->val)) > 0);
        }
        kd_graph_free(p.g);
    }
    TEST("procrustes on maps: s=block1 (3 channels) vs t=block1 (6 channels), flattened") {
        kd_status st = pair_build(&p, "cnn: c3 p f8", "cnn: c6 p f12", "procrustes(s=block1, t=block1) + cka(s=block1)");
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_gc_step(p.g, p.L.total, 1);
            CHECK(isfinite(p.L.total->val.data[0]) && p.L.terms[0].value->val.data[0] > 0.0f);
            CHECK(p.L.terms[1].value->in[1] == p.t.feat); /* t defaults to feat */
        }
        kd_graph_free(p.g);
    }
    TEST("dcd: student head to the teacher's width, learned scale e^1 and bias 0, value by hand") {
        kd_status st = pair_build(&p, "mlp: 12", "mlp: 20", "dcd(weight_kl=0.5)");
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *hw = find(&p, "proj1.embed_s.weight"), *hb = find(&p, "proj1.embed_s.bias");
            kd_node *th = find(&p, "proj1.logit_scale"), *be = find(&p, "proj1.logit_bias");
            CHECK(shape_is(hw, 2, (int[]){20, 12}) && kd_graph_find(p.g, "proj1.embed_t.weight") == NULL);
            CHECK(shape_is(th, 1, (int[]){1}) && shape_is(be, 1, (int[]){1}));
            kd_node *v = p.L.terms[0].value;
            CHECK(v->op == KD_OP_DCD && v->ip[0] == KD_DCD_CROSS && v->fp[0] == 1.0f && v->fp[1] == 0.0f &&
                  v->fp[2] == 10.0f && v->fp[3] == 1.0f && v->fp[4] == 0.5f);
            kd_gc_step(p.g, p.L.total, 1);
            if (hw && hb && th && be) {
                double zs[6 * 20], zt[6 * 20];
                for (int i = 0; i < 6; i++) {
                    double ns = 0, nt = 0;
                    for (int o = 0; o < 20; o++) {
                        double s = hb->val.data[o];
                        for (int k = 0; k < 12; k++) s += (double)p.s.feat->val.data[i * 12 + k] * hw->val.data[o * 12 + k];
                        zs[i * 20 + o] = s, ns += s * s;
                        zt[i * 20 + o] = p.t.feat->val.data[i * 20 + o], nt += zt[i * 20 + o] * zt[i * 20 + o];
                    }
                    for (int o = 0; o < 20; o++) zs[i * 20 + o] /= sqrt(ns), zt[i * 20 + o] /= sqrt(nt);
                }
                CHECK_CLOSE(v->val.data[0], naive_dcd(zs, zt, 6, 20, exp(1.0), 1.0, 0.5), 0, 1e-5);
                CHECK(th->grad.data[0] != 0.0f && fabs(be->grad.data[0]) < 1e-6);
                CHECK(kd_test_max_abs(hw->grad.data, 240) > 0);
            }
        }
        kd_graph_free(p.g);
    }
    TEST("dcd(dim=16, consist=teacher): two heads; equal widths without dim: no head") {
        kd_status st = pair_build(&p, "mlp: 12", "mlp: 20", "dcd(dim=16, consist=teacher, init_logscale=2)");
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            CHECK(shape_is(find(&p, "proj1.embed_s.weight"), 2, (int[]){16, 12}));
            kd_node *ht = find(&p, "proj1.embed_t.weight");
            CHECK(shape_is(ht, 2, (int[]){16, 20}));
            CHECK(p.L.terms[0].value->ip[0] == KD_DCD_TEACHER && p.L.terms[0].value->fp[0] == 2.0f);
            kd_gc_step(p.g, p.L.total, 1);
            CHECK(ht && ht->grad.data && kd_test_max_abs(ht->grad.data, 320) > 0);
        }
        kd_graph_free(p.g);
        st = pair_build(&p, "mlp: 20", "mlp: 20", "ce + dcd");
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            CHECK(kd_graph_find(p.g, "proj2.embed_s.weight") == NULL && kd_graph_find(p.g, "proj2.logit_scale"));
            kd_gc_step(p.g, p.L.total, 1);
            CHECK(isfinite(p.L.total->val.data[0]));
        }
        kd_graph_free(p.g);
    }
}

static void row_errors(void) {
    const char *mlp_s = "mlp: 12", *mlp_t = "mlp: 20";
    const char *bad[][4] = {
        {mlp_s, mlp_t, "procrustes(s=nope)", "not a tap"},
        {mlp_s, mlp_t, "gram(proj=linear)", "no argument 'proj'"},
        {mlp_s, mlp_t, "cka(T=2)", "no argument 'T'"},
        {mlp_s, mlp_t, "dcd(consist=both)", "not one of cross, teacher"},
        {mlp_s, mlp_t, "dcd(init_logscale=3)", "above max_scale"},
        {mlp_s, mlp_t, "dcd(dim=1.5)", "not an integer"},
        {mlp_s, mlp_t, "dcd(weight_kl=-1)", "outside"},
        {mlp_s, mlp_t, "dcd(max_scale=0)", "outside"},
    };
    TEST("loss row errors name the problem") {
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            pair p;
            kd_status st = pair_build(&p, bad[i][0], bad[i][1], bad[i][2]);
            CHECK_MSG(st != KD_OK, "'%s' built", bad[i][2]);
            CHECK_MSG(strstr(kd_error_message(), bad[i][3]) != NULL, "'%s': %s", bad[i][2], kd_error_message());
            kd_graph_free(p.g);
        }
    }
    TEST("without models: a missing s_feat is an error naming the loss") {
        kd_graph *g = kd_graph_new();
        kd_node *s = kd_param(g, "s_logits", 2, (int[]){4, 3}, KD_INIT_ZERO, 1);
        kd_loss_spec ls;
        kd_built_loss L;
        kd_loss_inputs in = {.s_logits = s};
        CHECK(kd_loss_spec_parse("procrustes", &ls) == KD_OK);
        kd_status st = kd_loss_build(g, &ls, &in, &L);
        CHECK(st != KD_OK && strstr(kd_error_message(), "procrustes") && strstr(kd_error_message(), "s_feat"));
        kd_graph_free(g);
    }
}

/* ============================================================ 6. distill loss */

static int run_loss(const char *spec, const char *in, const char *out) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s loss \"%s\" --in %s --out %s > /dev/null 2>&1", kd_test_bin(), spec, in, out);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static void cli(void) {
    TEST("distill loss \"procrustes\" on s_feat/t_feat: PyTorch's loss and gradient") {
        char fx[512], in[512], out[512];
        kd_test_fixture("geom.safetensors", fx, sizeof fx);
        snprintf(in, sizeof in, "%s/geom_in.safetensors", kd_test_tmpdir());
        snprintf(out, sizeof out, "%s/geom_out.safetensors", kd_test_tmpdir());
        kd_safetensors st;
        if (kd_st_read(fx, &st) != KD_OK) {
            CHECK_MSG(0, "%s", kd_error_message());
            break;
        }
        float s[35], t[35];
        int ss[2] = {7, 3}, ts[2] = {7, 5};
        int ok = fx_get(&st, "pr_a.s", s, 2, ss) && fx_get(&st, "pr_a.t", t, 2, ts);
        kd_st_writer *w = kd_st_writer_new();
        kd_st_add_f32(w, "s_feat", 2, ss, s);
        kd_st_add_f32(w, "t_feat", 2, ts, t);
        CHECK(kd_st_write(w, in) == KD_OK);
        kd_st_writer_free(w);
        CHECK(ok && run_loss("procrustes", in, out) == 0);
        kd_safetensors o;
        if (ok && kd_st_read(out, &o) == KD_OK) {
            const kd_st_tensor *lt = kd_st_find(&o, "loss");
            float loss = NAN, g[21];
            if (lt && lt->ndim == 0) memcpy(&loss, lt->data, 4);
            fx_loss(&st, "pr_a.loss", loss);
            CHECK(kd_st_get_f32(&o, "grad.s_feat", g, 2, ss) == KD_OK);
            fx_expect(&st, "pr_a.grad_s", g, 2, ss);
            kd_st_free(&o);
        }
        /* a sum of terms: the logged terms add up with their weights */
        CHECK(run_loss("gram(weight=2) + cka + procrustes", in, out) == 0);
        if (kd_st_read(out, &o) == KD_OK) {
            float tot = NAN, a = NAN, b = NAN, c = NAN;
            const kd_st_tensor *x;
            if ((x = kd_st_find(&o, "loss"))) memcpy(&tot, x->data, 4);
            if ((x = kd_st_find(&o, "term.1.gram"))) memcpy(&a, x->data, 4);
            if ((x = kd_st_find(&o, "term.2.cka"))) memcpy(&b, x->data, 4);
            if ((x = kd_st_find(&o, "term.3.procrustes"))) memcpy(&c, x->data, 4);
            CHECK_CLOSE(tot, 2.0 * a + b + c, 0, 1e-6);
            CHECK_CLOSE(a, geo_eval(GR, (int[]){2, 7, 3}, (int[]){2, 7, 5}, 0, s, t, NULL, NULL), 0, 1e-6);
            kd_st_free(&o);
        }
        /* dcd needs no labels; widths differ: the student head comes from the seed */
        CHECK(run_loss("dcd(consist=teacher)", in, out) == 0);
        if (kd_st_read(out, &o) == KD_OK) {
            float loss = NAN, g[21];
            const kd_st_tensor *x = kd_st_find(&o, "loss");
            if (x) memcpy(&loss, x->data, 4);
            CHECK(isfinite(loss) && loss > 0.0f);
            CHECK(kd_st_get_f32(&o, "grad.s_feat", g, 2, ss) == KD_OK && kd_test_max_abs(g, 21) > 0.0);
            kd_st_free(&o);
        }
        /* a loss that needs features, given logits only: exit status 1 */
        w = kd_st_writer_new();
        kd_st_add_f32(w, "s_logits", 2, ss, s);
        CHECK(kd_st_write(w, in) == KD_OK);
        kd_st_writer_free(w);
        CHECK(run_loss("cka", in, out) == 1);
        kd_st_free(&st);
    }
}

void test_geom(void) {
    kd_rng_seed(&rng, 20250927);
    gradchecks();
    closed_forms();
    fixture();
    paths_and_determinism();
    loss_rows();
    row_errors();
    cli();
}
