/* lm_cache.c - the top-k teacher cache for language models.
 *
 * The training split is cut into non-overlapping windows of seq+1 tokens
 * (the same windows as kd_text_window); the teacher runs once over each and
 * per position keeps its k largest log-probabilities at temperature T (F16),
 * their token ids (I16, so vocabularies up to 32768), and the leftover mass
 * 1 - sum of the k probabilities (F16). The windows' tokens are stored too,
 * so a cached run trains on exactly the text the teacher saw. Layout and
 * metadata: docs/formats.md, "LM teacher cache"; the loss that reads it:
 * docs/losses/topk.md.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_io.h"
#include "kd_lm.h"

/* the k largest of z (V) by value, ties to the lower id; ids out (k) */
static void top_k(const float *z, int V, int k, int *ids) {
    int n = 0;
    for (int v = 0; v < V; v++) {
        if (n == k && !(z[v] > z[ids[k - 1]])) continue;
        int j = n < k ? n++ : k - 1;
        while (j > 0 && z[v] > z[ids[j - 1]]) {
            ids[j] = ids[j - 1];
            j--;
        }
        ids[j] = v;
    }
}

kd_status kd_lm_cache_build(const char *teacher_ckpt, const kd_text_data *d, int seq, int k, float T, int batch,
                            int64_t max_windows, const char *out, double *seconds) {
    kd_safetensors ck;
    kd_status st = kd_st_read(teacher_ckpt, &ck);
    if (st != KD_OK) return st;
    const char *model = kd_st_meta(&ck, "model"), *vocab_s = kd_st_meta(&ck, "vocab");
    char spec[256];
    int vocab = vocab_s ? atoi(vocab_s) : 0;
    snprintf(spec, sizeof spec, "%s", model ? model : "");
    kd_st_free(&ck);
    if (!model || vocab < 2)
        return kd_errorf(KD_EFORMAT, "%s: not a language-model checkpoint (metadata 'model'/'vocab' missing)",
                         teacher_ckpt);
    if (vocab != d->vocab)
        return kd_errorf(KD_ECONFIG, "%s: teacher vocabulary %d differs from the data's %d (another tokenizer?)",
                         teacher_ckpt, vocab, d->vocab);
    if (vocab > 32768) return kd_errorf(KD_ECONFIG, "the LM cache stores ids as I16: vocabulary %d > 32768", vocab);
    if (k < 1 || k > vocab) return kd_errorf(KD_EUSAGE, "--topk %d must be in [1, %d]", k, vocab);
    if (!(T > 0.0f)) return kd_errorf(KD_EUSAGE, "--temperature must be > 0");
    int64_t n = (int64_t)kd_text_n_windows(d, 0, seq);
    if (max_windows > 0 && n > max_windows) n = max_windows;
    if (n < 1) return kd_errorf(KD_ECONFIG, "%s: the training split holds no window of %d tokens", d->name, seq + 1);
    kd_lm lm;
    kd_lm_setup s = {.student = spec, .vocab = vocab, .seq = seq, .max_batch = batch};
    st = kd_lm_new(&lm, &s, 0);
    if (st != KD_OK) return kd_error_prefix(st, "%s", teacher_ckpt);
    st = kd_lm_load(lm.g, &lm.m, teacher_ckpt);
    if (st != KD_OK) {
        kd_lm_free(&lm);
        return st;
    }
    double t0 = kd_now();
    size_t npos = (size_t)n * seq;
    uint16_t *tokens = kd_malloc((size_t)n * (seq + 1) * sizeof *tokens);
    uint16_t *ids = kd_malloc(npos * k * sizeof *ids), *logp = kd_malloc(npos * k * sizeof *logp);
    uint16_t *tail = kd_malloc(npos * sizeof *tail);
    int *top = kd_malloc((size_t)k * sizeof *top);
    double invT = 1.0 / T;
    for (int64_t w0 = 0; w0 < n; w0 += batch) {
        int B = (int)(n - w0 < batch ? n - w0 : batch);
        for (int b = 0; b < B; b++) {
            float *x = lm.x->val.data + (size_t)b * seq, *y = lm.y->val.data + (size_t)b * seq;
            kd_text_window(d, 0, (size_t)(w0 + b), seq, x, y);
            uint16_t *tk = tokens + (w0 + b) * (seq + 1);
            for (int t = 0; t < seq; t++) tk[t] = (uint16_t)x[t];
            tk[seq] = (uint16_t)y[seq - 1];
        }
        kd_graph_set_batch(lm.g, B);
        kd_graph_forward_to(lm.g, 0, lm.m.logits);
        for (int r = 0; r < B * seq; r++) {
            const float *z = lm.m.logits->val.data + (size_t)r * vocab;
            double mx = z[0], sum = 0.0;
            for (int v = 1; v < vocab; v++) mx = z[v] > mx ? z[v] : mx;
            for (int v = 0; v < vocab; v++) sum += exp((z[v] - mx) * invT);
            double lse = mx * invT + log(sum), kept = 0.0;
            top_k(z, vocab, k, top);
            size_t o = ((size_t)w0 * seq + r) * k;
            for (int j = 0; j < k; j++) {
                double lp = z[top[j]] * invT - lse;
                ids[o + j] = (uint16_t)top[j];
                logp[o + j] = kd_f32_to_f16((float)lp);
                kept += exp(lp);
            }
            tail[(size_t)w0 * seq + r] = kd_f32_to_f16((float)fmax(0.0, 1.0 - kept));
        }
    }
    kd_lm_free(&lm);
    free(top);
    kd_st_writer *w = kd_st_writer_new();
    int64_t ts[2] = {n, seq + 1}, ks[3] = {n, seq, k}, ps[2] = {n, seq};
    kd_st_add(w, "lm.tokens", KD_I16, 2, ts, tokens);
    kd_st_add(w, "lm.ids", KD_I16, 3, ks, ids);
    kd_st_add(w, "lm.logp", KD_F16, 3, ks, logp);
    kd_st_add(w, "lm.tail", KD_F16, 2, ps, tail);
    free(tokens);
    free(ids);
    free(logp);
    free(tail);
    char buf[64];
    kd_st_set_meta(w, "format", "distill-lm-cache/1");
    kd_st_set_meta(w, "teacher", teacher_ckpt);
    kd_st_set_meta(w, "teacher_model", spec);
    kd_st_set_meta(w, "data", d->name);
    snprintf(buf, sizeof buf, "%d", vocab);
    kd_st_set_meta(w, "vocab", buf);
    snprintf(buf, sizeof buf, "%d", seq);
    kd_st_set_meta(w, "seq", buf);
    snprintf(buf, sizeof buf, "%d", k);
    kd_st_set_meta(w, "topk", buf);
    snprintf(buf, sizeof buf, "%.9g", (double)T);
    kd_st_set_meta(w, "temperature", buf);
    st = kd_st_write(w, out);
    kd_st_writer_free(w);
    if (seconds) *seconds = kd_now() - t0;
    return st;
}

static kd_status meta_long(const kd_safetensors *st, const char *key, long lo, long hi, long *out) {
    const char *s = kd_st_meta(st, key);
    char *end;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || end == s || *end || v < lo || v > hi)
        return kd_errorf(KD_EFORMAT, "%s: metadata '%s' missing or out of [%ld, %ld]", st->path, key, lo, hi);
    *out = v;
    return KD_OK;
}

/* the tensor `name` with dtype dt and shape (a, b[, c]) */
static kd_status want(const kd_safetensors *st, const char *name, kd_dtype dt, int ndim, int64_t a, int64_t b,
                      int64_t c, const kd_st_tensor **out) {
    const kd_st_tensor *t = kd_st_find(st, name);
    if (!t) return kd_errorf(KD_EFORMAT, "%s: tensor '%s' missing (not an LM teacher cache?)", st->path, name);
    int64_t want_shape[3] = {a, b, c};
    int ok = t->dtype == dt && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == want_shape[i];
    if (!ok)
        return kd_errorf(KD_EFORMAT, "%s: tensor '%s' must be %s of shape (%lld, %lld%s%lld)", st->path, name,
                         kd_dtype_name(dt), (long long)a, (long long)b, ndim == 3 ? ", " : "",
                         ndim == 3 ? (long long)c : 0LL);
    *out = t;
    return KD_OK;
}

kd_status kd_lm_cache_open(const char *path, kd_lm_cache *c) {
    memset(c, 0, sizeof *c);
    kd_status st = kd_st_read(path, &c->st);
    if (st != KD_OK) return st;
    const char *fmt = kd_st_meta(&c->st, "format");
    long vocab = 0, seq = 0, k = 0;
    if (!fmt || strcmp(fmt, "distill-lm-cache/1") != 0)
        st = kd_errorf(KD_EFORMAT, "%s: not an LM teacher cache (metadata format '%s')", path, fmt ? fmt : "");
    if (st == KD_OK) st = meta_long(&c->st, "vocab", 2, 32768, &vocab);
    if (st == KD_OK) st = meta_long(&c->st, "seq", 1, 1 << 16, &seq);
    if (st == KD_OK) st = meta_long(&c->st, "topk", 1, vocab, &k);
    const char *Ts = kd_st_meta(&c->st, "temperature");
    char *end = NULL;
    float T = Ts ? strtof(Ts, &end) : 0.0f;
    if (st == KD_OK && (!Ts || end == Ts || *end || !(T > 0.0f) || !isfinite(T)))
        st = kd_errorf(KD_EFORMAT, "%s: metadata 'temperature' missing or not positive", path);
    const kd_st_tensor *tt = NULL, *ti = NULL, *tl = NULL, *tail = NULL;
    int64_t n = 0;
    if (st == KD_OK) {
        const kd_st_tensor *t0 = kd_st_find(&c->st, "lm.tokens");
        if (!t0 || t0->ndim != 2 || t0->shape[0] < 1)
            st = kd_errorf(KD_EFORMAT, "%s: tensor 'lm.tokens' missing or not (windows, seq+1)", path);
        else
            n = t0->shape[0];
    }
    if (st == KD_OK) st = want(&c->st, "lm.tokens", KD_I16, 2, n, seq + 1, 0, &tt);
    if (st == KD_OK) st = want(&c->st, "lm.ids", KD_I16, 3, n, seq, k, &ti);
    if (st == KD_OK) st = want(&c->st, "lm.logp", KD_F16, 3, n, seq, k, &tl);
    if (st == KD_OK) st = want(&c->st, "lm.tail", KD_F16, 2, n, seq, 0, &tail);
    if (st != KD_OK) {
        kd_st_free(&c->st);
        return st;
    }
    size_t ntok = (size_t)n * (seq + 1), nid = (size_t)n * seq * k;
    const uint16_t *tok, *ids, *lp;
    if (((uintptr_t)tt->data | (uintptr_t)ti->data | (uintptr_t)tl->data) % _Alignof(uint16_t) == 0) {
        tok = (const uint16_t *)(const void *)tt->data; /* read in place: the file is already in memory */
        ids = (const uint16_t *)(const void *)ti->data;
        lp = (const uint16_t *)(const void *)tl->data;
    } else { /* a writer that did not align its payload: copy once */
        c->own = kd_malloc((ntok + 2 * nid) * sizeof *c->own);
        memcpy(c->own, tt->data, ntok * 2);
        memcpy(c->own + ntok, ti->data, nid * 2);
        memcpy(c->own + ntok + nid, tl->data, nid * 2);
        tok = c->own, ids = c->own + ntok, lp = c->own + ntok + nid;
    }
    for (size_t i = 0; i < ntok && st == KD_OK; i++)
        if (tok[i] >= vocab) st = kd_errorf(KD_EFORMAT, "%s: lm.tokens holds token %u of %ld", path, tok[i], vocab);
    /* ids in range and distinct per position (the loss relies on it) */
    uint32_t *seen = kd_calloc((size_t)vocab, sizeof *seen);
    for (size_t r = 0; r < (size_t)n * seq && st == KD_OK; r++) {
        for (long j = 0; j < k; j++) {
            uint16_t id = ids[r * k + j];
            float v = kd_f16_to_f32(lp[r * k + j]);
            if (id >= vocab || seen[id] == (uint32_t)r + 1u || !(v <= 0.0f) || isnan(v)) {
                st = kd_errorf(KD_EFORMAT, "%s: position %zu: id %u repeated, out of [0, %ld) or log-prob %g not <= 0",
                               path, r, id, vocab, (double)v);
                break;
            }
            seen[id] = (uint32_t)r + 1u;
        }
    }
    free(seen);
    if (st != KD_OK) {
        kd_lm_cache_close(c);
        return st;
    }
    c->open = 1;
    c->n = n;
    c->seq = (int)seq;
    c->k = (int)k;
    c->vocab = (int)vocab;
    c->T = T;
    c->w = (kd_lm_windows){.tokens = tok, .n = n, .ids = ids, .logp = lp};
    return KD_OK;
}

void kd_lm_cache_close(kd_lm_cache *c) {
    free(c->own);
    c->own = NULL;
    kd_st_free(&c->st);
}
