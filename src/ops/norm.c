/* norm.c - batch normalisation over (B,C) or (B,C,H,W), as torch.nn.BatchNorm.
 *
 * Training: per-channel mean and biased variance of the batch normalise x;
 * running_mean/var move by `momentum` toward the batch mean and the
 * *unbiased* variance, and num_batches_tracked counts steps (PyTorch's
 * semantics exactly). Eval (or a frozen teacher): the running statistics.
 * Inputs: x, gamma, beta, running_mean, running_var, num_batches_tracked.
 * fp: [0] momentum, [1] eps. ws: mean (C), invstd (C), mode flag.
 *
 * Backward in training mode (xhat = (x - mean) * invstd, N = B*H*W):
 *   dx = invstd/N * (N*g*dy - sum(g*dy) - xhat * sum(g*dy*xhat)),
 * in eval mode dx = g * invstd * dy. Channels run on OpenMP threads.
 * ip[0] = 1 fuses a ReLU after the normalisation (kd_bn_relu): one pass over
 * memory instead of two, and no separate buffer for the pre-ReLU value.
 */
#include <math.h>
#include <string.h>

#include "ops/ops.h"

static kd_status bn_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    if (x->ndim != 2 && x->ndim != 4) return kd_op_shape_error(n, "batch norm needs (B, C) or (B, C, H, W)");
    for (int i = 1; i < 5; i++)
        if (n->in[i]->val.ndim != 1 || n->in[i]->val.shape[0] != x->shape[1])
            return kd_op_shape_error(n, "batch norm parameters must be (C)");
    n->val = *x;
    n->val.data = NULL;
    return KD_OK;
}

static size_t bn_ws(const kd_node *n, int threads) {
    (void)threads;
    return (2 * (size_t)n->in[0]->val.shape[1] + 1) * sizeof(float);
}

static void bn_forward(kd_node *n, const kd_ctx *ctx) {
    const kd_tensor *x = &n->in[0]->val;
    int B = x->shape[0], C = x->shape[1], S = x->ndim == 4 ? x->shape[2] * x->shape[3] : 1;
    const float *gamma = n->in[1]->val.data, *beta = n->in[2]->val.data;
    float *rm = n->in[3]->val.data, *rv = n->in[4]->val.data;
    float *mean = n->ws, *invstd = mean + C;
    float mom = n->fp[0], eps = n->fp[1];
    int train = ctx->training, relu = n->ip[0];
    invstd[C] = (float)train; /* mode flag, read by backward */
    long N = (long)B * S;
#pragma omp parallel for if ((int64_t)N * C > 32768) schedule(static)
    for (int c = 0; c < C; c++) {
        float m, is;
        if (train) {
            /* one pass: sum and sum of squares in double (float inputs, so
             * E[x^2] - E[x]^2 keeps ~9 digits unless |mean|/std > 1e4) */
            double s = 0.0, ss = 0.0;
            for (int b = 0; b < B; b++) {
                const float *restrict p = x->data + ((size_t)b * C + c) * S;
#pragma omp simd reduction(+ : s, ss)
                for (int i = 0; i < S; i++) {
                    s += p[i];
                    ss += (double)p[i] * p[i];
                }
            }
            double mu = s / N, var = ss / N - mu * mu;
            if (var < 0.0) var = 0.0;
            m = (float)mu;
            is = (float)(1.0 / sqrt(var + eps));
            rm[c] = (1.0f - mom) * rm[c] + mom * m;
            rv[c] = (1.0f - mom) * rv[c] + mom * (float)(N > 1 ? var * N / (N - 1) : var);
        } else {
            m = rm[c];
            is = 1.0f / sqrtf(rv[c] + eps);
        }
        mean[c] = m;
        invstd[c] = is;
        float a = gamma[c] * is, bb = beta[c] - m * a;
        for (int b = 0; b < B; b++) {
            const float *restrict p = x->data + ((size_t)b * C + c) * S;
            float *restrict y = n->val.data + ((size_t)b * C + c) * S;
            if (relu) {
#pragma omp simd
                for (int i = 0; i < S; i++) y[i] = fmaxf(p[i] * a + bb, 0.0f);
            } else {
#pragma omp simd
                for (int i = 0; i < S; i++) y[i] = p[i] * a + bb;
            }
        }
    }
    if (train) n->in[5]->val.data[0] += 1.0f;
}

/* With a fused ReLU the gradient reaching the normalisation is dy where the
 * output is positive and 0 elsewhere. */
static void bn_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *X = n->in[0], *G = n->in[1], *Be = n->in[2];
    const kd_tensor *x = &X->val;
    int B = x->shape[0], C = x->shape[1], S = x->ndim == 4 ? x->shape[2] * x->shape[3] : 1;
    const float *mean = n->ws, *invstd = mean + C, *gamma = G->val.data;
    const float *dyall = n->grad.data, *yall = n->val.data;
    int train = invstd[C] != 0.0f, relu = n->ip[0];
    long N = (long)B * S;
#pragma omp parallel for if ((int64_t)N * C > 32768) schedule(static)
    for (int c = 0; c < C; c++) {
        double sdy = 0.0, sdyx = 0.0;
        float m = mean[c], is = invstd[c];
        for (int b = 0; b < B; b++) {
            size_t o = ((size_t)b * C + c) * S;
            const float *restrict dy = dyall + o, *restrict xp = x->data + o, *restrict y = yall + o;
            float s1 = 0.0f, s2 = 0.0f; /* per-row partials in float, summed in double */
#pragma omp simd reduction(+ : s1, s2)
            for (int i = 0; i < S; i++) {
                float d = relu ? (y[i] > 0.0f ? dy[i] : 0.0f) : dy[i];
                s1 += d;
                s2 += d * (xp[i] - m);
            }
            sdy += s1;
            sdyx += (double)s2 * is;
        }
        if (G->flags & KD_F_NEED_GRAD) G->grad.data[c] += (float)sdyx;
        if (Be->flags & KD_F_NEED_GRAD) Be->grad.data[c] += (float)sdy;
        if (!(X->flags & KD_F_NEED_GRAD)) continue;
        float gi = gamma[c] * is;
        float k1 = train ? (float)(sdy / N) : 0.0f, k2 = train ? (float)(sdyx / N) * is : 0.0f;
        for (int b = 0; b < B; b++) {
            size_t o = ((size_t)b * C + c) * S;
            const float *restrict dy = dyall + o, *restrict xp = x->data + o, *restrict y = yall + o;
            float *restrict dx = X->grad.data + o;
#pragma omp simd
            for (int i = 0; i < S; i++) {
                float d = relu ? (y[i] > 0.0f ? dy[i] : 0.0f) : dy[i];
                dx[i] += gi * (d - k1 - (xp[i] - m) * k2);
            }
        }
    }
}

const kd_op_def kd_op_batchnorm = {
    .name = "batchnorm", .infer = bn_infer, .workspace = bn_ws, .forward = bn_forward, .backward = bn_backward};

kd_node *kd_batchnorm(kd_graph *g, kd_node *x, kd_node *gamma, kd_node *beta, kd_node *rmean, kd_node *rvar,
                      kd_node *nbt, float momentum, float eps) {
    kd_node *in[6] = {x, gamma, beta, rmean, rvar, nbt};
    float fp[8] = {momentum, eps};
    return kd_graph_add_op_ex(g, KD_OP_BATCHNORM, 6, in, NULL, fp);
}

static kd_node *bn_build(kd_graph *g, const char *prefix, kd_node *x, int relu) {
    int C = x->val.ndim >= 2 ? x->val.shape[1] : 1;
    int cs[1] = {C}, one[1] = {1};
    char name[96];
    snprintf(name, sizeof name, "%s.weight", prefix);
    kd_node *ga = kd_param(g, name, 1, cs, KD_INIT_ONE, C);
    snprintf(name, sizeof name, "%s.bias", prefix);
    kd_node *be = kd_param(g, name, 1, cs, KD_INIT_ZERO, C);
    snprintf(name, sizeof name, "%s.running_mean", prefix);
    kd_node *rm = kd_buffer(g, name, 1, cs, 0.0f);
    snprintf(name, sizeof name, "%s.running_var", prefix);
    kd_node *rv = kd_buffer(g, name, 1, cs, 1.0f);
    snprintf(name, sizeof name, "%s.num_batches_tracked", prefix);
    kd_node *nbt = kd_buffer(g, name, 1, one, 0.0f);
    nbt->flags |= KD_F_I64;
    kd_node *in[6] = {x, ga, be, rm, rv, nbt};
    int ip[8] = {relu};
    float fp[8] = {0.1f, 1e-5f};
    kd_node *y = kd_graph_add_op_ex(g, KD_OP_BATCHNORM, 6, in, ip, fp);
    kd_node_set_name(y, "%s", prefix);
    return y;
}

kd_node *kd_bn(kd_graph *g, const char *prefix, kd_node *x) { return bn_build(g, prefix, x, 0); }
kd_node *kd_bn_relu(kd_graph *g, const char *prefix, kd_node *x) { return bn_build(g, prefix, x, 1); }
