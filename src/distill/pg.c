/* pg.c - the two ops of LLMR's policy gradient (include/kd_llmr.h,
 * docs/losses/llmr.md): the advantages of the student's sampled tokens under
 * the reward induced from the teacher's logits, and the REINFORCE surrogate
 * loss, a weighted negative log-likelihood.
 *
 * pg_advantage: q (B,T,V), actions (B,T) -> A (B,T); a constant (no
 * backward): rewards r_t = q_t[a_t] - lse(q_{t+1}) (lse(q_t) at t = T-1),
 * discounted returns along each sequence, minus a leave-one-out batch mean.
 * The log-sum-exps run in double with the row maximum subtracted.
 *
 * pg_nll: logits z (R,V), actions a (R), weights w (R) -> (1):
 *   L = -(1/N) sum_{r: a_r >= 0} w_r (z_r[a_r] - lse(z_r))
 *   dL/dz_r = (g w_r / N) (softmax(z_r) - onehot(a_r))
 * Only lse per row is kept between forward and backward (R + 1 floats of
 * workspace); softmax is recomputed from the logits, so no (R, V) buffer.
 * Rows run in OpenMP over r; the loss is summed serially in double, so it
 * does not depend on the thread count.
 *
 * Not here: sampling, the training loop (src/train/llmr.c), any clipping or
 * normalisation of the advantages (LLMR uses plain REINFORCE with a baseline).
 */
#include <math.h>
#include <string.h>

#include "kd_llmr.h"
#include "ops/ops.h"

/* log-sum-exp of z (V), in double */
static double lse_row(const float *z, int V) { return kd_row_lse(z, V, 1.0); }

static int action_at(const float *act, int i, int V) {
    int a = (int)act[i];
    KD_ASSERT(a < V && (float)a == act[i], "action %g is not a token id in [0, %d)", (double)act[i], V);
    return a;
}

/* ---------------------------------------------------------------- kernels */

/* r (B,T), q (B,T,V), act (B,T) */
void kd_pg_rewards(float *r, const float *q, const float *act, int B, int T, int V) {
#pragma omp parallel for if ((int64_t)B * T * V > 65536) schedule(static)
    for (int i = 0; i < B * T; i++) {
        int t = i % T;
        if (act[i] < 0.0f) {
            r[i] = 0.0f;
            continue;
        }
        int a = action_at(act, i, V);
        const float *qt = q + (size_t)i * V;
        const float *qn = t + 1 < T ? qt + V : qt; /* no next state in the window: V(s_t) */
        r[i] = (float)((double)qt[a] - lse_row(qn, V));
    }
}

/* G (B,T), r (B,T), act (B,T) */
void kd_pg_returns(float *G, const float *r, const float *act, int B, int T, float gamma) {
    for (int b = 0; b < B; b++) {
        double next = 0.0;
        for (int t = T - 1; t >= 0; t--) {
            size_t i = (size_t)b * T + t;
            if (act[i] < 0.0f) {
                G[i] = 0.0f;
                next = 0.0;
                continue;
            }
            next = r[i] + gamma * next;
            G[i] = (float)next;
        }
    }
}

/* A (B,T), G (B,T), act (B,T) */
void kd_pg_advantages(float *A, const float *G, const float *act, int B, int T, kd_pg_baseline baseline) {
    for (int t = 0; t < T; t++) {
        double sum = 0.0;
        int n = 0;
        for (int b = 0; b < B; b++)
            if (act[(size_t)b * T + t] >= 0.0f) sum += G[(size_t)b * T + t], n++;
        for (int b = 0; b < B; b++) {
            size_t i = (size_t)b * T + t;
            if (act[i] < 0.0f) {
                A[i] = 0.0f;
                continue;
            }
            double base = baseline == KD_PG_BASELINE_BATCH && n > 1 ? (sum - G[i]) / (n - 1) : 0.0;
            A[i] = (float)(G[i] - base);
        }
    }
}

/* ---------------------------------------------------------------- pg_advantage */

/* ip[0] baseline; fp[0] gamma. ws: rewards (B,T) then returns (B,T). */

static kd_status adv_infer(kd_node *n) {
    const kd_tensor *q = &n->in[0]->val, *a = &n->in[1]->val;
    if (q->ndim != 3 || a->ndim != 2 || a->shape[0] != q->shape[0] || a->shape[1] != q->shape[1])
        return kd_op_shape_error(n, "the LLMR advantage needs teacher logits (B,T,V) and actions (B,T)");
    n->val.ndim = 2;
    n->val.shape[0] = q->shape[0];
    n->val.shape[1] = q->shape[1];
    return KD_OK;
}

static size_t adv_ws(const kd_node *n, int threads) {
    (void)threads;
    return 2 * (size_t)kd_numel(&n->in[1]->val) * sizeof(float);
}

static void adv_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *q = &n->in[0]->val;
    int B = q->shape[0], T = q->shape[1], V = q->shape[2];
    float *r = n->ws, *G = r + (size_t)B * T;
    const float *act = n->in[1]->val.data;
    kd_pg_rewards(r, q->data, act, B, T, V);
    kd_pg_returns(G, r, act, B, T, n->fp[0]);
    kd_pg_advantages(n->val.data, G, act, B, T, (kd_pg_baseline)n->ip[0]);
}

const kd_op_def kd_op_pg_advantage = {
    .name = "pg_advantage", .infer = adv_infer, .workspace = adv_ws, .forward = adv_forward};
/* (the workspace keeps the rewards and returns of the last forward: src/train/llmr.c logs them) */

/* ---------------------------------------------------------------- pg_nll */

/* ws: lse (R), then kept (1) */

static void nll_geom(const kd_node *n, int *R, int *V) {
    const kd_tensor *z = &n->in[0]->val;
    *V = z->shape[z->ndim - 1];
    *R = (int)(kd_numel(z) / *V);
}

static kd_status nll_infer(kd_node *n) {
    const kd_tensor *z = &n->in[0]->val;
    if (z->ndim < 2) return kd_op_shape_error(n, "the policy-gradient loss needs logits (R,V) or (B,T,V)");
    int64_t R = kd_numel(z) / z->shape[z->ndim - 1];
    if (kd_numel(&n->in[1]->val) != R || kd_numel(&n->in[2]->val) != R)
        return kd_op_shape_error(n, "the policy-gradient loss needs one action and one weight per logit row");
    n->val.ndim = 1;
    n->val.shape[0] = 1;
    return KD_OK;
}

static size_t nll_ws(const kd_node *n, int threads) {
    (void)threads;
    int R, V;
    nll_geom(n, &R, &V);
    return ((size_t)R + 1) * sizeof(float);
}

static void nll_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    int R, V;
    nll_geom(n, &R, &V);
    const float *z = n->in[0]->val.data, *act = n->in[1]->val.data, *w = n->in[2]->val.data;
    float *lse = n->ws;
#pragma omp parallel for if ((int64_t)R * V > 65536) schedule(static)
    for (int r = 0; r < R; r++) lse[r] = act[r] >= 0.0f ? (float)lse_row(z + (size_t)r * V, V) : 0.0f;
    double total = 0.0;
    int kept = 0;
    for (int r = 0; r < R; r++) {
        if (act[r] < 0.0f) continue;
        int a = action_at(act, r, V);
        total -= (double)w[r] * ((double)z[(size_t)r * V + a] - lse[r]);
        kept++;
    }
    lse[R] = (float)kept;
    n->val.data[0] = kept ? (float)(total / kept) : 0.0f;
}

static void nll_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *zn = n->in[0];
    if (!zn->grad.data) return;
    int R, V;
    nll_geom(n, &R, &V);
    const float *lse = n->ws, *z = zn->val.data, *act = n->in[1]->val.data, *w = n->in[2]->val.data;
    int kept = (int)lse[R];
    if (!kept) return;
    float g = n->grad.data[0] / (float)kept, *dz = zn->grad.data;
#pragma omp parallel for if ((int64_t)R * V > 65536) schedule(static)
    for (int r = 0; r < R; r++) {
        if (act[r] < 0.0f) continue;
        int a = (int)act[r];
        float c = g * w[r], l = lse[r];
        const float *zr = z + (size_t)r * V;
        float *dr = dz + (size_t)r * V;
        for (int v = 0; v < V; v++) dr[v] += c * expf(zr[v] - l);
        dr[a] -= c;
    }
}

const kd_op_def kd_op_pg_nll = {
    .name = "pg_nll", .infer = nll_infer, .workspace = nll_ws, .forward = nll_forward, .backward = nll_backward};

/* ---------------------------------------------------------------- builders */

kd_node *kd_pg_advantage(kd_graph *g, kd_node *q, kd_node *actions, float gamma, kd_pg_baseline baseline) {
    KD_ASSERT(gamma >= 0.0f && gamma <= 1.0f, "LLMR discount gamma=%g outside [0, 1]", (double)gamma);
    KD_ASSERT(baseline == KD_PG_BASELINE_NONE || baseline == KD_PG_BASELINE_BATCH, "baseline %d", (int)baseline);
    kd_node *in[2] = {q, actions};
    int ip[8] = {(int)baseline};
    float fp[8] = {gamma};
    return kd_graph_add_op_ex(g, KD_OP_PG_ADVANTAGE, 2, in, ip, fp);
}

kd_node *kd_pg_nll(kd_graph *g, kd_node *logits, kd_node *actions, kd_node *weights) {
    kd_node *in[3] = {logits, actions, weights};
    return kd_graph_add_op_ex(g, KD_OP_PG_NLL, 3, in, NULL, NULL);
}
