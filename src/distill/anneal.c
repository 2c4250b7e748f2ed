/* anneal.c - teacher annealing (BAM, Clark et al. 2019; used for
 * multi-task distillation by Matei et al. 2024): a cross-entropy against a
 * target that moves from the teacher's soft labels to the gold labels over
 * training. The op, its loss table row `anneal(T, from, to, epochs)` and the
 * progress setter the multi-task trainer calls every step.
 *
 * Per row r of student logits s (R,K), teacher logits t (R,K), label y:
 *   q_k   = lambda softmax(t/T)_k + (1 - lambda) [k = y]
 *   L_r   = -sum_k q_k log softmax(s)_k = lse(s) - sum_k q_k s_k  (sum q = 1)
 *   L     = mean_r L_r
 *   dL/ds_k = (softmax(s)_k - q_k) / R
 * The student is at temperature 1 (as BAM); T only softens the teacher. A
 * row with a negative label (unlabelled) has no gold part: its target is the
 * teacher's alone (lambda = 1 for that row). The teacher is detached.
 * lambda = fp[1] changes between steps without rebuilding the graph.
 *
 * Not here: the schedule's caller (src/train/multitask.c), the multi-task
 * graph. Derivation and defaults: docs/losses/multitask.md.
 */
#include <math.h>
#include <string.h>

#include "distill/build.h"
#include "kd_multitask.h"
#include "ops/ops.h"

/* ================================================================ op
 * inputs s, t (R,K), labels (R); fp[0] T, fp[1] lambda.
 * ws per row: lse of s (T=1), lse of t/T, the row's loss. */

enum { ANN_WS = 3 };


static kd_status ann_infer(kd_node *n) {
    const kd_tensor *s = &n->in[0]->val, *t = &n->in[1]->val;
    int same = s->ndim == t->ndim && s->ndim >= 1;
    for (int i = 0; same && i < s->ndim; i++) same = s->shape[i] == t->shape[i];
    if (!same) return kd_op_shape_error(n, "student and teacher logits must have the same shape");
    if (s->shape[s->ndim - 1] < 2) return kd_op_shape_error(n, "too few classes");
    int R, K;
    kd_rows_k(s, &R, &K);
    if (kd_numel(&n->in[2]->val) != R) return kd_op_shape_error(n, "labels need one value per row of logits");
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static size_t ann_ws(const kd_node *n, int threads) {
    (void)threads;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    return (size_t)R * ANN_WS * sizeof(double);
}

/* the row's label, -1 for unlabelled, checked */
static inline int ann_label(const kd_node *n, const float *lab, int r, int K) {
    if (lab[r] < 0.0f) return -1;
    int y = (int)lab[r];
    KD_ASSERT(y < K && (float)y == lab[r], "label %g of row %d out of range for %d classes in '%s'", (double)lab[r],
              r, K, n->name);
    return y;
}

static void ann_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data, *lab = n->in[2]->val.data;
    double invT = 1.0 / n->fp[0], lam = n->fp[1];
    double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        double *w = ws + (size_t)r * ANN_WS;
        int y = ann_label(n, lab, r, K);
        double l = y < 0 ? 1.0 : lam;
        double ls = kd_row_lse(zs, K, 1.0), lt = kd_row_lse(zt, K, invT), qs = 0.0;
        for (int k = 0; k < K; k++) qs += exp((double)zt[k] * invT - lt) * zs[k];
        w[0] = ls;
        w[1] = lt;
        w[2] = ls - l * qs - (y >= 0 ? (1.0 - l) * zs[y] : 0.0);
    }
    double sum = 0.0;
    for (int r = 0; r < R; r++) sum += ws[(size_t)r * ANN_WS + 2];
    n->val.data[0] = R ? (float)(sum / R) : 0.0f;
}

static void ann_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    if (!(n->in[0]->flags & KD_F_NEED_GRAD)) return;
    int R, K;
    kd_rows_k(&n->in[0]->val, &R, &K);
    if (!R) return;
    const float *s = n->in[0]->val.data, *t = n->in[1]->val.data, *lab = n->in[2]->val.data;
    float *ds = n->in[0]->grad.data;
    double invT = 1.0 / n->fp[0], lam = n->fp[1], gs = (double)n->grad.data[0] / R;
    const double *ws = n->ws;
#pragma omp parallel for if ((int64_t)R * K > 32768) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *zs = s + (size_t)r * K, *zt = t + (size_t)r * K;
        const double *w = ws + (size_t)r * ANN_WS;
        float *dz = ds + (size_t)r * K;
        int y = ann_label(n, lab, r, K);
        double l = y < 0 ? 1.0 : lam;
        for (int k = 0; k < K; k++) {
            double q = l * exp((double)zt[k] * invT - w[1]) + (k == y ? 1.0 - l : 0.0);
            dz[k] += (float)(gs * (exp((double)zs[k] - w[0]) - q));
        }
    }
}

const kd_op_def kd_op_anneal_ce = {
    .name = "anneal_ce", .infer = ann_infer, .workspace = ann_ws, .forward = ann_forward, .backward = ann_backward};

kd_node *kd_anneal_ce(kd_graph *g, kd_node *s, kd_node *t, kd_node *labels, float T, float lambda) {
    KD_ASSERT(T > 0.0f, "temperature %g", (double)T);
    KD_ASSERT(lambda >= 0.0f && lambda <= 1.0f, "lambda %g outside [0, 1]", (double)lambda);
    kd_node *in[3] = {s, t, labels};
    float fp[8] = {T, lambda};
    return kd_graph_add_op_ex(g, KD_OP_ANNEAL_CE, 3, in, NULL, fp);
}

/* ================================================================ loss row
 * sched_arg: from, to, epochs (0: only kd_anneal_set_progress moves lambda).
 * Per epoch (epoch 1-based): lambda = from + (to - from) min((epoch-1)/epochs, 1). */

static void anneal_sched(kd_built_term *t, double epoch) {
    double from = t->sched_arg[0], to = t->sched_arg[1], E = t->sched_arg[2];
    if (E <= 0.0) return; /* the multi-task trainer sets it per step */
    double f = (epoch - 1.0) / E;
    f = f < 0.0 ? 0.0 : f > 1.0 ? 1.0 : f;
    t->sched_node->fp[1] = (float)(from + (to - from) * f);
}

static kd_status b_anneal(kd_lctx *c, kd_node **out) {
    const kd_loss_def *d = kd_loss_def_find("anneal");
    KD_ASSERT(d, "loss anneal missing from the tables");
    float T, from, to, E;
    kd_status st = kd_lneed_teacher(c);
    if (st == KD_OK) st = kd_lneed_labels(c);
    if (st == KD_OK) st = kd_larg_float(c, d, "T", 1e-3, 1e3, &T);
    if (st == KD_OK) st = kd_larg_float(c, d, "from", 0, 1, &from);
    if (st == KD_OK) st = kd_larg_float(c, d, "to", 0, 1, &to);
    if (st == KD_OK) st = kd_larg_float(c, d, "epochs", 0, 1e6, &E);
    if (st != KD_OK) return st;
    kd_node *n = kd_anneal_ce(c->g, c->in->s_logits, c->in->t_logits, c->in->labels, T, from);
    c->sched = anneal_sched;
    c->sched_node = n;
    c->sched_arg[0] = from;
    c->sched_arg[1] = to;
    c->sched_arg[2] = E;
    *out = n;
    return KD_OK;
}

const kd_loss_def kd_loss_defs_anneal[] = {
    {"anneal", "T=1 from=1 to=0 epochs=0",
     "CE to lambda softmax(t/T) + (1-lambda) onehot(y), lambda from->to over training (BAM teacher annealing)",
     b_anneal, 1},
    {NULL, NULL, NULL, NULL, 0},
};

void kd_anneal_set_progress(kd_built_loss *l, double progress) {
    double f = progress < 0.0 ? 0.0 : progress > 1.0 ? 1.0 : progress;
    for (int i = 0; i < l->n; i++) {
        kd_built_term *t = &l->terms[i];
        if (t->sched != anneal_sched || t->sched_arg[2] > 0.0f) continue;
        t->sched_node->fp[1] = (float)(t->sched_arg[0] + (t->sched_arg[1] - t->sched_arg[0]) * f);
    }
}
