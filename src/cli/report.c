/* report.c - `distill report RUN... [--out FILE]`: report.html for one run
 * directory, or one page overlaying several (kd_report.h). */
#include <stdio.h>

#include "cli/cli.h"
#include "kd_report.h"

static cli_opt report_opts[] = {
    {"--out", "FILE", "where to write (default: RUN/report.html for one run, ./report.html for several)", NULL},
};

static cli_cmd report_cmd = {
    .name = "report",
    .synopsis = "RUN... [--out FILE]",
    .about = "Writes a self-contained HTML page (inline SVG, no network) for run directories written by\n"
             "distill run: training and test curves per role from metrics.jsonl, the results table from\n"
             "summary.json, the resolved config.ini and the machine. Several runs are overlaid on the\n"
             "same charts. distill run already writes RUN/report.html at its end.",
    .examples = "  distill report runs/quickstart\n"
                "  distill report runs/kd_T1 runs/kd_T4 --out compare.html\n",
    .opts = report_opts,
    .n_opts = (int)(sizeof report_opts / sizeof report_opts[0]),
};

enum { MAX_RUNS = 64 };

int cmd_report(int argc, char **argv) {
    const char *pos[MAX_RUNS];
    int npos, help;
    kd_status st = cli_parse(&report_cmd, argc, argv, pos, MAX_RUNS, &npos, NULL, 0, NULL, &help);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 2;
    }
    if (help) {
        cli_usage(&report_cmd, stdout);
        return 0;
    }
    if (npos < 1) {
        cli_usage(&report_cmd, stderr);
        return 2;
    }
    char out[4200];
    const char *o = cli_get(&report_cmd, "--out");
    if (o)
        snprintf(out, sizeof out, "%s", o);
    else if (npos == 1)
        snprintf(out, sizeof out, "%s/report.html", pos[0]);
    else
        snprintf(out, sizeof out, "report.html");
    st = kd_report_write(pos, npos, out);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 1;
    }
    printf("wrote %s\n", out);
    return 0;
}
