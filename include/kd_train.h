/* kd_train.h - checkpoints of a model, the classifier trainer, evaluation,
 * metrics and progress output. */
#ifndef KD_TRAIN_H
#define KD_TRAIN_H
#include <signal.h>

#include "kd.h"
#include "kd_data.h"
#include "kd_losses.h"
#include "kd_nn.h"
#include "kd_optim.h"

/* Saves every parameter and buffer of model m (names without the model's
 * prefix) plus metadata: model spec, classes, input geometry, normalisation.
 * Atomic. */
kd_status kd_checkpoint_save(const kd_graph *g, const kd_model *m, const kd_dataset *ds, const char *path);
/* As kd_checkpoint_save, for a head of K*groups subclass logits (LELP):
 * metadata "groups" tells `distill eval` to sum each class's subclasses. */
kd_status kd_checkpoint_save_groups(const kd_graph *g, const kd_model *m, const kd_dataset *ds, int groups,
                                    const char *path);
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
    int groups; /* > 1: the head's classes are `groups` subclasses per class (LELP);
                 * the prediction sums their probabilities. 1 otherwise. */
} kd_checkpoint_info;
/* Error when the metadata is missing or malformed. */
kd_status kd_checkpoint_info_read(const char *path, kd_checkpoint_info *info);
/* As kd_checkpoint_info_read, but a file without any of distill's metadata
 * (a PyTorch state_dict) is not an error: *found = 0 and info zeroed. */
kd_status kd_checkpoint_info_peek(const char *path, kd_checkpoint_info *info, int *found);

typedef struct kd_log {
    FILE *metrics; /* metrics.jsonl or NULL */
    int quiet;
    int tty;  /* progress line on stderr */
    int json; /* log lines on stderr as JSON objects, one per line (--log-json) */
} kd_log;

/* A log line on stderr: "distill: MESSAGE", or with log->json
 * {"event":"info","message":MESSAGE}. Nothing when log->quiet. */
void kd_log_info(const kd_log *log, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* An error line, printed even when quiet: "distill: error: MESSAGE" or
 * {"event":"error","message":MESSAGE}. */
void kd_log_error(const kd_log *log, const char *msg);

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
    /* checkpoints and resume (docs/resume.md); all optional */
    const char *state_path; /* training state written here (NULL: never) */
    int checkpoint_every;   /* steps between states; 0: at the end of each epoch only (always then too) */
    int resume;             /* continue from state_path (and truncate log->metrics to its offset) */
    const char *config;     /* resolved config text, stored in the state and checked on resume */
    int threads;            /* recorded in the state: results are bit-identical per thread count */
    /* set asynchronously (a signal handler): the trainer finishes the step,
     * writes the state and returns KD_EINTR */
    const volatile sig_atomic_t *stop;
} kd_train_opts;

typedef struct kd_train_result {
    double train_seconds;
    double final_loss;
    kd_eval_result test;
    double samples_per_s;
} kd_train_result;

/* Trains with plain cross-entropy, evaluating on `test` after each epoch.
 * A non-finite loss stops training with KD_ENUMERIC naming the step and the
 * first node that went non-finite, as do non-finite parameters or moments
 * when a state is due (the state is then not written: the last good one
 * stays, and the message names it). With o->state_path, a training state is
 * written every o->checkpoint_every steps and at each epoch end; o->resume
 * continues from it exactly (same metrics lines, same weights). When *o->stop
 * becomes non-zero the trainer finishes the step, writes the state and
 * returns KD_EINTR. */
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



/* ---- training state (src/train/state.c; docs/formats.md "Training state")
 *
 * One safetensors file holding what a trainer needs to continue exactly:
 * every non-frozen parameter and buffer of the graph, the optimiser's
 * moments and step count, op state kept between steps, and the counters
 * below. Written atomically; the trainers above write and read it. */
#define KD_STATE_FORMAT "distill-state/1"
#define KD_STATE_RNGS 4 /* generators a state can carry */
typedef struct kd_train_state {
    char stage[64];         /* "teacher", "student", ...: checked on load */
    int64_t step;           /* optimiser updates done */
    int epoch;              /* epochs finished */
    int batch;              /* batches done of the epoch after `epoch` */
    int epochs, steps_per_epoch;
    uint64_t seed;
    uint64_t rng[KD_STATE_RNGS]; /* running generators' states (0 where every draw derives from seed, epoch, step) */
    int64_t metrics_offset; /* bytes of metrics.jsonl at this point */
    double eloss;           /* sum of loss x batch over the epoch so far */
    int64_t eseen;          /* examples of the epoch so far */
    double win;             /* sum of step losses since the last metrics line */
    int wsteps;
    int64_t samples;        /* examples seen by this stage */
    double seconds;         /* training time so far */
    double final_loss;      /* mean training loss of the last finished epoch */
    kd_eval_result test;    /* the last evaluation */
    int threads;
} kd_train_state;

/* Writes path atomically from g (its non-frozen parameters and buffers),
 * opt and s, with config (resolved INI text, may be NULL) and its hash.
 * KD_ENUMERIC and nothing written when a value is NaN or Inf. */
kd_status kd_state_save(const char *path, const kd_graph *g, const kd_optim *opt, const kd_train_state *s,
                        const char *config);
/* Reads path into g, opt and *s; g and opt must be built as when it was
 * saved. Checks the format version, the stage (unless NULL), the config
 * (unless NULL: a different one is KD_ECONFIG naming the differing keys),
 * the optimiser and every tensor's name, dtype and shape before anything
 * is changed; errors name the file and the tensor or key. */
kd_status kd_state_load(const char *path, kd_graph *g, kd_optim *opt, kd_train_state *s, const char *stage,
                        const char *config);
/* The name of the first tensor a state would hold that has a NaN or Inf
 * ("optim.m", "optim.v" for moments), or NULL. */
const char *kd_state_nonfinite(const kd_graph *g, const kd_optim *opt);
/* FNV-1a 64 hash (16 hex digits) of a resolved config's keys and values,
 * leaving out those that may change on resume ([run] threads, [train]
 * checkpoint_every) and comments. */
void kd_state_config_hash(const char *config, char out[17]);
/* Lists the keys whose values differ between two resolved configs
 * ("[train] lr was '0.1', now '0.2'; ...") into out; returns their count. */
int kd_state_config_diff(const char *was, const char *now, char *out, size_t n);

double kd_now(void); /* monotonic seconds */
/* The progress line on a terminal (log->tty, not quiet, not json): a bar
 * over the whole stage (epoch of epochs, step of steps), the loss,
 * samples/s and the ETA, redrawn in place. Nothing otherwise. */
void kd_progress(kd_log *log, const char *role, int epoch, int epochs, int step, int steps, double loss,
                 double samples_per_s, double eta_s);

#endif
