/* export_harness.c - times an exported model (distill export) on a test set.
 *
 * Built by bench/export_bench.sh against one export directory:
 *     cc -O2 -std=c99 -IDIR bench/export_harness.c DIR/model.c -lm
 * Usage: harness IMAGES LABELS N LOGITS_OUT [REPS]
 *   IMAGES: N * MODEL_INPUT_SIZE float32 (pixel/255), LABELS: N bytes.
 * First one pass that writes every logit to LOGITS_OUT (checked against
 * ONNX Runtime by the Python side) and counts correct predictions, then
 * REPS (default 3) timed passes over the N images, one model_predict per
 * image, single thread. Prints one JSON line: accuracy, the microseconds per
 * sample of each pass and their median.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "model.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s IMAGES LABELS N LOGITS_OUT [REPS]\n", argv[0]);
        return 2;
    }
    long n = atol(argv[3]);
    int reps = argc > 5 ? atoi(argv[5]) : 3;
    if (n <= 0 || reps <= 0 || reps > 99) return 2;
    float *x = malloc(sizeof(float) * (size_t)n * MODEL_INPUT_SIZE), *z = malloc(sizeof(float) * (size_t)n * MODEL_CLASSES);
    unsigned char *y = malloc((size_t)n);
    FILE *f = fopen(argv[1], "rb");
    if (!x || !z || !y || !f || fread(x, sizeof(float) * MODEL_INPUT_SIZE, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "%s: cannot read %ld images\n", argv[1], n);
        return 1;
    }
    fclose(f);
    f = fopen(argv[2], "rb");
    if (!f || fread(y, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "%s: cannot read %ld labels\n", argv[2], n);
        return 1;
    }
    fclose(f);
    long right = 0;
    for (long i = 0; i < n; i++) right += model_predict(x + i * MODEL_INPUT_SIZE, z + i * MODEL_CLASSES) == y[i];
    f = fopen(argv[4], "wb");
    if (!f || fwrite(z, sizeof(float) * MODEL_CLASSES, (size_t)n, f) != (size_t)n || fclose(f) != 0) {
        fprintf(stderr, "%s: cannot write\n", argv[4]);
        return 1;
    }
    double us[99];
    volatile int sink = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        for (long i = 0; i < n; i++) sink += model_predict(x + i * MODEL_INPUT_SIZE, z);
        us[r] = (now() - t0) * 1e6 / (double)n;
    }
    printf("{\"acc\": %.6f, \"us\": [", (double)right / (double)n);
    for (int r = 0; r < reps; r++) printf("%s%.3f", r ? ", " : "", us[r]);
    qsort(us, (size_t)reps, sizeof(double), cmp);
    printf("], \"median_us\": %.3f}\n", us[reps / 2]);
    free(x), free(y), free(z);
    return 0;
}
