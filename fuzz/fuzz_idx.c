/* fuzz_idx.c - libFuzzer harness for IDX datasets, plain and gzip.
 *
 * Input layout: byte 0 flags, bytes 1-2 the little-endian length L of the
 * label file (cut to what is there), L bytes of label file, then the image
 * file. Flag bit 0 gzips the image file and bit 1 the label file before
 * loading (zlib, level 1), so the fuzzer reaches the parser through valid
 * gzip streams as well as through raw bytes, which may themselves be gzip
 * (seeds include compressed files, so corrupt streams are reached too).
 * Both files are in-memory files loaded with kd_dataset_load("idx:A,B").
 * Invariants of an accepted pair: geometry and class count in range, finite
 * mean and positive std, and one epoch of the loader (crop, flip, shuffle)
 * gives finite pixels and valid labels.
 */
#include <math.h>
#include <zlib.h>

#include "fuzz.h"
#include "kd_data.h"

static fz_file img, lab;
static char spec[160];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_file_init(&img, "images");
    fz_file_init(&lab, "labels");
    snprintf(spec, sizeof spec, "idx:%s,%s", img.path, lab.path);
    return 0;
}

static void put(fz_file *f, const uint8_t *data, size_t n, int gzip) {
    if (!gzip) {
        fz_file_set(f, data, n);
        return;
    }
    fz_file_set(f, NULL, 0);
    int fd = dup(f->fd);
    FZ_CHECK(fd >= 0 && lseek(fd, 0, SEEK_SET) == 0, "dup");
    gzFile gz = gzdopen(fd, "wb1");
    FZ_CHECK(gz, "gzdopen");
    FZ_CHECK(n == 0 || gzwrite(gz, data, (unsigned)n) == (int)n, "gzwrite");
    FZ_CHECK(gzclose(gz) == Z_OK, "gzclose");
}

static void check_dataset(const kd_dataset *ds) {
    FZ_CHECK(ds->n >= 1 && ds->c == 1 && ds->h >= 1 && ds->w >= 1, "geometry n %d c %d h %d w %d", ds->n, ds->c, ds->h,
             ds->w);
    FZ_CHECK(ds->n_classes >= 1 && ds->n_classes <= 256, "%d classes", ds->n_classes);
    FZ_CHECK(isfinite(ds->mean) && ds->mean >= 0 && ds->mean <= 1 && isfinite(ds->std) && ds->std > 0, "mean %g std %g",
             (double)ds->mean, (double)ds->std);
    FZ_CHECK(strncmp(ds->name, "idx:", 4) == 0, "name '%s'", ds->name);
    int max = 0;
    for (int i = 0; i < ds->n; i++) max = ds->labels[i] > max ? ds->labels[i] : max;
    FZ_CHECK(max + 1 == ds->n_classes, "largest label %d, %d classes", max, ds->n_classes);

    kd_loader_opts o = {.batch = 3, .seed = 1, .shuffle = 1, .crop_pad = 2, .flip = 1};
    kd_loader *ld = kd_loader_new(ds, &o);
    size_t hw = (size_t)ds->h * ds->w;
    float *x = malloc(3 * hw * sizeof(float)), y[3];
    int aug[12], seen = 0, B;
    if (!x) abort();
    kd_loader_start_epoch(ld, 0);
    while ((B = kd_loader_next(ld, x, y, aug)) > 0) {
        FZ_CHECK(B <= 3, "batch of %d", B);
        for (int b = 0; b < B; b++) {
            FZ_CHECK(y[b] >= 0 && y[b] < ds->n_classes && aug[4 * b + 3] >= 0 && aug[4 * b + 3] < ds->n,
                     "label %g index %d", (double)y[b], aug[4 * b + 3]);
            FZ_CHECK(aug[4 * b] >= 0 && aug[4 * b] <= 4 && aug[4 * b + 1] >= 0 && aug[4 * b + 1] <= 4 &&
                         (aug[4 * b + 2] == 0 || aug[4 * b + 2] == 1),
                     "view %d %d %d", aug[4 * b], aug[4 * b + 1], aug[4 * b + 2]);
        }
        for (size_t i = 0; i < (size_t)B * hw; i++) FZ_CHECK(isfinite(x[i]), "pixel %zu = %g", i, (double)x[i]);
        seen += B;
    }
    FZ_CHECK(seen == ds->n, "an epoch gave %d of %d examples", seen, ds->n);
    free(x);
    kd_loader_free(ld);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 3 || size > 1 << 17) return 0;
    int flags = data[0];
    size_t L = (size_t)data[1] | (size_t)data[2] << 8;
    data += 3, size -= 3;
    if (L > size) L = size;
    put(&lab, data, L, flags & 2);
    put(&img, data + L, size - L, flags & 1);
    kd_dataset ds;
    kd_status s = kd_dataset_load(spec, &ds);
    FZ_CHECK(s == KD_OK || s == KD_EFORMAT, "status %d: %s", (int)s, kd_error_message());
    if (s == KD_OK) {
        check_dataset(&ds);
        kd_dataset_free(&ds);
    } else {
        FZ_CHECK(ds.images == NULL && ds.labels == NULL, "a failed load left data behind");
    }
    return 0;
}
