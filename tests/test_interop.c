/* test_interop.c - teachers saved by PyTorch (docs/interop.md).
 *
 * The fixtures come from tools/torch_teacher.py --fixtures (regenerate with
 * tests/fixtures/gen_interop.py): PyTorch modules named its own way
 * (features.0, classifier.1, ... and 1, 3, 5 for the MLP), their
 * state_dicts saved by safetensors.torch.save_file in F32 and, for the CNN,
 * F16 and BF16 copies, and PyTorch's eval-mode logits on the first 64
 * Fashion-MNIST test images (whose pixels the fixture holds). We load each
 * file through a name map (file, inline pairs) and through "auto", run the
 * same images normalised as the loader does, and compare:
 *   - F32 weights: |ours - torch| <= 1e-5 * max_k |torch logit| of the row
 *     (measured: 6e-7; the only difference is the summation order of the
 *     convolutions and matrix products);
 *   - F16 / BF16 weights, against PyTorch's logits of the same rounded
 *     weights (computed in float32): 1e-5 as above, since the conversion to
 *     float32 is exact; and against the F32 logits, within the first-order
 *     bound the generator derives for each logit from the rounding of every
 *     weight: |dz| <= sum_w |dz/dw| * max(u |w|, s), u = 2^-11 (F16) or 2^-8
 *     (BF16) the unit roundoff of round-to-nearest, s half the smallest
 *     subnormal; dz/dw by autograd at the F32 weights (the bound is about
 *     10x the observed error; 1e-5 of the row is added for summation order).
 * Then every error a user can meet: a wrong map, an ambiguous or
 * mismatched "auto", a shape mismatch, an unsupported dtype, extra and
 * missing tensors, each naming the file and the tensor; and the CLI paths
 * (`distill eval --model --names --logits`, `distill run` with
 * --teacher.names, names = @FILE next to the config) on a Fashion-MNIST
 * directory made of the fixture's 64 images.
 */
#include <cjson/cJSON.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd_io.h"
#include "kd_train.h"
#include "test.h"

#define N_IMG 64
#define K 10
#define CNN "cnn: c8 p c16 p f32"
#define MLP "mlp: 16 16"
#define CNN_PAIRS "features.0=conv1, features.1=bn1, features.4=conv2, features.5=bn2, classifier.1=fc1, classifier.3=head"

static char T[300]; /* this area's directory */
static kd_safetensors ref; /* torch_ref.safetensors */
static int have_ref;
static int quiet; /* rows_close prints nothing (negative controls) */

static const char *fx(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    return kd_test_fixture(name, buf[k], sizeof buf[k]);
}

static const char *tp(char *buf, const char *name) {
    snprintf(buf, 512, "%s/%s", T, name);
    return buf;
}

/* a float32 tensor of the reference file (NULL if absent or not F32) */
static const float *ref_f32(const char *name) {
    const kd_st_tensor *t = have_ref ? kd_st_find(&ref, name) : NULL;
    return t && t->dtype == KD_F32 ? (const float *)t->data : NULL;
}

/* A classifier for 1x28x28 images and 10 classes, batch 64. */
static kd_status net_new(kd_classifier *c, const char *spec) {
    kd_dataset ds = {.c = 1, .h = 28, .w = 28, .n_classes = K};
    return kd_classifier_new(c, spec, "", &ds, N_IMG, 0.0f, 7);
}

/* Eval-mode logits of the fixture's 64 images, normalised as
 * src/data/loader.c does with Fashion-MNIST's mean and std. */
static const float *net_logits(kd_classifier *c) {
    const kd_st_tensor *px = kd_st_find(&ref, "pixels");
    for (int i = 0; i < N_IMG * 784; i++) c->x->val.data[i] = ((float)px->data[i] / 255.0f - 0.2860f) / 0.3530f;
    kd_graph_set_batch(c->g, N_IMG);
    kd_graph_forward_to(c->g, 0, c->m.logits);
    return c->m.logits->val.data;
}

/* |z - want| <= rel * max_k |want| per row, plus bound (n*K or NULL). */
static int rows_close(const char *what, const float *z, const float *want, const float *bound, int n, double rel) {
    int bad = 0;
    double worst = 0;
    for (int i = 0; i < n; i++) {
        double scale = 0;
        for (int k = 0; k < K; k++) scale = fmax(scale, fabs(want[i * K + k]));
        for (int k = 0; k < K; k++) {
            double d = fabs((double)z[i * K + k] - want[i * K + k]), tol = rel * scale + (bound ? bound[i * K + k] : 0);
            if (!(d <= tol)) {
                if (bad < 4 && !quiet) fprintf(stderr, "  %s[%d,%d]: %.9g vs %.9g (tolerance %.3g)\n", what, i, k, z[i * K + k],
                                     want[i * K + k], tol);
                bad++;
            }
            if (tol > 0 && d / tol > worst) worst = d / tol;
        }
    }
    if (bad && !quiet) fprintf(stderr, "  %s: %d of %d logits out of tolerance\n", what, bad, n * K);
    return bad == 0;
}

/* Loads path into a fresh model of spec through names and compares its
 * logits with the reference tensor want (and bound, if given). */
static int loads_and_matches(const char *spec, const char *path, const char *names, const char *base, const char *want,
                             const char *bound, double rel) {
    kd_classifier c;
    if (net_new(&c, spec) != KD_OK) return 0;
    kd_status s = kd_checkpoint_load_names(c.g, &c.m, path, names, base);
    int ok = s == KD_OK;
    if (!ok) fprintf(stderr, "  load %s with names '%s': %s\n", path, names ? names : "(ours)", kd_error_message());
    const float *w = ref_f32(want), *b = bound ? ref_f32(bound) : NULL;
    if (ok) ok = w && (!bound || b) && rows_close(want, net_logits(&c), w, b, N_IMG, rel);
    kd_classifier_free(&c);
    return ok;
}

/* The load fails with st and the message holds every needle. */
static int load_fails(const char *spec, const char *path, const char *names, kd_status want, ...) {
    kd_classifier c;
    if (net_new(&c, spec) != KD_OK) return 0;
    kd_status s = kd_checkpoint_load_names(c.g, &c.m, path, names, NULL);
    kd_classifier_free(&c);
    int ok = 1;
    if (s == KD_OK || (want != KD_OK && s != want)) {
        fprintf(stderr, "  load %s with '%s': status %d, expected %d (%s)\n", path, names, s, want,
                s == KD_OK ? "loaded" : kd_error_message());
        return 0;
    }
    va_list ap;
    va_start(ap, want);
    for (const char *n = va_arg(ap, const char *); n; n = va_arg(ap, const char *))
        if (!strstr(kd_error_message(), n)) {
            fprintf(stderr, "  message lacks '%s': %s\n", n, kd_error_message());
            ok = 0;
        }
    va_end(ap);
    return ok;
}

/* Copies src to dst, renaming tensors (from -> to prefix, NULL: keep), dropping
 * those whose name contains drop (NULL: none), storing the one named
 * as_i32 as I32 zeros, and adding extra (a 3-float tensor) when non-NULL. */
static int rewrite(const char *src, const char *dst, const char *from, const char *to, const char *drop,
                   const char *as_i32, const char *extra) {
    kd_safetensors st;
    if (kd_st_read(src, &st) != KD_OK) return 0;
    kd_st_writer *w = kd_st_writer_new();
    static const int32_t zeros[1 << 16];
    for (int i = 0; i < st.n; i++) {
        const kd_st_tensor *t = &st.tensors[i];
        if (drop && strstr(t->name, drop)) continue;
        char name[256];
        size_t fl = from ? strlen(from) : 0;
        if (from && strncmp(t->name, from, fl) == 0)
            snprintf(name, sizeof name, "%s%s", to, t->name + fl);
        else
            snprintf(name, sizeof name, "%s", t->name);
        if (as_i32 && strcmp(t->name, as_i32) == 0)
            kd_st_add(w, name, KD_I32, t->ndim, t->shape, zeros);
        else
            kd_st_add(w, name, t->dtype, t->ndim, t->shape, t->data);
    }
    if (extra) {
        int s3[1] = {3};
        float v[3] = {1, 2, 3};
        kd_st_add_f32(w, extra, 1, s3, v);
    }
    int ok = kd_st_write(w, dst) == KD_OK;
    kd_st_writer_free(w);
    kd_st_free(&st);
    return ok;
}

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return 0;
    int ok = fputs(text, f) >= 0;
    return (fclose(f) == 0) && ok;
}

/* ---------------------------------------------------------------- loading */

static void test_f32(void) {
    TEST("interop: PyTorch CNN (F32) loads by a map file, inline pairs and auto, and reproduces its logits") {
        const char *p = fx("torch_cnn.safetensors");
        char map[512];
        snprintf(map, sizeof map, "@%s", fx("torch_cnn.map"));
        CHECK(loads_and_matches(CNN, p, map, NULL, "logits_cnn", NULL, 1e-5));
        CHECK(loads_and_matches(CNN, p, CNN_PAIRS, NULL, "logits_cnn", NULL, 1e-5));
        CHECK(loads_and_matches(CNN, p, "auto", NULL, "logits_cnn", NULL, 1e-5));
        CHECK(loads_and_matches(CNN, p, "  auto \t", NULL, "logits_cnn", NULL, 1e-5));
        /* pairs may name single tensors, and a map file is found relative to base */
        char pairs[1024];
        snprintf(pairs, sizeof pairs, "%s, classifier.3.weight = head.weight,\n# a comment\nclassifier.3.bias=head.bias",
                 "features.0=conv1, features.1=bn1, features.4=conv2, features.5=bn2, classifier.1=fc1");
        CHECK(loads_and_matches(CNN, p, pairs, NULL, "logits_cnn", NULL, 1e-5));
        char dir[512];
        snprintf(dir, sizeof dir, "%s", fx("x"));
        dir[strlen(dir) - 2] = '\0'; /* the fixture directory */
        CHECK(loads_and_matches(CNN, p, "@torch_cnn.map", dir, "logits_cnn", NULL, 1e-5));
    }
    TEST("interop: num_batches_tracked comes from the file, or is 0 when absent") {
        const char *p = fx("torch_cnn.safetensors");
        kd_safetensors st;
        CHECK(kd_st_read(p, &st) == KD_OK);
        const kd_st_tensor *t = kd_st_find(&st, "features.5.num_batches_tracked");
        int64_t want = -1;
        if (t && t->dtype == KD_I64) memcpy(&want, t->data, 8);
        kd_st_free(&st);
        CHECK(want > 0);
        kd_classifier c;
        CHECK(net_new(&c, CNN) == KD_OK);
        CHECK(kd_checkpoint_load_names(c.g, &c.m, p, "auto", NULL) == KD_OK);
        CHECK(kd_graph_find(c.g, "bn2.num_batches_tracked")->val.data[0] == (float)want);
        char q[512];
        CHECK(rewrite(p, tp(q, "no_nbt.safetensors"), NULL, NULL, "num_batches_tracked", NULL, NULL));
        CHECK_MSG(kd_checkpoint_load_names(c.g, &c.m, q, "auto", NULL) == KD_OK, "%s", kd_error_message());
        CHECK(kd_graph_find(c.g, "bn2.num_batches_tracked")->val.data[0] == 0.0f);
        CHECK(rows_close("no nbt", net_logits(&c), ref_f32("logits_cnn"), NULL, N_IMG, 1e-5));
        CHECK(kd_checkpoint_load_names(c.g, &c.m, p, CNN_PAIRS, NULL) == KD_OK);
        CHECK(kd_graph_find(c.g, "bn1.num_batches_tracked")->val.data[0] == (float)want);
        CHECK_MSG(kd_checkpoint_load_names(c.g, &c.m, q, CNN_PAIRS, NULL) == KD_OK, "%s", kd_error_message());
        CHECK(kd_graph_find(c.g, "bn1.num_batches_tracked")->val.data[0] == 0.0f);
        /* our own names stay strict: a missing one is an error */
        CHECK(load_fails(CNN, q, "", KD_EFORMAT, q, "conv1.weight", NULL));
        kd_classifier_free(&c);
    }
    TEST("interop: PyTorch MLP by auto; renamed layers make auto ambiguous, a map settles it") {
        const char *p = fx("torch_mlp.safetensors");
        CHECK(loads_and_matches(MLP, p, "auto", NULL, "logits_mlp", NULL, 1e-5));
        CHECK(loads_and_matches(MLP, p, "1=fc1, 3=fc2, 5=head", NULL, "logits_mlp", NULL, 1e-5));
        /* two hidden layers of 16: their biases share leaf and shape; with
         * names that differ by more than a number nothing says which is first */
        char q[512], r[512], s[512];
        CHECK(rewrite(p, tp(q, "mlp_a.safetensors"), "1.", "hidden.", NULL, NULL, NULL));
        CHECK(rewrite(q, tp(r, "mlp_b.safetensors"), "3.", "proj.", NULL, NULL, NULL));
        CHECK(rewrite(r, tp(s, "mlp_c.safetensors"), "5.", "out.", NULL, NULL, NULL));
        CHECK(load_fails(MLP, s, "auto", KD_EFORMAT, s, "ambiguous", "hidden.bias", "proj.bias", "fc1.bias", "fc2.bias",
                         "(16)", NULL));
        CHECK(loads_and_matches(MLP, s, "hidden=fc1, proj=fc2, out=head", NULL, "logits_mlp", NULL, 1e-5));
        /* names that differ only in numbers are ordered by them: 10 after 3 */
        CHECK(rewrite(p, tp(q, "mlp_d.safetensors"), "5.", "10.", NULL, NULL, NULL));
        CHECK(loads_and_matches(MLP, q, "auto", NULL, "logits_mlp", NULL, 1e-5));
        /* 1 -> 11: the numbers now put the first layer's bias after the
         * second's while its weight (a shape of its own) stays first; the
         * file's module 11 would be split between fc1 and fc2: refused */
        CHECK(rewrite(p, tp(q, "mlp_e.safetensors"), "1.", "11.", NULL, NULL, NULL));
        CHECK(load_fails(MLP, q, "auto", KD_EFORMAT, q, "ambiguous", "'11.weight' -> 'fc1.weight'", "module", NULL));
    }
}

static void test_half(void) {
    TEST("interop: F16 and BF16 teachers convert exactly and stay within the rounding bound") {
        CHECK(loads_and_matches(CNN, fx("torch_cnn_f16.safetensors"), "auto", NULL, "logits_cnn_f16", NULL, 1e-5));
        CHECK(loads_and_matches(CNN, fx("torch_cnn_bf16.safetensors"), "auto", NULL, "logits_cnn_bf16", NULL, 1e-5));
        CHECK(loads_and_matches(CNN, fx("torch_cnn_f16.safetensors"), CNN_PAIRS, NULL, "logits_cnn", "bound_cnn_f16", 1e-5));
        CHECK(loads_and_matches(CNN, fx("torch_cnn_bf16.safetensors"), CNN_PAIRS, NULL, "logits_cnn", "bound_cnn_bf16",
                                1e-5));
        /* the comparison tells the two apart: BF16 weights do not give F16's logits */
        kd_classifier c;
        CHECK(net_new(&c, CNN) == KD_OK);
        CHECK(kd_checkpoint_load_names(c.g, &c.m, fx("torch_cnn_bf16.safetensors"), "auto", NULL) == KD_OK);
        quiet = 1;
        CHECK(!rows_close("bf16 vs f16", net_logits(&c), ref_f32("logits_cnn_f16"), NULL, N_IMG, 1e-5));
        quiet = 0;
        kd_classifier_free(&c);
    }
}

/* value of an F16 / BF16 code from its fields (independent of safetensors.c) */
static double f16_value(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return s ? -v : v;
}

static double bf16_value(uint16_t h) {
    int s = h >> 15, e = (h >> 7) & 255, m = h & 127;
    double v = e == 0 ? ldexp(m, -133) : e == 255 ? (m ? NAN : INFINITY) : ldexp(128 + m, e - 134);
    return s ? -v : v;
}

static void test_codes(void) {
    TEST("interop: every F16 and BF16 code loads as its exact value (subnormals, inf, nan); F64 rounds") {
        /* mlp: 84 has fc1.weight (84, 784): 65 856 elements, room for all 2^16 codes */
        kd_classifier c;
        CHECK(net_new(&c, "mlp: 84") == KD_OK);
        for (int half = 0; half < 2; half++) {
            kd_st_writer *w = kd_st_writer_new();
            static uint16_t codes[84 * 784];
            for (int i = 0; i < 84 * 784; i++) codes[i] = (uint16_t)(i & 0xffff);
            int64_t s_w[2] = {84, 784};
            kd_st_add(w, "fc1.weight", half ? KD_BF16 : KD_F16, 2, s_w, codes);
            /* the other tensors in F64 */
            static double d[84 * 10];
            for (int i = 0; i < 84 * 10; i++) d[i] = 0.1 * i + 1e-12;
            int64_t s_b[1] = {84}, s_h[2] = {10, 84}, s_hb[1] = {10};
            kd_st_add(w, "fc1.bias", KD_F64, 1, s_b, d);
            kd_st_add(w, "head.weight", KD_F64, 2, s_h, d);
            kd_st_add(w, "head.bias", KD_F64, 1, s_hb, d);
            char p[512];
            CHECK(kd_st_write(w, tp(p, half ? "codes_bf16.safetensors" : "codes_f16.safetensors")) == KD_OK);
            kd_st_writer_free(w);
            CHECK_MSG(kd_checkpoint_load(c.g, &c.m, p) == KD_OK, "%s", kd_error_message());
            const float *v = kd_graph_find(c.g, "fc1.weight")->val.data;
            int bad = 0;
            for (int i = 0; i < 84 * 784; i++) {
                double want = half ? bf16_value(codes[i]) : f16_value(codes[i]);
                int ok = isnan(want) ? isnan(v[i]) : (double)v[i] == want && !!signbit(v[i]) == !!signbit(want);
                if (!ok && bad++ < 4) fprintf(stderr, "  code 0x%04x: %.9g, expected %.9g\n", codes[i], v[i], want);
            }
            CHECK_MSG(bad == 0, "%s: %d codes wrong", half ? "BF16" : "F16", bad);
            const float *hb = kd_graph_find(c.g, "head.bias")->val.data;
            CHECK(hb[3] == (float)d[3] && hb[9] == (float)d[9] && hb[3] != 0.0f);
        }
        kd_classifier_free(&c);
    }
}

/* ---------------------------------------------------------------- errors */

static void test_errors(void) {
    const char *p = fx("torch_cnn.safetensors");
    TEST("interop: a wrong map names the file, both tensors and both shapes") {
        CHECK(load_fails(CNN, p, "features.0=conv2, features.1=bn1, features.4=conv1, features.5=bn2, classifier.1=fc1, "
                                 "classifier.3=head",
                         KD_ESHAPE, p, "'features.4.weight' (the model's 'conv1.weight')", "(8, 1, 3, 3)", "(16, 8, 3, 3)",
                         NULL));
        CHECK(load_fails(CNN, p, "features.0=conv9", KD_ECONFIG, p, "conv9.weight", "features.0.weight", NULL));
        CHECK(load_fails(CNN, p, "features.9=conv1", KD_ECONFIG, p, "features.9", NULL));
        CHECK(load_fails(CNN, p, "features.0=conv1, features.0.weight=conv1.weight", KD_ECONFIG, p, "features.0.weight",
                         "already mapped", NULL));
        CHECK(load_fails(CNN, p, "features.0=conv1, features.4=conv1", KD_ECONFIG, p, "conv1.weight", "already receives",
                         NULL));
        CHECK(load_fails(CNN, p, "features.0 conv1", KD_ECONFIG, p, "features.0 conv1", "THEIRS = OURS", NULL));
        CHECK(load_fails(CNN, p, "features.0=", KD_ECONFIG, p, "THEIRS = OURS", NULL));
        /* an incomplete map: the head has no source */
        CHECK(load_fails(CNN, p, "features.0=conv1, features.1=bn1, features.4=conv2, features.5=bn2, classifier.1=fc1",
                         KD_EFORMAT, p, "head.weight", "no source", NULL));
        /* the map file's line is named */
        char m[512], q[600];
        CHECK(write_text(tp(m, "bad.map"), "# header\nfeatures.0 = conv1\n\nfeatures.1 == bn1\n"));
        snprintf(q, sizeof q, "@%s", m);
        CHECK(load_fails(CNN, p, q, KD_ECONFIG, p, "bad.map:4", NULL));
        CHECK(load_fails(CNN, p, "@no/such.map", KD_EIO, "no/such.map", NULL));
    }
    TEST("interop: auto refuses shapes that do not line up and files whose modules would split") {
        CHECK(load_fails("cnn: c8 p c16 p f64", p, "auto", KD_EFORMAT, p, "do not line up", "fc1.weight", "(64, 784)", NULL));
        CHECK(load_fails("cnn: c8 p c16 p f32 f10", p, "auto", KD_EFORMAT, p, "do not line up", NULL));
        /* the running statistics of the first BN under another module name */
        char q[512], r[512];
        CHECK(rewrite(p, tp(q, "split_a.safetensors"), "features.1.running_", "stats.1.running_", NULL, NULL, NULL));
        CHECK(load_fails(CNN, q, "auto", KD_EFORMAT, q, "ambiguous", "features.1", "stats.1", NULL));
        /* with a map the same file loads */
        CHECK(loads_and_matches(CNN, q, CNN_PAIRS ", stats.1 = bn1", NULL, "logits_cnn", NULL, 1e-5));
        CHECK(rewrite(p, tp(r, "extra.safetensors"), NULL, NULL, NULL, NULL, "extra.bias"));
        CHECK(load_fails(CNN, r, "auto", KD_EFORMAT, r, "extra.bias", "matches no tensor", NULL));
        CHECK(load_fails(CNN, r, CNN_PAIRS, KD_EFORMAT, r, "extra.bias", "not used", NULL));
        CHECK(load_fails(CNN, p, "", KD_EFORMAT, p, "conv1.weight", "not found", NULL));
    }
    TEST("interop: unsupported dtypes are named with the tensor") {
        char q[512];
        CHECK(rewrite(p, tp(q, "i32.safetensors"), NULL, NULL, NULL, "classifier.3.bias", NULL));
        CHECK(load_fails(CNN, q, "auto", KD_EFORMAT, q, "classifier.3.bias", "head.bias", "I32", NULL));
        CHECK(load_fails(CNN, q, CNN_PAIRS, KD_EFORMAT, q, "classifier.3.bias", "I32", NULL));
        /* a dtype the reader does not know (U16: I16 bytes, header patched) */
        CHECK(rewrite(p, tp(q, "u16.safetensors"), NULL, NULL, NULL, NULL, NULL));
        kd_safetensors st;
        CHECK(kd_st_read(q, &st) == KD_OK);
        kd_st_writer *w = kd_st_writer_new();
        for (int i = 0; i < st.n; i++) {
            const kd_st_tensor *t = &st.tensors[i];
            static const int16_t z[64];
            kd_st_add(w, t->name, strcmp(t->name, "classifier.3.bias") ? t->dtype : KD_I16, t->ndim, t->shape,
                      strcmp(t->name, "classifier.3.bias") ? (const void *)t->data : (const void *)z);
        }
        CHECK(kd_st_write(w, q) == KD_OK);
        kd_st_writer_free(w);
        kd_st_free(&st);
        FILE *f = fopen(q, "r+b");
        static char buf[4096];
        size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        buf[n] = '\0';
        char *at = n > 8 ? strstr(buf + 8, "\"I16\"") : NULL;
        CHECK(at != NULL);
        if (f && at) {
            fseek(f, (long)(at - buf + 1), SEEK_SET);
            fputc('U', f);
        }
        if (f) fclose(f);
        CHECK(load_fails(CNN, q, "auto", KD_EFORMAT, q, "classifier.3.bias", "U16", NULL));
    }
    TEST("interop: a checkpoint distill wrote loads by its own names whatever the map") {
        kd_classifier c;
        CHECK(net_new(&c, CNN) == KD_OK);
        CHECK(kd_checkpoint_load_names(c.g, &c.m, p, "auto", NULL) == KD_OK);
        kd_dataset ds = {.c = 1, .h = 28, .w = 28, .n_classes = K, .mean = 0.2860f, .std = 0.3530f};
        char q[512];
        CHECK(kd_checkpoint_save(c.g, &c.m, &ds, tp(q, "ours.safetensors")) == KD_OK);
        kd_classifier_free(&c);
        CHECK(loads_and_matches(CNN, q, "features.0 = conv1", NULL, "logits_cnn", NULL, 1e-5));
        CHECK(loads_and_matches(CNN, q, "auto", NULL, "logits_cnn", NULL, 1e-5));
        int found = -1;
        kd_checkpoint_info info;
        CHECK(kd_checkpoint_info_peek(q, &info, &found) == KD_OK && found == 1 && strcmp(info.model, CNN) == 0);
        CHECK(kd_checkpoint_info_peek(p, &info, &found) == KD_OK && found == 0);
        CHECK(kd_checkpoint_info_read(p, &info) == KD_EFORMAT);
        CHECK(strstr(kd_error_message(), "--model") != NULL && strstr(kd_error_message(), p) != NULL);
    }
}

/* ---------------------------------------------------------------- CLI */

static char err_text[8192];

/* Runs distill with args (NULL-terminated); returns the exit code (-1 if it
 * did not exit); stderr's last 8 kB in err_text. */
static int cli(const char *first, ...) {
    const char *argv[40];
    int argc = 0;
    argv[argc++] = kd_test_bin();
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 39; a = va_arg(ap, const char *)) argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    char ep[512], op[512];
    tp(ep, "cli.err");
    tp(op, "cli.out");
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        int fo = open(op, O_WRONLY | O_CREAT | O_TRUNC, 0644), fe = open(ep, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status = 0, code = -1;
    if (pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status)) code = WEXITSTATUS(status);
    err_text[0] = '\0';
    FILE *f = fopen(ep, "rb");
    if (f) {
        size_t n = fread(err_text, 1, sizeof err_text - 1, f);
        err_text[n] = '\0';
        fclose(f);
    }
    return code;
}

static int ok_run(int code) {
    if (code == 0) return 1;
    fprintf(stderr, "  exit %d, stderr:\n%s", code, err_text);
    return 0;
}

static int err_has(int code, const char *a, const char *b) {
    int ok = (code == 1 || code == 2) && strstr(err_text, "distill: error: ") && (!a || strstr(err_text, a)) &&
             (!b || strstr(err_text, b));
    if (!ok) fprintf(stderr, "  exit %d; expected an error with '%s' and '%s':\n%s", code, a, b ? b : "", err_text);
    return ok;
}

static void be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

/* A Fashion-MNIST directory holding the fixture's 64 images as both splits. */
static int write_fashion_dir(const char *dir) {
    const kd_st_tensor *px = kd_st_find(&ref, "pixels"), *lb = kd_st_find(&ref, "labels");
    if (!px || !lb) return 0;
    mkdir(dir, 0755);
    static uint8_t img[16 + N_IMG * 784], lab[8 + N_IMG];
    be32(img, 0x803), be32(img + 4, N_IMG), be32(img + 8, 28), be32(img + 12, 28);
    memcpy(img + 16, px->data, N_IMG * 784);
    be32(lab, 0x801), be32(lab + 4, N_IMG);
    for (int i = 0; i < N_IMG; i++) {
        int64_t v;
        memcpy(&v, lb->data + 8 * i, 8);
        lab[8 + i] = (uint8_t)v;
    }
    const char *names[4] = {"t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                            "train-labels-idx1-ubyte"};
    int ok = 1;
    for (int k = 0; k < 4; k++) {
        char p[600];
        snprintf(p, sizeof p, "%s/%s", dir, names[k]);
        FILE *f = fopen(p, "wb");
        const uint8_t *b = k % 2 ? lab : img;
        size_t n = k % 2 ? sizeof lab : sizeof img;
        ok &= f && fwrite(b, 1, n, f) == n;
        if (f) ok &= fclose(f) == 0;
    }
    return ok;
}

/* The logits file written by eval --logits matches the reference. */
static int logits_file_matches(const char *path, const char *want) {
    kd_safetensors z;
    if (kd_st_read(path, &z) != KD_OK) {
        fprintf(stderr, "  %s\n", kd_error_message());
        return 0;
    }
    const kd_st_tensor *t = kd_st_find(&z, "logits"), *y = kd_st_find(&z, "labels"), *ry = kd_st_find(&ref, "labels");
    int ok = t && t->dtype == KD_F32 && t->ndim == 2 && t->shape[0] == N_IMG && t->shape[1] == K && y &&
             y->nbytes == ry->nbytes && memcmp(y->data, ry->data, y->nbytes) == 0;
    if (ok) ok = rows_close(path, (const float *)t->data, ref_f32(want), NULL, N_IMG, 1e-5);
    kd_st_free(&z);
    return ok;
}

/* accuracy of the reference logits against the labels */
static double ref_accuracy(const char *name) {
    const float *z = ref_f32(name);
    const kd_st_tensor *lb = kd_st_find(&ref, "labels");
    int right = 0;
    for (int i = 0; i < N_IMG; i++) {
        int best = 0;
        for (int k = 1; k < K; k++)
            if (z[i * K + k] > z[i * K + best]) best = k;
        int64_t y;
        memcpy(&y, lb->data + 8 * i, 8);
        right += best == y;
    }
    return (double)right / N_IMG;
}

static void test_cli(void) {
    char fdir[512], zp[512], ini[600], cdir[512], runs[512];
    tp(fdir, "fashion");
    CHECK(write_fashion_dir(fdir));
    const char *old = getenv("KD_FASHION_MNIST_DIR");
    char *saved = old ? strdup(old) : NULL;
    setenv("KD_FASHION_MNIST_DIR", fdir, 1);
    const char *p = fx("torch_cnn.safetensors");
    tp(runs, "runs");

    TEST("interop cli: distill eval --model --names --logits reproduces PyTorch's logits") {
        CHECK(ok_run(cli("eval", p, "--model", CNN, "--names", "auto", "--logits", tp(zp, "z1.safetensors"), "--threads",
                         "1", NULL)));
        CHECK(logits_file_matches(zp, "logits_cnn"));
        char map[512];
        snprintf(map, sizeof map, "@%s", fx("torch_cnn.map"));
        CHECK(ok_run(cli("eval", fx("torch_cnn_bf16.safetensors"), "--model", CNN, "--names", map, "--logits",
                         tp(zp, "z2.safetensors"), NULL)));
        CHECK(logits_file_matches(zp, "logits_cnn_bf16"));
        CHECK(err_has(cli("eval", p, NULL), p, "--model"));
        CHECK(err_has(cli("eval", p, "--model", CNN, NULL), p, "conv1.weight"));
        CHECK(err_has(cli("eval", p, "--model", "cnn: c8 p c16 p f64", "--names", "auto", NULL), p, "fc1.weight"));
        CHECK(err_has(cli("eval", p, "--model", "cnn: q9", "--names", "auto", NULL), "--model", "q9"));
    }
    TEST("interop cli: distill run takes a PyTorch teacher through --teacher.names") {
        snprintf(ini, sizeof ini, "%s/base.ini", T);
        char text[1024];
        snprintf(text, sizeof text,
                 "[run]\nout = %s\nthreads = 1\n[teacher]\nmodel = %s\n[train]\nepochs = 1\nbatch = 32\n", runs, CNN);
        CHECK(write_text(ini, text));
        char ck[600];
        snprintf(ck, sizeof ck, "--teacher.checkpoint=%s", p);
        CHECK(ok_run(cli("run", ini, ck, "--teacher.names=auto", "--run.name=auto", "--quiet", NULL)));
        char sp[600];
        snprintf(sp, sizeof sp, "%s/auto/summary.json", runs);
        FILE *f = fopen(sp, "r");
        static char js[8192];
        size_t n = f ? fread(js, 1, sizeof js - 1, f) : 0;
        js[n] = '\0';
        if (f) fclose(f);
        cJSON *root = cJSON_Parse(js), *t = cJSON_GetObjectItemCaseSensitive(root, "teacher");
        const cJSON *acc = cJSON_GetObjectItemCaseSensitive(t, "test_acc"), *ld = cJSON_GetObjectItemCaseSensitive(t, "loaded");
        CHECK(cJSON_IsTrue(ld));
        CHECK(cJSON_IsNumber(acc) && fabs(acc->valuedouble - ref_accuracy("logits_cnn")) < 1e-9);
        cJSON_Delete(root);
        /* the run's teacher.safetensors carries our names and metadata */
        snprintf(sp, sizeof sp, "%s/auto/teacher.safetensors", runs);
        CHECK(ok_run(cli("eval", sp, "--logits", tp(zp, "z3.safetensors"), NULL)));
        CHECK(logits_file_matches(zp, "logits_cnn"));
        /* names without a checkpoint, and a teacher that does not fit */
        CHECK(err_has(cli("run", ini, "--teacher.names=auto", "--run.name=x", NULL), "[teacher] names", "checkpoint"));
        CHECK(err_has(cli("run", ini, ck, "--teacher.names=auto", "--teacher.model=cnn: c8 p c16 p f64", "--run.name=y",
                          "--quiet", NULL),
                      p, "fc1.weight"));
    }
    TEST("interop cli: names = @FILE is read next to the config that sets it") {
        snprintf(cdir, sizeof cdir, "%.400s/conf", T);
        mkdir(cdir, 0755);
        char mp[600], text[1024];
        snprintf(mp, sizeof mp, "%s/teacher.map", cdir);
        FILE *in = fopen(fx("torch_cnn.map"), "r");
        static char mt[4096];
        size_t n = in ? fread(mt, 1, sizeof mt - 1, in) : 0;
        mt[n] = '\0';
        if (in) fclose(in);
        CHECK(n > 0 && write_text(mp, mt));
        snprintf(ini, sizeof ini, "%.500s/teacher.ini", cdir);
        snprintf(text, sizeof text,
                 "[run]\nout = %s\nthreads = 1\nname = mapped\n[teacher]\nmodel = %s\ncheckpoint = %s\nnames = @teacher.map\n"
                 "[train]\nepochs = 1\nbatch = 32\n",
                 runs, CNN, p);
        CHECK(write_text(ini, text));
        CHECK(ok_run(cli("run", ini, "--quiet", NULL)));
        char tk[600];
        snprintf(tk, sizeof tk, "%s/mapped/teacher.safetensors", runs);
        CHECK(ok_run(cli("eval", tk, "--logits", tp(zp, "z4.safetensors"), NULL)));
        CHECK(logits_file_matches(zp, "logits_cnn"));
        /* on the command line a relative @FILE is relative to the current directory */
        CHECK(err_has(cli("run", ini, "--teacher.names=@teacher.map", "--quiet", NULL), "teacher.map", NULL));
    }
    if (saved) {
        setenv("KD_FASHION_MNIST_DIR", saved, 1);
        free(saved);
    } else {
        unsetenv("KD_FASHION_MNIST_DIR");
    }
}

void test_interop(void) {
    snprintf(T, sizeof T, "%.200s/interop", kd_test_tmpdir());
    mkdir(T, 0755);
    TEST("interop: reference fixture") {
        have_ref = kd_st_read(fx("torch_ref.safetensors"), &ref) == KD_OK;
        CHECK_MSG(have_ref, "%s", kd_error_message());
    }
    if (!have_ref) return;
    test_f32();
    test_half();
    test_codes();
    test_errors();
    test_cli();
    kd_st_free(&ref);
    have_ref = 0;
}
