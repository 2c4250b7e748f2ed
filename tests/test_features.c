/* test_features.c - tests for the feature and relation losses of
 * src/distill/feature.c: mse, at, sp, rkd, pkt.
 *
 * Four kinds of check:
 *   1. finite-difference gradient checks (tests/gradcheck.c) of each loss
 *      with respect to BOTH inputs, built as trainable leaves: batch 1 where
 *      the loss is not constant there (mse, at), N = 2/3 and odd N = 5 for
 *      the relation losses, different widths on the two sides;
 *   2. closed forms worked out by hand (mse of known arrays, a two-pixel
 *      attention map, orthogonal vs parallel rows for sp and pkt, a right vs
 *      an equilateral triangle for rkd), identical inputs giving 0 with zero
 *      gradients, batch 1 giving 0 without NaN, rkd's scale and translation
 *      invariance, coincident rows, and a naive rkd written from the
 *      definition (explicit unit difference vectors; it also confirms that
 *      the outlier inputs reach smooth-L1's linear branch);
 *   3. parity with PyTorch through tests/fixtures/features.safetensors
 *      (written by tests/fixtures/gen_features.py; missing fixture =
 *      failure): loss and both gradients, two settings per loss, plus sp
 *      and pkt on features with a large common offset (nearly equal rows of
 *      G and S: float32 Gram matrices would not do);
 *   4. shape errors at compile, results independent of the thread count,
 *      and of the batch the graph was compiled for (workspace layout).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "kd_distill.h"
#include "kd_io.h"
#include "test.h"

/* Acceptance threshold of the aggregate relative gradient error. The
 * losses are computed in double but handed out as one float32 scalar, so
 * the numeric side carries ~6e-8 * loss / step of rounding; correct
 * backwards measure 1e-7..1e-4 here, a wrong term 1e-2..1. */
#define GC_TOL 1e-3

static kd_rng rng;

/* ---------------------------------------------------------------- helpers */

static void set(kd_node *n, const float *v) { memcpy(n->val.data, v, (size_t)kd_numel(&n->val) * sizeof(float)); }

enum { MSE, AT, SP, RKD, PKT };
static const char *const op_names[] = {"mse", "at", "sp", "rkd", "pkt"};

/* the loss `op` on s, t; a, b: p for at, w_dist and w_angle for rkd */
static kd_node *loss_of(kd_graph *g, int op, kd_node *s, kd_node *t, float a, float b) {
    switch (op) {
    case MSE:
        return kd_mse(g, s, t);
    case AT:
        return kd_at(g, s, t, a);
    case SP:
        return kd_sp(g, s, t);
    case RKD:
        return kd_rkd(g, s, t, a, b);
    default:
        return kd_pkt(g, s, t);
    }
}

/* forward + backward from the loss itself (d loss = 1) */
static void step(kd_graph *g, kd_node *loss) {
    kd_graph_forward(g, 1);
    kd_graph_backward(g, loss);
}

/* ============================================================ 1. gradients */

static double rkd_naive(const float *xs, int Ds, const float *xt, int Dt, int N, double wd, double wa, int *lin);

/* Gradient check of loss `op` w.r.t. both s and t (shapes given as
 * {ndim, d0, d1, d2, d3}), inputs filled by `filler` (0 normal, 1 away from
 * zero, 2 rkd outlier: teacher row 0 far from the rest). */
static void gc_case(int op, const int *ss, const int *ts, float a, float b, int filler, double eps) {
    kd_graph *g = kd_graph_new();
    kd_node *s = kd_param(g, "s", ss[0], ss + 1, KD_INIT_ZERO, 1);
    kd_node *t = kd_param(g, "t", ts[0], ts + 1, KD_INIT_ZERO, 1);
    kd_node *loss = loss_of(g, op, s, t, a, b);
    kd_gc p = kd_gradcheck_project(g, loss);
    if (kd_gc_compile(g, 1, 7)) {
        if (filler == 1) {
            kd_gc_fill_away(&rng, s, 1.0f, 0.2f);
            kd_gc_fill_away(&rng, t, 1.0f, 0.2f);
        } else {
            kd_gc_fill(&rng, s, 1.0f, 0.0f);
            kd_gc_fill(&rng, t, 1.5f, 0.3f);
            if (filler == 2)
                for (int64_t i = 0; i < kd_numel(&t->val) / t->val.shape[0]; i++) t->val.data[i] += 8.0f;
        }
        if (op == RKD && filler == 2) {
            int lin, N = s->val.shape[0];
            rkd_naive(s->val.data, (int)(kd_numel(&s->val) / N), t->val.data, (int)(kd_numel(&t->val) / N), N, a, b,
                      &lin);
            CHECK_MSG(lin > 0, "rkd outlier case: smooth-L1's linear branch unused");
        }
        static uint64_t calls;
        kd_gradcheck_randomize(&p, 500 + calls++);
        kd_node *wrt[2] = {s, t};
        double err = kd_gradcheck(g, &p, wrt, 2, eps, 1);
        CHECK_MSG(err < GC_TOL, "%s s%s t%s (%g, %g): gradient error %.3g", op_names[op],
                  kd_shape_str(ss[0], ss + 1, (char[64]){0}, 64), kd_shape_str(ts[0], ts + 1, (char[64]){0}, 64), a, b,
                  err);
    }
    kd_graph_free(g);
}

static void gc_all(void) {
    TEST("gradcheck mse: 2-D, batch 1, 4-D") {
        gc_case(MSE, (int[]){2, 3, 4}, (int[]){2, 3, 4}, 0, 0, 0, 1e-2);
        gc_case(MSE, (int[]){2, 1, 5}, (int[]){2, 1, 5}, 0, 0, 0, 1e-2);
        gc_case(MSE, (int[]){4, 2, 3, 2, 2}, (int[]){4, 2, 3, 2, 2}, 0, 0, 0, 1e-2);
    }
    TEST("gradcheck at: p=2 with 3 vs 5 channels, batch 1, p=3 and p=1.5 away from 0") {
        gc_case(AT, (int[]){4, 2, 3, 4, 5}, (int[]){4, 2, 5, 4, 5}, 2.0f, 0, 0, 1e-2);
        gc_case(AT, (int[]){4, 1, 2, 3, 3}, (int[]){4, 1, 4, 3, 3}, 2.0f, 0, 0, 1e-2);
        gc_case(AT, (int[]){4, 3, 2, 2, 3}, (int[]){4, 3, 3, 2, 3}, 3.0f, 0, 1, 1e-2);
        gc_case(AT, (int[]){4, 3, 2, 2, 3}, (int[]){4, 3, 1, 2, 3}, 1.5f, 0, 1, 1e-2);
    }
    TEST("gradcheck sp: N=2 (6 vs 9 features), N=5 (4-D vs 2-D)") {
        gc_case(SP, (int[]){2, 2, 6}, (int[]){2, 2, 9}, 0, 0, 0, 1e-2);
        gc_case(SP, (int[]){4, 5, 2, 2, 2}, (int[]){2, 5, 3}, 0, 0, 0, 1e-2);
    }
    /* N = 2 has one distance (normalised to 1) and only b = c angles: rkd is
     * constant there (checked in closed_forms) */
    TEST("gradcheck rkd: distance only, angle only, both with an outlier (both smooth-L1 branches)") {
        gc_case(RKD, (int[]){2, 3, 4}, (int[]){2, 3, 6}, 1.0f, 0.0f, 0, 1e-2);
        gc_case(RKD, (int[]){4, 5, 2, 2, 2}, (int[]){2, 5, 7}, 0.0f, 1.0f, 0, 1e-2);
        gc_case(RKD, (int[]){2, 5, 2}, (int[]){2, 5, 7}, 25.0f, 50.0f, 2, 1e-2);
        gc_case(RKD, (int[]){2, 5, 3}, (int[]){2, 5, 3}, 1.0f, 2.0f, 0, 1e-2);
    }
    TEST("gradcheck pkt: N=2, N=5 (4-D vs 2-D)") {
        gc_case(PKT, (int[]){2, 2, 5}, (int[]){2, 2, 3}, 0, 0, 0, 1e-2);
        gc_case(PKT, (int[]){4, 5, 2, 2, 2}, (int[]){2, 5, 6}, 0, 0, 0, 1e-2);
    }
}

/* ============================================================ 2. closed forms */

/* Builds op(s, t) on parameters of the given shapes and values, runs
 * forward and backward; returns the graph (caller frees). */
static kd_graph *eval_case(int op, const int *ss, const float *sv, const int *ts, const float *tv, float a, float b,
                           kd_node **s_out, kd_node **t_out, kd_node **loss_out) {
    kd_graph *g = kd_graph_new();
    kd_node *s = kd_param(g, "s", ss[0], ss + 1, KD_INIT_ZERO, 1);
    kd_node *t = kd_param(g, "t", ts[0], ts + 1, KD_INIT_ZERO, 1);
    kd_node *loss = loss_of(g, op, s, t, a, b);
    if (!kd_gc_compile(g, 1, 7)) {
        kd_graph_free(g);
        return NULL;
    }
    set(s, sv);
    set(t, tv);
    step(g, loss);
    *s_out = s;
    *t_out = t;
    *loss_out = loss;
    return g;
}

static void closed_forms(void) {
    kd_node *s, *t, *l;
    kd_graph *g;
    TEST("mse of known arrays: value and both gradients") {
        /* differences 1, 0, -2, 3: mean of squares 14/4, grad 2(a-b)/4 */
        float a[4] = {1, 2, 3, 4}, b[4] = {0, 2, 5, 1};
        float ga[4] = {0.5f, 0.0f, -1.0f, 1.5f}, gb[4] = {-0.5f, 0.0f, 1.0f, -1.5f};
        if ((g = eval_case(MSE, (int[]){2, 2, 2}, a, (int[]){2, 2, 2}, b, 0, 0, &s, &t, &l))) {
            CHECK_CLOSE(l->val.data[0], 3.5, 0, 1e-7);
            CHECK_ARRAYS("mse grad a", s->grad.data, ga, 4, 1e-7, 0);
            CHECK_ARRAYS("mse grad b", t->grad.data, gb, 4, 1e-7, 0);
            kd_graph_free(g);
        }
    }
    TEST("at on a two-pixel map: (3,4) vs (1,0), p=2 and p=1") {
        /* p=2: m_s = (9,16)/sqrt(337), a_t = (1,0); loss = ((9/r-1)^2 + (16/r)^2)/2 = 1 - 9/r.
         * Two channels on the student side, (3,4) and (-3,-4), leave the mean of
         * f^2 unchanged; for p=1 they give m = (3,4): a_s = (0.6, 0.8), loss
         * ((0.6-1)^2 + 0.8^2)/2 = 0.4. */
        float sv[4] = {3, 4, -3, -4}, tv[2] = {1, 0};
        for (int p = 1; p <= 2; p++)
            if ((g = eval_case(AT, (int[]){4, 1, 2, 1, 2}, sv, (int[]){4, 1, 1, 1, 2}, tv, (float)p, 0, &s, &t, &l))) {
                double want = p == 2 ? 1.0 - 9.0 / sqrt(337.0) : 0.4;
                CHECK_CLOSE(l->val.data[0], want, 0, 1e-6);
                kd_graph_free(g);
            }
    }
    TEST("sp: orthogonal vs parallel rows; pkt: the same pair") {
        /* student rows (1,0),(0,1): G = I. teacher rows (1),(1): G = ones, rows
         * normalised to 1/sqrt(2). loss = (2(1 - 1/sqrt2)^2 + 2 * 1/2) / 4 */
        float sv[4] = {1, 0, 0, 1}, tv[2] = {1, 1};
        if ((g = eval_case(SP, (int[]){2, 2, 2}, sv, (int[]){2, 2, 1}, tv, 0, 0, &s, &t, &l))) {
            double r = 1.0 - 1.0 / sqrt(2.0);
            CHECK_CLOSE(l->val.data[0], (2.0 * r * r + 1.0) / 4.0, 0, 1e-6);
            kd_graph_free(g);
        }
        /* pkt: K_s = [[1, .5], [.5, 1]] -> P = [2/3, 1/3] per row, T = [1/2, 1/2];
         * mean over 4 entries of T log(T/P) = (log(3/4) + log(3/2)) / 4 = log(9/8) / 4
         * (eps = 1e-7 moves it by ~1e-7 relative) */
        if ((g = eval_case(PKT, (int[]){2, 2, 2}, sv, (int[]){2, 2, 1}, tv, 0, 0, &s, &t, &l))) {
            CHECK_CLOSE(l->val.data[0], log(9.0 / 8.0) / 4.0, 0, 2e-6);
            kd_graph_free(g);
        }
    }
    TEST("rkd: right triangle (student) vs equilateral triangle (teacher)") {
        /* Teacher distances all 1 -> normalised 1. Student distances 1, 1, sqrt2
         * (each twice in the ordered pairs), mean m = (2 + sqrt2)/3, so the
         * normalised differences are 1/m - 1 (4 entries) and sqrt2/m - 1 (2);
         * all below 1: L_d = sum 0.5 x^2 / 9. Angles (cosines) at b != c: the
         * teacher 0.5 everywhere; the student 0 at the right angle and 1/sqrt2
         * at the two others, each ordered (b, c) twice: L_a = (2 * 0.5 * 0.25 +
         * 4 * 0.5 * (1/sqrt2 - 0.5)^2) / 27. */
        float sv[6] = {0, 0, 1, 0, 0, 1}, tv[6] = {0, 0, 1, 0, 0.5f, (float)(sqrt(3.0) / 2.0)};
        double m = (2.0 + sqrt(2.0)) / 3.0, x1 = 1.0 / m - 1.0, x2 = sqrt(2.0) / m - 1.0;
        double ld = (4.0 * 0.5 * x1 * x1 + 2.0 * 0.5 * x2 * x2) / 9.0;
        double c = 1.0 / sqrt(2.0) - 0.5, la = (2.0 * 0.5 * 0.25 + 4.0 * 0.5 * c * c) / 27.0;
        float w[3][2] = {{1, 0}, {0, 1}, {25, 50}};
        for (int k = 0; k < 3; k++)
            if ((g = eval_case(RKD, (int[]){2, 3, 2}, sv, (int[]){2, 3, 2}, tv, w[k][0], w[k][1], &s, &t, &l))) {
                /* the teacher's sqrt(3)/2 is rounded to float: ~3e-8 relative */
                CHECK_CLOSE(l->val.data[0], w[k][0] * ld + w[k][1] * la, 0, 1e-6);
                kd_graph_free(g);
            }
    }
    TEST("identical inputs: loss 0, gradients 0 (pkt: to within its eps)") {
        for (int op = MSE; op <= PKT; op++) {
            int sh[5] = {4, 4, 3, 2, 3};
            float v[72];
            for (int i = 0; i < 72; i++) v[i] = kd_rng_normal(&rng);
            if ((g = eval_case(op, sh, v, sh, v, 2.0f, op == RKD ? 50.0f : 0.0f, &s, &t, &l))) {
                CHECK_MSG(l->val.data[0] == 0.0f, "%s: loss %g", op_names[op], l->val.data[0]);
                /* pkt: T log((T+eps)/(P+eps)) is 0 exactly, its gradient O(eps N / P) */
                double tol = op == PKT ? 1e-6 : 0.0;
                CHECK_MSG(kd_test_max_abs(s->grad.data, 72) <= tol && kd_test_max_abs(t->grad.data, 72) <= tol, "%s: |grad| %g, %g",
                          op_names[op], kd_test_max_abs(s->grad.data, 72), kd_test_max_abs(t->grad.data, 72));
                kd_graph_free(g);
            }
        }
    }
    TEST("batch 1: sp, rkd, pkt are 0 with zero (finite) gradients; at is not") {
        float sv[6] = {0.3f, -1, 2, 0.5f, 1, -0.7f}, tv[4] = {1, 2, -0.4f, 0.1f};
        for (int op = AT; op <= PKT; op++) {
            int ss[5] = {4, 1, op == AT ? 2 : 6, 1, op == AT ? 3 : 1};
            int ts[5] = {4, 1, op == AT ? 1 : 4, 1, op == AT ? 3 : 1};
            float tv3[3] = {1, 2, -0.4f};
            if ((g = eval_case(op, ss, sv, ts, op == AT ? tv3 : tv, 2.0f, 50.0f, &s, &t, &l))) {
                int64_t ns = kd_numel(&s->val), nt = kd_numel(&t->val);
                CHECK_MSG(kd_test_all_finite(l->val.data, 1) && kd_test_all_finite(s->grad.data, ns) && kd_test_all_finite(t->grad.data, nt),
                          "%s: not finite", op_names[op]);
                if (op == AT) {
                    CHECK_MSG(l->val.data[0] > 1e-3f && kd_test_max_abs(s->grad.data, ns) > 1e-3, "at N=1: loss %g",
                              l->val.data[0]);
                } else {
                    CHECK_MSG(fabsf(l->val.data[0]) < 1e-7f, "%s: loss %g", op_names[op], l->val.data[0]);
                    CHECK_MSG(kd_test_max_abs(s->grad.data, ns) < 1e-7 && kd_test_max_abs(t->grad.data, nt) < 1e-7, "%s: |grad| %g",
                              op_names[op], kd_test_max_abs(s->grad.data, ns));
                }
                kd_graph_free(g);
            }
        }
    }
    TEST("rkd at N=2 is constant: loss 0, gradients 0") {
        float sv[6] = {0.3f, -1, 2, 0.5f, 1, -0.7f}, tv[4] = {1, 2, -0.4f, 0.1f};
        if ((g = eval_case(RKD, (int[]){2, 2, 3}, sv, (int[]){2, 2, 2}, tv, 25.0f, 50.0f, &s, &t, &l))) {
            CHECK_MSG(fabsf(l->val.data[0]) < 1e-6f, "loss %g", l->val.data[0]);
            CHECK_MSG(kd_test_max_abs(s->grad.data, 6) < 1e-6 && kd_test_max_abs(t->grad.data, 4) < 1e-6, "|grad| %g",
                      kd_test_max_abs(s->grad.data, 6));
            kd_graph_free(g);
        }
    }
}

/* rkd from the definition: normalised distances (squared distances
 * clamped at 1e-12) and explicit unit difference vectors, all in double. x (N, D); returns w_d L_d + w_a L_a and
 * counts the entries on the linear branch of smooth-L1 in *lin. */
static double rkd_naive(const float *xs, int Ds, const float *xt, int Dt, int N, double wd, double wa, int *lin) {
    enum { NMAX = 8, DMAX = 8 };
    KD_ASSERT(N <= NMAX && Ds <= DMAX && Dt <= DMAX, "rkd_naive sizes");
    double d[2][NMAX][NMAX], e[2][NMAX][NMAX][DMAX], mu[2] = {0, 0};
    const float *x[2] = {xs, xt};
    int D[2] = {Ds, Dt};
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) {
                double ss = 0.0;
                for (int q = 0; q < D[k]; q++) {
                    double u = (double)x[k][j * D[k] + q] - x[k][i * D[k] + q];
                    e[k][i][j][q] = u;
                    ss += u * u;
                }
                /* pdist clamps the squared distance at 1e-12; a zero difference normalises to 0 */
                d[k][i][j] = i == j ? 0.0 : sqrt(fmax(ss, 1e-12));
                mu[k] += d[k][i][j] / (N * (N - 1));
                for (int q = 0; q < D[k]; q++) e[k][i][j][q] = ss > 0.0 ? e[k][i][j][q] / sqrt(ss) : 0.0;
            }
    double ld = 0.0, la = 0.0;
    *lin = 0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double x = d[0][i][j] / mu[0] - d[1][i][j] / mu[1];
            *lin += fabs(x) >= 1.0;
            ld += fabs(x) < 1.0 ? 0.5 * x * x : fabs(x) - 0.5;
        }
    for (int a = 0; a < N; a++)
        for (int b = 0; b < N; b++)
            for (int c = 0; c < N; c++) {
                double A[2] = {0, 0};
                for (int k = 0; k < 2; k++)
                    for (int q = 0; q < D[k]; q++) A[k] += e[k][a][b][q] * e[k][a][c][q];
                double x = A[0] - A[1];
                *lin += fabs(x) >= 1.0;
                la += fabs(x) < 1.0 ? 0.5 * x * x : fabs(x) - 0.5;
            }
    return wd * ld / (N * N) + wa * la / (N * N * N);
}

static void rkd_properties(void) {
    TEST("rkd vs a naive definition (outlier inputs use the linear branch); scale and shift invariance") {
        for (int outlier = 0; outlier <= 1; outlier++) {
            enum { N = 5, DS = 3, DT = 7 };
            float xs[N * DS], xt[N * DT];
            for (int i = 0; i < N * DS; i++) xs[i] = kd_rng_normal(&rng);
            for (int i = 0; i < N * DT; i++) xt[i] = 1.5f * kd_rng_normal(&rng) + (outlier && i < DT ? 8.0f : 0.0f);
            int lin;
            double want = rkd_naive(xs, DS, xt, DT, N, 25.0, 50.0, &lin);
            if (outlier) CHECK_MSG(lin > 0, "the outlier case never reaches smooth-L1's linear branch");
            kd_node *s, *t, *l;
            kd_graph *g = eval_case(RKD, (int[]){2, N, DS}, xs, (int[]){2, N, DT}, xt, 25.0f, 50.0f, &s, &t, &l);
            if (!g) continue;
            CHECK_CLOSE(l->val.data[0], want, 0, 1e-6);
            /* 3 x + 1.25 has the same normalised distances and angles */
            for (int i = 0; i < N * DS; i++) s->val.data[i] = 3.0f * xs[i] + 1.25f;
            kd_graph_forward(g, 1);
            CHECK_CLOSE(l->val.data[0], want, 0, 1e-5);
            kd_graph_free(g);
        }
    }
    TEST("rkd with coincident rows: the naive value (clamped distance, e = 0), finite moderate gradients") {
        enum { N = 5, D = 3 };
        float xs[N * D], xt[N * D];
        for (int i = 0; i < N * D; i++) {
            xs[i] = kd_rng_normal(&rng);
            xt[i] = kd_rng_normal(&rng);
        }
        memcpy(xs + 3 * D, xs + D, D * sizeof(float)); /* student rows 1 and 3 coincide */
        int lin;
        double want = rkd_naive(xs, D, xt, D, N, 25.0, 50.0, &lin);
        kd_node *s, *t, *l;
        kd_graph *g = eval_case(RKD, (int[]){2, N, D}, xs, (int[]){2, N, D}, xt, 25.0f, 50.0f, &s, &t, &l);
        if (g) {
            CHECK_CLOSE(l->val.data[0], want, 0, 1e-6);
            CHECK_MSG(kd_test_all_finite(s->grad.data, N * D) && kd_test_max_abs(s->grad.data, N * D) < 100.0 &&
                          kd_test_max_abs(s->grad.data, N * D) > 0.0,
                      "student |grad| %g", kd_test_max_abs(s->grad.data, N * D));
            kd_graph_free(g);
        }
    }
}

/* ============================================================ 3. PyTorch fixture */

/* Tolerances against the float64 PyTorch reference (stored as float32).
 * Both sides compute from the same float32 inputs in double and round once,
 * so on the development machine every loss and gradient matches to the last
 * bit. The margins allow for another compiler's SIMD order in the double
 * sums, and for gradient elements that nearly cancel (their absolute error
 * is that of the largest terms, hence an absolute part scaled by the
 * tensor's largest gradient). Still far below any formula error (>= 1e-3). */
#define FX_LOSS_RTOL 1e-5
#define FX_GRAD_RTOL 1e-5
#define FX_GRAD_ATOL_REL 1e-6

static int fx_load(const kd_safetensors *st, const char *key, kd_node *n) {
    kd_status rc = kd_st_get_f32(st, key, n->val.data, n->val.ndim, n->val.shape);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    return rc == KD_OK;
}

static void fx_expect_grad(const kd_safetensors *st, const char *key, const kd_node *n) {
    int64_t k = kd_numel(&n->val);
    float *want = kd_malloc((size_t)k * sizeof *want);
    kd_status rc = kd_st_get_f32(st, key, want, n->val.ndim, n->val.shape);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    if (rc == KD_OK) {
        double m = kd_test_max_abs(want, k);
        CHECK_MSG(m > 0.0, "%s: reference gradient all zero", key);
        CHECK_ARRAYS(key, n->grad.data, want, k, FX_GRAD_ATOL_REL * m, FX_GRAD_RTOL);
    }
    free(want);
}

typedef struct fx_case {
    const char *prefix;
    int op;
    int ss[5], ts[5];
    float a, b;
} fx_case;

static void fx_run(const kd_safetensors *st, const fx_case *c) {
    char key[96];
    kd_graph *g = kd_graph_new();
    kd_node *s = kd_param(g, "s", c->ss[0], c->ss + 1, KD_INIT_ZERO, 1);
    kd_node *t = kd_param(g, "t", c->ts[0], c->ts + 1, KD_INIT_ZERO, 1);
    kd_node *loss = loss_of(g, c->op, s, t, c->a, c->b);
    if (kd_gc_compile(g, 1, 7)) {
        snprintf(key, sizeof key, "%s.s", c->prefix);
        int ok = fx_load(st, key, s);
        snprintf(key, sizeof key, "%s.t", c->prefix);
        ok &= fx_load(st, key, t);
        float want;
        int one[1] = {1};
        snprintf(key, sizeof key, "%s.loss", c->prefix);
        kd_status rc = kd_st_get_f32(st, key, &want, 1, one);
        CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
        if (ok && rc == KD_OK) {
            step(g, loss);
            CHECK_MSG(fabs(loss->val.data[0] - want) <= FX_LOSS_RTOL * fabs(want), "%s: loss %.9g, PyTorch %.9g",
                      c->prefix, loss->val.data[0], want);
            snprintf(key, sizeof key, "%s.grad_s", c->prefix);
            fx_expect_grad(st, key, s);
            snprintf(key, sizeof key, "%s.grad_t", c->prefix);
            fx_expect_grad(st, key, t);
        }
    }
    kd_graph_free(g);
}

static void fixture(void) {
    TEST("PyTorch parity (tests/fixtures/features.safetensors)") {
        char path[512];
        kd_test_fixture("features.safetensors", path, sizeof path);
        kd_safetensors st;
        kd_status rc = kd_st_read(path, &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_features.py)", kd_error_message());
        if (rc != KD_OK) break;
        static const fx_case cases[] = {
            {"mse_2d", MSE, {2, 4, 10}, {2, 4, 10}, 0, 0},
            {"mse_4d", MSE, {4, 2, 3, 4, 5}, {4, 2, 3, 4, 5}, 0, 0},
            {"at_p2", AT, {4, 4, 3, 5, 6}, {4, 4, 6, 5, 6}, 2, 0},
            {"at_p3", AT, {4, 3, 4, 3, 5}, {4, 3, 2, 3, 5}, 3, 0},
            {"sp_4d", SP, {4, 5, 3, 4, 4}, {4, 5, 7, 2, 2}, 0, 0},
            {"sp_2d", SP, {2, 2, 6}, {2, 2, 9}, 0, 0},
            {"rkd_25_50", RKD, {2, 6, 10}, {2, 6, 16}, 25, 50},
            {"rkd_1_2", RKD, {4, 5, 2, 3, 3}, {2, 5, 12}, 1, 2},
            {"pkt_2d", PKT, {2, 6, 12}, {2, 6, 20}, 0, 0},
            {"pkt_4d", PKT, {4, 4, 3, 2, 2}, {2, 4, 5}, 0, 0},
            {"sp_offset", SP, {2, 6, 8}, {2, 6, 5}, 0, 0},
            {"pkt_offset", PKT, {2, 6, 8}, {2, 6, 5}, 0, 0},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) fx_run(&st, &cases[i]);
        kd_st_free(&st);
    }
}

/* ============================================================ 4. graph integration */

static void shape_errors(void) {
    TEST("shape errors are reported by compile, naming the node") {
        for (int c = 0; c < 5; c++) {
            kd_graph *g = kd_graph_new();
            int a4[4] = {4, 3, 5, 5}, b4[4] = {4, 3, 5, 4}, n3[2] = {3, 10}, n4[2] = {4, 10};
            kd_node *x = kd_input(g, "fs", 4, a4), *y;
            if (c == 0)
                y = kd_mse(g, x, kd_input(g, "ft", 4, b4)); /* W differs */
            else if (c == 1)
                y = kd_at(g, x, kd_input(g, "ft", 4, b4), 2.0f); /* W differs */
            else if (c == 2)
                y = kd_at(g, x, kd_input(g, "ft", 2, n4), 2.0f); /* not 4-D */
            else if (c == 3)
                y = kd_sp(g, kd_param(g, "s", 2, n3, KD_INIT_ZERO, 1),
                          kd_param(g, "t", 2, n4, KD_INIT_ZERO, 1)); /* N */
            else
                y = kd_rkd(g, kd_param(g, "s", 2, n3, KD_INIT_ZERO, 1), kd_param(g, "t", 2, n4, KD_INIT_ZERO, 1), 1, 1);
            kd_node_set_name(y, "culprit");
            kd_status st = kd_graph_compile(g, 4, 1);
            CHECK_MSG(st == KD_ESHAPE, "case %d: compile returned %d", c, (int)st);
            CHECK_MSG(strstr(kd_error_message(), "'culprit'") != NULL, "case %d: message '%s' does not name the node",
                      c, kd_error_message());
            kd_graph_free(g);
        }
    }
}

/* Shapes for the integration tests: {ndim, dims} of s and t per op, with
 * the batch dimension filled in by the caller. Large enough that every
 * parallel loop of feature.c runs on threads (N^2 D and N^3 above 32768,
 * mse above one 16384-element chunk). */
static void big_shapes(int op, int N, int *ss, int *ts) {
    if (op == AT) {
        int a[5] = {4, N, 16, 8, 8}, b[5] = {4, N, 8, 8, 8};
        memcpy(ss, a, sizeof a);
        memcpy(ts, b, sizeof b);
    } else {
        int a[5] = {2, N, op == MSE ? 420 : 200}, b[5] = {2, N, op == MSE ? 420 : 150};
        memcpy(ss, a, sizeof a);
        memcpy(ts, b, sizeof b);
    }
}

/* loss, grad s, grad t of op on parameters filled from seed, `threads` threads */
static float *run_threads(int op, int threads, int N, int64_t *ks, int64_t *kt) {
    int ss[5], ts[5];
    big_shapes(op, N, ss, ts);
    kd_graph *g = kd_graph_new();
    kd_graph_set_threads(g, threads);
    kd_node *s = kd_param(g, "s", ss[0], ss + 1, KD_INIT_ZERO, 1);
    kd_node *t = kd_param(g, "t", ts[0], ts + 1, KD_INIT_ZERO, 1);
    kd_node *loss = loss_of(g, op, s, t, 2.0f, 3.0f);
    float *out = NULL;
    if (kd_gc_compile(g, 1, 7)) {
        *ks = kd_numel(&s->val);
        *kt = kd_numel(&t->val);
        kd_rng_seed(&rng, 99 + op);
        kd_gc_fill(&rng, s, 1.0f, 0.1f);
        kd_gc_fill(&rng, t, 2.0f, 0.0f);
        step(g, loss);
        out = kd_malloc((size_t)(1 + *ks + *kt) * sizeof *out);
        out[0] = loss->val.data[0];
        memcpy(out + 1, s->grad.data, (size_t)*ks * sizeof *out);
        memcpy(out + 1 + *ks, t->grad.data, (size_t)*kt * sizeof *out);
    }
    kd_graph_free(g);
    return out;
}

static void threads_independent(void) {
    TEST("loss and gradients are bitwise the same on 1 and 3 threads") {
        for (int op = MSE; op <= PKT; op++) {
            int64_t ks = 0, kt = 0;
            float *a = run_threads(op, 1, 40, &ks, &kt), *b = run_threads(op, 3, 40, &ks, &kt);
            if (a && b) {
                int64_t k = 1 + ks + kt;
                CHECK_MSG(memcmp(a, b, (size_t)k * sizeof *a) == 0, "%s: results differ with the thread count",
                          op_names[op]);
                CHECK_MSG(kd_test_all_finite(a, k) && kd_test_max_abs(a + 1, ks) > 0.0 && kd_test_max_abs(a + 1 + ks, kt) > 0.0,
                          "%s: degenerate result", op_names[op]);
            }
            free(a);
            free(b);
        }
    }
}

/* op on inputs of batch N in a graph compiled for max_batch, behind a
 * trainable (last dim x last dim) matrix on each side so that gradients
 * exist; returns loss, grad of the student matrix, grad of the teacher's */
static float *run_batch(int op, int max_batch, int N, const float *xs, const float *xt, int64_t *kw) {
    int ss[5], ts[5];
    big_shapes(op, max_batch, ss, ts);
    int ls = ss[ss[0]], lt = ts[ts[0]];
    if (op != AT) ls = lt = 6; /* small projector widths suffice here */
    if (op != AT) ss[2] = ts[2] = 6;
    kd_graph *g = kd_graph_new();
    kd_node *is = kd_input(g, "s", ss[0], ss + 1), *it = kd_input(g, "t", ts[0], ts + 1);
    kd_node *ws = kd_param(g, "ws", 2, (int[]){ls, ls}, KD_INIT_ZERO, 1);
    kd_node *wt = kd_param(g, "wt", 2, (int[]){lt, lt}, KD_INIT_ZERO, 1);
    kd_node *loss = loss_of(g, op, kd_matmul(g, is, ws, NULL), kd_matmul(g, it, wt, NULL), 2.0f, 3.0f);
    float *out = NULL;
    if (kd_gc_compile(g, max_batch, 7)) {
        kd_graph_set_batch(g, N);
        kd_rng_seed(&rng, 5);
        kd_gc_fill(&rng, ws, 0.5f, 0.0f);
        kd_gc_fill(&rng, wt, 0.5f, 0.0f);
        memcpy(is->val.data, xs, (size_t)kd_numel(&is->val) * sizeof(float));
        memcpy(it->val.data, xt, (size_t)kd_numel(&it->val) * sizeof(float));
        step(g, loss);
        *kw = (int64_t)ls * ls + (int64_t)lt * lt;
        out = kd_malloc((size_t)(1 + *kw) * sizeof *out);
        out[0] = loss->val.data[0];
        memcpy(out + 1, ws->grad.data, (size_t)ls * ls * sizeof *out);
        memcpy(out + 1 + (size_t)ls * ls, wt->grad.data, (size_t)lt * lt * sizeof *out);
    }
    kd_graph_free(g);
    return out;
}

static void batch_independent(void) {
    TEST("a graph compiled for batch 8 and run at 5 equals one compiled for 5 (workspace layout)") {
        enum { MAXN = 8 * 16 * 8 * 8 };
        static float xs[MAXN], xt[MAXN];
        for (int i = 0; i < MAXN; i++) {
            xs[i] = kd_rng_normal(&rng);
            xt[i] = kd_rng_normal(&rng);
        }
        for (int op = MSE; op <= PKT; op++) {
            int64_t kw = 0;
            float *a = run_batch(op, 8, 5, xs, xt, &kw), *b = run_batch(op, 5, 5, xs, xt, &kw);
            if (a && b) {
                CHECK_MSG(memcmp(a, b, (size_t)(1 + kw) * sizeof *a) == 0, "%s: results depend on the max batch",
                          op_names[op]);
                CHECK_MSG(kd_test_all_finite(a, 1 + kw) && kd_test_max_abs(a + 1, kw) > 0.0, "%s: degenerate result", op_names[op]);
            }
            free(a);
            free(b);
        }
    }
}

void test_features(void) {
    kd_rng_seed(&rng, 20240611);
    gc_all();
    closed_forms();
    rkd_properties();
    fixture();
    shape_errors();
    threads_independent();
    batch_independent();
}
