/* test_data.c - IDX loading and the batch loader, on synthetic files.
 *
 * Writes small IDX files (plain and gzip) into the test's temporary
 * directory and checks: exact load, .gz == plain, every kind of bad file is
 * rejected with the right status and a message naming the file, shuffle
 * determinism and coverage, exact normalisation, flip and crop geometry,
 * reproducible augmentation, and the real Fashion-MNIST test/train sets
 * (installed here and in CI: absence is a failure).
 * Deliberately not here: timing of the loader (bench/).
 */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kd_data.h"
#include "test.h"

/* ---------------------------------------------------------------- helpers */

static const char *tpath(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", kd_test_tmpdir(), name);
    return buf;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Writes raw bytes to path, plain or gzip. Returns 1 on success. */
static int write_bytes(const char *path, const uint8_t *data, size_t len, int gz) {
    if (gz) {
        gzFile f = gzopen(path, "wb");
        if (!f) return 0;
        int ok = len == 0 || gzwrite(f, data, (unsigned)len) == (int)len;
        return (gzclose(f) == Z_OK) && ok;
    }
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = len == 0 || fwrite(data, 1, len, f) == len;
    return (fclose(f) == 0) && ok;
}

/* Builds an IDX file image: magic, ndim big-endian dims, payload, extra
 * trailing bytes. *len receives the size; the caller frees. */
static uint8_t *idx_bytes(uint32_t magic, int ndim, const uint32_t *dims, const uint8_t *payload, size_t plen,
                          size_t extra, size_t *len) {
    *len = 4 + 4 * (size_t)ndim + plen + extra;
    uint8_t *b = calloc(*len, 1);
    put_be32(b, magic);
    for (int i = 0; i < ndim; i++) put_be32(b + 4 + 4 * i, dims[i]);
    if (plen) memcpy(b + 4 + 4 * ndim, payload, plen);
    for (size_t i = 0; i < extra; i++) b[4 + 4 * ndim + plen + i] = (uint8_t)(0xA0 + i);
    return b;
}

static int write_images(const char *path, int n, int h, int w, const uint8_t *px, int gz) {
    uint32_t dims[3] = {(uint32_t)n, (uint32_t)h, (uint32_t)w};
    size_t len;
    uint8_t *b = idx_bytes(0x803, 3, dims, px, (size_t)n * h * w, 0, &len);
    int ok = write_bytes(path, b, len, gz);
    free(b);
    return ok;
}

static int write_labels(const char *path, int n, const uint8_t *lb, int gz) {
    uint32_t dims[1] = {(uint32_t)n};
    size_t len;
    uint8_t *b = idx_bytes(0x801, 1, dims, lb, (size_t)n, 0, &len);
    int ok = write_bytes(path, b, len, gz);
    free(b);
    return ok;
}

static uint8_t *read_whole(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *b = NULL;
    size_t cap = 0;
    *len = 0;
    for (;;) {
        if (*len == cap) {
            cap = cap ? 2 * cap : 4096;
            b = realloc(b, cap);
        }
        size_t r = fread(b + *len, 1, cap - *len, f);
        *len += r;
        if (r == 0) break;
    }
    fclose(f);
    return b;
}

/* Loads and expects failure with status st and a message containing the
 * base name of `names` (and `also`, when given). The dataset must be left
 * zeroed. */
static void expect_reject(const char *img, const char *lbl, kd_status st, const char *names, const char *also) {
    kd_dataset ds;
    memset(&ds, 0x5a, sizeof ds); /* garbage in: the loader must reset it */
    kd_status got = kd_idx_load(img, lbl, &ds);
    const char *msg = kd_error_message();
    CHECK_MSG(got == st, "status %d, expected %d (%s)", (int)got, (int)st, msg);
    CHECK_MSG(strstr(msg, names) != NULL, "message '%s' does not name '%s'", msg, names);
    if (also) CHECK_MSG(strstr(msg, also) != NULL, "message '%s' lacks '%s'", msg, also);
    CHECK(ds.images == NULL && ds.labels == NULL && ds.n == 0);
    kd_dataset_free(&ds);
}

/* A dataset in memory (no file), each image encoding its own index:
 * pixel 0 = idx & 255, pixel 1 = idx >> 8, the rest a pattern >= 1. */
static void make_memory_set(kd_dataset *ds, int n, int h, int w) {
    memset(ds, 0, sizeof *ds);
    ds->n = n;
    ds->c = 1;
    ds->h = h;
    ds->w = w;
    ds->n_classes = 7;
    ds->images = malloc((size_t)n * h * w);
    ds->labels = malloc((size_t)n);
    for (int i = 0; i < n; i++) {
        uint8_t *im = ds->images + (size_t)i * h * w;
        for (int k = 0; k < h * w; k++) im[k] = (uint8_t)(1 + (i * 31 + k * 17) % 255);
        im[0] = (uint8_t)(i & 255);
        im[1] = (uint8_t)(i >> 8);
        ds->labels[i] = (uint8_t)(i % 7);
    }
    ds->mean = 0.25f;
    ds->std = 0.5f;
}

static float norm(const kd_dataset *ds, int v) { return ((float)v / 255.0f - ds->mean) / ds->std; }

/* Decodes the example index from a normalised, un-augmented image. */
static int decode_index(const kd_dataset *ds, const float *x) {
    int lo = (int)(x[0] * ds->std * 255.0f + ds->mean * 255.0f + 0.5f);
    int hi = (int)(x[1] * ds->std * 255.0f + ds->mean * 255.0f + 0.5f);
    return lo + 256 * hi;
}

/* Runs one epoch, recording dataset indices in order; returns the count. */
static int epoch_order(kd_loader *ld, int epoch, int *order, int n_max, int batch, int n_pixels) {
    float *x = malloc((size_t)batch * n_pixels * sizeof *x), *y = malloc((size_t)batch * sizeof *y);
    int *aug = malloc((size_t)batch * 4 * sizeof *aug);
    kd_loader_start_epoch(ld, epoch);
    int k = 0, B;
    while ((B = kd_loader_next(ld, x, y, aug)) > 0)
        for (int b = 0; b < B && k < n_max; b++) order[k++] = aug[4 * b + 3];
    free(x);
    free(y);
    free(aug);
    return k;
}

/* ---------------------------------------------------------------- tests */

/* [data] label_map: labels move, n_classes follows, bad maps are refused */
static void test_relabel(void) {
    kd_dataset ds;
    make_memory_set(&ds, 50, 4, 4);
    int map[16], n = 0;
    CHECK(kd_label_map_parse("2, 2 1 1 0,0 2", map, 16, &n) == KD_OK && n == 7);
    CHECK(kd_dataset_relabel(&ds, map, n) == KD_OK);
    CHECK(ds.n_classes == 3);
    int ok = 1;
    for (int i = 0; i < ds.n; i++) ok &= ds.labels[i] == map[i % 7];
    CHECK(ok);
    CHECK(kd_label_map_parse("0 1 x", map, 16, &n) == KD_ECONFIG);
    CHECK(kd_label_map_parse("0 1 300", map, 16, &n) == KD_ECONFIG);
    CHECK(kd_label_map_parse("0 1 2", map, 2, &n) == KD_ECONFIG);
    kd_dataset_free(&ds);
    make_memory_set(&ds, 50, 4, 4);
    int few[3] = {0, 1, 0};
    CHECK(kd_dataset_relabel(&ds, few, 3) == KD_ECONFIG); /* 7 classes need 7 entries */
    CHECK(strstr(kd_error_message(), "label map has 3 entries for 7 classes") != NULL);
    int gap[7] = {0, 0, 2, 2, 2, 2, 2};
    CHECK(kd_dataset_relabel(&ds, gap, 7) == KD_ECONFIG); /* class 1 never produced */
    CHECK(ds.labels[3] == 3 && ds.n_classes == 7);        /* ... and nothing changed */
    kd_dataset_free(&ds);
}

void test_data(void) {
    test_relabel();
    char ip[512], lp[512], ipz[512], lpz[512];

    /* a small set: 5 images of 3x4, labels with max 3 */
    enum { N = 5, H = 3, W = 4 };
    uint8_t px[N * H * W], lb[N] = {0, 3, 1, 3, 2};
    for (int i = 0; i < N * H * W; i++) px[i] = (uint8_t)((i * 37 + 11) % 256);
    tpath(ip, sizeof ip, "small-images.idx");
    tpath(lp, sizeof lp, "small-labels.idx");
    tpath(ipz, sizeof ipz, "small-images.idx.gz");
    tpath(lpz, sizeof lpz, "small-labels.idx.gz");
    int wrote = write_images(ip, N, H, W, px, 0) && write_labels(lp, N, lb, 0) && write_images(ipz, N, H, W, px, 1) &&
                write_labels(lpz, N, lb, 1);

    TEST("idx: small plain file loads exactly") {
        CHECK(wrote);
        kd_dataset ds;
        kd_status st = kd_idx_load(ip, lp, &ds);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            CHECK(ds.n == N && ds.c == 1 && ds.h == H && ds.w == W);
            CHECK(memcmp(ds.images, px, sizeof px) == 0);
            CHECK(memcmp(ds.labels, lb, sizeof lb) == 0);
            CHECK(ds.n_classes == 4);
            double s = 0, ss = 0;
            for (int i = 0; i < N * H * W; i++) s += px[i] / 255.0;
            double m = s / (N * H * W);
            for (int i = 0; i < N * H * W; i++) ss += (px[i] / 255.0 - m) * (px[i] / 255.0 - m);
            CHECK_CLOSE(ds.mean, m, 1e-6, 0);
            CHECK_CLOSE(ds.std, sqrt(ss / (N * H * W)), 1e-6, 0);
            CHECK(strstr(ds.name, "small-images") != NULL);
        }
        kd_dataset_free(&ds);
        CHECK(ds.images == NULL && ds.n == 0);
        kd_dataset_free(&ds); /* twice is fine: the struct is zeroed */
        kd_dataset zero;
        memset(&zero, 0, sizeof zero);
        kd_dataset_free(&zero);
        CHECK(zero.images == NULL);
    }

    TEST("idx: .gz and plain give identical data") {
        size_t zlen = 0;
        uint8_t *z = read_whole(ipz, &zlen);
        CHECK(z && zlen > 2 && z[0] == 0x1f && z[1] == 0x8b); /* the file really is gzip */
        free(z);
        kd_dataset a, b, c;
        kd_status sa = kd_idx_load(ip, lp, &a), sb = kd_idx_load(ipz, lpz, &b), sc = kd_idx_load(ipz, lp, &c);
        CHECK(sa == KD_OK && sb == KD_OK && sc == KD_OK);
        if (sa == KD_OK && sb == KD_OK && sc == KD_OK) {
            CHECK(a.n == b.n && a.h == b.h && a.w == b.w && a.n_classes == b.n_classes);
            CHECK(memcmp(a.images, b.images, (size_t)N * H * W) == 0);
            CHECK(memcmp(a.labels, b.labels, N) == 0);
            CHECK(memcmp(c.images, b.images, (size_t)N * H * W) == 0);
            CHECK(a.mean == b.mean && a.std == b.std);
        }
        kd_dataset_free(&a);
        kd_dataset_free(&b);
        kd_dataset_free(&c);
    }

    TEST("idx: bad files are rejected with the file named") {
        char p[512], q[512], exp[128];
        size_t len;
        uint32_t dims[3] = {N, H, W};

        /* missing files */
        tpath(p, sizeof p, "no-such-images.idx");
        expect_reject(p, lp, KD_EIO, "no-such-images.idx", NULL);
        tpath(p, sizeof p, "no-such-labels.idx");
        expect_reject(ip, p, KD_EIO, "no-such-labels.idx", NULL);

        /* empty file and truncated header (magic + one dim) */
        tpath(p, sizeof p, "empty.idx");
        CHECK(write_bytes(p, NULL, 0, 0));
        expect_reject(p, lp, KD_EFORMAT, "empty.idx", "truncated header");
        uint8_t *b = idx_bytes(0x803, 3, dims, px, sizeof px, 0, &len);
        tpath(p, sizeof p, "short-header.idx");
        CHECK(write_bytes(p, b, 8, 0));
        expect_reject(p, lp, KD_EFORMAT, "short-header.idx", "truncated header");
        tpath(p, sizeof p, "short-header.idx.gz");
        CHECK(write_bytes(p, b, 10, 1));
        expect_reject(p, lp, KD_EFORMAT, "short-header.idx.gz", "truncated header");

        /* truncated payload: the message says expected vs got */
        tpath(p, sizeof p, "short-payload.idx");
        CHECK(write_bytes(p, b, len - 7, 0));
        snprintf(exp, sizeof exp, "expected %d bytes", N * H * W);
        expect_reject(p, lp, KD_EFORMAT, "short-payload.idx", exp);
        snprintf(exp, sizeof exp, "got %d", N * H * W - 7);
        expect_reject(p, lp, KD_EFORMAT, "short-payload.idx", exp);
        tpath(p, sizeof p, "short-payload.idx.gz"); /* a valid gzip of a short file */
        CHECK(write_bytes(p, b, len - 1, 1));
        expect_reject(p, lp, KD_EFORMAT, "short-payload.idx.gz", "truncated payload");
        free(b);

        /* a directory is not a file */
        expect_reject(kd_test_tmpdir(), lp, KD_EIO, kd_test_tmpdir(), NULL);

        /* trailing garbage, plain and inside gzip */
        b = idx_bytes(0x803, 3, dims, px, sizeof px, 3, &len);
        tpath(p, sizeof p, "trailing.idx");
        CHECK(write_bytes(p, b, len, 0));
        expect_reject(p, lp, KD_EFORMAT, "trailing.idx", "3 trailing bytes");
        tpath(p, sizeof p, "trailing.idx.gz");
        CHECK(write_bytes(p, b, len, 1));
        expect_reject(p, lp, KD_EFORMAT, "trailing.idx.gz", "trailing");
        free(b);

        /* wrong magic: a label file given as images, and random bytes */
        expect_reject(lp, lp, KD_EFORMAT, "small-labels.idx", "0x00000801");
        expect_reject(lp, lp, KD_EFORMAT, "small-labels.idx", "expected 0x00000803");
        expect_reject(ip, ip, KD_EFORMAT, "small-images.idx", "expected 0x00000801");
        b = idx_bytes(0xdeadbeef, 3, dims, px, sizeof px, 0, &len);
        tpath(p, sizeof p, "bad-magic.idx");
        CHECK(write_bytes(p, b, len, 0));
        expect_reject(p, lp, KD_EFORMAT, "bad-magic.idx", "0xdeadbeef");
        free(b);

        /* a zero dimension, and absurd dimensions with a tiny payload */
        uint32_t zdims[3] = {N, 0, W};
        b = idx_bytes(0x803, 3, zdims, NULL, 0, 0, &len);
        tpath(p, sizeof p, "zero-dim.idx");
        CHECK(write_bytes(p, b, len, 0));
        expect_reject(p, lp, KD_EFORMAT, "zero-dim.idx", "is 0");
        free(b);
        uint32_t bdims[3] = {100000, 100000, 1000};
        b = idx_bytes(0x803, 3, bdims, px, sizeof px, 0, &len);
        tpath(p, sizeof p, "huge-dims.idx");
        CHECK(write_bytes(p, b, len, 0));
        expect_reject(p, lp, KD_EFORMAT, "huge-dims.idx", "absurd");
        free(b);
        /* large but under the bound: must fail as truncated, not allocate 2 GB */
        uint32_t ldims[3] = {2000000, 32, 32};
        b = idx_bytes(0x803, 3, ldims, px, sizeof px, 0, &len);
        tpath(p, sizeof p, "lying-dims.idx");
        CHECK(write_bytes(p, b, len, 0));
        expect_reject(p, lp, KD_EFORMAT, "lying-dims.idx", "truncated payload");
        free(b);

        /* label count differs from image count: both files and counts named */
        uint8_t lb4[4] = {1, 2, 3, 4};
        tpath(q, sizeof q, "four-labels.idx");
        CHECK(write_labels(q, 4, lb4, 0));
        expect_reject(ip, q, KD_EFORMAT, "four-labels.idx", "small-images.idx");
        expect_reject(ip, q, KD_EFORMAT, "has 4 labels", "has 5 images");

        /* corrupt gzip: a larger varied payload, bytes flipped mid-stream */
        enum { CN = 400, CH = 28, CW = 28 }; /* 313 kB: errors surface mid-payload */
        uint8_t *cpx = malloc(CN * CH * CW);
        for (int i = 0; i < CN * CH * CW; i++) cpx[i] = (uint8_t)(((long long)i * i / 7 + i / 28) % 97);
        tpath(p, sizeof p, "good-big.idx.gz");
        CHECK(write_images(p, CN, CH, CW, cpx, 1));
        uint8_t cl[CN] = {0};
        tpath(q, sizeof q, "good-big-labels.idx");
        CHECK(write_labels(q, CN, cl, 0));
        kd_dataset ok;
        kd_status sok = kd_idx_load(p, q, &ok);
        CHECK_MSG(sok == KD_OK, "%s", kd_error_message()); /* the uncorrupted file is fine */
        kd_dataset_free(&ok);
        size_t zlen = 0;
        uint8_t *z = read_whole(p, &zlen);
        CHECK(z && zlen > 100);
        if (z && zlen > 100) {
            char r[512];
            uint8_t *m = malloc(zlen);
            /* flipped bytes in the middle */
            memcpy(m, z, zlen);
            for (size_t i = zlen / 2; i < zlen / 2 + 8; i++) m[i] ^= 0x5a;
            tpath(r, sizeof r, "flipped.idx.gz");
            CHECK(write_bytes(r, m, zlen, 0));
            expect_reject(r, q, KD_EFORMAT, "flipped.idx.gz", NULL);
            /* truncated stream */
            tpath(r, sizeof r, "cut.idx.gz");
            CHECK(write_bytes(r, z, zlen * 2 / 3, 0));
            expect_reject(r, q, KD_EFORMAT, "cut.idx.gz", "gzip");
            /* only the CRC in the 8-byte trailer is wrong: data decodes fully */
            memcpy(m, z, zlen);
            m[zlen - 6] ^= 0xff;
            tpath(r, sizeof r, "bad-crc.idx.gz");
            CHECK(write_bytes(r, m, zlen, 0));
            expect_reject(r, q, KD_EFORMAT, "bad-crc.idx.gz", "gzip");
            free(m);
        }
        free(z);
        free(cpx);
    }

    TEST("dataset: specs, names, environment directory, limit") {
        char spec[1200];
        kd_dataset ds;
        snprintf(spec, sizeof spec, "idx:%s,%s", ipz, lp);
        kd_status st = kd_dataset_load(spec, &ds);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        CHECK(ds.n == N && ds.n_classes == 4);
        CHECK(strlen(ds.name) < sizeof ds.name);
        CHECK(strncmp(ds.name, spec, sizeof ds.name - 1) == 0);
        kd_dataset_limit(&ds, 0);
        CHECK(ds.n == N);
        kd_dataset_limit(&ds, N + 10);
        CHECK(ds.n == N);
        kd_dataset_limit(&ds, 2);
        CHECK(ds.n == 2 && memcmp(ds.images, px, 2 * H * W) == 0 && ds.labels[1] == lb[1]);
        kd_dataset_free(&ds);

        st = kd_dataset_load("cifar10:train", &ds);
        CHECK(st == KD_ECONFIG);
        CHECK(strstr(kd_error_message(), "cifar10:train") != NULL);
        CHECK(strstr(kd_error_message(), "fashion-mnist:test") != NULL);
        CHECK(strstr(kd_error_message(), "idx:IMAGES,LABELS") != NULL);
        CHECK(kd_dataset_load("idx:only-one-path", &ds) == KD_ECONFIG);
        CHECK(kd_dataset_load("idx:,x", &ds) == KD_ECONFIG);
        snprintf(spec, sizeof spec, "idx:%s,%s", ip, "/nonexistent/labels.idx");
        CHECK(kd_dataset_load(spec, &ds) == KD_EIO);
        CHECK(strstr(kd_error_message(), "/nonexistent/labels.idx") != NULL);

        /* KD_FASHION_MNIST_DIR with uncompressed train files (no .gz) */
        char dir[512], p[700], q[700];
        tpath(dir, sizeof dir, "fm");
        snprintf(p, sizeof p, "mkdir -p '%s'", dir);
        CHECK(system(p) == 0);
        snprintf(p, sizeof p, "%s/train-images-idx3-ubyte", dir);
        snprintf(q, sizeof q, "%s/train-labels-idx1-ubyte", dir);
        CHECK(write_images(p, N, H, W, px, 0) && write_labels(q, N, lb, 0));
        const char *old = getenv("KD_FASHION_MNIST_DIR");
        char *saved = old ? strdup(old) : NULL;
        setenv("KD_FASHION_MNIST_DIR", dir, 1);
        st = kd_dataset_load("fashion-mnist:train", &ds);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        CHECK(ds.n == N && memcmp(ds.images, px, sizeof px) == 0);
        CHECK(ds.mean == 0.2860f && ds.std == 0.3530f);
        CHECK(strcmp(ds.name, "fashion-mnist:train") == 0);
        kd_dataset_free(&ds);
        st = kd_dataset_load("fashion-mnist:test", &ds); /* no t10k files there */
        CHECK(st == KD_EIO);
        CHECK(strstr(kd_error_message(), "t10k-images-idx3-ubyte") != NULL);
        CHECK(strstr(kd_error_message(), dir) != NULL);
        if (saved) setenv("KD_FASHION_MNIST_DIR", saved, 1);
        else unsetenv("KD_FASHION_MNIST_DIR");
        free(saved);
    }

    TEST("loader: shuffle covers every example once, partial last batch") {
        enum { LN = 103, LH = 4, LW = 5, LB = 10 };
        kd_dataset ds;
        make_memory_set(&ds, LN, LH, LW);
        kd_loader_opts o = {.batch = LB, .seed = 42, .shuffle = 1};
        kd_loader *ld = kd_loader_new(&ds, &o);
        CHECK(kd_loader_batches(ld) == 11);
        float x[LB * LH * LW], y[LB];
        int aug[LB * 4], seen[LN] = {0}, sizes[12] = {0}, nb = 0, bad_content = 0, B;
        kd_loader_start_epoch(ld, 0);
        while ((B = kd_loader_next(ld, x, y, aug)) > 0 && nb < 12) {
            sizes[nb++] = B;
            for (int b = 0; b < B; b++) {
                int idx = aug[4 * b + 3];
                if (idx < 0 || idx >= LN) {
                    bad_content++;
                    continue;
                }
                seen[idx]++;
                /* the content really is example idx, with its label */
                if (decode_index(&ds, x + b * LH * LW) != idx || y[b] != (float)(idx % 7)) bad_content++;
            }
            CHECK(kd_loader_position(ld) == nb);
        }
        CHECK(nb == 11);
        CHECK(sizes[0] == 10 && sizes[9] == 10 && sizes[10] == 3);
        CHECK(kd_loader_next(ld, x, y, aug) == 0); /* stays done */
        int once = 1;
        for (int i = 0; i < LN; i++) once &= seen[i] == 1;
        CHECK(once);
        CHECK(bad_content == 0);

        /* determinism: same seed and epoch, same order; other epoch or seed differ */
        int o1[LN], o2[LN], o3[LN], o4[LN];
        kd_loader *ld2 = kd_loader_new(&ds, &o);
        CHECK(epoch_order(ld, 3, o1, LN, LB, LH * LW) == LN);
        CHECK(epoch_order(ld2, 3, o2, LN, LB, LH * LW) == LN);
        CHECK(memcmp(o1, o2, sizeof o1) == 0);
        CHECK(epoch_order(ld2, 4, o3, LN, LB, LH * LW) == LN);
        CHECK(memcmp(o1, o3, sizeof o1) != 0);
        kd_loader_opts o_seed = o;
        o_seed.seed = 43;
        kd_loader *ld3 = kd_loader_new(&ds, &o_seed);
        CHECK(epoch_order(ld3, 3, o4, LN, LB, LH * LW) == LN);
        CHECK(memcmp(o1, o4, sizeof o1) != 0);
        int ident = 1;
        for (int i = 0; i < LN; i++) ident &= o1[i] == i;
        CHECK(!ident);
        kd_loader_free(ld3);

        /* the order follows the documented recipe: Fisher-Yates from
         * kd_hash64(seed ^ kd_hash64(epoch + 1)) */
        int ref[LN], recipe_ok = 1;
        for (int e = 0; e < 10; e++) { /* several epochs: every swap matters */
            for (int i = 0; i < LN; i++) ref[i] = i;
            kd_rng r;
            kd_rng_seed(&r, kd_hash64(42 ^ kd_hash64((uint64_t)e + 1)));
            for (int i = LN - 1; i > 0; i--) {
                int j = (int)kd_rng_below(&r, (uint32_t)i + 1), t = ref[i];
                ref[i] = ref[j];
                ref[j] = t;
            }
            CHECK(epoch_order(ld2, e, o3, LN, LB, LH * LW) == LN);
            recipe_ok &= memcmp(o3, ref, sizeof ref) == 0;
        }
        CHECK(recipe_ok);

        /* no shuffle: identity in every epoch */
        kd_loader_opts o_plain = {.batch = 7, .seed = 42, .shuffle = 0};
        kd_loader *lp0 = kd_loader_new(&ds, &o_plain);
        CHECK(epoch_order(lp0, 5, o4, LN, 7, LH * LW) == LN);
        ident = 1;
        for (int i = 0; i < LN; i++) ident &= o4[i] == i;
        CHECK(ident);
        kd_loader_free(lp0);

        /* seek: resuming at batch 4 gives the same batch as running to it */
        float xa[LB * LH * LW], ya[LB], xb[LB * LH * LW], yb[LB];
        kd_loader_start_epoch(ld, 2);
        for (int i = 0; i < 4; i++) kd_loader_next(ld, xa, ya, NULL);
        CHECK(kd_loader_position(ld) == 4);
        int na = kd_loader_next(ld, xa, ya, NULL);
        kd_loader_start_epoch(ld2, 2);
        kd_loader_seek(ld2, 4);
        CHECK(kd_loader_position(ld2) == 4);
        int nbb = kd_loader_next(ld2, xb, yb, NULL);
        CHECK(na == LB && nbb == LB);
        CHECK(memcmp(xa, xb, sizeof xa) == 0 && memcmp(ya, yb, sizeof ya) == 0);
        kd_loader_seek(ld2, kd_loader_batches(ld2));
        CHECK(kd_loader_next(ld2, xb, yb, NULL) == 0);
        kd_loader_free(ld);
        kd_loader_free(ld2);
        kd_dataset_free(&ds);
    }

    TEST("loader: normalisation is (v/255 - mean)/std exactly") {
        kd_dataset ds;
        memset(&ds, 0, sizeof ds);
        ds.n = 1;
        ds.c = 1;
        ds.h = 16;
        ds.w = 16;
        ds.images = malloc(256);
        ds.labels = calloc(1, 1);
        for (int v = 0; v < 256; v++) ds.images[v] = (uint8_t)v;
        ds.mean = 0.5f;
        ds.std = 0.25f;
        kd_loader_opts o = {.batch = 4, .seed = 1};
        kd_loader *ld = kd_loader_new(&ds, &o);
        float x[4 * 256], y[4];
        CHECK(kd_loader_next(ld, x, y, NULL) == 1);
        CHECK(x[0] == -2.0f);  /* (0 - 0.5) / 0.25 */
        CHECK(x[255] == 2.0f); /* (1 - 0.5) / 0.25 */
        CHECK_CLOSE(x[51], (51.0 / 255.0 - 0.5) / 0.25, 1e-6, 0); /* 51/255 = 0.2: -1.2 */
        CHECK_CLOSE(x[51], -1.2, 1e-6, 0);
        int worst = 0;
        for (int v = 0; v < 256; v++)
            if (fabs(x[v] - ((double)v / 255.0 - 0.5) / 0.25) > 1e-6) worst++;
        CHECK(worst == 0);
        kd_loader_free(ld);
        kd_dataset_free(&ds);
    }

    TEST("loader: flip reverses columns, crop shifts by the reported offsets") {
        enum { AN = 200, AH = 5, AW = 7, P = 2 };
        kd_dataset ds;
        make_memory_set(&ds, AN, AH, AW);
        float *x = malloc(sizeof(float) * AN * AH * AW), y[AN];
        int aug[AN * 4];

        /* flip only */
        kd_loader_opts of = {.batch = AN, .seed = 7, .shuffle = 1, .flip = 1};
        kd_loader *ld = kd_loader_new(&ds, &of);
        CHECK(kd_loader_next(ld, x, y, aug) == AN);
        int flips = 0, bad = 0, bad_aug = 0;
        for (int b = 0; b < AN; b++) {
            int dx = aug[4 * b], dy = aug[4 * b + 1], f = aug[4 * b + 2], idx = aug[4 * b + 3];
            if (dx != 0 || dy != 0 || (f != 0 && f != 1) || idx < 0 || idx >= AN) {
                bad_aug++;
                continue;
            }
            flips += f;
            const uint8_t *src = ds.images + (size_t)idx * AH * AW;
            for (int r = 0; r < AH; r++)
                for (int c = 0; c < AW; c++)
                    if (x[(size_t)b * AH * AW + r * AW + c] != norm(&ds, src[r * AW + (f ? AW - 1 - c : c)])) bad++;
        }
        CHECK(bad_aug == 0);
        CHECK(bad == 0);
        CHECK_MSG(flips > AN / 4 && flips < 3 * AN / 4, "%d of %d flipped", flips, AN);
        kd_loader_free(ld);

        /* crop (and crop + flip): content moves by the offsets, zeros fill */
        for (int with_flip = 0; with_flip < 2; with_flip++) {
            kd_loader_opts oc = {.batch = AN, .seed = 9, .shuffle = 1, .crop_pad = P, .flip = with_flip};
            ld = kd_loader_new(&ds, &oc);
            kd_loader_start_epoch(ld, 1);
            CHECK(kd_loader_next(ld, x, y, aug) == AN);
            int hist_dx[2 * P + 1] = {0}, hist_dy[2 * P + 1] = {0}, pads = 0;
            bad = bad_aug = flips = 0;
            for (int b = 0; b < AN; b++) {
                int dx = aug[4 * b], dy = aug[4 * b + 1], f = aug[4 * b + 2], idx = aug[4 * b + 3];
                if (dx < 0 || dx > 2 * P || dy < 0 || dy > 2 * P || f < 0 || f > with_flip || idx < 0 || idx >= AN) {
                    bad_aug++;
                    continue;
                }
                hist_dx[dx]++;
                hist_dy[dy]++;
                flips += f;
                const uint8_t *src = ds.images + (size_t)idx * AH * AW;
                for (int r = 0; r < AH; r++)
                    for (int c = 0; c < AW; c++) {
                        int cc = f ? AW - 1 - c : c;     /* column before the flip */
                        int sr = r + dy - P, sc = cc + dx - P; /* padded -> source */
                        int v = (sr >= 0 && sr < AH && sc >= 0 && sc < AW) ? src[sr * AW + sc] : 0;
                        pads += v == 0;
                        if (x[(size_t)b * AH * AW + r * AW + c] != norm(&ds, v)) bad++;
                    }
            }
            CHECK(bad_aug == 0);
            CHECK(bad == 0);
            int all = 1;
            for (int k = 0; k <= 2 * P; k++) all &= hist_dx[k] > 0 && hist_dy[k] > 0;
            CHECK(all); /* every offset, the extremes included, occurs */
            CHECK(pads > 0); /* some padding was actually exercised */
            if (with_flip) CHECK(flips > AN / 4 && flips < 3 * AN / 4);
            kd_loader_free(ld);
        }
        /* the zero-padding value is the normalised 0: check one fully known case */
        {
            kd_loader_opts oc = {.batch = AN, .seed = 9, .shuffle = 0, .crop_pad = P};
            ld = kd_loader_new(&ds, &oc);
            CHECK(kd_loader_next(ld, x, y, aug) == AN);
            int found = 0;
            for (int b = 0; b < AN && !found; b++)
                if (aug[4 * b] == 0 && aug[4 * b + 1] == 0) { /* shifted down-right by P */
                    found = 1;
                    const float *e = x + (size_t)b * AH * AW;
                    CHECK(e[0] == norm(&ds, 0) && e[(P - 1) * AW + AW - 1] == norm(&ds, 0));
                    CHECK(e[P * AW + P] == norm(&ds, ds.images[(size_t)b * AH * AW]));
                    CHECK(norm(&ds, 0) == (0.0f - 0.25f) / 0.5f);
                }
            CHECK(found);
            kd_loader_free(ld);
        }
        free(x);
        kd_dataset_free(&ds);
    }

    TEST("loader: augmentation reproducible, independent of batching and threads") {
        enum { RN = 97, RH = 6, RW = 6 };
        kd_dataset ds;
        make_memory_set(&ds, RN, RH, RW);
        kd_loader_opts o = {.batch = 10, .seed = 123, .shuffle = 1, .crop_pad = 2, .flip = 1};
        kd_loader_opts o13 = o;
        o13.batch = 13;
        kd_loader_opts o_other = o;
        o_other.seed = 124;
        /* per dataset index: the aug record and the produced view */
        static int rec[5][RN][4];
        static float view[5][RN][RH * RW];
        const kd_loader_opts *opts[5] = {&o, &o, &o13, &o_other, &o};
        for (int run = 0; run < 5; run++) {
#ifdef _OPENMP
            int saved_threads = omp_get_max_threads();
            omp_set_num_threads(run == 1 ? 1 : 4); /* run 0 vs 1: threads differ only */
#endif
            kd_loader *ld = kd_loader_new(&ds, opts[run]);
            kd_loader_start_epoch(ld, run == 4 ? 6 : 5); /* run 4: the next epoch */
            float x[13 * RH * RW], y[13];
            int aug[13 * 4], B;
            while ((B = kd_loader_next(ld, x, y, aug)) > 0)
                for (int b = 0; b < B; b++) {
                    int idx = aug[4 * b + 3];
                    KD_ASSERT(idx >= 0 && idx < RN, "index %d", idx);
                    memcpy(rec[run][idx], aug + 4 * b, sizeof rec[run][idx]);
                    memcpy(view[run][idx], x + b * RH * RW, sizeof view[run][idx]);
                }
            kd_loader_free(ld);
#ifdef _OPENMP
            omp_set_num_threads(saved_threads);
#endif
        }
        CHECK(memcmp(rec[0], rec[1], sizeof rec[0]) == 0);
        CHECK(memcmp(view[0], view[1], sizeof view[0]) == 0);
        CHECK(memcmp(rec[0], rec[2], sizeof rec[0]) == 0); /* batch 10 vs 13 */
        CHECK(memcmp(view[0], view[2], sizeof view[0]) == 0);
        CHECK(memcmp(rec[0], rec[3], sizeof rec[0]) != 0); /* another seed */
        CHECK(memcmp(rec[0], rec[4], sizeof rec[0]) != 0); /* another epoch */
        int moved = 0; /* the views really are augmented */
        for (int i = 0; i < RN; i++) moved += rec[0][i][0] != 2 || rec[0][i][1] != 2 || rec[0][i][2] != 0;
        CHECK(moved > RN / 2);
        kd_dataset_free(&ds);
    }

    TEST("fashion-mnist: the installed test and train sets load") {
        const char *old = getenv("KD_FASHION_MNIST_DIR");
        char *saved = old ? strdup(old) : NULL;
        unsetenv("KD_FASHION_MNIST_DIR"); /* the default directory */
        const char *specs[2] = {"fashion-mnist:test", "fashion-mnist:train"};
        const int counts[2] = {10000, 60000};
        for (int s = 0; s < 2; s++) {
            kd_dataset ds;
            kd_status st = kd_dataset_load(specs[s], &ds);
            CHECK_MSG(st == KD_OK, "Fashion-MNIST must be installed: %s", kd_error_message());
            if (st != KD_OK) continue;
            CHECK(ds.n == counts[s] && ds.c == 1 && ds.h == 28 && ds.w == 28);
            CHECK(ds.n_classes == 10);
            int per[256] = {0}, even = 1;
            for (int i = 0; i < ds.n; i++) per[ds.labels[i]]++;
            for (int k = 0; k < 10; k++) even &= per[k] == counts[s] / 10;
            CHECK(even);
            CHECK(ds.mean == 0.2860f && ds.std == 0.3530f);
            CHECK(strcmp(ds.name, specs[s]) == 0);
            /* the published statistics agree with the pixels */
            double sum = 0;
            size_t np = (size_t)ds.n * 28 * 28;
            for (size_t i = 0; i < np; i++) sum += ds.images[i] / 255.0;
            CHECK_CLOSE(sum / np, 0.2860, 0.002, 0);
            kd_dataset_free(&ds);
        }
        if (saved) setenv("KD_FASHION_MNIST_DIR", saved, 1);
        free(saved);
    }
}
