/* gradcheck.h - finite-difference gradient checks for graph ops and losses.
 *
 * The scalar objective is a fixed random rank-1 projection of an output node
 * y of shape (B, ...):  obj = sum_{b,m} u[b] v[m] y.flatten(1)[b,m].  It is
 * built inside the graph from existing ops (flatten and two matmuls), so the
 * analytic gradient comes from the real kd_graph_backward; the numeric side
 * evaluates the same sum in double from y's values after each forward.
 * Row weights u differ, so batch-coupled ops (batch norm) see a
 * non-degenerate objective.
 *
 * Use:
 *     kd_gc p = kd_gradcheck_project(g, y);   // before kd_graph_compile
 *     kd_graph_compile(g, B, seed);
 *     ... fill the leaves ...
 *     kd_gradcheck_randomize(&p, 7);          // or set u, v yourself
 *     double err = kd_gradcheck(g, &p, wrt, n, 1e-2, 1);
 *     CHECK_MSG(err < 1e-2, "err %g", err);
 *
 * Leaves to differentiate must be trainable parameters (kd_param): inputs
 * (KD_F_INPUT) get no gradients. The graph must stay at the batch it had
 * when kd_gradcheck_randomize was called (u has one weight per row).
 */
#ifndef KD_GRADCHECK_H
#define KD_GRADCHECK_H
#include "kd.h"

typedef struct kd_gc {
    kd_node *out;  /* the checked node, (B, ...) */
    kd_node *flat; /* out as (B, M) */
    kd_node *u;    /* (1, B) row weights (a buffer) */
    kd_node *v;    /* (1, M) column weights (a buffer) */
    kd_node *obj;  /* (1, 1) the objective, backward starts here */
    int B, M;
} kd_gc;

/* Appends the projection of `out` to g (before compile). */
kd_gc kd_gradcheck_project(kd_graph *g, kd_node *out);
/* After compile: u, v ~ N(0, 1) from seed. */
void kd_gradcheck_randomize(const kd_gc *p, uint64_t seed);
/* The objective in double from out's current value (no forward). */
double kd_gradcheck_objective(const kd_gc *p);

/* Runs forward (training or eval mode) and backward from p->obj, then
 * central differences with step eps on every element of every wrt leaf.
 * Returns the worst over wrt of ||g_a - g_n|| / max(||g_a||, ||g_n||), or
 * INFINITY when some wrt is not a trainable leaf or its analytic gradient is
 * all zero. Prints a line per wrt when the error exceeds report_tol (pass
 * INFINITY for silence). Restores every perturbed value and ends with a
 * forward + backward at the unperturbed point; note that each training-mode
 * forward moves batch-norm running statistics (gradients do not depend on
 * them in training mode). */
double kd_gradcheck_ex(kd_graph *g, const kd_gc *p, kd_node **wrt, int n_wrt, double eps, int training,
                       double report_tol);
static inline double kd_gradcheck(kd_graph *g, const kd_gc *p, kd_node **wrt, int n_wrt, double eps, int training) {
    return kd_gradcheck_ex(g, p, wrt, n_wrt, eps, training, 1e-2);
}

/* Shared helpers of the op and loss tests. */
/* Compiles g with the given seed; a failure is counted as a failed check. */
int kd_gc_compile(kd_graph *g, int max_batch, uint64_t seed);
/* a trainable parameter initialised to zero (tests fill it themselves) */
static inline kd_node *kd_gc_param(kd_graph *g, const char *name, int ndim, const int *shape) {
    return kd_param(g, name, ndim, shape, KD_INIT_ZERO, 1);
}
/* one forward and backward from loss */
static inline void kd_gc_step(kd_graph *g, kd_node *loss, int training) {
    kd_graph_forward(g, training);
    kd_graph_backward(g, loss);
}
/* n's values ~ shift + scale * N(0, 1) */
void kd_gc_fill(kd_rng *r, kd_node *n, float scale, float shift);
/* |x| >= margin everywhere: keeps kinks at 0 (ReLU, |f|^p) out of reach of the step */
void kd_gc_fill_away(kd_rng *r, kd_node *n, float scale, float margin);

#endif
