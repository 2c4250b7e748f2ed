/* test_export.c - distill export: the generated C compiles with
 * `cc -std=c99 -Wall -Wextra -Werror` and nothing else, and its logits equal
 * the engine's on real Fashion-MNIST test images (mlp and a cnn with batch
 * norm, max pooling and dropout); unsupported models are refused. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "kd_export.h"
#include "kd_train.h"
#include "test.h"

static int run_cmd(const char *cmd) {
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* trains spec briefly, exports, compiles the export with a harness, and
 * compares logits on the first N test images */
static void check_model(const char *spec, const kd_dataset *train, const kd_dataset *test, const char *tag) {
    enum { N = 40 };
    char dir[512], ck[600], cmd[4096], bin[600], in[600], out[600];
    snprintf(dir, sizeof dir, "%s/export_%s", kd_test_tmpdir(), tag);
    snprintf(ck, sizeof ck, "%s.safetensors", dir);
    kd_classifier c;
    CHECK(kd_classifier_new(&c, spec, "", train, 64, 0.0f, 3) == KD_OK);
    kd_train_opts o = {.epochs = 1, .batch = 64, .seed = 1, .role = "t"};
    o.opt.kind = KD_OPTIM_SGD;
    o.opt.lr = 0.05f;
    o.opt.momentum = 0.9f;
    kd_log quiet = {.quiet = 1};
    kd_train_result r;
    CHECK(kd_train_classifier(&c, train, test, &o, &quiet, &r) == KD_OK);
    CHECK(kd_checkpoint_save(c.g, &c.m, train, ck) == KD_OK);
    CHECK_MSG(kd_export_c(ck, dir) == KD_OK, "%s", kd_error_message());
    /* the engine's logits on raw pixels/255, and the same inputs to a file */
    snprintf(in, sizeof in, "%s/in.bin", dir);
    snprintf(out, sizeof out, "%s/out.bin", dir);
    FILE *f = fopen(in, "wb");
    float *px = malloc(sizeof(float) * N * 784), want[N * 10];
    for (int i = 0; i < N * 784; i++) px[i] = test->images[i] / 255.0f;
    CHECK(fwrite(px, sizeof(float), N * 784, f) == N * 784);
    fclose(f);
    kd_graph_set_batch(c.g, N > 64 ? 64 : N);
    for (int i = 0; i < N * 784; i++) c.x->val.data[i] = (px[i] - train->mean) / train->std;
    kd_graph_forward_to(c.g, 0, c.m.logits);
    memcpy(want, c.m.logits->val.data, sizeof want);
    /* harness: reads N images, writes N*10 logits */
    char hc[600];
    snprintf(hc, sizeof hc, "%s/harness.c", dir);
    f = fopen(hc, "w");
    fprintf(f, "#include <stdio.h>\n#include \"model.h\"\nint main(void) {\n"
               "    static float x[%d * MODEL_INPUT_SIZE], z[%d * MODEL_CLASSES];\n"
               "    FILE *f = fopen(\"%s\", \"rb\");\n"
               "    if (!f || fread(x, sizeof(float), %d * MODEL_INPUT_SIZE, f) != %d * MODEL_INPUT_SIZE) return 1;\n"
               "    fclose(f);\n"
               "    for (int i = 0; i < %d; i++) model_predict(x + i * MODEL_INPUT_SIZE, z + i * MODEL_CLASSES);\n"
               "    f = fopen(\"%s\", \"wb\");\n"
               "    if (!f || fwrite(z, sizeof(float), %d * MODEL_CLASSES, f) != %d * MODEL_CLASSES) return 1;\n"
               "    return fclose(f) != 0;\n}\n",
            N, N, in, N, N, N, out, N, N);
    fclose(f);
    snprintf(bin, sizeof bin, "%s/predict", dir);
    snprintf(cmd, sizeof cmd, "cc -std=c99 -Wall -Wextra -Werror -O2 -I%s -o %s %s/model.c %s -lm", dir, bin, dir, hc);
    CHECK_MSG(run_cmd(cmd) == 0, "%s", cmd);
    CHECK(run_cmd(bin) == 0);
    float got[N * 10] = {0};
    f = fopen(out, "rb");
    CHECK(f && fread(got, sizeof(float), N * 10, f) == N * 10);
    if (f) fclose(f);
    float scale = 0;
    for (int i = 0; i < N * 10; i++) scale = fmaxf(scale, fabsf(want[i]));
    /* fp32 with another summation order (naive loops vs GEMM): 1e-5 relative */
    CHECK_ARRAYS(tag, got, want, N * 10, 1e-5 * scale, 1e-5);
    free(px);
    kd_classifier_free(&c);
}

void test_export(void) {
    kd_dataset train, test;
    CHECK(kd_dataset_load("fashion-mnist:train", &train) == KD_OK);
    CHECK(kd_dataset_load("fashion-mnist:test", &test) == KD_OK);
    kd_dataset_limit(&train, 640);
    TEST("exported mlp matches the engine") { check_model("mlp: 32 d0.2 16", &train, &test, "mlp"); }
    TEST("exported cnn (BN, ReLU, max pooling, dropout) matches the engine") {
        check_model("cnn: c6 p c8 p f16 d0.3", &train, &test, "cnn");
    }
    TEST("exported cnn without BN matches the engine") { check_model("cnn: c4 c4 p bn=0", &train, &test, "cnnnobn"); }
    TEST("resnet is refused with a clear error") {
        kd_classifier c;
        CHECK(kd_classifier_new(&c, "resnet: depth=8 width=2", "", &train, 8, 0.0f, 1) == KD_OK);
        char ck[600], dir[600];
        snprintf(ck, sizeof ck, "%s/resnet.safetensors", kd_test_tmpdir());
        snprintf(dir, sizeof dir, "%s/resnet_export", kd_test_tmpdir());
        CHECK(kd_checkpoint_save(c.g, &c.m, &train, ck) == KD_OK);
        CHECK(kd_export_c(ck, dir) == KD_EUSAGE);
        CHECK_MSG(strstr(kd_error_message(), "cannot be exported"), "%s", kd_error_message());
        kd_classifier_free(&c);
    }
    kd_dataset_free(&train);
    kd_dataset_free(&test);
}
