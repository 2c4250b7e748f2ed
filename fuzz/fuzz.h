/* fuzz.h - helpers shared by the libFuzzer harnesses (fuzz/fuzz_*.c).
 *
 * Our loaders take paths, not buffers, and we do not change them for the
 * fuzzer: a harness writes its input into an in-memory file (memfd) and
 * hands the loader "/proc/self/fd/N", or into a file of a private temporary
 * directory under /dev/shm when the loader wants a directory or writes next
 * to its target. FZ_CHECK states an invariant the library promises; a broken
 * one aborts, which libFuzzer reports as a crash with the input saved.
 *
 * Deliberately not here: anything that needs the library's internals. The
 * harnesses see only the public headers.
 */
#ifndef KD_FUZZ_H
#define KD_FUZZ_H
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd.h"

#define FZ_CHECK(cond, ...)                                                                                            \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "fuzz invariant broken (%s:%d): %s: ", __FILE__, __LINE__, #cond);                         \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fprintf(stderr, "\n(last library message: %s)\n", kd_error_message());                                     \
            abort();                                                                                                   \
        }                                                                                                              \
    } while (0)

/* An in-memory file whose path any open(2)/fopen/gzopen accepts. */
typedef struct fz_file {
    int fd;
    char path[64];
} fz_file;

static inline void fz_file_init(fz_file *f, const char *name) {
    f->fd = memfd_create(name, 0);
    if (f->fd < 0) {
        perror("memfd_create");
        abort();
    }
    snprintf(f->path, sizeof f->path, "/proc/self/fd/%d", f->fd);
}

/* Replaces the file's content with n bytes. */
static inline void fz_file_set(fz_file *f, const uint8_t *data, size_t n) {
    if (ftruncate(f->fd, 0) != 0) {
        perror("ftruncate");
        abort();
    }
    size_t done = 0;
    while (done < n) {
        ssize_t w = pwrite(f->fd, data + done, n - done, (off_t)done);
        if (w <= 0) {
            perror("pwrite");
            abort();
        }
        done += (size_t)w;
    }
}

/* Writes n bytes to path (a regular file, replaced). */
static inline void fz_write_path(const char *path, const uint8_t *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0) {
        perror(path);
        abort();
    }
}

static char fz_dir_path[64];

static inline void fz_dir_cleanup(void) {
    if (!fz_dir_path[0]) return;
    DIR *d = opendir(fz_dir_path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            char p[sizeof fz_dir_path + 260];
            snprintf(p, sizeof p, "%s/%s", fz_dir_path, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(fz_dir_path);
}

/* A private directory for this process, removed at a normal exit (a crash
 * leaves it behind in /dev/shm or /tmp, named kd_fuzz_*). */
static inline const char *fz_dir(void) {
    if (fz_dir_path[0]) return fz_dir_path;
    snprintf(fz_dir_path, sizeof fz_dir_path, "/dev/shm/kd_fuzz_XXXXXX");
    if (!mkdtemp(fz_dir_path)) {
        snprintf(fz_dir_path, sizeof fz_dir_path, "/tmp/kd_fuzz_XXXXXX");
        if (!mkdtemp(fz_dir_path)) {
            perror("mkdtemp");
            abort();
        }
    }
    atexit(fz_dir_cleanup);
    return fz_dir_path;
}

/* The input as a NUL-terminated string (a NUL inside ends it early); the
 * caller frees. */
static inline char *fz_cstr(const uint8_t *data, size_t n) {
    char *s = malloc(n + 1);
    if (!s) abort();
    memcpy(s, data, n);
    s[n] = '\0';
    return s;
}

#endif
