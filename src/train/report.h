/* report.h - internal: what report.c (reading the run directories) and
 * report_page.c (writing the HTML) share: a growing text buffer, the table
 * of known metrics, and the runs as read.
 */
#ifndef KD_TRAIN_REPORT_H
#define KD_TRAIN_REPORT_H
#include <cjson/cJSON.h>

#include "kd_report.h"

/* Text that grows; s is always NUL-terminated (NULL while empty). */
typedef struct kd_rbuf {
    char *s;
    size_t n, cap;
} kd_rbuf;

void kd_rbuf_put(kd_rbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* s escaped for HTML text and attribute values; control characters (which
 * HTML does not allow) become U+FFFD. */
void kd_rbuf_esc(kd_rbuf *b, const char *s);

/* A metric the page knows: its key in metrics.jsonl, the key it is plotted
 * against, the chart's title and y label. */
typedef struct kd_rp_metric {
    const char *key, *x, *title, *ylabel;
    int percent; /* tick labels as percentages */
} kd_rp_metric;
enum { KD_REPORT_N_METRICS = 7 };
extern const kd_rp_metric kd_report_metrics[KD_REPORT_N_METRICS]; /* in chart order */

/* One line of a chart: the points of one metric for one (run, role). */
typedef struct kd_rp_series {
    int run, metric, role;
    double *x, *y;
    int n, cap;
} kd_rp_series;

typedef struct kd_rp_cfg {
    char *section, *key, *value;
} kd_rp_cfg;

typedef struct kd_rp_run {
    char *dir, *label;
    cJSON *summary; /* NULL: missing or unreadable */
    kd_rp_cfg *cfg;
    int n_cfg;
} kd_rp_run;

typedef struct kd_rp_ctx {
    kd_rp_run *runs;
    int n_runs;
    kd_rp_series *ser;
    int n_ser, cap_ser;
    char **roles; /* in order of first appearance: a role's colour */
    int n_roles;
    kd_rbuf notes; /* <li> items */
} kd_rp_ctx;

/* The whole page of c into b. */
void kd_report_page(kd_rbuf *b, const kd_rp_ctx *c);

#endif
