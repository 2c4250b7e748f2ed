/* dcd.c - the loss op of DCD, discriminative and consistent distillation
 * (Giakoumoglou & Stathaki 2024): in-batch InfoNCE between L2-normalised
 * student and teacher embeddings with a learned temperature and bias, plus a
 * consistency KL between in-batch similarity distributions. The embeddings
 * (projector, normalisation) are built by build_geom.c from existing ops;
 * docs/losses/dcd.md has the definition and the choices made.
 *
 * In: zs, zt (N, D) normalised embeddings, theta (1) and beta (1) the
 * learned log-scale and bias (parameters). ip[0] the consistency target
 * (KD_DCD_CROSS or KD_DCD_TEACHER); fp[0] theta0, fp[1] beta0 (constant
 * offsets, so that parameters initialised to 0 start at the chosen values),
 * fp[2] max_scale, fp[3] w_nce, fp[4] w_kl.
 *
 *   scale = min(exp(theta0 + theta), max_scale),  b = beta0 + beta
 *   L_ij  = scale * zs_i . zt_j + b               (student i vs teacher j)
 *   P     = softmax of L over each row j          (student anchors)
 *   nce   = 1/N sum_i -log P_ii
 *   cross:   Q = (column softmax of L)^T: Q_ij = exp(L_ji) / sum_k exp(L_ki), row i
 *            the teacher i against the student keys j (the authors' code:
 *            kl_div(log_softmax(L, 1), softmax(L, 0).t(), batchmean)),
 *            kl = 1/N sum_ij Q_ij (log Q_ij - log P_ij), gradient through both
 *   teacher: R = row softmax of T_ij = scale * zt_i . zt_j + b (teacher-teacher
 *            similarities, detached), kl = 1/N sum_ij R_ij (log R_ij - log P_ij)
 *   loss  = w_nce * nce + w_kl * kl
 *
 * A bias shared by every logit cancels in each softmax: b changes no value
 * and its gradient is 0 (computed, not assumed: sum_ij dL_ij). It is kept
 * because the paper and its code have it. Sums run in double in a fixed
 * order; nothing is allocated per step. Backward derivation above it.
 */
#include <math.h>
#include <string.h>

#include "kd_distill.h"
#include "ops/ops.h"

#define PAR_WORK 32768

static int need_grad(const kd_node *u) { return (u->flags & KD_F_NEED_GRAD) != 0; }

static double sum_ordered(const double *p, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += p[i];
    return s;
}

static inline double dotf(const float *a, const float *b, int D) {
    double s = 0.0;
    for (int d = 0; d < D; d++) s += (double)a[d] * b[d];
    return s;
}

static kd_status dcd_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val, *th = &n->in[2]->val, *be = &n->in[3]->val;
    if (s->ndim != 2 || t->ndim != 2 || s->shape[0] != t->shape[0] || s->shape[1] != t->shape[1])
        return kd_op_shape_error(n, "dcd needs student and teacher embeddings (N, D) of the same shape");
    if (kd_numel(th) != 1 || kd_numel(be) != 1) return kd_op_shape_error(n, "dcd: log-scale and bias are scalars (1)");
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

/* ws (double): S (N x N) raw similarities zs.zt, L (N x N) logits, dL (N x N),
 * T (N x N) teacher logits, row lse of L (N), column lse of L (N), row lse
 * of T (N), parts (2N), scalars (4) */
static size_t dcd_ws(const kd_node *n, int threads) {
    (void)threads;
    size_t N = (size_t)n->in[0]->val.shape[0];
    return (4 * N * N + 5 * N + 4) * sizeof(double);
}

typedef struct dcd_ws_p {
    double *S, *L, *dL, *T, *lr, *lc, *lt, *part, *sc;
} dcd_ws_p;

static dcd_ws_p dcd_ws_of(const kd_node *n) {
    size_t N = (size_t)n->in[0]->val.shape[0];
    double *p = n->ws;
    dcd_ws_p w = {.S = p, .L = p + N * N, .dL = p + 2 * N * N, .T = p + 3 * N * N};
    w.lr = w.T + N * N;
    w.lc = w.lr + N;
    w.lt = w.lc + N;
    w.part = w.lt + N;
    w.sc = w.part + 2 * N;
    return w;
}

/* log-sum-exp of n values x[0], x[stride], ... */
static double lse(const double *x, int n, int stride) {
    double m = -INFINITY, s = 0.0;
    for (int i = 0; i < n; i++) m = fmax(m, x[(size_t)i * stride]);
    for (int i = 0; i < n; i++) s += exp(x[(size_t)i * stride] - m);
    return m + log(s);
}

static void dcd_forward(kd_node *n, const kd_ctx *ctx) {
    const float *zs = n->in[0]->val.data, *zt = n->in[1]->val.data;
    int N = n->in[0]->val.shape[0], D = n->in[0]->val.shape[1], teacher = n->ip[0] == KD_DCD_TEACHER;
    dcd_ws_p w = dcd_ws_of(n);
    double e = exp((double)n->fp[0] + n->in[2]->val.data[0]);
    double scale = fmin(e, (double)n->fp[2]), b = (double)n->fp[1] + n->in[3]->val.data[0];
    w.sc[0] = scale, w.sc[1] = b, w.sc[2] = e <= (double)n->fp[2]; /* clamp inactive: theta gets a gradient */
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * N * D > PAR_WORK) schedule(static)
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double s = dotf(zs + (size_t)i * D, zt + (size_t)j * D, D);
            w.S[(size_t)i * N + j] = s;
            w.L[(size_t)i * N + j] = scale * s + b;
            if (teacher) w.T[(size_t)i * N + j] = scale * dotf(zt + (size_t)i * D, zt + (size_t)j * D, D) + b;
        }
    for (int i = 0; i < N; i++) {
        w.lr[i] = lse(w.L + (size_t)i * N, N, 1);
        w.lc[i] = lse(w.L + i, N, N);
        if (teacher) w.lt[i] = lse(w.T + (size_t)i * N, N, 1);
    }
    /* part[i]: -log P_ii;  part[N + i]: row i of the KL */
    for (int i = 0; i < N; i++) {
        w.part[i] = w.lr[i] - w.L[(size_t)i * N + i];
        double k = 0.0;
        for (int j = 0; j < N; j++) {
            double lp = w.L[(size_t)i * N + j] - w.lr[i];
            double lq = teacher ? w.T[(size_t)i * N + j] - w.lt[i] : w.L[(size_t)j * N + i] - w.lc[i];
            k += exp(lq) * (lq - lp);
        }
        w.part[N + i] = k;
    }
    double nce = sum_ordered(w.part, N) / N, kl = sum_ordered(w.part + N, N) / N;
    w.sc[3] = kl;
    n->val.data[0] = (float)(n->fp[3] * nce + n->fp[4] * kl);
}

/* With g the upstream gradient, dL = d loss / d L (N x N):
 *   nce:     w_nce/N (P_ij - [i=j])
 *   teacher: w_kl/N (P_ij - R_ij)             (R a constant)
 *   cross:   w_kl/N (P_ij - Q_ij + C_ij), where the part through Q = S^T,
 *            S = column softmax of L, is C_kl = S_kl (h_kl - sum_m S_ml h_ml),
 *            h_kl = log S_kl - log P_lk  (softmax Jacobian per column; the
 *            rows of Q sum to 1, which gives the P - Q part).
 * Then, with L = scale * S + b:
 *   dzs_i = scale sum_j dL_ij zt_j,  dzt_j = scale sum_i dL_ij zs_i,
 *   dtheta = scale sum_ij dL_ij S_ij (0 where the clamp is active),
 *   dbeta  = sum_ij dL_ij (0 up to rounding: every row/column block sums to 0). */
static void dcd_backward(kd_node *n, const kd_ctx *ctx) {
    kd_node *Zs = n->in[0], *Zt = n->in[1], *Th = n->in[2], *Be = n->in[3];
    const float *zs = Zs->val.data, *zt = Zt->val.data;
    int N = Zs->val.shape[0], D = Zs->val.shape[1], teacher = n->ip[0] == KD_DCD_TEACHER;
    dcd_ws_p w = dcd_ws_of(n);
    double g = n->grad.data[0], a = g * n->fp[3] / N, k = g * n->fp[4] / N, scale = w.sc[0];
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double l = w.L[(size_t)i * N + j], p = exp(l - w.lr[i]);
            double q = teacher ? exp(w.T[(size_t)i * N + j] - w.lt[i]) : exp(w.L[(size_t)j * N + i] - w.lc[i]);
            w.dL[(size_t)i * N + j] = a * (p - (i == j)) + k * (p - q);
        }
    if (!teacher) {
        /* column l of S: S_kl = exp(L_kl - lc_l); h_kl = (L_kl - lc_l) - (L_lk - lr_l) */
        for (int l = 0; l < N; l++) {
            double m = 0.0;
            for (int kk = 0; kk < N; kk++) {
                double ls = w.L[(size_t)kk * N + l] - w.lc[l];
                m += exp(ls) * (ls - (w.L[(size_t)l * N + kk] - w.lr[l]));
            }
            for (int kk = 0; kk < N; kk++) {
                double ls = w.L[(size_t)kk * N + l] - w.lc[l];
                double h = ls - (w.L[(size_t)l * N + kk] - w.lr[l]);
                w.dL[(size_t)kk * N + l] += k * exp(ls) * (h - m);
            }
        }
    }
    if (need_grad(Zs)) {
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * N * D > PAR_WORK) schedule(static)
        for (int i = 0; i < N; i++)
            for (int d = 0; d < D; d++) {
                double s = 0.0;
                for (int j = 0; j < N; j++) s += w.dL[(size_t)i * N + j] * zt[(size_t)j * D + d];
                Zs->grad.data[(size_t)i * D + d] += (float)(scale * s);
            }
    }
    if (need_grad(Zt)) {
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * N * D > PAR_WORK) schedule(static)
        for (int j = 0; j < N; j++)
            for (int d = 0; d < D; d++) {
                double s = 0.0;
                for (int i = 0; i < N; i++) s += w.dL[(size_t)i * N + j] * zs[(size_t)i * D + d];
                Zt->grad.data[(size_t)j * D + d] += (float)(scale * s);
            }
    }
    if (need_grad(Th) || need_grad(Be)) {
        for (int i = 0; i < N; i++) {
            double st = 0.0, sb = 0.0;
            for (int j = 0; j < N; j++) {
                st += w.dL[(size_t)i * N + j] * w.S[(size_t)i * N + j];
                sb += w.dL[(size_t)i * N + j];
            }
            w.part[i] = st, w.part[N + i] = sb;
        }
        if (need_grad(Th) && w.sc[2] != 0.0) Th->grad.data[0] += (float)(scale * sum_ordered(w.part, N));
        if (need_grad(Be)) Be->grad.data[0] += (float)sum_ordered(w.part + N, N);
    }
}

const kd_op_def kd_op_dcd = {.name = "dcd", .infer = dcd_infer, .workspace = dcd_ws, .forward = dcd_forward, .backward = dcd_backward};

kd_node *kd_dcd(kd_graph *g, kd_node *zs, kd_node *zt, kd_node *log_scale, kd_node *bias, const kd_dcd_args *a) {
    KD_ASSERT(a->consist == KD_DCD_CROSS || a->consist == KD_DCD_TEACHER, "dcd: consist %d", a->consist);
    KD_ASSERT(isfinite(a->log_scale0) && isfinite(a->bias0) && a->max_scale > 0.0f && a->w_nce >= 0.0f &&
                  a->w_kl >= 0.0f,
              "dcd: log_scale0 %g bias0 %g max_scale %g w_nce %g w_kl %g", a->log_scale0, a->bias0, a->max_scale,
              a->w_nce, a->w_kl);
    kd_node *in[4] = {zs, zt, log_scale, bias};
    int ip[8] = {a->consist};
    float fp[8] = {a->log_scale0, a->bias0, a->max_scale, a->w_nce, a->w_kl};
    return kd_graph_add_op_ex(g, KD_OP_DCD, 4, in, ip, fp);
}
