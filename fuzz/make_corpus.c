/* make_corpus.c - writes the fuzzers' seed inputs and two dictionaries with
 * the library itself (run by fuzz/make_corpus.sh; the output is committed).
 *
 *   make_corpus OUT     writes OUT/corpus/{safetensors,cache,idx,tokenizer,
 *                       text,spec}/... and OUT/spec.dict, OUT/config.dict
 *
 * Seeds are small valid inputs in each harness's input layout (see the
 * fuzz_*.c headers): files written by the safetensors writer in the layouts
 * the cache builders write, IDX files plain and gzip, a trained tokenizer,
 * one spec per loss with its default arguments (from kd_loss_print_help),
 * and the config keys (from kd_config_print_schema). Deterministic: the same
 * library writes the same bytes.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

#include "kd_config.h"
#include "kd_io.h"
#include "kd_losses.h"
#include "kd_text.h"

static const char *out_dir;

static void die(const char *what) {
    fprintf(stderr, "make_corpus: %s: %s\n", what, errno ? strerror(errno) : kd_error_message());
    exit(1);
}

static void mkdirs(const char *sub) {
    char p[1024];
    snprintf(p, sizeof p, "%s/corpus", out_dir);
    if (mkdir(p, 0755) != 0 && errno != EEXIST) die(p);
    snprintf(p, sizeof p, "%s/corpus/%s", out_dir, sub);
    if (mkdir(p, 0755) != 0 && errno != EEXIST) die(p);
}

static void path_of(char *p, size_t n, const char *sub, const char *name) {
    snprintf(p, n, "%s/corpus/%s/%s", out_dir, sub, name);
}

static void put_file(const char *sub, const char *name, const void *data, size_t n) {
    char p[1024];
    path_of(p, sizeof p, sub, name);
    FILE *f = fopen(p, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0) die(p);
}

static void put_str(const char *sub, const char *name, const char *s) { put_file(sub, name, s, strlen(s)); }

static void write_st(kd_st_writer *w, const char *sub, const char *name) {
    char p[1024];
    path_of(p, sizeof p, sub, name);
    if (kd_st_write(w, p) != KD_OK) die(p);
    kd_st_writer_free(w);
}

/* ---------------------------------------------------------------- safetensors */

static void seeds_safetensors(void) {
    mkdirs("safetensors");
    kd_st_writer *w = kd_st_writer_new();
    double f64[3] = {1.5, -2.25, 1e300};
    float f32[6] = {0, 1, -1, 0.5f, 3e38f, -1e-40f};
    uint16_t h[4] = {kd_f32_to_f16(1), kd_f32_to_f16(-2), 0x7c00, 0x7e00};
    uint16_t bf[2] = {kd_f32_to_bf16(3.0f), kd_f32_to_bf16(-0.125f)};
    int64_t i64[2] = {-5, 1ll << 40};
    int32_t i32[2] = {-7, 123456};
    int16_t i16[2] = {-300, 300};
    int8_t i8[2] = {-128, 127};
    uint8_t u8[3] = {0, 128, 255}, b8[2] = {0, 1};
    int64_t s3[1] = {3}, s23[2] = {2, 3}, s4[1] = {4}, s2[1] = {2}, s12[2] = {1, 2}, s03[2] = {0, 3};
    kd_st_add(w, "f64", KD_F64, 1, s3, f64);
    kd_st_add(w, "f32", KD_F32, 2, s23, f32);
    kd_st_add(w, "f16", KD_F16, 1, s4, h);
    kd_st_add(w, "bf16", KD_BF16, 2, s12, bf);
    kd_st_add(w, "i64", KD_I64, 1, s2, i64);
    kd_st_add(w, "i32", KD_I32, 1, s2, i32);
    kd_st_add(w, "i16", KD_I16, 1, s2, i16);
    kd_st_add(w, "i8", KD_I8, 1, s2, i8);
    kd_st_add(w, "u8", KD_U8, 1, s3, u8);
    kd_st_add(w, "bool", KD_BOOL, 1, s2, b8);
    kd_st_add(w, "scalar", KD_F32, 0, NULL, f32 + 1);
    kd_st_add(w, "empty", KD_F32, 2, s03, NULL);
    kd_st_set_meta(w, "format", "pt");
    kd_st_set_meta(w, "note", "caf\xc3\xa9 \"quoted\" \\ \xe2\x82\xac");
    write_st(w, "safetensors", "all_dtypes.safetensors");

    w = kd_st_writer_new();
    write_st(w, "safetensors", "empty.safetensors");
}

/* ---------------------------------------------------------------- caches */

static void cache_meta(kd_st_writer *w, int n, int K, int views, int crop, int flip, int topk) {
    char b[32];
    kd_st_set_meta(w, "format", "distill-cache/1");
    snprintf(b, sizeof b, "%d", n);
    kd_st_set_meta(w, "examples", b);
    snprintf(b, sizeof b, "%d", K);
    kd_st_set_meta(w, "classes", b);
    snprintf(b, sizeof b, "%d", views);
    kd_st_set_meta(w, "views", b);
    snprintf(b, sizeof b, "%d", crop);
    kd_st_set_meta(w, "crop", b);
    snprintf(b, sizeof b, "%d", flip);
    kd_st_set_meta(w, "flip", b);
    kd_st_set_meta(w, "seed", "7");
    snprintf(b, sizeof b, "%d", topk);
    kd_st_set_meta(w, "topk", b);
}

static void seeds_cache(void) {
    mkdirs("cache");
    /* full logits, F32, no views: (1, 3, 4) */
    kd_st_writer *w = kd_st_writer_new();
    float z[12] = {1, 2, 3, 4, -1, 0, 1, 0.5f, 9, -9, 0, 0};
    int64_t s134[3] = {1, 3, 4};
    kd_st_add(w, "logits", KD_F32, 3, s134, z);
    cache_meta(w, 3, 4, 0, 0, 0, 0);
    write_st(w, "cache", "full_f32.safetensors");

    /* full logits, F16, two augmented views: (2, 3, 4) and views (2, 3, 3) */
    w = kd_st_writer_new();
    uint16_t h[24];
    for (int i = 0; i < 24; i++) h[i] = kd_f32_to_f16((float)(i % 7) - 3.0f);
    int16_t v[18];
    for (int i = 0; i < 18; i++) v[i] = (int16_t)(i % 3 == 2 ? i % 2 : i % 5);
    int64_t s234[3] = {2, 3, 4}, s233[3] = {2, 3, 3};
    kd_st_add(w, "logits", KD_F16, 3, s234, h);
    kd_st_add(w, "views", KD_I16, 3, s233, v);
    cache_meta(w, 3, 4, 2, 2, 1, 0);
    write_st(w, "cache", "full_f16_views.safetensors");

    /* top-2 of 5 classes: values F16 (1, 3, 2), indices I32, lse_rest F32 (1, 3) */
    w = kd_st_writer_new();
    uint16_t tv[6];
    for (int i = 0; i < 6; i++) tv[i] = kd_f32_to_f16(5.0f - (float)i);
    int32_t ti[6] = {4, 0, 1, 2, 3, 4};
    float rest[3] = {0.5f, -1, 2};
    int64_t s132[3] = {1, 3, 2}, s13[2] = {1, 3};
    kd_st_add(w, "topk.values", KD_F16, 3, s132, tv);
    kd_st_add(w, "topk.indices", KD_I32, 3, s132, ti);
    kd_st_add(w, "topk.lse_rest", KD_F32, 2, s13, rest);
    cache_meta(w, 3, 5, 0, 0, 0, 2);
    write_st(w, "cache", "topk.safetensors");

    /* LM cache: 2 windows of seq 4 (5 tokens), top-3 of a vocabulary of 16 */
    w = kd_st_writer_new();
    uint16_t tok[10] = {1, 5, 9, 15, 0, 2, 2, 3, 14, 7}, ids[24], lp[24], tail[8];
    for (int r = 0; r < 8; r++) {
        for (int j = 0; j < 3; j++) {
            ids[r * 3 + j] = (uint16_t)((r + 5 * j) % 16);
            lp[r * 3 + j] = kd_f32_to_f16(-0.5f - (float)j);
        }
        tail[r] = kd_f32_to_f16(0.1f);
    }
    int64_t ts[2] = {2, 5}, ks[3] = {2, 4, 3}, ps[2] = {2, 4};
    kd_st_add(w, "lm.tokens", KD_I16, 2, ts, tok);
    kd_st_add(w, "lm.ids", KD_I16, 3, ks, ids);
    kd_st_add(w, "lm.logp", KD_F16, 3, ks, lp);
    kd_st_add(w, "lm.tail", KD_F16, 2, ps, tail);
    kd_st_set_meta(w, "format", "distill-lm-cache/1");
    kd_st_set_meta(w, "vocab", "16");
    kd_st_set_meta(w, "seq", "4");
    kd_st_set_meta(w, "topk", "3");
    kd_st_set_meta(w, "temperature", "2");
    write_st(w, "cache", "lm.safetensors");
}

/* ---------------------------------------------------------------- idx */

static size_t idx_file(uint8_t *buf, int images, int n, int h, int wd) {
    uint32_t dims[4] = {images ? 0x803u : 0x801u, (uint32_t)n, (uint32_t)h, (uint32_t)wd};
    int nd = images ? 4 : 2;
    size_t k = 0;
    for (int i = 0; i < nd; i++)
        for (int b = 3; b >= 0; b--) buf[k++] = (uint8_t)(dims[i] >> (8 * b));
    size_t payload = images ? (size_t)n * h * wd : (size_t)n;
    for (size_t i = 0; i < payload; i++) buf[k++] = images ? (uint8_t)(i * 37 % 256) : (uint8_t)(i * 5 % 10);
    return k;
}

/* gzip of src into dst (capacity cap); returns the length */
static size_t gzip_mem(uint8_t *dst, size_t cap, const uint8_t *src, size_t n) {
    z_stream zs = {0};
    if (deflateInit2(&zs, 6, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY) != Z_OK) die("deflateInit2");
    zs.next_in = (uint8_t *)src;
    zs.avail_in = (unsigned)n;
    zs.next_out = dst;
    zs.avail_out = (unsigned)cap;
    if (deflate(&zs, Z_FINISH) != Z_STREAM_END) die("deflate");
    size_t len = zs.total_out;
    deflateEnd(&zs);
    return len;
}

/* the harness layout: flags, label length (LE16), labels, images */
static void idx_seed(const char *name, int flags, const uint8_t *lab, size_t nl, const uint8_t *img, size_t ni) {
    uint8_t *b = malloc(3 + nl + ni);
    if (!b) die("malloc");
    b[0] = (uint8_t)flags;
    b[1] = (uint8_t)(nl & 0xff);
    b[2] = (uint8_t)(nl >> 8);
    memcpy(b + 3, lab, nl);
    memcpy(b + 3 + nl, img, ni);
    put_file("idx", name, b, 3 + nl + ni);
    free(b);
}

static void seeds_idx(void) {
    mkdirs("idx");
    uint8_t lab[64], img[512], glab[256], gimg[1024];
    size_t nl = idx_file(lab, 0, 3, 0, 0), ni = idx_file(img, 1, 3, 4, 5);
    idx_seed("plain", 0, lab, nl, img, ni);
    idx_seed("gzip_by_harness", 3, lab, nl, img, ni);
    size_t gl = gzip_mem(glab, sizeof glab, lab, nl), gi = gzip_mem(gimg, sizeof gimg, img, ni);
    idx_seed("gzip_raw", 0, glab, gl, gimg, gi);
    nl = idx_file(lab, 0, 1, 0, 0);
    ni = idx_file(img, 1, 1, 1, 1);
    idx_seed("one_pixel", 0, lab, nl, img, ni);
}

/* ---------------------------------------------------------------- tokenizer, text */

static const char sample_text[] = "It was the best of times, it was the worst of times, it was the age of wisdom.\n"
                                  "  Indented line\twith a tab; numbers 1234 and 56.78 -- punctuation!?\n"
                                  "UTF-8: caf\xc3\xa9, na\xc3\xafve, \xe2\x82\xac 5, \xf0\x9f\x98\x80 smile\n";

static void seeds_tokenizer(void) {
    mkdirs("tokenizer");
    kd_tokenizer tok;
    if (kd_tokenizer_train(&tok, (const uint8_t *)sample_text, sizeof sample_text - 1, 300) != KD_OK) die("train");
    char *js = kd_tokenizer_to_json(&tok);
    size_t jl = strlen(js), tl = sizeof sample_text - 1;
    char *b = malloc(jl + 1 + tl);
    if (!b) die("malloc");
    memcpy(b, js, jl + 1);
    memcpy(b + jl + 1, sample_text, tl);
    put_file("tokenizer", "trained", b, jl + 1 + tl);
    free(b);
    free(js);
    kd_tokenizer_free(&tok);

    kd_tokenizer_bytes(&tok);
    js = kd_tokenizer_to_json(&tok);
    jl = strlen(js);
    static const char bin[] = "\x00\x01\xff\xfe binary \x80\x80 and text";
    b = malloc(jl + 1 + sizeof bin - 1);
    if (!b) die("malloc");
    memcpy(b, js, jl + 1);
    memcpy(b + jl + 1, bin, sizeof bin - 1);
    put_file("tokenizer", "bytes", b, jl + 1 + sizeof bin - 1);
    free(b);
    free(js);
    kd_tokenizer_free(&tok);
}

static void seeds_text(void) {
    mkdirs("text");
    put_str("text", "fortunes", "A fortune.\n%\nAnother one,\n  over two lines.\n%\n%\n\t-- Someone\n%\n");
    put_str("text", "paragraphs", sample_text);
    put_str("text", "paragraphs2", "First paragraph.\n\n \t \nSecond\r\nparagraph.\r\n\r\nThird.");
    static const char two[] = "file a: text\n\nmore\0file b: \xc3\xa9t\xc3\xa9\n%\nfortune b\n";
    put_file("text", "two_files", two, sizeof two - 1);
    static const char bad[] = "valid\0invalid \xc0\xaf utf-8";
    put_file("text", "invalid_second", bad, sizeof bad - 1);
}

/* ---------------------------------------------------------------- spec, dictionaries */

static FILE *open_out(const char *name) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", out_dir, name);
    FILE *f = fopen(p, "w");
    if (!f) die(p);
    return f;
}

static void seeds_spec(void) {
    mkdirs("spec");
    char *help = NULL;
    size_t hn = 0;
    FILE *m = open_memstream(&help, &hn);
    if (!m) die("open_memstream");
    kd_loss_print_help(m);
    fclose(m);
    FILE *dict = open_out("spec.dict");
    fprintf(dict, "# loss names and argument keys (written by fuzz/make_corpus.sh)\n");
    fprintf(dict,
            "\"+\"\n\"(\"\n\")\"\n\"=\"\n\", \"\n\"weight=\"\n\"feat\"\n\"block1\"\n\"auto\"\n\"linear\"\n\"mlp\"\n");
    int n = 0;
    for (char *line = strtok(help, "\n"); line; line = strtok(NULL, "\n")) {
        char name[64], spec[512];
        if (sscanf(line, " %63s", name) != 1 || strcmp(name, "every") == 0) continue;
        fprintf(dict, "\"%s\"\n", name);
        size_t k = (size_t)snprintf(spec, sizeof spec, "%s", name);
        const char *p = strstr(line, name) + strlen(name);
        int nargs = 0;
        for (;;) {
            char tok[128];
            int used;
            if (sscanf(p, " %127s%n", tok, &used) != 1 || !strchr(tok, '=')) break;
            p += used;
            k += (size_t)snprintf(spec + k, sizeof spec - k, "%s%s", nargs++ ? ", " : "(", tok);
            *strchr(tok, '=') = '\0';
            fprintf(dict, "\"%s=\"\n", tok);
        }
        if (nargs) snprintf(spec + k, sizeof spec - k, ")");
        char fname[80];
        snprintf(fname, sizeof fname, "%02d_%s", n++, name);
        put_str("spec", fname, spec);
    }
    fclose(dict);
    free(help);
    put_str("spec", "mix", "ce(weight=0.1) + kd(T=4, weight=0.9)");
    put_str("spec", "mix_feat", "ce + fitnet(proj=linear, weight=2) + at(p=2) + rkd");
    put_str("spec", "crd_small", "crd(n_data=8, dim=8, nce_k=16) + crd(inbatch=1, dim=4, weight=0.5)");
    put_str("spec", "dkd_warm", "dkd(alpha=1, beta=8, T=4, warmup=2) + mlkd(temps=2-4)");
}

static void dict_config(void) {
    char *schema = NULL;
    size_t sn = 0;
    FILE *m = open_memstream(&schema, &sn);
    if (!m) die("open_memstream");
    kd_config_print_schema(m);
    fclose(m);
    FILE *dict = open_out("config.dict");
    fprintf(dict, "# sections and keys (written by fuzz/make_corpus.sh)\n");
    fprintf(dict, "\"=\"\n\" = \"\n\"\\x0a\"\n\"; \"\n\"\\x00\"\n\"true\"\n\"false\"\n\"1e-3\"\n\"mlp: 128\"\n");
    fprintf(dict, "\"cnn: c16 p f128\"\n\"gpt: \"\n\"fashion-mnist:train\"\n\"idx:\"\n\"text:\"\n");
    char sec[64] = "";
    for (char *line = strtok(schema, "\n"); line; line = strtok(NULL, "\n")) {
        char w[64];
        if (sscanf(line, " [%63[^]]]", w) == 1) {
            snprintf(sec, sizeof sec, "%s", w);
            fprintf(dict, "\"[%s]\"\n", sec);
        } else if (sscanf(line, " %63s", w) == 1) {
            fprintf(dict, "\"%s\"\n\"%s.%s=\"\n", w, sec, w);
        }
    }
    fclose(dict);
    free(schema);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: make_corpus OUT_DIR\n");
        return 2;
    }
    out_dir = argv[1];
    seeds_safetensors();
    seeds_cache();
    seeds_idx();
    seeds_tokenizer();
    seeds_text();
    seeds_spec();
    dict_config();
    return 0;
}
