/* lelp.c - LELP (Loo, Iliopoulos, Hu & Vee 2024, "Linear projections of
 * teacher embeddings for few-class distillation"): pseudo-subclass targets
 * from the teacher's penultimate embeddings, and the student graph that
 * learns them (docs/losses/lelp.md has the formulas and our choices).
 *
 * What is here:
 *   - the group log-sum-exp op (N, K*S) -> (N, K) that turns a student's
 *     subclass logits into class logits (summing subclass probabilities);
 *   - a cyclic Jacobi eigen-solver for the D x D class covariances, a
 *     random orthogonal matrix from the QR of a Gaussian one, and the Givens
 *     equalisation that gives the kept directions equal variances;
 *   - the fit (per class: null-space projection, PCA, rotation) and the
 *     targets, computed once per training example before the student
 *     trains, in double;
 *   - the teacher pass that collects embeddings and logits, and the builder
 *     of the student's graph.
 * What is not: augmentation (the targets are those of the stored image; a
 * run refuses crop/flip with LELP), and any change of the targets while the
 * student trains.
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_distill.h"
#include "kd_lelp.h"
#include "kd_losses.h"
#include "ops/ops.h"

/* ================================================================ the op */

static kd_status glse_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val;
    int S = n->ip[0];
    if (x->ndim != 2 || S < 1 || x->shape[1] % S != 0)
        return kd_op_shape_error(n, "group_lse needs (N, K*S) with S dividing the width");
    n->val.ndim = 2;
    n->val.shape[0] = x->shape[0];
    n->val.shape[1] = x->shape[1] / S;
    return KD_OK;
}

/* out (N,K), inp (N,K*S) */
static void glse_forward_kernel(float *out, const float *inp, int N, int K, int S) {
    for (int i = 0; i < N * K; i++) {
        const float *x = inp + (size_t)i * S;
        double m = x[0], s = 0.0;
        for (int j = 1; j < S; j++) m = x[j] > m ? x[j] : m;
        for (int j = 0; j < S; j++) s += exp((double)x[j] - m);
        out[i] = (float)(m + log(s));
    }
}

static void glse_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    glse_forward_kernel(n->val.data, n->in[0]->val.data, n->val.shape[0], n->val.shape[1], n->ip[0]);
}

/* dinp (N,K*S) += dout[i] * exp(inp - out[i]) per group i; out (N,K) the forward's value */
static void glse_backward_kernel(float *dinp, const float *dout, const float *out, const float *inp, int N, int K,
                                 int S) {
    for (int i = 0; i < N * K; i++)
        for (int j = 0; j < S; j++) {
            size_t a = (size_t)i * S + j;
            dinp[a] += (float)(dout[i] * exp((double)inp[a] - out[i]));
        }
}

static void glse_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *x = n->in[0];
    if (!(x->flags & KD_F_NEED_GRAD)) return;
    glse_backward_kernel(x->grad.data, n->grad.data, n->val.data, x->val.data, n->val.shape[0], n->val.shape[1],
                         n->ip[0]);
}

const kd_op_def kd_op_group_lse = {
    .name = "group_lse", .infer = glse_infer, .forward = glse_forward, .backward = glse_backward};

kd_node *kd_group_lse(kd_graph *g, kd_node *x, int S) {
    KD_ASSERT(S >= 1, "group size %d", S);
    int ip[8] = {S};
    return kd_graph_add_op_ex(g, KD_OP_GROUP_LSE, 1, &x, ip, NULL);
}

/* ================================================================ linear algebra */

int kd_sym_eig(double *evals, double *evecs, const double *a_in, int n) {
    double *a = kd_malloc((size_t)n * n * sizeof(double)), *v = evecs;
    memcpy(a, a_in, (size_t)n * n * sizeof(double));
    for (int i = 0; i < n * n; i++) v[i] = 0.0;
    for (int i = 0; i < n; i++) v[(size_t)i * n + i] = 1.0;
    double total = 0.0;
    for (int i = 0; i < n * n; i++) total += a[i] * a[i];
    int sweep = 0;
    for (; sweep < 100; sweep++) {
        double off = 0.0;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) off += a[(size_t)p * n + q] * a[(size_t)p * n + q];
        if (off <= 1e-30 * total || off == 0.0) break;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = a[(size_t)p * n + q];
                if (fabs(apq) <= 1e-300) continue;
                /* the rotation that zeroes a[p][q]: tan of the smaller angle */
                double theta = (a[(size_t)q * n + q] - a[(size_t)p * n + p]) / (2.0 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; k++) { /* columns p, q */
                    double akp = a[(size_t)k * n + p], akq = a[(size_t)k * n + q];
                    a[(size_t)k * n + p] = c * akp - s * akq;
                    a[(size_t)k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) { /* rows p, q */
                    double apk = a[(size_t)p * n + k], aqk = a[(size_t)q * n + k];
                    a[(size_t)p * n + k] = c * apk - s * aqk;
                    a[(size_t)q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) {
                    double vkp = v[(size_t)k * n + p], vkq = v[(size_t)k * n + q];
                    v[(size_t)k * n + p] = c * vkp - s * vkq;
                    v[(size_t)k * n + q] = s * vkp + c * vkq;
                }
            }
    }
    for (int i = 0; i < n; i++) evals[i] = a[(size_t)i * n + i];
    /* selection sort, descending, moving columns along */
    for (int i = 0; i < n; i++) {
        int best = i;
        for (int j = i + 1; j < n; j++)
            if (evals[j] > evals[best]) best = j;
        if (best != i) {
            double t = evals[i];
            evals[i] = evals[best];
            evals[best] = t;
            for (int k = 0; k < n; k++) {
                t = v[(size_t)k * n + i];
                v[(size_t)k * n + i] = v[(size_t)k * n + best];
                v[(size_t)k * n + best] = t;
            }
        }
    }
    for (int j = 0; j < n; j++) { /* sign: largest-magnitude entry positive */
        int big = 0;
        for (int k = 1; k < n; k++)
            if (fabs(v[(size_t)k * n + j]) > fabs(v[(size_t)big * n + j])) big = k;
        if (v[(size_t)big * n + j] < 0)
            for (int k = 0; k < n; k++) v[(size_t)k * n + j] = -v[(size_t)k * n + j];
    }
    free(a);
    return sweep;
}

void kd_random_orthogonal(double *q, int n, kd_rng *r) {
    for (int i = 0; i < n * n; i++) q[i] = kd_rng_normal(r);
    for (int j = 0; j < n; j++) {
        for (int pass = 0; pass < 2; pass++) /* Gram-Schmidt twice against the earlier columns */
            for (int i = 0; i < j; i++) {
                double d = 0.0;
                for (int k = 0; k < n; k++) d += q[(size_t)k * n + i] * q[(size_t)k * n + j];
                for (int k = 0; k < n; k++) q[(size_t)k * n + j] -= d * q[(size_t)k * n + i];
            }
        double nn = 0.0;
        for (int k = 0; k < n; k++) nn += q[(size_t)k * n + j] * q[(size_t)k * n + j];
        nn = sqrt(nn);
        KD_ASSERT(nn > 1e-12, "degenerate Gaussian column %d", j);
        for (int k = 0; k < n; k++) q[(size_t)k * n + j] /= nn;
    }
}

void kd_lelp_equalize(double *m, double *r, int S) {
    double mean = 0.0;
    for (int i = 0; i < S; i++) mean += m[(size_t)i * S + i];
    mean /= S;
    char *done = kd_calloc((size_t)S, 1);
    for (int step = 0; step + 1 < S; step++) {
        int hi = -1, lo = -1;
        for (int i = 0; i < S; i++) {
            if (done[i]) continue;
            if (hi < 0 || m[(size_t)i * S + i] > m[(size_t)hi * S + hi]) hi = i;
            if (lo < 0 || m[(size_t)i * S + i] < m[(size_t)lo * S + lo]) lo = i;
        }
        double a = m[(size_t)hi * S + hi], b = m[(size_t)lo * S + lo], c2 = m[(size_t)hi * S + lo];
        if (hi == lo || a - b <= 1e-12 * fabs(mean)) break;
        /* new (hi,hi) entry after rotating by t: (a+b)/2 + A cos 2t + c2 sin 2t = (a+b)/2 + rr cos(2t - phi) */
        double A = 0.5 * (a - b), rr = sqrt(A * A + c2 * c2), phi = atan2(c2, A);
        double cv = (mean - 0.5 * (a + b)) / rr;
        cv = cv > 1.0 ? 1.0 : cv < -1.0 ? -1.0 : cv;
        double t = 0.5 * (phi + acos(cv)), c = cos(t), s = sin(t);
        /* columns: e_hi' = c e_hi + s e_lo, e_lo' = -s e_hi + c e_lo */
        for (int k = 0; k < S; k++) {
            double x = m[(size_t)k * S + hi], y = m[(size_t)k * S + lo];
            m[(size_t)k * S + hi] = c * x + s * y;
            m[(size_t)k * S + lo] = -s * x + c * y;
            x = r[(size_t)k * S + hi], y = r[(size_t)k * S + lo];
            r[(size_t)k * S + hi] = c * x + s * y;
            r[(size_t)k * S + lo] = -s * x + c * y;
        }
        for (int k = 0; k < S; k++) { /* rows */
            double x = m[(size_t)hi * S + k], y = m[(size_t)lo * S + k];
            m[(size_t)hi * S + k] = c * x + s * y;
            m[(size_t)lo * S + k] = -s * x + c * y;
        }
        done[hi] = 1;
    }
    free(done);
}

/* ================================================================ fit and targets */

/* x (D) = h projected onto the null space of the head (h - U^T U h), or h */
static void project(const kd_lelp *l, double *x, const float *h) {
    int D = l->D;
    for (int i = 0; i < D; i++) x[i] = h[i];
    if (!l->null_proj) return;
    for (int r = 0; r < l->r_u; r++) {
        const double *u = l->u + (size_t)r * D;
        double d = 0.0;
        for (int i = 0; i < D; i++) d += u[i] * x[i];
        for (int i = 0; i < D; i++) x[i] -= d * u[i];
    }
}

void kd_lelp_free(kd_lelp *l) {
    free(l->u);
    free(l->mean);
    free(l->dirs);
    free(l->inv_sigma);
    free(l->var);
    free(l->explained);
    free(l->count);
    memset(l, 0, sizeof *l);
}

kd_status kd_lelp_fit(kd_lelp *l, const float *h, const int *labels, int N, int D, const float *w, int K,
                      const kd_lelp_opts *o, const double *rot) {
    memset(l, 0, sizeof *l);
    int S = o->S;
    if (S < 1) return kd_errorf(KD_ECONFIG, "LELP: S = %d must be at least 1", S);
    if (!(o->T > 0.0f) || !isfinite(o->T)) return kd_errorf(KD_ECONFIG, "LELP: temperature %g must be positive", (double)o->T);
    l->K = K, l->D = D, l->S = S, l->T = o->T, l->null_proj = o->null_proj;
    l->u = kd_calloc((size_t)K * D, sizeof(double));
    /* orthonormal basis of the head's row space (modified Gram-Schmidt, twice) */
    if (o->null_proj)
        for (int k = 0; k < K; k++) {
            double *u = l->u + (size_t)l->r_u * D, n0 = 0.0, nn = 0.0;
            for (int i = 0; i < D; i++) u[i] = w[(size_t)k * D + i], n0 += u[i] * u[i];
            for (int pass = 0; pass < 2; pass++)
                for (int r = 0; r < l->r_u; r++) {
                    const double *b = l->u + (size_t)r * D;
                    double d = 0.0;
                    for (int i = 0; i < D; i++) d += b[i] * u[i];
                    for (int i = 0; i < D; i++) u[i] -= d * b[i];
                }
            for (int i = 0; i < D; i++) nn += u[i] * u[i];
            if (nn <= 1e-20 * n0 || nn == 0.0) continue; /* dependent row: adds nothing */
            nn = sqrt(nn);
            for (int i = 0; i < D; i++) u[i] /= nn;
            l->r_u++;
        }
    int room = D - l->r_u;
    if (S > room) {
        kd_status st = kd_errorf(KD_ECONFIG, "LELP: S = %d directions, but the embeddings have only %d%s", S, room,
                                 o->null_proj ? " outside the head's row space" : "");
        kd_lelp_free(l);
        return st;
    }
    l->mean = kd_calloc((size_t)K * D, sizeof(double));
    l->dirs = kd_calloc((size_t)K * S * D, sizeof(double));
    l->inv_sigma = kd_calloc((size_t)K, sizeof(double));
    l->var = kd_calloc((size_t)K * S, sizeof(double));
    l->explained = kd_calloc((size_t)K, sizeof(double));
    l->count = kd_calloc((size_t)K, sizeof(int));
    for (int i = 0; i < N; i++)
        if (labels[i] >= 0) {
            KD_ASSERT(labels[i] < K, "label %d of example %d with %d classes", labels[i], i, K);
            l->count[labels[i]]++;
        }
    kd_rng rng;
    kd_rng_seed(&rng, o->seed);
    double *cov = kd_malloc((size_t)D * D * sizeof(double)), *ev = kd_malloc((size_t)D * sizeof(double));
    double *vec = kd_malloc((size_t)D * D * sizeof(double));
    double *m = kd_malloc((size_t)S * S * sizeof(double)), *r = kd_malloc((size_t)S * S * sizeof(double));
    kd_status st = KD_OK;
    for (int k = 0; k < K && st == KD_OK; k++) {
        int nk = l->count[k];
        if (nk < 2) {
            st = kd_errorf(KD_ECONFIG, "LELP: class %d has %d training example%s; its PCA needs at least 2", k, nk,
                           nk == 1 ? "" : "s");
            break;
        }
        double *mu = l->mean + (size_t)k * D;
        double *xs = kd_malloc((size_t)nk * D * sizeof(double));
        int j = 0;
        for (int i = 0; i < N; i++)
            if (labels[i] == k) {
                project(l, xs + (size_t)j * D, h + (size_t)i * D);
                for (int a = 0; a < D; a++) mu[a] += xs[(size_t)j * D + a];
                j++;
            }
        for (int a = 0; a < D; a++) mu[a] /= nk;
        for (int i = 0; i < nk; i++)
            for (int a = 0; a < D; a++) xs[(size_t)i * D + a] -= mu[a];
        /* cov (D,D) = xs^T xs / nk (biased), upper triangle, then mirrored */
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, D, nk, 1.0 / nk, xs, D, 0.0, cov, D);
        for (int a = 0; a < D; a++)
            for (int b = 0; b < a; b++) cov[(size_t)a * D + b] = cov[(size_t)b * D + a];
        free(xs);
        kd_sym_eig(ev, vec, cov, D);
        double kept = 0.0, all = 0.0;
        for (int a = 0; a < D; a++) all += ev[a] > 0 ? ev[a] : 0.0;
        for (int s = 0; s < S; s++) kept += ev[s] > 0 ? ev[s] : 0.0;
        double mean_var = kept / S;
        if (!(mean_var > 1e-12 * (all > 0 ? all : 1.0)) || !(mean_var > 0.0)) {
            st = kd_errorf(KD_ECONFIG, "LELP: the teacher's embeddings of class %d have no variance in %d directions%s",
                           k, S, o->null_proj ? " outside the head's row space" : "");
            break;
        }
        l->explained[k] = all > 0 ? kept / all : 0.0;
        l->inv_sigma[k] = 1.0 / sqrt(mean_var);
        /* m = R^T diag(ev) R with R the rotation (identity without rotate) */
        for (int a = 0; a < S * S; a++) r[a] = 0.0;
        if (o->rotate) {
            if (rot)
                memcpy(r, rot + (size_t)k * S * S, (size_t)S * S * sizeof(double));
            else
                kd_random_orthogonal(r, S, &rng);
        } else {
            for (int a = 0; a < S; a++) r[(size_t)a * S + a] = 1.0;
        }
        for (int a = 0; a < S; a++)
            for (int b = 0; b < S; b++) {
                double t = 0.0;
                for (int c = 0; c < S; c++) t += r[(size_t)c * S + a] * (ev[c] > 0 ? ev[c] : 0.0) * r[(size_t)c * S + b];
                m[(size_t)a * S + b] = t;
            }
        if (o->rotate) kd_lelp_equalize(m, r, S);
        for (int s = 0; s < S; s++) {
            double *d = l->dirs + ((size_t)k * S + s) * D;
            for (int c = 0; c < S; c++)
                for (int a = 0; a < D; a++) d[a] += r[(size_t)c * S + s] * vec[(size_t)a * D + c];
            l->var[(size_t)k * S + s] = m[(size_t)s * S + s] / mean_var;
        }
    }
    free(cov);
    free(ev);
    free(vec);
    free(m);
    free(r);
    if (st != KD_OK) kd_lelp_free(l);
    return st;
}

void kd_lelp_coords(const kd_lelp *l, double *z, const float *h) {
    int D = l->D, S = l->S;
    double *x = kd_malloc((size_t)D * sizeof(double));
    project(l, x, h);
    for (int k = 0; k < l->K; k++) {
        const double *mu = l->mean + (size_t)k * D;
        for (int s = 0; s < S; s++) {
            const double *d = l->dirs + ((size_t)k * S + s) * D;
            double t = 0.0;
            for (int a = 0; a < D; a++) t += d[a] * (x[a] - mu[a]);
            z[k * S + s] = t * l->inv_sigma[k] / l->T;
        }
    }
    free(x);
}

void kd_lelp_targets(const kd_lelp *l, float *logq, const float *h, const float *t_logits, int N) {
    int K = l->K, S = l->S, KS = K * S;
    double *z = kd_malloc((size_t)KS * sizeof(double));
    for (int n = 0; n < N; n++) {
        kd_lelp_coords(l, z, h + (size_t)n * l->D);
        const float *t = t_logits + (size_t)n * K;
        double tm = t[0], ts = 0.0;
        for (int k = 1; k < K; k++) tm = t[k] > tm ? t[k] : tm;
        for (int k = 0; k < K; k++) ts += exp((double)t[k] - tm);
        double tl = tm + log(ts);
        for (int k = 0; k < K; k++) {
            const double *zk = z + k * S;
            double zm = zk[0], zs = 0.0;
            for (int s = 1; s < S; s++) zm = zk[s] > zm ? zk[s] : zm;
            for (int s = 0; s < S; s++) zs += exp(zk[s] - zm);
            double zl = zm + log(zs);
            for (int s = 0; s < S; s++) logq[(size_t)n * KS + k * S + s] = (float)((t[k] - tl) + (zk[s] - zl));
        }
    }
    free(z);
}

/* ================================================================ teacher pass */

kd_status kd_lelp_teacher_targets(float *logq, const char *spec, const char *ckpt, const kd_dataset *ds, int batch,
                                  const kd_lelp_opts *o, kd_lelp *fit) {
    kd_classifier t;
    kd_status st = kd_classifier_new(&t, spec, "", ds, batch, 0.0f, 0);
    if (st != KD_OK) return kd_error_prefix(st, "LELP teacher model");
    st = kd_checkpoint_load(t.g, &t.m, ckpt);
    kd_node *w = kd_graph_find(t.g, "head.weight");
    int K = ds->n_classes, D = t.m.feat ? (int)(kd_numel(&t.m.feat->val) / t.m.feat->val.shape[0]) : 0;
    if (st == KD_OK && (!w || w->val.ndim != 2 || w->val.shape[0] != K || w->val.shape[1] != D))
        st = kd_errorf(KD_ESHAPE, "%s: LELP needs the teacher's head.weight (%d, %d)", ckpt, K, D);
    float *h = NULL, *tl = NULL;
    int *labels = NULL;
    if (st == KD_OK) {
        h = kd_malloc((size_t)ds->n * D * sizeof(float));
        tl = kd_malloc((size_t)ds->n * K * sizeof(float));
        labels = kd_malloc((size_t)ds->n * sizeof(int));
        kd_dataset view = *ds; /* all labels visible: the fit decides which to use */
        view.labeled = 0;
        kd_loader_opts lo = {.batch = batch};
        kd_loader *ld = kd_loader_new(&view, &lo);
        kd_loader_start_epoch(ld, 0);
        int B, at = 0;
        while ((B = kd_loader_next(ld, t.x->val.data, t.y->val.data, NULL)) > 0) {
            kd_graph_set_batch(t.g, B);
            kd_graph_forward_to(t.g, 0, t.m.logits);
            memcpy(h + (size_t)at * D, t.m.feat->val.data, (size_t)B * D * sizeof(float));
            memcpy(tl + (size_t)at * K, t.m.logits->val.data, (size_t)B * K * sizeof(float));
            at += B;
        }
        kd_loader_free(ld);
        KD_ASSERT(at == ds->n, "teacher pass saw %d of %d examples", at, ds->n);
        int nl = ds->labeled > 0 && ds->labeled < ds->n ? ds->labeled : ds->n;
        for (int i = 0; i < ds->n; i++) labels[i] = i < nl ? (int)ds->labels[i] : -1;
        kd_lelp l;
        st = kd_lelp_fit(&l, h, labels, ds->n, D, w->val.data, K, o, NULL);
        if (st == KD_OK) {
            kd_lelp_targets(&l, logq, h, tl, ds->n);
            if (fit)
                *fit = l;
            else
                kd_lelp_free(&l);
        }
    }
    free(h);
    free(tl);
    free(labels);
    kd_classifier_free(&t);
    return st;
}

/* ================================================================ student graph */

static int is_divergence(const char *name) {
    static const char *ok[] = {"kd", "fkl", "rkl", "jsd", "tvd", "skl", "srkl", "mse_logits"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        if (strcmp(name, ok[i]) == 0) return 1;
    return 0;
}

kd_node *kd_lelp_sub_logits(const kd_distiller *d) { return kd_model_tap(&d->c.m, "logits"); }

void kd_lelp_fill(float *dst, const float *logq, int KS, const int *aug, int B) {
    for (int b = 0; b < B; b++) memcpy(dst + (size_t)b * KS, logq + (size_t)aug[4 * b + 3] * KS, (size_t)KS * sizeof(float));
}

kd_status kd_lelp_distiller_build(kd_distiller *d, const char *student, const char *loss, const kd_dataset *ds, int S,
                                  int max_batch, uint64_t seed) {
    memset(d, 0, sizeof *d);
    KD_ASSERT(S >= 1, "S = %d", S);
    kd_loss_spec spec, ce = {0}, rest = {0};
    kd_status st = kd_loss_spec_parse(loss, &spec);
    if (st != KD_OK) return kd_error_prefix(st, "[distill] loss");
    for (int i = 0; i < spec.n; i++) {
        if (strcmp(spec.terms[i].name, "ce") == 0)
            ce.terms[ce.n++] = spec.terms[i];
        else if (is_divergence(spec.terms[i].name))
            rest.terms[rest.n++] = spec.terms[i];
        else
            return kd_errorf(KD_ECONFIG,
                             "[distill] loss: '%s' cannot be used with [distill] lelp (only ce and the divergences kd, "
                             "fkl, rkl, jsd, tvd, skl, srkl, mse_logits)",
                             spec.terms[i].name);
    }
    int K = ds->n_classes;
    kd_classifier *c = &d->c;
    c->g = kd_graph_new();
    int xs[4] = {max_batch, ds->c, ds->h, ds->w}, ys[1] = {max_batch}, ts[2] = {max_batch, K * S};
    c->x = kd_input(c->g, "x", 4, xs);
    c->y = kd_input(c->g, "y", 1, ys);
    st = kd_model_build(c->g, student, "s.", c->x, K * S, &c->m);
    if (st != KD_OK) st = kd_error_prefix(st, "[student] model");
    kd_node *sub = c->m.logits;
    if (st == KD_OK) {
        kd_node *cls = kd_group_lse(c->g, sub, S);
        kd_node_set_name(cls, "s.class_logits");
        cls->flags |= KD_F_KEEP;
        c->m.logits = cls;
        d->t_logits = kd_input(c->g, "t.lelp", 2, ts);
        d->t_mix = d->t_logits;
    }
    kd_built_loss parts[2];
    int np = 0;
    if (st == KD_OK && ce.n) {
        kd_loss_inputs in = {.s_logits = c->m.logits, .t_logits = NULL, .labels = c->y, .n_data = ds->n};
        st = kd_loss_build(c->g, &ce, &in, &parts[np++]);
    }
    if (st == KD_OK && rest.n) {
        kd_loss_inputs in = {.s_logits = sub, .t_logits = d->t_logits, .labels = c->y, .n_data = ds->n};
        st = kd_loss_build(c->g, &rest, &in, &parts[np++]);
    }
    if (st != KD_OK) st = kd_error_prefix(st, "[distill] loss");
    if (st == KD_OK && np == 0) st = kd_errorf(KD_ECONFIG, "[distill] loss: empty");
    if (st == KD_OK) {
        d->loss = parts[0];
        if (np == 2) {
            for (int i = 0; i < parts[1].n; i++) d->loss.terms[d->loss.n++] = parts[1].terms[i];
            d->loss.total = kd_add(c->g, parts[0].total, parts[1].total);
            kd_node_set_name(d->loss.total, "loss");
            d->loss.uses_teacher = 1;
        }
        c->loss = d->loss.total;
        st = kd_graph_compile(c->g, max_batch, seed);
    }
    if (st != KD_OK) {
        kd_graph_free(c->g);
        memset(d, 0, sizeof *d);
    }
    return st;
}
