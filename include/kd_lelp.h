/* kd_lelp.h - LELP: linear projections of teacher embeddings for few-class
 * distillation (Loo, Iliopoulos, Hu & Vee 2024; docs/losses/lelp.md).
 *
 * Per class k, the teacher's penultimate embeddings of the class's training
 * examples are (optionally) projected onto the null space of the teacher's
 * output layer, PCA keeps S directions, and (optionally) a random rotation
 * within their span, adjusted by Givens rotations, makes the S coordinates'
 * variances equal. Every example x then gets K*S soft targets
 *     q[k*S + s] = p_k(x) * softmax_s(z_k(x) / T),
 *     z_k,s(x) = <d_k,s, P h(x) - mu_k> / sigma_k
 * (p the teacher's class probabilities, d the directions, mu_k the class
 * mean, sigma_k^2 the mean variance of the kept directions), and the student
 * trains an S*K-way head on them; its class logits are the log-sum-exp of
 * each group of S subclass logits (kd_group_lse).
 *
 *     kd_lelp l;
 *     kd_lelp_opts o = {.S = 5, .T = 1, .null_proj = 1, .rotate = 1, .seed = 7};
 *     kd_lelp_fit(&l, h, labels, N, D, w, K, &o, NULL);   // h (N,D), w (K,D)
 *     kd_lelp_targets(&l, logq, h, t_logits, N);          // logq (N, K*S)
 *     kd_lelp_free(&l);
 */
#ifndef KD_LELP_H
#define KD_LELP_H
#include "kd.h"
#include "kd_data.h"
#include "kd_train.h"

/* x (N, K*S) -> (N, K): y[n,k] = log sum_s exp(x[n, k*S + s]) (max-subtracted);
 * gradient to x: dy[n,k] * softmax over the group. ip[0] = S. A width that
 * S does not divide is a shape error at compile. */
kd_node *kd_group_lse(kd_graph *g, kd_node *x, int S);

/* Symmetric eigen-decomposition by cyclic Jacobi rotations, in double:
 * a (n,n) symmetric (only read); evals (n) in descending order; evecs (n,n)
 * row-major with eigenvector j in column j, each signed so that its
 * largest-magnitude entry (the first, on ties) is positive. Returns the
 * sweeps used (at most 100). */
int kd_sym_eig(double *evals, double *evecs, const double *a, int n);
/* q (n,n) a random orthogonal matrix: the Q of a Gaussian matrix's QR
 * (Gram-Schmidt, twice, so R has a positive diagonal: Haar distributed). */
void kd_random_orthogonal(double *q, int n, kd_rng *r);
/* Givens rotations that make the diagonal of m (S,S, symmetric, updated in
 * place to R^T m R) equal to its mean; r (S,S) is multiplied on the right by
 * the same rotations (pass the identity to get the rotation alone). Each
 * step takes the largest and the smallest diagonal entries left (first
 * index on ties) and rotates their plane so the largest becomes the mean;
 * S-1 steps at most. */
void kd_lelp_equalize(double *m, double *r, int S);

typedef struct kd_lelp_opts {
    int S;         /* pseudo-subclasses per class, >= 1 */
    float T;       /* temperature of the softmax over a class's coordinates, > 0 */
    int null_proj; /* project embeddings onto the null space of the head's weight */
    int rotate;    /* random rotation + equalisation of the kept directions */
    uint64_t seed; /* draws the rotations */
} kd_lelp_opts;

typedef struct kd_lelp {
    int K, D, S, null_proj;
    float T;
    double *u;         /* (K, D) orthonormal basis of the head's row space (null_proj), rank r_u rows */
    int r_u;
    double *mean;      /* (K, D) class means of the (projected) embeddings */
    double *dirs;      /* (K, S, D) direction s of class k */
    double *inv_sigma; /* (K) 1 / sigma_k */
    double *var;       /* (K, S) variance of z_k,s over class k's examples (1 when rotated) */
    double *explained; /* (K) fraction of the class's variance in the kept S directions */
    int *count;        /* (K) examples of each class */
} kd_lelp;

/* Fits the per-class directions. h (N,D) embeddings, labels (N) in [0,K)
 * or negative (not used), w (K,D) the teacher head's weight. rot (K,S,S),
 * row-major per class, replaces the random rotations when not NULL (tests);
 * ignored without o->rotate. Errors (KD_ECONFIG): S or T out of range,
 * S above the dimension left (D, or D minus the head's rank with null_proj),
 * a class with fewer than 2 examples or no variance; messages name the class. */
kd_status kd_lelp_fit(kd_lelp *l, const float *h, const int *labels, int N, int D, const float *w, int K,
                      const kd_lelp_opts *o, const double *rot);
/* The coordinates z (K*S) of one embedding h (D), already divided by T. */
void kd_lelp_coords(const kd_lelp *l, double *z, const float *h);
/* logq (N, K*S) log targets from h (N,D) and the teacher's logits (N,K):
 * log softmax(t)_k + log softmax_s(z_k,s / T). */
void kd_lelp_targets(const kd_lelp *l, float *logq, const float *h, const float *t_logits, int N);
void kd_lelp_free(kd_lelp *l);

/* Runs the teacher (spec, checkpoint ckpt) over ds in eval mode, without
 * augmentation, and writes the LELP log targets of every example into logq
 * (ds->n, K*S); labels of examples at or past ds->labeled (when set) are not
 * used for the fit. fit (may be NULL) receives the fitted kd_lelp (free it).
 * Errors name the checkpoint or the class. */
kd_status kd_lelp_teacher_targets(float *logq, const char *spec, const char *ckpt, const kd_dataset *ds, int batch,
                                  const kd_lelp_opts *o, kd_lelp *fit);

/* The LELP student in one graph: inputs "x", "y", the student (prefix "s.")
 * with an S*K-way head, its class logits "s.class_logits" = group
 * log-sum-exp (d->c.m.logits, so evaluation counts the K real classes), and
 * an input "t.lelp" (B, K*S) of log targets (d->t_logits), filled per
 * batch. In the loss spec, `ce` terms read the class logits and the labels;
 * the divergence terms (kd, fkl, rkl, jsd, tvd, skl, srkl, mse_logits) read
 * the subclass logits against t.lelp; other terms are an error naming them. */
kd_status kd_lelp_distiller_build(kd_distiller *d, const char *student, const char *loss, const kd_dataset *ds, int S,
                                  int max_batch, uint64_t seed);
/* The student's subclass logits (the head's output, N x K*S). */
kd_node *kd_lelp_sub_logits(const kd_distiller *d);
/* dst (B, KS) = rows aug[4*b+3] of logq (n, KS): the batch hook's copy. */
void kd_lelp_fill(float *dst, const float *logq, int KS, const int *aug, int B);

#endif
