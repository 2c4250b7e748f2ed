/* test_report.c - report.html (src/train/report.c) and `distill report`.
 *
 * Synthetic run directories are written with known values: metrics.jsonl
 * for teacher, baseline and student (per-step loss and lr, per-epoch train
 * and test loss and accuracy, distillation-term keys that are not plotted),
 * a summary.json and a config.ini holding '<', '>', '&' and '"'. The page
 * is scanned as text: document structure and balanced tags, no external
 * reference, one <svg> per metric present, every plotted point (data-x and
 * data-y of each circle) equal to a value written to metrics.jsonl and
 * every such value plotted exactly once, the results table against
 * summary.json, the escaped config. Then malformed lines and NaN/Inf
 * (skipped and counted on the page), a missing summary.json, language-model
 * keys (val_loss, val_ppl against step), two runs overlaid, bad run
 * directories, and the CLI on $KD_DISTILL: report, --out, errors, and the
 * report.html that a tiny `distill run` writes, finished or failed.
 * Deliberately not here: how the page looks (docs/report.png is a
 * screenshot of a real report).
 */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd.h"
#include "kd_report.h"
#include "test.h"

static char T[200]; /* this area's directory: TMP/report */

static int spit(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fputs(text, f) >= 0;
    ok &= fclose(f) == 0;
    return ok;
}

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static int count(const char *s, const char *needle) {
    int n = 0;
    for (const char *p = s; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

/* ---------- the values a run directory holds ---------- */

/* A value the page must plot: the metric's y against its x, for (run, role). */
typedef struct point {
    char run[64], role[32], metric[16];
    double x, y;
    int seen;
} point;

enum { MAX_POINTS = 4096 };
static point expect[MAX_POINTS];
static int n_expect;

/* The metrics a report plots and what each is plotted against (docs/report.md). */
static const char *const METRIC_X[][2] = {{"loss", "step"},      {"train_loss", "epoch"}, {"test_loss", "epoch"},
                                          {"test_acc", "epoch"}, {"val_loss", "step"},    {"val_ppl", "step"},
                                          {"lr", "step"}};
enum { N_METRIC = sizeof METRIC_X / sizeof METRIC_X[0] };

static const char *x_of(const char *metric) {
    for (int i = 0; i < N_METRIC; i++)
        if (strcmp(METRIC_X[i][0], metric) == 0) return METRIC_X[i][1];
    return NULL;
}

static void expect_point(const char *run, const char *role, const char *metric, double x, double y) {
    if (n_expect == MAX_POINTS) return;
    point *p = &expect[n_expect++];
    snprintf(p->run, sizeof p->run, "%s", run);
    snprintf(p->role, sizeof p->role, "%s", role);
    snprintf(p->metric, sizeof p->metric, "%s", metric);
    p->x = x;
    p->y = y;
    p->seen = 0;
}

/* One metrics line: the role, the x keys, then key/value pairs (NULL
 * ended); each value is printed as the trainer does (%.6g) and, when it is a
 * known metric, the value read back from that text is expected on the page. */
static void record(FILE *f, const char *run, const char *role, int epoch, int step, ...) {
    fprintf(f, "{\"role\":\"%s\",\"epoch\":%d,\"step\":%d", role, epoch, step);
    va_list ap;
    va_start(ap, step);
    for (const char *k = va_arg(ap, const char *); k; k = va_arg(ap, const char *)) {
        double v = va_arg(ap, double);
        char txt[40];
        snprintf(txt, sizeof txt, "%.6g", v);
        fprintf(f, ",\"%s\":%s", k, txt);
        const char *x = x_of(k);
        if (x) expect_point(run, role, k, strcmp(x, "step") == 0 ? step : epoch, strtod(txt, NULL));
    }
    va_end(ap);
    fputs("}\n", f);
}

/* A value that is not round, derived from (seed, i). */
static double val(int seed, int i, double lo, double hi) {
    unsigned s = (unsigned)seed * 2654435761u + (unsigned)i * 40503u + 12345u;
    s ^= s >> 13;
    s *= 0x5bd1e995u;
    s ^= s >> 15;
    return lo + (hi - lo) * (double)(s % 100000u) / 100000.0;
}

enum { F_NO_SUMMARY = 1, F_BAD = 2, F_LM = 4, F_MACHINE = 8 };

typedef struct acc3 {
    double teacher, baseline, student;
} acc3;

/* Writes T/NAME/{metrics.jsonl, summary.json, config.ini}; returns the
 * summary's test accuracies. */
static acc3 write_run(const char *name, int seed, int flags) {
    char dir[400], p[500];
    snprintf(dir, sizeof dir, "%s/%s", T, name);
    mkdir(dir, 0755);
    snprintf(p, sizeof p, "%s/metrics.jsonl", dir);
    FILE *f = fopen(p, "w");
    CHECK(f != NULL);
    acc3 a = {0};
    if (!f) return a;
    if (flags & F_LM) {
        for (int s = 10; s <= 200; s += 10) {
            record(f, name, "student", 1, s, "loss", val(seed, s, 2, 6), "lr", val(seed, s + 1, 0, 1e-3), NULL);
            if (s % 50 == 0)
                record(f, name, "student", 1, s, "val_loss", val(seed, s + 2, 2, 5), "val_ppl",
                       val(seed, s + 3, 8, 150), NULL);
        }
    } else {
        const char *roles[3] = {"teacher", "baseline", "student"};
        int epochs[3] = {3, 5, 2}, spe[3] = {40, 8, 40};
        for (int r = 0; r < 3; r++) {
            int step = 0;
            for (int e = 1; e <= epochs[r]; e++) {
                for (int b = 0; b < spe[r]; b++) {
                    step++;
                    if (step % 10) continue;
                    if (r == 2)
                        record(f, name, roles[r], e, step, "loss", val(seed, r * 1000 + step, 0.1, 2.5), "lr",
                               val(seed, r * 1000 + step + 7, 0.001, 0.1), "1.ce", 0.25, "2.kd", 1.5, NULL);
                    else
                        record(f, name, roles[r], e, step, "loss", val(seed, r * 1000 + step, 0.1, 2.5), "lr",
                               val(seed, r * 1000 + step + 7, 0.001, 0.1), NULL);
                }
                double tl = val(seed, r * 100 + e, 0.05, 1.2);
                if (e % 2 == 0 || e == epochs[r])
                    record(f, name, roles[r], e, step, "train_loss", tl, "test_loss",
                           val(seed, r * 100 + e + 50, 0.2, 1), "test_acc", val(seed, r * 100 + e + 60, 0.5, 0.95),
                           NULL);
                else
                    record(f, name, roles[r], e, step, "train_loss", tl, NULL);
            }
        }
        a.teacher = val(seed, 901, 0.8, 0.95);
        a.baseline = val(seed, 902, 0.6, 0.8);
        a.student = val(seed, 903, 0.7, 0.9);
    }
    if (flags & F_BAD) {
        fputs("{not json\n", f);
        fputs("\n", f);       /* blank: ignored, not counted */
        fputs("[1, 2]\n", f); /* JSON, but not an object */
        fputs("{\"role\":\"student\",\"epoch\":", f);
        fputs("\n", f);
        fputs("{\"role\":\"student\",\"epoch\":2,\"step\":999,\"loss\":nan,\"lr\":0.5}\n", f);
        fputs("{\"role\":\"teacher\",\"epoch\":9,\"step\":999,\"test_acc\":-inf}\n", f);
        fputs("{\"role\":\"teacher\",\"epoch\":9,\"step\":999,\"test_loss\":\"abc\"}\n", f);
        expect_point(name, "student", "lr", 999, 0.5); /* the rest of the NaN line is read */
    }
    CHECK(fclose(f) == 0);
    if (!(flags & F_NO_SUMMARY) && !(flags & F_LM)) {
        char s[2048];
        snprintf(
            s, sizeof s,
            "{\"teacher\": {\"model\": \"cnn: c8 p\", \"test_acc\": %.17g, \"test_loss\": 0.31, \"params\": 12345},\n"
            " \"baseline\": {\"model\": \"mlp: 16\", \"test_acc\": %.17g, \"params\": 999},\n"
            " \"student\": {\"model\": \"mlp: 16\", \"test_acc\": %.17g, \"params\": 999},\n"
            " %s\"loss\": \"kd(T=4)\", \"threads\": 2}\n",
            a.teacher, a.baseline, a.student,
            flags & F_MACHINE ? "\"machine\": {\"cpu\": \"Test CPU <x>\", \"cores\": 3}, " : "");
        snprintf(p, sizeof p, "%s/summary.json", dir);
        CHECK(spit(p, s));
    }
    snprintf(p, sizeof p, "%s/config.ini", dir);
    char ini[1024];
    snprintf(ini, sizeof ini,
             "; resolved configuration written by distill\n\n[run]\nname = %s\nseed = %d\n\n[student]\n"
             "model = mlp: <64> & \"more\"\n\n[train]\nepochs = 3\nlr = 0.05\n",
             name, seed);
    CHECK(spit(p, ini));
    return a;
}

/* ---------- reading the page ---------- */

static char *attr(const char *tag_start, const char *tag_end, const char *name, char *out, size_t n) {
    char pat[64];
    snprintf(pat, sizeof pat, " %s=\"", name);
    const char *p = strstr(tag_start, pat);
    if (!p || p > tag_end) return NULL;
    p += strlen(pat);
    const char *q = strchr(p, '"');
    if (!q || q > tag_end) return NULL;
    size_t k = 0; /* unescape the five entities the page writes */
    static const char *const ent[][2] = {
        {"&amp;", "&"}, {"&lt;", "<"}, {"&gt;", ">"}, {"&quot;", "\""}, {"&#39;", "'"}};
    while (p < q && k + 1 < n) {
        int hit = 0;
        for (int i = 0; i < 5 && !hit; i++)
            if (strncmp(p, ent[i][0], strlen(ent[i][0])) == 0) {
                out[k++] = ent[i][1][0];
                p += strlen(ent[i][0]);
                hit = 1;
            }
        if (!hit) out[k++] = *p++;
    }
    out[k] = '\0';
    return out;
}

/* Tags nest properly: every element the page opens is closed in order;
 * void and self-closed elements excepted. Prints the first problem. */
static int balanced(const char *html) {
    enum { DEPTH = 64 };
    char stack[DEPTH][16];
    int sp = 0;
    for (const char *p = html; (p = strchr(p, '<'));) {
        if (strncmp(p, "<!--", 4) == 0) {
            const char *e = strstr(p, "-->");
            if (!e) return 0;
            p = e + 3;
            continue;
        }
        const char *e = strchr(p, '>');
        if (!e) {
            fprintf(stderr, "  unterminated tag at %.40s\n", p);
            return 0;
        }
        if (p[1] == '!') {
            p = e + 1;
            continue;
        }
        int closing = p[1] == '/';
        const char *nm = p + 1 + closing;
        size_t L = 0;
        while (nm[L] && (isalnum((unsigned char)nm[L]))) L++;
        if (!L || L >= 16) {
            fprintf(stderr, "  bad tag at %.40s\n", p);
            return 0;
        }
        char name[16];
        memcpy(name, nm, L);
        name[L] = '\0';
        if (closing) {
            if (!sp || strcmp(stack[sp - 1], name) != 0) {
                fprintf(stderr, "  </%s> closes <%s>\n", name, sp ? stack[sp - 1] : "(nothing)");
                return 0;
            }
            sp--;
        } else if (e[-1] != '/' && strcmp(name, "meta") != 0 && strcmp(name, "br") != 0) {
            if (sp == DEPTH) return 0;
            snprintf(stack[sp++], 16, "%s", name);
        }
        p = e + 1;
    }
    if (sp) fprintf(stderr, "  <%s> never closed\n", stack[sp - 1]);
    return sp == 0;
}

static int structure_ok(const char *h) {
    int ok = strncmp(h, "<!DOCTYPE html>", 15) == 0;
    const char *order[] = {"<html", "<head>", "</head>", "<body>", "</body>", "</html>"};
    const char *at = h;
    for (int i = 0; i < 6; i++) {
        const char *q = strstr(at, order[i]);
        if (!q || count(h, order[i]) != 1) {
            fprintf(stderr, "  %s missing, repeated or out of order\n", order[i]);
            ok = 0;
        } else {
            at = q;
        }
    }
    const char *head = strstr(h, "<head>"), *t = strstr(h, "<title>distill report: "), *he = strstr(h, "</head>");
    if (!head || !t || !he || t < head || t > he) {
        fprintf(stderr, "  no <title> in <head>\n");
        ok = 0;
    }
    return ok && balanced(h);
}

static int self_contained(const char *h) {
    const char *bad[] = {"http://", "https://", "src=",  "href=", "<script",
                         "url(",    "@import",  "<link", "<img",  "<iframe"};
    int ok = 1;
    for (int i = 0; i < 10; i++)
        if (strstr(h, bad[i])) {
            fprintf(stderr, "  page holds '%s': %.60s\n", bad[i], strstr(h, bad[i]));
            ok = 0;
        }
    return ok;
}

/* Every circle of every chart is an expected point (used once) and every
 * expected point is plotted; one <svg> per metric among the expected. */
static int points_match(const char *h) {
    for (int i = 0; i < n_expect; i++) expect[i].seen = 0;
    int ok = 1, svgs = 0, circles = 0;
    char metrics_seen[N_METRIC] = {0};
    for (const char *s = h; (s = strstr(s, "<svg"));) {
        const char *tend = strchr(s, '>'), *end = strstr(s, "</svg>");
        char metric[32];
        if (!tend || !end || !attr(s, tend, "data-metric", metric, sizeof metric) || !x_of(metric)) {
            fprintf(stderr, "  <svg> without a known data-metric\n");
            return 0;
        }
        for (int m = 0; m < N_METRIC; m++)
            if (strcmp(METRIC_X[m][0], metric) == 0) {
                if (metrics_seen[m]++) {
                    fprintf(stderr, "  two charts of %s\n", metric);
                    ok = 0;
                }
            }
        svgs++;
        for (const char *c = s; (c = strstr(c, "<circle")) && c < end; c++) {
            const char *ce = strchr(c, '>');
            char run[64], role[32], xs[40], ys[40];
            if (!attr(c, ce, "data-run", run, sizeof run) || !attr(c, ce, "data-role", role, sizeof role) ||
                !attr(c, ce, "data-x", xs, sizeof xs) || !attr(c, ce, "data-y", ys, sizeof ys)) {
                fprintf(stderr, "  circle without its data: %.80s\n", c);
                ok = 0;
                continue;
            }
            circles++;
            double x = strtod(xs, NULL), y = strtod(ys, NULL);
            int found = 0;
            for (int i = 0; i < n_expect && !found; i++) {
                point *p = &expect[i];
                if (!p->seen && p->x == x && p->y == y && !strcmp(p->run, run) && !strcmp(p->role, role) &&
                    !strcmp(p->metric, metric)) {
                    p->seen = 1;
                    found = 1;
                }
            }
            if (!found) {
                if (ok)
                    fprintf(stderr, "  plotted but not in metrics.jsonl: %s %s %s x=%s y=%s\n", run, role, metric, xs,
                            ys);
                ok = 0;
            }
        }
        s = end;
    }
    int want = 0;
    for (int m = 0; m < N_METRIC; m++) {
        int present = 0;
        for (int i = 0; i < n_expect && !present; i++) present = strcmp(expect[i].metric, METRIC_X[m][0]) == 0;
        want += present;
    }
    if (svgs != want) {
        fprintf(stderr, "  %d charts, %d metrics present\n", svgs, want);
        ok = 0;
    }
    int missed = 0;
    for (int i = 0; i < n_expect; i++)
        if (!expect[i].seen && missed++ < 3)
            fprintf(stderr, "  not plotted: %s %s %s x=%.17g y=%.17g\n", expect[i].run, expect[i].role,
                    expect[i].metric, expect[i].x, expect[i].y);
    if (missed || circles != n_expect) {
        fprintf(stderr, "  %d circles, %d values in metrics.jsonl, %d not plotted\n", circles, n_expect, missed);
        ok = 0;
    }
    return ok;
}

/* The results row of (run, role) shows test_acc with exactly value v. */
static int result_acc(const char *h, const char *run, const char *role, double v) {
    char row[200], cell[40];
    snprintf(row, sizeof row, "<tr data-run=\"%s\" data-role=\"%s\">", run, role);
    const char *r = strstr(h, row), *e = r ? strstr(r, "</tr>") : NULL;
    const char *c = r ? strstr(r, "data-key=\"test_acc\"") : NULL;
    if (!c || c > e || !attr(c, e, "data-value", cell, sizeof cell)) {
        fprintf(stderr, "  no test_acc cell for %s %s\n", run, role);
        return 0;
    }
    if (strtod(cell, NULL) != v) {
        fprintf(stderr, "  %s %s: test_acc %s, summary.json %.17g\n", run, role, cell, v);
        return 0;
    }
    return 1;
}

static char *report_of(const char *const *dirs, int n, const char *out, kd_status *st) {
    *st = kd_report_write(dirs, n, out);
    if (*st != KD_OK) fprintf(stderr, "  kd_report_write: %s\n", kd_error_message());
    return *st == KD_OK ? kd_test_slurp(out, NULL) : NULL;
}

/* ---------- the library ---------- */

static void test_one_run(void) {
    char dir[300], out[400];
    n_expect = 0;
    acc3 a = write_run("alpha", 1, 0);
    snprintf(dir, sizeof dir, "%s/alpha", T);
    snprintf(out, sizeof out, "%s/alpha.html", T);
    const char *dirs[1] = {dir};
    kd_status st;
    char *h = report_of(dirs, 1, out, &st);
    TEST("report: one run: page structure") {
        CHECK(st == KD_OK && h);
        if (!h) return;
        CHECK(structure_ok(h));
        CHECK(self_contained(h));
        CHECK(strstr(h, "<meta charset=\"utf-8\">") != NULL);
    }
    TEST("report: one run: every plotted point is a metrics.jsonl value and back") {
        CHECK(n_expect > 50);
        CHECK(points_match(h));
        CHECK(count(h, "<svg") == 5); /* loss, train_loss, test_loss, test_acc, lr */
        CHECK(!strstr(h, "data-metric=\"val_loss\""));
        CHECK(!strstr(h, "1.ce") && !strstr(h, "2.kd")); /* term keys are not plotted */
        CHECK(count(h, "<polyline") >= 12);
    }
    TEST("report: one run: legend names each role") {
        const char *roles[] = {"teacher", "baseline", "student"};
        for (int i = 0; i < 3; i++) {
            char li[120];
            snprintf(li, sizeof li, "<li data-run=\"alpha\" data-role=\"%s\">", roles[i]);
            CHECK_MSG(count(h, li) == 5, "%s in %d legends", roles[i], count(h, li));
        }
    }
    TEST("report: one run: results table holds summary.json's test_acc") {
        CHECK(result_acc(h, "alpha", "teacher", a.teacher));
        CHECK(result_acc(h, "alpha", "baseline", a.baseline));
        CHECK(result_acc(h, "alpha", "student", a.student));
        CHECK(strstr(h, "kd(T=4)") != NULL);
        CHECK(strstr(h, "did not finish") == NULL);
        CHECK(strstr(h, "id=\"notes\"") == NULL); /* nothing to warn about */
    }
    TEST("report: one run: config is shown, escaped") {
        CHECK(strstr(h, "mlp: &lt;64&gt; &amp; &quot;more&quot;") != NULL);
        CHECK(strstr(h, "<64>") == NULL && strstr(h, "& \"more") == NULL);
        CHECK(strstr(h, "[train]") && strstr(h, "<td>lr</td><td>0.05</td>"));
    }
    TEST("report: one run: machine (this machine when the run recorded none)") {
        CHECK(strstr(h, "id=\"machine\"") && strstr(h, "(this machine)"));
        CHECK(strstr(h, "data-key=\"cpu\"") && strstr(h, "data-key=\"cores\""));
    }
    TEST("report: the same runs give the same page") {
        char out2[400];
        snprintf(out2, sizeof out2, "%s/alpha2.html", T);
        char *h2 = report_of(dirs, 1, out2, &st);
        CHECK(h2 && h && strcmp(h, h2) == 0);
        free(h2);
    }
    free(h);
}

static void test_broken_run(void) {
    char dir[300], out[400];
    n_expect = 0;
    write_run("broken", 2, F_NO_SUMMARY | F_BAD);
    snprintf(dir, sizeof dir, "%s/broken", T);
    snprintf(out, sizeof out, "%s/broken.html", T);
    const char *dirs[1] = {dir};
    kd_status st;
    char *h = report_of(dirs, 1, out, &st);
    TEST("report: malformed lines, NaN and a missing summary.json") {
        CHECK(st == KD_OK && h);
        if (!h) return;
        CHECK(structure_ok(h));
        CHECK(points_match(h)); /* nan, -inf and "abc" not plotted, the rest is */
        CHECK_MSG(strstr(h, "3 malformed lines skipped") != NULL, "malformed-line note");
        CHECK_MSG(strstr(h, "2 NaN, Inf or null values not plotted") != NULL, "NaN note");
        CHECK(strstr(h, "1 value skipped: not a number") != NULL);
        CHECK(strstr(h, "no summary.json: the run did not finish") != NULL);
        CHECK(strstr(h, "class=\"unfinished\"") != NULL);
        CHECK(!strstr(h, "data-y=\"nan\"") && !strstr(h, "data-y=\"-inf\"") && !strstr(h, "data-y=\"abc\""));
    }
    free(h);
}

/* Values at the ends of the double range, one-point series, a role-less
 * line: still a well-formed page with finite coordinates. */
static void test_extreme_values(void) {
    char dir[300], out[400], p[500];
    n_expect = 0;
    snprintf(dir, sizeof dir, "%s/extreme", T);
    mkdir(dir, 0755);
    snprintf(p, sizeof p, "%s/metrics.jsonl", dir);
    FILE *f = fopen(p, "w");
    CHECK(f != NULL);
    if (!f) return;
    record(f, "extreme", "teacher", 1, 1, "loss", 1e300, "lr", 5e-324, NULL);
    record(f, "extreme", "teacher", 1, 2, "loss", -1e300, "lr", 5e-324, NULL);
    record(f, "extreme", "student", 7, 0, "test_acc", 0.5, NULL);
    fputs("{\"epoch\":2,\"test_loss\":0.25}\n", f); /* no role: plotted as "run" */
    expect_point("extreme", "run", "test_loss", 2, 0.25);
    CHECK(fclose(f) == 0);
    snprintf(out, sizeof out, "%s/extreme.html", T);
    const char *dirs[1] = {dir};
    kd_status st;
    char *h = report_of(dirs, 1, out, &st);
    TEST("report: extreme values and one-point series") {
        CHECK(st == KD_OK && h);
        if (!h) return;
        CHECK(structure_ok(h));
        CHECK(points_match(h));
        CHECK(!strstr(h, "\"nan") && !strstr(h, "\"-nan") && !strstr(h, "\"inf") && !strstr(h, "\"-inf"));
        CHECK(strstr(h, "no summary.json") && strstr(h, "no config.ini"));
    }
    free(h);
}

static void test_lm_run(void) {
    char dir[300], out[400];
    n_expect = 0;
    write_run("lm", 3, F_LM);
    snprintf(dir, sizeof dir, "%s/lm", T);
    snprintf(out, sizeof out, "%s/lm.html", T);
    const char *dirs[1] = {dir};
    kd_status st;
    char *h = report_of(dirs, 1, out, &st);
    TEST("report: language-model keys: val_loss and val_ppl against step") {
        CHECK(st == KD_OK && h);
        if (!h) return;
        CHECK(structure_ok(h));
        CHECK(points_match(h));
        CHECK(strstr(h, "data-metric=\"val_loss\"") && strstr(h, "data-metric=\"val_ppl\""));
        CHECK(!strstr(h, "data-metric=\"test_acc\"") && !strstr(h, "data-metric=\"train_loss\""));
        CHECK(count(h, "<svg") == 4);
    }
    free(h);
}

static void test_overlay(void) {
    char d1[300], d2[300], out[400];
    n_expect = 0;
    acc3 a = write_run("runA", 4, F_MACHINE);
    acc3 b = write_run("runB", 5, 0);
    snprintf(d1, sizeof d1, "%s/runA", T);
    snprintf(d2, sizeof d2, "%s/runB", T);
    snprintf(out, sizeof out, "%s/ab.html", T);
    const char *dirs[2] = {d1, d2};
    kd_status st;
    char *h = report_of(dirs, 2, out, &st);
    TEST("report: two runs overlay on the same charts") {
        CHECK(st == KD_OK && h);
        if (!h) return;
        CHECK(structure_ok(h));
        CHECK(self_contained(h));
        CHECK(points_match(h));
        CHECK(count(h, "<svg") == 5);
        CHECK(strstr(h, "<li data-run=\"runA\" data-role=\"student\"><span") != NULL);
        CHECK(strstr(h, "<li data-run=\"runB\" data-role=\"student\"><span") != NULL);
        CHECK(strstr(h, "</span>runA: teacher</li>") && strstr(h, "</span>runB: teacher</li>"));
        CHECK(result_acc(h, "runA", "student", a.student));
        CHECK(result_acc(h, "runB", "student", b.student));
        CHECK(result_acc(h, "runB", "teacher", b.teacher));
        CHECK(strstr(h, "stroke-dasharray") != NULL); /* the second run is dashed */
    }
    TEST("report: two runs: config side by side, differences marked") {
        CHECK(strstr(h, "<tr class=\"differs\"><td>seed</td><td>4</td><td>5</td></tr>") != NULL);
        CHECK(strstr(h, "<tr><td>epochs</td><td>3</td><td>3</td></tr>") != NULL);
    }
    TEST("report: machine recorded in summary.json is shown, escaped") {
        CHECK(strstr(h, "Test CPU &lt;x&gt;") != NULL);
        CHECK(strstr(h, "runA (recorded by the run)") && strstr(h, "runB (this machine)"));
    }
    free(h);
}

static void test_errors(void) {
    char dir[300], out[400], empty[300], file[300];
    TEST("report: bad run directories are errors naming them") {
        snprintf(dir, sizeof dir, "%s/no_such_run", T);
        snprintf(out, sizeof out, "%s/err.html", T);
        const char *d1[1] = {dir};
        CHECK(kd_report_write(d1, 1, out) == KD_EIO);
        CHECK(strstr(kd_error_message(), dir) && strstr(kd_error_message(), "not a run directory"));
        snprintf(empty, sizeof empty, "%s/empty_dir", T);
        mkdir(empty, 0755);
        const char *d2[1] = {empty};
        CHECK(kd_report_write(d2, 1, out) == KD_EFORMAT);
        CHECK(strstr(kd_error_message(), empty) && strstr(kd_error_message(), "metrics.jsonl"));
        snprintf(file, sizeof file, "%s/a_file", T);
        spit(file, "x");
        const char *d3[1] = {file};
        CHECK(kd_report_write(d3, 1, out) != KD_OK);
        CHECK(strstr(kd_error_message(), file) != NULL);
        char good[300];
        snprintf(good, sizeof good, "%s/alpha", T);
        const char *d4[2] = {good, dir}; /* one bad run of two */
        CHECK(kd_report_write(d4, 2, out) == KD_EIO);
        CHECK(!exists(out));
    }
    TEST("report: an unwritable output is an error naming it") {
        char good[300];
        snprintf(good, sizeof good, "%s/alpha", T);
        snprintf(out, sizeof out, "%s/no_dir/r.html", T);
        const char *d[1] = {good};
        CHECK(kd_report_write(d, 1, out) == KD_EIO);
        CHECK(strstr(kd_error_message(), out) != NULL);
    }
    TEST("report: the machine record") {
        cJSON *o = cJSON_CreateObject();
        kd_report_add_machine(o);
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "machine");
        const cJSON *cpu = cJSON_GetObjectItemCaseSensitive(m, "cpu"),
                    *cores = cJSON_GetObjectItemCaseSensitive(m, "cores");
        const cJSON *ver = cJSON_GetObjectItemCaseSensitive(m, "distill"),
                    *cc = cJSON_GetObjectItemCaseSensitive(m, "compiler");
        CHECK(cJSON_IsString(cpu) && cpu->valuestring[0]);
        CHECK(cJSON_IsNumber(cores) && cores->valuedouble >= 1);
        CHECK(cJSON_IsString(ver) && strcmp(ver->valuestring, KD_VERSION) == 0);
        CHECK(cJSON_IsString(cc) && cc->valuestring[0]);
        cJSON_Delete(o);
    }
}

/* ---------- the CLI ---------- */

typedef struct cli_res {
    int code; /* exit status; -1: did not exit normally */
    char *out, *err;
} cli_res;

static cli_res cli(const char *first, ...) {
    const char *argv[32];
    int argc = 0;
    const char *b = getenv("KD_DISTILL");
    argv[argc++] = b && *b ? b : "build/distill";
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 31; a = va_arg(ap, const char *)) argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    char outp[400], errp[400];
    snprintf(outp, sizeof outp, "%s/cli.out", T);
    snprintf(errp, sizeof errp, "%s/cli.err", T);
    fflush(stdout);
    fflush(stderr);
    cli_res r = {-1, NULL, NULL};
    pid_t pid = fork();
    if (pid == 0) {
        int fo = open(outp, O_WRONLY | O_CREAT | O_TRUNC, 0644), fe = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status;
    if (pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status)) r.code = WEXITSTATUS(status);
    r.out = kd_test_slurp(outp, NULL);
    r.err = kd_test_slurp(errp, NULL);
    if (!r.out) r.out = calloc(1, 1);
    if (!r.err) r.err = calloc(1, 1);
    return r;
}

static void res_free(cli_res *r) {
    free(r->out);
    free(r->err);
}

/* stderr's last line is the only "distill: error: " line and holds needle */
static int one_error(const cli_res *r, const char *needle) {
    const char *first = strstr(r->err, "distill: error: ");
    int ok = first && !strstr(first + 1, "distill: error: ") && strchr(first, '\n') && strchr(first, '\n')[1] == '\0' &&
             strstr(first, needle);
    if (!ok) fprintf(stderr, "  stderr: %s", r->err);
    return ok;
}

static void test_cli_report(void) {
    const char *b = getenv("KD_DISTILL");
    const char *bin = b && *b ? b : "build/distill";
    TEST("report cli: binary present") {
        CHECK_MSG(access(bin, X_OK) == 0, "%s not found (set KD_DISTILL)", bin);
        if (access(bin, X_OK) != 0) return;
    }
    char dir[300], d2[300], out[400], p[500];
    snprintf(dir, sizeof dir, "%s/alpha", T);
    snprintf(d2, sizeof d2, "%s/runB", T);
    TEST("report cli: --help and usage") {
        cli_res r = cli("report", "--help", NULL);
        CHECK(r.code == 0 && strstr(r.out, "distill report runs/quickstart") && strstr(r.out, "--out FILE"));
        res_free(&r);
        r = cli("report", NULL);
        CHECK(r.code == 2 && strstr(r.err, "usage: distill report"));
        res_free(&r);
        r = cli("--help", NULL);
        CHECK(r.code == 0 && strstr(r.out, "  report RUN..."));
        res_free(&r);
        r = cli("report", dir, "--bogus", NULL);
        CHECK(r.code == 2 && one_error(&r, "--bogus"));
        res_free(&r);
    }
    TEST("report cli: one run writes RUN/report.html") {
        snprintf(p, sizeof p, "%s/report.html", dir);
        remove(p);
        cli_res r = cli("report", dir, NULL);
        CHECK(r.code == 0 && strstr(r.out, p));
        res_free(&r);
        char *h = kd_test_slurp(p, NULL);
        CHECK(h && structure_ok(h) && strstr(h, "<svg"));
        free(h);
    }
    TEST("report cli: two runs with --out") {
        snprintf(out, sizeof out, "%s/cli_ab.html", T);
        cli_res r = cli("report", dir, d2, "--out", out, NULL);
        CHECK(r.code == 0);
        res_free(&r);
        char *h = kd_test_slurp(out, NULL);
        CHECK(h && strstr(h, "data-run=\"alpha\"") && strstr(h, "data-run=\"runB\""));
        free(h);
    }
    TEST("report cli: a bad run directory is an error naming it") {
        snprintf(p, sizeof p, "%s/not_a_run", T);
        snprintf(out, sizeof out, "%s/never.html", T);
        cli_res r = cli("report", dir, p, "--out", out, NULL);
        CHECK(r.code == 1 && one_error(&r, p) && strstr(r.err, "not a run directory"));
        CHECK(!exists(out));
        res_free(&r);
        snprintf(p, sizeof p, "%s/empty_dir", T);
        r = cli("report", p, NULL);
        CHECK(r.code == 1 && one_error(&r, "no metrics.jsonl, summary.json or config.ini"));
        res_free(&r);
    }

    /* a tiny real run: its report.html plots exactly its metrics.jsonl */
    char ini[400], runs[300], text[1024];
    snprintf(ini, sizeof ini, "%s/tiny.ini", T);
    snprintf(runs, sizeof runs, "%s/runs", T);
    snprintf(text, sizeof text,
             "[run]\nout = %s\nseed = 1\nthreads = 1\n[data]\nlimit = 256\ntest_limit = 256\n"
             "[teacher]\nmodel = mlp: 16\n[train]\nepochs = 2\nbatch = 64\nlog_every = 1\n",
             runs);
    spit(ini, text);
    TEST("report cli: distill run writes report.html of its metrics") {
        cli_res r = cli("run", ini, "--run.name=tiny", "--quiet", NULL);
        CHECK(r.code == 0);
        if (r.code) fprintf(stderr, "  %s", r.err);
        res_free(&r);
        snprintf(p, sizeof p, "%s/tiny/metrics.jsonl", runs);
        char *m = kd_test_slurp(p, NULL);
        CHECK(m != NULL);
        n_expect = 0;
        for (char *s = m; s && *s;) { /* the expected points, read with cJSON */
            char *nl = strchr(s, '\n');
            if (nl) *nl = '\0';
            cJSON *j = cJSON_Parse(s);
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(j, "role");
            for (int i = 0; i < N_METRIC && cJSON_IsString(role); i++) {
                const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, METRIC_X[i][0]);
                const cJSON *x = cJSON_GetObjectItemCaseSensitive(j, METRIC_X[i][1]);
                if (cJSON_IsNumber(v) && cJSON_IsNumber(x))
                    expect_point("tiny", role->valuestring, METRIC_X[i][0], x->valuedouble, v->valuedouble);
            }
            cJSON_Delete(j);
            s = nl ? nl + 1 : NULL;
        }
        free(m);
        CHECK_MSG(n_expect == 8 * 2 + 2 * 3, "%d values", n_expect); /* 8 steps x (loss, lr), 2 epochs x 3 */
        snprintf(p, sizeof p, "%s/tiny/report.html", runs);
        char *h = kd_test_slurp(p, NULL);
        CHECK(h && structure_ok(h) && self_contained(h) && points_match(h));
        CHECK(h && strstr(h, "(recorded by the run)") && !strstr(h, "did not finish"));
        free(h);
        snprintf(p, sizeof p, "%s/tiny/summary.json", runs);
        char *s = kd_test_slurp(p, NULL);
        cJSON *j = s ? cJSON_Parse(s) : NULL;
        const cJSON *cpu = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "machine"), "cpu");
        CHECK(cJSON_IsString(cpu) && cpu->valuestring[0]);
        cJSON_Delete(j);
        free(s);
    }
    TEST("report cli: a failed run still writes report.html, keeps its error") {
        cli_res r = cli("run", ini, "--run.name=tiny_nan", "--train.lr=1e30", "--quiet", NULL);
        CHECK(r.code == 1 && one_error(&r, "step"));
        res_free(&r);
        snprintf(p, sizeof p, "%s/tiny_nan/report.html", runs);
        char *h = kd_test_slurp(p, NULL);
        CHECK(h && structure_ok(h) && strstr(h, "no summary.json: the run did not finish"));
        free(h);
        snprintf(p, sizeof p, "%s/tiny_nan/summary.json", runs);
        CHECK(!exists(p));
    }
}

void test_report(void) {
    snprintf(T, sizeof T, "%.180s/report", kd_test_tmpdir());
    mkdir(T, 0755);
    test_one_run();
    test_broken_run();
    test_extreme_values();
    test_lm_run();
    test_overlay();
    test_errors();
    test_cli_report();
}
