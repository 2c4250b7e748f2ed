/* loss.c - softmax, log-softmax (over the last dim), cross-entropy fused with
 * log-softmax, and the mean/sum reductions.
 *
 * Normalisers use max-subtracted log-sum-exp; sums that decide a loss are
 * accumulated in double, row by row in a fixed order, so the value does not
 * depend on the thread count. Cross-entropy follows
 * torch.nn.CrossEntropyLoss(label_smoothing=eps): per row
 *   (1-eps) * -log p_y + eps * mean_k(-log p_k),
 * averaged over rows whose label is >= 0 (a negative label is ignored, like
 * ignore_index).
 */
#include <math.h>
#include <string.h>

#include "ops/ops.h"

double kd_row_lse(const float *x, int K, double invT) {
    float m = x[0];
    for (int k = 1; k < K; k++) m = x[k] > m ? x[k] : m;
    double ms = (double)m * invT, s = 0.0;
    for (int k = 0; k < K; k++) s += exp((double)x[k] * invT - ms);
    return ms + log(s);
}

static kd_status lastdim_infer(kd_node *n) {
    if (n->in[0]->val.ndim < 1) return kd_op_shape_error(n, "needs at least one dimension");
    n->val = n->in[0]->val;
    n->val.data = NULL;
    return KD_OK;
}

/* y (R,K) = softmax(x (R,K)), or log-softmax with log_out. exp by the
 * vectorised kd_exp_vec (relative error <= 7.9e-8, as expf); the row sum in
 * double, in a fixed (vector-width) order independent of the thread count. */
static void softmax_rows(float *y, const float *x, int R, int K, int log_out) {
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *xr = x + (size_t)r * K;
        float *yr = y + (size_t)r * K;
        float m = xr[0];
        for (int k = 1; k < K; k++) m = xr[k] > m ? xr[k] : m;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int k = 0; k < K; k++) s += (double)kd_exp_vec(xr[k] - m);
        if (log_out) {
            double lse = m + log(s); /* double: rounding m + log(s) to float costs digits when |m| is large */
            for (int k = 0; k < K; k++) yr[k] = (float)((double)xr[k] - lse);
        } else {
            float inv = (float)(1.0 / s);
            for (int k = 0; k < K; k++) yr[k] = kd_exp_vec(xr[k] - m) * inv;
        }
    }
}

static void softmax_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int K = n->val.shape[n->val.ndim - 1];
    softmax_rows(n->val.data, n->in[0]->val.data, (int)(kd_numel(&n->val) / K), K, 0);
}

static void softmax_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int K = n->val.shape[n->val.ndim - 1];
    int R = (int)(kd_numel(&n->val) / K);
    const float *y = n->val.data, *dy = n->grad.data;
    float *dx = n->in[0]->grad.data;
    for (int r = 0; r < R; r++) {
        size_t o = (size_t)r * K;
        double dot = 0.0;
        for (int k = 0; k < K; k++) dot += (double)dy[o + k] * y[o + k];
        for (int k = 0; k < K; k++) dx[o + k] += y[o + k] * (dy[o + k] - (float)dot);
    }
}

const kd_op_def kd_op_softmax = {
    .name = "softmax", .infer = lastdim_infer, .forward = softmax_forward, .backward = softmax_backward};

static void log_softmax_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int K = n->val.shape[n->val.ndim - 1];
    softmax_rows(n->val.data, n->in[0]->val.data, (int)(kd_numel(&n->val) / K), K, 1);
}

static void log_softmax_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int K = n->val.shape[n->val.ndim - 1];
    int R = (int)(kd_numel(&n->val) / K);
    const float *y = n->val.data, *dy = n->grad.data;
    float *dx = n->in[0]->grad.data;
    for (int r = 0; r < R; r++) {
        size_t o = (size_t)r * K;
        double s = 0.0;
        for (int k = 0; k < K; k++) s += dy[o + k];
        float sf = (float)s;
        for (int k = 0; k < K; k++) dx[o + k] += dy[o + k] - kd_exp_vec(y[o + k]) * sf;
    }
}

const kd_op_def kd_op_log_softmax = {.name = "log_softmax",
                                     .infer = lastdim_infer,
                                     .forward = log_softmax_forward,
                                     .backward = log_softmax_backward};

/* ---- cross-entropy: logits (R,K), labels (R) as floats -> (1).
 * ws: log-probabilities (R,K) for backward, then one float: rows kept. */

static kd_status ce_infer(kd_node *n) {
    const kd_tensor *z = &n->in[0]->val, *y = &n->in[1]->val;
    if (z->ndim < 1 || kd_numel(z) / z->shape[z->ndim - 1] != kd_numel(y))
        return kd_op_shape_error(n, "cross-entropy needs logits (R, K) and R labels");
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static size_t ce_ws(const kd_node *n, int threads) {
    (void)threads;
    return ((size_t)kd_numel(&n->in[0]->val) + 1) * sizeof(float);
}

static void ce_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *z = &n->in[0]->val;
    int K = z->shape[z->ndim - 1];
    int R = (int)(kd_numel(z) / K);
    float *logp = n->ws;
    const float *lab = n->in[1]->val.data;
    float eps = n->fp[0];
    softmax_rows(logp, z->data, R, K, 1);
    double total = 0.0;
    int kept = 0;
    for (int r = 0; r < R; r++) {
        int y = (int)lab[r];
        if (y < 0) continue;
        KD_ASSERT(y < K, "label %d out of range for %d classes in '%s'", y, K, n->name);
        const float *lr = logp + (size_t)r * K;
        double row = -(1.0 - eps) * lr[y];
        if (eps > 0.0f) {
            double s = 0.0;
            for (int k = 0; k < K; k++) s += lr[k];
            row -= eps * s / K;
        }
        total += row;
        kept++;
    }
    logp[(size_t)R * K] = (float)kept;
    n->val.data[0] = kept ? (float)(total / kept) : 0.0f;
}

static void ce_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *z = &n->in[0]->val;
    int K = z->shape[z->ndim - 1];
    int R = (int)(kd_numel(z) / K);
    const float *logp = n->ws, *lab = n->in[1]->val.data;
    int kept = (int)logp[(size_t)R * K];
    if (!kept) return;
    float g = n->grad.data[0] / (float)kept, eps = n->fp[0];
    float *dz = n->in[0]->grad.data, base = eps / (float)K;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        int y = (int)lab[r];
        if (y < 0) continue;
        size_t o = (size_t)r * K;
        for (int k = 0; k < K; k++) dz[o + k] += g * (kd_exp_vec(logp[o + k]) - base);
        dz[o + y] -= g * (1.0f - eps);
    }
}

const kd_op_def kd_op_cross_entropy = {.name = "cross_entropy",
                                       .infer = ce_infer,
                                       .workspace = ce_ws,
                                       .forward = ce_forward,
                                       .backward = ce_backward};

/* ---- mean and sum of all elements -> (1) */

static kd_status scalar_infer(kd_node *n) {
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static double sum_all(const kd_tensor *t) {
    double s = 0.0;
    int64_t k = kd_numel(t);
    for (int64_t i = 0; i < k; i++) s += t->data[i];
    return s;
}

static void mean_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    n->val.data[0] = (float)(sum_all(&n->in[0]->val) / (double)kd_numel(&n->in[0]->val));
}

static void sum_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    n->val.data[0] = (float)sum_all(&n->in[0]->val);
}

static void reduce_backward(kd_node *n, float scale) {
    int64_t k = kd_numel(&n->in[0]->val);
    float g = n->grad.data[0] * scale, *dx = n->in[0]->grad.data;
    for (int64_t i = 0; i < k; i++) dx[i] += g;
}

static void mean_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    reduce_backward(n, 1.0f / (float)kd_numel(&n->in[0]->val));
}

static void sum_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    reduce_backward(n, 1.0f);
}

const kd_op_def kd_op_mean = {.name = "mean", .infer = scalar_infer, .forward = mean_forward, .backward = mean_backward};
const kd_op_def kd_op_sum = {.name = "sum", .infer = scalar_infer, .forward = sum_forward, .backward = sum_backward};

/* ---- builders */

kd_node *kd_softmax(kd_graph *g, kd_node *x) { return kd_graph_add_op(g, KD_OP_SOFTMAX, 1, &x); }
kd_node *kd_log_softmax(kd_graph *g, kd_node *x) { return kd_graph_add_op(g, KD_OP_LOG_SOFTMAX, 1, &x); }
kd_node *kd_mean(kd_graph *g, kd_node *x) { return kd_graph_add_op(g, KD_OP_MEAN, 1, &x); }
kd_node *kd_sum(kd_graph *g, kd_node *x) { return kd_graph_add_op(g, KD_OP_SUM, 1, &x); }

kd_node *kd_cross_entropy(kd_graph *g, kd_node *logits, kd_node *labels, float smoothing) {
    KD_ASSERT(smoothing >= 0.0f && smoothing < 1.0f, "label smoothing %g", smoothing);
    kd_node *in[2] = {logits, labels};
    float fp[8] = {smoothing};
    return kd_graph_add_op_ex(g, KD_OP_CROSS_ENTROPY, 2, in, NULL, fp);
}
