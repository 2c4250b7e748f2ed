/* test_lelp.c - tests for src/distill/lelp.c (LELP, docs/losses/lelp.md).
 *
 *   1. group_lse: finite-difference gradient checks (batch 1, odd sizes,
 *      S = 1) and its closed form (log of the summed exponentials; S = 1 is
 *      the identity);
 *   2. the Jacobi eigen-solver against matrices of known spectrum (Q diag Q^T
 *      with a random orthogonal Q, a 2x2 closed form, a diagonal matrix, a
 *      repeated eigenvalue), residuals |A v - l v|, orthonormal vectors and
 *      the sign convention;
 *   3. the random orthogonal matrix: Q^T Q = I, determinism per seed;
 *   4. the Givens equalisation: equal diagonal, trace and spectrum kept;
 *   5. properties of the targets: rows sum to 1, class sums equal the
 *      teacher's probabilities, unit and equal coordinate variances after the
 *      rotation (unequal, descending without it), directions orthogonal to
 *      the head's rows and coordinates blind to the head's directions with
 *      the null-space projection, errors naming the class;
 *   6. value check against numpy (tests/fixtures/lelp.safetensors, written by
 *      tests/fixtures/gen_lelp.py from the same embeddings, head, logits and
 *      rotations) for the full method and both ablations;
 *   7. the student graph: class logits are the group log-sum-exp of the
 *      subclass logits, the loss equals its hand-computed value, a gradient
 *      check through the whole LELP loss, and refused loss terms;
 *   8. `distill run` with [distill] lelp on a few Fashion-MNIST images: the
 *      summary, the student's S*K-way checkpoint, and the config errors.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "gradcheck.h"
#include "kd_distill.h"
#include "kd_io.h"
#include "kd_lelp.h"
#include <cjson/cJSON.h>

#include "test.h"

#define GC_TOL 1e-3

static kd_rng rng;

/* ============================================================ 1. group_lse */

static void group_lse_tests(void) {
    TEST("group_lse gradient check") {
        static const int cases[][3] = {{1, 2, 3}, {5, 3, 2}, {3, 2, 5}, {4, 3, 1}, {7, 1, 4}};
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            int N = cases[c][0], K = cases[c][1], S = cases[c][2], sh[2] = {N, K * S};
            kd_graph *g = kd_graph_new();
            kd_node *x = kd_param(g, "x", 2, sh, KD_INIT_ZERO, 1);
            kd_node *y = kd_group_lse(g, x, S);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, N, 1)) {
                kd_gc_fill(&rng, x, 2.0f, 0.0f);
                kd_gradcheck_randomize(&p, 11 + c);
                double err = kd_gradcheck(g, &p, &x, 1, 1e-2, 1);
                CHECK_MSG(err < GC_TOL, "N=%d K=%d S=%d: err %g", N, K, S, err);
            }
            kd_graph_free(g);
        }
    }
    TEST("group_lse value (closed form, S=1 identity, large logits)") {
        int N = 3, K = 2, S = 4, sh[2] = {N, K * S};
        kd_graph *g = kd_graph_new();
        kd_node *x = kd_input(g, "x", 2, sh);
        kd_node *y = kd_group_lse(g, x, S);
        int sh1[2] = {N, 5};
        kd_node *x1 = kd_input(g, "x1", 2, sh1);
        kd_node *y1 = kd_group_lse(g, x1, 1);
        y->flags |= KD_F_KEEP;
        y1->flags |= KD_F_KEEP;
        if (kd_gc_compile(g, N, 1)) {
            for (int i = 0; i < N * K * S; i++) x->val.data[i] = (float)(0.37 * i - 2.0 + (i == 5 ? 300.0 : 0.0));
            for (int i = 0; i < N * 5; i++) x1->val.data[i] = (float)(i * i) * 0.1f - 1.0f;
            kd_graph_forward(g, 0);
            for (int r = 0; r < N * K; r++) {
                double s = 0.0, m = -INFINITY;
                for (int j = 0; j < S; j++) m = fmax(m, x->val.data[r * S + j]);
                for (int j = 0; j < S; j++) s += exp(x->val.data[r * S + j] - m);
                CHECK_CLOSE(y->val.data[r], m + log(s), 1e-5, 1e-6);
            }
            CHECK(y->val.shape[0] == N && y->val.shape[1] == K);
            CHECK_ARRAYS("identity", y1->val.data, x1->val.data, N * 5, 0, 0);
        }
        kd_graph_free(g);
    }
    TEST("group_lse shape error") {
        int sh[2] = {2, 7};
        kd_graph *g = kd_graph_new();
        kd_node *x = kd_input(g, "x", 2, sh);
        kd_group_lse(g, x, 3);
        CHECK(kd_graph_compile(g, 2, 1) == KD_ESHAPE);
        CHECK(strstr(kd_error_message(), "group_lse") != NULL);
        kd_graph_free(g);
    }
}

/* ============================================================ 2-4. linear algebra */

/* a (n,n) = q diag(l) q^T */
static void compose(double *a, const double *q, const double *l, int n) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int k = 0; k < n; k++) s += q[i * n + k] * l[k] * q[j * n + k];
            a[i * n + j] = s;
        }
}

/* max |A v_j - l_j v_j| and max |V^T V - I| */
static void eig_residuals(const double *a, const double *ev, const double *v, int n, double *res, double *orth) {
    *res = *orth = 0.0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < n; i++) {
            double s = 0.0;
            for (int k = 0; k < n; k++) s += a[i * n + k] * v[k * n + j];
            *res = fmax(*res, fabs(s - ev[j] * v[i * n + j]));
        }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int k = 0; k < n; k++) s += v[k * n + i] * v[k * n + j];
            *orth = fmax(*orth, fabs(s - (i == j)));
        }
}

static void linalg_tests(void) {
    TEST("Jacobi eigen-solver: known spectra") {
        static const int sizes[] = {1, 2, 5, 17, 40};
        for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
            int n = sizes[c];
            double *q = malloc(sizeof(double) * n * n), *a = malloc(sizeof(double) * n * n);
            double *v = malloc(sizeof(double) * n * n), *l = malloc(sizeof(double) * n), *ev = malloc(sizeof(double) * n);
            kd_random_orthogonal(q, n, &rng);
            for (int i = 0; i < n; i++) l[i] = (i % 3 == 0 ? -1.0 : 1.0) * (0.5 + 1.7 * i); /* distinct, mixed signs */
            compose(a, q, l, n);
            int sweeps = kd_sym_eig(ev, v, a, n);
            CHECK_MSG(sweeps < 100, "n=%d: %d sweeps", n, sweeps);
            /* expected: l sorted descending */
            for (int i = 0; i < n; i++)
                for (int j = i + 1; j < n; j++)
                    if (l[j] > l[i]) {
                        double t = l[i];
                        l[i] = l[j];
                        l[j] = t;
                    }
            double worst = 0.0, res, orth;
            for (int i = 0; i < n; i++) worst = fmax(worst, fabs(ev[i] - l[i]));
            CHECK_MSG(worst < 1e-9 * n, "n=%d: eigenvalue error %g", n, worst);
            eig_residuals(a, ev, v, n, &res, &orth);
            CHECK_MSG(res < 1e-9 * n && orth < 1e-10 * n, "n=%d: residual %g, orthogonality %g", n, res, orth);
            int signs_ok = 1; /* largest-magnitude entry of each vector positive */
            for (int j = 0; j < n; j++) {
                int big = 0;
                for (int k = 1; k < n; k++)
                    if (fabs(v[k * n + j]) > fabs(v[big * n + j]) + 1e-12) big = k;
                signs_ok &= v[big * n + j] > 0;
            }
            CHECK_MSG(signs_ok, "n=%d: sign convention", n);
            free(q), free(a), free(v), free(l), free(ev);
        }
    }
    TEST("Jacobi eigen-solver: 2x2 closed form, diagonal, repeated eigenvalue") {
        double a[4] = {2, 1, 1, 2}, ev[3], v[9];
        kd_sym_eig(ev, v, a, 2);
        CHECK_CLOSE(ev[0], 3.0, 1e-12, 0);
        CHECK_CLOSE(ev[1], 1.0, 1e-12, 0);
        double r = sqrt(0.5);
        CHECK_CLOSE(v[0], r, 1e-12, 0); /* (1, 1)/sqrt2 */
        CHECK_CLOSE(v[2], r, 1e-12, 0);
        CHECK_CLOSE(v[1], r, 1e-12, 0); /* (1, -1)/sqrt2: first entry positive on the tie */
        CHECK_CLOSE(v[3], -r, 1e-12, 0);
        double d[9] = {1, 0, 0, 0, 5, 0, 0, 0, -2};
        kd_sym_eig(ev, v, d, 3);
        CHECK(ev[0] == 5 && ev[1] == 1 && ev[2] == -2);
        CHECK(v[1 * 3 + 0] == 1 && v[0 * 3 + 1] == 1 && v[2 * 3 + 2] == 1);
        /* spectrum {4, 4, 1}: any basis of the 4-eigenspace, but residuals small */
        double q[9], l[3] = {4, 4, 1}, m[9], res, orth;
        kd_random_orthogonal(q, 3, &rng);
        compose(m, q, l, 3);
        kd_sym_eig(ev, v, m, 3);
        eig_residuals(m, ev, v, 3, &res, &orth);
        CHECK_CLOSE(ev[0], 4, 1e-12, 0);
        CHECK_CLOSE(ev[1], 4, 1e-12, 0);
        CHECK_CLOSE(ev[2], 1, 1e-12, 0);
        CHECK(res < 1e-12 && orth < 1e-12);
    }
    TEST("random orthogonal matrix (QR of a Gaussian)") {
        static const int sizes[] = {1, 2, 7, 30};
        for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
            int n = sizes[c];
            double *q = malloc(sizeof(double) * n * n), *q2 = malloc(sizeof(double) * n * n);
            kd_rng r1, r2;
            kd_rng_seed(&r1, 99);
            kd_rng_seed(&r2, 99);
            kd_random_orthogonal(q, n, &r1);
            kd_random_orthogonal(q2, n, &r2);
            double worst = 0.0;
            for (int i = 0; i < n; i++)
                for (int j = 0; j < n; j++) {
                    double s = 0.0, s2 = 0.0;
                    for (int k = 0; k < n; k++) s += q[k * n + i] * q[k * n + j], s2 += q[i * n + k] * q[j * n + k];
                    worst = fmax(worst, fmax(fabs(s - (i == j)), fabs(s2 - (i == j))));
                }
            CHECK_MSG(worst < 1e-13 * n, "n=%d: |Q^T Q - I| %g", n, worst);
            CHECK(memcmp(q, q2, sizeof(double) * n * n) == 0);
            kd_random_orthogonal(q2, n, &r2); /* the next draw differs */
            CHECK(n == 1 ? fabs(q2[0]) == 1.0 : memcmp(q, q2, sizeof(double) * n * n) != 0);
            free(q), free(q2);
        }
    }
    TEST("Givens equalisation") {
        static const int sizes[] = {1, 2, 3, 6};
        for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
            int S = sizes[c];
            double q[36], m[36], r[36], l[6], m2[36];
            for (int i = 0; i < S; i++) l[i] = 10.0 / (1 + i * i);
            kd_random_orthogonal(q, S, &rng);
            compose(m, q, l, S); /* q diag q^T: a symmetric matrix with spectrum l */
            for (int i = 0; i < S * S; i++) r[i] = (i % (S + 1)) == 0;
            double tr = 0.0;
            for (int i = 0; i < S; i++) tr += m[i * S + i];
            memcpy(m2, m, sizeof m);
            kd_lelp_equalize(m2, r, S);
            double worst = 0.0;
            for (int i = 0; i < S; i++) worst = fmax(worst, fabs(m2[i * S + i] - tr / S));
            CHECK_MSG(worst < 1e-12 * tr, "S=%d: diagonal spread %g", S, worst);
            /* r orthogonal and m2 = r^T m r */
            double e1 = 0.0, e2 = 0.0;
            for (int i = 0; i < S; i++)
                for (int j = 0; j < S; j++) {
                    double s = 0.0, t = 0.0;
                    for (int k = 0; k < S; k++) s += r[k * S + i] * r[k * S + j];
                    for (int a = 0; a < S; a++)
                        for (int b = 0; b < S; b++) t += r[a * S + i] * m[a * S + b] * r[b * S + j];
                    e1 = fmax(e1, fabs(s - (i == j)));
                    e2 = fmax(e2, fabs(t - m2[i * S + j]));
                }
            CHECK_MSG(e1 < 1e-13 && e2 < 1e-12 * tr, "S=%d: orthogonality %g, similarity %g", S, e1, e2);
        }
    }
}

/* ============================================================ 5. targets */

typedef struct prob {
    int N, D, K;
    float *h, *w, *t;
    int *labels;
} prob;

static prob make_prob(int N, int D, int K) {
    prob p = {N, D, K, malloc(sizeof(float) * N * D), malloc(sizeof(float) * K * D), malloc(sizeof(float) * N * K),
              malloc(sizeof(int) * N)};
    for (int i = 0; i < N; i++) p.labels[i] = i % K;
    for (int i = 0; i < N * D; i++) p.h[i] = kd_rng_normal(&rng) * (0.3f + (float)(i % D) / D) + 0.2f * p.labels[i / D];
    for (int i = 0; i < K * D; i++) p.w[i] = kd_rng_normal(&rng);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            double s = 0.0;
            for (int a = 0; a < D; a++) s += p.h[n * D + a] * p.w[k * D + a];
            p.t[n * K + k] = (float)s;
        }
    return p;
}

static void free_prob(prob *p) { free(p->h), free(p->w), free(p->t), free(p->labels); }

static void target_tests(void) {
    TEST("targets: rows sum to 1, class sums = teacher probabilities, variances") {
        prob p = make_prob(60, 11, 3);
        for (int null = 0; null <= 1; null++)
            for (int rot = 0; rot <= 1; rot++) {
                int S = 4, KS = p.K * S;
                kd_lelp_opts o = {.S = S, .T = 0.8f, .null_proj = null, .rotate = rot, .seed = 5};
                kd_lelp l;
                if (kd_lelp_fit(&l, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) != KD_OK) {
                    CHECK_MSG(0, "fit: %s", kd_error_message());
                    continue;
                }
                float *lq = malloc(sizeof(float) * p.N * KS);
                kd_lelp_targets(&l, lq, p.h, p.t, p.N);
                double worst_row = 0.0, worst_cls = 0.0;
                for (int n = 0; n < p.N; n++) {
                    double tot = 0.0, m = -INFINITY, z = 0.0;
                    for (int k = 0; k < p.K; k++) m = fmax(m, p.t[n * p.K + k]);
                    for (int k = 0; k < p.K; k++) z += exp(p.t[n * p.K + k] - m);
                    for (int k = 0; k < p.K; k++) {
                        double cs = 0.0;
                        for (int s = 0; s < S; s++) cs += exp(lq[n * KS + k * S + s]);
                        tot += cs;
                        worst_cls = fmax(worst_cls, fabs(cs - exp(p.t[n * p.K + k] - m) / z));
                    }
                    worst_row = fmax(worst_row, fabs(tot - 1.0));
                }
                CHECK_MSG(worst_row < 1e-5 && worst_cls < 1e-5, "null %d rot %d: row %g class %g", null, rot, worst_row,
                          worst_cls);
                /* variance of T*z over each class's own examples: 1 each when rotated;
                 * without rotation the PCA variances / their mean, descending */
                double z[64];
                for (int k = 0; k < p.K; k++) {
                    double s1[8] = {0}, s2[8] = {0};
                    int nk = 0;
                    for (int n = 0; n < p.N; n++) {
                        if (p.labels[n] != k) continue;
                        kd_lelp_coords(&l, z, p.h + n * p.D);
                        for (int s = 0; s < S; s++) s1[s] += z[k * S + s] * o.T, s2[s] += pow(z[k * S + s] * o.T, 2);
                        nk++;
                    }
                    double var[8], mean_var = 0.0;
                    for (int s = 0; s < S; s++) {
                        CHECK_CLOSE(s1[s] / nk, 0.0, 1e-9, 0); /* centred on the class mean */
                        var[s] = s2[s] / nk - pow(s1[s] / nk, 2);
                        mean_var += var[s] / S;
                        CHECK_CLOSE(var[s], l.var[k * S + s], 1e-9, 1e-9);
                    }
                    CHECK_CLOSE(mean_var, 1.0, 1e-9, 1e-9);
                    if (rot)
                        for (int s = 0; s < S; s++) CHECK_CLOSE(var[s], 1.0, 1e-9, 1e-9);
                    else
                        for (int s = 1; s < S; s++) CHECK_MSG(var[s] < var[s - 1] && var[0] > 1.05, "var %g %g", var[s - 1], var[s]);
                }
                if (null) { /* directions orthogonal to the head's rows; coordinates ignore them */
                    double worst = 0.0;
                    for (int i = 0; i < p.K * S; i++)
                        for (int k = 0; k < p.K; k++) {
                            double d = 0.0;
                            for (int a = 0; a < p.D; a++) d += l.dirs[i * p.D + a] * p.w[k * p.D + a];
                            worst = fmax(worst, fabs(d));
                        }
                    CHECK_MSG(worst < 1e-10, "direction . w = %g", worst);
                    float h2[16];
                    double z2[64];
                    for (int a = 0; a < p.D; a++) h2[a] = p.h[a] + 3.0f * p.w[a] - 2.0f * p.w[2 * p.D + a];
                    kd_lelp_coords(&l, z, p.h);
                    kd_lelp_coords(&l, z2, h2);
                    double dz = 0.0;
                    for (int i = 0; i < KS; i++) dz = fmax(dz, fabs(z[i] - z2[i]));
                    CHECK_MSG(dz < 1e-5, "moving along the head's rows changed z by %g", dz);
                }
                free(lq);
                kd_lelp_free(&l);
            }
        free_prob(&p);
    }
    TEST("targets: the rotation depends on the seed only") {
        prob p = make_prob(30, 8, 2);
        kd_lelp_opts o = {.S = 3, .T = 1, .null_proj = 1, .rotate = 1, .seed = 5};
        kd_lelp a, b, c;
        CHECK(kd_lelp_fit(&a, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_OK);
        CHECK(kd_lelp_fit(&b, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_OK);
        o.seed = 6;
        CHECK(kd_lelp_fit(&c, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_OK);
        size_t nb = sizeof(double) * 2 * 3 * 8;
        CHECK(memcmp(a.dirs, b.dirs, nb) == 0);
        CHECK(memcmp(a.dirs, c.dirs, nb) != 0);
        kd_lelp_free(&a), kd_lelp_free(&b), kd_lelp_free(&c);
        free_prob(&p);
    }
    TEST("fit errors name the problem") {
        prob p = make_prob(20, 6, 2);
        kd_lelp l;
        kd_lelp_opts o = {.S = 5, .T = 1, .null_proj = 1, .rotate = 1, .seed = 1};
        CHECK(kd_lelp_fit(&l, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_ECONFIG); /* 6 - 2 = 4 < 5 */
        CHECK(strstr(kd_error_message(), "only 4") != NULL);
        o.null_proj = 0;
        CHECK(kd_lelp_fit(&l, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_OK);
        kd_lelp_free(&l);
        o.S = 2;
        for (int i = 0; i < p.N; i++) p.labels[i] = i == 3 ? 1 : 0; /* class 1: one example */
        CHECK(kd_lelp_fit(&l, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_ECONFIG);
        CHECK(strstr(kd_error_message(), "class 1 has 1 training example") != NULL);
        for (int i = 0; i < p.N; i++) p.labels[i] = i % 2;
        for (int i = 0; i < p.N; i += 2) memcpy(p.h + i * p.D, p.h, sizeof(float) * p.D); /* class 0: one point */
        CHECK(kd_lelp_fit(&l, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_ECONFIG);
        CHECK(strstr(kd_error_message(), "class 0 have no variance") != NULL);
        o.T = 0;
        CHECK(kd_lelp_fit(&l, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_ECONFIG);
        o.T = 1, o.S = 0;
        CHECK(kd_lelp_fit(&l, p.h, p.labels, p.N, p.D, p.w, p.K, &o, NULL) == KD_ECONFIG);
        free_prob(&p);
    }
}

/* ============================================================ 6. numpy fixture */

static void fixture_tests(void) {
    TEST("targets match numpy (tests/fixtures/lelp.safetensors)") {
        char path[512];
        kd_safetensors st;
        kd_status rc = kd_st_read(kd_test_fixture("lelp.safetensors", path, sizeof path), &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_lelp.py)", kd_error_message());
        if (rc != KD_OK) break;
        int S = atoi(kd_st_meta(&st, "S") ? kd_st_meta(&st, "S") : "0");
        double T = atof(kd_st_meta(&st, "T") ? kd_st_meta(&st, "T") : "0");
        const kd_st_tensor *ht = kd_st_find(&st, "h"), *wt = kd_st_find(&st, "w");
        CHECK(S > 0 && T > 0 && ht && wt);
        if (!(S > 0 && ht && wt)) {
            kd_st_free(&st);
            break;
        }
        int N = (int)ht->shape[0], D = (int)ht->shape[1], K = (int)wt->shape[0], KS = K * S;
        int sh_h[2] = {N, D}, sh_w[2] = {K, D}, sh_t[2] = {N, K}, sh_l[1] = {N}, sh_r[3] = {K, S, S}, sh_q[2] = {N, KS};
        float *h = malloc(sizeof(float) * N * D), *w = malloc(sizeof(float) * K * D), *t = malloc(sizeof(float) * N * K);
        float *lf = malloc(sizeof(float) * N), *rf = malloc(sizeof(float) * K * S * S);
        float *want = malloc(sizeof(float) * N * KS), *got = malloc(sizeof(float) * N * KS);
        double *rot = malloc(sizeof(double) * K * S * S);
        int *labels = malloc(sizeof(int) * N);
        rc = kd_st_get_f32(&st, "h", h, 2, sh_h);
        if (rc == KD_OK) rc = kd_st_get_f32(&st, "w", w, 2, sh_w);
        if (rc == KD_OK) rc = kd_st_get_f32(&st, "t", t, 2, sh_t);
        if (rc == KD_OK) rc = kd_st_get_f32(&st, "labels", lf, 1, sh_l);
        if (rc == KD_OK) rc = kd_st_get_f32(&st, "rot", rf, 3, sh_r);
        CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
        for (int i = 0; i < N; i++) labels[i] = (int)lf[i];
        for (int i = 0; i < K * S * S; i++) rot[i] = rf[i];
        static const struct {
            const char *name;
            int null, rotate;
        } cases[] = {{"logq_full", 1, 1}, {"logq_nonull", 0, 1}, {"logq_norot", 1, 0}};
        for (int c = 0; c < 3 && rc == KD_OK; c++) {
            kd_lelp_opts o = {.S = S, .T = (float)T, .null_proj = cases[c].null, .rotate = cases[c].rotate, .seed = 1};
            kd_lelp l;
            kd_status fr = kd_lelp_fit(&l, h, labels, N, D, w, K, &o, rot);
            CHECK_MSG(fr == KD_OK, "%s: %s", cases[c].name, kd_error_message());
            if (fr != KD_OK || kd_st_get_f32(&st, cases[c].name, want, 2, sh_q) != KD_OK) continue;
            kd_lelp_targets(&l, got, h, t, N);
            /* both sides in double from the same float32 inputs; the eigenvectors come
             * from different solvers (Jacobi vs LAPACK), agreeing to ~1e-12; the stored
             * float32 rounding of log q (|log q| < 20) is the tolerance's floor */
            CHECK_ARRAYS(cases[c].name, got, want, (long)N * KS, 2e-5, 1e-5);
            kd_lelp_free(&l);
        }
        free(h), free(w), free(t), free(lf), free(rf), free(want), free(got), free(rot), free(labels);
        kd_st_free(&st);
    }
}

/* ============================================================ 7. student graph */

static void graph_tests(void) {
    kd_dataset ds = {.n = 10, .c = 1, .h = 3, .w = 3, .n_classes = 2, .mean = 0, .std = 1};
    TEST("LELP student graph: class logits, loss value, gradient check") {
        int S = 3, K = 2, B = 5;
        kd_distiller d;
        kd_status st = kd_lelp_distiller_build(&d, "mlp: 7", "ce(weight=0.3) + kd(T=2, weight=0.7)", &ds, S, B, 3);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st != KD_OK) break;
        kd_node *sub = kd_lelp_sub_logits(&d), *cls = d.c.m.logits;
        CHECK(sub && sub->val.shape[1] == K * S && cls->val.shape[1] == K && strcmp(cls->name, "s.class_logits") == 0);
        kd_graph_set_batch(d.c.g, B);
        for (int i = 0; i < B * 9; i++) d.c.x->val.data[i] = kd_rng_normal(&rng);
        for (int i = 0; i < B; i++) d.c.y->val.data[i] = (float)(i % K);
        /* targets: random distributions as log q, filled by the batch hook's helper */
        float logq[10 * 6];
        for (int n = 0; n < 10; n++) {
            double z = 0.0, v[6];
            for (int j = 0; j < K * S; j++) z += (v[j] = exp(kd_rng_normal(&rng)));
            for (int j = 0; j < K * S; j++) logq[n * K * S + j] = (float)log(v[j] / z);
        }
        int aug[4 * 5] = {0};
        for (int b = 0; b < B; b++) aug[4 * b + 3] = 9 - 2 * b;
        kd_lelp_fill(d.t_logits->val.data, logq, K * S, aug, B);
        CHECK(memcmp(d.t_logits->val.data + 2 * K * S, logq + 5 * K * S, sizeof(float) * K * S) == 0);
        kd_graph_forward(d.c.g, 1);
        double ce = 0.0, kl = 0.0, worst = 0.0;
        for (int b = 0; b < B; b++) {
            const float *u = sub->val.data + b * K * S, *t = d.t_logits->val.data + b * K * S;
            double cl[2];
            for (int k = 0; k < K; k++) {
                double s = 0.0;
                for (int j = 0; j < S; j++) s += exp(u[k * S + j]);
                cl[k] = log(s);
                worst = fmax(worst, fabs(cl[k] - cls->val.data[b * K + k]));
            }
            int y = b % K;
            ce += log(exp(cl[0]) + exp(cl[1])) - cl[y];
            /* T^2 KL(softmax(t/T) || softmax(u/T)) */
            double zt = 0.0, zu = 0.0;
            for (int j = 0; j < K * S; j++) zt += exp(t[j] / 2.0), zu += exp(u[j] / 2.0);
            for (int j = 0; j < K * S; j++) {
                double pt = exp(t[j] / 2.0) / zt;
                kl += 4.0 * pt * (log(pt) - (u[j] / 2.0 - log(zu)));
            }
        }
        CHECK_MSG(worst < 1e-5, "class logits off by %g", worst);
        CHECK_CLOSE(d.c.loss->val.data[0], 0.3 * ce / B + 0.7 * kl / B, 1e-5, 1e-5);
        CHECK(d.loss.n == 2 && strcmp(d.loss.terms[0].name, "ce") == 0);
        kd_distiller_free(&d);
    }
    TEST("LELP loss gradient check (subclass logits as parameters)") {
        /* the loss pieces on a parameter standing in for the head's output */
        int N = 3, K = 2, S = 3, sh[2] = {N, K * S}, ys[1] = {N};
        kd_graph *g = kd_graph_new();
        kd_node *u = kd_param(g, "u", 2, sh, KD_INIT_ZERO, 1);
        kd_node *t = kd_input(g, "t", 2, sh), *y = kd_input(g, "y", 1, ys);
        kd_node *cls = kd_group_lse(g, u, S);
        kd_node *l = kd_add(g, kd_scale(g, kd_cross_entropy(g, cls, y, 0.0f), 0.5f),
                            kd_scale(g, kd_divergence(g, u, t, NULL, KD_DIV_FKL, 1.0f, 0.0f, 1.0f), 0.5f));
        kd_gc p = kd_gradcheck_project(g, l);
        if (kd_gc_compile(g, N, 2)) {
            kd_gc_fill(&rng, u, 1.5f, 0.0f);
            kd_gc_fill(&rng, t, 1.0f, 0.0f);
            for (int i = 0; i < N; i++) y->val.data[i] = (float)((i + 1) % K);
            kd_gradcheck_randomize(&p, 3);
            double err = kd_gradcheck(g, &p, &u, 1, 1e-2, 1);
            CHECK_MSG(err < GC_TOL, "err %g", err);
        }
        kd_graph_free(g);
    }
    TEST("LELP student graph refuses other losses") {
        kd_distiller d;
        CHECK(kd_lelp_distiller_build(&d, "mlp: 7", "ce + dkd", &ds, 2, 4, 1) == KD_ECONFIG);
        CHECK(strstr(kd_error_message(), "'dkd' cannot be used with [distill] lelp") != NULL);
        CHECK(kd_lelp_distiller_build(&d, "mlp: 7", "ce + fitnet", &ds, 2, 4, 1) == KD_ECONFIG);
    }
}

/* ============================================================ 8. distill run */

static void groups_metadata(void) {
    TEST("checkpoint metadata 'groups' must split 'classes' into >= 2 classes") {
        const char *cases[][3] = {{"6", "3", ""}, {"6", "4", "does not divide"}, {"6", "6", "does not divide"},
                                  {"6", "x", "does not divide"}};
        for (int i = 0; i < 4; i++) {
            char path[512];
            snprintf(path, sizeof path, "%.400s/groups%d.safetensors", kd_test_tmpdir(), i);
            kd_st_writer *w = kd_st_writer_new();
            float v = 0.0f;
            int sh1[1] = {1};
            kd_st_add_f32(w, "x", 1, sh1, &v);
            kd_st_set_meta(w, "model", "mlp: 8");
            kd_st_set_meta(w, "classes", cases[i][0]);
            kd_st_set_meta(w, "input", "1,28,28");
            kd_st_set_meta(w, "normalize", "0.286,0.353");
            kd_st_set_meta(w, "groups", cases[i][1]);
            CHECK(kd_st_write(w, path) == KD_OK);
            kd_st_writer_free(w);
            kd_checkpoint_info info;
            kd_status st = kd_checkpoint_info_read(path, &info);
            if (!*cases[i][2])
                CHECK_MSG(st == KD_OK && info.groups == 3 && info.classes == 6, "%s", kd_error_message());
            else
                CHECK_MSG(st == KD_EFORMAT && strstr(kd_error_message(), cases[i][2]), "groups '%s': %s", cases[i][1],
                          kd_error_message());
        }
    }
}

static void cli_tests(void) {
    TEST("distill run with [distill] lelp") {
        const char *bin = getenv("KD_DISTILL") ? getenv("KD_DISTILL") : "build/distill";
        char dir[400], cmd[2400], path[600];
        snprintf(dir, sizeof dir, "%.300s/lelp", kd_test_tmpdir());
        mkdir(dir, 0755);
        const char *common = "--quiet --threads 1 --data.limit=300 --data.test_limit=200 --train.epochs=1 --teacher.epochs=2 "
                             "--train.batch=64 --data.label_map='0 0 0 0 0 1 1 1 1 1' --teacher.model='mlp: 24' "
                             "--student.model='mlp: 16' --distill.baseline=0";
        snprintf(cmd, sizeof cmd,
                 "%s run examples/fashion_kd.ini %s --run.out=%s --run.name=ok --teacher.checkpoint= --distill.lelp=3 "
                 "--distill.loss='ce(weight=0.5) + kd(T=1, weight=0.5)' > %s/ok.out 2> %s/ok.err",
                 bin, common, dir, dir, dir);
        CHECK_MSG(kd_test_sh("%s", cmd) == 0, "%s", cmd);
        snprintf(path, sizeof path, "%s/ok/student.safetensors", dir);
        kd_safetensors st;
        if (kd_st_read(path, &st) == KD_OK) {
            CHECK(kd_st_meta(&st, "classes") && strcmp(kd_st_meta(&st, "classes"), "6") == 0);
            CHECK(kd_st_meta(&st, "groups") && strcmp(kd_st_meta(&st, "groups"), "3") == 0);
            const kd_st_tensor *hw = kd_st_find(&st, "head.weight");
            CHECK(hw && hw->shape[0] == 6 && hw->shape[1] == 16);
            kd_st_free(&st);
        } else {
            CHECK_MSG(0, "%s", kd_error_message());
        }
        snprintf(path, sizeof path, "%s/ok/summary.json", dir);
        cJSON *summary = kd_test_read_json(path);
        double a = kd_test_json_num(summary, "student", "test_acc");
        cJSON_Delete(summary);
        CHECK_MSG(a > 0.5 && a <= 1.0, "student test_acc %g (binary task)", a);
        /* distill eval sums each class's subclasses (metadata groups = 3) and
         * reproduces the run's own test accuracy on the same 200 images */
        snprintf(cmd, sizeof cmd,
                 "%s eval %s/ok/student.safetensors --limit 200 --label-map '0 0 0 0 0 1 1 1 1 1' > %s/eval.out 2>&1", bin,
                 dir, dir);
        CHECK_MSG(kd_test_sh("%s", cmd) == 0, "%s", cmd);
        snprintf(path, sizeof path, "%s/eval.out", dir);
        char *ev = kd_test_slurp(path, NULL), *pa = ev ? strstr(ev, "accuracy ") : NULL;
        double ea = pa ? atof(pa + 9) / 100.0 : -1;
        CHECK_MSG(fabs(ea - a) < 1e-4, "distill eval accuracy %g, the run's %g: %s", ea, a, ev ? ev : "(no output)");
        free(ev);
        /* config errors name the key */
        static const struct {
            const char *args, *needle;
        } bad[] = {{"--distill.lelp=2 --data.crop=2", "[distill] lelp = '2': LELP targets are computed once"},
                   {"--distill.lelp=-1", "[distill] lelp = '-1': must be in [0, 64]"},
                   {"--distill.lelp=2 --distill.lelp_T=0", "[distill] lelp_T = '0': must be positive"},
                   {"--distill.lelp=2 --distill.mutual=1", "LELP needs one teacher model"},
                   {"--distill.lelp=2 --distill.loss='ce + dkd'", "'dkd' cannot be used with [distill] lelp"}};
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            snprintf(cmd, sizeof cmd,
                     "%s run examples/fashion_kd.ini %s --run.out=%s --run.name=bad%zu --teacher.checkpoint=%s/ok/teacher.safetensors %s "
                     "> /dev/null 2> %s/bad.err",
                     bin, common, dir, i, dir, bad[i].args, dir);
            int code = kd_test_sh("%s", cmd);
            snprintf(path, sizeof path, "%s/bad.err", dir);
            char *err = kd_test_slurp(path, NULL);
            CHECK_MSG(code == 1 && err && strstr(err, bad[i].needle), "%s: exit %d, stderr: %s", bad[i].args, code,
                      err ? err : "(none)");
            free(err);
        }
    }
}

void test_lelp(void) {
    kd_rng_seed(&rng, 20261122);
    group_lse_tests();
    linalg_tests();
    target_tests();
    fixture_tests();
    graph_tests();
    groups_metadata();
    cli_tests();
}
