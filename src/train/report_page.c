/* report_page.c - the HTML of a report (report.h): notes, runs, results,
 * one inline-SVG chart per known metric present, configuration, machine.
 *
 * Charts are drawn in a fixed 560x300 viewBox scaled by CSS; axes get
 * about five ticks at 1, 2 or 5 times a power of ten. A role keeps its
 * colour across charts; runs differ by dash pattern. Each plotted value is
 * a <circle> carrying data-run, data-role, data-x and data-y (the shortest
 * text that reads back as the same double) and a <title> for hovering.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "train/report.h"

/* The shortest %g text that reads back as exactly v. */
static void fmt_exact(char *out, size_t n, double v) {
    for (int p = 6; p <= 17; p++) {
        snprintf(out, n, "%.*g", p, v);
        if (strtod(out, NULL) == v) return;
    }
}

/* 1234567 -> "1,234,567" */
static void fmt_int(char *out, size_t n, double v) {
    char d[64];
    snprintf(d, sizeof d, "%.0f", fabs(v));
    size_t L = strlen(d), k = 0;
    if (v < 0 && k + 1 < n) out[k++] = '-';
    for (size_t i = 0; i < L && k + 2 < n; i++) {
        if (i && (L - i) % 3 == 0) out[k++] = ',';
        out[k++] = d[i];
    }
    out[k] = '\0';
}

static const char *const COLORS[] = {"#1f77b4", "#e4572e", "#2ca02c", "#9467bd",
                                     "#8c564b", "#e377c2", "#17becf", "#bcbd22"};
enum { N_COLORS = sizeof COLORS / sizeof COLORS[0] };
/* runs are told apart by dash pattern: SVG dasharray and the legend's CSS border */
static const char *const DASH[] = {"", "7 4", "2 3", "10 3 2 3"};
static const char *const BORDER[] = {"solid", "dashed", "dotted", "double"};

static const char CSS[] =
    "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#222;"
    "max-width:1160px;margin:20px auto;padding:0 14px}\n"
    "h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;"
    "padding-bottom:3px}\n"
    ".sub{color:#666;margin:0}\n"
    "table{border-collapse:collapse;font-size:13px;margin:4px 0}\n"
    "th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #eee;vertical-align:top}\n"
    "thead th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}\n"
    "tr.differs td{background:#fff4d6}table.machine td.num{text-align:left}\n"
    ".cfg{display:flex;flex-wrap:wrap;gap:6px 22px;align-items:flex-start}.cfg thead th{background:#eef1f8}\n"
    "tr.unfinished td{color:#a33}\n"
    ".notes li{color:#8a4b00}\n"
    ".charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}\n"
    "figure.chart{margin:0;border:1px solid #e2e2e2;border-radius:4px;padding:8px 10px}\n"
    "figcaption{font-weight:600;margin-bottom:2px}figcaption span{font-weight:400;color:#777}\n"
    "svg{width:100%;height:auto;display:block}svg text{font-size:11px;fill:#555}\n"
    "svg .grid{stroke:#ececec}svg .frame{fill:none;stroke:#bbb}svg .label{font-size:12px;fill:#333}\n"
    "svg polyline{fill:none;stroke-width:1.6}\n"
    ".legend{list-style:none;padding:0;margin:4px 0 0;display:flex;flex-wrap:wrap;gap:2px 16px;font-size:12px}\n"
    ".sw{display:inline-block;width:24px;height:0;vertical-align:middle;margin-right:6px}\n"
    "pre{margin:0;font-size:12px}\n";

typedef struct axis {
    double lo, hi, step;
    int dec;
} axis;

/* Ticks at 1, 2 or 5 times a power of ten, about five of them; the range
 * is widened to whole ticks. integer: ticks are at least 1 apart. */
static axis make_axis(double mn, double mx, int integer) {
    axis a;
    if (!(mx > mn)) {
        double d = mn == 0.0 ? 1.0 : fabs(mn) * 0.1;
        if (integer && d < 1.0) d = 1.0;
        mn -= d;
        mx += d;
        if (!(mx > mn)) { /* d underflowed (subnormal values) */
            mn -= 1.0;
            mx += 1.0;
        }
    }
    double raw = (mx - mn) / 5.0;
    if (!isfinite(raw) || raw <= 0) { /* a span near DBL_MAX: no rounding */
        a.lo = mn;
        a.hi = mx;
        a.step = mx / 4.0 - mn / 4.0;
        a.dec = 0;
        return a;
    }
    double mag = pow(10.0, floor(log10(raw))), f = raw / mag;
    a.step = (f < 1.5 ? 1.0 : f < 3.0 ? 2.0 : f < 7.0 ? 5.0 : 10.0) * mag;
    if (integer && a.step < 1.0) a.step = 1.0;
    a.lo = floor(mn / a.step) * a.step + 0.0;
    a.hi = ceil(mx / a.step) * a.step + 0.0;
    a.dec = a.step >= 1.0 ? 0 : (int)ceil(-log10(a.step) - 1e-9);
    return a;
}

static void tick_label(char *out, size_t n, double v, const axis *a, int percent) {
    if (fabs(v) < a->step * 1e-9) v = 0.0;
    double big = percent ? fabs(v) * 100.0 : fabs(v);
    if (big >= 1e6 || a->dec > 8) {
        snprintf(out, n, percent ? "%.3g%%" : "%.3g", percent ? v * 100.0 : v);
    } else if (percent) {
        snprintf(out, n, "%.*f%%", a->dec > 2 ? a->dec - 2 : 0, v * 100.0);
    } else {
        snprintf(out, n, "%.*f", a->dec, v);
    }
}

static void series_label(kd_rbuf *b, const kd_rp_ctx *c, const kd_rp_series *s) {
    if (c->n_runs > 1) {
        kd_rbuf_esc(b, c->runs[s->run].label);
        kd_rbuf_put(b, ": ");
    }
    kd_rbuf_esc(b, c->roles[s->role]);
}

enum { W = 560, H = 300, ML = 66, MR = 14, MT = 12, MB = 44 };

static void chart(kd_rbuf *b, const kd_rp_ctx *c, int m) {
    const kd_rp_metric *M = &kd_report_metrics[m];
    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
    int xint = 1, any = 0;
    for (int i = 0; i < c->n_ser; i++) {
        const kd_rp_series *s = &c->ser[i];
        if (s->metric != m) continue;
        any = 1;
        for (int k = 0; k < s->n; k++) {
            xmin = fmin(xmin, s->x[k]);
            xmax = fmax(xmax, s->x[k]);
            ymin = fmin(ymin, s->y[k]);
            ymax = fmax(ymax, s->y[k]);
            xint &= s->x[k] == floor(s->x[k]);
        }
    }
    if (!any) return;
    axis ax = make_axis(xmin, xmax, xint), ay = make_axis(ymin, ymax, 0);
    const double px0 = ML, px1 = W - MR, py0 = MT, py1 = H - MB;
#define PX(v) (px0 + ((v)-ax.lo) / (ax.hi - ax.lo) * (px1 - px0))
#define PY(v) (py1 - ((v)-ay.lo) / (ay.hi - ay.lo) * (py1 - py0))
    kd_rbuf_put(b, "<figure class=\"chart\" id=\"chart-%s\">\n<figcaption>%s <span>vs %s</span></figcaption>\n", M->key,
                M->title, M->x);
    kd_rbuf_put(b,
                "<svg class=\"chart\" data-metric=\"%s\" viewBox=\"0 0 %d %d\" width=\"%d\" height=\"%d\" role=\"img\" "
                "aria-label=\"%s\">\n",
                M->key, W, H, W, H, M->title);
    char lab[64];
    kd_rbuf_put(b, "<g class=\"axis\">\n");
    for (int k = 0;; k++) {
        double v = ax.lo + k * ax.step;
        if (v > ax.hi + ax.step * 1e-6 || k > 50) break;
        double x = PX(v);
        tick_label(lab, sizeof lab, v, &ax, 0);
        kd_rbuf_put(b, "<line class=\"grid\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>", x, py0, x, py1);
        kd_rbuf_put(b, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", x, py1 + 15, lab);
    }
    for (int k = 0;; k++) {
        double v = ay.lo + k * ay.step;
        if (v > ay.hi + ay.step * 1e-6 || k > 50) break;
        double y = PY(v);
        tick_label(lab, sizeof lab, v, &ay, M->percent);
        kd_rbuf_put(b, "<line class=\"grid\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>", px0, y, px1, y);
        kd_rbuf_put(b, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n", px0 - 6, y + 4, lab);
    }
    kd_rbuf_put(b, "<rect class=\"frame\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\"/>\n", px0, py0,
                px1 - px0, py1 - py0);
    kd_rbuf_put(b, "<text class=\"label\" x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", (px0 + px1) / 2,
                H - 8, M->x);
    kd_rbuf_put(b,
                "<text class=\"label\" transform=\"translate(14 %.1f) rotate(-90)\" text-anchor=\"middle\">%s</text>\n",
                (py0 + py1) / 2, M->ylabel);
    kd_rbuf_put(b, "</g>\n");
    for (int i = 0; i < c->n_ser; i++) {
        const kd_rp_series *s = &c->ser[i];
        if (s->metric != m) continue;
        const char *col = COLORS[s->role % N_COLORS], *dash = DASH[s->run % 4];
        const char *run = c->runs[s->run].label, *role = c->roles[s->role];
        kd_rbuf_put(b, "<g class=\"series\" data-run=\"");
        kd_rbuf_esc(b, run);
        kd_rbuf_put(b, "\" data-role=\"");
        kd_rbuf_esc(b, role);
        kd_rbuf_put(b, "\">\n");
        if (s->n > 1) {
            kd_rbuf_put(b, "<polyline stroke=\"%s\"%s%s%s points=\"", col, *dash ? " stroke-dasharray=\"" : "", dash,
                        *dash ? "\"" : "");
            for (int k = 0; k < s->n; k++) kd_rbuf_put(b, "%s%.1f,%.1f", k ? " " : "", PX(s->x[k]), PY(s->y[k]));
            kd_rbuf_put(b, "\"/>\n");
        }
        double r = s->n <= 60 ? 3.0 : 1.6;
        for (int k = 0; k < s->n; k++) {
            char xs[40], ys[40];
            fmt_exact(xs, sizeof xs, s->x[k]);
            fmt_exact(ys, sizeof ys, s->y[k]);
            kd_rbuf_put(b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"%.1f\" fill=\"%s\" data-run=\"", PX(s->x[k]),
                        PY(s->y[k]), r, col);
            kd_rbuf_esc(b, run);
            kd_rbuf_put(b, "\" data-role=\"");
            kd_rbuf_esc(b, role);
            kd_rbuf_put(b, "\" data-x=\"%s\" data-y=\"%s\"><title>", xs, ys);
            series_label(b, c, s);
            kd_rbuf_put(b, ", %s %s: %s %s</title></circle>\n", M->x, xs, M->key, ys);
        }
        kd_rbuf_put(b, "</g>\n");
    }
    kd_rbuf_put(b, "</svg>\n<ul class=\"legend\">\n");
    for (int i = 0; i < c->n_ser; i++) {
        const kd_rp_series *s = &c->ser[i];
        if (s->metric != m) continue;
        kd_rbuf_put(b, "<li data-run=\"");
        kd_rbuf_esc(b, c->runs[s->run].label);
        kd_rbuf_put(b, "\" data-role=\"");
        kd_rbuf_esc(b, c->roles[s->role]);
        kd_rbuf_put(b, "\"><span class=\"sw\" style=\"border-top:3px %s %s\"></span>", BORDER[s->run % 4],
                    COLORS[s->role % N_COLORS]);
        series_label(b, c, s);
        kd_rbuf_put(b, "</li>\n");
    }
    kd_rbuf_put(b, "</ul>\n</figure>\n");
#undef PX
#undef PY
}

static const char *pretty_key(const char *k) {
    static const char *const names[][2] = {
        {"model", "model"},     {"test_acc", "test acc"},        {"test_loss", "test loss"},
        {"params", "params"},   {"train_seconds", "train time"}, {"samples_per_second", "samples/s"},
        {"loaded", "loaded"},   {"val_loss", "val loss"},        {"val_ppl", "val ppl"},
        {"loss", "loss spec"},  {"threads", "threads"},          {"cpu", "CPU"},
        {"cores", "cores"},     {"memory_gib", "memory"},        {"os", "OS"},
        {"kernel", "kernel"},   {"compiler", "compiler"},        {"blas", "BLAS"},
        {"distill", "distill"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(names[i][0], k) == 0) return names[i][1];
    return k;
}

static int is_scalar(const cJSON *v) { return cJSON_IsNumber(v) || cJSON_IsString(v) || cJSON_IsBool(v); }

/* One table cell for a summary value; numbers keep their exact value in
 * data-value. */
static void value_cell(kd_rbuf *b, const char *key, const cJSON *v) {
    if (!v) {
        kd_rbuf_put(b, "<td></td>");
        return;
    }
    kd_rbuf_put(b, "<td data-key=\"");
    kd_rbuf_esc(b, key);
    kd_rbuf_put(b, "\"");
    if (cJSON_IsString(v)) {
        kd_rbuf_put(b, ">");
        kd_rbuf_esc(b, v->valuestring);
    } else if (cJSON_IsBool(v)) {
        kd_rbuf_put(b, ">%s", cJSON_IsTrue(v) ? "yes" : "no");
    } else if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        char ex[40], txt[64];
        fmt_exact(ex, sizeof ex, d);
        size_t L = strlen(key);
        if (!isfinite(d))
            snprintf(txt, sizeof txt, "%s", ex);
        else if ((L >= 4 && strcmp(key + L - 4, "_acc") == 0) || strcmp(key, "acc") == 0)
            snprintf(txt, sizeof txt, "%.2f%%", 100.0 * d);
        else if (strcmp(key, "params") == 0 || strcmp(key, "cores") == 0 || strcmp(key, "threads") == 0)
            fmt_int(txt, sizeof txt, d);
        else if (strcmp(key, "train_seconds") == 0)
            snprintf(txt, sizeof txt, "%.1f s", d);
        else if (strcmp(key, "samples_per_second") == 0)
            fmt_int(txt, sizeof txt, round(d));
        else if (strcmp(key, "memory_gib") == 0)
            snprintf(txt, sizeof txt, "%.1f GiB", d);
        else if (strstr(key, "loss"))
            snprintf(txt, sizeof txt, "%.4f", d);
        else
            snprintf(txt, sizeof txt, "%.6g", d);
        kd_rbuf_put(b, " class=\"num\" data-value=\"%s\">%s", ex, txt);
    } else {
        kd_rbuf_put(b, ">");
    }
    kd_rbuf_put(b, "</td>");
}

/* keys: the union (first appearance order) of scalar keys of objs */
static int key_union(const cJSON *const *objs, int n, const char **keys, int max) {
    int nk = 0;
    for (int i = 0; i < n; i++) {
        if (!objs[i]) continue;
        for (const cJSON *v = objs[i]->child; v; v = v->next) {
            if (!is_scalar(v) || !v->string) continue;
            int seen = 0;
            for (int k = 0; k < nk && !seen; k++) seen = strcmp(keys[k], v->string) == 0;
            if (!seen && nk < max) keys[nk++] = v->string;
        }
    }
    return nk;
}

static int is_role_obj(const cJSON *v) { return cJSON_IsObject(v) && v->string && strcmp(v->string, "machine") != 0; }

static void runs_section(kd_rbuf *b, const kd_rp_ctx *c) {
    enum { MAXK = 64 };
    const char *keys[MAXK];
    const cJSON **objs = kd_calloc((size_t)c->n_runs, sizeof *objs);
    for (int r = 0; r < c->n_runs; r++) objs[r] = c->runs[r].summary;
    int nk = key_union(objs, c->n_runs, keys, MAXK);
    kd_rbuf_put(b, "<h2 id=\"runs\">Runs</h2>\n<table class=\"runs\">\n<thead><tr><th>run</th><th>directory</th>"
                   "<th>status</th>");
    for (int k = 0; k < nk; k++) {
        kd_rbuf_put(b, "<th>");
        kd_rbuf_esc(b, pretty_key(keys[k]));
        kd_rbuf_put(b, "</th>");
    }
    kd_rbuf_put(b, "</tr></thead>\n<tbody>\n");
    for (int r = 0; r < c->n_runs; r++) {
        const kd_rp_run *run = &c->runs[r];
        kd_rbuf_put(b, "<tr data-run=\"");
        kd_rbuf_esc(b, run->label);
        kd_rbuf_put(b, "\"%s><td>", run->summary ? "" : " class=\"unfinished\"");
        kd_rbuf_esc(b, run->label);
        kd_rbuf_put(b, "</td><td>");
        kd_rbuf_esc(b, run->dir);
        kd_rbuf_put(b, "</td><td>%s</td>", run->summary ? "finished" : "did not finish (no summary.json)");
        for (int k = 0; k < nk; k++)
            value_cell(b, keys[k], run->summary ? cJSON_GetObjectItemCaseSensitive(run->summary, keys[k]) : NULL);
        kd_rbuf_put(b, "</tr>\n");
    }
    kd_rbuf_put(b, "</tbody>\n</table>\n");
    free(objs);
}

static void results_section(kd_rbuf *b, const kd_rp_ctx *c) {
    enum { MAXK = 64 };
    const char *keys[MAXK];
    int nobj = 0;
    for (int r = 0; r < c->n_runs; r++)
        if (c->runs[r].summary)
            for (const cJSON *v = c->runs[r].summary->child; v; v = v->next) nobj += is_role_obj(v);
    const cJSON **objs = kd_calloc((size_t)nobj + 1, sizeof *objs);
    int no = 0;
    for (int r = 0; r < c->n_runs; r++)
        if (c->runs[r].summary)
            for (const cJSON *v = c->runs[r].summary->child; v; v = v->next)
                if (is_role_obj(v)) objs[no++] = v;
    int nk = key_union(objs, no, keys, MAXK);
    int multi = c->n_runs > 1;
    kd_rbuf_put(b, "<h2 id=\"results\">Results</h2>\n<table class=\"results\">\n<thead><tr>%s<th>role</th>",
                multi ? "<th>run</th>" : "");
    for (int k = 0; k < nk; k++) {
        kd_rbuf_put(b, "<th>");
        kd_rbuf_esc(b, pretty_key(keys[k]));
        kd_rbuf_put(b, "</th>");
    }
    kd_rbuf_put(b, "</tr></thead>\n<tbody>\n");
    for (int r = 0; r < c->n_runs; r++) {
        const kd_rp_run *run = &c->runs[r];
        if (!run->summary) {
            kd_rbuf_put(b, "<tr class=\"unfinished\" data-run=\"");
            kd_rbuf_esc(b, run->label);
            kd_rbuf_put(b, "\">");
            if (multi) {
                kd_rbuf_put(b, "<td>");
                kd_rbuf_esc(b, run->label);
                kd_rbuf_put(b, "</td>");
            }
            kd_rbuf_put(b, "<td colspan=\"%d\">did not finish: no results (no summary.json)</td></tr>\n", nk + 1);
            continue;
        }
        for (const cJSON *o = run->summary->child; o; o = o->next) {
            if (!is_role_obj(o)) continue;
            kd_rbuf_put(b, "<tr data-run=\"");
            kd_rbuf_esc(b, run->label);
            kd_rbuf_put(b, "\" data-role=\"");
            kd_rbuf_esc(b, o->string);
            kd_rbuf_put(b, "\">");
            if (multi) {
                kd_rbuf_put(b, "<td>");
                kd_rbuf_esc(b, run->label);
                kd_rbuf_put(b, "</td>");
            }
            kd_rbuf_put(b, "<td>");
            kd_rbuf_esc(b, o->string);
            kd_rbuf_put(b, "</td>");
            for (int k = 0; k < nk; k++) value_cell(b, keys[k], cJSON_GetObjectItemCaseSensitive(o, keys[k]));
            kd_rbuf_put(b, "</tr>\n");
        }
    }
    kd_rbuf_put(b, "</tbody>\n</table>\n");
    free(objs);
}

static const char *cfg_get(const kd_rp_run *run, const char *section, const char *key) {
    for (int i = 0; i < run->n_cfg; i++)
        if (strcmp(run->cfg[i].section, section) == 0 && strcmp(run->cfg[i].key, key) == 0) return run->cfg[i].value;
    return NULL;
}

static void config_section(kd_rbuf *b, const kd_rp_ctx *c) {
    int multi = c->n_runs > 1, n = 0;
    for (int r = 0; r < c->n_runs; r++) n += c->runs[r].n_cfg;
    kd_rbuf_put(b, "<h2 id=\"config\">Configuration</h2>\n");
    if (!n) {
        kd_rbuf_put(b, "<p>No config.ini (or an empty one).</p>\n");
        return;
    }
    /* the union of (section, key) over the runs, in order of first appearance */
    const kd_rp_cfg **u = kd_malloc((size_t)n * sizeof *u);
    int nu = 0;
    for (int r = 0; r < c->n_runs; r++)
        for (int i = 0; i < c->runs[r].n_cfg; i++) {
            const kd_rp_cfg *e = &c->runs[r].cfg[i];
            int earlier = 0;
            for (int q = 0; q < r && !earlier; q++) earlier = cfg_get(&c->runs[q], e->section, e->key) != NULL;
            if (!earlier) u[nu++] = e;
        }
    if (multi) kd_rbuf_put(b, "<p>The resolved config.ini of each run; highlighted rows differ between runs.</p>\n");
    kd_rbuf_put(b, "<div class=\"cfg\">\n");
    for (int i = 0; i < nu; i++) { /* one table per section, at its first key */
        int first = 1;
        for (int k = 0; k < i && first; k++) first = strcmp(u[k]->section, u[i]->section) != 0;
        if (!first) continue;
        kd_rbuf_put(b, "<table class=\"config\">\n<thead><tr><th>[");
        kd_rbuf_esc(b, u[i]->section);
        kd_rbuf_put(b, "]</th>");
        for (int r = 0; r < c->n_runs; r++) {
            kd_rbuf_put(b, "<th>");
            if (multi) kd_rbuf_esc(b, c->runs[r].label);
            kd_rbuf_put(b, "</th>");
        }
        kd_rbuf_put(b, "</tr></thead>\n<tbody>\n");
        for (int k = i; k < nu; k++) {
            const kd_rp_cfg *e = u[k];
            if (strcmp(e->section, u[i]->section) != 0) continue;
            int differs = 0;
            for (int q = 0; q < c->n_runs; q++) {
                const char *v = cfg_get(&c->runs[q], e->section, e->key);
                differs |= !v || strcmp(v, e->value) != 0;
            }
            kd_rbuf_put(b, "<tr%s><td>", differs ? " class=\"differs\"" : "");
            kd_rbuf_esc(b, e->key);
            kd_rbuf_put(b, "</td>");
            for (int q = 0; q < c->n_runs; q++) {
                const char *v = cfg_get(&c->runs[q], e->section, e->key);
                kd_rbuf_put(b, "<td>");
                if (v)
                    kd_rbuf_esc(b, v);
                else
                    kd_rbuf_put(b, "&mdash;");
                kd_rbuf_put(b, "</td>");
            }
            kd_rbuf_put(b, "</tr>\n");
        }
        kd_rbuf_put(b, "</tbody>\n</table>\n");
    }
    kd_rbuf_put(b, "</div>\n");
    free(u);
}

static void machine_section(kd_rbuf *b, const kd_rp_ctx *c) {
    enum { MAXK = 32 };
    const char *keys[MAXK];
    const cJSON **objs = kd_calloc((size_t)c->n_runs, sizeof *objs);
    cJSON *here = NULL;
    int missing = 0;
    for (int r = 0; r < c->n_runs; r++) {
        const cJSON *m = c->runs[r].summary ? cJSON_GetObjectItemCaseSensitive(c->runs[r].summary, "machine") : NULL;
        if (cJSON_IsObject(m)) {
            objs[r] = m;
        } else {
            if (!here) {
                here = cJSON_CreateObject();
                kd_report_add_machine(here);
            }
            objs[r] = cJSON_GetObjectItemCaseSensitive(here, "machine");
            missing = 1;
        }
    }
    int nk = key_union(objs, c->n_runs, keys, MAXK);
    kd_rbuf_put(b, "<h2 id=\"machine\">Machine</h2>\n");
    if (missing)
        kd_rbuf_put(
            b, "<p>Where a run did not record its machine in summary.json, the machine shown is the one that wrote "
               "this report.</p>\n");
    kd_rbuf_put(b, "<table class=\"machine\">\n<thead><tr><th></th>");
    for (int r = 0; r < c->n_runs; r++) {
        const cJSON *m = c->runs[r].summary ? cJSON_GetObjectItemCaseSensitive(c->runs[r].summary, "machine") : NULL;
        kd_rbuf_put(b, "<th>");
        kd_rbuf_esc(b, c->n_runs > 1 ? c->runs[r].label : "");
        kd_rbuf_put(b, "%s%s</th>", c->n_runs > 1 ? " " : "",
                    cJSON_IsObject(m) ? "(recorded by the run)" : "(this machine)");
    }
    kd_rbuf_put(b, "</tr></thead>\n<tbody>\n");
    for (int k = 0; k < nk; k++) {
        kd_rbuf_put(b, "<tr><th>");
        kd_rbuf_esc(b, pretty_key(keys[k]));
        kd_rbuf_put(b, "</th>");
        for (int r = 0; r < c->n_runs; r++) value_cell(b, keys[k], cJSON_GetObjectItemCaseSensitive(objs[r], keys[k]));
        kd_rbuf_put(b, "</tr>\n");
    }
    kd_rbuf_put(b, "</tbody>\n</table>\n");
    cJSON_Delete(here);
    free(objs);
}

void kd_report_page(kd_rbuf *b, const kd_rp_ctx *c) {
    kd_rbuf_put(b, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>distill report: ");
    for (int r = 0; r < c->n_runs; r++) {
        if (r) kd_rbuf_put(b, ", ");
        kd_rbuf_esc(b, c->runs[r].label);
    }
    kd_rbuf_put(
        b, "</title>\n<style>\n%s</style>\n</head>\n<body>\n<header>\n<h1>distill report</h1>\n<p class=\"sub\">", CSS);
    for (int r = 0; r < c->n_runs; r++) {
        if (r) kd_rbuf_put(b, " &middot; ");
        kd_rbuf_esc(b, c->runs[r].label);
    }
    kd_rbuf_put(b, " &mdash; written by distill %s</p>\n</header>\n", KD_VERSION);
    if (c->notes.n)
        kd_rbuf_put(b, "<section id=\"notes\">\n<h2>Notes</h2>\n<ul class=\"notes\">\n%s</ul>\n</section>\n",
                    c->notes.s);
    kd_rbuf_put(b, "<section>\n");
    runs_section(b, c);
    results_section(b, c);
    kd_rbuf_put(b, "</section>\n<section id=\"curves\">\n<h2>Curves</h2>\n");
    if (!c->n_ser) {
        kd_rbuf_put(b, "<p>No known metric in metrics.jsonl: nothing to plot.</p>\n");
    } else {
        kd_rbuf_put(b, "<div class=\"charts\">\n");
        for (int m = 0; m < KD_REPORT_N_METRICS; m++) chart(b, c, m);
        kd_rbuf_put(b, "</div>\n");
    }
    kd_rbuf_put(b, "</section>\n<section>\n");
    config_section(b, c);
    kd_rbuf_put(b, "</section>\n<section>\n");
    machine_section(b, c);
    kd_rbuf_put(b, "</section>\n</body>\n</html>\n");
}
