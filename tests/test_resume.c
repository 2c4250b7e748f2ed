/* test_resume.c - checkpoints, resume, signals, the NaN guard and log
 * output of `distill run` (docs/resume.md).
 *
 * Library level: a training state saved and loaded restores every value
 * and counter exactly; loading checks names, shapes and the config and
 * changes nothing on error; a non-finite model is never saved; config
 * hashes ignore the keys that may change and diffs name the others.
 *
 * Through the real binary ($KD_DISTILL, default build/distill), on a tiny
 * synthetic IDX dataset (600 training and 200 test images, a teacher
 * mlp: 32, a baseline and a distilled student mlp: 16, 3 epochs, one
 * thread): an uninterrupted run A is the reference; runs SIGKILLed when
 * metrics.jsonl reaches a random number of lines (seeded), resumed (and
 * killed again) must end with metrics.jsonl byte-identical to A's, the
 * same weights and the same summary accuracies; SIGINT exits 130 and
 * SIGTERM 143 with a state on disk and a resume hint, a second SIGINT at
 * once still leaves a resumable run; a changed config key, a corrupt state
 * and a state that is not one are refused naming the key or the file, with
 * the weights untouched; a diverging run names the step and the tensor and
 * leaves the last good state finite and loadable; --log-json lines parse;
 * a terminal (a pseudo-terminal) gets the bar and ETA, a pipe plain lines.
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kd_io.h"
#include "kd_train.h"
#include "test.h"

static char T[256];   /* TMP/resume */
static char ini[512]; /* the tiny run's config */
static int n_spawned;

/* ---------------------------------------------------------------- files */

static int spit(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(data, 1, n, f) == n;
    return (fclose(f) == 0) & ok;
}

static int same_bytes(const char *a, const char *b) {
    size_t na, nb;
    char *x = kd_test_slurp(a, &na), *y = kd_test_slurp(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    if (!same) fprintf(stderr, "  %s (%zu bytes) and %s (%zu bytes) differ\n", a, x ? na : 0, b, y ? nb : 0);
    free(x);
    free(y);
    return same;
}

static int exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0;
}

static char *run_file(char *buf, const char *run, const char *file) {
    snprintf(buf, 512, "%s/runs/%s/%s", T, run, file);
    return buf;
}

static int count_lines(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    int n = 0, ch;
    while ((ch = getc(f)) != EOF) n += ch == '\n';
    fclose(f);
    return n;
}

static int count_matching(const char *dir, const char *needle) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strstr(e->d_name, needle)) n++;
    closedir(d);
    return n;
}

static void be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* n 28x28 images whose class shows as a blocky pattern under noise. */
static int write_idx(const char *images, const char *labels, int n, uint32_t seed) {
    size_t len = 16 + (size_t)n * 784;
    uint8_t *b = malloc(len), *l = malloc(8 + (size_t)n);
    be32(b, 0x803);
    be32(b + 4, (uint32_t)n);
    be32(b + 8, 28);
    be32(b + 12, 28);
    be32(l, 0x801);
    be32(l + 4, (uint32_t)n);
    uint32_t s = seed;
    for (int i = 0; i < n; i++) {
        int lab = (int)((i * 7 + (int)(seed % 5)) % 10);
        l[8 + i] = (uint8_t)lab;
        for (int p = 0; p < 784; p++) {
            s = s * 1103515245u + 12345u;
            int r = p / 28, c = p % 28;
            int v = ((r / 7 + c / 7 * 2 + lab) % 4) * 50 + (int)((s >> 16) % 90);
            b[16 + (size_t)i * 784 + p] = (uint8_t)v;
        }
    }
    int ok = spit(images, b, len) && spit(labels, l, 8 + (size_t)n);
    free(b);
    free(l);
    return ok;
}

/* ---------------------------------------------------------------- processes */

typedef struct proc {
    pid_t pid;
    char out[512], err[512];
} proc;

typedef struct res {
    int exited, code, sig;
    char *out, *err;
} res;

/* Starts `distill run INI --run.name=NAME ARGS...` (NULL-terminated) with
 * stdout and stderr to files; stderr to fd err_fd instead when >= 0. */
static proc spawn_fd(int err_fd, const char *name, va_list ap) {
    const char *argv[40];
    char nm[128];
    int argc = 0;
    argv[argc++] = kd_test_bin();
    argv[argc++] = "run";
    argv[argc++] = ini;
    snprintf(nm, sizeof nm, "--run.name=%s", name);
    argv[argc++] = nm;
    for (const char *a = va_arg(ap, const char *); a && argc < 39; a = va_arg(ap, const char *)) argv[argc++] = a;
    argv[argc] = NULL;
    proc p;
    int k = n_spawned++;
    snprintf(p.out, sizeof p.out, "%s/p%03d.out", T, k);
    snprintf(p.err, sizeof p.err, "%s/p%03d.err", T, k);
    fflush(stdout);
    fflush(stderr);
    p.pid = fork();
    if (p.pid == 0) {
        int fo = open(p.out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = err_fd >= 0 ? err_fd : open(p.err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(126);
        setenv("OMP_NUM_THREADS", "1", 1);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    return p;
}

static proc spawn(const char *name, ...) {
    va_list ap;
    va_start(ap, name);
    proc p = spawn_fd(-1, name, ap);
    va_end(ap);
    return p;
}

static proc spawn_err(int err_fd, const char *name, ...) {
    va_list ap;
    va_start(ap, name);
    proc p = spawn_fd(err_fd, name, ap);
    va_end(ap);
    return p;
}

static res finish(proc *p) {
    res r = {0};
    int status = 0;
    if (p->pid < 0 || waitpid(p->pid, &status, 0) != p->pid) {
        r.code = -1;
    } else if (WIFEXITED(status)) {
        r.exited = 1;
        r.code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        r.sig = WTERMSIG(status);
    }
    r.out = kd_test_slurp(p->out, NULL);
    r.err = kd_test_slurp(p->err, NULL);
    if (!r.out) r.out = calloc(1, 1);
    if (!r.err) r.err = calloc(1, 1);
    return r;
}

static void res_free(res *r) {
    free(r->out);
    free(r->err);
}

/* Runs to the end. */
static res run(const char *name, ...) {
    va_list ap;
    va_start(ap, name);
    proc p = spawn_fd(-1, name, ap);
    va_end(ap);
    return finish(&p);
}

static int ok_run(const res *r) {
    if (r->exited && r->code == 0) return 1;
    fprintf(stderr, "  exit %d signal %d, stderr:\n%s", r->code, r->sig, r->err);
    return 0;
}

/* Waits until `path` has at least k lines, then sends sig. Returns 1 when
 * the signal was sent while the process was still running. */
static int signal_at_lines(proc *p, const char *path, int k, int sig) {
    for (int spins = 0; spins < 200000; spins++) { /* 100 s at most */
        int status;
        if (waitpid(p->pid, &status, WNOHANG) == p->pid) {
            p->pid = -1; /* it ended first (and is reaped) */
            return 0;
        }
        if (count_lines(path) >= k) return kill(p->pid, sig) == 0;
        usleep(500);
    }
    return 0;
}

/* the last line of stderr starting "distill: error: " holds every needle */
static int error_names(const res *r, const char *const *needles) {
    const char *e = strstr(r->err, "distill: error: ");
    if (!r->exited || r->code != 1 || !e) {
        fprintf(stderr, "  expected exit 1 with an error line; exit %d signal %d:\n%s", r->code, r->sig, r->err);
        return 0;
    }
    int ok = 1;
    size_t len = strcspn(e, "\n");
    for (int i = 0; needles[i]; i++) {
        const char *h = strstr(e, needles[i]);
        if (!h || h > e + len) {
            fprintf(stderr, "  error line lacks '%s': %.*s\n", needles[i], (int)len, e);
            ok = 0;
        }
    }
    return ok;
}
#define ERROR_NAMES(r, ...) CHECK(error_names(&(r), (const char *const[]){__VA_ARGS__, NULL}))

/* ---------------------------------------------------------------- library level */

/* A tiny dataset in memory: n 1x4x4 images. */
static void tiny_data(kd_dataset *ds, int n) {
    memset(ds, 0, sizeof *ds);
    ds->n = n;
    ds->c = 1;
    ds->h = ds->w = 4;
    ds->n_classes = 3;
    ds->images = malloc((size_t)n * 16);
    ds->labels = malloc((size_t)n);
    for (int i = 0; i < n; i++) {
        ds->labels[i] = (uint8_t)(i % 3);
        for (int p = 0; p < 16; p++) ds->images[i * 16 + p] = (uint8_t)((p * 37 + i * 11 + (i % 3) * 80) % 256);
    }
    ds->mean = 0.5f;
    ds->std = 0.25f;
}

static void test_state_file(void) {
    char path[512], p2[512];
    snprintf(path, sizeof path, "%s/unit.state.safetensors", T);
    snprintf(p2, sizeof p2, "%s/unit2.state.safetensors", T);
    kd_dataset ds;
    tiny_data(&ds, 24);
    const char *cfg = "; comment\n[run]\nseed = 1\nthreads = 2\n\n[train]\nlr = 0.1\ncheckpoint_every = 5\n";
    kd_classifier a, b;
    CHECK(kd_classifier_new(&a, "mlp: 8", "", &ds, 8, 0.0f, 1) == KD_OK);
    CHECK(kd_classifier_new(&b, "mlp: 8", "", &ds, 8, 0.0f, 2) == KD_OK); /* other initial weights */
    kd_optim_cfg oc = {.kind = KD_OPTIM_ADAMW, .lr = 0.01f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f};
    size_t n = kd_graph_param_count(a.g);
    kd_optim *oa = kd_optim_new(&oc, n), *ob = kd_optim_new(&oc, n);
    for (size_t i = 0; i < n; i++) {
        oa->m[i] = 0.001f * (float)i - 0.3f;
        oa->v[i] = 1e-6f * (float)(i % 17);
    }
    oa->t = 41;
    kd_train_state s = {.step = 41,
                        .epoch = 2,
                        .batch = 3,
                        .epochs = 5,
                        .steps_per_epoch = 7,
                        .seed = 1ull << 63,
                        .rng = {0x0123456789abcdefull, 0, 1ull << 63, 7},
                        .metrics_offset = 12345,
                        .eloss = 1.0 / 3.0,
                        .eseen = 24,
                        .win = 0.1 + 0.2,
                        .wsteps = 3,
                        .samples = 987,
                        .seconds = 2.5,
                        .final_loss = 0.7,
                        .test = {.acc = 2.0 / 3.0, .loss = 1e-7, .n = 24},
                        .threads = 2};
    snprintf(s.stage, sizeof s.stage, "teacher");
    TEST("state: save and load restore every value and counter exactly") {
        CHECK(kd_state_save(path, a.g, oa, &s, cfg) == KD_OK);
        kd_train_state r;
        CHECK(kd_state_load(path, b.g, ob, &r, "teacher", cfg) == KD_OK);
        CHECK(memcmp(kd_graph_param_data(a.g), kd_graph_param_data(b.g), n * sizeof(float)) == 0);
        CHECK(memcmp(oa->m, ob->m, n * sizeof(float)) == 0 && memcmp(oa->v, ob->v, n * sizeof(float)) == 0);
        CHECK(ob->t == 41);
        CHECK(r.step == s.step && r.epoch == s.epoch && r.batch == s.batch && r.epochs == s.epochs &&
              r.steps_per_epoch == s.steps_per_epoch && r.seed == s.seed && !memcmp(r.rng, s.rng, sizeof r.rng) &&
              r.metrics_offset == s.metrics_offset && r.eseen == s.eseen && r.wsteps == s.wsteps &&
              r.samples == s.samples && r.test.n == s.test.n && r.threads == s.threads && !strcmp(r.stage, "teacher"));
        /* doubles bit for bit */
        CHECK(r.eloss == s.eloss && r.win == s.win && r.seconds == s.seconds && r.final_loss == s.final_loss &&
              r.test.acc == s.test.acc && r.test.loss == s.test.loss);
        /* threads and checkpoint_every may change */
        const char *cfg2 = "[run]\nseed = 1\nthreads = 8\n[train]\nlr = 0.1\ncheckpoint_every = 0\n";
        CHECK(kd_state_load(path, b.g, ob, &r, "teacher", cfg2) == KD_OK);
    }
    TEST("state: load refuses and changes nothing") {
        kd_train_state r;
        float before = kd_graph_param_data(b.g)[0];
        kd_graph_param_data(b.g)[0] = 42.0f;
        const char *cfg3 = "[run]\nseed = 2\nthreads = 2\n[train]\nlr = 0.1\n";
        CHECK(kd_state_load(path, b.g, ob, &r, "teacher", cfg3) == KD_ECONFIG);
        CHECK_MSG(strstr(kd_error_message(), "[run] seed was '1', now '2'") && strstr(kd_error_message(), path), "%s",
                  kd_error_message());
        CHECK(kd_state_load(path, b.g, ob, &r, "student", cfg) == KD_EFORMAT);
        CHECK(strstr(kd_error_message(), "'teacher'") != NULL);
        kd_classifier c;
        CHECK(kd_classifier_new(&c, "mlp: 9", "", &ds, 8, 0.0f, 1) == KD_OK);
        kd_optim *oc9 = kd_optim_new(&oc, kd_graph_param_count(c.g));
        CHECK(kd_state_load(path, c.g, oc9, &r, "teacher", cfg) == KD_ESHAPE);
        CHECK_MSG(strstr(kd_error_message(), "fc1.weight") != NULL, "%s", kd_error_message());
        kd_optim_free(oc9);
        kd_classifier_free(&c);
        kd_optim_cfg sgd = oc;
        sgd.kind = KD_OPTIM_SGD;
        kd_optim *os = kd_optim_new(&sgd, n);
        CHECK(kd_state_load(path, b.g, os, &r, "teacher", cfg) == KD_EFORMAT);
        CHECK(strstr(kd_error_message(), "adamw") != NULL);
        kd_optim_free(os);
        CHECK(kd_graph_param_data(b.g)[0] == 42.0f); /* untouched by every refusal */
        kd_graph_param_data(b.g)[0] = before;
        /* a checkpoint is not a state */
        CHECK(kd_checkpoint_save(a.g, &a.m, &ds, p2) == KD_OK);
        CHECK(kd_state_load(p2, b.g, ob, &r, NULL, NULL) == KD_EFORMAT);
        CHECK(strstr(kd_error_message(), "not a training state") != NULL);
    }
    TEST("state: a non-finite model is never saved") {
        size_t n0;
        char *before = kd_test_slurp(path, &n0);
        CHECK(kd_state_nonfinite(a.g, oa) == NULL);
        kd_node *w = kd_graph_find(a.g, "head.bias");
        CHECK(w != NULL);
        float keep = w->val.data[1];
        w->val.data[1] = INFINITY;
        const char *bad = kd_state_nonfinite(a.g, oa);
        CHECK(bad && !strcmp(bad, "head.bias"));
        CHECK(kd_state_save(path, a.g, oa, &s, cfg) == KD_ENUMERIC);
        CHECK(strstr(kd_error_message(), "head.bias") != NULL);
        w->val.data[1] = keep;
        oa->v[3] = NAN;
        bad = kd_state_nonfinite(a.g, oa);
        CHECK(bad && !strcmp(bad, "optim.v"));
        CHECK(kd_state_save(path, a.g, oa, &s, cfg) == KD_ENUMERIC);
        oa->v[3] = 0.0f;
        size_t n1;
        char *after = kd_test_slurp(path, &n1);
        CHECK(before && after && n0 == n1 && memcmp(before, after, n0) == 0);
        free(before);
        free(after);
        CHECK(count_matching(T, ".tmp.") == 0);
    }
    TEST("state: config hash and diff") {
        char h1[17], h2[17], h3[17], d[512];
        kd_state_config_hash("[run]\nthreads = 1\nseed = 3\n[train]\ncheckpoint_every = 5\n", h1);
        kd_state_config_hash("; other comment\n[run]\nthreads = 4\nseed = 3\n[train]\ncheckpoint_every = 0\n", h2);
        kd_state_config_hash("[run]\nthreads = 1\nseed = 4\n[train]\ncheckpoint_every = 5\n", h3);
        CHECK(strlen(h1) == 16 && !strcmp(h1, h2) && strcmp(h1, h3));
        int k = kd_state_config_diff("[a]\nx = 1\ny = 2\n[b]\nx = 3\n", "[a]\nx = 1\ny = 5\n[b]\nx = 3\nz = 0\n", d,
                                     sizeof d);
        CHECK_MSG(k == 2 && strstr(d, "[a] y was '2', now '5'") && strstr(d, "[b] z only now"), "%d: %s", k, d);
        CHECK(kd_state_config_diff("[a]\nx = 1\n", "[a]\nx = 1\n", d, sizeof d) == 0 && d[0] == '\0');
    }
    kd_optim_free(oa);
    kd_optim_free(ob);
    kd_classifier_free(&a);
    kd_classifier_free(&b);
    free(ds.images);
    free(ds.labels);
}

/* ---------------------------------------------------------------- the binary */

static char a_metrics[512], a_summary[512];
static int a_lines, a_teacher_lines;

static int summaries_equal(const char *run_name) {
    char p[512];
    cJSON *a = kd_test_read_json(a_summary), *b = kd_test_read_json(run_file(p, run_name, "summary.json"));
    int ok = a && b;
    const char *roles[] = {"teacher", "baseline", "student"};
    for (int i = 0; i < 3 && ok; i++) {
        double x = kd_test_json_num(a, roles[i], "test_acc"), y = kd_test_json_num(b, roles[i], "test_acc");
        double xl = kd_test_json_num(a, roles[i], "test_loss"), yl = kd_test_json_num(b, roles[i], "test_loss");
        if (!(x == y && xl == yl)) {
            fprintf(stderr, "  %s: test acc %.17g vs %.17g, loss %.17g vs %.17g\n", roles[i], x, y, xl, yl);
            ok = 0;
        }
    }
    cJSON_Delete(a);
    cJSON_Delete(b);
    return ok;
}

/* metrics.jsonl, the summary accuracies and the student's weights equal run A's */
static int same_as_a(const char *run_name) {
    char p[512], q[512];
    int ok = same_bytes(a_metrics, run_file(p, run_name, "metrics.jsonl"));
    ok &= summaries_equal(run_name);
    ok &= same_bytes(run_file(p, "a", "student.safetensors"), run_file(q, run_name, "student.safetensors"));
    ok &= same_bytes(run_file(p, "a", "teacher.safetensors"), run_file(q, run_name, "teacher.safetensors"));
    return ok;
}

static void test_reference(void) {
    char p[512];
    TEST("resume: the uninterrupted reference run") {
        res r = run("a", "--quiet", NULL);
        CHECK(ok_run(&r));
        res_free(&r);
        run_file(a_metrics, "a", "metrics.jsonl");
        run_file(a_summary, "a", "summary.json");
        a_lines = count_lines(a_metrics);
        /* 3 stages x (3 epochs x 19 steps + 3 evaluations) */
        CHECK_MSG(a_lines == 180, "%d lines", a_lines);
        char *m = kd_test_slurp(a_metrics, NULL);
        a_teacher_lines = 0;
        for (char *s = m; s && (s = strstr(s, "\"role\":\"teacher\"")); s++) a_teacher_lines++;
        free(m);
        CHECK(a_teacher_lines == 60);
        CHECK(exists(run_file(p, "a", "teacher.state.safetensors")));
        CHECK(exists(run_file(p, "a", "student.state.safetensors")));
        CHECK(exists(run_file(p, "a", "progress.json")));
        /* all finished: a resume skips every stage and changes nothing */
        r = run("a", "--resume", NULL);
        CHECK(ok_run(&r));
        CHECK(strstr(r.err, "student: finished before, skipped") != NULL);
        res_free(&r);
        CHECK(count_lines(a_metrics) == a_lines);
        CHECK(summaries_equal("a"));
    }
}

static uint64_t rng_state = 0x5eed0f7e57ull;
static int rnd(int lo, int hi) { /* [lo, hi] */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return lo + (int)((rng_state >> 33) % (uint64_t)(hi - lo + 1));
}

static void test_sigkill(void) {
    char p[512];
    TEST("resume: SIGKILL at random steps, resumed, equals the uninterrupted run") {
        int mid_run = 0;
        for (int trial = 0; trial < 3; trial++) {
            char name[32];
            snprintf(name, sizeof name, "kill%d", trial);
            run_file(p, name, "metrics.jsonl");
            /* killed once fresh and once while resuming, at increasing line counts */
            int k1 = rnd(1, a_lines / 2), k2 = rnd(k1 + 1, a_lines - 2);
            proc pr = spawn(name, "--quiet", NULL);
            mid_run += signal_at_lines(&pr, p, k1, SIGKILL);
            res r = finish(&pr);
            res_free(&r);
            pr = spawn(name, "--quiet", "--resume", NULL);
            mid_run += signal_at_lines(&pr, p, k2, SIGKILL);
            r = finish(&pr);
            res_free(&r);
            /* checkpoint_every may change on resume */
            r = run(name, "--quiet", "--resume", trial == 1 ? "--train.checkpoint_every=3" : "--quiet", NULL);
            CHECK(ok_run(&r));
            res_free(&r);
            CHECK_MSG(same_as_a(name), "trial %d, killed at %d and %d lines", trial, k1, k2);
        }
        CHECK_MSG(mid_run >= 4, "only %d of 6 kills landed before the run ended", mid_run);
    }
}

/* crd keeps a memory bank from step to step in its op's workspace: the
 * state carries it (an opstate.* tensor), else the resumed run differs */
static void test_op_state(void) {
    char p[512], q[512], teacher[600];
    TEST("resume: a CRD memory bank (op state) continues exactly") {
        snprintf(teacher, sizeof teacher, "--teacher.checkpoint=%s", run_file(p, "a", "teacher.safetensors"));
        const char *loss = "--distill.loss=ce + crd(weight=0.8, n_data=600, nce_k=64)";
        res r = run("crd_a", "--quiet", teacher, loss, "--distill.baseline=0", NULL);
        CHECK(ok_run(&r));
        res_free(&r);
        run_file(p, "crd_a", "metrics.jsonl");
        int n = count_lines(p);
        CHECK_MSG(n == 60, "%d lines", n);
        proc pr = spawn("crd_b", "--quiet", teacher, loss, "--distill.baseline=0", NULL);
        CHECK(signal_at_lines(&pr, run_file(q, "crd_b", "metrics.jsonl"), rnd(5, n - 15), SIGKILL));
        r = finish(&pr);
        res_free(&r);
        r = run("crd_b", "--quiet", teacher, loss, "--distill.baseline=0", "--resume", NULL);
        CHECK(ok_run(&r));
        res_free(&r);
        CHECK(same_bytes(p, q));
        CHECK(same_bytes(run_file(p, "crd_a", "student.safetensors"), run_file(q, "crd_b", "student.safetensors")));
        kd_safetensors st;
        int has = 0;
        if (kd_st_read(run_file(p, "crd_b", "student.state.safetensors"), &st) == KD_OK) {
            for (int i = 0; i < st.n; i++) has |= !strncmp(st.tensors[i].name, "opstate.", 8);
            kd_st_free(&st);
        }
        CHECK(has);
    }
}

static void test_signals(void) {
    char p[512], q[512];
    TEST("resume: SIGINT exits 130 with a state and a resume hint") {
        run_file(p, "int", "metrics.jsonl");
        proc pr = spawn("int", NULL);
        CHECK(signal_at_lines(&pr, p, rnd(a_teacher_lines + 2, a_lines - 40), SIGINT));
        res r = finish(&pr);
        CHECK_MSG(r.exited && r.code == 130, "exit %d signal %d", r.code, r.sig);
        CHECK_MSG(strstr(r.err, "interrupted by SIGINT") && strstr(r.err, "resume with: distill run") &&
                      strstr(r.err, "--run.name=int --resume"),
                  "%s", r.err);
        res_free(&r);
        CHECK(exists(run_file(q, "int", "teacher.safetensors")));
        CHECK(count_matching(run_file(q, "int", ""), ".state.safetensors") >= 2);
        CHECK(count_matching(run_file(q, "int", ""), ".tmp.") == 0);
        CHECK(!exists(run_file(q, "int", "summary.json")));
        r = run("int", "--resume", NULL);
        CHECK(ok_run(&r));
        CHECK(strstr(r.err, "resuming from") != NULL);
        res_free(&r);
        CHECK(same_as_a("int"));
    }
    TEST("resume: SIGTERM exits 143") {
        run_file(p, "term", "metrics.jsonl");
        proc pr = spawn("term", "--quiet", NULL);
        CHECK(signal_at_lines(&pr, p, rnd(5, a_lines - 40), SIGTERM));
        res r = finish(&pr);
        CHECK_MSG(r.exited && r.code == 143, "exit %d signal %d", r.code, r.sig);
        CHECK(strstr(r.err, "interrupted by SIGTERM") != NULL); /* printed even when quiet */
        res_free(&r);
        r = run("term", "--quiet", "--resume", NULL);
        CHECK(ok_run(&r));
        res_free(&r);
        CHECK(same_as_a("term"));
    }
    TEST("resume: a second SIGINT at once still leaves a resumable run") {
        run_file(p, "int2", "metrics.jsonl");
        proc pr = spawn("int2", "--quiet", NULL);
        int sent = signal_at_lines(&pr, p, rnd(5, a_lines - 40), SIGINT);
        CHECK(sent && kill(pr.pid, SIGINT) == 0);
        res r = finish(&pr);
        /* either the clean stop won or the second signal ended it at once */
        CHECK_MSG((r.exited && r.code == 130) || r.sig == SIGINT, "exit %d signal %d", r.code, r.sig);
        res_free(&r);
        r = run("int2", "--quiet", "--resume", NULL);
        CHECK(ok_run(&r));
        res_free(&r);
        CHECK(same_as_a("int2"));
    }
}

static void test_refusals(void) {
    char p[512], q[512], keep[512];
    /* a run stopped in the baseline: the teacher is finished, the baseline has a state */
    run_file(p, "bad", "metrics.jsonl");
    proc pr = spawn("bad", "--quiet", NULL);
    signal_at_lines(&pr, p, a_teacher_lines + 10, SIGINT);
    res r = finish(&pr);
    int stopped = r.exited && r.code == 130;
    res_free(&r);
    char state[512], weights[512];
    run_file(state, "bad", "baseline.state.safetensors");
    run_file(weights, "bad", "teacher.safetensors");
    snprintf(keep, sizeof keep, "%s/bad_teacher_copy.safetensors", T);
    size_t nw;
    char *w = kd_test_slurp(weights, &nw);
    CHECK(stopped && w && exists(state) && spit(keep, w, nw));
    free(w);
    TEST("resume: a changed config key is refused, naming it") {
        char *cfg0 = kd_test_slurp(run_file(q, "bad", "config.ini"), NULL);
        r = run("bad", "--quiet", "--resume", "--train.lr=0.07", NULL);
        ERROR_NAMES(r, "[train] lr", "'0.05'", "'0.07'", "progress.json");
        res_free(&r);
        char *cfg1 = kd_test_slurp(q, NULL);
        CHECK(cfg0 && cfg1 && !strcmp(cfg0, cfg1)); /* config.ini not rewritten */
        free(cfg0);
        free(cfg1);
        CHECK(same_bytes(weights, keep));
    }
    TEST("resume: a corrupt state is refused, naming it; the weights stay") {
        size_t n;
        char *s = kd_test_slurp(state, &n);
        char *orig = malloc(n);
        memcpy(orig, s, n);
        s[20] ^= 0x5a; /* inside the JSON header */
        s[21] = '\x01';
        CHECK(spit(state, s, n));
        r = run("bad", "--quiet", "--resume", NULL);
        ERROR_NAMES(r, state);
        res_free(&r);
        CHECK(same_bytes(weights, keep));
        CHECK(!exists(run_file(q, "bad", "baseline.safetensors")));
        CHECK(spit(state, s, n / 2)); /* truncated */
        r = run("bad", "--quiet", "--resume", NULL);
        ERROR_NAMES(r, state);
        res_free(&r);
        CHECK(same_bytes(weights, keep));
        /* a checkpoint where the state should be */
        char *ck = kd_test_slurp(weights, &n);
        CHECK(spit(state, ck, n));
        free(ck);
        r = run("bad", "--quiet", "--resume", NULL);
        ERROR_NAMES(r, state, "not a training state");
        res_free(&r);
        CHECK(same_bytes(weights, keep));
        free(s);
        free(orig);
    }
}

/* "step N" and "tensor: 'NAME'" in the error; returns N (-1: absent) */
static long error_step(const char *err, char *tensor, size_t n) {
    const char *e = strstr(err, "distill: error: "), *s = e ? strstr(e, " step ") : NULL;
    long step = -1;
    if (!s || sscanf(s, " step %ld", &step) != 1) return -1;
    const char *t = strstr(e, "tensor: '");
    if (!t) return -1;
    t += 9;
    size_t k = strcspn(t, "'\n");
    snprintf(tensor, n, "%.*s", (int)k, t);
    return k > 0 ? step : -1;
}

/* The state exists, reads, is one, its step is `step` and every F32 value
 * in it is finite. */
static int good_state(const char *path, long step) {
    kd_safetensors st;
    if (kd_st_read(path, &st) != KD_OK) {
        fprintf(stderr, "  %s\n", kd_error_message());
        return 0;
    }
    const char *fmt = kd_st_meta(&st, "format"), *sv = kd_st_meta(&st, "step");
    int ok = fmt && !strcmp(fmt, KD_STATE_FORMAT) && sv && atol(sv) == step;
    if (!ok) fprintf(stderr, "  %s: format %s, step %s, expected %ld\n", path, fmt, sv, step);
    for (int i = 0; i < st.n && ok; i++) {
        const kd_st_tensor *t = &st.tensors[i];
        if (t->dtype != KD_F32) continue;
        for (size_t j = 0; j < t->nbytes / 4; j++) {
            float v;
            memcpy(&v, t->data + 4 * j, 4);
            if (!isfinite(v)) {
                fprintf(stderr, "  %s: %s[%zu] = %g\n", path, t->name, j, (double)v);
                ok = 0;
                break;
            }
        }
    }
    kd_st_free(&st);
    return ok;
}

static void test_divergence(void) {
    char p[512], tensor[128];
    TEST("resume: a diverging loss names step and tensor; the last good state stays") {
        res r = run("nan1", "--quiet", "--train.lr=1000", "--train.checkpoint_every=1", NULL);
        long step = error_step(r.err, tensor, sizeof tensor);
        CHECK_MSG(r.exited && r.code == 1 && step > 0, "exit %d: %s", r.code, r.err);
        CHECK(strstr(r.err, "loss is") != NULL);
        run_file(p, "nan1", "teacher.state.safetensors");
        CHECK(strstr(r.err, "last good training state is") && strstr(r.err, p));
        res_free(&r);
        CHECK(good_state(p, step)); /* the state of the step before the bad one */
        CHECK(!exists(run_file(p, "nan1", "teacher.safetensors")));
    }
    TEST("resume: parameters going non-finite are never saved") {
        /* epoch 1 trains (lr 10, gradients clipped to 0.01); epoch 2's lr is 10 x 1e38 = inf,
         * so its first update makes parameters infinite while that step's loss was finite */
        res r = run("nan2", "--quiet", "--train.lr=10", "--train.clip=0.01", "--train.schedule=step",
                    "--train.step_epochs=1", "--train.gamma=1e38", "--train.checkpoint_every=1", NULL);
        long step = error_step(r.err, tensor, sizeof tensor);
        CHECK_MSG(r.exited && r.code == 1 && step == 20, "exit %d: %s", r.code, r.err);
        CHECK_MSG(strstr(r.err, "parameters went non-finite") && !strcmp(tensor, "fc1.weight"), "%s", r.err);
        CHECK(strstr(r.err, "(after step 19)") != NULL);
        res_free(&r);
        CHECK(good_state(run_file(p, "nan2", "teacher.state.safetensors"), 19));
        CHECK(count_matching(run_file(p, "nan2", ""), ".tmp.") == 0);
    }
}

static void test_logs(void) {
    char p[512];
    TEST("logs: --log-json lines are JSON objects with the fields") {
        res r = run("json", "--log-json", NULL);
        CHECK(ok_run(&r));
        int lines = 0, bad = 0, epochs = 0, steps = 0, infos = 0, checkpoints = 0;
        for (char *s = r.err; *s;) {
            char *nl = strchr(s, '\n');
            if (nl) *nl = '\0';
            cJSON *j = cJSON_Parse(s);
            const cJSON *ev = cJSON_GetObjectItemCaseSensitive(j, "event");
            if (!cJSON_IsObject(j) || !cJSON_IsString(ev)) {
                if (bad++ < 3) fprintf(stderr, "  not a JSON event: %s\n", s);
            } else if (!strcmp(ev->valuestring, "epoch")) {
                epochs++;
                int ok = cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j, "role"));
                const char *keys[] = {"epoch",     "epochs",   "step",         "train_loss",
                                      "test_loss", "test_acc", "samples_per_s"};
                for (int k = 0; k < 7; k++) ok &= cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(j, keys[k]));
                if (!ok) bad++;
            } else if (!strcmp(ev->valuestring, "step")) {
                steps++;
                int ok = cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j, "role"));
                const char *keys[] = {"epoch", "step", "loss", "lr"};
                for (int k = 0; k < 4; k++) ok &= cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(j, keys[k]));
                if (!ok) bad++;
            } else if (!strcmp(ev->valuestring, "checkpoint")) {
                checkpoints++;
                bad += !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j, "path"));
            } else if (!strcmp(ev->valuestring, "info")) {
                infos++;
                bad += !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j, "message"));
            }
            cJSON_Delete(j);
            lines++;
            s = nl ? nl + 1 : s + strlen(s);
        }
        res_free(&r);
        CHECK(bad == 0);
        CHECK_MSG(epochs == 9 && steps == 171 && infos >= 3 && checkpoints > 9,
                  "%d lines: %d epoch, %d step, %d info, %d "
                  "checkpoint",
                  lines, epochs, steps, infos, checkpoints);
        CHECK(same_bytes(a_metrics, run_file(p, "json", "metrics.jsonl"))); /* logging changes no result */
        r = run("json_err", "--log-json", "--train.lr=fast", NULL);
        cJSON *j = cJSON_Parse(r.err);
        const cJSON *ev = cJSON_GetObjectItemCaseSensitive(j, "event"),
                    *msg = cJSON_GetObjectItemCaseSensitive(j, "message");
        CHECK_MSG(r.code == 1 && cJSON_IsString(ev) && !strcmp(ev->valuestring, "error") && cJSON_IsString(msg) &&
                      strstr(msg->valuestring, "[train] lr"),
                  "%s", r.err);
        cJSON_Delete(j);
        res_free(&r);
    }
    TEST("logs: without a terminal, one plain line per epoch and no progress line") {
        res r = run("plain", NULL);
        CHECK(ok_run(&r));
        int epoch_lines = 0;
        for (const char *s = r.err; (s = strstr(s, " epoch ")); s++) epoch_lines++;
        CHECK_MSG(epoch_lines == 9 && !strchr(r.err, '\r') && !strstr(r.err, "ETA"), "%s", r.err);
        res_free(&r);
    }
    TEST("logs: a terminal gets a progress bar with an ETA") {
        int m = posix_openpt(O_RDWR | O_NOCTTY);
        int ok = m >= 0 && grantpt(m) == 0 && unlockpt(m) == 0;
        char *sname = ok ? ptsname(m) : NULL;
        int s = sname ? open(sname, O_RDWR | O_NOCTTY) : -1;
        CHECK(s >= 0);
        if (s < 0) {
            if (m >= 0) close(m);
            return;
        }
        proc pr = spawn_err(s, "tty", "--train.epochs=1", "--distill.baseline=0", NULL);
        close(s); /* the child holds the only slave: reads end (EIO) when it exits */
        size_t cap = 1 << 16, n = 0;
        char *buf = malloc(cap);
        for (;;) {
            ssize_t got = read(m, buf + n, cap - n - 1);
            if (got <= 0) break;
            n += (size_t)got;
            if (n + 1 == cap) buf = realloc(buf, cap *= 2);
        }
        buf[n] = '\0';
        close(m);
        res r = finish(&pr);
        CHECK(ok_run(&r));
        res_free(&r);
        CHECK_MSG(strstr(buf, "teacher [") && strstr(buf, "#") && strstr(buf, "ETA ") && strstr(buf, "\r\033[K") &&
                      strstr(buf, "student epoch 1/1: train loss"),
                  "%.400s", buf);
        free(buf);
    }
}

void test_resume(void) {
    snprintf(T, sizeof T, "%.200s/resume", kd_test_tmpdir());
    mkdir(T, 0755);
    char img[512], lab[512], timg[512], tlab[512];
    snprintf(img, sizeof img, "%s/train-images.idx", T);
    snprintf(lab, sizeof lab, "%s/train-labels.idx", T);
    snprintf(timg, sizeof timg, "%s/test-images.idx", T);
    snprintf(tlab, sizeof tlab, "%s/test-labels.idx", T);
    TEST("resume: synthetic data") { CHECK(write_idx(img, lab, 600, 11) && write_idx(timg, tlab, 200, 23)); }
    snprintf(ini, sizeof ini, "%s/tiny.ini", T);
    char text[3000];
    snprintf(text, sizeof text,
             "[run]\nout = %s/runs\nseed = 3\nthreads = 1\n"
             "[data]\ntrain = idx:%s,%s\ntest = idx:%s,%s\nlimit = 600\ntest_limit = 200\n"
             "[teacher]\nmodel = mlp: 32\n[student]\nmodel = mlp: 16\n"
             "[train]\nepochs = 3\nbatch = 32\nlog_every = 1\ncheckpoint_every = 4\n",
             T, img, lab, timg, tlab);
    CHECK(spit(ini, text, strlen(text)));
    test_state_file();
    TEST("resume: binary present") {
        int ok = access(kd_test_bin(), X_OK) == 0;
        CHECK_MSG(ok, "%s not found or not executable (set KD_DISTILL)", kd_test_bin());
        if (!ok) return;
    }
    test_reference();
    test_sigkill();
    test_op_state();
    test_signals();
    test_refusals();
    test_divergence();
    test_logs();
}
