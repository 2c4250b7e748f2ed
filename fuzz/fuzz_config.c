/* fuzz_config.c - libFuzzer harness for the INI config parser and the
 * command-line overrides.
 *
 * Input: INI text, then (after a NUL byte) NUL-separated override strings
 * "section.key=value" applied with kd_config_override, as `distill run
 * --section.key=value` does. Whatever was accepted is written as the
 * resolved config (kd_config_write) and loaded again into a fresh config;
 * when no value is one the INI syntax cannot carry unchanged (a line over
 * inih's 200-byte limit, a ';' comment, surrounding spaces or quotes), the
 * reload must succeed and write the very same file.
 */
#include "fuzz.h"
#include "kd_config.h"

static char path1[128], path2[128];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    snprintf(path1, sizeof path1, "%s/a.ini", fz_dir());
    snprintf(path2, sizeof path2, "%s/b.ini", fz_dir());
    return 0;
}

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    FZ_CHECK(f, "cannot open %s", path);
    size_t cap = 1 << 16, len = 0, got;
    char *b = malloc(cap + 1);
    while (b && (got = fread(b + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) b = realloc(b, (cap *= 2) + 1);
    }
    if (!b) abort();
    fclose(f);
    b[len] = '\0';
    *n = len;
    return b;
}

/* 1 when every "key = value" line of a written config would read back as the
 * same value. */
static int plain_values(const char *text) {
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        if (len && p[0] != ';' && p[0] != '[' && eq) {
            if (len > 190) return 0;
            const char *v = eq + 2, *end = p + len; /* "key = value" */
            if (v > end) return 0;
            size_t vl = (size_t)(end - v);
            if (memchr(v, ';', vl) || memchr(v, '#', vl)) return 0;
            if (vl && (v[0] == ' ' || v[0] == '\t' || end[-1] == ' ' || end[-1] == '\t')) return 0;
            if (vl >= 2 && (v[0] == '"' || v[0] == '\'') && end[-1] == v[0]) return 0;
        }
        if (!nl) break;
        p = nl + 1;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = fz_cstr(data, size);
    kd_config *c = kd_config_new();
    kd_status s = kd_config_load_string(c, buf, "fuzz.ini");
    FZ_CHECK(s == KD_OK || s == KD_ECONFIG || s == KD_EIO, "status %d", (int)s);
    int ok = s == KD_OK;
    /* the overrides: every NUL-terminated piece after the first */
    size_t at = strlen(buf) + 1;
    for (int k = 0; at < size && k < 16; k++) {
        const char *a = buf + at;
        kd_status so = kd_config_override(c, a);
        FZ_CHECK(so == KD_OK || so == KD_ECONFIG || so == KD_EUSAGE, "override status %d", (int)so);
        ok &= so == KD_OK;
        at += strlen(a) + 1;
    }
    if (ok) {
        FZ_CHECK(kd_config_write(c, path1) == KD_OK, "writing %s", path1);
        size_t n1, n2;
        char *t1 = slurp(path1, &n1);
        kd_config *c2 = kd_config_new();
        kd_status s2 = kd_config_load(c2, path1);
        if (plain_values(t1)) {
            FZ_CHECK(s2 == KD_OK, "the resolved config does not load again");
            FZ_CHECK(kd_config_write(c2, path2) == KD_OK, "writing %s", path2);
            char *t2 = slurp(path2, &n2);
            FZ_CHECK(n1 == n2 && memcmp(t1, t2, n1) == 0, "the resolved config changed on reload:\n%s\n---\n%s", t1,
                     t2);
            free(t2);
        }
        kd_config_free(c2);
        free(t1);
    }
    kd_config_free(c);
    free(buf);
    return 0;
}
