/* lm.c - the ops of a GPT-style language model: token embedding, learned
 * positional add, layer norm over the last dim, and fused causal
 * self-attention; plus the kd_ln builder (docs/ARCHITECTURE.md,
 * "Language-model ops").
 *
 * embedding   ids (B,T) as floats, table (V,C) -> (B,T,C). Backward scatters
 *             into the table's gradient (+=, always: a tied LM head shares
 *             the table), one block of columns per thread, rows in order, so
 *             repeated ids sum in a fixed order. ids get no gradient.
 * pos_add     x (B,T,C) + table[t] for t < T, table (ctx,C).
 * layernorm   torch.nn.LayerNorm over the last dim (biased variance);
 *             mean and 1/std per row kept in the node's workspace for
 *             backward: with g = gamma*dy and xhat = (x - mean)*rstd,
 *             dx = rstd * (g - mean_c(g) - xhat * mean_c(g*xhat)),
 *             dgamma = sum_rows dy*xhat, dbeta = sum_rows dy.
 * attention   qkv (B,T,3C), laid out [q | k | v], head h in columns
 *             h*d..(h+1)*d-1 of each, d = C/NH -> y (B,T,C). Per (b, h):
 *             S = q k^T/sqrt(d) on j <= i, P = softmax_j(S), y = P v. The
 *             forward keeps only lse_i = log sum_j exp(S_ij) (B,NH,T);
 *             backward recomputes P = exp(S - lse) one head at a time in a
 *             per-thread scratch, then (flash-attention's derivation)
 *               dv = P^T dy, dP = dy v^T, D_i = sum_j P_ij dP_ij,
 *               dS = P o (dP - D), dq = dS k/sqrt(d), dk = dS^T q/sqrt(d).
 *             No (B,NH,T,T) tensor is ever stored. Products run as
 *             cblas_sgemm calls on row blocks of ATT_BLOCK rows that cover
 *             only the lower triangle (block-aligned); (b, h) pairs are
 *             spread over OpenMP threads, where OpenBLAS runs
 *             single-threaded. The exponentials use a polynomial exp that
 *             vectorises (libm's expf does not without -ffast-math).
 *             The naive kernels (full scores in double) stay beside the
 *             fast ones for the tests.
 * Deliberately not here: dropout inside attention, other masks (padding,
 * sliding windows), key/value caches for generation.
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops/ops.h"

#define PAR_MIN 32768
#define COL_BLOCK 64 /* columns per task in the column-parallel reductions */
#define ATT_BLOCK 32 /* rows per sgemm block in attention (measured: 16 and 64 are slower at T=128, d=32) */

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- embedding */

static kd_status emb_infer(kd_node *n) {
    const kd_tensor *ids = &n->in[0]->val, *tab = &n->in[1]->val;
    if (ids->ndim != 2 || tab->ndim != 2) return kd_op_shape_error(n, "embedding needs ids (B, T) and table (V, C)");
    n->val.ndim = 3;
    n->val.shape[0] = ids->shape[0];
    n->val.shape[1] = ids->shape[1];
    n->val.shape[2] = tab->shape[1];
    return KD_OK;
}

static void emb_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const float *ids = n->in[0]->val.data, *tab = n->in[1]->val.data;
    int V = n->in[1]->val.shape[0], C = n->in[1]->val.shape[1];
    int64_t R = kd_numel(&n->in[0]->val);
    /* ids come from the data layer, which checks them against the vocabulary:
     * a bad one here is a bug. Checked serially first, so the report names the
     * first bad position whatever the thread count. */
    for (int64_t r = 0; r < R; r++) {
        float id = ids[r];
        KD_ASSERT(id >= 0.0f && id < (float)V && id == (float)(int)id,
                  "embedding '%s': token id %g at position %lld of '%s' is not an integer in [0, %d)", n->name,
                  (double)id, (long long)r, n->in[0]->name, V);
    }
    float *y = n->val.data;
#pragma omp parallel for if (R * C > PAR_MIN) schedule(static)
    for (int64_t r = 0; r < R; r++) memcpy(y + (size_t)r * C, tab + (size_t)(int)ids[r] * C, (size_t)C * sizeof *y);
}

static void emb_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *Tb = n->in[1];
    if (!(Tb->flags & KD_F_NEED_GRAD)) return;
    const float *ids = n->in[0]->val.data, *dy = n->grad.data;
    float *dt = Tb->grad.data;
    int C = Tb->val.shape[1], nb = (C + COL_BLOCK - 1) / COL_BLOCK;
    int64_t R = kd_numel(&n->in[0]->val);
#pragma omp parallel for if (R * C > PAR_MIN) schedule(static)
    for (int cb = 0; cb < nb; cb++) {
        int c0 = cb * COL_BLOCK, c1 = c0 + COL_BLOCK < C ? c0 + COL_BLOCK : C;
        for (int64_t r = 0; r < R; r++) {
            float *restrict d = dt + (size_t)(int)ids[r] * C;
            const float *restrict g = dy + (size_t)r * C;
#pragma omp simd
            for (int c = c0; c < c1; c++) d[c] += g[c];
        }
    }
}

/* no grad_overwrite: the scatter adds, so the table's gradient must start at
 * zero (or hold the tied head's contribution) */
const kd_op_def kd_op_embedding = {
    .name = "embedding", .infer = emb_infer, .forward = emb_forward, .backward = emb_backward};

/* ---------------------------------------------------------------- positional add */

static kd_status pos_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val, *tab = &n->in[1]->val;
    if (x->ndim != 3 || tab->ndim != 2 || tab->shape[1] != x->shape[2])
        return kd_op_shape_error(n, "positional add needs x (B, T, C) and table (ctx, C)");
    if (x->shape[1] > tab->shape[0]) {
        char what[128];
        snprintf(what, sizeof what, "sequence length T = %d exceeds the context length %d of the table", x->shape[1],
                 tab->shape[0]);
        return kd_op_shape_error(n, what);
    }
    n->val = *x;
    n->val.data = NULL;
    return KD_OK;
}

static void pos_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val;
    int B = x->shape[0], T = x->shape[1], C = x->shape[2];
    const float *tab = n->in[1]->val.data;
    int64_t R = (int64_t)B * T;
#pragma omp parallel for if (R * C > PAR_MIN) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *restrict xr = x->data + (size_t)r * C, *restrict tr = tab + (size_t)(r % T) * C;
        float *restrict yr = n->val.data + (size_t)r * C;
#pragma omp simd
        for (int c = 0; c < C; c++) yr[c] = xr[c] + tr[c];
    }
}

static void pos_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *X = n->in[0], *Tb = n->in[1];
    int B = X->val.shape[0], T = X->val.shape[1], C = X->val.shape[2];
    const float *dy = n->grad.data;
    int64_t k = (int64_t)B * T * C;
    if (X->flags & KD_F_NEED_GRAD) {
        float *restrict dx = X->grad.data;
        if (kd_grad_take_fresh(X)) {
            memcpy(dx, dy, (size_t)k * sizeof *dx);
        } else {
#pragma omp parallel for simd if (k > PAR_MIN) schedule(static)
            for (int64_t i = 0; i < k; i++) dx[i] += dy[i];
        }
    }
    if (Tb->flags & KD_F_NEED_GRAD) {
        int fresh = kd_grad_take_fresh(Tb);
        float *dt = Tb->grad.data;
        /* one table row per task, summed over the batch in order */
#pragma omp parallel for if (k > PAR_MIN) schedule(static)
        for (int t = 0; t < T; t++) {
            float *restrict d = dt + (size_t)t * C;
            if (fresh) memset(d, 0, (size_t)C * sizeof *d);
            for (int b = 0; b < B; b++) {
                const float *restrict g = dy + ((size_t)b * T + t) * C;
#pragma omp simd
                for (int c = 0; c < C; c++) d[c] += g[c];
            }
        }
        if (fresh) memset(dt + (size_t)T * C, 0, (size_t)(Tb->val.shape[0] - T) * C * sizeof *dt);
    }
}

const kd_op_def kd_op_pos_add = {
    .name = "pos_add", .infer = pos_infer, .forward = pos_forward, .backward = pos_backward, .grad_overwrite = 1};

/* ---------------------------------------------------------------- layer norm */

static kd_status ln_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    if (x->ndim < 1) return kd_op_shape_error(n, "layer norm needs at least one dimension");
    int C = x->shape[x->ndim - 1];
    for (int i = 1; i < 3; i++)
        if (n->in[i]->val.ndim != 1 || n->in[i]->val.shape[0] != C)
            return kd_op_shape_error(n, "layer norm weight and bias must be (C), C the last dim of x");
    n->val = *x;
    n->val.data = NULL;
    return KD_OK;
}

/* ws: (mean, rstd) per row, interleaved, for the maximum batch */
static size_t ln_ws(const kd_node *n, int threads) {
    (void)threads;
    const kd_tensor *x = &n->in[0]->val;
    return (size_t)(kd_numel(x) / x->shape[x->ndim - 1]) * 2 * sizeof(float);
}

static void ln_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val;
    int C = x->shape[x->ndim - 1];
    int64_t R = kd_numel(x) / C;
    const float *gamma = n->in[1]->val.data, *beta = n->in[2]->val.data;
    float *stats = n->ws, eps = n->fp[0];
#pragma omp parallel for if (R * C > PAR_MIN) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *restrict xr = x->data + (size_t)r * C;
        float *restrict yr = n->val.data + (size_t)r * C;
        double s = 0.0, ss = 0.0;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += xr[c];
        float m = (float)(s / C);
#pragma omp simd reduction(+ : ss)
        for (int c = 0; c < C; c++) {
            double d = (double)xr[c] - m; /* two passes: no cancellation when |mean| >> std */
            ss += d * d;
        }
        float rs = (float)(1.0 / sqrt(ss / C + eps));
        stats[2 * r] = m;
        stats[2 * r + 1] = rs;
#pragma omp simd
        for (int c = 0; c < C; c++) yr[c] = (xr[c] - m) * rs * gamma[c] + beta[c];
    }
}

static void ln_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *X = n->in[0], *G = n->in[1], *Be = n->in[2];
    int C = X->val.shape[X->val.ndim - 1];
    int64_t R = kd_numel(&X->val) / C;
    const float *x = X->val.data, *gamma = G->val.data, *dy = n->grad.data, *stats = n->ws;
    if (X->flags & KD_F_NEED_GRAD) {
        int fresh = kd_grad_take_fresh(X);
#pragma omp parallel for if (R * C > PAR_MIN) schedule(static)
        for (int64_t r = 0; r < R; r++) {
            const float *restrict xr = x + (size_t)r * C, *restrict g = dy + (size_t)r * C;
            float *restrict dx = X->grad.data + (size_t)r * C;
            float m = stats[2 * r], rs = stats[2 * r + 1], a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
            for (int c = 0; c < C; c++) {
                float gd = gamma[c] * g[c];
                a += gd;
                b += gd * (xr[c] - m) * rs;
            }
            a /= (float)C;
            b /= (float)C;
            if (fresh) {
#pragma omp simd
                for (int c = 0; c < C; c++) dx[c] = rs * (gamma[c] * g[c] - a - (xr[c] - m) * rs * b);
            } else {
#pragma omp simd
                for (int c = 0; c < C; c++) dx[c] += rs * (gamma[c] * g[c] - a - (xr[c] - m) * rs * b);
            }
        }
    }
    int need_g = (G->flags & KD_F_NEED_GRAD) != 0, need_b = (Be->flags & KD_F_NEED_GRAD) != 0;
    if (!need_g && !need_b) return;
    int fresh_g = need_g && kd_grad_take_fresh(G), fresh_b = need_b && kd_grad_take_fresh(Be);
    int nb = (C + COL_BLOCK - 1) / COL_BLOCK;
    /* column blocks on threads, rows in order: independent of the thread count */
#pragma omp parallel for if (R * C > PAR_MIN) schedule(static)
    for (int cb = 0; cb < nb; cb++) {
        int c0 = cb * COL_BLOCK, w = c0 + COL_BLOCK < C ? COL_BLOCK : C - c0;
        double sg[COL_BLOCK], sb[COL_BLOCK];
        for (int c = 0; c < w; c++) sg[c] = sb[c] = 0.0;
        for (int64_t r = 0; r < R; r++) {
            const float *restrict xr = x + (size_t)r * C + c0, *restrict g = dy + (size_t)r * C + c0;
            float m = stats[2 * r], rs = stats[2 * r + 1];
#pragma omp simd
            for (int c = 0; c < w; c++) {
                sg[c] += (double)g[c] * ((xr[c] - m) * rs);
                sb[c] += g[c];
            }
        }
        for (int c = 0; c < w; c++) {
            if (need_g) G->grad.data[c0 + c] = (fresh_g ? 0.0f : G->grad.data[c0 + c]) + (float)sg[c];
            if (need_b) Be->grad.data[c0 + c] = (fresh_b ? 0.0f : Be->grad.data[c0 + c]) + (float)sb[c];
        }
    }
}

const kd_op_def kd_op_layernorm = {.name = "layernorm",
                                   .infer = ln_infer,
                                   .workspace = ln_ws,
                                   .forward = ln_forward,
                                   .backward = ln_backward,
                                   .grad_overwrite = 1};

/* ---------------------------------------------------------------- causal attention */

size_t kd_attention_scratch_floats(int T) { return 2 * (size_t)T * T; }

/* One head of one sequence. o (T,d) row stride C; lse (T); S (T,T) scratch;
 * q, k, v (T,d) row stride C3 */
static void att_head_forward(float *o, float *lse, float *S, const float *q, const float *k, const float *v, int T,
                             int d, int C, int C3) {
    float sc = 1.0f / sqrtf((float)d);
    for (int i0 = 0; i0 < T; i0 += ATT_BLOCK) {
        int i1 = i0 + ATT_BLOCK < T ? i0 + ATT_BLOCK : T;
        float *Sb = S + (size_t)i0 * T;
        /* S[i0:i1, 0:i1] = q[i0:i1] k[0:i1]^T / sqrt(d) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i1 - i0, i1, d, sc, q + (size_t)i0 * C3, C3, k, C3, 0.0f,
                    Sb, T);
        for (int i = i0; i < i1; i++) {
            float *restrict s = S + (size_t)i * T, m = s[0], z = 0.0f;
#pragma omp simd reduction(max : m)
            for (int j = 1; j <= i; j++) m = s[j] > m ? s[j] : m;
#pragma omp simd reduction(+ : z)
            for (int j = 0; j <= i; j++) {
                s[j] = kd_exp_vec(s[j] - m);
                z += s[j];
            }
            float inv = 1.0f / z;
#pragma omp simd
            for (int j = 0; j <= i; j++) s[j] *= inv;
            for (int j = i + 1; j < i1; j++) s[j] = 0.0f; /* the masked part of the diagonal block */
            lse[i] = m + logf(z);
        }
        /* o[i0:i1] = P[i0:i1, 0:i1] v[0:i1] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, i1 - i0, d, i1, 1.0f, Sb, T, v, C3, 0.0f,
                    o + (size_t)i0 * C, C);
    }
}

/* dq, dk, dv (T,d) row stride C3, assigned (beta 0) or added (beta 1);
 * P, G (T,T) scratch; dy (T,d) row stride C; q, k, v as in forward */
static void att_head_backward(float *dq, float *dk, float *dv, float *P, float *G, const float *dy, const float *q,
                              const float *k, const float *v, const float *lse, int T, int d, int C, int C3,
                              float beta) {
    float sc = 1.0f / sqrtf((float)d);
    for (int i0 = 0; i0 < T; i0 += ATT_BLOCK) {
        int i1 = i0 + ATT_BLOCK < T ? i0 + ATT_BLOCK : T, m = i1 - i0;
        float *Pb = P + (size_t)i0 * T, *Gb = G + (size_t)i0 * T;
        /* the same call as in forward: S bit for bit; dP = dy v^T */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, i1, d, sc, q + (size_t)i0 * C3, C3, k, C3, 0.0f, Pb, T);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, i1, d, 1.0f, dy + (size_t)i0 * C, C, v, C3, 0.0f, Gb,
                    T);
        for (int i = i0; i < i1; i++) {
            float *restrict p = P + (size_t)i * T, *restrict g = G + (size_t)i * T, l = lse[i], D = 0.0f;
#pragma omp simd reduction(+ : D)
            for (int j = 0; j <= i; j++) {
                p[j] = kd_exp_vec(p[j] - l);
                D += p[j] * g[j];
            }
#pragma omp simd
            for (int j = 0; j <= i; j++) g[j] = p[j] * (g[j] - D); /* dS */
            for (int j = i + 1; j < i1; j++) p[j] = g[j] = 0.0f;
        }
        /* dq[i0:i1] = dS[i0:i1, 0:i1] k[0:i1] / sqrt(d) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, d, i1, sc, Gb, T, k, C3, beta, dq + (size_t)i0 * C3,
                    C3);
    }
    /* column block j0:j1 of P and dS is nonzero in rows j0..T-1 only; those
     * rows' blocks were computed out to at least column j1 */
    for (int j0 = 0; j0 < T; j0 += ATT_BLOCK) {
        int j1 = j0 + ATT_BLOCK < T ? j0 + ATT_BLOCK : T;
        /* dv[j0:j1] = P[j0:T, j0:j1]^T dy[j0:T], dk[j0:j1] = dS[j0:T, j0:j1]^T q[j0:T] / sqrt(d) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, j1 - j0, d, T - j0, 1.0f, P + (size_t)j0 * T + j0, T,
                    dy + (size_t)j0 * C, C, beta, dv + (size_t)j0 * C3, C3);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, j1 - j0, d, T - j0, sc, G + (size_t)j0 * T + j0, T,
                    q + (size_t)j0 * C3, C3, beta, dk + (size_t)j0 * C3, C3);
    }
}

void kd_attention_forward(float *out, float *lse, float *scratch, const float *qkv, int B, int T, int C, int NH,
                          int threads) {
    int d = C / NH, C3 = 3 * C;
    size_t per = kd_attention_scratch_floats(T);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH;
        const float *q = qkv + (size_t)b * T * C3 + (size_t)h * d;
        att_head_forward(out + (size_t)b * T * C + (size_t)h * d, lse + (size_t)bh * T,
                         scratch + (size_t)thread_id() * per, q, q + C, q + 2 * C, T, d, C, C3);
    }
}

void kd_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv, const float *lse, int B,
                           int T, int C, int NH, int threads, int accumulate) {
    int d = C / NH, C3 = 3 * C;
    size_t per = kd_attention_scratch_floats(T);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH;
        size_t o = (size_t)b * T * C3 + (size_t)h * d;
        float *P = scratch + (size_t)thread_id() * per, *dq = dqkv + o;
        const float *q = qkv + o;
        att_head_backward(dq, dq + C, dq + 2 * C, P, P + (size_t)T * T, dout + (size_t)b * T * C + (size_t)h * d, q,
                          q + C, q + 2 * C, lse + (size_t)bh * T, T, d, C, C3, accumulate ? 1.0f : 0.0f);
    }
}

void kd_attention_forward_naive(float *out, float *lse, const float *qkv, int B, int T, int C, int NH) {
    int d = C / NH, C3 = 3 * C;
    double *s = kd_malloc((size_t)T * T * sizeof *s), sc = 1.0 / sqrt((double)d);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const float *q = qkv + (size_t)b * T * C3 + (size_t)h * d, *k = q + C, *v = q + 2 * C;
            for (int i = 0; i < T; i++) {
                double m = -INFINITY, z = 0.0;
                for (int j = 0; j < T; j++) {
                    double a = 0.0;
                    for (int c = 0; c < d; c++) a += (double)q[(size_t)i * C3 + c] * k[(size_t)j * C3 + c];
                    s[(size_t)i * T + j] = j <= i ? a * sc : -INFINITY;
                    m = fmax(m, s[(size_t)i * T + j]);
                }
                for (int j = 0; j < T; j++) z += exp(s[(size_t)i * T + j] - m);
                for (int j = 0; j < T; j++) s[(size_t)i * T + j] = exp(s[(size_t)i * T + j] - m) / z;
                if (lse) lse[((size_t)b * NH + h) * T + i] = (float)(m + log(z));
                for (int c = 0; c < d; c++) {
                    double a = 0.0;
                    for (int j = 0; j < T; j++) a += s[(size_t)i * T + j] * v[(size_t)j * C3 + c];
                    out[((size_t)b * T + i) * C + (size_t)h * d + c] = (float)a;
                }
            }
        }
    free(s);
}

void kd_attention_backward_naive(float *dqkv, const float *dout, const float *qkv, int B, int T, int C, int NH) {
    int d = C / NH, C3 = 3 * C;
    double sc = 1.0 / sqrt((double)d);
    double *P = kd_malloc((size_t)T * T * sizeof *P), *dS = kd_malloc((size_t)T * T * sizeof *dS);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            size_t o = (size_t)b * T * C3 + (size_t)h * d;
            const float *q = qkv + o, *k = q + C, *v = q + 2 * C, *dy = dout + (size_t)b * T * C + (size_t)h * d;
            float *dq = dqkv + o, *dk = dq + C, *dv = dq + 2 * C;
            for (int i = 0; i < T; i++) {
                double m = -INFINITY, z = 0.0;
                for (int j = 0; j < T; j++) {
                    double a = 0.0;
                    for (int c = 0; c < d; c++) a += (double)q[(size_t)i * C3 + c] * k[(size_t)j * C3 + c];
                    P[(size_t)i * T + j] = j <= i ? a * sc : -INFINITY;
                    m = fmax(m, P[(size_t)i * T + j]);
                }
                for (int j = 0; j < T; j++) z += exp(P[(size_t)i * T + j] - m);
                for (int j = 0; j < T; j++) P[(size_t)i * T + j] = exp(P[(size_t)i * T + j] - m) / z;
                /* dP_ij = dy_i . v_j; dS = P o (dP - sum_j P_ij dP_ij) */
                double D = 0.0;
                for (int j = 0; j < T; j++) {
                    double a = 0.0;
                    for (int c = 0; c < d; c++) a += (double)dy[(size_t)i * C + c] * v[(size_t)j * C3 + c];
                    dS[(size_t)i * T + j] = a;
                    D += P[(size_t)i * T + j] * a;
                }
                for (int j = 0; j < T; j++) dS[(size_t)i * T + j] = P[(size_t)i * T + j] * (dS[(size_t)i * T + j] - D);
            }
            for (int i = 0; i < T; i++)
                for (int c = 0; c < d; c++) {
                    double aq = 0.0, ak = 0.0, av = 0.0;
                    for (int j = 0; j < T; j++) {
                        aq += dS[(size_t)i * T + j] * k[(size_t)j * C3 + c];
                        ak += dS[(size_t)j * T + i] * q[(size_t)j * C3 + c];
                        av += P[(size_t)j * T + i] * dy[(size_t)j * C + c];
                    }
                    dq[(size_t)i * C3 + c] = (float)(aq * sc);
                    dk[(size_t)i * C3 + c] = (float)(ak * sc);
                    dv[(size_t)i * C3 + c] = (float)av;
                }
        }
    free(P);
    free(dS);
}

static kd_status att_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    int NH = n->ip[0];
    if (x->ndim != 3 || x->shape[2] % (3 * NH) != 0) {
        char what[160];
        snprintf(what, sizeof what,
                 "causal attention needs qkv (B, T, 3C) with 3C divisible by 3 * heads = %d (C = heads * head dim)",
                 3 * NH);
        return kd_op_shape_error(n, what);
    }
    n->val = *x;
    n->val.data = NULL;
    n->val.shape[2] = x->shape[2] / 3;
    return KD_OK;
}

/* ws: per-thread scratch (two T x T blocks each), then lse (B,NH,T) for the
 * maximum batch; the scratch holds nothing between calls, the lse does */
static size_t att_ws(const kd_node *n, int threads) {
    const kd_tensor *x = &n->in[0]->val;
    int B = x->shape[0], T = x->shape[1];
    return ((size_t)threads * kd_attention_scratch_floats(T) + (size_t)B * n->ip[0] * T) * sizeof(float);
}

static float *att_lse(const kd_node *n, int threads) {
    return (float *)n->ws + (size_t)threads * kd_attention_scratch_floats(n->in[0]->val.shape[1]);
}

static void att_forward(kd_node *n, const kd_ctx *ctx) {
    const kd_tensor *x = &n->in[0]->val;
    kd_attention_forward(n->val.data, att_lse(n, ctx->threads), n->ws, x->data, x->shape[0], x->shape[1],
                         n->val.shape[2], n->ip[0], ctx->threads);
}

static void att_backward(kd_node *n, const kd_ctx *ctx) {
    kd_node *X = n->in[0];
    if (!(X->flags & KD_F_NEED_GRAD)) return;
    int fresh = kd_grad_take_fresh(X);
    kd_attention_backward(X->grad.data, n->ws, n->grad.data, X->val.data, att_lse(n, ctx->threads), X->val.shape[0],
                          X->val.shape[1], n->val.shape[2], n->ip[0], ctx->threads, !fresh);
}

const kd_op_def kd_op_causal_attention = {.name = "causal_attention",
                                          .infer = att_infer,
                                          .workspace = att_ws,
                                          .forward = att_forward,
                                          .backward = att_backward,
                                          .grad_overwrite = 1};

/* ---------------------------------------------------------------- builders */

kd_node *kd_embedding(kd_graph *g, kd_node *ids, kd_node *table) {
    kd_node *in[2] = {ids, table};
    return kd_graph_add_op(g, KD_OP_EMBEDDING, 2, in);
}

kd_node *kd_pos_add(kd_graph *g, kd_node *x, kd_node *table) {
    kd_node *in[2] = {x, table};
    return kd_graph_add_op(g, KD_OP_POS_ADD, 2, in);
}

kd_node *kd_layernorm(kd_graph *g, kd_node *x, kd_node *gamma, kd_node *beta, float eps) {
    KD_ASSERT(eps >= 0.0f, "layer norm eps %g", eps);
    kd_node *in[3] = {x, gamma, beta};
    float fp[8] = {eps};
    return kd_graph_add_op_ex(g, KD_OP_LAYERNORM, 3, in, NULL, fp);
}

kd_node *kd_causal_attention(kd_graph *g, kd_node *qkv, int heads) {
    KD_ASSERT(heads >= 1, "causal attention with %d heads", heads);
    int ip[8] = {heads};
    return kd_graph_add_op_ex(g, KD_OP_CAUSAL_ATTENTION, 1, &qkv, ip, NULL);
}

kd_node *kd_ln(kd_graph *g, const char *prefix, kd_node *x) {
    int C = x->val.ndim >= 1 ? x->val.shape[x->val.ndim - 1] : 1;
    int cs[1] = {C};
    char name[96];
    snprintf(name, sizeof name, "%s.weight", prefix);
    kd_node *w = kd_param(g, name, 1, cs, KD_INIT_ONE, C);
    snprintf(name, sizeof name, "%s.bias", prefix);
    kd_node *b = kd_param(g, name, 1, cs, KD_INIT_ZERO, C);
    kd_node *y = kd_layernorm(g, x, w, b, 1e-5f);
    kd_node_set_name(y, "%s", prefix);
    return y;
}
