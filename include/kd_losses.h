/* kd_losses.h - loss specs ("ce(weight=0.1) + dkd(alpha=1,beta=8,T=4)") and
 * the builder that turns one into graph nodes between a student and a
 * teacher. The list of losses, their arguments and defaults is in
 * docs/losses.md and `distill loss --help`. */
#ifndef KD_LOSSES_H
#define KD_LOSSES_H
#include "kd.h"
#include "kd_nn.h"

#define KD_MAX_TERMS 16
#define KD_MAX_ARGS 12

typedef struct kd_loss_arg {
    char key[32], value[64];
} kd_loss_arg;

typedef struct kd_loss_term {
    char name[32];
    int n_args;
    kd_loss_arg args[KD_MAX_ARGS];
} kd_loss_term;

typedef struct kd_loss_spec {
    int n;
    kd_loss_term terms[KD_MAX_TERMS];
} kd_loss_spec;

kd_status kd_loss_spec_parse(const char *spec, kd_loss_spec *out);

/* What a loss may read. Models may be NULL when only logits are known
 * (`distill loss`, cached teachers): then s_logits/t_logits are used and
 * feature losses read s_feat/t_feat. */
typedef struct kd_loss_inputs {
    const kd_model *student, *teacher;
    kd_node *s_logits, *t_logits; /* (N, K) */
    kd_node *labels;              /* (N), floats; negative = unlabelled */
    kd_node *mask;                /* (N) or NULL */
    kd_node *s_feat, *t_feat;     /* for feature losses without models */
    const char *proj_prefix;      /* prefix of projector parameter names (NULL: none); a second
                                   * loss built in the same graph (mutual learning) needs another */
    int64_t n_data;               /* training-set size, for memory-bank losses (crd); 0: unknown */
    kd_node *ce;                  /* optional: an existing kd_cross_entropy(s_logits, labels, 0) that a `ce`
                                   * term without smoothing reuses instead of computing it again */
} kd_loss_inputs;

/* A built term: its weighted value node, for logging, and the scale node a
 * schedule may change (DKD warm-up). A term may also carry its own
 * per-epoch hook (CTKD's curriculum of the gradient-reversal factor): `sched`
 * is called by kd_loss_set_epoch after the weight is set, and changes the op
 * arguments of `sched_node` from `sched_arg`. */
typedef struct kd_built_term {
    char name[32];
    float weight;
    int warmup_epochs; /* 0: none */
    kd_node *value;    /* unweighted loss */
    kd_node *scaled;   /* weight * value (a KD_OP_SCALE node) */
    void (*sched)(struct kd_built_term *t, double epoch); /* NULL: none */
    kd_node *sched_node;
    float sched_arg[4];
} kd_built_term;

typedef struct kd_built_loss {
    kd_node *total;
    int n;
    kd_built_term terms[KD_MAX_TERMS];
    int uses_teacher; /* any term reads the teacher */
    /* set only by simkd: the teacher's frozen classifier head applied to the
     * projected student feature. SimKD predicts with these logits at
     * inference (student backbone + projector + the teacher's head), not
     * with the student's own head; NULL for every other loss. Kept alive
     * after backward (KD_F_KEEP). */
    kd_node *infer_logits;
} kd_built_loss;

/* Builds the spec's terms and their weighted sum. Unknown losses or
 * arguments, bad values, unknown taps and shape mismatches without a
 * projector are KD_ECONFIG/KD_ESHAPE errors naming the term. */
kd_status kd_loss_build(kd_graph *g, const kd_loss_spec *spec, const kd_loss_inputs *in, kd_built_loss *out);
/* Sets each term's scale for the epoch (1-based, fractional allowed): DKD's
 * linear warm-up min(epoch/warmup, 1) times the term's weight; then runs
 * each term's own schedule hook, if any. */
void kd_loss_set_epoch(kd_built_loss *l, double epoch);
/* One line of help per loss: name, arguments with defaults, reference. */
void kd_loss_print_help(FILE *f);

#endif
