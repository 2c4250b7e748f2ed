/* loader.c - batches of normalised float images from a uint8 dataset.
 *
 * Each epoch has an order: the identity, or (shuffle) a Fisher-Yates
 * permutation drawn from an RNG seeded with
 *     kd_hash64(seed ^ kd_hash64(epoch + 1)).
 * kd_loader_next turns the next `batch` examples of that order into
 * (pixel/255 - mean)/std floats, NCHW, with optional augmentation per example:
 *   - random crop as torchvision RandomCrop(size=(h, w), padding=p): pad with
 *     pixel 0 on every side, take the h x w window at (dx, dy), each uniform
 *     in [0, 2p] (dx the column offset, dy the row offset, in padded
 *     coordinates: (p, p) is the unshifted image);
 *   - horizontal flip with probability 0.5, applied after the crop.
 * The random numbers of an example come from an RNG seeded by
 * (seed, epoch, dataset index) alone, so the view of an example does not
 * depend on the batch it lands in, the batch size or the thread count; the
 * batch is assembled in parallel with OpenMP.
 *
 * Deliberately not here: background prefetching (assembling a batch costs
 * far less than a training step on it), mixup/cutmix, colour jitter.
 */
#include <stdlib.h>
#include <string.h>

#include "kd_data.h"

/* Separates the augmentation stream from the shuffle stream. */
#define AUG_SALT 0x6175676d656e7421ull

struct kd_loader {
    const kd_dataset *ds; /* borrowed: must outlive the loader */
    kd_loader_opts opts;
    int *perm;   /* (n) dataset index of each position in the epoch */
    int epoch;
    int pos;     /* batches already returned this epoch */
    float lut[256]; /* normalised value of each pixel byte */
};

kd_loader *kd_loader_new(const kd_dataset *ds, const kd_loader_opts *opts) {
    KD_ASSERT(ds && ds->n > 0 && ds->images && ds->labels, "loader needs a loaded, non-empty dataset");
    KD_ASSERT(opts && opts->batch > 0, "batch size must be positive");
    KD_ASSERT(opts->crop_pad >= 0 && opts->crop_pad <= 1 << 16, "crop_pad %d out of range", opts->crop_pad);
    KD_ASSERT(ds->std > 0, "dataset std must be positive, got %g", (double)ds->std);
    kd_loader *ld = kd_calloc(1, sizeof *ld);
    ld->ds = ds;
    ld->opts = *opts;
    ld->perm = kd_malloc((size_t)ds->n * sizeof *ld->perm);
    for (int v = 0; v < 256; v++) ld->lut[v] = ((float)v / 255.0f - ds->mean) / ds->std;
    kd_loader_start_epoch(ld, 0);
    return ld;
}

void kd_loader_free(kd_loader *ld) {
    if (!ld) return;
    free(ld->perm);
    free(ld);
}

int kd_loader_batches(const kd_loader *ld) { return (ld->ds->n + ld->opts.batch - 1) / ld->opts.batch; }

void kd_loader_start_epoch(kd_loader *ld, int epoch) {
    int n = ld->ds->n;
    ld->epoch = epoch;
    ld->pos = 0;
    for (int i = 0; i < n; i++) ld->perm[i] = i;
    if (!ld->opts.shuffle) return;
    kd_rng r;
    kd_rng_seed(&r, kd_hash64(ld->opts.seed ^ kd_hash64((uint64_t)epoch + 1)));
    for (int i = n - 1; i > 0; i--) {
        int j = (int)kd_rng_below(&r, (uint32_t)i + 1);
        int t = ld->perm[i];
        ld->perm[i] = ld->perm[j];
        ld->perm[j] = t;
    }
}

/* Writes one augmented, normalised example. out (C,H,W), src (C,H,W) bytes;
 * aug4 receives {dx, dy, flip, index}. */
static void make_example(const kd_loader *ld, int idx, float *out, int *aug4) {
    const kd_dataset *ds = ld->ds;
    int C = ds->c, H = ds->h, W = ds->w, p = ld->opts.crop_pad;
    kd_rng r;
    int ve = ld->opts.view_epochs > 0 ? ld->epoch % ld->opts.view_epochs : ld->epoch;
    kd_rng_seed(&r, kd_hash64(ld->opts.seed ^ AUG_SALT) ^
                        kd_hash64(((uint64_t)(uint32_t)ve << 32) | (uint64_t)(uint32_t)idx));
    int dx = p, dy = p, flip = 0;
    if (p > 0) {
        dx = (int)kd_rng_below(&r, (uint32_t)(2 * p + 1));
        dy = (int)kd_rng_below(&r, (uint32_t)(2 * p + 1));
    }
    if (ld->opts.flip) flip = kd_rng_uniform(&r) < 0.5f;
    /* output (y, x) reads padded (y + dy, x' + dx), x' = flip ? W-1-x : x;
     * padded (py, px) is source (py - p, px - p) when inside, else pixel 0 */
    const uint8_t *src = ds->images + (size_t)idx * C * H * W;
    float zero = ld->lut[0];
    for (int c = 0; c < C; c++) {
        for (int y = 0; y < H; y++) {
            int sy = y + dy - p;
            float *orow = out + ((size_t)c * H + y) * W;
            if (sy < 0 || sy >= H) {
                for (int x = 0; x < W; x++) orow[x] = zero;
                continue;
            }
            const uint8_t *srow = src + ((size_t)c * H + sy) * W;
            for (int x = 0; x < W; x++) {
                int sx = (flip ? W - 1 - x : x) + dx - p;
                orow[x] = (sx >= 0 && sx < W) ? ld->lut[srow[sx]] : zero;
            }
        }
    }
    if (aug4) {
        aug4[0] = dx;
        aug4[1] = dy;
        aug4[2] = flip;
        aug4[3] = idx;
    }
}

int kd_loader_next(kd_loader *ld, float *x, float *y, int *aug) {
    const kd_dataset *ds = ld->ds;
    long start = (long)ld->pos * ld->opts.batch;
    if (start >= ds->n) return 0;
    int B = ds->n - start < ld->opts.batch ? (int)(ds->n - start) : ld->opts.batch;
    size_t per = (size_t)ds->c * ds->h * ds->w;
#ifdef _OPENMP /* guarded: an OMP=0 build must not warn about the pragma */
#pragma omp parallel for schedule(static) if (B * per >= 16384)
#endif
    for (int b = 0; b < B; b++) {
        int idx = ld->perm[start + b];
        make_example(ld, idx, x + (size_t)b * per, aug ? aug + 4 * b : NULL);
        y[b] = (ds->labeled > 0 && idx >= ds->labeled) ? -1.0f : (float)ds->labels[idx];
    }
    ld->pos++;
    return B;
}

int kd_loader_position(const kd_loader *ld) { return ld->pos; }

void kd_loader_seek(kd_loader *ld, int batch_index) {
    KD_ASSERT(batch_index >= 0 && batch_index <= kd_loader_batches(ld), "seek to batch %d of %d", batch_index,
              kd_loader_batches(ld));
    ld->pos = batch_index;
}
