/* kd_cache.h - cached teacher outputs.
 *
 * `distill cache` runs a teacher once over the training set and stores its
 * logits per example: all K of them (F32 or F16), or the top k (values F16,
 * class ids I32) plus the log-sum-exp of the rest. With augmentation it
 * stores one record per augmented view for E epochs, and the view (crop
 * offsets, flip) is part of the record, as in Fast Knowledge Distillation
 * (Shen & Xing 2022). A run then reads the cache instead of running the
 * teacher. The container is safetensors (docs/formats.md, "Teacher cache").
 */
#ifndef KD_CACHE_H
#define KD_CACHE_H
#include "kd.h"
#include "kd_data.h"
#include "kd_io.h"

typedef struct kd_cache {
    kd_safetensors st;
    int n, K, topk;   /* examples, classes, k (0: full logits) */
    int views;        /* augmented views per example (0: un-augmented) */
    int crop, flip;   /* augmentation the views were drawn with */
    uint64_t seed;    /* ... and its seed */
    const kd_st_tensor *logits, *values, *indices, *rest, *aug;
} kd_cache;

typedef struct kd_cache_opts {
    int topk;      /* 0: all logits */
    int fp16;      /* store logits as F16 */
    int views;     /* 0: one un-augmented record per example; E: E augmented views */
    int crop, flip;
    uint64_t seed;
    int batch;
} kd_cache_opts;

/* Runs the teacher checkpoint over ds and writes the cache atomically. */
kd_status kd_cache_build(const char *teacher_ckpt, const kd_dataset *ds, const kd_cache_opts *o, const char *out,
                         double *seconds);
/* Opens and validates a cache (shapes, dtypes, indices in range). */
kd_status kd_cache_open(const char *path, kd_cache *c);
void kd_cache_close(kd_cache *c);
/* Teacher logits (B, K) for a batch: aug holds the loader's {dx, dy, flip,
 * index} per example, epoch the training epoch (0-based). The view the
 * loader drew must be the one cached: a mismatch is an error (different
 * seed, crop or flip). Top-k records give the k stored logits and, for the
 * other classes, equal logits carrying the stored remaining mass. */
kd_status kd_cache_fill(const kd_cache *c, int epoch, const int *aug, int B, float *out);

#endif
