/* rank.c - rank alignment of the peak tokens (RLKD: Peng & Zhang, "Enhancing
 * Knowledge Distillation of Large Language Models through Efficient
 * Multi-Modal Distribution Alignment", COLING 2025): a term, added to any
 * divergence, that asks the student to order the teacher's and its own
 * most likely tokens as the teacher does. docs/losses/rlkd.md has the
 * paper's definition and where we depart from it.
 *
 * Per row (s, t logits (..., V), rows = numel / V, kept where mask > 0):
 *   P     = top_k(t) followed by the ids of top_k(s) not already in it:
 *           the union of the two top-k sets (k..2k ids, "the peaks"); ties
 *           broken toward the lower id, so the set is deterministic
 *   a, b  = s[P], t[P]                                     (m values each)
 *   x_i   = sum_{j != i} (sigmoid((a_j - a_i)/tau) - 1/2)  = soft rank - (m+1)/2
 *   y_i   = the same with b                                (teacher, soft too)
 *   rho   = <x, y> / (|x| |y|)                             (Pearson of the ranks)
 *   loss  = mean over kept rows of (1 - rho)
 * The soft rank r_i = 1 + sum_{j != i} sigmoid((a_j - a_i)/tau) is 1 for
 * the largest value; its mean is exactly (m+1)/2 (sigmoid(d) + sigmoid(-d)
 * = 1), so the centred rank is computed directly, as 0.5 tanh(d/2) sums,
 * with no cancellation. A row whose student or teacher ranks are constant
 * (|x| or |y| <= 1e-6: all peak logits equal to float precision) has no
 * correlation: it counts rho = 0 (loss 1) and gets no gradient.
 *
 * Gradient (teacher detached; P is piecewise constant in s, so only the
 * values a move). With u = x/|x|, v = y/|y| and g_i = d rho / d x_i =
 * (v_i - rho u_i) / |x| (already zero-mean, so the centring passes it
 * through), and sigma'(d) = sigmoid(d)(1 - sigmoid(d)), even in d:
 *   d x_i / d a_i = -1/tau sum_{j != i} sigma'_ij,  d x_i / d a_j = 1/tau sigma'_ij
 *   d rho / d a_l = 1/tau sum_{j != l} sigma'((a_j - a_l)/tau) (g_j - g_l)
 *   d loss / d s[P_l] = -(1/N) d rho / d a_l          (N kept rows)
 * Everything per row is O(V) for the two selections plus O(m^2) pairs.
 *
 * Workspace, per row (sized at compile for the largest batch): doubles
 * {kept, rho, |x|, valid}, x (2k), v (2k); ints m, P (2k). Forward fills it
 * (OpenMP over rows, each row its own slice; the loss is summed serially,
 * so it does not depend on the thread count); backward reads it and the
 * student's logits.
 *
 * Not here: the torchsort soft rank of the authors' code (see the doc page),
 * any temperature on the logits (scaling the logits by 1/T is the same as
 * tau * T), the weighting against the divergence (a kd_scale node).
 */
#include <math.h>
#include <string.h>

#include "kd_distill.h"
#include "ops/ops.h"

/* ip[0] k; fp[0] tau */

enum { RK_ST = 4 }; /* per-row doubles before x: kept, rho, |x|, valid */

#define RK_DEGENERATE 1e-6


typedef struct rk_ws {
    int R, M;  /* rows, 2k */
    double *d; /* (R, RK_ST + 2M) */
    int *id;   /* (R, 1 + M): m, then P */
} rk_ws;

static rk_ws rk_ws_of(const kd_node *n) {
    rk_ws w;
    int V;
    kd_rows_k(&n->in[0]->val, &w.R, &V);
    w.M = 2 * n->ip[0];
    w.d = n->ws;
    w.id = (int *)(w.d + (size_t)w.R * (RK_ST + 2 * (size_t)w.M));
    return w;
}

static size_t rk_ws_bytes(const kd_node *n, int threads) {
    (void)threads;
    int R, V;
    kd_rows_k(&n->in[0]->val, &R, &V);
    size_t M = 2 * (size_t)n->ip[0];
    return (size_t)R * ((RK_ST + 2 * M) * sizeof(double) + (1 + M) * sizeof(int));
}

static kd_status rk_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    int same = s->ndim == t->ndim && s->ndim >= 1;
    for (int i = 0; same && i < s->ndim; i++) same = s->shape[i] == t->shape[i];
    if (!same) return kd_op_shape_error(n, "student and teacher logits must have the same shape");
    int R, V;
    kd_rows_k(s, &R, &V);
    if (n->ip[0] > V) {
        char what[128];
        snprintf(what, sizeof what, "k=%d peak tokens asked for, but the rows hold only V=%d logits", n->ip[0], V);
        return kd_op_shape_error(n, what);
    }
    if (n->n_in > 2 && kd_numel(&n->in[2]->val) != R)
        return kd_op_shape_error(n, "the mask needs one value per row of logits");
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

/* out (k): the ids of the k largest z (V), largest first, ties toward the
 * lower id. One pass; each id is compared with the current k-th first. */
static void topk_ids(int *out, const float *z, int V, int k) {
    int cnt = 0;
    for (int i = 0; i < V; i++) {
        int pos;
        if (cnt < k)
            pos = cnt++;
        else if (z[i] > z[out[k - 1]])
            pos = k - 1;
        else
            continue;
        while (pos > 0 && z[out[pos - 1]] < z[i]) { /* strict: an equal, earlier id stays ahead */
            out[pos] = out[pos - 1];
            pos--;
        }
        out[pos] = i;
    }
}

/* x (m): centred soft ranks of the values z[P] (1 = largest before
 * centring); returns |x| */
static double centred_ranks(double *x, const float *z, const int *P, int m, double inv_tau) {
    double nrm = 0.0;
    for (int i = 0; i < m; i++) x[i] = 0.0;
    for (int i = 0; i < m; i++)
        for (int j = i + 1; j < m; j++) {
            double h = 0.5 * tanh(0.5 * ((double)z[P[j]] - z[P[i]]) * inv_tau); /* sigmoid(d_ij) - 1/2 */
            x[i] += h;
            x[j] -= h;
        }
    for (int i = 0; i < m; i++) nrm += x[i] * x[i];
    return sqrt(nrm);
}

static void rk_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    rk_ws w = rk_ws_of(n);
    int R, V, k = n->ip[0], M = w.M;
    kd_rows_k(&n->in[0]->val, &R, &V);
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data;
    const float *mask = n->n_in > 2 ? n->in[2]->val.data : NULL;
    double inv_tau = 1.0 / n->fp[0];
    size_t dstride = RK_ST + 2 * (size_t)M, istride = 1 + (size_t)M;
#pragma omp parallel for if ((int64_t)R * V > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        double *st = w.d + (size_t)r * dstride, *x = st + RK_ST, *v = x + M;
        int *P = w.id + (size_t)r * istride + 1;
        memset(st, 0, RK_ST * sizeof *st);
        w.id[(size_t)r * istride] = 0;
        if (mask && !(mask[r] > 0.0f)) continue;
        const float *zs = s + (size_t)r * V, *zt = t + (size_t)r * V;
        /* the peaks: the teacher's top k, then the student's top k not among them */
        topk_ids(P, zt, V, k);
        topk_ids(P + k, zs, V, k);
        int m = k;
        for (int i = k; i < 2 * k; i++) {
            int dup = 0;
            for (int j = 0; j < k && !dup; j++) dup = P[j] == P[i];
            if (!dup) P[m++] = P[i];
        }
        w.id[(size_t)r * istride] = m;
        st[0] = 1.0;
        double nx = centred_ranks(x, zs, P, m, inv_tau), ny = centred_ranks(v, zt, P, m, inv_tau);
        if (nx <= RK_DEGENERATE || ny <= RK_DEGENERATE) continue; /* rho = 0, no gradient */
        double dot = 0.0;
        for (int i = 0; i < m; i++) {
            v[i] /= ny;
            dot += x[i] * v[i];
        }
        st[1] = dot / nx;
        st[2] = nx;
        st[3] = 1.0;
    }
    double N = 0.0, sum = 0.0;
    for (int r = 0; r < R; r++) {
        const double *st = w.d + (size_t)r * dstride;
        N += st[0];
        sum += st[0] * (1.0 - st[1]);
    }
    n->val.data[0] = N > 0.0 ? (float)(sum / N) : 0.0f;
}

static void rk_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *sn = n->in[0];
    if (!(sn->flags & KD_F_NEED_GRAD)) return;
    rk_ws w = rk_ws_of(n);
    int R, V, M = w.M;
    kd_rows_k(&sn->val, &R, &V);
    size_t dstride = RK_ST + 2 * (size_t)M, istride = 1 + (size_t)M;
    double N = 0.0;
    for (int r = 0; r < R; r++) N += w.d[(size_t)r * dstride];
    if (N == 0.0) return;
    double tau = n->fp[0], inv_tau = 1.0 / tau;
    double c = -(double)n->grad.data[0] / N * inv_tau; /* d loss / d rho_r times 1/tau */
    const float *s = sn->val.data;
    float *ds = sn->grad.data;
#pragma omp parallel for if ((int64_t)R * V > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const double *st = w.d + (size_t)r * dstride, *x = st + RK_ST, *v = x + M;
        if (st[3] == 0.0) continue;
        const int *P = w.id + (size_t)r * istride + 1;
        int m = w.id[(size_t)r * istride];
        const float *zs = s + (size_t)r * V;
        float *dz = ds + (size_t)r * V;
        double rho = st[1], nx = st[2];
        for (int l = 0; l < m; l++) {
            double gl = (v[l] - rho * x[l] / nx) / nx, acc = 0.0;
            for (int j = 0; j < m; j++) {
                if (j == l) continue;
                double th = tanh(0.5 * ((double)zs[P[j]] - zs[P[l]]) * inv_tau);
                double gj = (v[j] - rho * x[j] / nx) / nx;
                acc += 0.25 * (1.0 - th * th) * (gj - gl); /* sigma' = (1 - tanh^2(d/2)) / 4 */
            }
            dz[P[l]] += (float)(c * acc);
        }
    }
}

const kd_op_def kd_op_rank_align = {
    .name = "rank_align", .infer = rk_infer, .workspace = rk_ws_bytes, .forward = rk_forward, .backward = rk_backward};

kd_node *kd_rank_align(kd_graph *g, kd_node *s, kd_node *t, kd_node *mask, int k, float tau) {
    KD_ASSERT(k >= 2, "rank alignment over k=%d peak tokens (needs k >= 2)", k);
    KD_ASSERT(tau > 0.0f && isfinite(tau), "rank alignment temperature tau=%g", (double)tau);
    kd_node *in[3] = {s, t, mask};
    int ip[8] = {k};
    float fp[8] = {tau};
    return kd_graph_add_op_ex(g, KD_OP_RANK_ALIGN, mask ? 3 : 2, in, ip, fp);
}
