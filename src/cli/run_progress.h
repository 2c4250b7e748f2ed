/* run_progress.h - private to `distill run`: the stages of a run and
 * RUN/progress.json, the record of finished stages that --resume skips
 * (src/cli/run_progress.c; docs/resume.md). */
#ifndef KD_RUN_PROGRESS_H
#define KD_RUN_PROGRESS_H
#include <cjson/cJSON.h>

#include "kd_train.h"

/* One row of the results table / one object of summary.json. */
typedef struct stage {
    char role[32];
    char spec[256];
    int64_t params;
    kd_train_result tr;
    int loaded, ran;
} stage;

typedef struct run_progress {
    char dir[4096];
    cJSON *root;         /* the contents of progress.json */
    int64_t metrics_end; /* bytes of metrics.jsonl when the last finished stage ended */
} run_progress;

/* Starts the record of a run in dir. want_resume: reads dir/progress.json
 * and refuses (KD_ECONFIG naming the differing keys) when config, the
 * resolved config text, differs from the one it was started with; without
 * the file there is nothing to resume and *resuming = 0. Otherwise (a fresh
 * start) the training states of an earlier run in dir are removed and an
 * empty record is written. */
kd_status progress_open(run_progress *p, const char *dir, const char *config, int want_resume, int *resuming);
void progress_close(run_progress *p);
/* *skip = 1 when the stage `role` finished before: out is filled from the
 * record and its weights file must exist (else an error naming it). */
kd_status progress_skip(run_progress *p, const char *role, stage *out, int *skip);
/* Records n finished stages s[i] (weights[i]: its file in dir, "" for
 * none) with the current length of metrics (flushed), and rewrites
 * progress.json once. */
kd_status progress_done(run_progress *p, const stage *s, const char *const *weights, int n, FILE *metrics);
/* Cuts metrics back to the end of the last finished stage and puts the
 * write position there (before a stage that starts from scratch). */
kd_status progress_cut(run_progress *p, FILE *metrics);
/* After KD_EINTR (the trainer's message holds the state's path): prints
 * what stopped and the command that resumes (argv of `distill run`, with
 * --resume), plain or as an "interrupted" JSON event; returns the exit code
 * 128 + sig (130 SIGINT, 143 SIGTERM). */
int run_interrupted(const kd_log *log, int sig, int argc, char **argv);
/* PATH.tmp.PID, fsync, rename: a reader sees the old file or the new one. */
/* root printed as JSON plus a newline, written atomically to path */
kd_status run_write_json(const char *path, const cJSON *root);
/* a regular file at p */
int run_file_exists(const char *p);
/* copies from to to atomically (temp file, fsync, rename); from == to: nothing */
kd_status run_copy_file(const char *from, const char *to);

#endif
