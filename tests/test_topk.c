/* test_topk.c - tests for the cached top-k divergence of src/distill/topk.c
 * (kd_topk_divergence; docs/losses/topk.md).
 *
 * Checks:
 *   1. finite-difference gradient checks of all six kinds (fkl, rkl, jsd,
 *      tvd, skl, srkl) with the loss as the checked output: odd V, k = 1,
 *      k = V - 1, k = V, one row, (2,3,V) logits, masked rows, T != 1, ids
 *      that are not the teacher's top k;
 *   2. k = V (empty tail) against the dense kd_divergence on the same
 *      logits, both ops in one graph: values and gradients to 1e-6; and the
 *      equality cases of the data-processing inequality with k < V: a
 *      teacher whose tail is proportional to the student's (all kinds), a
 *      teacher with no tail mass (all kinds but rkl, see the docs);
 *   3. the data-processing inequality topk <= dense, row by row, for every
 *      kind on random rows (and that the gap is not always 0);
 *   4. parity with PyTorch through tests/fixtures/topk.safetensors
 *      (written by tests/fixtures/gen_topk.py; a missing fixture fails);
 *   5. fp16-rounded teacher log-probabilities whose probabilities sum past 1:
 *      finite values and gradients, and the clamped tail's closed forms;
 *   6. the graph contract: bad ids (a repeated id, an id outside [0, V))
 *      abort once naming the node and the first bad row, in a forked child;
 *      masked rows are not checked; an all-masked batch gives 0 and no
 *      gradient; the order of the ids within a row does not matter; no
 *      gradient reaches the teacher inputs; shape errors at compile; the
 *      same bits with 1 and 2 OpenMP threads.
 */
#include <fcntl.h>
#include <math.h>
#include <signal.h>
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
#include "test.h"

/* Aggregate relative gradient error accepted by the finite-difference
 * checks: as tests/test_losses.c (steps of 1e-2 on logits of scale ~1.5,
 * float32 forward); correct kinds measure ~1e-5..3e-4 here. */
#define GC_TOL 2e-3

static kd_rng rng;

typedef struct tcase {
    const char *name;
    kd_div_kind kind;
    float T, param, scale;
} tcase;

static const tcase KINDS[] = {
    {"fkl T=2", KD_DIV_FKL, 2.0f, 0.0f, 4.0f},
    {"rkl", KD_DIV_RKL, 1.0f, 0.0f, 1.0f},
    {"jsd beta=0.3 T=1.5", KD_DIV_JSD, 1.5f, 0.3f, 1.0f},
    {"tvd T=3", KD_DIV_TVD, 3.0f, 0.0f, 2.0f},
    {"skl alpha=0.1", KD_DIV_SKL, 1.0f, 0.1f, 1.0f},
    {"srkl alpha=0.2 T=2", KD_DIV_SRKL, 2.0f, 0.2f, 1.0f},
};
#define N_KINDS ((int)(sizeof KINDS / sizeof KINDS[0]))

/* ---------------------------------------------------------------- problems */

/* s, t (R*V) student and teacher logits; ids, lq (R*k) the cache: ids as
 * floats, log-probabilities of t at the cache's temperature; mask (R) or NULL */
typedef struct tprob {
    int ndim, shape[3]; /* of s: (..., V) */
    int R, V, k;
    float *s, *t, *ids, *lq, *mask;
} tprob;

static tprob tp_alloc(int ndim, const int *shape, int k) {
    tprob P = {.ndim = ndim, .k = k};
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (P.shape[i] = shape[i]);
    P.V = shape[ndim - 1];
    P.R = (int)(n / P.V);
    P.s = kd_calloc((size_t)n, sizeof(float));
    P.t = kd_calloc((size_t)n, sizeof(float));
    P.ids = kd_calloc((size_t)P.R * k, sizeof(float));
    P.lq = kd_calloc((size_t)P.R * k, sizeof(float));
    return P;
}

static void tp_free(tprob *P) {
    free(P->s);
    free(P->t);
    free(P->ids);
    free(P->lq);
    free(P->mask);
}

/* log softmax(z / T) of one row in double; out (V) */
static void log_softmax_d(double *out, const float *z, int V, double T) {
    double m = -INFINITY, s = 0.0;
    for (int j = 0; j < V; j++) m = fmax(m, z[j] / T);
    for (int j = 0; j < V; j++) s += exp(z[j] / T - m);
    for (int j = 0; j < V; j++) out[j] = z[j] / T - m - log(s);
}

/* The cache of P->t at temperature T: per row the top k ids (or k random
 * distinct ids), in a shuffled order, and their log-probabilities rounded to
 * float32. */
static void tp_cache(tprob *P, double T, int random_ids) {
    int V = P->V, k = P->k;
    double *lq = kd_malloc((size_t)V * sizeof(double));
    int *perm = kd_malloc((size_t)V * sizeof(int));
    for (int r = 0; r < P->R; r++) {
        log_softmax_d(lq, P->t + (size_t)r * V, V, T);
        for (int j = 0; j < V; j++) perm[j] = j;
        for (int i = 0; i < k; i++) { /* selection: perm[i] the i-th largest, or a random pick */
            int best = i;
            if (random_ids)
                best = i + (int)kd_rng_below(&rng, (uint32_t)(V - i));
            else
                for (int j = i + 1; j < V; j++)
                    if (lq[perm[j]] > lq[perm[best]]) best = j;
            int x = perm[i];
            perm[i] = perm[best];
            perm[best] = x;
        }
        for (int i = k - 1; i > 0; i--) { /* shuffle the k picked */
            int j = (int)kd_rng_below(&rng, (uint32_t)(i + 1)), x = perm[i];
            perm[i] = perm[j];
            perm[j] = x;
        }
        for (int i = 0; i < k; i++) {
            P->ids[(size_t)r * k + i] = (float)perm[i];
            P->lq[(size_t)r * k + i] = (float)lq[perm[i]];
        }
    }
    free(lq);
    free(perm);
}

/* Random logits of scale 1.5, t = corr * s + noise; drop_every > 0 masks
 * rows r with r % drop_every == 1; the cache at temperature T. */
static tprob tp_new(int ndim, const int *shape, int k, double T, int drop_every, float corr, int random_ids) {
    tprob P = tp_alloc(ndim, shape, k);
    for (int i = 0; i < P.R * P.V; i++) {
        P.s[i] = 1.5f * kd_rng_normal(&rng);
        P.t[i] = corr * P.s[i] + 1.5f * kd_rng_normal(&rng);
    }
    if (drop_every > 0) {
        P.mask = kd_malloc((size_t)P.R * sizeof(float));
        for (int r = 0; r < P.R; r++) P.mask[r] = r % drop_every == 1 ? 0.0f : 1.0f;
    }
    tp_cache(&P, T, random_ids);
    return P;
}

/* ---------------------------------------------------------------- graphs */

/* s a trainable leaf; ids, lq, mask (and t, for the dense op) inputs */
typedef struct tgraph {
    kd_graph *g;
    kd_node *s, *t, *ids, *lq, *mask, *loss, *dense;
    kd_gc gc;
} tgraph;

/* with_dense: also the dense kd_divergence of the same case on (s, t);
 * project: the gradcheck objective on the top-k loss. Returns 0 (and
 * records a failure) if compile fails. */
static int tg_build(tgraph *G, const tcase *c, const tprob *P, int with_dense, int project) {
    memset(G, 0, sizeof *G);
    kd_graph *g = G->g = kd_graph_new();
    int cs[3];
    memcpy(cs, P->shape, sizeof cs);
    cs[P->ndim - 1] = P->k;
    G->s = kd_param(g, "s", P->ndim, P->shape, KD_INIT_ZERO, 1);
    G->ids = kd_input(g, "t_ids", P->ndim, cs);
    G->lq = kd_input(g, "t_logp", P->ndim, cs);
    if (P->mask) G->mask = kd_input(g, "mask", P->ndim - 1, P->shape);
    G->loss = kd_topk_divergence(g, G->s, G->ids, G->lq, G->mask, c->kind, c->T, c->param, c->scale);
    if (with_dense) {
        G->t = kd_input(g, "t", P->ndim, P->shape);
        G->dense = kd_divergence(g, G->s, G->t, G->mask, c->kind, c->T, c->param, c->scale);
    }
    if (project) G->gc = kd_gradcheck_project(g, G->loss);
    if (!kd_gc_compile(g, P->shape[0], 42)) return 0;
    size_t n = (size_t)P->R * P->V, nk = (size_t)P->R * P->k;
    memcpy(G->s->val.data, P->s, n * sizeof(float));
    memcpy(G->ids->val.data, P->ids, nk * sizeof(float));
    memcpy(G->lq->val.data, P->lq, nk * sizeof(float));
    if (G->t) memcpy(G->t->val.data, P->t, n * sizeof(float));
    if (G->mask) memcpy(G->mask->val.data, P->mask, (size_t)P->R * sizeof(float));
    return 1;
}

/* forward + backward from the top-k loss: its value, d loss / d s (R*V) */
static int tg_run(const tcase *c, const tprob *P, float *loss, float *grad) {
    tgraph G;
    int ok = tg_build(&G, c, P, 0, 0);
    if (ok) {
        kd_graph_forward(G.g, 1);
        kd_graph_backward(G.g, G.loss);
        *loss = G.loss->val.data[0];
        if (grad) memcpy(grad, G.s->grad.data, (size_t)P->R * P->V * sizeof(float));
    }
    kd_graph_free(G.g);
    return ok;
}

/* ============================================================ 1. gradients */

static void test_gradcheck(void) {
    TEST("gradcheck of all six kinds: odd V, k = 1, V-1, V, one row, 3-D, masked rows, T != 1") {
        /* teacher independent of the student: TVD's kinks (p~_b = q~_b) stay
         * out of reach of the step on these draws */
        int s57[2] = {5, 7}, s19[2] = {1, 9}, s47[2] = {4, 7}, s37[2] = {3, 7}, s235[3] = {2, 3, 5}, s311[2] = {3, 11};
        struct {
            const char *what;
            int ndim, *shape, k, drop, random_ids;
        } pr[] = {
            {"(5,7) k=3, rows 1,4 masked", 2, s57, 3, 3, 0},
            {"(1,9) k=1", 2, s19, 1, 0, 0},
            {"(4,7) k=V-1", 2, s47, 6, 0, 0},
            {"(3,7) k=V", 2, s37, 7, 0, 0},
            {"(2,3,5) k=2, rows 1,5 masked", 3, s235, 2, 4, 0},
            {"(3,11) k=4 random ids", 2, s311, 4, 0, 1},
        };
        int n_pr = (int)(sizeof pr / sizeof pr[0]);
        static uint64_t calls;
        for (int c = 0; c < N_KINDS; c++)
            for (int p = 0; p < n_pr; p++) {
                tprob P = tp_new(pr[p].ndim, pr[p].shape, pr[p].k, KINDS[c].T, pr[p].drop, 0.0f, pr[p].random_ids);
                tgraph G;
                double err = INFINITY;
                if (tg_build(&G, &KINDS[c], &P, 0, 1)) {
                    kd_gradcheck_randomize(&G.gc, 900 + calls++);
                    err = kd_gradcheck_ex(G.g, &G.gc, &G.s, 1, 1e-2, 1, getenv("KD_GC_VERBOSE") ? 0.0 : 1e-2);
                }
                CHECK_MSG(err < GC_TOL, "%s on %s: gradient error %.3g", KINDS[c].name, pr[p].what, err);
                if (getenv("KD_GC_VERBOSE")) fprintf(stderr, "  gc %-20s %-30s %.3g\n", KINDS[c].name, pr[p].what, err);
                kd_graph_free(G.g);
                tp_free(&P);
            }
    }
}

/* ============================================================ 2. equal to the dense divergence */

/* Builds both ops in one graph, runs forward, compares the values, then
 * backward from each and compares d/ds. */
static void check_dense_equal(const tcase *c, const tprob *P, const char *what, double atol) {
    tgraph G;
    if (!tg_build(&G, c, P, 1, 0)) {
        kd_graph_free(G.g);
        return;
    }
    int n = P->R * P->V;
    kd_graph_forward(G.g, 1);
    double a = G.loss->val.data[0], b = G.dense->val.data[0];
    CHECK_MSG(fabs(a - b) <= atol * fmax(1.0, fabs(b)), "%s %s: top-k %.9g, dense %.9g", c->name, what, a, b);
    float *gd = kd_malloc((size_t)n * sizeof(float));
    kd_graph_backward(G.g, G.dense);
    memcpy(gd, G.s->grad.data, (size_t)n * sizeof(float));
    kd_graph_backward(G.g, G.loss);
    char label[160];
    snprintf(label, sizeof label, "%s %s: d loss / d s", c->name, what);
    CHECK_ARRAYS(label, G.s->grad.data, gd, n, atol * fmax(1.0, kd_test_max_abs(gd, n)), 0);
    CHECK_MSG(kd_test_max_abs(gd, n) > 1e-3, "%s %s: vacuous (gradient %.3g)", c->name, what, kd_test_max_abs(gd, n));
    free(gd);
    kd_graph_free(G.g);
}

static void test_dense(void) {
    TEST("k = V: equal to the dense kd_divergence on the same logits (value and gradient, 1e-6)") {
        /* The cache's log-probabilities are float32 roundings of the
         * teacher's: q differs from the dense op's by ~1e-7 relative */
        int s1[2] = {5, 9}, s2[3] = {2, 3, 6};
        for (int c = 0; c < N_KINDS; c++) {
            tprob P = tp_new(2, s1, 9, KINDS[c].T, 3, 0.5f, 0);
            check_dense_equal(&KINDS[c], &P, "(5,9) masked", 1e-6);
            tp_free(&P);
            P = tp_new(3, s2, 6, KINDS[c].T, 0, 0.5f, 1);
            check_dense_equal(&KINDS[c], &P, "(2,3,6) random order", 1e-6);
            tp_free(&P);
        }
    }
    TEST("k < V, teacher tail proportional to the student's: equal to the dense divergence (all kinds)") {
        /* q_j / p_j constant over the tail: the equality case of the
         * data-processing inequality. t_j = s_j + c off S; on S anything. */
        int shape[2] = {6, 11};
        for (int c = 0; c < N_KINDS; c++) {
            tprob P = tp_new(2, shape, 4, KINDS[c].T, 4, 0.0f, 1);
            for (int r = 0; r < P.R; r++) {
                float shift = 2.0f * kd_rng_normal(&rng);
                int in_s[11] = {0};
                for (int i = 0; i < P.k; i++) in_s[(int)P.ids[r * P.k + i]] = 1;
                for (int j = 0; j < P.V; j++)
                    if (!in_s[j]) P.t[r * P.V + j] = P.s[r * P.V + j] + shift;
                double lq[11]; /* the cached values of S for this teacher */
                log_softmax_d(lq, P.t + r * P.V, P.V, KINDS[c].T);
                for (int i = 0; i < P.k; i++) P.lq[r * P.k + i] = (float)lq[(int)P.ids[r * P.k + i]];
            }
            check_dense_equal(&KINDS[c], &P, "proportional tail", 1e-6);
            tp_free(&P);
        }
    }
    TEST("k < V, no teacher mass off S: equal to the dense divergence (all kinds but rkl)") {
        /* tail logits 1e4 T below: q_j = 0 in double off S. The cache's tail
         * 1 - sum q_S is then float32 rounding (<= ~2e-7, or clamped to 0),
         * which the fkl/skl tail term weighs by |log q_tail - log p_tail|
         * (<= ~20): 1e-5. rkl is +inf-like in both (the dense op sees
         * log q ~ -1e4, ours the floor), see docs/losses/topk.md. */
        int shape[2] = {5, 10};
        for (int c = 0; c < N_KINDS; c++) {
            if (KINDS[c].kind == KD_DIV_RKL) continue;
            tprob P = tp_new(2, shape, 3, KINDS[c].T, 0, 0.3f, 1);
            for (int r = 0; r < P.R; r++) {
                int in_s[10] = {0};
                for (int i = 0; i < P.k; i++) in_s[(int)P.ids[r * P.k + i]] = 1;
                for (int j = 0; j < P.V; j++)
                    if (!in_s[j]) P.t[r * P.V + j] = -1e4f * KINDS[c].T;
                double lq[10];
                log_softmax_d(lq, P.t + r * P.V, P.V, KINDS[c].T);
                for (int i = 0; i < P.k; i++) P.lq[r * P.k + i] = (float)lq[(int)P.ids[r * P.k + i]];
            }
            check_dense_equal(&KINDS[c], &P, "teacher mass on S only", 1e-5);
            tp_free(&P);
        }
    }
}

/* ============================================================ 3. data-processing inequality */

static void test_dpi(void) {
    TEST("data-processing inequality: top-k <= dense row by row, every kind, k = 1, 3, 6 of V = 13") {
        /* One graph per (kind, k) with both ops and a one-hot mask selecting
         * the row: each forward gives one row's values. The slack covers the
         * float32 rounding of the cached log-probabilities (the tail is
         * 1 - sum q_S). */
        int shape[2] = {40, 13}, ks[3] = {1, 3, 6};
        for (int c = 0; c < N_KINDS; c++)
            for (int ki = 0; ki < 3; ki++) {
                tprob P = tp_new(2, shape, ks[ki], KINDS[c].T, 0, 0.3f, ki == 2);
                P.mask = kd_calloc((size_t)P.R, sizeof(float));
                tgraph G;
                if (tg_build(&G, &KINDS[c], &P, 1, 0)) {
                    int bad = 0;
                    double max_gap = 0.0;
                    for (int r = 0; r < P.R; r++) {
                        for (int i = 0; i < P.R; i++) G.mask->val.data[i] = i == r;
                        kd_graph_forward(G.g, 0);
                        double a = G.loss->val.data[0], b = G.dense->val.data[0];
                        if (!(a <= b + 1e-6 * (1.0 + fabs(b)))) {
                            if (bad++ < 3)
                                fprintf(stderr, "  %s k=%d row %d: top-k %.9g > dense %.9g\n", KINDS[c].name, ks[ki], r,
                                        a, b);
                        }
                        max_gap = fmax(max_gap, (b - a) / KINDS[c].scale);
                    }
                    CHECK_MSG(bad == 0, "%s k=%d: %d of %d rows above the dense divergence", KINDS[c].name, ks[ki], bad,
                              P.R);
                    CHECK_MSG(max_gap > 1e-2, "%s k=%d: the bound is never strict (max gap %.3g)", KINDS[c].name,
                              ks[ki], max_gap);
                }
                kd_graph_free(G.g);
                tp_free(&P);
            }
    }
}

/* ============================================================ 4. PyTorch fixture */

typedef struct fx_case {
    const char *key;
    tcase c;
} fx_case;

/* Tolerances: the reference is float64 PyTorch on the same float32 inputs
 * and our op works in double, so the loss differs by float32 rounding
 * (1e-5 relative, LOSSES.md's bar); gradients 1e-5 relative plus 1e-6 of
 * the largest element (tiny entries of saturated rows are differences of
 * O(1) terms). */
static const fx_case FX[] = {
    {"fkl_t2", {"fkl T=2", KD_DIV_FKL, 2.0f, 0.0f, 4.0f}},
    {"rkl_mask_3d", {"rkl", KD_DIV_RKL, 1.0f, 0.0f, 1.0f}},
    {"jsd_b05_k1", {"jsd 0.5", KD_DIV_JSD, 1.0f, 0.5f, 1.0f}},
    {"jsd_b01_kV", {"jsd 0.1", KD_DIV_JSD, 1.0f, 0.1f, 1.0f}},
    {"tvd_random_ids", {"tvd", KD_DIV_TVD, 1.0f, 0.0f, 1.0f}},
    {"skl_a01_kVm1", {"skl 0.1", KD_DIV_SKL, 1.0f, 0.1f, 1.0f}},
    {"srkl_a01_t3_mask", {"srkl 0.1 T=3", KD_DIV_SRKL, 3.0f, 0.1f, 1.0f}},
    {"fkl_kV_t4", {"fkl T=4", KD_DIV_FKL, 4.0f, 0.0f, 16.0f}},
    {"srkl_a0", {"srkl 0", KD_DIV_SRKL, 1.0f, 0.0f, 1.0f}},
    {"skl_large", {"skl large", KD_DIV_SKL, 1.0f, 0.1f, 1.0f}},
    {"fkl_fp16", {"fkl fp16", KD_DIV_FKL, 1.0f, 0.0f, 1.0f}},
    {"rkl_fp16", {"rkl fp16", KD_DIV_RKL, 1.0f, 0.0f, 1.0f}},
    {"jsd_fp16", {"jsd fp16", KD_DIV_JSD, 1.0f, 0.5f, 1.0f}},
    {"tvd_fp16", {"tvd fp16", KD_DIV_TVD, 1.0f, 0.0f, 1.0f}},
    {"skl_fp16", {"skl fp16", KD_DIV_SKL, 1.0f, 0.1f, 1.0f}},
    {"srkl_fp16", {"srkl fp16", KD_DIV_SRKL, 1.0f, 0.1f, 1.0f}},
};

static kd_status fx_get(const kd_safetensors *st, const char *key, const char *field, float *dst, int ndim,
                        const int *shape) {
    char name[96];
    snprintf(name, sizeof name, "%s.%s", key, field);
    return kd_st_get_f32(st, name, dst, ndim, shape);
}

static void fx_run(const kd_safetensors *st, const fx_case *f) {
    char key[96];
    snprintf(key, sizeof key, "%s.s", f->key);
    const kd_st_tensor *ts = kd_st_find(st, key);
    snprintf(key, sizeof key, "%s.ids", f->key);
    const kd_st_tensor *ti = kd_st_find(st, key);
    int ok = ts && ti && (ts->ndim == 2 || ts->ndim == 3) && ti->ndim == ts->ndim;
    CHECK_MSG(ok, "fixture: no 2-D/3-D tensors %s.s / %s.ids", f->key, f->key);
    if (!ok) return;
    int shape[3], cs[3];
    for (int i = 0; i < ts->ndim; i++) {
        shape[i] = (int)ts->shape[i];
        cs[i] = (int)ti->shape[i];
    }
    tprob P = tp_alloc(ts->ndim, shape, cs[ts->ndim - 1]);
    int n = P.R * P.V, rows[1] = {P.R}, one[1] = {1};
    kd_status rc = fx_get(st, f->key, "s", P.s, P.ndim, P.shape);
    if (rc == KD_OK) rc = fx_get(st, f->key, "ids", P.ids, P.ndim, cs);
    if (rc == KD_OK) rc = fx_get(st, f->key, "logp", P.lq, P.ndim, cs);
    snprintf(key, sizeof key, "%s.mask", f->key);
    if (rc == KD_OK && kd_st_find(st, key)) {
        P.mask = kd_malloc((size_t)P.R * sizeof(float));
        rc = fx_get(st, f->key, "mask", P.mask, 1, rows);
    }
    float want_loss = NAN, loss = NAN, *want = kd_malloc((size_t)n * sizeof(float));
    float *grad = kd_malloc((size_t)n * sizeof(float));
    if (rc == KD_OK) rc = fx_get(st, f->key, "loss", &want_loss, 1, one);
    if (rc == KD_OK) rc = fx_get(st, f->key, "grad_s", want, P.ndim, P.shape);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    if (rc == KD_OK && tg_run(&f->c, &P, &loss, grad)) {
        CHECK_MSG(fabs(loss - want_loss) <= 1e-5 * fabs(want_loss), "%s: loss %.9g, PyTorch %.9g", f->key, (double)loss,
                  (double)want_loss);
        char label[96];
        snprintf(label, sizeof label, "%s.grad_s", f->key);
        CHECK_ARRAYS(label, grad, want, n, 1e-6 * kd_test_max_abs(want, n) + 1e-9, 1e-5);
    }
    free(want);
    free(grad);
    tp_free(&P);
}

static void test_fixture(void) {
    TEST("PyTorch parity (tests/fixtures/topk.safetensors)") {
        char path[512];
        kd_test_fixture("topk.safetensors", path, sizeof path);
        kd_safetensors st;
        kd_status rc = kd_st_read(path, &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_topk.py)", kd_error_message());
        if (rc != KD_OK) break;
        for (int i = 0; i < (int)(sizeof FX / sizeof FX[0]); i++) fx_run(&st, &FX[i]);
        kd_st_free(&st);
    }
}

/* ============================================================ 5. fp16 caches */

static void test_fp16(void) {
    TEST("fp16-rounded log-probabilities summing past 1: finite, and the clamped tail's closed forms") {
        /* One row, V = 10, k = 4: three teacher logits 16 above the rest
         * (tail ~1e-6); rounding log q to fp16 moves each q_i by up to ~2e-4,
         * so some draws sum past 1. Draw until one does. */
        int shape[2] = {1, 10};
        tprob P = tp_alloc(2, shape, 4);
        double sum = 0.0;
        for (int tries = 0; tries < 200 && sum <= 1.0; tries++) {
            for (int j = 0; j < 10; j++) {
                P.s[j] = 1.5f * kd_rng_normal(&rng);
                P.t[j] = 1.5f * kd_rng_normal(&rng) + (j < 3 ? 16.0f : 0.0f);
            }
            tp_cache(&P, 1.0, 0);
            sum = 0.0;
            for (int i = 0; i < 4; i++) {
                P.lq[i] = kd_f16_to_f32(kd_f32_to_f16(P.lq[i]));
                sum += exp((double)P.lq[i]);
            }
        }
        CHECK_MSG(sum > 1.0, "no draw whose fp16 q_S sums past 1 (sum %.9g)", sum);
        /* the student's buckets in double, naively */
        double lp[10], lp_tail, ps = 0.0;
        log_softmax_d(lp, P.s, 10, 1.0);
        int in_s[10] = {0};
        for (int i = 0; i < 4; i++) in_s[(int)P.ids[i]] = 1;
        for (int j = 0; j < 10; j++)
            if (in_s[j]) ps += exp(lp[j]);
        lp_tail = log1p(-ps);
        double fkl = 0.0, rkl = 0.0, tvd = 0.0;
        for (int i = 0; i < 4; i++) {
            double l = lp[(int)P.ids[i]], q = exp((double)P.lq[i]);
            fkl += q * (P.lq[i] - l);
            rkl += exp(l) * (l - P.lq[i]);
            tvd += 0.5 * fabs(exp(l) - q);
        }
        rkl += exp(lp_tail) * (lp_tail - log(1e-12)); /* the floor of docs/losses/topk.md */
        tvd += 0.5 * exp(lp_tail);                    /* q_tail = 0 */
        const double want[3] = {fkl, rkl, tvd};
        const kd_div_kind wk[3] = {KD_DIV_FKL, KD_DIV_RKL, KD_DIV_TVD};
        for (int c = 0; c < N_KINDS; c++) {
            tcase tc = KINDS[c];
            tc.T = 1.0f;
            tc.scale = 1.0f;
            float loss = NAN, grad[10];
            if (!tg_run(&tc, &P, &loss, grad)) continue;
            CHECK_MSG(isfinite(loss) && kd_test_all_finite(grad, 10), "%s: loss %g, gradient finite %d", tc.name, (double)loss,
                      kd_test_all_finite(grad, 10));
            for (int w = 0; w < 3; w++)
                if (tc.kind == wk[w]) CHECK_CLOSE(loss, want[w], 1e-6, 1e-6);
        }
        tp_free(&P);
    }
}

/* ============================================================ 6. graph contract */

/* Runs the forward of a (3, 8) k = 3 problem in a forked child whose ids
 * the caller edits; returns the child's stderr and whether it aborted. */
static char *child_forward(const tprob *P, int *aborted) {
    char errp[512];
    static int calls;
    snprintf(errp, sizeof errp, "%s/topk_child%d.err", kd_test_tmpdir(), calls++);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        int fe = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fe < 0 || dup2(fe, 2) < 0) _exit(126);
        tcase c = {"fkl", KD_DIV_FKL, 1.0f, 0.0f, 1.0f};
        tgraph G;
        if (!tg_build(&G, &c, P, 0, 0)) _exit(125);
        kd_node_set_name(G.loss, "topk_kd");
        kd_graph_forward(G.g, 1);
        _exit(0);
    }
    int status = 0;
    *aborted = 0;
    if (pid > 0 && waitpid(pid, &status, 0) == pid) *aborted = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
    FILE *f = fopen(errp, "r");
    char *buf = kd_calloc(4096, 1);
    if (f) {
        size_t got = fread(buf, 1, 4095, f);
        buf[got] = 0;
        fclose(f);
    }
    return buf;
}

static void test_contract(void) {
    TEST("bad ids abort once, naming the node, the input and the first bad row") {
        int shape[2] = {4, 8};
        tprob P = tp_new(2, shape, 3, 1.0, 0, 0.5f, 0);
        int aborted = 0;
        char *err = child_forward(&P, &aborted);
        CHECK_MSG(!aborted && err[0] == 0, "valid ids: aborted %d, stderr '%s'", aborted, err);
        free(err);
        /* row 2 repeats an id, row 3 too: reported once, for row 2 */
        P.ids[2 * 3 + 2] = P.ids[2 * 3 + 0];
        P.ids[3 * 3 + 1] = P.ids[3 * 3 + 0];
        err = child_forward(&P, &aborted);
        CHECK_MSG(aborted, "a repeated id did not abort (stderr '%s')", err);
        CHECK_MSG(strstr(err, "'topk_kd'") && strstr(err, "row 2 ") && strstr(err, "'t_ids'") &&
                      strstr(err, "position 2") && strstr(err, "repeated") && !strstr(err, "row 3"),
                  "message: '%s'", err);
        char *second = strchr(err, '\n');
        CHECK_MSG(second && !strstr(second + 1, "internal error"), "reported more than once: '%s'", err);
        free(err);
        tp_free(&P);
        const float badv[3] = {8.0f, -1.0f, 2.5f}; /* = V, negative, not an integer */
        for (int b = 0; b < 3; b++) {
            P = tp_new(2, shape, 3, 1.0, 0, 0.5f, 0);
            P.ids[1 * 3 + 1] = badv[b];
            err = child_forward(&P, &aborted);
            CHECK_MSG(aborted && strstr(err, "row 1 ") && strstr(err, "not a valid id"), "id %g: aborted %d, '%s'",
                      (double)badv[b], aborted, err);
            free(err);
            tp_free(&P);
        }
    }
    TEST("masked rows are not checked and do not count; all masked: 0 and no gradient") {
        int shape[2] = {4, 8};
        tprob P = tp_new(2, shape, 3, 1.0, 0, 0.5f, 0);
        tcase c = {"jsd", KD_DIV_JSD, 1.5f, 0.4f, 1.0f};
        float full = NAN, g_full[32];
        /* rows 0, 2, 3 alone, row 1 dropped by the mask and holding padding */
        P.mask = kd_malloc(4 * sizeof(float));
        for (int r = 0; r < 4; r++) P.mask[r] = r != 1;
        tg_run(&c, &P, &full, g_full);
        for (int i = 0; i < 3; i++) P.ids[3 + i] = -1.0f;
        float padded = NAN, g_pad[32];
        if (tg_run(&c, &P, &padded, g_pad)) {
            CHECK(memcmp(&full, &padded, sizeof full) == 0);
            CHECK_ARRAYS("masked padding row: gradient", g_pad, g_full, 32, 0, 0);
            float zero[8] = {0};
            CHECK_ARRAYS("masked row gets no gradient", g_pad + 8, zero, 8, 0, 0);
        }
        /* the mean over kept rows: rows {0, 2, 3} = mean of the single-row values */
        const int kept_rows[3] = {0, 2, 3};
        double mean = 0.0;
        for (int i = 0; i < 3; i++) {
            for (int r = 0; r < 4; r++) P.mask[r] = r == kept_rows[i];
            float v = NAN;
            if (tg_run(&c, &P, &v, NULL)) mean += v / 3.0;
        }
        CHECK_CLOSE(full, mean, 1e-7, 1e-6);
        memset(P.mask, 0, 4 * sizeof(float));
        float none = NAN, g_none[32];
        if (tg_run(&c, &P, &none, g_none)) {
            float zero[32] = {0};
            CHECK(none == 0.0f);
            CHECK_ARRAYS("all masked: gradient", g_none, zero, 32, 0, 0);
        }
        tp_free(&P);
    }
    TEST("the order of the ids within a row does not change the loss or the gradient") {
        int shape[2] = {3, 12};
        tprob P = tp_new(2, shape, 5, 2.0, 0, 0.5f, 0);
        for (int c = 0; c < N_KINDS; c++) {
            float a = NAN, b = NAN, ga[36], gb[36];
            tcase tc = KINDS[c];
            tc.T = 2.0f;
            if (!tg_run(&tc, &P, &a, ga)) continue;
            for (int r = 0; r < 3; r++) /* reverse each row's (id, log q) pairs */
                for (int i = 0; i < 2; i++) {
                    float *x = P.ids + r * 5, *y = P.lq + r * 5, u = x[i], v = y[i];
                    x[i] = x[4 - i];
                    y[i] = y[4 - i];
                    x[4 - i] = u;
                    y[4 - i] = v;
                }
            if (!tg_run(&tc, &P, &b, gb)) continue;
            CHECK_CLOSE(a, b, 1e-7, 1e-6);
            CHECK_ARRAYS(tc.name, ga, gb, 36, 1e-7, 1e-6);
        }
        tp_free(&P);
    }
    TEST("no gradient reaches the teacher inputs, even trainable ones") {
        int shape[2] = {3, 7}, cs[2] = {3, 2};
        tprob P = tp_new(2, shape, 2, 1.0, 0, 0.5f, 0);
        kd_graph *g = kd_graph_new();
        kd_node *s = kd_param(g, "s", 2, shape, KD_INIT_ZERO, 1), *lq = kd_param(g, "t_logp", 2, cs, KD_INIT_ZERO, 1);
        kd_node *ids = kd_input(g, "t_ids", 2, cs);
        kd_node *loss = kd_topk_divergence(g, s, ids, lq, NULL, KD_DIV_RKL, 1.0f, 0.0f, 1.0f);
        if (kd_gc_compile(g, 3, 1)) {
            memcpy(s->val.data, P.s, 21 * sizeof(float));
            memcpy(ids->val.data, P.ids, 6 * sizeof(float));
            memcpy(lq->val.data, P.lq, 6 * sizeof(float));
            kd_graph_forward(g, 1);
            kd_graph_backward(g, loss);
            float zero[6] = {0};
            CHECK_ARRAYS("t_logp gradient", lq->grad.data, zero, 6, 0, 0);
            CHECK(kd_test_max_abs(s->grad.data, 21) > 0.0);
        }
        kd_graph_free(g);
        tp_free(&P);
    }
    TEST("shape errors are reported by compile") {
        /* ids vs logp shape, k > V, leading dims, mask length, cache rank
         * (inputs' first dims follow the batch: the mismatches are elsewhere) */
        int s2[2] = {4, 6}, s3[3] = {4, 3, 6}, c3[2] = {4, 3}, c2[2] = {4, 2}, c7[2] = {4, 7}, l3[3] = {4, 2, 3};
        int k3[3] = {4, 3, 3}, m2[2] = {4, 2};
        for (int c = 0; c < 5; c++) {
            kd_graph *g = kd_graph_new();
            int three = c == 2 || c == 3 || c == 4;
            kd_node *sn = three ? kd_input(g, "s", 3, s3) : kd_input(g, "s", 2, s2);
            const int *ci = c == 1 ? c7 : c == 2 ? l3 : c == 3 ? k3 : c3;
            int cn = c == 2 || c == 3 ? 3 : 2;
            kd_node *ids = kd_input(g, "ids", cn, ci), *lq = kd_input(g, "lq", cn, c == 0 ? c2 : ci);
            kd_node *mask = c == 3 ? kd_input(g, "mask", 2, m2) : NULL;
            kd_topk_divergence(g, sn, ids, lq, mask, KD_DIV_FKL, 1.0f, 0.0f, 1.0f);
            kd_status st = kd_graph_compile(g, 4, 1);
            CHECK_MSG(st == KD_ESHAPE, "case %d: compile returned %d (%s)", c, (int)st, kd_error_message());
            kd_graph_free(g);
        }
        /* and the same graph with consistent shapes compiles */
        kd_graph *g = kd_graph_new();
        kd_node *sn = kd_input(g, "s", 3, s3), *ids = kd_input(g, "ids", 3, k3), *lq = kd_input(g, "lq", 3, k3);
        int m3[2] = {4, 3};
        kd_topk_divergence(g, sn, ids, lq, kd_input(g, "mask", 2, m3), KD_DIV_FKL, 1.0f, 0.0f, 1.0f);
        CHECK(kd_graph_compile(g, 4, 1) == KD_OK);
        kd_graph_free(g);
    }
    TEST("1 and 2 OpenMP threads give the same bits (64 x 600 logits, k = 20, parallel loops on)") {
#ifdef _OPENMP
        int shape[2] = {64, 600}, n = 64 * 600;
        tprob P = tp_new(2, shape, 20, 1.0, 5, 0.5f, 0);
        float *g1 = kd_malloc((size_t)n * sizeof(float)), *g2 = kd_malloc((size_t)n * sizeof(float));
        int saved = omp_get_max_threads();
        for (int c = 0; c < N_KINDS; c++) {
            float l1 = NAN, l2 = NAN;
            omp_set_num_threads(1);
            int ok = tg_run(&KINDS[c], &P, &l1, g1);
            omp_set_num_threads(2);
            ok &= tg_run(&KINDS[c], &P, &l2, g2);
            if (!ok) continue;
            CHECK_MSG(memcmp(&l1, &l2, sizeof l1) == 0 && memcmp(g1, g2, (size_t)n * sizeof(float)) == 0,
                      "%s: results depend on the thread count (%.9g vs %.9g)", KINDS[c].name, (double)l1, (double)l2);
        }
        omp_set_num_threads(saved);
        free(g1);
        free(g2);
        tp_free(&P);
#else
        CHECK(1); /* built without OpenMP: one thread only */
#endif
    }
}

void test_topk(void) {
    kd_rng_seed(&rng, 4099);
    test_gradcheck();
    test_dense();
    test_dpi();
    test_fixture();
    test_fp16();
    test_contract();
}
