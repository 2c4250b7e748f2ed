/* test_text.c - text datasets and the BPE tokenizer (src/data/text.c,
 * src/data/bpe.c, src/cli/tokenize.c).
 *
 * Tokenizer: the byte tokenizer's identity, the pre-split on hand-made
 * strings, a training case small enough to derive by hand, agreement with a
 * slow reference implementation (tests/fixtures/gen_text.py ->
 * bpe_ref.json: merges and encoding), decode(encode(x)) == x on random bytes
 * (invalid UTF-8 and NULs included) for several tokenizers, the JSON round
 * trip, and hostile JSON (each case KD_EFORMAT naming the file).
 * Data: documents and their trimming, skipped binary / non-UTF-8 files and
 * deduplicated links in a temp directory, the hash split (independent of
 * file names and order, matching the documented rule, val 0 = empty), error
 * messages, windows and batches within bounds with y = x shifted by one, the
 * installed fortunes directory, and `distill tokenize` via system().
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kd_text.h"
#include "test.h"

#define FORTUNES "/usr/share/games/fortunes"

static char D[200]; /* this area's directory: TMP/text */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int spit(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(data, 1, n, f) == n;
    ok &= fclose(f) == 0;
    return ok;
}

static int spit_str(const char *path, const char *s) { return spit(path, s, strlen(s)); }

static const char *pathf(char *buf, const char *name) {
    snprintf(buf, 512, "%s/%s", D, name);
    return buf;
}

/* decode(encode(x)) == x for n bytes, and the ids are < vocab. */
static int round_trips(const kd_tokenizer *tok, const uint8_t *x, size_t n) {
    uint16_t *ids = malloc((n + 1) * sizeof(uint16_t));
    uint8_t *back = malloc(n + 1);
    size_t k = kd_tokenizer_encode(tok, x, n, ids);
    int ok = k <= n;
    for (size_t i = 0; ok && i < k; i++) ok = ids[i] < tok->vocab;
    size_t m = ok ? kd_tokenizer_decode(tok, ids, k, back, n + 1) : 0;
    ok = ok && m == n && memcmp(back, x, n) == 0;
    free(ids);
    free(back);
    return ok;
}

/* ---------------------------------------------------------------- tokenizer */

static void test_bytes_tokenizer(void) {
    TEST("byte tokenizer is the identity") {
        kd_tokenizer tok;
        kd_tokenizer_bytes(&tok);
        CHECK(tok.vocab == 256 && tok.n_merges == 0);
        uint8_t x[300];
        for (int i = 0; i < 300; i++) x[i] = (uint8_t)(i * 7 + 3);
        uint16_t ids[300];
        CHECK(kd_tokenizer_encode(&tok, x, 300, ids) == 300);
        int same = 1;
        for (int i = 0; i < 300; i++) same &= ids[i] == x[i];
        CHECK(same);
        CHECK(round_trips(&tok, x, 300));
        /* truncated decode: returns the bytes needed, writes only cap */
        uint8_t out[10];
        memset(out, 0xAA, sizeof out);
        CHECK(kd_tokenizer_decode(&tok, ids, 300, out, 4) == 300);
        CHECK(memcmp(out, x, 4) == 0 && out[4] == 0xAA);
        /* ids beyond the vocab decode to nothing */
        uint16_t odd[3] = {65, 300, 66};
        CHECK(kd_tokenizer_decode(&tok, odd, 3, out, sizeof out) == 2 && out[0] == 'A' && out[1] == 'B');
        char *js = kd_tokenizer_to_json(&tok);
        CHECK(strstr(js, "\"vocab\":256") && strstr(js, "\"merges\":[]"));
        kd_tokenizer t2;
        CHECK(kd_tokenizer_from_json(&t2, js, "bytes") == KD_OK && t2.vocab == 256);
        kd_tokenizer_free(&t2);
        free(js);
        kd_tokenizer_free(&tok);
    }
}

/* The chunks of s joined by '|'. */
static void chunks_of(const char *s, char *out) {
    size_t n = strlen(s), k = 0;
    for (size_t i = 0; i < n;) {
        size_t e = kd_tokenizer_chunk_end((const uint8_t *)s, n, i);
        if (i) out[k++] = '|';
        memcpy(out + k, s + i, e - i);
        k += e - i;
        i = e;
    }
    out[k] = '\0';
}

static void test_presplit(void) {
    TEST("pre-split") {
        static const char *const cases[][2] = {
            {"hello world", "hello| world"},
            {"hello  world", "hello| | world"}, /* extra spaces stand alone */
            {"a   b", "a|  | b"},
            {"end. Next", "end|.| Next"},
            {"x , y", "x| ,| y"}, /* the space leads punctuation too */
            {"in 1999!", "in| 1999|!"},
            {"tab\there", "tab|\t|here"},
            {"line \n next", "line| |\n| next"}, /* a space before a newline stands alone */
            {"trailing  ", "trailing|  "},
            {"  lead", " | lead"},
            {"caf\xc3\xa9 ok", "caf\xc3\xa9| ok"}, /* UTF-8 stays with the letters */
            {"\n\n\t\tx", "\n\n\t\t|x"},
            {"a--b", "a|--|b"},
        };
        char got[256];
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            chunks_of(cases[c][0], got);
            CHECK_MSG(strcmp(got, cases[c][1]) == 0, "'%s' -> '%s', expected '%s'", cases[c][0], got, cases[c][1]);
        }
        /* a long run is cut at KD_TEXT_MAX_CHUNK */
        uint8_t run[200];
        memset(run, 'a', sizeof run);
        CHECK(kd_tokenizer_chunk_end(run, 200, 0) == KD_TEXT_MAX_CHUNK);
        CHECK(kd_tokenizer_chunk_end(run, 200, 192) == 200);
        run[0] = ' ';
        CHECK(kd_tokenizer_chunk_end(run, 200, 0) == KD_TEXT_MAX_CHUNK); /* the leading space counts */
    }
}

static void test_train_by_hand(void) {
    TEST("BPE training, derived by hand") {
        /* "abab abab ab" cuts into the chunks "abab", " abab", " ab".
         * Pair counts: (a,b) 2+2+1 = 5, (b,a) 1+1 = 2, (' ',a) 2.
         *   merge 0: (97,98) -> 256. Words: [256 256], [32 256 256], [32 256].
         * Pair counts: (256,256) 1+1 = 2, (32,256) 1+1 = 2: a tie, the
         * smaller pair (32,256) wins.
         *   merge 1: (32,256) -> 257. Words: [256 256], [257 256], [257].
         * Pair counts: (256,256) 1, (257,256) 1: below 2, training stops at
         * vocab 258 though 260 was asked for. Had merges crossed the
         * chunks, (b,' ') would have counted 2 as well. The text encodes as
         * 256 256 | 257 256 | 257. */
        const char *text = "abab abab ab";
        kd_tokenizer tok;
        CHECK(kd_tokenizer_train(&tok, (const uint8_t *)text, strlen(text), 260) == KD_OK);
        CHECK(tok.vocab == 258 && tok.n_merges == 2);
        CHECK(tok.merges[0][0] == 97 && tok.merges[0][1] == 98);
        CHECK(tok.merges[1][0] == 32 && tok.merges[1][1] == 256);
        uint16_t ids[16];
        size_t k = kd_tokenizer_encode(&tok, (const uint8_t *)text, strlen(text), ids);
        CHECK(k == 5 && ids[0] == 256 && ids[1] == 256 && ids[2] == 257 && ids[3] == 256 && ids[4] == 257);
        size_t len;
        const uint8_t *p = kd_tokenizer_token(&tok, 257, &len);
        CHECK(len == 3 && memcmp(p, " ab", 3) == 0);
        /* "ba" was never merged: "bab" is b, ab */
        k = kd_tokenizer_encode(&tok, (const uint8_t *)"bab", 3, ids);
        CHECK(k == 2 && ids[0] == 98 && ids[1] == 256);
        kd_tokenizer_free(&tok);

        /* overlapping pairs: "aaaa aaa" -> chunks "aaaa", " aaa".
         * (a,a) counts 3 + 2 = 5 -> 256; words [256 256], [32 256 97]
         * (left to right, non-overlapping). Pairs: (256,256) 1, (32,256) 1,
         * (256,97) 1: stop at 257. */
        text = "aaaa aaa";
        CHECK(kd_tokenizer_train(&tok, (const uint8_t *)text, strlen(text), 300) == KD_OK);
        CHECK(tok.vocab == 257 && tok.merges[0][0] == 97 && tok.merges[0][1] == 97);
        k = kd_tokenizer_encode(&tok, (const uint8_t *)text, strlen(text), ids);
        CHECK(k == 5 && ids[0] == 256 && ids[1] == 256 && ids[2] == 32 && ids[3] == 256 && ids[4] == 97);
        kd_tokenizer_free(&tok);

        /* no pair occurs twice: no merges at all */
        CHECK(kd_tokenizer_train(&tok, (const uint8_t *)"ab cd", 5, 300) == KD_OK && tok.vocab == 256);
        kd_tokenizer_free(&tok);
        CHECK(kd_tokenizer_train(&tok, (const uint8_t *)"ab", 2, 256) == KD_ECONFIG);
        CHECK(kd_tokenizer_train(&tok, (const uint8_t *)"ab", 2, 65537) == KD_ECONFIG);
        CHECK(kd_tokenizer_train(&tok, (const uint8_t *)"", 0, 300) == KD_ECONFIG);
    }
}

static int hexval(char c) { return c <= '9' ? c - '0' : (c | 32) - 'a' + 10; }

static void test_reference(void) {
    TEST("BPE against the slow reference (bpe_ref.json)") {
        char fx[512];
        char *js = kd_test_slurp(kd_test_fixture("bpe_ref.json", fx, sizeof fx), NULL);
        CHECK_MSG(js != NULL, "cannot read %s", fx);
        if (!js) break;
        cJSON *root = cJSON_Parse(js);
        free(js);
        const cJSON *hex = cJSON_GetObjectItem(root, "text_hex"), *mer = cJSON_GetObjectItem(root, "merges"),
                    *ids = cJSON_GetObjectItem(root, "ids"), *voc = cJSON_GetObjectItem(root, "vocab");
        CHECK(cJSON_IsString(hex) && cJSON_IsArray(mer) && cJSON_IsArray(ids) && cJSON_IsNumber(voc));
        size_t n = strlen(hex->valuestring) / 2;
        uint8_t *text = malloc(n);
        for (size_t i = 0; i < n; i++)
            text[i] = (uint8_t)(hexval(hex->valuestring[2 * i]) << 4 | hexval(hex->valuestring[2 * i + 1]));
        kd_tokenizer tok;
        CHECK(kd_tokenizer_train(&tok, text, n, voc->valueint) == KD_OK);
        int nm = cJSON_GetArraySize(mer), same = tok.n_merges == nm;
        for (int i = 0; same && i < nm; i++) {
            const cJSON *m = cJSON_GetArrayItem(mer, i);
            same = tok.merges[i][0] == cJSON_GetArrayItem(m, 0)->valueint &&
                   tok.merges[i][1] == cJSON_GetArrayItem(m, 1)->valueint;
            if (!same)
                fprintf(stderr, "  merge %d: (%d, %d), reference (%d, %d)\n", i, tok.merges[i][0], tok.merges[i][1],
                        cJSON_GetArrayItem(m, 0)->valueint, cJSON_GetArrayItem(m, 1)->valueint);
        }
        CHECK_MSG(same, "%d merges, reference %d", tok.n_merges, nm);
        CHECK(nm > 100 && tok.vocab < voc->valueint); /* the case stops early: the rule is exercised */
        uint16_t *out = malloc(n * sizeof(uint16_t));
        size_t k = kd_tokenizer_encode(&tok, text, n, out);
        int ni = cJSON_GetArraySize(ids);
        same = (int)k == ni;
        for (int i = 0; same && i < ni; i++) same = out[i] == cJSON_GetArrayItem(ids, i)->valueint;
        CHECK_MSG(same, "encoding: %zu ids, reference %d", k, ni);
        CHECK(round_trips(&tok, text, n));
        free(out);
        free(text);
        kd_tokenizer_free(&tok);
        cJSON_Delete(root);
    }
}

static void test_random_round_trip(void) {
    TEST("decode(encode(x)) == x on random bytes") {
        kd_rng r;
        kd_rng_seed(&r, 7);
        /* training text: skewed random bytes (so pairs repeat), any byte value */
        size_t n = 20000;
        uint8_t *text = malloc(n);
        static const uint8_t common[] = {'a', 'b', ' ', ' ', '\n', 0x00, 0xff, 0xc3, 0xa9, '.', '1', '\t'};
        for (size_t i = 0; i < n; i++)
            text[i] =
                kd_rng_uniform(&r) < 0.8f ? common[kd_rng_below(&r, sizeof common)] : (uint8_t)kd_rng_below(&r, 256);
        kd_tokenizer tok;
        CHECK(kd_tokenizer_train(&tok, text, n, 700) == KD_OK);
        CHECK(tok.vocab > 400);
        CHECK(round_trips(&tok, text, n));
        uint8_t *x = malloc(5000);
        int all = 1;
        for (int trial = 0; trial < 20; trial++) {
            size_t m = kd_rng_below(&r, 5000);
            int skew = trial & 1;
            for (size_t i = 0; i < m; i++)
                x[i] = skew && kd_rng_uniform(&r) < 0.7f ? common[kd_rng_below(&r, sizeof common)]
                                                         : (uint8_t)kd_rng_below(&r, 256);
            all &= round_trips(&tok, x, m);
        }
        CHECK(all);
        CHECK(round_trips(&tok, x, 0));
        /* compression on text like the training text: fewer ids than bytes */
        uint16_t *ids = malloc(n * sizeof(uint16_t));
        CHECK(kd_tokenizer_encode(&tok, text, n, ids) < n * 3 / 4);
        free(ids);
        free(x);
        free(text);
        kd_tokenizer_free(&tok);
    }
}

static void test_json(void) {
    TEST("tokenizer JSON: to_json/from_json and save/load round trips") {
        const char *text = "the cat sat on the mat; the cat ate the rat. 12 12 12 \xc3\xa9t\xc3\xa9 \xc3\xa9t\xc3\xa9";
        kd_tokenizer tok, a, b;
        CHECK(kd_tokenizer_train(&tok, (const uint8_t *)text, strlen(text), 300) == KD_OK);
        CHECK(tok.n_merges > 5);
        char *js = kd_tokenizer_to_json(&tok);
        CHECK(kd_tokenizer_from_json(&a, js, "memory") == KD_OK);
        char p[512];
        pathf(p, "tok.json");
        CHECK(kd_tokenizer_save(&tok, p) == KD_OK);
        CHECK(kd_tokenizer_load(&b, p) == KD_OK);
        int same =
            a.vocab == tok.vocab && b.vocab == tok.vocab && a.n_merges == tok.n_merges && b.n_merges == tok.n_merges;
        for (int i = 0; same && i < tok.n_merges; i++)
            same = a.merges[i][0] == tok.merges[i][0] && a.merges[i][1] == tok.merges[i][1] &&
                   b.merges[i][0] == tok.merges[i][0] && b.merges[i][1] == tok.merges[i][1];
        CHECK(same);
        for (int t = 0; same && t < tok.vocab; t++) {
            size_t l1, l2;
            const uint8_t *p1 = kd_tokenizer_token(&tok, t, &l1), *p2 = kd_tokenizer_token(&b, t, &l2);
            same = l1 == l2 && memcmp(p1, p2, l1) == 0;
        }
        CHECK(same);
        /* the file holds exactly to_json plus a newline; no temp file left */
        size_t len;
        char *file = kd_test_slurp(p, &len);
        CHECK(file && len == strlen(js) + 1 && memcmp(file, js, len - 1) == 0 && file[len - 1] == '\n');
        free(file);
        DIR *d = opendir(D);
        int tmp = 0;
        struct dirent *e;
        while (d && (e = readdir(d))) tmp += strstr(e->d_name, ".tmp.") != NULL;
        if (d) closedir(d);
        CHECK(tmp == 0);
        /* saving where no file can be made */
        CHECK(kd_tokenizer_save(&tok, "/nonexistent-dir/tok.json") == KD_EIO);
        CHECK(strstr(kd_error_message(), "/nonexistent-dir/tok.json") != NULL);
        free(js);
        kd_tokenizer_free(&a);
        kd_tokenizer_free(&b);
        kd_tokenizer_free(&tok);
    }
}

static void test_hostile_json(void) {
    TEST("hostile tokenizer files") {
        static const char *const cases[][2] = {
            /* content, a word the message must hold */
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[97,98],[256,9", "malformed"},
            {"[1,2]", "object"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":\"258\",\"merges\":[[97,98],[256,99]]}", "vocab"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":{\"a\":1}}", "merges"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[97,98],\"ab\"]}", "merge 1"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[97,98],[256]]}", "merge 1"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[97,98],[256,\"c\"]]}", "right"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[97,98],[256,9.5]]}", "merge 1"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[-1,98],[256,9]]}", "merge 0"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[97,98],[257,97]]}",
             "not defined yet"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[256,98],[97,97]]}",
             "not defined yet"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":300,\"merges\":[[97,98],[256,99]]}",
             "needs 44 merges"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":258,\"merges\":[[97,98],[97,98]]}",
             "repeats merge 0"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":70000,\"merges\":[]}", "vocab"},
            {"{\"format\":\"gpt2\",\"version\":1,\"vocab\":256,\"merges\":[]}", "format"},
            {"{\"format\":\"distill-bpe\",\"version\":2,\"vocab\":256,\"merges\":[]}", "version"},
            {"{\"format\":\"distill-bpe\",\"vocab\":256,\"merges\":[]}", "version"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":256,\"merges\":[],\"extra\":1}", "unknown key"},
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":256,\"vocab\":256,\"merges\":[]}", "twice"},
            /* 97+97 -> 2 bytes, then 4, 8, 16, 32, 64, and merge 6 would make 128 */
            {"{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":263,\"merges\":[[97,97],[256,256],[257,257],"
             "[258,258],[259,259],[260,260],[261,261]]}",
             "merge 6 makes a token longer"},
            {"", "empty"},
            {"{\"format\":\"distill-bpe\"}\0garbage", "NUL"},
        };
        int nc = (int)(sizeof cases / sizeof cases[0]);
        for (int c = 0; c < nc; c++) {
            char p[512], name[64];
            snprintf(name, sizeof name, "hostile%02d.json", c);
            pathf(p, name);
            size_t len = strlen(cases[c][0]);
            if (strcmp(cases[c][1], "NUL") == 0) len += 8;
            CHECK(spit(p, cases[c][0], len));
            kd_tokenizer tok;
            memset(&tok, 0x5a, sizeof tok);
            kd_status st = kd_tokenizer_load(&tok, p);
            const char *msg = kd_error_message();
            CHECK_MSG(st == KD_EFORMAT && strstr(msg, p) && strstr(msg, cases[c][1]),
                      "case %d: status %d, message '%s' (want the path and '%s')", c, st, msg, cases[c][1]);
            CHECK(tok.merges == NULL && tok.vocab == 0); /* nothing to free after an error */
            /* the same through from_json, origin named */
            if (len == strlen(cases[c][0]) && len > 0) {
                st = kd_tokenizer_from_json(&tok, cases[c][0], "ckpt.safetensors: metadata 'tokenizer'");
                CHECK_MSG(st == KD_EFORMAT && strstr(kd_error_message(), "ckpt.safetensors: metadata 'tokenizer'"),
                          "case %d from_json: %s", c, kd_error_message());
            }
        }
        /* a truncated copy of a real file */
        char p[512], q[512];
        kd_tokenizer tok;
        const char *text = "one two three one two three one two three";
        CHECK(kd_tokenizer_train(&tok, (const uint8_t *)text, strlen(text), 280) == KD_OK);
        CHECK(kd_tokenizer_save(&tok, pathf(p, "full.json")) == KD_OK);
        kd_tokenizer_free(&tok);
        size_t len;
        char *full = kd_test_slurp(p, &len);
        CHECK(full && spit(pathf(q, "truncated.json"), full, len / 2));
        free(full);
        CHECK(kd_tokenizer_load(&tok, q) == KD_EFORMAT && strstr(kd_error_message(), q) &&
              strstr(kd_error_message(), "truncated"));
        CHECK(kd_tokenizer_load(&tok, pathf(q, "missing.json")) == KD_EIO && strstr(kd_error_message(), q));
        /* larger than the 16 MB bound: valid JSON padded with spaces */
        size_t big = (16u << 20) + 2;
        char *pad = malloc(big);
        memset(pad, ' ', big);
        const char *head = "{\"format\":\"distill-bpe\",\"version\":1,\"vocab\":256,\"merges\":[]}";
        memcpy(pad, head, strlen(head));
        CHECK(spit(pathf(q, "huge.json"), pad, big));
        free(pad);
        CHECK(kd_tokenizer_load(&tok, q) == KD_EFORMAT && strstr(kd_error_message(), q) &&
              strstr(kd_error_message(), "larger than"));
        unlink(q);
    }
}

/* ---------------------------------------------------------------- data */

static int mkdir_p(const char *p) { return mkdir(p, 0755) == 0; }

/* The documented split rule, written out here independently. */
static int in_val(const char *doc, size_t n, float frac) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)doc[i]) * 1099511628211ull;
    h = kd_hash64(h);
    return (double)(h >> 11) / 9007199254740992.0 < (double)frac;
}

static int stream_eq(const uint16_t *ids, size_t n, const char *s) {
    if (n != strlen(s)) return 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] != (uint8_t)s[i]) return 0;
    return 1;
}

static void test_documents(void) {
    TEST("documents, skipped and duplicate files") {
        char dir[300], p[512], q[512];
        snprintf(dir, sizeof dir, "%.250s/docs", D);
        CHECK(mkdir_p(dir));
        /* a fortune file: entries between "%" lines, blank edge lines dropped */
        snprintf(p, sizeof p, "%s/a_fortunes", dir);
        CHECK(spit_str(p, "%\nfirst entry\n\tindented line\n%\n\nsecond\n\n%\n%\n  \n%\nthird\n\nstill third\n%\n"));
        /* a plain text file: paragraphs */
        snprintf(p, sizeof p, "%s/b_plain.txt", dir);
        CHECK(spit_str(p, "\n\npara one\nline two\n \t\npara two\n\n\n\npara three"));
        /* skipped: NUL bytes, invalid UTF-8 (a lone continuation, an overlong '/', a surrogate) */
        snprintf(p, sizeof p, "%s/c_binary.dat", dir);
        CHECK(spit(p, "abc\0def\n", 8));
        snprintf(p, sizeof p, "%s/d_latin1.txt", dir);
        CHECK(spit_str(p, "caf\xe9\n"));
        snprintf(p, sizeof p, "%s/d_overlong.txt", dir);
        CHECK(spit_str(p, "a\xc0\xaf"
                          "b\n"));
        snprintf(p, sizeof p, "%s/d_surrogate.txt", dir);
        CHECK(spit_str(p, "a\xed\xa0\x80"
                          "b\n"));
        /* duplicates: a symlink and a hard link to the fortune file, a link to the directory itself */
        snprintf(p, sizeof p, "%s/a_fortunes", dir);
        snprintf(q, sizeof q, "%s/e_link.u8", dir);
        CHECK(symlink("a_fortunes", q) == 0);
        snprintf(q, sizeof q, "%s/f_hard", dir);
        CHECK(link(p, q) == 0);
        snprintf(q, sizeof q, "%s/g_loop", dir);
        CHECK(symlink(".", q) == 0);
        snprintf(q, sizeof q, "%s/h_dangling", dir);
        CHECK(symlink("nowhere", q) == 0);
        /* a subdirectory, read after the files before it in name order; valid UTF-8 */
        snprintf(q, sizeof q, "%s/sub", dir);
        CHECK(mkdir_p(q));
        snprintf(q, sizeof q, "%s/sub/z.txt", dir);
        CHECK(spit_str(q, "sub text \xc3\xa9\xe2\x80\x94\xf0\x9f\x98\x80\r\n"));

        char spec[600];
        snprintf(spec, sizeof spec, "text:%s", dir);
        kd_text_data d;
        CHECK(kd_text_load(&d, spec, NULL, 0.0f) == KD_OK);
        const char *want = "first entry\n\tindented line\nsecond\nthird\n\nstill third\n"
                           "para one\nline two\npara two\npara three\n"
                           "sub text \xc3\xa9\xe2\x80\x94\xf0\x9f\x98\x80\r";
        CHECK_MSG(stream_eq(d.train, d.n_train, want), "train stream of %zu bytes differs", d.n_train);
        CHECK(d.n_val == 0 && d.n_docs_val == 0 && d.n_docs_train == 7);
        CHECK_MSG(d.n_files == 3 && d.n_skipped == 5 && d.n_duplicates == 3, "files %d skipped %d duplicates %d",
                  d.n_files, d.n_skipped, d.n_duplicates);
        size_t sz_a = 0, sz_b = 0, sz_z = 0;
        free(kd_test_slurp(p, &sz_a));
        snprintf(q, sizeof q, "%s/b_plain.txt", dir);
        free(kd_test_slurp(q, &sz_b));
        snprintf(q, sizeof q, "%s/sub/z.txt", dir);
        free(kd_test_slurp(q, &sz_z));
        CHECK(d.n_bytes == sz_a + sz_b + sz_z);
        CHECK(d.vocab == 256 && strcmp(d.name, spec) == 0);
        CHECK(strstr(d.info, "skipped 5") != NULL);
        kd_text_free(&d);

        /* kd_text_read_bytes: all documents; one file alone */
        uint8_t *bytes;
        size_t n;
        CHECK(kd_text_read_bytes(spec, &bytes, &n) == KD_OK && n == strlen(want) && memcmp(bytes, want, n) == 0);
        free(bytes);
        snprintf(q, sizeof q, "text:%s/b_plain.txt", dir);
        const char *plain = "para one\nline two\npara two\npara three";
        CHECK(kd_text_read_bytes(q, &bytes, &n) == KD_OK && n == strlen(plain) && memcmp(bytes, plain, n) == 0);
        free(bytes);
    }
}

static void test_errors(void) {
    TEST("text data errors name the path") {
        kd_text_data d;
        char spec[600], dir[300], p[512];
        snprintf(spec, sizeof spec, "text:%s/no_such_dir", D);
        CHECK(kd_text_load(&d, spec, NULL, 0.05f) == KD_EIO && strstr(kd_error_message(), spec));
        CHECK(kd_text_load(&d, "fashion-mnist:train", NULL, 0.05f) == KD_ECONFIG);
        CHECK(kd_text_load(&d, "text:", NULL, 0.05f) == KD_ECONFIG);
        snprintf(spec, sizeof spec, "text:%s/docs", D);
        CHECK(kd_text_load(&d, spec, NULL, 0.6f) == KD_ECONFIG && strstr(kd_error_message(), spec));
        CHECK(kd_text_load(&d, spec, NULL, -0.1f) == KD_ECONFIG);
        /* nothing but a binary file */
        snprintf(dir, sizeof dir, "%.250s/binonly", D);
        CHECK(mkdir_p(dir));
        snprintf(p, sizeof p, "%s/x.bin", dir);
        CHECK(spit(p,
                   "\x7f"
                   "ELF\0\0\1",
                   7));
        snprintf(spec, sizeof spec, "text:%s", dir);
        CHECK(kd_text_load(&d, spec, NULL, 0.0f) == KD_EFORMAT && strstr(kd_error_message(), spec) &&
              strstr(kd_error_message(), "1 skipped"));
        /* only blank lines: no documents */
        snprintf(p, sizeof p, "%s/blank.txt", D);
        CHECK(spit_str(p, "\n \n\t\n"));
        snprintf(spec, sizeof spec, "text:%s", p);
        CHECK(kd_text_load(&d, spec, NULL, 0.0f) == KD_EFORMAT && strstr(kd_error_message(), spec));
        /* one document that falls in validation at 0.5: no training text */
        char doc[64];
        int k = 0;
        do snprintf(doc, sizeof doc, "document %d", k++);
        while (!in_val(doc, strlen(doc), 0.5f));
        snprintf(p, sizeof p, "%s/one_val.txt", D);
        CHECK(spit_str(p, doc));
        snprintf(spec, sizeof spec, "text:%s", p);
        CHECK(kd_text_load(&d, spec, NULL, 0.5f) == KD_EFORMAT && strstr(kd_error_message(), spec) &&
              strstr(kd_error_message(), "validation"));
        /* loads at 0; a split too short for a window */
        CHECK(kd_text_load(&d, spec, NULL, 0.0f) == KD_OK && d.n_train == strlen(doc));
        int T = (int)d.n_train; /* needs T+1 tokens */
        CHECK(kd_text_check(&d, 0, T - 1) == KD_OK);
        CHECK(kd_text_check(&d, 0, T) == KD_EFORMAT && strstr(kd_error_message(), spec) &&
              strstr(kd_error_message(), "training"));
        CHECK(kd_text_check(&d, 1, 4) == KD_EFORMAT && strstr(kd_error_message(), "validation"));
        CHECK(kd_text_n_windows(&d, 0, T) == 0 && kd_text_n_windows(&d, 1, 4) == 0);
        CHECK(kd_text_n_windows(&d, 0, T - 1) == 1);
        kd_text_free(&d);
    }
}

/* Writes ndocs single-line documents "doc I ..." into nf files of dir, the
 * file of document i chosen by (i * mul + add) % nf, names prefixed. */
static void write_docs(const char *dir, int ndocs, int nf, int mul, int add, const char *prefix) {
    FILE *f[8];
    char p[600];
    for (int j = 0; j < nf; j++) {
        snprintf(p, sizeof p, "%s/%s%d.txt", dir, prefix, j);
        f[j] = fopen(p, "w");
    }
    for (int i = 0; i < ndocs; i++) {
        FILE *o = f[(i * mul + add) % nf];
        if (o) fprintf(o, "doc %d says %d things\n\n", i, i * 37 % 101);
    }
    for (int j = 0; j < nf; j++)
        if (f[j]) fclose(f[j]);
}

/* Sorted copy of the '\n'-separated lines of a byte stream. */
static int cmp_line(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
static char **lines_of(const uint16_t *ids, size_t n, int *count) {
    char *s = malloc(n + 1);
    for (size_t i = 0; i < n; i++) s[i] = (char)ids[i];
    s[n] = '\0';
    int c = n ? 1 : 0;
    for (size_t i = 0; i < n; i++) c += s[i] == '\n';
    char **l = malloc((size_t)(c ? c : 1) * sizeof(char *));
    int k = 0;
    for (char *tok = n ? s : NULL, *nl; tok; tok = nl ? nl + 1 : NULL) {
        nl = strchr(tok, '\n');
        if (nl) *nl = '\0';
        l[k++] = strdup(tok);
    }
    free(s);
    qsort(l, (size_t)k, sizeof(char *), cmp_line);
    *count = k;
    return l;
}

static void free_lines(char **l, int n) {
    for (int i = 0; i < n; i++) free(l[i]);
    free(l);
}

static void test_split(void) {
    TEST("the split is by document hash, independent of files") {
        char a[512], b[512], sa[600], sb[600];
        snprintf(a, sizeof a, "%s/split_a", D);
        snprintf(b, sizeof b, "%s/split_b", D);
        CHECK(mkdir_p(a) && mkdir_p(b));
        int ndocs = 400;
        write_docs(a, ndocs, 3, 1, 0, "part"); /* round robin over 3 files */
        write_docs(b, ndocs, 5, 7, 2, "zz");   /* another spread over 5 other names */
        snprintf(sa, sizeof sa, "text:%s", a);
        snprintf(sb, sizeof sb, "text:%s", b);
        kd_text_data da, db;
        CHECK(kd_text_load(&da, sa, NULL, 0.25f) == KD_OK);
        CHECK(kd_text_load(&db, sb, NULL, 0.25f) == KD_OK);
        CHECK(da.n_docs_train + da.n_docs_val == ndocs && db.n_docs_val == da.n_docs_val);
        /* the documented rule gives exactly the validation set */
        int want_val = 0;
        for (int i = 0; i < ndocs; i++) {
            char doc[64];
            snprintf(doc, sizeof doc, "doc %d says %d things", i, i * 37 % 101);
            want_val += in_val(doc, strlen(doc), 0.25f);
        }
        CHECK_MSG(da.n_docs_val == want_val, "%d val documents, rule says %d", da.n_docs_val, want_val);
        CHECK(want_val > 60 && want_val < 140); /* about a quarter of 400 */
        int na, nb;
        char **la = lines_of(da.val, da.n_val, &na), **lb = lines_of(db.val, db.n_val, &nb);
        int same = na == nb && na == want_val;
        for (int i = 0; same && i < na; i++) same = strcmp(la[i], lb[i]) == 0 && in_val(la[i], strlen(la[i]), 0.25f);
        CHECK(same);
        free_lines(la, na);
        free_lines(lb, nb);
        la = lines_of(da.train, da.n_train, &na);
        lb = lines_of(db.train, db.n_train, &nb);
        same = na == nb && na == ndocs - want_val;
        for (int i = 0; same && i < na; i++) same = strcmp(la[i], lb[i]) == 0 && !in_val(la[i], strlen(la[i]), 0.25f);
        CHECK(same);
        free_lines(la, na);
        free_lines(lb, nb);
        /* the same again: deterministic */
        kd_text_data dc;
        CHECK(kd_text_load(&dc, sa, NULL, 0.25f) == KD_OK);
        CHECK(dc.n_train == da.n_train && memcmp(dc.train, da.train, da.n_train * 2) == 0 && dc.n_val == da.n_val &&
              memcmp(dc.val, da.val, da.n_val * 2) == 0);
        kd_text_free(&dc);
        /* val 0: nothing in validation; the streams of read_split match load's */
        CHECK(kd_text_load(&dc, sa, NULL, 0.0f) == KD_OK && dc.n_val == 0 && dc.n_docs_val == 0 &&
              dc.n_docs_train == ndocs);
        kd_text_free(&dc);
        uint8_t *bytes;
        size_t n;
        int nd;
        CHECK(kd_text_read_split(sa, 0.25f, 1, &bytes, &n, &nd) == KD_OK && nd == da.n_docs_val && n == da.n_val);
        same = n == da.n_val;
        for (size_t i = 0; same && i < n; i++) same = da.val[i] == bytes[i];
        CHECK(same);
        free(bytes);
        kd_text_free(&da);
        kd_text_free(&db);
    }
}

/* 1 when x (T) followed by y[T-1] occurs at some offset of s (n). */
static int window_in(const uint16_t *s, size_t n, const float *x, const float *y, int T) {
    for (int t = 0; t + 1 < T; t++)
        if (y[t] != x[t + 1]) return 0;
    for (size_t o = 0; o + (size_t)T < n; o++) {
        int ok = 1;
        for (int t = 0; ok && t < T; t++) ok = s[o + t] == x[t];
        if (ok && s[o + T] == y[T - 1]) return 1;
    }
    return 0;
}

static void test_windows(void) {
    TEST("batches and evaluation windows") {
        char spec[600];
        snprintf(spec, sizeof spec, "text:%s/split_a", D);
        kd_tokenizer tok;
        uint8_t *bytes;
        size_t nb;
        CHECK(kd_text_read_split(spec, 0.25f, 0, &bytes, &nb, NULL) == KD_OK);
        CHECK(kd_tokenizer_train(&tok, bytes, nb, 300) == KD_OK);
        free(bytes);
        kd_text_data d;
        CHECK(kd_text_load(&d, spec, &tok, 0.25f) == KD_OK);
        CHECK(d.vocab == tok.vocab && d.n_train > 100 && d.n_val > 20);
        /* the token streams decode to the byte streams */
        kd_text_data raw;
        CHECK(kd_text_load(&raw, spec, NULL, 0.25f) == KD_OK);
        uint8_t *dec = malloc(raw.n_train + 1);
        size_t m = kd_tokenizer_decode(&tok, d.train, d.n_train, dec, raw.n_train + 1);
        int same = m == raw.n_train;
        for (size_t i = 0; same && i < m; i++) same = dec[i] == raw.train[i];
        CHECK(same);
        free(dec);
        kd_text_free(&raw);

        int B = 5, T = 13;
        float *x = malloc(sizeof(float) * (size_t)B * T), *y = malloc(sizeof(float) * (size_t)B * T);
        float *x2 = malloc(sizeof(float) * (size_t)B * T), *y2 = malloc(sizeof(float) * (size_t)B * T);
        kd_rng r1, r2;
        kd_rng_seed(&r1, 3);
        kd_rng_seed(&r2, 3);
        int ok = 1, det = 1;
        for (int step = 0; step < 20; step++) {
            int split = step & 1;
            kd_text_batch(&d, split, &r1, B, T, x, y);
            kd_text_batch(&d, split, &r2, B, T, x2, y2);
            det &=
                memcmp(x, x2, sizeof(float) * (size_t)B * T) == 0 && memcmp(y, y2, sizeof(float) * (size_t)B * T) == 0;
            for (int b = 0; b < B; b++)
                ok &= window_in(split ? d.val : d.train, split ? d.n_val : d.n_train, x + b * T, y + b * T, T);
        }
        CHECK(ok);
        CHECK(det);
        /* evaluation windows: stride T, y = x shifted, each token predicted once */
        size_t nw = kd_text_n_windows(&d, 1, T);
        CHECK(nw == (d.n_val - 1) / (size_t)T && nw > 0);
        ok = 1;
        for (size_t i = 0; i < nw; i++) {
            kd_text_window(&d, 1, i, T, x, y);
            for (int t = 0; t < T; t++) ok &= x[t] == d.val[i * T + t] && y[t] == d.val[i * T + t + 1];
        }
        CHECK(ok);
        CHECK(nw * T + 1 <= d.n_val && (nw + 1) * T + 1 > d.n_val); /* the last full window is the last one */
        kd_text_free(&d);

        /* a split of exactly T+1 tokens: every batch is the whole stream;
         * T+3 tokens: the three start offsets all occur, about equally */
        kd_text_data s = {0};
        uint16_t ids[16];
        for (int i = 0; i < 16; i++) ids[i] = (uint16_t)(100 + i);
        s.train = ids;
        s.n_train = 11;
        s.vocab = 256;
        snprintf(s.name, sizeof s.name, "synthetic");
        CHECK(kd_text_check(&s, 0, 10) == KD_OK);
        kd_text_batch(&s, 0, &r1, 1, 10, x, y);
        CHECK(x[0] == 100 && y[9] == 110);
        s.n_train = 13;
        int hits[3] = {0, 0, 0};
        for (int i = 0; i < 3000; i++) {
            kd_text_batch(&s, 0, &r1, 1, 10, x, y);
            int o = (int)x[0] - 100;
            if (o >= 0 && o < 3 && y[9] == (float)(110 + o)) hits[o]++;
        }
        CHECK(hits[0] + hits[1] + hits[2] == 3000);
        CHECK(hits[0] > 850 && hits[1] > 850 && hits[2] > 850);
        free(x);
        free(y);
        free(x2);
        free(y2);
        kd_tokenizer_free(&tok);
    }
}

/* Pre-split shape of a token: all spaces, or a run of one class with at most
 * one leading space (classes as documented in kd_text.h). */
static int cls(uint8_t c) {
    if (c == ' ') return 0;
    if (c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r') return 1;
    if ((c | 32) >= 'a' && (c | 32) <= 'z') return 2;
    if (c >= 0x80) return 2;
    if (c >= '0' && c <= '9') return 3;
    return 4;
}

static int token_shape_ok(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n && p[i] == ' ') i++;
    if (i == n) return 1;
    if (i > 1) return 0;
    if (i == 1 && cls(p[1]) == 1) return 0;
    for (size_t k = i + 1; k < n; k++)
        if (cls(p[k]) != cls(p[i])) return 0;
    return 1;
}

static void test_fortunes(void) {
    TEST("the fortunes directory") {
        struct stat sb;
        CHECK_MSG(stat(FORTUNES, &sb) == 0, "%s is missing: install the Debian package fortunes", FORTUNES);
        if (stat(FORTUNES, &sb) != 0) break;
        /* independent counts: every entry (links followed), the links, the binary files */
        DIR *dir = opendir(FORTUNES);
        size_t naive = 0, real = 0;
        int links = 0, binary = 0;
        struct dirent *e;
        while (dir && (e = readdir(dir))) {
            if (e->d_name[0] == '.') continue;
            char p[600];
            snprintf(p, sizeof p, "%s/%s", FORTUNES, e->d_name);
            struct stat ls, fs;
            if (lstat(p, &ls) != 0 || stat(p, &fs) != 0) continue;
            naive += (size_t)fs.st_size;
            if (S_ISLNK(ls.st_mode)) {
                links++;
                continue;
            }
            size_t n;
            char *c = kd_test_slurp(p, &n);
            if (c && memchr(c, '\0', n))
                binary++;
            else
                real += n;
            free(c);
        }
        if (dir) closedir(dir);
        kd_text_data d;
        double t0 = now_s();
        CHECK(kd_text_load(&d, "text:" FORTUNES, NULL, 0.05f) == KD_OK);
        double t_load = now_s() - t0;
        CHECK_MSG(d.n_bytes < naive && d.n_bytes == real, "n_bytes %zu, naive sum %zu, real files %zu", d.n_bytes,
                  naive, real);
        CHECK_MSG(d.n_duplicates == links && d.n_skipped == binary && binary > 0,
                  "duplicates %d (links %d), skipped %d (binary %d)", d.n_duplicates, links, d.n_skipped, binary);
        CHECK(d.n_docs_train > 10000 && d.n_docs_val > 300 && d.n_docs_val < 2000);
        /* "text" alone with KD_TEXT_DIR is the same corpus */
        char *old = getenv("KD_TEXT_DIR") ? strdup(getenv("KD_TEXT_DIR")) : NULL;
        setenv("KD_TEXT_DIR", FORTUNES, 1);
        kd_text_data d2;
        CHECK(kd_text_load(&d2, "text", NULL, 0.05f) == KD_OK && d2.n_train == d.n_train && d2.n_val == d.n_val);
        kd_text_free(&d2);
        if (old)
            setenv("KD_TEXT_DIR", old, 1);
        else
            unsetenv("KD_TEXT_DIR");
        free(old);

        /* BPE with vocab 1024 on the training split */
        uint8_t *text;
        size_t n;
        CHECK(kd_text_read_split("text:" FORTUNES, 0.05f, 0, &text, &n, NULL) == KD_OK && n == d.n_train);
        kd_tokenizer tok;
        t0 = now_s();
        CHECK(kd_tokenizer_train(&tok, text, n, 1024) == KD_OK);
        double t_train = now_s() - t0;
        CHECK(tok.vocab == 1024);
        int shapes = 1;
        for (int t = 256; t < tok.vocab; t++) {
            size_t len;
            const uint8_t *p = kd_tokenizer_token(&tok, t, &len);
            if (!token_shape_ok(p, len)) {
                fprintf(stderr, "  token %d breaks the pre-split: '%.*s'\n", t, (int)len, (const char *)p);
                shapes = 0;
            }
        }
        CHECK(shapes);
        uint16_t *ids = malloc(n * sizeof(uint16_t));
        t0 = now_s();
        size_t k = kd_tokenizer_encode(&tok, text, n, ids);
        double t_enc = now_s() - t0;
        CHECK(k < n / 2); /* English text at vocab 1024: well over 2 bytes per token */
        uint8_t *back = malloc(n);
        CHECK(kd_tokenizer_decode(&tok, ids, k, back, n) == n && memcmp(back, text, n) == 0);
        printf("  fortunes: %.2f MB, load %.2f s; BPE 1024: train %.2f s, encode %.2f s, %.2f bytes/token\n",
               (double)n / 1e6, t_load, t_train, t_enc, (double)n / (double)k);
        free(back);
        free(ids);
        free(text);
        kd_tokenizer_free(&tok);
        kd_text_free(&d);
    }
}

/* ---------------------------------------------------------------- CLI */

/* Runs `distill ARGS` through the shell; exit code, stdout/stderr kept. */
static int run_cli(const char *args, char **out, char **err) {
    char cmd[2048], po[512], pe[512];
    pathf(po, "cli.out");
    pathf(pe, "cli.err");
    snprintf(cmd, sizeof cmd, "%s %s >%s 2>%s", kd_test_bin(), args, po, pe);
    fflush(stdout);
    int rc = system(cmd);
    *out = kd_test_slurp(po, NULL);
    *err = kd_test_slurp(pe, NULL);
    if (!*out) *out = strdup("");
    if (!*err) *err = strdup("");
    return rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static void test_cli(void) {
    TEST("distill tokenize") {
        char *out, *err, args[1500], tokp[512], *want, *got;
        pathf(tokp, "cli_tok.json");
        snprintf(args, sizeof args, "tokenize --data text:%s/split_a --vocab 300 --val 0.25 --out %s", D, tokp);
        int rc = run_cli(args, &out, &err);
        CHECK_MSG(rc == 0 && strstr(out, "vocab") && strstr(out, "bytes per token") && strstr(out, "val"),
                  "exit %d\nstdout: %s\nstderr: %s", rc, out, err);
        free(out);
        free(err);
        /* the tokenizer is the one trained on the training split only */
        char spec[600];
        snprintf(spec, sizeof spec, "text:%s/split_a", D);
        uint8_t *bytes;
        size_t n;
        kd_tokenizer tok, t2;
        CHECK(kd_text_read_split(spec, 0.25f, 0, &bytes, &n, NULL) == KD_OK);
        CHECK(kd_tokenizer_train(&tok, bytes, n, 300) == KD_OK);
        free(bytes);
        want = kd_tokenizer_to_json(&tok);
        CHECK(kd_tokenizer_load(&t2, tokp) == KD_OK);
        got = t2.vocab ? kd_tokenizer_to_json(&t2) : strdup("");
        CHECK(strcmp(want, got) == 0);
        free(want);
        free(got);
        kd_tokenizer_free(&tok);
        kd_tokenizer_free(&t2);

        rc = run_cli("tokenize --help", &out, &err);
        CHECK(rc == 0 && strstr(out, "--vocab") && strstr(out, "examples:"));
        free(out);
        free(err);
        rc = run_cli("--help", &out, &err);
        CHECK(rc == 0 && strstr(out, "tokenize"));
        free(out);
        free(err);

        static const struct {
            const char *args;
            int code;
            const char *needle;
        } bad[] = {
            {"tokenize --data text:%s/split_a --out %s/x.json", 2, "--vocab"},
            {"tokenize --data text:%s/split_a --vocab 256 --out %s/x.json", 2, "--vocab"},
            {"tokenize --data text:%s/split_a --vocab 300 --val 0.7 --out %s/x.json", 2, "--val"},
            {"tokenize --data text:%s/nope --vocab 300 --out %s/x.json", 1, "nope"},
            {"tokenize --data text:%s/binonly --vocab 300 --out %s/x.json", 1, "binonly"},
            {"tokenize --data text:%s/split_a --vocab 300 --out %s/no/such/dir/x.json", 1, "x.json"},
            {"tokenize --data text:%s/split_a --vocab 300 --bogus 1 --out %s/x.json", 2, "--bogus"},
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            snprintf(args, sizeof args, bad[i].args, D, D);
            rc = run_cli(args, &out, &err);
            CHECK_MSG(rc == bad[i].code && strncmp(err, "distill: error: ", 16) == 0 && strstr(err, bad[i].needle),
                      "'%s': exit %d (want %d), stderr: %s", args, rc, bad[i].code, err);
            free(out);
            free(err);
        }
        CHECK(access(pathf(tokp, "x.json"), F_OK) != 0);
    }
}

void test_text(void) {
    snprintf(D, sizeof D, "%.180s/text", kd_test_tmpdir());
    if (mkdir(D, 0755) != 0) {
        fprintf(stderr, "cannot create %s\n", D);
        kd_test_failed++;
        return;
    }
    test_bytes_tokenizer();
    test_presplit();
    test_train_by_hand();
    test_reference();
    test_random_round_trip();
    test_json();
    test_hostile_json();
    test_documents();
    test_errors();
    test_split();
    test_windows();
    test_fortunes();
    test_cli();
}
