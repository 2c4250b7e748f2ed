/* test_multitask.c - teacher annealing and the multi-task student
 * (src/distill/anneal.c, src/train/multitask.c, src/cli/run_multitask.c):
 *   1. finite-difference gradient checks of the annealed cross-entropy
 *      (batch 1, odd sizes, lambda 0, 1 and between, T != 1, unlabelled rows);
 *   2. its value and gradient against a double reference written here from
 *      the formula, and closed forms (lambda 0: cross-entropy; lambda 1:
 *      KL(p_t || p_s) + H(p_t));
 *   3. PyTorch parity (tests/fixtures/multitask.safetensors, written by
 *      tests/fixtures/gen_multitask.py): the op's cases, and a whole
 *      two-task graph (shared trunk, two heads, two teachers,
 *      "anneal(T=2) + ce(weight=0.3)" per task, task weights, lambda set
 *      through the batch hook's progress): total loss and every student
 *      gradient;
 *   4. the schedule (lambda per step through the batch hook, the epoch
 *      schedule of anneal(epochs=E)), the per-task labels the hook fills;
 *   5. task-list parsing and its errors;
 *   6. per-task checkpoints: the saved task model, loaded as an ordinary
 *      classifier, gives the accuracy and loss kd_multitask_evaluate gave;
 *   7. the CLI: a tiny two-task run (teachers trained when missing) whose
 *      summary matches `distill eval --label-map` of its task checkpoint,
 *      and refused configurations.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "gradcheck.h"
#include "kd_distill.h"
#include "kd_io.h"
#include "kd_multitask.h"
#include "test.h"

/* Steps of 1e-2 on logits of scale ~2 measure 1e-5..3e-4 on the correct
 * op; a backward without the (1 - lambda) gold part, or with p_t at T = 1
 * when T = 2, measured 0.2..0.7. */
#define GC_TOL 2e-3

static kd_rng rng;

/* ---------------------------------------------------------------- a graph of the op */

typedef struct ag {
    kd_graph *g;
    kd_node *s, *t, *lab, *loss;
    kd_gc gc;
} ag;

static int ag_build(ag *G, int R, int K, float T, float lam, const float *s, const float *t, const float *lab,
                    int project) {
    memset(G, 0, sizeof *G);
    int sh[2] = {R, K};
    G->g = kd_graph_new();
    G->s = kd_param(G->g, "s", 2, sh, KD_INIT_ZERO, 1);
    G->t = kd_input(G->g, "t", 2, sh);
    G->lab = kd_input(G->g, "labels", 1, sh);
    G->loss = kd_anneal_ce(G->g, G->s, G->t, G->lab, T, lam);
    if (project) G->gc = kd_gradcheck_project(G->g, G->loss);
    if (!kd_gc_compile(G->g, R, 7)) return 0;
    memcpy(G->s->val.data, s, (size_t)R * K * sizeof(float));
    memcpy(G->t->val.data, t, (size_t)R * K * sizeof(float));
    memcpy(G->lab->val.data, lab, (size_t)R * sizeof(float));
    return 1;
}

static void fill(float *x, int n, float scale) {
    for (int i = 0; i < n; i++) x[i] = scale * kd_rng_normal(&rng);
}

/* labels in [0, K), every `unl`-th row (unl > 0) unlabelled */
static void labels(float *y, int R, int K, int unl) {
    for (int r = 0; r < R; r++) y[r] = unl > 0 && r % unl == 1 ? -1.0f : (float)kd_rng_below(&rng, (uint32_t)K);
}

/* double reference from the formula, naive: q as probabilities */
static double ref_anneal(const float *s, const float *t, const float *lab, int R, int K, double T, double lam,
                         double *grad) {
    double L = 0.0;
    for (int r = 0; r < R; r++) {
        double ps[64], pt[64], ms = -INFINITY, mt = -INFINITY, zs = 0.0, zt = 0.0;
        for (int k = 0; k < K; k++) {
            ms = fmax(ms, s[r * K + k]);
            mt = fmax(mt, t[r * K + k] / T);
        }
        for (int k = 0; k < K; k++) {
            zs += ps[k] = exp(s[r * K + k] - ms);
            zt += pt[k] = exp(t[r * K + k] / T - mt);
        }
        int y = (int)lab[r];
        double l = y < 0 ? 1.0 : lam;
        for (int k = 0; k < K; k++) {
            double q = l * pt[k] / zt + (k == y ? 1.0 - l : 0.0);
            L -= q * (s[r * K + k] - ms - log(zs));
            if (grad) grad[r * K + k] = (ps[k] / zs - q) / R;
        }
    }
    return L / R;
}

typedef struct acase {
    const char *name;
    int R, K, unl;
    float T, lam, scale;
} acase;

static const acase AC[] = {
    {"batch 1, K 3, lambda 0.5", 1, 3, 0, 1.0f, 0.5f, 2.0f},
    {"7 x 5, lambda 1 (teacher only)", 7, 5, 0, 1.0f, 1.0f, 2.0f},
    {"7 x 5, lambda 0 (gold only)", 7, 5, 0, 1.0f, 0.0f, 2.0f},
    {"9 x 4, lambda 0.3, T 2", 9, 4, 0, 2.0f, 0.3f, 2.0f},
    {"11 x 6, lambda 0.8, T 0.5, unlabelled rows", 11, 6, 3, 0.5f, 0.8f, 1.5f},
};
#define N_AC ((int)(sizeof AC / sizeof AC[0]))

static void test_gradcheck(void) {
    TEST("anneal_ce: finite-difference gradients (batch 1, odd sizes, lambda 0..1, T, unlabelled)") {
        for (int c = 0; c < N_AC; c++) {
            const acase *a = &AC[c];
            int n = a->R * a->K;
            float *s = kd_malloc((size_t)n * sizeof(float)), *t = kd_malloc((size_t)n * sizeof(float));
            float *y = kd_malloc((size_t)a->R * sizeof(float));
            fill(s, n, a->scale);
            fill(t, n, a->scale);
            labels(y, a->R, a->K, a->unl);
            ag G;
            double err = INFINITY;
            if (ag_build(&G, a->R, a->K, a->T, a->lam, s, t, y, 1)) {
                kd_gradcheck_randomize(&G.gc, 31 + c);
                err = kd_gradcheck(G.g, &G.gc, &G.s, 1, 1e-2, 1);
            }
            CHECK_MSG(err < GC_TOL, "%s: gradient error %g", a->name, err);
            kd_graph_free(G.g);
            free(s);
            free(t);
            free(y);
        }
    }
}

static void test_reference(void) {
    TEST("anneal_ce: value and gradient = the double reference; lambda 0 = CE; lambda 1 = KL + H(p_t)") {
        for (int c = 0; c < N_AC; c++) {
            const acase *a = &AC[c];
            int n = a->R * a->K;
            float *s = kd_malloc((size_t)n * sizeof(float)), *t = kd_malloc((size_t)n * sizeof(float));
            float *y = kd_malloc((size_t)a->R * sizeof(float)), *gf = kd_malloc((size_t)n * sizeof(float));
            double *gr = kd_malloc((size_t)n * sizeof(double));
            fill(s, n, a->scale);
            fill(t, n, a->scale);
            labels(y, a->R, a->K, a->unl);
            double want = ref_anneal(s, t, y, a->R, a->K, a->T, a->lam, gr);
            for (int i = 0; i < n; i++) gf[i] = (float)gr[i];
            ag G;
            if (ag_build(&G, a->R, a->K, a->T, a->lam, s, t, y, 0)) {
                kd_graph_forward(G.g, 1);
                kd_graph_backward(G.g, G.loss);
                CHECK_CLOSE(G.loss->val.data[0], want, 1e-6, 1e-5);
                CHECK_ARRAYS(a->name, G.s->grad.data, gf, n, 1e-7, 1e-5);
                /* closed forms, computed independently of ref_anneal */
                if (a->lam == 0.0f && a->unl == 0) {
                    double ce = 0.0;
                    for (int r = 0; r < a->R; r++) {
                        double m = -INFINITY, z = 0.0;
                        for (int k = 0; k < a->K; k++) m = fmax(m, s[r * a->K + k]);
                        for (int k = 0; k < a->K; k++) z += exp(s[r * a->K + k] - m);
                        ce += m + log(z) - s[r * a->K + (int)y[r]];
                    }
                    CHECK_CLOSE(G.loss->val.data[0], ce / a->R, 1e-6, 1e-5);
                }
                if (a->lam == 1.0f && a->T == 1.0f) {
                    double klh = 0.0; /* KL(p_t || p_s) + H(p_t) = cross-entropy of p_s under p_t */
                    for (int r = 0; r < a->R; r++) {
                        double ms = -INFINITY, mt = -INFINITY, zs = 0.0, zt = 0.0;
                        for (int k = 0; k < a->K; k++) {
                            ms = fmax(ms, s[r * a->K + k]);
                            mt = fmax(mt, t[r * a->K + k]);
                        }
                        for (int k = 0; k < a->K; k++) {
                            zs += exp(s[r * a->K + k] - ms);
                            zt += exp(t[r * a->K + k] - mt);
                        }
                        for (int k = 0; k < a->K; k++) {
                            double lpt = t[r * a->K + k] - mt - log(zt), lps = s[r * a->K + k] - ms - log(zs);
                            klh += exp(lpt) * (lpt - lps) - exp(lpt) * lpt;
                        }
                    }
                    CHECK_CLOSE(G.loss->val.data[0], klh / a->R, 1e-6, 1e-5);
                }
            }
            kd_graph_free(G.g);
            free(s);
            free(t);
            free(y);
            free(gf);
            free(gr);
        }
    }
}

/* ---------------------------------------------------------------- PyTorch fixture */

static const char *const FX[] = {"lam1_t1", "lam0", "lam03_t2", "unlabelled", "large", "batch1"};

/* Tolerances: the reference is float64 PyTorch on the same float32 inputs,
 * our op works in double per row and stores float32, so values differ by
 * float32 rounding: 1e-5 relative; gradients 1e-5 relative plus 1e-6 of the
 * largest element (saturated rows at |z| ~ 50 hold tiny differences). */
static void fx_op(const kd_safetensors *st, const char *key) {
    char k[96];
    snprintf(k, sizeof k, "%s.s", key);
    const kd_st_tensor *ts = kd_st_find(st, k);
    CHECK_MSG(ts && ts->ndim == 2, "fixture: no 2-D tensor %s", k);
    if (!ts || ts->ndim != 2) return;
    int R = (int)ts->shape[0], K = (int)ts->shape[1], n = R * K, sh[2] = {R, K}, one[1] = {1}, two[1] = {2};
    float *s = kd_malloc((size_t)n * sizeof(float)), *t = kd_malloc((size_t)n * sizeof(float));
    float *y = kd_malloc((size_t)R * sizeof(float)), *want = kd_malloc((size_t)n * sizeof(float));
    float args[2], wl = NAN;
    kd_status rc = kd_st_get_f32(st, k, s, 2, sh);
    snprintf(k, sizeof k, "%s.t", key);
    if (rc == KD_OK) rc = kd_st_get_f32(st, k, t, 2, sh);
    snprintf(k, sizeof k, "%s.labels", key);
    if (rc == KD_OK) rc = kd_st_get_f32(st, k, y, 1, &R);
    snprintf(k, sizeof k, "%s.args", key);
    if (rc == KD_OK) rc = kd_st_get_f32(st, k, args, 1, two);
    snprintf(k, sizeof k, "%s.loss", key);
    if (rc == KD_OK) rc = kd_st_get_f32(st, k, &wl, 1, one);
    snprintf(k, sizeof k, "%s.grad_s", key);
    if (rc == KD_OK) rc = kd_st_get_f32(st, k, want, 2, sh);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    ag G = {0};
    if (rc == KD_OK && ag_build(&G, R, K, args[0], args[1], s, t, y, 0)) {
        kd_graph_forward(G.g, 1);
        kd_graph_backward(G.g, G.loss);
        CHECK_MSG(fabs(G.loss->val.data[0] - wl) <= 1e-5 * fabs(wl), "%s: loss %.9g, PyTorch %.9g", key,
                  (double)G.loss->val.data[0], (double)wl);
        float mx = 0.0f;
        for (int i = 0; i < n; i++) mx = fmaxf(mx, fabsf(want[i]));
        snprintf(k, sizeof k, "%s.grad_s", key);
        CHECK_ARRAYS(k, G.s->grad.data, want, n, 1e-6 * mx + 1e-9, 1e-5);
    }
    if (G.g) kd_graph_free(G.g);
    free(s);
    free(t);
    free(y);
    free(want);
}

/* the fixture's two tasks over 6 classes */
static void two_tasks(kd_mt_task *tk, const char *teacher) {
    memset(tk, 0, 2 * sizeof *tk);
    const int mb[6] = {0, 1, 0, 1, 2, 2};
    snprintf(tk[0].name, sizeof tk[0].name, "a");
    snprintf(tk[1].name, sizeof tk[1].name, "b");
    for (int i = 0; i < 6; i++) {
        tk[0].map[i] = i;
        tk[1].map[i] = mb[i];
    }
    tk[0].n_map = tk[1].n_map = 6;
    tk[0].classes = 6;
    tk[1].classes = 3;
    tk[0].weight = 1.0f;
    tk[1].weight = 0.5f;
    snprintf(tk[0].teacher, sizeof tk[0].teacher, "%s", teacher);
    snprintf(tk[1].teacher, sizeof tk[1].teacher, "%s", teacher);
}

static void fx_graph(const kd_safetensors *st) {
    kd_mt_task tk[2];
    two_tasks(tk, "mlp: 5");
    kd_dataset geo = {.n = 5, .c = 1, .h = 4, .w = 4, .n_classes = 6};
    kd_multitask mt;
    kd_status rc = kd_multitask_build(&mt, "mlp: 7", "anneal(T=2) + ce(weight=0.3)", tk, 2, &geo, 5, 1);
    CHECK_MSG(rc == KD_OK, "build: %s", kd_error_message());
    if (rc != KD_OK) return;
    CHECK(mt.has_teachers && mt.loss.n == 4);
    CHECK(strcmp(mt.loss.terms[0].name, "a.anneal") == 0 && strcmp(mt.loss.terms[3].name, "b.ce") == 0);
    /* every parameter and teacher weight from the fixture, by graph name */
    const char *names[] = {"s.fc1.weight", "s.fc1.bias", "s.head.weight", "s.head.bias", "mt1.head.weight",
                           "mt1.head.bias", "t0.fc1.weight", "t0.fc1.bias", "t0.head.weight", "t0.head.bias",
                           "t1.fc1.weight", "t1.fc1.bias", "t1.head.weight", "t1.head.bias"};
    int nn = (int)(sizeof names / sizeof names[0]);
    for (int i = 0; i < nn && rc == KD_OK; i++) {
        kd_node *n = kd_graph_find(mt.c.g, names[i]);
        CHECK_MSG(n, "no node %s", names[i]);
        if (!n) rc = KD_ECONFIG;
        if (rc == KD_OK) rc = kd_st_get_f32(st, names[i], n->val.data, n->val.ndim, n->val.shape);
    }
    int xs[4] = {5, 1, 4, 4}, ys[1] = {5}, one[1] = {1};
    float y[5], want = NAN;
    if (rc == KD_OK) rc = kd_st_get_f32(st, "mt.x", mt.c.x->val.data, 4, xs);
    if (rc == KD_OK) rc = kd_st_get_f32(st, "mt.y", y, 1, ys);
    if (rc == KD_OK) rc = kd_st_get_f32(st, "mt.loss", &want, 1, one);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    if (rc == KD_OK) {
        /* task 0's labels are the loader's (identity map here); the hook maps task b's
         * from the original labels and sets lambda = 1 - 3/4 (epoch 3 of 4, 1 step each) */
        uint8_t orig[5];
        int aug[20] = {0};
        for (int i = 0; i < 5; i++) {
            orig[i] = (uint8_t)y[i];
            mt.c.y->val.data[i] = y[i];
            aug[4 * i + 3] = i;
        }
        mt.orig_labels = orig;
        mt.epochs = 4;
        mt.steps_per_epoch = 1;
        kd_multitask_batch(&mt, 3, aug, 5);
        kd_graph_set_batch(mt.c.g, 5);
        kd_graph_forward(mt.c.g, 1);
        kd_graph_backward(mt.c.g, mt.c.loss);
        CHECK_MSG(fabs(mt.c.loss->val.data[0] - want) <= 1e-5 * fabs(want), "total loss %.9g, PyTorch %.9g",
                  (double)mt.c.loss->val.data[0], (double)want);
        for (int i = 0; i < 6; i++) { /* student parameters: float32 forward, tolerances as ops */
            kd_node *n = kd_graph_find(mt.c.g, names[i]);
            int64_t m = kd_numel(&n->val);
            float *g = kd_malloc((size_t)m * sizeof(float));
            char k[96];
            snprintf(k, sizeof k, "mt.grad.%s", names[i]);
            if (kd_st_get_f32(st, k, g, n->val.ndim, n->val.shape) == KD_OK) {
                float mx = 0.0f;
                for (int64_t j = 0; j < m; j++) mx = fmaxf(mx, fabsf(g[j]));
                CHECK_ARRAYS(k, n->grad.data, g, m, 1e-5 * mx + 1e-7, 1e-4);
            } else {
                CHECK_MSG(0, "fixture: %s", kd_error_message());
            }
            free(g);
        }
        for (int i = 6; i < nn; i++) { /* teachers are frozen: no gradient buffers */
            kd_node *n = kd_graph_find(mt.c.g, names[i]);
            CHECK_MSG(n->grad.data == NULL, "%s has a gradient", names[i]);
        }
    }
    kd_multitask_free(&mt);
}

static void test_fixture(void) {
    TEST("PyTorch parity (tests/fixtures/multitask.safetensors): anneal_ce cases and a two-task graph") {
        char path[512];
        kd_test_fixture("multitask.safetensors", path, sizeof path);
        kd_safetensors st;
        kd_status rc = kd_st_read(path, &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_multitask.py)", kd_error_message());
        if (rc != KD_OK) break;
        for (int i = 0; i < (int)(sizeof FX / sizeof FX[0]); i++) fx_op(&st, FX[i]);
        fx_graph(&st);
        kd_st_free(&st);
    }
}

/* ---------------------------------------------------------------- schedule, labels */

static void test_schedule(void) {
    TEST("lambda per step through the batch hook; anneal(epochs=E) per epoch; labels of tasks >= 1") {
        kd_mt_task tk[2];
        two_tasks(tk, "mlp: 5");
        kd_dataset geo = {.n = 6, .c = 1, .h = 4, .w = 4, .n_classes = 6};
        kd_multitask mt;
        kd_status rc = kd_multitask_build(&mt, "mlp: 7", "anneal(T=1, from=0.9, to=0.1) + kd(T=4)", tk, 2, &geo, 3, 1);
        CHECK_MSG(rc == KD_OK, "build: %s", kd_error_message());
        if (rc != KD_OK) break;
        kd_node *an = mt.loss.terms[0].value;
        CHECK(strcmp(mt.loss.terms[0].name, "a.anneal") == 0);
        CHECK_CLOSE(an->fp[1], 0.9, 0, 1e-6); /* after build: progress 0 */
        uint8_t orig[6] = {5, 4, 3, 2, 1, 0};
        mt.orig_labels = orig;
        mt.epochs = 2;
        mt.steps_per_epoch = 2; /* 4 steps: progress 0, 1/4, 2/4, 3/4 */
        int aug[12] = {0};
        const int idx[3] = {0, 3, 4};
        for (int i = 0; i < 3; i++) aug[4 * i + 3] = idx[i];
        mt.c.y->val.data[0] = 5.0f;
        mt.c.y->val.data[1] = -1.0f; /* an unlabelled example stays unlabelled in every task */
        mt.c.y->val.data[2] = 1.0f;
        const double want[4] = {0.9, 0.7, 0.5, 0.3};
        for (int s = 0; s < 4; s++) {
            kd_multitask_batch(&mt, s / 2, aug, 3);
            CHECK_CLOSE(an->fp[1], want[s], 0, 1e-6);
            CHECK_CLOSE(mt.loss.terms[2].value->fp[1], want[s], 0, 1e-6); /* task b's anneal term */
        }
        const float *yb = mt.labels[1]->val.data; /* map b: 0 1 0 1 2 2 of orig 5, (unlabelled), 1 */
        CHECK(yb[0] == 2.0f && yb[1] == -1.0f && yb[2] == 1.0f);
        kd_multitask_free(&mt);
        /* a single-task loss with epochs=E follows the epoch schedule and ignores progress */
        kd_graph *g = kd_graph_new();
        int sh[2] = {2, 3};
        kd_node *s = kd_param(g, "s", 2, sh, KD_INIT_ZERO, 1), *t = kd_input(g, "t", 2, sh), *l = kd_input(g, "y", 1, sh);
        kd_loss_spec sp;
        kd_built_loss bl;
        kd_loss_inputs in = {.s_logits = s, .t_logits = t, .labels = l};
        rc = kd_loss_spec_parse("anneal(epochs=4)", &sp);
        if (rc == KD_OK) rc = kd_loss_build(g, &sp, &in, &bl);
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        if (rc == KD_OK) {
            kd_loss_set_epoch(&bl, 1);
            CHECK_CLOSE(bl.terms[0].value->fp[1], 1.0, 0, 1e-6);
            kd_loss_set_epoch(&bl, 3);
            CHECK_CLOSE(bl.terms[0].value->fp[1], 0.5, 0, 1e-6);
            kd_anneal_set_progress(&bl, 0.0);
            CHECK_CLOSE(bl.terms[0].value->fp[1], 0.5, 0, 1e-6);
            kd_loss_set_epoch(&bl, 9);
            CHECK_CLOSE(bl.terms[0].value->fp[1], 0.0, 0, 1e-6);
        }
        kd_graph_free(g);
        /* a bad argument is an error naming it */
        g = kd_graph_new();
        s = kd_param(g, "s", 2, sh, KD_INIT_ZERO, 1);
        t = kd_input(g, "t", 2, sh);
        l = kd_input(g, "y", 1, sh);
        in = (kd_loss_inputs){.s_logits = s, .t_logits = t, .labels = l};
        rc = kd_loss_spec_parse("anneal(from=1.5)", &sp);
        if (rc == KD_OK) rc = kd_loss_build(g, &sp, &in, &bl);
        CHECK(rc == KD_ECONFIG && strstr(kd_error_message(), "from=1.5"));
        in.t_logits = NULL;
        rc = kd_loss_spec_parse("anneal", &sp);
        if (rc == KD_OK) rc = kd_loss_build(g, &sp, &in, &bl);
        CHECK(rc == KD_ECONFIG && strstr(kd_error_message(), "needs a teacher"));
        kd_graph_free(g);
    }
}

/* ---------------------------------------------------------------- parsing */

static void test_parse(void) {
    TEST("task lists: names, maps, weights and their errors") {
        kd_mt_task tk[KD_MAX_TASKS];
        int n = 0;
        kd_status rc = kd_multitask_parse("fine wear", "0 1 2 3 | 1 0 1 0", "1 0.5", 4, tk, &n);
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        CHECK(n == 2 && tk[0].classes == 4 && tk[1].classes == 2 && tk[1].map[0] == 1 && tk[1].weight == 0.5f);
        rc = kd_multitask_parse("a b", "0 1 2 3 | 1 0 1 0", "", 4, tk, &n);
        CHECK(rc == KD_OK && tk[0].weight == 1.0f && tk[1].weight == 1.0f);
        struct {
            const char *names, *maps, *weights, *needle;
        } bad[] = {
            {"", "0 1", "", "no task"},
            {"a b", "0 1 1 0", "", "2 tasks but 1 maps"},
            {"a", "0 1 1 0 | 1 0 0 1", "", "more maps"},
            {"a", "0 1 3 0", "", "never produces label 2"},
            {"a", "0 0 0 0", "", "one class"},
            {"a", "0 1 1", "", "maps 3 classes, the data has 4"},
            {"a a", "0 1 1 0 | 0 1 1 0", "", "'a' twice"},
            {"a-b", "0 1 1 0", "", "letters, digits"},
            {"a b", "0 1 1 0 | 0 1 1 0", "1", "1 numbers for 2 tasks"},
            {"a", "0 1 1 0", "x", "not a list"},
            {"a", "0 1 x 0", "", "task 'a'"},
        };
        for (int i = 0; i < (int)(sizeof bad / sizeof bad[0]); i++) {
            rc = kd_multitask_parse(bad[i].names, bad[i].maps, bad[i].weights, 4, tk, &n);
            CHECK_MSG(rc == KD_ECONFIG && strstr(kd_error_message(), bad[i].needle), "case %d: '%s' (want '%s')", i,
                      kd_error_message(), bad[i].needle);
        }
        /* a loss that reads a teacher needs one per task */
        kd_dataset geo = {.n = 4, .c = 1, .h = 4, .w = 4, .n_classes = 4};
        rc = kd_multitask_parse("a b", "0 1 2 3 | 1 0 1 0", "", 4, tk, &n);
        kd_multitask mt;
        rc = kd_multitask_build(&mt, "mlp: 4", "ce + kd", tk, 2, &geo, 2, 1);
        CHECK(rc == KD_ECONFIG && strstr(kd_error_message(), "task 'a' has no teacher"));
        rc = kd_multitask_build(&mt, "mlp: 4", "ce", tk, 2, &geo, 2, 1); /* CE only: no teachers built */
        CHECK(rc == KD_OK && !mt.has_teachers && kd_multitask_params(&mt) == (16 * 4 + 4) + (4 * 4 + 4) + (2 * 4 + 2));
        if (rc == KD_OK) kd_multitask_free(&mt);
    }
}

/* ---------------------------------------------------------------- checkpoints */

static void test_checkpoint(void) {
    TEST("task checkpoints load as ordinary models and match kd_multitask_evaluate") {
        kd_mt_task tk[2];
        two_tasks(tk, "");
        int N = 37;
        kd_dataset ds = {.n = N, .c = 1, .h = 4, .w = 4, .n_classes = 6, .mean = 0.5f, .std = 0.25f};
        ds.images = kd_malloc((size_t)N * 16);
        ds.labels = kd_malloc((size_t)N);
        for (int i = 0; i < N * 16; i++) ds.images[i] = (uint8_t)kd_rng_below(&rng, 256);
        for (int i = 0; i < N; i++) ds.labels[i] = (uint8_t)(i % 6);
        kd_multitask mt;
        kd_status rc = kd_multitask_build(&mt, "cnn: c3 p f6", "ce", tk, 2, &ds, 8, 3);
        CHECK_MSG(rc == KD_OK, "build: %s", kd_error_message());
        if (rc != KD_OK) {
            free(ds.images);
            free(ds.labels);
            break;
        }
        kd_eval_result res[2];
        kd_multitask_evaluate(&mt, &ds, 8, res);
        CHECK(res[0].n == N && res[1].n == N);
        for (int k = 0; k < 2; k++) {
            char path[512];
            snprintf(path, sizeof path, "%s/mt_task%d.safetensors", kd_test_tmpdir(), k);
            rc = kd_multitask_save(&mt, k, &ds, path);
            CHECK_MSG(rc == KD_OK, "save: %s", kd_error_message());
            kd_dataset v = ds;
            v.labels = kd_malloc((size_t)N);
            memcpy(v.labels, ds.labels, (size_t)N);
            rc = kd_dataset_relabel(&v, tk[k].map, 6);
            kd_classifier c;
            if (rc == KD_OK) rc = kd_classifier_new(&c, "cnn: c3 p f6", "", &v, 8, 0.0f, 99);
            if (rc == KD_OK) {
                rc = kd_checkpoint_load(c.g, &c.m, path);
                CHECK_MSG(rc == KD_OK, "load: %s", kd_error_message());
                kd_eval_result e = kd_evaluate(&c, &v, 8);
                CHECK_MSG(e.acc == res[k].acc, "task %d: acc %g vs %g", k, e.acc, res[k].acc);
                CHECK_CLOSE(e.loss, res[k].loss, 1e-6, 1e-5);
                kd_classifier_free(&c);
            } else {
                CHECK_MSG(0, "%s", kd_error_message());
            }
            free(v.labels);
        }
        kd_multitask_free(&mt);
        free(ds.images);
        free(ds.labels);
    }
}

/* ---------------------------------------------------------------- CLI */

static int run_cmd(const char *cmd) {
    fflush(stdout);
    fflush(stderr);
    int r = system(cmd);
    return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

static void test_cli(void) {
    TEST("distill run with [multitask]: teachers trained when missing, per-task summary = distill eval") {
        const char *bin = getenv("KD_DISTILL") ? getenv("KD_DISTILL") : "build/distill";
        char dir[512], ini[600], cmd[4096];
        snprintf(dir, sizeof dir, "%s/mtcli", kd_test_tmpdir());
        mkdir(dir, 0755);
        snprintf(ini, sizeof ini, "%s/mt.ini", dir);
        FILE *f = fopen(ini, "w");
        CHECK(f != NULL);
        if (!f) break;
        fprintf(f,
                "[run]\nout = %s/runs\nname = mt\nseed = 2\nthreads = 1\n"
                "[data]\nlimit = 300\n"
                "[teacher]\nmodel = mlp: 16\nepochs = 1\n"
                "[student]\nmodel = mlp: 8\n"
                "[multitask]\ntasks = fine kind\nmaps = 0 1 2 3 4 5 6 7 8 9 | 0 0 0 0 0 1 0 1 2 1\n"
                "teachers = %s/t_fine.safetensors %s/t_kind.safetensors\nweights = 1 2\n"
                "[distill]\nloss = anneal(T=2)\n"
                "[train]\nepochs = 2\nbatch = 64\n",
                dir, dir, dir);
        fclose(f);
        snprintf(cmd, sizeof cmd, "%s run %s --quiet > %s/out.txt 2> %s/err.txt", bin, ini, dir, dir);
        int code = run_cmd(cmd);
        CHECK_MSG(code == 0, "distill run exited %d", code);
        char p[700];
        snprintf(p, sizeof p, "%s/t_kind.safetensors", dir);
        struct stat sb;
        CHECK(stat(p, &sb) == 0);
        snprintf(p, sizeof p, "%s/runs/mt/summary.json", dir);
        char *js = kd_test_slurp(p, NULL);
        cJSON *root = js ? cJSON_Parse(js) : NULL;
        CHECK_MSG(root != NULL, "no summary.json");
        double acc = -1.0, tacc = -1.0;
        if (root) {
            cJSON *t = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "student"), "tasks"), "kind");
            cJSON *a = cJSON_GetObjectItem(t, "test_acc");
            if (cJSON_IsNumber(a)) acc = a->valuedouble;
            cJSON *tt = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "teachers"), "kind"), "test_acc");
            if (cJSON_IsNumber(tt)) tacc = tt->valuedouble;
            CHECK(cJSON_IsFalse(cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "teachers"), "fine"),
                                                    "loaded")));
        }
        CHECK_MSG(acc > 0.3 && acc <= 1.0 && tacc > 0.3, "task accuracy %g, teacher %g", acc, tacc);
        /* the task checkpoint, evaluated by `distill eval` on the same 10k test images */
        snprintf(cmd, sizeof cmd,
                 "%s eval %s/runs/mt/student_kind.safetensors --threads 1 --label-map '0 0 0 0 0 1 0 1 2 1' "
                 "> %s/eval.txt 2>&1",
                 bin, dir, dir);
        code = run_cmd(cmd);
        CHECK_MSG(code == 0, "distill eval exited %d", code);
        snprintf(p, sizeof p, "%s/eval.txt", dir);
        char *ev = kd_test_slurp(p, NULL);
        double eacc = -1.0;
        const char *q = ev ? strstr(ev, "accuracy ") : NULL;
        if (q) eacc = atof(q + 9) / 100.0;
        /* eval prints two decimals of a percentage */
        CHECK_MSG(eacc > 0.3 && fabs(eacc - acc) < 6e-5, "distill eval accuracy %g, run %g", eacc, acc);
        /* run again: the teachers are loaded now, and the results are the same bits */
        char *js1 = js;
        snprintf(cmd, sizeof cmd, "%s run %s --quiet > %s/out2.txt 2> %s/err2.txt", bin, ini, dir, dir);
        code = run_cmd(cmd);
        CHECK(code == 0);
        snprintf(p, sizeof p, "%s/runs/mt/summary.json", dir);
        char *js2 = kd_test_slurp(p, NULL);
        cJSON *r2 = js2 ? cJSON_Parse(js2) : NULL;
        if (r2) {
            cJSON *a2 = cJSON_GetObjectItem(
                cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(r2, "student"), "tasks"), "kind"), "test_acc");
            CHECK(cJSON_IsNumber(a2) && a2->valuedouble == acc);
            CHECK(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(r2, "teachers"), "fine"),
                                                   "loaded")));
        } else {
            CHECK_MSG(0, "no summary.json after the second run");
        }
        /* refused: a global label map, --resume, lists of the wrong length, a transfer set */
        const char *bad[][2] = {
            {"--data.label_map='0 0 0 0 0 1 1 1 1 1'", "[data] label_map"},
            {"--resume", "not available for multi-task runs"},
            {"--multitask.teachers=only_one.safetensors", "1 paths for 2 tasks"},
            {"--multitask.maps='0 1 2 3 4 5 6 7 8 9'", "2 tasks but 1 maps"},
            {"--data.labeled=100", "[data] labeled are not available"},
        };
        for (int i = 0; i < 5; i++) {
            snprintf(cmd, sizeof cmd, "%s run %s --quiet %s > %s/bad.txt 2>&1", bin, ini, bad[i][0], dir);
            code = run_cmd(cmd);
            snprintf(p, sizeof p, "%s/bad.txt", dir);
            char *e = kd_test_slurp(p, NULL);
            CHECK_MSG(code != 0 && e && strstr(e, bad[i][1]), "%s: exit %d, '%s'", bad[i][0], code, e ? e : "");
            free(e);
        }
        cJSON_Delete(root);
        cJSON_Delete(r2);
        free(js1);
        free(js2);
        free(ev);
    }
}

void test_multitask(void) {
    kd_rng_seed(&rng, 8);
    test_gradcheck();
    test_reference();
    test_fixture();
    test_schedule();
    test_parse();
    test_checkpoint();
    test_cli();
}
