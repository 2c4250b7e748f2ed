/* fuzz_cache.c - libFuzzer harness for the two teacher caches: the
 * classifier cache (kd_cache_open, include/kd_cache.h) and the language-model
 * cache (kd_lm_cache_open, include/kd_lm.h).
 *
 * The input is a whole file (safetensors underneath) and goes to both
 * openers. An accepted classifier cache must fill the logits of its first
 * and last example for the first and last epoch with the views it stores,
 * reject an example beyond its count and, when it stores views, a view it
 * did not draw. An accepted LM cache must hold tokens below its vocabulary
 * and, per position, k distinct ids with log-probabilities <= 0.
 */
#include <math.h>

#include "fuzz.h"
#include "kd_cache.h"
#include "kd_lm.h"

static fz_file in;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_file_init(&in, "cache");
    return 0;
}

/* The loader's view record for example idx in epoch e, as the cache has it. */
static void view_of(const kd_cache *c, int e, int idx, int *aug4) {
    aug4[0] = aug4[1] = aug4[2] = 0;
    aug4[3] = idx;
    if (!c->aug) return;
    size_t r = (size_t)(c->views > 0 ? e % c->views : 0) * c->n + (size_t)idx;
    int16_t v[3];
    memcpy(v, c->aug->data + r * sizeof v, sizeof v);
    for (int k = 0; k < 3; k++) aug4[k] = v[k];
}

static void check_cache(const kd_cache *c) {
    FZ_CHECK(c->n >= 1 && c->K >= 2 && c->topk >= 0 && c->topk < c->K && c->views >= 0, "n %d K %d topk %d views %d",
             c->n, c->K, c->topk, c->views);
    FZ_CHECK(c->topk ? (c->values && c->indices && c->rest && !c->logits) : (c->logits != NULL), "tensors");
    FZ_CHECK((c->views > 0) == (c->aug != NULL), "views %d", c->views);
    float *out = malloc((size_t)c->K * sizeof(float));
    if (!out) abort();
    int last_epoch = c->views > 0 ? c->views - 1 : 0;
    int epochs[2] = {0, last_epoch}, idx[2] = {0, c->n - 1};
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
            int aug[4];
            view_of(c, epochs[a], idx[b], aug);
            FZ_CHECK(kd_cache_fill(c, epochs[a], aug, 1, out) == KD_OK, "fill epoch %d example %d", epochs[a], idx[b]);
        }
    int aug[4];
    view_of(c, 0, 0, aug);
    aug[3] = c->n;
    FZ_CHECK(kd_cache_fill(c, 0, aug, 1, out) == KD_ESHAPE, "example beyond the cache accepted");
    if (c->aug) {
        view_of(c, 0, 0, aug);
        aug[2] ^= 1 << 20;
        FZ_CHECK(kd_cache_fill(c, 0, aug, 1, out) == KD_ECONFIG, "a view the cache does not hold accepted");
    }
    free(out);
}

static void check_lm_cache(const kd_lm_cache *c) {
    FZ_CHECK(c->n >= 1 && c->seq >= 1 && c->k >= 1 && c->k <= c->vocab && c->vocab >= 2 && c->T > 0 && isfinite(c->T),
             "n %lld seq %d k %d vocab %d T %g", (long long)c->n, c->seq, c->k, c->vocab, (double)c->T);
    FZ_CHECK(c->w.n == c->n && c->w.tokens && c->w.ids && c->w.logp, "windows");
    size_t ntok = (size_t)c->n * (size_t)(c->seq + 1), npos = (size_t)c->n * (size_t)c->seq;
    for (size_t i = 0; i < ntok; i++) FZ_CHECK(c->w.tokens[i] < c->vocab, "token %u", c->w.tokens[i]);
    for (size_t r = 0; r < npos; r++)
        for (int j = 0; j < c->k; j++) {
            uint16_t id = c->w.ids[r * c->k + j];
            float lp = kd_f16_to_f32(c->w.logp[r * c->k + j]);
            FZ_CHECK(id < c->vocab && lp <= 0.0f, "position %zu: id %u log-prob %g", r, id, (double)lp);
            for (int m = 0; m < j; m++) FZ_CHECK(c->w.ids[r * c->k + m] != id, "position %zu: id %u twice", r, id);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_file_set(&in, data, size);
    kd_cache c;
    kd_status s = kd_cache_open(in.path, &c);
    FZ_CHECK(s == KD_OK || s == KD_EFORMAT, "cache status %d", (int)s);
    if (s == KD_OK) {
        check_cache(&c);
        kd_cache_close(&c);
    }
    kd_lm_cache lc;
    s = kd_lm_cache_open(in.path, &lc);
    FZ_CHECK(s == KD_OK || s == KD_EFORMAT, "LM cache status %d", (int)s);
    if (s == KD_OK) {
        check_lm_cache(&lc);
        kd_lm_cache_close(&lc);
    }
    return 0;
}
