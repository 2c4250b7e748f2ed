/* pool.c - max pooling, average pooling (no padding, floor mode, as
 * torch.nn.MaxPool2d/AvgPool2d with default padding), and global average
 * pooling (B,C,H,W) -> (B,C).
 *
 * Max pooling saves the argmax of each window (int32, in the workspace) so
 * backward is a scatter; ties go to the first element in row-major order,
 * like PyTorch. ip: [0] kernel, [1] stride.
 */
#include <math.h>
#include <string.h>

#include "ops/ops.h"

static kd_status pool_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    int k = n->ip[0], s = n->ip[1];
    if (x->ndim != 4) return kd_op_shape_error(n, "pooling needs (B, C, H, W)");
    if (x->shape[2] < k || x->shape[3] < k) return kd_op_shape_error(n, "pooling window larger than the input");
    n->val.ndim = 4;
    n->val.shape[0] = x->shape[0];
    n->val.shape[1] = x->shape[1];
    n->val.shape[2] = (x->shape[2] - k) / s + 1;
    n->val.shape[3] = (x->shape[3] - k) / s + 1;
    return KD_OK;
}

/* ws: the argmax of each window as its position i*k+j inside the window,
 * one byte each (windows up to 16x16) instead of a 4-byte input index: the
 * reference teacher's first pooling alone saves 9.6 MB at batch 128 */
static size_t maxpool_ws(const kd_node *n, int threads) {
    (void)threads;
    KD_ASSERT(n->ip[0] <= 16, "max pooling window %d > 16", n->ip[0]);
    return (size_t)kd_numel(&n->val);
}

static void maxpool_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val;
    int BC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    int OH = n->val.shape[2], OW = n->val.shape[3], k = n->ip[0], s = n->ip[1];
    uint8_t *arg = n->ws;
#pragma omp parallel for if ((int64_t)BC * H * W > 32768) schedule(static)
    for (int p = 0; p < BC; p++) {
        const float *xp = x->data + (size_t)p * H * W;
        float *yp = n->val.data + (size_t)p * OH * OW;
        uint8_t *ap = arg + (size_t)p * OH * OW;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                const float *w0 = xp + (size_t)(oh * s) * W + ow * s;
                float m = w0[0];
                int best = 0;
                if (k == 2) { /* the common case, unrolled */
                    if (w0[1] > m || isnan(w0[1])) m = w0[1], best = 1;
                    if (w0[W] > m || isnan(w0[W])) m = w0[W], best = 2;
                    if (w0[W + 1] > m || isnan(w0[W + 1])) m = w0[W + 1], best = 3;
                } else {
                    for (int i = 0; i < k; i++)
                        for (int j = 0; j < k; j++) {
                            float v = w0[(size_t)i * W + j];
                            /* first maximum in row-major order; NaN propagates, as in PyTorch */
                            if (v > m || (isnan(v) && !isnan(m))) m = v, best = i * k + j;
                        }
                }
                if (isnan(w0[0])) m = w0[0], best = 0;
                yp[oh * OW + ow] = m;
                ap[oh * OW + ow] = (uint8_t)best;
            }
    }
}

static void maxpool_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val;
    int BC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    int OH = n->val.shape[2], OW = n->val.shape[3], k = n->ip[0], s = n->ip[1];
    const uint8_t *arg = n->ws;
    float *dx = n->in[0]->grad.data;
    const float *dy = n->grad.data;
#pragma omp parallel for if ((int64_t)BC * H * W > 32768) schedule(static)
    for (int p = 0; p < BC; p++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                size_t o = ((size_t)p * OH + oh) * OW + ow;
                int i = arg[o] / k, j = arg[o] % k;
                dx[(size_t)p * H * W + (size_t)(oh * s + i) * W + ow * s + j] += dy[o];
            }
}

const kd_op_def kd_op_maxpool = {.name = "maxpool",
                                 .infer = pool_infer,
                                 .workspace = maxpool_ws,
                                 .forward = maxpool_forward,
                                 .backward = maxpool_backward};

static void avgpool_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val;
    int BC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    int OH = n->val.shape[2], OW = n->val.shape[3], k = n->ip[0], s = n->ip[1];
    float inv = 1.0f / (float)(k * k);
#pragma omp parallel for if ((int64_t)BC * H * W > 32768) schedule(static)
    for (int p = 0; p < BC; p++) {
        const float *xp = x->data + (size_t)p * H * W;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                float acc = 0.0f;
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++) acc += xp[(oh * s + i) * W + ow * s + j];
                n->val.data[((size_t)p * OH + oh) * OW + ow] = acc * inv;
            }
    }
}

static void avgpool_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val;
    int BC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    int OH = n->val.shape[2], OW = n->val.shape[3], k = n->ip[0], s = n->ip[1];
    float inv = 1.0f / (float)(k * k);
    float *dx = n->in[0]->grad.data;
#pragma omp parallel for if ((int64_t)BC * H * W > 32768) schedule(static)
    for (int p = 0; p < BC; p++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                float g = n->grad.data[((size_t)p * OH + oh) * OW + ow] * inv;
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++) dx[(size_t)p * H * W + (oh * s + i) * W + ow * s + j] += g;
            }
}

const kd_op_def kd_op_avgpool = {
    .name = "avgpool", .infer = pool_infer, .forward = avgpool_forward, .backward = avgpool_backward};

static kd_status gap_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    if (x->ndim != 4) return kd_op_shape_error(n, "global average pooling needs (B, C, H, W)");
    n->val.ndim = 2;
    n->val.shape[0] = x->shape[0];
    n->val.shape[1] = x->shape[1];
    return KD_OK;
}

static void gap_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val;
    int BC = x->shape[0] * x->shape[1], HW = x->shape[2] * x->shape[3];
    for (int p = 0; p < BC; p++) {
        double acc = 0.0;
        for (int i = 0; i < HW; i++) acc += x->data[(size_t)p * HW + i];
        n->val.data[p] = (float)(acc / HW);
    }
}

static void gap_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val;
    int BC = x->shape[0] * x->shape[1], HW = x->shape[2] * x->shape[3];
    float *dx = n->in[0]->grad.data;
    for (int p = 0; p < BC; p++) {
        float g = n->grad.data[p] / (float)HW;
        for (int i = 0; i < HW; i++) dx[(size_t)p * HW + i] += g;
    }
}

const kd_op_def kd_op_gap = {.name = "global_avgpool", .infer = gap_infer, .forward = gap_forward, .backward = gap_backward};

static kd_node *pool(kd_graph *g, int op, kd_node *x, int k, int stride) {
    KD_ASSERT(k >= 1 && stride >= 1, "pool k %d stride %d", k, stride);
    int ip[8] = {k, stride};
    return kd_graph_add_op_ex(g, op, 1, &x, ip, NULL);
}

kd_node *kd_maxpool2d(kd_graph *g, kd_node *x, int k, int stride) { return pool(g, KD_OP_MAXPOOL, x, k, stride); }
kd_node *kd_avgpool2d(kd_graph *g, kd_node *x, int k, int stride) { return pool(g, KD_OP_AVGPOOL, x, k, stride); }
kd_node *kd_global_avgpool(kd_graph *g, kd_node *x) { return kd_graph_add_op(g, KD_OP_GAP, 1, &x); }
