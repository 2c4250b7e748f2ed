/* kd_data.h - datasets and the batch loader.
 *
 * Images are kept as uint8 in memory (Fashion-MNIST: 47 MB for 60k images)
 * and turned into normalised float32 batches one batch at a time.
 */
#ifndef KD_DATA_H
#define KD_DATA_H
#include "kd.h"

typedef struct kd_dataset {
    int n;          /* examples */
    int c, h, w;    /* image geometry (c=1 for IDX) */
    int n_classes;  /* 1 + the largest label */
    uint8_t *images; /* (n, c, h, w) */
    uint8_t *labels; /* (n) */
    float mean, std; /* normalisation applied to pixel/255 */
    char name[64];   /* "fashion-mnist:train" */
    int labeled;     /* > 0: only the first `labeled` examples keep their label;
                      * the loader gives the others label -1 (ignored by the
                      * cross-entropy, still seen by distillation terms) */
} kd_dataset;

/* Reads an IDX image file (magic 0x00000803) and an IDX label file
 * (0x00000801), plain or gzip (detected by content, read through zlib).
 * Validates magic, dimensions, lengths and that label count == image count;
 * errors name the file. */
kd_status kd_idx_load(const char *images_path, const char *labels_path, kd_dataset *out);

/* "fashion-mnist:train" | "fashion-mnist:test" (directory from the environment
 * variable KD_FASHION_MNIST_DIR, default /usr/share/datasets/fashion-mnist),
 * or "idx:IMAGES,LABELS". Sets mean/std (Fashion-MNIST: 0.2860, 0.3530). */
kd_status kd_dataset_load(const char *spec, kd_dataset *out);
void kd_dataset_free(kd_dataset *ds);
/* Keeps the first n examples (n <= 0 or n >= ds->n: no change). */
void kd_dataset_limit(kd_dataset *ds, int n);
/* Maps every label l to map[l] (e.g. Fashion-MNIST's 10 classes onto 2:
 * "0 0 0 0 0 1 1 1 1 1"); n_classes becomes 1 + the largest entry. Needs an
 * entry for every class, and every new class in 0..max must be produced. */
kd_status kd_dataset_relabel(kd_dataset *ds, const int *map, int n_map);
/* Parses "0 0 1 1 ..." (spaces or commas) into map (at most cap entries). */
kd_status kd_label_map_parse(const char *s, int *map, int cap, int *n);

typedef struct kd_loader_opts {
    int batch;
    uint64_t seed;
    int shuffle;  /* reshuffle every epoch from (seed, epoch) */
    int crop_pad; /* random crop after zero-padding this many pixels (0: off) */
    int flip;     /* random horizontal flip with p=0.5 */
    int view_epochs; /* > 0: the augmented view of epoch e is that of epoch e % view_epochs
                      * (a cache of teacher outputs holds that many views per example) */
} kd_loader_opts;

typedef struct kd_loader kd_loader;
kd_loader *kd_loader_new(const kd_dataset *ds, const kd_loader_opts *opts);
void kd_loader_free(kd_loader *ld);
int kd_loader_batches(const kd_loader *ld); /* per epoch; the last partial batch is kept */
void kd_loader_start_epoch(kd_loader *ld, int epoch);
/* Fills x (B,C,H,W) normalised floats and y (B) labels as floats; returns
 * B (0 when the epoch is done). aug may be NULL, else receives per example
 * {dx, dy, flip, index} (4 ints each) describing the view produced. */
int kd_loader_next(kd_loader *ld, float *x, float *y, int *aug);
/* Position within the epoch (batches already returned), for resume. */
int kd_loader_position(const kd_loader *ld);
void kd_loader_seek(kd_loader *ld, int batch_index);

#endif
