/* test_export.c - distill export: the generated C compiles with
 * `cc -std=c99 -Wall -Wextra -Werror -pedantic` and nothing else; float32
 * logits equal the engine's on real Fashion-MNIST test images (mlp, a cnn
 * with batch norm, max pooling and dropout, a cnn without batch norm, a
 * resnet); int8 logits equal a reference int8 forward written here from
 * the rule in docs/export.md, and the int8 model's top-1 agrees with the
 * float32 model's on 500 test images of a briefly trained cnn. */
#include <math.h>
#include <stdint.h>
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

/* trains spec for one epoch on train and saves it to dir.safetensors */
static void train_model(kd_classifier *c, const char *spec, const kd_dataset *train, const kd_dataset *test,
                        const char *ck) {
    CHECK(kd_classifier_new(c, spec, "", train, 64, 0.0f, 3) == KD_OK);
    kd_train_opts o = {.epochs = 1, .batch = 64, .seed = 1, .role = "t"};
    o.opt.kind = KD_OPTIM_SGD;
    o.opt.lr = 0.05f;
    o.opt.momentum = 0.9f;
    kd_log quiet = {.quiet = 1};
    kd_train_result r;
    CHECK(kd_train_classifier(c, train, test, &o, &quiet, &r) == KD_OK);
    CHECK(kd_checkpoint_save(c->g, &c->m, train, ck) == KD_OK);
}

/* Compiles dir/model.c with a harness and runs it on n images px (pixel/255);
 * logits (n, 10) out. Returns 0 on success. */
static int run_export(const char *dir, const float *px, int n, float *logits) {
    char cmd[4096], bin[600], in[600], out[600], hc[600];
    snprintf(in, sizeof in, "%s/in.bin", dir);
    snprintf(out, sizeof out, "%s/out.bin", dir);
    snprintf(hc, sizeof hc, "%s/harness.c", dir);
    snprintf(bin, sizeof bin, "%s/predict", dir);
    FILE *f = fopen(in, "wb");
    if (!f || fwrite(px, sizeof(float), (size_t)n * 784, f) != (size_t)n * 784) return 1;
    fclose(f);
    f = fopen(hc, "w");
    if (!f) return 1;
    fprintf(f, "#include <stdio.h>\n#include \"model.h\"\nint main(void) {\n"
               "    static float x[%d * MODEL_INPUT_SIZE], z[%d * MODEL_CLASSES];\n"
               "    FILE *f = fopen(\"%s\", \"rb\");\n"
               "    if (!f || fread(x, sizeof(float), %d * MODEL_INPUT_SIZE, f) != %d * MODEL_INPUT_SIZE) return 1;\n"
               "    fclose(f);\n"
               "    for (int i = 0; i < %d; i++) model_predict(x + i * MODEL_INPUT_SIZE, z + i * MODEL_CLASSES);\n"
               "    f = fopen(\"%s\", \"wb\");\n"
               "    if (!f || fwrite(z, sizeof(float), %d * MODEL_CLASSES, f) != %d * MODEL_CLASSES) return 1;\n"
               "    return fclose(f) != 0;\n}\n",
            n, n, in, n, n, n, out, n, n);
    fclose(f);
    snprintf(cmd, sizeof cmd, "cc -std=c99 -Wall -Wextra -Werror -pedantic -O2 -I%s -o %s %s/model.c %s -lm", dir, bin,
             dir, hc);
    if (run_cmd(cmd) != 0) {
        fprintf(stderr, "failed: %s\n", cmd);
        return 1;
    }
    if (run_cmd(bin) != 0) return 1;
    f = fopen(out, "rb");
    int bad = !f || fread(logits, sizeof(float), (size_t)n * 10, f) != (size_t)n * 10;
    if (f) fclose(f);
    return bad;
}

/* ---- the int8 reference: doubles that hold floats, rounded with fl()
 * wherever the export stores a float, so that it reproduces the export's
 * rounding decisions; integer sums exact in int64. */

static double fl(double v) { return (double)(float)v; }

/* q (n) and the scale of x (n) by the activation rule: s = max|x|/127 */
static double ref_quantize(int *q, const double *x, int64_t n) {
    double amax = 0.0;
    for (int64_t i = 0; i < n; i++) amax = fmax(amax, fabs(x[i]));
    if (!(amax >= (double)1e-30f)) {
        for (int64_t i = 0; i < n; i++) q[i] = 0;
        return 0.0;
    }
    double inv = fl(127.0 / amax);
    for (int64_t i = 0; i < n; i++) q[i] = (int)round(fl(x[i] * inv));
    return fl(amax / 127.0);
}

/* weights of a conv (OC, C, KH, KW) or linear (OUT, IN) with the following
 * batch norm folded in, quantised per output row: q, scale, bias */
static void ref_weights(const kd_node *n, const kd_node *bn, int *q, double *scale, double *bias) {
    const kd_tensor *w = &n->in[1]->val;
    int OC = w->shape[0];
    int64_t K = kd_numel(w) / OC;
    for (int o = 0; o < OC; o++) {
        double a = 1.0, b = n->n_in > 2 ? (double)n->in[2]->val.data[o] : 0.0;
        if (bn) {
            a = (double)bn->in[1]->val.data[o] / sqrt((double)bn->in[4]->val.data[o] + (double)bn->fp[1]);
            b = (double)bn->in[2]->val.data[o] + (b - (double)bn->in[3]->val.data[o]) * a;
        }
        double m = 0.0;
        for (int64_t k = 0; k < K; k++) m = fmax(m, fabs((double)w->data[o * K + k] * a));
        double s = m / 127.0;
        for (int64_t k = 0; k < K; k++) q[o * K + k] = s > 0.0 ? (int)round((double)w->data[o * K + k] * a / s) : 0;
        scale[o] = fl(s);
        bias[o] = fl(b);
    }
}

/* one image (pixel/255) through the classifier's graph at batch 1 */
static void ref_int8(kd_classifier *c, const float *px, float mean, float stdv, float *logits) {
    kd_graph *g = c->g;
    int nn = c->m.logits->id + 1;
    double **v = calloc((size_t)nn, sizeof(double *));
    int *own = calloc((size_t)nn, sizeof(int));
    int64_t nx = kd_numel(&c->x->val);
    v[c->x->id] = malloc(sizeof(double) * (size_t)nx);
    own[c->x->id] = 1;
    for (int64_t i = 0; i < nx; i++) v[c->x->id][i] = fl(fl((double)px[i] - mean) / stdv);
    for (int i = 0; i < nn; i++) {
        kd_node *n = kd_graph_node(g, i);
        if (n->op == KD_OP_LEAF) continue;
        if (n->op == KD_OP_RESHAPE || n->op == KD_OP_DROPOUT || n->op == KD_OP_BATCHNORM) {
            v[i] = v[n->in[0]->id]; /* batch norm: folded into the layer before */
            continue;
        }
        int64_t ny = kd_numel(&n->val);
        double *y = v[i] = malloc(sizeof(double) * (size_t)ny), *x = v[n->in[0]->id];
        own[i] = 1;
        const kd_tensor *xt = &n->in[0]->val;
        if (n->op == KD_OP_CONV2D || n->op == KD_OP_MATMUL) {
            const kd_node *bn = NULL;
            for (int j = i + 1; j < nn; j++)
                if (kd_graph_node(g, j)->op == KD_OP_BATCHNORM && kd_graph_node(g, j)->in[0] == n) bn = kd_graph_node(g, j);
            int64_t nin = kd_numel(xt), nw = kd_numel(&n->in[1]->val);
            int OC = n->in[1]->val.shape[0], *qx = malloc(sizeof(int) * (size_t)nin), *qw = malloc(sizeof(int) * (size_t)nw);
            double *sw = malloc(sizeof(double) * (size_t)OC), *bw = malloc(sizeof(double) * (size_t)OC);
            ref_weights(n, bn, qw, sw, bw);
            double sx = ref_quantize(qx, x, nin);
            int64_t K = nw / OC, HW = ny / OC;
            for (int o = 0; o < OC; o++)
                for (int64_t p = 0; p < HW; p++) {
                    int64_t acc = 0;
                    if (n->op == KD_OP_MATMUL) {
                        for (int64_t k = 0; k < K; k++) acc += (int64_t)qw[o * K + k] * qx[k];
                    } else {
                        int C = xt->shape[1], H = xt->shape[2], W = xt->shape[3], OW = n->val.shape[3];
                        int KH = n->in[1]->val.shape[2], KW = n->in[1]->val.shape[3], S = n->ip[0], P = n->ip[1];
                        int oh = (int)(p / OW), ow = (int)(p % OW);
                        for (int ci = 0; ci < C; ci++)
                            for (int kh = 0; kh < KH; kh++)
                                for (int kw = 0; kw < KW; kw++) {
                                    int ih = oh * S - P + kh, iw = ow * S - P + kw;
                                    if (ih >= 0 && ih < H && iw >= 0 && iw < W)
                                        acc += (int64_t)qw[((o * C + ci) * KH + kh) * KW + kw] * qx[(ci * H + ih) * W + iw];
                                }
                    }
                    double r = fl(fl(fl((double)acc) * fl(sx * sw[o])) + bw[o]);
                    y[o * HW + p] = bn && bn->ip[0] && r <= 0.0 ? 0.0 : r;
                }
            free(qx), free(qw), free(sw), free(bw);
        } else if (n->op == KD_OP_RELU) {
            for (int64_t k = 0; k < ny; k++) y[k] = x[k] > 0.0 ? x[k] : 0.0;
        } else if (n->op == KD_OP_ADD) {
            for (int64_t k = 0; k < ny; k++) y[k] = fl(x[k] + v[n->in[1]->id][k]);
        } else if (n->op == KD_OP_GAP) {
            int64_t HW = kd_numel(xt) / ny;
            for (int64_t k = 0; k < ny; k++) {
                double s = 0.0;
                for (int64_t j = 0; j < HW; j++) s += x[k * HW + j];
                y[k] = fl(s / (double)HW);
            }
        } else if (n->op == KD_OP_MAXPOOL || n->op == KD_OP_AVGPOOL) {
            int C = xt->shape[1], H = xt->shape[2], W = xt->shape[3], OH = n->val.shape[2], OW = n->val.shape[3];
            int kk = n->ip[0], s = n->ip[1];
            for (int ci = 0; ci < C; ci++)
                for (int oh = 0; oh < OH; oh++)
                    for (int ow = 0; ow < OW; ow++) {
                        double m = n->op == KD_OP_MAXPOOL ? -INFINITY : 0.0;
                        for (int a = 0; a < kk; a++)
                            for (int b = 0; b < kk; b++) {
                                double t = x[(ci * H + oh * s + a) * W + ow * s + b];
                                m = n->op == KD_OP_MAXPOOL ? fmax(m, t) : fl(m + t);
                            }
                        y[(ci * OH + oh) * OW + ow] = n->op == KD_OP_MAXPOOL ? m : fl(m / (kk * kk));
                    }
        } else {
            KD_ASSERT(0, "reference: op %s not handled", kd_ops[n->op]->name);
        }
    }
    for (int k = 0; k < 10; k++) logits[k] = (float)v[c->m.logits->id][k];
    for (int i = 0; i < nn; i++)
        if (own[i]) free(v[i]);
    free(v), free(own);
}

/* the engine's logits (n, 10) of n images px (pixel/255), 64 at a time */
static void engine_logits(kd_classifier *c, const float *px, int n, float mean, float stdv, float *out) {
    for (int s = 0; s < n; s += 64) {
        int b = n - s < 64 ? n - s : 64;
        kd_graph_set_batch(c->g, b);
        for (int i = 0; i < b * 784; i++) c->x->val.data[i] = (px[s * 784 + i] - mean) / stdv;
        kd_graph_forward_to(c->g, 0, c->m.logits);
        memcpy(out + s * 10, c->m.logits->val.data, sizeof(float) * (size_t)b * 10);
    }
}

static float max_abs(const float *a, int n) {
    float m = 0;
    for (int i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i]));
    return m;
}

/* trains spec briefly, exports float32 and int8, compares each compiled
 * export on the first N test images with the engine / the int8 reference */
static void check_model(const char *spec, const kd_dataset *train, const kd_dataset *test, const char *tag) {
    enum { N = 40 };
    char dir[512], ck[600], dir8[600];
    snprintf(dir, sizeof dir, "%s/export_%s", kd_test_tmpdir(), tag);
    snprintf(dir8, sizeof dir8, "%s_int8", dir);
    snprintf(ck, sizeof ck, "%s.safetensors", dir);
    kd_classifier c;
    train_model(&c, spec, train, test, ck);
    CHECK_MSG(kd_export_c(ck, dir) == KD_OK, "%s", kd_error_message());
    kd_export_opts q8 = {.int8 = 1};
    CHECK_MSG(kd_export_c_opts(ck, dir8, &q8) == KD_OK, "%s", kd_error_message());
    float *px = malloc(sizeof(float) * N * 784), want[N * 10], got[N * 10] = {0}, ref[N * 10], got8[N * 10] = {0};
    for (int i = 0; i < N * 784; i++) px[i] = test->images[i] / 255.0f;
    engine_logits(&c, px, N, train->mean, train->std, want);
    CHECK_MSG(run_export(dir, px, N, got) == 0, "%s: float32 export", tag);
    /* float32 with another summation order (naive loops vs GEMM): 1e-5 relative */
    CHECK_ARRAYS(tag, got, want, N * 10, 1e-5 * max_abs(want, N * 10), 1e-5);
    kd_graph_set_batch(c.g, 1);
    for (int i = 0; i < N; i++) ref_int8(&c, px + i * 784, train->mean, train->std, ref + i * 10);
    CHECK_MSG(run_export(dir8, px, N, got8) == 0, "%s: int8 export", tag);
    /* the reference reproduces every rounding of the export: equal up to
     * float rounding of the last operations (in practice bit for bit) */
    char what[64];
    snprintf(what, sizeof what, "%s int8", tag);
    CHECK_ARRAYS(what, got8, ref, N * 10, 1e-5 * max_abs(ref, N * 10), 1e-5);
    /* and int8 is a quantisation of the float model, not something else */
    CHECK_ARRAYS(what, got8, want, N * 10, 0.2 * max_abs(want, N * 10), 0.0);
    free(px);
    kd_classifier_free(&c);
}

static int argmax10(const float *z) {
    int b = 0;
    for (int k = 1; k < 10; k++)
        if (z[k] > z[b]) b = k;
    return b;
}

void test_export(void) {
    kd_dataset train, test;
    CHECK(kd_dataset_load("fashion-mnist:train", &train) == KD_OK);
    CHECK(kd_dataset_load("fashion-mnist:test", &test) == KD_OK);
    kd_dataset_limit(&train, 640);
    TEST("exported mlp matches the engine (float32) and the int8 reference (int8)") {
        check_model("mlp: 32 d0.2 16", &train, &test, "mlp");
    }
    TEST("exported cnn (BN, ReLU, max pooling, dropout) matches the engine and the int8 reference") {
        check_model("cnn: c6 p c8 p f16 d0.3", &train, &test, "cnn");
    }
    TEST("exported cnn without BN matches the engine and the int8 reference") {
        check_model("cnn: c4 c4 p bn=0", &train, &test, "cnnnobn");
    }
    TEST("exported resnet (stride 2, 1x1 shortcuts, additions, global pooling) matches") {
        check_model("resnet: depth=8 width=4", &train, &test, "resnet");
    }
    TEST("int8 top-1 agrees with float32 on >= 97% of 500 test images") {
        enum { N = 500 };
        kd_dataset_free(&train);
        CHECK(kd_dataset_load("fashion-mnist:train", &train) == KD_OK);
        kd_dataset_limit(&train, 4000);
        char dir[512], dir8[600], ck[600];
        snprintf(dir, sizeof dir, "%s/export_agree", kd_test_tmpdir());
        snprintf(dir8, sizeof dir8, "%s_int8", dir);
        snprintf(ck, sizeof ck, "%s.safetensors", dir);
        kd_classifier c;
        train_model(&c, "cnn: c8 p c16 p f32", &train, &test, ck);
        kd_export_opts q8 = {.int8 = 1};
        CHECK(kd_export_c(ck, dir) == KD_OK);
        CHECK(kd_export_c_opts(ck, dir8, &q8) == KD_OK);
        float *px = malloc(sizeof(float) * N * 784), *z = calloc(N * 10, sizeof(float)), *z8 = calloc(N * 10, sizeof(float));
        for (int i = 0; i < N * 784; i++) px[i] = test.images[i] / 255.0f;
        CHECK(run_export(dir, px, N, z) == 0);
        CHECK(run_export(dir8, px, N, z8) == 0);
        int agree = 0, right = 0, right8 = 0;
        for (int i = 0; i < N; i++) {
            agree += argmax10(z + i * 10) == argmax10(z8 + i * 10);
            right += argmax10(z + i * 10) == test.labels[i];
            right8 += argmax10(z8 + i * 10) == test.labels[i];
        }
        CHECK_MSG(agree >= 0.97 * N, "top-1 agreement %d/%d (accuracy float32 %d, int8 %d)", agree, N, right, right8);
        CHECK_MSG(right >= 0.6 * N, "the model is trained: accuracy %d/%d", right, N);
        free(px), free(z), free(z8);
        kd_classifier_free(&c);
        /* the CLI flag writes the same files as the library */
        const char *bin = getenv("KD_DISTILL") ? getenv("KD_DISTILL") : "build/distill";
        char cmd[4096], a[700], b[4096];
        snprintf(cmd, sizeof cmd, "%s export %s --c %s_cli --int8 > /dev/null && cmp -s %s/model.c %s_cli/model.c", bin,
                 ck, dir8, dir8, dir8);
        CHECK_MSG(run_cmd(cmd) == 0, "%s", cmd);
        snprintf(a, sizeof a, "%s_cli/model.h", dir8);
        FILE *f = fopen(a, "r");
        size_t nb = f ? fread(b, 1, sizeof b - 1, f) : 0;
        b[nb] = '\0';
        if (f) fclose(f);
        CHECK_MSG(strstr(b, "#define MODEL_INT8 1") && strstr(b, "MODEL_WORKSPACE_BYTES"), "%s", a);
    }
    kd_dataset_free(&train);
    kd_dataset_free(&test);
}
