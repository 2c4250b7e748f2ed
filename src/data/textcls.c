/* textcls.c - a text-classification dataset from fortune files: each file
 * is a class, its entries (between lines holding only "%") are the
 * documents, as bytes cut to T tokens and padded with 0 (a mask marks the
 * real ones). The train/test split is by a hash of each document's bytes
 * (as src/data/text.c does for validation), so it does not depend on file
 * order and a document repeated in two files lands in one split both times.
 *
 * Deliberately not here: tokenizers other than bytes, blank-line separated
 * files, class balancing (the per-class counts are reported instead).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kd_text.h"
#include "kd_textcls.h"

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static int blank_line(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r' && p[i] != '\v' && p[i] != '\f') return 0;
    return 1;
}

static int sep_line(const uint8_t *p, size_t n) { return (n == 1 && p[0] == '%') || (n == 2 && p[0] == '%' && p[1] == '\r'); }

typedef struct growing {
    uint8_t *tok;
    int *len, *label;
    int n, cap;
} growing;

static void push(growing *g, int T, const uint8_t *p, size_t n, int label) {
    if (g->n == g->cap) {
        g->cap = g->cap ? 2 * g->cap : 256;
        g->tok = kd_realloc(g->tok, (size_t)g->cap * T);
        g->len = kd_realloc(g->len, (size_t)g->cap * sizeof *g->len);
        g->label = kd_realloc(g->label, (size_t)g->cap * sizeof *g->label);
    }
    int L = n < (size_t)T ? (int)n : T;
    uint8_t *dst = g->tok + (size_t)g->n * T;
    memcpy(dst, p, (size_t)L);
    memset(dst + L, 0, (size_t)(T - L));
    g->len[g->n] = L;
    g->label[g->n] = label;
    g->n++;
}

/* one document p[0..n): trims blank lines at both ends and the final line
 * break; returns 1 when something is left (in *a, *b) */
static int trim_doc(const uint8_t *p, size_t n, size_t *a, size_t *b) {
    size_t s = 0, e = n;
    while (s < e) { /* leading blank lines */
        const uint8_t *nl = memchr(p + s, '\n', e - s);
        size_t le = nl ? (size_t)(nl - p) : e;
        if (!blank_line(p + s, le - s) || !nl) break;
        s = le + 1;
    }
    while (e > s) { /* trailing line breaks and blank lines */
        if (p[e - 1] == '\n') {
            e--;
            continue;
        }
        size_t ls = e;
        while (ls > s && p[ls - 1] != '\n') ls--;
        if (blank_line(p + ls, e - ls))
            e = ls;
        else
            break;
    }
    *a = s;
    *b = e;
    return e > s;
}

static kd_status read_file(const char *path, uint8_t **buf, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return kd_errorf(KD_EIO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    uint8_t *b = kd_malloc(cap);
    size_t r;
    while ((r = fread(b + len, 1, cap - len, f)) > 0) {
        len += r;
        if (len == cap) b = kd_realloc(b, cap *= 2);
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b);
        return kd_errorf(KD_EIO, "%s: read error", path);
    }
    *buf = b;
    *n = len;
    return KD_OK;
}

kd_status kd_textcls_load(kd_textcls_data *d, const char *spec, int T, float test_frac) {
    memset(d, 0, sizeof *d);
    if (strncmp(spec, "textcls:", 8) != 0 || !spec[8])
        return kd_errorf(KD_ECONFIG, "data '%s': expected textcls:FILE,FILE,... (fortune files, one per class)", spec);
    if (T < 1 || T > 65536) return kd_errorf(KD_ECONFIG, "data '%s': sequence length %d not in [1, 65536]", spec, T);
    if (!(test_frac >= 0.0f && test_frac <= 0.9f))
        return kd_errorf(KD_ECONFIG, "data '%s': test fraction %g not in [0, 0.9]", spec, (double)test_frac);
    snprintf(d->name, sizeof d->name, "%s", spec);
    d->T = T;
    const char *dir = getenv("KD_TEXT_DIR");
    if (!dir || !*dir) dir = KD_TEXT_DEFAULT_DIR;
    growing sp[2];
    memset(sp, 0, sizeof sp);
    kd_status st = KD_OK;
    const char *p = spec + 8;
    int total_docs = 0;
    while (st == KD_OK && *p) {
        const char *comma = strchr(p, ',');
        size_t L = comma ? (size_t)(comma - p) : strlen(p);
        if (L == 0 || L >= sizeof d->names[0]) {
            st = kd_errorf(KD_ECONFIG, "data '%s': empty or over-long file name in the list", spec);
            break;
        }
        if (d->n_classes == KD_TEXTCLS_MAX_CLASSES) {
            st = kd_errorf(KD_ECONFIG, "data '%s': more than %d classes", spec, KD_TEXTCLS_MAX_CLASSES);
            break;
        }
        char name[64], path[4200];
        memcpy(name, p, L);
        name[L] = '\0';
        for (int c = 0; c < d->n_classes && st == KD_OK; c++)
            if (strcmp(d->names[c], name) == 0) st = kd_errorf(KD_ECONFIG, "data '%s': '%s' listed twice", spec, name);
        if (st != KD_OK) break;
        if (strchr(name, '/'))
            snprintf(path, sizeof path, "%s", name);
        else
            snprintf(path, sizeof path, "%s/%s", dir, name);
        int cls = d->n_classes;
        snprintf(d->names[d->n_classes++], sizeof d->names[0], "%s", name);
        uint8_t *buf = NULL;
        size_t n = 0;
        st = read_file(path, &buf, &n);
        if (st != KD_OK) break;
        int docs = 0;
        size_t s = 0;
        while (s < n) { /* line by line; a "%" line ends a document */
            size_t ds = s, e = s;
            for (;;) {
                const uint8_t *nl = memchr(buf + e, '\n', n - e);
                size_t le = nl ? (size_t)(nl - buf) : n;
                if (sep_line(buf + e, le - e)) {
                    s = nl ? le + 1 : n;
                    break;
                }
                e = nl ? le + 1 : n;
                if (!nl) {
                    s = n;
                    break;
                }
            }
            size_t a, b;
            if (!trim_doc(buf + ds, e - ds, &a, &b)) continue;
            const uint8_t *doc = buf + ds + a;
            size_t dl = b - a;
            double u = (double)(kd_hash64(fnv1a(doc, dl)) >> 11) / 9007199254740992.0; /* [0, 1) */
            int split = u < test_frac;
            if (dl > (size_t)T) d->n_truncated++;
            push(&sp[split], T, doc, dl, cls);
            d->count[split][cls]++;
            docs++;
        }
        free(buf);
        if (docs == 0) st = kd_errorf(KD_EFORMAT, "%s: no documents (fortune entries between '%%' lines)", path);
        total_docs += docs;
        p += L + (comma ? 1 : 0);
        if (comma && !*p) st = kd_errorf(KD_ECONFIG, "data '%s': trailing comma", spec);
    }
    if (st == KD_OK && d->n_classes < 2) st = kd_errorf(KD_ECONFIG, "data '%s': needs at least 2 files (classes)", spec);
    if (st == KD_OK && sp[0].n == 0) st = kd_errorf(KD_EFORMAT, "data '%s': no training document", spec);
    for (int s2 = 0; s2 < 2; s2++) {
        d->tok[s2] = sp[s2].tok;
        d->len[s2] = sp[s2].len;
        d->label[s2] = sp[s2].label;
        d->n[s2] = sp[s2].n;
    }
    if (st != KD_OK) {
        kd_textcls_free(d);
        return st;
    }
    snprintf(d->info, sizeof d->info, "%s: %d classes, %d documents (%d train, %d test), %d cut to %d bytes", spec,
             d->n_classes, total_docs, d->n[0], d->n[1], d->n_truncated, T);
    return KD_OK;
}

void kd_textcls_free(kd_textcls_data *d) {
    for (int s = 0; s < 2; s++) {
        free(d->tok[s]);
        free(d->len[s]);
        free(d->label[s]);
    }
    memset(d, 0, sizeof *d);
}

void kd_textcls_fill(const kd_textcls_data *d, int split, const int *idx, int B, float *ids, float *mask,
                     float *labels) {
    int T = d->T;
    for (int b = 0; b < B; b++) {
        int i = idx[b];
        KD_ASSERT(i >= 0 && i < d->n[split], "document %d of %d", i, d->n[split]);
        const uint8_t *src = d->tok[split] + (size_t)i * T;
        for (int t = 0; t < T; t++) {
            ids[(size_t)b * T + t] = (float)src[t];
            mask[(size_t)b * T + t] = t < d->len[split][i] ? 1.0f : 0.0f;
        }
        if (labels) labels[b] = (float)d->label[split][i];
    }
}
