/* util.c - error messages, checked allocation, random numbers.
 *
 * The error message lives in a thread-local buffer: a failing function
 * records what went wrong (naming the file, key or tensor) and returns a
 * kd_status; only the CLI prints it. Allocation failure is not a user error
 * we can recover from in a training tool, so it aborts with a message.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd.h"

static _Thread_local char err_buf[2048];

kd_status kd_errorf(kd_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return st;
}

kd_status kd_error_prefix(kd_status st, const char *fmt, ...) {
    char head[1024], old[sizeof err_buf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(head, sizeof head, fmt, ap);
    va_end(ap);
    memcpy(old, err_buf, sizeof old);
    size_t k = strlen(head);
    if (k > sizeof err_buf - 3) k = sizeof err_buf - 3;
    memcpy(err_buf, head, k);
    err_buf[k] = ':';
    err_buf[k + 1] = ' ';
    size_t room = sizeof err_buf - k - 2, m = strlen(old);
    if (m >= room) m = room - 1;
    memcpy(err_buf + k + 2, old, m);
    err_buf[k + 2 + m] = '\0';
    return st;
}

const char *kd_error_message(void) { return err_buf; }

void kd_panic(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "distill: internal error at %s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

void *kd_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) kd_panic(__FILE__, __LINE__, "out of memory allocating %zu bytes", n);
    return p;
}

void *kd_calloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) kd_panic(__FILE__, __LINE__, "out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

void *kd_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) kd_panic(__FILE__, __LINE__, "out of memory reallocating %zu bytes", n);
    return q;
}

char *kd_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = kd_malloc(n);
    memcpy(d, s, n);
    return d;
}

/* ---- random numbers: splitmix64 for seeding/hashing, xorshift64* to draw */

uint64_t kd_hash64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

void kd_rng_seed(kd_rng *r, uint64_t seed) {
    r->s = kd_hash64(seed);
    if (r->s == 0) r->s = 0x2545F4914F6CDD1Dull;
}

uint64_t kd_rng_u64(kd_rng *r) {
    uint64_t x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

float kd_rng_uniform(kd_rng *r) { return (float)(kd_rng_u64(r) >> 40) * (1.0f / 16777216.0f); }

float kd_rng_normal(kd_rng *r) {
    /* Box-Muller; u1 in (0,1] so the log is finite */
    float u1 = ((float)(kd_rng_u64(r) >> 40) + 1.0f) * (1.0f / 16777216.0f);
    float u2 = kd_rng_uniform(r);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
}

uint32_t kd_rng_below(kd_rng *r, uint32_t n) {
    KD_ASSERT(n > 0, "kd_rng_below(0)");
    /* Lemire's multiply-shift; the tiny bias (< n/2^32) is irrelevant here */
    return (uint32_t)(((kd_rng_u64(r) >> 32) * (uint64_t)n) >> 32);
}

/* ---- shapes */

int64_t kd_shape_numel(int ndim, const int *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

const char *kd_shape_str(int ndim, const int *shape, char *buf, size_t n) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "(");
    for (int i = 0; i < ndim && k < n; i++) k += (size_t)snprintf(buf + k, n - k, i ? ", %d" : "%d", shape[i]);
    if (k < n) snprintf(buf + k, n - k, ")");
    return buf;
}

kd_status kd_write_atomic(const char *path, const void *data, size_t n) {
    size_t tlen = strlen(path) + 32;
    char *tmp = kd_malloc(tlen);
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());
    kd_status st = KD_OK;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        st = kd_errorf(KD_EIO, "%s: cannot create %s: %s", path, tmp, strerror(errno));
    } else {
        const char *what = NULL;
        int err = 0;
        if (fwrite(data, 1, n, f) != n) what = "write failed", err = errno;
        if (!what && fflush(f) != 0) what = "write failed", err = errno;
        if (!what && fsync(fileno(f)) != 0) what = "fsync failed", err = errno;
        if (fclose(f) != 0 && !what) what = "close failed", err = errno;
        if (!what && rename(tmp, path) != 0) what = "rename failed", err = errno;
        if (what) {
            unlink(tmp);
            st = kd_errorf(KD_EIO, "%s: %s: %s", path, what, strerror(err ? err : EIO));
        } else { /* best effort: make the rename itself durable */
            const char *slash = strrchr(path, '/');
            char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
            int fd = dir ? open(dir, O_RDONLY | O_DIRECTORY) : -1;
            if (fd >= 0) {
                (void)fsync(fd);
                close(fd);
            }
            free(dir);
        }
    }
    free(tmp);
    return st;
}
