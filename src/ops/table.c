/* table.c - the op table: one designated-initialiser entry per op, so names
 * and ids cannot drift apart. Each op family defines its kd_op_def in its
 * own file. */
#include "kd.h"
#include "ops/ops.h"

static const kd_op_def leaf = {.name = "leaf"};

const kd_op_def *const kd_ops[KD_OP_COUNT] = {
    [KD_OP_LEAF] = &leaf,
    [KD_OP_MATMUL] = &kd_op_matmul,
    [KD_OP_CONV2D] = &kd_op_conv2d,
    [KD_OP_MAXPOOL] = &kd_op_maxpool,
    [KD_OP_AVGPOOL] = &kd_op_avgpool,
    [KD_OP_GAP] = &kd_op_gap,
    [KD_OP_BATCHNORM] = &kd_op_batchnorm,
    [KD_OP_RELU] = &kd_op_relu,
    [KD_OP_GELU] = &kd_op_gelu,
    [KD_OP_DROPOUT] = &kd_op_dropout,
    [KD_OP_ADD] = &kd_op_add,
    [KD_OP_CONCAT] = &kd_op_concat,
    [KD_OP_RESHAPE] = &kd_op_reshape,
    [KD_OP_SOFTMAX] = &kd_op_softmax,
    [KD_OP_LOG_SOFTMAX] = &kd_op_log_softmax,
    [KD_OP_CROSS_ENTROPY] = &kd_op_cross_entropy,
    [KD_OP_MEAN] = &kd_op_mean,
    [KD_OP_SUM] = &kd_op_sum,
    [KD_OP_SCALE] = &kd_op_scale,
    [KD_OP_DIVERGENCE] = &kd_op_divergence,
    [KD_OP_DKD] = &kd_op_dkd,
    [KD_OP_DIST] = &kd_op_dist,
    [KD_OP_NKD] = &kd_op_nkd,
    [KD_OP_STANDARDIZE] = &kd_op_standardize,
    [KD_OP_MSE] = &kd_op_mse,
    [KD_OP_AT] = &kd_op_at,
    [KD_OP_SP] = &kd_op_sp,
    [KD_OP_RKD] = &kd_op_rkd,
    [KD_OP_PKT] = &kd_op_pkt,
    /* logit2 */
    [KD_OP_MLKD] = &kd_op_mlkd,
    [KD_OP_FKL_TNODE] = &kd_op_fkl_tnode,
    [KD_OP_GRAD_REVERSE] = &kd_op_grad_reverse,
    [KD_OP_SIGMOID_RANGE] = &kd_op_sigmoid_range,
    /* feature2 */
    [KD_OP_VID_NLL] = &kd_op_vid_nll,
    [KD_OP_L2NORM] = &kd_op_l2norm,
    [KD_OP_CRD_INFONCE] = &kd_op_crd_infonce,
    [KD_OP_CRD_NCE] = &kd_op_crd_nce,
    [KD_OP_BN_NOAFFINE] = &kd_op_bn_noaffine,
    [KD_OP_LOGSUM] = &kd_op_logsum,
    /* rank alignment */
    [KD_OP_RANK_ALIGN] = &kd_op_rank_align,
    /* cached top-k teacher */
    [KD_OP_TOPK_DIVERGENCE] = &kd_op_topk_divergence,
    [KD_OP_TOPK_DENSE] = &kd_op_topk_dense,
    /* language models */
    [KD_OP_EMBEDDING] = &kd_op_embedding,
    [KD_OP_POS_ADD] = &kd_op_pos_add,
    [KD_OP_LAYERNORM] = &kd_op_layernorm,
    [KD_OP_CAUSAL_ATTENTION] = &kd_op_causal_attention,
    /* feature3 */
    [KD_OP_HAAR2D] = &kd_op_haar2d,
    [KD_OP_BAND_MSE] = &kd_op_band_mse,
    [KD_OP_ATTN_MASK] = &kd_op_attn_mask,
    [KD_OP_MASKED_MSE] = &kd_op_masked_mse,
    [KD_OP_GAUSS_KL] = &kd_op_gauss_kl,
    /* geometry and DCD */
    [KD_OP_PROCRUSTES] = &kd_op_procrustes,
    [KD_OP_GRAM_DIST] = &kd_op_gram_dist,
    [KD_OP_CKA] = &kd_op_cka,
    [KD_OP_DCD] = &kd_op_dcd,
    /* LELP */
    [KD_OP_GROUP_LSE] = &kd_op_group_lse,
    /* teacher annealing */
    [KD_OP_ANNEAL_CE] = &kd_op_anneal_ce,
    /* LLMR policy gradient */
    [KD_OP_PG_NLL] = &kd_op_pg_nll,
    [KD_OP_PG_ADVANTAGE] = &kd_op_pg_advantage,
    /* text classification with rationales */
    [KD_OP_MASKED_MEAN] = &kd_op_masked_mean,
    [KD_OP_TOKEN_BCE] = &kd_op_token_bce,
};
