/* test_features3.c - tests for src/distill/feature3.c (haar2d, band_mse,
 * attn_mask, masked_mse, gauss_kl) and the loss rows of build_feat3.c
 * (freekd, sokd, unikd, ofa).
 *
 *   1. finite-difference gradient checks of every op w.r.t. every input
 *      that takes a gradient, on odd H and W, batch 1 and 3;
 *   2. closed forms: the Haar transform of a constant map (zero high bands,
 *      and where zero padding makes them non-zero on odd maps), its energy
 *      preservation and transpose, band_mse with unit weights = mse, the
 *      mask of uniform maps (all ones, masked_mse = mse), KL of identical
 *      Gaussians (0) and of known ones;
 *   3. PyTorch parity via tests/fixtures/features3.safetensors (written by
 *      tests/fixtures/gen_features3.py; missing fixture = failure);
 *   4. thread-count independence of the ops (bitwise);
 *   5. the loss rows on real models: '+' lists in the spec, parameter names
 *      and shapes, values against naive re-computations, which parameters
 *      get gradients (the teacher-side UniKD head does, the frozen teacher
 *      does not), and errors for bad arguments;
 *   6. end to end: kd_distiller_new with each spec compiles, and a forward
 *      + backward gives finite values and gradients.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "kd_distill.h"
#include "kd_io.h"
#include "kd_losses.h"
#include "kd_train.h"
#include "test.h"

/* see test_features.c: losses are doubles rounded once to float32; correct
 * backwards measure 1e-7..1e-4, a wrong term 1e-2 and more */
#define GC_TOL 1e-3

static kd_rng rng;

/* ============================================================ 1. gradients */

/* compiles, fills wrt (away from 0 when `away`: |f| has a kink there), checks */
static double gc_run(kd_graph *g, kd_node *out, kd_node **wrt, int n, int away, double eps) {
    static uint64_t calls;
    kd_gc p = kd_gradcheck_project(g, out);
    if (!kd_gc_compile(g, wrt[0]->val.shape[0], 7)) return INFINITY;
    for (int k = 0; k < n; k++) {
        if (away)
            kd_gc_fill_away(&rng, wrt[k], 1.0f, 0.2f);
        else
            kd_gc_fill(&rng, wrt[k], 1.0f, 0.1f * k);
    }
    kd_gradcheck_randomize(&p, 500 + calls++);
    return kd_gradcheck(g, &p, wrt, n, eps, 1);
}

static void gradchecks(void) {
    TEST("gradcheck haar2d: (1,2,5,7), (3,1,3,4), (2,2,4,6)") {
        int shapes[3][4] = {{1, 2, 5, 7}, {3, 1, 3, 4}, {2, 2, 4, 6}};
        for (int c = 0; c < 3; c++) {
            kd_graph *g = kd_graph_new();
            kd_node *x = kd_gc_param(g, "x", 4, shapes[c]);
            double err = gc_run(g, kd_haar2d(g, x), &x, 1, 0, 1e-2);
            CHECK_MSG(err < GC_TOL, "haar2d case %d: gradient error %.3g", c, err);
            kd_graph_free(g);
        }
    }
    TEST("gradcheck band_mse: 4 bands on (3,8,3,2), 2 bands on (1,6,5), behind haar2d on (3,2,5,7)") {
        const float w4[4] = {1.5f, 0.25f, 0.5f, 2.0f}, w2[2] = {0.3f, 1.7f};
        for (int c = 0; c < 3; c++) {
            kd_graph *g = kd_graph_new();
            int sh4[4] = {3, 8, 3, 2}, sh3[3] = {1, 6, 5}, shh[4] = {3, 2, 5, 7};
            kd_node *a = c == 0 ? kd_gc_param(g, "a", 4, sh4) : c == 1 ? kd_gc_param(g, "a", 3, sh3) : kd_gc_param(g, "a", 4, shh);
            kd_node *b = c == 0 ? kd_gc_param(g, "b", 4, sh4) : c == 1 ? kd_gc_param(g, "b", 3, sh3) : kd_gc_param(g, "b", 4, shh);
            kd_node *l = c == 0   ? kd_band_mse(g, a, b, 4, w4)
                         : c == 1 ? kd_band_mse(g, a, b, 2, w2)
                                  : kd_band_mse(g, kd_haar2d(g, a), kd_haar2d(g, b), 4, w4);
            kd_node *wrt[2] = {a, b};
            double err = gc_run(g, l, wrt, 2, 0, 1e-2);
            CHECK_MSG(err < GC_TOL, "band_mse case %d: gradient error %.3g", c, err);
            kd_graph_free(g);
        }
    }
    TEST("gradcheck attn_mask (not detached): B=1 (5x3) and B=3 (3x5), channels differ, tau 0.5 and 2") {
        for (int c = 0; c < 2; c++) {
            kd_graph *g = kd_graph_new();
            int B = c ? 3 : 1, H = c ? 3 : 5, W = c ? 5 : 3;
            kd_node *fs = kd_gc_param(g, "fs", 4, (int[]){B, 2, H, W}), *ft = kd_gc_param(g, "ft", 4, (int[]){B, 3, H, W});
            kd_node *wrt[2] = {fs, ft};
            double err = gc_run(g, kd_attn_mask(g, fs, ft, c ? 2.0f : 0.5f, 0), wrt, 2, 1, 2e-3);
            CHECK_MSG(err < GC_TOL, "attn_mask case %d: gradient error %.3g", c, err);
            kd_graph_free(g);
        }
    }
    TEST("gradcheck masked_mse: a, b and the mask, B=1 (2,5,3) and B=3 (3,3,5)") {
        for (int c = 0; c < 2; c++) {
            kd_graph *g = kd_graph_new();
            int B = c ? 3 : 1, C = c ? 3 : 2, H = c ? 3 : 5, W = c ? 5 : 3;
            kd_node *a = kd_gc_param(g, "a", 4, (int[]){B, C, H, W}), *b = kd_gc_param(g, "b", 4, (int[]){B, C, H, W});
            kd_node *m = kd_gc_param(g, "m", 4, (int[]){B, 1, H, W});
            kd_node *wrt[3] = {a, b, m};
            double err = gc_run(g, kd_masked_mse(g, a, b, m), wrt, 3, 0, 1e-2);
            CHECK_MSG(err < GC_TOL, "masked_mse case %d: gradient error %.3g", c, err);
            kd_graph_free(g);
        }
    }
    TEST("gradcheck sokd chain masked_mse(y, ft, attn_mask(fs, ft)): through the mask, and detached") {
        for (int detach = 0; detach < 2; detach++) {
            kd_graph *g = kd_graph_new();
            kd_node *y = kd_gc_param(g, "y", 4, (int[]){3, 2, 5, 3}), *ft = kd_gc_param(g, "ft", 4, (int[]){3, 2, 5, 3});
            kd_node *fs = kd_gc_param(g, "fs", 4, (int[]){3, 4, 5, 3});
            kd_node *l = kd_masked_mse(g, y, ft, kd_attn_mask(g, fs, ft, 0.8f, detach));
            /* detached, the gradient is not the derivative any more where the
             * mask depends on the input: only y is checked (ft's and fs's
             * detached gradients are checked against PyTorch's .detach()) */
            kd_node *wrt[3] = {y, ft, fs};
            double err = gc_run(g, l, wrt, detach ? 1 : 3, 1, 2e-3);
            CHECK_MSG(err < GC_TOL, "sokd chain detach=%d: gradient error %.3g", detach, err);
            if (detach) CHECK(kd_test_max_abs(fs->grad.data, 3 * 4 * 5 * 3) == 0.0);
            kd_graph_free(g);
        }
    }
    TEST("gradcheck gauss_kl: (1, 4) and (3, 5), all four inputs") {
        for (int c = 0; c < 2; c++) {
            kd_graph *g = kd_graph_new();
            int sh[2] = {c ? 3 : 1, c ? 5 : 4};
            kd_node *ms = kd_gc_param(g, "ms", 2, sh), *ls = kd_gc_param(g, "ls", 2, sh), *mt = kd_gc_param(g, "mt", 2, sh),
                    *lt = kd_gc_param(g, "lt", 2, sh);
            kd_node *wrt[4] = {ms, ls, mt, lt};
            double err = gc_run(g, kd_gauss_kl(g, ms, ls, mt, lt), wrt, 4, 0, 1e-2);
            CHECK_MSG(err < GC_TOL, "gauss_kl case %d: gradient error %.3g", c, err);
            kd_graph_free(g);
        }
    }
}

/* ============================================================ 2. closed forms */

static void closed_forms(void) {
    TEST("haar2d of a constant map: LL = 2c, high bands 0 (even); odd: zero padding makes the edge blocks' bands c") {
        for (int odd = 0; odd < 2; odd++) {
            int H = odd ? 5 : 4, W = odd ? 7 : 6, H2 = (H + 1) / 2, W2 = (W + 1) / 2;
            kd_graph *g = kd_graph_new();
            kd_node *x = kd_gc_param(g, "x", 4, (int[]){2, 3, H, W});
            kd_node *y = kd_haar2d(g, x);
            if (kd_gc_compile(g, 2, 7)) {
                for (int i = 0; i < 2 * 3 * H * W; i++) x->val.data[i] = 1.5f;
                kd_graph_forward(g, 1);
                CHECK(y->val.ndim == 4 && y->val.shape[1] == 12 && y->val.shape[2] == H2 && y->val.shape[3] == W2);
                int bad = 0;
                for (int b = 0; b < 2; b++)
                    for (int k = 0; k < 4; k++)
                        for (int c = 0; c < 3; c++)
                            for (int i = 0; i < H2; i++)
                                for (int j = 0; j < W2; j++) {
                                    float v = y->val.data[(((size_t)b * 12 + k * 3 + c) * H2 + i) * W2 + j];
                                    int er = odd && i == H2 - 1, ec = odd && j == W2 - 1; /* padded row / column */
                                    /* the block's pixels p q / r s: padded ones are 0 */
                                    double p = 1.5, q = ec ? 0 : 1.5, r = er ? 0 : 1.5, s = er || ec ? 0 : 1.5;
                                    double want = k == 0   ? (p + q + r + s) / 2
                                                  : k == 1 ? (p - q + r - s) / 2
                                                  : k == 2 ? (p + q - r - s) / 2
                                                           : (p - q - r + s) / 2;
                                    bad += fabs(v - want) > 1e-6;
                                    if (!odd && k > 0) bad += v != 0.0f;
                                }
                CHECK_MSG(bad == 0, "odd=%d: %d band values differ", odd, bad);
            }
            kd_graph_free(g);
        }
    }
    TEST("haar2d is orthonormal: energy preserved on odd maps, gradient of |y|^2/2 is x") {
        kd_graph *g = kd_graph_new();
        int sh[4] = {3, 2, 5, 7};
        kd_node *x = kd_gc_param(g, "x", 4, sh), *z = kd_buffer(g, "z", 4, (int[]){3, 8, 3, 4}, 0.0f);
        kd_node *y = kd_haar2d(g, x);
        y->flags |= KD_F_KEEP;
        const float ones[4] = {1, 1, 1, 1};
        kd_node *l = kd_band_mse(g, y, z, 4, ones); /* sum y^2 / numel(y) */
        if (kd_gc_compile(g, 3, 7)) {
            kd_gc_fill(&rng, x, 1.0f, 0.3f);
            kd_gc_step(g, l, 1);
            double ex = 0, ey = 0;
            for (int i = 0; i < 210; i++) ex += (double)x->val.data[i] * x->val.data[i];
            for (int i = 0; i < 3 * 8 * 12; i++) ey += (double)y->val.data[i] * y->val.data[i];
            CHECK_CLOSE(ey, ex, 0, 1e-6);
            CHECK_CLOSE(l->val.data[0], ex / (3 * 8 * 12), 0, 1e-6);
            /* d/dx (sum y^2 / n) = 2 A^T A x / n = 2 x / n */
            float want[210];
            for (int i = 0; i < 210; i++) want[i] = 2.0f * x->val.data[i] / (3 * 8 * 12);
            CHECK_ARRAYS("haar transpose", x->grad.data, want, 210, 1e-7, 1e-5);
        }
        kd_graph_free(g);
    }
    TEST("band_mse with unit weights = mse; freekd(w=1) = spatial mse on even maps (Parseval)") {
        kd_graph *g = kd_graph_new();
        int sh[4] = {2, 3, 4, 6};
        kd_node *a = kd_gc_param(g, "a", 4, sh), *b = kd_gc_param(g, "b", 4, sh);
        const float ones[4] = {1, 1, 1, 1}, w[4] = {2, 0, 0, 0};
        kd_node *l1 = kd_band_mse(g, a, b, 3, ones), *l2 = kd_mse(g, a, b);
        kd_node *l3 = kd_band_mse(g, kd_haar2d(g, a), kd_haar2d(g, b), 4, ones);
        kd_node *l4 = kd_band_mse(g, kd_haar2d(g, a), kd_haar2d(g, b), 4, w);
        kd_node *l = kd_add(g, kd_add(g, l1, l2), kd_add(g, l3, l4));
        l1->flags |= KD_F_KEEP, l2->flags |= KD_F_KEEP, l3->flags |= KD_F_KEEP, l4->flags |= KD_F_KEEP;
        if (kd_gc_compile(g, 2, 7)) {
            kd_gc_fill(&rng, a, 1.0f, 0.0f);
            kd_gc_fill(&rng, b, 1.0f, 0.5f);
            kd_gc_step(g, l, 1);
            CHECK_CLOSE(l1->val.data[0], l2->val.data[0], 0, 1e-6);
            CHECK_CLOSE(l3->val.data[0], l2->val.data[0], 0, 1e-5);
            /* LL alone, weight 2: the block means' squared differences, by hand */
            double s = 0;
            for (int bc = 0; bc < 6; bc++)
                for (int i = 0; i < 2; i++)
                    for (int j = 0; j < 3; j++) {
                        double d = 0;
                        for (int di = 0; di < 2; di++)
                            for (int dj = 0; dj < 2; dj++) {
                                size_t o = (size_t)bc * 24 + (2 * i + di) * 6 + 2 * j + dj;
                                d += 0.5 * ((double)a->val.data[o] - b->val.data[o]);
                            }
                        s += 2.0 * d * d;
                    }
            CHECK_CLOSE(l4->val.data[0], s / 144.0, 0, 1e-5);
        }
        kd_graph_free(g);
    }
    TEST("attn_mask: uniform maps give all ones (masked_mse = mse); mean 1; weight follows the shared attention") {
        kd_graph *g = kd_graph_new();
        int ss[4] = {2, 3, 3, 5}, st_[4] = {2, 2, 3, 5};
        kd_node *fs = kd_gc_param(g, "fs", 4, ss), *ft = kd_gc_param(g, "ft", 4, st_), *y = kd_gc_param(g, "y", 4, st_);
        kd_node *m = kd_attn_mask(g, fs, ft, 0.5f, 1);
        m->flags |= KD_F_KEEP;
        kd_node *lm = kd_masked_mse(g, y, ft, m), *l2 = kd_mse(g, y, ft);
        kd_node *l = kd_add(g, lm, l2);
        lm->flags |= KD_F_KEEP, l2->flags |= KD_F_KEEP;
        if (kd_gc_compile(g, 2, 7)) {
            /* constant |f| per example (signs vary): uniform attention */
            for (int i = 0; i < 90; i++) fs->val.data[i] = (i % 2 ? -1.0f : 1.0f) * (i < 45 ? 0.7f : 2.0f);
            for (int i = 0; i < 60; i++) ft->val.data[i] = i < 30 ? 0.4f : -3.0f;
            kd_gc_fill(&rng, y, 1.0f, 0.0f);
            kd_gc_step(g, l, 1);
            for (int i = 0; i < 30; i++) CHECK_CLOSE(m->val.data[i], 1.0, 0, 1e-6);
            CHECK_CLOSE(lm->val.data[0], l2->val.data[0], 0, 1e-6);
            /* random maps: mean 1 per example, the largest weight where u_s + u_t is largest */
            kd_gc_fill(&rng, fs, 1.0f, 0.0f);
            kd_gc_fill(&rng, ft, 1.0f, 0.0f);
            kd_graph_forward(g, 1);
            for (int b = 0; b < 2; b++) {
                double sum = 0, as[15] = {0}, at[15] = {0}, ms = 0, mt = 0;
                for (int i = 0; i < 15; i++) {
                    sum += m->val.data[b * 15 + i];
                    for (int c = 0; c < 3; c++) as[i] += fabs(fs->val.data[(b * 3 + c) * 15 + i]) / 3;
                    for (int c = 0; c < 2; c++) at[i] += fabs(ft->val.data[(b * 2 + c) * 15 + i]) / 2;
                    ms += as[i] / 15, mt += at[i] / 15;
                }
                CHECK_CLOSE(sum, 15.0, 0, 1e-5);
                int best = 0, bm = 0;
                for (int i = 0; i < 15; i++) {
                    if (as[i] / ms + at[i] / mt > as[best] / ms + at[best] / mt) best = i;
                    if (m->val.data[b * 15 + i] > m->val.data[b * 15 + bm]) bm = i;
                }
                CHECK(best == bm);
                /* the exact value at one position: 15 exp(z_i) / sum exp(z_j), z = (u_s + u_t) / 0.5 */
                double den = 0;
                for (int i = 0; i < 15; i++) den += exp((as[i] / ms + at[i] / mt) / 0.5);
                CHECK_CLOSE(m->val.data[b * 15 + 4], 15.0 * exp((as[4] / ms + at[4] / mt) / 0.5) / den, 0, 1e-5);
            }
        }
        kd_graph_free(g);
    }
    TEST("masked_mse: a zero weight drops a position, other weights scale it (naive sum)") {
        kd_graph *g = kd_graph_new();
        kd_node *a = kd_gc_param(g, "a", 3, (int[]){2, 3, 4}), *b = kd_gc_param(g, "b", 3, (int[]){2, 3, 4});
        kd_node *m = kd_gc_param(g, "m", 3, (int[]){2, 1, 4});
        kd_node *l = kd_masked_mse(g, a, b, m);
        if (kd_gc_compile(g, 2, 7)) {
            kd_gc_fill(&rng, a, 1.0f, 0.0f);
            kd_gc_fill(&rng, b, 1.0f, 0.0f);
            float mv[8] = {0, 1, 2, 0.5f, 3, 0, 1, 1};
            memcpy(m->val.data, mv, sizeof mv);
            kd_gc_step(g, l, 1);
            double s = 0;
            for (int e = 0; e < 2; e++)
                for (int c = 0; c < 3; c++)
                    for (int i = 0; i < 4; i++) {
                        size_t o = ((size_t)e * 3 + c) * 4 + i;
                        double d = (double)a->val.data[o] - b->val.data[o];
                        s += mv[e * 4 + i] * d * d;
                    }
            CHECK_CLOSE(l->val.data[0], s / 24, 0, 1e-6);
            for (int c = 0; c < 3; c++) CHECK(a->grad.data[c * 4] == 0.0f && a->grad.data[12 + c * 4 + 1] == 0.0f);
        }
        kd_graph_free(g);
    }
    TEST("gauss_kl: identical Gaussians give 0 and zero gradients; known values") {
        kd_graph *g = kd_graph_new();
        int sh[2] = {3, 4};
        kd_node *ms = kd_gc_param(g, "ms", 2, sh), *ls = kd_gc_param(g, "ls", 2, sh), *mt = kd_gc_param(g, "mt", 2, sh),
                *lt = kd_gc_param(g, "lt", 2, sh);
        kd_node *l = kd_gauss_kl(g, ms, ls, mt, lt);
        if (kd_gc_compile(g, 3, 7)) {
            kd_gc_fill(&rng, ms, 1.0f, 0.0f);
            kd_gc_fill(&rng, ls, 0.5f, 0.0f);
            memcpy(mt->val.data, ms->val.data, 12 * sizeof(float));
            memcpy(lt->val.data, ls->val.data, 12 * sizeof(float));
            kd_gc_step(g, l, 1);
            CHECK(fabs(l->val.data[0]) < 1e-7);
            CHECK(kd_test_max_abs(ms->grad.data, 12) < 1e-7 && kd_test_max_abs(ls->grad.data, 12) < 1e-7);
            CHECK(kd_test_max_abs(mt->grad.data, 12) < 1e-7 && kd_test_max_abs(lt->grad.data, 12) < 1e-7);
            /* N(1, 4) against N(0, 1) per element: 1/2 (0 - log 4 + 4 + 1 - 1) = 2 - log 2; 4 dims, rows averaged */
            for (int i = 0; i < 12; i++) {
                ms->val.data[i] = 0, ls->val.data[i] = 0, mt->val.data[i] = 1, lt->val.data[i] = (float)log(4.0);
            }
            kd_gc_step(g, l, 1);
            CHECK_CLOSE(l->val.data[0], 4.0 * (2.0 - log(2.0)), 0, 1e-6);
            /* dmu_s = (mu_s - mu_t) / v_s / N = -1/3 */
            for (int i = 0; i < 12; i++) CHECK_CLOSE(ms->grad.data[i], -1.0 / 3.0, 0, 1e-6);
        }
        kd_graph_free(g);
    }
}

/* ============================================================ 3. PyTorch fixture */

/* Tolerances against the float64 reference stored as float32: the ops sum
 * in double from the same float32 inputs, so losses agree to a few ulp;
 * gradients and the Haar output pass through float32 arithmetic (0.5 * sums
 * of four floats, float gradients), hence 1e-5 relative with an absolute
 * part scaled by the largest element. Formula errors are >= 1e-3. */
#define FX_RTOL 1e-5
#define FX_ATOL_REL 1e-5

static int fx_get(const kd_safetensors *st, const char *key, float *dst, int ndim, const int *shape) {
    kd_status rc = kd_st_get_f32(st, key, dst, ndim, shape);
    CHECK_MSG(rc == KD_OK, "fixture: %s", kd_error_message());
    return rc == KD_OK;
}

static int fx_load(const kd_safetensors *st, const char *pre, const char *key, kd_node *n) {
    char k[64];
    snprintf(k, sizeof k, "%s.%s", pre, key);
    return fx_get(st, k, n->val.data, n->val.ndim, n->val.shape);
}

/* compares n's value (grad = 0) or gradient (grad = 1) with pre.key */
static void fx_expect(const kd_safetensors *st, const char *pre, const char *key, const kd_node *n, int grad) {
    char k[64];
    snprintf(k, sizeof k, "%s.%s", pre, key);
    int64_t cnt = kd_numel(&n->val);
    float *want = kd_malloc((size_t)cnt * sizeof *want);
    if (fx_get(st, k, want, n->val.ndim, n->val.shape)) {
        const float *have = grad ? n->grad.data : n->val.data;
        double m = kd_test_max_abs(want, cnt);
        if (m == 0.0)
            CHECK_MSG(kd_test_max_abs(have, cnt) == 0.0, "%s: reference all zero, ours not", k);
        else
            CHECK_ARRAYS(k, have, want, cnt, FX_ATOL_REL * m, FX_RTOL);
    }
    free(want);
}

static void fx_loss(const kd_safetensors *st, const char *pre, const kd_node *loss) {
    char k[64];
    float want;
    snprintf(k, sizeof k, "%s.loss", pre);
    if (fx_get(st, k, &want, 1, (int[]){1}))
        CHECK_MSG(fabs(loss->val.data[0] - want) <= FX_RTOL * fabs(want), "%s: %.9g, PyTorch %.9g", k,
                  loss->val.data[0], want);
}

static void fx_freekd(const kd_safetensors *st, const char *pre, const int *sh, const float *w) {
    kd_graph *g = kd_graph_new();
    kd_node *s = kd_gc_param(g, "s", 4, sh), *t = kd_gc_param(g, "t", 4, sh);
    kd_node *hs = kd_haar2d(g, s);
    hs->flags |= KD_F_KEEP;
    kd_node *l = kd_band_mse(g, hs, kd_haar2d(g, t), 4, w);
    if (kd_gc_compile(g, sh[0], 7) && fx_load(st, pre, "s", s) && fx_load(st, pre, "t", t)) {
        kd_gc_step(g, l, 1);
        fx_loss(st, pre, l);
        fx_expect(st, pre, "haar_s", hs, 0);
        fx_expect(st, pre, "grad_s", s, 1);
        fx_expect(st, pre, "grad_t", t, 1);
    }
    kd_graph_free(g);
}

static void fx_sokd(const kd_safetensors *st, const char *pre, int B, int Cs, int Ct, int H, int W, float tau,
                    int detach) {
    kd_graph *g = kd_graph_new();
    kd_node *y = kd_gc_param(g, "y", 4, (int[]){B, Ct, H, W}), *ft = kd_gc_param(g, "ft", 4, (int[]){B, Ct, H, W});
    kd_node *fs = kd_gc_param(g, "fs", 4, (int[]){B, Cs, H, W});
    kd_node *m = kd_attn_mask(g, fs, ft, tau, detach);
    m->flags |= KD_F_KEEP;
    kd_node *l = kd_masked_mse(g, y, ft, m);
    if (kd_gc_compile(g, B, 7) && fx_load(st, pre, "y", y) && fx_load(st, pre, "ft", ft) &&
        fx_load(st, pre, "fs", fs)) {
        kd_gc_step(g, l, 1);
        fx_loss(st, pre, l);
        fx_expect(st, pre, "mask", m, 0);
        fx_expect(st, pre, "grad_y", y, 1);
        fx_expect(st, pre, "grad_ft", ft, 1);
        fx_expect(st, pre, "grad_fs", fs, 1);
    }
    kd_graph_free(g);
}

static void fx_gkl(const kd_safetensors *st, const char *pre, int N, int D) {
    kd_graph *g = kd_graph_new();
    int sh[2] = {N, D};
    kd_node *in[4] = {kd_gc_param(g, "mu_s", 2, sh), kd_gc_param(g, "lv_s", 2, sh), kd_gc_param(g, "mu_t", 2, sh),
                      kd_gc_param(g, "lv_t", 2, sh)};
    kd_node *l = kd_gauss_kl(g, in[0], in[1], in[2], in[3]);
    const char *names[4] = {"mu_s", "lv_s", "mu_t", "lv_t"};
    if (kd_gc_compile(g, N, 7)) {
        int ok = 1;
        for (int k = 0; k < 4; k++) ok &= fx_load(st, pre, names[k], in[k]);
        if (ok) {
            kd_gc_step(g, l, 1);
            fx_loss(st, pre, l);
            for (int k = 0; k < 4; k++) {
                char key[16];
                snprintf(key, sizeof key, "grad_%s", names[k]);
                fx_expect(st, pre, key, in[k], 1);
            }
        }
    }
    kd_graph_free(g);
}

static void fixture(void) {
    TEST("PyTorch parity (tests/fixtures/features3.safetensors)") {
        char path[512];
        kd_test_fixture("features3.safetensors", path, sizeof path);
        kd_safetensors st;
        kd_status rc = kd_st_read(path, &st);
        CHECK_MSG(rc == KD_OK, "%s (regenerate with: python3 tests/fixtures/gen_features3.py)", kd_error_message());
        if (rc != KD_OK) break;
        const float w_odd[4] = {1.0f, 0.5f, 0.5f, 0.5f}, w_even[4] = {2.0f, 0.3f, 0.7f, 1.1f};
        fx_freekd(&st, "freekd_odd", (int[]){3, 2, 5, 7}, w_odd);
        fx_freekd(&st, "freekd_even", (int[]){1, 3, 4, 6}, w_even);
        fx_sokd(&st, "sokd_grad", 3, 2, 3, 5, 3, 0.7f, 0);
        fx_sokd(&st, "sokd_detach", 1, 4, 2, 3, 5, 1.0f, 1);
        fx_gkl(&st, "gkl_a", 5, 4);
        fx_gkl(&st, "gkl_b", 1, 6);
        kd_st_free(&st);
    }
}

/* ============================================================ 4. threads */

/* one graph with every op on sizes above the parallel threshold; returns
 * the three losses and all input gradients */
static float *run_ops(int threads, int *k_out) {
    enum { B = 8, C = 16, H = 17, W = 17, D = 4608, X = B * C * H * W };
    kd_graph *g = kd_graph_new();
    kd_graph_set_threads(g, threads);
    int sh[4] = {B, C, H, W}, shd[2] = {8, D};
    kd_node *a = kd_gc_param(g, "a", 4, sh), *b = kd_gc_param(g, "b", 4, sh), *fs = kd_gc_param(g, "fs", 4, sh);
    kd_node *ms = kd_gc_param(g, "ms", 2, shd), *ls = kd_gc_param(g, "ls", 2, shd), *mt = kd_gc_param(g, "mt", 2, shd),
            *lt = kd_gc_param(g, "lt", 2, shd);
    const float w[4] = {1, 0.5f, 0.5f, 0.5f};
    kd_node *l1 = kd_band_mse(g, kd_haar2d(g, a), kd_haar2d(g, b), 4, w);
    kd_node *l2 = kd_masked_mse(g, a, b, kd_attn_mask(g, fs, b, 1.0f, 0));
    kd_node *l3 = kd_gauss_kl(g, ms, ls, mt, lt);
    kd_node *l = kd_add(g, kd_add(g, l1, l2), l3);
    l1->flags |= KD_F_KEEP, l2->flags |= KD_F_KEEP, l3->flags |= KD_F_KEEP;
    float *out = NULL;
    if (kd_gc_compile(g, B, 7)) {
        kd_rng_seed(&rng, 777);
        kd_node *leaves[7] = {a, b, fs, ms, ls, mt, lt};
        for (int i = 0; i < 7; i++) kd_gc_fill(&rng, leaves[i], i == 4 || i == 6 ? 0.3f : 1.0f, 0.0f);
        kd_gc_step(g, l, 1);
        *k_out = 3 + 3 * X + 4 * 8 * D;
        out = kd_malloc((size_t)*k_out * sizeof *out);
        out[0] = l1->val.data[0], out[1] = l2->val.data[0], out[2] = l3->val.data[0];
        float *p = out + 3;
        for (int i = 0; i < 7; i++) {
            int64_t k = kd_numel(&leaves[i]->val);
            memcpy(p, leaves[i]->grad.data, (size_t)k * sizeof *p);
            p += k;
        }
    }
    kd_graph_free(g);
    return out;
}

static void threads(void) {
    TEST("feature3 ops: bitwise the same on 1 and 3 threads") {
        int k = 0;
        float *a = run_ops(1, &k), *b = run_ops(3, &k);
        if (a && b) {
            CHECK_MSG(memcmp(a, b, (size_t)k * sizeof *a) == 0, "depends on the thread count");
            CHECK(kd_test_all_finite(a, k) && a[0] > 0 && a[1] > 0 && a[2] > 0);
        }
        free(a), free(b);
    }
}

/* ============================================================ 5. loss rows */

typedef struct pair {
    kd_graph *g;
    kd_node *x, *y;
    kd_model s, t;
    kd_built_loss L;
} pair;

/* student and teacher on one input (6, 1, 14, 14): block1 7x7, block2 3x3
 * (odd), teacher frozen; then the spec, with the named nodes and every tap
 * of both models kept alive (the tests read them after backward) */
static kd_status pair_build(pair *p, const char *sspec, const char *tspec, const char *spec,
                            const char *const *keep) {
    memset(p, 0, sizeof *p);
    p->g = kd_graph_new();
    p->x = kd_input(p->g, "x", 4, (int[]){6, 1, 14, 14});
    p->y = kd_input(p->g, "y", 1, (int[]){6});
    kd_status st = kd_model_build(p->g, sspec, "s.", p->x, 5, &p->s);
    kd_graph_set_frozen(p->g, 1);
    if (st == KD_OK) st = kd_model_build(p->g, tspec, "t.", p->x, 5, &p->t);
    kd_graph_set_frozen(p->g, 0);
    kd_loss_spec ls;
    if (st == KD_OK) st = kd_loss_spec_parse(spec, &ls);
    kd_loss_inputs in = {
        .student = &p->s, .teacher = &p->t, .s_logits = p->s.logits, .t_logits = p->t.logits, .labels = p->y};
    if (st == KD_OK) st = kd_loss_build(p->g, &ls, &in, &p->L);
    if (st != KD_OK) return st;
    for (int i = 0; i < p->s.n_taps; i++) p->s.taps[i]->flags |= KD_F_KEEP;
    for (int i = 0; i < p->t.n_taps; i++) p->t.taps[i]->flags |= KD_F_KEEP;
    for (; keep && *keep; keep++) {
        kd_node *n = kd_graph_find(p->g, *keep);
        CHECK_MSG(n != NULL, "no node '%s'", *keep);
        if (n) n->flags |= KD_F_KEEP;
    }
    st = kd_graph_compile(p->g, 6, 11);
    if (st == KD_OK) {
        kd_rng r; /* the same input for every build */
        kd_rng_seed(&r, 4321);
        kd_gc_fill(&r, p->x, 1, 0);
        for (int i = 0; i < 6; i++) p->y->val.data[i] = (float)(i % 5);
    }
    return st;
}

static kd_node *find(pair *p, const char *name) {
    kd_node *n = kd_graph_find(p->g, name);
    CHECK_MSG(n != NULL, "no node '%s'", name);
    return n;
}

static int shape_is(const kd_node *n, int ndim, const int *sh) {
    return n && n->val.ndim == ndim && memcmp(n->val.shape, sh, (size_t)ndim * sizeof(int)) == 0;
}

/* global average pool of a tap (6, C, H, W) into out (6, C) in double */
static void naive_gap(double *out, const kd_node *f) {
    int C = f->val.shape[1], I = f->val.shape[2] * f->val.shape[3];
    for (int e = 0; e < 6; e++)
        for (int c = 0; c < C; c++) {
            double s = 0;
            for (int i = 0; i < I; i++) s += f->val.data[((size_t)e * C + c) * I + i];
            out[e * C + c] = s / I;
        }
}

/* y (R, OUT) = x (R, IN) w^T + b, in double */
static void naive_linear(double *y, const double *x, const float *w, const float *b, int R, int IN, int OUT) {
    for (int r = 0; r < R; r++)
        for (int o = 0; o < OUT; o++) {
            double s = b ? b[o] : 0.0;
            for (int i = 0; i < IN; i++) s += x[r * IN + i] * w[o * IN + i];
            y[r * OUT + o] = s;
        }
}

/* batchmean T^2 KL(softmax(t/T) || softmax(s/T)) over rows of K in double */
static double naive_kl(const double *s, const float *t, int R, int K, double T) {
    double tot = 0;
    for (int r = 0; r < R; r++) {
        double ms = -INFINITY, mt = -INFINITY, zs = 0, zt = 0;
        for (int k = 0; k < K; k++) ms = fmax(ms, s[r * K + k] / T), mt = fmax(mt, t[r * K + k] / T);
        for (int k = 0; k < K; k++) zs += exp(s[r * K + k] / T - ms), zt += exp(t[r * K + k] / T - mt);
        for (int k = 0; k < K; k++) {
            double lt = t[r * K + k] / T - mt - log(zt), lsv = s[r * K + k] / T - ms - log(zs);
            tot += exp(lt) * (lt - lsv);
        }
    }
    return T * T * tot / R;
}

static const char *S_CNN = "cnn: c3 p c4 p bn=0", *T_CNN = "cnn: c6 p c8 p f12";

static void spec_lists(void) {
    TEST("spec: '+' joins taps inside a value, not terms") {
        kd_loss_spec s;
        CHECK(kd_loss_spec_parse("ce + unikd(s=block1+block2, t = block2 ) + ofa(T=1e+0)", &s) == KD_OK);
        CHECK(s.n == 3 && strcmp(s.terms[1].args[0].value, "block1+block2") == 0);
        CHECK(strcmp(s.terms[1].args[1].value, "block2") == 0 && strcmp(s.terms[2].args[0].value, "1e+0") == 0);
        CHECK(kd_loss_spec_parse("ofa(s=block1 + block2)", &s) == KD_ECONFIG);
    }
}

static void rows(void) {
    pair p;
    TEST("freekd: conv1x1 projector; w_ll = w_high = 1 gives fitnet's MSE times HW / (4 H2 W2) (zero padding)") {
        kd_status st = pair_build(&p, S_CNN, T_CNN,
                                  "freekd(w_ll=1, w_high=1) + fitnet(s=block2, t=block2) + freekd(s=block1, t=block1)",
                                  NULL);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *w1 = find(&p, "proj1.weight"), *w2 = find(&p, "proj2.weight"), *b1 = find(&p, "proj1.bias"),
                    *b2 = find(&p, "proj2.bias");
            CHECK(shape_is(w1, 4, (int[]){8, 4, 1, 1}) && shape_is(find(&p, "proj3.weight"), 4, (int[]){6, 3, 1, 1}));
            if (w1 && w2 && b1 && b2) {
                memcpy(w2->val.data, w1->val.data, 32 * sizeof(float));
                memcpy(b2->val.data, b1->val.data, 8 * sizeof(float));
                kd_gc_step(p.g, p.L.total, 1);
                /* block2 is 3x3: padded to 4x4 */
                CHECK_CLOSE(p.L.terms[0].value->val.data[0], p.L.terms[1].value->val.data[0] * 9.0 / 16.0, 0, 1e-5);
                CHECK(isfinite(p.L.terms[2].value->val.data[0]) && p.L.terms[2].value->val.data[0] > 0);
                CHECK(kd_test_max_abs(w1->grad.data, 32) > 0 && kd_test_max_abs(find(&p, "s.conv1.weight")->grad.data, 27) > 0);
            }
        }
        kd_graph_free(p.g);
    }
    TEST("freekd: the weights split LL from the high bands (w_high = 0 keeps only the block means)") {
        kd_status st = pair_build(&p, "cnn: c8 p c8 p bn=0", T_CNN, "freekd(proj=none, w_ll=3, w_high=0)", NULL);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_gc_step(p.g, p.L.total, 1);
            const kd_node *fs = find(&p, "s.block2"), *ft = find(&p, "t.block2");
            double s = 0;
            for (int ec = 0; ec < 48; ec++)
                for (int i = 0; i < 2; i++)
                    for (int j = 0; j < 2; j++) {
                        double d = 0;
                        for (int di = 0; di < 2; di++)
                            for (int dj = 0; dj < 2; dj++) {
                                int r = 2 * i + di, c = 2 * j + dj;
                                if (r > 2 || c > 2) continue; /* zero padding */
                                size_t o = (size_t)ec * 9 + r * 3 + c;
                                d += 0.5 * ((double)fs->val.data[o] - ft->val.data[o]);
                            }
                        s += 3.0 * d * d;
                    }
            CHECK_CLOSE(p.L.terms[0].value->val.data[0], s / (6.0 * 32 * 4), 0, 1e-5);
        }
        kd_graph_free(p.g);
    }
    TEST("sokd: MSE of the projection weighted by the shared-attention mask (naive); detach changes only gradients") {
        float val[2] = {0, 1}, gconv[2][27] = {{0}};
        for (int detach = 0; detach < 2; detach++) {
            char spec[96];
            snprintf(spec, sizeof spec, "sokd(s=block1, t=block1, tau=0.5, detach=%d)", detach);
            kd_status st = pair_build(&p, S_CNN, T_CNN, spec, (const char *[]){"proj1", NULL});
            CHECK_MSG(st == KD_OK, "%s", kd_error_message());
            if (st != KD_OK) {
                kd_graph_free(p.g);
                break;
            }
            kd_gc_step(p.g, p.L.total, 1);
            const kd_node *fs = find(&p, "s.block1"), *ft = find(&p, "t.block1"), *y = find(&p, "proj1");
            double tot = 0;
            for (int e = 0; e < 6; e++) {
                double as[49] = {0}, at[49] = {0}, ms = 0, mt = 0, z[49], den = 0;
                for (int i = 0; i < 49; i++) {
                    for (int c = 0; c < 3; c++) as[i] += fabs(fs->val.data[(e * 3 + c) * 49 + i]) / 3;
                    for (int c = 0; c < 6; c++) at[i] += fabs(ft->val.data[(e * 6 + c) * 49 + i]) / 6;
                    ms += as[i] / 49, mt += at[i] / 49;
                }
                for (int i = 0; i < 49; i++) {
                    z[i] = exp((as[i] / (ms + 1e-6) + at[i] / (mt + 1e-6)) / 0.5);
                    den += z[i];
                }
                for (int i = 0; i < 49; i++)
                    for (int c = 0; c < 6; c++) {
                        size_t o = (size_t)(e * 6 + c) * 49 + i;
                        double d = (double)y->val.data[o] - ft->val.data[o];
                        tot += 49.0 * z[i] / den * d * d;
                    }
            }
            val[detach] = p.L.terms[0].value->val.data[0];
            CHECK_CLOSE(val[detach], tot / (6.0 * 6 * 49), 0, 1e-5);
            memcpy(gconv[detach], find(&p, "s.conv1.weight")->grad.data, sizeof gconv[detach]);
            kd_graph_free(p.g);
        }
        CHECK(val[0] == val[1]);
        CHECK_MSG(memcmp(gconv[0], gconv[1], sizeof gconv[0]) != 0, "the mask's gradient did not reach the student");
    }
    TEST("unikd: per-side heads (teacher's trained), Gaussian KL + anchor; naive mean of the student's Gaussian") {
        const char *keep[] = {"proj1.s.mu", "proj1.s.logvar", "proj1.t.mu", "proj1.t.logvar", "proj1.t.readout",
                              NULL};
        kd_status st = pair_build(&p, S_CNN, T_CNN, "unikd(dim=8)", keep);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *fs = find(&p, "proj1.s.fuse.weight"), *ft = find(&p, "proj1.t.fuse.weight");
            kd_node *ro = find(&p, "proj1.t.readout.weight"), *tmu = find(&p, "proj1.t.mu.weight");
            CHECK(shape_is(fs, 2, (int[]){8, 7}) && shape_is(ft, 2, (int[]){8, 14}) && shape_is(ro, 2, (int[]){5, 8}));
            CHECK(shape_is(find(&p, "proj1.s.logvar.weight"), 2, (int[]){8, 8}) && shape_is(tmu, 2, (int[]){8, 8}));
            kd_gc_step(p.g, p.L.total, 1);
            const kd_node *mus = find(&p, "proj1.s.mu"), *lvs = find(&p, "proj1.s.logvar"),
                          *mut = find(&p, "proj1.t.mu"), *lvt = find(&p, "proj1.t.logvar"),
                          *r = find(&p, "proj1.t.readout");
            double kl = 0;
            for (int i = 0; i < 48; i++) {
                double dm = (double)mut->val.data[i] - mus->val.data[i];
                kl += 0.5 * (lvs->val.data[i] - lvt->val.data[i] +
                             (exp(lvt->val.data[i]) + dm * dm) * exp(-(double)lvs->val.data[i]) - 1);
            }
            double rd[30];
            for (int i = 0; i < 30; i++) rd[i] = r->val.data[i];
            CHECK_CLOSE(p.L.terms[0].value->val.data[0], kl / 6 + naive_kl(rd, p.t.logits->val.data, 6, 5, 1.0), 0,
                        1e-5);
            /* mu_s = W_mu relu(W_fuse [gap(block1), gap(block2)] + b) + b */
            double g1[18], g2[24], u[42], h[48], mu[48];
            naive_gap(g1, find(&p, "s.block1"));
            naive_gap(g2, find(&p, "s.block2"));
            for (int e = 0; e < 6; e++) {
                memcpy(u + e * 7, g1 + e * 3, 3 * sizeof(double));
                memcpy(u + e * 7 + 3, g2 + e * 4, 4 * sizeof(double));
            }
            naive_linear(h, u, fs->val.data, find(&p, "proj1.s.fuse.bias")->val.data, 6, 7, 8);
            for (int i = 0; i < 48; i++) h[i] = fmax(h[i], 0.0);
            naive_linear(mu, h, find(&p, "proj1.s.mu.weight")->val.data, find(&p, "proj1.s.mu.bias")->val.data, 6, 8,
                         8);
            float muf[48];
            for (int i = 0; i < 48; i++) muf[i] = (float)mu[i];
            CHECK_ARRAYS("unikd student mean", mus->val.data, muf, 48, 1e-5, 1e-5);
            /* both heads train; the frozen teacher does not */
            CHECK(kd_test_max_abs(fs->grad.data, 56) > 0 && kd_test_max_abs(ft->grad.data, 112) > 0);
            CHECK(kd_test_max_abs(tmu->grad.data, 64) > 0 && kd_test_max_abs(ro->grad.data, 40) > 0);
            CHECK(find(&p, "t.conv1.weight")->grad.data == NULL);
        }
        kd_graph_free(p.g);
        st = pair_build(&p, S_CNN, T_CNN, "unikd(s=block2, t=block1+block2+feat, dim=4, anchor=0)", NULL);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            CHECK(kd_graph_find(p.g, "proj1.t.readout.weight") == NULL);
            CHECK(shape_is(find(&p, "proj1.s.fuse.weight"), 2, (int[]){4, 4}));
            CHECK(shape_is(find(&p, "proj1.t.fuse.weight"), 2, (int[]){4, 6 + 8 + 12}));
            CHECK(p.L.terms[0].value->op == KD_OP_GAUSS_KL);
        }
        kd_graph_free(p.g);
    }
    TEST("ofa: a GAP + linear head per student stage, T^2 KL against the teacher's logits (naive), heads outside s.") {
        kd_status st = pair_build(&p, S_CNN, T_CNN, "ofa(s=block1+block2, T=2)", NULL);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_node *w0 = find(&p, "proj1.0.weight"), *w1 = find(&p, "proj1.1.weight");
            CHECK(shape_is(w0, 2, (int[]){5, 3}) && shape_is(w1, 2, (int[]){5, 4}));
            kd_gc_step(p.g, p.L.total, 1);
            double g1[18], g2[24], z[30], want = 0;
            naive_gap(g1, find(&p, "s.block1"));
            naive_gap(g2, find(&p, "s.block2"));
            naive_linear(z, g1, w0->val.data, find(&p, "proj1.0.bias")->val.data, 6, 3, 5);
            want += naive_kl(z, p.t.logits->val.data, 6, 5, 2.0);
            naive_linear(z, g2, w1->val.data, find(&p, "proj1.1.bias")->val.data, 6, 4, 5);
            want += naive_kl(z, p.t.logits->val.data, 6, 5, 2.0);
            CHECK_CLOSE(p.L.terms[0].value->val.data[0], want, 0, 1e-5);
            CHECK(kd_test_max_abs(w0->grad.data, 15) > 0 && kd_test_max_abs(find(&p, "s.conv1.weight")->grad.data, 27) > 0);
            /* the student's own head is not in this loss */
            kd_node *hw = find(&p, "s.head.weight");
            CHECK(hw && kd_test_max_abs(hw->grad.data, kd_numel(&hw->val)) == 0.0);
        }
        kd_graph_free(p.g);
    }
}

static void row_errors(void) {
    const char *mlp_s = "mlp: 12", *mlp_t = "mlp: 20";
    const char *bad[][4] = {
        {mlp_s, mlp_t, "freekd(s=block1, t=block1)", "feature maps"},
        {S_CNN, T_CNN, "freekd(s=block1, t=block2)", "same height and width"},
        {S_CNN, T_CNN, "freekd(w_ll=-1)", "outside"},
        {S_CNN, T_CNN, "freekd(proj=none)", "does not match"},
        {S_CNN, T_CNN, "sokd(detach=2)", "outside"},
        {S_CNN, T_CNN, "sokd(detach=0.5)", "not an integer"},
        {S_CNN, T_CNN, "sokd(tau=0)", "outside"},
        {mlp_s, mlp_t, "sokd(s=feat, t=feat)", "feature maps"},
        {S_CNN, T_CNN, "unikd(s=block1+nope)", "nope is not a tap of the student"},
        {S_CNN, T_CNN, "unikd(t=block1+)", "empty tap name"},
        {S_CNN, T_CNN, "unikd(dim=0)", "outside"},
        {S_CNN, T_CNN, "unikd(anchor=-1)", "outside"},
        {S_CNN, T_CNN, "ofa(s=block1+block2+block1+block2+block1+block2+block1+block2+block1)", "more than 8"},
        {S_CNN, T_CNN, "ofa(T=0)", "outside"},
        {S_CNN, T_CNN, "ofa(t=block1)", "no argument 't'"},
    };
    TEST("loss row errors name the problem") {
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            pair p;
            kd_status st = pair_build(&p, bad[i][0], bad[i][1], bad[i][2], NULL);
            CHECK_MSG(st != KD_OK, "'%s' built", bad[i][2]);
            CHECK_MSG(strstr(kd_error_message(), bad[i][3]) != NULL, "'%s': %s", bad[i][2], kd_error_message());
            kd_graph_free(p.g);
        }
    }
}

/* ============================================================ 6. end to end */

static kd_dataset tiny(int n) {
    kd_dataset ds = {.n = n, .c = 1, .h = 14, .w = 14, .n_classes = 3, .mean = 0.5f, .std = 0.25f};
    ds.images = kd_malloc((size_t)n * 196);
    ds.labels = kd_malloc((size_t)n);
    kd_rng r;
    kd_rng_seed(&r, 9);
    for (int i = 0; i < n; i++) {
        ds.labels[i] = (uint8_t)(i % 3);
        for (int p = 0; p < 196; p++) ds.images[(size_t)i * 196 + p] = (uint8_t)kd_rng_below(&r, 256);
    }
    return ds;
}

static void end_to_end(void) {
    const char *specs[] = {
        "ce + kd(T=4) + freekd(w_ll=1, w_high=0.5, weight=10)",
        "ce + kd(T=4) + freekd(s=block1, t=block1, proj=conv1x1, bn=1)",
        "ce + kd(T=4) + sokd(s=block2, t=block2, proj=conv1x1)",
        "ce + kd(T=4) + sokd(s=block1, t=block1, detach=0, tau=0.5)",
        "ce + kd(T=4) + unikd(s=block1+block2, t=block1+block2, dim=16)",
        "ce + kd(T=4) + ofa(s=block1+block2, T=1)",
    };
    TEST("kd_distiller_new with each spec: compiles, forward + backward finite, the term's parameters get gradients") {
        kd_dataset ds = tiny(8);
        for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
            kd_distiller d;
            kd_status st = kd_distiller_new(&d, "cnn: c6 p c8 p f12", "cnn: c3 p c4 p bn=0", specs[i], &ds, 8, 3);
            CHECK_MSG(st == KD_OK, "'%s': %s", specs[i], kd_error_message());
            if (st != KD_OK) continue;
            kd_graph *g = d.c.g;
            kd_gc_fill(&rng, d.c.x, 1.0f, 0.0f);
            for (int r = 0; r < 8; r++) d.c.y->val.data[r] = (float)(r % 3);
            kd_gc_step(g, d.c.loss, 1);
            CHECK_MSG(isfinite(d.c.loss->val.data[0]), "'%s': loss %g", specs[i], d.c.loss->val.data[0]);
            CHECK_MSG(kd_test_all_finite(kd_graph_param_grad(g), (int64_t)kd_graph_param_count(g)), "'%s': grads", specs[i]);
            double pg = 0;
            int np = 0;
            for (int k = 0; k < kd_graph_n_state(g); k++) {
                kd_node *n = kd_graph_state(g, k);
                if (strncmp(n->name, "proj3", 5) == 0 && n->grad.data) {
                    pg = fmax(pg, kd_test_max_abs(n->grad.data, kd_numel(&n->val)));
                    np++;
                }
            }
            CHECK_MSG(np > 0 && pg > 0, "'%s': %d loss parameters, max |grad| %g", specs[i], np, pg);
            /* the loss's parameters are not the student's */
            CHECK(kd_model_params(g, &d.c.m) == 3 * 9 + 3 + 4 * 3 * 9 + 4 + 3 * 4 * 9 + 3);
            kd_distiller_free(&d);
        }
        /* ofa needs only the teacher's logits: it works with a cache */
        kd_distiller d;
        kd_status st = kd_distiller_new_cached(&d, "cnn: c3 p c4 p bn=0", "ce + ofa(s=block2)", &ds, 8, 3);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) kd_distiller_free(&d);
        st = kd_distiller_new_cached(&d, "cnn: c3 p c4 p bn=0", "ce + unikd(anchor=0)", &ds, 8, 3);
        CHECK(st != KD_OK && strstr(kd_error_message(), "teacher cache") != NULL);
        kd_dataset_free(&ds);
    }
}

void test_features3(void) {
    kd_rng_seed(&rng, 20241122);
    gradchecks();
    closed_forms();
    fixture();
    threads();
    spec_lists();
    rows();
    row_errors();
    end_to_end();
}
