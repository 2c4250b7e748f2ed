/* feature2.c - ops for the second family of feature losses: VID's Gaussian
 * negative log-likelihood (vid_nll), row L2 normalisation (l2norm), CRD's
 * contrastive objectives (crd_infonce with in-batch negatives, crd_nce with
 * momentum memory banks), and the parts of Miles & Mikolajczyk's projector
 * recipe (bn_noaffine: batch norm without affine parameters or running
 * statistics; logsum: log of the summed |a - b|^alpha). SimKD and the
 * projector ensemble are compositions of existing ops (build_feat2.c).
 * Definitions: ../../shared/LOSSES.md and docs/losses/feature2.md; every op
 * is checked against tests/fixtures/gen_features2.py (own PyTorch code
 * following RepDistiller's VIDLoss/CRDLoss and the MM authors' recipe).
 *
 * Formulas (derivations of the backwards are above each backward):
 *   vid_nll(mu, t, a)  var_c = softplus(a0 + a_c) + eps;
 *                      loss = mean over all elements of
 *                             0.5 * ((mu - t)^2 / var_c + log var_c)
 *                      (RepDistiller's VIDLoss: pred_var = log(1+exp(a))+eps,
 *                      neg_log_prob = 0.5*((pred-target)^2/var + log var),
 *                      mean). a0 is a constant offset so that a parameter
 *                      initialised to 0 starts at softplus(a0)+eps = init_var.
 *   l2norm(x)          y_i = x_i / max(|x_i|, 1e-12) per row of (N, D)
 *   crd_infonce(zs,zt) A = zs zt^T / T;  loss = CE_rows(A, diag) + CE_cols(A, diag),
 *                      each the mean over N of -log softmax at the diagonal
 *                      (student anchors vs teacher keys, and vice versa)
 *   crd_nce(zs,zt,idx) RepDistiller's ContrastMemory + ContrastLoss, see the
 *                      block above its code
 *   bn_noaffine(x)     (x - mean_c) / sqrt(var_c + eps), batch statistics
 *                      (biased variance) over all dims but 1, in training and
 *                      eval alike (the loss has no inference-time use)
 *   logsum(a, b)       log(sum over all elements |a - b|^alpha)
 *
 * Deliberately not done: gradients into the CRD memory banks (buffers, as
 * in RepDistiller), running statistics for bn_noaffine. Sums that decide a
 * loss run in double and in a fixed order (per channel or per row), so the
 * results do not depend on the thread count. Nothing is allocated per step.
 */
#include <math.h>
#include <string.h>

#include "kd_distill.h"
#include "ops/ops.h"

#define PAR_WORK 32768
#define NORM_EPS 1e-12 /* F.normalize's clamp on a norm */
#define NCE_EPS 1e-7   /* RepDistiller's ContrastLoss eps */
#define CRD_SALT 0x6372645f6e6365ull

static kd_status scalar_out(kd_node *n) {
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static int need_grad(const kd_node *u) { return (u->flags & KD_F_NEED_GRAD) != 0; }
static int same_shape(const kd_tensor *a, const kd_tensor *b) {
    return a->ndim == b->ndim && memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof(int)) == 0;
}
static int64_t inner_of(const kd_tensor *t) { return t->ndim > 2 ? kd_numel(t) / ((int64_t)t->shape[0] * t->shape[1]) : 1; }

static double softplus(double x) { return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)); }
static double sigmoid(double x) { return x >= 0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x)); }

static double sum_ordered(const double *p, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += p[i];
    return s;
}

/* ============================================================ vid_nll
 * in: mu (N, C, ...), t (same), alpha (C); fp[0] a0, fp[1] eps.
 * ws (double): var (C), S_c = sum over N*inner of (mu - t)^2 (C). */

static kd_status vid_infer(kd_node *n) {
    const kd_tensor *m = &n->in[0]->val, *t = &n->in[1]->val, *a = &n->in[2]->val;
    if (m->ndim < 2 || !same_shape(m, t))
        return kd_op_shape_error(n, "vid_nll needs a mean and a target (N, C, ...) of the same shape");
    if (a->ndim != 1 || a->shape[0] != m->shape[1]) return kd_op_shape_error(n, "vid_nll: alpha must be (C)");
    return scalar_out(n);
}

static size_t vid_ws(const kd_node *n, int threads) {
    (void)threads;
    return 2 * (size_t)n->in[0]->val.shape[1] * sizeof(double);
}

static void vid_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *m = &n->in[0]->val;
    const float *mu = m->data, *t = n->in[1]->val.data, *a = n->in[2]->val.data;
    int N = m->shape[0], C = m->shape[1];
    int64_t I = inner_of(m);
    double *var = n->ws, *S = var + C;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * C * I > PAR_WORK) schedule(static)
    for (int c = 0; c < C; c++) {
        double s = 0.0;
        for (int b = 0; b < N; b++) {
            size_t o = ((size_t)b * C + c) * I;
            for (int64_t i = 0; i < I; i++) {
                double d = (double)mu[o + i] - t[o + i];
                s += d * d;
            }
        }
        S[c] = s;
        var[c] = softplus((double)n->fp[0] + a[c]) + n->fp[1];
    }
    double cnt = (double)N * I, tot = 0.0;
    for (int c = 0; c < C; c++) tot += 0.5 * (S[c] / var[c] + cnt * log(var[c]));
    n->val.data[0] = (float)(tot / (cnt * C));
}

/* With M = N*C*inner elements and g the upstream gradient:
 *   dmu = g (mu - t) / (var_c M),  dt = -dmu,
 *   dvar_c = g/(2M) (cnt / var_c - S_c / var_c^2),  cnt = N*inner,
 *   dalpha_c = dvar_c * sigmoid(a0 + alpha_c)   (softplus' = sigmoid). */
static void vid_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *Mu = n->in[0], *Tn = n->in[1], *A = n->in[2];
    const float *mu = Mu->val.data, *t = Tn->val.data, *a = A->val.data;
    int N = Mu->val.shape[0], C = Mu->val.shape[1];
    int64_t I = inner_of(&Mu->val);
    const double *var = n->ws, *S = var + C;
    double g = n->grad.data[0], M = (double)N * C * I, cnt = (double)N * I;
    float *dm = need_grad(Mu) ? Mu->grad.data : NULL, *dt = need_grad(Tn) ? Tn->grad.data : NULL;
    if (dm || dt) {
#pragma omp parallel for num_threads(ctx->threads) if (M > PAR_WORK) schedule(static)
        for (int b = 0; b < N; b++)
            for (int c = 0; c < C; c++) {
                double k = g / (var[c] * M);
                size_t o = ((size_t)b * C + c) * I;
                for (int64_t i = 0; i < I; i++) {
                    double d = k * ((double)mu[o + i] - t[o + i]);
                    if (dm) dm[o + i] += (float)d;
                    if (dt) dt[o + i] -= (float)d;
                }
            }
    }
    if (need_grad(A))
        for (int c = 0; c < C; c++) {
            double dv = g / (2.0 * M) * (cnt / var[c] - S[c] / (var[c] * var[c]));
            A->grad.data[c] += (float)(dv * sigmoid((double)n->fp[0] + a[c]));
        }
}

const kd_op_def kd_op_vid_nll = {
    .name = "vid_nll", .infer = vid_infer, .workspace = vid_ws, .forward = vid_forward, .backward = vid_backward};

/* ============================================================ l2norm
 * x (N, ...) viewed as (N, D) -> same shape; ws: row norms r (N), double. */

static kd_status l2norm_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    if (x->ndim < 2) return kd_op_shape_error(n, "l2norm needs rows (N, D)");
    n->val = *x;
    n->val.data = NULL;
    return KD_OK;
}

static size_t l2norm_ws(const kd_node *n, int threads) {
    (void)threads;
    return (size_t)n->in[0]->val.shape[0] * sizeof(double);
}

static void l2norm_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *X = &n->in[0]->val;
    int N = X->shape[0];
    int64_t D = kd_numel(X) / N;
    double *r = n->ws;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * D > PAR_WORK) schedule(static)
    for (int i = 0; i < N; i++) {
        const float *x = X->data + (size_t)i * D;
        float *y = n->val.data + (size_t)i * D;
        double ss = 0.0;
        for (int64_t d = 0; d < D; d++) ss += (double)x[d] * x[d];
        r[i] = sqrt(ss);
        double inv = 1.0 / fmax(r[i], NORM_EPS);
        for (int64_t d = 0; d < D; d++) y[d] = (float)(x[d] * inv);
    }
}

/* y = x / |x|:  dx = (dy - y (y . dy)) / |x|   (dy / eps where clamped);
 * y . dy is taken with y = x / |x| in double, not the rounded output */
static void l2norm_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *Xn = n->in[0];
    if (!need_grad(Xn)) return;
    int N = Xn->val.shape[0];
    int64_t D = kd_numel(&Xn->val) / N;
    const double *r = n->ws;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * D > PAR_WORK) schedule(static)
    for (int i = 0; i < N; i++) {
        const float *x = Xn->val.data + (size_t)i * D, *dy = n->grad.data + (size_t)i * D;
        float *dx = Xn->grad.data + (size_t)i * D;
        if (!(r[i] > NORM_EPS)) {
            for (int64_t d = 0; d < D; d++) dx[d] += (float)(dy[d] / NORM_EPS);
            continue;
        }
        double dot = 0.0;
        for (int64_t d = 0; d < D; d++) dot += (double)x[d] * dy[d];
        dot /= r[i];
        for (int64_t d = 0; d < D; d++) dx[d] += (float)((dy[d] - x[d] / r[i] * dot) / r[i]);
    }
}

const kd_op_def kd_op_l2norm = {.name = "l2norm",
                                .infer = l2norm_infer,
                                .workspace = l2norm_ws,
                                .forward = l2norm_forward,
                                .backward = l2norm_backward};

/* ------------------------------------------------------------ shared kernels */

/* dot product of two float rows in double */
static inline double dotf(const float *a, const float *b, int D) {
    double s = 0.0;
    for (int d = 0; d < D; d++) s += (double)a[d] * b[d];
    return s;
}

/* ============================================================ crd_infonce
 * zs, zt (N, D); fp[0] T. A_ij = zs_i . zt_j / T.
 *   loss = 1/N sum_i (lse_j A_ij - A_ii) + 1/N sum_j (lse_i A_ij - A_jj)
 * ws (double): A, W (N*N each), row lse (N), column lse (N), parts (2N). */

static kd_status pair_rows_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    if (s->ndim != 2 || !same_shape(s, t))
        return kd_op_shape_error(n, "needs student and teacher embeddings (N, D) of the same shape");
    return scalar_out(n);
}

static size_t infonce_ws(const kd_node *n, int threads) {
    (void)threads;
    size_t N = (size_t)n->in[0]->val.shape[0];
    return (2 * N * N + 4 * N) * sizeof(double);
}

static void infonce_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const float *zs = n->in[0]->val.data, *zt = n->in[1]->val.data;
    int N = n->in[0]->val.shape[0], D = n->in[0]->val.shape[1];
    double invT = 1.0 / n->fp[0];
    double *A = n->ws, *lr = A + 2 * (size_t)N * N, *lc = lr + N, *part = lc + N;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * N * D > PAR_WORK) schedule(static)
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) A[(size_t)i * N + j] = dotf(zs + (size_t)i * D, zt + (size_t)j * D, D) * invT;
    for (int i = 0; i < N; i++) {
        double m = -INFINITY, mc = -INFINITY, s = 0.0, sc = 0.0;
        for (int j = 0; j < N; j++) {
            m = fmax(m, A[(size_t)i * N + j]);
            mc = fmax(mc, A[(size_t)j * N + i]);
        }
        for (int j = 0; j < N; j++) {
            s += exp(A[(size_t)i * N + j] - m);
            sc += exp(A[(size_t)j * N + i] - mc);
        }
        lr[i] = m + log(s);
        lc[i] = mc + log(sc);
        part[i] = lr[i] - A[(size_t)i * N + i];
        part[N + i] = lc[i] - A[(size_t)i * N + i];
    }
    n->val.data[0] = (float)((sum_ordered(part, N) + sum_ordered(part + N, N)) / N);
}

/* dA_ij = g/N (P_ij - [i=j]) + g/N (Q_ij - [i=j]), P = row softmax,
 * Q = column softmax of A; then with W = dA / T:
 *   dzs_i = sum_j W_ij zt_j,   dzt_j = sum_i W_ij zs_i. */
static void infonce_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *S = n->in[0], *T = n->in[1];
    const float *zs = S->val.data, *zt = T->val.data;
    int N = S->val.shape[0], D = S->val.shape[1];
    double *A = n->ws, *W = A + (size_t)N * N, *lr = W + (size_t)N * N, *lc = lr + N;
    double k = n->grad.data[0] / N / n->fp[0];
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double a = A[(size_t)i * N + j];
            W[(size_t)i * N + j] = k * (exp(a - lr[i]) + exp(a - lc[j]) - (i == j ? 2.0 : 0.0));
        }
    if (need_grad(S)) {
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * N * D > PAR_WORK) schedule(static)
        for (int i = 0; i < N; i++)
            for (int d = 0; d < D; d++) {
                double s = 0.0;
                for (int j = 0; j < N; j++) s += W[(size_t)i * N + j] * zt[(size_t)j * D + d];
                S->grad.data[(size_t)i * D + d] += (float)s;
            }
    }
    if (need_grad(T)) {
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * N * D > PAR_WORK) schedule(static)
        for (int j = 0; j < N; j++)
            for (int d = 0; d < D; d++) {
                double s = 0.0;
                for (int i = 0; i < N; i++) s += W[(size_t)i * N + j] * zs[(size_t)i * D + d];
                T->grad.data[(size_t)j * D + d] += (float)s;
            }
    }
}

const kd_op_def kd_op_crd_infonce = {.name = "crd_infonce",
                                     .infer = pair_rows_infer,
                                     .workspace = infonce_ws,
                                     .forward = infonce_forward,
                                     .backward = infonce_backward};

/* ============================================================ crd_nce
 * RepDistiller's ContrastMemory + ContrastLoss. In: zs, zt (N, D) the
 * L2-normalised embeddings, idx (N) each example's dataset index (floats
 * holding integers in [0, n_data)). ip[0] n_data (M), ip[1] K; fp[0] T,
 * fp[1] momentum.
 *
 * Two banks of M x D rows: bank 0 holds student embeddings (memory_v1),
 * bank 1 teacher embeddings (memory_v2), both initialised U(-s, s),
 * s = 1/sqrt(D/3). Per anchor i: j_i0 = idx_i (the positive), j_ik for
 * k = 1..K uniform in [0, M) (RNG seeded from ctx->seed, ctx->step and i,
 * so a step is reproducible and independent of the thread count);
 *   side 0 (student anchors, teacher memory):  x_ik = exp(bank1[j_ik].zs_i / T) / Z_0
 *   side 1 (teacher anchors, student memory):  x_ik = exp(bank0[j_ik].zt_i / T) / Z_1
 * Z_side = mean(exp(./T)) * M over the first batch seen, then constant.
 * With c = K/M (K noise samples, noise density 1/M):
 *   L_side = -1/N sum_i [ log(x_i0 / (x_i0 + c + 1e-7)) + sum_k>=1 log(c / (x_ik + c + 1e-7)) ]
 *   loss = L_0 + L_1.
 * Memory update, after a training forward: row idx_i of bank0 <- normalise(
 * m * row + (1 - m) zs_i), bank1 likewise with zt_i. RepDistiller does this
 * at the end of the same forward; we apply it at the start of the next
 * forward (any mode), so backward reads the banks exactly as the forward
 * used them. The sequence of losses is the same. Duplicated indices in one
 * batch: all rows are read before any is written, the last write wins.
 *
 * Workspace: a header, the two banks (fixed place), then per step: x
 * (2, N, K+1) and partial sums (2, N) in double, the samples (N, K+1)
 * int32; the pending update (zs, zt copies and indices) goes after the
 * per-step area of the step that wrote it (its offset is in the header). */

typedef struct nce_hdr {
    double Z[2];
    int64_t pend_off; /* bytes from ws */
    int32_t bank_ready, n_pend;
} nce_hdr;

typedef struct nce_ws {
    nce_hdr *h;
    float *bank; /* (2, M, D) */
    double *x;   /* (2, N, K+1) */
    double *part; /* (2, N) */
    int32_t *samp; /* (N, K+1) */
} nce_ws;

static size_t round8(size_t b) { return (b + 7) & ~(size_t)7; }

static size_t nce_bank_end(int M, int D) { return round8(sizeof(nce_hdr)) + round8(2 * (size_t)M * D * sizeof(float)); }

static size_t nce_step_bytes(int N, int K, int D) {
    (void)D;
    return round8(2 * (size_t)N * (K + 1) * sizeof(double) + 2 * (size_t)N * sizeof(double) +
                  (size_t)N * (K + 1) * sizeof(int32_t));
}

static size_t nce_pend_bytes(int N, int D) { return round8(2 * (size_t)N * D * sizeof(float) + (size_t)N * sizeof(int32_t)); }

static nce_ws nce_ws_of(const kd_node *n) {
    int M = n->ip[0], K = n->ip[1], N = n->in[0]->val.shape[0], D = n->in[0]->val.shape[1];
    char *base = n->ws;
    nce_ws w = {.h = (nce_hdr *)base, .bank = (float *)(base + round8(sizeof(nce_hdr)))};
    char *p = base + nce_bank_end(M, D);
    w.x = (double *)p;
    w.part = w.x + 2 * (size_t)N * (K + 1);
    w.samp = (int32_t *)(w.part + 2 * (size_t)N);
    return w;
}

static kd_status nce_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val, *idx = &n->in[2]->val;
    if (s->ndim != 2 || !same_shape(s, t))
        return kd_op_shape_error(n, "crd_nce needs student and teacher embeddings (N, D) of the same shape");
    if (idx->ndim != 1 || idx->shape[0] != s->shape[0]) return kd_op_shape_error(n, "crd_nce: idx must be (N)");
    return scalar_out(n);
}

static size_t nce_ws_bytes(const kd_node *n, int threads) {
    (void)threads;
    int M = n->ip[0], K = n->ip[1], N = n->in[0]->val.shape[0], D = n->in[0]->val.shape[1];
    return nce_bank_end(M, D) + nce_step_bytes(N, K, D) + nce_pend_bytes(N, D);
}

static void nce_init_bank(float *bank, int M, int D, uint64_t seed) {
    kd_rng r;
    kd_rng_seed(&r, kd_hash64(seed ^ CRD_SALT) ^ 0xB4A1ull);
    float sd = (float)(1.0 / sqrt(D / 3.0));
    for (size_t i = 0; i < 2 * (size_t)M * D; i++) bank[i] = (2.0f * kd_rng_uniform(&r) - 1.0f) * sd;
}

float *kd_crd_bank(kd_node *n, int side) {
    KD_ASSERT(n->op == KD_OP_CRD_NCE && n->ws, "kd_crd_bank: '%s' is not a compiled crd_nce node", n->name);
    KD_ASSERT(side == 0 || side == 1, "kd_crd_bank: side %d", side);
    nce_ws w = nce_ws_of(n);
    w.h->bank_ready = 1;
    return w.bank + (size_t)side * n->ip[0] * n->in[0]->val.shape[1];
}

/* the pending momentum update of the previous training forward */
static void nce_apply_pending(kd_node *n, nce_ws *w) {
    int M = n->ip[0], D = n->in[0]->val.shape[1], P = w->h->n_pend;
    if (P <= 0) return;
    char *base = n->ws;
    float *pz = (float *)(base + w->h->pend_off); /* (2, P, D) */
    int32_t *pi = (int32_t *)(pz + 2 * (size_t)P * D);
    float m = n->fp[1];
    /* all rows are read into the pending copies first (in place: the copy
     * becomes the new row), then written: duplicates end with the last */
    for (int side = 0; side < 2; side++) {
        float *bank = w->bank + (size_t)side * M * D;
        for (int i = 0; i < P; i++) {
            float *z = pz + ((size_t)side * P + i) * D;
            const float *row = bank + (size_t)pi[i] * D;
            double ss = 0.0;
            for (int d = 0; d < D; d++) {
                z[d] = row[d] * m + z[d] * (1.0f - m);
                ss += (double)z[d] * z[d];
            }
            float inv = (float)(1.0 / sqrt(ss));
            for (int d = 0; d < D; d++) z[d] *= inv;
        }
        for (int i = 0; i < P; i++) memcpy(bank + (size_t)pi[i] * D, pz + ((size_t)side * P + i) * D, D * sizeof(float));
    }
    w->h->n_pend = 0;
}

static uint64_t nce_row_seed(uint64_t seed, uint64_t step, int i) {
    return kd_hash64(seed ^ CRD_SALT) ^ kd_hash64(step * 1000003ull + (uint64_t)i);
}

static void nce_forward(kd_node *n, const kd_ctx *ctx) {
    nce_ws w = nce_ws_of(n);
    int M = n->ip[0], K = n->ip[1], N = n->in[0]->val.shape[0], D = n->in[0]->val.shape[1], K1 = K + 1;
    const float *z[2] = {n->in[0]->val.data, n->in[1]->val.data}, *idx = n->in[2]->val.data;
    if (!w.h->bank_ready) {
        nce_init_bank(w.bank, M, D, ctx->seed);
        w.h->bank_ready = 1;
    }
    nce_apply_pending(n, &w);
    for (int i = 0; i < N; i++)
        KD_ASSERT(idx[i] >= 0.0f && idx[i] < (float)M && idx[i] == floorf(idx[i]),
                  "crd_nce '%s': idx[%d] = %g is not an example index in [0, %d)", n->name, i, idx[i], M);
    double invT = 1.0 / n->fp[0];
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * K1 * D > PAR_WORK) schedule(static)
    for (int i = 0; i < N; i++) {
        int32_t *js = w.samp + (size_t)i * K1;
        kd_rng r;
        kd_rng_seed(&r, nce_row_seed(ctx->seed, ctx->step, i));
        js[0] = (int32_t)idx[i];
        for (int k = 1; k < K1; k++) js[k] = (int32_t)kd_rng_below(&r, (uint32_t)M);
        for (int side = 0; side < 2; side++) {
            /* side 0: student anchor vs the teacher bank (1); side 1 the reverse */
            const float *bank = w.bank + (size_t)(1 - side) * M * D, *a = z[side] + (size_t)i * D;
            double *x = w.x + ((size_t)side * N + i) * K1;
            for (int k = 0; k < K1; k++) x[k] = exp(dotf(bank + (size_t)js[k] * D, a, D) * invT);
        }
    }
    for (int side = 0; side < 2; side++) {
        double *x = w.x + (size_t)side * N * K1;
        if (!(w.h->Z[side] > 0.0)) {
            for (int i = 0; i < N; i++) w.part[i] = sum_ordered(x + (size_t)i * K1, K1);
            w.h->Z[side] = sum_ordered(w.part, N) / ((double)N * K1) * M;
        }
    }
    double c = (double)K / M;
    for (int side = 0; side < 2; side++) {
        double invZ = 1.0 / w.h->Z[side];
        for (int i = 0; i < N; i++) {
            double *x = w.x + ((size_t)side * N + i) * K1;
            for (int k = 0; k < K1; k++) x[k] *= invZ;
            double s = log(x[0] / (x[0] + c + NCE_EPS));
            for (int k = 1; k < K1; k++) s += log(c / (x[k] + c + NCE_EPS));
            w.part[(size_t)side * N + i] = s;
        }
    }
    n->val.data[0] = (float)(-(sum_ordered(w.part, N) + sum_ordered(w.part + N, N)) / N);
    if (ctx->training) {
        w.h->pend_off = (int64_t)(nce_bank_end(M, D) + nce_step_bytes(N, K, D));
        float *pz = (float *)((char *)n->ws + w.h->pend_off);
        memcpy(pz, z[0], (size_t)N * D * sizeof(float));
        memcpy(pz + (size_t)N * D, z[1], (size_t)N * D * sizeof(float));
        int32_t *pi = (int32_t *)(pz + 2 * (size_t)N * D);
        for (int i = 0; i < N; i++) pi[i] = (int32_t)idx[i];
        w.h->n_pend = N;
    }
}

/* x = exp(s/T)/Z with Z constant, s_ik = bank[j_ik] . z_i:
 *   dL/dx_i0 = -g/N (1/x_i0 - 1/(x_i0 + c + eps)),
 *   dL/dx_ik =  g/N / (x_ik + c + eps)   (k >= 1),
 *   ds_ik = dx_ik x_ik / T,   dz_i = sum_k ds_ik bank[j_ik].
 * The banks are buffers (no gradient). */
static void nce_backward(kd_node *n, const kd_ctx *ctx) {
    nce_ws w = nce_ws_of(n);
    int M = n->ip[0], K = n->ip[1], N = n->in[0]->val.shape[0], D = n->in[0]->val.shape[1], K1 = K + 1;
    double c = (double)K / M, k0 = n->grad.data[0] / N / n->fp[0];
    for (int side = 0; side < 2; side++) {
        kd_node *Z = n->in[side];
        if (!need_grad(Z)) continue;
        const float *bank = w.bank + (size_t)(1 - side) * M * D;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * K1 * D > PAR_WORK) schedule(static)
        for (int i = 0; i < N; i++) {
            const double *x = w.x + ((size_t)side * N + i) * K1;
            const int32_t *js = w.samp + (size_t)i * K1;
            float *dz = Z->grad.data + (size_t)i * D;
            double acc[512];
            for (int d0 = 0; d0 < D; d0 += 512) {
                int m = D - d0 < 512 ? D - d0 : 512;
                for (int d = 0; d < m; d++) acc[d] = 0.0;
                for (int k = 0; k < K1; k++) {
                    double dx = k == 0 ? -(1.0 / x[0] - 1.0 / (x[0] + c + NCE_EPS)) : 1.0 / (x[k] + c + NCE_EPS);
                    double ds = k0 * dx * x[k];
                    const float *row = bank + (size_t)js[k] * D + d0;
                    for (int d = 0; d < m; d++) acc[d] += ds * row[d];
                }
                for (int d = 0; d < m; d++) dz[d0 + d] += (float)acc[d];
            }
        }
    }
}

const kd_op_def kd_op_crd_nce = {
    .name = "crd_nce", .infer = nce_infer, .workspace = nce_ws_bytes, .forward = nce_forward, .backward = nce_backward};

/* ============================================================ bn_noaffine
 * x (N, C, ...) -> same; fp[0] eps. ws (double): mean (C), invstd (C). */

static kd_status bn_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    if (x->ndim < 2) return kd_op_shape_error(n, "bn_noaffine needs (N, C, ...)");
    n->val = *x;
    n->val.data = NULL;
    return KD_OK;
}

static size_t bn_ws(const kd_node *n, int threads) {
    (void)threads;
    return 2 * (size_t)n->in[0]->val.shape[1] * sizeof(double);
}

static void bn_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *X = &n->in[0]->val;
    int N = X->shape[0], C = X->shape[1];
    int64_t I = inner_of(X);
    double *mean = n->ws, *inv = mean + C, cnt = (double)N * I;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * C * I > PAR_WORK) schedule(static)
    for (int c = 0; c < C; c++) {
        double s = 0.0, v = 0.0;
        for (int b = 0; b < N; b++)
            for (int64_t i = 0; i < I; i++) s += X->data[((size_t)b * C + c) * I + i];
        double m = s / cnt;
        for (int b = 0; b < N; b++)
            for (int64_t i = 0; i < I; i++) {
                double d = X->data[((size_t)b * C + c) * I + i] - m;
                v += d * d;
            }
        mean[c] = m;
        inv[c] = 1.0 / sqrt(v / cnt + n->fp[0]);
        for (int b = 0; b < N; b++)
            for (int64_t i = 0; i < I; i++) {
                size_t o = ((size_t)b * C + c) * I + i;
                n->val.data[o] = (float)((X->data[o] - m) * inv[c]);
            }
    }
}

/* Batch norm with gamma = 1, per channel over its cnt = N*inner values,
 * xh = (x - mean) * inv:  dx = inv (dy - mean(dy) - xh mean(dy xh)). */
static void bn_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *Xn = n->in[0];
    if (!need_grad(Xn)) return;
    const float *x = Xn->val.data, *dy = n->grad.data;
    float *dx = Xn->grad.data;
    int N = Xn->val.shape[0], C = Xn->val.shape[1];
    int64_t I = inner_of(&Xn->val);
    const double *mean = n->ws, *inv = mean + C;
    double cnt = (double)N * I;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * C * I > PAR_WORK) schedule(static)
    for (int c = 0; c < C; c++) {
        double sd = 0.0, sdx = 0.0;
        for (int b = 0; b < N; b++)
            for (int64_t i = 0; i < I; i++) {
                size_t o = ((size_t)b * C + c) * I + i;
                sd += dy[o];
                sdx += dy[o] * (x[o] - mean[c]) * inv[c];
            }
        sd /= cnt;
        sdx /= cnt;
        for (int b = 0; b < N; b++)
            for (int64_t i = 0; i < I; i++) {
                size_t o = ((size_t)b * C + c) * I + i;
                double xh = (x[o] - mean[c]) * inv[c];
                dx[o] += (float)(inv[c] * (dy[o] - sd - xh * sdx));
            }
    }
}

const kd_op_def kd_op_bn_noaffine = {
    .name = "bn_noaffine", .infer = bn_infer, .workspace = bn_ws, .forward = bn_forward, .backward = bn_backward};

/* ============================================================ logsum
 * a, b same shape; fp[0] alpha >= 1. loss = log S, S = sum |a - b|^alpha.
 * ws: S in double, then partial sums per chunk. */

#define LS_CHUNK 16384

static kd_status logsum_infer(kd_node *n) {
    if (!same_shape(&n->in[0]->val, &n->in[1]->val)) return kd_op_shape_error(n, "logsum needs two tensors of the same shape");
    return scalar_out(n);
}

static size_t logsum_ws(const kd_node *n, int threads) {
    (void)threads;
    int64_t k = kd_numel(&n->in[0]->val);
    return (size_t)(1 + (k + LS_CHUNK - 1) / LS_CHUNK) * sizeof(double);
}

static inline double ls_pow(double d, float alpha) {
    double a = fabs(d);
    if (alpha == 4.0f) return (a * a) * (a * a);
    if (alpha == 2.0f) return a * a;
    return pow(a, alpha);
}

static void logsum_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const float *a = n->in[0]->val.data, *b = n->in[1]->val.data;
    int64_t k = kd_numel(&n->in[0]->val);
    int nc = (int)((k + LS_CHUNK - 1) / LS_CHUNK);
    double *S = n->ws, *part = S + 1;
    float alpha = n->fp[0];
#pragma omp parallel for num_threads(ctx->threads) if (nc > 1) schedule(static)
    for (int c = 0; c < nc; c++) {
        int64_t i0 = (int64_t)c * LS_CHUNK, i1 = i0 + LS_CHUNK < k ? i0 + LS_CHUNK : k;
        double s = 0.0;
        for (int64_t i = i0; i < i1; i++) s += ls_pow((double)a[i] - b[i], alpha);
        part[c] = s;
    }
    S[0] = sum_ordered(part, nc);
    n->val.data[0] = (float)log(S[0]); /* -inf when a == b everywhere, as torch */
}

/* d log S / da_i = alpha |d_i|^(alpha-1) sign(d_i) / S, db = -da (0 if S = 0) */
static void logsum_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *A = n->in[0], *B = n->in[1];
    const float *a = A->val.data, *b = B->val.data;
    int64_t k = kd_numel(&A->val);
    double S = ((const double *)n->ws)[0];
    if (!(S > 0.0)) return;
    double coef = n->grad.data[0] * n->fp[0] / S;
    float alpha = n->fp[0];
    float *da = need_grad(A) ? A->grad.data : NULL, *db = need_grad(B) ? B->grad.data : NULL;
#pragma omp parallel for num_threads(ctx->threads) if (k > PAR_WORK) schedule(static)
    for (int64_t i = 0; i < k; i++) {
        double d = (double)a[i] - b[i];
        double p = alpha == 4.0f ? d * d * d : (d == 0.0 ? 0.0 : pow(fabs(d), alpha - 1.0) * (d > 0 ? 1.0 : -1.0));
        double gi = coef * p;
        if (da) da[i] += (float)gi;
        if (db) db[i] -= (float)gi;
    }
}

const kd_op_def kd_op_logsum = {
    .name = "logsum", .infer = logsum_infer, .workspace = logsum_ws, .forward = logsum_forward, .backward = logsum_backward};

/* ============================================================ builders */

kd_node *kd_vid_nll(kd_graph *g, kd_node *mu, kd_node *t, kd_node *alpha, float alpha0, float eps) {
    KD_ASSERT(isfinite(alpha0) && eps >= 0.0f, "vid_nll: alpha0 %g eps %g", alpha0, eps);
    kd_node *in[3] = {mu, t, alpha};
    float fp[8] = {alpha0, eps};
    return kd_graph_add_op_ex(g, KD_OP_VID_NLL, 3, in, NULL, fp);
}

kd_node *kd_l2norm(kd_graph *g, kd_node *x) { return kd_graph_add_op(g, KD_OP_L2NORM, 1, &x); }

kd_node *kd_crd_infonce(kd_graph *g, kd_node *zs, kd_node *zt, float T) {
    KD_ASSERT(T > 0.0f && isfinite(T), "crd_infonce: T = %g", T);
    kd_node *in[2] = {zs, zt};
    float fp[8] = {T};
    return kd_graph_add_op_ex(g, KD_OP_CRD_INFONCE, 2, in, NULL, fp);
}

kd_node *kd_crd_nce(kd_graph *g, kd_node *zs, kd_node *zt, kd_node *idx, int n_data, int K, float T, float momentum) {
    KD_ASSERT(n_data >= 1 && n_data <= (1 << 24) && K >= 1 && T > 0.0f && momentum >= 0.0f && momentum <= 1.0f,
              "crd_nce: n_data %d K %d T %g momentum %g", n_data, K, T, momentum);
    kd_node *in[3] = {zs, zt, idx};
    int ip[8] = {n_data, K};
    float fp[8] = {T, momentum};
    return kd_graph_add_op_ex(g, KD_OP_CRD_NCE, 3, in, ip, fp);
}

kd_node *kd_bn_noaffine(kd_graph *g, kd_node *x, float eps) {
    KD_ASSERT(eps > 0.0f, "bn_noaffine: eps %g", eps);
    float fp[8] = {eps};
    return kd_graph_add_op_ex(g, KD_OP_BN_NOAFFINE, 1, &x, NULL, fp);
}

kd_node *kd_logsum(kd_graph *g, kd_node *a, kd_node *b, float alpha) {
    KD_ASSERT(alpha >= 1.0f && isfinite(alpha), "logsum: alpha %g", alpha);
    kd_node *in[2] = {a, b};
    float fp[8] = {alpha};
    return kd_graph_add_op_ex(g, KD_OP_LOGSUM, 2, in, NULL, fp);
}
