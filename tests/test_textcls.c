/* test_textcls.c - tests for text classification with rationales:
 * src/ops/textcls.c (masked_mean, token_bce), src/nn/textcls.c (the
 * classifier, the training graph, saliency and top-k tags),
 * src/data/textcls.c (fortune files as classes), src/train/textcls.c and
 * `distill run` on a textcls: dataset.
 *
 *   1. finite-difference gradient checks of both ops w.r.t. every input
 *      (batch 1 and 3, odd sizes, fractional weights) and of the whole
 *      classifier loss (CE + token BCE) w.r.t. its heads, an MLP weight
 *      and the embedding table;
 *   2. PyTorch parity through tests/fixtures/textcls.safetensors (written
 *      by tests/fixtures/gen_textcls.py; a missing fixture fails): the ops'
 *      values and gradients, the classifier's logits, tag logits, loss and
 *      parameter gradients, and the gradient x input saliency;
 *   3. closed forms: an all-ones mask is the plain mean, a zero-weight row
 *      gives 0 and no gradient, token_bce's gradient vanishes at
 *      y = sigmoid(z), top-k tags (ties, k > len), saliency zero on padding
 *      and independent of the other documents of the batch;
 *   4. the dataset on synthetic fortune files: classes, documents, cutting,
 *      padding and mask, a split that depends on the bytes only, errors;
 *   5. training: the loss falls, the same seed gives the same bits;
 *   6. `distill run` end to end, and a second run loading the teacher.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "gradcheck.h"
#include "kd_io.h"
#include "kd_textcls.h"
#include "test.h"

/* Correct backwards measure 1e-6..1e-4 here (ops in double, rounded once
 * to float32); the classifier chain ~1e-3 with float32 activations. A
 * wrong term (tried: no 1/S in masked_mean's mask gradient, sigmoid(z) - y
 * with the sign flipped) measures 0.3 and more. */
#define GC_TOL 2e-3
#define GC_TOL_NET 1e-2

static kd_rng rng;
static char dir[512];

static void fill_pos(kd_node *n, float lo) {
    for (int64_t i = 0; i < kd_numel(&n->val); i++) n->val.data[i] = lo + fabsf(kd_rng_normal(&rng));
}

/* ============================================================ 1. gradients */

static double gc_mmean(int B, int T, int C, int zero_row) {
    kd_graph *g = kd_graph_new();
    kd_node *x = kd_gc_param(g, "x", 3, (int[]){B, T, C}), *m = kd_gc_param(g, "m", 2, (int[]){B, T});
    kd_gc p = kd_gradcheck_project(g, kd_masked_mean(g, x, m));
    double err = INFINITY;
    if (kd_gc_compile(g, B, 3)) {
        kd_gc_fill(&rng, x, 1.0f, 0.2f);
        fill_pos(m, 0.3f);
        if (zero_row) memset(m->val.data + (size_t)(B - 1) * T, 0, (size_t)T * sizeof(float));
        kd_gradcheck_randomize(&p, 11 + B);
        kd_node *wrt[2] = {x, m};
        err = kd_gradcheck(g, &p, wrt, zero_row ? 1 : 2, 1e-2, 1);
        if (zero_row) CHECK(kd_test_max_abs(x->grad.data + (size_t)(B - 1) * T * C, (int64_t)T * C) == 0.0);
    }
    kd_graph_free(g);
    return err;
}

static double gc_bce(int B, int T, int three_d) {
    kd_graph *g = kd_graph_new();
    kd_node *z = three_d ? kd_gc_param(g, "z", 3, (int[]){B, T, 1}) : kd_gc_param(g, "z", 2, (int[]){B, T});
    kd_node *y = kd_gc_param(g, "y", 2, (int[]){B, T}), *m = kd_gc_param(g, "m", 2, (int[]){B, T});
    kd_gc p = kd_gradcheck_project(g, kd_token_bce(g, z, y, m));
    double err = INFINITY;
    if (kd_gc_compile(g, B, 3)) {
        kd_gc_fill(&rng, z, 2.0f, 0.0f);
        for (int64_t i = 0; i < kd_numel(&y->val); i++) y->val.data[i] = kd_rng_uniform(&rng);
        fill_pos(m, 0.2f);
        kd_gradcheck_randomize(&p, 21 + B);
        kd_node *wrt[3] = {z, y, m};
        err = kd_gradcheck(g, &p, wrt, 3, 1e-2, 1);
    }
    kd_graph_free(g);
    return err;
}

static void gradchecks(void) {
    TEST("gradcheck masked_mean: x and the mask, B=1 (1,5,3), B=3 (3,4,5)") {
        double e1 = gc_mmean(1, 5, 3, 0), e3 = gc_mmean(3, 4, 5, 0);
        CHECK_MSG(e1 < GC_TOL && e3 < GC_TOL, "errors %.3g %.3g", e1, e3);
    }
    TEST("gradcheck masked_mean with an all-zero row: x's gradient, zero on that row") {
        double e = gc_mmean(3, 5, 2, 1);
        CHECK_MSG(e < GC_TOL, "error %.3g", e);
    }
    TEST("gradcheck token_bce: z, targets and weights, B=1 (1,7), B=3 (3,5), z as (B,T,1)") {
        double e1 = gc_bce(1, 7, 0), e3 = gc_bce(3, 5, 0), e4 = gc_bce(3, 4, 1);
        CHECK_MSG(e1 < GC_TOL && e3 < GC_TOL && e4 < GC_TOL, "errors %.3g %.3g %.3g", e1, e3, e4);
    }
    TEST("gradcheck the classifier: CE + token BCE w.r.t. head, tag head, c_fc and wte (B=1 and B=3)") {
        for (int c = 0; c < 2; c++) {
            int B = c ? 3 : 1, T = 5;
            kd_graph *g = kd_graph_new();
            kd_node *ids = kd_input(g, "ids", 2, (int[]){B, T}), *mask = kd_input(g, "mask", 2, (int[]){B, T});
            kd_node *lab = kd_input(g, "labels", 1, (int[]){B}), *tags = kd_input(g, "tags", 2, (int[]){B, T});
            kd_gpt_cfg cfg = {.layers = 1, .dim = 8, .heads = 2, .ctx = 6, .vocab = 11};
            kd_model m;
            kd_status st = kd_textcls_build(g, &cfg, "", ids, mask, 3, 1, &m);
            CHECK(st == KD_OK);
            kd_node *loss = kd_add(g, kd_cross_entropy(g, m.logits, lab, 0.0f),
                                   kd_scale(g, kd_token_bce(g, kd_model_tap(&m, "tags"), tags, mask), 0.7f));
            kd_gc p = kd_gradcheck_project(g, loss);
            if (st == KD_OK && kd_gc_compile(g, B, 5 + c)) {
                for (int b = 0; b < B; b++) {
                    int len = b == 1 ? 3 : T; /* one padded document */
                    for (int t = 0; t < T; t++) {
                        ids->val.data[b * T + t] = t < len ? (float)kd_rng_below(&rng, 11) : 0.0f;
                        mask->val.data[b * T + t] = t < len;
                        tags->val.data[b * T + t] = (float)kd_rng_below(&rng, 2);
                    }
                    lab->val.data[b] = (float)kd_rng_below(&rng, 3);
                }
                /* larger weights than GPT-2's init, so every path matters */
                const char *names[4] = {"head.weight", "tag_head.weight", "h.0.mlp.c_fc.weight", "wte.weight"};
                kd_node *wrt[4];
                for (int i = 0; i < 4; i++) {
                    wrt[i] = kd_graph_find(g, names[i]);
                    kd_gc_fill(&rng, wrt[i], 0.5f, 0.0f);
                }
                kd_gradcheck_randomize(&p, 31 + c);
                double err = kd_gradcheck(g, &p, wrt, 4, 1e-2, 1);
                CHECK_MSG(err < GC_TOL_NET, "B=%d: gradient error %.3g", B, err);
            }
            kd_graph_free(g);
        }
    }
}

/* ============================================================ 2. PyTorch parity */

static int get(const kd_safetensors *st, const char *name, kd_node *n) {
    kd_status s = kd_st_get_f32(st, name, n->val.data, n->val.ndim, n->val.shape);
    CHECK_MSG(s == KD_OK, "%s", kd_error_message());
    return s == KD_OK;
}

static const float *ref(const kd_safetensors *st, const char *name) {
    const kd_st_tensor *t = kd_st_find(st, name);
    CHECK_MSG(t && t->dtype == KD_F32, "fixture tensor %s", name);
    return t && t->dtype == KD_F32 ? (const float *)t->data : NULL;
}

/* a net of the fixture's model with its weights, and a one-split dataset of its two documents */
static kd_status fixture_net(const kd_safetensors *st, float rw, const char *loss, kd_textcls_net *n) {
    kd_textcls_setup s = {.model = "gpt: layers=1 dim=8 heads=2 ctx=6", .loss = loss, .classes = 3, .seq = 6,
                          .max_batch = 2, .rationale_weight = rw};
    kd_status r = kd_textcls_net_new(n, &s, 1);
    if (r != KD_OK) return r;
    for (int i = 0; i < kd_graph_n_state(n->g); i++) {
        kd_node *v = kd_graph_state(n->g, i);
        char name[128];
        snprintf(name, sizeof name, "net.%s", v->name);
        if (!get(st, name, v)) return KD_EFORMAT;
    }
    return KD_OK;
}

static void fixture_data(const kd_safetensors *st, kd_textcls_data *d, uint8_t *tok, int *len, int *lab) {
    memset(d, 0, sizeof *d);
    const float *ids = ref(st, "net.ids"), *mask = ref(st, "net.mask"), *l = ref(st, "net.labels");
    if (!ids || !mask || !l) return;
    for (int i = 0; i < 12; i++) tok[i] = (uint8_t)ids[i];
    for (int b = 0; b < 2; b++) {
        len[b] = 0;
        for (int t = 0; t < 6; t++) len[b] += mask[b * 6 + t] != 0.0f;
        lab[b] = (int)l[b];
    }
    d->n_classes = 3;
    d->T = 6;
    d->n[0] = d->n[1] = 2;
    d->tok[0] = d->tok[1] = tok;
    d->len[0] = d->len[1] = len;
    d->label[0] = d->label[1] = lab;
}

static void parity(void) {
    char path[512];
    kd_safetensors st;
    kd_status s = kd_st_read(kd_test_fixture("textcls.safetensors", path, sizeof path), &st);
    TEST("fixture textcls.safetensors present (python3 tests/fixtures/gen_textcls.py)") {
        CHECK_MSG(s == KD_OK, "%s", kd_error_message());
    }
    if (s != KD_OK) return;
    TEST("masked_mean vs PyTorch: value and gradients of x and the mask (fractional, partly zero)") {
        kd_graph *g = kd_graph_new();
        kd_node *x = kd_gc_param(g, "x", 3, (int[]){3, 5, 4}), *m = kd_gc_param(g, "m", 2, (int[]){3, 5});
        kd_node *y = kd_masked_mean(g, x, m);
        kd_gc p = kd_gradcheck_project(g, y);
        if (kd_gc_compile(g, 3, 1) && get(&st, "mm.x", x) && get(&st, "mm.m", m)) {
            memcpy(p.u->val.data, ref(&st, "mm.u"), 3 * sizeof(float));
            memcpy(p.v->val.data, ref(&st, "mm.v"), 4 * sizeof(float));
            kd_graph_forward(g, 1);
            CHECK_ARRAYS("y", y->val.data, ref(&st, "mm.y"), 12, 1e-6, 1e-5);
            kd_graph_backward(g, p.obj);
            CHECK_ARRAYS("grad_x", x->grad.data, ref(&st, "mm.grad_x"), 60, 1e-6, 1e-5);
            CHECK_ARRAYS("grad_m", m->grad.data, ref(&st, "mm.grad_m"), 15, 1e-6, 1e-5);
        }
        kd_graph_free(g);
    }
    TEST("token_bce vs PyTorch: value and gradients of z, targets (hard and soft) and weights") {
        kd_graph *g = kd_graph_new();
        kd_node *z = kd_gc_param(g, "z", 2, (int[]){3, 6}), *y = kd_gc_param(g, "y", 2, (int[]){3, 6});
        kd_node *m = kd_gc_param(g, "m", 2, (int[]){3, 6});
        kd_node *l = kd_token_bce(g, z, y, m);
        if (kd_gc_compile(g, 3, 1) && get(&st, "bce.z", z) && get(&st, "bce.y", y) && get(&st, "bce.m", m)) {
            kd_graph_forward(g, 1);
            CHECK_CLOSE(l->val.data[0], ref(&st, "bce.loss")[0], 1e-6, 1e-6);
            kd_graph_backward(g, l);
            CHECK_ARRAYS("grad_z", z->grad.data, ref(&st, "bce.grad_z"), 18, 1e-7, 1e-5);
            CHECK_ARRAYS("grad_y", y->grad.data, ref(&st, "bce.grad_y"), 18, 1e-7, 1e-5);
            CHECK_ARRAYS("grad_m", m->grad.data, ref(&st, "bce.grad_m"), 18, 1e-7, 1e-5);
        }
        kd_graph_free(g);
    }
    TEST("classifier vs PyTorch: logits, tag logits, CE + 0.7 token BCE and parameter gradients") {
        kd_textcls_net n;
        if (fixture_net(&st, 0.7f, "ce", &n) == KD_OK) {
            kd_graph_set_batch(n.g, 2);
            get(&st, "net.ids", n.ids);
            get(&st, "net.mask", n.mask);
            get(&st, "net.labels", n.labels);
            get(&st, "net.tags", n.tags);
            kd_graph_forward(n.g, 1);
            /* float32 through one block: ~1e-6 relative */
            CHECK_ARRAYS("logits", n.m.logits->val.data, ref(&st, "net.logits"), 6, 1e-5, 1e-4);
            CHECK_ARRAYS("tag logits", kd_model_tap(&n.m, "tags")->val.data, ref(&st, "net.tag_logits"), 12, 1e-5,
                         1e-4);
            CHECK_CLOSE(n.loss->val.data[0], ref(&st, "net.loss")[0], 1e-5, 1e-5);
            kd_graph_backward(n.g, n.loss);
            const char *names[4] = {"wte.weight", "head.weight", "tag_head.weight", "h.0.mlp.c_fc.weight"};
            for (int i = 0; i < 4; i++) {
                kd_node *w = kd_graph_find(n.g, names[i]);
                char rn[96];
                snprintf(rn, sizeof rn, "net.grad.%s", names[i]);
                CHECK_ARRAYS(names[i], w->grad.data, ref(&st, rn), (long)kd_numel(&w->val), 1e-5, 1e-3);
            }
            kd_textcls_net_free(&n);
        } else {
            CHECK_MSG(0, "%s", kd_error_message());
        }
    }
    TEST("saliency vs PyTorch: |sum_c d log p(pred)/de * e| per token, 0 on padding") {
        kd_textcls_net n;
        kd_textcls_data d;
        uint8_t tok[12];
        int len[2], lab[2];
        fixture_data(&st, &d, tok, len, lab);
        if (d.n[0] == 2 && fixture_net(&st, 0.0f, "ce", &n) == KD_OK) {
            float score[12], logits[6];
            int idx[2] = {0, 1};
            kd_textcls_saliency(&n, &d, 0, idx, 2, score, logits);
            CHECK_ARRAYS("saliency", score, ref(&st, "net.saliency"), 12, 1e-6, 1e-3);
            CHECK_ARRAYS("logits", logits, ref(&st, "net.logits"), 6, 1e-5, 1e-4);
            CHECK(score[6 + 4] == 0.0f && score[6 + 5] == 0.0f);
            /* one document alone gives the same scores (no batch coupling, the 1/B undone) */
            float one[6];
            kd_textcls_saliency(&n, &d, 0, idx + 1, 1, one, NULL);
            CHECK_ARRAYS("alone", one, score + 6, 6, 1e-7, 1e-5);
            kd_textcls_net_free(&n);
        } else {
            CHECK_MSG(0, "%s", kd_error_message());
        }
    }
    kd_st_free(&st);
}

/* ============================================================ 3. closed forms */

static void closed_forms(void) {
    TEST("masked_mean with an all-ones mask is the mean over T; an all-zero row is 0") {
        kd_graph *g = kd_graph_new();
        kd_node *x = kd_input(g, "x", 3, (int[]){2, 3, 2}), *m = kd_input(g, "m", 2, (int[]){2, 3});
        kd_node *y = kd_masked_mean(g, x, m);
        if (kd_gc_compile(g, 2, 1)) {
            for (int i = 0; i < 12; i++) x->val.data[i] = (float)(i * i % 7) - 2.5f;
            for (int i = 0; i < 6; i++) m->val.data[i] = i < 3;
            kd_graph_forward(g, 0);
            for (int c = 0; c < 2; c++)
                CHECK_CLOSE(y->val.data[c], (x->val.data[c] + x->val.data[2 + c] + x->val.data[4 + c]) / 3.0, 1e-6, 0);
            CHECK(y->val.data[2] == 0.0f && y->val.data[3] == 0.0f);
        }
        kd_graph_free(g);
    }
    TEST("token_bce: value by hand, zero gradient at y = sigmoid(z), zero weights give 0 and no gradient") {
        kd_graph *g = kd_graph_new();
        kd_node *z = kd_gc_param(g, "z", 2, (int[]){1, 3});
        kd_node *y = kd_input(g, "y", 2, (int[]){1, 3}), *m = kd_input(g, "m", 2, (int[]){1, 3});
        kd_node *l = kd_token_bce(g, z, y, m);
        if (kd_gc_compile(g, 1, 1)) {
            float zz[3] = {-30.0f, 0.0f, 2.0f};
            memcpy(z->val.data, zz, sizeof zz);
            for (int i = 0; i < 3; i++) y->val.data[i] = 1.0f / (1.0f + expf(-zz[i])), m->val.data[i] = 1.0f;
            kd_graph_forward(g, 1);
            double want = 0.0;
            for (int i = 0; i < 3; i++) {
                double p = 1.0 / (1.0 + exp(-(double)zz[i])), yy = y->val.data[i];
                want -= (yy * log(p) + (1 - yy) * log1p(-p)) / 3.0;
            }
            CHECK_CLOSE(l->val.data[0], want, 1e-6, 1e-5);
            kd_graph_backward(g, l);
            CHECK(kd_test_max_abs(z->grad.data, 3) < 1e-7);
            y->val.data[0] = 1.0f; /* hard target at z = -30: a loss of 30, no overflow */
            m->val.data[1] = m->val.data[2] = 0.0f;
            kd_graph_forward(g, 1);
            CHECK_CLOSE(l->val.data[0], 30.0, 1e-5, 1e-6);
            for (int i = 0; i < 3; i++) m->val.data[i] = 0.0f;
            kd_graph_forward(g, 1);
            CHECK(l->val.data[0] == 0.0f);
            kd_graph_backward(g, l);
            CHECK(kd_test_max_abs(z->grad.data, 3) == 0.0);
        }
        kd_graph_free(g);
    }
    TEST("top-k tags: the k largest among the real tokens, ties to the lower position, k cut to len") {
        float s[6] = {0.5f, 2.0f, 0.5f, 3.0f, 9.0f, 7.0f}, t[6];
        kd_textcls_topk_tags(t, s, 4, 6, 2); /* position 4, 5 are padding */
        float w1[6] = {0, 1, 0, 1, 0, 0};
        CHECK_ARRAYS("k=2", t, w1, 6, 0, 0);
        kd_textcls_topk_tags(t, s, 4, 6, 3);
        float w2[6] = {1, 1, 0, 1, 0, 0}; /* the tie 0.5/0.5 goes to position 0 */
        CHECK_ARRAYS("k=3", t, w2, 6, 0, 0);
        kd_textcls_topk_tags(t, s, 3, 6, 10);
        float w3[6] = {1, 1, 1, 0, 0, 0};
        CHECK_ARRAYS("k>len", t, w3, 6, 0, 0);
    }
    TEST("shape errors at compile: masked_mean mask of another T, token_bce logits of another size") {
        kd_graph *g = kd_graph_new();
        kd_node *x = kd_input(g, "x", 3, (int[]){2, 3, 2}), *m = kd_input(g, "m", 2, (int[]){2, 4});
        kd_masked_mean(g, x, m);
        CHECK(kd_graph_compile(g, 2, 1) == KD_ESHAPE && strstr(kd_error_message(), "masked_mean"));
        kd_graph_free(g);
        g = kd_graph_new();
        kd_node *z = kd_input(g, "z", 2, (int[]){2, 5}), *y = kd_input(g, "y", 2, (int[]){2, 4});
        kd_token_bce(g, z, y, y);
        CHECK(kd_graph_compile(g, 2, 1) == KD_ESHAPE && strstr(kd_error_message(), "token_bce"));
        kd_graph_free(g);
    }
}

/* ============================================================ 4. data */

static void write_file(const char *name, const char *text) {
    char p[700];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    fputs(text, f);
    fclose(f);
}

/* a fortune file of n documents, each starting with the class's word */
static void write_corpus(const char *name, const char *word, int n) {
    char p[700];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    for (int i = 0; i < n; i++)
        fprintf(f, "%s%s: %s number %d %s\n%%\n", i % 3 == 0 ? "\n" : "", word, i % 2 ? "the" : "a", i * 7919 % 1000,
                i % 5 == 0 ? "again and again" : "");
    fclose(f);
}

static void data_tests(void) {
    char spec[1600];
    write_file("a", "\n\nfirst one\n\n%\nsecond\nline two\n%\n%\n   \n%\nthird is a longer document here\n");
    write_file("b", "%\nbee\n%\nfirst one\n%\n");
    write_file("empty", "%\n\n%\n");
    TEST("textcls load: documents per class, trimming, cutting, padding, mask and labels") {
        kd_textcls_data d;
        snprintf(spec, sizeof spec, "textcls:%s/a,%s/b", dir, dir);
        kd_status s = kd_textcls_load(&d, spec, 12, 0.0f);
        CHECK_MSG(s == KD_OK, "%s", kd_error_message());
        if (s == KD_OK) {
            CHECK(d.n_classes == 2 && d.n[0] == 5 && d.n[1] == 0);
            CHECK(d.count[0][0] == 3 && d.count[0][1] == 2 && d.n_truncated == 2);
            CHECK(d.len[0][0] == 9 && memcmp(d.tok[0], "first one", 9) == 0 && d.tok[0][9] == 0);
            CHECK(d.len[0][1] == 12 && memcmp(d.tok[0] + 12, "second\nline ", 12) == 0);
            CHECK(d.len[0][2] == 12 && memcmp(d.tok[0] + 24, "third is a l", 12) == 0);
            CHECK(d.label[0][2] == 0 && d.label[0][3] == 1 && d.len[0][3] == 3);
            float ids[24], mask[24], lab[2];
            int idx[2] = {3, 0};
            kd_textcls_fill(&d, 0, idx, 2, ids, mask, lab);
            CHECK(ids[0] == 'b' && mask[2] == 1.0f && mask[3] == 0.0f && ids[3] == 0.0f);
            CHECK(lab[0] == 1.0f && lab[1] == 0.0f && mask[12 + 8] == 1.0f && mask[12 + 9] == 0.0f);
            kd_textcls_free(&d);
        }
    }
    TEST("textcls split: by the document's bytes only (the same text lands in one split), reproducible") {
        write_corpus("c0", "alpha", 60);
        write_corpus("c1", "omega", 60);
        kd_textcls_data d, e, f;
        snprintf(spec, sizeof spec, "textcls:%s/c0,%s/c1", dir, dir);
        char spec2[1600];
        snprintf(spec2, sizeof spec2, "textcls:%s/c1,%s/c0", dir, dir);
        kd_status s1 = kd_textcls_load(&d, spec, 16, 0.3f), s2 = kd_textcls_load(&e, spec, 16, 0.3f);
        kd_status s3 = kd_textcls_load(&f, spec2, 16, 0.3f);
        CHECK(s1 == KD_OK && s2 == KD_OK && s3 == KD_OK);
        if (s1 == KD_OK && s2 == KD_OK && s3 == KD_OK) {
            CHECK(d.n[1] > 0 && d.n[0] > d.n[1] && d.n[0] + d.n[1] == 120);
            CHECK(d.n[0] == e.n[0] && memcmp(d.tok[1], e.tok[1], (size_t)d.n[1] * 16) == 0);
            /* swapping the files swaps the classes, not the split */
            CHECK(f.n[1] == d.n[1] && f.count[1][0] == d.count[1][1] && f.count[1][1] == d.count[1][0]);
        }
        if (s1 == KD_OK) kd_textcls_free(&d);
        if (s2 == KD_OK) kd_textcls_free(&e);
        if (s3 == KD_OK) kd_textcls_free(&f);
    }
    TEST("textcls load errors name the spec or the file") {
        kd_textcls_data d;
        struct {
            const char *fmt;
            int T;
            float tf;
            kd_status want;
            const char *needle;
        } bad[] = {
            {"textcls:", 8, 0.1f, KD_ECONFIG, "expected"},
            {"text:%s/a", 8, 0.1f, KD_ECONFIG, "expected"},
            {"textcls:%s/a", 8, 0.1f, KD_ECONFIG, "at least 2"},
            {"textcls:%s/a,%s/a", 8, 0.1f, KD_ECONFIG, "twice"},
            {"textcls:%s/a,%s/b,", 8, 0.1f, KD_ECONFIG, "trailing"},
            {"textcls:%s/a,%s/missing", 8, 0.1f, KD_EIO, "missing"},
            {"textcls:%s/a,%s/empty", 8, 0.1f, KD_EFORMAT, "empty"},
            {"textcls:%s/a,%s/b", 0, 0.1f, KD_ECONFIG, "sequence length"},
            {"textcls:%s/a,%s/b", 8, 0.95f, KD_ECONFIG, "test fraction"},
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            snprintf(spec, sizeof spec, bad[i].fmt, dir, dir);
            kd_status s = kd_textcls_load(&d, spec, bad[i].T, bad[i].tf);
            CHECK_MSG(s == bad[i].want && strstr(kd_error_message(), bad[i].needle), "case %zu: %d %s", i, (int)s,
                      kd_error_message());
            if (s == KD_OK) kd_textcls_free(&d);
        }
    }
}

/* ============================================================ 5. training */

static void training(void) {
    char spec[1600];
    snprintf(spec, sizeof spec, "textcls:%s/c0,%s/c1", dir, dir);
    kd_textcls_data d;
    kd_status s = kd_textcls_load(&d, spec, 16, 0.3f);
    if (s != KD_OK) return;
    TEST("training with CE + KD + rationales: loss falls, tags loss falls, the same seed gives the same bits") {
        int N = d.n[0];
        float *tl = kd_calloc((size_t)N * 2, sizeof(float));
        uint8_t *tags = kd_calloc((size_t)N * 16, 1);
        for (int i = 0; i < N; i++) { /* a teacher that knows the label; tags on the first 3 bytes */
            tl[i * 2 + d.label[0][i]] = 3.0f;
            for (int t = 0; t < 3; t++) tags[i * 16 + t] = 1;
        }
        kd_textcls_teacher_out to = {.logits = tl, .tags = tags};
        kd_textcls_setup su = {.model = "gpt: layers=1 dim=16 heads=2 ctx=16", .loss = "ce(weight=0.5)+kd(T=2,weight=0.5)",
                               .classes = 2, .seq = 16, .max_batch = 8, .rationale_weight = 1.0f};
        kd_textcls_opts o = {.steps = 150, .batch = 8, .seed = 3, .role = "student"};
        o.opt = (kd_optim_cfg){.kind = KD_OPTIM_ADAMW, .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                               .sched = KD_SCHED_CONSTANT, .warmup_steps = 5};
        float *params[2] = {NULL, NULL};
        size_t np = 0;
        double first_tag = 0.0;
        kd_textcls_result r[2];
        for (int run = 0; run < 2; run++) {
            kd_textcls_net n;
            s = kd_textcls_net_new(&n, &su, 9);
            CHECK_MSG(s == KD_OK, "%s", kd_error_message());
            if (s != KD_OK) break;
            CHECK(n.t_logits && n.tags && n.tag_loss);
            if (run == 0) { /* the tagging loss at initialisation, on one batch */
                int idx[8] = {0, 1, 2, 3, 4, 5, 6, 7};
                kd_textcls_fill(&d, 0, idx, 8, n.ids->val.data, n.mask->val.data, n.labels->val.data);
                for (int b = 0; b < 8; b++)
                    for (int t = 0; t < 16; t++) n.tags->val.data[b * 16 + t] = tags[idx[b] * 16 + t];
                memcpy(n.t_logits->val.data, tl, 16 * sizeof(float));
                kd_graph_forward(n.g, 1);
                first_tag = n.tag_loss->val.data[0];
            }
            s = kd_textcls_train(&n, &d, &o, &to, NULL, &r[run]);
            CHECK_MSG(s == KD_OK, "%s", kd_error_message());
            np = kd_graph_param_count(n.g);
            params[run] = kd_malloc(np * sizeof(float));
            memcpy(params[run], kd_graph_param_data(n.g), np * sizeof(float));
            kd_textcls_net_free(&n);
        }
        if (params[0] && params[1]) {
            CHECK(memcmp(params[0], params[1], np * sizeof(float)) == 0);
            /* below the best constant guess (the tag rate's entropy), which needs the positions */
            double on = 0.0, real = 0.0;
            for (int i = 0; i < N; i++) on += d.len[0][i] < 3 ? d.len[0][i] : 3, real += d.len[0][i];
            double q = on / real, H = -(q * log(q) + (1 - q) * log(1 - q));
            CHECK_MSG(first_tag > H && r[0].final_tag_loss < 0.5 * H, "tag loss %.4f from %.4f (constant guess %.4f)",
                      r[0].final_tag_loss, first_tag, H);
            CHECK_MSG(r[0].train_acc > 0.9, "train acc %.3f", r[0].train_acc); /* the file's word decides the class */
            CHECK(r[0].test_acc >= 0.0 && r[0].test_acc <= 1.0);
        }
        free(params[0]);
        free(params[1]);
        free(tl);
        free(tags);
    }
    TEST("training refuses a net whose loss reads a teacher when none is given") {
        kd_textcls_net n;
        kd_textcls_setup su = {.model = "gpt: layers=1 dim=8 heads=2 ctx=16", .loss = "ce+kd(T=2)", .classes = 2,
                               .seq = 16, .max_batch = 4};
        if (kd_textcls_net_new(&n, &su, 1) == KD_OK) {
            kd_textcls_opts o = {.steps = 1, .batch = 4, .role = "student"};
            kd_textcls_result r;
            CHECK(kd_textcls_train(&n, &d, &o, NULL, NULL, &r) == KD_ECONFIG && strstr(kd_error_message(), "logits"));
            kd_textcls_net_free(&n);
        }
        su.model = "gpt: layers=1 dim=8 heads=2 ctx=8";
        CHECK(kd_textcls_net_new(&n, &su, 1) == KD_ECONFIG && strstr(kd_error_message(), "context"));
        su.model = "gpt: layers=1 dim=8 heads=2 ctx=16";
        su.loss = "ce+nosuch";
        CHECK(kd_textcls_net_new(&n, &su, 1) == KD_ECONFIG && strstr(kd_error_message(), "nosuch"));
    }
    kd_textcls_free(&d);
}

/* ============================================================ 6. CLI */

static void cli(void) {
    const char *bin = getenv("KD_DISTILL") ? getenv("KD_DISTILL") : "build/distill";
    char ini[600];
    snprintf(ini, sizeof ini, "%s/tc.ini", dir);
    FILE *f = fopen(ini, "w");
    fprintf(f,
            "[run]\nname = tc\nout = %s/runs\n[data]\ntrain = textcls:%s/c0,%s/c1\n[teacher]\n"
            "model = gpt: layers=1 dim=16 heads=2 ctx=16\ncheckpoint = %s/t/teacher.safetensors\n[student]\n"
            "model = gpt: layers=1 dim=8 heads=2 ctx=16\n[distill]\nloss = ce(weight=0.5) + kd(T=2, weight=0.5)\n"
            "[textcls]\nsteps = 30\nseq = 16\ntest_frac = 0.3\nwarmup = 3\nrationale = 1\nrationale_k = 3\n"
            "[train]\nbatch = 8\noptimizer = adamw\nlr = 3e-3\nclip = 1\nlog_every = 10\n",
            dir, dir, dir, dir);
    fclose(f);
    TEST("distill run on textcls: teacher, baseline and student with rationales; summary and checkpoints") {
        int rc = kd_test_sh("%s run %s --quiet --threads 1 > %s/tc.out 2> %s/tc.err", bin, ini, dir, dir);
        CHECK_MSG(rc == 0, "exit %d", rc);
        char p[700];
        snprintf(p, sizeof p, "%s/runs/tc/summary.json", dir);
        char *s = kd_test_slurp(p, NULL);
        CHECK_MSG(s && strstr(s, "\"task\":\t\"textcls\"") && strstr(s, "\"baseline\"") && strstr(s, "\"student\"") &&
                      strstr(s, "\"test_acc\"") && strstr(s, "\"rationale_token_fraction\""),
                  "summary: %s", s ? s : "(missing)");
        free(s);
        snprintf(p, sizeof p, "%s/runs/tc/student.safetensors", dir);
        kd_safetensors st;
        if (kd_st_read(p, &st) == KD_OK) {
            CHECK(kd_st_find(&st, "tag_head.weight") && kd_st_find(&st, "head.weight") &&
                  !strcmp(kd_st_meta(&st, "task"), "textcls"));
            kd_st_free(&st);
        } else {
            CHECK_MSG(0, "%s", kd_error_message());
        }
        snprintf(p, sizeof p, "%s/runs/tc/rationale_examples.txt", dir);
        s = kd_test_slurp(p, NULL);
        /* documents with the tagged bytes in brackets, separated by "%" lines */
        CHECK_MSG(s && strstr(s, "/c0]\nalpha") && strstr(s, "\n%\n[class ") && strchr(strstr(s, "]\n") + 2, '['),
                  "examples: %s", s ? s : "(missing)");
        free(s);
        snprintf(p, sizeof p, "%s/t/teacher.safetensors", dir);
        FILE *t = fopen(p, "rb");
        CHECK(t != NULL);
        if (t) fclose(t);
    }
    TEST("distill run on textcls: a second run loads the teacher checkpoint") {
        int rc = kd_test_sh("%s run %s --quiet --threads 1 --run.name=tc2 --distill.baseline=0 > %s/tc2.out 2>&1", bin, ini,
                    dir);
        CHECK_MSG(rc == 0, "exit %d", rc);
        char p[700];
        snprintf(p, sizeof p, "%s/runs/tc2/summary.json", dir);
        char *s = kd_test_slurp(p, NULL);
        CHECK_MSG(s && strstr(s, "\"loaded\":\ttrue") && !strstr(s, "\"baseline\""), "summary: %s", s ? s : "(missing)");
        free(s);
    }
    TEST("distill run on textcls: bad [textcls] values are errors naming the key") {
        int rc = kd_test_sh("%s run %s --quiet --threads 1 --run.name=tc3 --textcls.rationale_k=0 > %s/tc3.out 2>&1", bin, ini,
                    dir);
        char p[700];
        snprintf(p, sizeof p, "%s/tc3.out", dir);
        char *s = kd_test_slurp(p, NULL);
        CHECK_MSG(rc == 1 && s && strstr(s, "rationale_k"), "exit %d: %s", rc, s ? s : "");
        free(s);
    }
}

void test_textcls(void) {
    kd_rng_seed(&rng, 20261122);
    snprintf(dir, sizeof dir, "%s/textcls", kd_test_tmpdir());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "cannot create %s\n", dir);
    gradchecks();
    parity();
    closed_forms();
    data_tests();
    training();
    cli();
}
