/* report.c - report.html for one or more run directories (kd_report.h,
 * docs/report.md): reading the runs; report_page.c writes the page.
 *
 * Reads each run's metrics.jsonl (one JSON object per line), summary.json
 * and config.ini into a kd_rp_ctx (report.h): the points of each (run,
 * role, metric), the notes to show, the summary and the config entries;
 * the page is then built in memory and written atomically. Everything
 * that comes from a file is HTML-escaped when the page is written.
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
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "train/report.h"

/* ---------------------------------------------------------------- text */

static void rbuf_grow(kd_rbuf *b, size_t extra) {
    if (b->n + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + extra + 1) cap *= 2;
    b->s = kd_realloc(b->s, cap);
    b->cap = cap;
}

void kd_rbuf_put(kd_rbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    KD_ASSERT(k >= 0, "bad format %s", fmt);
    rbuf_grow(b, (size_t)k);
    va_start(ap, fmt);
    vsnprintf(b->s + b->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}

void kd_rbuf_esc(kd_rbuf *b, const char *s) {
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        switch (ch) {
        case '&':
            kd_rbuf_put(b, "&amp;");
            break;
        case '<':
            kd_rbuf_put(b, "&lt;");
            break;
        case '>':
            kd_rbuf_put(b, "&gt;");
            break;
        case '"':
            kd_rbuf_put(b, "&quot;");
            break;
        case '\'':
            kd_rbuf_put(b, "&#39;");
            break;
        default:
            if ((ch < 0x20 && ch != '\t' && ch != '\n') || ch == 0x7f) {
                kd_rbuf_put(b, "&#xFFFD;");
            } else {
                rbuf_grow(b, 1);
                b->s[b->n++] = (char)ch;
                b->s[b->n] = '\0';
            }
        }
    }
}

static char *xstrdup_n(const char *s, size_t n) {
    char *t = kd_malloc(n + 1);
    memcpy(t, s, n);
    t[n] = '\0';
    return t;
}

/* ---------------------------------------------------------------- model */

const kd_rp_metric kd_report_metrics[KD_REPORT_N_METRICS] = {
    {"loss", "step", "Training loss (per logged step)", "loss", 0},
    {"train_loss", "epoch", "Training loss (epoch mean)", "loss", 0},
    {"test_loss", "epoch", "Test loss", "cross-entropy", 0},
    {"test_acc", "epoch", "Test accuracy", "accuracy", 1},
    {"val_loss", "step", "Validation loss", "loss", 0},
    {"val_ppl", "step", "Validation perplexity", "perplexity", 0},
    {"lr", "step", "Learning rate", "learning rate", 0},
};

static void note(kd_rp_ctx *c, int run, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(kd_rp_ctx *c, int run, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kd_rbuf_put(&c->notes, "<li><b>");
    kd_rbuf_esc(&c->notes, c->runs[run].label);
    kd_rbuf_put(&c->notes, "</b>: ");
    kd_rbuf_esc(&c->notes, msg);
    kd_rbuf_put(&c->notes, "</li>\n");
}

static int role_id(kd_rp_ctx *c, const char *role) {
    for (int i = 0; i < c->n_roles; i++)
        if (strcmp(c->roles[i], role) == 0) return i;
    c->roles = kd_realloc(c->roles, (size_t)(c->n_roles + 1) * sizeof *c->roles);
    c->roles[c->n_roles] = kd_strdup(role);
    return c->n_roles++;
}

static void add_point(kd_rp_ctx *c, int run, int metric, int role, double x, double y) {
    kd_rp_series *s = NULL;
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

static kd_status read_metrics(kd_rp_ctx *c, int r) {
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
        for (int m = 0; m < KD_REPORT_N_METRICS; m++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, kd_report_metrics[m].key);
            if (!v) continue;
            if (cJSON_IsNull(v) || (cJSON_IsNumber(v) && !isfinite(v->valuedouble))) {
                if (!nonfinite++)
                    snprintf(first_nf, sizeof first_nf, "%.60s %.60s at line %ld", role, kd_report_metrics[m].key,
                             lineno);
                continue;
            }
            if (!cJSON_IsNumber(v)) {
                nonnum++;
                continue;
            }
            const cJSON *xv = cJSON_GetObjectItemCaseSensitive(j, kd_report_metrics[m].x);
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
    kd_rbuf b = {0};
    rbuf_grow(&b, 4096);
    size_t got;
    while ((got = fread(b.s + b.n, 1, b.cap - b.n - 1, f)) > 0) {
        b.n += got;
        rbuf_grow(&b, 4096);
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

static kd_status read_summary(kd_rp_ctx *c, int r) {
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
static kd_status read_config(kd_rp_ctx *c, int r) {
    char path[4200];
    kd_rp_run *run = &c->runs[r];
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
        kd_rp_cfg *e = &run->cfg[run->n_cfg++];
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

static kd_status open_run(kd_rp_run *run, const char *dir) {
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
    kd_rp_ctx c = {0};
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
        kd_rbuf b = {0};
        kd_report_page(&b, &c);
        st = write_atomic(out_path, b.s, b.n);
        free(b.s);
    }
    for (int r = 0; r < n_runs; r++) {
        kd_rp_run *run = &c.runs[r];
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
