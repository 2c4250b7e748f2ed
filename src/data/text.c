/* text.c - text datasets for language models: reading a file or a directory
 * tree of UTF-8 text, cutting it into documents, the hash-based
 * train/validation split, the token streams, and windows over them.
 *
 * A directory is walked recursively, entries in strcmp order, symlinks
 * followed; each real file is read once (deduplicated by device and inode,
 * so the Debian fortunes directory's ".u8" symlinks add nothing), and so is
 * each directory (no symlink loops). Files holding a NUL byte or invalid
 * UTF-8 (the fortunes ".dat" indexes, images, archives) are skipped and
 * counted, as are entries that are not regular files or directories.
 *
 * Documents: a file with a line holding only "%" is a fortune file and its
 * entries are the documents; any other file is cut at blank lines (empty or
 * only spaces, tabs, CR, VT, FF). Blank lines at either end of a document
 * are dropped, as is its final line break; documents with nothing but blank
 * lines are dropped. A document goes to validation when
 * kd_hash64(FNV-1a-64(its bytes)) / 2^64 < val_frac: the split depends on
 * the document's bytes only (not on file names or order), and copies of a
 * document always land in the same split. Each split's stream is its
 * documents in walk order joined by one '\n'.
 *
 * Deliberately not here: encodings other than UTF-8, compressed files,
 * deduplication of repeated documents, shuffling documents.
 */
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd_text.h"

/* ---------------------------------------------------------------- the walk */

typedef struct file_id {
    uint64_t dev, ino;
} file_id;

typedef struct corpus {
    const char *path; /* what the spec names */
    uint8_t *buf;     /* the text of every file read, concatenated */
    size_t n_buf, cap_buf;
    size_t *doc_off, *doc_len; /* documents: spans of buf */
    uint8_t *doc_val;          /* 1: validation */
    int n_docs, cap_docs;
    file_id *seen; /* open-addressing set; dev == ino == 0 empty */
    size_t seen_mask, n_seen;
    int n_files, n_skipped, n_duplicates;
} corpus;

static void corpus_free(corpus *c) {
    free(c->buf);
    free(c->doc_off);
    free(c->doc_len);
    free(c->doc_val);
    free(c->seen);
    memset(c, 0, sizeof *c);
}

/* 1 when (dev, ino) was already seen; records it otherwise. */
static int seen_before(corpus *c, const struct stat *sb) {
    file_id id = {(uint64_t)sb->st_dev + 1, (uint64_t)sb->st_ino}; /* +1: never the empty slot */
    if ((c->n_seen + 1) * 2 > c->seen_mask + 1) {
        size_t cap = c->seen_mask ? 2 * (c->seen_mask + 1) : 256;
        file_id *old = c->seen;
        size_t old_cap = c->seen_mask ? c->seen_mask + 1 : 0;
        c->seen = kd_calloc(cap, sizeof(file_id));
        c->seen_mask = cap - 1;
        for (size_t i = 0; i < old_cap; i++) {
            if (!old[i].dev) continue;
            size_t h = kd_hash64(old[i].dev * 0x9E3779B97F4A7C15ull ^ old[i].ino) & c->seen_mask;
            while (c->seen[h].dev) h = (h + 1) & c->seen_mask;
            c->seen[h] = old[i];
        }
        free(old);
    }
    size_t h = kd_hash64(id.dev * 0x9E3779B97F4A7C15ull ^ id.ino) & c->seen_mask;
    for (; c->seen[h].dev; h = (h + 1) & c->seen_mask)
        if (c->seen[h].dev == id.dev && c->seen[h].ino == id.ino) return 1;
    c->seen[h] = id;
    c->n_seen++;
    return 0;
}

/* Strict UTF-8 (no overlong forms, surrogates or code points > U+10FFFF). */
static int valid_utf8(const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n;) {
        uint8_t c = b[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int more;
        uint8_t lo = 0x80, hi = 0xBF; /* range of the second byte */
        if (c >= 0xC2 && c <= 0xDF)
            more = 1;
        else if (c == 0xE0)
            more = 2, lo = 0xA0;
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
            more = 2;
        else if (c == 0xED)
            more = 2, hi = 0x9F;
        else if (c == 0xF0)
            more = 3, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3)
            more = 3;
        else if (c == 0xF4)
            more = 3, hi = 0x8F;
        else
            return 0;
        if (n - i <= (size_t)more) return 0;
        if (b[i + 1] < lo || b[i + 1] > hi) return 0;
        for (int k = 2; k <= more; k++)
            if (b[i + k] < 0x80 || b[i + k] > 0xBF) return 0;
        i += (size_t)more + 1;
    }
    return 1;
}

static int is_blank(const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (b[i] != ' ' && b[i] != '\t' && b[i] != '\r' && b[i] != '\v' && b[i] != '\f') return 0;
    return 1;
}

static int is_percent_line(const uint8_t *b, size_t n) {
    return (n == 1 && b[0] == '%') || (n == 2 && b[0] == '%' && b[1] == '\r');
}

static void add_doc(corpus *c, size_t off, size_t len) {
    if (c->n_docs == c->cap_docs) {
        c->cap_docs = c->cap_docs ? 2 * c->cap_docs : 1024;
        c->doc_off = kd_realloc(c->doc_off, (size_t)c->cap_docs * sizeof(size_t));
        c->doc_len = kd_realloc(c->doc_len, (size_t)c->cap_docs * sizeof(size_t));
        c->doc_val = kd_realloc(c->doc_val, (size_t)c->cap_docs);
    }
    c->doc_off[c->n_docs] = off;
    c->doc_len[c->n_docs] = len;
    c->doc_val[c->n_docs] = 0;
    c->n_docs++;
}

/* Cuts buf[off .. off+n) into documents. */
static void split_docs(corpus *c, size_t off, size_t n) {
    const uint8_t *b = c->buf + off;
    int fortune = 0;
    for (size_t ls = 0; ls < n && !fortune;) {
        const uint8_t *nl = memchr(b + ls, '\n', n - ls);
        size_t le = nl ? (size_t)(nl - b) : n;
        fortune = is_percent_line(b + ls, le - ls);
        ls = le + 1;
    }
    size_t first = SIZE_MAX, last = 0; /* document: first non-blank line start .. last one's end */
    for (size_t ls = 0; ls < n;) {
        const uint8_t *nl = memchr(b + ls, '\n', n - ls);
        size_t le = nl ? (size_t)(nl - b) : n;
        int blank = is_blank(b + ls, le - ls);
        int sep = fortune ? is_percent_line(b + ls, le - ls) : blank;
        if (sep) {
            if (first != SIZE_MAX) add_doc(c, off + first, last - first);
            first = SIZE_MAX;
        } else if (!blank) {
            if (first == SIZE_MAX) first = ls;
            last = le;
        }
        ls = le + 1;
    }
    if (first != SIZE_MAX) add_doc(c, off + first, last - first);
}

/* Reads one regular file, appends its text and documents (or skips it). */
static kd_status read_file(corpus *c, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return kd_errorf(KD_EIO, "text:%s: cannot open %s: %s", c->path, path, strerror(errno));
    size_t start = c->n_buf;
    for (;;) {
        if (c->cap_buf - c->n_buf < (1u << 16)) {
            c->cap_buf = c->cap_buf ? 2 * c->cap_buf : (1u << 20);
            c->buf = kd_realloc(c->buf, c->cap_buf);
        }
        size_t got = fread(c->buf + c->n_buf, 1, c->cap_buf - c->n_buf, f);
        c->n_buf += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) return kd_errorf(KD_EIO, "text:%s: read error in %s", c->path, path);
    size_t n = c->n_buf - start;
    if (memchr(c->buf + start, '\0', n) || !valid_utf8(c->buf + start, n)) {
        c->n_buf = start;
        c->n_skipped++;
        return KD_OK;
    }
    c->n_files++;
    split_docs(c, start, n);
    return KD_OK;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Walks path (already stat'ed into sb). */
static kd_status walk(corpus *c, const char *path, const struct stat *sb, int depth) {
    if (seen_before(c, sb)) {
        c->n_duplicates++;
        return KD_OK;
    }
    if (S_ISREG(sb->st_mode)) return read_file(c, path);
    if (!S_ISDIR(sb->st_mode)) {
        c->n_skipped++;
        return KD_OK;
    }
    if (depth > 64) return kd_errorf(KD_EFORMAT, "text:%s: directories nested deeper than 64 at %s", c->path, path);
    DIR *d = opendir(path);
    if (!d) return kd_errorf(KD_EIO, "text:%s: cannot open directory %s: %s", c->path, path, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            names = kd_realloc(names, cap * sizeof(char *));
        }
        names[n++] = kd_strdup(e->d_name);
    }
    int rerr = errno;
    closedir(d);
    kd_status st = rerr ? kd_errorf(KD_EIO, "text:%s: cannot list %s: %s", c->path, path, strerror(rerr)) : KD_OK;
    if (n) qsort(names, n, sizeof(char *), cmp_str);
    for (size_t i = 0; i < n && st == KD_OK; i++) {
        size_t len = strlen(path) + strlen(names[i]) + 2;
        char *child = kd_malloc(len);
        snprintf(child, len, "%s%s%s", path, path[strlen(path) - 1] == '/' ? "" : "/", names[i]);
        struct stat cs;
        if (stat(child, &cs) != 0) {
            c->n_skipped++; /* a dangling symlink, or gone meanwhile */
        } else {
            st = walk(c, child, &cs, depth + 1);
        }
        free(child);
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return st;
}

/* Resolves the spec to a path: "text" or "text:PATH". */
static kd_status spec_path(const char *spec, const char **path) {
    if (strcmp(spec, "text") == 0) {
        const char *env = getenv("KD_TEXT_DIR");
        *path = env && *env ? env : KD_TEXT_DEFAULT_DIR;
        return KD_OK;
    }
    if (strncmp(spec, "text:", 5) != 0)
        return kd_errorf(KD_ECONFIG, "'%s' is not a text dataset (expected text or text:PATH)", spec);
    if (!spec[5]) return kd_errorf(KD_ECONFIG, "'%s': empty path (expected text:PATH)", spec);
    *path = spec + 5;
    return KD_OK;
}

static kd_status corpus_read(corpus *c, const char *spec, float val_frac) {
    memset(c, 0, sizeof *c);
    kd_status st = spec_path(spec, &c->path);
    if (st != KD_OK) return st;
    if (!(val_frac >= 0.0f && val_frac <= 0.5f))
        return kd_errorf(KD_ECONFIG, "text:%s: validation fraction %g must be in [0, 0.5]", c->path, val_frac);
    struct stat sb;
    if (stat(c->path, &sb) != 0)
        return kd_errorf(KD_EIO, "text:%s: %s%s", c->path, strerror(errno),
                         strcmp(spec, "text") == 0 ? " (the default corpus: install the Debian package fortunes, "
                                                     "or set KD_TEXT_DIR, or give text:PATH)"
                                                   : "");
    if (!S_ISREG(sb.st_mode) && !S_ISDIR(sb.st_mode))
        return kd_errorf(KD_EFORMAT, "text:%s: neither a file nor a directory", c->path);
    st = walk(c, c->path, &sb, 0);
    if (st == KD_OK && c->n_docs == 0)
        st = kd_errorf(KD_EFORMAT,
                       "text:%s: no text found (%d file(s) read, %d skipped: binary, not UTF-8 or not a regular file)",
                       c->path, c->n_files, c->n_skipped);
    for (int i = 0; st == KD_OK && i < c->n_docs; i++) {
        uint64_t h = 1469598103934665603ull;
        const uint8_t *p = c->buf + c->doc_off[i];
        for (size_t k = 0; k < c->doc_len[i]; k++) h = (h ^ p[k]) * 1099511628211ull;
        h = kd_hash64(h);
        c->doc_val[i] = (double)(h >> 11) * 0x1p-53 < (double)val_frac;
    }
    if (st != KD_OK) corpus_free(c);
    return st;
}

/* Documents of split (0 train, 1 val, -1 all) joined by '\n'. */
static uint8_t *corpus_stream(const corpus *c, int split, size_t *n, int *n_docs) {
    size_t len = 0;
    int k = 0;
    for (int i = 0; i < c->n_docs; i++)
        if (split < 0 || c->doc_val[i] == split) len += c->doc_len[i] + (k++ ? 1 : 0);
    uint8_t *s = kd_malloc(len ? len : 1), *p = s;
    k = 0;
    for (int i = 0; i < c->n_docs; i++) {
        if (split >= 0 && c->doc_val[i] != split) continue;
        if (k++) *p++ = '\n';
        memcpy(p, c->buf + c->doc_off[i], c->doc_len[i]);
        p += c->doc_len[i];
    }
    *n = len;
    if (n_docs) *n_docs = k;
    return s;
}

kd_status kd_text_read_bytes(const char *spec, uint8_t **bytes, size_t *n) {
    *bytes = NULL;
    *n = 0;
    corpus c;
    kd_status st = corpus_read(&c, spec, 0.0f);
    if (st != KD_OK) return st;
    *bytes = corpus_stream(&c, -1, n, NULL);
    corpus_free(&c);
    return KD_OK;
}

kd_status kd_text_read_split(const char *spec, float val_frac, int split, uint8_t **bytes, size_t *n, int *n_docs) {
    KD_ASSERT(split == 0 || split == 1, "split %d", split);
    *bytes = NULL;
    *n = 0;
    corpus c;
    kd_status st = corpus_read(&c, spec, val_frac);
    if (st != KD_OK) return st;
    *bytes = corpus_stream(&c, split, n, n_docs);
    corpus_free(&c);
    return KD_OK;
}

/* ---------------------------------------------------------------- datasets */

static uint16_t *encode_stream(const kd_tokenizer *tok, const uint8_t *s, size_t n, size_t *n_ids) {
    uint16_t *ids = kd_malloc((n ? n : 1) * sizeof(uint16_t));
    if (tok) {
        *n_ids = kd_tokenizer_encode(tok, s, n, ids);
        ids = kd_realloc(ids, (*n_ids ? *n_ids : 1) * sizeof(uint16_t));
    } else {
        for (size_t i = 0; i < n; i++) ids[i] = s[i];
        *n_ids = n;
    }
    return ids;
}

kd_status kd_text_load(kd_text_data *d, const char *spec, const kd_tokenizer *tok, float val_frac) {
    memset(d, 0, sizeof *d);
    corpus c;
    kd_status st = corpus_read(&c, spec, val_frac);
    if (st != KD_OK) return st;
    size_t nt, nv;
    uint8_t *tr = corpus_stream(&c, 0, &nt, &d->n_docs_train);
    uint8_t *va = corpus_stream(&c, 1, &nv, &d->n_docs_val);
    if (d->n_docs_train == 0) {
        st = kd_errorf(KD_EFORMAT,
                       "text:%s: all %d document(s) fell in the validation split (fraction %g): give more text or a "
                       "smaller validation fraction",
                       c.path, c.n_docs, val_frac);
    } else {
        d->train = encode_stream(tok, tr, nt, &d->n_train);
        d->val = encode_stream(tok, va, nv, &d->n_val);
        d->vocab = tok ? tok->vocab : 256;
        d->n_files = c.n_files;
        d->n_skipped = c.n_skipped;
        d->n_duplicates = c.n_duplicates;
        d->n_bytes = c.n_buf;
        snprintf(d->name, sizeof d->name, "text:%s", c.path);
        snprintf(d->info, sizeof d->info,
                 "%d file(s), %.2f MB; skipped %d (binary, not UTF-8 or not a regular file) and %d duplicate "
                 "path(s); %d train / %d val documents, %zu / %zu tokens",
                 d->n_files, (double)d->n_bytes / 1e6, d->n_skipped, d->n_duplicates, d->n_docs_train, d->n_docs_val,
                 d->n_train, d->n_val);
    }
    free(tr);
    free(va);
    corpus_free(&c);
    return st;
}

void kd_text_free(kd_text_data *d) {
    free(d->train);
    free(d->val);
    memset(d, 0, sizeof *d);
}

kd_status kd_text_check(const kd_text_data *d, int split, int T) {
    KD_ASSERT(split == 0 || split == 1, "split %d", split);
    size_t n = split ? d->n_val : d->n_train;
    if (T >= 1 && n >= (size_t)T + 1) return KD_OK;
    return kd_errorf(KD_EFORMAT,
                     "%s: the %s split holds %zu token(s), fewer than the %lld needed for one window of context %d "
                     "(give more text%s)",
                     d->name, split ? "validation" : "training", n, (long long)T + 1, T,
                     split ? ", or a larger validation fraction" : "");
}

static const uint16_t *split_ids(const kd_text_data *d, int split, size_t *n) {
    KD_ASSERT(split == 0 || split == 1, "split %d", split);
    *n = split ? d->n_val : d->n_train;
    return split ? d->val : d->train;
}

void kd_text_batch(const kd_text_data *d, int split, kd_rng *rng, int B, int T, float *x, float *y) {
    size_t n;
    const uint16_t *s = split_ids(d, split, &n);
    KD_ASSERT(T >= 1 && n >= (size_t)T + 1, "%s: split %d has %zu tokens, T+1 = %d needed (call kd_text_check first)",
              d->name, split, n, T + 1);
    size_t starts = n - (size_t)T;
    for (int b = 0; b < B; b++) {
        size_t o = starts <= UINT32_MAX ? kd_rng_below(rng, (uint32_t)starts) : (size_t)(kd_rng_u64(rng) % starts);
        const uint16_t *w = s + o;
        float *xb = x + (size_t)b * T, *yb = y + (size_t)b * T;
        for (int t = 0; t < T; t++) {
            xb[t] = w[t];
            yb[t] = w[t + 1];
        }
    }
}

size_t kd_text_n_windows(const kd_text_data *d, int split, int T) {
    size_t n;
    split_ids(d, split, &n);
    if (T < 1 || n < (size_t)T + 1) return 0;
    return (n - 1) / (size_t)T;
}

void kd_text_window(const kd_text_data *d, int split, size_t i, int T, float *x, float *y) {
    size_t n;
    const uint16_t *s = split_ids(d, split, &n);
    KD_ASSERT(i < kd_text_n_windows(d, split, T), "%s: window %zu of split %d out of range (%zu windows of %d)",
              d->name, i, split, kd_text_n_windows(d, split, T), T);
    const uint16_t *w = s + i * (size_t)T;
    for (int t = 0; t < T; t++) {
        x[t] = w[t];
        y[t] = w[t + 1];
    }
}
