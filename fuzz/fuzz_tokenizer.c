/* fuzz_tokenizer.c - libFuzzer harness for the BPE tokenizer: its JSON
 * reader, encode/decode and the trainer.
 *
 * Input: tokenizer JSON, a NUL byte, then arbitrary text bytes. The JSON is
 * read with kd_tokenizer_from_json; when it is rejected, a tokenizer trained
 * at start-up stands in, so the text is always encoded with real merges.
 * Invariants: an accepted tokenizer writes back (kd_tokenizer_to_json) to
 * JSON that reads as the same tokenizer; every pre-split chunk is 1 to
 * KD_TEXT_MAX_CHUNK bytes; encoding gives ids below the vocabulary, at most
 * one per byte, and decode(encode(x)) == x for any bytes. Then a tokenizer
 * is trained on the text itself and the round trip must hold for it too.
 */
#include "fuzz.h"
#include "kd_text.h"

static kd_tokenizer fallback;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    static const char sample[] =
        "The quick brown fox jumps over the lazy dog.  The dog sleeps; the fox runs 12 miles in 3 hours!\n"
        "\tcaf\xc3\xa9 na\xc3\xafve \xe2\x82\xac 100 -- \"quoted\" text, (parens) and more text text text.\n";
    kd_status s = kd_tokenizer_train(&fallback, (const uint8_t *)sample, sizeof sample - 1, 320);
    FZ_CHECK(s == KD_OK && fallback.n_merges > 0, "training the fallback tokenizer");
    return 0;
}

static void same_tokenizer(const kd_tokenizer *a, const kd_tokenizer *b) {
    FZ_CHECK(a->vocab == b->vocab && a->n_merges == b->n_merges, "vocab %d/%d merges %d/%d", a->vocab, b->vocab,
             a->n_merges, b->n_merges);
    FZ_CHECK(a->n_merges == 0 || memcmp(a->merges, b->merges, (size_t)a->n_merges * sizeof *a->merges) == 0,
             "merges differ");
    for (int t = 0; t < a->vocab; t++) {
        size_t la, lb;
        const uint8_t *pa = kd_tokenizer_token(a, t, &la), *pb = kd_tokenizer_token(b, t, &lb);
        FZ_CHECK(la == lb && la >= 1 && la <= KD_TEXT_MAX_CHUNK && memcmp(pa, pb, la) == 0, "token %d", t);
    }
}

static void json_round_trip(const kd_tokenizer *tok) {
    char *js = kd_tokenizer_to_json(tok);
    kd_tokenizer back;
    FZ_CHECK(kd_tokenizer_from_json(&back, js, "to_json") == KD_OK, "own JSON rejected: %.200s", js);
    same_tokenizer(tok, &back);
    kd_tokenizer_free(&back);
    free(js);
}

static void round_trip(const kd_tokenizer *tok, const uint8_t *text, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t e = kd_tokenizer_chunk_end(text, n, i);
        FZ_CHECK(e > i && e <= n && e - i <= KD_TEXT_MAX_CHUNK, "chunk at %zu ends at %zu", i, e);
        i = e;
    }
    uint16_t *ids = malloc((n ? n : 1) * sizeof *ids);
    uint8_t *out = malloc(n + 1);
    if (!ids || !out) abort();
    size_t m = kd_tokenizer_encode(tok, text, n, ids);
    FZ_CHECK(m <= n, "%zu ids for %zu bytes", m, n);
    for (size_t i = 0; i < m; i++) FZ_CHECK(ids[i] < tok->vocab, "id %u >= vocab %d", ids[i], tok->vocab);
    size_t need = kd_tokenizer_decode(tok, ids, m, out, n);
    FZ_CHECK(need == n && (n == 0 || memcmp(out, text, n) == 0), "decode(encode(x)) != x (%zu of %zu bytes)", need, n);
    if (n > 1) { /* a short buffer: the count stays right, the prefix is written */
        size_t cap = n / 2;
        memset(out, 0, n);
        FZ_CHECK(kd_tokenizer_decode(tok, ids, m, out, cap) == n && memcmp(out, text, cap) == 0, "truncated decode");
    }
    free(ids);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 1 << 16) return 0;
    char *js = fz_cstr(data, size);
    size_t jl = strlen(js);
    const uint8_t *text = jl < size ? data + jl + 1 : data + size;
    size_t n = jl < size ? size - jl - 1 : 0;

    kd_tokenizer tok;
    kd_status s = kd_tokenizer_from_json(&tok, js, "fuzz.json");
    FZ_CHECK(s == KD_OK || s == KD_EFORMAT, "status %d", (int)s);
    if (s == KD_OK) {
        json_round_trip(&tok);
        round_trip(&tok, text, n);
        kd_tokenizer_free(&tok);
    } else {
        FZ_CHECK(tok.merges == NULL && tok.tok_off == NULL && tok.vocab == 0, "a failed read left data behind");
        round_trip(&fallback, text, n);
    }

    /* train on the text (the vocabulary size from its length) */
    if (n >= 2 && n <= 4096) {
        kd_tokenizer tr;
        s = kd_tokenizer_train(&tr, text, n, 257 + (int)(n % 200));
        FZ_CHECK(s == KD_OK, "training on %zu bytes", n);
        FZ_CHECK(tr.vocab == 256 + tr.n_merges && tr.vocab <= 257 + (int)(n % 200), "vocab %d", tr.vocab);
        json_round_trip(&tr);
        round_trip(&tr, text, n);
        kd_tokenizer_free(&tr);
    }
    free(js);
    return 0;
}
