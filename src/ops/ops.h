/* ops.h - internal: the op definitions and the plain kernels behind them.
 * Kernels follow llm.c's convention: outputs first, then inputs, then
 * sizes, with a shape comment on every pointer. The naive reference kernels
 * stay beside the fast ones; tests compare them on odd shapes. */
#ifndef KD_OPS_H
#define KD_OPS_H
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
extern const kd_op_def kd_op_topk_divergence;

/* language models (src/ops/lm.c) */
extern const kd_op_def kd_op_embedding, kd_op_pos_add, kd_op_layernorm, kd_op_causal_attention;

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

static inline int kd_conv_out(int in, int k, int stride, int pad) { return (in + 2 * pad - k) / stride + 1; }

#endif
