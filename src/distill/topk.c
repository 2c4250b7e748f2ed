/* topk.c - the divergence between a student's full next-token distribution
 * and a teacher known only through a top-k cache (language-model
 * distillation from cached teacher outputs).
 *
 * Per row (token position) the cache gives the teacher's k largest
 * log-probabilities log q_i at temperature T and their ids, i in S. The
 * rest of the vocabulary is one more outcome, the tail: both distributions
 * are coarse-grained onto k+1 buckets
 *     teacher  q~ = (q_S, q_tail),  q_tail = max(1 - sum_S q_i, 0)
 *     student  p~ = (p_S, p_tail),  p = softmax(z/T), p_tail = sum_{j not in S} p_j
 * and the kind's divergence (fkl, rkl, jsd, tvd, skl, srkl, as kd_divergence
 * in logit.c) is taken between q~ and p~. docs/losses/topk.md has the
 * definition, why it is a lower bound of the dense divergence, and the
 * gradient derivation; in short:
 *   - the student side lives in log space: with a = z/T, A_i = a_{id_i}
 *     (i in S) and A_tail = lse_{j not in S} a_j are the k+1 "bucket
 *     logits", lse = lse(lse_S, A_tail), log p~_b = A_b - lse. The tail
 *     comes from a log-sum-exp over the complement, never from 1 - sum p_S;
 *   - p~ is a softmax of A, so dL/dA_b is the dense op's closed form on the
 *     buckets (fkl with sum q~ = Q not assumed 1, since fp16 values may sum
 *     past 1), and the chain rule through A_tail gives
 *       dL/dz_j = (1/T) dL/dA_b(j)                       j in S (singleton)
 *       dL/dz_j = (1/T) dL/dA_tail exp(a_j - A_tail)      j in the tail,
 *     which is (1/T) p_j (g_b(j) - sum_b p~_b g_b), g_b = dL/dp~_b;
 *   - the teacher's tail is clamped at 0 (fp16 log-probabilities may sum
 *     past 1), and a bucket of zero mass contributes 0 log 0 = 0. rkl (and
 *     srkl at alpha = 0, which is rkl) would be +inf where the teacher's
 *     tail is 0 and the student's is not; for those two the teacher's tail
 *     is floored at TAIL_FLOOR instead;
 *   - with k = V the tail is empty on both sides and dropped: the loss is
 *     the dense divergence on the cached distribution.
 *
 * Memory: a few doubles per row and one byte per vocabulary entry per
 * thread (membership of S while walking the row); never an R x V buffer.
 * The backward pass recomputes every probability from the logits.
 *
 * Ids are floats holding integers in [0, V), distinct within a row. A bad
 * id is a bug of whoever filled the input (the cache reader validates ids
 * before training): the forward pass records it per row and, after the
 * row loop, asserts once on the first such row, naming the node, the row
 * and the position. Masked rows are neither computed nor checked (padding
 * may hold anything).
 *
 * Not here: reading the cache file (src/train/cache.c), the loss-spec
 * plumbing, gradients to the teacher inputs (there are none).
 */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kd_distill.h"
#include "ops/ops.h"

/* Teacher tail used by rkl/srkl(alpha = 0) when 1 - sum q_S <= TAIL_FLOOR:
 * far below the ~1e-4 to which fp16 log-probabilities pin down q_tail, so
 * it only stands for "no tail" (log = -27.6) where 0 would give +inf. */
#define TAIL_FLOOR 1e-12

/* per-row workspace (double): log-sum-exp of all and of the tail of z/T
 * (-inf when the tail is empty), the teacher's log tail as used (-inf when
 * zero or dropped), Q = sum over buckets of q~, the row's loss, the row
 * constant of the gradient, kept (1/0), and for a bad id: 1 + its position,
 * its value and the reason (1 not an integer in [0, V), 2 a duplicate) */
enum { W_LSE, W_LTAIL, W_LQT, W_Q, W_LOSS, W_C, W_KEPT, W_BAD, W_BADVAL, W_WHY, TOPK_WS };

typedef struct topk_geom {
    int R, V, k;
} topk_geom;

static topk_geom geom_of(const kd_node *n) {
    topk_geom q;
    const kd_tensor *s = &n->in[0]->val, *ids = &n->in[1]->val;
    q.V = s->shape[s->ndim - 1];
    q.R = (int)(kd_numel(s) / q.V);
    q.k = ids->shape[ids->ndim - 1];
    return q;
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* log(e^x + e^y), also when one of them is -inf */
static inline double lse2(double x, double y) {
    double m = x > y ? x : y;
    if (m == -INFINITY) return m;
    return m + log1p(exp(-fabs(x - y)));
}

static inline double sgn(double x) { return (double)((x > 0.0) - (x < 0.0)); }

/* ---------------------------------------------------------------- shapes */

/* s (..., V); t_ids, t_logp (..., k) with the same leading dims as s and
 * 1 <= k <= V; mask (R) optional */
static kd_status topk_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *ids = &n->in[1]->val, *lq = &n->in[2]->val;
    if (s->ndim < 1) return kd_op_shape_error(n, "student logits need a vocabulary dim");
    int same = ids->ndim == lq->ndim;
    for (int i = 0; same && i < ids->ndim; i++) same = ids->shape[i] == lq->shape[i];
    if (!same) return kd_op_shape_error(n, "top-k ids and log-probabilities must have the same shape");
    int lead = ids->ndim == s->ndim;
    for (int i = 0; lead && i < s->ndim - 1; i++) lead = ids->shape[i] == s->shape[i];
    if (!lead) return kd_op_shape_error(n, "top-k inputs (..., k) need the leading dims of the logits (..., V)");
    if (ids->shape[ids->ndim - 1] > s->shape[s->ndim - 1])
        return kd_op_shape_error(n, "top-k cache holds more entries per row than the vocabulary");
    if (n->n_in > 3) {
        topk_geom q = geom_of(n);
        if (kd_numel(&n->in[3]->val) != q.R) return kd_op_shape_error(n, "the mask needs one value per row of logits");
    }
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

/* rows x TOPK_WS doubles, then one byte per vocabulary entry per thread */
static size_t topk_ws(const kd_node *n, int threads) {
    topk_geom q = geom_of(n);
    return (size_t)q.R * TOPK_WS * sizeof(double) + (size_t)threads * q.V;
}

static unsigned char *thread_marks(kd_node *n, int R, int V) {
    return (unsigned char *)n->ws + (size_t)R * TOPK_WS * sizeof(double) + (size_t)thread_id() * V;
}

/* ---------------------------------------------------------------- one row */

/* Sets mark[id] = 1 for the ids of one row, mark (V) all 0 on entry.
 * Returns 0 when every id is an integer in [0, V) and none repeats;
 * otherwise 1 + the position of the first bad one, with the reason in
 * *why, and mark all 0 again. */
static int mark_ids(unsigned char *mark, const float *ids, int k, int V, int *why) {
    for (int i = 0; i < k; i++) {
        float x = ids[i];
        int bad = 0;
        if (!(x >= 0.0f && x < (float)V) || x != (float)(int)x)
            bad = 1;
        else if (mark[(int)x])
            bad = 2;
        if (bad) {
            for (int j = 0; j < i; j++) mark[(int)ids[j]] = 0;
            *why = bad;
            return i + 1;
        }
        mark[(int)x] = 1;
    }
    return 0;
}

static void unmark_ids(unsigned char *mark, const float *ids, int k) {
    for (int i = 0; i < k; i++) mark[(int)ids[i]] = 0;
}

/* log sum_{j not marked} exp(z_j / T), max-subtracted, in double; z (V) */
static double tail_lse(const float *z, const unsigned char *mark, int V, double invT) {
    float m = -INFINITY;
    for (int j = 0; j < V; j++)
        if (!mark[j] && z[j] > m) m = z[j];
    double ms = (double)m * invT, s = 0.0;
    for (int j = 0; j < V; j++)
        if (!mark[j]) s += exp((double)z[j] * invT - ms);
    return ms + log(s);
}

/* log sum_{i in S} exp(z_{id_i} / T) */
static double s_lse(const float *z, const float *ids, int k, double invT) {
    float m = -INFINITY;
    for (int i = 0; i < k; i++) m = z[(int)ids[i]] > m ? z[(int)ids[i]] : m;
    double ms = (double)m * invT, s = 0.0;
    for (int i = 0; i < k; i++) s += exp((double)z[(int)ids[i]] * invT - ms);
    return ms + log(s);
}

/* Log-weights of the mixture log m = lse(lwt + log q, lws + log p), q the
 * teacher's and p the student's bucket probabilities. */
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

/* kinds whose value is +inf on a zero teacher bucket the student covers */
static int needs_floor(int kind, double prm) { return kind == KD_DIV_RKL || (kind == KD_DIV_SRKL && prm == 0.0); }

typedef struct div_args {
    int kind;
    double prm, lwt, lws;
} div_args;

/* One bucket's share of the loss and of the row constant c. lp is finite;
 * lq may be -inf (a zero teacher bucket: 0 log 0 = 0). */
static inline void bucket_fwd(const div_args *a, double lp, double lq, double *loss, double *c) {
    double p = exp(lp), q = exp(lq), lm;
    switch (a->kind) {
    case KD_DIV_FKL:
        if (q > 0.0) *loss += q * (lq - lp);
        break;
    case KD_DIV_RKL:
        *loss += p * (lp - lq);
        break;
    case KD_DIV_JSD:
        lm = lse2(a->lwt + lq, a->lws + lp);
        if (q > 0.0) *loss += a->prm * q * (lq - lm);
        *loss += (1.0 - a->prm) * p * (lp - lm);
        *c += p * (lp - lm);
        break;
    case KD_DIV_TVD:
        *loss += 0.5 * fabs(p - q);
        *c += 0.5 * p * sgn(p - q);
        break;
    case KD_DIV_SKL:
        lm = lse2(a->lwt + lq, a->lws + lp);
        if (q > 0.0) *loss += q * (lq - lm);
        *c += exp(lp + lq - lm);
        break;
    case KD_DIV_SRKL:
        lm = lse2(a->lwt + lq, a->lws + lp);
        *loss += p * (lp - lm);
        *c += p * (lp - lm - a->prm * exp(lp - lm));
        break;
    }
}

/* dL/dA_b of one bucket (A the bucket logits, p~ = softmax(A)), from the
 * row's loss L, constant c and teacher mass Q */
static inline double bucket_grad(const div_args *a, double lp, double lq, double L, double c, double Q) {
    double p = exp(lp), lm;
    switch (a->kind) {
    case KD_DIV_FKL: /* g_b = -q_b / p_b, sum p~ g = -Q */
        return p * Q - exp(lq);
    case KD_DIV_RKL:
        return p * (lp - lq - L);
    case KD_DIV_JSD:
        lm = lse2(a->lwt + lq, a->lws + lp);
        return (1.0 - a->prm) * p * (lp - lm - c);
    case KD_DIV_TVD:
        return p * (0.5 * sgn(p - exp(lq)) - c);
    case KD_DIV_SKL:
        lm = lse2(a->lwt + lq, a->lws + lp);
        return (1.0 - a->prm) * (p * c - exp(lp + lq - lm));
    default: /* KD_DIV_SRKL */
        lm = lse2(a->lwt + lq, a->lws + lp);
        return p * (lp - lm - a->prm * exp(lp - lm) - c);
    }
}

/* One kept row with its ids marked: fills w[W_LSE .. W_C]. zs (V), ids and
 * lq (k) the teacher's ids and log-probabilities. */
static void topk_row(double *w, const unsigned char *mark, const float *zs, const float *ids, const float *lq, int V,
                     int k, double invT, const div_args *a) {
    int tail = k < V;
    double lt = tail ? tail_lse(zs, mark, V, invT) : -INFINITY;
    double lse = lse2(s_lse(zs, ids, k, invT), lt);
    double qs = 0.0;
    for (int i = 0; i < k; i++) qs += exp((double)lq[i]);
    double lqt = -INFINITY, Q = qs;
    if (tail) {
        lqt = qs < 1.0 ? log1p(-qs) : -INFINITY;
        if (needs_floor(a->kind, a->prm) && lqt < log(TAIL_FLOOR)) lqt = log(TAIL_FLOOR);
        Q += exp(lqt);
    }
    double loss = 0.0, c = 0.0;
    for (int i = 0; i < k; i++) bucket_fwd(a, (double)zs[(int)ids[i]] * invT - lse, (double)lq[i], &loss, &c);
    if (tail) bucket_fwd(a, lt - lse, lqt, &loss, &c);
    if (a->kind == KD_DIV_RKL) c = loss;
    w[W_LSE] = lse;
    w[W_LTAIL] = lt;
    w[W_LQT] = lqt;
    w[W_Q] = Q;
    w[W_LOSS] = loss;
    w[W_C] = c;
}

static div_args args_of(const kd_node *n) {
    div_args a = {.kind = n->ip[0], .prm = n->fp[1]};
    mix_weights(a.kind, a.prm, &a.lwt, &a.lws);
    return a;
}

/* ---------------------------------------------------------------- op */

static void topk_forward(kd_node *n, const kd_ctx *ctx) {
    topk_geom q = geom_of(n);
    int R = q.R, V = q.V, k = q.k;
    const float *s = n->in[0]->val.data, *ids = n->in[1]->val.data, *lq = n->in[2]->val.data;
    const float *mask = n->n_in > 3 ? n->in[3]->val.data : NULL;
    double invT = 1.0 / n->fp[0];
    div_args a = args_of(n);
    double *ws = n->ws;
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)R * V > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        double *w = ws + (size_t)r * TOPK_WS;
        memset(w, 0, TOPK_WS * sizeof *w);
        if (mask && !(mask[r] > 0.0f)) continue;
        const float *ri = ids + (size_t)r * k;
        unsigned char *mark = thread_marks(n, R, V);
        int why = 0, bad = mark_ids(mark, ri, k, V, &why);
        if (bad) {
            w[W_BAD] = bad;
            w[W_BADVAL] = ri[bad - 1];
            w[W_WHY] = why;
            continue;
        }
        topk_row(w, mark, s + (size_t)r * V, ri, lq + (size_t)r * k, V, k, invT, &a);
        unmark_ids(mark, ri, k);
        w[W_KEPT] = 1.0;
    }
    double kept = 0.0, total = 0.0;
    for (int r = 0; r < R; r++) {
        const double *w = ws + (size_t)r * TOPK_WS;
        KD_ASSERT(w[W_BAD] == 0.0,
                  "'%s': row %d of top-k ids '%s' holds %g at position %d, %s (ids must be distinct integers in "
                  "[0, %d); the cache reader validates them before training)",
                  n->name, r, n->in[1]->name, w[W_BADVAL], (int)w[W_BAD] - 1,
                  w[W_WHY] == 2.0 ? "a repeated id" : "not a valid id", V);
        kept += w[W_KEPT];
        total += w[W_LOSS];
    }
    n->val.data[0] = kept > 0.0 ? (float)(n->fp[2] * total / kept) : 0.0f;
}

static void topk_backward(kd_node *n, const kd_ctx *ctx) {
    if (!(n->in[0]->flags & KD_F_NEED_GRAD)) return;
    topk_geom q = geom_of(n);
    int R = q.R, V = q.V, k = q.k;
    const double *ws = n->ws;
    double kept = 0.0;
    for (int r = 0; r < R; r++) kept += ws[(size_t)r * TOPK_WS + W_KEPT];
    if (kept == 0.0) return;
    const float *s = n->in[0]->val.data, *ids = n->in[1]->val.data, *lq = n->in[2]->val.data;
    float *ds = n->in[0]->grad.data;
    double invT = 1.0 / n->fp[0];
    double gs = (double)n->grad.data[0] * n->fp[2] * invT / kept;
    div_args a = args_of(n);
#pragma omp parallel for num_threads(ctx->threads) if ((int64_t)R * V > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const double *w = ws + (size_t)r * TOPK_WS;
        if (w[W_KEPT] == 0.0) continue;
        const float *zs = s + (size_t)r * V, *ri = ids + (size_t)r * k, *rq = lq + (size_t)r * k;
        float *dz = ds + (size_t)r * V;
        double lse = w[W_LSE], lt = w[W_LTAIL], L = w[W_LOSS], c = w[W_C], Q = w[W_Q];
        if (k < V) { /* the tail: dA_tail/dz_j = exp(a_j - A_tail) / T */
            unsigned char *mark = thread_marks(n, R, V);
            int why = 0;
            KD_ASSERT(mark_ids(mark, ri, k, V, &why) == 0, "'%s': top-k ids of row %d changed since forward", n->name,
                      r);
            double gt = gs * bucket_grad(&a, lt - lse, w[W_LQT], L, c, Q);
            for (int j = 0; j < V; j++)
                if (!mark[j]) dz[j] += (float)(gt * exp((double)zs[j] * invT - lt));
            unmark_ids(mark, ri, k);
        }
        for (int i = 0; i < k; i++) {
            int id = (int)ri[i];
            dz[id] += (float)(gs * bucket_grad(&a, (double)zs[id] * invT - lse, (double)rq[i], L, c, Q));
        }
    }
}

const kd_op_def kd_op_topk_divergence = {.name = "topk_divergence",
                                         .infer = topk_infer,
                                         .workspace = topk_ws,
                                         .forward = topk_forward,
                                         .backward = topk_backward};

/* ---------------------------------------------------------------- builder */

kd_node *kd_topk_divergence(kd_graph *g, kd_node *s, kd_node *t_ids, kd_node *t_logp, kd_node *mask, kd_div_kind kind,
                            float T, float param, float scale) {
    KD_ASSERT(kind >= KD_DIV_FKL && kind <= KD_DIV_SRKL, "divergence kind %d", (int)kind);
    KD_ASSERT(T > 0.0f, "temperature %g", (double)T);
    if (kind == KD_DIV_JSD) KD_ASSERT(param > 0.0f && param < 1.0f, "jsd beta %g outside (0, 1)", (double)param);
    if (kind == KD_DIV_SKL || kind == KD_DIV_SRKL)
        KD_ASSERT(param >= 0.0f && param < 1.0f, "skew alpha %g outside [0, 1)", (double)param);
    kd_node *in[4] = {s, t_ids, t_logp, mask};
    int ip[8] = {(int)kind};
    float fp[8] = {T, param, scale};
    return kd_graph_add_op_ex(g, KD_OP_TOPK_DIVERGENCE, mask ? 4 : 3, in, ip, fp);
}

/* ---------------------------------------------------------------- dense view of a cache
 * inputs t_ids, t_logp (..., k); ip[0] V -> (..., V): the k cached
 * log-probabilities at their ids and, everywhere else, the log of the
 * leftover mass spread evenly, log(max(1 - sum q, 1e-12) / (V - k)). A
 * constant (no gradient): it lets rank-based terms (rlkd) read a cached
 * teacher. Ids are validated by the cache reader. */

static kd_status dense_infer(kd_node *n) {
    const kd_tensor *a = &n->in[0]->val, *b = &n->in[1]->val;
    int same = a->ndim == b->ndim && a->ndim >= 1;
    for (int i = 0; same && i < a->ndim; i++) same = a->shape[i] == b->shape[i];
    if (!same) return kd_op_shape_error(n, "ids and log-probs must have the same shape");
    if (a->shape[a->ndim - 1] > n->ip[0]) return kd_op_shape_error(n, "more cached ids than vocabulary");
    n->val.ndim = a->ndim;
    memcpy(n->val.shape, a->shape, sizeof n->val.shape);
    n->val.shape[a->ndim - 1] = n->ip[0];
    return KD_OK;
}

static void dense_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int V = n->ip[0], k = n->in[0]->val.shape[n->in[0]->val.ndim - 1];
    int64_t R = kd_numel(&n->in[0]->val) / k;
    const float *ids = n->in[0]->val.data, *lp = n->in[1]->val.data;
    float *out = n->val.data;
#pragma omp parallel for if (R * V > 65536) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        double mass = 0.0;
        for (int j = 0; j < k; j++) mass += exp((double)lp[r * k + j]);
        double tail = 1.0 - mass;
        float fill = k < V ? (float)log((tail > 1e-12 ? tail : 1e-12) / (double)(V - k)) : 0.0f;
        float *o = out + r * V;
        for (int v = 0; v < V; v++) o[v] = fill;
        for (int j = 0; j < k; j++) {
            int id = (int)ids[r * k + j];
            KD_ASSERT(id >= 0 && id < V, "cached id %d outside [0, %d) in '%s'", id, V, n->name);
            o[id] = lp[r * k + j];
        }
    }
}

const kd_op_def kd_op_topk_dense = {.name = "topk_dense", .infer = dense_infer, .forward = dense_forward};

kd_node *kd_topk_dense(kd_graph *g, kd_node *t_ids, kd_node *t_logp, int V) {
    kd_node *in[2] = {t_ids, t_logp};
    int ip[8] = {V};
    return kd_graph_add_op_ex(g, KD_OP_TOPK_DENSE, 2, in, ip, NULL);
}
