/* gpt_infer.c - incremental (KV-cache) inference for distill's GPT models:
 * the spec parser, the runner (step and prefill), the plain-loop reference
 * forward pass, the generation loop and checkpoint loading.
 *
 * The model is the pre-LayerNorm GPT-2 block of docs/generate.md. A runner
 * keeps the weight pointers its lookup returned and reads through them at
 * every step (so a runner borrowing a training graph's parameters sees each
 * update); it copies weights only when it owns them (kd_gpt_load). One call
 * processes R = B*Tn rows (B sequences, Tn new positions each): per layer
 * LN, the (R,C)x(C,3C) qkv product, K and V appended to the caches, causal
 * attention of each row over its cache, the (R,C)x(C,C) projection, LN, the
 * (R,C)x(C,4C) and (R,4C)x(4C,C) MLP products; weights are [out, in], so
 * every product is y = x W^T (cblas_sgemm, also for a single row: with
 * OpenBLAS 0.3.21 it measured as fast as cblas_sgemv on these shapes). The
 * residual adds are folded into the products (beta = 1).
 *
 * Deliberately not here: the training graph of the model (it is built from
 * graph ops elsewhere), batched sequences at different positions, and
 * tokenizers (the caller maps text to token ids).
 */
#include <cblas.h>
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_gpt.h"
#include "kd_io.h"

/* ---------------------------------------------------------------- spec */

static kd_status spec_error(const char *spec, const char *why, const char *tok, size_t len) {
    return kd_errorf(KD_ECONFIG, "model spec '%s': %s '%.*s'", spec, why, (int)len, tok);
}

kd_status kd_gpt_cfg_parse(const char *spec, int vocab, kd_gpt_cfg *cfg) {
    static const char *keys[5] = {"layers", "dim", "heads", "ctx", "vocab"};
    static const long maxima[5] = {KD_GPT_MAX_LAYERS, KD_GPT_MAX_DIM, KD_GPT_MAX_DIM, KD_GPT_MAX_CTX, KD_GPT_MAX_VOCAB};
    long val[5] = {0, 0, 0, 0, 0};
    const char *p = spec;
    while (isspace((unsigned char)*p)) p++;
    if (strncmp(p, "gpt:", 4) != 0) {
        size_t n = strcspn(p, " \t,");
        return spec_error(spec, "expected 'gpt:' at the start, got", p, n);
    }
    p += 4;
    for (;;) {
        while (*p && (isspace((unsigned char)*p) || *p == ',')) p++;
        if (!*p) break;
        const char *tok = p;
        size_t len = strcspn(p, " \t\r\n\v\f,");
        p += len;
        const char *eq = memchr(tok, '=', len);
        int k = -1;
        for (int i = 0; i < 5 && eq; i++)
            if (strlen(keys[i]) == (size_t)(eq - tok) && strncmp(tok, keys[i], (size_t)(eq - tok)) == 0) k = i;
        if (k < 0)
            return kd_errorf(KD_ECONFIG,
                             "model spec '%s': unknown key '%.*s' (want layers=, dim=, heads=, ctx=, vocab=)", spec,
                             (int)len, tok);
        if (val[k]) return spec_error(spec, "key given twice:", tok, len);
        const char *v = eq + 1, *end = tok + len;
        long x = 0;
        int digits = 0;
        for (; v < end && isdigit((unsigned char)*v); v++, digits++) x = x > maxima[k] ? x : x * 10 + (*v - '0');
        if (!digits || v != end || x <= 0) return spec_error(spec, "expected a positive integer:", tok, len);
        if (x > maxima[k]) {
            char why[80];
            snprintf(why, sizeof why, "over the maximum of %ld:", maxima[k]);
            return spec_error(spec, why, tok, len);
        }
        val[k] = x;
    }
    for (int k = 0; k < 4; k++)
        if (!val[k]) return kd_errorf(KD_ECONFIG, "model spec '%s': missing key '%s='", spec, keys[k]);
    if (val[1] % val[2])
        return kd_errorf(KD_ECONFIG, "model spec '%s': dim=%ld is not a multiple of heads=%ld", spec, val[1], val[2]);
    if (!val[4]) {
        if (vocab <= 0 || vocab > KD_GPT_MAX_VOCAB)
            return kd_errorf(KD_ECONFIG, "model spec '%s': no vocabulary size (the data gives %d; add vocab=N)", spec,
                             vocab);
        val[4] = vocab;
    }
    cfg->layers = (int)val[0];
    cfg->dim = (int)val[1];
    cfg->heads = (int)val[2];
    cfg->ctx = (int)val[3];
    cfg->vocab = (int)val[4];
    return KD_OK;
}

const char *kd_gpt_cfg_str(const kd_gpt_cfg *cfg, char *buf, size_t n) {
    snprintf(buf, n, "gpt: layers=%d dim=%d heads=%d ctx=%d", cfg->layers, cfg->dim, cfg->heads, cfg->ctx);
    return buf;
}

/* ---------------------------------------------------------------- tensors */

/* a layer's tensors, in checkpoint order */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, FCP_W, FCP_B, PER_LAYER };
static const char *layer_names[PER_LAYER] = {
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",    "mlp.c_fc.bias",    "mlp.c_proj.weight",  "mlp.c_proj.bias",
};
/* rows and columns of each in units of C (0 columns: a vector) */
static const int layer_rows[PER_LAYER] = {1, 1, 3, 3, 1, 1, 1, 1, 4, 4, 1, 1};
static const int layer_cols[PER_LAYER] = {0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 0};

int kd_gpt_n_tensors(const kd_gpt_cfg *cfg) { return 4 + PER_LAYER * cfg->layers; }

void kd_gpt_tensor_info(const kd_gpt_cfg *cfg, int i, char *name, size_t n, int *ndim, int shape[2]) {
    int nt = kd_gpt_n_tensors(cfg), C = cfg->dim;
    KD_ASSERT(i >= 0 && i < nt, "tensor %d of %d", i, nt);
    if (i < 2) {
        snprintf(name, n, i == 0 ? "wte.weight" : "wpe.weight");
        *ndim = 2;
        shape[0] = i == 0 ? cfg->vocab : cfg->ctx;
        shape[1] = C;
    } else if (i >= nt - 2) {
        snprintf(name, n, i == nt - 2 ? "ln_f.weight" : "ln_f.bias");
        *ndim = 1;
        shape[0] = C;
    } else {
        int l = (i - 2) / PER_LAYER, j = (i - 2) % PER_LAYER;
        snprintf(name, n, "h.%d.%s", l, layer_names[j]);
        *ndim = layer_cols[j] ? 2 : 1;
        shape[0] = layer_rows[j] * C;
        shape[1] = layer_cols[j] * C;
    }
}

int64_t kd_gpt_n_params(const kd_gpt_cfg *cfg) {
    int64_t C = cfg->dim;
    return (int64_t)cfg->layers * (12 * C * C + 13 * C) + ((int64_t)cfg->vocab + cfg->ctx) * C + 2 * C;
}

/* Looks every tensor up into w (kd_gpt_n_tensors pointers). */
static kd_status lookup_all(const kd_gpt_cfg *cfg, kd_gpt_lookup lookup, void *lctx, const float **w) {
    for (int i = 0; i < kd_gpt_n_tensors(cfg); i++) {
        char name[64], sh[48];
        int ndim, shape[2];
        kd_gpt_tensor_info(cfg, i, name, sizeof name, &ndim, shape);
        w[i] = lookup(lctx, name, ndim, shape);
        if (!w[i])
            return kd_errorf(KD_EFORMAT, "gpt: tensor '%s' is missing or not of shape %s", name,
                             kd_shape_str(ndim, shape, sh, sizeof sh));
    }
    return KD_OK;
}

/* ---------------------------------------------------------------- runner */

/* rows one call can process: a prefill of T tokens for B sequences goes in
 * chunks of max(1, rows / B) positions */
#define PREFILL_ROWS 64

struct kd_gpt_runner {
    kd_gpt_cfg cfg;
    int max_batch, rows, pos;
    const float **w;      /* kd_gpt_n_tensors pointers, checkpoint order */
    float *owned;         /* the weights when the runner owns them (kd_gpt_load), else NULL */
    float *mem;           /* everything below, one allocation */
    float *kc, *vc;       /* caches (layers, max_batch, ctx, C) */
    float *x, *a, *y;     /* (rows, C) residual stream, LN output, attention output */
    float *qkv;           /* (rows, 3C) */
    float *h;             /* (rows, 4C) */
    float *att;           /* (rows, heads, ctx) attention weights */
    float *logits;        /* (max_batch, V) for kd_gpt_generate */
    void *sample_scratch; /* kd_sample_scratch_bytes(V) */
    int *hist;            /* (max_batch, ctx) tokens in the caches, for re-priming */
};

static const float *lw(const kd_gpt_runner *r, int l, int j) { return r->w[2 + PER_LAYER * l + j]; }

static void runner_alloc(kd_gpt_runner *r, int max_batch) {
    const kd_gpt_cfg *c = &r->cfg;
    size_t C = (size_t)c->dim, rows = (size_t)(max_batch > PREFILL_ROWS ? max_batch : PREFILL_ROWS);
    size_t cache = (size_t)c->layers * (size_t)max_batch * (size_t)c->ctx * C;
    size_t sample = (kd_sample_scratch_bytes(c->vocab) + sizeof(float) - 1) / sizeof(float);
    size_t total =
        2 * cache + rows * (10 * C + (size_t)c->heads * (size_t)c->ctx) + (size_t)max_batch * c->vocab + sample;
    free(r->mem);
    free(r->hist);
    r->mem = kd_malloc(total * sizeof(float));
    r->hist = kd_malloc((size_t)max_batch * (size_t)c->ctx * sizeof(int));
    float *p = r->mem;
    r->kc = p, p += cache;
    r->vc = p, p += cache;
    r->x = p, p += rows * C;
    r->a = p, p += rows * C;
    r->y = p, p += rows * C;
    r->qkv = p, p += rows * 3 * C;
    r->h = p, p += rows * 4 * C;
    r->att = p, p += rows * (size_t)c->heads * (size_t)c->ctx;
    r->logits = p, p += (size_t)max_batch * c->vocab;
    r->sample_scratch = p, p += sample;
    KD_ASSERT(p == r->mem + total, "runner layout");
    r->max_batch = max_batch;
    r->rows = (int)rows;
    r->pos = 0;
}

kd_status kd_gpt_runner_new(kd_gpt_runner **out, const kd_gpt_cfg *cfg, kd_gpt_lookup lookup, void *lctx,
                            int max_batch) {
    KD_ASSERT(max_batch >= 1, "max_batch %d", max_batch);
    int cfg_ok = cfg->layers > 0 && cfg->dim > 0 && cfg->heads > 0 && cfg->dim % cfg->heads == 0 && cfg->ctx > 0 &&
                 cfg->vocab > 0;
    KD_ASSERT(cfg_ok, "gpt config layers=%d dim=%d heads=%d ctx=%d vocab=%d", cfg->layers, cfg->dim, cfg->heads,
              cfg->ctx, cfg->vocab);
    *out = NULL;
    const float **w = kd_calloc((size_t)kd_gpt_n_tensors(cfg), sizeof *w);
    kd_status st = lookup_all(cfg, lookup, lctx, w);
    if (st != KD_OK) {
        free(w);
        return st;
    }
    kd_gpt_runner *r = kd_calloc(1, sizeof *r);
    r->cfg = *cfg;
    r->w = w;
    runner_alloc(r, max_batch);
    *out = r;
    return KD_OK;
}

void kd_gpt_runner_free(kd_gpt_runner *r) {
    if (!r) return;
    free(r->w);
    free(r->owned);
    free(r->mem);
    free(r->hist);
    free(r);
}

void kd_gpt_runner_reserve(kd_gpt_runner *r, int max_batch) {
    KD_ASSERT(max_batch >= 1, "max_batch %d", max_batch);
    if (max_batch > r->max_batch) runner_alloc(r, max_batch);
    r->pos = 0;
}

const kd_gpt_cfg *kd_gpt_runner_cfg(const kd_gpt_runner *r) { return &r->cfg; }
int kd_gpt_runner_max_batch(const kd_gpt_runner *r) { return r->max_batch; }
void kd_gpt_runner_reset(kd_gpt_runner *r) { r->pos = 0; }
int kd_gpt_runner_pos(const kd_gpt_runner *r) { return r->pos; }

/* ---------------------------------------------------------------- kernels */

#define PAR_MIN 32768 /* elements of work below which a loop stays on one thread */

/* out (R,C) = LN(x (R,C)) * w (C) + b (C); biased variance, eps 1e-5 */
static void layernorm(float *out, const float *x, const float *w, const float *b, int R, int C) {
#pragma omp parallel for if ((int64_t)R * C > PAR_MIN) schedule(static)
    for (int i = 0; i < R; i++) {
        const float *xi = x + (size_t)i * C;
        float *oi = out + (size_t)i * C;
        float s = 0.0f;
        for (int c = 0; c < C; c++) s += xi[c];
        float mean = s / (float)C, v = 0.0f;
        for (int c = 0; c < C; c++) v += (xi[c] - mean) * (xi[c] - mean);
        float rstd = 1.0f / sqrtf(v / (float)C + 1e-5f);
        for (int c = 0; c < C; c++) oi[c] = (xi[c] - mean) * rstd * w[c] + b[c];
    }
}

/* y (R,OUT) (+)= x (R,IN) w^T + b; w (OUT,IN), b (OUT) or NULL; accumulate:
 * add to y (the residual stream) instead of overwriting it */
static void linear(float *y, const float *x, const float *w, const float *b, int R, int OUT, int IN, int accumulate) {
    if (!accumulate && !b) {
        memset(y, 0, (size_t)R * OUT * sizeof(float));
    } else if (b) {
        for (int i = 0; i < R; i++) {
            float *yi = y + (size_t)i * OUT;
            if (accumulate)
                for (int o = 0; o < OUT; o++) yi[o] += b[o];
            else
                memcpy(yi, b, (size_t)OUT * sizeof(float));
        }
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, OUT, IN, 1.0f, x, IN, w, IN, 1.0f, y, OUT);
}

static void gelu(float *x, int64_t n) {
#pragma omp parallel for if (n > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

/* a (n) . b (n); omp simd lets the sum be split over vector lanes */
static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < n; j++) s += a[j] * b[j];
    return s;
}

/* y (n) += a * x (n) */
static inline void axpy(float *restrict y, float a, const float *restrict x, int n) {
#pragma omp simd
    for (int j = 0; j < n; j++) y[j] += a * x[j];
}

/* y (B*Tn, C): causal attention of each new row over its sequence's cache.
 * qkv (B*Tn, 3C) (the q part is read), kc, vc (max_batch, ctx, C) one
 * layer's caches holding positions 0..pos0+Tn-1, att (B*Tn, NH, ctx).
 * Each cached position's key (and value) row is read once for all heads,
 * front to back: the caches are the largest thing read per step after the
 * weights, and a walk per head would stride through them NH times. */
static void attention(float *y, float *att, const float *qkv, const float *kc, const float *vc, int B, int Tn, int pos0,
                      int C, int NH, int ctx) {
    int d = C / NH, R = B * Tn;
    float scale = 1.0f / sqrtf((float)d);
#pragma omp parallel for if ((int64_t)R * (pos0 + Tn) * C > PAR_MIN) schedule(static)
    for (int row = 0; row < R; row++) {
        int b = row / Tn, n = pos0 + row % Tn + 1;
        const float *q = qkv + (size_t)row * 3 * C;
        const float *k = kc + (size_t)b * ctx * C, *v = vc + (size_t)b * ctx * C;
        float *p = att + (size_t)row * NH * ctx, *yo = y + (size_t)row * C;
        for (int s = 0; s < n; s++)
            for (int hd = 0; hd < NH; hd++) p[hd * ctx + s] = dot(q + hd * d, k + (size_t)s * C + hd * d, d) * scale;
        for (int hd = 0; hd < NH; hd++) {
            float *ph = p + hd * ctx, m = -INFINITY, sum = 0.0f;
            for (int s = 0; s < n; s++) m = ph[s] > m ? ph[s] : m;
            for (int s = 0; s < n; s++) {
                ph[s] = expf(ph[s] - m);
                sum += ph[s];
            }
            float inv = 1.0f / sum;
            for (int s = 0; s < n; s++) ph[s] *= inv;
        }
        memset(yo, 0, (size_t)C * sizeof(float));
        for (int s = 0; s < n; s++)
            for (int hd = 0; hd < NH; hd++) axpy(yo + hd * d, p[hd * ctx + s], v + (size_t)s * C + hd * d, d);
    }
}

/* The forward pass of Tn new tokens per sequence at positions
 * pos..pos+Tn-1: sequence b's tokens are tokens[b*ld .. b*ld+Tn-1];
 * R = B*Tn <= rows. Logits (B,V) of each sequence's last new token, unless
 * NULL. */
static void forward_rows(kd_gpt_runner *r, int B, int Tn, const int *tokens, int ld, float *logits) {
    const kd_gpt_cfg *c = &r->cfg;
    int C = c->dim, V = c->vocab, ctx = c->ctx, R = B * Tn, pos0 = r->pos;
    KD_ASSERT(R <= r->rows && pos0 + Tn <= ctx, "forward of %dx%d rows at %d", B, Tn, pos0);
    const float *wte = r->w[0], *wpe = r->w[1];
    for (int i = 0; i < R; i++) {
        int tok = tokens[(size_t)(i / Tn) * ld + i % Tn], t = pos0 + i % Tn;
        KD_ASSERT(tok >= 0 && tok < V, "token %d outside [0, %d)", tok, V);
        const float *e = wte + (size_t)tok * C, *pe = wpe + (size_t)t * C;
        float *xi = r->x + (size_t)i * C;
        for (int j = 0; j < C; j++) xi[j] = e[j] + pe[j];
    }
    size_t lstride = (size_t)r->max_batch * ctx * C;
    for (int l = 0; l < c->layers; l++) {
        float *kc = r->kc + l * lstride, *vc = r->vc + l * lstride;
        layernorm(r->a, r->x, lw(r, l, LN1_W), lw(r, l, LN1_B), R, C);
        linear(r->qkv, r->a, lw(r, l, ATTN_W), lw(r, l, ATTN_B), R, 3 * C, C, 0);
        for (int i = 0; i < R; i++) {
            size_t at = ((size_t)(i / Tn) * ctx + (size_t)(pos0 + i % Tn)) * C;
            memcpy(kc + at, r->qkv + (size_t)i * 3 * C + C, (size_t)C * sizeof(float));
            memcpy(vc + at, r->qkv + (size_t)i * 3 * C + 2 * C, (size_t)C * sizeof(float));
        }
        attention(r->y, r->att, r->qkv, kc, vc, B, Tn, pos0, C, c->heads, ctx);
        linear(r->x, r->y, lw(r, l, PROJ_W), lw(r, l, PROJ_B), R, C, C, 1);
        layernorm(r->a, r->x, lw(r, l, LN2_W), lw(r, l, LN2_B), R, C);
        linear(r->h, r->a, lw(r, l, FC_W), lw(r, l, FC_B), R, 4 * C, C, 0);
        gelu(r->h, (int64_t)R * 4 * C);
        linear(r->x, r->h, lw(r, l, FCP_W), lw(r, l, FCP_B), R, C, 4 * C, 1);
    }
    r->pos += Tn;
    if (!logits) return;
    int nt = kd_gpt_n_tensors(c);
    for (int b = 0; b < B; b++)
        layernorm(r->a + (size_t)b * C, r->x + ((size_t)b * Tn + Tn - 1) * C, r->w[nt - 2], r->w[nt - 1], 1, C);
    linear(logits, r->a, wte, NULL, B, V, C, 0);
}

void kd_gpt_runner_step(kd_gpt_runner *r, int B, const int *tokens, float *logits) {
    KD_ASSERT(B >= 1 && B <= r->max_batch, "batch %d, max %d", B, r->max_batch);
    KD_ASSERT(r->pos < r->cfg.ctx, "step at position %d: the context (%d) is full", r->pos, r->cfg.ctx);
    forward_rows(r, B, 1, tokens, 1, logits);
}

/* kd_gpt_runner_prefill with sequence b's tokens at tokens[b*ld ...] */
static void prefill_ld(kd_gpt_runner *r, int B, int T, const int *tokens, int ld, float *logits) {
    KD_ASSERT(B >= 1 && B <= r->max_batch, "batch %d, max %d", B, r->max_batch);
    KD_ASSERT(T >= 1 && r->pos + T <= r->cfg.ctx, "prefill of %d at position %d, ctx %d", T, r->pos, r->cfg.ctx);
    int chunk = r->rows / B;
    for (int t0 = 0; t0 < T; t0 += chunk) {
        int Tn = T - t0 < chunk ? T - t0 : chunk;
        forward_rows(r, B, Tn, tokens + t0, ld, t0 + Tn == T ? logits : NULL);
    }
}

void kd_gpt_runner_prefill(kd_gpt_runner *r, int B, int T, const int *tokens, float *logits) {
    prefill_ld(r, B, T, tokens, T, logits);
}

/* ---------------------------------------------------------------- reference */

/* out (C) = LN(x (C)), statistics in double */
static void layernorm_naive(float *out, const float *x, const float *w, const float *b, int C) {
    double s = 0.0, v = 0.0;
    for (int c = 0; c < C; c++) s += x[c];
    double mean = s / C;
    for (int c = 0; c < C; c++) v += (x[c] - mean) * (x[c] - mean);
    double rstd = 1.0 / sqrt(v / C + 1e-5);
    for (int c = 0; c < C; c++) out[c] = (float)((x[c] - mean) * rstd * w[c] + b[c]);
}

/* y (R,OUT) = x (R,IN) w^T + b; w (OUT,IN), b (OUT) or NULL; sums in double */
static void matmul_naive(float *y, const float *x, const float *w, const float *b, int R, int OUT, int IN) {
    for (int i = 0; i < R; i++)
        for (int o = 0; o < OUT; o++) {
            double s = b ? b[o] : 0.0;
            for (int k = 0; k < IN; k++) s += (double)x[(size_t)i * IN + k] * w[(size_t)o * IN + k];
            y[(size_t)i * OUT + o] = (float)s;
        }
}

kd_status kd_gpt_forward_naive(const kd_gpt_cfg *cfg, kd_gpt_lookup lookup, void *lctx, int T, const int *ids,
                               float *logits) {
    int C = cfg->dim, NH = cfg->heads, d = C / NH, V = cfg->vocab, nt = kd_gpt_n_tensors(cfg);
    KD_ASSERT(T >= 1 && T <= cfg->ctx, "T %d, ctx %d", T, cfg->ctx);
    const float **w = kd_calloc((size_t)nt, sizeof *w);
    kd_status st = lookup_all(cfg, lookup, lctx, w);
    if (st != KD_OK) {
        free(w);
        return st;
    }
    size_t TC = (size_t)T * C;
    float *x = kd_malloc(TC * sizeof(float)), *a = kd_malloc(TC * sizeof(float)), *y = kd_malloc(TC * sizeof(float));
    float *qkv = kd_malloc(3 * TC * sizeof(float)), *h = kd_malloc(4 * TC * sizeof(float));
    double *p = kd_malloc((size_t)T * sizeof(double));
    for (int t = 0; t < T; t++) {
        KD_ASSERT(ids[t] >= 0 && ids[t] < V, "token %d outside [0, %d)", ids[t], V);
        for (int c = 0; c < C; c++) x[(size_t)t * C + c] = w[0][(size_t)ids[t] * C + c] + w[1][(size_t)t * C + c];
    }
    for (int l = 0; l < cfg->layers; l++) {
        const float **lw_ = w + 2 + PER_LAYER * l;
        for (int t = 0; t < T; t++) layernorm_naive(a + (size_t)t * C, x + (size_t)t * C, lw_[LN1_W], lw_[LN1_B], C);
        matmul_naive(qkv, a, lw_[ATTN_W], lw_[ATTN_B], T, 3 * C, C);
        for (int t = 0; t < T; t++)
            for (int hd = 0; hd < NH; hd++) {
                const float *q = qkv + (size_t)t * 3 * C + hd * d;
                double m = -INFINITY, sum = 0.0;
                for (int s = 0; s <= t; s++) {
                    const float *k = qkv + (size_t)s * 3 * C + C + hd * d;
                    double dot = 0.0;
                    for (int j = 0; j < d; j++) dot += (double)q[j] * k[j];
                    p[s] = dot / sqrt((double)d);
                    if (p[s] > m) m = p[s];
                }
                for (int s = 0; s <= t; s++) sum += p[s] = exp(p[s] - m);
                for (int j = 0; j < d; j++) {
                    double acc = 0.0;
                    for (int s = 0; s <= t; s++) acc += p[s] / sum * qkv[(size_t)s * 3 * C + 2 * C + hd * d + j];
                    y[(size_t)t * C + hd * d + j] = (float)acc;
                }
            }
        matmul_naive(a, y, lw_[PROJ_W], lw_[PROJ_B], T, C, C);
        for (size_t i = 0; i < TC; i++) x[i] += a[i];
        for (int t = 0; t < T; t++) layernorm_naive(a + (size_t)t * C, x + (size_t)t * C, lw_[LN2_W], lw_[LN2_B], C);
        matmul_naive(h, a, lw_[FC_W], lw_[FC_B], T, 4 * C, C);
        for (size_t i = 0; i < 4 * TC; i++) h[i] = (float)(0.5 * h[i] * (1.0 + erf(h[i] / sqrt(2.0))));
        matmul_naive(a, h, lw_[FCP_W], lw_[FCP_B], T, C, 4 * C);
        for (size_t i = 0; i < TC; i++) x[i] += a[i];
    }
    for (int t = 0; t < T; t++) layernorm_naive(a + (size_t)t * C, x + (size_t)t * C, w[nt - 2], w[nt - 1], C);
    matmul_naive(logits, a, w[0], NULL, T, V, C);
    free(x);
    free(a);
    free(y);
    free(qkv);
    free(h);
    free(p);
    free(w);
    return KD_OK;
}

/* ---------------------------------------------------------------- generation */

kd_status kd_gpt_generate(kd_gpt_runner *r, int B, const int *prompt, int P, int n_new, const kd_sample_opts *o,
                          kd_rng *rng, int *out) {
    const kd_gpt_cfg *c = &r->cfg;
    int V = c->vocab, ctx = c->ctx;
    if (B < 1 || B > r->max_batch)
        return kd_errorf(KD_EUSAGE, "generate: %d sequences, the runner holds 1 to %d", B, r->max_batch);
    if (P < 1) return kd_errorf(KD_EUSAGE, "generate: the prompt is empty (at least one token is needed)");
    if (n_new < 0) return kd_errorf(KD_EUSAGE, "generate: %d new tokens asked for", n_new);
    kd_status st = kd_sample_opts_check(o);
    if (st != KD_OK) return st;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < P; t++) {
            int tok = prompt[(size_t)b * P + t];
            if (tok < 0 || tok >= V)
                return kd_errorf(KD_EUSAGE,
                                 "generate: prompt token %d (sequence %d, position %d) is outside the vocabulary "
                                 "[0, %d)",
                                 tok, b, t, V);
        }
    if (n_new == 0) return KD_OK;
    /* the caches hold hist[b*ctx + 0 .. pos-1] */
    int L = P < ctx ? P : ctx, keep = ctx / 2 > 0 ? ctx / 2 : 1;
    for (int b = 0; b < B; b++)
        memcpy(r->hist + (size_t)b * ctx, prompt + (size_t)b * P + (P - L), (size_t)L * sizeof(int));
    r->pos = 0;
    prefill_ld(r, B, L, r->hist, ctx, r->logits);
    for (int i = 0;; i++) {
        for (int b = 0; b < B; b++)
            out[(size_t)b * n_new + i] = kd_sample_token(r->logits + (size_t)b * V, V, o, rng, r->sample_scratch);
        if (i == n_new - 1) break;
        if (r->pos < ctx) {
            int pos = r->pos;
            for (int b = 0; b < B; b++) r->hist[(size_t)b * ctx + pos] = out[(size_t)b * n_new + i];
            forward_rows(r, B, 1, r->hist + pos, ctx, r->logits);
        } else {
            /* re-prime: the last keep tokens, the new one included */
            for (int b = 0; b < B; b++) {
                int *hb = r->hist + (size_t)b * ctx;
                memmove(hb, hb + ctx - (keep - 1), (size_t)(keep - 1) * sizeof(int));
                hb[keep - 1] = out[(size_t)b * n_new + i];
            }
            r->pos = 0;
            prefill_ld(r, B, keep, r->hist, ctx, r->logits);
        }
    }
    return KD_OK;
}

/* ---------------------------------------------------------------- checkpoints */

/* the weights of kd_gpt_load: one flat array in canonical tensor order */
typedef struct flat_weights {
    const kd_gpt_cfg *cfg;
    const float *data;
} flat_weights;

static const float *flat_lookup(void *ctx, const char *name, int ndim, const int *shape) {
    const flat_weights *fw = ctx;
    size_t off = 0;
    for (int i = 0; i < kd_gpt_n_tensors(fw->cfg); i++) {
        char nm[64];
        int nd, sh[2];
        kd_gpt_tensor_info(fw->cfg, i, nm, sizeof nm, &nd, sh);
        if (strcmp(nm, name) == 0)
            return nd == ndim && sh[0] == shape[0] && (nd == 1 || sh[1] == shape[1]) ? fw->data + off : NULL;
        off += (size_t)kd_shape_numel(nd, sh);
    }
    return NULL;
}

kd_status kd_gpt_load(const char *path, kd_gpt_cfg *cfg, kd_gpt_runner **out, char **tokenizer_json) {
    *out = NULL;
    if (tokenizer_json) *tokenizer_json = NULL;
    kd_safetensors st;
    kd_status s = kd_st_read(path, &st);
    if (s != KD_OK) return s;
    const char *spec = kd_st_meta(&st, "model"), *vs = kd_st_meta(&st, "vocab");
    int vocab = 0;
    if (!spec) {
        s = kd_errorf(KD_EFORMAT,
                      "%s: metadata lacks 'model' (the model spec, e.g. \"gpt: layers=6 dim=256 heads=8 "
                      "ctx=128\"): not a distill GPT checkpoint?",
                      path);
    } else if (vs) {
        char *end;
        long v = strtol(vs, &end, 10);
        if (end == vs || *end || v <= 0 || v > KD_GPT_MAX_VOCAB)
            s = kd_errorf(KD_EFORMAT, "%s: metadata 'vocab' = '%s' is not a vocabulary size", path, vs);
        vocab = (int)v;
    }
    if (s == KD_OK && (s = kd_gpt_cfg_parse(spec, vocab, cfg)) != KD_OK)
        kd_error_prefix(s, "%s: metadata 'model'", path);
    float *data = NULL;
    if (s == KD_OK) {
        data = kd_malloc((size_t)kd_gpt_n_params(cfg) * sizeof(float));
        size_t off = 0;
        int nt = kd_gpt_n_tensors(cfg);
        for (int i = 0; i < nt && s == KD_OK; i++) {
            char name[64];
            int nd, sh[2];
            kd_gpt_tensor_info(cfg, i, name, sizeof name, &nd, sh);
            if (!kd_st_find(&st, name))
                s = kd_errorf(KD_EFORMAT, "%s: tensor '%s' not found (model '%s')", path, name, spec);
            else if ((s = kd_st_get_f32(&st, name, data + off, nd, sh)) == KD_ESHAPE)
                s = KD_EFORMAT; /* the file does not fit the model its metadata names */
            off += (size_t)kd_shape_numel(nd, sh);
        }
        /* strict: a tensor the model does not have means a different model */
        for (int i = 0; i < st.n && s == KD_OK && st.n != nt; i++) {
            int known = 0;
            for (int j = 0; j < nt && !known; j++) {
                char name[64];
                int nd, sh[2];
                kd_gpt_tensor_info(cfg, j, name, sizeof name, &nd, sh);
                known = strcmp(name, st.tensors[i].name) == 0;
            }
            if (!known)
                s = kd_errorf(KD_EFORMAT, "%s: unexpected tensor '%s' for model '%s'", path, st.tensors[i].name, spec);
        }
    }
    if (s == KD_OK && tokenizer_json && kd_st_meta(&st, "tokenizer"))
        *tokenizer_json = kd_strdup(kd_st_meta(&st, "tokenizer"));
    kd_st_free(&st);
    if (s != KD_OK) {
        free(data);
        return s;
    }
    flat_weights fw = {cfg, data};
    s = kd_gpt_runner_new(out, cfg, flat_lookup, &fw, 1);
    KD_ASSERT(s == KD_OK, "flat weights incomplete: %s", kd_error_message());
    (*out)->owned = data;
    return KD_OK;
}
