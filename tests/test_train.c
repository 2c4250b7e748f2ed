/* test_train.c - the classifier trainer on a synthetic problem it must
 * learn, checkpoint round trips (values, buffers, eval outputs), strict
 * loading, and the NaN guard that names the step and tensor. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd_io.h"
#include "kd_train.h"
#include "test.h"

/* class 0: bright top half, class 1: bright bottom half, plus noise */
static void synth(kd_dataset *ds, int n, uint64_t seed) {
    memset(ds, 0, sizeof *ds);
    ds->n = n;
    ds->c = 1;
    ds->h = ds->w = 8;
    ds->n_classes = 2;
    ds->images = kd_malloc((size_t)n * 64);
    ds->labels = kd_malloc((size_t)n);
    ds->mean = 0.4f;
    ds->std = 0.3f;
    kd_rng r;
    kd_rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        int y = (int)kd_rng_below(&r, 2);
        ds->labels[i] = (uint8_t)y;
        for (int p = 0; p < 64; p++) {
            int top = p < 32;
            int base = (top == (y == 0)) ? 160 : 40;
            ds->images[(size_t)i * 64 + p] = (uint8_t)(base + kd_rng_below(&r, 60));
        }
    }
    snprintf(ds->name, sizeof ds->name, "synthetic");
}

static kd_train_opts opts(void) {
    kd_train_opts o = {.epochs = 3, .batch = 16, .seed = 1, .log_every = 0, .role = "test"};
    o.opt.kind = KD_OPTIM_SGD;
    o.opt.lr = 0.05f;
    o.opt.momentum = 0.9f;
    o.opt.sched = KD_SCHED_COSINE;
    return o;
}

void test_train(void) {
    kd_dataset tr, te;
    synth(&tr, 203, 1);
    synth(&te, 101, 2);
    kd_log quiet = {.quiet = 1};
    char path[512];
    snprintf(path, sizeof path, "%s/ck.safetensors", kd_test_tmpdir());

    TEST("trainer learns a separable problem") {
        kd_classifier c;
        CHECK(kd_classifier_new(&c, "cnn: c4 p f16", "", &tr, 16, 0.0f, 3) == KD_OK);
        kd_eval_result before = kd_evaluate(&c, &te, 32);
        kd_train_opts o = opts();
        kd_train_result res;
        CHECK(kd_train_classifier(&c, &tr, &te, &o, &quiet, &res) == KD_OK);
        CHECK_MSG(res.test.acc >= 0.99, "accuracy %.3f", res.test.acc);
        CHECK(res.test.loss < before.loss);
        CHECK(res.test.n == 101);
        /* BN ran in training mode: running stats moved and steps were counted */
        kd_node *nbt = kd_graph_find(c.g, "bn1.num_batches_tracked");
        CHECK(nbt && nbt->val.data[0] == 3.0f * 13.0f); /* 203/16 -> 13 batches per epoch */
        CHECK(kd_graph_find(c.g, "bn1.running_var")->val.data[0] != 1.0f);

        TEST("checkpoint round trip") {
            CHECK(kd_checkpoint_save(c.g, &c.m, &tr, path) == KD_OK);
            kd_classifier d;
            CHECK(kd_classifier_new(&d, "cnn: c4 p f16", "", &tr, 16, 0.0f, 99) == KD_OK);
            CHECK(kd_checkpoint_load(d.g, &d.m, path) == KD_OK);
            int same = 1;
            for (int i = 0; i < kd_graph_n_state(c.g); i++) {
                kd_node *a = kd_graph_state(c.g, i), *b = kd_graph_find(d.g, a->name);
                same &= b && memcmp(a->val.data, b->val.data, (size_t)kd_numel(&a->val) * sizeof(float)) == 0;
            }
            CHECK(same);
            kd_eval_result e1 = kd_evaluate(&c, &te, 32), e2 = kd_evaluate(&d, &te, 32);
            CHECK(e1.acc == e2.acc && e1.loss == e2.loss);
            kd_checkpoint_info info;
            CHECK(kd_checkpoint_info_read(path, &info) == KD_OK);
            CHECK(strcmp(info.model, "cnn: c4 p f16") == 0 && info.classes == 2 && info.h == 8);
            CHECK_CLOSE(info.std, 0.3, 1e-7, 0);
            /* the file reads as a PyTorch state_dict would: I64 counter */
            kd_safetensors st;
            CHECK(kd_st_read(path, &st) == KD_OK);
            const kd_st_tensor *t = kd_st_find(&st, "bn1.num_batches_tracked");
            CHECK(t && t->dtype == KD_I64 && t->ndim == 0);
            kd_st_free(&st);
            kd_classifier_free(&d);
        }
        TEST("strict loading names the tensor") {
            kd_classifier d;
            CHECK(kd_classifier_new(&d, "cnn: c8 p f16", "", &tr, 16, 0.0f, 1) == KD_OK);
            CHECK(kd_checkpoint_load(d.g, &d.m, path) == KD_ESHAPE);
            CHECK_MSG(strstr(kd_error_message(), "conv1.weight") != NULL, "%s", kd_error_message());
            kd_classifier_free(&d);
            CHECK(kd_classifier_new(&d, "cnn: c4 p f16 f8", "", &tr, 16, 0.0f, 1) == KD_OK);
            CHECK(kd_checkpoint_load(d.g, &d.m, path) != KD_OK);
            CHECK_MSG(strstr(kd_error_message(), "fc2.weight") != NULL || strstr(kd_error_message(), "head.weight"),
                      "%s", kd_error_message());
            kd_classifier_free(&d);
            CHECK(kd_classifier_new(&d, "cnn: c4 p", "", &tr, 16, 0.0f, 1) == KD_OK);
            CHECK(kd_checkpoint_load(d.g, &d.m, path) != KD_OK); /* fc1.* unexpected / head misshapen */
            kd_classifier_free(&d);
        }
        kd_classifier_free(&c);
    }
    TEST("a prefixed model saves unprefixed names and loads elsewhere") {
        kd_classifier a, b;
        CHECK(kd_classifier_new(&a, "mlp: 12", "t.", &tr, 8, 0.0f, 5) == KD_OK);
        CHECK(kd_graph_find(a.g, "t.fc1.weight") != NULL);
        CHECK(kd_checkpoint_save(a.g, &a.m, &tr, path) == KD_OK);
        CHECK(kd_classifier_new(&b, "mlp: 12", "", &tr, 8, 0.0f, 6) == KD_OK);
        CHECK(kd_checkpoint_load(b.g, &b.m, path) == KD_OK);
        CHECK(memcmp(kd_graph_find(a.g, "t.fc1.weight")->val.data, kd_graph_find(b.g, "fc1.weight")->val.data,
                     12 * 64 * sizeof(float)) == 0);
        kd_classifier_free(&a);
        kd_classifier_free(&b);
    }
    TEST("NaN guard names the step and the tensor") {
        kd_classifier c;
        CHECK(kd_classifier_new(&c, "mlp: 16", "", &tr, 16, 0.0f, 3) == KD_OK);
        kd_train_opts o = opts();
        o.opt.lr = 1e30f;
        o.opt.momentum = 0.0f;
        kd_train_result res;
        kd_status st = kd_train_classifier(&c, &tr, &te, &o, &quiet, &res);
        CHECK(st == KD_ENUMERIC);
        CHECK_MSG(strstr(kd_error_message(), "step") && strstr(kd_error_message(), "'"), "%s", kd_error_message());
        kd_classifier_free(&c);
    }
    kd_dataset_free(&tr);
    kd_dataset_free(&te);
}
