/* fuzz_text.c - libFuzzer harness for text datasets (kd_text_load and the
 * raw readers behind it).
 *
 * The input becomes a directory: a.txt holds the bytes before the first NUL
 * (all of them when there is none), b.txt the bytes after it (absent when
 * there is no NUL; skipped as binary when it holds another NUL), and c.lnk
 * is a symlink to a.txt, which the walk must count as a duplicate. The
 * directory is loaded as "text:DIR" with the byte tokenizer and with a small
 * BPE tokenizer. Invariants: both loads agree on the documents (decoding
 * the BPE stream gives the byte stream, split by split), the raw split
 * reader gives the same bytes, ids are below the vocabulary, and batches
 * and windows are drawn when kd_text_check allows them.
 */
#include "fuzz.h"
#include "kd_text.h"

#define VAL_FRAC 0.3f
#define T 4

static kd_tokenizer bpe;
static char spec[128], path_a[128], path_b[128];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *dir = fz_dir();
    snprintf(spec, sizeof spec, "text:%s", dir);
    snprintf(path_a, sizeof path_a, "%s/a.txt", dir);
    snprintf(path_b, sizeof path_b, "%s/b.txt", dir);
    char link[128];
    snprintf(link, sizeof link, "%s/c.lnk", dir);
    if (symlink("a.txt", link) != 0) {
        perror(link);
        abort();
    }
    static const char sample[] = "%\nthe cat sat on the mat\n%\nthe dog sat on the log, the end\n\nthe the the\n";
    FZ_CHECK(kd_tokenizer_train(&bpe, (const uint8_t *)sample, sizeof sample - 1, 290) == KD_OK, "training");
    return 0;
}

static void check_split(const kd_text_data *b, const kd_text_data *p, int split) {
    const uint16_t *bi = split ? b->val : b->train, *pi = split ? p->val : p->train;
    size_t bn = split ? b->n_val : b->n_train, pn = split ? p->n_val : p->n_train;
    for (size_t i = 0; i < bn; i++) FZ_CHECK(bi[i] < 256, "byte id %u", bi[i]);
    for (size_t i = 0; i < pn; i++) FZ_CHECK(pi[i] < bpe.vocab, "bpe id %u", pi[i]);
    FZ_CHECK(pn <= bn, "%zu bpe ids for %zu bytes", pn, bn);
    uint8_t *bytes = malloc(bn ? bn : 1), *dec = malloc(bn ? bn : 1);
    if (!bytes || !dec) abort();
    for (size_t i = 0; i < bn; i++) bytes[i] = (uint8_t)bi[i];
    FZ_CHECK(kd_tokenizer_decode(&bpe, pi, pn, dec, bn) == bn && memcmp(dec, bytes, bn) == 0,
             "split %d: bpe and byte loads differ", split);
    uint8_t *raw;
    size_t rn;
    int docs;
    FZ_CHECK(kd_text_read_split(spec, VAL_FRAC, split, &raw, &rn, &docs) == KD_OK, "read_split %d", split);
    FZ_CHECK(rn == bn && memcmp(raw, bytes, bn) == 0, "split %d: raw reader differs", split);
    FZ_CHECK(docs == (split ? b->n_docs_val : b->n_docs_train), "split %d: %d documents", split, docs);
    free(raw);
    free(bytes);
    free(dec);

    if (kd_text_check(b, split, T) == KD_OK) {
        float x[2 * T], y[2 * T];
        kd_rng r;
        kd_rng_seed(&r, bn);
        kd_text_batch(b, split, &r, 2, T, x, y);
        size_t nw = kd_text_n_windows(b, split, T);
        FZ_CHECK(nw >= 1 && nw * T + 1 <= bn, "%zu windows of %zu tokens", nw, bn);
        kd_text_window(b, split, nw - 1, T, x, y);
        FZ_CHECK(x[T - 1] == (float)bi[nw * T - 1] && y[T - 1] == (float)bi[nw * T], "last window");
    } else {
        FZ_CHECK(kd_text_n_windows(b, split, T) == 0, "windows without a check");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 1 << 16) return 0;
    const uint8_t *nul = memchr(data, 0, size);
    size_t na = nul ? (size_t)(nul - data) : size;
    fz_write_path(path_a, data, na);
    if (nul)
        fz_write_path(path_b, nul + 1, size - na - 1);
    else
        unlink(path_b);

    kd_text_data b, p;
    kd_status s = kd_text_load(&b, spec, NULL, VAL_FRAC);
    FZ_CHECK(s == KD_OK || s == KD_EFORMAT, "status %d", (int)s);
    kd_status s2 = kd_text_load(&p, spec, &bpe, VAL_FRAC);
    FZ_CHECK(s2 == s, "byte load %d, bpe load %d", (int)s, (int)s2);
    if (s == KD_OK) {
        FZ_CHECK(b.n_duplicates == 1 && b.n_files >= 1 && b.n_files + b.n_skipped == (nul ? 2 : 1),
                 "files %d skipped %d duplicates %d", b.n_files, b.n_skipped, b.n_duplicates);
        FZ_CHECK(b.n_docs_train >= 1 && b.n_train + b.n_val <= size, "documents %d, %zu + %zu tokens", b.n_docs_train,
                 b.n_train, b.n_val);
        FZ_CHECK(b.vocab == 256 && p.vocab == bpe.vocab, "vocab");
        check_split(&b, &p, 0);
        check_split(&b, &p, 1);
        kd_text_free(&b);
        kd_text_free(&p);
    }
    return 0;
}
