/* test_ops.c - tests for the ops in src/ops/ and the graph that runs them.
 *
 * Four kinds of check:
 *   1. finite-difference gradient checks (tests/gradcheck.c) of every op on
 *      random inputs, batch 1 and odd sizes included, with inputs built as
 *      trainable leaves so their gradients exist; kinks are kept out of reach
 *      of the step (ReLU inputs away from 0, max-pool windows of distinct,
 *      well separated values);
 *   2. values against independent references: closed forms in double
 *      (softmax, GELU, cross-entropy with smoothing, batch norm, dropout
 *      scaling), the naive conv/matmul kernels, naive backward loops;
 *   3. parity with PyTorch through tests/fixtures/ops.safetensors (written
 *      by tests/fixtures/gen_ops.py; missing fixture = failure);
 *   4. the memory planner: frozen sub-graphs own no gradients and compute
 *      what a separate graph computes; changing the batch and back changes
 *      nothing.
 * Deliberately not here: speed (bench/), model builders (test_nn.c).
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "kd_io.h"
#include "ops/ops.h"
#include "test.h"

/* The acceptance threshold of the aggregate relative gradient error. With
 * the steps used below (0.01, inputs of scale ~1), correct ops measure
 * 1e-8..2.5e-4 (float32 rounding in the forward divided by the step, plus
 * O(eps^2) truncation for curved ops; the composite graph in training mode
 * is the worst); a wrong backward term measures 1e-2..1. 1e-3 keeps a 4x
 * margin over the worst correct case. */
#define GC_TOL 1e-3

static kd_rng rng;

/* ---------------------------------------------------------------- helpers */

static kd_node *param(kd_graph *g, const char *name, int ndim, ...) {
    int shape[KD_MAX_DIM];
    va_list ap;
    va_start(ap, ndim);
    for (int i = 0; i < ndim; i++) shape[i] = va_arg(ap, int);
    va_end(ap);
    return kd_param(g, name, ndim, shape, KD_INIT_ZERO, 1);
}

static void fill_normal(float *p, int64_t n, float scale, float shift) {
    for (int64_t i = 0; i < n; i++) p[i] = shift + scale * kd_rng_normal(&rng);
}

static void fill_node(kd_node *n, float scale, float shift) {
    fill_normal(n->val.data, kd_numel(&n->val), scale, shift);
}

/* distinct values step apart, in random order: no max-pool ties within 2 eps */
static void fill_spread(kd_node *n, float step) {
    int64_t k = kd_numel(&n->val);
    float *p = n->val.data;
    for (int64_t i = 0; i < k; i++) p[i] = (float)(i - k / 2) * step;
    for (int64_t i = k - 1; i > 0; i--) {
        int64_t j = kd_rng_below(&rng, (uint32_t)(i + 1));
        float t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
}

/* Gradient check of the nodes in wrt; prints `what` on failure. */
static double gc(kd_graph *g, const kd_gc *p, kd_node **wrt, int n, double eps, int training, const char *what) {
    static uint64_t calls;
    kd_gradcheck_randomize(p, 1000 + calls++);
    double err = kd_gradcheck(g, p, wrt, n, eps, training);
    CHECK_MSG(err < GC_TOL, "%s: gradient error %.3g", what, err);
    return err;
}

/* Copies every parameter and buffer of src into the same-named one of dst. */
static void copy_state(kd_graph *dst, kd_graph *src) {
    for (int i = 0; i < kd_graph_n_state(src); i++) {
        kd_node *s = kd_graph_state(src, i), *d = kd_graph_find(dst, s->name);
        if (!d) continue;
        KD_ASSERT(kd_numel(&d->val) == kd_numel(&s->val), "state '%s' sizes differ", s->name);
        memcpy(d->val.data, s->val.data, (size_t)kd_numel(&s->val) * sizeof(float));
    }
}

static int same_floats(const float *a, const float *b, int64_t n) { return memcmp(a, b, (size_t)n * sizeof *a) == 0; }

/* ============================================================ 1. gradients */

static void gc_matmul(void) {
    TEST("gradcheck matmul") {
        /* (B, IN) with bias at B=3 and B=1, and a 3-D input without bias */
        int cases[3][4] = {{3, 5, 4, 1}, {1, 7, 3, 1}, {0, 5, 4, 0}};
        for (int c = 0; c < 3; c++) {
            kd_graph *g = kd_graph_new();
            int IN = cases[c][1], OUT = cases[c][2], bias = cases[c][3];
            kd_node *x = cases[c][0] ? param(g, "x", 2, cases[c][0], IN) : param(g, "x", 3, 2, 3, IN);
            kd_node *w = param(g, "w", 2, OUT, IN), *b = bias ? param(g, "b", 1, OUT) : NULL;
            kd_node *y = kd_matmul(g, x, w, b);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                fill_node(x, 1.0f, 0.0f);
                fill_node(w, 0.5f, 0.0f);
                if (b) fill_node(b, 0.2f, 0.0f);
                kd_node *wrt[3] = {x, w, b};
                gc(g, &p, wrt, bias ? 3 : 2, 1e-2, 1, "matmul");
            }
            kd_graph_free(g);
        }
    }
}

static void gc_conv(void) {
    TEST("gradcheck conv2d 3x3, B 1/3, stride 1/2, pad 0/1") {
        for (int B = 1; B <= 3; B += 2)
            for (int stride = 1; stride <= 2; stride++)
                for (int pad = 0; pad <= 1; pad++) {
                    kd_graph *g = kd_graph_new();
                    kd_node *x = param(g, "x", 4, B, 3, 7, 5), *w = param(g, "w", 4, 4, 3, 3, 3);
                    kd_node *b = param(g, "b", 1, 4);
                    kd_node *y = kd_conv2d(g, x, w, b, stride, pad);
                    kd_gc p = kd_gradcheck_project(g, y);
                    if (kd_gc_compile(g, 1, 42)) {
                        fill_node(x, 1.0f, 0.0f);
                        fill_node(w, 0.3f, 0.0f);
                        fill_node(b, 0.1f, 0.0f);
                        kd_node *wrt[3] = {x, w, b};
                        char what[64];
                        snprintf(what, sizeof what, "conv B=%d stride=%d pad=%d", B, stride, pad);
                        gc(g, &p, wrt, 3, 1e-2, 1, what);
                    }
                    kd_graph_free(g);
                }
    }
    TEST("gradcheck conv2d 1x1 (direct and strided) and no bias") {
        int cfg[3][3] = {{1, 0, 1}, {2, 0, 1}, {1, 0, 0}}; /* stride, pad, bias */
        for (int c = 0; c < 3; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = param(g, "x", 4, 2, 3, 5, 4), *w = param(g, "w", 4, 4, 3, 1, 1);
            kd_node *b = cfg[c][2] ? param(g, "b", 1, 4) : NULL;
            kd_node *y = kd_conv2d(g, x, w, b, cfg[c][0], cfg[c][1]);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                fill_node(x, 1.0f, 0.0f);
                fill_node(w, 0.5f, 0.0f);
                if (b) fill_node(b, 0.1f, 0.0f);
                kd_node *wrt[3] = {x, w, b};
                gc(g, &p, wrt, b ? 3 : 2, 1e-2, 1, "conv 1x1");
            }
            kd_graph_free(g);
        }
    }
}

static void gc_pool(void) {
    TEST("gradcheck maxpool 2/2 and 3/2 on odd sizes, B 1 and 2") {
        int cfg[4][3] = {{2, 2, 2}, {3, 2, 2}, {2, 2, 1}, {3, 1, 1}}; /* k, stride, B */
        for (int c = 0; c < 4; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = param(g, "x", 4, cfg[c][2], 3, 7, 5);
            kd_node *y = kd_maxpool2d(g, x, cfg[c][0], cfg[c][1]);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                fill_spread(x, 0.05f); /* neighbours 0.05 apart, step 0.01: argmax never moves */
                gc(g, &p, &x, 1, 1e-2, 1, "maxpool");
            }
            kd_graph_free(g);
        }
    }
    TEST("gradcheck avgpool and global avgpool") {
        int cfg[3][2] = {{2, 2}, {3, 2}, {3, 1}};
        for (int c = 0; c < 4; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = param(g, "x", 4, c == 3 ? 1 : 2, 3, 7, 5);
            kd_node *y = c < 3 ? kd_avgpool2d(g, x, cfg[c][0], cfg[c][1]) : kd_global_avgpool(g, x);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                fill_node(x, 1.0f, 0.0f);
                gc(g, &p, &x, 1, 1e-2, 1, c < 3 ? "avgpool" : "global avgpool");
            }
            kd_graph_free(g);
        }
    }
}

/* batch norm on x of the given shape; train or eval mode; with the ReLU
 * fused (kd_bn_relu) the data keep every output away from the kink: each
 * channel holds pairs +v, -v with |v| >= 0.3, so its batch mean is 0 and
 * xhat is never near 0; beta = 0, running mean 0, gamma > 0. */
static void gc_bn_case(int ndim, const int *shape, int training, int fused) {
    kd_graph *g = kd_graph_new();
    kd_node *x = kd_param(g, "x", ndim, shape, KD_INIT_ZERO, 1);
    kd_node *y = fused ? kd_bn_relu(g, "bn", x) : kd_bn(g, "bn", x);
    kd_gc p = kd_gradcheck_project(g, y);
    if (kd_gc_compile(g, 1, 42)) {
        kd_node *ga = kd_graph_find(g, "bn.weight"), *be = kd_graph_find(g, "bn.bias");
        kd_node *rm = kd_graph_find(g, "bn.running_mean"), *rv = kd_graph_find(g, "bn.running_var");
        int B = shape[0], C = shape[1], S = ndim == 4 ? shape[2] * shape[3] : 1, N = B * S;
        fill_node(x, 1.5f, 0.3f);
        fill_node(ga, 0.3f, 1.0f);
        fill_node(be, 0.3f, 0.0f);
        fill_node(rm, 0.5f, 0.0f);
        for (int c = 0; c < C; c++) rv->val.data[c] = 0.5f + kd_rng_uniform(&rng);
        if (fused) {
            KD_ASSERT((N & 1) == 0, "fused BN gradcheck needs an even count per channel");
            for (int c = 0; c < C; c++) {
                rm->val.data[c] = be->val.data[c] = 0.0f;
                ga->val.data[c] = 0.7f + 0.6f * kd_rng_uniform(&rng);
                for (int k = 0; k < N / 2; k++) {
                    float v = (kd_rng_uniform(&rng) < 0.5f ? -1.0f : 1.0f) * (0.3f + 1.5f * kd_rng_uniform(&rng));
                    int k2 = k + N / 2;
                    x->val.data[((size_t)(k / S) * C + c) * S + k % S] = v;
                    x->val.data[((size_t)(k2 / S) * C + c) * S + k2 % S] = -v;
                }
            }
        }
        kd_node *wrt[3] = {x, ga, be};
        char what[96];
        snprintf(what, sizeof what, "batchnorm%s %dd B=%d %s", fused ? "+relu" : "", ndim, B,
                 training ? "train" : "eval");
        gc(g, &p, wrt, 3, 1e-2, training, what);
        if (fused) {
            int64_t n = kd_numel(&y->val), pos = 0;
            for (int64_t i = 0; i < n; i++) pos += y->val.data[i] > 0.0f;
            CHECK_MSG(pos > n / 4 && pos < 3 * n / 4, "fused BN+ReLU: %lld of %lld outputs positive", (long long)pos,
                      (long long)n);
        }
    }
    kd_graph_free(g);
}

static void gc_bn(void) {
    TEST("gradcheck batchnorm (B,C) and (B,C,H,W), train and eval") {
        int s2[2] = {4, 5}, s4a[4] = {1, 3, 5, 4}, s4b[4] = {3, 3, 5, 3};
        gc_bn_case(2, s2, 1, 0);
        gc_bn_case(2, s2, 0, 0);
        gc_bn_case(4, s4a, 1, 0); /* B=1 is fine in 4-D: N = H*W */
        gc_bn_case(4, s4b, 1, 0);
        gc_bn_case(4, s4b, 0, 0);
    }
    TEST("gradcheck batchnorm with fused ReLU, train and eval") {
        int s2[2] = {4, 5}, s4a[4] = {1, 3, 5, 4}, s4c[4] = {2, 3, 5, 3};
        gc_bn_case(2, s2, 1, 1);
        gc_bn_case(2, s2, 0, 1);
        gc_bn_case(4, s4a, 1, 1);
        gc_bn_case(4, s4c, 1, 1);
        gc_bn_case(4, s4c, 0, 1);
    }
}

static void gc_elementwise(void) {
    TEST("gradcheck relu, gelu, scale") {
        for (int which = 0; which < 3; which++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = param(g, "x", 3, 3, 4, 5);
            kd_node *y = which == 0 ? kd_relu(g, x) : which == 1 ? kd_gelu(g, x) : kd_scale(g, x, -1.7f);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                kd_gc_fill_away(&rng, x, 1.5f, 0.05f);
                gc(g, &p, &x, 1, 1e-2, 1, which == 0 ? "relu" : which == 1 ? "gelu" : "scale");
            }
            kd_graph_free(g);
        }
    }
    TEST("gradcheck add (two leaves, and one leaf twice)") {
        kd_graph *g = kd_graph_new();
        kd_node *a = param(g, "a", 3, 2, 3, 4), *b = param(g, "b", 3, 2, 3, 4);
        kd_node *y = kd_add(g, kd_add(g, a, b), kd_add(g, a, a)); /* 3a + b */
        kd_gc p = kd_gradcheck_project(g, y);
        if (kd_gc_compile(g, 1, 42)) {
            fill_node(a, 1.0f, 0.0f);
            fill_node(b, 1.0f, 0.0f);
            kd_node *wrt[2] = {a, b};
            gc(g, &p, wrt, 2, 1e-2, 1, "add");
            /* and exactly: d/da = 3 d/db */
            int ok = 1;
            for (int i = 0; i < 24; i++)
                ok &= fabsf(a->grad.data[i] - 3.0f * b->grad.data[i]) <= 1e-5f * fabsf(a->grad.data[i]) + 1e-6f;
            CHECK_MSG(ok, "add: gradient of a (used three times) is not 3x that of b");
        }
        kd_graph_free(g);
    }
    TEST("gradcheck dropout at a fixed step, train and eval") {
        for (int training = 1; training >= 0; training--) {
            kd_graph *g = kd_graph_new();
            kd_node *x = param(g, "x", 2, 4, 9);
            kd_node *y = kd_dropout(g, x, 0.3f);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                fill_node(x, 1.0f, 0.0f);
                kd_graph_set_step(g, 17);
                /* the mask depends only on (seed, step, node, row): repeated
                 * forwards at one step reuse it, which the numeric side needs */
                kd_graph_forward(g, training);
                float first[36];
                memcpy(first, y->val.data, sizeof first);
                kd_graph_forward(g, training);
                CHECK_MSG(same_floats(first, y->val.data, 36), "dropout: two forwards at one step differ");
                gc(g, &p, &x, 1, 1e-2, training, training ? "dropout train" : "dropout eval");
                if (!training) {
                    /* eval mode is the identity, so is its gradient, even
                     * right after a training forward left a mask behind */
                    kd_graph_forward(g, 1);
                    kd_graph_forward(g, 0);
                    kd_graph_backward(g, p.obj);
                    int ok = 1;
                    for (int i = 0; i < 36; i++) {
                        float want = p.u->val.data[i / 9] * p.v->val.data[i % 9];
                        ok &= fabsf(x->grad.data[i] - want) <= 1e-6f + 1e-6f * fabsf(want);
                    }
                    CHECK_MSG(ok, "dropout: eval-mode gradient is not the identity");
                }
            }
            kd_graph_free(g);
        }
    }
}

static void gc_layout(void) {
    TEST("gradcheck concat (2-D and 4-D), reshape, flatten") {
        for (int c = 0; c < 4; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *a, *b = NULL, *y;
            if (c == 0) {
                a = param(g, "a", 2, 3, 2);
                b = param(g, "b", 2, 3, 5);
                y = kd_concat(g, a, b);
            } else if (c == 1) {
                a = param(g, "a", 4, 2, 2, 3, 3);
                b = param(g, "b", 4, 2, 1, 3, 3);
                y = kd_concat(g, a, b);
            } else if (c == 2) {
                a = param(g, "a", 3, 2, 3, 4);
                int s[3] = {0, 4, 3};
                /* reshape, then a matmul so the layout matters to the objective */
                y = kd_matmul(g, kd_reshape(g, a, 3, s), param(g, "w", 2, 2, 3), NULL);
            } else {
                a = param(g, "a", 4, 1, 2, 3, 2);
                y = kd_flatten(g, a);
            }
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                fill_node(a, 1.0f, 0.0f);
                if (b) fill_node(b, 1.0f, 0.0f);
                if (c == 2) fill_node(kd_graph_find(g, "w"), 1.0f, 0.0f);
                kd_node *wrt[2] = {a, b};
                gc(g, &p, wrt, b ? 2 : 1, 1e-2, 1, c < 2 ? "concat" : c == 2 ? "reshape" : "flatten");
            }
            kd_graph_free(g);
        }
    }
}

static void gc_softmax(void) {
    TEST("gradcheck softmax and log_softmax (2-D, 3-D, one row)") {
        for (int c = 0; c < 6; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = c % 3 == 0   ? param(g, "x", 2, 3, 6)
                         : c % 3 == 1 ? param(g, "x", 3, 2, 3, 5)
                                      : param(g, "x", 2, 1, 7);
            kd_node *y = c < 3 ? kd_softmax(g, x) : kd_log_softmax(g, x);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                fill_node(x, 2.0f, 0.0f);
                gc(g, &p, &x, 1, 1e-2, 1, c < 3 ? "softmax" : "log_softmax");
            }
            kd_graph_free(g);
        }
    }
}

static void gc_ce(void) {
    TEST("gradcheck cross-entropy: plain, smoothing, ignored label, B=1") {
        /* labels per case; -1 is ignored */
        float labels[4][5] = {{3, 0, 6, 2, 3}, {3, 0, 6, 2, 3}, {1, -1, 6, -1, 0}, {4}};
        float smooth[4] = {0.0f, 0.1f, 0.2f, 0.0f};
        int rows[4] = {5, 5, 5, 1};
        for (int c = 0; c < 4; c++) {
            kd_graph *g = kd_graph_new();
            int R = rows[c], ls[1] = {R};
            kd_node *z = param(g, "z", 2, R, 7), *lab = kd_input(g, "labels", 1, ls);
            kd_node *loss = kd_cross_entropy(g, z, lab, smooth[c]);
            kd_gc p = kd_gradcheck_project(g, loss);
            if (kd_gc_compile(g, R, 42)) {
                fill_node(z, 2.0f, 0.0f);
                memcpy(lab->val.data, labels[c], (size_t)R * sizeof(float));
                gc(g, &p, &z, 1, 1e-2, 1, "cross-entropy");
                if (c == 2) {
                    /* ignored rows get exactly zero gradient */
                    int zero = 1;
                    for (int k = 0; k < 7; k++) zero &= z->grad.data[7 + k] == 0.0f && z->grad.data[21 + k] == 0.0f;
                    CHECK_MSG(zero, "cross-entropy: an ignored row has a gradient");
                }
            }
            kd_graph_free(g);
        }
    }
}

static void gc_reduce(void) {
    TEST("gradcheck mean and sum") {
        for (int c = 0; c < 2; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = param(g, "x", 3, 3, 4, 2);
            /* a GELU in front so the gradient is not constant */
            kd_node *y = c ? kd_sum(g, kd_gelu(g, x)) : kd_mean(g, kd_gelu(g, x));
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 1, 42)) {
                fill_node(x, 1.0f, 0.0f);
                gc(g, &p, &x, 1, 1e-2, 1, c ? "sum" : "mean");
            }
            kd_graph_free(g);
        }
    }
}

static void gc_composite(void) {
    TEST("gradcheck a composite graph (skip connection, concat, planned gradient memory)") {
        for (int training = 1; training >= 0; training--) {
            kd_graph *g = kd_graph_new();
            int ls[1] = {2};
            kd_node *x = param(g, "x", 4, 2, 2, 6, 5), *lab = kd_input(g, "labels", 1, ls);
            kd_node *h1 = kd_conv(g, "c1", x, 3, 3, 1, 1, 1);
            kd_node *h3 = kd_gelu(g, kd_bn(g, "bn", h1));                    /* GELU, not ReLU: no kinks */
            kd_node *r = kd_add(g, kd_conv(g, "c2", h3, 3, 3, 1, 1, 1), h1); /* h1 read twice */
            kd_node *c = kd_concat(g, r, x);                                 /* x read twice */
            kd_node *f = kd_dropout(g, kd_flatten(g, kd_avgpool2d(g, c, 2, 2)), 0.2f);
            kd_node *loss = kd_cross_entropy(g, kd_dense(g, "fc", f, 4), lab, 0.1f);
            kd_gc p = kd_gradcheck_project(g, loss);
            if (kd_gc_compile(g, 2, 42)) {
                fill_node(x, 1.0f, 0.0f);
                const char *names[8] = {"c1.weight", "c1.bias", "bn.weight", "bn.bias",
                                        "c2.weight", "c2.bias", "fc.weight", "fc.bias"};
                kd_node *wrt[9] = {x};
                for (int i = 0; i < 8; i++) {
                    wrt[i + 1] = kd_graph_find(g, names[i]);
                    fill_node(wrt[i + 1], 0.4f, i == 2 ? 1.0f : 0.0f);
                }
                fill_node(kd_graph_find(g, "bn.running_mean"), 0.2f, 0.0f);
                lab->val.data[0] = 3;
                lab->val.data[1] = 1;
                kd_graph_set_step(g, 5);
                gc(g, &p, wrt, 9, 1e-2, training, training ? "composite train" : "composite eval");
            }
            kd_graph_free(g);
        }
    }
}

/* ============================================================ 2. values */

/* naive backward of conv2d in double: dx, dw, db from dy */
static void conv_backward_ref(double *dx, double *dw, double *db, const float *x, const float *w, const float *dy,
                              int B, int C, int H, int W, int OC, int K, int stride, int pad) {
    int OH = kd_conv_out(H, K, stride, pad), OW = kd_conv_out(W, K, stride, pad);
    memset(dx, 0, (size_t)B * C * H * W * sizeof *dx);
    memset(dw, 0, (size_t)OC * C * K * K * sizeof *dw);
    memset(db, 0, (size_t)OC * sizeof *db);
    for (int b = 0; b < B; b++)
        for (int o = 0; o < OC; o++)
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++) {
                    double d = dy[(((size_t)b * OC + o) * OH + oh) * OW + ow];
                    db[o] += d;
                    for (int c = 0; c < C; c++)
                        for (int kh = 0; kh < K; kh++)
                            for (int kw = 0; kw < K; kw++) {
                                int ih = oh * stride - pad + kh, iw = ow * stride - pad + kw;
                                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                                size_t xi = (((size_t)b * C + c) * H + ih) * W + iw;
                                size_t wi = (((size_t)o * C + c) * K + kh) * K + kw;
                                dx[xi] += w[wi] * d;
                                dw[wi] += x[xi] * d;
                            }
                }
}

static int close_to_double(const char *what, const float *a, const double *ref, int64_t n, double atol, double rtol) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++)
        if (!(fabs(a[i] - ref[i]) <= atol + rtol * fabs(ref[i]))) {
            if (bad < 5) fprintf(stderr, "  %s[%lld]: %.9g vs expected %.9g\n", what, (long long)i, a[i], ref[i]);
            bad++;
        }
    return bad == 0;
}

static void values_conv_matmul(void) {
    TEST("conv2d fast path vs naive kernel and naive backward, odd shapes") {
        /* B, C, H, W, OC, K, stride, pad, threads */
        int cfg[][9] = {{1, 3, 7, 5, 4, 3, 1, 1, 2}, {5, 3, 7, 5, 4, 3, 2, 1, 2}, {3, 1, 9, 11, 6, 5, 2, 2, 3},
                        {2, 5, 6, 7, 3, 1, 1, 0, 2}, {4, 4, 5, 5, 2, 1, 2, 0, 1}, {2, 2, 4, 3, 3, 3, 3, 0, 2},
                        {3, 3, 8, 8, 4, 3, 1, 0, 1}};
        int nc = (int)(sizeof cfg / sizeof cfg[0]);
        for (int c = 0; c < nc; c++) {
            int B = cfg[c][0], C = cfg[c][1], H = cfg[c][2], W = cfg[c][3], OC = cfg[c][4], K = cfg[c][5];
            int stride = cfg[c][6], pad = cfg[c][7];
            kd_graph *g = kd_graph_new();
            kd_graph_set_threads(g, cfg[c][8]);
            kd_node *x = param(g, "x", 4, B, C, H, W), *w = param(g, "w", 4, OC, C, K, K), *b = param(g, "b", 1, OC);
            kd_node *y = kd_conv2d(g, x, w, b, stride, pad);
            kd_gc p = kd_gradcheck_project(g, y);
            if (!kd_gc_compile(g, 1, 42)) {
                kd_graph_free(g);
                continue;
            }
            fill_node(x, 1.0f, 0.0f);
            fill_node(w, 0.3f, 0.0f);
            fill_node(b, 0.1f, 0.0f);
            kd_gradcheck_randomize(&p, 5);
            kd_graph_forward(g, 1);
            kd_graph_backward(g, p.obj);
            int64_t ny = kd_numel(&y->val);
            float *ref = kd_malloc((size_t)ny * sizeof *ref);
            kd_conv2d_forward_naive(ref, x->val.data, w->val.data, b->val.data, B, C, H, W, OC, K, K, stride, pad);
            char what[80];
            snprintf(what, sizeof what, "conv cfg %d y", c);
            /* the naive kernel sums in double: only the fast path's float32 rounding remains */
            CHECK_ARRAYS(what, y->val.data, ref, ny, 1e-5, 1e-5);
            /* backward against naive loops, upstream dy = u_b v_m */
            float *dy = kd_malloc((size_t)ny * sizeof *dy);
            int M = (int)(ny / B);
            for (int64_t i = 0; i < ny; i++) dy[i] = p.u->val.data[i / M] * p.v->val.data[i % M];
            int64_t nx = kd_numel(&x->val), nw = kd_numel(&w->val);
            double *dx = kd_malloc((size_t)nx * sizeof *dx), *dw = kd_malloc((size_t)nw * sizeof *dw);
            double *db = kd_malloc((size_t)OC * sizeof *db);
            conv_backward_ref(dx, dw, db, x->val.data, w->val.data, dy, B, C, H, W, OC, K, stride, pad);
            /* dW sums B*OH*OW terms of size ~1 in float32: allow 1e-4 relative */
            CHECK_MSG(close_to_double("dx", x->grad.data, dx, nx, 1e-5, 1e-4), "conv cfg %d: dx", c);
            CHECK_MSG(close_to_double("dw", w->grad.data, dw, nw, 1e-4, 1e-4), "conv cfg %d: dw", c);
            CHECK_MSG(close_to_double("db", b->grad.data, db, OC, 1e-4, 1e-4), "conv cfg %d: db", c);
            free(ref);
            free(dy);
            free(dx);
            free(dw);
            free(db);
            kd_graph_free(g);
        }
    }
    TEST("conv2d results do not depend on the thread count") {
        float *out[2] = {NULL, NULL}, *gw[2] = {NULL, NULL};
        for (int t = 0; t < 2; t++) {
            kd_graph *g = kd_graph_new();
            kd_graph_set_threads(g, t ? 3 : 1);
            int xs[4] = {7, 3, 9, 8};
            kd_node *x = kd_input(g, "x", 4, xs);
            kd_node *y = kd_conv(g, "c", x, 5, 3, 2, 1, 1);
            kd_gc p = kd_gradcheck_project(g, y);
            if (kd_gc_compile(g, 7, 42)) {
                kd_rng_seed(&rng, 77);
                fill_node(x, 1.0f, 0.0f);
                kd_gradcheck_randomize(&p, 3);
                kd_graph_forward(g, 1);
                kd_graph_backward(g, p.obj);
                out[t] = kd_malloc((size_t)kd_numel(&y->val) * sizeof(float));
                memcpy(out[t], y->val.data, (size_t)kd_numel(&y->val) * sizeof(float));
                kd_node *w = kd_graph_find(g, "c.weight");
                gw[t] = kd_malloc((size_t)kd_numel(&w->val) * sizeof(float));
                memcpy(gw[t], w->grad.data, (size_t)kd_numel(&w->val) * sizeof(float));
                if (t == 1) {
                    /* forward: every image is one sgemm, independent of threads */
                    CHECK_ARRAYS("y 1 vs 3 threads", out[1], out[0], kd_numel(&y->val), 0, 0);
                    /* dW: per-thread partials summed in another order */
                    CHECK_ARRAYS("dW 1 vs 3 threads", gw[1], gw[0], kd_numel(&w->val), 1e-5, 1e-5);
                }
            }
            kd_graph_free(g);
        }
        free(out[0]);
        free(out[1]);
        free(gw[0]);
        free(gw[1]);
    }
    TEST("matmul (3-D input) vs a naive double loop") {
        kd_graph *g = kd_graph_new();
        int xs[3] = {3, 5, 13};
        kd_node *x = kd_input(g, "x", 3, xs), *w = param(g, "w", 2, 11, 13), *b = param(g, "b", 1, 11);
        kd_node *y = kd_matmul(g, x, w, b);
        if (kd_gc_compile(g, 3, 42)) {
            CHECK(y->val.ndim == 3 && y->val.shape[0] == 3 && y->val.shape[1] == 5 && y->val.shape[2] == 11);
            fill_node(x, 1.0f, 0.0f);
            fill_node(w, 0.3f, 0.0f);
            fill_node(b, 0.3f, 0.0f);
            kd_graph_forward(g, 1);
            double ref[15 * 11];
            for (int r = 0; r < 15; r++)
                for (int o = 0; o < 11; o++) {
                    double acc = b->val.data[o];
                    for (int i = 0; i < 13; i++) acc += (double)x->val.data[r * 13 + i] * w->val.data[o * 13 + i];
                    ref[r * 11 + o] = acc;
                }
            CHECK_MSG(close_to_double("matmul", y->val.data, ref, 15 * 11, 1e-5, 1e-5), "matmul values");
        }
        kd_graph_free(g);
    }
}

static void values_pool(void) {
    TEST("pooling values; max-pool ties go to the first element") {
        kd_graph *g = kd_graph_new();
        kd_node *x = param(g, "x", 4, 2, 3, 7, 5);
        kd_node *mp = kd_maxpool2d(g, x, 3, 2), *ap = kd_avgpool2d(g, x, 2, 2), *gp = kd_global_avgpool(g, x);
        kd_node *tot = kd_add(g, kd_sum(g, mp), kd_add(g, kd_sum(g, ap), kd_sum(g, gp)));
        if (kd_gc_compile(g, 1, 42)) {
            CHECK(mp->val.shape[2] == 3 && mp->val.shape[3] == 2 && ap->val.shape[2] == 3 && ap->val.shape[3] == 2);
            CHECK(gp->val.ndim == 2 && gp->val.shape[0] == 2 && gp->val.shape[1] == 3);
            fill_node(x, 1.0f, 0.0f);
            /* plane 0: constant, so every max-pool window ties */
            for (int i = 0; i < 35; i++) x->val.data[i] = 0.5f;
            kd_graph_forward(g, 1);
            float rmp[36], rap[36], rgp[6];
            for (int p = 0; p < 6; p++) {
                const float *xp = x->val.data + p * 35;
                double s = 0.0;
                for (int i = 0; i < 35; i++) s += xp[i];
                rgp[p] = (float)(s / 35);
                for (int oh = 0; oh < 3; oh++)
                    for (int ow = 0; ow < 2; ow++) {
                        float m = -INFINITY, a = 0.0f;
                        for (int i = 0; i < 3; i++)
                            for (int j = 0; j < 3; j++) m = fmaxf(m, xp[(oh * 2 + i) * 5 + ow * 2 + j]);
                        for (int i = 0; i < 2; i++)
                            for (int j = 0; j < 2; j++) a += xp[(oh * 2 + i) * 5 + ow * 2 + j];
                        rmp[p * 6 + oh * 2 + ow] = m;
                        rap[p * 6 + oh * 2 + ow] = a / 4;
                    }
            }
            CHECK_ARRAYS("maxpool", mp->val.data, rmp, 36, 0, 0);
            CHECK_ARRAYS("avgpool", ap->val.data, rap, 36, 1e-6, 1e-6);
            CHECK_ARRAYS("global avgpool", gp->val.data, rgp, 6, 1e-6, 1e-6);
            /* backward from sum(maxpool) only through the tie plane: window
             * (oh,ow) starts at (2oh, 2ow), which gets the gradient */
            kd_graph_backward(g, tot);
            float want[35];
            for (int i = 0; i < 35; i++) want[i] = 1.0f / 35; /* global avgpool */
            for (int oh = 0; oh < 3; oh++)
                for (int ow = 0; ow < 2; ow++) {
                    want[(oh * 2) * 5 + ow * 2] += 1.0f;
                    for (int i = 0; i < 2; i++)
                        for (int j = 0; j < 2; j++) want[(oh * 2 + i) * 5 + ow * 2 + j] += 0.25f;
                }
            CHECK_ARRAYS("pool grads on the tie plane", x->grad.data, want, 35, 1e-6, 1e-6);
        }
        kd_graph_free(g);
    }
}

static void values_bn(void) {
    TEST("batchnorm train/eval values, running statistics, counter") {
        for (int nd = 2; nd <= 4; nd += 2) {
            kd_graph *g = kd_graph_new();
            int xs4[4] = {3, 4, 5, 3}, xs2[2] = {6, 4};
            kd_node *x = kd_input(g, "x", nd, nd == 4 ? xs4 : xs2);
            kd_node *y = kd_bn(g, "bn", x);
            y->flags |= KD_F_KEEP;
            if (!kd_gc_compile(g, nd == 4 ? 3 : 6, 42)) {
                kd_graph_free(g);
                continue;
            }
            kd_node *ga = kd_graph_find(g, "bn.weight"), *be = kd_graph_find(g, "bn.bias");
            kd_node *rm = kd_graph_find(g, "bn.running_mean"), *rv = kd_graph_find(g, "bn.running_var");
            kd_node *nbt = kd_graph_find(g, "bn.num_batches_tracked");
            CHECK(rm->val.data[0] == 0.0f && rv->val.data[0] == 1.0f && ga->val.data[0] == 1.0f &&
                  be->val.data[0] == 0.0f);
            fill_node(x, 2.0f, 1.0f);
            fill_node(ga, 0.3f, 1.0f);
            fill_node(be, 0.3f, 0.0f);
            int C = 4, B = x->val.shape[0], S = nd == 4 ? 15 : 1, N = B * S;
            double mu[4], var[4], rm0[4], rv0[4];
            for (int c = 0; c < C; c++) {
                rm0[c] = rm->val.data[c];
                rv0[c] = rv->val.data[c];
                double s = 0, ss = 0;
                for (int b = 0; b < B; b++)
                    for (int i = 0; i < S; i++) s += x->val.data[(b * C + c) * S + i];
                mu[c] = s / N;
                for (int b = 0; b < B; b++)
                    for (int i = 0; i < S; i++) ss += pow(x->val.data[(b * C + c) * S + i] - mu[c], 2);
                var[c] = ss / N;
            }
            for (int step = 1; step <= 2; step++) {
                kd_graph_forward(g, 1);
                double ref[180];
                for (int b = 0; b < B; b++)
                    for (int c = 0; c < C; c++)
                        for (int i = 0; i < S; i++) {
                            int k = (b * C + c) * S + i;
                            ref[k] = ga->val.data[c] * (x->val.data[k] - mu[c]) / sqrt(var[c] + 1e-5) + be->val.data[c];
                        }
                CHECK_MSG(close_to_double("bn train", y->val.data, ref, N * C, 1e-5, 1e-5), "bn %dd train values", nd);
                double m = pow(0.9, step);
                for (int c = 0; c < C; c++) {
                    /* running = (1-mom)^k * init + (1 - (1-mom)^k) * batch stat, unbiased variance */
                    CHECK_CLOSE(rm->val.data[c], m * rm0[c] + (1 - m) * mu[c], 1e-6, 1e-5);
                    CHECK_CLOSE(rv->val.data[c], m * rv0[c] + (1 - m) * var[c] * N / (N - 1), 1e-6, 1e-5);
                }
                CHECK_CLOSE(nbt->val.data[0], step, 0, 0);
            }
            kd_graph_forward(g, 0);
            double ref[180];
            for (int b = 0; b < B; b++)
                for (int c = 0; c < C; c++)
                    for (int i = 0; i < S; i++) {
                        int k = (b * C + c) * S + i;
                        ref[k] = ga->val.data[c] * (x->val.data[k] - rm->val.data[c]) / sqrt(rv->val.data[c] + 1e-5) +
                                 be->val.data[c];
                    }
            CHECK_MSG(close_to_double("bn eval", y->val.data, ref, N * C, 1e-5, 1e-5), "bn %dd eval values", nd);
            CHECK_CLOSE(nbt->val.data[0], 2, 0, 0); /* eval leaves the counter */
            kd_graph_free(g);
        }
    }
}

/* kd_bn_relu against kd_relu(kd_bn(...)): values, gradients, running stats */
static void values_bn_relu(void) {
    TEST("batchnorm with fused ReLU equals batchnorm then ReLU") {
        for (int training = 1; training >= 0; training--) {
            kd_graph *g[2];
            kd_node *x[2], *y[2];
            kd_gc p[2];
            int ok = 1;
            for (int f = 0; f < 2; f++) {
                g[f] = kd_graph_new();
                int xs[4] = {3, 4, 5, 3};
                x[f] = kd_param(g[f], "x", 4, xs, KD_INIT_ZERO, 1);
                y[f] = f ? kd_bn_relu(g[f], "bn", x[f]) : kd_relu(g[f], kd_bn(g[f], "bn", x[f]));
                p[f] = kd_gradcheck_project(g[f], y[f]);
                ok &= kd_gc_compile(g[f], 1, 42);
            }
            if (ok) {
                fill_node(x[0], 1.0f, 0.2f);
                fill_node(kd_graph_find(g[0], "bn.weight"), 0.3f, 1.0f);
                fill_node(kd_graph_find(g[0], "bn.bias"), 0.3f, 0.0f);
                fill_node(kd_graph_find(g[0], "bn.running_mean"), 0.3f, 0.0f);
                copy_state(g[1], g[0]);
                memcpy(x[1]->val.data, x[0]->val.data, 180 * sizeof(float));
                kd_gradcheck_randomize(&p[0], 11);
                kd_gradcheck_randomize(&p[1], 11);
                for (int f = 0; f < 2; f++) {
                    kd_graph_forward(g[f], training);
                    kd_graph_backward(g[f], p[f].obj);
                }
                CHECK_ARRAYS("fused y", y[1]->val.data, y[0]->val.data, 180, 1e-6, 1e-6);
                CHECK_ARRAYS("fused dx", x[1]->grad.data, x[0]->grad.data, 180, 1e-6, 1e-5);
                const char *names[4] = {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"};
                for (int i = 0; i < 4; i++) {
                    kd_node *a = kd_graph_find(g[1], names[i]), *b = kd_graph_find(g[0], names[i]);
                    const float *va = i < 2 ? a->grad.data : a->val.data, *vb = i < 2 ? b->grad.data : b->val.data;
                    CHECK_ARRAYS(names[i], va, vb, 4, 1e-6, 1e-5);
                }
            }
            kd_graph_free(g[0]);
            kd_graph_free(g[1]);
        }
    }
    TEST("batchnorm statistics with a large mean (|mean|/std = 1000)") {
        kd_graph *g = kd_graph_new();
        int xs[2] = {64, 3};
        kd_node *x = kd_input(g, "x", 2, xs), *y = kd_bn(g, "bn", x);
        if (kd_gc_compile(g, 64, 42)) {
            fill_node(x, 0.01f, 10.0f);
            kd_graph_forward(g, 1);
            kd_node *rv = kd_graph_find(g, "bn.running_var");
            int bad = 0;
            for (int c = 0; c < 3; c++) {
                double s = 0, ss = 0;
                for (int b = 0; b < 64; b++) s += x->val.data[b * 3 + c];
                double mu = s / 64;
                for (int b = 0; b < 64; b++) ss += pow(x->val.data[b * 3 + c] - mu, 2);
                double is = 1 / sqrt(ss / 64 + 1e-5);
                /* the float32 mean costs ~5e-7 / 0.01 = 5e-5 of xhat; a variance
                 * that lost its digits is off by O(1) */
                for (int b = 0; b < 64; b++)
                    bad += fabs(y->val.data[b * 3 + c] - (x->val.data[b * 3 + c] - mu) * is) > 1e-3;
                CHECK_CLOSE(rv->val.data[c], 0.9 + 0.1 * ss / 63, 0, 1e-5);
            }
            CHECK_MSG(bad == 0, "%d normalised values off with a large mean", bad);
        }
        kd_graph_free(g);
    }
}

static void values_act(void) {
    TEST("relu, gelu, scale, add, concat, reshape values") {
        kd_graph *g = kd_graph_new();
        int xs[3] = {2, 3, 4};
        kd_node *x = kd_input(g, "x", 3, xs), *x2 = kd_input(g, "x2", 3, xs);
        kd_node *r = kd_relu(g, x), *ge = kd_gelu(g, x), *sc = kd_scale(g, x, -2.5f), *ad = kd_add(g, x, x2);
        kd_node *cat = kd_concat(g, x, x2);
        int rs[2] = {0, 12};
        kd_node *rsh = kd_reshape(g, x, 2, rs);
        kd_node *keep[6] = {r, ge, sc, ad, cat, rsh};
        for (int i = 0; i < 6; i++) keep[i]->flags |= KD_F_KEEP;
        if (kd_gc_compile(g, 2, 42)) {
            fill_node(x, 3.0f, 0.0f);
            fill_node(x2, 1.0f, 0.0f);
            kd_graph_forward(g, 1);
            double rr[24], rg[24], rsc[24], rad[24];
            float rcat[48];
            for (int i = 0; i < 24; i++) {
                double v = x->val.data[i];
                rr[i] = v > 0 ? v : 0;
                rg[i] = 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
                rsc[i] = -2.5 * v;
                rad[i] = v + x2->val.data[i];
            }
            for (int b = 0; b < 2; b++) {
                memcpy(rcat + b * 24, x->val.data + b * 12, 12 * sizeof(float));
                memcpy(rcat + b * 24 + 12, x2->val.data + b * 12, 12 * sizeof(float));
            }
            CHECK_MSG(close_to_double("relu", r->val.data, rr, 24, 0, 0), "relu values");
            /* erff is accurate to a few ulp */
            CHECK_MSG(close_to_double("gelu", ge->val.data, rg, 24, 1e-6, 1e-6), "gelu values");
            CHECK_MSG(close_to_double("scale", sc->val.data, rsc, 24, 0, 1e-7), "scale values");
            CHECK_MSG(close_to_double("add", ad->val.data, rad, 24, 0, 1e-7), "add values");
            CHECK(cat->val.ndim == 3 && cat->val.shape[1] == 6 && cat->val.shape[2] == 4);
            CHECK_ARRAYS("concat", cat->val.data, rcat, 48, 0, 0);
            CHECK(rsh->val.ndim == 2 && rsh->val.shape[0] == 2 && rsh->val.shape[1] == 12);
            CHECK_ARRAYS("reshape", rsh->val.data, x->val.data, 24, 0, 0);
        }
        kd_graph_free(g);
    }
    TEST("the vectorised erf and exp behind GELU: every 1e-4 step over [-8, 8] against double libm") {
        double worst_erf = 0.0, worst_exp = 0.0;
        for (int i = -80000; i <= 80000; i++) {
            float x = (float)i * 1e-4f;
            double ref = erf((double)x);
            double got = kd_erf_vec(x, kd_exp_vec(-x * x));
            worst_erf = fmax(worst_erf, fabs(got - ref));
            float x10 = x * 10.0f;
            double ex = kd_exp_vec(x10), rx = exp((double)x10);
            worst_exp = fmax(worst_exp, fabs(ex - rx) / rx);
        }
        CHECK_MSG(worst_erf < 5e-7, "erf: worst absolute error %g", worst_erf);
        CHECK_MSG(worst_exp < 2e-7, "exp: worst relative error %g", worst_exp);
    }
    TEST("gelu derivative vs the closed form in double") {
        kd_graph *g = kd_graph_new();
        kd_node *x = param(g, "x", 2, 3, 11);
        kd_node *s = kd_sum(g, kd_gelu(g, x));
        if (kd_gc_compile(g, 1, 42)) {
            for (int i = 0; i < 33; i++) x->val.data[i] = -5.0f + 10.0f * (float)i / 32.0f;
            kd_graph_forward(g, 1);
            kd_graph_backward(g, s);
            double ref[33];
            for (int i = 0; i < 33; i++) {
                double v = x->val.data[i];
                ref[i] = 0.5 * (1 + erf(v / sqrt(2.0))) + v * exp(-0.5 * v * v) / sqrt(2 * M_PI);
            }
            CHECK_MSG(close_to_double("gelu'", x->grad.data, ref, 33, 1e-6, 1e-5), "gelu derivative");
        }
        kd_graph_free(g);
    }
}

static void values_dropout(void) {
    TEST("dropout: rate, scaling, same mask per (step,row), eval identity, batch and threads") {
        float p = 0.25f;
        float *y8 = kd_malloc(8 * 5000 * sizeof(float)), *y8b = kd_malloc(8 * 5000 * sizeof(float));
        for (int threads = 1; threads <= 2; threads++) {
            kd_graph *g = kd_graph_new();
            kd_graph_set_threads(g, threads);
            int xs[2] = {8, 5000}; /* 40000 elements: the OpenMP path */
            kd_node *x = kd_input(g, "x", 2, xs);
            kd_node *y = kd_dropout(g, x, p);
            if (!kd_gc_compile(g, 8, 42)) {
                kd_graph_free(g);
                continue;
            }
            kd_rng_seed(&rng, 4);
            kd_gc_fill_away(&rng, x, 1.0f, 0.1f);
            kd_graph_set_step(g, 3);
            kd_graph_forward(g, 1);
            long zeros = 0, badscale = 0;
            for (int i = 0; i < 40000; i++) {
                if (y->val.data[i] == 0.0f)
                    zeros++;
                else if (y->val.data[i] != x->val.data[i] * (1.0f / (1.0f - p)))
                    badscale++;
            }
            /* binomial(40000, 0.25): sd 87, so +-600 is 7 sd */
            CHECK_MSG(labs(zeros - 10000) < 600, "dropout dropped %ld of 40000 at p=0.25", zeros);
            CHECK_MSG(badscale == 0, "%ld kept values not scaled by 1/(1-p)", badscale);
            if (threads == 1) {
                memcpy(y8, y->val.data, 40000 * sizeof(float));
            } else {
                CHECK_MSG(same_floats(y8, y->val.data, 40000), "dropout mask depends on the thread count");
            }
            kd_graph_forward(g, 1);
            CHECK_MSG(same_floats(y8, y->val.data, 40000), "dropout: same step, different mask");
            kd_graph_set_step(g, 4);
            kd_graph_forward(g, 1);
            memcpy(y8b, y->val.data, 40000 * sizeof(float));
            long same = 0;
            for (int i = 0; i < 40000; i++) same += (y8b[i] == 0.0f) == (y8[i] == 0.0f);
            CHECK_MSG(same < 39000, "dropout: step 3 and 4 masks agree on %ld of 40000", same);
            /* a smaller batch keeps the masks of the rows it has */
            kd_graph_set_batch(g, 3);
            kd_graph_forward(g, 1);
            CHECK_MSG(same_floats(y8b, y->val.data, 15000), "dropout: mask of a row changes with the batch");
            kd_graph_set_batch(g, 8);
            kd_graph_forward(g, 0);
            CHECK_ARRAYS("dropout eval", y->val.data, x->val.data, 40000, 0, 0);
            kd_graph_free(g);
        }
        free(y8);
        free(y8b);
    }
}

static void values_softmax_ce(void) {
    TEST("softmax and log_softmax vs exp/sum in double, large logits") {
        kd_graph *g = kd_graph_new();
        int xs[2] = {4, 9};
        kd_node *x = kd_input(g, "x", 2, xs);
        kd_node *sm = kd_softmax(g, x), *ls = kd_log_softmax(g, x);
        sm->flags |= KD_F_KEEP;
        ls->flags |= KD_F_KEEP;
        if (kd_gc_compile(g, 4, 42)) {
            fill_node(x, 3.0f, 0.0f);
            for (int k = 0; k < 9; k++)
                x->val.data[27 + k] = 1000.0f + (float)k * 3.0f; /* overflow without max-subtraction */
            kd_graph_forward(g, 1);
            double rs[36], rl[36];
            for (int r = 0; r < 4; r++) {
                double m = -INFINITY, s = 0;
                for (int k = 0; k < 9; k++) m = fmax(m, x->val.data[r * 9 + k]);
                for (int k = 0; k < 9; k++) s += exp(x->val.data[r * 9 + k] - m);
                for (int k = 0; k < 9; k++) {
                    rs[r * 9 + k] = exp(x->val.data[r * 9 + k] - m) / s;
                    rl[r * 9 + k] = x->val.data[r * 9 + k] - m - log(s);
                }
                double tot = 0;
                for (int k = 0; k < 9; k++) tot += sm->val.data[r * 9 + k];
                CHECK_CLOSE(tot, 1.0, 1e-6, 0);
            }
            CHECK_MSG(close_to_double("softmax", sm->val.data, rs, 36, 1e-7, 1e-5), "softmax values");
            /* log-probabilities near -20 carry float32 rounding of the logit */
            CHECK_MSG(close_to_double("log_softmax", ls->val.data, rl, 36, 1e-5, 1e-5), "log_softmax values");
        }
        kd_graph_free(g);
    }
    TEST("cross-entropy vs the smoothing formula in double; ignored rows; all ignored") {
        float eps_s[3] = {0.0f, 0.1f, 0.3f};
        for (int c = 0; c < 4; c++) {
            kd_graph *g = kd_graph_new();
            int zs[2] = {6, 5}, ls[1] = {6};
            kd_node *z = kd_input(g, "z", 2, zs), *lab = kd_input(g, "y", 1, ls);
            kd_node *zp = kd_add(g, z, param(g, "bias_zero", 2, 6, 5)); /* gives z a gradient */
            float eps = c < 3 ? eps_s[c] : 0.1f;
            kd_node *loss = kd_cross_entropy(g, zp, lab, eps);
            if (!kd_gc_compile(g, 6, 42)) {
                kd_graph_free(g);
                continue;
            }
            kd_node *bz = kd_graph_find(g, "bias_zero");
            fill_node(z, 2.0f, 0.0f);
            float labels[6] = {0, 4, -1, 2, 2, -3};
            if (c == 3)
                for (int r = 0; r < 6; r++) labels[r] = -1;
            memcpy(lab->val.data, labels, sizeof labels);
            kd_graph_forward(g, 1);
            kd_graph_backward(g, loss);
            double total = 0, grad[30];
            int kept = 0;
            memset(grad, 0, sizeof grad);
            for (int r = 0; r < 6; r++) {
                if (labels[r] < 0) continue;
                const float *zr = z->val.data + r * 5;
                double m = -INFINITY, s = 0;
                for (int k = 0; k < 5; k++) m = fmax(m, zr[k]);
                for (int k = 0; k < 5; k++) s += exp(zr[k] - m);
                double lse = m + log(s), row = 0;
                for (int k = 0; k < 5; k++) {
                    double q = (k == (int)labels[r] ? 1.0 - eps : 0.0) + eps / 5;
                    row -= q * (zr[k] - lse);
                    grad[r * 5 + k] = exp(zr[k] - lse) - q;
                }
                total += row;
                kept++;
            }
            for (int i = 0; i < 30; i++) grad[i] /= kept ? kept : 1;
            CHECK_CLOSE(loss->val.data[0], kept ? total / kept : 0.0, 1e-6, 1e-6);
            CHECK_MSG(close_to_double("dCE/dz", bz->grad.data, grad, 30, 1e-7, 1e-5), "cross-entropy gradient, case %d",
                      c);
            kd_graph_free(g);
        }
    }
    TEST("mean and sum values") {
        kd_graph *g = kd_graph_new();
        int xs[3] = {3, 7, 5};
        kd_node *x = kd_input(g, "x", 3, xs);
        kd_node *m = kd_mean(g, x), *s = kd_sum(g, x);
        m->flags |= KD_F_KEEP;
        if (kd_gc_compile(g, 3, 42)) {
            fill_node(x, 1.0f, 0.5f);
            kd_graph_forward(g, 1);
            double t = 0;
            for (int i = 0; i < 105; i++) t += x->val.data[i];
            CHECK(m->val.ndim == 1 && m->val.shape[0] == 1);
            CHECK_CLOSE(s->val.data[0], t, 0, 1e-7);
            CHECK_CLOSE(m->val.data[0], t / 105, 0, 1e-7);
        }
        kd_graph_free(g);
    }
}

static void values_large(void) {
    TEST("OpenMP paths (above the parallel threshold) vs double references") {
        kd_graph *g = kd_graph_new();
        int xs[4] = {16, 8, 18, 18}; /* 41472 elements */
        kd_node *x = kd_input(g, "x", 4, xs);
        kd_node *bn = kd_bn(g, "bn", x), *ge = kd_gelu(g, x), *mp = kd_maxpool2d(g, x, 2, 2);
        kd_node *ap = kd_avgpool2d(g, x, 3, 3);
        int rs[2] = {0, 8 * 18 * 18};
        kd_node *sm = kd_softmax(g, kd_reshape(g, x, 2, rs));
        kd_node *keep[5] = {bn, ge, mp, ap, sm};
        for (int i = 0; i < 5; i++) keep[i]->flags |= KD_F_KEEP;
        if (kd_gc_compile(g, 16, 42)) {
            fill_node(x, 1.0f, 0.2f);
            kd_graph_forward(g, 1);
            int n = 16 * 8 * 324, bad_bn = 0, bad_ge = 0, bad_pool = 0, bad_sm = 0;
            for (int c = 0; c < 8; c++) {
                double s = 0, ss = 0;
                for (int b = 0; b < 16; b++)
                    for (int i = 0; i < 324; i++) s += x->val.data[(b * 8 + c) * 324 + i];
                double mu = s / (16 * 324);
                for (int b = 0; b < 16; b++)
                    for (int i = 0; i < 324; i++) ss += pow(x->val.data[(b * 8 + c) * 324 + i] - mu, 2);
                double is = 1 / sqrt(ss / (16 * 324) + 1e-5);
                for (int b = 0; b < 16; b++)
                    for (int i = 0; i < 324; i++) {
                        int k = (b * 8 + c) * 324 + i;
                        bad_bn += fabs(bn->val.data[k] - (x->val.data[k] - mu) * is) > 1e-5;
                    }
            }
            for (int k = 0; k < n; k++) {
                double v = x->val.data[k];
                bad_ge += fabs(ge->val.data[k] - 0.5 * v * (1 + erf(v / sqrt(2.0)))) > 1e-6 + 1e-6 * fabs(v);
            }
            for (int p = 0; p < 128; p++)
                for (int oh = 0; oh < 9; oh++)
                    for (int ow = 0; ow < 9; ow++) {
                        const float *xp = x->val.data + p * 324;
                        float m = fmaxf(fmaxf(xp[2 * oh * 18 + 2 * ow], xp[2 * oh * 18 + 2 * ow + 1]),
                                        fmaxf(xp[(2 * oh + 1) * 18 + 2 * ow], xp[(2 * oh + 1) * 18 + 2 * ow + 1]));
                        bad_pool += mp->val.data[p * 81 + oh * 9 + ow] != m;
                    }
            for (int p = 0; p < 128; p++)
                for (int oh = 0; oh < 6; oh++)
                    for (int ow = 0; ow < 6; ow++) {
                        double a = 0;
                        for (int i = 0; i < 3; i++)
                            for (int j = 0; j < 3; j++) a += x->val.data[p * 324 + (3 * oh + i) * 18 + 3 * ow + j];
                        bad_pool += fabs(ap->val.data[p * 36 + oh * 6 + ow] - a / 9) > 1e-6;
                    }
            for (int r = 0; r < 16; r++) {
                const float *xr = x->val.data + r * 2592;
                double m = -INFINITY, s = 0;
                for (int k = 0; k < 2592; k++) m = fmax(m, xr[k]);
                for (int k = 0; k < 2592; k++) s += exp(xr[k] - m);
                for (int k = 0; k < 2592; k++) {
                    double want = exp(xr[k] - m) / s;
                    bad_sm += fabs(sm->val.data[r * 2592 + k] - want) > 1e-9 + 1e-5 * want;
                }
            }
            CHECK_MSG(bad_bn == 0, "%d batchnorm values off", bad_bn);
            CHECK_MSG(bad_ge == 0, "%d gelu values off", bad_ge);
            CHECK_MSG(bad_pool == 0, "%d pooling values off", bad_pool);
            CHECK_MSG(bad_sm == 0, "%d softmax values off", bad_sm);
        }
        kd_graph_free(g);
    }
}

static void shape_errors(void) {
    TEST("shape errors are reported by compile, naming the node") {
        for (int c = 0; c < 4; c++) {
            kd_graph *g = kd_graph_new();
            int xs[4] = {2, 3, 5, 5};
            kd_node *x = kd_input(g, "img", 4, xs), *y;
            if (c == 0) {
                y = kd_matmul(g, kd_flatten(g, x), param(g, "w", 2, 4, 74), NULL); /* 75 features */
            } else if (c == 1) {
                y = kd_conv2d(g, x, param(g, "w", 4, 4, 2, 3, 3), NULL, 1, 0); /* 3 channels */
            } else if (c == 2) {
                int s[3] = {0, 7, 11};
                y = kd_reshape(g, x, 3, s);
            } else {
                y = kd_maxpool2d(g, x, 6, 1);
            }
            kd_node_set_name(y, "culprit");
            kd_status st = kd_graph_compile(g, 2, 1);
            CHECK_MSG(st == KD_ESHAPE, "case %d: compile returned %d", c, (int)st);
            /* the error names the node by its final name and its input */
            CHECK_MSG(strstr(kd_error_message(), "'culprit'") != NULL, "case %d: message '%s' does not name the node",
                      c, kd_error_message());
            CHECK_MSG(strstr(kd_error_message(), "(2, 3, 5, 5)") != NULL || c == 0, "case %d: message '%s' lacks the input shape",
                      c, kd_error_message());
            kd_graph_free(g);
        }
    }
}

/* ============================================================ 3. PyTorch fixture */

/* Loads tensor `key` into leaf n (shape checked). */
static int fx_load(const kd_safetensors *st, const char *key, kd_node *n) {
    kd_status rc = kd_st_get_f32(st, key, n->val.data, n->val.ndim, n->val.shape);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    return rc == KD_OK;
}

/* Compares got (shape of t) with tensor `key`. */
static void fx_expect(const kd_safetensors *st, const char *key, const kd_tensor *t, const float *got, double atol,
                      double rtol) {
    int64_t n = kd_numel(t);
    float *want = kd_malloc((size_t)n * sizeof *want);
    kd_status rc = kd_st_get_f32(st, key, want, t->ndim, t->shape);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    if (rc == KD_OK) CHECK_ARRAYS(key, got, want, n, atol, rtol);
    free(want);
}

static void fx_projection(const kd_safetensors *st, const char *prefix, const kd_gc *p) {
    char key[96];
    int bs[1] = {p->B}, ms[1] = {p->M};
    snprintf(key, sizeof key, "%s.u", prefix);
    kd_status rc = kd_st_get_f32(st, key, p->u->val.data, 1, bs);
    snprintf(key, sizeof key, "%s.v", prefix);
    if (rc == KD_OK) rc = kd_st_get_f32(st, key, p->v->val.data, 1, ms);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
}

/* Tolerances against the float64 PyTorch reference (stored as float32):
 *   VAL: outputs of short float32 dot products (<= 64 terms), ~1e-7..1e-6
 *        relative rounding (measured: all within 1e-7 abs + 1e-6 rel but for
 *        a few conv outputs); 1e-5 leaves room for another BLAS's summation
 *        order without hiding an indexing error (O(1)).
 *   GRAD: gradients sum over the batch and the output positions (up to ~100
 *        float32 terms) or pass through batch-norm's two reductions, whose
 *        cancellation amplifies rounding: 1e-4 relative.
 * atol covers elements that cancel to near zero. */
#define FX_VAL_ATOL 1e-5
#define FX_VAL_RTOL 1e-5
#define FX_GRAD_ATOL 1e-5
#define FX_GRAD_RTOL 1e-4

static void fx_conv(const kd_safetensors *st, const char *prefix, int B, int stride, int pad) {
    char key[96];
    kd_graph *g = kd_graph_new();
    kd_node *x = param(g, "x", 4, B, 3, 7, 5), *w = param(g, "w", 4, 4, 3, 3, 3), *b = param(g, "b", 1, 4);
    kd_node *y = kd_conv2d(g, x, w, b, stride, pad);
    kd_gc p = kd_gradcheck_project(g, y);
    if (kd_gc_compile(g, 1, 42)) {
        kd_node *leaves[3] = {x, w, b};
        const char *names[3] = {"x", "w", "b"};
        int ok = 1;
        for (int i = 0; i < 3; i++) {
            snprintf(key, sizeof key, "%s.%s", prefix, names[i]);
            ok &= fx_load(st, key, leaves[i]);
        }
        fx_projection(st, prefix, &p);
        if (ok) {
            kd_graph_forward(g, 1);
            kd_graph_backward(g, p.obj);
            snprintf(key, sizeof key, "%s.y", prefix);
            fx_expect(st, key, &y->val, y->val.data, FX_VAL_ATOL, FX_VAL_RTOL);
            for (int i = 0; i < 3; i++) {
                snprintf(key, sizeof key, "%s.grad_%s", prefix, names[i]);
                fx_expect(st, key, &leaves[i]->val, leaves[i]->grad.data, FX_GRAD_ATOL, FX_GRAD_RTOL);
            }
        }
    }
    kd_graph_free(g);
}

/* single-input ops: maxpool, avgpool, gelu, log_softmax */
static void fx_unary(const kd_safetensors *st, const char *prefix, int which) {
    char key[96];
    kd_graph *g = kd_graph_new();
    kd_node *x = which < 2 ? param(g, "x", 4, 2, 3, 7, 5) : param(g, "x", 2, 3, 7);
    kd_node *y = which == 0   ? kd_maxpool2d(g, x, 3, 2)
                 : which == 1 ? kd_avgpool2d(g, x, 2, 2)
                 : which == 2 ? kd_gelu(g, x)
                              : kd_log_softmax(g, x);
    kd_gc p = kd_gradcheck_project(g, y);
    if (kd_gc_compile(g, 1, 42)) {
        snprintf(key, sizeof key, "%s.x", prefix);
        int ok = fx_load(st, key, x);
        fx_projection(st, prefix, &p);
        if (ok) {
            kd_graph_forward(g, 1);
            kd_graph_backward(g, p.obj);
            snprintf(key, sizeof key, "%s.y", prefix);
            fx_expect(st, key, &y->val, y->val.data, FX_VAL_ATOL, FX_VAL_RTOL);
            snprintf(key, sizeof key, "%s.grad_x", prefix);
            fx_expect(st, key, &x->val, x->grad.data, FX_GRAD_ATOL, FX_GRAD_RTOL);
        }
    }
    kd_graph_free(g);
}

static void fx_linear(const kd_safetensors *st) {
    kd_graph *g = kd_graph_new();
    kd_node *x = param(g, "x", 3, 2, 3, 5), *w = param(g, "w", 2, 4, 5), *b = param(g, "b", 1, 4);
    kd_node *y = kd_matmul(g, x, w, b);
    kd_gc p = kd_gradcheck_project(g, y);
    if (kd_gc_compile(g, 1, 42)) {
        int ok = fx_load(st, "linear.x", x) & fx_load(st, "linear.w", w) & fx_load(st, "linear.b", b);
        fx_projection(st, "linear", &p);
        if (ok) {
            kd_graph_forward(g, 1);
            kd_graph_backward(g, p.obj);
            fx_expect(st, "linear.y", &y->val, y->val.data, FX_VAL_ATOL, FX_VAL_RTOL);
            fx_expect(st, "linear.grad_x", &x->val, x->grad.data, FX_GRAD_ATOL, FX_GRAD_RTOL);
            fx_expect(st, "linear.grad_w", &w->val, w->grad.data, FX_GRAD_ATOL, FX_GRAD_RTOL);
            fx_expect(st, "linear.grad_b", &b->val, b->grad.data, FX_GRAD_ATOL, FX_GRAD_RTOL);
        }
    }
    kd_graph_free(g);
}

/* BatchNorm: one train step, running stats, then (2-D only) eval mode */
static void fx_bn(const kd_safetensors *st, const char *prefix, int ndim, const int *shape) {
    char key[96];
    kd_graph *g = kd_graph_new();
    kd_node *x = kd_param(g, "x", ndim, shape, KD_INIT_ZERO, 1);
    kd_node *y = kd_bn(g, "bn", x);
    kd_gc p = kd_gradcheck_project(g, y);
    if (kd_gc_compile(g, 1, 42)) {
        kd_node *leaves[3] = {x, kd_graph_find(g, "bn.weight"), kd_graph_find(g, "bn.bias")};
        const char *names[3] = {"x", "weight", "bias"};
        int ok = 1;
        for (int i = 0; i < 3; i++) {
            snprintf(key, sizeof key, "%s.%s", prefix, names[i]);
            ok &= fx_load(st, key, leaves[i]);
        }
        fx_projection(st, prefix, &p);
        if (ok) {
            kd_graph_forward(g, 1);
            kd_graph_backward(g, p.obj);
            snprintf(key, sizeof key, "%s.y", prefix);
            fx_expect(st, key, &y->val, y->val.data, FX_VAL_ATOL, FX_VAL_RTOL);
            for (int i = 0; i < 3; i++) {
                snprintf(key, sizeof key, "%s.grad_%s", prefix, names[i]);
                fx_expect(st, key, &leaves[i]->val, leaves[i]->grad.data, FX_GRAD_ATOL, FX_GRAD_RTOL);
            }
            kd_node *rm = kd_graph_find(g, "bn.running_mean"), *rv = kd_graph_find(g, "bn.running_var");
            snprintf(key, sizeof key, "%s.running_mean", prefix);
            fx_expect(st, key, &rm->val, rm->val.data, 1e-6, 1e-5);
            snprintf(key, sizeof key, "%s.running_var", prefix);
            fx_expect(st, key, &rv->val, rv->val.data, 1e-6, 1e-5);
            snprintf(key, sizeof key, "%s.y_eval", prefix);
            if (kd_st_find(st, key)) {
                kd_graph_forward(g, 0);
                kd_graph_backward(g, p.obj);
                fx_expect(st, key, &y->val, y->val.data, FX_VAL_ATOL, FX_VAL_RTOL);
                for (int i = 0; i < 3; i++) {
                    snprintf(key, sizeof key, "%s.eval_grad_%s", prefix, names[i]);
                    fx_expect(st, key, &leaves[i]->val, leaves[i]->grad.data, FX_GRAD_ATOL, FX_GRAD_RTOL);
                }
            }
        }
    }
    kd_graph_free(g);
}

static void fx_ce(const kd_safetensors *st) {
    kd_graph *g = kd_graph_new();
    int ls[1] = {5};
    kd_node *z = param(g, "z", 2, 5, 7), *lab = kd_input(g, "labels", 1, ls);
    kd_node *loss = kd_cross_entropy(g, z, lab, 0.1f);
    if (kd_gc_compile(g, 5, 42)) {
        if (fx_load(st, "ce.logits", z) & fx_load(st, "ce.labels", lab)) {
            CHECK(lab->val.data[2] == -1.0f); /* the fixture's ignored row */
            kd_graph_forward(g, 1);
            kd_graph_backward(g, loss);
            fx_expect(st, "ce.loss", &loss->val, loss->val.data, 1e-6, 1e-6);
            fx_expect(st, "ce.grad_logits", &z->val, z->grad.data, 1e-7, 1e-5);
        }
    }
    kd_graph_free(g);
}

static void fx_cnn(const kd_safetensors *st, int fused) {
    kd_graph *g = kd_graph_new();
    int ls[1] = {3};
    kd_node *x = param(g, "cnn.x", 4, 3, 1, 8, 8), *lab = kd_input(g, "cnn.labels", 1, ls);
    kd_node *h = kd_conv(g, "cnn.conv", x, 4, 3, 1, 1, 0);
    h = fused ? kd_bn_relu(g, "cnn.bn", h) : kd_relu(g, kd_bn(g, "cnn.bn", h));
    h = kd_flatten(g, kd_maxpool2d(g, h, 2, 2));
    kd_node *logits = kd_dense(g, "cnn.fc", h, 5);
    logits->flags |= KD_F_KEEP;
    kd_node *loss = kd_cross_entropy(g, logits, lab, 0.0f);
    if (!kd_gc_compile(g, 3, 42)) {
        kd_graph_free(g);
        return;
    }
    const char *params[6] = {"x", "conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias"};
    int ok = fx_load(st, "cnn.labels", lab);
    char key[96];
    for (int i = 0; i < 6; i++) {
        snprintf(key, sizeof key, "cnn.%s", params[i]);
        kd_node *n = kd_graph_find(g, key);
        CHECK_MSG(n != NULL, "no node %s", key);
        if (n) ok &= fx_load(st, key, n);
    }
    if (ok) {
        kd_graph_forward(g, 1);
        kd_graph_backward(g, loss);
        fx_expect(st, "cnn.logits", &logits->val, logits->val.data, FX_VAL_ATOL, FX_VAL_RTOL);
        fx_expect(st, "cnn.loss", &loss->val, loss->val.data, 1e-6, 1e-5);
        for (int i = 0; i < 6; i++) {
            snprintf(key, sizeof key, "cnn.%s", params[i]);
            kd_node *n = kd_graph_find(g, key);
            snprintf(key, sizeof key, "cnn.grad.%s", params[i]);
            fx_expect(st, key, &n->val, n->grad.data, FX_GRAD_ATOL, FX_GRAD_RTOL);
        }
        const char *bufs[2] = {"cnn.bn.running_mean", "cnn.bn.running_var"};
        for (int i = 0; i < 2; i++) {
            kd_node *n = kd_graph_find(g, bufs[i]);
            fx_expect(st, bufs[i], &n->val, n->val.data, 1e-6, 1e-5);
        }
    }
    kd_graph_free(g);
}

static void fixture(void) {
    TEST("PyTorch parity (tests/fixtures/ops.safetensors)") {
        char path[512];
        kd_test_fixture("ops.safetensors", path, sizeof path);
        kd_safetensors st;
        kd_status rc = kd_st_read(path, &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_ops.py)", kd_error_message());
        if (rc != KD_OK) break;
        fx_conv(&st, "conv_s2", 2, 2, 1);
        fx_conv(&st, "conv_s1", 1, 1, 1);
        fx_unary(&st, "maxpool", 0);
        fx_unary(&st, "avgpool", 1);
        fx_unary(&st, "gelu", 2);
        fx_unary(&st, "log_softmax", 3);
        fx_linear(&st);
        int s4[4] = {4, 3, 5, 5}, s2[2] = {6, 5};
        fx_bn(&st, "bn2d", 4, s4);
        fx_bn(&st, "bn1d", 2, s2);
        fx_ce(&st);
        fx_cnn(&st, 0);
        fx_cnn(&st, 1); /* the same CNN with BN and ReLU fused, as the model builders use it */
        kd_st_free(&st);
    }
}

/* ============================================================ 4. memory planner */

static void planner_frozen(void) {
    TEST("frozen teacher: no gradient buffers, same values as a separate graph") {
        int xs[2] = {4, 6}, ys[1] = {4}, ts[2] = {4, 5};
        kd_graph *g = kd_graph_new();
        kd_node *x = kd_input(g, "x", 2, xs), *y = kd_input(g, "y", 1, ys);
        kd_graph_set_frozen(g, 1);
        kd_node *t = kd_relu(g, kd_bn(g, "teacher.bn", kd_dense(g, "teacher.fc1", x, 8)));
        kd_node *tout = kd_dense(g, "teacher.fc2", t, 5);
        tout->flags |= KD_F_KEEP; /* read below, after the step */
        kd_graph_set_frozen(g, 0);
        kd_node *s = kd_relu(g, kd_dense(g, "student.fc1", x, 7));
        kd_node *logits = kd_dense(g, "student.fc2", kd_concat(g, s, tout), 3);
        logits->flags |= KD_F_KEEP;
        kd_node *loss = kd_cross_entropy(g, logits, y, 0.0f);

        /* the teacher alone, not frozen, run in eval mode */
        kd_graph *gt = kd_graph_new();
        kd_node *xt = kd_input(gt, "x", 2, xs);
        kd_node *tt =
            kd_dense(gt, "teacher.fc2", kd_relu(gt, kd_bn(gt, "teacher.bn", kd_dense(gt, "teacher.fc1", xt, 8))), 5);
        /* the student alone, fed the teacher's output as an input */
        kd_graph *gs = kd_graph_new();
        kd_node *xs_ = kd_input(gs, "x", 2, xs), *ys_ = kd_input(gs, "y", 1, ys), *tin = kd_input(gs, "t", 2, ts);
        kd_node *ss = kd_relu(gs, kd_dense(gs, "student.fc1", xs_, 7));
        kd_node *ls = kd_dense(gs, "student.fc2", kd_concat(gs, ss, tin), 3);
        ls->flags |= KD_F_KEEP;
        kd_node *lossS = kd_cross_entropy(gs, ls, ys_, 0.0f);

        if (kd_gc_compile(g, 4, 42) && kd_gc_compile(gt, 4, 42) && kd_gc_compile(gs, 4, 42)) {
            int frozen = 0, leaks = 0;
            for (int i = 0; i < kd_graph_n_nodes(g); i++) {
                kd_node *n = kd_graph_node(g, i);
                if (!(n->flags & KD_F_FROZEN)) continue;
                frozen++;
                leaks += n->grad.data != NULL || (n->flags & KD_F_NEED_GRAD);
            }
            CHECK_MSG(frozen >= 10, "only %d frozen nodes", frozen);
            CHECK_MSG(leaks == 0, "%d frozen nodes have gradient buffers", leaks);
            CHECK(kd_graph_find(g, "student.fc1.weight")->grad.data != NULL);
            /* frozen parameters are not in the optimiser's flat array */
            size_t student = 7 * 6 + 7 + 3 * 12 + 3;
            CHECK_MSG(kd_graph_param_count(g) < student + 64, "param count %zu includes the teacher",
                      kd_graph_param_count(g));

            /* random weights everywhere, the same in all three graphs */
            fill_normal(kd_graph_param_data(g), (int64_t)kd_graph_param_count(g), 0.5f, 0.0f);
            for (int i = 0; i < kd_graph_n_state(g); i++) {
                kd_node *n = kd_graph_state(g, i);
                if (n->flags & KD_F_I64) continue;
                if (strstr(n->name, "running_var"))
                    for (int c = 0; c < 8; c++) n->val.data[c] = 0.5f + kd_rng_uniform(&rng);
                else if (!(n->flags & KD_F_NEED_GRAD))
                    fill_node(n, 0.5f, 0.0f);
            }
            copy_state(gt, g);
            copy_state(gs, g);
            fill_node(x, 1.0f, 0.0f);
            float labels[4] = {0, 2, 1, 2};
            memcpy(y->val.data, labels, sizeof labels);
            memcpy(xt->val.data, x->val.data, 24 * sizeof(float));
            memcpy(xs_->val.data, x->val.data, 24 * sizeof(float));
            memcpy(ys_->val.data, labels, sizeof labels);
            kd_node *rm = kd_graph_find(g, "teacher.bn.running_mean"),
                    *nbt = kd_graph_find(g, "teacher.bn.num_batches_tracked");
            float rm0[8];
            memcpy(rm0, rm->val.data, sizeof rm0);

            kd_graph_set_step(g, 1);
            kd_graph_forward(g, 1);
            kd_graph_backward(g, loss);
            kd_graph_forward(gt, 0);
            CHECK_MSG(same_floats(tout->val.data, tt->val.data, 20),
                      "frozen teacher output differs from a separate eval run");
            CHECK_MSG(same_floats(rm->val.data, rm0, 8) && nbt->val.data[0] == 0.0f,
                      "a training forward moved the frozen teacher's running statistics");
            memcpy(tin->val.data, tout->val.data, 20 * sizeof(float));
            kd_graph_forward(gs, 1);
            kd_graph_backward(gs, lossS);
            CHECK_MSG(same_floats(logits->val.data, ls->val.data, 12), "student logits differ from the separate graph");
            CHECK_MSG(loss->val.data[0] == lossS->val.data[0], "loss %.9g vs separate %.9g", loss->val.data[0],
                      lossS->val.data[0]);
            const char *pn[4] = {"student.fc1.weight", "student.fc1.bias", "student.fc2.weight", "student.fc2.bias"};
            for (int i = 0; i < 4; i++) {
                kd_node *a = kd_graph_find(g, pn[i]), *b = kd_graph_find(gs, pn[i]);
                CHECK_MSG(same_floats(a->grad.data, b->grad.data, kd_numel(&a->val)), "gradient of %s differs", pn[i]);
            }
            /* the planner reuses memory: less than one buffer per value and gradient */
            size_t naive = 0;
            for (int i = 0; i < kd_graph_n_nodes(g); i++) {
                kd_node *n = kd_graph_node(g, i);
                if (n->op == KD_OP_LEAF) continue;
                size_t k = (size_t)kd_numel(&n->val) * sizeof(float);
                naive += k + (n->grad.data ? k : 0);
            }
            CHECK_MSG(kd_graph_arena_bytes(g) < naive, "arena %zu bytes, no reuse (%zu)", kd_graph_arena_bytes(g),
                      naive);
        }
        kd_graph_free(g);
        kd_graph_free(gt);
        kd_graph_free(gs);
    }
}

/* a small CNN with dropout at max batch B */
static kd_graph *batch_net(int B, kd_node **x, kd_node **y, kd_node **logits, kd_node **loss) {
    kd_graph *g = kd_graph_new();
    int xs[4] = {B, 2, 6, 6}, ys[1] = {B};
    *x = kd_input(g, "x", 4, xs);
    *y = kd_input(g, "y", 1, ys);
    kd_node *h = kd_relu(g, kd_bn(g, "bn", kd_conv(g, "conv", *x, 3, 3, 1, 1, 1)));
    h = kd_dropout(g, kd_flatten(g, kd_maxpool2d(g, h, 2, 2)), 0.2f);
    *logits = kd_dense(g, "fc", h, 4);
    (*logits)->flags |= KD_F_KEEP;
    *loss = kd_cross_entropy(g, *logits, *y, 0.1f);
    return g;
}

static void planner_batch(void) {
    TEST("changing the batch (5 -> 3 -> 5) changes no result") {
        kd_node *x, *y, *lg, *loss, *x3, *y3, *lg3, *loss3;
        kd_graph *g = batch_net(5, &x, &y, &lg, &loss), *h = batch_net(3, &x3, &y3, &lg3, &loss3);
        if (kd_gc_compile(g, 5, 42) && kd_gc_compile(h, 3, 42)) {
            fill_normal(kd_graph_param_data(g), (int64_t)kd_graph_param_count(g), 0.4f, 0.0f);
            kd_node *rv = kd_graph_find(g, "bn.running_var");
            for (int c = 0; c < 3; c++) rv->val.data[c] = 0.5f + kd_rng_uniform(&rng);
            fill_node(kd_graph_find(g, "bn.running_mean"), 0.3f, 0.0f);
            copy_state(h, g);
            fill_node(x, 1.0f, 0.0f);
            float labels[5] = {1, 3, 0, 2, 1};
            memcpy(y->val.data, labels, sizeof labels);
            memcpy(x3->val.data, x->val.data, 3 * 72 * sizeof(float));
            memcpy(y3->val.data, labels, 3 * sizeof(float));
            size_t np = kd_graph_param_count(g);
            CHECK(np == kd_graph_param_count(h));

            /* eval: rows are independent */
            float l5[20], l3[12];
            kd_graph_forward(g, 0);
            memcpy(l5, lg->val.data, sizeof l5);
            kd_graph_set_batch(g, 3);
            CHECK(kd_graph_batch(g) == 3 && lg->val.shape[0] == 3 && x->val.shape[0] == 3);
            kd_graph_forward(g, 0);
            memcpy(l3, lg->val.data, sizeof l3);
            CHECK_ARRAYS("eval B=3 vs first rows of B=5", l3, l5, 12, 1e-6, 1e-6);
            kd_graph_forward(h, 0);
            CHECK_ARRAYS("eval B=3 vs a graph built for 3", l3, lg3->val.data, 12, 1e-6, 1e-6);
            kd_graph_set_batch(g, 5);
            kd_graph_forward(g, 0);
            CHECK_MSG(same_floats(l5, lg->val.data, 20), "eval at B=5 changed after visiting B=3");

            /* a training step at B=3, before and after a B=5 step, and in the
             * graph built for 3 (same step, so the same dropout masks) */
            float *gr[3];
            float loss_at[3];
            for (int k = 0; k < 3; k++) {
                kd_graph *gg = k == 2 ? h : g;
                if (k < 2) {
                    if (k == 1) {
                        kd_graph_set_batch(g, 5);
                        kd_graph_set_step(g, 9);
                        kd_graph_forward(g, 1);
                        kd_graph_backward(g, loss);
                    }
                    kd_graph_set_batch(g, 3);
                }
                kd_graph_set_step(gg, 8);
                kd_graph_forward(gg, 1);
                kd_graph_backward(gg, k == 2 ? loss3 : loss);
                loss_at[k] = (k == 2 ? loss3 : loss)->val.data[0];
                gr[k] = kd_malloc(np * sizeof(float));
                memcpy(gr[k], kd_graph_param_grad(gg), np * sizeof(float));
            }
            CHECK_MSG(loss_at[0] == loss_at[1], "B=3 loss %.9g, after a B=5 step %.9g", loss_at[0], loss_at[1]);
            CHECK_MSG(same_floats(gr[0], gr[1], (int64_t)np), "B=3 gradients change after a B=5 step");
            CHECK_CLOSE(loss_at[2], loss_at[0], 1e-6, 1e-6);
            CHECK_ARRAYS("B=3 gradients vs a graph built for 3", gr[2], gr[0], (long)np, 1e-6, 1e-5);
            for (int k = 0; k < 3; k++) free(gr[k]);
        }
        kd_graph_free(g);
        kd_graph_free(h);
    }
}

/* ============================================================ entry */

/* im2col (with its flat "same"-width path) and col2im against direct
 * index arithmetic, over kernel sizes, paddings, strides and odd sizes */
static void values_im2col(void) {
    TEST("im2col/col2im match index arithmetic") {
        int bad = 0, cases = 0;
        for (int K = 1; K <= 5; K += 2)
            for (int pad = 0; pad <= K; pad++)
                for (int stride = 1; stride <= 2; stride++) {
                    int C = 2, H = 5 + stride, W = 7;
                    int OH = kd_conv_out(H, K, stride, pad), OW = kd_conv_out(W, K, stride, pad);
                    if (OH < 1 || OW < 1) continue;
                    cases++;
                    size_t ncol = (size_t)C * K * K * OH * OW;
                    float *x = malloc(sizeof(float) * C * H * W), *col = malloc(sizeof(float) * ncol);
                    float *back = calloc((size_t)C * H * W, sizeof(float)), *want = calloc((size_t)C * H * W, sizeof(float));
                    for (int i = 0; i < C * H * W; i++) x[i] = (float)(i + 1);
                    kd_im2col(col, x, C, H, W, K, K, stride, pad, OH, OW);
                    for (int c = 0; c < C; c++)
                        for (int kh = 0; kh < K; kh++)
                            for (int kw = 0; kw < K; kw++)
                                for (int oh = 0; oh < OH; oh++)
                                    for (int ow = 0; ow < OW; ow++) {
                                        int ih = oh * stride - pad + kh, iw = ow * stride - pad + kw;
                                        int in = ih >= 0 && ih < H && iw >= 0 && iw < W;
                                        float v = in ? x[(c * H + ih) * W + iw] : 0.0f;
                                        size_t k = ((size_t)((c * K + kh) * K + kw) * OH + oh) * OW + ow;
                                        bad += col[k] != v;
                                        if (in) want[(c * H + ih) * W + iw] += col[k];
                                    }
                    kd_col2im(back, col, C, H, W, K, K, stride, pad, OH, OW);
                    for (int i = 0; i < C * H * W; i++) bad += back[i] != want[i];
                    free(x);
                    free(col);
                    free(back);
                    free(want);
                }
        CHECK(cases > 20);
        CHECK_MSG(bad == 0, "%d elements differ", bad);
    }
}

void test_ops(void) {
    kd_rng_seed(&rng, 20240601);
    values_im2col();
    gc_matmul();
    gc_conv();
    gc_pool();
    gc_bn();
    gc_elementwise();
    gc_layout();
    gc_softmax();
    gc_ce();
    gc_reduce();
    gc_composite();
    values_conv_matmul();
    values_pool();
    values_bn();
    values_bn_relu();
    values_act();
    values_dropout();
    values_softmax_ce();
    values_large();
    shape_errors();
    fixture();
    planner_frozen();
    planner_batch();
}
