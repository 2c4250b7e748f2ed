/* test_nn.c - model specs: parameter counts against closed forms, PyTorch
 * state_dict names and layouts, taps, and spec errors naming the token. */
#include <string.h>

#include "kd_nn.h"
#include "test.h"

static kd_status build(const char *spec, kd_graph **gp, kd_model *m) {
    kd_graph *g = kd_graph_new();
    int s[4] = {2, 1, 28, 28};
    kd_node *x = kd_input(g, "x", 4, s);
    kd_status st = kd_model_build(g, spec, "", x, 10, m);
    if (st == KD_OK) st = kd_graph_compile(g, 2, 1);
    *gp = g;
    return st;
}

static int has_shape(kd_graph *g, const char *name, int ndim, int a, int b, int c, int d) {
    kd_node *n = kd_graph_find(g, name);
    if (!n || n->val.ndim != ndim) return 0;
    int s[4] = {a, b, c, d};
    for (int i = 0; i < ndim; i++)
        if (n->val.shape[i] != s[i]) return 0;
    return 1;
}

void test_nn(void) {
    TEST("mlp parameter count and names") {
        kd_graph *g;
        kd_model m;
        CHECK(build("mlp: 128 64", &g, &m) == KD_OK);
        CHECK(kd_model_params(g, &m) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10);
        CHECK(has_shape(g, "fc1.weight", 2, 128, 784, 0, 0));
        CHECK(has_shape(g, "head.weight", 2, 10, 64, 0, 0));
        CHECK(kd_model_tap(&m, "block2") != NULL && kd_model_tap(&m, "logits") == m.logits);
        CHECK(m.logits->val.shape[1] == 10);
        kd_graph_free(g);
    }
    TEST("reference cnn: count, BN buffers, taps") {
        kd_graph *g;
        kd_model m;
        CHECK(build("cnn: c32 c32 p c64 c64 p f256 d0.3", &g, &m) == KD_OK);
        long convs = 32 * 1 * 9 + 32 * 32 * 9 + 64 * 32 * 9 + 64 * 64 * 9; /* no conv bias before BN */
        long bns = 2 * (32 + 32 + 64 + 64);
        long fcs = 64 * 7 * 7 * 256 + 256 + 256 * 10 + 10;
        CHECK(kd_model_params(g, &m) == convs + bns + fcs);
        CHECK(has_shape(g, "conv2.weight", 4, 32, 32, 3, 3));
        CHECK(has_shape(g, "bn4.running_var", 1, 64, 0, 0, 0));
        kd_node *nbt = kd_graph_find(g, "bn1.num_batches_tracked");
        CHECK(nbt && (nbt->flags & KD_F_I64) && (nbt->flags & KD_F_BUFFER));
        kd_node *b2 = kd_model_tap(&m, "block2");
        CHECK(b2 && b2->val.ndim == 4 && b2->val.shape[1] == 64 && b2->val.shape[2] == 7);
        CHECK(kd_model_tap(&m, "fc1_out") != NULL);
        kd_graph_free(g);
    }
    TEST("cnn without BN has conv biases") {
        kd_graph *g;
        kd_model m;
        CHECK(build("cnn: c8 p c16 p bn=0", &g, &m) == KD_OK);
        CHECK(kd_model_params(g, &m) == 8 * 9 + 8 + 16 * 8 * 9 + 16 + 16 * 7 * 7 * 10 + 10);
        CHECK(kd_graph_find(g, "conv1.bias") != NULL && kd_graph_find(g, "bn1.weight") == NULL);
        kd_graph_free(g);
    }
    TEST("resnet basic blocks, CIFAR style") {
        kd_graph *g;
        kd_model m;
        CHECK(build("resnet: depth=8 width=4", &g, &m) == KD_OK);
        long w = 4;
        long stem = 9 * w + 2 * w;
        long s1 = 2 * (9 * w * w) + 2 * 2 * w;
        long s2 = 9 * w * 2 * w + 9 * 4 * w * w + 2 * 2 * 2 * w + (w * 2 * w + 2 * 2 * w);
        long s3 = 9 * 2 * w * 4 * w + 9 * 16 * w * w + 2 * 2 * 4 * w + (2 * w * 4 * w + 2 * 4 * w);
        long head = 4 * w * 10 + 10;
        CHECK(kd_model_params(g, &m) == stem + s1 + s2 + s3 + head);
        CHECK(has_shape(g, "layer2.0.shortcut.0.weight", 4, 8, 4, 1, 1));
        CHECK(kd_graph_find(g, "layer1.0.shortcut.0.weight") == NULL);
        kd_node *l3 = kd_model_tap(&m, "layer3");
        CHECK(l3 && l3->val.shape[1] == 16 && l3->val.shape[2] == 7);
        CHECK(kd_model_tap(&m, "stem") && kd_model_tap(&m, "pool"));
        kd_graph_free(g);
    }
    TEST("spec errors name the token") {
        const char *bad[][2] = {
            {"cnn: c32 x7", "x7"},        {"mlp: -3", "-3"},           {"foo: 1", "foo"},
            {"resnet: depth=9", "9"},     {"cnn: p p p p p p", "p"},   {"cnn: c8 d1.5", "d1.5"},
            {"no colon here", "no colon"}, {"resnet: width=abc", "width=abc"}, {"cnn: f10 c4", "c4"},
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            kd_graph *g;
            kd_model m;
            kd_status st = build(bad[i][0], &g, &m);
            CHECK_MSG(st == KD_ECONFIG, "spec '%s' gave status %d", bad[i][0], st);
            CHECK_MSG(strstr(kd_error_message(), bad[i][1]) != NULL, "spec '%s': %s", bad[i][0], kd_error_message());
            kd_graph_free(g);
        }
    }
}
