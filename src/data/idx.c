/* idx.c - IDX image/label files (the MNIST family) and dataset specs.
 *
 * Reads an IDX uint8 image file (magic 0x00000803, big-endian dims n, h, w)
 * and its label file (magic 0x00000801, dim n), plain or gzip, through zlib
 * (gzread passes plain files through unchanged, so the format is detected by
 * content, not by the file name). Every file is treated as hostile: the
 * header is bounded before anything is allocated, the payload buffer grows
 * with the bytes actually read (a lying header cannot make us allocate 2 GB
 * for a 1 kB file), short payloads, trailing bytes and gzip errors (bad
 * deflate data, CRC mismatch, truncated stream) are all errors that name the
 * file and say what was expected.
 *
 * Deliberately not here: other IDX dtypes (int8/int16/float), more than one
 * channel, CSV or text datasets, and writing IDX files.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "kd_data.h"

#define IDX_MAGIC_IMAGES 0x00000803u
#define IDX_MAGIC_LABELS 0x00000801u
/* Upper bound on a payload (n x h x w bytes): indices stay in int range. */
#define IDX_MAX_BYTES ((uint64_t)INT32_MAX)
#define FASHION_DEFAULT_DIR "/usr/share/datasets/fashion-mnist"
#define FASHION_MEAN 0.2860f
#define FASHION_STD 0.3530f

/* Reads up to len bytes; *got receives how many arrived. Returns 0 when the
 * read ended normally (all bytes, or a clean end of file), -1 when zlib or
 * the OS reported an error (read with gzerror). */
static int gz_fill(gzFile gz, uint8_t *buf, size_t len, size_t *got) {
    *got = 0;
    while (*got < len) {
        size_t left = len - *got;
        /* modest chunks: a failing gzread discards its chunk, so this bounds
         * how vague "near payload byte N" can be in an error message */
        unsigned chunk = left > (1u << 16) ? (1u << 16) : (unsigned)left;
        int r = gzread(gz, buf + *got, chunk);
        if (r < 0) return -1;
        if (r == 0) break;
        *got += (size_t)r;
    }
    int errnum = Z_OK;
    gzerror(gz, &errnum);
    /* a truncated gzip stream returns its partial data with Z_BUF_ERROR set */
    return errnum == Z_OK ? 0 : -1;
}

/* Turns the gzFile's pending error into a kd_status naming the file; where
 * (may be "") says how far the read got. zlib decodes ahead, so a bad CRC or
 * a cut stream can surface on the very first read of a small file. */
static kd_status gz_fail(gzFile gz, const char *path, const char *where) {
    int saved_errno = errno;
    int errnum = Z_OK;
    const char *msg = gzerror(gz, &errnum);
    if (errnum == Z_ERRNO) return kd_errorf(KD_EIO, "%s: read error: %s%s", path, strerror(saved_errno), where);
    if (!msg || !*msg) msg = "unknown zlib error";
    size_t k = strlen(path); /* zlib prefixes its message with the path */
    if (strncmp(msg, path, k) == 0 && msg[k] == ':') msg += k + 1 + (msg[k + 1] == ' ');
    return kd_errorf(KD_EFORMAT, "%s: corrupt or truncated gzip stream: %s%s", path, msg, where);
}

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* Reads one IDX uint8 file with the given magic and ndim dims into a fresh
 * buffer of prod(dims) bytes. On error nothing is left allocated. */
static kd_status idx_read(const char *path, uint32_t magic_want, int ndim, int *dims, uint8_t **data) {
    *data = NULL;
    const char *kind = magic_want == IDX_MAGIC_IMAGES ? "IDX uint8 images, 3 dims" : "IDX uint8 labels, 1 dim";
    errno = 0;
    gzFile gz = gzopen(path, "rb");
    if (!gz)
        return kd_errorf(KD_EIO, "%s: cannot open: %s", path, errno ? strerror(errno) : "out of memory in zlib");
    (void)gzbuffer(gz, 1u << 17); /* fails only after reading has begun */

    kd_status st = KD_OK;
    uint8_t head[4 + 4 * 3];
    size_t head_len = 4 + 4 * (size_t)ndim, got = 0;
    uint8_t *buf = NULL;

    if (gz_fill(gz, head, 4, &got) != 0) {
        st = gz_fail(gz, path, "");
        goto done;
    }
    if (got < 4) {
        st = kd_errorf(KD_EFORMAT, "%s: truncated header: expected %zu bytes (%s), got %zu", path, head_len, kind,
                       got);
        goto done;
    }
    uint32_t magic = be32(head);
    if (magic != magic_want) {
        const char *hint = "";
        if (magic == IDX_MAGIC_LABELS) hint = " (this looks like a label file)";
        if (magic == IDX_MAGIC_IMAGES) hint = " (this looks like an image file)";
        if (magic == 0x1f8b0800u || (magic >> 16) == 0x1f8bu) hint = " (gzip data inside gzip?)";
        st = kd_errorf(KD_EFORMAT, "%s: wrong magic 0x%08x, expected 0x%08x (%s)%s", path, magic, magic_want, kind,
                       hint);
        goto done;
    }
    if (gz_fill(gz, head + 4, head_len - 4, &got) != 0) {
        st = gz_fail(gz, path, "");
        goto done;
    }
    if (got < head_len - 4) {
        st = kd_errorf(KD_EFORMAT, "%s: truncated header: expected %zu bytes (%s), got %zu", path, head_len, kind,
                       4 + got);
        goto done;
    }
    uint64_t total = 1;
    for (int i = 0; i < ndim; i++) {
        uint32_t d = be32(head + 4 + 4 * i);
        if (d == 0) {
            static const char *const dim_names[3] = {"count", "rows", "columns"};
            st = kd_errorf(KD_EFORMAT, "%s: dimension %d (%s) is 0 (an empty dataset is not usable)", path, i,
                           dim_names[i]);
            goto done;
        }
        total *= d; /* < 2^31 * 2^32 before the check: no overflow */
        if (total > IDX_MAX_BYTES) {
            st = kd_errorf(KD_EFORMAT, "%s: absurd dimensions: the product of the first %d dims exceeds %llu bytes",
                           path, i + 1, (unsigned long long)IDX_MAX_BYTES);
            goto done;
        }
        dims[i] = (int)d;
    }

    /* Grow the buffer as the data arrives so a lying header costs nothing. */
    size_t cap = total < (1u << 20) ? (size_t)total : (1u << 20), have = 0;
    buf = kd_malloc(cap);
    for (;;) {
        if (gz_fill(gz, buf + have, cap - have, &got) != 0) {
            char where[96];
            snprintf(where, sizeof where, " (near payload byte %zu of %llu)", have + got,
                     (unsigned long long)total);
            st = gz_fail(gz, path, where);
            goto done;
        }
        have += got;
        if (have < cap || cap == total) break; /* end of file, or all we need */
        cap = cap * 2 < total ? cap * 2 : (size_t)total;
        buf = kd_realloc(buf, cap);
    }
    if (have < total) {
        st = kd_errorf(KD_EFORMAT, "%s: truncated payload: expected %llu bytes after the %zu-byte header, got %zu", path,
                       (unsigned long long)total, head_len, have);
        goto done;
    }

    /* Nothing may follow the payload. Reading on also makes zlib check the
     * gzip trailer (CRC and length), which it does only at the stream end. */
    uint8_t extra[4096];
    uint64_t n_extra = 0;
    for (;;) {
        if (gz_fill(gz, extra, sizeof extra, &got) != 0) {
            st = gz_fail(gz, path, " (after the payload)");
            goto done;
        }
        n_extra += got;
        if (got < sizeof extra || n_extra >= (1u << 24)) break;
    }
    if (n_extra) {
        st = kd_errorf(KD_EFORMAT, "%s: %s%llu trailing bytes after the %llu-byte payload (%s)", path,
                       n_extra >= (1u << 24) ? "at least " : "", (unsigned long long)n_extra,
                       (unsigned long long)total, kind);
        goto done;
    }
    *data = buf;
    buf = NULL;

done:
    free(buf);
    (void)gzclose(gz); /* closing a file opened for reading cannot lose data */
    return st;
}

/* Copies src into a fixed buffer, always terminated, cut if too long. */
static void copy_name(char *dst, size_t n, const char *src) {
    size_t k = strlen(src);
    if (k >= n) k = n - 1;
    memcpy(dst, src, k);
    dst[k] = '\0';
}

kd_status kd_idx_load(const char *images_path, const char *labels_path, kd_dataset *out) {
    memset(out, 0, sizeof *out);
    int idims[3] = {0}, ldims[1] = {0};
    uint8_t *images = NULL, *labels = NULL;
    kd_status st = idx_read(images_path, IDX_MAGIC_IMAGES, 3, idims, &images);
    if (st != KD_OK) return st;
    st = idx_read(labels_path, IDX_MAGIC_LABELS, 1, ldims, &labels);
    if (st != KD_OK) {
        free(images);
        return st;
    }
    if (ldims[0] != idims[0]) {
        free(images);
        free(labels);
        return kd_errorf(KD_EFORMAT, "label count does not match image count: %s has %d labels, %s has %d images",
                         labels_path, ldims[0], images_path, idims[0]);
    }
    int n = idims[0];
    out->n = n;
    out->c = 1;
    out->h = idims[1];
    out->w = idims[2];
    out->images = images;
    out->labels = labels;
    int maxl = 0;
    for (int i = 0; i < n; i++)
        if (labels[i] > maxl) maxl = labels[i];
    out->n_classes = maxl + 1;

    /* mean/std of pixel/255 over every pixel of the set (population std),
     * from an exact integer histogram: no summation-order effects */
    size_t total = (size_t)n * (size_t)out->h * (size_t)out->w;
    uint64_t hist[256] = {0};
    for (size_t i = 0; i < total; i++) hist[images[i]]++;
    double s = 0, ss = 0;
    for (int v = 0; v < 256; v++) s += (double)hist[v] * (v / 255.0);
    double mean = s / (double)total;
    for (int v = 0; v < 256; v++) ss += (double)hist[v] * (v / 255.0 - mean) * (v / 255.0 - mean);
    double var = ss / (double)total;
    out->mean = (float)mean;
    /* a constant image set has std 0; 1 keeps the normalisation finite */
    out->std = var > 1e-12 ? (float)sqrt(var) : 1.0f;
    char name[sizeof out->name + 8];
    snprintf(name, sizeof name, "idx:%.60s", images_path);
    copy_name(out->name, sizeof out->name, name);
    return KD_OK;
}

/* DIR/BASE.gz if it exists, else DIR/BASE if that exists, else DIR/BASE.gz
 * (so the error names the canonical file). */
static void fashion_path(char *buf, size_t n, const char *dir, const char *base) {
    snprintf(buf, n, "%s/%s", dir, base);
    if (access(buf, F_OK) == 0) return;
    size_t k = strlen(buf);
    if (k > 3 && strcmp(buf + k - 3, ".gz") == 0) {
        buf[k - 3] = '\0';
        if (access(buf, F_OK) == 0) return;
        buf[k - 3] = '.';
    }
}

kd_status kd_dataset_load(const char *spec, kd_dataset *out) {
    memset(out, 0, sizeof *out);
    static const char accepted[] = "accepted: fashion-mnist:train, fashion-mnist:test, idx:IMAGES,LABELS";
    if (!spec) return kd_errorf(KD_ECONFIG, "no dataset given (%s)", accepted);

    if (strcmp(spec, "fashion-mnist:train") == 0 || strcmp(spec, "fashion-mnist:test") == 0) {
        const char *dir = getenv("KD_FASHION_MNIST_DIR");
        if (!dir || !*dir) dir = FASHION_DEFAULT_DIR;
        const char *prefix = strcmp(spec, "fashion-mnist:train") == 0 ? "train" : "t10k";
        char base[64], ipath[4096], lpath[4096];
        snprintf(base, sizeof base, "%s-images-idx3-ubyte.gz", prefix);
        fashion_path(ipath, sizeof ipath, dir, base);
        snprintf(base, sizeof base, "%s-labels-idx1-ubyte.gz", prefix);
        fashion_path(lpath, sizeof lpath, dir, base);
        kd_status st = kd_idx_load(ipath, lpath, out);
        if (st != KD_OK) {
            if (st == KD_EIO)
                kd_error_prefix(st, "%s (directory %s; set KD_FASHION_MNIST_DIR to change it)", spec, dir);
            else
                kd_error_prefix(st, "%s", spec);
            return st;
        }
        out->mean = FASHION_MEAN;
        out->std = FASHION_STD;
        copy_name(out->name, sizeof out->name, spec);
        return KD_OK;
    }

    if (strncmp(spec, "idx:", 4) == 0) {
        const char *rest = spec + 4, *comma = strchr(rest, ',');
        if (!comma || comma == rest || comma[1] == '\0')
            return kd_errorf(KD_ECONFIG, "dataset '%s': expected idx:IMAGES,LABELS (two paths separated by a comma)",
                             spec);
        size_t k = (size_t)(comma - rest);
        char *ipath = kd_malloc(k + 1);
        memcpy(ipath, rest, k);
        ipath[k] = '\0';
        kd_status st = kd_idx_load(ipath, comma + 1, out);
        free(ipath);
        if (st != KD_OK) return kd_error_prefix(st, "%s", spec);
        copy_name(out->name, sizeof out->name, spec);
        return KD_OK;
    }

    return kd_errorf(KD_ECONFIG, "unknown dataset '%s' (%s)", spec, accepted);
}

void kd_dataset_free(kd_dataset *ds) {
    if (!ds) return;
    free(ds->images);
    free(ds->labels);
    memset(ds, 0, sizeof *ds);
}

void kd_dataset_limit(kd_dataset *ds, int n) {
    /* The buffers keep their size; only the count shrinks. n_classes stays:
     * it describes the label space, not the labels that happen to remain. */
    if (n <= 0 || n >= ds->n) return;
    ds->n = n;
}

kd_status kd_dataset_relabel(kd_dataset *ds, const int *map, int n_map) {
    if (n_map < ds->n_classes)
        return kd_errorf(KD_ECONFIG, "%s: label map has %d entries for %d classes", ds->name, n_map, ds->n_classes);
    int k = 0;
    for (int i = 0; i < n_map; i++) {
        if (map[i] < 0 || map[i] > 255)
            return kd_errorf(KD_ECONFIG, "%s: label map entry %d is %d (must be in 0..255)", ds->name, i, map[i]);
        if (map[i] + 1 > k) k = map[i] + 1;
    }
    /* every label in 0..k-1 must be the image of some class */
    for (int c = 0; c < k; c++) {
        int hit = 0;
        for (int i = 0; i < n_map && !hit; i++) hit = map[i] == c;
        if (!hit) return kd_errorf(KD_ECONFIG, "%s: label map never produces class %d (labels must be 0..%d)", ds->name, c, k - 1);
    }
    for (int i = 0; i < ds->n; i++) ds->labels[i] = (uint8_t)map[ds->labels[i]];
    ds->n_classes = k;
    return KD_OK;
}

kd_status kd_label_map_parse(const char *s, int *map, int cap, int *n) {
    *n = 0;
    const char *p = s;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '\t') p++;
        if (!*p) break;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || (*end && *end != ' ' && *end != ',' && *end != '\t'))
            return kd_errorf(KD_ECONFIG, "label map '%s': '%.16s' is not an integer", s, p);
        if (*n >= cap) return kd_errorf(KD_ECONFIG, "label map '%s': more than %d entries", s, cap);
        if (v < 0 || v > 255) return kd_errorf(KD_ECONFIG, "label map '%s': %ld is out of range 0..255", s, v);
        map[(*n)++] = (int)v;
        p = end;
    }
    return KD_OK;
}
