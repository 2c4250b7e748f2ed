/* linalg.c - matmul: y = x w^T + b, with x of any rank (rows = numel/IN).
 *
 * The fast path is one cblas_sgemm per direction; OpenBLAS (OpenMP build)
 * threads it over the same pool as our own loops. The naive kernel stays
 * beside it for tests. Shapes: x (..., IN), w (OUT, IN), b (OUT) -> (..., OUT).
 */
#include <cblas.h>
#include <string.h>

#include "ops/ops.h"

kd_status kd_op_shape_error(const kd_node *n, const char *what) {
    char buf[512];
    size_t k = 0;
    k += (size_t)snprintf(buf + k, sizeof buf - k, "%s", "");
    for (int i = 0; i < n->n_in && k < sizeof buf; i++) {
        char s[64];
        k += (size_t)snprintf(buf + k, sizeof buf - k, "%s'%s' %s", i ? ", " : "", n->in[i]->name,
                              kd_shape_str(n->in[i]->val.ndim, n->in[i]->val.shape, s, sizeof s));
    }
    return kd_errorf(KD_ESHAPE, "node '%s' (%s): %s; inputs: %s", n->name, kd_ops[n->op]->name, what, buf);
}

/* out (R,OUT), x (R,IN), w (OUT,IN), b (OUT) or NULL */
void kd_matmul_forward_naive(float *out, const float *x, const float *w, const float *b, int R, int IN, int OUT) {
    for (int r = 0; r < R; r++)
        for (int o = 0; o < OUT; o++) {
            double acc = b ? b[o] : 0.0;
            for (int i = 0; i < IN; i++) acc += (double)x[(size_t)r * IN + i] * w[(size_t)o * IN + i];
            out[(size_t)r * OUT + o] = (float)acc;
        }
}

static kd_status matmul_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val, *w = &n->in[1]->val;
    if (w->ndim != 2 || x->ndim < 1 || x->shape[x->ndim - 1] != w->shape[1])
        return kd_op_shape_error(n, "expected x (..., IN) and weight (OUT, IN)");
    if (n->n_in > 2 && (n->in[2]->val.ndim != 1 || n->in[2]->val.shape[0] != w->shape[0]))
        return kd_op_shape_error(n, "bias must be (OUT)");
    n->val.ndim = x->ndim;
    memcpy(n->val.shape, x->shape, sizeof n->val.shape);
    n->val.shape[x->ndim - 1] = w->shape[0];
    return KD_OK;
}

static void matmul_forward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    const kd_tensor *x = &n->in[0]->val, *w = &n->in[1]->val;
    int IN = w->shape[1], OUT = w->shape[0];
    int R = (int)(kd_numel(x) / IN);
    float *y = n->val.data;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, OUT, IN, 1.0f, x->data, IN, w->data, IN, 0.0f, y, OUT);
    if (n->n_in > 2) {
        const float *b = n->in[2]->val.data;
        for (int r = 0; r < R; r++)
            for (int o = 0; o < OUT; o++) y[(size_t)r * OUT + o] += b[o];
    }
}

static void matmul_backward(kd_node *n, const kd_ctx *ctx) {
    (void)ctx;
    kd_node *X = n->in[0], *Wn = n->in[1];
    int IN = Wn->val.shape[1], OUT = Wn->val.shape[0];
    int R = (int)(kd_numel(&X->val) / IN);
    const float *dy = n->grad.data;
    if (X->flags & KD_F_NEED_GRAD) /* dx (R,IN) += dy (R,OUT) w (OUT,IN) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, IN, OUT, 1.0f, dy, OUT, Wn->val.data, IN, 1.0f,
                    X->grad.data, IN);
    if (Wn->flags & KD_F_NEED_GRAD) /* dw (OUT,IN) += dy^T x */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OUT, IN, R, 1.0f, dy, OUT, X->val.data, IN, 1.0f,
                    Wn->grad.data, IN);
    if (n->n_in > 2 && (n->in[2]->flags & KD_F_NEED_GRAD)) {
        float *db = n->in[2]->grad.data;
        for (int r = 0; r < R; r++)
            for (int o = 0; o < OUT; o++) db[o] += dy[(size_t)r * OUT + o];
    }
}

const kd_op_def kd_op_matmul = {
    .name = "matmul", .infer = matmul_infer, .forward = matmul_forward, .backward = matmul_backward};

kd_node *kd_matmul(kd_graph *g, kd_node *x, kd_node *w, kd_node *b) {
    kd_node *in[3] = {x, w, b};
    return kd_graph_add_op(g, KD_OP_MATMUL, b ? 3 : 2, in);
}

kd_node *kd_dense(kd_graph *g, const char *prefix, kd_node *x, int out) {
    int IN = x->val.shape[x->val.ndim - 1];
    char name[96];
    int ws[2] = {out, IN}, bs[1] = {out};
    snprintf(name, sizeof name, "%s.weight", prefix);
    kd_node *w = kd_param(g, name, 2, ws, KD_INIT_UNIFORM_FANIN, IN);
    snprintf(name, sizeof name, "%s.bias", prefix);
    kd_node *b = kd_param(g, name, 1, bs, KD_INIT_UNIFORM_FANIN, IN);
    kd_node *y = kd_matmul(g, x, w, b);
    kd_node_set_name(y, "%s", prefix);
    return y;
}
