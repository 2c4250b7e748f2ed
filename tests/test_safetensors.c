/* test_safetensors.c - tests for src/io/safetensors.c.
 *
 * Round trips through our writer, the fp16/bf16 conversions against values
 * worked out by hand (and exhaustive round trips over all 2^16 codes), a
 * fixture written by Python's `safetensors` library, atomic-write failures,
 * and one hand-built hostile file per rejection rule in docs/formats.md.
 *
 * Deliberately not here: anything needing Python at test time (the fixture
 * is committed; tests/fixtures/gen_safetensors.py regenerates it).
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd_io.h"
#include "test.h"

/* ---------------------------------------------------------------- helpers */

static const char *tpath(const char *name, char *buf, size_t n) {
    snprintf(buf, n, "%s/%s", kd_test_tmpdir(), name);
    return buf;
}

static int write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(p, 1, n, f) == n;
    return (fclose(f) == 0) && ok;
}

/* Whole file into a malloc'd buffer; NULL when it cannot be read. */
static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *b = NULL;
    size_t len = 0, cap = 0, got;
    do {
        if (len == cap) b = realloc(b, cap = cap ? 2 * cap : 4096);
        got = fread(b + len, 1, cap - len, f);
        len += got;
    } while (got > 0);
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b);
        return NULL;
    }
    *n = len;
    return b;
}

/* A safetensors file from parts: the 8-byte length field (which may lie),
 * the header bytes and the payload. */
static int write_st_raw(const char *path, uint64_t hlen_field, const char *hdr, size_t hdr_n, const void *payload,
                        size_t plen) {
    size_t n = 8 + hdr_n + plen;
    uint8_t *b = malloc(n);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(hlen_field >> (8 * i));
    memcpy(b + 8, hdr, hdr_n);
    if (plen) memcpy(b + 8 + hdr_n, payload, plen);
    int ok = write_bytes(path, b, n);
    free(b);
    return ok;
}

static int write_st(const char *path, const char *hdr, const void *payload, size_t plen) {
    return write_st_raw(path, strlen(hdr), hdr, strlen(hdr), payload, plen);
}

/* Reads path expecting failure `want`; the message must contain the path and
 * each non-NULL needle, and the output struct must be left empty. */
static void expect_reject(const char *path, kd_status want, const char *n1, const char *n2, const char *n3) {
    kd_safetensors st;
    memset(&st, 0x5a, sizeof st);
    kd_status rc = kd_st_read(path, &st);
    const char *msg = kd_error_message();
    CHECK_MSG(rc == want, "status %d, want %d (%s)", (int)rc, (int)want, msg);
    CHECK_MSG(strstr(msg, path) != NULL, "message lacks the path: %s", msg);
    const char *needles[3] = {n1, n2, n3};
    for (int i = 0; i < 3; i++)
        if (needles[i]) CHECK_MSG(strstr(msg, needles[i]) != NULL, "message lacks '%s': %s", needles[i], msg);
    CHECK(st.buf == NULL && st.tensors == NULL && st.n == 0 && st.path == NULL && st.meta_keys == NULL);
    if (rc == KD_OK) kd_st_free(&st);
}

/* a hostile file whose header is `hdr` and whose payload is `plen` zero bytes */
static void reject_header(const char *file, const char *hdr, size_t plen, const char *n1, const char *n2,
                          const char *n3) {
    char p[512];
    uint8_t zeros[256] = {0};
    KD_ASSERT(plen <= sizeof zeros, "payload");
    CHECK(write_st(tpath(file, p, sizeof p), hdr, zeros, plen));
    expect_reject(p, KD_EFORMAT, n1, n2, n3);
}

static int file_exists(const char *path) { return access(path, F_OK) == 0; }

/* Any "NAME.tmp.*" left next to path? */
static int temp_left(const char *path) {
    char t[600];
    snprintf(t, sizeof t, "%s.tmp.%ld", path, (long)getpid());
    return file_exists(t);
}

/* ---------------------------------------------------------------- fp16 / bf16 */

static void test_half(void) {
    TEST("f16 exact values") {
        /* sign | 5-bit exponent (bias 15) | 10-bit mantissa, worked out by hand */
        CHECK(kd_f32_to_f16(1.0f) == 0x3c00);
        CHECK(kd_f32_to_f16(-2.0f) == 0xc000);
        CHECK(kd_f32_to_f16(0.5f) == 0x3800);
        CHECK(kd_f32_to_f16(65504.0f) == 0x7bff);    /* largest finite */
        CHECK(kd_f32_to_f16(0x1p-14f) == 0x0400);    /* smallest normal */
        CHECK(kd_f32_to_f16(0x1p-24f) == 0x0001);    /* smallest subnormal */
        CHECK(kd_f32_to_f16(0x3ffp-24f) == 0x03ff);  /* largest subnormal */
        CHECK(kd_f32_to_f16(-0.0f) == 0x8000);
        CHECK(kd_f32_to_f16(0.0f) == 0x0000);
        CHECK(kd_f16_to_f32(0x3c00) == 1.0f);
        CHECK(kd_f16_to_f32(0xc000) == -2.0f);
        CHECK(kd_f16_to_f32(0x7bff) == 65504.0f);
        CHECK(kd_f16_to_f32(0x0001) == 0x1p-24f);
        CHECK(kd_f16_to_f32(0x03ff) == 0x3ffp-24f);
        CHECK(kd_f16_to_f32(0x8001) == -0x1p-24f);
        CHECK(kd_f16_to_f32(0x3555) == 0x1.554p-2f); /* 0.333251953125 */
    }
    TEST("f16 rounding") {
        /* ties to even: 1 + 2^-11 is halfway between 0x3c00 and 0x3c01 */
        CHECK(kd_f32_to_f16(1.0f + 0x1p-11f) == 0x3c00);
        CHECK(kd_f32_to_f16(1.0f + 3 * 0x1p-11f) == 0x3c02);
        CHECK(kd_f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f) == 0x3c01); /* just above the tie */
        /* subnormal ties: 2^-25 is halfway between 0 and 2^-24 */
        CHECK(kd_f32_to_f16(0x1p-25f) == 0x0000);
        CHECK(kd_f32_to_f16(0x1.0002p-25f) == 0x0001);
        CHECK(kd_f32_to_f16(0x3p-25f) == 0x0002);
        CHECK(kd_f32_to_f16(0x1p-30f) == 0x0000);
        CHECK(kd_f32_to_f16(1e-45f) == 0x0000); /* float subnormal */
        /* rounding up out of the subnormal range into the smallest normal */
        CHECK(kd_f32_to_f16(0x7ffp-25f) == 0x0400);
        /* overflow: 65520 is halfway between 65504 and 65536, ties to inf */
        CHECK(kd_f32_to_f16(65519.0f) == 0x7bff);
        CHECK(kd_f32_to_f16(65520.0f) == 0x7c00);
        CHECK(kd_f32_to_f16(-1e10f) == 0xfc00);
        /* 1/3: the nearest fp16 is closer than both neighbours */
        float third = 1.0f / 3.0f;
        uint16_t h = kd_f32_to_f16(third);
        double e0 = fabs((double)kd_f16_to_f32(h) - 1.0 / 3.0);
        CHECK(e0 < fabs((double)kd_f16_to_f32(h + 1) - 1.0 / 3.0));
        CHECK(e0 < fabs((double)kd_f16_to_f32(h - 1) - 1.0 / 3.0));
        CHECK(e0 <= 0x1p-13); /* half an ulp in [1/4, 1/2) */
    }
    TEST("f16 inf nan") {
        CHECK(kd_f32_to_f16(INFINITY) == 0x7c00);
        CHECK(kd_f32_to_f16(-INFINITY) == 0xfc00);
        uint16_t n = kd_f32_to_f16(NAN);
        CHECK((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0);
        CHECK(isnan(kd_f16_to_f32(0x7e00)));
        CHECK(isnan(kd_f16_to_f32(0xfc01)));
        CHECK(isinf(kd_f16_to_f32(0x7c00)) && kd_f16_to_f32(0x7c00) > 0);
        CHECK(isinf(kd_f16_to_f32(0xfc00)) && kd_f16_to_f32(0xfc00) < 0);
    }
    TEST("f16 all codes") {
        /* every non-NaN code survives f16 -> f32 -> f16, and positive codes
         * decode to strictly increasing values */
        int bad_rt = 0, bad_mono = 0;
        for (uint32_t c = 0; c < 65536; c++) {
            uint16_t h = (uint16_t)c;
            float f = kd_f16_to_f32(h);
            if (isnan(f)) continue;
            if (kd_f32_to_f16(f) != h) bad_rt++;
            if (c > 0 && c <= 0x7c00 && !(kd_f16_to_f32((uint16_t)(c - 1)) < f)) bad_mono++;
        }
        CHECK_MSG(bad_rt == 0, "%d codes do not round-trip", bad_rt);
        CHECK_MSG(bad_mono == 0, "%d codes out of order", bad_mono);
    }
    TEST("bf16") {
        /* bf16 is the top half of a float32 */
        CHECK(kd_f32_to_bf16(1.0f) == 0x3f80);
        CHECK(kd_f32_to_bf16(-2.0f) == 0xc000);
        CHECK(kd_bf16_to_f32(0x3f80) == 1.0f);
        CHECK(kd_bf16_to_f32(0x4049) == 3.140625f);
        CHECK(kd_f32_to_bf16(1.0f / 3.0f) == 0x3eab); /* 0x3eaaaaab: dropped half 0xaaab > 0x8000 rounds up */
        CHECK(kd_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80); /* tie, kept part even: down */
        CHECK(kd_f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82); /* tie, kept part odd: up */
        CHECK(kd_f32_to_bf16(0x1p-133f) == 0x0001); /* float subnormal, exact in bf16 */
        CHECK(kd_f32_to_bf16(3.4028235e38f) == 0x7f80); /* FLT_MAX rounds to inf */
        CHECK(kd_f32_to_bf16(INFINITY) == 0x7f80);
        CHECK(kd_f32_to_bf16(-INFINITY) == 0xff80);
        uint16_t n = kd_f32_to_bf16(NAN);
        CHECK((n & 0x7f80) == 0x7f80 && (n & 0x7f) != 0);
        uint32_t snan_bits = 0x7f800001; /* payload only in the dropped half: must stay a NaN */
        float snan;
        memcpy(&snan, &snan_bits, 4);
        CHECK(isnan(kd_bf16_to_f32(kd_f32_to_bf16(snan))));
        float third = 1.0f / 3.0f;
        uint16_t h = kd_f32_to_bf16(third);
        double e0 = fabs((double)kd_bf16_to_f32(h) - third);
        CHECK(e0 < fabs((double)kd_bf16_to_f32(h + 1) - third) && e0 < fabs((double)kd_bf16_to_f32(h - 1) - third));
        int bad = 0;
        for (uint32_t c = 0; c < 65536; c++) {
            float f = kd_bf16_to_f32((uint16_t)c);
            if (!isnan(f) && kd_f32_to_bf16(f) != c) bad++;
        }
        CHECK_MSG(bad == 0, "%d bf16 codes do not round-trip", bad);
    }
    TEST("dtype names and sizes") {
        CHECK(strcmp(kd_dtype_name(KD_F32), "F32") == 0 && kd_dtype_size(KD_F32) == 4);
        CHECK(strcmp(kd_dtype_name(KD_BF16), "BF16") == 0 && kd_dtype_size(KD_BF16) == 2);
        CHECK(strcmp(kd_dtype_name(KD_F64), "F64") == 0 && kd_dtype_size(KD_F64) == 8);
        CHECK(strcmp(kd_dtype_name(KD_I64), "I64") == 0 && kd_dtype_size(KD_I64) == 8);
        CHECK(strcmp(kd_dtype_name(KD_BOOL), "BOOL") == 0 && kd_dtype_size(KD_BOOL) == 1);
        CHECK(strcmp(kd_dtype_name(KD_U8), "U8") == 0 && kd_dtype_size(KD_I16) == 2);
    }
}

/* ---------------------------------------------------------------- round trip */

static void test_round_trip(void) {
    char p[512];
    tpath("rt.safetensors", p, sizeof p);

    float w[6] = {1.5f, -2.25f, 0.0f, 3e-3f, 1e30f, -7.0f};
    uint16_t h[5], bf[3];
    float hv[5] = {0.5f, -1.0f, 65504.0f, 0x1p-24f, 3.0f}; /* all exact in fp16 */
    for (int i = 0; i < 5; i++) h[i] = kd_f32_to_f16(hv[i]);
    float bv[3] = {1.0f, -0.5f, 256.0f}; /* exact in bf16 */
    for (int i = 0; i < 3; i++) bf[i] = kd_f32_to_bf16(bv[i]);
    double sc = 2.75;
    int64_t i64[3] = {-5, 0, 1ll << 40};
    int32_t i32[4] = {-3, 7, 100000, -2147483647};
    int16_t i16[2] = {-300, 300};
    int8_t i8[3] = {-128, 0, 127};
    uint8_t u8[3] = {0, 128, 255}, bl[4] = {1, 0, 0, 1};

    kd_st_writer *wr = kd_st_writer_new();
    int ws[2] = {2, 3};
    kd_st_add_f32(wr, "w", 2, ws, w);
    int64_t s5[1] = {5}, s3[1] = {3}, s22[2] = {2, 2}, s2[1] = {2}, s4[1] = {4}, s04[2] = {0, 4};
    kd_st_add(wr, "half", KD_F16, 1, s5, h); /* odd byte count before wider types */
    kd_st_add(wr, "bf", KD_BF16, 1, s3, bf);
    kd_st_add(wr, "scalar", KD_F64, 0, NULL, &sc);
    kd_st_add(wr, "i64", KD_I64, 1, s3, i64);
    kd_st_add(wr, "i32", KD_I32, 2, s22, i32);
    kd_st_add(wr, "i16", KD_I16, 1, s2, i16);
    kd_st_add(wr, "i8", KD_I8, 1, s3, i8);
    kd_st_add(wr, "u8", KD_U8, 1, s3, u8);
    kd_st_add(wr, "mask", KD_BOOL, 1, s4, bl);
    kd_st_add(wr, "empty", KD_F32, 2, s04, NULL);
    kd_st_set_meta(wr, "format", "pt");
    kd_st_set_meta(wr, "note", "first");
    kd_st_set_meta(wr, "note", "second \"quoted\" \xc3\xa9"); /* overwrite; JSON escapes; UTF-8 */
    kd_status rc = kd_st_write(wr, p);
    kd_st_writer_free(wr);

    TEST("round trip: write") {
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        CHECK(!temp_left(p));
    }
    kd_safetensors st;
    rc = kd_st_read(p, &st);
    TEST("round trip: read") {
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
    }
    if (rc != KD_OK) return;
    TEST("round trip: names, order, dtypes, shapes") {
        static const char *names[] = {"w", "half", "bf", "scalar", "i64", "i32", "i16", "i8", "u8", "mask", "empty"};
        static const kd_dtype dts[] = {KD_F32, KD_F16, KD_BF16, KD_F64, KD_I64, KD_I32,
                                       KD_I16, KD_I8,  KD_U8,   KD_BOOL, KD_F32};
        static const int nd[] = {2, 1, 1, 0, 1, 2, 1, 1, 1, 1, 2};
        CHECK(st.n == 11);
        for (int i = 0; i < st.n && i < 11; i++) {
            CHECK_MSG(strcmp(st.tensors[i].name, names[i]) == 0, "tensor %d is '%s', want '%s'", i, st.tensors[i].name,
                      names[i]);
            CHECK(st.tensors[i].dtype == dts[i]);
            CHECK(st.tensors[i].ndim == nd[i]);
        }
        const kd_st_tensor *t = kd_st_find(&st, "i32");
        CHECK(t && t->shape[0] == 2 && t->shape[1] == 2 && t->nbytes == 16);
        t = kd_st_find(&st, "empty");
        CHECK(t && t->shape[0] == 0 && t->shape[1] == 4 && t->nbytes == 0);
        t = kd_st_find(&st, "scalar");
        CHECK(t && t->nbytes == 8);
        CHECK(kd_st_find(&st, "nope") == NULL);
        CHECK(kd_st_find(&st, "__metadata__") == NULL);
    }
    TEST("round trip: bytes") {
        struct {
            const char *name;
            const void *p;
            size_t n;
        } want[] = {{"w", w, sizeof w},       {"half", h, sizeof h}, {"bf", bf, sizeof bf}, {"scalar", &sc, 8},
                    {"i64", i64, sizeof i64}, {"i32", i32, sizeof i32}, {"i16", i16, sizeof i16}, {"i8", i8, 3},
                    {"u8", u8, 3},            {"mask", bl, 4}};
        for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
            const kd_st_tensor *t = kd_st_find(&st, want[i].name);
            CHECK_MSG(t && t->nbytes == want[i].n && memcmp(t->data, want[i].p, want[i].n) == 0, "tensor %s",
                      want[i].name);
        }
    }
    TEST("round trip: metadata") {
        CHECK(st.n_meta == 2);
        const char *f = kd_st_meta(&st, "format"), *n = kd_st_meta(&st, "note");
        CHECK(f && strcmp(f, "pt") == 0);
        CHECK(n && strcmp(n, "second \"quoted\" \xc3\xa9") == 0);
        CHECK(kd_st_meta(&st, "missing") == NULL);
    }
    TEST("round trip: alignment") {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | st.buf[i];
        CHECK_MSG((8 + hlen) % 8 == 0, "payload starts at %llu", (unsigned long long)(8 + hlen));
        CHECK(st.buf[8] == '{');
        /* padding is spaces after the closing brace */
        size_t k = 8 + hlen;
        while (k > 8 && st.buf[k - 1] == ' ') k--;
        CHECK(k > 8 && st.buf[k - 1] == '}' && 8 + hlen - k < 8);
        const uint8_t *payload = st.buf + 8 + hlen;
        for (int i = 0; i < st.n; i++) {
            size_t off = (size_t)(st.tensors[i].data - payload);
            CHECK_MSG(off % kd_dtype_size(st.tensors[i].dtype) == 0, "tensor %s at payload offset %zu",
                      st.tensors[i].name, off);
        }
        /* data is contiguous: offsets tile [0, payload length) */
        size_t total = 0;
        for (int i = 0; i < st.n; i++) total += st.tensors[i].nbytes;
        CHECK(total == st.buf_len - 8 - hlen);
    }
    TEST("get_f32 converts every dtype") {
        float out[6];
        int s23[2] = {2, 3}, s5i[1] = {5}, s3i[1] = {3}, s22i[2] = {2, 2}, s2i[1] = {2}, s4i[1] = {4}, s04i[2] = {0, 4};
        CHECK(kd_st_get_f32(&st, "w", out, 2, s23) == KD_OK);
        CHECK_ARRAYS("w", out, w, 6, 0, 0);
        CHECK(kd_st_get_f32(&st, "half", out, 1, s5i) == KD_OK);
        CHECK_ARRAYS("half", out, hv, 5, 0, 0);
        CHECK(kd_st_get_f32(&st, "bf", out, 1, s3i) == KD_OK);
        CHECK_ARRAYS("bf", out, bv, 3, 0, 0);
        CHECK(kd_st_get_f32(&st, "scalar", out, 0, NULL) == KD_OK);
        CHECK(out[0] == 2.75f);
        float e64[3] = {-5.0f, 0.0f, 1099511627776.0f};
        CHECK(kd_st_get_f32(&st, "i64", out, 1, s3i) == KD_OK);
        CHECK_ARRAYS("i64", out, e64, 3, 0, 0);
        float e32[4] = {-3.0f, 7.0f, 100000.0f, -2147483647.0f};
        CHECK(kd_st_get_f32(&st, "i32", out, 2, s22i) == KD_OK);
        CHECK_ARRAYS("i32", out, e32, 4, 0, 0);
        float e16[2] = {-300.0f, 300.0f};
        CHECK(kd_st_get_f32(&st, "i16", out, 1, s2i) == KD_OK);
        CHECK_ARRAYS("i16", out, e16, 2, 0, 0);
        float e8[3] = {-128.0f, 0.0f, 127.0f};
        CHECK(kd_st_get_f32(&st, "i8", out, 1, s3i) == KD_OK);
        CHECK_ARRAYS("i8", out, e8, 3, 0, 0);
        float eu[3] = {0.0f, 128.0f, 255.0f};
        CHECK(kd_st_get_f32(&st, "u8", out, 1, s3i) == KD_OK);
        CHECK_ARRAYS("u8", out, eu, 3, 0, 0);
        float eb[4] = {1.0f, 0.0f, 0.0f, 1.0f};
        CHECK(kd_st_get_f32(&st, "mask", out, 1, s4i) == KD_OK);
        CHECK_ARRAYS("mask", out, eb, 4, 0, 0);
        out[0] = 42.0f;
        CHECK(kd_st_get_f32(&st, "empty", out, 2, s04i) == KD_OK);
        CHECK(out[0] == 42.0f); /* nothing written */
    }
    TEST("get_f32 errors") {
        float out[8];
        int s32[2] = {3, 2}, s6[1] = {6};
        CHECK(kd_st_get_f32(&st, "w", out, 2, s32) == KD_ESHAPE);
        char want[700];
        snprintf(want, sizeof want, "%s: tensor 'w' has shape (2, 3), the model expects (3, 2)", p);
        CHECK_MSG(strcmp(kd_error_message(), want) == 0, "%s", kd_error_message());
        CHECK(kd_st_get_f32(&st, "w", out, 1, s6) == KD_ESHAPE); /* same numel, other rank */
        CHECK(strstr(kd_error_message(), "expects (6)") != NULL);
        CHECK(kd_st_get_f32(&st, "scalar", out, 1, s6) == KD_ESHAPE);
        CHECK_MSG(strstr(kd_error_message(), "'scalar' has shape ()") != NULL, "%s", kd_error_message());
        CHECK(kd_st_get_f32(&st, "x", out, 1, s6) == KD_EFORMAT);
        snprintf(want, sizeof want, "%s: tensor 'x' not found", p);
        CHECK_MSG(strcmp(kd_error_message(), want) == 0, "%s", kd_error_message());
    }
    kd_st_free(&st);
    TEST("free zeroes") {
        CHECK(st.buf == NULL && st.n == 0 && st.tensors == NULL);
        kd_st_free(&st); /* twice is harmless */
    }
}

static void test_shape_message(void) {
    TEST("shape mismatch message names tensor and both shapes") {
        char p[512];
        tpath("conv.safetensors", p, sizeof p);
        int s[4] = {32, 1, 3, 3}, want[4] = {32, 3, 3, 3};
        float *w = calloc(32 * 9, sizeof(float));
        kd_st_writer *wr = kd_st_writer_new();
        kd_st_add_f32(wr, "conv1.weight", 4, s, w);
        CHECK(kd_st_write(wr, p) == KD_OK);
        kd_st_writer_free(wr);
        free(w);
        kd_safetensors st;
        CHECK(kd_st_read(p, &st) == KD_OK);
        float *dst = malloc(32 * 27 * sizeof(float));
        CHECK(kd_st_get_f32(&st, "conv1.weight", dst, 4, want) == KD_ESHAPE);
        char msg[700];
        snprintf(msg, sizeof msg, "%s: tensor 'conv1.weight' has shape (32, 1, 3, 3), the model expects (32, 3, 3, 3)",
                 p);
        CHECK_MSG(strcmp(kd_error_message(), msg) == 0, "%s", kd_error_message());
        CHECK(kd_st_get_f32(&st, "conv1.weight", dst, 4, s) == KD_OK);
        free(dst);
        kd_st_free(&st);
    }
    TEST("empty writer") {
        char p[512];
        tpath("empty.safetensors", p, sizeof p);
        kd_st_writer *wr = kd_st_writer_new();
        CHECK(kd_st_write(wr, p) == KD_OK);
        kd_st_writer_free(wr);
        kd_safetensors st;
        CHECK_MSG(kd_st_read(p, &st) == KD_OK, "%s", kd_error_message());
        CHECK(st.n == 0 && st.n_meta == 0 && st.buf_len == 16); /* "{}" padded to 8 */
        kd_st_free(&st);
    }
}

/* ---------------------------------------------------------------- python fixture */

static void test_python_fixture(void) {
    TEST("file written by Python safetensors") {
        char p[512];
        kd_test_fixture("st_python.safetensors", p, sizeof p);
        kd_safetensors st;
        kd_status rc = kd_st_read(p, &st);
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        if (rc != KD_OK) return;
        /* the formulas of tests/fixtures/gen_safetensors.py, recomputed */
        float got[8], want[8];
        int s23[2] = {2, 3}, s5[1] = {5}, s3[1] = {3}, s22[2] = {2, 2}, s4[1] = {4};
        for (int i = 0; i < 6; i++) want[i] = (float)i * 0.5f - 1.0f;
        CHECK(kd_st_get_f32(&st, "a.f32", got, 2, s23) == KD_OK);
        CHECK_ARRAYS("a.f32", got, want, 6, 0, 0);
        CHECK(kd_st_find(&st, "b.f16") && kd_st_find(&st, "b.f16")->dtype == KD_F16);
        for (int i = 0; i < 5; i++) want[i] = (float)i * 0.25f - 0.5f;
        CHECK(kd_st_get_f32(&st, "b.f16", got, 1, s5) == KD_OK);
        CHECK_ARRAYS("b.f16", got, want, 5, 0, 0);
        const kd_st_tensor *c = kd_st_find(&st, "c.i64");
        CHECK(c && c->dtype == KD_I64 && c->nbytes == 24);
        if (c) {
            int64_t v[3];
            memcpy(v, c->data, 24); /* little-endian host */
            CHECK(v[0] == -7 && v[1] == 0 && v[2] == (int64_t)1 << 40);
        }
        for (int i = 0; i < 4; i++) want[i] = (float)(i * -3);
        CHECK(kd_st_get_f32(&st, "d.i32", got, 2, s22) == KD_OK);
        CHECK_ARRAYS("d.i32", got, want, 4, 0, 0);
        for (int i = 0; i < 4; i++) want[i] = (float)(i * 60 + 15);
        CHECK(kd_st_get_f32(&st, "e.u8", got, 1, s4) == KD_OK);
        CHECK_ARRAYS("e.u8", got, want, 4, 0, 0);
        const kd_st_tensor *s = kd_st_find(&st, "s.f64");
        CHECK(s && s->ndim == 0 && s->dtype == KD_F64);
        CHECK(kd_st_get_f32(&st, "s.f64", got, 0, NULL) == KD_OK && got[0] == 2.75f);
        /* BF16 is present only when the generator had torch */
        if (kd_st_find(&st, "bf.bf16")) {
            float wb[3] = {1.0f, -2.0f, 0.5f};
            CHECK(kd_st_get_f32(&st, "bf.bf16", got, 1, s3) == KD_OK);
            CHECK_ARRAYS("bf.bf16", got, wb, 3, 0, 0);
        }
        const char *m = kd_st_meta(&st, "creator");
        CHECK(m && strcmp(m, "gen_safetensors.py") == 0);
        kd_st_free(&st);
    }
}

/* ---------------------------------------------------------------- hostile files */

static void test_hostile(void) {
    char p[512];
    static const char ok_entry[] = "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";

    TEST("missing file is KD_EIO") {
        expect_reject(tpath("does-not-exist.safetensors", p, sizeof p), KD_EIO, "cannot open", NULL, NULL);
    }
    TEST("directory is KD_EIO") { expect_reject(kd_test_tmpdir(), KD_EIO, NULL, NULL, NULL); }
    TEST("shorter than 8 bytes") {
        CHECK(write_bytes(tpath("short.st", p, sizeof p), "\x05\0\0\0\0", 5));
        expect_reject(p, KD_EFORMAT, "too short", NULL, NULL);
        CHECK(write_bytes(tpath("zero.st", p, sizeof p), "", 0));
        expect_reject(p, KD_EFORMAT, "too short", NULL, NULL);
    }
    TEST("header length 0") {
        CHECK(write_st_raw(tpath("hlen0.st", p, sizeof p), 0, "{}", 2, NULL, 0));
        expect_reject(p, KD_EFORMAT, "header length is 0", NULL, NULL);
    }
    TEST("header length over 100 MB") {
        CHECK(write_st_raw(tpath("hbig.st", p, sizeof p), 100000001ull, "{}", 2, NULL, 0));
        expect_reject(p, KD_EFORMAT, "100000001", "limit", NULL);
        CHECK(write_st_raw(tpath("hhuge.st", p, sizeof p), UINT64_MAX, "{}", 2, NULL, 0));
        expect_reject(p, KD_EFORMAT, "limit", NULL, NULL);
    }
    TEST("header length past end of file") {
        CHECK(write_st_raw(tpath("hpast.st", p, sizeof p), 3, "{}", 2, NULL, 0));
        expect_reject(p, KD_EFORMAT, "header length 3", "only 2 bytes", NULL);
    }
    TEST("header is not JSON") {
        reject_header("json1.st", "{\"t\": {", 0, "not valid JSON", NULL, NULL);
        reject_header("json2.st", "hello", 0, "not valid JSON", NULL, NULL);
    }
    TEST("bytes after the JSON") {
        reject_header("trail.st", "{}  x", 0, "after the JSON", NULL, NULL);
        CHECK(write_st_raw(tpath("nul.st", p, sizeof p), 4, "{}\0 ", 4, NULL, 0));
        expect_reject(p, KD_EFORMAT, "after the JSON", NULL, NULL);
    }
    TEST("header not UTF-8") { reject_header("utf8.st", "{\"\xff\": 1}", 0, "UTF-8", NULL, NULL); }
    TEST("top level not an object") {
        reject_header("arr.st", "[1, 2]", 0, "not an object", NULL, NULL);
        reject_header("str.st", "\"x\"", 0, "not an object", NULL, NULL);
    }
    TEST("entry not an object") { reject_header("ent.st", "{\"w\": 3}", 0, "'w'", "not a JSON object", NULL); }
    TEST("dtype missing, unknown or not a string") {
        reject_header("dt1.st", "{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'", "missing \"dtype\"", NULL);
        reject_header("dt2.st", "{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "'w'",
                      "'F8_E4M3'", "unsupported dtype");
        reject_header("dt3.st", "{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'", "'f32'",
                      NULL);
        reject_header("dt4.st", "{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'",
                      "not a string", NULL);
    }
    TEST("bad shapes") {
        reject_header("sh1.st", "{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "'w'", "missing \"shape\"", NULL);
        reject_header("sh2.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,4]}}", 4, "'w'",
                      "not an array", NULL);
        reject_header("sh3.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,-1],\"data_offsets\":[0,4]}}", 4, "'w'",
                      "shape[1]", NULL);
        reject_header("sh4.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "'w'",
                      "shape[0]", NULL);
        reject_header("sh5.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8, "'w'",
                      "shape[0]", NULL);
        reject_header("sh6.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4, "'w'",
                      "shape[0]", NULL);
        reject_header("sh7.st", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
                      "'w'", "9 dimensions", NULL);
        /* 2^40 * 2^40 * 4 bytes does not fit in 64 bits */
        reject_header("sh8.st",
                      "{\"w\":{\"dtype\":\"F32\",\"shape\":[1099511627776,1099511627776],\"data_offsets\":[0,4]}}", 4,
                      "'w'", "overflows", NULL);
        /* 2^31 * 2^31 elements is fine alone but times 8 bytes overflows */
        reject_header("sh9.st",
                      "{\"w\":{\"dtype\":\"F64\",\"shape\":[2147483648,2147483648,2],\"data_offsets\":[0,8]}}", 8,
                      "'w'", "overflows", NULL);
    }
    TEST("bad data_offsets") {
        reject_header("of1.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "'w'", "missing \"data_offsets\"", NULL);
        reject_header("of2.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "'w'",
                      "two non-negative integers", NULL);
        reject_header("of3.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, "'w'",
                      "two non-negative integers", NULL);
        reject_header("of4.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "'w'",
                      "two non-negative integers", NULL);
        reject_header("of5.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{\"a\":0}}}", 4, "'w'",
                      "two non-negative integers", NULL);
        reject_header("of6.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8, "'w'",
                      "begin > end", NULL);
    }
    TEST("offset out of range") {
        reject_header("oor.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[4,20]}}", 12, "'w'",
                      "offset out of range", "[4, 20], payload is 12 bytes");
    }
    TEST("byte count does not match dtype x shape") {
        reject_header("cnt.st", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 24, "'w'",
                      "needs 24 bytes", "hold 20");
        reject_header("cnt2.st", "{\"w\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[0,4]}}", 4, "'w'",
                      "F16 () needs 2 bytes", NULL);
    }
    TEST("overlapping tensors") {
        reject_header("ovl.st",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                      12, "'a'", "'b'", "overlap");
        /* a long tensor swallowing a later one, listed in reverse */
        reject_header("ovl2.st",
                      "{\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[12,13]},"
                      "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]},"
                      "\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}",
                      16, "overlap", NULL, NULL);
    }
    TEST("duplicate tensor name") {
        reject_header("dup.st",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                      2, "'a'", "twice", NULL);
    }
    TEST("bad metadata") {
        reject_header("md1.st", "{\"__metadata__\":{\"k\":3}}", 0, "'k'", "not a string", NULL);
        reject_header("md2.st", "{\"__metadata__\":[\"k\"]}", 0, "__metadata__", "not a JSON object", NULL);
        reject_header("md3.st", "{\"__metadata__\":{\"k\":null}}", 0, "'k'", "not a string", NULL);
    }
    /* a valid file after each rejection rule, so the rules are not too wide */
    TEST("accepted edge cases") {
        uint8_t pay[16] = {0};
        kd_safetensors st;
        CHECK(write_st(tpath("fine.st", p, sizeof p), ok_entry, pay, 8));
        CHECK_MSG(kd_st_read(p, &st) == KD_OK, "%s", kd_error_message());
        kd_st_free(&st);
        /* header padded with spaces, zero-size tensors at any offset, a gap
         * and trailing payload bytes (the reference rejects the last two) */
        CHECK(write_st(tpath("edge.st", p, sizeof p),
                       "{\"z\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
                       "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[12,13]},"
                       "\"h\":{\"dtype\":\"F64\",\"shape\":[1099511627776,1099511627776,0],\"data_offsets\":[9,9]},"
                       "\"__metadata__\":{}}     ",
                       pay, 16));
        kd_status rc = kd_st_read(p, &st);
        CHECK_MSG(rc == KD_OK, "%s", kd_error_message());
        if (rc == KD_OK) {
            CHECK(st.n == 4 && st.n_meta == 0);
            const kd_st_tensor *b = kd_st_find(&st, "b");
            CHECK(b && b->ndim == 0 && b->nbytes == 1);
            kd_st_free(&st);
        }
    }
}

/* ---------------------------------------------------------------- write failures */

static kd_st_writer *small_writer(float v) {
    kd_st_writer *w = kd_st_writer_new();
    static float buf[1024];
    for (int i = 0; i < 1024; i++) buf[i] = v + (float)i;
    int s[1] = {1024};
    kd_st_add_f32(w, "x", 1, s, buf);
    return w;
}

static void test_write_failures(void) {
    char p[512];
    TEST("write into a missing directory") {
        tpath("no/such/dir/out.safetensors", p, sizeof p);
        kd_st_writer *w = small_writer(0);
        CHECK(kd_st_write(w, p) == KD_EIO);
        CHECK_MSG(strstr(kd_error_message(), p) != NULL, "%s", kd_error_message());
        CHECK(strstr(kd_error_message(), strerror(ENOENT)) != NULL);
        CHECK(!file_exists(p) && !temp_left(p));
        kd_st_writer_free(w);
    }
    TEST("write onto a directory") {
        tpath("adir", p, sizeof p);
        CHECK(mkdir(p, 0700) == 0);
        kd_st_writer *w = small_writer(0);
        CHECK(kd_st_write(w, p) == KD_EIO);
        CHECK_MSG(strstr(kd_error_message(), p) != NULL, "%s", kd_error_message());
        CHECK_MSG(strstr(kd_error_message(), "rename") != NULL, "%s", kd_error_message());
        CHECK(!temp_left(p));
        struct stat sb;
        CHECK(stat(p, &sb) == 0 && S_ISDIR(sb.st_mode));
        kd_st_writer_free(w);
    }
    /* an existing checkpoint, then failing writes over it */
    tpath("keep.safetensors", p, sizeof p);
    kd_st_writer *w0 = small_writer(1);
    kd_status rc0 = kd_st_write(w0, p);
    kd_st_writer_free(w0);
    size_t n0 = 0;
    uint8_t *before = rc0 == KD_OK ? slurp(p, &n0) : NULL;
    TEST("existing file kept when the temp file cannot be created") {
        CHECK(rc0 == KD_OK && before != NULL);
        char t[600];
        snprintf(t, sizeof t, "%s.tmp.%ld", p, (long)getpid());
        CHECK(mkdir(t, 0700) == 0); /* the temp name is taken by a directory */
        kd_st_writer *w = small_writer(2);
        CHECK(kd_st_write(w, p) == KD_EIO);
        CHECK_MSG(strstr(kd_error_message(), p) != NULL, "%s", kd_error_message());
        kd_st_writer_free(w);
        size_t n1 = 0;
        uint8_t *after = slurp(p, &n1);
        CHECK(after && before && n1 == n0 && memcmp(after, before, n0) == 0);
        free(after);
        CHECK(rmdir(t) == 0);
    }
    TEST("existing file kept when writing the temp file fails") {
        /* a file-size limit makes write(2) fail with EFBIG part-way through
         * the temp file (SIGXFSZ ignored); works as root too */
        struct rlimit old, lim;
        CHECK(getrlimit(RLIMIT_FSIZE, &old) == 0);
        lim = old;
        lim.rlim_cur = 100;
        void (*oldsig)(int) = signal(SIGXFSZ, SIG_IGN);
        CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
        kd_st_writer *w = small_writer(3);
        kd_status rc = kd_st_write(w, p);
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", kd_error_message());
        setrlimit(RLIMIT_FSIZE, &old);
        signal(SIGXFSZ, oldsig);
        kd_st_writer_free(w);
        CHECK_MSG(rc == KD_EIO, "status %d: %s", (int)rc, msg);
        CHECK_MSG(strstr(msg, p) != NULL && strstr(msg, strerror(EFBIG)) != NULL, "%s", msg);
        CHECK(!temp_left(p));
        size_t n1 = 0;
        uint8_t *after = slurp(p, &n1);
        CHECK(after && before && n1 == n0 && memcmp(after, before, n0) == 0);
        free(after);
    }
    TEST("successful overwrite replaces the file") {
        kd_st_writer *w = small_writer(4);
        CHECK(kd_st_write(w, p) == KD_OK);
        kd_st_writer_free(w);
        CHECK(!temp_left(p));
        kd_safetensors st;
        CHECK(kd_st_read(p, &st) == KD_OK);
        float x[1024];
        int s[1] = {1024};
        CHECK(kd_st_get_f32(&st, "x", x, 1, s) == KD_OK && x[0] == 4.0f && x[1023] == 1027.0f);
        kd_st_free(&st);
    }
    free(before);
}

void test_safetensors(void) {
    test_half();
    test_round_trip();
    test_shape_message();
    test_python_fixture();
    test_hostile();
    test_write_failures();
}
