/* test_rank.c - tests for the RLKD rank-alignment op (src/distill/rank.c,
 * kd_rank_align) and its loss row rlkd (src/distill/build_logit2.c).
 *
 *   1. finite-difference gradient checks (tests/gradcheck.c) on logits with
 *      well-separated values, so the peak sets cannot change within a step:
 *      (5, 9) k=3; one row; k = V; a 3-D (2, 3, 11) input with a masked row;
 *      a small tau;
 *   2. parity with PyTorch via tests/fixtures/rank.safetensors (written by
 *      tests/fixtures/gen_rank.py, an independent float64 implementation;
 *      a missing fixture fails): loss and gradient of s, 2-D and 3-D,
 *      masks, ties, k = V, a wide vocabulary;
 *   3. closed forms: with a small tau the loss is 1 - Spearman's rho of the
 *      hard ranks, 6 sum d^2 / (n (n^2 - 1)); a student ordered as the
 *      teacher gives ~0, a reversed one ~2; the tie rule (lower id first)
 *      decides the peaks;
 *   4. the graph contract: masked rows leave the mean and get no gradient,
 *      no kept rows give 0, constant logits give loss 1 and no gradient,
 *      the batch may shrink after compile, gradients accumulate, the result
 *      does not depend on the thread count;
 *   5. the loss row: defaults, ranges and messages of k and tau, k > V
 *      through the spec (KD_ECONFIG) and through the op (KD_ESHAPE at
 *      compile), and `distill loss "rlkd(k=4)"` end to end.
 */
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gradcheck.h"
#include "kd_distill.h"
#include "kd_io.h"
#include "kd_losses.h"
#include "test.h"

/* Aggregate relative error accepted by the finite-difference checks: as
 * tests/test_losses2.c (float32 forward, steps of 1e-2); this op measures
 * 1e-6..1e-4 (KD_GC_VERBOSE=1 prints them). */
#define GC_TOL 2e-3

static kd_rng rng;

static int verbose(void) { return getenv("KD_GC_VERBOSE") != NULL; }

/* z (R, V): each row a random permutation of {0, 1, ..., V-1} * gap plus a
 * jitter below gap / 5: distinct values, at least 0.6 gap apart */
static void fill_spread(float *z, int R, int V, float gap) {
    for (int r = 0; r < R; r++) {
        float *row = z + (size_t)r * V;
        for (int i = 0; i < V; i++) row[i] = (float)i;
        for (int i = V - 1; i > 0; i--) {
            int j = (int)kd_rng_below(&rng, (uint32_t)(i + 1));
            float tmp = row[i];
            row[i] = row[j];
            row[j] = tmp;
        }
        for (int i = 0; i < V; i++) row[i] = gap * (row[i] - 0.5f * V) + 0.2f * gap * kd_rng_uniform(&rng);
    }
}

/* ---------------------------------------------------------------- one-loss graphs
 * s a trainable leaf of `shape`, t an input, mask an input of the logits'
 * shape without V (one value per row; its first dim follows the batch) or
 * absent. */

typedef struct rg {
    kd_graph *g;
    kd_node *s, *t, *mask, *loss;
    kd_gc gc;
    int R, V, n;
} rg;

static int rg_build(rg *G, int ndim, const int *shape, int with_mask, int k, float tau, int project) {
    memset(G, 0, sizeof *G);
    G->V = shape[ndim - 1];
    G->n = (int)kd_shape_numel(ndim, shape);
    G->R = G->n / G->V;
    kd_graph *g = G->g = kd_graph_new();
    G->s = kd_param(g, "s", ndim, shape, KD_INIT_ZERO, 1);
    G->t = kd_input(g, "t", ndim, shape);
    if (with_mask) G->mask = kd_input(g, "mask", ndim - 1, shape);
    G->loss = kd_rank_align(g, G->s, G->t, G->mask, k, tau);
    if (project) G->gc = kd_gradcheck_project(g, G->loss);
    return kd_gc_compile(g, shape[0], 42);
}

static void rg_fill(rg *G, const float *s, const float *t, const float *mask) {
    memcpy(G->s->val.data, s, (size_t)G->n * sizeof(float));
    memcpy(G->t->val.data, t, (size_t)G->n * sizeof(float));
    if (G->mask) memcpy(G->mask->val.data, mask, (size_t)G->R * sizeof(float));
}

static void rg_run(rg *G) {
    kd_graph_forward(G->g, 1);
    kd_graph_backward(G->g, G->loss);
}

/* loss (and, when grad != NULL, the gradient of s) of one graph */
static float rank_loss(int ndim, const int *shape, const float *s, const float *t, const float *mask, int k, float tau,
                       float *grad) {
    rg G;
    float l = NAN;
    if (rg_build(&G, ndim, shape, mask != NULL, k, tau, 0)) {
        rg_fill(&G, s, t, mask);
        rg_run(&G);
        l = G.loss->val.data[0];
        if (grad) memcpy(grad, G.s->grad.data, (size_t)G.n * sizeof(float));
    }
    kd_graph_free(G.g);
    return l;
}

/* ============================================================ 1. gradient checks */

static void test_gradcheck(void) {
    TEST("gradcheck: (5,9) k=3; (1,7) one row; (3,5) k=V; (2,3,11) row 4 masked; tau 0.3..2") {
        struct {
            int ndim, shape[3], k, masked;
            float tau, gap;
        } C[] = {
            {2, {5, 9}, 3, -1, 1.0f, 0.5f},    {2, {1, 7}, 2, -1, 0.5f, 0.5f},  {2, {3, 5}, 5, -1, 2.0f, 0.5f},
            {3, {2, 3, 11}, 4, 4, 1.0f, 0.5f}, {2, {4, 13}, 6, 1, 0.3f, 0.25f}, {2, {3, 40}, 2, -1, 1.0f, 0.1f},
        };
        for (int c = 0; c < (int)(sizeof C / sizeof C[0]); c++) {
            rg G;
            double err = INFINITY;
            if (rg_build(&G, C[c].ndim, C[c].shape, C[c].masked >= 0, C[c].k, C[c].tau, 1)) {
                float *s = kd_malloc((size_t)G.n * sizeof(float)), *t = kd_malloc((size_t)G.n * sizeof(float));
                float mask[16];
                fill_spread(s, G.R, G.V, C[c].gap);
                fill_spread(t, G.R, G.V, C[c].gap);
                for (int r = 0; r < G.R; r++) mask[r] = r == C[c].masked ? 0.0f : 1.0f;
                rg_fill(&G, s, t, mask);
                kd_gradcheck_randomize(&G.gc, 300 + (uint64_t)c);
                err = kd_gradcheck_ex(G.g, &G.gc, &G.s, 1, 1e-2, 1, verbose() ? 0.0 : 1e-2);
                if (C[c].masked >= 0) { /* the masked row got nothing */
                    double m = 0.0;
                    for (int i = 0; i < G.V; i++) m = fmax(m, fabs(G.s->grad.data[(size_t)C[c].masked * G.V + i]));
                    CHECK_MSG(m == 0.0, "case %d: masked row has gradient %g", c, m);
                }
                free(s);
                free(t);
            }
            kd_graph_free(G.g);
            CHECK_MSG(err < GC_TOL, "case %d: gradient error %.3g", c, err);
            if (verbose()) fprintf(stderr, "  gc rank case %d %.3g\n", c, err);
        }
    }
}

/* ============================================================ 2. PyTorch fixture */

static void fixture_case(const kd_safetensors *st, const char *name) {
    char key[96];
    snprintf(key, sizeof key, "%s.s", name);
    const kd_st_tensor *ts = kd_st_find(st, key);
    CHECK_MSG(ts && ts->ndim >= 2 && ts->ndim <= 3, "fixture: no 2-D or 3-D tensor %s", key);
    if (!ts || ts->ndim < 2 || ts->ndim > 3) return;
    int ndim = ts->ndim, shape[3];
    for (int i = 0; i < ndim; i++) shape[i] = (int)ts->shape[i];
    int n = (int)kd_shape_numel(ndim, shape), R = n / shape[ndim - 1];
    float *s = kd_malloc((size_t)n * sizeof(float)), *t = kd_malloc((size_t)n * sizeof(float));
    float *gs = kd_malloc((size_t)n * sizeof(float)), *ge = kd_malloc((size_t)n * sizeof(float));
    float *mask = kd_malloc((size_t)R * sizeof(float)), args[2], le;
    int one[1] = {1}, two[1] = {2}, rs[1] = {R}, ok = 1;
    snprintf(key, sizeof key, "%s.mask", name);
    int has_mask = kd_st_find(st, key) != NULL;
    const char *what[6] = {"s", "t", "args", "loss", "grad_s", "mask"};
    float *dst[6] = {s, t, args, &le, ge, mask};
    for (int i = 0; i < (has_mask ? 6 : 5) && ok; i++) {
        snprintf(key, sizeof key, "%s.%s", name, what[i]);
        int nd = i < 2 || i == 4 ? ndim : 1;
        const int *sh = i < 2 || i == 4 ? shape : i == 2 ? two : i == 3 ? one : rs;
        kd_status rc = kd_st_get_f32(st, key, dst[i], nd, sh);
        CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
        ok = rc == KD_OK;
    }
    if (ok) {
        float l = rank_loss(ndim, shape, s, t, has_mask ? mask : NULL, (int)args[0], args[1], gs);
        /* the loss is summed in double and rounded once: float32 rounding of
         * the inputs is shared, so 1e-6 relative is ample */
        CHECK_MSG(fabs(l - le) <= 2e-6 * fmax(1.0, fabs(le)), "%s: loss %.9g, PyTorch %.9g", name, (double)l,
                  (double)le);
        /* gradients: each element one float32 rounding of a double sum;
         * the atol is relative to the largest element */
        double gmax = 0.0;
        for (int i = 0; i < n; i++) gmax = fmax(gmax, fabs(ge[i]));
        CHECK_MSG(gmax > 0.0, "%s: the reference gradient is all zero", name);
        char w[64];
        snprintf(w, sizeof w, "%s.grad_s", name);
        CHECK_ARRAYS(w, gs, ge, n, 1e-6 * gmax, 1e-5);
    }
    free(s);
    free(t);
    free(gs);
    free(ge);
    free(mask);
}

static void test_fixture(void) {
    TEST("PyTorch parity (tests/fixtures/rank.safetensors)") {
        char path[512];
        kd_test_fixture("rank.safetensors", path, sizeof path);
        kd_safetensors st;
        kd_status rc = kd_st_read(path, &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_rank.py)", kd_error_message());
        if (rc != KD_OK) return;
        const char *cases[] = {"basic", "seq3d", "one_row", "ties", "k_eq_v", "wide"};
        for (int i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) fixture_case(&st, cases[i]);
        kd_st_free(&st);
    }
}

/* ============================================================ 3. closed forms */

static void test_closed_forms(void) {
    TEST("small tau: 1 - Spearman of the hard ranks, 6 sum d^2 / (n (n^2 - 1)), k = V") {
        /* teacher in decreasing order (ranks 1..6); the student's ranks of
         * the same ids are perm[i] + 1 */
        const int perm[3][6] = {{1, 0, 2, 3, 5, 4}, {5, 4, 3, 2, 1, 0}, {2, 0, 4, 1, 5, 3}};
        for (int c = 0; c < 3; c++) {
            float s[6], t[6];
            double d2 = 0.0;
            for (int i = 0; i < 6; i++) {
                t[i] = 3.0f - (float)i;
                s[i] = 2.5f - 0.9f * (float)perm[c][i];
                d2 += (double)(perm[c][i] - i) * (perm[c][i] - i);
            }
            int sh[2] = {1, 6};
            float l = rank_loss(2, sh, s, t, NULL, 6, 0.01f, NULL);
            double want = 6.0 * d2 / (6.0 * 35.0); /* 1 - rho = 6 sum d^2 / (n (n^2 - 1)) */
            CHECK_MSG(fabs(l - want) < 1e-6, "perm %d: loss %.9g, want %.9g", c, (double)l, want);
        }
    }
    TEST("student ordered as the teacher -> ~0; reversed -> ~2 (tau 0.01, k=4 of V=23, 6 rows)") {
        int R = 6, V = 23, sh[2] = {R, V}, n = R * V;
        float *t = kd_malloc((size_t)n * sizeof(float)), *s = kd_malloc((size_t)n * sizeof(float));
        float *g = kd_malloc((size_t)n * sizeof(float));
        fill_spread(t, R, V, 0.5f);
        for (int i = 0; i < n; i++) s[i] = 3.0f * t[i] + 1.0f; /* the same order, another scale */
        float l = rank_loss(2, sh, s, t, NULL, 4, 0.01f, g);
        CHECK_MSG(l >= 0.0f && l < 1e-6f, "same order: loss %.9g", (double)l);
        for (int i = 0; i < n; i++) s[i] = -0.7f * t[i]; /* reversed: the union is top-4 + bottom-4 */
        l = rank_loss(2, sh, s, t, NULL, 4, 0.01f, g);
        CHECK_MSG(l > 2.0f - 1e-6f && l <= 2.0f + 1e-6f, "reversed: loss %.9g", (double)l);
        free(t);
        free(s);
        free(g);
    }
    TEST("teacher ties: the lower id is a peak first; tied values share their soft rank") {
        /* peaks 0, 1, 3: a = s = (0, 5, 1) has hard ranks (3, 1, 2), b = t =
         * (3, 1, 0) has (1, 2, 3); d = (2, -1, -1), 1 - rho = 6*6/(3*8) = 1.5.
         * Had the tie gone to id 2 the peaks would be {0, 2, 1, 3} and the
         * loss different (teacher ranks with a tie). */
        float t[4] = {3, 1, 1, 0}, s[4] = {0, 5, -5, 1};
        int sh[2] = {1, 4};
        float l = rank_loss(2, sh, s, t, NULL, 2, 0.01f, NULL);
        CHECK_MSG(fabs(l - 1.5) < 1e-6, "loss %.9g, want 1.5", (double)l);
        /* tied teacher values inside the peaks: t = (3, 1, 1, 0), s = (0, -5,
         * 5, 1), k=2: peaks {0, 1} + {2, 3} = every id; a = s has hard
         * ranks (3, 4, 1, 2), b = t soft ranks (1, 2.5, 2.5, 4) (sigmoid(0)
         * = 1/2 for the tie): centred (-1.5, 0, 0, 1.5) and (0.5, 1.5,
         * -1.5, -0.5), rho = (-0.75 - 0.75) / (sqrt(4.5) sqrt(5)) */
        float t2[4] = {3, 1, 1, 0}, s2[4] = {0, -5, 5, 1};
        float l2 = rank_loss(2, sh, s2, t2, NULL, 2, 0.01f, NULL);
        double rho = -1.5 / (sqrt(4.5) * sqrt(5.0));
        CHECK_MSG(fabs(l2 - (1.0 - rho)) < 1e-6, "loss %.9g, want %.9g", (double)l2, 1.0 - rho);
        /* a tie met while the buffer fills, then displaced from behind:
         * t = (1, 1, 3, 2, 0, -1), k=3: top 3 = {2, 3, 0} (id 0 before id
         * 1); s = (0, -5, 5, -3, 4, 3), top 3 = {2, 4, 5}; peaks (2, 3, 0,
         * 4, 5): a ranks (1, 5, 4, 2, 3), b ranks (1, 2, 3, 4, 5), sum d^2
         * = 18, 1 - rho = 6 * 18 / (5 * 24) = 0.9 (with id 1 instead: 0.8) */
        float t3[6] = {1, 1, 3, 2, 0, -1}, s3[6] = {0, -5, 5, -3, 4, 3};
        float l3 = rank_loss(2, (int[2]){1, 6}, s3, t3, NULL, 3, 0.01f, NULL);
        CHECK_MSG(fabs(l3 - 0.9) < 1e-6, "loss %.9g, want 0.9", (double)l3);
    }
}

/* ============================================================ 4. graph contract */

static void test_contract(void) {
    TEST("mask: the mean over kept rows of the one-row losses; masked rows get no gradient; none kept: 0") {
        int R = 5, V = 17, sh[2] = {R, V}, one[2] = {1, V}, n = R * V;
        float *s = kd_malloc((size_t)n * sizeof(float)), *t = kd_malloc((size_t)n * sizeof(float));
        float *g = kd_malloc((size_t)n * sizeof(float)), *g1 = kd_malloc((size_t)V * sizeof(float));
        fill_spread(s, R, V, 0.3f);
        fill_spread(t, R, V, 0.3f);
        float mask[5] = {1, 0, 1, 1, 0};
        float l = rank_loss(2, sh, s, t, mask, 5, 0.8f, g);
        double sum = 0.0;
        int grads_ok = 1;
        for (int r = 0; r < R; r++) {
            float lr = rank_loss(2, one, s + (size_t)r * V, t + (size_t)r * V, NULL, 5, 0.8f, g1);
            if (mask[r] > 0) sum += lr;
            for (int i = 0; i < V; i++) {
                double want = mask[r] > 0 ? g1[i] / 3.0 : 0.0;
                if (fabs(g[(size_t)r * V + i] - want) > 1e-7 + 1e-5 * fabs(want)) grads_ok = 0;
            }
        }
        CHECK_MSG(fabs(l - sum / 3.0) < 1e-6, "masked loss %.9g, mean of kept rows %.9g", (double)l, sum / 3.0);
        CHECK_MSG(grads_ok, "the gradient is not the kept rows' gradients / 3 (and 0 elsewhere)");
        float none[5] = {0, 0, 0, 0, 0};
        l = rank_loss(2, sh, s, t, none, 5, 0.8f, g);
        double m = 0.0;
        for (int i = 0; i < n; i++) m = fmax(m, fabs(g[i]));
        CHECK_MSG(l == 0.0f && m == 0.0, "no rows kept: loss %g, max |grad| %g", (double)l, m);
        free(s);
        free(t);
        free(g);
        free(g1);
    }
    TEST("constant student (or teacher) logits: loss 1 for the row, no gradient, finite") {
        int sh[2] = {2, 6}, n = 12;
        float s[12], t[12], g[12];
        for (int i = 0; i < n; i++) {
            s[i] = i < 6 ? 0.25f : (float)(i % 5) - 1.5f; /* row 0 constant */
            t[i] = (float)((i * 7) % 6);
        }
        float l = rank_loss(2, sh, s, t, NULL, 3, 1.0f, g);
        float l1 = rank_loss(2, (int[2]){1, 6}, s + 6, t + 6, NULL, 3, 1.0f, NULL);
        CHECK_MSG(isfinite(l) && fabs(l - (1.0 + l1) / 2.0) < 1e-6, "loss %.9g, want (1 + %.9g) / 2", (double)l,
                  (double)l1);
        int zero0 = 1, finite = 1;
        for (int i = 0; i < n; i++) {
            if (i < 6 && g[i] != 0.0f) zero0 = 0;
            if (!isfinite(g[i])) finite = 0;
        }
        CHECK_MSG(zero0 && finite, "the constant row got a gradient, or a gradient is not finite");
        for (int i = 0; i < 6; i++) {
            s[i] = (float)i;
            t[i] = -1.0f; /* teacher constant now */
        }
        l = rank_loss(2, sh, s, t, NULL, 3, 1.0f, g);
        CHECK_MSG(isfinite(l) && fabs(l - (1.0 + l1) / 2.0) < 1e-6, "constant teacher row: loss %.9g", (double)l);
    }
    TEST("the batch may shrink after compile (inputs (6, 10) compiled, run at 3)") {
        int V = 10, sh[2] = {6, V};
        kd_graph *g = kd_graph_new();
        kd_node *s = kd_input(g, "s", 2, sh), *t = kd_input(g, "t", 2, sh);
        kd_node *l = kd_rank_align(g, s, t, NULL, 3, 1.0f);
        if (kd_gc_compile(g, 6, 1)) {
            float zs[60], zt[60];
            fill_spread(zs, 6, V, 0.4f);
            fill_spread(zt, 6, V, 0.4f);
            kd_graph_set_batch(g, 3);
            memcpy(s->val.data, zs, 30 * sizeof(float));
            memcpy(t->val.data, zt, 30 * sizeof(float));
            kd_graph_forward(g, 1);
            float want = rank_loss(2, (int[2]){3, V}, zs, zt, NULL, 3, 1.0f, NULL);
            CHECK_MSG(l->val.data[0] == want, "batch 3 of 6: %.9g, fresh graph %.9g", (double)l->val.data[0],
                      (double)want);
        }
        kd_graph_free(g);
    }
    TEST("gradients accumulate into s (two losses on the same s sum their gradients)") {
        int sh[2] = {3, 8}, n = 24;
        float zs[24], zt[24], ga[24], gb[24];
        fill_spread(zs, 3, 8, 0.5f);
        fill_spread(zt, 3, 8, 0.5f);
        rank_loss(2, sh, zs, zt, NULL, 3, 1.0f, ga);
        rank_loss(2, sh, zs, zt, NULL, 5, 0.5f, gb);
        kd_graph *g = kd_graph_new();
        kd_node *s = kd_param(g, "s", 2, sh, KD_INIT_ZERO, 1), *t = kd_input(g, "t", 2, sh);
        kd_node *sum = kd_add(g, kd_rank_align(g, s, t, NULL, 3, 1.0f), kd_rank_align(g, s, t, NULL, 5, 0.5f));
        if (kd_gc_compile(g, 3, 1)) {
            memcpy(s->val.data, zs, sizeof zs);
            memcpy(t->val.data, zt, sizeof zt);
            kd_graph_forward(g, 1);
            kd_graph_backward(g, sum);
            float want[24];
            for (int i = 0; i < n; i++) want[i] = ga[i] + gb[i];
            CHECK_ARRAYS("accumulated grad", s->grad.data, want, n, 1e-7, 1e-5);
        }
        kd_graph_free(g);
    }
    TEST("1 and 2 OpenMP threads give the same bits (64 x 600 logits, parallel loops on)") {
#ifdef _OPENMP
        int R = 64, V = 600, n = R * V, sh[2] = {R, V};
        float *s = kd_malloc((size_t)n * sizeof(float)), *t = kd_malloc((size_t)n * sizeof(float));
        float *g[2] = {kd_malloc((size_t)n * sizeof(float)), kd_malloc((size_t)n * sizeof(float))}, l[2];
        float *mask = kd_malloc((size_t)R * sizeof(float));
        for (int i = 0; i < n; i++) {
            t[i] = 2.0f * kd_rng_normal(&rng);
            s[i] = 0.6f * t[i] + 1.5f * kd_rng_normal(&rng);
        }
        for (int r = 0; r < R; r++) mask[r] = r % 7 == 3 ? 0.0f : 1.0f;
        int saved = omp_get_max_threads();
        for (int th = 0; th < 2; th++) {
            omp_set_num_threads(th + 1);
            l[th] = rank_loss(2, sh, s, t, mask, 10, 1.0f, g[th]);
        }
        omp_set_num_threads(saved);
        CHECK_MSG(memcmp(&l[0], &l[1], sizeof l[0]) == 0 && memcmp(g[0], g[1], (size_t)n * sizeof(float)) == 0,
                  "results depend on the thread count (%.9g vs %.9g)", (double)l[0], (double)l[1]);
        free(s);
        free(t);
        free(g[0]);
        free(g[1]);
        free(mask);
#else
        CHECK(1);
#endif
    }
}

/* ============================================================ 5. the loss row */

/* builds SPEC on s, t (N, V) logits; returns the status, *loss the built
 * total's node */
static kd_status build_spec(const char *spec, int N, int V, kd_graph **gp, kd_loss_inputs *in, kd_built_loss *bl) {
    kd_loss_spec sp;
    kd_status st = kd_loss_spec_parse(spec, &sp);
    *gp = kd_graph_new();
    memset(in, 0, sizeof *in);
    int sh[2] = {N, V}, ns[1] = {N};
    in->s_logits = kd_param(*gp, "s", 2, sh, KD_INIT_ZERO, 1);
    in->t_logits = kd_input(*gp, "t", 2, sh);
    in->labels = kd_input(*gp, "y", 1, ns);
    if (st == KD_OK) st = kd_loss_build(*gp, &sp, in, bl);
    return st;
}

static void spec_error(const char *spec, int V, kd_status want, const char *needle) {
    kd_graph *g;
    kd_loss_inputs in;
    kd_built_loss bl;
    kd_status st = build_spec(spec, 3, V, &g, &in, &bl);
    const char *msg = kd_error_message();
    CHECK_MSG(st == want && strstr(msg, needle), "\"%s\" (V=%d): status %d, message \"%s\"; want %d with \"%s\"", spec,
              V, st, st == KD_OK ? "" : msg, want, needle);
    kd_graph_free(g);
}

static void test_spec(void) {
    TEST("spec: \"ce + kd(T=2) + rlkd(k=10, tau=1, weight=0.5)\" builds; rlkd's defaults are k=10, tau=1") {
        int N = 4, V = 31;
        kd_graph *g;
        kd_loss_inputs in;
        kd_built_loss bl;
        kd_status st = build_spec("ce + kd(T=2) + rlkd(k=10, tau=1, weight=0.5)", N, V, &g, &in, &bl);
        CHECK_MSG(st == KD_OK, "build: %s", kd_error_message());
        if (st == KD_OK && kd_gc_compile(g, N, 3)) {
            float *zs = in.s_logits->val.data, *zt = in.t_logits->val.data;
            fill_spread(zs, N, V, 0.3f);
            fill_spread(zt, N, V, 0.3f);
            for (int i = 0; i < N; i++) in.labels->val.data[i] = (float)(i % V);
            kd_graph_forward(g, 1);
            kd_node *r = bl.terms[2].value;
            CHECK(bl.n == 3 && strcmp(bl.terms[2].name, "rlkd") == 0 && bl.terms[2].weight == 0.5f);
            CHECK(r->op == KD_OP_RANK_ALIGN && r->ip[0] == 10 && r->fp[0] == 1.0f);
            float want = rank_loss(2, (int[2]){N, V}, zs, zt, NULL, 10, 1.0f, NULL);
            CHECK_MSG(r->val.data[0] == want, "rlkd term %.9g, direct op %.9g", (double)r->val.data[0], (double)want);
            double total = bl.terms[0].value->val.data[0] + bl.terms[1].value->val.data[0] + 0.5 * want;
            CHECK_CLOSE(bl.total->val.data[0], total, 1e-6, 1e-6);
        }
        kd_graph_free(g);
        st = build_spec("rlkd", N, V, &g, &in, &bl);
        CHECK_MSG(st == KD_OK && bl.terms[0].value->ip[0] == 10 && bl.terms[0].value->fp[0] == 1.0f, "defaults: %s",
                  st == KD_OK ? "wrong k or tau" : kd_error_message());
        kd_graph_free(g);
        st = build_spec("rlkd(k=5, tau=0.25)", N, V, &g, &in, &bl);
        CHECK_MSG(st == KD_OK && bl.terms[0].value->ip[0] == 5 && bl.terms[0].value->fp[0] == 0.25f, "k=5 tau=0.25: %s",
                  st == KD_OK ? "wrong k or tau" : kd_error_message());
        kd_graph_free(g);
        st = build_spec("rlkd(k=31)", N, V, &g, &in, &bl); /* k = V is allowed */
        CHECK_MSG(st == KD_OK, "k = V: %s", kd_error_message());
        kd_graph_free(g);
    }
    TEST("spec errors: k > V, k < 2, k not an integer, tau <= 0, tau not a number, unknown argument") {
        spec_error("rlkd(k=12)", 11, KD_ECONFIG, "k=12 is outside [2, 11]");
        spec_error("ce + rlkd(k=1)", 11, KD_ECONFIG, "k=1 is outside [2, 11]");
        spec_error("rlkd(k=2.5)", 11, KD_ECONFIG, "k=2.5 is not an integer");
        spec_error("rlkd(tau=0)", 11, KD_ECONFIG, "tau=0 must be > 0");
        spec_error("rlkd(tau=-1)", 11, KD_ECONFIG, "tau=-1 must be > 0");
        spec_error("rlkd(tau=soft)", 11, KD_ECONFIG, "tau=soft is not a number");
        spec_error("rlkd(T=2)", 11, KD_ECONFIG, "has no argument 'T'");
        spec_error("rlkd(k=2)", 1, KD_ESHAPE, "only V=1");
    }
    TEST("op: k > V is a shape error at compile, naming k and V") {
        kd_graph *g = kd_graph_new();
        int sh[3] = {2, 3, 7};
        kd_node *s = kd_param(g, "s", 3, sh, KD_INIT_ZERO, 1), *t = kd_input(g, "t", 3, sh);
        kd_rank_align(g, s, t, NULL, 8, 1.0f);
        kd_status st = kd_graph_compile(g, 2, 1);
        CHECK_MSG(st == KD_ESHAPE && strstr(kd_error_message(), "k=8") && strstr(kd_error_message(), "V=7"),
                  "status %d: %s", st, kd_error_message());
        kd_graph_free(g);
        g = kd_graph_new();
        int ms[1] = {5};
        s = kd_param(g, "s", 3, sh, KD_INIT_ZERO, 1);
        t = kd_input(g, "t", 3, sh);
        kd_rank_align(g, s, t, kd_input(g, "mask", 1, ms), 3, 1.0f);
        st = kd_graph_compile(g, 2, 1);
        CHECK_MSG(st == KD_ESHAPE && strstr(kd_error_message(), "one value per row"), "mask of 5 for 6 rows: %d %s", st,
                  kd_error_message());
        kd_graph_free(g);
    }
}

/* ============================================================ 5b. the CLI */

/* runs kd_test_bin() with argv (NULL-terminated), stdout+stderr to `log`; exit code or -1 */
static int run_cli(const char **argv, const char *log) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
    return WEXITSTATUS(status);
}

static int log_has(const char *log, const char *needle) {
    char buf[4096];
    FILE *f = fopen(log, "rb");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return strstr(buf, needle) != NULL;
}

static void test_cli(void) {
    TEST("distill loss \"rlkd(k=4)\" --in X --out Y: the fixture's loss and gradient; k=99 and tau=0 fail") {
        char fx[512], in[512], out[512], log[512];
        kd_test_fixture("rank.safetensors", fx, sizeof fx);
        snprintf(in, sizeof in, "%s/rank_in.safetensors", kd_test_tmpdir());
        snprintf(out, sizeof out, "%s/rank_out.safetensors", kd_test_tmpdir());
        snprintf(log, sizeof log, "%s/rank_cli.log", kd_test_tmpdir());
        kd_safetensors st;
        kd_status rc = kd_st_read(fx, &st);
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        if (rc != KD_OK) return;
        int sh[2] = {5, 37}, one[1] = {1}, n = 5 * 37;
        float s[5 * 37], t[5 * 37], ge[5 * 37], le, args[2];
        int two[1] = {2};
        rc = kd_st_get_f32(&st, "basic.s", s, 2, sh);
        if (rc == KD_OK) rc = kd_st_get_f32(&st, "basic.t", t, 2, sh);
        if (rc == KD_OK) rc = kd_st_get_f32(&st, "basic.grad_s", ge, 2, sh);
        if (rc == KD_OK) rc = kd_st_get_f32(&st, "basic.loss", &le, 1, one);
        if (rc == KD_OK) rc = kd_st_get_f32(&st, "basic.args", args, 1, two);
        kd_st_free(&st);
        CHECK_MSG(rc == KD_OK && args[0] == 4.0f && args[1] == 1.0f, "fixture basic: %s", kd_error_message());
        if (rc != KD_OK) return;
        kd_st_writer *w = kd_st_writer_new();
        kd_st_add_f32(w, "s_logits", 2, sh, s);
        kd_st_add_f32(w, "t_logits", 2, sh, t);
        rc = kd_st_write(w, in);
        kd_st_writer_free(w);
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        const char *argv[] = {kd_test_bin(), "loss", "rlkd(k=4)", "--in", in, "--out", out, NULL};
        int code = run_cli(argv, log);
        CHECK_MSG(code == 0, "%s exited %d (log %s)", kd_test_bin(), code, log);
        if (code != 0) return;
        rc = kd_st_read(out, &st);
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        if (rc != KD_OK) return;
        float l = NAN, g[5 * 37];
        const kd_st_tensor *lt = kd_st_find(&st, "loss");
        if (lt && lt->ndim == 0 && lt->nbytes == sizeof(float)) memcpy(&l, lt->data, sizeof l);
        rc = kd_st_get_f32(&st, "grad.s_logits", g, 2, sh);
        kd_st_free(&st);
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        CHECK_MSG(fabs(l - le) <= 2e-6 * fabs(le), "cli loss %.9g, PyTorch %.9g", (double)l, (double)le);
        double gmax = 0.0;
        for (int i = 0; i < n; i++) gmax = fmax(gmax, fabs(ge[i]));
        if (rc == KD_OK) CHECK_ARRAYS("cli grad.s_logits", g, ge, n, 1e-6 * gmax, 1e-5);
        const char *bad_k[] = {kd_test_bin(), "loss", "rlkd(k=99)", "--in", in, "--out", out, NULL};
        code = run_cli(bad_k, log);
        CHECK_MSG(code == 1 && log_has(log, "distill: error: loss 'rlkd': k=99 is outside [2, 37]"),
                  "k=99: exit %d (log %s)", code, log);
        const char *bad_tau[] = {kd_test_bin(), "loss", "rlkd(tau=0)", "--in", in, "--out", out, NULL};
        code = run_cli(bad_tau, log);
        CHECK_MSG(code == 1 && log_has(log, "tau=0 must be > 0"), "tau=0: exit %d (log %s)", code, log);
    }
}

void test_rank(void) {
    kd_rng_seed(&rng, 20250119);
    test_gradcheck();
    test_fixture();
    test_closed_forms();
    test_contract();
    test_spec();
    test_cli();
}
