/* kd_textcls.h - text classification with a GPT trunk, and teacher insights
 * as rationales (Ballout et al. 2024; docs/losses/rationale.md).
 *
 * Overview
 *   A dataset "textcls:A,B,C" takes the fortunes (entries between "%"
 *   lines) of files A, B, C as documents of classes 0, 1, 2; documents are
 *   bytes cut to T tokens, padded with 0 and a mask. A classifier is the
 *   GPT trunk (causal blocks) -> mean over the real tokens -> linear head.
 *   The teacher's gradient x input saliency on its token embeddings marks
 *   the k most influential tokens of each training document; the student
 *   learns those marks as an auxiliary per-token tagging task (a second
 *   linear head on its last hidden states, masked binary cross-entropy)
 *   beside the label loss (CE, optionally KD on the label logits).
 *
 *     kd_textcls_data d;
 *     kd_textcls_load(&d, "textcls:computers,people", 128, 0.2f);
 *     kd_textcls_setup s = {.model = "gpt: layers=1 dim=64 heads=4 ctx=128",
 *                           .loss = "ce", .classes = d.n_classes, .seq = 128,
 *                           .max_batch = 32, .rationale_weight = 1.0f};
 *     kd_textcls_net net;
 *     kd_textcls_net_new(&net, &s, seed);
 *     kd_textcls_train(&net, &d, &opts, &teacher_out, log, &res);
 *     kd_textcls_net_free(&net); kd_textcls_free(&d);
 *
 * Nothing is allocated per training step.
 */
#ifndef KD_TEXTCLS_H
#define KD_TEXTCLS_H
#include "kd.h"
#include "kd_gpt.h"
#include "kd_losses.h"
#include "kd_nn.h"
#include "kd_optim.h"
#include "kd_train.h"

#define KD_TEXTCLS_MAX_CLASSES 32

/* ---------------------------------------------------------------- ops */

/* Masked mean over the sequence: x (B,T,C), m (B,T) weights >= 0 ->
 * (B,C), y[b] = sum_t m[b,t] x[b,t] / sum_t m[b,t] (0 when the weights of a
 * row sum to 0). Gradients to x and, when it needs one, to m. */
kd_node *kd_masked_mean(kd_graph *g, kd_node *x, kd_node *m);
/* Masked binary cross-entropy with logits: z (B,T) (or any shape of B*T
 * elements), targets y in [0,1] and weights m, both (B,T) ->
 * sum m*bce(z,y) / sum m (0 when sum m = 0), bce(z,y) =
 * max(z,0) - z*y + log(1 + exp(-|z|)), as
 * F.binary_cross_entropy_with_logits(z, y, weight=m, reduction="sum") / m.sum().
 * Gradients to z, y and m where they need them. */
kd_node *kd_token_bce(kd_graph *g, kd_node *z, kd_node *y, kd_node *m);

/* ---------------------------------------------------------------- data */

typedef struct kd_textcls_data {
    int n_classes, T;
    char names[KD_TEXTCLS_MAX_CLASSES][64]; /* file names, the class names */
    int n[2];          /* documents: [0] train, [1] test */
    uint8_t *tok[2];   /* (n, T) bytes, 0 after a document's end */
    int *len[2];       /* (n) real tokens, 1..T */
    int *label[2];     /* (n) */
    int count[2][KD_TEXTCLS_MAX_CLASSES]; /* documents per split and class */
    int n_truncated;   /* documents longer than T (cut) */
    char name[256];    /* the spec */
    char info[256];    /* one line for a log */
} kd_textcls_data;

/* spec "textcls:A,B,..." (2..KD_TEXTCLS_MAX_CLASSES entries): each entry a
 * fortune file; one without '/' is looked up in $KD_TEXT_DIR or else
 * KD_TEXT_DEFAULT_DIR. Documents are the entries between lines holding only
 * "%" (blank lines at either end and the final line break dropped, empty
 * ones skipped), cut to T bytes (1 <= T <= 65536). A document goes to the
 * test split when kd_hash64(FNV-1a-64(its full bytes)) / 2^64 < test_frac
 * (in [0, 0.9]). Errors name the spec or the file: KD_ECONFIG for a bad spec
 * or argument, KD_EIO for a file that cannot be read, KD_EFORMAT for a file
 * with no document or an empty training split. */
kd_status kd_textcls_load(kd_textcls_data *d, const char *spec, int T, float test_frac);
void kd_textcls_free(kd_textcls_data *d);
/* Fills ids (B,T) (bytes as floats), mask (B,T) (1 on real tokens) and
 * labels (B) (as floats, may be NULL) with documents idx[0..B) of split. */
void kd_textcls_fill(const kd_textcls_data *d, int split, const int *idx, int B, float *ids, float *mask,
                     float *labels);

/* ---------------------------------------------------------------- model */

/* Builds the classifier on ids (B,T) and mask (B,T): GPT-2 blocks as
 * kd_gpt_build (names "wte.weight", "h.0....", "ln_f"), no tied LM head;
 * then "pool" = kd_masked_mean(ln_f, mask) (m->feat), "head" (K) = m->logits,
 * and with tag_head a per-token "tag_head" (1): taps "tok_emb" (the token
 * embeddings before positions are added; saliency reads them), "h0".., "ln_f",
 * "pool", "logits", and "tags" (B,T). All names get `prefix`. */
kd_status kd_textcls_build(kd_graph *g, const kd_gpt_cfg *cfg, const char *prefix, kd_node *ids, kd_node *mask,
                           int n_classes, int tag_head, kd_model *m);

typedef struct kd_textcls_setup {
    const char *model;      /* "gpt: ..." (vocab 256) */
    const char *loss;       /* label loss spec; NULL or "": ce */
    int classes, seq, max_batch;
    float rationale_weight; /* > 0: tag head + weight * token_bce(tags) */
} kd_textcls_setup;

typedef struct kd_textcls_net {
    kd_graph *g;
    kd_node *ids, *mask, *labels; /* inputs (B,T), (B,T), (B) */
    kd_node *t_logits;            /* input "t.logits" (B,K) when the loss reads a teacher, else NULL */
    kd_node *tags;                /* input (B,T) rationale targets when rationale_weight > 0, else NULL */
    kd_model m;
    kd_node *tag_loss;            /* the unweighted token BCE, or NULL */
    kd_node *loss;                /* what training minimises */
    kd_built_loss terms;
    int seq, classes;
    float rationale_weight;
} kd_textcls_net;

/* Builds and compiles. Errors (KD_ECONFIG) name the model spec or loss. */
kd_status kd_textcls_net_new(kd_textcls_net *n, const kd_textcls_setup *s, uint64_t seed);
void kd_textcls_net_free(kd_textcls_net *n);

/* ---------------------------------------------------------------- saliency */

/* Gradient x input saliency of the net's classifier on documents idx[0..B)
 * of split: for each document, y = the net's predicted class, and
 * score[b,t] = |sum_c dlog p_y/de[b,t,c] * e[b,t,c]| with e the token
 * embedding, 0 on padding. score (B,T). Also writes the logits (B,K) when
 * logits is non-NULL. Uses the net's inputs; the net must hold no tags
 * input and its loss must be plain ce. */
void kd_textcls_saliency(kd_textcls_net *n, const kd_textcls_data *d, int split, const int *idx, int B, float *score,
                         float *logits);
/* tags (T): 1 on the k highest scores among the first len positions (ties:
 * the lower position), 0 elsewhere; k is cut to len. */
void kd_textcls_topk_tags(float *tags, const float *score, int len, int T, int k);

/* What the teacher gives the student, per training document. */
typedef struct kd_textcls_teacher_out {
    const float *logits; /* (n_train, K) or NULL */
    const uint8_t *tags; /* (n_train, T) 0/1 or NULL */
} kd_textcls_teacher_out;

/* ---------------------------------------------------------------- training */

typedef struct kd_textcls_opts {
    int64_t steps;
    int batch;
    uint64_t seed;
    kd_optim_cfg opt; /* warmup_steps in opt */
    int log_every;
    const char *role;
} kd_textcls_opts;

typedef struct kd_textcls_result {
    double train_seconds, final_loss, final_tag_loss;
    double test_acc, train_acc;
} kd_textcls_result;

/* Accuracy (and mean CE in *loss when non-NULL) over a split. */
double kd_textcls_accuracy(kd_textcls_net *n, const kd_textcls_data *d, int split, double *loss);
/* Trains for o->steps minibatches (documents reshuffled every pass). The
 * teacher outputs must be given where the net has the matching inputs. */
kd_status kd_textcls_train(kd_textcls_net *n, const kd_textcls_data *d, const kd_textcls_opts *o,
                           const kd_textcls_teacher_out *t, kd_log *log, kd_textcls_result *res);

/* Checkpoints: the model's tensors (prefix stripped) with metadata model,
 * classes and seq; loading is strict (kd_checkpoint_load). */
kd_status kd_textcls_save(const kd_textcls_net *n, const char *path);
kd_status kd_textcls_load_weights(kd_textcls_net *n, const char *path);

#endif
