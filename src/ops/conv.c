/* conv.c - 2-D convolution (groups=1) as im2col + GEMM.
 *
 * Forward, per image: col (C*KH*KW, OH*OW) = im2col(x_b), then
 * y_b (OC, OH*OW) = w (OC, C*KH*KW) col (+ bias). Images are spread over
 * OpenMP threads; each thread owns a column buffer and calls a
 * single-threaded sgemm (OpenBLAS's OpenMP build does not nest threads).
 * 1x1 convolutions with stride 1 and no padding skip im2col.
 *
 * Backward, per image: dW += dy_b col^T into a per-thread partial that is
 * reduced in thread order afterwards (deterministic for a fixed thread
 * count), dx_b = col2im(w^T dy_b). im2col is recomputed rather than saved:
 * saving it would cost B*C*KH*KW*OH*OW floats (115 MB for the reference
 * teacher's second layer at batch 128).
 *
 * ip: [0] stride, [1] pad.
 */
#include <cblas.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops/ops.h"

/* stride 1 with OW == W ("same" width): each (c, kh, kw) block of the column
 * matrix is the image shifted by (kh-pad, kw-pad); copy it as one flat run
 * and zero the rows and the column that fall outside the image. */
static void im2col_same(float *col, const float *inp, int C, int H, int W, int KH, int KW, int pad, int OH) {
    for (int c = 0; c < C; c++)
        for (int kh = 0; kh < KH; kh++)
            for (int kw = 0; kw < KW; kw++) {
                float *restrict dst = col + ((size_t)(c * KH + kh) * KW + kw) * OH * W;
                const float *restrict src = inp + (size_t)c * H * W;
                int dy = kh - pad, dx = kw - pad;
                int r0 = dy < 0 ? -dy : 0, r1 = H - dy < OH ? H - dy : OH;
                if (r1 < r0) r1 = r0;
                for (size_t i = 0; i < (size_t)r0 * W; i++) dst[i] = 0.0f;
                for (size_t i = (size_t)r1 * W; i < (size_t)OH * W; i++) dst[i] = 0.0f;
                if (r1 == r0) continue;
                /* flat range [r0*W, r1*W), reading src at +dy*W+dx; skip the
                 * first/last |dx| elements, which would read outside */
                long j0 = (long)r0 * W + (dx < 0 ? -dx : 0), j1 = (long)r1 * W - (dx > 0 ? dx : 0);
                long off = (long)dy * W + dx;
                for (long j = j0; j < j1; j++) dst[j] = src[j + off];
                /* columns whose source wrapped to the neighbouring row */
                for (int r = r0; r < r1; r++) {
                    for (int ow = 0; ow < -dx; ow++) dst[(size_t)r * W + ow] = 0.0f;
                    for (int ow = W - dx; ow < W; ow++) dst[(size_t)r * W + ow] = 0.0f;
                }
            }
}

void kd_im2col(float *col, const float *inp, int C, int H, int W, int KH, int KW, int stride, int pad, int OH,
               int OW) {
    if (stride == 1 && OW == W && pad < W) {
        im2col_same(col, inp, C, H, W, KH, KW, pad, OH);
        return;
    }
    for (int c = 0; c < C; c++)
        for (int kh = 0; kh < KH; kh++)
            for (int kw = 0; kw < KW; kw++) {
                float *dst = col + ((size_t)(c * KH + kh) * KW + kw) * OH * OW;
                for (int oh = 0; oh < OH; oh++) {
                    int ih = oh * stride - pad + kh;
                    float *d = dst + (size_t)oh * OW;
                    if (ih < 0 || ih >= H) {
                        for (int ow = 0; ow < OW; ow++) d[ow] = 0.0f;
                        continue;
                    }
                    const float *src = inp + ((size_t)c * H + ih) * W;
                    if (stride == 1) {
                        /* iw = ow - pad + kw is inside [0, W) for ow in [lo, hi) */
                        int lo = pad - kw > 0 ? pad - kw : 0;
                        int hi = W + pad - kw < OW ? W + pad - kw : OW;
                        if (hi < lo) hi = lo;
                        if (lo > OW) lo = hi = OW;
                        /* plain loops: rows are short (28 floats), where
                         * memcpy/memset calls cost more than the copy */
                        const float *restrict sp = src - pad + kw;
                        float *restrict dp = d;
                        for (int ow = 0; ow < lo; ow++) dp[ow] = 0.0f;
                        for (int ow = lo; ow < hi; ow++) dp[ow] = sp[ow];
                        for (int ow = hi; ow < OW; ow++) dp[ow] = 0.0f;
                    } else {
                        for (int ow = 0; ow < OW; ow++) {
                            int iw = ow * stride - pad + kw;
                            d[ow] = (iw >= 0 && iw < W) ? src[iw] : 0.0f;
                        }
                    }
                }
            }
}

void kd_col2im(float *inp, const float *col, int C, int H, int W, int KH, int KW, int stride, int pad, int OH,
               int OW) {
    for (int c = 0; c < C; c++)
        for (int kh = 0; kh < KH; kh++)
            for (int kw = 0; kw < KW; kw++) {
                const float *src = col + ((size_t)(c * KH + kh) * KW + kw) * OH * OW;
                /* ow whose iw = ow*stride - pad + kw lies in [0, W) */
                int lo = 0, hi = OW;
                while (lo < OW && lo * stride - pad + kw < 0) lo++;
                while (hi > lo && (hi - 1) * stride - pad + kw >= W) hi--;
                for (int oh = 0; oh < OH; oh++) {
                    int ih = oh * stride - pad + kh;
                    if (ih < 0 || ih >= H) continue;
                    float *restrict d = inp + ((size_t)c * H + ih) * W;
                    const float *restrict s = src + (size_t)oh * OW;
                    if (stride == 1) {
                        float *restrict dd = d - pad + kw;
#pragma omp simd
                        for (int ow = lo; ow < hi; ow++) dd[ow] += s[ow];
                    } else {
                        for (int ow = lo; ow < hi; ow++) d[ow * stride - pad + kw] += s[ow];
                    }
                }
            }
}

void kd_conv2d_forward_naive(float *out, const float *inp, const float *w, const float *bias, int B, int C, int H,
                             int W, int OC, int KH, int KW, int stride, int pad) {
    int OH = kd_conv_out(H, KH, stride, pad), OW = kd_conv_out(W, KW, stride, pad);
    for (int b = 0; b < B; b++)
        for (int o = 0; o < OC; o++)
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++) {
                    double acc = bias ? bias[o] : 0.0;
                    for (int c = 0; c < C; c++)
                        for (int kh = 0; kh < KH; kh++)
                            for (int kw = 0; kw < KW; kw++) {
                                int ih = oh * stride - pad + kh, iw = ow * stride - pad + kw;
                                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                                acc += (double)inp[(((size_t)b * C + c) * H + ih) * W + iw] *
                                       w[(((size_t)o * C + c) * KH + kh) * KW + kw];
                            }
                    out[(((size_t)b * OC + o) * OH + oh) * OW + ow] = (float)acc;
                }
}

typedef struct geom {
    int B, C, H, W, OC, KH, KW, OH, OW, stride, pad, ckk, ohw, direct;
    int flip;      /* dx by convolving dy with the flipped kernel (stride 1) */
    size_t dcol_n; /* floats of the per-thread dx column buffer */
} geom;

static geom geom_of(const kd_node *n) {
    const kd_tensor *x = &n->in[0]->val, *w = &n->in[1]->val;
    geom g = {.B = x->shape[0], .C = x->shape[1], .H = x->shape[2], .W = x->shape[3], .OC = w->shape[0],
              .KH = w->shape[2], .KW = w->shape[3], .stride = n->ip[0], .pad = n->ip[1]};
    g.OH = kd_conv_out(g.H, g.KH, g.stride, g.pad);
    g.OW = kd_conv_out(g.W, g.KW, g.stride, g.pad);
    g.ckk = g.C * g.KH * g.KW;
    g.ohw = g.OH * g.OW;
    g.direct = g.KH == 1 && g.KW == 1 && g.stride == 1 && g.pad == 0;
    g.flip = !g.direct && g.stride == 1 && g.pad <= g.KH - 1 && g.pad <= g.KW - 1;
    g.dcol_n = g.flip ? (size_t)g.OC * g.KH * g.KW * g.H * g.W : (size_t)g.ckk * g.ohw;
    return g;
}

static kd_status conv_infer(kd_node *n) {
    const kd_tensor *x = &n->in[0]->val, *w = &n->in[1]->val;
    if (x->ndim != 4 || w->ndim != 4 || x->shape[1] != w->shape[1])
        return kd_op_shape_error(n, "conv2d needs x (B, C, H, W) and weight (OC, C, KH, KW)");
    if (n->n_in > 2 && (n->in[2]->val.ndim != 1 || n->in[2]->val.shape[0] != w->shape[0]))
        return kd_op_shape_error(n, "conv2d bias must be (OC)");
    geom g = geom_of(n);
    if (g.stride < 1 || g.pad < 0 || g.OH < 1 || g.OW < 1)
        return kd_op_shape_error(n, "conv2d output would be empty (input smaller than the kernel)");
    n->val.ndim = 4;
    n->val.shape[0] = g.B;
    n->val.shape[1] = g.OC;
    n->val.shape[2] = g.OH;
    n->val.shape[3] = g.OW;
    return KD_OK;
}

/* per thread: col (ckk*ohw), dcol (dcol_n), dW partial (OC*ckk), db partial
 * (OC); after all threads' areas, the flipped kernel (C, OC*KH*KW) */
static size_t conv_thread_floats(const geom *g) {
    return (size_t)g->ckk * g->ohw + g->dcol_n + (size_t)g->OC * g->ckk + (size_t)g->OC + 32;
}

static size_t conv_ws(const kd_node *n, int threads) {
    geom g = geom_of(n);
    return ((size_t)threads * conv_thread_floats(&g) + (size_t)g.OC * g.ckk) * sizeof(float);
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static void conv_forward(kd_node *n, const kd_ctx *ctx) {
    geom g = geom_of(n);
    const float *x = n->in[0]->val.data, *w = n->in[1]->val.data;
    const float *bias = n->n_in > 2 ? n->in[2]->val.data : NULL;
    float *y = n->val.data, *ws = n->ws;
    size_t per = conv_thread_floats(&g);
#pragma omp parallel for num_threads(ctx->threads) schedule(static)
    for (int b = 0; b < g.B; b++) {
        float *col = ws + (size_t)thread_id() * per;
        const float *xb = x + (size_t)b * g.C * g.H * g.W;
        float *yb = y + (size_t)b * g.OC * g.ohw;
        if (!g.direct) kd_im2col(col, xb, g.C, g.H, g.W, g.KH, g.KW, g.stride, g.pad, g.OH, g.OW);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g.OC, g.ohw, g.ckk, 1.0f, w, g.ckk,
                    g.direct ? xb : col, g.ohw, 0.0f, yb, g.ohw);
        if (bias)
            for (int o = 0; o < g.OC; o++)
                for (int i = 0; i < g.ohw; i++) yb[(size_t)o * g.ohw + i] += bias[o];
    }
}

/* dx for stride 1: dx[c,i,j] = sum_{o,kh,kw} w[o,c,kh,kw] dy[o, i+pad-kh, j+pad-kw]
 * is a convolution of dy, padded by KH-1-pad, with wt[c,o,kh',kw'] =
 * w[o,c,KH-1-kh',KW-1-kw']. As im2col + GEMM its inner dimension is
 * OC*KH*KW instead of OC, and there is no scatter (col2im). */
static void flip_kernel(float *wt, const float *w, const geom *g) {
    int KK = g->KH * g->KW;
    for (int o = 0; o < g->OC; o++)
        for (int c = 0; c < g->C; c++)
            for (int k = 0; k < KK; k++)
                wt[(size_t)c * g->OC * KK + (size_t)o * KK + (KK - 1 - k)] = w[((size_t)o * g->C + c) * KK + k];
}

static void conv_backward(kd_node *n, const kd_ctx *ctx) {
    geom g = geom_of(n);
    kd_node *X = n->in[0], *Wn = n->in[1], *Bn = n->n_in > 2 ? n->in[2] : NULL;
    int need_x = (X->flags & KD_F_NEED_GRAD) != 0, need_w = (Wn->flags & KD_F_NEED_GRAD) != 0;
    int need_b = Bn && (Bn->flags & KD_F_NEED_GRAD);
    int fresh = need_x && kd_grad_take_fresh(X);
    const float *x = X->val.data, *w = Wn->val.data, *dy = n->grad.data;
    float *ws = n->ws;
    size_t per = conv_thread_floats(&g);
    int T = ctx->threads;
    float *wt = ws + (size_t)T * per;
    if (need_x && g.flip) flip_kernel(wt, w, &g);
    size_t part = (size_t)g.ckk * g.ohw + g.dcol_n;
    for (int t = 0; t < T; t++) memset(ws + (size_t)t * per + part, 0, ((size_t)g.OC * g.ckk + g.OC) * sizeof(float));
    int tp = g.KH - 1 - g.pad; /* padding of the flipped convolution */
#pragma omp parallel for num_threads(T) schedule(static)
    for (int b = 0; b < g.B; b++) {
        float *base = ws + (size_t)thread_id() * per;
        float *col = base, *dcol = base + (size_t)g.ckk * g.ohw;
        float *dw = base + part, *db = dw + (size_t)g.OC * g.ckk;
        const float *xb = x + (size_t)b * g.C * g.H * g.W;
        const float *dyb = dy + (size_t)b * g.OC * g.ohw;
        if (need_w) {
            if (!g.direct) kd_im2col(col, xb, g.C, g.H, g.W, g.KH, g.KW, g.stride, g.pad, g.OH, g.OW);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g.OC, g.ckk, g.ohw, 1.0f, dyb, g.ohw,
                        g.direct ? xb : col, g.ohw, 1.0f, dw, g.ckk);
        }
        if (need_b)
            for (int o = 0; o < g.OC; o++) {
                float s = 0.0f;
                for (int i = 0; i < g.ohw; i++) s += dyb[(size_t)o * g.ohw + i];
                db[o] += s;
            }
        if (need_x) {
            float *dxb = X->grad.data + (size_t)b * g.C * g.H * g.W;
            int HW = g.H * g.W, okk = g.OC * g.KH * g.KW;
            float beta = fresh ? 0.0f : 1.0f;
            if (g.direct) {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, g.ckk, g.ohw, g.OC, 1.0f, w, g.ckk, dyb, g.ohw,
                            beta, dxb, g.ohw);
            } else if (g.flip) {
                kd_im2col(dcol, dyb, g.OC, g.OH, g.OW, g.KH, g.KW, 1, tp, g.H, g.W);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g.C, HW, okk, 1.0f, wt, okk, dcol, HW, beta,
                            dxb, HW);
            } else {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, g.ckk, g.ohw, g.OC, 1.0f, w, g.ckk, dyb, g.ohw,
                            0.0f, dcol, g.ohw);
                if (fresh) memset(dxb, 0, (size_t)HW * g.C * sizeof *dxb);
                kd_col2im(dxb, dcol, g.C, g.H, g.W, g.KH, g.KW, g.stride, g.pad, g.OH, g.OW);
            }
        }
    }
    for (int t = 0; t < T; t++) {
        const float *dw = ws + (size_t)t * per + part, *db = dw + (size_t)g.OC * g.ckk;
        if (need_w)
            for (size_t i = 0; i < (size_t)g.OC * g.ckk; i++) Wn->grad.data[i] += dw[i];
        if (need_b)
            for (int o = 0; o < g.OC; o++) Bn->grad.data[o] += db[o];
    }
}

const kd_op_def kd_op_conv2d = {.name = "conv2d",
                                .infer = conv_infer,
                                .workspace = conv_ws,
                                .forward = conv_forward,
                                .backward = conv_backward,
                                .grad_overwrite = 1,
                                .ws_scratch = 1};

kd_node *kd_conv2d(kd_graph *g, kd_node *x, kd_node *w, kd_node *b, int stride, int pad) {
    KD_ASSERT(stride >= 1 && pad >= 0, "conv2d stride %d pad %d", stride, pad);
    kd_node *in[3] = {x, w, b};
    int ip[8] = {stride, pad};
    return kd_graph_add_op_ex(g, KD_OP_CONV2D, b ? 3 : 2, in, ip, NULL);
}

kd_node *kd_conv(kd_graph *g, const char *prefix, kd_node *x, int out, int k, int stride, int pad, int bias) {
    int C = x->val.ndim == 4 ? x->val.shape[1] : 1;
    char name[96];
    int ws[4] = {out, C, k, k}, bs[1] = {out};
    snprintf(name, sizeof name, "%s.weight", prefix);
    kd_node *w = kd_param(g, name, 4, ws, KD_INIT_UNIFORM_FANIN, C * k * k);
    kd_node *b = NULL;
    if (bias) {
        snprintf(name, sizeof name, "%s.bias", prefix);
        b = kd_param(g, name, 1, bs, KD_INIT_UNIFORM_FANIN, C * k * k);
    }
    kd_node *y = kd_conv2d(g, x, w, b, stride, pad);
    kd_node_set_name(y, "%s", prefix);
    return y;
}
