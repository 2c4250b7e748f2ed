/* test_features2.c - tests for src/distill/feature2.c (vid_nll, l2norm,
 * crd_infonce, crd_nce, bn_noaffine, logsum) and the loss rows of
 * build_feat2.c (vid, crd, simkd, mm, proj_ensemble for fitnet and mm).
 *
 *   1. finite-difference gradient checks of every op w.r.t. every input
 *      that takes a gradient (crd_nce in eval mode, so that the memory
 *      banks stay put between the perturbed forwards);
 *   2. closed forms: vid at mu = t, InfoNCE on orthonormal rows, NCE with
 *      all-zero banks (every score equal), the statistics of bn_noaffine,
 *      logsum of known differences, l2norm of a zero row;
 *   3. PyTorch parity via tests/fixtures/features2.safetensors (written by
 *      tests/fixtures/gen_features2.py; missing fixture = failure),
 *      including two steps of the CRD memory bank (Z, sampling, update);
 *   4. memory-bank behaviour (initialisation, when the update lands,
 *      determinism per step), thread-count and max-batch independence;
 *   5. the loss rows on real models: parameter names and shapes, values
 *      against naive re-computations (simkd's logits, ensembles), gradients
 *      into the teacher's CRD head, and errors for bad arguments.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "kd_distill.h"
#include "kd_io.h"
#include "kd_losses.h"
#include "test.h"

/* see test_features.c: losses are doubles rounded once to float32; correct
 * backwards measure 1e-7..1e-4, a wrong term 1e-2 and more */
#define GC_TOL 1e-3

static kd_rng rng;

/* ============================================================ 1. gradients */

static double gc_run(kd_graph *g, kd_node *out, kd_node **wrt, int n, int training, double eps) {
    static uint64_t calls;
    kd_gc p = kd_gradcheck_project(g, out);
    if (!kd_gc_compile(g, out->val.shape[0], 7)) return INFINITY;
    for (int k = 0; k < n; k++) kd_gc_fill(&rng, wrt[k], 1.0f, 0.1f * k);
    kd_gradcheck_randomize(&p, 900 + calls++);
    return kd_gradcheck(g, &p, wrt, n, eps, training);
}

static void gc_vid(const int *sh, float a0, float eps) {
    kd_graph *g = kd_graph_new();
    kd_node *mu = kd_gc_param(g, "mu", sh[0], sh + 1), *t = kd_gc_param(g, "t", sh[0], sh + 1);
    kd_node *a = kd_gc_param(g, "alpha", 1, sh + 2);
    kd_node *wrt[3] = {mu, t, a};
    double err = gc_run(g, kd_vid_nll(g, mu, t, a, a0, eps), wrt, 3, 1, 1e-2);
    CHECK_MSG(err < GC_TOL, "vid_nll %dD a0 %g: gradient error %.3g", sh[0], a0, err);
    kd_graph_free(g);
}

static void gradchecks(void) {
    TEST("gradcheck vid_nll: 4-D and 2-D, mu, t and alpha") {
        gc_vid((int[]){4, 2, 3, 2, 2}, 0.5f, 1e-5f);
        gc_vid((int[]){2, 4, 5}, -0.3f, 1e-2f);
    }
    TEST("gradcheck l2norm: (3, 5) and (2, 2, 3)") {
        int shapes[2][4] = {{2, 3, 5}, {3, 2, 2, 3}};
        for (int c = 0; c < 2; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = kd_gc_param(g, "x", shapes[c][0], shapes[c] + 1);
            double err = gc_run(g, kd_l2norm(g, x), &x, 1, 1, 1e-2);
            CHECK_MSG(err < GC_TOL, "l2norm case %d: gradient error %.3g", c, err);
            kd_graph_free(g);
        }
    }
    TEST("gradcheck crd_infonce: raw rows (T=0.5) and behind l2norm (T=0.07)") {
        for (int c = 0; c < 2; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *s = kd_gc_param(g, "s", 2, (int[]){5, 4}), *t = kd_gc_param(g, "t", 2, (int[]){5, 4});
            kd_node *l = c == 0 ? kd_crd_infonce(g, s, t, 0.5f) : kd_crd_infonce(g, kd_l2norm(g, s), kd_l2norm(g, t), 0.07f);
            kd_node *wrt[2] = {s, t};
            double err = gc_run(g, l, wrt, 2, 1, c == 0 ? 1e-2 : 2e-3);
            CHECK_MSG(err < GC_TOL, "infonce case %d: gradient error %.3g", c, err);
            kd_graph_free(g);
        }
    }
    TEST("gradcheck crd_nce behind l2norm (eval mode: banks fixed), T=0.5 and 0.2") {
        for (int c = 0; c < 2; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *s = kd_gc_param(g, "s", 2, (int[]){3, 4}), *t = kd_gc_param(g, "t", 2, (int[]){3, 4});
            kd_node *idx = kd_input(g, "idx", 1, (int[]){3});
            kd_node *l = kd_crd_nce(g, kd_l2norm(g, s), kd_l2norm(g, t), idx, 10, 6, c ? 0.2f : 0.5f, 0.5f);
            kd_gc p = kd_gradcheck_project(g, l);
            if (kd_gc_compile(g, 3, 7)) {
                kd_gc_fill(&rng, s, 1.0f, 0.0f);
                kd_gc_fill(&rng, t, 1.0f, 0.2f);
                idx->val.data[0] = 4, idx->val.data[1] = 0, idx->val.data[2] = 9;
                kd_gradcheck_randomize(&p, 77 + c);
                kd_node *wrt[2] = {s, t};
                double err = kd_gradcheck(g, &p, wrt, 2, 2e-3, 0);
                CHECK_MSG(err < GC_TOL, "crd_nce case %d: gradient error %.3g", c, err);
            }
            kd_graph_free(g);
        }
    }
    TEST("gradcheck bn_noaffine: (5, 3) and (3, 2, 2, 2)") {
        int shapes[2][5] = {{2, 5, 3}, {4, 3, 2, 2, 2}};
        for (int c = 0; c < 2; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = kd_gc_param(g, "x", shapes[c][0], shapes[c] + 1);
            double err = gc_run(g, kd_bn_noaffine(g, x, 1e-4f), &x, 1, 1, 1e-2);
            CHECK_MSG(err < GC_TOL, "bn_noaffine case %d: gradient error %.3g", c, err);
            kd_graph_free(g);
        }
    }
    TEST("gradcheck logsum: alpha 4, 2.5 and 1.5 (differences away from 0)") {
        float alphas[3] = {4.0f, 2.5f, 1.5f};
        for (int c = 0; c < 3; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *a = kd_gc_param(g, "a", 2, (int[]){4, 5}), *b = kd_gc_param(g, "b", 2, (int[]){4, 5});
            kd_node *l = kd_logsum(g, a, b, alphas[c]);
            kd_gc p = kd_gradcheck_project(g, l);
            if (kd_gc_compile(g, 4, 7)) {
                kd_gc_fill_away(&rng, a, 1.0f, 0.3f);
                memset(b->val.data, 0, 20 * sizeof(float));
                for (int i = 0; i < 20; i++) b->val.data[i] = a->val.data[i] > 0 ? -0.2f * (i % 3) : 0.2f * (i % 4);
                kd_gradcheck_randomize(&p, 300 + c);
                kd_node *wrt[2] = {a, b};
                double err = kd_gradcheck(g, &p, wrt, 2, 1e-2, 1);
                CHECK_MSG(err < GC_TOL, "logsum alpha %g: gradient error %.3g", alphas[c], err);
            }
            kd_graph_free(g);
        }
    }
}

/* ============================================================ 2. closed forms */

static void closed_forms(void) {
    TEST("vid_nll at mu = t: 0.5 log(init_var), d mu = 0, d alpha = sigmoid(a0) / (2 C var)") {
        kd_graph *g = kd_graph_new();
        int sh[4] = {2, 3, 2, 2};
        kd_node *mu = kd_gc_param(g, "mu", 4, sh), *t = kd_gc_param(g, "t", 4, sh), *a = kd_gc_param(g, "a", 1, (int[]){3});
        double iv = 5.0, eps = 1e-5, a0 = log(expm1(iv - eps));
        kd_node *l = kd_vid_nll(g, mu, t, a, (float)a0, (float)eps);
        if (kd_gc_compile(g, 2, 7)) {
            kd_gc_fill(&rng, mu, 1.0f, 0.0f);
            memcpy(t->val.data, mu->val.data, 24 * sizeof(float));
            kd_gc_step(g, l, 1);
            double var = log1p(exp((float)a0)) + (float)eps;
            CHECK_CLOSE(l->val.data[0], 0.5 * log(iv), 0, 1e-6);
            CHECK(kd_test_max_abs(mu->grad.data, 24) == 0.0 && kd_test_max_abs(t->grad.data, 24) == 0.0);
            double want = 1.0 / (1.0 + exp(-(float)a0)) / (2.0 * 3.0 * var);
            for (int c = 0; c < 3; c++) CHECK_CLOSE(a->grad.data[c], want, 0, 1e-5);
        }
        kd_graph_free(g);
    }
    TEST("crd_infonce on orthonormal rows: 2 (log(e^(1/T) + N - 1) - 1/T)") {
        kd_graph *g = kd_graph_new();
        kd_node *s = kd_gc_param(g, "s", 2, (int[]){4, 4}), *t = kd_gc_param(g, "t", 2, (int[]){4, 4});
        kd_node *l = kd_crd_infonce(g, s, t, 0.5f);
        if (kd_gc_compile(g, 4, 7)) {
            for (int i = 0; i < 16; i++) s->val.data[i] = t->val.data[i] = i % 5 == 0 ? 1.0f : 0.0f;
            kd_gc_step(g, l, 1);
            CHECK_CLOSE(l->val.data[0], 2.0 * (log(exp(2.0) + 3.0) - 2.0), 0, 1e-6);
        }
        kd_graph_free(g);
    }
    TEST("crd_nce with all-zero banks: every x = 1/M, loss 2 (log(1+K) - K log(K/(1+K)))") {
        kd_graph *g = kd_graph_new();
        kd_node *s = kd_gc_param(g, "s", 2, (int[]){3, 4}), *t = kd_gc_param(g, "t", 2, (int[]){3, 4});
        kd_node *idx = kd_input(g, "idx", 1, (int[]){3});
        kd_node *l = kd_crd_nce(g, s, t, idx, 50, 9, 0.07f, 0.5f);
        if (kd_gc_compile(g, 3, 7)) {
            memset(kd_crd_bank(l, 0), 0, 50 * 4 * sizeof(float));
            memset(kd_crd_bank(l, 1), 0, 50 * 4 * sizeof(float));
            kd_gc_fill(&rng, s, 1.0f, 0.0f);
            kd_gc_fill(&rng, t, 1.0f, 0.0f);
            for (int i = 0; i < 3; i++) idx->val.data[i] = (float)(7 * i);
            kd_gc_step(g, l, 0);
            double K = 9.0;
            /* eps = 1e-7 against x + c = 10/50: 5e-7 relative */
            CHECK_CLOSE(l->val.data[0], 2.0 * (log(1.0 + K) - K * log(K / (1.0 + K))), 0, 2e-6);
            /* zero banks: zero gradients */
            CHECK(kd_test_max_abs(s->grad.data, 12) == 0.0);
        }
        kd_graph_free(g);
    }
    TEST("bn_noaffine: per-channel mean 0 and variance v / (v + eps)") {
        kd_graph *g = kd_graph_new();
        kd_node *x = kd_gc_param(g, "x", 4, (int[]){3, 2, 2, 2});
        kd_node *y = kd_bn_noaffine(g, x, 1e-4f);
        kd_node *l = kd_mean(g, y);
        if (kd_gc_compile(g, 3, 7)) {
            kd_gc_fill(&rng, x, 2.0f, 1.0f);
            kd_graph_forward(g, 1);
            for (int c = 0; c < 2; c++) {
                double m = 0, v = 0, mx = 0, vx = 0;
                for (int b = 0; b < 3; b++)
                    for (int i = 0; i < 4; i++) {
                        size_t o = ((size_t)b * 2 + c) * 4 + i;
                        m += y->val.data[o];
                        mx += x->val.data[o];
                    }
                m /= 12, mx /= 12;
                for (int b = 0; b < 3; b++)
                    for (int i = 0; i < 4; i++) {
                        size_t o = ((size_t)b * 2 + c) * 4 + i;
                        v += (y->val.data[o] - m) * (y->val.data[o] - m);
                        vx += (x->val.data[o] - mx) * (x->val.data[o] - mx);
                    }
                v /= 12, vx /= 12;
                CHECK_CLOSE(m, 0.0, 1e-6, 0);
                CHECK_CLOSE(v, vx / (vx + 1e-4), 0, 1e-5);
            }
            /* the mean of a normalised tensor is constant: zero gradient */
            kd_graph_backward(g, l);
            CHECK(kd_test_max_abs(x->grad.data, 24) < 1e-6);
        }
        kd_graph_free(g);
    }
    TEST("logsum of known differences: log(1 + 16 + 0 + 1/16) for alpha 4, gradients 4 d^3 / S") {
        kd_graph *g = kd_graph_new();
        kd_node *a = kd_gc_param(g, "a", 2, (int[]){2, 2}), *b = kd_gc_param(g, "b", 2, (int[]){2, 2});
        kd_node *l = kd_logsum(g, a, b, 4.0f);
        if (kd_gc_compile(g, 2, 7)) {
            float av[4] = {1, -2, 3, 0.5f}, bv[4] = {0, 0, 3, 0};
            memcpy(a->val.data, av, sizeof av);
            memcpy(b->val.data, bv, sizeof bv);
            kd_gc_step(g, l, 1);
            double S = 1 + 16 + 0 + 0.0625;
            CHECK_CLOSE(l->val.data[0], log(S), 0, 1e-7);
            float ga[4] = {(float)(4 / S), (float)(-32 / S), 0, (float)(0.5 / S)};
            CHECK_ARRAYS("logsum grad a", a->grad.data, ga, 4, 0, 1e-6);
            for (int i = 0; i < 4; i++) CHECK(b->grad.data[i] == -a->grad.data[i]);
        }
        kd_graph_free(g);
    }
    TEST("l2norm: unit rows, a zero row stays 0 without NaN") {
        kd_graph *g = kd_graph_new();
        kd_node *x = kd_gc_param(g, "x", 2, (int[]){3, 4});
        kd_node *y = kd_l2norm(g, x);
        kd_node *l = kd_sum(g, y);
        if (kd_gc_compile(g, 3, 7)) {
            kd_gc_fill(&rng, x, 1.0f, 0.0f);
            memset(x->val.data + 4, 0, 4 * sizeof(float));
            kd_gc_step(g, l, 1);
            for (int i = 0; i < 3; i++) {
                double n2 = 0;
                for (int d = 0; d < 4; d++) n2 += (double)y->val.data[i * 4 + d] * y->val.data[i * 4 + d];
                CHECK_CLOSE(n2, i == 1 ? 0.0 : 1.0, 1e-6, 0);
            }
            CHECK(kd_test_all_finite(x->grad.data, 12));
        }
        kd_graph_free(g);
    }
}

/* ============================================================ 3. PyTorch fixture */

/* Tolerances against the float64 reference stored as float32: the ops sum
 * in double from the same float32 inputs, so losses agree to a few ulp;
 * gradients pass through float32 intermediate nodes (l2norm's output,
 * bn_noaffine's output), hence 1e-5 relative with an absolute part scaled
 * by the largest element; the CRD banks after the update are float32 in C
 * (float momentum arithmetic as in torch). Formula errors are >= 1e-3. */
#define FX_RTOL 1e-5
#define FX_ATOL_REL 1e-5

static int fx_get(const kd_safetensors *st, const char *key, float *dst, int ndim, const int *shape) {
    kd_status rc = kd_st_get_f32(st, key, dst, ndim, shape);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    return rc == KD_OK;
}

static int fx_load(const kd_safetensors *st, const char *key, kd_node *n) {
    return fx_get(st, key, n->val.data, n->val.ndim, n->val.shape);
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

static void fx_loss(const kd_safetensors *st, const char *key, const kd_node *loss) {
    float want;
    if (fx_get(st, key, &want, 1, (int[]){1}))
        CHECK_MSG(fabs(loss->val.data[0] - want) <= FX_RTOL * fabs(want), "%s: %.9g, PyTorch %.9g", key,
                  loss->val.data[0], want);
}

static void fx_grad(const kd_safetensors *st, const char *key, const kd_node *n) {
    fx_expect(st, key, n->grad.data, n->val.ndim, n->val.shape);
}

static void fx_vid(const kd_safetensors *st, const char *name, int ndim, const int *sh, float a0, float eps) {
    char k[64];
    kd_graph *g = kd_graph_new();
    kd_node *mu = kd_gc_param(g, "mu", ndim, sh), *t = kd_gc_param(g, "t", ndim, sh), *a = kd_gc_param(g, "a", 1, sh + 1);
    kd_node *l = kd_vid_nll(g, mu, t, a, a0, eps);
    if (kd_gc_compile(g, sh[0], 7)) {
        int ok = 1;
        snprintf(k, sizeof k, "%s.mu", name), ok &= fx_load(st, k, mu);
        snprintf(k, sizeof k, "%s.t", name), ok &= fx_load(st, k, t);
        snprintf(k, sizeof k, "%s.alpha", name), ok &= fx_load(st, k, a);
        if (ok) {
            kd_gc_step(g, l, 1);
            snprintf(k, sizeof k, "%s.loss", name), fx_loss(st, k, l);
            snprintf(k, sizeof k, "%s.grad_mu", name), fx_grad(st, k, mu);
            snprintf(k, sizeof k, "%s.grad_t", name), fx_grad(st, k, t);
            snprintf(k, sizeof k, "%s.grad_alpha", name), fx_grad(st, k, a);
        }
    }
    kd_graph_free(g);
}

/* es (N, Ds), et (N, Dt) -> fixed linear maps (buffers ws, wt) -> l2norm -> crd_nce;
 * two steps as in gen_features2.py */
static void fx_crd(const kd_safetensors *st) {
    enum { M = 20, D = 8, K = 12, N = 4 };
    kd_graph *g = kd_graph_new();
    kd_node *es = kd_gc_param(g, "es", 2, (int[]){N, 6}), *et = kd_gc_param(g, "et", 2, (int[]){N, 5});
    kd_node *ws = kd_buffer(g, "ws", 2, (int[]){D, 6}, 0), *wt = kd_buffer(g, "wt", 2, (int[]){D, 5}, 0);
    kd_node *idx = kd_input(g, "idx", 1, (int[]){N});
    kd_node *l = kd_crd_nce(g, kd_l2norm(g, kd_matmul(g, es, ws, NULL)), kd_l2norm(g, kd_matmul(g, et, wt, NULL)), idx,
                            M, K, 0.07f, 0.5f);
    if (kd_gc_compile(g, N, 7)) {
        int ok = fx_get(st, "crd.bank_s", kd_crd_bank(l, 0), 2, (int[]){M, D});
        ok &= fx_get(st, "crd.bank_t", kd_crd_bank(l, 1), 2, (int[]){M, D});
        for (int s = 1; s <= 2 && ok; s++) {
            char k[64];
            snprintf(k, sizeof k, "crd.es%d", s), ok &= fx_load(st, k, es);
            snprintf(k, sizeof k, "crd.et%d", s), ok &= fx_load(st, k, et);
            snprintf(k, sizeof k, "crd.ws%d", s), ok &= fx_load(st, k, ws);
            snprintf(k, sizeof k, "crd.wt%d", s), ok &= fx_load(st, k, wt);
            snprintf(k, sizeof k, "crd.idx%d", s), ok &= fx_load(st, k, idx);
            if (!ok) break;
            kd_graph_set_step(g, (uint64_t)(s + 2));
            kd_gc_step(g, l, 1);
            snprintf(k, sizeof k, "crd.loss%d", s), fx_loss(st, k, l);
            snprintf(k, sizeof k, "crd.grad_es%d", s), fx_grad(st, k, es);
            snprintf(k, sizeof k, "crd.grad_et%d", s), fx_grad(st, k, et);
            if (s == 2) {
                /* the banks step 2 used: initial ones with step 1's update */
                fx_expect(st, "crd.bank_s_after1", kd_crd_bank(l, 0), 2, (int[]){M, D});
                fx_expect(st, "crd.bank_t_after1", kd_crd_bank(l, 1), 2, (int[]){M, D});
            }
        }
    }
    kd_graph_free(g);
}

static void fixture(void) {
    TEST("PyTorch parity (tests/fixtures/features2.safetensors)") {
        char path[512];
        kd_test_fixture("features2.safetensors", path, sizeof path);
        kd_safetensors st;
        kd_status rc = kd_st_read(path, &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_features2.py)", kd_error_message());
        if (rc != KD_OK) break;
        fx_vid(&st, "vid_4d", 4, (int[]){3, 4, 2, 3}, (float)log(expm1(5.0 - 1e-5)), 1e-5f);
        fx_vid(&st, "vid_2d", 2, (int[]){5, 6}, 0.3f, 1e-3f);
        const char *nce[2] = {"nce_T07", "nce_T05"};
        float temps[2] = {0.07f, 0.5f};
        for (int c = 0; c < 2; c++) {
            char k[64];
            kd_graph *g = kd_graph_new();
            kd_node *es = kd_gc_param(g, "es", 2, (int[]){6, 8}), *et = kd_gc_param(g, "et", 2, (int[]){6, 8});
            kd_node *l = kd_crd_infonce(g, kd_l2norm(g, es), kd_l2norm(g, et), temps[c]);
            if (kd_gc_compile(g, 6, 7)) {
                snprintf(k, sizeof k, "%s.es", nce[c]);
                int ok = fx_load(&st, k, es);
                snprintf(k, sizeof k, "%s.et", nce[c]);
                if (ok && fx_load(&st, k, et)) {
                    kd_gc_step(g, l, 1);
                    snprintf(k, sizeof k, "%s.loss", nce[c]), fx_loss(&st, k, l);
                    snprintf(k, sizeof k, "%s.grad_es", nce[c]), fx_grad(&st, k, es);
                    snprintf(k, sizeof k, "%s.grad_et", nce[c]), fx_grad(&st, k, et);
                }
            }
            kd_graph_free(g);
        }
        fx_crd(&st);
        const char *mm[2] = {"mm_a4", "mm_a25"};
        float alphas[2] = {4.0f, 2.5f};
        for (int c = 0; c < 2; c++) {
            char k[64];
            kd_graph *g = kd_graph_new();
            kd_node *s = kd_gc_param(g, "s", 2, (int[]){6, 5}), *t = kd_gc_param(g, "t", 2, (int[]){6, 5});
            kd_node *l = kd_logsum(g, kd_bn_noaffine(g, s, 1e-4f), kd_bn_noaffine(g, t, 1e-4f), alphas[c]);
            if (kd_gc_compile(g, 6, 7)) {
                snprintf(k, sizeof k, "%s.s", mm[c]);
                int ok = fx_load(&st, k, s);
                snprintf(k, sizeof k, "%s.t", mm[c]);
                if (ok && fx_load(&st, k, t)) {
                    kd_gc_step(g, l, 1);
                    snprintf(k, sizeof k, "%s.loss", mm[c]), fx_loss(&st, k, l);
                    snprintf(k, sizeof k, "%s.grad_s", mm[c]), fx_grad(&st, k, s);
                    snprintf(k, sizeof k, "%s.grad_t", mm[c]), fx_grad(&st, k, t);
                }
            }
            kd_graph_free(g);
        }
        kd_st_free(&st);
    }
}

/* ============================================================ 4. memory bank, threads, batch */

typedef struct nce_g {
    kd_graph *g;
    kd_node *s, *t, *idx, *l;
} nce_g;

static int nce_new(nce_g *q, int max_batch, int M, int D, int K, int threads, float mom) {
    q->g = kd_graph_new();
    kd_graph_set_threads(q->g, threads);
    q->s = kd_gc_param(q->g, "s", 2, (int[]){max_batch, D});
    q->t = kd_gc_param(q->g, "t", 2, (int[]){max_batch, D});
    q->idx = kd_input(q->g, "idx", 1, &max_batch);
    q->l = kd_crd_nce(q->g, kd_l2norm(q->g, q->s), kd_l2norm(q->g, q->t), q->idx, M, K, 0.1f, mom);
    return kd_gc_compile(q->g, max_batch, 7);
}

static void memory_bank(void) {
    TEST("crd_nce banks: U(-s, s) with s = 1/sqrt(D/3), the same for the same seed") {
        nce_g a, b;
        if (nce_new(&a, 2, 30, 6, 5, 1, 0.5f) && nce_new(&b, 2, 30, 6, 5, 1, 0.5f)) {
            for (int i = 0; i < 2; i++) a.idx->val.data[i] = b.idx->val.data[i] = (float)i;
            kd_gc_fill(&rng, a.s, 1, 0), kd_gc_fill(&rng, a.t, 1, 0), kd_gc_fill(&rng, b.s, 1, 0), kd_gc_fill(&rng, b.t, 1, 0);
            kd_graph_forward(a.g, 0);
            kd_graph_forward(b.g, 0);
            const float *ba = kd_crd_bank(a.l, 0), *bb = kd_crd_bank(b.l, 0);
            double sd = 1.0 / sqrt(2.0), mx = kd_test_max_abs(ba, 2 * 30 * 6);
            CHECK_MSG(mx <= sd && mx > 0.9 * sd, "bank range %g vs %g", mx, sd);
            CHECK(memcmp(ba, bb, 2 * 30 * 6 * sizeof(float)) == 0);
            CHECK(memcmp(ba, kd_crd_bank(a.l, 1), 30 * 6 * sizeof(float)) != 0);
        }
        kd_graph_free(a.g);
        kd_graph_free(b.g);
    }
    TEST("crd_nce update: not during the training forward, applied at the next one, never by eval") {
        enum { M = 12, D = 4 };
        nce_g q;
        if (nce_new(&q, 3, M, D, 7, 1, 0.75f)) {
            kd_gc_fill(&rng, q.s, 1, 0), kd_gc_fill(&rng, q.t, 1, 0);
            float idxv[3] = {2, 7, 11};
            memcpy(q.idx->val.data, idxv, sizeof idxv);
            kd_graph_forward(q.g, 0); /* initialises the banks */
            float before[2][M * D], z[2][3 * D];
            memcpy(before[0], kd_crd_bank(q.l, 0), sizeof before[0]);
            memcpy(before[1], kd_crd_bank(q.l, 1), sizeof before[1]);
            kd_graph_forward(q.g, 0);
            CHECK(memcmp(before[0], kd_crd_bank(q.l, 0), sizeof before[0]) == 0);
            float l0 = q.l->val.data[0];
            kd_graph_set_step(q.g, 1);
            kd_gc_step(q.g, q.l, 1);
            CHECK_MSG(memcmp(before[0], kd_crd_bank(q.l, 0), sizeof before[0]) == 0, "bank moved before backward");
            /* normalised embeddings, by hand */
            for (int side = 0; side < 2; side++)
                for (int i = 0; i < 3; i++) {
                    const float *x = (side ? q.t : q.s)->val.data + i * D;
                    double n = 0;
                    for (int d = 0; d < D; d++) n += (double)x[d] * x[d];
                    for (int d = 0; d < D; d++) z[side][i * D + d] = (float)(x[d] / sqrt(n));
                }
            kd_graph_forward(q.g, 0);
            for (int side = 0; side < 2; side++) {
                const float *bank = kd_crd_bank(q.l, side);
                int bad = 0;
                for (int r = 0; r < M; r++) {
                    int slot = r == 2 ? 0 : r == 7 ? 1 : r == 11 ? 2 : -1;
                    double n = 0, row[D];
                    for (int d = 0; d < D; d++) {
                        row[d] = slot < 0 ? before[side][r * D + d]
                                          : 0.75 * before[side][r * D + d] + 0.25 * z[side][slot * D + d];
                        n += row[d] * row[d];
                    }
                    for (int d = 0; d < D; d++) {
                        double want = slot < 0 ? row[d] : row[d] / sqrt(n);
                        bad += fabs(bank[r * D + d] - want) > 1e-6;
                    }
                }
                CHECK_MSG(bad == 0, "side %d: %d bank entries differ from the momentum update", side, bad);
            }
            CHECK_MSG(q.l->val.data[0] != l0, "the update did not change the loss");
            float after[M * D];
            memcpy(after, kd_crd_bank(q.l, 0), sizeof after);
            kd_graph_forward(q.g, 0);
            CHECK(memcmp(after, kd_crd_bank(q.l, 0), sizeof after) == 0);
        }
        kd_graph_free(q.g);
    }
    TEST("crd_nce sampling: the same step gives the same loss, another step another") {
        nce_g q;
        if (nce_new(&q, 4, 100, 5, 16, 1, 0.5f)) {
            kd_gc_fill(&rng, q.s, 1, 0), kd_gc_fill(&rng, q.t, 1, 0);
            for (int i = 0; i < 4; i++) q.idx->val.data[i] = (float)(10 * i + 3);
            kd_graph_set_step(q.g, 5);
            kd_graph_forward(q.g, 0);
            float a = q.l->val.data[0];
            kd_graph_forward(q.g, 0);
            CHECK(q.l->val.data[0] == a);
            kd_graph_set_step(q.g, 6);
            kd_graph_forward(q.g, 0);
            CHECK(q.l->val.data[0] != a);
        }
        kd_graph_free(q.g);
    }
}

/* loss and the gradients of two trainable (D, D) maps in front of op
 * (0 infonce, 1 nce) at `threads`, in a graph compiled for max_batch and run
 * at batch N; the inputs (batch-following) from a fixed seed */
static float *run_op(int op, int threads, int max_batch, int N, int *k_out) {
    enum { D = 48 };
    kd_graph *g = kd_graph_new();
    kd_graph_set_threads(g, threads);
    kd_node *xs = kd_input(g, "xs", 2, (int[]){max_batch, D}), *xt = kd_input(g, "xt", 2, (int[]){max_batch, D});
    kd_node *ws = kd_gc_param(g, "ws", 2, (int[]){D, D}), *wt = kd_gc_param(g, "wt", 2, (int[]){D, D});
    kd_node *zs = kd_l2norm(g, kd_matmul(g, xs, ws, NULL)), *zt = kd_l2norm(g, kd_matmul(g, xt, wt, NULL));
    kd_node *idx = op == 1 ? kd_input(g, "idx", 1, &max_batch) : NULL;
    kd_node *l = op == 1 ? kd_crd_nce(g, zs, zt, idx, 500, 300, 0.1f, 0.5f) : kd_crd_infonce(g, zs, zt, 0.07f);
    float *out = NULL;
    if (kd_gc_compile(g, max_batch, 7)) {
        kd_graph_set_batch(g, N);
        kd_rng_seed(&rng, 4242);
        kd_gc_fill(&rng, ws, 0.3f, 0), kd_gc_fill(&rng, wt, 0.3f, 0), kd_gc_fill(&rng, xs, 1, 0), kd_gc_fill(&rng, xt, 1, 0);
        if (idx)
            for (int i = 0; i < N; i++) idx->val.data[i] = (float)(37 * i % 500);
        kd_gc_step(g, l, 1);
        *k_out = 1 + 2 * D * D;
        out = kd_malloc((size_t)*k_out * sizeof *out);
        out[0] = l->val.data[0];
        memcpy(out + 1, ws->grad.data, (size_t)D * D * sizeof *out);
        memcpy(out + 1 + D * D, wt->grad.data, (size_t)D * D * sizeof *out);
    }
    kd_graph_free(g);
    return out;
}

static void integration(void) {
    TEST("crd ops: bitwise the same on 1 and 3 threads, and compiled for batch 9 run at 6 vs compiled for 6") {
        for (int op = 0; op < 2; op++) {
            int k = 0;
            float *a = run_op(op, 1, 6, 6, &k), *b = run_op(op, 3, 6, 6, &k), *c = run_op(op, 1, 9, 6, &k);
            if (a && b && c) {
                CHECK_MSG(memcmp(a, b, (size_t)k * sizeof *a) == 0, "op %d: depends on the thread count", op);
                CHECK_MSG(memcmp(a, c, (size_t)k * sizeof *a) == 0, "op %d: depends on the max batch", op);
                CHECK_MSG(kd_test_all_finite(a, k) && kd_test_max_abs(a + 1, k - 1) > 0.0, "op %d: degenerate", op);
            }
            free(a), free(b), free(c);
        }
    }
}

/* ============================================================ 5. loss rows */

typedef struct pair {
    kd_graph *g;
    kd_node *x, *y;
    kd_model s, t;
    kd_built_loss L;
} pair;

static kd_status pair_compile(pair *p) {
    kd_status st = kd_graph_compile(p->g, 6, 11);
    if (st == KD_OK) {
        kd_gc_fill(&rng, p->x, 1, 0);
        for (int i = 0; i < 6; i++) p->y->val.data[i] = (float)(i % 5);
        kd_node *idx = kd_graph_find(p->g, "idx");
        if (idx)
            for (int i = 0; i < 6; i++) idx->val.data[i] = (float)(3 * i);
    }
    return st;
}

/* student and teacher on one input (B, 1, 6, 6), teacher frozen, then the
 * spec; compiled unless the caller wants to flag nodes KD_F_KEEP first (the
 * tests read intermediate values, which liveness would otherwise recycle) */
static kd_status pair_build_ex(pair *p, const char *sspec, const char *tspec, const char *spec, int64_t n_data,
                               int compile) {
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
                         .labels = p->y,
                         .n_data = n_data};
    if (st == KD_OK) st = kd_loss_build(p->g, &ls, &in, &p->L);
    if (st == KD_OK && compile) st = pair_compile(p);
    return st;
}

static kd_status pair_build(pair *p, const char *sspec, const char *tspec, const char *spec, int64_t n_data) {
    return pair_build_ex(p, sspec, tspec, spec, n_data, 1);
}

/* build, keep the student's and teacher's features and the named nodes, compile */
static kd_status pair_build_keep(pair *p, const char *sspec, const char *tspec, const char *spec,
                                 const char *const *keep) {
    kd_status st = pair_build_ex(p, sspec, tspec, spec, 0, 0);
    if (st != KD_OK) return st;
    p->s.feat->flags |= KD_F_KEEP;
    p->t.feat->flags |= KD_F_KEEP;
    for (; *keep; keep++) {
        kd_node *n = kd_graph_find(p->g, *keep);
        CHECK_MSG(n != NULL, "no node '%s'", *keep);
        if (n) n->flags |= KD_F_KEEP;
    }
    return pair_compile(p);
}

static kd_node *find(pair *p, const char *name) {
    kd_node *n = kd_graph_find(p->g, name);
    CHECK_MSG(n != NULL, "no node '%s'", name);
    return n;
}

static int shape_is(const kd_node *n, int ndim, const int *sh) {
    return n && n->val.ndim == ndim && memcmp(n->val.shape, sh, (size_t)ndim * sizeof(int)) == 0;
}

/* y (R, OUT) = x (R, IN) w^T (+ b), in double */
static void naive_linear(double *y, const double *x, const float *w, const float *b, int R, int IN, int OUT) {
    for (int r = 0; r < R; r++)
        for (int o = 0; o < OUT; o++) {
            double s = b ? b[o] : 0.0;
            for (int i = 0; i < IN; i++) s += x[r * IN + i] * w[o * IN + i];
            y[r * OUT + o] = s;
        }
}

static void rows_vid_crd(void) {
    pair p;
    TEST("vid on vectors: regressor 12 -> 20 -> 20 -> 20 without biases, variance starts at init_var") {
        kd_status st = pair_build_keep(&p, "mlp: 12", "mlp: 20", "vid(init_var=3)", (const char *[]){"proj1.4", NULL});
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            CHECK(shape_is(find(&p, "proj1.0.weight"), 2, (int[]){20, 12}));
            CHECK(shape_is(find(&p, "proj1.4.weight"), 2, (int[]){20, 20}));
            CHECK(kd_graph_find(p.g, "proj1.0.bias") == NULL);
            kd_node *a = find(&p, "proj1.log_scale"), *mu = find(&p, "proj1.4");
            CHECK(shape_is(a, 1, (int[]){20}) && a->grad.data != NULL);
            kd_gc_step(p.g, p.L.total, 1);
            /* mean of 0.5 ((mu - t)^2 / 3 + log 3): the variance is init_var exactly */
            double s = 0;
            for (int i = 0; i < 6 * 20; i++) {
                double d = (double)mu->val.data[i] - p.t.feat->val.data[i];
                s += 0.5 * (d * d / 3.0 + log(3.0));
            }
            CHECK_CLOSE(p.L.terms[0].value->val.data[0], s / 120, 0, 1e-5);
            CHECK(kd_test_max_abs(a->grad.data, 20) > 0 && kd_test_max_abs(find(&p, "proj1.0.weight")->grad.data, 240) > 0);
        }
        kd_graph_free(p.g);
    }
    TEST("vid on maps: 1x1 convolutions 3 -> 4 -> 4 -> 6 (mid=4)") {
        kd_status st = pair_build(&p, "cnn: c3 p f8", "cnn: c6 p f12", "vid(s=block1, t=block1, mid=4)", 0);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            CHECK(shape_is(find(&p, "proj1.0.weight"), 4, (int[]){4, 3, 1, 1}));
            CHECK(shape_is(find(&p, "proj1.2.weight"), 4, (int[]){4, 4, 1, 1}));
            CHECK(shape_is(find(&p, "proj1.4.weight"), 4, (int[]){6, 4, 1, 1}));
            kd_gc_step(p.g, p.L.total, 1);
            CHECK(isfinite(p.L.total->val.data[0]));
        }
        kd_graph_free(p.g);
    }
    TEST("crd(inbatch=1): heads 12/20 -> 16, both trained (the teacher's head too)") {
        kd_status st = pair_build(&p, "mlp: 12", "mlp: 20", "crd(inbatch=1, dim=16)", 0);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *hs = find(&p, "proj1.embed_s.weight"), *ht = find(&p, "proj1.embed_t.weight");
            CHECK(shape_is(hs, 2, (int[]){16, 12}) && shape_is(ht, 2, (int[]){16, 20}));
            CHECK(kd_graph_find(p.g, "idx") == NULL);
            kd_gc_step(p.g, p.L.total, 1);
            CHECK(ht->grad.data && kd_test_max_abs(ht->grad.data, 320) > 0 && kd_test_max_abs(hs->grad.data, 192) > 0);
            CHECK(kd_graph_find(p.g, "t.head.weight")->grad.data == NULL);
        }
        kd_graph_free(p.g);
    }
    TEST("crd (memory bank): n_data from the inputs, an (N) input 'idx', K and T passed on") {
        kd_status st = pair_build(&p, "mlp: 12", "mlp: 20", "crd(dim=16, nce_k=40)", 64);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *idx = find(&p, "idx"), *v = p.L.terms[0].value;
            CHECK(idx && (idx->flags & KD_F_INPUT) && shape_is(idx, 1, (int[]){6}));
            CHECK(v->op == KD_OP_CRD_NCE && v->ip[0] == 64 && v->ip[1] == 40 && fabsf(v->fp[0] - 0.07f) < 1e-9f &&
                  v->fp[1] == 0.5f);
            kd_gc_step(p.g, p.L.total, 1);
            CHECK(isfinite(v->val.data[0]) && kd_test_max_abs(find(&p, "proj1.embed_t.weight")->grad.data, 320) > 0);
        }
        kd_graph_free(p.g);
        st = pair_build(&p, "mlp: 12", "mlp: 20", "crd(n_data=80, dim=8) + crd(n_data=80, dim=8, weight=2)", 64);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            CHECK(p.L.terms[0].value->ip[0] == 80);
            CHECK(p.L.terms[0].value->in[2] == p.L.terms[1].value->in[2]); /* one idx input */
        }
        kd_graph_free(p.g);
    }
    TEST("crd: an n_data below the training-set size is a config error, not an abort in training (fuzz_spec)") {
        kd_status st = pair_build(&p, "mlp: 12", "mlp: 20", "crd(n_data=30, dim=8)", 64);
        CHECK(st == KD_ECONFIG && strstr(kd_error_message(), "n_data=30 is smaller than the training set (64"));
        kd_graph_free(p.g);
        /* equal is fine: every index the trainer feeds is below it */
        st = pair_build(&p, "mlp: 12", "mlp: 20", "crd(n_data=6, dim=8, nce_k=4)", 6);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *idx = find(&p, "idx");
            for (int i = 0; i < 6; i++) idx->val.data[i] = (float)(5 - i);
            kd_gc_step(p.g, p.L.total, 1);
            CHECK(isfinite(p.L.terms[0].value->val.data[0]));
        }
        kd_graph_free(p.g);
    }
}

static void rows_simkd_mm(void) {
    pair p;
    TEST("simkd: loss = MSE(P(f_s), f_t); infer_logits = the teacher's head on P(f_s)") {
        kd_status st = pair_build_keep(&p, "mlp: 12", "mlp: 20", "ce + simkd", (const char *[]){"proj2.2", NULL});
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *L = p.L.infer_logits, *y = find(&p, "proj2.2");
            CHECK(L != NULL && (L->flags & KD_F_KEEP) && shape_is(L, 2, (int[]){6, 5}));
            kd_gc_step(p.g, p.L.total, 1);
            kd_node *w = find(&p, "t.head.weight"), *b = find(&p, "t.head.bias");
            double yd[6 * 20], lg[6 * 5], s = 0;
            for (int i = 0; i < 120; i++) {
                yd[i] = y->val.data[i];
                double d = yd[i] - p.t.feat->val.data[i];
                s += d * d;
            }
            naive_linear(lg, yd, w->val.data, b->val.data, 6, 20, 5);
            float lgf[30];
            for (int i = 0; i < 30; i++) lgf[i] = (float)lg[i];
            if (L) CHECK_ARRAYS("simkd logits", L->val.data, lgf, 30, 1e-5, 1e-5);
            CHECK_CLOSE(p.L.terms[1].value->val.data[0], s / 120, 0, 1e-5);
            CHECK(w->grad.data == NULL); /* the teacher's head stays frozen */
        }
        kd_graph_free(p.g);
        st = pair_build(&p, "mlp: 12", "mlp: 20", "ce + fitnet", 0);
        CHECK(st == KD_OK && p.L.infer_logits == NULL);
        kd_graph_free(p.g);
    }
    TEST("mm(proj_ensemble=3): three projectors averaged, BN, log-sum (naive recomputation)") {
        kd_status st = pair_build_keep(&p, "mlp: 12", "mlp: 20", "mm(proj_ensemble=3)", (const char *[]){NULL});
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            CHECK(kd_graph_find(p.g, "proj1.weight") == NULL);
            kd_node *w[3], *b[3];
            for (int m = 0; m < 3; m++) {
                char nm[32];
                snprintf(nm, sizeof nm, "proj1e%d.weight", m);
                w[m] = find(&p, nm);
                snprintf(nm, sizeof nm, "proj1e%d.bias", m);
                b[m] = find(&p, nm);
            }
            if (w[0] && w[1] && w[2] && b[0] && b[1] && b[2]) {
                CHECK(memcmp(w[0]->val.data, w[1]->val.data, 240 * sizeof(float)) != 0);
                kd_gc_step(p.g, p.L.total, 1);
                double fs[72], ys[120], acc[120] = {0}, zs[120], zt[120];
                for (int i = 0; i < 72; i++) fs[i] = p.s.feat->val.data[i];
                for (int m = 0; m < 3; m++) {
                    naive_linear(ys, fs, w[m]->val.data, b[m]->val.data, 6, 12, 20);
                    for (int i = 0; i < 120; i++) acc[i] += ys[i] / 3.0;
                }
                for (int side = 0; side < 2; side++) {
                    double *z = side ? zt : zs;
                    for (int i = 0; i < 120; i++) z[i] = side ? p.t.feat->val.data[i] : acc[i];
                    for (int c = 0; c < 20; c++) {
                        double mn = 0, v = 0;
                        for (int r = 0; r < 6; r++) mn += z[r * 20 + c] / 6;
                        for (int r = 0; r < 6; r++) v += (z[r * 20 + c] - mn) * (z[r * 20 + c] - mn) / 6;
                        for (int r = 0; r < 6; r++) z[r * 20 + c] = (z[r * 20 + c] - mn) / sqrt(v + 1e-4);
                    }
                }
                double S = 0;
                for (int i = 0; i < 120; i++) S += pow(zs[i] - zt[i], 4);
                CHECK_CLOSE(p.L.terms[0].value->val.data[0], log(S), 0, 2e-5);
                for (int m = 0; m < 3; m++) CHECK(kd_test_max_abs(w[m]->grad.data, 240) > 0);
            }
        }
        kd_graph_free(p.g);
    }
    TEST("fitnet(proj_ensemble=2): MSE of the averaged projections") {
        kd_status st = pair_build_keep(&p, "mlp: 12", "mlp: 20", "fitnet(proj_ensemble=2)", (const char *[]){NULL});
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *w0 = find(&p, "proj1e0.weight"), *w1 = find(&p, "proj1e1.weight");
            kd_node *b0 = find(&p, "proj1e0.bias"), *b1 = find(&p, "proj1e1.bias");
            if (w0 && w1 && b0 && b1) {
                kd_gc_step(p.g, p.L.total, 1);
                double fs[72], y0[120], y1[120], s = 0;
                for (int i = 0; i < 72; i++) fs[i] = p.s.feat->val.data[i];
                naive_linear(y0, fs, w0->val.data, b0->val.data, 6, 12, 20);
                naive_linear(y1, fs, w1->val.data, b1->val.data, 6, 12, 20);
                for (int i = 0; i < 120; i++) {
                    double d = 0.5 * (y0[i] + y1[i]) - p.t.feat->val.data[i];
                    s += d * d;
                }
                CHECK_CLOSE(p.L.terms[0].value->val.data[0], s / 120, 0, 1e-5);
            }
        }
        kd_graph_free(p.g);
        st = pair_build(&p, "mlp: 12", "mlp: 20", "fitnet", 0);
        CHECK(st == KD_OK && kd_graph_find(p.g, "proj1.weight") != NULL); /* M = 1: names as before */
        kd_graph_free(p.g);
    }
}

static void row_errors(void) {
    const char *mlp_s = "mlp: 12", *mlp_t = "mlp: 20", *cnn_s = "cnn: c3 p f8", *cnn_t = "cnn: c6 p f12";
    const char *bad[][4] = {
        {mlp_s, mlp_t, "vid(init_var=1e-6)", "outside"},
        {mlp_s, mlp_t, "vid(mid=2.5)", "not an integer"},
        {cnn_s, cnn_t, "vid(t=block1)", "same height and width"},
        {mlp_s, mlp_t, "vid(sigma=1)", "no argument 'sigma'"},
        {mlp_s, mlp_t, "crd(dim=0, inbatch=1)", "outside"},
        {mlp_s, mlp_t, "crd(inbatch=2)", "outside"},
        {mlp_s, mlp_t, "crd(nce_k=1.5, n_data=10)", "not an integer"},
        {mlp_s, mlp_t, "crd", "n_data"},
        {mlp_s, mlp_t, "crd(nce_t=0)", "outside"},
        {cnn_s, cnn_t, "simkd(t=block1)", "flat teacher feature"},
        {cnn_s, cnn_t, "simkd(s=block1, t=block1, proj=conv1x1)", "teacher's head takes"},
        {mlp_s, mlp_t, "mm(alpha=0.5)", "outside"},
        {mlp_s, mlp_t, "mm(proj_ensemble=0)", "outside"},
        {mlp_t, mlp_t, "mm(proj_ensemble=2, proj=none)", "needs a projector"},
        {mlp_s, mlp_t, "fitnet(proj_ensemble=1.5)", "not an integer"},
    };
    TEST("loss row errors name the problem") {
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            pair p;
            kd_status st = pair_build(&p, bad[i][0], bad[i][1], bad[i][2], 0);
            CHECK_MSG(st != KD_OK, "'%s' built", bad[i][2]);
            CHECK_MSG(strstr(kd_error_message(), bad[i][3]) != NULL, "'%s': %s", bad[i][2], kd_error_message());
            kd_graph_free(p.g);
        }
    }
}

void test_features2(void) {
    kd_rng_seed(&rng, 20240612);
    gradchecks();
    closed_forms();
    fixture();
    memory_bank();
    integration();
    rows_vid_crd();
    rows_simkd_mm();
    row_errors();
}
