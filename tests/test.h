/* test.h - a tiny test harness in the spirit of minctest.
 *
 * Each tests/test_<area>.c defines `void test_<area>(void)` made of TEST
 * blocks; tests/main.c runs them all (or those named on the command line)
 * and prints "N passed, N failed", exiting non-zero on any failure.
 * CHECK_* print the first mismatches with their values.
 */
#ifndef KD_TEST_H
#define KD_TEST_H
#include <math.h>
#include <stdio.h>
#include <string.h>

extern int kd_test_passed, kd_test_failed;
extern const char *kd_test_name;

#define TEST(name) for (int _once = (kd_test_name = (name), 1); _once; _once = 0)

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (cond) {                                                                        \
            kd_test_passed++;                                                              \
        } else {                                                                           \
            kd_test_failed++;                                                              \
            fprintf(stderr, "FAIL %s (%s:%d): %s\n", kd_test_name, __FILE__, __LINE__, #cond); \
        }                                                                                  \
    } while (0)

#define CHECK_MSG(cond, ...)                                                          \
    do {                                                                              \
        if (cond) {                                                                   \
            kd_test_passed++;                                                         \
        } else {                                                                      \
            kd_test_failed++;                                                         \
            fprintf(stderr, "FAIL %s (%s:%d): %s: ", kd_test_name, __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                             \
            fputc('\n', stderr);                                                      \
        }                                                                             \
    } while (0)

/* |a-b| <= atol + rtol*|b| (and neither is NaN) */
#define CHECK_CLOSE(a, b, atol, rtol)                                                              \
    do {                                                                                           \
        double _a = (double)(a), _b = (double)(b);                                                 \
        if (!isnan(_a) && !isnan(_b) && fabs(_a - _b) <= (atol) + (rtol)*fabs(_b)) {               \
            kd_test_passed++;                                                                      \
        } else {                                                                                   \
            kd_test_failed++;                                                                      \
            fprintf(stderr, "FAIL %s (%s:%d): %s = %.9g, expected %s = %.9g\n", kd_test_name, __FILE__, \
                    __LINE__, #a, _a, #b, _b);                                                     \
        }                                                                                          \
    } while (0)

/* tests/testutil.c: the distill binary under test ($KD_DISTILL, else
 * build/distill); a shell command's exit status (128 when killed by a
 * signal); a whole file, NUL-terminated and malloc'd (NULL when it cannot be
 * read; len may be NULL). */
const char *kd_test_bin(void);
/* largest |p_i| over n floats; 1 when all n are finite, else 0 */
double kd_test_max_abs(const float *p, long n);
/* a JSON file parsed (NULL when unreadable or malformed; cJSON_Delete it),
 * and root[obj][key] as a number (NaN when absent) */
struct cJSON;
struct cJSON *kd_test_read_json(const char *path);
double kd_test_json_num(const struct cJSON *root, const char *obj, const char *key);
int kd_test_all_finite(const float *p, long n);
int kd_test_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
char *kd_test_slurp(const char *path, size_t *len);

/* Compares n floats; counts one check; prints up to 5 mismatches. */
int kd_test_close_arrays(const char *what, const float *a, const float *b, long n, double atol, double rtol);
#define CHECK_ARRAYS(what, a, b, n, atol, rtol)                                                       \
    do {                                                                                              \
        if (kd_test_close_arrays(what, a, b, n, atol, rtol)) {                                        \
            kd_test_passed++;                                                                         \
        } else {                                                                                      \
            kd_test_failed++;                                                                         \
            fprintf(stderr, "FAIL %s (%s:%d): arrays %s differ\n", kd_test_name, __FILE__, __LINE__, what); \
        }                                                                                             \
    } while (0)

/* A fresh temporary directory for this test run (created by main). */
const char *kd_test_tmpdir(void);
/* Path of a file in tests/fixtures (KD_FIXTURES env or ./tests/fixtures). */
const char *kd_test_fixture(const char *name, char *buf, size_t n);

#endif
