/* ops.h - internal: the op definitions and the plain kernels behind them.
 * Kernels follow llm.c's convention: outputs first, then inputs, then
 * sizes, with a shape comment on every pointer. The naive reference kernels
 * stay beside the fast ones; tests compare them on odd shapes. */
#ifndef KD_OPS_H
#define KD_OPS_H
#include <stdint.h>
#include <string.h>

#include "kd.h"

extern const kd_op_def kd_op_matmul, kd_op_conv2d, kd_op_maxpool, kd_op_avgpool, kd_op_gap, kd_op_batchnorm,
    kd_op_relu, kd_op_gelu, kd_op_dropout, kd_op_add, kd_op_concat, kd_op_reshape, kd_op_softmax,
    kd_op_log_softmax, kd_op_cross_entropy, kd_op_mean, kd_op_sum, kd_op_scale;
/* distillation losses, defined in src/distill/ */
extern const kd_op_def kd_op_divergence, kd_op_dkd, kd_op_dist, kd_op_nkd, kd_op_standardize, kd_op_mse, kd_op_at,
    kd_op_sp, kd_op_rkd, kd_op_pkt;
/* logit2 */
extern const kd_op_def kd_op_mlkd, kd_op_fkl_tnode, kd_op_grad_reverse, kd_op_sigmoid_range;

/* feature2 */
extern const kd_op_def kd_op_vid_nll, kd_op_l2norm, kd_op_crd_infonce, kd_op_crd_nce, kd_op_bn_noaffine,
    kd_op_logsum;
/* rank alignment (src/distill/rank.c) */
extern const kd_op_def kd_op_rank_align;

/* cached top-k teacher (src/distill/topk.c) */
extern const kd_op_def kd_op_topk_divergence, kd_op_topk_dense;

/* language models (src/ops/lm.c) */
extern const kd_op_def kd_op_embedding, kd_op_pos_add, kd_op_layernorm, kd_op_causal_attention;

/* feature3 (src/distill/feature3.c) */
extern const kd_op_def kd_op_haar2d, kd_op_band_mse, kd_op_attn_mask, kd_op_masked_mse, kd_op_gauss_kl;
/* geometry and DCD (src/distill/geometry.c, dcd.c) */
extern const kd_op_def kd_op_procrustes, kd_op_gram_dist, kd_op_cka, kd_op_dcd;
/* LELP (src/distill/lelp.c) */
extern const kd_op_def kd_op_group_lse;
/* teacher annealing (src/distill/anneal.c) */
extern const kd_op_def kd_op_anneal_ce;
/* LLMR policy gradient (src/distill/pg.c) */
extern const kd_op_def kd_op_pg_nll, kd_op_pg_advantage;
/* text classification with rationales (src/ops/textcls.c) */
extern const kd_op_def kd_op_masked_mean, kd_op_token_bce;

/* shape error naming the node and its inputs */
kd_status kd_op_shape_error(const kd_node *n, const char *what);

/* conv2d kernels. out (B,OC,OH,OW), inp (B,C,H,W), w (OC,C,KH,KW), bias (OC) or NULL */
void kd_conv2d_forward_naive(float *out, const float *inp, const float *w, const float *bias, int B, int C, int H,
                             int W, int OC, int KH, int KW, int stride, int pad);
/* col (C*KH*KW, OH*OW) from one image inp (C,H,W) */
void kd_im2col(float *col, const float *inp, int C, int H, int W, int KH, int KW, int stride, int pad, int OH,
               int OW);
/* inp (C,H,W) += col2im(col) */
void kd_col2im(float *inp, const float *col, int C, int H, int W, int KH, int KW, int stride, int pad, int OH,
               int OW);

/* causal self-attention kernels (lm.c), d = C/NH. qkv (B,T,3C) laid out
 * [q | k | v], head h in columns h*d..(h+1)*d-1 of each; out (B,T,C);
 * lse (B,NH,T) the log-sum-exp of each row of scaled scores. The fast
 * kernels spread (b, h) over `threads` OpenMP threads, each using
 * kd_attention_scratch_floats(T) floats of scratch (scratch holds `threads`
 * of them). */
size_t kd_attention_scratch_floats(int T);
void kd_attention_forward(float *out, float *lse, float *scratch, const float *qkv, int B, int T, int C, int NH,
                          int threads);
/* dqkv (B,T,3C) = (accumulate ? dqkv : 0) + gradient, from dout (B,T,C) and
 * the forward's lse */
void kd_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv, const float *lse, int B,
                           int T, int C, int NH, int threads, int accumulate);
/* references: full (T,T) scores in double; lse may be NULL; dqkv assigned */
void kd_attention_forward_naive(float *out, float *lse, const float *qkv, int B, int T, int C, int NH);
void kd_attention_backward_naive(float *dqkv, const float *dout, const float *qkv, int B, int T, int C, int NH);

/* rows R and last-dimension size K of a (..., K) tensor */
static inline void kd_rows_k(const kd_tensor *z, int *R, int *K) {
    *K = z->shape[z->ndim - 1];
    *R = (int)(kd_numel(z) / *K);
}
/* log sum_k exp(x_k * invT) of one row x (K), max-subtracted, in double
 * (src/ops/loss.c) */
double kd_row_lse(const float *x, int K, double invT);

/* exp(x) for softmax and GELU, written so the compiler vectorises it: x = n ln2 + r
 * with n = round(x / ln2) (by the 1.5*2^23 rounding trick, which needs no
 * float-to-int instruction) and |r| <= ln2/2, exp(r) by its Taylor series to
 * r^7 (truncation < 6e-9), 2^n put in the exponent bits. Arguments are
 * clamped to [-87, 88] (results stay normal floats). Measured over every
 * float in that range: relative error <= 7.9e-8 (libm's expf: 6.0e-8). NaN
 * stays NaN. */
static inline float kd_exp_vec(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504f + 12582912.0f; /* low mantissa bits of t hold n */
    float n = t - 12582912.0f;
    float r = x - n * 0.693145752f - n * 1.42860677e-6f; /* ln2 in two parts: n * hi is exact */
    float p =
        1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f +
                                            r * (4.16666679e-2f +
                                                 r * (8.33333377e-3f + r * (1.38888892e-3f + r * 1.98412701e-4f))))));
    uint32_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23; /* (n + 127) << 23 */
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

/* erf(x) that vectorises: Abramowitz & Stegun 7.1.26, erf(|x|) = 1 - poly(t)
 * exp(-x^2) with t = 1/(1 + p|x|): absolute error 1.5e-7 in exact arithmetic,
 * <= 5e-7 measured in float32 (tests/test_ops.c); em = exp(-x^2) is passed in because GELU's
 * backward needs exp(-x^2/2) too. */
static inline float kd_erf_vec(float x, float em) {
    float a = x < 0.0f ? -x : x;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float y = 1.0f - t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f)))) * em;
    return x < 0.0f ? -y : y;
}

static inline int kd_conv_out(int in, int k, int stride, int pad) { return (in + 2 * pad - k) / stride + 1; }

#endif
