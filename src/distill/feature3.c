/* feature3.c - ops for the third family of feature losses (docs/losses/feature3.md):
 *
 *   haar2d(x)            single-level orthonormal 2-D Haar transform of maps
 *                        (B, C, H, W) -> (B, 4C, ceil(H/2), ceil(W/2)), bands
 *                        LL, LH, HL, HH stacked along dim 1 (freekd)
 *   band_mse(a, b)       MSE whose elements are weighted by the group of
 *                        channels (band) they belong to (freekd)
 *   attn_mask(fs, ft)    SoKD's mask of the area both networks attend to:
 *                        the renormalised product of the two channel-mean
 *                        attention maps, each softmax-normalised over H*W
 *   masked_mse(a, b, m)  MSE weighted per example and position by m (sokd)
 *   gauss_kl(...)        closed-form KL(N_t || N_s) of two diagonal
 *                        Gaussians given by means and log-variances (unikd)
 * OFA's logit-space heads and UniKD's fusion are compositions of existing
 * ops (global average pooling, linear layers, concat, divergence), built in
 * build_feat3.c.
 *
 * Formulas. Haar, per 2x2 block [[p, q], [r, s]] (rows 2i, 2i+1; columns 2j,
 * 2j+1) of a map zero-padded at the bottom/right when H or W is odd (as
 * pytorch_wavelets' mode='zero'):
 *   LL = (p + q + r + s)/2   LH = (p - q + r - s)/2   (low along H, high along W)
 *   HL = (p + q - r - s)/2   HH = (p - q - r + s)/2
 * The 4x4 matrix is orthogonal, so the transform of the padded map keeps
 * its energy, and the backward is the transpose (padding gets nothing).
 *   band_mse   = sum_g w_g sum_{elements of group g} (a - b)^2 / numel(a);
 *                with every w_g = 1 it is the plain MSE.
 *   attn_mask: per example, a = mean_c |f_c| over the channels (per side),
 *              u = a / (mean_i a + 1e-6) (scale-free), z = (u_s + u_t)/tau,
 *              M = I * softmax_i(z), I = H*W. Since softmax(u_s/tau) *
 *              softmax(u_t/tau), renormalised, is softmax(z), M is the
 *              product of the two normalised maps scaled to mean 1. With
 *              ip[0] = 1 (detach) the mask is a constant: no gradient.
 *   masked_mse = sum_{b,c,i} m_{b,i} (a - b)^2_{b,c,i} / numel(a)
 *   gauss_kl   = 1/N sum_{n,d} 1/2 (lv_s - lv_t + (e^lv_t + (mu_t - mu_s)^2) e^-lv_s - 1)
 * Sums that decide a loss run in double, per example, then in a fixed
 * order, so values do not depend on the thread count. Nothing is allocated
 * per step. Backward derivations are above each backward.
 */
#include <math.h>
#include <string.h>

#include "kd_distill.h"
#include "ops/ops.h"

#define PAR_WORK 32768
#define ATT_EPS 1e-6 /* guards the spatial mean of an all-zero attention map */

static kd_status scalar_out(kd_node *n) {
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static int need_grad(const kd_node *u) { return (u->flags & KD_F_NEED_GRAD) != 0; }
static int same_shape(const kd_tensor *a, const kd_tensor *b) {
    return a->ndim == b->ndim && memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof(int)) == 0;
}
/* elements per (example, channel): the product of the dims after 1 */
static int64_t inner_of(const kd_tensor *t) {
    return t->ndim > 2 ? kd_numel(t) / ((int64_t)t->shape[0] * t->shape[1]) : 1;
}

static double sum_ordered(const double *p, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += p[i];
    return s;
}

/* ============================================================ haar2d
 * x (B, C, H, W) -> y (B, 4C, H2, W2), H2 = (H+1)/2, W2 = (W+1)/2; band k
 * of channel c is channel k*C + c (k: 0 LL, 1 LH, 2 HL, 3 HH). */

static kd_status haar_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    if (x->ndim != 4) return kd_op_shape_error(n, "haar2d needs feature maps (B, C, H, W)");
    n->val.ndim = 4;
    n->val.shape[0] = x->shape[0];
    n->val.shape[1] = 4 * x->shape[1];
    n->val.shape[2] = (x->shape[2] + 1) / 2;
    n->val.shape[3] = (x->shape[3] + 1) / 2;
    return KD_OK;
}

/* the four pixels of block (i, j) of one map (H, W), 0 outside */
static inline void haar_block(const float *x, int H, int W, int i, int j, float v[4]) {
    int r0 = 2 * i, c0 = 2 * j, r1 = r0 + 1 < H, c1 = c0 + 1 < W;
    const float *row = x + (size_t)r0 * W;
    v[0] = row[c0];
    v[1] = c1 ? row[c0 + 1] : 0.0f;
    v[2] = r1 ? row[W + c0] : 0.0f;
    v[3] = r1 && c1 ? row[W + c0 + 1] : 0.0f;
}

static void haar_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *X = &n->in[0]->val;
    int B = X->shape[0], C = X->shape[1], H = X->shape[2], W = X->shape[3];
    int H2 = (H + 1) / 2, W2 = (W + 1) / 2;
    size_t band = (size_t)C * H2 * W2; /* stride between bands of one example */
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)B * C * H * W > PAR_WORK) schedule(static)
    for (int bc = 0; bc < B * C; bc++) {
        int b = bc / C, c = bc % C;
        const float *x = X->data + (size_t)bc * H * W;
        float *y = n->val.data + (size_t)b * 4 * band + (size_t)c * H2 * W2;
        for (int i = 0; i < H2; i++)
            for (int j = 0; j < W2; j++) {
                float v[4];
                haar_block(x, H, W, i, j, v);
                size_t o = (size_t)i * W2 + j;
                y[o] = 0.5f * (v[0] + v[1] + v[2] + v[3]);
                y[band + o] = 0.5f * (v[0] - v[1] + v[2] - v[3]);
                y[2 * band + o] = 0.5f * (v[0] + v[1] - v[2] - v[3]);
                y[3 * band + o] = 0.5f * (v[0] - v[1] - v[2] + v[3]);
            }
    }
}

/* y = A x per block with A orthogonal (A^T = A here): dx = A dy, and the
 * padded positions (outside H, W) are dropped. */
static void haar_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *Xn = n->in[0];
    if (!need_grad(Xn)) return;
    int B = Xn->val.shape[0], C = Xn->val.shape[1], H = Xn->val.shape[2], W = Xn->val.shape[3];
    int H2 = (H + 1) / 2, W2 = (W + 1) / 2;
    size_t band = (size_t)C * H2 * W2;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)B * C * H * W > PAR_WORK) schedule(static)
    for (int bc = 0; bc < B * C; bc++) {
        int b = bc / C, c = bc % C;
        float *dx = Xn->grad.data + (size_t)bc * H * W;
        const float *dy = n->grad.data + (size_t)b * 4 * band + (size_t)c * H2 * W2;
        for (int i = 0; i < H2; i++)
            for (int j = 0; j < W2; j++) {
                size_t o = (size_t)i * W2 + j;
                float ll = dy[o], lh = dy[band + o], hl = dy[2 * band + o], hh = dy[3 * band + o];
                int r0 = 2 * i, c0 = 2 * j, r1 = r0 + 1 < H, c1 = c0 + 1 < W;
                float *row = dx + (size_t)r0 * W;
                row[c0] += 0.5f * (ll + lh + hl + hh);
                if (c1) row[c0 + 1] += 0.5f * (ll - lh + hl - hh);
                if (r1) row[W + c0] += 0.5f * (ll + lh - hl - hh);
                if (r1 && c1) row[W + c0 + 1] += 0.5f * (ll - lh - hl + hh);
            }
    }
}

const kd_op_def kd_op_haar2d = {
    .name = "haar2d", .infer = haar_infer, .forward = haar_forward, .backward = haar_backward};

/* ============================================================ band_mse
 * a, b (B, G*Cg, ...) same shape; ip[0] G (1..8), fp[0..G-1] the weights.
 * ws (double): per (example, group) sums of squares, B*G. */

static kd_status band_infer(kd_node *n) {
    const kd_tensor *a = &n->in[0]->val, *b = &n->in[1]->val;
    if (a->ndim < 2 || !same_shape(a, b))
        return kd_op_shape_error(n, "band_mse needs two tensors (B, C, ...) of the same shape");
    if (a->shape[1] % n->ip[0] != 0) return kd_op_shape_error(n, "band_mse: dim 1 does not split into the bands");
    return scalar_out(n);
}

static size_t band_ws(const kd_node *n, int threads) {
    (void)threads;
    return (size_t)n->in[0]->val.shape[0] * n->ip[0] * sizeof(double);
}

static void band_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *A = &n->in[0]->val;
    const float *a = A->data, *b = n->in[1]->val.data;
    int B = A->shape[0], G = n->ip[0];
    int64_t per = kd_numel(A) / ((int64_t)B * G); /* elements of one group of one example */
    double *S = n->ws;
#pragma omp parallel for num_threads(ctx->threads) if (kd_numel(A) > PAR_WORK) schedule(static)
    for (int bg = 0; bg < B * G; bg++) {
        const float *pa = a + (size_t)bg * per, *pb = b + (size_t)bg * per;
        double s = 0.0;
        for (int64_t i = 0; i < per; i++) {
            double d = (double)pa[i] - pb[i];
            s += d * d;
        }
        S[bg] = s;
    }
    double tot = 0.0;
    for (int g = 0; g < G; g++) {
        double sg = 0.0;
        for (int e = 0; e < B; e++) sg += S[(size_t)e * G + g];
        tot += n->fp[g] * sg;
    }
    n->val.data[0] = (float)(tot / (double)kd_numel(A));
}

/* da = 2 g w_group (a - b) / numel,  db = -da */
static void band_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *An = n->in[0], *Bn = n->in[1];
    float *da = need_grad(An) ? An->grad.data : NULL, *db = need_grad(Bn) ? Bn->grad.data : NULL;
    if (!da && !db) return;
    const float *a = An->val.data, *b = Bn->val.data;
    int B = An->val.shape[0], G = n->ip[0];
    int64_t per = kd_numel(&An->val) / ((int64_t)B * G);
    double k = 2.0 * n->grad.data[0] / (double)kd_numel(&An->val);
#pragma omp parallel for num_threads(ctx->threads) if (kd_numel(&An->val) > PAR_WORK) schedule(static)
    for (int bg = 0; bg < B * G; bg++) {
        double kg = k * n->fp[bg % G];
        size_t o = (size_t)bg * per;
        for (int64_t i = 0; i < per; i++) {
            float d = (float)(kg * ((double)a[o + i] - b[o + i]));
            if (da) da[o + i] += d;
            if (db) db[o + i] -= d;
        }
    }
}

const kd_op_def kd_op_band_mse = {
    .name = "band_mse", .infer = band_infer, .workspace = band_ws, .forward = band_forward, .backward = band_backward};

/* ============================================================ attn_mask
 * fs (B, Cs, ...), ft (B, Ct, ...) with the same B and positions I (the
 * dims after 1) -> M (B, 1, ...). ip[0] detach; fp[0] tau.
 * ws (double): a_s, a_t (B*I each), mean_s, mean_t (B each), p (B*I), and
 * for the backward dz, da (B*I each). */

typedef struct att_ws {
    double *as, *at, *ms, *mt, *p, *dz, *da;
} att_ws;

static att_ws att_ws_of(const kd_node *n, int B, int64_t I) {
    att_ws w = {.as = n->ws};
    w.at = w.as + (size_t)B * I;
    w.ms = w.at + (size_t)B * I;
    w.mt = w.ms + B;
    w.p = w.mt + B;
    w.dz = w.p + (size_t)B * I;
    w.da = w.dz + (size_t)B * I;
    return w;
}

static kd_status att_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    if (s->ndim < 3 || s->ndim != t->ndim || s->shape[0] != t->shape[0])
        return kd_op_shape_error(n, "attn_mask needs student and teacher maps (B, C, ...) of the same rank and B");
    for (int d = 2; d < s->ndim; d++)
        if (s->shape[d] != t->shape[d]) return kd_op_shape_error(n, "attn_mask: the spatial dims must agree");
    n->val = *s;
    n->val.data = NULL;
    n->val.shape[1] = 1;
    return KD_OK;
}

static size_t att_ws_bytes(const kd_node *n, int threads) {
    (void)threads;
    size_t B = (size_t)n->in[0]->val.shape[0], I = (size_t)inner_of(&n->in[0]->val);
    return (5 * B * I + 2 * B) * sizeof(double);
}

/* a (I) = mean over C of |f|, returns the mean of a over I */
static double att_map(double *a, const float *f, int C, int64_t I) {
    for (int64_t i = 0; i < I; i++) a[i] = 0.0;
    for (int c = 0; c < C; c++) {
        const float *fc = f + (size_t)c * I;
        for (int64_t i = 0; i < I; i++) a[i] += fabs((double)fc[i]);
    }
    double m = 0.0;
    for (int64_t i = 0; i < I; i++) {
        a[i] /= C;
        m += a[i];
    }
    return m / (double)I;
}

static void att_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *S = &n->in[0]->val, *T = &n->in[1]->val;
    int B = S->shape[0], Cs = S->shape[1], Ct = T->shape[1];
    int64_t I = inner_of(S);
    att_ws w = att_ws_of(n, B, I);
    double tau = n->fp[0];
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)B * (Cs + Ct) * I > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        double *as = w.as + (size_t)b * I, *at = w.at + (size_t)b * I, *p = w.p + (size_t)b * I;
        w.ms[b] = att_map(as, S->data + (size_t)b * Cs * I, Cs, I);
        w.mt[b] = att_map(at, T->data + (size_t)b * Ct * I, Ct, I);
        double rs = 1.0 / (w.ms[b] + ATT_EPS), rt = 1.0 / (w.mt[b] + ATT_EPS), mx = -INFINITY, sum = 0.0;
        for (int64_t i = 0; i < I; i++) {
            p[i] = (as[i] * rs + at[i] * rt) / tau;
            mx = fmax(mx, p[i]);
        }
        for (int64_t i = 0; i < I; i++) {
            p[i] = exp(p[i] - mx);
            sum += p[i];
        }
        float *m = n->val.data + (size_t)b * I;
        for (int64_t i = 0; i < I; i++) {
            p[i] /= sum;
            m[i] = (float)(p[i] * (double)I);
        }
    }
}

/* Per example, with upstream dM (I):
 *   M = I p, p = softmax(z):   dz_i = I p_i (dM_i - sum_j p_j dM_j)
 *   z = (u_s + u_t)/tau:       du_i = dz_i / tau   (each side)
 *   u = a r, r = 1/(mean(a) + eps):  da_k = r du_k - r^2 / I * sum_i du_i a_i
 *   a_i = mean_c |f_ci|:       df_ci = da_i sign(f_ci) / C   (0 at f = 0)
 * A detached mask (ip[0] = 1) gives nothing. */
static void att_side_backward(float *df, const float *f, const double *a, double mean, const double *dz, int C,
                              int64_t I, double tau, double *da) {
    double r = 1.0 / (mean + ATT_EPS), dot = 0.0;
    for (int64_t i = 0; i < I; i++) dot += dz[i] / tau * a[i];
    for (int64_t i = 0; i < I; i++) da[i] = (r * dz[i] / tau - r * r / (double)I * dot) / C;
    for (int c = 0; c < C; c++) {
        const float *fc = f + (size_t)c * I;
        float *dc = df + (size_t)c * I;
        for (int64_t i = 0; i < I; i++) dc[i] += fc[i] > 0.0f ? (float)da[i] : fc[i] < 0.0f ? (float)-da[i] : 0.0f;
    }
}

static void att_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    if (n->ip[0]) return;
    kd_node *Sn = n->in[0], *Tn = n->in[1];
    int ns = need_grad(Sn), nt = need_grad(Tn);
    if (!ns && !nt) return;
    int B = Sn->val.shape[0], Cs = Sn->val.shape[1], Ct = Tn->val.shape[1];
    int64_t I = inner_of(&Sn->val);
    att_ws w = att_ws_of(n, B, I);
    double tau = n->fp[0];
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)B * (Cs + Ct) * I > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        const double *p = w.p + (size_t)b * I;
        double *dz = w.dz + (size_t)b * I, *da = w.da + (size_t)b * I, q = 0.0;
        const float *dm = n->grad.data + (size_t)b * I;
        for (int64_t i = 0; i < I; i++) q += p[i] * dm[i];
        for (int64_t i = 0; i < I; i++) dz[i] = (double)I * p[i] * (dm[i] - q);
        if (ns)
            att_side_backward(Sn->grad.data + (size_t)b * Cs * I, Sn->val.data + (size_t)b * Cs * I,
                              w.as + (size_t)b * I, w.ms[b], dz, Cs, I, tau, da);
        if (nt)
            att_side_backward(Tn->grad.data + (size_t)b * Ct * I, Tn->val.data + (size_t)b * Ct * I,
                              w.at + (size_t)b * I, w.mt[b], dz, Ct, I, tau, da);
    }
}

const kd_op_def kd_op_attn_mask = {
    .name = "attn_mask", .infer = att_infer, .workspace = att_ws_bytes, .forward = att_forward, .backward = att_backward};

/* ============================================================ masked_mse
 * a, b (B, C, ...) same shape, m (B, 1, ...) with the same trailing dims;
 * ws (double): per-example sums (B). */

static kd_status mmse_infer(kd_node *n) {
    const kd_tensor *a = &n->in[0]->val, *b = &n->in[1]->val, *m = &n->in[2]->val;
    if (a->ndim < 2 || !same_shape(a, b))
        return kd_op_shape_error(n, "masked_mse needs two tensors (B, C, ...) of the same shape");
    int ok = m->ndim == a->ndim && m->shape[0] == a->shape[0] && m->shape[1] == 1;
    for (int d = 2; ok && d < a->ndim; d++) ok = m->shape[d] == a->shape[d];
    if (!ok) return kd_op_shape_error(n, "masked_mse: the mask must be (B, 1, ...) with the tensors' other dims");
    return scalar_out(n);
}

static size_t mmse_ws(const kd_node *n, int threads) {
    (void)threads;
    return (size_t)n->in[0]->val.shape[0] * sizeof(double);
}

static void mmse_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *A = &n->in[0]->val;
    const float *a = A->data, *b = n->in[1]->val.data, *m = n->in[2]->val.data;
    int B = A->shape[0], C = A->shape[1];
    int64_t I = inner_of(A);
    double *part = n->ws;
#pragma omp parallel for num_threads(ctx->threads) if (kd_numel(A) > PAR_WORK) schedule(static)
    for (int e = 0; e < B; e++) {
        const float *me = m + (size_t)e * I;
        double s = 0.0;
        for (int c = 0; c < C; c++) {
            size_t o = ((size_t)e * C + c) * I;
            for (int64_t i = 0; i < I; i++) {
                double d = (double)a[o + i] - b[o + i];
                s += me[i] * d * d;
            }
        }
        part[e] = s;
    }
    n->val.data[0] = (float)(sum_ordered(part, B) / (double)kd_numel(A));
}

/* With N = numel(a): da = 2 g m (a - b) / N, db = -da, dm_i = g sum_c (a - b)^2 / N */
static void mmse_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *An = n->in[0], *Bn = n->in[1], *Mn = n->in[2];
    float *da = need_grad(An) ? An->grad.data : NULL, *db = need_grad(Bn) ? Bn->grad.data : NULL;
    float *dm = need_grad(Mn) ? Mn->grad.data : NULL;
    if (!da && !db && !dm) return;
    const float *a = An->val.data, *b = Bn->val.data, *m = Mn->val.data;
    int B = An->val.shape[0], C = An->val.shape[1];
    int64_t I = inner_of(&An->val);
    double k = n->grad.data[0] / (double)kd_numel(&An->val);
#pragma omp parallel for num_threads(ctx->threads) if (kd_numel(&An->val) > PAR_WORK) schedule(static)
    for (int e = 0; e < B; e++) {
        const float *me = m + (size_t)e * I;
        for (int c = 0; c < C; c++) {
            size_t o = ((size_t)e * C + c) * I;
            for (int64_t i = 0; i < I; i++) {
                double d = (double)a[o + i] - b[o + i];
                float g = (float)(2.0 * k * me[i] * d);
                if (da) da[o + i] += g;
                if (db) db[o + i] -= g;
            }
        }
        if (dm)
            for (int64_t i = 0; i < I; i++) {
                double s = 0.0;
                for (int c = 0; c < C; c++) {
                    size_t o = ((size_t)e * C + c) * I + i;
                    double d = (double)a[o] - b[o];
                    s += d * d;
                }
                dm[(size_t)e * I + i] += (float)(k * s);
            }
    }
}

const kd_op_def kd_op_masked_mse = {.name = "masked_mse",
                                    .infer = mmse_infer,
                                    .workspace = mmse_ws,
                                    .forward = mmse_forward,
                                    .backward = mmse_backward};

/* ============================================================ gauss_kl
 * mu_s, lv_s, mu_t, lv_t (N, D) -> KL(N(mu_t, e^lv_t) || N(mu_s, e^lv_s)),
 * summed over D, averaged over N. ws (double): per-row sums (N). */

static kd_status gkl_infer(kd_node *n) {
    const kd_tensor *a = &n->in[0]->val;
    if (a->ndim != 2) return kd_op_shape_error(n, "gauss_kl needs means and log-variances (N, D)");
    for (int k = 1; k < 4; k++)
        if (!same_shape(a, &n->in[k]->val))
            return kd_op_shape_error(n, "gauss_kl: the four inputs (means and log-variances) must have one shape");
    return scalar_out(n);
}

static size_t gkl_ws(const kd_node *n, int threads) {
    (void)threads;
    return (size_t)n->in[0]->val.shape[0] * sizeof(double);
}

static void gkl_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const float *ms = n->in[0]->val.data, *ls = n->in[1]->val.data, *mt = n->in[2]->val.data,
                *lt = n->in[3]->val.data;
    int N = n->in[0]->val.shape[0], D = n->in[0]->val.shape[1];
    double *part = n->ws;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * D > PAR_WORK) schedule(static)
    for (int r = 0; r < N; r++) {
        double s = 0.0;
        for (int d = 0; d < D; d++) {
            size_t o = (size_t)r * D + d;
            double dm = (double)mt[o] - ms[o];
            s += 0.5 * ((double)ls[o] - lt[o] + (exp((double)lt[o]) + dm * dm) * exp(-(double)ls[o]) - 1.0);
        }
        part[r] = s;
    }
    n->val.data[0] = (float)(sum_ordered(part, N) / N);
}

/* With k = g/N, v = e^lv:
 *   dmu_s = k (mu_s - mu_t) / v_s,        dmu_t = -dmu_s
 *   dlv_s = k/2 (1 - (v_t + (mu_t - mu_s)^2) / v_s)
 *   dlv_t = k/2 (v_t / v_s - 1) */
static void gkl_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *Ms = n->in[0], *Ls = n->in[1], *Mt = n->in[2], *Lt = n->in[3];
    const float *ms = Ms->val.data, *ls = Ls->val.data, *mt = Mt->val.data, *lt = Lt->val.data;
    float *dms = need_grad(Ms) ? Ms->grad.data : NULL, *dls = need_grad(Ls) ? Ls->grad.data : NULL;
    float *dmt = need_grad(Mt) ? Mt->grad.data : NULL, *dlt = need_grad(Lt) ? Lt->grad.data : NULL;
    int N = Ms->val.shape[0], D = Ms->val.shape[1];
    double k = n->grad.data[0] / N;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * D > PAR_WORK) schedule(static)
    for (int64_t o = 0; o < (int64_t)N * D; o++) {
        double is = exp(-(double)ls[o]), vt = exp((double)lt[o]), dm = (double)ms[o] - mt[o];
        double gm = k * dm * is;
        if (dms) dms[o] += (float)gm;
        if (dmt) dmt[o] -= (float)gm;
        if (dls) dls[o] += (float)(0.5 * k * (1.0 - (vt + dm * dm) * is));
        if (dlt) dlt[o] += (float)(0.5 * k * (vt * is - 1.0));
    }
}

const kd_op_def kd_op_gauss_kl = {
    .name = "gauss_kl", .infer = gkl_infer, .workspace = gkl_ws, .forward = gkl_forward, .backward = gkl_backward};

/* ============================================================ builders */

kd_node *kd_haar2d(kd_graph *g, kd_node *x) { return kd_graph_add_op(g, KD_OP_HAAR2D, 1, &x); }

kd_node *kd_band_mse(kd_graph *g, kd_node *a, kd_node *b, int n_bands, const float *w) {
    KD_ASSERT(n_bands >= 1 && n_bands <= 8, "band_mse: %d bands", n_bands);
    int ip[8] = {n_bands};
    float fp[8] = {0};
    for (int k = 0; k < n_bands; k++) {
        KD_ASSERT(isfinite(w[k]), "band_mse: weight %d is %g", k, w[k]);
        fp[k] = w[k];
    }
    kd_node *in[2] = {a, b};
    return kd_graph_add_op_ex(g, KD_OP_BAND_MSE, 2, in, ip, fp);
}

kd_node *kd_attn_mask(kd_graph *g, kd_node *fs, kd_node *ft, float tau, int detach) {
    KD_ASSERT(tau > 0.0f && isfinite(tau), "attn_mask: tau %g", tau);
    int ip[8] = {detach != 0};
    float fp[8] = {tau};
    kd_node *in[2] = {fs, ft};
    return kd_graph_add_op_ex(g, KD_OP_ATTN_MASK, 2, in, ip, fp);
}

kd_node *kd_masked_mse(kd_graph *g, kd_node *a, kd_node *b, kd_node *m) {
    kd_node *in[3] = {a, b, m};
    return kd_graph_add_op(g, KD_OP_MASKED_MSE, 3, in);
}

kd_node *kd_gauss_kl(kd_graph *g, kd_node *mu_s, kd_node *lv_s, kd_node *mu_t, kd_node *lv_t) {
    kd_node *in[4] = {mu_s, lv_s, mu_t, lv_t};
    return kd_graph_add_op(g, KD_OP_GAUSS_KL, 4, in);
}
