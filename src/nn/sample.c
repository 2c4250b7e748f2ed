/* sample.c - drawing the next token from logits: greedy, temperature,
 * top-k and top-p (nucleus) sampling.
 *
 * Order of the filters (as Hugging Face's logits warpers apply them):
 * temperature scales the logits, top-k keeps the k largest, top-p keeps the
 * smallest prefix of what is left, sorted by probability and renormalised,
 * whose mass reaches p. The candidates are (logit, index) pairs in the
 * caller's scratch; top-k selects with a k-sized heap (O(V log k)) and sorts
 * only the k kept, top-p alone sorts all V, plain sampling sorts nothing.
 * Ties are broken by the lower index everywhere, so the result depends only
 * on the logits and the one uniform draw. Nothing is allocated.
 *
 * Not here: repetition penalties, min-p, typical sampling, beam search.
 */
#include <math.h>
#include <stdlib.h>

#include "kd_gpt.h"

typedef struct cand {
    float z; /* logit, then unnormalised probability */
    int i;
} cand;

size_t kd_sample_scratch_bytes(int V) { return (size_t)(V > 0 ? V : 1) * sizeof(cand); }

kd_status kd_sample_opts_check(const kd_sample_opts *o) {
    if (!isfinite(o->temperature))
        return kd_errorf(KD_ECONFIG, "sampling: temperature %g is not a finite number (<= 0 means greedy)",
                         (double)o->temperature);
    if (isnan(o->top_p) || o->top_p <= 0.0f)
        return kd_errorf(KD_ECONFIG, "sampling: top_p %g must be in (0, 1] (1 = off)", (double)o->top_p);
    return KD_OK;
}

/* a ranks before b: larger logit, or the same and a lower index */
static int better(const cand *a, const cand *b) { return a->z > b->z || (a->z == b->z && a->i < b->i); }

static int cmp_cand(const void *pa, const void *pb) {
    const cand *a = pa, *b = pb;
    return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

/* logits (V): index of the largest, the lowest on ties */
static int argmax(const float *logits, int V) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* the heap h (n) keeps its worst candidate at the root */
static void sift_down(cand *h, int n, int j) {
    for (;;) {
        int l = 2 * j + 1, r = l + 1, w = j;
        if (l < n && better(&h[w], &h[l])) w = l;
        if (r < n && better(&h[w], &h[r])) w = r;
        if (w == j) return;
        cand t = h[j];
        h[j] = h[w];
        h[w] = t;
        j = w;
    }
}

/* c (k) = the k best of logits (V), sorted best first */
static void top_k(cand *c, const float *logits, int V, int k) {
    for (int i = 0; i < k; i++) c[i] = (cand){logits[i], i};
    for (int j = k / 2 - 1; j >= 0; j--) sift_down(c, k, j);
    for (int i = k; i < V; i++) {
        cand x = {logits[i], i};
        if (better(&x, &c[0])) {
            c[0] = x;
            sift_down(c, k, 0);
        }
    }
    qsort(c, (size_t)k, sizeof *c, cmp_cand);
}

int kd_sample_token(const float *logits, int V, const kd_sample_opts *o, kd_rng *rng, void *scratch) {
    KD_ASSERT(V >= 1, "sampling from %d logits", V);
    if (o->temperature <= 0.0f || o->top_k == 1) return argmax(logits, V);
    KD_ASSERT(scratch, "kd_sample_token needs scratch when not greedy");
    cand *c = scratch;
    int n = o->top_k > 0 && o->top_k < V ? o->top_k : V, nucleus = o->top_p < 1.0f;
    float m;
    if (n < V) {
        top_k(c, logits, V, n);
        m = c[0].z;
    } else {
        m = logits[0];
        for (int i = 0; i < V; i++) {
            c[i] = (cand){logits[i], i};
            if (logits[i] > m) m = logits[i];
        }
        if (nucleus) qsort(c, (size_t)V, sizeof *c, cmp_cand);
    }
    float inv_t = 1.0f / o->temperature;
    double sum = 0.0;
    for (int j = 0; j < n; j++) {
        c[j].z = expf((c[j].z - m) * inv_t);
        sum += c[j].z;
    }
    if (nucleus) {
        /* c is sorted best first: the shortest prefix holding top_p of the mass */
        double cut = (double)o->top_p * sum, cum = 0.0;
        int j = 0;
        while (j < n) {
            cum += c[j++].z;
            if (cum >= cut) break;
        }
        n = j;
        sum = cum;
    }
    double u = (double)kd_rng_uniform(rng) * sum, acc = 0.0;
    for (int j = 0; j < n; j++) {
        acc += c[j].z;
        if (u < acc) return c[j].i;
    }
    return c[n - 1].i; /* u within rounding of the total */
}
