/* kd_multitask.h - multi-task distillation with teacher annealing
 * (docs/losses/multitask.md): one student trunk shared by several tasks,
 * a linear head per task, each task taught by its own frozen teacher.
 *
 * A task is a label map over the dataset's classes (Fashion-MNIST's 10
 * classes as 10-way, top/bottom wear, clothing/footwear/bag). The graph:
 *
 *   x ── student trunk ("s.", the model spec without its head) ─┬─ s.head      task 0 logits
 *                                                               ├─ mt1.head    task 1 logits
 *                                                               └─ ...
 *   x ── teacher k ("t<k>.", frozen) ── logits of task k
 *   loss = sum_k weight_k * (the loss spec on task k's head, teacher, labels)
 *
 * Task 0's head is the model spec's own head, so the student's checkpoint
 * for task 0 is an ordinary model checkpoint; kd_multitask_save writes one
 * for any task (trunk + that task's head renamed "head").
 *
 * Training reuses kd_train_classifier on mt.c: the training set holds task
 * 0's labels, and kd_multitask_batch (the trainer's batch hook) fills the
 * other tasks' labels from the original labels by example index and moves
 * the annealing weight of `anneal` terms once per step.
 */
#ifndef KD_MULTITASK_H
#define KD_MULTITASK_H
#include "kd_train.h"

#define KD_MAX_TASKS 8

typedef struct kd_mt_task {
    char name[32];     /* letters, digits, '_' */
    int map[256];      /* new label of each original class */
    int n_map;         /* original classes */
    int classes;       /* 1 + the largest entry of map */
    char teacher[256]; /* the teacher's model spec; "" for none */
    float weight;      /* of the task's loss in the total */
} kd_mt_task;

typedef struct kd_multitask {
    kd_classifier c; /* c.x input, c.y task 0's labels, c.m trunk + task 0's head, c.loss the total */
    int n_tasks;
    kd_mt_task tasks[KD_MAX_TASKS];
    kd_node *logits[KD_MAX_TASKS];   /* each task's head output (logits[0] = c.m.logits) */
    kd_node *labels[KD_MAX_TASKS];   /* each task's labels (labels[0] = c.y) */
    kd_node *heads_w[KD_MAX_TASKS], *heads_b[KD_MAX_TASKS]; /* head parameters of tasks >= 1 */
    kd_model teachers[KD_MAX_TASKS]; /* valid when has_teachers */
    int has_teachers;
    kd_built_loss loss; /* every task's terms, named "TASK.term"; total = c.loss */
    /* for kd_multitask_batch, set by the caller before training */
    const uint8_t *orig_labels; /* original label of each training example, by index */
    int epochs, steps_per_epoch;
    int cur_epoch, cur_batch; /* the hook's position (starts at -1, 0) */
} kd_multitask;

/* Parses a task list: names (space-separated), maps ('|' between tasks,
 * each "l0 l1 ..." one entry per original class), weights (space-separated
 * or "" for all 1). Errors name what is wrong (KD_ECONFIG). */
kd_status kd_multitask_parse(const char *names, const char *maps, const char *weights, int n_classes,
                             kd_mt_task *tasks, int *n_tasks);
/* Builds and compiles the graph. student: a model spec; loss: a loss spec
 * applied to every task; tasks[k].teacher non-empty for every task when
 * the spec reads a teacher (teachers are built only then: has_teachers).
 * ds gives the input geometry. The teachers' weights are loaded by the
 * caller (kd_checkpoint_load on mt->teachers[k]). */
kd_status kd_multitask_build(kd_multitask *mt, const char *student, const char *loss, const kd_mt_task *tasks,
                             int n_tasks, const kd_dataset *ds, int max_batch, uint64_t seed);
void kd_multitask_free(kd_multitask *mt);
/* Trainable parameters of the student: trunk and every head. */
int64_t kd_multitask_params(const kd_multitask *mt);
/* Whether the loss spec reads a teacher (some term needs one). */
int kd_multitask_loss_uses_teacher(const char *loss);
/* The trainer's batch hook (ctx: the kd_multitask): fills tasks >= 1's
 * labels from orig_labels by example index (aug[4i+3]; -1 where task 0's
 * label is -1, an unlabelled example) and sets the annealing progress
 * (epoch * steps_per_epoch + batch) / (epochs * steps_per_epoch). */
kd_status kd_multitask_batch(void *ctx, int epoch, const int *aug, int B);
/* Every task's accuracy and mean cross-entropy on ds, which holds the
 * ORIGINAL labels (mapped here per task); eval mode, the teachers are not
 * run. res has n_tasks entries. */
void kd_multitask_evaluate(kd_multitask *mt, const kd_dataset *ds, int batch, kd_eval_result *res);
/* Task k's student as an ordinary checkpoint: the trunk and task k's head
 * as "head.weight"/"head.bias", metadata for task k's classes. Atomic. */
kd_status kd_multitask_save(const kd_multitask *mt, int k, const kd_dataset *ds, const char *path);

/* anneal loss (src/distill/anneal.c): sets lambda = from + (to - from) *
 * progress (progress clamped to [0, 1]) on every `anneal` term of l whose
 * epochs= argument is 0 (terms with epochs > 0 follow their epoch schedule). */
void kd_anneal_set_progress(kd_built_loss *l, double progress);

#endif
