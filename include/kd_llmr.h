/* kd_llmr.h - LLMR (Li, Hao & Mou 2024): a language-model student trained by
 * REINFORCE on its own samples, with a per-token reward induced from the
 * teacher's logits read as Q-values. docs/losses/llmr.md is the guide.
 *
 * Notation: a window of T positions; position t holds the state s_t (the
 * tokens up to t) and, where actions (B,T) >= 0, the action a_t taken
 * there (the next token, sampled by the student). q = the teacher's logits
 * (B,T,V), V(s) = logsumexp_a q(s, a).
 *
 *   reward     r_t = q(s_t, a_t) - V(s_{t+1})         (t+1 < T)
 *              r_t = q(s_t, a_t) - V(s_t)             (t = T-1: no next state
 *                                                      in the window; = log p_T(a_t|s_t))
 *   return     G_t = r_t + gamma G_{t+1}              (G_{t+1} = 0 past the last action)
 *   advantage  A_t = G_t - b_t, b_t the mean of G_t over the other sequences
 *              of the batch with an action at t (baseline "batch"), or 0 ("none")
 *   loss       -(1/N) sum over actions of A_t log softmax(z_t)[a_t], A constant
 *
 *     kd_node *adv = kd_pg_advantage(g, t_logits, actions, 1.0f, KD_PG_BASELINE_BATCH);
 *     kd_node *loss = kd_pg_nll(g, s_logits, actions, adv);
 */
#ifndef KD_LLMR_H
#define KD_LLMR_H
#include "kd.h"
#include "kd_lm.h"

/* ---------------------------------------------------------------- kernels */

typedef enum kd_pg_baseline {
    KD_PG_BASELINE_NONE = 0,
    KD_PG_BASELINE_BATCH = 1, /* leave-one-out mean return of the other sequences at the same position */
} kd_pg_baseline;

/* r (B,T): the induced reward at every position with an action (act >= 0),
 * 0 elsewhere; q (B,T,V) the teacher's logits, act (B,T) ids as floats. */
void kd_pg_rewards(float *r, const float *q, const float *act, int B, int T, int V);
/* G (B,T): discounted returns of r over each sequence's actions; 0 where
 * there is no action (a gap ends the sum). */
void kd_pg_returns(float *G, const float *r, const float *act, int B, int T, float gamma);
/* A (B,T): G minus the baseline at positions with an action, 0 elsewhere. */
void kd_pg_advantages(float *A, const float *G, const float *act, int B, int T, kd_pg_baseline baseline);

/* ---------------------------------------------------------------- ops */

/* (B,T) advantages from the teacher's logits q (B,T,V) and the actions
 * (B,T) (ids as floats, < 0: none): rewards, returns and baseline as above.
 * A constant: no gradient flows through it. gamma in [0, 1]. */
kd_node *kd_pg_advantage(kd_graph *g, kd_node *q, kd_node *actions, float gamma, kd_pg_baseline baseline);
/* The policy-gradient loss, a weighted negative log-likelihood: logits
 * (B,T,V) (or (R,V)), actions and weights (B,T) (or (R)); the mean over
 * rows with an action (>= 0) of -w * log softmax(z)[a] -> (1); 0 when no
 * row has an action. Gradient to the logits only. */
kd_node *kd_pg_nll(kd_graph *g, kd_node *logits, kd_node *actions, kd_node *weights);

/* ---------------------------------------------------------------- training */

typedef struct kd_llmr_opts {
    int64_t steps;           /* REINFORCE steps */
    float gamma;             /* discount of the return */
    kd_pg_baseline baseline;
} kd_llmr_opts;

/* Trains lm's student (which must have a teacher in its graph: lm->t_mix
 * from one online teacher) for lo->steps REINFORCE steps: each batch is B
 * prompts of o->prompt data tokens continued by the student (o->sample),
 * scored by the teacher. Optimiser, schedule, batch, logging and the final
 * validation come from o (o->steps is ignored; the schedule spans
 * lo->steps). Builds a second graph (student + teacher + the LLMR loss),
 * copies the weights into it and, at the end, the student's back into lm.
 * metrics.jsonl rows carry role o->role, "loss" (the surrogate), "reward"
 * (mean induced reward per sampled token) and "t_nll" (the teacher's NLL of
 * the samples). */
kd_status kd_llmr_train(kd_lm *lm, const kd_text_data *d, const kd_lm_train_opts *o, const kd_llmr_opts *lo,
                        kd_log *log, kd_lm_train_result *res);

typedef struct kd_llmr_sample_eval {
    double t_nll;  /* the teacher's mean NLL per sampled token (nats) */
    double s_nll;  /* the student's own mean NLL per sampled token */
    int64_t tokens;
} kd_llmr_sample_eval;

/* Samples n continuations from the student (lm's live weights): prompts are
 * the first `prompt` tokens of validation windows 0..n-1 (in order; the
 * split must hold n windows of lm->seq), continued to the window's end with
 * `so` and rng seeded by seed; the teacher (lm->t_mix) scores them. */
kd_status kd_llmr_sample_eval_run(kd_lm *lm, const kd_text_data *d, int n, int prompt, const kd_sample_opts *so,
                                  uint64_t seed, kd_llmr_sample_eval *out);

#endif
