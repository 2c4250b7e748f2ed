/* logit.c - the logit distillation losses: the divergences between the
 * softmax(z/T) of student and teacher (kd/fkl, rkl, jsd, tvd, skl, srkl),
 * decoupled KD (DKD), DIST, normalised KD (NKD), and the row-wise logit
 * standardisation that may precede them.
 *
 * Definitions are those of ../shared/LOSSES.md; the gradients are derived
 * in the comments below (and checked by tests/test_losses.c against finite
 * differences and PyTorch). Shared conventions:
 *   - logits s, t of any rank; the last dim is K, rows = numel / K;
 *   - per row, log p = z/T - lse(z/T) with a max-subtracted log-sum-exp in
 *     double; every log-probability comes from that difference, never from
 *     the log of a probability that may have underflowed, and the mixtures
 *     of JSD/SKL/SRKL are formed in log space:
 *       log m = lse(log w + log p_a, log(1-w) + log p_b);
 *   - losses are summed over K and averaged over the rows kept (mask > 0;
 *     none kept: loss 0, no gradient); per-row values land in the workspace
 *     and are summed serially in double, so the value does not depend on the
 *     thread count;
 *   - gradients go to s (input 0) only: t is detached, also when it is
 *     itself trainable (mutual learning).
 *
 * Gradients are written through the softmax Jacobian in closed form. With
 * a = z_s/T, p = p_s and G_k = dL/dp_k, dL/da_k = p_k (G_k - sum_j p_j G_j):
 *   fkl   p_k - q_k                                  (q = p_t)
 *   rkl   p_k (log p_k - log q_k - L_row)
 *   jsd   (1-b) p_k (log p_k - log m_k - KL(p||m))   m = b q + (1-b) p
 *   tvd   p_k (sgn(p_k - q_k)/2 - c), c = sum_j p_j sgn(p_j - q_j)/2
 *         (subgradient 0 where p_k == q_k)
 *   skl   (1-a)(p_k c - p_k q_k / m_k), c = sum_j p_j q_j / m_j,  m = a q + (1-a) p
 *   srkl  p_k (G_k - c), G_k = log p_k - log m_k - a p_k / m_k, m = a p + (1-a) q
 * and dL/dz = dL/da / T.
 *
 * DKD. mdistiller forms the non-target distribution as softmax(z/T - 1000 *
 * onehot(y)); we take the exact softmax over the K-1 non-target classes
 * (log q_k = z_k/T - lse_{j!=y}(z_j/T)). The two differ only by the
 * target's leftover weight exp(-1000 + (z_y - max_{j!=y} z_j)/T), which is
 * 0 in float32 unless the target logit leads by ~900 T; the PyTorch
 * reference (tests/fixtures/gen_losses.py) uses the exact form.
 * The binary part uses log p_y = z_y/T - lse and log(1 - p_y) = lse_{j!=y} -
 * lse (LOSSES.md "Numerics").
 *
 * NKD (Yang et al. 2023, the authors' NKDLoss): per row
 *   -t_y * log s_y                      at temperature 1, t_y detached
 *   - gamma T^2 sum_{k!=y} qt_k log qs_k  qt, qs = softmax over the K-1
 *                                         non-target classes of z/T
 * averaged over rows. The second term is a cross-entropy (it keeps the
 * teacher's entropy), as in the paper's code; its gradient is that of KL.
 *
 * DKD and NKD take labels as floats holding class ids in [0, K) (asserted;
 * there is no ignore index); DKD, DIST and NKD average over all rows (no
 * mask in the header's signatures).
 *
 * Not here: cross-entropy with labels (src/ops/loss.c), the weighting of
 * terms and DKD's warm-up (kd_scale nodes), feature losses (feature.c).
 */
#include <math.h>
#include <string.h>

#include "kd_distill.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops/ops.h"


/* as row_lse, over the classes k != skip */
static double row_lse_skip(const float *x, int K, double invT, int skip) {
    float m = -INFINITY;
    for (int k = 0; k < K; k++)
        if (k != skip && x[k] > m) m = x[k];
    double ms = (double)m * invT, s = 0.0;
    for (int k = 0; k < K; k++)
        if (k != skip) s += exp((double)x[k] * invT - ms);
    return ms + log(s);
}

/* log(e^x + e^y), also when one of them is -inf */
static inline double lse2(double x, double y) {
    double m = x > y ? x : y;
    if (m == -INFINITY) return m;
    return m + log1p(exp(-fabs(x - y)));
}

static inline double sgn(double x) { return (double)((x > 0.0) - (x < 0.0)); }

/* the output of every loss: a scalar */
static void scalar_out(kd_node *n) {
    n->val.ndim = 1;
    n->val.shape[0] = 1;
}

/* s and t the same shape, ndim >= 1, at least min_k classes; input `rows_in`
 * (mask or labels, may be absent) with one value per row */
static kd_status pair_infer(kd_node *n, int min_k, int rows_in, const char *what) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    int same = s->ndim == t->ndim && s->ndim >= 1;
    for (int i = 0; same && i < s->ndim; i++) same = s->shape[i] == t->shape[i];
    if (!same) return kd_op_shape_error(n, "student and teacher logits must have the same shape");
    if (s->shape[s->ndim - 1] < min_k) return kd_op_shape_error(n, "too few classes");
    if (rows_in < n->n_in) {
        int R, K;
        kd_rows_k(s, &R, &K);
        if (kd_numel(&n->in[rows_in]->val) != R) return kd_op_shape_error(n, what);
    }
    scalar_out(n);
    return KD_OK;
}

/* the label of row r, checked */
static inline int row_label(const kd_node *n, const float *lab, int r, int K) {
    int y = (int)lab[r];
    KD_ASSERT(y >= 0 && y < K && (float)y == lab[r], "label %g of row %d out of range for %d classes in '%s'",
              (double)lab[r], r, K, n->name);
    return y;
}

/* rows with a label >= 0 (unlabelled rows, label -1, are skipped by the
 * label-based losses DKD and NKD, as by the cross-entropy) */
static int labelled_rows(const float *lab, int R) {
    int k = 0;
    for (int r = 0; r < R; r++) k += lab[r] >= 0.0f;
    return k;
}

/* the loss from per-row values w[r*stride] (rows kept or all), summed in
 * row order in double */
static double sum_rows(const double *w, int R, int stride) {
    double s = 0.0;
    for (int r = 0; r < R; r++) s += w[(size_t)r * stride];
    return s;
}

/* ================================================================ divergence
 * inputs s, t (R,K), mask (R) optional; ip[0] kind; fp[0] T, fp[1] param,
 * fp[2] scale. ws per row: lse_s, lse_t, loss, c (the row constant of the
 * gradient), kept (1/0), and for the float path (fkl, rkl) the row maxima
 * of s and t. */

enum { DIV_WS = 7 };

static kd_status div_infer(kd_node *n) { return pair_infer(n, 1, 2, "the mask needs one value per row of logits"); }

static size_t div_ws(const kd_node *n, int threads) {
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    /* + per thread 2K floats of scratch for the float path */
    return (size_t)R * DIV_WS * sizeof(double) + (size_t)threads * 2 * K * sizeof(float);
}

/* Log-weights of the mixture log m = lse(lwt + log q, lws + log p), q the
 * teacher's and p the student's probabilities. */
static void mix_weights(int kind, double prm, double *lwt, double *lws) {
    *lwt = *lws = -INFINITY;
    if (kind == KD_DIV_JSD || kind == KD_DIV_SKL) { /* m = prm q + (1-prm) p */
        *lwt = log(prm);
        *lws = log1p(-prm);
    } else if (kind == KD_DIV_SRKL) { /* m = prm p + (1-prm) q */
        *lws = log(prm);
        *lwt = log1p(-prm);
    }
}

/* FKL and RKL over rows of at least DIV_FAST_K classes (vocabularies: the
 * token-level workhorses): float log-probabilities and the vectorised exp
 * of ops.h (relative error <= 7.9e-8), sums in double; float32 accuracy,
 * as PyTorch's own float32 log_softmax, at several times the speed of the
 * double path. Narrower rows (image classes) keep the double path, where
 * the cost is nothing and the extra digits are free. */
enum { DIV_FAST_K = 128 };

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static float row_max(const float *x, int K) {
    float m = x[0];
    for (int k = 1; k < K; k++) m = x[k] > m ? x[k] : m;
    return m;
}

/* sum of x (K) in double, four accumulators (a fixed order) */
static double sum_f(const float *x, int K) {
    double a[4] = {0.0, 0.0, 0.0, 0.0};
    int k = 0;
    for (; k + 4 <= K; k += 4)
        for (int j = 0; j < 4; j++) a[j] += (double)x[k + j];
    for (; k < K; k++) a[0] += (double)x[k];
    return (a[0] + a[1]) + (a[2] + a[3]);
}

/* One row, as div_row for fkl/rkl, but w[0], w[1] hold log sum exp((z -
 * max)/T) and w[5], w[6] the maxima. With a = (zt - mt)/T, b = (zs - ms)/T,
 * cs, ct the row constants: lq - lp = a - b - ct + cs, so
 *   fkl = sum_k e^a (a - b) / sum e^a + cs - ct,
 *   rkl = sum_k e^b (b - a) / sum e^b + ct - cs.
 * buf: 2K floats of scratch. */
static void div_row_fast(double *w, float *buf, const float *zs, const float *zt, int K, float invT, int kind) {
    float *es = buf, *et = buf + K;
    float ms = row_max(zs, K), mt = row_max(zt, K);
    for (int k = 0; k < K; k++) {
        es[k] = kd_exp_vec((zs[k] - ms) * invT);
        et[k] = kd_exp_vec((zt[k] - mt) * invT);
    }
    double Ss = sum_f(es, K), St = sum_f(et, K), cs = log(Ss), ct = log(St), loss;
    if (kind == KD_DIV_FKL) {
        for (int k = 0; k < K; k++) es[k] = et[k] * (((zt[k] - mt) - (zs[k] - ms)) * invT);
        loss = sum_f(es, K) / St + cs - ct;
    } else {
        for (int k = 0; k < K; k++) es[k] = es[k] * (((zs[k] - ms) - (zt[k] - mt)) * invT);
        loss = sum_f(es, K) / Ss + ct - cs;
    }
    w[0] = cs;
    w[1] = ct;
    w[2] = loss;
    w[3] = kind == KD_DIV_RKL ? loss : 0.0;
    w[5] = ms;
    w[6] = mt;
}

/* One row: fills w[0..3] = lse_s, lse_t, loss, c. zs, zt (K) */
static void div_row(double *w, const float *zs, const float *zt, int K, double invT, int kind, double prm) {
    double ls = kd_row_lse(zs, K, invT), lt = kd_row_lse(zt, K, invT), lwt, lws;
    mix_weights(kind, prm, &lwt, &lws);
    double loss = 0.0, c = 0.0;
    for (int k = 0; k < K; k++) {
        double lp = zs[k] * invT - ls, lq = zt[k] * invT - lt, p = exp(lp), q = exp(lq), lm;
        switch (kind) {
        case KD_DIV_FKL:
            loss += q * (lq - lp);
            break;
        case KD_DIV_RKL:
            loss += p * (lp - lq);
            break;
        case KD_DIV_JSD:
            lm = lse2(lwt + lq, lws + lp);
            loss += prm * q * (lq - lm) + (1.0 - prm) * p * (lp - lm);
            c += p * (lp - lm);
            break;
        case KD_DIV_TVD:
            loss += 0.5 * fabs(p - q);
            c += 0.5 * p * sgn(p - q);
            break;
        case KD_DIV_SKL:
            lm = lse2(lwt + lq, lws + lp);
            loss += q * (lq - lm);
            c += exp(lp + lq - lm);
            break;
        case KD_DIV_SRKL:
            lm = lse2(lwt + lq, lws + lp);
            loss += p * (lp - lm);
            c += p * (lp - lm - prm * exp(lp - lm));
            break;
        }
    }
    if (kind == KD_DIV_RKL) c = loss;
    w[0] = ls;
    w[1] = lt;
    w[2] = loss;
    w[3] = c;
}

static void div_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data;
    const float *mask = n->n_in > 2 ? n->in[2]->val.data : NULL;
    double invT = 1.0 / n->fp[0], prm = n->fp[1];
    int kind = n->ip[0];
    double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        double *w = ws + (size_t)r * DIV_WS;
        if (mask && !(mask[r] > 0.0f)) {
            memset(w, 0, DIV_WS * sizeof *w);
            continue;
        }
        if ((kind == KD_DIV_FKL || kind == KD_DIV_RKL) && K >= DIV_FAST_K)
            div_row_fast(w, (float *)(ws + (size_t)R * DIV_WS) + (size_t)thread_id() * 2 * K, s + (size_t)r * K,
                         t + (size_t)r * K, K, (float)invT, kind);
        else
            div_row(w, s + (size_t)r * K, t + (size_t)r * K, K, invT, kind, prm);
        w[4] = 1.0;
    }
    double kept = sum_rows(ws + 4, R, DIV_WS);
    n->val.data[0] = kept > 0.0 ? (float)(n->fp[2] * sum_rows(ws + 2, R, DIV_WS) / kept) : 0.0f;
}

static void div_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    if (!(n->in[0]->flags & KD_F_NEED_GRAD)) return;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const double *ws = n->ws;
    double kept = sum_rows(ws + 4, R, DIV_WS);
    if (kept == 0.0) return;
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data;
    float *ds = n->in[0]->grad.data;
    double invT = 1.0 / n->fp[0], prm = n->fp[1], lwt, lws;
    double gs = (double)n->grad.data[0] * n->fp[2] * invT / kept;
    int kind = n->ip[0];
    mix_weights(kind, prm, &lwt, &lws);
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const double *w = ws + (size_t)r * DIV_WS;
        if (w[4] == 0.0) continue;
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        float *dz = ds + (size_t)r * K;
        double ls = w[0], lt = w[1], L = w[2], c = w[3];
        if ((kind == KD_DIV_FKL || kind == KD_DIV_RKL) && K >= DIV_FAST_K) { /* as div_row_fast */
            float fi = (float)invT, fls = (float)ls, flt = (float)lt, fL = (float)L, fg = (float)gs;
            float ms = (float)w[5], mt = (float)w[6];
            if (kind == KD_DIV_FKL)
                for (int k = 0; k < K; k++)
                    dz[k] += fg * (kd_exp_vec((zs[k] - ms) * fi - fls) - kd_exp_vec((zt[k] - mt) * fi - flt));
            else
                for (int k = 0; k < K; k++) {
                    float lp = (zs[k] - ms) * fi - fls, lq = (zt[k] - mt) * fi - flt;
                    dz[k] += fg * kd_exp_vec(lp) * (lp - lq - fL);
                }
            continue;
        }
        for (int k = 0; k < K; k++) {
            double lp = zs[k] * invT - ls, lq = zt[k] * invT - lt, p = exp(lp), d = 0.0, lm;
            switch (kind) {
            case KD_DIV_FKL:
                d = p - exp(lq);
                break;
            case KD_DIV_RKL:
                d = p * (lp - lq - L);
                break;
            case KD_DIV_JSD:
                lm = lse2(lwt + lq, lws + lp);
                d = (1.0 - prm) * p * (lp - lm - c);
                break;
            case KD_DIV_TVD:
                d = p * (0.5 * sgn(p - exp(lq)) - c);
                break;
            case KD_DIV_SKL:
                lm = lse2(lwt + lq, lws + lp);
                d = (1.0 - prm) * (p * c - exp(lp + lq - lm));
                break;
            case KD_DIV_SRKL:
                lm = lse2(lwt + lq, lws + lp);
                d = p * (lp - lm - prm * exp(lp - lm) - c);
                break;
            }
            dz[k] += (float)(gs * d);
        }
    }
}

const kd_op_def kd_op_divergence = {
    .name = "divergence", .infer = div_infer, .workspace = div_ws, .forward = div_forward, .backward = div_backward};

/* ================================================================ DKD
 * inputs s, t (R,K), labels (R); fp[0] alpha, fp[1] beta, fp[2] T.
 * ws per row: lse and non-target lse of s and of t (at T), loss. */

enum { DKD_WS = 5 };

static kd_status dkd_infer(kd_node *n) { return pair_infer(n, 2, 2, "labels need one value per row of logits"); }

static size_t dkd_ws(const kd_node *n, int threads) {
    (void)threads;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    return (size_t)R * DKD_WS * sizeof(double);
}

static void dkd_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data, *lab = n->in[2]->val.data;
    double alpha = n->fp[0], beta = n->fp[1], T = n->fp[2], invT = 1.0 / T;
    double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        double *w = ws + (size_t)r * DKD_WS;
        if (lab[r] < 0.0f) { /* unlabelled: no target class, no term */
            w[4] = 0.0;
            continue;
        }
        int y = row_label(n, lab, r, K);
        double ls = kd_row_lse(zs, K, invT), lns = row_lse_skip(zs, K, invT, y);
        double lt = kd_row_lse(zt, K, invT), lnt = row_lse_skip(zt, K, invT, y);
        /* binary [p_y, 1 - p_y] in log space */
        double lbs0 = zs[y] * invT - ls, lbs1 = lns - ls, lbt0 = zt[y] * invT - lt, lbt1 = lnt - lt;
        double tckd = exp(lbt0) * (lbt0 - lbs0) + exp(lbt1) * (lbt1 - lbs1);
        double nckd = 0.0;
        for (int k = 0; k < K; k++) {
            if (k == y) continue;
            double lqs = zs[k] * invT - lns, lqt = zt[k] * invT - lnt;
            nckd += exp(lqt) * (lqt - lqs);
        }
        w[0] = ls;
        w[1] = lns;
        w[2] = lt;
        w[3] = lnt;
        w[4] = T * T * (alpha * tckd + beta * nckd);
    }
    int kept = labelled_rows(lab, R);
    n->val.data[0] = kept ? (float)(sum_rows(ws + 4, R, DKD_WS) / kept) : 0.0f;
}

/* d/da_k (a = z_s/T): alpha * (b_s0 - b_t0) at k = y;
 * alpha * qs_k (b_s1 - b_t1) + beta (qs_k - qt_k) elsewhere */
static void dkd_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    if (!(n->in[0]->flags & KD_F_NEED_GRAD)) return;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data, *lab = n->in[2]->val.data;
    float *ds = n->in[0]->grad.data;
    double alpha = n->fp[0], beta = n->fp[1], T = n->fp[2], invT = 1.0 / T;
    int kept = labelled_rows(lab, R);
    if (!kept) return;
    double gs = (double)n->grad.data[0] * T / kept; /* T^2 from the loss, 1/T from a = z/T */
    const double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        const double *w = ws + (size_t)r * DKD_WS;
        float *dz = ds + (size_t)r * K;
        if (lab[r] < 0.0f) continue;
        int y = (int)lab[r];
        double ls = w[0], lns = w[1], lt = w[2], lnt = w[3];
        double bs0 = exp(zs[y] * invT - ls), bt0 = exp(zt[y] * invT - lt);
        double db1 = exp(lns - ls) - exp(lnt - lt); /* b_s1 - b_t1 */
        for (int k = 0; k < K; k++) {
            double d;
            if (k == y) {
                d = alpha * (bs0 - bt0);
            } else {
                double qs = exp(zs[k] * invT - lns), qt = exp(zt[k] * invT - lnt);
                d = alpha * qs * db1 + beta * (qs - qt);
            }
            dz[k] += (float)(gs * d);
        }
    }
}

const kd_op_def kd_op_dkd = {
    .name = "dkd", .infer = dkd_infer, .workspace = dkd_ws, .forward = dkd_forward, .backward = dkd_backward};

/* ================================================================ DIST
 * inputs s, t (R,K); fp[0] beta, fp[1] gamma, fp[2] tau.
 * rho(a, b) = sum(a'b') / (|a'||b'| + 1e-8), a' = a - mean(a); per row
 * (inter) and per column (intra) of y = softmax(z/tau).
 * d rho / d a_i = b'_i / D - c |b'| a'_i / (|a'| D^2)  (c = sum a'b', D the
 * denominator); the centring adds nothing since both terms have zero mean.
 * ws (double): y_s (R,K), y_t (R,K), row stats (R,5), column stats (K,5);
 * stats are mean_s, mean_t, c, |a'|, |b'|. The Pearson terms cancel
 * (1 - rho with rho near 1), so the probabilities are kept in double. */

enum { DIST_ST = 5 };

static kd_status dist_infer(kd_node *n) { return pair_infer(n, 1, 2, "(no third input)"); }

static size_t dist_ws(const kd_node *n, int threads) {
    (void)threads;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    return ((size_t)2 * R * K + (size_t)DIST_ST * (R + K)) * sizeof(double);
}

typedef struct dist_geom {
    int R, K;
    double *ys, *yt, *rows, *cols;
} dist_geom;

/* the workspace is laid out for the current R (written and read at the
 * same batch) */
static dist_geom dist_geom_of(kd_node *n) {
    dist_geom q;
    kd_rows_k(&n->in[0]->val, &q.R, &q.K);
    q.ys = n->ws;
    q.yt = q.ys + (size_t)q.R * q.K;
    q.rows = q.yt + (size_t)q.R * q.K;
    q.cols = q.rows + (size_t)DIST_ST * q.R;
    return q;
}

/* Pearson statistics of a (n) and b (n) with the given stride */
static void pearson_stats(double *st, const double *a, const double *b, int n, size_t stride) {
    double ma = 0.0, mb = 0.0;
    for (int i = 0; i < n; i++) {
        ma += a[i * stride];
        mb += b[i * stride];
    }
    ma /= n;
    mb /= n;
    double c = 0.0, aa = 0.0, bb = 0.0;
    for (int i = 0; i < n; i++) {
        double da = a[i * stride] - ma, db = b[i * stride] - mb;
        c += da * db;
        aa += da * da;
        bb += db * db;
    }
    st[0] = ma;
    st[1] = mb;
    st[2] = c;
    st[3] = sqrt(aa);
    st[4] = sqrt(bb);
}

static inline double pearson(const double *st) { return st[2] / (st[3] * st[4] + 1e-8); }

/* d rho / d a_i for the element with values a, b */
static inline double pearson_grad(const double *st, double a, double b) {
    double D = st[3] * st[4] + 1e-8, g = (b - st[1]) / D;
    if (st[3] > 0.0) g -= st[2] * st[4] * (a - st[0]) / (st[3] * D * D);
    return g;
}

static void softmax_row_d(double *y, const float *z, int K, double invT) {
    double l = kd_row_lse(z, K, invT);
    for (int k = 0; k < K; k++) y[k] = exp(z[k] * invT - l);
}

static void dist_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    dist_geom q = dist_geom_of(n);
    int R = q.R, K = q.K;
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data;
    double beta = n->fp[0], gamma = n->fp[1], tau = n->fp[2], invT = 1.0 / tau;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        size_t o = (size_t)r * K;
        softmax_row_d(q.ys + o, s + o, K, invT);
        softmax_row_d(q.yt + o, t + o, K, invT);
        pearson_stats(q.rows + (size_t)r * DIST_ST, q.ys + o, q.yt + o, K, 1);
    }
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int k = 0; k < K; k++) pearson_stats(q.cols + (size_t)k * DIST_ST, q.ys + k, q.yt + k, R, (size_t)K);
    double inter = 0.0, intra = 0.0;
    for (int r = 0; r < R; r++) inter += pearson(q.rows + (size_t)r * DIST_ST);
    for (int k = 0; k < K; k++) intra += pearson(q.cols + (size_t)k * DIST_ST);
    inter = 1.0 - inter / R;
    intra = 1.0 - intra / K;
    n->val.data[0] = (float)(tau * tau * (beta * inter + gamma * intra));
}

static void dist_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    if (!(n->in[0]->flags & KD_F_NEED_GRAD)) return;
    dist_geom q = dist_geom_of(n);
    int R = q.R, K = q.K;
    double beta = n->fp[0], gamma = n->fp[1], tau = n->fp[2];
    double gup = n->grad.data[0];
    /* dL/dy = -tau^2 (beta/R drho_row + gamma/K drho_col); dL/dz = y (G - y.G) / tau */
    double wr = -gup * tau * tau * beta / R, wc = -gup * tau * tau * gamma / K, gz = 1.0 / tau;
    float *ds = n->in[0]->grad.data;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        size_t o = (size_t)r * K;
        const double *ys = q.ys + o, *yt = q.yt + o, *rs = q.rows + (size_t)r * DIST_ST;
        double dot = 0.0;
        for (int k = 0; k < K; k++) {
            double G =
                wr * pearson_grad(rs, ys[k], yt[k]) + wc * pearson_grad(q.cols + (size_t)k * DIST_ST, ys[k], yt[k]);
            dot += ys[k] * G;
        }
        for (int k = 0; k < K; k++) {
            double G =
                wr * pearson_grad(rs, ys[k], yt[k]) + wc * pearson_grad(q.cols + (size_t)k * DIST_ST, ys[k], yt[k]);
            ds[o + k] += (float)(gz * ys[k] * (G - dot));
        }
    }
}

const kd_op_def kd_op_dist = {
    .name = "dist", .infer = dist_infer, .workspace = dist_ws, .forward = dist_forward, .backward = dist_backward};

/* ================================================================ NKD
 * inputs s, t (R,K), labels (R); fp[0] T, fp[1] gamma.
 * ws per row: lse of s at T=1, non-target lse of s and of t at T, the
 * teacher's target probability t_y at T=1, loss. */

enum { NKD_WS = 5 };

static kd_status nkd_infer(kd_node *n) { return pair_infer(n, 2, 2, "labels need one value per row of logits"); }

static size_t nkd_ws(const kd_node *n, int threads) {
    (void)threads;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    return (size_t)R * NKD_WS * sizeof(double);
}

static void nkd_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data, *lab = n->in[2]->val.data;
    double T = n->fp[0], gamma = n->fp[1], invT = 1.0 / T;
    double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        double *w = ws + (size_t)r * NKD_WS;
        if (lab[r] < 0.0f) { /* unlabelled: no target class, no term */
            w[4] = 0.0;
            continue;
        }
        int y = row_label(n, lab, r, K);
        double l1s = kd_row_lse(zs, K, 1.0), ty = exp(zt[y] - kd_row_lse(zt, K, 1.0));
        double lns = row_lse_skip(zs, K, invT, y), lnt = row_lse_skip(zt, K, invT, y);
        double ce = 0.0;
        for (int k = 0; k < K; k++) {
            if (k == y) continue;
            double lqt = zt[k] * invT - lnt;
            ce -= exp(lqt) * (zs[k] * invT - lns);
        }
        w[0] = l1s;
        w[1] = lns;
        w[2] = lnt;
        w[3] = ty;
        w[4] = -ty * (zs[y] - l1s) + gamma * T * T * ce;
    }
    int kept = labelled_rows(lab, R);
    n->val.data[0] = kept ? (float)(sum_rows(ws + 4, R, NKD_WS) / kept) : 0.0f;
}

/* dz_k = t_y (s_k - [k=y]) + [k!=y] gamma T (qs_k - qt_k) */
static void nkd_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    if (!(n->in[0]->flags & KD_F_NEED_GRAD)) return;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data, *lab = n->in[2]->val.data;
    float *ds = n->in[0]->grad.data;
    double T = n->fp[0], gamma = n->fp[1], invT = 1.0 / T;
    int kept = labelled_rows(lab, R);
    if (!kept) return;
    double gs = (double)n->grad.data[0] / kept;
    const double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        const double *w = ws + (size_t)r * NKD_WS;
        float *dz = ds + (size_t)r * K;
        if (lab[r] < 0.0f) continue;
        int y = (int)lab[r];
        double l1s = w[0], lns = w[1], lnt = w[2], ty = w[3];
        for (int k = 0; k < K; k++) {
            double d = ty * (exp(zs[k] - l1s) - (k == y));
            if (k != y) d += gamma * T * (exp(zs[k] * invT - lns) - exp(zt[k] * invT - lnt));
            dz[k] += (float)(gs * d);
        }
    }
}

const kd_op_def kd_op_nkd = {
    .name = "nkd", .infer = nkd_infer, .workspace = nkd_ws, .forward = nkd_forward, .backward = nkd_backward};

/* ================================================================ standardize
 * z (R,K) -> (z - mean) / (std + 1e-7), std = sqrt(sum (z-mean)^2 / (K-1)).
 * With d = z - mean, s = std + 1e-7 and upstream g:
 *   dz_j = (g_j - mean(g)) / s - d_j sum_k(g_k d_k) / (s^2 std (K-1))
 * ws per row: mean, std (double). */

#define STD_EPS 1e-7

static kd_status std_infer(kd_node *n) {
    const kd_tensor *z = &n->in[0]->val;
    if (z->ndim < 1 || z->shape[z->ndim - 1] < 2)
        return kd_op_shape_error(n, "standardize needs at least 2 values per row");
    n->val = *z;
    n->val.data = NULL;
    return KD_OK;
}

static size_t std_ws(const kd_node *n, int threads) {
    (void)threads;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    return (size_t)R * 2 * sizeof(double);
}

static void std_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *x = n->in[0]->val.data;
    float *out = n->val.data;
    double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *z = x + (size_t)r * K;
        float *y = out + (size_t)r * K;
        double m = 0.0, v = 0.0;
        for (int k = 0; k < K; k++) m += z[k];
        m /= K;
        for (int k = 0; k < K; k++) v += (z[k] - m) * (z[k] - m);
        double sd = sqrt(v / (K - 1)), inv = 1.0 / (sd + STD_EPS);
        for (int k = 0; k < K; k++) y[k] = (float)((z[k] - m) * inv);
        ws[2 * r] = m;
        ws[2 * r + 1] = sd;
    }
}

static void std_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    if (!(n->in[0]->flags & KD_F_NEED_GRAD)) return;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *x = n->in[0]->val.data, *gy = n->grad.data;
    float *gx = n->in[0]->grad.data;
    const double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *z = x + (size_t)r * K, *g = gy + (size_t)r * K;
        float *dz = gx + (size_t)r * K;
        double m = ws[2 * r], sd = ws[2 * r + 1], sg = 0.0, sgd = 0.0;
        for (int k = 0; k < K; k++) {
            sg += g[k];
            sgd += g[k] * (z[k] - m);
        }
        double is = 1.0 / (sd + STD_EPS), gm = sg / K;
        double c = sd > 0.0 ? sgd * is * is / (sd * (K - 1)) : 0.0;
        for (int k = 0; k < K; k++) dz[k] += (float)((g[k] - gm) * is - (z[k] - m) * c);
    }
}

const kd_op_def kd_op_standardize = {
    .name = "standardize", .infer = std_infer, .workspace = std_ws, .forward = std_forward, .backward = std_backward};

/* ================================================================ builders */

kd_node *kd_divergence(kd_graph *g, kd_node *s, kd_node *t, kd_node *mask, kd_div_kind kind, float T, float param,
                       float scale) {
    KD_ASSERT(kind >= KD_DIV_FKL && kind <= KD_DIV_SRKL, "divergence kind %d", (int)kind);
    KD_ASSERT(T > 0.0f, "temperature %g", (double)T);
    if (kind == KD_DIV_JSD) KD_ASSERT(param > 0.0f && param < 1.0f, "jsd beta %g outside (0, 1)", (double)param);
    if (kind == KD_DIV_SKL || kind == KD_DIV_SRKL)
        KD_ASSERT(param >= 0.0f && param < 1.0f, "skew alpha %g outside [0, 1)", (double)param);
    kd_node *in[3] = {s, t, mask};
    int ip[8] = {(int)kind};
    float fp[8] = {T, param, scale};
    return kd_graph_add_op_ex(g, KD_OP_DIVERGENCE, mask ? 3 : 2, in, ip, fp);
}

kd_node *kd_dkd(kd_graph *g, kd_node *s, kd_node *t, kd_node *labels, float alpha, float beta, float T) {
    KD_ASSERT(T > 0.0f, "temperature %g", (double)T);
    kd_node *in[3] = {s, t, labels};
    float fp[8] = {alpha, beta, T};
    return kd_graph_add_op_ex(g, KD_OP_DKD, 3, in, NULL, fp);
}

kd_node *kd_dist(kd_graph *g, kd_node *s, kd_node *t, float beta, float gamma, float tau) {
    KD_ASSERT(tau > 0.0f, "temperature %g", (double)tau);
    kd_node *in[2] = {s, t};
    float fp[8] = {beta, gamma, tau};
    return kd_graph_add_op_ex(g, KD_OP_DIST, 2, in, NULL, fp);
}

kd_node *kd_nkd(kd_graph *g, kd_node *s, kd_node *t, kd_node *labels, float T, float gamma) {
    KD_ASSERT(T > 0.0f, "temperature %g", (double)T);
    kd_node *in[3] = {s, t, labels};
    float fp[8] = {T, gamma};
    return kd_graph_add_op_ex(g, KD_OP_NKD, 3, in, NULL, fp);
}

kd_node *kd_standardize(kd_graph *g, kd_node *z) { return kd_graph_add_op(g, KD_OP_STANDARDIZE, 1, &z); }
