/* cache.c - teacher outputs computed once and read back per batch.
 *
 * Build: the teacher checkpoint runs in eval mode over the training set,
 * once un-augmented or once per augmented epoch (views), with the loader's
 * own augmentation so that a training run with the same seed, crop and flip
 * draws exactly the cached views (the loader's view of an example depends
 * only on seed, epoch and example index). Each record stores the view it
 * was computed on; reading checks it, so a cache built with another seed or
 * augmentation is refused instead of silently pairing wrong views.
 *
 * Top-k records keep the k largest logits and lse_rest = log sum of exp over
 * the other classes; reading gives those classes equal logits
 * lse_rest - log(K - k), so softmax at T = 1 has exactly the teacher's mass
 * on the top k and on the rest (the shape of the tail is lost; at T != 1
 * the tail mass is approximate). Deliberately not here: per-view top-k
 * caches of feature maps (only logits are cached).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_cache.h"
#include "kd_train.h"

static int cmp_desc(const void *a, const void *b, void *z) {
    const float *v = z;
    float x = v[*(const int *)a], y = v[*(const int *)b];
    return x < y ? 1 : x > y ? -1 : (*(const int *)a - *(const int *)b);
}

kd_status kd_cache_build(const char *teacher_ckpt, const kd_dataset *ds, const kd_cache_opts *o, const char *out,
                         double *seconds) {
    double t0 = kd_now();
    kd_checkpoint_info info;
    kd_status st = kd_checkpoint_info_read(teacher_ckpt, &info);
    if (st != KD_OK) return st;
    if (info.c != ds->c || info.h != ds->h || info.w != ds->w)
        return kd_errorf(KD_ESHAPE, "%s: images are %dx%dx%d, the teacher %s expects %dx%dx%d", ds->name, ds->c, ds->h,
                         ds->w, teacher_ckpt, info.c, info.h, info.w);
    if (o->topk < 0 || o->topk >= info.classes)
        return kd_errorf(KD_EUSAGE, "--topk %d must be in [1, %d) (or 0 for all logits)", o->topk, info.classes);
    kd_dataset view = *ds;
    view.n_classes = info.classes;
    kd_classifier c;
    st = kd_classifier_new(&c, info.model, "", &view, o->batch, 0.0f, 0);
    if (st == KD_OK) st = kd_checkpoint_load(c.g, &c.m, teacher_ckpt);
    if (st != KD_OK) {
        if (c.g) kd_classifier_free(&c);
        return st;
    }
    int K = info.classes, N = ds->n, E = o->views > 0 ? o->views : 1, k = o->topk;
    size_t rows = (size_t)E * N;
    float *full = kd_malloc(rows * K * sizeof(float));
    int16_t *aug = o->views > 0 ? kd_malloc(rows * 3 * sizeof(int16_t)) : NULL;
    int *augb = kd_malloc((size_t)o->batch * 4 * sizeof(int));
    for (int e = 0; e < E; e++) {
        kd_loader_opts lo = {.batch = o->batch,
                             .seed = o->seed,
                             .crop_pad = o->views > 0 ? o->crop : 0,
                             .flip = o->views > 0 ? o->flip : 0};
        kd_loader *ld = kd_loader_new(ds, &lo);
        kd_loader_start_epoch(ld, e);
        int B;
        while ((B = kd_loader_next(ld, c.x->val.data, c.y->val.data, augb)) > 0) {
            kd_graph_set_batch(c.g, B);
            kd_graph_forward_to(c.g, 0, c.m.logits);
            for (int i = 0; i < B; i++) {
                size_t r = (size_t)e * N + (size_t)augb[4 * i + 3];
                memcpy(full + r * K, c.m.logits->val.data + (size_t)i * K, (size_t)K * sizeof(float));
                if (aug)
                    for (int j = 0; j < 3; j++) aug[r * 3 + j] = (int16_t)augb[4 * i + j];
            }
        }
        kd_loader_free(ld);
    }
    kd_classifier_free(&c);
    free(augb);
    for (size_t i = 0; i < rows * K; i++)
        if (!isfinite(full[i])) {
            free(full);
            free(aug);
            return kd_errorf(KD_ENUMERIC, "%s: the teacher's logits for example %zu are not finite", teacher_ckpt,
                             (i / K) % N);
        }
    kd_st_writer *w = kd_st_writer_new();
    int64_t shape[3] = {E, N, K};
    if (k == 0) {
        if (o->fp16) {
            uint16_t *h = kd_malloc(rows * K * sizeof(uint16_t));
            for (size_t i = 0; i < rows * K; i++) h[i] = kd_f32_to_f16(full[i]);
            kd_st_add(w, "logits", KD_F16, 3, shape, h);
            free(h);
        } else {
            kd_st_add(w, "logits", KD_F32, 3, shape, full);
        }
    } else {
        uint16_t *vals = kd_malloc(rows * k * sizeof(uint16_t));
        int32_t *ids = kd_malloc(rows * k * sizeof(int32_t));
        float *rest = kd_malloc(rows * sizeof(float));
        int *order = kd_malloc((size_t)K * sizeof(int));
        for (size_t r = 0; r < rows; r++) {
            const float *z = full + r * K;
            for (int j = 0; j < K; j++) order[j] = j;
            qsort_r(order, (size_t)K, sizeof(int), cmp_desc, (void *)z);
            double m = z[order[k]], s = 0.0;
            for (int j = k; j < K; j++) s += exp((double)z[order[j]] - m);
            rest[r] = (float)(m + log(s));
            for (int j = 0; j < k; j++) {
                vals[r * k + j] = kd_f32_to_f16(z[order[j]]);
                ids[r * k + j] = order[j];
            }
        }
        int64_t ks[3] = {E, N, k}, rs[2] = {E, N};
        kd_st_add(w, "topk.values", KD_F16, 3, ks, vals);
        kd_st_add(w, "topk.indices", KD_I32, 3, ks, ids);
        kd_st_add(w, "topk.lse_rest", KD_F32, 2, rs, rest);
        free(vals);
        free(ids);
        free(rest);
        free(order);
    }
    if (aug) {
        int64_t as[3] = {E, N, 3};
        kd_st_add(w, "views", KD_I16, 3, as, aug);
    }
    char buf[64];
    kd_st_set_meta(w, "format", "distill-cache/1");
    kd_st_set_meta(w, "teacher", teacher_ckpt);
    kd_st_set_meta(w, "model", info.model);
    kd_st_set_meta(w, "dataset", ds->name);
    snprintf(buf, sizeof buf, "%d", N);
    kd_st_set_meta(w, "examples", buf);
    snprintf(buf, sizeof buf, "%d", K);
    kd_st_set_meta(w, "classes", buf);
    snprintf(buf, sizeof buf, "%d", o->views);
    kd_st_set_meta(w, "views", buf);
    snprintf(buf, sizeof buf, "%d", o->views > 0 ? o->crop : 0);
    kd_st_set_meta(w, "crop", buf);
    snprintf(buf, sizeof buf, "%d", o->views > 0 ? o->flip : 0);
    kd_st_set_meta(w, "flip", buf);
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)o->seed);
    kd_st_set_meta(w, "seed", buf);
    snprintf(buf, sizeof buf, "%d", k);
    kd_st_set_meta(w, "topk", buf);
    st = kd_st_write(w, out);
    kd_st_writer_free(w);
    free(full);
    free(aug);
    if (seconds) *seconds = kd_now() - t0;
    return st;
}

static kd_status meta_int(const kd_cache *c, const char *key, long lo, long hi, long *out) {
    const char *v = kd_st_meta(&c->st, key);
    char *end;
    if (!v) return kd_errorf(KD_EFORMAT, "%s: not a teacher cache (metadata '%s' missing)", c->st.path, key);
    long x = strtol(v, &end, 10);
    if (end == v || *end || x < lo || x > hi)
        return kd_errorf(KD_EFORMAT, "%s: metadata %s = '%s' is out of range", c->st.path, key, v);
    *out = x;
    return KD_OK;
}

static kd_status want(const kd_cache *c, const kd_st_tensor *t, const char *name, kd_dtype a, kd_dtype b, int ndim,
                      int64_t d0, int64_t d1, int64_t d2) {
    if (!t) return kd_errorf(KD_EFORMAT, "%s: tensor '%s' missing", c->st.path, name);
    int64_t d[3] = {d0, d1, d2};
    int ok = (t->dtype == a || t->dtype == b) && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == d[i];
    if (!ok)
        return kd_errorf(KD_EFORMAT, "%s: tensor '%s' has the wrong dtype or shape (expected %s, %lld x %lld%s%lld)",
                         c->st.path, name, kd_dtype_name(a), (long long)d0, (long long)d1, ndim == 3 ? " x " : "",
                         ndim == 3 ? (long long)d2 : 0LL);
    return KD_OK;
}

kd_status kd_cache_open(const char *path, kd_cache *c) {
    memset(c, 0, sizeof *c);
    kd_status st = kd_st_read(path, &c->st);
    if (st != KD_OK) return st;
    const char *fmt = kd_st_meta(&c->st, "format");
    long n = 0, K = 0, views = 0, crop = 0, flip = 0, topk = 0;
    if (!fmt || strcmp(fmt, "distill-cache/1") != 0)
        st = kd_errorf(KD_EFORMAT, "%s: not a teacher cache written by distill cache (format '%s')", path,
                       fmt ? fmt : "missing");
    if (st == KD_OK) st = meta_int(c, "examples", 1, 1L << 30, &n);
    if (st == KD_OK) st = meta_int(c, "classes", 2, 1L << 24, &K);
    if (st == KD_OK) st = meta_int(c, "views", 0, 1L << 20, &views);
    if (st == KD_OK) st = meta_int(c, "crop", 0, 16, &crop);
    if (st == KD_OK) st = meta_int(c, "flip", 0, 1, &flip);
    if (st == KD_OK) st = meta_int(c, "topk", 0, K - 1, &topk);
    if (st == KD_OK) {
        const char *sd = kd_st_meta(&c->st, "seed");
        c->seed = sd ? strtoull(sd, NULL, 10) : 0;
        c->n = (int)n;
        c->K = (int)K;
        c->views = (int)views;
        c->crop = (int)crop;
        c->flip = (int)flip;
        c->topk = (int)topk;
        int64_t E = views > 0 ? views : 1;
        if (topk == 0) {
            c->logits = kd_st_find(&c->st, "logits");
            st = want(c, c->logits, "logits", KD_F32, KD_F16, 3, E, n, K);
        } else {
            c->values = kd_st_find(&c->st, "topk.values");
            c->indices = kd_st_find(&c->st, "topk.indices");
            c->rest = kd_st_find(&c->st, "topk.lse_rest");
            st = want(c, c->values, "topk.values", KD_F16, KD_F16, 3, E, n, topk);
            if (st == KD_OK) st = want(c, c->indices, "topk.indices", KD_I32, KD_I32, 3, E, n, topk);
            if (st == KD_OK) st = want(c, c->rest, "topk.lse_rest", KD_F32, KD_F32, 2, E, n, 0);
            for (size_t i = 0; st == KD_OK && i < (size_t)(E * n * topk); i++) {
                int32_t id;
                memcpy(&id, c->indices->data + 4 * i, 4);
                if (id < 0 || id >= K) st = kd_errorf(KD_EFORMAT, "%s: topk.indices holds class %d of %ld", path, id, K);
            }
        }
        if (st == KD_OK && views > 0) {
            c->aug = kd_st_find(&c->st, "views");
            st = want(c, c->aug, "views", KD_I16, KD_I16, 3, E, n, 3);
        }
    }
    if (st != KD_OK) kd_cache_close(c);
    return st;
}

void kd_cache_close(kd_cache *c) {
    kd_st_free(&c->st);
    memset(c, 0, sizeof *c);
}

static float f32_at(const uint8_t *p, size_t i) {
    float f;
    memcpy(&f, p + 4 * i, 4);
    return f;
}

static float f16_at(const uint8_t *p, size_t i) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return kd_f16_to_f32(h);
}

kd_status kd_cache_fill(const kd_cache *c, int epoch, const int *aug, int B, float *out) {
    int K = c->K, k = c->topk;
    int e = c->views > 0 ? epoch % c->views : 0;
    for (int i = 0; i < B; i++) {
        int idx = aug[4 * i + 3];
        if (idx < 0 || idx >= c->n)
            return kd_errorf(KD_ESHAPE, "%s: example %d is beyond the cache's %d examples (built for another dataset?)",
                             c->st.path, idx, c->n);
        size_t r = (size_t)e * c->n + (size_t)idx;
        if (c->aug) {
            int16_t v[3];
            memcpy(v, c->aug->data + r * 3 * sizeof(int16_t), sizeof v);
            if (v[0] != aug[4 * i] || v[1] != aug[4 * i + 1] || v[2] != aug[4 * i + 2])
                return kd_errorf(KD_ECONFIG,
                                 "%s: example %d in epoch %d was cached with view (dx %d, dy %d, flip %d) but the run drew "
                                 "(%d, %d, %d): use the cache's seed %llu, crop %d and flip %d",
                                 c->st.path, idx, epoch, v[0], v[1], v[2], aug[4 * i], aug[4 * i + 1], aug[4 * i + 2],
                                 (unsigned long long)c->seed, c->crop, c->flip);
        }
        float *z = out + (size_t)i * K;
        if (k == 0) {
            for (int j = 0; j < K; j++)
                z[j] = c->logits->dtype == KD_F32 ? f32_at(c->logits->data, r * K + j) : f16_at(c->logits->data, r * K + j);
        } else {
            float rest = f32_at(c->rest->data, r) - logf((float)(K - k));
            for (int j = 0; j < K; j++) z[j] = rest;
            for (int j = 0; j < k; j++) {
                int32_t id;
                memcpy(&id, c->indices->data + 4 * (r * k + j), 4);
                z[id] = f16_at(c->values->data, r * k + j);
            }
        }
    }
    return KD_OK;
}
