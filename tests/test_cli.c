/* test_cli.c - end-to-end tests of the distill binary.
 *
 * Runs the real CLI (path from $KD_DISTILL, default build/distill) with
 * fork/exec, stdout and stderr captured to files under kd_test_tmpdir(), and
 * checks exit codes, the single "distill: error: ..." line and the files a
 * run leaves behind: bad configs and overrides, broken datasets (synthetic
 * IDX files), broken checkpoints (built with the kd_st_writer API or patched
 * byte by byte), a corrupt --teacher.checkpoint, a non-finite loss, the good
 * path (run, eval, load) and determinism. Every run is tiny (256 examples,
 * one epoch, mlp or a 4-channel cnn) and writes only under the temp dir.
 * Deliberately not here: accuracy of real training runs (too slow for CI).
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include "kd.h"
#include "kd_io.h"
#include "test.h"

/* ---------- running the binary ---------- */

typedef struct cli_res {
    int exited, code, sig;
    char *out, *err;
} cli_res;

static char T[200]; /* this area's directory: TMP/cli */
static int n_calls;

/* Whole file, NUL-terminated; NULL when it cannot be read. */
static int spit(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(data, 1, n, f) == n;
    ok &= fclose(f) == 0;
    return ok;
}

static int spit_str(const char *path, const char *text) { return spit(path, text, strlen(text)); }

static int file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static int same_bytes(const char *a, const char *b) {
    size_t na, nb;
    char *x = kd_test_slurp(a, &na), *y = kd_test_slurp(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* Number of entries of dir whose name contains ".tmp." */
static int count_tmp_files(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strstr(e->d_name, ".tmp.")) n++;
    closedir(d);
    return n;
}

/* Runs `distill ARGS...` (NULL-terminated). */
static cli_res cli(const char *first, ...) {
    const char *argv[48];
    int argc = 0;
    argv[argc++] = kd_test_bin();
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 47; a = va_arg(ap, const char *)) argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    char outp[512], errp[512];
    int k = n_calls++;
    snprintf(outp, sizeof outp, "%s/call%03d.out", T, k);
    snprintf(errp, sizeof errp, "%s/call%03d.err", T, k);
    cli_res r = {0};
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        int fo = open(outp, O_WRONLY | O_CREAT | O_TRUNC, 0644), fe = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) {
        r.code = -1;
    } else if (WIFEXITED(status)) {
        r.exited = 1;
        r.code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        r.sig = WTERMSIG(status);
    }
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

/* An error exit: exited normally with 1 or 2 (want: that code, or 0 for
 * either), stderr holds exactly one line starting "distill: error: ", it is
 * the last line, and it contains every needle. Prints why not. */
static int err_ok(const cli_res *r, int want, const char *const *needles) {
    if (!r->exited) {
        fprintf(stderr, "  did not exit normally (signal %d)\n", r->sig);
        return 0;
    }
    if (want ? r->code != want : (r->code != 1 && r->code != 2)) {
        fprintf(stderr, "  exit code %d, expected %s\n", r->code, want == 1 ? "1" : want == 2 ? "2" : "1 or 2");
        return 0;
    }
    int n = 0;
    const char *line = NULL, *last = NULL;
    for (const char *p = r->err; *p;) {
        const char *nl = strchr(p, '\n');
        if (strncmp(p, "distill: error: ", 16) == 0) {
            n++;
            line = p;
        }
        last = p;
        if (!nl) break;
        p = nl + 1;
    }
    if (n != 1 || line != last) {
        fprintf(stderr, "  expected one 'distill: error:' line, last on stderr; got %d:\n%s", n, r->err);
        return 0;
    }
    size_t ll = strcspn(line, "\n");
    char *l = strndup(line, ll);
    int ok = 1;
    for (int i = 0; needles[i]; i++)
        if (!strstr(l, needles[i])) {
            fprintf(stderr, "  error line lacks '%s': %s\n", needles[i], l);
            ok = 0;
        }
    free(l);
    return ok;
}

#define EXPECT_ERR(r, want, ...) CHECK(err_ok(&(r), want, (const char *const[]){__VA_ARGS__, NULL}))

static int ok_run(const cli_res *r) {
    if (r->exited && r->code == 0) return 1;
    fprintf(stderr, "  exit %d signal %d, stderr:\n%s", r->code, r->sig, r->err);
    return 0;
}

static char *path_in(char *buf, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static char *path_in(char *buf, const char *fmt, ...) {
    char rel[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rel, sizeof rel, fmt, ap);
    va_end(ap);
    snprintf(buf, 512, "%s/%s", T, rel);
    return buf;
}

/* ---------- synthetic IDX files ---------- */

static void be32put(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* n 28x28 images (magic 0x803 unless given), plain or gzip. Pixels are a
 * smooth pattern with a little noise, so gzip uses Huffman-coded blocks and a
 * flipped byte breaks the stream. */
static int write_images(const char *path, int n, uint32_t magic, int gz) {
    size_t len = 16 + (size_t)n * 784;
    uint8_t *b = malloc(len);
    be32put(b, magic ? magic : 0x803);
    be32put(b + 4, (uint32_t)n);
    be32put(b + 8, 28);
    be32put(b + 12, 28);
    uint32_t s = 12345;
    for (int i = 0; i < n; i++)
        for (int p = 0; p < 784; p++) {
            s = s * 1103515245u + 12345u;
            int lab = i % 10, r = p / 28, c = p % 28;
            int v = ((r / 4 + c / 4 + lab) % 3) * 90 + (int)((s >> 16) & 15);
            b[16 + (size_t)i * 784 + p] = (uint8_t)v;
        }
    int ok;
    if (gz) {
        gzFile g = gzopen(path, "wb9");
        ok = g && gzwrite(g, b, (unsigned)len) == (int)len;
        ok &= g && gzclose(g) == Z_OK;
    } else {
        ok = spit(path, b, len);
    }
    free(b);
    return ok;
}

static int write_labels(const char *path, int n) {
    uint8_t *b = malloc(8 + (size_t)n);
    be32put(b, 0x801);
    be32put(b + 4, (uint32_t)n);
    for (int i = 0; i < n; i++) b[8 + i] = (uint8_t)(i % 10);
    int ok = spit(path, b, 8 + (size_t)n);
    free(b);
    return ok;
}

/* ---------- checkpoint surgery ---------- */

typedef enum { RW_SAME, RW_SHAPE, RW_DROP, RW_EXTRA, RW_U16, RW_I64_VEC1, RW_I64_VEC2, RW_U8 } rw_mode;

/* Copies checkpoint src to dst through kd_st_read / kd_st_writer, applying
 * mode to the tensor named target (metadata copied as is). RW_U16 writes the
 * target as I16 and then patches the header's dtype to "U16" (same length),
 * a dtype the reader does not know. Returns 1 on success. */
static int rewrite_ckpt(const char *src, const char *dst, rw_mode mode, const char *target) {
    kd_safetensors st;
    if (kd_st_read(src, &st) != KD_OK) return 0;
    kd_st_writer *w = kd_st_writer_new();
    for (int i = 0; i < st.n_meta; i++) kd_st_set_meta(w, st.meta_keys[i], st.meta_vals[i]);
    static uint8_t zeros[1 << 20];
    int hit = 0;
    for (int i = 0; i < st.n; i++) {
        const kd_st_tensor *t = &st.tensors[i];
        if (strcmp(t->name, target) != 0) {
            kd_st_add(w, t->name, t->dtype, t->ndim, t->shape, t->data);
            continue;
        }
        hit = 1;
        int64_t shape[KD_ST_MAX_DIM];
        memcpy(shape, t->shape, sizeof shape);
        if (mode == RW_SAME) {
            kd_st_add(w, t->name, t->dtype, t->ndim, t->shape, t->data);
        } else if (mode == RW_SHAPE) {
            shape[t->ndim - 1] -= 1; /* one column short: same rank, wrong shape */
            kd_st_add(w, t->name, t->dtype, t->ndim, shape, zeros);
        } else if (mode == RW_U16) {
            kd_st_add(w, t->name, KD_I16, t->ndim, t->shape, zeros);
        } else if (mode == RW_I64_VEC1 || mode == RW_I64_VEC2) {
            int64_t v[2] = {7, 7}, s1[1] = {mode == RW_I64_VEC1 ? 1 : 2};
            kd_st_add(w, t->name, KD_I64, 1, s1, v);
        } else if (mode == RW_U8) {
            kd_st_add(w, t->name, KD_U8, 0, shape, zeros);
        } else if (mode == RW_EXTRA) {
            kd_st_add(w, t->name, t->dtype, t->ndim, t->shape, t->data);
        } /* RW_DROP: nothing */
    }
    if (mode == RW_EXTRA) {
        int64_t s[1] = {3};
        kd_st_add(w, "extra.bias", KD_F32, 1, s, zeros);
    }
    kd_status rc = kd_st_write(w, dst);
    kd_st_writer_free(w);
    kd_st_free(&st);
    if (!hit || rc != KD_OK) return 0;
    if (mode != RW_U16) return 1;
    size_t n;
    char *b = kd_test_slurp(dst, &n);
    char *p = b && n > 8 ? strstr(b + 8, "\"I16\"") : NULL;
    if (p) p[1] = 'U';
    int ok = p && spit(dst, b, n);
    free(b);
    return ok;
}

/* Header length (first 8 bytes, little endian) of a safetensors file. */
static uint64_t st_hlen(const uint8_t *b) {
    uint64_t h = 0;
    for (int i = 7; i >= 0; i--) h = h << 8 | b[i];
    return h;
}

/* ---------- the tests ---------- */

static char base_ini[512], runs_dir[512];

static void setup(void) {
    snprintf(T, sizeof T, "%.190s/cli", kd_test_tmpdir());
    mkdir(T, 0755);
    char p[512];
    snprintf(runs_dir, sizeof runs_dir, "%s/runs", T);
    snprintf(base_ini, sizeof base_ini, "%s", path_in(p, "base.ini"));
    char text[1024];
    snprintf(text, sizeof text,
             "# tiny runs for the CLI tests\n"
             "[run]\nout = %s\nseed = 1\nthreads = 2\n"
             "[data]\nlimit = 256\ntest_limit = 256\n"
             "[teacher]\nmodel = mlp: 32\n"
             "[train]\nepochs = 1\nbatch = 64\nlog_every = 1\n",
             runs_dir);
    spit_str(base_ini, text);
}

static void test_help(void) {
    TEST("cli: --help, --version, bogus command") {
        cli_res r = cli("--help", NULL);
        CHECK(r.exited && r.code == 0);
        CHECK(strstr(r.out, "usage: distill COMMAND") != NULL);
        res_free(&r);

        r = cli("run", "--help", NULL);
        CHECK(r.exited && r.code == 0);
        CHECK(strstr(r.out, "usage: distill run") != NULL);
        CHECK(strstr(r.out, "checkpoint") != NULL); /* the config schema is listed */
        res_free(&r);

        r = cli("eval", "--help", NULL);
        CHECK(r.exited && r.code == 0);
        CHECK(strstr(r.out, "usage: distill eval") != NULL);
        CHECK(strstr(r.out, "--data") != NULL);
        res_free(&r);

        r = cli("--version", NULL);
        CHECK(r.exited && r.code == 0);
        CHECK_MSG(strcmp(r.out, "distill " KD_VERSION "\n") == 0, "stdout '%s'", r.out);
        res_free(&r);

        r = cli("bogus", NULL);
        CHECK(r.exited && r.code == 2);
        CHECK(strstr(r.err, "bogus") != NULL);
        res_free(&r);

        r = cli(NULL);
        CHECK(r.exited && r.code == 2);
        res_free(&r);

        r = cli("run", NULL); /* no config */
        CHECK(r.exited && r.code == 2);
        CHECK(strstr(r.err, "usage: distill run") != NULL);
        res_free(&r);

        r = cli("eval", NULL); /* no checkpoint */
        CHECK(r.exited && r.code == 2);
        res_free(&r);

        r = cli("run", base_ini, "extra-positional", NULL);
        EXPECT_ERR(r, 2, "extra-positional");
        res_free(&r);

        r = cli("eval", "x.safetensors", "--batch", "zero", NULL);
        EXPECT_ERR(r, 2, "--batch", "zero");
        res_free(&r);
    }
}

static void test_config_errors(void) {
    char p[512];
    TEST("cli: config file errors") {
        cli_res r = cli("run", path_in(p, "no_such.ini"), NULL);
        EXPECT_ERR(r, 0, p, "cannot open");
        res_free(&r);

        spit_str(path_in(p, "bad_key.ini"), "[run]\nseed = 1\n[train]\nepochs = 1\nlrr = 0.1\n");
        r = cli("run", p, NULL);
        EXPECT_ERR(r, 0, "bad_key.ini:5", "lrr");
        res_free(&r);

        spit_str(path_in(p, "bad_section.ini"), "[run]\nseed = 1\n[trian]\nepochs = 1\n");
        r = cli("run", p, NULL);
        EXPECT_ERR(r, 0, "bad_section.ini:3", "trian");
        res_free(&r);

        spit_str(path_in(p, "bad_value.ini"), "[train]\nepochs = 1\nlr = fast\n");
        r = cli("run", p, NULL);
        EXPECT_ERR(r, 0, "bad_value.ini:3", "lr", "fast");
        res_free(&r);

        spit_str(path_in(p, "bad_int.ini"), "[train]\n\nepochs = 1.5\n");
        r = cli("run", p, NULL);
        EXPECT_ERR(r, 0, "bad_int.ini:3", "epochs", "1.5");
        res_free(&r);

        spit_str(path_in(p, "bad_range.ini"), "[train]\nbatch = 0\n");
        r = cli("run", p, NULL);
        EXPECT_ERR(r, 0, "bad_range.ini:2", "batch");
        res_free(&r);

        /* nothing of these runs may have reached the default ./runs or T/runs */
        CHECK(!file_exists(runs_dir));
    }
    TEST("cli: command-line override errors") {
        cli_res r = cli("run", base_ini, "--train.lr=abc", NULL);
        EXPECT_ERR(r, 0, "lr", "abc");
        res_free(&r);

        r = cli("run", base_ini, "--train.nope=1", NULL);
        EXPECT_ERR(r, 0, "nope");
        res_free(&r);

        r = cli("run", base_ini, "--nosuch.key=1", NULL);
        EXPECT_ERR(r, 0, "nosuch");
        res_free(&r);

        r = cli("run", base_ini, "--foo", NULL);
        EXPECT_ERR(r, 2, "--foo");
        res_free(&r);

        r = cli("run", base_ini, "--train.epochs=0", NULL);
        EXPECT_ERR(r, 0, "epochs");
        res_free(&r);

        r = cli("run", base_ini, "--threads", "many", NULL);
        EXPECT_ERR(r, 2, "--threads", "many");
        res_free(&r);
    }
    TEST("cli: bad model spec names the token") {
        cli_res r = cli("run", base_ini, "--run.name=spec", "--teacher.model=cnn: c4 q9 f16", NULL);
        EXPECT_ERR(r, 0, "[teacher] model", "'q9'");
        res_free(&r);
        r = cli("run", base_ini, "--run.name=spec", "--teacher.model=mlp: 32 zz", NULL);
        EXPECT_ERR(r, 0, "'zz'");
        res_free(&r);
        r = cli("run", base_ini, "--run.name=spec", "--teacher.model=transformer: 4", NULL);
        EXPECT_ERR(r, 0, "transformer");
        res_free(&r);
    }
}

static void test_data_errors(void) {
    char img[512], lab[512], timg[512], tlab[512], spec[1200], tspec[1200], p[512], p2[512];
    path_in(img, "img.idx");
    path_in(lab, "lab.idx");
    path_in(timg, "timg.idx.gz");
    path_in(tlab, "tlab.idx");
    int made = write_images(img, 120, 0, 0) && write_labels(lab, 120) && write_images(timg, 60, 0, 1) &&
               write_labels(tlab, 60);
    CHECK(made);
    snprintf(tspec, sizeof tspec, "--data.test=idx:%s,%s", timg, tlab);
    TEST("cli: synthetic IDX files train (positive control)") {
        snprintf(spec, sizeof spec, "--data.train=idx:%s,%s", img, lab);
        cli_res r = cli("run", base_ini, "--run.name=idx_ok", spec, tspec, "--quiet", NULL);
        CHECK(ok_run(&r));
        CHECK(file_exists(path_in(p, "runs/idx_ok/teacher.safetensors")));
        res_free(&r);
    }
    TEST("cli: dataset errors name the file") {
        /* missing file */
        snprintf(spec, sizeof spec, "--data.train=idx:%s,%s", path_in(p, "missing-images.idx"), lab);
        cli_res r = cli("run", base_ini, "--run.name=idx_bad", spec, tspec, NULL);
        EXPECT_ERR(r, 0, p);
        res_free(&r);

        /* truncated: header fine, payload cut in the middle of image 60 */
        size_t n;
        char *b = kd_test_slurp(img, &n);
        CHECK(b && n == 16 + 120 * 784);
        spit(path_in(p, "trunc.idx"), b, 16 + 60 * 784 + 100);
        snprintf(spec, sizeof spec, "--data.train=idx:%s,%s", p, lab);
        r = cli("run", base_ini, "--run.name=idx_bad", spec, tspec, NULL);
        EXPECT_ERR(r, 0, p, "truncated");
        res_free(&r);

        /* truncated inside the header */
        spit(path_in(p, "trunc_head.idx"), b, 10);
        snprintf(spec, sizeof spec, "--data.train=idx:%s,%s", p, lab);
        r = cli("run", base_ini, "--run.name=idx_bad", spec, tspec, NULL);
        EXPECT_ERR(r, 0, p);
        res_free(&r);
        free(b);

        /* wrong magic (0x802: a 2-d array) */
        write_images(path_in(p, "magic.idx"), 120, 0x802, 0);
        snprintf(spec, sizeof spec, "--data.train=idx:%s,%s", p, lab);
        r = cli("run", base_ini, "--run.name=idx_bad", spec, tspec, NULL);
        EXPECT_ERR(r, 0, p, "magic");
        res_free(&r);

        /* images and labels swapped: wrong magic on both */
        snprintf(spec, sizeof spec, "--data.train=idx:%s,%s", lab, img);
        r = cli("run", base_ini, "--run.name=idx_bad", spec, tspec, NULL);
        EXPECT_ERR(r, 0, lab, "magic");
        res_free(&r);

        /* label count != image count */
        write_labels(path_in(p2, "lab99.idx"), 99);
        snprintf(spec, sizeof spec, "--data.train=idx:%s,%s", img, p2);
        r = cli("run", base_ini, "--run.name=idx_bad", spec, tspec, NULL);
        EXPECT_ERR(r, 0, p2, img);
        res_free(&r);
    }
    TEST("cli: corrupt gzip names the file") {
        /* the intact .gz loads (it is the test set above); now flip its middle */
        write_images(path_in(p, "corrupt.idx.gz"), 120, 0, 1);
        size_t n;
        uint8_t *b = (uint8_t *)kd_test_slurp(p, &n);
        CHECK(b && n > 400);
        if (b && n > 400) {
            snprintf(spec, sizeof spec, "--data.train=idx:%s,%s", p, lab);
            cli_res r = cli("run", base_ini, "--run.name=gz_ok", spec, tspec, "--quiet", NULL);
            CHECK(ok_run(&r)); /* control: unflipped it trains */
            res_free(&r);
            for (size_t i = n / 2; i < n / 2 + 16; i++) b[i] ^= 0xA5;
            spit(p, b, n);
            r = cli("run", base_ini, "--run.name=idx_bad", spec, tspec, NULL);
            EXPECT_ERR(r, 0, p);
            res_free(&r);
            /* cut short instead */
            write_images(p, 120, 0, 1);
            free(b);
            b = (uint8_t *)kd_test_slurp(p, &n);
            spit(p, b, n / 2);
            r = cli("run", base_ini, "--run.name=idx_bad", spec, tspec, NULL);
            EXPECT_ERR(r, 0, p);
            res_free(&r);
        }
        free(b);
    }
    CHECK(!file_exists(path_in(p, "runs/idx_bad/teacher.safetensors")));
}

/* The good run: full test set so `distill eval` sees the same examples. */
static char good_ckpt[512], bn_ckpt[512];

static void test_good_path(void) {
    char p[512], q[512];
    path_in(good_ckpt, "runs/good/teacher.safetensors");
    TEST("cli: tiny run writes the run directory") {
        cli_res r = cli("run", base_ini, "--run.name=good", "--data.test_limit=0", NULL);
        CHECK(ok_run(&r));
        CHECK(strstr(r.out, "teacher") != NULL);
        res_free(&r);

        char *ini = kd_test_slurp(path_in(p, "runs/good/config.ini"), NULL);
        CHECK(ini && strstr(ini, "mlp: 32") && strstr(ini, "test_limit"));
        free(ini);

        size_t n;
        char *m = kd_test_slurp(path_in(p, "runs/good/metrics.jsonl"), &n);
        CHECK(m && n > 0 && m[n - 1] == '\n');
        int lines = 0, bad = 0, evals = 0;
        for (char *s = m; s && *s;) {
            char *nl = strchr(s, '\n');
            if (nl) *nl = '\0';
            cJSON *j = cJSON_Parse(s);
            if (!cJSON_IsObject(j)) {
                bad++;
                fprintf(stderr, "  not JSON: %s\n", s);
            } else if (cJSON_GetObjectItemCaseSensitive(j, "test_acc")) {
                evals++;
            }
            cJSON_Delete(j);
            lines++;
            s = nl ? nl + 1 : s + strlen(s);
        }
        free(m);
        CHECK(bad == 0);
        CHECK_MSG(lines == 5, "%d lines (4 steps at log_every=1, one eval)", lines);
        CHECK(evals == 1);

        CHECK(file_exists(good_ckpt));
        CHECK(count_tmp_files(path_in(p, "runs/good")) == 0);
    }
    double acc = NAN;
    TEST("cli: summary.json") {
        cJSON *s = kd_test_read_json(path_in(p, "runs/good/summary.json"));
        CHECK(s != NULL);
        acc = kd_test_json_num(s, "teacher", "test_acc");
        CHECK(acc >= 0.0 && acc <= 1.0);
        CHECK(acc > 0.15); /* 256 examples, one epoch: above chance */
        double params = kd_test_json_num(s, "teacher", "params");
        CHECK_CLOSE(params, 784 * 32 + 32 + 32 * 10 + 10, 0, 0);
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(s, "teacher");
        CHECK(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(t, "loaded")));
        cJSON_Delete(s);
    }
    TEST("cli: eval reproduces the run's test accuracy") {
        cli_res r = cli("eval", good_ckpt, "--threads", "2", NULL);
        CHECK(ok_run(&r));
        const char *a = strstr(r.out, "accuracy ");
        double pct = NAN;
        int nex = 0;
        CHECK_MSG(a && sscanf(a, "accuracy %lf%% (%d examples)", &pct, &nex) == 2, "stdout: %s", r.out);
        CHECK(nex == 10000);
        CHECK_CLOSE(pct, 100.0 * acc, 0.0051, 0); /* printed with 2 decimals */
        res_free(&r);

        /* --data with a 60-image synthetic set: counts follow the data */
        char d[1200];
        snprintf(d, sizeof d, "idx:%s,%s", path_in(p, "timg.idx.gz"), path_in(q, "tlab.idx"));
        r = cli("eval", good_ckpt, "--data", d, NULL);
        CHECK(ok_run(&r));
        CHECK(strstr(r.out, "(60 examples)") != NULL);
        res_free(&r);
    }
    TEST("cli: --teacher.checkpoint loads instead of training") {
        /* lr=1e30 would blow up at step 1 if it trained */
        path_in(p, "good_copy.safetensors");
        size_t n;
        char *b = kd_test_slurp(good_ckpt, &n);
        CHECK(b && spit(p, b, n));
        free(b);
        char opt[700];
        snprintf(opt, sizeof opt, "--teacher.checkpoint=%s", p);
        cli_res r = cli("run", base_ini, "--run.name=loaded", "--data.test_limit=0", "--train.lr=1e30", opt, NULL);
        CHECK(ok_run(&r));
        res_free(&r);
        cJSON *s = kd_test_read_json(path_in(q, "runs/loaded/summary.json"));
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(s, "teacher");
        CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(t, "loaded")));
        CHECK_CLOSE(kd_test_json_num(s, "teacher", "test_acc"), acc, 1e-12, 0);
        cJSON_Delete(s);
        CHECK(same_bytes(p, good_ckpt));
        CHECK(file_exists(path_in(q, "runs/loaded/teacher.safetensors")));
    }
}

static void test_checkpoint_errors(void) {
    char p[512], q[512];
    TEST("cli: eval rejects missing and garbage checkpoints") {
        cli_res r = cli("eval", path_in(p, "nope.safetensors"), NULL);
        EXPECT_ERR(r, 0, p);
        res_free(&r);

        uint8_t g[200];
        for (int i = 0; i < 200; i++) g[i] = (uint8_t)(i * 37 + 11);
        spit(path_in(p, "garbage.safetensors"), g, sizeof g);
        r = cli("eval", p, NULL);
        EXPECT_ERR(r, 0, p);
        res_free(&r);

        /* a plausible length, then not JSON */
        uint8_t h[8 + 24] = {24};
        memcpy(h + 8, "this is not a JSON thing", 24);
        spit(path_in(p, "notjson.safetensors"), h, sizeof h);
        r = cli("eval", p, NULL);
        EXPECT_ERR(r, 0, p, "JSON");
        res_free(&r);

        spit(path_in(p, "empty.safetensors"), "", 0);
        r = cli("eval", p, NULL);
        EXPECT_ERR(r, 0, p);
        res_free(&r);

        r = cli("eval", T, NULL); /* a directory */
        EXPECT_ERR(r, 0, T);
        res_free(&r);
    }
    TEST("cli: eval rejects patched offsets and lengths") {
        size_t n;
        uint8_t *b = (uint8_t *)kd_test_slurp(good_ckpt, &n);
        CHECK(b && n > 8 && st_hlen(b) < n - 8);
        if (b && n > 8 && st_hlen(b) < n - 8) {
            uint64_t hl = st_hlen(b);
            size_t payload = n - 8 - hl;
            /* the last tensor's end offset equals the payload size; make it larger */
            char num[32], *hdr = strndup((char *)b + 8, hl);
            snprintf(num, sizeof num, ",%zu]", payload);
            char *at = strstr(hdr, num);
            CHECK(at && at[1] != '9');
            if (at) {
                uint8_t *c = malloc(n);
                memcpy(c, b, n);
                c[8 + (at - hdr) + 1] = '9';
                spit(path_in(p, "offset.safetensors"), c, n);
                free(c);
                cli_res r = cli("eval", p, NULL);
                EXPECT_ERR(r, 0, p, "offset");
                res_free(&r);
            }
            free(hdr);

            /* truncated payload */
            spit(path_in(p, "short.safetensors"), b, n - 40);
            cli_res r = cli("eval", p, NULL);
            EXPECT_ERR(r, 0, p);
            res_free(&r);

            /* header length beyond the file */
            uint8_t *c = malloc(n);
            memcpy(c, b, n);
            uint64_t big = n; /* 8 + n > n */
            for (int i = 0; i < 8; i++) c[i] = (uint8_t)(big >> (8 * i));
            spit(path_in(p, "hlen.safetensors"), c, n);
            free(c);
            r = cli("eval", p, NULL);
            EXPECT_ERR(r, 0, p, "header");
            res_free(&r);

            /* header only */
            spit(path_in(p, "headonly.safetensors"), b, 8 + hl);
            r = cli("eval", p, NULL);
            EXPECT_ERR(r, 0, p);
            res_free(&r);
        }
        free(b);
    }
    TEST("cli: eval rejects tensors that do not fit the model") {
        /* control: an unchanged rewrite evaluates */
        CHECK(rewrite_ckpt(good_ckpt, path_in(p, "same.safetensors"), RW_SAME, "head.weight"));
        cli_res r = cli("eval", p, NULL);
        CHECK(ok_run(&r));
        res_free(&r);

        CHECK(rewrite_ckpt(good_ckpt, path_in(p, "shape.safetensors"), RW_SHAPE, "head.weight"));
        r = cli("eval", p, NULL);
        EXPECT_ERR(r, 0, p, "head.weight");
        res_free(&r);

        CHECK(rewrite_ckpt(good_ckpt, path_in(p, "drop.safetensors"), RW_DROP, "fc1.bias"));
        r = cli("eval", p, NULL);
        EXPECT_ERR(r, 0, p, "fc1.bias");
        res_free(&r);

        CHECK(rewrite_ckpt(good_ckpt, path_in(p, "extra.safetensors"), RW_EXTRA, "head.bias"));
        r = cli("eval", p, NULL);
        EXPECT_ERR(r, 0, p, "extra.bias");
        res_free(&r);

        CHECK(rewrite_ckpt(good_ckpt, path_in(p, "u16.safetensors"), RW_U16, "head.bias"));
        r = cli("eval", p, NULL);
        EXPECT_ERR(r, 0, p, "head.bias", "U16");
        res_free(&r);
    }
    TEST("cli: num_batches_tracked must be a scalar integer") {
        path_in(bn_ckpt, "runs/bn/teacher.safetensors");
        cli_res r = cli("run", base_ini, "--run.name=bn", "--teacher.model=cnn: c4 p f16", "--quiet", NULL);
        CHECK(ok_run(&r));
        res_free(&r);
        const char *nbt = "bn1.num_batches_tracked";
        CHECK(rewrite_ckpt(bn_ckpt, path_in(p, "bn_same.safetensors"), RW_SAME, nbt));
        r = cli("eval", p, NULL);
        CHECK(ok_run(&r));
        res_free(&r);

        const rw_mode modes[] = {RW_I64_VEC2, RW_I64_VEC1, RW_U8};
        for (int i = 0; i < 3; i++) {
            CHECK(rewrite_ckpt(bn_ckpt, path_in(p, "bn_bad%d.safetensors", i), modes[i], nbt));
            r = cli("eval", p, NULL);
            EXPECT_ERR(r, 0, p, nbt);
            res_free(&r);
        }
        /* the cnn checkpoint evaluated as if it were the mlp: metadata says
         * mlp: 32, tensors are the cnn's */
        kd_safetensors st;
        CHECK(kd_st_read(bn_ckpt, &st) == KD_OK);
        kd_st_writer *w = kd_st_writer_new();
        for (int i = 0; i < st.n_meta; i++)
            kd_st_set_meta(w, st.meta_keys[i], strcmp(st.meta_keys[i], "model") ? st.meta_vals[i] : "mlp: 32");
        for (int i = 0; i < st.n; i++)
            kd_st_add(w, st.tensors[i].name, st.tensors[i].dtype, st.tensors[i].ndim, st.tensors[i].shape,
                      st.tensors[i].data);
        CHECK(kd_st_write(w, path_in(q, "mismatch.safetensors")) == KD_OK);
        kd_st_writer_free(w);
        kd_st_free(&st);
        r = cli("eval", q, NULL);
        EXPECT_ERR(r, 0, q, "fc1.weight");
        res_free(&r);
    }
}

static void test_teacher_checkpoint_corrupt(void) {
    char p[512], q[512], opt[700];
    TEST("cli: corrupt [teacher] checkpoint is reported and left alone") {
        mkdir(path_in(p, "ck4"), 0755);
        /* garbage; a real checkpoint cut short; a checkpoint of another model */
        uint8_t g[300];
        for (int i = 0; i < 300; i++) g[i] = (uint8_t)(i * 91 + 5);
        spit(path_in(p, "ck4/garbage.safetensors"), g, sizeof g);
        size_t n;
        char *b = kd_test_slurp(good_ckpt, &n);
        CHECK(b != NULL);
        if (b) spit(path_in(p, "ck4/cut.safetensors"), b, n / 2);
        free(b);
        b = kd_test_slurp(bn_ckpt, &n);
        CHECK(b != NULL);
        if (b) spit(path_in(p, "ck4/other.safetensors"), b, n);
        free(b);
        const char *files[] = {"garbage", "cut", "other"};
        for (int i = 0; i < 3; i++) {
            path_in(p, "ck4/%s.safetensors", files[i]);
            path_in(q, "ck4/%s.orig", files[i]);
            b = kd_test_slurp(p, &n);
            spit(q, b, n);
            free(b);
            snprintf(opt, sizeof opt, "--teacher.checkpoint=%s", p);
            cli_res r = cli("run", base_ini, "--run.name=ck4", opt, NULL);
            if (i < 2)
                EXPECT_ERR(r, 0, p);
            else
                EXPECT_ERR(r, 0, p, "fc1.weight");
            res_free(&r);
            CHECK(same_bytes(p, q));
            CHECK(!file_exists(path_in(q, "runs/ck4/teacher.safetensors")));
            CHECK(!file_exists(path_in(q, "runs/ck4/summary.json")));
            CHECK(count_tmp_files(path_in(q, "runs/ck4")) == 0);
            CHECK(count_tmp_files(path_in(q, "ck4")) == 0);
        }
    }
}

/* Checks the error line of a NaN run names a step and a tensor. */
static int names_step_and_tensor(const char *err) {
    const char *s = strstr(err, "step ");
    int step = -1;
    if (!s || sscanf(s, "step %d", &step) != 1 || step < 0) return 0;
    const char *t = strstr(err, "tensor: '");
    if (!t) return 0;
    t += 9;
    size_t k = strcspn(t, "'\n");
    return k > 0 && t[k] == '\'' && !(k == 1 && t[0] == '?');
}

static void test_nan(void) {
    char p[512], q[512], opt[700];
    TEST("cli: non-finite loss stops the run") {
        snprintf(opt, sizeof opt, "--teacher.checkpoint=%s", path_in(p, "nan_ckpt.safetensors"));
        cli_res r = cli("run", base_ini, "--run.name=nan", "--train.lr=1e30", opt, NULL);
        EXPECT_ERR(r, 1, "step", "teacher");
        CHECK_MSG(names_step_and_tensor(r.err), "%s", r.err);
        res_free(&r);
        CHECK(!file_exists(p));
        CHECK(!file_exists(path_in(q, "runs/nan/teacher.safetensors")));
        CHECK(!file_exists(path_in(q, "runs/nan/summary.json")));
        CHECK(count_tmp_files(path_in(q, "runs/nan")) == 0);
        CHECK(count_tmp_files(T) == 0);
    }
    TEST("cli: non-finite loss leaves an earlier checkpoint untouched") {
        cli_res r = cli("run", base_ini, "--run.name=nan2", "--quiet", NULL);
        CHECK(ok_run(&r));
        res_free(&r);
        path_in(p, "runs/nan2/teacher.safetensors");
        path_in(q, "nan2_before.safetensors");
        size_t n;
        char *b = kd_test_slurp(p, &n);
        CHECK(b && spit(q, b, n));
        free(b);
        r = cli("run", base_ini, "--run.name=nan2", "--train.lr=1e30", "--quiet", NULL);
        EXPECT_ERR(r, 1, "step");
        res_free(&r);
        CHECK(same_bytes(p, q));
        CHECK(count_tmp_files(path_in(q, "runs/nan2")) == 0);
    }
}

static void test_determinism(void) {
    char a[512], b[512], c[512];
    TEST("cli: same seed, same metrics; other seed, other metrics") {
        const char *m = "--teacher.model=cnn: c4 p f16";
        cli_res r1 = cli("run", base_ini, "--run.name=det1", m, "--run.seed=7", "--threads", "2", "--quiet", NULL);
        cli_res r2 = cli("run", base_ini, "--run.name=det2", m, "--run.seed=7", "--threads", "2", "--quiet", NULL);
        cli_res r3 = cli("run", base_ini, "--run.name=det3", m, "--run.seed=8", "--threads", "2", "--quiet", NULL);
        CHECK(ok_run(&r1) && ok_run(&r2) && ok_run(&r3));
        res_free(&r1);
        res_free(&r2);
        res_free(&r3);
        size_t n = 0;
        char *s = kd_test_slurp(path_in(a, "runs/det1/metrics.jsonl"), &n);
        CHECK(s && n > 100);
        free(s);
        CHECK(same_bytes(a, path_in(b, "runs/det2/metrics.jsonl")));
        CHECK(!same_bytes(a, path_in(c, "runs/det3/metrics.jsonl")));
        CHECK(same_bytes(path_in(a, "runs/det1/teacher.safetensors"), path_in(b, "runs/det2/teacher.safetensors")));
    }
}

void test_cli(void) {
    setup();
    TEST("cli: binary present") {
        int ok = access(kd_test_bin(), X_OK) == 0;
        CHECK_MSG(ok, "%s not found or not executable (set KD_DISTILL)", kd_test_bin());
        if (!ok) return;
    }
    test_help();
    test_config_errors();
    test_data_errors();
    test_good_path();
    test_checkpoint_errors();
    test_teacher_checkpoint_corrupt();
    test_nan();
    test_determinism();
}
