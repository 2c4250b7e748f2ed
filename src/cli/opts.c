/* opts.c - option parsing and usage text from one table per command, and
 * thread setup shared by the commands. */
#include <cblas.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cli/cli.h"

void cli_usage(const cli_cmd *cmd, FILE *f) {
    fprintf(f, "usage: distill %s %s\n\n%s\n", cmd->name, cmd->synopsis, cmd->about);
    if (cmd->n_opts) fprintf(f, "\noptions:\n");
    for (int i = 0; i < cmd->n_opts; i++) {
        char left[64];
        snprintf(left, sizeof left, "%s%s%s", cmd->opts[i].name, cmd->opts[i].arg ? " " : "",
                 cmd->opts[i].arg ? cmd->opts[i].arg : "");
        fprintf(f, "  %-22s %s\n", left, cmd->opts[i].help);
    }
    fprintf(f, "  %-22s %s\n", "--help", "show this help");
    if (cmd->examples) fprintf(f, "\nexamples:\n%s", cmd->examples);
}

const char *cli_get(const cli_cmd *cmd, const char *name) {
    for (int i = 0; i < cmd->n_opts; i++)
        if (strcmp(cmd->opts[i].name, name) == 0) return cmd->opts[i].value;
    KD_ASSERT(0, "option %s not in the table of '%s'", name, cmd->name);
    return NULL;
}

kd_status cli_parse(cli_cmd *cmd, int argc, char **argv, const char **pos, int max_pos, int *n_pos,
                    const char **extra, int max_extra, int *n_extra, int *help) {
    *n_pos = 0;
    if (n_extra) *n_extra = 0;
    *help = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            *help = 1;
            return KD_OK;
        }
        if (strncmp(a, "--", 2) != 0 || strlen(a) == 2) {
            if (*n_pos == max_pos) return kd_errorf(KD_EUSAGE, "distill %s: unexpected argument '%s'", cmd->name, a);
            pos[(*n_pos)++] = a;
            continue;
        }
        const char *eq = strchr(a, '=');
        size_t nl = eq ? (size_t)(eq - a) : strlen(a);
        int found = 0;
        for (int j = 0; j < cmd->n_opts && !found; j++) {
            cli_opt *o = &cmd->opts[j];
            if (strlen(o->name) != nl || strncmp(o->name, a, nl) != 0) continue;
            found = 1;
            if (!o->arg) {
                if (eq) return kd_errorf(KD_EUSAGE, "distill %s: %s takes no value", cmd->name, o->name);
                o->value = "1";
            } else if (eq) {
                o->value = eq + 1;
            } else if (i + 1 < argc) {
                o->value = argv[++i];
            } else {
                return kd_errorf(KD_EUSAGE, "distill %s: %s needs a value (%s)", cmd->name, o->name, o->arg);
            }
        }
        if (found) continue;
        const char *dot = strchr(a + 2, '.');
        if (extra && dot && eq && dot < eq) {
            if (*n_extra == max_extra) return kd_errorf(KD_EUSAGE, "distill %s: too many overrides", cmd->name);
            extra[(*n_extra)++] = a + 2;
            continue;
        }
        return kd_errorf(KD_EUSAGE, "distill %s: unknown option '%s' (see distill %s --help)", cmd->name, a,
                         cmd->name);
    }
    return KD_OK;
}

kd_status cli_parse_int(const char *opt, const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi)
        return kd_errorf(KD_EUSAGE, "%s: '%s' is not an integer in [%d, %d]", opt, s, lo, hi);
    *out = (int)v;
    return KD_OK;
}

int cli_set_threads(int n) {
#ifdef _OPENMP
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
#else
    n = 1;
#endif
    openblas_set_num_threads(n);
    return n;
}
