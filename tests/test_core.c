/* test_core.c - errors, random numbers and the graph compiler: liveness
 * sharing of activation/gradient memory must not change any result, frozen
 * nodes get no gradients, and shape errors name the nodes. */
#include <stdlib.h>
#include <string.h>

#include "kd.h"
#include "test.h"

static void test_errors_and_rng(void) {
    TEST("error messages") {
        kd_status st = kd_errorf(KD_EFORMAT, "bad %s", "thing");
        CHECK(st == KD_EFORMAT);
        CHECK(strcmp(kd_error_message(), "bad thing") == 0);
        kd_error_prefix(st, "file.bin");
        CHECK(strcmp(kd_error_message(), "file.bin: bad thing") == 0);
    }
    TEST("rng determinism and ranges") {
        kd_rng a, b;
        kd_rng_seed(&a, 42);
        kd_rng_seed(&b, 42);
        int same = 1, inrange = 1;
        double s = 0, ss = 0;
        const int N = 200000;
        for (int i = 0; i < N; i++) {
            same &= kd_rng_u64(&a) == kd_rng_u64(&b);
            float u = kd_rng_uniform(&a);
            inrange &= u >= 0.0f && u < 1.0f;
            inrange &= kd_rng_below(&a, 7) < 7;
            double z = kd_rng_normal(&b);
            s += z;
            ss += z * z;
        }
        CHECK(same);
        CHECK(inrange);
        /* N(0,1): the sample mean has std 1/sqrt(N) ~ 0.0022; allow 5 sigma */
        CHECK_CLOSE(s / N, 0.0, 0.012, 0);
        CHECK_CLOSE(ss / N, 1.0, 0.02, 0);
        kd_rng_seed(&b, 43);
        CHECK(kd_rng_u64(&a) != kd_rng_u64(&b));
    }
}

/* y = x * 2^depth through a chain of scale ops: with liveness sharing the
 * arena holds a couple of buffers, not depth of them, and the value is exact */
static void test_planner(void) {
    TEST("frozen chain reuses memory and stays exact") {
        kd_graph *g = kd_graph_new();
        int s[2] = {3, 1000};
        kd_node *x = kd_input(g, "x", 2, s);
        kd_node *h = x;
        for (int i = 0; i < 12; i++) h = kd_scale(g, h, 2.0f);
        CHECK(kd_graph_compile(g, 3, 1) == KD_OK);
        for (int i = 0; i < 3000; i++) x->val.data[i] = (float)(i % 17) - 8.0f;
        kd_graph_forward(g, 0);
        int ok = 1;
        for (int i = 0; i < 3000; i++) ok &= h->val.data[i] == ((float)(i % 17) - 8.0f) * 4096.0f;
        CHECK(ok);
        /* 12 values of 3000 floats would be 144 KB; two live at a time */
        CHECK_MSG(kd_graph_arena_bytes(g) <= 3 * 3008 * sizeof(float), "arena %zu bytes", kd_graph_arena_bytes(g));
        kd_graph_free(g);
    }
    TEST("gradient through a shared-memory chain") {
        /* loss = sum(w * prod(scales) * x); d/dw = prod * sum(x) */
        kd_graph *g = kd_graph_new();
        int s[1] = {64};
        kd_node *w = kd_param(g, "w", 1, s, KD_INIT_ONE, 1);
        kd_node *h = w;
        float prod = 1.0f;
        for (int i = 0; i < 8; i++) {
            float f = 1.0f + 0.25f * (float)i;
            h = kd_scale(g, h, f);
            prod *= f;
        }
        kd_node *loss = kd_sum(g, h);
        CHECK(kd_graph_compile(g, 1, 1) == KD_OK);
        kd_graph_forward(g, 1);
        kd_graph_backward(g, loss);
        CHECK_CLOSE(loss->val.data[0], 64.0 * prod, 1e-3, 1e-6);
        int ok = 1;
        for (int i = 0; i < 64; i++) ok &= fabsf(w->grad.data[i] - prod) <= 1e-5f * prod;
        CHECK(ok);
        /* a second backward gives the same gradient (buffers re-zeroed) */
        kd_graph_backward(g, loss);
        for (int i = 0; i < 64; i++) ok &= fabsf(w->grad.data[i] - prod) <= 1e-5f * prod;
        CHECK(ok);
        kd_graph_free(g);
    }
    TEST("diamond: a value read by two consumers gets both gradients") {
        kd_graph *g = kd_graph_new();
        int s[1] = {5};
        kd_node *w = kd_param(g, "w", 1, s, KD_INIT_ONE, 1);
        kd_node *a = kd_scale(g, w, 3.0f);
        kd_node *b = kd_scale(g, a, 5.0f);
        kd_node *c = kd_add(g, a, b); /* c = 3w + 15w */
        kd_node *loss = kd_sum(g, kd_relu(g, c));
        CHECK(kd_graph_compile(g, 1, 1) == KD_OK);
        kd_graph_forward(g, 1);
        kd_graph_backward(g, loss);
        CHECK_CLOSE(loss->val.data[0], 5 * 18.0, 1e-5, 0);
        for (int i = 0; i < 5; i++) CHECK_CLOSE(w->grad.data[i], 18.0, 1e-5, 0);
        kd_graph_free(g);
    }
    TEST("frozen sub-graph has no gradient buffers") {
        kd_graph *g = kd_graph_new();
        int s[2] = {4, 6};
        kd_node *x = kd_input(g, "x", 2, s);
        kd_graph_set_frozen(g, 1);
        kd_node *t = kd_dense(g, "t.fc", x, 3);
        kd_graph_set_frozen(g, 0);
        kd_node *st = kd_dense(g, "s.fc", x, 3);
        kd_node *loss = kd_mean(g, kd_add(g, t, st));
        CHECK(kd_graph_compile(g, 4, 1) == KD_OK);
        CHECK(t->grad.data == NULL);
        CHECK(kd_graph_find(g, "t.fc.weight")->grad.data == NULL);
        CHECK(kd_graph_find(g, "s.fc.weight")->grad.data != NULL);
        CHECK(loss->flags & KD_F_NEED_GRAD);
        /* only the student's parameters are in the optimiser's flat array */
        CHECK(kd_graph_param_count(g) < 2 * 32);
        kd_graph_free(g);
    }
    TEST("forward_check names the first non-finite node, though memory is reused") {
        kd_graph *g = kd_graph_new();
        int s1[2] = {2, 500};
        kd_node *x = kd_input(g, "x", 2, s1);
        kd_node *a = kd_scale(g, x, 1e20f);
        kd_node *b = kd_scale(g, a, 1e20f); /* overflows to inf */
        kd_node_set_name(b, "overflow");
        kd_node *h = b;
        for (int i = 0; i < 6; i++) h = kd_scale(g, h, 0.5f);
        CHECK(kd_graph_compile(g, 2, 1) == KD_OK);
        for (int i = 0; i < 1000; i++) x->val.data[i] = 1.0f;
        kd_node *bad = kd_graph_forward_check(g, 0, NULL);
        CHECK_MSG(bad == b, "named '%s'", bad ? bad->name : "nothing");
        for (int i = 0; i < 1000; i++) x->val.data[i] = 1e-30f;
        CHECK(kd_graph_forward_check(g, 0, NULL) == NULL);
        x->val.data[7] = NAN;
        bad = kd_graph_forward_check(g, 0, NULL);
        CHECK(bad == x);
        kd_graph_free(g);
    }
    TEST("shape errors name the node") {
        kd_graph *g = kd_graph_new();
        int s[2] = {4, 6}, ws[2] = {3, 5};
        kd_node *x = kd_input(g, "x", 2, s);
        kd_node *w = kd_param(g, "bad.weight", 2, ws, KD_INIT_ZERO, 1);
        kd_matmul(g, x, w, NULL);
        kd_status st = kd_graph_compile(g, 4, 1);
        CHECK(st == KD_ESHAPE);
        CHECK_MSG(strstr(kd_error_message(), "bad.weight") != NULL, "%s", kd_error_message());
        CHECK_MSG(strstr(kd_error_message(), "(3, 5)") != NULL, "%s", kd_error_message());
        kd_graph_free(g);
    }
    TEST("parameter init is seeded and PyTorch-bounded") {
        kd_graph *g1 = kd_graph_new(), *g2 = kd_graph_new();
        int s[2] = {2, 50};
        kd_node *x1 = kd_input(g1, "x", 2, s), *x2 = kd_input(g2, "x", 2, s);
        kd_dense(g1, "fc", x1, 40);
        kd_dense(g2, "fc", x2, 40);
        kd_graph_compile(g1, 2, 7);
        kd_graph_compile(g2, 2, 7);
        kd_node *w1 = kd_graph_find(g1, "fc.weight"), *w2 = kd_graph_find(g2, "fc.weight");
        CHECK(memcmp(w1->val.data, w2->val.data, 2000 * sizeof(float)) == 0);
        float mx = 0;
        for (int i = 0; i < 2000; i++) mx = fmaxf(mx, fabsf(w1->val.data[i]));
        CHECK(mx <= 1.0f / sqrtf(50.0f));
        CHECK(mx > 0.9f / sqrtf(50.0f)); /* 2000 uniform draws reach near the bound */
        kd_graph_free(g1);
        kd_graph_free(g2);
    }
}

void test_core(void) {
    test_errors_and_rng();
    test_planner();
}
