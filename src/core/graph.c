/* graph.c - the compiled static computation graph.
 *
 * Builders append nodes, so the node array is already in topological order
 * (an input always exists before its consumer). kd_graph_compile then, once:
 *   1. marks which nodes need gradients (a trainable parameter upstream),
 *   2. infers every shape at the maximum batch size,
 *   3. carves trainable parameters and their gradients out of two flat arrays
 *      (zero-grad is one memset, the optimiser is one loop),
 *   4. plans activation and gradient memory with liveness intervals and a
 *      first-fit arena, so a frozen teacher's intermediate values and a
 *      gradient that backward has finished with share memory,
 *   5. sizes each op's workspace and initialises parameters from the seed.
 * The training step (forward + backward) allocates nothing.
 *
 * Timeline used for liveness: forward of node i happens at time i, backward
 * of node i at time 2n-1-i. A value lives from its forward to the last
 * forward that reads it, or, if a backward reads it (we conservatively say:
 * its own backward and that of every consumer that needs gradients), to the
 * last such backward. So late layers' activations are released early in
 * backward and earlier layers' gradients reuse them. A gradient lives from
 * the backward of its last consumer (which zeroes or assigns it) to its own
 * backward. Values of nodes flagged KD_F_KEEP, and of nodes nothing
 * consumes, live to the end of the step.
 *
 * Deliberately not done: graph rewriting (fusion, in-place ops), several
 * losses per backward call (sum them with kd_add instead).
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <time.h>

#include "kd.h"

struct kd_graph {
    kd_node **nodes;
    int n, cap;
    int frozen_mode;
    int compiled;
    kd_status build_status; /* first shape error met while building */
    char build_error[1024];
    int max_batch, batch;
    int threads;
    uint64_t seed, step;
    /* trainable parameters */
    float *pdata, *pgrad;
    size_t pcount;
    /* frozen parameters, buffers and inputs own this */
    float *cdata;
    size_t ccount;
    /* activations and non-parameter gradients */
    float *arena;
    size_t arena_floats;
    /* per-node: time at which backward zeroes this node's gradient */
    int *grad_first;
    char *backward_mark;
    kd_node **state;
    int n_state;
    void *scratch; /* shared workspace of ops whose workspace is scratch */
    double *prof; /* per node: forward seconds, backward seconds (when profiling) */
    int64_t prof_steps;
};

kd_graph *kd_graph_new(void) {
    kd_graph *g = kd_calloc(1, sizeof *g);
#ifdef _OPENMP
    g->threads = omp_get_max_threads();
#else
    g->threads = 1;
#endif
    return g;
}

void kd_graph_free(kd_graph *g) {
    if (!g) return;
    for (int i = 0; i < g->n; i++) {
        if (g->nodes[i]->ws != g->scratch) free(g->nodes[i]->ws);
        free(g->nodes[i]);
    }
    free(g->scratch);
    free(g->nodes);
    free(g->pdata);
    free(g->pgrad);
    free(g->cdata);
    free(g->arena);
    free(g->grad_first);
    free(g->backward_mark);
    free(g->state);
    free(g->prof);
    free(g);
}

static kd_node *new_node(kd_graph *g, int op) {
    KD_ASSERT(!g->compiled, "nodes cannot be added after kd_graph_compile");
    if (g->n == g->cap) {
        g->cap = g->cap ? 2 * g->cap : 64;
        g->nodes = kd_realloc(g->nodes, (size_t)g->cap * sizeof *g->nodes);
    }
    kd_node *n = kd_calloc(1, sizeof *n);
    n->op = op;
    n->id = g->n;
    if (g->frozen_mode) n->flags |= KD_F_FROZEN;
    g->nodes[g->n++] = n;
    return n;
}

void kd_node_set_name(kd_node *n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(n->name, sizeof n->name, fmt, ap);
    va_end(ap);
}

void kd_graph_set_frozen(kd_graph *g, int frozen) { g->frozen_mode = frozen; }

static kd_node *leaf(kd_graph *g, const char *name, int ndim, const int *shape, int flags) {
    KD_ASSERT(ndim >= 0 && ndim <= KD_MAX_DIM, "leaf '%s': ndim %d", name, ndim);
    kd_node *n = new_node(g, KD_OP_LEAF);
    n->flags |= flags;
    n->val.ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        KD_ASSERT(shape[i] > 0, "leaf '%s': dim %d is %d", name, i, shape[i]);
        n->val.shape[i] = shape[i];
    }
    kd_node_set_name(n, "%s", name);
    return n;
}

kd_node *kd_input(kd_graph *g, const char *name, int ndim, const int *shape) {
    kd_node *n = leaf(g, name, ndim, shape, KD_F_INPUT);
    n->batch_dim = 1;
    return n;
}

kd_node *kd_param(kd_graph *g, const char *name, int ndim, const int *shape, kd_init init, int fan_in) {
    kd_node *n = leaf(g, name, ndim, shape, KD_F_PARAM);
    n->init = init;
    n->fan_in = fan_in;
    n->init_scale = 1.0f;
    return n;
}

kd_node *kd_buffer(kd_graph *g, const char *name, int ndim, const int *shape, float fill) {
    kd_node *n = leaf(g, name, ndim, shape, KD_F_BUFFER);
    n->init_scale = fill;
    return n;
}

kd_node *kd_graph_add_op(kd_graph *g, int op, int n_in, kd_node **in) {
    return kd_graph_add_op_ex(g, op, n_in, in, NULL, NULL);
}

kd_node *kd_graph_add_op_ex(kd_graph *g, int op, int n_in, kd_node **in, const int *ip, const float *fp) {
    KD_ASSERT(op > KD_OP_LEAF && op < KD_OP_COUNT, "bad op %d", op);
    KD_ASSERT(n_in >= 0 && n_in <= KD_MAX_IN, "op %s: %d inputs", kd_ops[op]->name, n_in);
    kd_node *n = new_node(g, op);
    n->n_in = n_in;
    for (int i = 0; i < n_in; i++) {
        KD_ASSERT(in[i] != NULL, "op %s: input %d is NULL", kd_ops[op]->name, i);
        KD_ASSERT(in[i]->id < n->id && g->nodes[in[i]->id] == in[i], "op %s: input from another graph",
                  kd_ops[op]->name);
        n->in[i] = in[i];
        if (in[i]->batch_dim) n->batch_dim = 1;
    }
    if (ip) memcpy(n->ip, ip, sizeof n->ip);
    if (fp) memcpy(n->fp, fp, sizeof n->fp);
    kd_node_set_name(n, "%s_%d", kd_ops[op]->name, n->id);
    /* shapes are inferred eagerly so builders can size parameters; the
     * first failure is reported by kd_graph_compile */
    kd_status st = kd_ops[op]->infer(n);
    if (st != KD_OK) {
        if (g->build_status == KD_OK) {
            g->build_status = st;
            snprintf(g->build_error, sizeof g->build_error, "%s", kd_error_message());
        }
        n->val.ndim = 1;
        n->val.shape[0] = 1;
    }
    return n;
}

kd_node *kd_graph_find(const kd_graph *g, const char *name) {
    for (int i = g->n - 1; i >= 0; i--)
        if (strcmp(g->nodes[i]->name, name) == 0) return g->nodes[i];
    return NULL;
}

int kd_graph_n_nodes(const kd_graph *g) { return g->n; }
kd_node *kd_graph_node(const kd_graph *g, int i) { return g->nodes[i]; }
float *kd_graph_param_data(kd_graph *g) { return g->pdata; }
float *kd_graph_param_grad(kd_graph *g) { return g->pgrad; }
size_t kd_graph_param_count(const kd_graph *g) { return g->pcount; }
int kd_graph_n_state(const kd_graph *g) { return g->n_state; }
kd_node *kd_graph_state(const kd_graph *g, int i) { return g->state[i]; }
size_t kd_graph_arena_bytes(const kd_graph *g) { return g->arena_floats * sizeof(float); }
int kd_graph_batch(const kd_graph *g) { return g->batch; }
int kd_graph_max_batch(const kd_graph *g) { return g->max_batch; }
void kd_graph_set_threads(kd_graph *g, int n) {
    KD_ASSERT(!g->compiled, "set threads before compile (workspaces are sized per thread)");
    g->threads = n > 0 ? n : 1;
}
void kd_graph_set_step(kd_graph *g, uint64_t step) { g->step = step; }

static kd_status infer_all(kd_graph *g, int B) {
    for (int i = 0; i < g->n; i++) {
        kd_node *n = g->nodes[i];
        if (n->op == KD_OP_LEAF) {
            if (n->batch_dim) n->val.shape[0] = B;
        } else {
            float *data = n->val.data; /* infer rewrites the tensor header only */
            kd_status st = kd_ops[n->op]->infer(n);
            n->val.data = data;
            if (st != KD_OK) return st;
        }
        n->grad.ndim = n->val.ndim;
        memcpy(n->grad.shape, n->val.shape, sizeof n->grad.shape);
    }
    return KD_OK;
}

void kd_graph_set_batch(kd_graph *g, int B) {
    KD_ASSERT(g->compiled, "kd_graph_set_batch before compile");
    KD_ASSERT(B >= 1 && B <= g->max_batch, "batch %d outside [1, %d]", B, g->max_batch);
    if (B == g->batch) return;
    kd_status st = infer_all(g, B);
    KD_ASSERT(st == KD_OK, "shapes valid at the max batch must stay valid: %s", kd_error_message());
    g->batch = B;
}

/* ---- memory planning */

typedef struct interval {
    int node, is_grad;
    int t0, t1; /* inclusive */
    size_t size, off;
} interval;

static int by_size_desc(const void *a, const void *b) {
    const interval *x = a, *y = b;
    if (x->size != y->size) return x->size < y->size ? 1 : -1;
    return x->t0 - y->t0;
}

#define ALIGN_FLOATS 16 /* 64 bytes */

static size_t round_up(size_t n) { return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS; }

static size_t plan(interval *iv, int m) {
    qsort(iv, (size_t)m, sizeof *iv, by_size_desc);
    size_t total = 0;
    for (int i = 0; i < m; i++) {
        /* first fit among gaps left by already placed, time-overlapping blocks */
        size_t off = 0;
        int moved = 1;
        while (moved) {
            moved = 0;
            for (int j = 0; j < i; j++) {
                if (iv[j].t1 < iv[i].t0 || iv[i].t1 < iv[j].t0) continue;
                if (off < iv[j].off + iv[j].size && iv[j].off < off + iv[i].size) {
                    off = iv[j].off + iv[j].size;
                    moved = 1;
                }
            }
        }
        iv[i].off = off;
        if (off + iv[i].size > total) total = off + iv[i].size;
    }
    return total;
}

static void init_param(kd_node *n, uint64_t seed) {
    kd_rng r;
    kd_rng_seed(&r, seed ^ kd_hash64((uint64_t)n->id + 0x51ull));
    int64_t k = kd_numel(&n->val);
    float *p = n->val.data;
    switch (n->init) {
    case KD_INIT_ZERO: memset(p, 0, (size_t)k * sizeof *p); break;
    case KD_INIT_ONE:
        for (int64_t i = 0; i < k; i++) p[i] = 1.0f;
        break;
    case KD_INIT_UNIFORM_FANIN: {
        float b = 1.0f / sqrtf((float)(n->fan_in > 0 ? n->fan_in : 1));
        for (int64_t i = 0; i < k; i++) p[i] = (2.0f * kd_rng_uniform(&r) - 1.0f) * b;
        break;
    }
    case KD_INIT_NORMAL:
        for (int64_t i = 0; i < k; i++) p[i] = kd_rng_normal(&r) * n->init_scale;
        break;
    }
}

kd_status kd_graph_compile(kd_graph *g, int max_batch, uint64_t seed) {
    KD_ASSERT(!g->compiled, "graph compiled twice");
    KD_ASSERT(max_batch >= 1, "max_batch %d", max_batch);
    if (g->build_status != KD_OK) {
        /* re-infer to name nodes by their final names (set after building) */
        kd_status st = infer_all(g, max_batch);
        return st != KD_OK ? st : kd_errorf(g->build_status, "%s", g->build_error);
    }
    g->max_batch = max_batch;
    g->seed = seed;
    int n = g->n;

    /* 1. gradients needed where a trainable parameter is upstream */
    for (int i = 0; i < n; i++) {
        kd_node *v = g->nodes[i];
        v->n_consumers = 0;
        if (v->op == KD_OP_LEAF) {
            if ((v->flags & KD_F_PARAM) && !(v->flags & KD_F_FROZEN)) v->flags |= KD_F_NEED_GRAD;
            continue;
        }
        for (int j = 0; j < v->n_in; j++)
            if (v->in[j]->flags & KD_F_NEED_GRAD) v->flags |= KD_F_NEED_GRAD;
    }
    int *last_fwd = kd_malloc((size_t)n * sizeof *last_fwd);
    int *last_grad_consumer = kd_malloc((size_t)n * sizeof *last_grad_consumer);
    int *first_bwd_reader = kd_malloc((size_t)n * sizeof *first_bwd_reader);
    for (int i = 0; i < n; i++) last_fwd[i] = last_grad_consumer[i] = first_bwd_reader[i] = -1;
    for (int i = 0; i < n; i++) {
        kd_node *v = g->nodes[i];
        for (int j = 0; j < v->n_in; j++) {
            kd_node *u = v->in[j];
            u->n_consumers++;
            last_fwd[u->id] = i;
            if (v->flags & KD_F_NEED_GRAD) {
                if (first_bwd_reader[u->id] < 0) first_bwd_reader[u->id] = i;
                if (u->flags & KD_F_NEED_GRAD) last_grad_consumer[u->id] = i;
            }
        }
    }

    /* 2. shapes */
    kd_status st = infer_all(g, max_batch);
    if (st != KD_OK) {
        free(last_fwd);
        free(last_grad_consumer);
        free(first_bwd_reader);
        return st;
    }
    g->batch = max_batch;

    /* 3. leaves: trainable parameters in one flat array, everything else in another */
    size_t pc = 0, cc = 0;
    for (int i = 0; i < n; i++) {
        kd_node *v = g->nodes[i];
        if (v->op != KD_OP_LEAF) continue;
        size_t k = round_up((size_t)kd_numel(&v->val));
        if (v->flags & KD_F_NEED_GRAD)
            pc += k;
        else
            cc += k;
    }
    g->pdata = kd_calloc(pc, sizeof(float));
    g->pgrad = kd_calloc(pc, sizeof(float));
    g->cdata = kd_calloc(cc, sizeof(float));
    size_t po = 0, co = 0;
    g->state = kd_malloc((size_t)n * sizeof *g->state);
    for (int i = 0; i < n; i++) {
        kd_node *v = g->nodes[i];
        if (v->op != KD_OP_LEAF) continue;
        size_t k = round_up((size_t)kd_numel(&v->val));
        if (v->flags & KD_F_NEED_GRAD) {
            v->val.data = g->pdata + po;
            v->grad.data = g->pgrad + po;
            po += k;
        } else {
            v->val.data = g->cdata + co;
            co += k;
        }
        if (v->flags & (KD_F_PARAM | KD_F_BUFFER)) g->state[g->n_state++] = v;
    }
    /* the optimiser sees only real parameters: padding gradients stay 0 */
    g->pcount = pc;

    /* 4. activations and gradients by liveness */
    interval *iv = kd_malloc(2 * (size_t)n * sizeof *iv);
    int m = 0;
    int T = 2 * n;
    for (int i = 0; i < n; i++) {
        kd_node *v = g->nodes[i];
        if (v->op == KD_OP_LEAF) continue;
        size_t k = round_up((size_t)kd_numel(&v->val));
        /* backward runs in reverse, so the last backward to read this value
         * is its own (when it needs gradients) or else that of its
         * lowest-numbered consumer that needs gradients */
        int end = last_fwd[i];
        if (v->flags & KD_F_NEED_GRAD)
            end = 2 * n - 1 - i;
        else if (first_bwd_reader[i] >= 0)
            end = 2 * n - 1 - first_bwd_reader[i];
        if (v->n_consumers == 0 || (v->flags & KD_F_KEEP) || end < 0) end = T;
        iv[m++] = (interval){.node = i, .is_grad = 0, .t0 = i, .t1 = end, .size = k};
        if (v->flags & KD_F_NEED_GRAD) {
            int first = last_grad_consumer[i] >= 0 ? 2 * n - 1 - last_grad_consumer[i] : 2 * n - 1 - i;
            iv[m++] = (interval){.node = i, .is_grad = 1, .t0 = first, .t1 = 2 * n - 1 - i, .size = k};
        }
    }
    g->arena_floats = plan(iv, m);
    g->arena = kd_calloc(g->arena_floats ? g->arena_floats : 1, sizeof(float));
    for (int i = 0; i < m; i++) {
        kd_node *v = g->nodes[iv[i].node];
        if (iv[i].is_grad)
            v->grad.data = g->arena + iv[i].off;
        else
            v->val.data = g->arena + iv[i].off;
    }
    free(iv);
    g->grad_first = kd_malloc((size_t)n * sizeof *g->grad_first);
    for (int i = 0; i < n; i++) g->grad_first[i] = last_grad_consumer[i];
    g->backward_mark = kd_calloc((size_t)n, 1);
    free(last_fwd);
    free(last_grad_consumer);
    free(first_bwd_reader);

    /* 5. workspaces and parameter initialisation */
    size_t scratch = 0;
    for (int i = 0; i < n; i++) {
        kd_node *v = g->nodes[i];
        if (v->op != KD_OP_LEAF && kd_ops[v->op]->workspace && kd_ops[v->op]->ws_scratch) {
            v->ws_bytes = kd_ops[v->op]->workspace(v, g->threads);
            if (v->ws_bytes > scratch) scratch = v->ws_bytes;
        }
    }
    if (scratch) g->scratch = kd_calloc(1, scratch);
    for (int i = 0; i < n; i++) {
        kd_node *v = g->nodes[i];
        if (v->op != KD_OP_LEAF && kd_ops[v->op]->workspace) {
            if (kd_ops[v->op]->ws_scratch) {
                v->ws = v->ws_bytes ? g->scratch : NULL;
            } else {
                v->ws_bytes = kd_ops[v->op]->workspace(v, g->threads);
                if (v->ws_bytes) v->ws = kd_calloc(1, v->ws_bytes);
            }
        }
        if (v->flags & KD_F_PARAM) init_param(v, seed);
        if (v->flags & KD_F_BUFFER) {
            int64_t k = kd_numel(&v->val);
            for (int64_t j = 0; j < k; j++) v->val.data[j] = v->init_scale;
        }
    }
    g->compiled = 1;
    return KD_OK;
}

static double kd_wall(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

static void ctx_of(const kd_graph *g, kd_ctx *c, int training) {
    c->training = training;
    c->threads = g->threads;
    c->seed = g->seed;
    c->step = g->step;
}

/* Runs nodes 0..upto; with `check`, stops at the first node whose value
 * (leaves included) holds a NaN or Inf and returns it. */
static kd_node *run_forward(kd_graph *g, int training, kd_node *upto, int check) {
    KD_ASSERT(g->compiled, "forward before compile");
    kd_ctx c;
    ctx_of(g, &c, training);
    int last = upto ? upto->id : g->n - 1;
    for (int i = 0; i <= last; i++) {
        kd_node *v = g->nodes[i];
        if (v->op != KD_OP_LEAF) {
            c.training = training && !(v->flags & KD_F_FROZEN);
            double t0 = g->prof ? kd_wall() : 0.0;
            kd_ops[v->op]->forward(v, &c);
            if (g->prof) g->prof[2 * i] += kd_wall() - t0;
        }
        if (check && v->val.data) {
            int64_t k = kd_numel(&v->val);
            for (int64_t j = 0; j < k; j++)
                if (!isfinite(v->val.data[j])) return v;
        }
    }
    if (g->prof) g->prof_steps++;
    return NULL;
}

void kd_graph_forward_to(kd_graph *g, int training, kd_node *upto) { run_forward(g, training, upto, 0); }
void kd_graph_forward(kd_graph *g, int training) { run_forward(g, training, NULL, 0); }
kd_node *kd_graph_forward_check(kd_graph *g, int training, kd_node *upto) { return run_forward(g, training, upto, 1); }

/* memset on all threads: large gradients are megabytes */
static void zero(float *p, int64_t n) {
    const int64_t chunk = 1 << 16;
    int64_t nc = (n + chunk - 1) / chunk;
#pragma omp parallel for if (nc > 1) schedule(static)
    for (int64_t c = 0; c < nc; c++) {
        int64_t a = c * chunk, b = a + chunk < n ? a + chunk : n;
        memset(p + a, 0, (size_t)(b - a) * sizeof *p);
    }
}

void kd_graph_backward(kd_graph *g, kd_node *loss) {
    KD_ASSERT(g->compiled, "backward before compile");
    KD_ASSERT(loss->flags & KD_F_NEED_GRAD, "backward from '%s', which no trainable parameter reaches", loss->name);
    KD_ASSERT(kd_numel(&loss->val) == 1, "backward from '%s', which is not a scalar", loss->name);
    kd_ctx c;
    ctx_of(g, &c, 1);
    char *mark = g->backward_mark;
    memset(mark, 0, (size_t)g->n);
    mark[loss->id] = 1;
    for (int i = loss->id; i >= 0; i--)
        if (mark[i])
            for (int j = 0; j < g->nodes[i]->n_in; j++) mark[g->nodes[i]->in[j]->id] = 1;
    zero(g->pgrad, (int64_t)g->pcount);
    for (int i = g->n - 1; i >= 0; i--) {
        kd_node *v = g->nodes[i];
        if (v->op == KD_OP_LEAF) continue;
        /* gradients whose last consumer is this node come alive now: ops
         * that can assign are told so, the others get a zeroed buffer */
        int runs = mark[i] && (v->flags & KD_F_NEED_GRAD);
        for (int j = 0; j < v->n_in; j++) {
            kd_node *u = v->in[j];
            if (!(u->flags & KD_F_NEED_GRAD) || u->op == KD_OP_LEAF || g->grad_first[u->id] != i) continue;
            if (runs && kd_ops[v->op]->grad_overwrite)
                u->flags |= KD_F_GRAD_FRESH;
            else
                zero(u->grad.data, kd_numel(&u->grad));
        }
        if (v == loss) v->grad.data[0] = 1.0f;
        if (!runs) continue;
        c.training = !(v->flags & KD_F_FROZEN);
        double t0 = g->prof ? kd_wall() : 0.0;
        kd_ops[v->op]->backward(v, &c);
        if (g->prof) g->prof[2 * i + 1] += kd_wall() - t0;
        /* an input the op did not write (say, no rows kept) is zero */
        for (int j = 0; j < v->n_in; j++)
            if (v->in[j]->flags & KD_F_GRAD_FRESH) {
                v->in[j]->flags &= ~KD_F_GRAD_FRESH;
                zero(v->in[j]->grad.data, kd_numel(&v->in[j]->grad));
            }
    }
}

void kd_graph_set_profile(kd_graph *g, int on) {
    free(g->prof);
    g->prof = on ? kd_calloc(2 * (size_t)(g->n ? g->n : 1), sizeof(double)) : NULL;
    g->prof_steps = 0;
}

void kd_graph_profile_print(const kd_graph *g, FILE *f) {
    if (!g->prof || !g->prof_steps) return;
    double tf = 0, tb = 0;
    for (int i = 0; i < g->n; i++) {
        tf += g->prof[2 * i];
        tb += g->prof[2 * i + 1];
    }
    double tot = tf + tb > 0 ? tf + tb : 1;
    fprintf(f, "%-28s %-14s %10s %10s %6s\n", "node", "op", "fwd ms", "bwd ms", "%");
    for (int i = 0; i < g->n; i++) {
        double a = g->prof[2 * i], b = g->prof[2 * i + 1];
        if (a + b < 1e-3 * tot) continue;
        fprintf(f, "%-28s %-14s %10.3f %10.3f %5.1f%%\n", g->nodes[i]->name, kd_ops[g->nodes[i]->op]->name,
                1e3 * a / g->prof_steps, 1e3 * b / g->prof_steps, 100 * (a + b) / tot);
    }
    fprintf(f, "%-28s %-14s %10.3f %10.3f per forward\n", "total", "", 1e3 * tf / g->prof_steps, 1e3 * tb / g->prof_steps);
}
