/* act.c - element-wise and layout ops: relu, gelu (exact erf form, as
 * torch.nn.GELU()), dropout (inverted: kept values scaled by 1/(1-p)), add,
 * scale, concat along dim 1, reshape.
 *
 * Loops over more than PAR_MIN elements run on OpenMP threads with a static
 * schedule; every element is computed independently, so results do not depend
 * on the thread count. Dropout draws its mask per row from a generator seeded
 * by (graph seed, step, node, row), so it is reproducible too.
 */
#include <math.h>
#include <string.h>

#include "ops/ops.h"

#define PAR_MIN 32768

static kd_status same_shape_infer(kd_node *n) {
    n->val = n->in[0]->val;
    n->val.data = NULL;
    for (int i = 1; i < n->n_in; i++) {
        const kd_tensor *a = &n->in[0]->val, *b = &n->in[i]->val;
        if (a->ndim != b->ndim || memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof(int)) != 0)
            return kd_op_shape_error(n, "inputs must have the same shape");
    }
    return KD_OK;
}

/* ---- relu */

/* Branch-free and restrict-qualified so the compiler vectorises them: with
 * random signs a branch mispredicts half the time. */
static void relu_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    const float *restrict x = n->in[0]->val.data;
    float *restrict y = n->val.data;
#pragma omp parallel for simd if (k > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < k; i++) y[i] = x[i] <= 0.0f ? 0.0f : x[i]; /* NaN propagates, as in PyTorch */
}

static void relu_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    const float *restrict y = n->val.data, *restrict dy = n->grad.data;
    float *restrict dx = n->in[0]->grad.data;
#pragma omp parallel for simd if (k > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < k; i++) dx[i] += y[i] > 0.0f ? dy[i] : 0.0f;
}

const kd_op_def kd_op_relu = {
    .name = "relu", .infer = same_shape_infer, .forward = relu_forward, .backward = relu_backward};

/* ---- gelu */

static void gelu_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    const float *x = n->in[0]->val.data;
    float *y = n->val.data;
#pragma omp parallel for if (k > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < k; i++) {
        float h = kd_exp_vec(-0.5f * x[i] * x[i]); /* exp(-u^2) with u = x/sqrt(2) is h */
        y[i] = 0.5f * x[i] * (1.0f + kd_erf_vec(x[i] * 0.70710678118654752f, h));
    }
}

static void gelu_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    const float *x = n->in[0]->val.data, *dy = n->grad.data;
    float *dx = n->in[0]->grad.data;
#pragma omp parallel for if (k > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < k; i++) {
        float h = kd_exp_vec(-0.5f * x[i] * x[i]);
        float cdf = 0.5f * (1.0f + kd_erf_vec(x[i] * 0.70710678118654752f, h));
        float pdf = 0.39894228040143268f * h;
        dx[i] += dy[i] * (cdf + x[i] * pdf);
    }
}

const kd_op_def kd_op_gelu = {
    .name = "gelu", .infer = same_shape_infer, .forward = gelu_forward, .backward = gelu_backward};

/* ---- dropout: ws holds the mask (0 or 1/(1-p)) for the max batch */

static size_t dropout_ws(const kd_node *n, int threads) {
    (void)threads;
    return (size_t)kd_numel(&n->val) * sizeof(float);
}

static void dropout_forward(kd_node *n, const kd_ctx *ctx) {
    int64_t k = kd_numel(&n->val);
    const float *x = n->in[0]->val.data;
    float *y = n->val.data, *mask = n->ws;
    float p = n->fp[0];
    if (!ctx->training || p <= 0.0f) {
        memcpy(y, x, (size_t)k * sizeof *y);
        for (int64_t i = 0; i < k; i++) mask[i] = 1.0f; /* a backward after this forward is the identity */
        return;
    }
    int rows = n->val.shape[0];
    int64_t inner = k / rows;
    float keep = 1.0f / (1.0f - p);
    uint64_t base = kd_hash64(ctx->seed ^ kd_hash64(ctx->step * 1315423911ull + (uint64_t)n->id));
#pragma omp parallel for if (k > PAR_MIN) schedule(static)
    for (int r = 0; r < rows; r++) {
        kd_rng rng;
        kd_rng_seed(&rng, base + (uint64_t)r);
        for (int64_t j = 0; j < inner; j++) {
            int64_t i = (int64_t)r * inner + j;
            mask[i] = kd_rng_uniform(&rng) >= p ? keep : 0.0f;
            y[i] = x[i] * mask[i];
        }
    }
}

static void dropout_backward(kd_node *n, const kd_ctx *ctx) {
    int64_t k = kd_numel(&n->val);
    const float *dy = n->grad.data, *mask = n->ws;
    float *dx = n->in[0]->grad.data;
    if (!ctx->training || n->fp[0] <= 0.0f) {
        for (int64_t i = 0; i < k; i++) dx[i] += dy[i];
        return;
    }
#pragma omp parallel for if (k > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < k; i++) dx[i] += dy[i] * mask[i];
}

const kd_op_def kd_op_dropout = {.name = "dropout",
                                 .infer = same_shape_infer,
                                 .workspace = dropout_ws,
                                 .forward = dropout_forward,
                                 .backward = dropout_backward};

/* ---- add */

static void add_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    const float *restrict a = n->in[0]->val.data, *restrict b = n->in[1]->val.data;
    float *restrict y = n->val.data;
#pragma omp parallel for simd if (k > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < k; i++) y[i] = a[i] + b[i];
}

static void add_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    const float *dy = n->grad.data;
    for (int j = 0; j < 2; j++) {
        if (!(n->in[j]->flags & KD_F_NEED_GRAD)) continue;
        float *restrict dx = n->in[j]->grad.data;
#pragma omp parallel for simd if (k > PAR_MIN) schedule(static)
        for (int64_t i = 0; i < k; i++) dx[i] += dy[i];
    }
}

const kd_op_def kd_op_add = {
    .name = "add", .infer = same_shape_infer, .forward = add_forward, .backward = add_backward};

/* ---- scale: y = fp[0] * x */

static void scale_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    const float *x = n->in[0]->val.data;
    float *y = n->val.data, s = n->fp[0];
    for (int64_t i = 0; i < k; i++) y[i] = s * x[i];
}

static void scale_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    const float *dy = n->grad.data;
    float *dx = n->in[0]->grad.data, s = n->fp[0];
    for (int64_t i = 0; i < k; i++) dx[i] += s * dy[i];
}

const kd_op_def kd_op_scale = {
    .name = "scale", .infer = same_shape_infer, .forward = scale_forward, .backward = scale_backward};

/* ---- concat along dim 1: a (B, Ca, ...), b (B, Cb, ...) -> (B, Ca+Cb, ...) */

static kd_status concat_infer(kd_node *n) {
    const kd_tensor *a = &n->in[0]->val, *b = &n->in[1]->val;
    if (a->ndim < 2 || a->ndim != b->ndim || a->shape[0] != b->shape[0])
        return kd_op_shape_error(n, "concat needs two tensors of the same rank >= 2 and batch");
    for (int i = 2; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return kd_op_shape_error(n, "concat: dims after 1 must agree");
    n->val = *a;
    n->val.data = NULL;
    n->val.shape[1] = a->shape[1] + b->shape[1];
    return KD_OK;
}

static void concat_copy(kd_node *n, int backward) {
    const kd_tensor *a = &n->in[0]->val, *b = &n->in[1]->val;
    int B = a->shape[0];
    int64_t na = kd_numel(a) / B, nb = kd_numel(b) / B;
    for (int r = 0; r < B; r++) {
        float *y = (backward ? n->grad.data : n->val.data) + (size_t)r * (size_t)(na + nb);
        if (!backward) {
            memcpy(y, a->data + (size_t)r * na, (size_t)na * sizeof *y);
            memcpy(y + na, b->data + (size_t)r * nb, (size_t)nb * sizeof *y);
            continue;
        }
        if (n->in[0]->flags & KD_F_NEED_GRAD)
            for (int64_t i = 0; i < na; i++) n->in[0]->grad.data[(size_t)r * na + i] += y[i];
        if (n->in[1]->flags & KD_F_NEED_GRAD)
            for (int64_t i = 0; i < nb; i++) n->in[1]->grad.data[(size_t)r * nb + i] += y[na + i];
    }
}

static void concat_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    concat_copy(n, 0);
}
static void concat_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    concat_copy(n, 1);
}

const kd_op_def kd_op_concat = {
    .name = "concat", .infer = concat_infer, .forward = concat_forward, .backward = concat_backward};

/* ---- reshape: ip[0..3] target shape (ip[0] replaced by the batch), ip[4] ndim */

static kd_status reshape_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    n->val.ndim = n->ip[4];
    n->val.shape[0] = x->shape[0];
    for (int i = 1; i < n->ip[4]; i++) n->val.shape[i] = n->ip[i];
    if (kd_numel(&n->val) != kd_numel(x)) return kd_op_shape_error(n, "reshape changes the number of elements");
    return KD_OK;
}

static void reshape_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    memcpy(n->val.data, n->in[0]->val.data, (size_t)kd_numel(&n->val) * sizeof(float));
}

static void reshape_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int64_t k = kd_numel(&n->val);
    float *dx = n->in[0]->grad.data;
    const float *dy = n->grad.data;
    for (int64_t i = 0; i < k; i++) dx[i] += dy[i];
}

const kd_op_def kd_op_reshape = {
    .name = "reshape", .infer = reshape_infer, .forward = reshape_forward, .backward = reshape_backward};

/* ---- builders */

static kd_node *unary(kd_graph *g, int op, kd_node *x) { return kd_graph_add_op(g, op, 1, &x); }

kd_node *kd_relu(kd_graph *g, kd_node *x) { return unary(g, KD_OP_RELU, x); }
kd_node *kd_gelu(kd_graph *g, kd_node *x) { return unary(g, KD_OP_GELU, x); }

kd_node *kd_dropout(kd_graph *g, kd_node *x, float p) {
    KD_ASSERT(p >= 0.0f && p < 1.0f, "dropout p=%g", p);
    kd_node *n = unary(g, KD_OP_DROPOUT, x);
    n->fp[0] = p;
    return n;
}

kd_node *kd_scale(kd_graph *g, kd_node *x, float s) {
    kd_node *n = unary(g, KD_OP_SCALE, x);
    n->fp[0] = s;
    return n;
}

kd_node *kd_add(kd_graph *g, kd_node *a, kd_node *b) {
    kd_node *in[2] = {a, b};
    return kd_graph_add_op(g, KD_OP_ADD, 2, in);
}

kd_node *kd_concat(kd_graph *g, kd_node *a, kd_node *b) {
    kd_node *in[2] = {a, b};
    return kd_graph_add_op(g, KD_OP_CONCAT, 2, in);
}

kd_node *kd_reshape(kd_graph *g, kd_node *x, int ndim, const int *shape) {
    KD_ASSERT(ndim >= 1 && ndim <= KD_MAX_DIM, "reshape ndim %d", ndim);
    int ip[8] = {0};
    for (int i = 1; i < ndim; i++) ip[i] = shape[i];
    ip[4] = ndim;
    return kd_graph_add_op_ex(g, KD_OP_RESHAPE, 1, &x, ip, NULL);
}

kd_node *kd_flatten(kd_graph *g, kd_node *x) {
    int shape[2] = {x->val.shape[0], (int)(kd_numel(&x->val) / x->val.shape[0])};
    return kd_reshape(g, x, 2, shape);
}
