/* main.c - runs every test area (or those named on the command line). */
#include <stdlib.h>
#include <unistd.h>

#include "test.h"

int kd_test_passed, kd_test_failed;
const char *kd_test_name = "";
static char tmpdir[256];

int kd_test_close_arrays(const char *what, const float *a, const float *b, long n, double atol, double rtol) {
    int bad = 0;
    for (long i = 0; i < n; i++) {
        double x = a[i], y = b[i];
        if (isnan(x) || isnan(y) || fabs(x - y) > atol + rtol * fabs(y)) {
            if (bad < 5) fprintf(stderr, "  %s[%ld]: %.9g vs expected %.9g\n", what, i, x, y);
            bad++;
        }
    }
    if (bad) fprintf(stderr, "  %s: %d of %ld elements differ\n", what, bad, n);
    return bad == 0;
}

const char *kd_test_tmpdir(void) { return tmpdir; }

const char *kd_test_fixture(const char *name, char *buf, size_t n) {
    const char *dir = getenv("KD_FIXTURES");
    snprintf(buf, n, "%s/%s", dir ? dir : "tests/fixtures", name);
    return buf;
}

#define AREAS(X) X(core) X(ops) X(data) X(safetensors) X(config) X(optim) X(nn) X(train) X(cli) X(losses) X(distill) \
    X(features) X(cache) X(losses2) X(features2) X(features3) X(geom) X(export) X(rank) X(topk) X(interop) X(report) \
    X(resume) X(lm_ops) X(text) X(gpt_infer) X(lm) X(lelp) X(multitask) X(llmr) X(textcls) \
    X(lora)
#define DECL(a) void test_##a(void);
AREAS(DECL)

int main(int argc, char **argv) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kd_test_XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    struct {
        const char *name;
        void (*fn)(void);
    } areas[] = {
#define ENTRY(a) {#a, test_##a},
        AREAS(ENTRY)
    };
    int n = (int)(sizeof areas / sizeof areas[0]);
    for (int i = 0; i < n; i++) {
        int run = argc < 2;
        for (int j = 1; j < argc; j++) run |= strcmp(argv[j], areas[i].name) == 0;
        if (!run) continue;
        int f0 = kd_test_failed, p0 = kd_test_passed;
        areas[i].fn();
        printf("%-12s %d passed, %d failed\n", areas[i].name, kd_test_passed - p0, kd_test_failed - f0);
        fflush(stdout);
    }
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmpdir);
    printf("%d passed, %d failed\n", kd_test_passed, kd_test_failed);
    return kd_test_failed ? 1 : 0;
}
