/* kd_report.h - report.html: one self-contained page for one or more runs.
 *
 * The page is plain HTML with inline SVG charts and an inline style sheet:
 * no JavaScript, no external URL, so it opens offline and can be mailed.
 * It holds, for each run directory (docs/report.md):
 *   - curves read from metrics.jsonl: one chart per known metric that is
 *     present (training loss per step and per epoch, test loss, test
 *     accuracy, validation loss and perplexity, learning rate), one line per
 *     (run, role); every plotted point carries its value as data-x/data-y;
 *   - the results table from summary.json (a missing one means the run did
 *     not finish, and the page says so);
 *   - the resolved config.ini, side by side for several runs, differences
 *     marked;
 *   - the machine recorded in summary.json (CPU, cores, memory, OS, kernel,
 *     compiler, BLAS, distill version), or this machine's when the run did
 *     not record one (the page says which).
 * Malformed metrics lines and NaN/Inf values are skipped and counted in a
 * note on the page.
 *
 *     const char *runs[] = {"runs/a", "runs/b"};
 *     if (kd_report_write(runs, 2, "report.html") != KD_OK)
 *         fprintf(stderr, "%s\n", kd_error_message());
 */
#ifndef KD_REPORT_H
#define KD_REPORT_H
#include "kd.h"

struct cJSON;

/* Writes the report of n_runs (>= 1) run directories to out_path
 * (atomically). Fails with a message naming the directory when one is
 * missing or holds none of metrics.jsonl, summary.json, config.ini, or
 * naming out_path when it cannot be written. Curves of a crashed run are
 * still drawn. */
kd_status kd_report_write(const char *const *run_dirs, int n_runs, const char *out_path);

/* Adds "machine": {cpu, cores, memory_gib, os, kernel, compiler, blas,
 * distill} describing this machine and this build to obj (a cJSON object;
 * summary.json records it so a later report shows where the run ran). */
void kd_report_add_machine(struct cJSON *obj);

#endif
