/* textcls.c - the two ops of text classification with rationales
 * (docs/losses/rationale.md):
 *
 *   masked_mean(x, m)    x (B,T,C), m (B,T) -> (B,C):
 *                        y_b = sum_t m_bt x_bt / S_b,  S_b = sum_t m_bt
 *   token_bce(z, y, m)   z, y, m (B,T) -> scalar:
 *                        L = sum_bt m_bt l(z_bt, y_bt) / S,  S = sum_bt m_bt,
 *                        l(z, y) = max(z, 0) - z y + log(1 + exp(-|z|))
 *
 * A row (masked_mean) or a batch (token_bce) whose weights sum to 0 gives
 * 0 and no gradient. Derivations:
 *   masked_mean: dx_bt = m_bt dy_b / S_b;  dm_bt = dy_b . (x_bt - y_b) / S_b
 *   token_bce:   dz = g m (sigmoid(z) - y) / S;  dy = -g m z / S;
 *                dm = g (l - L) / S
 * Sums that decide a value run in double per row, then over rows in order,
 * so results do not depend on the thread count. Deliberately not here: a
 * positive-class weight (pos_weight) or label smoothing for the tags.
 */
#include <math.h>
#include <string.h>

#include "kd_textcls.h"
#include "ops/ops.h"

#define PAR_WORK 32768

static int need_grad(const kd_node *u) { return (u->flags & KD_F_NEED_GRAD) != 0; }

/* ============================================================ masked_mean */

static kd_status mmean_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val, *m = &n->in[1]->val;
    if (x->ndim != 3) return kd_op_shape_error(n, "masked_mean needs x (B, T, C)");
    if (m->ndim != 2 || m->shape[0] != x->shape[0] || m->shape[1] != x->shape[1])
        return kd_op_shape_error(n, "masked_mean needs a mask (B, T) matching x (B, T, C)");
    n->val.ndim = 2;
    n->val.shape[0] = x->shape[0];
    n->val.shape[1] = x->shape[2];
    return KD_OK;
}

/* out (B,C), x (B,T,C), m (B,T) */
static void mmean_kernel(float *out, const float *x, const float *m, int B, int T, int C, int threads) {
    (void)threads; /* unused without OpenMP */
#pragma omp parallel for num_threads(threads) if ((int64_t)B * T * C > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        double S = 0.0;
        for (int t = 0; t < T; t++) S += m[(size_t)b * T + t];
        float *y = out + (size_t)b * C;
        for (int c = 0; c < C; c++) {
            double s = 0.0;
            for (int t = 0; t < T; t++) s += (double)m[(size_t)b * T + t] * x[((size_t)b * T + t) * C + c];
            y[c] = S != 0.0 ? (float)(s / S) : 0.0f;
        }
    }
}

static void mmean_forward(kd_node *n, const kd_ctx *ctx) {
    const kd_tensor *X = &n->in[0]->val;
    mmean_kernel(n->val.data, X->data, n->in[1]->val.data, X->shape[0], X->shape[1], X->shape[2], ctx->threads);
}

static void mmean_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *Xn = n->in[0], *Mn = n->in[1];
    float *dx = need_grad(Xn) ? Xn->grad.data : NULL, *dm = need_grad(Mn) ? Mn->grad.data : NULL;
    if (!dx && !dm) return;
    const float *x = Xn->val.data, *m = Mn->val.data, *y = n->val.data, *dy = n->grad.data;
    int B = Xn->val.shape[0], T = Xn->val.shape[1], C = Xn->val.shape[2];
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)B * T * C > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        double S = 0.0;
        for (int t = 0; t < T; t++) S += m[(size_t)b * T + t];
        if (S == 0.0) continue;
        const float *g = dy + (size_t)b * C, *yb = y + (size_t)b * C;
        for (int t = 0; t < T; t++) {
            size_t o = ((size_t)b * T + t) * C;
            if (dx) {
                float w = (float)(m[(size_t)b * T + t] / S);
                for (int c = 0; c < C; c++) dx[o + c] += w * g[c];
            }
            if (dm) {
                double s = 0.0;
                for (int c = 0; c < C; c++) s += (double)g[c] * ((double)x[o + c] - yb[c]);
                dm[(size_t)b * T + t] += (float)(s / S);
            }
        }
    }
}

const kd_op_def kd_op_masked_mean = {
    .name = "masked_mean", .infer = mmean_infer, .forward = mmean_forward, .backward = mmean_backward};

/* ============================================================ token_bce
 * ws (double): per-row weighted sums (B) and weight sums (B). */

static kd_status tbce_infer(kd_node *n) {
    const kd_tensor *z = &n->in[0]->val, *y = &n->in[1]->val, *m = &n->in[2]->val;
    if (y->ndim != 2 || m->ndim != 2 || y->shape[0] != m->shape[0] || y->shape[1] != m->shape[1])
        return kd_op_shape_error(n, "token_bce needs targets and weights of one shape (B, T)");
    if (z->shape[0] != y->shape[0] || kd_numel(z) != kd_numel(y))
        return kd_op_shape_error(n, "token_bce needs logits of B*T elements, the targets' (B, T)");
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static size_t tbce_ws(const kd_node *n, int threads) {
    (void)threads;
    return 2 * (size_t)n->in[1]->val.shape[0] * sizeof(double);
}

static inline double bce_term(double z, double y) { return (z > 0.0 ? z : 0.0) - z * y + log1p(exp(-fabs(z))); }

/* part (B) weighted losses and wsum (B) weights of each row; z, y, m (B,T) */
static void tbce_rows(double *part, double *wsum, const float *z, const float *y, const float *m, int B, int T,
                      int threads) {
    (void)threads;
#pragma omp parallel for num_threads(threads) if ((int64_t)B * T > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        double s = 0.0, w = 0.0;
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)b * T + t;
            if (m[i] == 0.0f) continue;
            s += (double)m[i] * bce_term(z[i], y[i]);
            w += m[i];
        }
        part[b] = s;
        wsum[b] = w;
    }
}

static void tbce_totals(const double *part, const double *wsum, int B, double *L, double *S) {
    double s = 0.0, w = 0.0;
    for (int b = 0; b < B; b++) {
        s += part[b];
        w += wsum[b];
    }
    *S = w;
    *L = w != 0.0 ? s / w : 0.0;
}

static void tbce_forward(kd_node *n, const kd_ctx *ctx) {
    const kd_tensor *Y = &n->in[1]->val;
    int B = Y->shape[0], T = Y->shape[1];
    double *part = n->ws, *wsum = part + B, L, S;
    tbce_rows(part, wsum, n->in[0]->val.data, Y->data, n->in[2]->val.data, B, T, ctx->threads);
    tbce_totals(part, wsum, B, &L, &S);
    n->val.data[0] = (float)L;
}

static void tbce_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *Zn = n->in[0], *Yn = n->in[1], *Mn = n->in[2];
    float *dz = need_grad(Zn) ? Zn->grad.data : NULL, *dy = need_grad(Yn) ? Yn->grad.data : NULL;
    float *dm = need_grad(Mn) ? Mn->grad.data : NULL;
    if (!dz && !dy && !dm) return;
    const float *z = Zn->val.data, *y = Yn->val.data, *m = Mn->val.data;
    int B = Yn->val.shape[0], T = Yn->val.shape[1];
    double *part = n->ws, *wsum = part + B, L, S;
    /* the forward's sums are still in the workspace */
    tbce_totals(part, wsum, B, &L, &S);
    if (S == 0.0) return;
    double k = n->grad.data[0] / S;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)B * T > PAR_WORK) schedule(static)
    for (int64_t i = 0; i < (int64_t)B * T; i++) {
        double zi = z[i];
        if (dz) {
            double p = zi >= 0.0 ? 1.0 / (1.0 + exp(-zi)) : exp(zi) / (1.0 + exp(zi));
            dz[i] += (float)(k * m[i] * (p - y[i]));
        }
        if (dy) dy[i] += (float)(-k * m[i] * zi);
        if (dm) dm[i] += (float)(k * (bce_term(zi, y[i]) - L));
    }
}

const kd_op_def kd_op_token_bce = {.name = "token_bce",
                                   .infer = tbce_infer,
                                   .workspace = tbce_ws,
                                   .forward = tbce_forward,
                                   .backward = tbce_backward};

/* ============================================================ builders */

kd_node *kd_masked_mean(kd_graph *g, kd_node *x, kd_node *m) {
    kd_node *in[2] = {x, m};
    return kd_graph_add_op(g, KD_OP_MASKED_MEAN, 2, in);
}

kd_node *kd_token_bce(kd_graph *g, kd_node *z, kd_node *y, kd_node *m) {
    kd_node *in[3] = {z, y, m};
    return kd_graph_add_op(g, KD_OP_TOKEN_BCE, 3, in);
}
