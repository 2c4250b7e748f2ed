/* kd_distill.h - distillation loss ops and the teacher->student graph.
 *
 * Definitions follow ../shared/LOSSES.md (docs/losses/ has a page per
 * loss). Conventions shared by every loss op:
 *   - s is the student's tensor, t the teacher's; logits are (N, K).
 *   - Logit losses are summed over K and averaged over the rows kept
 *     ("batchmean"); `mask` (N) may be NULL (all rows kept) or hold 1/0 per
 *     row (language models: padding).
 *   - Logit losses give gradients to s only: the teacher side is treated as
 *     detached (as `t.detach()` in the PyTorch references), also when it is
 *     another trainable student (mutual learning).
 *   - Feature/relation losses (mse, at, sp, rkd, pkt) give gradients to
 *     both inputs when they need them (a trainable projector may sit on
 *     either side).
 *   - Every op outputs a scalar (1); weights are applied with kd_scale.
 */
#ifndef KD_DISTILL_H
#define KD_DISTILL_H
#include "kd.h"

typedef enum kd_div_kind {
    KD_DIV_FKL,  /* KL(p_t || p_s) */
    KD_DIV_RKL,  /* KL(p_s || p_t) */
    KD_DIV_JSD,  /* beta*KL(p_t||m) + (1-beta)*KL(p_s||m), m = beta*p_t + (1-beta)*p_s */
    KD_DIV_TVD,  /* 1/2 sum |p_t - p_s| */
    KD_DIV_SKL,  /* KL(p_t || alpha*p_t + (1-alpha)*p_s) */
    KD_DIV_SRKL, /* KL(p_s || alpha*p_s + (1-alpha)*p_t) */
} kd_div_kind;

/* p = softmax(z / T) per row; the divergence, summed over K, averaged over
 * kept rows, times `scale` (callers pass T*T for kd/fkl/rkl). `param` is
 * beta for JSD, alpha for SKL/SRKL, unused otherwise.
 * ip[0] kind; fp[0] T, fp[1] param, fp[2] scale. */
kd_node *kd_divergence(kd_graph *g, kd_node *s, kd_node *t, kd_node *mask, kd_div_kind kind, float T, float param,
                       float scale);
/* The same divergence against a teacher known only through a top-k cache
 * (src/distill/topk.c, docs/losses/topk.md): s (..., V) student logits;
 * t_ids (..., k) the teacher's ids as floats (distinct integers in [0, V)
 * per row, asserted), t_logp (..., k) its log-probabilities at the same T;
 * 1 <= k <= V. Both sides are coarse-grained onto the k ids plus one tail
 * bucket (teacher tail 1 - sum q, clamped at 0; student tail by a
 * log-sum-exp over the other ids), and the divergence of kind is taken
 * there: a lower bound of the dense one, equal to it for k = V. Masked
 * rows (mask (R), 0 = skip) are neither computed nor checked. Averaged over
 * kept rows, times scale; gradient to s only.
 * ip[0] kind; fp[0] T, fp[1] param, fp[2] scale. */
kd_node *kd_topk_divergence(kd_graph *g, kd_node *s, kd_node *t_ids, kd_node *t_logp, kd_node *mask, kd_div_kind kind,
                            float T, float param, float scale);
/* A cached teacher as dense log-probability rows (..., V): the k cached
 * values at their ids, the leftover mass spread evenly over the other ids.
 * A constant; lets rank terms (rlkd) read a top-k cache. */
kd_node *kd_topk_dense(kd_graph *g, kd_node *t_ids, kd_node *t_logp, int V);
/* Decoupled KD (Zhao et al. 2022) without the warm-up factor (apply it with
 * a kd_scale node): T^2 * (alpha*KL(b_t||b_s) + beta*KL(q_t||q_s)), where b
 * is the binary [p_y, 1-p_y] and q the softmax over non-target classes. */
kd_node *kd_dkd(kd_graph *g, kd_node *s, kd_node *t, kd_node *labels, float alpha, float beta, float T);
/* DIST (Huang et al. 2022): tau^2 * (beta*inter + gamma*intra) on softmax(z/tau) */
kd_node *kd_dist(kd_graph *g, kd_node *s, kd_node *t, float beta, float gamma, float tau);
/* Normalised KD (Yang et al. 2023) as in LOSSES.md */
kd_node *kd_nkd(kd_graph *g, kd_node *s, kd_node *t, kd_node *labels, float T, float gamma);
/* Row-wise z-score: (z - mean) / (std + 1e-7), std with Bessel's correction
 * (logit standardisation, Sun et al. 2024). Not a loss: (N,K) -> (N,K),
 * gradient to its input. */
kd_node *kd_standardize(kd_graph *g, kd_node *z);
/* mean over all elements of (a - b)^2 (mse_logits, FitNets) */
kd_node *kd_mse(kd_graph *g, kd_node *a, kd_node *b);
/* Attention transfer: a(f) = normalize_L2(mean_c |f_c|^p) over H*W per
 * example; loss = mean over N*H*W of (a_s - a_t)^2. fs, ft (N,C,H,W) with
 * the same N,H,W (channels may differ). */
kd_node *kd_at(kd_graph *g, kd_node *fs, kd_node *ft, float p);
/* Similarity-preserving: G = row-L2-normalised F F^T over the flattened
 * (N, D) features; ||G_s - G_t||_F^2 / N^2 */
kd_node *kd_sp(kd_graph *g, kd_node *fs, kd_node *ft);
/* RKD: w_dist * distance loss + w_angle * angle loss (smooth L1, distances
 * normalised by their mean), on flattened (N, D) features */
kd_node *kd_rkd(kd_graph *g, kd_node *fs, kd_node *ft, float w_dist, float w_angle);
/* PKT: cosine-similarity kernels mapped to [0,1], rows normalised, KL(t||s) */
kd_node *kd_pkt(kd_graph *g, kd_node *fs, kd_node *ft);

/* logit2 (src/distill/logit2.c) */
/* MLKD (Jin et al. 2023) at one temperature T, P = softmax(z/T) over the
 * N kept rows: w_inst T^2 mean_n KL(q_n||p_n) + w_batch ||P_s P_s^T -
 * P_t P_t^T||_F^2 / N + w_class ||P_s^T P_s - P_t^T P_t||_F^2 / K.
 * The mlkd loss sums one node per temperature. mask (N) may be NULL. */
kd_node *kd_mlkd(kd_graph *g, kd_node *s, kd_node *t, kd_node *mask, float T, float w_inst, float w_batch,
                 float w_class);
/* T^2 KL(p_t || p_s) on softmax(z/T), batchmean, with T a node: one value
 * (1) or one per row (N), all > 0; gradients to s and to T (CTKD). */
kd_node *kd_fkl_tnode(kd_graph *g, kd_node *s, kd_node *t, kd_node *T, kd_node *mask);
/* Gradient reversal: forward identity, backward -lambda * upstream;
 * lambda is fp[0] of the returned node, which a schedule may change. */
kd_node *kd_grad_reverse(kd_graph *g, kd_node *x, float lambda);
/* lo + (hi - lo) * sigmoid(x + offset), element-wise (a bounded learned
 * temperature) */
kd_node *kd_sigmoid_range(kd_graph *g, kd_node *x, float lo, float hi, float offset);

/* feature2 (src/distill/feature2.c; docs/losses/feature2.md) */
/* VID (Ahn et al. 2019), as RepDistiller's VIDLoss: var_c = softplus(alpha0
 * + alpha_c) + eps, loss = mean over all elements of 0.5 ((mu - t)^2 / var_c
 * + log var_c). mu, t (N, C, ...) same shape, alpha (C); gradients to all
 * three. alpha0 is a constant offset (0 for the plain parametrisation). */
kd_node *kd_vid_nll(kd_graph *g, kd_node *mu, kd_node *t, kd_node *alpha, float alpha0, float eps);
/* Rows of x (N, ...) divided by their L2 norm (clamped at 1e-12). */
kd_node *kd_l2norm(kd_graph *g, kd_node *x);
/* Symmetric InfoNCE with in-batch negatives on embeddings (N, D):
 * A = zs zt^T / T; mean_i CE(A_i., i) + mean_j CE(A_.j, j). */
kd_node *kd_crd_infonce(kd_graph *g, kd_node *zs, kd_node *zt, float T);
/* CRD's memory-bank NCE (Tian et al. 2020; RepDistiller's ContrastMemory +
 * ContrastLoss): zs, zt (N, D) normalised embeddings, idx (N) dataset
 * indices as floats; two n_data x D banks in the node's workspace, K
 * uniform negatives per anchor, temperature T, momentum update of the rows
 * idx after each training forward (visible from the next forward). The sum
 * of the student-anchor and teacher-anchor losses; gradients to zs, zt. */
kd_node *kd_crd_nce(kd_graph *g, kd_node *zs, kd_node *zt, kd_node *idx, int n_data, int K, float T, float momentum);
/* After compile: bank `side` (0 student embeddings, 1 teacher) of a crd_nce
 * node, n_data x D floats. Calling it before the first forward means the
 * caller fills the bank (no random initialisation then). */
float *kd_crd_bank(kd_node *n, int side);
/* Batch norm without affine parameters or running statistics: per channel
 * (dim 1) over all other dims, biased variance, always batch statistics. */
kd_node *kd_bn_noaffine(kd_graph *g, kd_node *x, float eps);
/* log(sum over all elements of |a - b|^alpha), alpha >= 1 (the LogSum
 * distance of Miles & Mikolajczyk 2024); gradients to both. */
kd_node *kd_logsum(kd_graph *g, kd_node *a, kd_node *b, float alpha);

/* rank alignment (src/distill/rank.c; docs/losses/rlkd.md) */
/* RLKD (Peng & Zhang, COLING 2025): per row of s, t (..., V), the peaks P
 * are the union of the teacher's and the student's top-k ids (ties toward
 * the lower id); with soft ranks r_i = 1 + sum_{j!=i} sigmoid((z_j - z_i)
 * / tau) of s[P] and of t[P], the loss is the mean over kept rows of 1 -
 * Pearson(r_s, r_t) (a differentiable 1 - Spearman). Gradient to s only;
 * mask (rows) may be NULL. 2 <= k <= V (k > V: a shape error at
 * compile), tau > 0. */
kd_node *kd_rank_align(kd_graph *g, kd_node *s, kd_node *t, kd_node *mask, int k, float tau);

/* feature3 (src/distill/feature3.c; docs/losses/feature3.md) */
/* Single-level orthonormal 2-D Haar transform: x (B, C, H, W) -> (B, 4C,
 * ceil(H/2), ceil(W/2)), bands LL, LH, HL, HH stacked along dim 1 (band k
 * of channel c at k*C + c); odd H or W are zero-padded at the bottom/right.
 * Per 2x2 block [[p, q], [r, s]]: LL = (p+q+r+s)/2, LH = (p-q+r-s)/2,
 * HL = (p+q-r-s)/2, HH = (p-q-r+s)/2. Gradient to x. */
kd_node *kd_haar2d(kd_graph *g, kd_node *x);
/* a, b (B, n_bands*C, ...) of one shape: sum over bands k of w[k] times the
 * sum of (a - b)^2 over band k's channels (k*C .. k*C+C-1 of dim 1), all
 * divided by numel(a); all weights 1 = plain MSE. 1 <= n_bands <= 8;
 * gradients to both. */
kd_node *kd_band_mse(kd_graph *g, kd_node *a, kd_node *b, int n_bands, const float *w);
/* SoKD's mutual attention mask: fs (B, Cs, ...), ft (B, Ct, ...) with the
 * same B and trailing dims (I positions) -> (B, 1, ...): per example
 * a = mean_c |f_c|, u = a / (mean(a) + 1e-6), M = I * softmax((u_s + u_t) /
 * tau) over the I positions (the renormalised product of the two softmax
 * maps; mean 1). detach = 1: no gradient into fs, ft (a constant mask). */
kd_node *kd_attn_mask(kd_graph *g, kd_node *fs, kd_node *ft, float tau, int detach);
/* a, b (B, C, ...) of one shape, m (B, 1, ...): sum of m (a - b)^2 (m
 * broadcast over C) divided by numel(a); gradients to a, b and m. */
kd_node *kd_masked_mse(kd_graph *g, kd_node *a, kd_node *b, kd_node *m);
/* KL(N(mu_t, exp(lv_t)) || N(mu_s, exp(lv_s))) of diagonal Gaussians, all
 * four (N, D): summed over D, averaged over N; gradients to all four. */
kd_node *kd_gauss_kl(kd_graph *g, kd_node *mu_s, kd_node *lv_s, kd_node *mu_t, kd_node *lv_t);
/* geometry and DCD (src/distill/geometry.c, dcd.c; docs/losses/geometry.md,
 * docs/losses/dcd.md) */
/* Geometry-aware alignment (Bhattarai et al. 2025). fs (B, ...) and ft
 * (B, ...) are viewed as (B, Ds) and (B, Dt) (widths may differ) and each
 * is centred over the batch and scaled to unit Frobenius norm: Xs, Xt.
 * Gradients to both inputs. A side whose centred features are all zero
 * (B = 1) gets no gradient. */
/* 2 - 2 |Xt^T Xs|_* (Procrustes distance; nuclear norm by a Jacobi SVD in
 * double). ip[0] of the node: 0 picks the cheaper of the direct (Dt x Ds)
 * and reduced (B x B) computation, 1 forces direct, 2 reduced (set before
 * compile). Differentiable where Xt^T Xs has the rank of Xs and Xt. */
kd_node *kd_procrustes(kd_graph *g, kd_node *fs, kd_node *ft);
/* |Xt Xt^T - Xs Xs^T|_F (feature-Gram distance; gradient 0 where it is 0) */
kd_node *kd_gram_dist(kd_graph *g, kd_node *fs, kd_node *ft);
/* 1 - linear CKA = 1 - <Ks, Kt>_F / (|Ks|_F |Kt|_F), K = X X^T */
kd_node *kd_cka(kd_graph *g, kd_node *fs, kd_node *ft);

/* DCD (Giakoumoglou & Stathaki 2024) on normalised embeddings zs, zt (N,
 * D): logits L = scale zs zt^T + b with scale = min(exp(log_scale0 +
 * log_scale), max_scale), b = bias0 + bias (log_scale, bias: (1) nodes,
 * usually parameters); loss = w_nce * mean_i CE(L_i., i) + w_kl * KL(Q || P),
 * P the row softmax of L, Q per `consist`. Gradients to zs, zt, log_scale
 * and bias (whose gradient is 0: a shared bias cancels in a softmax). */
typedef enum kd_dcd_consist {
    KD_DCD_CROSS,   /* Q = (column softmax of L)^T: teacher i vs student keys (the authors' code) */
    KD_DCD_TEACHER, /* Q = row softmax of scale zt zt^T + b, detached (teacher-teacher) */
} kd_dcd_consist;
typedef struct kd_dcd_args {
    int consist; /* kd_dcd_consist */
    float log_scale0, bias0, max_scale, w_nce, w_kl;
} kd_dcd_args;
kd_node *kd_dcd(kd_graph *g, kd_node *zs, kd_node *zt, kd_node *log_scale, kd_node *bias, const kd_dcd_args *a);

/* teacher annealing (src/distill/anneal.c; docs/losses/multitask.md) */
/* Cross-entropy of softmax(s) against q = lambda softmax(t/T) + (1 - lambda)
 * onehot(y), averaged over rows; s, t (R, K), labels (R) as floats (a
 * negative label: q = softmax(t/T) for that row). lambda in [0, 1] is fp[1]
 * of the node, which a schedule changes between steps. Gradient to s only. */
kd_node *kd_anneal_ce(kd_graph *g, kd_node *s, kd_node *t, kd_node *labels, float T, float lambda);

#endif
