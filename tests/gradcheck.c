/* gradcheck.c - finite-difference gradient checker (see gradcheck.h).
 *
 * Central differences, (f(x+eps) - f(x-eps)) / 2eps, with f accumulated in
 * double from the float32 output. The truncation error is O(eps^2 f''') and
 * the rounding error about 1e-7 * sum|u_b v_m y_bm| / eps, so eps is chosen
 * per op (about 1e-2 of the input scale) and errors are judged by one
 * aggregate relative norm per leaf rather than element by element.
 * Deliberately not done: perturbing non-leaf nodes (a forward would
 * overwrite them) or inputs without gradients.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "test.h"

kd_gc kd_gradcheck_project(kd_graph *g, kd_node *out) {
    kd_gc p = {.out = out};
    p.B = out->val.shape[0];
    p.M = (int)(kd_numel(&out->val) / p.B);
    p.flat = kd_flatten(g, out);
    int us[2] = {1, p.B}, vs[2] = {1, p.M};
    p.u = kd_buffer(g, "gradcheck.u", 2, us, 0.0f);
    p.v = kd_buffer(g, "gradcheck.v", 2, vs, 0.0f);
    /* a (1, B) = v (1, M) flat^T ; obj (1, 1) = a u^T */
    kd_node *a = kd_matmul(g, p.v, p.flat, NULL);
    p.obj = kd_matmul(g, a, p.u, NULL);
    kd_node_set_name(p.obj, "gradcheck.objective");
    return p;
}

void kd_gradcheck_randomize(const kd_gc *p, uint64_t seed) {
    kd_rng r;
    kd_rng_seed(&r, seed);
    for (int i = 0; i < p->B; i++) p->u->val.data[i] = kd_rng_normal(&r);
    for (int i = 0; i < p->M; i++) p->v->val.data[i] = kd_rng_normal(&r);
}

double kd_gradcheck_objective(const kd_gc *p) {
    KD_ASSERT(p->out->val.shape[0] == p->B, "gradcheck: batch changed from %d to %d", p->B, p->out->val.shape[0]);
    const float *y = p->out->val.data, *u = p->u->val.data, *v = p->v->val.data;
    double s = 0.0;
    for (int b = 0; b < p->B; b++) {
        double row = 0.0;
        for (int m = 0; m < p->M; m++) row += (double)v[m] * y[(size_t)b * p->M + m];
        s += (double)u[b] * row;
    }
    return s;
}

static double objective_at(kd_graph *g, const kd_gc *p, int training) {
    kd_graph_forward(g, training);
    return kd_gradcheck_objective(p);
}

double kd_gradcheck_ex(kd_graph *g, const kd_gc *p, kd_node **wrt, int n_wrt, double eps, int training,
                       double report_tol) {
    for (int k = 0; k < n_wrt; k++)
        if (wrt[k]->op != KD_OP_LEAF || !(wrt[k]->flags & KD_F_NEED_GRAD) || !wrt[k]->grad.data) {
            fprintf(stderr, "  gradcheck: '%s' is not a trainable leaf\n", wrt[k]->name);
            return INFINITY;
        }
    kd_graph_forward(g, training);
    kd_graph_backward(g, p->obj);
    /* copy every analytic gradient before any further forward */
    int64_t total = 0;
    for (int k = 0; k < n_wrt; k++) total += kd_numel(&wrt[k]->val);
    double *ga = kd_malloc((size_t)total * sizeof *ga);
    for (int k = 0, o = 0; k < n_wrt; k++) {
        int64_t n = kd_numel(&wrt[k]->val);
        for (int64_t i = 0; i < n; i++) ga[o + i] = wrt[k]->grad.data[i];
        o += (int)n;
    }
    double worst = 0.0;
    for (int k = 0, o = 0; k < n_wrt; k++) {
        int64_t n = kd_numel(&wrt[k]->val);
        float *x = wrt[k]->val.data;
        double d2 = 0.0, a2 = 0.0, n2 = 0.0;
        for (int64_t i = 0; i < n; i++) {
            /* divide by the step actually taken after float32 rounding */
            float x0 = x[i], xp = (float)(x0 + eps), xm = (float)(x0 - eps);
            x[i] = xp;
            double fp = objective_at(g, p, training);
            x[i] = xm;
            double fm = objective_at(g, p, training);
            x[i] = x0;
            double gn = (fp - fm) / ((double)xp - (double)xm), a = ga[o + i];
            d2 += (a - gn) * (a - gn);
            a2 += a * a;
            n2 += gn * gn;
        }
        double den = fmax(sqrt(a2), sqrt(n2));
        double err = a2 == 0.0 ? INFINITY : sqrt(d2) / fmax(den, 1e-30);
        if (err > report_tol)
            fprintf(stderr, "  gradcheck '%s' (%lld elements): rel err %.3g, |analytic| %.4g, |numeric| %.4g%s\n",
                    wrt[k]->name, (long long)n, err, sqrt(a2), sqrt(n2), a2 == 0.0 ? " (analytic all zero)" : "");
        if (err > worst || isnan(err)) worst = isnan(err) ? INFINITY : err;
        o += (int)n;
    }
    free(ga);
    kd_graph_forward(g, training);
    kd_graph_backward(g, p->obj);
    return worst;
}

int kd_gc_compile(kd_graph *g, int max_batch, uint64_t seed) {
    kd_status st = kd_graph_compile(g, max_batch, seed);
    CHECK_MSG(st == KD_OK, "compile: %s", kd_error_message());
    return st == KD_OK;
}

void kd_gc_fill(kd_rng *r, kd_node *n, float scale, float shift) {
    for (int64_t i = 0; i < kd_numel(&n->val); i++) n->val.data[i] = shift + scale * kd_rng_normal(r);
}

void kd_gc_fill_away(kd_rng *r, kd_node *n, float scale, float margin) {
    for (int64_t i = 0; i < kd_numel(&n->val); i++) {
        float z = kd_rng_normal(r);
        n->val.data[i] = (z < 0 ? -1.0f : 1.0f) * (margin + scale * fabsf(z));
    }
}
