/* kd_train.h - checkpoints of a model, the classifier trainer, evaluation,
 * metrics and progress output. */
#ifndef KD_TRAIN_H
#define KD_TRAIN_H
#include "kd.h"
#include "kd_data.h"
#include "kd_losses.h"
#include "kd_nn.h"
#include "kd_optim.h"

/* Saves every parameter and buffer of model m (names without the model's
 * prefix) plus metadata: model spec, classes, input geometry, normalisation.
 * Atomic. */
kd_status kd_checkpoint_save(const kd_graph *g, const kd_model *m, const kd_dataset *ds, const char *path);
/* Loads into model m; every tensor must be present with the model's exact
 * shape, and no unknown tensor may be present. Errors name path and tensor.
 * Floating tensors may be F32, F16, BF16 or F64 (converted to float32). */
kd_status kd_checkpoint_load(kd_graph *g, const kd_model *m, const char *path);
/* The same for a checkpoint whose names are not ours (a PyTorch state_dict;
 * docs/interop.md). names:
 *   NULL or ""          the file uses the model's names (kd_checkpoint_load)
 *   "auto"              pairs by leaf name ("weight", "running_var", ...) and
 *                       shape; several of one leaf and shape are ordered by
 *                       the numbers in their names and refused when the names
 *                       differ otherwise
 *   "A = B, C = D, ..." the file's tensor or module A is the model's B
 *                       (commas or newlines separate pairs, '#' comments);
 *                       tensors no pair names keep their names
 *   "@FILE"             the pairs from FILE, relative to base_dir (NULL: the
 *                       current directory) unless absolute
 * Under a map a missing num_batches_tracked reads as 0. A file distill wrote
 * (metadata format = distill/1) always loads by its own names. Errors name
 * the file, both names of a tensor and both shapes; an ambiguous "auto"
 * lists the candidates. */
kd_status kd_checkpoint_load_names(kd_graph *g, const kd_model *m, const char *path, const char *names,
                                   const char *base_dir);
/* Reads the metadata a checkpoint needs to rebuild its model. */
typedef struct kd_checkpoint_info {
    char model[256];
    int classes, c, h, w;
    float mean, std;
} kd_checkpoint_info;
/* Error when the metadata is missing or malformed. */
kd_status kd_checkpoint_info_read(const char *path, kd_checkpoint_info *info);
/* As kd_checkpoint_info_read, but a file without any of distill's metadata
 * (a PyTorch state_dict) is not an error: *found = 0 and info zeroed. */
kd_status kd_checkpoint_info_peek(const char *path, kd_checkpoint_info *info, int *found);

typedef struct kd_log {
    FILE *metrics; /* metrics.jsonl or NULL */
    int quiet;
    int tty; /* progress line on stderr */
} kd_log;

typedef struct kd_eval_result {
    double acc, loss;
    int n;
} kd_eval_result;

/* A classifier in its own compiled graph: x (B,C,H,W), labels y (B), the
 * model and its cross-entropy loss. */
typedef struct kd_classifier {
    kd_graph *g;
    kd_node *x, *y, *loss;
    kd_model m;
} kd_classifier;

kd_status kd_classifier_new(kd_classifier *c, const char *spec, const char *prefix, const kd_dataset *ds,
                            int max_batch, float smoothing, uint64_t seed);
void kd_classifier_free(kd_classifier *c);

/* Accuracy and mean cross-entropy of the model's logits on ds, eval mode.
 * Only the nodes up to the logits run (a teacher built after the student
 * in the same graph is not evaluated). Labels < 0 are not counted. */
kd_eval_result kd_evaluate(kd_classifier *c, const kd_dataset *ds, int batch);

typedef struct kd_train_opts {
    int epochs, batch;
    uint64_t seed;
    int crop, flip;
    int log_every;
    int eval_every; /* epochs between evaluations (<= 1: every epoch); the last is always evaluated */
    kd_optim_cfg opt;
    float warmup_epochs;
    const char *role;         /* "teacher", "baseline", ... in metrics */
    kd_built_loss *terms;     /* distillation terms: epoch schedule and per-term logging, or NULL */
    int view_epochs;          /* loader: augmented views repeat every N epochs (a teacher cache's views) */
    /* called after each batch is loaded, before forward: aug holds {dx, dy,
     * flip, index} per example (fills a cached teacher's logits) */
    kd_status (*batch_hook)(void *ctx, int epoch, const int *aug, int B);
    void *hook_ctx;
} kd_train_opts;

typedef struct kd_train_result {
    double train_seconds;
    double final_loss;
    kd_eval_result test;
    double samples_per_s;
} kd_train_result;

/* Trains with plain cross-entropy, evaluating on `test` after each epoch.
 * A non-finite loss stops training with KD_ENUMERIC naming the step and the
 * first node that went non-finite. */
kd_status kd_train_classifier(kd_classifier *c, const kd_dataset *train, const kd_dataset *test,
                              const kd_train_opts *o, kd_log *log, kd_train_result *res);

/* Teachers and students in one graph (src/distill/distiller.c): the
 * student (prefix "s."), then frozen teachers ("t.", "t1.", ...; several
 * form an ensemble of weighted-mean logits), or a cache-filled input
 * "t.logits", or a trainable peer ("p.", deep mutual learning); then the
 * loss terms. c.m is the student and c.loss the weighted sum of the terms. */
#define KD_MAX_TEACHERS 8
typedef struct kd_distill_setup {
    const char *student, *loss;
    int n_teachers; /* frozen teachers (exactly one of teachers, cached, peer) */
    const char *teachers[KD_MAX_TEACHERS];
    float weights[KD_MAX_TEACHERS]; /* ensemble weights (<= 0: 1), normalised */
    int cached;                     /* teacher logits from a cache */
    const char *peer;               /* deep mutual learning: the peer student's spec */
} kd_distill_setup;

typedef struct kd_distiller {
    kd_classifier c;
    kd_model teacher; /* the first teacher (feature losses tap it) */
    kd_model teachers[KD_MAX_TEACHERS];
    int n_teachers;
    kd_model peer;
    int has_peer;
    kd_node *t_mix;    /* the logits the losses read as the teacher's */
    kd_node *t_logits; /* cached teacher: the input node holding its logits, else NULL */
    const struct kd_cache *hook_cache; /* the cache filling t_logits (set by the caller) */
    kd_built_loss loss;
} kd_distiller;

kd_status kd_distiller_build(kd_distiller *d, const kd_distill_setup *s, const kd_dataset *ds, int max_batch,
                             uint64_t seed);
/* One teacher. */
kd_status kd_distiller_new(kd_distiller *d, const char *teacher_spec, const char *student_spec, const char *loss_spec,
                           const kd_dataset *ds, int max_batch, uint64_t seed);
/* The same without a teacher sub-graph: d->t_logits is filled per batch
 * (from a kd_cache). Feature losses are not available. */
kd_status kd_distiller_new_cached(kd_distiller *d, const char *student_spec, const char *loss_spec, const kd_dataset *ds,
                                  int max_batch, uint64_t seed);
void kd_distiller_free(kd_distiller *d);



double kd_now(void); /* monotonic seconds */
void kd_progress(kd_log *log, const char *role, int epoch, int epochs, int step, int steps, double loss,
                 double samples_per_s, double eta_s);

#endif
