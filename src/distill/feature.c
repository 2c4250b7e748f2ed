/* feature.c - feature and relation distillation losses: mse (FitNets and
 * mse_logits), attention transfer (at), similarity-preserving (sp),
 * relational KD (rkd: distance + angle) and probabilistic knowledge transfer
 * (pkt). Definitions: ../../shared/LOSSES.md; each loss matches RepDistiller's
 * distiller_zoo module of the same name, checked by
 * tests/fixtures/gen_features.py (own PyTorch implementations) to 1e-5.
 *
 * Conventions. Every op outputs a scalar (1) and gives gradients to BOTH
 * inputs when they carry KD_F_NEED_GRAD (a trainable projector may sit on
 * either side; RepDistiller detaches the teacher, which changes no value).
 * Features are flattened to (N, D) per side; D may differ between student
 * and teacher except for mse (same shape) and at (same N, H, W). Sums that
 * decide the loss run in double, in a fixed order, so results do not depend
 * on the thread count; each Gram entry is one thread's dot product. Nothing
 * is allocated per step: every intermediate (maps, Gram and distance
 * matrices, per-row partial sums) lives in the op's workspace, laid out for
 * the current batch inside the area sized for the maximum batch.
 *
 * Where we differ from RepDistiller, on purpose:
 *   - at uses |f|^p (the paper's definition, and kd_distill.h's): equal to
 *     f.pow(p) for even p (the default p=2) and for non-negative (post-ReLU)
 *     features, and defined where torch's pow gives NaN (negative f,
 *     fractional p). Its derivative p|f|^(p-1)sign(f) is taken as 0 at f=0.
 *     RepDistiller pools the larger map when H differs; we require equal H,W.
 *   - rkd with N=1 (no pairs) is 0 with zero gradient (RepDistiller: NaN, the
 *     mean of an empty set). Coincident points (two equal rows: a zero
 *     difference vector in the angle term) give the same values as torch's
 *     normalize (e = 0), but no gradient through e, where torch's
 *     x / max(|x|, 1e-12) has a 1e12-scale Jacobian. Differences of norm in
 *     (0, 1e-12] (not met by float32 features of ordinary scale) count as
 *     coincident, where torch would give e = x / 1e-12.
 *   - pkt follows RepDistiller's cosine_similarity_loss exactly, including
 *     eps = 1e-7 added to the row norm and inside the log, and its reduction:
 *     the MEAN over all N*N entries (not batchmean). Its `x[x != x] = 0` step
 *     never fires for finite inputs (the +eps keeps 0/0 out), so it is not
 *     reproduced; a zero row normalises to 0 as there.
 *
 * Backward derivations are written above each backward function.
 */
#include <math.h>
#include <string.h>

#include "kd_distill.h"
#include "ops/ops.h"

/* work (multiply-adds) below which a loop stays on one thread */
#define PAR_WORK 32768
#define NORM_EPS 1e-12  /* F.normalize's clamp on a norm */
#define PDIST_EPS 1e-12 /* RepDistiller's pdist: clamp on the SQUARED distance */
#define PKT_EPS 1e-7

static kd_status scalar_out(kd_node *n) {
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static int need_grad(const kd_node *u) { return (u->flags & KD_F_NEED_GRAD) != 0; }

/* rows and columns of a tensor viewed as (N, D) */
static int rows(const kd_tensor *t) { return t->shape[0]; }
static int64_t cols(const kd_tensor *t) { return kd_numel(t) / t->shape[0]; }

/* student/teacher features (N, ...) with the same N, D free */
static kd_status relation_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    if (s->ndim < 2 || t->ndim < 2 || s->shape[0] != t->shape[0])
        return kd_op_shape_error(n, "needs student and teacher features (N, ...) with the same N");
    return scalar_out(n);
}

static double huber(double x) { return fabs(x) < 1.0 ? 0.5 * x * x : fabs(x) - 0.5; } /* smooth L1, beta 1 */
static double huber_grad(double x) { return fabs(x) < 1.0 ? x : (x > 0.0 ? 1.0 : -1.0); }

/* ------------------------------------------------------------ kernels */

/* G (N,N) = x x^T in double; x (N,D). Each entry is one dot product on one
 * thread in a fixed order (SIMD lanes fixed by the build), so G does not
 * depend on the thread count. */
static void gram(double *G, const float *x, int N, int64_t D, int threads) {
    (void)threads; /* used by OpenMP pragmas only */
#pragma omp parallel for num_threads(threads) if ((int64_t)N * N * D > 2 * PAR_WORK) schedule(dynamic, 1)
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * D;
        for (int j = 0; j <= i; j++) {
            const float *xj = x + (size_t)j * D;
            double s = 0.0;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; d++) s += (double)xi[d] * xj[d];
            G[(size_t)i * N + j] = G[(size_t)j * N + i] = s;
        }
    }
}

/* P (N,N) = squared Euclidean distances between the rows of x (N,D), summed
 * from the differences (no |a|^2+|b|^2-2ab cancellation); diagonal 0 */
static void sqdist(double *P, const float *x, int N, int64_t D, int threads) {
    (void)threads; /* used by OpenMP pragmas only */
#pragma omp parallel for num_threads(threads) if ((int64_t)N * N * D > 2 * PAR_WORK) schedule(dynamic, 1)
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * D;
        P[(size_t)i * N + i] = 0.0;
        for (int j = 0; j < i; j++) {
            const float *xj = x + (size_t)j * D;
            double s = 0.0;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; d++) {
                double e = (double)xi[d] - xj[d];
                s += e * e;
            }
            P[(size_t)i * N + j] = P[(size_t)j * N + i] = s;
        }
    }
}

/* dx (N,D) += W (N,N) x (N,D), each output row summed in double over the
 * rows of x, 256 columns at a time (the accumulator lives on the stack) */
static void rows_matmul_acc(float *dx, const double *W, const float *x, int N, int64_t D, int threads) {
    (void)threads; /* used by OpenMP pragmas only */
    enum { BLK = 256 };
#pragma omp parallel for num_threads(threads) if ((int64_t)N * N * D > PAR_WORK) schedule(static)
    for (int i = 0; i < N; i++) {
        double acc[BLK];
        const double *wi = W + (size_t)i * N;
        for (int64_t d0 = 0; d0 < D; d0 += BLK) {
            int m = D - d0 < BLK ? (int)(D - d0) : BLK;
            for (int k = 0; k < m; k++) acc[k] = 0.0;
            for (int j = 0; j < N; j++) {
                double w = wi[j];
                if (w == 0.0) continue;
                const float *xj = x + (size_t)j * D + d0;
#pragma omp simd
                for (int k = 0; k < m; k++) acc[k] += w * xj[k];
            }
            float *o = dx + (size_t)i * D + d0;
            for (int k = 0; k < m; k++) o[k] += (float)acc[k];
        }
    }
}

/* W (N,N) <- W + W^T, in place */
static void symmetrize(double *W, int N) {
    for (int i = 0; i < N; i++) {
        W[(size_t)i * N + i] *= 2.0;
        for (int j = 0; j < i; j++) {
            double s = W[(size_t)i * N + j] + W[(size_t)j * N + i];
            W[(size_t)i * N + j] = W[(size_t)j * N + i] = s;
        }
    }
}

static double sum_ordered(const double *p, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += p[i];
    return s;
}

/* ============================================================ mse
 * loss = mean_i (a_i - b_i)^2;  da = 2 (a - b) / n,  db = -da.
 * ws: one double per chunk of MSE_CHUNK elements (partial sums). */

#define MSE_CHUNK 16384

static kd_status mse_infer(kd_node *n) {
    const kd_tensor *a = &n->in[0]->val, *b = &n->in[1]->val;
    if (a->ndim != b->ndim || memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof(int)) != 0)
        return kd_op_shape_error(n, "mse needs two tensors of the same shape");
    return scalar_out(n);
}

static size_t mse_ws(const kd_node *n, int threads) {
    (void)threads;
    int64_t k = kd_numel(&n->in[0]->val);
    return (size_t)((k + MSE_CHUNK - 1) / MSE_CHUNK) * sizeof(double);
}

static void mse_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx; /* used by OpenMP pragmas only */
    const float *a = n->in[0]->val.data, *b = n->in[1]->val.data;
    int64_t k = kd_numel(&n->in[0]->val);
    int nc = (int)((k + MSE_CHUNK - 1) / MSE_CHUNK);
    double *part = n->ws;
#pragma omp parallel for num_threads(ctx->threads) if (nc > 1) schedule(static)
    for (int c = 0; c < nc; c++) {
        int64_t i0 = (int64_t)c * MSE_CHUNK, i1 = i0 + MSE_CHUNK < k ? i0 + MSE_CHUNK : k;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = i0; i < i1; i++) {
            double e = (double)a[i] - b[i];
            s += e * e;
        }
        part[c] = s;
    }
    n->val.data[0] = (float)(sum_ordered(part, nc) / (double)k);
}

static void mse_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx; /* used by OpenMP pragmas only */
    kd_node *A = n->in[0], *B = n->in[1];
    const float *a = A->val.data, *b = B->val.data;
    int64_t k = kd_numel(&A->val);
    double c = 2.0 * n->grad.data[0] / (double)k;
    float *da = need_grad(A) ? A->grad.data : NULL, *db = need_grad(B) ? B->grad.data : NULL;
    if (da) {
#pragma omp parallel for simd num_threads(ctx->threads) if (k > PAR_WORK) schedule(static)
        for (int64_t i = 0; i < k; i++) da[i] += (float)(c * ((double)a[i] - b[i]));
    }
    if (db) {
#pragma omp parallel for simd num_threads(ctx->threads) if (k > PAR_WORK) schedule(static)
        for (int64_t i = 0; i < k; i++) db[i] -= (float)(c * ((double)a[i] - b[i]));
    }
}

const kd_op_def kd_op_mse = {
    .name = "mse", .infer = mse_infer, .workspace = mse_ws, .forward = mse_forward, .backward = mse_backward};

/* ============================================================ at
 * Per example and side: m_i = mean_c |f_ci|^p over the H*W positions i,
 * a = m / max(|m|, 1e-12); loss = mean over N*H*W of (a_s - a_t)^2.
 * fp[0] = p. ws: a_s, a_t (N*HW each), |m_s|, |m_t| (N each), partial
 * sums (N), all double. */

typedef struct at_geom {
    int N, HW, Cs, Ct;
    double *as, *at, *rs, *rt, *part;
} at_geom;

static kd_status at_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    if (s->ndim != 4 || t->ndim != 4 || s->shape[0] != t->shape[0] || s->shape[2] != t->shape[2] ||
        s->shape[3] != t->shape[3])
        return kd_op_shape_error(n, "attention transfer needs (N, C, H, W) features with the same N, H, W");
    return scalar_out(n);
}

static at_geom at_geom_of(const kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    at_geom q = {.N = s->shape[0], .HW = s->shape[2] * s->shape[3], .Cs = s->shape[1], .Ct = t->shape[1]};
    size_t nm = (size_t)q.N * q.HW;
    q.as = n->ws;
    q.at = q.as + nm;
    q.rs = q.at + nm;
    q.rt = q.rs + q.N;
    q.part = q.rt + q.N;
    return q;
}

/* from the shapes alone: compile sizes the workspace before n->ws exists,
 * and at_geom_of would offset a NULL pointer (undefined behaviour) */
static size_t at_ws(const kd_node *n, int threads) {
    (void)threads;
    const kd_tensor *s = &n->in[0]->val;
    size_t N = (size_t)s->shape[0], HW = (size_t)s->shape[2] * (size_t)s->shape[3];
    return (2 * N * HW + 3 * N) * sizeof(double);
}

static double at_pow(float v, float p) { return p == 2.0f ? (double)v * v : pow(fabs((double)v), p); }
/* d|v|^p/dv, 0 at v = 0 */
static double at_dpow(float v, float p) {
    if (p == 2.0f) return 2.0 * v;
    if (v == 0.0f) return 0.0;
    return p * pow(fabs((double)v), p - 1.0) * (v > 0.0f ? 1.0 : -1.0);
}

/* a (N,HW) = normalised channel means of |f|^p, r (N) the norms before
 * normalising; f (N,C,HW) */
static void at_map(double *a, double *r, const float *f, int N, int C, int HW, float p, int threads) {
    (void)threads; /* used by OpenMP pragmas only */
#pragma omp parallel for num_threads(threads) if ((int64_t)N * C * HW > PAR_WORK) schedule(static)
    for (int b = 0; b < N; b++) {
        double *ab = a + (size_t)b * HW;
        for (int i = 0; i < HW; i++) ab[i] = 0.0;
        for (int c = 0; c < C; c++) {
            const float *fc = f + ((size_t)b * C + c) * HW;
            for (int i = 0; i < HW; i++) ab[i] += at_pow(fc[i], p);
        }
        double ss = 0.0;
        for (int i = 0; i < HW; i++) {
            ab[i] /= C;
            ss += ab[i] * ab[i];
        }
        r[b] = sqrt(ss);
        double inv = 1.0 / fmax(r[b], NORM_EPS);
        for (int i = 0; i < HW; i++) ab[i] *= inv;
    }
}

static void at_forward(kd_node *n, const kd_ctx *ctx) {
    at_geom q = at_geom_of(n);
    float p = n->fp[0];
    at_map(q.as, q.rs, n->in[0]->val.data, q.N, q.Cs, q.HW, p, ctx->threads);
    at_map(q.at, q.rt, n->in[1]->val.data, q.N, q.Ct, q.HW, p, ctx->threads);
    for (int b = 0; b < q.N; b++) {
        double s = 0.0;
        for (int i = 0; i < q.HW; i++) {
            double e = q.as[(size_t)b * q.HW + i] - q.at[(size_t)b * q.HW + i];
            s += e * e;
        }
        q.part[b] = s;
    }
    n->val.data[0] = (float)(sum_ordered(q.part, q.N) / ((double)q.N * q.HW));
}

/* One side (sign +1 student, -1 teacher), per example:
 *   ga = sign * 2g (a_s - a_t) / (N HW)
 *   dm = (ga - a (a.ga)) / |m|   if |m| > eps   (normalize's Jacobian (I - a a^T)/|m|)
 *      = ga / eps                otherwise      (the clamp is constant)
 *   df_ci += dm_i * p |f_ci|^(p-1) sign(f_ci) / C */
static void at_side_backward(float *df, const float *f, const at_geom *q, const double *a, const double *r, int C,
                             float p, double sign, double g, int threads) {
    (void)threads;
    double coef = sign * 2.0 * g / ((double)q->N * q->HW);
    int HW = q->HW;
#pragma omp parallel for num_threads(threads) if ((int64_t)q->N * C * HW > PAR_WORK) schedule(static)
    for (int b = 0; b < q->N; b++) {
        const double *as = q->as + (size_t)b * HW, *at = q->at + (size_t)b * HW, *ab = a + (size_t)b * HW;
        double dot = 0.0;
        for (int i = 0; i < HW; i++) dot += ab[i] * coef * (as[i] - at[i]);
        int clamped = !(r[b] > NORM_EPS);
        double inv = 1.0 / (clamped ? NORM_EPS : r[b]);
        for (int c = 0; c < C; c++) {
            size_t o = ((size_t)b * C + c) * HW;
            for (int i = 0; i < HW; i++) {
                double ga = coef * (as[i] - at[i]);
                double dm = (clamped ? ga : ga - ab[i] * dot) * inv;
                df[o + i] += (float)(dm * at_dpow(f[o + i], p) / C);
            }
        }
    }
}

static void at_backward(kd_node *n, const kd_ctx *ctx) {
    at_geom q = at_geom_of(n);
    kd_node *S = n->in[0], *T = n->in[1];
    double g = n->grad.data[0];
    if (need_grad(S)) at_side_backward(S->grad.data, S->val.data, &q, q.as, q.rs, q.Cs, n->fp[0], 1.0, g, ctx->threads);
    if (need_grad(T))
        at_side_backward(T->grad.data, T->val.data, &q, q.at, q.rt, q.Ct, n->fp[0], -1.0, g, ctx->threads);
}

const kd_op_def kd_op_at = {
    .name = "at", .infer = at_infer, .workspace = at_ws, .forward = at_forward, .backward = at_backward};

/* ============================================================ sp
 * G = F F^T (N,N) per side, rows normalised: Gh_i = G_i / max(|G_i|, 1e-12);
 * loss = sum (Gh_s - Gh_t)^2 / N^2.
 * ws: Gh_s, Gh_t, W (N*N each), row norms r_s, r_t (N each), partial sums (N). */

typedef struct rel_geom {
    int N;
    int64_t Ds, Dt;
} rel_geom;

static rel_geom rel_geom_of(const kd_node *n) {
    rel_geom q = {.N = rows(&n->in[0]->val), .Ds = cols(&n->in[0]->val), .Dt = cols(&n->in[1]->val)};
    return q;
}

typedef struct sp_ws {
    double *Gs, *Gt, *W, *rs, *rt, *part;
} sp_ws;

static sp_ws sp_ws_of(const kd_node *n, int N) {
    size_t nn = (size_t)N * N;
    sp_ws w = {.Gs = n->ws};
    w.Gt = w.Gs + nn;
    w.W = w.Gt + nn;
    w.rs = w.W + nn;
    w.rt = w.rs + N;
    w.part = w.rt + N;
    return w;
}

static size_t sp_ws_bytes(const kd_node *n, int threads) {
    (void)threads;
    size_t N = (size_t)rows(&n->in[0]->val);
    return (3 * N * N + 3 * N) * sizeof(double);
}

/* G (N,N) <- x x^T with rows L2-normalised; r (N) the row norms before */
static void sp_side(double *G, double *r, const float *x, int N, int64_t D, int threads) {
    gram(G, x, N, D, threads);
    for (int i = 0; i < N; i++) {
        double *gi = G + (size_t)i * N, ss = 0.0;
        for (int j = 0; j < N; j++) ss += gi[j] * gi[j];
        r[i] = sqrt(ss);
        double inv = 1.0 / fmax(r[i], NORM_EPS);
        for (int j = 0; j < N; j++) gi[j] *= inv;
    }
}

static void sp_forward(kd_node *n, const kd_ctx *ctx) {
    rel_geom q = rel_geom_of(n);
    sp_ws w = sp_ws_of(n, q.N);
    int N = q.N;
    sp_side(w.Gs, w.rs, n->in[0]->val.data, N, q.Ds, ctx->threads);
    sp_side(w.Gt, w.rt, n->in[1]->val.data, N, q.Dt, ctx->threads);
    for (int i = 0; i < N; i++) {
        double s = 0.0;
        for (int j = 0; j < N; j++) {
            double e = w.Gs[(size_t)i * N + j] - w.Gt[(size_t)i * N + j];
            s += e * e;
        }
        w.part[i] = s;
    }
    n->val.data[0] = (float)(sum_ordered(w.part, N) / ((double)N * N));
}

/* One side (sign +1 student, -1 teacher):
 *   dGh = sign * 2g (Gh_s - Gh_t) / N^2
 *   dG_i = (dGh_i - Gh_i (Gh_i . dGh_i)) / |G_i|   (dGh_i / eps when clamped)
 *   G = F F^T  =>  dF = (dG + dG^T) F */
static void sp_side_backward(float *dx, const float *x, const sp_ws *w, const double *G, const double *r, int N,
                             int64_t D, double sign, double g, int threads) {
    double coef = sign * 2.0 * g / ((double)N * N);
    double *W = w->W;
    for (int i = 0; i < N; i++) {
        const double *gi = G + (size_t)i * N, *si = w->Gs + (size_t)i * N, *ti = w->Gt + (size_t)i * N;
        double *wi = W + (size_t)i * N, dot = 0.0;
        for (int j = 0; j < N; j++) {
            wi[j] = coef * (si[j] - ti[j]);
            dot += gi[j] * wi[j];
        }
        if (r[i] > NORM_EPS) {
            for (int j = 0; j < N; j++) wi[j] = (wi[j] - gi[j] * dot) / r[i];
        } else {
            for (int j = 0; j < N; j++) wi[j] /= NORM_EPS;
        }
    }
    symmetrize(W, N);
    rows_matmul_acc(dx, W, x, N, D, threads);
}

static void sp_backward(kd_node *n, const kd_ctx *ctx) {
    rel_geom q = rel_geom_of(n);
    sp_ws w = sp_ws_of(n, q.N);
    kd_node *S = n->in[0], *T = n->in[1];
    double g = n->grad.data[0];
    if (need_grad(S)) sp_side_backward(S->grad.data, S->val.data, &w, w.Gs, w.rs, q.N, q.Ds, 1.0, g, ctx->threads);
    if (need_grad(T)) sp_side_backward(T->grad.data, T->val.data, &w, w.Gt, w.rt, q.N, q.Dt, -1.0, g, ctx->threads);
}

const kd_op_def kd_op_sp = {
    .name = "sp", .infer = relation_infer, .workspace = sp_ws_bytes, .forward = sp_forward, .backward = sp_backward};

/* ============================================================ rkd
 * Flattened (N, D) per side; P the squared distances.
 * Distance term: d_ij = sqrt(max(P_ij, 1e-12)) for i != j, d_ii = 0;
 *   mu = mean of the N(N-1) off-diagonal d (all > 0: "d[d > 0].mean()");
 *   L_d = sum_ij huber(d^s_ij/mu_s - d^t_ij/mu_t) / N^2.
 * Angle term: e_ab = (x_b - x_a) / |x_b - x_a| (0 when the points
 *   coincide) and
 *   A_abc = <e_ab, e_ac> = (P_ab + P_ac - P_bc) / (2 n_ab n_ac) = (...) I_ab I_ac
 *   (polarisation: <x_b - x_a, x_c - x_a> from the three distances, so the
 *   N^3 triplets cost O(1) each after the O(N^2 D) distances); A is 0 when
 *   b = a or c = a (e_aa = 0);  L_a = sum_abc huber(A^s - A^t) / N^3.
 * loss = w_dist L_d + w_angle L_a.  fp[0] w_dist, fp[1] w_angle.
 * ws: P_s, P_t, I_s, I_t (I = 1/n, 0 for coincident points), Q_s, Q_t
 * (dL/dP) (N*N each), partial sums (N), then mu_s, mu_t. */

typedef struct rkd_ws {
    double *Ps, *Pt, *Is, *It, *Qs, *Qt, *part, *mu;
} rkd_ws;

static rkd_ws rkd_ws_of(const kd_node *n, int N) {
    size_t nn = (size_t)N * N;
    rkd_ws w = {.Ps = n->ws};
    w.Pt = w.Ps + nn;
    w.Is = w.Pt + nn;
    w.It = w.Is + nn;
    w.Qs = w.It + nn;
    w.Qt = w.Qs + nn;
    w.part = w.Qt + nn;
    w.mu = w.part + N;
    return w;
}

static size_t rkd_ws_bytes(const kd_node *n, int threads) {
    (void)threads;
    size_t N = (size_t)rows(&n->in[0]->val);
    return (6 * N * N + N + 2) * sizeof(double);
}

static double rkd_dist(double P) { return sqrt(P > PDIST_EPS ? P : PDIST_EPS); }

/* squared distances, inverse clamped norms, and the mean distance */
static double rkd_side(double *P, double *I, const float *x, int N, int64_t D, int threads) {
    sqdist(P, x, N, D, threads);
    double s = 0.0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            size_t o = (size_t)i * N + j;
            /* coincident points (|x_i - x_j| <= 1e-12: in float32 features,
             * exactly equal rows): e_ij = 0, as torch's normalize gives for a
             * zero difference, and held constant (I = 0) so no gradient */
            I[o] = i == j || !(sqrt(P[o]) > NORM_EPS) ? 0.0 : 1.0 / sqrt(P[o]);
            if (i != j) s += rkd_dist(P[o]);
        }
    return N > 1 ? s / ((double)N * (N - 1)) : 1.0;
}

/* A_abc from squared distances P and inverse norms I (b, c != a) */
static inline double rkd_angle(const double *P, const double *I, int N, int a, int b, int c) {
    return 0.5 * (P[(size_t)a * N + b] + P[(size_t)a * N + c] - P[(size_t)b * N + c]) * I[(size_t)a * N + b] *
           I[(size_t)a * N + c];
}

static void rkd_forward(kd_node *n, const kd_ctx *ctx) {
    rel_geom q = rel_geom_of(n);
    int N = q.N;
    rkd_ws w = rkd_ws_of(n, N);
    w.mu[0] = rkd_side(w.Ps, w.Is, n->in[0]->val.data, N, q.Ds, ctx->threads);
    w.mu[1] = rkd_side(w.Pt, w.It, n->in[1]->val.data, N, q.Dt, ctx->threads);
    double ld = 0.0;
    if (N > 1)
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) {
                if (i == j) continue;
                size_t o = (size_t)i * N + j;
                ld += huber(rkd_dist(w.Ps[o]) / w.mu[0] - rkd_dist(w.Pt[o]) / w.mu[1]);
            }
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)N * N * N > PAR_WORK) schedule(static)
    for (int a = 0; a < N; a++) {
        double s = 0.0;
        for (int b = 0; b < N; b++) {
            if (b == a) continue;
            for (int c = 0; c < N; c++) {
                if (c == a) continue;
                s += huber(rkd_angle(w.Ps, w.Is, N, a, b, c) - rkd_angle(w.Pt, w.It, N, a, b, c));
            }
        }
        w.part[a] = s;
    }
    double la = sum_ordered(w.part, N);
    double nn = (double)N * N;
    n->val.data[0] = (float)(n->fp[0] * ld / nn + n->fp[1] * la / (nn * N));
}

/* Backward goes through Q = dL/dP for each side, then
 *   P_ij = |x_i - x_j|^2  =>  dx_i = sum_j 2 (Q_ij + Q_ji) (x_i - x_j),
 * one (N,N) x (N,D) product with W_ij = -2(Q_ij + Q_ji), W_ii = -sum_j!=i W_ij.
 *
 * Distance term, per side (h = ±w_d g huber'(dh_s - dh_t) / N^2, + for the
 * student), with dh = d/mu and mu = sum_kl d_kl / M, M = N(N-1):
 *   dL/dd_ij = h_ij/mu - (sum_kl h_kl d_kl) / (mu^2 M)
 *   dL/dP_ij = dL/dd_ij / (2 d_ij)   (0 where the 1e-12 clamp is active).
 * Angle term (H = ±w_a g huber'(A_s - A_t) / N^3), with A = (p + q - r) /
 * (2 n_p n_q), p = P_ab, q = P_ac, r = P_bc, n = sqrt:
 *   dA/dp = 1/(2 n_p n_q) - A/(2p),  dA/dq alike,  dA/dr = -1/(2 n_p n_q)
 * (all 0 for coincident points, where I = 0). H and A are symmetric in
 * (b, c), so the p- and q-slots together give row a:
 *   Q_ab += sum_c H_abc (I_ab I_ac - A_abc I_ab^2)                   (pass 1, rows a)
 * and the r-slot gives row b:
 *   Q_bc += -sum_a H_abc I_ab I_ac / 2                               (pass 2, rows b)
 * Each pass writes only its own row, so both run on threads without
 * atomics and in a fixed order. The b = c triplets only touch Q's diagonal
 * through r (P_bb = 0 has no gradient) and are skipped in pass 2. */
static void rkd_distance_backward(const rkd_ws *w, int N, double hscale, int need_s, int need_t) {
    double M = (double)N * (N - 1), ms = w->mu[0], mt = w->mu[1];
    double sum_hs = 0.0, sum_ht = 0.0; /* sum h d per side (h_t = -h_s) */
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            if (i == j) continue;
            size_t o = (size_t)i * N + j;
            double ds = rkd_dist(w->Ps[o]), dt = rkd_dist(w->Pt[o]);
            double h = hscale * huber_grad(ds / ms - dt / mt);
            sum_hs += h * ds;
            sum_ht -= h * dt;
        }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            if (i == j) continue;
            size_t o = (size_t)i * N + j;
            double ds = rkd_dist(w->Ps[o]), dt = rkd_dist(w->Pt[o]);
            double h = hscale * huber_grad(ds / ms - dt / mt);
            if (need_s && w->Ps[o] > PDIST_EPS) w->Qs[o] += (h / ms - sum_hs / (ms * ms * M)) / (2.0 * ds);
            if (need_t && w->Pt[o] > PDIST_EPS) w->Qt[o] += (-h / mt - sum_ht / (mt * mt * M)) / (2.0 * dt);
        }
}

static void rkd_angle_backward(const rkd_ws *w, int N, double hscale, int need_s, int need_t, int threads) {
    const double *Ps = w->Ps, *Pt = w->Pt, *Is = w->Is, *It = w->It;
    double *Qs = w->Qs, *Qt = w->Qt;
    int par = (int64_t)N * N * N > PAR_WORK;
    (void)par;
    (void)threads;
#pragma omp parallel for num_threads(threads) if (par) schedule(static)
    for (int a = 0; a < N; a++) {
        for (int b = 0; b < N; b++) {
            if (b == a) continue;
            size_t ab = (size_t)a * N + b;
            double cs = Is[ab] * Is[ab], ct = It[ab] * It[ab];
            double accs = 0.0, acct = 0.0;
            for (int c = 0; c < N; c++) {
                if (c == a) continue;
                size_t ac = (size_t)a * N + c;
                double As = rkd_angle(Ps, Is, N, a, b, c), At = rkd_angle(Pt, It, N, a, b, c);
                double h = hscale * huber_grad(As - At);
                accs += h * (Is[ab] * Is[ac] - As * cs);
                acct -= h * (It[ab] * It[ac] - At * ct);
            }
            if (need_s) Qs[ab] += accs;
            if (need_t) Qt[ab] += acct;
        }
    }
#pragma omp parallel for num_threads(threads) if (par) schedule(static)
    for (int b = 0; b < N; b++) {
        for (int a = 0; a < N; a++) {
            if (a == b) continue;
            size_t ab = (size_t)a * N + b;
            for (int c = 0; c < N; c++) {
                if (c == a || c == b) continue;
                size_t ac = (size_t)a * N + c, bc = (size_t)b * N + c;
                double As = rkd_angle(Ps, Is, N, a, b, c), At = rkd_angle(Pt, It, N, a, b, c);
                double h = hscale * huber_grad(As - At);
                if (need_s) Qs[bc] -= 0.5 * h * Is[ab] * Is[ac];
                if (need_t) Qt[bc] += 0.5 * h * It[ab] * It[ac];
            }
        }
    }
}

/* Q (N,N) = dL/dP -> W in place (see above), then dx += W x */
static void rkd_side_backward(float *dx, const float *x, double *Q, int N, int64_t D, int threads) {
    symmetrize(Q, N);
    for (int i = 0; i < N; i++) {
        double *qi = Q + (size_t)i * N, diag = 0.0;
        for (int j = 0; j < N; j++) {
            if (j == i) continue;
            qi[j] *= -2.0;
            diag -= qi[j];
        }
        qi[i] = diag;
    }
    rows_matmul_acc(dx, Q, x, N, D, threads);
}

static void rkd_backward(kd_node *n, const kd_ctx *ctx) {
    rel_geom q = rel_geom_of(n);
    int N = q.N;
    if (N < 2) return; /* no pairs: the loss is constant 0 */
    rkd_ws w = rkd_ws_of(n, N);
    kd_node *S = n->in[0], *T = n->in[1];
    int ns = need_grad(S), nt = need_grad(T);
    double g = n->grad.data[0], nn = (double)N * N;
    size_t bytes = (size_t)N * N * sizeof(double);
    memset(w.Qs, 0, bytes);
    memset(w.Qt, 0, bytes);
    if (n->fp[0] != 0.0f) rkd_distance_backward(&w, N, n->fp[0] * g / nn, ns, nt);
    if (n->fp[1] != 0.0f) rkd_angle_backward(&w, N, n->fp[1] * g / (nn * N), ns, nt, ctx->threads);
    if (ns) rkd_side_backward(S->grad.data, S->val.data, w.Qs, N, q.Ds, ctx->threads);
    if (nt) rkd_side_backward(T->grad.data, T->val.data, w.Qt, N, q.Dt, ctx->threads);
}

const kd_op_def kd_op_rkd = {.name = "rkd",
                             .infer = relation_infer,
                             .workspace = rkd_ws_bytes,
                             .forward = rkd_forward,
                             .backward = rkd_backward};

/* ============================================================ pkt
 * RepDistiller's cosine_similarity_loss, eps = 1e-7, per side:
 *   u_i = x_i / (|x_i| + eps),  S = U U^T,  K = (S + 1)/2,  r_i = sum_j K_ij,
 *   P_ij = K_ij / r_i;
 * loss = MEAN over the N*N entries of T_ij log((T_ij + eps) / (P_ij + eps)),
 * T the teacher's P, P the student's.
 * ws: S_s, S_t, W (N*N each), norms n_s, n_t, row sums r_s, r_t (N each),
 * partial sums (N). */

typedef struct pkt_ws {
    double *Ss, *St, *W, *ns, *nt, *rs, *rt, *part;
} pkt_ws;

static pkt_ws pkt_ws_of(const kd_node *n, int N) {
    size_t nn = (size_t)N * N;
    pkt_ws w = {.Ss = n->ws};
    w.St = w.Ss + nn;
    w.W = w.St + nn;
    w.ns = w.W + nn;
    w.nt = w.ns + N;
    w.rs = w.nt + N;
    w.rt = w.rs + N;
    w.part = w.rt + N;
    return w;
}

static size_t pkt_ws_bytes(const kd_node *n, int threads) {
    (void)threads;
    size_t N = (size_t)rows(&n->in[0]->val);
    return (3 * N * N + 5 * N) * sizeof(double);
}

/* S (N,N) cosine similarities of the rows of x, nrm (N) row norms, r (N)
 * row sums of K = (S+1)/2 */
static void pkt_side(double *S, double *nrm, double *r, const float *x, int N, int64_t D, int threads) {
    gram(S, x, N, D, threads);
    for (int i = 0; i < N; i++) nrm[i] = sqrt(S[(size_t)i * N + i]);
    for (int i = 0; i < N; i++) {
        double *si = S + (size_t)i * N, s = 0.0;
        for (int j = 0; j < N; j++) {
            si[j] /= (nrm[i] + PKT_EPS) * (nrm[j] + PKT_EPS);
            s += 0.5 * (si[j] + 1.0);
        }
        r[i] = s;
    }
}

static inline double pkt_prob(const double *S, const double *r, int N, int i, int j) {
    return 0.5 * (S[(size_t)i * N + j] + 1.0) / r[i];
}

static void pkt_forward(kd_node *n, const kd_ctx *ctx) {
    rel_geom q = rel_geom_of(n);
    int N = q.N;
    pkt_ws w = pkt_ws_of(n, N);
    pkt_side(w.Ss, w.ns, w.rs, n->in[0]->val.data, N, q.Ds, ctx->threads);
    pkt_side(w.St, w.nt, w.rt, n->in[1]->val.data, N, q.Dt, ctx->threads);
    for (int i = 0; i < N; i++) {
        double s = 0.0;
        for (int j = 0; j < N; j++) {
            double p = pkt_prob(w.Ss, w.rs, N, i, j), t = pkt_prob(w.St, w.rt, N, i, j);
            s += t * log((t + PKT_EPS) / (p + PKT_EPS));
        }
        w.part[i] = s;
    }
    n->val.data[0] = (float)(sum_ordered(w.part, N) / ((double)N * N));
}

/* With c = g / N^2:
 *   student: dP_ij = -c T_ij / (P_ij + eps)
 *   teacher: dT_ij =  c (log((T_ij + eps)/(P_ij + eps)) + T_ij / (T_ij + eps))
 * then for that side (its P, S, r, n):
 *   P = K / r (row-wise)   =>  dK_ij = (dP_ij - sum_k dP_ik P_ik) / r_i
 *   K = (S + 1)/2          =>  dS = dK / 2
 *   S = U U^T              =>  dU_i = sum_j (dS_ij + dS_ji) u_j = sum_j W_ij x_j,
 *                              W_ij = (dS_ij + dS_ji) / (n_j + eps)
 *   u = x / (n + eps)      =>  dx_i = dU_i / (n_i + eps) - x_i (x_i . dU_i) / (n_i (n_i + eps)^2)
 * and x_i . x_j = S_ij (n_i + eps)(n_j + eps) gives
 *   x_i . dU_i / (n_i (n_i+eps)^2) = sum_j W_ij S_ij (n_j + eps) / (n_i (n_i + eps))
 * (0 for a zero row, where torch's gradient is NaN), so
 *   dx_i = sum_j W'_ij x_j,  W'_ij = W_ij / (n_i + eps) - [i = j] beta_i. */
static void pkt_side_backward(float *dx, const float *x, const pkt_ws *w, int student, int N, int64_t D, double g,
                              int threads) {
    const double *S = student ? w->Ss : w->St, *r = student ? w->rs : w->rt, *nrm = student ? w->ns : w->nt;
    double c = g / ((double)N * N), *W = w->W;
    for (int i = 0; i < N; i++) {
        double *wi = W + (size_t)i * N, dot = 0.0;
        for (int j = 0; j < N; j++) {
            double p = pkt_prob(w->Ss, w->rs, N, i, j), t = pkt_prob(w->St, w->rt, N, i, j);
            wi[j] = student ? -c * t / (p + PKT_EPS) : c * (log((t + PKT_EPS) / (p + PKT_EPS)) + t / (t + PKT_EPS));
            dot += wi[j] * (student ? p : t);
        }
        for (int j = 0; j < N; j++) wi[j] = 0.5 * (wi[j] - dot) / r[i];
    }
    symmetrize(W, N);
    for (int i = 0; i < N; i++) {
        double *wi = W + (size_t)i * N, beta = 0.0;
        for (int j = 0; j < N; j++) {
            wi[j] /= nrm[j] + PKT_EPS;
            beta += wi[j] * S[(size_t)i * N + j] * (nrm[j] + PKT_EPS);
        }
        beta = nrm[i] > 0.0 ? beta / (nrm[i] * (nrm[i] + PKT_EPS)) : 0.0;
        for (int j = 0; j < N; j++) wi[j] /= nrm[i] + PKT_EPS;
        wi[i] -= beta;
    }
    rows_matmul_acc(dx, W, x, N, D, threads);
}

static void pkt_backward(kd_node *n, const kd_ctx *ctx) {
    rel_geom q = rel_geom_of(n);
    pkt_ws w = pkt_ws_of(n, q.N);
    kd_node *S = n->in[0], *T = n->in[1];
    double g = n->grad.data[0];
    if (need_grad(S)) pkt_side_backward(S->grad.data, S->val.data, &w, 1, q.N, q.Ds, g, ctx->threads);
    if (need_grad(T)) pkt_side_backward(T->grad.data, T->val.data, &w, 0, q.N, q.Dt, g, ctx->threads);
}

const kd_op_def kd_op_pkt = {.name = "pkt",
                             .infer = relation_infer,
                             .workspace = pkt_ws_bytes,
                             .forward = pkt_forward,
                             .backward = pkt_backward};

/* ============================================================ builders */

static kd_node *pair_op(kd_graph *g, int op, kd_node *s, kd_node *t, const float *fp) {
    kd_node *in[2] = {s, t};
    return kd_graph_add_op_ex(g, op, 2, in, NULL, fp);
}

kd_node *kd_mse(kd_graph *g, kd_node *a, kd_node *b) { return pair_op(g, KD_OP_MSE, a, b, NULL); }

kd_node *kd_at(kd_graph *g, kd_node *fs, kd_node *ft, float p) {
    KD_ASSERT(p > 0.0f && isfinite(p), "attention transfer: p = %g", p);
    float fp[8] = {p};
    return pair_op(g, KD_OP_AT, fs, ft, fp);
}

kd_node *kd_sp(kd_graph *g, kd_node *fs, kd_node *ft) { return pair_op(g, KD_OP_SP, fs, ft, NULL); }

kd_node *kd_rkd(kd_graph *g, kd_node *fs, kd_node *ft, float w_dist, float w_angle) {
    KD_ASSERT(isfinite(w_dist) && isfinite(w_angle), "rkd weights %g, %g", w_dist, w_angle);
    float fp[8] = {w_dist, w_angle};
    return pair_op(g, KD_OP_RKD, fs, ft, fp);
}

kd_node *kd_pkt(kd_graph *g, kd_node *fs, kd_node *ft) { return pair_op(g, KD_OP_PKT, fs, ft, NULL); }
