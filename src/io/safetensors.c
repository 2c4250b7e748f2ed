/* safetensors.c - reading and writing safetensors checkpoints.
 *
 * The reader loads the whole file into one buffer, parses the JSON header
 * with cJSON and checks every claim the header makes (length, dtype, shape,
 * offsets, overlaps) before any tensor is handed out; tensor data pointers
 * point into that buffer. The writer copies tensors in, then writes the file
 * atomically (temp file, fsync, rename). The byte layout and the list of
 * what we reject is in docs/formats.md.
 *
 * Deliberately not here: mmap (our checkpoints are small), dtypes beyond the
 * ten in kd_dtype (F8, U16/U32/U64, complex), and big-endian payloads (the
 * format is little-endian; loads and stores go through byte helpers so a
 * big-endian host still reads and writes the right bytes).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "kd_io.h"

#define ST_MAX_HEADER 100000000ull /* same bound as the reference implementation */
#define ST_MAX_INT 9007199254740992.0 /* 2^53: the largest integer a JSON double holds exactly */

/* ---------------------------------------------------------------- dtypes */

static const struct {
    const char *name;
    size_t size;
} dtype_info[] = {
    [KD_F32] = {"F32", 4}, [KD_F16] = {"F16", 2}, [KD_BF16] = {"BF16", 2}, [KD_F64] = {"F64", 8},
    [KD_I64] = {"I64", 8}, [KD_I32] = {"I32", 4}, [KD_I16] = {"I16", 2},   [KD_I8] = {"I8", 1},
    [KD_U8] = {"U8", 1},   [KD_BOOL] = {"BOOL", 1},
};
#define N_DTYPES ((int)(sizeof dtype_info / sizeof dtype_info[0]))

const char *kd_dtype_name(kd_dtype dt) {
    KD_ASSERT((int)dt >= 0 && (int)dt < N_DTYPES, "bad dtype %d", (int)dt);
    return dtype_info[dt].name;
}

size_t kd_dtype_size(kd_dtype dt) {
    KD_ASSERT((int)dt >= 0 && (int)dt < N_DTYPES, "bad dtype %d", (int)dt);
    return dtype_info[dt].size;
}

static int dtype_parse(const char *s, kd_dtype *dt) {
    for (int i = 0; i < N_DTYPES; i++)
        if (strcmp(s, dtype_info[i].name) == 0) {
            *dt = (kd_dtype)i;
            return 1;
        }
    return 0;
}

/* ---------------------------------------------------------------- fp16 / bf16 */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float kd_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24, exact in float */
        float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13)); /* inf, nan (payload kept) */
    return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));       /* rebias 15 -> 127 */
}

uint16_t kd_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00 | (uint16_t)((x >> 13) & 0x3ff); /* nan stays (quiet) nan */
    if (x >= 0x477ff000u) return sign | 0x7c00; /* >= 65520 (incl. inf) rounds to inf */
    if (x < 0x38800000u) {
        /* below 2^-14: result is a half subnormal, in units of 2^-24.
         * value / 2^-24 = m * 2^(E-126) with m the 24-bit significand. */
        uint32_t e = x >> 23;
        int s = 126 - (int)e;
        if (s > 24) return sign; /* below 2^-25: rounds to zero */
        uint32_t m = (x & 0x7fffff) | 0x800000;
        uint32_t q = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return sign | (uint16_t)q;
    }
    /* normal: rebias 127 -> 15, keep 10 mantissa bits, round the 13 dropped
     * ones to nearest even; a carry into the exponent is the right answer */
    uint32_t h = (x >> 13) - (112u << 10), rem = x & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return sign | (uint16_t)h;
}

float kd_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t kd_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040); /* quiet nan, sign kept */
    /* add just under half of the dropped range, plus one when the kept part
     * is odd: ties go to even, overflow carries into inf */
    x += 0x7fffu + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

/* ---------------------------------------------------------------- little-endian bytes */

static uint64_t load_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void store_le(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static int host_little_endian(void) {
    uint16_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* ---------------------------------------------------------------- reader */

static const char *shape64_str(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t k = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < ndim && k < n; i++) k += (size_t)snprintf(buf + k, n - k, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, ")");
    return buf;
}

/* JSON number that is an integer in [0, 2^53] */
static int json_uint(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    if (!(d >= 0.0) || d > ST_MAX_INT || d != floor(d)) return 0;
    *out = (uint64_t)d;
    return 1;
}

/* Well-formed UTF-8 (no overlongs, no surrogates, <= U+10FFFF); returns the
 * offset of the first bad byte or n. */
static size_t utf8_check(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        int len;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2, cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3, cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4, cp = c & 0x07;
        } else {
            return i;
        }
        if (i + (size_t)len > n) return i;
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return i;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
        i += (size_t)len;
    }
    return n;
}

void kd_st_free(kd_safetensors *st) {
    if (!st) return;
    for (int i = 0; i < st->n; i++) free(st->tensors[i].name);
    for (int i = 0; i < st->n_meta; i++) {
        free(st->meta_keys[i]);
        free(st->meta_vals[i]);
    }
    free(st->tensors);
    free(st->meta_keys);
    free(st->meta_vals);
    free(st->buf);
    free(st->path);
    memset(st, 0, sizeof *st);
}

static kd_status read_file(const char *path, uint8_t **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return kd_errorf(KD_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0) {
        int e = errno;
        fclose(f);
        return kd_errorf(KD_EIO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        fclose(f);
        return kd_errorf(KD_EIO, "%s: not a regular file", path);
    }
    size_t n = (size_t)sb.st_size;
    uint8_t *b = kd_malloc(n);
    size_t got = fread(b, 1, n, f);
    int err = ferror(f) ? errno : 0;
    fclose(f);
    if (got != n) {
        free(b);
        if (err) return kd_errorf(KD_EIO, "%s: read failed: %s", path, strerror(err));
        return kd_errorf(KD_EIO, "%s: read %zu of %zu bytes (file changed while reading?)", path, got, n);
    }
    *buf = b;
    *len = n;
    return KD_OK;
}

typedef struct span {
    uint64_t begin, end;
    int idx;
} span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Fills st->tensors[i] from one header entry. */
static kd_status parse_entry(kd_safetensors *st, const cJSON *e, const uint8_t *payload, uint64_t payload_len,
                             kd_st_tensor *t) {
    const char *path = st->path, *name = e->string;
    if (!cJSON_IsObject(e)) return kd_errorf(KD_EFORMAT, "%s: tensor '%s': header entry is not a JSON object", path, name);

    const cJSON *jd = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    if (!jd) return kd_errorf(KD_EFORMAT, "%s: tensor '%s': missing \"dtype\"", path, name);
    if (!cJSON_IsString(jd)) return kd_errorf(KD_EFORMAT, "%s: tensor '%s': \"dtype\" is not a string", path, name);
    if (!dtype_parse(jd->valuestring, &t->dtype))
        return kd_errorf(KD_EFORMAT,
                         "%s: tensor '%s': unsupported dtype '%.64s' (supported: F32 F16 BF16 F64 I64 I32 I16 I8 U8 BOOL)",
                         path, name, jd->valuestring);

    const cJSON *js = cJSON_GetObjectItemCaseSensitive(e, "shape");
    if (!js) return kd_errorf(KD_EFORMAT, "%s: tensor '%s': missing \"shape\"", path, name);
    if (!cJSON_IsArray(js)) return kd_errorf(KD_EFORMAT, "%s: tensor '%s': \"shape\" is not an array", path, name);
    int ndim = cJSON_GetArraySize(js);
    if (ndim > KD_ST_MAX_DIM)
        return kd_errorf(KD_EFORMAT, "%s: tensor '%s': %d dimensions, at most %d supported", path, name, ndim,
                         KD_ST_MAX_DIM);
    t->ndim = ndim;
    uint64_t numel = 1;
    int overflow = 0, has_zero = 0;
    const cJSON *d;
    int k = 0;
    cJSON_ArrayForEach(d, js) {
        uint64_t v;
        if (!json_uint(d, &v))
            return kd_errorf(KD_EFORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer (at most 2^53)", path,
                             name, k);
        t->shape[k++] = (int64_t)v;
        if (v == 0) has_zero = 1;
        if (__builtin_mul_overflow(numel, v, &numel)) overflow = 1;
    }
    uint64_t nbytes = 0;
    if (has_zero) numel = 0, overflow = 0; /* a zero dim makes the product 0 whatever overflowed */
    if (overflow || __builtin_mul_overflow(numel, (uint64_t)kd_dtype_size(t->dtype), &nbytes)) {
        char sb[256];
        return kd_errorf(KD_EFORMAT, "%s: tensor '%s': shape %s x %zu bytes overflows 64 bits", path, name,
                         shape64_str(ndim, t->shape, sb, sizeof sb), kd_dtype_size(t->dtype));
    }

    const cJSON *jo = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!jo) return kd_errorf(KD_EFORMAT, "%s: tensor '%s': missing \"data_offsets\"", path, name);
    uint64_t b, en;
    if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2 || !json_uint(cJSON_GetArrayItem(jo, 0), &b) ||
        !json_uint(cJSON_GetArrayItem(jo, 1), &en))
        return kd_errorf(KD_EFORMAT, "%s: tensor '%s': \"data_offsets\" is not two non-negative integers [begin, end]",
                         path, name);
    if (b > en)
        return kd_errorf(KD_EFORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] has begin > end", path, name,
                         (unsigned long long)b, (unsigned long long)en);
    if (en > payload_len)
        return kd_errorf(KD_EFORMAT, "%s: tensor '%s': offset out of range: data_offsets [%llu, %llu], payload is %llu bytes",
                         path, name, (unsigned long long)b, (unsigned long long)en, (unsigned long long)payload_len);
    if (en - b != nbytes) {
        char sb[256];
        return kd_errorf(KD_EFORMAT,
                         "%s: tensor '%s': %s %s needs %llu bytes, data_offsets [%llu, %llu] hold %llu", path, name,
                         kd_dtype_name(t->dtype), shape64_str(ndim, t->shape, sb, sizeof sb),
                         (unsigned long long)nbytes, (unsigned long long)b, (unsigned long long)en,
                         (unsigned long long)(en - b));
    }
    t->data = payload + b;
    t->nbytes = (size_t)nbytes;
    return KD_OK;
}

static kd_status parse_metadata(kd_safetensors *st, const cJSON *m) {
    if (!cJSON_IsObject(m)) return kd_errorf(KD_EFORMAT, "%s: \"__metadata__\" is not a JSON object", st->path);
    int n = cJSON_GetArraySize(m);
    st->meta_keys = kd_calloc((size_t)n, sizeof(char *));
    st->meta_vals = kd_calloc((size_t)n, sizeof(char *));
    const cJSON *v;
    cJSON_ArrayForEach(v, m) {
        if (!cJSON_IsString(v))
            return kd_errorf(KD_EFORMAT, "%s: metadata value for key '%s' is not a string", st->path, v->string);
        for (int i = 0; i < st->n_meta; i++)
            if (strcmp(st->meta_keys[i], v->string) == 0)
                return kd_errorf(KD_EFORMAT, "%s: metadata key '%s' appears twice", st->path, v->string);
        st->meta_keys[st->n_meta] = kd_strdup(v->string);
        st->meta_vals[st->n_meta] = kd_strdup(v->valuestring);
        st->n_meta++;
    }
    return KD_OK;
}

/* Everything after the file is in memory; st->path and st->buf are set.
 * On error the caller frees st. */
static kd_status parse(kd_safetensors *st) {
    const char *path = st->path;
    if (st->buf_len < 8)
        return kd_errorf(KD_EFORMAT, "%s: file is %zu bytes, too short for the 8-byte header length", path, st->buf_len);
    uint64_t hlen = load_le(st->buf, 8);
    if (hlen == 0) return kd_errorf(KD_EFORMAT, "%s: header length is 0", path);
    if (hlen > ST_MAX_HEADER)
        return kd_errorf(KD_EFORMAT, "%s: header length %llu exceeds the %llu-byte limit (not a safetensors file?)",
                         path, (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen > st->buf_len - 8)
        return kd_errorf(KD_EFORMAT, "%s: header length %llu but only %zu bytes follow it (truncated file?)", path,
                         (unsigned long long)hlen, st->buf_len - 8);
    const uint8_t *hdr = st->buf + 8;
    const uint8_t *payload = hdr + hlen;
    uint64_t payload_len = st->buf_len - 8 - hlen;

    size_t bad = utf8_check(hdr, (size_t)hlen);
    if (bad != hlen) return kd_errorf(KD_EFORMAT, "%s: header is not valid UTF-8 (at header byte %zu)", path, bad);

    /* cJSON wants a terminated string; a NUL inside the header then shows up
     * as trailing garbage below */
    char *text = kd_malloc((size_t)hlen + 1);
    memcpy(text, hdr, (size_t)hlen);
    text[hlen] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, (size_t)hlen, &end, 0);
    if (!root) {
        size_t at = end ? (size_t)(end - text) : 0;
        free(text);
        return kd_errorf(KD_EFORMAT, "%s: header is not valid JSON (error near header byte %zu)", path, at);
    }
    for (size_t i = (size_t)(end - text); i < hlen; i++) {
        char c = text[i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            free(text);
            cJSON_Delete(root);
            return kd_errorf(KD_EFORMAT, "%s: header has bytes after the JSON object (at header byte %zu)", path, i);
        }
    }
    free(text);

    kd_status rc = KD_OK;
    span *spans = NULL;
    if (!cJSON_IsObject(root)) {
        rc = kd_errorf(KD_EFORMAT, "%s: header is JSON but not an object", path);
        goto done;
    }
    int n_items = cJSON_GetArraySize(root);
    st->tensors = kd_calloc((size_t)n_items, sizeof(kd_st_tensor));
    int have_meta = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (strcmp(e->string, "__metadata__") == 0) {
            if (have_meta++) {
                rc = kd_errorf(KD_EFORMAT, "%s: \"__metadata__\" appears twice", path);
                goto done;
            }
            if ((rc = parse_metadata(st, e)) != KD_OK) goto done;
            continue;
        }
        for (int i = 0; i < st->n; i++)
            if (strcmp(st->tensors[i].name, e->string) == 0) {
                rc = kd_errorf(KD_EFORMAT, "%s: tensor '%s' appears twice in the header", path, e->string);
                goto done;
            }
        kd_st_tensor *t = &st->tensors[st->n];
        if ((rc = parse_entry(st, e, payload, payload_len, t)) != KD_OK) goto done;
        t->name = kd_strdup(e->string);
        st->n++;
    }

    /* overlaps: sort by begin; every non-empty span must start at or after
     * the furthest end seen so far */
    spans = kd_malloc((size_t)(st->n ? st->n : 1) * sizeof(span));
    for (int i = 0; i < st->n; i++) {
        spans[i].begin = (uint64_t)(st->tensors[i].data - payload);
        spans[i].end = spans[i].begin + st->tensors[i].nbytes;
        spans[i].idx = i;
    }
    qsort(spans, (size_t)st->n, sizeof(span), span_cmp);
    int far = -1;
    for (int i = 0; i < st->n; i++) {
        if (spans[i].begin == spans[i].end) continue;
        if (far >= 0 && spans[i].begin < spans[far].end) {
            const span *a = &spans[far], *b = &spans[i];
            rc = kd_errorf(KD_EFORMAT, "%s: tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap", path,
                           st->tensors[a->idx].name, (unsigned long long)a->begin, (unsigned long long)a->end,
                           st->tensors[b->idx].name, (unsigned long long)b->begin, (unsigned long long)b->end);
            goto done;
        }
        if (far < 0 || spans[i].end > spans[far].end) far = i;
    }
done:
    free(spans);
    cJSON_Delete(root);
    return rc;
}

kd_status kd_st_read(const char *path, kd_safetensors *out) {
    memset(out, 0, sizeof *out);
    out->path = kd_strdup(path);
    kd_status rc = read_file(path, &out->buf, &out->buf_len);
    if (rc == KD_OK) rc = parse(out);
    if (rc != KD_OK) kd_st_free(out);
    return rc;
}

const kd_st_tensor *kd_st_find(const kd_safetensors *st, const char *name) {
    for (int i = 0; i < st->n; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

const char *kd_st_meta(const kd_safetensors *st, const char *key) {
    for (int i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta_keys[i], key) == 0) return st->meta_vals[i];
    return NULL;
}

kd_status kd_st_get_f32(const kd_safetensors *st, const char *name, float *dst, int ndim, const int *shape) {
    KD_ASSERT(ndim >= 0 && ndim <= KD_ST_MAX_DIM, "ndim %d", ndim);
    const kd_st_tensor *t = kd_st_find(st, name);
    if (!t) return kd_errorf(KD_EFORMAT, "%s: tensor '%s' not found", st->path, name);
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == (int64_t)shape[i];
    if (!same) {
        char have[256], want[256];
        int64_t s64[KD_ST_MAX_DIM];
        for (int i = 0; i < ndim; i++) s64[i] = shape[i];
        return kd_errorf(KD_ESHAPE, "%s: tensor '%s' has shape %s, the model expects %s", st->path, name,
                         shape64_str(t->ndim, t->shape, have, sizeof have), shape64_str(ndim, s64, want, sizeof want));
    }
    size_t sz = kd_dtype_size(t->dtype), n = t->nbytes / sz;
    const uint8_t *p = t->data;
    switch (t->dtype) {
    case KD_F32:
        for (size_t i = 0; i < n; i++) dst[i] = bits_f32((uint32_t)load_le(p + 4 * i, 4));
        break;
    case KD_F16:
        for (size_t i = 0; i < n; i++) dst[i] = kd_f16_to_f32((uint16_t)load_le(p + 2 * i, 2));
        break;
    case KD_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = kd_bf16_to_f32((uint16_t)load_le(p + 2 * i, 2));
        break;
    case KD_F64:
        for (size_t i = 0; i < n; i++) {
            uint64_t u = load_le(p + 8 * i, 8);
            double d;
            memcpy(&d, &u, 8);
            dst[i] = (float)d;
        }
        break;
    case KD_I64:
        for (size_t i = 0; i < n; i++) dst[i] = (float)(int64_t)load_le(p + 8 * i, 8);
        break;
    case KD_I32:
        for (size_t i = 0; i < n; i++) dst[i] = (float)(int32_t)(uint32_t)load_le(p + 4 * i, 4);
        break;
    case KD_I16:
        for (size_t i = 0; i < n; i++) dst[i] = (float)(int16_t)(uint16_t)load_le(p + 2 * i, 2);
        break;
    case KD_I8:
        for (size_t i = 0; i < n; i++) dst[i] = (float)(int8_t)p[i];
        break;
    case KD_U8:
        for (size_t i = 0; i < n; i++) dst[i] = (float)p[i];
        break;
    case KD_BOOL:
        for (size_t i = 0; i < n; i++) dst[i] = p[i] ? 1.0f : 0.0f;
        break;
    }
    return KD_OK;
}

/* ---------------------------------------------------------------- writer */

typedef struct wtensor {
    char *name;
    kd_dtype dtype;
    int ndim;
    int64_t shape[KD_ST_MAX_DIM];
    uint8_t *data; /* little-endian bytes */
    size_t nbytes;
} wtensor;

struct kd_st_writer {
    int n, cap;
    wtensor *t;
    int n_meta, cap_meta;
    char **keys, **vals;
};

kd_st_writer *kd_st_writer_new(void) { return kd_calloc(1, sizeof(kd_st_writer)); }

void kd_st_writer_free(kd_st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) {
        free(w->t[i].name);
        free(w->t[i].data);
    }
    for (int i = 0; i < w->n_meta; i++) {
        free(w->keys[i]);
        free(w->vals[i]);
    }
    free(w->t);
    free(w->keys);
    free(w->vals);
    free(w);
}

void kd_st_add(kd_st_writer *w, const char *name, kd_dtype dt, int ndim, const int64_t *shape, const void *data) {
    KD_ASSERT(strcmp(name, "__metadata__") != 0, "'__metadata__' is reserved");
    KD_ASSERT(ndim >= 0 && ndim <= KD_ST_MAX_DIM, "tensor '%s': ndim %d", name, ndim);
    for (int i = 0; i < w->n; i++) KD_ASSERT(strcmp(w->t[i].name, name) != 0, "tensor '%s' added twice", name);
    size_t sz = kd_dtype_size(dt), numel = 1;
    for (int i = 0; i < ndim; i++) {
        KD_ASSERT(shape[i] >= 0, "tensor '%s': negative dim", name);
        KD_ASSERT(!__builtin_mul_overflow(numel, (size_t)shape[i], &numel), "tensor '%s': size overflow", name);
    }
    size_t nbytes;
    KD_ASSERT(!__builtin_mul_overflow(numel, sz, &nbytes), "tensor '%s': size overflow", name);
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 16;
        w->t = kd_realloc(w->t, (size_t)w->cap * sizeof(wtensor));
    }
    wtensor *t = &w->t[w->n++];
    t->name = kd_strdup(name);
    t->dtype = dt;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->nbytes = nbytes;
    t->data = kd_malloc(nbytes);
    if (nbytes) memcpy(t->data, data, nbytes);
    if (!host_little_endian() && sz > 1) /* store little-endian whatever the host */
        for (size_t i = 0; i < numel; i++)
            for (size_t a = 0, b = sz - 1; a < b; a++, b--) {
                uint8_t tmp = t->data[i * sz + a];
                t->data[i * sz + a] = t->data[i * sz + b];
                t->data[i * sz + b] = tmp;
            }
}

void kd_st_add_f32(kd_st_writer *w, const char *name, int ndim, const int *shape, const float *data) {
    KD_ASSERT(ndim >= 0 && ndim <= KD_ST_MAX_DIM, "tensor '%s': ndim %d", name, ndim);
    int64_t s64[KD_ST_MAX_DIM];
    for (int i = 0; i < ndim; i++) s64[i] = shape[i];
    kd_st_add(w, name, KD_F32, ndim, s64, data);
}

void kd_st_set_meta(kd_st_writer *w, const char *key, const char *value) {
    for (int i = 0; i < w->n_meta; i++)
        if (strcmp(w->keys[i], key) == 0) {
            free(w->vals[i]);
            w->vals[i] = kd_strdup(value);
            return;
        }
    if (w->n_meta == w->cap_meta) {
        w->cap_meta = w->cap_meta ? 2 * w->cap_meta : 8;
        w->keys = kd_realloc(w->keys, (size_t)w->cap_meta * sizeof(char *));
        w->vals = kd_realloc(w->vals, (size_t)w->cap_meta * sizeof(char *));
    }
    w->keys[w->n_meta] = kd_strdup(key);
    w->vals[w->n_meta] = kd_strdup(value);
    w->n_meta++;
}

/* Payload order: by element size, largest first, ties in insertion order.
 * With an 8-aligned payload start this aligns every tensor to its element
 * size without padding (the reference reader rejects gaps). */
static int *payload_order(const kd_st_writer *w) {
    int *ord = kd_malloc((size_t)(w->n ? w->n : 1) * sizeof(int));
    int k = 0;
    for (size_t sz = 8; sz >= 1; sz /= 2)
        for (int i = 0; i < w->n; i++)
            if (kd_dtype_size(w->t[i].dtype) == sz) ord[k++] = i;
    KD_ASSERT(k == w->n, "dtype sizes");
    return ord;
}

/* The header JSON, padded with spaces so 8 + length is a multiple of 8. */
static char *build_header(const kd_st_writer *w, const uint64_t *begin, size_t *len) {
    cJSON *root = cJSON_CreateObject();
    KD_ASSERT(root, "out of memory");
    if (w->n_meta) {
        cJSON *m = cJSON_AddObjectToObject(root, "__metadata__");
        KD_ASSERT(m, "out of memory");
        for (int i = 0; i < w->n_meta; i++) KD_ASSERT(cJSON_AddStringToObject(m, w->keys[i], w->vals[i]), "oom");
    }
    for (int i = 0; i < w->n; i++) {
        const wtensor *t = &w->t[i];
        cJSON *e = cJSON_AddObjectToObject(root, t->name);
        KD_ASSERT(e, "out of memory");
        KD_ASSERT(cJSON_AddStringToObject(e, "dtype", kd_dtype_name(t->dtype)), "oom");
        cJSON *s = cJSON_AddArrayToObject(e, "shape");
        cJSON *o = cJSON_AddArrayToObject(e, "data_offsets");
        KD_ASSERT(s && o, "out of memory");
        /* cJSON numbers are doubles: exact up to 2^53, far beyond any tensor we hold */
        for (int d = 0; d < t->ndim; d++) cJSON_AddItemToArray(s, cJSON_CreateNumber((double)t->shape[d]));
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)begin[i]));
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(begin[i] + t->nbytes)));
    }
    char *js = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    KD_ASSERT(js, "out of memory printing the header");
    size_t n = strlen(js), padded = (n + 7) & ~(size_t)7;
    char *h = kd_malloc(padded);
    memcpy(h, js, n);
    memset(h + n, ' ', padded - n);
    free(js);
    *len = padded;
    return h;
}

/* Best effort: make the rename itself durable. */
static void fsync_parent_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir) return;
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(dir);
}

kd_status kd_st_write(const kd_st_writer *w, const char *path) {
    int *ord = payload_order(w);
    uint64_t *begin = kd_malloc((size_t)(w->n ? w->n : 1) * sizeof(uint64_t)), off = 0;
    for (int k = 0; k < w->n; k++) {
        begin[ord[k]] = off;
        off += w->t[ord[k]].nbytes;
    }
    size_t hlen;
    char *hdr = build_header(w, begin, &hlen);
    free(begin);

    size_t tlen = strlen(path) + 32;
    char *tmp = kd_malloc(tlen);
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());

    kd_status rc = KD_OK;
    const char *what = NULL;
    int err = 0;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        err = errno;
        rc = kd_errorf(KD_EIO, "%s: cannot create %s: %s", path, tmp, strerror(err));
        goto out; /* nothing of ours to remove */
    }
    uint8_t len8[8];
    store_le(len8, hlen, 8);
    if (fwrite(len8, 1, 8, f) != 8 || fwrite(hdr, 1, hlen, f) != hlen) {
        what = "write failed";
        err = errno;
    }
    for (int k = 0; !what && k < w->n; k++) {
        const wtensor *t = &w->t[ord[k]];
        if (t->nbytes && fwrite(t->data, 1, t->nbytes, f) != t->nbytes) {
            what = "write failed";
            err = errno;
        }
    }
    if (!what && fflush(f) != 0) what = "write failed", err = errno;
    if (!what && fsync(fileno(f)) != 0) what = "fsync failed", err = errno;
    if (fclose(f) != 0 && !what) what = "close failed", err = errno;
    if (!what && rename(tmp, path) != 0) what = "rename failed", err = errno;
    if (what) {
        unlink(tmp);
        rc = kd_errorf(KD_EIO, "%s: %s: %s", path, what, strerror(err ? err : EIO));
    } else {
        fsync_parent_dir(path);
    }
out:
    free(tmp);
    free(hdr);
    free(ord);
    return rc;
}
