/* geometry.c - geometry-aware feature alignment (Bhattarai et al. 2025,
 * "Knowledge distillation through geometry-aware representational
 * alignment"): the Procrustes distance, the feature-Gram distance and
 * linear CKA as losses between a student's and a teacher's features. The
 * three compare the shapes of the two point clouds of one batch, so the
 * feature widths may differ and no projector is needed.
 *
 * Every op views its inputs as matrices xs (B, Ds) and xt (B, Dt) (rows are
 * the batch's examples, anything after dim 0 flattened) and first maps
 * each to X = (x - column means over the batch) / |x - column means|_F:
 * centred, unit Frobenius norm. Then, all in double:
 *   procrustes  2 - 2 |Xt^T Xs|_*        (nuclear norm: sum of singular values)
 *   gram_dist   |Xt Xt^T - Xs Xs^T|_F    (B x B Gram matrices)
 *   cka         1 - <Ks, Kt> / (|Ks|_F |Kt|_F),  K = X X^T
 *               (= 1 - |Xt^T Xs|_F^2 / (|Xs^T Xs|_F |Xt^T Xt|_F), linear CKA
 *               on centred features; the scale of X cancels)
 *
 * The nuclear norm comes from a one-sided Jacobi SVD (Hestenes) written
 * here, in double, on the smaller of two equivalent matrices:
 *   direct   A = Xt^T Xs (Dt x Ds, or its transpose: the narrower side is
 *            the column count), when the feature widths are small;
 *   reduced  X^T = Q R per side from the eigen-decomposition of the B x B
 *            Gram X X^T = V L V^T (Q = X^T V L^-1/2, R = L^1/2 V^T, kept for
 *            L > EIG_KEEP * max L: the centring's null direction and
 *            anything at rounding level are dropped), then
 *            A = Rt Rs^T = Lt^1/2 Vt^T Vs Ls^1/2 (at most B x B), whose
 *            singular values are those of Xt^T Xs. Used when both widths
 *            exceed what B x B work costs (wide flattened feature maps).
 * Node ip[0] picks the path: 0 by an estimate of the work (the default),
 * 1 direct, 2 reduced (tests compare the two).
 *
 * Gradients (upstream g; derivations in docs/losses/geometry.md):
 *   the gradient of |A|_* is U1 V1^T over the singular values above SV_KEEP * max
 *   (unique as long as Xt^T Xs has the rank of Xs and Xt; at a rank drop
 *   this is one subgradient). Direct: dXs = -2g Xt P, dXt = -2g Xs P^T with
 *   P = U1 V1^T of Xt^T Xs. Reduced: dXz = -2g Hz Xz with the B x B
 *   Hz = Vy Ly^1/2 P Lz^-1/2 Vz^T (y, z the two sides, P the polar factor
 *   of A), so nothing D x D or D x B is formed.
 *   gram_dist: D = Kt - Ks, dXs = -2g D Xs / |D|, dXt = 2g D Xt / |D|
 *   (0 at D = 0, where the norm has its kink).
 *   cka: with a = <Ks,Kt>, p = |Ks|, q = |Kt|: dXs = -2g (Kt/(pq) - a Ks/(p^3 q)) Xs.
 *   Then through the normalisation and the centring, per side:
 *   dXc = (G - X <G, X>) / n,  dx = dXc - column means of dXc.
 *
 * Deliberately not done: LAPACK (the matrices are at most B x B or narrow,
 * the Jacobi SVD is accurate to rounding in double, deterministic and 60
 * lines, where liblapacke would add a dependency for no measurable gain at
 * these sizes); a D x D route. A side whose centred features are all zero
 * (B = 1, or every example equal) has no shape: the procrustes value is 2,
 * gram_dist compares a zero Gram, cka is 1 - 0, and that side gets no
 * gradient. Sums that decide a loss run in double in a fixed order (one
 * thread per output entry, partial sums per row), so the results do not
 * depend on the thread count. Nothing is allocated per step.
 */
#include <math.h>
#include <string.h>

#include "kd_distill.h"
#include "ops/ops.h"

#define PAR_WORK 32768
#define JACOBI_TOL 1e-15 /* columns count as orthogonal at |a_p.a_q| <= tol |a_p| |a_q| */
#define JACOBI_SWEEPS 80
#define EIG_KEEP 1e-14 /* Gram eigenvalues kept by the reduced path, relative to the largest */
#define SV_KEEP 1e-10  /* singular values in the polar factor, relative to the largest */

enum { PATH_AUTO, PATH_DIRECT, PATH_REDUCED };

typedef struct geo_hdr {
    double ns, nt; /* Frobenius norms of the centred features (0: no shape) */
    int path;      /* procrustes: the path the last forward took (0: none, degenerate) */
    int rs, rt;    /* reduced path: Gram eigenvalues kept per side */
    int m, n;      /* the Jacobi matrix A is m x n, n <= m */
    int swap;      /* 1: A is built with y = s, z = t (else y = t, z = s) */
} geo_hdr;

static kd_status scalar_out(kd_node *n) {
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static int need_grad(const kd_node *u) { return (u->flags & KD_F_NEED_GRAD) != 0; }
static int64_t cols(const kd_tensor *t) { return kd_numel(t) / t->shape[0]; }
static size_t round8(size_t b) { return (b + 7) & ~(size_t)7; }

static double sum_ordered(const double *p, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += p[i];
    return s;
}

static kd_status geo_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    if (s->ndim < 2 || t->ndim < 2 || s->shape[0] != t->shape[0])
        return kd_op_shape_error(n, "needs student and teacher features (B, ...) with the same batch B");
    return scalar_out(n);
}

/* ------------------------------------------------------------ kernels */

/* xh (B,D) = (x - column means) / |x - column means|_F; returns the norm,
 * or 0 with xh all zero when the centred features vanish. part (B) scratch. */
static double center_normalize(double *xh, double *colm, double *part, const float *x, int B, int64_t D,
                               int threads) {
    for (int64_t d = 0; d < D; d++) colm[d] = 0.0;
    for (int b = 0; b < B; b++) {
        const float *xr = x + (size_t)b * D;
        for (int64_t d = 0; d < D; d++) colm[d] += xr[d];
    }
    for (int64_t d = 0; d < D; d++) colm[d] /= B;
#pragma omp parallel for num_threads(threads) if ((int64_t)B * D > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        const float *xr = x + (size_t)b * D;
        double *y = xh + (size_t)b * D, ss = 0.0;
        for (int64_t d = 0; d < D; d++) {
            y[d] = xr[d] - colm[d];
            ss += y[d] * y[d];
        }
        part[b] = ss;
    }
    double nrm = sqrt(sum_ordered(part, B));
    if (!(nrm > 0.0)) {
        memset(xh, 0, (size_t)B * D * sizeof *xh);
        return 0.0;
    }
    double inv = 1.0 / nrm;
    for (int64_t i = 0; i < (int64_t)B * D; i++) xh[i] *= inv;
    return nrm;
}

/* dx (B,D) += dL/dx from G (B,D) = dL/dxh, where xh = centre(x) / nrm:
 *   dL/dxc = (G - xh <G, xh>) / nrm;  dL/dx = dL/dxc minus its column means
 * (xh's columns already sum to 0, so only G's column means are removed). */
static void chain_center_normalize(float *dx, const double *G, const double *xh, double nrm, int B, int64_t D,
                                   double *colm, double *part, int threads) {
    if (!(nrm > 0.0)) return;
#pragma omp parallel for num_threads(threads) if ((int64_t)B * D > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        const double *g = G + (size_t)b * D, *y = xh + (size_t)b * D;
        double s = 0.0;
        for (int64_t d = 0; d < D; d++) s += g[d] * y[d];
        part[b] = s;
    }
    double dot = sum_ordered(part, B), inv = 1.0 / nrm;
    for (int64_t d = 0; d < D; d++) colm[d] = 0.0;
    for (int b = 0; b < B; b++)
        for (int64_t d = 0; d < D; d++) colm[d] += G[(size_t)b * D + d];
    for (int64_t d = 0; d < D; d++) colm[d] /= B;
#pragma omp parallel for num_threads(threads) if ((int64_t)B * D > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        const double *g = G + (size_t)b * D, *y = xh + (size_t)b * D;
        float *o = dx + (size_t)b * D;
        for (int64_t d = 0; d < D; d++) o[d] += (float)((g[d] - colm[d] - y[d] * dot) * inv);
    }
}

/* K (B,B) = x x^T, x (B,D); each entry one dot product on one thread */
static void gram_d(double *K, const double *x, int B, int64_t D, int threads) {
#pragma omp parallel for num_threads(threads) if ((int64_t)B * B * D > 2 * PAR_WORK) schedule(dynamic, 1)
    for (int i = 0; i < B; i++) {
        const double *a = x + (size_t)i * D;
        for (int j = i; j < B; j++) {
            const double *c = x + (size_t)j * D;
            double s = 0.0;
            for (int64_t d = 0; d < D; d++) s += a[d] * c[d];
            K[(size_t)i * B + j] = K[(size_t)j * B + i] = s;
        }
    }
}

/* out (B,D) = alpha * H x, H (B,B), x (B,D) */
static void mul_h(double *out, const double *H, const double *x, double alpha, int B, int64_t D, int threads) {
#pragma omp parallel for num_threads(threads) if ((int64_t)B * B * D > PAR_WORK) schedule(static)
    for (int b = 0; b < B; b++) {
        double *o = out + (size_t)b * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0;
        for (int c = 0; c < B; c++) {
            double h = alpha * H[(size_t)b * B + c];
            if (h == 0.0) continue;
            const double *xr = x + (size_t)c * D;
            for (int64_t d = 0; d < D; d++) o[d] += h * xr[d];
        }
    }
}

/* One-sided Jacobi SVD (Hestenes). a (m x n, column-major: column k at
 * a + k*m) is rotated from the right until its columns are pairwise
 * orthogonal; v (n x n, column-major) accumulates the rotations, so that
 * a_in = a_out v^T, and sig[k] = |a_out column k|: a_in = U diag(sig) V^T
 * with U = a_out / sig. Returns the sweeps used. */
static int jacobi_svd(double *a, double *v, double *sig, int m, int n) {
    for (int i = 0; i < n * n; i++) v[i] = 0.0;
    for (int i = 0; i < n; i++) v[(size_t)i * n + i] = 1.0;
    int sweep = 0, rotated = 1;
    for (; sweep < JACOBI_SWEEPS && rotated; sweep++) {
        rotated = 0;
        for (int p = 0; p < n - 1; p++)
            for (int q = p + 1; q < n; q++) {
                double *ap = a + (size_t)p * m, *aq = a + (size_t)q * m;
                double al = 0.0, be = 0.0, ga = 0.0;
                for (int i = 0; i < m; i++) {
                    al += ap[i] * ap[i];
                    be += aq[i] * aq[i];
                    ga += ap[i] * aq[i];
                }
                if (!(fabs(ga) > JACOBI_TOL * sqrt(al * be))) continue;
                rotated = 1;
                double zeta = (be - al) / (2.0 * ga);
                double t = (zeta >= 0.0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
                double c = 1.0 / sqrt(1.0 + t * t), s = c * t;
                for (int i = 0; i < m; i++) {
                    double x = ap[i], y = aq[i];
                    ap[i] = c * x - s * y;
                    aq[i] = s * x + c * y;
                }
                double *vp = v + (size_t)p * n, *vq = v + (size_t)q * n;
                for (int i = 0; i < n; i++) {
                    double x = vp[i], y = vq[i];
                    vp[i] = c * x - s * y;
                    vq[i] = s * x + c * y;
                }
            }
    }
    for (int k = 0; k < n; k++) {
        const double *ak = a + (size_t)k * m;
        double s = 0.0;
        for (int i = 0; i < m; i++) s += ak[i] * ak[i];
        sig[k] = sqrt(s);
    }
    return sweep;
}

static double max_of(const double *p, int n) {
    double m = 0.0;
    for (int i = 0; i < n; i++) m = fmax(m, p[i]);
    return m;
}

/* ------------------------------------------------------------ workspace layout */

typedef struct geo_ws {
    geo_hdr *h;
    double *xs, *xt, *G, *colm, *part; /* common: (B,Ds), (B,Dt), (B,maxD), (maxD), (B) */
    double *Ks, *Kt, *H;               /* B x B each: Grams, and the B x B factor of a gradient */
    /* procrustes, reduced path: eigenvectors (B x B) and eigenvalues (B) per
     * side, the Jacobi matrix A (<= B x B), its V and singular values, and
     * two B x B temporaries */
    double *Vs, *Vt, *ls, *lt, *Ar, *Vr, *sr, *E, *F;
    /* procrustes, direct path: A (Ds*Dt), its V (n x n), sig (n), and two
     * (B, n) products, n = min(Ds, Dt) */
    double *Ad, *Vd, *sd, *T1, *T2;
    size_t end_reduced, end_direct; /* bytes up to the end of each part */
} geo_ws;

typedef struct geo_dims {
    int B;
    int64_t Ds, Dt;
} geo_dims;

static geo_dims dims_of(const kd_node *n) {
    return (geo_dims){.B = n->in[0]->val.shape[0], .Ds = cols(&n->in[0]->val), .Dt = cols(&n->in[1]->val)};
}

/* Carves the workspace for batch B (base NULL: only measure). kind 0:
 * gram_dist/cka; kind 1: procrustes, the reduced part (absent when the path
 * is forced DIRECT) then the direct part. Every array grows with B or not
 * at all, so a layout at a smaller batch lies inside one sized at the
 * maximum; the direct part may be left out of the allocation (see
 * auto_direct), which the forward checks against ws_bytes. */
static geo_ws geo_layout(char *base, geo_dims d, int kind, int path) {
    geo_ws w = {0};
    size_t off = round8(sizeof(geo_hdr));
    int64_t B = d.B, mx = d.Ds > d.Dt ? d.Ds : d.Dt, mn = d.Ds < d.Dt ? d.Ds : d.Dt;
#define CARVE(ptr, count)                                 \
    do {                                                  \
        (ptr) = base ? (double *)(base + off) : NULL;     \
        off += (size_t)(count) * sizeof(double);          \
    } while (0)
    w.h = (geo_hdr *)base;
    CARVE(w.xs, B * d.Ds);
    CARVE(w.xt, B * d.Dt);
    CARVE(w.G, B * mx);
    CARVE(w.colm, mx);
    CARVE(w.part, B);
    if (kind == 0 || path != PATH_DIRECT) {
        CARVE(w.Ks, B * B);
        CARVE(w.Kt, B * B);
        CARVE(w.H, B * B);
    }
    if (kind == 1 && path != PATH_DIRECT) {
        CARVE(w.Vs, B * B);
        CARVE(w.Vt, B * B);
        CARVE(w.ls, B);
        CARVE(w.lt, B);
        CARVE(w.Ar, B * B);
        CARVE(w.Vr, B * B);
        CARVE(w.sr, B);
        CARVE(w.E, B * B);
        CARVE(w.F, B * B);
    }
    w.end_reduced = off;
    if (kind == 1) {
        CARVE(w.Ad, d.Ds * d.Dt);
        CARVE(w.Vd, mn * mn);
        CARVE(w.sd, mn);
        CARVE(w.T1, B * mn);
        CARVE(w.T2, B * mn);
    }
    w.end_direct = off;
#undef CARVE
    return w;
}

/* multiply-adds of each path, roughly (Jacobi: ~6 sweeps of n^2/2 pairs x 3m) */
static double cost_direct(geo_dims d) {
    double mn = (double)(d.Ds < d.Dt ? d.Ds : d.Dt), mx = (double)(d.Ds > d.Dt ? d.Ds : d.Dt);
    return (double)d.B * d.Ds * d.Dt + 9.0 * mn * mn * mx;
}
static double cost_reduced(geo_dims d) {
    double B = d.B;
    return 2.0 * B * B * (double)(d.Ds + d.Dt) + 27.0 * B * B * B;
}
/* Whether auto takes the direct path at batch B. The difference
 * cost_direct - cost_reduced is concave in B and positive at B = 0, so if
 * the reduced path wins at the maximum batch it wins at every smaller one
 * (the workspace then needs no direct part). */
static int auto_direct(geo_dims d) { return cost_direct(d) <= cost_reduced(d); }

/* ============================================================ gram_dist and cka */

static size_t gk_ws(const kd_node *n, int threads) {
    (void)threads;
    return geo_layout(NULL, dims_of(n), 0, 0).end_reduced;
}

/* centres and normalises both sides and forms the two Grams */
static geo_ws gk_prepare(kd_node *n, const kd_ctx *ctx) {
    geo_dims d = dims_of(n);
    geo_ws w = geo_layout(n->ws, d, 0, 0);
    w.h->ns = center_normalize(w.xs, w.colm, w.part, n->in[0]->val.data, d.B, d.Ds, ctx->threads);
    w.h->nt = center_normalize(w.xt, w.colm, w.part, n->in[1]->val.data, d.B, d.Dt, ctx->threads);
    gram_d(w.Ks, w.xs, d.B, d.Ds, ctx->threads);
    gram_d(w.Kt, w.xt, d.B, d.Dt, ctx->threads);
    return w;
}

/* row partials of sum_ij a_ij b_ij (ordered) */
static double frob_dot(const double *a, const double *b, double *part, int B) {
    for (int i = 0; i < B; i++) {
        double s = 0.0;
        for (int j = 0; j < B; j++) s += a[(size_t)i * B + j] * b[(size_t)i * B + j];
        part[i] = s;
    }
    return sum_ordered(part, B);
}

static void gram_forward(kd_node *n, const kd_ctx *ctx) {
    geo_ws w = gk_prepare(n, ctx);
    int B = n->in[0]->val.shape[0];
    for (int i = 0; i < B; i++) {
        double s = 0.0;
        for (int j = 0; j < B; j++) {
            double e = w.Kt[(size_t)i * B + j] - w.Ks[(size_t)i * B + j];
            s += e * e;
        }
        w.part[i] = s;
    }
    n->val.data[0] = (float)sqrt(sum_ordered(w.part, B));
}

/* sends G = alpha * H X of each side needing it through the normalisation */
static void gk_send(kd_node *n, const kd_ctx *ctx, geo_ws *w, int side, const double *H, double alpha) {
    kd_node *X = n->in[side];
    if (!need_grad(X)) return;
    geo_dims d = dims_of(n);
    int64_t D = side ? d.Dt : d.Ds;
    const double *xh = side ? w->xt : w->xs;
    mul_h(w->G, H, xh, alpha, d.B, D, ctx->threads);
    chain_center_normalize(X->grad.data, w->G, xh, side ? w->h->nt : w->h->ns, d.B, D, w->colm, w->part,
                           ctx->threads);
}

/* L = |D|_F, D = Kt - Ks, K = X X^T:  dL/dK_t = D / L, dL/dK_s = -D / L;
 * for a symmetric K, dL/dX = 2 (dL/dK) X. */
static void gram_backward(kd_node *n, const kd_ctx *ctx) {
    geo_dims d = dims_of(n);
    geo_ws w = geo_layout(n->ws, d, 0, 0);
    /* D and |D| exactly as the forward had them (not the rounded output) */
    for (int i = 0; i < d.B; i++) {
        double s = 0.0;
        for (int j = 0; j < d.B; j++) {
            double e = w.Kt[(size_t)i * d.B + j] - w.Ks[(size_t)i * d.B + j];
            w.H[(size_t)i * d.B + j] = e;
            s += e * e;
        }
        w.part[i] = s;
    }
    double L = sqrt(sum_ordered(w.part, d.B));
    if (!(L > 0.0)) return;
    double k = 2.0 * n->grad.data[0] / L;
    gk_send(n, ctx, &w, 0, w.H, -k);
    gk_send(n, ctx, &w, 1, w.H, k);
}

static void cka_forward(kd_node *n, const kd_ctx *ctx) {
    geo_ws w = gk_prepare(n, ctx);
    int B = n->in[0]->val.shape[0];
    double a = frob_dot(w.Ks, w.Kt, w.part, B), p = sqrt(frob_dot(w.Ks, w.Ks, w.part, B)),
           q = sqrt(frob_dot(w.Kt, w.Kt, w.part, B));
    n->val.data[0] = (float)(p > 0.0 && q > 0.0 ? 1.0 - a / (p * q) : 1.0);
}

/* cka = a / (p q), a = <Ks,Kt>, p = |Ks|, q = |Kt|:
 *   d cka / dKs = Kt/(pq) - a Ks/(p^3 q),  d cka / dKt = Ks/(pq) - a Kt/(p q^3);
 * loss = 1 - cka, dX = 2 (dloss/dK) X. */
static void cka_backward(kd_node *n, const kd_ctx *ctx) {
    geo_dims d = dims_of(n);
    geo_ws w = geo_layout(n->ws, d, 0, 0);
    int B = d.B;
    double a = frob_dot(w.Ks, w.Kt, w.part, B), p = sqrt(frob_dot(w.Ks, w.Ks, w.part, B)),
           q = sqrt(frob_dot(w.Kt, w.Kt, w.part, B));
    if (!(p > 0.0 && q > 0.0)) return;
    double g = -2.0 * n->grad.data[0];
    for (int side = 0; side < 2; side++) {
        if (!need_grad(n->in[side])) continue;
        const double *Ko = side ? w.Ks : w.Kt, *Km = side ? w.Kt : w.Ks;
        double c1 = 1.0 / (p * q), c2 = a / (p * q) / (side ? q * q : p * p);
        for (size_t i = 0; i < (size_t)B * B; i++) w.H[i] = c1 * Ko[i] - c2 * Km[i];
        gk_send(n, ctx, &w, side, w.H, g);
    }
}

const kd_op_def kd_op_gram_dist = {
    .name = "gram_dist", .infer = geo_infer, .workspace = gk_ws, .forward = gram_forward, .backward = gram_backward};
const kd_op_def kd_op_cka = {
    .name = "cka", .infer = geo_infer, .workspace = gk_ws, .forward = cka_forward, .backward = cka_backward};

/* ============================================================ procrustes */

static size_t pr_ws(const kd_node *n, int threads) {
    (void)threads;
    geo_dims d = dims_of(n);
    geo_ws w = geo_layout(NULL, d, 1, n->ip[0]);
    if (n->ip[0] == PATH_REDUCED || (n->ip[0] == PATH_AUTO && !auto_direct(d))) return w.end_reduced;
    return w.end_direct;
}

/* divides the columns of a (m x n) with sig > SV_KEEP * max by sig: U */
static void unit_columns(double *a, const double *sig, int m, int n) {
    double thr = SV_KEEP * max_of(sig, n);
    for (int k = 0; k < n; k++)
        if (sig[k] > thr)
            for (int i = 0; i < m; i++) a[(size_t)k * m + i] /= sig[k];
}

/* Direct path: A = Y^T Z with the narrower side z as the columns (y = t,
 * z = s, unless Ds > Dt); returns |A|_* = |Xt^T Xs|_*. */
static double pr_direct(geo_ws *w, geo_dims d, int threads) {
    geo_hdr *h = w->h;
    h->swap = d.Ds > d.Dt;
    const double *Y = h->swap ? w->xs : w->xt, *Z = h->swap ? w->xt : w->xs;
    int m = (int)(h->swap ? d.Ds : d.Dt), nn = (int)(h->swap ? d.Dt : d.Ds), B = d.B;
#pragma omp parallel for num_threads(threads) if ((int64_t)B * m * nn > PAR_WORK) schedule(static)
    for (int k = 0; k < nn; k++) {
        double *a = w->Ad + (size_t)k * m;
        for (int r = 0; r < m; r++) a[r] = 0.0;
        for (int b = 0; b < B; b++) {
            double z = Z[(size_t)b * nn + k];
            const double *y = Y + (size_t)b * m;
            for (int r = 0; r < m; r++) a[r] += y[r] * z;
        }
    }
    h->m = m, h->n = nn;
    jacobi_svd(w->Ad, w->Vd, w->sd, m, nn);
    unit_columns(w->Ad, w->sd, m, nn);
    return sum_ordered(w->sd, nn);
}

/* Eigen-decomposition of a Gram K = X X^T (B x B, positive semi-definite)
 * by the Jacobi SVD: for such a matrix the right singular vectors are
 * eigenvectors and the singular values the eigenvalues. Keeps the
 * eigenpairs with lambda > EIG_KEEP * max, compacted to the front of V, and
 * returns their number. K is overwritten. */
static int gram_eig(double *K, double *V, double *lam, int B) {
    jacobi_svd(K, V, lam, B, B);
    double thr = EIG_KEEP * max_of(lam, B);
    int r = 0;
    for (int k = 0; k < B; k++)
        if (lam[k] > thr) {
            if (r != k) memmove(V + (size_t)r * B, V + (size_t)k * B, (size_t)B * sizeof *V);
            lam[r++] = lam[k];
        }
    return r;
}

/* Reduced path: per side X^T = Q R with R = L^1/2 V^T from the Gram's
 * eigenpairs; A = Ry Rz^T (ry x rz, the side with fewer kept eigenpairs as
 * z, the columns). Returns |A|_* = |Xt^T Xs|_*. */
static double pr_reduced(geo_ws *w, geo_dims d, int threads) {
    geo_hdr *h = w->h;
    int B = d.B;
    gram_d(w->Ks, w->xs, B, d.Ds, threads);
    gram_d(w->Kt, w->xt, B, d.Dt, threads);
    h->rs = gram_eig(w->Ks, w->Vs, w->ls, B);
    h->rt = gram_eig(w->Kt, w->Vt, w->lt, B);
    h->swap = h->rs > h->rt;
    const double *Vy = h->swap ? w->Vs : w->Vt, *Vz = h->swap ? w->Vt : w->Vs;
    const double *ly = h->swap ? w->ls : w->lt, *lz = h->swap ? w->lt : w->ls;
    int m = h->swap ? h->rs : h->rt, nn = h->swap ? h->rt : h->rs;
    for (int k = 0; k < nn; k++)
        for (int r = 0; r < m; r++) {
            const double *a = Vy + (size_t)r * B, *c = Vz + (size_t)k * B;
            double s = 0.0;
            for (int b = 0; b < B; b++) s += a[b] * c[b];
            w->Ar[(size_t)k * m + r] = sqrt(ly[r]) * s * sqrt(lz[k]);
        }
    h->m = m, h->n = nn;
    jacobi_svd(w->Ar, w->Vr, w->sr, m, nn);
    unit_columns(w->Ar, w->sr, m, nn);
    return sum_ordered(w->sr, nn);
}

static void pr_forward(kd_node *n, const kd_ctx *ctx) {
    geo_dims d = dims_of(n);
    int path = n->ip[0];
    geo_ws w = geo_layout(n->ws, d, 1, path);
    geo_hdr *h = w.h;
    h->ns = center_normalize(w.xs, w.colm, w.part, n->in[0]->val.data, d.B, d.Ds, ctx->threads);
    h->nt = center_normalize(w.xt, w.colm, w.part, n->in[1]->val.data, d.B, d.Dt, ctx->threads);
    h->path = 0;
    double nuc = 0.0;
    if (h->ns > 0.0 && h->nt > 0.0) {
        /* auto takes the direct path only where the workspace holds it (it
         * always does when the choice is made at the maximum batch) */
        int direct = path == PATH_DIRECT ||
                     (path == PATH_AUTO && auto_direct(d) && w.end_direct <= n->ws_bytes);
        nuc = direct ? pr_direct(&w, d, ctx->threads) : pr_reduced(&w, d, ctx->threads);
        h->path = direct ? PATH_DIRECT : PATH_REDUCED;
    }
    /* |Xt^T Xs|_* <= |Xt|_F |Xs|_F = 1: the value is in [0, 2]; the clamp
     * only removes rounding below 0 at perfect alignment */
    n->val.data[0] = (float)fmax(0.0, 2.0 - 2.0 * nuc);
}

/* G_side = g * H X_side through the normalisation, H (B x B) */
static void pr_send(kd_node *n, const kd_ctx *ctx, geo_ws *w, int side, const double *H, double g) {
    geo_dims d = dims_of(n);
    int64_t D = side ? d.Dt : d.Ds;
    const double *xh = side ? w->xt : w->xs;
    mul_h(w->G, H, xh, g, d.B, D, ctx->threads);
    chain_center_normalize(n->in[side]->grad.data, w->G, xh, side ? w->h->nt : w->h->ns, d.B, D, w->colm, w->part,
                           ctx->threads);
}

/* Direct: N = |Y^T Z|_*, A = Y^T Z = U S V^T, P = U1 V1^T (m x n):
 *   dN/dZ = Y P    (B x n):  T1 = Y U1, then T1 V1^T
 *   dN/dY = Z P^T  (B x m):  T2 = Z V1, then T2 U1^T
 * loss = 2 - 2N, so G = -2g dN/dX. */
static void pr_back_direct(kd_node *n, const kd_ctx *ctx, geo_ws *w, double g) {
    geo_dims d = dims_of(n);
    geo_hdr *h = w->h;
    int m = h->m, nn = h->n, B = d.B, sy = h->swap ? 0 : 1, sz = 1 - sy;
    const double *Y = sy ? w->xt : w->xs, *Z = sz ? w->xt : w->xs, *U = w->Ad, *V = w->Vd;
    double thr = SV_KEEP * max_of(w->sd, nn);
    for (int side = 0; side < 2; side++) {
        if (!need_grad(n->in[side])) continue;
        int is_z = side == sz;
        double *T = is_z ? w->T1 : w->T2;
        const double *X = is_z ? Y : Z; /* the other side's matrix */
        int dx = is_z ? m : nn, dg = is_z ? nn : m;
        /* T (B x nn) = X times (U1 for z, V1 for y), column j kept only */
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)B * dx * nn > PAR_WORK) schedule(static)
        for (int b = 0; b < B; b++) {
            const double *xr = X + (size_t)b * dx;
            for (int j = 0; j < nn; j++) {
                double s = 0.0;
                if (w->sd[j] > thr) {
                    const double *c = is_z ? U + (size_t)j * m : V + (size_t)j * nn;
                    for (int i = 0; i < dx; i++) s += xr[i] * c[i];
                }
                T[(size_t)b * nn + j] = s;
            }
        }
        /* G (B x dg) = g * T times (V1^T for z, U1^T for y) */
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)B * dg * nn > PAR_WORK) schedule(static)
        for (int b = 0; b < B; b++) {
            double *o = w->G + (size_t)b * dg;
            for (int i = 0; i < dg; i++) o[i] = 0.0;
            for (int j = 0; j < nn; j++) {
                double t = g * T[(size_t)b * nn + j];
                if (t == 0.0) continue;
                const double *c = is_z ? V + (size_t)j * nn : U + (size_t)j * m;
                for (int i = 0; i < dg; i++) o[i] += t * c[i];
            }
        }
        const double *xh = side ? w->xt : w->xs;
        chain_center_normalize(n->in[side]->grad.data, w->G, xh, side ? h->nt : h->ns, B, side ? d.Dt : d.Ds,
                               w->colm, w->part, ctx->threads);
    }
}

/* Reduced: N = |A|_*, A = Ly^1/2 Vy^T Vz Lz^1/2 = U S V^T, P = U1 V1^T (m x n):
 *   dN/dXz = Hz Xz,  Hz = Vy Ly^1/2 P Lz^-1/2 Vz^T
 *   dN/dXy = Hy Xy,  Hy = Vz Lz^1/2 P^T Ly^-1/2 Vy^T
 * (with Xz^T = Qz Rz: dN/dXz = Xy Qy P Qz^T = Ry^T P Qz^T and
 * Qz^T = Lz^-1/2 Vz^T Xz). */
static void pr_back_reduced(kd_node *n, const kd_ctx *ctx, geo_ws *w, double g) {
    geo_hdr *h = w->h;
    int B = dims_of(n).B, m = h->m, nn = h->n, sy = h->swap ? 0 : 1, sz = 1 - sy;
    const double *Vy = sy ? w->Vt : w->Vs, *Vz = sz ? w->Vt : w->Vs, *ly = sy ? w->lt : w->ls,
                 *lz = sz ? w->lt : w->ls;
    double thr = SV_KEEP * max_of(w->sr, nn), *P = w->E;
    for (int r = 0; r < m; r++)
        for (int k = 0; k < nn; k++) {
            double s = 0.0;
            for (int j = 0; j < nn; j++)
                if (w->sr[j] > thr) s += w->Ar[(size_t)j * m + r] * w->Vr[(size_t)j * nn + k];
            P[(size_t)r * nn + k] = s;
        }
    for (int side = 0; side < 2; side++) {
        if (!need_grad(n->in[side])) continue;
        int is_z = side == sz;
        /* H = Va diag(sa) Pt diag(1/sqrt(lb)) Vb^T with (a, b) = (y, z) for z's
         * gradient (Pt = P) and (z, y) for y's (Pt = P^T); F = Va diag(sa) Pt diag(1/sqrt(lb)) */
        const double *Va = is_z ? Vy : Vz, *Vb = is_z ? Vz : Vy, *la = is_z ? ly : lz, *lb = is_z ? lz : ly;
        int ra = is_z ? m : nn, rb = is_z ? nn : m;
        for (int b = 0; b < B; b++)
            for (int k = 0; k < rb; k++) {
                double s = 0.0;
                for (int r = 0; r < ra; r++) {
                    double p = is_z ? P[(size_t)r * nn + k] : P[(size_t)k * nn + r];
                    s += Va[(size_t)r * B + b] * sqrt(la[r]) * p;
                }
                w->F[(size_t)b * rb + k] = s / sqrt(lb[k]);
            }
        for (int b = 0; b < B; b++)
            for (int c = 0; c < B; c++) {
                double s = 0.0;
                for (int k = 0; k < rb; k++) s += w->F[(size_t)b * rb + k] * Vb[(size_t)k * B + c];
                w->H[(size_t)b * B + c] = s;
            }
        pr_send(n, ctx, w, side, w->H, g);
    }
}

static void pr_backward(kd_node *n, const kd_ctx *ctx) {
    geo_ws w = geo_layout(n->ws, dims_of(n), 1, n->ip[0]);
    if (w.h->path == 0) return; /* a side without shape: no gradient */
    double g = -2.0 * n->grad.data[0];
    if (w.h->path == PATH_DIRECT)
        pr_back_direct(n, ctx, &w, g);
    else
        pr_back_reduced(n, ctx, &w, g);
}

const kd_op_def kd_op_procrustes = {
    .name = "procrustes", .infer = geo_infer, .workspace = pr_ws, .forward = pr_forward, .backward = pr_backward};

/* ============================================================ builders */

static kd_node *geo_op(kd_graph *g, int op, kd_node *fs, kd_node *ft) {
    kd_node *in[2] = {fs, ft};
    return kd_graph_add_op(g, op, 2, in);
}

kd_node *kd_procrustes(kd_graph *g, kd_node *fs, kd_node *ft) { return geo_op(g, KD_OP_PROCRUSTES, fs, ft); }
kd_node *kd_gram_dist(kd_graph *g, kd_node *fs, kd_node *ft) { return geo_op(g, KD_OP_GRAM_DIST, fs, ft); }
kd_node *kd_cka(kd_graph *g, kd_node *fs, kd_node *ft) { return geo_op(g, KD_OP_CKA, fs, ft); }
