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

/* ws: per-channel sums (C*2 doubles), partial sums per (row, channel) for
 * the maximum batch (B*C*2 doubles), then mean (C), invstd (C) and the mode
 * flag as floats at the very end */
static size_t bn_ws(const kd_node *n, int threads) {
    (void)threads;
    size_t B = (size_t)n->in[0]->val.shape[0], C = (size_t)n->in[0]->val.shape[1];
    return (C + B * C) * 2 * sizeof(double) + (2 * C + 1) * sizeof(float);
}

typedef struct bn_geom {
    int B, C, S;
    long N;
    double *acc, *part;
    float *mean, *invstd;
} bn_geom;

static bn_geom bn_geom_of(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    bn_geom g = {.B = x->shape[0], .C = x->shape[1], .S = x->ndim == 4 ? x->shape[2] * x->shape[3] : 1};
    g.N = (long)g.B * g.S;
    g.acc = n->ws;
    g.part = g.acc + 2 * (size_t)g.C;
    /* the float area starts after the partials of the *maximum* batch */
    g.mean = (float *)((char *)n->ws + n->ws_bytes - (2 * (size_t)g.C + 1) * sizeof(float));
    g.invstd = g.mean + g.C;
    return g;
}

/* Memory is walked row by row ((b, c) planes of S contiguous floats), so
 * every pass streams; per-plane partial sums are reduced over b in a fixed
 * order, so results do not depend on the thread count. */
static void bn_forward(kd_node *n, const kd_ctx *ctx) {
    bn_geom q = bn_geom_of(n);
    const float *x = n->in[0]->val.data, *gamma = n->in[1]->val.data, *beta = n->in[2]->val.data;
    float *rm = n->in[3]->val.data, *rv = n->in[4]->val.data, *y = n->val.data;
    float mom = n->fp[0], eps = n->fp[1];
    int train = ctx->training, relu = n->ip[0], BC = q.B * q.C, S = q.S;
    q.invstd[q.C] = (float)train; /* mode flag, read by backward */
    if (train) {
#pragma omp parallel for if ((int64_t)BC * S > 32768) schedule(static)
        for (int r = 0; r < BC; r++) {
            const float *restrict p = x + (size_t)r * S;
            double s = 0.0, ss = 0.0;
#pragma omp simd reduction(+ : s, ss)
            for (int i = 0; i < S; i++) {
                s += p[i];
                ss += (double)p[i] * p[i];
            }
            q.part[2 * r] = s;
            q.part[2 * r + 1] = ss;
        }
        for (int c = 0; c < q.C; c++) {
            double s = 0.0, ss = 0.0;
            for (int b = 0; b < q.B; b++) {
                s += q.part[2 * ((size_t)b * q.C + c)];
                ss += q.part[2 * ((size_t)b * q.C + c) + 1];
            }
            /* E[x^2] - E[x]^2 in double from float inputs keeps ~9 digits
             * unless |mean|/std exceeds ~1e4 */
            double mu = s / q.N, var = ss / q.N - mu * mu;
            if (var < 0.0) var = 0.0;
            q.mean[c] = (float)mu;
            q.invstd[c] = (float)(1.0 / sqrt(var + eps));
            rm[c] = (1.0f - mom) * rm[c] + mom * (float)mu;
            rv[c] = (1.0f - mom) * rv[c] + mom * (float)(q.N > 1 ? var * q.N / (q.N - 1) : var);
        }
        n->in[5]->val.data[0] += 1.0f;
    } else {
        for (int c = 0; c < q.C; c++) {
            q.mean[c] = rm[c];
            q.invstd[c] = 1.0f / sqrtf(rv[c] + eps);
        }
    }
#pragma omp parallel for if ((int64_t)BC * S > 32768) schedule(static)
    for (int r = 0; r < BC; r++) {
        int c = r % q.C;
        float a = gamma[c] * q.invstd[c], bb = beta[c] - q.mean[c] * a;
        const float *restrict p = x + (size_t)r * S;
        float *restrict o = y + (size_t)r * S;
        if (relu) {
#pragma omp simd
            for (int i = 0; i < S; i++) {
                    float v = p[i] * a + bb;
                    o[i] = v <= 0.0f ? 0.0f : v;
                }
        } else {
#pragma omp simd
            for (int i = 0; i < S; i++) o[i] = p[i] * a + bb;
        }
    }
}

/* With a fused ReLU the gradient reaching the normalisation is dy where the
 * output is positive and 0 elsewhere. The row kernels take `relu` as a
 * compile-time constant (they are inlined twice) so both versions vectorise. */
static inline __attribute__((always_inline)) void bn_bwd_sums(float *s1o, float *s2o, const float *restrict dy,
                                                              const float *restrict xp, const float *restrict y,
                                                              float m, int S, const int relu) {
    float s1 = 0.0f, s2 = 0.0f; /* a plane's partials in float, summed over planes in double */
#pragma omp simd reduction(+ : s1, s2)
    for (int i = 0; i < S; i++) {
        float d = relu ? (y[i] > 0.0f ? dy[i] : 0.0f) : dy[i];
        s1 += d;
        s2 += d * (xp[i] - m);
    }
    *s1o = s1;
    *s2o = s2;
}

static inline __attribute__((always_inline)) void bn_bwd_dx(float *restrict dx, const float *restrict dy,
                                                            const float *restrict xp, const float *restrict y,
                                                            float m, float gi, float k1, float k2, int S,
                                                            const int relu, const int assign) {
#pragma omp simd
    for (int i = 0; i < S; i++) {
        float d = relu ? (y[i] > 0.0f ? dy[i] : 0.0f) : dy[i];
        float v = gi * (d - k1 - (xp[i] - m) * k2);
        dx[i] = assign ? v : dx[i] + v;
    }
}

static void bn_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    bn_geom q = bn_geom_of(n);
    kd_node *X = n->in[0], *G = n->in[1], *Be = n->in[2];
    const float *x = X->val.data, *gamma = G->val.data, *dyall = n->grad.data, *yall = n->val.data;
    int train = q.invstd[q.C] != 0.0f, relu = n->ip[0], BC = q.B * q.C, S = q.S;
#pragma omp parallel for if ((int64_t)BC * S > 32768) schedule(static)
    for (int r = 0; r < BC; r++) {
        size_t o = (size_t)r * S;
        float s1, s2, m = q.mean[r % q.C];
        if (relu)
            bn_bwd_sums(&s1, &s2, dyall + o, x + o, yall + o, m, S, 1);
        else
            bn_bwd_sums(&s1, &s2, dyall + o, x + o, yall + o, m, S, 0);
        q.part[2 * r] = s1;
        q.part[2 * r + 1] = s2;
    }
    /* per channel: sum(dy) and sum(dy * xhat) */
    double *acc = q.acc;
    for (int c = 0; c < q.C; c++) {
        double sdy = 0.0, sdyx = 0.0;
        for (int b = 0; b < q.B; b++) {
            sdy += q.part[2 * ((size_t)b * q.C + c)];
            sdyx += q.part[2 * ((size_t)b * q.C + c) + 1];
        }
        sdyx *= q.invstd[c];
        acc[2 * c] = sdy;
        acc[2 * c + 1] = sdyx;
        if (G->flags & KD_F_NEED_GRAD) G->grad.data[c] += (float)sdyx;
        if (Be->flags & KD_F_NEED_GRAD) Be->grad.data[c] += (float)sdy;
    }
    if (!(X->flags & KD_F_NEED_GRAD)) return;
    int fresh = kd_grad_take_fresh(X);
#pragma omp parallel for if ((int64_t)BC * S > 32768) schedule(static)
    for (int r = 0; r < BC; r++) {
        int c = r % q.C;
        float m = q.mean[c], is = q.invstd[c], gi = gamma[c] * is;
        float k1 = train ? (float)(acc[2 * c] / q.N) : 0.0f, k2 = train ? (float)(acc[2 * c + 1] / q.N) * is : 0.0f;
        size_t o = (size_t)r * S;
        float *dx = X->grad.data + o;
        if (relu && fresh)
            bn_bwd_dx(dx, dyall + o, x + o, yall + o, m, gi, k1, k2, S, 1, 1);
        else if (relu)
            bn_bwd_dx(dx, dyall + o, x + o, yall + o, m, gi, k1, k2, S, 1, 0);
        else if (fresh)
            bn_bwd_dx(dx, dyall + o, x + o, yall + o, m, gi, k1, k2, S, 0, 1);
        else
            bn_bwd_dx(dx, dyall + o, x + o, yall + o, m, gi, k1, k2, S, 0, 0);
    }
}

const kd_op_def kd_op_batchnorm = {
    .name = "batchnorm",
    .infer = bn_infer,
    .workspace = bn_ws,
    .forward = bn_forward,
    .backward = bn_backward,
    .grad_overwrite = 1};

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
