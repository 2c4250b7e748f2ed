/* cli.h - the command-line front end: one option table per command
 * generates both the parser and the usage text. */
#ifndef KD_CLI_H
#define KD_CLI_H
#include "kd.h"

typedef struct cli_opt {
    const char *name; /* "--threads" */
    const char *arg;  /* "N", or NULL for a flag */
    const char *help;
    const char *value; /* filled by the parser (flags: "1") */
} cli_opt;

typedef struct cli_cmd {
    const char *name;
    const char *synopsis;
    const char *about;
    const char *examples;
    cli_opt *opts;
    int n_opts;
} cli_cmd;

/* Parses argv (after the command name). Positionals go to pos (up to
 * max_pos); arguments of the form --a.b=c go to extra when extra is non-NULL.
 * Returns KD_EUSAGE with a message on bad usage; *help set for --help. */
kd_status cli_parse(cli_cmd *cmd, int argc, char **argv, const char **pos, int max_pos, int *n_pos,
                    const char **extra, int max_extra, int *n_extra, int *help);
void cli_usage(const cli_cmd *cmd, FILE *f);
const char *cli_get(const cli_cmd *cmd, const char *name);
/* Applies --threads to OpenMP and OpenBLAS; returns the count in use. */
int cli_set_threads(int n);
/* mkdir -p; errors name the directory */
kd_status cli_mkdirs(const char *path);
kd_status cli_parse_int(const char *opt, const char *s, int lo, int hi, int *out);

int cmd_run(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_loss(int argc, char **argv);
int cmd_cache(int argc, char **argv);
int cmd_export(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);

/* `distill run` for a text dataset (src/cli/run_lm.c); returns the exit code */
struct kd_config;
struct kd_log;
int cli_run_lm(const struct kd_config *cfg, const char *dir, int threads, struct kd_log *log);
/* `distill run` with [multitask] tasks (src/cli/run_multitask.c): teachers
 * per task, the multi-task student, summary.json; base: the [train] options */
struct kd_train_opts;
struct kd_dataset;
kd_status cli_run_multitask(const struct kd_config *cfg, const struct kd_train_opts *base,
                            const struct kd_dataset *train, const struct kd_dataset *test, const char *dir, int threads,
                            struct kd_log *log);
/* the LM student's training in `distill run` (src/cli/run_llmr.c): [lm] init,
 * the KD warm start then [lm] llmr REINFORCE steps, [lm] sample_eval */
struct kd_lm;
struct kd_text_data;
struct kd_lm_train_opts;
struct kd_lm_train_result;
kd_status cli_lm_student_train(const struct kd_config *c, struct kd_lm *lm, const struct kd_text_data *d,
                               const struct kd_lm_train_opts *o, struct kd_log *log,
                               struct kd_lm_train_result *res);
/* `distill run` for a "textcls:" dataset (src/cli/run_textcls.c); returns the exit code */
int cli_run_textcls(const struct kd_config *cfg, const char *dir, int threads, struct kd_log *log);
int cmd_generate(int argc, char **argv);
int cmd_report(int argc, char **argv);
int cmd_lora(int argc, char **argv); /* src/cli/lora.c */

#endif
