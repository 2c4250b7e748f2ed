/* logit2.c - the second family of logit distillation ops: multi-level logit
 * distillation (MLKD, Jin, Wang & Lin, CVPR 2023) and the pieces of
 * curriculum temperature KD (CTKD, Li et al., AAAI 2023): a forward KL whose
 * temperature is a graph node, a gradient-reversal layer, and the sigmoid
 * map that keeps a learned temperature inside [lo, hi].
 *
 * MLKD, one node per temperature T (the loss builder sums the nodes over
 * its list of temperatures). With P = softmax(s/T), Q = softmax(t/T) (N, K)
 * over the N kept rows:
 *   instance  T^2 / N * sum_n KL(q_n || p_n)
 *   batch     ||P P^T - Q Q^T||_F^2 / N        (N x N prediction Grams)
 *   class     ||P^T P - Q^T Q||_F^2 / K        (K x K class Grams)
 *   loss      w_inst * instance + w_batch * batch + w_class * class
 * as the authors' code (kd_loss, bc_loss, cc_loss: no T^2 on the Gram
 * terms). Neither Gram is formed from P and Q directly: with D = P - Q,
 * S = P + Q and the N x N matrices X = D S^T, U = S S^T, V = D D^T,
 *   P P^T - Q Q^T = (X + X^T) / 2
 *   ||P^T P - Q^T Q||^2 = (sum_ij U_ij V_ij + sum_ij X_ij X_ji) / 2
 * (P^T P - Q^T Q = (S^T D + D^T S) / 2, then expand the square), so both
 * terms are quadratic in D and keep their relative precision when the
 * student is close to the teacher, and nothing K x K is stored (K may be a
 * vocabulary). Gradient with respect to P (Q detached):
 *   batch  4/N (P P^T - Q Q^T) P
 *   class  4/K P (P^T P - Q^T Q) = 1/K ((U + X) D + (X^T + V) S)
 * which, with P = (S + D) / 2, is G = C1 D + C2 S where
 *   C1 = 2 w_b / N * Y + w_c / K (U + X),  C2 = 2 w_b / N * Y + w_c / K (X^T + V),
 *   Y = (X + X^T) / 2;
 * then dL/ds = p (G - p.G) / T through the softmax, plus w_i T (p - q) / N.
 * Dropped rows (mask 0) are zero rows of D and S, so they leave the Grams
 * and get no gradient. The three products are cblas_dgemm calls in double.
 *
 * CTKD's loss is T^2 KL(p_t || p_s) with T = lo + (hi - lo) sigmoid(theta):
 * kd_fkl_tnode takes T as an input node (one value, or one per row) and
 * gives gradients to s and to T; with a = s/T, b = t/T (both depend on T):
 *   dKL/dT = -1/T sum_k [ (p_k - q_k) a_k + q_k (lq_k - lp_k - KL) b_k ]
 * Both brackets sum to 0 over k, so a_k, b_k may be replaced by the
 * log-probabilities lp_k, lq_k (shifts by a row constant): no large logits
 * cancel. d(T^2 KL)/dT = 2 T KL + T^2 dKL/dT. The teacher logits stay
 * detached, but T reaches both softmaxes (as in the authors' code, where
 * the temperature divides both logits).
 *
 * Not here: the curriculum of the reversal factor lambda (the loss
 * builder's per-epoch hook, build_logit2.c), MLKD's strong augmentation and
 * confidence masks (see build_logit2.c), the parameter itself.
 */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "kd_distill.h"
#include "ops/ops.h"


/* s and t the same shape; input `rows_in` (a mask, when present) has one
 * value per row; scalar output */
static kd_status pair_infer(kd_node *n, int rows_in) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    int same = s->ndim == t->ndim && s->ndim >= 1;
    for (int i = 0; same && i < s->ndim; i++) same = s->shape[i] == t->shape[i];
    if (!same) return kd_op_shape_error(n, "student and teacher logits must have the same shape");
    int R, K;
    kd_rows_k(s, &R, &K);
    if (rows_in < n->n_in && kd_numel(&n->in[rows_in]->val) != R)
        return kd_op_shape_error(n, "the mask needs one value per row of logits");
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static inline int row_kept(const float *mask, int r) { return !mask || mask[r] > 0.0f; }

/* ================================================================ MLKD
 * inputs s, t (R,K), mask (R) optional; fp[0] T, fp[1] w_inst, fp[2]
 * w_batch, fp[3] w_class. ws (double), laid out for the current R: per
 * row kl (R) and kept (R); D, S (R,K); X, U, V (R,R); backward scratch C1,
 * C2 (R,R) and G (R,K). */

typedef struct mlkd_ws {
    int R, K;
    double *kl, *kept, *D, *S, *X, *U, *V, *C1, *C2, *G;
} mlkd_ws;

static mlkd_ws mlkd_ws_of(const kd_node *n) {
    mlkd_ws w;
    kd_rows_k(&n->in[0]->val, &w.R, &w.K);
    size_t R = (size_t)w.R, RK = R * (size_t)w.K, RR = R * R;
    w.kl = n->ws;
    w.kept = w.kl + R;
    w.D = w.kept + R;
    w.S = w.D + RK;
    w.X = w.S + RK;
    w.U = w.X + RR;
    w.V = w.U + RR;
    w.C1 = w.V + RR;
    w.C2 = w.C1 + RR;
    w.G = w.C2 + RR;
    return w;
}

static kd_status mlkd_infer(kd_node *n) { return pair_infer(n, 2); }

static size_t mlkd_ws_bytes(const kd_node *n, int threads) {
    (void)threads;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    return ((size_t)2 * R + (size_t)3 * R * K + (size_t)5 * R * R) * sizeof(double);
}

/* out (R,R) = a (R,K) b (R,K)^T */
static void gram(double *out, const double *a, const double *b, int R, int K) {
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, R, K, 1.0, a, K, b, K, 0.0, out, R);
}

static void mlkd_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    mlkd_ws w = mlkd_ws_of(n);
    int R = w.R, K = w.K;
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data;
    const float *mask = n->n_in > 2 ? n->in[2]->val.data : NULL;
    double T = n->fp[0], invT = 1.0 / T, wi = n->fp[1], wb = n->fp[2], wc = n->fp[3];
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        double *d = w.D + (size_t)r * K, *sm = w.S + (size_t)r * K;
        if (!row_kept(mask, r)) {
            memset(d, 0, (size_t)K * sizeof *d);
            memset(sm, 0, (size_t)K * sizeof *sm);
            w.kl[r] = w.kept[r] = 0.0;
            continue;
        }
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        double ls = kd_row_lse(zs, K, invT), lt = kd_row_lse(zt, K, invT), kl = 0.0;
        for (int k = 0; k < K; k++) {
            double lp = zs[k] * invT - ls, lq = zt[k] * invT - lt, p = exp(lp), q = exp(lq);
            kl += q * (lq - lp);
            d[k] = p - q;
            sm[k] = p + q;
        }
        w.kl[r] = kl;
        w.kept[r] = 1.0;
    }
    double N = 0.0, inst = 0.0, batch = 0.0, cls = 0.0;
    for (int r = 0; r < R; r++) {
        N += w.kept[r];
        inst += w.kl[r];
    }
    if (N == 0.0) {
        n->val.data[0] = 0.0f;
        return;
    }
    if (wb != 0.0 || wc != 0.0) gram(w.X, w.D, w.S, R, K);
    if (wc != 0.0) {
        gram(w.U, w.S, w.S, R, K);
        gram(w.V, w.D, w.D, R, K);
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            size_t ij = (size_t)i * R + j, ji = (size_t)j * R + i;
            if (wb != 0.0) {
                double y = 0.5 * (w.X[ij] + w.X[ji]);
                batch += y * y;
            }
            if (wc != 0.0) cls += 0.5 * (w.U[ij] * w.V[ij] + w.X[ij] * w.X[ji]);
        }
    n->val.data[0] = (float)(wi * T * T * inst / N + wb * batch / N + wc * cls / K);
}

static void mlkd_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    if (!(n->in[0]->flags & KD_F_NEED_GRAD)) return;
    mlkd_ws w = mlkd_ws_of(n);
    int R = w.R, K = w.K;
    double T = n->fp[0], invT = 1.0 / T, wi = n->fp[1], wb = n->fp[2], wc = n->fp[3];
    double N = 0.0;
    for (int r = 0; r < R; r++) N += w.kept[r];
    if (N == 0.0) return;
    double gup = n->grad.data[0], cb = 2.0 * wb / N, cc = wc / K;
    int grams = wb != 0.0 || wc != 0.0;
    if (grams) {
        for (int i = 0; i < R; i++)
            for (int j = 0; j < R; j++) {
                size_t ij = (size_t)i * R + j, ji = (size_t)j * R + i;
                double y = cb * 0.5 * (w.X[ij] + w.X[ji]);
                w.C1[ij] = y + (wc != 0.0 ? cc * (w.U[ij] + w.X[ij]) : 0.0);
                w.C2[ij] = y + (wc != 0.0 ? cc * (w.X[ji] + w.V[ij]) : 0.0);
            }
        /* G = C1 D + C2 S: d(batch + class terms) / dP */
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, K, R, 1.0, w.C1, R, w.D, K, 0.0, w.G, K);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, K, R, 1.0, w.C2, R, w.S, K, 1.0, w.G, K);
    }
    float *ds = n->in[0]->grad.data;
    double gi = gup * wi * T / N; /* instance: T^2/N from the loss, 1/T from a = s/T */
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        if (w.kept[r] == 0.0) continue;
        const double *d = w.D + (size_t)r * K, *sm = w.S + (size_t)r * K, *G = w.G + (size_t)r * K;
        float *dz = ds + (size_t)r * K;
        double dot = 0.0;
        if (grams)
            for (int k = 0; k < K; k++) dot += 0.5 * (sm[k] + d[k]) * G[k];
        for (int k = 0; k < K; k++) {
            double v = gi * d[k];
            if (grams) v += gup * invT * 0.5 * (sm[k] + d[k]) * (G[k] - dot);
            dz[k] += (float)v;
        }
    }
}

const kd_op_def kd_op_mlkd = {.name = "mlkd",
                              .infer = mlkd_infer,
                              .workspace = mlkd_ws_bytes,
                              .forward = mlkd_forward,
                              .backward = mlkd_backward};

/* ================================================================ FKL with a temperature node
 * inputs s, t (R,K), T (1) or (R), mask (R) optional. ws per row: lse_s,
 * lse_t, KL (without T^2), kept, dL/dT_r (filled by backward). */

enum { FT_WS = 5 };

static kd_status ft_infer(kd_node *n) {
    kd_status st = pair_infer(n, 3);
    if (st != KD_OK) return st;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    int64_t nt = kd_numel(&n->in[2]->val);
    if (nt != 1 && nt != R) return kd_op_shape_error(n, "the temperature needs one value, or one per row of logits");
    return KD_OK;
}

static size_t ft_ws(const kd_node *n, int threads) {
    (void)threads;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    return (size_t)R * FT_WS * sizeof(double);
}

static inline double ft_temp(const kd_node *n, int r) {
    const kd_tensor *T = &n->in[2]->val;
    return T->data[kd_numel(T) == 1 ? 0 : r];
}

static void ft_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data;
    const float *mask = n->n_in > 3 ? n->in[3]->val.data : NULL;
    double *ws = n->ws;
    for (int r = 0; r < R; r++)
        KD_ASSERT(ft_temp(n, r) > 0.0, "temperature %g of row %d in '%s'", ft_temp(n, r), r, n->name);
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        double *w = ws + (size_t)r * FT_WS;
        memset(w, 0, FT_WS * sizeof *w);
        if (!row_kept(mask, r)) continue;
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        double T = ft_temp(n, r), invT = 1.0 / T;
        double ls = kd_row_lse(zs, K, invT), lt = kd_row_lse(zt, K, invT), kl = 0.0;
        for (int k = 0; k < K; k++) {
            double lp = zs[k] * invT - ls, lq = zt[k] * invT - lt;
            kl += exp(lq) * (lq - lp);
        }
        w[0] = ls;
        w[1] = lt;
        w[2] = kl;
        w[3] = 1.0;
    }
    double kept = 0.0, sum = 0.0;
    for (int r = 0; r < R; r++) {
        kept += ws[(size_t)r * FT_WS + 3];
        double T = ft_temp(n, r);
        sum += T * T * ws[(size_t)r * FT_WS + 2];
    }
    n->val.data[0] = kept > 0.0 ? (float)(sum / kept) : 0.0f;
}

static void ft_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *sn = n->in[0], *tn = n->in[2];
    int need_s = (sn->flags & KD_F_NEED_GRAD) != 0, need_t = (tn->flags & KD_F_NEED_GRAD) != 0;
    if (!need_s && !need_t) return;
    int R, K;
    kd_rows_k(&sn->val, &R, &K);
    double *ws = n->ws, kept = 0.0;
    for (int r = 0; r < R; r++) kept += ws[(size_t)r * FT_WS + 3];
    if (kept == 0.0) return;
    const float *s = sn->val.data, *t = n->in[1]->val.data;
    double g = (double)n->grad.data[0] / kept;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        double *w = ws + (size_t)r * FT_WS;
        w[4] = 0.0;
        if (w[3] == 0.0) continue;
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        double T = ft_temp(n, r), invT = 1.0 / T, ls = w[0], lt = w[1], kl = w[2], br = 0.0;
        float *dz = need_s ? sn->grad.data + (size_t)r * K : NULL;
        for (int k = 0; k < K; k++) {
            double lp = zs[k] * invT - ls, lq = zt[k] * invT - lt, p = exp(lp), q = exp(lq);
            if (dz) dz[k] += (float)(g * T * (p - q));
            br += (p - q) * lp + q * (lq - lp - kl) * lq;
        }
        w[4] = g * (2.0 * T * kl - T * br);
    }
    if (!need_t) return;
    float *dT = tn->grad.data;
    if (kd_numel(&tn->val) == 1) {
        double sum = 0.0;
        for (int r = 0; r < R; r++) sum += ws[(size_t)r * FT_WS + 4];
        dT[0] += (float)sum;
    } else {
        for (int r = 0; r < R; r++) dT[r] += (float)ws[(size_t)r * FT_WS + 4];
    }
}

const kd_op_def kd_op_fkl_tnode = {
    .name = "fkl_tnode", .infer = ft_infer, .workspace = ft_ws, .forward = ft_forward, .backward = ft_backward};

/* ================================================================ element-wise: reversal and sigmoid range */

static kd_status same_infer(kd_node *n) {
    n->val = n->in[0]->val;
    n->val.data = NULL;
    return KD_OK;
}

/* y = x; dx += -lambda dy, lambda = fp[0] (changed between steps by a schedule) */
static void grl_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    memcpy(n->val.data, n->in[0]->val.data, (size_t)kd_numel(&n->val) * sizeof(float));
}

static void grl_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *x = n->in[0];
    if (!(x->flags & KD_F_NEED_GRAD)) return;
    float lam = n->fp[0];
    int64_t m = kd_numel(&n->val);
    for (int64_t i = 0; i < m; i++) x->grad.data[i] += -lam * n->grad.data[i];
}

const kd_op_def kd_op_grad_reverse = {
    .name = "grad_reverse", .infer = same_infer, .forward = grl_forward, .backward = grl_backward};

/* y = lo + (hi - lo) sigmoid(x + off); fp[0] lo, fp[1] hi, fp[2] off */
static inline double sigm(double x) { return x >= 0.0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x)); }

static void sr_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    double lo = n->fp[0], hi = n->fp[1], off = n->fp[2];
    int64_t m = kd_numel(&n->val);
    for (int64_t i = 0; i < m; i++) n->val.data[i] = (float)(lo + (hi - lo) * sigm(n->in[0]->val.data[i] + off));
}

static void sr_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *x = n->in[0];
    if (!(x->flags & KD_F_NEED_GRAD)) return;
    double lo = n->fp[0], hi = n->fp[1], off = n->fp[2];
    int64_t m = kd_numel(&n->val);
    for (int64_t i = 0; i < m; i++) {
        double sg = sigm(x->val.data[i] + off);
        x->grad.data[i] += (float)(n->grad.data[i] * (hi - lo) * sg * (1.0 - sg));
    }
}

const kd_op_def kd_op_sigmoid_range = {
    .name = "sigmoid_range", .infer = same_infer, .forward = sr_forward, .backward = sr_backward};

/* ================================================================ builders */

kd_node *kd_mlkd(kd_graph *g, kd_node *s, kd_node *t, kd_node *mask, float T, float w_inst, float w_batch,
                 float w_class) {
    KD_ASSERT(T > 0.0f, "temperature %g", (double)T);
    kd_node *in[3] = {s, t, mask};
    float fp[8] = {T, w_inst, w_batch, w_class};
    return kd_graph_add_op_ex(g, KD_OP_MLKD, mask ? 3 : 2, in, NULL, fp);
}

kd_node *kd_fkl_tnode(kd_graph *g, kd_node *s, kd_node *t, kd_node *T, kd_node *mask) {
    kd_node *in[4] = {s, t, T, mask};
    return kd_graph_add_op(g, KD_OP_FKL_TNODE, mask ? 4 : 3, in);
}

kd_node *kd_grad_reverse(kd_graph *g, kd_node *x, float lambda) {
    float fp[8] = {lambda};
    return kd_graph_add_op_ex(g, KD_OP_GRAD_REVERSE, 1, &x, NULL, fp);
}

kd_node *kd_sigmoid_range(kd_graph *g, kd_node *x, float lo, float hi, float offset) {
    KD_ASSERT(lo < hi, "sigmoid range [%g, %g]", (double)lo, (double)hi);
    float fp[8] = {lo, hi, offset};
    return kd_graph_add_op_ex(g, KD_OP_SIGMOID_RANGE, 1, &x, NULL, fp);
}
