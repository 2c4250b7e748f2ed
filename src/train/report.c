/* report.c - report.html for one or more run directories (kd_report.h,
 * docs/report.md).
 *
 * Reads each run's metrics.jsonl (one JSON object per line), summary.json
 * and config.ini, and writes one page: notes, the runs, results, one
 * inline-SVG chart per known metric, the configuration and the machine.
 * The page is built in memory and written atomically. Everything that
 * comes from a file is HTML-escaped; plotted points carry their values as
 * data-x/data-y (shortest text that reads back as the same double) so a
 * test can compare the page with metrics.jsonl.
 *
 * Tolerance: a line that is not a JSON object is skipped and counted; the
 * trainer prints numbers with printf, so a NaN or Inf would appear as a bare
 * nan/inf word, which is read as null; null and non-finite values are not
 * plotted and are counted. A missing summary.json means the run did not
 * finish: its curves are drawn and the page says so.
 * Deliberately not here: per-term loss values ("1.ce", "2.kd" keys) and any
 * other unknown key are not plotted; no JavaScript (no zoom, no toggles).
 */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "kd_report.h"

/* ---------------------------------------------------------------- text */

typedef struct rbuf {
    char *s;
    size_t n, cap;
} rbuf;

static void bgrow(rbuf *b, size_t extra) {
    if (b->n + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + extra + 1) cap *= 2;
    b->s = kd_realloc(b->s, cap);
    b->cap = cap;
}

static void bput(rbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bput(rbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    KD_ASSERT(k >= 0, "bad format %s", fmt);
    bgrow(b, (size_t)k);
    va_start(ap, fmt);
    vsnprintf(b->s + b->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}

/* s escaped for HTML text and attribute values; control characters (which
 * HTML does not allow) become U+FFFD. */
static void besc(rbuf *b, const char *s) {
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        switch (ch) {
        case '&':
            bput(b, "&amp;");
            break;
        case '<':
            bput(b, "&lt;");
            break;
        case '>':
            bput(b, "&gt;");
            break;
        case '"':
            bput(b, "&quot;");
            break;
        case '\'':
            bput(b, "&#39;");
            break;
        default:
            if ((ch < 0x20 && ch != '\t' && ch != '\n') || ch == 0x7f) {
                bput(b, "&#xFFFD;");
            } else {
                bgrow(b, 1);
                b->s[b->n++] = (char)ch;
                b->s[b->n] = '\0';
            }
        }
    }
}

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

static char *xstrdup_n(const char *s, size_t n) {
    char *t = kd_malloc(n + 1);
    memcpy(t, s, n);
    t[n] = '\0';
    return t;
}

/* ---------------------------------------------------------------- model */

/* The metrics the page knows, in the order their charts appear. */
static const struct rp_metric {
    const char *key, *x, *title, *ylabel;
    int percent; /* tick labels as percentages */
} METRICS[] = {
    {"loss", "step", "Training loss (per logged step)", "loss", 0},
    {"train_loss", "epoch", "Training loss (epoch mean)", "loss", 0},
    {"test_loss", "epoch", "Test loss", "cross-entropy", 0},
    {"test_acc", "epoch", "Test accuracy", "accuracy", 1},
    {"val_loss", "step", "Validation loss", "loss", 0},
    {"val_ppl", "step", "Validation perplexity", "perplexity", 0},
    {"lr", "step", "Learning rate", "learning rate", 0},
};
enum { N_METRICS = sizeof METRICS / sizeof METRICS[0] };

/* One line of a chart: the points of one metric for one (run, role). */
typedef struct rp_series {
    int run, metric, role;
    double *x, *y;
    int n, cap;
} rp_series;

typedef struct rp_cfg {
    char *section, *key, *value;
} rp_cfg;

typedef struct rp_run {
    char *dir, *label;
    cJSON *summary; /* NULL: missing or unreadable */
    rp_cfg *cfg;
    int n_cfg;
} rp_run;

typedef struct rp_ctx {
    rp_run *runs;
    int n_runs;
    rp_series *ser;
    int n_ser, cap_ser;
    char **roles; /* in order of first appearance: a role's colour */
    int n_roles;
    rbuf notes; /* <li> items */
} rp_ctx;

static void note(rp_ctx *c, int run, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(rp_ctx *c, int run, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    bput(&c->notes, "<li><b>");
    besc(&c->notes, c->runs[run].label);
    bput(&c->notes, "</b>: ");
    besc(&c->notes, msg);
    bput(&c->notes, "</li>\n");
}

static int role_id(rp_ctx *c, const char *role) {
    for (int i = 0; i < c->n_roles; i++)
        if (strcmp(c->roles[i], role) == 0) return i;
    c->roles = kd_realloc(c->roles, (size_t)(c->n_roles + 1) * sizeof *c->roles);
    c->roles[c->n_roles] = kd_strdup(role);
    return c->n_roles++;
}

static void add_point(rp_ctx *c, int run, int metric, int role, double x, double y) {
    rp_series *s = NULL;
    for (int i = c->n_ser - 1; i >= 0 && !s; i--)
        if (c->ser[i].run == run && c->ser[i].metric == metric && c->ser[i].role == role) s = &c->ser[i];
    if (!s) {
        if (c->n_ser == c->cap_ser) {
            c->cap_ser = c->cap_ser ? 2 * c->cap_ser : 16;
            c->ser = kd_realloc(c->ser, (size_t)c->cap_ser * sizeof *c->ser);
        }
        s = &c->ser[c->n_ser++];
        memset(s, 0, sizeof *s);
        s->run = run;
        s->metric = metric;
        s->role = role;
    }
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->x = kd_realloc(s->x, (size_t)s->cap * sizeof(double));
        s->y = kd_realloc(s->y, (size_t)s->cap * sizeof(double));
    }
    s->x[s->n] = x;
    s->y[s->n] = y;
    s->n++;
}

/* ---------------------------------------------------------------- reading */

static int word_is(const char *s, size_t w, const char *word) {
    if (strlen(word) != w) return 0;
    for (size_t i = 0; i < w; i++)
        if (tolower((unsigned char)s[i]) != word[i]) return 0;
    return 1;
}

/* One metrics line as JSON. printf writes NaN and Inf as bare words
 * (nan, -nan, inf), which JSON lacks: when the line does not parse, such
 * words outside strings are read as null and *patched is set. */
static cJSON *parse_line(const char *s, int *patched) {
    *patched = 0;
    cJSON *j = cJSON_ParseWithOpts(s, NULL, 1);
    if (j) return j;
    size_t n = strlen(s), k = 0;
    char *t = kd_malloc(2 * n + 1);
    int in_str = 0, hit = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (in_str) {
            t[k++] = ch;
            if (ch == '\\' && i + 1 < n)
                t[k++] = s[++i];
            else if (ch == '"')
                in_str = 0;
            continue;
        }
        if (ch == '"') {
            in_str = 1;
            t[k++] = ch;
            continue;
        }
        size_t j0 = i + (ch == '-' || ch == '+'), w = 0;
        while (isalpha((unsigned char)s[j0 + w])) w++;
        int after_word = i > 0 && (isalnum((unsigned char)s[i - 1]) || s[i - 1] == '.');
        if (w && !after_word &&
            (word_is(s + j0, w, "nan") || word_is(s + j0, w, "inf") || word_is(s + j0, w, "infinity"))) {
            memcpy(t + k, "null", 4);
            k += 4;
            i = j0 + w - 1;
            hit = 1;
            continue;
        }
        t[k++] = ch;
    }
    t[k] = '\0';
    if (hit) j = cJSON_ParseWithOpts(t, NULL, 1);
    free(t);
    *patched = j != NULL;
    return j;
}

static kd_status read_metrics(rp_ctx *c, int r) {
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->runs[r].dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        if (errno != ENOENT) return kd_errorf(KD_EIO, "%s: cannot read: %s", path, strerror(errno));
        note(c, r, "no metrics.jsonl: there are no curves for this run.");
        return KD_OK;
    }
    char *line = NULL, first_nf[200] = "";
    size_t cap = 0;
    long lineno = 0, bad = 0, first_bad = 0, nonfinite = 0, nonnum = 0, nox = 0, points = 0;
    while (getline(&line, &cap, f) >= 0) {
        lineno++;
        const char *p = line;
        while (isspace((unsigned char)*p)) p++;
        if (!*p) continue;
        int patched;
        cJSON *j = parse_line(line, &patched);
        if (!cJSON_IsObject(j)) {
            if (!bad++) first_bad = lineno;
            cJSON_Delete(j);
            continue;
        }
        const cJSON *rv = cJSON_GetObjectItemCaseSensitive(j, "role");
        const char *role = cJSON_IsString(rv) && rv->valuestring[0] ? rv->valuestring : "run";
        for (int m = 0; m < N_METRICS; m++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, METRICS[m].key);
            if (!v) continue;
            if (cJSON_IsNull(v) || (cJSON_IsNumber(v) && !isfinite(v->valuedouble))) {
                if (!nonfinite++)
                    snprintf(first_nf, sizeof first_nf, "%.60s %.60s at line %ld", role, METRICS[m].key, lineno);
                continue;
            }
            if (!cJSON_IsNumber(v)) {
                nonnum++;
                continue;
            }
            const cJSON *xv = cJSON_GetObjectItemCaseSensitive(j, METRICS[m].x);
            if (!cJSON_IsNumber(xv) || !isfinite(xv->valuedouble)) {
                nox++;
                continue;
            }
            add_point(c, r, m, role_id(c, role), xv->valuedouble, v->valuedouble);
            points++;
        }
        cJSON_Delete(j);
    }
    int rerr = ferror(f);
    free(line);
    fclose(f);
    if (rerr) return kd_errorf(KD_EIO, "%s: read failed", path);
    if (bad)
        note(c, r, "metrics.jsonl: %ld malformed line%s skipped (not a JSON object; the first is line %ld).", bad,
             bad == 1 ? "" : "s", first_bad);
    if (nonfinite)
        note(c, r, "metrics.jsonl: %ld NaN, Inf or null value%s not plotted (the first: %s).", nonfinite,
             nonfinite == 1 ? "" : "s", first_nf);
    if (nonnum) note(c, r, "metrics.jsonl: %ld value%s skipped: not a number.", nonnum, nonnum == 1 ? "" : "s");
    if (nox)
        note(c, r, "metrics.jsonl: %ld value%s without a numeric step/epoch not plotted.", nox, nox == 1 ? "" : "s");
    if (!points && lineno) note(c, r, "metrics.jsonl holds no known metric: there are no curves for this run.");
    return KD_OK;
}

/* Whole file, NUL-terminated; NULL with errno set when it cannot be read. */
static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    rbuf b = {0};
    bgrow(&b, 4096);
    size_t got;
    while ((got = fread(b.s + b.n, 1, b.cap - b.n - 1, f)) > 0) {
        b.n += got;
        bgrow(&b, 4096);
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b.s);
        errno = EIO;
        return NULL;
    }
    b.s[b.n] = '\0';
    return b.s;
}

static kd_status read_summary(rp_ctx *c, int r) {
    char path[4200];
    snprintf(path, sizeof path, "%s/summary.json", c->runs[r].dir);
    char *txt = slurp(path);
    if (!txt) {
        if (errno != ENOENT) return kd_errorf(KD_EIO, "%s: cannot read: %s", path, strerror(errno));
        note(c, r,
             "no summary.json: the run did not finish (it failed, was stopped, or is still running); the curves "
             "show what it logged.");
        return KD_OK;
    }
    cJSON *j = cJSON_ParseWithOpts(txt, NULL, 1);
    free(txt);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        note(c, r, "summary.json is not a JSON object: no results for this run.");
        return KD_OK;
    }
    c->runs[r].summary = j;
    return KD_OK;
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = '\0';
    return s;
}

/* config.ini as written by distill: [section] lines and key = value lines;
 * comments (; or #) and anything else are ignored. */
static kd_status read_config(rp_ctx *c, int r) {
    char path[4200];
    rp_run *run = &c->runs[r];
    snprintf(path, sizeof path, "%s/config.ini", run->dir);
    char *txt = slurp(path);
    if (!txt) {
        if (errno != ENOENT) return kd_errorf(KD_EIO, "%s: cannot read: %s", path, strerror(errno));
        note(c, r, "no config.ini.");
        return KD_OK;
    }
    char *section = kd_strdup("");
    for (char *ln = txt; ln && *ln;) {
        char *nl = strchr(ln, '\n');
        if (nl) *nl = '\0';
        char *s = trim(ln);
        ln = nl ? nl + 1 : NULL;
        if (*s == ';' || *s == '#' || !*s) continue;
        if (*s == '[') {
            char *e = strchr(s, ']');
            if (e) {
                free(section);
                section = xstrdup_n(s + 1, (size_t)(e - s - 1));
            }
            continue;
        }
        char *eq = strchr(s, '=');
        if (!eq) continue;
        *eq = '\0';
        run->cfg = kd_realloc(run->cfg, (size_t)(run->n_cfg + 1) * sizeof *run->cfg);
        rp_cfg *e = &run->cfg[run->n_cfg++];
        e->section = kd_strdup(section);
        e->key = kd_strdup(trim(s));
        e->value = kd_strdup(trim(eq + 1));
    }
    free(section);
    free(txt);
    return KD_OK;
}

/* ---------------------------------------------------------------- machine */

static void cpu_model(char *out, size_t n) {
    struct utsname u;
    snprintf(out, n, "%s", uname(&u) == 0 ? u.machine : "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (!colon) continue;
        *colon = '\0';
        const char *k = trim(line);
        if (strcmp(k, "model name") == 0 || strcmp(k, "Model") == 0 || strcmp(k, "cpu model") == 0) {
            snprintf(out, n, "%s", trim(colon + 1));
            break;
        }
    }
    fclose(f);
}

static void os_name(char *out, size_t n) {
    struct utsname u;
    snprintf(out, n, "%s", uname(&u) == 0 ? u.sysname : "unknown");
    FILE *f = fopen("/etc/os-release", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "PRETTY_NAME=", 12) != 0) continue;
        char *v = trim(line + 12);
        size_t L = strlen(v);
        if (L >= 2 && (v[0] == '"' || v[0] == '\'') && v[L - 1] == v[0]) {
            v[L - 1] = '\0';
            v++;
        }
        snprintf(out, n, "%s", v);
        break;
    }
    fclose(f);
}

void kd_report_add_machine(struct cJSON *obj) {
    cJSON *m = cJSON_AddObjectToObject(obj, "machine");
    char buf[512];
    cpu_model(buf, sizeof buf);
    cJSON_AddStringToObject(m, "cpu", buf);
    cJSON_AddNumberToObject(m, "cores", (double)sysconf(_SC_NPROCESSORS_ONLN));
    long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
    if (pages > 0 && psize > 0)
        cJSON_AddNumberToObject(m, "memory_gib", round((double)pages * (double)psize / 1073741824.0 * 10.0) / 10.0);
    os_name(buf, sizeof buf);
    cJSON_AddStringToObject(m, "os", buf);
    struct utsname u;
    if (uname(&u) == 0) {
        snprintf(buf, sizeof buf, "%.60s %.200s", u.sysname, u.release);
        cJSON_AddStringToObject(m, "kernel", buf);
    }
#if defined(__clang__)
    cJSON_AddStringToObject(m, "compiler", "clang " __clang_version__);
#elif defined(__GNUC__)
    cJSON_AddStringToObject(m, "compiler", "gcc " __VERSION__);
#else
    cJSON_AddStringToObject(m, "compiler", "unknown");
#endif
    snprintf(buf, sizeof buf, "%s", openblas_get_config());
    cJSON_AddStringToObject(m, "blas", trim(buf));
    cJSON_AddStringToObject(m, "distill", KD_VERSION);
}

/* ---------------------------------------------------------------- page */

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

static void series_label(rbuf *b, const rp_ctx *c, const rp_series *s) {
    if (c->n_runs > 1) {
        besc(b, c->runs[s->run].label);
        bput(b, ": ");
    }
    besc(b, c->roles[s->role]);
}

enum { W = 560, H = 300, ML = 66, MR = 14, MT = 12, MB = 44 };

static void chart(rbuf *b, const rp_ctx *c, int m) {
    const struct rp_metric *M = &METRICS[m];
    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
    int xint = 1, any = 0;
    for (int i = 0; i < c->n_ser; i++) {
        const rp_series *s = &c->ser[i];
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
    bput(b, "<figure class=\"chart\" id=\"chart-%s\">\n<figcaption>%s <span>vs %s</span></figcaption>\n", M->key,
         M->title, M->x);
    bput(b,
         "<svg class=\"chart\" data-metric=\"%s\" viewBox=\"0 0 %d %d\" width=\"%d\" height=\"%d\" role=\"img\" "
         "aria-label=\"%s\">\n",
         M->key, W, H, W, H, M->title);
    char lab[64];
    bput(b, "<g class=\"axis\">\n");
    for (int k = 0;; k++) {
        double v = ax.lo + k * ax.step;
        if (v > ax.hi + ax.step * 1e-6 || k > 50) break;
        double x = PX(v);
        tick_label(lab, sizeof lab, v, &ax, 0);
        bput(b, "<line class=\"grid\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>", x, py0, x, py1);
        bput(b, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", x, py1 + 15, lab);
    }
    for (int k = 0;; k++) {
        double v = ay.lo + k * ay.step;
        if (v > ay.hi + ay.step * 1e-6 || k > 50) break;
        double y = PY(v);
        tick_label(lab, sizeof lab, v, &ay, M->percent);
        bput(b, "<line class=\"grid\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>", px0, y, px1, y);
        bput(b, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n", px0 - 6, y + 4, lab);
    }
    bput(b, "<rect class=\"frame\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\"/>\n", px0, py0, px1 - px0,
         py1 - py0);
    bput(b, "<text class=\"label\" x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", (px0 + px1) / 2, H - 8,
         M->x);
    bput(b, "<text class=\"label\" transform=\"translate(14 %.1f) rotate(-90)\" text-anchor=\"middle\">%s</text>\n",
         (py0 + py1) / 2, M->ylabel);
    bput(b, "</g>\n");
    for (int i = 0; i < c->n_ser; i++) {
        const rp_series *s = &c->ser[i];
        if (s->metric != m) continue;
        const char *col = COLORS[s->role % N_COLORS], *dash = DASH[s->run % 4];
        const char *run = c->runs[s->run].label, *role = c->roles[s->role];
        bput(b, "<g class=\"series\" data-run=\"");
        besc(b, run);
        bput(b, "\" data-role=\"");
        besc(b, role);
        bput(b, "\">\n");
        if (s->n > 1) {
            bput(b, "<polyline stroke=\"%s\"%s%s%s points=\"", col, *dash ? " stroke-dasharray=\"" : "", dash,
                 *dash ? "\"" : "");
            for (int k = 0; k < s->n; k++) bput(b, "%s%.1f,%.1f", k ? " " : "", PX(s->x[k]), PY(s->y[k]));
            bput(b, "\"/>\n");
        }
        double r = s->n <= 60 ? 3.0 : 1.6;
        for (int k = 0; k < s->n; k++) {
            char xs[40], ys[40];
            fmt_exact(xs, sizeof xs, s->x[k]);
            fmt_exact(ys, sizeof ys, s->y[k]);
            bput(b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"%.1f\" fill=\"%s\" data-run=\"", PX(s->x[k]), PY(s->y[k]), r,
                 col);
            besc(b, run);
            bput(b, "\" data-role=\"");
            besc(b, role);
            bput(b, "\" data-x=\"%s\" data-y=\"%s\"><title>", xs, ys);
            series_label(b, c, s);
            bput(b, ", %s %s: %s %s</title></circle>\n", M->x, xs, M->key, ys);
        }
        bput(b, "</g>\n");
    }
    bput(b, "</svg>\n<ul class=\"legend\">\n");
    for (int i = 0; i < c->n_ser; i++) {
        const rp_series *s = &c->ser[i];
        if (s->metric != m) continue;
        bput(b, "<li data-run=\"");
        besc(b, c->runs[s->run].label);
        bput(b, "\" data-role=\"");
        besc(b, c->roles[s->role]);
        bput(b, "\"><span class=\"sw\" style=\"border-top:3px %s %s\"></span>", BORDER[s->run % 4],
             COLORS[s->role % N_COLORS]);
        series_label(b, c, s);
        bput(b, "</li>\n");
    }
    bput(b, "</ul>\n</figure>\n");
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
static void value_cell(rbuf *b, const char *key, const cJSON *v) {
    if (!v) {
        bput(b, "<td></td>");
        return;
    }
    bput(b, "<td data-key=\"");
    besc(b, key);
    bput(b, "\"");
    if (cJSON_IsString(v)) {
        bput(b, ">");
        besc(b, v->valuestring);
    } else if (cJSON_IsBool(v)) {
        bput(b, ">%s", cJSON_IsTrue(v) ? "yes" : "no");
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
        bput(b, " class=\"num\" data-value=\"%s\">%s", ex, txt);
    } else {
        bput(b, ">");
    }
    bput(b, "</td>");
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

static void runs_section(rbuf *b, const rp_ctx *c) {
    enum { MAXK = 64 };
    const char *keys[MAXK];
    const cJSON **objs = kd_calloc((size_t)c->n_runs, sizeof *objs);
    for (int r = 0; r < c->n_runs; r++) objs[r] = c->runs[r].summary;
    int nk = key_union(objs, c->n_runs, keys, MAXK);
    bput(b, "<h2 id=\"runs\">Runs</h2>\n<table class=\"runs\">\n<thead><tr><th>run</th><th>directory</th>"
            "<th>status</th>");
    for (int k = 0; k < nk; k++) {
        bput(b, "<th>");
        besc(b, pretty_key(keys[k]));
        bput(b, "</th>");
    }
    bput(b, "</tr></thead>\n<tbody>\n");
    for (int r = 0; r < c->n_runs; r++) {
        const rp_run *run = &c->runs[r];
        bput(b, "<tr data-run=\"");
        besc(b, run->label);
        bput(b, "\"%s><td>", run->summary ? "" : " class=\"unfinished\"");
        besc(b, run->label);
        bput(b, "</td><td>");
        besc(b, run->dir);
        bput(b, "</td><td>%s</td>", run->summary ? "finished" : "did not finish (no summary.json)");
        for (int k = 0; k < nk; k++)
            value_cell(b, keys[k], run->summary ? cJSON_GetObjectItemCaseSensitive(run->summary, keys[k]) : NULL);
        bput(b, "</tr>\n");
    }
    bput(b, "</tbody>\n</table>\n");
    free(objs);
}

static void results_section(rbuf *b, const rp_ctx *c) {
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
    bput(b, "<h2 id=\"results\">Results</h2>\n<table class=\"results\">\n<thead><tr>%s<th>role</th>",
         multi ? "<th>run</th>" : "");
    for (int k = 0; k < nk; k++) {
        bput(b, "<th>");
        besc(b, pretty_key(keys[k]));
        bput(b, "</th>");
    }
    bput(b, "</tr></thead>\n<tbody>\n");
    for (int r = 0; r < c->n_runs; r++) {
        const rp_run *run = &c->runs[r];
        if (!run->summary) {
            bput(b, "<tr class=\"unfinished\" data-run=\"");
            besc(b, run->label);
            bput(b, "\">");
            if (multi) {
                bput(b, "<td>");
                besc(b, run->label);
                bput(b, "</td>");
            }
            bput(b, "<td colspan=\"%d\">did not finish: no results (no summary.json)</td></tr>\n", nk + 1);
            continue;
        }
        for (const cJSON *o = run->summary->child; o; o = o->next) {
            if (!is_role_obj(o)) continue;
            bput(b, "<tr data-run=\"");
            besc(b, run->label);
            bput(b, "\" data-role=\"");
            besc(b, o->string);
            bput(b, "\">");
            if (multi) {
                bput(b, "<td>");
                besc(b, run->label);
                bput(b, "</td>");
            }
            bput(b, "<td>");
            besc(b, o->string);
            bput(b, "</td>");
            for (int k = 0; k < nk; k++) value_cell(b, keys[k], cJSON_GetObjectItemCaseSensitive(o, keys[k]));
            bput(b, "</tr>\n");
        }
    }
    bput(b, "</tbody>\n</table>\n");
    free(objs);
}

static const char *cfg_get(const rp_run *run, const char *section, const char *key) {
    for (int i = 0; i < run->n_cfg; i++)
        if (strcmp(run->cfg[i].section, section) == 0 && strcmp(run->cfg[i].key, key) == 0) return run->cfg[i].value;
    return NULL;
}

static void config_section(rbuf *b, const rp_ctx *c) {
    int multi = c->n_runs > 1, n = 0;
    for (int r = 0; r < c->n_runs; r++) n += c->runs[r].n_cfg;
    bput(b, "<h2 id=\"config\">Configuration</h2>\n");
    if (!n) {
        bput(b, "<p>No config.ini (or an empty one).</p>\n");
        return;
    }
    /* the union of (section, key) over the runs, in order of first appearance */
    const rp_cfg **u = kd_malloc((size_t)n * sizeof *u);
    int nu = 0;
    for (int r = 0; r < c->n_runs; r++)
        for (int i = 0; i < c->runs[r].n_cfg; i++) {
            const rp_cfg *e = &c->runs[r].cfg[i];
            int earlier = 0;
            for (int q = 0; q < r && !earlier; q++) earlier = cfg_get(&c->runs[q], e->section, e->key) != NULL;
            if (!earlier) u[nu++] = e;
        }
    if (multi) bput(b, "<p>The resolved config.ini of each run; highlighted rows differ between runs.</p>\n");
    bput(b, "<div class=\"cfg\">\n");
    for (int i = 0; i < nu; i++) { /* one table per section, at its first key */
        int first = 1;
        for (int k = 0; k < i && first; k++) first = strcmp(u[k]->section, u[i]->section) != 0;
        if (!first) continue;
        bput(b, "<table class=\"config\">\n<thead><tr><th>[");
        besc(b, u[i]->section);
        bput(b, "]</th>");
        for (int r = 0; r < c->n_runs; r++) {
            bput(b, "<th>");
            if (multi) besc(b, c->runs[r].label);
            bput(b, "</th>");
        }
        bput(b, "</tr></thead>\n<tbody>\n");
        for (int k = i; k < nu; k++) {
            const rp_cfg *e = u[k];
            if (strcmp(e->section, u[i]->section) != 0) continue;
            int differs = 0;
            for (int q = 0; q < c->n_runs; q++) {
                const char *v = cfg_get(&c->runs[q], e->section, e->key);
                differs |= !v || strcmp(v, e->value) != 0;
            }
            bput(b, "<tr%s><td>", differs ? " class=\"differs\"" : "");
            besc(b, e->key);
            bput(b, "</td>");
            for (int q = 0; q < c->n_runs; q++) {
                const char *v = cfg_get(&c->runs[q], e->section, e->key);
                bput(b, "<td>");
                if (v)
                    besc(b, v);
                else
                    bput(b, "&mdash;");
                bput(b, "</td>");
            }
            bput(b, "</tr>\n");
        }
        bput(b, "</tbody>\n</table>\n");
    }
    bput(b, "</div>\n");
    free(u);
}

static void machine_section(rbuf *b, const rp_ctx *c) {
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
    bput(b, "<h2 id=\"machine\">Machine</h2>\n");
    if (missing)
        bput(b, "<p>Where a run did not record its machine in summary.json, the machine shown is the one that wrote "
                "this report.</p>\n");
    bput(b, "<table class=\"machine\">\n<thead><tr><th></th>");
    for (int r = 0; r < c->n_runs; r++) {
        const cJSON *m = c->runs[r].summary ? cJSON_GetObjectItemCaseSensitive(c->runs[r].summary, "machine") : NULL;
        bput(b, "<th>");
        besc(b, c->n_runs > 1 ? c->runs[r].label : "");
        bput(b, "%s%s</th>", c->n_runs > 1 ? " " : "", cJSON_IsObject(m) ? "(recorded by the run)" : "(this machine)");
    }
    bput(b, "</tr></thead>\n<tbody>\n");
    for (int k = 0; k < nk; k++) {
        bput(b, "<tr><th>");
        besc(b, pretty_key(keys[k]));
        bput(b, "</th>");
        for (int r = 0; r < c->n_runs; r++) value_cell(b, keys[k], cJSON_GetObjectItemCaseSensitive(objs[r], keys[k]));
        bput(b, "</tr>\n");
    }
    bput(b, "</tbody>\n</table>\n");
    cJSON_Delete(here);
    free(objs);
}

static void page(rbuf *b, const rp_ctx *c) {
    bput(b, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>distill report: ");
    for (int r = 0; r < c->n_runs; r++) {
        if (r) bput(b, ", ");
        besc(b, c->runs[r].label);
    }
    bput(b, "</title>\n<style>\n%s</style>\n</head>\n<body>\n<header>\n<h1>distill report</h1>\n<p class=\"sub\">",
         CSS);
    for (int r = 0; r < c->n_runs; r++) {
        if (r) bput(b, " &middot; ");
        besc(b, c->runs[r].label);
    }
    bput(b, " &mdash; written by distill %s</p>\n</header>\n", KD_VERSION);
    if (c->notes.n)
        bput(b, "<section id=\"notes\">\n<h2>Notes</h2>\n<ul class=\"notes\">\n%s</ul>\n</section>\n", c->notes.s);
    bput(b, "<section>\n");
    runs_section(b, c);
    results_section(b, c);
    bput(b, "</section>\n<section id=\"curves\">\n<h2>Curves</h2>\n");
    if (!c->n_ser) {
        bput(b, "<p>No known metric in metrics.jsonl: nothing to plot.</p>\n");
    } else {
        bput(b, "<div class=\"charts\">\n");
        for (int m = 0; m < N_METRICS; m++) chart(b, c, m);
        bput(b, "</div>\n");
    }
    bput(b, "</section>\n<section>\n");
    config_section(b, c);
    bput(b, "</section>\n<section>\n");
    machine_section(b, c);
    bput(b, "</section>\n</body>\n</html>\n");
}

static kd_status write_atomic(const char *path, const char *text, size_t n) {
    char tmp[4400];
    snprintf(tmp, sizeof tmp, "%.4200s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return kd_errorf(KD_EIO, "%s: cannot write: %s", path, strerror(errno));
    int bad = fwrite(text, 1, n, f) != n;
    bad |= fflush(f) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        remove(tmp);
        return kd_errorf(KD_EIO, "%s: write failed: %s", path, strerror(e));
    }
    return KD_OK;
}

/* ---------------------------------------------------------------- entry */

static kd_status open_run(rp_run *run, const char *dir) {
    run->dir = kd_strdup(dir);
    struct stat sb;
    if (stat(dir, &sb) != 0) return kd_errorf(KD_EIO, "%s: not a run directory: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) return kd_errorf(KD_EIO, "%s: not a run directory (not a directory)", dir);
    static const char *const files[] = {"metrics.jsonl", "summary.json", "config.ini"};
    int found = 0;
    for (int i = 0; i < 3; i++) {
        char p[4200];
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        found |= stat(p, &sb) == 0;
    }
    if (!found)
        return kd_errorf(KD_EFORMAT, "%s: not a run directory (no metrics.jsonl, summary.json or config.ini)", dir);
    char *real = realpath(dir, NULL);
    const char *base = real ? strrchr(real, '/') : NULL;
    run->label = kd_strdup(base && base[1] ? base + 1 : dir);
    free(real);
    return KD_OK;
}

kd_status kd_report_write(const char *const *run_dirs, int n_runs, const char *out_path) {
    KD_ASSERT(n_runs >= 1, "no run directory");
    rp_ctx c = {0};
    c.runs = kd_calloc((size_t)n_runs, sizeof *c.runs);
    c.n_runs = n_runs;
    kd_status st = KD_OK;
    for (int r = 0; r < n_runs && st == KD_OK; r++) st = open_run(&c.runs[r], run_dirs[r]);
    int dup = 0; /* two runs with one name: label them by their paths */
    for (int r = 0; r < n_runs && st == KD_OK; r++)
        for (int q = 0; q < r; q++) dup |= strcmp(c.runs[r].label, c.runs[q].label) == 0;
    for (int r = 0; r < n_runs && st == KD_OK && dup; r++) {
        free(c.runs[r].label);
        c.runs[r].label = kd_strdup(c.runs[r].dir);
    }
    for (int r = 0; r < n_runs && st == KD_OK; r++) {
        st = read_summary(&c, r);
        if (st == KD_OK) st = read_metrics(&c, r);
        if (st == KD_OK) st = read_config(&c, r);
    }
    if (st == KD_OK) {
        rbuf b = {0};
        page(&b, &c);
        st = write_atomic(out_path, b.s, b.n);
        free(b.s);
    }
    for (int r = 0; r < n_runs; r++) {
        rp_run *run = &c.runs[r];
        for (int i = 0; i < run->n_cfg; i++) {
            free(run->cfg[i].section);
            free(run->cfg[i].key);
            free(run->cfg[i].value);
        }
        free(run->cfg);
        cJSON_Delete(run->summary);
        free(run->dir);
        free(run->label);
    }
    for (int i = 0; i < c.n_ser; i++) {
        free(c.ser[i].x);
        free(c.ser[i].y);
    }
    for (int i = 0; i < c.n_roles; i++) free(c.roles[i]);
    free(c.ser);
    free(c.roles);
    free(c.runs);
    free(c.notes.s);
    return st;
}
