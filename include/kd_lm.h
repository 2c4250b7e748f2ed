/* kd_lm.h - language models: a GPT student (and its teachers) on windows of
 * tokens, next-token cross-entropy, token-level distillation (online
 * teachers, a top-k teacher cache, sequence-level KD on teacher samples,
 * on-policy distillation on student samples), validation loss, perplexity
 * and teacher-student agreement, checkpoints. docs/lm.md is the guide.
 */
#ifndef KD_LM_H
#define KD_LM_H
#include "kd.h"
#include "kd_gpt.h"
#include "kd_io.h"
#include "kd_lora.h"
#include "kd_losses.h"
#include "kd_nn.h"
#include "kd_optim.h"
#include "kd_text.h"
#include "kd_train.h"

typedef struct kd_lm_setup {
    const char *student; /* "gpt: ..." */
    const char *loss;    /* loss spec; NULL or "": next-token cross-entropy alone */
    int n_teachers;      /* frozen teachers in the graph (prefixes "t.", "t1.", ...) */
    const char *teachers[KD_MAX_TEACHERS];
    float weights[KD_MAX_TEACHERS]; /* ensemble weights (<= 0: 1), normalised */
    int cache_k;         /* > 0: the teacher is a top-k cache with k entries per position */
    float cache_T;       /* ... stored at this temperature */
    int vocab, seq, max_batch;
    /* LoRA (kd_lora.h): r > 0 gives the student adapters and freezes its
     * base weights (load them with kd_lm_load before training) */
    kd_lora_cfg lora;
    /* OKD (Rao et al. 2024, docs/losses/okd.md): the one teacher gets
     * trainable adapters okd_lora, trained jointly with the student on the
     * loss spec okd_loss read with the roles swapped (its "s" is the
     * teacher, its "t" the student, e.g. "ce + fkl": the teacher's CE plus
     * KL(p_student || p_teacher)); gradients of each side reach only that
     * side's parameters */
    int okd;
    kd_lora_cfg okd_lora;
    const char *okd_loss;
} kd_lm_setup;

typedef struct kd_lm {
    kd_graph *g;
    kd_node *x, *y;   /* (B,T) token ids and next-token labels as floats; label < 0: ignored by the CE */
    kd_node *mask;    /* (B,T) 1 where distillation terms count */
    kd_model m;       /* the student, prefix "s." */
    kd_model teachers[KD_MAX_TEACHERS];
    int n_teachers;
    kd_node *t_mix;           /* the teachers' (mean) logits (B,T,V), or NULL */
    kd_node *t_ids, *t_logp;  /* cached teacher: inputs (B,T,k), or NULL */
    kd_node *ce;              /* the student's next-token cross-entropy */
    kd_node *loss;            /* what training minimises */
    kd_built_loss terms;      /* distillation terms (n = 0 for CE alone) */
    kd_built_loss t_terms;    /* OKD: the teacher adapters' terms (n = 0 otherwise) */
    kd_lora_cfg lora, okd_lora;
    int okd;
    int seq, vocab, cache_k;
} kd_lm;

kd_status kd_lm_new(kd_lm *lm, const kd_lm_setup *s, uint64_t seed);
void kd_lm_free(kd_lm *lm);

/* A weights lookup for kd_gpt_runner_new reading the model's live parameters
 * (the runner then always sees the current weights). ctx: a kd_lm_view. */
typedef struct kd_lm_view {
    kd_graph *g;
    const kd_model *m;
} kd_lm_view;
const float *kd_lm_lookup(void *ctx, const char *name, int ndim, const int *shape);

typedef struct kd_lm_eval_result {
    double loss, ppl;   /* student's mean next-token CE and exp(loss) */
    double t_loss;      /* the teacher's (mix) CE, when there is one */
    double agree, kl;   /* top-1 agreement with the teacher, mean KL(teacher || student) per token */
    int64_t tokens;
    int with_teacher;   /* agree, kl and t_loss are set */
} kd_lm_eval_result;

/* The deterministic sweep over the split's windows (at most max_windows; 0:
 * all). with_teacher: also run the teacher(s) for agreement and KL. */
kd_lm_eval_result kd_lm_evaluate(kd_lm *lm, const kd_text_data *d, int split, int batch, int max_windows,
                                 int with_teacher);

/* Where training batches come from, besides the text's random windows. */
typedef struct kd_lm_windows {
    const uint16_t *tokens; /* n windows of seq+1 tokens */
    int64_t n;
    /* cached teacher: per window and position, k ids and log-probs */
    const uint16_t *ids;
    const uint16_t *logp; /* fp16 */
} kd_lm_windows;

typedef struct kd_lm_train_opts {
    int64_t steps;
    int batch;
    uint64_t seed;
    kd_optim_cfg opt;
    int64_t warmup_steps;
    int log_every, eval_every, eval_windows;
    const char *role;
    const kd_lm_windows *windows; /* train on these windows instead of random text windows (seq-KD, cache) */
    /* on-policy distillation (GKD): a fraction of batches is the student's
     * own continuation of a `prompt`-token data prefix, sampled with
     * `sample`; only the divergence terms count on those batches */
    float onpolicy;
    int prompt;
    kd_sample_opts sample;
} kd_lm_train_opts;

typedef struct kd_lm_train_result {
    double train_seconds, tokens_per_s, final_loss;
    kd_lm_eval_result val;
    int64_t onpolicy_batches;
    double gen_seconds;
} kd_lm_train_result;

kd_status kd_lm_train(kd_lm *lm, const kd_text_data *d, const kd_lm_train_opts *o, kd_log *log,
                      kd_lm_train_result *res);
/* Fills an on-policy batch (what kd_lm_train does for a fraction o->onpolicy
 * of its steps): B prompts of o->prompt tokens from random training windows,
 * continued by `run` (which reads the student's live weights); labels -1
 * (the CE is off), mask 1 on the positions that predict sampled tokens.
 * prompt and gen are scratch of B*o->prompt and B*(seq+1) ints. */
void kd_lm_onpolicy_batch(kd_lm *lm, kd_gpt_runner *run, const kd_text_data *d, const kd_lm_train_opts *o,
                          kd_rng *rng, int B, int *prompt, int *gen);

/* Checkpoints: the model's tensors (GPT-2 names) with metadata model, vocab
 * and, for a BPE vocabulary, the tokenizer as JSON. Loading is strict. */
kd_status kd_lm_save(const kd_graph *g, const kd_model *m, int vocab, const char *tokenizer_json, const char *path);
kd_status kd_lm_load(kd_graph *g, const kd_model *m, const char *path);

/* Teacher samples for sequence-level KD: n windows of seq+1 tokens, each a
 * `prompt`-token prefix of a random training window continued by the
 * runner's model. out holds n*(seq+1) tokens. */
kd_status kd_lm_sample_windows(kd_gpt_runner *r, const kd_text_data *d, int64_t n, int seq, int prompt, int batch,
                               const kd_sample_opts *so, uint64_t seed, uint16_t *out);

/* The top-k teacher cache for language models (docs/formats.md, "LM teacher
 * cache"): the training split cut into non-overlapping windows of seq+1
 * tokens; per position the teacher's k largest log-probabilities at
 * temperature T (F16) with their ids, and the leftover mass (F16). */
typedef struct kd_lm_cache {
    kd_safetensors st;
    int64_t n; /* windows */
    int seq, k, vocab;
    float T;
    kd_lm_windows w;
    uint16_t *own; /* a copy when the file's payload is not 2-byte aligned, else NULL (read in place) */
    int open;
} kd_lm_cache;
kd_status kd_lm_cache_build(const char *teacher_ckpt, const kd_text_data *d, int seq, int k, float T, int batch,
                            int64_t max_windows, const char *out, double *seconds);
kd_status kd_lm_cache_open(const char *path, kd_lm_cache *c);
void kd_lm_cache_close(kd_lm_cache *c);

#endif
